//! Harness for keel's workspace integration tests: real `keel` processes over loopback.
//!
//! The tests themselves live in `tests/tests/*.rs`; this library gives them:
//! - [`keel_bin`]: the path of a freshly built `keel` binary (built once per test process);
//! - [`TestNode`]: a node home in a temporary folder, started as a child process on free
//!   loopback ports, killed (and its log tail printed) when dropped, also when a test panics;
//! - [`RpcClient`]: a blocking JSON-RPC 2.0 client over raw HTTP/1.1, which can also send
//!   malformed bodies;
//! - [`run_keel`]: runs one `keel` command line with a deadline and captures its output.
//!
//! Invariants: every child process is owned by a [`ChildGuard`] (killed and reaped on drop);
//! every wait has a deadline; nothing listens on a fixed port.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use keel_types::{Address, Hash, Keypair, Transaction, TxKind};
use serde_json::{json, Value};

/// Block time the test nodes run with, in milliseconds.
pub const BLOCK_TIME_MS: u64 = 200;

/// Chain id of the test nodes' genesis.
pub const TEST_CHAIN_ID: &str = "keel-it";

/// Balance `keel init` gives the validator's own address in a new genesis (DESIGN.md 4).
pub const VALIDATOR_FUNDS: u64 = 1_000_000_000_000;

/// How long a node may take from spawn to answering `chain_status`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Default deadline of a `keel` command run by [`run_keel`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// The keel binary
// ---------------------------------------------------------------------------------------------

/// Path of the `keel` binary under test.
///
/// `KEEL_BIN`, when set, names it and nothing is built. Otherwise the binary is
/// `<target>/<profile>/keel`, where this test executable runs from
/// `<target>/<profile>/deps/`, and `cargo build -p keel-cli --bin keel` is run once per test
/// process (a no-op when it is up to date) so a stale binary is never tested. If cargo
/// cannot be started at all, an existing binary is used.
///
/// # Panics
/// If the binary cannot be built or found: no test can run without it.
pub fn keel_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match locate_or_build_keel() {
        Ok(path) => path,
        Err(e) => panic!("cannot provide the keel binary: {e:#}"),
    })
}

fn locate_or_build_keel() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEEL_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("KEEL_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let deps = exe
        .parent()
        .ok_or_else(|| anyhow!("test executable {} has no folder", exe.display()))?;
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("cannot derive the target folder from {}", exe.display()))?;
    let bin = profile_dir.join(format!("keel{}", std::env::consts::EXE_SUFFIX));

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("keel-tests has no parent folder"))?;
    let mut cmd = Command::new(&cargo);
    // `cargo test` gives this process variables describing keel-tests (CARGO_MANIFEST_DIR,
    // CARGO_PKG_NAME ...). Some build scripts (ring's) ask to be rerun when those change, so
    // passing them on would make this build and the developer's own `cargo build` rebuild
    // half the dependency tree in turn, every time.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        let set_by_cargo_test = name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            );
        if set_by_cargo_test {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(workspace)
        .args(["build", "--quiet", "-p", "keel-cli", "--bin", "keel"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "`{} build -p keel-cli --bin keel` failed ({}):\n{}",
            Path::new(&cargo).display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if bin.is_file() => {
            eprintln!(
                "keel-tests: cannot run cargo ({e}); using the existing {}",
                bin.display()
            );
        }
        Err(e) => bail!("cannot run cargo to build keel: {e}"),
    }
    if !bin.is_file() {
        bail!("cargo built keel but {} is not there", bin.display());
    }
    Ok(bin)
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process that is killed (SIGKILL on unix) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Takes ownership of `child`.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().context("polling child process"),
            None => bail!("the process was already killed"),
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL on unix) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it has already exited, which is what we want anyway.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a finished `keel` command printed.
#[derive(Debug)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether it exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `keel ARGS` with extra environment variables and a deadline (the process is killed
/// when it passes), and returns what it printed.
pub fn run_keel_with<I, S>(args: I, envs: &[(&str, &str)], timeout: Duration) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(keel_bin());
    cmd.args(&args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("spawning keel")?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut guard = ChildGuard::new(child);
    let status = guard.wait_timeout(timeout)?;
    guard.kill();
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(CmdOutput {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "keel {:?} did not finish within {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args
        ),
    }
}

/// Runs `keel ARGS` with [`COMMAND_TIMEOUT`] and returns what it printed.
pub fn run_keel<I, S>(args: I) -> Result<CmdOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_keel_with(args, &[], COMMAND_TIMEOUT)
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
pub fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// The first of `n` consecutive loopback TCP ports that were all free a moment ago (for a
/// `keel testnet --base-port`); falls back to [`free_port`] after many tries.
pub fn free_port_range(n: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(7919);
    for k in 0..200u32 {
        let base = 20_000 + (seed.wrapping_add(k.wrapping_mul(104_729)) % 40_000) as u16;
        let all_free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
    free_port()
}

/// A loopback TCP port that was free a moment ago and that no other caller in this process
/// has been given. (Another process may still take it: [`TestNode::start`] retries then.)
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port == 0 {
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let mut set = given.lock().unwrap_or_else(|p| p.into_inner());
        if set.insert(port) {
            return port;
        }
    }
}

/// A loopback address nothing listens on (a port that was just free).
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

// ---------------------------------------------------------------------------------------------
// HTTP and JSON-RPC
// ---------------------------------------------------------------------------------------------

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "HTTP {} body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole response.
///
/// If the server answers and closes before the whole body is written (as it may for an
/// oversized body), the write error is ignored and the answer is still read.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let written = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush());
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        written.with_context(|| format!("writing the request to {addr}"))?;
        read.with_context(|| format!("reading the response from {addr}"))?;
        bail!("{addr} closed the connection without answering");
    }
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP response: {}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < len {
            bail!("HTTP body cut short: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunked body cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The error code.
    pub code: i64,
    /// The message.
    pub message: String,
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JSON-RPC error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

/// A blocking JSON-RPC 2.0 client for one node, one HTTP connection per request.
#[derive(Debug, Clone, Copy)]
pub struct RpcClient {
    addr: SocketAddr,
}

impl RpcClient {
    /// A client for the node listening on `addr`.
    pub fn new(addr: SocketAddr) -> RpcClient {
        RpcClient { addr }
    }

    /// The address it talks to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// POSTs `body` as is to `/`.
    pub fn post_raw(&self, body: &[u8]) -> Result<HttpResponse> {
        http_request(self.addr, "POST", "/", body, Duration::from_secs(30))
    }

    /// GETs `path`.
    pub fn get(&self, path: &str) -> Result<HttpResponse> {
        http_request(self.addr, "GET", path, b"", Duration::from_secs(30))
    }

    /// Calls `method` and returns the whole response object (`result` or `error`).
    pub fn call_envelope(&self, method: &str, params: Value) -> Result<Value> {
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let response = self.post_raw(request.to_string().as_bytes())?;
        let v = response.json()?;
        if v.get("result").is_none() && v.get("error").is_none() {
            bail!("{method}: response has neither result nor error: {v}");
        }
        Ok(v)
    }

    /// Calls `method`: its `result`, or the JSON-RPC error as an [`RpcError`] inside the
    /// `anyhow::Error` (downcast to inspect it).
    pub fn call(&self, method: &str, params: Value) -> Result<Value> {
        let v = self.call_envelope(method, params)?;
        if let Some(e) = v.get("error") {
            return Err(anyhow::Error::new(error_of(e)).context(format!("{method} failed")));
        }
        Ok(v["result"].clone())
    }

    /// Calls `method` expecting an error; fails if it succeeds.
    pub fn call_err(&self, method: &str, params: Value) -> Result<RpcError> {
        let v = self.call_envelope(method, params)?;
        match v.get("error") {
            Some(e) => Ok(error_of(e)),
            None => bail!("{method} unexpectedly succeeded: {}", v["result"]),
        }
    }

    /// `chain_status`.
    pub fn status(&self) -> Result<Value> {
        self.call("chain_status", json!([]))
    }

    /// `chain_status.latest_height`.
    pub fn latest_height(&self) -> Result<u64> {
        u64_field(&self.status()?, "latest_height")
    }

    /// `chain_getHeader(height)`.
    pub fn header(&self, height: u64) -> Result<Value> {
        self.call("chain_getHeader", json!([height]))
    }

    /// `state_getAccount(address)` at the latest height.
    pub fn account(&self, address: &Address) -> Result<Value> {
        self.call("state_getAccount", json!([address.to_string()]))
    }

    /// An account's balance at the latest height (amounts are JSON strings).
    pub fn balance(&self, address: &Address) -> Result<u64> {
        amount_field(&self.account(address)?, "balance")
    }

    /// Submits signed transaction bytes; returns the hash the node reports.
    pub fn submit(&self, tx: &Transaction) -> Result<Hash> {
        let v = self.call(
            "tx_submit",
            json!([format!("0x{}", hex::encode(&tx.bytes))]),
        )?;
        parse_json_str(&v, "tx_submit result")
    }

    /// Polls `tx_status` until `"finalized"`.
    pub fn wait_finalized(&self, hash: &Hash, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.call("tx_status", json!([hash.to_string()]))?;
            match s.as_str() {
                Some("finalized") => return Ok(()),
                Some("pending" | "included") => {}
                _ => bail!("transaction {hash}: status {s}"),
            }
            if Instant::now() >= deadline {
                bail!("transaction {hash} not finalized within {timeout:?} (status {s})");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls until `latest_height >= height`; returns the height reached.
    pub fn wait_for_height(&self, height: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.latest_height()?;
            if h >= height {
                return Ok(h);
            }
            if Instant::now() >= deadline {
                bail!("height {h} did not reach {height} within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn error_of(e: &Value) -> RpcError {
    RpcError {
        code: e["code"].as_i64().unwrap_or(0),
        message: e["message"].as_str().unwrap_or_default().to_string(),
    }
}

/// A JSON number field as `u64`.
pub fn u64_field(v: &Value, field: &str) -> Result<u64> {
    v[field]
        .as_u64()
        .ok_or_else(|| anyhow!("field {field:?} is not an unsigned number in {v}"))
}

/// An amount field: a JSON string holding a decimal `u64` (DESIGN.md 4).
pub fn amount_field(v: &Value, field: &str) -> Result<u64> {
    v[field]
        .as_str()
        .ok_or_else(|| anyhow!("amount {field:?} is not a JSON string in {v}"))?
        .parse()
        .with_context(|| format!("amount {field:?} in {v}"))
}

/// Parses a JSON string value with `FromStr` (hashes, addresses).
pub fn parse_json_str<T>(v: &Value, what: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let s = v
        .as_str()
        .ok_or_else(|| anyhow!("{what} is not a string: {v}"))?;
    s.parse().map_err(|e| anyhow!("{what} {s:?}: {e}"))
}

/// Signs a transfer.
pub fn transfer(
    key: &Keypair,
    chain_id: &str,
    nonce: u64,
    fee: u64,
    to: Address,
    amount: u64,
) -> Transaction {
    Transaction::sign(key, chain_id, nonce, fee, TxKind::Transfer { to, amount })
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/// A single-validator node: a home made by `keel init` in its own temporary folder, run as a
/// `keel start` child process with RPC, metrics and p2p on free loopback ports and
/// [`BLOCK_TIME_MS`] blocks. The node's stderr goes to `node.log` in the folder.
///
/// Dropping it kills the process; if the thread is panicking, the log tail is printed first.
/// Set `KEEL_TESTS_KEEP=1` to keep the folder (its path is printed).
pub struct TestNode {
    dir: Option<tempfile::TempDir>,
    home: PathBuf,
    rpc_addr: SocketAddr,
    child: Option<ChildGuard>,
    starts: u32,
    /// Ports come from an existing config (a testnet): never re-picked.
    fixed_ports: bool,
}

impl TestNode {
    /// A node over an existing home (say one written by `keel testnet`), with the ports of
    /// its config; its log goes to `HOME/node.log`.
    pub fn existing(home: PathBuf) -> Result<TestNode> {
        let config = keel_node::config::Config::load(&home.join("config.toml"))
            .map_err(|e| anyhow!("{e}"))?;
        Ok(TestNode {
            dir: None,
            home,
            rpc_addr: config.rpc.listen_addr,
            child: None,
            starts: 0,
            fixed_ports: true,
        })
    }

    /// Runs `keel init` in a new temporary folder and points the config at free ports.
    pub fn init() -> Result<TestNode> {
        let dir = tempfile::Builder::new()
            .prefix("keel-test-")
            .tempdir()
            .context("creating a temporary folder")?;
        let home = dir.path().join("home");
        let out = run_keel([
            OsStr::new("init"),
            OsStr::new("--home"),
            home.as_os_str(),
            OsStr::new("--chain-id"),
            OsStr::new(TEST_CHAIN_ID),
        ])?;
        if !out.success() {
            bail!("keel init failed:\n{out}");
        }
        let mut node = TestNode {
            dir: Some(dir),
            home,
            rpc_addr: closed_addr(),
            child: None,
            starts: 0,
            fixed_ports: false,
        };
        node.assign_ports()?;
        Ok(node)
    }

    /// [`TestNode::init`] then [`TestNode::start`].
    pub fn start_new() -> Result<TestNode> {
        let mut node = TestNode::init()?;
        node.start()?;
        Ok(node)
    }

    /// Rewrites `config.toml` with fresh free ports and the test block time.
    fn assign_ports(&mut self) -> Result<()> {
        use keel_node::config::{ByteSize, Config};
        let path = self.config_path();
        let mut config = Config::load(&path).map_err(|e| anyhow!("{e}"))?;
        self.rpc_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.rpc.listen_addr = self.rpc_addr;
        config.metrics.listen_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.p2p.listen_addr = format!("/ip4/127.0.0.1/tcp/{}", free_port());
        config.consensus.block_time_ms = BLOCK_TIME_MS;
        config.consensus.timeout_ms = 10 * BLOCK_TIME_MS;
        // Several nodes run at once on small machines: keep RocksDB's appetite modest.
        config.storage.rocksdb.block_cache_size = ByteSize::mib(16);
        config.storage.rocksdb.write_buffer_size = ByteSize::mib(4);
        config.validate().map_err(|e| anyhow!("{e}"))?;
        fs::write(&path, config.to_toml_string())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The temporary folder holding the home and the log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or(self.home.as_path(), |d| d.path())
    }

    /// The node's home folder.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// `HOME/config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.home.join("config.toml")
    }

    /// `HOME/keys/validator.key`: the funded validator account.
    pub fn validator_key_path(&self) -> PathBuf {
        self.home.join("keys").join("validator.key")
    }

    /// The validator's key pair.
    pub fn validator_key(&self) -> Result<Keypair> {
        keel_node::home::read_key_file(&self.validator_key_path()).map_err(|e| anyhow!("{e}"))
    }

    /// The node's log file (its stderr, across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("node.log")
    }

    /// The RPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The RPC URL, for `--rpc`.
    pub fn rpc_url(&self) -> String {
        format!("http://{}", self.rpc_addr)
    }

    /// A client for the node's RPC.
    pub fn rpc(&self) -> RpcClient {
        RpcClient::new(self.rpc_addr)
    }

    /// The chain id (`chain_status.chain_id`).
    pub fn chain_id(&self) -> Result<String> {
        self.rpc().status()?["chain_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("chain_status has no chain_id"))
    }

    /// Spawns `keel start` and waits until `chain_status` answers. If the process dies
    /// first because a port was taken meanwhile, ports are re-picked and it is tried again.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("node already running");
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_start() {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt < 4 && !self.fixed_ports && self.log_tail(20).contains("in use") =>
                {
                    eprintln!("keel-tests: port clash, re-picking ports: {e:#}");
                    self.assign_ports()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(&mut self) -> Result<()> {
        self.starts += 1;
        let log_path = self.log_path();
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "===== keel-tests: start #{} =====", self.starts)?;
        let mut command = Command::new(keel_bin());
        command
            .arg("start")
            .arg("--home")
            .arg(&self.home)
            // No NO_COLOR here: the node must write plain text to a non-terminal on its own
            // (`logs_written_to_a_file_have_no_colour_codes` checks it).
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG");
        // KEEL_TEST_LOG=filter: the nodes' RUST_LOG (e.g. `info,keel_node::host=debug`).
        if let Some(filter) = std::env::var_os("KEEL_TEST_LOG") {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning keel start")?;
        let mut guard = ChildGuard::new(child);
        let rpc = self.rpc();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = guard.try_wait()? {
                bail!(
                    "keel start exited with {status} before answering RPC; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            if rpc.status().is_ok() {
                self.child = Some(guard);
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "keel start did not answer RPC on {} within {START_TIMEOUT:?}; log tail:\n{}",
                    self.rpc_addr,
                    self.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM (a clean shutdown) and waits up to `timeout` for the process to exit;
    /// returns its exit status, or an error if it is still running then (it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("node is not started")?;
        let pid = child.id().context("node process has no id")?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {pid} failed: {sent}");
        }
        match child.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "node did not exit within {timeout:?} of SIGTERM; log tail:\n{}",
                self.log_tail(30)
            ),
        }
    }

    /// The node process's id (for `/proc/PID/status`); `None` when it is not started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::id)
    }

    /// SIGKILLs the node (no clean shutdown) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Whether the node process is still alive; an error if it has exited.
    pub fn assert_running(&mut self) -> Result<()> {
        match self.child.as_mut() {
            None => bail!("node is not started"),
            Some(c) => match c.try_wait()? {
                None => Ok(()),
                Some(status) => bail!(
                    "node exited with {status}; log tail:\n{}",
                    self.log_tail(30)
                ),
            },
        }
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let Ok(file) = File::open(self.log_path()) else {
            return String::from("(no log)");
        };
        let lines: Vec<String> = BufReader::new(file).lines().map_while(|l| l.ok()).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "----- keel node log tail ({}) -----\n{}\n-----",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        if std::env::var_os("KEEL_TESTS_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keel-tests: keeping {}", dir.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// Checks that a failed `keel` command behaved as DESIGN.md 4 says: non-zero exit, and
/// stderr one line starting with `error:` with no panic or backtrace.
pub fn check_one_line_error(out: &CmdOutput) -> Result<()> {
    if out.success() {
        bail!("expected failure, got success:\n{out}");
    }
    let err = out.stderr.trim_end();
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 {
        bail!("stderr is {} lines, expected 1:\n{out}", lines.len());
    }
    if !err.starts_with("error:") {
        bail!("stderr does not start with \"error:\":\n{out}");
    }
    if err.contains("panicked") || err.contains("RUST_BACKTRACE") {
        bail!("stderr shows a panic:\n{out}");
    }
    Ok(())
}

/// Writes a `keel testnet` of `validators` homes in `dir` (loopback ports picked free, blocks
/// every `block_time_ms`), lets `tune` change each node's config, and returns the nodes, not
/// started. RocksDB memory is kept small so several processes fit on a test machine.
pub fn testnet_nodes(
    dir: &Path,
    validators: usize,
    block_time_ms: u64,
    chain_id: &str,
    tune: impl Fn(&mut keel_node::config::Config),
) -> Result<Vec<TestNode>> {
    let count = u16::try_from(validators).context("validator count")?;
    let base = free_port_range(3 * count);
    let out = run_keel([
        "testnet",
        "--validators",
        &validators.to_string(),
        "--out",
        &dir.to_string_lossy(),
        "--base-port",
        &base.to_string(),
        "--block-time-ms",
        &block_time_ms.to_string(),
        "--chain-id",
        chain_id,
    ])?;
    if !out.success() {
        bail!("keel testnet failed:\n{out}");
    }
    (0..validators)
        .map(|i| {
            let home = dir.join(format!("node{i}"));
            let path = home.join("config.toml");
            let mut config = keel_node::config::Config::load(&path)?;
            config.storage.rocksdb.block_cache_size = keel_node::config::ByteSize::mib(16);
            config.storage.rocksdb.write_buffer_size = keel_node::config::ByteSize::mib(4);
            tune(&mut config);
            fs::write(&path, config.to_toml_string())?;
            TestNode::existing(home)
        })
        .collect()
}
