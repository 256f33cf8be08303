//! The workloads of `keel bench`.
//!
//! With the `bench` feature, `blocks` is `keel_state::bench`, the block-application workload
//! (`keel bench sigverify|execute|trie|commit|all`), re-exported so the binary needs no
//! dependency on `keel-state`.
//!
//! [`prune_while_committing`] is `keel bench prune`: block commit latency and database size
//! with and without the pruner (see its doc).
//!
//! [`reads_while_committing`] is `keel bench reads`: RPC reads while the node commits big
//! blocks. A one-validator chain over RocksDB in a temporary folder, booted and run exactly
//! as a node is (`boot::open`, the consensus host on its own thread, the wall clock), with no
//! network. `blocks` x `txs` signed transfers are admitted to the mempool first (every sender
//! once per block, so every block is full); then `state_getAccount` is called through the
//! node's RPC module (the same handler the HTTP server runs, without the socket) at a fixed
//! rate, first for 5 s with consensus not yet started (no commit at all), then while the host
//! runs and commits the blocks of `txs` transfers, until the mempool is empty. The two latency
//! distributions, side by side, show whether a read waits on the commit path.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_genesis::Genesis;
use keel_storage::{RocksConfig, RocksStore};
use keel_types::{Address, Keypair, Transaction, TxKind};
use rayon::prelude::*;

use crate::boot::Settings;
use crate::clock::{Clock, SystemClock};
use crate::config::MempoolConfig;
use crate::host::{run_blocking, Command};
use crate::mempool::MempoolLimits;
use crate::net::NoNetwork;
use crate::{Error, Result};

#[cfg(feature = "bench")]
pub use keel_state::bench as blocks;

const CHAIN: &str = "keel-bench-reads";

/// What to run.
#[derive(Clone, Debug)]
pub struct ReadBench {
    /// Transfers per block (one per sending account).
    pub txs: usize,
    /// Blocks of transfers to commit while reading.
    pub blocks: usize,
    /// Reads per second, in both phases.
    pub reads_per_sec: u64,
    /// Block time of the chain.
    pub block_time_ms: u64,
    /// Read over the node's real HTTP server on a loopback port (keep-alive connections, as
    /// a client does) instead of calling its RPC handler in process.
    pub http: bool,
    /// Also run `wrk` against the HTTP server for this many seconds in each phase: the
    /// highest throughput, closed loop.
    pub wrk_secs: Option<u64>,
    /// Where the temporary database goes (`None`: the system's temporary folder).
    pub dir: Option<std::path::PathBuf>,
}

/// What `wrk` measured in one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct WrkFigures {
    /// Requests answered per second.
    pub requests_per_sec: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
    /// Connections it kept open.
    pub connections: u32,
    /// Socket errors and non-2xx answers.
    pub errors: u64,
}

/// Latency of the reads of one phase, in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Latency {
    /// Reads timed.
    pub reads: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let at = |q: f64| {
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Latency {
            reads: samples.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadFigures {
    /// Reads while nothing commits.
    pub idle: Latency,
    /// Reads while blocks of transfers commit.
    pub committing: Latency,
    /// Blocks of transfers final during the second phase, and their transfers.
    pub blocks: u64,
    /// Transfers final during the second phase.
    pub txs: u64,
    /// How long the second phase took.
    pub seconds: f64,
    /// `wrk`'s figures with nothing committing, then while committing, if asked for.
    pub wrk: Option<(WrkFigures, WrkFigures)>,
}

/// The validator's key, and `n` senders' keys and addresses (made in parallel).
fn accounts(n: usize) -> (Keypair, Vec<Keypair>, Vec<Address>) {
    let senders: Vec<Keypair> = (0..n as u64)
        .into_par_iter()
        .map(|i| Keypair::from_seed(1_000 + i))
        .collect();
    let addresses = senders.iter().map(Keypair::address).collect();
    (Keypair::from_seed(1), senders, addresses)
}

/// One transfer of 1 unit from each sender to the next one, with `nonce`, signed in parallel.
fn transfers(senders: &[Keypair], addresses: &[Address], nonce: u64, fee: u64) -> Vec<Transaction> {
    senders
        .par_iter()
        .enumerate()
        .map(|(i, key)| {
            let to = addresses[(i + 1) % addresses.len()];
            Transaction::sign(key, CHAIN, nonce, fee, TxKind::Transfer { to, amount: 1 })
        })
        .collect()
}

fn bench_error(what: &str) -> Error {
    Error::Bench(what.to_string())
}

/// Runs the benchmark.
pub fn reads_while_committing(opts: &ReadBench) -> Result<ReadFigures> {
    if opts.txs == 0 || opts.blocks == 0 || opts.reads_per_sec == 0 {
        return Err(bench_error(
            "txs, blocks and reads per second must be at least 1",
        ));
    }
    let dir = match &opts.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| Error::io("temporary folder", e))?;
    let store = Arc::new(RocksStore::open(dir.path(), &RocksConfig::default())?);

    let (validator, senders, addresses) = accounts(opts.txs);
    let mut genesis = Genesis::generate(
        CHAIN,
        SystemClock.now_ms(),
        &[validator.public()],
        &addresses,
    );
    genesis.params.max_block_txs = u32::try_from(opts.txs).unwrap_or(u32::MAX);
    genesis.params.max_block_bytes = u32::MAX;
    genesis.params.epoch_length = 1_000_000;
    let min_fee = genesis.params.min_fee;
    let settings = Settings {
        block_time_ms: opts.block_time_ms,
        timeout_ms: opts.block_time_ms.saturating_mul(20).max(10_000),
        mempool: MempoolLimits {
            max_txs: opts.txs.saturating_mul(opts.blocks).max(1),
            ..MempoolLimits::from(&MempoolConfig::default())
        },
        memory_limit: 0,
    };
    let booted = crate::boot::open(store, &genesis, &validator, "bench".into(), &settings)?;
    let chain = booted.context.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut host = booted.into_host(Arc::new(NoNetwork), clock.clone());

    // Every block's transfers, admitted before consensus starts.
    for nonce in 0..opts.blocks as u64 {
        let txs: Vec<Vec<u8>> = transfers(&senders, &addresses, nonce, min_fee)
            .into_iter()
            .map(|t| t.bytes)
            .collect();
        for chunk in txs.chunks(1024) {
            for verdict in chain.admit_batch_from_peer(chunk) {
                verdict.map_err(|e| bench_error(&format!("admission: {e}")))?;
            }
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("bench runtime", e))?;
    let module = crate::rpc::module(chain.clone());
    // The real server, when asked for: the node's own `rpc::start` on a loopback port.
    let server = if opts.http || opts.wrk_secs.is_some() {
        let config = crate::config::RpcConfig {
            listen_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ..crate::config::RpcConfig::default()
        };
        let (handle, addr) = runtime.block_on(crate::rpc::start(
            chain.clone(),
            &config,
            crate::rpc::checks::RpcMetrics::default(),
            opts.block_time_ms,
            crate::rpc::conn::RpcBuffers::new(crate::memory::DEFAULT_RPC_BUFFER_BYTES),
        ))?;
        Some((handle, addr))
    } else {
        None
    };
    let http_addr = server.as_ref().map(|(_, a)| *a);
    let gap = Duration::from_secs_f64(1.0 / opts.reads_per_sec as f64);
    let mut next_read = 0usize;
    let mut read = |until: &mut dyn FnMut() -> bool| -> Result<Vec<Duration>> {
        if let (true, Some(addr)) = (opts.http, http_addr) {
            return http_reads(addr, opts.reads_per_sec, &addresses, until);
        }
        let mut samples = Vec::new();
        let mut due = Instant::now();
        while !until() {
            let address = addresses[next_read % addresses.len()];
            next_read = next_read.wrapping_add(7919);
            let started = Instant::now();
            let answer: std::result::Result<serde_json::Value, _> =
                runtime.block_on(module.call("state_getAccount", [address.to_string()]));
            samples.push(started.elapsed());
            answer.map_err(|e| bench_error(&format!("state_getAccount: {e}")))?;
            due += gap;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        Ok(samples)
    };

    // Phase 1: nothing commits (consensus not started).
    let idle_until = Instant::now() + Duration::from_secs(5);
    let idle = read(&mut || Instant::now() >= idle_until)?;
    let wrk_idle = match (opts.wrk_secs, http_addr) {
        (Some(secs), Some(addr)) => Some(run_wrk(addr, secs, &addresses)?),
        _ => None,
    };

    // Phase 2: the host commits the blocks of transfers.
    let start_height = chain.tip().finalized.0;
    host.start()?;
    let (commands, receiver) = sync_channel(16);
    let thread = std::thread::Builder::new()
        .name("keel-consensus".into())
        .spawn(move || run_blocking(host, receiver, clock))
        .map_err(|e| Error::io("consensus thread", e))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let done = || chain.mempool().is_empty();
    // wrk first (the blocks must still be committing when it ends), then the paced reads.
    let wrk_committing = match (opts.wrk_secs, http_addr) {
        (Some(secs), Some(addr)) => {
            let figures = run_wrk(addr, secs, &addresses)?;
            if done() {
                return Err(bench_error(&format!(
                    "the blocks were final before wrk's {secs} s ended: give more --blocks"
                )));
            }
            Some(figures)
        }
        _ => None,
    };
    let committing = read(&mut || done() || Instant::now() >= deadline)?;
    let seconds = started.elapsed().as_secs_f64();
    if !done() {
        return Err(bench_error(
            "the transfers did not become final within 10 minutes",
        ));
    }
    let end_height = chain.tip().finalized.0;
    let mut blocks = 0;
    let mut final_txs = 0;
    for h in start_height + 1..=end_height {
        if let Some(b) = chain.blocks.block_at(h)? {
            if !b.txs.is_empty() {
                blocks += 1;
                final_txs += b.txs.len() as u64;
            }
        }
    }
    let _ = commands.send(Command::Shutdown);
    thread
        .join()
        .map_err(|_| bench_error("the consensus thread panicked"))??;
    if let Some((handle, _)) = server {
        let _ = handle.stop();
    }
    Ok(ReadFigures {
        idle: Latency::of(idle),
        committing: Latency::of(committing),
        blocks,
        txs: final_txs,
        seconds,
        wrk: wrk_idle.zip(wrk_committing),
    })
}

/// Client threads reading over HTTP/1.1 keep-alive connections.
const HTTP_READERS: usize = 4;

/// `state_getAccount` over HTTP at `rate` calls/s in all (spread over [`HTTP_READERS`]
/// threads, each on its own keep-alive connection, each on its own schedule) until `until`:
/// the time from sending each request to its whole answer.
fn http_reads(
    addr: std::net::SocketAddr,
    rate: u64,
    addresses: &[Address],
    until: &mut dyn FnMut() -> bool,
) -> Result<Vec<Duration>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let per_thread = Duration::from_secs_f64(HTTP_READERS as f64 / rate as f64);
    let threads: Vec<_> = (0..HTTP_READERS)
        .map(|t| {
            let stop = stop.clone();
            let picks: Vec<Address> = addresses
                .iter()
                .skip(t)
                .step_by(HTTP_READERS)
                .take(4096)
                .copied()
                .collect();
            std::thread::spawn(move || -> std::result::Result<Vec<Duration>, String> {
                let mut conn = HttpConn::open(addr)?;
                let mut samples = Vec::new();
                // Staggered starts, so the threads' requests interleave.
                let mut due = Instant::now() + per_thread.mul_f64(t as f64 / HTTP_READERS as f64);
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let address = picks.get(i % picks.len().max(1)).copied().unwrap_or_default();
                    i = i.wrapping_add(1);
                    let body = format!(
                        r#"{{"jsonrpc":"2.0","id":{i},"method":"state_getAccount","params":["{address}"]}}"#
                    );
                    let started = Instant::now();
                    let answer = conn.post(&body)?;
                    samples.push(started.elapsed());
                    if !answer.contains("\"result\"") {
                        return Err(format!("state_getAccount over HTTP: {answer}"));
                    }
                    due += per_thread;
                }
                Ok(samples)
            })
        })
        .collect();
    while !until() {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in threads {
        let samples = t
            .join()
            .map_err(|_| bench_error("an HTTP reader panicked"))?
            .map_err(|e| bench_error(&e))?;
        all.extend(samples);
    }
    Ok(all)
}

/// One HTTP/1.1 keep-alive connection posting JSON-RPC calls.
struct HttpConn {
    stream: std::io::BufReader<std::net::TcpStream>,
    host: String,
}

impl HttpConn {
    fn open(addr: std::net::SocketAddr) -> std::result::Result<HttpConn, String> {
        let stream =
            std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        Ok(HttpConn {
            stream: std::io::BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// Posts `body`, returns the answer's body.
    fn post(&mut self, body: &str) -> std::result::Result<String, String> {
        use std::io::{BufRead, Read, Write};
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut length: Option<usize> = None;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stream
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().ok();
                }
            }
        }
        let length = length.ok_or("an answer without Content-Length")?;
        let mut answer = vec![0u8; length];
        self.stream
            .read_exact(&mut answer)
            .map_err(|e| format!("read body: {e}"))?;
        String::from_utf8(answer).map_err(|e| e.to_string())
    }
}

/// Connections `wrk` keeps open, and its threads.
const WRK_CONNECTIONS: u32 = 16;

/// Runs `wrk` (closed loop, [`WRK_CONNECTIONS`] connections, 2 threads) posting
/// `state_getAccount` of one funded account for `secs` seconds, and reads its report.
fn run_wrk(addr: std::net::SocketAddr, secs: u64, addresses: &[Address]) -> Result<WrkFigures> {
    let address = addresses.first().copied().unwrap_or_default();
    let script = tempfile::Builder::new()
        .prefix("keel-wrk-")
        .suffix(".lua")
        .tempfile()
        .map_err(|e| Error::io("wrk script", e))?;
    let lua = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.body = '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"state_getAccount\",\"params\":[\"{address}\"]}}'\n"
    );
    std::fs::write(script.path(), lua).map_err(|e| Error::io("wrk script", e))?;
    let out = std::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(script.path())
        .arg(format!("http://{addr}/"))
        .output()
        .map_err(|e| {
            bench_error(&format!(
                "cannot run wrk ({e}): install it (apt-get install wrk) or leave out --wrk-secs"
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(bench_error(&format!("wrk failed: {text}")));
    }
    parse_wrk(&text).ok_or_else(|| bench_error(&format!("cannot read wrk's report: {text}")))
}

/// Requests/s, p50 and p99 (milliseconds) and errors from `wrk --latency`'s report.
fn parse_wrk(text: &str) -> Option<WrkFigures> {
    let ms = |v: &str| -> Option<f64> {
        let v = v.trim();
        let (num, factor) = if let Some(n) = v.strip_suffix("us") {
            (n, 1e-3)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e3)
        } else {
            (v, 1.0)
        };
        num.trim().parse::<f64>().ok().map(|x| x * factor)
    };
    let mut figures = WrkFigures {
        requests_per_sec: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        connections: WRK_CONNECTIONS,
        errors: 0,
    };
    let mut seen = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            figures.requests_per_sec = v.trim().parse().ok()?;
            seen += 1;
        } else if let Some(v) = line.strip_prefix("50%") {
            figures.p50_ms = ms(v)?;
            seen += 1;
        } else if let Some(v) = line.strip_prefix("99%") {
            figures.p99_ms = ms(v)?;
            seen += 1;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            figures.errors += v.trim().parse::<u64>().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            figures.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (seen == 3).then_some(figures)
}

/// What `keel bench prune` runs.
#[derive(Clone, Debug)]
pub struct PruneBench {
    /// Transfers per block.
    pub txs: usize,
    /// Blocks committed per run.
    pub blocks: usize,
    /// The pruning window of the second run.
    pub keep_recent: u64,
    /// Its interval; database sizes are sampled half-way through each.
    pub interval: u64,
    /// One block every this many milliseconds (0: as fast as they build), as a chain's block
    /// time paces a node.
    pub block_time_ms: u64,
    /// Skip the compaction after each pass (to see what it costs).
    pub no_compaction: bool,
    /// How the pruner paces its batches (a node paces them by commits).
    pub pacing: crate::pruner::Pacing,
    /// Run RocksDB's compactions at the lowest CPU priority (a node does not)
    /// ([`RocksConfig::low_priority_compactions`]; process-wide, so compare across processes).
    pub low_priority_compactions: bool,
    /// Archive / pruning pairs run one after the other (the machine's speed drifts: compare
    /// each pruning run with the archive run just before it).
    pub pairs: usize,
    /// Where the temporary databases go (`None`: the system's temporary folder).
    pub dir: Option<std::path::PathBuf>,
}

/// A database size sample of `keel bench prune`: (height, live table bytes, bytes on disk,
/// live table bytes per column family).
pub type SizeSample = (u64, u64, u64, Vec<(&'static str, u64)>);

/// One run of `keel bench prune`.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneRun {
    /// Whether the pruner ran (the window of [`PruneBench`]) or not (archive).
    pub pruning: bool,
    /// Time to commit a final block (`Ledger::finalize`: its write batch and bookkeeping).
    pub commit: Latency,
    /// Time to build (execute, state root) and commit a block.
    pub block: Latency,
    /// Each prune pass: heights pruned and seconds taken.
    pub passes: Vec<(u64, f64)>,
    /// Once the window is full (heights from `keep_recent + interval` on): commits that
    /// started while a prune pass ran, and the others. Archive runs have only the others.
    pub commit_in_pass: Latency,
    /// The commits of that phase that started while no pass ran.
    pub commit_between_passes: Latency,
    /// Commits of that phase during which RocksDB ran a compaction or flush of its own
    /// (`rocksdb.num-running-compactions` / `-flushes` read just before and after), in both
    /// modes: what background work costs a commit.
    pub commit_in_background: Latency,
    /// The commits of that phase with no compaction or flush seen running.
    pub commit_quiet: Latency,
    /// Half-way through every interval, after a flush: (height, live table bytes, bytes on
    /// disk, live table bytes per column family).
    pub sizes: Vec<SizeSample>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Per column family that compacted: seconds RocksDB spent in flushes and compactions
    /// and gigabytes they wrote (its `rocksdb.cfstats` "Sum" row).
    pub compactions: Vec<(&'static str, f64, f64)>,
}

/// `keel bench prune`: two runs over a fresh RocksDB each (4 MiB memtables, so data reaches
/// table files early), a one-validator chain built and committed through the ledger as the
/// consensus host does it (no consensus, no network): `blocks` blocks of `txs` transfers,
/// one every `block_time_ms` (or as fast as they build), first in archive mode, then with the
/// pruner's thread running the window
/// (`keep_recent`, `interval`) exactly as a node runs it (woken after each commit, resting
/// between batches). Reports commit and block latency, each prune pass, and the database
/// size at every interval; `pairs` such pairs, archive first in each.
pub fn prune_while_committing(opts: &PruneBench) -> Result<Vec<PruneRun>> {
    if opts.txs == 0
        || opts.blocks == 0
        || opts.interval == 0
        || opts.keep_recent < opts.interval
        || opts.pairs == 0
    {
        return Err(bench_error(
            "txs, blocks, interval and pairs must be at least 1, keep at least interval",
        ));
    }
    let (validator, senders, addresses) = accounts(opts.txs);
    let mut runs = Vec::with_capacity(opts.pairs.saturating_mul(2));
    for _ in 0..opts.pairs {
        runs.push(prune_run(opts, &validator, &senders, &addresses, false)?);
        runs.push(prune_run(opts, &validator, &senders, &addresses, true)?);
    }
    Ok(runs)
}

fn prune_run(
    opts: &PruneBench,
    validator: &Keypair,
    senders: &[Keypair],
    addresses: &[Address],
    pruning: bool,
) -> Result<PruneRun> {
    use crate::ledger::BlockTemplate;
    use crate::pruner::{PassReport, Pruner, Wake, Window};
    use keel_storage::{Column, KvStore};
    use keel_types::QuorumCertificate;

    let dir = match &opts.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| Error::io("temporary folder", e))?;
    let store = Arc::new(RocksStore::open(
        dir.path(),
        &RocksConfig {
            block_cache_size: 64 << 20,
            write_buffer_size: 4 << 20,
            low_priority_compactions: opts.low_priority_compactions,
            ..RocksConfig::default()
        },
    )?);
    let mut genesis = Genesis::generate(
        CHAIN,
        SystemClock.now_ms(),
        &[validator.public()],
        addresses,
    );
    genesis.params.max_block_txs = u32::try_from(opts.txs).unwrap_or(u32::MAX);
    genesis.params.max_block_bytes = u32::MAX;
    genesis.params.epoch_length = 1_000_000;
    let min_fee = genesis.params.min_fee;
    let settings = Settings {
        block_time_ms: 1_000,
        timeout_ms: 10_000,
        mempool: MempoolLimits::from(&MempoolConfig::default()),
        memory_limit: 0,
    };
    let booted = crate::boot::open(
        store.clone(),
        &genesis,
        validator,
        "bench".into(),
        &settings,
    )?;
    let (chain, mut ledger) = booted.into_ledger();

    let token = tokio_util::sync::CancellationToken::new();
    let passes = Arc::new(std::sync::Mutex::new(Vec::new()));
    // When each pass ran, to tell the commits that overlapped one from the others.
    let spans: Arc<std::sync::Mutex<Vec<(Instant, Instant)>>> =
        Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut commit_starts = Vec::new();
    let (wake, thread) = if pruning {
        let (wake, wake_rx) = Wake::channel();
        let mut pruner = Pruner::new(
            store.clone(),
            genesis.params.epoch_length,
            chain.prune_status().clone(),
        );
        if opts.no_compaction {
            pruner = pruner.without_compaction();
        }
        let window = Window {
            keep_recent: opts.keep_recent,
            interval: opts.interval,
        };
        let (token, passes, pacing) = (token.clone(), passes.clone(), opts.pacing);
        let spans = spans.clone();
        let thread = std::thread::Builder::new()
            .name("keel-pruner".into())
            .spawn(move || {
                crate::pruner::run_observed(
                    pruner,
                    Some(window),
                    wake_rx,
                    token,
                    pacing,
                    &mut |r: &PassReport, took: Duration| {
                        if let Ok(mut p) = passes.lock() {
                            p.push((r.to.saturating_sub(r.from) + 1, took.as_secs_f64()));
                        }
                        if let Ok(mut s) = spans.lock() {
                            let end = Instant::now();
                            s.push((end.checked_sub(took).unwrap_or(end), end));
                        }
                    },
                );
            })
            .map_err(|e| Error::io("pruner thread", e))?;
        (Some(wake), Some(thread))
    } else {
        (None, None)
    };

    let live = |s: &RocksStore| -> u64 {
        Column::ALL
            .iter()
            .map(|c| s.live_sst_bytes(*c).unwrap_or(0))
            .sum()
    };
    let started = Instant::now();
    let (mut commits, mut blocks, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut busy = Vec::new();
    // Database-wide properties: any column answers them.
    let background = |s: &RocksStore| -> bool {
        [
            "rocksdb.num-running-compactions",
            "rocksdb.num-running-flushes",
        ]
        .iter()
        .any(|p| s.property(Column::Meta, p).ok().flatten().unwrap_or(0) > 0)
    };
    let (mut parent_height, mut parent) = chain.tip().finalized;
    for nonce in 0..opts.blocks as u64 {
        let txs = transfers(senders, addresses, nonce, min_fee);
        let height = parent_height + 1;
        let template = BlockTemplate {
            height,
            round: height,
            epoch: 0,
            parent_hash: parent,
            parent_qc: QuorumCertificate {
                block_hash: parent,
                height: parent_height,
                round: parent_height,
                signatures: Vec::new(),
            },
            timestamp_ms: SystemClock.now_ms(),
            proposer: validator.address(),
            validators_hash: chain.validator_set(0)?.hash(),
            failed_proposers: Vec::new(),
        };
        let block_started = Instant::now();
        let block = ledger.build_block(template, txs, Vec::new())?;
        let hash = block.hash();
        let qc = QuorumCertificate {
            block_hash: hash,
            height,
            round: height,
            signatures: Vec::new(),
        };
        let before = background(&store);
        let commit_started = Instant::now();
        ledger.finalize(&hash, &qc)?;
        commits.push(commit_started.elapsed());
        busy.push(before || background(&store));
        commit_starts.push((height, commit_started));
        blocks.push(block_started.elapsed());
        if let Some(w) = &wake {
            w.wake();
        }
        let due = started + Duration::from_millis(opts.block_time_ms.saturating_mul(nonce + 1));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if height % opts.interval == opts.interval / 2 {
            // Half-way through each interval (the pass due at its start has run), flushed
            // first (in both runs alike) so that the memtables' share counts too.
            store.flush()?;
            let columns = Column::ALL
                .iter()
                .map(|c| (c.name(), store.live_sst_bytes(*c).unwrap_or(0)))
                .collect();
            sizes.push((height, live(&store), store.disk_size_bytes()?, columns));
        }
        (parent_height, parent) = (height, hash);
    }
    let seconds = started.elapsed().as_secs_f64();
    token.cancel();
    let mut compactions = Vec::new();
    for col in Column::ALL {
        let text = store
            .property_text(col, "rocksdb.cfstats-no-file-histogram")?
            .unwrap_or_default();
        if let Some((secs, written)) = compaction_sum(&text) {
            compactions.push((col.name(), secs, written));
        }
    }
    drop(wake);
    if let Some(t) = thread {
        t.join()
            .map_err(|_| bench_error("the pruner thread panicked"))?;
    }
    let passes = passes.lock().map(|p| p.clone()).unwrap_or_default();
    let spans = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let (mut in_pass, mut between) = (Vec::new(), Vec::new());
    let (mut in_background, mut quiet) = (Vec::new(), Vec::new());
    let full_from = opts.keep_recent.saturating_add(opts.interval);
    for (((height, started), took), busy) in commit_starts.iter().zip(&commits).zip(&busy) {
        if *height < full_from {
            continue;
        }
        if *busy {
            in_background.push(*took);
        } else {
            quiet.push(*took);
        }
        let end = *started + *took;
        if spans.iter().any(|(s, e)| *started < *e && end > *s) {
            in_pass.push(*took);
        } else {
            between.push(*took);
        }
    }
    Ok(PruneRun {
        commit_in_pass: Latency::of(in_pass),
        commit_between_passes: Latency::of(between),
        commit_in_background: Latency::of(in_background),
        commit_quiet: Latency::of(quiet),
        pruning,
        commit: Latency::of(commits),
        block: Latency::of(blocks),
        passes,
        sizes,
        seconds,
        compactions,
    })
}

/// Seconds and gigabytes written from the "Sum" row of RocksDB's per-column compaction
/// table (columns named in its header line), `None` without one or if nothing ran.
fn compaction_sum(cfstats: &str) -> Option<(f64, f64)> {
    let header: Vec<&str> = cfstats
        .lines()
        .find(|l| l.trim_start().starts_with("Level"))?
        .split_whitespace()
        .collect();
    // The size is printed with its unit ("7.81 MB"): one header column, two words.
    let sum: Vec<&str> = cfstats
        .lines()
        .find(|l| l.trim_start().starts_with("Sum"))?
        .split_whitespace()
        .filter(|w| !matches!(*w, "B" | "KB" | "MB" | "GB" | "TB"))
        .collect();
    let field = |name: &str| -> Option<f64> {
        let i = header.iter().position(|h| *h == name)?;
        sum.get(i)?.parse().ok()
    };
    let (secs, written) = (field("Comp(sec)")?, field("Write(GB)")?);
    (secs > 0.0).then_some((secs, written))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let report = "Running 2s test @ http://127.0.0.1:40000/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    1.01ms  21.20ms   93.00%
  Latency Distribution
     50%    1.39ms
     75%    1.64ms
     90%    2.08ms
     99%  850.00us
  22252 requests in 2.01s, 5.24MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  11082.05
Transfer/sec:      2.61MB
";
        let w = parse_wrk(report).unwrap();
        assert_eq!(w.requests_per_sec, 11082.05);
        assert_eq!(w.p50_ms, 1.39);
        assert_eq!(w.p99_ms, 0.85);
        assert_eq!(w.errors, 7);
        assert!(parse_wrk("wrk: connection refused").is_none());
    }
}
