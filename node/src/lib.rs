//! The keel node: wiring only.
//!
//! It loads the configuration and genesis, opens the store, and runs three parts that talk
//! over bounded channels and a shared, read-mostly [`Chain`]:
//! - the consensus driver ([`driver`]), a dedicated thread that feeds inputs to the pure
//!   `keel-consensus` engine and carries out its effects (build and execute a block, persist
//!   safety data with fsync, commit a block in one atomic batch, finalize);
//! - the mempool, behind a mutex, fed by RPC `tx_submit`;
//! - the JSON-RPC server (HTTP and WebSocket on one port).
//!
//! Invariants: a block's header, body, indexes, receipts, state-tree nodes and the chain tip
//! are written in one atomic batch; safety data is durable before any vote built from it is
//! used; nothing a client sends can panic the node or grow memory without bound (the mempool
//! and every channel are bounded).

pub mod app;
pub mod chain;
pub mod config;
mod driver;
mod error;
pub mod home;
pub mod mempool;
pub mod metrics;
pub mod network;
mod node;
pub mod rpc;
pub mod testnet;
pub mod units;

pub use chain::{Chain, TxStatus};
pub use error::{Error, Result};
pub use node::Node;
