//! The validator registry: every address that has ever bonded, with its public key, kept as
//! one entry of the state tree so that validator sets can be derived from (and proven
//! against) the state root alone.

use std::collections::BTreeMap;

use keel_types::{Address, Evidence, Hash, PublicKey, Vote};
// The wire form is `message ValidatorRegistry` of `proto/keel/v1/keel.proto`.
use keel_types::proto::{RegistryEntry as RegistryEntryProto, ValidatorRegistry as RegistryProto};
use prost::Message;

use crate::{Error, Result};

/// What the tree key of the registry is the blake3 hash of.
const REGISTRY_KEY_PREIMAGE: &[u8] = b"keel/validator-registry";

/// One validator's weight in [`crate::State::stakes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StakeEntry {
    /// The validator's account address.
    pub address: Address,
    /// Its registered public key (`address` is derived from it).
    pub public_key: PublicKey,
    /// Its bonded stake.
    pub stake: u64,
}

/// The registered validator keys, by address. An address is registered by its first
/// successful bond of a positive amount (or as a genesis validator) and is never removed:
/// jailing and unbonding only take it out of [`crate::State::stakes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidatorRegistry {
    entries: BTreeMap<Address, PublicKey>,
}

/// Wire form of [`ValidatorRegistry`]: entries strictly ascending by address. Field numbers are
/// part of the state root: never renumber.
fn corrupt(reason: impl Into<String>) -> Error {
    Error::Corrupt {
        what: "validator registry",
        reason: reason.into(),
    }
}

impl ValidatorRegistry {
    /// The state tree key of the registry: `blake3("keel/validator-registry")`. An empty
    /// registry is simply absent from the tree.
    pub fn key() -> Hash {
        Hash::digest(REGISTRY_KEY_PREIMAGE)
    }

    /// The registered key of `address`.
    pub fn get(&self, address: &Address) -> Option<&PublicKey> {
        self.entries.get(address)
    }

    /// Whether `address` is registered.
    pub fn contains(&self, address: &Address) -> bool {
        self.entries.contains_key(address)
    }

    /// Registers `public_key` under its address; returns false (and changes nothing) if that
    /// address is already registered.
    pub fn insert(&mut self, public_key: PublicKey) -> bool {
        use std::collections::btree_map::Entry;
        match self.entries.entry(public_key.address()) {
            Entry::Occupied(_) => false,
            Entry::Vacant(e) => {
                e.insert(public_key);
                true
            }
        }
    }

    /// Number of registered addresses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, by ascending address.
    pub fn iter(&self) -> impl Iterator<Item = (&Address, &PublicKey)> {
        self.entries.iter()
    }

    /// The canonical prost bytes stored under [`ValidatorRegistry::key`]:
    /// `message Registry { repeated Entry entries = 1; }`,
    /// `message Entry { bytes address = 1; bytes public_key = 2; }`, ascending by address.
    pub fn encode(&self) -> Vec<u8> {
        RegistryProto {
            entries: self
                .entries
                .iter()
                .map(|(a, k)| RegistryEntryProto {
                    address: a.0.to_vec(),
                    public_key: k.to_bytes().to_vec(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes bytes written by [`ValidatorRegistry::encode`], refusing anything it would not
    /// write: bad keys, an address that is not its key's, entries out of order or repeated.
    pub fn decode(bytes: &[u8]) -> Result<ValidatorRegistry> {
        let p = RegistryProto::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut entries = BTreeMap::new();
        let mut last: Option<Address> = None;
        for e in p.entries {
            let address = Address::from_slice("registry.address", &e.address)
                .map_err(|e| corrupt(e.to_string()))?;
            let key = PublicKey::from_bytes(&e.public_key).map_err(|e| corrupt(e.to_string()))?;
            if key.address() != address {
                return Err(corrupt(format!("{address} is not the address of its key")));
            }
            if last.is_some_and(|l| l >= address) {
                return Err(corrupt("entries not strictly ascending by address"));
            }
            last = Some(address);
            entries.insert(address, key);
        }
        Ok(ValidatorRegistry { entries })
    }

    /// The registered key of the offender if `evidence` proves an equivocation on `chain_id`:
    /// its form is right ([`Evidence::check_form`]: one voter, one round, one chain, two
    /// blocks), its chain is `chain_id`, the offender is registered and both votes' signatures
    /// verify (strictly) against the registered key. `None` otherwise.
    pub fn verify_evidence(&self, evidence: &Evidence, chain_id: &str) -> Option<PublicKey> {
        evidence.check_form().ok()?;
        if evidence.first.chain_id != chain_id {
            return None;
        }
        let key = *self.get(&evidence.offender())?;
        let signed = |v: &Vote| {
            let msg = Vote::signing_hash(&v.chain_id, &v.block_hash, v.height, v.round);
            key.verify(&msg, &v.signature).is_ok()
        };
        (signed(&evidence.first) && signed(&evidence.second)).then_some(key)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use keel_types::Keypair;

    fn registry(seeds: &[u64]) -> ValidatorRegistry {
        let mut r = ValidatorRegistry::default();
        for &s in seeds {
            r.insert(Keypair::from_seed(s).public());
        }
        r
    }

    fn evidence(key: &Keypair, chain: &str) -> Evidence {
        Evidence {
            first: Vote::sign(key, chain, Hash([1; 32]), 5, 7),
            second: Vote::sign(key, chain, Hash([2; 32]), 5, 7),
        }
    }

    #[test]
    fn registry_round_trips_sorted_and_insert_is_idempotent() {
        let mut r = registry(&[3, 1, 2]);
        assert!(!r.insert(Keypair::from_seed(1).public()));
        assert_eq!(r.len(), 3);
        let addrs: Vec<Address> = r.iter().map(|(a, _)| *a).collect();
        let mut sorted = addrs.clone();
        sorted.sort();
        assert_eq!(addrs, sorted);
        let bytes = r.encode();
        assert_eq!(ValidatorRegistry::decode(&bytes).unwrap(), r);
        assert!(ValidatorRegistry::default().encode().is_empty());
        assert_eq!(
            ValidatorRegistry::key(),
            Hash::digest(b"keel/validator-registry")
        );
        r.insert(Keypair::from_seed(9).public());
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn registry_decoding_refuses_what_encode_never_writes() {
        let entry = |seed: u64| {
            let k = Keypair::from_seed(seed).public();
            RegistryEntryProto {
                address: k.address().0.to_vec(),
                public_key: k.to_bytes().to_vec(),
            }
        };
        let mut pair = vec![entry(1), entry(2)];
        pair.sort_by(|a, b| a.address.cmp(&b.address));
        let encode = |entries: Vec<RegistryEntryProto>| RegistryProto { entries }.encode_to_vec();
        assert!(ValidatorRegistry::decode(&encode(pair.clone())).is_ok());
        let reversed: Vec<_> = pair.iter().rev().cloned().collect();
        assert!(ValidatorRegistry::decode(&encode(reversed)).is_err());
        assert!(ValidatorRegistry::decode(&encode(vec![entry(1), entry(1)])).is_err());
        let mut wrong_address = entry(1);
        wrong_address.address = entry(2).address;
        assert!(ValidatorRegistry::decode(&encode(vec![wrong_address])).is_err());
        let mut short = entry(1);
        short.public_key.pop();
        assert!(ValidatorRegistry::decode(&encode(vec![short])).is_err());
        assert!(ValidatorRegistry::decode(&[0xFF, 0xFF]).is_err());
    }

    #[test]
    fn evidence_is_verified_against_the_registered_key() {
        let (k, stranger) = (Keypair::from_seed(1), Keypair::from_seed(2));
        let r = registry(&[1]);
        let good = evidence(&k, "c");
        assert_eq!(r.verify_evidence(&good, "c"), Some(k.public()));
        // Either order.
        let swapped = Evidence {
            first: good.second.clone(),
            second: good.first.clone(),
        };
        assert!(r.verify_evidence(&swapped, "c").is_some());
        // Another chain.
        assert!(r.verify_evidence(&good, "other").is_none());
        assert!(r.verify_evidence(&evidence(&k, "other"), "c").is_none());
        // Unregistered offender.
        assert!(r.verify_evidence(&evidence(&stranger, "c"), "c").is_none());
        // A bad signature on either vote.
        for which in 0..2 {
            let mut bad = good.clone();
            let v = if which == 0 {
                &mut bad.first
            } else {
                &mut bad.second
            };
            v.signature.0[3] ^= 1;
            assert!(r.verify_evidence(&bad, "c").is_none());
        }
        // Votes that do not conflict: the same block twice, or different rounds.
        let same = Evidence {
            first: good.first.clone(),
            second: good.first.clone(),
        };
        assert!(r.verify_evidence(&same, "c").is_none());
        let rounds = Evidence {
            first: Vote::sign(&k, "c", Hash([1; 32]), 5, 7),
            second: Vote::sign(&k, "c", Hash([2; 32]), 5, 8),
        };
        assert!(r.verify_evidence(&rounds, "c").is_none());
        // A vote claiming the offender but signed by someone else.
        let mut forged = Vote::sign(&stranger, "c", Hash([2; 32]), 5, 7);
        forged.voter = k.address();
        let forged = Evidence {
            first: good.first.clone(),
            second: forged,
        };
        assert!(r.verify_evidence(&forged, "c").is_none());
    }
}
