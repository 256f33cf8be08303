//! The consensus driver: a dedicated thread that feeds the pure consensus engine and carries
//! out its effects against the real store through the [`App`].
//!
//! Block execution is CPU work measured in milliseconds to seconds, so the driver runs on its
//! own OS thread rather than on the async runtime; it talks to the rest of the node through a
//! bounded command channel and the shared [`Chain`].
//!
//! Durability: every block built or validated is written to the `consensus` column before the
//! (fsynced) safety data that a vote for it depends on, so a restarted validator can reload
//! the certified-but-not-final blocks above its final tip; final blocks are written by
//! [`App::finalize`], one atomic batch per block.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_consensus::{Effect, Engine, Input, TimerKind};
use keel_p2p::{Channel, PeerId, Report};
use keel_storage::{Column, WriteBatch};
use keel_types::{
    Block, ConsensusMessage, EpochProof, Hash, PeerRequest, PeerResponse, QuorumCertificate,
};
use tracing::{debug, error, info, warn};

use crate::app::{App, BlockTemplate};
use crate::chain::Chain;
use crate::network::{store_epoch_proof, Net};
use crate::Result;

/// Key of the safety data in [`Column::Consensus`].
pub(crate) const SAFETY_KEY: &[u8] = b"safety";
/// Meta key of the final tip's certificate (written by [`App::finalize`]).
pub(crate) const LATEST_QC_KEY: &str = "latest_qc";
/// Prefix of non-final blocks kept in [`Column::Consensus`] for restarts.
pub(crate) const PENDING_BLOCK_PREFIX: &[u8] = b"block/";

/// Commands from the node to the driver.
// Commands are moved once, through a bounded queue: boxing the large ones would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// Stop after the current effect.
    Shutdown,
    /// A consensus message from a peer (decoded, signatures not checked).
    Message(ConsensusMessage),
    /// A peer's answer to a block request (`None`: the request failed).
    Synced {
        /// The sync round it belongs to.
        round: u64,
        /// The final height the request started above.
        start: u64,
        /// Who was asked.
        peer: PeerId,
        /// Its blocks (oldest first) and the proof that our epoch ended, if it had one.
        answer: Option<SyncAnswer>,
    },
}

/// Blocks and an epoch proof from a peer.
pub(crate) type SyncAnswer = (Vec<Block>, Option<EpochProof>);

/// Requests of one sync round, by the height each starts above; filled as answers arrive.
struct SyncRound {
    id: u64,
    target: Hash,
    sent_ms: u64,
    parts: std::collections::BTreeMap<u64, Option<(PeerId, Option<SyncAnswer>)>>,
}

/// Most peers asked at once when far behind.
const SYNC_PEERS: usize = 3;

/// Blocks asked for in one request.
const SYNC_BATCH: u32 = 32;
/// A request unanswered for this long no longer blocks the next one.
const SYNC_TIMEOUT_MS: u64 = 5_000;

/// Wall-clock milliseconds since the Unix epoch: the only clock the driver reads.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn pending_key(hash: &Hash) -> Vec<u8> {
    [PENDING_BLOCK_PREFIX, hash.as_bytes()].concat()
}

pub(crate) struct Driver {
    chain: Arc<Chain>,
    engine: Engine,
    app: App,
    commands: Receiver<Command>,
    timers: HashMap<TimerKind, u64>,
    /// Non-final blocks written to the consensus column, with their heights.
    persisted: HashMap<Hash, u64>,
    /// The network (none for a node run alone, or in tests).
    net: Option<Net>,
    /// The sync round in flight.
    sync: Option<SyncRound>,
    /// Id of the latest sync round.
    sync_round: u64,
    /// Spreads block requests over peers.
    sync_salt: u64,
    /// Where network tasks send their results back.
    commands_tx: Option<std::sync::mpsc::SyncSender<Command>>,
}

impl Driver {
    pub(crate) fn new(
        chain: Arc<Chain>,
        engine: Engine,
        app: App,
        commands: Receiver<Command>,
    ) -> Driver {
        Driver {
            chain,
            engine,
            app,
            commands,
            timers: HashMap::new(),
            persisted: HashMap::new(),
            net: None,
            sync: None,
            sync_round: 0,
            sync_salt: 0,
            commands_tx: None,
        }
    }

    /// Connects the driver to the network; `commands` is the sender of its own command queue,
    /// for answers to its requests.
    pub(crate) fn set_network(&mut self, net: Net, commands: std::sync::mpsc::SyncSender<Command>) {
        self.net = Some(net);
        self.commands_tx = Some(commands);
    }

    /// Starts consensus and reloads the non-final blocks of a previous run. Called before the
    /// RPC server opens, so clients never see the chain rewound to its final tip.
    pub(crate) fn start(&mut self) -> Result<()> {
        let start = self.engine.handle(now_ms(), Input::Start);
        self.carry_out(start)?;
        self.reload_pending()
    }

    /// Runs until shutdown or a storage failure (after which the node must not continue: it
    /// could not make its votes or blocks durable).
    pub(crate) fn run(mut self) -> Result<()> {
        loop {
            let next = self
                .timers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, at)| (*k, *at));
            let wait = match next {
                Some((_, at)) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            match self.commands.recv_timeout(wait) {
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    info!("consensus driver stopped");
                    return Ok(());
                }
                Ok(Command::Message(message)) => {
                    let effects = self.engine.handle(now_ms(), Input::Message(message));
                    self.carry_out(effects)?;
                }
                Ok(Command::Synced {
                    round,
                    start,
                    peer,
                    answer,
                }) => self.on_synced(round, start, peer, answer)?,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((kind, at)) = next {
                        if at <= now_ms() {
                            self.timers.remove(&kind);
                            let effects = self.engine.handle(now_ms(), Input::Timer(kind));
                            self.carry_out(effects)?;
                        }
                    }
                }
            }
        }
    }

    /// Re-validates the non-final blocks persisted before a restart and hands them back to
    /// consensus, so certificates on them are not lost.
    fn reload_pending(&mut self) -> Result<()> {
        let kv = self.chain.blocks.kv().clone();
        let mut blocks = Vec::new();
        for item in kv.iter_prefix(Column::Consensus, PENDING_BLOCK_PREFIX) {
            let (key, bytes) = item?;
            match Block::decode(&bytes) {
                Ok(b) => blocks.push(b),
                Err(e) => warn!(error = %e, key = ?key, "dropping an undecodable pending block"),
            }
        }
        blocks.sort_by_key(|b| b.header.height);
        let mut valid = Vec::new();
        for block in blocks {
            let hash = block.hash();
            if self.app.validate_block(&block).is_ok() {
                self.persisted.insert(hash, block.header.height);
                valid.push(block);
            } else {
                let mut batch = WriteBatch::new();
                batch.delete(Column::Consensus, pending_key(&hash));
                kv.write(batch)?;
            }
        }
        if !valid.is_empty() {
            info!(blocks = valid.len(), "reloaded non-final blocks");
            let effects = self.engine.handle(now_ms(), Input::Synced(valid));
            self.carry_out(effects)?;
        }
        Ok(())
    }

    fn persist_block(&mut self, block: &Block) -> Result<()> {
        let hash = block.hash();
        if self.persisted.insert(hash, block.header.height).is_none() {
            self.chain
                .blocks
                .kv()
                .put(Column::Consensus, &pending_key(&hash), &block.encode())?;
        }
        Ok(())
    }

    fn carry_out(&mut self, effects: Vec<Effect>) -> Result<()> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let follow_up = match effect {
                Effect::SetTimer { kind, at_ms } => {
                    self.timers.insert(kind, at_ms);
                    None
                }
                Effect::BuildBlock(req) => {
                    let round = req.round;
                    let exclude = self.app.branch_tx_hashes(&req.parent_hash);
                    let params = &self.chain.params;
                    // A suffix block (above the epoch's end) carries nothing.
                    let txs: Vec<_> = if req.empty {
                        Vec::new()
                    } else {
                        self.chain
                            .mempool()
                            .select(
                                params.max_block_txs as usize + exclude.len(),
                                params.max_block_bytes as usize,
                            )
                            .into_iter()
                            .filter(|t| !exclude.contains(&t.hash))
                            .take(params.max_block_txs as usize)
                            .collect()
                    };
                    let template = BlockTemplate::from(&req);
                    let started = std::time::Instant::now();
                    let built = self.app.build_block(template, txs, req.evidence);
                    self.chain
                        .metrics
                        .block_execution_seconds
                        .observe(started.elapsed().as_secs_f64());
                    match built {
                        Ok(block) => {
                            debug!(
                                height = block.header.height,
                                round,
                                txs = block.txs.len(),
                                elapsed_ms = started.elapsed().as_millis() as u64,
                                "built block"
                            );
                            self.persist_block(&block)?;
                            Some(Input::BlockBuilt(block))
                        }
                        Err(e) => {
                            error!(round, error = %e, "building block failed");
                            Some(Input::BuildFailed { round })
                        }
                    }
                }
                Effect::ValidateBlock(block) => {
                    let hash = block.hash();
                    let params = &self.chain.params;
                    let bytes: usize = block.txs.iter().map(Vec::len).sum();
                    let too_big = block.txs.len() > params.max_block_txs as usize
                        || bytes > params.max_block_bytes as usize;
                    let checked = if too_big {
                        Err(crate::app::AppError::Invalid(format!(
                            "{} transactions of {bytes} bytes exceed the block limits",
                            block.txs.len()
                        )))
                    } else {
                        let started = std::time::Instant::now();
                        let checked = self.app.validate_block(&block);
                        self.chain
                            .metrics
                            .block_execution_seconds
                            .observe(started.elapsed().as_secs_f64());
                        checked
                    };
                    let valid = match checked {
                        Ok(()) => {
                            self.persist_block(&block)?;
                            true
                        }
                        Err(e) => {
                            warn!(height = block.header.height, %hash, error = %e, "refusing proposed block");
                            false
                        }
                    };
                    Some(Input::BlockValidated { hash, valid })
                }
                Effect::PersistSafety(safety) => {
                    let mut batch = WriteBatch::new();
                    batch.put(Column::Consensus, SAFETY_KEY, safety.encode());
                    // fsync: also makes every earlier write (the blocks above) durable.
                    batch.set_sync(true);
                    self.chain.blocks.kv().write(batch)?;
                    None
                }
                Effect::Broadcast(message) => {
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
                Effect::ReportEvidence(e) => {
                    warn!(offender = %e.offender(), round = e.first.round, "equivocation detected");
                    None
                }
                Effect::Certified {
                    hash,
                    height,
                    round,
                } => {
                    if let Ok(Some(block)) = self.app.block(&hash) {
                        debug!(height, round, %hash, "certified");
                        self.chain.set_certified(block.clone());
                        self.chain.notify_new_head(block.header);
                    }
                    None
                }
                Effect::Finalize { hash, height, qc } => {
                    self.finalize(hash, height, &qc)?;
                    None
                }
                Effect::NeedValidatorSet { epoch, height } => {
                    Some(self.start_epoch(epoch, height)?)
                }
            };
            if let Some(input) = follow_up {
                queue.extend(self.engine.handle(now_ms(), input));
            }
        }
        Ok(())
    }

    /// The epoch-ending block at `height` is final: load the next epoch's validator set, and
    /// drop the suffix blocks built on top of it (never final, never stored in the ledger).
    fn start_epoch(&mut self, epoch: u64, height: u64) -> Result<Input> {
        let validators = self.chain.validator_set(epoch)?;
        if let Some(proof) = self.engine.epoch_proof(epoch - 1) {
            store_epoch_proof(self.chain.blocks.kv(), epoch - 1, proof)?;
        }
        let dropped = self.app.discard_pending();
        if !self.persisted.is_empty() {
            let mut batch = WriteBatch::new();
            for (hash, _) in self.persisted.drain() {
                batch.delete(Column::Consensus, pending_key(&hash));
            }
            self.chain.blocks.kv().write(batch)?;
        }
        self.chain.reset_to_final();
        self.chain.set_epoch(epoch);
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
        Ok(Input::NewEpoch {
            epoch,
            validators: (*validators).clone(),
        })
    }

    /// Proposals, evidence and epoch proofs go to everyone by gossip; timeouts straight to
    /// every connected peer.
    fn broadcast(&self, message: ConsensusMessage) {
        let Some(net) = &self.net else {
            return;
        };
        let channel = match message {
            ConsensusMessage::Evidence(_) => Channel::Evidence,
            _ => Channel::Consensus,
        };
        let bytes = message.encode();
        if let ConsensusMessage::Timeout(_) = message {
            for peer in net.handle.peers() {
                if let Err(e) = net.handle.send_direct(peer, bytes.clone()) {
                    debug!(%peer, error = %e, "timeout not sent");
                }
            }
            return;
        }
        if let Err(e) = net.handle.publish(channel, bytes) {
            debug!(error = %e, "broadcast not sent");
        }
    }

    /// Votes go straight to the validator's peer when its binding is known, else by gossip.
    fn send_to(&self, to: keel_types::Address, message: ConsensusMessage) {
        let Some(net) = &self.net else {
            return;
        };
        let bytes = message.encode();
        let sent = match net.peer_of(&to) {
            Some(peer) => net.handle.send_direct(peer, bytes),
            None => net.handle.publish(Channel::Consensus, bytes),
        };
        if let Err(e) = sent {
            debug!(%to, error = %e, "message not sent");
        }
    }

    /// Asks peers for the blocks up to `target` above our final height, answered by
    /// [`Command::Synced`]. Far behind (peers report final heights more than a batch above
    /// ours), consecutive ranges go to up to [`SYNC_PEERS`] peers at once; the answers are
    /// applied in height order. One such round at a time.
    fn request_sync(&mut self, target: Hash) {
        let (Some(net), Some(commands)) = (&self.net, &self.commands_tx) else {
            debug!(block = %target, "missing blocks, and no peers to sync from");
            return;
        };
        let now = now_ms();
        if self
            .sync
            .as_ref()
            .is_some_and(|r| now.saturating_sub(r.sent_ms) < SYNC_TIMEOUT_MS)
        {
            return;
        }
        let have_height = self.app.final_tip().0;
        let best = net.best_height();
        let wanted = best
            .saturating_sub(have_height)
            .div_ceil(u64::from(SYNC_BATCH));
        let mut peers = Vec::new();
        for _ in 0..SYNC_PEERS * 2 {
            self.sync_salt = self.sync_salt.wrapping_add(1);
            if let Some(p) = net.sync_peer(self.sync_salt) {
                if !peers.contains(&p) {
                    peers.push(p);
                }
            }
            if peers.len() as u64 >= wanted.clamp(1, SYNC_PEERS as u64) {
                break;
            }
        }
        if peers.is_empty() {
            return;
        }
        self.sync_round = self.sync_round.wrapping_add(1);
        let round = self.sync_round;
        let mut parts = std::collections::BTreeMap::new();
        for (i, peer) in peers.into_iter().enumerate() {
            let start = have_height + i as u64 * u64::from(SYNC_BATCH);
            parts.insert(start, None);
            let request = PeerRequest::Blocks {
                target,
                have_height: start,
                max: SYNC_BATCH,
            };
            debug!(%peer, block = %target, have_height = start, "requesting blocks");
            let (handle, commands) = (net.handle.clone(), commands.clone());
            net.runtime.spawn(async move {
                let answer = match handle.request(peer, request.encode()).await {
                    Ok(bytes) => match PeerResponse::decode(&bytes) {
                        Ok(PeerResponse::Blocks { blocks, proof }) => Some((blocks, proof)),
                        _ => {
                            handle.report(peer, Report::Invalid);
                            None
                        }
                    },
                    Err(e) => {
                        debug!(%peer, error = %e, "block request failed");
                        None
                    }
                };
                let _ = commands.try_send(Command::Synced {
                    round,
                    start,
                    peer,
                    answer,
                });
            });
        }
        self.sync = Some(SyncRound {
            id: round,
            target,
            sent_ms: now,
            parts,
        });
        self.chain.set_syncing(true);
    }

    /// Files one answer of the current round and applies every answer that is next in height
    /// order; when the round is done, asks again if the last answer was full.
    fn on_synced(
        &mut self,
        round: u64,
        start: u64,
        peer: PeerId,
        answer: Option<SyncAnswer>,
    ) -> Result<()> {
        let Some(r) = self.sync.as_mut() else {
            return Ok(());
        };
        if r.id != round {
            return Ok(());
        }
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
    /// hands them to consensus, then the epoch proof. Whether anything new was applied or
    /// the answer was consistent (known blocks only).
    fn apply_synced(
        &mut self,
        peer: PeerId,
        blocks: Vec<Block>,
        proof: Option<EpochProof>,
    ) -> Result<bool> {
        let mut valid = Vec::new();
        let mut refused = false;
        for block in blocks {
            if self.app.has_block(&block.hash()) {
                continue;
            }
            match self.app.validate_block(&block) {
                Ok(()) => {
                    self.persist_block(&block)?;
                    valid.push(block);
                }
                Err(e) => {
                    debug!(%peer, height = block.header.height, error = %e, "synced block refused");
                    if let Some(net) = &self.net {
                        net.handle.report(peer, Report::Invalid);
                    }
                    refused = true;
                    break;
                }
            }
        }
        let got = valid.len();
        if got > 0 {
            if let Some(net) = &self.net {
                net.handle.report(peer, Report::Useful);
            }
            info!(%peer, blocks = got, from = valid[0].header.height, "synced blocks");
            let effects = self.engine.handle(now_ms(), Input::Synced(valid));
            self.carry_out(effects)?;
        }
        if let Some(proof) = proof {
            let effects = self.engine.handle(
                now_ms(),
                Input::Message(ConsensusMessage::EpochProof(proof)),
            );
            self.carry_out(effects)?;
        }
        Ok(!refused)
    }

    fn finalize(&mut self, hash: Hash, height: u64, qc: &QuorumCertificate) -> Result<()> {
        let written = {
            // Under the mempool lock, so admission never sees a half-updated view.
            let mut pool = self.chain.mempool();
            let written = match self.app.finalize(&hash, qc) {
                Ok(w) => w,
                Err(crate::app::AppError::Storage(e)) => return Err(e.into()),
                Err(crate::app::AppError::State(e)) => return Err(e.into()),
                Err(e) => {
                    error!(height, %hash, error = %e, "cannot finalize block");
                    return Ok(());
                }
            };
            for f in &written {
                let hashes = f.block.tx_hashes();
                pool.remove_committed(&hashes, &f.new_nonces);
                // A final transaction is never executed again: free its cache slot.
                self.chain.sig_cache().remove_all(&hashes);
            }
            if !written.is_empty() {
                self.chain.set_finalized(height, hash);
            }
            written
        };
        for f in written {
            self.chain
                .metrics
                .txs_committed
                .inc_by(f.block.txs.len() as u64);
            let failed = f.receipts.iter().filter(|r| !r.success).count();
            info!(height = f.block.header.height, round = f.block.header.round, hash = %f.block.hash(),
                  txs = f.block.txs.len(), failed, "finalized block");
            self.chain.notify_finalized_head(f.block.header);
        }
        // Forget persisted blocks at or below the final height: final now, or on a dropped fork.
        let final_height = self.app.final_tip().0;
        let stale: Vec<Hash> = self
            .persisted
            .iter()
            .filter(|(_, h)| **h <= final_height)
            .map(|(hash, _)| *hash)
            .collect();
        if !stale.is_empty() {
            let mut batch = WriteBatch::new();
            for h in &stale {
                batch.delete(Column::Consensus, pending_key(h));
                self.persisted.remove(h);
            }
            self.chain.blocks.kv().write(batch)?;
        }
        Ok(())
    }
}
