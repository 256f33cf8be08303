//! The command-line grammar.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default RPC endpoint of a local node.
pub const DEFAULT_RPC: &str = "http://127.0.0.1:26657";

/// keel: a proof-of-stake blockchain node.
#[derive(Parser, Debug)]
#[command(name = "keel", version, about, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a node home: config.toml, keys, and a one-validator genesis.json.
    Init {
        /// Home folder to create.
        #[arg(long)]
        home: PathBuf,
        /// Human name of this node.
        #[arg(long, default_value = "node0")]
        moniker: String,
        /// Chain id of a new genesis.
        #[arg(long, default_value = "keel-local")]
        chain_id: String,
    },
    /// Manage key files.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run a node until SIGINT or SIGTERM.
    Start {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
    },
    /// Run a throwaway local network of N validators (default 4) in this process, with funded
    /// accounts (node0's RPC on 127.0.0.1:26657).
    Devnet(DevnetArgs),
    /// Write the homes of an N-validator network wired to each other.
    Testnet(TestnetArgs),
    /// Component benchmarks of block application on this machine (signature verification,
    /// execution, state-tree root, RocksDB commit, whole block).
    Bench(BenchArgs),
    /// Show a node's chain status.
    Status {
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// Query chain state.
    #[command(subcommand)]
    Query(QueryCommand),
    /// Sign and submit transactions.
    #[command(subcommand)]
    Tx(TxCommand),
    /// Database tools for a stopped node: sizes, an offline prune, a compaction, a check.
    #[command(subcommand)]
    Db(DbCommand),
    /// Load a network: fund K accounts from a key, send signed transfers at a fixed rate
    /// (open loop), follow them to finality and report counts, achieved TPS and latency.
    Loadgen(LoadgenArgs),
}

/// `keel loadgen` options (docs/benchmarks.md, "Load generator").
#[derive(Args, Debug)]
#[command(after_help = "\
Phases: read the sending accounts (derived from FILE's key and an index, so a rerun reuses \
them) and top up those short of their share; send for --duration seconds, one transfer per \
slot of 1/R s whether or not the node keeps up (how late sends run is reported); wait up to \
--drain-timeout for the accepted transfers to become final (followed with the first \
endpoint's chain_subscribeFinalizedHeads WebSocket subscription); report.

Example: keel loadgen --key devnet/accounts/account0.key --tps 2000 --duration 30 --json")]
pub struct LoadgenArgs {
    /// RPC endpoints, comma-separated (http:// or ws://, same port). Account i submits to
    /// endpoint i mod N; the first also funds the accounts and follows finality.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', default_value = DEFAULT_RPC)]
    pub rpc: Vec<String>,
    /// Key file of the account that funds the sending accounts.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Target rate in transfers per second, held open-loop.
    #[arg(long, value_name = "R")]
    pub tps: f64,
    /// Length of the send phase in seconds.
    #[arg(long, value_name = "S")]
    pub duration: u64,
    /// Sending accounts [default: max(16, R/8): each sends at most 8 tx/s, so its 64-nonce
    /// window covers 8 s of submit-to-final latency].
    #[arg(long, value_name = "K")]
    pub accounts: Option<u32>,
    /// Amount of each transfer (they go round a ring of the sending accounts).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub amount: u64,
    /// Fee of each transfer [default: the chain's minimum fee].
    #[arg(long, value_name = "F")]
    pub fee: Option<u64>,
    /// Transfers per `tx_submit` request, sent as one JSON-RPC batch (1: one call per transfer).
    /// Each endpoint's batch goes out when full or 10 ms after its first transfer was due. At
    /// most the node's `rpc.max_batch_size` (default 100).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch: u32,
    /// After the send phase, how many seconds to wait for accepted transfers to become final.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Print one JSON object (counts, achieved_tps, latency_ms {p50, p95, p99, ...}) instead
    /// of the text summary; no progress bar.
    #[arg(long)]
    pub json: bool,
}

/// `keel db ...` (the node must be stopped: RocksDB locks its folder).
#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Size per column family, live table bytes, key estimates, and pruning mode and progress.
    Stats {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Prune now what `[storage.pruning]` makes due (or finish an interrupted pass), with a
    /// progress bar.
    Prune {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
    },
    /// Compact every column family, so the space of deleted data comes back.
    Compact {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
    },
    /// Walk the retained window: every block, its receipts and index entries, and the state
    /// root of every retained height recomputed from the tree's nodes.
    Check {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `keel keys ...`
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Generate a new key file (mode 0600) and print its address.
    Generate {
        /// Where to write the key; never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the validator key's address and public key.
    Show {
        /// Node home folder.
        #[arg(long)]
        home: PathBuf,
    },
}

/// `keel testnet` options.
#[derive(Args, Debug)]
pub struct TestnetArgs {
    /// Number of validators.
    #[arg(long, default_value_t = 4)]
    pub validators: u32,
    /// Folder for the homes (node0, node1, ...).
    #[arg(long)]
    pub out: PathBuf,
    /// Node i listens for p2p on P+3i, RPC on 127.0.0.1:P+3i+1, metrics on 127.0.0.1:P+3i+2.
    #[arg(long, default_value_t = 26656)]
    pub base_port: u16,
    /// Block time in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub block_time_ms: u64,
    /// Chain id.
    #[arg(long, default_value = "keel-testnet")]
    pub chain_id: String,
    /// Blocks per epoch (default: the genesis default).
    #[arg(long)]
    pub epoch_length: Option<u64>,
}

/// `keel devnet` options.
#[derive(Args, Debug)]
pub struct DevnetArgs {
    /// Number of validators, all run in this one process (ignored when `--dir` already
    /// holds a devnet: that one is restarted as it is).
    #[arg(long, default_value_t = 4)]
    pub validators: u32,
    /// Block time in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub block_time_ms: u64,
    /// Folder for the network's homes (default: a new temporary folder, removed on exit).
    /// A folder that already holds a devnet (`node0/config.toml`) is restarted.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// RPC listen address of node0.
    #[arg(long, default_value = "127.0.0.1:26657")]
    pub rpc_addr: String,
    /// Ports of a new devnet: node i listens for p2p on P+3i, RPC on 127.0.0.1:P+3i+1
    /// (node0: `--rpc-addr`) and metrics on 127.0.0.1:P+3i+2.
    #[arg(long, default_value_t = 26656)]
    pub base_port: u16,
    /// Number of extra funded accounts (keys written under DIR/accounts/).
    #[arg(long, default_value_t = 4)]
    pub accounts: u32,
}

/// `keel query ...`
#[derive(Subcommand, Debug)]
pub enum QueryCommand {
    /// An account's balance, nonce and stake.
    Account {
        /// Address, 0x + 40 hex.
        address: String,
        /// Height to read at (default: latest).
        #[arg(long)]
        height: Option<u64>,
        /// Verify, as a light client: the epoch changes from the trust root to the height's
        /// epoch, the height's finality under that epoch's validators, and the account's
        /// Merkle proof against its state root (docs/light-client.md). Prints each step.
        #[arg(long)]
        prove: bool,
        /// `--prove`: trust genesis's validators from this genesis file (and check the
        /// node's chain id against it).
        #[arg(long, requires = "prove", conflicts_with = "trust")]
        genesis: Option<PathBuf>,
        /// `--prove`: trust the validator set of EPOCH whose hash is HASH (EPOCH:0xHASH), a
        /// checkpoint, instead of walking from genesis. Without --genesis or --trust, the
        /// node's own word for the height's validator set is trusted unchecked (the output
        /// says so); finality and the Merkle proof are still checked against it.
        #[arg(long, requires = "prove", value_name = "EPOCH:HASH")]
        trust: Option<String>,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// A block by height.
    Block {
        /// Block height.
        height: u64,
        /// Include full transactions.
        #[arg(long)]
        full: bool,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// A transaction and its receipt.
    Tx {
        /// Transaction hash, 0x + 64 hex.
        hash: String,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// The current validator set.
    Validators {
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// A block's header by height.
    Header {
        /// Block height.
        height: u64,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// The proof that a final height is final (docs/light-client.md).
    Finality {
        /// A final height, at least 1.
        height: u64,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// The proof of an epoch's validator set (docs/light-client.md).
    EpochChange {
        /// An epoch that has started, at least 1.
        epoch: u64,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
    /// Any JSON-RPC method, with its parameters as a JSON array or object; prints the result
    /// (every method of docs/rpc.md, subscriptions aside, is callable this way).
    Rpc {
        /// The method, e.g. chain_status.
        method: String,
        /// Its parameters: a JSON array (positional) or object (named); none if left out.
        params: Option<String>,
        /// RPC endpoint.
        #[arg(long, default_value = DEFAULT_RPC)]
        rpc: String,
    },
}

/// Options shared by every transaction command.
#[derive(Args, Debug)]
pub struct TxOptions {
    /// Key file of the sender.
    #[arg(long)]
    pub key: PathBuf,
    /// Fee (default: the chain's minimum fee).
    #[arg(long)]
    pub fee: Option<u64>,
    /// Nonce (default: the sender's next nonce, counting its pending transactions).
    #[arg(long)]
    pub nonce: Option<u64>,
    /// Wait until the transaction is final and print its receipt.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait_timeout_s: u64,
    /// RPC endpoint.
    #[arg(long, default_value = DEFAULT_RPC)]
    pub rpc: String,
}

/// `keel tx ...`
#[derive(Subcommand, Debug)]
pub enum TxCommand {
    /// Transfer funds.
    Transfer {
        /// Recipient address.
        #[arg(long)]
        to: String,
        /// Amount to send.
        #[arg(long)]
        amount: u64,
        #[command(flatten)]
        opts: TxOptions,
    },
    /// Bond stake.
    Bond {
        /// Amount to bond.
        #[arg(long)]
        amount: u64,
        #[command(flatten)]
        opts: TxOptions,
    },
    /// Unbond stake (returned after the unbonding period).
    Unbond {
        /// Amount to unbond.
        #[arg(long)]
        amount: u64,
        #[command(flatten)]
        opts: TxOptions,
    },
}

/// What `keel bench` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchStage {
    /// Signature verification from scratch, against the raw ed25519 batch rate.
    Sigverify,
    /// Transaction execution (signatures cached, accounts read from the tree).
    Execute,
    /// The batched state-tree update and root.
    Trie,
    /// Writing the block's one RocksDB batch.
    Commit,
    /// Every stage and the whole block.
    All,
    /// `state_getAccount` latency through the node's RPC handler, first while empty blocks
    /// commit, then while blocks of `--txs` transfers commit (`--blocks` of them).
    Reads,
    /// Block commit latency and database size over `--blocks` blocks of `--txs` transfers,
    /// in archive mode and then with the pruner keeping `--keep` blocks every `--interval`.
    Prune,
}

/// `keel bench` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Stage to measure.
    #[arg(value_enum)]
    pub stage: BenchStage,
    /// Print one JSON object per line: stage, mix, threads, accounts, txs, tps, ...
    #[arg(long)]
    pub json: bool,
    /// Accounts in the state.
    #[arg(long, default_value_t = 1_000_000)]
    pub accounts: u64,
    /// Transfers per block (one per sending account).
    #[arg(long, default_value_t = 10_000)]
    pub txs: usize,
    /// Timed blocks per configuration (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub blocks: usize,
    /// Folder for the temporary database (default: the system's temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// `reads`: paced `state_getAccount` calls per second in each phase.
    #[arg(long, default_value_t = 5_000)]
    pub reads_per_sec: u64,
    /// `reads`: read over the node's HTTP server on a loopback port (4 keep-alive
    /// connections) instead of calling its RPC handler in process.
    #[arg(long)]
    pub http: bool,
    /// `reads`: also run `wrk` (16 connections, closed loop) for this many seconds in each
    /// phase, for the highest throughput (needs `wrk` installed; give enough --blocks to keep
    /// committing that long).
    #[arg(long)]
    pub wrk_secs: Option<u64>,
    /// `prune`: blocks the pruner keeps.
    #[arg(long, default_value_t = 200)]
    pub keep: u64,
    /// `prune`: prune interval (database sizes are sampled half-way through each).
    #[arg(long, default_value_t = 100)]
    pub interval: u64,
    /// `prune`: one block every this many milliseconds (0: as fast as they build).
    #[arg(long, default_value_t = 0)]
    pub block_time_ms: u64,
    /// `prune`: skip the compaction after each pass (to see what it costs).
    #[arg(long)]
    pub no_compaction: bool,
    /// `prune`: how the pruner paces its batches: between commits (what a node does) or
    /// resting twice as long as each batch took (to compare).
    #[arg(long, value_enum, default_value_t = PruneBenchPacing::Commits)]
    pub pacing: PruneBenchPacing,
    /// `prune`: CPU priority of RocksDB's compactions: normal (what a node does) or lowest
    /// (to compare; the setting holds for the whole process).
    #[arg(long, value_enum, default_value_t = CompactionPriority::Normal)]
    pub compaction_priority: CompactionPriority,
    /// `prune`: archive / pruning pairs to run, one after the other.
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
}

/// `keel bench prune --compaction-priority`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompactionPriority {
    /// Compactions at nice 19.
    Low,
    /// Compactions at the process's priority.
    Normal,
}

/// `keel bench prune --pacing`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneBenchPacing {
    /// Batches only in the first third of the interval after each commit.
    Commits,
    /// Rest twice as long as each batch took.
    Rest,
}
