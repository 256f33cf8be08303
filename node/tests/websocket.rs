//! The RPC server speaks WebSocket on the same port as HTTP and streams heads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jsonrpsee::core::client::{ClientT, Subscription, SubscriptionClientT};
use jsonrpsee::rpc_params;
use jsonrpsee::ws_client::WsClientBuilder;
use keel_node::config::{Config, StorageEngine};
use keel_node::Node;
use serde_json::Value;

async fn next(s: &mut Subscription<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a head within 10 s")
        .expect("subscription open")
        .expect("valid notification")
}

async fn start_node(dir: &std::path::Path) -> Node {
    keel_node::home::init(dir, "ws", "keel-ws", 1_000).unwrap();
    let mut config = Config::default();
    config.storage.engine = StorageEngine::Memory;
    config.rpc.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.metrics.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.p2p.listen_addr = "/ip4/127.0.0.1/tcp/0".into();
    config.consensus.block_time_ms = 50;
    config.consensus.timeout_ms = 500;
    Node::start(dir, config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_streams_new_and_finalized_heads_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let url = format!("ws://{}", node.rpc_addr());
    let client = WsClientBuilder::default().build(&url).await.unwrap();

    let status: Value = client.request("chain_status", rpc_params![]).await.unwrap();
    assert_eq!(status["chain_id"], "keel-ws");

    let mut heads: Subscription<Value> = client
        .subscribe(
            "chain_subscribeNewHeads",
            rpc_params![],
            "chain_unsubscribeNewHeads",
        )
        .await
        .unwrap();
    let mut finalized: Subscription<Value> = client
        .subscribe(
            "chain_subscribeFinalizedHeads",
            rpc_params![],
            "chain_unsubscribeFinalizedHeads",
        )
        .await
        .unwrap();

    let a = next(&mut heads).await;
    let b = next(&mut heads).await;
    assert_eq!(
        b["height"].as_u64().unwrap(),
        a["height"].as_u64().unwrap() + 1
    );
    assert_eq!(b["parent_hash"], a["hash"]);

    let f1 = next(&mut finalized).await;
    let f2 = next(&mut finalized).await;
    assert_eq!(
        f2["height"].as_u64().unwrap(),
        f1["height"].as_u64().unwrap() + 1
    );
    let latest = node.context().tip().latest.0;
    assert!(f2["height"].as_u64().unwrap() < latest + 1);

    drop(client);
    node.shutdown().await.unwrap();
}
