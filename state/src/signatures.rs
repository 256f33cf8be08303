//! Transaction signature verification and the cache of verified transactions.
//!
//! Signatures are checked once, where a transaction enters the node (mempool admission,
//! in parallel batches), and the hashes of the valid ones go into a bounded [`SigCache`].
//! Block execution then verifies only what the cache does not know (transactions first seen
//! in a proposal), again in parallel batches.
//!
//! This is consensus-safe only because the verdict on a signature does not depend on how
//! it is checked: [`keel_types::verify_batch`] accepts a batch exactly when every signature
//! in it passes [`keel_types::PublicKey::verify`] on its own (both use the same cofactored
//! equation; see `keel_types::crypto`). So a node that verified a transaction alone, in a
//! mempool batch, or in a block's batch reaches the same verdict, and skipping the cached
//! ones cannot change a block's outcome.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use keel_types::{verify_batch, Hash, PublicKey, Signature, Transaction};
use lru::LruCache;
use rayon::prelude::*;

/// Transactions per batch-verification chunk: large enough that a batch costs about half of
/// verifying one by one, small enough to spread a block over every core.
pub const SIGNATURE_CHUNK: usize = 64;

/// Verified transactions kept by default: about 18 MiB when full (72 bytes each, measured),
/// more than a full mempool. Allocated as entries come.
pub const DEFAULT_SIG_CACHE: usize = 262_144;

/// A bounded LRU set of the hashes of transactions whose signature is known to be valid.
///
/// The tx hash covers the whole signed transaction (body, key and signature), so a hit means
/// exactly this signature over exactly this body was verified.
pub struct SigCache {
    entries: Mutex<LruCache<Hash, ()>>,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl SigCache {
    /// A cache of at most `capacity` transactions (at least one).
    pub fn new(capacity: usize) -> SigCache {
        // Grown as entries come, not reserved for `capacity` up front (`LruCache::new` would
        // allocate the whole table at once: 10 MB by default, held even by an idle node).
        let mut entries = LruCache::unbounded();
        entries.resize(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN));
        SigCache {
            entries: Mutex::new(entries),
            hits: Default::default(),
            misses: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<Hash, ()>> {
        // Only hashes of verified transactions are ever inserted; a panic elsewhere while the
        // lock was held cannot have made an entry wrong.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `hash` is known valid (and marks it recently used).
    pub fn contains(&self, hash: &Hash) -> bool {
        self.lock().get(hash).is_some()
    }

    /// Records valid transactions.
    pub fn insert_all<'a>(&self, hashes: impl IntoIterator<Item = &'a Hash>) {
        let mut entries = self.lock();
        for h in hashes {
            entries.put(*h, ());
        }
    }

    /// Forgets a transaction (for example once a block including it is final).
    pub fn remove_all<'a>(&self, hashes: impl IntoIterator<Item = &'a Hash>) {
        let mut entries = self.lock();
        for h in hashes {
            entries.pop(h);
        }
    }

    /// Keeps at most `entries` verified transactions (at least one), forgetting the least
    /// recently used at once when that is fewer than held.
    pub fn set_capacity(&self, entries: usize) {
        self.lock()
            .resize(NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN));
    }

    /// How many entries it may hold.
    pub fn capacity(&self) -> usize {
        self.lock().cap().get()
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lookups that found the transaction, since start.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lookups that had to verify, since start.
    pub fn misses(&self) -> u64 {
        self.misses.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for SigCache {
    fn default() -> SigCache {
        SigCache::new(DEFAULT_SIG_CACHE)
    }
}

/// Verifies the signatures of `txs`; `result[i]` says whether transaction `i` is valid.
///
/// Transactions found in `cache` are not verified again; the others are checked with ed25519
/// batch verification over chunks of [`SIGNATURE_CHUNK`] in parallel (rayon), one by one only
/// inside a chunk whose batch fails. The valid ones are added to `cache`.
pub fn verify_transactions(txs: &[Transaction], cache: Option<&SigCache>) -> Vec<bool> {
    let mut valid = vec![false; txs.len()];
    let todo: Vec<usize> = match cache {
        Some(cache) => {
            let entries = &mut cache.lock();
            let todo: Vec<usize> = txs
                .iter()
                .enumerate()
                .filter_map(|(i, tx)| {
                    if entries.get(&tx.hash).is_some() {
                        valid[i] = true;
                        None
                    } else {
                        Some(i)
                    }
                })
                .collect();
            let hits = (txs.len() - todo.len()) as u64;
            cache
                .hits
                .fetch_add(hits, std::sync::atomic::Ordering::Relaxed);
            cache
                .misses
                .fetch_add(todo.len() as u64, std::sync::atomic::Ordering::Relaxed);
            todo
        }
        None => (0..txs.len()).collect(),
    };
    let verdicts: Vec<bool> = if todo.len() <= SIGNATURE_CHUNK {
        // One chunk: verified here. Handing it to rayon's pool would only add a wake-up of
        // a pool thread (and block this one meanwhile).
        let chunk: Vec<&Transaction> = todo.iter().map(|&i| &txs[i]).collect();
        verify_chunk(&chunk)
    } else {
        todo.par_chunks(SIGNATURE_CHUNK)
            .flat_map_iter(|chunk| {
                let chunk: Vec<&Transaction> = chunk.iter().map(|&i| &txs[i]).collect();
                verify_chunk(&chunk)
            })
            .collect()
    };
    for (&i, ok) in todo.iter().zip(&verdicts) {
        valid[i] = *ok;
    }
    if let Some(cache) = cache {
        cache.insert_all(
            todo.iter()
                .zip(&verdicts)
                .filter(|(_, ok)| **ok)
                .map(|(&i, _)| &txs[i].hash),
        );
    }
    valid
}

fn verify_chunk(chunk: &[&Transaction]) -> Vec<bool> {
    // A batch of one costs more than one check: a three-point multiscalar multiplication
    // where a single check uses the precomputed base-point table.
    if let [tx] = chunk {
        return vec![tx.verify_signature().is_ok()];
    }
    let msgs: Vec<Hash> = chunk.iter().map(|t| t.signing_hash).collect();
    let sigs: Vec<Signature> = chunk.iter().map(|t| t.signature).collect();
    let keys: Vec<PublicKey> = chunk.iter().map(|t| t.public_key).collect();
    if verify_batch(&msgs, &sigs, &keys).is_ok() {
        return vec![true; chunk.len()];
    }
    chunk.iter().map(|t| t.verify_signature().is_ok()).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use keel_types::{Address, Keypair, TxKind};

    use super::*;

    fn tx(seed: u64, nonce: u64) -> Transaction {
        let k = Keypair::from_seed(seed);
        Transaction::sign(
            &k,
            "c",
            nonce,
            10,
            TxKind::Transfer {
                to: Address([1; 20]),
                amount: 1,
            },
        )
    }

    fn corrupt(tx: &Transaction) -> Transaction {
        let mut bad = tx.clone();
        bad.signature.0[5] ^= 1;
        bad
    }

    #[test]
    fn the_cache_shrinks_and_grows_back_on_demand() {
        let cache = SigCache::new(1_000);
        let hashes: Vec<Hash> = (0..500u32)
            .map(|i| Hash::digest(&i.to_le_bytes()))
            .collect();
        cache.insert_all(&hashes);
        assert_eq!(cache.len(), 500);
        cache.set_capacity(10);
        assert_eq!((cache.len(), cache.capacity()), (10, 10));
        // The most recently used ones are kept.
        assert!(cache.contains(&hashes[499]));
        assert!(!cache.contains(&hashes[0]));
        cache.set_capacity(1_000);
        cache.insert_all(&hashes);
        assert_eq!(cache.len(), 500);
    }

    #[test]
    fn finds_the_bad_ones_across_chunks() {
        let mut txs: Vec<Transaction> = (0..200).map(|i| tx(i, 0)).collect();
        for i in [3, 64, 65, 199] {
            txs[i] = corrupt(&txs[i]);
        }
        let result = verify_transactions(&txs, None);
        for (i, ok) in result.iter().enumerate() {
            assert_eq!(*ok, ![3, 64, 65, 199].contains(&i), "tx {i}");
        }
        assert!(verify_transactions(&[], None).is_empty());
    }

    #[test]
    fn cached_transactions_are_not_verified_again_and_invalid_ones_never_cached() {
        let cache = SigCache::new(1_000);
        let mut txs: Vec<Transaction> = (0..100).map(|i| tx(i, 0)).collect();
        txs[7] = corrupt(&txs[7]);
        let first = verify_transactions(&txs[..50], Some(&cache));
        assert_eq!(first.iter().filter(|ok| !**ok).count(), 1);
        assert_eq!(cache.len(), 49);
        assert!(!cache.contains(&txs[7].hash));
        assert_eq!((cache.hits(), cache.misses()), (0, 50));

        let second = verify_transactions(&txs, Some(&cache));
        assert_eq!((cache.hits(), cache.misses()), (49, 101));
        assert_eq!(second.iter().filter(|ok| !**ok).count(), 1);
        assert!(!second[7]);
        assert_eq!(cache.len(), 99);
    }

    #[test]
    fn a_cache_hit_is_keyed_by_the_whole_signed_transaction() {
        // Same body and key, different (invalid) signature: a different tx hash, so the cached
        // verdict of the valid one does not leak to it.
        let cache = SigCache::new(10);
        let good = tx(1, 0);
        assert_eq!(
            verify_transactions(std::slice::from_ref(&good), Some(&cache)),
            [true]
        );
        let mut bad_bytes = good.bytes.clone();
        let n = bad_bytes.len();
        bad_bytes[n - 1] ^= 1; // last byte of the signature field
        let bad = Transaction::decode(&bad_bytes).unwrap();
        assert_ne!(bad.hash, good.hash);
        assert_eq!(verify_transactions(&[bad], Some(&cache)), [false]);
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = SigCache::new(8);
        let txs: Vec<Transaction> = (0..20).map(|i| tx(i, 0)).collect();
        verify_transactions(&txs, Some(&cache));
        assert_eq!(cache.len(), 8);
        assert!(cache.contains(&txs[19].hash));
        assert!(!cache.contains(&txs[0].hash));
        cache.remove_all([&txs[19].hash]);
        assert!(!cache.contains(&txs[19].hash));
    }
}
