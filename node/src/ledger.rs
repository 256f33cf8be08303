//! The ledger: the one block tree of the node. It executes blocks over blocks that are not
//! final yet, keeps them, knows which are certified, and writes them when they are final.
//!
//! Under BFT consensus a block is proposed, re-executed by every validator on its parent's
//! state, certified, and only later final; a certified block can still be abandoned on a
//! fork. [`Ledger`] keeps the blocks above the final tip in memory ("pending"), each with the
//! state-tree nodes its execution staged, and writes a block to the store only when it is
//! final.
//!
//! How a pending block reads its parent's state: the staged batch of every pending block is
//! indexed once into a [`Layer`]; executing on a pending parent reads through an
//! [`OverlayStore`] of the store plus the layers of the parent's pending ancestors, oldest
//! first, with a throw-away [`State`] (so the long-lived `State`'s node cache, which serves
//! executions on the final tip, only ever holds nodes read from the store). Two forks at one
//! height stage different nodes under the same keys; that is harmless because each branch
//! reads only its own ancestors' layers and only the final branch is ever written.
//!
//! Invariants:
//! - Every pending block is a descendant of the final tip, at most [`MAX_PENDING_HEIGHTS`]
//!   above it: blocks further ahead are refused, and [`Ledger::finalize`] drops every pending
//!   block that does not descend from the new final tip. The memory held is therefore bounded
//!   by the heights kept times the forks per height (one proposal per round, which consensus
//!   checks before a block gets here).
//! - A block is written once, when final, in one atomic batch: its state nodes, header, body,
//!   indexes, receipts, the `finalized`/`latest` pointers and its certificate.
//! - Every path that accepts a block (a proposal, a synced block, a block reloaded at a
//!   restart) goes through [`Ledger::validate_block`], which checks the block limits of
//!   genesis ([`BlockLimits`]) before executing anything.
//! - Every pending block is also kept in the consensus column ([`ConsensusStore`]) from the
//!   moment it is accepted until it is final (deleted in the batch that writes it) or
//!   abandoned, so a restarted validator reloads the blocks its votes depend on
//!   ([`Ledger::reload_pending`]).
//! - Everything is synchronous and deterministic: the same blocks give the same roots,
//!   receipts and writes on every node, over `MemStore` or RocksDB.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use keel_state::{Account, BlockEnv, BlockOutcome, ExecParams, FreshNodes, SigCache, State};
use keel_storage::{BlockStore, KvStore, Layer, OverlayStore, WriteBatch};
use keel_types::{
    merkle_root, Address, Block, Evidence, Hash, Header, QuorumCertificate, Receipt, Transaction,
};

use crate::store::ConsensusStore;
use crate::units::allocation_size;
use crate::view::CertifiedBlock;

/// How far above the final tip a pending block may be. A block higher than that is refused
/// ([`LedgerError::Invalid`]): with finality two blocks behind the head, an honest chain never
/// gets near it, and it caps the memory a stalled or lying network can make a node spend.
pub const MAX_PENDING_HEIGHTS: u64 = 256;

/// The size limits of a block (genesis `max_block_txs` and `max_block_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Most transactions in a block.
    pub max_txs: usize,
    /// Most bytes of transactions (their `SignedTx` encodings) in a block.
    pub max_bytes: usize,
}

impl BlockLimits {
    /// No limit: for tests of execution alone.
    pub const NONE: BlockLimits = BlockLimits {
        max_txs: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// The limits of genesis parameters.
    pub fn of(params: &keel_genesis::Params) -> BlockLimits {
        BlockLimits {
            max_txs: usize::try_from(params.max_block_txs).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(params.max_block_bytes).unwrap_or(usize::MAX),
        }
    }
}

/// What consensus decides about a block before it is built: everything in the header except
/// the roots, which execution fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTemplate {
    /// Height: the parent's height plus one.
    pub height: u64,
    /// Consensus round of the proposal.
    pub round: u64,
    /// Epoch of the validator set proposing it.
    pub epoch: u64,
    /// The parent: the final tip or a pending block.
    pub parent_hash: Hash,
    /// The parent's certificate (it must certify `parent_hash`).
    pub parent_qc: QuorumCertificate,
    /// Proposer's clock, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The proposer: receives the fees.
    pub proposer: Address,
    /// Hash of the validator set proposing it.
    pub validators_hash: Hash,
    /// Leaders of the rounds since the parent's certificate that certified no block.
    pub failed_proposers: Vec<Address>,
}

impl From<&keel_consensus::BuildRequest> for BlockTemplate {
    /// The header fields consensus decided in its build request.
    fn from(req: &keel_consensus::BuildRequest) -> BlockTemplate {
        BlockTemplate {
            height: req.height,
            round: req.round,
            epoch: req.epoch,
            parent_hash: req.parent_hash,
            parent_qc: req.parent_qc.clone(),
            timestamp_ms: req.timestamp_ms,
            proposer: req.proposer,
            validators_hash: req.validators_hash,
            failed_proposers: req.failed_proposers.clone(),
        }
    }
}

/// Why a block cannot be built, validated or finalized.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The parent is neither the final tip nor a pending block: fetch it first.
    #[error("unknown parent {0}")]
    UnknownParent(Hash),
    /// Finalizing a block that is neither pending nor stored.
    #[error("unknown block {0}")]
    UnknownBlock(Hash),
    /// The block breaks a rule (the message says which); it is not kept.
    #[error("invalid block: {0}")]
    Invalid(String),
    /// The store holds no chain: genesis must be written before an [`Ledger`] opens it.
    #[error("the store holds no chain: write genesis first")]
    NoGenesis,
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] keel_storage::Error),
    /// The consensus records (pending blocks) could not be read or written.
    #[error(transparent)]
    Records(Box<crate::Error>),
    /// Execution failed (a store failure or corrupt state, never a bad transaction).
    #[error(transparent)]
    State(#[from] keel_state::Error),
}

/// A block [`Ledger::finalize`] has written, with what the node needs to update its mempool
/// and notify subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finalized {
    /// The block.
    pub block: Block,
    /// One receipt per transaction, in block order.
    pub receipts: Vec<Receipt>,
    /// The new nonce of every account the block changed.
    pub new_nonces: Vec<(Address, u64)>,
    /// How long the block's one write batch took to write (`keel_block_commit_seconds`).
    pub commit_time: std::time::Duration,
}

impl LedgerError {
    /// Whether the node must stop: the store failed, so what it accepted may not be durable.
    /// Every other error is about the block.
    pub fn is_fatal(&self) -> bool {
        matches!(self, LedgerError::Storage(_) | LedgerError::Records(_))
    }
}

impl From<crate::Error> for LedgerError {
    fn from(e: crate::Error) -> LedgerError {
        LedgerError::Records(Box::new(e))
    }
}

/// A block's height and the layers of its pending branch, oldest first (none for the
/// final tip).
type BranchView = (u64, Vec<Arc<Layer>>);

/// An executed block above the final tip.
struct Pending {
    block: Arc<Block>,
    receipts: Vec<Receipt>,
    new_nonces: Vec<(Address, u64)>,
    tx_hashes: Vec<Hash>,
    /// The state nodes, root pointer and stale records its execution staged.
    layer: Arc<Layer>,
    /// The upper tree levels it wrote, for the node cache once it is final.
    fresh: Option<FreshNodes>,
    /// Estimated bytes all of the above hold, fixed when it is kept.
    bytes: u64,
}

/// Bytes a list of `receipts` with room for `capacity` holds, at the allocator's size classes.
fn receipts_bytes(capacity: usize, receipts: &[Receipt]) -> u64 {
    receipts.iter().fold(
        allocation_size(capacity * std::mem::size_of::<Receipt>()) as u64,
        |sum, r| {
            let error = r.error.as_ref().map_or(0, String::capacity);
            sum.saturating_add(allocation_size(error) as u64)
        },
    )
}

impl Pending {
    fn new(block: Block, tx_hashes: Vec<Hash>, executed: Executed) -> Self {
        let Executed {
            outcome,
            batch,
            fresh,
        } = executed;
        let mut pending = Pending {
            block: Arc::new(block),
            receipts: outcome.receipts,
            new_nonces: outcome
                .changed
                .iter()
                .map(|(a, acc)| (*a, acc.nonce))
                .collect(),
            tx_hashes,
            layer: Arc::new(Layer::from_batch(&batch)),
            fresh: Some(fresh),
            bytes: 0,
        };
        pending.bytes = pending.memory_bytes();
        pending
    }

    /// Estimated bytes the block, its receipts, its staged state and its fresh nodes hold.
    fn memory_bytes(&self) -> u64 {
        use std::mem::size_of;
        // Each allocation at the allocator's size class. The body holds each transaction's
        // encoded bytes.
        let txs = self.block.txs.iter().fold(
            allocation_size(self.block.txs.capacity() * size_of::<Vec<u8>>()) as u64,
            |sum, tx| sum.saturating_add(allocation_size(tx.capacity()) as u64),
        );
        let receipts = receipts_bytes(self.receipts.capacity(), &self.receipts);
        let lists = allocation_size(self.new_nonces.capacity() * size_of::<(Address, u64)>())
            + allocation_size(self.tx_hashes.capacity() * size_of::<Hash>());
        (allocation_size(size_of::<Block>()) + lists) as u64
            + txs
            + receipts
            + self.layer.memory_bytes()
            + self.fresh.as_ref().map_or(0, FreshNodes::memory_bytes)
    }

    fn height(&self) -> u64 {
        self.block.header.height
    }

    fn parent(&self) -> Hash {
        self.block.header.parent_hash
    }
}

/// Block execution for consensus: builds and validates blocks on the final tip or on pending
/// blocks, keeps them in memory, and writes them when they become final.
pub struct Ledger {
    store: Arc<dyn KvStore>,
    blocks: BlockStore,
    records: ConsensusStore,
    limits: BlockLimits,
    /// Executes on the final tip; its node cache holds only stored nodes.
    state: State,
    params: ExecParams,
    /// Transactions whose signatures are verified, shared with admission (none: verify all).
    sig_cache: Option<Arc<SigCache>>,
    pending: HashMap<Hash, Pending>,
    /// Estimated bytes the pending blocks hold (`keel_memory_used_bytes{consumer="blocks"}`),
    /// set at every change of `pending`.
    pending_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Estimated bytes of the block being executed or written now, outside `pending`: its
    /// decoded transactions while it executes, its records and RocksDB's batch while it is
    /// written. Counted in `pending_bytes` while it lasts.
    in_flight: u64,
    /// Certified pending blocks by height: the branch consensus extends, as RPC shows it.
    certified: std::collections::BTreeMap<u64, Arc<CertifiedBlock>>,
    final_tip: (u64, Hash),
}

impl Ledger {
    /// Opens over a store whose genesis is already written; the last stored block
    /// (`BlockStore::latest`) is the final tip.
    pub fn new(
        store: Arc<dyn KvStore>,
        params: ExecParams,
        limits: BlockLimits,
    ) -> Result<Ledger, LedgerError> {
        let blocks = BlockStore::new(store.clone());
        let final_tip = blocks.latest()?.ok_or(LedgerError::NoGenesis)?;
        Ok(Ledger {
            state: State::new(store.clone(), params.clone()),
            records: ConsensusStore::new(store.clone()),
            store,
            blocks,
            limits,
            params,
            sig_cache: None,
            pending: HashMap::new(),
            pending_bytes: Arc::default(),
            in_flight: 0,
            certified: std::collections::BTreeMap::new(),
            final_tip,
        })
    }

    /// The state tree's node cache (the memory governor resizes it).
    pub fn node_cache(&self) -> Arc<keel_state::NodeCache> {
        self.state.tree().node_cache()
    }

    /// Estimated bytes the pending (not yet final) blocks hold in memory: their bodies,
    /// receipts, staged state and new tree nodes, and while a block executes or is written,
    /// what that holds besides. Updated as blocks are kept, executed, finalized and dropped;
    /// the memory governor reads it.
    pub fn pending_memory(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.pending_bytes.clone()
    }

    /// Counts `bytes` as the block in flight (0: none) in the pending figure.
    fn set_in_flight(&mut self, bytes: u64) {
        self.in_flight = bytes;
        self.account_pending();
    }

    fn account_pending(&self) {
        // A certified block shares its body with its pending entry; its transaction-hash set
        // is its own (hashbrown: a hash and a control byte per bucket).
        let certified = self.certified.values().fold(0u64, |sum, c| {
            let buckets = c.tx_hashes.capacity().saturating_mul(8) / 7;
            sum.saturating_add(allocation_size(buckets * (std::mem::size_of::<Hash>() + 1)) as u64)
        });
        let bytes = self
            .pending
            .values()
            .fold(certified.saturating_add(self.in_flight), |sum, p| {
                sum.saturating_add(p.bytes)
            });
        self.pending_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets every block execution skip verifying the signatures of transactions in `cache`
    /// and add those it verifies. The verdict on a signature does not depend on how it was
    /// checked (see `keel_state`'s signatures module), so this changes speed, never outcomes.
    pub fn with_signature_cache(self, cache: Arc<SigCache>) -> Ledger {
        Ledger {
            state: self.state.with_signature_cache(cache.clone()),
            sig_cache: Some(cache),
            ..self
        }
    }

    /// Height and hash of the final tip: the newest block written to the store.
    pub fn final_tip(&self) -> (u64, Hash) {
        self.final_tip
    }

    /// The block limits validation enforces.
    pub fn limits(&self) -> BlockLimits {
        self.limits
    }

    /// Number of pending (executed, not yet final) blocks.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the block is known: pending here or final in the store. A store failure
    /// answers `false`.
    pub fn has_block(&self, hash: &Hash) -> bool {
        self.pending.contains_key(hash)
            || *hash == self.final_tip.1
            || matches!(self.blocks.header_by_hash(hash), Ok(Some(_)))
    }

    /// The block with hash `hash`, pending or stored.
    pub fn block(&self, hash: &Hash) -> Result<Option<Block>, LedgerError> {
        match self.pending.get(hash) {
            Some(p) => Ok(Some((*p.block).clone())),
            None => Ok(self.blocks.block_by_hash(hash)?),
        }
    }

    /// The receipts of a pending block (`None` if it is not pending).
    pub fn pending_receipts(&self, hash: &Hash) -> Option<&[Receipt]> {
        self.pending.get(hash).map(|p| p.receipts.as_slice())
    }

    /// The account of `addr` in the state after block `at` (pending, or stored and not
    /// pruned), as stored: see [`Account::release_matured`] for matured unbonding.
    pub fn account(&self, at: &Hash, addr: &Address) -> Result<Option<Account>, LedgerError> {
        if let Some((height, layers)) = self.branch(at)? {
            return Ok(self.state_over(layers).account(addr, height)?);
        }
        match self.blocks.header_by_hash(at)? {
            Some(header) => Ok(self.state.account(addr, header.height)?),
            None => Err(LedgerError::UnknownBlock(*at)),
        }
    }

    /// Hashes of the transactions of `parent` and of its pending ancestors (the blocks not
    /// final yet on that branch), so a proposer does not select them again. Empty when
    /// `parent` is final or unknown.
    pub fn branch_tx_hashes(&self, parent: &Hash) -> HashSet<Hash> {
        let mut out = HashSet::new();
        let mut cur = *parent;
        while let Some(p) = self.pending.get(&cur) {
            out.extend(p.tx_hashes.iter().copied());
            cur = p.parent();
        }
        out
    }

    /// Executes `txs` and `evidence` on `template.parent_hash` (the final tip or a pending
    /// block) and assembles the block: `tx_root` ([`merkle_root`] of the transaction hashes),
    /// `evidence_root` ([`Block::evidence_root`]) and `state_root` filled in, `chain_id` from
    /// the parameters. The block is kept pending and returned.
    pub fn build_block(
        &mut self,
        template: BlockTemplate,
        txs: Vec<Transaction>,
        evidence: Vec<Evidence>,
    ) -> Result<Block, LedgerError> {
        self.set_in_flight(transactions_bytes(&txs));
        let built = self.build_block_in_flight(template, txs, evidence);
        self.set_in_flight(0);
        built
    }

    fn build_block_in_flight(
        &mut self,
        template: BlockTemplate,
        txs: Vec<Transaction>,
        evidence: Vec<Evidence>,
    ) -> Result<Block, LedgerError> {
        let (parent_height, layers) = self.parent_view(&template.parent_hash)?;
        self.check_position(
            template.height,
            parent_height,
            &template.parent_hash,
            &template.parent_qc,
        )?;
        let env = BlockEnv {
            height: template.height,
            proposer: template.proposer,
            evidence: evidence.clone(),
        };
        let executed = self.execute(layers, &env, &txs)?;
        self.set_in_flight(self.in_flight.saturating_add(executed.memory_bytes()));
        let tx_hashes: Vec<Hash> = txs.iter().map(|t| t.hash).collect();
        let mut block = Block {
            header: Header {
                chain_id: self.params.chain_id.clone(),
                height: template.height,
                round: template.round,
                epoch: template.epoch,
                parent_hash: template.parent_hash,
                timestamp_ms: template.timestamp_ms,
                proposer: template.proposer,
                tx_root: merkle_root(&tx_hashes),
                state_root: executed.outcome.state_root,
                validators_hash: template.validators_hash,
                parent_qc: template.parent_qc,
                evidence_root: Hash::ZERO,
                failed_proposers: template.failed_proposers,
            },
            txs: txs.into_iter().map(|t| t.bytes).collect(),
            evidence,
        };
        block.header.evidence_root = block.evidence_root();
        tracing::debug!(
            height = block.header.height,
            txs = block.txs.len(),
            root = %block.header.state_root,
            "built block"
        );
        self.keep(block.clone(), tx_hashes, executed)?;
        Ok(block)
    }

    /// Keeps an executed block pending, in memory and in the consensus records.
    fn keep(
        &mut self,
        block: Block,
        tx_hashes: Vec<Hash>,
        executed: Executed,
    ) -> Result<(), LedgerError> {
        self.records.put_pending(&block)?;
        self.pending
            .insert(block.hash(), Pending::new(block, tx_hashes, executed));
        // The block in flight is now a pending one: count it once.
        self.set_in_flight(0);
        Ok(())
    }

    /// Re-executes a block proposed by someone else on its parent and keeps it pending if it
    /// holds. Checks, in order: the parent is known ([`LedgerError::UnknownParent`]), the chain
    /// id, height = parent height + 1 and at most [`MAX_PENDING_HEIGHTS`] above the final
    /// tip, that `parent_qc` certifies the parent, the block limits, that every transaction
    /// decodes, the
    /// `tx_root`, the `evidence_root`, and the `state_root` against re-execution. A block
    /// already known (pending or stored) is accepted at once.
    ///
    /// What consensus checks (proposer, round, timestamp, validator set, certificate and
    /// evidence signatures) is not checked here.
    pub fn validate_block(&mut self, block: &Block) -> Result<(), LedgerError> {
        let validated = self.validate_block_in_flight(block);
        self.set_in_flight(0);
        validated
    }

    fn validate_block_in_flight(&mut self, block: &Block) -> Result<(), LedgerError> {
        let hash = block.hash();
        if self.has_block(&hash) {
            return Ok(());
        }
        let header = &block.header;
        let (parent_height, layers) = self.parent_view(&header.parent_hash)?;
        if header.chain_id != self.params.chain_id {
            return Err(LedgerError::Invalid(format!(
                "chain id {:?}, expected {:?}",
                header.chain_id, self.params.chain_id
            )));
        }
        self.check_position(
            header.height,
            parent_height,
            &header.parent_hash,
            &header.parent_qc,
        )?;
        let bytes: usize = block.txs.iter().map(Vec::len).sum();
        if block.txs.len() > self.limits.max_txs || bytes > self.limits.max_bytes {
            return Err(LedgerError::Invalid(format!(
                "{} transactions of {bytes} bytes exceed the block limits ({} transactions, {} bytes)",
                block.txs.len(),
                self.limits.max_txs,
                self.limits.max_bytes
            )));
        }
        let txs = block
            .txs
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                Transaction::decode(bytes)
                    .map_err(|e| LedgerError::Invalid(format!("transaction {i}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.set_in_flight(transactions_bytes(&txs));
        let tx_hashes: Vec<Hash> = txs.iter().map(|t| t.hash).collect();
        let tx_root = merkle_root(&tx_hashes);
        if tx_root != header.tx_root {
            return Err(LedgerError::Invalid(format!(
                "tx root {}, transactions give {tx_root}",
                header.tx_root
            )));
        }
        let evidence_root = block.evidence_root();
        if evidence_root != header.evidence_root {
            return Err(LedgerError::Invalid(format!(
                "evidence root {}, evidence gives {evidence_root}",
                header.evidence_root
            )));
        }
        let env = BlockEnv {
            height: header.height,
            proposer: header.proposer,
            evidence: block.evidence.clone(),
        };
        let executed = self.execute(layers, &env, &txs)?;
        self.set_in_flight(self.in_flight.saturating_add(executed.memory_bytes()));
        if executed.outcome.state_root != header.state_root {
            return Err(LedgerError::Invalid(format!(
                "state root {}, execution gives {}",
                header.state_root, executed.outcome.state_root
            )));
        }
        tracing::debug!(height = header.height, %hash, txs = txs.len(), "validated block");
        self.keep(block.clone(), tx_hashes, executed)
    }

    /// The blocks kept pending by a previous run, re-validated oldest first: those that still
    /// hold are pending again and returned (for consensus); the others are forgotten.
    pub fn reload_pending(&mut self) -> Result<Vec<Block>, LedgerError> {
        let mut valid = Vec::new();
        let mut gone = Vec::new();
        for block in self.records.pending_blocks()? {
            match self.validate_block(&block) {
                Ok(()) if self.pending.contains_key(&block.hash()) => valid.push(block),
                Ok(()) => gone.push(block.hash()),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    tracing::debug!(height = block.header.height, error = %e, "dropping a kept block");
                    gone.push(block.hash());
                }
            }
        }
        self.records.delete_pending(gone)?;
        Ok(valid)
    }

    /// Marks a pending block certified: it replaces any certified block at its height and
    /// above. Returns its header (`None` if the block is not pending).
    pub fn mark_certified(&mut self, hash: &Hash) -> Option<Header> {
        let p = self.pending.get(hash)?;
        let height = p.height();
        let entry = CertifiedBlock {
            block: p.block.clone(),
            hash: *hash,
            tx_hashes: p.tx_hashes.iter().copied().collect(),
        };
        self.certified.retain(|h, _| *h < height);
        self.certified.insert(height, Arc::new(entry));
        self.account_pending();
        Some(p.block.header.clone())
    }

    /// The certified pending blocks by height.
    pub fn certified(&self) -> &std::collections::BTreeMap<u64, Arc<CertifiedBlock>> {
        &self.certified
    }

    /// Every pending block, by hash.
    pub fn pending_blocks(&self) -> impl Iterator<Item = (&Hash, &Arc<Block>)> {
        self.pending.iter().map(|(h, p)| (h, &p.block))
    }

    /// Makes `hash` and every pending ancestor of it final, oldest first: each is written as
    /// one atomic batch holding its state nodes, `BlockStore::stage_block` (block, indexes,
    /// receipts, `latest`), `stage_finalized` and meta `latest_qc` = its certificate (`qc`
    /// for `hash`, which must certify it; for an ancestor, the `parent_qc` in its child's
    /// header). Then every pending block that does not descend from the new final tip is
    /// dropped. Returns what was written, oldest first.
    ///
    /// Finalizing the final tip or a block already stored (an ancestor of it) does nothing
    /// and returns an empty list; a hash neither pending nor stored is
    /// [`LedgerError::UnknownBlock`]. If a write fails, the blocks written before it stay final
    /// (the final tip says how far it got) and the error is returned.
    pub fn finalize(
        &mut self,
        hash: &Hash,
        qc: &QuorumCertificate,
    ) -> Result<Vec<Finalized>, LedgerError> {
        if *hash == self.final_tip.1 {
            return Ok(Vec::new());
        }
        let Some(newest) = self.pending.get(hash) else {
            return match self.blocks.header_by_hash(hash)? {
                Some(_) => Ok(Vec::new()),
                None => Err(LedgerError::UnknownBlock(*hash)),
            };
        };
        if qc.block_hash != *hash || qc.height != newest.height() {
            return Err(LedgerError::Invalid(format!(
                "certificate of block {} at height {} cannot finalize block {hash} at height {}",
                qc.block_hash,
                qc.height,
                newest.height()
            )));
        }
        // The branch from the oldest pending ancestor to `hash`, each with its certificate.
        let mut branch: Vec<(Hash, QuorumCertificate)> = vec![(*hash, qc.clone())];
        let mut cur = newest;
        while cur.parent() != self.final_tip.1 {
            let parent = cur.parent();
            let certificate = cur.block.header.parent_qc.clone();
            cur = self
                .pending
                .get(&parent)
                .ok_or(LedgerError::UnknownParent(parent))?;
            branch.push((parent, certificate));
        }
        branch.reverse();

        let mut written = Vec::with_capacity(branch.len());
        let mut failure = None;
        for (block_hash, certificate) in branch {
            if let Err(e) = self.write_final(&block_hash, &certificate, &mut written) {
                failure = Some(e);
                break;
            }
        }
        let dropped = self.drop_abandoned();
        self.account_pending();
        match failure {
            Some(e) => Err(e),
            None => {
                self.records.delete_pending(dropped)?;
                Ok(written)
            }
        }
    }

    /// Writes one pending block whose parent is the final tip; it becomes the final tip.
    fn write_final(
        &mut self,
        hash: &Hash,
        qc: &QuorumCertificate,
        written: &mut Vec<Finalized>,
    ) -> Result<(), LedgerError> {
        let pending = self
            .pending
            .get(hash)
            .ok_or(LedgerError::UnknownBlock(*hash))?;
        let height = pending.height();
        // The block's records; its state changes go from its layer straight into the
        // engine's batch ahead of them (`write_layer`: one atomic write, no copy of the
        // layer into a batch first).
        let mut batch = WriteBatch::new();
        self.blocks
            .stage_block(&mut batch, &pending.block, &pending.receipts);
        self.blocks.stage_finalized(&mut batch, height, *hash);
        self.records.stage_latest_qc(&mut batch, qc);
        self.records.stage_delete_pending(&mut batch, [*hash]);
        self.in_flight = commit_bytes(&batch, &pending.layer);
        self.account_pending();
        let writing = std::time::Instant::now();
        let write = self.store.write_layer(&pending.layer, batch);
        self.set_in_flight(0);
        write?;
        let commit_time = writing.elapsed();
        self.final_tip = (height, *hash);
        self.certified.retain(|h, _| *h > height);
        if let Some(mut p) = self.pending.remove(hash) {
            if let Some(fresh) = p.fresh.take() {
                self.state.tree().cache_committed(fresh);
            }
            tracing::debug!(height, %hash, txs = p.block.txs.len(), "finalized block");
            written.push(Finalized {
                block: Arc::unwrap_or_clone(p.block),
                receipts: p.receipts,
                new_nonces: p.new_nonces,
                commit_time,
            });
        }
        Ok(())
    }

    /// Drops every pending block: at the start of an epoch, the suffix blocks of the last
    /// one (never final, see `docs/consensus.md`). Returns how many were dropped.
    pub fn discard_pending(&mut self) -> Result<usize, LedgerError> {
        let dropped = self.pending.len();
        self.records
            .delete_pending(self.pending.drain().map(|(hash, _)| hash))?;
        self.account_pending();
        self.certified.clear();
        Ok(dropped)
    }

    /// Drops every pending block that does not descend from the final tip; returns their
    /// hashes.
    fn drop_abandoned(&mut self) -> Vec<Hash> {
        let (tip_height, tip_hash) = self.final_tip;
        let mut by_height: Vec<(u64, Hash, Hash)> = self
            .pending
            .iter()
            .map(|(h, p)| (p.height(), *h, p.parent()))
            .collect();
        // Parents before children, so one pass decides every block.
        by_height.sort();
        let mut keep = HashSet::from([tip_hash]);
        for (height, hash, parent) in by_height {
            if height > tip_height && keep.contains(&parent) {
                keep.insert(hash);
            }
        }
        let dropped: Vec<Hash> = self
            .pending
            .keys()
            .filter(|h| !keep.contains(*h))
            .copied()
            .collect();
        for h in &dropped {
            self.pending.remove(h);
        }
        if !dropped.is_empty() {
            tracing::debug!(
                dropped = dropped.len(),
                "dropped pending blocks abandoned by finality"
            );
        }
        dropped
    }

    /// The height of `hash` and the layers of its pending branch (oldest first) if it is the
    /// final tip (no layers) or pending; `None` otherwise.
    fn branch(&self, hash: &Hash) -> Result<Option<BranchView>, LedgerError> {
        if *hash == self.final_tip.1 {
            return Ok(Some((self.final_tip.0, Vec::new())));
        }
        let Some(block) = self.pending.get(hash) else {
            return Ok(None);
        };
        let mut layers = vec![block.layer.clone()];
        let mut cur = block.parent();
        while cur != self.final_tip.1 {
            // Every pending block descends from the final tip (`drop_abandoned`), so this
            // walk ends; a gap would be a bug, reported rather than looped on.
            let ancestor = self
                .pending
                .get(&cur)
                .ok_or(LedgerError::UnknownParent(cur))?;
            layers.push(ancestor.layer.clone());
            cur = ancestor.parent();
        }
        layers.reverse();
        Ok(Some((block.height(), layers)))
    }

    /// [`Ledger::branch`] of a block's parent: a parent that is stored but not the final tip is
    /// a fork off a final block and is refused.
    fn parent_view(&self, parent: &Hash) -> Result<BranchView, LedgerError> {
        if let Some(view) = self.branch(parent)? {
            return Ok(view);
        }
        match self.blocks.header_by_hash(parent)? {
            Some(header) => Err(LedgerError::Invalid(format!(
                "parent {parent} at height {} is final but not the final tip {}",
                header.height, self.final_tip.1
            ))),
            None => Err(LedgerError::UnknownParent(*parent)),
        }
    }

    /// Height and certificate checks of a block on a parent at `parent_height`.
    fn check_position(
        &self,
        height: u64,
        parent_height: u64,
        parent_hash: &Hash,
        parent_qc: &QuorumCertificate,
    ) -> Result<(), LedgerError> {
        if Some(height) != parent_height.checked_add(1) {
            return Err(LedgerError::Invalid(format!(
                "height {height} does not follow its parent's height {parent_height}"
            )));
        }
        if height.saturating_sub(self.final_tip.0) > MAX_PENDING_HEIGHTS {
            return Err(LedgerError::Invalid(format!(
                "height {height} is more than {MAX_PENDING_HEIGHTS} above the final height {}",
                self.final_tip.0
            )));
        }
        if parent_qc.block_hash != *parent_hash || parent_qc.height != parent_height {
            return Err(LedgerError::Invalid(format!(
                "parent certificate is for block {} at height {}, not the parent {parent_hash}",
                parent_qc.block_hash, parent_qc.height
            )));
        }
        Ok(())
    }

    /// A `State` reading the store through `layers`; the main one when there are none.
    fn state_over(&self, layers: Vec<Arc<Layer>>) -> StateRef<'_> {
        if layers.is_empty() {
            return StateRef::Main(&self.state);
        }
        let view = OverlayStore::new(self.store.clone(), layers);
        // Nodes up to the final height are committed: read them through the main state's
        // cache (and warm it); the overlay's own, newer nodes are never cached.
        let state = State::with_shared_node_cache(
            Arc::new(view),
            self.params.clone(),
            self.state.tree().node_cache(),
            self.final_tip().0,
        );
        StateRef::Branch(Box::new(match &self.sig_cache {
            Some(cache) => state.with_signature_cache(cache.clone()),
            None => state,
        }))
    }

    /// Executes a block on the state the layers describe.
    fn execute(
        &self,
        layers: Vec<Arc<Layer>>,
        env: &BlockEnv,
        txs: &[Transaction],
    ) -> Result<Executed, LedgerError> {
        let state = self.state_over(layers);
        let execution = state.execute(env, txs)?;
        // What the execution holds counts while it is staged; the staged batch and the new
        // nodes count from when the caller has them until the block is kept.
        let _staging = Counted::new(&self.pending_bytes, execution.memory_bytes());
        let mut batch = WriteBatch::new();
        let (outcome, fresh) = state.stage_fresh(execution, &mut batch)?;
        Ok(Executed {
            outcome,
            batch,
            fresh,
        })
    }
}

/// A block executed on its parent's state, not yet kept.
struct Executed {
    outcome: BlockOutcome,
    /// The staged state version.
    batch: WriteBatch,
    /// Its upper tree levels, for the node cache once the block is final.
    fresh: FreshNodes,
}

impl Executed {
    /// Estimated bytes it holds until it is kept: the receipts and changed accounts, the
    /// staged batch and the new upper tree nodes.
    fn memory_bytes(&self) -> u64 {
        let changed = allocation_size(
            self.outcome.changed.capacity() * std::mem::size_of::<(Address, Account)>(),
        ) as u64;
        receipts_bytes(self.outcome.receipts.capacity(), &self.outcome.receipts)
            .saturating_add(changed)
            .saturating_add(self.batch.memory_bytes())
            .saturating_add(self.fresh.memory_bytes())
    }
}

/// Bytes added to a memory figure for as long as this lives.
struct Counted<'a> {
    figure: &'a std::sync::atomic::AtomicU64,
    bytes: u64,
}

impl<'a> Counted<'a> {
    fn new(figure: &'a std::sync::atomic::AtomicU64, bytes: u64) -> Counted<'a> {
        figure.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Counted { figure, bytes }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .figure
            .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_sub(self.bytes)));
    }
}

/// The long-lived state (final-tip executions, cached) or a throw-away one over an overlay.
enum StateRef<'a> {
    Main(&'a State),
    Branch(Box<State>),
}

impl std::ops::Deref for StateRef<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        match self {
            StateRef::Main(s) => s,
            StateRef::Branch(s) => s,
        }
    }
}

/// Bytes decoded transactions hold (the list and each one's bytes and chain id), at the
/// allocator's size classes.
fn transactions_bytes(txs: &[Transaction]) -> u64 {
    txs.iter().fold(
        allocation_size(std::mem::size_of_val(txs)) as u64,
        |sum, tx| {
            sum.saturating_add(
                (allocation_size(tx.bytes.capacity()) + allocation_size(tx.chain_id.capacity()))
                    as u64,
            )
        },
    )
}

/// Bytes a block's write holds while it lasts: the records staged for it (each key and value
/// an allocation of its own, in a list of operations) and the engine's batch, one buffer with
/// a copy of those records and of the block's staged state (`layer`).
fn commit_bytes(batch: &WriteBatch, layer: &Layer) -> u64 {
    let staged = batch.size_bytes() + batch.len() * (std::mem::size_of::<keel_storage::Op>() + 32);
    (allocation_size(staged) + allocation_size(batch.serialized_bytes(Some(layer)))) as u64
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;

    use keel_storage::{Column, Direction, KvIter, MemStore};
    use keel_types::{Keypair, TxKind};

    use super::*;

    const CHAIN: &str = "app-test";
    const FEE: u64 = 10;
    const FUNDS: u64 = 1_000_000;

    pub(crate) fn params() -> ExecParams {
        ExecParams {
            chain_id: CHAIN.into(),
            min_fee: FEE,
            unbonding_period: 5,
            slash_fraction_ppm: 100_000,
        }
    }

    /// Senders 1..=3 funded; 9 proposes.
    fn key(seed: u64) -> Keypair {
        Keypair::from_seed(seed)
    }

    pub(crate) fn addr(seed: u64) -> Address {
        key(seed).address()
    }

    /// A store holding only genesis, as `Node` writes it; returns the genesis hash.
    fn genesis(store: &Arc<dyn KvStore>) -> Hash {
        let accounts: Vec<(Address, Account)> = (1..=3).map(|s| (addr(s), funded(FUNDS))).collect();
        write_genesis(store, params(), &accounts)
    }

    pub(crate) fn funded(balance: u64) -> Account {
        Account {
            balance,
            ..Account::default()
        }
    }

    /// Writes, as final, a genesis block of `params.chain_id` holding `accounts` (no
    /// validators), and returns its hash.
    pub(crate) fn write_genesis(
        store: &Arc<dyn KvStore>,
        params: ExecParams,
        accounts: &[(Address, Account)],
    ) -> Hash {
        let chain_id = params.chain_id.clone();
        let state = State::new(store.clone(), params);
        let blocks = BlockStore::new(store.clone());
        let mut batch = WriteBatch::new();
        let root = state.init_genesis(accounts, &[], &mut batch).unwrap();
        let block = Block {
            header: Header {
                chain_id,
                state_root: root,
                ..Header::default()
            },
            txs: Vec::new(),
            evidence: Vec::new(),
        };
        let hash = block.hash();
        blocks.stage_block(&mut batch, &block, &[]);
        blocks.stage_finalized(&mut batch, 0, hash);
        store.write(batch).unwrap();
        hash
    }

    pub(crate) fn new_app() -> (Ledger, Arc<dyn KvStore>, Hash) {
        let store: Arc<dyn KvStore> = Arc::new(MemStore::new());
        let g = genesis(&store);
        (
            Ledger::new(store.clone(), params(), BlockLimits::NONE).unwrap(),
            store,
            g,
        )
    }

    pub(crate) fn qc(hash: Hash, height: u64, round: u64) -> QuorumCertificate {
        QuorumCertificate {
            block_hash: hash,
            height,
            round,
            signatures: Vec::new(),
        }
    }

    fn template(parent: Hash, parent_height: u64, round: u64) -> BlockTemplate {
        BlockTemplate {
            height: parent_height + 1,
            round,
            epoch: 0,
            parent_hash: parent,
            parent_qc: qc(parent, parent_height, round.saturating_sub(1)),
            timestamp_ms: 1_000 * round,
            proposer: addr(9),
            validators_hash: Hash::digest(b"validators"),
            failed_proposers: Vec::new(),
        }
    }

    pub(crate) fn transfer(from: u64, nonce: u64, to: u64, amount: u64) -> Transaction {
        Transaction::sign(
            &key(from),
            CHAIN,
            nonce,
            FEE,
            TxKind::Transfer {
                to: addr(to),
                amount,
            },
        )
    }

    /// Builds a block of `txs` on `parent` (a block of this app) in `round`.
    pub(crate) fn build(
        app: &mut Ledger,
        parent: &Block,
        round: u64,
        txs: Vec<Transaction>,
    ) -> Block {
        let t = template(parent.hash(), parent.header.height, round);
        app.build_block(t, txs, Vec::new()).unwrap()
    }

    fn balance(app: &Ledger, at: &Block, seed: u64) -> u64 {
        app.account(&at.hash(), &addr(seed))
            .unwrap()
            .map_or(0, |a| a.balance)
    }

    /// Genesis and a chain of three pending blocks:
    /// b1: 1 -> 2 100; b2: 1 -> 3 200, 2 -> 3 50; b3: 3 -> 1 1000.
    fn three_blocks(app: &mut Ledger, g: Hash) -> (Block, [Block; 3]) {
        let genesis = app.block(&g).unwrap().unwrap();
        let b1 = build(app, &genesis, 1, vec![transfer(1, 0, 2, 100)]);
        let b2 = build(
            app,
            &b1,
            2,
            vec![transfer(1, 1, 3, 200), transfer(2, 0, 3, 50)],
        );
        let b3 = build(app, &b2, 3, vec![transfer(3, 0, 1, 1_000)]);
        (genesis, [b1, b2, b3])
    }

    #[test]
    fn pending_blocks_execute_on_their_pending_ancestors() {
        let (mut app, store, g) = new_app();
        let (genesis, [b1, b2, b3]) = three_blocks(&mut app, g);
        assert_eq!(app.pending_len(), 3);
        assert_eq!(app.final_tip(), (0, g));

        assert_eq!(balance(&app, &genesis, 1), FUNDS);
        assert_eq!(balance(&app, &b1, 1), FUNDS - 110);
        assert_eq!(balance(&app, &b1, 2), FUNDS + 100);
        assert_eq!(balance(&app, &b2, 1), FUNDS - 320);
        assert_eq!(balance(&app, &b2, 2), FUNDS + 40);
        assert_eq!(balance(&app, &b2, 3), FUNDS + 250);
        assert_eq!(balance(&app, &b3, 3), FUNDS + 250 - 1_010);
        assert_eq!(balance(&app, &b3, 1), FUNDS - 320 + 1_000);
        assert_eq!(balance(&app, &b3, 9), 4 * FEE);
        let nonce = |b: &Block, s| app.account(&b.hash(), &addr(s)).unwrap().unwrap().nonce;
        assert_eq!((nonce(&b3, 1), nonce(&b3, 2), nonce(&b3, 3)), (2, 1, 1));
        for b in [&b1, &b2, &b3] {
            let receipts = app.pending_receipts(&b.hash()).unwrap();
            assert_eq!(receipts.len(), b.txs.len());
            assert!(receipts
                .iter()
                .all(|r| r.success && r.height == b.header.height));
            assert_eq!(b.header.tx_root, merkle_root(&b.tx_hashes()));
            assert_eq!(b.header.evidence_root, b.evidence_root());
            assert_eq!(b.header.chain_id, CHAIN);
            assert!(app.has_block(&b.hash()));
            assert_eq!(app.block(&b.hash()).unwrap().as_ref(), Some(b));
        }
        // Nothing reached the store.
        let fresh = State::new(store.clone(), params());
        assert!(fresh.root(1).is_err());
        assert_eq!(BlockStore::new(store).latest().unwrap(), Some((0, g)));
    }

    #[test]
    fn another_node_validates_the_blocks_and_reaches_the_same_roots() {
        let (mut app, _, g) = new_app();
        let (_, blocks) = three_blocks(&mut app, g);
        let (mut other, _, g2) = new_app();
        assert_eq!(g, g2);
        for b in &blocks {
            other.validate_block(b).unwrap();
            // Idempotent.
            other.validate_block(b).unwrap();
        }
        assert_eq!(other.pending_len(), 3);
        for b in &blocks {
            assert_eq!(
                other.pending_receipts(&b.hash()),
                app.pending_receipts(&b.hash())
            );
            for s in [1, 2, 3, 9] {
                assert_eq!(balance(&other, b, s), balance(&app, b, s));
            }
        }
        // Both finalize to identical stores' state.
        let last = &blocks[2];
        let cert = qc(last.hash(), 3, 3);
        app.finalize(&last.hash(), &cert).unwrap();
        other.finalize(&last.hash(), &cert).unwrap();
        for s in [1, 2, 3, 9] {
            assert_eq!(balance(&other, last, s), balance(&app, last, s));
        }
    }

    /// Validation is the one door for proposals, synced blocks and blocks reloaded at a
    /// restart: a block over the genesis limits is refused there, whatever brought it, and
    /// is not kept (not even in the consensus records a restart reloads).
    #[test]
    fn blocks_over_the_limits_are_refused_on_every_path() {
        let (mut app, _, g) = new_app();
        let (_, [_, b2, _]) = three_blocks(&mut app, g);
        let (b1, b2_bytes) = (
            app.block(&b2.header.parent_hash).unwrap().unwrap(),
            b2.txs.iter().map(Vec::len).sum::<usize>(),
        );
        for limits in [
            BlockLimits {
                max_txs: 1,
                max_bytes: usize::MAX,
            },
            BlockLimits {
                max_txs: usize::MAX,
                max_bytes: b2_bytes - 1,
            },
        ] {
            let store: Arc<dyn KvStore> = Arc::new(MemStore::new());
            genesis(&store);
            let mut strict = Ledger::new(store.clone(), params(), limits).unwrap();
            strict.validate_block(&b1).unwrap();
            let err = strict.validate_block(&b2).unwrap_err();
            assert!(
                matches!(&err, LedgerError::Invalid(m) if m.contains("exceed the block limits")),
                "{err}"
            );
            assert!(!strict.has_block(&b2.hash()));
            let kept = ConsensusStore::new(store).pending_blocks().unwrap();
            assert_eq!(kept, vec![b1.clone()], "only the valid block is kept");
        }
    }

    #[test]
    fn tampered_blocks_are_refused_and_not_kept() {
        let (mut app, _, g) = new_app();
        let (_, [b1, ..]) = three_blocks(&mut app, g);
        let (mut other, _, _) = new_app();
        let refused = |other: &mut Ledger, b: Block| {
            let err = other.validate_block(&b).unwrap_err();
            assert!(!other.has_block(&b.hash()), "{err} kept");
            err
        };

        let mut bad = b1.clone();
        bad.header.state_root = Hash::digest(b"wrong");
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("state root"))
        );

        let mut bad = b1.clone();
        bad.header.tx_root = Hash::digest(b"wrong");
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("tx root"))
        );

        // Transactions changed under an unchanged header.
        let mut bad = b1.clone();
        bad.txs = vec![transfer(1, 0, 3, 100).bytes];
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("tx root"))
        );

        let mut bad = b1.clone();
        bad.txs.push(vec![0xde, 0xad]);
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("transaction 1"))
        );

        let mut bad = b1.clone();
        bad.header.evidence_root = Hash::digest(b"wrong");
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("evidence root"))
        );

        let mut bad = b1.clone();
        bad.header.chain_id = "other-chain".into();
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("chain id"))
        );

        let mut bad = b1.clone();
        bad.header.height = 2;
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("height"))
        );

        let mut bad = b1.clone();
        bad.header.parent_qc.block_hash = Hash::digest(b"elsewhere");
        assert!(
            matches!(refused(&mut other, bad), LedgerError::Invalid(m) if m.contains("certificate"))
        );

        let mut bad = b1.clone();
        bad.header.parent_hash = Hash::digest(b"unknown parent");
        assert!(matches!(
            refused(&mut other, bad),
            LedgerError::UnknownParent(_)
        ));

        // A child of a block the node has not seen.
        let (_, [_, c2, _]) = three_blocks(&mut new_app().0, g);
        assert!(matches!(refused(&mut other, c2), LedgerError::UnknownParent(p) if p == b1.hash()));

        assert_eq!(other.pending_len(), 0);
        other.validate_block(&b1).unwrap();
        assert_eq!(other.pending_len(), 1);
    }

    #[test]
    fn finalizing_one_fork_writes_only_that_branch_and_drops_the_other() {
        let (mut app, store, g) = new_app();
        let genesis = app.block(&g).unwrap().unwrap();
        // Two proposals at height 1 (rounds 1 and 2), the first with a child.
        let fork_a = build(&mut app, &genesis, 1, vec![transfer(1, 0, 2, 100)]);
        let fork_a2 = build(&mut app, &fork_a, 2, vec![transfer(2, 0, 3, 7)]);
        let fork_b = build(&mut app, &genesis, 2, vec![transfer(1, 0, 3, 300)]);
        assert_ne!(fork_a.header.state_root, fork_b.header.state_root);
        assert_eq!(balance(&app, &fork_a, 2), FUNDS + 100);
        assert_eq!(balance(&app, &fork_b, 2), FUNDS);
        assert_eq!(balance(&app, &fork_b, 3), FUNDS + 300);

        let (mut other, other_store, _) = new_app();
        for b in [&fork_a, &fork_a2, &fork_b] {
            other.validate_block(b).unwrap();
        }
        assert_eq!(other.pending_len(), 3);

        for (app, store) in [(&mut app, &store), (&mut other, &other_store)] {
            let done = app
                .finalize(&fork_b.hash(), &qc(fork_b.hash(), 1, 2))
                .unwrap();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].block, fork_b);
            assert_eq!(app.final_tip(), (1, fork_b.hash()));
            assert_eq!(app.pending_len(), 0);
            assert!(!app.has_block(&fork_a.hash()));
            assert!(!app.has_block(&fork_a2.hash()));
            assert!(app.has_block(&fork_b.hash()));
            let fresh = State::new(store.clone(), params());
            assert_eq!(fresh.root(1).unwrap(), fork_b.header.state_root);
            assert!(fresh.root(2).is_err());
            let blocks = BlockStore::new(store.clone());
            assert_eq!(blocks.hash_at(1).unwrap(), Some(fork_b.hash()));
            assert_eq!(blocks.header_by_hash(&fork_a.hash()).unwrap(), None);
            // The losing fork cannot come back: its parent is final but no longer the tip.
            assert!(matches!(
                app.validate_block(&fork_a),
                Err(LedgerError::Invalid(m)) if m.contains("final but not the final tip")
            ));
            assert!(!app.has_block(&fork_a.hash()));
        }

        // Both nodes build on the final block and agree.
        let c = build(&mut app, &fork_b, 3, vec![transfer(3, 0, 2, 1)]);
        other.validate_block(&c).unwrap();
        assert_eq!(balance(&app, &c, 3), FUNDS + 300 - 1 - FEE);
        assert_eq!(balance(&app, &c, 2), FUNDS + 1);
        assert_eq!(balance(&other, &c, 1), FUNDS - 300 - FEE);
        app.finalize(&c.hash(), &qc(c.hash(), 2, 3)).unwrap();
        assert_eq!(
            State::new(store, params()).root(2).unwrap(),
            c.header.state_root
        );
    }

    /// A ledger over a [`Recording`] store holding the genesis, and the genesis hash.
    fn recorded_ledger() -> (Arc<Recording>, Ledger, Hash) {
        let recording = Arc::new(Recording::default());
        let store: Arc<dyn KvStore> = recording.clone();
        let g = genesis(&store);
        let app = Ledger::new(store, params(), BlockLimits::NONE).unwrap();
        (recording, app, g)
    }

    /// Records every batch written, to check what one finalization writes, and the state
    /// nodes read.
    #[derive(Default)]
    struct Recording {
        inner: MemStore,
        writes: Mutex<Vec<WriteBatch>>,
        node_reads: Mutex<Vec<Vec<u8>>>,
        /// A figure to read at every write and node read, and what was read.
        watched: Mutex<Option<Arc<std::sync::atomic::AtomicU64>>>,
        seen: Mutex<Vec<u64>>,
    }

    impl Recording {
        fn look(&self) {
            if let Some(figure) = self.watched.lock().unwrap().as_ref() {
                let now = figure.load(std::sync::atomic::Ordering::Relaxed);
                self.seen.lock().unwrap().push(now);
            }
        }
    }

    impl KvStore for Recording {
        fn get(&self, col: Column, key: &[u8]) -> keel_storage::Result<Option<Vec<u8>>> {
            if col == Column::StateNodes {
                self.node_reads.lock().unwrap().push(key.to_vec());
                self.look();
            }
            self.inner.get(col, key)
        }
        fn write(&self, batch: WriteBatch) -> keel_storage::Result<()> {
            self.look();
            self.writes.lock().unwrap().push(batch.clone());
            self.inner.write(batch)
        }
        fn iter_range<'a>(
            &'a self,
            col: Column,
            from: &[u8],
            to: Option<&[u8]>,
            dir: Direction,
        ) -> KvIter<'a> {
            self.inner.iter_range(col, from, to, dir)
        }
        fn compact_range(&self, col: Column, from: &[u8], to: &[u8]) -> keel_storage::Result<()> {
            self.inner.compact_range(col, from, to)
        }
        fn disk_size_bytes(&self) -> keel_storage::Result<u64> {
            Ok(0)
        }
        fn memory_bytes(&self) -> u64 {
            0
        }
    }

    /// The `blocks` memory figure counts the block in flight while it lasts: its
    /// transactions while it executes, then also what the execution holds (receipts, staged
    /// state, new nodes) until it is kept, its records and the engine's batch while it is
    /// written; afterwards only the pending blocks.
    #[test]
    fn the_pending_figure_counts_the_block_in_flight() {
        let (recording, mut app, g) = recorded_ledger();
        let figure = app.pending_memory();
        let read =
            |f: &Arc<std::sync::atomic::AtomicU64>| f.load(std::sync::atomic::Ordering::Relaxed);
        let (_, [b1, b2, b3]) = three_blocks(&mut app, g);
        let kept: u64 = app.pending.values().map(|p| p.bytes).sum();
        assert_eq!(read(&figure), kept);

        // Executing: the decoded transactions count on top of the pending blocks.
        *recording.watched.lock().unwrap() = Some(figure.clone());
        let txs = vec![transfer(1, 3, 1, 5), transfer(2, 2, 1, 5)];
        let executing = transactions_bytes(&txs);
        assert!(executing >= 2 * 160);
        recording.writes.lock().unwrap().clear();
        let b4 = build(&mut app, &b3, 4, txs);
        let during = recording.seen.lock().unwrap().clone();
        // Any node reads of the execution (here the pending blocks and the cache hold every
        // node it needs), then the write of the executed block's record.
        assert_eq!(
            recording.writes.lock().unwrap().len(),
            1,
            "one record written"
        );
        let (writing, reads) = during.split_last().unwrap();
        assert!(reads.iter().all(|s| *s >= kept + executing), "{during:?}");
        // Until it is kept, the executed block's receipts, staged state and new nodes count
        // too: at least its staged state's keys and values.
        let staged4 = app.pending[&b4.hash()].layer.op_bytes() as u64;
        assert!(*writing >= kept + executing + staged4, "{during:?}");
        let kept: u64 = app.pending.values().map(|p| p.bytes).sum();
        assert_eq!(read(&figure), kept);

        // Writing: the records and the engine's copy of them and of the staged state.
        recording.seen.lock().unwrap().clear();
        let staged = |b: &Block| app.pending[&b.hash()].layer.op_bytes() as u64;
        let (staged1, staged2) = (staged(&b1), staged(&b2));
        let first = app.pending[&b1.hash()].bytes;
        app.finalize(&b2.hash(), &qc(b2.hash(), 2, 2)).unwrap();
        let during = recording.seen.lock().unwrap().clone();
        assert_eq!(during.len(), 2, "one write per block");
        // Block 1 is written while all four are pending, block 2 once block 1 is final.
        assert!(during[0] > kept + staged1, "{during:?} vs {kept}");
        assert!(during[1] > kept - first + staged2, "{during:?} vs {kept}");
        let left: u64 = app.pending.values().map(|p| p.bytes).sum();
        assert_eq!(app.pending.len(), 2);
        assert_eq!(read(&figure), left);
        assert!(app.pending.contains_key(&b4.hash()));
    }

    /// What an execution holds counts while it is staged, on top of the figure as it is,
    /// and comes off whatever the figure was set to meanwhile (never below zero).
    #[test]
    fn a_staged_execution_counts_while_it_lasts() {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let figure = AtomicU64::new(1_000);
        {
            let _staging = Counted::new(&figure, 500);
            assert_eq!(figure.load(Relaxed), 1_500);
        }
        assert_eq!(figure.load(Relaxed), 1_000);
        {
            let _staging = Counted::new(&figure, 500);
            figure.store(200, Relaxed);
        }
        assert_eq!(figure.load(Relaxed), 0);
    }

    /// Finalized blocks hand their upper tree levels to the node cache: a block executed on
    /// the final tip reads none of the upper-level nodes those blocks wrote from the store.
    #[test]
    fn final_blocks_leave_their_upper_tree_levels_in_the_node_cache() {
        let (recording, mut app, g) = recorded_ledger();
        let (_, [_, _, b3]) = three_blocks(&mut app, g);
        app.finalize(&b3.hash(), &qc(b3.hash(), 3, 3)).unwrap();
        assert_eq!(app.final_tip(), (3, b3.hash()));
        recording.node_reads.lock().unwrap().clear();

        // Touches accounts 1, 2 and the proposer, all rewritten by blocks 1-3.
        let b4 = build(&mut app, &b3, 4, vec![transfer(2, 1, 1, 5)]);
        assert_eq!(balance(&app, &b4, 2), FUNDS + 40 - 15);
        let reads = recording.node_reads.lock().unwrap().clone();
        // Node keys: version (8 bytes BE), nibble count, packed nibbles.
        let upper_of_final_blocks: Vec<&Vec<u8>> = reads
            .iter()
            .filter(|k| k.len() >= 9 && k[8] <= 4)
            .filter(|k| (1..=3).contains(&u64::from_be_bytes(k[..8].try_into().unwrap())))
            .collect();
        assert!(
            upper_of_final_blocks.is_empty(),
            "read from the store: {upper_of_final_blocks:?}"
        );
    }

    #[test]
    fn finalize_writes_each_block_in_one_batch_readable_through_the_block_store() {
        let (recording, mut app, g) = recorded_ledger();
        let store: Arc<dyn KvStore> = recording.clone();
        let (_, [b1, b2, b3]) = three_blocks(&mut app, g);
        let receipts: Vec<Vec<Receipt>> = [&b1, &b2]
            .iter()
            .map(|b| app.pending_receipts(&b.hash()).unwrap().to_vec())
            .collect();
        recording.writes.lock().unwrap().clear();

        let cert = qc(b2.hash(), 2, 2);
        let done = app.finalize(&b2.hash(), &cert).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!((&done[0].block, &done[1].block), (&b1, &b2));
        assert_eq!(done[0].receipts, receipts[0]);
        assert_eq!(done[1].receipts, receipts[1]);
        assert_eq!(done[0].new_nonces.len(), 3);
        assert!(done[0].new_nonces.contains(&(addr(1), 1)));
        assert!(done[0].new_nonces.contains(&(addr(2), 0)));
        assert!(done[1].new_nonces.contains(&(addr(1), 2)));
        assert!(done[1].new_nonces.contains(&(addr(2), 1)));
        assert_eq!(app.final_tip(), (2, b2.hash()));
        assert_eq!(app.pending_len(), 1);

        // One atomic batch per block, oldest first, each with its own certificate.
        let writes = recording.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 2);
        for (batch, (block, certificate)) in writes
            .iter()
            .zip([(&b1, &b2.header.parent_qc), (&b2, &cert)])
        {
            let replay = MemStore::new();
            replay.write(batch.clone()).unwrap();
            let bs = BlockStore::new(Arc::new(replay.clone()));
            let h = block.header.height;
            assert_eq!(bs.latest().unwrap(), Some((h, block.hash())));
            assert_eq!(bs.finalized().unwrap(), Some((h, block.hash())));
            assert_eq!(bs.block_at(h).unwrap().as_ref(), Some(block));
            assert_eq!(
                ConsensusStore::new(Arc::new(replay.clone()))
                    .latest_qc()
                    .unwrap(),
                Some(certificate.clone())
            );
            let pointer = replay
                .iter_range(
                    Column::StateNodes,
                    &h.to_be_bytes(),
                    None,
                    Direction::Forward,
                )
                .count();
            assert!(pointer > 0, "state nodes of height {h} in its batch");
        }

        let bs = BlockStore::new(store.clone());
        assert_eq!(bs.latest().unwrap(), Some((2, b2.hash())));
        assert_eq!(bs.finalized().unwrap(), Some((2, b2.hash())));
        assert_eq!(
            ConsensusStore::new(store.clone()).latest_qc().unwrap(),
            Some(cert.clone())
        );
        for (b, rs) in [(&b1, &receipts[0]), (&b2, &receipts[1])] {
            let h = b.header.height;
            assert_eq!(bs.block_at(h).unwrap().as_ref(), Some(b));
            assert_eq!(&bs.receipts_at(h).unwrap(), rs);
            for (i, tx_hash) in b.tx_hashes().iter().enumerate() {
                let (bytes, receipt) = bs.transaction(tx_hash).unwrap().unwrap();
                assert_eq!(bytes, b.txs[i]);
                assert_eq!(receipt, rs[i]);
            }
            assert_eq!(app.block(&b.hash()).unwrap().as_ref(), Some(b));
            assert!(app.has_block(&b.hash()));
        }
        let fresh = State::new(store.clone(), params());
        assert_eq!(fresh.root(2).unwrap(), b2.header.state_root);
        assert!(fresh.root(3).is_err());
        // Final blocks' state stays readable through the app.
        assert_eq!(balance(&app, &b1, 2), FUNDS + 100);
        assert_eq!(balance(&app, &b3, 1), FUNDS - 320 + 1_000);

        // A reopened app resumes from the stored tip and keeps going.
        let mut reopened = Ledger::new(store, params(), BlockLimits::NONE).unwrap();
        assert_eq!(reopened.final_tip(), (2, b2.hash()));
        reopened.validate_block(&b3).unwrap();
        assert_eq!(
            reopened
                .finalize(&b3.hash(), &qc(b3.hash(), 3, 3))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn evidence_is_committed_to_by_the_evidence_root() {
        let (mut app, _, g) = new_app();
        let vote = |block: &[u8]| keel_types::Vote::sign(&key(9), CHAIN, Hash::digest(block), 1, 1);
        let evidence = Evidence {
            first: vote(b"a"),
            second: vote(b"b"),
        };
        let block = app
            .build_block(
                template(g, 0, 1),
                vec![transfer(1, 0, 2, 1)],
                vec![evidence],
            )
            .unwrap();
        assert_eq!(block.evidence.len(), 1);
        assert_ne!(block.header.evidence_root, Hash::ZERO);
        assert_eq!(block.header.evidence_root, block.evidence_root());

        let (mut other, _, _) = new_app();
        let mut stripped = block.clone();
        stripped.evidence.clear();
        assert!(matches!(
            other.validate_block(&stripped),
            Err(LedgerError::Invalid(m)) if m.contains("evidence root")
        ));
        other.validate_block(&block).unwrap();
        assert_eq!(balance(&other, &block, 2), balance(&app, &block, 2));
    }

    #[test]
    fn branch_tx_hashes_covers_exactly_the_pending_branch() {
        let (mut app, _, g) = new_app();
        let (genesis, [b1, b2, b3]) = three_blocks(&mut app, g);
        let fork = build(&mut app, &genesis, 4, vec![transfer(2, 0, 1, 5)]);
        let set =
            |b: &[&Block]| -> HashSet<Hash> { b.iter().flat_map(|b| b.tx_hashes()).collect() };
        assert_eq!(app.branch_tx_hashes(&b3.hash()), set(&[&b1, &b2, &b3]));
        assert_eq!(app.branch_tx_hashes(&b2.hash()), set(&[&b1, &b2]));
        assert_eq!(app.branch_tx_hashes(&b1.hash()), set(&[&b1]));
        assert_eq!(app.branch_tx_hashes(&fork.hash()), set(&[&fork]));
        assert!(app.branch_tx_hashes(&g).is_empty());
        assert!(app.branch_tx_hashes(&Hash::digest(b"unknown")).is_empty());

        app.finalize(&b1.hash(), &qc(b1.hash(), 1, 1)).unwrap();
        assert!(!app.has_block(&fork.hash()));
        assert_eq!(app.branch_tx_hashes(&b3.hash()), set(&[&b2, &b3]));
        assert!(app.branch_tx_hashes(&b1.hash()).is_empty());
    }

    #[test]
    fn finalizing_a_final_or_unknown_block_is_refused_or_a_no_op() {
        let (mut app, _, g) = new_app();
        let (_, [b1, b2, b3]) = three_blocks(&mut app, g);
        assert!(app.finalize(&g, &qc(g, 0, 0)).unwrap().is_empty());
        let unknown = Hash::digest(b"unknown");
        assert!(matches!(
            app.finalize(&unknown, &qc(unknown, 1, 1)),
            Err(LedgerError::UnknownBlock(h)) if h == unknown
        ));
        // A certificate for another block.
        assert!(matches!(
            app.finalize(&b2.hash(), &qc(b1.hash(), 1, 1)),
            Err(LedgerError::Invalid(_))
        ));
        assert_eq!(app.pending_len(), 3);

        assert_eq!(
            app.finalize(&b2.hash(), &qc(b2.hash(), 2, 2))
                .unwrap()
                .len(),
            2
        );
        // The tip, an ancestor of it, and genesis: nothing to do.
        for h in [b2.hash(), b1.hash(), g] {
            assert!(app.finalize(&h, &qc(h, 0, 0)).unwrap().is_empty());
        }
        assert_eq!(app.final_tip(), (2, b2.hash()));
        assert_eq!(app.pending_len(), 1);
        assert_eq!(
            app.finalize(&b3.hash(), &qc(b3.hash(), 3, 3))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(app.pending_len(), 0);
    }

    #[test]
    fn blocks_too_far_above_the_final_tip_are_refused() {
        let (mut app, _, g) = new_app();
        let mut tip = app.block(&g).unwrap().unwrap();
        for round in 1..=MAX_PENDING_HEIGHTS {
            tip = build(&mut app, &tip, round, Vec::new());
        }
        assert_eq!(app.pending_len(), MAX_PENDING_HEIGHTS as usize);
        let t = template(tip.hash(), tip.header.height, MAX_PENDING_HEIGHTS + 1);
        assert!(matches!(
            app.build_block(t, Vec::new(), Vec::new()),
            Err(LedgerError::Invalid(m)) if m.contains("above the final height")
        ));
        assert_eq!(app.pending_len(), MAX_PENDING_HEIGHTS as usize);
    }

    #[test]
    fn building_on_an_unknown_parent_or_at_a_wrong_height_is_refused() {
        let (mut app, _, g) = new_app();
        let unknown = Hash::digest(b"unknown");
        assert!(matches!(
            app.build_block(template(unknown, 0, 1), Vec::new(), Vec::new()),
            Err(LedgerError::UnknownParent(h)) if h == unknown
        ));
        let mut t = template(g, 0, 1);
        t.height = 2;
        assert!(matches!(
            app.build_block(t, Vec::new(), Vec::new()),
            Err(LedgerError::Invalid(_))
        ));
        assert_eq!(app.pending_len(), 0);
        assert!(matches!(
            Ledger::new(Arc::new(MemStore::new()), params(), BlockLimits::NONE),
            Err(LedgerError::NoGenesis)
        ));
    }
}
