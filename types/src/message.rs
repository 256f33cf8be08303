//! Consensus messages: proposals, timeouts, timeout certificates and equivocation evidence.

use prost::Message;

use crate::{
    codec, proto, Address, Block, Error, Hash, Header, Keypair, QuorumCertificate, Result,
    Signature, Vote,
};

const PROPOSAL_DOMAIN: &str = "keel 2026-11 proposal signing v1";
const TIMEOUT_DOMAIN: &str = "keel 2026-11 timeout signing v1";

/// A leader's proposal of a block for a round. The block header carries the round, the
/// proposer and the certificate of the parent; a proposal after a timed-out round also
/// carries that round's timeout certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// The proposed block.
    pub block: Block,
    /// Certificate of the previous round's timeout, when the parent is not from that round.
    pub tc: Option<TimeoutCertificate>,
    /// The proposer's signature over [`Proposal::signing_hash`].
    pub signature: Signature,
}

impl Proposal {
    /// The message a proposer signs: its block's hash and round.
    pub fn signing_hash(chain_id: &str, block_hash: &Hash, round: u64) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(PROPOSAL_DOMAIN);
        h.update(&(chain_id.len() as u64).to_le_bytes());
        h.update(chain_id.as_bytes());
        h.update(block_hash.as_bytes());
        h.update(&round.to_le_bytes());
        Hash(*h.finalize().as_bytes())
    }

    /// Signs a proposal of `block` (whose header names `key` as proposer).
    pub fn sign(key: &Keypair, block: Block, tc: Option<TimeoutCertificate>) -> Proposal {
        let msg = Proposal::signing_hash(&block.header.chain_id, &block.hash(), block.header.round);
        Proposal {
            signature: key.sign(&msg),
            block,
            tc,
        }
    }

    fn to_proto(&self) -> proto::Proposal {
        proto::Proposal {
            block: Some(self.block.to_proto()),
            tc: self.tc.as_ref().map(TimeoutCertificate::to_proto),
            signature: self.signature.0.to_vec(),
        }
    }

    fn from_proto(p: proto::Proposal) -> Result<Proposal> {
        Ok(Proposal {
            block: Block::from_proto(p.block.ok_or(Error::Missing("proposal.block"))?)?,
            tc: p.tc.map(TimeoutCertificate::from_proto).transpose()?,
            signature: Signature::from_slice(&p.signature)?,
        })
    }
}

/// A validator's statement that a round timed out, with the highest certificate it knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeout {
    /// Chain the timeout is for.
    pub chain_id: String,
    /// The round that timed out.
    pub round: u64,
    /// The highest certificate the sender knows.
    pub high_qc: QuorumCertificate,
    /// The sender.
    pub voter: Address,
    /// Signature over [`Timeout::signing_hash`].
    pub signature: Signature,
    /// The sender's latest timeout certificate, so validators a round behind catch up. Not
    /// covered by the signature: a certificate stands on its own signatures.
    pub last_tc: Option<TimeoutCertificate>,
    /// The certificate that made the sender's latest final block final (of its child, in the
    /// next round), so validators that missed it learn that block is final: leader
    /// reputation reads final blocks, and must read the same ones everywhere. Not covered by
    /// the signature either.
    pub commit_qc: Option<QuorumCertificate>,
}

impl Timeout {
    /// The message a validator signs to time out `round`, naming its highest certified round.
    pub fn signing_hash(chain_id: &str, round: u64, high_qc_round: u64) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(TIMEOUT_DOMAIN);
        h.update(&(chain_id.len() as u64).to_le_bytes());
        h.update(chain_id.as_bytes());
        h.update(&round.to_le_bytes());
        h.update(&high_qc_round.to_le_bytes());
        Hash(*h.finalize().as_bytes())
    }

    /// Signs a timeout.
    pub fn sign(key: &Keypair, chain_id: &str, round: u64, high_qc: QuorumCertificate) -> Timeout {
        let signature = key.sign(&Timeout::signing_hash(chain_id, round, high_qc.round));
        Timeout {
            chain_id: chain_id.to_string(),
            round,
            high_qc,
            voter: key.address(),
            signature,
            last_tc: None,
            commit_qc: None,
        }
    }

    fn to_proto(&self) -> proto::Timeout {
        proto::Timeout {
            chain_id: self.chain_id.clone(),
            round: self.round,
            high_qc: Some(self.high_qc.to_proto()),
            voter: self.voter.0.to_vec(),
            signature: self.signature.0.to_vec(),
            last_tc: self.last_tc.as_ref().map(TimeoutCertificate::to_proto),
            commit_qc: self.commit_qc.as_ref().map(QuorumCertificate::to_proto),
        }
    }

    fn from_proto(p: proto::Timeout) -> Result<Timeout> {
        Ok(Timeout {
            chain_id: p.chain_id,
            round: p.round,
            high_qc: QuorumCertificate::from_proto(
                p.high_qc.ok_or(Error::Missing("timeout.high_qc"))?,
            )?,
            voter: Address::from_slice("timeout.voter", &p.voter)?,
            signature: Signature::from_slice(&p.signature)?,
            last_tc: p.last_tc.map(TimeoutCertificate::from_proto).transpose()?,
            commit_qc: p.commit_qc.map(QuorumCertificate::from_proto).transpose()?,
        })
    }
}

/// One validator's part of a timeout certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutSignature {
    /// The validator.
    pub validator: Address,
    /// The round of the highest certificate it reported.
    pub high_qc_round: u64,
    /// Its timeout signature.
    pub signature: Signature,
}

/// Timeouts of more than 2/3 of the stake for one round, with the highest certificate any of
/// them reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutCertificate {
    /// The round that timed out.
    pub round: u64,
    /// The highest certificate among the timeouts.
    pub high_qc: QuorumCertificate,
    /// The timeouts.
    pub signatures: Vec<TimeoutSignature>,
}

impl TimeoutCertificate {
    pub(crate) fn to_proto(&self) -> proto::TimeoutCertificate {
        proto::TimeoutCertificate {
            round: self.round,
            high_qc: Some(self.high_qc.to_proto()),
            signatures: self
                .signatures
                .iter()
                .map(|s| proto::TimeoutSignature {
                    validator: s.validator.0.to_vec(),
                    high_qc_round: s.high_qc_round,
                    signature: s.signature.0.to_vec(),
                })
                .collect(),
        }
    }

    pub(crate) fn from_proto(p: proto::TimeoutCertificate) -> Result<TimeoutCertificate> {
        Ok(TimeoutCertificate {
            round: p.round,
            high_qc: QuorumCertificate::from_proto(p.high_qc.ok_or(Error::Missing("tc.high_qc"))?)?,
            signatures: p
                .signatures
                .into_iter()
                .map(|s| {
                    Ok(TimeoutSignature {
                        validator: Address::from_slice("tc.validator", &s.validator)?,
                        high_qc_round: s.high_qc_round,
                        signature: Signature::from_slice(&s.signature)?,
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// Proof that a validator signed votes for two different blocks in one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// One vote.
    pub first: Vote,
    /// A conflicting vote: same voter and round, another block.
    pub second: Vote,
}

impl Evidence {
    /// The equivocating validator.
    pub fn offender(&self) -> Address {
        self.first.voter
    }

    /// A canonical identity: the same pair in either order has the same id.
    pub fn id(&self) -> Hash {
        let (a, b) = if self.first.block_hash <= self.second.block_hash {
            (&self.first, &self.second)
        } else {
            (&self.second, &self.first)
        };
        let mut h = blake3::Hasher::new();
        h.update(&a.encode());
        h.update(&b.encode());
        Hash(*h.finalize().as_bytes())
    }

    /// Checks the form: one voter, one round, one chain, two different blocks. Signatures are
    /// checked by whoever knows the voter's key.
    pub fn check_form(&self) -> Result<()> {
        let (a, b) = (&self.first, &self.second);
        if a.voter != b.voter
            || a.round != b.round
            || a.chain_id != b.chain_id
            || a.block_hash == b.block_hash
        {
            return Err(Error::Decode {
                what: "Evidence",
                reason: "votes do not conflict".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn to_proto(&self) -> proto::Evidence {
        proto::Evidence {
            first: Some(self.first.to_proto()),
            second: Some(self.second.to_proto()),
        }
    }

    pub(crate) fn from_proto(p: proto::Evidence) -> Result<Evidence> {
        Ok(Evidence {
            first: Vote::from_proto(p.first.ok_or(Error::Missing("evidence.first"))?)?,
            second: Vote::from_proto(p.second.ok_or(Error::Missing("evidence.second"))?)?,
        })
    }
}

/// Most suffix headers an [`EpochProof`] may carry.
pub const MAX_EPOCH_PROOF_HEADERS: usize = 64;

/// Proof that the block ending an epoch is final, for validators still in that epoch: the
/// headers of the suffix blocks from the epoch-ending block's child up to a certified block
/// `C` (the last header, certified by `qc`) whose parent is from the round before it. By the
/// 2-chain rule that parent, and so the epoch-ending block below it, is final. Self-contained
/// given the epoch-ending block; verified with the validator set of the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochProof {
    /// Suffix headers, the epoch-ending block's child first; the last is certified by `qc`.
    pub headers: Vec<Header>,
    /// The certificate of the last header.
    pub qc: QuorumCertificate,
}

impl EpochProof {
    /// The epoch it ends.
    pub fn epoch(&self) -> Option<u64> {
        self.headers.first().map(|h| h.epoch)
    }

    pub(crate) fn to_proto(&self) -> proto::EpochProof {
        proto::EpochProof {
            headers: self.headers.iter().map(Header::to_proto).collect(),
            qc: Some(self.qc.to_proto()),
        }
    }

    pub(crate) fn from_proto(p: proto::EpochProof) -> Result<EpochProof> {
        if p.headers.is_empty() || p.headers.len() > MAX_EPOCH_PROOF_HEADERS {
            return Err(Error::Decode {
                what: "EpochProof",
                reason: format!(
                    "{} headers, expected 1 to {MAX_EPOCH_PROOF_HEADERS}",
                    p.headers.len()
                ),
            });
        }
        Ok(EpochProof {
            headers: p
                .headers
                .into_iter()
                .map(Header::from_proto)
                .collect::<Result<_>>()?,
            qc: QuorumCertificate::from_proto(p.qc.ok_or(Error::Missing("epoch_proof.qc"))?)?,
        })
    }
}

/// Any consensus message.
// A proposal carries a whole block, so the variants differ in size; messages are short-lived
// and moved rarely, so boxing would only add an allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsensusMessage {
    /// A leader's proposal.
    Proposal(Proposal),
    /// A vote, sent to the next round's leader.
    Vote(Vote),
    /// A round timeout, broadcast.
    Timeout(Timeout),
    /// Equivocation evidence, gossiped.
    Evidence(Evidence),
    /// Proof that an epoch ended, for validators still in it.
    EpochProof(EpochProof),
}

impl ConsensusMessage {
    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        use proto::consensus_message::Kind;
        let kind = match self {
            ConsensusMessage::Proposal(p) => Kind::Proposal(p.to_proto()),
            ConsensusMessage::Vote(v) => Kind::Vote(v.to_proto()),
            ConsensusMessage::Timeout(t) => Kind::Timeout(t.to_proto()),
            ConsensusMessage::Evidence(e) => Kind::Evidence(e.to_proto()),
            ConsensusMessage::EpochProof(p) => Kind::EpochProof(p.to_proto()),
        };
        proto::ConsensusMessage { kind: Some(kind) }.encode_to_vec()
    }

    /// Decodes and checks the form of a message (not its signatures).
    pub fn decode(bytes: &[u8]) -> Result<ConsensusMessage> {
        use proto::consensus_message::Kind;
        let p: proto::ConsensusMessage = codec::decode("ConsensusMessage", bytes)?;
        Ok(
            match p.kind.ok_or(Error::Missing("consensus_message.kind"))? {
                Kind::Proposal(p) => ConsensusMessage::Proposal(Proposal::from_proto(p)?),
                Kind::Vote(v) => ConsensusMessage::Vote(Vote::from_proto(v)?),
                Kind::Timeout(t) => ConsensusMessage::Timeout(Timeout::from_proto(t)?),
                Kind::Evidence(e) => ConsensusMessage::Evidence(Evidence::from_proto(e)?),
                Kind::EpochProof(p) => ConsensusMessage::EpochProof(EpochProof::from_proto(p)?),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VoteSignature;

    fn qc(round: u64) -> QuorumCertificate {
        QuorumCertificate {
            block_hash: Hash([round as u8; 32]),
            height: round,
            round,
            signatures: vec![VoteSignature {
                validator: Address([1; 20]),
                signature: Signature([2; 64]),
            }],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let key = Keypair::from_seed(1);
        let block = Block {
            header: Header {
                chain_id: "c".into(),
                height: 3,
                round: 5,
                parent_qc: qc(4),
                ..Header::default()
            },
            txs: vec![vec![1, 2, 3]],
            evidence: vec![],
        };
        let tc = TimeoutCertificate {
            round: 4,
            high_qc: qc(3),
            signatures: vec![TimeoutSignature {
                validator: key.address(),
                high_qc_round: 3,
                signature: Signature([7; 64]),
            }],
        };
        let v1 = Vote::sign(&key, "c", Hash([1; 32]), 3, 5);
        let v2 = Vote::sign(&key, "c", Hash([2; 32]), 3, 5);
        let msgs = vec![
            ConsensusMessage::Proposal(Proposal::sign(&key, block.clone(), Some(tc))),
            ConsensusMessage::Proposal(Proposal::sign(&key, block, None)),
            ConsensusMessage::Vote(v1.clone()),
            ConsensusMessage::Timeout(Timeout::sign(&key, "c", 9, qc(8))),
            ConsensusMessage::Timeout(Timeout {
                last_tc: Some(TimeoutCertificate {
                    round: 8,
                    high_qc: qc(7),
                    signatures: vec![],
                }),
                commit_qc: Some(qc(6)),
                ..Timeout::sign(&key, "c", 9, qc(8))
            }),
            ConsensusMessage::Evidence(Evidence {
                first: v1,
                second: v2,
            }),
            ConsensusMessage::EpochProof(EpochProof {
                headers: vec![Header {
                    chain_id: "c".into(),
                    height: 12,
                    round: crate::epoch_base_round(1) + 3,
                    epoch: 1,
                    parent_qc: qc(11),
                    ..Header::default()
                }],
                qc: qc(12),
            }),
        ];
        for m in msgs {
            assert_eq!(ConsensusMessage::decode(&m.encode()).unwrap(), m);
        }
        assert!(ConsensusMessage::decode(&[0xff, 0x01]).is_err());
    }

    #[test]
    fn evidence_identity_ignores_order_and_checks_conflict() {
        let key = Keypair::from_seed(2);
        let a = Vote::sign(&key, "c", Hash([1; 32]), 3, 5);
        let b = Vote::sign(&key, "c", Hash([2; 32]), 3, 5);
        let e1 = Evidence {
            first: a.clone(),
            second: b.clone(),
        };
        let e2 = Evidence {
            first: b,
            second: a.clone(),
        };
        assert_eq!(e1.id(), e2.id());
        assert!(e1.check_form().is_ok());
        assert!(Evidence {
            first: a.clone(),
            second: a
        }
        .check_form()
        .is_err());
    }
}
