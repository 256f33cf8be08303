//! Crate boundaries of DESIGN.md: the pure crates' normal dependency trees stay free of the
//! runtime, storage engine and network stack.

#![allow(clippy::expect_used)]

use std::process::Command;

/// The packages of `package`'s normal dependency tree (itself included), down to `depth`
/// levels (`None`: all of them).
fn normal_deps_to(package: &str, depth: Option<u32>) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args: Vec<String> = [
        "tree",
        "--offline",
        "-p",
        package,
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]
    .map(String::from)
    .into();
    if let Some(depth) = depth {
        args.extend(["--depth".to_string(), depth.to_string()]);
    }
    let out = Command::new(cargo)
        .args(&args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn normal_deps(package: &str) -> Vec<String> {
    normal_deps_to(package, None)
}

fn assert_free_of(package: &str, forbidden: &[&str]) {
    let deps = normal_deps(package);
    assert!(
        deps.iter().any(|d| d == package),
        "cargo tree listed nothing for {package}: {deps:?}"
    );
    for f in forbidden {
        assert!(
            !deps
                .iter()
                .any(|d| d == f || d.starts_with(&format!("{f}-"))),
            "{package} depends on {f}: {deps:?}"
        );
    }
}

#[test]
fn consensus_depends_on_no_runtime_storage_or_network() {
    assert_free_of(
        "keel-consensus",
        &[
            "tokio",
            "rocksdb",
            "librocksdb-sys",
            "libp2p",
            "keel-storage",
            "keel-p2p",
        ],
    );
}

#[test]
fn types_and_p2p_boundaries_hold() {
    assert_free_of(
        "keel-types",
        &["tokio", "rocksdb", "librocksdb-sys", "libp2p"],
    );
    // p2p runs libp2p on tokio, and of keel knows only the wire types (DESIGN.md section 1).
    assert_free_of(
        "keel-p2p",
        &[
            "rocksdb",
            "librocksdb-sys",
            "keel-storage",
            "keel-state",
            "keel-consensus",
            "keel-node",
        ],
    );
    assert_free_of("keel-storage", &["tokio", "libp2p"]);
}

/// The binary sits on the node and genesis only (DESIGN.md section 1): protocol types, proof
/// checking and the `keel bench` workloads reach it through keel-node's re-exports.
#[test]
fn cli_depends_among_keel_crates_on_node_and_genesis_only() {
    let mut keel: Vec<String> = normal_deps_to("keel-cli", Some(1))
        .into_iter()
        .filter(|d| d.starts_with("keel-") && d != "keel-cli")
        .collect();
    keel.sort();
    keel.dedup();
    assert_eq!(keel, ["keel-genesis", "keel-node"]);
}
