//! The allocator's knobs from `[memory]` (GOGC-like: the trade between memory given back to
//! the operating system and the CPU spent doing it), applied to jemalloc at start, and what
//! it reports. jemalloc is the allocator of the `keel` binary (`cli/src/main.rs`); in a
//! process where it is not (unit tests of this crate) the settings still apply to jemalloc's
//! own arenas and read back the same.
//!
//! - `dirty_decay_ms`: how long freed pages stay dirty (reusable at once, counted resident)
//!   before jemalloc purges them; `0` purges at once, `-1` never.
//! - `muzzy_decay_ms`: the same for the second stage (pages already advised lazily free).
//! - `background_threads`: jemalloc's own threads purge on schedule; without them purging
//!   happens inside allocation calls, on the node's threads.

//!
//! # The budget (`[memory] limit`)
//!
//! With a limit `L`, the node splits it into budgets ([`Budgets::of`]): RocksDB (block cache
//! with the memtables charged to it) 30%, the state-tree node cache 10%, the signature
//! cache 3% (at most its default), the mempool 15% (at most its default), the p2p service's
//! low-priority queue (transactions, sync) 5% (at most 64 MiB); the remaining 37% is
//! headroom for what no budget bounds by bytes (block execution, consensus, p2p and
//! RPC buffers, the allocator's own pages). A [`Governor`] reads the process's resident set
//! (or jemalloc's resident bytes, if larger) four times a second and sets the [`Pressure`]: soft from 85% of `L` (the caches shrink to
//! half their budget), hard from 95% (the caches shrink to an eighth, and new transactions
//! are refused, from RPC and gossip alike, while consensus goes on); pressure falls a level
//! only once resident memory is 5 points below the level's threshold, and the caches grow
//! back with it.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, MemoryConfig};

/// jemalloc's `MALLCTL_ARENAS_ALL` is not used: per-arena decay settings are set one arena at
/// a time, up to `arenas.narenas`.
fn arena_key(i: u32, what: &str) -> Vec<u8> {
    format!("arena.{i}.{what}\0").into_bytes()
}

/// The allocator settings in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocatorSettings {
    /// `arenas.dirty_decay_ms`.
    pub dirty_decay_ms: i64,
    /// `arenas.muzzy_decay_ms`.
    pub muzzy_decay_ms: i64,
    /// `background_thread`.
    pub background_threads: bool,
}

#[allow(unsafe_code)]
fn write_ssize(name: &[u8], value: i64) -> Result<(), String> {
    let v = isize::try_from(value).map_err(|_| format!("{value} does not fit"))?;
    // SAFETY: `name` is a NUL-terminated mallctl name whose type is `ssize_t` (`isize` on
    // every platform Rust supports), as jemalloc's manual gives for the decay settings.
    unsafe { tikv_jemalloc_ctl::raw::write(name, v) }.map_err(|e| {
        format!(
            "jemalloc {}: {e}",
            String::from_utf8_lossy(name).trim_end_matches('\0')
        )
    })
}

#[allow(unsafe_code)]
fn read_ssize(name: &[u8]) -> Result<i64, String> {
    // SAFETY: as in `write_ssize`: an `ssize_t` setting, read by value.
    let v: isize = unsafe { tikv_jemalloc_ctl::raw::read(name) }.map_err(|e| {
        format!(
            "jemalloc {}: {e}",
            String::from_utf8_lossy(name).trim_end_matches('\0')
        )
    })?;
    Ok(v as i64)
}

/// Applies `config`'s allocator knobs: the defaults for new arenas, every existing arena, and
/// background threads. Returns what is in force after (read back).
pub fn apply(config: &MemoryConfig) -> Result<AllocatorSettings, String> {
    write_ssize(b"arenas.dirty_decay_ms\0", config.dirty_decay_ms)?;
    write_ssize(b"arenas.muzzy_decay_ms\0", config.muzzy_decay_ms)?;
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().map_err(|e| e.to_string())?;
    for i in 0..arenas {
        // Arenas not initialised yet answer an error; they take the defaults above.
        let _ = write_ssize(&arena_key(i, "dirty_decay_ms"), config.dirty_decay_ms);
        let _ = write_ssize(&arena_key(i, "muzzy_decay_ms"), config.muzzy_decay_ms);
    }
    tikv_jemalloc_ctl::background_thread::write(config.background_threads)
        .map_err(|e| format!("jemalloc background_thread: {e}"))?;
    current()
}

/// The settings in force.
pub fn current() -> Result<AllocatorSettings, String> {
    Ok(AllocatorSettings {
        dirty_decay_ms: read_ssize(b"arenas.dirty_decay_ms\0")?,
        muzzy_decay_ms: read_ssize(b"arenas.muzzy_decay_ms\0")?,
        background_threads: tikv_jemalloc_ctl::background_thread::read()
            .map_err(|e| format!("jemalloc background_thread: {e}"))?,
    })
}

/// Bytes in physically resident pages mapped by the allocator (jemalloc's
/// `stats.resident`: allocated memory plus dirty pages and allocator metadata), 0 if it
/// cannot tell.
pub fn resident_bytes() -> u64 {
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    tikv_jemalloc_ctl::stats::resident::read().map_or(0, |b| b as u64)
}

/// The process's resident set (`VmRSS` of `/proc/self/status`: heap, stacks, mapped code and
/// libraries), what the operating system counts against the process; 0 where there is no
/// `/proc`.
pub fn process_resident_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb.saturating_mul(1024))
}

/// Bytes allocated through jemalloc (its `stats.allocated`), 0 if it cannot tell.
pub fn allocated_bytes() -> u64 {
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as u64)
}

/// Bytes the calling thread has allocated less those it has freed (jemalloc's per-thread
/// `thread.allocated` and `thread.deallocated`, at size classes), from its start; 0 where
/// jemalloc cannot tell. Differences across some work measure what the work left allocated,
/// provided it freed nothing another thread allocated.
pub fn thread_net_allocated() -> i64 {
    let read = || -> Result<i64, tikv_jemalloc_ctl::Error> {
        let allocated = tikv_jemalloc_ctl::thread::allocatedp::read()?.get();
        let freed = tikv_jemalloc_ctl::thread::deallocatedp::read()?.get();
        Ok(allocated.wrapping_sub(freed) as i64)
    };
    read().unwrap_or(0)
}

/// Bytes of freed blocks jemalloc keeps in its per-thread caches for the next allocations
/// of those threads (`stats.arenas.<all>.tcache_bytes`), 0 if it cannot tell. jemalloc
/// counts them as allocated: every thread that allocates (async workers, the executor's
/// pool, RocksDB's threads) holds some, up to a few hundred KiB each.
#[allow(unsafe_code)]
pub fn thread_cached_bytes() -> u64 {
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    // `MALLCTL_ARENAS_ALL` (4096): the statistics of every arena merged.
    // SAFETY: `stats.arenas.<i>.tcache_bytes` is a `size_t` statistic, as jemalloc's manual
    // gives; the name is NUL-terminated.
    unsafe { tikv_jemalloc_ctl::raw::read::<usize>(b"stats.arenas.4096.tcache_bytes\0") }
        .map_or(0, |b| b as u64)
}

/// Estimated bytes of one decoded state-tree node in the node cache (key, node, LRU entry).
pub const NODE_BYTES: u64 = 320;
/// Estimated bytes of one signature-cache entry (hash and LRU entry).
pub const SIG_ENTRY_BYTES: u64 = 72;

/// Shares of `memory.limit`, in percent (RocksDB's and the mempool's are checked by
/// [`Config::validate`], so they live there).
pub use crate::config::{MEMPOOL_SHARE, ROCKSDB_SHARE};
/// See [`ROCKSDB_SHARE`].
pub const STATE_CACHE_SHARE: u64 = 10;
/// See [`ROCKSDB_SHARE`].
pub const SIG_CACHE_SHARE: u64 = 3;
/// See [`ROCKSDB_SHARE`].
pub const P2P_SHARE: u64 = 5;
/// See [`ROCKSDB_SHARE`].
pub const RPC_SHARE: u64 = 3;

/// Bytes of requests and answers the RPC server holds, over all connections, without a
/// limit (and the most its share of one gives it).
pub const DEFAULT_RPC_BUFFER_BYTES: u64 = 64 << 20;

/// Payload bytes the p2p service's low-priority queue holds without a limit.
pub const DEFAULT_P2P_QUEUE_BYTES: u64 = 64 << 20;

/// Resident memory, in percent of the limit, from which pressure is soft.
pub const SOFT_PERCENT: u64 = 85;
/// Resident memory, in percent of the limit, from which pressure is hard.
pub const HARD_PERCENT: u64 = 95;
/// A level is left only this many points below its threshold.
pub const HYSTERESIS_PERCENT: u64 = 5;

/// How often the governor reads the allocator.
pub const GOVERNOR_PERIOD: Duration = Duration::from_millis(250);

/// What each consumer may hold, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// `memory.limit` (0: none).
    pub limit: u64,
    /// RocksDB's block cache, memtables included (`storage.rocksdb.block_cache_size`).
    pub rocksdb: u64,
    /// One RocksDB memtable (`storage.rocksdb.write_buffer_size`).
    pub write_buffer: u64,
    /// The state-tree node cache.
    pub state_cache: u64,
    /// The signature cache.
    pub sig_cache: u64,
    /// Pending transactions (`mempool.max_bytes`).
    pub mempool: u64,
    /// Payloads waiting in the p2p service's low-priority queue (transactions, sync).
    pub p2p: u64,
    /// Requests read and answers not yet written by the RPC server, over all connections.
    pub rpc: u64,
}

fn share(limit: u64, percent: u64) -> u64 {
    u64::try_from(u128::from(limit) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

impl Budgets {
    /// The budgets of `config`: without a limit, the configured sizes and the caches'
    /// defaults; with one, the shares of it for every size left at its default (an explicit
    /// size is kept: [`Config::validate`] refuses one above its share).
    pub fn of(config: &Config) -> Budgets {
        let defaults = Config::default();
        let rocks = &config.storage.rocksdb;
        let limit = config.memory.limit.0;
        let state_default = keel_state::DEFAULT_NODE_CACHE as u64 * NODE_BYTES;
        let sig_default = keel_state::DEFAULT_SIG_CACHE as u64 * SIG_ENTRY_BYTES;
        if limit == 0 {
            return Budgets {
                limit,
                rocksdb: rocks.block_cache_size.0,
                write_buffer: rocks.write_buffer_size.0,
                state_cache: state_default,
                sig_cache: sig_default,
                mempool: config.mempool.max_bytes.0,
                p2p: DEFAULT_P2P_QUEUE_BYTES,
                rpc: DEFAULT_RPC_BUFFER_BYTES,
            };
        }
        let derive = |set: u64, default: u64, percent: u64| {
            if set == default {
                share(limit, percent).min(default)
            } else {
                set
            }
        };
        // (Computed for the memory engine too: `keel db` tools open RocksDB whatever it is.)
        let rocksdb = derive(
            rocks.block_cache_size.0,
            defaults.storage.rocksdb.block_cache_size.0,
            ROCKSDB_SHARE,
        );
        // Four memtables fit in half the cache.
        let write_buffer = if rocks.write_buffer_size == defaults.storage.rocksdb.write_buffer_size
        {
            (rocksdb / 8).clamp(1 << 20, rocks.write_buffer_size.0)
        } else {
            rocks.write_buffer_size.0
        };
        Budgets {
            limit,
            rocksdb,
            write_buffer,
            state_cache: share(limit, STATE_CACHE_SHARE),
            sig_cache: share(limit, SIG_CACHE_SHARE).min(sig_default),
            mempool: derive(
                config.mempool.max_bytes.0,
                defaults.mempool.max_bytes.0,
                MEMPOOL_SHARE,
            ),
            p2p: share(limit, P2P_SHARE).min(DEFAULT_P2P_QUEUE_BYTES),
            rpc: share(limit, RPC_SHARE).min(DEFAULT_RPC_BUFFER_BYTES),
        }
    }

    /// Node-cache entries of the state-cache budget.
    pub fn state_cache_nodes(&self) -> usize {
        usize::try_from(self.state_cache / NODE_BYTES).unwrap_or(usize::MAX)
    }

    /// Signature-cache entries of its budget.
    pub fn sig_cache_entries(&self) -> usize {
        usize::try_from(self.sig_cache / SIG_ENTRY_BYTES).unwrap_or(usize::MAX)
    }
}

/// No pressure.
pub const PRESSURE_NONE: u8 = 0;
/// Soft pressure: caches shrunk to half.
pub const PRESSURE_SOFT: u8 = 1;
/// Hard pressure: caches at an eighth, new transactions refused.
pub const PRESSURE_HARD: u8 = 2;

/// The memory pressure the governor last saw, shared with whoever applies back-pressure.
#[derive(Debug, Default)]
pub struct Pressure {
    level: AtomicU8,
    refused: AtomicU64,
}

impl Pressure {
    /// The level: [`PRESSURE_NONE`], [`PRESSURE_SOFT`] or [`PRESSURE_HARD`].
    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    /// Sets the level.
    pub fn set(&self, level: u8) {
        self.level.store(level, Ordering::Relaxed);
    }

    /// Whether a new transaction must be refused now (hard pressure); counts the refusal.
    pub fn refuse_transaction(&self) -> bool {
        let refuse = self.level() >= PRESSURE_HARD;
        if refuse {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        refuse
    }

    /// Transactions refused for memory pressure so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A memory consumer the governor reports and, if it can, resizes.
pub struct Consumer {
    /// The `consumer` label.
    pub name: &'static str,
    /// Its budget in bytes.
    pub budget: u64,
    /// Bytes it holds now.
    pub used: Box<dyn Fn() -> u64 + Send + Sync>,
    /// Resizes it to at most that many bytes (caches); `None` for consumers bounded
    /// otherwise (the mempool refuses instead).
    pub resize: Option<Box<dyn Fn(u64) + Send + Sync>>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Keeps resident memory under `memory.limit`: see the module's documentation.
#[derive(Debug)]
pub struct Governor {
    limit: u64,
    consumers: Vec<Consumer>,
    pressure: Arc<Pressure>,
    shrinks: AtomicU64,
}

/// The fraction of their budget (in eighths) caches hold at each pressure level.
fn eighths(level: u8) -> u64 {
    match level {
        PRESSURE_NONE => 8,
        PRESSURE_SOFT => 4,
        _ => 1,
    }
}

impl Governor {
    /// A governor of `consumers` under `limit` bytes (0: it only reports), setting
    /// `pressure`. Sizes every resizable consumer to its budget at once.
    pub fn new(limit: u64, consumers: Vec<Consumer>, pressure: Arc<Pressure>) -> Governor {
        let governor = Governor {
            limit,
            consumers,
            pressure,
            shrinks: AtomicU64::new(0),
        };
        governor.resize_all(PRESSURE_NONE);
        governor
    }

    fn resize_all(&self, level: u8) {
        for c in &self.consumers {
            if let Some(resize) = &c.resize {
                resize(c.budget / 8 * eighths(level));
            }
        }
    }

    /// The level `resident` bytes mean, from level `now` (with hysteresis).
    pub fn level_for(&self, resident: u64, now: u8) -> u8 {
        if self.limit == 0 {
            return PRESSURE_NONE;
        }
        let percent = u128::from(resident) * 100 / u128::from(self.limit);
        let at_least = |threshold: u64, level: u8| {
            let threshold = if now >= level {
                threshold.saturating_sub(HYSTERESIS_PERCENT)
            } else {
                threshold
            };
            percent >= u128::from(threshold)
        };
        if at_least(HARD_PERCENT, PRESSURE_HARD) {
            PRESSURE_HARD
        } else if at_least(SOFT_PERCENT, PRESSURE_SOFT) {
            PRESSURE_SOFT
        } else {
            PRESSURE_NONE
        }
    }

    /// One reading: sets the pressure for `resident` bytes and resizes the caches when the
    /// level changes. Returns the level.
    pub fn step(&self, resident: u64) -> u8 {
        let now = self.pressure.level();
        let next = self.level_for(resident, now);
        if next != now {
            if next > now {
                self.shrinks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    resident,
                    limit = self.limit,
                    pressure = next,
                    "memory pressure: shrinking caches{}",
                    if next >= PRESSURE_HARD {
                        ", refusing new transactions"
                    } else {
                        ""
                    }
                );
            } else {
                tracing::info!(
                    resident,
                    limit = self.limit,
                    pressure = next,
                    "memory pressure eased"
                );
            }
            self.pressure.set(next);
            self.resize_all(next);
        }
        if next > PRESSURE_NONE {
            // Under pressure, pages freed (by the shrunk caches, by finished blocks) go back
            // to the system at once rather than after the decay time.
            purge();
        }
        next
    }

    /// The limit (0: none).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The consumers.
    pub fn consumers(&self) -> &[Consumer] {
        &self.consumers
    }

    /// The shared pressure.
    pub fn pressure(&self) -> &Arc<Pressure> {
        &self.pressure
    }

    /// Times a rise of pressure shrank the caches.
    pub fn shrinks(&self) -> u64 {
        self.shrinks.load(Ordering::Relaxed)
    }

    /// Reads the allocator every [`GOVERNOR_PERIOD`] until `token` is cancelled (only with
    /// a limit: without one there is nothing to govern).
    pub fn run(&self, token: &CancellationToken) {
        if self.limit == 0 {
            return;
        }
        while !token.is_cancelled() {
            self.step(process_resident_bytes().max(resident_bytes()));
            std::thread::sleep(GOVERNOR_PERIOD);
        }
    }
}

/// Asks jemalloc to return every arena's unused dirty pages to the system now.
#[allow(unsafe_code)]
fn purge() {
    // `MALLCTL_ARENAS_ALL` (4096) addresses every arena at once.
    let name = b"arena.4096.purge\0";
    // SAFETY: `arena.<i>.purge` is a void mallctl: no old value, no new value, as jemalloc's
    // manual gives; `name` is NUL-terminated.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use std::sync::Mutex;

    /// A cache that records the sizes the governor gives it.
    fn recorder(name: &'static str, budget: u64) -> (Consumer, Arc<Mutex<Vec<u64>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let consumer = Consumer {
            name,
            budget,
            used: Box::new(|| 0),
            resize: Some(Box::new(move |b| seen.lock().unwrap().push(b))),
        };
        (consumer, sizes)
    }

    #[test]
    fn pressure_rises_and_falls_with_hysteresis_and_resizes_the_caches() {
        let (cache, sizes) = recorder("state_cache", 800);
        let pressure = Arc::new(Pressure::default());
        let g = Governor::new(1_000, vec![cache], pressure.clone());
        // Sized to its budget at once.
        assert_eq!(*sizes.lock().unwrap(), [800]);
        let mib = |percent: u64| percent * 10;
        assert_eq!(g.step(mib(84)), PRESSURE_NONE);
        assert_eq!(g.step(mib(85)), PRESSURE_SOFT);
        assert_eq!(g.step(mib(81)), PRESSURE_SOFT, "hysteresis");
        assert_eq!(g.step(mib(95)), PRESSURE_HARD);
        assert!(pressure.refuse_transaction());
        assert_eq!(g.step(mib(91)), PRESSURE_HARD, "hysteresis");
        assert_eq!(g.step(mib(89)), PRESSURE_SOFT);
        assert!(!pressure.refuse_transaction());
        assert_eq!(g.step(mib(79)), PRESSURE_NONE);
        // Halved, an eighth, halved, whole again; two rises.
        assert_eq!(*sizes.lock().unwrap(), [800, 400, 100, 400, 800]);
        assert_eq!(g.shrinks(), 2);
        assert_eq!(pressure.refused(), 1);
        // Straight to hard from nothing.
        assert_eq!(g.step(mib(120)), PRESSURE_HARD);
        assert_eq!(sizes.lock().unwrap().last(), Some(&100));
    }

    #[test]
    fn sizes_left_at_their_defaults_derive_from_the_limit() {
        let parse = |t: &str| Config::from_toml_str(t, Vec::new()).unwrap();
        let b = Budgets::of(&parse("[memory]\nlimit = \"512MiB\""));
        assert_eq!(b.rocksdb, 512 * 1024 * 1024 * 30 / 100);
        assert_eq!(b.mempool, 512 * 1024 * 1024 * 15 / 100);
        assert_eq!(b.write_buffer, b.rocksdb / 8);
        assert_eq!(b.p2p, 512 * 1024 * 1024 * 5 / 100);
        // An explicit size within its share is kept.
        let b = Budgets::of(&parse(
            "[memory]\nlimit = \"512MiB\"\n[storage.rocksdb]\nblock_cache_size = \"100MiB\"",
        ));
        assert_eq!(b.rocksdb, 100 << 20);
        // Without a limit: the configured sizes.
        let b = Budgets::of(&parse(""));
        assert_eq!((b.limit, b.rocksdb, b.mempool), (0, 1 << 30, 256 << 20));
    }

    #[test]
    fn the_process_resident_set_is_read() {
        let rss = process_resident_bytes();
        // A test process holds at least a few MiB, and not terabytes.
        assert!((1 << 20..1 << 40).contains(&rss), "{rss}");
    }

    #[test]
    fn without_a_limit_there_is_never_pressure() {
        let (cache, sizes) = recorder("sig_cache", 96);
        let g = Governor::new(0, vec![cache], Arc::default());
        assert_eq!(g.step(u64::MAX), PRESSURE_NONE);
        assert_eq!(*sizes.lock().unwrap(), [96]);
        g.run(&CancellationToken::new()); // returns at once
    }

    #[test]
    fn the_knobs_reach_jemalloc_and_read_back() {
        let before = current().unwrap();
        let config = MemoryConfig {
            dirty_decay_ms: 1_234,
            muzzy_decay_ms: 0,
            background_threads: !before.background_threads,
            ..MemoryConfig::default()
        };
        let now = apply(&config).unwrap();
        assert_eq!(now.dirty_decay_ms, 1_234);
        assert_eq!(now.muzzy_decay_ms, 0);
        assert_eq!(now.background_threads, !before.background_threads);
        // Every existing arena took them too.
        let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap();
        let mut set = 0;
        for i in 0..arenas {
            if let Ok(v) = read_ssize(&arena_key(i, "dirty_decay_ms")) {
                assert_eq!(v, 1_234, "arena {i}");
                set += 1;
            }
        }
        assert!(set >= 1);
        // Back to the defaults, so other tests see an ordinary allocator.
        let restored = apply(&MemoryConfig::default()).unwrap();
        assert_eq!(restored.dirty_decay_ms, 10_000);
        assert!(restored.background_threads);
    }
}
