//! The RPC middleware every call passes through ([`CallChecksLayer`]).
//!
//! It checks a call's parameters against [`PARAMS`](super::api::PARAMS) before the code that
//! `#[rpc]` generated decodes them, so a bad call gets -32602 with a message naming the
//! parameter (`invalid params: address: ...`) where jsonrpsee's decoder would say only
//! "Invalid params"; it also refuses what that decoder lets through: unknown named
//! parameters, too many positional ones, and params that are neither an array nor an
//! object. Then it counts the call in `keel_rpc_requests_total{method,code}` ([`RpcMetrics`],
//! the RPC layer's metrics). Calls inside a batch get the same treatment; subscriptions and
//! unknown methods pass through uncounted.

use std::future::Future;

use jsonrpsee::server::middleware::rpc::{
    Batch, BatchEntry, MethodResponse, Notification, Request, RpcServiceT,
};
use jsonrpsee::server::BatchResponseBuilder;
use jsonrpsee::types::ErrorObjectOwned;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::api::{params_of, Param};
use super::invalid;

/// Labels of `keel_rpc_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method.
    pub method: String,
    /// 0 for success, else the JSON-RPC error code.
    pub code: String,
}

/// The RPC layer's metrics: `keel_rpc_requests_total{method,code}`, counted by [`CallChecks`]
/// as calls are answered. Clones count into the same series.
#[derive(Clone, Debug, Default)]
pub struct RpcMetrics {
    requests: Family<RpcLabels, Counter>,
}

impl RpcMetrics {
    /// Registers `keel_rpc_requests` (a series appears with its first call).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "keel_rpc_requests",
            "JSON-RPC calls by method and result code (0 = success)",
            self.requests.clone(),
        );
    }

    fn count(&self, method: &str, code: i32) {
        let labels = RpcLabels {
            method: method.to_string(),
            code: code.to_string(),
        };
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

/// Wraps the server's RPC service in [`CallChecks`].
#[derive(Clone)]
pub struct CallChecksLayer {
    metrics: RpcMetrics,
    max_response_bytes: usize,
}

impl CallChecksLayer {
    /// Counting into `metrics`; a batch's responses together may take `max_response_bytes`
    /// (the server's `max_response_body_size`).
    pub fn new(metrics: RpcMetrics, max_response_bytes: usize) -> Self {
        CallChecksLayer {
            metrics,
            max_response_bytes,
        }
    }
}

impl<S> tower::Layer<S> for CallChecksLayer {
    type Service = CallChecks<S>;

    fn layer(&self, service: S) -> CallChecks<S> {
        CallChecks {
            service,
            metrics: self.metrics.clone(),
            max_response_bytes: self.max_response_bytes,
        }
    }
}

/// The service [`CallChecksLayer`] makes: see the module documentation.
#[derive(Clone)]
pub struct CallChecks<S> {
    service: S,
    metrics: RpcMetrics,
    max_response_bytes: usize,
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
    async fn checked_call(&self, req: Request<'_>) -> MethodResponse {
        let Some((method, params)) = params_of(req.method_name()) else {
            return self.service.call(req).await;
        };
        let response = match check_params(params, req.params.as_deref().map(|p| p.get())) {
            Ok(()) => self.service.call(req).await,
            Err(e) => MethodResponse::error(req.id, e).with_extensions(req.extensions),
        };
        self.metrics
            .count(method, response.as_error_code().unwrap_or(0));
        response
    }
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
        async move { this.checked_call(req).await }
    }

    /// jsonrpsee's own batch handling, with each call going through [`Self::call`] (the inner
    /// service's `batch` would bypass this middleware).
    fn batch<'a>(&self, batch: Batch<'a>) -> impl Future<Output = MethodResponse> + Send + 'a {
        let this = self.clone();
        async move {
            let mut responses = BatchResponseBuilder::new_with_limit(this.max_response_bytes);
            let mut got_notification = false;
            for entry in batch {
                let response = match entry {
                    Ok(BatchEntry::Call(req)) => this.checked_call(req).await,
                    Ok(BatchEntry::Notification(n)) => {
                        got_notification = true;
                        this.service.notification(n).await;
                        continue;
                    }
                    Err(e) => {
                        let (e, id) = e.into_parts();
                        MethodResponse::error(id, e)
                    }
                };
                if let Err(too_large) = responses.append(response) {
                    return too_large;
                }
            }
            if responses.is_empty() && got_notification {
                MethodResponse::notification()
            } else {
                MethodResponse::from_batch(responses.finish())
            }
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
}
