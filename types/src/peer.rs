//! Requests between peers: status (with the binding of a validator key to a network identity)
//! and blocks for sync.

use prost::Message;

use crate::{codec, proto, Block, EpochProof, Error, Hash, Keypair, PublicKey, Result, Signature};

const BINDING_DOMAIN: &str = "keel 2026-11 peer binding v1";

/// Most blocks one sync answer may carry.
pub const MAX_SYNC_BLOCKS: u32 = 64;

/// A node's status, as it tells its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Its chain.
    pub chain_id: String,
    /// Its genesis block.
    pub genesis_hash: Hash,
    /// Its final tip.
    pub final_height: u64,
    /// The final tip's hash.
    pub final_hash: Hash,
    /// A validator key and its signature over [`Status::binding_hash`] of the sender's peer
    /// id: proof that votes for this validator may be sent to that peer.
    pub validator: Option<(PublicKey, Signature)>,
}

impl Status {
    /// What a validator signs to bind its key to the network identity `peer_id`.
    pub fn binding_hash(chain_id: &str, peer_id: &[u8]) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(BINDING_DOMAIN);
        h.update(&(chain_id.len() as u64).to_le_bytes());
        h.update(chain_id.as_bytes());
        h.update(peer_id);
        Hash(*h.finalize().as_bytes())
    }

    /// Signs the binding of `key` to `peer_id`.
    pub fn bind(key: &Keypair, chain_id: &str, peer_id: &[u8]) -> (PublicKey, Signature) {
        (
            key.public(),
            key.sign(&Status::binding_hash(chain_id, peer_id)),
        )
    }

    /// The bound validator key, if the signature binds it to `peer_id`.
    pub fn bound_validator(&self, peer_id: &[u8]) -> Option<PublicKey> {
        let (key, sig) = self.validator.as_ref()?;
        key.verify(&Status::binding_hash(&self.chain_id, peer_id), sig)
            .ok()
            .map(|_| *key)
    }
}

/// A request to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRequest {
    /// Its [`Status`].
    Status,
    /// Up to `max` blocks ending at `target` (or on the way to it), oldest first, above
    /// `have_height` (the asker's final height).
    Blocks {
        /// The block wanted (typically certified by a certificate the asker saw).
        target: Hash,
        /// The asker's final height.
        have_height: u64,
        /// Most blocks wanted.
        max: u32,
    },
}

/// The answer to a [`PeerRequest`].
// Answers are built once and encoded at once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerResponse {
    /// The peer's status.
    Status(Status),
    /// Blocks, oldest first, and the proof that the asker's epoch ended if the peer has it.
    Blocks {
        /// The blocks.
        blocks: Vec<Block>,
        /// The end of the asker's epoch, if known.
        proof: Option<EpochProof>,
    },
    /// The asker needs final blocks this peer has pruned: it serves heights from `earliest`.
    Pruned {
        /// The lowest height the peer still serves.
        earliest: u64,
    },
}

impl PeerRequest {
    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        use proto::peer_request::Kind;
        let kind = match self {
            PeerRequest::Status => Kind::Status(proto::StatusRequest {}),
            PeerRequest::Blocks {
                target,
                have_height,
                max,
            } => Kind::Blocks(proto::BlocksRequest {
                target: target.0.to_vec(),
                have_height: *have_height,
                max: *max,
            }),
        };
        proto::PeerRequest { kind: Some(kind) }.encode_to_vec()
    }

    /// Decodes a request.
    pub fn decode(bytes: &[u8]) -> Result<PeerRequest> {
        use proto::peer_request::Kind;
        let p: proto::PeerRequest = codec::decode("PeerRequest", bytes)?;
        Ok(match p.kind.ok_or(Error::Missing("peer_request.kind"))? {
            Kind::Status(_) => PeerRequest::Status,
            Kind::Blocks(b) => PeerRequest::Blocks {
                target: Hash::from_slice("blocks.target", &b.target)?,
                have_height: b.have_height,
                max: b.max,
            },
        })
    }
}

impl PeerResponse {
    /// Prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        use proto::peer_response::Kind;
        let kind = match self {
            PeerResponse::Status(s) => Kind::Status(proto::Status {
                chain_id: s.chain_id.clone(),
                genesis_hash: s.genesis_hash.0.to_vec(),
                final_height: s.final_height,
                final_hash: s.final_hash.0.to_vec(),
                validator_key: s
                    .validator
                    .as_ref()
                    .map(|(k, _)| k.to_bytes().to_vec())
                    .unwrap_or_default(),
                binding: s
                    .validator
                    .as_ref()
                    .map(|(_, sig)| sig.0.to_vec())
                    .unwrap_or_default(),
            }),
            PeerResponse::Blocks { blocks, proof } => Kind::Blocks(proto::Blocks {
                blocks: blocks.iter().map(Block::to_proto).collect(),
                proof: proof.as_ref().map(EpochProof::to_proto),
            }),
            PeerResponse::Pruned { earliest } => Kind::Pruned(proto::Pruned {
                earliest: *earliest,
            }),
        };
        proto::PeerResponse { kind: Some(kind) }.encode_to_vec()
    }

    /// Decodes and checks the form of a response (not its signatures or certificates).
    pub fn decode(bytes: &[u8]) -> Result<PeerResponse> {
        use proto::peer_response::Kind;
        let p: proto::PeerResponse = codec::decode("PeerResponse", bytes)?;
        Ok(match p.kind.ok_or(Error::Missing("peer_response.kind"))? {
            Kind::Status(s) => PeerResponse::Status(Status {
                chain_id: s.chain_id,
                genesis_hash: Hash::from_slice("status.genesis_hash", &s.genesis_hash)?,
                final_height: s.final_height,
                final_hash: Hash::from_slice("status.final_hash", &s.final_hash)?,
                validator: if s.validator_key.is_empty() {
                    None
                } else {
                    Some((
                        PublicKey::from_bytes(&s.validator_key)?,
                        Signature::from_slice(&s.binding)?,
                    ))
                },
            }),
            Kind::Blocks(b) => {
                if b.blocks.len() > MAX_SYNC_BLOCKS as usize {
                    return Err(Error::Decode {
                        what: "Blocks",
                        reason: format!("{} blocks, at most {MAX_SYNC_BLOCKS}", b.blocks.len()),
                    });
                }
                PeerResponse::Blocks {
                    blocks: b
                        .blocks
                        .into_iter()
                        .map(Block::from_proto)
                        .collect::<Result<_>>()?,
                    proof: b.proof.map(EpochProof::from_proto).transpose()?,
                }
            }
            Kind::Pruned(p) => PeerResponse::Pruned {
                earliest: p.earliest,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Header;

    #[test]
    fn requests_and_responses_round_trip_and_garbage_is_refused() {
        let key = Keypair::from_seed(4);
        let status = Status {
            chain_id: "c".into(),
            genesis_hash: Hash([1; 32]),
            final_height: 9,
            final_hash: Hash([2; 32]),
            validator: Some(Status::bind(&key, "c", b"peer-a")),
        };
        assert_eq!(status.bound_validator(b"peer-a"), Some(key.public()));
        assert_eq!(
            status.bound_validator(b"peer-b"),
            None,
            "bound to another peer"
        );
        let other_chain = Status {
            chain_id: "d".into(),
            ..status.clone()
        };
        assert_eq!(other_chain.bound_validator(b"peer-a"), None);
        for r in [
            PeerRequest::Status,
            PeerRequest::Blocks {
                target: Hash([3; 32]),
                have_height: 5,
                max: 64,
            },
        ] {
            assert_eq!(PeerRequest::decode(&r.encode()).unwrap(), r);
        }
        let block = Block {
            header: Header {
                chain_id: "c".into(),
                height: 1,
                ..Header::default()
            },
            txs: vec![vec![1]],
            evidence: vec![],
        };
        for r in [
            PeerResponse::Status(status),
            PeerResponse::Status(Status {
                validator: None,
                ..other_chain
            }),
            PeerResponse::Blocks {
                blocks: vec![block.clone(), block],
                proof: None,
            },
            PeerResponse::Pruned { earliest: 10_001 },
        ] {
            assert_eq!(PeerResponse::decode(&r.encode()).unwrap(), r);
        }
        assert!(PeerRequest::decode(&[0xff, 0xff, 0x01]).is_err());
        assert!(PeerResponse::decode(&[]).is_err());
        let too_many = PeerResponse::Blocks {
            blocks: vec![Block::default(); MAX_SYNC_BLOCKS as usize + 1],
            proof: None,
        };
        assert!(PeerResponse::decode(&too_many.encode()).is_err());
    }
}
