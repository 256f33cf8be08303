//! Node assembly: open the store, boot ([`crate::boot`]), start the network, the consensus
//! host, the metrics and RPC servers, every long-lived one named and owned by a
//! [`TaskManager`]; and stop them all, in order, within a bounded time.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use keel_storage::{KvStore, MemStore, RocksConfig, RocksStore};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::boot::Settings;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StorageEngine};
use crate::context::NodeContext;
use crate::home::{read_key_file, Home};
use crate::host::{run_blocking, Command};
use crate::tasks::TaskManager;
use crate::{Error, Result};

/// Commands (network messages, sync answers) queued for the host; beyond it, messages are
/// dropped (consensus recovers from loss) rather than growing memory.
const COMMAND_QUEUE: usize = 4096;
/// How long a clean shutdown may take before the tasks still running are abandoned.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(8);

/// A running node.
pub struct Node {
    chain: Arc<NodeContext>,
    commands: SyncSender<Command>,
    host_done: Option<oneshot::Receiver<Result<()>>>,
    rpc: jsonrpsee::server::ServerHandle,
    rpc_addr: SocketAddr,
    tasks: TaskManager,
    /// The RocksDB store, flushed at shutdown (none for the memory engine).
    rocks: Option<Arc<RocksStore>>,
}

impl Node {
    /// Starts a node from its home folder with an already loaded configuration.
    pub async fn start(home_dir: &Path, config: Config) -> Result<Node> {
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
        let booted = match crate::boot::open(store, &genesis, &key, node_id, &Settings::of(&config))
        {
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
        chain.set_gossip(network.clone());
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut host = booted.into_host(network, clock.clone());
        host.start()?;
        let scraped = chain.clone();
        let (_, metrics) = crate::metrics::serve_metrics(
            config.metrics.listen_addr,
            Arc::new(move || scraped.metrics.render(&*scraped)),
            tasks.token(),
        )
        .await?;
        tasks.add_task("metrics server", metrics);
        let (rpc, rpc_addr) = crate::rpc::start(chain.clone(), &config.rpc).await?;
        info!(addr = %rpc_addr, "JSON-RPC listening (HTTP and WebSocket)");

        // The moniker labels consensus logs, so nodes sharing a process (devnet) are told apart.
        let span = tracing::info_span!("node", moniker = %config.moniker);
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

fn rocks_config(config: &Config) -> RocksConfig {
    let r = &config.storage.rocksdb;
    RocksConfig {
        block_cache_size: r.block_cache_size.0,
        write_buffer_size: r.write_buffer_size.0,
        max_open_files: r.max_open_files,
        compression: r.compression,
    }
}
