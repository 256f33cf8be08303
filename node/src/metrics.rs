//! Prometheus metrics (`GET /metrics` on `metrics.listen_addr`), prefix `keel_`.
//!
//! Counters the driver and RPC update as things happen live here; values other parts keep
//! (tip, mempool size, peers, p2p byte counts, database size, memory, set cache, signature
//! cache) are read at scrape time.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::chain::Chain;
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
    pub fn render(&self, chain: &Chain) -> String {
        let tip = chain.tip();
        self.block_height.set(tip.latest.0 as i64);
        self.finalized_height.set(tip.finalized.0 as i64);
        self.epoch.set(chain.epoch() as i64);
        self.mempool_txs.set(chain.mempool().len() as i64);
        self.peers.set(chain.peers() as i64);
        if let Ok(size) = chain.blocks.kv().disk_size_bytes() {
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
        let sig_cache = chain.sig_cache();
        mirror(&self.sig_cache_hits, sig_cache.hits());
        mirror(&self.sig_cache_misses, sig_cache.misses());
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

/// Serves `GET /metrics` (anything else gets 404) until the runtime stops.
pub(crate) async fn serve(chain: Arc<Chain>, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("metrics listener on {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener", e))?;
    info!(addr = %local, "Prometheus metrics at /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let chain = chain.clone();
            tokio::spawn(async move {
                // One small request: read what arrives within a short time, answer, close.
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if head.starts_with("GET /metrics") {
                    ("200 OK", chain.metrics.render(&chain))
                } else {
                    ("404 Not Found", "not found: try GET /metrics\n".to_string())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = stream.write_all(response.as_bytes()).await {
                    debug!(error = %e, "metrics response not sent");
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(local)
}
