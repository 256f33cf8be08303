//! The node's `config.toml`: one struct per section, defaults, environment overrides and
//! validation.
//!
//! Loading is one pipeline with one error path:
//! 1. the file is parsed into a TOML tree;
//! 2. `KEEL_<SECTION>_<KEY>` environment variables are applied on the tree (names are resolved
//!    against the known keys, so keys with underscores work: `KEEL_CONSENSUS_BLOCK_TIME_MS`);
//! 3. the tree is deserialized through `serde_path_to_error`, so an unknown key
//!    (`deny_unknown_fields`) or a bad value is reported by its dotted path
//!    (`unknown key "rpc.listen_adr"`) and where it came from (the file or the environment
//!    variable);
//! 4. [`Config::validate`] checks the semantic rules, again naming the key.
//!
//! Every key is optional; `docs/configuration.md` lists them with their defaults and rules.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_path_to_error::Segment;
use toml::{Table, Value};
use tracing_subscriber::filter::{Directive, LevelFilter};
use tracing_subscriber::EnvFilter;

pub use crate::units::ByteSize;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEEL_";

/// Name used for the configuration text in messages when it did not come from a named file.
const DEFAULT_ORIGIN: &str = "config.toml";

/// Why a configuration was refused. Every variant about a key carries its dotted path
/// (`"storage.rocksdb.block_cache_size"`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (a missing file included).
    #[error("cannot read config file {}: {source_error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message, not a `source`, so it prints once).
        source_error: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("{origin}: {message}")]
    Parse {
        /// Where the text came from (the file name).
        origin: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A key that keel does not know.
    #[error("{origin}: unknown key \"{key}\"")]
    UnknownKey {
        /// Where the key came from.
        origin: String,
        /// Dotted path of the key.
        key: String,
    },
    /// A value of the wrong type or form, or one breaking a rule, found while loading.
    #[error("{origin}: invalid value for \"{key}\": {message}")]
    InvalidValue {
        /// Where the value came from: the file, or `environment KEEL_...`.
        origin: String,
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value breaking a rule of [`Config::validate`] (on a config built in code).
    #[error("invalid value for \"{key}\": {message}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration could not be encoded as TOML (an integer above `i64::MAX`).
    #[error("cannot encode configuration: {0}")]
    Encode(String),
}

impl ConfigError {
    /// The dotted path of the key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. }
            | ConfigError::InvalidValue { key, .. }
            | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Parse { .. } | ConfigError::Encode(_) => None,
        }
    }
}

/// Result of configuration functions.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The whole `config.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Human-readable node name, shown to peers and in `chain_status`.
    pub moniker: String,
    /// `[p2p]`: networking.
    pub p2p: P2pConfig,
    /// `[rpc]`: the JSON-RPC server.
    pub rpc: RpcConfig,
    /// `[consensus]`: timing.
    pub consensus: ConsensusConfig,
    /// `[mempool]`: pending transaction limits.
    pub mempool: MempoolConfig,
    /// `[storage]`: database engine, RocksDB tuning and pruning.
    pub storage: StorageConfig,
    /// `[memory]`: process memory budget.
    pub memory: MemoryConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            moniker: "node0".to_string(),
            p2p: P2pConfig::default(),
            rpc: RpcConfig::default(),
            consensus: ConsensusConfig::default(),
            mempool: MempoolConfig::default(),
            storage: StorageConfig::default(),
            memory: MemoryConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// `[p2p]`: peer-to-peer networking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pConfig {
    /// Multiaddr to listen on (checked loosely here: it must start with `/`).
    pub listen_addr: String,
    /// Multiaddrs (with `/p2p/<peer id>`) of peers to stay connected to.
    pub persistent_peers: Vec<String>,
    /// Multiaddrs of peers asked for more peers at start.
    pub seeds: Vec<String>,
    /// Most connected peers.
    pub max_peers: u32,
    /// Number of good connections the peer manager keeps.
    pub target_peers: u32,
    /// Most inbound connections accepted per second.
    pub inbound_connections_per_sec: u32,
    /// Messages at least this large are compressed.
    pub compression_threshold_bytes: u32,
}

impl Default for P2pConfig {
    fn default() -> P2pConfig {
        P2pConfig {
            listen_addr: "/ip4/0.0.0.0/tcp/26656".to_string(),
            persistent_peers: Vec::new(),
            seeds: Vec::new(),
            max_peers: 50,
            target_peers: 16,
            inbound_connections_per_sec: 50,
            compression_threshold_bytes: 1024,
        }
    }
}

/// `[rpc]`: the JSON-RPC server (HTTP and WebSocket on one port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// Address to listen on.
    pub listen_addr: SocketAddr,
    /// Most simultaneous connections.
    pub max_connections: u32,
    /// Largest request body accepted.
    pub max_request_bytes: u32,
    /// Requests per second allowed from one IP address; 0 means unlimited.
    pub requests_per_sec_per_ip: u32,
    /// Most calls in one JSON-RPC batch.
    pub max_batch_size: u32,
    /// Most subscriptions one WebSocket connection may hold.
    pub max_subscriptions_per_connection: u32,
    /// Time a client has to send a request's head (idle keep-alive time included) and
    /// again its body, and most time a response may wait for the client to read it.
    pub request_timeout_ms: u64,
    /// Origins whose browser pages may call the server (CORS); `["*"]` for any, empty for
    /// none (no CORS headers).
    pub cors_allowed_origins: Vec<String>,
}

impl Default for RpcConfig {
    fn default() -> RpcConfig {
        RpcConfig {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 26657)),
            max_connections: 1000,
            max_request_bytes: 1_048_576,
            requests_per_sec_per_ip: 0,
            max_batch_size: 100,
            max_subscriptions_per_connection: 16,
            request_timeout_ms: 10_000,
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// `[consensus]`: timing of the consensus protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// How long a leader waits after its parent block before proposing, in milliseconds.
    pub block_time_ms: u64,
    /// How long a round may last before validators time out, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for ConsensusConfig {
    fn default() -> ConsensusConfig {
        ConsensusConfig {
            block_time_ms: 3000,
            timeout_ms: 6000,
        }
    }
}

/// `[mempool]`: limits on pending transactions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MempoolConfig {
    /// Most pending transactions.
    pub max_txs: usize,
    /// Most bytes of pending transactions (their encoded size).
    pub max_bytes: ByteSize,
}

impl From<&MempoolConfig> for crate::mempool::MempoolLimits {
    fn from(config: &MempoolConfig) -> crate::mempool::MempoolLimits {
        crate::mempool::MempoolLimits {
            max_txs: config.max_txs,
            max_bytes: config.max_bytes.0,
        }
    }
}

impl Default for MempoolConfig {
    fn default() -> MempoolConfig {
        MempoolConfig {
            max_txs: 100_000,
            max_bytes: ByteSize::mib(256),
        }
    }
}

/// `[storage]`: the database.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Which key-value store holds the chain.
    pub engine: StorageEngine,
    /// `[storage.rocksdb]`: RocksDB tuning.
    pub rocksdb: RocksDbConfig,
    /// `[storage.pruning]`: what history is kept.
    pub pruning: PruningConfig,
}

/// The key-value store behind the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageEngine {
    /// RocksDB on disk under the node's home directory.
    #[default]
    RocksDb,
    /// In memory, lost at exit (tests and throwaway devnets).
    Memory,
}

/// `[storage.rocksdb]`: RocksDB tuning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RocksDbConfig {
    /// Size of the block cache shared by all column families.
    pub block_cache_size: ByteSize,
    /// Size of one memtable.
    pub write_buffer_size: ByteSize,
    /// Most files RocksDB keeps open; -1 means no limit.
    pub max_open_files: i32,
    /// Compression of SST files.
    pub compression: Compression,
}

impl Default for RocksDbConfig {
    fn default() -> RocksDbConfig {
        RocksDbConfig {
            block_cache_size: ByteSize::gib(1),
            write_buffer_size: ByteSize::mib(64),
            max_open_files: 1000,
            compression: Compression::Lz4,
        }
    }
}

/// Compression of RocksDB files: the storage engine's own setting, named as in `config.toml`.
pub use keel_storage::Compression;

/// `[storage.pruning]`: how much history is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruningConfig {
    /// The pruning policy.
    pub mode: PruningMode,
    /// With `mode = "custom"`: the number of most recent blocks (and state versions) kept.
    pub keep_recent: u64,
    /// With `mode = "custom"`: prune every this many blocks.
    pub interval: u64,
}

/// The fewest blocks `custom` mode may keep: a restarted validator reloads the last
/// [`keel_consensus::HISTORY_HEADERS`] final headers (leader reputation), with room to spare.
pub const MIN_KEEP_RECENT: u64 = 64;
const _: () = assert!(MIN_KEEP_RECENT as usize >= keel_consensus::HISTORY_HEADERS);

/// Blocks kept by [`PruningMode::Default`].
pub const DEFAULT_KEEP_RECENT: u64 = 100_000;
/// Pruning interval of [`PruningMode::Default`].
pub const DEFAULT_PRUNING_INTERVAL: u64 = 10_000;

impl Default for PruningConfig {
    fn default() -> PruningConfig {
        PruningConfig {
            mode: PruningMode::Default,
            keep_recent: DEFAULT_KEEP_RECENT,
            interval: DEFAULT_PRUNING_INTERVAL,
        }
    }
}

impl PruningConfig {
    /// The effective `(keep_recent, interval)`, or `None` when nothing is ever pruned.
    ///
    /// `default` means (100000, 10000) whatever the keys say; `archive` means `None`;
    /// `custom` uses the keys.
    pub fn effective(&self) -> Option<(u64, u64)> {
        match self.mode {
            PruningMode::Default => Some((DEFAULT_KEEP_RECENT, DEFAULT_PRUNING_INTERVAL)),
            PruningMode::Archive => None,
            PruningMode::Custom => Some((self.keep_recent, self.interval)),
        }
    }
}

/// The pruning policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruningMode {
    /// Keep the most recent 100,000 blocks, prune every 10,000.
    #[default]
    Default,
    /// Keep everything.
    Archive,
    /// Use `keep_recent` and `interval`.
    Custom,
}

/// With `memory.limit`, the percent of it RocksDB's block cache (memtables included) gets
/// when `storage.rocksdb.block_cache_size` is left at its default, and the most an explicit
/// value may take (`keel_node::memory` splits the rest).
pub const ROCKSDB_SHARE: u64 = 30;
/// The same for `mempool.max_bytes`.
pub const MEMPOOL_SHARE: u64 = 15;

/// `[memory]`: the process memory budget and the allocator's knobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Soft limit for the whole process (GOMEMLIMIT-style); 0 means none.
    pub limit: ByteSize,
    /// jemalloc: milliseconds before freed (dirty) pages go back to the OS; 0 = at once,
    /// -1 = never.
    pub dirty_decay_ms: i64,
    /// jemalloc: the same for muzzy pages (the second purge stage).
    pub muzzy_decay_ms: i64,
    /// jemalloc purges on its own background threads (else inside allocations).
    pub background_threads: bool,
}

impl Default for MemoryConfig {
    fn default() -> MemoryConfig {
        MemoryConfig {
            limit: ByteSize(0),
            dirty_decay_ms: 10_000,
            muzzy_decay_ms: 10_000,
            background_threads: true,
        }
    }
}

/// The longest decay time accepted: one day.
const MAX_DECAY_MS: i64 = 86_400_000;

/// `[metrics]`: the Prometheus endpoint, and profiles on demand on the same listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `GET /metrics`.
    pub listen_addr: SocketAddr,
    /// Serve CPU and heap profiles under `/debug/pprof/` (see `docs/profiling.md`), and keep
    /// jemalloc's heap sampling on from the start. Off: those paths answer 404 and heap
    /// sampling stays inactive.
    pub profiling: bool,
    /// With `profiling`: jemalloc records one allocation per this many bytes allocated, on
    /// average (its `lg_prof_sample`, as a size). A power of two.
    pub heap_sample_bytes: ByteSize,
}

/// Default of `metrics.heap_sample_bytes`: jemalloc's own default sampling interval.
pub const DEFAULT_HEAP_SAMPLE_BYTES: ByteSize = ByteSize::kib(512);
/// Smallest `metrics.heap_sample_bytes`: below, sampling costs far more than it tells.
const MIN_HEAP_SAMPLE_BYTES: ByteSize = ByteSize::kib(1);
/// Largest `metrics.heap_sample_bytes`.
const MAX_HEAP_SAMPLE_BYTES: ByteSize = ByteSize::gib(1);

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 26660)),
            profiling: false,
            heap_sample_bytes: DEFAULT_HEAP_SAMPLE_BYTES,
        }
    }
}

/// `[log]`: logging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `"info"`, or `"keel_node=debug,info"`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// Library targets that log each message they handle when a peer is slow (libp2p-gossipsub
/// writes a `warn` line per dropped message, the whole message in it), and the level each
/// logs at unless a directive names it ([`with_quiet_defaults`]). The drops are counted in
/// `keel_p2p_dropped_messages_total` instead.
pub const QUIET_TARGETS: &[(&str, &str)] = &[("libp2p_gossipsub", "error")];

/// `directives` (comma-separated, [`EnvFilter`] syntax) with `target=level` of
/// [`QUIET_TARGETS`] added for each target that no directive names. A directive names a target
/// when its own target is that target, a module of it (`libp2p_gossipsub::behaviour`) or a
/// prefix of it (`libp2p`: tracing matches targets by prefix, so `libp2p=debug` asks for
/// gossipsub's debug lines too); a bare level (`debug`) names none.
pub fn with_quiet_defaults(directives: &str) -> String {
    let targets: Vec<&str> = directives
        .split(',')
        .filter_map(|d| {
            let d = d.trim();
            let end = d.find(['[', '='])?;
            Some(d[..end].trim()).filter(|t| !t.is_empty())
        })
        .collect();
    let mut out = directives.trim().trim_end_matches(',').to_string();
    for (quiet, level) in QUIET_TARGETS {
        let named = targets
            .iter()
            .any(|t| quiet.starts_with(t) || t.starts_with(quiet));
        if !named {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&format!("{quiet}={level}"));
        }
    }
    out
}

impl LogConfig {
    /// `level` as a tracing filter, each directive parsed by `tracing_subscriber`'s own
    /// parser and the filter built by [`EnvFilter`] itself; errors name `log.level`.
    ///
    /// Blanks around a directive are ignored. Beyond the parser's rules a lone word (no `=`
    /// or `[`) must be a level: the parser would take `"verbose"` for a target to log at
    /// every level, and so silence everything else. [`QUIET_TARGETS`] that no directive
    /// names are added ([`with_quiet_defaults`]).
    pub fn filter(&self) -> Result<EnvFilter> {
        let fail = |message: String| ConfigError::Invalid {
            key: "log.level".to_string(),
            message,
        };
        let directives: Vec<&str> = self
            .level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        if directives.is_empty() {
            return Err(fail(
                "must not be empty (e.g. \"info\" or \"keel_node=debug,info\")".to_string(),
            ));
        }
        for directive in &directives {
            if !directive.contains(['=', '[']) && directive.parse::<LevelFilter>().is_err() {
                return Err(fail(format!(
                    "\"{directive}\" is not a level (trace, debug, info, warn, error, off); \
                     to name a target give its level too (\"{directive}=debug\")"
                )));
            }
            if let Err(e) = directive.parse::<Directive>() {
                return Err(fail(format!("bad directive \"{directive}\": {e}")));
            }
        }
        EnvFilter::builder()
            .parse(with_quiet_defaults(&directives.join(",")))
            .map_err(|e| fail(e.to_string()))
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every key (dotted path) in file order, with the comment `keel init` writes above it.
/// A test checks that this covers exactly the keys of [`Config`].
const KEY_DOCS: &[(&str, &str)] = &[
    ("moniker", "Human-readable name of this node."),
    ("p2p.listen_addr", "Multiaddr to listen on for peers."),
    (
        "p2p.persistent_peers",
        "Multiaddrs with /p2p/<peer id> to stay connected to.",
    ),
    (
        "p2p.seeds",
        "Multiaddrs of peers asked for more peers at start.",
    ),
    ("p2p.max_peers", "Most connected peers."),
    (
        "p2p.target_peers",
        "Good connections to keep (at most max_peers).",
    ),
    (
        "p2p.inbound_connections_per_sec",
        "Most inbound connections accepted per second.",
    ),
    (
        "p2p.compression_threshold_bytes",
        "Compress messages at least this large.",
    ),
    ("rpc.listen_addr", "JSON-RPC over HTTP and WebSocket."),
    ("rpc.max_connections", "Most simultaneous connections."),
    ("rpc.max_request_bytes", "Largest request body."),
    (
        "rpc.requests_per_sec_per_ip",
        "Requests per second from one IP address; 0 = unlimited.",
    ),
    ("rpc.max_batch_size", "Most calls in one batch."),
    (
        "rpc.max_subscriptions_per_connection",
        "Most subscriptions per WebSocket connection.",
    ),
    (
        "rpc.request_timeout_ms",
        "Time to send a request's head, then its body; to read a response.",
    ),
    (
        "rpc.cors_allowed_origins",
        "Origins allowed by CORS, e.g. [\"https://wallet.example\"]; [\"*\"] = any; [] = no CORS.",
    ),
    (
        "consensus.block_time_ms",
        "Leader waits this long after the parent before proposing.",
    ),
    (
        "consensus.timeout_ms",
        "A round times out after this long (more than block_time_ms).",
    ),
    ("mempool.max_txs", "Most pending transactions."),
    ("mempool.max_bytes", "Most bytes of pending transactions."),
    ("storage.engine", "\"rocksdb\" | \"memory\""),
    ("storage.rocksdb.block_cache_size", "Shared block cache."),
    ("storage.rocksdb.write_buffer_size", "One memtable."),
    (
        "storage.rocksdb.max_open_files",
        "-1 = unlimited, else at least 16.",
    ),
    (
        "storage.rocksdb.compression",
        "\"none\" | \"lz4\" | \"zstd\" | \"snappy\"",
    ),
    (
        "storage.pruning.mode",
        "\"default\" (keep 100000, every 10000) | \"archive\" | \"custom\" (the keys below)",
    ),
    (
        "storage.pruning.keep_recent",
        "Blocks kept (custom mode only).",
    ),
    (
        "storage.pruning.interval",
        "Prune every this many blocks (custom mode only).",
    ),
    (
        "memory.limit",
        "Soft limit for the whole process; \"0\" = none.",
    ),
    (
        "memory.dirty_decay_ms",
        "jemalloc: ms before freed pages go back to the OS; 0 = at once, -1 = never.",
    ),
    (
        "memory.muzzy_decay_ms",
        "jemalloc: the same for muzzy pages; 0 = at once, -1 = never.",
    ),
    (
        "memory.background_threads",
        "jemalloc purges on its own threads (true) or inside allocations (false).",
    ),
    ("metrics.listen_addr", "Prometheus metrics at /metrics."),
    (
        "metrics.profiling",
        "CPU and heap profiles at /debug/pprof/ on this listener (docs/profiling.md).",
    ),
    (
        "metrics.heap_sample_bytes",
        "With profiling: heap profile samples one allocation per this many bytes (power of two).",
    ),
    (
        "log.level",
        "A tracing filter: \"info\", \"keel_node=debug,info\".",
    ),
    ("log.format", "\"text\" | \"json\""),
];

impl Config {
    /// Reads `path`, applies `KEEL_*` environment overrides from this process and validates.
    /// A missing file is an error naming the path.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source_error: source,
        })?;
        // Variables whose name or value is not UTF-8 cannot name or set a key: skip them
        // rather than panicking as `std::env::vars` would.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Config::parse(&text, &path.display().to_string(), env)
    }

    /// Parses `text`, applies the overrides found in `env` (name, value pairs such as
    /// `std::env::vars()`) and validates. Messages name the text `config.toml`.
    ///
    /// `KEEL_<SECTION>_<KEY>` (upper case, `KEEL_<KEY>` for top-level keys, every level of
    /// nesting joined by `_`: `KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE`) overrides a key. Its value
    /// is read as the key's type: an integer, a boolean, an array (TOML inline array
    /// `["a", "b"]`, or a comma-separated list of strings), else a string. `KEEL_*` variables
    /// that name no key (such as `KEEL_HOME`) are ignored.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        Config::parse(text, DEFAULT_ORIGIN, env)
    }

    fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut tree: Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: parse_message(text, &e),
        })?;
        let defaults = Config::default().to_table()?;
        let env_sources = apply_env(&mut tree, &defaults, env)?;
        let origin_of = |key: &str| match env_sources.get(key) {
            Some(var) => format!("environment {var}"),
            None => origin.to_string(),
        };
        let config = deserialize(&tree, &defaults, &origin_of, origin)?;
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } => ConfigError::InvalidValue {
                origin: origin_of(&key),
                key,
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Every environment variable that overrides a key, with the key's dotted path, in file
    /// order: `("KEEL_RPC_LISTEN_ADDR", "rpc.listen_addr")`, ...
    pub fn env_vars() -> Vec<(String, String)> {
        KEY_DOCS
            .iter()
            .map(|(key, _)| (env_name(key), (*key).to_string()))
            .collect()
    }

    /// Checks the rules that types alone cannot express, naming the first bad key.
    /// See `docs/configuration.md` for the list.
    pub fn validate(&self) -> Result<()> {
        fn fail(key: &str, message: impl Into<String>) -> Result<()> {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                message: message.into(),
            })
        }
        const MAX_BLOCK_TIME_MS: u64 = 600_000;
        const MAX_TIMEOUT_MS: u64 = 3_600_000;
        const MIN_SIZE: ByteSize = ByteSize::mib(1);
        const MIN_MEMORY_LIMIT: ByteSize = ByteSize::mib(64);
        const MAX_RPC_REQUEST_TIMEOUT_MS: u64 = 600_000;

        if self.moniker.trim().is_empty() {
            return fail("moniker", "must not be empty");
        }
        if self.moniker.len() > 64 || self.moniker.chars().any(char::is_control) {
            return fail(
                "moniker",
                "must be at most 64 bytes without control characters",
            );
        }

        let p2p = &self.p2p;
        if !p2p.listen_addr.starts_with('/') {
            return fail(
                "p2p.listen_addr",
                format!(
                    "\"{}\" is not a multiaddr (e.g. \"/ip4/0.0.0.0/tcp/26656\")",
                    p2p.listen_addr
                ),
            );
        }
        for (key, list) in [
            ("p2p.persistent_peers", &p2p.persistent_peers),
            ("p2p.seeds", &p2p.seeds),
        ] {
            if let Some(bad) = list.iter().find(|a| !a.starts_with('/')) {
                return fail(key, format!("\"{bad}\" is not a multiaddr (e.g. \"/ip4/10.0.0.1/tcp/26656/p2p/12D3Koo...\")"));
            }
        }
        if p2p.max_peers == 0 {
            return fail("p2p.max_peers", "must be at least 1");
        }
        if p2p.target_peers > p2p.max_peers {
            return fail(
                "p2p.target_peers",
                format!(
                    "{} is above p2p.max_peers ({})",
                    p2p.target_peers, p2p.max_peers
                ),
            );
        }
        if p2p.inbound_connections_per_sec == 0 {
            return fail("p2p.inbound_connections_per_sec", "must be at least 1");
        }

        if self.rpc.max_connections == 0 {
            return fail("rpc.max_connections", "must be at least 1");
        }
        if self.rpc.max_request_bytes < 1024 {
            return fail("rpc.max_request_bytes", "must be at least 1024");
        }
        if self.rpc.max_batch_size == 0 {
            return fail("rpc.max_batch_size", "must be at least 1");
        }
        if self.rpc.max_subscriptions_per_connection == 0 {
            return fail("rpc.max_subscriptions_per_connection", "must be at least 1");
        }
        if !(100..=MAX_RPC_REQUEST_TIMEOUT_MS).contains(&self.rpc.request_timeout_ms) {
            return fail(
                "rpc.request_timeout_ms",
                format!(
                    "must be between 100 and {MAX_RPC_REQUEST_TIMEOUT_MS} (got {})",
                    self.rpc.request_timeout_ms
                ),
            );
        }
        for origin in &self.rpc.cors_allowed_origins {
            if let Err(message) = crate::rpc::cors::check_origin(origin) {
                return fail("rpc.cors_allowed_origins", message);
            }
        }
        if self.rpc.listen_addr == self.metrics.listen_addr && self.rpc.listen_addr.port() != 0 {
            return fail(
                "metrics.listen_addr",
                format!("{} is also rpc.listen_addr", self.metrics.listen_addr),
            );
        }
        let sample = self.metrics.heap_sample_bytes;
        if !sample.0.is_power_of_two()
            || sample < MIN_HEAP_SAMPLE_BYTES
            || sample > MAX_HEAP_SAMPLE_BYTES
        {
            return fail(
                "metrics.heap_sample_bytes",
                format!(
                    "must be a power of two from {MIN_HEAP_SAMPLE_BYTES} to \
                     {MAX_HEAP_SAMPLE_BYTES}, such as \"512KiB\" (got {sample})"
                ),
            );
        }

        let consensus = &self.consensus;
        if !(10..=MAX_BLOCK_TIME_MS).contains(&consensus.block_time_ms) {
            return fail(
                "consensus.block_time_ms",
                format!(
                    "must be between 10 and {MAX_BLOCK_TIME_MS} (got {})",
                    consensus.block_time_ms
                ),
            );
        }
        if consensus.timeout_ms <= consensus.block_time_ms {
            return fail(
                "consensus.timeout_ms",
                format!(
                    "must be more than consensus.block_time_ms ({}) (got {})",
                    consensus.block_time_ms, consensus.timeout_ms
                ),
            );
        }
        if consensus.timeout_ms > MAX_TIMEOUT_MS {
            return fail(
                "consensus.timeout_ms",
                format!(
                    "must be at most {MAX_TIMEOUT_MS} (got {})",
                    consensus.timeout_ms
                ),
            );
        }

        if self.mempool.max_txs == 0 {
            return fail("mempool.max_txs", "must be at least 1");
        }
        let min_mempool_bytes = ByteSize(crate::mempool::MIN_POOL_BYTES);
        if self.mempool.max_bytes < min_mempool_bytes {
            return fail(
                "mempool.max_bytes",
                format!(
                    "must be at least {min_mempool_bytes} (one transaction of the largest size)"
                ),
            );
        }

        let rocks = &self.storage.rocksdb;
        if rocks.block_cache_size < MIN_SIZE {
            return fail(
                "storage.rocksdb.block_cache_size",
                format!("must be at least {MIN_SIZE}"),
            );
        }
        if rocks.write_buffer_size < MIN_SIZE {
            return fail(
                "storage.rocksdb.write_buffer_size",
                format!("must be at least {MIN_SIZE}"),
            );
        }
        if rocks.max_open_files != -1 && rocks.max_open_files < 16 {
            return fail(
                "storage.rocksdb.max_open_files",
                format!(
                    "must be -1 (unlimited) or at least 16 (got {})",
                    rocks.max_open_files
                ),
            );
        }
        let pruning = &self.storage.pruning;
        if pruning.mode == PruningMode::Custom {
            if pruning.interval == 0 {
                return fail("storage.pruning.interval", "must be at least 1");
            }
            if pruning.keep_recent < MIN_KEEP_RECENT {
                return fail(
                    "storage.pruning.keep_recent",
                    format!(
                        "must be at least {MIN_KEEP_RECENT} (a restarted validator reloads the \
                         last {} final headers for leader reputation) (got {})",
                        keel_consensus::HISTORY_HEADERS,
                        pruning.keep_recent
                    ),
                );
            }
            if pruning.keep_recent < pruning.interval {
                return fail(
                    "storage.pruning.keep_recent",
                    format!(
                        "must be at least storage.pruning.interval ({}) (got {})",
                        pruning.interval, pruning.keep_recent
                    ),
                );
            }
        }

        for (key, value) in [
            ("memory.dirty_decay_ms", self.memory.dirty_decay_ms),
            ("memory.muzzy_decay_ms", self.memory.muzzy_decay_ms),
        ] {
            if !(-1..=MAX_DECAY_MS).contains(&value) {
                return fail(
                    key,
                    format!(
                        "must be -1 (never), 0 (at once) or up to {MAX_DECAY_MS} (got {value})"
                    ),
                );
            }
        }
        let limit = self.memory.limit;
        if limit.0 != 0 {
            if limit < MIN_MEMORY_LIMIT {
                return fail(
                    "memory.limit",
                    format!("must be \"0\" (none) or at least {MIN_MEMORY_LIMIT}"),
                );
            }
            // Sizes left at their defaults derive from the limit; one set explicitly must
            // fit in its share of it.
            let defaults = Config::default();
            let shares = [
                (
                    "storage.rocksdb.block_cache_size",
                    rocks.block_cache_size,
                    defaults.storage.rocksdb.block_cache_size,
                    ROCKSDB_SHARE,
                    self.storage.engine == StorageEngine::RocksDb,
                ),
                (
                    "mempool.max_bytes",
                    self.mempool.max_bytes,
                    defaults.mempool.max_bytes,
                    MEMPOOL_SHARE,
                    true,
                ),
            ];
            for (key, set, default, percent, applies) in shares {
                let allowed = ByteSize(limit.0 / 100 * percent);
                if applies && set != default && set > allowed {
                    return fail(
                        key,
                        format!(
                            "{set} is above its share of memory.limit ({limit}): at most \
                             {percent}%, {allowed}; lower one of the two, or leave {key} unset \
                             to derive it from memory.limit"
                        ),
                    );
                }
            }
        }

        self.log.filter()?;
        Ok(())
    }

    /// The complete configuration as `config.toml` text, every key present and commented,
    /// in the order of `docs/configuration.md`. [`Config::from_toml_str`] reads it back equal.
    ///
    /// Integers above `i64::MAX` cannot be written in TOML; a config holding one (possible
    /// only when built in code) yields a text holding just a comment saying so.
    pub fn to_toml_string(&self) -> String {
        match self.to_table() {
            Ok(table) => write_commented(&table),
            Err(e) => format!("# {e}\n"),
        }
    }

    fn to_table(&self) -> Result<Table> {
        match Value::try_from(self) {
            Ok(Value::Table(table)) => Ok(table),
            Ok(_) => Err(ConfigError::Encode("not a table".to_string())),
            Err(e) => Err(ConfigError::Encode(e.to_string())),
        }
    }
}

/// One-line TOML syntax error: `line L, column C: message`.
fn parse_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_string(),
    }
}

/// `KEEL_` + the path's segments joined by `_`, upper case.
fn env_name(dotted: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        dotted.replace('.', "_").to_ascii_uppercase()
    )
}

/// Dotted paths of every non-table value in `table`, in key order.
fn leaf_paths(table: &Table) -> Vec<Vec<String>> {
    fn walk(table: &Table, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (key, value) in table {
            prefix.push(key.clone());
            match value {
                Value::Table(t) => walk(t, prefix, out),
                _ => out.push(prefix.clone()),
            }
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(table, &mut Vec::new(), &mut out);
    out
}

fn get_path<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (last, parents) = path.split_last()?;
    let mut current = table;
    for key in parents {
        current = current.get(key)?.as_table()?;
    }
    current.get(last)
}

/// Sets `path` in `table`, creating missing tables. A value where a table should be is left
/// alone: the deserializer then refuses it, naming the file's key.
fn set_path(table: &mut Table, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(t) => current = t,
            _ => return,
        }
    }
    current.insert(last.clone(), value);
}

/// Applies the `KEEL_*` overrides in `env` on `tree`; returns which variable set which key.
fn apply_env(
    tree: &mut Table,
    defaults: &Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let by_name: BTreeMap<String, Vec<String>> = leaf_paths(defaults)
        .into_iter()
        .map(|p| (env_name(&p.join(".")), p))
        .collect();
    let mut sources = BTreeMap::new();
    for (name, raw) in env {
        if !name.starts_with(ENV_PREFIX) {
            continue;
        }
        let Some(path) = by_name.get(&name) else {
            continue;
        };
        let Some(default) = get_path(defaults, path) else {
            continue;
        };
        let key = path.join(".");
        let value =
            parse_env_value(&raw, default).map_err(|message| ConfigError::InvalidValue {
                origin: format!("environment {name}"),
                key: key.clone(),
                message,
            })?;
        set_path(tree, path, value);
        sources.insert(key, name);
    }
    Ok(sources)
}

/// Reads an environment variable's text as the type of the key's default value.
fn parse_env_value(raw: &str, default: &Value) -> std::result::Result<Value, String> {
    let text = raw.trim();
    match default {
        Value::Integer(_) => text
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("expected an integer, got \"{raw}\"")),
        Value::Float(_) => text
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("expected a number, got \"{raw}\"")),
        Value::Boolean(_) => match text {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err(format!("expected true or false, got \"{raw}\"")),
        },
        Value::Array(_) if text.starts_with('[') => {
            let parsed: std::result::Result<Table, _> = toml::from_str(&format!("v = {text}"));
            match parsed.ok().and_then(|mut t| t.remove("v")) {
                Some(array @ Value::Array(_)) => Ok(array),
                _ => Err(format!(
                    "expected a TOML array such as [\"a\", \"b\"], got {raw}"
                )),
            }
        }
        Value::Array(_) => Ok(Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        )),
        _ => Ok(Value::String(raw.to_string())),
    }
}

/// Deserializes `tree`. On failure the error names the key at fault by the path
/// `serde_path_to_error` followed to it, and where its value came from (`origin_of`).
fn deserialize(
    tree: &Table,
    defaults: &Table,
    origin_of: &dyn Fn(&str) -> String,
    origin: &str,
) -> Result<Config> {
    let error = match serde_path_to_error::deserialize(Value::Table(tree.clone())) {
        Ok(config) => return Ok(config),
        Err(error) => error,
    };
    // The key is the path's table keys: an error inside an array is reported on the array.
    let path: Vec<String> = error
        .path()
        .iter()
        .map_while(|segment| match segment {
            Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let message = error.inner().message().trim().to_string();
    if path.is_empty() {
        return Err(ConfigError::Parse {
            origin: origin.to_string(),
            message,
        });
    }
    let key = path.join(".");
    let message = match (get_path(defaults, &path), get_path(tree, &path)) {
        // Every known key has a default: a path without one ends at a key keel does not know.
        (None, _) => {
            return Err(ConfigError::UnknownKey {
                origin: origin_of(&key),
                key,
            })
        }
        (Some(Value::Table(_)), Some(found)) if !found.is_table() => {
            format!("expected a table ([{key}]), found {}", found.type_str())
        }
        // Messages such as "invalid socket address syntax" do not quote the value.
        (_, Some(Value::String(text))) if !message.contains(text.as_str()) => {
            format!("{message} (got \"{text}\")")
        }
        _ => message,
    };
    Err(ConfigError::InvalidValue {
        origin: origin_of(&key),
        key,
        message,
    })
}

/// Writes `table` (a serialized [`Config`]) as `config.toml`, in [`KEY_DOCS`] order with each
/// key's comment above it.
fn write_commented(table: &Table) -> String {
    let mut out = String::from(
        "# keel node configuration. Every key is optional; the values below are the defaults.\n\
         # Any key can be overridden by an environment variable KEEL_<SECTION>_<KEY>,\n\
         # e.g. KEEL_RPC_LISTEN_ADDR or KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE.\n\
         # Reference: docs/configuration.md\n",
    );
    let mut section = String::new();
    for (dotted, doc) in KEY_DOCS {
        let (table_path, key) = dotted.rsplit_once('.').unwrap_or(("", dotted));
        let path: Vec<String> = dotted.split('.').map(str::to_string).collect();
        let Some(value) = get_path(table, &path) else {
            continue;
        };
        if table_path != section {
            section = table_path.to_string();
            out.push_str(&format!("\n[{section}]\n"));
        }
        out.push_str(&format!("# {doc}\n{key} = {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err(text: &str, vars: &[(&str, &str)]) -> String {
        Config::from_toml_str(text, env(vars))
            .unwrap_err()
            .to_string()
    }

    /// DESIGN.md section 4, verbatim.
    const DESIGN_DEFAULTS: &str = r#"
moniker = "node0"
[p2p]
listen_addr = "/ip4/0.0.0.0/tcp/26656"
persistent_peers = []      # multiaddrs with /p2p/<peer id>
seeds = []
max_peers = 50
target_peers = 16          # keep 10-20 good connections
inbound_connections_per_sec = 50
compression_threshold_bytes = 1024
[rpc]
listen_addr = "127.0.0.1:26657"
max_connections = 1000
max_request_bytes = 1048576
requests_per_sec_per_ip = 0   # 0 = unlimited
max_batch_size = 100
[consensus]
block_time_ms = 3000
timeout_ms = 6000
[mempool]
max_txs = 100000
max_bytes = "256MiB"
[storage]
engine = "rocksdb"
[storage.rocksdb]
block_cache_size = "1GiB"
write_buffer_size = "64MiB"
max_open_files = 1000
compression = "lz4"
[storage.pruning]
mode = "default"           # "default" | "archive" | "custom"
keep_recent = 100000
interval = 10000
[memory]
limit = "0"                # GOMEMLIMIT-style soft limit for the whole process; "0" = none
dirty_decay_ms = 10000     # jemalloc: how fast freed memory goes back to the OS (GOGC-like)
muzzy_decay_ms = 10000
[metrics]
listen_addr = "127.0.0.1:26660"
profiling = false          # /debug/pprof/* on this listener
[log]
level = "info"
format = "text"            # "text" | "json"
"#;

    #[test]
    fn defaults_equal_design_md() {
        let parsed = Config::from_toml_str(DESIGN_DEFAULTS, no_env()).unwrap();
        assert_eq!(parsed, Config::default());
        let d = Config::default();
        assert_eq!(d.mempool.max_bytes, ByteSize(256 << 20));
        assert_eq!(d.storage.rocksdb.block_cache_size, ByteSize(1 << 30));
        assert_eq!(d.memory.limit, ByteSize(0));
        assert_eq!(d.rpc.listen_addr.to_string(), "127.0.0.1:26657");
        assert_eq!(d.metrics.listen_addr.to_string(), "127.0.0.1:26660");
        assert!(d.validate().is_ok());
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            Config::from_toml_str("", no_env()).unwrap(),
            Config::default()
        );
        assert_eq!(
            Config::from_toml_str("# nothing\n[rpc]\n", no_env()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn every_section_is_parsed() {
        let text = r#"
moniker = "val-7"
[p2p]
listen_addr = "/ip4/10.0.0.7/tcp/30000"
persistent_peers = ["/ip4/10.0.0.1/tcp/30000/p2p/12D3KooWA"]
seeds = ["/dns4/seed.example/tcp/30000"]
max_peers = 80
target_peers = 20
inbound_connections_per_sec = 5
compression_threshold_bytes = 0
[rpc]
listen_addr = "0.0.0.0:8545"
max_connections = 10
max_request_bytes = 65536
requests_per_sec_per_ip = 100
[consensus]
block_time_ms = 500
timeout_ms = 2000
[mempool]
max_txs = 5000
max_bytes = "32MiB"
[storage]
engine = "memory"
[storage.rocksdb]
block_cache_size = "1.5GiB"
write_buffer_size = 134217728
max_open_files = -1
compression = "zstd"
[storage.pruning]
mode = "custom"
keep_recent = 2000
interval = 100
[memory]
limit = "8GiB"
[metrics]
listen_addr = "[::1]:9100"
[log]
level = "keel_node=debug,info"
format = "json"
"#;
        let c = Config::from_toml_str(text, no_env()).unwrap();
        assert_eq!(c.moniker, "val-7");
        assert_eq!(c.p2p.listen_addr, "/ip4/10.0.0.7/tcp/30000");
        assert_eq!(
            c.p2p.persistent_peers,
            vec!["/ip4/10.0.0.1/tcp/30000/p2p/12D3KooWA"]
        );
        assert_eq!(c.p2p.seeds, vec!["/dns4/seed.example/tcp/30000"]);
        assert_eq!((c.p2p.max_peers, c.p2p.target_peers), (80, 20));
        assert_eq!(c.p2p.inbound_connections_per_sec, 5);
        assert_eq!(c.p2p.compression_threshold_bytes, 0);
        assert_eq!(c.rpc.listen_addr, "0.0.0.0:8545".parse().unwrap());
        assert_eq!(c.rpc.max_connections, 10);
        assert_eq!(c.rpc.max_request_bytes, 65536);
        assert_eq!(c.rpc.requests_per_sec_per_ip, 100);
        assert_eq!(
            c.consensus,
            ConsensusConfig {
                block_time_ms: 500,
                timeout_ms: 2000
            }
        );
        assert_eq!(
            c.mempool,
            MempoolConfig {
                max_txs: 5000,
                max_bytes: ByteSize::mib(32)
            }
        );
        assert_eq!(c.storage.engine, StorageEngine::Memory);
        assert_eq!(
            c.storage.rocksdb,
            RocksDbConfig {
                block_cache_size: ByteSize(3 << 29),
                write_buffer_size: ByteSize::mib(128),
                max_open_files: -1,
                compression: Compression::Zstd,
            }
        );
        assert_eq!(c.storage.pruning.effective(), Some((2000, 100)));
        assert_eq!(c.memory.limit, ByteSize::gib(8));
        assert_eq!(c.metrics.listen_addr, "[::1]:9100".parse().unwrap());
        assert_eq!(c.log.level, "keel_node=debug,info");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn pruning_modes_give_the_effective_schedule() {
        let mut p = PruningConfig {
            mode: PruningMode::Default,
            keep_recent: 7,
            interval: 3,
        };
        assert_eq!(p.effective(), Some((100_000, 10_000)));
        p.mode = PruningMode::Archive;
        assert_eq!(p.effective(), None);
        p.mode = PruningMode::Custom;
        assert_eq!(p.effective(), Some((7, 3)));
        let c = Config::from_toml_str("[storage.pruning]\nmode = \"archive\"", no_env()).unwrap();
        assert_eq!(c.storage.pruning.effective(), None);
    }

    #[test]
    fn unknown_keys_are_refused_by_dotted_path() {
        assert_eq!(
            err("monicker = \"x\"", &[]),
            "config.toml: unknown key \"monicker\""
        );
        assert_eq!(
            err("[rpc]\nlisten_adr = \"127.0.0.1:1\"", &[]),
            "config.toml: unknown key \"rpc.listen_adr\""
        );
        assert_eq!(
            err("[storage.rocksdb]\ncache = \"1GiB\"", &[]),
            "config.toml: unknown key \"storage.rocksdb.cache\""
        );
        assert_eq!(err("[rpcc]\n", &[]), "config.toml: unknown key \"rpcc\"");
        assert_eq!(
            err("[storage.pruning]\nmode = \"archive\"\nkeep = 5", &[]),
            "config.toml: unknown key \"storage.pruning.keep\""
        );
        let e = Config::from_toml_str("[storage]\nrocksdb = 5", no_env()).unwrap_err();
        assert_eq!(e.key(), Some("storage.rocksdb"));
        assert_eq!(
            e.to_string(),
            "config.toml: invalid value for \"storage.rocksdb\": expected a table \
             ([storage.rocksdb]), found integer"
        );
        // An override below it does not hide the file's mistake.
        assert_eq!(
            err(
                "[storage]\nrocksdb = 5",
                &[("KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE", "2GiB")]
            ),
            e.to_string()
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        assert_eq!(
            err("[mempool]\nmax_bytes = \"12XB\"", &[]),
            "config.toml: invalid value for \"mempool.max_bytes\": invalid size \"12XB\": expected \
             a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
        );
        let e = err("[consensus]\nblock_time_ms = \"fast\"", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"consensus.block_time_ms\": "),
            "{e}"
        );
        let e = err("[rpc]\nlisten_addr = \"localhost\"", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"rpc.listen_addr\": "),
            "{e}"
        );
        let e = err("[p2p]\nmax_peers = -1", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"p2p.max_peers\": "),
            "{e}"
        );
        let e = err("[storage.rocksdb]\ncompression = \"brotli\"", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"storage.rocksdb.compression\": "),
            "{e}"
        );
        assert!(e.contains("lz4"), "{e}");
        let e = err("[memory]\nlimit = -5", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"memory.limit\": "),
            "{e}"
        );
        let e = err("[p2p]\nseeds = \"/ip4/1.2.3.4/tcp/1\"", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"p2p.seeds\": "),
            "{e}"
        );
        let e = err("[log]\nformat = \"yaml\"", &[]);
        assert!(
            e.starts_with("config.toml: invalid value for \"log.format\": "),
            "{e}"
        );
        // A bad element is reported on its list.
        let e = err("[p2p]\nseeds = [\"/ip4/1.2.3.4/tcp/1\", 7]", &[]);
        assert!(
            e.starts_with(
                "config.toml: invalid value for \"p2p.seeds\": invalid type: integer `7`"
            ),
            "{e}"
        );
        assert_eq!(
            err("[rpc]\nlisten_addr = \"localhost\"", &[]),
            "config.toml: invalid value for \"rpc.listen_addr\": invalid socket address syntax \
             (got \"localhost\")"
        );
    }

    #[test]
    fn syntax_errors_give_one_line_with_the_position() {
        let e = err("moniker = \"a\"\n[rpc\n", &[]);
        assert!(e.starts_with("config.toml: line 2, column"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("[rpc]\nmax_connections = 1\nmax_connections = 2\n", &[]);
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn semantic_rules_name_the_key() {
        let cases = [
            ("[consensus]\nblock_time_ms = 5", "consensus.block_time_ms"),
            ("[consensus]\nblock_time_ms = 6000", "consensus.timeout_ms"),
            ("[consensus]\ntimeout_ms = 99999999", "consensus.timeout_ms"),
            (
                "[p2p]\nmax_peers = 10\ntarget_peers = 11",
                "p2p.target_peers",
            ),
            ("[p2p]\nmax_peers = 0\ntarget_peers = 0", "p2p.max_peers"),
            ("[p2p]\nlisten_addr = \"0.0.0.0:26656\"", "p2p.listen_addr"),
            (
                "[p2p]\npersistent_peers = [\"/ip4/1.2.3.4/tcp/1\", \"1.2.3.4\"]",
                "p2p.persistent_peers",
            ),
            (
                "[p2p]\ninbound_connections_per_sec = 0",
                "p2p.inbound_connections_per_sec",
            ),
            ("[mempool]\nmax_txs = 0", "mempool.max_txs"),
            ("[mempool]\nmax_bytes = \"0\"", "mempool.max_bytes"),
            (
                "[storage.pruning]\nmode = \"custom\"\nkeep_recent = 10\ninterval = 100",
                "storage.pruning.keep_recent",
            ),
            (
                "[storage.pruning]\nmode = \"custom\"\nkeep_recent = 0\ninterval = 0",
                "storage.pruning.interval",
            ),
            (
                "[storage.rocksdb]\nmax_open_files = 3",
                "storage.rocksdb.max_open_files",
            ),
            (
                "[storage.rocksdb]\nblock_cache_size = \"512KiB\"",
                "storage.rocksdb.block_cache_size",
            ),
            (
                "[storage.rocksdb]\nwrite_buffer_size = 1000",
                "storage.rocksdb.write_buffer_size",
            ),
            ("[memory]\nlimit = \"1MiB\"", "memory.limit"),
            (
                "[memory]\nlimit = \"512MiB\"\n[storage.rocksdb]\nblock_cache_size = \"256MiB\"",
                "storage.rocksdb.block_cache_size",
            ),
            (
                "[memory]\nlimit = \"512MiB\"\n[mempool]\nmax_bytes = \"100MiB\"",
                "mempool.max_bytes",
            ),
            ("[log]\nlevel = \"\"", "log.level"),
            ("[log]\nlevel = \"verbose\"", "log.level"),
            ("[log]\nlevel = \"keel_node=loud,info\"", "log.level"),
            ("[log]\nlevel = \"=debug\"", "log.level"),
            (
                "[metrics]\nlisten_addr = \"127.0.0.1:26657\"",
                "metrics.listen_addr",
            ),
            (
                "[metrics]\nheap_sample_bytes = \"500KiB\"",
                "metrics.heap_sample_bytes",
            ),
            (
                "[metrics]\nheap_sample_bytes = \"512B\"",
                "metrics.heap_sample_bytes",
            ),
            (
                "[metrics]\nheap_sample_bytes = \"2GiB\"",
                "metrics.heap_sample_bytes",
            ),
            ("[rpc]\nmax_connections = 0", "rpc.max_connections"),
            ("[rpc]\nmax_request_bytes = 100", "rpc.max_request_bytes"),
            ("[rpc]\nmax_batch_size = 0", "rpc.max_batch_size"),
            (
                "[rpc]\nmax_subscriptions_per_connection = 0",
                "rpc.max_subscriptions_per_connection",
            ),
            ("[rpc]\nrequest_timeout_ms = 99", "rpc.request_timeout_ms"),
            (
                "[rpc]\ncors_allowed_origins = [\"wallet.example\"]",
                "rpc.cors_allowed_origins",
            ),
            (
                "[rpc]\ncors_allowed_origins = [\"https://wallet.example/\"]",
                "rpc.cors_allowed_origins",
            ),
            ("moniker = \"\"", "moniker"),
        ];
        for (text, key) in cases {
            let e = Config::from_toml_str(text, no_env()).unwrap_err();
            assert_eq!(e.key(), Some(key), "{text}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("config.toml: invalid value for \"{key}\"")),
                "{e}"
            );
        }
        // Custom pruning keys are ignored (not checked) in the other modes.
        assert!(Config::from_toml_str("[storage.pruning]\nkeep_recent = 0", no_env()).is_ok());
        // A size set above its share of the limit names both keys.
        let e = Config::from_toml_str(
            "[memory]\nlimit = \"512MiB\"\n[storage.rocksdb]\nblock_cache_size = \"256MiB\"",
            no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("memory.limit") && e.contains("30%"), "{e}");
        // A 512 MiB limit is accepted with the 1 GiB default cache (it derives from the limit:
        // see `memory::tests`), and any limit goes with the memory engine.
        assert!(Config::from_toml_str("[memory]\nlimit = \"512MiB\"", no_env()).is_ok());
        assert!(Config::from_toml_str("[memory]\nlimit = \"4GiB\"", no_env()).is_ok());
        assert!(Config::from_toml_str(
            "[memory]\nlimit = \"512MiB\"\n[storage]\nengine = \"memory\"",
            no_env()
        )
        .is_ok());
        let filter = |level: &str| {
            LogConfig {
                level: level.to_string(),
                ..LogConfig::default()
            }
            .filter()
        };
        for ok in [
            "debug",
            "INFO",
            "keel_node=debug,info",
            "keel_node::rpc=trace, libp2p=off ,warn",
            "keel_node[block]=debug,info",
            "keel_node[block{height}]=trace",
            "info,",
        ] {
            assert!(filter(ok).is_ok(), "{ok}: {:?}", filter(ok).err());
        }
        assert_eq!(
            filter("keel_node=loud,info").unwrap_err().to_string(),
            "invalid value for \"log.level\": bad directive \"keel_node=loud\": error parsing \
             level filter: expected one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \
             \"trace\", or a number 0-5"
        );
        assert_eq!(
            filter("warning").unwrap_err().to_string(),
            "invalid value for \"log.level\": \"warning\" is not a level (trace, debug, info, \
             warn, error, off); to name a target give its level too (\"warning=debug\")"
        );
        // Gossipsub's per-message warnings stay out unless a directive names its target.
        assert_eq!(
            filter("info").unwrap().to_string(),
            "libp2p_gossipsub=error,info"
        );
        for named in [
            "libp2p_gossipsub=warn,info",
            "libp2p=debug,info",
            "libp2p_gossipsub::behaviour=debug",
            "libp2p_gossipsub[publish]=trace",
        ] {
            assert!(
                !filter(named).unwrap().to_string().contains("=error"),
                "{named}"
            );
        }
        let e = filter("info, keel_node[block=debug").unwrap_err();
        assert_eq!(e.key(), Some("log.level"));
        assert!(
            e.to_string()
                .contains("bad directive \"keel_node[block=debug\""),
            "{e}"
        );
        let direct = Config {
            moniker: String::new(),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            direct.to_string(),
            "invalid value for \"moniker\": must not be empty"
        );
    }

    #[test]
    fn env_overrides_nested_and_top_level_keys() {
        let c = Config::from_toml_str(
            "moniker = \"file\"\n[storage.rocksdb]\nblock_cache_size = \"2GiB\"\n",
            env(&[
                ("KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE", "256MiB"),
                ("KEEL_MONIKER", "from-env"),
                ("KEEL_CONSENSUS_BLOCK_TIME_MS", "1000"),
                ("KEEL_RPC_LISTEN_ADDR", "0.0.0.0:9000"),
                ("KEEL_STORAGE_PRUNING_MODE", "archive"),
                (
                    "KEEL_P2P_PERSISTENT_PEERS",
                    "[\"/ip4/1.1.1.1/tcp/1\", \"/ip4/2.2.2.2/tcp/2\"]",
                ),
                ("KEEL_P2P_SEEDS", "/ip4/3.3.3.3/tcp/3, /ip4/4.4.4.4/tcp/4"),
                ("KEEL_HOME", "/tmp/whatever"),
                ("KEEL_NOT_A_KEY", "1"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.storage.rocksdb.block_cache_size, ByteSize::mib(256));
        assert_eq!(c.moniker, "from-env");
        assert_eq!(c.consensus.block_time_ms, 1000);
        assert_eq!(c.rpc.listen_addr, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(c.storage.pruning.mode, PruningMode::Archive);
        assert_eq!(
            c.p2p.persistent_peers,
            vec!["/ip4/1.1.1.1/tcp/1", "/ip4/2.2.2.2/tcp/2"]
        );
        assert_eq!(
            c.p2p.seeds,
            vec!["/ip4/3.3.3.3/tcp/3", "/ip4/4.4.4.4/tcp/4"]
        );
        assert_eq!(
            Config::from_toml_str("", env(&[("KEEL_P2P_SEEDS", "")]))
                .unwrap()
                .p2p
                .seeds,
            Vec::<String>::new()
        );
    }

    #[test]
    fn bad_env_values_are_refused_naming_the_variable() {
        let e = err("", &[("KEEL_RPC_LISTEN_ADDR", "localhost:1")]);
        assert!(
            e.starts_with("environment KEEL_RPC_LISTEN_ADDR: invalid value for \"rpc.listen_addr\": invalid socket address"),
            "{e}"
        );
        let e = err("", &[("KEEL_CONSENSUS_BLOCK_TIME_MS", "3s")]);
        assert_eq!(
            e,
            "environment KEEL_CONSENSUS_BLOCK_TIME_MS: invalid value for \"consensus.block_time_ms\": \
             expected an integer, got \"3s\""
        );
        let e = err("", &[("KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE", "lots")]);
        assert!(e.starts_with("environment KEEL_STORAGE_ROCKSDB_BLOCK_CACHE_SIZE: invalid value for \"storage.rocksdb.block_cache_size\": invalid size \"lots\""), "{e}");
        let e = err("", &[("KEEL_P2P_MAX_PEERS", "-3")]);
        assert!(
            e.starts_with("environment KEEL_P2P_MAX_PEERS: invalid value for \"p2p.max_peers\""),
            "{e}"
        );
        let e = err("", &[("KEEL_P2P_SEEDS", "[unclosed")]);
        assert!(e.starts_with("environment KEEL_P2P_SEEDS: "), "{e}");
        // Semantic rules broken by an environment value name the variable too.
        let e = err("", &[("KEEL_CONSENSUS_BLOCK_TIME_MS", "9000")]);
        assert!(
            e.starts_with("config.toml: invalid value for \"consensus.timeout_ms\""),
            "{e}"
        );
        let e = err("", &[("KEEL_CONSENSUS_TIMEOUT_MS", "10")]);
        assert!(
            e.starts_with(
                "environment KEEL_CONSENSUS_TIMEOUT_MS: invalid value for \"consensus.timeout_ms\""
            ),
            "{e}"
        );
    }

    #[test]
    fn env_names_map_one_to_one_onto_keys() {
        let vars = Config::env_vars();
        let defaults = Config::default().to_table().unwrap();
        let leaves: Vec<String> = leaf_paths(&defaults).iter().map(|p| p.join(".")).collect();
        let mut documented: Vec<String> = vars.iter().map(|(_, k)| k.clone()).collect();
        documented.sort();
        assert_eq!(
            documented, leaves,
            "KEY_DOCS must list every key exactly once"
        );
        let names: std::collections::BTreeSet<&String> = vars.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), vars.len());
        assert!(vars.contains(&(
            "KEEL_STORAGE_PRUNING_KEEP_RECENT".into(),
            "storage.pruning.keep_recent".into()
        )));
    }

    #[test]
    fn profiling_keys_parse_from_the_file_and_the_environment() {
        let d = Config::default().metrics;
        assert!(!d.profiling);
        assert_eq!(d.heap_sample_bytes, ByteSize::kib(512));

        let text = "[metrics]\nprofiling = true\nheap_sample_bytes = \"1MiB\"\n";
        let c = Config::from_toml_str(text, no_env()).unwrap();
        assert!(c.metrics.profiling);
        assert_eq!(c.metrics.heap_sample_bytes, ByteSize::mib(1));

        let c = Config::from_toml_str(
            "",
            env(&[
                ("KEEL_METRICS_PROFILING", "true"),
                ("KEEL_METRICS_HEAP_SAMPLE_BYTES", "64KiB"),
            ]),
        )
        .unwrap();
        assert!(c.metrics.profiling);
        assert_eq!(c.metrics.heap_sample_bytes, ByteSize::kib(64));

        let e = err("[metrics]\nprofiling = \"yes\"", &[]);
        assert!(e.contains("metrics.profiling"), "{e}");
        let e = err("[metrics]\nheap_sample_bytes = \"3MiB\"", &[]);
        assert!(
            e.contains("power of two") && e.contains("3MiB") && e.contains("512KiB"),
            "{e}"
        );
        let e = err("[metrics]\nprofile = true", &[]);
        assert!(e.contains("unknown key \"metrics.profile\""), "{e}");

        // Written out with their documentation, and read back equal.
        let mut custom = Config::default();
        custom.metrics.profiling = true;
        custom.metrics.heap_sample_bytes = ByteSize::kib(128);
        let text = custom.to_toml_string();
        assert!(text.contains("\nprofiling = true\n"), "{text}");
        assert!(
            text.contains("\nheap_sample_bytes = \"128KiB\"\n"),
            "{text}"
        );
        assert!(
            text.contains("# CPU and heap profiles at /debug/pprof/"),
            "{text}"
        );
        assert_eq!(Config::from_toml_str(&text, no_env()).unwrap(), custom);
    }

    #[test]
    fn to_toml_string_round_trips() {
        let text = Config::default().to_toml_string();
        assert_eq!(
            Config::from_toml_str(&text, no_env()).unwrap(),
            Config::default()
        );
        assert!(text.contains("[storage.rocksdb]\n"), "{text}");
        assert!(text.contains("block_cache_size = \"1GiB\""), "{text}");
        assert!(text.contains("limit = \"0\""), "{text}");

        let mut custom = Config {
            moniker: "quote \" and \\ back".to_string(),
            ..Config::default()
        };
        custom.p2p.persistent_peers = vec!["/ip4/1.2.3.4/tcp/5/p2p/abc".to_string()];
        custom.storage.rocksdb.block_cache_size = ByteSize(3 << 29);
        custom.storage.rocksdb.max_open_files = -1;
        custom.storage.pruning = PruningConfig {
            mode: PruningMode::Custom,
            keep_recent: 500,
            interval: 50,
        };
        custom.memory.limit = ByteSize(8_000_000_000);
        custom.log.format = LogFormat::Json;
        let text = custom.to_toml_string();
        assert_eq!(Config::from_toml_str(&text, no_env()).unwrap(), custom);
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");

        std::fs::write(
            &path,
            "[consensus]\nblock_time_ms = 250\ntimeout_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(Config::load(&path).unwrap().consensus.block_time_ms, 250);

        std::fs::write(&path, "[rpc]\nport = 1\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}: unknown key \"rpc.port\"", path.display()));
    }

    #[test]
    fn mempool_limits_come_from_the_config() {
        let limits = crate::mempool::MempoolLimits::from(&MempoolConfig::default());
        assert_eq!(
            limits,
            crate::mempool::MempoolLimits {
                max_txs: 100_000,
                max_bytes: 256 << 20
            }
        );
    }

    #[test]
    fn gossipsub_warnings_are_filtered_out_by_default_and_kept_when_asked_for() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::{Context, SubscriberExt};

        /// Records the target of every event that passes the filter.
        struct Seen(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                let level = event.metadata().level();
                let target = event.metadata().target();
                self.0.lock().unwrap().push(format!("{level} {target}"));
            }
        }
        let logged = |level: &str| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let filter = LogConfig {
                level: level.to_string(),
                ..LogConfig::default()
            }
            .filter()
            .unwrap();
            let subscriber = tracing_subscriber::registry()
                .with(filter)
                .with(Seen(seen.clone()));
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(target: "libp2p_gossipsub::behaviour", "Send Queue full");
                tracing::error!(target: "libp2p_gossipsub::behaviour", "broken");
                tracing::warn!(target: "keel_node::host", "slow");
            });
            let lines = seen.lock().unwrap().clone();
            lines
        };
        assert_eq!(
            logged("info"),
            ["ERROR libp2p_gossipsub::behaviour", "WARN keel_node::host"]
        );
        assert_eq!(
            logged("debug"),
            ["ERROR libp2p_gossipsub::behaviour", "WARN keel_node::host"]
        );
        assert_eq!(
            logged("libp2p_gossipsub=warn,info"),
            [
                "WARN libp2p_gossipsub::behaviour",
                "ERROR libp2p_gossipsub::behaviour",
                "WARN keel_node::host"
            ]
        );
    }

    #[test]
    fn quiet_defaults_are_added_for_targets_no_directive_names() {
        assert_eq!(with_quiet_defaults("info"), "info,libp2p_gossipsub=error");
        assert_eq!(
            with_quiet_defaults("keel_node=debug,warn,"),
            "keel_node=debug,warn,libp2p_gossipsub=error"
        );
        assert_eq!(with_quiet_defaults("libp2p=debug"), "libp2p=debug");
        assert_eq!(
            with_quiet_defaults(" libp2p_gossipsub::behaviour=info"),
            "libp2p_gossipsub::behaviour=info"
        );
        // A span filter with no target names none.
        assert_eq!(
            with_quiet_defaults("[block]=debug"),
            "[block]=debug,libp2p_gossipsub=error"
        );
    }
}
