//! The JSON-RPC contract of DESIGN.md section 4 against a real node: transfers, Merkle proofs
//! checked offline, and error codes for bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use keel_state::{account_key, verify_proof, Account, Proof};
use keel_tests::{
    amount_field, parse_json_str, run_keel, transfer, u64_field, RpcClient, TestNode,
    TEST_CHAIN_ID, VALIDATOR_FUNDS,
};
use keel_types::{Address, Hash, Keypair};
use prost::Message;
use serde_json::{json, Value};

/// `keel keys generate --out PATH`: the printed address.
fn generate_key(path: &Path) -> Address {
    let out = run_keel(["keys", "generate", "--out", path.to_str().unwrap()]).unwrap();
    assert!(out.success(), "{out}");
    let address: Address = out.stdout.trim().parse().unwrap();
    let key = keel_node::home::read_key_file(path).unwrap();
    assert_eq!(key.address(), address, "printed address is not the key's");
    address
}

/// `keel tx transfer ... --wait`: the transaction JSON with its receipt.
fn cli_transfer(node: &TestNode, key: &Path, to: &Address, amount: u64, fee: u64) -> Value {
    let out = run_keel([
        "tx",
        "transfer",
        "--key",
        key.to_str().unwrap(),
        "--to",
        &to.to_string(),
        "--amount",
        &amount.to_string(),
        "--fee",
        &fee.to_string(),
        "--wait",
        "--rpc",
        &node.rpc_url(),
    ])
    .unwrap();
    assert!(out.success(), "keel tx transfer failed:\n{out}");
    let (first, rest) = out.stdout.split_once('\n').unwrap();
    let submitted: Hash = first.strip_prefix("submitted ").unwrap().parse().unwrap();
    let tx: Value = serde_json::from_str(rest).unwrap();
    assert_eq!(tx["hash"], json!(submitted.to_string()));
    assert_eq!(tx["status"], json!("finalized"), "{tx}");
    assert_eq!(tx["receipt"]["success"], json!(true), "{tx}");
    assert_eq!(amount_field(&tx["receipt"], "fee").unwrap(), fee);
    tx
}

/// `state_getProof` at `height` (latest if `None`), with the state root of that height's
/// header, the decoded proof and the raw value.
struct FetchedProof {
    root: Hash,
    height: u64,
    value: Option<Vec<u8>>,
    proof: Proof,
    response: Value,
}

fn get_proof(rpc: &RpcClient, address: &Address, height: Option<u64>) -> FetchedProof {
    let params = match height {
        Some(h) => json!([address.to_string(), h]),
        None => json!([address.to_string()]),
    };
    let response = rpc.call("state_getProof", params).unwrap();
    let at = u64_field(&response, "height").unwrap();
    if let Some(h) = height {
        assert_eq!(at, h);
    }
    assert_eq!(response["address"], json!(address.to_string()));
    assert_eq!(response["key"], json!(account_key(address).to_string()));
    let header = rpc.header(at).unwrap();
    let root: Hash = parse_json_str(&header["state_root"], "state_root").unwrap();
    assert_eq!(
        response["state_root"], header["state_root"],
        "proof root is not the header's state root at {at}"
    );
    let value = response["value"]
        .as_str()
        .map(|v| hex::decode(v.strip_prefix("0x").unwrap()).unwrap());
    let proof: Proof = serde_json::from_value(response["proof"].clone()).unwrap();
    FetchedProof {
        root,
        height: at,
        value,
        proof,
        response,
    }
}

fn flip(bytes: &mut [u8], i: usize) {
    bytes[i] ^= 0x01;
}

#[test]
fn transfer_moves_funds_and_proof_verifies() {
    let node = TestNode::start_new().unwrap();
    let rpc = node.rpc();
    let validator = node.validator_key().unwrap();
    assert_eq!(rpc.balance(&validator.address()).unwrap(), VALIDATOR_FUNDS);

    // Fund a second account, so the sender below is not the proposer collecting the fee.
    let alice_key = node.dir().join("alice.key");
    let alice = generate_key(&alice_key);
    let funding = 1_000_000;
    cli_transfer(&node, &node.validator_key_path(), &alice, funding, 1);

    let bob_key = node.dir().join("bob.key");
    let bob = generate_key(&bob_key);
    let (amount, fee) = (12_345, 7);
    let tx = cli_transfer(&node, &alice_key, &bob, amount, fee);
    assert_eq!(tx["from"], json!(alice.to_string()));
    assert_eq!(tx["to"], json!(bob.to_string()));
    assert_eq!(amount_field(&tx, "amount").unwrap(), amount);
    let included_at = u64_field(&tx["receipt"], "height").unwrap();

    let alice_acc = rpc.account(&alice).unwrap();
    assert_eq!(
        amount_field(&alice_acc, "balance").unwrap(),
        funding - amount - fee
    );
    assert_eq!(alice_acc["nonce"], json!(1));
    let bob_acc = rpc.account(&bob).unwrap();
    assert_eq!(amount_field(&bob_acc, "balance").unwrap(), amount);
    assert_eq!(bob_acc["nonce"], json!(0));
    // The proposer (the validator) paid its own first fee and collected Alice's.
    let val_acc = rpc.account(&validator.address()).unwrap();
    assert_eq!(
        amount_field(&val_acc, "balance").unwrap(),
        VALIDATOR_FUNDS - funding + fee
    );
    assert_eq!(val_acc["nonce"], json!(1));

    // Membership proof of Bob at the latest height, checked offline.
    let p = get_proof(&rpc, &bob, None);
    let key = account_key(&bob);
    let value = p.value.clone().expect("bob's account is in the state");
    verify_proof(&p.root, &key, Some(&value), &p.proof).unwrap();
    let decoded = Account::decode(&value).unwrap();
    assert_eq!(decoded.balance, amount);
    assert_eq!(
        amount_field(&p.response["account"], "balance").unwrap(),
        amount
    );
    assert!(
        !p.proof.siblings.is_empty(),
        "a tree of three accounts has siblings"
    );

    // Tampering with anything breaks it.
    let mut bad_value = value.clone();
    flip(&mut bad_value, value.len() - 1);
    assert!(verify_proof(&p.root, &key, Some(&bad_value), &p.proof).is_err());
    for i in 0..p.proof.siblings.len() {
        let mut bad = p.proof.clone();
        flip(&mut bad.siblings[i].0, 0);
        assert!(
            verify_proof(&p.root, &key, Some(&value), &bad).is_err(),
            "flipped sibling {i} still verifies"
        );
    }
    let mut bad_root = p.root;
    flip(&mut bad_root.0, 31);
    assert!(verify_proof(&bad_root, &key, Some(&value), &p.proof).is_err());
    assert!(
        verify_proof(&p.root, &key, None, &p.proof).is_err(),
        "a membership proof must not pass as absence"
    );
    assert!(
        verify_proof(&p.root, &account_key(&alice), Some(&value), &p.proof).is_err(),
        "a proof for Bob must not prove Alice"
    );

    // Non-membership: an address never used, and Bob just before the transfer landed.
    let nobody = Keypair::generate().address();
    let absent = get_proof(&rpc, &nobody, Some(p.height));
    assert!(absent.value.is_none());
    assert!(absent.response["account"].is_null());
    verify_proof(&absent.root, &account_key(&nobody), None, &absent.proof).unwrap();
    assert!(
        verify_proof(
            &absent.root,
            &account_key(&nobody),
            Some(&value),
            &absent.proof
        )
        .is_err(),
        "an absence proof must not prove a value"
    );
    let earlier = get_proof(&rpc, &bob, Some(included_at - 1));
    assert!(
        earlier.value.is_none(),
        "bob existed before the transfer: {}",
        earlier.response
    );
    verify_proof(&earlier.root, &key, None, &earlier.proof).unwrap();
    let at_inclusion = get_proof(&rpc, &bob, Some(included_at));
    verify_proof(
        &at_inclusion.root,
        &key,
        Some(&at_inclusion.value.clone().unwrap()),
        &at_inclusion.proof,
    )
    .unwrap();

    // The CLI does the same check.
    let out = run_keel([
        "query",
        "account",
        &bob.to_string(),
        "--prove",
        "--rpc",
        &node.rpc_url(),
    ])
    .unwrap();
    assert!(out.success(), "{out}");
    let shown: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(shown["proof_verified"], json!(true), "{out}");
    assert_eq!(amount_field(&shown["account"], "balance").unwrap(), amount);
}

/// A JSON-RPC error with `code`, else a panic showing what came back.
fn expect_code(got: anyhow::Result<keel_tests::RpcError>, code: i64, what: &str) -> String {
    let e = got.unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert_eq!(e.code, code, "{what}: {e}");
    e.message
}

fn raw_error(rpc: &RpcClient, body: &[u8]) -> (u16, i64) {
    let resp = rpc.post_raw(body).unwrap();
    let v = resp.json().unwrap();
    let code = v["error"]["code"].as_i64().unwrap_or_else(|| {
        panic!(
            "no JSON-RPC error for {:?}: {v}",
            String::from_utf8_lossy(body)
        )
    });
    (resp.status, code)
}

#[test]
fn bad_input_gets_json_rpc_errors_and_node_survives() {
    let mut node = TestNode::start_new().unwrap();
    let rpc = node.rpc();
    let start_height = rpc.latest_height().unwrap();
    let validator = node.validator_key().unwrap();
    let bob = Keypair::generate().address();

    // Transport-level garbage.
    assert_eq!(raw_error(&rpc, b"{\"jsonrpc\":\"2.0\",\"id\":1,").1, -32700);
    assert_eq!(raw_error(&rpc, b"not json at all").1, -32700);
    assert_eq!(
        raw_error(&rpc, br#"{"jsonrpc":"2.0","id":1,"method":42}"#).1,
        -32600
    );

    // Method and params.
    expect_code(
        rpc.call_err("no_such_method", json!([])),
        -32601,
        "unknown method",
    );
    let msg = expect_code(
        rpc.call_err("tx_submit", json!(["0xnothex"])),
        -32602,
        "bad hex",
    );
    assert!(msg.contains("tx"), "message should name the field: {msg}");
    expect_code(
        rpc.call_err("tx_submit", json!(["0xdeadbeef00ff"])),
        -32602,
        "garbage bytes",
    );
    expect_code(rpc.call_err("tx_submit", json!([])), -32602, "missing tx");
    expect_code(
        rpc.call_err("state_getAccount", json!(["0x12"])),
        -32602,
        "short address",
    );
    expect_code(
        rpc.call_err("chain_getBlock", json!([1_000_000_000u64])),
        -32010,
        "block far ahead",
    );

    // Well-formed transactions the node must refuse.
    let good = transfer(&validator, TEST_CHAIN_ID, 0, 1, bob, 5);
    let mut signed = keel_types::proto::SignedTx::decode(good.bytes.as_slice()).unwrap();
    signed.signature[0] ^= 0x01;
    let forged = format!("0x{}", hex::encode(signed.encode_to_vec()));
    expect_code(
        rpc.call_err("tx_submit", json!([forged])),
        -32001,
        "bad signature",
    );
    let far_nonce = transfer(&validator, TEST_CHAIN_ID, 1_000, 1, bob, 5);
    expect_code(
        rpc.call_err(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&far_nonce.bytes))]),
        ),
        -32002,
        "nonce far ahead",
    );
    let pauper = Keypair::generate();
    let broke = transfer(&pauper, TEST_CHAIN_ID, 0, 1, bob, 5);
    expect_code(
        rpc.call_err(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&broke.bytes))]),
        ),
        -32003,
        "insufficient funds",
    );
    let wrong_chain = transfer(&validator, "another-chain", 0, 1, bob, 5);
    expect_code(
        rpc.call_err(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&wrong_chain.bytes))]),
        ),
        -32006,
        "wrong chain",
    );

    // A body over max_request_bytes (1 MiB) is refused, not served and not fatal.
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tx_submit","params":["0x{}"]}}"#,
        "ab".repeat(600 * 1024)
    );
    assert!(huge.len() > 1024 * 1024);
    match rpc.post_raw(huge.as_bytes()) {
        Ok(resp) => {
            let v = resp.json().ok();
            let refused =
                resp.status >= 400 || v.as_ref().is_some_and(|v| v.get("error").is_some());
            assert!(
                refused,
                "oversized request was served: HTTP {} {v:?}",
                resp.status
            );
        }
        // Closing the connection on an oversized body is acceptable too.
        Err(e) => eprintln!("oversized request: connection closed ({e:#})"),
    }

    // The good transaction still goes through, the node is alive and the chain moves.
    let hash = rpc.submit(&good).unwrap();
    expect_code(
        rpc.call_err(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&good.bytes))]),
        ),
        -32007,
        "duplicate",
    );
    rpc.wait_finalized(&hash, Duration::from_secs(20)).unwrap();
    let stale = transfer(&validator, TEST_CHAIN_ID, 0, 2, bob, 6);
    expect_code(
        rpc.call_err(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&stale.bytes))]),
        ),
        -32002,
        "nonce already used",
    );
    node.assert_running().unwrap();
    let h = rpc.latest_height().unwrap();
    assert!(
        h > start_height,
        "no block since the start at {start_height}"
    );
    rpc.wait_for_height(h + 2, Duration::from_secs(20)).unwrap();
    assert_eq!(rpc.balance(&bob).unwrap(), 5);
    node.assert_running().unwrap();
}
