//! What the JSON-RPC methods take and return, serialised exactly as docs/rpc.md describes:
//! the server builds these, the `keel` CLI reads them.
//!
//! Amounts (balances, stakes, fees, transfer amounts) are JSON strings because they may
//! exceed 2^53 ([`amount`]); heights, rounds, nonces and timestamps are numbers. Byte strings
//! are `0x`-prefixed lower-case hex ([`HexBytes`]).

use keel_consensus::Validator;
use keel_state::{Account, Proof};
use keel_types::{Address, Hash, Header, Transaction, TxKind};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

pub use crate::context::TxStatus;

pub use crate::json::{amount, HexBytes};

/// A height parameter: a JSON number, or a decimal string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Height(pub u64);

/// A JSON number or decimal string as a `u64`.
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

impl Serialize for Height {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Height {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        as_u64(&Value::deserialize(d)?)
            .map(Height)
            .ok_or_else(|| D::Error::custom("expected an unsigned integer"))
    }
}

/// A block parameter: its height (a JSON number or decimal string) or its `0x` hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockId {
    /// The block at this height.
    Height(u64),
    /// The block with this hash.
    Hash(Hash),
}

impl Serialize for BlockId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BlockId::Height(h) => s.serialize_u64(*h),
            BlockId::Hash(hash) => hash.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BlockId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s.starts_with("0x") => {
                s.parse().map(BlockId::Hash).map_err(D::Error::custom)
            }
            v => as_u64(&v)
                .map(BlockId::Height)
                .ok_or_else(|| D::Error::custom("expected a height or a 0x block hash")),
        }
    }
}

/// The `tx_submit` parameter: hex of the `SignedTx` bytes, `0x` optional. It stays text until
/// the server has checked its length, so an oversized transaction is refused as too large
/// (-32008) before any decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTxHex(pub String);

impl SignedTxHex {
    /// The hex of `bytes`, `0x`-prefixed.
    pub fn from_bytes(bytes: &[u8]) -> SignedTxHex {
        SignedTxHex(format!("0x{}", hex::encode(bytes)))
    }

    /// The hex digits, without the `0x` prefix.
    pub fn digits(&self) -> &str {
        self.0.strip_prefix("0x").unwrap_or(&self.0)
    }
}

impl Serialize for SignedTxHex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SignedTxHex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(SignedTxHex(s)),
            _ => Err(D::Error::custom("expected a hex string")),
        }
    }
}

/// `system_health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Connected peers.
    pub peers: usize,
    /// Whether the node is fetching missing blocks.
    pub is_syncing: bool,
}

/// `chain_status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStatus {
    /// Chain id.
    pub chain_id: String,
    /// The node's libp2p peer id (`12D3Koo...`).
    pub node_id: String,
    /// Height of the highest certified block.
    pub latest_height: u64,
    /// Its hash.
    pub latest_hash: Hash,
    /// Height of the highest final block.
    pub finalized_height: u64,
    /// Its hash.
    pub finalized_hash: Hash,
    /// The lowest height whose block, receipts and state this node serves (0 unless pruned).
    pub earliest_height: u64,
    /// The epoch consensus is in.
    pub epoch: u64,
    /// Whether the node is fetching missing blocks.
    pub syncing: bool,
    /// Connected peers.
    pub peers: usize,
    /// Transactions in the mempool.
    pub mempool_txs: usize,
    /// The chain's minimum fee.
    #[serde(with = "amount")]
    pub min_fee: u64,
}

/// One validator's vote in a quorum certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteInfo {
    /// The validator's address.
    pub validator: Address,
    /// Its ed25519 signature (64 bytes).
    pub signature: HexBytes,
}

/// A quorum certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QcInfo {
    /// The certified block.
    pub block_hash: Hash,
    /// Its height.
    pub height: u64,
    /// The round of the votes.
    pub round: u64,
    /// The votes.
    pub signatures: Vec<VoteInfo>,
}

/// Header fields (`chain_getHeader`, the head subscriptions, and the start of a block).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderInfo {
    /// The header's hash.
    pub hash: Hash,
    /// Chain id.
    pub chain_id: String,
    /// Height.
    pub height: u64,
    /// Consensus round, packed with its epoch: `epoch << 32 | round within the epoch`.
    pub round: u64,
    /// Epoch of the validator set that produced it.
    pub epoch: u64,
    /// Hash of the parent header.
    pub parent_hash: Hash,
    /// Proposer's clock at proposal, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Address of the proposer.
    pub proposer: Address,
    /// Merkle root of the transaction hashes.
    pub tx_root: Hash,
    /// State root after the block's transactions.
    pub state_root: Hash,
    /// Hash of the validator set that produced the block.
    pub validators_hash: Hash,
    /// Certificate of the parent block.
    pub parent_qc: QcInfo,
    /// Merkle root of the ids of the block's evidence.
    pub evidence_root: Hash,
    /// Leaders of the rounds between the parent's certificate and this block's round, which
    /// certified no block (oldest first, at most 10): what leader reputation reads.
    pub failed_proposers: Vec<Address>,
}

impl From<&Header> for HeaderInfo {
    fn from(h: &Header) -> HeaderInfo {
        HeaderInfo {
            hash: h.hash(),
            chain_id: h.chain_id.clone(),
            height: h.height,
            round: h.round,
            epoch: h.epoch,
            parent_hash: h.parent_hash,
            timestamp_ms: h.timestamp_ms,
            proposer: h.proposer,
            tx_root: h.tx_root,
            state_root: h.state_root,
            validators_hash: h.validators_hash,
            evidence_root: h.evidence_root,
            failed_proposers: h.failed_proposers.clone(),
            parent_qc: QcInfo {
                block_hash: h.parent_qc.block_hash,
                height: h.parent_qc.height,
                round: h.parent_qc.round,
                signatures: h
                    .parent_qc
                    .signatures
                    .iter()
                    .map(|s| VoteInfo {
                        validator: s.validator,
                        signature: HexBytes(s.signature.0.to_vec()),
                    })
                    .collect(),
            },
        }
    }
}

/// What a transaction does, with `type` naming it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TxKindInfo {
    /// Moves `amount` to `to`.
    Transfer {
        /// The recipient.
        to: Address,
        /// Amount moved.
        #[serde(with = "amount")]
        amount: u64,
    },
    /// Bonds `amount` of the sender's balance as stake.
    Bond {
        /// Amount bonded.
        #[serde(with = "amount")]
        amount: u64,
    },
    /// Starts unbonding `amount` of the sender's stake.
    Unbond {
        /// Amount unbonded.
        #[serde(with = "amount")]
        amount: u64,
    },
}

/// Transaction fields (a block's `txs`, and the start of `chain_getTransaction`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxInfo {
    /// blake3 of the `SignedTx` bytes.
    pub hash: Hash,
    /// The sender's address.
    pub from: Address,
    /// The sender's ed25519 public key (32 bytes).
    pub public_key: HexBytes,
    /// Chain the transaction is for.
    pub chain_id: String,
    /// Sender's nonce.
    pub nonce: u64,
    /// Fee paid to the proposer.
    #[serde(with = "amount")]
    pub fee: u64,
    /// `type` and its fields.
    #[serde(flatten)]
    pub kind: TxKindInfo,
    /// The exact `SignedTx` bytes (hash = blake3 of them): what `tx_submit` took.
    pub raw: HexBytes,
}

impl From<&Transaction> for TxInfo {
    fn from(tx: &Transaction) -> TxInfo {
        TxInfo {
            hash: tx.hash,
            from: tx.sender,
            public_key: HexBytes(tx.public_key.to_bytes().to_vec()),
            chain_id: tx.chain_id.clone(),
            nonce: tx.nonce,
            fee: tx.fee,
            kind: match tx.kind {
                TxKind::Transfer { to, amount } => TxKindInfo::Transfer { to, amount },
                TxKind::Bond { amount } => TxKindInfo::Bond { amount },
                TxKind::Unbond { amount } => TxKindInfo::Unbond { amount },
            },
            raw: HexBytes(tx.bytes.clone()),
        }
    }
}

/// The outcome of an included transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptInfo {
    /// Height of the block that includes it.
    pub height: u64,
    /// Its position in that block.
    pub index: u32,
    /// Whether its effect was applied (a failed transaction may still pay its fee).
    pub success: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Fee charged.
    #[serde(with = "amount")]
    pub fee: u64,
}

impl From<&keel_types::Receipt> for ReceiptInfo {
    fn from(r: &keel_types::Receipt) -> ReceiptInfo {
        ReceiptInfo {
            height: r.height,
            index: r.index,
            success: r.success,
            error: r.error.clone(),
            fee: r.fee,
        }
    }
}

/// `chain_getTransaction`: the transaction, where it stands, and its receipt once included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxDetail {
    /// The transaction's fields.
    #[serde(flatten)]
    pub tx: TxInfo,
    /// Where it stands.
    pub status: TxStatus,
    /// Its receipt; null while pending.
    pub receipt: Option<ReceiptInfo>,
}

/// A block's transactions: their hashes, or (`full_txs`) the transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BlockBody {
    /// The transactions themselves.
    Full {
        /// In block order.
        txs: Vec<TxInfo>,
    },
    /// Their hashes.
    Hashes {
        /// In block order.
        tx_hashes: Vec<Hash>,
    },
}

/// `chain_getBlock`: header fields plus `tx_hashes`, or `txs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// The header's fields.
    #[serde(flatten)]
    pub header: HeaderInfo,
    /// `tx_hashes` or `txs`.
    #[serde(flatten)]
    pub body: BlockBody,
}

/// Stake on its way back to the balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnbondingInfo {
    /// Amount returned.
    #[serde(with = "amount")]
    pub amount: u64,
    /// First height at which it is credited back to the balance.
    pub release_height: u64,
}

/// `state_getAccount` (and the account of `state_getProof`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// The address.
    pub address: Address,
    /// Spendable balance.
    #[serde(with = "amount")]
    pub balance: u64,
    /// Nonce the next transaction must carry, at `height`.
    pub nonce: u64,
    /// Bonded stake.
    #[serde(with = "amount")]
    pub stake: u64,
    /// Unbonding entries, oldest first.
    pub unbonding: Vec<UnbondingInfo>,
    /// Jailed for a double signature: its stake no longer counts for any validator set.
    pub jailed: bool,
    /// The height the state was read at.
    pub height: u64,
    /// At the latest final height only: the nonce to use next, counting the sender's
    /// pending transactions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_nonce: Option<u64>,
}

impl AccountInfo {
    /// The account at `address` as read at `height`, without `next_nonce`.
    pub fn new(address: Address, account: &Account, height: u64) -> AccountInfo {
        AccountInfo {
            address,
            balance: account.balance,
            nonce: account.nonce,
            stake: account.stake,
            unbonding: account
                .unbonding
                .iter()
                .map(|u| UnbondingInfo {
                    amount: u.amount,
                    release_height: u.release_height,
                })
                .collect(),
            jailed: account.jailed,
            height,
            next_nonce: None,
        }
    }
}

/// `state_getProof`: an account and the Merkle proof linking it to the header's state root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountProof {
    /// The state root at `height` (the header's `state_root`).
    pub state_root: Hash,
    /// The height of that state.
    pub height: u64,
    /// The address.
    pub address: Address,
    /// Its key in the state tree: blake3 of the address bytes.
    pub key: Hash,
    /// The account's prost encoding; null if the account does not exist.
    pub value: Option<HexBytes>,
    /// The account, decoded; null if it does not exist.
    pub account: Option<AccountInfo>,
    /// The proof.
    pub proof: Proof,
    /// The epoch of `height`: its validator set signs `finality`.
    pub epoch: u64,
    /// The protobuf `Header` bytes at `height` (block hash = blake3 of them).
    pub header: HexBytes,
    /// The proof that `height` is final (null at height 0, genesis).
    pub finality: Option<crate::light::FinalityProof>,
}

/// One entry of `state_getValidators`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidatorInfo {
    /// Its account address.
    pub address: Address,
    /// Its consensus key (32 bytes).
    pub public_key: HexBytes,
    /// Bonded stake.
    #[serde(with = "amount")]
    pub stake: u64,
    /// Voting power: its stake.
    #[serde(with = "amount")]
    pub voting_power: u64,
    /// Its share of the set's total stake, 0..=1.
    pub voting_power_share: f64,
}

impl ValidatorInfo {
    /// `v` in a set whose stakes add up to `total` (at least 1).
    pub fn new(v: &Validator, total: u64) -> ValidatorInfo {
        ValidatorInfo {
            address: v.address,
            public_key: HexBytes(v.public_key.to_bytes().to_vec()),
            stake: v.stake,
            voting_power: v.stake,
            voting_power_share: v.stake as f64 / total as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use std::fmt;

    use super::*;

    fn round_trips<T>(value: &T, expected: Value)
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug,
    {
        assert_eq!(serde_json::to_value(value).unwrap(), expected);
        let back: T = serde_json::from_value(expected).unwrap();
        assert_eq!(&back, value);
    }

    fn tx(kind: TxKindInfo) -> TxInfo {
        TxInfo {
            hash: Hash([1; 32]),
            from: Address([2; 20]),
            public_key: HexBytes(vec![3; 32]),
            chain_id: "c".into(),
            nonce: 4,
            fee: u64::MAX,
            kind,
            raw: HexBytes(vec![5, 6]),
        }
    }

    fn tx_json(extra: Value) -> Value {
        let mut v = json!({
            "hash": Hash([1; 32]),
            "from": Address([2; 20]),
            "public_key": format!("0x{}", "03".repeat(32)),
            "chain_id": "c",
            "nonce": 4,
            "fee": u64::MAX.to_string(),
            "raw": "0x0506",
        });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        v
    }

    #[test]
    fn amounts_are_strings_and_kinds_are_flat_with_a_type() {
        let to = Address([5; 20]);
        round_trips(
            &tx(TxKindInfo::Transfer { to, amount: 7 }),
            tx_json(json!({"type": "transfer", "to": to, "amount": "7"})),
        );
        round_trips(
            &tx(TxKindInfo::Bond { amount: 8 }),
            tx_json(json!({"type": "bond", "amount": "8"})),
        );
        round_trips(
            &tx(TxKindInfo::Unbond { amount: 9 }),
            tx_json(json!({"type": "unbond", "amount": "9"})),
        );
    }

    #[test]
    fn a_pending_transaction_has_a_null_receipt_and_an_included_one_its_receipt() {
        let kind = TxKindInfo::Bond { amount: 1 };
        round_trips(
            &TxDetail {
                tx: tx(kind.clone()),
                status: TxStatus::Pending,
                receipt: None,
            },
            tx_json(json!({"type": "bond", "amount": "1", "status": "pending", "receipt": null})),
        );
        round_trips(
            &TxDetail {
                tx: tx(kind),
                status: TxStatus::Finalized,
                receipt: Some(ReceiptInfo {
                    height: 3,
                    index: 0,
                    success: false,
                    error: Some("insufficient funds".into()),
                    fee: 2,
                }),
            },
            tx_json(json!({
                "type": "bond", "amount": "1", "status": "finalized",
                "receipt": {"height": 3, "index": 0, "success": false,
                            "error": "insufficient funds", "fee": "2"},
            })),
        );
    }

    fn header() -> HeaderInfo {
        HeaderInfo {
            hash: Hash([1; 32]),
            chain_id: "c".into(),
            height: 2,
            round: (1 << 32) | 3,
            epoch: 1,
            parent_hash: Hash([4; 32]),
            timestamp_ms: 5,
            proposer: Address([6; 20]),
            tx_root: Hash([7; 32]),
            state_root: Hash([8; 32]),
            validators_hash: Hash([9; 32]),
            parent_qc: QcInfo {
                block_hash: Hash([4; 32]),
                height: 1,
                round: 2,
                signatures: vec![VoteInfo {
                    validator: Address([6; 20]),
                    signature: HexBytes(vec![0xab; 64]),
                }],
            },
            evidence_root: Hash([10; 32]),
            failed_proposers: vec![Address([11; 20])],
        }
    }

    #[test]
    fn a_block_is_its_header_fields_plus_hashes_or_transactions() {
        let mut expected = serde_json::to_value(header()).unwrap();
        assert_eq!(
            expected["parent_qc"]["signatures"][0]["signature"],
            json!(format!("0x{}", "ab".repeat(64)))
        );
        expected["tx_hashes"] = json!([Hash([1; 32])]);
        round_trips(
            &BlockInfo {
                header: header(),
                body: BlockBody::Hashes {
                    tx_hashes: vec![Hash([1; 32])],
                },
            },
            expected.clone(),
        );
        let full = tx(TxKindInfo::Bond { amount: 1 });
        let Value::Object(m) = &mut expected else {
            unreachable!()
        };
        m.remove("tx_hashes");
        m.insert("txs".into(), json!([full]));
        round_trips(
            &BlockInfo {
                header: header(),
                body: BlockBody::Full { txs: vec![full] },
            },
            expected,
        );
    }

    #[test]
    fn next_nonce_is_left_out_when_absent() {
        let mut account = AccountInfo::new(
            Address([1; 20]),
            &Account {
                balance: 10,
                nonce: 2,
                stake: 3,
                unbonding: vec![keel_state::Unbonding {
                    amount: 4,
                    release_height: 9,
                }],
                jailed: false,
            },
            7,
        );
        let expected = json!({
            "address": Address([1; 20]), "balance": "10", "nonce": 2, "stake": "3",
            "unbonding": [{"amount": "4", "release_height": 9}], "jailed": false, "height": 7,
        });
        round_trips(&account, expected.clone());
        account.next_nonce = Some(5);
        let mut with_next = expected;
        with_next["next_nonce"] = json!(5);
        round_trips(&account, with_next);
    }

    #[test]
    fn params_take_the_forms_the_server_always_took() {
        let height: Height = serde_json::from_value(json!("12")).unwrap();
        assert_eq!(height, Height(12));
        assert_eq!(serde_json::to_value(height).unwrap(), json!(12));
        for bad in [json!(-1), json!(1.5), json!("x"), json!(true)] {
            let e = serde_json::from_value::<Height>(bad).unwrap_err();
            assert_eq!(e.to_string(), "expected an unsigned integer");
        }

        let hash = Hash([3; 32]);
        for (given, id) in [
            (json!(5), BlockId::Height(5)),
            (json!("5"), BlockId::Height(5)),
            (json!(hash), BlockId::Hash(hash)),
        ] {
            assert_eq!(serde_json::from_value::<BlockId>(given).unwrap(), id);
        }
        assert_eq!(serde_json::to_value(BlockId::Height(5)).unwrap(), json!(5));
        assert_eq!(
            serde_json::to_value(BlockId::Hash(hash)).unwrap(),
            json!(hash)
        );
        let e = serde_json::from_value::<BlockId>(json!(false)).unwrap_err();
        assert_eq!(e.to_string(), "expected a height or a 0x block hash");
        assert!(serde_json::from_value::<BlockId>(json!("0x12")).is_err());

        let tx = SignedTxHex::from_bytes(&[0xde, 0xad]);
        assert_eq!(serde_json::to_value(&tx).unwrap(), json!("0xdead"));
        assert_eq!(tx.digits(), "dead");
        let e = serde_json::from_value::<SignedTxHex>(json!(5)).unwrap_err();
        assert_eq!(e.to_string(), "expected a hex string");
    }

    #[test]
    fn statuses_are_lower_case_names() {
        for (status, name) in [
            (TxStatus::Pending, "pending"),
            (TxStatus::Included, "included"),
            (TxStatus::Finalized, "finalized"),
            (TxStatus::Unknown, "unknown"),
        ] {
            round_trips(&status, json!(name));
            assert_eq!(status.as_str(), name);
        }
    }
}
