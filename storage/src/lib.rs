//! Key-value storage for keel.
//!
//! - [`KvStore`] is the boundary every other crate uses: columns, point reads, ordered range
//!   iteration and atomic [`WriteBatch`]es (puts, deletes, range deletes). It does not mention
//!   RocksDB.
//! - `RocksStore` is the real engine (feature `rocksdb`, on by default), [`MemStore`] the
//!   in-memory one for tests and simulations. Both pass one shared test suite (`suite`, test
//!   builds only).
//! - [`BlockStore`] keeps headers, bodies, the height and transaction indexes and receipts,
//!   and stages a whole block commit into one batch so a crash leaves the last committed
//!   block whole.

mod block_store;
mod error;
mod kv;
mod mem;
mod overlay;
#[cfg(feature = "rocksdb")]
mod rocks;
#[cfg(test)]
mod suite;

pub use block_store::{BlockStore, TxLocation};
pub use error::{Error, Result};
pub use kv::{Column, Direction, EngineStats, KvIter, KvStore, Op, OpRef, WriteBatch};
pub use mem::MemStore;
pub use overlay::{Layer, OverlayStore};
#[cfg(feature = "rocksdb")]
pub use rocks::{Compression, RocksConfig, RocksStore};
