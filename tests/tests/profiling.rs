//! Profiles on demand from a real `keel start` (docs/profiling.md): with `[metrics] profiling
//! = true`, a CPU profile taken while transactions flow, its flamegraph and a heap profile
//! decode as pprof (the heap one symbolized: jemalloc is the allocator of this binary only),
//! and the node keeps finalizing throughout; with profiling off the paths answer 404.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use keel_node::config::{ByteSize, Config};
use keel_node::profiling::summarize;
use keel_tests::{http_request, transfer, HttpResponse, TestNode, TEST_CHAIN_ID};
use keel_types::Keypair;

fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_request(addr, "GET", path, b"", Duration::from_secs(60)).unwrap()
}

fn header<'a>(response: &'a HttpResponse, name: &str) -> &'a str {
    response
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Submits transfers from the validator's account until `stop`, counting those accepted.
/// `keel_memory_used_bytes{consumer="profiles"}` of the node whose metrics listen at `addr`.
fn symbols_held(addr: SocketAddr) -> f64 {
    let metrics = get(addr, "/metrics");
    let text = String::from_utf8(metrics.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("keel_memory_used_bytes{consumer=\"profiles\"} "))
        .unwrap_or_else(|| panic!("no profiles consumer in {text}"))
        .parse()
        .unwrap()
}

fn load(
    node: &TestNode,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
) -> thread::JoinHandle<()> {
    let rpc = node.rpc();
    let key = node.validator_key().unwrap();
    thread::spawn(move || {
        let to = Keypair::generate().address();
        let mut nonce = 0;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..20 {
                let tx = transfer(&key, TEST_CHAIN_ID, nonce, 1, to, 1);
                if rpc.submit(&tx).is_ok() {
                    nonce += 1;
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
    })
}

#[test]
fn profiles_of_a_loaded_node_decode_and_the_node_keeps_finalizing() {
    let mut node = TestNode::init().unwrap();
    let path = node.config_path();
    let mut config = Config::load(&path).unwrap();
    config.metrics.profiling = true;
    // Dense sampling, so that a short-lived node has a heap profile worth checking.
    config.metrics.heap_sample_bytes = ByteSize::kib(64);
    fs::write(&path, config.to_toml_string()).unwrap();
    node.start().unwrap();
    // Ports may have been re-picked at start.
    let metrics = Config::load(&path).unwrap().metrics.listen_addr;
    let rpc = node.rpc();

    let index = get(metrics, "/debug/pprof/");
    assert_eq!(index.status, 200, "{index:?}");
    let index = String::from_utf8(index.body).unwrap();
    assert!(
        index.contains("one allocation sampled per 64KiB allocated"),
        "{index}"
    );
    let frame_pointers = index.contains("frame pointers present");
    // No symbols are loaded before the first profile.
    assert_eq!(symbols_held(metrics), 0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let loader = load(&node, stop.clone(), accepted.clone());
    let height_before = rpc.latest_height().unwrap();

    // A CPU profile under load, and a second one refused while it runs.
    let profile = thread::spawn(move || get(metrics, "/debug/pprof/profile?seconds=3"));
    thread::sleep(Duration::from_millis(500));
    let refused = get(metrics, "/debug/pprof/flamegraph?seconds=1");
    assert_eq!(refused.status, 409, "{refused:?}");
    let profile = profile.join().unwrap();
    assert_eq!(profile.status, 200, "{profile:?}");
    assert_eq!(header(&profile, "content-type"), "application/octet-stream");
    assert_eq!(&profile.body[..2], &[0x1f, 0x8b], "gzip-compressed");
    let cpu = summarize(&profile.body).unwrap();
    assert_eq!(cpu.sample_types, ["samples/count", "cpu/nanoseconds"]);
    assert!(cpu.samples > 0 && cpu.totals[0] > 0, "{cpu:?}");
    if frame_pointers {
        assert!(
            cpu.functions.iter().any(|f| f.contains("keel_")),
            "no keel function in a profile of a loaded node: {:?}",
            cpu.functions
        );
    }

    // The profile left pprof's table of samples (~20 MB) and the symbol cache (the binary's
    // parsed debug information: ~100 MB with a release build's) loaded: the `profiles`
    // memory consumer counts them.
    let held = symbols_held(metrics);
    assert!(held > 10e6, "profiles consumer: {held}");

    let flamegraph = get(metrics, "/debug/pprof/flamegraph?seconds=1");
    assert_eq!(flamegraph.status, 200, "{flamegraph:?}");
    assert_eq!(header(&flamegraph, "content-type"), "image/svg+xml");
    let svg = String::from_utf8(flamegraph.body).unwrap();
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );

    let heap = get(metrics, "/debug/pprof/heap");
    assert_eq!(heap.status, 200, "{heap:?}");
    assert_eq!(header(&heap, "content-type"), "application/octet-stream");
    let heap = summarize(&heap.body).unwrap();
    assert_eq!(heap.sample_types, ["inuse_space/bytes"]);
    assert!(heap.samples > 0 && heap.totals[0] > 0, "{heap:?}");
    // jemalloc's own unwinder does not need frame pointers: the stacks reach keel's code.
    assert!(
        heap.functions.iter().any(|f| f.contains("keel_")),
        "no keel function among the heap profile's: {:?}",
        heap.functions
    );

    // Bad requests get a reason; the node went on finalizing throughout.
    let bad = get(metrics, "/debug/pprof/profile?seconds=0");
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(
        String::from_utf8_lossy(&bad.body),
        "seconds must be a whole number from 1 to 300 (got \"0\")\n"
    );
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    assert!(accepted.load(Ordering::Relaxed) > 0, "no load was applied");
    let height_after = rpc.latest_height().unwrap();
    assert!(
        height_after >= height_before + 10,
        "the chain barely moved during the profiles: {height_before} -> {height_after}"
    );
    assert_eq!(get(metrics, "/metrics").status, 200);
}

#[test]
fn profile_paths_are_not_found_when_profiling_is_off() {
    let node = TestNode::start_new().unwrap();
    let metrics = Config::load(&node.config_path())
        .unwrap()
        .metrics
        .listen_addr;
    for path in [
        "/debug/pprof/",
        "/debug/pprof/profile?seconds=1",
        "/debug/pprof/heap",
    ] {
        let response = get(metrics, path);
        assert_eq!(response.status, 404, "{path}: {response:?}");
    }
    assert_eq!(get(metrics, "/metrics").status, 200);
}
