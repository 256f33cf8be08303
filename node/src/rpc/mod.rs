//! The JSON-RPC 2.0 server (HTTP POST and WebSocket on one port) and its error codes.
//!
//! The API is one typed trait, [`api::KeelApi`], with the request and response types of
//! [`types`]. From it jsonrpsee's `#[rpc]` macro makes the server trait, which
//! [`server::RpcApi`] implements over the node's chain, and the client the `keel` CLI calls,
//! so the two cannot disagree. Methods and result shapes follow DESIGN.md section 4 and
//! docs/rpc.md. Amounts (balances, stakes, fees, transfer amounts) are JSON strings because
//! they may exceed 2^53; heights, rounds, nonces and timestamps are numbers. Every call
//! passes through [`checks`], which names the parameter of a bad call and counts calls per
//! method and code.

pub mod api;
pub mod checks;
pub mod server;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;

use jsonrpsee::server::middleware::http::ProxyGetRequestLayer;
use jsonrpsee::server::middleware::rpc::RpcServiceBuilder;
use jsonrpsee::server::{RpcModule, Server, ServerConfig, ServerHandle};
use jsonrpsee::types::ErrorObjectOwned;

pub use api::{KeelApiClient, KeelApiServer};
use checks::CallChecksLayer;
pub use checks::RpcMetrics;
pub use server::RpcApi;

use crate::config::RpcConfig;
use crate::context::NodeContext;
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

fn err(code: i32, msg: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(code, msg.into(), None::<()>)
}

/// -32602 with a message naming the parameter: `invalid params: {field}: {reason}`.
fn invalid(field: &str, reason: impl std::fmt::Display) -> ErrorObjectOwned {
    err(
        codes::INVALID_PARAMS,
        format!("invalid params: {field}: {reason}"),
    )
}

fn internal(e: impl std::fmt::Display) -> ErrorObjectOwned {
    err(codes::INTERNAL, format!("internal error: {e}"))
}

/// Largest response the server sends, a batch's responses together included.
const MAX_RESPONSE_BYTES: u32 = 16 * 1024 * 1024;

/// The RPC module over the shared chain: every method and subscription of [`api::KeelApi`].
/// Calls on it directly skip the [`checks`] middleware that [`start`] puts in front.
pub fn module(chain: Arc<NodeContext>) -> RpcModule<RpcApi> {
    RpcApi::new(chain).into_rpc()
}

/// Starts the server, counting calls into `metrics`; returns its handle and bound address.
pub async fn start(
    chain: Arc<NodeContext>,
    config: &RpcConfig,
    metrics: RpcMetrics,
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
                .max_response_body_size(MAX_RESPONSE_BYTES)
                .build(),
        )
        .set_http_middleware(tower::ServiceBuilder::new().layer(health))
        .set_rpc_middleware(
            RpcServiceBuilder::new()
                .layer(CallChecksLayer::new(metrics, MAX_RESPONSE_BYTES as usize)),
        )
        .build(addr)
        .await
        .map_err(|e| rpc_err(e.to_string()))?;
    let bound = server.local_addr().map_err(|e| rpc_err(e.to_string()))?;
    Ok((server.start(module(chain)), bound))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use jsonrpsee::core::client::{ClientT, Subscription};
    use jsonrpsee::core::params::BatchRequestBuilder;
    use jsonrpsee::core::ClientError;
    use jsonrpsee::http_client::{HttpClient, HttpClientBuilder};
    use jsonrpsee::rpc_params;
    use jsonrpsee::ws_client::WsClientBuilder;
    use keel_state::verify_proof;
    use keel_types::{Hash, Keypair};
    use prometheus_client::registry::Registry;
    use serde_json::Value;

    use super::types::{BlockBody, BlockId, HeaderInfo, Height, SignedTxHex, TxInfo, TxStatus};
    use super::*;
    use crate::context::tests::{chain, transfer, CHAIN, FEE};

    /// A server on a free port over the test chain, an HTTP client of it, and a registry
    /// holding the server's metrics.
    async fn serve() -> (
        Arc<NodeContext>,
        ServerHandle,
        SocketAddr,
        HttpClient,
        Registry,
    ) {
        let chain = Arc::new(chain().0);
        let config = RpcConfig {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..RpcConfig::default()
        };
        let metrics = RpcMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (handle, addr) = start(chain.clone(), &config, metrics).await.unwrap();
        let client = HttpClientBuilder::default()
            .build(format!("http://{addr}"))
            .unwrap();
        (chain, handle, addr, client, registry)
    }

    /// `keel_rpc_requests_total{method,code}` as a scrape reads it (0 if not there).
    fn counted(registry: &Registry, method: &str, code: i32) -> u64 {
        let text = crate::metrics::render(registry);
        assert!(
            text.contains(
                "# HELP keel_rpc_requests JSON-RPC calls by method and result code \
                 (0 = success).\n# TYPE keel_rpc_requests counter\n"
            ),
            "{text}"
        );
        let series = format!("keel_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.parse().unwrap())
    }

    fn call_error<T: std::fmt::Debug>(
        result: std::result::Result<T, ClientError>,
    ) -> (i32, String) {
        match result {
            Err(ClientError::Call(e)) => (e.code(), e.message().to_string()),
            other => panic!("expected a JSON-RPC error, got {other:?}"),
        }
    }

    const SUBSCRIPTIONS: [&str; 4] = [
        "chain_subscribeNewHeads",
        "chain_unsubscribeNewHeads",
        "chain_subscribeFinalizedHeads",
        "chain_unsubscribeFinalizedHeads",
    ];

    #[test]
    fn the_params_table_lists_exactly_the_methods_of_the_module() {
        let module = module(Arc::new(chain().0));
        let mut methods: Vec<&str> = module
            .method_names()
            .filter(|m| !SUBSCRIPTIONS.contains(m))
            .collect();
        methods.sort_unstable();
        let mut listed: Vec<&str> = api::PARAMS.iter().map(|(name, _)| *name).collect();
        listed.sort_unstable();
        assert_eq!(methods, listed);
        for name in SUBSCRIPTIONS {
            assert!(module.method(name).is_some(), "{name} missing");
        }
    }

    #[tokio::test]
    async fn the_typed_client_reads_what_the_server_serves() {
        let (_, handle, _, client, registry) = serve().await;
        let status = client.chain_status().await.unwrap();
        assert_eq!(status.chain_id, CHAIN);
        assert_eq!(status.min_fee, FEE);
        assert_eq!((status.finalized_height, status.mempool_txs), (0, 0));
        let health = client.system_health().await.unwrap();
        assert_eq!((health.peers, health.is_syncing), (0, false));

        let tx = transfer(1, 0);
        let hash = client
            .tx_submit(SignedTxHex::from_bytes(&tx.bytes))
            .await
            .unwrap();
        assert_eq!(hash, tx.hash);
        assert_eq!(client.tx_status(hash).await.unwrap(), TxStatus::Pending);
        let pending = client.chain_get_transaction(hash).await.unwrap();
        assert_eq!(pending.tx, TxInfo::from(&tx));
        assert_eq!((pending.status, pending.receipt), (TxStatus::Pending, None));

        let sender = Keypair::from_seed(1).address();
        let account = client.state_get_account(sender, None).await.unwrap();
        assert_eq!(
            (account.balance, account.nonce, account.height),
            (1_000_000, 0, 0)
        );
        assert_eq!(account.next_nonce, Some(1), "counts the pending transfer");
        let at_zero = client
            .state_get_account(sender, Some(Height(0)))
            .await
            .unwrap();
        assert_eq!(at_zero.next_nonce, Some(1));

        let proof = client
            .state_get_proof(sender, Some(Height(0)))
            .await
            .unwrap();
        let header = client.chain_get_header(BlockId::Height(0)).await.unwrap();
        assert_eq!(proof.state_root, header.state_root);
        assert_eq!(proof.account.as_ref().map(|a| a.balance), Some(1_000_000));
        verify_proof(
            &header.state_root,
            &proof.key,
            proof.value.as_ref().map(|v| v.0.as_slice()),
            &proof.proof,
        )
        .unwrap();
        let block = client
            .chain_get_block(BlockId::Hash(header.hash), Some(true))
            .await
            .unwrap();
        assert_eq!(block.header, header);
        assert_eq!(block.body, BlockBody::Full { txs: Vec::new() });
        let block = client
            .chain_get_block(BlockId::Height(0), None)
            .await
            .unwrap();
        assert_eq!(
            block.body,
            BlockBody::Hashes {
                tx_hashes: Vec::new()
            }
        );

        let validators = client.state_get_validators(None).await.unwrap();
        assert_eq!(validators.len(), 1);
        assert_eq!(validators[0].voting_power, 1);
        assert!((validators[0].voting_power_share - 1.0).abs() < f64::EPSILON);
        assert_eq!(
            client.state_get_validators(Some(Height(0))).await.unwrap(),
            validators
        );

        assert_eq!(counted(&registry, "chain_status", 0), 1);
        assert_eq!(counted(&registry, "state_getAccount", 0), 2);
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn bad_calls_get_their_codes_and_every_call_is_counted() {
        let (_, handle, _, client, registry) = serve().await;
        let somebody = Keypair::from_seed(1).address();

        let (code, message) = call_error(
            client
                .request::<Value, _>("state_getAccount", rpc_params!["0x12"])
                .await,
        );
        assert_eq!(code, codes::INVALID_PARAMS);
        assert!(
            message.starts_with("invalid params: address: "),
            "{message}"
        );
        let (code, message) = call_error(
            client
                .request::<Value, _>("chain_status", rpc_params![1])
                .await,
        );
        assert_eq!(
            (code, message.as_str()),
            (
                codes::INVALID_PARAMS,
                "invalid params: params: expected at most 0 parameters"
            )
        );
        let (code, message) = call_error(client.chain_get_block(BlockId::Height(99), None).await);
        assert_eq!(
            (code, message.as_str()),
            (codes::NOT_FOUND, "no block at height 99 (latest is 0)")
        );
        let (code, message) = call_error(client.state_get_account(somebody, Some(Height(5))).await);
        assert_eq!(
            (code, message.as_str()),
            (codes::NOT_FOUND, "height 5 is above the finalized height 0")
        );
        let (code, _) = call_error(client.chain_get_transaction(Hash([9; 32])).await);
        assert_eq!(code, codes::NOT_FOUND);
        let huge = SignedTxHex("ab".repeat(crate::mempool::MAX_TX_BYTES + 1));
        let (code, _) = call_error(client.tx_submit(huge).await);
        assert_eq!(code, codes::TX_TOO_LARGE);
        let (code, message) = call_error(client.tx_submit(SignedTxHex("0xzz".into())).await);
        assert_eq!(code, codes::INVALID_PARAMS);
        assert!(
            message.starts_with("invalid params: tx: invalid hex"),
            "{message}"
        );
        let (code, _) = call_error(
            client
                .request::<Value, _>("no_such_method", rpc_params![])
                .await,
        );
        assert_eq!(code, -32601);

        // Calls in a batch are checked and counted one by one.
        let mut batch = BatchRequestBuilder::new();
        batch.insert("chain_status", rpc_params![]).unwrap();
        batch.insert("tx_status", rpc_params![5]).unwrap();
        let answers = client.batch_request::<Value>(batch).await.unwrap();
        let answers: Vec<_> = answers.into_iter().collect();
        assert!(answers[0].is_ok(), "{answers:?}");
        let e = answers[1].as_ref().unwrap_err();
        assert_eq!(e.code(), codes::INVALID_PARAMS);
        assert!(e.message().starts_with("invalid params: hash: "), "{e:?}");

        for (method, code, n) in [
            ("state_getAccount", codes::INVALID_PARAMS, 1),
            ("state_getAccount", codes::NOT_FOUND, 1),
            ("chain_status", codes::INVALID_PARAMS, 1),
            ("chain_status", 0, 1),
            ("chain_getBlock", codes::NOT_FOUND, 1),
            ("chain_getTransaction", codes::NOT_FOUND, 1),
            ("tx_submit", codes::TX_TOO_LARGE, 1),
            ("tx_submit", codes::INVALID_PARAMS, 1),
            ("tx_status", codes::INVALID_PARAMS, 1),
            ("no_such_method", -32601, 0),
        ] {
            assert_eq!(counted(&registry, method, code), n, "{method} {code}");
        }
        handle.stop().unwrap();
    }

    async fn next(s: &mut Subscription<HeaderInfo>) -> HeaderInfo {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("a head within 10 s")
            .expect("subscription open")
            .expect("a header")
    }

    #[tokio::test]
    async fn subscribers_get_new_and_final_heads_as_header_fields() {
        let (chain, handle, addr, _, _) = serve().await;
        let ws = WsClientBuilder::default()
            .build(format!("ws://{addr}"))
            .await
            .unwrap();
        let mut heads = ws.chain_subscribe_new_heads().await.unwrap();
        let mut finals = ws.chain_subscribe_finalized_heads().await.unwrap();
        let genesis = chain.blocks.block_at(0).unwrap().unwrap().header;
        let mut next_header = genesis.clone();
        next_header.height = 1;
        next_header.parent_hash = genesis.hash();
        chain.notify_new_head(next_header.clone());
        chain.notify_finalized_head(genesis.clone());
        assert_eq!(next(&mut heads).await, HeaderInfo::from(&next_header));
        assert_eq!(next(&mut finals).await, HeaderInfo::from(&genesis));
        heads.unsubscribe().await.unwrap();
        finals.unsubscribe().await.unwrap();
        handle.stop().unwrap();
    }
}
