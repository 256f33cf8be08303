//! Block headers, blocks and receipts.

use prost::Message;

use crate::{codec, proto, Address, Error, Evidence, Hash, QuorumCertificate, Result};

/// A block header. Its hash is blake3 of its prost encoding.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// Chain the block belongs to.
    pub chain_id: String,
    /// Height; genesis is 0.
    pub height: u64,
    /// Consensus round it was proposed in.
    pub round: u64,
    /// Epoch of the validator set that produced it.
    pub epoch: u64,
    /// Hash of the parent header.
    pub parent_hash: Hash,
    /// Proposer's clock at proposal, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Address of the proposer.
    pub proposer: Address,
    /// Merkle root of the transaction hashes, see [`merkle_root`].
    pub tx_root: Hash,
    /// State root after this block's transactions.
    pub state_root: Hash,
    /// Hash of the validator set that produced this block.
    pub validators_hash: Hash,
    /// Certificate of the parent block.
    pub parent_qc: QuorumCertificate,
    /// Merkle root of the ids of the block's evidence ([`Evidence::id`]).
    pub evidence_root: Hash,
    /// Leaders of the rounds between the parent's certificate and this block's round, which
    /// certified no block (oldest first, at most [`MAX_FAILED_PROPOSERS`]: the newest). Leader
    /// reputation reads them from final blocks, so every validator agrees on who failed.
    pub failed_proposers: Vec<Address>,
}

/// Most failed leaders a header lists.
pub const MAX_FAILED_PROPOSERS: usize = 10;

impl Header {
    pub(crate) fn to_proto(&self) -> proto::Header {
        proto::Header {
            chain_id: self.chain_id.clone(),
            height: self.height,
            round: self.round,
            parent_hash: self.parent_hash.0.to_vec(),
            timestamp_ms: self.timestamp_ms,
            proposer: self.proposer.0.to_vec(),
            tx_root: self.tx_root.0.to_vec(),
            state_root: self.state_root.0.to_vec(),
            validators_hash: self.validators_hash.0.to_vec(),
            parent_qc: Some(self.parent_qc.to_proto()),
            epoch: self.epoch,
            evidence_root: self.evidence_root.0.to_vec(),
            failed_proposers: self.failed_proposers.iter().map(|a| a.0.to_vec()).collect(),
        }
    }

    pub(crate) fn from_proto(p: proto::Header) -> Result<Header> {
        Ok(Header {
            chain_id: p.chain_id,
            height: p.height,
            round: p.round,
            epoch: p.epoch,
            parent_hash: Hash::from_slice("header.parent_hash", &p.parent_hash)?,
            timestamp_ms: p.timestamp_ms,
            proposer: Address::from_slice("header.proposer", &p.proposer)?,
            tx_root: Hash::from_slice("header.tx_root", &p.tx_root)?,
            state_root: Hash::from_slice("header.state_root", &p.state_root)?,
            validators_hash: Hash::from_slice("header.validators_hash", &p.validators_hash)?,
            parent_qc: QuorumCertificate::from_proto(
                p.parent_qc.ok_or(Error::Missing("header.parent_qc"))?,
            )?,
            evidence_root: Hash::from_slice("header.evidence_root", &p.evidence_root)?,
            failed_proposers: {
                if p.failed_proposers.len() > MAX_FAILED_PROPOSERS {
                    return Err(Error::TooMany {
                        what: "header.failed_proposers",
                        len: p.failed_proposers.len(),
                        max: MAX_FAILED_PROPOSERS,
                    });
                }
                p.failed_proposers
                    .iter()
                    .map(|a| Address::from_slice("header.failed_proposers", a))
                    .collect::<Result<_>>()?
            },
        })
    }

    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// Decodes a header.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        Header::from_proto(codec::decode("Header", bytes)?)
    }

    /// blake3 of the encoded header.
    pub fn hash(&self) -> Hash {
        Hash::digest(&self.encode())
    }
}

/// A block: a header and the exact bytes of its transactions.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Block {
    /// The header.
    pub header: Header,
    /// `SignedTx` bytes, in execution order.
    pub txs: Vec<Vec<u8>>,
    /// Equivocation evidence, applied (slashing) before the transactions.
    pub evidence: Vec<Evidence>,
}

impl Block {
    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    pub(crate) fn to_proto(&self) -> proto::Block {
        proto::Block {
            header: Some(self.header.to_proto()),
            txs: self.txs.clone(),
            evidence: self.evidence.iter().map(Evidence::to_proto).collect(),
        }
    }

    /// Decodes a block (its transactions are decoded separately, by whoever executes them).
    pub fn decode(bytes: &[u8]) -> Result<Block> {
        Block::from_proto(codec::decode("Block", bytes)?)
    }

    pub(crate) fn from_proto(p: proto::Block) -> Result<Block> {
        Ok(Block {
            header: Header::from_proto(p.header.ok_or(Error::Missing("block.header"))?)?,
            txs: p.txs,
            evidence: p
                .evidence
                .into_iter()
                .map(Evidence::from_proto)
                .collect::<Result<_>>()?,
        })
    }

    /// The body alone (transactions and evidence, no header): how block stores keep it.
    pub fn encode_body(&self) -> Vec<u8> {
        proto::Block {
            header: None,
            txs: self.txs.clone(),
            evidence: self.evidence.iter().map(Evidence::to_proto).collect(),
        }
        .encode_to_vec()
    }

    /// Reassembles a block from its header and the bytes of [`Block::encode_body`].
    pub fn from_header_and_body(header: Header, body: &[u8]) -> Result<Block> {
        let p: proto::Block = codec::decode("BlockBody", body)?;
        Ok(Block {
            header,
            txs: p.txs,
            evidence: p
                .evidence
                .into_iter()
                .map(Evidence::from_proto)
                .collect::<Result<_>>()?,
        })
    }

    /// The evidence root the header must carry.
    pub fn evidence_root(&self) -> Hash {
        merkle_root(&self.evidence.iter().map(Evidence::id).collect::<Vec<_>>())
    }

    /// Hashes of the transactions, in order.
    pub fn tx_hashes(&self) -> Vec<Hash> {
        self.txs.iter().map(|t| Hash::digest(t)).collect()
    }

    /// The header's hash.
    pub fn hash(&self) -> Hash {
        self.header.hash()
    }
}

/// The outcome of one transaction in a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The transaction.
    pub tx_hash: Hash,
    /// Block height it was included at.
    pub height: u64,
    /// Position in the block.
    pub index: u32,
    /// Whether its effect was applied (a failed transaction may still pay its fee).
    pub success: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Fee charged.
    pub fee: u64,
}

impl Receipt {
    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        proto::Receipt {
            tx_hash: self.tx_hash.0.to_vec(),
            height: self.height,
            index: self.index,
            success: self.success,
            error: self.error.clone().unwrap_or_default(),
            fee: self.fee,
        }
        .encode_to_vec()
    }

    /// Decodes a receipt.
    pub fn decode(bytes: &[u8]) -> Result<Receipt> {
        let p: proto::Receipt = codec::decode("Receipt", bytes)?;
        Ok(Receipt {
            tx_hash: Hash::from_slice("receipt.tx_hash", &p.tx_hash)?,
            height: p.height,
            index: p.index,
            success: p.success,
            error: if p.error.is_empty() {
                None
            } else {
                Some(p.error)
            },
            fee: p.fee,
        })
    }
}

/// Binary Merkle root over hashes (blake3, leaves and nodes domain-separated, an odd node
/// carried up unchanged). The root of no hashes is [`Hash::ZERO`].
pub fn merkle_root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return Hash::ZERO;
    }
    let mut level: Vec<Hash> = leaves
        .iter()
        .map(|l| {
            let mut h = blake3::Hasher::new();
            h.update(&[0]);
            h.update(l.as_bytes());
            Hash(*h.finalize().as_bytes())
        })
        .collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [a, b] => {
                    let mut h = blake3::Hasher::new();
                    h.update(&[1]);
                    h.update(a.as_bytes());
                    h.update(b.as_bytes());
                    Hash(*h.finalize().as_bytes())
                }
                [a] => *a,
                _ => Hash::ZERO,
            })
            .collect();
    }
    level.first().copied().unwrap_or(Hash::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Keypair, Signature, VoteSignature};
    use proptest::prelude::*;

    fn header_strategy() -> impl Strategy<Value = Header> {
        (
            "[a-z0-9-]{1,16}",
            any::<(u64, u64, u64, u64)>(),
            any::<([u8; 32], [u8; 20], [u8; 32], [u8; 32], [u8; 32])>(),
            proptest::collection::vec(any::<([u8; 20], u8)>(), 0..4),
            proptest::collection::vec(any::<[u8; 20]>(), 0..=MAX_FAILED_PROPOSERS),
        )
            .prop_map(
                |(
                    chain_id,
                    (height, round, epoch, ts),
                    (parent, proposer, txr, sr, vh),
                    sigs,
                    failed,
                )| {
                    Header {
                        failed_proposers: failed.into_iter().map(Address).collect(),
                        chain_id,
                        height,
                        round,
                        epoch,
                        parent_hash: Hash(parent),
                        timestamp_ms: ts,
                        proposer: Address(proposer),
                        tx_root: Hash(txr),
                        state_root: Hash(sr),
                        validators_hash: Hash(vh),
                        evidence_root: Hash(txr),
                        parent_qc: QuorumCertificate {
                            block_hash: Hash(parent),
                            height: height.saturating_sub(1),
                            round,
                            signatures: sigs
                                .into_iter()
                                .map(|(v, b)| VoteSignature {
                                    validator: Address(v),
                                    signature: Signature([b; 64]),
                                })
                                .collect(),
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn header_and_block_round_trip(header in header_strategy(),
                                       txs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            prop_assert_eq!(Header::decode(&header.encode()).unwrap(), header.clone());
            let block = Block { header, txs, evidence: vec![] };
            prop_assert_eq!(Block::decode(&block.encode()).unwrap(), block);
        }

        #[test]
        fn receipt_round_trips(h in any::<[u8; 32]>(), height in any::<u64>(), index in any::<u32>(),
                               success in any::<bool>(), error in proptest::option::of("[a-z ]{1,20}"), fee in any::<u64>()) {
            let r = Receipt { tx_hash: Hash(h), height, index, success, error, fee };
            prop_assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn block_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Block::decode(&bytes);
        }
    }

    #[test]
    fn a_header_listing_too_many_failed_proposers_is_refused() {
        let mut header = Header {
            failed_proposers: vec![Address([7; 20]); MAX_FAILED_PROPOSERS],
            ..Header::default()
        };
        assert_eq!(Header::decode(&header.encode()).unwrap(), header);
        header.failed_proposers.push(Address([8; 20]));
        assert!(matches!(
            Header::decode(&header.encode()),
            Err(Error::TooMany { len, .. }) if len == MAX_FAILED_PROPOSERS + 1
        ));
    }

    #[test]
    fn vote_round_trips_and_verifies() {
        let key = Keypair::from_seed(5);
        let v = crate::Vote::sign(&key, "c", Hash([1; 32]), 3, 4);
        let back = crate::Vote::decode(&v.encode()).unwrap();
        assert_eq!(back, v);
        let msg = crate::Vote::signing_hash("c", &v.block_hash, 3, 4);
        assert!(key.public().verify(&msg, &v.signature).is_ok());
    }

    #[test]
    fn merkle_root_depends_on_every_leaf_and_order() {
        let leaves: Vec<Hash> = (0..5u8).map(|i| Hash::digest(&[i])).collect();
        let root = merkle_root(&leaves);
        assert_ne!(root, Hash::ZERO);
        let mut swapped = leaves.clone();
        swapped.swap(0, 1);
        assert_ne!(merkle_root(&swapped), root);
        assert_ne!(merkle_root(&leaves[..4]), root);
        assert_eq!(merkle_root(&[]), Hash::ZERO);
    }
}
