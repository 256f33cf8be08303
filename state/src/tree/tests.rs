#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};

use keel_storage::{Direction, MemStore};
use proptest::prelude::*;

use super::node::{bit, internal_hash};
use super::*;

type Model = BTreeMap<Hash, Vec<u8>>;

fn new_tree() -> (Arc<MemStore>, StateTree) {
    let store = Arc::new(MemStore::new());
    let tree = StateTree::new(store.clone());
    (store, tree)
}

/// Applies and commits one version, then hands its upper levels to the node cache (as the
/// node does for every final block).
fn commit(
    store: &MemStore,
    tree: &StateTree,
    base: Option<u64>,
    version: u64,
    updates: &[(Hash, Option<Vec<u8>>)],
) -> Hash {
    let mut batch = WriteBatch::new();
    let (root, fresh) = tree
        .apply_fresh(base, version, updates, None, &mut batch)
        .unwrap();
    store.write(batch).unwrap();
    tree.cache_committed(fresh);
    root
}

/// The canonical binary sparse Merkle root of a key set, computed straight from the rules in
/// the README (no nibbles, no storage): the reference the tree must agree with.
fn reference_root(model: &Model) -> Hash {
    fn go(entries: &[(Hash, Hash)], depth: usize) -> Hash {
        match entries {
            [] => EMPTY_ROOT,
            [(_, h)] => *h,
            _ => {
                let split = entries.partition_point(|(k, _)| !bit(k, depth));
                let (l, r) = entries.split_at(split);
                internal_hash(&go(l, depth + 1), &go(r, depth + 1))
            }
        }
    }
    let entries: Vec<(Hash, Hash)> = model
        .iter()
        .map(|(k, v)| (*k, node::leaf_hash(k, &Hash::digest(v))))
        .collect();
    go(&entries, 0)
}

/// Keys that exercise deep paths: random ones plus clusters sharing 10 and 31 bytes.
fn key_pool() -> Vec<Hash> {
    let mut keys: Vec<Hash> = (0u32..24).map(|i| Hash::digest(&i.to_le_bytes())).collect();
    let base = Hash::digest(b"cluster");
    for i in 0..8u8 {
        let mut k = base;
        k.0[31] = i;
        keys.push(k);
        let mut k = base;
        k.0[10] ^= i << 4;
        keys.push(k);
    }
    let mut k = base;
    k.0[31] ^= 0x80;
    keys.push(k);
    keys
}

fn assert_version_matches(tree: &StateTree, version: u64, model: &Model, pool: &[Hash]) {
    let root = tree.root(version).unwrap();
    assert_eq!(root, reference_root(model), "root of version {version}");
    for key in pool {
        assert_eq!(
            tree.get(version, key).unwrap().as_ref(),
            model.get(key),
            "get at version {version}"
        );
    }
    let many = tree.get_many(version, pool).unwrap();
    for (key, value) in pool.iter().zip(&many) {
        assert_eq!(
            value.as_ref(),
            model.get(key),
            "get_many at version {version}"
        );
    }
}

fn assert_proofs(tree: &StateTree, version: u64, model: &Model, pool: &[Hash]) {
    let root = tree.root(version).unwrap();
    for key in pool {
        let (value, proof) = tree.get_with_proof(version, key).unwrap();
        assert_eq!(value.as_ref(), model.get(key));
        verify_proof(&root, key, value.as_deref(), &proof).unwrap();
        // The opposite claim must fail.
        match &value {
            Some(_) => assert!(verify_proof(&root, key, None, &proof).is_err()),
            None => assert!(verify_proof(&root, key, Some(b"x"), &proof).is_err()),
        }
    }
}

/// Deletes what a pruner keeping versions `>= keep_from` deletes, using only the stale index.
fn prune(store: &Arc<MemStore>, keep_from: u64) {
    let tree = StateTree::new(store.clone());
    let mut batch = WriteBatch::new();
    tree.stage_prune(keep_from, &mut batch).unwrap();
    store.write(batch).unwrap();
}

/// Every StateNodes key reachable from the root pointer of `version`.
fn reachable(tree: &StateTree, version: u64, out: &mut HashSet<Vec<u8>>) {
    fn walk(tree: &StateTree, r: ChildRef, path: NibblePath, out: &mut HashSet<Vec<u8>>) {
        let key = NodeKey {
            version: r.version,
            path,
        };
        out.insert(key.encode());
        if r.is_leaf {
            return;
        }
        let children = tree.load_internal(&key).unwrap();
        for (i, c) in children.iter().enumerate() {
            if let Some(c) = c {
                walk(tree, *c, path.child(i as u8), out);
            }
        }
    }
    out.insert(root_pointer_key(version));
    if let Some(r) = tree.root_ref(version).unwrap() {
        walk(tree, r, NibblePath::ROOT, out);
    }
}

fn stored_keys(store: &MemStore, col: Column) -> HashSet<Vec<u8>> {
    store
        .iter_range(col, &[], None, Direction::Forward)
        .map(|i| i.unwrap().0)
        .collect()
}

type Batch = Vec<(usize, Option<Vec<u8>>)>;

fn batches_strategy() -> impl Strategy<Value = Vec<Batch>> {
    let update = (
        0..key_pool().len(),
        proptest::option::weighted(0.7, proptest::collection::vec(any::<u8>(), 0..6)),
    );
    proptest::collection::vec(proptest::collection::vec(update, 0..40), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tree_matches_a_btreemap_model_at_every_version(batches in batches_strategy(), keep in 0usize..8) {
        let pool = key_pool();
        let (store, tree) = new_tree();
        // The same versions staged by a tree that reads everything from the store (an empty
        // cache, no committed upper levels): the staged bytes must be identical.
        let uncached_store = Arc::new(MemStore::new());
        let mut models: Vec<Model> = Vec::new();
        let mut model = Model::new();
        for (i, batch) in batches.iter().enumerate() {
            let version = i as u64;
            let updates: Vec<(Hash, Option<Vec<u8>>)> =
                batch.iter().map(|(k, v)| (pool[*k], v.clone())).collect();
            for (k, v) in &updates {
                match v {
                    Some(v) => model.insert(*k, v.clone()),
                    None => model.remove(k),
                };
            }
            let base = version.checked_sub(1);
            let mut expected = WriteBatch::new();
            let uncached = StateTree::new(uncached_store.clone());
            let expected_root = uncached.apply(base, version, &updates, &mut expected).unwrap();
            let mut staged = WriteBatch::new();
            // As block execution does: read the keys first, hand the nodes read to the update.
            let read = match base {
                Some(b) => {
                    let keys: Vec<Hash> = updates.iter().map(|u| u.0).collect();
                    let (values, read) = tree.get_many_for_update(b, &keys).unwrap();
                    prop_assert_eq!(values, tree.get_many(b, &keys).unwrap());
                    Some(read)
                }
                None => None,
            };
            let (root, fresh) = tree
                .apply_fresh(base, version, &updates, read.as_ref(), &mut staged)
                .unwrap();
            prop_assert_eq!(&staged, &expected);
            prop_assert_eq!(root, expected_root);
            prop_assert_eq!(root, reference_root(&model));
            uncached_store.write(expected).unwrap();
            store.write(staged).unwrap();
            tree.cache_committed(fresh);
            models.push(model.clone());
            // Old versions stay readable.
            for (v, m) in models.iter().enumerate() {
                assert_version_matches(&tree, v as u64, m, &pool);
            }
        }
        let last = models.len() - 1;
        assert_proofs(&tree, last as u64, &models[last], &pool);

        // The same final key set in one batch from scratch gives the same root.
        let (store2, tree2) = new_tree();
        let all: Vec<(Hash, Option<Vec<u8>>)> = model.iter().map(|(k, v)| (*k, Some(v.clone()))).collect();
        prop_assert_eq!(commit(&store2, &tree2, None, 0, &all), tree.root(last as u64).unwrap());

        // The stale index lets a pruner delete exactly what no kept version needs.
        let keep = (keep.min(last)) as u64;
        prune(&store, keep);
        let mut live = HashSet::new();
        for v in keep..=last as u64 {
            assert_version_matches(&tree, v, &models[v as usize], &pool);
            reachable(&tree, v, &mut live);
        }
        prop_assert_eq!(stored_keys(&store, Column::StateNodes), live);
        // Only the stale records of versions after `keep` remain.
        for k in stored_keys(&store, Column::StateStale) {
            prop_assert!(u64::from_be_bytes(k[..8].try_into().unwrap()) > keep);
        }
        for v in 0..keep {
            prop_assert!(matches!(tree.root(v), Err(Error::VersionNotFound(x)) if x == v));
        }
    }

    #[test]
    fn root_is_independent_of_update_order_and_batching(
        entries in proptest::collection::btree_map(any::<[u8; 32]>(), proptest::collection::vec(any::<u8>(), 0..4), 0..60),
        split in any::<proptest::sample::Index>(),
        seed in any::<u64>(),
    ) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut items: Vec<(Hash, Option<Vec<u8>>)> =
            entries.iter().map(|(k, v)| (Hash(*k), Some(v.clone()))).collect();
        let (s1, t1) = new_tree();
        let one = commit(&s1, &t1, None, 0, &items);

        items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let cut = if items.is_empty() { 0 } else { split.index(items.len() + 1) };
        let (a, b) = items.split_at(cut);
        let (s2, t2) = new_tree();
        commit(&s2, &t2, None, 1, a);
        let two = commit(&s2, &t2, Some(1), 2, b);
        prop_assert_eq!(one, two);
        let model: Model = entries.into_iter().map(|(k, v)| (Hash(k), v)).collect();
        prop_assert_eq!(one, reference_root(&model));
    }
}

#[test]
fn empty_tree_root_is_the_zero_hash() {
    let (store, tree) = new_tree();
    assert_eq!(EMPTY_ROOT, Hash::ZERO);
    assert_eq!(commit(&store, &tree, None, 0, &[]), EMPTY_ROOT);
    assert_eq!(tree.root(0).unwrap(), EMPTY_ROOT);
    let key = Hash::digest(b"nothing");
    assert_eq!(tree.get(0, &key).unwrap(), None);
    let (value, proof) = tree.get_with_proof(0, &key).unwrap();
    assert_eq!(value, None);
    assert_eq!(
        proof,
        Proof {
            leaf: None,
            siblings: vec![]
        }
    );
    verify_proof(&EMPTY_ROOT, &key, None, &proof).unwrap();
}

#[test]
fn single_key_root_is_its_leaf_hash() {
    let (store, tree) = new_tree();
    let key = Hash::digest(b"only");
    let root = commit(&store, &tree, None, 0, &[(key, Some(b"v".to_vec()))]);
    assert_eq!(root, node::leaf_hash(&key, &Hash::digest(b"v")));
    let (value, proof) = tree.get_with_proof(0, &key).unwrap();
    assert_eq!(value.as_deref(), Some(&b"v"[..]));
    assert!(proof.siblings.is_empty());
    verify_proof(&root, &key, Some(b"v"), &proof).unwrap();
    let other = Hash::digest(b"other");
    let (value, proof) = tree.get_with_proof(0, &other).unwrap();
    assert_eq!(value, None);
    assert_eq!(proof.leaf.as_ref().map(|l| l.key), Some(key));
    verify_proof(&root, &other, None, &proof).unwrap();
}

#[test]
fn deleting_inserted_keys_restores_the_earlier_root() {
    let (store, tree) = new_tree();
    let base: Vec<(Hash, Option<Vec<u8>>)> = (0u32..50)
        .map(|i| (Hash::digest(&i.to_le_bytes()), Some(vec![i as u8])))
        .collect();
    let r0 = commit(&store, &tree, None, 0, &base);
    let extra: Vec<(Hash, Option<Vec<u8>>)> = (50u32..90)
        .map(|i| (Hash::digest(&i.to_le_bytes()), Some(vec![1, 2, 3])))
        .collect();
    let r1 = commit(&store, &tree, Some(0), 1, &extra);
    assert_ne!(r0, r1);
    let deletes: Vec<(Hash, Option<Vec<u8>>)> = extra.iter().map(|(k, _)| (*k, None)).collect();
    let r2 = commit(&store, &tree, Some(1), 2, &deletes);
    assert_eq!(r2, r0);
    // Deleting everything gives the empty root.
    let all: Vec<(Hash, Option<Vec<u8>>)> = base.iter().map(|(k, _)| (*k, None)).collect();
    assert_eq!(commit(&store, &tree, Some(2), 3, &all), EMPTY_ROOT);
    assert_eq!(tree.root(1).unwrap(), r1);
}

#[test]
fn version_without_changes_has_a_root_and_writes_no_nodes() {
    let (store, tree) = new_tree();
    let r0 = commit(
        &store,
        &tree,
        None,
        0,
        &[
            (Hash::digest(b"a"), Some(vec![1])),
            (Hash::digest(b"b"), Some(vec![2])),
        ],
    );
    let mut batch = WriteBatch::new();
    // Deleting an absent key and rewriting a value unchanged are no-ops.
    let updates = vec![
        (Hash::digest(b"zz"), None),
        (Hash::digest(b"a"), Some(vec![1])),
    ];
    assert_eq!(tree.apply(Some(0), 1, &updates, &mut batch).unwrap(), r0);
    // Only the root pointer and the stale record of the old pointer.
    assert_eq!(batch.len(), 2);
    store.write(batch).unwrap();
    assert_eq!(tree.root(1).unwrap(), r0);
    assert_eq!(tree.get(1, &Hash::digest(b"b")).unwrap(), Some(vec![2]));
}

#[test]
fn versions_must_exist_and_move_forward() {
    let (store, tree) = new_tree();
    assert!(matches!(tree.root(0), Err(Error::VersionNotFound(0))));
    assert!(matches!(
        tree.get(3, &Hash::ZERO),
        Err(Error::VersionNotFound(3))
    ));
    let mut batch = WriteBatch::new();
    assert!(matches!(
        tree.apply(Some(0), 1, &[], &mut batch),
        Err(Error::VersionNotFound(0))
    ));
    commit(&store, &tree, None, 5, &[]);
    assert!(matches!(
        tree.apply(Some(5), 5, &[], &mut batch),
        Err(Error::BadVersion {
            base: 5,
            version: 5
        })
    ));
    assert!(matches!(
        tree.apply(Some(5), 4, &[], &mut batch),
        Err(Error::BadVersion { .. })
    ));
    assert!(batch.is_empty());
}

#[test]
fn last_update_to_a_key_wins() {
    let (store, tree) = new_tree();
    let k = Hash::digest(b"k");
    commit(
        &store,
        &tree,
        None,
        0,
        &[(k, Some(vec![1])), (k, None), (k, Some(vec![3]))],
    );
    assert_eq!(tree.get(0, &k).unwrap(), Some(vec![3]));
    commit(&store, &tree, Some(0), 1, &[(k, Some(vec![4])), (k, None)]);
    assert_eq!(tree.get(1, &k).unwrap(), None);
}

#[test]
fn keys_sharing_255_bits_get_a_256_sibling_proof() {
    let (store, tree) = new_tree();
    let a = Hash([0xAB; 32]);
    let mut b = a;
    b.0[31] ^= 1;
    let root = commit(
        &store,
        &tree,
        None,
        0,
        &[(a, Some(vec![1])), (b, Some(vec![2]))],
    );
    let (value, proof) = tree.get_with_proof(0, &a).unwrap();
    assert_eq!(value, Some(vec![1]));
    assert_eq!(proof.siblings.len(), 256);
    verify_proof(&root, &a, Some(&[1]), &proof).unwrap();
    // Deleting one lifts the other back to the root.
    let r1 = commit(&store, &tree, Some(0), 1, &[(a, None)]);
    assert_eq!(r1, node::leaf_hash(&b, &Hash::digest(&[2])));
    assert_eq!(tree.get(1, &b).unwrap(), Some(vec![2]));
}

#[test]
fn tampering_with_anything_breaks_a_proof() {
    let (store, tree) = new_tree();
    let updates: Vec<(Hash, Option<Vec<u8>>)> = (0u32..300)
        .map(|i| {
            (
                Hash::digest(&i.to_le_bytes()),
                Some(i.to_le_bytes().to_vec()),
            )
        })
        .collect();
    let root = commit(&store, &tree, None, 0, &updates);
    let flip = |h: &Hash, byte: usize| {
        let mut h = *h;
        h.0[byte] ^= 1;
        h
    };
    // Present keys.
    for (key, value) in updates.iter().step_by(37) {
        let value = value.as_deref().unwrap();
        let (got, proof) = tree.get_with_proof(0, key).unwrap();
        assert_eq!(got.as_deref(), Some(value));
        verify_proof(&root, key, Some(value), &proof).unwrap();
        let mut bad_value = value.to_vec();
        bad_value[0] ^= 1;
        assert!(verify_proof(&root, key, Some(&bad_value), &proof).is_err());
        assert!(verify_proof(&root, &flip(key, 5), Some(value), &proof).is_err());
        assert!(verify_proof(&flip(&root, 31), key, Some(value), &proof).is_err());
        for i in 0..proof.siblings.len() {
            let mut p = proof.clone();
            p.siblings[i] = flip(&p.siblings[i], i % 32);
            assert!(verify_proof(&root, key, Some(value), &p).is_err());
        }
        let mut p = proof.clone();
        p.siblings.push(EMPTY_ROOT);
        assert!(verify_proof(&root, key, Some(value), &p).is_err());
        let mut p = proof.clone();
        p.siblings.pop();
        assert!(verify_proof(&root, key, Some(value), &p).is_err());
    }
    // Absent keys, ending both in empty slots and in other leaves.
    let mut saw_leaf = false;
    let mut saw_empty = false;
    for i in 1000u32..1100 {
        let key = Hash::digest(&i.to_le_bytes());
        let (got, proof) = tree.get_with_proof(0, &key).unwrap();
        assert_eq!(got, None);
        verify_proof(&root, &key, None, &proof).unwrap();
        assert!(verify_proof(&flip(&root, 0), &key, None, &proof).is_err());
        if let Some(leaf) = &proof.leaf {
            saw_leaf = true;
            let mut p = proof.clone();
            p.leaf = Some(ProofLeaf {
                key: leaf.key,
                value_hash: flip(&leaf.value_hash, 3),
            });
            assert!(verify_proof(&root, &key, None, &p).is_err());
            let mut p = proof.clone();
            p.leaf = Some(ProofLeaf {
                key: flip(&leaf.key, 31),
                value_hash: leaf.value_hash,
            });
            assert!(verify_proof(&root, &key, None, &p).is_err());
            // Hiding the leaf does not make the path empty.
            let mut p = proof.clone();
            p.leaf = None;
            assert!(verify_proof(&root, &key, None, &p).is_err());
        } else {
            saw_empty = true;
        }
        for j in 0..proof.siblings.len() {
            let mut p = proof.clone();
            p.siblings[j] = flip(&p.siblings[j], 0);
            assert!(verify_proof(&root, &key, None, &p).is_err());
        }
    }
    assert!(saw_leaf && saw_empty);
    // A membership proof cannot be replayed for another key.
    let (k0, v0) = (&updates[0].0, updates[0].1.as_deref().unwrap());
    let (_, proof) = tree.get_with_proof(0, k0).unwrap();
    assert!(verify_proof(&root, &updates[1].0, None, &proof).is_err());
    assert!(verify_proof(&root, &updates[1].0, Some(v0), &proof).is_err());
}

#[test]
fn proof_json_round_trips_as_hex() {
    let (store, tree) = new_tree();
    let k = Hash::digest(b"k");
    let root = commit(
        &store,
        &tree,
        None,
        0,
        &[(k, Some(vec![7])), (Hash::digest(b"j"), Some(vec![8]))],
    );
    let (_, proof) = tree.get_with_proof(0, &k).unwrap();
    let json = serde_json::to_string(&proof).unwrap();
    assert!(json.starts_with("{\"leaf\":{\"key\":\"0x"), "{json}");
    let back: Proof = serde_json::from_str(&json).unwrap();
    assert_eq!(back, proof);
    verify_proof(&root, &k, Some(&[7]), &back).unwrap();
}

#[test]
fn large_batches_built_in_parallel_match_the_reference() {
    let (store, tree) = new_tree();
    let mut model = Model::new();
    let first: Vec<(Hash, Option<Vec<u8>>)> = (0u32..5000)
        .map(|i| (Hash::digest(&i.to_le_bytes()), Some(vec![i as u8; 3])))
        .collect();
    model.extend(first.iter().map(|(k, v)| (*k, v.clone().unwrap())));
    let r0 = commit(&store, &tree, None, 0, &first);
    assert_eq!(r0, reference_root(&model));
    // Update, delete and insert, several thousand keys at once.
    let mut second = Vec::new();
    for i in (0u32..8000).step_by(2) {
        let k = Hash::digest(&i.to_le_bytes());
        if i % 3 == 0 {
            second.push((k, None));
            model.remove(&k);
        } else {
            second.push((k, Some(vec![9])));
            model.insert(k, vec![9]);
        }
    }
    let r1 = commit(&store, &tree, Some(0), 1, &second);
    assert_eq!(r1, reference_root(&model));
    for i in (0u32..8000).step_by(97) {
        let k = Hash::digest(&i.to_le_bytes());
        assert_eq!(tree.get(1, &k).unwrap().as_ref(), model.get(&k));
    }
    // Batched reads (big enough to go parallel), absent keys and repeats included.
    let keys: Vec<Hash> = (0u32..9000)
        .chain(0..50)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let many = tree.get_many(1, &keys).unwrap();
    assert_eq!(many.len(), keys.len());
    for (k, v) in keys.iter().zip(&many) {
        assert_eq!(v.as_ref(), model.get(k));
    }
    // The same batch staged twice gives the same bytes, whatever rayon's scheduling.
    let mut b1 = WriteBatch::new();
    let mut b2 = WriteBatch::new();
    tree.apply(Some(1), 2, &second, &mut b1).unwrap();
    tree.apply(Some(1), 2, &second, &mut b2).unwrap();
    assert_eq!(b1, b2);
}

/// A tree over an overlay of pending versions shares the database tree's node cache for
/// committed versions only: a losing branch's nodes never reach the cache, so the branch that
/// is committed later reads back exactly.
#[test]
fn overlay_trees_share_the_cache_for_committed_versions_only() {
    use keel_storage::{Layer, OverlayStore};

    let (store, tree) = new_tree();
    let keys: Vec<Hash> = (0u32..600)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let put = |tag: u8| -> Vec<(Hash, Option<Vec<u8>>)> {
        keys.iter().map(|k| (*k, Some(vec![tag, k.0[0]]))).collect()
    };
    commit(&store, &tree, None, 0, &put(0));
    commit(&store, &tree, Some(0), 1, &put(1));
    // Every node reachable at version 1 is now cached.
    let at1 = tree.get_many(1, &keys).unwrap();
    assert!(at1.iter().all(|v| v.as_ref().is_some_and(|v| v[0] == 1)));
    let cache = tree.node_cache();
    let cached = cache.len();
    assert!(cached > 0);

    // Two competing versions 2 over version 1, each only in an overlay.
    let half: Vec<(Hash, Option<Vec<u8>>)> = put(2).into_iter().step_by(2).collect();
    let other: Vec<(Hash, Option<Vec<u8>>)> = put(3).into_iter().skip(1).step_by(2).collect();
    let branch = |updates: &[(Hash, Option<Vec<u8>>)]| {
        let mut batch = WriteBatch::new();
        let root = tree.apply(Some(1), 2, updates, &mut batch).unwrap();
        let view = OverlayStore::new(store.clone(), vec![Arc::new(Layer::from_batch(&batch))]);
        let branch_tree = StateTree::with_shared_cache(Arc::new(view), cache.clone(), 1);
        (root, batch, branch_tree)
    };
    let (root_a, batch_a, tree_a) = branch(&half);
    let (_, _, tree_b) = branch(&other);
    for (t, tag, updated) in [(&tree_a, 2u8, 0usize), (&tree_b, 3, 1)] {
        let values = t.get_many(2, &keys).unwrap();
        for (i, v) in values.iter().enumerate() {
            let expect = if i % 2 == updated { tag } else { 1 };
            assert_eq!(v.as_ref().unwrap()[0], expect, "key {i}");
        }
    }
    // The branches read their committed part through the cache and added nothing of theirs.
    assert_eq!(cache.len(), cached);

    // Branch A is committed: the database tree reads it back exactly.
    store.write(batch_a).unwrap();
    assert_eq!(tree.root(2).unwrap(), root_a);
    let values = tree.get_many(2, &keys).unwrap();
    for (i, v) in values.iter().enumerate() {
        assert_eq!(v.as_ref().unwrap()[0], if i % 2 == 0 { 2 } else { 1 });
        assert_eq!(tree.get(2, &keys[i]).unwrap(), *v);
    }
}

/// Upper-level nodes handed to the cache after each commit are what the next versions
/// update: their stored binary levels must give exactly the hashes of a rebuild from
/// scratch, through inserts, updates, deletes (nodes collapsing) and reinserts, in a tree big
/// enough for parallel subtree builds.
#[test]
fn committed_upper_levels_in_the_cache_give_the_same_versions() {
    let keys: Vec<Hash> = (0u32..3_000)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let (store, tree) = new_tree();
    let plain_store = Arc::new(MemStore::new());
    let mut model = Model::new();
    for version in 0u64..12 {
        let updates: Vec<(Hash, Option<Vec<u8>>)> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i as u64 + version) % 3 == 0 || *i as u64 % 7 == version % 7)
            .map(|(i, k)| {
                let delete = version % 4 == 3 && i % 2 == 0;
                (*k, (!delete).then(|| vec![version as u8, i as u8]))
            })
            .collect();
        for (k, v) in &updates {
            match v {
                Some(v) => model.insert(*k, v.clone()),
                None => model.remove(k),
            };
        }
        let base = version.checked_sub(1);
        let root = commit(&store, &tree, base, version, &updates);
        let mut batch = WriteBatch::new();
        let plain = StateTree::new(plain_store.clone());
        assert_eq!(
            plain.apply(base, version, &updates, &mut batch).unwrap(),
            root
        );
        plain_store.write(batch).unwrap();
        assert_eq!(root, reference_root(&model), "version {version}");
    }
    // The cache holds the latest upper levels: about 1 + 16 + 256 + some of level 3.
    assert!(tree.node_cache().len() > 273, "{}", tree.node_cache().len());
}

/// The memory governor shrinks the node cache under pressure and gives it back after: the
/// cache drops to the new capacity at once and reads stay right through it.
#[test]
fn the_node_cache_shrinks_and_grows_back_on_demand() {
    let keys: Vec<Hash> = (0u32..2_000)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let (store, tree) = new_tree();
    let updates: Vec<(Hash, Option<Vec<u8>>)> = keys.iter().map(|k| (*k, Some(vec![7]))).collect();
    commit(&store, &tree, None, 0, &updates);
    let cache = tree.node_cache();
    cache.set_capacity(100_000);
    for k in &keys {
        tree.get(0, k).unwrap();
    }
    let full = cache.len();
    assert!(full > 1_000, "{full}");
    cache.set_capacity(64);
    assert!(
        cache.capacity() <= 64 + CACHE_SHARDS,
        "{}",
        cache.capacity()
    );
    assert!(
        cache.len() <= UPPER_SLOTS + 64 + CACHE_SHARDS,
        "{} of {full} left",
        cache.len()
    );
    for k in &keys {
        assert_eq!(tree.get(0, k).unwrap(), Some(vec![7]));
    }
    cache.set_capacity(100_000);
    assert!(cache.capacity() >= 100_000);
}
