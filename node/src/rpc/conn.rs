//! One client connection's socket and bounds ([`GuardedIo`], [`ConnState`], [`FrameGuard`]).
//!
//! The listener wraps every accepted socket in a [`GuardedIo`] before hyper (and, after an
//! upgrade, the WebSocket code) reads and writes it, so these bounds hold whatever protocol
//! runs on top:
//! - **Writes that make no progress** for `request_timeout` (a client that does not read its
//!   responses, its receive window full) fail, which closes the connection and releases
//!   everything it held.
//! - **WebSocket backpressure**: a connection has at most [`MAX_CALLS_IN_FLIGHT`] calls being
//!   handled and at most [`UNSENT_BUDGET`] bytes of responses not yet written to the socket
//!   ([`ConnState`], kept by the RPC middleware as calls start and answers are queued, and
//!   by the socket as bytes go out). Beyond either, the server stops reading the client's
//!   messages (and calls already read wait) until it catches up, so a client that sends
//!   without reading cannot make the node queue answers without bound.
//! - **WebSocket message size**: [`FrameGuard`] follows the frame headers the client sends
//!   and, when a message would exceed `rpc.max_request_bytes`, hands the WebSocket code a
//!   close frame with status 1009 ("message too big") in its place, before any of it is
//!   buffered; the server answers that close and the connection ends.
//! - The connection's slot (`rpc.max_connections`) is held by the socket, so it is given
//!   back only when the socket closes, after an upgrade included.
//! - **Bytes over all connections** ([`RpcBuffers`], the memory budget's `rpc` consumer):
//!   answers not yet written count from the moment they are made, HTTP request bodies from
//!   the moment they are read until answered. While they are over the budget, a new HTTP
//!   request is refused unread (`503` with `-32028`) and WebSocket calls wait.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Sleep;

/// Most calls one WebSocket connection may have being handled (read and not yet answered).
pub const MAX_CALLS_IN_FLIGHT: usize = 32;

/// Most bytes of answers one WebSocket connection may have queued but not yet written.
pub const UNSENT_BUDGET: usize = 4 * 1024 * 1024;

/// Size of the buffer a WebSocket connection's bytes are read through.
const READ_CHUNK: usize = 8 * 1024;

/// WebSocket close status "message too big" (RFC 6455, 7.4.1).
const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;

/// How often a WebSocket call waiting for the server's buffers to drain looks again.
const BUSY_RECHECK: Duration = Duration::from_millis(5);

/// What one open connection holds besides the bytes [`RpcBuffers`] counts: hyper's read and
/// write buffers, the connection's task and state (measured: 17.7 KiB per idle keep-alive
/// HTTP connection after one request, 300 connections).
pub const CONNECTION_BYTES: usize = 18 * 1024;

/// Bytes the RPC server holds for its clients, over every connection, and their budget
/// (the memory budget's `rpc` share). See the module documentation for what counts.
#[derive(Debug)]
pub struct RpcBuffers {
    used: AtomicUsize,
    connections: AtomicUsize,
    budget: usize,
    refused: Counter,
}

impl RpcBuffers {
    /// Buffers that may hold `budget` bytes before new requests are refused.
    pub fn new(budget: u64) -> Arc<RpcBuffers> {
        Arc::new(RpcBuffers {
            used: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            budget: usize::try_from(budget).unwrap_or(usize::MAX),
            refused: Counter::default(),
        })
    }

    /// Registers `keel_rpc_busy_refusals_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "keel_rpc_busy_refusals",
            "HTTP requests refused unread because the RPC server's buffers were over their budget (-32028)",
            self.refused.clone(),
        );
    }

    /// Bytes held now: requests and answers, and [`CONNECTION_BYTES`] per open connection.
    pub fn used(&self) -> u64 {
        let connections = self.connections.load(Ordering::Acquire);
        (self.used.load(Ordering::Acquire) as u64)
            .saturating_add((connections as u64).saturating_mul(CONNECTION_BYTES as u64))
    }

    /// Bytes of requests and answers held now (what the budget bounds; open connections
    /// are bounded by `rpc.max_connections`).
    pub fn buffered(&self) -> u64 {
        self.used.load(Ordering::Acquire) as u64
    }

    /// Their budget.
    pub fn budget(&self) -> u64 {
        self.budget as u64
    }

    /// Whether a new request must wait or be refused.
    pub fn over_budget(&self) -> bool {
        self.used.load(Ordering::Acquire) > self.budget
    }

    /// Counts an HTTP request refused for the budget.
    pub fn refuse(&self) {
        self.refused.inc();
    }

    /// Holds `bytes` until the guard is dropped.
    pub fn hold(self: &Arc<Self>, bytes: usize) -> Held {
        self.add(bytes);
        Held {
            buffers: self.clone(),
            bytes,
        }
    }

    fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn sub(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }
}

/// Bytes counted in [`RpcBuffers`] until dropped.
#[derive(Debug)]
pub struct Held {
    buffers: Arc<RpcBuffers>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.buffers.sub(self.bytes);
    }
}

/// What the RPC middleware and the socket of one connection share.
#[derive(Debug)]
pub struct ConnState {
    buffers: Arc<RpcBuffers>,
    websocket: AtomicBool,
    dead: AtomicBool,
    in_flight: AtomicUsize,
    unsent: AtomicUsize,
    /// The socket's reader, parked while the connection is over its bounds.
    reader: Mutex<Option<Waker>>,
    /// Calls waiting for the unsent answers to drain.
    room: Notify,
}

impl Default for ConnState {
    /// A connection counted in buffers of its own, without a budget.
    fn default() -> ConnState {
        ConnState::new(RpcBuffers::new(u64::MAX))
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        // Answers never written (the connection closed first) leave the server's count.
        self.buffers.sub(self.unsent.load(Ordering::Acquire));
        self.buffers.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Marks a call as coming over a WebSocket connection, with that connection's state (put in
/// the upgrade request's extensions by the listener; every call on the connection has it).
#[derive(Clone, Debug)]
pub struct WsConnection(pub Arc<ConnState>);

/// Held while a call is in flight; see [`ConnState::admit`].
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.wake_reader();
    }
}

impl ConnState {
    /// A connection whose answers count in `buffers`.
    pub fn new(buffers: Arc<RpcBuffers>) -> ConnState {
        buffers.connections.fetch_add(1, Ordering::AcqRel);
        ConnState {
            buffers,
            websocket: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            unsent: AtomicUsize::new(0),
            reader: Mutex::new(None),
            room: Notify::new(),
        }
    }

    /// From now on the connection speaks WebSocket: its reads are bounded.
    pub fn upgrade(&self) {
        self.websocket.store(true, Ordering::Release);
    }

    /// Whether the connection was upgraded to WebSocket.
    pub fn is_websocket(&self) -> bool {
        self.websocket.load(Ordering::Acquire)
    }

    /// Whether a write timed out or failed: the connection is closing.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Counts a call in flight, then waits until the answers queued before it are down to
    /// [`UNSENT_BUDGET`] and the server's buffers are within their budget (or the
    /// connection died). The call is in flight until the guard is dropped.
    pub async fn admit(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.clone());
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.is_dead() {
                return guard;
            }
            if self.unsent.load(Ordering::Acquire) > UNSENT_BUDGET {
                room.await;
            } else if self.buffers.over_budget() {
                // Other connections' answers drain the buffers; nothing here would say when.
                tokio::time::sleep(BUSY_RECHECK).await;
            } else {
                return guard;
            }
        }
    }

    /// An answer of `bytes` was queued for the socket.
    pub fn queued(&self, bytes: usize) {
        self.unsent.fetch_add(bytes, Ordering::AcqRel);
        self.buffers.add(bytes);
    }

    /// `bytes` went out on the socket (frames, pings and HTTP included, so `unsent` may be
    /// low by a little, never high).
    fn wrote(&self, bytes: usize) {
        let before = self
            .unsent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            })
            .unwrap_or(0);
        self.buffers.sub(before.min(bytes));
        if before > UNSENT_BUDGET && before.saturating_sub(bytes) <= UNSENT_BUDGET {
            self.room.notify_waiters();
            self.wake_reader();
        }
    }

    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.room.notify_waiters();
        self.wake_reader();
    }

    fn over_bounds(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) >= MAX_CALLS_IN_FLIGHT
            || self.unsent.load(Ordering::Acquire) > UNSENT_BUDGET
    }

    /// Whether the reader must wait; if so it is woken when that changes.
    fn park_reader(&self, waker: &Waker) -> bool {
        if !self.over_bounds() {
            return false;
        }
        *self.reader.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
        // Checked again after parking, so a change in between is not missed.
        self.over_bounds() && !self.is_dead()
    }

    fn wake_reader(&self) {
        let waker = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Follows the WebSocket frames a client sends, passing them on unchanged, until a data
/// message (all its frames together) would exceed `limit` bytes: then it passes on a close
/// frame with status 1009 instead and nothing after it. A frame header is passed on only
/// once complete, so the close frame never lands inside one.
#[derive(Debug)]
pub struct FrameGuard {
    limit: u64,
    header: [u8; 14],
    have: usize,
    payload_left: u64,
    message: u64,
    closed: bool,
}

impl FrameGuard {
    /// A guard for messages of at most `limit` bytes.
    pub fn new(limit: u64) -> FrameGuard {
        FrameGuard {
            limit,
            header: [0; 14],
            have: 0,
            payload_left: 0,
            message: 0,
            closed: false,
        }
    }

    /// Whether the close frame was passed on: the stream ends there.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Takes the next bytes from the client and appends to `out` what may be passed on.
    pub fn scan(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !self.closed {
            if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                let (payload, rest) = input.split_at(n);
                out.extend_from_slice(payload);
                input = rest;
                self.payload_left -= n as u64;
                if input.is_empty() {
                    return;
                }
                continue;
            }
            let Some((&byte, rest)) = input.split_first() else {
                return;
            };
            input = rest;
            if let Some(slot) = self.header.get_mut(self.have) {
                *slot = byte;
                self.have += 1;
            }
            let header = self.header.get(..self.have).unwrap_or(&[]);
            let Some(frame) = Frame::parse(header) else {
                continue;
            };
            if frame.is_data() {
                let total = self.message.saturating_add(frame.payload_len);
                if total > self.limit {
                    out.extend_from_slice(&close_frame(self.limit));
                    self.closed = true;
                    return;
                }
                self.message = if frame.fin { 0 } else { total };
            }
            out.extend_from_slice(header);
            self.have = 0;
            self.payload_left = frame.payload_len;
        }
    }
}

/// A complete frame header's fields.
struct Frame {
    fin: bool,
    opcode: u8,
    payload_len: u64,
}

impl Frame {
    /// The header in `bytes` if they are exactly one complete header, else `None`.
    fn parse(bytes: &[u8]) -> Option<Frame> {
        let (&first, rest) = bytes.split_first()?;
        let (&second, rest) = rest.split_first()?;
        let masked = second & 0x80 != 0;
        let (extended, rest) = match second & 0x7f {
            126 => rest.split_at_checked(2)?,
            127 => rest.split_at_checked(8)?,
            _ => (&[][..], rest),
        };
        let mask_len = if masked { 4 } else { 0 };
        if rest.len() != mask_len {
            return None;
        }
        let payload_len = match second & 0x7f {
            126 | 127 => extended
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
            n => u64::from(n),
        };
        Some(Frame {
            fin: first & 0x80 != 0,
            opcode: first & 0x0f,
            payload_len,
        })
    }

    /// Continuation, text and binary frames carry a message; the others are control frames.
    fn is_data(&self) -> bool {
        self.opcode & 0x08 == 0
    }
}

/// A masked (as a client's must be) close frame with status 1009 and a reason.
fn close_frame(limit: u64) -> Vec<u8> {
    let mut payload = CLOSE_MESSAGE_TOO_BIG.to_be_bytes().to_vec();
    let reason = format!("message larger than rpc.max_request_bytes ({limit})");
    payload.extend(reason.bytes().take(123));
    let mut frame = vec![0x88, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    // The mask key is zero, so the masked payload is the payload itself.
    frame.extend_from_slice(&payload);
    frame
}

/// A client's socket with the bounds of the module documentation.
pub struct GuardedIo {
    stream: TcpStream,
    conn: Arc<ConnState>,
    stall_timeout: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    frames: FrameGuard,
    /// Bytes read and let through by `frames`, not yet handed to the reader.
    outbox: Vec<u8>,
    taken: usize,
    /// The connection's slot, given back when the socket is dropped.
    _slot: OwnedSemaphorePermit,
}

impl GuardedIo {
    /// `stream`, whose writes may stall for at most `stall_timeout` and whose WebSocket
    /// messages may be at most `max_message_bytes`, holding `slot` while it is open.
    pub fn new(
        stream: TcpStream,
        conn: Arc<ConnState>,
        stall_timeout: Duration,
        max_message_bytes: u64,
        slot: OwnedSemaphorePermit,
    ) -> GuardedIo {
        GuardedIo {
            stream,
            conn,
            stall_timeout,
            stall: None,
            frames: FrameGuard::new(max_message_bytes),
            outbox: Vec::new(),
            taken: 0,
            _slot: slot,
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client did not read its responses in time",
    )
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.is_dead() {
            return Poll::Ready(Err(closed_error()));
        }
        if !this.conn.is_websocket() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        loop {
            if let Some(waiting) = this.outbox.get(this.taken..).filter(|w| !w.is_empty()) {
                let n = waiting.len().min(buf.remaining());
                buf.put_slice(waiting.get(..n).unwrap_or(&[]));
                this.taken += n;
                if this.taken >= this.outbox.len() {
                    this.outbox.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.frames.closed() {
                return Poll::Ready(Ok(()));
            }
            if this.conn.park_reader(cx.waker()) {
                return Poll::Pending;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.stream).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.frames.scan(read.filled(), &mut this.outbox);
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.conn.is_dead() {
            return Poll::Ready(Err(closed_error()));
        }
        match Pin::new(&mut this.stream).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                this.stall = None;
                this.conn.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => {
                this.conn.kill();
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                let timeout = this.stall_timeout;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stall.as_mut().poll(cx).is_ready() {
                    this.conn.kill();
                    return Poll::Ready(Err(closed_error()));
                }
                Poll::Pending
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A client frame: FIN as given, `opcode`, masked with a zero key.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `stream` to a guard in pieces of `step` bytes; what it let through.
    fn through(limit: u64, stream: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut guard = FrameGuard::new(limit);
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            guard.scan(piece, &mut out);
        }
        (out, guard.closed())
    }

    #[test]
    fn frames_within_the_limit_pass_unchanged_however_they_are_cut() {
        let mut stream = frame(true, 1, b"{\"jsonrpc\":\"2.0\"}");
        stream.extend(frame(true, 9, b"ping"));
        stream.extend(frame(false, 1, &[b'a'; 300]));
        stream.extend(frame(true, 0, &[b'b'; 700]));
        stream.extend(frame(true, 2, &[7; 70_000]));
        for step in [1, 2, 3, 7, 14, 100, 4096, stream.len()] {
            let (out, closed) = through(70_000, &stream, step);
            assert!(!closed, "step {step}");
            assert_eq!(out, stream, "step {step}");
        }
    }

    #[test]
    fn a_message_over_the_limit_becomes_a_close_frame() {
        let first = frame(true, 1, b"[]");
        let mut stream = first.clone();
        stream.extend(frame(true, 1, &[b'x'; 2000]));
        stream.extend(frame(true, 1, b"never seen"));
        for step in [1, 5, 13, 64, stream.len()] {
            let (out, closed) = through(1000, &stream, step);
            assert!(closed, "step {step}");
            let (head, close) = out.split_at(first.len());
            assert_eq!(head, first.as_slice(), "step {step}");
            assert_eq!(close[0], 0x88);
            assert_eq!(usize::from(close[1] & 0x7f), close.len() - 6);
            assert_eq!(u16::from_be_bytes([close[6], close[7]]), 1009);
            let reason = std::str::from_utf8(&close[8..]).unwrap();
            assert_eq!(reason, "message larger than rpc.max_request_bytes (1000)");
        }
    }

    #[test]
    fn the_frames_of_one_message_count_together() {
        let mut stream = frame(false, 1, &[b'a'; 600]);
        stream.extend(frame(true, 9, b"a ping in between"));
        stream.extend(frame(true, 0, &[b'b'; 600]));
        let (_, closed) = through(1000, &stream, 50);
        assert!(closed);
        // Two whole messages of 600 bytes each are fine.
        let mut two = frame(true, 1, &[b'a'; 600]);
        two.extend(frame(true, 1, &[b'b'; 600]));
        assert_eq!(through(1000, &two, 50), (two.clone(), false));
    }

    #[test]
    fn a_header_claiming_a_huge_length_closes_before_any_payload() {
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&u64::MAX.to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        let (out, closed) = through(1 << 20, &header, 3);
        assert!(closed);
        assert_eq!(out[0], 0x88);
    }

    #[tokio::test]
    async fn answers_count_in_the_servers_buffers_until_written_or_the_connection_closes() {
        let buffers = RpcBuffers::new(100);
        let conn = ConnState::new(buffers.clone());
        conn.queued(80);
        conn.queued(40);
        assert_eq!(buffers.buffered(), 120);
        assert!(buffers.over_budget());
        // Writes count what was queued, never more (headers and frames are written too).
        conn.wrote(50);
        assert_eq!(buffers.buffered(), 70);
        assert!(!buffers.over_budget());
        let other = ConnState::new(buffers.clone());
        other.queued(30);
        conn.wrote(500);
        assert_eq!(buffers.buffered(), 30);
        {
            let _body = buffers.hold(1_000);
            assert_eq!(buffers.buffered(), 1_030);
        }
        // Open connections count in what is used, not against the budget.
        assert_eq!(buffers.used(), 30 + 2 * CONNECTION_BYTES as u64);
        assert!(!buffers.over_budget());
        // A connection closed with answers unwritten gives them back.
        drop(other);
        assert_eq!(buffers.buffered(), 0);
        assert_eq!(buffers.used(), CONNECTION_BYTES as u64);
        drop(conn);
        assert_eq!(buffers.used(), 0);
    }

    #[tokio::test]
    async fn admission_waits_for_unsent_answers_to_drain() {
        let conn = Arc::new(ConnState::default());
        conn.upgrade();
        let first = conn.admit().await;
        conn.queued(UNSENT_BUDGET + 1);
        drop(first);
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move {
                let _call = conn.admit().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "admitted over the budget");
        conn.wrote(2);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once drained")
            .unwrap();
        assert_eq!(conn.in_flight.load(Ordering::Acquire), 0);
    }
}
