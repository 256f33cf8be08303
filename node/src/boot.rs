//! The one boot path: from a store and a genesis to a node context and a consensus host
//! ready to start. [`crate::Node::start`] runs it over RocksDB and libp2p; the seeded node
//! simulation runs it over `MemStore` and the simulated network at every start and restart.
//!
//! On an empty store it writes genesis (state, block, final pointer, genesis hash) in one
//! batch; on a used one it checks the genesis hash, then resumes from the stored final tip,
//! its certificate and the fsynced safety data, and hands the engine the recent final
//! headers so its leader schedule agrees with the other validators' from the first round.

use std::sync::Arc;

use keel_consensus::{epoch_of_next_block, Engine, Tip, Validator, ValidatorSet, HISTORY_HEADERS};
use keel_genesis::Genesis;
use keel_state::{SigCache, State};
use keel_storage::{BlockStore, KvStore, MemStore, WriteBatch};
use keel_types::{Block, Hash, Header, Keypair, QuorumCertificate};
use tracing::info;

use crate::clock::Clock;
use crate::config::Config;
use crate::context::{ContextParts, NodeContext};
use crate::host::Host;
use crate::ledger::{BlockLimits, Ledger};
use crate::mempool::{Mempool, MempoolLimits};
use crate::net::Network;
use crate::store::ConsensusStore;
use crate::{Error, Result};

/// After consecutive timeouts a round's timeout doubles, up to this many times
/// `consensus.timeout_ms`.
pub const MAX_TIMEOUT_FACTOR: u64 = 4;

/// What a boot needs besides the store and genesis.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `consensus.block_time_ms`.
    pub block_time_ms: u64,
    /// `consensus.timeout_ms`.
    pub timeout_ms: u64,
    /// Mempool capacity.
    pub mempool: MempoolLimits,
    /// `memory.limit` in bytes (0: none), for the metrics.
    pub memory_limit: u64,
}

impl Settings {
    /// The settings of a configuration.
    pub fn of(config: &Config) -> Settings {
        Settings {
            block_time_ms: config.consensus.block_time_ms,
            timeout_ms: config.consensus.timeout_ms,
            mempool: MempoolLimits {
                max_bytes: crate::memory::Budgets::of(config).mempool,
                ..MempoolLimits::from(&config.mempool)
            },
            memory_limit: config.memory.limit.0,
        }
    }
}

/// A node opened from its store, before its network exists.
pub struct Booted {
    /// The node context.
    pub context: Arc<NodeContext>,
    /// The hash of the genesis block.
    pub genesis_hash: Hash,
    engine: Engine,
    ledger: Ledger,
}

impl Booted {
    /// The state tree's node cache of the ledger (the memory governor resizes it).
    pub fn node_cache(&self) -> Arc<keel_state::NodeCache> {
        self.ledger.node_cache()
    }

    /// The ledger's estimate of the bytes its pending blocks hold (for the memory governor).
    pub fn pending_memory(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.ledger.pending_memory()
    }

    /// The context and the ledger, without consensus (benchmarks that commit by hand).
    pub(crate) fn into_ledger(self) -> (Arc<NodeContext>, Ledger) {
        (self.context, self.ledger)
    }

    /// The consensus host over `network` and `clock`; [`Host::start`] it next.
    pub fn into_host(self, network: Arc<dyn Network>, clock: Arc<dyn Clock>) -> Host {
        Host::new(self.context, self.engine, self.ledger, network, clock)
    }
}

/// Opens the node whose database is `store`: writes genesis into an empty store, or checks
/// and resumes a used one. `node_id` is the network identity RPC reports.
pub fn open(
    store: Arc<dyn KvStore>,
    genesis: &Genesis,
    key: &Keypair,
    node_id: String,
    settings: &Settings,
) -> Result<Booted> {
    let blocks = BlockStore::new(store.clone());
    let records = ConsensusStore::new(store.clone());
    let state = State::new(store.clone(), genesis.exec_params());
    let validators = validator_set(genesis)?;
    let genesis_header = genesis_header(genesis, &validators)?;
    let genesis_hash = genesis_header.hash();

    let (tip, safety) = match blocks.latest()? {
        None => {
            write_genesis(&blocks, &records, &state, genesis, &genesis_header)?;
            info!(chain_id = %genesis.chain_id, hash = %genesis_hash, "initialised chain from genesis");
            (genesis_tip(&genesis_header), None)
        }
        Some((height, hash)) => {
            let stored = records.genesis_hash()?;
            if stored != Some(genesis_hash) {
                return Err(Error::WrongGenesis {
                    data: "this folder".into(),
                    stored: stored.map_or_else(|| "unknown".into(), |h| h.to_string()),
                    expected: genesis_hash,
                });
            }
            let header = blocks.header_by_hash(&hash)?.ok_or(Error::Corrupt {
                what: "the latest block",
                reason: format!("block {hash} at height {height} is missing"),
            })?;
            let qc = records
                .latest_qc()?
                .unwrap_or_else(|| QuorumCertificate::genesis(hash));
            info!(height, %hash, "resuming from stored chain");
            (
                Tip {
                    height,
                    hash,
                    round: header.round,
                    timestamp_ms: header.timestamp_ms,
                    qc,
                },
                records.safety()?,
            )
        }
    };
    let finalized = blocks.finalized()?.unwrap_or((0, genesis_hash));

    let epoch = epoch_of_next_block(tip.height, genesis.params.epoch_length);
    // One signature cache: admission fills it, every block execution reads it.
    let sig_cache = Arc::new(SigCache::default());
    let ledger = Ledger::new(
        store.clone(),
        genesis.exec_params(),
        BlockLimits::of(&genesis.params),
    )?
    .with_signature_cache(sig_cache.clone());
    // Queries read through the ledger's node cache: one cache for the node, budgeted and
    // resized by the memory governor (committed nodes never change, so any tree over the
    // database can share it).
    let state = State::with_shared_node_cache(
        store.clone(),
        genesis.exec_params(),
        ledger.node_cache(),
        u64::MAX,
    );
    let prune = Arc::new(crate::pruner::PruneStatus::load(&blocks)?);
    let chain = Arc::new(NodeContext::new(ContextParts {
        chain_id: genesis.chain_id.clone(),
        node_id,
        params: genesis.params.clone(),
        blocks,
        state,
        validators,
        epoch,
        mempool: Mempool::new(
            settings.mempool,
            genesis.chain_id.clone(),
            genesis.params.min_fee,
        ),
        sig_cache,
        prune,
        finalized,
    }));
    let validators = chain.validator_set(epoch)?;
    let mut engine = Engine::new(
        keel_consensus::Config {
            chain_id: genesis.chain_id.clone(),
            block_time_ms: settings.block_time_ms,
            timeout_ms: settings.timeout_ms,
            max_timeout_ms: settings.timeout_ms.saturating_mul(MAX_TIMEOUT_FACTOR),
            epoch_length: genesis.params.epoch_length,
        },
        key.clone(),
        (*validators).clone(),
        tip.clone(),
        safety,
    )?;
    let first = tip.height.saturating_sub(HISTORY_HEADERS as u64 - 1).max(1);
    let mut recent = Vec::new();
    for h in first..=tip.height {
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
    Ok(Booted {
        context: chain,
        genesis_hash,
        engine,
        ledger,
    })
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
    records: &ConsensusStore,
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
    records.stage_genesis_hash(&mut batch, &hash);
    blocks.kv().write(batch)?;
    Ok(())
}
