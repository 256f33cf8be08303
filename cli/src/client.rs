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
