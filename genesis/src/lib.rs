//! The keel genesis file: its JSON format, validation with clear errors, the initial accounts
//! and validator stakes, the genesis header, and generation of genesis files for new chains and
//! local testnets.
//!
//! Invariants: a [`Genesis`] value that exists has passed [`Genesis::validate`]; amounts are
//! u64 written as JSON strings (they may exceed 2^53); the genesis file does no I/O itself
//! (callers read and write the file).

mod amount;
mod error;

use std::collections::BTreeMap;

use keel_state::{Account, ExecParams};
use keel_types::{Address, Hash, Header, PublicKey, QuorumCertificate};
use serde::{Deserialize, Serialize};

pub use error::{Error, Result};

/// Balance `keel init` and `keel testnet` give each validator's own account.
pub const DEFAULT_VALIDATOR_BALANCE: u64 = 1_000_000_000_000;
/// Stake each generated validator starts with.
pub const DEFAULT_VALIDATOR_STAKE: u64 = 1_000_000;

/// Chain parameters fixed at genesis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Blocks per epoch: stake changes take effect at epoch boundaries.
    #[serde(with = "amount")]
    pub epoch_length: u64,
    /// Smallest fee a transaction may pay.
    #[serde(with = "amount")]
    pub min_fee: u64,
    /// Blocks before unbonded stake returns to the balance.
    #[serde(with = "amount")]
    pub unbonding_period: u64,
    /// Share of stake slashed for equivocation, in parts per million.
    pub slash_fraction_ppm: u32,
    /// Most transactions in one block.
    pub max_block_txs: u32,
    /// Most transaction bytes in one block.
    pub max_block_bytes: u32,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            epoch_length: 1_000,
            min_fee: 1,
            unbonding_period: 1_000,
            slash_fraction_ppm: 50_000,
            max_block_txs: 10_000,
            max_block_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A genesis validator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisValidator {
    /// Optional human name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The validator's ed25519 public key, `0x` + 64 hex.
    pub public_key: String,
    /// Its initial bonded stake.
    #[serde(with = "amount")]
    pub stake: u64,
}

/// A funded genesis account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisAccount {
    /// The account address.
    pub address: Address,
    /// Its initial balance.
    #[serde(with = "amount")]
    pub balance: u64,
}

/// The contents of `genesis.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Chain id: bound into every signature.
    pub chain_id: String,
    /// Genesis block timestamp (ms since the Unix epoch).
    #[serde(with = "amount")]
    pub genesis_time_ms: u64,
    /// Chain parameters.
    #[serde(default)]
    pub params: Params,
    /// The initial validators.
    pub validators: Vec<GenesisValidator>,
    /// Funded accounts.
    #[serde(default)]
    pub accounts: Vec<GenesisAccount>,
}

impl Genesis {
    /// A new chain with the given validators (default stake), each validator's own address
    /// funded with [`DEFAULT_VALIDATOR_BALANCE`], plus any extra funded addresses.
    pub fn generate(
        chain_id: &str,
        genesis_time_ms: u64,
        validators: &[PublicKey],
        extra_funded: &[Address],
    ) -> Genesis {
        let mut accounts: Vec<GenesisAccount> = validators
            .iter()
            .map(|k| GenesisAccount {
                address: k.address(),
                balance: DEFAULT_VALIDATOR_BALANCE,
            })
            .collect();
        accounts.extend(extra_funded.iter().map(|a| GenesisAccount {
            address: *a,
            balance: DEFAULT_VALIDATOR_BALANCE,
        }));
        Genesis {
            chain_id: chain_id.to_string(),
            genesis_time_ms,
            params: Params::default(),
            validators: validators
                .iter()
                .enumerate()
                .map(|(i, k)| GenesisValidator {
                    name: format!("validator{i}"),
                    public_key: k.to_string(),
                    stake: DEFAULT_VALIDATOR_STAKE,
                })
                .collect(),
            accounts,
        }
    }

    /// Parses and validates a genesis file's text.
    pub fn from_json(text: &str) -> Result<Genesis> {
        let g: Genesis = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        g.validate()?;
        Ok(g)
    }

    /// Pretty JSON, as written to `genesis.json`.
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks everything a node relies on, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: String, reason: &str| {
            Err(Error::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if self.chain_id.is_empty() || self.chain_id.len() > 64 {
            return bad("chain_id".into(), "must be 1 to 64 characters");
        }
        if !self
            .chain_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return bad(
                "chain_id".into(),
                "may contain only ASCII letters, digits, '-', '_' and '.'",
            );
        }
        let p = &self.params;
        if p.epoch_length == 0 {
            return bad("params.epoch_length".into(), "must be at least 1");
        }
        if p.slash_fraction_ppm > 1_000_000 {
            return bad(
                "params.slash_fraction_ppm".into(),
                "must be at most 1000000 (100%)",
            );
        }
        if p.max_block_txs == 0 || p.max_block_bytes < 1024 {
            return bad(
                "params.max_block_txs".into(),
                "blocks must allow at least 1 tx and 1 KiB",
            );
        }
        if self.validators.is_empty() {
            return bad("validators".into(), "at least one validator is required");
        }
        let mut seen = BTreeMap::new();
        let mut total: u64 = 0;
        for (i, v) in self.validators.iter().enumerate() {
            let key = parse_key(&v.public_key).map_err(|reason| Error::Invalid {
                field: format!("validators[{i}].public_key"),
                reason,
            })?;
            if v.stake == 0 {
                return bad(format!("validators[{i}].stake"), "must be greater than 0");
            }
            if seen.insert(key.address(), i).is_some() {
                return bad(format!("validators[{i}].public_key"), "duplicate validator");
            }
            total = total.checked_add(v.stake).ok_or_else(|| Error::Invalid {
                field: "validators".into(),
                reason: "total stake overflows".into(),
            })?;
        }
        let mut funded = BTreeMap::new();
        let mut supply = total;
        for (i, a) in self.accounts.iter().enumerate() {
            if funded.insert(a.address, i).is_some() {
                return bad(format!("accounts[{i}].address"), "duplicate account");
            }
            supply = supply
                .checked_add(a.balance)
                .ok_or_else(|| Error::Invalid {
                    field: format!("accounts[{i}].balance"),
                    reason: "total supply overflows u64".into(),
                })?;
        }
        Ok(())
    }

    /// The validators' keys and stakes, in file order.
    pub fn validator_keys(&self) -> Result<Vec<(PublicKey, u64)>> {
        self.validators
            .iter()
            .enumerate()
            .map(|(i, v)| {
                parse_key(&v.public_key)
                    .map(|k| (k, v.stake))
                    .map_err(|reason| Error::Invalid {
                        field: format!("validators[{i}].public_key"),
                        reason,
                    })
            })
            .collect()
    }

    /// The validators' public keys, in file order: what `State::init_genesis` registers.
    pub fn validator_public_keys(&self) -> Result<Vec<PublicKey>> {
        Ok(self
            .validator_keys()?
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// The initial state: funded balances, and each validator's stake bonded on its own
    /// account. Sorted by address.
    pub fn initial_accounts(&self) -> Result<Vec<(Address, Account)>> {
        let mut accounts: BTreeMap<Address, Account> = BTreeMap::new();
        for a in &self.accounts {
            accounts.entry(a.address).or_default().balance = a.balance;
        }
        for (key, stake) in self.validator_keys()? {
            accounts.entry(key.address()).or_default().stake = stake;
        }
        Ok(accounts.into_iter().collect())
    }

    /// Execution parameters for `keel-state`.
    pub fn exec_params(&self) -> ExecParams {
        ExecParams {
            chain_id: self.chain_id.clone(),
            min_fee: self.params.min_fee,
            unbonding_period: self.params.unbonding_period,
            slash_fraction_ppm: self.params.slash_fraction_ppm,
        }
    }

    /// The genesis header (height 0), given the initial state root and validator set hash.
    pub fn header(&self, state_root: Hash, validators_hash: Hash) -> Header {
        Header {
            chain_id: self.chain_id.clone(),
            height: 0,
            round: 0,
            epoch: 0,
            parent_hash: Hash::ZERO,
            timestamp_ms: self.genesis_time_ms,
            proposer: Address::default(),
            tx_root: Hash::ZERO,
            state_root,
            validators_hash,
            parent_qc: QuorumCertificate::default(),
            evidence_root: Hash::ZERO,
            failed_proposers: Vec::new(),
        }
    }
}

fn parse_key(text: &str) -> std::result::Result<PublicKey, String> {
    let hash: Hash = text.parse().map_err(|e: keel_types::Error| e.to_string())?;
    PublicKey::from_bytes(hash.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use keel_types::Keypair;

    fn sample() -> Genesis {
        let keys: Vec<PublicKey> = (0..3).map(|i| Keypair::from_seed(i).public()).collect();
        Genesis::generate("keel-test", 1_700_000_000_000, &keys, &[Address([9; 20])])
    }

    #[test]
    fn generated_genesis_round_trips_through_json() {
        let g = sample();
        let text = g.to_json_pretty();
        assert!(
            text.contains("\"1000000000000\""),
            "amounts are strings: {text}"
        );
        assert_eq!(Genesis::from_json(&text).unwrap(), g);
    }

    #[test]
    fn amounts_may_be_numbers_or_strings() {
        let k = Keypair::from_seed(1).public();
        let text = format!(
            r#"{{"chain_id":"c","genesis_time_ms":5,"validators":[{{"public_key":"{k}","stake":10}}],
                "accounts":[{{"address":"0x{}","balance":"18446744073709551000"}}]}}"#,
            "11".repeat(20)
        );
        let g = Genesis::from_json(&text).unwrap();
        assert_eq!(g.accounts[0].balance, 18_446_744_073_709_551_000);
        assert_eq!(g.params, Params::default());
    }

    #[test]
    fn bad_files_name_the_field() {
        let mut g = sample();
        g.validators[1].public_key = "0x1234".into();
        let e = Genesis::from_json(&g.to_json_pretty())
            .unwrap_err()
            .to_string();
        assert!(e.contains("validators[1].public_key"), "{e}");

        let mut g = sample();
        g.validators[0].stake = 0;
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("validators[0].stake"));

        let mut g = sample();
        g.accounts.push(g.accounts[0].clone());
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("duplicate account"));

        let mut g = sample();
        g.accounts[0].balance = u64::MAX;
        assert!(g.validate().unwrap_err().to_string().contains("overflows"));

        let e =
            Genesis::from_json(r#"{"chain_id":"c","genesis_time_ms":1,"validators":[],"extra":1}"#)
                .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        assert!(Genesis::from_json("not json").is_err());
    }

    #[test]
    fn validators_stake_lands_on_their_accounts() {
        let g = sample();
        let accounts = g.initial_accounts().unwrap();
        let v0 = Keypair::from_seed(0).address();
        let acc = &accounts.iter().find(|(a, _)| *a == v0).unwrap().1;
        assert_eq!(acc.stake, DEFAULT_VALIDATOR_STAKE);
        assert_eq!(acc.balance, DEFAULT_VALIDATOR_BALANCE);
        assert_eq!(accounts.len(), 4);
    }

    #[test]
    fn validator_keys_and_slash_fraction_reach_the_state() {
        let mut g = sample();
        g.params.slash_fraction_ppm = 123_456;
        let keys = g.validator_public_keys().unwrap();
        let expected: Vec<PublicKey> = (0..3).map(|i| Keypair::from_seed(i).public()).collect();
        assert_eq!(keys, expected);
        assert_eq!(g.exec_params().slash_fraction_ppm, 123_456);
    }
}
