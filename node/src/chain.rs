//! The chain as the RPC server and the driver share it: storage, state, mempool, the current
//! tip, and the head notifications.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use keel_consensus::{epoch_of_next_block, CacheStats, Validator, ValidatorSet, ValidatorSetCache};
use keel_genesis::Params;
use keel_state::State;
use keel_storage::BlockStore;
use keel_types::{Block, Hash, Header, Transaction};
use tokio::sync::broadcast;

use crate::mempool::{Mempool, Rejection};

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

/// Heights and hashes of the latest and the finalized block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TipInfo {
    /// Latest stored (certified) block.
    pub latest: (u64, Hash),
    /// Latest final block.
    pub finalized: (u64, Hash),
}

/// Where a transaction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The node failed to read state.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a [`Chain`] is made of.
pub struct ChainParts {
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
    /// `memory.limit` in bytes (0: none), for the metrics.
    pub memory_limit: u64,
    /// The tip at start.
    pub tip: TipInfo,
}

/// A certified, not yet final block with what RPC reads of it computed once: its hash and
/// the hashes of its transactions (`tx_status` is polled by wallets and load generators).
struct CertifiedBlock {
    block: Block,
    hash: Hash,
    tx_hashes: std::collections::HashSet<Hash>,
}

/// The shared chain.
pub struct Chain {
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
    /// Validator sets by epoch.
    validator_sets: ValidatorSetCache,
    /// The epoch consensus is in.
    epoch: AtomicU64,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Where transactions submitted over RPC are gossiped (none without networking).
    gossip: std::sync::OnceLock<keel_p2p::NetworkHandle>,
    peers: std::sync::atomic::AtomicUsize,
    syncing: std::sync::atomic::AtomicBool,
    mempool: Mutex<Mempool>,
    tip: RwLock<TipInfo>,
    /// Certified blocks above the final height, by height (the branch consensus extends).
    certified: RwLock<std::collections::BTreeMap<u64, CertifiedBlock>>,
    new_heads: broadcast::Sender<Header>,
    finalized_heads: broadcast::Sender<Header>,
}

impl Chain {
    /// Assembles the shared chain.
    pub fn new(parts: ChainParts) -> Chain {
        Chain {
            chain_id: parts.chain_id,
            node_id: parts.node_id,
            params: parts.params,
            blocks: parts.blocks,
            state: parts.state,
            genesis_validators: parts.validators,
            validator_sets: ValidatorSetCache::new(VALIDATOR_SET_CACHE_EPOCHS),
            epoch: AtomicU64::new(parts.epoch),
            metrics: crate::metrics::Metrics::new(parts.memory_limit),
            gossip: std::sync::OnceLock::new(),
            peers: std::sync::atomic::AtomicUsize::new(0),
            syncing: std::sync::atomic::AtomicBool::new(false),
            mempool: Mutex::new(parts.mempool),
            tip: RwLock::new(parts.tip),
            certified: RwLock::new(std::collections::BTreeMap::new()),
            new_heads: broadcast::channel(HEAD_CHANNEL_CAPACITY).0,
            finalized_heads: broadcast::channel(HEAD_CHANNEL_CAPACITY).0,
        }
    }

    /// The epoch consensus is in (the epoch of the next block to be final).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    pub(crate) fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    pub(crate) fn set_gossip(&self, net: keel_p2p::NetworkHandle) {
        let _ = self.gossip.set(net);
    }

    /// Peer-to-peer bytes so far (zero without networking).
    pub fn p2p_bytes(&self) -> keel_p2p::frame::ByteCounts {
        self.gossip
            .get()
            .map(|n| n.byte_stats())
            .unwrap_or_default()
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
            epoch_validator_set(&self.state, epoch, self.params.epoch_length, &|e| {
                if e == 0 {
                    Ok(self.genesis_validators.clone())
                } else {
                    Ok((*self.validator_set(e)?).clone())
                }
            })
        })
    }

    /// Hits and misses of the validator set cache.
    pub fn validator_set_cache_stats(&self) -> CacheStats {
        self.validator_sets.stats()
    }

    /// Forgets the certified blocks above the final height (the suffix of an ended epoch)
    /// and makes the final tip the latest head again.
    pub(crate) fn reset_to_final(&self) {
        let finalized = self.tip().finalized;
        {
            let mut certified = match self.certified.write() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            certified.clear();
        }
        self.set_latest(finalized.0, finalized.1);
    }

    /// The current tip.
    pub fn tip(&self) -> TipInfo {
        match self.tip.read() {
            Ok(t) => *t,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    pub(crate) fn set_latest(&self, height: u64, hash: Hash) {
        match self.tip.write() {
            Ok(mut t) => t.latest = (height, hash),
            Err(poisoned) => poisoned.into_inner().latest = (height, hash),
        }
    }

    pub(crate) fn set_finalized(&self, height: u64, hash: Hash) {
        match self.tip.write() {
            Ok(mut t) => t.finalized = (height, hash),
            Err(poisoned) => poisoned.into_inner().finalized = (height, hash),
        }
        let mut certified = match self.certified.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        certified.retain(|h, _| *h > height);
    }

    /// Records a newly certified block as the chain's latest head.
    pub(crate) fn set_certified(&self, block: Block) {
        let (height, hash) = (block.header.height, block.hash());
        // Hash outside the lock: readers never wait on it.
        let tx_hashes = block.tx_hashes().into_iter().collect();
        {
            let mut certified = match self.certified.write() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            // A certified block replaces any other at its height and everything above it.
            certified.retain(|h, _| *h < height);
            certified.insert(
                height,
                CertifiedBlock {
                    block,
                    hash,
                    tx_hashes,
                },
            );
        }
        self.set_latest(height, hash);
    }

    /// A certified, not yet final block at `height`.
    pub fn certified_at(&self, height: u64) -> Option<Block> {
        self.certified
            .read()
            .ok()
            .and_then(|c| c.get(&height).map(|b| b.block.clone()))
    }

    /// A certified, not yet final block by hash.
    pub fn certified_by_hash(&self, hash: &Hash) -> Option<Block> {
        self.certified.read().ok().and_then(|c| {
            c.values()
                .find(|b| b.hash == *hash)
                .map(|b| b.block.clone())
        })
    }

    /// The mempool. Held while a block commits, so admission always sees committed nonces.
    pub fn mempool(&self) -> MutexGuard<'_, Mempool> {
        match self.mempool.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
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
    }

    /// Checks and admits a transaction: decode, signature, then the mempool's rules against
    /// the sender's committed account.
    pub fn submit(&self, bytes: &[u8]) -> Result<Hash, SubmitError> {
        let hash = self.admit_from_peer(bytes)?;
        if let Some(net) = self.gossip.get() {
            if let Err(e) = net.publish(keel_p2p::Channel::Transactions, bytes.to_vec()) {
                tracing::debug!(%hash, error = %e, "transaction not gossiped");
            }
        }
        Ok(hash)
    }

    /// Admits a transaction to the mempool without gossiping it (it came from gossip, which
    /// forwards it itself).
    pub fn admit_from_peer(&self, bytes: &[u8]) -> Result<Hash, SubmitError> {
        let tx = Transaction::decode(bytes).map_err(SubmitError::Malformed)?;
        tx.verify_signature()
            .map_err(|_| SubmitError::BadSignature)?;
        let hash = tx.hash;
        let mut pool = self.mempool();
        // Read the account under the mempool lock: the driver commits blocks under it too, so
        // the nonce and balance seen here are those the pool was last pruned against.
        // Admission checks against final state; the mempool tolerates nonce gaps for
        // transactions that certified blocks have already included.
        let height = self.tip().finalized.0;
        let account = self
            .state
            .account(&tx.sender, height)
            .map_err(|e| SubmitError::Internal(e.to_string()))?
            .unwrap_or_default();
        pool.insert(tx, account.nonce, account.balance)?;
        Ok(hash)
    }

    /// Where a transaction stands.
    pub fn tx_status(&self, hash: &Hash) -> Result<TxStatus, keel_storage::Error> {
        if self.mempool().contains(hash) {
            return Ok(TxStatus::Pending);
        }
        if self.blocks.tx_location(hash)?.is_some() {
            return Ok(TxStatus::Finalized);
        }
        let in_certified = self
            .certified
            .read()
            .map(|c| c.values().any(|b| b.tx_hashes.contains(hash)))
            .unwrap_or(false);
        Ok(if in_certified {
            TxStatus::Included
        } else {
            TxStatus::Unknown
        })
    }
}
