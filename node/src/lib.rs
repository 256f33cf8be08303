//! The keel node: wiring only.
//!
//! [`boot`] opens a store and genesis into a [`NodeContext`] and a consensus
//! [`host::Host`]; [`Node`] runs that over RocksDB and libp2p with the JSON-RPC and metrics
//! servers, every long-lived task owned by one [`tasks::TaskManager`]. The parts:
//! - [`host`]: feeds the pure `keel-consensus` engine and carries out its effects through the
//!   [`ledger`] (the one block tree: build, validate with limits, keep, finalize), the
//!   [`store`] (every consensus-side key), a [`net::Network`] and a [`clock::Clock`]; it has
//!   no thread of its own, so the seeded simulation runs the same code on virtual time;
//! - [`net`]: the `Network` trait, its libp2p implementation with the server task that
//!   answers peers, and the simulated one; [`sync`]: what a node serves to a peer that syncs;
//! - [`view`]: the snapshot of the chain the host publishes and readers (RPC, metrics, sync
//!   serving) load without waiting on it;
//! - [`mempool`], [`rpc`], [`metrics`] (with [`profiling`]: profiles on demand), [`config`];
//! - [`bench`]: the workloads of `keel bench`.
//!
//! The protocol types a client of the node needs (addresses, hashes, keys, transactions) and
//! offline proof checking are re-exported here, so the `keel` binary depends on this crate and
//! `keel-genesis` only.
//!
//! Invariants: a block's header, body, indexes, receipts, state-tree nodes and the chain tip
//! are written in one atomic batch; safety data is durable before any vote built from it is
//! used; no reader waits on a lock held across a disk write; nothing a client sends can
//! panic the node or grow memory without bound (the mempool and every channel are bounded).

pub mod bench;
pub mod boot;
pub mod clock;
pub mod config;
pub mod context;
pub mod dbtool;
mod error;
pub mod home;
pub mod host;
pub mod json;
pub mod ledger;
pub mod light;
pub mod memory;
pub mod mempool;
pub mod metrics;
pub mod net;
mod node;
pub mod profiling;
pub mod pruner;
pub mod rpc;
pub mod store;
pub mod sync;
pub mod tasks;
pub mod testnet;
pub mod units;
pub mod view;

pub use context::{NodeContext, TxStatus};
pub use error::{Error, Result};
pub use node::Node;

// What the `keel` binary signs transactions and parses addresses and hashes with.
pub use keel_types::{Address, Hash, Keypair, Transaction, TxKind};

// Offline checking of a `state_getProof` answer (`keel query account --prove`).
pub use keel_state::{account_key, verify_proof, Proof};
