//! Light-client proofs on a real node (docs/light-client.md): `keel query account --prove`
//! walks the epoch changes from genesis (or a checkpoint) across a validator-set change,
//! proves heights final (the newest one too) and refuses forged epoch changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use keel_node::light::{verify_epoch_change, EpochChange};
use keel_node::{Keypair, Transaction, TxKind};
use keel_tests::{run_keel, transfer, u64_field, TestNode, TEST_CHAIN_ID};
use serde_json::{json, Value};

const EPOCH_LENGTH: u64 = 4;

fn wait_finalized_height(node: &TestNode, height: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while u64_field(&node.rpc().status().unwrap(), "finalized_height").unwrap() < height {
        assert!(
            Instant::now() < deadline,
            "height {height} not final within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn prove(node: &TestNode, extra: &[&str]) -> Result<Value, String> {
    let url = node.rpc_url();
    let mut args = vec!["query", "account"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--prove", "--rpc", url.as_str()]);
    let out = run_keel(&args).unwrap();
    if out.success() {
        Ok(serde_json::from_str(&out.stdout).expect("--prove prints JSON"))
    } else {
        Err(out.stderr)
    }
}

#[test]
fn proofs_walk_epoch_changes_from_genesis_and_refuse_forgeries() {
    let mut node = TestNode::init().unwrap();
    let genesis_path = node.home().join("genesis.json");
    let mut genesis: Value =
        serde_json::from_str(&std::fs::read_to_string(&genesis_path).unwrap()).unwrap();
    genesis["params"]["epoch_length"] = json!(EPOCH_LENGTH.to_string());
    std::fs::write(&genesis_path, genesis.to_string()).unwrap();
    node.start().unwrap();
    let rpc = node.rpc();
    let genesis_arg = genesis_path.to_str().unwrap().to_string();

    // A second validator bonds: the set changes at the next epoch boundary.
    let validator = node.validator_key().unwrap();
    let bonder = Keypair::generate();
    let fund = transfer(&validator, TEST_CHAIN_ID, 0, 1, bonder.address(), 50_000);
    rpc.submit(&fund).unwrap();
    rpc.wait_finalized(&fund.hash, Duration::from_secs(30))
        .unwrap();
    let bond = Transaction::sign(&bonder, TEST_CHAIN_ID, 0, 1, TxKind::Bond { amount: 1_000 });
    rpc.submit(&bond).unwrap();
    rpc.wait_finalized(&bond.hash, Duration::from_secs(30))
        .unwrap();
    let bonded_at = u64_field(
        &rpc.call("chain_getTransaction", json!([bond.hash.to_string()]))
            .unwrap()["receipt"],
        "height",
    )
    .unwrap();
    let joined = (bonded_at - 1) / EPOCH_LENGTH + 1;
    wait_finalized_height(&node, (joined + 2) * EPOCH_LENGTH + 2);

    // From genesis, at the newest final height (its certificate is consensus's commit QC).
    let bonder_addr = bonder.address().to_string();
    let proved = prove(&node, &[&bonder_addr, "--genesis", &genesis_arg]).unwrap();
    assert_eq!(proved["proof_verified"], json!(true), "{proved}");
    let epoch = proved["epoch"].as_u64().unwrap();
    assert!(epoch > joined, "{proved}");
    let steps: Vec<String> = proved["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    // One trust step, one per epoch change, finality, the account.
    assert_eq!(steps.len() as u64, 1 + epoch + 2, "{steps:#?}");
    let change_step = steps
        .iter()
        .find(|s| s.starts_with(&format!("ok: epoch {joined}:")))
        .unwrap_or_else(|| panic!("no step for epoch {joined}: {steps:#?}"));
    assert!(change_step.contains("2 validators"), "{change_step}");
    assert_eq!(proved["account"]["stake"], json!("1000"), "{proved}");

    // An older height, in the epoch before the change.
    let old = (joined - 1) * EPOCH_LENGTH + 1;
    let proved = prove(
        &node,
        &[
            &bonder_addr,
            "--height",
            &old.to_string(),
            "--genesis",
            &genesis_arg,
        ],
    )
    .unwrap();
    assert_eq!(proved["height"], json!(old));
    assert_eq!(proved["account"]["stake"], json!("0"), "{proved}");

    // From a checkpoint: the right hash walks from there; a wrong one is refused.
    let change: EpochChange =
        serde_json::from_value(rpc.call("chain_getEpochChange", json!([joined])).unwrap()).unwrap();
    let checkpoint = format!("{joined}:{}", change.validators_hash);
    let proved = prove(&node, &[&bonder_addr, "--trust", &checkpoint]).unwrap();
    let walked = proved["steps"].as_array().unwrap().len() as u64;
    assert_eq!(walked, 1 + (proved["epoch"].as_u64().unwrap() - joined) + 2);
    let wrong = format!("{joined}:0x{}", "ab".repeat(32));
    let refused = prove(&node, &[&bonder_addr, "--trust", &wrong]).unwrap_err();
    assert!(refused.contains("checkpoint"), "{refused}");

    // Forged epoch changes fail verification.
    let previous_members: Vec<keel_node::light::SetMember> = if joined == 1 {
        // Epoch 0: genesis's set (the node's word is enough for this check).
        serde_json::from_value(rpc.call("state_getValidators", json!([1])).unwrap()).unwrap()
    } else {
        serde_json::from_value::<EpochChange>(
            rpc.call("chain_getEpochChange", json!([joined - 1]))
                .unwrap(),
        )
        .unwrap()
        .validators
    };
    let previous = keel_node::light::set_from_members(&previous_members).unwrap();
    verify_epoch_change(&change, TEST_CHAIN_ID, EPOCH_LENGTH, &previous).unwrap();

    let mut hidden = change.clone();
    hidden.accounts.pop();
    let e = verify_epoch_change(&hidden, TEST_CHAIN_ID, EPOCH_LENGTH, &previous).unwrap_err();
    assert!(e.contains("accounts proven"), "{e}");

    let mut inflated = change.clone();
    let bonder_entry = inflated
        .accounts
        .iter_mut()
        .find(|a| a.address == bonder.address())
        .unwrap();
    let mut account = keel_node::light::decode_account(bonder_entry)
        .unwrap()
        .unwrap();
    account.stake *= 1_000;
    bonder_entry.proven.value = Some(keel_node::rpc::types::HexBytes(account.encode()));
    let e = verify_epoch_change(&inflated, TEST_CHAIN_ID, EPOCH_LENGTH, &previous).unwrap_err();
    assert!(e.contains("account"), "{e}");

    let mut renamed = change.clone();
    renamed.validators_hash = keel_node::Hash::digest(b"another set");
    let e = verify_epoch_change(&renamed, TEST_CHAIN_ID, EPOCH_LENGTH, &previous).unwrap_err();
    assert!(e.contains("gives a set"), "{e}");

    let e = verify_epoch_change(&change, "another-chain", EPOCH_LENGTH, &previous).unwrap_err();
    assert!(e.contains("chain"), "{e}");

    // The same proofs from the CLI, and any method through `keel query rpc`.
    let url = node.rpc_url();
    let cli = |args: &[&str]| -> Value {
        let mut all = vec!["query"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--rpc", url.as_str()]);
        let out = run_keel(&all).unwrap();
        assert!(out.success(), "keel {all:?}: {out}");
        serde_json::from_str(&out.stdout).unwrap()
    };
    let finality = cli(&["finality", "3"]);
    assert_eq!(finality["height"], json!(3), "{finality}");
    let by_cli = cli(&["epoch-change", &joined.to_string()]);
    assert_eq!(
        by_cli["validators_hash"],
        json!(change.validators_hash.to_string())
    );
    let status = cli(&["rpc", "chain_status"]);
    assert_eq!(status["chain_id"], json!(TEST_CHAIN_ID));
    let named = cli(&[
        "rpc",
        "state_getAccount",
        &json!({"address": bonder_addr, "height": old}).to_string(),
    ]);
    assert_eq!(named["stake"], json!("0"), "{named}");
    let bad = run_keel(["query", "rpc", "chain_status", "[1,", "--rpc", url.as_str()]).unwrap();
    assert!(!bad.success() && bad.stderr.contains("not JSON"), "{bad}");

    // Epochs not started yet, and genesis, are clear errors.
    let future = rpc
        .call_err("chain_getEpochChange", json!([epoch + 100]))
        .unwrap();
    assert!(future.message.contains("has not started"), "{future:?}");
    let at_genesis = prove(&node, &[&bonder_addr, "--height", "0"]).unwrap_err();
    assert!(at_genesis.contains("genesis"), "{at_genesis}");
}
