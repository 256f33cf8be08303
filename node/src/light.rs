//! Light-client proofs: what makes a header final, and how each epoch's validator set follows
//! from the chain before it. The node assembles them ([`finality_proof`], [`epoch_change`],
//! served by `state_getProof` and `chain_getEpochChange`); a client checks them with
//! [`verify_finality`] and [`verify_epoch_change`] (`keel query account --prove`), the
//! procedure `docs/light-client.md` specifies for implementations in other languages.
//!
//! Finality is the 2-chain rule of consensus: a block `X` is final once it and its child `Y`
//! are both certified and `Y.round == X.round + 1`; every ancestor of `X` is then final too. A
//! [`FinalityProof`] of height `h` is the headers from `h` up to such a `Y` (each the parent of
//! the next) and the certificate of `Y`; the certificate of `X` is `Y`'s `parent_qc`. Both are
//! signed by the validator set of their epoch, and a proof never leaves the epoch of its first
//! header: at the epoch's last block it continues with the epoch's [`EpochProof`] (the suffix
//! headers that certified it).
//!
//! The validator set of epoch `e >= 1` is a function of the state at height `e * epoch_length`
//! (the block that ended epoch `e - 1`): every account of the validator registry that exists,
//! is not jailed and has stake, with the key the registry holds; if there is none, the set of
//! `e - 1` carries over. An [`EpochChange`] proves that block final under the set of `e - 1`
//! and carries the registry and every registered account with their state proofs, so a client
//! that trusts the set of epoch 0 (genesis) can walk to any epoch.

pub use keel_consensus::ValidatorSet;
use keel_consensus::{check_qc, epoch_end_height, Validator};
use keel_state::{account_key, verify_proof, Account, Proof, ValidatorRegistry};
pub use keel_types::Header;
use keel_types::{round_epoch, Address, Hash, PublicKey, QuorumCertificate};
use serde::{Deserialize, Serialize};

use crate::context::NodeContext;
use crate::json::HexBytes;

/// The most headers a finality proof holds. With no failed rounds it holds two or three.
pub const MAX_FINALITY_HEADERS: usize = 64;

/// Headers from the proven one up to a certified 2-chain, and the certificate of the last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalityProof {
    /// The height proven final.
    pub height: u64,
    /// Protobuf `Header` bytes, lowest first: the header at `height`, then each child. Block
    /// hash = blake3 of these bytes.
    pub headers: Vec<HexBytes>,
    /// Protobuf `QuorumCertificate` bytes certifying the last header.
    pub qc: HexBytes,
}

/// A value of the state tree with its proof against a header's `state_root`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenValue {
    /// Its key in the state tree.
    pub key: Hash,
    /// Its bytes (protobuf); null if the key holds nothing.
    pub value: Option<HexBytes>,
    /// The tree proof.
    pub proof: Proof,
}

/// One registered account in an [`EpochChange`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvenAccount {
    /// The address.
    pub address: Address,
    /// Its `Account` and the proof (key = blake3 of the address bytes).
    #[serde(flatten)]
    pub proven: ProvenValue,
}

/// One validator of a set, as `chain_getEpochChange` lists them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetMember {
    /// Its address.
    pub address: Address,
    /// Its ed25519 key.
    pub public_key: HexBytes,
    /// Its stake (a decimal string).
    #[serde(with = "crate::json::amount")]
    pub stake: u64,
}

/// `chain_getEpochChange`: the proof that epoch `epoch` has the validator set `validators`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochChange {
    /// The epoch whose set this proves (at least 1).
    pub epoch: u64,
    /// `epoch * epoch_length`: the block that ended the epoch before, whose state decides.
    pub height: u64,
    /// That block is final, under the set of `epoch - 1`.
    pub finality: FinalityProof,
    /// The validator registry at `height` (key blake3("keel/validator-registry")).
    pub registry: ProvenValue,
    /// Every account of the registry, in the registry's order, at `height`.
    pub accounts: Vec<ProvenAccount>,
    /// The set that follows (sorted by address).
    pub validators: Vec<SetMember>,
    /// Its hash (what the headers of the epoch carry as `validators_hash`).
    pub validators_hash: Hash,
}

/// Why a proof cannot be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// The height is above the final height (or genesis, which needs no proof).
    #[error("height {height} is not final (the final height is {final_height})")]
    NotFinal {
        /// The height asked for.
        height: u64,
        /// The final height.
        final_height: u64,
    },
    /// What the proof needs is below this node's pruning window.
    #[error("height {height} is pruned: the earliest height this node serves is {earliest}")]
    Pruned {
        /// The height asked for.
        height: u64,
        /// The earliest height served.
        earliest: u64,
    },
    /// The node does not have what the proof needs (yet).
    #[error("{0}")]
    Unavailable(String),
    /// A read failed.
    #[error("{0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> ProofError {
    ProofError::Storage(e.to_string())
}

fn hex(bytes: Vec<u8>) -> HexBytes {
    HexBytes(bytes)
}

/// The finality proof of the final block at `height` (1 ..= the final height).
pub fn finality_proof(c: &NodeContext, height: u64) -> Result<FinalityProof, ProofError> {
    let view = c.view();
    let (final_height, _) = view.tip.finalized;
    if height == 0 || height > final_height {
        return Err(ProofError::NotFinal {
            height,
            final_height,
        });
    }
    let epoch = c.epoch_of_height(height);
    let end = epoch_end_height(epoch, c.params.epoch_length);
    let header = |h: u64| -> Result<Header, ProofError> {
        c.blocks.header_at(h).map_err(storage)?.ok_or_else(|| {
            let earliest = c.prune_status().earliest();
            if h < earliest {
                ProofError::Pruned {
                    height: h,
                    earliest,
                }
            } else {
                ProofError::Unavailable(format!("the header at height {h} is not stored"))
            }
        })
    };
    let mut headers = vec![header(height)?];
    let qc = loop {
        if headers.len() >= MAX_FINALITY_HEADERS {
            return Err(ProofError::Unavailable(format!(
                "no certified 2-chain within {MAX_FINALITY_HEADERS} headers above height {height}"
            )));
        }
        let x = headers
            .last()
            .cloned()
            .ok_or_else(|| storage("empty proof"))?;
        if x.height == end {
            // The epoch's last block: the suffix headers that made it final.
            if let Some(proof) = c.records().epoch_proof(epoch).map_err(storage)? {
                headers.extend(proof.headers);
                break proof.qc;
            }
        }
        if x.height == final_height {
            // The final tip: its child and the certificate that made it final, which only
            // consensus holds until the next block.
            let qc = view.commit_qc.clone().ok_or_else(|| {
                ProofError::Unavailable(format!(
                    "the certificate that made height {final_height} final is not known yet \
                     (the node started since): ask again after the next block"
                ))
            })?;
            let child = view
                .blocks
                .get(&qc.block_hash)
                .filter(|b| b.header.parent_hash == x.hash())
                .ok_or_else(|| {
                    ProofError::Unavailable(format!(
                        "the child of height {final_height} is no longer held: ask again"
                    ))
                })?;
            headers.push(child.header.clone());
            break qc;
        }
        let y = header(x.height + 1)?;
        let consecutive = y.round == x.round.saturating_add(1);
        let y_hash = y.hash();
        headers.push(y);
        if consecutive {
            // The certificate of `y`: in its child's header, or the final tip's own.
            if x.height + 1 < final_height {
                break header(x.height + 2)?.parent_qc;
            }
            match c.records().latest_qc().map_err(storage)? {
                Some(qc) if qc.block_hash == y_hash => break qc,
                // The tip moved on since the view was read: its child is stored now.
                _ => break header(x.height + 2)?.parent_qc,
            }
        }
    };
    Ok(FinalityProof {
        height,
        headers: headers.iter().map(|h| hex(h.encode())).collect(),
        qc: hex(qc.encode()),
    })
}

/// The proof that epoch `epoch` (at least 1, already started) has the set it has.
pub fn epoch_change(c: &NodeContext, epoch: u64) -> Result<EpochChange, ProofError> {
    let epoch_length = c.params.epoch_length;
    let height = epoch.saturating_mul(epoch_length);
    let final_height = c.tip().finalized.0;
    if epoch == 0 || height > final_height || c.epoch_of_height(final_height + 1) < epoch {
        return Err(ProofError::Unavailable(format!(
            "epoch {epoch} has not started (epochs 1 to {} have)",
            c.epoch_of_height(final_height + 1)
        )));
    }
    let finality = finality_proof(c, height)?;
    let state_error = |e: keel_state::Error| {
        let earliest = c.prune_status().earliest();
        if height < earliest {
            ProofError::Pruned { height, earliest }
        } else {
            storage(e)
        }
    };
    let (registry_bytes, registry_proof) = c
        .state
        .tree()
        .get_with_proof(height, &ValidatorRegistry::key())
        .map_err(state_error)?;
    let registry = match &registry_bytes {
        Some(b) => ValidatorRegistry::decode(b).map_err(storage)?,
        None => ValidatorRegistry::default(),
    };
    let mut accounts = Vec::new();
    for (address, _) in registry.iter() {
        let (account, proof, _) = c
            .state
            .account_with_proof(address, height)
            .map_err(state_error)?;
        accounts.push(ProvenAccount {
            address: *address,
            proven: ProvenValue {
                key: account_key(address),
                value: account.map(|a| hex(a.encode())),
                proof,
            },
        });
    }
    let set = c.validator_set(epoch).map_err(storage)?;
    Ok(EpochChange {
        epoch,
        height,
        finality,
        registry: ProvenValue {
            key: ValidatorRegistry::key(),
            value: registry_bytes.map(hex),
            proof: registry_proof,
        },
        accounts,
        validators: members(&set),
        validators_hash: set.hash(),
    })
}

/// The validator set of epoch 0: genesis's validators (a light client's first trust root).
pub fn genesis_set(genesis: &keel_genesis::Genesis) -> crate::Result<ValidatorSet> {
    crate::boot::validator_set(genesis)
}

/// A set as `chain_getEpochChange` lists it.
pub fn members(set: &ValidatorSet) -> Vec<SetMember> {
    set.validators()
        .iter()
        .map(|v| SetMember {
            address: v.address,
            public_key: hex(v.public_key.to_bytes().to_vec()),
            stake: v.stake,
        })
        .collect()
}

/// The account an [`EpochChange`] lists (None if it proves the account absent).
pub fn decode_account(proven: &ProvenAccount) -> Result<Option<Account>, String> {
    proven
        .proven
        .value
        .as_ref()
        .map(|v| Account::decode(&v.0).map_err(|e| format!("account {}: {e}", proven.address)))
        .transpose()
}

/// A set from its listed members (checked: keys match addresses, stakes non-zero).
pub fn set_from_members(members: &[SetMember]) -> Result<ValidatorSet, String> {
    let validators = members
        .iter()
        .map(|m| {
            Ok(Validator {
                address: m.address,
                public_key: PublicKey::from_bytes(&m.public_key.0)
                    .map_err(|e| format!("validator {}: {e}", m.address))?,
                stake: m.stake,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    ValidatorSet::new(validators).map_err(|e| e.to_string())
}

/// What [`verify_finality`] established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalHeader {
    /// The header proven final.
    pub header: Header,
    /// The epoch whose set signed the certificates.
    pub epoch: u64,
    /// The two certified heights of the 2-chain (`X`, `Y`).
    pub two_chain: (u64, u64),
    /// Headers in the proof.
    pub headers: usize,
}

/// Checks a finality proof: the headers link by hash, the last two are a 2-chain (consecutive
/// rounds, `Y.parent_qc` certifies `X`, `qc` certifies `Y`), both certificates carry a
/// quorum of valid signatures of the set of their epoch (`set_of(epoch)`), on `chain_id`.
/// Returns the first header, final.
pub fn verify_finality(
    proof: &FinalityProof,
    chain_id: &str,
    set_of: &dyn Fn(u64) -> Result<ValidatorSet, String>,
) -> Result<FinalHeader, String> {
    // Counted before anything is decoded: a node cannot make a client decode more.
    if proof.headers.len() < 2 || proof.headers.len() > MAX_FINALITY_HEADERS {
        return Err(format!(
            "a finality proof holds 2 to {MAX_FINALITY_HEADERS} headers, not {}",
            proof.headers.len()
        ));
    }
    let headers = proof
        .headers
        .iter()
        .enumerate()
        .map(|(i, b)| Header::decode(&b.0).map_err(|e| format!("header {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let qc = QuorumCertificate::decode(&proof.qc.0).map_err(|e| format!("qc: {e}"))?;
    for h in &headers {
        if h.chain_id != chain_id {
            return Err(format!(
                "header {} is of chain {:?}, not {chain_id:?}",
                h.height, h.chain_id
            ));
        }
    }
    for pair in headers.windows(2) {
        let [parent, child] = pair else { continue };
        if child.parent_hash != parent.hash() || child.height != parent.height + 1 {
            return Err(format!(
                "header {} does not extend header {}",
                child.height, parent.height
            ));
        }
    }
    let (Some(x), Some(y)) = (headers.get(headers.len() - 2), headers.last()) else {
        return Err("a finality proof holds at least 2 headers".into());
    };
    if y.round != x.round.saturating_add(1) {
        return Err(format!(
            "heights {} and {} are not a 2-chain: rounds {} and {} are not consecutive",
            x.height, y.height, x.round, y.round
        ));
    }
    let certifies = |c: &QuorumCertificate, h: &Header| {
        c.block_hash == h.hash() && c.height == h.height && c.round == h.round
    };
    if !certifies(&y.parent_qc, x) {
        return Err(format!(
            "the parent certificate of height {} does not certify height {}",
            y.height, x.height
        ));
    }
    if !certifies(&qc, y) {
        return Err(format!(
            "the certificate does not certify height {}",
            y.height
        ));
    }
    let epoch = round_epoch(x.round);
    let set = set_of(epoch)?;
    for (c, h) in [(&y.parent_qc, x), (&qc, y)] {
        if !check_qc(chain_id, &set, c) {
            return Err(format!(
                "the certificate of height {} is not a quorum of valid signatures of the set of epoch {epoch}",
                h.height
            ));
        }
    }
    let first = headers.first().cloned().ok_or("no headers")?;
    if first.height != proof.height {
        return Err(format!(
            "the proof is of height {}, not {}",
            first.height, proof.height
        ));
    }
    Ok(FinalHeader {
        header: first,
        epoch,
        two_chain: (x.height, y.height),
        headers: headers.len(),
    })
}

/// Checks an epoch change against the trusted set of the epoch before: the deciding block is
/// final under it, the registry and every registered account are proven against its state
/// root, and the set they give hashes to `validators_hash`. Returns that set.
pub fn verify_epoch_change(
    change: &EpochChange,
    chain_id: &str,
    epoch_length: u64,
    previous: &ValidatorSet,
) -> Result<ValidatorSet, String> {
    let epoch = change.epoch;
    if epoch == 0 || change.height != epoch.saturating_mul(epoch_length) {
        return Err(format!(
            "epoch {epoch} is decided at height {}, not {}",
            epoch.saturating_mul(epoch_length),
            change.height
        ));
    }
    if change.finality.height != change.height {
        return Err("the finality proof is of another height".into());
    }
    let final_header = verify_finality(&change.finality, chain_id, &|e| {
        if e + 1 == epoch {
            Ok(previous.clone())
        } else {
            Err(format!(
                "the block ending epoch {} is certified in epoch {e}",
                epoch - 1
            ))
        }
    })?;
    let root = final_header.header.state_root;
    let registry_key = ValidatorRegistry::key();
    if change.registry.key != registry_key {
        return Err("the registry is not under blake3(\"keel/validator-registry\")".into());
    }
    let registry_bytes = change.registry.value.as_ref().map(|v| v.0.as_slice());
    verify_proof(&root, &registry_key, registry_bytes, &change.registry.proof)
        .map_err(|e| format!("registry proof: {e}"))?;
    let registry = match registry_bytes {
        Some(b) => ValidatorRegistry::decode(b).map_err(|e| format!("registry: {e}"))?,
        None => ValidatorRegistry::default(),
    };
    let entries: Vec<(Address, PublicKey)> = registry.iter().map(|(a, k)| (*a, *k)).collect();
    if entries.len() != change.accounts.len() {
        return Err(format!(
            "{} registered validators but {} accounts proven",
            entries.len(),
            change.accounts.len()
        ));
    }
    let mut validators = Vec::new();
    for ((address, public_key), proven) in entries.iter().zip(&change.accounts) {
        if proven.address != *address || proven.proven.key != account_key(address) {
            return Err(format!(
                "account {} is listed where the registry has {address}",
                proven.address
            ));
        }
        let bytes = proven.proven.value.as_ref().map(|v| v.0.as_slice());
        verify_proof(&root, &proven.proven.key, bytes, &proven.proven.proof)
            .map_err(|e| format!("account {address}: {e}"))?;
        let Some(bytes) = bytes else { continue };
        let account = Account::decode(bytes).map_err(|e| format!("account {address}: {e}"))?;
        if account.jailed || account.stake == 0 {
            continue;
        }
        validators.push(Validator {
            address: *address,
            public_key: *public_key,
            stake: account.stake,
        });
    }
    let set = if validators.is_empty() {
        previous.clone()
    } else {
        ValidatorSet::new(validators).map_err(|e| e.to_string())?
    };
    if set.hash() != change.validators_hash {
        return Err(format!(
            "the proven state gives a set of hash {}, the node says {}",
            set.hash(),
            change.validators_hash
        ));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_types::{Keypair, Vote, VoteSignature};

    use super::*;

    const CHAIN: &str = "light-test";

    fn keys() -> Vec<Keypair> {
        (1..=4).map(Keypair::from_seed).collect()
    }

    fn set(keys: &[Keypair]) -> ValidatorSet {
        ValidatorSet::new(
            keys.iter()
                .map(|k| Validator {
                    address: k.address(),
                    public_key: k.public(),
                    stake: 10,
                })
                .collect(),
        )
        .unwrap()
    }

    fn certify(signers: &[Keypair], h: &Header) -> QuorumCertificate {
        let hash = h.hash();
        QuorumCertificate {
            block_hash: hash,
            height: h.height,
            round: h.round,
            signatures: signers
                .iter()
                .map(|k| VoteSignature {
                    validator: k.address(),
                    signature: Vote::sign(k, CHAIN, hash, h.height, h.round).signature,
                })
                .collect(),
        }
    }

    /// Headers at heights 5.. with the given rounds (epoch 0), each certifying its parent
    /// with three of the four keys; and the certificate of the last.
    fn chain(rounds: &[u64]) -> (Vec<Header>, QuorumCertificate) {
        let k = keys();
        let mut headers: Vec<Header> = Vec::new();
        for (i, round) in rounds.iter().enumerate() {
            let parent = headers.last();
            let header = Header {
                chain_id: CHAIN.into(),
                height: 5 + i as u64,
                round: *round,
                parent_hash: parent.map(Header::hash).unwrap_or_default(),
                parent_qc: parent.map(|p| certify(&k[..3], p)).unwrap_or_default(),
                state_root: Hash::digest(&[i as u8]),
                ..Header::default()
            };
            headers.push(header);
        }
        let qc = certify(&k[..3], headers.last().unwrap());
        (headers, qc)
    }

    fn proof(headers: &[Header], qc: &QuorumCertificate) -> FinalityProof {
        FinalityProof {
            height: headers[0].height,
            headers: headers.iter().map(|h| HexBytes(h.encode())).collect(),
            qc: HexBytes(qc.encode()),
        }
    }

    fn verify(p: &FinalityProof) -> Result<FinalHeader, String> {
        let s = set(&keys());
        verify_finality(p, CHAIN, &|e| {
            if e == 0 {
                Ok(s.clone())
            } else {
                Err(format!("no set for epoch {e}"))
            }
        })
    }

    #[test]
    fn a_two_chain_proves_every_header_below_it() {
        // Round 8 failed: 5 (r7) -> 6 (r9) is no 2-chain, 6 (r9) -> 7 (r10) is.
        let (headers, qc) = chain(&[7, 9, 10]);
        let ok = verify(&proof(&headers, &qc)).unwrap();
        assert_eq!(ok.header, headers[0]);
        assert_eq!(ok.two_chain, (6, 7));
        assert_eq!(ok.headers, 3);
    }

    #[test]
    fn forged_or_incomplete_proofs_are_refused() {
        let (headers, qc) = chain(&[7, 9, 10]);
        let k = keys();

        // The last two rounds are not consecutive.
        let (gap, gap_qc) = chain(&[7, 8, 10]);
        let e = verify(&proof(&gap, &gap_qc)).unwrap_err();
        assert!(e.contains("not consecutive"), "{e}");

        // Too few signers: 2 of 4 equal stakes is no quorum.
        let weak = certify(&k[..2], headers.last().unwrap());
        let e = verify(&proof(&headers, &weak)).unwrap_err();
        assert!(e.contains("not a quorum"), "{e}");

        // A signature by a key outside the set.
        let mut outsider = qc.clone();
        outsider.signatures[0] = VoteSignature {
            validator: Keypair::from_seed(99).address(),
            signature: qc.signatures[0].signature,
        };
        assert!(verify(&proof(&headers, &outsider)).is_err());

        // A header replaced: the hash chain breaks.
        let mut swapped = headers.clone();
        swapped[0].state_root = Hash::digest(b"another state");
        let e = verify(&proof(&swapped, &qc)).unwrap_err();
        assert!(e.contains("does not extend"), "{e}");

        // The certificate of another block.
        let e = verify(&proof(&headers, &headers[2].parent_qc)).unwrap_err();
        assert!(e.contains("does not certify"), "{e}");

        // Another chain's headers.
        let e =
            verify_finality(&proof(&headers, &qc), "other-chain", &|_| Ok(set(&k))).unwrap_err();
        assert!(e.contains("of chain"), "{e}");

        // One header alone proves nothing.
        let e = verify(&proof(&headers[..1], &qc)).unwrap_err();
        assert!(e.contains("2 to"), "{e}");

        // Signed by another epoch's set than the one trusted for it.
        let e = verify_finality(&proof(&headers, &qc), CHAIN, &|_| {
            Ok(set(&[4, 5, 6, 7].map(Keypair::from_seed)))
        })
        .unwrap_err();
        assert!(e.contains("not a quorum"), "{e}");
    }
}
