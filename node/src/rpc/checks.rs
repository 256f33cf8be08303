//! The RPC middleware every call passes through ([`CallChecksLayer`]).
//!
//! For each call, alone or in a batch, in this order:
//! 1. **Rate limit**: with `rpc.requests_per_sec_per_ip`, a call from an address that has
//!    used its requests for this second gets `-32020` ([`super::limits`]).
//! 2. **Transport**: a subscription method called over HTTP gets `-32601` saying it needs a
//!    WebSocket connection (jsonrpsee would answer an unhelpful internal error).
//! 3. **Parameters**: checked against [`PARAMS`](super::api::PARAMS) before the code that
//!    `#[rpc]` generated decodes them, so a bad call gets -32602 with a message naming the
//!    parameter (`invalid params: address: ...`) where jsonrpsee's decoder would say only
//!    "Invalid params"; it also refuses what that decoder lets through: unknown named
//!    parameters, too many positional ones, and params that are neither an array nor an
//!    object.
//! 4. **Codes**: jsonrpsee's own limit errors reuse codes that keel's table gives other
//!    meanings; they are answered with keel's codes instead (too many subscriptions
//!    `-32024`, response too large `-32023`).
//! 5. **Count** in `keel_rpc_requests_total{method,code}` ([`RpcMetrics`], the RPC layer's
//!    metrics). Subscriptions and unknown methods are not counted.
//!
//! A batch larger than `rpc.max_batch_size` is refused whole with `-32021` before any of
//! its calls runs. Over WebSocket a call also waits for room on its connection
//! ([`super::conn`]).

use std::future::Future;
use std::sync::Arc;

use jsonrpsee::server::middleware::rpc::{
    Batch, BatchEntry, MethodResponse, Notification, Request, RpcServiceT,
};
use jsonrpsee::server::BatchResponseBuilder;
use jsonrpsee::types::error::{
    OVERSIZED_RESPONSE_CODE, OVERSIZED_RESPONSE_MSG, TOO_BIG_BATCH_RESPONSE_CODE,
    TOO_BIG_BATCH_RESPONSE_MSG, TOO_MANY_SUBSCRIPTIONS_CODE, TOO_MANY_SUBSCRIPTIONS_MSG,
};
use jsonrpsee::types::{ErrorObjectOwned, Id};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::api::{params_of, Param, SUBSCRIPTION_METHODS};
use super::conn::WsConnection;
use super::limits::{ClientIp, RateLimiter};
use super::{codes, err, invalid};

/// Labels of `keel_rpc_requests_total`. The method is one of the API's own names (calls to
/// unknown methods are not counted), so a call allocates no label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method.
    pub method: &'static str,
    /// 0 for success, else the JSON-RPC error code.
    pub code: i32,
}

/// Labels of `keel_rpc_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The method.
    pub method: &'static str,
}

/// 50 microseconds to about 1.6 seconds.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The RPC layer's metrics: `keel_rpc_requests_total{method,code}` and
/// `keel_rpc_request_duration_seconds{method}`, counted and timed by [`CallChecks`] as calls
/// are answered. Clones count into the same series.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
    durations: Family<MethodLabel, Histogram, fn() -> Histogram>,
}

impl Default for RpcMetrics {
    fn default() -> RpcMetrics {
        RpcMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl RpcMetrics {
    /// Registers `keel_rpc_requests` (a series appears with its first call).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "keel_rpc_requests",
            "JSON-RPC calls by method and result code (0 = success)",
            self.requests.clone(),
        );
        registry.register(
            "keel_rpc_request_duration_seconds",
            "Time to answer a JSON-RPC call, by method (parameter checks to response)",
            self.durations.clone(),
        );
    }

    fn observe(&self, method: &'static str, took: std::time::Duration) {
        let label = MethodLabel { method };
        self.durations
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    fn count(&self, method: &'static str, code: i32) {
        let labels = RpcLabels { method, code };
        self.requests.get_or_create(&labels).inc();
    }
}

/// Checks `raw` (the call's params as sent, if any) against `params`: an array of at most
/// `params.len()` values, or an object with no other names, or nothing (or null); every
/// required parameter present and not null; every value given decoding as its type.
pub fn check_params(params: &[Param], raw: Option<&str>) -> Result<(), ErrorObjectOwned> {
    let raw = raw.map(str::trim).unwrap_or("");
    let given: Vec<Value> = if raw.is_empty() {
        Vec::new()
    } else {
        match serde_json::from_str(raw).map_err(|e| invalid("params", e))? {
            Value::Null => Vec::new(),
            Value::Array(values) => values,
            Value::Object(mut named) => {
                if let Some(unknown) = named
                    .keys()
                    .find(|k| !params.iter().any(|p| p.name == k.as_str()))
                {
                    return Err(invalid(unknown, "unknown parameter"));
                }
                params
                    .iter()
                    .map(|p| named.remove(p.name).unwrap_or(Value::Null))
                    .collect()
            }
            _ => return Err(invalid("params", "must be an array or an object")),
        }
    };
    if given.len() > params.len() {
        return Err(invalid(
            "params",
            format!("expected at most {} parameters", params.len()),
        ));
    }
    for (i, param) in params.iter().enumerate() {
        match given.get(i).filter(|v| !v.is_null()) {
            None if param.required => return Err(invalid(param.name, "missing")),
            None => {}
            Some(value) => param.check(value).map_err(|e| invalid(param.name, e))?,
        }
    }
    Ok(())
}

/// What [`CallChecks`] enforces besides parameters, from `[rpc]`.
#[derive(Clone, Debug)]
pub struct CallLimits {
    /// Largest answer, a batch's answers together included (the server's
    /// `max_response_body_size`).
    pub max_response_bytes: usize,
    /// `rpc.max_batch_size`: most calls in one batch.
    pub max_batch_size: usize,
    /// `rpc.max_subscriptions_per_connection`, named in the error when it is reached.
    pub max_subscriptions: u32,
    /// `rpc.requests_per_sec_per_ip`, if not unlimited.
    pub rate: Option<Arc<RateLimiter>>,
}

/// Wraps the server's RPC service in [`CallChecks`].
#[derive(Clone)]
pub struct CallChecksLayer {
    metrics: RpcMetrics,
    limits: CallLimits,
}

impl CallChecksLayer {
    /// Counting into `metrics`, enforcing `limits`.
    pub fn new(metrics: RpcMetrics, limits: CallLimits) -> Self {
        CallChecksLayer { metrics, limits }
    }
}

impl<S> tower::Layer<S> for CallChecksLayer {
    type Service = CallChecks<S>;

    fn layer(&self, service: S) -> CallChecks<S> {
        CallChecks {
            service,
            metrics: self.metrics.clone(),
            limits: self.limits.clone(),
        }
    }
}

/// The service [`CallChecksLayer`] makes: see the module documentation.
#[derive(Clone)]
pub struct CallChecks<S> {
    service: S,
    metrics: RpcMetrics,
    limits: CallLimits,
}

/// The names of the subscription methods (their calls need a WebSocket connection).
fn subscription_method(method: &str) -> Option<&'static str> {
    SUBSCRIPTION_METHODS.iter().copied().find(|m| *m == method)
}

impl<S> CallChecks<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Send
        + Sync,
{
    /// One call, alone or in a batch: rate limit, transport, parameters, the call itself,
    /// the library's limit errors given keel's codes, and the count.
    async fn checked_call(&self, req: Request<'_>, over_ws: bool) -> MethodResponse {
        let known = params_of(req.method_name());
        if let Some(refusal) = self.rate_limited(&req) {
            if let Some((method, _)) = known {
                self.metrics.count(method, codes::RATE_LIMITED);
            }
            return MethodResponse::error(req.id, refusal).with_extensions(req.extensions);
        }
        if let Some(method) = subscription_method(req.method_name()) {
            if !over_ws {
                let e = err(
                    codes::METHOD_NOT_FOUND,
                    format!("{method} is a subscription: call it over a WebSocket connection"),
                );
                return MethodResponse::error(req.id, e).with_extensions(req.extensions);
            }
            return self.library_errors_remapped(self.service.call(req).await);
        }
        let Some((method, params)) = known else {
            return self.service.call(req).await;
        };
        let started = std::time::Instant::now();
        let response = match check_params(params, req.params.as_deref().map(|p| p.get())) {
            Ok(()) => self.library_errors_remapped(self.service.call(req).await),
            Err(e) => MethodResponse::error(req.id, e).with_extensions(req.extensions),
        };
        self.metrics.observe(method, started.elapsed());
        self.metrics
            .count(method, response.as_error_code().unwrap_or(0));
        response
    }

    /// `-32020` if the caller's address has no request left this second.
    fn rate_limited(&self, req: &Request<'_>) -> Option<ErrorObjectOwned> {
        let rate = self.limits.rate.as_ref()?;
        let ClientIp(ip) = *req.extensions().get::<ClientIp>()?;
        let wait = rate.check(ip).err()?;
        let retry_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        Some(ErrorObjectOwned::owned(
            codes::RATE_LIMITED,
            format!(
                "rate limited: more than {} requests per second from {ip} \
                 (rpc.requests_per_sec_per_ip); retry in {retry_ms} ms",
                rate.per_sec()
            ),
            Some(serde_json::json!({ "retry_after_ms": retry_ms })),
        ))
    }

    /// A batch: at most `max_batch_size` calls, each checked like a single one, answers
    /// together at most `max_response_bytes`.
    async fn checked_batch(&self, batch: Batch<'_>, over_ws: bool) -> MethodResponse {
        if batch.len() > self.limits.max_batch_size {
            return MethodResponse::error(
                Id::Null,
                err(
                    codes::BATCH_TOO_LARGE,
                    format!(
                        "batch too large: {} requests, rpc.max_batch_size is {}",
                        batch.len(),
                        self.limits.max_batch_size
                    ),
                ),
            );
        }
        let mut responses = BatchResponseBuilder::new_with_limit(self.limits.max_response_bytes);
        let mut got_notification = false;
        for entry in batch {
            let response = match entry {
                Ok(BatchEntry::Call(req)) => self.checked_call(req, over_ws).await,
                Ok(BatchEntry::Notification(n)) => {
                    got_notification = true;
                    self.service.notification(n).await;
                    continue;
                }
                Err(e) => {
                    let (e, id) = e.into_parts();
                    MethodResponse::error(id, e)
                }
            };
            if responses.append(response).is_err() {
                return MethodResponse::error(Id::Null, self.response_too_large());
            }
        }
        if responses.is_empty() && got_notification {
            MethodResponse::notification()
        } else {
            // An empty batch gets a single -32600 (JSON-RPC 2.0: "an empty Array").
            MethodResponse::from_batch(responses.finish())
        }
    }

    fn response_too_large(&self) -> ErrorObjectOwned {
        err(
            codes::RESPONSE_TOO_LARGE,
            format!(
                "response too large: more than {} bytes; ask for less (fewer calls in a \
                 batch, a block without full_txs)",
                self.limits.max_response_bytes
            ),
        )
    }

    /// The library's own limit errors reuse codes that keel's table gives other meanings
    /// (-32006 wrong chain, -32008 transaction too large, ...): each gets a code of its own.
    /// The library's message tells them apart from keel's errors with the same code.
    fn library_errors_remapped(&self, response: MethodResponse) -> MethodResponse {
        let Some(code) = response.as_error_code() else {
            return response;
        };
        let (library_message, replacement) = match code {
            TOO_MANY_SUBSCRIPTIONS_CODE => (
                TOO_MANY_SUBSCRIPTIONS_MSG,
                err(
                    codes::TOO_MANY_SUBSCRIPTIONS,
                    format!(
                        "too many subscriptions on this connection: at most {} \
                         (rpc.max_subscriptions_per_connection)",
                        self.limits.max_subscriptions
                    ),
                ),
            ),
            OVERSIZED_RESPONSE_CODE => (OVERSIZED_RESPONSE_MSG, self.response_too_large()),
            TOO_BIG_BATCH_RESPONSE_CODE => (TOO_BIG_BATCH_RESPONSE_MSG, self.response_too_large()),
            _ => return response,
        };
        let Ok(sent) = serde_json::from_str::<Value>(response.as_json().get()) else {
            return response;
        };
        if sent["error"]["message"].as_str() != Some(library_message) {
            return response;
        }
        let id_text = sent["id"].to_string();
        let id = serde_json::from_str::<Id<'_>>(&id_text).map_or(Id::Null, Id::into_owned);
        let extensions = response.extensions().clone();
        MethodResponse::error(id, replacement).with_extensions(extensions)
    }
}

/// Over WebSocket, a call (or batch) waits for the connection's answers to drain and counts
/// as in flight until answered; its answer is then counted as queued (see [`super::conn`]).
async fn over_connection<F>(ws: Option<WsConnection>, call: F) -> MethodResponse
where
    F: Future<Output = MethodResponse>,
{
    let Some(WsConnection(conn)) = ws else {
        return call.await;
    };
    let in_flight = conn.admit().await;
    let response = call.await;
    if response.is_method_call() || response.is_batch() {
        conn.queued(response.as_json().get().len());
    }
    drop(in_flight);
    response
}

impl<S> RpcServiceT for CallChecks<S>
where
    S: RpcServiceT<
            MethodResponse = MethodResponse,
            BatchResponse = MethodResponse,
            NotificationResponse = MethodResponse,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    type MethodResponse = MethodResponse;
    type NotificationResponse = MethodResponse;
    type BatchResponse = MethodResponse;

    fn call<'a>(&self, req: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let this = self.clone();
        let ws = req.extensions().get::<WsConnection>().cloned();
        async move {
            let over_ws = ws.is_some();
            over_connection(ws, this.checked_call(req, over_ws)).await
        }
    }

    /// jsonrpsee's own batch handling, with each call checked like a single one
    /// (the inner service's `batch` would bypass this middleware), and `max_batch_size`
    /// enforced here so that the refusal has keel's code.
    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let this = self.clone();
        let ws = batch.iter().find_map(|entry| match entry {
            Ok(BatchEntry::Call(req)) => req.extensions().get::<WsConnection>().cloned(),
            Ok(BatchEntry::Notification(n)) => n.extensions().get::<WsConnection>().cloned(),
            Err(_) => None,
        });
        async move {
            let over_ws = ws.is_some();
            over_connection(ws, this.checked_batch(batch, over_ws)).await
        }
    }

    fn notification<'a>(
        &self,
        n: Notification<'a>,
    ) -> impl Future<Output = MethodResponse> + Send + 'a {
        self.service.notification(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::value::RawValue;

    use super::*;

    fn message(method: &str, raw: &str) -> String {
        let (_, params) = params_of(method).unwrap();
        let e = check_params(params, Some(raw)).unwrap_err();
        assert_eq!(
            e.code(),
            super::super::codes::INVALID_PARAMS,
            "{method} {raw}"
        );
        e.message().to_string()
    }

    fn ok(method: &str, raw: Option<&str>) {
        let (_, params) = params_of(method).unwrap();
        check_params(params, raw).unwrap_or_else(|e| panic!("{method} {raw:?}: {e:?}"));
    }

    #[test]
    fn good_calls_pass_positional_named_or_without_params() {
        let address = format!("\"0x{}\"", "11".repeat(20));
        ok("chain_status", None);
        ok("chain_status", Some("[]"));
        ok("chain_status", Some("null"));
        ok("state_getAccount", Some(&format!("[{address}]")));
        ok("state_getAccount", Some(&format!("[{address}, null]")));
        ok("state_getAccount", Some(&format!("[{address}, \"7\"]")));
        ok(
            "state_getAccount",
            Some(&format!("{{\"address\": {address}}}")),
        );
        ok(
            "state_getAccount",
            Some(&format!("{{\"height\": 7, \"address\": {address}}}")),
        );
        ok("chain_getBlock", Some("[3, true]"));
        ok(
            "chain_getBlock",
            Some(&format!("[\"0x{}\"]", "ab".repeat(32))),
        );
        ok("state_getValidators", Some("[]"));
        ok("tx_submit", Some("[\"0xnothex\"]"));
    }

    #[test]
    fn bad_calls_get_a_message_naming_the_parameter() {
        let address = format!("\"0x{}\"", "11".repeat(20));
        for (method, raw, expected) in [
            ("tx_submit", "[]".to_string(), "invalid params: tx: missing"),
            (
                "tx_submit",
                "[5]".to_string(),
                "invalid params: tx: expected a hex string",
            ),
            (
                "state_getAccount",
                format!("[{address}, -1]"),
                "invalid params: height: expected an unsigned integer",
            ),
            (
                "state_getAccount",
                "[null, 1]".to_string(),
                "invalid params: address: missing",
            ),
            (
                "state_getAccount",
                format!("{{\"address\": {address}, \"hieght\": 1}}"),
                "invalid params: hieght: unknown parameter",
            ),
            (
                "state_getAccount",
                format!("[{address}, 1, 2]"),
                "invalid params: params: expected at most 2 parameters",
            ),
            (
                "chain_status",
                "[1]".to_string(),
                "invalid params: params: expected at most 0 parameters",
            ),
            (
                "chain_getBlock",
                "true".to_string(),
                "invalid params: params: must be an array or an object",
            ),
            (
                "chain_getBlock",
                "[{}]".to_string(),
                "invalid params: block: expected a height or a 0x block hash",
            ),
            (
                "chain_getBlock",
                "[1, \"yes\"]".to_string(),
                "invalid params: full_txs: expected a boolean",
            ),
            (
                "state_getAccount",
                "[12]".to_string(),
                "invalid params: address: expected a string",
            ),
            (
                "chain_getBlock",
                "[1, \"x, expected y\"]".to_string(),
                "invalid params: full_txs: expected a boolean",
            ),
        ] {
            assert_eq!(message(method, &raw), expected, "{method} {raw}");
        }
        let short = message("state_getAccount", "[\"0x12\"]");
        assert!(short.starts_with("invalid params: address: "), "{short}");
        assert!(short.contains("hex digits"), "{short}");
        let bad_hash = message("tx_status", "[\"0x12\"]");
        assert!(bad_hash.starts_with("invalid params: hash: "), "{bad_hash}");
    }

    /// An inner service that answers every call with the error `answer` makes.
    #[derive(Clone)]
    struct Answers(fn() -> ErrorObjectOwned);

    impl RpcServiceT for Answers {
        type MethodResponse = MethodResponse;
        type NotificationResponse = MethodResponse;
        type BatchResponse = MethodResponse;

        fn call<'a>(&self, req: Request<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
            let e = (self.0)();
            async move { MethodResponse::error(req.id, e) }
        }

        fn batch<'a>(&self, _: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
            std::future::ready(MethodResponse::notification())
        }

        fn notification<'a>(
            &self,
            _: Notification<'a>,
        ) -> impl Future<Output = MethodResponse> + Send + 'a {
            std::future::ready(MethodResponse::notification())
        }
    }

    fn checks(answer: fn() -> ErrorObjectOwned) -> CallChecks<Answers> {
        let limits = CallLimits {
            max_response_bytes: 400,
            max_batch_size: 10,
            max_subscriptions: 5,
            rate: None,
        };
        tower::Layer::layer(
            &CallChecksLayer::new(RpcMetrics::default(), limits),
            Answers(answer),
        )
    }

    fn request(method: &str, params: Option<&str>, over_ws: bool) -> Request<'static> {
        let params = params.map(|p| RawValue::from_string(p.to_string()).unwrap());
        let mut req = Request::owned(method.to_string(), params, Id::Number(3));
        if over_ws {
            let conn = Arc::new(super::super::conn::ConnState::default());
            req.extensions_mut().insert(WsConnection(conn));
        }
        req
    }

    /// (code, message, id) of an error response.
    fn answered(response: &MethodResponse) -> (i64, String, Value) {
        let v: Value = serde_json::from_str(response.as_json().get()).unwrap();
        (
            v["error"]["code"].as_i64().unwrap(),
            v["error"]["message"].as_str().unwrap().to_string(),
            v["id"].clone(),
        )
    }

    #[tokio::test]
    async fn the_librarys_limit_errors_get_keels_codes() {
        let subs = checks(|| jsonrpsee::types::error::reject_too_many_subscriptions(5));
        let response = subs
            .call(request("chain_subscribeNewHeads", None, true))
            .await;
        assert_eq!(
            answered(&response),
            (
                i64::from(codes::TOO_MANY_SUBSCRIPTIONS),
                "too many subscriptions on this connection: at most 5 \
                 (rpc.max_subscriptions_per_connection)"
                    .to_string(),
                Value::from(3)
            )
        );
        let oversized = checks(|| {
            ErrorObjectOwned::owned(
                OVERSIZED_RESPONSE_CODE,
                OVERSIZED_RESPONSE_MSG,
                Some("Exceeded max limit of 400"),
            )
        });
        let response = oversized.call(request("chain_status", None, false)).await;
        let (code, message, id) = answered(&response);
        assert_eq!(
            (code, id),
            (i64::from(codes::RESPONSE_TOO_LARGE), Value::from(3))
        );
        assert!(
            message.starts_with("response too large: more than 400 bytes"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn keels_own_errors_with_the_same_codes_pass_unchanged() {
        // -32006 is also jsonrpsee's "too many subscriptions"; this one is keel's.
        let wrong_chain = checks(|| super::super::err(codes::WRONG_CHAIN, "wrong chain id"));
        let response = wrong_chain
            .call(request("tx_submit", Some(r#"["0xab"]"#), false))
            .await;
        assert_eq!(
            answered(&response),
            (
                i64::from(codes::WRONG_CHAIN),
                "wrong chain id".to_string(),
                Value::from(3)
            )
        );
    }

    #[tokio::test]
    async fn a_batch_whose_answers_exceed_the_limit_gets_response_too_large() {
        let long = checks(|| super::super::err(codes::NOT_FOUND, "x".repeat(100)));
        let batch: Vec<_> = (0..5)
            .map(|_| Ok(BatchEntry::Call(request("chain_status", None, false))))
            .collect();
        let response = long.batch(Batch::from(batch)).await;
        let (code, _, id) = answered(&response);
        assert_eq!(
            (code, id),
            (i64::from(codes::RESPONSE_TOO_LARGE), Value::Null)
        );
    }
}
