//! Node assembly: open the store, boot ([`crate::boot`]), start the network, the consensus
//! host, the metrics and RPC servers, every long-lived one named and owned by a
//! [`TaskManager`]; and stop them all, in order, within a bounded time.
//!
//! The metrics registry is built here, once: every component registers the metrics it keeps
//! (the node context's parts, the network, the host, the RPC layer, the process memory)
//! before the metrics server serves it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use keel_storage::{KvStore, MemStore, RocksConfig, RocksStore};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::boot::Settings;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StorageEngine};
use crate::context::NodeContext;
use crate::home::{read_key_file, Home};
use crate::host::{run_blocking, Command};
use crate::pruner::{Pruner, Wake, Window};
use crate::tasks::TaskManager;
use crate::{Error, Result};

/// Commands (network messages, sync answers) queued for the host; beyond it, messages are
/// dropped (consensus recovers from loss) rather than growing memory.
const COMMAND_QUEUE: usize = 4096;
// The queue reserves a slot of `Command`'s size for each entry up front: its payloads are
// boxed so that the 4,096 slots stay a few hundred KiB.
const _: () = assert!(std::mem::size_of::<Command>() <= 128);
/// How long a clean shutdown may take before the tasks still running are abandoned.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(8);

/// A running node.
pub struct Node {
    chain: Arc<NodeContext>,
    commands: SyncSender<Command>,
    host_done: Option<oneshot::Receiver<Result<()>>>,
    rpc: jsonrpsee::server::ServerHandle,
    rpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    tasks: TaskManager,
    /// The RocksDB store, flushed at shutdown (none for the memory engine).
    rocks: Option<Arc<RocksStore>>,
}

impl Node {
    /// Starts a node from its home folder with an already loaded configuration.
    pub async fn start(home_dir: &Path, config: Config) -> Result<Node> {
        match crate::memory::apply(&config.memory) {
            Ok(s) => tracing::info!(
                dirty_decay_ms = s.dirty_decay_ms,
                muzzy_decay_ms = s.muzzy_decay_ms,
                background_threads = s.background_threads,
                "allocator settings"
            ),
            Err(e) => warn!(error = %e, "cannot apply the [memory] allocator settings"),
        }
        let home = Home::new(home_dir);
        let genesis = home.load_genesis()?;
        let key = read_key_file(&home.validator_key())?;
        let node_key = read_key_file(&home.node_key())?;

        let (store, rocks): (Arc<dyn KvStore>, _) = match config.storage.engine {
            StorageEngine::RocksDb => {
                let rocks = Arc::new(RocksStore::open(&home.data(), &rocks_config(&config))?);
                (rocks.clone(), Some(rocks))
            }
            StorageEngine::Memory => (Arc::new(MemStore::new()), None),
        };
        let node_id = crate::net::libp2p::peer_id(&node_key)?.to_string();
        let settings = Settings::of(&config);
        let booted = match crate::boot::open(store, &genesis, &key, node_id, &settings) {
            Err(Error::WrongGenesis {
                stored, expected, ..
            }) => {
                return Err(Error::WrongGenesis {
                    data: home.data().display().to_string(),
                    stored,
                    expected,
                })
            }
            other => other?,
        };
        let chain = booted.context.clone();
        let node_cache = booted.node_cache();
        let pending_blocks = booted.pending_memory();
        let epoch = chain.epoch();
        let validators = chain.validator_set(epoch)?;
        let me = validators.get(&key.address()).map_or(0, |v| v.stake);
        if !validators.is_quorum(me)
            && config.p2p.persistent_peers.is_empty()
            && config.p2p.seeds.is_empty()
        {
            warn!(
                epoch,
                stake = me,
                total_stake = validators.total_stake(),
                "this node alone holds no quorum and has no persistent peers or seeds configured: \
                 it will wait for peers to dial it"
            );
        }

        let mut tasks = TaskManager::new();
        let (commands, receiver) = sync_channel(COMMAND_QUEUE);
        let net = crate::net::libp2p::start(
            chain.clone(),
            &config,
            &node_key,
            &key,
            booted.genesis_hash,
            commands.clone(),
            tasks.token(),
        )?;
        tasks.add_task("network server", net.server);
        tasks.add_task("p2p service", net.service);
        let network = Arc::new(net.network);
        let base = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let rpc_buffers =
            crate::rpc::conn::RpcBuffers::new(crate::memory::Budgets::of(&config).rpc);
        let governor = Arc::new(governor(
            &config,
            &chain,
            Sizes {
                rocks: rocks.clone(),
                node_cache,
                pending_blocks,
                network: network.clone(),
                rpc: rpc_buffers.clone(),
                base: base.clone(),
            },
        ));
        chain.set_gossip(network.clone());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut host = booted.into_host(network.clone(), clock.clone());
        host.start()?;
        let rpc_metrics = crate::rpc::RpcMetrics::default();
        let mut registry = Registry::default();
        chain.register_metrics(&mut registry);
        network.register_metrics(&mut registry);
        host.register_metrics(&mut registry);
        rpc_metrics.register(&mut registry);
        rpc_buffers.register(&mut registry);
        crate::metrics::register_memory(&mut registry, governor.clone());
        let registry = Arc::new(registry);
        let (metrics_addr, metrics) = crate::metrics::serve_metrics(
            &config.metrics,
            Arc::new(move || crate::metrics::render(&registry)),
            Some(governor.clone()),
            tasks.token(),
        )
        .await?;
        tasks.add_task("metrics server", metrics);
        let (rpc, rpc_addr) = crate::rpc::start(
            chain.clone(),
            &config.rpc,
            rpc_metrics,
            config.consensus.block_time_ms,
            rpc_buffers,
        )
        .await?;
        info!(addr = %rpc_addr, "JSON-RPC listening (HTTP and WebSocket)");

        // The moniker labels consensus logs, so nodes sharing a process (devnet) are told apart.
        let span = tracing::info_span!("node", moniker = %config.moniker);

        // The pruner: its own thread, woken by each commit (it also finishes a pass a kill
        // interrupted, whatever the mode now).
        let window = Window::of(&config.storage.pruning);
        let (wake, wake_rx) = Wake::channel();
        chain.set_pruner_wake(wake);
        let pruner = Pruner::new(
            chain.blocks.kv().clone(),
            chain.params.epoch_length,
            chain.prune_status().clone(),
        );
        let pruner_token = tasks.token();
        let pruner_span = span.clone();
        let thread = std::thread::Builder::new()
            .name("keel-pruner".into())
            .spawn(move || {
                let _node = pruner_span.enter();
                crate::pruner::run(pruner, window, wake_rx, pruner_token);
            })
            .map_err(|e| Error::io("pruner thread", e))?;
        tasks.add_thread("pruner", thread);
        // Everything is started: what is allocated now that no consumer counts is the node's
        // fixed footprint (runtime, network stack, RocksDB's own structures, queues sized at
        // start), the `base` consumer from here on.
        let counted: u64 = governor
            .consumers()
            .iter()
            .filter(|c| c.name != "base")
            .map(|c| (c.used)())
            .sum();
        base.store(
            crate::memory::allocated_bytes().saturating_sub(counted),
            std::sync::atomic::Ordering::Relaxed,
        );
        if governor.limit() > 0 {
            let token = tasks.token();
            let thread = std::thread::Builder::new()
                .name("keel-memory".into())
                .spawn(move || governor.run(&token))
                .map_err(|e| Error::io("memory governor thread", e))?;
            tasks.add_thread("memory governor", thread);
        }
        let (done_tx, done_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("keel-consensus".into())
            .spawn(move || {
                let _node = span.enter();
                let result = run_blocking(host, receiver, clock);
                if let Err(e) = &result {
                    error!(error = %e, "consensus host failed");
                }
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::io("consensus thread", e))?;
        tasks.add_thread("consensus host", thread);

        Ok(Node {
            chain,
            commands,
            host_done: Some(done_rx),
            rpc,
            rpc_addr,
            metrics_addr,
            tasks,
            rocks,
        })
    }

    /// The shared chain.
    pub fn context(&self) -> &Arc<NodeContext> {
        &self.chain
    }

    /// The address the RPC server listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The address the metrics server listens on.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Resolves if the consensus host stops on its own, with its error.
    pub async fn failed(&mut self) -> Result<()> {
        match self.host_done.as_mut() {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => std::future::pending().await,
        }
    }

    /// Stops everything, in order: the RPC server (no new requests), the network server and
    /// the metrics server, the consensus host (after the block it is committing, if any), the p2p
    /// service (which saves the peer book); then flushes RocksDB. Tasks still running after
    /// [`SHUTDOWN_LIMIT`] are named in the log and abandoned.
    pub async fn shutdown(self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_LIMIT;
        let _ = self.rpc.stop();
        if tokio::time::timeout_at(deadline, self.rpc.clone().stopped())
            .await
            .is_err()
        {
            warn!("the RPC server did not stop in time");
        }
        // The queue may be full: wait for room off the async workers.
        let commands = self.commands.clone();
        tokio::task::spawn_blocking(move || {
            let _ = commands.send(Command::Shutdown);
        });
        let stuck = self.tasks.shutdown(deadline).await;
        if !stuck.is_empty() {
            warn!(tasks = ?stuck, "tasks still running at shutdown were abandoned");
        }
        if let Some(rocks) = &self.rocks {
            rocks.flush()?;
        }
        info!("node stopped");
        Ok(())
    }
}

/// The memory governor of a node: every consumer with its budget ([`Budgets::of`]), sized
/// to it now.
///
/// [`Budgets::of`]: crate::memory::Budgets::of
/// What the governor reads the consumers' sizes from, besides the chain.
struct Sizes {
    rocks: Option<Arc<RocksStore>>,
    node_cache: Arc<keel_state::NodeCache>,
    pending_blocks: Arc<std::sync::atomic::AtomicU64>,
    network: Arc<crate::net::libp2p::Libp2pNetwork>,
    rpc: Arc<crate::rpc::conn::RpcBuffers>,
    base: Arc<std::sync::atomic::AtomicU64>,
}

fn governor(config: &Config, chain: &Arc<NodeContext>, sizes: Sizes) -> crate::memory::Governor {
    use crate::memory::{Budgets, Consumer, NODE_BYTES, SIG_ENTRY_BYTES};
    let Sizes {
        rocks,
        node_cache,
        pending_blocks,
        network,
        rpc,
        base,
    } = sizes;
    let budgets = Budgets::of(config);
    let mut consumers = Vec::new();
    if let Some(rocks) = rocks {
        let resized = rocks.clone();
        consumers.push(Consumer {
            name: "rocksdb",
            budget: budgets.rocksdb,
            used: Box::new(move || rocks.memory_bytes()),
            resize: Some(Box::new(move |bytes| resized.set_cache_capacity(bytes))),
        });
    }
    let resized = node_cache.clone();
    consumers.push(Consumer {
        name: "state_cache",
        budget: budgets.state_cache,
        used: Box::new(move || node_cache.memory_bytes()),
        resize: Some(Box::new(move |bytes| {
            resized.set_capacity(usize::try_from(bytes / NODE_BYTES).unwrap_or(usize::MAX));
        })),
    });
    let sigs = chain.sig_cache().clone();
    let resized = sigs.clone();
    consumers.push(Consumer {
        name: "sig_cache",
        budget: budgets.sig_cache,
        // With the parsed public keys (a fixed ~1 MiB once any is parsed).
        used: Box::new(move || {
            (sigs.len() as u64)
                .saturating_mul(SIG_ENTRY_BYTES)
                .saturating_add(keel_types::key_cache_bytes())
        }),
        resize: Some(Box::new(move |bytes| {
            resized.set_capacity(usize::try_from(bytes / SIG_ENTRY_BYTES).unwrap_or(usize::MAX));
        })),
    });
    consumers.push(Consumer {
        name: "rpc",
        budget: budgets.rpc,
        used: Box::new(move || rpc.used()),
        resize: None,
    });
    consumers.push(Consumer {
        name: "p2p",
        budget: budgets.p2p,
        used: Box::new(move || network.queued_bytes() + network.inbound_bytes()),
        resize: None,
    });
    // Not yet final blocks: bounded by consensus (a few blocks, each at most
    // `max_block_bytes` with its state changes), so they have no share of their own.
    consumers.push(Consumer {
        name: "blocks",
        budget: 0,
        used: Box::new(move || pending_blocks.load(std::sync::atomic::Ordering::Relaxed)),
        resize: None,
    });
    // Freed memory the allocator keeps per thread for reuse: counted as allocated by
    // jemalloc, so it belongs in the account; bounded by jemalloc (per thread and size class).
    consumers.push(Consumer {
        name: "allocator",
        budget: 0,
        used: Box::new(crate::memory::thread_cached_bytes),
        resize: None,
    });
    // What profiles leave loaded: the symbol cache, until `SYMBOLS_KEPT_FOR` after the last
    // profile or until pressure changes (freed then), and pprof's table of CPU samples.
    consumers.push(Consumer {
        name: "profiles",
        budget: 0,
        used: Box::new(crate::profiling::loaded_bytes),
        resize: Some(Box::new(|_| crate::profiling::forget_symbols())),
    });
    // The fixed footprint of a started node, measured once at the end of its start.
    consumers.push(Consumer {
        name: "base",
        budget: 0,
        used: Box::new(move || base.load(std::sync::atomic::Ordering::Relaxed)),
        resize: None,
    });
    let weak = Arc::downgrade(chain);
    consumers.push(Consumer {
        name: "mempool",
        budget: budgets.mempool,
        used: Box::new(move || weak.upgrade().map_or(0, |c| c.mempool().memory_bytes())),
        resize: None,
    });
    crate::memory::Governor::new(budgets.limit, consumers, chain.memory_pressure().clone())
}

/// The RocksDB settings of `config`.
pub(crate) fn rocks_config(config: &Config) -> RocksConfig {
    let r = &config.storage.rocksdb;
    // With `memory.limit`, sizes left at their defaults derive from it.
    let budgets = crate::memory::Budgets::of(config);
    RocksConfig {
        block_cache_size: budgets.rocksdb,
        write_buffer_size: budgets.write_buffer,
        max_open_files: r.max_open_files,
        compression: r.compression,
        ..RocksConfig::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use jsonrpsee::http_client::HttpClientBuilder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::ByteSize;
    use crate::rpc::api::KeelApiClient;
    use crate::rpc::types::{SignedTxHex, TxStatus};
    use crate::{Address, Transaction, TxKind};

    /// `(name, type, help)` of every metric the node exports, as written on `/metrics`: a public
    /// contract (DESIGN.md), names, types and help texts alike.
    const CONTRACT: [(&str, &str, &str); 39] = [
        ("keel_block_height", "gauge", "Height of the latest certified block."),
        ("keel_finalized_height", "gauge", "Height of the latest final block."),
        ("keel_epoch", "gauge", "Current consensus epoch."),
        ("keel_txs_committed", "counter", "Transactions in final blocks."),
        ("keel_block_execution_seconds", "histogram", "Time to build or re-execute a block."),
        ("keel_block_commit_seconds", "histogram", "Time to write a final block to the database (its one atomic write batch)."),
        ("keel_mempool_txs", "gauge", "Transactions in the mempool."),
        ("keel_peers", "gauge", "Connected peers."),
        ("keel_p2p_bytes", "counter", "Peer-to-peer frame bytes by direction and compression."),
        ("keel_rpc_requests", "counter", "JSON-RPC calls by method and result code (0 = success)."),
        ("keel_rpc_request_duration_seconds", "histogram", "Time to answer a JSON-RPC call, by method (parameter checks to response)."),
        ("keel_memory_allocated_bytes", "gauge", "Bytes allocated through jemalloc."),
        ("keel_memory_limit_bytes", "gauge", "Configured memory limit (0 = none)."),
        ("keel_memory_resident_bytes", "gauge", "Bytes in resident pages mapped by jemalloc (allocated, dirty pages, metadata)."),
        ("keel_memory_dirty_decay_seconds", "gauge", "jemalloc dirty_decay_ms in force, in seconds (-1 = never)."),
        ("keel_memory_muzzy_decay_seconds", "gauge", "jemalloc muzzy_decay_ms in force, in seconds (-1 = never)."),
        ("keel_memory_background_threads", "gauge", "1 if jemalloc purges on background threads."),
        ("keel_memory_budget_bytes", "gauge", "Bytes each memory consumer may hold (its share of memory.limit, or its configured size)."),
        ("keel_memory_used_bytes", "gauge", "Bytes each memory consumer holds now (caches estimated from their entries)."),
        ("keel_memory_pressure", "gauge", "Memory pressure: 0 none, 1 soft (caches halved), 2 hard (caches at an eighth, new transactions refused)."),
        ("keel_memory_shrinks", "counter", "Times rising memory pressure shrank the caches."),
        ("keel_memory_refused_txs", "counter", "Transactions refused (RPC and gossip) under hard memory pressure."),
        ("keel_db_size_bytes", "gauge", "Database size on disk."),
        ("keel_pruned_height", "gauge", "Blocks at or below this height are pruned."),
        ("keel_prune_duration_seconds", "histogram", "Duration of prune passes (deletes and compaction)."),
        ("keel_prune_deleted_keys", "counter", "Keys deleted by the pruner."),
        ("keel_db_live_sst_bytes", "gauge", "Bytes of live SST files per column family."),
        ("keel_db_block_cache_hits", "counter", "RocksDB block cache lookups that found the block."),
        ("keel_db_block_cache_misses", "counter", "RocksDB block cache lookups that read the block from disk."),
        ("keel_db_compaction_read_bytes", "counter", "Bytes RocksDB compactions read."),
        ("keel_db_compaction_write_bytes", "counter", "Bytes RocksDB compactions wrote."),
        ("keel_db_flush_write_bytes", "counter", "Bytes RocksDB memtable flushes wrote."),
        ("keel_db_write_stall_seconds", "counter", "Seconds RocksDB stalled or slowed writes (level-0 files, pending compaction, memtables)."),
        ("keel_db_running_compactions", "gauge", "RocksDB compactions running now."),
        ("keel_db_pending_compaction_bytes", "gauge", "RocksDB's estimate of the bytes compaction still has to rewrite."),
        ("keel_validator_set_cache_hits", "counter", "Validator set lookups served by the per-epoch cache."),
        ("keel_validator_set_cache_misses", "counter", "Validator set lookups that computed the set."),
        ("keel_sig_cache_hits", "counter", "Signature cache lookups that found the transaction already verified (admission, block execution)."),
        ("keel_sig_cache_misses", "counter", "Signature cache lookups that had to verify the transaction (admission, block execution)."),
    ];

    async fn scrape(addr: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    /// The value of the sample whose name and labels are exactly `series`.
    fn sample(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    }

    /// A one-validator node in a temporary home (50 ms blocks, loopback ports, `limit`), an
    /// RPC client of it, and a signed transfer of 1 from the validator, not yet sent.
    async fn one_node(
        limit: ByteSize,
    ) -> (
        tempfile::TempDir,
        Node,
        jsonrpsee::http_client::HttpClient,
        Transaction,
    ) {
        let dir = tempfile::tempdir().unwrap();
        crate::home::init(dir.path(), "m0", "keel-metrics", SystemClock.now_ms()).unwrap();
        let home = Home::new(dir.path());
        let mut config = Config::load(&home.config()).unwrap();
        config.p2p.listen_addr = "/ip4/127.0.0.1/tcp/0".into();
        config.rpc.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.metrics.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.consensus.block_time_ms = 50;
        config.memory.limit = limit;
        let node = Node::start(dir.path(), config).await.unwrap();
        let client = HttpClientBuilder::default()
            .build(format!("http://{}", node.rpc_addr()))
            .unwrap();
        let status = client.chain_status().await.unwrap();
        let key = read_key_file(&home.validator_key()).unwrap();
        let tx = Transaction::sign(
            &key,
            &status.chain_id,
            0,
            status.min_fee,
            TxKind::Transfer {
                to: Address([7; 20]),
                amount: 1,
            },
        );
        (dir, node, client, tx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_node_serves_every_metric_of_the_contract() {
        let (_dir, node, client, tx) = one_node(ByteSize(1 << 30)).await;
        let hash = client
            .tx_submit(SignedTxHex::from_bytes(&tx.bytes))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while client.tx_status(hash).await.unwrap() != TxStatus::Finalized {
            assert!(
                tokio::time::Instant::now() < deadline,
                "transfer not final in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let text = scrape(node.metrics_addr()).await;
        for (name, kind, help) in CONTRACT {
            // The text format 0.0.4: a counter's descriptor names its sample.
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let head = format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
            assert!(text.contains(&head), "{head} missing from\n{text}");
        }
        // The one transfer; the other blocks are empty.
        assert_eq!(sample(&text, "keel_txs_committed_total"), 1.0, "{text}");
        assert!(sample(&text, "keel_finalized_height") >= 1.0, "{text}");
        assert!(sample(&text, "keel_block_height") >= sample(&text, "keel_finalized_height"));
        assert!(
            sample(&text, "keel_block_execution_seconds_count") >= 1.0,
            "{text}"
        );
        // Every final block's write is timed; every answered call too, by method.
        assert!(
            sample(&text, "keel_block_commit_seconds_count") >= 1.0,
            "{text}"
        );
        assert!(
            sample(
                &text,
                "keel_rpc_request_duration_seconds_count{method=\"tx_submit\"}"
            ) >= 1.0,
            "{text}"
        );
        // RocksDB's statistics are on: its counters are read (the data of this young node may
        // all still be in memtables, so they may be zero).
        assert!(sample(&text, "keel_db_block_cache_hits_total") >= 0.0);
        assert_eq!(sample(&text, "keel_mempool_txs"), 0.0, "{text}");
        assert_eq!(sample(&text, "keel_peers"), 0.0, "{text}");
        // Every column family has its live-bytes series; nothing is pruned this early.
        for cf in keel_storage::Column::ALL {
            sample(
                &text,
                &format!("keel_db_live_sst_bytes{{cf=\"{}\"}}", cf.name()),
            );
        }
        assert_eq!(sample(&text, "keel_pruned_height"), 0.0, "{text}");
        assert_eq!(
            sample(&text, "keel_prune_deleted_keys_total"),
            0.0,
            "{text}"
        );
        assert_eq!(sample(&text, "keel_epoch"), 0.0, "{text}");
        for series in [
            "keel_p2p_bytes_total{direction=\"sent\",compressed=\"false\"}",
            "keel_p2p_bytes_total{direction=\"sent\",compressed=\"true\"}",
            "keel_p2p_bytes_total{direction=\"received\",compressed=\"false\"}",
            "keel_p2p_bytes_total{direction=\"received\",compressed=\"true\"}",
        ] {
            assert_eq!(sample(&text, series), 0.0, "{text}");
        }
        assert_eq!(
            sample(
                &text,
                "keel_rpc_requests_total{method=\"chain_status\",code=\"0\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "keel_rpc_requests_total{method=\"tx_submit\",code=\"0\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(&text, "keel_memory_limit_bytes"),
            f64::from(1u32 << 30)
        );
        // Budgets derived from the limit, and the consumers' use.
        assert_eq!(
            sample(&text, "keel_memory_budget_bytes{consumer=\"rocksdb\"}"),
            ((1u64 << 30) * 30 / 100) as f64
        );
        assert_eq!(
            sample(&text, "keel_memory_budget_bytes{consumer=\"mempool\"}"),
            ((1u64 << 30) * 15 / 100) as f64
        );
        assert!(sample(&text, "keel_memory_used_bytes{consumer=\"rocksdb\"}") > 0.0);
        sample(&text, "keel_memory_used_bytes{consumer=\"state_cache\"}");
        assert_eq!(
            sample(&text, "keel_memory_budget_bytes{consumer=\"p2p\"}"),
            ((1u64 << 30) * 5 / 100) as f64
        );
        sample(&text, "keel_memory_used_bytes{consumer=\"p2p\"}");
        assert_eq!(
            sample(&text, "keel_memory_budget_bytes{consumer=\"rpc\"}"),
            ((1u64 << 30) * 3 / 100) as f64
        );
        sample(&text, "keel_memory_used_bytes{consumer=\"rpc\"}");
        // Pending blocks have no share; their use is reported.
        assert_eq!(
            sample(&text, "keel_memory_budget_bytes{consumer=\"blocks\"}"),
            0.0
        );
        sample(&text, "keel_memory_used_bytes{consumer=\"blocks\"}");
        // The fixed footprint, measured once the node had started, and the allocator's
        // per-thread caches: reported, with no share of their own.
        let base = sample(&text, "keel_memory_used_bytes{consumer=\"base\"}");
        sample(&text, "keel_memory_used_bytes{consumer=\"allocator\"}");
        // (What profiles hold is process-wide: other tests of this process take profiles.)
        sample(&text, "keel_memory_used_bytes{consumer=\"profiles\"}");
        for consumer in ["base", "allocator", "profiles"] {
            assert_eq!(
                sample(
                    &text,
                    &format!("keel_memory_budget_bytes{{consumer=\"{consumer}\"}}")
                ),
                0.0
            );
        }
        assert_eq!(sample(&text, "keel_memory_pressure"), 0.0);
        let allocated = sample(&text, "keel_memory_allocated_bytes");
        assert!(base <= allocated.max(0.0), "base {base} of {allocated}");
        assert!(sample(&text, "keel_db_size_bytes") > 0.0, "{text}");
        assert_eq!(sample(&text, "keel_pruned_height"), 0.0);
        assert!(
            sample(&text, "keel_validator_set_cache_hits_total") >= 1.0,
            "{text}"
        );
        assert!(
            sample(&text, "keel_validator_set_cache_misses_total") >= 1.0,
            "{text}"
        );
        // Verified at admission, found in the cache when its block executed.
        assert_eq!(sample(&text, "keel_sig_cache_misses_total"), 1.0, "{text}");
        assert!(sample(&text, "keel_sig_cache_hits_total") >= 1.0, "{text}");
        node.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_hard_memory_pressure_new_transactions_are_refused_and_health_says_why() {
        // No limit: no governor thread resets the level this test sets by hand.
        let (_dir, node, client, tx) = one_node(ByteSize(0)).await;
        let pressure = node.context().memory_pressure().clone();
        pressure.set(crate::memory::PRESSURE_HARD);
        let e = client
            .tx_submit(SignedTxHex::from_bytes(&tx.bytes))
            .await
            .unwrap_err();
        let jsonrpsee::core::ClientError::Call(e) = e else {
            panic!("{e}");
        };
        assert_eq!(e.code(), crate::rpc::codes::MEMORY_PRESSURE);
        assert!(e.message().contains("memory pressure"), "{}", e.message());
        let health = crate::rpc::health::report(&node.context().clone(), 50, SystemClock.now_ms());
        assert_eq!(health.status, "unhealthy");
        assert!(
            health.reasons.iter().any(|r| r.contains("memory pressure")),
            "{:?}",
            health.reasons
        );
        let text = scrape(node.metrics_addr()).await;
        assert_eq!(sample(&text, "keel_memory_refused_txs_total"), 1.0);
        // Pressure passes: the same transaction goes in.
        pressure.set(crate::memory::PRESSURE_NONE);
        client
            .tx_submit(SignedTxHex::from_bytes(&tx.bytes))
            .await
            .unwrap();
        node.shutdown().await.unwrap();
    }
}
