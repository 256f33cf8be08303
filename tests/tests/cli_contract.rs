//! The `keel` binary's contract (DESIGN.md section 4): errors are one `error:` line and a
//! non-zero exit, never a panic; bad configuration is refused at start, naming the key;
//! `keel testnet` writes wired homes and never overwrites them; `keel devnet` runs a
//! 4-validator network in one process and stops cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use keel_tests::{
    check_one_line_error, closed_addr, free_port, keel_bin, run_keel, run_keel_with, u64_field,
    ChildGuard, RpcClient,
};
use rand::Rng;
use serde_json::{json, Value};

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

/// `keel bench <stage> --json` prints one JSON object per line with the contract's fields,
/// for both mixes and both thread counts (1 and all cores).
#[test]
fn bench_prints_one_json_object_per_stage_mix_and_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_keel([
        "bench",
        "all",
        "--json",
        "--accounts",
        "3000",
        "--txs",
        "200",
        "--blocks",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.success(), "{out}");
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<u64> = if cores > 1 {
        vec![1, cores as u64]
    } else {
        vec![1]
    };
    let stages = ["sigverify", "execute", "root", "commit", "block"];
    assert_eq!(
        lines.len(),
        stages.len() * 2 * threads.len(),
        "{}",
        out.stdout
    );
    for mix in ["uniform", "hot30"] {
        for t in &threads {
            for stage in stages {
                let line = lines
                    .iter()
                    .find(|l| l["stage"] == stage && l["mix"] == mix && l["threads"] == *t)
                    .unwrap_or_else(|| panic!("no {stage}/{mix}/{t} line in {}", out.stdout));
                assert_eq!(line["accounts"], 3000);
                assert_eq!(line["txs"], 200);
                assert!(line["tps"].as_f64().unwrap() > 0.0, "{line}");
            }
        }
    }
    // The temporary database is removed afterwards.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    // Only the asked stage; a bad count is a one-line error.
    let out = run_keel([
        "bench",
        "sigverify",
        "--json",
        "--txs",
        "100",
        "--blocks",
        "1",
    ])
    .unwrap();
    assert!(out.success(), "{out}");
    assert!(
        out.stdout
            .lines()
            .all(|l| l.contains("\"stage\":\"sigverify\"")),
        "{out}"
    );
    let out = run_keel(["bench", "trie", "--accounts", "1"]).unwrap();
    check_one_line_error(&out).unwrap();
    assert!(out.stderr.contains("--accounts"), "{out}");
}

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

/// A base port `P` such that `P..P+n` were all free a moment ago. The block lies below Linux's
/// ephemeral range (32768..), so outgoing connections and `free_port` do not take its ports,
/// and never overlaps a block this process already gave out (tests run in parallel).
fn free_port_block(n: u16) -> u16 {
    static GIVEN: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());
    let mut rng = rand::thread_rng();
    for _ in 0..10_000 {
        let base: u16 = rng.gen_range(20_000..32_000 - n);
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.iter().any(|&(b, len)| base < b + len && b < base + n) {
            continue;
        }
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            given.push((base, n));
            return base;
        }
    }
    panic!("no block of {n} free ports found");
}

#[test]
fn testnet_writes_wired_homes_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("tn");
    let base = free_port_block(9);
    let args = [
        "testnet".to_string(),
        "--validators".into(),
        "3".into(),
        "--out".into(),
        out_dir.to_str().unwrap().into(),
        "--base-port".into(),
        base.to_string(),
    ];
    let out = run_keel(&args).unwrap();
    assert!(out.success(), "{out}");

    let genesis0 = fs::read(out_dir.join("node0/genesis.json")).unwrap();
    let genesis: Value = serde_json::from_slice(&genesis0).unwrap();
    let validators = genesis["validators"].as_array().unwrap();
    assert_eq!(validators.len(), 3, "{genesis}");

    // Every node's p2p address, with its peer id: what the others must name.
    let p2p: Vec<String> = (0..3u16)
        .map(|i| {
            let node_key =
                keel_node::home::read_key_file(&out_dir.join(format!("node{i}/keys/node.key")))
                    .unwrap();
            format!(
                "/ip4/127.0.0.1/tcp/{}/p2p/{}",
                base + 3 * i,
                keel_node::net::libp2p::peer_id(&node_key).unwrap()
            )
        })
        .collect();
    for i in 0..3u16 {
        let home = out_dir.join(format!("node{i}"));
        for file in [
            "config.toml",
            "genesis.json",
            "keys/validator.key",
            "keys/node.key",
        ] {
            assert!(home.join(file).is_file(), "node{i}: {file} missing");
        }
        assert_eq!(
            fs::read(home.join("genesis.json")).unwrap(),
            genesis0,
            "node{i}: genesis.json differs from node0's"
        );
        let validator = keel_node::home::read_key_file(&home.join("keys/validator.key")).unwrap();
        let public = validator.public().to_string();
        assert!(
            validators.iter().any(|v| v["public_key"] == json!(public)),
            "node{i}'s validator {public} is not in genesis"
        );
        assert!(
            out.stdout.contains(&validator.address().to_string()),
            "the output does not name node{i}'s validator:\n{out}"
        );

        let config = keel_node::config::Config::load(&home.join("config.toml")).unwrap();
        assert_eq!(
            config.p2p.listen_addr,
            format!("/ip4/127.0.0.1/tcp/{}", base + 3 * i)
        );
        assert_eq!(
            config.rpc.listen_addr,
            SocketAddr::from(([127, 0, 0, 1], base + 3 * i + 1))
        );
        let mut peers = config.p2p.persistent_peers.clone();
        peers.sort();
        let mut others: Vec<String> = (0..3u16)
            .filter(|j| *j != i)
            .map(|j| p2p[usize::from(j)].clone())
            .collect();
        others.sort();
        assert_eq!(peers, others, "node{i}'s persistent peers");
    }

    let again = run_keel(&args).unwrap();
    check_one_line_error(&again).unwrap();
    assert!(
        again.stderr.contains("already"),
        "the refusal does not say the folder already holds a testnet:\n{again}"
    );
    assert_eq!(
        fs::read(out_dir.join("node0/genesis.json")).unwrap(),
        genesis0,
        "a refused second run changed node0's genesis.json"
    );
    assert!(!out_dir.join("node3").exists());
}

/// A `keel devnet` child process whose stdout and stderr go to a log file.
struct Devnet {
    child: ChildGuard,
    log: std::path::PathBuf,
    rpc: RpcClient,
}

impl Devnet {
    /// Spawns `keel devnet` over `dir` with 4 validators, 300 ms blocks, ports of a free
    /// block and node0's RPC on `rpc`, and waits until node0's RPC answers.
    fn spawn(dir: &Path, rpc: SocketAddr, log: &Path) -> Result<Devnet, String> {
        let base = free_port_block(12);
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(keel_bin())
            .args(["devnet", "--validators", "4", "--block-time-ms", "300"])
            .arg("--dir")
            .arg(dir)
            .arg("--rpc-addr")
            .arg(rpc.to_string())
            .arg("--base-port")
            .arg(base.to_string())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut devnet = Devnet {
            child: ChildGuard::new(child),
            log: log.to_path_buf(),
            rpc: RpcClient::new(rpc),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = devnet.child.try_wait().unwrap() {
                return Err(format!(
                    "keel devnet exited with {status} before answering RPC:\n{}",
                    devnet.log_text()
                ));
            }
            if devnet.rpc.status().is_ok() {
                return Ok(devnet);
            }
            assert!(
                Instant::now() < deadline,
                "keel devnet did not answer RPC on {rpc} within 30 s:\n{}",
                devnet.log_text()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the devnet printed (stdout and stderr, all runs over this log).
    fn full_log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// The last lines of the log: what matters when something fails (it grows every block).
    fn log_text(&self) -> String {
        let text = self.full_log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Polls node0 until `finalized_height >= height`; the status reached.
    fn wait_finalized(&mut self, height: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("keel devnet exited with {status}:\n{}", self.log_text());
            }
            if let Ok(s) = self.rpc.status() {
                if u64_field(&s, "finalized_height").unwrap() >= height {
                    return s;
                }
                assert!(
                    Instant::now() < deadline,
                    "finalized height did not reach {height} within {timeout:?} (status {s}):\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERMs the devnet and checks that it exits with status 0 within 20 s.
    fn terminate(mut self) {
        let pid = self.child.id().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        let status = self.child.wait_timeout(Duration::from_secs(20)).unwrap();
        match status {
            Some(s) => assert!(
                s.success(),
                "keel devnet exited with {s} on SIGTERM:\n{}",
                self.log_text()
            ),
            None => panic!(
                "keel devnet still running 20 s after SIGTERM:\n{}",
                self.log_text()
            ),
        }
        eprintln!("keel devnet stopped {:?} after SIGTERM", started.elapsed());
    }
}

#[test]
fn devnet_runs_four_validators_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("devnet.log");
    let started = Instant::now();
    // A port of the block may be taken by another process between probe and bind: then the
    // devnet refuses to start, and it is tried again in a new folder with new ports.
    let mut attempt = 0;
    let (mut devnet, net, rpc) = loop {
        attempt += 1;
        let net = dir.path().join(format!("net{attempt}"));
        let rpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        match Devnet::spawn(&net, rpc, &log) {
            Ok(d) => break (d, net, rpc),
            Err(e) if attempt < 3 && e.contains("in use") => {
                eprintln!("port clash, trying again: {e}");
            }
            Err(e) => panic!("{e}"),
        }
    };

    let status = devnet.wait_finalized(5, Duration::from_secs(60));
    eprintln!(
        "devnet finalized height {} after {:?}",
        status["finalized_height"],
        started.elapsed()
    );
    // Node0 knows all three others once they have all voted; give stragglers a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let peers = u64_field(&devnet.rpc.status().unwrap(), "peers").unwrap();
        if peers == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node0 has {peers} peers, expected 3:\n{}",
            devnet.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let validators = devnet.rpc.call("state_getValidators", json!([])).unwrap();
    assert_eq!(
        validators.as_array().map(Vec::len),
        Some(4),
        "state_getValidators: {validators}"
    );
    let text = devnet.full_log();
    for needle in ["node3", "account0.key", &format!("http://{rpc}")] {
        assert!(
            text.contains(needle),
            "the output does not mention {needle:?}:\n{}",
            text.lines().take(40).collect::<Vec<_>>().join("\n")
        );
    }
    devnet.terminate();
    assert!(
        net.join("node0/config.toml").is_file(),
        "--dir must be kept on exit"
    );

    // The same --dir again: the same network restarts where it stopped.
    let before = u64_field(&status, "finalized_height").unwrap();
    let mut devnet = Devnet::spawn(&net, rpc, &log).unwrap();
    let text = devnet.full_log();
    assert!(
        text.contains("(restarted)"),
        "no restart notice:\n{}",
        devnet.log_text()
    );
    let after = devnet.wait_finalized(before + 3, Duration::from_secs(60));
    assert_eq!(after["chain_id"], status["chain_id"]);
    devnet.terminate();
    eprintln!("devnet test took {:?}", started.elapsed());
}

/// Output into a pipe whose reader is gone (`keel keys show | head -0`) ends the command
/// quietly instead of a panic on the broken pipe.
#[test]
fn output_to_a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let home = home.to_str().unwrap();
    let out = run_keel(["init", "--home", home]).unwrap();
    assert!(out.success(), "{out}");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(keel_bin())
        .args(["keys", "show", "--home", home])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
}
