//! The prost wire messages. Field numbers are part of the protocol: never renumber.
//!
//! These are the raw encodings; the rest of keel works with the checked types of this crate
//! (`Transaction`, `Header`, `Block`, ...) that convert to and from them.

#![allow(missing_docs)]

/// The body of a transaction: what the sender signs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tx {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(uint64, tag = "2")]
    pub nonce: u64,
    #[prost(uint64, tag = "3")]
    pub fee: u64,
    #[prost(oneof = "tx::Kind", tags = "4, 5, 6")]
    pub kind: Option<tx::Kind>,
}

pub mod tx {
    /// What a transaction does.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "4")]
        Transfer(super::Transfer),
        #[prost(message, tag = "5")]
        Bond(super::Bond),
        #[prost(message, tag = "6")]
        Unbond(super::Unbond),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Transfer {
    #[prost(bytes = "vec", tag = "1")]
    pub to: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub amount: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Bond {
    #[prost(uint64, tag = "1")]
    pub amount: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Unbond {
    #[prost(uint64, tag = "1")]
    pub amount: u64,
}

/// A signed transaction as it travels and is stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignedTx {
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub public_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VoteSignature {
    #[prost(bytes = "vec", tag = "1")]
    pub validator: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct QuorumCertificate {
    #[prost(bytes = "vec", tag = "1")]
    pub block_hash: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub height: u64,
    #[prost(uint64, tag = "3")]
    pub round: u64,
    #[prost(message, repeated, tag = "4")]
    pub signatures: Vec<VoteSignature>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Vote {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub block_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub height: u64,
    #[prost(uint64, tag = "4")]
    pub round: u64,
    #[prost(bytes = "vec", tag = "5")]
    pub voter: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(uint64, tag = "2")]
    pub height: u64,
    #[prost(uint64, tag = "3")]
    pub round: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_hash: Vec<u8>,
    #[prost(uint64, tag = "5")]
    pub timestamp_ms: u64,
    #[prost(bytes = "vec", tag = "6")]
    pub proposer: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub tx_root: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    pub state_root: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    pub validators_hash: Vec<u8>,
    #[prost(message, optional, tag = "10")]
    pub parent_qc: Option<QuorumCertificate>,
    #[prost(uint64, tag = "11")]
    pub epoch: u64,
    #[prost(bytes = "vec", tag = "12")]
    pub evidence_root: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "13")]
    pub failed_proposers: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Block {
    #[prost(message, optional, tag = "1")]
    pub header: Option<Header>,
    /// Each entry is the exact bytes of one `SignedTx`.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub txs: Vec<Vec<u8>>,
    /// Equivocation evidence included by the proposer.
    #[prost(message, repeated, tag = "3")]
    pub evidence: Vec<Evidence>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    #[prost(bytes = "vec", tag = "1")]
    pub tx_hash: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub height: u64,
    #[prost(uint32, tag = "3")]
    pub index: u32,
    #[prost(bool, tag = "4")]
    pub success: bool,
    #[prost(string, tag = "5")]
    pub error: String,
    #[prost(uint64, tag = "6")]
    pub fee: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Proposal {
    #[prost(message, optional, tag = "1")]
    pub block: Option<Block>,
    #[prost(message, optional, tag = "2")]
    pub tc: Option<TimeoutCertificate>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Timeout {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(uint64, tag = "2")]
    pub round: u64,
    #[prost(message, optional, tag = "3")]
    pub high_qc: Option<QuorumCertificate>,
    #[prost(bytes = "vec", tag = "4")]
    pub voter: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub signature: Vec<u8>,
    #[prost(message, optional, tag = "6")]
    pub last_tc: Option<TimeoutCertificate>,
    #[prost(message, optional, tag = "7")]
    pub commit_qc: Option<QuorumCertificate>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeoutSignature {
    #[prost(bytes = "vec", tag = "1")]
    pub validator: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub high_qc_round: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeoutCertificate {
    #[prost(uint64, tag = "1")]
    pub round: u64,
    #[prost(message, optional, tag = "2")]
    pub high_qc: Option<QuorumCertificate>,
    #[prost(message, repeated, tag = "3")]
    pub signatures: Vec<TimeoutSignature>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Evidence {
    #[prost(message, optional, tag = "1")]
    pub first: Option<Vote>,
    #[prost(message, optional, tag = "2")]
    pub second: Option<Vote>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EpochProof {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<Header>,
    #[prost(message, optional, tag = "2")]
    pub qc: Option<QuorumCertificate>,
}

/// Every consensus message, as sent on the consensus channel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConsensusMessage {
    #[prost(oneof = "consensus_message::Kind", tags = "1, 2, 3, 4, 5")]
    pub kind: Option<consensus_message::Kind>,
}

pub mod consensus_message {
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Proposal(super::Proposal),
        #[prost(message, tag = "2")]
        Vote(super::Vote),
        #[prost(message, tag = "3")]
        Timeout(super::Timeout),
        #[prost(message, tag = "4")]
        Evidence(super::Evidence),
        #[prost(message, tag = "5")]
        EpochProof(super::EpochProof),
    }
}

/// A request between peers: their status, or blocks for sync.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerRequest {
    #[prost(oneof = "peer_request::Kind", tags = "1, 2")]
    pub kind: Option<peer_request::Kind>,
}

pub mod peer_request {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Status(super::StatusRequest),
        #[prost(message, tag = "2")]
        Blocks(super::BlocksRequest),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BlocksRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub target: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub have_height: u64,
    #[prost(uint32, tag = "3")]
    pub max: u32,
}

/// The answer to a [`PeerRequest`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerResponse {
    #[prost(oneof = "peer_response::Kind", tags = "1, 2, 3")]
    pub kind: Option<peer_response::Kind>,
}

pub mod peer_response {
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Status(super::Status),
        #[prost(message, tag = "2")]
        Blocks(super::Blocks),
        #[prost(message, tag = "3")]
        Pruned(super::Pruned),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(string, tag = "1")]
    pub chain_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub genesis_hash: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub final_height: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub final_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub validator_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    pub binding: Vec<u8>,
}

/// The answer of a peer that no longer has the blocks asked for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pruned {
    /// The lowest height it still serves.
    #[prost(uint64, tag = "1")]
    pub earliest: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Blocks {
    #[prost(message, repeated, tag = "1")]
    pub blocks: Vec<Block>,
    #[prost(message, optional, tag = "2")]
    pub proof: Option<EpochProof>,
}
