//! Accounts: what the state tree stores under each address, and its canonical encoding.

use keel_types::proto::{Account as AccountProto, Unbonding as UnbondingProto};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Stake on its way back to the balance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unbonding {
    /// Amount returned.
    pub amount: u64,
    /// First height at which the amount is credited back to the balance.
    pub release_height: u64,
}

/// The state of one address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Spendable balance.
    pub balance: u64,
    /// Nonce the next transaction of this account must carry.
    pub nonce: u64,
    /// Bonded stake.
    pub stake: u64,
    /// Unbonding entries, oldest first.
    pub unbonding: Vec<Unbonding>,
    /// Slashed for equivocation: never again in a validator set, and its bonds are refused.
    /// There is no unjailing; the account can still unbond and spend.
    #[serde(default)]
    pub jailed: bool,
}

// The wire form of [`Account`] is `message Account` of `proto/keel/v1/keel.proto`. Field
// numbers are part of the state root: never renumber. `jailed` was added after the first
// four; `false` is omitted, so older encodings are unchanged.
impl Account {
    /// The canonical prost bytes (the value stored in the state tree). Equal accounts always
    /// encode to equal bytes: prost writes fields in tag order and skips zero scalars.
    pub fn encode(&self) -> Vec<u8> {
        AccountProto {
            balance: self.balance,
            nonce: self.nonce,
            stake: self.stake,
            unbonding: self
                .unbonding
                .iter()
                .map(|u| UnbondingProto {
                    amount: u.amount,
                    release_height: u.release_height,
                })
                .collect(),
            jailed: self.jailed,
        }
        .encode_to_vec()
    }

    /// Decodes bytes written by [`Account::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Account> {
        let p = AccountProto::decode(bytes).map_err(|e| Error::Corrupt {
            what: "account",
            reason: e.to_string(),
        })?;
        Ok(Account {
            balance: p.balance,
            nonce: p.nonce,
            stake: p.stake,
            unbonding: p
                .unbonding
                .into_iter()
                .map(|u| Unbonding {
                    amount: u.amount,
                    release_height: u.release_height,
                })
                .collect(),
            jailed: p.jailed,
        })
    }

    /// Credits every unbonding entry with `release_height <= height` back to the balance and
    /// returns the amount credited. An entry whose credit would overflow the balance stays
    /// pending (it is released by a later load once the balance has room), so no value is
    /// ever lost or created. Entries keep their order.
    pub fn release_matured(&mut self, height: u64) -> u64 {
        let mut balance = self.balance;
        let mut released = 0u64;
        self.unbonding.retain(|u| {
            if u.release_height > height {
                return true;
            }
            match balance.checked_add(u.amount) {
                Some(b) => {
                    balance = b;
                    // Cannot overflow: `released` never exceeds the final balance.
                    released = released.saturating_add(u.amount);
                    false
                }
                None => true,
            }
        });
        self.balance = balance;
        released
    }

    /// Slashes `fraction_ppm` parts per million (capped at 1,000,000) of the bonded stake and
    /// of every unbonding entry still listed, each rounded down on its own
    /// (`amount * fraction_ppm / 1_000_000` in u128); entries left at zero are removed, the
    /// others keep their order and release height. Returns the total taken, which the caller
    /// burns. Does not touch `jailed`.
    pub fn slash(&mut self, fraction_ppm: u32) -> u64 {
        // Each part is at most the amount it is taken from, so the subtractions never saturate.
        let mut total = slash_part(self.stake, fraction_ppm);
        self.stake = self.stake.saturating_sub(total);
        for u in &mut self.unbonding {
            let part = slash_part(u.amount, fraction_ppm);
            u.amount = u.amount.saturating_sub(part);
            // Cannot saturate: the parts sum to at most the account's own stake and entries,
            // and all the value on the chain fits in a u64.
            total = total.saturating_add(part);
        }
        self.unbonding.retain(|u| u.amount > 0);
        total
    }
}

/// Parts per million in a whole.
const PPM: u128 = 1_000_000;

/// `floor(amount * min(fraction_ppm, 1e6) / 1e6)`: never more than `amount`.
fn slash_part(amount: u64, fraction_ppm: u32) -> u64 {
    let ppm = u128::from(fraction_ppm).min(PPM);
    // The quotient is at most `amount`, so it fits; the fallback is unreachable.
    u64::try_from(u128::from(amount) * ppm / PPM).unwrap_or(amount)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn account_strategy() -> impl Strategy<Value = Account> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4),
            any::<bool>(),
        )
            .prop_map(|(balance, nonce, stake, u, jailed)| Account {
                balance,
                nonce,
                stake,
                unbonding: u
                    .into_iter()
                    .map(|(amount, release_height)| Unbonding {
                        amount,
                        release_height,
                    })
                    .collect(),
                jailed,
            })
    }

    /// The encoding before `jailed` existed: fields 1 to 4 only.
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldAccountProto {
        #[prost(uint64, tag = "1")]
        balance: u64,
        #[prost(uint64, tag = "2")]
        nonce: u64,
        #[prost(uint64, tag = "3")]
        stake: u64,
        #[prost(message, repeated, tag = "4")]
        unbonding: Vec<UnbondingProto>,
    }

    proptest! {
        #[test]
        fn account_round_trips_and_encoding_is_deterministic(a in account_strategy()) {
            let bytes = a.encode();
            prop_assert_eq!(Account::decode(&bytes).unwrap(), a.clone());
            prop_assert_eq!(a.clone().encode(), bytes);
        }

        #[test]
        fn old_encodings_decode_unjailed_and_reencode_byte_for_byte(a in account_strategy()) {
            let old = OldAccountProto {
                balance: a.balance,
                nonce: a.nonce,
                stake: a.stake,
                unbonding: a
                    .unbonding
                    .iter()
                    .map(|u| UnbondingProto { amount: u.amount, release_height: u.release_height })
                    .collect(),
            }
            .encode_to_vec();
            let decoded = Account::decode(&old).unwrap();
            prop_assert!(!decoded.jailed);
            prop_assert_eq!(&decoded, &Account { jailed: false, ..a });
            // So an unjailed account's bytes (and the state root) are what they always were.
            prop_assert_eq!(decoded.encode(), old);
        }

        #[test]
        fn slashing_takes_the_floored_fraction_of_each_part(
            a in account_strategy(),
            ppm in prop_oneof![0u32..=1_000_000, any::<u32>()],
        ) {
            // Keep the whole account within u64, as all value on a chain is.
            let mut a = a;
            a.stake /= 8;
            for u in &mut a.unbonding {
                u.amount /= 8;
            }
            let before = a.clone();
            let taken = a.slash(ppm);
            let p = u128::from(ppm.min(1_000_000));
            let part = |x: u64| (u128::from(x) * p / 1_000_000) as u64;
            let mut expected = part(before.stake);
            prop_assert_eq!(a.stake, before.stake - part(before.stake));
            let kept: Vec<Unbonding> = before
                .unbonding
                .iter()
                .map(|u| {
                    expected += part(u.amount);
                    Unbonding {
                        amount: u.amount - part(u.amount),
                        release_height: u.release_height,
                    }
                })
                .filter(|u| u.amount > 0)
                .collect();
            prop_assert_eq!(&a.unbonding, &kept);
            prop_assert_eq!(taken, expected);
            prop_assert_eq!(
                (a.balance, a.nonce, a.jailed),
                (before.balance, before.nonce, before.jailed)
            );
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Account::decode(&bytes);
        }
    }

    #[test]
    fn slash_example_five_percent() {
        let mut a = Account {
            balance: 7,
            stake: 1_000_019,
            unbonding: vec![
                Unbonding {
                    amount: 400,
                    release_height: 9,
                },
                Unbonding {
                    amount: 19,
                    release_height: 12,
                },
            ],
            ..Account::default()
        };
        // 50,000 ppm = 5%: 50,000 (floor of 50,000.95) + 20 + 0 (floor of 0.95).
        assert_eq!(a.slash(50_000), 50_020);
        assert_eq!(a.stake, 950_019);
        assert_eq!(
            a.unbonding,
            vec![
                Unbonding {
                    amount: 380,
                    release_height: 9
                },
                Unbonding {
                    amount: 19,
                    release_height: 12
                }
            ]
        );
        assert_eq!(a.balance, 7);
        // 100% takes everything and drops the emptied entries.
        assert_eq!(a.slash(1_000_000), 950_019 + 399);
        assert_eq!((a.stake, a.unbonding.len()), (0, 0));
    }

    #[test]
    fn jailed_flag_is_field_5() {
        let a = Account {
            jailed: true,
            ..Account::default()
        };
        assert_eq!(a.encode(), vec![0x28, 0x01]);
        assert_eq!(Account::decode(&[0x28, 0x01]).unwrap(), a);
    }

    #[test]
    fn default_account_encodes_to_nothing() {
        assert!(Account::default().encode().is_empty());
        assert_eq!(Account::decode(&[]).unwrap(), Account::default());
    }

    #[test]
    fn release_matured_credits_due_entries_and_keeps_the_rest() {
        let mut a = Account {
            balance: 10,
            unbonding: vec![
                Unbonding {
                    amount: 5,
                    release_height: 3,
                },
                Unbonding {
                    amount: 7,
                    release_height: 9,
                },
                Unbonding {
                    amount: 1,
                    release_height: 4,
                },
            ],
            ..Account::default()
        };
        assert_eq!(a.release_matured(2), 0);
        assert_eq!(a.release_matured(4), 6);
        assert_eq!(a.balance, 16);
        assert_eq!(
            a.unbonding,
            vec![Unbonding {
                amount: 7,
                release_height: 9
            }]
        );
    }

    #[test]
    fn release_that_would_overflow_stays_pending() {
        let mut a = Account {
            balance: u64::MAX - 1,
            unbonding: vec![
                Unbonding {
                    amount: 5,
                    release_height: 1,
                },
                Unbonding {
                    amount: 1,
                    release_height: 1,
                },
            ],
            ..Account::default()
        };
        assert_eq!(a.release_matured(1), 1);
        assert_eq!(a.balance, u64::MAX);
        assert_eq!(
            a.unbonding,
            vec![Unbonding {
                amount: 5,
                release_height: 1
            }]
        );
    }
}
