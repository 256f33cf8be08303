//! Issue 15, item 3: under load, the per-consumer figures (`keel_memory_used_bytes{consumer}`)
//! must explain at least 90% of the memory jemalloc has allocated
//! (`keel_memory_allocated_bytes`). The automated form of `scripts/memory_under_load.sh` plus
//! `scripts/memory_summary.py` (docs/benchmarks.md, "Memory under load"): 5 minutes of load,
//! as issue 15's check (`KEEL_MEMORY_TEST_SECONDS=60` for a shorter run; the share is lower
//! early in a run, while RocksDB's memtables fill). `KEEL_MEMORY_TEST_TPS=9000
//! KEEL_MEMORY_TEST_BATCH=50` runs it at the highest rate one node carries here.
//!
//! A fresh one-validator node (`memory.limit = "512MiB"`, 1 s blocks, every other memory
//! setting at its default, so the budgets derive from the limit) is driven by
//! `keel loadgen --tps 2000 --duration 300 --json` while this test reads `state_getAccount` of
//! the validator's address about 300 times a second. Every 2 s it samples the node's
//! `VmRSS`/`VmHWM` (`/proc/PID/status`) and its `/metrics`. It then checks that:
//! - every accepted transfer became final, and at most 0.1% of the submissions were refused;
//! - over the samples of loadgen's send phase, the median of sum(used) / allocated is at least
//!   0.90 (the figures are printed: sample count, median, p10, min, max, peak `VmHWM`, the
//!   consumers at the peak-allocated sample);
//! - the peak `VmHWM` stays within the limit plus 5%;
//! - the finalized height kept growing throughout.
//!
//! Opt-in (`#[ignore]`): it runs about 5.5 minutes of heavy load and its figures mean
//! something only on an otherwise quiet machine, with a release `keel` (a debug one does not
//! carry 2,000 transfers/s). Run it with
//!
//! ```text
//! cargo test --release -p keel-tests --test memory_under_load -- --ignored --nocapture
//! ```
//!
//! which builds and uses `<target>/release/keel`; or, with the test built in any profile, name
//! a release binary: `KEEL_BIN=target/release/keel cargo test -p keel-tests --test
//! memory_under_load -- --ignored --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use keel_node::config::{ByteSize, Config};
use keel_tests::{drain, http_request, keel_bin, u64_field, ChildGuard, RpcClient, TestNode};
use keel_types::Address;
use serde_json::Value;

/// `memory.limit` of the node.
const LIMIT_MIB: u64 = 512;
/// Transfers per second loadgen sends: 2,000 unless `KEEL_MEMORY_TEST_TPS` says otherwise
/// (9,000, with `KEEL_MEMORY_TEST_BATCH=50`, is the highest rate one node carries on the
/// 2-core machine of docs/benchmarks.md).
fn tps() -> u64 {
    env_number("KEEL_MEMORY_TEST_TPS").unwrap_or(2000)
}
/// `tx_submit` calls per JSON-RPC batch loadgen sends (`--batch`): 1 unless
/// `KEEL_MEMORY_TEST_BATCH` says otherwise.
fn batch() -> u64 {
    env_number("KEEL_MEMORY_TEST_BATCH").unwrap_or(1)
}
fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}
/// Seconds of loadgen's send phase: the 5 minutes of issue 15's check, unless
/// `KEEL_MEMORY_TEST_SECONDS` says otherwise.
fn send_seconds() -> u64 {
    env_number("KEEL_MEMORY_TEST_SECONDS").unwrap_or(300)
}
/// `state_getAccount` calls per second alongside.
const READS_PER_SECOND: u32 = 300;
/// Time between two samples.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// The least median share of allocated bytes the consumers must explain (issue 15).
const MIN_MEDIAN_SHARE: f64 = 0.90;
/// How far above the limit the peak resident set may go.
const HWM_TOLERANCE: f64 = 1.05;
/// Longest loadgen may run: setup, funding, the send phase and its 30 s drain, with margin.
fn loadgen_deadline() -> Duration {
    Duration::from_secs(send_seconds() + 150)
}

const MIB: f64 = (1u64 << 20) as f64;

/// One look at the node.
#[derive(Debug, Clone)]
struct Sample {
    /// When, since loadgen was started.
    at: Duration,
    /// `VmRSS`, bytes.
    rss: u64,
    /// `VmHWM`, bytes.
    hwm: u64,
    /// `keel_memory_allocated_bytes`.
    allocated: f64,
    /// `keel_memory_used_bytes{consumer}` by consumer.
    used: BTreeMap<String, f64>,
    /// `keel_mempool_txs`.
    mempool_txs: f64,
    /// `keel_finalized_height`.
    finalized: f64,
    /// `keel_memory_pressure`.
    pressure: f64,
}

impl Sample {
    /// sum(used) / allocated.
    fn share(&self) -> f64 {
        self.used.values().sum::<f64>() / self.allocated
    }
}

/// `(VmRSS, VmHWM)` of process `pid`, in bytes.
fn proc_memory(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e} (node gone?)"));
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {path}:\n{status}"));
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {line:?} of {path}"));
        kib * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The samples of a Prometheus text exposition: `(name, labels text inside {}, value)`.
fn parse_exposition(text: &str) -> Vec<(&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.trim(), labels, value))
        })
        .collect()
}

/// The value of `label` in a labels text (`a="x",b="y"`).
fn label<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{label}=\""))? + label.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// Reads `/metrics` and `/proc/PID/status`.
fn sample(metrics: SocketAddr, pid: u32, at: Duration) -> Sample {
    let (rss, hwm) = proc_memory(pid);
    let response = http_request(metrics, "GET", "/metrics", b"", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET /metrics at {at:?}: {e:#}"));
    assert_eq!(response.status, 200, "GET /metrics at {at:?}: {response:?}");
    let text = String::from_utf8_lossy(&response.body);
    let mut s = Sample {
        at,
        rss,
        hwm,
        allocated: 0.0,
        used: BTreeMap::new(),
        mempool_txs: 0.0,
        finalized: 0.0,
        pressure: 0.0,
    };
    for (name, labels, value) in parse_exposition(&text) {
        match name {
            "keel_memory_allocated_bytes" => s.allocated = value,
            "keel_memory_used_bytes" => {
                let consumer = label(labels, "consumer").unwrap_or_else(|| {
                    panic!("keel_memory_used_bytes without a consumer label: {{{labels}}}")
                });
                s.used.insert(consumer.to_string(), value);
            }
            "keel_mempool_txs" => s.mempool_txs = value,
            "keel_finalized_height" => s.finalized = value,
            "keel_memory_pressure" => s.pressure = value,
            _ => {}
        }
    }
    assert!(
        s.allocated > 0.0 && !s.used.is_empty(),
        "/metrics at {at:?} has no keel_memory_allocated_bytes or no keel_memory_used_bytes:\n{text}"
    );
    s
}

/// Sets its flag when dropped, so the reader thread stops also when the test panics.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the read load did.
#[derive(Debug, Default)]
struct Reads {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Calls `state_getAccount(address)` about `per_second` times a second until `stop`.
fn read_load(
    rpc: RpcClient,
    address: Address,
    per_second: u32,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Reads> {
    thread::spawn(move || {
        let interval = Duration::from_secs(1) / per_second;
        let mut reads = Reads::default();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match rpc.account(&address) {
                Ok(_) => reads.ok += 1,
                Err(e) => {
                    reads.failed += 1;
                    reads.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            next += interval;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            } else if now - next > Duration::from_secs(1) {
                // Far behind (a slow answer): carry on at the rate, without a burst.
                next = now;
            }
        }
        reads
    })
}

/// The `q` quantile of sorted `values` as `scripts/memory_summary.py` takes it
/// (`values[len * q]`).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i]
}

/// The median of sorted `values` (the mean of the two middle ones for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

#[test]
#[ignore = "5 minutes of load at 2,000 transfers/s; run on a quiet machine with a release keel"]
fn consumers_explain_most_of_allocated_memory_under_load() {
    // A fresh node: TestNode's ports, but `memory.limit` with every memory setting derived
    // from it (TestNode shrinks RocksDB for machines running many nodes: undone here), and
    // 1 s blocks as in scripts/memory_under_load.sh.
    let mut node = TestNode::init().unwrap();
    let path = node.config_path();
    let mut config = Config::load(&path).unwrap();
    let defaults = Config::default();
    config.memory.limit = ByteSize::mib(LIMIT_MIB);
    config.storage.rocksdb = defaults.storage.rocksdb.clone();
    config.consensus.block_time_ms = 1000;
    config.consensus.timeout_ms = defaults.consensus.timeout_ms;
    config.validate().unwrap();
    fs::write(&path, config.to_toml_string()).unwrap();
    node.start().unwrap();
    // Ports may have been re-picked at start.
    let metrics = Config::load(&path).unwrap().metrics.listen_addr;
    let pid = node.pid().expect("the node has a process id");
    let address = node.validator_key().unwrap().address();
    node.rpc()
        .wait_for_height(2, Duration::from_secs(30))
        .unwrap();

    // The read load, from now until loadgen has finished.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reads = StopOnDrop(Arc::clone(&stop));
    let reader = read_load(node.rpc(), address, READS_PER_SECOND, Arc::clone(&stop));

    let key = node.validator_key_path();
    let mut command = Command::new(keel_bin());
    command
        .args(["loadgen", "--rpc", &node.rpc_url(), "--key"])
        .arg(&key)
        .args([
            "--tps",
            &tps().to_string(),
            "--batch",
            &batch().to_string(),
            "--duration",
            &send_seconds().to_string(),
            "--json",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("spawning keel loadgen");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut loadgen = ChildGuard::new(child);

    // Sample every 2 s while loadgen runs.
    let mut samples = Vec::new();
    let status = loop {
        samples.push(sample(metrics, pid, started.elapsed()));
        let next = SAMPLE_EVERY * u32::try_from(samples.len()).unwrap();
        let wait = next.saturating_sub(started.elapsed());
        if let Some(status) = loadgen.wait_timeout(wait).unwrap() {
            break status;
        }
        if started.elapsed() > loadgen_deadline() {
            panic!("keel loadgen still running after {:?}", loadgen_deadline());
        }
        node.assert_running().unwrap();
    };
    let loadgen_ran = started.elapsed();
    drop(stop_reads);
    let reads = reader.join().expect("the read-load thread panicked");
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    node.assert_running().unwrap();
    let (_, final_hwm) = proc_memory(pid);

    assert!(
        status.success(),
        "keel loadgen failed ({status}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("loadgen's stdout is not one JSON object ({e}):\n{stdout}\n--- stderr ---\n{stderr}")
    });
    let field = |name: &str| u64_field(&report, name).unwrap();
    let seconds = |name: &str| {
        report[name]
            .as_f64()
            .unwrap_or_else(|| panic!("loadgen report has no {name}: {report:#}"))
    };
    let (submitted, rejected, final_count) =
        (field("submitted"), field("rejected"), field("final"));
    eprintln!(
        "loadgen: submitted {submitted}, rejected {rejected}, final {final_count}, \
         achieved {:.0}/s, latency {}, send {:.1} s, drain {:.1} s (ran {loadgen_ran:.1?})",
        seconds("achieved_tps"),
        report["latency_ms"],
        seconds("send_seconds"),
        seconds("drain_seconds"),
    );
    eprintln!(
        "state_getAccount reads: {} ok, {} failed ({:.0}/s){}",
        reads.ok,
        reads.failed,
        (reads.ok + reads.failed) as f64 / loadgen_ran.as_secs_f64(),
        reads
            .first_error
            .as_ref()
            .map_or(String::new(), |e| format!(", first error: {e}"))
    );

    // The samples of the send phase: loadgen's last drain_seconds + send_seconds before it
    // exited were the drain and the send phase; from its first sample with transactions in the
    // mempool (funding done, the load under way).
    let send_end = loadgen_ran.as_secs_f64() - seconds("drain_seconds");
    let send_start = send_end - seconds("send_seconds");
    let in_send: Vec<&Sample> = samples
        .iter()
        .filter(|s| (send_start..=send_end).contains(&s.at.as_secs_f64()))
        .skip_while(|s| s.mempool_txs == 0.0)
        .collect();
    assert!(
        in_send.len() >= 10,
        "only {} samples in the send phase ({send_start:.1} s to {send_end:.1} s after loadgen \
         started) of {} taken: {samples:#?}",
        in_send.len(),
        samples.len()
    );

    let mut shares: Vec<f64> = in_send.iter().map(|s| s.share()).collect();
    shares.sort_by(f64::total_cmp);
    let (med, p10) = (median(&shares), quantile(&shares, 0.10));
    let (min, max) = (shares[0], shares[shares.len() - 1]);
    let peak_hwm = samples
        .iter()
        .map(|s| s.hwm)
        .max()
        .unwrap_or(0)
        .max(final_hwm);
    let peak_rss = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let top = in_send
        .iter()
        .max_by(|a, b| a.allocated.total_cmp(&b.allocated))
        .unwrap();
    let mut at_top: Vec<(&String, &f64)> = top.used.iter().collect();
    at_top.sort_by(|a, b| b.1.total_cmp(a.1));
    let at_top: Vec<String> = at_top
        .iter()
        .map(|(consumer, bytes)| format!("{consumer} {:.1}", *bytes / MIB))
        .collect();
    let highest_pressure = samples.iter().map(|s| s.pressure).fold(0.0, f64::max);
    let figures = format!(
        "samples {} (send phase {send_start:.0}-{send_end:.0} s), consumers explain of allocated: \
         median {:.1}%, p10 {:.1}%, min {:.1}%, max {:.1}%; peak VmHWM {:.1} MiB, peak VmRSS \
         {:.1} MiB, highest pressure {highest_pressure}; at peak allocated ({:.1} s): \
         allocated {:.1} MiB, unexplained {:.1} MiB, consumers (MiB): {}",
        in_send.len(),
        100.0 * med,
        100.0 * p10,
        100.0 * min,
        100.0 * max,
        peak_hwm as f64 / MIB,
        peak_rss as f64 / MIB,
        top.at.as_secs_f64(),
        top.allocated / MIB,
        (top.allocated - top.used.values().sum::<f64>()) / MIB,
        at_top.join(", ")
    );
    eprintln!("{figures}");
    let trail: Vec<String> = in_send
        .iter()
        .map(|s| {
            format!(
                "{:.0}s h{} mempool {} alloc {:.1} MiB {:.1}%",
                s.at.as_secs_f64(),
                s.finalized,
                s.mempool_txs,
                s.allocated / MIB,
                100.0 * s.share()
            )
        })
        .collect();
    eprintln!("send-phase samples: {}", trail.join("; "));

    // Every check is made, and every one that fails is reported together.
    let mut problems = Vec::new();
    // Every accepted transfer became final. `rejected == 0` proved too strict at 2,000/s on
    // a 2-core machine: one `tx_submit` of 120,000 failed in transport (2026-12-07), so up to
    // 0.1% of the submissions may be refused.
    let accepted = submitted.saturating_sub(rejected);
    if submitted == 0 || final_count != accepted || rejected * 1000 > submitted {
        problems.push(format!(
            "not every accepted transfer became final, or more than 0.1% were refused \
             (submitted {submitted}, rejected {rejected}, final {final_count}): {report:#}"
        ));
    }
    if med < MIN_MEDIAN_SHARE {
        problems.push(format!(
            "the consumers explain a median {:.1}% of allocated memory under load, below {:.0}%",
            100.0 * med,
            100.0 * MIN_MEDIAN_SHARE
        ));
    }
    let hwm_cap = (LIMIT_MIB << 20) as f64 * HWM_TOLERANCE;
    if peak_hwm as f64 > hwm_cap {
        problems.push(format!(
            "peak VmHWM {:.1} MiB is above memory.limit {LIMIT_MIB} MiB + 5%",
            peak_hwm as f64 / MIB
        ));
    }

    // Finality went on throughout the send phase: never backwards, higher after every 8 s,
    // and at least one block per 2 s overall (blocks come every 1 s).
    let heights: Vec<f64> = in_send.iter().map(|s| s.finalized).collect();
    if let Some(i) = heights.windows(2).position(|w| w[1] < w[0]) {
        problems.push(format!("the finalized height went back after sample {i}"));
    }
    if let Some(i) = heights.windows(5).position(|w| w[4] <= w[0]) {
        problems.push(format!(
            "the finalized height stalled for 8 s from sample {i}"
        ));
    }
    let span = in_send[in_send.len() - 1].at - in_send[0].at;
    let grown = heights[heights.len() - 1] - heights[0];
    if grown < span.as_secs_f64() / 2.0 {
        problems.push(format!(
            "the finalized height grew by only {grown} in {span:.1?}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) under load:\n  {}\nfigures: {figures}\nsend-phase samples: {}",
        problems.len(),
        problems.join("\n  "),
        trail.join("; ")
    );
}
