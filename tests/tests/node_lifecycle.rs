//! A real single-validator node: block production on schedule, and crash recovery.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use keel_tests::{
    amount_field, transfer, u64_field, TestNode, BLOCK_TIME_MS, TEST_CHAIN_ID, VALIDATOR_FUNDS,
};
use keel_types::{Hash, Keypair, Transaction, TxKind};
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

/// Epochs on a real node: a bond takes effect at the next epoch boundary (not before), the
/// header names the new set, `state_getValidators` answers per height, and a restart keeps
/// the epoch and its set.
#[test]
fn a_bond_joins_the_validator_set_at_the_next_epoch_and_survives_a_restart() {
    const EPOCH_LENGTH: u64 = 4;
    let mut node = TestNode::init().unwrap();
    let genesis_path = node.home().join("genesis.json");
    let mut genesis: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&genesis_path).unwrap()).unwrap();
    genesis["params"]["epoch_length"] = json!(EPOCH_LENGTH.to_string());
    std::fs::write(&genesis_path, genesis.to_string()).unwrap();
    node.start().unwrap();
    let rpc = node.rpc();

    let validator = node.validator_key().unwrap();
    let bonder = Keypair::generate();
    let fund = transfer(&validator, TEST_CHAIN_ID, 0, 1, bonder.address(), 50_000);
    rpc.submit(&fund).unwrap();
    rpc.wait_finalized(&fund.hash, Duration::from_secs(30))
        .unwrap();
    let stake = 1_000;
    let bond = Transaction::sign(&bonder, TEST_CHAIN_ID, 0, 1, TxKind::Bond { amount: stake });
    rpc.submit(&bond).unwrap();
    rpc.wait_finalized(&bond.hash, Duration::from_secs(30))
        .unwrap();
    let bonded_at = u64_field(
        &rpc.call("chain_getTransaction", json!([bond.hash.to_string()]))
            .unwrap()["receipt"],
        "height",
    )
    .unwrap();
    // The block at `bonded_at` is in epoch (bonded_at - 1) / L; the next epoch starts at the
    // block after the epoch's last, `boundary`.
    let epoch = (bonded_at - 1) / EPOCH_LENGTH + 1;
    let boundary = epoch * EPOCH_LENGTH;
    wait_finalized_height(&rpc, boundary + 2);

    let members = |height: u64| -> Vec<String> {
        let set = rpc.call("state_getValidators", json!([height])).unwrap();
        set.as_array()
            .unwrap()
            .iter()
            .map(|v| v["address"].as_str().unwrap().to_string())
            .collect()
    };
    let me = validator.address().to_string();
    let them = bonder.address().to_string();
    assert_eq!(
        members(bonded_at),
        vec![me.clone()],
        "the bond applied in its own epoch"
    );
    assert_eq!(
        members(boundary),
        vec![me.clone()],
        "the bond applied before the boundary"
    );
    let mut next = members(boundary + 1);
    next.sort();
    let mut want = vec![me.clone(), them.clone()];
    want.sort();
    assert_eq!(next, want, "the bond did not apply at the next epoch");
    let set = rpc
        .call("state_getValidators", json!([boundary + 1]))
        .unwrap();
    let entry = set
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["address"] == json!(them))
        .unwrap();
    assert_eq!(amount_field(entry, "stake").unwrap(), stake);

    let last = rpc.header(boundary).unwrap();
    let first = rpc.header(boundary + 1).unwrap();
    assert_eq!(last["epoch"], json!(epoch - 1));
    assert_eq!(first["epoch"], json!(epoch));
    assert_eq!(
        first["parent_hash"], last["hash"],
        "the new epoch extends the end block"
    );
    assert_ne!(
        first["validators_hash"], last["validators_hash"],
        "the header does not name the new set"
    );
    let status = rpc.status().unwrap();
    assert!(u64_field(&status, "epoch").unwrap() >= epoch, "{status}");

    // A restart resumes in the right epoch with the right set (from the state, not genesis).
    node.kill();
    node.start().unwrap();
    let rpc = node.rpc();
    let height = rpc.latest_height().unwrap();
    rpc.wait_for_height(height + 3, Duration::from_secs(30))
        .unwrap();
    let mut now = rpc
        .call("state_getValidators", json!([]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["address"].as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    now.sort();
    assert_eq!(now, want);
    node.assert_running().unwrap();
}

fn wait_finalized_height(rpc: &keel_tests::RpcClient, height: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = rpc.status().unwrap();
        if u64_field(&status, "finalized_height").unwrap() >= height {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "finalized height did not reach {height}: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
