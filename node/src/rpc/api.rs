//! The JSON-RPC API, defined once: jsonrpsee's `#[rpc]` macro turns [`KeelApi`] into the
//! server trait the node implements ([`KeelApiServer`], see [`super::server`]) and the client
//! the `keel` CLI calls ([`KeelApiClient`], implemented for jsonrpsee's HTTP and WebSocket
//! clients). Both sides use the types of [`super::types`].
//!
//! Parameters are positional on the wire (an array) or named (an object with the argument
//! names below); optional ones are `Option`s and may be left out or null. [`PARAMS`] repeats
//! each method's parameter names and types so that the server can name the parameter a bad
//! call got wrong before the generated code decodes it (see [`super::checks`]).

use jsonrpsee::core::{RpcResult, SubscriptionResult};
use jsonrpsee::proc_macros::rpc;
use keel_types::{Address, Hash};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::types::{
    AccountInfo, AccountProof, BlockId, BlockInfo, ChainStatus, HeaderInfo, Health, Height,
    SignedTxHex, TxDetail, TxStatus, ValidatorInfo,
};

/// keel's JSON-RPC methods and subscriptions (docs/rpc.md).
#[rpc(server, client)]
pub trait KeelApi {
    /// Connected peers and whether the node is syncing (`GET /health` says more: [`super::health`]).
    #[method(name = "system_health")]
    fn system_health(&self) -> RpcResult<Health>;

    /// Chain id, node id, latest and final blocks, epoch, sync state, peers, mempool size
    /// and the minimum fee.
    #[method(name = "chain_status")]
    fn chain_status(&self) -> RpcResult<ChainStatus>;

    /// A block by height or hash: header fields plus `tx_hashes`, or `txs` when `full_txs`.
    #[method(name = "chain_getBlock")]
    fn chain_get_block(&self, block: BlockId, full_txs: Option<bool>) -> RpcResult<BlockInfo>;

    /// A block's header fields, by height or hash.
    #[method(name = "chain_getHeader")]
    fn chain_get_header(&self, block: BlockId) -> RpcResult<HeaderInfo>;

    /// A pending or stored transaction, where it stands and its receipt.
    #[method(name = "chain_getTransaction")]
    fn chain_get_transaction(&self, hash: Hash) -> RpcResult<TxDetail>;

    /// An account at a final height (the latest final one without `height`).
    #[method(name = "state_getAccount")]
    fn state_get_account(&self, address: Address, height: Option<Height>)
        -> RpcResult<AccountInfo>;

    /// An account at a final height with the Merkle proof linking it to the state root.
    #[method(name = "state_getProof")]
    fn state_get_proof(&self, address: Address, height: Option<Height>) -> RpcResult<AccountProof>;

    /// The proof that the block at `height` (a final height) is final: headers up to a
    /// certified 2-chain and the certificate of the last (docs/light-client.md).
    #[method(name = "chain_getFinalityProof")]
    fn chain_get_finality_proof(&self, height: Height) -> RpcResult<crate::light::FinalityProof>;

    /// The proof that `epoch` (at least 1) has its validator set: the block that decided it,
    /// final, and the registry and accounts it was read from (docs/light-client.md).
    #[method(name = "chain_getEpochChange")]
    fn chain_get_epoch_change(&self, epoch: u64) -> RpcResult<crate::light::EpochChange>;

    /// The validator set that signs the block at `height`; without one, the current epoch's.
    #[method(name = "state_getValidators")]
    fn state_get_validators(&self, height: Option<Height>) -> RpcResult<Vec<ValidatorInfo>>;

    /// Admits a signed transaction to the mempool and gossips it; its hash.
    #[method(name = "tx_submit")]
    async fn tx_submit(&self, tx: SignedTxHex) -> RpcResult<Hash>;

    /// Where a transaction stands.
    #[method(name = "tx_status")]
    fn tx_status(&self, hash: Hash) -> RpcResult<TxStatus>;

    /// Every new certified head, as notifications `chain_newHead` (WebSocket).
    #[subscription(
        name = "chain_subscribeNewHeads" => "chain_newHead",
        unsubscribe = "chain_unsubscribeNewHeads",
        item = HeaderInfo
    )]
    async fn chain_subscribe_new_heads(&self) -> SubscriptionResult;

    /// Every newly final head, in height order, as notifications `chain_finalizedHead`
    /// (WebSocket).
    #[subscription(
        name = "chain_subscribeFinalizedHeads" => "chain_finalizedHead",
        unsubscribe = "chain_unsubscribeFinalizedHeads",
        item = HeaderInfo
    )]
    async fn chain_subscribe_finalized_heads(&self) -> SubscriptionResult;
}

/// One parameter of a method: its name, whether it is required, and a check of a given
/// (non-null) value against the parameter's type, returning the type's own complaint.
pub struct Param {
    /// The argument name in [`KeelApi`], which is the name a named call uses.
    pub name: &'static str,
    /// Whether a call must give it (a non-`Option` argument).
    pub required: bool,
    check: fn(&Value) -> Result<(), String>,
}

fn decodes_as<T: DeserializeOwned>(v: &Value) -> Result<(), String> {
    T::deserialize(v).map(|_| ()).map_err(|e| {
        // serde's "invalid type: integer `12`, expected a string" becomes "expected a
        // string": the caller knows what it sent.
        let e = e.to_string();
        match e.rsplit_once(", expected ") {
            Some((given, expected)) if given.starts_with("invalid type: ") => {
                format!("expected {expected}")
            }
            _ => e,
        }
    })
}

const fn required<T: DeserializeOwned>(name: &'static str) -> Param {
    Param {
        name,
        required: true,
        check: decodes_as::<T>,
    }
}

const fn optional<T: DeserializeOwned>(name: &'static str) -> Param {
    Param {
        name,
        required: false,
        check: decodes_as::<T>,
    }
}

impl Param {
    /// Whether `value` decodes as this parameter's type; else why not.
    pub fn check(&self, value: &Value) -> Result<(), String> {
        (self.check)(value)
    }
}

/// Every method of [`KeelApi`] (subscriptions aside) with its parameters in position order,
/// as in the trait. Kept beside it by hand: the macro exposes no parameter list, and a unit
/// test checks that the names here are exactly the module's methods.
pub const PARAMS: &[(&str, &[Param])] = &[
    ("system_health", &[]),
    ("chain_status", &[]),
    (
        "chain_getBlock",
        &[required::<BlockId>("block"), optional::<bool>("full_txs")],
    ),
    ("chain_getHeader", &[required::<BlockId>("block")]),
    ("chain_getTransaction", &[required::<Hash>("hash")]),
    (
        "state_getAccount",
        &[required::<Address>("address"), optional::<Height>("height")],
    ),
    (
        "state_getProof",
        &[required::<Address>("address"), optional::<Height>("height")],
    ),
    ("chain_getFinalityProof", &[required::<Height>("height")]),
    ("chain_getEpochChange", &[required::<u64>("epoch")]),
    ("state_getValidators", &[optional::<Height>("height")]),
    ("tx_submit", &[required::<SignedTxHex>("tx")]),
    ("tx_status", &[required::<Hash>("hash")]),
];

/// The parameters of `method`, with the method's name as a `'static` string; `None` for a
/// subscription or an unknown method.
pub fn params_of(method: &str) -> Option<(&'static str, &'static [Param])> {
    PARAMS
        .iter()
        .find(|(name, _)| *name == method)
        .map(|(name, params)| (*name, *params))
}

/// The subscription methods of [`KeelApi`] and their unsubscribe methods: they need a
/// WebSocket connection. A unit test checks them against the module.
pub const SUBSCRIPTION_METHODS: [&str; 4] = [
    "chain_subscribeNewHeads",
    "chain_unsubscribeNewHeads",
    "chain_subscribeFinalizedHeads",
    "chain_unsubscribeFinalizedHeads",
];
