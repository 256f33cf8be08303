//! The independent Python client of `clients/python` (written from docs/transactions.md,
//! docs/rpc.md, keel.proto and state/README.md only, standard library only) against a real
//! single-validator node: worked examples byte for byte, transfers signed and hashed by the
//! client, balances, state proofs checked against headers, header hashes and certificates,
//! and documented error codes for hostile parameters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_tests::{drain, ChildGuard, TestNode};

/// How long the whole client run may take (it needs a few seconds on a 200 ms chain).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// The Python interpreter: `$PYTHON` if set, else `python3`.
fn python() -> OsString {
    std::env::var_os("PYTHON").unwrap_or_else(|| OsString::from("python3"))
}

/// The client's entry point, `clients/python/keel_check.py` in the workspace.
fn client_script() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("keel-tests has a parent folder")
        .to_path_buf();
    workspace
        .join("clients")
        .join("python")
        .join("keel_check.py")
}

/// Fails with a clear message unless a Python 3 interpreter runs.
fn require_python() -> String {
    let py = python();
    let out = Command::new(&py)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "this test needs a Python 3 interpreter (3.11 tested, 3.9 or newer) to run \
                 clients/python/keel_check.py, but `{}` cannot be started: {e}. Install \
                 python3, or set PYTHON to its path.",
                py.to_string_lossy()
            )
        });
    let version = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string();
    assert!(
        out.status.success() && version.starts_with("Python 3."),
        "`{} --version` did not report Python 3 ({}): {version}",
        py.to_string_lossy(),
        out.status
    );
    version
}

/// Runs the client with `args` and a deadline; returns (success, stdout + stderr).
fn run_client(args: &[&str]) -> (bool, String) {
    let script = client_script();
    assert!(script.is_file(), "{} is missing", script.display());
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .current_dir(script.parent().unwrap())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the Python client");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut guard = ChildGuard::new(child);
    let status = guard.wait_timeout(CLIENT_TIMEOUT).unwrap();
    guard.kill();
    let output = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default()
    );
    match status {
        Some(status) => (status.success(), format!("exit: {status}\n{output}")),
        None => (
            false,
            format!("the client did not finish within {CLIENT_TIMEOUT:?}\n{output}"),
        ),
    }
}

#[test]
fn python_client_passes_its_offline_checks() {
    let version = require_python();
    let (ok, output) = run_client(&["--offline"]);
    assert!(
        ok,
        "Python client offline checks failed ({version}):\n{output}"
    );
    assert!(output.contains("all offline checks passed"), "{output}");
}

#[test]
fn python_client_transacts_and_verifies_against_a_live_node() {
    let version = require_python();
    // Dropping the node (also when an assertion below panics) kills it.
    let mut node = TestNode::start_new().unwrap();
    // The key file holds the 32-byte ed25519 secret as hex (`0x` optional).
    let key_text = fs::read_to_string(node.validator_key_path()).unwrap();
    let secret = key_text.trim().trim_start_matches("0x").to_string();
    assert_eq!(secret.len(), 64, "unexpected key file format: {key_text:?}");
    let rpc_url = node.rpc_url();
    let (ok, output) = run_client(&["--rpc", &rpc_url, "--secret", &secret, "--timeout", "60"]);
    assert!(
        ok,
        "Python client failed against {rpc_url} ({version}):\n{output}"
    );
    assert!(output.contains("all checks passed"), "{output}");
    // The node survived everything the client sent.
    node.assert_running().unwrap();
    let status = node.rpc().status().unwrap();
    assert!(status["latest_height"].as_u64().unwrap() > 0, "{status}");
}
