//! Tree nodes, their keys in `Column::StateNodes`, their byte encoding and their hashes.
//!
//! On disk:
//! - node key: `version` (u64 big-endian) ++ nibble count (1 byte, 0..=64) ++ the nibbles
//!   packed two per byte, high nibble first (a trailing odd nibble is followed by a zero nibble);
//! - root pointer of a version: `version` (u64 big-endian) ++ `0xFF` (never a nibble count);
//! - leaf node: `0x00` ++ key (32) ++ value bytes;
//! - internal node: `0x01` ++ child bitmap (u16 BE, bit `i` = slot `i`) ++ leaf bitmap (u16 BE)
//!   ++ for each present child in slot order: its version (u64 BE) ++ its hash (32);
//! - root pointer: `0x00` (empty tree) or `0x01` (leaf) / `0x02` (internal) ++ the root node's
//!   version (u64 BE) ++ its hash (32). The root node always sits at the empty path.

use std::sync::Arc;

use keel_types::Hash;

use crate::{Error, Result};

/// Hash of an empty subtree, and so the root of the empty tree.
pub const EMPTY_ROOT: Hash = Hash::ZERO;

/// blake3 key of leaf hashes (keyed mode: the domain is the key, so the input stays 64
/// bytes, one blake3 block and one compression, where a domain byte would make it two).
pub(crate) const LEAF_KEY: [u8; 32] = *b"keel state tree leaf hash  v1.0 ";
/// blake3 key of internal (binary) node hashes.
pub(crate) const INTERNAL_KEY: [u8; 32] = *b"keel state tree inner hash v1.0 ";

/// blake3 in keyed mode over `a ++ b`.
fn keyed_pair(key: &[u8; 32], a: &Hash, b: &Hash) -> Hash {
    let mut input = [0u8; 64];
    let (first, second) = input.split_at_mut(32);
    first.copy_from_slice(a.as_bytes());
    second.copy_from_slice(b.as_bytes());
    Hash(*blake3::keyed_hash(key, &input).as_bytes())
}

/// Hash of a leaf: `blake3_keyed(LEAF_KEY, key ++ blake3(value))`.
pub(crate) fn leaf_hash(key: &Hash, value_hash: &Hash) -> Hash {
    keyed_pair(&LEAF_KEY, key, value_hash)
}

/// Hash of a binary node: `blake3_keyed(INTERNAL_KEY, left ++ right)`.
pub(crate) fn internal_hash(left: &Hash, right: &Hash) -> Hash {
    keyed_pair(&INTERNAL_KEY, left, right)
}

/// Nibbles in a key.
pub(crate) const MAX_NIBBLES: usize = 64;

/// Nibble `i` (0 = high nibble of byte 0) of `key`. Callers keep `i < 64`.
pub(crate) fn nibble(key: &Hash, i: usize) -> u8 {
    let byte = key.0.get(i / 2).copied().unwrap_or(0);
    if i % 2 == 0 {
        byte >> 4
    } else {
        byte & 0x0f
    }
}

/// Bit `i` (0 = most significant bit of byte 0) of `key`. Callers keep `i < 256`.
pub(crate) fn bit(key: &Hash, i: usize) -> bool {
    let byte = key.0.get(i / 8).copied().unwrap_or(0);
    (byte >> (7 - (i % 8))) & 1 == 1
}

/// The first `len` nibbles of a key: where a node sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NibblePath {
    /// Nibbles beyond `len` are zero, so equal paths compare equal.
    bytes: [u8; 32],
    len: u8,
}

impl NibblePath {
    /// The empty path: where the root sits.
    pub(crate) const ROOT: NibblePath = NibblePath {
        bytes: [0; 32],
        len: 0,
    };

    /// Number of nibbles.
    pub(crate) fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// The last nibble (0 for the root).
    pub(crate) fn last_nibble(&self) -> u8 {
        match self.len() {
            0 => 0,
            n => {
                let byte = self.bytes.get((n - 1) / 2).copied().unwrap_or(0);
                if n % 2 == 1 {
                    byte >> 4
                } else {
                    byte & 0x0f
                }
            }
        }
    }

    /// This path extended by one nibble. Callers keep the path shorter than 64 nibbles.
    pub(crate) fn child(&self, nibble: u8) -> NibblePath {
        let i = self.len();
        let mut bytes = self.bytes;
        if let Some(b) = bytes.get_mut(i / 2) {
            if i % 2 == 0 {
                *b = (nibble & 0x0f) << 4;
            } else {
                *b |= nibble & 0x0f;
            }
        }
        NibblePath {
            bytes,
            len: self.len.saturating_add(1),
        }
    }

    /// Where the path sits among all paths of at most four nibbles, shortest first (0 for
    /// the root, 1..=16 for one nibble, ..., 4,369..69,905 for four), or `None` if longer.
    pub(crate) fn upper_index(&self) -> Option<usize> {
        const OFFSETS: [usize; 5] = [0, 1, 17, 273, 4_369];
        let len = self.len();
        let offset = OFFSETS.get(len)?;
        let first = usize::from(self.bytes[0]) << 8 | usize::from(self.bytes[1]);
        Some(offset + (first >> (16 - 4 * len)))
    }

    fn packed(&self) -> &[u8] {
        let n = self.len().div_ceil(2);
        self.bytes.get(..n).unwrap_or(&self.bytes)
    }
}

/// Where a node is stored: each node is written once, under the version that created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NodeKey {
    pub(crate) version: u64,
    pub(crate) path: NibblePath,
}

impl NodeKey {
    /// The `Column::StateNodes` key.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let packed = self.path.packed();
        let mut out = Vec::with_capacity(9 + packed.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(self.path.len);
        out.extend_from_slice(packed);
        out
    }

    /// Parses a `Column::StateNodes` node key (not a root pointer key).
    #[cfg(test)]
    pub(crate) fn decode(bytes: &[u8]) -> Option<NodeKey> {
        let version = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let len = *bytes.get(8)?;
        if usize::from(len) > MAX_NIBBLES {
            return None;
        }
        let packed = bytes.get(9..)?;
        if packed.len() != usize::from(len).div_ceil(2) {
            return None;
        }
        let mut path = NibblePath {
            bytes: [0; 32],
            len,
        };
        path.bytes.get_mut(..packed.len())?.copy_from_slice(packed);
        Some(NodeKey { version, path })
    }
}

/// The `Column::StateNodes` key of the root pointer of `version`.
pub(crate) fn root_pointer_key(version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(0xFF);
    out
}

/// What a parent knows about a child: enough to hash it and to find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChildRef {
    /// Version the child node was written at (its path is the parent's path + slot).
    pub(crate) version: u64,
    /// The child's hash (a leaf hash, or the hash of the child internal node).
    pub(crate) hash: Hash,
    /// Whether the child is a leaf.
    pub(crate) is_leaf: bool,
}

/// Encodes a root pointer (`None` = empty tree).
pub(crate) fn encode_root_pointer(root: Option<&ChildRef>) -> Vec<u8> {
    match root {
        None => vec![0],
        Some(r) => {
            let mut out = Vec::with_capacity(41);
            out.push(if r.is_leaf { 1 } else { 2 });
            out.extend_from_slice(&r.version.to_be_bytes());
            out.extend_from_slice(r.hash.as_bytes());
            out
        }
    }
}

/// Decodes a root pointer.
pub(crate) fn decode_root_pointer(bytes: &[u8]) -> Result<Option<ChildRef>> {
    let corrupt = |reason: &str| Error::Corrupt {
        what: "state root pointer",
        reason: reason.into(),
    };
    match bytes.split_first() {
        Some((0, [])) => Ok(None),
        Some((&tag @ (1 | 2), rest)) if rest.len() == 40 => {
            let (v, h) = rest.split_at(8);
            let version = u64::from_be_bytes(v.try_into().map_err(|_| corrupt("short version"))?);
            let hash = Hash(h.try_into().map_err(|_| corrupt("short hash"))?);
            Ok(Some(ChildRef {
                version,
                hash,
                is_leaf: tag == 1,
            }))
        }
        _ => Err(corrupt("bad tag or length")),
    }
}

/// A leaf: one key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeafNode {
    pub(crate) key: Hash,
    pub(crate) value: Vec<u8>,
}

/// Sixteen child slots, one per nibble.
pub(crate) type Children = [Option<ChildRef>; 16];

/// The 15 hashes of the binary tree over an internal node's slots, in heap order: `[0]` is
/// the range of all 16 slots (the node's hash), `[1]` and `[2]` its halves, `[3..7]` the
/// quarters and `[7..15]` the pairs. Heap node `i` (1-based) is stored at `[i - 1]`.
type Levels = [Hash; 15];

/// An internal node: its sixteen slots and, if it was built here rather than decoded, the
/// hashes of the binary tree over them. A node built from one that has them rehashes only
/// the ranges holding a changed slot (4 hashes for one changed child instead of 15); the node
/// cache keeps the upper levels of each committed version with them (see
/// `StateTree::cache_committed`). Decoded nodes do not compute them: most are only read.
#[derive(Clone, Debug)]
pub(crate) struct Internal {
    pub(crate) children: Children,
    levels: Option<Box<Levels>>,
}

impl PartialEq for Internal {
    fn eq(&self, other: &Internal) -> bool {
        self.children == other.children
    }
}

impl Eq for Internal {}

impl std::ops::Deref for Internal {
    type Target = Children;

    fn deref(&self) -> &Children {
        &self.children
    }
}

impl Internal {
    /// A node read from the store (no levels).
    pub(crate) fn decoded(children: Children) -> Internal {
        Internal {
            children,
            levels: None,
        }
    }

    /// A new node with `children` and its hash, hashing only the ranges in which they differ
    /// from `old`'s when `old` has its levels (all of them otherwise). The node keeps its
    /// levels if `keep_levels` (the node cache holds it, so a later update may reuse them).
    pub(crate) fn build(
        children: Children,
        old: Option<&Internal>,
        keep_levels: bool,
    ) -> (Internal, Hash) {
        let reuse = old.and_then(|o| {
            let dirty = o
                .children
                .iter()
                .zip(&children)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .fold(0u16, |m, (i, _)| m | 1 << i);
            o.levels.as_deref().map(|l| (l, dirty))
        });
        let (mut present, mut leaves) = (0u16, 0u16);
        for (i, c) in children.iter().enumerate() {
            if let Some(c) = c {
                present |= 1 << i;
                leaves |= u16::from(c.is_leaf) << i;
            }
        }
        let slot = |i: usize| {
            children
                .get(i)
                .copied()
                .flatten()
                .map_or(EMPTY_ROOT, |c| c.hash)
        };
        let mut levels: Levels = [EMPTY_ROOT; 15];
        for i in (1..16usize).rev() {
            // Heap node i covers `width` slots from `start`.
            let depth = i.ilog2();
            let width = 16usize >> depth;
            let start = (i - (1 << depth)) * width;
            let mask = (((1u32 << width) - 1) << start) as u16;
            let value = match reuse {
                Some((old, dirty)) if dirty & mask == 0 => old.get(i - 1).copied(),
                _ => None,
            };
            let value = value.unwrap_or_else(|| {
                let here = present & mask;
                match here.count_ones() {
                    0 => EMPTY_ROOT,
                    // A range holding one leaf takes the leaf's hash (see `range_hash`).
                    1 if leaves & here != 0 => slot(here.trailing_zeros() as usize),
                    _ if width == 2 => internal_hash(&slot(start), &slot(start + 1)),
                    _ => internal_hash(
                        levels.get(2 * i - 1).unwrap_or(&EMPTY_ROOT),
                        levels.get(2 * i).unwrap_or(&EMPTY_ROOT),
                    ),
                }
            });
            if let Some(l) = levels.get_mut(i - 1) {
                *l = value;
            }
        }
        let node = Internal {
            children,
            levels: keep_levels.then(|| Box::new(levels)),
        };
        (node, levels[0])
    }
}

/// A stored node. Cheap to clone: the node cache hands out shared copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// A leaf.
    Leaf(Arc<LeafNode>),
    /// An internal node with at least two children, or exactly one internal child.
    Internal(Arc<Internal>),
}

impl Node {
    /// Bytes of this node's own allocation (the shared allocation its handle points to:
    /// reference counts, the node, a leaf's value, an internal node's hash levels).
    pub(crate) fn heap_bytes(&self) -> u64 {
        const COUNTS: usize = 16;
        let bytes = match self {
            Node::Leaf(leaf) => COUNTS + std::mem::size_of::<LeafNode>() + leaf.value.capacity(),
            Node::Internal(internal) => {
                COUNTS
                    + std::mem::size_of::<Internal>()
                    + internal
                        .levels
                        .as_ref()
                        .map_or(0, |_| std::mem::size_of::<Levels>())
            }
        };
        bytes as u64
    }

    /// The `Column::StateNodes` value.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Node::Leaf(l) => encode_leaf(&l.key, &l.value),
            Node::Internal(children) => {
                let mut present = 0u16;
                let mut leaves = 0u16;
                for (i, c) in children.iter().enumerate() {
                    if let Some(c) = c {
                        present |= 1 << i;
                        if c.is_leaf {
                            leaves |= 1 << i;
                        }
                    }
                }
                let mut out = Vec::with_capacity(5 + 40 * present.count_ones() as usize);
                out.push(1);
                out.extend_from_slice(&present.to_be_bytes());
                out.extend_from_slice(&leaves.to_be_bytes());
                for c in children.iter().flatten() {
                    out.extend_from_slice(&c.version.to_be_bytes());
                    out.extend_from_slice(c.hash.as_bytes());
                }
                out
            }
        }
    }

    /// Decodes a `Column::StateNodes` value.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Node> {
        let corrupt = |reason: &str| Error::Corrupt {
            what: "state tree node",
            reason: reason.into(),
        };
        match bytes.split_first() {
            Some((0, rest)) => {
                if rest.len() < 32 {
                    return Err(corrupt("short leaf"));
                }
                let (k, v) = rest.split_at(32);
                let key = Hash(k.try_into().map_err(|_| corrupt("short leaf key"))?);
                Ok(Node::Leaf(Arc::new(LeafNode {
                    key,
                    value: v.to_vec(),
                })))
            }
            Some((1, rest)) => {
                if rest.len() < 4 {
                    return Err(corrupt("short internal node"));
                }
                let (bitmaps, mut entries) = rest.split_at(4);
                let present = u16::from_be_bytes([bitmaps[0], bitmaps[1]]);
                let leaves = u16::from_be_bytes([bitmaps[2], bitmaps[3]]);
                if leaves & !present != 0 {
                    return Err(corrupt("leaf bitmap outside child bitmap"));
                }
                if entries.len() != 40 * present.count_ones() as usize {
                    return Err(corrupt("child count does not match length"));
                }
                let mut children: Children = [None; 16];
                for (i, slot) in children.iter_mut().enumerate() {
                    if present & (1 << i) == 0 {
                        continue;
                    }
                    let (entry, rest) = entries.split_at(40);
                    entries = rest;
                    let (v, h) = entry.split_at(8);
                    *slot = Some(ChildRef {
                        version: u64::from_be_bytes(
                            v.try_into().map_err(|_| corrupt("short version"))?,
                        ),
                        hash: Hash(h.try_into().map_err(|_| corrupt("short hash"))?),
                        is_leaf: leaves & (1 << i) != 0,
                    });
                }
                Ok(Node::Internal(Arc::new(Internal::decoded(children))))
            }
            _ => Err(corrupt("unknown node tag")),
        }
    }
}

/// Encodes a leaf node without building one.
pub(crate) fn encode_leaf(key: &Hash, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + value.len());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value);
    out
}

/// Hash of the binary subtree over slots `[start, start + width)` of an internal node: the
/// placeholder when the range is empty, the leaf's own hash when it holds exactly one leaf
/// (leaves are lifted to the shortest unique bit prefix), the child's hash when the range is
/// a single slot, otherwise the binary hash of the two halves.
pub(crate) fn range_hash(children: &Children, start: usize, width: usize) -> Hash {
    let slots = children.get(start..start + width).unwrap_or(&[]);
    let mut present = slots.iter().flatten();
    match (present.next(), present.next()) {
        (None, _) => EMPTY_ROOT,
        (Some(c), None) if c.is_leaf || width == 1 => c.hash,
        _ => {
            let half = width / 2;
            internal_hash(
                &range_hash(children, start, half),
                &range_hash(children, start + half, half),
            )
        }
    }
}

/// Hash of an internal node, straight from the definition (what `Internal::build` must
/// agree with).
#[cfg(test)]
pub(crate) fn internal_node_hash(children: &Children) -> Hash {
    range_hash(children, 0, 16)
}

/// Where the binary path of a nibble ends inside one internal node.
pub(crate) enum PathEnd {
    /// In an empty range: the key is absent.
    Empty,
    /// In a range holding exactly one leaf, in `slot` (its key may differ from the one sought).
    Leaf(ChildRef, u8),
    /// At the slot of the nibble, holding an internal node to descend into.
    Internal(ChildRef),
}

/// Follows nibble `n` down the four binary levels of an internal node, pushing the sibling
/// of each level to `siblings` (top level first), and stops where the path ends.
pub(crate) fn descend(children: &Children, n: u8, siblings: &mut Vec<Hash>) -> PathEnd {
    let n = usize::from(n & 0x0f);
    let (mut start, mut width) = (0usize, 16usize);
    loop {
        let half = width / 2;
        let (mine, other) = if n >= start + half {
            (start + half, start)
        } else {
            (start, start + half)
        };
        siblings.push(range_hash(children, other, half));
        start = mine;
        width = half;
        let slots = children.get(start..start + width).unwrap_or(&[]);
        let mut present = slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.map(|c| (i, c)));
        match (present.next(), present.next()) {
            (None, _) => return PathEnd::Empty,
            (Some((i, c)), None) if c.is_leaf => {
                // start + i < 16, so the slot fits in a nibble.
                return PathEnd::Leaf(c, ((start + i) & 0x0f) as u8);
            }
            (Some((_, c)), None) if width == 1 => return PathEnd::Internal(c),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn node_encoding_round_trips() {
        let leaf = Node::Leaf(Arc::new(LeafNode {
            key: Hash::digest(b"k"),
            value: b"v".to_vec(),
        }));
        assert_eq!(Node::decode(&leaf.encode()).unwrap(), leaf);
        let mut children: Children = [None; 16];
        children[3] = Some(ChildRef {
            version: 7,
            hash: Hash::digest(b"a"),
            is_leaf: true,
        });
        children[15] = Some(ChildRef {
            version: 9,
            hash: Hash::digest(b"b"),
            is_leaf: false,
        });
        let node = Node::Internal(Arc::new(Internal::decoded(children)));
        assert_eq!(Node::decode(&node.encode()).unwrap(), node);
        assert!(Node::decode(&[]).is_err());
        assert!(Node::decode(&[1, 0, 1, 0, 0]).is_err());
        assert!(Node::decode(&[1, 0, 1, 0, 2]).is_err());
        assert!(Node::decode(&[0, 1, 2]).is_err());
        assert!(Node::decode(&[7]).is_err());
    }

    #[test]
    fn node_keys_round_trip_and_never_collide_with_root_pointers() {
        let key = Hash::digest(b"x");
        let mut path = NibblePath::ROOT;
        for i in 0..MAX_NIBBLES {
            let nk = NodeKey { version: 42, path };
            let enc = nk.encode();
            assert_eq!(NodeKey::decode(&enc), Some(nk));
            assert_ne!(enc, root_pointer_key(42));
            path = path.child(nibble(&key, i));
        }
        assert_eq!(path.bytes, key.0);
    }

    #[test]
    fn upper_index_numbers_every_short_path_once() {
        let mut seen = vec![false; 69_905];
        let mut frontier = vec![NibblePath::ROOT];
        for depth in 0..=4 {
            let mut next = Vec::new();
            for path in frontier {
                let i = path.upper_index().unwrap();
                assert!(!seen[i], "index {i} twice");
                seen[i] = true;
                if depth < 4 {
                    next.extend((0..16).map(|n| path.child(n)));
                }
            }
            frontier = next;
        }
        assert!(seen.iter().all(|s| *s));
        let deep = (0..5).fold(NibblePath::ROOT, |p, n| p.child(n));
        assert_eq!(deep.upper_index(), None);
    }

    fn child_ref(seed: u64, is_leaf: bool) -> ChildRef {
        ChildRef {
            version: seed,
            hash: Hash::digest(&seed.to_le_bytes()),
            is_leaf,
        }
    }

    proptest::proptest! {
        /// Building a node (from scratch, or from an old node whose levels it reuses) gives
        /// the hash of the definition, whatever slots are empty, leaves or internal nodes.
        #[test]
        fn built_nodes_hash_like_the_definition(
            old in proptest::collection::vec(0u8..3, 16),
            changes in proptest::collection::vec((0usize..16, 0u8..3), 0..6),
            seed in proptest::prelude::any::<u64>(),
        ) {
            let slot = |kind: u8, s: u64| match kind {
                0 => None,
                1 => Some(child_ref(s, true)),
                _ => Some(child_ref(s, false)),
            };
            let mut before: Children = [None; 16];
            for (i, k) in old.iter().enumerate() {
                before[i] = slot(*k, seed ^ i as u64);
            }
            let (old_node, old_hash) = Internal::build(before, None, true);
            proptest::prop_assert_eq!(old_hash, internal_node_hash(&before));
            let mut after = before;
            for (j, (i, k)) in changes.iter().enumerate() {
                after[*i] = slot(*k, seed.wrapping_add(1000 + j as u64));
            }
            let (_, reused) = Internal::build(after, Some(&old_node), false);
            let (_, fresh) = Internal::build(after, None, false);
            proptest::prop_assert_eq!(reused, internal_node_hash(&after));
            proptest::prop_assert_eq!(fresh, internal_node_hash(&after));
        }
    }

    #[test]
    fn root_pointer_round_trips() {
        assert_eq!(
            decode_root_pointer(&encode_root_pointer(None)).unwrap(),
            None
        );
        let r = ChildRef {
            version: 5,
            hash: Hash::digest(b"r"),
            is_leaf: false,
        };
        assert_eq!(
            decode_root_pointer(&encode_root_pointer(Some(&r))).unwrap(),
            Some(r)
        );
        assert!(decode_root_pointer(&[3]).is_err());
        assert!(decode_root_pointer(&[1, 0]).is_err());
    }
}
