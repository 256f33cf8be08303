//! `keel bench`: machine-level benchmarks of block application.
//!
//! Builds a RocksDB state of `--accounts` accounts in a temporary folder, then applies blocks
//! of `--txs` signed transfers (two mixes: `uniform` recipients, and `hot30` where 30% of the
//! transfers pay one account) with one thread and with every core, timing each stage:
//!
//! - `sigverify`: verifying the block's signatures from scratch (parallel ed25519 batches),
//!   next to the raw rate of `ed25519_dalek::verify_batch` on the same chunks (`raw_tps`);
//! - `execute`: running the transactions (signatures found in the cache, as after mempool
//!   admission), accounts loaded from the tree;
//! - `root`: the batched state-tree update and its root;
//! - `commit`: staging the block, receipts and indexes and writing the one RocksDB batch;
//! - `block`: all of it, end to end (cached verification + execute + root + commit).
//!
//! Figures are medians over `--blocks` blocks per configuration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use keel_state::{
    account_key, verify_transactions, Account, BlockEnv, ExecParams, SigCache, State,
};
use keel_storage::{BlockStore, KvStore, RocksConfig, RocksStore, WriteBatch};
use keel_types::{Address, Block, Hash, Header, Keypair, Transaction, TxKind};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::args::{BenchArgs, BenchStage};

const CHAIN: &str = "keel-bench";
const FEE: u64 = 10;

/// Which stages a run reports.
fn wanted(stage: BenchStage) -> &'static [&'static str] {
    match stage {
        BenchStage::Sigverify => &["sigverify"],
        BenchStage::Execute => &["execute"],
        BenchStage::Trie => &["root"],
        BenchStage::Commit => &["commit"],
        BenchStage::All => &["sigverify", "execute", "root", "commit", "block"],
        BenchStage::Reads => &["reads"],
    }
}

/// One result line.
struct Figure {
    stage: &'static str,
    mix: &'static str,
    threads: usize,
    accounts: u64,
    txs: usize,
    seconds: f64,
    raw_seconds: Option<f64>,
}

impl Figure {
    fn tps(&self) -> f64 {
        self.txs as f64 / self.seconds
    }

    fn print(&self, json: bool) {
        let rss = peak_rss_mib();
        if json {
            let mut v = serde_json::json!({
                "stage": self.stage,
                "mix": self.mix,
                "threads": self.threads,
                "accounts": self.accounts,
                "txs": self.txs,
                "tps": self.tps().round(),
                "median_ms": (self.seconds * 1e6).round() / 1e3,
                "peak_rss_mib": rss,
            });
            if let Some(raw) = self.raw_seconds {
                v["raw_tps"] = serde_json::json!((self.txs as f64 / raw).round());
                v["vs_raw"] = serde_json::json!(((raw / self.seconds) * 1000.0).round() / 1000.0);
            }
            println!("{v}");
        } else {
            let raw = self
                .raw_seconds
                .map(|r| {
                    format!(
                        "  (raw batch {:>9.0}/s, {:.1}%)",
                        self.txs as f64 / r,
                        100.0 * r / self.seconds
                    )
                })
                .unwrap_or_default();
            println!(
                "{:<9} {:<7} threads={:<2} {:>9.0} tx/s  {:>8.2} ms/block{}",
                self.stage,
                self.mix,
                self.threads,
                self.tps(),
                self.seconds * 1e3,
                raw
            );
        }
    }
}

/// Peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(f64::NAN, Duration::as_secs_f64)
}

/// The address of account `i`: keyed senders first, then addresses without keys.
fn address(i: u64, senders: &[Keypair]) -> Address {
    match senders.get(i as usize) {
        Some(k) => k.address(),
        None => {
            let h = Hash::digest(&i.to_le_bytes());
            let mut a = [0u8; 20];
            a.copy_from_slice(&h.0[..20]);
            Address(a)
        }
    }
}

/// The benchmark's chain: its store, state, senders and their next nonces.
struct Bench {
    store: Arc<RocksStore>,
    blocks: BlockStore,
    state: State,
    cache: Arc<SigCache>,
    senders: Vec<Keypair>,
    nonces: Vec<u64>,
    accounts: u64,
    height: u64,
    rng: rand_chacha::ChaCha8Rng,
    _dir: tempfile::TempDir,
}

fn params() -> ExecParams {
    ExecParams {
        chain_id: CHAIN.into(),
        min_fee: FEE,
        unbonding_period: 100,
        slash_fraction_ppm: 0,
    }
}

impl Bench {
    fn new(args: &BenchArgs) -> Result<Bench> {
        let dir = match &args.dir {
            Some(d) => tempfile::Builder::new().prefix("keel-bench").tempdir_in(d),
            None => tempfile::Builder::new().prefix("keel-bench").tempdir(),
        }
        .context("creating the benchmark's temporary folder")?;
        let store = Arc::new(
            RocksStore::open(dir.path(), &RocksConfig::default())
                .context("opening the benchmark database")?,
        );
        let kv: Arc<dyn KvStore> = store.clone();
        let cache = Arc::new(SigCache::default());
        let state = State::new(kv.clone(), params()).with_signature_cache(cache.clone());
        let senders: Vec<Keypair> = (0..args.txs.min(args.accounts as usize) as u64)
            .into_par_iter()
            .map(|i| Keypair::from_seed(i + 1))
            .collect();
        let started = Instant::now();
        let genesis: Vec<(Address, Account)> = (0..args.accounts)
            .into_par_iter()
            .map(|i| {
                (
                    address(i, &senders),
                    Account {
                        balance: 1_000_000_000,
                        ..Account::default()
                    },
                )
            })
            .collect();
        let mut batch = WriteBatch::new();
        state
            .init_genesis(&genesis, &[], &mut batch)
            .context("building the genesis state")?;
        drop(genesis);
        store.write(batch).context("writing the genesis state")?;
        eprintln!(
            "bench: state of {} accounts built in {:.1} s",
            args.accounts,
            started.elapsed().as_secs_f64()
        );
        Ok(Bench {
            blocks: BlockStore::new(kv),
            store,
            state,
            cache,
            nonces: vec![0; senders.len()],
            senders,
            accounts: args.accounts,
            height: 0,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(7),
            _dir: dir,
        })
    }

    /// A block of one transfer from every sender (in order), signed; `hot` = share of
    /// transfers paying the hot account (the last one, never a sender).
    fn block_txs(&mut self, hot: f64) -> Vec<Transaction> {
        let hot_account = address(self.accounts - 1, &self.senders);
        let plan: Vec<(usize, Address, u64)> = (0..self.senders.len())
            .map(|s| {
                let to = if self.rng.gen_bool(hot) {
                    hot_account
                } else {
                    address(self.rng.gen_range(0..self.accounts), &self.senders)
                };
                let nonce = self.nonces[s];
                self.nonces[s] += 1;
                (s, to, nonce)
            })
            .collect();
        let senders = &self.senders;
        plan.into_par_iter()
            .map(|(s, to, nonce)| {
                Transaction::sign(
                    &senders[s],
                    CHAIN,
                    nonce,
                    FEE,
                    TxKind::Transfer { to, amount: 1 },
                )
            })
            .collect()
    }

    /// Applies one block and returns (sigverify, raw sigverify, execute, root, commit, block).
    fn apply(&mut self, txs: &[Transaction]) -> Result<[Duration; 6]> {
        // Signatures from scratch, ours and raw ed25519-dalek batches on the same chunks.
        let t = Instant::now();
        let verdicts = verify_transactions(txs, None);
        let sigverify = t.elapsed();
        anyhow::ensure!(
            verdicts.iter().all(|ok| *ok),
            "a benchmark signature did not verify"
        );
        let chunks = raw_chunks(txs)?;
        let t = Instant::now();
        let raw_ok = raw_verify(&chunks);
        let raw = t.elapsed();
        anyhow::ensure!(raw_ok, "raw batch verification failed");
        // As after mempool admission: every transaction is in the cache.
        self.cache.insert_all(txs.iter().map(|t| &t.hash));

        self.height += 1;
        let env = BlockEnv {
            height: self.height,
            proposer: Address([0xEE; 20]),
            evidence: Vec::new(),
        };
        let start = Instant::now();
        let execution = self.state.execute(&env, txs).context("executing")?;
        let execute = start.elapsed();
        let t = Instant::now();
        let mut batch = WriteBatch::new();
        let (outcome, fresh) = self
            .state
            .stage_fresh(execution, &mut batch)
            .context("staging")?;
        let root = t.elapsed();
        let t = Instant::now();
        let tx_bytes: Vec<Vec<u8>> = txs.iter().map(|t| t.bytes.clone()).collect();
        let block = Block {
            header: Header {
                chain_id: CHAIN.into(),
                height: self.height,
                tx_root: keel_types::merkle_root(&txs.iter().map(|t| t.hash).collect::<Vec<_>>()),
                state_root: outcome.state_root,
                ..Header::default()
            },
            txs: tx_bytes,
            evidence: Vec::new(),
        };
        self.blocks
            .stage_block(&mut batch, &block, &outcome.receipts);
        self.store.write(batch).context("committing")?;
        self.state.tree().cache_committed(fresh);
        let commit = t.elapsed();
        let whole = start.elapsed();
        let failed = outcome.receipts.iter().filter(|r| !r.success).count();
        anyhow::ensure!(failed == 0, "{failed} benchmark transfers failed");
        self.cache.remove_all(txs.iter().map(|t| &t.hash));
        Ok([sigverify, raw, execute, root, commit, whole])
    }
}

/// One chunk's inputs for plain `ed25519_dalek::verify_batch`, parsed before timing (keel's
/// transactions carry their keys parsed already, so parsing is not part of either side).
struct RawChunk {
    msgs: Vec<[u8; 32]>,
    sigs: Vec<ed25519_dalek::Signature>,
    keys: Vec<ed25519_dalek::VerifyingKey>,
}

fn raw_chunks(txs: &[Transaction]) -> Result<Vec<RawChunk>> {
    txs.chunks(keel_state::SIGNATURE_CHUNK)
        .map(|chunk| {
            let keys = chunk
                .iter()
                .map(|t| ed25519_dalek::VerifyingKey::from_bytes(&t.public_key.to_bytes()))
                .collect::<Result<_, _>>()
                .context("parsing a benchmark key")?;
            Ok(RawChunk {
                msgs: chunk.iter().map(|t| t.signing_hash.0).collect(),
                sigs: chunk
                    .iter()
                    .map(|t| ed25519_dalek::Signature::from_bytes(&t.signature.0))
                    .collect(),
                keys,
            })
        })
        .collect()
}

/// The raw rate to compare with: plain `ed25519_dalek::verify_batch` on the same chunks.
fn raw_verify(chunks: &[RawChunk]) -> bool {
    chunks.par_iter().all(|c| {
        let msgs: Vec<&[u8]> = c.msgs.iter().map(|m| m.as_slice()).collect();
        ed25519_dalek::verify_batch(&msgs, &c.sigs, &c.keys).is_ok()
    })
}

/// Only signature verification: no state needed.
fn sigverify_only(args: &BenchArgs, threads: &[usize]) -> Result<()> {
    let keys: Vec<Keypair> = (0..args.txs as u64)
        .into_par_iter()
        .map(|i| Keypair::from_seed(i + 1))
        .collect();
    let txs: Vec<Transaction> = keys
        .par_iter()
        .map(|k| {
            Transaction::sign(
                k,
                CHAIN,
                0,
                FEE,
                TxKind::Transfer {
                    to: Address([1; 20]),
                    amount: 1,
                },
            )
        })
        .collect();
    let chunks = raw_chunks(&txs)?;
    for &n in threads {
        let pool = pool(n)?;
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..args.blocks {
            pool.install(|| {
                let t = Instant::now();
                let ok = verify_transactions(&txs, None).iter().all(|v| *v);
                ours.push(t.elapsed());
                let t = Instant::now();
                let raw_ok = raw_verify(&chunks);
                raw.push(t.elapsed());
                anyhow::ensure!(ok && raw_ok, "a benchmark signature did not verify");
                Ok(())
            })?;
        }
        Figure {
            stage: "sigverify",
            mix: "uniform",
            threads: n,
            accounts: args.accounts,
            txs: txs.len(),
            seconds: median(ours),
            raw_seconds: Some(median(raw)),
        }
        .print(args.json);
    }
    Ok(())
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting a thread pool")
}

/// Runs `keel bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!(args.txs >= 1, "--txs must be at least 1");
    anyhow::ensure!(args.blocks >= 1, "--blocks must be at least 1");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    let stages = wanted(args.stage);
    if stages == ["reads"] {
        return reads(&args);
    }
    if stages == ["sigverify"] {
        return sigverify_only(&args, &threads);
    }
    let mut bench = Bench::new(&args)?;
    for (mix, hot) in [("uniform", 0.0), ("hot30", 0.3)] {
        for &n in &threads {
            let pool = pool(n)?;
            // One untimed block first: warms the caches the way a running node has them.
            let warm = bench.block_txs(hot);
            pool.install(|| bench.apply(&warm))?;
            let mut samples: Vec<[Duration; 6]> = Vec::new();
            for _ in 0..args.blocks {
                let txs = bench.block_txs(hot);
                samples.push(pool.install(|| bench.apply(&txs))?);
            }
            let column = |i: usize| median(samples.iter().map(|s| s[i]).collect());
            let figures = [
                ("sigverify", column(0), Some(column(1))),
                ("execute", column(2), None),
                ("root", column(3), None),
                ("commit", column(4), None),
                ("block", column(5), None),
            ];
            for (stage, seconds, raw_seconds) in figures {
                if !stages.contains(&stage) {
                    continue;
                }
                Figure {
                    stage,
                    mix,
                    threads: n,
                    accounts: args.accounts,
                    txs: bench.senders.len(),
                    seconds,
                    raw_seconds,
                }
                .print(args.json);
            }
        }
    }
    // Keeps `account_key` honest: the hot account really is in the tree.
    let hot = address(bench.accounts - 1, &bench.senders);
    let stored = bench.state.tree().get(bench.height, &account_key(&hot))?;
    anyhow::ensure!(
        stored.is_some(),
        "the hot account is missing from the state"
    );
    Ok(())
}

/// `keel bench reads`: RPC read latency without and with big blocks committing.
fn reads(args: &BenchArgs) -> Result<()> {
    let figures = keel_node::bench::reads_while_committing(&keel_node::bench::ReadBench {
        txs: args.txs,
        blocks: args.blocks,
        reads_per_sec: 2_000,
        block_time_ms: 500,
        dir: args.dir.clone(),
    })?;
    for (phase, l) in [("idle", &figures.idle), ("committing", &figures.committing)] {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "stage": "reads",
                    "phase": phase,
                    "reads": l.reads,
                    "p50_us": l.p50_us.round(),
                    "p99_us": l.p99_us.round(),
                    "max_us": l.max_us.round(),
                    "blocks": figures.blocks,
                    "txs": figures.txs,
                    "seconds": (figures.seconds * 1e3).round() / 1e3,
                })
            );
        } else {
            println!(
                "reads {phase:<10} {:>7} state_getAccount  p50 {:>8.0} us  p99 {:>8.0} us  max {:>8.0} us",
                l.reads, l.p50_us, l.p99_us, l.max_us
            );
        }
    }
    if !args.json {
        println!(
            "reads committing: {} blocks of transfers ({} transfers) final in {:.1} s",
            figures.blocks, figures.txs, figures.seconds
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_small_bench_applies_blocks_and_credits_the_hot_account() {
        let args = BenchArgs {
            stage: BenchStage::All,
            json: true,
            accounts: 500,
            txs: 64,
            blocks: 2,
            dir: None,
        };
        let mut bench = Bench::new(&args).unwrap();
        let hot = address(bench.accounts - 1, &bench.senders);
        let before = bench.state.account(&hot, 0).unwrap().unwrap().balance;
        let mut credited = 0;
        for _ in 0..3 {
            let txs = bench.block_txs(0.3);
            credited += txs
                .iter()
                .filter(|t| matches!(t.kind, TxKind::Transfer { to, .. } if to == hot))
                .count() as u64;
            bench.apply(&txs).unwrap();
        }
        assert!(credited > 0);
        let after = bench.state.account(&hot, 3).unwrap().unwrap().balance;
        assert_eq!(after, before + credited);
        assert_eq!(bench.blocks.latest().unwrap().map(|l| l.0), Some(3));
    }
}
