//! Pruning on a real node (`[storage.pruning]`): a node at 20 ms blocks with a small custom
//! window serves nothing below it (`-32011` naming the earliest height), proves every retained
//! height, passes `keel db check` once stopped, and a node switched from archive to custom
//! prunes its backlog at the next start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::time::Duration;

use keel_node::config::{Config, PruningMode};
use keel_tests::{run_keel, transfer, u64_field, TestNode, TEST_CHAIN_ID};
use keel_types::Keypair;
use serde_json::{json, Value};

const KEEP: u64 = 64;
const INTERVAL: u64 = 20;
const EPOCH_LENGTH: u64 = 30;

/// A stopped node at 20 ms blocks, epochs of [`EPOCH_LENGTH`] blocks, pruning `mode`.
fn node(mode: PruningMode) -> TestNode {
    let node = TestNode::init().unwrap();
    let genesis_path = node.home().join("genesis.json");
    let mut genesis: Value =
        serde_json::from_str(&fs::read_to_string(&genesis_path).unwrap()).unwrap();
    genesis["params"]["epoch_length"] = json!(EPOCH_LENGTH.to_string());
    fs::write(
        &genesis_path,
        serde_json::to_string_pretty(&genesis).unwrap(),
    )
    .unwrap();
    set_pruning(&node, mode);
    node
}

fn set_pruning(node: &TestNode, mode: PruningMode) {
    let path = node.config_path();
    let mut config = Config::load(&path).unwrap();
    config.consensus.block_time_ms = 20;
    config.consensus.timeout_ms = 1_000;
    config.storage.pruning.mode = mode;
    config.storage.pruning.keep_recent = KEEP;
    config.storage.pruning.interval = INTERVAL;
    config.validate().unwrap();
    fs::write(&path, config.to_toml_string()).unwrap();
}

fn keel(args: &[&str]) -> String {
    let out = run_keel(args).unwrap();
    assert!(out.success(), "keel {args:?}:\n{out}");
    out.stdout
}

fn db_stats(node: &TestNode) -> Value {
    let home = node.home().to_str().unwrap();
    serde_json::from_str(&keel(&["db", "stats", "--home", home, "--json"])).unwrap()
}

#[test]
fn a_node_serves_nothing_below_its_window_and_proves_everything_in_it() {
    let mut node = node(PruningMode::Custom);
    node.start().unwrap();
    let rpc = node.rpc();
    let key: Keypair = node.validator_key().unwrap();
    let to = Keypair::from_seed(77).address();
    // A transaction in the first blocks, which will be pruned.
    let early = rpc
        .submit(&transfer(&key, TEST_CHAIN_ID, 0, 1_000, to, 5))
        .unwrap();
    rpc.wait_finalized(&early, Duration::from_secs(30)).unwrap();
    let early_height = u64_field(
        &rpc.call("chain_getTransaction", json!([early])).unwrap()["receipt"],
        "height",
    )
    .unwrap();

    // Past four prune intervals beyond the window.
    let target = early_height + KEEP + 4 * INTERVAL + 5;
    rpc.wait_for_height(target, Duration::from_secs(120))
        .unwrap();
    let mut status = rpc.status().unwrap();
    for _ in 0..100 {
        if u64_field(&status, "earliest_height").unwrap() > early_height {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        status = rpc.status().unwrap();
    }
    let earliest = u64_field(&status, "earliest_height").unwrap();
    let finalized = u64_field(&status, "finalized_height").unwrap();
    assert!(earliest > early_height, "{status}");
    assert_eq!(
        (earliest - 1) % INTERVAL,
        0,
        "prunes whole intervals: {status}"
    );
    assert!(
        finalized + 1 - earliest >= KEEP,
        "keeps the window: {status}"
    );

    // Below the window: -32011 naming the earliest height, for every kind of read.
    let below = earliest - 1;
    let addr = key.address().to_string();
    for (method, params) in [
        ("chain_getBlock", json!([1])),
        ("chain_getBlock", json!([below])),
        ("chain_getHeader", json!([below])),
        ("state_getAccount", json!([addr, below])),
        ("state_getProof", json!([addr, below])),
        ("state_getValidators", json!([below])),
    ] {
        let e = rpc.call_err(method, params.clone()).unwrap();
        assert_eq!(e.code, -32011, "{method} {params}: {e:?}");
        assert!(
            e.message.contains(&earliest.to_string()),
            "{method}: {}",
            e.message
        );
    }
    let e = rpc
        .call_err("chain_getTransaction", json!([early]))
        .unwrap();
    assert!(
        e.message.contains(&format!("from height {earliest}")),
        "{e:?}"
    );
    // Every retained height, the oldest included, proves its account state.
    for h in [
        earliest,
        earliest + 1,
        (earliest + finalized) / 2,
        finalized,
    ] {
        let out = keel(&[
            "query",
            "account",
            &addr,
            "--height",
            &h.to_string(),
            "--prove",
            "--rpc",
            &node.rpc_url(),
        ]);
        assert!(
            out.contains("\"proof_verified\": true"),
            "height {h}: {out}"
        );
        let header = rpc.call("chain_getHeader", json!([h])).unwrap();
        assert_eq!(u64_field(&header, "height").unwrap(), h);
    }

    // The pruner's metrics on the metrics listener.
    let metrics_addr = Config::load(&node.config_path())
        .unwrap()
        .metrics
        .listen_addr;
    let scrape = keel_tests::RpcClient::new(metrics_addr)
        .get("/metrics")
        .unwrap();
    let text = String::from_utf8(scrape.body).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    };
    assert!(
        value("keel_pruned_height") >= (earliest - 1) as f64,
        "{text}"
    );
    assert!(value("keel_prune_deleted_keys_total") > 0.0, "{text}");
    assert!(value("keel_prune_duration_seconds_count") >= 1.0, "{text}");
    assert!(
        value("keel_db_live_sst_bytes{cf=\"state_nodes\"}") >= 0.0,
        "{text}"
    );

    node.terminate(Duration::from_secs(10)).unwrap();
    let stats = db_stats(&node);
    assert_eq!(u64_field(&stats, "earliest_height").unwrap(), earliest);
    assert_eq!(stats["pruning_mode"], json!("custom"));
    let home = node.home().to_str().unwrap();
    let check = keel(&["db", "check", "--home", home, "--json"]);
    let check: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(u64_field(&check, "from_height").unwrap(), earliest);
    assert!(u64_field(&check, "blocks").unwrap() >= KEEP, "{check}");
    assert!(u64_field(&check, "epoch_headers").unwrap() >= 2, "{check}");
}

#[test]
fn switching_archive_to_custom_prunes_the_backlog_at_the_next_start() {
    let mut node = node(PruningMode::Archive);
    node.start().unwrap();
    let rpc = node.rpc();
    rpc.wait_for_height(KEEP + 3 * INTERVAL + 5, Duration::from_secs(120))
        .unwrap();
    assert_eq!(
        u64_field(&rpc.status().unwrap(), "earliest_height").unwrap(),
        0
    );
    node.terminate(Duration::from_secs(10)).unwrap();
    let stats = db_stats(&node);
    assert_eq!(stats["pruned_height"], Value::Null, "{stats}");
    assert!(!stats["prune_due_to"].is_null() || stats["pruning_mode"] == json!("archive"));

    set_pruning(&node, PruningMode::Custom);
    node.start().unwrap();
    let rpc = node.rpc();
    let mut earliest = 0;
    for _ in 0..100 {
        earliest = u64_field(&rpc.status().unwrap(), "earliest_height").unwrap();
        if earliest > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        earliest > 2 * INTERVAL,
        "the backlog was not pruned: earliest {earliest}"
    );
    let e = rpc.call_err("chain_getBlock", json!([1])).unwrap();
    assert_eq!(e.code, -32011, "{e:?}");

    // Back to archive: what is left stays, nothing more goes.
    node.terminate(Duration::from_secs(10)).unwrap();
    set_pruning(&node, PruningMode::Archive);
    node.start().unwrap();
    let rpc = node.rpc();
    let h = u64_field(&rpc.status().unwrap(), "finalized_height").unwrap();
    rpc.wait_for_height(h + 2 * INTERVAL, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        u64_field(&rpc.status().unwrap(), "earliest_height").unwrap(),
        earliest
    );
}

#[test]
fn keel_db_prunes_compacts_and_checks_a_stopped_node() {
    let mut node = node(PruningMode::Archive);
    node.start().unwrap();
    node.rpc()
        .wait_for_height(KEEP + 3 * INTERVAL + 5, Duration::from_secs(120))
        .unwrap();
    node.terminate(Duration::from_secs(10)).unwrap();
    let home = node.home().to_str().unwrap().to_string();
    assert_eq!(
        keel(&["db", "prune", "--home", &home]).trim(),
        "nothing to prune now"
    );

    set_pruning(&node, PruningMode::Custom);
    let before = db_stats(&node);
    let due = u64_field(&before, "prune_due_to").unwrap();
    assert_eq!(due % INTERVAL, 0, "{before}");
    let out = keel(&["db", "prune", "--home", &home]);
    assert!(out.contains(&format!("pruned heights 0..={due}")), "{out}");
    let after = db_stats(&node);
    assert_eq!(u64_field(&after, "pruned_height").unwrap(), due, "{after}");
    assert_eq!(u64_field(&after, "earliest_height").unwrap(), due + 1);
    assert!(after["prune_due_to"].is_null(), "{after}");
    let out = keel(&["db", "compact", "--home", &home]);
    assert!(out.starts_with("live table bytes: "), "{out}");
    let check: Value =
        serde_json::from_str(&keel(&["db", "check", "--home", &home, "--json"])).unwrap();
    assert_eq!(
        u64_field(&check, "from_height").unwrap(),
        due + 1,
        "{check}"
    );

    // The node starts on the pruned database and serves from the new earliest height.
    node.start().unwrap();
    let status = node.rpc().status().unwrap();
    assert_eq!(u64_field(&status, "earliest_height").unwrap(), due + 1);
    // A database in use is refused with a clear error.
    let out = run_keel(["db", "stats", "--home", home.as_str()]).unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("in use"), "{out}");
}

#[test]
fn keel_db_explains_what_it_cannot_do() {
    let node = node(PruningMode::Default);
    let home = node.home().to_str().unwrap().to_string();
    // Never started: no database yet.
    let out = run_keel(["db", "stats", "--home", home.as_str()]).unwrap();
    assert!(!out.success());
    assert!(out.stderr.contains("no database in"), "{out}");
    assert!(!out.stderr.contains("panicked"), "{out}");
    // The memory engine keeps nothing on disk.
    let path = node.config_path();
    let mut config = Config::load(&path).unwrap();
    config.storage.engine = keel_node::config::StorageEngine::Memory;
    fs::write(&path, config.to_toml_string()).unwrap();
    for cmd in ["stats", "prune", "compact", "check"] {
        let out = run_keel(["db", cmd, "--home", home.as_str()]).unwrap();
        assert!(!out.success(), "{cmd}: {out}");
        assert!(out.stderr.contains("\"memory\""), "{cmd}: {out}");
    }
}
