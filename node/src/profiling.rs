//! Profiles on demand, served by the metrics listener when `[metrics] profiling = true`
//! (`docs/profiling.md`):
//! - `GET /debug/pprof/profile?seconds=N`: a CPU profile of the whole process over `N`
//!   seconds (default 30, at most 300), gzip-compressed pprof protobuf as Go serves it;
//!   `&format=flamegraph`, or `GET /debug/pprof/flamegraph?seconds=N`, gives an SVG
//!   flamegraph instead;
//! - `GET /debug/pprof/heap`: the memory in use now, by allocation stack, from jemalloc's heap
//!   sampling, as pprof protobuf;
//! - `GET /debug/pprof/`: a plain-text index of the above.
//!
//! Invariants:
//! - One CPU profile at a time (the sampler is process-wide): a second request is answered
//!   409 at once. A profile ends early, its sampler stopped, when its client goes away or the
//!   node shuts down.
//! - The CPU sampler's signal handler does not allocate or follow an unchecked pointer:
//!   pprof's `frame-pointer` unwinder walks the frame-pointer chain, each read checked first
//!   (pprof's `validate`, a write to a pipe). The other unwinders of pprof 0.15 are not safe
//!   in a signal handler: the default one (backtrace-rs over libgcc's `_Unwind_Backtrace`)
//!   can take the loader's lock and has crashed and deadlocked processes (tikv/pprof-rs#36,
//!   #75), and the `framehop` one builds its tables, allocating, inside the handler on the
//!   first sample (fixed upstream after 0.15, unreleased). One libgcc call remains in the
//!   handler (pprof's sample table keys frames by `_Unwind_FindEnclosingFunction`): with
//!   glibc >= 2.35 and libgcc >= 12 that is `_dl_find_object`, lock-free and
//!   async-signal-safe; older systems take the loader's recursive lock there. The price of
//!   frame pointers: stacks are only as good as they are (build with
//!   `-C force-frame-pointers=yes`; [`Profiles::start`] warns when they are missing), and a
//!   sample starts at the interrupted function's caller.
//! - Heap sampling is compiled into jemalloc and switched on (`prof.active`) only here, at
//!   start, when profiling is configured: with `profiling = false` jemalloc's sampler stays
//!   inactive and costs nothing measurable.
//! - Symbolizing, encoding and jemalloc's dump run on blocking threads, never on the runtime's
//!   workers; a panic there is a 500, not a dead listener.
//! - Symbolizing parses the binary's debug information into a process-wide cache
//!   (backtrace-rs's): about 100-130 MB allocated for a release build, and up to a second of
//!   CPU the first time. It is kept for [`SYMBOLS_KEPT_FOR`] after the last profile, so that a series of
//!   profiles pays it once, then freed so that an idle node gives the memory back. Each
//!   distinct address of a CPU profile is resolved once, not once per stack it appears in.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use pprof::protos::Message;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ByteSize, MetricsConfig};

/// Length of a CPU profile when the request names none (Go's default).
pub const DEFAULT_SECONDS: u64 = 30;
/// Longest CPU profile served.
pub const MAX_SECONDS: u64 = 300;
/// CPU samples per second of CPU time. Not 100, so that sampling does not run in lockstep
/// with work on a 10 ms period.
pub const FREQUENCY_HZ: i32 = 99;

/// Path prefix of every profile.
pub const PREFIX: &str = "/debug/pprof";

/// How long the parsed debug information stays loaded after the last profile.
pub const SYMBOLS_KEPT_FOR: Duration = Duration::from_secs(600);

/// Bytes profiling holds between profiles ([`loaded_bytes`]).
static HELD: AtomicU64 = AtomicU64::new(0);

/// Bytes profiling holds now (the `profiles` memory consumer), 0 before the first profile:
/// the symbol cache, the parsed debug information of the binary (about 100 MB for a release
/// build: pprof loads it when a CPU profile starts, symbolizing adds to it), until it is freed
/// [`SYMBOLS_KEPT_FOR`] after the last profile; and pprof's table of CPU samples (about 20
/// MB), kept from the first CPU profile on. Measured as the work that loads them runs, with
/// jemalloc's per-thread counters (0 where jemalloc is not the allocator).
pub fn loaded_bytes() -> u64 {
    HELD.load(Ordering::Relaxed)
}

/// Adds to [`loaded_bytes`] what the calling thread allocated since `start` (its
/// [`thread_net_allocated`](crate::memory::thread_net_allocated) then) and still holds, less
/// `handed_over` bytes it allocated for others.
fn note_held(start: i64, handed_over: usize) {
    let grown = crate::memory::thread_net_allocated()
        - start
        - crate::units::allocation_size(handed_over) as i64;
    if let Ok(grown) = u64::try_from(grown) {
        HELD.fetch_add(grown, Ordering::Relaxed);
    }
}

/// [`note_held`] for work that answers `reply`.
fn note_symbols_loaded(start: i64, reply: &Result<Reply, ProfileError>) {
    note_held(start, reply.as_ref().map_or(0, |r| r.body.len()));
}

/// Bumped by every profile: a delayed free of the symbol cache only happens if no profile
/// came after the one that scheduled it.
static SYMBOLS_USED: AtomicU64 = AtomicU64::new(0);

/// The CPU sampler (a process-wide timer and signal handler): one permit, whoever serves
/// profiles in this process.
static CPU_SAMPLER: Semaphore = Semaphore::const_new(1);

/// Held by the tests of this crate that take CPU profiles, so that they do not refuse
/// each other.
#[cfg(test)]
static CPU_TEST_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes [`CPU_TEST_LOCK`], then waits until the sampler of the previous holder has stopped
/// (a profile cut short answers before its thread ends).
#[cfg(test)]
pub(crate) async fn lock_sampler_for_test() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = CPU_TEST_LOCK.lock().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while CPU_SAMPLER.available_permits() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    guard
}

const OCTET_STREAM: &str = "application/octet-stream";
const SVG: &str = "image/svg+xml";
const TEXT: &str = "text/plain; charset=utf-8";

/// Why a profile was not served; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The request is malformed (a bad `seconds` or `format`): 400.
    #[error("{0}")]
    BadRequest(String),
    /// No profile of that kind exists: 404.
    #[error("{0}")]
    NotFound(String),
    /// Only GET is served: 405.
    #[error("method not allowed: use GET")]
    MethodNotAllowed,
    /// A profile of the same kind is being taken: 409.
    #[error("{0}")]
    Busy(&'static str),
    /// The profile cannot be taken in this process, or the node is stopping: 503.
    #[error("{0}")]
    Unavailable(String),
    /// Taking or encoding the profile failed: 500.
    #[error("{0}")]
    Failed(String),
}

impl ProfileError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProfileError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProfileError::NotFound(_) => StatusCode::NOT_FOUND,
            ProfileError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProfileError::Busy(_) => StatusCode::CONFLICT,
            ProfileError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProfileError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// What a CPU profile is delivered as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuFormat {
    /// gzip-compressed pprof protobuf.
    Pprof,
    /// An SVG flamegraph.
    Flamegraph,
}

/// A request for a profile, parsed from a path and query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileRequest {
    /// `/debug/pprof/`: the index.
    Index,
    /// A CPU profile over `seconds`.
    Cpu {
        /// Length of the profile.
        seconds: u64,
        /// How it is delivered.
        format: CpuFormat,
    },
    /// The heap profile.
    Heap,
}

impl ProfileRequest {
    /// Parses a path under [`PREFIX`] and its query string (`seconds`, `format`; other
    /// parameters are ignored, as Go's handlers do).
    pub fn parse(path: &str, query: Option<&str>) -> Result<ProfileRequest, ProfileError> {
        let rest = path.strip_prefix(PREFIX).unwrap_or(path);
        let param = |name: &str| {
            query.and_then(|q| {
                q.split('&')
                    .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v)
            })
        };
        match rest {
            "" | "/" => Ok(ProfileRequest::Index),
            "/profile" | "/flamegraph" => {
                let seconds = parse_seconds(param("seconds"))?;
                let format = match (rest, param("format")) {
                    ("/flamegraph", None) => CpuFormat::Flamegraph,
                    (_, None | Some("" | "pprof" | "proto")) => CpuFormat::Pprof,
                    (_, Some("flamegraph" | "svg")) => CpuFormat::Flamegraph,
                    (_, Some(other)) => {
                        return Err(ProfileError::BadRequest(format!(
                            "format must be \"pprof\" or \"flamegraph\" (got \"{}\")",
                            printable(other)
                        )))
                    }
                };
                Ok(ProfileRequest::Cpu { seconds, format })
            }
            "/heap" => Ok(ProfileRequest::Heap),
            _ => Err(ProfileError::NotFound(format!(
                "not found: no profile at {}; see GET {PREFIX}/",
                printable(path)
            ))),
        }
    }
}

fn parse_seconds(raw: Option<&str>) -> Result<u64, ProfileError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_SECONDS);
    };
    match raw.parse::<u64>() {
        Ok(seconds) if (1..=MAX_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err(ProfileError::BadRequest(format!(
            "seconds must be a whole number from 1 to {MAX_SECONDS} (got \"{}\")",
            printable(raw)
        ))),
    }
}

/// At most 64 characters of `text`, control characters replaced: what a client sent, safe to
/// echo in a message.
fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A profile ready to be sent.
#[derive(Debug)]
struct Reply {
    content_type: &'static str,
    /// `Content-Disposition` file name, as Go's handlers give one.
    filename: Option<&'static str>,
    body: Bytes,
}

/// The profiles one node serves: created by [`Profiles::start`] when `[metrics] profiling`
/// is on, shared by every connection of the metrics listener.
#[derive(Debug)]
pub struct Profiles {
    /// One permit: a heap dump being written.
    heap: Arc<Semaphore>,
    /// The heap sampling interval in force, or why heap profiles are unavailable.
    heap_sampling: Result<u64, String>,
    /// Whether this binary keeps frame pointers (`None`: cannot tell on this platform).
    frame_pointers: Option<bool>,
    /// The node's memory governor: profiles are refused when they would bring pressure.
    memory: Option<Arc<crate::memory::Governor>>,
}

/// What a first profile loads, for the memory check before one (the symbol cache and pprof's
/// table: 123.6 MB after a first CPU profile of a release build, 135.4 MB with a heap profile,
/// docs/profiling.md), rounded up.
pub const FIRST_PROFILE_BYTES: u64 = 160 << 20;

impl Profiles {
    /// `None` when `config.profiling` is off. Otherwise switches jemalloc's heap sampling on
    /// at `config.heap_sample_bytes` (discarding what was sampled before), checks for frame
    /// pointers, and logs what is served; a part that cannot work here (heap profiles without
    /// a profiling jemalloc) is logged and answered 503, the rest is served.
    ///
    /// With `memory` (the node's governor), a profile is refused (503) while the node is under
    /// memory pressure, or when what a first profile loads ([`FIRST_PROFILE_BYTES`], unless
    /// the symbols are loaded already) would take the process's resident memory past the
    /// soft-pressure threshold of `memory.limit`.
    pub fn start(
        config: &MetricsConfig,
        memory: Option<Arc<crate::memory::Governor>>,
    ) -> Option<Arc<Profiles>> {
        if !config.profiling {
            return None;
        }
        let heap_sampling = heap::activate(config.heap_sample_bytes);
        match &heap_sampling {
            Ok(bytes) => info!(
                sample_bytes = bytes,
                "heap profiling on: jemalloc samples one allocation per {} allocated",
                ByteSize(*bytes)
            ),
            Err(e) => warn!("heap profiles unavailable: {e}"),
        }
        let mut profiles = Profiles::new(heap_sampling);
        profiles.memory = memory;
        if profiles.frame_pointers == Some(false) {
            warn!(
                "this keel binary was built without frame pointers: CPU profiles will have \
                 truncated stacks; build with RUSTFLAGS=\"-C force-frame-pointers=yes\" \
                 (docs/profiling.md)"
            );
        }
        info!("profiles on demand at {PREFIX}/ on the metrics listener");
        Some(Arc::new(profiles))
    }

    /// Profiles without touching the allocator: heap profiles are as `heap_sampling` says.
    pub(crate) fn new(heap_sampling: Result<u64, String>) -> Profiles {
        Profiles {
            heap: Arc::new(Semaphore::new(1)),
            heap_sampling,
            frame_pointers: frame_pointers::present(),
            memory: None,
        }
    }

    /// Refuses a profile the node cannot afford now: see [`Profiles::start`].
    fn check_memory(&self) -> Result<(), ProfileError> {
        let Some(governor) = &self.memory else {
            return Ok(());
        };
        let level = governor.pressure().level();
        if level > 0 {
            return Err(ProfileError::Unavailable(format!(
                "the node is under memory pressure (keel_memory_pressure {level}): a profile \
                 would add to it; try again when the pressure is 0\n"
            )));
        }
        let limit = governor.limit();
        let need = if loaded_bytes() >= FIRST_PROFILE_BYTES / 2 {
            0
        } else {
            FIRST_PROFILE_BYTES
        };
        let resident = crate::memory::process_resident_bytes();
        let ceiling = limit / 100 * crate::memory::SOFT_PERCENT;
        if need > 0 && limit > 0 && resident.saturating_add(need) > ceiling {
            return Err(ProfileError::Unavailable(format!(
                "a first profile loads about {} MiB (symbols and pprof's table): with {} MiB \
                 resident that would pass {}% of memory.limit ({} MiB) and shrink the caches; \
                 raise the limit to profile this node\n",
                need >> 20,
                resident >> 20,
                crate::memory::SOFT_PERCENT,
                limit >> 20
            )));
        }
        Ok(())
    }

    /// Answers a request for a path under [`PREFIX`]: the profile, or a plain-text error
    /// with its status. A CPU profile ends early (503) when `shutdown` is cancelled.
    pub async fn respond(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Response<Full<Bytes>> {
        let result = if method == Method::GET {
            match ProfileRequest::parse(path, query) {
                Ok(request) => self.serve(request, shutdown).await,
                Err(e) => Err(e),
            }
        } else {
            Err(ProfileError::MethodNotAllowed)
        };
        match result {
            Ok(reply) => self.ok_response(reply),
            Err(e) => error_response(&e),
        }
    }

    async fn serve(
        &self,
        request: ProfileRequest,
        shutdown: &CancellationToken,
    ) -> Result<Reply, ProfileError> {
        match request {
            ProfileRequest::Index => Ok(Reply {
                content_type: TEXT,
                filename: None,
                body: Bytes::from(self.index()),
            }),
            ProfileRequest::Cpu { seconds, format } => {
                self.check_memory()?;
                let reply = self
                    .cpu_profile(Duration::from_secs(seconds), format, shutdown)
                    .await;
                forget_symbols_later(shutdown);
                reply
            }
            ProfileRequest::Heap => {
                self.check_memory()?;
                let reply = self.heap_profile().await;
                forget_symbols_later(shutdown);
                reply
            }
        }
    }

    fn index(&self) -> String {
        let heap = match &self.heap_sampling {
            Ok(bytes) => format!("one allocation sampled per {} allocated", ByteSize(*bytes)),
            Err(e) => format!("unavailable: {e}"),
        };
        let frame_pointers = match self.frame_pointers {
            Some(true) => "frame pointers present",
            Some(false) => "built WITHOUT frame pointers: stacks will be truncated",
            None => "frame pointers not checked on this platform",
        };
        format!(
            "keel profiles (docs/profiling.md)\n\n\
             {PREFIX}/profile?seconds=N     CPU profile, pprof protobuf (gzip); N from 1 to \
             {MAX_SECONDS}, default {DEFAULT_SECONDS}; {FREQUENCY_HZ} Hz; {frame_pointers}\n\
             {PREFIX}/flamegraph?seconds=N  the same as an SVG flamegraph \
             (or profile?seconds=N&format=flamegraph)\n\
             {PREFIX}/heap                  memory in use by allocation stack, pprof protobuf \
             (gzip); {heap}\n\n\
             go tool pprof http://HOST:PORT{PREFIX}/profile?seconds=30\n\
             go tool pprof http://HOST:PORT{PREFIX}/heap\n"
        )
    }

    fn ok_response(&self, reply: Reply) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(reply.body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(reply.content_type),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(name) = reply.filename {
            if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
                headers.insert(header::CONTENT_DISPOSITION, value);
            }
        }
        response
    }

    /// Samples the whole process for `duration` and encodes the result. The sampler runs on
    /// a blocking thread that owns it from start to stop; it stops early if this future is
    /// dropped (the client went away) or `shutdown` is cancelled.
    async fn cpu_profile(
        &self,
        duration: Duration,
        format: CpuFormat,
        shutdown: &CancellationToken,
    ) -> Result<Reply, ProfileError> {
        let permit = CPU_SAMPLER.try_acquire().map_err(|_| {
            ProfileError::Busy(
                "a CPU profile is already being taken (one at a time): try again when it ends\n",
            )
        })?;
        // Dropping `stop` (this future dropped) or sending on it ends the profile early.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // Starting loads the symbol cache (pprof resolves a backtrace first, so that its
            // signal handler never has to) and, the first time, pprof's table of samples.
            let start = crate::memory::thread_net_allocated();
            let cpu = thread_cpu_time();
            let guard = pprof::ProfilerGuardBuilder::default()
                .frequency(FREQUENCY_HZ)
                .build()
                .map_err(|e| ProfileError::Failed(format!("cannot start the CPU profiler: {e}")))?;
            note_held(start, 0);
            let starting = thread_cpu_time().saturating_sub(cpu);
            match stopped.recv_timeout(duration) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(ProfileError::Unavailable(
                        "the CPU profile was cut short: the node is shutting down\n".to_string(),
                    ))
                }
            }
            // The samples must be read while the guard lives: dropping it discards them.
            let unresolved = guard
                .report()
                .build_unresolved()
                .map_err(|e| ProfileError::Failed(format!("cannot read the CPU profile: {e}")))?;
            drop(guard);
            Ok((unresolved, starting))
        });
        let (unresolved, starting) = tokio::select! {
            joined = task => flatten(joined)?,
            () = shutdown.cancelled() => {
                // The sampler stops within a moment; its thread ends by itself.
                let _ = stop.send(());
                return Err(shutting_down());
            }
        };
        let encoded = low_priority(move || {
            let start = crate::memory::thread_net_allocated();
            let cpu = thread_cpu_time();
            let reply = encode_cpu(&symbolize(&unresolved), format, duration);
            note_symbols_loaded(start, &reply);
            // Allocated by the sampler's thread: freed after the measurement.
            drop(unresolved);
            // What the profile cost besides its sampler, for operators (docs/profiling.md).
            info!(
                seconds = duration.as_secs(),
                start_cpu_ms = starting.as_millis() as u64,
                symbolize_cpu_ms = thread_cpu_time().saturating_sub(cpu).as_millis() as u64,
                held_mib = loaded_bytes() >> 20,
                "CPU profile taken"
            );
            reply
        });
        tokio::select! {
            done = encoded => done.and_then(|r| r),
            () = shutdown.cancelled() => Err(shutting_down()),
        }
    }

    /// jemalloc's sampled view of the memory in use now, as pprof protobuf.
    async fn heap_profile(&self) -> Result<Reply, ProfileError> {
        if let Err(e) = &self.heap_sampling {
            return Err(ProfileError::Unavailable(format!(
                "heap profiles are unavailable: {e}\n"
            )));
        }
        let permit = self.heap.clone().try_acquire_owned().map_err(|_| {
            ProfileError::Busy("a heap profile is being written: try again in a moment\n")
        })?;
        low_priority(move || {
            let _permit = permit;
            let start = crate::memory::thread_net_allocated();
            let cpu = thread_cpu_time();
            let reply = heap::dump_pprof().map(|body| Reply {
                content_type: OCTET_STREAM,
                filename: Some("heap"),
                body,
            });
            note_symbols_loaded(start, &reply);
            info!(
                cpu_ms = thread_cpu_time().saturating_sub(cpu).as_millis() as u64,
                held_mib = loaded_bytes() >> 20,
                "heap profile taken"
            );
            reply
        })
        .await
        .and_then(|r| r)
    }
}

/// Frees, [`SYMBOLS_KEPT_FOR`] from now unless another profile is taken meanwhile, the symbol
/// cache that symbolizing filled: parsed debug information, about 100 MB for a release build,
/// that would otherwise stay for the life of the process (and count against `memory.limit`).
/// Nothing is left waiting at shutdown.
fn forget_symbols_later(shutdown: &CancellationToken) {
    let generation = SYMBOLS_USED.fetch_add(1, Ordering::AcqRel) + 1;
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(SYMBOLS_KEPT_FOR) => {}
            () = shutdown.cancelled() => return,
        }
        if SYMBOLS_USED.load(Ordering::Acquire) == generation {
            // Takes backtrace's lock: a profile symbolizing meanwhile just loads it again.
            let _ = tokio::task::spawn_blocking(forget_symbols).await;
        }
    });
}

/// Frees the symbol cache now and takes what that gave back off [`loaded_bytes`]. The memory
/// governor calls it whenever pressure changes (the `profiles` consumer's resize), so a
/// profile's symbols never keep a node under pressure; a profile symbolizing meanwhile loads
/// them again (it takes backtrace's lock).
pub fn forget_symbols() {
    let start = crate::memory::thread_net_allocated();
    backtrace::clear_symbol_cache();
    let freed = start - crate::memory::thread_net_allocated();
    if let Ok(freed) = u64::try_from(freed) {
        let _ = HELD.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
            Some(h.saturating_sub(freed))
        });
    }
}

/// Resolves the samples' addresses to functions, files and lines, each distinct address once
/// (pprof's own `build` resolves every frame of every stack). What pprof's `Frames::from`
/// does otherwise: inlined frames of an address innermost first, unresolvable ones dropped.
fn symbolize(unresolved: &pprof::UnresolvedReport) -> pprof::Report {
    let mut known: HashMap<usize, Vec<pprof::Symbol>> = HashMap::new();
    let mut data: HashMap<pprof::Frames, isize> = HashMap::with_capacity(unresolved.data.len());
    for (stack, count) in &unresolved.data {
        let mut frames = Vec::with_capacity(stack.frames.len());
        for frame in &stack.frames {
            let symbols = known.entry(frame.ip).or_insert_with(|| resolve(frame.ip));
            if !symbols.is_empty() {
                frames.push(symbols.clone());
            }
        }
        let name_length = stack.thread_name_length.min(stack.thread_name.len());
        let frames = pprof::Frames {
            frames,
            thread_name: String::from_utf8_lossy(&stack.thread_name[..name_length]).into_owned(),
            thread_id: stack.thread_id,
            sample_timestamp: stack.sample_timestamp,
        };
        *data.entry(frames).or_insert(0) += *count;
    }
    pprof::Report {
        data,
        timing: unresolved.timing.clone(),
    }
}

/// The symbols (innermost inlined frame first) of a return address.
fn resolve(ip: usize) -> Vec<pprof::Symbol> {
    let mut symbols = Vec::new();
    backtrace::resolve(ip as *mut c_void, |symbol| {
        symbols.push(pprof::Symbol {
            name: symbol.name().map(|name| name.as_bytes().to_vec()),
            addr: symbol.addr(),
            lineno: symbol.lineno(),
            filename: symbol.filename().map(std::path::Path::to_path_buf),
        });
    });
    symbols
}

/// The result of a blocking task, a panic in it included.
fn shutting_down() -> ProfileError {
    ProfileError::Unavailable(
        "the CPU profile was cut short: the node is shutting down\n".to_string(),
    )
}

/// Runs `work` on a thread of its own at the lowest CPU priority (nice 19) and hands back
/// its result. Symbolizing a profile costs up to about a second of CPU (the first one after
/// a while loads the binary's debug information); at nice 19 that time comes from idle
/// cores, or, on a node that keeps every core busy, from a share of about 1.5% of one core
/// (the kernel's weight 15 against 1,024), so a profile takes from throughput no more than
/// that share while it is being symbolized; the answer comes later instead.
async fn low_priority<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ProfileError> + Send + 'static,
) -> Result<Result<T, ProfileError>, ProfileError> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("keel-symbolize".into())
        .spawn(move || {
            lower_this_threads_priority();
            let _ = done.send(work());
        })
        .map_err(|e| ProfileError::Failed(format!("cannot start a thread to symbolize: {e}\n")))?;
    result.await.map_err(|_| {
        error!("the thread symbolizing a profile stopped without an answer");
        ProfileError::Failed("the profile could not be taken: internal error (logged)\n".into())
    })
}

/// CPU time the calling thread has used (Linux: `CLOCK_THREAD_CPUTIME_ID`; zero elsewhere or
/// on failure).
#[allow(unsafe_code)]
fn thread_cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock_gettime` writes one `timespec` through the valid pointer given.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0 {
            return Duration::new(
                u64::try_from(now.tv_sec).unwrap_or(0),
                u32::try_from(now.tv_nsec).unwrap_or(0),
            );
        }
    }
    Duration::ZERO
}

/// Sets the calling thread's nice value to 19 (Linux: per thread). Failure leaves it as is.
#[allow(unsafe_code)]
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` and `setpriority` take and return plain integers; with `PRIO_PROCESS`
    // and a thread id, Linux sets that one thread's nice value.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

fn flatten<T>(
    joined: Result<Result<T, ProfileError>, tokio::task::JoinError>,
) -> Result<T, ProfileError> {
    match joined {
        Ok(result) => result,
        Err(e) => {
            error!(error = %e, "profile task failed");
            Err(ProfileError::Failed(
                "the profile could not be taken: internal error (logged)\n".to_string(),
            ))
        }
    }
}

fn encode_cpu(
    report: &pprof::Report,
    format: CpuFormat,
    duration: Duration,
) -> Result<Reply, ProfileError> {
    match format {
        CpuFormat::Pprof => {
            let profile = report
                .pprof()
                .map_err(|e| ProfileError::Failed(format!("cannot encode the CPU profile: {e}")))?;
            Ok(Reply {
                content_type: OCTET_STREAM,
                filename: Some("profile"),
                body: gzip(&profile.encode_to_vec())?,
            })
        }
        CpuFormat::Flamegraph => {
            let title = format!(
                "keel CPU, {} s at {FREQUENCY_HZ} Hz, {} samples",
                duration.as_secs(),
                report.data.values().sum::<isize>()
            );
            let svg = if report.data.is_empty() {
                empty_flamegraph(&title)
            } else {
                let mut options = pprof::flamegraph::Options::default();
                options.title = title;
                let mut svg = Vec::new();
                report
                    .flamegraph_with_options(&mut svg, &mut options)
                    .map_err(|e| {
                        ProfileError::Failed(format!("cannot draw the flamegraph: {e}"))
                    })?;
                svg
            };
            Ok(Reply {
                content_type: SVG,
                filename: None,
                body: Bytes::from(svg),
            })
        }
    }
}

/// An SVG that says there is nothing to draw (inferno refuses an empty profile).
fn empty_flamegraph(title: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"10\" y=\"24\" font-family=\"monospace\">{title}</text>\
         <text x=\"10\" y=\"48\" font-family=\"monospace\">no samples: the process used no CPU \
         time while it was profiled</text></svg>\n"
    )
    .into_bytes()
}

fn gzip(raw: &[u8]) -> Result<Bytes, ProfileError> {
    use std::io::Write;
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder
        .write_all(raw)
        .and_then(|()| encoder.finish())
        .map(Bytes::from)
        .map_err(|e| ProfileError::Failed(format!("cannot compress the profile: {e}")))
}

fn error_response(e: &ProfileError) -> Response<Full<Bytes>> {
    let mut text = e.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = e.status();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
    if matches!(e, ProfileError::MethodNotAllowed) {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

/// What a pprof profile holds, read back: for tests and tools that check a profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileSummary {
    /// `type/unit` of each value of a sample (`samples/count`, `cpu/nanoseconds`).
    pub sample_types: Vec<String>,
    /// Number of samples (distinct stacks).
    pub samples: usize,
    /// Sum over samples of each value, in the order of `sample_types`.
    pub totals: Vec<i64>,
    /// Names of the functions the profile's locations resolve to.
    pub functions: Vec<String>,
    /// Name of the innermost function of each sample's stack, where it resolves.
    pub leaf_functions: Vec<String>,
    /// Number of locations (addresses), resolved or not.
    pub locations: usize,
}

/// Reads a profile as served (gzip-compressed pprof protobuf, or uncompressed).
pub fn summarize(data: &[u8]) -> Result<ProfileSummary, ProfileError> {
    let raw = if data.starts_with(&[0x1f, 0x8b]) {
        use std::io::Read;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut raw)
            .map_err(|e| ProfileError::BadRequest(format!("not gzip: {e}")))?;
        raw
    } else {
        data.to_vec()
    };
    let profile = pprof::protos::Profile::decode(raw.as_slice())
        .map_err(|e| ProfileError::BadRequest(format!("not a pprof profile: {e}")))?;
    let string = |index: i64| {
        usize::try_from(index)
            .ok()
            .and_then(|i| profile.string_table.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let sample_types = profile
        .sample_type
        .iter()
        .map(|t| format!("{}/{}", string(t.ty), string(t.unit)))
        .collect::<Vec<_>>();
    let mut totals = vec![0i64; sample_types.len()];
    for sample in &profile.sample {
        for (total, value) in totals.iter_mut().zip(&sample.value) {
            *total = total.saturating_add(*value);
        }
    }
    let function_names: std::collections::HashMap<u64, String> = profile
        .function
        .iter()
        .map(|f| (f.id, string(f.name)))
        .collect();
    let location_leaf: std::collections::HashMap<u64, &String> = profile
        .location
        .iter()
        .filter_map(|l| Some((l.id, function_names.get(&l.line.first()?.function_id)?)))
        .collect();
    let leaf_functions = profile
        .sample
        .iter()
        .filter_map(|s| {
            location_leaf
                .get(s.location_id.first()?)
                .map(|n| (*n).clone())
        })
        .collect();
    Ok(ProfileSummary {
        sample_types,
        samples: profile.sample.len(),
        totals,
        leaf_functions,
        functions: profile.function.iter().map(|f| string(f.name)).collect(),
        locations: profile.location.len(),
    })
}

/// jemalloc's heap profiling, through its `mallctl` interface.
mod heap {
    use super::ProfileError;
    use crate::config::ByteSize;

    /// Switches sampling on at one sample per `sample_bytes` (a power of two, as
    /// `Config::validate` requires) and discards what was sampled before. Returns the
    /// interval in force, or why heap profiling is unavailable.
    #[allow(unsafe_code)]
    pub(super) fn activate(sample_bytes: ByteSize) -> Result<u64, String> {
        let lg_sample = usize::try_from(sample_bytes.0.max(1).ilog2()).unwrap_or(19);
        // SAFETY: `opt.prof` is a read-only bool (jemalloc(3)); it exists when jemalloc is
        // built with profiling, else the read fails with ENOENT.
        let built_in: bool =
            unsafe { tikv_jemalloc_ctl::raw::read(b"opt.prof\0") }.map_err(|e| {
                format!("this jemalloc is built without heap profiling (opt.prof: {e})")
            })?;
        if !built_in {
            return Err(
                "jemalloc was started with prof:false (MALLOC_CONF overrides the binary's \
                 prof:true)"
                    .to_string(),
            );
        }
        // SAFETY: `prof.active` is a readable bool (jemalloc(3)).
        let already: bool = unsafe { tikv_jemalloc_ctl::raw::read(b"prof.active\0") }
            .map_err(|e| format!("cannot read whether sampling is on (prof.active): {e}"))?;
        // Started sampling (`MALLOC_CONF=prof_active:true`): what it sampled since the
        // process began (start-up included) is kept, at the interval it was started with.
        if !already {
            // SAFETY: `prof.reset` takes a size_t, the new lg_prof_sample (jemalloc(3)).
            unsafe { tikv_jemalloc_ctl::raw::write(b"prof.reset\0", lg_sample) }
                .map_err(|e| format!("cannot set the sampling interval (prof.reset): {e}"))?;
            // SAFETY: `prof.active` takes a bool (jemalloc(3)).
            unsafe { tikv_jemalloc_ctl::raw::write(b"prof.active\0", true) }
                .map_err(|e| format!("cannot activate sampling (prof.active): {e}"))?;
        }
        // SAFETY: `prof.lg_sample` is a readable size_t (jemalloc(3)).
        let in_force: usize = unsafe { tikv_jemalloc_ctl::raw::read(b"prof.lg_sample\0") }
            .map_err(|e| format!("cannot read the sampling interval (prof.lg_sample): {e}"))?;
        Ok(1u64
            .checked_shl(u32::try_from(in_force).unwrap_or(u32::MAX))
            .unwrap_or(u64::MAX))
    }

    /// Dumps the sampled heap and converts it to gzip-compressed pprof protobuf, symbolized
    /// in this process. Blocking (file I/O, symbolization): call it off the runtime's workers.
    pub(super) fn dump_pprof() -> Result<bytes::Bytes, ProfileError> {
        // `activate` succeeded, so `opt.prof` is readable and the controller exists.
        let control = jemalloc_pprof::PROF_CTL.as_ref().ok_or_else(|| {
            ProfileError::Unavailable(
                "heap profiles are unavailable: jemalloc is not profiling\n".to_string(),
            )
        })?;
        let mut control = control.blocking_lock();
        let profile = control
            .dump_pprof()
            .map_err(|e| ProfileError::Failed(format!("cannot write the heap profile: {e:#}\n")))?;
        drop(control);
        // A profile that cannot be trimmed is still a good profile: serve it as it is.
        Ok(bytes::Bytes::from(
            trim_allocator_frames(&profile).unwrap_or(profile),
        ))
    }

    /// Removes the allocator's own frames from the top of every stack (jemalloc's sampling
    /// path, tikv-jemallocator), as Go's heap profiles start at the code that allocated:
    /// otherwise every byte is "flat" in `prof_backtrace_impl`.
    fn trim_allocator_frames(gzipped: &[u8]) -> Option<Vec<u8>> {
        use pprof::protos::{Message, Profile};
        use std::collections::HashSet;
        use std::io::Read;

        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gzipped)
            .read_to_end(&mut raw)
            .ok()?;
        let mut profile = Profile::decode(raw.as_slice()).ok()?;
        let text = |index: i64| {
            usize::try_from(index)
                .ok()
                .and_then(|i| profile.string_table.get(i))
                .map_or("", String::as_str)
        };
        let allocator_functions: HashSet<u64> = profile
            .function
            .iter()
            .filter(|f| is_allocator(text(f.name), text(f.filename)))
            .map(|f| f.id)
            .collect();
        // A location is the allocator's when its innermost frame is (the allocator may be
        // inlined into a caller's shim, `__rust_alloc`).
        let allocator_locations: HashSet<u64> = profile
            .location
            .iter()
            .filter(|l| {
                l.line
                    .first()
                    .is_some_and(|line| allocator_functions.contains(&line.function_id))
            })
            .map(|l| l.id)
            .collect();
        let mut used = HashSet::new();
        for sample in &mut profile.sample {
            let top = sample
                .location_id
                .iter()
                .take_while(|id| allocator_locations.contains(id))
                .count();
            if top < sample.location_id.len() {
                sample.location_id.drain(..top);
            }
            used.extend(sample.location_id.iter().copied());
        }
        profile.location.retain(|l| used.contains(&l.id));
        super::gzip(&profile.encode_to_vec())
            .ok()
            .map(|b| b.to_vec())
    }

    /// A function of jemalloc or of the Rust binding to it: by its source file (jemalloc's C
    /// is built in tikv-jemalloc-sys's output folder, its sources named relative to it in
    /// some builds) or its prefixed internal name.
    fn is_allocator(name: &str, file: &str) -> bool {
        name.starts_with("_rjem_")
            || name.starts_with("je_")
            || file.contains("/tikv-jemalloc-sys-")
            || file.contains("/tikv-jemallocator-")
            || file.contains("include/jemalloc/")
            || (file.starts_with("src/") && file.ends_with(".c"))
    }
}

/// Whether the code of this binary keeps frame pointers, which the CPU sampler's unwinder
/// follows. A probe function reads its own frame pointer and checks that the return address
/// saved next to it lies in its caller: true only when frames are linked.
#[allow(unsafe_code)]
mod frame_pointers {
    use super::c_void;

    /// `Some(true)` with frame pointers, `Some(false)` without, `None` where not checked.
    pub(super) fn present() -> Option<bool> {
        probe()
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline(never)]
    fn probe() -> Option<bool> {
        let start = probe as fn() -> Option<bool> as usize;
        let saved = std::hint::black_box(return_address());
        Some(saved.is_some_and(|address| address > start && address - start < 4096))
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    fn probe() -> Option<bool> {
        None
    }

    /// The return address saved in this function's frame record, found through the frame
    /// pointer register: `[fp + 8]` on x86-64 (after the saved rbp) and on aarch64 (after the
    /// saved x29).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline(never)]
    fn return_address() -> Option<usize> {
        let fp: usize;
        // SAFETY: copies the frame-pointer register into a variable; touches no memory.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags))
        };
        // SAFETY: as above.
        #[cfg(target_arch = "aarch64")]
        unsafe {
            std::arch::asm!("mov {}, x29", out(reg) fp, options(nomem, nostack, preserves_flags))
        };
        let slot = fp.checked_add(std::mem::size_of::<usize>())?;
        if fp == 0 || slot % std::mem::align_of::<usize>() != 0 {
            return None;
        }
        // Without frame pointers the register may hold anything: check the memory is mapped
        // before reading it (pprof's check writes it to a pipe, which fails on bad memory).
        if !pprof::validate(slot as *const c_void) {
            return None;
        }
        // SAFETY: `slot` is aligned and `validate` has just read those bytes.
        Some(unsafe { std::ptr::read_volatile(slot as *const usize) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn requests_parse_with_defaults_limits_and_clear_errors() {
        use ProfileRequest::*;
        let parse = ProfileRequest::parse;
        assert_eq!(parse("/debug/pprof/", None).unwrap(), Index);
        assert_eq!(parse("/debug/pprof", None).unwrap(), Index);
        assert_eq!(
            parse("/debug/pprof/profile", None).unwrap(),
            Cpu {
                seconds: 30,
                format: CpuFormat::Pprof
            }
        );
        assert_eq!(
            parse("/debug/pprof/profile", Some("seconds=300&debug=1")).unwrap(),
            Cpu {
                seconds: 300,
                format: CpuFormat::Pprof
            }
        );
        assert_eq!(
            parse("/debug/pprof/profile", Some("format=flamegraph&seconds=2")).unwrap(),
            Cpu {
                seconds: 2,
                format: CpuFormat::Flamegraph
            }
        );
        assert_eq!(
            parse("/debug/pprof/flamegraph", Some("seconds=5")).unwrap(),
            Cpu {
                seconds: 5,
                format: CpuFormat::Flamegraph
            }
        );
        assert_eq!(parse("/debug/pprof/heap", Some("gc=1")).unwrap(), Heap);

        for bad in [
            "0",
            "301",
            "-1",
            "1.5",
            "",
            "abc",
            "99999999999999999999999",
        ] {
            let e = parse("/debug/pprof/profile", Some(&format!("seconds={bad}"))).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(
                e.to_string(),
                format!("seconds must be a whole number from 1 to 300 (got \"{bad}\")"),
            );
        }
        let e = parse("/debug/pprof/profile", Some("format=json")).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("\"json\""), "{e}");
        let e = parse("/debug/pprof/goroutine", None).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(e.to_string().contains("/debug/pprof/goroutine"), "{e}");
        // What a client sent is echoed cut short and without control characters.
        let long = "9".repeat(500) + "\u{1b}";
        let e = parse("/debug/pprof/profile", Some(&format!("seconds={long}"))).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
    }

    #[tokio::test]
    async fn symbolizing_runs_on_a_thread_of_its_own_at_the_lowest_priority() {
        let (name, nice) = low_priority(|| {
            // Field 19 of /proc/thread-self/stat is the thread's nice value; the name (field
            // 2) has no spaces here.
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let nice: i32 = stat.split(' ').nth(18).unwrap().parse().unwrap();
            Ok((std::thread::current().name().map(str::to_string), nice))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(name.as_deref(), Some("keel-symbolize"));
        if cfg!(target_os = "linux") {
            assert_eq!(nice, 19);
        }
        // The caller's own thread keeps its priority (whatever the test runs at).
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert_ne!(stat.split(' ').nth(18), Some("19"));
        // A failing job's error comes back as it is.
        let failed = low_priority::<()>(|| Err(ProfileError::Failed("no".into())))
            .await
            .unwrap();
        assert!(matches!(failed, Err(ProfileError::Failed(m)) if m == "no"));
    }

    #[test]
    fn the_frame_pointer_probe_gives_an_answer_without_crashing() {
        // Whatever the build, the probe reads only checked memory; a `-C
        // force-frame-pointers=yes` build answers true.
        let present = frame_pointers::present();
        eprintln!("frame pointers: {present:?}");
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert!(present.is_some());
        }
    }

    #[test]
    fn summarize_refuses_what_is_not_a_profile() {
        assert!(summarize(b"\x1f\x8bnot really gzip").is_err());
        assert!(summarize(b"\xff\xff\xff\xff").is_err());
        assert_eq!(
            summarize(&gzip(b"").unwrap()).unwrap(),
            ProfileSummary::default()
        );
    }

    /// Every CPU-profile check in one test: the sampler is process-wide, so two tests taking
    /// profiles at once would refuse each other.
    #[tokio::test]
    async fn profiles_are_refused_under_memory_pressure_or_when_the_limit_cannot_take_one() {
        use crate::memory::{Governor, Pressure};
        let shutdown = CancellationToken::new();
        let answer = |profiles: Arc<Profiles>, path: &'static str| {
            let shutdown = shutdown.clone();
            async move {
                let response = profiles
                    .respond(&Method::GET, path, Some("seconds=1"), &shutdown)
                    .await;
                let status = response.status();
                (
                    status,
                    String::from_utf8_lossy(&body_bytes(response).await).into_owned(),
                )
            }
        };
        let with = |limit: u64, pressure: Arc<Pressure>| {
            let mut profiles = Profiles::new(Err("not in this test".to_string()));
            profiles.memory = Some(Arc::new(Governor::new(limit, Vec::new(), pressure)));
            Arc::new(profiles)
        };

        // Under pressure: refused before anything is loaded or sampled.
        let pressure = Arc::new(Pressure::default());
        pressure.set(1);
        let profiles = with(1 << 40, pressure.clone());
        for path in ["/debug/pprof/profile", "/debug/pprof/heap"] {
            let (status, text) = answer(profiles.clone(), path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
            assert!(
                text.contains("under memory pressure (keel_memory_pressure 1)"),
                "{text}"
            );
        }

        // A limit that cannot take what a first profile loads on top of what is resident.
        let resident = crate::memory::process_resident_bytes();
        let tight = (resident + FIRST_PROFILE_BYTES / 2) / 85 * 100;
        let (status, text) = answer(with(tight, Arc::default()), "/debug/pprof/heap").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        assert!(
            text.contains("a first profile loads about 160 MiB"),
            "{text}"
        );

        // Room enough: the check passes (the heap profile is then unavailable in this
        // process for its own reason).
        let roomy = (resident + 2 * FIRST_PROFILE_BYTES) / 85 * 100;
        let (status, text) = answer(with(roomy, Arc::default()), "/debug/pprof/heap").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        assert!(text.contains("not in this test"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cpu_profiles_are_pprof_or_svg_and_one_at_a_time() {
        let _sampler = lock_sampler_for_test().await;
        let profiles = Arc::new(Profiles::new(Err("not in this test".to_string())));
        let shutdown = CancellationToken::new();
        // Work to sample, on its own thread.
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let spinner = {
            let busy = busy.clone();
            std::thread::spawn(move || spin_until_stopped(&busy))
        };

        let first = {
            let (profiles, shutdown) = (profiles.clone(), shutdown.clone());
            tokio::spawn(async move {
                profiles
                    .respond(
                        &Method::GET,
                        "/debug/pprof/profile",
                        Some("seconds=1"),
                        &shutdown,
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A second profile while the first runs is refused at once, with a reason.
        let second = profiles
            .respond(
                &Method::GET,
                "/debug/pprof/flamegraph",
                Some("seconds=1"),
                &shutdown,
            )
            .await;
        assert_eq!(second.status(), StatusCode::CONFLICT);
        assert!(body_text(second).await.contains("already being taken"));

        let first = first.await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()[header::CONTENT_TYPE], OCTET_STREAM);
        let body = body_bytes(first).await;
        assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip");
        let summary = summarize(&body).unwrap();
        assert_eq!(summary.sample_types, ["samples/count", "cpu/nanoseconds"]);
        assert!(summary.samples > 0, "{summary:?}");
        // About 99 samples of the spinning thread over 1 s, each worth 1/99 s.
        assert!(summary.totals[0] >= 20, "{summary:?}");
        // Each stack's CPU time is its count times the period, rounded down.
        let cpu = summary.totals[1];
        let exact = summary.totals[0] * 1_000_000_000 / 99;
        assert!(cpu <= exact, "{summary:?}");
        assert!(cpu >= exact - summary.samples as i64, "{summary:?}");
        // With frame pointers the stacks are real: the spinning thread's loop is there (a
        // sample starts at the caller of the interrupted function, here `spin_step`).
        if frame_pointers::present() == Some(true) {
            assert!(
                summary
                    .functions
                    .iter()
                    .any(|f| f.contains("spin_until_stopped")),
                "{:?}",
                summary.functions
            );
        }

        // The sampler is free again: a flamegraph.
        let svg = profiles
            .respond(
                &Method::GET,
                "/debug/pprof/profile",
                Some("seconds=1&format=flamegraph"),
                &shutdown,
            )
            .await;
        assert_eq!(svg.status(), StatusCode::OK);
        assert_eq!(svg.headers()[header::CONTENT_TYPE], SVG);
        let svg = body_text(svg).await;
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
        assert!(svg.contains("keel CPU, 1 s at 99 Hz"), "{svg}");

        // Shutdown cuts a profile short, and frees the sampler.
        let cut = {
            let (profiles, shutdown) = (profiles.clone(), shutdown.clone());
            tokio::spawn(async move {
                profiles
                    .respond(
                        &Method::GET,
                        "/debug/pprof/profile",
                        Some("seconds=60"),
                        &shutdown,
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cancelled_at = std::time::Instant::now();
        shutdown.cancel();
        let cut = tokio::time::timeout(Duration::from_secs(5), cut)
            .await
            .expect("a cancelled profile ends at once")
            .unwrap();
        assert!(cancelled_at.elapsed() < Duration::from_secs(5));
        assert_eq!(cut.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body_text(cut).await.contains("shutting down"));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while CPU_SAMPLER.available_permits() == 0 {
            assert!(std::time::Instant::now() < deadline, "sampler never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
    }

    #[tokio::test]
    async fn bad_requests_other_methods_and_unavailable_heap_get_clear_answers() {
        let profiles = Profiles::new(Err("jemalloc was started with prof:false".to_string()));
        let shutdown = CancellationToken::new();
        let answer = |method: Method, path: &'static str, query: Option<&'static str>| {
            let (profiles, shutdown) = (&profiles, &shutdown);
            async move { profiles.respond(&method, path, query, shutdown).await }
        };

        let r = answer(Method::GET, "/debug/pprof/profile", Some("seconds=0")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body_text(r).await,
            "seconds must be a whole number from 1 to 300 (got \"0\")\n"
        );
        let r = answer(Method::POST, "/debug/pprof/profile", None).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET");
        let r = answer(Method::GET, "/debug/pprof/heap", None).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body_text(r).await.contains("prof:false"));
        let r = answer(Method::GET, "/debug/pprof/", None).await;
        assert_eq!(r.status(), StatusCode::OK);
        let index = body_text(r).await;
        assert!(index.contains("/debug/pprof/profile?seconds=N"), "{index}");
        assert!(
            index.contains("unavailable: jemalloc was started with prof:false"),
            "{index}"
        );
    }

    /// The heap profile needs jemalloc started with `prof:true`, which only the environment
    /// can ask of a test process: the test runs itself again with `MALLOC_CONF` set (and
    /// `_RJEM_MALLOC_CONF`: built for keel-node alone, jemalloc is prefixed, not the
    /// process's malloc, so the test allocates from it directly).
    #[test]
    fn heap_profile_is_pprof_of_the_memory_in_use() {
        const CHILD: &str = "KEEL_PROFILING_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "profiling::tests::heap_profile_is_pprof_of_the_memory_in_use",
                    "--test-threads=1",
                    "--nocapture",
                ])
                .env(CHILD, "1")
                .env("MALLOC_CONF", "prof:true,prof_active:false")
                .env("_RJEM_MALLOC_CONF", "prof:true,prof_active:false")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "child test failed:\n{text}");
            assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
            return;
        }
        // In the child: jemalloc started with prof:true.
        let sampling = heap::activate(ByteSize::kib(4)).unwrap();
        assert_eq!(sampling, 4096);
        // 64 MiB kept alive from one recognisable stack, well above the sampling interval.
        let kept: Vec<JemallocBlock> = (0..64).map(|_| hold_one_mib()).collect();
        let profiles = Profiles::new(Ok(sampling));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let response = runtime.block_on(profiles.respond(
            &Method::GET,
            "/debug/pprof/heap",
            None,
            &CancellationToken::new(),
        ));
        assert_eq!(response.status(), StatusCode::OK);
        let body = runtime.block_on(body_bytes(response));
        let summary = summarize(&body).unwrap();
        assert_eq!(summary.sample_types, ["inuse_space/bytes"]);
        assert!(summary.samples > 0, "{summary:?}");
        // Estimated from samples: within a factor of two of what is held.
        assert!(
            summary.totals[0] > 32 << 20,
            "in use {} of 64 MiB held: {summary:?}",
            summary.totals[0]
        );
        assert!(
            summary.functions.iter().any(|f| f.contains("hold_one_mib")),
            "the allocating function is named: {:?}",
            summary.functions
        );
        // Stacks start at the code that allocated, not in jemalloc.
        assert!(
            summary
                .leaf_functions
                .iter()
                .all(|f| !f.contains("prof_backtrace") && !f.starts_with("_rjem_")),
            "{:?}",
            summary.leaf_functions
        );
        drop(kept);
    }

    /// Burns CPU until `busy` is cleared.
    #[inline(never)]
    fn spin_until_stopped(busy: &std::sync::atomic::AtomicBool) -> u64 {
        let mut x = 0u64;
        while busy.load(std::sync::atomic::Ordering::Relaxed) {
            x = spin_step(x);
        }
        x
    }

    #[inline(never)]
    fn spin_step(mut x: u64) -> u64 {
        for i in 0..100_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        x
    }

    /// A block allocated from jemalloc itself, freed on drop.
    struct JemallocBlock(*mut c_void);

    impl Drop for JemallocBlock {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: allocated by `tikv_jemalloc_sys::malloc`, freed once.
            unsafe { tikv_jemalloc_sys::free(self.0) }
        }
    }

    #[inline(never)]
    #[allow(unsafe_code)]
    fn hold_one_mib() -> JemallocBlock {
        // SAFETY: a plain allocation; checked for null, written within its size.
        let block = unsafe { tikv_jemalloc_sys::malloc(1 << 20) };
        assert!(!block.is_null());
        unsafe { std::ptr::write_bytes(block.cast::<u8>(), 7, 1 << 20) };
        std::hint::black_box(JemallocBlock(block))
    }

    async fn body_bytes(response: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt;
        response.into_body().collect().await.unwrap().to_bytes()
    }

    async fn body_text(response: Response<Full<Bytes>>) -> String {
        String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
    }
}
