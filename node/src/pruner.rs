//! The pruner: drops blocks, receipts, index entries and state-tree versions below the
//! retention window, in the background, in bounded batches, so a node's disk stays flat.
//!
//! - **Window**: with `keep_recent = K` and `interval = I` (`[storage.pruning]`), once the final
//!   height `f` reaches `P + I + K` (P: the height pruned up to, 0 at first), everything at or
//!   below `T = floor((f - K) / I) * I` goes, so at least `K` final blocks are always kept and
//!   prune boundaries fall on multiples of `I` (where a later state sync serves snapshots).
//!   `archive` prunes nothing and keeps what an earlier window left.
//! - **Kept below the window**: the headers (and height-index entries) of epoch-ending blocks
//!   and of genesis, the epoch proofs (their certificates) and the validator-set records: the
//!   chain of validator sets a light client or state sync walks.
//! - **Order**: a pass first records its target (`prune_target`) and publishes the new
//!   earliest height, so readers refuse heights below it from then on; then it deletes in
//!   batches of about [`BATCH_KEYS`] keys, each batch also recording how far it got
//!   (`pruned_height`), so a kill at any instant resumes where the last batch ended. The
//!   receipts and stale-node records, whose keys are ordered by height, go last, each in one
//!   range delete over every pruned height written in a memtable of its own
//!   ([`KvStore::drop_range`]), followed by a compaction of just that range: the space comes
//!   back without rewriting the retained blocks' files (range deletes written batch by batch
//!   shared their memtables with the receipts committed meanwhile, so compacting them
//!   rewrote the whole retained window). A pass stopped before that last step does it again
//!   at the next start (or the next pass covers it: its ranges start at the first key).
//! - **Never in the way**: its own OS thread, woken by each commit, writing between commits
//!   ([`CommitPaced`]): each commit records its time, and batches go only in the first third
//!   of the interval that follows a commit ([`COMMIT_SHARE`]), each sized (from the keys per
//!   second the last batches took) to end inside it, so a batch and a commit do not contend
//!   for the write path or the CPU. While no blocks are committed (a stalled chain, `keel db
//!   prune`'s offline pass excepted), it rests twice as long as each batch took
//!   ([`REST_FACTOR`]): at most a third of one core.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_state::StateTree;
use keel_storage::{BlockStore, Column, KvStore, WriteBatch};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::store::ConsensusStore;
use crate::Result;

/// About how many keys one prune batch deletes (at least one height's worth).
pub const BATCH_KEYS: usize = 4_000;

/// The background pruner, when no commits pace it, rests this many times as long as each
/// batch took: it takes at most a third of one core and leaves the write path free two
/// thirds of the time.
pub const REST_FACTOR: u32 = 2;

/// Paced by commits, the pruner writes only in the first `1 / COMMIT_SHARE` of the interval
/// between two commits.
pub const COMMIT_SHARE: u32 = 3;

/// The least keys a paced batch is cut to (one height is never split, whatever this says).
const MIN_PACED_KEYS: usize = 256;

/// How much history is kept: `None` keeps everything (archive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Final blocks always kept.
    pub keep_recent: u64,
    /// Prune once this many more blocks can go.
    pub interval: u64,
}

impl Window {
    /// The window `[storage.pruning]` asks for (`None`: archive).
    pub fn of(config: &crate::config::PruningConfig) -> Option<Window> {
        config.effective().map(|(keep_recent, interval)| Window {
            keep_recent,
            interval,
        })
    }

    /// The height to prune up to (inclusive) once the final height is `finalized` and
    /// everything up to `pruned` is gone; `None` if no whole interval is due yet.
    pub fn target(&self, finalized: u64, pruned: Option<u64>) -> Option<u64> {
        let interval = self.interval.max(1);
        let last_out = finalized.checked_sub(self.keep_recent)?;
        let target = last_out / interval * interval;
        (target > 0 && pruned.is_none_or(|p| target > p)).then_some(target)
    }
}

/// What readers (RPC, block sync, metrics) see of pruning. Cheap to share.
#[derive(Debug)]
pub struct PruneStatus {
    /// The lowest height still served: heights below are pruned or being pruned.
    earliest: AtomicU64,
    /// Every height at or below this one is pruned (0 while nothing is).
    pruned: AtomicU64,
    deleted_keys: Counter,
    duration: Histogram,
}

impl PruneStatus {
    /// The status of a database pruned up to `pruned`, with a pass towards `target` perhaps
    /// under way.
    pub fn new(pruned: Option<u64>, target: Option<u64>) -> PruneStatus {
        let status = PruneStatus::default();
        status.pruned.store(pruned.unwrap_or(0), Ordering::Relaxed);
        let announced = pruned.max(target);
        status.earliest.store(
            announced.map_or(0, |h| h.saturating_add(1)),
            Ordering::Relaxed,
        );
        status
    }

    /// The status stored in `blocks`.
    pub fn load(blocks: &BlockStore) -> Result<PruneStatus> {
        Ok(PruneStatus::new(
            blocks.pruned_height()?,
            blocks.prune_target()?,
        ))
    }

    /// The lowest height whose block, receipts and state are served (0: nothing pruned).
    pub fn earliest(&self) -> u64 {
        self.earliest.load(Ordering::Relaxed)
    }

    /// Every height at or below this one is pruned (0 while nothing is).
    pub fn pruned_height(&self) -> u64 {
        self.pruned.load(Ordering::Relaxed)
    }

    /// Registers `keel_pruned_height`, `keel_prune_duration_seconds` and
    /// `keel_prune_deleted_keys_total`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "keel_prune_duration_seconds",
            "Duration of prune passes (deletes and compaction)",
            self.duration.clone(),
        );
        registry.register(
            "keel_prune_deleted_keys",
            "Keys deleted by the pruner",
            self.deleted_keys.clone(),
        );
        registry.register_collector(Box::new(PrunedHeight(self.clone())));
    }
}

#[derive(Debug)]
struct PrunedHeight(Arc<PruneStatus>);

impl prometheus_client::collector::Collector for PrunedHeight {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        crate::metrics::encode_gauge(
            &mut encoder,
            "keel_pruned_height",
            "Blocks at or below this height are pruned",
            self.0.pruned_height(),
        )
    }
}

impl Default for PruneStatus {
    /// Nothing pruned.
    fn default() -> PruneStatus {
        PruneStatus {
            earliest: AtomicU64::new(0),
            pruned: AtomicU64::new(0),
            deleted_keys: Counter::default(),
            duration: Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0]),
        }
    }
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// The first height it pruned.
    pub from: u64,
    /// The last height it pruned.
    pub to: u64,
    /// Keys deleted (blocks, receipts, index entries, state nodes).
    pub deleted_keys: u64,
    /// Batches written.
    pub batches: u64,
    /// Whether it reached its target (false: stopped on request).
    pub finished: bool,
}

/// Prunes one database. Used by the background thread and by `keel db prune`.
pub struct Pruner {
    blocks: BlockStore,
    tree: StateTree,
    records: ConsensusStore,
    epoch_length: u64,
    status: Arc<PruneStatus>,
    batch_keys: usize,
    /// Compact the pruned ranges after each pass (off only to measure what it costs).
    compact_after: bool,
    /// Whether the last pass may have stopped before its last step (at start, or after a
    /// last step that failed or stopped): [`Pruner::due`] then looks.
    check_sealed: std::sync::atomic::AtomicBool,
}

impl Pruner {
    /// A pruner of `kv`, whose chain has epochs of `epoch_length` blocks.
    pub fn new(kv: Arc<dyn KvStore>, epoch_length: u64, status: Arc<PruneStatus>) -> Pruner {
        Pruner {
            blocks: BlockStore::new(kv.clone()),
            tree: StateTree::new(kv.clone()),
            records: ConsensusStore::new(kv),
            epoch_length: epoch_length.max(1),
            status,
            batch_keys: BATCH_KEYS,
            compact_after: true,
            check_sealed: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Batches of about `keys` keys instead of [`BATCH_KEYS`] (tests).
    pub fn with_batch_keys(mut self, keys: usize) -> Pruner {
        self.batch_keys = keys.max(1);
        self
    }

    /// No compaction after a pass (`keel bench prune --no-compaction`: what it costs).
    pub fn without_compaction(mut self) -> Pruner {
        self.compact_after = false;
        self
    }

    /// The status it updates.
    pub fn status(&self) -> &Arc<PruneStatus> {
        &self.status
    }

    /// The target this pruner should reach now under `window`: an interrupted pass's target
    /// first, then what the window allows.
    pub fn due(&self, window: Option<Window>) -> Result<Option<u64>> {
        let pruned = self.blocks.pruned_height()?;
        if let Some(target) = self.blocks.prune_target()? {
            if pruned.is_none_or(|p| p < target) {
                return Ok(Some(target));
            }
            // A pass that reached its target may have been stopped before its last step.
            if self.check_sealed.swap(false, Ordering::Relaxed) && self.unsealed(target)? {
                return Ok(Some(target));
            }
        }
        let Some(window) = window else {
            return Ok(None);
        };
        let finalized = self.blocks.finalized()?.map_or(0, |(h, _)| h);
        Ok(window.target(finalized, pruned))
    }

    /// Prunes every height up to `target` (inclusive) not yet pruned, in bounded batches as
    /// fast as it can (offline); `progress(done, total)` after each, `stop()` checked between
    /// them. Then compacts the pruned ranges.
    pub fn prune_to(
        &self,
        target: u64,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PassReport> {
        self.prune_paced(target, stop, progress, &mut Unpaced)
    }

    /// [`Pruner::prune_to`], with `pace` sizing each batch and deciding when it goes.
    pub fn prune_paced(
        &self,
        target: u64,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(u64, u64),
        pace: &mut dyn Pace,
    ) -> Result<PassReport> {
        let started = Instant::now();
        let pruned = self.blocks.pruned_height()?;
        let from = pruned.map_or(0, |p| p.saturating_add(1));
        let finalized = self.blocks.finalized()?.map_or(0, |(h, _)| h);
        if target < from || target >= finalized {
            let finished = if pruned == Some(target) && self.unsealed(target)? {
                self.seal(target, stop, pace)?
            } else {
                true
            };
            return Ok(PassReport {
                from,
                to: pruned.unwrap_or(0),
                finished,
                ..PassReport::default()
            });
        }
        // Announce first: from here on readers refuse every height up to `target`.
        let mut batch = WriteBatch::new();
        self.blocks.stage_prune_target(&mut batch, target);
        self.blocks.kv().write(batch)?;
        self.status
            .earliest
            .fetch_max(target.saturating_add(1), Ordering::Relaxed);
        // Non-final blocks left below the target (a branch that lost, kept by a crash).
        let mut batch = WriteBatch::new();
        let leftovers: Vec<_> = self
            .records
            .pending_blocks()?
            .into_iter()
            .filter(|b| b.header.height <= target)
            .map(|b| b.hash())
            .collect();
        let mut deleted = leftovers.len() as u64;
        self.records.stage_delete_pending(&mut batch, leftovers);
        if !batch.is_empty() {
            self.blocks.kv().write(batch)?;
        }

        let total = target - from + 1;
        let mut report = PassReport {
            from,
            to: from.saturating_sub(1),
            ..PassReport::default()
        };
        let mut height = from;
        while height <= target {
            let batch_keys = pace.before_batch(self.batch_keys, stop);
            if stop() {
                report.deleted_keys = deleted;
                return Ok(report);
            }
            let batch_started = Instant::now();
            let first = height;
            let mut batch = WriteBatch::new();
            let mut keys = 0;
            while height <= target && keys < batch_keys {
                let keep_header = height % self.epoch_length == 0;
                keys += self
                    .blocks
                    .stage_prune_height(&mut batch, height, keep_header)?;
                height += 1;
            }
            let last = height - 1;
            // A node made stale by version `v` is needed by versions below `v` only: once
            // `last` is gone (versions from `last + 1` kept), records up to `last + 1` go.
            keys += self
                .tree
                .stage_prune_stale(first, last.saturating_add(1), &mut batch)?;
            self.blocks.stage_pruned_height(&mut batch, last);
            self.blocks.kv().write(batch)?;
            deleted += keys as u64;
            self.status.deleted_keys.inc_by(keys as u64);
            self.status.pruned.store(last, Ordering::Relaxed);
            report.to = last;
            report.batches += 1;
            progress(last - from + 1, total);
            pace.after_batch(keys, batch_started.elapsed());
        }
        report.deleted_keys = deleted;
        if !self.seal(target, stop, pace)? {
            return Ok(report);
        }
        report.finished = true;
        self.status
            .duration
            .observe(started.elapsed().as_secs_f64());
        Ok(report)
    }

    /// The last step of a pass to `target`: drops the receipts and the stale-node records of
    /// every height up to it, one range each ([`KvStore::drop_range`]: whole table files
    /// unread, the rest by a compaction of the range alone), then compacts the height index
    /// (which keeps the epoch-end entries: only a compaction gives its space back). Each step
    /// starts when `pace` lets a batch go (right after a commit for a node). Returns false if
    /// `stop()` cut it short: then [`Pruner::due`] finds it undone after the next start.
    fn seal(&self, target: u64, stop: &dyn Fn() -> bool, pace: &mut dyn Pace) -> Result<bool> {
        let kv = self.blocks.kv();
        // Until it ends, `due` looks again (an error is retried; a stop resumes at the start).
        self.check_sealed.store(true, Ordering::Relaxed);
        let ranges = last_step_ranges(target);
        for (col, (from, to)) in ranges {
            pace.before_compaction(stop);
            if stop() {
                return Ok(false);
            }
            if self.compact_after {
                kv.drop_range(col, &from, &to)?;
            } else {
                let mut batch = WriteBatch::new();
                batch.delete_range(col, from, to);
                kv.write(batch)?;
            }
        }
        if self.compact_after {
            pace.before_compaction(stop);
            if stop() {
                return Ok(false);
            }
            kv.compact_range(
                Column::HeightIndex,
                &[],
                &target.saturating_add(1).to_be_bytes(),
            )?;
            // The transaction index is keyed by hash: a pass's deletions are spread over
            // every one of its files, a few percent of each, which RocksDB's own
            // deletion-triggered compactions leave for long (measured: the column held
            // twice its live entries between them). Compacted whole, it keeps only them.
            pace.before_compaction(stop);
            if stop() {
                return Ok(false);
            }
            kv.compact_range(Column::TxIndex, &[], &[0xff; 33])?;
            // The other hash-keyed columns: their deletions go to table files now, where
            // RocksDB's deletion-triggered compactions see them (left in a memtable until
            // it fills, they kept the deleted bodies' space for a while: the database
            // jumped by 15% now and then).
            for col in [Column::Bodies, Column::Headers] {
                kv.flush_column(col)?;
            }
        }
        self.check_sealed.store(false, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether receipts or stale-node records of heights up to `target` are still stored: a
    /// pass to `target` stopped before [`Pruner::seal`] ended.
    fn unsealed(&self, target: u64) -> Result<bool> {
        let kv = self.blocks.kv();
        let ranges = last_step_ranges(target);
        for (col, (from, to)) in ranges {
            if let Some(item) = kv
                .iter_range(col, &from, Some(&to), keel_storage::Direction::Forward)
                .next()
            {
                item?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// A key range `[from, to)`.
type KeyRange = (Vec<u8>, Vec<u8>);

/// The key ranges the last step of a pass to `target` drops: the receipts of every height up
/// to it, and the stale-node records of every version up to one past it (a record of
/// version `v` goes once `v - 1` is pruned).
fn last_step_ranges(target: u64) -> [(Column, KeyRange); 2] {
    [
        (Column::Receipts, BlockStore::receipts_through(target)),
        (
            Column::StateStale,
            keel_state::stale_records_through(target.saturating_add(1)),
        ),
    ]
}

/// Runs `pruner` until `token` is cancelled: wakes on each commit (`wake`) or every second,
/// and prunes whatever `window` makes due. Errors are logged and retried a minute later:
/// a failed batch changed nothing, so the next attempt starts where the last batch ended.
pub fn run(pruner: Pruner, window: Option<Window>, wake: Wakeups, token: CancellationToken) {
    run_observed(pruner, window, wake, token, Pacing::Commits, &mut |_, _| {});
}

/// How the background pruner paces its batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pacing {
    /// Between commits ([`CommitPaced`]): what a node does.
    #[default]
    Commits,
    /// Resting after each batch only ([`Resting`]): `keel bench prune --pacing rest`, to
    /// compare.
    Resting,
}

/// [`run`], telling `observe` each finished pass and how long it took (benchmarks).
pub fn run_observed(
    pruner: Pruner,
    window: Option<Window>,
    wake: Wakeups,
    token: CancellationToken,
    pacing: Pacing,
    observe: &mut dyn FnMut(&PassReport, Duration),
) {
    let mut retry_at: Option<Instant> = None;
    let mut commit_paced = CommitPaced::new(&wake);
    let mut resting = Resting;
    let pace: &mut dyn Pace = match pacing {
        Pacing::Commits => &mut commit_paced,
        Pacing::Resting => &mut resting,
    };
    loop {
        match wake.rx.recv_timeout(Duration::from_secs(1)) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if token.is_cancelled() {
            return;
        }
        if retry_at.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let due = match pruner.due(window) {
            Ok(due) => due,
            Err(e) => {
                error!(error = %e, "pruner cannot read its progress; retrying in a minute");
                retry_at = Some(Instant::now() + Duration::from_secs(60));
                continue;
            }
        };
        let Some(target) = due else {
            continue;
        };
        let stop = || token.is_cancelled();
        let started = Instant::now();
        match pruner.prune_paced(target, &stop, &mut |_, _| {}, pace) {
            Ok(r) if r.finished => {
                retry_at = None;
                observe(&r, started.elapsed());
                info!(
                    from = r.from,
                    to = r.to,
                    deleted_keys = r.deleted_keys,
                    batches = r.batches,
                    "pruned"
                );
            }
            Ok(_) => return,
            Err(e) => {
                error!(target, error = %e, "pruning failed; retrying in a minute");
                retry_at = Some(Instant::now() + Duration::from_secs(60));
            }
        }
    }
}

/// The sending half of the commit wake-up: never blocks (a wake-up already queued is
/// enough). Each wake-up also records when the commit happened ([`CommitClock`]).
#[derive(Clone, Debug)]
pub struct Wake {
    tx: SyncSender<()>,
    clock: Arc<CommitClock>,
}

/// The receiving half: the wake-ups and the commit times they recorded.
#[derive(Debug)]
pub struct Wakeups {
    rx: Receiver<()>,
    clock: Arc<CommitClock>,
}

impl Wake {
    /// A wake-up channel.
    pub fn channel() -> (Wake, Wakeups) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let clock = Arc::new(CommitClock::new());
        (
            Wake {
                tx,
                clock: clock.clone(),
            },
            Wakeups { rx, clock },
        )
    }

    /// A block was just committed: wakes the pruner.
    pub fn wake(&self) {
        self.clock.record();
        let _ = self.tx.try_send(());
    }
}

/// When the last commit happened and the usual interval between commits (a moving average
/// over about eight), shared lock-free between the committing thread and the pruner.
#[derive(Debug)]
pub struct CommitClock {
    base: Instant,
    /// Nanoseconds from `base` to the last commit, plus one (0: none yet).
    last: AtomicU64,
    /// The average interval, nanoseconds (0: unknown).
    interval: AtomicU64,
}

impl CommitClock {
    fn new() -> CommitClock {
        CommitClock {
            base: Instant::now(),
            last: AtomicU64::new(0),
            interval: AtomicU64::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn record(&self) {
        let now = self.now_ns();
        let last = self.last.swap(now, Ordering::Relaxed);
        if last != 0 {
            let d = now.saturating_sub(last);
            let old = self.interval.load(Ordering::Relaxed);
            let avg = if old == 0 {
                d
            } else {
                old.saturating_mul(7).saturating_add(d) / 8
            };
            self.interval.store(avg, Ordering::Relaxed);
        }
    }

    /// Time since the last commit and the usual interval, once two commits were seen.
    fn rhythm(&self) -> Option<(Duration, Duration)> {
        let last = self.last.load(Ordering::Relaxed);
        let interval = self.interval.load(Ordering::Relaxed);
        if last == 0 || interval == 0 {
            return None;
        }
        Some((
            Duration::from_nanos(self.now_ns().saturating_sub(last)),
            Duration::from_nanos(interval),
        ))
    }
}

/// When a prune batch goes and how many keys it holds.
pub trait Pace {
    /// Before a batch: waits as long as the batch should wait and returns its size in keys
    /// (at most `max_keys`); returns at once once `stop()` holds.
    fn before_batch(&mut self, max_keys: usize, stop: &dyn Fn() -> bool) -> usize;
    /// After a batch of `keys` keys that took `took`.
    fn after_batch(&mut self, keys: usize, took: Duration);
    /// Before a compaction slice, whose length no key count bounds: waits for the moment a
    /// slice disturbs least (right after a commit for [`CommitPaced`]); returns at once once
    /// `stop()` holds.
    fn before_compaction(&mut self, stop: &dyn Fn() -> bool) {
        self.before_batch(usize::MAX, stop);
    }
}

/// As fast as it goes (`keel db prune`, offline: nothing else writes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unpaced;

impl Pace for Unpaced {
    fn before_batch(&mut self, max_keys: usize, _stop: &dyn Fn() -> bool) -> usize {
        max_keys
    }

    fn after_batch(&mut self, _keys: usize, _took: Duration) {}
}

/// Rests [`REST_FACTOR`] times as long as each batch took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Resting;

impl Pace for Resting {
    fn before_batch(&mut self, max_keys: usize, _stop: &dyn Fn() -> bool) -> usize {
        max_keys
    }

    fn after_batch(&mut self, _keys: usize, took: Duration) {
        std::thread::sleep(took.saturating_mul(REST_FACTOR));
    }
}

/// Writes between commits: a batch goes only in the first `1 / COMMIT_SHARE` of the usual
/// interval after a commit, sized from the keys per second of the batches before it to end
/// there; outside that share it waits for the next commit. With no commit rhythm (before
/// two commits, or none for twice the usual interval: a stalled chain) it falls back to
/// [`Resting`].
#[derive(Debug)]
pub struct CommitPaced<'a> {
    wake: &'a Wakeups,
    /// Keys per second of recent batches (0: none measured yet).
    rate: f64,
    /// The last batch went without a rhythm: rest after it.
    resting: bool,
}

impl<'a> CommitPaced<'a> {
    /// Paced by the commits `wake` records.
    pub fn new(wake: &'a Wakeups) -> CommitPaced<'a> {
        CommitPaced {
            wake,
            rate: 0.0,
            resting: false,
        }
    }
}

impl Pace for CommitPaced<'_> {
    fn before_batch(&mut self, max_keys: usize, stop: &dyn Fn() -> bool) -> usize {
        loop {
            self.resting = false;
            let Some((since, interval)) = self.wake.clock.rhythm() else {
                self.resting = true;
                return max_keys;
            };
            if since > interval.saturating_mul(2) {
                self.resting = true;
                return max_keys;
            }
            let share = interval / COMMIT_SHARE;
            if let Some(left) = share.checked_sub(since).filter(|l| !l.is_zero()) {
                if self.rate <= 0.0 {
                    return MIN_PACED_KEYS.min(max_keys);
                }
                let fits = (self.rate * left.as_secs_f64()) as usize;
                return fits.clamp(MIN_PACED_KEYS, max_keys.max(MIN_PACED_KEYS));
            }
            if stop() {
                return max_keys;
            }
            // Past the share: wait for the next commit (in slices, to notice `stop`), or
            // until the chain looks stalled.
            let until_stalled = interval.saturating_mul(2).saturating_sub(since);
            let slice = until_stalled.clamp(Duration::from_millis(1), Duration::from_millis(250));
            match self.wake.rx.recv_timeout(slice) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return max_keys,
            }
        }
    }

    fn before_compaction(&mut self, stop: &dyn Fn() -> bool) {
        loop {
            let Some((since, interval)) = self.wake.clock.rhythm() else {
                return;
            };
            // Within the first tenth of the interval after a commit (or a stalled chain).
            if since <= interval / 10 || since > interval.saturating_mul(2) || stop() {
                return;
            }
            let until_stalled = interval.saturating_mul(2).saturating_sub(since);
            let slice = until_stalled.clamp(Duration::from_millis(1), Duration::from_millis(250));
            match self.wake.rx.recv_timeout(slice) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn after_batch(&mut self, keys: usize, took: Duration) {
        if keys > 0 && !took.is_zero() {
            let rate = keys as f64 / took.as_secs_f64();
            self.rate = if self.rate <= 0.0 {
                rate
            } else {
                0.7 * self.rate + 0.3 * rate
            };
        }
        if self.resting {
            Resting.after_batch(keys, took);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::cell::Cell;

    use keel_state::{verify_proof, State};
    use keel_types::Block;

    use super::*;
    use crate::ledger::tests::{addr, build, new_app, params, qc, transfer, write_genesis};
    use crate::ledger::Ledger;

    const EPOCH_LENGTH: u64 = 4;

    /// A final chain of `n` blocks on genesis, block `h` moving funds from account 1 to 2
    /// (and from 2 to 3 every third block); returns the store and every block, genesis first.
    fn chain(n: u64) -> (Arc<dyn KvStore>, Vec<Block>) {
        let (app, store, g) = new_app();
        chain_in(app, store, g, n)
    }

    fn chain_in(
        mut app: Ledger,
        store: Arc<dyn KvStore>,
        g: keel_types::Hash,
        n: u64,
    ) -> (Arc<dyn KvStore>, Vec<Block>) {
        let mut blocks = vec![app.block(&g).unwrap().unwrap()];
        let (mut n1, mut n2) = (0, 0);
        for round in 1..=n {
            let mut txs = vec![transfer(1, n1, 2, 10)];
            n1 += 1;
            if round % 3 == 0 {
                txs.push(transfer(2, n2, 3, 1));
                n2 += 1;
            }
            let parent = blocks.last().unwrap().clone();
            let b = build(&mut app, &parent, round, txs);
            blocks.push(b);
        }
        let last = blocks.last().unwrap();
        finalize_all(&mut app, last);
        (store, blocks)
    }

    fn finalize_all(app: &mut Ledger, last: &Block) {
        app.finalize(
            &last.hash(),
            &qc(last.hash(), last.header.height, last.header.round),
        )
        .unwrap();
    }

    fn pruner(store: &Arc<dyn KvStore>) -> Pruner {
        let status = Arc::new(PruneStatus::load(&BlockStore::new(store.clone())).unwrap());
        Pruner::new(store.clone(), EPOCH_LENGTH, status)
    }

    fn keys(store: &Arc<dyn KvStore>, col: Column) -> usize {
        store.iter_prefix(col, &[]).count()
    }

    /// Everything at or below `pruned` is gone but epoch-end headers; everything above reads
    /// in full, and every retained version's state proves its accounts against its header.
    /// `sealed`: the pass ended (its last step dropped the pruned heights' receipts).
    fn check_window(store: &Arc<dyn KvStore>, blocks: &[Block], pruned: u64, sealed: bool) {
        let bs = BlockStore::new(store.clone());
        let state = State::new(store.clone(), params());
        for b in blocks {
            let h = b.header.height;
            if h <= pruned {
                let kept_header = h % EPOCH_LENGTH == 0;
                assert_eq!(
                    bs.header_by_hash(&b.hash()).unwrap().is_some(),
                    kept_header,
                    "{h}"
                );
                assert_eq!(bs.hash_at(h).unwrap().is_some(), kept_header, "{h}");
                assert!(store
                    .get(Column::Bodies, b.hash().as_bytes())
                    .unwrap()
                    .is_none());
                if sealed {
                    assert!(bs.receipts_at(h).unwrap().is_empty(), "{h}");
                }
                for tx in b.tx_hashes() {
                    assert_eq!(bs.tx_location(&tx).unwrap(), None, "{h}");
                }
                assert!(
                    state.account(&addr(1), h).is_err(),
                    "state of {h} still reads"
                );
            } else {
                assert_eq!(bs.block_at(h).unwrap().as_ref(), Some(b), "{h}");
                assert_eq!(bs.receipts_at(h).unwrap().len(), b.txs.len(), "{h}");
                for (i, tx) in (0u32..).zip(b.tx_hashes()) {
                    let (_, receipt) = bs.transaction(&tx).unwrap().unwrap();
                    assert_eq!((receipt.height, receipt.index), (h, i));
                }
                for seed in 1..=3 {
                    let (account, proof, root) = state.account_with_proof(&addr(seed), h).unwrap();
                    assert_eq!(root, b.header.state_root, "{h}");
                    let value = account.map(|a| a.encode());
                    verify_proof(
                        &root,
                        &keel_state::account_key(&addr(seed)),
                        value.as_deref(),
                        &proof,
                    )
                    .unwrap();
                }
            }
        }
    }

    #[test]
    fn the_window_prunes_whole_intervals_and_keeps_the_most_recent_blocks() {
        let w = Window {
            keep_recent: 10,
            interval: 5,
        };
        assert_eq!(w.target(14, None), None);
        assert_eq!(w.target(15, None), Some(5));
        assert_eq!(w.target(19, Some(5)), None);
        assert_eq!(w.target(20, Some(5)), Some(10));
        // A backlog (archive before, or a long stop) goes in one pass.
        assert_eq!(w.target(1_000, Some(5)), Some(990));
        // A window made larger keeps what is left and prunes nothing until it is due.
        let wider = Window {
            keep_recent: 100,
            interval: 5,
        };
        assert_eq!(wider.target(50, Some(10)), None);
    }

    #[test]
    fn a_pass_drops_everything_below_the_window_and_nothing_in_it() {
        let (store, blocks) = chain(30);
        let nodes_before = keys(&store, Column::StateNodes);
        let p = pruner(&store);
        let window = Some(Window {
            keep_recent: 10,
            interval: 5,
        });
        assert_eq!(p.due(window).unwrap(), Some(20));
        let report = p.prune_to(20, &|| false, &mut |_, _| {}).unwrap();
        assert!(report.finished);
        assert_eq!((report.from, report.to), (0, 20));
        assert!(report.deleted_keys > 0);
        assert_eq!(p.status().pruned_height(), 20);
        assert_eq!(p.status().earliest(), 21);
        assert_eq!(p.due(window).unwrap(), None);
        check_window(&store, &blocks, 20, true);
        assert!(keys(&store, Column::StateNodes) < nodes_before);
        // What a restart reads back.
        let status = PruneStatus::load(&BlockStore::new(store.clone())).unwrap();
        assert_eq!((status.pruned_height(), status.earliest()), (20, 21));
    }

    #[test]
    fn an_interrupted_pass_resumes_where_its_last_batch_ended() {
        let (store, blocks) = chain(30);
        let p = pruner(&store).with_batch_keys(1);
        let batches = Cell::new(0);
        let report = p
            .prune_to(20, &|| batches.get() >= 3, &mut |_, _| {
                batches.set(batches.get() + 1)
            })
            .unwrap();
        assert!(!report.finished);
        // Readers already refuse the whole target; the work is half done.
        assert_eq!(p.status().earliest(), 21);
        let done = p.status().pruned_height();
        assert!(done < 20, "{done}");
        check_window(&store, &blocks[..=done as usize], done, false);
        // After a restart, in archive mode even, the pass is finished first.
        let p = pruner(&store);
        assert_eq!(p.status().earliest(), 21);
        assert_eq!(p.due(None).unwrap(), Some(20));
        let report = p.prune_to(20, &|| false, &mut |_, _| {}).unwrap();
        assert!(report.finished);
        assert_eq!(report.from, done + 1);
        check_window(&store, &blocks, 20, true);
        assert_eq!(p.due(None).unwrap(), None);
    }

    #[test]
    fn a_pass_stopped_in_its_last_step_ends_it_after_a_restart() {
        let (store, blocks) = chain(30);
        let bs = BlockStore::new(store.clone());
        let p = pruner(&store).with_batch_keys(1);
        // Stop once every height is done: in the last step, before the receipts go.
        let report = p
            .prune_to(20, &|| p.status().pruned_height() == 20, &mut |_, _| {})
            .unwrap();
        assert!(!report.finished);
        assert_eq!(p.status().pruned_height(), 20);
        assert!(!bs.receipts_at(5).unwrap().is_empty());
        check_window(&store, &blocks, 20, false);
        // A restart, in archive mode even: the pass is due again and only its last step runs.
        let p = pruner(&store);
        assert_eq!(p.due(None).unwrap(), Some(20));
        let report = p.prune_to(20, &|| false, &mut |_, _| {}).unwrap();
        assert!(report.finished);
        assert_eq!(report.batches, 0);
        check_window(&store, &blocks, 20, true);
        let (from, to) = keel_state::stale_records_through(21);
        assert_eq!(
            store
                .iter_range(
                    Column::StateStale,
                    &from,
                    Some(&to),
                    keel_storage::Direction::Forward
                )
                .count(),
            0
        );
        assert_eq!(p.due(None).unwrap(), None);
        // A finished pass is not looked at again.
        assert_eq!(pruner(&store).due(None).unwrap(), None);
    }

    #[test]
    fn a_transaction_index_entry_of_a_later_inclusion_is_kept() {
        let (store, blocks) = chain(30);
        let bs = BlockStore::new(store.clone());
        // Point a pruned block's transaction at a retained height, as a re-inclusion does.
        let moved = blocks[3].tx_hashes()[0];
        let mut batch = WriteBatch::new();
        let mut loc = 25u64.to_be_bytes().to_vec();
        loc.extend_from_slice(&0u32.to_be_bytes());
        batch.put(Column::TxIndex, moved.0.to_vec(), loc);
        store.write(batch).unwrap();
        pruner(&store)
            .prune_to(20, &|| false, &mut |_, _| {})
            .unwrap();
        assert_eq!(bs.tx_location(&moved).unwrap().map(|l| l.height), Some(25));
    }

    // ---- A real kill: a child process (this test binary, re-run on `prune_child` with an
    // environment variable) prunes a RocksDB database one height per batch; the parent kills
    // it with SIGKILL mid-pass, then checks the database and finishes the pass.

    const CHILD_ENV: &str = "KEEL_PRUNER_TEST_CHILD";

    fn rocks(path: &std::path::Path) -> Arc<dyn KvStore> {
        let config = keel_storage::RocksConfig {
            block_cache_size: 8 << 20,
            write_buffer_size: 1 << 20,
            ..keel_storage::RocksConfig::default()
        };
        Arc::new(keel_storage::RocksStore::open(path, &config).unwrap())
    }

    /// Not a test on its own: returns at once unless started by the test below.
    #[test]
    fn prune_child() {
        use std::io::Write;
        let Ok(path) = std::env::var(CHILD_ENV) else {
            return;
        };
        let store = rocks(std::path::Path::new(&path));
        let p = pruner(&store).with_batch_keys(1);
        let mut out = std::io::stdout();
        p.prune_to(20, &|| false, &mut |done, _| {
            writeln!(out, "\npruned batch {done}").unwrap();
            out.flush().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        })
        .unwrap();
        writeln!(out, "\npruned all").unwrap();
    }

    #[test]
    fn a_kill_9_mid_pass_loses_nothing_and_the_pass_finishes_after() {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};

        let dir = tempfile::tempdir().unwrap();
        let blocks = {
            let store = rocks(dir.path());
            let g = write_genesis(
                &store,
                params(),
                &[
                    (addr(1), crate::ledger::tests::funded(1_000_000)),
                    (addr(2), crate::ledger::tests::funded(1_000_000)),
                    (addr(3), crate::ledger::tests::funded(1_000_000)),
                ],
            );
            let app =
                Ledger::new(store.clone(), params(), crate::ledger::BlockLimits::NONE).unwrap();
            chain_in(app, store, g, 30).1
        };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "pruner::tests::prune_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        for line in lines.map_while(|l| l.ok()) {
            if line.starts_with("pruned batch") {
                seen += 1;
                if seen == 4 {
                    break;
                }
            }
            assert_ne!(line, "pruned all", "the pass ended before the kill");
        }
        assert_eq!(seen, 4, "the child printed no progress");
        child.kill().unwrap();
        child.wait().unwrap();

        let store = rocks(dir.path());
        let p = pruner(&store);
        let done = p.status().pruned_height();
        assert!((3..20).contains(&done), "{done}");
        assert_eq!(p.status().earliest(), 21);
        // Everything above the last finished batch is whole, the window most of all.
        check_window(&store, &blocks, done, false);
        assert_eq!(p.due(None).unwrap(), Some(20));
        let report = p.prune_to(20, &|| false, &mut |_, _| {}).unwrap();
        assert!(report.finished);
        assert_eq!(report.from, done + 1);
        check_window(&store, &blocks, 20, true);
    }

    /// Two commits `interval` apart: the rhythm the pacer reads.
    fn rhythm(interval: Duration) -> (Wake, Wakeups) {
        let (wake, rx) = Wake::channel();
        wake.wake();
        std::thread::sleep(interval);
        wake.wake();
        (wake, rx)
    }

    #[test]
    fn without_commits_the_pacer_rests_after_full_batches() {
        let (_wake, rx) = Wake::channel();
        let mut pace = CommitPaced::new(&rx);
        assert_eq!(pace.before_batch(4_000, &|| false), 4_000);
        let started = Instant::now();
        pace.after_batch(4_000, Duration::from_millis(20));
        assert!(
            started.elapsed() >= Duration::from_millis(40),
            "rests twice the batch"
        );
    }

    #[test]
    fn right_after_a_commit_a_batch_is_sized_to_end_within_the_share() {
        let (_wake, rx) = rhythm(Duration::from_millis(600));
        let mut pace = CommitPaced::new(&rx);
        // First batch: nothing measured yet, the smallest.
        assert_eq!(pace.before_batch(1_000_000, &|| false), MIN_PACED_KEYS);
        // 100,000 keys a second and about 200 ms left of the share: about 20,000 keys.
        pace.after_batch(1_000, Duration::from_millis(10));
        let started = Instant::now();
        let keys = pace.before_batch(1_000_000, &|| false);
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "no wait inside the share"
        );
        assert!((MIN_PACED_KEYS..=22_000).contains(&keys), "{keys}");
        assert!(!pace.resting);
    }

    #[test]
    fn past_the_share_a_batch_waits_for_the_next_commit() {
        let (wake, rx) = rhythm(Duration::from_millis(600));
        std::thread::sleep(Duration::from_millis(250));
        let committed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = {
            let committed = committed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                committed.store(true, Ordering::SeqCst);
                wake.wake();
                wake
            })
        };
        let mut pace = CommitPaced::new(&rx);
        pace.after_batch(1_000, Duration::from_millis(10));
        let keys = pace.before_batch(4_000, &|| false);
        assert!(
            committed.load(Ordering::SeqCst),
            "the batch went before the next commit"
        );
        assert!(!pace.resting);
        assert!(keys >= MIN_PACED_KEYS);
        drop(waker.join().unwrap());
        // A stop request ends the wait at once.
        let (_wake, rx) = rhythm(Duration::from_millis(600));
        std::thread::sleep(Duration::from_millis(250));
        let mut pace = CommitPaced::new(&rx);
        let started = Instant::now();
        pace.before_batch(4_000, &|| true);
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn a_compaction_slice_waits_for_the_moment_right_after_a_commit() {
        // 600 ms rhythm: a slice goes within 60 ms of a commit. 100 ms after one (inside
        // the batch share), a slice still waits for the next commit.
        let (wake, rx) = rhythm(Duration::from_millis(600));
        std::thread::sleep(Duration::from_millis(100));
        let committed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = {
            let committed = committed.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                committed.store(true, Ordering::SeqCst);
                wake.wake();
                wake
            })
        };
        let mut pace = CommitPaced::new(&rx);
        pace.before_compaction(&|| false);
        assert!(
            committed.load(Ordering::SeqCst),
            "the slice went before the next commit"
        );
        // Right after that commit: at once.
        let started = Instant::now();
        pace.before_compaction(&|| false);
        assert!(started.elapsed() < Duration::from_millis(50));
        drop(waker.join().unwrap());
        // Unpaced (offline): never waits.
        let started = Instant::now();
        Unpaced.before_compaction(&|| false);
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn a_stalled_chain_lets_the_pacer_rest_instead() {
        let (_wake, rx) = rhythm(Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(150));
        let mut pace = CommitPaced::new(&rx);
        let started = Instant::now();
        assert_eq!(pace.before_batch(4_000, &|| false), 4_000);
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(pace.resting);
    }
}
