//! A real single-validator node: block production on schedule, and crash recovery.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use keel_tests::{
    amount_field, transfer, u64_field, TestNode, BLOCK_TIME_MS, TEST_CHAIN_ID, VALIDATOR_FUNDS,
};
use keel_types::{Hash, Keypair};
use serde_json::json;

#[test]
fn single_validator_produces_blocks_on_schedule() {
    let mut node = TestNode::start_new().unwrap();
    let rpc = node.rpc();

    let health = rpc.get("/health").unwrap();
    assert_eq!(health.status, 200, "GET /health: {health:?}");
    health.json().unwrap();

    let status = rpc.status().unwrap();
    assert_eq!(status["chain_id"], json!(TEST_CHAIN_ID));
    let h0 = u64_field(&status, "latest_height").unwrap();
    let t0 = Instant::now();

    // Sample the tip for ~2 s: finality never lags far behind, heights never go back.
    let mut last = h0;
    while t0.elapsed() < Duration::from_millis(2_000) {
        let s = rpc.status().unwrap();
        let latest = u64_field(&s, "latest_height").unwrap();
        let finalized = u64_field(&s, "finalized_height").unwrap();
        assert!(latest >= last, "height went back from {last} to {latest}");
        assert!(
            finalized <= latest,
            "finalized {finalized} above latest {latest}"
        );
        assert!(
            latest - finalized <= 2,
            "finalized {finalized} trails latest {latest} by more than 2"
        );
        last = latest;
        thread::sleep(Duration::from_millis(100));
    }
    let h1 = rpc.latest_height().unwrap();
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    let advanced = h1 - h0;
    // ~10 blocks expected at 200 ms; generous bounds for a noisy machine. The upper bound
    // catches a node that ignores block_time_ms.
    assert!(
        (4..=15).contains(&advanced),
        "{advanced} blocks in {elapsed_ms} ms at block_time_ms = {BLOCK_TIME_MS}"
    );

    // The chain links up: every block's parent is the previous block, by height and by hash.
    let mut prev = rpc.call("chain_getBlock", json!([0])).unwrap();
    assert_eq!(prev["height"], json!(0));
    assert_eq!(prev["parent_hash"], json!(Hash::ZERO.to_string()));
    for h in 1..=h1 {
        let block = rpc.call("chain_getBlock", json!([h])).unwrap();
        assert_eq!(block["height"], json!(h));
        assert_eq!(
            block["parent_hash"],
            prev["hash"],
            "block {h}'s parent is not block {}",
            h - 1
        );
        assert!(
            block["timestamp_ms"].as_u64() >= prev["timestamp_ms"].as_u64(),
            "timestamps go back at height {h}"
        );
        assert!(block["tx_hashes"].is_array(), "block {h}: {block}");
        prev = block;
    }
    let by_hash = rpc.call("chain_getBlock", json!([prev["hash"]])).unwrap();
    assert_eq!(by_hash, prev, "block by hash differs from block by height");
    let header = rpc.header(h1).unwrap();
    assert_eq!(header["hash"], prev["hash"]);
    assert_eq!(header["state_root"], prev["state_root"]);

    node.assert_running().unwrap();
}

#[test]
fn restart_after_sigkill_keeps_height_and_state_root() {
    let mut node = TestNode::start_new().unwrap();
    let rpc = node.rpc();
    rpc.wait_for_height(3, Duration::from_secs(20)).unwrap();

    let validator = node.validator_key().unwrap();
    let recipient = Keypair::generate().address();
    let amount = 424_242;
    let tx = transfer(&validator, TEST_CHAIN_ID, 0, 1, recipient, amount);
    let hash = rpc.submit(&tx).unwrap();
    assert_eq!(hash, tx.hash);
    rpc.wait_finalized(&hash, Duration::from_secs(20)).unwrap();
    assert_eq!(rpc.balance(&recipient).unwrap(), amount);
    rpc.wait_for_height(rpc.latest_height().unwrap() + 2, Duration::from_secs(20))
        .unwrap();

    // Last look, then SIGKILL straight away: no clean shutdown, no flush.
    let before = rpc.status().unwrap();
    let height = u64_field(&before, "latest_height").unwrap();
    let finalized = u64_field(&before, "finalized_height").unwrap();
    let header = rpc.header(height).unwrap();
    node.kill();
    assert!(
        rpc.status().is_err(),
        "RPC still answers after the node was killed"
    );

    node.start().unwrap();
    // Same ports unless they were taken meanwhile and start() had to move.
    let rpc = node.rpc();
    let after = rpc.status().unwrap();
    let latest = u64_field(&after, "latest_height").unwrap();
    assert!(
        latest >= height,
        "restarted at height {latest}, below {height} seen before the kill"
    );
    assert!(
        u64_field(&after, "finalized_height").unwrap() >= finalized,
        "finalized height went back: {after} vs {before}"
    );
    let again = rpc.header(height).unwrap();
    assert_eq!(again["hash"], header["hash"], "block {height} changed");
    assert_eq!(
        again["state_root"], header["state_root"],
        "state root at {height} changed"
    );
    assert_eq!(rpc.balance(&recipient).unwrap(), amount);
    let sender = rpc.account(&validator.address()).unwrap();
    assert_eq!(sender["nonce"], json!(1));
    assert_eq!(
        amount_field(&sender, "balance").unwrap(),
        VALIDATOR_FUNDS - amount,
        "the validator pays the fee to itself"
    );
    let receipt = rpc
        .call("chain_getTransaction", json!([hash.to_string()]))
        .unwrap();
    assert_eq!(receipt["receipt"]["success"], json!(true), "{receipt}");

    // And it keeps going, on the same chain.
    let resumed = rpc
        .wait_for_height(latest + 3, Duration::from_secs(20))
        .unwrap();
    let next = rpc.header(height + 1).unwrap();
    assert_eq!(next["parent_hash"], header["hash"]);
    assert!(resumed >= latest + 3);

    // A second transaction from the same account continues its nonce sequence.
    let tx2 = transfer(&validator, TEST_CHAIN_ID, 1, 1, recipient, 1);
    rpc.submit(&tx2).unwrap();
    rpc.wait_finalized(&tx2.hash, Duration::from_secs(20))
        .unwrap();
    assert_eq!(rpc.balance(&recipient).unwrap(), amount + 1);
    node.assert_running().unwrap();
}

#[test]
fn logs_written_to_a_file_have_no_colour_codes() {
    let node = TestNode::start_new().unwrap();
    let log = std::fs::read_to_string(node.log_path()).unwrap();
    assert!(log.contains("JSON-RPC listening"), "log: {log}");
    assert!(!log.contains('\u{1b}'), "escape codes in a log file: {log}");
}
