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

#[test]
fn state_genesis_and_consensus_build_without_rocksdb() {
    for package in ["keel-state", "keel-genesis", "keel-consensus"] {
        assert_free_of(package, &["rocksdb", "librocksdb-sys"]);
    }
}

/// The module paths (`a` or `a::b`) that `source`'s code (not its tests, not its comments)
/// names with `crate::`.
fn crate_imports(source: &str) -> Vec<Vec<String>> {
    let code = source.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let path: Vec<String> = rest
                .split("::")
                .map(|seg| {
                    seg.chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|seg| !seg.is_empty())
                .take(2)
                .collect();
            if !path.is_empty() {
                out.push(path);
            }
        }
    }
    out
}

/// No two files of the node crate import each other, directly or through others (the
/// re-cut removed app <-> driver <-> network, chain <-> metrics and config <-> mempool).
#[test]
fn node_files_import_each_other_in_one_direction_only() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../node/src"));
    // Module path (`host`, `net`, `net::libp2p`) -> source.
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("node/src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let module = rel
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .filter(|c| c != "mod")
                .collect::<Vec<_>>()
                .join("::");
            files.insert(module, std::fs::read_to_string(&path).expect("read source"));
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, source) in &files {
        let targets = graph.entry(module.clone()).or_default();
        for path in crate_imports(source) {
            let long = path.join("::");
            let target = if files.contains_key(&long) {
                long
            } else {
                path[0].clone()
            };
            if target != *module && files.contains_key(&target) {
                targets.insert(target);
            }
        }
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == node) {
            panic!(
                "import cycle in node/src: {} -> {node}",
                path[at..].join(" -> ")
            );
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    assert!(graph.len() > 10, "read too few files: {graph:?}");
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done);
    }
}
