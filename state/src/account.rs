//! Accounts: what the state tree stores under each address, and its canonical encoding.

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
}

/// Wire form of [`Account`]. Field numbers are part of the state root: never renumber.
#[derive(Clone, PartialEq, prost::Message)]
struct AccountProto {
    #[prost(uint64, tag = "1")]
    balance: u64,
    #[prost(uint64, tag = "2")]
    nonce: u64,
    #[prost(uint64, tag = "3")]
    stake: u64,
    #[prost(message, repeated, tag = "4")]
    unbonding: Vec<UnbondingProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UnbondingProto {
    #[prost(uint64, tag = "1")]
    amount: u64,
    #[prost(uint64, tag = "2")]
    release_height: u64,
}

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
        )
            .prop_map(|(balance, nonce, stake, u)| Account {
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
            })
    }

    proptest! {
        #[test]
        fn account_round_trips_and_encoding_is_deterministic(a in account_strategy()) {
            let bytes = a.encode();
            prop_assert_eq!(Account::decode(&bytes).unwrap(), a.clone());
            prop_assert_eq!(a.clone().encode(), bytes);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Account::decode(&bytes);
        }
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
