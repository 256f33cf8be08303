//! A small JSON-RPC client for the node's HTTP endpoint.

use anyhow::{anyhow, Context, Result};
use jsonrpsee::core::client::ClientT;
use jsonrpsee::core::params::ArrayParams;
use jsonrpsee::http_client::{HttpClient, HttpClientBuilder};
use serde_json::Value;

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

    /// Calls `method` with positional `params`.
    pub async fn call(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        let mut p = ArrayParams::new();
        for v in params {
            p.insert(v).map_err(|e| anyhow!("encoding params: {e}"))?;
        }
        self.client.request(method, p).await.map_err(|e| match e {
            jsonrpsee::core::ClientError::Call(obj) => {
                anyhow!("{} (code {})", obj.message(), obj.code())
            }
            jsonrpsee::core::ClientError::Transport(t) => {
                anyhow!("cannot reach node at {}: {t}", self.url)
            }
            other => anyhow!("{method} via {}: {other}", self.url),
        })
    }
}
