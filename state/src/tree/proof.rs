//! Merkle proofs of membership and non-membership, and their stand-alone verifier.

use keel_types::Hash;
use serde::{Deserialize, Serialize};

use super::node::{bit, internal_hash, leaf_hash, EMPTY_ROOT};
use crate::{Error, Result};

/// Most siblings a proof can have: one per bit of a key.
pub const MAX_PROOF_SIBLINGS: usize = 256;

/// The leaf a proof's path ends in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofLeaf {
    /// The leaf's key: the key asked about (membership) or another key sharing the path
    /// (non-membership).
    pub key: Hash,
    /// blake3 of the leaf's value.
    pub value_hash: Hash,
}

/// A proof that a key maps to a value, or is absent, under a root.
///
/// The path of a key is its bits, most significant bit of byte 0 first. The proof's path
/// ends at depth `siblings.len()`, either in `leaf` or (`leaf == None`) in an empty subtree.
/// `siblings[0]` is the sibling at that deepest level and the last one is the child of the
/// root: leaf level first. See the crate README for the hashing rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// The leaf the path ends in, or `None` for an empty subtree.
    pub leaf: Option<ProofLeaf>,
    /// Sibling hashes, deepest first.
    pub siblings: Vec<Hash>,
}

/// Number of leading bits two keys share.
fn common_prefix_bits(a: &Hash, b: &Hash) -> usize {
    let mut n = 0;
    for (x, y) in a.0.iter().zip(b.0.iter()) {
        let diff = x ^ y;
        if diff == 0 {
            n += 8;
        } else {
            return n + diff.leading_zeros() as usize;
        }
    }
    n
}

/// Checks, without any store, that `proof` shows `key` mapping to `value` (`Some`) or being
/// absent (`None`) in the tree whose root is `root`. `Ok(())` iff it does.
pub fn verify_proof(root: &Hash, key: &Hash, value: Option<&[u8]>, proof: &Proof) -> Result<()> {
    let depth = proof.siblings.len();
    if depth > MAX_PROOF_SIBLINGS {
        return Err(Error::BadProof("more than 256 siblings"));
    }
    let start = match (value, &proof.leaf) {
        (Some(v), Some(leaf)) => {
            if leaf.key != *key {
                return Err(Error::BadProof("proof is for another key"));
            }
            if leaf.value_hash != Hash::digest(v) {
                return Err(Error::BadProof("value does not match the proof"));
            }
            leaf_hash(&leaf.key, &leaf.value_hash)
        }
        (Some(_), None) => return Err(Error::BadProof("proof shows the key absent")),
        (None, Some(leaf)) => {
            if leaf.key == *key {
                return Err(Error::BadProof("proof shows the key present"));
            }
            if common_prefix_bits(&leaf.key, key) < depth {
                return Err(Error::BadProof("proof leaf is not on the key's path"));
            }
            leaf_hash(&leaf.key, &leaf.value_hash)
        }
        (None, None) => EMPTY_ROOT,
    };
    let mut acc = start;
    for (i, sibling) in proof.siblings.iter().enumerate() {
        // siblings[i] is the sibling at depth `depth - i`; the bit choosing our side is the
        // one at index `depth - 1 - i`.
        let level = depth - 1 - i;
        acc = if bit(key, level) {
            internal_hash(sibling, &acc)
        } else {
            internal_hash(&acc, sibling)
        };
    }
    if acc == *root {
        Ok(())
    } else {
        Err(Error::BadProof("root mismatch"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn common_prefix_counts_bits() {
        let a = Hash([0; 32]);
        let mut b = a;
        assert_eq!(common_prefix_bits(&a, &b), 256);
        b.0[1] = 0b0001_0000;
        assert_eq!(common_prefix_bits(&a, &b), 11);
        b.0[0] = 0x80;
        assert_eq!(common_prefix_bits(&a, &b), 0);
    }

    #[test]
    fn too_many_siblings_are_refused() {
        let proof = Proof {
            leaf: None,
            siblings: vec![EMPTY_ROOT; 257],
        };
        assert!(matches!(
            verify_proof(&EMPTY_ROOT, &Hash::ZERO, None, &proof),
            Err(Error::BadProof("more than 256 siblings"))
        ));
    }

    #[test]
    fn empty_tree_proves_absence_only() {
        let proof = Proof {
            leaf: None,
            siblings: vec![],
        };
        let key = Hash::digest(b"k");
        assert!(verify_proof(&EMPTY_ROOT, &key, None, &proof).is_ok());
        assert!(verify_proof(&EMPTY_ROOT, &key, Some(b"v"), &proof).is_err());
        assert!(verify_proof(&Hash::digest(b"r"), &key, None, &proof).is_err());
    }
}
