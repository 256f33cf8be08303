//! An in-memory [`KvStore`] for tests and simulations.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use crate::{Column, Direction, Error, KvIter, KvStore, Op, Result, WriteBatch};

/// One column: values in a hash map, so a point read is one hash lookup (a `BTreeMap` of
/// heap-allocated keys costs a pointer chase per comparison, ~1 µs at a million keys), and
/// the keys again in order for range reads.
#[derive(Default)]
struct Table {
    values: HashMap<Vec<u8>, Vec<u8>>,
    order: BTreeSet<Vec<u8>>,
}

impl Table {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        match self.values.get_mut(&key) {
            Some(v) => *v = value,
            None => {
                self.order.insert(key.clone());
                self.values.insert(key, value);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if self.values.remove(key).is_some() {
            self.order.remove(key);
        }
    }

    fn entry(&self, key: &Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
        self.values.get(key).map(|v| (key.clone(), v.clone()))
    }
}

/// An in-memory store. Clones share the same data, like handles to one database, so a
/// simulated node can "crash" (drop everything else) and restart on the same store.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<RwLock<BTreeMap<Column, Table>>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn poisoned() -> Error {
        Error::Engine("memory store lock poisoned".into())
    }
}

impl KvStore for MemStore {
    fn get(&self, col: Column, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let inner = self.inner.read().map_err(|_| MemStore::poisoned())?;
        Ok(inner.get(&col).and_then(|t| t.values.get(key)).cloned())
    }

    fn multi_get(&self, col: Column, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let inner = self.inner.read().map_err(|_| MemStore::poisoned())?;
        let table = inner.get(&col);
        Ok(keys
            .iter()
            .map(|k| table.and_then(|t| t.values.get(k)).cloned())
            .collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut inner = self.inner.write().map_err(|_| MemStore::poisoned())?;
        for op in batch.into_ops() {
            match op {
                Op::Put(col, k, v) => {
                    inner.entry(col).or_default().insert(k, v);
                }
                Op::Delete(col, k) => {
                    if let Some(t) = inner.get_mut(&col) {
                        t.remove(&k);
                    }
                }
                Op::DeleteRange(col, from, to) => {
                    if let Some(t) = inner.get_mut(&col) {
                        if from < to {
                            let doomed: Vec<Vec<u8>> = t
                                .order
                                .range::<[u8], _>((
                                    Bound::Included(&from[..]),
                                    Bound::Excluded(&to[..]),
                                ))
                                .cloned()
                                .collect();
                            for k in doomed {
                                t.remove(&k);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn iter_range<'a>(
        &'a self,
        col: Column,
        from: &[u8],
        to: Option<&[u8]>,
        dir: Direction,
    ) -> KvIter<'a> {
        let inner = match self.inner.read() {
            Ok(i) => i,
            Err(_) => return Box::new(std::iter::once(Err(MemStore::poisoned()))),
        };
        let Some(table) = inner.get(&col) else {
            return Box::new(std::iter::empty());
        };
        let upper = match to {
            Some(t) => Bound::Excluded(t),
            None => Bound::Unbounded,
        };
        if let Some(t) = to {
            if t <= from {
                return Box::new(std::iter::empty());
            }
        }
        let range = table.order.range::<[u8], _>((Bound::Included(from), upper));
        // A snapshot: the lock is released before the caller iterates.
        let items: Vec<Result<(Vec<u8>, Vec<u8>)>> = match dir {
            Direction::Forward => range.filter_map(|k| table.entry(k)).map(Ok).collect(),
            Direction::Reverse => range.rev().filter_map(|k| table.entry(k)).map(Ok).collect(),
        };
        Box::new(items.into_iter())
    }

    fn compact_range(&self, _col: Column, _from: &[u8], _to: &[u8]) -> Result<()> {
        Ok(())
    }

    fn disk_size_bytes(&self) -> Result<u64> {
        Ok(0)
    }

    fn memory_bytes(&self) -> u64 {
        let Ok(inner) = self.inner.read() else {
            return 0;
        };
        inner
            .values()
            .flat_map(|t| t.values.iter())
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum()
    }
}
