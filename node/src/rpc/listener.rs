//! The RPC server's listener: accepts connections and puts keel's bounds in front of
//! jsonrpsee, which serves each connection's JSON-RPC (HTTP/1.1 and WebSocket).
//!
//! jsonrpsee's own accept loop counts `max_connections` per HTTP request rather than per
//! socket, has no deadline for a request body or for an idle keep-alive connection, and
//! answers an oversized body with a code (`-32007`) that keel's table gives another meaning.
//! This loop, per connection:
//! - holds one of `rpc.max_connections` slots for as long as the socket is open (WebSocket
//!   included); a connection beyond them gets `503` with `-32025` and is closed;
//! - gives a client `rpc.request_timeout_ms` to send each request head (idle time of a
//!   keep-alive connection included) and again its body; a late body gets `408` with
//!   `-32026`;
//! - reads a body up to `rpc.max_request_bytes` (a larger one gets `413` with `-32022`),
//!   unless the server's buffers are over their budget ([`RpcBuffers`]): then the request
//!   gets `503` with `-32028` unread;
//! - answers a request whose `id` is neither a string, a non-negative integer nor null with
//!   `-32600` (jsonrpsee would take it for a notification and answer a bare `null`);
//! - answers CORS preflights and adds CORS headers ([`super::cors`]);
//! - records the client's address ([`ClientIp`]) for the rate limit, and marks WebSocket
//!   upgrades ([`WsConnection`]) so the middleware bounds their calls;
//! - and wraps the socket in [`GuardedIo`] (stalled writes, WebSocket backpressure and
//!   message size).
//!
//! When the server is stopped, the loop stops accepting, each connection finishes the
//! request in flight within [`SHUTDOWN_GRACE`], and the loop ends when they have.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use jsonrpsee::core::BoxError;
use jsonrpsee::server::{ws, HttpBody, HttpRequest, HttpResponse, StopHandle};
use jsonrpsee::types::Id;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::codes;
use super::conn::{ConnState, GuardedIo, RpcBuffers, WsConnection};
use super::cors::{Cors, Preflight};
use super::limits::ClientIp;

/// Time a connection has at shutdown to finish the request in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connections refused at once (each gets its `503` within [`REFUSAL_TIME`]); beyond that
/// a connection over the limit is closed without an answer.
const MAX_REFUSALS: usize = 64;

/// Time to answer a refused connection and let the client read it.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Of a body over the limit, at most this much more (or `max_request_bytes`, if larger) is
/// read and dropped so that the client, still sending, gets the `413` rather than a reset
/// connection.
const MIN_DRAIN_BYTES: usize = 1024 * 1024;

/// Most bytes reserved for a body before they arrive.
const INITIAL_BODY_CAPACITY: usize = 64 * 1024;

/// What the listener enforces, from `[rpc]`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `rpc.max_connections`.
    pub max_connections: usize,
    /// `rpc.max_request_bytes`: an HTTP body or a WebSocket message.
    pub max_request_bytes: usize,
    /// `rpc.request_timeout_ms`.
    pub request_timeout: Duration,
    /// `rpc.cors_allowed_origins`, if any.
    pub cors: Option<Cors>,
    /// What every connection's requests and answers hold, and its budget.
    pub buffers: Arc<RpcBuffers>,
}

/// Serves `listener` until `stop`, each connection with a fresh service from
/// `make_service` (jsonrpsee's, for that connection).
pub fn spawn<S, F>(listener: TcpListener, make_service: F, settings: Settings, stop: StopHandle)
where
    F: Fn() -> S + Send + 'static,
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    tokio::spawn(accept_loop(
        listener,
        make_service,
        Arc::new(settings),
        stop,
    ));
}

async fn accept_loop<S, F>(
    listener: TcpListener,
    make_service: F,
    settings: Arc<Settings>,
    stop: StopHandle,
) where
    F: Fn() -> S + Send + 'static,
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut http = http1::Builder::new();
    // The head timeout runs from the moment hyper waits for a request, so it closes an
    // idle keep-alive connection too.
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.request_timeout);
    let mut connections = JoinSet::new();
    let stopped = stop.clone().shutdown();
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            () = &mut stopped => break,
            // Reaps finished connections so the set stays as small as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "RPC listener: accept failed");
                tokio::select! {
                    () = &mut stopped => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "RPC listener: connection limit reached, refusing");
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                connections.spawn(refuse(stream, settings.max_connections, permit));
            }
            continue;
        };
        let conn = Arc::new(ConnState::new(settings.buffers.clone()));
        let io = GuardedIo::new(
            stream,
            conn.clone(),
            settings.request_timeout,
            settings.max_request_bytes as u64,
            slot,
        );
        let service = ConnService {
            inner: make_service(),
            peer: peer.ip(),
            conn,
            settings: settings.clone(),
        };
        let connection = http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "RPC connection closed");
                    }
                }
                () = stop.shutdown() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                }
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Answers a connection over `rpc.max_connections` with `503` (`-32025`) and closes it.
async fn refuse(mut stream: TcpStream, max_connections: usize, _permit: OwnedSemaphorePermit) {
    let body = error_body(
        codes::TOO_MANY_CONNECTIONS,
        &format!(
            "too many connections: this node serves at most {max_connections} at once \
             (rpc.max_connections); try again later"
        ),
    );
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Reads what the client sent until it closes: closing with its request unread would
        // reset the connection, and the client could lose the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// The service hyper calls for each request of one connection.
#[derive(Clone)]
struct ConnService<S> {
    inner: S,
    peer: IpAddr,
    conn: Arc<ConnState>,
    settings: Arc<Settings>,
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().answer(request))
    }
}

impl<S> ConnService<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    async fn answer(mut self, mut request: Request<Incoming>) -> Result<HttpResponse, BoxError> {
        let origin = request.headers().get(header::ORIGIN).cloned();
        if let Some(cors) = &self.settings.cors {
            match cors.preflight(request.method(), request.headers()) {
                Preflight::NotOne => {}
                answer => return Ok(preflight_response(answer)),
            }
        }
        request.extensions_mut().insert(ClientIp(self.peer));
        let upgrade = ws::is_upgrade_request(&request);
        // The body, counted in the server's buffers until its answer is made.
        let mut held = None;
        let request = if upgrade {
            request
                .extensions_mut()
                .insert(WsConnection(self.conn.clone()));
            request.map(HttpBody::new)
        } else if request.method() == Method::POST {
            if self.settings.buffers.over_budget() {
                self.settings.buffers.refuse();
                let mut response = busy_response(&self.settings);
                self.decorate(origin.as_ref(), response.headers_mut());
                return Ok(response);
            }
            let (parts, body) = request.into_parts();
            let limit = self.settings.max_request_bytes;
            let body =
                match read_body(body, &parts.headers, limit, self.settings.request_timeout).await {
                    Ok(body) => body,
                    Err(e) => {
                        let mut response = body_error_response(e, &self.settings);
                        self.decorate(origin.as_ref(), response.headers_mut());
                        return Ok(response);
                    }
                };
            let body = invalid_ids_replaced(&body).unwrap_or(body);
            held = Some(self.settings.buffers.hold(body.len()));
            Request::from_parts(parts, HttpBody::from(body))
        } else {
            request.map(HttpBody::new)
        };
        std::future::poll_fn(|cx| self.inner.poll_ready(cx)).await?;
        let mut response = self.inner.call(request).await?;
        drop(held);
        if upgrade && response.status() == StatusCode::SWITCHING_PROTOCOLS {
            self.conn.upgrade();
        } else if let Some(bytes) = hyper::body::Body::size_hint(response.body()).exact() {
            // Counted until the socket takes it ([`ConnState::queued`]).
            self.conn
                .queued(usize::try_from(bytes).unwrap_or(usize::MAX));
        }
        if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
            // jsonrpsee's own `-32007`; not expected, as the body was read within the limit.
            response = body_error_response(BodyError::TooLarge, &self.settings);
        }
        self.decorate(origin.as_ref(), response.headers_mut());
        Ok(response)
    }

    fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if let Some(cors) = &self.settings.cors {
            cors.decorate(origin, headers);
        }
    }
}

fn preflight_response(answer: Preflight) -> HttpResponse {
    let mut response = HttpResponse::new(HttpBody::empty());
    *response.status_mut() = Cors::preflight_status(&answer);
    if let Preflight::Allowed(headers) = answer {
        response.headers_mut().extend(headers);
    }
    response
}

/// Why a request body was not read.
#[derive(Debug, PartialEq, Eq)]
enum BodyError {
    TooLarge,
    TimedOut,
    Broken,
}

/// The body, if it came whole within `deadline` and holds at most `limit` bytes.
async fn read_body(
    mut body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    deadline: Duration,
) -> Result<Vec<u8>, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let drain = limit.max(MIN_DRAIN_BYTES);
    if declared.is_some_and(|n| n > limit.saturating_add(drain)) {
        return Err(BodyError::TooLarge);
    }
    // Grows as bytes arrive: a client that announces a large body and sends it slowly
    // holds no more memory than it sent.
    let mut data = Vec::with_capacity(declared.unwrap_or(0).min(limit).min(INITIAL_BODY_CAPACITY));
    let mut too_large = declared.is_some_and(|n| n > limit);
    let mut received = 0usize;
    let read = tokio::time::timeout(deadline, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| BodyError::Broken)?;
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            received = received.saturating_add(chunk.len());
            if received > limit {
                // Read on (and drop) what follows for a while, then answer.
                too_large = true;
                data = Vec::new();
                if received > limit.saturating_add(drain) {
                    break;
                }
            } else if !too_large {
                data.extend_from_slice(&chunk);
            }
        }
        Ok(())
    })
    .await;
    match read {
        _ if too_large => Err(BodyError::TooLarge),
        Ok(Ok(())) => Ok(data),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BodyError::TimedOut),
    }
}

fn body_error_response(e: BodyError, settings: &Settings) -> HttpResponse {
    let (status, code, message) = match e {
        BodyError::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::REQUEST_TOO_LARGE,
            format!(
                "request too large: more than {} bytes (rpc.max_request_bytes)",
                settings.max_request_bytes
            ),
        ),
        BodyError::TimedOut => (
            StatusCode::REQUEST_TIMEOUT,
            codes::REQUEST_TIMEOUT,
            format!(
                "request timed out: the body did not arrive within {} ms \
                 (rpc.request_timeout_ms)",
                settings.request_timeout.as_millis()
            ),
        ),
        BodyError::Broken => (
            StatusCode::BAD_REQUEST,
            codes::PARSE_ERROR,
            "parse error: the request body could not be read".to_string(),
        ),
    };
    // What is left of the body was not read: the connection cannot carry another request.
    closing_error_response(status, code, &message)
}

/// A JSON-RPC error (null id) with `status`, after which the connection closes (the request
/// body was not read, or not all of it).
fn closing_error_response(status: StatusCode, code: i32, message: &str) -> HttpResponse {
    let mut response = HttpResponse::new(HttpBody::from(error_body(code, message)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `503` with `-32028`: the server's buffers are over their budget; the body is left unread,
/// so the connection closes after it.
fn busy_response(settings: &Settings) -> HttpResponse {
    let message = format!(
        "server busy: the RPC server holds more than its {} bytes of requests and answers \
         (the memory budget's rpc share); retry shortly",
        settings.buffers.budget()
    );
    let mut response =
        closing_error_response(StatusCode::SERVICE_UNAVAILABLE, codes::RPC_BUSY, &message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A JSON-RPC error response with a null id.
fn error_body(code: i32, message: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "error": { "code": code, "message": message },
        "id": null,
    })
    .to_string()
}

/// The part of a request object that decides whether jsonrpsee takes it for a call.
#[derive(Deserialize)]
struct IdProbe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// A request with this in place of one whose id is invalid gets `-32600` with a null id.
const INVALID_REQUEST: &str = r#"{"jsonrpc":"2.0","id":null}"#;

/// Whether a request object has an id jsonrpsee cannot answer with (neither a string, a
/// non-negative integer nor null). Anything that is not an object is left to jsonrpsee.
fn has_invalid_id(request: &[u8]) -> bool {
    match serde_json::from_slice::<IdProbe<'_>>(request) {
        Ok(IdProbe { id: Some(id) }) => serde_json::from_str::<Id<'_>>(id.get()).is_err(),
        _ => false,
    }
}

/// The body with every request whose id is invalid replaced so that it gets `-32600`
/// (jsonrpsee would take it for a notification: no answer, or a bare `null` over HTTP);
/// `None` if there is none.
fn invalid_ids_replaced(body: &[u8]) -> Option<Vec<u8>> {
    match body.iter().find(|b| !b.is_ascii_whitespace())? {
        b'{' => has_invalid_id(body).then(|| INVALID_REQUEST.as_bytes().to_vec()),
        b'[' => {
            let entries: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
            if !entries.iter().any(|e| has_invalid_id(e.get().as_bytes())) {
                return None;
            }
            let parts: Vec<&str> = entries
                .iter()
                .map(|e| {
                    if has_invalid_id(e.get().as_bytes()) {
                        INVALID_REQUEST
                    } else {
                        e.get()
                    }
                })
                .collect();
            Some(format!("[{}]", parts.join(",")).into_bytes())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn replaced(body: &str) -> Option<String> {
        invalid_ids_replaced(body.as_bytes()).map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn requests_with_invalid_ids_are_replaced_and_others_left_alone() {
        for fine in [
            r#"{"jsonrpc":"2.0","id":1,"method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","id":"a","method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","method":"chain_status"}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"chain_status"}, 5]"#,
            r#"not json"#,
            r#"[]"#,
        ] {
            assert_eq!(replaced(fine), None, "{fine}");
        }
        for bad in [
            r#"{"jsonrpc":"2.0","id":{},"method":"chain_status"}"#,
            r#" {"jsonrpc":"2.0","id":[1],"method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","id":-1,"method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"chain_status"}"#,
            r#"{"jsonrpc":"2.0","id":true,"method":"chain_status"}"#,
        ] {
            assert_eq!(replaced(bad).as_deref(), Some(INVALID_REQUEST), "{bad}");
        }
        assert_eq!(
            replaced(r#"[{"id":1,"method":"a"},{"id":{"x":1},"method":"b"}, 7]"#).as_deref(),
            Some(r#"[{"id":1,"method":"a"},{"jsonrpc":"2.0","id":null},7]"#)
        );
    }
}
