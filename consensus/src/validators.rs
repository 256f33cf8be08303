//! Validator sets: keys, stakes, quorum threshold and the stake-weighted leader schedule.

use keel_types::{Address, Hash, PublicKey};

use crate::{Error, Result};

/// One validator of an epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validator {
    /// Its account address (derived from `public_key`).
    pub address: Address,
    /// Its consensus key.
    pub public_key: PublicKey,
    /// Bonded stake: its voting power.
    pub stake: u64,
}

/// The validators of one epoch, sorted by address, with their total stake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatorSet {
    validators: Vec<Validator>,
    total_stake: u64,
    hash: Hash,
}

impl ValidatorSet {
    /// Builds a set. Refuses an empty set, zero stakes, duplicates, an address that does not
    /// match its key, and a total stake that overflows.
    pub fn new(mut validators: Vec<Validator>) -> Result<ValidatorSet> {
        if validators.is_empty() {
            return Err(Error::InvalidValidatorSet("no validators".into()));
        }
        validators.sort_by_key(|v| v.address);
        let mut total: u64 = 0;
        let mut hasher = blake3::Hasher::new_derive_key("keel 2026-11 validator set v1");
        for (i, v) in validators.iter().enumerate() {
            if v.stake == 0 {
                return Err(Error::InvalidValidatorSet(format!(
                    "validator {} has zero stake",
                    v.address
                )));
            }
            if v.public_key.address() != v.address {
                return Err(Error::InvalidValidatorSet(format!(
                    "address {} does not match its key",
                    v.address
                )));
            }
            if i > 0 && validators.get(i - 1).map(|p| p.address) == Some(v.address) {
                return Err(Error::InvalidValidatorSet(format!(
                    "duplicate validator {}",
                    v.address
                )));
            }
            total = total
                .checked_add(v.stake)
                .ok_or_else(|| Error::InvalidValidatorSet("total stake overflows u64".into()))?;
            hasher.update(&v.public_key.to_bytes());
            hasher.update(&v.stake.to_le_bytes());
        }
        Ok(ValidatorSet {
            validators,
            total_stake: total,
            hash: Hash(*hasher.finalize().as_bytes()),
        })
    }

    /// The validators, sorted by address.
    pub fn validators(&self) -> &[Validator] {
        &self.validators
    }

    /// Number of validators.
    pub fn len(&self) -> usize {
        self.validators.len()
    }

    /// Always false: a set has at least one validator.
    pub fn is_empty(&self) -> bool {
        self.validators.is_empty()
    }

    /// Sum of all stakes.
    pub fn total_stake(&self) -> u64 {
        self.total_stake
    }

    /// Commitment to the set (keys and stakes), stored in every header.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The validator with this address.
    pub fn get(&self, address: &Address) -> Option<&Validator> {
        self.validators
            .binary_search_by_key(address, |v| v.address)
            .ok()
            .and_then(|i| self.validators.get(i))
    }

    /// Whether `stake` is more than two thirds of the total: a quorum.
    pub fn is_quorum(&self, stake: u64) -> bool {
        // stake > 2/3 * total  <=>  3 * stake > 2 * total, in u128 so it cannot overflow.
        3 * u128::from(stake) > 2 * u128::from(self.total_stake)
    }

    /// The leader of `round`: drawn with probability proportional to stake, by a hash of the
    /// round, so every node computes the same schedule.
    pub fn leader(&self, round: u64) -> &Validator {
        self.leader_weighted(round, &[])
    }

    /// The leader of `round` in turn: the validators one after the other in set order,
    /// whatever their stake. Used while a chain has too little history for leader
    /// reputation: a failed validator then costs its turn and no more, where a draw can
    /// name it for several rounds in a row and keep a 2-chain from forming.
    pub fn leader_in_turn(&self, round: u64) -> &Validator {
        let n = self.validators.len().max(1) as u64;
        &self.validators[usize::try_from(round % n).unwrap_or(0)]
    }

    /// The leader of `round`, drawn by a hash of the round with chances proportional to
    /// `stake * weights[i]` for the i-th validator of [`ValidatorSet::validators`] (leader
    /// reputation hands in the weights; a missing weight counts as 1); by stake alone if
    /// every weight is zero.
    pub fn leader_weighted(&self, round: u64, weights: &[u64]) -> &Validator {
        let chance = |i: usize| {
            u128::from(self.validators[i].stake) * u128::from(*weights.get(i).unwrap_or(&1))
        };
        let total: u128 = (0..self.validators.len()).map(chance).sum();
        if total == 0 {
            return self.leader(round);
        }
        let mut h = blake3::Hasher::new_derive_key("keel 2026-11 leader election v1");
        h.update(self.hash.as_bytes());
        h.update(&round.to_le_bytes());
        let digest = h.finalize();
        let mut word = [0u8; 16];
        word.copy_from_slice(&digest.as_bytes()[..16]);
        let ticket = u128::from_le_bytes(word) % total;
        let mut acc: u128 = 0;
        for (i, v) in self.validators.iter().enumerate() {
            acc += chance(i);
            if ticket < acc {
                return v;
            }
        }
        // Unreachable for a valid set (ticket < total); the first validator is a safe answer.
        &self.validators[0]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use keel_types::Keypair;

    fn set(stakes: &[u64]) -> ValidatorSet {
        ValidatorSet::new(
            stakes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let k = Keypair::from_seed(i as u64);
                    Validator {
                        address: k.address(),
                        public_key: k.public(),
                        stake: *s,
                    }
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn quorum_needs_more_than_two_thirds() {
        let s = set(&[1, 1, 1]);
        assert!(!s.is_quorum(2));
        assert!(s.is_quorum(3));
        let s = set(&[25, 25, 25, 25]);
        assert!(!s.is_quorum(66));
        assert!(s.is_quorum(67));
        let s = set(&[u64::MAX / 2, u64::MAX / 2]);
        assert!(s.is_quorum(u64::MAX / 2 * 2));
    }

    #[test]
    fn leader_schedule_follows_stake() {
        let s = set(&[1, 3]);
        let heavy = s
            .validators()
            .iter()
            .find(|v| v.stake == 3)
            .unwrap()
            .address;
        let wins = (0..4000).filter(|r| s.leader(*r).address == heavy).count();
        assert!(
            (2700..3300).contains(&wins),
            "heavy validator led {wins} of 4000 rounds"
        );
        assert_eq!(s.leader(17), s.leader(17));
    }

    #[test]
    fn leaders_in_turn_take_every_validator_once_per_cycle() {
        let s = set(&[1, 5, 9]);
        let cycle: Vec<Address> = (6..9).map(|r| s.leader_in_turn(r).address).collect();
        let mut all: Vec<Address> = s.validators().iter().map(|v| v.address).collect();
        all.sort();
        let mut sorted = cycle.clone();
        sorted.sort();
        assert_eq!(sorted, all);
        assert_eq!(s.leader_in_turn(9).address, cycle[0]);
    }

    #[test]
    fn weights_scale_the_chances_and_zero_weights_fall_back_to_stake() {
        let s = set(&[1, 1, 1]);
        let [a, b, c] = [0, 1, 2].map(|i| s.validators()[i].address);
        let weights = [1, 1000, 0];
        let wins = |who: Address| {
            (0..4000)
                .filter(|r| s.leader_weighted(*r, &weights).address == who)
                .count()
        };
        assert_eq!(wins(c), 0, "weight zero never leads");
        assert!(
            wins(a) < 20,
            "weight 1 against 1000 leads rarely: {}",
            wins(a)
        );
        assert!(wins(b) > 3980);
        assert_eq!(s.leader_weighted(5, &[0, 0, 0]), s.leader(5));
    }

    #[test]
    fn bad_sets_are_refused() {
        assert!(ValidatorSet::new(vec![]).is_err());
        let k = Keypair::from_seed(1);
        let v = Validator {
            address: k.address(),
            public_key: k.public(),
            stake: 0,
        };
        assert!(ValidatorSet::new(vec![v.clone()]).is_err());
        let v = Validator { stake: 5, ..v };
        assert!(ValidatorSet::new(vec![v.clone(), v.clone()]).is_err());
        let wrong = Validator {
            address: Address([0; 20]),
            ..v
        };
        assert!(ValidatorSet::new(vec![wrong]).is_err());
    }
}
