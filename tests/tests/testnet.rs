//! Real multi-process networks: `keel testnet` homes run as separate `keel start` processes
//! on loopback, talking libp2p.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use keel_node::config::Config;
use keel_tests::{testnet_nodes, transfer, u64_field, TestNode};
use keel_types::Keypair;
use serde_json::{json, Value};

const BLOCK_TIME_MS: u64 = 300;
const VALIDATORS: usize = 4;

fn finalized(node: &TestNode) -> u64 {
    node.rpc()
        .status()
        .ok()
        .and_then(|s| u64_field(&s, "finalized_height").ok())
        .unwrap_or(0)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Every node has the same block hash and state root at every height up to `height`.
fn assert_agree(nodes: &[&TestNode], height: u64) {
    for h in 1..=height {
        let headers: Vec<Value> = nodes.iter().map(|n| n.rpc().header(h).unwrap()).collect();
        for (i, hd) in headers.iter().enumerate().skip(1) {
            assert_eq!(
                hd["hash"], headers[0]["hash"],
                "node {i} differs at height {h}"
            );
            assert_eq!(
                hd["state_root"], headers[0]["state_root"],
                "node {i} state root at {h}"
            );
        }
    }
}

fn metrics(node: &TestNode) -> String {
    let addr = Config::load(&node.config_path())
        .unwrap()
        .metrics
        .listen_addr;
    let r = keel_tests::http_request(addr, "GET", "/metrics", b"", Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

/// The value of the sample whose name and labels are exactly `series` (0 if absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn testnet(dir: &std::path::Path) -> Vec<TestNode> {
    testnet_nodes(dir, VALIDATORS, BLOCK_TIME_MS, "keel-net-test", |config| {
        // A dead leader costs one short timeout.
        config.consensus.timeout_ms = 1_200;
    })
    .unwrap()
}

/// A testnet in a temporary folder (named with `prefix`), every node started.
fn started_testnet(prefix: &str) -> (tempfile::TempDir, Vec<TestNode>) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let mut nodes = testnet(dir.path());
    for n in nodes.iter_mut() {
        n.start().unwrap();
    }
    (dir, nodes)
}

#[test]
fn four_validator_processes_agree_survive_a_crash_and_resync() {
    let (_dir, mut nodes) = started_testnet("keel-net-");
    wait_until(
        "all four finalize 5 blocks",
        Duration::from_secs(90),
        || nodes.iter().all(|n| finalized(n) >= 5),
    );
    for n in &nodes {
        let peers = u64_field(&n.rpc().status().unwrap(), "peers").unwrap();
        assert_eq!(
            peers,
            (VALIDATORS - 1) as u64,
            "each node is connected to the others"
        );
    }
    let common = nodes.iter().map(finalized).min().unwrap();
    assert_agree(&nodes.iter().collect::<Vec<_>>(), common);

    // A transaction submitted to node1 is final on all four.
    let sender = nodes[0].validator_key().unwrap();
    let to = Keypair::generate().address();
    let tx = transfer(&sender, "keel-net-test", 0, 1, to, 777);
    nodes[1].rpc().submit(&tx).unwrap();
    nodes[1]
        .rpc()
        .wait_finalized(&tx.hash, Duration::from_secs(60))
        .unwrap();
    for (i, n) in nodes.iter().enumerate() {
        wait_until(
            &format!("node {i} sees the transfer"),
            Duration::from_secs(30),
            || n.rpc().balance(&to).unwrap_or(0) == 777,
        );
    }

    // Garbage on a p2p port: nothing breaks.
    let p2p = Config::load(&nodes[0].config_path())
        .unwrap()
        .p2p
        .listen_addr;
    let port: u16 = p2p.rsplit('/').next().unwrap().parse().unwrap();
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0xff; 2048][..]] {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(junk);
        }
    }

    // One validator dies: the other three keep finalizing.
    nodes[3].kill();
    let at_kill = nodes[..3].iter().map(finalized).max().unwrap();
    // Far enough that the restarted node needs several sync batches (32 blocks each),
    // fetched from several peers at once.
    wait_until(
        "three validators keep finalizing",
        Duration::from_secs(180),
        || nodes[..3].iter().all(|n| finalized(n) >= at_kill + 40),
    );
    for n in nodes[..3].iter_mut() {
        n.assert_running().unwrap();
    }

    // It comes back, syncs what it missed and rejoins.
    nodes[3].start().unwrap();
    let target = nodes[..3].iter().map(finalized).max().unwrap() + 3;
    wait_until(
        "the restarted validator catches up",
        Duration::from_secs(90),
        || finalized(&nodes[3]) >= target,
    );
    let common = nodes.iter().map(finalized).min().unwrap();
    assert_agree(&nodes.iter().collect::<Vec<_>>(), common);
    let log = std::fs::read_to_string(nodes[3].log_path()).unwrap();
    let batches = log.matches("synced blocks").count();
    assert!(
        batches >= 2,
        "the restarted validator fetched {batches} batches of missed blocks from its peers"
    );
    // The last sync round may still be in flight when the node reaches the target; it ends
    // (answered or timed out after 5 s) and the node stops reporting itself syncing.
    wait_until(
        "the restarted validator stops syncing",
        Duration::from_secs(15),
        || {
            nodes[3]
                .rpc()
                .status()
                .is_ok_and(|s| s["syncing"] == json!(false))
        },
    );

    // Metrics: p2p bytes by direction and compression. Sync answers (many blocks) are above
    // the 1 KiB threshold and go compressed; votes and timeouts stay raw.
    let mut compressed_received = 0;
    for (i, n) in nodes.iter().enumerate() {
        let text = metrics(n);
        assert!(
            metric(
                &text,
                "keel_p2p_bytes_total{direction=\"sent\",compressed=\"false\"}"
            ) > 0.0,
            "{text}"
        );
        compressed_received += metric(
            &text,
            "keel_p2p_bytes_total{direction=\"received\",compressed=\"true\"}",
        ) as u64;
        assert!(metric(&text, "keel_finalized_height") >= 1.0);
        assert_eq!(
            metric(&text, "keel_peers"),
            (VALIDATORS - 1) as f64,
            "{text}"
        );
        // Counters start at zero with the process: node 3 restarted after the transfer.
        if i < 3 {
            assert!(metric(&text, "keel_txs_committed_total") >= 1.0, "{text}");
        }
        assert!(text.contains("keel_rpc_requests_total{method=\"chain_status\",code=\"0\"}"));
    }
    assert!(
        compressed_received > 0,
        "no compressed frame was ever received"
    );
    for n in nodes.iter_mut() {
        n.assert_running().unwrap();
    }
}

/// SIGTERM stops every process of a running testnet within 10 s, cleanly, and each leaves
/// its peer book on disk with the scores it gave the other validators (the p2p service saves
/// it only every 30 s while running: within this test's few seconds only the final save at
/// shutdown can have written it).
#[test]
fn sigterm_stops_every_validator_within_ten_seconds_and_keeps_the_peer_book() {
    let (_dir, mut nodes) = started_testnet("keel-term-");
    wait_until(
        "all four connect and finalize 3 blocks",
        Duration::from_secs(60),
        || {
            nodes.iter().all(|n| {
                finalized(n) >= 3
                    && n.rpc()
                        .status()
                        .ok()
                        .and_then(|s| u64_field(&s, "peers").ok())
                        == Some((VALIDATORS - 1) as u64)
            })
        },
    );
    // Every validator submits a transfer to its own node, which gossips it: every node admits
    // transactions from each of its peers, and scores them for it.
    for n in &nodes {
        let key = n.validator_key().unwrap();
        let tx = transfer(
            &key,
            "keel-net-test",
            0,
            1,
            Keypair::generate().address(),
            5,
        );
        n.rpc().submit(&tx).unwrap();
    }
    wait_until(
        "every node has admitted the other nodes' transfers",
        Duration::from_secs(30),
        || {
            nodes
                .iter()
                .all(|n| metric(&metrics(n), "keel_txs_committed_total") >= VALIDATORS as f64)
        },
    );
    for (i, n) in nodes.iter_mut().enumerate() {
        let started = std::time::Instant::now();
        let status = n.terminate(Duration::from_secs(10)).unwrap();
        assert!(status.success(), "node {i} exited with {status}");
        eprintln!("node {i} stopped in {:?}", started.elapsed());
    }
    for (i, n) in nodes.iter().enumerate() {
        let log = std::fs::read_to_string(n.log_path()).unwrap();
        assert!(
            log.contains("node stopped"),
            "node {i} did not stop cleanly"
        );
        let store = keel_storage::RocksStore::open(
            &n.home().join("data"),
            &keel_storage::RocksConfig::default(),
        )
        .unwrap();
        let book = keel_node::store::ConsensusStore::new(std::sync::Arc::new(store)).peer_book();
        let peers = keel_p2p::PeerStore::load(&book);
        // Gossip reaches a node through whichever peers relay it first: at least one of them
        // earned a score.
        let scored = peers.iter().filter(|p| p.score > 0).count();
        assert!(
            scored >= 1,
            "node {i} saved no peer with a positive score: {peers:?}"
        );
    }
}

/// `GET /health` is 503 with its reasons on a validator cut off from the others (no peers,
/// nothing final), and 200 once they run.
#[test]
fn health_is_503_for_a_cut_off_validator_and_200_with_its_peers() {
    let dir = tempfile::Builder::new()
        .prefix("keel-health-")
        .tempdir()
        .unwrap();
    let mut nodes = testnet_nodes(dir.path(), 2, 100, "keel-health", |_| {}).unwrap();
    nodes[0].start().unwrap();
    let rpc = nodes[0].rpc();
    // 20 block times of 100 ms without a final block, and no peer.
    std::thread::sleep(Duration::from_millis(2_500));
    let alone = rpc.get("/health").unwrap();
    assert_eq!(alone.status, 503, "{alone:?}");
    let body = alone.json().unwrap();
    assert_eq!(body["status"], json!("unhealthy"), "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("no peers"), "{reasons}");
    assert!(reasons.contains("no new final block"), "{reasons}");

    nodes[1].start().unwrap();
    wait_until(
        "node0 healthy with its peer",
        Duration::from_secs(30),
        || rpc.get("/health").map(|h| h.status == 200).unwrap_or(false),
    );
    let ok = rpc.get("/health").unwrap().json().unwrap();
    assert_eq!(ok["status"], json!("ok"), "{ok}");
    assert_eq!(ok["peers"], json!(1), "{ok}");
}
