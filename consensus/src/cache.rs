//! The per-epoch cache of validator sets.
//!
//! A set is a function of the final state at the start of its epoch, so once computed it
//! never changes: the cache keeps the sets of recent epochs by epoch number and counts hits
//! and misses (exported as metrics by the node). Loading is the caller's business (the node
//! reads stakes from the state tree); the cache only guarantees a set is computed once while
//! it stays cached.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::ValidatorSet;

/// Hit and miss counts of a [`ValidatorSetCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to compute the set.
    pub misses: u64,
}

struct Inner {
    sets: LruCache<u64, Arc<ValidatorSet>>,
    stats: CacheStats,
}

/// Validator sets by epoch, least recently used evicted first. Shared between the consensus
/// driver and the RPC server, so it locks internally.
pub struct ValidatorSetCache {
    inner: Mutex<Inner>,
}

impl ValidatorSetCache {
    /// A cache holding at most `capacity` epochs (at least 1).
    pub fn new(capacity: usize) -> ValidatorSetCache {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        ValidatorSetCache {
            inner: Mutex::new(Inner {
                sets: LruCache::new(capacity),
                stats: CacheStats::default(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The set of `epoch`, computing it with `load` on a miss. A failed load is not cached.
    /// The lock is not held while loading, so a slow load never blocks readers of other
    /// epochs; two concurrent misses of one epoch may both load (the result is the same).
    pub fn get_or_load<E>(
        &self,
        epoch: u64,
        load: impl FnOnce() -> Result<ValidatorSet, E>,
    ) -> Result<Arc<ValidatorSet>, E> {
        {
            let mut inner = self.lock();
            if let Some(set) = inner.sets.get(&epoch).cloned() {
                inner.stats.hits += 1;
                return Ok(set);
            }
            inner.stats.misses += 1;
        }
        let set = Arc::new(load()?);
        self.lock().sets.put(epoch, set.clone());
        Ok(set)
    }

    /// The set of `epoch` if cached (counted as a hit or a miss).
    pub fn get(&self, epoch: u64) -> Option<Arc<ValidatorSet>> {
        let mut inner = self.lock();
        let found = inner.sets.get(&epoch).cloned();
        match found {
            Some(_) => inner.stats.hits += 1,
            None => inner.stats.misses += 1,
        }
        found
    }

    /// Hit and miss counts so far.
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// Number of epochs cached.
    pub fn len(&self) -> usize {
        self.lock().sets.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Validator;
    use keel_types::Keypair;

    fn set(stake: u64) -> ValidatorSet {
        let k = Keypair::from_seed(1);
        ValidatorSet::new(vec![Validator {
            address: k.address(),
            public_key: k.public(),
            stake,
        }])
        .unwrap()
    }

    #[test]
    fn a_set_is_computed_once_while_cached_and_counted() {
        let cache = ValidatorSetCache::new(2);
        let mut loads = 0;
        for _ in 0..3 {
            let s = cache
                .get_or_load(7, || {
                    loads += 1;
                    Ok::<_, ()>(set(5))
                })
                .unwrap();
            assert_eq!(s.total_stake(), 5);
        }
        assert_eq!(loads, 1);
        assert_eq!(cache.stats(), CacheStats { hits: 2, misses: 1 });
    }

    #[test]
    fn least_recently_used_epochs_are_evicted_and_failures_not_cached() {
        let cache = ValidatorSetCache::new(2);
        for e in 0..3 {
            cache.get_or_load(e, || Ok::<_, ()>(set(e + 1))).unwrap();
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(0).is_none(), "epoch 0 was least recently used");
        assert_eq!(cache.get(2).unwrap().total_stake(), 3);
        assert!(cache.get_or_load(9, || Err("no state")).is_err());
        assert!(cache.get(9).is_none());
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 6 });
    }
}
