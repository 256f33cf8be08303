//! The `keel` binary's failure contract (DESIGN.md section 4): errors are one `error:` line
//! and a non-zero exit, never a panic; bad configuration is refused at start, naming the key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::time::Duration;

use keel_tests::{check_one_line_error, closed_addr, run_keel, run_keel_with};

#[test]
fn cli_errors_are_one_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let empty_home = dir.path().join("empty");
    fs::create_dir(&empty_home).unwrap();
    let existing = dir.path().join("existing.key");
    let out = run_keel(["keys", "generate", "--out", existing.to_str().unwrap()]).unwrap();
    assert!(out.success(), "{out}");
    let closed = format!("http://{}", closed_addr());
    let valid_addr = format!("0x{}", "11".repeat(20));

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "status against a closed port",
            vec!["status".into(), "--rpc".into(), closed.clone()],
            "cannot reach",
        ),
        (
            "query with a short address",
            vec![
                "query".into(),
                "account".into(),
                "0x12".into(),
                "--rpc".into(),
                closed.clone(),
            ],
            "0x12",
        ),
        (
            "query against a closed port",
            vec![
                "query".into(),
                "account".into(),
                valid_addr.clone(),
                "--prove".into(),
                "--rpc".into(),
                closed.clone(),
            ],
            "cannot reach",
        ),
        (
            "start on an empty home",
            vec![
                "start".into(),
                "--home".into(),
                empty_home.to_str().unwrap().into(),
            ],
            "config",
        ),
        (
            "keys show on an empty home",
            vec![
                "keys".into(),
                "show".into(),
                "--home".into(),
                empty_home.to_str().unwrap().into(),
            ],
            "validator.key",
        ),
        (
            "key file never overwritten",
            vec![
                "keys".into(),
                "generate".into(),
                "--out".into(),
                existing.to_str().unwrap().into(),
            ],
            "existing.key",
        ),
        (
            "transfer with a missing key file",
            vec![
                "tx".into(),
                "transfer".into(),
                "--key".into(),
                dir.path().join("nope.key").to_str().unwrap().into(),
                "--to".into(),
                valid_addr.clone(),
                "--amount".into(),
                "1".into(),
                "--rpc".into(),
                closed.clone(),
            ],
            "nope.key",
        ),
        (
            "transfer to a malformed address",
            vec![
                "tx".into(),
                "transfer".into(),
                "--key".into(),
                existing.to_str().unwrap().into(),
                "--to".into(),
                "0xzz".into(),
                "--amount".into(),
                "1".into(),
                "--rpc".into(),
                closed.clone(),
            ],
            "--to",
        ),
    ];
    let mut failures = Vec::new();
    for (what, args, needle) in &cases {
        let out = run_keel_with(args, &[("RUST_BACKTRACE", "1")], Duration::from_secs(60)).unwrap();
        if let Err(e) = check_one_line_error(&out) {
            failures.push(format!("{what}: {e:#}"));
        } else if !out.stderr.contains(needle) {
            failures.push(format!(
                "{what}: stderr does not mention {needle:?}:\n{out}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// (config.toml text, extra environment, what the error must name)
type BadConfig = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn config_refuses_unknown_keys_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let out = run_keel(["init", "--home", home.to_str().unwrap()]).unwrap();
    assert!(out.success(), "{out}");
    let config = home.join("config.toml");

    let cases: &[BadConfig] = &[
        ("[rpc]\nlisten_adr = \"x\"\n", &[], "rpc.listen_adr"),
        ("moniker = \"n\"\ncolour = \"blue\"\n", &[], "colour"),
        (
            "[storage.rocksdb]\nblock_cache = \"1GiB\"\n",
            &[],
            "storage.rocksdb.block_cache",
        ),
        (
            "[consensus]\nblock_time_ms = \"fast\"\n",
            &[],
            "consensus.block_time_ms",
        ),
        (
            "[consensus]\nblock_time_ms = 5000\ntimeout_ms = 1000\n",
            &[],
            "consensus.",
        ),
        (
            "",
            &[("KEEL_CONSENSUS_TIMEOUT_MS", "soon")],
            "KEEL_CONSENSUS_TIMEOUT_MS",
        ),
    ];
    let mut failures = Vec::new();
    for (text, env, key) in cases {
        fs::write(&config, text).unwrap();
        // A node that wrongly accepted the file would run until the deadline kills it.
        let result = run_keel_with(
            ["start", "--home", home.to_str().unwrap()],
            env,
            Duration::from_secs(20),
        );
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                failures.push(format!("{text:?} {env:?}: the node started: {e:#}"));
                continue;
            }
        };
        if let Err(e) = check_one_line_error(&out) {
            failures.push(format!("{text:?} {env:?}: {e:#}"));
        } else if !out.stderr.contains(key) {
            failures.push(format!(
                "{text:?} {env:?}: error does not name {key:?}:\n{out}"
            ));
        }
    }
    assert!(
        !home.join("data").exists(),
        "a refused config must not create a database"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Whether some `: `-separated part of an error line is immediately repeated, as when an
/// error prints its source and also returns it as `source()`.
fn repeats_a_cause(line: &str) -> bool {
    let parts: Vec<&str> = line.split(": ").collect();
    parts.windows(2).any(|w| w[0] == w[1])
}

#[test]
fn cli_errors_do_not_repeat_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    let missing_key = dir.path().join("nope.key");
    let cases = [
        vec!["start", "--home", home],
        vec!["keys", "show", "--home", home],
        vec![
            "tx",
            "transfer",
            "--key",
            missing_key.to_str().unwrap(),
            "--to",
            "0x1111111111111111111111111111111111111111",
            "--amount",
            "1",
        ],
    ];
    let mut failures = Vec::new();
    for args in &cases {
        let out = run_keel(args).unwrap();
        check_one_line_error(&out).unwrap();
        if repeats_a_cause(out.stderr.trim_end()) {
            failures.push(format!(
                "keel {}: {}",
                args.join(" "),
                out.stderr.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
