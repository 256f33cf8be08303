//! The block-application workload behind `keel bench` (feature `bench`).
//!
//! [`BlockBench`] builds a RocksDB state of [`Config::accounts`] accounts in a temporary
//! folder, then applies blocks of [`Config::txs`] signed transfers (one per sending account,
//! amount 1) in two [`Mix`]es, on a rayon pool of a given size, timing each [`Stage`]:
//!
//! - [`Stage::Sigverify`]: verifying the block's signatures from scratch (parallel ed25519
//!   batches), next to plain `ed25519_dalek::verify_batch` on the same chunks (the raw rate);
//! - [`Stage::Execute`]: running the transactions (signatures found in the cache, as after
//!   mempool admission), accounts loaded from the tree;
//! - [`Stage::Root`]: the batched state-tree update and its root;
//! - [`Stage::Commit`]: staging the block, receipts and indexes and writing the one RocksDB
//!   batch;
//! - [`Stage::Block`]: all of it, end to end (cached verification + execute + root + commit).
//!
//! [`sigverify`] measures only signature verification and needs no state. Each result is a
//! [`Figure`]: the median over [`Config::blocks`] blocks of one stage, mix and thread count.
//! Nothing here prints or serializes; the caller formats the figures.
//!
//! Invariants: the workload is seeded (the same configuration signs the same blocks), every
//! transfer must succeed and every signature verify (otherwise the run is an [`Error`]), and
//! the temporary database is removed when the [`BlockBench`] is dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_storage::{BlockStore, KvStore, RocksConfig, RocksStore, WriteBatch};
use keel_types::{merkle_root, Address, Block, Hash, Header, Keypair, Transaction, TxKind};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::{
    account_key, verify_transactions, Account, BlockEnv, ExecParams, SigCache, State,
    SIGNATURE_CHUNK,
};

const CHAIN: &str = "keel-bench";
const FEE: u64 = 10;
/// Seed of the recipients drawn for every block.
const SEED: u64 = 7;

/// Why a benchmark could not run, or what went wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value below its minimum.
    #[error("{field} must be at least {min}")]
    TooSmall {
        /// The [`Config`] field.
        field: &'static str,
        /// Its smallest allowed value.
        min: u64,
    },
    /// The temporary folder could not be made.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The failure (in the message, not a `source`, so it prints once).
        error: std::io::Error,
    },
    /// The store failed.
    #[error("{what}: {error}")]
    Storage {
        /// What was being done.
        what: &'static str,
        /// The failure.
        error: keel_storage::Error,
    },
    /// The state layer failed.
    #[error("{what}: {error}")]
    State {
        /// What was being done.
        what: &'static str,
        /// The failure.
        error: crate::Error,
    },
    /// A rayon pool of the asked size could not start.
    #[error("starting a thread pool: {0}")]
    ThreadPool(rayon::ThreadPoolBuildError),
    /// A key of the workload that ed25519-dalek does not parse.
    #[error("parsing a benchmark key: {0}")]
    BadKey(ed25519_dalek::SignatureError),
    /// A signature of the workload did not verify (keel's verification or the raw batch).
    #[error("a benchmark signature did not verify")]
    BadSignature,
    /// Transfers of the workload that failed (their count).
    #[error("{0} benchmark transfers failed")]
    FailedTransfers(usize),
    /// The account most transfers pay is not in the state tree after the run.
    #[error("the hot account is missing from the state")]
    HotAccountMissing,
}

/// Result type of the benchmarks.
pub type Result<T> = std::result::Result<T, Error>;

fn state_error(what: &'static str) -> impl FnOnce(crate::Error) -> Error {
    move |error| Error::State { what, error }
}

fn storage_error(what: &'static str) -> impl FnOnce(keel_storage::Error) -> Error {
    move |error| Error::Storage { what, error }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Accounts in the state (at least 2: the hot account is never a sender).
    pub accounts: u64,
    /// Transfers per block, one per sending account (capped at `accounts`).
    pub txs: usize,
    /// Timed blocks per mix and thread count; figures are medians over them.
    pub blocks: usize,
    /// Where the temporary database goes (`None`: the system's temporary folder).
    pub dir: Option<PathBuf>,
}

impl Default for Config {
    /// The sizes of the figures in `docs/benchmarks.md`.
    fn default() -> Config {
        Config {
            accounts: 1_000_000,
            txs: 10_000,
            blocks: 5,
            dir: None,
        }
    }
}

impl Config {
    /// Refuses sizes the workload cannot run with.
    pub fn validate(&self) -> Result<()> {
        let checks = [
            ("accounts", self.accounts, 2),
            ("txs", self.txs as u64, 1),
            ("blocks", self.blocks as u64, 1),
        ];
        for (field, value, min) in checks {
            if value < min {
                return Err(Error::TooSmall { field, min });
            }
        }
        Ok(())
    }
}

/// A timed stage of block application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Signature verification from scratch, with the raw ed25519 batch rate beside it.
    Sigverify,
    /// Transaction execution (signatures cached, accounts read from the tree).
    Execute,
    /// The batched state-tree update and its root.
    Root,
    /// Staging the block and writing its one RocksDB batch.
    Commit,
    /// Execute + root + commit, end to end.
    Block,
}

impl Stage {
    /// Every stage, in the order [`BlockFigures::all`] lists them.
    pub const ALL: [Stage; 5] = [
        Stage::Sigverify,
        Stage::Execute,
        Stage::Root,
        Stage::Commit,
        Stage::Block,
    ];

    /// Its name in reports: `sigverify`, `execute`, `root`, `commit`, `block`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Sigverify => "sigverify",
            Stage::Execute => "execute",
            Stage::Root => "root",
            Stage::Commit => "commit",
            Stage::Block => "block",
        }
    }
}

/// Who the transfers of a block pay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mix {
    /// Recipients drawn uniformly among all accounts.
    Uniform,
    /// 30% of the transfers pay one (hot) account, the rest as in `Uniform`.
    Hot30,
}

impl Mix {
    /// Both mixes, in the order the benchmark runs them.
    pub const ALL: [Mix; 2] = [Mix::Uniform, Mix::Hot30];

    /// Its name in reports: `uniform`, `hot30`.
    pub fn name(self) -> &'static str {
        match self {
            Mix::Uniform => "uniform",
            Mix::Hot30 => "hot30",
        }
    }

    /// The share of transfers that pay the hot account.
    pub fn hot_share(self) -> f64 {
        match self {
            Mix::Uniform => 0.0,
            Mix::Hot30 => 0.3,
        }
    }
}

/// One measured figure: the median time of one stage, for one mix and thread count.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// What was timed.
    pub stage: Stage,
    /// The recipients of the transfers.
    pub mix: Mix,
    /// Threads of the rayon pool it ran on.
    pub threads: usize,
    /// Accounts in the state.
    pub accounts: u64,
    /// Transfers per block.
    pub txs: usize,
    /// Median time per block.
    pub median: Duration,
    /// Median time of plain `ed25519_dalek::verify_batch` on the same chunks
    /// ([`Stage::Sigverify`] only).
    pub raw_median: Option<Duration>,
}

impl Figure {
    /// Transfers per second at the median.
    pub fn tps(&self) -> f64 {
        self.txs as f64 / self.median.as_secs_f64()
    }

    /// Transfers per second of the raw batch verification, where measured.
    pub fn raw_tps(&self) -> Option<f64> {
        self.raw_median
            .map(|raw| self.txs as f64 / raw.as_secs_f64())
    }

    /// Our rate over the raw one (1.0: as fast as plain batches), where measured.
    pub fn vs_raw(&self) -> Option<f64> {
        self.raw_median
            .map(|raw| raw.as_secs_f64() / self.median.as_secs_f64())
    }
}

/// The figures of every stage for one mix and thread count.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockFigures {
    /// Signature verification from scratch (with the raw rate).
    pub sigverify: Figure,
    /// Execution with cached signatures.
    pub execute: Figure,
    /// The state-tree update and root.
    pub root: Figure,
    /// Staging and writing the block.
    pub commit: Figure,
    /// The whole block.
    pub block: Figure,
}

impl BlockFigures {
    /// The figures in [`Stage::ALL`] order.
    pub fn all(&self) -> [&Figure; 5] {
        [
            &self.sigverify,
            &self.execute,
            &self.root,
            &self.commit,
            &self.block,
        ]
    }
}

/// The thread counts a report compares: one, and every core when there are several.
pub fn thread_counts() -> Vec<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores > 1 {
        vec![1, cores]
    } else {
        vec![1]
    }
}

/// Peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
pub fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The median of `samples` (the upper one of an even count); zero for none.
fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(Error::ThreadPool)
}

/// The address of account `i`: keyed senders first, then addresses without keys.
fn address(i: u64, senders: &[Keypair]) -> Address {
    match usize::try_from(i).ok().and_then(|i| senders.get(i)) {
        Some(k) => k.address(),
        None => {
            let h = Hash::digest(&i.to_le_bytes());
            let mut a = [0u8; 20];
            a.copy_from_slice(&h.0[..20]);
            Address(a)
        }
    }
}

fn params() -> ExecParams {
    ExecParams {
        chain_id: CHAIN.into(),
        min_fee: FEE,
        unbonding_period: 100,
        slash_fraction_ppm: 0,
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
    txs.chunks(SIGNATURE_CHUNK)
        .map(|chunk| {
            let keys = chunk
                .iter()
                .map(|t| ed25519_dalek::VerifyingKey::from_bytes(&t.public_key.to_bytes()))
                .collect::<std::result::Result<_, _>>()
                .map_err(Error::BadKey)?;
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

/// Signature verification alone, no state: `config.txs` transfers from distinct keys,
/// verified from scratch `config.blocks` times on a pool of each of `threads`. One
/// [`Stage::Sigverify`] figure (mix `uniform`) per thread count, in that order.
pub fn sigverify(config: &Config, threads: &[usize]) -> Result<Vec<Figure>> {
    config.validate()?;
    let keys: Vec<Keypair> = (0..config.txs as u64)
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
    let mut figures = Vec::with_capacity(threads.len());
    for &n in threads {
        let pool = pool(n)?;
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..config.blocks {
            pool.install(|| {
                let t = Instant::now();
                let ok = verify_transactions(&txs, None).iter().all(|v| *v);
                ours.push(t.elapsed());
                let t = Instant::now();
                let raw_ok = raw_verify(&chunks);
                raw.push(t.elapsed());
                if ok && raw_ok {
                    Ok(())
                } else {
                    Err(Error::BadSignature)
                }
            })?;
        }
        figures.push(Figure {
            stage: Stage::Sigverify,
            mix: Mix::Uniform,
            threads: n,
            accounts: config.accounts,
            txs: txs.len(),
            median: median(ours),
            raw_median: Some(median(raw)),
        });
    }
    Ok(figures)
}

/// The timings of one applied block.
#[derive(Clone, Copy, Debug, Default)]
struct BlockTimes {
    sigverify: Duration,
    raw_sigverify: Duration,
    execute: Duration,
    root: Duration,
    commit: Duration,
    block: Duration,
}

/// The benchmark's chain: its store, state, senders and their next nonces.
pub struct BlockBench {
    store: Arc<RocksStore>,
    blocks: BlockStore,
    state: State,
    cache: Arc<SigCache>,
    senders: Vec<Keypair>,
    nonces: Vec<u64>,
    accounts: u64,
    height: u64,
    rng: rand_chacha::ChaCha8Rng,
    build_time: Duration,
    // Last, so the database is closed before its folder is removed.
    _dir: tempfile::TempDir,
}

impl BlockBench {
    /// Builds the genesis state of `config.accounts` accounts (each with a balance of
    /// 1,000,000,000; the first `min(txs, accounts)` have keys and send) in a new temporary
    /// folder. Building takes a while for large states: see [`BlockBench::build_time`].
    pub fn new(config: &Config) -> Result<BlockBench> {
        config.validate()?;
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("keel-bench");
            b
        };
        let dir = match &config.dir {
            Some(d) => builder.tempdir_in(d),
            None => builder.tempdir(),
        }
        .map_err(|error| Error::Io {
            what: "creating the benchmark's temporary folder",
            error,
        })?;
        let store = Arc::new(
            RocksStore::open(dir.path(), &RocksConfig::default())
                .map_err(storage_error("opening the benchmark database"))?,
        );
        let kv: Arc<dyn KvStore> = store.clone();
        let cache = Arc::new(SigCache::default());
        let state = State::new(kv.clone(), params()).with_signature_cache(cache.clone());
        let sender_count = config
            .txs
            .min(usize::try_from(config.accounts).unwrap_or(usize::MAX));
        let senders: Vec<Keypair> = (0..sender_count as u64)
            .into_par_iter()
            .map(|i| Keypair::from_seed(i + 1))
            .collect();
        let started = Instant::now();
        let genesis: Vec<(Address, Account)> = (0..config.accounts)
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
            .map_err(state_error("building the genesis state"))?;
        drop(genesis);
        store
            .write(batch)
            .map_err(storage_error("writing the genesis state"))?;
        Ok(BlockBench {
            blocks: BlockStore::new(kv),
            store,
            state,
            cache,
            nonces: vec![0; senders.len()],
            senders,
            accounts: config.accounts,
            height: 0,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(SEED),
            build_time: started.elapsed(),
            _dir: dir,
        })
    }

    /// How long building and writing the genesis state took.
    pub fn build_time(&self) -> Duration {
        self.build_time
    }

    /// Transfers per block: one per sender, `min(txs, accounts)`.
    pub fn txs_per_block(&self) -> usize {
        self.senders.len()
    }

    /// Blocks applied so far (warm-up blocks included): the state's latest version.
    pub fn height(&self) -> u64 {
        self.height
    }

    /// Applies one untimed warm-up block (it warms the caches the way a running node has
    /// them), then `blocks` timed ones of `mix` on a pool of `threads`, and returns the
    /// median of every stage.
    pub fn measure(&mut self, mix: Mix, threads: usize, blocks: usize) -> Result<BlockFigures> {
        let pool = pool(threads)?;
        let warm = self.block_txs(mix.hot_share());
        pool.install(|| self.apply(&warm))?;
        let mut samples: Vec<BlockTimes> = Vec::with_capacity(blocks);
        for _ in 0..blocks {
            let txs = self.block_txs(mix.hot_share());
            samples.push(pool.install(|| self.apply(&txs))?);
        }
        let column = |pick: fn(&BlockTimes) -> Duration| median(samples.iter().map(pick).collect());
        let figure = |stage: Stage, median: Duration, raw_median: Option<Duration>| Figure {
            stage,
            mix,
            threads,
            accounts: self.accounts,
            txs: self.senders.len(),
            median,
            raw_median,
        };
        Ok(BlockFigures {
            sigverify: figure(
                Stage::Sigverify,
                column(|t| t.sigverify),
                Some(column(|t| t.raw_sigverify)),
            ),
            execute: figure(Stage::Execute, column(|t| t.execute), None),
            root: figure(Stage::Root, column(|t| t.root), None),
            commit: figure(Stage::Commit, column(|t| t.commit), None),
            block: figure(Stage::Block, column(|t| t.block), None),
        })
    }

    /// Checks that the account the `hot30` transfers pay is in the state tree at the latest
    /// version: a guard that the workload really wrote where it meant to.
    pub fn check_hot_account(&self) -> Result<()> {
        let hot = self.hot_account();
        let stored = self
            .state
            .tree()
            .get(self.height, &account_key(&hot))
            .map_err(state_error("reading the hot account"))?;
        stored.map(|_| ()).ok_or(Error::HotAccountMissing)
    }

    /// The account `hot30` transfers pay: the last one, never a sender.
    fn hot_account(&self) -> Address {
        address(self.accounts.saturating_sub(1), &self.senders)
    }

    /// A block of one transfer from every sender (in order), signed; `hot` = share of
    /// transfers paying the hot account.
    fn block_txs(&mut self, hot: f64) -> Vec<Transaction> {
        let hot_account = self.hot_account();
        let (rng, accounts, senders) = (&mut self.rng, self.accounts, &self.senders);
        let plan: Vec<(Address, u64)> = self
            .nonces
            .iter_mut()
            .map(|next| {
                let to = if rng.gen_bool(hot) {
                    hot_account
                } else {
                    address(rng.gen_range(0..accounts), senders)
                };
                let nonce = *next;
                *next += 1;
                (to, nonce)
            })
            .collect();
        senders
            .par_iter()
            .zip(plan)
            .map(|(key, (to, nonce))| {
                Transaction::sign(key, CHAIN, nonce, FEE, TxKind::Transfer { to, amount: 1 })
            })
            .collect()
    }

    /// Applies one block on the current rayon pool and times its stages.
    fn apply(&mut self, txs: &[Transaction]) -> Result<BlockTimes> {
        // Signatures from scratch, ours and raw ed25519-dalek batches on the same chunks.
        let t = Instant::now();
        let verdicts = verify_transactions(txs, None);
        let sigverify = t.elapsed();
        if !verdicts.iter().all(|ok| *ok) {
            return Err(Error::BadSignature);
        }
        let chunks = raw_chunks(txs)?;
        let t = Instant::now();
        let raw_ok = raw_verify(&chunks);
        let raw_sigverify = t.elapsed();
        if !raw_ok {
            return Err(Error::BadSignature);
        }
        // As after mempool admission: every transaction is in the cache.
        self.cache.insert_all(txs.iter().map(|t| &t.hash));

        self.height += 1;
        let env = BlockEnv {
            height: self.height,
            proposer: Address([0xEE; 20]),
            evidence: Vec::new(),
        };
        let start = Instant::now();
        let execution = self
            .state
            .execute(&env, txs)
            .map_err(state_error("executing"))?;
        let execute = start.elapsed();
        let t = Instant::now();
        let mut batch = WriteBatch::new();
        let (outcome, fresh) = self
            .state
            .stage_fresh(execution, &mut batch)
            .map_err(state_error("staging"))?;
        let root = t.elapsed();
        let t = Instant::now();
        let block = Block {
            header: Header {
                chain_id: CHAIN.into(),
                height: self.height,
                tx_root: merkle_root(&txs.iter().map(|t| t.hash).collect::<Vec<_>>()),
                state_root: outcome.state_root,
                ..Header::default()
            },
            txs: txs.iter().map(|t| t.bytes.clone()).collect(),
            evidence: Vec::new(),
        };
        self.blocks
            .stage_block(&mut batch, &block, &outcome.receipts);
        self.store
            .write(batch)
            .map_err(storage_error("committing"))?;
        self.state.tree().cache_committed(fresh);
        let commit = t.elapsed();
        let block = start.elapsed();
        let failed = outcome.receipts.iter().filter(|r| !r.success).count();
        if failed > 0 {
            return Err(Error::FailedTransfers(failed));
        }
        self.cache.remove_all(txs.iter().map(|t| &t.hash));
        Ok(BlockTimes {
            sigverify,
            raw_sigverify,
            execute,
            root,
            commit,
            block,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn small() -> Config {
        Config {
            accounts: 500,
            txs: 64,
            blocks: 2,
            dir: None,
        }
    }

    #[test]
    fn a_small_bench_applies_blocks_and_credits_the_hot_account() {
        let mut bench = BlockBench::new(&small()).unwrap();
        let hot = bench.hot_account();
        let before = bench.state.account(&hot, 0).unwrap().unwrap().balance;
        let mut credited = 0;
        for _ in 0..3 {
            let txs = bench.block_txs(Mix::Hot30.hot_share());
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
        bench.check_hot_account().unwrap();
    }

    #[test]
    fn measure_reports_every_stage_for_the_mix_and_threads_asked() {
        let config = small();
        let mut bench = BlockBench::new(&config).unwrap();
        let figures = bench.measure(Mix::Hot30, 1, config.blocks).unwrap();
        let stages: Vec<Stage> = figures.all().iter().map(|f| f.stage).collect();
        assert_eq!(stages, Stage::ALL);
        for f in figures.all() {
            assert_eq!(
                (f.mix, f.threads, f.accounts, f.txs),
                (Mix::Hot30, 1, 500, 64)
            );
            assert!(f.tps() > 0.0, "{f:?}");
            assert_eq!(f.raw_median.is_some(), f.stage == Stage::Sigverify);
        }
        // One warm-up block and the timed ones.
        assert_eq!(bench.height(), 1 + config.blocks as u64);
        bench.check_hot_account().unwrap();
    }

    #[test]
    fn sigverify_gives_one_figure_per_thread_count() {
        let config = Config {
            txs: 100,
            blocks: 1,
            ..small()
        };
        let figures = sigverify(&config, &[1, 2]).unwrap();
        let threads: Vec<usize> = figures.iter().map(|f| f.threads).collect();
        assert_eq!(threads, [1, 2]);
        for f in &figures {
            assert_eq!(
                (f.stage, f.mix, f.txs),
                (Stage::Sigverify, Mix::Uniform, 100)
            );
            assert!(
                f.raw_tps().unwrap() > 0.0 && f.vs_raw().unwrap() > 0.0,
                "{f:?}"
            );
        }
    }

    #[test]
    fn sizes_below_the_minimum_are_refused_by_name() {
        let bad = Config {
            accounts: 1,
            ..small()
        };
        let err = BlockBench::new(&bad).err().unwrap();
        assert_eq!(err.to_string(), "accounts must be at least 2");
        let bad = Config {
            blocks: 0,
            ..small()
        };
        assert!(matches!(
            sigverify(&bad, &[1]),
            Err(Error::TooSmall {
                field: "blocks",
                ..
            })
        ));
    }

    #[test]
    fn the_median_is_the_middle_sample() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(median(Vec::new()), Duration::ZERO);
    }
}
