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
//!
//! Nothing a client sends may crash the node or grow its memory without bound: [`listener`]
//! accepts connections and bounds what each may hold (`rpc.max_connections`, request size
//! and time, CORS), [`conn`] bounds its socket (stalled writes, WebSocket backpressure and
//! message size), [`checks`] bounds its calls (`rpc.requests_per_sec_per_ip` through
//! [`limits`], `rpc.max_batch_size`) and [`codes`] gives every refusal a code of its own.
//! [`conn::RpcBuffers`] bounds the bytes all connections hold together (the memory budget's
//! `rpc` share), and [`submit`] admits the `tx_submit` calls that arrive together as one
//! batch.

pub mod api;
pub mod checks;
pub mod conn;
pub mod cors;
pub mod health;
pub mod limits;
pub mod listener;
pub mod server;
pub mod submit;
pub mod types;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::server::middleware::rpc::RpcServiceBuilder;
use jsonrpsee::server::{
    stop_channel, BatchRequestConfig, Methods, PingConfig, RpcModule, Server, ServerConfig,
    ServerHandle,
};
use jsonrpsee::types::ErrorObjectOwned;
use tokio::net::TcpListener;

pub use api::{KeelApiClient, KeelApiServer};
pub use checks::RpcMetrics;
use checks::{CallChecksLayer, CallLimits};
use cors::Cors;
use limits::RateLimiter;
pub use server::RpcApi;

use crate::config::RpcConfig;
use crate::context::NodeContext;
use crate::{Error, Result};

/// Error codes, stable for clients: JSON-RPC's own, then keel's application codes
/// (-32000..-32099), each meaning exactly one thing (docs/rpc.md lists them). jsonrpsee's
/// own limit errors, whose codes keel's table gives other meanings, are answered with the
/// codes from -32020 on instead.
pub mod codes {
    /// The request is not JSON (JSON-RPC standard).
    pub const PARSE_ERROR: i32 = -32700;
    /// Not a valid request object (JSON-RPC standard).
    pub const INVALID_REQUEST: i32 = -32600;
    /// No such method, or a subscription called over HTTP (JSON-RPC standard).
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// Invalid parameters (JSON-RPC standard).
    pub const INVALID_PARAMS: i32 = -32602;
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
    /// The client's address sent more than `rpc.requests_per_sec_per_ip` this second.
    pub const RATE_LIMITED: i32 = -32020;
    /// A batch holds more than `rpc.max_batch_size` calls.
    pub const BATCH_TOO_LARGE: i32 = -32021;
    /// A request body or WebSocket message exceeds `rpc.max_request_bytes` (jsonrpsee's
    /// -32007).
    pub const REQUEST_TOO_LARGE: i32 = -32022;
    /// An answer (a batch's answers together) exceeds the server's response limit
    /// (jsonrpsee's -32008 and -32011).
    pub const RESPONSE_TOO_LARGE: i32 = -32023;
    /// A WebSocket connection has `rpc.max_subscriptions_per_connection` subscriptions
    /// already (jsonrpsee's -32006).
    pub const TOO_MANY_SUBSCRIPTIONS: i32 = -32024;
    /// The server has `rpc.max_connections` connections already (HTTP 503).
    pub const TOO_MANY_CONNECTIONS: i32 = -32025;
    /// A request body did not arrive within `rpc.request_timeout_ms` (HTTP 408).
    pub const REQUEST_TIMEOUT: i32 = -32026;
    /// The node is under hard memory pressure (`memory.limit`): no new transactions.
    pub const MEMORY_PRESSURE: i32 = -32027;
    /// The server's buffers (requests read and answers not yet written, over every
    /// connection) are over the memory budget's `rpc` share: a new HTTP request is refused
    /// unread (HTTP 503).
    pub const RPC_BUSY: i32 = -32028;
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

/// jsonrpsee's own request limit is set this far above `rpc.max_request_bytes`, so that
/// keel's checks, which come first, are the ones that answer.
const LIBRARY_REQUEST_SLACK: u32 = 64 * 1024;

/// Answers (and subscription notifications) one WebSocket connection may have queued in
/// jsonrpsee before its calls wait; bytes are bounded by [`conn::UNSENT_BUDGET`].
const WS_MESSAGE_BUFFER: u32 = 256;

/// WebSocket pings: every 30 s; a connection that answered none for 60 s is closed.
fn ws_ping() -> PingConfig {
    PingConfig::new()
        .ping_interval(Duration::from_secs(30))
        .inactive_limit(Duration::from_secs(60))
}

/// The RPC module over the shared chain: every method and subscription of [`api::KeelApi`].
/// Calls on it directly skip the [`checks`] middleware that [`start`] puts in front.
pub fn module(chain: Arc<NodeContext>) -> RpcModule<RpcApi> {
    RpcApi::new(chain).into_rpc()
}

/// Starts the server with the limits of `config`, counting calls into `metrics`; returns
/// its handle and bound address. See [`listener`] and [`checks`] for what each limit does.
///
/// `GET /health` answers from [`health`] (`block_time_ms` sets when a chain counts as stalled).
pub async fn start(
    chain: Arc<NodeContext>,
    config: &RpcConfig,
    metrics: RpcMetrics,
    block_time_ms: u64,
    buffers: Arc<conn::RpcBuffers>,
) -> Result<(ServerHandle, SocketAddr)> {
    let addr = config.listen_addr;
    let rpc_err = |reason: String| Error::Rpc { addr, reason };
    let health = health::HealthLayer::new(chain.clone(), block_time_ms);
    let limits = CallLimits {
        max_response_bytes: MAX_RESPONSE_BYTES as usize,
        max_batch_size: config.max_batch_size as usize,
        max_subscriptions: config.max_subscriptions_per_connection,
        rate: RateLimiter::new(config.requests_per_sec_per_ip).map(Arc::new),
    };
    let services = Server::builder()
        .set_config(
            ServerConfig::builder()
                .max_connections(config.max_connections)
                .max_request_body_size(
                    config
                        .max_request_bytes
                        .saturating_add(LIBRARY_REQUEST_SLACK),
                )
                .max_response_body_size(MAX_RESPONSE_BYTES)
                .max_subscriptions_per_connection(config.max_subscriptions_per_connection)
                // CallChecks enforces max_batch_size, answering with keel's code.
                .set_batch_request_config(BatchRequestConfig::Unlimited)
                .set_message_buffer_capacity(WS_MESSAGE_BUFFER)
                .enable_ws_ping(ws_ping())
                .build(),
        )
        .set_http_middleware(tower::ServiceBuilder::new().layer(health))
        .set_rpc_middleware(RpcServiceBuilder::new().layer(CallChecksLayer::new(metrics, limits)))
        .to_service_builder();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| rpc_err(e.to_string()))?;
    let bound = listener.local_addr().map_err(|e| rpc_err(e.to_string()))?;
    let methods: Methods = module(chain).into();
    let (stop, handle) = stop_channel();
    let settings = listener::Settings {
        max_connections: config.max_connections as usize,
        max_request_bytes: config.max_request_bytes as usize,
        request_timeout: Duration::from_millis(config.request_timeout_ms),
        cors: Cors::new(&config.cors_allowed_origins),
        buffers,
    };
    let make_service = {
        let stop = stop.clone();
        move || services.clone().build(methods.clone(), stop.clone())
    };
    listener::spawn(listener, make_service, settings, stop);
    Ok((handle, bound))
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
        serve_with(|_| {}).await
    }

    /// [`serve`] with `[rpc]` changed by `tune`.
    async fn serve_with(
        tune: impl FnOnce(&mut RpcConfig),
    ) -> (
        Arc<NodeContext>,
        ServerHandle,
        SocketAddr,
        HttpClient,
        Registry,
    ) {
        let chain = Arc::new(chain().0);
        let mut config = RpcConfig {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..RpcConfig::default()
        };
        tune(&mut config);
        let metrics = RpcMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let buffers = conn::RpcBuffers::new(crate::memory::DEFAULT_RPC_BUFFER_BYTES);
        buffers.register(&mut registry);
        let (handle, addr) = start(chain.clone(), &config, metrics, 1_000, buffers)
            .await
            .unwrap();
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
                "# HELP keel_rpc_requests_total JSON-RPC calls by method and result code \
                 (0 = success).\n# TYPE keel_rpc_requests_total counter\n"
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

    const SUBSCRIPTIONS: [&str; 4] = api::SUBSCRIPTION_METHODS;

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

    // ----- limits -----------------------------------------------------------------------

    /// An HTTP answer read off the wire: status, headers (lower-case names), body.
    #[derive(Debug)]
    struct RawAnswer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl RawAnswer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
        }
    }

    fn parse_answer(raw: &[u8]) -> RawAnswer {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        RawAnswer {
            status,
            headers,
            body: body.to_string(),
        }
    }

    /// Sends `request` as is on a new connection and reads until the server closes it.
    async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawAnswer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before taking a whole oversized body.
        let _ = stream.write_all(request).await;
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw));
        let _ = read.await.expect("an answer within 10 s");
        parse_answer(&raw)
    }

    fn post(addr: SocketAddr, body: &str, extra_headers: &str) -> Vec<u8> {
        format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn error_code(v: &Value) -> i64 {
        v["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("no error in {v}"))
    }

    fn batch_of(n: usize, method: &str) -> String {
        let calls: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"{method}"}}"#))
            .collect();
        format!("[{}]", calls.join(","))
    }

    #[tokio::test]
    async fn new_requests_are_refused_unread_while_the_buffers_are_over_budget() {
        let chain = Arc::new(chain().0);
        let config = RpcConfig {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..RpcConfig::default()
        };
        let buffers = conn::RpcBuffers::new(4_096);
        let mut registry = Registry::default();
        buffers.register(&mut registry);
        let (handle, addr) = start(
            chain,
            &config,
            RpcMetrics::default(),
            1_000,
            buffers.clone(),
        )
        .await
        .unwrap();
        let status = r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;
        let answered = raw_http(addr, &post(addr, status, "")).await;
        assert_eq!(answered.status, 200, "{}", answered.body);
        // The answer was written: nothing is held once the connection is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while buffers.used() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(buffers.used(), 0);
        assert_eq!(buffers.buffered(), 0);

        // Other connections' answers hold more than the budget.
        let held = buffers.hold(5_000);
        let refused = raw_http(addr, &post(addr, status, "")).await;
        assert_eq!(refused.status, 503, "{}", refused.body);
        assert_eq!(refused.header("retry-after"), Some("1"));
        let body: Value = serde_json::from_str(&refused.body).unwrap();
        assert_eq!(error_code(&body), i64::from(codes::RPC_BUSY), "{body}");
        let text = crate::metrics::render(&registry);
        assert!(text.contains("keel_rpc_busy_refusals_total 1\n"), "{text}");

        drop(held);
        let again = raw_http(addr, &post(addr, status, "")).await;
        assert_eq!(again.status, 200, "{}", again.body);
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn batches_are_served_over_http_and_websocket_up_to_max_batch_size() {
        let (_, handle, addr, client, _) = serve_with(|c| c.max_batch_size = 3).await;
        let mut batch = BatchRequestBuilder::new();
        for _ in 0..3 {
            batch.insert("chain_status", rpc_params![]).unwrap();
        }
        let answers = client.batch_request::<Value>(batch.clone()).await.unwrap();
        assert_eq!(answers.num_successful_calls(), 3);
        let ws = WsClientBuilder::default()
            .build(format!("ws://{addr}"))
            .await
            .unwrap();
        let answers = ws.batch_request::<Value>(batch).await.unwrap();
        assert_eq!(answers.num_successful_calls(), 3);

        let over = raw_http(addr, &post(addr, &batch_of(4, "chain_status"), "")).await;
        assert_eq!(over.status, 200);
        let v = over.json();
        assert_eq!(error_code(&v), i64::from(codes::BATCH_TOO_LARGE), "{v}");
        assert_eq!(
            v["error"]["message"],
            "batch too large: 4 requests, rpc.max_batch_size is 3"
        );
        let empty = raw_http(addr, &post(addr, "[]", "")).await.json();
        assert_eq!(
            error_code(&empty),
            i64::from(codes::INVALID_REQUEST),
            "{empty}"
        );
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn calls_over_the_rate_get_rate_limited_over_http_and_websocket() {
        let (_, handle, addr, client, registry) =
            serve_with(|c| c.requests_per_sec_per_ip = 3).await;
        // Three at once are served (a second's worth); calls soon after are refused.
        let mut served = 0;
        let refusal = loop {
            match client.chain_status().await {
                Ok(_) => served += 1,
                Err(e) => break call_error::<()>(Err(e)),
            }
            assert!(served < 20, "never rate limited");
        };
        assert!(served >= 3, "only {served} served");
        let (code, message) = refusal;
        assert_eq!(code, codes::RATE_LIMITED);
        assert!(
            message.starts_with(
                "rate limited: more than 3 requests per second from 127.0.0.1 \
                 (rpc.requests_per_sec_per_ip); retry in "
            ),
            "{message}"
        );
        assert_eq!(counted(&registry, "chain_status", codes::RATE_LIMITED), 1);
        // WebSocket calls are limited the same way.
        let ws = WsClientBuilder::default()
            .build(format!("ws://{addr}"))
            .await
            .unwrap();
        let mut served = 0;
        let (code, _) = loop {
            match ws.chain_status().await {
                Ok(_) => served += 1,
                Err(e) => break call_error::<()>(Err(e)),
            }
            assert!(served < 20, "never rate limited");
        };
        assert_eq!(code, codes::RATE_LIMITED);
        // Each call of a batch takes its own token: of five, three are served.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut batch = BatchRequestBuilder::new();
        for _ in 0..5 {
            batch.insert("chain_status", rpc_params![]).unwrap();
        }
        let answers = client.batch_request::<Value>(batch).await.unwrap();
        assert!(
            (3..=4).contains(&answers.num_successful_calls()),
            "{answers:?}"
        );
        for e in answers.into_iter().filter_map(|a| a.err()) {
            assert_eq!(e.code(), codes::RATE_LIMITED);
        }
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn a_websocket_connection_holds_at_most_max_subscriptions() {
        let (_, handle, addr, client, _) =
            serve_with(|c| c.max_subscriptions_per_connection = 2).await;
        let connect = || WsClientBuilder::default().build(format!("ws://{addr}"));
        let ws = connect().await.unwrap();
        let first = ws.chain_subscribe_new_heads().await.unwrap();
        let _second = ws.chain_subscribe_finalized_heads().await.unwrap();
        let (code, message) = call_error(ws.chain_subscribe_new_heads().await);
        assert_eq!(
            (code, message.as_str()),
            (
                codes::TOO_MANY_SUBSCRIPTIONS,
                "too many subscriptions on this connection: at most 2 \
                 (rpc.max_subscriptions_per_connection)"
            )
        );
        // Another connection has its own; an unsubscription makes room.
        let other = connect().await.unwrap();
        other.chain_subscribe_new_heads().await.unwrap();
        first.unsubscribe().await.unwrap();
        ws.chain_subscribe_new_heads().await.unwrap();
        // Over HTTP a subscription is an unknown method, said so.
        let (code, message) = call_error(
            client
                .request::<Value, _>("chain_subscribeNewHeads", rpc_params![])
                .await,
        );
        assert_eq!(code, codes::METHOD_NOT_FOUND);
        assert!(message.contains("WebSocket"), "{message}");
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn oversized_bodies_and_invalid_ids_get_codes_of_their_own() {
        let (_, handle, addr, _, _) = serve_with(|c| c.max_request_bytes = 4096).await;
        let huge = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tx_submit","params":["{}"]}}"#,
            "ab".repeat(4096)
        );
        let answer = raw_http(addr, &post(addr, &huge, "")).await;
        assert_eq!(answer.status, 413);
        assert_eq!(
            error_code(&answer.json()),
            i64::from(codes::REQUEST_TOO_LARGE)
        );
        // Without a Content-Length (chunked), the limit holds as the body comes.
        let chunked = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{huge}\r\n0\r\n\r\n",
            huge.len()
        );
        let answer = raw_http(addr, chunked.as_bytes()).await;
        assert_eq!(answer.status, 413);
        assert_eq!(
            error_code(&answer.json()),
            i64::from(codes::REQUEST_TOO_LARGE)
        );

        let object_id = r#"{"jsonrpc":"2.0","id":{"a":1},"method":"chain_status"}"#;
        let v = raw_http(addr, &post(addr, object_id, "")).await.json();
        assert_eq!(error_code(&v), i64::from(codes::INVALID_REQUEST), "{v}");
        assert_eq!(v["id"], Value::Null);
        let mixed = r#"[{"jsonrpc":"2.0","id":7,"method":"chain_status"},
                        {"jsonrpc":"2.0","id":[1],"method":"chain_status"}]"#;
        let v = raw_http(addr, &post(addr, mixed, "")).await.json();
        assert_eq!(v[0]["id"], 7, "{v}");
        assert!(v[0]["result"].is_object(), "{v}");
        assert_eq!(error_code(&v[1]), i64::from(codes::INVALID_REQUEST), "{v}");
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_503_and_slots_come_back() {
        let (_, handle, addr, _, _) = serve_with(|c| c.max_connections = 2).await;
        let status = r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;
        let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let ws = WsClientBuilder::default()
            .build(format!("ws://{addr}"))
            .await
            .unwrap();
        let refused = raw_http(addr, &post(addr, status, "")).await;
        assert_eq!(refused.status, 503, "{refused:?}");
        assert_eq!(
            error_code(&refused.json()),
            i64::from(codes::TOO_MANY_CONNECTIONS)
        );
        // The WebSocket connection holds its slot until it closes.
        ws.chain_status().await.unwrap();
        drop(ws);
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answer = raw_http(addr, &post(addr, status, "")).await;
            if answer.status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slots not given back: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn half_sent_requests_and_idle_connections_time_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_, handle, addr, client, _) = serve_with(|c| {
            c.max_connections = 1;
            c.request_timeout_ms = 300;
        })
        .await;
        // A body that never comes whole: 408, and the connection closes.
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{{\"jsonrpc\""
        );
        half.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut raw))
            .await
            .expect("closed within 5 s")
            .unwrap();
        let answer = parse_answer(&raw);
        assert_eq!(answer.status, 408);
        assert_eq!(
            error_code(&answer.json()),
            i64::from(codes::REQUEST_TIMEOUT)
        );
        // A head that never ends, and a connection that sends nothing: closed.
        let mut slow_head = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow_head
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow_head.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .ok();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s")
            .ok();
        // With every slot given back, the one connection allowed serves again.
        client.chain_status().await.unwrap();
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn cors_answers_preflights_and_marks_allowed_origins_only() {
        let preflight = |addr: SocketAddr, origin: &str| {
            format!(
                "OPTIONS / HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
            )
            .into_bytes()
        };
        let status = r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;
        let (_, handle, addr, _, _) = serve_with(|c| {
            c.cors_allowed_origins = vec!["https://wallet.example".to_string()];
        })
        .await;
        let answer = raw_http(addr, &preflight(addr, "https://wallet.example")).await;
        assert_eq!(answer.status, 204, "{answer:?}");
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some("https://wallet.example")
        );
        assert!(answer
            .header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST")));
        assert_eq!(
            answer.header("access-control-allow-headers"),
            Some("content-type")
        );
        let refused = raw_http(addr, &preflight(addr, "https://evil.example")).await;
        assert_eq!(refused.status, 403);
        assert_eq!(refused.header("access-control-allow-origin"), None);
        let allowed = raw_http(
            addr,
            &post(addr, status, "Origin: https://wallet.example\r\n"),
        )
        .await;
        assert_eq!(allowed.status, 200);
        assert_eq!(
            allowed.header("access-control-allow-origin"),
            Some("https://wallet.example")
        );
        let other = raw_http(
            addr,
            &post(addr, status, "Origin: https://evil.example\r\n"),
        )
        .await;
        assert_eq!(
            other.status, 200,
            "served: the browser, not the server, keeps it"
        );
        assert_eq!(other.header("access-control-allow-origin"), None);
        handle.stop().unwrap();

        // By default: no CORS headers at all, and no preflight answered.
        let (_, handle, addr, _, _) = serve().await;
        let answer = raw_http(
            addr,
            &post(addr, status, "Origin: https://wallet.example\r\n"),
        )
        .await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("access-control-allow-origin"), None);
        let answer = raw_http(addr, &preflight(addr, "https://wallet.example")).await;
        assert_ne!(answer.status, 204);
        assert_eq!(answer.header("access-control-allow-origin"), None);
        handle.stop().unwrap();

        let (_, handle, addr, _, _) =
            serve_with(|c| c.cors_allowed_origins = vec!["*".to_string()]).await;
        let answer = raw_http(addr, &post(addr, status, "Origin: https://any.example\r\n")).await;
        assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
        handle.stop().unwrap();
    }

    /// A bare WebSocket client: frames by hand, so a test can misbehave.
    struct RawWs {
        stream: tokio::net::TcpStream,
    }

    impl RawWs {
        async fn connect(addr: SocketAddr) -> RawWs {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let handshake = format!(
                "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            );
            stream.write_all(handshake.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            assert!(
                head.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&head)
            );
            RawWs { stream }
        }

        /// A masked text frame (zero mask key) holding `text`.
        fn frame(text: &[u8]) -> Vec<u8> {
            let mut f = vec![0x81];
            match text.len() {
                n if n < 126 => f.push(0x80 | n as u8),
                n if n <= 0xffff => {
                    f.push(0x80 | 126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(0x80 | 127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            f.extend_from_slice(&[0, 0, 0, 0]);
            f.extend_from_slice(text);
            f
        }

        /// The next frame from the server, pings and pongs skipped (the server pings on its
        /// own schedule, the first time right after the upgrade): opcode and payload.
        async fn recv(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
            use tokio::io::AsyncReadExt;
            loop {
                let mut head = [0u8; 2];
                self.stream.read_exact(&mut head).await?;
                let len = match head[1] & 0x7f {
                    126 => u64::from(self.stream.read_u16().await?),
                    127 => self.stream.read_u64().await?,
                    n => u64::from(n),
                };
                let mut payload = vec![0; len as usize];
                self.stream.read_exact(&mut payload).await?;
                let opcode = head[0] & 0x0f;
                if opcode != 9 && opcode != 10 {
                    return Ok((opcode, payload));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_websocket_message_over_max_request_bytes_closes_with_1009() {
        use tokio::io::AsyncWriteExt;
        let (_, handle, addr, client, _) = serve_with(|c| c.max_request_bytes = 4096).await;
        let mut ws = RawWs::connect(addr).await;
        let call = br#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;
        ws.stream.write_all(&RawWs::frame(call)).await.unwrap();
        let (opcode, answer) = ws.recv().await.unwrap();
        assert_eq!(opcode, 1);
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert!(answer["result"].is_object(), "{answer}");

        let huge = format!(
            r#"{{"jsonrpc":"2.0","id":2,"method":"tx_submit","params":["{}"]}}"#,
            "ab".repeat(4096)
        );
        ws.stream
            .write_all(&RawWs::frame(huge.as_bytes()))
            .await
            .unwrap();
        let (opcode, reason) = tokio::time::timeout(Duration::from_secs(5), ws.recv())
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert_eq!(opcode, 8, "a close frame");
        assert_eq!(u16::from_be_bytes([reason[0], reason[1]]), 1009);
        // The node is fine.
        client.chain_status().await.unwrap();
        handle.stop().unwrap();
    }

    /// Sends `message` on `ws` again and again, reading nothing, until a write makes no
    /// progress for a second or fails; how many went out, and whether one failed.
    async fn send_without_reading(ws: &mut RawWs, message: &[u8], cap: usize) -> (usize, bool) {
        use tokio::io::AsyncWriteExt;
        for sent in 0..cap {
            let write = ws.stream.write_all(message);
            match tokio::time::timeout(Duration::from_secs(1), write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return (sent, true),
                Err(_) => return (sent, false),
            }
        }
        (cap, false)
    }

    #[tokio::test]
    async fn the_server_stops_reading_a_websocket_client_that_does_not_read() {
        let (_, handle, addr, client, _) = serve_with(|c| c.request_timeout_ms = 60_000).await;
        let mut ws = RawWs::connect(addr).await;
        // Batches of 100 status calls: about 80 KB of answers for 6 KB sent. Kernel buffers
        // hold some 10 MB each way; without backpressure the server would read all 10,000
        // (60 MB) and queue 800 MB of answers.
        let message = RawWs::frame(batch_of(100, "chain_status").as_bytes());
        let (sent, failed) = send_without_reading(&mut ws, &message, 10_000).await;
        assert!(
            sent < 10_000 && !failed,
            "the server read {sent} messages whose answers nobody read (failed: {failed})"
        );
        // Other clients are served meanwhile.
        client.chain_status().await.unwrap();
        handle.stop().unwrap();
    }

    #[tokio::test]
    async fn a_websocket_client_that_does_not_read_is_dropped_after_the_timeout() {
        use tokio::io::AsyncReadExt;
        let (_, handle, addr, client, _) = serve_with(|c| c.request_timeout_ms = 500).await;
        let mut ws = RawWs::connect(addr).await;
        let message = RawWs::frame(batch_of(100, "chain_status").as_bytes());
        let (sent, _) = send_without_reading(&mut ws, &message, 10_000).await;
        assert!(sent < 10_000, "the server read everything");
        // The server's writes made no progress for longer than request_timeout_ms: it
        // dropped the connection (reading now ends, after what was buffered).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut sink = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match ws.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection is still open");
        client.chain_status().await.unwrap();
        handle.stop().unwrap();
    }
}
