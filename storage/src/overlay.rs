//! A read-only [`KvStore`] view of a base store with staged batches on top.
//!
//! A node executes blocks on top of parents that are not final yet: their state-tree nodes
//! are staged in [`WriteBatch`]es that must not reach the store until the block is final
//! (a certified block can still be abandoned on a fork). [`OverlayStore`] lets such an
//! execution read "the store as if these batches had been written, in this order" without
//! writing anything: each batch is indexed once into a [`Layer`], and a view is the base store
//! plus an ordered list of shared layers (oldest first).
//!
//! Semantics are exactly those of writing the batches to the base in order: within a batch a
//! later operation wins over an earlier one; across layers a newer layer wins; a delete or a
//! covering range delete hides everything older.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::Arc;

use crate::{Column, Direction, Error, KvIter, KvStore, Op, OpRef, Result, WriteBatch};

/// Point writes of one column: `Some(value)` puts, `None` deletes.
type Points = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A point write of [`Points`].
type Entry = (Vec<u8>, Option<Vec<u8>>);

/// Key ranges `[from, to)`.
type Ranges = Vec<(Vec<u8>, Vec<u8>)>;

/// What one batch did to one column.
#[derive(Default)]
struct ColumnLayer {
    /// The last point write of each key. A point write wins over this layer's own range
    /// deletes: a range delete removes the earlier point writes it covers when it is indexed,
    /// so a point write still here came after every range delete that covers it.
    points: Points,
    /// Range deletes `[from, to)` (non-empty), hiding every older value in them.
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ColumnLayer {
    /// `Some(Some(v))`: this layer puts `v`; `Some(None)`: it deletes the key; `None`: it
    /// does not touch the key.
    fn lookup(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        if let Some(v) = self.points.get(key) {
            return Some(v.as_deref());
        }
        self.ranges
            .iter()
            .any(|(from, to)| from.as_slice() <= key && key < to.as_slice())
            .then_some(None)
    }
}

/// A staged batch indexed for reads: puts, deletes and range deletes by column.
///
/// Built once from a [`WriteBatch`] and then shared (`Arc<Layer>`) by every view that needs
/// it. Reading a key through a layer gives what writing the batch would have left.
#[derive(Default)]
pub struct Layer {
    columns: BTreeMap<Column, ColumnLayer>,
    /// Estimated bytes it holds ([`Layer::memory_bytes`]), fixed when it is built.
    bytes: u64,
}

/// Bytes a point write costs a layer besides its key's and value's bytes: the two vectors'
/// headers in a B-tree slot, the tree's nodes about two-thirds full.
const POINT_OVERHEAD: u64 = (2 * std::mem::size_of::<Vec<u8>>() as u64) * 3 / 2;

impl Layer {
    /// Indexes `batch`: the operations are applied in order, as a store would apply them.
    pub fn from_batch(batch: &WriteBatch) -> Layer {
        let mut columns: BTreeMap<Column, ColumnLayer> = BTreeMap::new();
        for op in batch.ops() {
            match op {
                Op::Put(col, k, v) => {
                    columns
                        .entry(*col)
                        .or_default()
                        .points
                        .insert(k.clone(), Some(v.clone()));
                }
                Op::Delete(col, k) => {
                    columns
                        .entry(*col)
                        .or_default()
                        .points
                        .insert(k.clone(), None);
                }
                Op::DeleteRange(col, from, to) => {
                    // An empty or inverted range deletes nothing (as in `MemStore`).
                    if from >= to {
                        continue;
                    }
                    let layer = columns.entry(*col).or_default();
                    let covered: Vec<Vec<u8>> = layer
                        .points
                        .range::<[u8], _>((Bound::Included(&from[..]), Bound::Excluded(&to[..])))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in covered {
                        layer.points.remove(&k);
                    }
                    layer.ranges.push((from.clone(), to.clone()));
                }
            }
        }
        let bytes = columns
            .values()
            .flat_map(|c| c.points.iter())
            .fold(0u64, |sum, (k, v)| {
                let value = v.as_ref().map_or(0, Vec::capacity);
                sum.saturating_add((k.capacity() + value) as u64 + POINT_OVERHEAD)
            });
        Layer { columns, bytes }
    }

    /// Estimated bytes the layer holds in memory: every key and value it indexes with its
    /// share of the index.
    pub fn memory_bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the keys and values of its operations (what a batch of them carries).
    pub fn op_bytes(&self) -> usize {
        self.columns
            .values()
            .map(|c| {
                let points: usize = c
                    .points
                    .iter()
                    .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                    .sum();
                let ranges: usize = c.ranges.iter().map(|(f, t)| f.len() + t.len()).sum();
                points + ranges
            })
            .sum()
    }

    /// Number of indexed entries: the keys written or deleted plus the range deletes.
    pub fn len(&self) -> usize {
        self.columns
            .values()
            .map(|c| c.points.len() + c.ranges.len())
            .sum()
    }

    /// Whether the batch changed nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A batch with the same effect as the one this layer was built from: its range deletes
    /// first, then its point writes (which the range deletes must not hide). Writing it to a
    /// store leaves exactly what writing the original batch would have left; the operations
    /// are in a canonical order (by column, then key), so the result is deterministic.
    pub fn to_batch(&self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        self.for_each_op(|op| match op {
            OpRef::Put(col, k, v) => batch.put(col, k, v),
            OpRef::Delete(col, k) => batch.delete(col, k),
            OpRef::DeleteRange(col, from, to) => batch.delete_range(col, from, to),
        });
        batch
    }

    /// Each operation of [`Layer::to_batch`], in its order, borrowed: range deletes first,
    /// then point writes, by column then key.
    pub fn for_each_op<'a>(&'a self, mut f: impl FnMut(OpRef<'a>)) {
        for (col, layer) in &self.columns {
            for (from, to) in &layer.ranges {
                f(OpRef::DeleteRange(*col, from, to));
            }
        }
        for (col, layer) in &self.columns {
            for (k, v) in &layer.points {
                match v {
                    Some(v) => f(OpRef::Put(*col, k, v)),
                    None => f(OpRef::Delete(*col, k)),
                }
            }
        }
    }
}

/// A read-only view of `base` with `layers` applied on top, oldest first.
///
/// Reads see what the store would hold had the layers' batches been written in order;
/// [`KvStore::write`] is refused. Sizes are the base's.
pub struct OverlayStore {
    base: Arc<dyn KvStore>,
    layers: Vec<Arc<Layer>>,
}

impl OverlayStore {
    /// A view of `base` with `layers` (oldest first) on top.
    pub fn new(base: Arc<dyn KvStore>, layers: Vec<Arc<Layer>>) -> OverlayStore {
        OverlayStore { base, layers }
    }

    /// The merged effect of every layer on `[from, to)` of `col`: the final point writes in
    /// range (a `None` hides the base's value) and the range deletes clipped to the range,
    /// sorted and coalesced. `None` if no layer touches `col`.
    fn merged(&self, col: Column, from: &[u8], to: Option<&[u8]>) -> Option<(Points, Ranges)> {
        let mut points = Points::new();
        let mut ranges: Ranges = Vec::new();
        let mut touched = false;
        let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
        for layer in &self.layers {
            let Some(cl) = layer.columns.get(&col) else {
                continue;
            };
            touched = true;
            // Within a layer, range deletes come before the point writes that survive them.
            for (rf, rt) in &cl.ranges {
                let lo = rf.as_slice().max(from);
                let hi = match to {
                    Some(t) => rt.as_slice().min(t),
                    None => rt.as_slice(),
                };
                if lo >= hi {
                    continue;
                }
                for (_, v) in
                    points.range_mut::<[u8], _>((Bound::Included(lo), Bound::Excluded(hi)))
                {
                    *v = None;
                }
                ranges.push((lo.to_vec(), hi.to_vec()));
            }
            for (k, v) in cl.points.range::<[u8], _>((Bound::Included(from), upper)) {
                points.insert(k.clone(), v.clone());
            }
        }
        touched.then(|| (points, coalesce(ranges)))
    }
}

/// Sorts ranges by start and merges overlapping or touching ones, so that a key's cover can
/// be found by binary search.
fn coalesce(mut ranges: Ranges) -> Ranges {
    ranges.sort();
    let mut out: Ranges = Vec::with_capacity(ranges.len());
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if from <= last.1 => {
                if to > last.1 {
                    last.1 = to;
                }
            }
            _ => out.push((from, to)),
        }
    }
    out
}

/// Whether `key` lies in one of the sorted, disjoint `ranges`.
fn covered(ranges: &[(Vec<u8>, Vec<u8>)], key: &[u8]) -> bool {
    let after = ranges.partition_point(|(from, _)| from.as_slice() <= key);
    after
        .checked_sub(1)
        .and_then(|i| ranges.get(i))
        .is_some_and(|(_, to)| key < to.as_slice())
}

impl KvStore for OverlayStore {
    fn get(&self, col: Column, key: &[u8]) -> Result<Option<Vec<u8>>> {
        for layer in self.layers.iter().rev() {
            if let Some(found) = layer.columns.get(&col).and_then(|c| c.lookup(key)) {
                return Ok(found.map(<[u8]>::to_vec));
            }
        }
        self.base.get(col, key)
    }

    fn multi_get(&self, col: Column, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        let mut from_base: Vec<usize> = Vec::new();
        'keys: for (i, key) in keys.iter().enumerate() {
            for layer in self.layers.iter().rev() {
                if let Some(found) = layer.columns.get(&col).and_then(|c| c.lookup(key)) {
                    out[i] = found.map(<[u8]>::to_vec);
                    continue 'keys;
                }
            }
            from_base.push(i);
        }
        let base_keys: Vec<Vec<u8>> = from_base.iter().map(|&i| keys[i].clone()).collect();
        for (i, value) in from_base
            .into_iter()
            .zip(self.base.multi_get(col, &base_keys)?)
        {
            out[i] = value;
        }
        Ok(out)
    }

    fn write(&self, _batch: WriteBatch) -> Result<()> {
        Err(Error::Engine("overlay store is read-only".into()))
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
        let base = self.base.iter_range(col, from, to, dir);
        let Some((points, ranges)) = self.merged(col, from, to) else {
            return base;
        };
        let layered: Vec<Entry> = match dir {
            Direction::Forward => points.into_iter().collect(),
            Direction::Reverse => points.into_iter().rev().collect(),
        };
        Box::new(MergeIter {
            base: base.peekable(),
            layered: layered.into_iter().peekable(),
            ranges,
            dir,
        })
    }

    fn compact_range(&self, _col: Column, _from: &[u8], _to: &[u8]) -> Result<()> {
        Ok(())
    }

    fn disk_size_bytes(&self) -> Result<u64> {
        self.base.disk_size_bytes()
    }

    fn memory_bytes(&self) -> u64 {
        self.base.memory_bytes()
    }
}

/// Merges the base's items with the layers' merged point writes, both in `dir` order: on a
/// tie the layers win; base items inside a range delete are hidden.
struct MergeIter<'a> {
    base: Peekable<KvIter<'a>>,
    layered: Peekable<std::vec::IntoIter<Entry>>,
    ranges: Ranges,
    dir: Direction,
}

impl Iterator for MergeIter<'_> {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.base.peek(), self.layered.peek()) {
                (None, None) => return None,
                // Errors surface as soon as they are reached.
                (Some(Err(_)), _) => return self.base.next(),
                (Some(Ok(_)), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(Ok((bk, _))), Some((lk, _))) => match self.dir {
                    Direction::Forward => bk.cmp(lk),
                    Direction::Reverse => lk.cmp(bk),
                },
            };
            match order {
                Ordering::Less => match self.base.next() {
                    Some(Ok((k, v))) => {
                        if !covered(&self.ranges, &k) {
                            return Some(Ok((k, v)));
                        }
                    }
                    other => return other,
                },
                Ordering::Equal | Ordering::Greater => {
                    if order == Ordering::Equal {
                        // The layers' value (or deletion) replaces the base's.
                        self.base.next();
                    }
                    if let Some((k, Some(v))) = self.layered.next() {
                        return Some(Ok((k, v)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::MemStore;
    use proptest::prelude::*;

    const COLS: [Column; 2] = [Column::StateNodes, Column::Meta];

    /// Every key of length 0..=2 over a small alphabet (including 0x00 and 0xff edges).
    fn universe() -> Vec<Vec<u8>> {
        let alphabet = [0u8, 1, 0xff];
        let mut keys = vec![Vec::new()];
        for a in alphabet {
            keys.push(vec![a]);
            for b in alphabet {
                keys.push(vec![a, b]);
            }
        }
        keys.sort();
        keys
    }

    #[derive(Clone, Debug)]
    enum TestOp {
        Put(usize, usize, u8),
        Delete(usize, usize),
        DeleteRange(usize, usize, usize),
    }

    fn op_strategy() -> impl Strategy<Value = TestOp> {
        let n = universe().len();
        prop_oneof![
            4 => (0..2usize, 0..n, any::<u8>()).prop_map(|(c, k, v)| TestOp::Put(c, k, v)),
            2 => (0..2usize, 0..n).prop_map(|(c, k)| TestOp::Delete(c, k)),
            1 => (0..2usize, 0..n, 0..n).prop_map(|(c, a, b)| TestOp::DeleteRange(c, a, b)),
        ]
    }

    fn to_batch(ops: &[TestOp]) -> WriteBatch {
        let u = universe();
        let mut batch = WriteBatch::new();
        for op in ops {
            match *op {
                TestOp::Put(c, k, v) => batch.put(COLS[c], u[k].clone(), vec![v]),
                TestOp::Delete(c, k) => batch.delete(COLS[c], u[k].clone()),
                TestOp::DeleteRange(c, a, b) => {
                    batch.delete_range(COLS[c], u[a].clone(), u[b].clone())
                }
            }
        }
        batch
    }

    fn collect(
        store: &dyn KvStore,
        col: Column,
        from: &[u8],
        to: Option<&[u8]>,
        dir: Direction,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .iter_range(col, from, to, dir)
            .collect::<Result<Vec<_>>>()
            .unwrap()
    }

    /// The overlay must read exactly like a store the same batches were written to.
    fn assert_same_view(overlay: &dyn KvStore, expected: &dyn KvStore) {
        let u = universe();
        for col in COLS {
            for k in &u {
                assert_eq!(
                    overlay.get(col, k).unwrap(),
                    expected.get(col, k).unwrap(),
                    "get {col:?} {k:?}"
                );
            }
            assert_eq!(
                overlay.multi_get(col, &u).unwrap(),
                expected.multi_get(col, &u).unwrap(),
                "multi_get {col:?}"
            );
            let bounds: Vec<Option<&[u8]>> =
                u.iter().map(|k| Some(k.as_slice())).chain([None]).collect();
            for from in &u {
                for to in &bounds {
                    for dir in [Direction::Forward, Direction::Reverse] {
                        assert_eq!(
                            collect(overlay, col, from, *to, dir),
                            collect(expected, col, from, *to, dir),
                            "iter_range {col:?} {from:?}..{to:?} {dir:?}"
                        );
                    }
                }
            }
            assert_eq!(
                overlay
                    .iter_prefix(col, &[1])
                    .collect::<Result<Vec<_>>>()
                    .unwrap(),
                expected
                    .iter_prefix(col, &[1])
                    .collect::<Result<Vec<_>>>()
                    .unwrap(),
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn overlay_reads_like_the_batches_written_in_order(
            base_ops in proptest::collection::vec(op_strategy(), 0..24),
            layers in proptest::collection::vec(proptest::collection::vec(op_strategy(), 0..16), 0..4),
        ) {
            let base = MemStore::new();
            base.write(to_batch(&base_ops)).unwrap();
            let expected = MemStore::new();
            expected.write(to_batch(&base_ops)).unwrap();
            let mut staged = Vec::new();
            for ops in &layers {
                let batch = to_batch(ops);
                staged.push(Arc::new(Layer::from_batch(&batch)));
                expected.write(batch).unwrap();
            }
            let overlay = OverlayStore::new(Arc::new(base.clone()), staged.clone());
            assert_same_view(&overlay, &expected);

            // Writing each layer's canonical batch has the same effect as the original.
            let replayed = base;
            for layer in &staged {
                replayed.write(layer.to_batch()).unwrap();
            }
            assert_same_view(&replayed, &expected);
        }
    }

    #[test]
    fn newest_layer_wins_and_deletions_hide() {
        let base = MemStore::new();
        base.put(Column::Meta, b"a", b"base").unwrap();
        base.put(Column::Meta, b"b", b"base").unwrap();
        base.put(Column::Meta, b"c", b"base").unwrap();
        let mut first = WriteBatch::new();
        first.put(Column::Meta, b"a".to_vec(), b"one".to_vec());
        first.delete(Column::Meta, b"b".to_vec());
        let mut second = WriteBatch::new();
        second.put(Column::Meta, b"a".to_vec(), b"two".to_vec());
        second.put(Column::Meta, b"b".to_vec(), b"two".to_vec());
        second.delete_range(Column::Meta, b"c".to_vec(), b"d".to_vec());
        let overlay = OverlayStore::new(
            Arc::new(base.clone()),
            vec![
                Arc::new(Layer::from_batch(&first)),
                Arc::new(Layer::from_batch(&second)),
            ],
        );
        assert_eq!(
            overlay.get(Column::Meta, b"a").unwrap(),
            Some(b"two".to_vec())
        );
        assert_eq!(
            overlay.get(Column::Meta, b"b").unwrap(),
            Some(b"two".to_vec())
        );
        assert_eq!(overlay.get(Column::Meta, b"c").unwrap(), None);
        assert_eq!(
            collect(&overlay, Column::Meta, b"", None, Direction::Reverse),
            vec![
                (b"b".to_vec(), b"two".to_vec()),
                (b"a".to_vec(), b"two".to_vec())
            ]
        );
        // The base is untouched.
        assert_eq!(
            base.get(Column::Meta, b"c").unwrap(),
            Some(b"base".to_vec())
        );
    }

    #[test]
    fn a_put_after_a_range_delete_in_one_batch_survives_it() {
        let mut batch = WriteBatch::new();
        batch.put(Column::Meta, b"k1".to_vec(), b"early".to_vec());
        batch.delete_range(Column::Meta, b"k".to_vec(), b"l".to_vec());
        batch.put(Column::Meta, b"k2".to_vec(), b"late".to_vec());
        let layer = Layer::from_batch(&batch);
        assert_eq!(layer.len(), 2);
        let base = MemStore::new();
        base.put(Column::Meta, b"k0", b"base").unwrap();
        let overlay = OverlayStore::new(Arc::new(base), vec![Arc::new(layer)]);
        assert_eq!(overlay.get(Column::Meta, b"k0").unwrap(), None);
        assert_eq!(overlay.get(Column::Meta, b"k1").unwrap(), None);
        assert_eq!(
            overlay.get(Column::Meta, b"k2").unwrap(),
            Some(b"late".to_vec())
        );
        assert_eq!(
            collect(&overlay, Column::Meta, b"", None, Direction::Forward),
            vec![(b"k2".to_vec(), b"late".to_vec())]
        );
    }

    #[test]
    fn writes_are_refused_and_the_base_is_never_changed() {
        let base = MemStore::new();
        let overlay = OverlayStore::new(Arc::new(base.clone()), Vec::new());
        let mut batch = WriteBatch::new();
        batch.put(Column::Meta, b"k".to_vec(), b"v".to_vec());
        assert!(matches!(overlay.write(batch), Err(Error::Engine(_))));
        assert!(overlay.put(Column::Meta, b"k", b"v").is_err());
        assert_eq!(base.get(Column::Meta, b"k").unwrap(), None);
        assert!(overlay.compact_range(Column::Meta, b"", b"z").is_ok());
        assert!(Layer::from_batch(&WriteBatch::new()).is_empty());
    }
}
