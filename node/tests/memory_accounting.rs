//! The memory each budgeted consumer reports (`keel_memory_used_bytes{consumer}`) against
//! what it really allocates, measured by a counting allocator: the state-tree node cache
//! (`NodeCache::memory_bytes`), the signature cache (entries times `SIG_ENTRY_BYTES`), the
//! mempool (`Mempool::memory_bytes`: the sum of `held_bytes`, tables as they are) and the staged state of a pending block
//! (`Layer::memory_bytes`, the largest part of the `blocks` consumer), and what a block being
//! executed holds until it is kept (the tree nodes read for its update,
//! `ReadNodes::memory_bytes`, and its staged batch, `WriteBatch::memory_bytes`). Each estimate must be within 25% of
//! the bytes allocated while the consumer filled (the governor sizes caches by them, and the
//! memory dashboard adds them up against jemalloc's allocated bytes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use keel_node::memory::SIG_ENTRY_BYTES;
use keel_node::mempool::{Mempool, MempoolLimits};
use keel_state::{NodeCache, SigCache, StateTree};
use keel_storage::{KvStore, Layer, MemStore, WriteBatch};
use keel_types::{Address, Hash, Keypair, Transaction, TxKind};

/// The system allocator, counting the bytes each thread has allocated and not freed while
/// that thread counts, each allocation at jemalloc's size class for its size (what jemalloc's
/// `allocated` statistic, the figure the consumers are reported against in `keel`, counts).
/// Tests run on several threads: each measures only its own.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static NET: Cell<i64> = const { Cell::new(0) };
}

fn record(delta: i64) {
    // `try_with`: thread-local storage may already be gone while a thread exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = NET.try_with(|n| n.set(n.get() + delta));
        }
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping allocates nothing.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(size_class(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(-size_class(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(size_class(new_size) - size_class(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn size_class(size: usize) -> i64 {
    keel_node::units::allocation_size(size) as i64
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Net bytes this thread allocated while running `f`, and what `f` returned.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (i64, T) {
    NET.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    (NET.with(Cell::get), out)
}

fn assert_close(what: &str, reported: u64, allocated: i64) {
    let ratio = reported as f64 / allocated as f64;
    eprintln!("{what}: reports {reported} bytes, allocated {allocated} (ratio {ratio:.2})");
    assert!(
        (0.75..=1.25).contains(&ratio),
        "{what}: reports {reported} bytes, allocated {allocated} (ratio {ratio:.2})"
    );
}

/// Spread keys (splitmix64 of `i`, four times).
fn key(i: u64) -> Hash {
    let mut out = [0u8; 32];
    let mut x = i;
    for chunk in out.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    Hash(out)
}

/// A store holding version 1 of a tree of 20,000 account-sized leaves (and the internal
/// nodes above them), and a tree over it that caches (almost) nothing.
fn committed_accounts() -> (Arc<dyn KvStore>, StateTree) {
    let store: Arc<dyn KvStore> = Arc::new(MemStore::new());
    let tree = StateTree::with_cache_capacity(store.clone(), 1);
    let accounts: Vec<(Hash, Option<Vec<u8>>)> = (0..20_000u64)
        .map(|i| (key(i), Some(vec![7u8; 60])))
        .collect();
    let mut batch = WriteBatch::new();
    tree.apply(None, 1, &accounts, &mut batch).unwrap();
    store.write(batch).unwrap();
    (store, tree)
}

/// The state changes of a block of 2,000 transfers: 4,000 of those accounts rewritten.
fn block_updates() -> Vec<(Hash, Option<Vec<u8>>)> {
    (0..4_000u64)
        .map(|i| (key(i * 5), Some(vec![8u8; 60])))
        .collect()
}

/// [`allocated_by`] for work that runs on rayon: on a pool of one thread, the one `f` runs
/// on, so the counter sees all of it.
fn on_one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> (i64, T) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| allocated_by(f))
}

#[test]
fn the_node_cache_reports_what_its_nodes_take() {
    let (store, _) = committed_accounts();

    let cache = Arc::new(NodeCache::new(1 << 20));
    let reader = StateTree::with_shared_cache(store.clone(), cache.clone(), 1);
    let empty = cache.memory_bytes();
    let (allocated, ()) = allocated_by(|| {
        for i in 0..20_000u64 {
            assert!(reader.get(1, &key(i)).unwrap().is_some());
        }
    });
    assert!(cache.len() > 20_000, "{} nodes cached", cache.len());
    assert_close("node cache", cache.memory_bytes() - empty, allocated);

    // Shrinking takes the evicted nodes out of the figure as their memory is freed.
    let before = cache.memory_bytes();
    let (freed, ()) = allocated_by(|| cache.set_capacity(1_000));
    assert_close("node cache shrink", before - cache.memory_bytes(), -freed);
}

#[test]
fn the_signature_cache_reports_what_its_entries_take() {
    let cache = SigCache::new(1 << 20);
    let hashes: Vec<Hash> = (0..100_000u64).map(key).collect();
    let (allocated, ()) = allocated_by(|| cache.insert_all(&hashes));
    assert_close(
        "signature cache",
        cache.len() as u64 * SIG_ENTRY_BYTES,
        allocated,
    );
}

/// Fills a pool with `per_sender` pending transfers from each of `senders` senders and
/// checks what it reports against what it allocated.
fn check_mempool(senders: u64, per_sender: u64) {
    let chain = "keel-memory-test";
    let mut pool = Mempool::new(
        MempoolLimits {
            max_txs: 1 << 20,
            max_bytes: 1 << 30,
        },
        chain.to_string(),
        1,
    );
    let txs: Vec<Transaction> = (0..senders)
        .flat_map(|s| {
            let key = Keypair::from_seed(s + 1);
            (0..per_sender).map(move |n| {
                Transaction::sign(
                    &key,
                    chain,
                    n,
                    10,
                    TxKind::Transfer {
                        to: Address([9; 20]),
                        amount: 1,
                    },
                )
            })
        })
        .collect();
    // The transactions are decoded before they reach the pool (admission): only what the
    // pool adds to them is counted, so the measured bytes are the pool's indexes plus the
    // transactions themselves, moved in.
    let own: i64 = txs
        .iter()
        .map(|t| size_class(t.bytes.capacity()) + size_class(t.chain_id.capacity()))
        .sum();
    // The vector the transactions come in is freed as they move into the pool.
    let moved = size_class(txs.len() * std::mem::size_of::<Transaction>());
    let (allocated, ()) = allocated_by(|| {
        for tx in txs {
            pool.insert(tx, 0, u64::MAX / 2).unwrap();
        }
    });
    assert_eq!(pool.len() as u64, senders * per_sender);
    assert_close(
        &format!("mempool of {senders} x {per_sender}"),
        pool.memory_bytes(),
        allocated + own + moved,
    );
}

#[test]
fn the_mempool_reports_what_its_transactions_take() {
    // 400 senders with 16 pending transfers each, as a node under a few senders' load holds
    // them; 2,000 with 4 each, as `keel loadgen` leaves them between two blocks.
    check_mempool(400, 16);
    check_mempool(2_000, 4);
}

#[test]
fn a_pending_blocks_staged_state_reports_what_it_takes() {
    // The state changes of a block of 2,000 transfers over a tree of 20,000 accounts.
    let (_store, tree) = committed_accounts();
    let block = block_updates();
    let mut batch = WriteBatch::new();
    tree.apply(Some(1), 2, &block, &mut batch).unwrap();

    let (allocated, layer) = allocated_by(|| Layer::from_batch(&batch));
    assert!(layer.len() > 4_000, "{} entries", layer.len());
    assert_close("staged state", layer.memory_bytes(), allocated);
}

#[test]
fn the_nodes_a_block_reads_for_its_update_report_what_they_take() {
    // The accounts of a block of 2,000 transfers over a tree of 20,000 accounts, read for
    // their update.
    let (_store, tree) = committed_accounts();
    let keys: Vec<Hash> = block_updates().into_iter().map(|(k, _)| k).collect();
    // A first read fills the tree's upper levels (its own figure, `NodeCache::memory_bytes`).
    let _ = tree.get_many_for_update(1, &keys).unwrap();
    let (allocated, read) = on_one_thread(|| {
        let (values, read) = tree.get_many_for_update(1, &keys).unwrap();
        assert!(values.iter().all(Option::is_some));
        read
    });
    // Most of the 20,000 leaves sit within the upper levels, which are not in the set.
    assert!(read.len() > 1_000, "{} nodes read", read.len());
    assert_close("nodes read for an update", read.memory_bytes(), allocated);
}

#[test]
fn a_staged_batch_reports_what_it_takes() {
    // The same block's state changes staged into a batch (the tree's upper levels go to its
    // cache of one node, which holds nothing).
    let (_store, tree) = committed_accounts();
    let block = block_updates();
    // A first staging fills the tree's upper levels (its own figure).
    tree.apply(Some(1), 2, &block, &mut WriteBatch::new())
        .unwrap();
    let (allocated, batch) = on_one_thread(|| {
        let mut batch = WriteBatch::new();
        tree.apply(Some(1), 2, &block, &mut batch).unwrap();
        batch
    });
    assert!(batch.len() > 4_000, "{} operations", batch.len());
    assert_close("staged batch", batch.memory_bytes(), allocated);
}
