//! The JSON-RPC 2.0 server (HTTP POST and WebSocket on one port) and its error codes.
//!
//! Methods and result shapes follow DESIGN.md section 4. Amounts (balances, stakes, fees,
//! transfer amounts) are JSON strings because they may exceed 2^53; heights, rounds, nonces
//! and timestamps are numbers.

use std::net::SocketAddr;
use std::sync::Arc;

use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::server::middleware::http::ProxyGetRequestLayer;
use jsonrpsee::server::{
    PendingSubscriptionSink, RpcModule, Server, ServerConfig, ServerHandle, SubscriptionMessage,
};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use keel_state::{account_key, Account};
use keel_types::{Block, Hash, Header, Transaction, TxKind};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::config::RpcConfig;
use crate::context::{NodeContext, SubmitError};
use crate::mempool::Rejection;
use crate::{Error, Result};

/// Application error codes (-32000..-32099), stable for clients.
pub mod codes {
    /// Internal failure (storage...).
    pub const INTERNAL: i32 = -32000;
    /// The transaction's signature does not verify.
    pub const BAD_SIGNATURE: i32 = -32001;
    /// Nonce too low or too far ahead.
    pub const BAD_NONCE: i32 = -32002;
    /// The sender cannot pay.
    pub const INSUFFICIENT_FUNDS: i32 = -32003;
    /// The mempool is full.
    pub const MEMPOOL_FULL: i32 = -32004;
    /// The fee is below the chain minimum, or too low to replace a pending transaction.
    pub const FEE_TOO_LOW: i32 = -32005;
    /// The transaction is for another chain.
    pub const WRONG_CHAIN: i32 = -32006;
    /// The transaction is already pending.
    pub const ALREADY_KNOWN: i32 = -32007;
    /// The transaction is larger than allowed.
    pub const TX_TOO_LARGE: i32 = -32008;
    /// No such block, transaction or height.
    pub const NOT_FOUND: i32 = -32010;
    /// The requested height has been pruned.
    pub const PRUNED: i32 = -32011;
    /// Invalid parameters (JSON-RPC standard).
    pub const INVALID_PARAMS: i32 = -32602;
}

type RpcResult<T> = std::result::Result<T, ErrorObjectOwned>;

fn err(code: i32, msg: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(code, msg.into(), None::<()>)
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ErrorObjectOwned {
    err(
        codes::INVALID_PARAMS,
        format!("invalid params: {field}: {reason}"),
    )
}

fn internal(e: impl std::fmt::Display) -> ErrorObjectOwned {
    err(codes::INTERNAL, format!("internal error: {e}"))
}

/// Positional arguments of a call, accepting either an array or an object with the method's
/// parameter names.
struct Args {
    values: Vec<Value>,
    names: &'static [&'static str],
}

impl Args {
    fn parse(params: &Params<'_>, names: &'static [&'static str]) -> RpcResult<Args> {
        let raw = params.as_str().unwrap_or("");
        let value: Value = if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(raw).map_err(|e| invalid("params", e))?
        };
        let values = match value {
            Value::Null => Vec::new(),
            Value::Array(values) => values,
            Value::Object(mut map) => {
                if let Some(unknown) = map.keys().find(|k| !names.contains(&k.as_str())) {
                    return Err(invalid(unknown, "unknown parameter"));
                }
                names
                    .iter()
                    .map(|n| map.remove(*n).unwrap_or(Value::Null))
                    .collect()
            }
            _ => return Err(invalid("params", "must be an array or an object")),
        };
        if values.len() > names.len() {
            return Err(invalid(
                "params",
                format!("expected at most {} parameters", names.len()),
            ));
        }
        Ok(Args { values, names })
    }

    fn get(&self, i: usize) -> Option<&Value> {
        self.values.get(i).filter(|v| !v.is_null())
    }

    fn name(&self, i: usize) -> &'static str {
        self.names.get(i).copied().unwrap_or("param")
    }

    fn required(&self, i: usize) -> RpcResult<&Value> {
        self.get(i).ok_or_else(|| invalid(self.name(i), "missing"))
    }

    fn u64_opt(&self, i: usize) -> RpcResult<Option<u64>> {
        match self.get(i) {
            None => Ok(None),
            Some(v) => parse_u64(v)
                .map(Some)
                .ok_or_else(|| invalid(self.name(i), "expected an unsigned integer")),
        }
    }

    fn bool_opt(&self, i: usize) -> RpcResult<bool> {
        match self.get(i) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(self.name(i), "expected a boolean")),
        }
    }

    fn parsed<T: std::str::FromStr>(&self, i: usize) -> RpcResult<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.required(i)?;
        let s = v
            .as_str()
            .ok_or_else(|| invalid(self.name(i), "expected a string"))?;
        s.parse().map_err(|e| invalid(self.name(i), e))
    }
}

fn parse_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A block identified by height (number) or hash (string).
enum BlockId {
    Height(u64),
    Hash(Hash),
}

fn block_id(args: &Args, i: usize) -> RpcResult<BlockId> {
    match args.required(i)? {
        Value::String(s) if s.starts_with("0x") => s
            .parse()
            .map(BlockId::Hash)
            .map_err(|e| invalid(args.name(i), e)),
        v => parse_u64(v)
            .map(BlockId::Height)
            .ok_or_else(|| invalid(args.name(i), "expected a height or a 0x block hash")),
    }
}

/// JSON of a header, with its hash.
pub fn header_json(h: &Header) -> Value {
    json!({
        "hash": h.hash(),
        "chain_id": h.chain_id,
        "height": h.height,
        "round": h.round,
        "epoch": h.epoch,
        "parent_hash": h.parent_hash,
        "timestamp_ms": h.timestamp_ms,
        "proposer": h.proposer,
        "tx_root": h.tx_root,
        "state_root": h.state_root,
        "validators_hash": h.validators_hash,
        "parent_qc": {
            "block_hash": h.parent_qc.block_hash,
            "height": h.parent_qc.height,
            "round": h.parent_qc.round,
            "signatures": h.parent_qc.signatures.iter().map(|s| json!({
                "validator": s.validator,
                "signature": format!("0x{}", hex::encode(s.signature.0)),
            })).collect::<Vec<_>>(),
        },
    })
}

/// JSON of a transaction.
pub fn tx_json(tx: &Transaction) -> Value {
    let mut v = json!({
        "hash": tx.hash,
        "from": tx.sender,
        "public_key": tx.public_key.to_string(),
        "chain_id": tx.chain_id,
        "nonce": tx.nonce,
        "fee": tx.fee.to_string(),
    });
    let kind = match tx.kind {
        TxKind::Transfer { to, amount } => {
            json!({"type": "transfer", "to": to, "amount": amount.to_string()})
        }
        TxKind::Bond { amount } => json!({"type": "bond", "amount": amount.to_string()}),
        TxKind::Unbond { amount } => json!({"type": "unbond", "amount": amount.to_string()}),
    };
    if let (Value::Object(m), Value::Object(k)) = (&mut v, kind) {
        m.extend(k);
    }
    v
}

fn account_json(address: &keel_types::Address, account: &Account, height: u64) -> Value {
    json!({
        "address": address,
        "balance": account.balance.to_string(),
        "nonce": account.nonce,
        "stake": account.stake.to_string(),
        "unbonding": account.unbonding.iter().map(|u| json!({
            "amount": u.amount.to_string(),
            "release_height": u.release_height,
        })).collect::<Vec<_>>(),
        "height": height,
    })
}

impl NodeContext {
    fn block_by_id(&self, id: &BlockId) -> RpcResult<Block> {
        let stored = match id {
            BlockId::Height(h) => self.blocks.block_at(*h),
            BlockId::Hash(hash) => self.blocks.block_by_hash(hash),
        }
        .map_err(internal)?;
        let found = stored.or_else(|| match id {
            BlockId::Height(h) => self.certified_at(*h),
            BlockId::Hash(hash) => self.certified_by_hash(hash),
        });
        found.ok_or_else(|| match id {
            BlockId::Height(h) => err(
                codes::NOT_FOUND,
                format!("no block at height {h} (latest is {})", self.tip().latest.0),
            ),
            BlockId::Hash(hash) => err(codes::NOT_FOUND, format!("no block with hash {hash}")),
        })
    }

    /// State is served at final heights: a certified block above them may still be replaced.
    fn state_height(&self, requested: Option<u64>) -> RpcResult<u64> {
        let finalized = self.tip().finalized.0;
        match requested {
            None => Ok(finalized),
            Some(h) if h > finalized => Err(err(
                codes::NOT_FOUND,
                format!("height {h} is above the finalized height {finalized}"),
            )),
            Some(h) => Ok(h),
        }
    }
}

fn state_error(height: u64, e: keel_state::Error) -> ErrorObjectOwned {
    match e {
        keel_state::Error::VersionNotFound(_) => err(
            codes::PRUNED,
            format!("state at height {height} is not available (pruned)"),
        ),
        other => internal(other),
    }
}

fn submit_error(e: SubmitError) -> ErrorObjectOwned {
    let code = match &e {
        SubmitError::Malformed(_) => return invalid("tx", e),
        SubmitError::BadSignature => codes::BAD_SIGNATURE,
        SubmitError::Internal(_) => codes::INTERNAL,
        SubmitError::Rejected(r) => match r {
            Rejection::Duplicate => codes::ALREADY_KNOWN,
            Rejection::WrongChain { .. } => codes::WRONG_CHAIN,
            Rejection::FeeTooLow { .. } | Rejection::Underpriced => codes::FEE_TOO_LOW,
            Rejection::NonceTooLow { .. } | Rejection::NonceTooHigh { .. } => codes::BAD_NONCE,
            Rejection::InsufficientFunds { .. } => codes::INSUFFICIENT_FUNDS,
            Rejection::Full => codes::MEMPOOL_FULL,
            Rejection::TooLarge { .. } => codes::TX_TOO_LARGE,
        },
    };
    err(code, e.to_string())
}

/// Builds the RPC module over the shared chain.
pub fn module(chain: Arc<NodeContext>) -> RpcModule<Arc<NodeContext>> {
    let mut m = RpcModule::new(chain);
    // Registration only fails on a duplicate name, which the names below never are.
    let mut reg = |name: &'static str, f: fn(&NodeContext, &Params<'_>) -> RpcResult<Value>| {
        let _ = m.register_method(name, move |params, chain: &Arc<NodeContext>, _| {
            let result = f(chain, &params);
            let code = match &result {
                Ok(_) => 0,
                Err(e) => e.code(),
            };
            chain
                .metrics
                .rpc_requests
                .get_or_create(&crate::metrics::RpcLabels {
                    method: name.to_string(),
                    code: code.to_string(),
                })
                .inc();
            result
        });
    };
    reg("system_health", |c, p| {
        Args::parse(p, &[])?;
        Ok(json!({"peers": c.peers(), "is_syncing": c.syncing()}))
    });
    reg("chain_status", |c, p| {
        Args::parse(p, &[])?;
        let tip = c.tip();
        Ok(json!({
            "chain_id": c.chain_id,
            "node_id": c.node_id,
            "latest_height": tip.latest.0,
            "latest_hash": tip.latest.1,
            "finalized_height": tip.finalized.0,
            "finalized_hash": tip.finalized.1,
            "epoch": c.epoch(),
            "syncing": c.syncing(),
            "peers": c.peers(),
            "mempool_txs": c.mempool().len(),
            "min_fee": c.params.min_fee.to_string(),
        }))
    });
    reg("chain_getHeader", |c, p| {
        let a = Args::parse(p, &["block"])?;
        Ok(header_json(&c.block_by_id(&block_id(&a, 0)?)?.header))
    });
    reg("chain_getBlock", |c, p| {
        let a = Args::parse(p, &["block", "full_txs"])?;
        let block = c.block_by_id(&block_id(&a, 0)?)?;
        let full = a.bool_opt(1)?;
        let mut v = header_json(&block.header);
        if let Value::Object(m) = &mut v {
            if full {
                let txs = block
                    .txs
                    .iter()
                    .map(|b| {
                        Transaction::decode(b)
                            .map(|t| tx_json(&t))
                            .map_err(internal)
                    })
                    .collect::<RpcResult<Vec<_>>>()?;
                m.insert("txs".into(), Value::Array(txs));
            } else {
                m.insert("tx_hashes".into(), json!(block.tx_hashes()));
            }
        }
        Ok(v)
    });
    reg("chain_getTransaction", |c, p| {
        let a = Args::parse(p, &["hash"])?;
        let hash: Hash = a.parsed(0)?;
        if let Some(tx) = c.mempool().get(&hash) {
            let mut v = tx_json(tx);
            if let Value::Object(m) = &mut v {
                m.insert("status".into(), json!("pending"));
                m.insert("receipt".into(), Value::Null);
            }
            return Ok(v);
        }
        let (bytes, receipt) = c
            .blocks
            .transaction(&hash)
            .map_err(internal)?
            .ok_or_else(|| err(codes::NOT_FOUND, format!("transaction {hash} not found")))?;
        let tx = Transaction::decode(&bytes).map_err(internal)?;
        let status = c.tx_status(&hash).map_err(internal)?;
        let mut v = tx_json(&tx);
        if let Value::Object(m) = &mut v {
            m.insert("status".into(), json!(status.as_str()));
            m.insert(
                "receipt".into(),
                json!({
                    "height": receipt.height,
                    "index": receipt.index,
                    "success": receipt.success,
                    "error": receipt.error,
                    "fee": receipt.fee.to_string(),
                }),
            );
        }
        Ok(v)
    });
    reg("state_getAccount", |c, p| {
        let a = Args::parse(p, &["address", "height"])?;
        let address: keel_types::Address = a.parsed(0)?;
        let height = c.state_height(a.u64_opt(1)?)?;
        let account = c
            .state
            .account(&address, height)
            .map_err(|e| state_error(height, e))?
            .unwrap_or_default();
        let mut v = account_json(&address, &account, height);
        if height == c.tip().finalized.0 {
            // The nonce a wallet should use next, counting this sender's pending transactions.
            let next = c
                .mempool()
                .pending_nonce(&address)
                .unwrap_or(account.nonce)
                .max(account.nonce);
            if let Value::Object(m) = &mut v {
                m.insert("next_nonce".into(), json!(next));
            }
        }
        Ok(v)
    });
    reg("state_getProof", |c, p| {
        let a = Args::parse(p, &["address", "height"])?;
        let address: keel_types::Address = a.parsed(0)?;
        let height = c.state_height(a.u64_opt(1)?)?;
        let (account, proof, root) = c
            .state
            .account_with_proof(&address, height)
            .map_err(|e| state_error(height, e))?;
        Ok(json!({
            "state_root": root,
            "height": height,
            "address": address,
            "key": account_key(&address),
            "value": account.as_ref().map(|acc| format!("0x{}", hex::encode(acc.encode()))),
            "account": account.as_ref().map(|acc| account_json(&address, acc, height)),
            "proof": proof,
        }))
    });
    reg("state_getValidators", |c, p| {
        let a = Args::parse(p, &["height"])?;
        // The set that signs the block at `height`; without a height, the current epoch's.
        let epoch = match a.u64_opt(0)? {
            Some(h) => c.epoch_of_height(c.state_height(Some(h))?),
            None => c.epoch(),
        };
        let set = c.validator_set(epoch).map_err(|e| {
            err(
                codes::INTERNAL,
                format!("validator set of epoch {epoch}: {e}"),
            )
        })?;
        let total = set.total_stake().max(1);
        Ok(Value::Array(
            set.validators()
                .iter()
                .map(|v| {
                    json!({
                        "address": v.address,
                        "public_key": v.public_key.to_string(),
                        "stake": v.stake.to_string(),
                        "voting_power": v.stake.to_string(),
                        "voting_power_share": v.stake as f64 / total as f64,
                    })
                })
                .collect(),
        ))
    });
    reg("tx_submit", |c, p| {
        let a = Args::parse(p, &["tx"])?;
        let text = a
            .required(0)?
            .as_str()
            .ok_or_else(|| invalid("tx", "expected a hex string"))?;
        let digits = text.strip_prefix("0x").unwrap_or(text);
        if digits.len() > 2 * crate::mempool::MAX_TX_BYTES {
            return Err(err(
                codes::TX_TOO_LARGE,
                format!("transaction exceeds {} bytes", crate::mempool::MAX_TX_BYTES),
            ));
        }
        let bytes = hex::decode(digits).map_err(|e| invalid("tx", format!("invalid hex: {e}")))?;
        let hash = c.submit(&bytes).map_err(submit_error)?;
        Ok(json!(hash))
    });
    reg("tx_status", |c, p| {
        let a = Args::parse(p, &["hash"])?;
        let hash: Hash = a.parsed(0)?;
        Ok(json!(c.tx_status(&hash).map_err(internal)?.as_str()))
    });
    register_head_subscription(
        &mut m,
        "chain_subscribeNewHeads",
        "chain_newHead",
        "chain_unsubscribeNewHeads",
        NodeContext::subscribe_new_heads,
    );
    register_head_subscription(
        &mut m,
        "chain_subscribeFinalizedHeads",
        "chain_finalizedHead",
        "chain_unsubscribeFinalizedHeads",
        NodeContext::subscribe_finalized_heads,
    );
    m
}

fn register_head_subscription(
    m: &mut RpcModule<Arc<NodeContext>>,
    subscribe: &'static str,
    notification: &'static str,
    unsubscribe: &'static str,
    source: fn(&NodeContext) -> broadcast::Receiver<Header>,
) {
    let _ = m.register_subscription(
        subscribe,
        notification,
        unsubscribe,
        move |_params, pending: PendingSubscriptionSink, chain: Arc<Arc<NodeContext>>, _| async move {
            let mut heads = source(&chain);
            let result: SubscriptionResult = async {
                let sink = pending.accept().await?;
                loop {
                    tokio::select! {
                        _ = sink.closed() => return Ok(()),
                        head = heads.recv() => match head {
                            Ok(header) => {
                                let msg = serde_json::value::to_raw_value(&header_json(&header))?;
                                if sink.send(SubscriptionMessage::from(msg)).await.is_err() {
                                    return Ok(());
                                }
                            }
                            // A slow subscriber skips ahead rather than buffering without bound.
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return Ok(()),
                        },
                    }
                }
            }
            .await;
            result
        },
    );
}

/// Starts the server; returns its handle and bound address.
pub async fn start(
    chain: Arc<NodeContext>,
    config: &RpcConfig,
) -> Result<(ServerHandle, SocketAddr)> {
    let addr = config.listen_addr;
    let rpc_err = |reason: String| Error::Rpc { addr, reason };
    let health = ProxyGetRequestLayer::new([("/health", "system_health")])
        .map_err(|e| rpc_err(e.to_string()))?;
    let server = Server::builder()
        .set_config(
            ServerConfig::builder()
                .max_connections(config.max_connections)
                .max_request_body_size(config.max_request_bytes)
                .max_response_body_size(16 * 1024 * 1024)
                .build(),
        )
        .set_http_middleware(tower::ServiceBuilder::new().layer(health))
        .build(addr)
        .await
        .map_err(|e| rpc_err(e.to_string()))?;
    let bound = server.local_addr().map_err(|e| rpc_err(e.to_string()))?;
    Ok((server.start(module(chain)), bound))
}
