//! keel's state tree against Penumbra's Jellyfish Merkle Tree (the `jmt` crate), both hashing
//! with blake3, on the same updates to trees of the same size, in one criterion run.
//!
//! Setup (not timed): `K` keys (`KEEL_BENCH_KEYS`, default 1,000,000), key `i` =
//! blake3(`i` as u64 LE), each with a 40-byte value (the size of an encoded account), written
//! as version 0 of both trees. Then each iteration draws a batch of `B` updates
//! (`KEEL_BENCH_BATCH`, default 10,000) to existing keys chosen uniformly at random (ChaCha8,
//! fixed seed: the two functions of a pair see the same sequence of batches) with new 40-byte
//! values, and applies it as the next version, new root included.
//!
//! What is inside each timed region:
//! * `keel`: `StateTree::apply_fresh(Some(v - 1), v, ..)`: sorting the batch, reading the
//!   nodes on the changed paths (through the tree's LRU of decoded nodes, default size, backed
//!   by `MemStore`, which keeps encoded nodes), hashing, encoding the new nodes and stale
//!   records into a `WriteBatch`, the root; and, once the batch is written,
//!   `StateTree::cache_committed` (the upper levels it wrote go into the node cache, as the
//!   node does for every final block). keel builds big subtrees on the rayon pool (all cores);
//!   `RAYON_NUM_THREADS=1` measures it single-threaded like jmt.
//! * `jmt`: `JellyfishMerkleTree::put_value_set(batch, v)` (what Penumbra calls per block): one
//!   `put` per key through jmt's tree cache, then the root and the `TreeUpdateBatch` (new nodes,
//!   values, stale indices). The store is jmt's own in-memory `MockTreeStore` (feature `mocks`):
//!   a `HashMap` of *decoded* nodes, so jmt pays a clone per node read but never decodes,
//!   whereas keel decodes on an LRU miss. It is the crate's reference in-memory store and the
//!   closest equivalent of keel's `MemStore`.
//! * `jmt-batch`: the same with `batch_put_value_sets` (jmt's one-pass batch insert over the
//!   sorted keys, the closer algorithm to keel's `apply`).
//! * `keel+write` / `jmt+write`: the same as `keel` / `jmt` plus writing the produced batch
//!   into the store.
//!
//! Outside every timed region: drawing the batch, converting it to jmt's input type
//! (`KeyHash`, owned values), writing the batch (except in `+write`), and pruning the version
//! just superseded from both stores (keel: `StateTree::stage_prune`; jmt:
//! `MockTreeStore::purge_stale_nodes`), so the stores hold one version of `K` keys throughout
//! and memory stays flat however many iterations criterion runs (checked at the end: both
//! stores hold exactly as many nodes as after the setup). Both run on jemalloc, the allocator
//! of the keel binary.
//!
//! `cargo bench -p keel-state --bench trie`; quick: `KEEL_BENCH_KEYS=100000 cargo bench ...`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use jmt::mock::MockTreeStore;
use jmt::{JellyfishMerkleTree, KeyHash, OwnedValue, SimpleHasher};
use keel_state::StateTree;
use keel_storage::{Column, Direction, KvStore, MemStore, WriteBatch};
use keel_types::Hash;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// The allocator of the keel binary (cli/src/main.rs), for both trees.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes per value: about a prost-encoded account.
const VALUE_LEN: usize = 40;
/// Seed of the update sequences (xor the stream number, see [`Batches`]).
const SEED: u64 = 0x6b65_656c;

/// blake3 as jmt's hasher (jmt ships only sha2 as a default choice).
struct Blake3Hasher(blake3::Hasher);

impl SimpleHasher for Blake3Hasher {
    fn new() -> Self {
        Blake3Hasher(blake3::Hasher::new())
    }

    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn finalize(self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

type Jmt<'a> = JellyfishMerkleTree<'a, MockTreeStore, Blake3Hasher>;
type Updates = Vec<(Hash, Option<Vec<u8>>)>;

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(s) => s
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a positive integer, got {s:?}")),
        Err(_) => default,
    }
}

/// The value of key `index` written by the `nonce`th batch that touches it (0 = setup).
fn value(index: u64, nonce: u64) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&nonce.to_le_bytes());
    let mut v = vec![0; VALUE_LEN];
    h.finalize_xof().fill(&mut v);
    v
}

/// A seeded sequence of update batches. The functions compared (`keel` and `jmt`, `keel+write`
/// and `jmt+write`) use the same `stream`, so they apply the same batches; each function keeps
/// one sequence across all the calls criterion makes. Values come from `(stream, batch)` and
/// so never repeat in one tree: every update really changes its leaf (keel keeps a leaf whose
/// value is rewritten unchanged, which would make such updates nearly free).
struct Batches<'k> {
    keys: &'k [Hash],
    size: usize,
    rng: ChaCha8Rng,
    stream: u64,
    nonce: u64,
}

impl<'k> Batches<'k> {
    fn new(keys: &'k [Hash], size: usize, stream: u64) -> Self {
        Batches {
            keys,
            size,
            rng: ChaCha8Rng::seed_from_u64(SEED ^ stream),
            stream,
            nonce: 0,
        }
    }

    fn next_batch(&mut self) -> Updates {
        self.nonce += 1;
        let nonce = (self.stream << 32) | self.nonce;
        (0..self.size)
            .map(|_| {
                let i = self.rng.gen_range(0..self.keys.len());
                (self.keys[i], Some(value(i as u64, nonce)))
            })
            .collect()
    }
}

fn to_jmt(updates: Updates) -> Vec<(KeyHash, Option<OwnedValue>)> {
    updates
        .into_iter()
        .map(|(k, v)| (KeyHash(k.0), v))
        .collect()
}

/// keel's tree over an in-memory store, and its latest version.
struct KeelSide {
    store: MemStore,
    tree: StateTree,
    version: u64,
}

impl KeelSide {
    fn new(initial: &Updates) -> Self {
        let store = MemStore::new();
        let tree = StateTree::new(Arc::new(store.clone()));
        let mut batch = WriteBatch::new();
        tree.apply(None, 0, initial, &mut batch)
            .expect("keel: build version 0");
        store.write(batch).expect("keel: write version 0");
        KeelSide {
            store,
            tree,
            version: 0,
        }
    }

    /// Applies `updates` as the next version; times the apply (and the write if `with_write`).
    fn step(&mut self, updates: &Updates, with_write: bool) -> Duration {
        let v = self.version + 1;
        let mut batch = WriteBatch::new();
        let start = Instant::now();
        let (root, fresh) = self
            .tree
            .apply_fresh(Some(self.version), v, updates, None, &mut batch)
            .expect("keel: apply");
        let mut elapsed = start.elapsed();
        black_box(root);
        if with_write {
            let start = Instant::now();
            self.store.write(batch).expect("keel: write");
            elapsed += start.elapsed();
        } else {
            self.store.write(batch).expect("keel: write");
        }
        // What the node does once a block is committed (timed: it is the tree's work).
        let start = Instant::now();
        self.tree.cache_committed(fresh);
        elapsed += start.elapsed();
        self.version = v;
        self.prune();
        elapsed
    }

    /// `StateNodes` entries: the nodes of the kept versions and their root pointers.
    fn entries(&self) -> usize {
        self.store
            .iter_range(Column::StateNodes, &[], None, Direction::Forward)
            .count()
    }

    /// Deletes every node only older versions need (what keel's pruner does).
    fn prune(&self) {
        let mut batch = WriteBatch::new();
        self.tree
            .stage_prune(self.version, &mut batch)
            .expect("keel: stage prune");
        self.store.write(batch).expect("keel: prune");
    }
}

/// jmt over its in-memory store, and its latest version.
struct JmtSide {
    store: MockTreeStore,
    version: u64,
}

impl JmtSide {
    fn new(initial: &Updates) -> Self {
        let store = MockTreeStore::default();
        let kvs: Vec<(KeyHash, OwnedValue)> = initial
            .iter()
            .map(|(k, v)| (KeyHash(k.0), v.clone().expect("setup values are present")))
            .collect();
        let (_, batch) = Jmt::new(&store)
            .batch_put_value_sets(vec![kvs], None, 0)
            .expect("jmt: build version 0");
        store
            .write_tree_update_batch(batch)
            .expect("jmt: write version 0");
        JmtSide { store, version: 0 }
    }

    /// Applies `updates` as the next version with `put_value_set` (or `batch_put_value_sets`
    /// if `one_pass`); times the apply (and the write if `with_write`).
    fn step(&mut self, updates: Updates, one_pass: bool, with_write: bool) -> Duration {
        let v = self.version + 1;
        let tree = Jmt::new(&self.store);
        let (root, batch, mut elapsed) = if one_pass {
            let kvs: Vec<(KeyHash, OwnedValue)> = to_jmt(updates)
                .into_iter()
                .map(|(k, v)| (k, v.expect("updates only")))
                .collect();
            let start = Instant::now();
            let (roots, batch) = tree
                .batch_put_value_sets(vec![kvs], None, v)
                .expect("jmt: batch_put_value_sets");
            let elapsed = start.elapsed();
            (roots[0], batch, elapsed)
        } else {
            let kvs = to_jmt(updates);
            let start = Instant::now();
            let (root, batch) = tree.put_value_set(kvs, v).expect("jmt: put_value_set");
            (root, batch, start.elapsed())
        };
        black_box(root);
        if with_write {
            let start = Instant::now();
            self.store
                .write_tree_update_batch(batch)
                .expect("jmt: write");
            elapsed += start.elapsed();
        } else {
            self.store
                .write_tree_update_batch(batch)
                .expect("jmt: write");
        }
        self.version = v;
        self.store.purge_stale_nodes(v).expect("jmt: prune");
        elapsed
    }
}

fn trie(c: &mut Criterion) {
    let n_keys = env_usize("KEEL_BENCH_KEYS", 1_000_000);
    let batch_size = env_usize("KEEL_BENCH_BATCH", 10_000);
    assert!(n_keys > 0 && batch_size > 0, "empty tree or batch");

    let keys: Vec<Hash> = (0..n_keys as u64)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let initial: Updates = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, Some(value(i as u64, 0))))
        .collect();
    let mut keel_side = KeelSide::new(&initial);
    let mut jmt_side = JmtSide::new(&initial);
    drop(initial);
    let sizes = (keel_side.entries(), jmt_side.store.num_nodes());

    // Both jmt entry points must agree (checked on a throwaway batch, nothing written).
    {
        let probe = to_jmt(Batches::new(&keys, batch_size, 0).next_batch());
        let one_pass: Vec<(KeyHash, OwnedValue)> = probe
            .iter()
            .map(|(k, v)| (*k, v.clone().expect("updates only")))
            .collect();
        let tree = Jmt::new(&jmt_side.store);
        let (a, _) = tree.put_value_set(probe, 1).expect("jmt: probe");
        let (b, _) = tree
            .batch_put_value_sets(vec![one_pass], None, 1)
            .expect("jmt: probe");
        assert_eq!(
            a, b[0],
            "jmt: put_value_set and batch_put_value_sets disagree"
        );
    }

    let mut group = c.benchmark_group("trie");
    group.sampling_mode(SamplingMode::Flat);
    group.throughput(Throughput::Elements(batch_size as u64));

    let mut batches = Batches::new(&keys, batch_size, 0);
    group.bench_function(BenchmarkId::new("keel", batch_size), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| keel_side.step(&batches.next_batch(), false))
                .sum()
        })
    });
    let mut batches = Batches::new(&keys, batch_size, 0);
    group.bench_function(BenchmarkId::new("jmt", batch_size), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| jmt_side.step(batches.next_batch(), false, false))
                .sum()
        })
    });
    let mut batches = Batches::new(&keys, batch_size, 1);
    group.bench_function(BenchmarkId::new("jmt-batch", batch_size), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| jmt_side.step(batches.next_batch(), true, false))
                .sum()
        })
    });
    let mut batches = Batches::new(&keys, batch_size, 2);
    group.bench_function(BenchmarkId::new("keel+write", batch_size), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| keel_side.step(&batches.next_batch(), true))
                .sum()
        })
    });
    let mut batches = Batches::new(&keys, batch_size, 2);
    group.bench_function(BenchmarkId::new("jmt+write", batch_size), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| jmt_side.step(batches.next_batch(), false, true))
                .sum()
        })
    });
    group.finish();

    // Pruning kept one version in each store: updates to existing keys leave the shape of
    // both trees alone, so both must hold exactly as many nodes as after the setup.
    assert_eq!(
        (keel_side.entries(), jmt_side.store.num_nodes()),
        sizes,
        "(keel, jmt) stored nodes"
    );
}

criterion_group! {
    name = benches;
    // Iterations are slow (a whole batch each) and carry untimed work (drawing, writing,
    // pruning), so: few samples, short windows. Command-line flags override these.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5));
    targets = trie
}
criterion_main!(benches);
