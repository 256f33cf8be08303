//! Core types of keel: hashes, addresses, ed25519 keys, transactions, blocks, votes and
//! certificates, and their prost wire codec.
//!
//! Invariants:
//! - This crate does no I/O and depends on no other keel crate.
//! - Every wire type has one canonical prost encoding; hashes are blake3 over those bytes
//!   (a transaction's hash is blake3 of its `SignedTx` bytes exactly as received).
//! - Decoding never panics on untrusted input: every failure is an [`Error`].

mod block;
mod codec;
mod crypto;
mod error;
mod hash;
mod message;
mod peer;
pub mod proto;
mod tx;
mod tx_batch;
mod vote;

pub use block::{merkle_root, Block, Header, Receipt, MAX_FAILED_PROPOSERS};
pub use codec::MAX_MESSAGE_BYTES;
pub use crypto::{
    key_cache_bytes, verify_batch, Keypair, PublicKey, Signature, KEY_CACHE_BYTES, KEY_CACHE_SLOTS,
};
pub use error::{Error, Result};
pub use hash::{Address, Hash};
pub use message::{
    ConsensusMessage, EpochProof, Evidence, Proposal, Timeout, TimeoutCertificate,
    TimeoutSignature, MAX_EPOCH_PROOF_HEADERS,
};
pub use peer::{PeerRequest, PeerResponse, Status, MAX_SYNC_BLOCKS};
pub use tx::{signing_hash, Transaction, TxKind};
pub use tx_batch::TxBatch;
pub use vote::{
    epoch_base_round, round_epoch, QuorumCertificate, Vote, VoteSignature, EPOCH_ROUND_BITS,
};
