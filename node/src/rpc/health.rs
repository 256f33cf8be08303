//! `GET /health`: `200` when the node is doing its job, `503` with the reasons when it is not,
//! so load balancers and orchestrators can route around a node that cannot serve fresh state.
//! Unhealthy when (each a reason in the answer):
//! - no block has become final for [`STALE_BLOCK_TIMES`] block times (by the final block's
//!   timestamp: a stalled chain, or a node that stopped following it);
//! - the node has no peers while its epoch's validator set has more than one member (it is
//!   cut off; a one-validator chain needs none);
//! - the node is under hard memory pressure (`memory.limit`: it refuses new transactions).
//!
//! The body is JSON: `{status: "ok" | "unhealthy", reasons: [..], peers, is_syncing,
//! finalized_height, final_age_ms}`. Any other request passes through to JSON-RPC.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use jsonrpsee::server::{HttpBody, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::clock::{Clock, SystemClock};
use crate::context::NodeContext;

/// Block times without a new final block after which the node is unhealthy.
pub const STALE_BLOCK_TIMES: u64 = 20;

/// What `GET /health` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthReport {
    /// `"ok"` or `"unhealthy"`.
    pub status: &'static str,
    /// Why unhealthy (empty when ok).
    pub reasons: Vec<String>,
    /// Connected peers.
    pub peers: usize,
    /// Whether the node is fetching missing blocks.
    pub is_syncing: bool,
    /// The final height.
    pub finalized_height: u64,
    /// Milliseconds since the final block's timestamp.
    pub final_age_ms: u64,
}

/// The node's health now.
pub fn report(chain: &NodeContext, block_time_ms: u64, now_ms: u64) -> HealthReport {
    let (finalized_height, _) = chain.tip().finalized;
    let final_ts = chain
        .blocks
        .header_at(finalized_height)
        .ok()
        .flatten()
        .map_or(0, |h| h.timestamp_ms);
    let final_age_ms = now_ms.saturating_sub(final_ts);
    let peers = chain.peers();
    let mut reasons = Vec::new();
    let stale_after = block_time_ms.saturating_mul(STALE_BLOCK_TIMES);
    if final_age_ms > stale_after {
        reasons.push(format!(
            "no new final block for {} s (height {finalized_height}; the limit is {} block times, {} s)",
            final_age_ms / 1000,
            STALE_BLOCK_TIMES,
            stale_after / 1000
        ));
    }
    let set_size = chain
        .validator_set(chain.epoch())
        .map_or(0, |set| set.len());
    if peers == 0 && set_size > 1 {
        reasons.push(format!(
            "no peers, while the validator set has {set_size} members"
        ));
    }
    if chain.memory_pressure().level() >= crate::memory::PRESSURE_HARD {
        reasons.push(
            "under hard memory pressure (memory.limit): caches shrunk, new transactions refused"
                .to_string(),
        );
    }
    HealthReport {
        status: if reasons.is_empty() {
            "ok"
        } else {
            "unhealthy"
        },
        reasons,
        peers,
        is_syncing: chain.syncing(),
        finalized_height,
        final_age_ms,
    }
}

/// The HTTP middleware answering `GET /health`.
#[derive(Clone)]
pub struct HealthLayer {
    chain: Arc<NodeContext>,
    block_time_ms: u64,
}

impl HealthLayer {
    /// Health of `chain`, whose blocks come every `block_time_ms`.
    pub fn new(chain: Arc<NodeContext>, block_time_ms: u64) -> HealthLayer {
        HealthLayer {
            chain,
            block_time_ms,
        }
    }
}

impl<S> tower::Layer<S> for HealthLayer {
    type Service = Health<S>;

    fn layer(&self, inner: S) -> Health<S> {
        Health {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`HealthLayer`].
#[derive(Clone)]
pub struct Health<S> {
    inner: S,
    layer: HealthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<HttpRequest<B>> for Health<S>
where
    S: tower::Service<HttpRequest<B>, Response = HttpResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = BoxFuture<Result<HttpResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest<B>) -> Self::Future {
        if request.method() == hyper::Method::GET && request.uri().path() == "/health" {
            let health = report(
                &self.layer.chain,
                self.layer.block_time_ms,
                SystemClock.now_ms(),
            );
            let status = if health.reasons.is_empty() {
                hyper::StatusCode::OK
            } else {
                hyper::StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string(&health).unwrap_or_default();
            let response = hyper::Response::builder()
                .status(status)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(HttpBody::from(body));
            return match response {
                Ok(r) => Box::pin(async move { Ok(r) }),
                Err(_) => Box::pin(async move {
                    let mut r = HttpResponse::new(HttpBody::from("{}"));
                    *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                    Ok(r)
                }),
            };
        }
        Box::pin(self.inner.call(request))
    }
}
