//! The RocksDB engine behind [`KvStore`].
//!
//! One column family per [`Column`] (named by [`Column::name`]), all sharing one LRU block
//! cache so `block_cache_size` bounds the cache of the whole database, not of each column.
//! Tables are block-based with 10-bit bloom filters; index and filter blocks live in the
//! shared cache too so their memory is bounded by it and counted in [`KvStore::memory_bytes`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, BottommostLevelCompaction, BoundColumnFamily, Cache, ColumnFamilyDescriptor,
    CompactOptions, DBCompressionType, DBWithThreadMode, IteratorMode, MultiThreaded, Options,
    ReadOptions, WriteBufferManager, WriteOptions,
};

use crate::{Column, Direction, EngineStats, Error, KvIter, KvStore, OpRef, Result, WriteBatch};

type Db = DBWithThreadMode<MultiThreaded>;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Smallest memtable RocksDB handles sensibly; smaller values are refused rather than
/// silently rounded.
const MIN_WRITE_BUFFER_SIZE: u64 = 64 * KIB;

/// Block compression of the SST files.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// No compression.
    None,
    /// LZ4: fast, moderate ratio. The default.
    #[default]
    Lz4,
    /// Zstandard: better ratio, more CPU.
    Zstd,
    /// Snappy: fast, lower ratio.
    Snappy,
}

impl Compression {
    /// Every variant, in the order they are listed in messages.
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Lz4,
        Compression::Zstd,
        Compression::Snappy,
    ];

    /// The lowercase name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Snappy => "snappy",
        }
    }

    fn to_rocks(self) -> DBCompressionType {
        match self {
            Compression::None => DBCompressionType::None,
            Compression::Lz4 => DBCompressionType::Lz4,
            Compression::Zstd => DBCompressionType::Zstd,
            Compression::Snappy => DBCompressionType::Snappy,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = Error;

    /// Parses a name case-insensitively ("lz4", "ZSTD", ...).
    fn from_str(s: &str) -> Result<Compression> {
        let wanted = s.trim();
        Compression::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| {
                let allowed: Vec<&str> = Compression::ALL.iter().map(|c| c.name()).collect();
                Error::Config {
                    key: "compression",
                    reason: format!(
                        "unknown compression {s:?}, expected one of: {}",
                        allowed.join(", ")
                    ),
                }
            })
    }
}

/// Tuning of a [`RocksStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RocksConfig {
    /// Bytes of the one LRU block cache shared by every column family.
    pub block_cache_size: u64,
    /// Bytes of one memtable of one column family before it is flushed.
    pub write_buffer_size: u64,
    /// Table files kept open at once; -1 keeps all of them open.
    pub max_open_files: i32,
    /// Compression of the table files.
    pub compression: Compression,
    /// Run RocksDB's compactions at the lowest CPU priority (nice 19), so that block commits,
    /// flushes and consensus would win the CPU over the compactions of pruned ranges.
    /// Process-wide (RocksDB's compaction threads are shared by every database of the
    /// process) and one-way: the first store opened with it lowers them for good. Off by
    /// default: measured with `keel bench prune --compaction-priority`, it did not lower
    /// commit latency while pruning (docs/benchmarks.md), and under sustained full load it
    /// would let compactions fall behind.
    pub low_priority_compactions: bool,
}

impl Default for RocksConfig {
    fn default() -> RocksConfig {
        RocksConfig {
            block_cache_size: GIB,
            write_buffer_size: 64 * MIB,
            max_open_files: 1000,
            compression: Compression::Lz4,
            low_priority_compactions: false,
        }
    }
}

impl RocksConfig {
    /// Refuses values RocksDB cannot use, naming the option.
    pub fn validate(&self) -> Result<()> {
        usize::try_from(self.block_cache_size).map_err(|_| Error::Config {
            key: "block_cache_size",
            reason: format!(
                "{} bytes does not fit this platform's address space",
                self.block_cache_size
            ),
        })?;
        if self.write_buffer_size < MIN_WRITE_BUFFER_SIZE {
            return Err(Error::Config {
                key: "write_buffer_size",
                reason: format!(
                    "{} bytes is below the minimum of {MIN_WRITE_BUFFER_SIZE}",
                    self.write_buffer_size
                ),
            });
        }
        usize::try_from(self.write_buffer_size.saturating_mul(4)).map_err(|_| Error::Config {
            key: "write_buffer_size",
            reason: format!("{} bytes is too large", self.write_buffer_size),
        })?;
        if self.max_open_files < -1 || self.max_open_files == 0 {
            return Err(Error::Config {
                key: "max_open_files",
                reason: format!(
                    "{} is neither -1 (unlimited) nor positive",
                    self.max_open_files
                ),
            });
        }
        Ok(())
    }
}

/// A [`KvStore`] on RocksDB. Dropping it closes the database; the write-ahead log makes every
/// completed [`KvStore::write`] survive a process crash.
pub struct RocksStore {
    db: Db,
    cache: Cache,
    path: PathBuf,
    /// The database options, kept for their statistics object (tickers are read from it).
    opts: Options,
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RocksStore {
    /// Opens (creating if needed) the database in directory `path` with every column family
    /// of [`Column::ALL`].
    ///
    /// Fails with [`Error::Engine`] if another process has the database open, and with
    /// [`Error::Config`] if `cfg` is unusable.
    pub fn open(path: &Path, cfg: &RocksConfig) -> Result<RocksStore> {
        cfg.validate()?;
        std::fs::create_dir_all(path).map_err(|e| {
            Error::Engine(format!(
                "cannot create database directory {}: {e}",
                path.display()
            ))
        })?;

        let block_cache_size = usize::try_from(cfg.block_cache_size).unwrap_or(usize::MAX);
        let write_buffer_size = usize::try_from(cfg.write_buffer_size).unwrap_or(usize::MAX);
        let cache = Cache::new_lru_cache(block_cache_size);

        let mut db_opts = Options::default();
        if cfg.low_priority_compactions {
            db_opts.set_env(&low_priority_compaction_env(path)?);
        }
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // Counters only (no histograms, no timers): cache hits, stalls, compaction bytes for
        // metrics, at the cost of a few per-core counter increments.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        db_opts.set_max_open_files(cfg.max_open_files);
        let jobs = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        db_opts.set_max_background_jobs(i32::try_from(jobs).unwrap_or(2));
        // Eleven column families at `write_buffer_size` each (times two while one flushes)
        // would allow gigabytes of memtables; the write buffer manager caps them all together
        // at four memtables (or half the cache, if smaller), and charges them to the block
        // cache, so `block_cache_size` bounds RocksDB's cache and memtables together. It never
        // stalls writes: past its size it makes RocksDB flush.
        let memtables = write_buffer_size
            .saturating_mul(4)
            .min(block_cache_size / 2)
            .max(write_buffer_size);
        let manager = WriteBufferManager::new_write_buffer_manager_with_cache(
            memtables,
            false,
            cache.clone(),
        );
        db_opts.set_write_buffer_manager(&manager);
        // Informational only once a manager is set (RocksDB then ignores it): the OPTIONS
        // file shows the manager's size.
        db_opts.set_db_write_buffer_size(memtables);
        // Rarely written columns (consensus, peers) would otherwise pin old log files forever.
        db_opts.set_max_total_wal_size(cfg.write_buffer_size.saturating_mul(8));
        db_opts.set_keep_log_file_num(10);

        let cf_opts = column_options(&cache, cfg.compression, write_buffer_size);
        // State tree nodes are hashes: compressing them saves nothing and costs a core's worth
        // of flushes and compactions, so that column is never compressed.
        let state_opts = column_options(&cache, Compression::None, write_buffer_size);
        let mut names: Vec<String> = Column::ALL.iter().map(|c| c.name().to_string()).collect();
        // A database written by a newer version may have more column families; RocksDB refuses
        // to open it unless every one is named, so open those too (with the same options).
        if path.join("CURRENT").exists() {
            let existing = Db::list_cf(&db_opts, path)
                .map_err(|e| engine_error(path, "list column families", e))?;
            for name in existing {
                if name != rocksdb::DEFAULT_COLUMN_FAMILY_NAME && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors: Vec<ColumnFamilyDescriptor> = names
            .into_iter()
            .map(|n| {
                let opts = if n == Column::StateNodes.name() {
                    state_opts.clone()
                } else {
                    cf_opts.clone()
                };
                ColumnFamilyDescriptor::new(n, opts)
            })
            .collect();

        let db = Db::open_cf_descriptors(&db_opts, path, descriptors)
            .map_err(|e| open_error(path, e))?;
        Ok(RocksStore {
            db,
            cache,
            path: path.to_path_buf(),
            opts: db_opts,
        })
    }

    /// Writes `layer`'s operations (borrowed, copied once into RocksDB's batch) and then
    /// `batch`'s, as one atomic write with `batch`'s sync flag.
    fn write_ops(&self, layer: Option<&crate::Layer>, batch: WriteBatch) -> Result<()> {
        let mut handles = Handles::default();
        let sync = batch.sync();
        // Reserved up front: a block's batch is ~20 MB, and growing RocksDB's buffer by
        // appending copied it over and over (a quarter of the write's time).
        let mut rb = rocksdb::WriteBatch::with_capacity_bytes(batch.serialized_bytes(layer));
        let mut failed = None;
        if let Some(layer) = layer {
            layer.for_each_op(|op| {
                if failed.is_none() {
                    failed = self.add_op(&mut rb, &mut handles, op).err();
                }
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for op in batch.ops() {
            self.add_op(&mut rb, &mut handles, op.as_ref())?;
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .write_opt(rb, &wo)
            .map_err(|e| engine_error(&self.path, "write", e))
    }

    fn add_op<'s>(
        &'s self,
        rb: &mut rocksdb::WriteBatch,
        handles: &mut Handles<'s>,
        op: OpRef<'_>,
    ) -> Result<()> {
        match op {
            OpRef::Put(col, k, v) => rb.put_cf(&handles.get(self, col)?, k, v),
            OpRef::Delete(col, k) => rb.delete_cf(&handles.get(self, col)?, k),
            // An empty or inverted range deletes nothing (RocksDB would reject it).
            OpRef::DeleteRange(col, from, to) => {
                if from < to {
                    rb.delete_range_cf(&handles.get(self, col)?, from, to);
                }
            }
        }
        Ok(())
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every memtable to table files (and so empties the write-ahead log).
    pub fn flush(&self) -> Result<()> {
        let cfs: Vec<Arc<BoundColumnFamily<'_>>> = Column::ALL
            .iter()
            .map(|c| self.cf(*c))
            .collect::<Result<_>>()?;
        let refs: Vec<&Arc<BoundColumnFamily<'_>>> = cfs.iter().collect();
        self.db
            .flush_cfs_opt(&refs, &rocksdb::FlushOptions::default())
            .map_err(|e| engine_error(&self.path, "flush", e))
    }

    /// Sum of an integer property over every column (`rocksdb.cur-size-all-mem-tables`...).
    /// Properties a column does not report count as zero.
    pub fn property_sum(&self, name: &str) -> Result<u64> {
        let mut total = 0u64;
        for col in Column::ALL {
            let cf = self.cf(col)?;
            let v = self
                .db
                .property_int_value_cf(&cf, name)
                .map_err(|e| engine_error(&self.path, "read property", e))?;
            total = total.saturating_add(v.unwrap_or(0));
        }
        Ok(total)
    }

    /// One integer property of one column, `None` if RocksDB does not know it.
    pub fn property(&self, col: Column, name: &str) -> Result<Option<u64>> {
        let cf = self.cf(col)?;
        self.db
            .property_int_value_cf(&cf, name)
            .map_err(|e| engine_error(&self.path, "read property", e))
    }

    /// One text property of one column (`rocksdb.cfstats`...), `None` if RocksDB does not
    /// know it.
    pub fn property_text(&self, col: Column, name: &str) -> Result<Option<String>> {
        let cf = self.cf(col)?;
        self.db
            .property_value_cf(&cf, name)
            .map_err(|e| engine_error(&self.path, "read property", e))
    }

    fn cf(&self, col: Column) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.db.cf_handle(col.name()).ok_or_else(|| {
            Error::Engine(format!(
                "column family {} missing in {}",
                col.name(),
                self.path.display()
            ))
        })
    }
}

/// Column family handles looked up at most once per batch.
#[derive(Default)]
struct Handles<'s> {
    slots: [Option<Arc<BoundColumnFamily<'s>>>; Column::ALL.len()],
}

impl<'s> Handles<'s> {
    fn get(&mut self, store: &'s RocksStore, col: Column) -> Result<Arc<BoundColumnFamily<'s>>> {
        let slot = Column::ALL
            .iter()
            .position(|c| *c == col)
            .and_then(|i| self.slots.get_mut(i))
            .ok_or_else(|| Error::Engine(format!("unknown column {}", col.name())))?;
        if let Some(h) = slot {
            return Ok(Arc::clone(h));
        }
        let h = store.cf(col)?;
        *slot = Some(Arc::clone(&h));
        Ok(h)
    }
}

fn column_options(cache: &Cache, compression: Compression, write_buffer_size: usize) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    // Keeps the hottest filters from being evicted by bulk reads, as the tuning guide advises
    // once index and filter blocks live in the block cache.
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);

    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    // Pruning deletes keys spread over the hash-keyed columns and the state nodes: a table
    // with at least 16,384 deletions in any 32,768 entries (or half its entries deleted) is
    // marked for compaction, so RocksDB gives the space back on its own.
    opts.add_compact_on_deletion_collector_factory(32_768, 16_384, 0.5);
    opts.set_write_buffer_size(write_buffer_size);
    // Memtables take memory from their arena in blocks of this size (RocksDB's default:
    // min(1 MiB, write_buffer_size / 8)). Each of the eleven columns' memtables holds at
    // least one block, most of it empty in rarely written columns: with 64 KiB blocks a
    // node under load allocated ~6 MiB less (70.3 against 76.0 MiB after 60 s at 2,000
    // transfers/s), at no measurable cost (a block per 64 KiB written).
    opts.set_arena_block_size(ARENA_BLOCK_BYTES);
    opts.set_compression_type(compression.to_rocks());
    opts
}

/// Block size of the memtables' arenas: see [`column_options`].
const ARENA_BLOCK_BYTES: usize = 64 * 1024;

fn engine_error(path: &Path, what: &str, e: rocksdb::Error) -> Error {
    Error::Engine(format!("{what} on database at {}: {e}", path.display()))
}

/// The process's default RocksDB environment with its compaction pool (the low-priority pool)
/// lowered to the lowest CPU priority, once. Flushes keep their own pool at normal priority,
/// so memtables still drain promptly; only the rewriting of table files yields. RocksDB checks
/// the flag at each compaction, and under sustained full load compactions still run (nice 19
/// gets a share of the CPU), only later: L0 files then accumulate until RocksDB's own write
/// slowdown paces the writers.
fn low_priority_compaction_env(path: &Path) -> Result<rocksdb::Env> {
    static LOWERED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let mut env = rocksdb::Env::new().map_err(|e| engine_error(path, "create environment", e))?;
    LOWERED.get_or_init(|| env.lower_thread_pool_cpu_priority());
    Ok(env)
}

fn open_error(path: &Path, e: rocksdb::Error) -> Error {
    let msg = e.to_string();
    // RocksDB takes an fcntl lock on PATH/LOCK: "IO error: While lock file: .../LOCK:
    // Resource temporarily unavailable" from another process, "lock hold by current process"
    // from this one.
    if msg.contains("While lock file") || msg.contains("lock hold by current process") {
        Error::Engine(format!(
            "database at {} is in use by another process (or already open in this one): {msg}",
            path.display()
        ))
    } else {
        Error::Engine(format!("cannot open database at {}: {msg}", path.display()))
    }
}

impl KvStore for RocksStore {
    fn get(&self, col: Column, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(col)?;
        self.db
            .get_cf(&cf, key)
            .map_err(|e| engine_error(&self.path, "get", e))
    }

    fn multi_get(&self, col: Column, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let cf = self.cf(col)?;
        let sorted = keys.windows(2).all(|w| w[0] <= w[1]);
        self.db
            .batched_multi_get_cf(&cf, keys, sorted)
            .into_iter()
            .map(|r| {
                r.map(|v| v.map(|s| s.to_vec()))
                    .map_err(|e| engine_error(&self.path, "multi_get", e))
            })
            .collect()
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        self.write_ops(None, batch)
    }

    fn write_layer(&self, layer: &crate::Layer, batch: WriteBatch) -> Result<()> {
        self.write_ops(Some(layer), batch)
    }

    fn iter_range<'a>(
        &'a self,
        col: Column,
        from: &[u8],
        to: Option<&[u8]>,
        dir: Direction,
    ) -> KvIter<'a> {
        if to.is_some_and(|t| t <= from) {
            return Box::new(std::iter::empty());
        }
        let cf = match self.cf(col) {
            Ok(cf) => cf,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from);
        if let Some(t) = to {
            ro.set_iterate_upper_bound(t);
        }
        // With both bounds set RocksDB positions `End` on the last key below the exclusive
        // upper bound and stops reverse iteration at the lower bound.
        let mode = match dir {
            Direction::Forward => IteratorMode::From(from, rocksdb::Direction::Forward),
            Direction::Reverse => IteratorMode::End,
        };
        let path = &self.path;
        let iter = self.db.iterator_cf_opt(&cf, ro, mode).map(move |item| {
            item.map(|(k, v)| (k.into_vec(), v.into_vec()))
                .map_err(|e| engine_error(path, "iterate", e))
        });
        Box::new(iter)
    }

    fn compact_range(&self, col: Column, from: &[u8], to: &[u8]) -> Result<()> {
        let cf = self.cf(col)?;
        let mut opts = CompactOptions::default();
        // Rewrite the bottommost files too, otherwise range tombstones over data that already
        // sits in the last level would keep its space until some later compaction.
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::ForceOptimized);
        self.db
            .compact_range_cf_opt(&cf, Some(from), Some(to), &opts);
        Ok(())
    }

    /// Drops the table files wholly inside the range unread first (RocksDB's
    /// `DeleteFilesInRange`, levels 1 and below; it counts a file ending at `to` as inside,
    /// hence no key at `to`). Then writes the range delete into a memtable of its own
    /// (flushing the column before and after): a memtable that also held newer keys would
    /// give the tombstone a table file spanning those too, and compacting the range would
    /// then rewrite every file of the newer keys as well (measured with `keel bench prune`:
    /// the compactions of the receipts after each pass rewrote the whole retained window).
    /// Last, compacts the range: the tombstone's file and the few files reaching into the
    /// range. A write into the column between the flushes only makes that compaction larger.
    fn drop_range(&self, col: Column, from: &[u8], to: &[u8]) -> Result<()> {
        let cf = self.cf(col)?;
        self.db
            .delete_file_in_range_cf(&cf, from, to)
            .map_err(|e| engine_error(&self.path, "delete files in range", e))?;
        let flush = || {
            self.db
                .flush_cf(&cf)
                .map_err(|e| engine_error(&self.path, "flush", e))
        };
        flush()?;
        let mut batch = WriteBatch::new();
        batch.delete_range(col, from.to_vec(), to.to_vec());
        self.write(batch)?;
        flush()?;
        self.compact_range(col, from, to)
    }

    fn flush_column(&self, col: Column) -> Result<()> {
        let cf = self.cf(col)?;
        self.db
            .flush_cf(&cf)
            .map_err(|e| engine_error(&self.path, "flush", e))
    }

    fn engine_stats(&self) -> Option<EngineStats> {
        use rocksdb::statistics::Ticker;
        let ticker = |t: Ticker| self.opts.get_ticker_count(t);
        // Database-wide properties: any column family answers them.
        let db_property = |name: &str| {
            self.property(Column::Meta, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        Some(EngineStats {
            block_cache_hits: ticker(Ticker::BlockCacheHit),
            block_cache_misses: ticker(Ticker::BlockCacheMiss),
            stall_micros: ticker(Ticker::StallMicros),
            compaction_read_bytes: ticker(Ticker::CompactReadBytes),
            compaction_write_bytes: ticker(Ticker::CompactWriteBytes),
            flush_write_bytes: ticker(Ticker::FlushWriteBytes),
            running_compactions: db_property("rocksdb.num-running-compactions"),
            pending_compaction_bytes: self
                .property_sum("rocksdb.estimate-pending-compaction-bytes")
                .unwrap_or(0),
        })
    }

    fn live_sst_bytes(&self, col: Column) -> Option<u64> {
        self.property(col, "rocksdb.live-sst-files-size")
            .ok()
            .flatten()
    }

    fn estimate_keys(&self, col: Column) -> Option<u64> {
        self.property(col, "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
    }

    fn disk_size_bytes(&self) -> Result<u64> {
        dir_size(&self.path)
            .map_err(|e| Error::Engine(format!("cannot measure {}: {e}", self.path.display())))
    }

    fn memory_bytes(&self) -> u64 {
        // The cache is shared, so it is counted once rather than per column; the memtables
        // are charged to it (the write buffer manager), so they are in its usage already.
        let cache = self.cache.get_usage() as u64;
        let readers = self
            .property_sum("rocksdb.estimate-table-readers-mem")
            .unwrap_or(0);
        cache.saturating_add(readers)
    }

    fn set_cache_capacity(&self, bytes: u64) {
        // `Cache` is a handle: resizing a clone resizes the one cache.
        self.cache
            .clone()
            .set_capacity(usize::try_from(bytes).unwrap_or(usize::MAX));
    }
}

/// Total size of the regular files under `dir`. Files deleted while walking (compaction
/// removing obsolete tables) are skipped.
fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            total = total.saturating_add(dir_size(&entry.path())?);
        } else if meta.is_file() {
            total = total.saturating_add(meta.len());
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use super::*;
    use crate::suite::small_rocks_config;

    /// Sections of the newest `OPTIONS-*` file RocksDB wrote: what it actually runs with.
    fn options_file(dir: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
        let newest = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|n| {
                n.strip_prefix("OPTIONS-")
                    .and_then(|x| x.parse::<u64>().ok())
                    .map(|x| (x, n.clone()))
            })
            .max()
            .unwrap()
            .1;
        let text = std::fs::read_to_string(dir.join(newest)).unwrap();
        let mut sections = BTreeMap::new();
        let mut current = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = name.to_string();
            } else if let Some((k, v)) = line.split_once('=') {
                sections
                    .entry(current.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(k.to_string(), v.to_string());
            }
        }
        sections
    }

    fn opt<'m>(
        sections: &'m BTreeMap<String, BTreeMap<String, String>>,
        section: &str,
        key: &str,
    ) -> &'m str {
        sections
            .get(section)
            .and_then(|s| s.get(key))
            .unwrap_or_else(|| panic!("no {key} in [{section}]"))
    }

    #[test]
    fn serialized_bytes_bound_rocksdbs_batch_of_the_same_records() {
        let mut staged = WriteBatch::new();
        for i in 0..500u32 {
            staged.put(Column::StateNodes, i.to_be_bytes().repeat(9), vec![7u8; 90]);
        }
        staged.delete(Column::StateNodes, b"gone".to_vec());
        let layer = crate::Layer::from_batch(&staged);
        let mut batch = WriteBatch::new();
        batch.put(Column::Bodies, b"block".to_vec(), vec![1u8; 5_000]);
        let mut rb = rocksdb::WriteBatch::default();
        for (k, v) in staged
            .ops()
            .iter()
            .chain(batch.ops())
            .filter_map(|op| match op {
                crate::Op::Put(_, k, v) => Some((k, v)),
                _ => None,
            })
        {
            rb.put(k, v);
        }
        rb.delete(b"gone");
        let bound = batch.serialized_bytes(Some(&layer));
        assert!(
            rb.size_in_bytes() <= bound,
            "{} > {bound}",
            rb.size_in_bytes()
        );
        // Not far above: the framing is a few bytes per record.
        assert!(
            bound < rb.size_in_bytes() + 502 * 16,
            "{bound} vs {}",
            rb.size_in_bytes()
        );
    }

    #[test]
    fn every_option_reaches_every_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RocksConfig {
            block_cache_size: 48 << 20,
            write_buffer_size: 3 << 20,
            max_open_files: 321,
            compression: Compression::Zstd,
            low_priority_compactions: true,
        };
        let store = RocksStore::open(dir.path(), &cfg).unwrap();
        for col in Column::ALL {
            assert_eq!(
                store.property(col, "rocksdb.block-cache-capacity").unwrap(),
                Some(48 << 20),
                "{col:?}"
            );
        }
        let o = options_file(dir.path());
        assert_eq!(opt(&o, "DBOptions", "max_open_files"), "321");
        assert_eq!(
            opt(&o, "DBOptions", "db_write_buffer_size"),
            (12u64 << 20).to_string()
        );
        for col in Column::ALL {
            let cf = format!("CFOptions \"{}\"", col.name());
            let table = format!("TableOptions/BlockBasedTable \"{}\"", col.name());
            assert_eq!(
                opt(&o, &cf, "write_buffer_size"),
                (3u64 << 20).to_string(),
                "{col:?}"
            );
            // Except the state tree's nodes (hashes, incompressible).
            let compression = if col == Column::StateNodes {
                "kNoCompression"
            } else {
                "kZSTD"
            };
            assert_eq!(opt(&o, &cf, "compression"), compression, "{col:?}");
            assert_eq!(opt(&o, &table, "filter_policy"), "bloomfilter", "{col:?}");
            assert_eq!(
                opt(&o, &table, "cache_index_and_filter_blocks"),
                "true",
                "{col:?}"
            );
        }
    }

    /// The OPTIONS file names the filter but not its size, so measure the filter blocks of a
    /// flushed table instead: about 10 bits per key.
    #[test]
    fn table_files_carry_ten_bit_bloom_filters() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        let mut b = WriteBatch::new();
        for i in 0u32..20_000 {
            b.put(Column::TxIndex, i.to_be_bytes().to_vec(), b"v".to_vec());
        }
        store.write(b).unwrap();
        store.flush().unwrap();
        let cf = store.cf(Column::TxIndex).unwrap();
        let props = store
            .db
            .property_value_cf(&cf, "rocksdb.aggregated-table-properties")
            .unwrap()
            .unwrap();
        let field = |name: &str| -> f64 {
            props
                .split(';')
                .find_map(|kv| {
                    kv.trim()
                        .strip_prefix(name)?
                        .strip_prefix('=')?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no {name} in {props}"))
        };
        let bits_per_key = field("filter block size") * 8.0 / field("# entries");
        assert!(
            (9.0..12.0).contains(&bits_per_key),
            "{bits_per_key} bits per key: {props}"
        );
    }

    #[test]
    fn one_block_cache_is_shared_by_all_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        for i in 0u32..2000 {
            store
                .put(Column::Headers, &i.to_be_bytes(), &[7; 64])
                .unwrap();
        }
        store.flush().unwrap();
        for i in 0u32..2000 {
            assert!(store
                .get(Column::Headers, &i.to_be_bytes())
                .unwrap()
                .is_some());
        }
        let used = store
            .property(Column::Headers, "rocksdb.block-cache-usage")
            .unwrap()
            .unwrap();
        assert!(used > 0);
        // A column never read from reports the same (shared) cache.
        assert_eq!(
            store
                .property(Column::Peers, "rocksdb.block-cache-usage")
                .unwrap(),
            Some(used)
        );
        assert!(store.memory_bytes() >= used);
    }

    fn sst_size_with(compression: Compression) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(
            dir.path(),
            &RocksConfig {
                compression,
                ..small_rocks_config()
            },
        )
        .unwrap();
        let mut b = WriteBatch::new();
        for i in 0u32..2000 {
            b.put(
                Column::Bodies,
                i.to_be_bytes().to_vec(),
                format!("transfer {i} to somebody; ").repeat(20),
            );
        }
        store.write(b).unwrap();
        store.flush().unwrap();
        store
            .property(Column::Bodies, "rocksdb.live-sst-files-size")
            .unwrap()
            .unwrap()
    }

    #[test]
    fn compression_setting_changes_the_table_files() {
        let none = sst_size_with(Compression::None);
        assert!(none > 500_000, "{none}");
        for c in [Compression::Lz4, Compression::Zstd, Compression::Snappy] {
            let size = sst_size_with(c);
            assert!(size * 3 < none, "{c}: {size} bytes vs {none} uncompressed");
        }
    }

    #[test]
    fn reopening_with_another_compression_updates_the_options() {
        let dir = tempfile::tempdir().unwrap();
        drop(RocksStore::open(
            dir.path(),
            &RocksConfig {
                compression: Compression::Zstd,
                ..small_rocks_config()
            },
        ));
        assert_eq!(
            opt(
                &options_file(dir.path()),
                "CFOptions \"bodies\"",
                "compression"
            ),
            "kZSTD"
        );
        drop(RocksStore::open(
            dir.path(),
            &RocksConfig {
                compression: Compression::None,
                ..small_rocks_config()
            },
        ));
        assert_eq!(
            opt(
                &options_file(dir.path()),
                "CFOptions \"bodies\"",
                "compression"
            ),
            "kNoCompression"
        );
    }

    #[test]
    fn data_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
            assert_eq!(store.path(), dir.path());
            let mut b = WriteBatch::new();
            b.put(Column::Meta, b"flushed".to_vec(), b"1".to_vec());
            store.write(b).unwrap();
            store.flush().unwrap();
            let mut b = WriteBatch::new();
            b.put(Column::Consensus, b"in-wal-only".to_vec(), b"2".to_vec());
            b.delete(Column::Meta, b"flushed".to_vec());
            b.put(Column::Meta, b"kept".to_vec(), b"3".to_vec());
            b.set_sync(true);
            store.write(b).unwrap();
        }
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        assert_eq!(store.get(Column::Meta, b"flushed").unwrap(), None);
        assert_eq!(
            store.get(Column::Meta, b"kept").unwrap(),
            Some(b"3".to_vec())
        );
        assert_eq!(
            store.get(Column::Consensus, b"in-wal-only").unwrap(),
            Some(b"2".to_vec())
        );
    }

    #[test]
    fn disk_and_memory_usage_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        for i in 0u32..1000 {
            store
                .put(Column::StateNodes, &i.to_be_bytes(), &[1; 100])
                .unwrap();
        }
        assert!(store.memory_bytes() > 0, "memtables count");
        store.flush().unwrap();
        let disk = store.disk_size_bytes().unwrap();
        assert!(disk > 0);
        assert!(disk >= store.property_sum("rocksdb.live-sst-files-size").unwrap());
    }

    fn incompressible(i: u32) -> Vec<u8> {
        (0u32..32)
            .flat_map(|j| keel_types::Hash::digest(&[i.to_be_bytes(), j.to_be_bytes()].concat()).0)
            .collect()
    }

    /// The nice values of this process's threads whose name starts with `prefix`.
    fn thread_nice_values(prefix: &str) -> Vec<i64> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.trim().starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the `(comm)` one start at field 3; nice is field 19.
            let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
            if let Some(nice) = after.split_whitespace().nth(16) {
                found.push(nice.parse().unwrap());
            }
        }
        found
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn compactions_run_at_the_lowest_cpu_priority() {
        let dir = tempfile::tempdir().unwrap();
        let config = RocksConfig {
            low_priority_compactions: true,
            ..small_rocks_config()
        };
        let store = RocksStore::open(dir.path(), &config).unwrap();
        let col = Column::StateNodes;
        for round in 0u32..2 {
            let mut b = WriteBatch::new();
            for i in 0u32..500 {
                b.put(col, i.to_be_bytes().to_vec(), incompressible(i + round));
            }
            store.write(b).unwrap();
            store.flush().unwrap();
        }
        // A compaction runs on the low-priority pool, whose threads lower themselves before
        // their next job.
        store
            .compact_range(col, &0u32.to_be_bytes(), &500u32.to_be_bytes())
            .unwrap();
        let low = thread_nice_values("rocksdb:low");
        assert!(!low.is_empty(), "no compaction threads found");
        assert!(
            low.contains(&19),
            "compaction threads' nice values: {low:?}"
        );
        // Flushes keep the process's priority.
        let high = thread_nice_values("rocksdb:high");
        assert!(
            high.iter().all(|n| *n < 19),
            "flush threads' nice values: {high:?}"
        );
    }

    #[test]
    fn the_cache_holds_the_memtables_and_shrinks_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = RocksConfig {
            block_cache_size: 64 * MIB,
            write_buffer_size: 4 * MIB,
            ..RocksConfig::default()
        };
        let store = RocksStore::open(dir.path(), &cfg).unwrap();
        let col = Column::StateNodes;
        let mut b = WriteBatch::new();
        for i in 0u32..2_000 {
            b.put(col, i.to_be_bytes().to_vec(), incompressible(i));
        }
        store.write(b).unwrap();
        // The memtable's bytes are charged to the cache (in whole reservations of 1 MiB or
        // more): the cache's usage alone accounts for them.
        let memtables = store
            .property_sum("rocksdb.cur-size-all-mem-tables")
            .unwrap();
        assert!(memtables > MIB, "{memtables}");
        assert!(
            store.memory_bytes() >= memtables,
            "{}",
            store.memory_bytes()
        );
        // Read everything back after a flush so the cache fills with table blocks.
        store.flush().unwrap();
        for i in 0u32..2_000 {
            store.get(col, &i.to_be_bytes()).unwrap().unwrap();
        }
        let full = store.cache.get_usage() as u64;
        assert!(full > 2 * MIB, "{full}");
        store.set_cache_capacity(MIB);
        let shrunk = store.cache.get_usage() as u64;
        assert!(shrunk <= 2 * MIB, "{shrunk} bytes left of {full}");
        store.set_cache_capacity(64 * MIB);
        assert_eq!(
            store.get(col, &5u32.to_be_bytes()).unwrap(),
            Some(incompressible(5))
        );
    }

    #[test]
    fn compact_range_reclaims_deleted_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        let col = Column::StateNodes;
        for chunk in (0u32..4000).collect::<Vec<_>>().chunks(500) {
            let mut b = WriteBatch::new();
            for i in chunk {
                b.put(col, i.to_be_bytes().to_vec(), incompressible(*i));
            }
            store.write(b).unwrap();
        }
        store.flush().unwrap();
        let before = store
            .property(col, "rocksdb.live-sst-files-size")
            .unwrap()
            .unwrap();
        assert!(before > 3_000_000, "{before}");

        let mut b = WriteBatch::new();
        b.delete_range(
            col,
            0u32.to_be_bytes().to_vec(),
            3900u32.to_be_bytes().to_vec(),
        );
        store.write(b).unwrap();
        store
            .compact_range(col, &0u32.to_be_bytes(), &3900u32.to_be_bytes())
            .unwrap();
        let after = store
            .property(col, "rocksdb.live-sst-files-size")
            .unwrap()
            .unwrap();
        assert!(after * 10 < before, "{after} bytes left of {before}");
        assert_eq!(
            store.get(col, &3950u32.to_be_bytes()).unwrap(),
            Some(incompressible(3950))
        );
        assert_eq!(store.get(col, &10u32.to_be_bytes()).unwrap(), None);
    }

    #[test]
    fn drop_range_rewrites_only_the_files_reaching_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = RocksConfig {
            block_cache_size: 64 * MIB,
            write_buffer_size: 16 * MIB,
            ..RocksConfig::default()
        };
        let store = RocksStore::open(dir.path(), &config).unwrap();
        let col = Column::Receipts;
        let write = |keys: std::ops::Range<u32>| {
            for chunk in keys.collect::<Vec<_>>().chunks(500) {
                let mut b = WriteBatch::new();
                for i in chunk {
                    b.put(col, i.to_be_bytes().to_vec(), incompressible(*i));
                }
                store.write(b).unwrap();
            }
        };
        // 4 MB of older keys in one bottom-level file, then 6 MB of newer ones that stay in
        // the memtable.
        write(0..4_000);
        store.compact_range(col, &[], &[0xff; 5]).unwrap();
        write(4_000..10_000);
        let written = || store.engine_stats().unwrap().compaction_write_bytes;
        let before = written();
        let mut to = 1_999u32.to_be_bytes().to_vec();
        to.push(0);
        store.drop_range(col, &[], &to).unwrap();
        // The file reaching into the range is rewritten (keys 2,000 to 3,999: ~2 MB); the
        // newer keys are not (with the tombstone in their memtable, they would be: ~8 MB).
        let rewritten = written() - before;
        assert!(
            (1_000_000..3_500_000).contains(&rewritten),
            "{rewritten} bytes rewritten"
        );
        assert_eq!(store.get(col, &1_999u32.to_be_bytes()).unwrap(), None);
        assert_eq!(
            store.get(col, &2_000u32.to_be_bytes()).unwrap(),
            Some(incompressible(2_000))
        );
        assert_eq!(
            store.get(col, &9_999u32.to_be_bytes()).unwrap(),
            Some(incompressible(9_999))
        );
        assert_eq!(
            store.iter_range(col, &[], None, Direction::Forward).count(),
            8_000
        );
    }

    #[test]
    fn opening_an_open_database_again_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        match RocksStore::open(dir.path(), &small_rocks_config()) {
            Err(Error::Engine(msg)) => assert!(msg.contains("is in use"), "{msg}"),
            other => panic!("expected an engine error, got {other:?}"),
        }
    }

    #[test]
    fn databases_with_unknown_column_families_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            Db::open_cf(&opts, dir.path(), ["meta", "from_a_newer_version"]).unwrap();
        }
        let store = RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
        store.put(Column::Peers, b"p", b"1").unwrap();
        assert_eq!(store.get(Column::Peers, b"p").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn bad_config_values_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                RocksConfig {
                    write_buffer_size: 1024,
                    ..RocksConfig::default()
                },
                "write_buffer_size",
            ),
            (
                RocksConfig {
                    max_open_files: 0,
                    ..RocksConfig::default()
                },
                "max_open_files",
            ),
            (
                RocksConfig {
                    max_open_files: -5,
                    ..RocksConfig::default()
                },
                "max_open_files",
            ),
        ];
        for (cfg, key) in cases {
            match RocksStore::open(dir.path(), &cfg) {
                Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected a config error for {key}, got {other:?}"),
            }
        }
        assert!(RocksConfig {
            max_open_files: -1,
            ..RocksConfig::default()
        }
        .validate()
        .is_ok());
        assert!(RocksConfig::default().validate().is_ok());
    }

    #[test]
    fn default_config_is_the_documented_one() {
        let d = RocksConfig::default();
        assert_eq!(d.block_cache_size, 1 << 30);
        assert_eq!(d.write_buffer_size, 64 << 20);
        assert_eq!(d.max_open_files, 1000);
        assert_eq!(d.compression, Compression::Lz4);
    }

    #[test]
    fn compression_names_are_lowercase_both_ways() {
        use serde::de::IntoDeserializer;
        use serde::Deserialize;
        for c in Compression::ALL {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), c.to_string().to_lowercase());
            let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                c.name().into_deserializer();
            assert_eq!(Compression::deserialize(de).unwrap(), c);
        }
        assert_eq!("ZSTD".parse::<Compression>().unwrap(), Compression::Zstd);
        match "gzip".parse::<Compression>() {
            Err(
                e @ Error::Config {
                    key: "compression", ..
                },
            ) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("gzip") && msg.contains("none, lz4, zstd, snappy"),
                    "{msg}"
                );
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    // ---- Real-process tests: a child process (this test binary, re-run on `child_process`
    // with an environment variable) holds or writes the database while the parent watches.

    const CHILD_ENV: &str = "KEEL_STORAGE_TEST_CHILD";
    const CRASH_BATCHES: u32 = 40;
    const CRASH_KEYS: u32 = 25;

    fn crash_batch(i: u32) -> WriteBatch {
        let mut b = WriteBatch::new();
        for j in 0..CRASH_KEYS {
            b.put(
                Column::StateNodes,
                format!("b{i:03}-k{j:03}").into_bytes(),
                vec![i as u8; 100],
            );
        }
        b.put(Column::HeightIndex, i.to_be_bytes().to_vec(), b"h".to_vec());
        b.put(Column::Meta, b"latest".to_vec(), i.to_be_bytes().to_vec());
        b
    }

    /// Not a test on its own: returns at once unless started by `spawn_child`.
    #[test]
    fn child_process() {
        let Ok(task) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (mode, path) = task.split_once(':').unwrap();
        let store = RocksStore::open(Path::new(path), &small_rocks_config()).unwrap();
        if mode == "write" {
            for i in 0..CRASH_BATCHES {
                store.write(crash_batch(i)).unwrap();
            }
        }
        let mut out = std::io::stdout();
        writeln!(out, "\n{CHILD_READY}").unwrap();
        out.flush().unwrap();
        // Wait to be killed, or for the parent to close stdin, but never outlive a lost parent
        // by more than a minute.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(60));
        drop(store);
    }

    const CHILD_READY: &str = "keel-storage child ready";

    /// Starts `child_process` in another process and waits (at most a minute) until it has
    /// the database open and, in mode "write", every crash batch written.
    fn spawn_child(mode: &str, path: &Path) -> Child {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "rocks::tests::child_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{mode}:{}", path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // libtest prints "test NAME ... " on the same line before the test's own output.
            let ready = BufReader::new(stdout)
                .lines()
                .map_while(|l| l.ok())
                .any(|l| l.contains(CHILD_READY));
            let _ = tx.send(ready);
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(true) => child,
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("child process did not get ready: {outcome:?}");
            }
        }
    }

    #[test]
    fn open_is_refused_while_another_process_holds_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child("hold", dir.path());
        let result = RocksStore::open(dir.path(), &small_rocks_config());
        child.kill().unwrap();
        child.wait().unwrap();
        match result {
            Err(Error::Engine(msg)) => {
                assert!(msg.contains("in use by another process"), "{msg}");
                assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            }
            other => panic!("expected an engine error, got {other:?}"),
        }
        // Once the holder is gone the database opens.
        RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
    }

    /// Which crash batches a store holds; panics if any batch is partly there.
    fn whole_batches(store: &RocksStore) -> Vec<u32> {
        let mut present = Vec::new();
        for i in 0..CRASH_BATCHES {
            let keys = store
                .iter_prefix(Column::StateNodes, format!("b{i:03}-").as_bytes())
                .count() as u32;
            let index = store
                .get(Column::HeightIndex, &i.to_be_bytes())
                .unwrap()
                .is_some();
            match (keys, index) {
                (0, false) => {}
                (CRASH_KEYS, true) => present.push(i),
                _ => panic!("batch {i} is partly visible: {keys} keys, height index {index}"),
            }
        }
        present
    }

    fn copy_dir(from: &Path, to: &Path) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn a_killed_process_leaves_every_written_batch_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_child("write", dir.path());
        // SIGKILL: no destructor, no flush, no clean close.
        child.kill().unwrap();
        child.wait().unwrap();

        // The WAL as the killed process left it: every batch is there.
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        {
            let store = RocksStore::open(crashed.path(), &small_rocks_config()).unwrap();
            assert_eq!(
                whole_batches(&store),
                (0..CRASH_BATCHES).collect::<Vec<_>>()
            );
            assert_eq!(
                store.get(Column::Meta, b"latest").unwrap(),
                Some((CRASH_BATCHES - 1).to_be_bytes().to_vec())
            );
        }

        // A log torn anywhere (a machine crash mid-append) recovers a prefix of whole batches.
        let wal = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let wal_len = std::fs::metadata(&wal).unwrap().len();
        let mut last = 0usize;
        for cut in (1..16).map(|k| wal_len * k / 16).chain([wal_len - 1]) {
            let torn = tempfile::tempdir().unwrap();
            copy_dir(dir.path(), torn.path());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(torn.path().join(wal.file_name().unwrap()))
                .unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let store = RocksStore::open(torn.path(), &small_rocks_config()).unwrap();
            let present = whole_batches(&store);
            assert_eq!(
                present,
                (0..present.len() as u32).collect::<Vec<_>>(),
                "cut at {cut}: not a prefix"
            );
            assert!(
                present.len() >= last,
                "cut at {cut}: fewer batches than an earlier cut"
            );
            last = present.len();
        }
        assert!(
            last > 0 && last < CRASH_BATCHES as usize,
            "cuts should tear the log: {last}"
        );
    }
}
