//! The consensus driver: a dedicated thread that feeds the pure consensus engine and carries
//! out its effects against the real store.
//!
//! Block execution is CPU work measured in milliseconds to seconds, so the driver runs on its
//! own OS thread rather than on the async runtime; it talks to the rest of the node through a
//! bounded command channel and the shared [`Chain`].

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_consensus::{Effect, Engine, Input, TimerKind};
use keel_state::BlockEnv;
use keel_storage::{Column, WriteBatch};
use keel_types::{merkle_root, Address, Block, Hash, Header, QuorumCertificate, Receipt};
use tracing::{debug, error, info, warn};

use crate::chain::Chain;
use crate::Result;

/// Key of the safety data in [`Column::Consensus`].
pub(crate) const SAFETY_KEY: &[u8] = b"safety";
/// Meta key of the latest block's certificate.
pub(crate) const LATEST_QC_KEY: &str = "latest_qc";

/// Commands from the node to the driver.
pub(crate) enum Command {
    /// Stop after the current effect.
    Shutdown,
}

/// A block built and executed but not yet certified and stored.
struct Built {
    block: Block,
    receipts: Vec<Receipt>,
    batch: WriteBatch,
    new_nonces: Vec<(Address, u64)>,
}

/// Wall-clock milliseconds since the Unix epoch: the only clock the driver reads.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) struct Driver {
    chain: Arc<Chain>,
    engine: Engine,
    commands: Receiver<Command>,
    timer: Option<u64>,
    built: Option<Built>,
}

impl Driver {
    pub(crate) fn new(chain: Arc<Chain>, engine: Engine, commands: Receiver<Command>) -> Driver {
        Driver {
            chain,
            engine,
            commands,
            timer: None,
            built: None,
        }
    }

    /// Runs until shutdown or a storage failure (after which the node must not continue: it
    /// could not make its votes or blocks durable).
    pub(crate) fn run(mut self) -> Result<()> {
        let start = self.engine.handle(now_ms(), Input::Start);
        self.carry_out(start)?;
        loop {
            let wait = match self.timer {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            match self.commands.recv_timeout(wait) {
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    info!("consensus driver stopped");
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.timer.is_some_and(|at| at <= now_ms()) {
                        self.timer = None;
                        let effects = self
                            .engine
                            .handle(now_ms(), Input::Timer(TimerKind::Propose));
                        self.carry_out(effects)?;
                    }
                }
            }
        }
    }

    fn carry_out(&mut self, effects: Vec<Effect>) -> Result<()> {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let follow_up = match effect {
                Effect::SetTimer {
                    kind: TimerKind::Propose,
                    at_ms,
                } => {
                    self.timer = Some(at_ms);
                    None
                }
                Effect::BuildBlock {
                    height,
                    round,
                    epoch,
                    parent_hash,
                    parent_qc,
                    timestamp_ms,
                    proposer,
                } => {
                    let input = match self.build(
                        height,
                        round,
                        epoch,
                        parent_hash,
                        parent_qc,
                        timestamp_ms,
                        proposer,
                    ) {
                        Ok(hash) => Input::BlockBuilt {
                            height,
                            round,
                            hash,
                        },
                        Err(e) => {
                            error!(height, round, error = %e, "building block failed");
                            Input::BuildFailed { height, round }
                        }
                    };
                    Some(input)
                }
                Effect::PersistSafety(safety) => {
                    let mut batch = WriteBatch::new();
                    batch.put(Column::Consensus, SAFETY_KEY, safety.encode());
                    batch.set_sync(true);
                    self.chain.blocks.kv().write(batch)?;
                    None
                }
                Effect::Commit {
                    height,
                    round,
                    hash,
                    qc,
                } => {
                    self.commit(height, round, hash, qc)?;
                    None
                }
                Effect::Finalize { height, hash } => {
                    self.finalize(height, hash)?;
                    None
                }
            };
            if let Some(input) = follow_up {
                queue.extend(self.engine.handle(now_ms(), input));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        height: u64,
        round: u64,
        epoch: u64,
        parent_hash: Hash,
        parent_qc: QuorumCertificate,
        timestamp_ms: u64,
        proposer: Address,
    ) -> Result<Hash> {
        let params = &self.chain.params;
        let txs = self.chain.mempool().select(
            params.max_block_txs as usize,
            params.max_block_bytes as usize,
        );
        let mut batch = WriteBatch::new();
        let started = std::time::Instant::now();
        let outcome =
            self.chain
                .state
                .execute_block(&BlockEnv { height, proposer, evidence: Vec::new() }, &txs, &mut batch)?;
        let header = Header {
            chain_id: self.chain.chain_id.clone(),
            height,
            round,
            epoch,
            parent_hash,
            timestamp_ms,
            proposer,
            tx_root: merkle_root(&txs.iter().map(|t| t.hash).collect::<Vec<_>>()),
            state_root: outcome.state_root,
            validators_hash: self.chain.validators.hash(),
            parent_qc,
            evidence_root: Hash::ZERO,
        };
        let block = Block {
            header,
            txs: txs.into_iter().map(|t| t.bytes).collect(),
            evidence: Vec::new(),
        };
        let hash = block.hash();
        debug!(
            height,
            txs = block.txs.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built block"
        );
        let new_nonces = outcome
            .changed
            .iter()
            .map(|(a, acc)| (*a, acc.nonce))
            .collect();
        self.built = Some(Built {
            block,
            receipts: outcome.receipts,
            batch,
            new_nonces,
        });
        Ok(hash)
    }

    fn commit(&mut self, height: u64, round: u64, hash: Hash, qc: QuorumCertificate) -> Result<()> {
        let Some(built) = self.built.take().filter(|b| b.block.hash() == hash) else {
            warn!(height, round, %hash, "asked to commit a block this node did not build");
            return Ok(());
        };
        let Built {
            block,
            receipts,
            mut batch,
            new_nonces,
        } = built;
        self.chain.blocks.stage_block(&mut batch, &block, &receipts);
        self.chain
            .blocks
            .stage_meta(&mut batch, LATEST_QC_KEY, &qc.encode());
        let included = block.tx_hashes();
        {
            // Commit under the mempool lock so admission never sees a half-updated view.
            let mut pool = self.chain.mempool();
            self.chain.blocks.kv().write(batch)?;
            pool.remove_committed(&included, &new_nonces);
            self.chain.set_latest(height, hash);
        }
        let failed = receipts.iter().filter(|r| !r.success).count();
        info!(height, round, %hash, txs = included.len(), failed, "committed block");
        self.chain.notify_new_head(block.header);
        Ok(())
    }

    fn finalize(&mut self, height: u64, hash: Hash) -> Result<()> {
        let previous = self.chain.tip().finalized.0;
        if height <= previous {
            return Ok(());
        }
        let mut batch = WriteBatch::new();
        self.chain.blocks.stage_finalized(&mut batch, height, hash);
        self.chain.blocks.kv().write(batch)?;
        self.chain.set_finalized(height, hash);
        for h in previous.saturating_add(1)..=height {
            if let Some(header) = self.chain.blocks.header_at(h)? {
                self.chain.notify_finalized_head(header);
            }
        }
        Ok(())
    }
}
