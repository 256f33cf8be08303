//! Votes and quorum certificates.

use prost::Message;

use crate::{codec, proto, Address, Hash, Keypair, Result, Signature};

const VOTE_DOMAIN: &str = "keel 2026-11 vote signing v1";

/// Bits of a round number that count rounds within an epoch. Rounds are `(epoch, round)`
/// pairs packed into one `u64` (`epoch << 32 | round`): they restart in every epoch yet stay
/// totally ordered, and the epoch is inside everything that signs a round (votes, timeouts,
/// proposals), so two votes of different epochs never look like equivocation and a vote of
/// one epoch can never be replayed in another. 2^32 rounds is over a century at one per second.
pub const EPOCH_ROUND_BITS: u32 = 32;

/// The epoch a packed round belongs to.
pub fn round_epoch(round: u64) -> u64 {
    round >> EPOCH_ROUND_BITS
}

/// The round that opens `epoch`: the round of its starting certificate, never proposed in.
/// The first proposal of the epoch is in `epoch_base_round(epoch) + 1`.
pub fn epoch_base_round(epoch: u64) -> u64 {
    epoch << EPOCH_ROUND_BITS
}

/// A validator's signed vote for a block in a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vote {
    /// Chain the vote is for.
    pub chain_id: String,
    /// The block voted for.
    pub block_hash: Hash,
    /// Its height.
    pub height: u64,
    /// The consensus round.
    pub round: u64,
    /// The voting validator's address.
    pub voter: Address,
    /// Signature over [`Vote::signing_hash`].
    pub signature: Signature,
}

impl Vote {
    /// The message a validator signs for a vote.
    pub fn signing_hash(chain_id: &str, block_hash: &Hash, height: u64, round: u64) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(VOTE_DOMAIN);
        h.update(&(chain_id.len() as u64).to_le_bytes());
        h.update(chain_id.as_bytes());
        h.update(block_hash.as_bytes());
        h.update(&height.to_le_bytes());
        h.update(&round.to_le_bytes());
        Hash(*h.finalize().as_bytes())
    }

    /// Signs a vote.
    pub fn sign(key: &Keypair, chain_id: &str, block_hash: Hash, height: u64, round: u64) -> Vote {
        let signature = key.sign(&Vote::signing_hash(chain_id, &block_hash, height, round));
        Vote {
            chain_id: chain_id.to_string(),
            block_hash,
            height,
            round,
            voter: key.address(),
            signature,
        }
    }

    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    pub(crate) fn to_proto(&self) -> proto::Vote {
        proto::Vote {
            chain_id: self.chain_id.clone(),
            block_hash: self.block_hash.0.to_vec(),
            height: self.height,
            round: self.round,
            voter: self.voter.0.to_vec(),
            signature: self.signature.0.to_vec(),
        }
    }

    /// Decodes and checks the form of a vote (not its signature).
    pub fn decode(bytes: &[u8]) -> Result<Vote> {
        Vote::from_proto(codec::decode("Vote", bytes)?)
    }

    pub(crate) fn from_proto(p: proto::Vote) -> Result<Vote> {
        Ok(Vote {
            chain_id: p.chain_id,
            block_hash: Hash::from_slice("vote.block_hash", &p.block_hash)?,
            height: p.height,
            round: p.round,
            voter: Address::from_slice("vote.voter", &p.voter)?,
            signature: Signature::from_slice(&p.signature)?,
        })
    }
}

/// One validator's signature inside a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoteSignature {
    /// The validator's address.
    pub validator: Address,
    /// Its vote signature.
    pub signature: Signature,
}

/// Votes of more than 2/3 of an epoch's stake for one block in one round. Whether the stake
/// suffices is checked by consensus against the epoch's validator set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct QuorumCertificate {
    /// The certified block.
    pub block_hash: Hash,
    /// Its height.
    pub height: u64,
    /// The round it was certified in.
    pub round: u64,
    /// The votes, one per validator.
    pub signatures: Vec<VoteSignature>,
}

impl QuorumCertificate {
    /// The certificate of genesis: certifies height 0 with no votes.
    pub fn genesis(genesis_hash: Hash) -> QuorumCertificate {
        QuorumCertificate {
            block_hash: genesis_hash,
            height: 0,
            round: 0,
            signatures: Vec::new(),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::QuorumCertificate {
        proto::QuorumCertificate {
            block_hash: self.block_hash.0.to_vec(),
            height: self.height,
            round: self.round,
            signatures: self
                .signatures
                .iter()
                .map(|s| proto::VoteSignature {
                    validator: s.validator.0.to_vec(),
                    signature: s.signature.0.to_vec(),
                })
                .collect(),
        }
    }

    pub(crate) fn from_proto(p: proto::QuorumCertificate) -> Result<QuorumCertificate> {
        Ok(QuorumCertificate {
            block_hash: Hash::from_slice("qc.block_hash", &p.block_hash)?,
            height: p.height,
            round: p.round,
            signatures: p
                .signatures
                .into_iter()
                .map(|s| {
                    Ok(VoteSignature {
                        validator: Address::from_slice("qc.validator", &s.validator)?,
                        signature: Signature::from_slice(&s.signature)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// Decodes a certificate.
    pub fn decode(bytes: &[u8]) -> Result<QuorumCertificate> {
        QuorumCertificate::from_proto(codec::decode("QuorumCertificate", bytes)?)
    }
}
