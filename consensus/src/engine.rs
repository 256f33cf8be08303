//! The consensus engine: 2-chain HotStuff (Jolteon / DiemBFT v4 family) as a pure state
//! machine. Inputs in, effects out; time arrives with every input.
//!
//! Rounds. Each round has a stake-weighted leader. The leader proposes a block extending the
//! highest certified block it knows (its `high_qc`); if the previous round ended in a timeout
//! certificate (TC) rather than a certificate of the parent, the proposal carries the TC.
//! Validators re-execute the block (the node does, on [`Effect::ValidateBlock`]) and vote;
//! votes go to the next round's leader, which aggregates more than 2/3 of the stake into a
//! quorum certificate (QC) and proposes in the next round. A round that makes no progress
//! times out: validators broadcast signed timeouts carrying their `high_qc`; more than 2/3 of
//! the stake of them form a TC that moves everyone to the next round.
//!
//! Safety (the voting rule): vote for a block of round `r` only if `r` is above the last round
//! voted or timed out in, and either its QC is for round `r - 1`, or it carries a TC for round
//! `r - 1` and its QC is at least as high as every `high_qc` in that TC. Commit (2-chain
//! rule): a block is final when it has a certified child in the very next round.
//!
//! Epochs. Epoch `e` ends with its block at height `(e + 1) * epoch_length`. Blocks proposed
//! above it before it is final are empty "suffix" blocks that only exist to certify it; a
//! 2-chain commit of a suffix block makes the epoch-ending block final, and nothing above it.
//! The engine then asks the node for the next epoch's validator set
//! ([`Effect::NeedValidatorSet`]), drops the suffix, and restarts rounds in the new epoch
//! ([`Input::NewEpoch`]) from the epoch-ending block and its certificate, which stand in for
//! a certificate of round `epoch_base_round(e + 1)`. Rounds are packed `(epoch, round)` pairs
//! (`keel_types::round_epoch`), so everything signed names its epoch. Validators still in the
//! old epoch learn of the switch from an [`EpochProof`] (broadcast by those who saw the commit,
//! and sent in reply to old-epoch messages) or by syncing a block of the new epoch.

use std::collections::{BTreeMap, HashMap, HashSet};

use keel_types::{
    epoch_base_round, round_epoch, verify_batch, Address, Block, ConsensusMessage, EpochProof,
    Evidence, Hash, Header, Keypair, Proposal, PublicKey, QuorumCertificate, Signature, Timeout,
    TimeoutCertificate, TimeoutSignature, Vote, VoteSignature,
};

use crate::{Error, Result, ValidatorSet};

/// Largest round gap to the future a vote or timeout may have before it is ignored (bounds
/// the memory a peer can make us hold; certificates still move us forward any distance).
const MAX_FUTURE_ROUNDS: u64 = 64;
/// Most pieces of evidence held for inclusion.
const MAX_EVIDENCE_POOL: usize = 256;
/// Most votes of the next epoch held until this node switches to it.
const MAX_NEXT_EPOCH_VOTES: usize = 256;
/// Most proposals held while the node validates them.
const MAX_PENDING_PROPOSALS: usize = 16;
/// Largest allowed lead of a proposal's timestamp over our clock.
const MAX_CLOCK_DRIFT_MS: u64 = 10_000;
/// Most validators remembered as sent an [`EpochProof`] (the memory is cleared when full).
const MAX_PROOF_REPLIES: usize = 1024;
/// Epoch proofs kept for validators several epochs behind.
const KEPT_EPOCH_PROOFS: usize = 16;
/// Leader reputation: the final blocks looked at (their proposers, the signers of their
/// parents' certificates and the failed leaders they list), across epoch boundaries.
const REPUTATION_WINDOW: usize = 20;
/// How many of the newest final headers [`Engine::restore_history`] keeps: a restarted node
/// hands it that many so its leader schedule agrees with the other validators' at once.
pub const HISTORY_HEADERS: usize = 2 * REPUTATION_WINDOW;
/// Leader reputation: only final blocks of rounds at least this far below the round are
/// looked at, so that validators in that round have all committed them and agree. In a
/// round `r` that started with a certificate every validator holds the final blocks up to
/// round `r - 2`, and votes name the leader of `r + 1`: 3 is the least that agrees without
/// a fault, 5 leaves two rounds for a late certificate.
const REPUTATION_LAG: u64 = 5;
/// Leader reputation: fewer final blocks than this (at the start of a chain) and the
/// validators lead in turn. Two is the least that holds a certificate signed by a quorum (the
/// first block carries the genesis certificate, signed by no one), so that the active
/// validators hold more than two thirds of the stake and a dead one among them cannot leave
/// only dead leaders to choose from; three holds two such certificates.
const REPUTATION_MIN_HISTORY: usize = 3;
/// Leader reputation: when the newest final block it reads is this many rounds below the
/// round (counting from the epoch's first round if that block is of an earlier epoch),
/// reputation is stale, because nothing became final since: leaders are drawn by stake alone
/// until a block is final again. Normally the newest block read is one or two rounds more
/// than [`REPUTATION_LAG`] below; reputation leaves a failed leader out within a few rounds,
/// so six rounds more without a final block means the schedule itself may stall the chain (a
/// byzantine validator left as the only one weighing 1000, the others' one failure each
/// never outweighed because nothing becomes final: simulation seed 5242).
const REPUTATION_STALE_ROUNDS: u64 = REPUTATION_LAG + 7;
/// Leader reputation: the weight (times stake) of a validator that proposed or voted in the
/// window and did not fail as leader since it last proposed.
const ACTIVE_WEIGHT: u64 = 1000;
/// ... of one that neither proposed nor voted in the window (a new or returning validator:
/// drawn now and then, so it can show it is back).
const INACTIVE_WEIGHT: u64 = 10;
/// ... of one whose latest round as leader in the window failed (a crashed, silent or
/// faulty leader: drawn about once in a thousand rounds while it stays in the window).
const FAILED_WEIGHT: u64 = 1;

/// How a round's leader is drawn (see [`Engine::leader_weights`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeaderBasis {
    /// One after the other: too little history.
    InTurn,
    /// By stake alone: the history is stale (nothing final for many rounds).
    Stake,
    /// By stake times the reputation read from the window whose newest block is of round
    /// `newest`.
    Reputation { newest: u64 },
}

/// What leader reputation remembers of a final block.
#[derive(Clone, Debug)]
struct Participation {
    round: u64,
    proposer: Address,
    /// Signers of the certificate the block carries (of its parent).
    signers: Vec<Address>,
    /// The leaders of the rounds just below it that certified no block, oldest first: the
    /// last of them led round `round - 1`.
    failed: Vec<Address>,
}

/// Height of the block that ends `epoch`: `(epoch + 1) * epoch_length`.
pub fn epoch_end_height(epoch: u64, epoch_length: u64) -> u64 {
    epoch.saturating_add(1).saturating_mul(epoch_length.max(1))
}

/// The epoch of the block after the final block at `final_height`: a final epoch-ending block
/// starts the next epoch. The ledger block at height `h >= 1` is in epoch
/// `epoch_of_next_block(h - 1, epoch_length)`.
pub fn epoch_of_next_block(final_height: u64, epoch_length: u64) -> u64 {
    final_height / epoch_length.max(1)
}

/// Consensus timing and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Chain id, bound into every signature.
    pub chain_id: String,
    /// Time between a block and its child.
    pub block_time_ms: u64,
    /// Base round timeout; doubles with each consecutive timed-out round.
    pub timeout_ms: u64,
    /// Cap of the round timeout after back-off.
    pub max_timeout_ms: u64,
    /// Blocks per epoch (genesis `params.epoch_length`, at least 1).
    pub epoch_length: u64,
}

/// The final block the node has stored: where consensus continues from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tip {
    /// Its height (0 = genesis).
    pub height: u64,
    /// Its hash.
    pub hash: Hash,
    /// The round it was certified in.
    pub round: u64,
    /// Its header timestamp.
    pub timestamp_ms: u64,
    /// Its certificate.
    pub qc: QuorumCertificate,
}

/// What a validator must remember across restarts so it never votes twice in a round or
/// against the voting rule.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SafetyData {
    /// Highest round this validator voted or timed out in.
    pub last_voted_round: u64,
    /// Highest certificate it knows.
    pub highest_qc: QuorumCertificate,
}

impl SafetyData {
    /// Stable encoding: the round (8 bytes little-endian) then the certificate's prost bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.last_voted_round.to_le_bytes().to_vec();
        out.extend(self.highest_qc.encode());
        out
    }

    /// Decodes what [`SafetyData::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<SafetyData> {
        let (round, qc) = bytes.split_first_chunk::<8>().ok_or_else(|| {
            Error::CorruptSafetyData(format!("{} bytes is too short", bytes.len()))
        })?;
        Ok(SafetyData {
            last_voted_round: u64::from_le_bytes(*round),
            highest_qc: QuorumCertificate::decode(qc)
                .map_err(|e| Error::CorruptSafetyData(e.to_string()))?,
        })
    }
}

/// Who sent a message, as the node names it (a peer): consensus hands it back in
/// [`Effect::Invalid`] when the message proves its sender faulty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin(pub u64);

impl Origin {
    /// This node itself, or a source that is no peer (the node's own store, a test).
    pub const LOCAL: Origin = Origin(0);
}

/// Timers the engine asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Time for this node, the round's leader, to propose.
    Propose,
    /// The current round has run out of time.
    RoundTimeout,
}

/// What the node is asked to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildRequest {
    /// Height of the new block.
    pub height: u64,
    /// Its round.
    pub round: u64,
    /// Its epoch.
    pub epoch: u64,
    /// The parent it extends.
    pub parent_hash: Hash,
    /// The parent's certificate, to put in the header.
    pub parent_qc: QuorumCertificate,
    /// Header timestamp.
    pub timestamp_ms: u64,
    /// Proposer address for the header.
    pub proposer: Address,
    /// Hash of the validator set, for the header.
    pub validators_hash: Hash,
    /// Evidence to include.
    pub evidence: Vec<Evidence>,
    /// The leaders of the rounds since the parent's certificate that certified nothing, for
    /// the header (oldest first, the newest [`keel_types::MAX_FAILED_PROPOSERS`]).
    pub failed_proposers: Vec<Address>,
    /// A suffix block (above the block ending the epoch): build it with no transactions and
    /// no evidence.
    pub empty: bool,
}

/// Everything that can happen to consensus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The node is up; consensus may schedule its first timers.
    Start,
    /// A timer set by [`Effect::SetTimer`] fired.
    Timer(TimerKind),
    /// A message from the network (signatures not yet checked).
    Message {
        /// Who sent it.
        from: Origin,
        /// The message.
        message: ConsensusMessage,
    },
    /// The node built and executed the block asked for by [`Effect::BuildBlock`].
    BlockBuilt(Block),
    /// Building failed (e.g. a storage error).
    BuildFailed {
        /// The round it was for.
        round: u64,
    },
    /// The outcome of [`Effect::ValidateBlock`].
    BlockValidated {
        /// The block.
        hash: Hash,
        /// Whether re-execution matched its header.
        valid: bool,
    },
    /// Blocks the node fetched and validated after [`Effect::RequestSync`] (or reloaded at
    /// restart), ancestors first. The node vouches that each is certified: a block of the
    /// next epoch whose parent ends the current one proves that parent final.
    Synced(Vec<Block>),
    /// The validator set asked for by [`Effect::NeedValidatorSet`].
    NewEpoch {
        /// The epoch now starting.
        epoch: u64,
        /// Its validators.
        validators: ValidatorSet,
    },
}

/// What the node must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Fire `Input::Timer(kind)` at `at_ms` (replacing a pending timer of the same kind).
    SetTimer {
        /// Which timer.
        kind: TimerKind,
        /// When, in the node's clock (milliseconds).
        at_ms: u64,
    },
    /// Build a block from the mempool on the parent, execute it, answer with
    /// [`Input::BlockBuilt`] or [`Input::BuildFailed`].
    BuildBlock(BuildRequest),
    /// Re-execute a proposed block on its parent and check its header; answer with
    /// [`Input::BlockValidated`].
    ValidateBlock(Block),
    /// Make this safety data durable (fsync) before carrying out the effects after it.
    PersistSafety(SafetyData),
    /// Send to every validator.
    Broadcast(ConsensusMessage),
    /// Send to one validator.
    SendTo {
        /// The recipient.
        to: Address,
        /// The message.
        message: ConsensusMessage,
    },
    /// A block got a certificate: the chain's latest certified head.
    Certified {
        /// Its hash.
        hash: Hash,
        /// Its height.
        height: u64,
        /// Its round.
        round: u64,
    },
    /// This block and all its ancestors are final: store them.
    Finalize {
        /// Its hash.
        hash: Hash,
        /// Its height.
        height: u64,
        /// Its certificate.
        qc: QuorumCertificate,
    },
    /// Fetch the block certified by `qc` and its missing ancestors from peers, validate them
    /// and answer with [`Input::Synced`].
    RequestSync {
        /// The certificate of the block wanted.
        qc: QuorumCertificate,
    },
    /// Equivocation was detected or learnt: keep it for inclusion and gossip it.
    ReportEvidence(Evidence),
    /// A message was invalid in a way no honest validator's ever is (a bad signature, a signer
    /// outside the set, a certificate that does not verify, a round or epoch that cannot
    /// exist): score its sender down. Messages that are only late, early or for a leader this
    /// node does not expect are ignored without it, since honest validators send those too.
    Invalid {
        /// Who sent it (never [`Origin::LOCAL`]).
        from: Origin,
        /// What was wrong.
        reason: &'static str,
    },
    /// The block ending the epoch is final (the [`Effect::Finalize`] before this one): compute
    /// the validator set of `epoch` from the final state at `height` and answer with
    /// [`Input::NewEpoch`]. Until then the engine ignores every other input.
    NeedValidatorSet {
        /// The epoch starting.
        epoch: u64,
        /// Height of the epoch-ending block, whose state decides the set.
        height: u64,
    },
}

/// What consensus knows of a validated block.
#[derive(Clone, Debug)]
struct BlockMeta {
    height: u64,
    round: u64,
    parent: Hash,
    timestamp_ms: u64,
    parent_qc: QuorumCertificate,
    /// Ids of the evidence the block carries.
    evidence: Vec<Hash>,
    /// The header, for the [`EpochProof`] a certified suffix block becomes (None for the tip).
    header: Option<Header>,
}

/// Votes for one block in one round, collected by that round's next leader. Signatures are
/// checked in one batch when the votes could form a quorum.
#[derive(Default)]
struct VoteSet {
    votes: BTreeMap<Address, Vote>,
    verified: HashSet<Address>,
    /// Who sent each vote not verified yet, to score it if its signature turns out bad.
    origins: HashMap<Address, Origin>,
}

/// The consensus state machine.
pub struct Engine {
    config: Config,
    key: Keypair,
    validators: ValidatorSet,
    epoch: u64,
    /// Height and hash of the block the epoch started from (genesis for epoch 0); its
    /// certificate counts as one of round `epoch_base_round(epoch)`. Zero when the engine
    /// started above it (it is then below the final tip and nothing can extend it).
    epoch_genesis: (u64, Hash, u64),
    /// The certificate this node holds for the epoch's starting block.
    epoch_genesis_qc: QuorumCertificate,
    /// The previous epoch's set, to check other certificates of the starting block.
    previous_validators: Option<ValidatorSet>,
    /// Waiting for [`Input::NewEpoch`].
    awaiting_set: bool,
    /// Proofs that recent epochs ended (by the epoch ended), served to validators still in
    /// them; the last [`KEPT_EPOCH_PROOFS`].
    epoch_proofs: BTreeMap<u64, EpochProof>,
    /// The newest final blocks, oldest first (at most [`HISTORY_HEADERS`], across epochs),
    /// for leader reputation.
    history: std::collections::VecDeque<Participation>,
    /// Reputation weights of the current set's validators (in set order) for the last
    /// window looked at, keyed by (epoch, the window's newest round).
    #[allow(clippy::type_complexity)]
    weights_memo: std::cell::RefCell<Option<((u64, u64), Vec<u64>)>>,
    /// Validators this node saw fail as leader or as the collector of its vote (see
    /// [`Engine::back_off`]), since they last proposed a valid block.
    suspects: HashSet<Address>,
    /// The round this node voted for a proposal in (not a timeout).
    voted_round: u64,
    /// The sender of the message being handled ([`Origin::LOCAL`] for any other input).
    origin: Origin,
    /// Proposals of the next epoch received before switching to it (bounded).
    next_epoch_proposals: Vec<Proposal>,
    /// Votes of the next epoch received before switching to it (bounded): a validator that
    /// saw the epoch end a moment earlier votes for its first block and, unlike a timeout,
    /// never sends that vote again.
    next_epoch_votes: Vec<Vote>,
    /// A proof waiting for the blocks below it to be synced.
    stashed_proof: Option<EpochProof>,
    /// The certificate that made the final tip final (see [`Timeout::commit_qc`]); none
    /// after a restart or an epoch change.
    commit_qc: Option<QuorumCertificate>,
    /// A commit certificate learnt from a timeout, waiting for its block to be synced.
    stashed_commit: Option<QuorumCertificate>,
    /// Validators sent the epoch proof in the current round.
    proof_replies: HashMap<Address, u64>,
    safety: SafetyData,
    round: u64,
    high_qc: QuorumCertificate,
    high_tc: Option<TimeoutCertificate>,
    blocks: HashMap<Hash, BlockMeta>,
    final_tip: Tip,
    certified_head: (u64, Hash),
    votes: HashMap<(u64, Hash), VoteSet>,
    voters: HashMap<(u64, Address), Vote>,
    timeouts: HashMap<u64, BTreeMap<Address, Timeout>>,
    pending: HashMap<Hash, Proposal>,
    verified_qcs: HashSet<(Hash, u64)>,
    evidence: BTreeMap<Hash, Evidence>,
    proposed_round: u64,
    building: Option<u64>,
    consecutive_timeouts: u32,
    last_timeout_round: u64,
    /// When the current round's timer first fires (before any rebroadcast).
    round_deadline_ms: u64,
    /// The current round kept the previous round's deadline (see `continue_round`): a
    /// proposal of the round gives it a full timeout again.
    round_timer_kept: bool,
    started: bool,
}

impl Engine {
    /// An engine continuing from the final `tip` with persisted `safety` data (None on first
    /// start). `validators` is the set of the tip's next epoch
    /// ([`epoch_of_next_block`]`(tip.height)`). A key outside the set follows the chain
    /// without voting, proposing or timing out.
    pub fn new(
        config: Config,
        key: Keypair,
        validators: ValidatorSet,
        tip: Tip,
        safety: Option<SafetyData>,
    ) -> Result<Engine> {
        if config.epoch_length == 0 {
            return Err(Error::InvalidValidatorSet(
                "epoch_length must be at least 1".into(),
            ));
        }
        let epoch = epoch_of_next_block(tip.height, config.epoch_length);
        let mut safety = safety.unwrap_or_else(|| SafetyData {
            last_voted_round: tip.round,
            highest_qc: tip.qc.clone(),
        });
        // A certificate of an earlier epoch cannot be checked against this epoch's set: start
        // from the tip's, which every validator of the epoch holds.
        if round_epoch(safety.highest_qc.round) < epoch || safety.highest_qc.height < tip.height {
            safety.highest_qc = tip.qc.clone();
        }
        let epoch_genesis = if tip.height % config.epoch_length == 0 {
            (tip.height, tip.hash, tip.round)
        } else {
            (0, Hash::ZERO, 0)
        };
        let mut blocks = HashMap::new();
        blocks.insert(
            tip.hash,
            BlockMeta {
                height: tip.height,
                round: tip.round,
                parent: Hash::ZERO,
                timestamp_ms: tip.timestamp_ms,
                parent_qc: QuorumCertificate::default(),
                evidence: Vec::new(),
                header: None,
            },
        );
        // The highest certificate we can build on is the tip's until the blocks above it are
        // reloaded or synced; the persisted one is restored by `Synced` when its block comes back.
        let high_qc = tip.qc.clone();
        // The current round follows from certificates, never from the vote record: a validator
        // that restarts after voting in round r must still be able to time out round r with
        // the others, or no TC forms. `last_voted_round` only stops it voting again.
        let round = safety
            .highest_qc
            .round
            .max(tip.round)
            .max(epoch_base_round(epoch))
            .saturating_add(1);
        Ok(Engine {
            certified_head: (tip.height, tip.hash),
            config,
            key,
            validators,
            epoch,
            epoch_genesis,
            epoch_genesis_qc: tip.qc.clone(),
            previous_validators: None,
            awaiting_set: false,
            epoch_proofs: BTreeMap::new(),
            stashed_proof: None,
            commit_qc: None,
            stashed_commit: None,
            next_epoch_proposals: Vec::new(),
            next_epoch_votes: Vec::new(),
            history: std::collections::VecDeque::new(),
            weights_memo: std::cell::RefCell::new(None),
            suspects: HashSet::new(),
            voted_round: 0,
            origin: Origin::LOCAL,
            proof_replies: HashMap::new(),
            safety,
            round,
            high_qc,
            high_tc: None,
            blocks,
            final_tip: tip,
            votes: HashMap::new(),
            voters: HashMap::new(),
            timeouts: HashMap::new(),
            pending: HashMap::new(),
            verified_qcs: HashSet::new(),
            evidence: BTreeMap::new(),
            proposed_round: 0,
            building: None,
            consecutive_timeouts: 0,
            last_timeout_round: 0,
            round_deadline_ms: 0,
            round_timer_kept: false,
            started: false,
        })
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The final block.
    pub fn final_tip(&self) -> &Tip {
        &self.final_tip
    }

    /// Height and hash of the highest certified block.
    pub fn certified_head(&self) -> (u64, Hash) {
        self.certified_head
    }

    /// The current safety data.
    pub fn safety(&self) -> &SafetyData {
        &self.safety
    }

    /// The validator set in use.
    pub fn validators(&self) -> &ValidatorSet {
        &self.validators
    }

    /// This validator's address.
    pub fn address(&self) -> Address {
        self.key.address()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The certificate that made the final tip final: it certifies the tip's child, whose
    /// round follows the tip's (the 2-chain). None until the first commit after a start or an
    /// epoch switch. Light-client proofs of the final tip need it (`keel_node::light`).
    pub fn commit_qc(&self) -> Option<&QuorumCertificate> {
        self.commit_qc.as_ref()
    }

    /// The proof that epoch `ended` ended, if this engine saw or built one (to store and
    /// serve to peers syncing across the boundary).
    pub fn epoch_proof(&self, ended: u64) -> Option<&EpochProof> {
        self.epoch_proofs.get(&ended)
    }

    /// Whether the engine waits for the next epoch's validator set.
    pub fn awaiting_validator_set(&self) -> bool {
        self.awaiting_set
    }

    fn is_member(&self) -> bool {
        self.validators.get(&self.key.address()).is_some()
    }

    /// The address of the leader of `round` as this validator sees it now (for logs).
    pub fn leader_address(&self, round: u64) -> Address {
        self.leader(round).address
    }

    /// How the leader of `round` is drawn, from what this validator holds now: `None` when
    /// the validators lead in turn, else each validator's weight (the draw is by stake times
    /// weight): its reputation weight, or 1 for all when reputation is stale.
    pub fn leader_weights(&self, round: u64) -> Option<Vec<(Address, u64)>> {
        let weights: Vec<u64> = match self.leader_basis(round) {
            LeaderBasis::InTurn => return None,
            LeaderBasis::Stake => vec![1; self.validators.len()],
            LeaderBasis::Reputation { newest } => self.with_weights(round, newest, |w| w.to_vec()),
        };
        Some(
            self.validators
                .validators()
                .iter()
                .zip(weights)
                .map(|(v, w)| (v.address, w))
                .collect(),
        )
    }

    /// The leader of `round`: drawn by stake times reputation weight (as Aptos's proposer
    /// election, after DiemBFT v4), the weights read from the last [`REPUTATION_WINDOW`]
    /// final blocks of rounds at least [`REPUTATION_LAG`] below `round`, whatever their
    /// epoch. A validator whose latest round as leader failed (listed in a header's
    /// `failed_proposers` after it last proposed) weighs [`FAILED_WEIGHT`], one that
    /// proposed or voted [`ACTIVE_WEIGHT`], any other [`INACTIVE_WEIGHT`]. With fewer than
    /// [`REPUTATION_MIN_HISTORY`] such blocks (the start of a chain), the validators in turn
    /// ([`ValidatorSet::leader_in_turn`]); when the newest of them is
    /// [`REPUTATION_STALE_ROUNDS`] or more below `round` (nothing became final since), by
    /// stake alone.
    fn leader(&self, round: u64) -> &crate::Validator {
        match self.leader_basis(round) {
            LeaderBasis::InTurn => self.validators.leader_in_turn(round),
            LeaderBasis::Stake => self.validators.leader_weighted(round, &[]),
            LeaderBasis::Reputation { newest } => {
                self.with_weights(round, newest, |w| self.validators.leader_weighted(round, w))
            }
        }
    }

    fn leader_basis(&self, round: u64) -> LeaderBasis {
        let cutoff = round.saturating_sub(REPUTATION_LAG);
        let mut looked_at = self.history.iter().rev().filter(|p| p.round <= cutoff);
        let Some(newest) = looked_at.next() else {
            return LeaderBasis::InTurn;
        };
        if looked_at.take(REPUTATION_MIN_HISTORY - 1).count() < REPUTATION_MIN_HISTORY - 1 {
            return LeaderBasis::InTurn;
        }
        // A newest block of an earlier epoch counts as of this epoch's base round: the
        // rounds of the epoch before after it are unknown here, and few.
        let newest_round = if round_epoch(newest.round) == round_epoch(round) {
            newest.round
        } else {
            epoch_base_round(round_epoch(round))
        };
        if round.saturating_sub(newest_round) >= REPUTATION_STALE_ROUNDS {
            return LeaderBasis::Stake;
        }
        LeaderBasis::Reputation {
            newest: newest.round,
        }
    }

    /// Runs `f` on the reputation weights of `round`, whose window's newest block is of
    /// round `newest` ([`LeaderBasis::Reputation`]), in set order. The window is fixed by its
    /// newest block (history only grows), so the weights are computed once per window, not
    /// once per vote.
    fn with_weights<T>(&self, round: u64, newest: u64, f: impl FnOnce(&[u64]) -> T) -> T {
        let cutoff = round.saturating_sub(REPUTATION_LAG);
        let key = (self.epoch, newest);
        let mut memo = self.weights_memo.borrow_mut();
        if memo.as_ref().map(|m| m.0) != Some(key) {
            *memo = Some((key, self.reputation(cutoff)));
        }
        f(memo.as_ref().map(|m| m.1.as_slice()).unwrap_or_default())
    }

    /// Reputation weights of the current set (in set order) from the last
    /// [`REPUTATION_WINDOW`] final blocks of rounds up to `cutoff`.
    fn reputation(&self, cutoff: u64) -> Vec<u64> {
        let mut proposed: HashMap<Address, u64> = HashMap::new();
        let mut failed: HashMap<Address, u64> = HashMap::new();
        let mut voted: HashSet<Address> = HashSet::new();
        for p in self
            .history
            .iter()
            .rev()
            .filter(|p| p.round <= cutoff)
            .take(REPUTATION_WINDOW)
        {
            let at = proposed.entry(p.proposer).or_default();
            *at = (*at).max(p.round);
            voted.extend(p.signers.iter().copied());
            // The failed leaders led the rounds just below the block's, the last `round - 1`.
            let first = p.round.saturating_sub(p.failed.len() as u64);
            for (i, leader) in p.failed.iter().enumerate() {
                let at = failed.entry(*leader).or_default();
                *at = (*at).max(first.saturating_add(i as u64));
            }
        }
        self.validators
            .validators()
            .iter()
            .map(|v| {
                let last_proposed = proposed.get(&v.address);
                match failed.get(&v.address) {
                    Some(f) if last_proposed.is_none_or(|p| f > p) => FAILED_WEIGHT,
                    _ if last_proposed.is_some() || voted.contains(&v.address) => ACTIVE_WEIGHT,
                    _ => INACTIVE_WEIGHT,
                }
            })
            .collect()
    }

    /// The leaders of the rounds after `qc_round` and before `round` (which certified no
    /// block on the branch a proposal extends), the newest
    /// [`keel_types::MAX_FAILED_PROPOSERS`] of them, oldest first.
    fn failed_leaders(&self, qc_round: u64, round: u64) -> Vec<Address> {
        let first = qc_round
            .saturating_add(1)
            .max(round.saturating_sub(keel_types::MAX_FAILED_PROPOSERS as u64));
        (first..round).map(|r| self.leader(r).address).collect()
    }

    /// The address of the leader of `round`, as this engine computes it.
    pub fn leader_of(&self, round: u64) -> Address {
        self.leader(round).address
    }

    /// Gives the newest final headers (oldest first, at most [`HISTORY_HEADERS`] are kept)
    /// after a restart, so the leader schedule agrees with the other validators' at once.
    pub fn restore_history(&mut self, headers: &[keel_types::Header]) {
        for h in headers {
            self.remember(h);
        }
    }

    fn remember(&mut self, h: &keel_types::Header) {
        if round_epoch(h.round) != h.epoch || h.epoch > self.epoch {
            return;
        }
        if self.history.back().is_some_and(|p| p.round >= h.round) {
            return;
        }
        self.history.push_back(Participation {
            round: h.round,
            proposer: h.proposer,
            signers: h.parent_qc.signatures.iter().map(|s| s.validator).collect(),
            failed: h.failed_proposers.clone(),
        });
        while self.history.len() > HISTORY_HEADERS {
            self.history.pop_front();
        }
    }

    fn epoch_end(&self) -> u64 {
        epoch_end_height(self.epoch, self.config.epoch_length)
    }

    /// The highest certificate known.
    pub fn high_qc(&self) -> &QuorumCertificate {
        &self.high_qc
    }

    /// Reports the message being handled as invalid (see [`Effect::Invalid`]).
    fn invalid(&self, reason: &'static str, out: &mut Vec<Effect>) {
        if self.origin != Origin::LOCAL {
            out.push(Effect::Invalid {
                from: self.origin,
                reason,
            });
        }
    }

    /// Reports the message being handled for carrying `qc`, which did not verify; unless the
    /// certificate is of a block at or below the final tip: a restarted engine cannot check
    /// every old certificate (the one of its epoch's first block was signed by the previous
    /// set), and an honest validator that lags may still send one.
    fn invalid_qc(&self, qc: &QuorumCertificate, reason: &'static str, out: &mut Vec<Effect>) {
        if qc.height > self.final_tip.height {
            self.invalid(reason, out);
        }
    }

    /// Evidence waiting for inclusion.
    pub fn evidence_pool(&self) -> impl Iterator<Item = &Evidence> {
        self.evidence.values()
    }

    /// Handles one input at time `now_ms`.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        if self.awaiting_set && !matches!(input, Input::NewEpoch { .. }) {
            // The epoch is over and the next set is not known: nothing can be checked.
            if let Input::BuildFailed { .. } | Input::BlockBuilt(_) = input {
                self.building = None;
            }
            return out;
        }
        match input {
            Input::NewEpoch { epoch, validators } => {
                self.start_epoch(now_ms, epoch, validators, &mut out)
            }
            Input::Start => {
                if !self.started {
                    self.started = true;
                    self.enter_round(now_ms, self.round, &mut out);
                }
            }
            Input::Timer(TimerKind::Propose) => self.try_propose(now_ms, &mut out),
            Input::Timer(TimerKind::RoundTimeout) => self.on_round_timeout(now_ms, &mut out),
            Input::Message { from, message } => {
                self.origin = from;
                self.on_message(now_ms, message, &mut out);
                self.origin = Origin::LOCAL;
            }
            Input::BlockBuilt(block) => self.on_block_built(now_ms, block, &mut out),
            Input::BuildFailed { round } => {
                if self.building == Some(round) {
                    self.building = None;
                    self.proposed_round = self.proposed_round.min(round.saturating_sub(1));
                    let retry = self.config.block_time_ms.clamp(1, 1000);
                    out.push(Effect::SetTimer {
                        kind: TimerKind::Propose,
                        at_ms: now_ms.saturating_add(retry),
                    });
                }
            }
            Input::BlockValidated { hash, valid } => {
                self.on_block_validated(now_ms, hash, valid, &mut out)
            }
            Input::Synced(blocks) => self.on_synced(now_ms, blocks, &mut out),
        }
        out
    }

    /// Blocks fetched by sync (`Input::Synced`), oldest first.
    fn on_synced(&mut self, now_ms: u64, blocks: Vec<Block>, out: &mut Vec<Effect>) {
        for block in blocks {
            let h = &block.header;
            // Blocks of another epoch cannot be checked here: a later epoch is entered through
            // an `EpochProof` (which sync answers carry), and the host hands the blocks of a
            // sync answer on again when consensus asks for them after the switch.
            if h.epoch != self.epoch || round_epoch(h.round) != h.epoch {
                continue;
            }
            // A peer's word is not enough: every certificate is checked before it can
            // move the round or make anything final.
            if h.parent_qc.block_hash != h.parent_hash || !self.verify_qc(&h.parent_qc) {
                break;
            }
            self.insert_block(&block);
            self.on_qc(now_ms, block.header.parent_qc.clone(), out);
            if self.awaiting_set {
                break;
            }
        }
        if self.awaiting_set {
            return;
        }
        if let Some(proof) = self.stashed_proof.take() {
            self.on_epoch_proof(proof, false, out);
            if self.awaiting_set {
                return;
            }
        }
        // The persisted highest certificate may be for a block just restored.
        let persisted = self.safety.highest_qc.clone();
        if persisted.round > self.high_qc.round && self.blocks.contains_key(&persisted.block_hash) {
            self.on_qc(now_ms, persisted, out);
        }
        // A commit certificate from a timeout whose block just came.
        if let Some(qc) = self.stashed_commit.take() {
            if self.blocks.contains_key(&qc.block_hash) {
                self.on_qc(now_ms, qc, out);
                if self.awaiting_set {
                    return;
                }
            } else {
                self.stashed_commit = Some(qc);
            }
        }
        // The highest certificate may have come (in a timeout, say) before the block
        // it certifies: now that the block is here, it can make its parent final.
        let high = self.high_qc.clone();
        if self.blocks.contains_key(&high.block_hash) {
            self.on_qc(now_ms, high, out);
            if self.awaiting_set {
                return;
            }
        }
        self.try_propose(now_ms, out);
    }

    // ----- rounds -----

    /// The timeout of `round`. Exponential back-off up to `max_timeout_ms` (the node sets 4x
    /// `timeout_ms`: enough to outgrow a slow network, short enough that a crashed leader
    /// costs seconds), except in a round that waits on a validator already seen failing (its
    /// leader, or the next leader, whose proposal ends it): that round says nothing about the
    /// network and gets the base timeout, so a dead validator drawn again before reputation
    /// stops drawing it costs one `timeout_ms`, not the backed-off one.
    fn round_timeout_ms(&self, round: u64) -> u64 {
        let base = self.config.timeout_ms;
        let waits_on_suspect = [round, round.saturating_add(1)]
            .iter()
            .any(|r| self.suspects.contains(&self.leader(*r).address));
        if waits_on_suspect {
            return base;
        }
        let factor = 1u64 << self.consecutive_timeouts.min(16);
        base.saturating_mul(factor)
            .min(self.config.max_timeout_ms.max(base))
    }

    fn enter_round(&mut self, now_ms: u64, round: u64, out: &mut Vec<Effect>) {
        let deadline = now_ms.saturating_add(self.round_timeout_ms(round));
        self.enter_round_until(now_ms, round, deadline, out);
    }

    /// Enter `round` with its timer set to fire at `deadline_ms`.
    fn enter_round_until(
        &mut self,
        now_ms: u64,
        round: u64,
        deadline_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        self.round = round;
        self.round_deadline_ms = deadline_ms;
        self.round_timer_kept = false;
        self.prune_rounds();
        out.push(Effect::SetTimer {
            kind: TimerKind::RoundTimeout,
            at_ms: deadline_ms,
        });
        if self.leader(round).address == self.key.address() {
            let parent_ts = self
                .blocks
                .get(&self.high_qc.block_hash)
                .map(|b| b.timestamp_ms)
                .unwrap_or(0);
            let at_ms = parent_ts
                .saturating_add(self.config.block_time_ms)
                .max(now_ms);
            out.push(Effect::SetTimer {
                kind: TimerKind::Propose,
                at_ms,
            });
        }
    }

    fn advance_to(&mut self, now_ms: u64, round: u64, out: &mut Vec<Effect>) {
        if round > self.round {
            self.enter_round(now_ms, round, out);
        }
    }

    /// Gives the current round a full timeout from now.
    fn restart_round_timer(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        self.round_timer_kept = false;
        self.round_deadline_ms = now_ms.saturating_add(self.round_timeout_ms(self.round));
        out.push(Effect::SetTimer {
            kind: TimerKind::RoundTimeout,
            at_ms: self.round_deadline_ms,
        });
    }

    /// Move from round `r` to `r + 1` on a certificate of `r` learnt from a timeout, not from
    /// the proposal of `r + 1`, keeping round `r`'s deadline. Round `r` normally ends when the
    /// proposal of `r + 1` brings its certificate, so its timer already measured the wait for
    /// that proposal; starting a fresh one would make a dead leader of `r + 1` cost two
    /// timeouts. That is the case when the leader of `r + 1` is dead and the leader after it
    /// collected the votes of `r`: the others hear of the certificate only in its timeout of
    /// `r + 1`, at about the time their own timer of `r` fires. A proposal of `r + 1` that
    /// arrives in time restarts the timer as usual.
    fn continue_round(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let next = self.round.saturating_add(1);
        let fresh = now_ms.saturating_add(self.round_timeout_ms(next));
        let deadline = self.round_deadline_ms.clamp(now_ms, fresh);
        self.enter_round_until(now_ms, next, deadline, out);
        self.round_timer_kept = deadline < fresh;
    }

    fn prune_rounds(&mut self) {
        let keep_from = self.round.saturating_sub(1);
        self.votes.retain(|(r, _), _| *r >= keep_from);
        self.voters.retain(|(r, _), _| *r >= keep_from);
        self.timeouts.retain(|r, _| *r >= keep_from);
        // Proposals being validated stay until the answer, whatever the round: the host keeps
        // what it validated and will not fetch it again, so a valid block of a round already
        // passed must still reach `blocks` (it may be certified and become final; leader
        // reputation reads it then). They are bounded by MAX_PENDING_PROPOSALS.
    }

    // ----- proposing -----

    fn try_propose(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        let round = self.round;
        if self.leader(round).address != self.key.address()
            || self.proposed_round >= round
            // After a restart `proposed_round` is forgotten; the vote record is not: never
            // propose twice in a round, or in one already timed out.
            || round <= self.safety.last_voted_round
            || self.building.is_some()
        {
            return;
        }
        let Some(parent) = self.blocks.get(&self.high_qc.block_hash).cloned() else {
            out.push(Effect::RequestSync {
                qc: self.high_qc.clone(),
            });
            return;
        };
        // A proposal needs the previous round's QC, or its TC.
        let needs_tc = self.qc_round(&self.high_qc).saturating_add(1) != round;
        if needs_tc && self.high_tc.as_ref().map(|tc| tc.round) != Some(round.saturating_sub(1)) {
            return;
        }
        let at_ms = parent
            .timestamp_ms
            .saturating_add(self.config.block_time_ms);
        if now_ms < at_ms {
            out.push(Effect::SetTimer {
                kind: TimerKind::Propose,
                at_ms,
            });
            return;
        }
        self.proposed_round = round;
        self.building = Some(round);
        let height = parent.height.saturating_add(1);
        let empty = height > self.epoch_end();
        let failed_proposers = self.failed_leaders(self.qc_round(&self.high_qc), round);
        out.push(Effect::BuildBlock(BuildRequest {
            height,
            round,
            epoch: self.epoch,
            empty,
            parent_hash: self.high_qc.block_hash,
            parent_qc: self.high_qc.clone(),
            timestamp_ms: now_ms.max(parent.timestamp_ms.saturating_add(1)),
            proposer: self.key.address(),
            validators_hash: self.validators.hash(),
            failed_proposers,
            evidence: if empty {
                Vec::new()
            } else {
                let included = self.branch_evidence(&self.high_qc.block_hash);
                self.evidence
                    .iter()
                    .filter(|(id, _)| !included.contains(*id))
                    .map(|(_, e)| e.clone())
                    .collect()
            },
        }));
    }

    fn on_block_built(&mut self, now_ms: u64, block: Block, out: &mut Vec<Effect>) {
        let round = block.header.round;
        if self.building != Some(round) {
            return;
        }
        self.building = None;
        let tc = if self.qc_round(&block.header.parent_qc).saturating_add(1) == round {
            None
        } else {
            self.high_tc.clone()
        };
        let proposal = Proposal::sign(&self.key, block.clone(), tc);
        if round == self.round && self.last_timeout_round < round {
            // The others time the round from this proposal's arrival; so does its leader,
            // which entered the round earlier (often on the certificate it formed itself) and
            // would otherwise time out just as the next proposal arrives.
            self.restart_round_timer(now_ms, out);
        }
        self.insert_block(&block);
        out.push(Effect::Broadcast(ConsensusMessage::Proposal(
            proposal.clone(),
        )));
        // Our own proposal needs no re-execution: vote on it directly.
        self.pending.insert(block.hash(), proposal);
        self.on_block_validated(now_ms, block.hash(), true, out);
    }

    // ----- messages -----

    fn on_message(&mut self, now_ms: u64, msg: ConsensusMessage, out: &mut Vec<Effect>) {
        match msg {
            ConsensusMessage::Proposal(p) => self.on_proposal(now_ms, p, out),
            ConsensusMessage::Vote(v) => self.on_vote(now_ms, v, out),
            ConsensusMessage::Timeout(t) => self.on_timeout(now_ms, t, out),
            ConsensusMessage::Evidence(e) => self.on_evidence(e, out),
            ConsensusMessage::EpochProof(p) => self.on_epoch_proof(p, true, out),
        }
    }

    fn on_proposal(&mut self, now_ms: u64, p: Proposal, out: &mut Vec<Effect>) {
        let header = &p.block.header;
        let round = header.round;
        let hash = p.block.hash();
        if self.pending.contains_key(&hash) {
            return;
        }
        let epoch = round_epoch(round);
        // What no honest proposer ever sends, whatever round this node is in.
        let malformed = if header.chain_id != self.config.chain_id {
            Some("proposal for another chain")
        } else if header.epoch != epoch || round == epoch_base_round(epoch) {
            Some("proposal in a round that does not exist in its epoch")
        } else if header.parent_qc.block_hash != header.parent_hash
            || header.parent_qc.height.saturating_add(1) != header.height
        {
            // The voting rule would judge the block by another block's certificate.
            Some("proposal whose certificate is not its parent's")
        } else {
            None
        };
        if let Some(reason) = malformed {
            self.invalid(reason, out);
            return;
        }
        if epoch != self.epoch {
            if epoch < self.epoch {
                self.send_epoch_proof(now_ms, header.proposer, epoch, out);
            } else if header.epoch == epoch {
                // A later epoch: the end of ours is final elsewhere. Keep a proposal of the
                // very next epoch to replay once we switch (it often arrives just before the
                // epoch proof), and fetch the branch it builds on.
                if epoch == self.epoch.saturating_add(1)
                    && self.next_epoch_proposals.len() < MAX_PENDING_PROPOSALS
                    && !self
                        .next_epoch_proposals
                        .iter()
                        .any(|q| q.block.hash() == hash)
                {
                    self.next_epoch_proposals.push(p.clone());
                }
                out.push(Effect::RequestSync {
                    qc: header.parent_qc.clone(),
                });
            }
            return;
        }
        if round < self.round {
            return;
        }
        // Suffix blocks only certify the epoch-ending block below them: nothing to execute.
        if header.height > self.epoch_end()
            && (!p.block.txs.is_empty() || !p.block.evidence.is_empty())
        {
            self.invalid("suffix block with transactions or evidence", out);
            return;
        }
        let Some(proposer) = self.validators.get(&header.proposer).cloned() else {
            self.invalid("proposal by a validator outside the set", out);
            return;
        };
        let msg = Proposal::signing_hash(&self.config.chain_id, &hash, round);
        if proposer.public_key.verify(&msg, &p.signature).is_err() {
            self.invalid("badly signed proposal", out);
            return;
        }
        // Another leader than ours: an honest validator whose view of the final blocks
        // differs for a moment draws another, so this is not scored.
        if header.proposer != self.leader(round).address {
            return;
        }
        if !self.verify_qc(&header.parent_qc) {
            self.invalid_qc(
                &header.parent_qc,
                "proposal with an invalid certificate",
                out,
            );
            return;
        }
        if let Some(tc) = &p.tc {
            if !self.verify_tc(tc) {
                self.invalid("proposal with an invalid timeout certificate", out);
                return;
            }
        }
        if header.timestamp_ms > now_ms.saturating_add(MAX_CLOCK_DRIFT_MS) {
            return;
        }
        // Certificates move us forward even if we cannot vote on this block.
        self.on_qc(now_ms, header.parent_qc.clone(), out);
        if let Some(tc) = p.tc.clone() {
            self.on_tc(now_ms, tc, out);
        }
        if round != self.round {
            return;
        }
        if self.round_timer_kept {
            // The round kept its predecessor's deadline (`continue_round`); its proposal came.
            self.restart_round_timer(now_ms, out);
        }
        // The failed leaders it lists are what leader reputation reads once it is final.
        if header.failed_proposers != self.failed_leaders(self.qc_round(&header.parent_qc), round) {
            return;
        }
        if !self.blocks.contains_key(&header.parent_hash) {
            out.push(Effect::RequestSync {
                qc: header.parent_qc.clone(),
            });
            return;
        }
        if self.pending.len() >= MAX_PENDING_PROPOSALS {
            // Full (a host slow to answer): the proposal of the lowest round gives way.
            let lowest = self
                .pending
                .iter()
                .map(|(h, q)| (q.block.header.round, *h))
                .min();
            match lowest {
                Some((r, h)) if r < round => {
                    self.pending.remove(&h);
                }
                _ => return,
            }
        }
        self.pending.insert(hash, p.clone());
        out.push(Effect::ValidateBlock(p.block));
    }

    fn on_block_validated(&mut self, now_ms: u64, hash: Hash, valid: bool, out: &mut Vec<Effect>) {
        let Some(p) = self.pending.remove(&hash) else {
            return;
        };
        if !valid {
            return;
        }
        let header = &p.block.header;
        let parent_ok = self.blocks.get(&header.parent_hash).is_some_and(|parent| {
            parent.height.saturating_add(1) == header.height
                && parent.timestamp_ms < header.timestamp_ms
        });
        if !parent_ok || header.validators_hash != self.validators.hash() {
            return;
        }
        self.insert_block(&p.block);
        let header = &p.block.header;
        let round = header.round;
        // It led its round: no longer suspected of failing.
        self.suspects.remove(&header.proposer);
        if round != self.round
            || round <= self.safety.last_voted_round
            || !self.is_member()
            || !self.voting_rule(&p)
        {
            return;
        }
        self.safety.last_voted_round = round;
        self.voted_round = round;
        if self.high_qc.round > self.safety.highest_qc.round {
            self.safety.highest_qc = self.high_qc.clone();
        }
        let vote = Vote::sign(&self.key, &self.config.chain_id, hash, header.height, round);
        out.push(Effect::PersistSafety(self.safety.clone()));
        // To the next leader, which certifies the block in its proposal, and to the leader
        // after it: if the next one is dead, the one after still certifies the block, and
        // its certificate (carried by its timeouts and proposal) makes the block's parent
        // final instead of leaving it to a later 2-chain.
        let mut own = false;
        for collector in self.vote_collectors(round) {
            if collector == self.key.address() {
                own = true;
            } else {
                out.push(Effect::SendTo {
                    to: collector,
                    message: ConsensusMessage::Vote(vote.clone()),
                });
            }
        }
        if own {
            self.on_vote(now_ms, vote, out);
        }
    }

    /// Who collects the votes of `round`: the leaders of the next two rounds (one validator
    /// if it leads both).
    fn vote_collectors(&self, round: u64) -> Vec<Address> {
        let next = self.leader(round.saturating_add(1)).address;
        let after = self.leader(round.saturating_add(2)).address;
        if next == after {
            vec![next]
        } else {
            vec![next, after]
        }
    }

    /// The 2-chain voting rule.
    fn voting_rule(&self, p: &Proposal) -> bool {
        let round = p.block.header.round;
        let qc_round = self.qc_round(&p.block.header.parent_qc);
        if qc_round.saturating_add(1) == round {
            return true;
        }
        match &p.tc {
            Some(tc) => {
                tc.round.saturating_add(1) == round
                    && tc.signatures.iter().all(|s| qc_round >= s.high_qc_round)
                    && qc_round >= tc.high_qc.round
            }
            None => false,
        }
    }

    fn on_vote(&mut self, now_ms: u64, vote: Vote, out: &mut Vec<Effect>) {
        let round = vote.round;
        if vote.chain_id != self.config.chain_id {
            self.invalid("vote for another chain", out);
            return;
        }
        if round == epoch_base_round(round_epoch(round)) {
            self.invalid("vote in a round that does not exist in its epoch", out);
            return;
        }
        if round_epoch(round) < self.epoch {
            self.send_epoch_proof(now_ms, vote.voter, round_epoch(round), out);
            return;
        }
        if round_epoch(round) == self.epoch.saturating_add(1)
            && round
                < epoch_base_round(self.epoch.saturating_add(1)).saturating_add(MAX_FUTURE_ROUNDS)
        {
            // Checked once the set of that epoch is known.
            if self.next_epoch_votes.len() < MAX_NEXT_EPOCH_VOTES
                && !self.next_epoch_votes.contains(&vote)
            {
                self.next_epoch_votes.push(vote);
            }
            return;
        }
        if round_epoch(round) != self.epoch {
            return;
        }
        let Some(validator) = self.validators.get(&vote.voter).cloned() else {
            self.invalid("vote by a validator outside the set", out);
            return;
        };
        if round.saturating_add(1) < self.round
            || round > self.round.saturating_add(MAX_FUTURE_ROUNDS)
            || !self.vote_collectors(round).contains(&self.key.address())
        {
            return;
        }
        let msg = Vote::signing_hash(&self.config.chain_id, &vote.block_hash, vote.height, round);
        // `voters` holds only votes whose signatures were checked, so a forged vote can neither
        // make an honest validator look like an equivocator nor shadow its real vote.
        if let Some(earlier) = self.voters.get(&(round, vote.voter)) {
            if earlier.block_hash != vote.block_hash
                && validator.public_key.verify(&msg, &vote.signature).is_ok()
            {
                let evidence = Evidence {
                    first: earlier.clone(),
                    second: vote,
                };
                self.add_evidence(evidence, out);
            }
            return;
        }
        let own = vote.voter == self.key.address();
        let (hash, height) = (vote.block_hash, vote.height);
        // A vote for a block we do not hold cannot help form a QC soon; check it now, so that
        // votes for made-up blocks cost no memory unless a validator really signed them.
        let mut verified = own;
        if !own && !self.blocks.contains_key(&hash) {
            if validator.public_key.verify(&msg, &vote.signature).is_err() {
                self.invalid("badly signed vote", out);
                return;
            }
            verified = true;
        }
        let origin = self.origin;
        let set = self.votes.entry((round, hash)).or_default();
        match set.votes.get(&vote.voter) {
            Some(held) if held.signature == vote.signature => return,
            // Two different signatures for one block: keep whichever verifies.
            Some(_) => {
                if !verified && validator.public_key.verify(&msg, &vote.signature).is_err() {
                    self.invalid("badly signed vote", out);
                    return;
                }
                verified = true;
            }
            None => {}
        }
        if verified {
            set.verified.insert(vote.voter);
            set.origins.remove(&vote.voter);
        } else {
            set.origins.insert(vote.voter, origin);
        }
        set.votes.insert(vote.voter, vote.clone());
        if verified {
            self.record_verified(vote, out);
        }
        self.try_form_qc(now_ms, round, hash, height, out);
    }

    /// Records a vote whose signature is checked. A checked vote of the same validator for
    /// another block in the same round is equivocation; an unchecked one is checked now.
    fn record_verified(&mut self, vote: Vote, out: &mut Vec<Effect>) {
        let key = (vote.round, vote.voter);
        match self.voters.get(&key) {
            Some(earlier) if earlier.block_hash != vote.block_hash => {
                let evidence = Evidence {
                    first: earlier.clone(),
                    second: vote,
                };
                self.add_evidence(evidence, out);
                return;
            }
            Some(_) => return,
            None => {
                self.voters.insert(key, vote.clone());
            }
        }
        let Some(public_key) = self.validators.get(&vote.voter).map(|v| v.public_key) else {
            return;
        };
        let others: Vec<Vote> = self
            .votes
            .iter()
            .filter(|((r, h), set)| {
                *r == vote.round && *h != vote.block_hash && !set.verified.contains(&vote.voter)
            })
            .filter_map(|(_, set)| set.votes.get(&vote.voter).cloned())
            .collect();
        for other in others {
            let msg = Vote::signing_hash(
                &self.config.chain_id,
                &other.block_hash,
                other.height,
                other.round,
            );
            let ok = public_key.verify(&msg, &other.signature).is_ok();
            if let Some(set) = self.votes.get_mut(&(other.round, other.block_hash)) {
                if ok {
                    set.verified.insert(other.voter);
                } else {
                    set.votes.remove(&other.voter);
                }
            }
            if ok {
                self.add_evidence(
                    Evidence {
                        first: vote.clone(),
                        second: other,
                    },
                    out,
                );
            }
        }
    }

    fn try_form_qc(
        &mut self,
        now_ms: u64,
        round: u64,
        hash: Hash,
        height: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(set) = self.votes.get_mut(&(round, hash)) else {
            return;
        };
        let stake: u64 = set
            .votes
            .keys()
            .filter_map(|a| self.validators.get(a))
            .map(|v| v.stake)
            .sum();
        if !self.validators.is_quorum(stake) {
            return;
        }
        // Batch-verify the signatures not verified yet; on failure, find and drop the bad ones.
        let msg = Vote::signing_hash(&self.config.chain_id, &hash, height, round);
        let unverified: Vec<(Address, Signature, PublicKey)> = set
            .votes
            .iter()
            .filter(|(a, _)| !set.verified.contains(*a))
            .filter_map(|(a, v)| {
                self.validators
                    .get(a)
                    .map(|val| (*a, v.signature, val.public_key))
            })
            .collect();
        let mut dropped = false;
        if !unverified.is_empty() {
            let msgs = vec![msg; unverified.len()];
            let sigs: Vec<Signature> = unverified.iter().map(|u| u.1).collect();
            let keys: Vec<PublicKey> = unverified.iter().map(|u| u.2).collect();
            if verify_batch(&msgs, &sigs, &keys).is_ok() {
                set.verified.extend(unverified.iter().map(|u| u.0));
            } else {
                for (addr, sig, key) in &unverified {
                    if key.verify(&msg, sig).is_ok() {
                        set.verified.insert(*addr);
                    } else {
                        set.votes.remove(addr);
                        // Its sender, not the sender of the message that completed the quorum.
                        if let Some(from) = set.origins.remove(addr) {
                            if from != Origin::LOCAL {
                                out.push(Effect::Invalid {
                                    from,
                                    reason: "badly signed vote",
                                });
                            }
                        }
                        dropped = true;
                    }
                }
            }
        }
        // Record the newly verified votes (this also catches equivocation).
        let newly: Vec<Vote> = unverified
            .iter()
            .filter_map(|u| set.votes.get(&u.0))
            .cloned()
            .collect();
        for v in newly {
            self.record_verified(v, out);
        }
        if dropped {
            return self.try_form_qc(now_ms, round, hash, height, out);
        }
        let Some(set) = self.votes.remove(&(round, hash)) else {
            return;
        };
        let qc = QuorumCertificate {
            block_hash: hash,
            height,
            round,
            signatures: set
                .votes
                .values()
                .map(|v| VoteSignature {
                    validator: v.voter,
                    signature: v.signature,
                })
                .collect(),
        };
        self.verified_qcs.insert((hash, round));
        // The leader after next collects too, for when the next leader is dead. When it forms
        // the certificate first, the next leader may be alive but short of one vote lost on
        // the way: hand it the votes, so it proposes on time instead of a timeout later (see
        // docs/consensus.md, "Liveness when validators fail", 12).
        let next = self.leader(round.saturating_add(1)).address;
        if next != self.key.address() {
            for s in &qc.signatures {
                out.push(Effect::SendTo {
                    to: next,
                    message: ConsensusMessage::Vote(Vote {
                        chain_id: self.config.chain_id.clone(),
                        block_hash: hash,
                        height,
                        round,
                        voter: s.validator,
                        signature: s.signature,
                    }),
                });
            }
        }
        self.on_qc(now_ms, qc, out);
        self.try_propose(now_ms, out);
    }

    fn on_timeout(&mut self, now_ms: u64, t: Timeout, out: &mut Vec<Effect>) {
        let round = t.round;
        if t.chain_id != self.config.chain_id {
            self.invalid("timeout for another chain", out);
            return;
        }
        if round == epoch_base_round(round_epoch(round)) {
            self.invalid("timeout of a round that does not exist in its epoch", out);
            return;
        }
        // A TC carried along moves a lagging validator forward first, so that this timeout
        // (for a round it had not reached) then counts. Verified like any certificate.
        if let Some(tc) = t.last_tc.clone() {
            if tc.round >= self.round && tc.round < self.round.saturating_add(MAX_FUTURE_ROUNDS) {
                if !self.verify_tc(&tc) {
                    self.invalid("timeout carrying an invalid timeout certificate", out);
                    return;
                }
                self.on_tc(now_ms, tc, out);
            }
        }
        if let Some(qc) = t.commit_qc.clone() {
            self.on_commit_qc(now_ms, qc, out);
            if self.awaiting_set {
                return;
            }
        }
        if round_epoch(round) < self.epoch {
            self.send_epoch_proof(now_ms, t.voter, round_epoch(round), out);
            return;
        }
        if round < self.round || round > self.round.saturating_add(MAX_FUTURE_ROUNDS) {
            return;
        }
        // Validators left out of the set time out too (see `on_round_timeout`): not scored.
        let Some(validator) = self.validators.get(&t.voter).cloned() else {
            return;
        };
        if self
            .timeouts
            .get(&round)
            .is_some_and(|m| m.contains_key(&t.voter))
        {
            return;
        }
        let msg = Timeout::signing_hash(&self.config.chain_id, round, t.high_qc.round);
        if validator.public_key.verify(&msg, &t.signature).is_err() {
            self.invalid("badly signed timeout", out);
            return;
        }
        if !self.verify_qc(&t.high_qc) {
            self.invalid_qc(&t.high_qc, "timeout carrying an invalid certificate", out);
            return;
        }
        self.learn_qc(now_ms, t.high_qc.clone(), true, out);
        let set = self.timeouts.entry(round).or_default();
        set.insert(t.voter, t);
        let stake: u64 = set
            .keys()
            .filter_map(|a| self.validators.get(a))
            .map(|v| v.stake)
            .sum();
        if !self.validators.is_quorum(stake) {
            // More than 1/3 of the stake timed out a round at or above ours: at least one honest
            // validator did, so join it. Without this a validator that missed a TC stays a round
            // behind and its timeouts never count.
            let total = u128::from(self.validators.total_stake());
            if round >= self.round
                && round > self.last_timeout_round
                && 3 * u128::from(stake) > total
            {
                self.advance_to(now_ms, round, out);
                self.on_round_timeout(now_ms, out);
            }
            return;
        }
        let high_qc = set
            .values()
            .map(|t| &t.high_qc)
            .max_by_key(|qc| qc.round)
            .cloned()
            .unwrap_or_default();
        let tc = TimeoutCertificate {
            round,
            high_qc,
            signatures: set
                .values()
                .map(|t| TimeoutSignature {
                    validator: t.voter,
                    high_qc_round: t.high_qc.round,
                    signature: t.signature,
                })
                .collect(),
        };
        // The next leader needs this TC to propose. If one timeout on its way to it was lost,
        // it cannot form the TC itself and would learn it only from the timeouts of the
        // round after, a whole timeout later: hand it our timeout of this round carrying
        // the TC (see docs/consensus.md, "Liveness when validators fail", 9).
        let own = set.get(&self.key.address()).cloned();
        let forward = own.map(|mut t| {
            t.last_tc = Some(tc.clone());
            t
        });
        self.on_tc(now_ms, tc, out);
        if let Some(timeout) = forward {
            let next = self.leader(round.saturating_add(1)).address;
            if next != self.key.address() {
                out.push(Effect::SendTo {
                    to: next,
                    message: ConsensusMessage::Timeout(timeout),
                });
            }
        }
        self.try_propose(now_ms, out);
    }

    fn on_round_timeout(&mut self, now_ms: u64, out: &mut Vec<Effect>) {
        if !self.is_member() {
            // Outside the set: no vote of ours counts, but a signed timeout still reaches
            // validators of later epochs, which answer with the proof this node may lack.
            let timeout = Timeout::sign(
                &self.key,
                &self.config.chain_id,
                self.round,
                self.high_qc.clone(),
            );
            out.push(Effect::Broadcast(ConsensusMessage::Timeout(timeout)));
            out.push(Effect::SetTimer {
                kind: TimerKind::RoundTimeout,
                at_ms: now_ms.saturating_add(self.round_timeout_ms(self.round)),
            });
            return;
        }
        let round = self.round;
        self.last_timeout_round = round;
        self.round_timer_kept = false;
        self.safety.last_voted_round = self.safety.last_voted_round.max(round);
        if self.high_qc.round > self.safety.highest_qc.round {
            self.safety.highest_qc = self.high_qc.clone();
        }
        // Report the highest certificate ever persisted, even if its block was lost in a crash:
        // a TC must never hide a certificate that may have made a block final.
        let mut timeout = Timeout::sign(
            &self.key,
            &self.config.chain_id,
            round,
            self.safety.highest_qc.clone(),
        );
        // Carry our latest TC so validators still in an earlier round can catch up, and the
        // certificate of our latest commit so they agree on what is final.
        timeout.last_tc = self.high_tc.clone();
        timeout.commit_qc = self.commit_qc.clone();
        out.push(Effect::PersistSafety(self.safety.clone()));
        out.push(Effect::Broadcast(ConsensusMessage::Timeout(
            timeout.clone(),
        )));
        // Rebroadcast with back-off until the round changes.
        out.push(Effect::SetTimer {
            kind: TimerKind::RoundTimeout,
            at_ms: now_ms.saturating_add(self.round_timeout_ms(self.round)),
        });
        self.on_timeout(now_ms, timeout, out);
    }

    fn on_evidence(&mut self, e: Evidence, out: &mut Vec<Effect>) {
        if e.check_form().is_err() || e.first.chain_id != self.config.chain_id {
            self.invalid("malformed evidence", out);
            return;
        }
        // Votes are checked against this epoch's keys: evidence of an earlier epoch is dropped.
        if round_epoch(e.first.round) != self.epoch {
            return;
        }
        let Some(v) = self.validators.get(&e.offender()) else {
            self.invalid("evidence against a validator outside the set", out);
            return;
        };
        let ok = [&e.first, &e.second].iter().all(|vote| {
            let msg = Vote::signing_hash(
                &self.config.chain_id,
                &vote.block_hash,
                vote.height,
                vote.round,
            );
            v.public_key.verify(&msg, &vote.signature).is_ok()
        });
        if ok {
            self.add_evidence(e, out);
        } else {
            self.invalid("evidence with a bad signature", out);
        }
    }

    fn add_evidence(&mut self, e: Evidence, out: &mut Vec<Effect>) {
        let id = e.id();
        if self.evidence.contains_key(&id) || self.evidence.len() >= MAX_EVIDENCE_POOL {
            return;
        }
        self.evidence.insert(id, e.clone());
        out.push(Effect::ReportEvidence(e.clone()));
        out.push(Effect::Broadcast(ConsensusMessage::Evidence(e)));
    }

    // ----- certificates -----

    /// A certificate of the block the epoch started from: final, so taken as it is (it was
    /// signed by the previous epoch's set).
    fn is_epoch_genesis_qc(&self, qc: &QuorumCertificate) -> bool {
        qc.block_hash == self.epoch_genesis.1
            && qc.height == self.epoch_genesis.0
            && qc.round == self.epoch_genesis.2
            && qc.block_hash != Hash::ZERO
    }

    /// The round a certificate counts as for the voting and proposing rules: the epoch's
    /// starting certificate counts as `epoch_base_round(epoch)`, whatever round it was
    /// signed in.
    fn qc_round(&self, qc: &QuorumCertificate) -> u64 {
        if self.is_epoch_genesis_qc(qc) {
            epoch_base_round(self.epoch)
        } else {
            qc.round
        }
    }

    /// Checks a QC: known validators, no duplicates, more than 2/3 of the stake, and every
    /// signature valid (one batch verification).
    fn verify_qc(&mut self, qc: &QuorumCertificate) -> bool {
        if self.verified_qcs.contains(&(qc.block_hash, qc.round)) {
            return true;
        }
        let ok = if self.is_epoch_genesis_qc(qc) {
            // Signed by the previous epoch's set (none for genesis): ours, or one that set signed.
            *qc == self.epoch_genesis_qc
                || self
                    .previous_validators
                    .as_ref()
                    .is_some_and(|set| check_qc(&self.config.chain_id, set, qc))
        } else {
            check_qc(&self.config.chain_id, &self.validators, qc)
        };
        if ok {
            self.verified_qcs.insert((qc.block_hash, qc.round));
        }
        ok
    }

    /// Gives the previous epoch's set, when the engine starts at the block that ended that
    /// epoch (after a restart), so other certificates of that block can be checked.
    pub fn set_previous_validators(&mut self, validators: ValidatorSet) {
        self.previous_validators = Some(validators);
    }

    fn verify_tc(&mut self, tc: &TimeoutCertificate) -> bool {
        let mut seen = HashSet::new();
        let mut stake: u64 = 0;
        let (mut msgs, mut sigs, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        let mut max_high = 0;
        for s in &tc.signatures {
            let Some(v) = self.validators.get(&s.validator) else {
                return false;
            };
            if !seen.insert(s.validator) {
                return false;
            }
            stake = stake.saturating_add(v.stake);
            max_high = max_high.max(s.high_qc_round);
            msgs.push(Timeout::signing_hash(
                &self.config.chain_id,
                tc.round,
                s.high_qc_round,
            ));
            sigs.push(s.signature);
            keys.push(v.public_key);
        }
        self.validators.is_quorum(stake)
            && tc.high_qc.round == max_high
            && verify_batch(&msgs, &sigs, &keys).is_ok()
            && self.verify_qc(&tc.high_qc)
    }

    /// A verified QC: raise `high_qc`, move to the next round, apply the commit rule.
    fn on_qc(&mut self, now_ms: u64, qc: QuorumCertificate, out: &mut Vec<Effect>) {
        self.learn_qc(now_ms, qc, false, out);
    }

    /// A certificate, from a timeout message (`from_timeout`) or anywhere else.
    fn learn_qc(
        &mut self,
        now_ms: u64,
        qc: QuorumCertificate,
        from_timeout: bool,
        out: &mut Vec<Effect>,
    ) {
        if qc.round > self.high_qc.round {
            self.high_qc = qc.clone();
        }
        // Persist a higher certificate for a block we hold, so a restart resumes from the
        // certified head instead of timing out a round to replace it.
        if qc.round > self.safety.highest_qc.round && self.blocks.contains_key(&qc.block_hash) {
            self.safety.highest_qc = qc.clone();
            out.push(Effect::PersistSafety(self.safety.clone()));
        }
        if let Some(meta) = self.blocks.get(&qc.block_hash) {
            if meta.height > self.certified_head.0 {
                self.certified_head = (meta.height, qc.block_hash);
                out.push(Effect::Certified {
                    hash: qc.block_hash,
                    height: meta.height,
                    round: qc.round,
                });
            }
        }
        if qc.round >= self.round {
            self.consecutive_timeouts = 0;
            if from_timeout && qc.round == self.round && self.started {
                self.continue_round(now_ms, out);
            } else {
                self.advance_to(now_ms, qc.round.saturating_add(1), out);
            }
        }
        self.commit_rule(&qc, out);
    }

    fn on_tc(&mut self, now_ms: u64, tc: TimeoutCertificate, out: &mut Vec<Effect>) {
        let round = tc.round;
        self.on_qc(now_ms, tc.high_qc.clone(), out);
        if round >= self.round {
            self.back_off(round);
        }
        if self.high_tc.as_ref().is_none_or(|t| t.round < round) {
            self.high_tc = Some(tc);
        }
        self.advance_to(now_ms, round.saturating_add(1), out);
    }

    /// A TC ended `round`: more than two thirds of the stake is live, yet the round certified
    /// nothing. Who failed it: its leader, or, if its proposal got our vote, the next leader
    /// that was to collect the votes. The round timeout doubles (up to the cap) only when that
    /// validator was not already seen failing: the network may be too slow for the timeout.
    /// A known failed validator says nothing of the network, so its rounds keep the timeout
    /// short, and a round that ends in no TC at all (no quorum is live) grows nothing either:
    /// its timer only repeats the timeout message.
    fn back_off(&mut self, round: u64) {
        let culprit = if self.voted_round == round {
            self.leader(round.saturating_add(1)).address
        } else {
            self.leader(round).address
        };
        if self.suspects.insert(culprit) {
            self.consecutive_timeouts = self.consecutive_timeouts.saturating_add(1);
        }
    }

    /// 2-chain commit: a certified block whose parent is from the previous round makes the
    /// parent final. A suffix parent makes the epoch-ending block below it final, and only it.
    fn commit_rule(&mut self, qc: &QuorumCertificate, out: &mut Vec<Effect>) {
        let Some(child) = self.blocks.get(&qc.block_hash) else {
            return;
        };
        let Some(parent) = self.blocks.get(&child.parent) else {
            return;
        };
        if parent.round.saturating_add(1) != child.round {
            return;
        }
        let end = self.epoch_end();
        let (hash, final_qc) = if parent.height > end {
            // Walk down to the suffix block just above the end; its certificate of its parent
            // is the end's.
            let mut cursor = child;
            while cursor.height > end.saturating_add(1) {
                match self.blocks.get(&cursor.parent) {
                    Some(b) => cursor = b,
                    None => return,
                }
            }
            (cursor.parent, cursor.parent_qc.clone())
        } else {
            (child.parent, child.parent_qc.clone())
        };
        // Ending the epoch: the suffix headers up to the certified child prove it to others.
        let proof = if parent.height >= end {
            let mut headers = Vec::new();
            let mut cursor = Some(child);
            while let Some(b) = cursor {
                if b.height <= end {
                    break;
                }
                match &b.header {
                    Some(h) => headers.push(h.clone()),
                    None => break,
                }
                cursor = self.blocks.get(&b.parent);
            }
            headers.reverse();
            (headers.first().map(|h| h.height) == Some(end.saturating_add(1))).then(|| EpochProof {
                headers,
                qc: qc.clone(),
            })
        } else {
            None
        };
        let before = self.final_tip.height;
        self.finalize_block(hash, final_qc, proof.map(|p| (p, true)), out);
        if self.final_tip.height > before && !self.awaiting_set {
            self.commit_qc = Some(qc.clone());
        }
    }

    /// A certificate another validator says made a block final ([`Timeout::commit_qc`]): if
    /// it would make a block above our final tip final, check it and apply the commit rule,
    /// fetching its block first if we lack it. Without this a validator that missed the one
    /// proposal carrying it would not know that block is final until the next 2-chain, and
    /// leader reputation, which reads final blocks, would name other leaders than everyone
    /// else's for as long.
    fn on_commit_qc(&mut self, now_ms: u64, qc: QuorumCertificate, out: &mut Vec<Effect>) {
        if round_epoch(qc.round) != self.epoch
            || qc.height <= self.final_tip.height.saturating_add(1)
            || self
                .stashed_commit
                .as_ref()
                .is_some_and(|s| s.height >= qc.height && !self.blocks.contains_key(&s.block_hash))
        {
            return;
        }
        if !self.verify_qc(&qc) {
            self.invalid_qc(&qc, "timeout carrying an invalid commit certificate", out);
            return;
        }
        if self.blocks.contains_key(&qc.block_hash) {
            // Learnt from a timeout like its high QC: it keeps the deadline (`continue_round`).
            self.learn_qc(now_ms, qc, true, out);
        } else {
            out.push(Effect::RequestSync { qc: qc.clone() });
            self.stashed_commit = Some(qc);
        }
    }

    /// Makes `hash` (a block held, certified by `qc`) and its ancestors final. When it ends
    /// the epoch, keeps `proof` (broadcast if asked) and asks for the next validator set.
    fn finalize_block(
        &mut self,
        hash: Hash,
        final_qc: QuorumCertificate,
        proof: Option<(EpochProof, bool)>,
        out: &mut Vec<Effect>,
    ) {
        let Some(meta) = self.blocks.get(&hash) else {
            return;
        };
        if meta.height <= self.final_tip.height {
            return;
        }
        let (height, round, timestamp_ms) = (meta.height, meta.round, meta.timestamp_ms);
        // Leader reputation: the newly final blocks, oldest first.
        let mut newly = Vec::new();
        let mut cursor = self.blocks.get(&hash);
        while let Some(b) = cursor {
            if b.height <= self.final_tip.height {
                break;
            }
            if let Some(h) = &b.header {
                newly.push(h.clone());
            }
            cursor = self.blocks.get(&b.parent);
        }
        for h in newly.iter().rev() {
            self.remember(h);
        }
        // Evidence now in a final block has done its work: stop proposing it.
        for id in self.branch_evidence(&hash) {
            self.evidence.remove(&id);
        }
        self.final_tip = Tip {
            height,
            hash,
            round,
            timestamp_ms,
            qc: final_qc.clone(),
        };
        // Forget blocks that can no longer matter: at or below the final height, except the tip.
        self.blocks.retain(|h, b| b.height > height || *h == hash);
        self.verified_qcs.retain(|(_, r)| *r >= round);
        out.push(Effect::Finalize {
            hash,
            height,
            qc: final_qc,
        });
        if height == self.epoch_end() {
            if let Some((proof, broadcast)) = proof {
                if broadcast {
                    out.push(Effect::Broadcast(ConsensusMessage::EpochProof(
                        proof.clone(),
                    )));
                }
                self.epoch_proofs.insert(self.epoch, proof);
                while self.epoch_proofs.len() > KEPT_EPOCH_PROOFS {
                    self.epoch_proofs.pop_first();
                }
            }
            self.awaiting_set = true;
            out.push(Effect::NeedValidatorSet {
                epoch: self.epoch.saturating_add(1),
                height,
            });
        }
    }

    /// Switches to `epoch` with its validator set, from the final epoch-ending block.
    fn start_epoch(
        &mut self,
        now_ms: u64,
        epoch: u64,
        validators: ValidatorSet,
        out: &mut Vec<Effect>,
    ) {
        if !self.awaiting_set || epoch != self.epoch.saturating_add(1) {
            return;
        }
        self.awaiting_set = false;
        self.epoch = epoch;
        // Leader reputation keeps the history of the epochs before: it is final, so every
        // validator agrees on it, and a failed validator stays skipped from the first round.
        let tip = self.final_tip.clone();
        self.epoch_genesis = (tip.height, tip.hash, tip.round);
        self.epoch_genesis_qc = tip.qc.clone();
        self.previous_validators = Some(std::mem::replace(&mut self.validators, validators));
        // The suffix is dropped: the epoch restarts from the final block and its certificate.
        self.blocks.retain(|h, _| *h == tip.hash);
        self.certified_head = (tip.height, tip.hash);
        self.high_qc = tip.qc.clone();
        self.high_tc = None;
        self.safety.highest_qc = tip.qc.clone();
        self.votes.clear();
        self.voters.clear();
        self.timeouts.clear();
        self.pending.clear();
        self.verified_qcs.clear();
        self.stashed_proof = None;
        self.commit_qc = None;
        self.stashed_commit = None;
        self.building = None;
        self.consecutive_timeouts = 0;
        // Votes and timeouts carry the epoch in their round: the new epoch's rounds are above
        // every round of the old one, so `last_voted_round` needs no reset.
        self.enter_round(now_ms, epoch_base_round(epoch).saturating_add(1), out);
        // Proposals of this epoch that arrived before the switch: judged now, by its set.
        for p in std::mem::take(&mut self.next_epoch_proposals) {
            self.on_proposal(now_ms, p, out);
        }
        for v in std::mem::take(&mut self.next_epoch_votes) {
            self.on_vote(now_ms, v, out);
        }
    }

    /// A proof that this epoch ended (see [`EpochProof`]). `may_sync`: when the epoch-ending
    /// block is missing, fetch it and retry once it arrives.
    fn on_epoch_proof(&mut self, p: EpochProof, may_sync: bool, out: &mut Vec<Effect>) {
        let end = self.epoch_end();
        if end <= self.final_tip.height || p.headers.is_empty() {
            return;
        }
        // The suffix chain: this epoch, consecutive heights from the end's child, hash-linked.
        let mut expect_parent = None;
        for (i, h) in p.headers.iter().enumerate() {
            if h.epoch != self.epoch
                || round_epoch(h.round) != h.epoch
                || h.chain_id != self.config.chain_id
                || h.height != end.saturating_add(1).saturating_add(i as u64)
                || h.parent_qc.block_hash != h.parent_hash
                || expect_parent.is_some_and(|hash| hash != h.parent_hash)
            {
                return;
            }
            expect_parent = Some(h.hash());
        }
        let (Some(first), Some(last)) = (p.headers.first(), p.headers.last()) else {
            return;
        };
        // The last is certified and its parent is from the round before: a 2-chain.
        if Some(p.qc.block_hash) != expect_parent
            || p.qc.height != last.height
            || p.qc.round != last.round
            || last.parent_qc.round.saturating_add(1) != last.round
        {
            return;
        }
        if !self.verify_qc(&p.qc) || !self.verify_qc(&first.parent_qc) {
            self.invalid("epoch proof with an invalid certificate", out);
            return;
        }
        let end_hash = first.parent_hash;
        if !self.blocks.contains_key(&end_hash) {
            if may_sync {
                out.push(Effect::RequestSync {
                    qc: first.parent_qc.clone(),
                });
                self.stashed_proof = Some(p);
            }
            return;
        }
        if self.blocks.get(&end_hash).map(|b| b.height) != Some(end) {
            return;
        }
        let qc = first.parent_qc.clone();
        self.finalize_block(end_hash, qc, Some((p, false)), out);
    }

    /// Tells a validator still in epoch `their_epoch` that it ended, with the proof kept for
    /// it, at most once per base round timeout per validator: a stalled epoch does not move
    /// its rounds, so replies follow the laggard's repeated timeouts, not ours.
    fn send_epoch_proof(
        &mut self,
        now_ms: u64,
        to: Address,
        their_epoch: u64,
        out: &mut Vec<Effect>,
    ) {
        let Some(proof) = self.epoch_proofs.get(&their_epoch) else {
            return;
        };
        if to == self.key.address() {
            return;
        }
        let every = self.config.timeout_ms.max(1);
        if self
            .proof_replies
            .get(&to)
            .is_some_and(|at| now_ms.saturating_sub(*at) < every)
        {
            return;
        }
        if self.proof_replies.len() >= MAX_PROOF_REPLIES {
            self.proof_replies.clear();
        }
        self.proof_replies.insert(to, now_ms);
        out.push(Effect::SendTo {
            to,
            message: ConsensusMessage::EpochProof(proof.clone()),
        });
    }

    /// Ids of the evidence in `hash` and its ancestors above the final tip.
    fn branch_evidence(&self, hash: &Hash) -> HashSet<Hash> {
        let mut ids = HashSet::new();
        let mut cursor = *hash;
        while let Some(meta) = self.blocks.get(&cursor) {
            if meta.height <= self.final_tip.height {
                break;
            }
            ids.extend(meta.evidence.iter().copied());
            cursor = meta.parent;
        }
        ids
    }

    fn insert_block(&mut self, block: &Block) {
        let h = &block.header;
        if h.height <= self.final_tip.height
            || h.epoch != self.epoch
            || round_epoch(h.round) != self.epoch
        {
            return;
        }
        self.blocks
            .entry(block.hash())
            .or_insert_with(|| BlockMeta {
                height: h.height,
                round: h.round,
                parent: h.parent_hash,
                timestamp_ms: h.timestamp_ms,
                parent_qc: h.parent_qc.clone(),
                evidence: block.evidence.iter().map(Evidence::id).collect(),
                header: Some(h.clone()),
            });
    }
}

/// Checks a QC against `set`: known validators, no duplicates, more than 2/3 of the stake,
/// and every signature valid (one batch verification). Light clients check certificates with
/// it too (`keel_node::light`).
pub fn check_qc(chain_id: &str, set: &ValidatorSet, qc: &QuorumCertificate) -> bool {
    let msg = Vote::signing_hash(chain_id, &qc.block_hash, qc.height, qc.round);
    let mut seen = HashSet::new();
    let mut stake: u64 = 0;
    let mut keys = Vec::with_capacity(qc.signatures.len());
    for s in &qc.signatures {
        let Some(v) = set.get(&s.validator) else {
            return false;
        };
        if !seen.insert(s.validator) {
            return false;
        }
        stake = stake.saturating_add(v.stake);
        keys.push(v.public_key);
    }
    if !set.is_quorum(stake) {
        return false;
    }
    let sigs: Vec<Signature> = qc.signatures.iter().map(|s| s.signature).collect();
    verify_batch(&vec![msg; sigs.len()], &sigs, &keys).is_ok()
}
