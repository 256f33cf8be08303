//! The one behaviour suite every [`KvStore`] engine must pass (STYLE habit 3).
//!
//! Each case takes `&dyn KvStore` on an empty store; `run_suite!` instantiates every case as a
//! `#[test]` for one engine. Range queries are checked against a `BTreeMap` model so the
//! expected answer is never written by hand.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::{Column, Direction, KvStore, WriteBatch};

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn collect(
    store: &dyn KvStore,
    col: Column,
    from: &[u8],
    to: Option<&[u8]>,
    dir: Direction,
) -> Pairs {
    store
        .iter_range(col, from, to, dir)
        .collect::<crate::Result<Pairs>>()
        .unwrap()
}

fn keys(pairs: &Pairs) -> Vec<Vec<u8>> {
    pairs.iter().map(|(k, _)| k.clone()).collect()
}

fn model_range(
    model: &BTreeMap<Vec<u8>, Vec<u8>>,
    from: &[u8],
    to: Option<&[u8]>,
    dir: Direction,
) -> Pairs {
    if to.is_some_and(|t| t <= from) {
        return Vec::new();
    }
    let upper = to.map_or(Bound::Unbounded, Bound::Excluded);
    let it = model
        .range::<[u8], _>((Bound::Included(from), upper))
        .map(|(k, v)| (k.clone(), v.clone()));
    match dir {
        Direction::Forward => it.collect(),
        Direction::Reverse => it.rev().collect(),
    }
}

/// Deterministic xorshift so the randomised cases need no RNG crate and replay exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Short keys over a small alphabet that includes 0x00 and 0xff, so ranges often hit
    /// boundaries, prefixes of each other and the all-0xff edge.
    fn key(&mut self) -> Vec<u8> {
        const ALPHABET: [u8; 5] = [0x00, 0x01, 0x7f, 0xfe, 0xff];
        let len = (self.next() % 4) as usize;
        (0..len)
            .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize])
            .collect()
    }
}

pub(crate) fn get_put_delete(store: &dyn KvStore) {
    let col = Column::Meta;
    assert_eq!(store.get(col, b"a").unwrap(), None);
    store.put(col, b"a", b"1").unwrap();
    assert_eq!(store.get(col, b"a").unwrap(), Some(b"1".to_vec()));
    store.put(col, b"a", b"2").unwrap();
    assert_eq!(store.get(col, b"a").unwrap(), Some(b"2".to_vec()));

    // An empty value is a present key, distinct from a missing one; the empty key is a key.
    store.put(col, b"empty", b"").unwrap();
    assert_eq!(store.get(col, b"empty").unwrap(), Some(Vec::new()));
    store.put(col, b"", b"root").unwrap();
    assert_eq!(store.get(col, b"").unwrap(), Some(b"root".to_vec()));

    let mut b = WriteBatch::new();
    b.delete(col, b"a".to_vec());
    b.delete(col, b"never-existed".to_vec());
    store.write(b).unwrap();
    assert_eq!(store.get(col, b"a").unwrap(), None);
    assert_eq!(store.get(col, b"empty").unwrap(), Some(Vec::new()));
}

pub(crate) fn large_values_round_trip(store: &dyn KvStore) {
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    store.put(Column::Bodies, b"big", &big).unwrap();
    assert_eq!(store.get(Column::Bodies, b"big").unwrap(), Some(big));
}

pub(crate) fn empty_batch_is_a_no_op(store: &dyn KvStore) {
    store.put(Column::Meta, b"k", b"v").unwrap();
    store.write(WriteBatch::new()).unwrap();
    assert_eq!(store.get(Column::Meta, b"k").unwrap(), Some(b"v".to_vec()));
}

pub(crate) fn batch_applies_ops_in_order(store: &dyn KvStore) {
    let col = Column::StateNodes;
    let mut b = WriteBatch::new();
    // put then delete of one key: gone.
    b.put(col, b"put-del".to_vec(), b"x".to_vec());
    b.delete(col, b"put-del".to_vec());
    // delete then put: present.
    b.delete(col, b"del-put".to_vec());
    b.put(col, b"del-put".to_vec(), b"y".to_vec());
    // two puts: the last wins.
    b.put(col, b"twice".to_vec(), b"first".to_vec());
    b.put(col, b"twice".to_vec(), b"second".to_vec());
    // put then range delete over it: gone; range delete then put inside the range: present.
    b.put(col, b"r1".to_vec(), b"z".to_vec());
    b.delete_range(col, b"r0".to_vec(), b"r2".to_vec());
    b.delete_range(col, b"s0".to_vec(), b"s9".to_vec());
    b.put(col, b"s5".to_vec(), b"w".to_vec());
    store.write(b).unwrap();

    assert_eq!(store.get(col, b"put-del").unwrap(), None);
    assert_eq!(store.get(col, b"del-put").unwrap(), Some(b"y".to_vec()));
    assert_eq!(store.get(col, b"twice").unwrap(), Some(b"second".to_vec()));
    assert_eq!(store.get(col, b"r1").unwrap(), None);
    assert_eq!(store.get(col, b"s5").unwrap(), Some(b"w".to_vec()));
}

pub(crate) fn batch_spans_columns(store: &dyn KvStore) {
    let mut b = WriteBatch::new();
    for (i, col) in Column::ALL.into_iter().enumerate() {
        b.put(col, b"k".to_vec(), vec![i as u8]);
    }
    store.write(b).unwrap();
    for (i, col) in Column::ALL.into_iter().enumerate() {
        assert_eq!(
            store.get(col, b"k").unwrap(),
            Some(vec![i as u8]),
            "{col:?}"
        );
    }
}

/// A reader never sees half a batch: every batch sets all keys of the column to one value,
/// and every snapshot a reader takes has one value throughout.
pub(crate) fn batch_is_all_or_nothing_to_readers(store: &dyn KvStore) {
    const KEYS: u8 = 32;
    const ROUNDS: u32 = 200;
    let col = Column::Receipts;
    let write_round = |round: u32| {
        let mut b = WriteBatch::new();
        for k in 0..KEYS {
            b.put(col, vec![k], round.to_be_bytes().to_vec());
        }
        store.write(b).unwrap();
    };
    write_round(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for round in 1..=ROUNDS {
                write_round(round);
            }
        });
        let mut snapshots = 0u32;
        loop {
            let done = writer.is_finished();
            let pairs = collect(store, col, &[], None, Direction::Forward);
            assert_eq!(pairs.len(), usize::from(KEYS), "a snapshot lost keys");
            let first = &pairs[0].1;
            assert!(
                pairs.iter().all(|(_, v)| v == first),
                "a snapshot saw a partial batch"
            );
            snapshots += 1;
            if done {
                break;
            }
        }
        assert!(snapshots > 0);
    });
    assert_eq!(
        store.get(col, &[0]).unwrap(),
        Some(ROUNDS.to_be_bytes().to_vec())
    );
}

pub(crate) fn extended_batch_keeps_order_and_sync(store: &dyn KvStore) {
    let mut a = WriteBatch::new();
    a.put(Column::Meta, b"k".to_vec(), b"a".to_vec());
    let mut b = WriteBatch::new();
    b.set_sync(true);
    b.put(Column::Meta, b"k".to_vec(), b"b".to_vec());
    a.extend(b);
    assert!(a.sync());
    assert_eq!(a.len(), 2);
    store.write(a).unwrap();
    assert_eq!(store.get(Column::Meta, b"k").unwrap(), Some(b"b".to_vec()));
}

pub(crate) fn range_iteration_matches_model(store: &dyn KvStore) {
    let col = Column::HeightIndex;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut model = BTreeMap::new();
    let mut b = WriteBatch::new();
    for i in 0..60u32 {
        let k = rng.key();
        b.put(col, k.clone(), i.to_be_bytes().to_vec());
        model.insert(k, i.to_be_bytes().to_vec());
    }
    store.write(b).unwrap();

    for _ in 0..400 {
        let from = rng.key();
        let to = if rng.next() % 4 == 0 {
            None
        } else {
            Some(rng.key())
        };
        for dir in [Direction::Forward, Direction::Reverse] {
            let got = collect(store, col, &from, to.as_deref(), dir);
            let want = model_range(&model, &from, to.as_deref(), dir);
            assert_eq!(got, want, "range [{from:?}, {to:?}) {dir:?}");
        }
    }
}

pub(crate) fn range_bounds_are_inclusive_exclusive(store: &dyn KvStore) {
    let col = Column::Headers;
    for k in [b"a", b"b", b"c", b"d"] {
        store.put(col, k, k).unwrap();
    }
    let fwd =
        |from: &[u8], to: Option<&[u8]>| keys(&collect(store, col, from, to, Direction::Forward));
    let rev =
        |from: &[u8], to: Option<&[u8]>| keys(&collect(store, col, from, to, Direction::Reverse));
    let v = |ks: &[&[u8]]| ks.iter().map(|k| k.to_vec()).collect::<Vec<_>>();

    assert_eq!(fwd(b"b", Some(b"d")), v(&[b"b", b"c"]));
    assert_eq!(rev(b"b", Some(b"d")), v(&[b"c", b"b"]));
    assert_eq!(fwd(b"b", None), v(&[b"b", b"c", b"d"]));
    assert_eq!(rev(b"b", None), v(&[b"d", b"c", b"b"]));
    assert_eq!(rev(b"", None), v(&[b"d", b"c", b"b", b"a"]));
    // Bounds between keys.
    assert_eq!(rev(b"bb", Some(b"cc")), v(&[b"c"]));
    assert_eq!(fwd(b"bb", Some(b"cc")), v(&[b"c"]));
    // An upper bound past every key, a lower bound past every key.
    assert_eq!(rev(b"c", Some(b"zz")), v(&[b"d", b"c"]));
    assert_eq!(rev(b"e", None), Vec::<Vec<u8>>::new());
    assert_eq!(fwd(b"e", None), Vec::<Vec<u8>>::new());
}

pub(crate) fn empty_ranges_yield_nothing(store: &dyn KvStore) {
    let col = Column::Evidence;
    let none = Vec::<(Vec<u8>, Vec<u8>)>::new();
    for dir in [Direction::Forward, Direction::Reverse] {
        assert_eq!(collect(store, col, b"", None, dir), none, "empty column");
    }
    store.put(col, b"b", b"1").unwrap();
    store.put(col, b"d", b"2").unwrap();
    for dir in [Direction::Forward, Direction::Reverse] {
        assert_eq!(
            collect(store, col, b"b", Some(b"b"), dir),
            none,
            "from == to"
        );
        assert_eq!(
            collect(store, col, b"d", Some(b"b"), dir),
            none,
            "from > to"
        );
        assert_eq!(
            collect(store, col, b"c", Some(b"d"), dir),
            none,
            "no key between"
        );
        assert_eq!(
            collect(store, col, b"", Some(b""), dir),
            none,
            "empty bounds"
        );
    }
    assert_eq!(store.iter_prefix(col, b"c").count(), 0);
}

pub(crate) fn prefix_iteration_handles_0xff(store: &dyn KvStore) {
    let col = Column::TxIndex;
    let all: [&[u8]; 8] = [
        &[0x01],
        &[0xfe],
        &[0xfe, 0xff],
        &[0xfe, 0xff, 0xff],
        &[0xff],
        &[0xff, 0x00],
        &[0xff, 0xff],
        &[0xff, 0xff, 0x01],
    ];
    for k in all {
        store.put(col, k, b"v").unwrap();
    }
    let prefix = |p: &[u8]| {
        store
            .iter_prefix(col, p)
            .map(|r| r.map(|(k, _)| k))
            .collect::<crate::Result<Vec<_>>>()
            .unwrap()
    };
    let v = |ks: &[&[u8]]| ks.iter().map(|k| k.to_vec()).collect::<Vec<_>>();

    assert_eq!(prefix(&[]), v(&all));
    assert_eq!(
        prefix(&[0xff]),
        v(&[&[0xff], &[0xff, 0x00], &[0xff, 0xff], &[0xff, 0xff, 0x01]])
    );
    assert_eq!(
        prefix(&[0xff, 0xff]),
        v(&[&[0xff, 0xff], &[0xff, 0xff, 0x01]])
    );
    assert_eq!(
        prefix(&[0xfe]),
        v(&[&[0xfe], &[0xfe, 0xff], &[0xfe, 0xff, 0xff]])
    );
    assert_eq!(
        prefix(&[0xfe, 0xff]),
        v(&[&[0xfe, 0xff], &[0xfe, 0xff, 0xff]])
    );
    assert_eq!(prefix(&[0xff, 0xff, 0xff]), Vec::<Vec<u8>>::new());
    assert_eq!(prefix(&[0x01]), v(&[&[0x01]]));
}

pub(crate) fn delete_range_removes_exactly_the_range(store: &dyn KvStore) {
    let col = Column::Receipts;
    let mut b = WriteBatch::new();
    for h in 0u64..20 {
        b.put(col, h.to_be_bytes().to_vec(), b"r".to_vec());
        b.put(Column::HeightIndex, h.to_be_bytes().to_vec(), b"h".to_vec());
    }
    store.write(b).unwrap();

    let mut b = WriteBatch::new();
    b.delete_range(
        col,
        5u64.to_be_bytes().to_vec(),
        10u64.to_be_bytes().to_vec(),
    );
    // Empty and inverted ranges delete nothing.
    b.delete_range(
        col,
        12u64.to_be_bytes().to_vec(),
        12u64.to_be_bytes().to_vec(),
    );
    b.delete_range(
        col,
        18u64.to_be_bytes().to_vec(),
        15u64.to_be_bytes().to_vec(),
    );
    store.write(b).unwrap();

    let left: Vec<u64> = keys(&collect(store, col, &[], None, Direction::Forward))
        .into_iter()
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect();
    let want: Vec<u64> = (0..5).chain(10..20).collect();
    assert_eq!(left, want);
    assert_eq!(
        collect(store, Column::HeightIndex, &[], None, Direction::Forward).len(),
        20,
        "other column untouched"
    );

    // Everything, with an upper bound past the last key.
    let mut b = WriteBatch::new();
    b.delete_range(col, Vec::new(), vec![0xff; 9]);
    store.write(b).unwrap();
    assert_eq!(collect(store, col, &[], None, Direction::Forward).len(), 0);
    // And the column is usable afterwards.
    store.put(col, &3u64.to_be_bytes(), b"again").unwrap();
    assert_eq!(
        store.get(col, &3u64.to_be_bytes()).unwrap(),
        Some(b"again".to_vec())
    );
}

pub(crate) fn drop_range_removes_exactly_the_range(store: &dyn KvStore) {
    let col = Column::Receipts;
    let put_heights = |heights: std::ops::Range<u64>| {
        for chunk in heights.collect::<Vec<_>>().chunks(100) {
            let mut b = WriteBatch::new();
            for h in chunk {
                b.put(col, h.to_be_bytes().to_vec(), vec![h.to_le_bytes()[0]; 300]);
            }
            store.write(b).unwrap();
        }
    };
    put_heights(0..2_000);
    // Older heights in the bottom level (RocksDB), newer ones in the memtable.
    store
        .compact_range(col, &[], &2_000u64.to_be_bytes())
        .unwrap();
    put_heights(2_000..2_300);
    let through = |h: u64| {
        let mut to = h.to_be_bytes().to_vec();
        to.push(0);
        to
    };
    store.drop_range(col, &[], &through(999)).unwrap();
    let left = |from: &[u8]| -> Vec<u64> {
        keys(&collect(store, col, from, None, Direction::Forward))
            .into_iter()
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect()
    };
    assert_eq!(left(&[]), (1_000..2_300).collect::<Vec<_>>());
    // Again, from the first key, over what is already gone and more.
    store.drop_range(col, &[], &through(2_049)).unwrap();
    assert_eq!(left(&[]), (2_050..2_300).collect::<Vec<_>>());
    assert_eq!(
        store.get(col, &2_050u64.to_be_bytes()).unwrap(),
        Some(vec![2_050u64.to_le_bytes()[0]; 300])
    );
    // Writes go on after it.
    put_heights(2_300..2_310);
    assert_eq!(left(&2_290u64.to_be_bytes()).len(), 20);
}

pub(crate) fn columns_are_isolated(store: &dyn KvStore) {
    for (i, col) in Column::ALL.into_iter().enumerate() {
        store.put(col, b"shared", &[i as u8]).unwrap();
        store.put(col, &[i as u8], b"own").unwrap();
    }
    let mut b = WriteBatch::new();
    b.delete(Column::Headers, b"shared".to_vec());
    b.delete_range(Column::Bodies, Vec::new(), vec![0xff; 8]);
    store.write(b).unwrap();

    for (i, col) in Column::ALL.into_iter().enumerate() {
        let pairs = collect(store, col, &[], None, Direction::Forward);
        match col {
            Column::Headers => assert_eq!(pairs, vec![(vec![i as u8], b"own".to_vec())]),
            Column::Bodies => assert!(pairs.is_empty()),
            _ => assert_eq!(
                pairs,
                vec![
                    (vec![i as u8], b"own".to_vec()),
                    (b"shared".to_vec(), vec![i as u8])
                ],
                "{col:?}"
            ),
        }
    }
}

pub(crate) fn compact_range_keeps_live_data(store: &dyn KvStore) {
    let col = Column::StateNodes;
    let mut b = WriteBatch::new();
    for i in 0u32..100 {
        b.put(col, i.to_be_bytes().to_vec(), vec![1; 100]);
    }
    b.delete_range(
        col,
        10u32.to_be_bytes().to_vec(),
        90u32.to_be_bytes().to_vec(),
    );
    store.write(b).unwrap();
    store
        .compact_range(col, &0u32.to_be_bytes(), &100u32.to_be_bytes())
        .unwrap();
    assert_eq!(collect(store, col, &[], None, Direction::Forward).len(), 20);
    assert_eq!(
        store.get(col, &95u32.to_be_bytes()).unwrap(),
        Some(vec![1; 100])
    );
    assert!(store.disk_size_bytes().is_ok());
}

/// `multi_get` answers exactly like one `get` per key, in the caller's order, sorted or not,
/// with absent keys and repeats.
pub(crate) fn write_layer_is_the_layer_then_the_batch(store: &dyn KvStore) {
    // What was there before: some of it under the layer's range delete.
    let mut before = WriteBatch::new();
    for i in 0u8..20 {
        before.put(Column::StateNodes, vec![i], vec![i; 3]);
        before.put(Column::Meta, vec![i], vec![1]);
    }
    let mut staged = WriteBatch::new();
    staged.delete_range(Column::StateNodes, vec![5u8], vec![10u8]);
    staged.put(Column::StateNodes, vec![7u8], b"new".to_vec());
    staged.delete(Column::StateNodes, vec![12u8]);
    staged.put(Column::Meta, vec![30u8], b"m".to_vec());
    let layer = crate::Layer::from_batch(&staged);
    let mut records = WriteBatch::new();
    records.put(Column::Meta, vec![30u8], b"record wins".to_vec());
    records.delete(Column::Meta, vec![3u8]);
    records.set_sync(true);

    let model = crate::MemStore::new();
    for s in [store, &model as &dyn KvStore] {
        s.write(before.clone()).unwrap();
    }
    store.write_layer(&layer, records.clone()).unwrap();
    model.write(layer.to_batch()).unwrap();
    model.write(records).unwrap();
    for col in [Column::StateNodes, Column::Meta] {
        assert_eq!(
            collect(store, col, &[], None, Direction::Forward),
            collect(&model, col, &[], None, Direction::Forward),
            "{col:?}"
        );
    }
}

pub(crate) fn multi_get_matches_get(store: &dyn KvStore) {
    let mut rng = XorShift(0x5eed);
    let mut batch = WriteBatch::new();
    for i in 0u32..300 {
        batch.put(
            Column::StateNodes,
            i.to_be_bytes().to_vec(),
            vec![i as u8; (i % 7) as usize],
        );
    }
    batch.put(
        Column::Meta,
        5u32.to_be_bytes().to_vec(),
        b"other column".to_vec(),
    );
    store.write(batch).unwrap();
    let mut keys: Vec<Vec<u8>> = (0..500)
        .map(|_| ((rng.next() % 400) as u32).to_be_bytes().to_vec())
        .collect();
    for sorted in [false, true] {
        if sorted {
            keys.sort();
        }
        let many = store.multi_get(Column::StateNodes, &keys).unwrap();
        assert_eq!(many.len(), keys.len());
        for (k, v) in keys.iter().zip(&many) {
            assert_eq!(*v, store.get(Column::StateNodes, k).unwrap(), "{k:?}");
        }
        assert!(many.iter().any(Option::is_none) && many.iter().any(Option::is_some));
    }
    assert!(store.multi_get(Column::StateNodes, &[]).unwrap().is_empty());
}

/// Instantiates every suite case as a `#[test]` in a module named `$backend`; `$make` returns
/// a fixture with a `store(&self) -> &dyn KvStore` method and lives for the whole case.
macro_rules! run_suite {
    ($backend:ident, $make:path) => {
        run_suite!(@cases $backend, $make, [
            get_put_delete,
            large_values_round_trip,
            empty_batch_is_a_no_op,
            batch_applies_ops_in_order,
            batch_spans_columns,
            batch_is_all_or_nothing_to_readers,
            extended_batch_keeps_order_and_sync,
            range_iteration_matches_model,
            range_bounds_are_inclusive_exclusive,
            empty_ranges_yield_nothing,
            prefix_iteration_handles_0xff,
            delete_range_removes_exactly_the_range,
            drop_range_removes_exactly_the_range,
            columns_are_isolated,
            compact_range_keeps_live_data,
            multi_get_matches_get,
            write_layer_is_the_layer_then_the_batch,
        ]);
    };
    (@cases $backend:ident, $make:path, [$($case:ident),* $(,)?]) => {
        mod $backend {
            $(
                #[test]
                fn $case() {
                    let fixture = $make();
                    $crate::suite::$case(fixture.store());
                }
            )*
        }
    };
}

/// A fresh [`crate::MemStore`].
pub(crate) struct MemFixture(crate::MemStore);

impl MemFixture {
    pub(crate) fn store(&self) -> &dyn KvStore {
        &self.0
    }
}

pub(crate) fn mem_fixture() -> MemFixture {
    MemFixture(crate::MemStore::new())
}

/// A fresh [`crate::RocksStore`] in a temporary directory removed on drop.
#[cfg(feature = "rocksdb")]
pub(crate) struct RocksFixture {
    // Declared first so it is dropped (closing the database) before the directory goes.
    store: crate::RocksStore,
    _dir: tempfile::TempDir,
}

#[cfg(feature = "rocksdb")]
impl RocksFixture {
    pub(crate) fn store(&self) -> &dyn KvStore {
        &self.store
    }
}

/// Small sizes so tests stay light; the options themselves are tested in `rocks`.
#[cfg(feature = "rocksdb")]
pub(crate) fn small_rocks_config() -> crate::RocksConfig {
    crate::RocksConfig {
        block_cache_size: 8 << 20,
        write_buffer_size: 1 << 20,
        ..crate::RocksConfig::default()
    }
}

#[cfg(feature = "rocksdb")]
pub(crate) fn rocks_fixture() -> RocksFixture {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::RocksStore::open(dir.path(), &small_rocks_config()).unwrap();
    RocksFixture { store, _dir: dir }
}

run_suite!(mem_store, crate::suite::mem_fixture);
#[cfg(feature = "rocksdb")]
run_suite!(rocks_store, crate::suite::rocks_fixture);
