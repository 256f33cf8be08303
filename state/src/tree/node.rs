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

/// Domain byte of leaf hashes.
const LEAF_DOMAIN: u8 = 0x00;
/// Domain byte of internal (binary) node hashes.
const INTERNAL_DOMAIN: u8 = 0x01;

/// Hash of a leaf: `blake3(0x00 ++ key ++ blake3(value))`.
pub(crate) fn leaf_hash(key: &Hash, value_hash: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF_DOMAIN]);
    h.update(key.as_bytes());
    h.update(value_hash.as_bytes());
    Hash(*h.finalize().as_bytes())
}

/// Hash of a binary node: `blake3(0x01 ++ left ++ right)`.
pub(crate) fn internal_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[INTERNAL_DOMAIN]);
    h.update(left.as_bytes());
    h.update(right.as_bytes());
    Hash(*h.finalize().as_bytes())
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

/// A stored node. Cheap to clone: the node cache hands out shared copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    /// A leaf.
    Leaf(Arc<LeafNode>),
    /// An internal node with at least two children, or exactly one internal child.
    Internal(Arc<Children>),
}

impl Node {
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
                Ok(Node::Internal(Arc::new(children)))
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

/// Hash of an internal node.
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
        let node = Node::Internal(Arc::new(children));
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
