//! The consensus host: feeds the pure consensus engine and carries out its effects,
//! synchronously, through the [`Ledger`] (execute, keep, finalize), the [`ConsensusStore`]
//! (safety data with fsync, epoch proofs), a [`Network`] and a [`Clock`] it is handed. It has
//! no thread, task or wall clock of its own: production runs it on a dedicated thread
//! ([`run_blocking`]), the seeded simulation calls it step by step on virtual time.
//!
//! After each step that changes what readers see (a block accepted, certified or final, an
//! epoch started) the host publishes a new [`ChainView`]; RPC, metrics and the network
//! server read that and never wait on the host.
//!
//! Durability: every block built or validated is kept in the consensus column (by the
//! ledger) before the fsynced safety data that a vote for it depends on, so a restarted
//! validator reloads the certified-but-not-final blocks above its final tip; final blocks
//! are written by [`Ledger::finalize`], one atomic batch per block. The mempool lock is
//! taken after that write, only to swap the view and drop the committed transactions, so
//! admission never waits on the disk.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use keel_consensus::{Effect, Engine, Input, Origin, TimerKind, ValidatorSet};
use keel_types::{
    Address, Block, ConsensusMessage, EpochProof, Hash, PeerRequest, PeerResponse,
    QuorumCertificate,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tracing::{debug, error, info, warn};

use crate::clock::Clock;
use crate::context::NodeContext;
use crate::ledger::{BlockTemplate, Finalized, Ledger, LedgerError};
use crate::net::{Channel, Network, PeerId, Report};
use crate::view::{ChainView, TipInfo};
use crate::Result;

/// The bytes of commands waiting in the host's queue, bounded: network messages and sync
/// answers are charged as they are queued ([`InboundQueue::charge`]) and released when the
/// host drops them, so a flood of large messages is dropped at the door rather than held
/// (the queue's count alone would let 4,096 blocks wait). Part of the `p2p` memory consumer.
#[derive(Debug)]
pub struct InboundQueue {
    queued: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl InboundQueue {
    /// A queue of at most `limit` bytes.
    pub fn new(limit: u64) -> Arc<InboundQueue> {
        Arc::new(InboundQueue {
            queued: std::sync::atomic::AtomicU64::new(0),
            limit,
        })
    }

    /// Charges `bytes` for a command about to be queued, or `None` if that would pass the
    /// bound. A command alone in the queue always passes, so no message is too large to
    /// ever be taken.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Option<QueueCharge> {
        use std::sync::atomic::Ordering;
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                let after = queued.saturating_add(bytes);
                (queued == 0 || after <= self.limit).then_some(after)
            })
            .ok()?;
        Some(QueueCharge {
            bytes,
            queue: Some(self.clone()),
        })
    }

    /// Bytes charged now.
    pub fn queued(&self) -> u64 {
        self.queued.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What one queued command holds against its [`InboundQueue`]: released when the command is
/// dropped (handled or thrown away).
#[derive(Debug, Default)]
pub struct QueueCharge {
    bytes: u64,
    queue: Option<Arc<InboundQueue>>,
}

impl QueueCharge {
    /// A charge against no queue (commands made by tests and simulations).
    pub fn none() -> QueueCharge {
        QueueCharge::default()
    }
}

impl Drop for QueueCharge {
    fn drop(&mut self) {
        if let Some(q) = &self.queue {
            q.queued
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// What reaches the host from outside. Payloads are boxed: the bounded queue of commands
/// reserves a slot of the largest variant for each of its 4,096 entries.
#[derive(Debug)]
pub enum Command {
    /// Stop (handled by the runner, after the current step).
    Shutdown,
    /// A consensus message (decoded, signatures not checked) and the peer that wrote it: the
    /// one scored down if it proves invalid.
    Message {
        /// Its author (for gossip, the signed source, not the relay).
        peer: PeerId,
        /// The message (boxed: the queue of commands reserves a slot of the largest
        /// variant for each of its entries).
        message: Box<ConsensusMessage>,
        /// Its bytes, held against the queue's bound until the command is dropped.
        charge: QueueCharge,
    },
    /// The answer to request `id` (`None`: it failed or did not decode).
    Response {
        /// The request's id.
        id: u64,
        /// Who answered.
        peer: PeerId,
        /// The answer (boxed, like the message).
        response: Option<Box<PeerResponse>>,
        /// Its bytes, held against the queue's bound until the command is dropped.
        charge: QueueCharge,
    },
}

/// What the host did, for an observer (the simulation's checks); production passes none.
#[derive(Debug)]
pub enum HostEvent<'a> {
    /// This node built a block.
    Built(&'a Block),
    /// A block from a peer was refused.
    Refused {
        /// The block.
        block: &'a Block,
        /// Why.
        error: &'a LedgerError,
    },
    /// Blocks from a sync answer were accepted.
    Synced {
        /// Who sent them.
        peer: PeerId,
        /// How many.
        blocks: usize,
    },
    /// Blocks kept by a previous run were accepted again at start.
    Reloaded(usize),
    /// An epoch started with this validator set.
    EpochStarted {
        /// The epoch.
        epoch: u64,
        /// Its set.
        validators: &'a ValidatorSet,
    },
    /// A block was written as final.
    Finalized(&'a Finalized),
}

/// Receives [`HostEvent`]s.
pub type Observer = Box<dyn FnMut(&HostEvent<'_>) + Send>;

/// Blocks and an epoch proof from a peer.
type SyncAnswer = (Vec<Block>, Option<EpochProof>);

/// Requests of one sync round, by the height each starts above; filled as answers arrive.
struct SyncRound {
    target: Hash,
    sent_ms: u64,
    parts: BTreeMap<u64, Option<(PeerId, Option<SyncAnswer>)>>,
    /// Request id -> the height its part starts above.
    requests: HashMap<u64, u64>,
}

/// Most peers asked at once when far behind.
const SYNC_PEERS: usize = 3;
/// Blocks asked for in one request.
const SYNC_BATCH: u32 = 32;
/// A request unanswered for this long no longer blocks the next one.
const SYNC_TIMEOUT_MS: u64 = 5_000;

/// The consensus host of one node.
pub struct Host {
    chain: Arc<NodeContext>,
    engine: Engine,
    ledger: Ledger,
    network: Arc<dyn Network>,
    clock: Arc<dyn Clock>,
    observer: Option<Observer>,
    timers: HashMap<TimerKind, u64>,
    /// The sync round in flight.
    sync: Option<SyncRound>,
    /// Id of the next request.
    next_request: u64,
    /// Spreads block requests over peers.
    sync_salt: u64,
    /// The target asked for again after answers without it, and how many times.
    sync_retry: Option<(Hash, usize)>,
    /// Whether the view is behind the ledger.
    dirty: bool,
    metrics: HostMetrics,
    /// The names consensus knows senders by ([`Origin`]) and back, so that an invalid
    /// message reported later (a vote checked with its quorum) still reaches its peer.
    origins: Origins,
}

/// Peers and the [`Origin`]s consensus knows them by; forgotten all at once past
/// [`Origins::MAX`] peers, so a stream of new peer ids cannot grow it.
#[derive(Default)]
struct Origins {
    by_peer: HashMap<PeerId, Origin>,
    by_origin: HashMap<Origin, PeerId>,
    next: u64,
}

impl Origins {
    const MAX: usize = 4096;

    fn of(&mut self, peer: PeerId) -> Origin {
        if let Some(origin) = self.by_peer.get(&peer) {
            return *origin;
        }
        if self.by_peer.len() >= Origins::MAX {
            self.by_peer.clear();
            self.by_origin.clear();
        }
        // Origin 0 is the node itself.
        self.next = self.next.saturating_add(1);
        let origin = Origin(self.next);
        self.by_peer.insert(peer, origin);
        self.by_origin.insert(origin, peer);
        origin
    }

    fn peer(&self, origin: Origin) -> Option<PeerId> {
        self.by_origin.get(&origin).copied()
    }
}

impl Host {
    pub(crate) fn new(
        chain: Arc<NodeContext>,
        engine: Engine,
        ledger: Ledger,
        network: Arc<dyn Network>,
        clock: Arc<dyn Clock>,
    ) -> Host {
        Host {
            chain,
            engine,
            ledger,
            network,
            clock,
            observer: None,
            timers: HashMap::new(),
            sync: None,
            next_request: 0,
            sync_salt: 0,
            sync_retry: None,
            dirty: true,
            origins: Origins::default(),
            metrics: HostMetrics::default(),
        }
    }

    /// Hands every [`HostEvent`] to `observer`.
    pub fn with_observer(mut self, observer: Observer) -> Host {
        self.observer = Some(observer);
        self
    }

    /// The node context the host updates.
    pub fn context(&self) -> &Arc<NodeContext> {
        &self.chain
    }

    /// The consensus engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The block tree.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Registers the metrics the host updates as it goes: `keel_txs_committed` and
    /// `keel_block_execution_seconds`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    fn observe(&mut self, event: HostEvent<'_>) {
        if let Some(observer) = self.observer.as_mut() {
            observer(&event);
        }
    }

    /// Starts consensus and reloads the non-final blocks of a previous run. Called before the
    /// RPC server opens, so clients never see the chain rewound to its final tip.
    pub fn start(&mut self) -> Result<()> {
        self.input(Input::Start)?;
        let reloaded = self.ledger.reload_pending()?;
        self.dirty = true;
        if !reloaded.is_empty() {
            info!(blocks = reloaded.len(), "reloaded non-final blocks");
            self.observe(HostEvent::Reloaded(reloaded.len()));
            self.input(Input::Synced(reloaded))?;
        }
        self.publish_if_dirty();
        Ok(())
    }

    /// Handles one command. An error means the node must stop: it could not make its votes
    /// or blocks durable.
    pub fn handle(&mut self, command: Command) -> Result<()> {
        self.expire_sync();
        match command {
            Command::Shutdown => {}
            Command::Message { peer, message, .. } => {
                let from = self.origins.of(peer);
                self.input(Input::Message {
                    from,
                    message: *message,
                })?
            }
            Command::Response {
                id, peer, response, ..
            } => self.on_response(id, peer, response.map(|r| *r))?,
        }
        self.publish_if_dirty();
        Ok(())
    }

    /// Forgets a sync round unanswered for [`SYNC_TIMEOUT_MS`] (an answer lost on the way, a
    /// peer gone): the node no longer reports itself syncing because of it, and the next
    /// missing block starts a new round.
    fn expire_sync(&mut self) {
        let now = self.clock.now_ms();
        if self
            .sync
            .as_ref()
            .is_some_and(|r| now.saturating_sub(r.sent_ms) >= SYNC_TIMEOUT_MS)
        {
            debug!("sync round timed out");
            self.sync = None;
            self.chain.set_syncing(false);
        }
    }

    /// When the next timer is due, if one is set.
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.timers.values().min().copied()
    }

    /// Fires every timer due at the clock's time, earliest first.
    pub fn fire_due_timers(&mut self) -> Result<()> {
        self.expire_sync();
        loop {
            let now = self.clock.now_ms();
            let due = self
                .timers
                .iter()
                .filter(|(_, at)| **at <= now)
                .min_by_key(|(kind, at)| (**at, **kind as u8))
                .map(|(kind, _)| *kind);
            let Some(kind) = due else { break };
            self.timers.remove(&kind);
            self.input(Input::Timer(kind))?;
        }
        self.publish_if_dirty();
        Ok(())
    }

    fn input(&mut self, input: Input) -> Result<()> {
        let effects = self.engine.handle(self.clock.now_ms(), input);
        self.carry_out(effects)
    }

    fn carry_out(&mut self, effects: Vec<Effect>) -> Result<()> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            if let Some(input) = self.effect(effect)? {
                queue.extend(self.engine.handle(self.clock.now_ms(), input));
            }
        }
        Ok(())
    }

    fn effect(&mut self, effect: Effect) -> Result<Option<Input>> {
        Ok(match effect {
            Effect::SetTimer { kind, at_ms } => {
                self.timers.insert(kind, at_ms);
                None
            }
            Effect::BuildBlock(req) => Some(self.build(req)?),
            Effect::ValidateBlock(block) => {
                let hash = block.hash();
                let started = std::time::Instant::now();
                let checked = self.ledger.validate_block(&block);
                self.metrics
                    .block_execution_seconds
                    .observe(started.elapsed().as_secs_f64());
                let valid = match checked {
                    Ok(()) => {
                        self.dirty = true;
                        true
                    }
                    Err(e) if e.is_fatal() => return Err(e.into()),
                    Err(e) => {
                        warn!(height = block.header.height, %hash, error = %e, "refusing proposed block");
                        // A block that breaks a rule was signed by its proposer (consensus checked
                        // the signature before asking): score the proposer's peer, whoever
                        // relayed the proposal and whenever consensus looks at it.
                        if matches!(e, LedgerError::Invalid(_)) {
                            let proposer = Some(block.header.proposer);
                            if let Some(peer) = self
                                .network
                                .peers()
                                .iter()
                                .find(|p| p.validator == proposer)
                            {
                                self.network.report(peer.id, Report::Invalid);
                            }
                        }
                        self.observe(HostEvent::Refused {
                            block: &block,
                            error: &e,
                        });
                        false
                    }
                };
                Some(Input::BlockValidated { hash, valid })
            }
            Effect::PersistSafety(safety) => {
                self.chain.records().save_safety(&safety)?;
                None
            }
            Effect::Broadcast(message) => {
                match &message {
                    ConsensusMessage::Timeout(t) => debug!(
                        round = t.round,
                        high_qc = t.high_qc.round,
                        leader = %self.engine.leader_address(t.round),
                        "timed out round"
                    ),
                    ConsensusMessage::Proposal(p) => debug!(
                        round = p.block.header.round,
                        height = p.block.header.height,
                        "proposed"
                    ),
                    _ => {}
                }
                self.broadcast(message);
                None
            }
            Effect::SendTo { to, message } => {
                self.send_to(to, message);
                None
            }
            Effect::RequestSync { qc } => {
                self.request_sync(qc.block_hash);
                None
            }
            Effect::Invalid { from, reason } => {
                if let Some(peer) = self.origins.peer(from) {
                    debug!(%peer, reason, "invalid consensus message");
                    self.network.report(peer, Report::Invalid);
                }
                None
            }
            Effect::ReportEvidence(e) => {
                warn!(offender = %e.offender(), round = e.first.round, "equivocation detected");
                None
            }
            Effect::Certified {
                hash,
                height,
                round,
            } => {
                if let Some(header) = self.ledger.mark_certified(&hash) {
                    debug!(height, round, %hash, "certified");
                    self.dirty = true;
                    self.chain.notify_new_head(header);
                }
                None
            }
            Effect::Finalize { hash, height, qc } => {
                self.finalize(hash, height, &qc)?;
                None
            }
            Effect::NeedValidatorSet { epoch, height } => Some(self.start_epoch(epoch, height)?),
        })
    }

    /// Selects transactions from the mempool (never one already on the parent's branch) and
    /// builds the block.
    fn build(&mut self, req: keel_consensus::BuildRequest) -> Result<Input> {
        let round = req.round;
        let limits = self.ledger.limits();
        // A suffix block (above the epoch's end) carries nothing.
        let txs: Vec<_> = if req.empty {
            Vec::new()
        } else {
            // Passed over inside the pool rather than selected and dropped here: a loaded
            // pool holds the branch's transactions too (until they are final), and cloning
            // them only to drop them cost as much memory as the block itself, twice.
            let exclude = self.ledger.branch_tx_hashes(&req.parent_hash);
            self.chain
                .mempool()
                .select_excluding(limits.max_txs, limits.max_bytes, &exclude)
        };
        let template = BlockTemplate::from(&req);
        let started = std::time::Instant::now();
        let built = self.ledger.build_block(template, txs, req.evidence);
        self.metrics
            .block_execution_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(match built {
            Ok(block) => {
                debug!(
                    height = block.header.height,
                    round,
                    txs = block.txs.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "built block"
                );
                self.dirty = true;
                self.observe(HostEvent::Built(&block));
                Input::BlockBuilt(block)
            }
            Err(e) if e.is_fatal() => return Err(e.into()),
            Err(e) => {
                error!(round, error = %e, "building block failed");
                Input::BuildFailed { round }
            }
        })
    }

    /// The epoch-ending block at `height` is final: load the next epoch's validator set, and
    /// drop the suffix blocks built on top of it (never final, never stored in the ledger).
    fn start_epoch(&mut self, epoch: u64, height: u64) -> Result<Input> {
        let validators = self.chain.validator_set(epoch)?;
        if let Some(ended) = epoch.checked_sub(1) {
            if let Some(proof) = self.engine.epoch_proof(ended) {
                self.chain.records().save_epoch_proof(ended, proof)?;
            }
        }
        let dropped = self.ledger.discard_pending()?;
        self.dirty = true;
        let stats = self.chain.validator_set_cache_stats();
        info!(
            epoch,
            from_height = height,
            validators = validators.len(),
            total_stake = validators.total_stake(),
            dropped_suffix_blocks = dropped,
            set_cache_hits = stats.hits,
            set_cache_misses = stats.misses,
            "epoch started"
        );
        if validators.get(&self.engine.address()).is_none() {
            warn!(
                epoch,
                "this node is not a validator of the new epoch: following only"
            );
        }
        self.observe(HostEvent::EpochStarted {
            epoch,
            validators: &validators,
        });
        Ok(Input::NewEpoch {
            epoch,
            validators: (*validators).clone(),
        })
    }

    /// Proposals, evidence and epoch proofs go to everyone by gossip; timeouts straight to
    /// every connected peer.
    fn broadcast(&self, message: ConsensusMessage) {
        let channel = match message {
            ConsensusMessage::Evidence(_) => Channel::Evidence,
            _ => Channel::Consensus,
        };
        let bytes = message.encode();
        if let ConsensusMessage::Timeout(_) = message {
            for peer in self.network.peers() {
                self.network.send(peer.id, bytes.clone());
            }
            return;
        }
        self.network.broadcast(channel, bytes);
    }

    /// Votes go straight to the validator's peer when its binding is known, else by gossip.
    fn send_to(&self, to: Address, message: ConsensusMessage) {
        let bytes = message.encode();
        let peer = self
            .network
            .peers()
            .into_iter()
            .find(|p| p.validator == Some(to));
        match peer {
            Some(peer) => self.network.send(peer.id, bytes),
            None => self.network.broadcast(Channel::Consensus, bytes),
        }
    }

    /// Asks peers for the blocks up to `target` above our final height, answered by
    /// [`Command::Response`]. Far behind (peers report final heights more than a batch above
    /// ours), consecutive ranges go to up to [`SYNC_PEERS`] peers at once; the answers are
    /// applied in height order. One such round at a time.
    fn request_sync(&mut self, target: Hash) {
        let now = self.clock.now_ms();
        if self
            .sync
            .as_ref()
            .is_some_and(|r| now.saturating_sub(r.sent_ms) < SYNC_TIMEOUT_MS)
        {
            return;
        }
        let peers = self.network.peers();
        let best = peers.iter().map(|p| p.final_height).max().unwrap_or(0);
        // Peers close to the best reported height; retries spread over them.
        let candidates: Vec<PeerId> = peers
            .iter()
            .filter(|p| p.final_height.saturating_add(2) >= best)
            .map(|p| p.id)
            .collect();
        if candidates.is_empty() {
            debug!(block = %target, "missing blocks, and no peers to sync from");
            return;
        }
        let have_height = self.ledger.final_tip().0;
        let wanted = best
            .saturating_sub(have_height)
            .div_ceil(u64::from(SYNC_BATCH))
            .clamp(1, SYNC_PEERS as u64) as usize;
        let mut chosen = Vec::new();
        for _ in 0..SYNC_PEERS * 2 {
            self.sync_salt = self.sync_salt.wrapping_add(1);
            let pick = candidates[(self.sync_salt as usize) % candidates.len()];
            if !chosen.contains(&pick) {
                chosen.push(pick);
            }
            if chosen.len() >= wanted {
                break;
            }
        }
        let mut round = SyncRound {
            target,
            sent_ms: now,
            parts: BTreeMap::new(),
            requests: HashMap::new(),
        };
        for (i, peer) in chosen.into_iter().enumerate() {
            let start = have_height + i as u64 * u64::from(SYNC_BATCH);
            let id = self.next_request;
            self.next_request = self.next_request.wrapping_add(1);
            round.parts.insert(start, None);
            round.requests.insert(id, start);
            debug!(%peer, block = %target, have_height = start, "requesting blocks");
            self.network.request(
                peer,
                PeerRequest::Blocks {
                    target,
                    have_height: start,
                    max: SYNC_BATCH,
                },
                id,
            );
        }
        self.sync = Some(round);
        self.chain.set_syncing(true);
    }

    /// Files one answer of the current round and applies every answer that is next in height
    /// order; when the round is done, asks again if the last answer was full.
    /// Asks another peer for `target` after an answer without it, at most [`SYNC_PEERS`]
    /// times for one target in a row. Whether a request went out.
    fn retry_sync(&mut self, target: Hash) -> bool {
        let tries = match self.sync_retry {
            Some((t, n)) if t == target => n.saturating_add(1),
            _ => 1,
        };
        if tries > SYNC_PEERS {
            return false;
        }
        self.sync_retry = Some((target, tries));
        self.request_sync(target);
        self.sync.is_some()
    }

    fn on_response(&mut self, id: u64, peer: PeerId, response: Option<PeerResponse>) -> Result<()> {
        let Some(r) = self.sync.as_mut() else {
            return Ok(());
        };
        let Some(start) = r.requests.remove(&id) else {
            return Ok(());
        };
        let answer = match response {
            Some(PeerResponse::Blocks { blocks, proof }) => Some((blocks, proof)),
            Some(PeerResponse::Pruned { earliest }) => {
                // Honest: it keeps a window. Another peer may have the blocks; state sync (not
                // built yet) is what a node this far behind every peer would need.
                warn!(
                    %peer,
                    earliest,
                    need_from = self.ledger.final_tip().0.saturating_add(1),
                    "peer has pruned the blocks this node needs (it serves heights from \
                     `earliest` on); asking another peer"
                );
                None
            }
            Some(_) => {
                self.network.report(peer, Report::Invalid);
                None
            }
            None => None,
        };
        r.parts.insert(start, Some((peer, answer)));
        // Apply the answers at the front, in order.
        let mut more = false;
        while let Some(r) = self.sync.as_mut() {
            let Some(entry) = r.parts.first_entry() else {
                break;
            };
            if entry.get().is_none() {
                return Ok(());
            }
            let Some((peer, answer)) = entry.remove() else {
                break;
            };
            let target = r.target;
            let done = r.parts.is_empty();
            let (applied, full) = match answer {
                Some((blocks, proof)) => {
                    let full = blocks.len() >= SYNC_BATCH as usize;
                    (self.apply_synced(peer, blocks, proof)?, full)
                }
                None => (false, false),
            };
            if !applied {
                // A gap: later answers no longer connect; start over later.
                self.sync = None;
                break;
            }
            if done {
                self.sync = None;
                more = full;
                if more {
                    self.request_sync(target);
                } else if !self.ledger.has_block(&target) {
                    // The peer did not have it (a block certified a moment ago, held by
                    // the few that saw its proposal): ask the next one now, not when
                    // consensus next asks, which may be a whole round later.
                    more = self.retry_sync(target);
                }
                break;
            }
        }
        if !more && self.sync.is_none() {
            self.chain.set_syncing(false);
        }
        Ok(())
    }

    /// Validates synced blocks (oldest first, stopping at the first that does not hold),
    /// hands them to consensus, then the epoch proof. Blocks already held are handed on too,
    /// without re-execution: consensus may not have taken them when they first came (a block
    /// of an epoch it had not reached), and it asks for them again. Whether anything new was
    /// applied or the answer was consistent (known blocks only).
    fn apply_synced(
        &mut self,
        peer: PeerId,
        blocks: Vec<Block>,
        proof: Option<EpochProof>,
    ) -> Result<bool> {
        let mut valid = Vec::new();
        let (mut new, mut first_new) = (0usize, 0u64);
        let mut refused = false;
        for block in blocks {
            if self.ledger.has_block(&block.hash()) {
                valid.push(block);
                continue;
            }
            match self.ledger.validate_block(&block) {
                Ok(()) => {
                    if new == 0 {
                        first_new = block.header.height;
                    }
                    new += 1;
                    valid.push(block);
                }
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    debug!(%peer, height = block.header.height, error = %e, "synced block refused");
                    self.network.report(peer, Report::Invalid);
                    refused = true;
                    break;
                }
            }
        }
        if new > 0 {
            self.dirty = true;
            self.network.report(peer, Report::Useful);
            info!(%peer, blocks = new, from = first_new, "synced blocks");
            self.observe(HostEvent::Synced { peer, blocks: new });
        }
        if !valid.is_empty() {
            self.input(Input::Synced(valid))?;
        }
        if let Some(proof) = proof {
            let from = self.origins.of(peer);
            self.input(Input::Message {
                from,
                message: ConsensusMessage::EpochProof(proof),
            })?;
        }
        Ok(!refused)
    }

    fn finalize(&mut self, hash: Hash, height: u64, qc: &QuorumCertificate) -> Result<()> {
        let written = match self.ledger.finalize(&hash, qc) {
            Ok(w) => w,
            // A store or state failure: what is final on disk is no longer known here.
            Err(e) if e.is_fatal() || matches!(e, LedgerError::State(_)) => return Err(e.into()),
            Err(e) => {
                error!(height, %hash, error = %e, "cannot finalize block");
                return Ok(());
            }
        };
        if written.is_empty() {
            return Ok(());
        }
        {
            // After the write: admission reads the final height from the view under this
            // lock, so it sees either the old height (and its transactions are pruned right
            // below) or the new one.
            let chain = self.chain.clone();
            let mut pool = chain.mempool();
            self.publish();
            for f in &written {
                let hashes = f.block.tx_hashes();
                pool.remove_committed(&hashes, &f.new_nonces);
                // A final transaction is never executed again: free its cache slot.
                self.chain.sig_cache().remove_all(&hashes);
            }
        }
        for f in &written {
            self.metrics.txs_committed.inc_by(f.block.txs.len() as u64);
            self.metrics
                .block_commit_seconds
                .observe(f.commit_time.as_secs_f64());
            let failed = f.receipts.iter().filter(|r| !r.success).count();
            info!(height = f.block.header.height, round = f.block.header.round, hash = %f.block.hash(),
                  txs = f.block.txs.len(), failed, "finalized block");
            self.chain.notify_finalized_head(f.block.header.clone());
            self.observe(HostEvent::Finalized(f));
        }
        Ok(())
    }

    fn publish_if_dirty(&mut self) {
        if self.dirty {
            self.publish();
        }
    }

    /// Swaps in a view of the ledger as it is now.
    fn publish(&mut self) {
        let finalized = self.ledger.final_tip();
        let certified = self.ledger.certified().clone();
        let latest = certified
            .last_key_value()
            .map(|(h, b)| (*h, b.hash))
            .filter(|(h, _)| *h > finalized.0)
            .unwrap_or(finalized);
        self.chain.publish(ChainView {
            tip: TipInfo { latest, finalized },
            epoch: self.engine.epoch(),
            certified,
            blocks: self
                .ledger
                .pending_blocks()
                .map(|(h, b)| (*h, b.clone()))
                .collect(),
            commit_qc: self.engine.commit_qc().cloned(),
        });
        self.dirty = false;
    }
}

/// Runs a host on the current thread until [`Command::Shutdown`], the queue's end, or a
/// storage failure (after which the node must not continue: it could not make its votes or
/// blocks durable). `clock` times the timers.
pub fn run_blocking(
    mut host: Host,
    commands: Receiver<Command>,
    clock: Arc<dyn Clock>,
) -> Result<()> {
    loop {
        let wait = match host.next_timer_ms() {
            Some(at) => Duration::from_millis(at.saturating_sub(clock.now_ms())),
            None => Duration::from_secs(3600),
        };
        match commands.recv_timeout(wait) {
            Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                info!("consensus host stopped");
                return Ok(());
            }
            Ok(command) => host.handle(command)?,
            Err(RecvTimeoutError::Timeout) => {}
        }
        host.fire_due_timers()?;
    }
}

/// What the host counts as it goes. Clones update the same metrics.
#[derive(Clone, Debug)]
struct HostMetrics {
    /// Transactions in final blocks.
    txs_committed: Counter,
    /// Time to build or re-execute a block.
    block_execution_seconds: Histogram,
    /// Time to write a final block's batch.
    block_commit_seconds: Histogram,
}

impl Default for HostMetrics {
    fn default() -> HostMetrics {
        HostMetrics {
            txs_committed: Counter::default(),
            // 0.5 ms to about 16 s.
            block_execution_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            // 0.1 ms to about 3 s.
            block_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }
}

impl HostMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "keel_txs_committed",
            "Transactions in final blocks",
            self.txs_committed.clone(),
        );
        registry.register(
            "keel_block_execution_seconds",
            "Time to build or re-execute a block",
            self.block_execution_seconds.clone(),
        );
        registry.register(
            "keel_block_commit_seconds",
            "Time to write a final block to the database (its one atomic write batch)",
            self.block_commit_seconds.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_inbound_queue_holds_charges_until_their_commands_are_dropped() {
        let queue = InboundQueue::new(1_000);
        let a = queue.charge(600).unwrap();
        let b = queue.charge(400).unwrap();
        assert_eq!(queue.queued(), 1_000);
        // Full: even one byte more waits for a command to go.
        assert!(queue.charge(1).is_none());
        drop(a);
        assert_eq!(queue.queued(), 400);
        let c = queue.charge(600).unwrap();
        drop((b, c));
        assert_eq!(queue.queued(), 0);
        // Alone in the queue, a command larger than the bound still passes, and only then.
        let big = queue.charge(5_000).unwrap();
        assert!(queue.charge(1).is_none());
        drop(big);
        assert_eq!(queue.queued(), 0);
        // A command made without a queue charges nothing.
        drop(QueueCharge::none());
        assert_eq!(queue.queued(), 0);
    }

    #[test]
    fn a_queued_command_releases_its_charge_when_dropped() {
        let queue = InboundQueue::new(1 << 20);
        let command = Command::Response {
            id: 1,
            peer: PeerId::random(),
            response: None,
            charge: queue.charge(512).unwrap(),
        };
        assert_eq!(queue.queued(), 512);
        drop(command);
        assert_eq!(queue.queued(), 0);
    }
}
