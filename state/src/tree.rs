//! The versioned sparse Merkle tree (Jellyfish Merkle Tree style).
//!
//! Keys are 256-bit hashes. On disk the tree is 16-ary: an internal node has one slot per
//! nibble, and a leaf sits at the shortest nibble prefix that no other key shares. Hashing is
//! binary: an internal node's hash is a 4-level binary Merkle tree over its 16 slots in which
//! empty ranges hash to [`EMPTY_ROOT`] and a range holding a single leaf takes that leaf's
//! hash. The root is therefore the root of the canonical binary sparse Merkle tree of the key
//! set (every leaf lifted to its shortest unique *bit* prefix), independent of the history
//! of updates, and proofs are plain binary proofs (see [`verify_proof`]).
//!
//! Versioning: every node is written once, under `(version that created it, nibble path)`,
//! and never changed. Building version `v` writes only the nodes on changed paths; the nodes
//! it replaces are recorded in `Column::StateStale` under `v` so a pruner can delete them once
//! no version older than `v` is kept. Each version has a root pointer, also when nothing
//! changed, so every committed version's root can be read back.

mod node;
mod proof;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use keel_storage::{Column, KvStore, WriteBatch};
use keel_types::Hash;
use lru::LruCache;
use rayon::prelude::*;

pub use node::EMPTY_ROOT;
pub use proof::{verify_proof, Proof, ProofLeaf, MAX_PROOF_SIBLINGS};

use node::{
    decode_root_pointer, descend, encode_leaf, encode_root_pointer, leaf_hash, nibble, range_hash,
    root_pointer_key, ChildRef, Children, Internal, LeafNode, NibblePath, Node, NodeKey, PathEnd,
    MAX_NIBBLES,
};

use crate::{Error, FastMap, Result};

/// Leaves and deep internal nodes kept in the read cache by [`StateTree::new`] (the upper
/// levels have their own part, see [`UPPER_LEVELS`]).
pub const DEFAULT_NODE_CACHE: usize = 65_536;

/// Internal nodes whose path has at most this many nibbles form the "upper levels" of the
/// tree: at most 1 + 16 + 256 + 4,096 + 65,536 = 69,905 nodes in one version, dense from about
/// 100,000 keys on, and crossed by nearly every update. The node cache keeps them apart from
/// the leaves and deeper nodes (which a block reads once and would otherwise evict them).
pub const UPPER_LEVELS: usize = 4;

/// Subtrees with at least this many updates are built on the rayon pool, one task per child
/// slot. Below it the overhead of a task outweighs the hashing it saves.
const PARALLEL_UPDATES: usize = 256;

/// A node to read during `get_many`, with the sorted keys (and their positions) below it.
type Visit<'k> = (ChildRef, NibblePath, &'k [(Hash, usize)]);

/// Values found by a `get_many` walk, with the positions of their keys.
type Found = Vec<(usize, Vec<u8>)>;

/// One update, borrowed from the caller: `None` deletes.
type Update<'a> = (Hash, Option<&'a [u8]>);

/// The versioned sparse Merkle tree over a [`KvStore`].
///
/// Reads go through an LRU cache of decoded nodes. Only nodes read from the store are cached:
/// `apply` stages nodes that may never be committed (a proposal that loses), so it must not
/// leave them where a read could find them.
pub struct StateTree {
    store: Arc<dyn KvStore>,
    /// The node cache; possibly shared with other trees over views of the same database.
    cache: Arc<NodeCache>,
    /// Only nodes of versions up to this one go through the cache (all versions for a tree
    /// over the database itself; the final height for a tree over an overlay of pending
    /// blocks, whose own nodes are newer and must never reach a shared cache).
    cache_upto: u64,
}

/// Decoded nodes of committed versions, in two parts:
/// - the upper levels (nodes whose path has at most [`UPPER_LEVELS`] nibbles): one slot per
///   path, holding the newest committed node seen at that path. Every update crosses them,
///   so they are kept apart from the rest and never evicted by it, and a slot is found by
///   its path alone (no hashing, no allocation). Besides the nodes read from the store, each
///   committed version's new upper nodes enter it once the version is committed
///   ([`StateTree::cache_committed`]), so the next block finds the whole upper tree of the
///   latest version in memory however the blocks touch it;
/// - an LRU of the rest (leaves, deeper internal nodes, upper nodes of older versions read by
///   queries), split in [`CACHE_SHARDS`] independently locked shards so parallel readers
///   (block execution, subtree builds) rarely wait for each other.
///
/// Committed nodes never change (a key names its version), so one cache can serve every tree
/// reading the same database, including the throw-away trees over overlays of pending blocks
/// (see [`StateTree::with_shared_cache`]).
pub struct NodeCache {
    /// Allocated with the first upper node cached (a tree that never caches one, such as
    /// the pruner's, costs nothing).
    upper: std::sync::OnceLock<Box<[UpperSlot]>>,
    lower: Vec<Mutex<LruCache<NodeKey, Node>>>,
    /// Estimated bytes of the nodes held and their LRU entries ([`NodeCache::memory_bytes`]),
    /// kept as they come and go.
    held: std::sync::atomic::AtomicU64,
}

/// Bytes an LRU entry costs besides its node's own allocation: the boxed entry (key, node
/// handle, two links) and its hash-table bucket (a key pointer and an entry pointer, with the
/// table between half and seven-eighths full, plus its control byte).
const LRU_ENTRY_BYTES: u64 =
    (std::mem::size_of::<NodeKey>() + std::mem::size_of::<Node>() + 16 + 2 * 16 + 2) as u64;

type Shard<'a> = std::sync::MutexGuard<'a, LruCache<NodeKey, Node>>;

/// One path of the upper levels: the newest committed node seen there, with its version.
type UpperSlot = Mutex<Option<(u64, Node)>>;

impl NodeCache {
    /// A cache of the upper levels of the tree plus up to `nodes` other decoded nodes (at
    /// least one per shard).
    pub fn new(nodes: usize) -> NodeCache {
        let per_shard =
            NonZeroUsize::new(nodes.div_ceil(CACHE_SHARDS)).unwrap_or(NonZeroUsize::MIN);
        NodeCache {
            upper: std::sync::OnceLock::new(),
            held: std::sync::atomic::AtomicU64::new(0),
            // Grown as nodes come, not reserved for the capacity up front.
            lower: (0..CACHE_SHARDS)
                .map(|_| {
                    let mut shard = LruCache::unbounded();
                    shard.resize(per_shard);
                    Mutex::new(shard)
                })
                .collect(),
        }
    }

    /// Keeps at most `nodes` decoded nodes besides the upper levels (at least one per
    /// shard), evicting the least recently used at once when that is fewer than held.
    pub fn set_capacity(&self, nodes: usize) {
        let per_shard =
            NonZeroUsize::new(nodes.div_ceil(CACHE_SHARDS)).unwrap_or(NonZeroUsize::MIN);
        for i in 0..CACHE_SHARDS {
            let mut shard = self.shard(i);
            while shard.len() > per_shard.get() {
                if let Some((_, node)) = shard.pop_lru() {
                    self.release(LRU_ENTRY_BYTES + node.heap_bytes());
                }
            }
            shard.resize(per_shard);
        }
    }

    /// Estimated bytes the cache holds: its upper-level slots, every node in it (each
    /// node's own allocation, see [`Node::heap_bytes`]) and the LRU's entries. Kept as
    /// nodes come and go, so reading it takes no lock.
    pub fn memory_bytes(&self) -> u64 {
        let slots = self
            .upper
            .get()
            .map_or(0, |u| (u.len() * std::mem::size_of::<UpperSlot>()) as u64);
        slots.saturating_add(self.held.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn hold(&self, bytes: u64) {
        self.held
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn release(&self, bytes: u64) {
        // Never below zero, whatever the order of concurrent updates.
        let _ = self.held.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |h| Some(h.saturating_sub(bytes)),
        );
    }

    /// How many decoded nodes it may hold besides the upper levels.
    pub fn capacity(&self) -> usize {
        (0..CACHE_SHARDS).map(|i| self.shard(i).cap().get()).sum()
    }

    /// Nodes held now.
    pub fn len(&self) -> usize {
        let upper = (0..UPPER_SLOTS)
            .filter(|i| self.slot(*i).is_some_and(|s| s.is_some()))
            .count();
        upper
            + (0..CACHE_SHARDS)
                .map(|i| self.shard(i).len())
                .sum::<usize>()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, i: usize) -> Option<std::sync::MutexGuard<'_, Option<(u64, Node)>>> {
        // The cache holds only immutable, already-stored nodes, so a panic elsewhere while a
        // lock was held cannot have left it inconsistent.
        self.upper
            .get()?
            .get(i)
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// [`NodeCache::slot`], allocating the upper levels' slots the first time.
    fn slot_or_init(&self, i: usize) -> Option<std::sync::MutexGuard<'_, Option<(u64, Node)>>> {
        self.upper
            .get_or_init(|| (0..UPPER_SLOTS).map(|_| Mutex::new(None)).collect())
            .get(i)
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn shard(&self, i: usize) -> Shard<'_> {
        self.lower[i % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The LRU shard of a node: siblings (and the levels) spread over the shards.
    fn shard_of(&self, key: &NodeKey) -> Shard<'_> {
        self.shard(usize::from(key.path.last_nibble()) + key.path.len() * 5)
    }

    fn get(&self, key: &NodeKey) -> Option<Node> {
        if let Some(slot) = key.path.upper_index().and_then(|i| self.slot(i)) {
            if let Some((version, node)) = slot.as_ref() {
                if *version == key.version {
                    return Some(node.clone());
                }
            }
        }
        self.shard_of(key).get(key).cloned()
    }

    /// Caches a committed node: in its upper slot unless that holds a newer one, else in
    /// the LRU.
    fn put(&self, key: NodeKey, node: Node) {
        if let Some(mut slot) = key.path.upper_index().and_then(|i| self.slot_or_init(i)) {
            if slot.as_ref().is_none_or(|(v, _)| *v <= key.version) {
                self.hold(node.heap_bytes());
                let old = slot.replace((key.version, node));
                drop(slot);
                if let Some((_, old)) = old {
                    self.release(old.heap_bytes());
                }
                return;
            }
        }
        self.hold(LRU_ENTRY_BYTES + node.heap_bytes());
        let replaced = self.shard_of(&key).push(key, node);
        if let Some((_, old)) = replaced {
            self.release(LRU_ENTRY_BYTES + old.heap_bytes());
        }
    }

    fn clear(&self) {
        for i in 0..UPPER_SLOTS {
            if let Some(mut slot) = self.slot(i) {
                *slot = None;
            }
        }
        for i in 0..CACHE_SHARDS {
            self.shard(i).clear();
        }
        self.held.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Slots of the upper levels: one per path of at most [`UPPER_LEVELS`] nibbles.
const UPPER_SLOTS: usize = 69_905;

/// Nodes read by [`StateTree::get_many_for_update`] below the upper levels, for the
/// [`StateTree::apply_fresh`] that updates those keys: block execution reads every account it
/// touches, then stages them, and the second walk finds the nodes here.
#[derive(Default)]
pub struct ReadNodes {
    nodes: FastMap<NodeKey, Node>,
}

impl ReadNodes {
    /// Nodes held.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it holds no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Estimated bytes it holds: its table and each node's own allocation. Nodes read for an
    /// update below the upper levels are not cached, so they are this table's alone.
    pub fn memory_bytes(&self) -> u64 {
        let table = crate::table_bytes::<(NodeKey, Node)>(self.nodes.capacity());
        self.nodes
            .values()
            .fold(table, |sum, node| sum.saturating_add(node.heap_bytes()))
    }
}

impl std::fmt::Debug for ReadNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadNodes({} nodes)", self.nodes.len())
    }
}

/// The upper-level nodes a staged version wrote: what
/// [`StateTree::cache_committed`] needs once the version's batch is committed. Returned by
/// [`StateTree::apply_fresh`]; a version that is never committed just drops it.
#[derive(Default)]
pub struct FreshNodes {
    version: u64,
    written: Vec<(NodeKey, Node)>,
}

impl FreshNodes {
    /// The version these nodes belong to.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Upper-level nodes written.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    /// Whether the version wrote no upper-level node.
    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }

    /// Estimated bytes these nodes hold (their list and each node's own allocation).
    pub fn memory_bytes(&self) -> u64 {
        let list = (self.written.capacity() * std::mem::size_of::<(NodeKey, Node)>()) as u64;
        self.written
            .iter()
            .fold(list, |sum, (_, node)| sum.saturating_add(node.heap_bytes()))
    }
}

/// Shards of the node cache.
const CACHE_SHARDS: usize = 16;

/// A subtree as built by `apply`, before the parent decides where it goes.
enum Subtree<'a> {
    /// No keys.
    Empty,
    /// Exactly one key. Its node is written by whoever places it, since a leaf may move up
    /// when its siblings are deleted.
    Leaf(PendingLeaf<'a>),
    /// A node already stored (or staged) at `(version, path of this subtree)`.
    Stored(ChildRef),
}

/// A leaf whose final position is not decided yet.
struct PendingLeaf<'a> {
    key: Hash,
    value: LeafValue<'a>,
    hash: Hash,
    /// Where the leaf is stored already, if it is an existing, unchanged leaf.
    stored_at: Option<NodeKey>,
}

/// A pending leaf's value: an update's, or that of the stored leaf (shared, not copied).
enum LeafValue<'a> {
    New(&'a [u8]),
    Stored(Arc<LeafNode>),
}

impl LeafValue<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            LeafValue::New(v) => v,
            LeafValue::Stored(leaf) => &leaf.value,
        }
    }
}

/// Writes collected while building a subtree (one per rayon task, merged in slot order so the
/// batch is the same whatever the thread count).
#[derive(Default)]
struct Sink {
    nodes: Vec<(Vec<u8>, Vec<u8>)>,
    stale: Vec<Vec<u8>>,
    /// Upper-level nodes written (for the cache).
    fresh: Vec<(NodeKey, Node)>,
}

impl Sink {
    fn append(&mut self, other: Sink) {
        self.nodes.extend(other.nodes);
        self.stale.extend(other.stale);
        self.fresh.extend(other.fresh);
    }

    /// Records that the node at `key` is replaced by this version.
    fn replace(&mut self, key: NodeKey) {
        self.stale.push(key.encode());
    }
}

/// Sorts updates by key; of several updates to one key the last one wins.
fn normalize(updates: &[(Hash, Option<Vec<u8>>)]) -> Vec<Update<'_>> {
    let mut sorted: Vec<Update<'_>> = updates.iter().map(|(k, v)| (*k, v.as_deref())).collect();
    // Stable, so equal keys keep their input order and the last one is the latest.
    sorted.sort_by_key(|a| a.0);
    let mut out: Vec<Update<'_>> = Vec::with_capacity(sorted.len());
    for u in sorted {
        match out.last_mut() {
            Some(last) if last.0 == u.0 => *last = u,
            _ => out.push(u),
        }
    }
    out
}

/// Splits sorted updates sharing a `depth`-nibble prefix into runs by the nibble at `depth`.
fn group_by_nibble<'u, 'a>(updates: &'u [Update<'a>], depth: usize) -> Vec<(u8, &'u [Update<'a>])> {
    let mut groups = Vec::new();
    let mut rest = updates;
    while let Some(first) = rest.first() {
        let n = nibble(&first.0, depth);
        let end = rest.partition_point(|u| nibble(&u.0, depth) <= n);
        let (group, tail) = rest.split_at(end.max(1));
        groups.push((n, group));
        rest = tail;
    }
    groups
}

fn too_deep() -> Error {
    Error::Corrupt {
        what: "state tree",
        reason: "path longer than 64 nibbles".into(),
    }
}

impl StateTree {
    /// A tree over `store` with a read cache of [`DEFAULT_NODE_CACHE`] nodes.
    pub fn new(store: Arc<dyn KvStore>) -> StateTree {
        StateTree::with_cache_capacity(store, DEFAULT_NODE_CACHE)
    }

    /// A tree over `store` caching up to `nodes` decoded nodes (at least one).
    pub fn with_cache_capacity(store: Arc<dyn KvStore>, nodes: usize) -> StateTree {
        StateTree {
            store,
            cache: Arc::new(NodeCache::new(nodes)),
            cache_upto: u64::MAX,
        }
    }

    /// A tree over `store` (typically an overlay of pending blocks on the database) that
    /// reads and fills `cache` for nodes of versions up to `committed_upto` only: those are
    /// committed and immutable, so the cache can be the database tree's own. Newer nodes (the
    /// overlay's) are read from `store` every time and never cached.
    pub fn with_shared_cache(
        store: Arc<dyn KvStore>,
        cache: Arc<NodeCache>,
        committed_upto: u64,
    ) -> StateTree {
        StateTree {
            store,
            cache,
            cache_upto: committed_upto,
        }
    }

    /// This tree's node cache, to share with trees over overlays of the same database.
    pub fn node_cache(&self) -> Arc<NodeCache> {
        self.cache.clone()
    }

    fn cached(&self, key: &NodeKey) -> Option<Node> {
        (key.version <= self.cache_upto)
            .then(|| self.cache.get(key))
            .flatten()
    }

    fn remember(&self, key: NodeKey, node: &Node) {
        if key.version <= self.cache_upto {
            self.cache.put(key, node.clone());
        }
    }

    /// Empties the node cache. Only needed if a version is ever written twice with different
    /// contents (which a chain that commits only final blocks never does).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// The root hash of `version`; [`Error::VersionNotFound`] if it was never committed or
    /// has been pruned.
    pub fn root(&self, version: u64) -> Result<Hash> {
        Ok(self.root_ref(version)?.map_or(EMPTY_ROOT, |r| r.hash))
    }

    /// The value of `key` at `version`.
    pub fn get(&self, version: u64, key: &Hash) -> Result<Option<Vec<u8>>> {
        let Some(mut cur) = self.root_ref(version)? else {
            return Ok(None);
        };
        let mut path = NibblePath::ROOT;
        loop {
            let node_key = NodeKey {
                version: cur.version,
                path,
            };
            if cur.is_leaf {
                let leaf = self.load_leaf(&node_key)?;
                return Ok((leaf.key == *key).then(|| leaf.value.clone()));
            }
            let children = self.load_internal(&node_key)?;
            if path.len() >= MAX_NIBBLES {
                return Err(too_deep());
            }
            let n = nibble(key, path.len());
            match children.get(usize::from(n)).copied().flatten() {
                None => return Ok(None),
                Some(child) => {
                    cur = child;
                    path = path.child(n);
                }
            }
        }
    }

    /// The values of many keys at `version`, in the order of `keys`: the sorted keys walk
    /// down the tree level by level, each level's nodes read at once (node cache, then one
    /// batched store read for the rest), every node on their paths read once and the root
    /// pointer once; big batches are split across the rayon pool by key range. What block
    /// execution uses to load its accounts.
    pub fn get_many(&self, version: u64, keys: &[Hash]) -> Result<Vec<Option<Vec<u8>>>> {
        self.get_many_inner(version, keys, false)
            .map(|(values, _)| values)
    }

    /// [`StateTree::get_many`] for keys about to be updated: also returns the nodes read
    /// below the upper levels (leaves and deep internal nodes), which [`StateTree::apply_fresh`]
    /// then finds without reading them again. They are not put in the node cache: a block
    /// reads them once, and the cache's LRU bookkeeping cost more than the reads it saved.
    pub fn get_many_for_update(
        &self,
        version: u64,
        keys: &[Hash],
    ) -> Result<(Vec<Option<Vec<u8>>>, ReadNodes)> {
        self.get_many_inner(version, keys, true)
    }

    fn get_many_inner(
        &self,
        version: u64,
        keys: &[Hash],
        for_update: bool,
    ) -> Result<(Vec<Option<Vec<u8>>>, ReadNodes)> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        let mut read = ReadNodes::default();
        let Some(root) = self.root_ref(version)? else {
            return Ok((out, read));
        };
        let mut sorted: Vec<(Hash, usize)> = keys.iter().copied().zip(0..).collect();
        sorted.par_sort_unstable_by_key(|k| k.0);
        let parts = rayon::current_num_threads().saturating_mul(4).max(1);
        let chunk = sorted.len().div_ceil(parts).max(PARALLEL_UPDATES);
        let found: Vec<(Found, Vec<(NodeKey, Node)>)> = sorted
            .par_chunks(chunk)
            .map(|part| self.get_level_by_level(root, part, for_update))
            .collect::<Result<_>>()?;
        read.nodes
            .reserve(found.iter().map(|(_, nodes)| nodes.len()).sum());
        for (values, nodes) in found {
            for (i, value) in values {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(value);
                }
            }
            read.nodes.extend(nodes);
        }
        Ok((out, read))
    }

    /// The present values among sorted `keys` (with their positions), walking down from
    /// `root` one level at a time; and, `for_update`, the nodes read below the upper levels
    /// (which are then not cached).
    fn get_level_by_level(
        &self,
        root: ChildRef,
        keys: &[(Hash, usize)],
        for_update: bool,
    ) -> Result<(Found, Vec<(NodeKey, Node)>)> {
        let mut found = Vec::new();
        let mut read = Vec::new();
        let mut frontier: Vec<Visit<'_>> = vec![(root, NibblePath::ROOT, keys)];
        while !frontier.is_empty() {
            let node_keys: Vec<NodeKey> = frontier
                .iter()
                .map(|(c, path, _)| NodeKey {
                    version: c.version,
                    path: *path,
                })
                .collect();
            let nodes = self.load_many(&node_keys, !for_update)?;
            if for_update {
                read.extend(
                    node_keys
                        .iter()
                        .zip(&nodes)
                        .filter(|(k, _)| k.path.len() > UPPER_LEVELS)
                        .map(|(k, n)| (*k, n.clone())),
                );
            }
            let mut next = Vec::new();
            for ((child, path, group), node) in frontier.into_iter().zip(nodes) {
                match (node, child.is_leaf) {
                    (Node::Leaf(leaf), true) => found.extend(
                        group
                            .iter()
                            .filter(|k| k.0 == leaf.key)
                            .map(|k| (k.1, leaf.value.clone())),
                    ),
                    (Node::Internal(children), false) => {
                        let depth = path.len();
                        if depth >= MAX_NIBBLES {
                            return Err(too_deep());
                        }
                        let mut rest = group;
                        while let Some(first) = rest.first() {
                            let n = nibble(&first.0, depth);
                            let end = rest.partition_point(|k| nibble(&k.0, depth) <= n).max(1);
                            let (sub, tail) = rest.split_at(end);
                            if let Some(c) = children.get(usize::from(n)).copied().flatten() {
                                next.push((c, path.child(n), sub));
                            }
                            rest = tail;
                        }
                    }
                    _ => {
                        return Err(Error::Corrupt {
                            what: "state tree",
                            reason: "a node is not the kind its parent says".into(),
                        })
                    }
                }
            }
            frontier = next;
        }
        Ok((found, read))
    }

    /// Loads many nodes: from the cache where it has them, the rest in one batched store
    /// read (cached afterwards if `keep`, or if in the upper levels). Answers in the order
    /// of `keys`.
    fn load_many(&self, keys: &[NodeKey], keep: bool) -> Result<Vec<Node>> {
        let mut nodes: Vec<Option<Node>> = keys.iter().map(|k| self.cached(k)).collect();
        let mut missing: Vec<(Vec<u8>, usize)> = nodes
            .iter()
            .zip(keys)
            .enumerate()
            .filter(|(_, (n, _))| n.is_none())
            .map(|(i, (_, k))| (k.encode(), i))
            .collect();
        if !missing.is_empty() {
            missing.sort_unstable();
            let encoded: Vec<Vec<u8>> = missing.iter().map(|(k, _)| k.clone()).collect();
            let values = self.store.multi_get(Column::StateNodes, &encoded)?;
            for ((_, i), bytes) in missing.into_iter().zip(values) {
                let (Some(key), Some(bytes)) = (keys.get(i), bytes) else {
                    return Err(missing_node(keys.get(i)));
                };
                let node = Node::decode(&bytes)?;
                if keep || key.path.len() <= UPPER_LEVELS {
                    self.remember(*key, &node);
                }
                if let Some(slot) = nodes.get_mut(i) {
                    *slot = Some(node);
                }
            }
        }
        nodes
            .into_iter()
            .zip(keys)
            .map(|(n, k)| n.ok_or_else(|| missing_node(Some(k))))
            .collect()
    }

    /// The value of `key` at `version` and a proof of it (membership or non-membership)
    /// against [`StateTree::root`] of `version`.
    pub fn get_with_proof(&self, version: u64, key: &Hash) -> Result<(Option<Vec<u8>>, Proof)> {
        let mut siblings = Vec::new();
        let finish = |mut siblings: Vec<Hash>, leaf: Option<&LeafNode>| {
            siblings.reverse();
            let proof = Proof {
                leaf: leaf.map(|l| ProofLeaf {
                    key: l.key,
                    value_hash: Hash::digest(&l.value),
                }),
                siblings,
            };
            let value = leaf.filter(|l| l.key == *key).map(|l| l.value.clone());
            (value, proof)
        };
        let Some(mut cur) = self.root_ref(version)? else {
            return Ok(finish(siblings, None));
        };
        let mut path = NibblePath::ROOT;
        loop {
            let node_key = NodeKey {
                version: cur.version,
                path,
            };
            if cur.is_leaf {
                let leaf = self.load_leaf(&node_key)?;
                return Ok(finish(siblings, Some(&leaf)));
            }
            let children = self.load_internal(&node_key)?;
            if path.len() >= MAX_NIBBLES {
                return Err(too_deep());
            }
            let n = nibble(key, path.len());
            match descend(&children, n, &mut siblings) {
                PathEnd::Empty => return Ok(finish(siblings, None)),
                PathEnd::Leaf(child, slot) => {
                    let leaf = self.load_leaf(&NodeKey {
                        version: child.version,
                        path: path.child(slot),
                    })?;
                    return Ok(finish(siblings, Some(&leaf)));
                }
                PathEnd::Internal(child) => {
                    cur = child;
                    path = path.child(n);
                }
            }
        }
    }

    /// Builds `version` from `base` (`None` = the empty tree) by applying `updates` (a `None`
    /// value deletes the key; of several updates to one key the last wins) in one pass over
    /// the sorted keys: every changed node is computed and staged once. New nodes, the root
    /// pointer of `version` and the stale-node records go into `batch`; nothing is written to
    /// the store. Returns the new root hash.
    ///
    /// `base`'s nodes must be in the store (committed), and `version` must be newer than
    /// `base`. Write at most one batch per version: node keys contain the version.
    pub fn apply(
        &self,
        base: Option<u64>,
        version: u64,
        updates: &[(Hash, Option<Vec<u8>>)],
        batch: &mut WriteBatch,
    ) -> Result<Hash> {
        self.apply_fresh(base, version, updates, None, batch)
            .map(|(root, _)| root)
    }

    /// [`StateTree::apply`], also returning the upper-level nodes the version wrote: hand
    /// them to [`StateTree::cache_committed`] once `batch` is committed (and only then: a
    /// staged version may lose to another one of the same number).
    pub fn apply_fresh(
        &self,
        base: Option<u64>,
        version: u64,
        updates: &[(Hash, Option<Vec<u8>>)],
        read: Option<&ReadNodes>,
        batch: &mut WriteBatch,
    ) -> Result<(Hash, FreshNodes)> {
        let old_root = match base {
            Some(b) if b >= version => return Err(Error::BadVersion { base: b, version }),
            Some(b) => self.root_ref(b)?,
            None => None,
        };
        let updates = normalize(updates);
        let mut sink = Sink::default();
        let subtree = self.update(
            version,
            old_root,
            NibblePath::ROOT,
            &updates,
            read,
            &mut sink,
        )?;
        let new_root = match subtree {
            Subtree::Empty => None,
            Subtree::Leaf(leaf) => Some(place_leaf(leaf, NibblePath::ROOT, version, &mut sink)),
            Subtree::Stored(r) => Some(r),
        };
        if let Some(b) = base {
            // The old pointer is needed only while `b` is kept, exactly like a replaced node.
            sink.stale.push(root_pointer_key(b));
        }
        // In key order: RocksDB inserts a sorted run into its memtable much faster.
        let mut nodes = sink.nodes;
        nodes.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in nodes {
            batch.put(Column::StateNodes, k, v);
        }
        batch.put(
            Column::StateNodes,
            root_pointer_key(version),
            encode_root_pointer(new_root.as_ref()),
        );
        // One record per version listing every replaced key (length-prefixed): a single
        // write instead of one per node, which halves the keys a block commits.
        let mut stale = Vec::with_capacity(sink.stale.iter().map(|k| k.len() + 1).sum());
        for node_key in &sink.stale {
            // Node keys are at most 8 + 1 + 32 bytes.
            stale.push(node_key.len() as u8);
            stale.extend_from_slice(node_key);
        }
        batch.put(Column::StateStale, version.to_be_bytes().to_vec(), stale);
        let fresh = FreshNodes {
            version,
            written: sink.fresh,
        };
        Ok((new_root.map_or(EMPTY_ROOT, |r| r.hash), fresh))
    }

    /// Puts the upper levels written by a committed version into the node cache (each in
    /// the slot of its path, replacing the node of an older version), so the next version
    /// finds the upper levels of the tree in memory instead of reading back what the last
    /// one wrote. Call it only once the batch of `fresh.version()` is in the store. Ignored by
    /// a tree over an overlay for versions it does not cache.
    pub fn cache_committed(&self, fresh: FreshNodes) {
        if fresh.version > self.cache_upto {
            return;
        }
        fresh
            .written
            .into_par_iter()
            .with_min_len(1024)
            .for_each(|(key, node)| self.cache.put(key, node));
    }

    /// Recomputes the hash of every node reachable from `version`'s root and checks it
    /// against the hash its parent (or the root pointer) records, skipping nodes already in
    /// `checked` (nodes never change once written, so a walk of many versions hashes each
    /// node once). Returns the root hash and the number of nodes hashed;
    /// [`Error::VersionNotFound`] for a version not stored, [`Error::Corrupt`] naming the first
    /// node that is missing or does not hash to what its parent says.
    pub fn verify_version(
        &self,
        version: u64,
        checked: &mut std::collections::HashSet<Vec<u8>>,
    ) -> Result<(Hash, usize)> {
        let Some(root) = self.root_ref(version)? else {
            return Ok((EMPTY_ROOT, 0));
        };
        let mut hashed = 0;
        let mut stack = vec![(root, NibblePath::ROOT)];
        while let Some((r, path)) = stack.pop() {
            let key = NodeKey {
                version: r.version,
                path,
            };
            let encoded = key.encode();
            if checked.contains(&encoded) {
                continue;
            }
            let computed = if r.is_leaf {
                let leaf = self.load_leaf(&key)?;
                leaf_hash(&leaf.key, &Hash::digest(&leaf.value))
            } else {
                let node = self.load_internal(&key)?;
                for (slot, child) in (0u8..).zip(node.children.iter()) {
                    if let Some(child) = child {
                        stack.push((*child, path.child(slot)));
                    }
                }
                range_hash(&node.children, 0, 16)
            };
            if computed != r.hash {
                return Err(Error::Corrupt {
                    what: "state tree node",
                    reason: format!(
                        "node of version {} at depth {} (reached from version {version}) hashes \
                         to {computed}, its parent records {}",
                        r.version,
                        path.len(),
                        r.hash
                    ),
                });
            }
            checked.insert(encoded);
            hashed += 1;
        }
        Ok((root.hash, hashed))
    }

    /// Stages the deletion of everything only versions older than `keep_from` need: every
    /// node recorded stale by a version `<= keep_from`, and those records. Afterwards every
    /// version `>= keep_from` still reads in full and older roots answer
    /// [`Error::VersionNotFound`]. Returns the number of nodes deleted.
    pub fn stage_prune(&self, keep_from: u64, batch: &mut WriteBatch) -> Result<usize> {
        let deleted = self.stage_prune_stale(0, keep_from, batch)?;
        let (from, to) = stale_records_through(keep_from);
        batch.delete_range(Column::StateStale, from, to);
        Ok(deleted)
    }

    /// Stages the deletion of the nodes recorded stale by versions `from..=to` (not of the
    /// records: a pruner drops those, for every version it pruned, in one range at the end
    /// of its pass, [`stale_records_through`]): a bounded step of [`StateTree::stage_prune`].
    /// Once every version up to `keep_from` is done, versions `>= keep_from` still read in
    /// full. Returns the number of nodes deleted.
    pub fn stage_prune_stale(&self, from: u64, to: u64, batch: &mut WriteBatch) -> Result<usize> {
        let start = from.to_be_bytes();
        let end = to.saturating_add(1).to_be_bytes();
        let mut deleted = 0;
        for item in self.store.iter_range(
            Column::StateStale,
            &start,
            (to < u64::MAX).then_some(end.as_slice()),
            keel_storage::Direction::Forward,
        ) {
            let (_, list) = item?;
            let mut rest = list.as_slice();
            while let Some((&len, tail)) = rest.split_first() {
                let Some((node_key, tail)) = tail.split_at_checked(usize::from(len)) else {
                    return Err(Error::Corrupt {
                        what: "state stale index",
                        reason: format!("truncated record of {} bytes", list.len()),
                    });
                };
                batch.delete(Column::StateNodes, node_key.to_vec());
                deleted += 1;
                rest = tail;
            }
        }
        Ok(deleted)
    }

    /// Applies sorted, distinct `updates` to the subtree at `path` whose current node is
    /// `existing`.
    fn update<'a>(
        &self,
        version: u64,
        existing: Option<ChildRef>,
        path: NibblePath,
        updates: &[Update<'a>],
        read: Option<&ReadNodes>,
        sink: &mut Sink,
    ) -> Result<Subtree<'a>> {
        let Some(existing) = existing else {
            return self.build(version, path, updates, None, sink);
        };
        if updates.is_empty() {
            return Ok(Subtree::Stored(existing));
        }
        let node_key = NodeKey {
            version: existing.version,
            path,
        };
        if existing.is_leaf {
            let leaf = self.load_leaf_for_update(&node_key, read)?;
            let pending = PendingLeaf {
                key: leaf.key,
                value: LeafValue::Stored(leaf),
                hash: existing.hash,
                stored_at: Some(node_key),
            };
            return self.build(version, path, updates, Some(pending), sink);
        }
        let children = self.load_internal_for_update(&node_key, read)?;
        let depth = path.len();
        if depth >= MAX_NIBBLES {
            return Err(too_deep());
        }
        let jobs: Vec<(u8, &[Update<'a>], Option<ChildRef>)> = group_by_nibble(updates, depth)
            .into_iter()
            .map(|(n, group)| (n, group, children.get(usize::from(n)).copied().flatten()))
            .collect();
        let results = self.run_jobs(jobs, updates.len(), sink, |(n, group, child), sink| {
            self.update(version, child, path.child(n), group, read, sink)
                .map(|s| (n, s))
        })?;

        let unchanged = results.iter().all(|(n, s)| {
            let old = children.get(usize::from(*n)).copied().flatten();
            match (s, old) {
                (Subtree::Empty, None) => true,
                (Subtree::Stored(r), Some(o)) => *r == o,
                (Subtree::Leaf(l), Some(o)) => {
                    o.is_leaf
                        && l.stored_at
                            == Some(NodeKey {
                                version: o.version,
                                path: path.child(*n),
                            })
                }
                _ => false,
            }
        });
        if unchanged {
            return Ok(Subtree::Stored(existing));
        }
        self.make_internal(
            version,
            path,
            results,
            Some((node_key, &children)),
            read,
            sink,
        )
    }

    /// Builds the subtree at `path` holding the inserts of `updates` plus `extra` (an
    /// existing leaf, dropped if `updates` touches its key). Deletes of absent keys do nothing.
    fn build<'a>(
        &self,
        version: u64,
        path: NibblePath,
        updates: &[Update<'a>],
        extra: Option<PendingLeaf<'a>>,
        sink: &mut Sink,
    ) -> Result<Subtree<'a>> {
        // The update to the existing leaf's key, if any. Rewriting the same value keeps the
        // leaf (no new node); anything else replaces or deletes it.
        let mut extra_update: Option<&Update<'a>> = None;
        let extra = match extra {
            Some(e) => match updates.binary_search_by(|u| u.0.cmp(&e.key)) {
                Ok(i) if updates.get(i).and_then(|u| u.1) == Some(e.value.as_slice()) => {
                    extra_update = updates.get(i);
                    Some(e)
                }
                Ok(_) => {
                    if let Some(old) = e.stored_at {
                        sink.replace(old);
                    }
                    None
                }
                Err(_) => Some(e),
            },
            None => None,
        };
        let is_new_insert =
            |u: &Update<'a>| u.1.is_some() && extra_update.is_none_or(|x| x.0 != u.0);
        let inserts =
            updates.iter().filter(|u| is_new_insert(u)).count() + usize::from(extra.is_some());
        match inserts {
            0 => return Ok(Subtree::Empty),
            1 => {
                if let Some(e) = extra {
                    return Ok(Subtree::Leaf(e));
                }
                if let Some((key, Some(value))) = updates.iter().find(|u| is_new_insert(u)) {
                    let hash = leaf_hash(key, &Hash::digest(value));
                    return Ok(Subtree::Leaf(PendingLeaf {
                        key: *key,
                        value: LeafValue::New(value),
                        hash,
                        stored_at: None,
                    }));
                }
                return Ok(Subtree::Empty);
            }
            _ => {}
        }
        let depth = path.len();
        if depth >= MAX_NIBBLES {
            return Err(too_deep());
        }
        let mut jobs: Vec<(u8, &[Update<'a>], Option<PendingLeaf<'a>>)> =
            group_by_nibble(updates, depth)
                .into_iter()
                .map(|(n, group)| (n, group, None))
                .collect();
        if let Some(e) = extra {
            let n = nibble(&e.key, depth);
            match jobs.iter_mut().find(|j| j.0 == n) {
                Some(job) => job.2 = Some(e),
                None => jobs.push((n, &[], Some(e))),
            }
        }
        let results = self.run_jobs(jobs, updates.len(), sink, |(n, group, e), sink| {
            self.build(version, path.child(n), group, e, sink)
                .map(|s| (n, s))
        })?;
        self.make_internal(version, path, results, None, None, sink)
    }

    /// Runs one job per child slot, on the rayon pool when the subtree is big enough, and
    /// returns the results in job order with their writes appended to `sink` in that order.
    fn run_jobs<'a, J, F>(
        &self,
        jobs: Vec<J>,
        updates: usize,
        sink: &mut Sink,
        f: F,
    ) -> Result<Vec<(u8, Subtree<'a>)>>
    where
        J: Send,
        F: Fn(J, &mut Sink) -> Result<(u8, Subtree<'a>)> + Sync + Send,
    {
        if updates < PARALLEL_UPDATES || jobs.len() < 2 {
            return jobs.into_iter().map(|j| f(j, sink)).collect();
        }
        let done: Vec<((u8, Subtree<'a>), Sink)> = jobs
            .into_par_iter()
            .map(|j| {
                let mut local = Sink::default();
                f(j, &mut local).map(|r| (r, local))
            })
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(done.len());
        for (r, local) in done {
            sink.append(local);
            out.push(r);
        }
        Ok(out)
    }

    /// Turns the child subtrees of `changed` slots (the other slots keep `old`'s children, or
    /// are empty for a new node) into the subtree at `path`: nothing, a single leaf moving
    /// up, or a new internal node staged at `(version, path)`. `old` is the node it replaces
    /// (whose binary hashes the new node may reuse).
    fn make_internal<'a>(
        &self,
        version: u64,
        path: NibblePath,
        changed: Vec<(u8, Subtree<'a>)>,
        old: Option<(NodeKey, &Internal)>,
        read: Option<&ReadNodes>,
        sink: &mut Sink,
    ) -> Result<Subtree<'a>> {
        let mut children: Children = old.map_or([None; 16], |(_, node)| node.children);
        // Leaves whose place is decided here; their slots stay `None` until then.
        let mut pending: Vec<(usize, PendingLeaf<'a>)> = Vec::new();
        for (n, s) in changed {
            // n < 16: it is a nibble.
            let i = usize::from(n & 0x0f);
            let Some(slot) = children.get_mut(i) else {
                continue;
            };
            *slot = match s {
                Subtree::Empty => None,
                Subtree::Stored(r) => Some(r),
                Subtree::Leaf(l) => {
                    pending.push((i, l));
                    None
                }
            };
        }
        let stored = children.iter().flatten().count();
        if stored + pending.len() <= 1 {
            // Nothing, or a single leaf, is left: the caller places it (at this path or
            // higher). A single internal child still needs this node above it.
            let single_stored_leaf = children
                .iter()
                .enumerate()
                .find_map(|(i, c)| c.filter(|c| c.is_leaf).map(|c| (i, c)));
            let moved = match (pending.pop(), single_stored_leaf) {
                (Some((_, leaf)), _) => Some(Subtree::Leaf(leaf)),
                (None, Some((i, r))) => {
                    let at = NodeKey {
                        version: r.version,
                        // i < 16, so it fits in a nibble.
                        path: path.child((i & 0x0f) as u8),
                    };
                    let leaf = self.load_leaf_for_update(&at, read)?;
                    Some(Subtree::Leaf(PendingLeaf {
                        key: leaf.key,
                        value: LeafValue::Stored(leaf),
                        hash: r.hash,
                        stored_at: Some(at),
                    }))
                }
                (None, None) if stored == 0 => Some(Subtree::Empty),
                (None, None) => None,
            };
            if let Some(subtree) = moved {
                if let Some((old, _)) = old {
                    sink.replace(old);
                }
                return Ok(subtree);
            }
        }
        for (i, leaf) in pending {
            if let Some(slot) = children.get_mut(i) {
                // i < 16, so it fits in a nibble.
                *slot = Some(place_leaf(
                    leaf,
                    path.child((i & 0x0f) as u8),
                    version,
                    sink,
                ));
            }
        }
        let (internal, hash) = Internal::build(
            children,
            old.map(|(_, node)| node),
            path.len() <= UPPER_LEVELS,
        );
        let node = Node::Internal(Arc::new(internal));
        let key = NodeKey { version, path };
        sink.nodes.push((key.encode(), node.encode()));
        if path.len() <= UPPER_LEVELS {
            sink.fresh.push((key, node));
        }
        if let Some((old, _)) = old {
            sink.replace(old);
        }
        Ok(Subtree::Stored(ChildRef {
            version,
            hash,
            is_leaf: false,
        }))
    }

    /// The root node of `version` (`None` for the empty tree).
    fn root_ref(&self, version: u64) -> Result<Option<ChildRef>> {
        match self
            .store
            .get(Column::StateNodes, &root_pointer_key(version))?
        {
            None => Err(Error::VersionNotFound(version)),
            Some(bytes) => decode_root_pointer(&bytes),
        }
    }

    /// Reads a node through the cache. `keep` says whether a node read from the store is
    /// cached: always for reads; for `apply` only in the upper levels, since the leaves and
    /// deep nodes an update reads were either just read by the block's execution (and so are
    /// cached already) or are read once, and caching them would only churn the cache.
    fn load(&self, key: &NodeKey, keep: bool) -> Result<Node> {
        if let Some(node) = self.cached(key) {
            return Ok(node);
        }
        let bytes = self
            .store
            .get(Column::StateNodes, &key.encode())?
            .ok_or_else(|| missing_node(Some(key)))?;
        let node = Node::decode(&bytes)?;
        if keep || key.path.len() <= UPPER_LEVELS {
            self.remember(*key, &node);
        }
        Ok(node)
    }

    fn load_leaf(&self, key: &NodeKey) -> Result<Arc<LeafNode>> {
        as_leaf(self.load(key, true)?)
    }

    fn load_internal(&self, key: &NodeKey) -> Result<Arc<Internal>> {
        as_internal(self.load(key, true)?)
    }

    fn load_for_update(&self, key: &NodeKey, read: Option<&ReadNodes>) -> Result<Node> {
        match read.and_then(|r| r.nodes.get(key)) {
            Some(node) => Ok(node.clone()),
            None => self.load(key, false),
        }
    }

    fn load_leaf_for_update(
        &self,
        key: &NodeKey,
        read: Option<&ReadNodes>,
    ) -> Result<Arc<LeafNode>> {
        as_leaf(self.load_for_update(key, read)?)
    }

    fn load_internal_for_update(
        &self,
        key: &NodeKey,
        read: Option<&ReadNodes>,
    ) -> Result<Arc<Internal>> {
        as_internal(self.load_for_update(key, read)?)
    }
}

fn as_leaf(node: Node) -> Result<Arc<LeafNode>> {
    match node {
        Node::Leaf(leaf) => Ok(leaf),
        Node::Internal(_) => Err(Error::Corrupt {
            what: "state tree",
            reason: "expected a leaf".into(),
        }),
    }
}

fn as_internal(node: Node) -> Result<Arc<Internal>> {
    match node {
        Node::Internal(children) => Ok(children),
        Node::Leaf(_) => Err(Error::Corrupt {
            what: "state tree",
            reason: "expected an internal node".into(),
        }),
    }
}

fn missing_node(key: Option<&NodeKey>) -> Error {
    Error::Corrupt {
        what: "state tree",
        reason: match key {
            Some(k) => format!(
                "missing node at version {} depth {}",
                k.version,
                k.path.len()
            ),
            None => "missing node".into(),
        },
    }
}

/// Stages `leaf` at `(version, path)` unless it is stored there already, and returns the
/// parent's reference to it.
fn place_leaf(leaf: PendingLeaf<'_>, path: NibblePath, version: u64, sink: &mut Sink) -> ChildRef {
    if let Some(at) = leaf.stored_at {
        if at.path == path {
            return ChildRef {
                version: at.version,
                hash: leaf.hash,
                is_leaf: true,
            };
        }
        sink.replace(at);
    }
    let key = NodeKey { version, path };
    sink.nodes
        .push((key.encode(), encode_leaf(&leaf.key, leaf.value.as_slice())));
    if path.len() <= UPPER_LEVELS {
        let node = match leaf.value {
            LeafValue::Stored(stored) => stored,
            LeafValue::New(value) => Arc::new(LeafNode {
                key: leaf.key,
                value: value.to_vec(),
            }),
        };
        sink.fresh.push((key, Node::Leaf(node)));
    }
    ChildRef {
        version,
        hash: leaf.hash,
        is_leaf: true,
    }
}

/// The `Column::StateStale` key range `[from, to)` of the records of every version up to
/// `version` (inclusive). `to` is one byte longer than any record key, so no record is ever
/// stored under it (an engine may treat table files that end at `to` as inside the range).
pub fn stale_records_through(version: u64) -> (Vec<u8>, Vec<u8>) {
    let mut to = version.to_be_bytes().to_vec();
    to.push(0);
    (Vec::new(), to)
}

#[cfg(test)]
mod tests;
