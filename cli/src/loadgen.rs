//! `keel loadgen`: drives a network with signed transfers at a fixed rate and measures what
//! becomes final, and how fast.
//!
//! A run has four phases:
//! 1. **Setup.** Every `--rpc` endpoint answers `chain_status` (one chain id among them); the
//!    first one's WebSocket carries the `chain_subscribeFinalizedHeads` subscription that
//!    tracks finality for the whole run.
//! 2. **Funding.** K sending accounts are derived from the key file's secret and the account
//!    index (so a rerun with the same key reuses them and only tops up what is missing).
//!    Each gets enough for its share of the run; up to 64 accounts are funded by the key's
//!    account directly, beyond that the first 64 become hubs that fund the rest: two rounds
//!    of finality (one more per further 64 accounts a hub funds). The timed phase starts once
//!    every funding transfer is final at every endpoint.
//! 3. **Send phase** (`--duration` seconds). Slot `i` is due at `start + i / R`; the
//!    scheduler never waits for answers (open loop). Each slot goes to the next account (round
//!    robin) whose nonce window has room; how late each send is against its slot is recorded.
//!    Account `i` always submits to endpoint `i mod N`, so its nonces reach one node in order.
//!    With `--batch N` above 1, an endpoint's transfers go out as one JSON-RPC batch of `N`
//!    `tx_submit` calls ([`Batches`]), or fewer once the first has waited [`BATCH_WAIT`];
//!    each call in it is answered and counted as if sent alone.
//! 4. **Drain** (up to `--drain-timeout`): no new nonces; refused ones are sent again and
//!    accepted transfers are waited for.
//!
//! Nonces are tracked locally per account ([`NonceWindow`]): keel admits a transaction against
//! the node's final state and refuses a nonce more than 64 above the account's nonce there, so
//! an account never has a nonce 64 or more above its lowest nonce not yet known final. (An
//! endpoint whose finality lags the first one's may still refuse "too high": that nonce is
//! sent again.) A refused nonce leaves a gap that holds back the
//! account's later transfers, so it is sent again after a short back-off (also in the drain),
//! except when the node says it is used already (skipped) or the refusal can only repeat
//! (bad signature, wrong chain, fee too low: the account retires). "Insufficient funds" is
//! retried: the funding covers the run, and the usual cause is an endpoint that has not
//! applied the funding block yet (the send phase waits for every endpoint to reach it).
//! The transaction for (account, nonce) is always the same bytes, so a resend of a
//! transaction the node already holds is answered "already known" and counted as accepted.
//!
//! Accounting ([`Tally`]): `submitted` counts `tx_submit` calls; each is answered `accepted`
//! or `rejected` (by reason), so `accepted == submitted - rejected` once every call has
//! returned. `final` counts accepted transfers seen in a finalized block, so
//! `final <= accepted`; `not_final = accepted - final` at the end.
//!
//! Memory is bounded whatever the run's length: the in-flight map holds at most 64
//! transactions per account, the latency and lateness figures are fixed-size histograms, and
//! rejection reasons are counted per class.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use jsonrpsee::core::client::ClientT;
use jsonrpsee::core::ClientError;
use jsonrpsee::http_client::{HttpClient, HttpClientBuilder};
use jsonrpsee::ws_client::{WsClient, WsClientBuilder};
use keel_node::home;
use keel_node::rpc::types::{AccountInfo, BlockBody, BlockId, HeaderInfo, SignedTxHex};
use keel_node::{Address, Hash, Keypair, Transaction, TxKind};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use crate::args::LoadgenArgs;
use crate::client::{KeelApiClient, Rpc};

/// How many nonces above its lowest nonce not known final an account may use. keel admits
/// nonces up to 64 above the account's nonce in the node's final state.
const WINDOW: u64 = 64;

/// Key-derivation prefix of the sending accounts' secrets.
const ACCOUNT_DOMAIN: &[u8] = b"keel loadgen account v1";

/// How long a refused nonce waits before it is sent again.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// How long one `tx_submit` may take before it counts as rejected ("timeout").
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent `tx_submit` calls per endpoint (each may hold a connection).
const MAX_CONCURRENT_SUBMITS: usize = 512;

/// Most transfers per submission request (`--batch`).
const MAX_BATCH: usize = 1000;

/// How long the first transfer of a partly filled batch waits for more (`--batch` above 1).
const BATCH_WAIT: Duration = Duration::from_millis(10);

/// How long a round of funding transfers may take to become final.
const FUNDING_TIMEOUT: Duration = Duration::from_secs(60);

/// Concurrent `state_getAccount` calls while reading the accounts.
const ACCOUNT_QUERIES: usize = 32;

/// Most distinct rejection classes counted separately (the rest are lumped as "other").
const MAX_REJECT_CLASSES: usize = 64;

/// Runs `keel loadgen`.
pub fn run(args: LoadgenArgs) -> Result<()> {
    let plan = Plan::from_args(&args)?;
    let funder = home::read_key_file(&args.key).context("--key")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting async runtime")?;
    let report = runtime.block_on(run_async(plan, funder))?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        outln!("{text}");
    } else {
        print_text(&report);
    }
    Ok(())
}

/// The command line, checked.
#[derive(Debug, Clone)]
struct Plan {
    endpoints: Vec<String>,
    tps: f64,
    duration: Duration,
    accounts: usize,
    amount: u64,
    fee: Option<u64>,
    drain_timeout: Duration,
    /// Transfers per submission request (a JSON-RPC batch when above 1).
    batch: usize,
    json: bool,
}

impl Plan {
    fn from_args(args: &LoadgenArgs) -> Result<Plan> {
        if !(args.tps.is_finite() && args.tps > 0.0) {
            bail!(
                "--tps {} is not a positive rate in transfers per second",
                args.tps
            );
        }
        if args.tps > 1_000_000.0 {
            bail!(
                "--tps {} is above the most keel loadgen sends (1000000)",
                args.tps
            );
        }
        if args.duration == 0 {
            bail!("--duration must be at least 1 second");
        }
        let endpoints: Vec<String> = args
            .rpc
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("--rpc names no endpoint");
        }
        for url in &endpoints {
            http_url(url)?;
        }
        let accounts = match args.accounts {
            Some(0) => bail!("--accounts must be at least 1"),
            Some(k) => k as usize,
            None => default_accounts(args.tps),
        };
        if accounts > 100_000 {
            bail!("--accounts {accounts} is above the most keel loadgen drives (100000)");
        }
        if args.amount == 0 {
            bail!("--amount must be at least 1");
        }
        if !(1..=MAX_BATCH).contains(&(args.batch as usize)) {
            bail!(
                "--batch {} is not from 1 to {MAX_BATCH} transfers per request",
                args.batch
            );
        }
        Ok(Plan {
            endpoints,
            tps: args.tps,
            duration: Duration::from_secs(args.duration),
            accounts,
            amount: args.amount,
            fee: args.fee,
            drain_timeout: Duration::from_secs(args.drain_timeout),
            batch: args.batch as usize,
            json: args.json,
        })
    }

    /// Slots of the send phase: `floor(R * S)`.
    fn slots(&self) -> u64 {
        (self.tps * self.duration.as_secs_f64()).floor() as u64
    }
}

/// `--accounts` when not given: each account sends at most 8 transfers per second, so its
/// 64-nonce window lasts 8 s of submit-to-final latency; at least 16.
pub fn default_accounts(tps: f64) -> usize {
    ((tps / 8.0).ceil() as usize).max(16)
}

/// The HTTP URL of an endpoint given as `http(s)://` or `ws(s)://`.
fn http_url(url: &str) -> Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow!("--rpc {url:?} is not a URL (expected http://HOST:PORT)"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "http",
        "https" | "wss" => "https",
        other => bail!("--rpc {url:?}: unsupported scheme {other:?} (use http, https, ws or wss)"),
    };
    if rest.is_empty() || rest.starts_with('/') {
        bail!("--rpc {url:?} names no host");
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The WebSocket URL of an endpoint (same host and port as its HTTP URL).
fn ws_url(url: &str) -> Result<String> {
    let http = http_url(url)?;
    Ok(match http.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}"),
        None => format!("ws://{}", http.trim_start_matches("http://")),
    })
}

/// The secret of sending account `index`: blake3 of a domain prefix, the funder's secret and
/// the index, so the same key file always drives the same accounts.
fn derive_account(funder: &Keypair, index: u64) -> Keypair {
    let mut material = Vec::with_capacity(ACCOUNT_DOMAIN.len() + 40);
    material.extend_from_slice(ACCOUNT_DOMAIN);
    material.extend_from_slice(&funder.secret());
    material.extend_from_slice(&index.to_le_bytes());
    Keypair::from_secret(*Hash::digest(&material).as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Nonces
// ---------------------------------------------------------------------------------------------

/// Where one sending account's nonces stand.
///
/// Invariant: every nonce below `floor` is final; every nonce handed out by [`take`] is below
/// `floor + WINDOW`; nonces in `free` were refused, are at least `floor` and below `next`.
///
/// [`take`]: NonceWindow::take
#[derive(Debug, Clone, PartialEq, Eq)]
struct NonceWindow {
    /// Lowest nonce not known to be final.
    floor: u64,
    /// Next nonce never handed out.
    next: u64,
    /// Nonces handed out, refused, and to be sent again (lowest first): until they are, the
    /// account's later transactions wait in the mempool behind the gap.
    free: BTreeSet<u64>,
    /// Refused nonces are not sent again before this (a node that refused "too high" because
    /// it lags, or "mempool full", needs a moment).
    retry_at: Option<Instant>,
    /// No more sends from this account.
    retired: bool,
}

impl NonceWindow {
    /// An account whose final nonce is `final_nonce` and whose next unused nonce (counting
    /// transactions pending from elsewhere) is `next`.
    fn new(final_nonce: u64, next: u64) -> NonceWindow {
        NonceWindow {
            floor: final_nonce,
            next: next.max(final_nonce),
            free: BTreeSet::new(),
            retry_at: None,
            retired: false,
        }
    }

    /// The nonce to send next at `now`: a refused one whose back-off has passed, else a new
    /// one if the window has room.
    fn take(&mut self, now: Instant) -> Option<u64> {
        if let Some(nonce) = self.take_refused(now) {
            return Some(nonce);
        }
        if self.retired || self.next >= self.floor.saturating_add(WINDOW) {
            return None;
        }
        let nonce = self.next;
        self.next = self.next.saturating_add(1);
        Some(nonce)
    }

    /// A refused nonce due to be sent again at `now`, lowest first.
    fn take_refused(&mut self, now: Instant) -> Option<u64> {
        if self.retired || self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.free.pop_first()
    }

    /// Whether refused nonces wait to be sent again (the account has a gap).
    fn has_gap(&self) -> bool {
        !self.retired && !self.free.is_empty()
    }

    /// A transaction of this account with `nonce` is final: so is every lower nonce.
    fn finalized(&mut self, nonce: u64) {
        self.floor = self.floor.max(nonce.saturating_add(1));
        self.next = self.next.max(self.floor);
        let floor = self.floor;
        self.free.retain(|n| *n >= floor);
    }

    /// `nonce` was refused at `now` and must be sent again (unless it is final meanwhile),
    /// after [`RETRY_BACKOFF`].
    fn give_back(&mut self, nonce: u64, now: Instant) {
        if nonce >= self.floor && nonce < self.next {
            self.free.insert(nonce);
            self.retry_at = Some(now + RETRY_BACKOFF);
        }
    }

    /// The account sends nothing more.
    fn retire(&mut self) {
        self.retired = true;
        self.free.clear();
    }
}

// ---------------------------------------------------------------------------------------------
// Rejections
// ---------------------------------------------------------------------------------------------

/// A class of refusal: the JSON-RPC error code (none for transport failures) and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RejectClass {
    code: Option<i32>,
    reason: &'static str,
}

/// What a refusal means for the refused nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonceFate {
    /// Send it again later (mempool full, timeout, a lagging node's "too high" ...).
    Retry,
    /// The node says it is used already: skip it.
    Used,
    /// Refusals that can only repeat: the account sends nothing more.
    Retire,
}

/// How the node answered one `tx_submit`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Admitted (or already held: same bytes, so the same transaction).
    Accepted,
    /// Refused.
    Rejected {
        class: RejectClass,
        fate: NonceFate,
        message: String,
    },
}

/// JSON-RPC error code of "transaction already known" (docs/rpc.md).
const ALREADY_KNOWN: i32 = -32007;

/// Classifies the answer to a `tx_submit`.
fn classify(result: Result<Hash, ClientError>) -> Answer {
    let err = match result {
        Ok(_) => return Answer::Accepted,
        Err(e) => e,
    };
    let (class, fate, message) = match err {
        ClientError::Call(obj) if obj.code() == ALREADY_KNOWN => return Answer::Accepted,
        ClientError::Call(obj) => {
            let code = obj.code();
            let message = obj.message().to_string();
            let (reason, fate) = reject_reason(code, &message);
            (
                RejectClass {
                    code: Some(code),
                    reason,
                },
                fate,
                message,
            )
        }
        ClientError::RequestTimeout => (
            RejectClass {
                code: None,
                reason: "timeout",
            },
            NonceFate::Retry,
            format!("no answer within {} s", SUBMIT_TIMEOUT.as_secs()),
        ),
        ClientError::Transport(e) => (
            RejectClass {
                code: None,
                reason: "transport",
            },
            NonceFate::Retry,
            e.to_string(),
        ),
        other => (
            RejectClass {
                code: None,
                reason: "client",
            },
            NonceFate::Retry,
            other.to_string(),
        ),
    };
    Answer::Rejected {
        class,
        fate,
        message: one_line(&message),
    }
}

/// The name of a JSON-RPC error code (docs/rpc.md's table) and what it means for the nonce.
fn reject_reason(code: i32, message: &str) -> (&'static str, NonceFate) {
    match code {
        -32000 => ("internal error", NonceFate::Retry),
        -32001 => ("invalid signature", NonceFate::Retire),
        -32002 if message.contains("too low") => ("nonce too low", NonceFate::Used),
        -32002 if message.contains("too high") => ("nonce too high", NonceFate::Retry),
        -32002 => ("bad nonce", NonceFate::Retry),
        // A lagging endpoint may not have applied the funding yet: try again later.
        -32003 => ("insufficient funds", NonceFate::Retry),
        -32004 => ("mempool full", NonceFate::Retry),
        -32020 => ("rate limited", NonceFate::Retry),
        -32027 => ("memory pressure", NonceFate::Retry),
        -32005 => ("fee too low", NonceFate::Retire),
        -32006 => ("wrong chain id", NonceFate::Retire),
        -32008 => ("transaction too large", NonceFate::Retire),
        -32700 => ("parse error", NonceFate::Retire),
        -32600 => ("invalid request", NonceFate::Retire),
        -32601 => ("unknown method", NonceFate::Retire),
        -32602 => ("invalid params", NonceFate::Retire),
        // Codes this build does not know: most likely passing, so the nonce is tried again.
        _ => ("other", NonceFate::Retry),
    }
}

/// `s` on one line, at most 200 characters.
fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

// ---------------------------------------------------------------------------------------------
// Histogram
// ---------------------------------------------------------------------------------------------

/// Sub-buckets per power of two: values are kept within 1/64 (1.6%) of what they were.
const SUB_BUCKETS: u64 = 64;
const SUB_BITS: u32 = 6;
/// Buckets covering all of `u64`.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB_BUCKETS as usize;

/// A fixed-size log-linear histogram of durations in microseconds (HDR-style): exact below
/// 64 µs, within 1.6% above, in 30 KiB however many values it holds.
#[derive(Clone)]
struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB_BUCKETS {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let sub = (v >> shift) & (SUB_BUCKETS - 1);
        (u64::from(shift + 1) * SUB_BUCKETS + sub) as usize
    }

    /// The smallest and largest value that land in bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < SUB_BUCKETS {
            return (i, i);
        }
        let shift = i / SUB_BUCKETS - 1;
        let low = (SUB_BUCKETS + i % SUB_BUCKETS) << shift;
        (low, low.saturating_add((1u64 << shift) - 1))
    }

    fn record(&mut self, d: Duration) {
        let v = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(c) = self.counts.get_mut(Self::index(v)) {
            *c += 1;
        }
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// The `q` quantile (0 < q <= 1) in microseconds: the middle of the bucket holding the
    /// value of rank `ceil(q * count)`, clamped to the values seen (the largest for the top
    /// rank).
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            return Some(self.max);
        }
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, high) = Self::bounds(i);
                let mid = low + (high - low) / 2;
                return Some(mid.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// p50, p95, p99, max and mean in milliseconds; `None` if empty.
    fn summary(&self) -> Option<Quantiles> {
        let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
        Some(Quantiles {
            p50: ms(self.quantile(0.50)?),
            p95: ms(self.quantile(0.95)?),
            p99: ms(self.quantile(0.99)?),
            max: ms(self.max),
            mean: ms((self.sum / u128::from(self.count.max(1))) as u64),
        })
    }
}

/// Quantiles of a distribution, in milliseconds (0.1 ms resolution).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

// ---------------------------------------------------------------------------------------------
// The run's bookkeeping
// ---------------------------------------------------------------------------------------------

/// A submitted transfer not yet final (nor refused).
#[derive(Debug, Clone, Copy)]
struct InFlight {
    account: usize,
    nonce: u64,
    sent_at: Instant,
}

/// Count and first message of one rejection class.
#[derive(Debug, Clone)]
struct RejectCount {
    count: u64,
    message: String,
}

/// Everything the run counts; plain synchronous logic behind one mutex.
struct Tally {
    windows: Vec<NonceWindow>,
    /// Next account the scheduler tries.
    cursor: usize,
    in_flight: HashMap<Hash, InFlight>,
    /// Funding transfers not final yet.
    funding: HashSet<Hash>,
    submitted: u64,
    accepted: u64,
    rejected: u64,
    final_count: u64,
    rejects: BTreeMap<RejectClass, RejectCount>,
    latency: Histogram,
    lateness: Histogram,
    /// Slots that found every account's window full.
    window_stalls: u64,
    first_send: Option<Instant>,
    last_final: Option<Instant>,
    /// Heights scanned since the send phase began: first and last.
    first_height: Option<u64>,
    last_height: Option<u64>,
    /// Highest finalized height scanned so far, in any phase.
    scanned_height: u64,
    /// Whether the send phase has begun (heights are recorded from then on).
    measuring: bool,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            windows: Vec::new(),
            cursor: 0,
            in_flight: HashMap::new(),
            funding: HashSet::new(),
            submitted: 0,
            accepted: 0,
            rejected: 0,
            final_count: 0,
            rejects: BTreeMap::new(),
            latency: Histogram::new(),
            lateness: Histogram::new(),
            window_stalls: 0,
            first_send: None,
            last_final: None,
            first_height: None,
            last_height: None,
            scanned_height: 0,
            measuring: false,
        }
    }

    /// The next (account, nonce) to send at `now`, round robin over the accounts with room;
    /// `Err(true)` if every account has retired, `Err(false)` if every window is full for now.
    fn next_send(&mut self, now: Instant) -> Result<(usize, u64), bool> {
        let n = self.windows.len();
        let mut all_retired = true;
        for k in 0..n {
            let i = (self.cursor + k) % n;
            let Some(w) = self.windows.get_mut(i) else {
                continue;
            };
            all_retired &= w.retired;
            if let Some(nonce) = w.take(now) {
                self.cursor = (i + 1) % n;
                return Ok((i, nonce));
            }
        }
        Err(all_retired)
    }

    /// Up to `max` refused nonces due to be sent again at `now` (the drain closes the gaps
    /// they leave, or the accounts' later transfers could never become final).
    fn repairs(&mut self, now: Instant, max: usize) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (i, w) in self.windows.iter_mut().enumerate() {
            if out.len() >= max {
                break;
            }
            if let Some(nonce) = w.take_refused(now) {
                out.push((i, nonce));
            }
        }
        out
    }

    /// Whether some account has a refused nonce still to send.
    fn has_gaps(&self) -> bool {
        self.windows.iter().any(NonceWindow::has_gap)
    }

    /// A transfer is about to be submitted.
    fn sent(&mut self, hash: Hash, account: usize, nonce: u64, at: Instant) {
        self.submitted += 1;
        self.first_send.get_or_insert(at);
        self.in_flight.insert(
            hash,
            InFlight {
                account,
                nonce,
                sent_at: at,
            },
        );
    }

    /// The node answered the submission of `hash` at `now`. Whether the nonce came back for
    /// a resend.
    fn answered(
        &mut self,
        hash: Hash,
        account: usize,
        nonce: u64,
        answer: Answer,
        now: Instant,
    ) -> bool {
        let Answer::Rejected {
            class,
            fate,
            message,
        } = answer
        else {
            self.accepted += 1;
            return false;
        };
        if self.in_flight.remove(&hash).is_none() {
            // Already seen final: whatever the transport said, the node took it.
            self.accepted += 1;
            return false;
        }
        self.rejected += 1;
        let class =
            if self.rejects.len() >= MAX_REJECT_CLASSES && !self.rejects.contains_key(&class) {
                RejectClass {
                    code: None,
                    reason: "other",
                }
            } else {
                class
            };
        self.rejects
            .entry(class)
            .or_insert_with(|| RejectCount { count: 0, message })
            .count += 1;
        let Some(w) = self.windows.get_mut(account) else {
            return false;
        };
        match fate {
            NonceFate::Retry => {
                w.give_back(nonce, now);
                true
            }
            NonceFate::Used => false,
            NonceFate::Retire => {
                w.retire();
                false
            }
        }
    }

    /// The block at `height`, seen final at `at`, holds `hashes`.
    fn block_final(&mut self, height: u64, hashes: &[Hash], at: Instant) {
        self.scanned_height = self.scanned_height.max(height);
        if self.measuring {
            self.first_height.get_or_insert(height);
            self.last_height = Some(height);
        }
        for h in hashes {
            if self.funding.remove(h) {
                continue;
            }
            let Some(tx) = self.in_flight.remove(h) else {
                continue;
            };
            self.final_count += 1;
            self.latency
                .record(at.saturating_duration_since(tx.sent_at));
            self.last_final = Some(self.last_final.map_or(at, |t| t.max(at)));
            if let Some(w) = self.windows.get_mut(tx.account) {
                w.finalized(tx.nonce);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Funding plan
// ---------------------------------------------------------------------------------------------

/// Funding transfers: from the funder to each account in `direct`, then from each hub to
/// its children (`(hub, [(child, amount)])`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FundingPlan {
    /// `(account, amount)` sent by the funder.
    direct: Vec<(usize, u64)>,
    /// `(hub, [(account, amount)])`: sent by a hub once its own funding is final.
    hubs: Vec<(usize, Vec<(usize, u64)>)>,
}

impl FundingPlan {
    /// A plan topping every account up to its deficit (`deficits[i]`, 0 for none). Up to
    /// [`WINDOW`] accounts are funded directly; beyond that the first [`WINDOW`] needy
    /// accounts are hubs that also carry their children's amounts and fees.
    fn new(deficits: &[u64], fee: u64) -> Result<FundingPlan> {
        let needy: Vec<usize> = (0..deficits.len())
            .filter(|i| deficits.get(*i).is_some_and(|d| *d > 0))
            .collect();
        let deficit = |i: usize| deficits.get(i).copied().unwrap_or(0);
        let hub_count = WINDOW as usize;
        if needy.len() <= hub_count {
            return Ok(FundingPlan {
                direct: needy.iter().map(|i| (*i, deficit(*i))).collect(),
                hubs: Vec::new(),
            });
        }
        let (hubs, rest) = needy.split_at(hub_count);
        let mut children: Vec<Vec<(usize, u64)>> = vec![Vec::new(); hub_count];
        for (j, child) in rest.iter().enumerate() {
            if let Some(list) = children.get_mut(j % hub_count) {
                list.push((*child, deficit(*child)));
            }
        }
        let mut direct = Vec::with_capacity(hub_count);
        for (hub, kids) in hubs.iter().zip(&children) {
            let mut amount = deficit(*hub);
            for (_, a) in kids {
                amount = amount
                    .checked_add(*a)
                    .and_then(|x| x.checked_add(fee))
                    .ok_or_else(|| anyhow!("funding amounts overflow: lower --amount or --fee"))?;
            }
            direct.push((*hub, amount));
        }
        Ok(FundingPlan {
            direct,
            hubs: hubs.iter().copied().zip(children).collect(),
        })
    }

    /// What the funder spends: its transfers and their fees.
    fn funder_cost(&self, fee: u64) -> Option<u64> {
        self.direct
            .iter()
            .try_fold(0u64, |acc, (_, a)| acc.checked_add(*a)?.checked_add(fee))
    }

    fn transfers(&self) -> usize {
        self.direct.len() + self.hubs.iter().map(|(_, c)| c.len()).sum::<usize>()
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// One rejection class in the report.
#[derive(Debug, Clone, Serialize)]
pub struct RejectReport {
    /// JSON-RPC error code; null for a transport failure or a timeout.
    pub code: Option<i32>,
    /// Class name (docs/rpc.md's error table, or `transport`, `timeout`, `client`).
    pub reason: String,
    /// Submissions refused this way.
    pub count: u64,
    /// The first message of this class.
    pub message: String,
}

/// The funding phase.
#[derive(Debug, Clone, Serialize)]
pub struct FundingReport {
    /// Accounts that received funds (the others had enough from an earlier run).
    pub accounts_funded: usize,
    /// Funding transfers sent (hubs' included).
    pub transfers: usize,
    /// Seconds the funding took, until its last transfer was final.
    pub seconds: f64,
}

/// What `keel loadgen` reports (`--json` prints it as is; docs/benchmarks.md).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `--tps`.
    pub target_tps: f64,
    /// `--duration`, seconds.
    pub duration_s: u64,
    /// Sending accounts.
    pub accounts: usize,
    /// The endpoints, as given.
    pub endpoints: Vec<String>,
    /// Slots of the send phase: floor(tps * duration).
    pub planned: u64,
    /// `tx_submit` calls made (a refused nonce sent again counts again).
    pub submitted: u64,
    /// Submissions the node admitted (or already held).
    pub accepted: u64,
    /// Submissions refused: `submitted - accepted`.
    pub rejected: u64,
    /// Refusals by class.
    pub rejected_by_reason: Vec<RejectReport>,
    /// Accepted transfers seen in a finalized block.
    #[serde(rename = "final")]
    pub final_count: u64,
    /// Accepted transfers not final when the drain ended.
    pub not_final: u64,
    /// Slots never sent: every account's window was full until the send phase ended.
    pub unsent: u64,
    /// Final transfers per second, over the span from the first submission to the last
    /// finalization seen.
    pub achieved_tps: f64,
    /// Submissions per second of the send phase.
    pub submit_tps: f64,
    /// Submit-to-final latency of the final transfers (ms); null if none became final.
    pub latency_ms: Option<Quantiles>,
    /// How far behind its slot each submission went out (ms); null if none was sent.
    pub lateness_ms: Option<Quantiles>,
    /// Slots that found every account's nonce window full (raise --accounts if not 0).
    pub window_stalls: u64,
    /// First finalized height scanned after the send phase began.
    pub first_height: Option<u64>,
    /// Last finalized height scanned: every transfer final at or below it was counted.
    pub last_height: Option<u64>,
    /// The funding phase.
    pub funding: FundingReport,
    /// Seconds of the send phase.
    pub send_seconds: f64,
    /// Seconds of the drain.
    pub drain_seconds: f64,
    /// Times the finalized-heads subscription was opened again after it ended.
    pub resubscribes: u64,
}

fn print_text(r: &Report) {
    let opt = |q: &Option<Quantiles>| match q {
        Some(q) => format!(
            "p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            q.p50, q.p95, q.p99, q.max
        ),
        None => "none".to_string(),
    };
    outln!(
        "keel loadgen: {} tx/s for {} s from {} accounts to {}",
        r.target_tps,
        r.duration_s,
        r.accounts,
        r.endpoints.join(", ")
    );
    outln!(
        "funding:    {} accounts funded by {} transfers in {:.1} s",
        r.funding.accounts_funded,
        r.funding.transfers,
        r.funding.seconds
    );
    outln!(
        "submitted:  {} of {} planned ({:.1}/s){}",
        r.submitted,
        r.planned,
        r.submit_tps,
        if r.unsent > 0 {
            format!(", {} slots unsent", r.unsent)
        } else {
            String::new()
        }
    );
    outln!("accepted:   {}", r.accepted);
    outln!("rejected:   {}", r.rejected);
    for c in &r.rejected_by_reason {
        let code = c.code.map_or(String::new(), |c| format!(" ({c})"));
        outln!("  {}{code}: {}  e.g. {}", c.reason, c.count, c.message);
    }
    outln!(
        "final:      {}  ({} accepted but not final after the drain)",
        r.final_count,
        r.not_final
    );
    outln!("achieved:   {:.1} final tx/s", r.achieved_tps);
    outln!("latency:    {}  (submit to final)", opt(&r.latency_ms));
    outln!(
        "lateness:   {}  (send behind schedule)",
        opt(&r.lateness_ms)
    );
    if r.window_stalls > 0 {
        outln!(
            "note: {} sends waited for an account's 64-nonce window; more --accounts would keep the schedule",
            r.window_stalls
        );
    }
    if let (Some(a), Some(b)) = (r.first_height, r.last_height) {
        outln!("heights:    {a}..={b}");
    }
}

// ---------------------------------------------------------------------------------------------
// The async run
// ---------------------------------------------------------------------------------------------

/// One endpoint: a client for single calls (clear errors) and one for the submissions.
struct Endpoint {
    rpc: Rpc,
    submit: HttpClient,
}

/// What the tasks of a run share.
struct Ctx {
    tally: Mutex<Tally>,
    /// Woken when a transfer is final or a nonce comes back.
    notify: Notify,
    endpoints: Vec<Endpoint>,
    keys: Vec<Keypair>,
    /// Recipient of account i's transfers.
    recipients: Vec<Address>,
    chain_id: String,
    fee: u64,
    amount: u64,
    /// `tx_submit` calls not answered yet.
    outstanding: AtomicU64,
}

impl Ctx {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // A panic elsewhere cannot leave the counts half-updated in a way that matters more
        // than losing the run's report.
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Account `account`'s transfer with `nonce` to the next account of the ring, signed
    /// (always the same bytes for the same pair).
    fn transfer(&self, account: usize, nonce: u64) -> Option<Transaction> {
        let (key, to) = (self.keys.get(account)?, self.recipients.get(account)?);
        Some(Transaction::sign(
            key,
            &self.chain_id,
            nonce,
            self.fee,
            TxKind::Transfer {
                to: *to,
                amount: self.amount,
            },
        ))
    }

    fn endpoint(&self, account: usize) -> Option<&Endpoint> {
        self.endpoints.get(account % self.endpoints.len().max(1))
    }

    fn first(&self) -> Result<&Endpoint> {
        self.endpoints.first().ok_or_else(|| anyhow!("no endpoint"))
    }
}

/// The progress display: a bar on a terminal, plain lines on a non-terminal, nothing with
/// `--json`.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
}

impl Progress {
    fn new(json: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!json && terminal).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            lines: !json && !terminal,
        }
    }

    /// A phase begins.
    fn phase(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        } else if self.lines {
            eprintln!("{what}");
        }
    }

    /// Switches to the send phase's bar of `slots` submissions.
    fn start_sending(&self, slots: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(slots);
            bar.set_position(0);
            bar.reset_elapsed();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} submitted  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
        }
    }

    fn update(&self, submitted: u64, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(submitted);
            bar.set_message(msg);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn run_async(plan: Plan, funder: Keypair) -> Result<Report> {
    let progress = Progress::new(plan.json);
    let result = run_phases(&plan, funder, &progress).await;
    progress.finish();
    result
}

async fn run_phases(plan: &Plan, funder: Keypair, progress: &Progress) -> Result<Report> {
    // Setup: every endpoint answers and serves one chain.
    let mut endpoints = Vec::with_capacity(plan.endpoints.len());
    let mut chain: Option<(String, u64)> = None;
    for url in &plan.endpoints {
        let http = http_url(url)?;
        let rpc = Rpc::new(&http)?;
        let status = rpc.call("chain_status", rpc.api().chain_status()).await?;
        match &chain {
            None => chain = Some((status.chain_id.clone(), status.min_fee)),
            Some((id, _)) if *id != status.chain_id => bail!(
                "{url} serves chain {:?} but {} serves {id:?}",
                status.chain_id,
                plan.endpoints.first().map_or("", String::as_str)
            ),
            Some(_) => {}
        }
        let submit = HttpClientBuilder::default()
            .request_timeout(SUBMIT_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .max_concurrent_requests(MAX_CONCURRENT_SUBMITS)
            .build(&http)
            .with_context(|| format!("invalid RPC url {url}"))?;
        endpoints.push(Endpoint { rpc, submit });
    }
    let Some((chain_id, min_fee)) = chain else {
        bail!("--rpc names no endpoint");
    };
    let fee = plan.fee.unwrap_or(min_fee);
    if fee < min_fee {
        bail!("--fee {fee} is below the chain's minimum fee {min_fee}");
    }

    // Finality tracking starts before anything is sent.
    let first_url = plan.endpoints.first().map_or("", String::as_str);
    let ws = ws_url(first_url)?;
    let (ws_client, sub) = subscribe(&ws).await?;
    let first = endpoints
        .first()
        .ok_or_else(|| anyhow!("--rpc names no endpoint"))?;
    let finalized_from = first
        .rpc
        .call("chain_status", first.rpc.api().chain_status())
        .await?
        .finalized_height;

    let keys: Vec<Keypair> = (0..plan.accounts as u64)
        .map(|i| derive_account(&funder, i))
        .collect();
    let recipients: Vec<Address> = (0..keys.len())
        .map(|i| match keys.get((i + 1) % keys.len()) {
            Some(k) if keys.len() > 1 => k.address(),
            _ => funder.address(),
        })
        .collect();
    let ctx = Arc::new(Ctx {
        tally: Mutex::new(Tally::new()),
        notify: Notify::new(),
        endpoints,
        keys,
        recipients,
        chain_id,
        fee,
        amount: plan.amount,
        outstanding: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let resubscribes = Arc::new(AtomicU64::new(0));
    let tracker = tokio::spawn(track_finality(
        ctx.clone(),
        ws,
        ws_client,
        sub,
        finalized_from,
        stop_rx.clone(),
        resubscribes.clone(),
    ));

    let result = async {
        let funding = fund(&ctx, plan, &funder, progress).await?;
        let (send_seconds, unsent) = send_phase(&ctx, plan, progress, stop_rx.clone()).await;
        let drain_seconds = drain(&ctx, plan, progress).await;
        Ok::<_, anyhow::Error>((funding, send_seconds, unsent, drain_seconds))
    }
    .await;
    let _ = stop_tx.send(true);
    let _ = tracker.await;
    let (funding, send_seconds, unsent, drain_seconds) = result?;

    let t = ctx.tally();
    let span = match (t.first_send, t.last_final) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Report {
        target_tps: plan.tps,
        duration_s: plan.duration.as_secs(),
        accounts: plan.accounts,
        endpoints: plan.endpoints.clone(),
        planned: plan.slots(),
        submitted: t.submitted,
        accepted: t.accepted,
        rejected: t.rejected,
        rejected_by_reason: t
            .rejects
            .iter()
            .map(|(c, r)| RejectReport {
                code: c.code,
                reason: c.reason.to_string(),
                count: r.count,
                message: r.message.clone(),
            })
            .collect(),
        final_count: t.final_count,
        not_final: t.accepted.saturating_sub(t.final_count),
        unsent,
        achieved_tps: if span > 0.0 {
            round1(t.final_count as f64 / span)
        } else {
            0.0
        },
        submit_tps: if send_seconds > 0.0 {
            round1(t.submitted as f64 / send_seconds)
        } else {
            0.0
        },
        latency_ms: t.latency.summary(),
        lateness_ms: t.lateness.summary(),
        window_stalls: t.window_stalls,
        first_height: t.first_height,
        last_height: t.last_height,
        funding,
        send_seconds: round1(send_seconds),
        drain_seconds: round1(drain_seconds),
        resubscribes: resubscribes.load(Ordering::Relaxed),
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Opens the finalized-heads subscription at `ws`.
async fn subscribe(
    ws: &str,
) -> Result<(WsClient, jsonrpsee::core::client::Subscription<HeaderInfo>)> {
    let client = WsClientBuilder::default()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Duration::from_secs(30))
        .build(ws)
        .await
        .map_err(|e| {
            anyhow!(
                "cannot open a WebSocket to {ws}: {}",
                one_line(&e.to_string())
            )
        })?;
    let sub = client
        .chain_subscribe_finalized_heads()
        .await
        .map_err(|e| {
            anyhow!(
                "chain_subscribeFinalizedHeads via {ws}: {}",
                one_line(&e.to_string())
            )
        })?;
    Ok((client, sub))
}

/// Follows finalized heads from `last` on: fetches every finalized block's transaction
/// hashes, in height order without gaps (a head the subscription skipped is fetched by
/// height), and hands them to the tally. Opens the subscription again if it ends.
async fn track_finality(
    ctx: Arc<Ctx>,
    ws: String,
    client: WsClient,
    sub: jsonrpsee::core::client::Subscription<HeaderInfo>,
    mut last: u64,
    mut stop: watch::Receiver<bool>,
    resubscribes: Arc<AtomicU64>,
) {
    let mut current = Some((client, sub));
    loop {
        let (client, mut sub) = match current.take() {
            Some(c) => c,
            None => {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                match subscribe(&ws).await {
                    Ok(c) => {
                        resubscribes.fetch_add(1, Ordering::Relaxed);
                        c
                    }
                    Err(_) => continue,
                }
            }
        };
        loop {
            let head = tokio::select! {
                _ = stop.changed() => return,
                head = sub.next() => head,
            };
            let Some(head) = head else { break };
            let Ok(head) = head else { continue };
            let at = Instant::now();
            while last < head.height {
                let height = last + 1;
                let Some(hashes) = fetch_block(&ctx, height, &mut stop).await else {
                    return;
                };
                ctx.tally().block_final(height, &hashes, at);
                ctx.notify.notify_waiters();
                last = height;
            }
        }
        drop(client);
    }
}

/// The transaction hashes of the final block at `height`, retrying until it comes or the
/// run stops (`None`).
async fn fetch_block(
    ctx: &Ctx,
    height: u64,
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<Hash>> {
    loop {
        let endpoint = ctx.first().ok()?;
        let call = endpoint
            .rpc
            .api()
            .chain_get_block(BlockId::Height(height), Some(false));
        match call.await {
            Ok(block) => {
                return Some(match block.body {
                    BlockBody::Hashes { tx_hashes } => tx_hashes,
                    BlockBody::Full { txs } => txs.into_iter().map(|t| t.hash).collect(),
                })
            }
            Err(_) => {
                tokio::select! {
                    _ = stop.changed() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// Reads the accounts' balances and nonces, tops up the ones short of what the run needs,
/// and sets up their nonce windows.
async fn fund(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    funder: &Keypair,
    progress: &Progress,
) -> Result<FundingReport> {
    let started = Instant::now();
    progress.phase(&format!("reading {} accounts", ctx.keys.len()));
    let infos = account_infos(ctx, ctx.keys.iter().map(Keypair::address).collect()).await?;

    // Each account's share of the slots, plus a window's worth for resends.
    let per_account = plan
        .slots()
        .div_ceil(plan.accounts.max(1) as u64)
        .saturating_add(WINDOW);
    let need = per_account
        .checked_mul(ctx.amount.saturating_add(ctx.fee))
        .ok_or_else(|| anyhow!("each account would need more than 2^64 units: lower --amount"))?;
    let deficits: Vec<u64> = infos
        .iter()
        .map(|a| need.saturating_sub(a.balance))
        .collect();
    let plan_f = FundingPlan::new(&deficits, ctx.fee)?;
    let mut windows: Vec<NonceWindow> = infos
        .iter()
        .map(|a| NonceWindow::new(a.nonce, a.next_nonce.unwrap_or(a.nonce)))
        .collect();

    if !plan_f.direct.is_empty() {
        let cost = plan_f
            .funder_cost(ctx.fee)
            .ok_or_else(|| anyhow!("funding amounts overflow: lower --amount or --fee"))?;
        let first = ctx.first()?;
        let info = first
            .rpc
            .call(
                "state_getAccount",
                first.rpc.api().state_get_account(funder.address(), None),
            )
            .await?;
        if info.balance < cost {
            bail!(
                "the key's account {} holds {} but funding {} accounts for this run needs {cost}: \
                 lower --tps, --duration or --amount",
                funder.address(),
                info.balance,
                deficits.iter().filter(|d| **d > 0).count()
            );
        }
        progress.phase(&format!(
            "funding {} accounts from {}",
            deficits.iter().filter(|d| **d > 0).count(),
            funder.address()
        ));
        let direct: Vec<(Address, u64)> = plan_f
            .direct
            .iter()
            .filter_map(|(i, a)| Some((ctx.keys.get(*i)?.address(), *a)))
            .collect();
        send_funding(
            ctx,
            funder,
            info.nonce,
            info.next_nonce.unwrap_or(info.nonce),
            &direct,
        )
        .await?;

        let mut tasks = tokio::task::JoinSet::new();
        for (hub, children) in &plan_f.hubs {
            let (Some(key), Some(w)) = (ctx.keys.get(*hub), windows.get(*hub)) else {
                continue;
            };
            let to: Vec<(Address, u64)> = children
                .iter()
                .filter_map(|(i, a)| Some((ctx.keys.get(*i)?.address(), *a)))
                .collect();
            let (ctx, key, floor, next, hub) = (ctx.clone(), key.clone(), w.floor, w.next, *hub);
            tasks.spawn(async move {
                send_funding(&ctx, &key, floor, next, &to)
                    .await
                    .map(|next| (hub, next))
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (hub, next) = r.context("funding task failed")??;
            if let Some(w) = windows.get_mut(hub) {
                // Every funding transfer of the hub is final.
                *w = NonceWindow::new(next, next);
            }
        }
    }
    ctx.tally().windows = windows;
    if plan_f.transfers() > 0 {
        let funded_at = ctx.tally().scanned_height;
        catch_up(ctx, plan, funded_at, progress).await?;
    }
    Ok(FundingReport {
        accounts_funded: deficits.iter().filter(|d| **d > 0).count(),
        transfers: plan_f.transfers(),
        seconds: round1(started.elapsed().as_secs_f64()),
    })
}

/// Waits until every endpoint has finalized `height` (the funding): a node admits transfers
/// against its final state, so one that lags would refuse the first transfers for want of
/// funds it has not finalized yet.
async fn catch_up(ctx: &Ctx, plan: &Plan, height: u64, progress: &Progress) -> Result<()> {
    const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
    if ctx.endpoints.len() < 2 {
        // The one endpoint is the one that reported the funding final.
        return Ok(());
    }
    progress.phase(&format!(
        "waiting for every endpoint to finalize height {height}"
    ));
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    for (endpoint, url) in ctx.endpoints.iter().zip(&plan.endpoints) {
        loop {
            let status = endpoint
                .rpc
                .call("chain_status", endpoint.rpc.api().chain_status())
                .await?;
            if status.finalized_height >= height {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{url} has finalized height {} and did not reach the funding's height \
                     {height} within {} s",
                    status.finalized_height,
                    CATCH_UP_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// `state_getAccount` of every address, a few at a time.
async fn account_infos(ctx: &Arc<Ctx>, addresses: Vec<Address>) -> Result<Vec<AccountInfo>> {
    let mut out: Vec<Option<AccountInfo>> = vec![None; addresses.len()];
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = addresses.into_iter().enumerate();
    loop {
        while tasks.len() < ACCOUNT_QUERIES {
            let Some((i, addr)) = queue.next() else { break };
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let e = ctx.first()?;
                let info = e
                    .rpc
                    .call(
                        "state_getAccount",
                        e.rpc.api().state_get_account(addr, None),
                    )
                    .await?;
                Ok::<_, anyhow::Error>((i, info))
            });
        }
        let Some(r) = tasks.join_next().await else {
            break;
        };
        let (i, info) = r.context("account query task failed")??;
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(info);
        }
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| anyhow!("an account query went missing")))
        .collect()
}

/// Sends `transfers` from `key`, whose final nonce is `floor` and next nonce `next`, in
/// rounds that fit the nonce window, each waited for until final. The next nonce after them.
async fn send_funding(
    ctx: &Ctx,
    key: &Keypair,
    mut floor: u64,
    mut next: u64,
    transfers: &[(Address, u64)],
) -> Result<u64> {
    let endpoint = ctx.first()?;
    let mut rest = transfers;
    while !rest.is_empty() {
        let room = (floor + WINDOW).saturating_sub(next) as usize;
        if room == 0 {
            bail!(
                "account {} has {} transactions pending; wait for them to be final",
                key.address(),
                next - floor
            );
        }
        let (round, later) = rest.split_at(room.min(rest.len()));
        let mut hashes = Vec::with_capacity(round.len());
        for (to, amount) in round {
            let tx = Transaction::sign(
                key,
                &ctx.chain_id,
                next,
                ctx.fee,
                TxKind::Transfer {
                    to: *to,
                    amount: *amount,
                },
            );
            ctx.tally().funding.insert(tx.hash);
            let submitted = endpoint
                .rpc
                .call(
                    "tx_submit",
                    endpoint
                        .rpc
                        .api()
                        .tx_submit(SignedTxHex::from_bytes(&tx.bytes)),
                )
                .await;
            if let Err(e) = submitted {
                ctx.tally().funding.remove(&tx.hash);
                return Err(e.context(format!(
                    "funding transfer of {amount} from {} to {to}",
                    key.address()
                )));
            }
            hashes.push(tx.hash);
            next += 1;
        }
        let deadline = Instant::now() + FUNDING_TIMEOUT;
        loop {
            let waiting = {
                let t = ctx.tally();
                hashes.iter().filter(|h| t.funding.contains(h)).count()
            };
            if waiting == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{waiting} funding transfers from {} not final after {} s",
                    key.address(),
                    FUNDING_TIMEOUT.as_secs()
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), ctx.notify.notified()).await;
        }
        floor = next;
        rest = later;
    }
    Ok(next)
}

/// The timed phase: a submission per slot, open loop. Seconds it took and slots unsent.
async fn send_phase(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    progress: &Progress,
    stop: watch::Receiver<bool>,
) -> (f64, u64) {
    let slots = plan.slots();
    progress.phase(&format!(
        "sending {} tx/s for {} s from {} accounts",
        plan.tps,
        plan.duration.as_secs(),
        plan.accounts
    ));
    progress.start_sending(slots);
    ctx.tally().measuring = true;
    let start = Instant::now();
    let end = start + plan.duration;
    let ticker = spawn_ticker(ctx.clone(), progress.bar.clone(), stop);
    let mut slot = 0u64;
    let mut batches = Batches::new(ctx.endpoints.len(), plan.batch);
    'slots: while slot < slots {
        let due = start + Duration::from_secs_f64(slot as f64 / plan.tps);
        if due >= end {
            break;
        }
        // Partly filled batches go out when their wait is over, even between slots.
        while let Some(wake) = batches.next_flush().filter(|&w| w < due) {
            tokio::time::sleep_until(wake.into()).await;
            batches.flush_waited(ctx, Instant::now());
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let mut stalled = false;
        let (account, nonce) = loop {
            let pick = ctx.tally().next_send(Instant::now());
            match pick {
                Ok(p) => break p,
                Err(true) => break 'slots,
                Err(false) => {
                    if !stalled {
                        stalled = true;
                        ctx.tally().window_stalls += 1;
                    }
                    if Instant::now() >= end {
                        break 'slots;
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_millis(5), ctx.notify.notified()).await;
                }
            }
        };
        if plan.batch == 1 {
            ctx.tally()
                .lateness
                .record(Instant::now().saturating_duration_since(due));
            ctx.outstanding.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(submit(ctx.clone(), account, nonce));
        } else {
            batches.add(ctx, account, nonce, due);
        }
        slot += 1;
    }
    batches.flush_all(ctx);
    let elapsed = start.elapsed().as_secs_f64();
    ticker.abort();
    if let Some(bar) = &progress.bar {
        bar.set_position(slot);
    }
    (elapsed, slots.saturating_sub(slot))
}

/// Signs and submits account `account`'s transfer with `nonce`.
async fn submit(ctx: Arc<Ctx>, account: usize, nonce: u64) {
    let (Some(tx), Some(endpoint)) = (ctx.transfer(account, nonce), ctx.endpoint(account)) else {
        ctx.outstanding.fetch_sub(1, Ordering::SeqCst);
        return;
    };
    ctx.tally().sent(tx.hash, account, nonce, Instant::now());
    let result = endpoint
        .submit
        .tx_submit(SignedTxHex::from_bytes(&tx.bytes))
        .await;
    let answer = classify(result);
    let returned = ctx
        .tally()
        .answered(tx.hash, account, nonce, answer, Instant::now());
    if returned {
        ctx.notify.notify_waiters();
    }
    ctx.outstanding.fetch_sub(1, Ordering::SeqCst);
}

/// Transfers of the send phase gathered per endpoint into JSON-RPC batches (`--batch`).
struct Batches {
    /// Per endpoint: (account, nonce, when the slot was due), oldest first.
    pending: Vec<Vec<(usize, u64, Instant)>>,
    size: usize,
}

impl Batches {
    fn new(endpoints: usize, size: usize) -> Batches {
        Batches {
            pending: vec![Vec::new(); endpoints.max(1)],
            size,
        }
    }

    /// Adds a transfer to its endpoint's batch, which goes out if now full.
    fn add(&mut self, ctx: &Arc<Ctx>, account: usize, nonce: u64, due: Instant) {
        let e = account % self.pending.len();
        self.pending[e].push((account, nonce, due));
        if self.pending[e].len() >= self.size {
            self.flush(ctx, e);
        }
    }

    /// When the oldest partly filled batch has waited [`BATCH_WAIT`].
    fn next_flush(&self) -> Option<Instant> {
        self.pending
            .iter()
            .filter_map(|p| p.first().map(|&(_, _, due)| due + BATCH_WAIT))
            .min()
    }

    /// Sends the batches that have waited [`BATCH_WAIT`] by `now`.
    fn flush_waited(&mut self, ctx: &Arc<Ctx>, now: Instant) {
        for e in 0..self.pending.len() {
            if self.pending[e]
                .first()
                .is_some_and(|&(_, _, due)| due + BATCH_WAIT <= now)
            {
                self.flush(ctx, e);
            }
        }
    }

    fn flush_all(&mut self, ctx: &Arc<Ctx>) {
        for e in 0..self.pending.len() {
            self.flush(ctx, e);
        }
    }

    /// Sends endpoint `e`'s batch; each transfer's lateness counts up to now.
    fn flush(&mut self, ctx: &Arc<Ctx>, e: usize) {
        let items = std::mem::take(&mut self.pending[e]);
        if items.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let mut tally = ctx.tally();
            for &(_, _, due) in &items {
                tally.lateness.record(now.saturating_duration_since(due));
            }
        }
        ctx.outstanding
            .fetch_add(items.len() as u64, Ordering::SeqCst);
        let transfers = items.into_iter().map(|(a, n, _)| (a, n)).collect();
        tokio::spawn(submit_batch(ctx.clone(), e, transfers));
    }
}

/// Signs `transfers` (account, nonce) and submits them to endpoint `e` as one JSON-RPC batch
/// of `tx_submit` calls; each gets its own answer, as if sent alone.
async fn submit_batch(ctx: Arc<Ctx>, e: usize, transfers: Vec<(usize, u64)>) {
    let count = transfers.len() as u64;
    let Some(endpoint) = ctx.endpoints.get(e) else {
        ctx.outstanding.fetch_sub(count, Ordering::SeqCst);
        return;
    };
    let mut calls = jsonrpsee::core::params::BatchRequestBuilder::new();
    let mut sent = Vec::with_capacity(transfers.len());
    for (account, nonce) in transfers {
        let Some(tx) = ctx.transfer(account, nonce) else {
            ctx.outstanding.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        // Serializing a hex string cannot fail.
        let _ = calls.insert("tx_submit", [SignedTxHex::from_bytes(&tx.bytes)]);
        sent.push((tx.hash, account, nonce));
    }
    {
        let now = Instant::now();
        let mut tally = ctx.tally();
        for &(hash, account, nonce) in &sent {
            tally.sent(hash, account, nonce, now);
        }
    }
    let answers: Vec<Answer> = match endpoint.submit.batch_request::<Hash>(calls).await {
        Ok(response) => response
            .into_iter()
            .map(|r| classify(r.map_err(|e| ClientError::Call(e.into_owned()))))
            .collect(),
        Err(e) => {
            let answer = classify(Err(e));
            vec![answer; sent.len()]
        }
    };
    let now = Instant::now();
    let mut returned = false;
    {
        let mut tally = ctx.tally();
        // A short answer (a server that dropped calls) leaves the rest as transport failures.
        let missing = classify(Err(ClientError::Custom(
            "the batch answer lacks this call".into(),
        )));
        for (i, (hash, account, nonce)) in sent.iter().enumerate() {
            let answer = answers.get(i).cloned().unwrap_or_else(|| missing.clone());
            returned |= tally.answered(*hash, *account, *nonce, answer, now);
        }
    }
    if returned {
        ctx.notify.notify_waiters();
    }
    ctx.outstanding
        .fetch_sub(sent.len() as u64, Ordering::SeqCst);
}

/// Refreshes the progress bar's counts every 250 ms until stopped or aborted.
fn spawn_ticker(
    ctx: Arc<Ctx>,
    bar: Option<indicatif::ProgressBar>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(bar) = bar else { return };
        let mut previous: Option<(Instant, u64)> = None;
        let mut rate = 0.0;
        loop {
            let (submitted, final_count, rejected, late) = {
                let t = ctx.tally();
                (
                    t.submitted,
                    t.final_count,
                    t.rejected,
                    t.lateness.quantile(0.99).unwrap_or(0),
                )
            };
            let now = Instant::now();
            match previous {
                Some((at, count)) if now.duration_since(at) >= Duration::from_secs(1) => {
                    rate = final_count.saturating_sub(count) as f64
                        / now.duration_since(at).as_secs_f64();
                    previous = Some((now, final_count));
                }
                None => previous = Some((now, final_count)),
                _ => {}
            }
            bar.set_position(submitted);
            bar.set_message(format!(
                "final {final_count} ({rate:.0}/s)  errors {rejected}  late p99 {:.1} ms",
                late as f64 / 1000.0
            ));
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    })
}

/// Waits until every accepted transfer is final or `--drain-timeout` passes, then until every
/// submission is answered (so the counts add up). Meanwhile refused nonces are sent again
/// (at most the target rate), closing the gaps that would hold back their accounts' later
/// transfers. Seconds it took.
async fn drain(ctx: &Arc<Ctx>, plan: &Plan, progress: &Progress) -> f64 {
    const TICK: Duration = Duration::from_millis(50);
    let start = Instant::now();
    let deadline = start + plan.drain_timeout;
    let per_tick = ((plan.tps * TICK.as_secs_f64()).ceil() as usize).max(1);
    loop {
        let (in_flight, final_count, submitted, gaps, repairs) = {
            let mut t = ctx.tally();
            let repairs = t.repairs(Instant::now(), per_tick);
            (
                t.in_flight.len(),
                t.final_count,
                t.submitted,
                t.has_gaps(),
                repairs,
            )
        };
        for (account, nonce) in repairs {
            ctx.outstanding.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(submit(ctx.clone(), account, nonce));
        }
        let outstanding = ctx.outstanding.load(Ordering::SeqCst);
        if in_flight == 0 && outstanding == 0 && !gaps {
            break;
        }
        progress.update(
            submitted,
            format!("draining: {in_flight} not final yet, final {final_count}"),
        );
        if Instant::now() >= deadline {
            break;
        }
        let _ = tokio::time::timeout(TICK, ctx.notify.notified()).await;
    }
    // Submissions still unanswered end within their own timeout.
    let hard = Instant::now() + SUBMIT_TIMEOUT + Duration::from_secs(1);
    while ctx.outstanding.load(Ordering::SeqCst) > 0 && Instant::now() < hard {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn nonce_window_hands_out_at_most_64_ahead_of_the_final_nonce() {
        let now = Instant::now();
        let mut w = NonceWindow::new(10, 10);
        let got: Vec<u64> = std::iter::from_fn(|| w.take(now)).collect();
        assert_eq!(got, (10..74).collect::<Vec<_>>());
        w.finalized(11);
        assert_eq!(w.take(now), Some(74));
        assert_eq!(w.take(now), Some(75));
        assert_eq!(w.take(now), None);
    }

    #[test]
    fn nonce_window_counts_pending_transactions_from_elsewhere() {
        // Final nonce 5, 10 pending from an earlier run: new nonces start at 15 and the
        // window still ends at 5 + 64.
        let now = Instant::now();
        let mut w = NonceWindow::new(5, 15);
        let got: Vec<u64> = std::iter::from_fn(|| w.take(now)).collect();
        assert_eq!(got.first(), Some(&15));
        assert_eq!(got.last(), Some(&68));
    }

    #[test]
    fn refused_nonce_is_sent_again_first_once_its_back_off_has_passed() {
        let now = Instant::now();
        let mut w = NonceWindow::new(0, 0);
        for _ in 0..5 {
            w.take(now);
        }
        w.give_back(2, now);
        assert!(w.has_gap());
        // Within the back-off, new nonces go out; the gap stays.
        assert_eq!(w.take(now), Some(5));
        assert_eq!(w.take_refused(now), None);
        let later = now + RETRY_BACKOFF;
        assert_eq!(w.take(later), Some(2));
        assert!(!w.has_gap());
        assert_eq!(w.take(later), Some(6));
    }

    #[test]
    fn refused_nonce_below_the_final_one_is_dropped() {
        let now = Instant::now();
        let mut w = NonceWindow::new(0, 0);
        for _ in 0..5 {
            w.take(now);
        }
        w.give_back(1, now);
        w.finalized(3);
        assert!(!w.has_gap());
        assert_eq!(w.take(now + RETRY_BACKOFF), Some(5));
        w.give_back(0, now);
        assert!(!w.has_gap());
    }

    #[test]
    fn retired_account_sends_nothing() {
        let now = Instant::now();
        let mut w = NonceWindow::new(0, 0);
        w.take(now);
        w.give_back(0, now);
        w.retire();
        assert!(!w.has_gap());
        assert_eq!(w.take(now + RETRY_BACKOFF), None);
    }

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = Histogram::new();
        for us in 1..=100_000u64 {
            h.record(Duration::from_micros(us));
        }
        for (q, exact) in [(0.5, 50_000.0), (0.95, 95_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q).unwrap() as f64;
            assert!((got - exact).abs() / exact < 0.02, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile(1.0), Some(100_000));
        let s = h.summary().unwrap();
        assert!(s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max);
    }

    #[test]
    fn histogram_buckets_tile_the_whole_range() {
        let mut expected_low = 0u64;
        for i in 0..BUCKETS {
            let (low, high) = Histogram::bounds(i);
            assert_eq!(low, expected_low, "bucket {i}");
            assert!(high >= low);
            assert_eq!(Histogram::index(low), i);
            assert_eq!(Histogram::index(high), i);
            expected_low = high.wrapping_add(1);
        }
        assert_eq!(expected_low, 0, "the last bucket ends at u64::MAX");
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert!(Histogram::new().summary().is_none());
    }

    fn rejected(code: i32, message: &str) -> Answer {
        classify(Err(ClientError::Call(
            jsonrpsee::types::ErrorObjectOwned::owned(code, message.to_string(), None::<()>),
        )))
    }

    #[test]
    fn already_known_counts_as_accepted() {
        assert_eq!(rejected(ALREADY_KNOWN, "known"), Answer::Accepted);
    }

    #[test]
    fn rejections_are_classed_by_code_and_nonce_direction() {
        let Answer::Rejected { class, fate, .. } =
            rejected(-32002, "nonce 3 is too low: the account's next nonce is 5")
        else {
            panic!("not a rejection")
        };
        assert_eq!(class.reason, "nonce too low");
        assert_eq!(fate, NonceFate::Used);
        let Answer::Rejected { class, fate, .. } = rejected(-32004, "mempool is full") else {
            panic!("not a rejection")
        };
        assert_eq!((class.code, class.reason), (Some(-32004), "mempool full"));
        assert_eq!(fate, NonceFate::Retry);
        let Answer::Rejected { class, fate, .. } =
            rejected(-32027, "node under memory pressure: ...")
        else {
            panic!("not a rejection")
        };
        assert_eq!(
            (class.code, class.reason),
            (Some(-32027), "memory pressure")
        );
        assert_eq!(fate, NonceFate::Retry);
        let Answer::Rejected { fate, .. } = rejected(-32001, "invalid signature") else {
            panic!("not a rejection")
        };
        assert_eq!(fate, NonceFate::Retire);
    }

    fn tally_with(accounts: usize) -> Tally {
        let mut t = Tally::new();
        t.windows = vec![NonceWindow::new(0, 0); accounts];
        t
    }

    #[test]
    fn counts_add_up_through_rejections_and_finality() {
        let mut t = tally_with(2);
        t.measuring = true;
        let now = Instant::now();
        let h = |b: u8| Hash([b; 32]);
        let (a0, n0) = t.next_send(now).unwrap();
        let (a1, n1) = t.next_send(now).unwrap();
        assert_ne!(a0, a1, "round robin");
        t.sent(h(1), a0, n0, now);
        t.sent(h(2), a1, n1, now);
        assert!(!t.answered(h(1), a0, n0, Answer::Accepted, now));
        let refused = Answer::Rejected {
            class: RejectClass {
                code: Some(-32004),
                reason: "mempool full",
            },
            fate: NonceFate::Retry,
            message: "full".into(),
        };
        assert!(t.answered(h(2), a1, n1, refused, now));
        assert!(t.has_gaps());
        // Once the back-off has passed, the refused nonce is the next one account a1 sends.
        t.cursor = a1;
        assert_eq!(t.next_send(now + RETRY_BACKOFF), Ok((a1, n1)));
        t.block_final(7, &[h(1), h(9)], now + Duration::from_millis(400));
        assert_eq!(t.submitted, 2);
        assert_eq!(t.accepted, t.submitted - t.rejected);
        assert_eq!(t.final_count, 1);
        assert_eq!((t.first_height, t.last_height), (Some(7), Some(7)));
        assert_eq!(t.windows[a0].floor, n0 + 1);
        assert_eq!(t.latency.quantile(0.5), Some(400_000));
        assert!(t.in_flight.is_empty());
        assert_eq!(t.rejects.values().map(|r| r.count).sum::<u64>(), t.rejected);
    }

    #[test]
    fn the_drain_resends_refused_nonces_only() {
        let mut t = tally_with(3);
        let now = Instant::now();
        let sends: Vec<(usize, u64)> = (0..6).map(|_| t.next_send(now).unwrap()).collect();
        let retry = |t: &mut Tally, (a, n): (usize, u64)| {
            let refused = Answer::Rejected {
                class: RejectClass {
                    code: None,
                    reason: "transport",
                },
                fate: NonceFate::Retry,
                message: String::new(),
            };
            t.sent(Hash([n as u8 + 10 * a as u8; 32]), a, n, now);
            t.answered(Hash([n as u8 + 10 * a as u8; 32]), a, n, refused, now)
        };
        assert!(retry(&mut t, sends[0]));
        assert!(retry(&mut t, sends[4]));
        assert!(t.repairs(now, 10).is_empty(), "back-off first");
        let later = now + RETRY_BACKOFF;
        assert_eq!(t.repairs(later, 1).len(), 1, "at most max");
        assert_eq!(t.repairs(later, 10).len(), 1);
        assert!(!t.has_gaps());
        assert!(t.repairs(later, 10).is_empty());
    }

    #[test]
    fn a_transfer_final_before_its_answer_counts_as_accepted() {
        let mut t = tally_with(1);
        let now = Instant::now();
        let (a, n) = t.next_send(now).unwrap();
        let hash = Hash([3; 32]);
        t.sent(hash, a, n, now);
        t.block_final(1, &[hash], now);
        let timeout = Answer::Rejected {
            class: RejectClass {
                code: None,
                reason: "timeout",
            },
            fate: NonceFate::Retry,
            message: String::new(),
        };
        assert!(!t.answered(hash, a, n, timeout, now));
        assert_eq!((t.accepted, t.rejected, t.final_count), (1, 0, 1));
    }

    #[test]
    fn every_window_full_is_told_apart_from_every_account_retired() {
        let mut t = tally_with(1);
        let now = Instant::now();
        for _ in 0..WINDOW {
            t.next_send(now).unwrap();
        }
        assert_eq!(t.next_send(now), Err(false));
        t.windows[0].retire();
        assert_eq!(t.next_send(now), Err(true));
    }

    #[test]
    fn funding_goes_through_hubs_beyond_one_window() {
        let small = FundingPlan::new(&[5, 0, 7], 1).unwrap();
        assert_eq!(small.direct, vec![(0, 5), (2, 7)]);
        assert!(small.hubs.is_empty());
        assert_eq!(small.funder_cost(1), Some(14));

        let deficits = vec![10u64; 200];
        let plan = FundingPlan::new(&deficits, 1).unwrap();
        assert_eq!(plan.direct.len(), WINDOW as usize);
        assert_eq!(plan.transfers(), 200);
        // Every child appears once, under one hub, and each hub carries its children.
        let mut children: Vec<usize> = plan
            .hubs
            .iter()
            .flat_map(|(_, c)| c.iter().map(|(i, _)| *i))
            .collect();
        children.sort_unstable();
        assert_eq!(children, (64..200).collect::<Vec<_>>());
        for ((hub, amount), (hub2, kids)) in plan.direct.iter().zip(&plan.hubs) {
            assert_eq!(hub, hub2);
            assert_eq!(*amount, 10 + kids.len() as u64 * 11);
        }
    }

    #[test]
    fn urls_map_between_http_and_websocket() {
        assert_eq!(ws_url("http://127.0.0.1:1").unwrap(), "ws://127.0.0.1:1");
        assert_eq!(ws_url("https://a.b").unwrap(), "wss://a.b");
        assert_eq!(http_url("ws://h:2").unwrap(), "http://h:2");
        assert!(http_url("127.0.0.1:26657").is_err());
        assert!(http_url("ftp://x").is_err());
        assert!(http_url("http://").is_err());
    }

    #[test]
    fn accounts_derive_from_the_key_and_the_index() {
        let funder = Keypair::from_seed(1);
        let a = derive_account(&funder, 0).address();
        assert_eq!(a, derive_account(&funder, 0).address());
        assert_ne!(a, derive_account(&funder, 1).address());
        assert_ne!(a, derive_account(&Keypair::from_seed(2), 0).address());
    }

    #[test]
    fn default_accounts_keep_eight_per_second_each() {
        assert_eq!(default_accounts(10.0), 16);
        assert_eq!(default_accounts(2000.0), 250);
        assert_eq!(default_accounts(10_001.0), 1251);
    }
}
