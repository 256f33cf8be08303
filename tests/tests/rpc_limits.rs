//! The JSON-RPC server's limits on a real node, set through `[rpc]` in `config.toml`:
//! batches over HTTP and WebSocket (`max_batch_size`), the per-address rate
//! (`requests_per_sec_per_ip`), subscriptions per connection, connections, request size and
//! time (`max_request_bytes`, `request_timeout_ms`), CORS, and the error codes each refusal
//! gets (docs/rpc.md, "Errors" and "Limits"). Every refusal leaves the node running.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use keel_node::config::Config;
use keel_tests::TestNode;
use serde_json::{json, Value};

const RATE_LIMITED: i64 = -32020;
const BATCH_TOO_LARGE: i64 = -32021;
const REQUEST_TOO_LARGE: i64 = -32022;
const TOO_MANY_SUBSCRIPTIONS: i64 = -32024;
const TOO_MANY_CONNECTIONS: i64 = -32025;
const REQUEST_TIMEOUT: i64 = -32026;
const INVALID_REQUEST: i64 = -32600;

/// A node whose `[rpc]` section `tune` changed, started.
fn node_with(tune: impl FnOnce(&mut keel_node::config::RpcConfig)) -> TestNode {
    let mut node = TestNode::init().unwrap();
    let path = node.config_path();
    let mut config = Config::load(&path).unwrap();
    tune(&mut config.rpc);
    config.validate().unwrap();
    std::fs::write(&path, config.to_toml_string()).unwrap();
    node.start().unwrap();
    node
}

/// An HTTP answer: status, headers (lower-case names), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

fn parse_answer(raw: &[u8]) -> Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer: {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Sends `request` as is on a new connection and reads until the server closes it.
fn raw_http(addr: SocketAddr, request: &[u8]) -> Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    // The server may answer (and close) before taking a whole oversized body.
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw);
    if raw.is_empty() {
        read.context("reading the answer")?;
    }
    parse_answer(&raw)
}

fn post(addr: SocketAddr, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no JSON-RPC error in {v}"))
}

fn batch_of(n: usize, method: &str) -> String {
    let calls: Vec<Value> = (0..n)
        .map(|i| json!({"jsonrpc": "2.0", "id": i, "method": method}))
        .collect();
    Value::Array(calls).to_string()
}

/// A bare WebSocket client (text frames, masked with a zero key), enough to call the node.
struct Ws {
    stream: TcpStream,
}

impl Ws {
    fn connect(addr: SocketAddr) -> Result<Ws> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let handshake = format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(handshake.as_bytes())?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            bail!("no upgrade: {}", String::from_utf8_lossy(&head));
        }
        Ok(Ws { stream })
    }

    fn send(&mut self, text: &str) -> Result<()> {
        let mut frame = vec![0x81];
        match text.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(text.as_bytes());
        self.stream.write_all(&frame)?;
        Ok(())
    }

    /// The next text message (pings and other control frames skipped).
    fn recv(&mut self) -> Result<Value> {
        loop {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head)?;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b)?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b)?;
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0; usize::try_from(len)?];
            self.stream.read_exact(&mut payload)?;
            match head[0] & 0x0f {
                1 => return Ok(serde_json::from_slice(&payload)?),
                8 => bail!("the server closed the connection"),
                _ => continue,
            }
        }
    }

    /// Sends `text` and returns the next message that is not a subscription notification.
    fn call(&mut self, text: &str) -> Result<Value> {
        self.send(text)?;
        loop {
            let message = self.recv()?;
            if message.get("method").is_none() {
                return Ok(message);
            }
        }
    }
}

#[test]
fn batches_subscriptions_sizes_ids_and_cors_follow_the_rpc_config() {
    let mut node = node_with(|rpc| {
        rpc.max_batch_size = 3;
        rpc.max_subscriptions_per_connection = 2;
        rpc.max_request_bytes = 8192;
        rpc.cors_allowed_origins = vec!["https://wallet.example".to_string()];
    });
    let addr = node.rpc_addr();

    // Batches over HTTP: up to three calls, answered in order; four refused whole.
    let answers = raw_http(addr, &post(addr, &batch_of(3, "chain_status"), ""))
        .unwrap()
        .json();
    let answers = answers.as_array().expect("an array of answers");
    assert_eq!(answers.len(), 3);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["id"], json!(i), "{a}");
        assert!(a["result"]["latest_height"].is_u64(), "{a}");
    }
    let refused = raw_http(addr, &post(addr, &batch_of(4, "chain_status"), ""))
        .unwrap()
        .json();
    assert_eq!(error_code(&refused), BATCH_TOO_LARGE, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_batch_size")),
        "{refused}"
    );
    let empty = raw_http(addr, &post(addr, "[]", "")).unwrap().json();
    assert_eq!(error_code(&empty), INVALID_REQUEST, "{empty}");

    // The same over WebSocket, and subscriptions up to the limit.
    let mut ws = Ws::connect(addr).unwrap();
    let answers = ws.call(&batch_of(3, "system_health")).unwrap();
    assert_eq!(answers.as_array().map(Vec::len), Some(3), "{answers}");
    let refused = ws.call(&batch_of(4, "system_health")).unwrap();
    assert_eq!(error_code(&refused), BATCH_TOO_LARGE, "{refused}");
    let subscribe = |id: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "chain_subscribeNewHeads"}).to_string()
    };
    for id in 1..=2 {
        let ok = ws.call(&subscribe(id)).unwrap();
        assert!(ok.get("result").is_some(), "{ok}");
    }
    let third = ws.call(&subscribe(3)).unwrap();
    assert_eq!(error_code(&third), TOO_MANY_SUBSCRIPTIONS, "{third}");
    assert_eq!(third["id"], json!(3));

    // A body over max_request_bytes: 413 with its own code, not -32007 ("already known").
    let huge = json!({"jsonrpc": "2.0", "id": 1, "method": "tx_submit",
                      "params": ["ab".repeat(8192)]})
    .to_string();
    let answer = raw_http(addr, &post(addr, &huge, "")).unwrap();
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(error_code(&answer.json()), REQUEST_TOO_LARGE);

    // An object as id: -32600 with a null id, not a bare `null`.
    let object_id = r#"{"jsonrpc":"2.0","id":{"x":1},"method":"chain_status"}"#;
    let v = raw_http(addr, &post(addr, object_id, "")).unwrap().json();
    assert_eq!(error_code(&v), INVALID_REQUEST, "{v}");
    assert_eq!(v["id"], Value::Null);

    // CORS: the listed origin's preflight and requests are allowed, another's are not.
    let preflight = |origin: &str| {
        format!(
            "OPTIONS / HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let allowed = raw_http(addr, &preflight("https://wallet.example")).unwrap();
    assert_eq!(allowed.status, 204, "{allowed:?}");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://wallet.example")
    );
    assert!(allowed
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    let refused = raw_http(addr, &preflight("https://evil.example")).unwrap();
    assert_eq!(refused.status, 403, "{refused:?}");
    let status = r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;
    let answer = raw_http(
        addr,
        &post(addr, status, "Origin: https://wallet.example\r\n"),
    )
    .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://wallet.example")
    );
    let answer = raw_http(
        addr,
        &post(addr, status, "Origin: https://evil.example\r\n"),
    )
    .unwrap();
    assert_eq!(answer.header("access-control-allow-origin"), None);

    node.assert_running().unwrap();
    node.rpc().status().unwrap();
}

#[test]
fn calls_over_the_per_address_rate_get_their_own_code() {
    let mut node = node_with(|rpc| rpc.requests_per_sec_per_ip = 2);
    let rpc = node.rpc();
    // Start-up polled the node; let the bucket fill again.
    thread::sleep(Duration::from_millis(1200));
    // The calls of a batch are handled within a millisecond: each takes a request's worth,
    // so two (a second's worth) are served and the others refused.
    let answers = raw_http(
        rpc.addr(),
        &post(rpc.addr(), &batch_of(6, "system_health"), ""),
    )
    .unwrap()
    .json();
    let answers = answers.as_array().expect("an array of answers");
    let served = answers.iter().filter(|a| a.get("result").is_some()).count();
    assert!((2..=3).contains(&served), "{answers:?}");
    for refused in answers.iter().filter(|a| a.get("error").is_some()) {
        assert_eq!(error_code(refused), RATE_LIMITED, "{refused}");
        assert!(
            refused["error"]["data"]["retry_after_ms"].is_u64(),
            "{refused}"
        );
    }
    // A single call right after, on another connection, is refused too.
    let v = rpc.call_envelope("chain_status", json!([])).unwrap();
    assert_eq!(error_code(&v), RATE_LIMITED, "{v}");
    // A second later the address is served again.
    thread::sleep(Duration::from_millis(1200));
    rpc.status().unwrap();
    node.assert_running().unwrap();
}

#[test]
fn connections_and_slow_clients_are_bounded() {
    let mut node = node_with(|rpc| {
        rpc.max_connections = 4;
        rpc.request_timeout_ms = 2000;
    });
    let addr = node.rpc_addr();
    let status = r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#;

    // Four connections that send nothing hold every slot: a fifth is refused with 503.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let refused = raw_http(addr, &post(addr, status, "")).unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(error_code(&refused.json()), TOO_MANY_CONNECTIONS);
    // They are closed after request_timeout_ms, and the slots come back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = raw_http(addr, &post(addr, status, "")).unwrap();
        if answer.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slots not given back: {answer:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(idle);

    // A request whose body never comes whole: 408 with its own code, then closed.
    let mut half = TcpStream::connect(addr).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"jsonrpc\""
    );
    let sent = Instant::now();
    half.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    half.read_to_end(&mut raw).unwrap();
    let waited = sent.elapsed();
    let answer = parse_answer(&raw).unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(error_code(&answer.json()), REQUEST_TIMEOUT);
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "answered after {waited:?}"
    );

    node.assert_running().unwrap();
    node.rpc().status().unwrap();
}
