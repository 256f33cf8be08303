//! Prometheus metrics (`GET /metrics` on `metrics.listen_addr`), prefix `keel_`.
//!
//! Each component exports its own metrics into the one [`Registry`] the node builds at start
//! (see `Node::start`): a component that counts as things happen owns live handles and
//! registers clones of them (the consensus host: transactions committed, block execution
//! time; the RPC layer: calls by method and result; the mempool: its size), and one that
//! keeps a value anyway implements [`Collector`] to read it at scrape time (the chain view:
//! heights and epoch; the p2p service: bytes and peers; the caches, the database, the
//! allocator). This module holds what they share, so it depends on none of them: the
//! encoding helpers ([`encode_gauge`], [`encode_counter`], [`encode_counters`]), the process
//! memory collector ([`register_memory`]), [`render`], and the listener.
//!
//! A scrape encodes the registry as it is: no lock of the registry's own, and collectors read
//! atomics or the published chain view, never a lock the consensus host holds across a disk
//! write. Counters read from elsewhere are counts that only grow there, so they stay
//! monotonic here.
//!
//! The listener ([`serve_metrics`]) is hyper's HTTP/1.1 server with bounds of its own: a
//! fixed number of connections, a deadline for each request head and for each connection,
//! and a cancellation token that stops it within a couple of seconds. With
//! `[metrics] profiling = true` it also serves [`crate::profiling`] under `/debug/pprof/`; a
//! connection waiting for a profile outlives the connection deadline until the profile ends.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::MetricsConfig;
use crate::profiling::{self, Profiles};
use crate::{Error, Result};

/// The text exposition of every metric in `registry`, as a scrape gets it (empty if a
/// collector failed to encode).
///
/// `prometheus_client` writes OpenMetrics (a counter's `# HELP`/`# TYPE` name `x` while its
/// sample is `x_total`, and a closing `# EOF`); the listener serves the Prometheus text
/// format 0.0.4, where the descriptor names the sample (`x_total`) and there is no `# EOF`,
/// so the text is rewritten to that (what `promtool check metrics` accepts).
pub fn render(registry: &Registry) -> String {
    let mut open_metrics = String::new();
    if prometheus_client::encoding::text::encode(&mut open_metrics, registry).is_err() {
        return String::new();
    }
    to_text_format(&open_metrics)
}

/// OpenMetrics text as `prometheus_client` writes it, in the Prometheus text format 0.0.4.
fn to_text_format(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + counters.len() * 12);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE ", "# UNIT "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match descriptor {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if prefix == "# UNIT " {
                    // Not part of the 0.0.4 format.
                    continue;
                }
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() || rest.contains(' ') {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Writes the descriptor of a metric a collector encodes. `help` is written as
/// [`Registry::register`] writes it for the metrics it holds (with a full stop), so a metric
/// reads the same whichever way it is exported.
fn describe<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> std::result::Result<prometheus_client::encoding::MetricEncoder<'a>, fmt::Error> {
    encoder.encode_descriptor(name, &format!("{help}."), None, kind)
}

/// Writes gauge `name` with one sample, `value` (saturated at `i64::MAX`).
pub fn encode_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    gauge.encode(describe(encoder, name, help, gauge.metric_type())?)
}

/// Writes gauge `name` with one sample, a fractional value.
pub fn encode_float_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(describe(encoder, name, help, gauge.metric_type())?)
}

/// Writes counter `name` with one sample, a fractional value (seconds).
pub fn encode_float_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(describe(encoder, name, help, counter.metric_type())?)
}

/// Writes gauge `name` with one sample, a value that may be negative.
pub fn encode_signed_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(describe(encoder, name, help, gauge.metric_type())?)
}

/// Writes counter `name` (its sample is `name_total`) with `value`, a count that only grows
/// where it is kept.
pub fn encode_counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(describe(encoder, name, help, counter.metric_type())?)
}

/// Writes gauge `name` with one sample per label set.
pub fn encode_gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(L, u64)],
) -> fmt::Result {
    let mut family = describe(encoder, name, help, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX))
            .encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes counter `name` with one sample per label set, each a count that only grows where it
/// is kept.
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(L, u64)],
) -> fmt::Result {
    let mut family = describe(encoder, name, help, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Registers the process's memory, read at scrape time: jemalloc's allocated and resident
/// bytes, `memory.limit`, the allocator knobs in force, and the governor's view: each
/// consumer's budget and use, the pressure level, shrink and refusal counts.
pub fn register_memory(registry: &mut Registry, governor: Arc<crate::memory::Governor>) {
    registry.register_collector(Box::new(MemoryMetrics { governor }));
}

/// The collector of [`register_memory`].
#[derive(Debug)]
struct MemoryMetrics {
    governor: Arc<crate::memory::Governor>,
}

impl Collector for MemoryMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let g = &self.governor;
        encode_gauge(
            &mut encoder,
            "keel_memory_allocated_bytes",
            "Bytes allocated through jemalloc",
            crate::memory::allocated_bytes(),
        )?;
        encode_gauge(
            &mut encoder,
            "keel_memory_resident_bytes",
            "Bytes in resident pages mapped by jemalloc (allocated, dirty pages, metadata)",
            crate::memory::resident_bytes(),
        )?;
        encode_gauge(
            &mut encoder,
            "keel_memory_limit_bytes",
            "Configured memory limit (0 = none)",
            g.limit(),
        )?;
        let budgets: Vec<_> = g
            .consumers()
            .iter()
            .map(|c| ([("consumer", c.name)], c.budget))
            .collect();
        encode_gauges(
            &mut encoder,
            "keel_memory_budget_bytes",
            "Bytes each memory consumer may hold (its share of memory.limit, or its configured size)",
            &budgets,
        )?;
        let used: Vec<_> = g
            .consumers()
            .iter()
            .map(|c| ([("consumer", c.name)], (c.used)()))
            .collect();
        encode_gauges(
            &mut encoder,
            "keel_memory_used_bytes",
            "Bytes each memory consumer holds now (caches estimated from their entries)",
            &used,
        )?;
        encode_gauge(
            &mut encoder,
            "keel_memory_pressure",
            "Memory pressure: 0 none, 1 soft (caches halved), 2 hard (caches at an eighth, new transactions refused)",
            u64::from(g.pressure().level()),
        )?;
        encode_counter(
            &mut encoder,
            "keel_memory_shrinks",
            "Times rising memory pressure shrank the caches",
            g.shrinks(),
        )?;
        encode_counter(
            &mut encoder,
            "keel_memory_refused_txs",
            "Transactions refused (RPC and gossip) under hard memory pressure",
            g.pressure().refused(),
        )?;
        // The allocator knobs in force (`[memory]`, applied at start), read back from jemalloc.
        if let Ok(s) = crate::memory::current() {
            // In seconds (Prometheus base units); -1 stays -1 (never).
            let seconds = |ms: i64| if ms < 0 { -1.0 } else { ms as f64 / 1000.0 };
            encode_float_gauge(
                &mut encoder,
                "keel_memory_dirty_decay_seconds",
                "jemalloc dirty_decay_ms in force, in seconds (-1 = never)",
                seconds(s.dirty_decay_ms),
            )?;
            encode_float_gauge(
                &mut encoder,
                "keel_memory_muzzy_decay_seconds",
                "jemalloc muzzy_decay_ms in force, in seconds (-1 = never)",
                seconds(s.muzzy_decay_ms),
            )?;
            encode_gauge(
                &mut encoder,
                "keel_memory_background_threads",
                "1 if jemalloc purges on background threads",
                u64::from(s.background_threads),
            )?;
        }
        Ok(())
    }
}

/// Content type of the Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the metrics listener lets clients hold.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections served at once; one accepted beyond this is closed at once.
    max_connections: usize,
    /// Time a client has to send a whole request head, idle time before it included (so an
    /// idle keep-alive connection is closed after it too).
    header_read_timeout: Duration,
    /// A connection is asked to close after this long, so a client that reads its response
    /// slowly cannot hold a slot forever. Scrapers simply reconnect.
    max_connection_time: Duration,
    /// At shutdown, or past `max_connection_time`, time left to the response in flight.
    shutdown_grace: Duration,
    /// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
    accept_error_pause: Duration,
}

/// The limits of the node's listener. A scrape every few seconds needs one connection.
const LIMITS: Limits = Limits {
    max_connections: 64,
    header_read_timeout: Duration::from_secs(5),
    max_connection_time: Duration::from_secs(60),
    shutdown_grace: Duration::from_secs(2),
    accept_error_pause: Duration::from_secs(1),
};

/// Renders the text exposition format at each scrape.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `config.listen_addr` with the text `render` returns at each
/// request (HTTP/1.1; any other path gets 404, any other method 405), and with
/// `config.profiling` the profiles of [`crate::profiling`] under `/debug/pprof/` (starting
/// jemalloc's heap sampling now; refused while `memory`, the node's governor, says the node
/// cannot afford one). Returns the bound address and the listener's task.
///
/// At most 64 connections are served at once (more are closed as soon as they are accepted);
/// a client has 5 s to send its request head. When `shutdown` is cancelled the listener
/// stops accepting, cuts profiles in flight short, lets responses in flight finish for at
/// most 2 s, drops what is left and the task completes.
pub async fn serve_metrics(
    config: &MetricsConfig,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    memory: Option<Arc<crate::memory::Governor>>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let profiles = Profiles::start(config, memory);
    serve_with(config.listen_addr, render, profiles, shutdown, LIMITS).await
}

async fn serve_with(
    addr: SocketAddr,
    render: Render,
    profiles: Option<Arc<Profiles>>,
    shutdown: CancellationToken,
    limits: Limits,
) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("metrics listener on {addr}"), e))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener", e))?;
    info!(addr = %local, "Prometheus metrics at /metrics");
    let task = tokio::spawn(accept_loop(
        listener,
        MetricsService {
            render,
            profiles,
            shutdown: shutdown.clone(),
            profiling: Arc::default(),
        },
        shutdown,
        limits,
    ));
    Ok((local, task))
}

/// Accepts connections until `shutdown`, then waits (bounded) for those still open.
async fn accept_loop(
    listener: TcpListener,
    service: MetricsService,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            // Reaps finished connections so the set stays as small as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "metrics listener: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(limits.accept_error_pause) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics listener: connection limit reached, closing");
            continue;
        };
        // Each connection has its own "profile in flight" flag.
        let service = MetricsService {
            profiling: Arc::default(),
            ..service.clone()
        };
        let profiling = service.profiling.clone();
        let connection = http.serve_connection(TokioIo::new(stream), service);
        connections.spawn(serve_connection(
            connection,
            shutdown.clone(),
            limits,
            profiling,
            slot,
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(
            open = connections.len(),
            "metrics listener: connections dropped at shutdown"
        );
    }
}

/// Drives one connection, holding `_slot` until it closes. Past `max_connection_time` the
/// connection is closed after its response in flight, unless that response is a profile
/// being taken (`profiling`): a profile may last minutes, and ends by itself (at most
/// [`profiling::MAX_SECONDS`] and its encoding later) or at shutdown.
async fn serve_connection(
    connection: http1::Connection<TokioIo<TcpStream>, MetricsService>,
    shutdown: CancellationToken,
    limits: Limits,
    profiling: Arc<AtomicBool>,
    _slot: OwnedSemaphorePermit,
) {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return connection_closed(result),
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(limits.max_connection_time) => {
            while profiling.load(Ordering::Acquire) {
                tokio::select! {
                    result = connection.as_mut() => return connection_closed(result),
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(PROFILE_POLL) => {}
                }
            }
        }
    }
    // Finish the response in flight, if any, then close.
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.shutdown_grace, connection).await {
        Ok(result) => connection_closed(result),
        Err(_) => debug!("metrics connection dropped with a response unfinished"),
    }
}

fn connection_closed(result: std::result::Result<(), hyper::Error>) {
    if let Err(e) = result {
        debug!(error = %e, "metrics connection closed");
    }
}

/// How often a connection past its deadline checks whether its profile has ended.
const PROFILE_POLL: Duration = Duration::from_millis(100);

/// Answers the requests of one connection.
#[derive(Clone)]
struct MetricsService {
    render: Render,
    /// `Some` with `[metrics] profiling = true`.
    profiles: Option<Arc<Profiles>>,
    shutdown: CancellationToken,
    /// Set while this connection's response is a profile being taken.
    profiling: Arc<AtomicBool>,
}

/// Sets a connection's "profile in flight" flag while it lives.
struct ProfileInFlight(Arc<AtomicBool>);

impl ProfileInFlight {
    fn new(flag: Arc<AtomicBool>) -> ProfileInFlight {
        flag.store(true, Ordering::Release);
        ProfileInFlight(flag)
    }
}

impl Drop for ProfileInFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = std::result::Result<Response<Full<Bytes>>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for MetricsService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let path = request.uri().path();
        if let Some(profiles) = &self.profiles {
            let under_prefix = path
                .strip_prefix(profiling::PREFIX)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            if under_prefix {
                let profiles = profiles.clone();
                let shutdown = self.shutdown.clone();
                let in_flight = ProfileInFlight::new(self.profiling.clone());
                let method = request.method().clone();
                let path = path.to_string();
                let query = request.uri().query().map(str::to_string);
                return Box::pin(async move {
                    let response = profiles
                        .respond(&method, &path, query.as_deref(), &shutdown)
                        .await;
                    drop(in_flight);
                    Ok(response)
                });
            }
        }
        let response = if path != "/metrics" {
            text_response(StatusCode::NOT_FOUND, "not found: try GET /metrics\n")
        } else if request.method() != Method::GET {
            let mut response = text_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET\n",
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            response
        } else {
            text_response(StatusCode::OK, (self.render)())
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const BODY: &str = "# TYPE keel_test_total counter\nkeel_test_total 7\n";

    /// Encodes fixed values through the helpers, as a component's collector does.
    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_gauge(&mut encoder, "keel_b", "Same help", u64::MAX)?;
            encode_counter(&mut encoder, "keel_d", "Same help", 4)?;
            encode_counters(
                &mut encoder,
                "keel_f",
                "Same help",
                &[([("kind", "x")], 5), ([("kind", "y")], 6)],
            )
        }
    }

    #[test]
    fn a_collected_metric_reads_like_a_registered_one() {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;

        let mut registry = Registry::default();
        let gauge: Gauge = Gauge::default();
        gauge.set(3);
        registry.register("keel_a", "Same help", gauge);
        let counter: Counter = Counter::default();
        counter.inc();
        registry.register("keel_c", "Same help", counter);
        let family = Family::<[(&str, &str); 1], Counter>::default();
        family.get_or_create(&[("kind", "x")]).inc();
        registry.register("keel_e", "Same help", family);
        registry.register_collector(Box::new(Fixed));
        let text = render(&registry);
        // Registered and collected metrics of a kind differ only in name and values.
        let expected = [
            "# HELP keel_a Same help.\n# TYPE keel_a gauge\nkeel_a 3\n",
            "# HELP keel_c_total Same help.\n# TYPE keel_c_total counter\nkeel_c_total 1\n",
            "# HELP keel_e_total Same help.\n# TYPE keel_e_total counter\n\
             keel_e_total{kind=\"x\"} 1\n",
            // A value beyond i64 is saturated, not an error that empties the scrape.
            "# HELP keel_b Same help.\n# TYPE keel_b gauge\nkeel_b 9223372036854775807\n",
            "# HELP keel_d_total Same help.\n# TYPE keel_d_total counter\nkeel_d_total 4\n",
            "# HELP keel_f_total Same help.\n# TYPE keel_f_total counter\n\
             keel_f_total{kind=\"x\"} 5\nkeel_f_total{kind=\"y\"} 6\n",
        ];
        for part in expected {
            assert!(text.contains(part), "{part} missing from\n{text}");
        }
        // The Prometheus text format 0.0.4: no OpenMetrics `# EOF`.
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.ends_with('\n'), "{text}");
    }

    #[test]
    fn openmetrics_text_becomes_the_prometheus_text_format() {
        let open_metrics = "# HELP a_bytes Help with spaces.\n# TYPE a_bytes gauge\n\
            # UNIT a_bytes bytes\na_bytes 1\n# HELP b Count.\n# TYPE b counter\nb_total 2\n\
            # HELP h Hist.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 0\nh_sum 0.0\nh_count 0\n# EOF\n";
        assert_eq!(
            to_text_format(open_metrics),
            "# HELP a_bytes Help with spaces.\n# TYPE a_bytes gauge\na_bytes 1\n\
             # HELP b_total Count.\n# TYPE b_total counter\nb_total 2\n\
             # HELP h Hist.\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 0\nh_sum 0.0\nh_count 0\n"
        );
    }

    #[test]
    fn memory_metrics_report_the_configured_limit_and_the_allocator() {
        let mut registry = Registry::default();
        let consumer = crate::memory::Consumer {
            name: "sig_cache",
            budget: 1_000,
            used: Box::new(|| 96),
            resize: None,
        };
        let governor = crate::memory::Governor::new(64 << 20, vec![consumer], Arc::default());
        governor.step(63 << 20);
        register_memory(&mut registry, Arc::new(governor));
        let text = render(&registry);
        for line in [
            "keel_memory_budget_bytes{consumer=\"sig_cache\"} 1000\n",
            "keel_memory_used_bytes{consumer=\"sig_cache\"} 96\n",
            "keel_memory_pressure 2\n",
            "keel_memory_shrinks_total 1\n",
            "keel_memory_refused_txs_total 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(
            text.contains(
                "# HELP keel_memory_limit_bytes Configured memory limit (0 = none).\n\
                 # TYPE keel_memory_limit_bytes gauge\nkeel_memory_limit_bytes 67108864\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP keel_memory_allocated_bytes Bytes allocated through jemalloc.\n\
                 # TYPE keel_memory_allocated_bytes gauge\nkeel_memory_allocated_bytes "
            ),
            "{text}"
        );
    }

    async fn start(
        limits: Limits,
        render: Render,
    ) -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let (addr, task) = serve_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            render,
            None,
            shutdown.clone(),
            limits,
        )
        .await
        .unwrap();
        (addr, shutdown, task)
    }

    fn fixed_body() -> Render {
        Arc::new(|| BODY.to_string())
    }

    /// Sends one request asking the server to close afterwards; returns the status and the
    /// whole response, or `None` when the server closed the connection without answering.
    async fn try_request(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let head = format!("{method} {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .ok()?;
        let text = String::from_utf8(out).unwrap();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text))
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        try_request(addr, method, path).await.expect("an answer")
    }

    #[tokio::test]
    async fn get_metrics_answers_the_rendered_text() {
        let (addr, _shutdown, _task) = start(LIMITS, fixed_body()).await;
        let (status, response) = request(addr, "GET", "/metrics").await;
        assert_eq!(status, 200, "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{response}"
        );
        assert!(response.ends_with(BODY), "{response}");
        // A query string does not change the path.
        assert_eq!(request(addr, "GET", "/metrics?x=1").await.0, 200);
    }

    #[tokio::test]
    async fn other_paths_are_not_found_and_other_methods_not_allowed() {
        let (addr, _shutdown, _task) = start(LIMITS, fixed_body()).await;
        for path in ["/", "/metricsx", "/metrics/", "/health"] {
            let (status, response) = request(addr, "GET", path).await;
            assert_eq!(status, 404, "{path}: {response}");
            assert!(!response.contains("keel_test_total"), "{response}");
        }
        for method in ["POST", "PUT", "DELETE"] {
            let (status, response) = request(addr, method, "/metrics").await;
            assert_eq!(status, 405, "{method}: {response}");
            assert!(
                response.to_ascii_lowercase().contains("allow: get\r\n"),
                "{response}"
            );
        }
    }

    #[tokio::test]
    async fn profile_paths_are_not_found_when_profiling_is_off() {
        let (addr, _shutdown, _task) = start(LIMITS, fixed_body()).await;
        for path in [
            "/debug/pprof/",
            "/debug/pprof/profile?seconds=1",
            "/debug/pprof/flamegraph?seconds=1",
            "/debug/pprof/heap",
        ] {
            let (status, response) = request(addr, "GET", path).await;
            assert_eq!(status, 404, "{path}: {response}");
            assert!(
                response.ends_with("not found: try GET /metrics\n"),
                "{response}"
            );
        }
    }

    /// Splits a raw response into its head and body.
    fn split_response(raw: &[u8]) -> (String, &[u8]) {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
            &raw[end + 4..],
        )
    }

    async fn request_bytes(addr: SocketAddr, path: &str) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out))
            .await
            .expect("response within 20 s")
            .unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn profiles_are_served_and_outlive_the_connection_deadline() {
        let _sampler = crate::profiling::lock_sampler_for_test().await;
        // A connection deadline far shorter than the profile.
        let limits = Limits {
            max_connection_time: Duration::from_millis(300),
            ..LIMITS
        };
        let profiles = Arc::new(Profiles::new(Err("off in this test".to_string())));
        let shutdown = CancellationToken::new();
        let (addr, _task) = serve_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            fixed_body(),
            Some(profiles),
            shutdown.clone(),
            limits,
        )
        .await
        .unwrap();

        let raw = request_bytes(addr, "/debug/pprof/profile?seconds=2").await;
        let (head, body) = split_response(&raw);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: application/octet-stream"),
            "{head}"
        );
        assert!(
            head.contains("content-disposition: attachment; filename=\"profile\""),
            "{head}"
        );
        let summary = crate::profiling::summarize(body).unwrap();
        assert_eq!(summary.sample_types, ["samples/count", "cpu/nanoseconds"]);

        // The other paths of the listener are as before; bad requests get a reason.
        assert_eq!(request(addr, "GET", "/metrics").await.0, 200);
        let (status, response) = request(addr, "GET", "/debug/pprof/profile?seconds=301").await;
        assert_eq!(status, 400, "{response}");
        assert!(
            response.ends_with("from 1 to 300 (got \"301\")\n"),
            "{response}"
        );
        let (status, response) = request(addr, "GET", "/debug/pprof/heap").await;
        assert_eq!(status, 503, "{response}");
        let (status, response) = request(addr, "GET", "/debug/pprof/block").await;
        assert_eq!(status, 404, "{response}");
        let (status, response) = request(addr, "GET", "/debug/pprofx").await;
        assert_eq!(status, 404, "{response}");
        assert!(
            response.ends_with("not found: try GET /metrics\n"),
            "{response}"
        );
        let (status, response) = request(addr, "GET", "/debug/pprof/").await;
        assert_eq!(status, 200, "{response}");

        // Shutdown cuts a long profile short and still ends the listener promptly.
        let long = tokio::spawn(async move { request(addr, "GET", "/debug/pprof/profile").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.cancel();
        let (status, response) = tokio::time::timeout(Duration::from_secs(5), long)
            .await
            .expect("the profile is cut short at shutdown")
            .unwrap();
        assert_eq!(status, 503, "{response}");
        assert!(response.contains("shutting down"), "{response}");
    }

    #[tokio::test]
    async fn slow_clients_cannot_keep_a_later_scrape_out() {
        let limits = Limits {
            max_connections: 4,
            header_read_timeout: Duration::from_secs(2),
            ..LIMITS
        };
        let (addr, _shutdown, _task) = start(limits, fixed_body()).await;
        // Many clients that start a request head and never finish it.
        let mut slow = Vec::new();
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Those beyond the limit may already be closed: a failed write is expected.
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: ").await;
            slow.push(stream);
        }
        // Every slot is taken: a complete request is closed at once, unanswered.
        assert_eq!(try_request(addr, "GET", "/metrics").await, None);
        // The slow clients are cut off by the header deadline...
        for mut stream in slow {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "a slow client kept its connection");
        }
        // ...and a scrape is answered again once their slots are back.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match try_request(addr, "GET", "/metrics").await {
                Some((200, response)) => {
                    assert!(response.ends_with(BODY), "{response}");
                    break;
                }
                other => assert!(Instant::now() < deadline, "no scrape answered: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_finishes_the_response_in_flight_and_ends_the_task() {
        // A slow scrape, so one is in flight when the token is cancelled.
        let render: Render = Arc::new(|| {
            std::thread::sleep(Duration::from_millis(400));
            BODY.to_string()
        });
        let (addr, shutdown, task) = start(LIMITS, render).await;
        // A client that never finishes its request head must not hold the shutdown up.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /metr").await.unwrap();
        let scrape = tokio::spawn(async move { request(addr, "GET", "/metrics").await });
        tokio::time::sleep(Duration::from_millis(150)).await;

        let cancelled_at = Instant::now();
        shutdown.cancel();
        let (status, response) = scrape.await.unwrap();
        assert_eq!(status, 200, "{response}");
        assert!(response.ends_with(BODY), "{response}");
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the listener task ends within 3 s of the cancel")
            .unwrap();
        assert!(cancelled_at.elapsed() < Duration::from_secs(3));
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }
}
