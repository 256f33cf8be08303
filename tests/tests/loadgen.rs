//! `keel loadgen` against a real node (DESIGN.md section 4): its counts add up, its `final`
//! count is what the chain holds, its latency figures are ordered, and bad input is one
//! `error:` line and a non-zero exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use keel_tests::{check_one_line_error, closed_addr, run_keel_with, u64_field, TestNode};
use serde_json::{json, Value};

/// Sending accounts of the run.
const ACCOUNTS: usize = 20;

#[test]
fn loadgen_final_count_matches_the_chain() {
    final_count_matches_the_chain(10, &[]);
}

#[test]
fn loadgen_in_json_rpc_batches_final_count_matches_the_chain() {
    final_count_matches_the_chain(6, &["--batch", "25"]);
}

/// Runs loadgen at 200 tx/s for `seconds` with `extra` flags against a new one-validator
/// node and checks its report against itself and against the blocks fetched over RPC.
fn final_count_matches_the_chain(seconds: u64, extra: &[&str]) {
    let node = TestNode::start_new().unwrap();
    let key = node.validator_key_path();
    let (rpc_url, accounts, duration) = (node.rpc_url(), ACCOUNTS.to_string(), seconds.to_string());
    let mut argv = vec![
        "loadgen",
        "--rpc",
        &rpc_url,
        "--key",
        key.to_str().unwrap(),
        "--tps",
        "200",
        "--duration",
        &duration,
        "--accounts",
        &accounts,
        "--json",
    ];
    argv.extend_from_slice(extra);
    let out = run_keel_with(argv, &[], Duration::from_secs(90)).unwrap();
    assert!(out.success(), "{out}");
    let report: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{out}"));

    let field = |name: &str| u64_field(&report, name).unwrap();
    let (submitted, accepted, rejected, final_count) = (
        field("submitted"),
        field("accepted"),
        field("rejected"),
        field("final"),
    );
    assert!(submitted > 0, "{report:#}");
    assert_eq!(accepted, submitted - rejected, "{report:#}");
    assert!(final_count <= accepted, "{report:#}");
    assert!(final_count > 0, "nothing became final: {report:#}");
    assert_eq!(field("not_final"), accepted - final_count, "{report:#}");
    let by_reason: u64 = report["rejected_by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(by_reason, rejected, "{report:#}");
    assert!(report["achieved_tps"].as_f64().unwrap() > 0.0, "{report:#}");

    let latency = &report["latency_ms"];
    let q = |name: &str| {
        latency[name]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ms.{name} missing: {report:#}"))
    };
    assert!(q("p50") > 0.0, "{report:#}");
    assert!(q("p50") <= q("p95") && q("p95") <= q("p99"), "{report:#}");
    assert!(q("p99") <= q("max"), "{report:#}");

    // Every transfer from a sending account in the blocks loadgen scanned is one it counted
    // final. The funding transfers come from the validator's account and are left out.
    let validator = node.validator_key().unwrap().address().to_string();
    let last_height = field("last_height");
    let rpc = node.rpc();
    let mut on_chain = 0u64;
    let mut senders = HashSet::new();
    for height in 1..=last_height {
        let block = rpc.call("chain_getBlock", json!([height, true])).unwrap();
        for tx in block["txs"].as_array().unwrap() {
            let from = tx["from"].as_str().unwrap();
            if from != validator && tx["type"] == "transfer" {
                on_chain += 1;
                senders.insert(from.to_string());
            }
        }
    }
    assert_eq!(
        on_chain, final_count,
        "transfers on chain up to height {last_height} vs loadgen's final count: {report:#}"
    );
    assert_eq!(senders.len(), ACCOUNTS, "{report:#}");
}

#[test]
fn loadgen_bad_input_is_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("funder.key");
    let out = run_keel_with(
        ["keys", "generate", "--out", key.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.success(), "{out}");
    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "not a key\n").unwrap();
    let closed = format!("http://{}", closed_addr());
    let key = key.to_str().unwrap().to_string();

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "nothing listens at --rpc",
            vec!["--rpc".into(), closed.clone(), "--key".into(), key.clone()],
            "cannot reach",
        ),
        (
            "--rpc is not a URL",
            vec![
                "--rpc".into(),
                "localhost".into(),
                "--key".into(),
                key.clone(),
            ],
            "localhost",
        ),
        (
            "the key file holds no key",
            vec![
                "--rpc".into(),
                closed.clone(),
                "--key".into(),
                bad_key.to_str().unwrap().into(),
            ],
            "bad.key",
        ),
        (
            "the key file is missing",
            vec![
                "--rpc".into(),
                closed.clone(),
                "--key".into(),
                dir.path().join("none.key").to_str().unwrap().into(),
            ],
            "none.key",
        ),
    ];
    for (what, args, needle) in cases {
        let mut argv = vec!["loadgen".to_string()];
        argv.extend(args);
        argv.extend(["--tps", "10", "--duration", "1", "--json"].map(String::from));
        let out = run_keel_with(&argv, &[], Duration::from_secs(30)).unwrap();
        check_one_line_error(&out).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert!(
            out.stderr.contains(needle),
            "{what}: stderr does not mention {needle:?}:\n{out}"
        );
        assert!(out.stdout.is_empty(), "{what}: printed a report:\n{out}");
    }

    for (flag, value, needle) in [
        ("--tps", "0", "--tps"),
        ("--tps", "inf", "--tps"),
        ("--duration", "0", "--duration"),
        ("--accounts", "0", "--accounts"),
        ("--batch", "0", "--batch"),
        ("--batch", "1001", "--batch"),
    ] {
        let mut argv: Vec<String> = ["loadgen", "--rpc", &closed, "--key", &key]
            .map(String::from)
            .to_vec();
        for (f, v) in [("--tps", "10"), ("--duration", "1"), (flag, value)] {
            if f == flag && v != value {
                continue;
            }
            argv.extend([f.to_string(), v.to_string()]);
        }
        let out = run_keel_with(&argv, &[], Duration::from_secs(30)).unwrap();
        assert!(!out.success(), "{flag} {value}: {out}");
        assert!(
            out.stderr.contains(needle) && !out.stderr.contains("panicked"),
            "{flag} {value}: {out}"
        );
    }
}
