//! Account state of keel: accounts, the versioned sparse Merkle tree that commits to them,
//! Merkle proofs, and the block executor.
//!
//! - [`StateTree`] is a Jellyfish-style versioned sparse Merkle tree over a
//!   [`keel_storage::KvStore`]: 16-ary on disk, binary in its hashing, blake3 throughout.
//!   [`verify_proof`] checks its proofs with no store at all.
//! - [`State`] executes blocks: it applies the block's equivocation evidence (slashing and
//!   jailing), then checks and applies transactions in order, and stages the resulting state
//!   version into a [`keel_storage::WriteBatch`].
//! - [`ValidatorRegistry`] (one entry of the tree) holds the key of every address that ever
//!   bonded, so [`State::stakes`] derives a validator set from the state alone.
//!
//! Invariants:
//! - State version = block height; version 0 is genesis. Every committed version keeps a
//!   readable root until it is pruned, also when nothing changed.
//! - Tree nodes are written once and never modified; a replaced node is recorded in the stale
//!   index under the version that replaced it, so pruning needs nothing but that index.
//! - The root depends only on the key/value set, never on the order or batching of updates.
//! - Nothing here writes to the store: `apply`, `init_genesis` and `execute_block` only stage
//!   into the caller's batch, so a block commit stays one atomic write.
//! - Execution is a deterministic function of (parent state, block environment, transactions);
//!   all arithmetic is checked and a bad transaction yields a failed receipt, never a panic;
//!   invalid evidence is ignored, never an error.
//!
//! With the `bench` feature, the `bench` module holds the block-application workload that
//! `keel bench` runs.
//!
//! The hashing rules and the transaction rules are spelled out in this crate's `README.md`.

mod account;
#[cfg(feature = "bench")]
pub mod bench;
mod error;
mod executor;
mod registry;
mod signatures;
mod tree;

pub use account::{Account, Unbonding};
pub use error::{Error, Result};
pub use executor::{account_key, BlockEnv, BlockOutcome, ExecParams, State};
pub use registry::{StakeEntry, ValidatorRegistry};
pub use signatures::{verify_transactions, SigCache, DEFAULT_SIG_CACHE, SIGNATURE_CHUNK};
pub use tree::{
    stale_records_through, verify_proof, FreshNodes, NodeCache, Proof, ProofLeaf, ReadNodes,
    StateTree, DEFAULT_NODE_CACHE, EMPTY_ROOT, MAX_PROOF_SIBLINGS, UPPER_LEVELS,
};

/// Hash maps and sets of per-block bookkeeping (accounts of a block, tree nodes it read):
/// foldhash, several times faster than std's SipHash on 20- to 40-byte keys. Its DoS
/// resistance is weaker than SipHash's (a random per-process seed plus a per-map seed, no
/// cryptographic guarantee); that is enough here because these maps live for one block and
/// hold at most that block's accounts, so a client can neither observe one map long enough
/// to learn its seed nor grow it past a block's bound.
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`FastMap`].
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Estimated bytes a std hash table with room for `capacity` entries of `T` holds:
/// hashbrown's power-of-two buckets (seven eighths of them usable once there are eight or
/// more), one control byte each and a group's worth more.
fn table_bytes<T>(capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity.saturating_mul(8) / 7).max(1).next_power_of_two();
    (buckets * (std::mem::size_of::<T>() + 1) + 16) as u64
}

/// An empty [`FastMap`] with room for `capacity` entries.
fn fast_map<K, V>(capacity: usize) -> FastMap<K, V> {
    FastMap::with_capacity_and_hasher(capacity, Default::default())
}
