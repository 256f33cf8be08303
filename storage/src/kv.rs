//! The engine-independent key-value boundary.

use crate::Result;

/// What a storage engine reports of its own work, for metrics: counters since it opened
/// and gauges of now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Block cache lookups that found the block.
    pub block_cache_hits: u64,
    /// Block cache lookups that read the block from disk.
    pub block_cache_misses: u64,
    /// Microseconds writes were stalled or slowed by the engine (too many level-0 files,
    /// too much pending compaction, memtables full).
    pub stall_micros: u64,
    /// Bytes compactions read.
    pub compaction_read_bytes: u64,
    /// Bytes compactions wrote.
    pub compaction_write_bytes: u64,
    /// Bytes memtable flushes wrote.
    pub flush_write_bytes: u64,
    /// Compactions running now.
    pub running_compactions: u64,
    /// The engine's estimate of bytes compaction still has to rewrite.
    pub pending_compaction_bytes: u64,
}

/// Column families. Each is a separate ordered key space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Column {
    /// Chain metadata: latest height, genesis hash, pruned height, schema version.
    Meta,
    /// Block headers by hash.
    Headers,
    /// Block bodies (transaction bytes) by hash.
    Bodies,
    /// Big-endian height to block hash.
    HeightIndex,
    /// Transaction hash to (height, index).
    TxIndex,
    /// Big-endian height ++ big-endian index to receipt.
    Receipts,
    /// State tree nodes, keyed by (version, path).
    StateNodes,
    /// Stale state tree nodes by the version that made them stale, for pruning.
    StateStale,
    /// Consensus safety data.
    Consensus,
    /// Slashing evidence.
    Evidence,
    /// Peer scores and addresses.
    Peers,
}

impl Column {
    /// Every column, in a fixed order.
    pub const ALL: [Column; 11] = [
        Column::Meta,
        Column::Headers,
        Column::Bodies,
        Column::HeightIndex,
        Column::TxIndex,
        Column::Receipts,
        Column::StateNodes,
        Column::StateStale,
        Column::Consensus,
        Column::Evidence,
        Column::Peers,
    ];

    /// The column family name on disk.
    pub fn name(self) -> &'static str {
        match self {
            Column::Meta => "meta",
            Column::Headers => "headers",
            Column::Bodies => "bodies",
            Column::HeightIndex => "height_index",
            Column::TxIndex => "tx_index",
            Column::Receipts => "receipts",
            Column::StateNodes => "state_nodes",
            Column::StateStale => "state_stale",
            Column::Consensus => "consensus",
            Column::Evidence => "evidence",
            Column::Peers => "peers",
        }
    }
}

/// One operation of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set a key.
    Put(Column, Vec<u8>, Vec<u8>),
    /// Remove a key.
    Delete(Column, Vec<u8>),
    /// Remove every key in `[from, to)`.
    DeleteRange(Column, Vec<u8>, Vec<u8>),
}

/// An [`Op`] borrowed: what [`crate::Layer::for_each_op`] hands out, and what engines write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpRef<'a> {
    /// Set a key.
    Put(Column, &'a [u8], &'a [u8]),
    /// Remove a key.
    Delete(Column, &'a [u8]),
    /// Remove every key in `[from, to)`.
    DeleteRange(Column, &'a [u8], &'a [u8]),
}

impl Op {
    /// This operation, borrowed.
    pub fn as_ref(&self) -> OpRef<'_> {
        match self {
            Op::Put(col, k, v) => OpRef::Put(*col, k, v),
            Op::Delete(col, k) => OpRef::Delete(*col, k),
            Op::DeleteRange(col, from, to) => OpRef::DeleteRange(*col, from, to),
        }
    }
}

/// Operations applied atomically, in order: after a crash either all or none are visible.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<Op>,
    sync: bool,
    bytes: usize,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Sets `key` to `value` in `col`.
    pub fn put(&mut self, col: Column, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (k, v) = (key.into(), value.into());
        self.bytes = self.bytes.saturating_add(k.len() + v.len());
        self.ops.push(Op::Put(col, k, v));
    }

    /// Removes `key` from `col`.
    pub fn delete(&mut self, col: Column, key: impl Into<Vec<u8>>) {
        let k = key.into();
        self.bytes = self.bytes.saturating_add(k.len());
        self.ops.push(Op::Delete(col, k));
    }

    /// Removes every key of `col` in `[from, to)`.
    pub fn delete_range(&mut self, col: Column, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(col, from.into(), to.into()));
    }

    /// Asks the engine to make the batch durable (fsync the log) before `write` returns.
    /// Needed for consensus safety data; block commits rely on the write-ahead log.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Whether the batch must be fsynced.
    pub fn sync(&self) -> bool {
        self.sync
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Consumes the batch into its operations.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Estimated bytes it holds in memory: its list of operations and each key's and value's
    /// buffer (their capacities). What a block's staged state takes until it is kept.
    pub fn memory_bytes(&self) -> u64 {
        let list = self.ops.capacity() * std::mem::size_of::<Op>();
        self.ops.iter().fold(list as u64, |sum, op| {
            let bytes = match op {
                Op::Put(_, k, v) | Op::DeleteRange(_, k, v) => k.capacity() + v.capacity(),
                Op::Delete(_, k) => k.capacity(),
            };
            sum.saturating_add(bytes as u64)
        })
    }

    /// Approximate payload bytes (keys and values).
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }

    /// At most the bytes of the engine's serialized batch of these operations preceded by
    /// `layer`'s (RocksDB's write batch format: a 12-byte header, and per record its key and
    /// value with a tag, the column family id and the two lengths as varints). What the
    /// engine reserves for one write, and what it holds while the write lasts.
    pub fn serialized_bytes(&self, layer: Option<&crate::Layer>) -> usize {
        /// The header: sequence number and count.
        const HEADER: usize = 12;
        /// A tag and three varints of at most 5 bytes.
        const RECORD_OVERHEAD: usize = 1 + 5 + 5 + 5;
        let (layer_bytes, layer_ops) = layer.map_or((0, 0), |l| (l.op_bytes(), l.len()));
        self.bytes
            .saturating_add(layer_bytes)
            .saturating_add(
                self.len()
                    .saturating_add(layer_ops)
                    .saturating_mul(RECORD_OVERHEAD),
            )
            .saturating_add(HEADER)
    }

    /// Appends all operations of `other`.
    pub fn extend(&mut self, other: WriteBatch) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.sync |= other.sync;
        self.ops.extend(other.ops);
    }
}

/// Iteration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Ascending keys.
    Forward,
    /// Descending keys.
    Reverse,
}

/// An iterator over `(key, value)` pairs of one column.
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + 'a>;

/// An ordered, column-oriented key-value store with atomic batches.
pub trait KvStore: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, col: Column, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Reads many keys at once, answers in the order of `keys`. Engines that can batch point
    /// reads (RocksDB's MultiGet) override it; keys in ascending order read fastest.
    fn multi_get(&self, col: Column, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|k| self.get(col, k)).collect()
    }

    /// Applies a batch atomically.
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// Iterates keys in `[from, to)` (`to = None`: to the end of the column) in `dir` order.
    fn iter_range<'a>(
        &'a self,
        col: Column,
        from: &[u8],
        to: Option<&[u8]>,
        dir: Direction,
    ) -> KvIter<'a>;

    /// Writes `layer`'s operations (in [`crate::Layer::to_batch`]'s order) and then
    /// `batch`'s, atomically, as one write; `batch`'s sync flag applies. The default copies
    /// the layer into a batch first; an engine that can add borrowed operations to its own
    /// batch saves that copy of a block's state changes.
    fn write_layer(&self, layer: &crate::Layer, batch: WriteBatch) -> Result<()> {
        let mut all = layer.to_batch();
        all.extend(batch);
        self.write(all)
    }

    /// Asks the engine to reclaim space of deleted keys in `[from, to)` now (after pruning).
    fn compact_range(&self, col: Column, from: &[u8], to: &[u8]) -> Result<()>;

    /// Deletes every key of `col` in `[from, to)` and gives their space back now: for a range
    /// no reader needs any more and nothing writes into (pruned heights). No key may be
    /// stored under `to` itself. The default writes a range delete and compacts the range.
    fn drop_range(&self, col: Column, from: &[u8], to: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::new();
        batch.delete_range(col, from.to_vec(), to.to_vec());
        self.write(batch)?;
        self.compact_range(col, from, to)
    }

    /// Writes `col`'s buffered writes out to a table file now (engines without such buffers:
    /// nothing to do): after pruning, so that its deletions reach the table files the
    /// engine's deletion-triggered compactions look at instead of waiting in memory.
    fn flush_column(&self, _col: Column) -> Result<()> {
        Ok(())
    }

    /// Bytes of live table files of `col`, `None` for engines without table files.
    fn live_sst_bytes(&self, _col: Column) -> Option<u64> {
        None
    }

    /// The engine's estimate of the keys in `col`, `None` if it has none.
    fn estimate_keys(&self, _col: Column) -> Option<u64> {
        None
    }

    /// The engine's own activity counters (RocksDB's statistics), `None` for engines without.
    fn engine_stats(&self) -> Option<EngineStats> {
        None
    }

    /// Bytes the store takes on disk (0 for memory stores: see [`KvStore::memory_bytes`]).
    fn disk_size_bytes(&self) -> Result<u64>;

    /// Bytes the store holds in memory outside the allocator's view (RocksDB caches and
    /// memtables), for the memory budget.
    fn memory_bytes(&self) -> u64;

    /// Resizes the engine's cache to `bytes` (the memory governor shrinks it under pressure
    /// and gives it back after); engines without one ignore it.
    fn set_cache_capacity(&self, _bytes: u64) {}

    /// Iterates every key that starts with `prefix`, ascending.
    fn iter_prefix<'a>(&'a self, col: Column, prefix: &[u8]) -> KvIter<'a> {
        match prefix_end(prefix) {
            Some(end) => {
                let end_owned = end;
                self.iter_range(col, prefix, Some(&end_owned), Direction::Forward)
            }
            None => self.iter_range(col, prefix, None, Direction::Forward),
        }
    }

    /// Sets one key (a batch of one).
    fn put(&self, col: Column, key: &[u8], value: &[u8]) -> Result<()> {
        let mut b = WriteBatch::new();
        b.put(col, key, value);
        self.write(b)
    }
}

/// The smallest key greater than every key starting with `prefix`, if there is one.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
