//! Prometheus metrics (`GET /metrics` on `metrics.listen_addr`), prefix `keel_`.
//!
//! Counters the driver and RPC update as things happen live here; values other parts keep
//! (tip, mempool size, peers, p2p byte counts, database size, memory, set cache, signature
//! cache) are read at scrape time.
//!
//! The listener ([`serve_metrics`]) is hyper's HTTP/1.1 server with bounds of its own: a
//! fixed number of connections, a deadline for each request head and for each connection,
//! and a cancellation token that stops it within a couple of seconds.

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::view::TipInfo;
use crate::{Error, Result};

/// Labels of `keel_p2p_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `sent` or `received`.
    pub direction: String,
    /// `true` for compressed frames.
    pub compressed: String,
}

/// Labels of `keel_rpc_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method.
    pub method: String,
    /// 0 for success, else the JSON-RPC error code.
    pub code: String,
}

/// The values the metrics read at scrape time from the parts that keep them (the node
/// context implements it), so this module depends on none of them.
pub trait Source {
    /// The chain's tip.
    fn tip(&self) -> TipInfo;
    /// The consensus epoch.
    fn epoch(&self) -> u64;
    /// Transactions in the mempool.
    fn mempool_len(&self) -> usize;
    /// Connected peers.
    fn peers(&self) -> usize;
    /// Bytes the database takes on disk, if it can tell.
    fn db_size_bytes(&self) -> Option<u64>;
    /// Peer-to-peer bytes so far.
    fn p2p_bytes(&self) -> keel_p2p::frame::ByteCounts;
    /// Hits and misses of the validator set cache.
    fn validator_set_cache_stats(&self) -> keel_consensus::CacheStats;
    /// Hits and misses of the signature cache.
    fn sig_cache_stats(&self) -> (u64, u64);
}

/// Every metric of the node.
pub struct Metrics {
    registry: Registry,
    block_height: Gauge,
    finalized_height: Gauge,
    epoch: Gauge,
    /// Transactions in final blocks.
    pub txs_committed: Counter,
    /// Time to build or re-execute a block.
    pub block_execution_seconds: Histogram,
    mempool_txs: Gauge,
    peers: Gauge,
    p2p_bytes: Family<BytesLabels, Counter>,
    /// RPC calls by method and result.
    pub rpc_requests: Family<RpcLabels, Counter>,
    memory_allocated: Gauge,
    memory_limit: Gauge,
    db_size: Gauge,
    pruned_height: Gauge,
    set_cache_hits: Counter,
    set_cache_misses: Counter,
    sig_cache_hits: Counter,
    sig_cache_misses: Counter,
}

impl Metrics {
    /// A registry with every metric, `memory_limit` as configured (0: none).
    pub fn new(memory_limit: u64) -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            block_height: Gauge::default(),
            finalized_height: Gauge::default(),
            epoch: Gauge::default(),
            txs_committed: Counter::default(),
            block_execution_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            mempool_txs: Gauge::default(),
            peers: Gauge::default(),
            p2p_bytes: Family::default(),
            rpc_requests: Family::default(),
            memory_allocated: Gauge::default(),
            memory_limit: Gauge::default(),
            db_size: Gauge::default(),
            pruned_height: Gauge::default(),
            set_cache_hits: Counter::default(),
            set_cache_misses: Counter::default(),
            sig_cache_hits: Counter::default(),
            sig_cache_misses: Counter::default(),
            registry: Registry::default(),
        };
        m.memory_limit.set(memory_limit as i64);
        registry.register(
            "keel_block_height",
            "Height of the latest certified block",
            m.block_height.clone(),
        );
        registry.register(
            "keel_finalized_height",
            "Height of the latest final block",
            m.finalized_height.clone(),
        );
        registry.register("keel_epoch", "Current consensus epoch", m.epoch.clone());
        registry.register(
            "keel_txs_committed",
            "Transactions in final blocks",
            m.txs_committed.clone(),
        );
        registry.register(
            "keel_block_execution_seconds",
            "Time to build or re-execute a block",
            m.block_execution_seconds.clone(),
        );
        registry.register(
            "keel_mempool_txs",
            "Transactions in the mempool",
            m.mempool_txs.clone(),
        );
        registry.register("keel_peers", "Connected peers", m.peers.clone());
        registry.register(
            "keel_p2p_bytes",
            "Peer-to-peer frame bytes by direction and compression",
            m.p2p_bytes.clone(),
        );
        registry.register(
            "keel_rpc_requests",
            "JSON-RPC calls by method and result code (0 = success)",
            m.rpc_requests.clone(),
        );
        registry.register(
            "keel_memory_allocated_bytes",
            "Bytes allocated through jemalloc",
            m.memory_allocated.clone(),
        );
        registry.register(
            "keel_memory_limit_bytes",
            "Configured memory limit (0 = none)",
            m.memory_limit.clone(),
        );
        registry.register(
            "keel_db_size_bytes",
            "Database size on disk",
            m.db_size.clone(),
        );
        registry.register(
            "keel_pruned_height",
            "Blocks at or below this height are pruned",
            m.pruned_height.clone(),
        );
        registry.register(
            "keel_validator_set_cache_hits",
            "Validator set lookups served by the per-epoch cache",
            m.set_cache_hits.clone(),
        );
        registry.register(
            "keel_validator_set_cache_misses",
            "Validator set lookups that computed the set",
            m.set_cache_misses.clone(),
        );
        registry.register(
            "keel_sig_cache_hits",
            "Signature cache lookups that found the transaction already verified (admission, block execution)",
            m.sig_cache_hits.clone(),
        );
        registry.register(
            "keel_sig_cache_misses",
            "Signature cache lookups that had to verify the transaction (admission, block execution)",
            m.sig_cache_misses.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Reads the values kept elsewhere and renders the text exposition format.
    pub fn render(&self, chain: &dyn Source) -> String {
        let tip = chain.tip();
        self.block_height.set(tip.latest.0 as i64);
        self.finalized_height.set(tip.finalized.0 as i64);
        self.epoch.set(chain.epoch() as i64);
        self.mempool_txs.set(chain.mempool_len() as i64);
        self.peers.set(chain.peers() as i64);
        if let Some(size) = chain.db_size_bytes() {
            self.db_size.set(size as i64);
        }
        self.memory_allocated.set(allocated_bytes() as i64);
        // Counters kept elsewhere (the p2p service, the caches) are copied in: they only grow,
        // so storing their current value keeps the Prometheus counter monotonic.
        let bytes = chain.p2p_bytes();
        for (direction, compressed, value) in [
            ("sent", false, bytes.sent_raw),
            ("sent", true, bytes.sent_compressed),
            ("received", false, bytes.received_raw),
            ("received", true, bytes.received_compressed),
        ] {
            let labels = BytesLabels {
                direction: direction.into(),
                compressed: compressed.to_string(),
            };
            mirror(&self.p2p_bytes.get_or_create(&labels), value);
        }
        let stats = chain.validator_set_cache_stats();
        mirror(&self.set_cache_hits, stats.hits);
        mirror(&self.set_cache_misses, stats.misses);
        let (hits, misses) = chain.sig_cache_stats();
        mirror(&self.sig_cache_hits, hits);
        mirror(&self.sig_cache_misses, misses);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Sets `counter` to `value`, a count kept elsewhere that only grows.
fn mirror(counter: &Counter, value: u64) {
    counter
        .inner()
        .fetch_max(value, std::sync::atomic::Ordering::Relaxed);
}

/// Bytes allocated, as jemalloc counts them (0 if it cannot tell).
fn allocated_bytes() -> u64 {
    if tikv_jemalloc_ctl::epoch::advance().is_err() {
        return 0;
    }
    tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as u64)
}

/// Content type of the Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics listener lets clients hold.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections served at once; one accepted beyond this is closed at once.
    max_connections: usize,
    /// Time a client has to send a whole request head, idle time before it included (so an
    /// idle keep-alive connection is closed after it too).
    header_read_timeout: Duration,
    /// A connection is asked to close after this long, so a client that reads its response
    /// slowly cannot hold a slot forever. Scrapers simply reconnect.
    max_connection_time: Duration,
    /// At shutdown, or past `max_connection_time`, time left to the response in flight.
    shutdown_grace: Duration,
    /// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
    accept_error_pause: Duration,
}

/// The limits of the node's listener. A scrape every few seconds needs one connection.
const LIMITS: Limits = Limits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
    max_connection_time: Duration::from_secs(60),
    shutdown_grace: Duration::from_secs(2),
    accept_error_pause: Duration::from_secs(1),
};

/// Renders the text exposition format at each scrape.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `addr` with the text `render` returns at each request (HTTP/1.1;
/// any other path gets 404, any other method 405). Returns the bound address and the
/// listener's task.
///
/// At most 64 connections are served at once (more are closed as soon as they are accepted);
/// a client has 5 s to send its request head. When `shutdown` is cancelled the listener
/// stops accepting, lets responses in flight finish for at most 2 s, drops what is left and
/// the task completes.
pub async fn serve_metrics(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    serve_with(addr, render, shutdown, LIMITS).await
}

async fn serve_with(
    addr: SocketAddr,
    render: Render,
    shutdown: CancellationToken,
    limits: Limits,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("metrics listener on {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener", e))?;
    info!(addr = %local, "Prometheus metrics at /metrics");
    let task = tokio::spawn(accept_loop(
        listener,
        MetricsService { render },
        shutdown,
        limits,
    ));
    Ok((local, task))
}

/// Accepts connections until `shutdown`, then waits (bounded) for those still open.
async fn accept_loop(
    listener: TcpListener,
    service: MetricsService,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            // Reaps finished connections so the set stays as small as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(limits.accept_error_pause) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics listener: connection limit reached, closing");
            continue;
        };
        let connection = http.serve_connection(TokioIo::new(stream), service.clone());
        connections.spawn(serve_connection(connection, shutdown.clone(), limits, slot));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = connections.len(),
            "metrics listener: connections dropped at shutdown"
        );
    }
}

/// Drives one connection, holding `_slot` until it closes.
async fn serve_connection(
    connection: http1::Connection<TokioIo<TcpStream>, MetricsService>,
    shutdown: CancellationToken,
    limits: Limits,
    _slot: OwnedSemaphorePermit,
) {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return connection_closed(result),
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(limits.max_connection_time) => {}
    }
    // Finish the response in flight, if any, then close.
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.shutdown_grace, connection).await {
        Ok(result) => connection_closed(result),
        Err(_) => debug!("metrics connection dropped with a response unfinished"),
    }
}

fn connection_closed(result: std::result::Result<(), hyper::Error>) {
    if let Err(e) = result {
        debug!(error = %e, "metrics connection closed");
    }
}

/// Answers the requests of one connection.
#[derive(Clone)]
struct MetricsService {
    render: Render,
}

impl Service<Request<Incoming>> for MetricsService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<std::result::Result<Self::Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = if request.uri().path() != "/metrics" {
            text_response(StatusCode::NOT_FOUND, "not found: try GET /metrics\n")
        } else if request.method() != Method::GET {
            let mut response = text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET\n",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            response
        } else {
            text_response(StatusCode::OK, (self.render)())
        };
        std::future::ready(Ok(response))
    }
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const BODY: &str = "# TYPE keel_test_total counter\nkeel_test_total 7\n";

    async fn start(
        limits: Limits,
        render: Render,
    ) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let (addr, task) = serve_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            render,
            shutdown.clone(),
            limits,
        )
        .await
        .unwrap();
        (addr, shutdown, task)
    }

    fn fixed_body() -> Render {
        Arc::new(|| BODY.to_string())
    }

    /// Sends one request asking the server to close afterwards; returns the status and the
    /// whole response, or `None` when the server closed the connection without answering.
    async fn try_request(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let head = format!("{method} {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .ok()?;
        let text = String::from_utf8(out).unwrap();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text))
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        try_request(addr, method, path).await.expect("an answer")
    }

    #[tokio::test]
    async fn get_metrics_answers_the_rendered_text() {
        let (addr, _shutdown, _task) = start(LIMITS, fixed_body()).await;
        let (status, response) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{response}"
        );
        assert!(response.ends_with(BODY), "{response}");
        // A query string does not change the path.
        assert_eq!(request(addr, "GET", "/metrics?x=1").await.0, 200);
    }

    #[tokio::test]
    async fn other_paths_are_not_found_and_other_methods_not_allowed() {
        let (addr, _shutdown, _task) = start(LIMITS, fixed_body()).await;
        for path in ["/", "/metricsx", "/metrics/", "/health"] {
            let (status, response) = request(addr, "GET", path).await;
            assert_eq!(status, 404, "{path}: {response}");
            assert!(!response.contains("keel_test_total"), "{response}");
        }
        for method in ["POST", "PUT", "DELETE"] {
            let (status, response) = request(addr, method, "/metrics").await;
            assert_eq!(status, 405, "{method}: {response}");
            assert!(
                response.to_ascii_lowercase().contains("allow: get\r\n"),
                "{response}"
            );
        }
    }

    #[tokio::test]
    async fn slow_clients_cannot_keep_a_later_scrape_out() {
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(2),
            ..LIMITS
        };
        let (addr, _shutdown, _task) = start(limits, fixed_body()).await;
        // Many clients that start a request head and never finish it.
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Those beyond the limit may already be closed: a failed write is expected.
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: ").await;
            slow.push(stream);
        }
        // Every slot is taken: a complete request is closed at once, unanswered.
        assert_eq!(try_request(addr, "GET", "/metrics").await, None);
        // The slow clients are cut off by the header deadline...
        for mut stream in slow {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "a slow client kept its connection");
        }
        // ...and a scrape is answered again once their slots are back.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match try_request(addr, "GET", "/metrics").await {
                Some((200, response)) => {
                    assert!(response.ends_with(BODY), "{response}");
                    break;
                }
                other => assert!(Instant::now() < deadline, "no scrape answered: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_finishes_the_response_in_flight_and_ends_the_task() {
        // A slow scrape, so one is in flight when the token is cancelled.
        let render: Render = Arc::new(|| {
            std::thread::sleep(Duration::from_millis(400));
            BODY.to_string()
        });
        let (addr, shutdown, task) = start(LIMITS, render).await;
        // A client that never finishes its request head must not hold the shutdown up.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /metr").await.unwrap();
        let scrape = tokio::spawn(async move { request(addr, "GET", "/metrics").await });
        tokio::time::sleep(Duration::from_millis(150)).await;

        let cancelled_at = Instant::now();
        shutdown.cancel();
        let (status, response) = scrape.await.unwrap();
        assert_eq!(status, 200, "{response}");
        assert!(response.ends_with(BODY), "{response}");
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the listener task ends within 3 s of the cancel")
            .unwrap();
        assert!(cancelled_at.elapsed() < Duration::from_secs(3));
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }
}
