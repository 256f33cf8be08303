//! Node assembly: open everything, start the driver and the RPC server, shut down cleanly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use keel_consensus::{epoch_of_next_block, Engine, SafetyData, Tip, Validator, ValidatorSet};
use keel_genesis::Genesis;
use keel_state::{SigCache, State};
use keel_storage::{BlockStore, Column, KvStore, MemStore, RocksConfig, RocksStore, WriteBatch};
use keel_types::{Block, Hash, Header, QuorumCertificate};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::app::App;
use crate::chain::{Chain, ChainParts, TipInfo};
use crate::config::{Config, StorageEngine};
use crate::driver::{Command, Driver, LATEST_QC_KEY, SAFETY_KEY};
use crate::home::{read_key_file, Home};
use crate::mempool::{Mempool, MempoolLimits};
use crate::{Error, Result};

const GENESIS_HASH_KEY: &str = "genesis_hash";
/// Commands (network messages, sync answers) queued for the driver; beyond it, messages are
/// dropped (consensus recovers from loss) rather than growing memory.
const COMMAND_QUEUE: usize = 4096;

/// A running node.
pub struct Node {
    chain: Arc<Chain>,
    commands: SyncSender<Command>,
    driver: Option<JoinHandle<()>>,
    driver_done: Option<oneshot::Receiver<Result<()>>>,
    rpc: jsonrpsee::server::ServerHandle,
    rpc_addr: SocketAddr,
}

impl Node {
    /// Starts a node from its home folder with an already loaded configuration.
    pub async fn start(home_dir: &Path, config: Config) -> Result<Node> {
        let home = Home::new(home_dir);
        let genesis = home.load_genesis()?;
        let key = read_key_file(&home.validator_key())?;
        let node_key = read_key_file(&home.node_key())?;

        let store: Arc<dyn KvStore> = match config.storage.engine {
            StorageEngine::RocksDb => {
                Arc::new(RocksStore::open(&home.data(), &rocks_config(&config))?)
            }
            StorageEngine::Memory => Arc::new(MemStore::new()),
        };
        let blocks = BlockStore::new(store.clone());
        let state = State::new(store.clone(), genesis.exec_params());
        let validators = validator_set(&genesis)?;
        let genesis_header = genesis_header(&genesis, &validators)?;

        let (tip, safety) = match blocks.latest()? {
            None => {
                write_genesis(&blocks, &state, &genesis, &genesis_header)?;
                info!(chain_id = %genesis.chain_id, hash = %genesis_header.hash(), "initialised chain from genesis");
                (genesis_tip(&genesis_header), None)
            }
            Some((height, hash)) => {
                check_genesis(&blocks, &genesis_header, home_dir)?;
                let header = blocks.header_by_hash(&hash)?.ok_or_else(|| {
                    Error::Mismatch(format!("latest block {hash} at height {height} is missing"))
                })?;
                let qc = match blocks.meta(LATEST_QC_KEY)? {
                    Some(bytes) => QuorumCertificate::decode(&bytes).map_err(|e| {
                        Error::Mismatch(format!("stored certificate of the latest block: {e}"))
                    })?,
                    None => QuorumCertificate::genesis(hash),
                };
                let safety = match store.get(Column::Consensus, SAFETY_KEY)? {
                    Some(bytes) => Some(SafetyData::decode(&bytes)?),
                    None => None,
                };
                info!(height, %hash, "resuming from stored chain");
                (
                    Tip {
                        height,
                        hash,
                        round: header.round,
                        timestamp_ms: header.timestamp_ms,
                        qc,
                    },
                    safety,
                )
            }
        };
        let finalized = blocks.finalized()?.unwrap_or((0, genesis_header.hash()));

        let epoch = epoch_of_next_block(tip.height, genesis.params.epoch_length);
        // One signature cache: admission fills it, every block execution reads it.
        let sig_cache = Arc::new(SigCache::default());
        let app =
            App::new(store.clone(), genesis.exec_params())?.with_signature_cache(sig_cache.clone());
        let mempool = Mempool::new(
            MempoolLimits::from(&config.mempool),
            genesis.chain_id.clone(),
            genesis.params.min_fee,
        );
        let chain = Arc::new(Chain::new(ChainParts {
            chain_id: genesis.chain_id.clone(),
            node_id: crate::network::peer_id(&node_key)?,
            params: genesis.params.clone(),
            blocks,
            state,
            validators,
            epoch,
            mempool,
            sig_cache,
            memory_limit: config.memory.limit.0,
            tip: TipInfo {
                latest: (tip.height, tip.hash),
                finalized,
            },
        }));
        let validators = chain.validator_set(epoch)?;
        let me = validators.get(&key.address()).map(|v| v.stake).unwrap_or(0);
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
        let mut engine = Engine::new(
            keel_consensus::Config {
                chain_id: genesis.chain_id.clone(),
                block_time_ms: config.consensus.block_time_ms,
                timeout_ms: config.consensus.timeout_ms,
                max_timeout_ms: config.consensus.timeout_ms.saturating_mul(8),
                epoch_length: genesis.params.epoch_length,
            },
            key.clone(),
            (*validators).clone(),
            tip.clone(),
            safety,
        )?;
        // The recent final headers, so the leader schedule (leader reputation) agrees with the
        // other validators' from the first round.
        let mut recent = Vec::new();
        for h in tip.height.saturating_sub(39).max(1)..=tip.height {
            if let Some(header) = chain.blocks.header_at(h)? {
                recent.push(header);
            }
        }
        engine.restore_history(&recent);
        if epoch > 0 && tip.height == epoch.saturating_mul(genesis.params.epoch_length) {
            // Resuming at the block that ended the last epoch: its certificates are checked
            // with that epoch's set.
            engine.set_previous_validators((*chain.validator_set(epoch - 1)?).clone());
        }

        let (commands, receiver) = sync_channel(COMMAND_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let mut driver = Driver::new(chain.clone(), engine, app, receiver);
        let net = crate::network::start(
            chain.clone(),
            &config,
            &node_key,
            &key,
            genesis_header.hash(),
            commands.clone(),
        )
        .await?;
        chain.set_gossip(net.handle.clone());
        driver.set_network(net, commands.clone());
        driver.start()?;
        crate::metrics::serve(chain.clone(), config.metrics.listen_addr).await?;
        let (rpc, rpc_addr) = crate::rpc::start(chain.clone(), &config.rpc).await?;
        info!(addr = %rpc_addr, "JSON-RPC listening (HTTP and WebSocket)");

        // The moniker labels consensus logs, so nodes sharing a process (devnet) are told apart.
        let span = tracing::info_span!("node", moniker = %config.moniker);
        let handle = std::thread::Builder::new()
            .name("keel-consensus".into())
            .spawn(move || {
                let _node = span.enter();
                let result = driver.run();
                if let Err(e) = &result {
                    error!(error = %e, "consensus driver failed");
                }
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::io("consensus thread", e))?;

        Ok(Node {
            chain,
            commands,
            driver: Some(handle),
            driver_done: Some(done_rx),
            rpc,
            rpc_addr,
        })
    }

    /// The shared chain.
    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }

    /// The address the RPC server listens on.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// Resolves if the consensus driver stops on its own, with its error.
    pub async fn failed(&mut self) -> Result<()> {
        match self.driver_done.as_mut() {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => std::future::pending().await,
        }
    }

    /// Stops the RPC server and the driver, waiting for the block being committed, if any.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.rpc.stop();
        self.rpc.clone().stopped().await;
        let _ = self.commands.send(Command::Shutdown);
        if let Some(handle) = self.driver.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
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

/// The validator set of genesis.
pub(crate) fn validator_set(genesis: &Genesis) -> Result<ValidatorSet> {
    let validators = genesis
        .validator_keys()?
        .into_iter()
        .map(|(public_key, stake)| Validator {
            address: public_key.address(),
            public_key,
            stake,
        })
        .collect();
    Ok(ValidatorSet::new(validators)?)
}

/// The genesis header, computing the initial state root on a scratch store.
fn genesis_header(genesis: &Genesis, validators: &ValidatorSet) -> Result<Header> {
    let scratch = State::new(Arc::new(MemStore::new()), genesis.exec_params());
    let root = scratch.init_genesis(
        &genesis.initial_accounts()?,
        &genesis.validator_public_keys()?,
        &mut WriteBatch::new(),
    )?;
    Ok(genesis.header(root, validators.hash()))
}

fn genesis_tip(header: &Header) -> Tip {
    let hash = header.hash();
    Tip {
        height: 0,
        hash,
        round: 0,
        timestamp_ms: header.timestamp_ms,
        qc: QuorumCertificate::genesis(hash),
    }
}

fn write_genesis(
    blocks: &BlockStore,
    state: &State,
    genesis: &Genesis,
    header: &Header,
) -> Result<()> {
    let mut batch = WriteBatch::new();
    state.init_genesis(
        &genesis.initial_accounts()?,
        &genesis.validator_public_keys()?,
        &mut batch,
    )?;
    let block = Block {
        header: header.clone(),
        txs: Vec::new(),
        evidence: Vec::new(),
    };
    let hash = block.hash();
    blocks.stage_block(&mut batch, &block, &[]);
    blocks.stage_finalized(&mut batch, 0, hash);
    blocks.stage_meta(&mut batch, GENESIS_HASH_KEY, hash.as_bytes());
    blocks.kv().write(batch)?;
    Ok(())
}

fn check_genesis(blocks: &BlockStore, expected: &Header, home: &Path) -> Result<()> {
    let stored = blocks
        .meta(GENESIS_HASH_KEY)?
        .and_then(|b| Hash::from_slice("genesis_hash", &b).ok());
    let expected = expected.hash();
    if stored != Some(expected) {
        return Err(Error::Mismatch(format!(
            "the database in {} belongs to another chain (genesis {}), not to this genesis.json ({expected})",
            home.join("data").display(),
            stored.map(|h| h.to_string()).unwrap_or_else(|| "unknown".into()),
        )));
    }
    Ok(())
}
