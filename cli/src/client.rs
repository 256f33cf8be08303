//! The node's JSON-RPC API over HTTP: the typed client keel-node generates from its `KeelApi`
//! trait ([`KeelApiClient`]), with errors turned into one clear line.

use std::future::Future;

use anyhow::{anyhow, Context, Result};
use jsonrpsee::core::ClientError;
use jsonrpsee::http_client::{HttpClient, HttpClientBuilder};
pub use keel_node::rpc::KeelApiClient;

/// A connection to one node.
pub struct Rpc {
    url: String,
    client: HttpClient,
}

impl Rpc {
    /// A client for `url`.
    pub fn new(url: &str) -> Result<Rpc> {
        let client = HttpClientBuilder::default()
            .request_timeout(std::time::Duration::from_secs(30))
            .build(url)
            .with_context(|| format!("invalid RPC url {url}"))?;
        Ok(Rpc {
            url: url.to_string(),
            client,
        })
    }

    /// The typed API: `rpc.call("chain_status", rpc.api().chain_status())`.
    pub fn api(&self) -> &HttpClient {
        &self.client
    }

    /// Calls `method` with `params` (a JSON array: positional, an object: named, `None`:
    /// none) and returns the result as JSON.
    pub async fn call_raw(
        &self,
        method: &str,
        params: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        use jsonrpsee::core::client::ClientT;
        use jsonrpsee::core::params::{ArrayParams, ObjectParams};
        match params {
            None => {
                self.call(method, self.client.request(method, ArrayParams::new()))
                    .await
            }
            Some(serde_json::Value::Array(items)) => {
                let mut p = ArrayParams::new();
                for item in items {
                    p.insert(item).context("params")?;
                }
                self.call(method, self.client.request(method, p)).await
            }
            Some(serde_json::Value::Object(fields)) => {
                let mut p = ObjectParams::new();
                for (name, value) in fields {
                    p.insert(&name, value).context("params")?;
                }
                self.call(method, self.client.request(method, p)).await
            }
            Some(other) => Err(anyhow!(
                "params must be a JSON array or object, not {other}"
            )),
        }
    }

    /// Awaits `request`, a call of `method` through [`Rpc::api`], turning a failure into one
    /// line: the node's error with its code, an unreachable node, or what else went wrong.
    pub async fn call<T>(
        &self,
        method: &str,
        request: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T> {
        request.await.map_err(|e| match e {
            ClientError::Call(obj) => anyhow!("{} (code {})", obj.message(), obj.code()),
            ClientError::Transport(t) => anyhow!("cannot reach node at {}: {t}", self.url),
            other => anyhow!("{method} via {}: {other}", self.url),
        })
    }
}
