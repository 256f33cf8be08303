//! The node context that the RPC server, the network server and the consensus host share:
//! storage, state, the mempool, the signature cache, the validator sets, the current
//! [`ChainView`] (which only the host publishes), and the head notifications.
//!
//! [`NodeContext::register_metrics`] registers the metrics of the parts it holds: the view's
//! heights and epoch, the mempool's size, the hits and misses of the validator-set and
//! signature caches, and the database's size, each read where it is kept.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use keel_consensus::{epoch_of_next_block, CacheStats, Validator, ValidatorSet, ValidatorSetCache};
use keel_genesis::Params;
use keel_state::{verify_transactions, SigCache, State};
use keel_storage::{BlockStore, KvStore};
use keel_types::{Block, Hash, Header, Transaction};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::mempool::{Mempool, Rejection};
use crate::metrics::{encode_counter, encode_gauge, encode_gauges};
use crate::net::Network;
use crate::pruner::{PruneStatus, Wake};
use crate::store::ConsensusStore;
pub use crate::view::TipInfo;
use crate::view::{ChainView, ViewCell};

/// Capacity of the head notification channels: a subscriber further behind than this misses
/// heads (and is told so) instead of growing memory.
pub const HEAD_CHANNEL_CAPACITY: usize = 256;

/// The validator set of `epoch` (at least 1) from the final state at its first height,
/// `epoch * epoch_length`: every registered, unjailed account with stake. When nobody has
/// stake there, the previous epoch's set (from `previous`) carries over.
pub fn epoch_validator_set(
    state: &State,
    epoch: u64,
    epoch_length: u64,
    previous: &dyn Fn(u64) -> crate::Result<ValidatorSet>,
) -> crate::Result<ValidatorSet> {
    if epoch == 0 {
        return previous(0);
    }
    let stakes = state.stakes(epoch.saturating_mul(epoch_length))?;
    if stakes.is_empty() {
        return previous(epoch - 1);
    }
    let validators = stakes
        .into_iter()
        .map(|s| Validator {
            address: s.address,
            public_key: s.public_key,
            stake: s.stake,
        })
        .collect();
    Ok(ValidatorSet::new(validators)?)
}

/// Epochs of validator sets kept: the current one, its predecessor (certificates at the
/// boundary) and a few for `state_getValidators` at recent heights.
pub const VALIDATOR_SET_CACHE_EPOCHS: usize = 8;

/// Where a transaction stands; on the wire (`tx_status`), its lower-case name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxStatus {
    /// Waiting in the mempool.
    Pending,
    /// In a stored block that is not final yet.
    Included,
    /// In a final block.
    Finalized,
    /// Not known to this node.
    Unknown,
}

impl TxStatus {
    /// The RPC name.
    pub fn as_str(self) -> &'static str {
        match self {
            TxStatus::Pending => "pending",
            TxStatus::Included => "included",
            TxStatus::Finalized => "finalized",
            TxStatus::Unknown => "unknown",
        }
    }
}

/// Why `tx_submit` refused a transaction.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Bytes that are not a `SignedTx`.
    #[error("{0}")]
    Malformed(keel_types::Error),
    /// The signature does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// The mempool refused it.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The node failed to read the sender's account.
    #[error("internal error: {0}")]
    Internal(#[from] keel_state::Error),
    /// The node is under hard memory pressure (`memory.limit`) and takes no new
    /// transactions until it passes.
    #[error(
        "node under memory pressure: new transactions are refused until it passes; retry later"
    )]
    MemoryPressure,
}

/// What a [`NodeContext`] is made of.
pub struct ContextParts {
    /// Chain id.
    pub chain_id: String,
    /// This node's network identity.
    pub node_id: String,
    /// Genesis parameters.
    pub params: Params,
    /// Blocks, receipts, indexes.
    pub blocks: BlockStore,
    /// Account state.
    pub state: State,
    /// The validator set of genesis (epoch 0).
    pub validators: ValidatorSet,
    /// The epoch consensus starts in.
    pub epoch: u64,
    /// The mempool.
    pub mempool: Mempool,
    /// Transactions whose signatures are verified: filled at admission, read by block
    /// execution (the node's one cache, shared with its [`crate::ledger::Ledger`]).
    pub sig_cache: Arc<SigCache>,
    /// The final block at start.
    pub finalized: (u64, Hash),
    /// How far the database is pruned.
    pub prune: Arc<PruneStatus>,
}

/// The shared chain.
pub struct NodeContext {
    /// Chain id.
    pub chain_id: String,
    /// This node's network identity.
    pub node_id: String,
    /// Genesis parameters.
    pub params: Params,
    /// Blocks, receipts, indexes.
    pub blocks: BlockStore,
    /// Account state.
    pub state: State,
    /// The validator set of genesis (epoch 0).
    genesis_validators: ValidatorSet,
    /// Validator sets by epoch (shared with its metrics collector).
    validator_sets: Arc<ValidatorSetCache>,
    /// Consensus-side records (safety data, kept blocks, epoch proofs, peer book).
    records: ConsensusStore,
    /// Where transactions submitted over RPC are gossiped (none without networking).
    gossip: std::sync::OnceLock<Arc<dyn Network>>,
    peers: std::sync::atomic::AtomicUsize,
    syncing: std::sync::atomic::AtomicBool,
    mempool: Mutex<Mempool>,
    sig_cache: Arc<SigCache>,
    view: Arc<ViewCell>,
    new_heads: broadcast::Sender<Header>,
    finalized_heads: broadcast::Sender<Header>,
    prune: Arc<PruneStatus>,
    pruner_wake: std::sync::OnceLock<Wake>,
    pressure: Arc<crate::memory::Pressure>,
}

impl NodeContext {
    /// Assembles the shared chain.
    pub fn new(parts: ContextParts) -> NodeContext {
        NodeContext {
            chain_id: parts.chain_id,
            node_id: parts.node_id,
            params: parts.params,
            records: ConsensusStore::new(parts.blocks.kv().clone()),
            blocks: parts.blocks,
            state: parts.state,
            genesis_validators: parts.validators,
            validator_sets: Arc::new(ValidatorSetCache::new(VALIDATOR_SET_CACHE_EPOCHS)),
            gossip: std::sync::OnceLock::new(),
            peers: std::sync::atomic::AtomicUsize::new(0),
            syncing: std::sync::atomic::AtomicBool::new(false),
            mempool: Mutex::new(parts.mempool),
            sig_cache: parts.sig_cache,
            view: Arc::new(ViewCell::new(ChainView::at_final(
                parts.finalized,
                parts.epoch,
            ))),
            new_heads: broadcast::channel(HEAD_CHANNEL_CAPACITY).0,
            finalized_heads: broadcast::channel(HEAD_CHANNEL_CAPACITY).0,
            prune: parts.prune,
            pruner_wake: std::sync::OnceLock::new(),
            pressure: Arc::default(),
        }
    }

    /// The memory pressure the governor sets; under hard pressure new transactions are
    /// refused ([`SubmitError::MemoryPressure`]).
    pub fn memory_pressure(&self) -> &Arc<crate::memory::Pressure> {
        &self.pressure
    }

    /// How far the database is pruned: heights below [`PruneStatus::earliest`] are not served.
    pub fn prune_status(&self) -> &Arc<PruneStatus> {
        &self.prune
    }

    /// Wakes the pruner (if one runs) on each commit.
    pub fn set_pruner_wake(&self, wake: Wake) {
        let _ = self.pruner_wake.set(wake);
    }

    /// The current view of the chain: tip, final block, epoch, non-final blocks.
    pub fn view(&self) -> Arc<ChainView> {
        self.view.load()
    }

    /// Registers the metrics of the parts the context holds, each read where it is kept at
    /// scrape time without waiting on the host: `keel_block_height`, `keel_finalized_height`
    /// and `keel_epoch` (the view), `keel_mempool_txs`, `keel_validator_set_cache_*` and
    /// `keel_sig_cache_*` (hits and misses), `keel_db_size_bytes`, `keel_db_live_sst_bytes` and the
    /// pruner's `keel_pruned_height`, `keel_prune_duration_seconds` and
    /// `keel_prune_deleted_keys_total`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(self.view.clone()));
        self.mempool().register_metrics(registry);
        registry.register_collector(Box::new(CacheMetrics {
            validator_sets: self.validator_sets.clone(),
            signatures: self.sig_cache.clone(),
        }));
        registry.register_collector(Box::new(DatabaseMetrics {
            store: self.blocks.kv().clone(),
            size: AtomicU64::new(0),
        }));
        self.prune.register(registry);
    }

    /// Replaces the view (the consensus host, after each step that changes it).
    pub(crate) fn publish(&self, view: ChainView) {
        self.view.store(view);
    }

    /// The consensus-side records of this node's database.
    pub fn records(&self) -> &ConsensusStore {
        &self.records
    }

    /// The epoch consensus is in (the epoch of the next block to be final).
    pub fn epoch(&self) -> u64 {
        self.view().epoch
    }

    /// Gossips transactions submitted over RPC through `net` from now on.
    pub fn set_gossip(&self, net: Arc<dyn Network>) {
        let _ = self.gossip.set(net);
    }

    /// Connected peers.
    pub fn peers(&self) -> usize {
        self.peers.load(Ordering::Relaxed)
    }

    pub(crate) fn set_peers(&self, n: usize) {
        self.peers.store(n, Ordering::Relaxed);
    }

    /// Whether the node is fetching blocks it is missing from peers.
    pub fn syncing(&self) -> bool {
        self.syncing.load(Ordering::Relaxed)
    }

    pub(crate) fn set_syncing(&self, on: bool) {
        self.syncing.store(on, Ordering::Relaxed);
    }

    /// The epoch of the block at `height` (genesis is in epoch 0).
    pub fn epoch_of_height(&self, height: u64) -> u64 {
        match height {
            0 => 0,
            h => epoch_of_next_block(h - 1, self.params.epoch_length),
        }
    }

    /// The validator set of `epoch`, from the cache or computed once from the final state at
    /// the epoch's first height (`epoch * epoch_length`, the block that ended the previous
    /// epoch): every registered, unjailed account with stake. Epoch 0 is genesis's set. An
    /// epoch whose state leaves nobody with stake keeps the previous epoch's set, so the
    /// chain cannot end itself.
    pub fn validator_set(&self, epoch: u64) -> crate::Result<Arc<ValidatorSet>> {
        self.validator_sets.get_or_load(epoch, || {
            if epoch == 0 {
                return Ok(self.genesis_validators.clone());
            }
            // Recorded once read from state: the state at an epoch's start may be pruned.
            if let Some(set) = self.records.validator_set(epoch)? {
                return Ok(set);
            }
            let set = epoch_validator_set(&self.state, epoch, self.params.epoch_length, &|e| {
                if e == 0 {
                    Ok(self.genesis_validators.clone())
                } else {
                    Ok((*self.validator_set(e)?).clone())
                }
            })?;
            self.records.save_validator_set(epoch, &set)?;
            Ok(set)
        })
    }

    /// Hits and misses of the validator set cache.
    pub fn validator_set_cache_stats(&self) -> CacheStats {
        self.validator_sets.stats()
    }

    /// The current tip.
    pub fn tip(&self) -> TipInfo {
        self.view().tip
    }

    /// A certified, not yet final block at `height`.
    pub fn certified_at(&self, height: u64) -> Option<Block> {
        self.view()
            .certified
            .get(&height)
            .map(|b| (*b.block).clone())
    }

    /// A certified, not yet final block by hash.
    pub fn certified_by_hash(&self, hash: &Hash) -> Option<Block> {
        self.view()
            .certified_by_hash(hash)
            .map(|b| (*b.block).clone())
    }

    /// The mempool. The host takes it after a commit to swap the final height and drop the
    /// committed transactions; admission reads the final height under it.
    pub fn mempool(&self) -> MutexGuard<'_, Mempool> {
        match self.mempool.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The cache of transactions whose signatures are verified.
    pub fn sig_cache(&self) -> &Arc<SigCache> {
        &self.sig_cache
    }

    /// New certified heads, as they are stored.
    pub fn subscribe_new_heads(&self) -> broadcast::Receiver<Header> {
        self.new_heads.subscribe()
    }

    /// Newly final heads, in height order.
    pub fn subscribe_finalized_heads(&self) -> broadcast::Receiver<Header> {
        self.finalized_heads.subscribe()
    }

    pub(crate) fn notify_new_head(&self, header: Header) {
        // No subscribers is not an error.
        let _ = self.new_heads.send(header);
    }

    pub(crate) fn notify_finalized_head(&self, header: Header) {
        let _ = self.finalized_heads.send(header);
        if let Some(wake) = self.pruner_wake.get() {
            wake.wake();
        }
    }

    /// Checks and admits a transaction: decode, signature, then the mempool's rules against
    /// the sender's committed account; then hands it to the network for gossip without
    /// waiting (libp2p gathers what is submitted into batches, `crate::net::tx_gossip`).
    pub fn submit(&self, bytes: &[u8]) -> Result<Hash, SubmitError> {
        let hash = self.admit_from_peer(bytes)?;
        self.gossip_transaction(bytes);
        Ok(hash)
    }

    /// Hands an admitted transaction to the network for gossip, without waiting.
    fn gossip_transaction(&self, bytes: &[u8]) {
        if let Some(net) = self.gossip.get() {
            net.broadcast(keel_p2p::Channel::Transactions, bytes.to_vec());
        }
    }

    /// Checks and admits transactions submitted together (as [`NodeContext::submit`] does
    /// each, with the signatures verified in batches: [`NodeContext::admit_batch_from_peer`]),
    /// then hands the admitted ones to the network for gossip. `result[i]` is the verdict on
    /// `items[i]`. Blocks on rayon: call it from a blocking context.
    pub fn submit_batch<B: AsRef<[u8]>>(&self, items: &[B]) -> Vec<Result<Hash, SubmitError>> {
        let results = self.admit_batch_from_peer(items);
        for (bytes, _) in items.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
            self.gossip_transaction(bytes.as_ref());
        }
        results
    }

    /// Admits a transaction to the mempool without gossiping it (it came from gossip, which
    /// forwards it itself). Its signature is verified through the signature cache.
    pub fn admit_from_peer(&self, bytes: &[u8]) -> Result<Hash, SubmitError> {
        if self.pressure.refuse_transaction() {
            return Err(SubmitError::MemoryPressure);
        }
        let tx = Transaction::decode(bytes).map_err(SubmitError::Malformed)?;
        let hash = tx.hash;
        let valid = verify_transactions(std::slice::from_ref(&tx), Some(&self.sig_cache));
        if !valid.first().copied().unwrap_or(false) {
            return Err(SubmitError::BadSignature);
        }
        self.admit_verified(tx)?;
        Ok(hash)
    }

    /// Admits transactions that arrived together, without gossiping them: decodes each,
    /// verifies the signatures of all decodable ones in one [`verify_transactions`] call
    /// (parallel batches; the valid ones enter the signature cache, so block execution does
    /// not verify them again), then applies the mempool's rules in order. `result[i]` is the
    /// verdict on `items[i]`. Blocks on rayon: call it from a blocking context.
    pub fn admit_batch_from_peer<B: AsRef<[u8]>>(
        &self,
        items: &[B],
    ) -> Vec<Result<Hash, SubmitError>> {
        // Under hard memory pressure gossiped transactions are dropped unread (consensus
        // traffic goes on).
        if self.pressure.refuse_transaction() {
            return items
                .iter()
                .map(|_| Err(SubmitError::MemoryPressure))
                .collect();
        }
        let mut txs = Vec::with_capacity(items.len());
        let mut results: Vec<Result<Hash, SubmitError>> = items
            .iter()
            .map(|bytes| {
                let tx = Transaction::decode(bytes.as_ref()).map_err(SubmitError::Malformed)?;
                let hash = tx.hash;
                txs.push(tx);
                Ok(hash)
            })
            .collect();
        let valid = verify_transactions(&txs, Some(&self.sig_cache));
        // `txs` holds the decodable items in order: exactly the `Ok` slots.
        let slots = results.iter_mut().filter(|r| r.is_ok());
        for (slot, (tx, valid)) in slots.zip(txs.into_iter().zip(valid)) {
            let admitted = if valid {
                self.admit_verified(tx)
            } else {
                Err(SubmitError::BadSignature)
            };
            if let Err(e) = admitted {
                *slot = Err(e);
            }
        }
        results
    }

    /// The mempool's rules for a transaction whose signature is verified.
    fn admit_verified(&self, tx: Transaction) -> Result<(), SubmitError> {
        let mut pool = self.mempool();
        // Read the final height under the mempool lock: the host swaps it under this lock
        // when it drops committed transactions, so the nonce and balance seen here are those
        // the pool was last pruned against. Admission checks against final state; the
        // mempool tolerates nonce gaps for transactions that certified blocks have already
        // included.
        let height = self.tip().finalized.0;
        let account = self.state.account(&tx.sender, height)?.unwrap_or_default();
        pool.insert(tx, account.nonce, account.balance)?;
        Ok(())
    }

    /// Where a transaction stands.
    pub fn tx_status(&self, hash: &Hash) -> Result<TxStatus, keel_storage::Error> {
        if self.mempool().contains(hash) {
            return Ok(TxStatus::Pending);
        }
        if self.blocks.tx_location(hash)?.is_some() {
            return Ok(TxStatus::Finalized);
        }
        Ok(if self.view().includes_tx(hash) {
            TxStatus::Included
        } else {
            TxStatus::Unknown
        })
    }
}

/// Hits and misses of the validator-set cache and of the signature cache, counted by the
/// caches themselves (they only grow).
struct CacheMetrics {
    validator_sets: Arc<ValidatorSetCache>,
    signatures: Arc<SigCache>,
}

impl fmt::Debug for CacheMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheMetrics").finish_non_exhaustive()
    }
}

impl Collector for CacheMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let sets = self.validator_sets.stats();
        encode_counter(
            &mut encoder,
            "keel_validator_set_cache_hits",
            "Validator set lookups served by the per-epoch cache",
            sets.hits,
        )?;
        encode_counter(
            &mut encoder,
            "keel_validator_set_cache_misses",
            "Validator set lookups that computed the set",
            sets.misses,
        )?;
        encode_counter(
            &mut encoder,
            "keel_sig_cache_hits",
            "Signature cache lookups that found the transaction already verified (admission, block execution)",
            self.signatures.hits(),
        )?;
        encode_counter(
            &mut encoder,
            "keel_sig_cache_misses",
            "Signature cache lookups that had to verify the transaction (admission, block execution)",
            self.signatures.misses(),
        )
    }
}

/// The database's size on disk and its live table bytes per column family.
struct DatabaseMetrics {
    store: Arc<dyn KvStore>,
    /// The last size the store told, kept when it cannot tell.
    size: AtomicU64,
}

impl fmt::Debug for DatabaseMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseMetrics")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Collector for DatabaseMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Ok(size) = self.store.disk_size_bytes() {
            self.size.store(size, Ordering::Relaxed);
        }
        encode_gauge(
            &mut encoder,
            "keel_db_size_bytes",
            "Database size on disk",
            self.size.load(Ordering::Relaxed),
        )?;
        // Live table bytes per column family (RocksDB only): what pruning gives back.
        let live: Vec<([(&str, &str); 1], u64)> = keel_storage::Column::ALL
            .iter()
            .filter_map(|c| Some(([("cf", c.name())], self.store.live_sst_bytes(*c)?)))
            .collect();
        if !live.is_empty() {
            encode_gauges(
                &mut encoder,
                "keel_db_live_sst_bytes",
                "Bytes of live SST files per column family",
                &live,
            )?;
        }
        if let Some(stats) = self.store.engine_stats() {
            encode_engine_stats(&mut encoder, &stats)?;
        }
        Ok(())
    }
}

/// RocksDB's own counters and gauges: `keel_db_block_cache_{hits,misses}_total`,
/// `keel_db_write_stall_seconds_total`, `keel_db_compaction_{read,write}_bytes_total`,
/// `keel_db_flush_write_bytes_total`, `keel_db_running_compactions`,
/// `keel_db_pending_compaction_bytes`.
fn encode_engine_stats(
    encoder: &mut DescriptorEncoder<'_>,
    stats: &keel_storage::EngineStats,
) -> fmt::Result {
    let counters = [
        (
            "keel_db_block_cache_hits",
            "RocksDB block cache lookups that found the block",
            stats.block_cache_hits,
        ),
        (
            "keel_db_block_cache_misses",
            "RocksDB block cache lookups that read the block from disk",
            stats.block_cache_misses,
        ),
        (
            "keel_db_compaction_read_bytes",
            "Bytes RocksDB compactions read",
            stats.compaction_read_bytes,
        ),
        (
            "keel_db_compaction_write_bytes",
            "Bytes RocksDB compactions wrote",
            stats.compaction_write_bytes,
        ),
        (
            "keel_db_flush_write_bytes",
            "Bytes RocksDB memtable flushes wrote",
            stats.flush_write_bytes,
        ),
    ];
    for (name, help, value) in counters {
        encode_counter(encoder, name, help, value)?;
    }
    crate::metrics::encode_float_counter(
        encoder,
        "keel_db_write_stall_seconds",
        "Seconds RocksDB stalled or slowed writes (level-0 files, pending compaction, memtables)",
        stats.stall_micros as f64 / 1e6,
    )?;
    encode_gauge(
        encoder,
        "keel_db_running_compactions",
        "RocksDB compactions running now",
        stats.running_compactions,
    )?;
    encode_gauge(
        encoder,
        "keel_db_pending_compaction_bytes",
        "RocksDB's estimate of the bytes compaction still has to rewrite",
        stats.pending_compaction_bytes,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use keel_consensus::Validator;
    use keel_state::{Account, ExecParams};
    use keel_storage::{KvStore, MemStore};
    use keel_types::{Address, Keypair, QuorumCertificate, TxKind};

    use super::*;
    use crate::ledger::tests::{funded, write_genesis};
    use crate::ledger::{BlockLimits, BlockTemplate, Ledger};
    use crate::mempool::MempoolLimits;

    pub(crate) const CHAIN: &str = "chain-test";
    pub(crate) const FEE: u64 = 10;

    fn params() -> Params {
        Params {
            min_fee: FEE,
            ..Params::default()
        }
    }

    fn exec_params() -> ExecParams {
        let p = params();
        ExecParams {
            chain_id: CHAIN.into(),
            min_fee: p.min_fee,
            unbonding_period: p.unbonding_period,
            slash_fraction_ppm: p.slash_fraction_ppm,
        }
    }

    /// A chain over a store holding genesis with senders 1..=8 funded, and the store.
    pub(crate) fn chain() -> (NodeContext, Arc<dyn KvStore>) {
        chain_pruned(Arc::default())
    }

    /// [`chain`] whose database is pruned as `prune` says.
    pub(crate) fn chain_pruned(prune: Arc<PruneStatus>) -> (NodeContext, Arc<dyn KvStore>) {
        let store: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let accounts: Vec<(Address, Account)> = (1..=8)
            .map(|s| (Keypair::from_seed(s).address(), funded(1_000_000)))
            .collect();
        let hash = write_genesis(&store, exec_params(), &accounts);
        let state = State::new(store.clone(), exec_params());
        let blocks = BlockStore::new(store.clone());
        let validator = Keypair::from_seed(100).public();
        let chain = NodeContext::new(ContextParts {
            chain_id: CHAIN.into(),
            node_id: "test".into(),
            params: params(),
            blocks,
            state,
            validators: ValidatorSet::new(vec![Validator {
                address: validator.address(),
                public_key: validator,
                stake: 1,
            }])
            .unwrap(),
            epoch: 0,
            prune,
            mempool: Mempool::new(
                MempoolLimits {
                    max_txs: 1_000,
                    max_bytes: 1 << 20,
                },
                CHAIN.into(),
                FEE,
            ),
            sig_cache: Arc::new(SigCache::new(1_000)),
            finalized: (0, hash),
        });
        (chain, store)
    }

    pub(crate) fn transfer(from: u64, nonce: u64) -> Transaction {
        Transaction::sign(
            &Keypair::from_seed(from),
            CHAIN,
            nonce,
            FEE,
            TxKind::Transfer {
                to: Address([7; 20]),
                amount: 1,
            },
        )
    }

    fn template(parent: &Block, round: u64) -> BlockTemplate {
        let (hash, height) = (parent.hash(), parent.header.height);
        BlockTemplate {
            height: height + 1,
            round,
            epoch: 0,
            parent_hash: hash,
            parent_qc: QuorumCertificate {
                block_hash: hash,
                height,
                round: round - 1,
                signatures: Vec::new(),
            },
            timestamp_ms: 1_000 * round,
            proposer: Address([9; 20]),
            validators_hash: Hash::digest(b"validators"),
            failed_proposers: Vec::new(),
        }
    }

    fn metric(text: &str, name: &str) -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
            .to_string()
    }

    #[test]
    fn an_admitted_transaction_is_cached_and_block_execution_counts_it_as_a_hit() {
        let (chain, store) = chain();
        let cache = chain.sig_cache().clone();
        let (first, second) = (transfer(1, 0), transfer(2, 0));
        assert_eq!(chain.admit_from_peer(&first.bytes).unwrap(), first.hash);
        assert_eq!(chain.submit(&second.bytes).unwrap(), second.hash);
        assert!(cache.contains(&first.hash) && cache.contains(&second.hash));
        assert_eq!((cache.hits(), cache.misses()), (0, 2));

        let mut app = Ledger::new(store, exec_params(), BlockLimits::NONE)
            .unwrap()
            .with_signature_cache(cache.clone());
        let genesis = app.block(&app.final_tip().1).unwrap().unwrap();
        // On the final tip (the app's long-lived state)...
        let b1 = app
            .build_block(template(&genesis, 1), vec![first], Vec::new())
            .unwrap();
        assert_eq!((cache.hits(), cache.misses()), (1, 2));
        // ...and on a pending parent (a throw-away state over the overlay).
        let b2 = app
            .build_block(template(&b1, 2), vec![second], Vec::new())
            .unwrap();
        assert_eq!((cache.hits(), cache.misses()), (2, 2));
        assert_eq!(app.pending_receipts(&b2.hash()).unwrap().len(), 1);

        // A transaction first seen in a block is a miss, verified and cached there.
        let third = transfer(3, 0);
        app.build_block(template(&b2, 3), vec![third.clone()], Vec::new())
            .unwrap();
        assert_eq!((cache.hits(), cache.misses()), (2, 3));
        assert!(cache.contains(&third.hash));

        let mut registry = Registry::default();
        chain.register_metrics(&mut registry);
        let text = crate::metrics::render(&registry);
        assert_eq!(metric(&text, "keel_sig_cache_hits_total"), "2");
        assert_eq!(metric(&text, "keel_sig_cache_misses_total"), "3");
    }

    #[test]
    fn the_context_exports_the_metrics_of_its_parts_as_they_change() {
        let (chain, _) = chain();
        let mut registry = Registry::default();
        chain.register_metrics(&mut registry);
        let text = crate::metrics::render(&registry);
        for (name, kind, help) in [
            ("keel_block_height", "gauge", "Height of the latest certified block"),
            ("keel_finalized_height", "gauge", "Height of the latest final block"),
            ("keel_epoch", "gauge", "Current consensus epoch"),
            ("keel_mempool_txs", "gauge", "Transactions in the mempool"),
            ("keel_validator_set_cache_hits", "counter", "Validator set lookups served by the per-epoch cache"),
            ("keel_validator_set_cache_misses", "counter", "Validator set lookups that computed the set"),
            ("keel_sig_cache_hits", "counter", "Signature cache lookups that found the transaction already verified (admission, block execution)"),
            ("keel_sig_cache_misses", "counter", "Signature cache lookups that had to verify the transaction (admission, block execution)"),
            ("keel_db_size_bytes", "gauge", "Database size on disk"),
            ("keel_pruned_height", "gauge", "Blocks at or below this height are pruned"),
        ] {
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            let head = format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n");
            assert!(text.contains(&head), "{head} missing from\n{text}");
        }
        assert_eq!(metric(&text, "keel_mempool_txs"), "0");
        assert_eq!(metric(&text, "keel_validator_set_cache_misses_total"), "0");

        // Each scrape reads the parts as they are then.
        for s in 1..=3 {
            chain.submit(&transfer(s, 0).bytes).unwrap();
        }
        chain.validator_set(0).unwrap();
        chain.validator_set(0).unwrap();
        let mut view = ChainView::at_final((5, Hash::digest(b"5")), 2);
        view.tip.latest = (6, Hash::digest(b"6"));
        chain.publish(view);
        let text = crate::metrics::render(&registry);
        for (series, value) in [
            ("keel_block_height", "6"),
            ("keel_finalized_height", "5"),
            ("keel_epoch", "2"),
            ("keel_mempool_txs", "3"),
            ("keel_validator_set_cache_hits_total", "1"),
            ("keel_validator_set_cache_misses_total", "1"),
            ("keel_sig_cache_hits_total", "0"),
            ("keel_sig_cache_misses_total", "3"),
            // A `MemStore` takes no disk.
            ("keel_db_size_bytes", "0"),
            ("keel_pruned_height", "0"),
        ] {
            assert_eq!(metric(&text, series), value, "{series}\n{text}");
        }
    }

    #[test]
    fn a_gossiped_batch_admits_the_valid_transactions_and_refuses_the_bad_ones() {
        let (chain, _) = chain();
        let txs: Vec<Transaction> = (1..=8).map(|s| transfer(s, 0)).collect();
        let mut items: Vec<Vec<u8>> = txs.iter().map(|t| t.bytes.clone()).collect();
        // Item 3: the last byte of the signature flipped (still decodes, bad signature).
        let n = items[3].len();
        items[3][n - 1] ^= 1;
        let bad = Transaction::decode(&items[3]).unwrap();
        // Item 5: not a transaction at all.
        items[5] = b"not a transaction".to_vec();
        // Item 6 again at the end: a duplicate of an admitted one.
        items.push(txs[6].bytes.clone());

        let results = chain.admit_batch_from_peer(&items);
        assert_eq!(results.len(), items.len());
        for i in [0, 1, 2, 4, 6, 7] {
            assert_eq!(results[i].as_ref().unwrap(), &txs[i].hash, "item {i}");
            assert_eq!(chain.tx_status(&txs[i].hash).unwrap(), TxStatus::Pending);
            assert!(chain.sig_cache().contains(&txs[i].hash));
        }
        assert!(matches!(results[3], Err(SubmitError::BadSignature)));
        assert!(!chain.mempool().contains(&bad.hash));
        assert!(!chain.sig_cache().contains(&bad.hash));
        assert!(matches!(results[5], Err(SubmitError::Malformed(_))));
        assert!(matches!(
            results[8],
            Err(SubmitError::Rejected(Rejection::Duplicate))
        ));
        assert_eq!(chain.mempool().len(), 6);
        // Every decodable item was looked up once (the duplicate too: lookups precede the
        // batch's verification); the malformed one never reached verification.
        assert_eq!(
            (chain.sig_cache().hits(), chain.sig_cache().misses()),
            (0, 8)
        );
    }
}
