//! Deterministic simulation of keel consensus: N engines over a simulated network with a
//! seeded RNG and virtual time (latency, jitter, loss, partitions, crash and restart) and
//! byzantine validators (silent, equivocating, proposing invalid blocks), across epochs whose
//! validator sets change.
//!
//! Each validator runs the real `Engine` and a small deterministic application: a block's
//! "state root" is a hash chain over its ancestors, so a validator re-executing a block can
//! tell a wrong root. The toy application has no stake of its own: the harness draws each
//! epoch's validator set from the seed ([`stakes_for_epoch`]) and hands it to every engine
//! that asks for it ([`Effect::NeedValidatorSet`]). The node-level simulation over the real
//! executor lives in `tests/`.
//!
//! Invariants checked after every run: no two different final blocks at one height on any two
//! honest validators; honest validators agree on every final state root; every final chain is
//! linked by its certificates, each signed by a quorum of its epoch's set, each block proposed
//! by its round's leader in that set and never above the end of its epoch (suffix blocks are
//! never final); and progress.
//!
//! The machinery shared with the node simulation comes from `keel-simkit`: its `World` holds
//! virtual time, the seeded RNG (every random decision of a run draws from it, in order) and
//! the event queue, merged with the engines' timers; its `Faults` (latency with jitter, loss,
//! a partition that heals, a crash and restart) decide whether and when a message arrives.
//! The safety check is the kit's `check::one_final_chain` (hash and state root per height),
//! progress after healing its `check::progress_after`. This file holds what is particular to
//! consensus: the engines, the toy application, the byzantine behaviours, the epoch sets and
//! the checks of each final chain's shape.
//!
//! A failing run prints its seed; `SIM_SEED=<n>` replays one seed, `SIM_SEEDS=<n>` runs seeds
//! `0..n` (default 200), `SIM_TRACE=1` prints every node's actions, `SIM_KEEP_GOING=1` runs
//! every seed and lists the failing ones, `SIM_STATS=1` prints where every node ended.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_enum_variant)]

use std::collections::{BTreeMap, HashMap};

use keel_consensus::{
    epoch_end_height, epoch_of_next_block, Config, Effect, Engine, Input, Origin, SafetyData,
    TimerKind, Tip, Validator, ValidatorSet,
};
use keel_simkit::{check, draw_link, run_seeds, seeds, Crash, Faults, Next, Partition, World};
use keel_types::{
    round_epoch, Address, Block, ConsensusMessage, Hash, Header, Keypair, QuorumCertificate, Vote,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Honest,
    Silent,
    Equivocator,
    InvalidProposer,
}

/// How each epoch's validator set is chosen (epoch 0's is the genesis set).
#[derive(Clone, Debug)]
enum SetRule {
    /// Every epoch keeps the genesis set: all validators, equal stakes.
    Fixed,
    /// Every later epoch draws each stake from 1..=10; with `rotate`, about half the epochs
    /// also leave out one honest validator, which comes back in a later epoch.
    Drawn { rotate: bool },
    /// `stakes(epoch)[i]` is validator i's stake in `epoch`, 0 for "not in the set".
    Scripted(fn(u64) -> Vec<u64>),
}

#[derive(Clone, Debug)]
struct Scenario {
    validators: usize,
    byzantine: Vec<Behaviour>,
    block_time_ms: u64,
    duration_ms: u64,
    /// Latency, loss, the partition and the crash.
    faults: Faults,
    /// Blocks per epoch.
    epoch_length: u64,
    sets: SetRule,
}

impl Scenario {
    fn behaviour(&self, i: usize) -> Behaviour {
        self.byzantine.get(i).copied().unwrap_or(Behaviour::Honest)
    }
}

/// Stake of every validator of the genesis set.
const GENESIS_STAKE: u64 = 100;

/// The stakes of `epoch`'s validator set, by validator index (0: not in the set); a pure
/// function of the seed, the scenario and the epoch.
///
/// The fault model holds in every epoch: the byzantine validators (all of them are in every
/// set) hold less than a third of the stake, so the honest ones, all connected once partitions
/// heal, hold more than two thirds. In fact they hold at most 2/7 of it, the most they hold in
/// the equal-stake runs (two of seven) that [`LIVENESS_BOUND_MS`] was set for: without leader
/// reputation, a silent validator with nearly a third of the stake leads so often that
/// progress can pause for longer than the bound with no engine fault. A draw above that is
/// fixed deterministically by raising the smallest honest stakes.
fn stakes_for_epoch(seed: u64, scenario: &Scenario, epoch: u64) -> Vec<u64> {
    let n = scenario.validators;
    let honest = |i: usize| scenario.behaviour(i) == Behaviour::Honest;
    let mut stakes = match &scenario.sets {
        SetRule::Scripted(stakes) => {
            let stakes = stakes(epoch);
            assert_eq!(stakes.len(), n, "a stake for every validator");
            stakes
        }
        _ if epoch == 0 => vec![GENESIS_STAKE; n],
        SetRule::Fixed => vec![GENESIS_STAKE; n],
        SetRule::Drawn { rotate } => {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed.wrapping_mul(0x0000_0100_0000_01b3)
                    ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            let mut stakes: Vec<u64> = (0..n).map(|_| rng.gen_range(1..=10)).collect();
            if *rotate && rng.gen_bool(0.5) {
                let candidates: Vec<usize> = (0..n).filter(|i| honest(*i)).collect();
                stakes[candidates[rng.gen_range(0..candidates.len())]] = 0;
            }
            stakes
        }
    };
    for (i, stake) in stakes.iter_mut().enumerate() {
        if !honest(i) {
            *stake = (*stake).max(1);
        }
    }
    loop {
        let total: u64 = stakes.iter().sum();
        let byzantine: u64 = (0..n).filter(|i| !honest(*i)).map(|i| stakes[i]).sum();
        if 7 * byzantine <= 2 * total {
            return stakes;
        }
        let weakest = (0..n)
            .filter(|i| honest(*i) && stakes[*i] > 0)
            .min_by_key(|i| (stakes[*i], *i))
            .expect("an honest validator in the set");
        stakes[weakest] += 1;
    }
}

fn state_root(parent_root: &Hash, block: &Header, txs: &[Vec<u8>]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(parent_root.as_bytes());
    h.update(&block.height.to_le_bytes());
    for t in txs {
        h.update(t);
    }
    Hash(*h.finalize().as_bytes())
}

/// What survives a crash: final blocks and safety data.
#[derive(Default, Clone)]
struct Disk {
    final_blocks: BTreeMap<u64, (Hash, Header)>,
    final_qc: HashMap<Hash, QuorumCertificate>,
    safety: Option<SafetyData>,
}

struct Node {
    key: Keypair,
    behaviour: Behaviour,
    engine: Option<Engine>,
    blocks: HashMap<Hash, Block>,
    roots: HashMap<Hash, Hash>,
    timers: HashMap<TimerKind, u64>,
    disk: Disk,
    evidence_seen: usize,
    /// Virtual times at which this node finalized something.
    final_times: Vec<u64>,
    /// (virtual ms, final height) at each finalization.
    final_heights: Vec<(u64, u64)>,
    /// (epoch, virtual time) of every epoch this node's engine switched to.
    epoch_starts: Vec<(u64, u64)>,
    /// Rounds of the proposals, votes and timeouts this node sent.
    signed_rounds: Vec<u64>,
    /// Validators this node scored down for invalid messages, and why.
    scored_down: Vec<(usize, &'static str)>,
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: ConsensusMessage,
    },
    Synced {
        to: usize,
        blocks: Vec<Block>,
    },
    Crash(usize),
    Restart(usize),
}

struct Sim {
    seed: u64,
    /// Virtual time, the seeded RNG, the events and the fault model.
    world: World<Event>,
    nodes: Vec<Node>,
    genesis: Block,
    scenario: Scenario,
    trace: Vec<String>,
    /// `SIM_TRACE` is set: print every node's actions.
    tracing: bool,
}

const CHAIN: &str = "sim";

impl Sim {
    fn new(seed: u64, scenario: Scenario) -> Sim {
        let keys: Vec<Keypair> = (0..scenario.validators as u64)
            .map(|i| Keypair::from_seed(seed.wrapping_mul(1000) + i))
            .collect();
        let nodes = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| Node {
                key,
                behaviour: scenario.behaviour(i),
                engine: None,
                blocks: HashMap::new(),
                roots: HashMap::new(),
                timers: HashMap::new(),
                disk: Disk::default(),
                evidence_seen: 0,
                final_times: Vec::new(),
                final_heights: Vec::new(),
                epoch_starts: Vec::new(),
                signed_rounds: Vec::new(),
                scored_down: Vec::new(),
            })
            .collect();
        let mut sim = Sim {
            seed,
            world: World::new(seed, scenario.faults.clone()),
            nodes,
            genesis: Block {
                header: Header::default(),
                txs: vec![],
                evidence: vec![],
            },
            scenario,
            trace: Vec::new(),
            tracing: keel_simkit::tracing(),
        };
        sim.genesis.header = Header {
            chain_id: CHAIN.into(),
            validators_hash: sim.set_for_epoch(0).hash(),
            timestamp_ms: 0,
            ..Header::default()
        };
        for i in 0..sim.nodes.len() {
            let g = sim.genesis.clone();
            let gh = g.hash();
            sim.nodes[i]
                .disk
                .final_blocks
                .insert(0, (gh, g.header.clone()));
            sim.nodes[i]
                .disk
                .final_qc
                .insert(gh, QuorumCertificate::genesis(gh));
            sim.boot(i);
        }
        if let Some(c) = sim.world.faults.crash {
            sim.world.schedule(c.at, Event::Crash(c.node));
            sim.world.schedule(c.back, Event::Restart(c.node));
        }
        sim
    }

    /// The validator set of `epoch` (see [`stakes_for_epoch`]).
    fn set_for_epoch(&self, epoch: u64) -> ValidatorSet {
        let stakes = stakes_for_epoch(self.seed, &self.scenario, epoch);
        ValidatorSet::new(
            self.nodes
                .iter()
                .zip(stakes)
                .filter(|(_, stake)| *stake > 0)
                .map(|(n, stake)| Validator {
                    address: n.key.address(),
                    public_key: n.key.public(),
                    stake,
                })
                .collect(),
        )
        .expect("valid set")
    }

    fn epoch_length(&self) -> u64 {
        self.scenario.epoch_length
    }

    /// The virtual time, in ms.
    fn now(&self) -> u64 {
        self.world.now()
    }

    fn boot(&mut self, i: usize) {
        let now = self.now();
        let gh = self.genesis.hash();
        let length = self.epoch_length();
        let (&height, _) = self.nodes[i]
            .disk
            .final_blocks
            .iter()
            .next_back()
            .expect("genesis");
        // The engine runs the epoch of the block after its tip; at an epoch end it also needs
        // the set that certified the tip.
        let epoch = epoch_of_next_block(height, length);
        let set = self.set_for_epoch(epoch);
        let previous = (epoch > 0 && height == epoch_end_height(epoch - 1, length))
            .then(|| self.set_for_epoch(epoch - 1));
        let node = &mut self.nodes[i];
        let (hash, header) = node.disk.final_blocks.get(&height).expect("tip");
        let tip = Tip {
            height,
            hash: *hash,
            round: header.round,
            timestamp_ms: header.timestamp_ms,
            qc: node
                .disk
                .final_qc
                .get(hash)
                .cloned()
                .unwrap_or_else(|| QuorumCertificate::genesis(gh)),
        };
        node.blocks.clear();
        node.roots.clear();
        node.blocks.insert(gh, self.genesis.clone());
        node.roots.insert(gh, Hash::ZERO);
        // Final blocks are on disk: their roots are known.
        let finals: Vec<(Hash, Header)> = node.disk.final_blocks.values().cloned().collect();
        for (h, header) in finals {
            node.roots.insert(h, header.state_root);
            node.blocks.insert(
                h,
                Block {
                    header,
                    txs: vec![],
                    evidence: vec![],
                },
            );
        }
        node.timers.clear();
        let config = Config {
            chain_id: CHAIN.into(),
            block_time_ms: self.scenario.block_time_ms,
            timeout_ms: self.scenario.block_time_ms * 2,
            max_timeout_ms: self.scenario.block_time_ms * 8,
            epoch_length: length,
        };
        let set_hash = set.hash();
        let mut engine = Engine::new(config, node.key.clone(), set, tip, node.disk.safety.clone())
            .expect("engine");
        if let Some(previous) = previous {
            engine.set_previous_validators(previous);
        }
        // As the node does: the recent final headers, for the leader schedule.
        let recent: Vec<Header> = node
            .disk
            .final_blocks
            .values()
            .rev()
            .take(40)
            .map(|(_, h)| h.clone())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        engine.restore_history(&recent);
        assert_eq!(
            engine.epoch(),
            epoch,
            "seed {}: engine epoch at boot",
            self.seed
        );
        assert_eq!(engine.validators().hash(), set_hash);
        node.engine = Some(engine);
        node.epoch_starts.push((epoch, now));
        self.input(i, Input::Start);
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.now();
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return;
        };
        let effects = engine.handle(now, input);
        // The next validator set is computed once the effects before and after the request
        // are carried out (the Finalize before it stores the epoch-ending block).
        let mut next_epoch = None;
        for e in effects {
            if let Effect::NeedValidatorSet { epoch, height } = e {
                if self.tracing {
                    eprintln!(
                        "{:>7} n{i}: need validator set of epoch {epoch} (end h{height})",
                        self.now()
                    );
                }
                assert!(next_epoch.is_none(), "seed {}: two set requests", self.seed);
                next_epoch = Some((epoch, height));
            } else {
                self.effect(i, e);
            }
        }
        if let Some((epoch, height)) = next_epoch {
            self.new_epoch(i, epoch, height);
        }
    }

    /// Answers a node's [`Effect::NeedValidatorSet`].
    fn new_epoch(&mut self, i: usize, epoch: u64, height: u64) {
        let seed = self.seed;
        assert!(epoch > 0, "seed {seed}: node {i} asked for the genesis set");
        assert_eq!(
            height,
            epoch_end_height(epoch - 1, self.epoch_length()),
            "seed {seed}: node {i} asked for the set of epoch {epoch} at height {height}"
        );
        assert_eq!(
            self.final_height(i),
            height,
            "seed {seed}: node {i} asked for the set of epoch {epoch} before its end was final"
        );
        // Blocks of the old epoch above its end are the dropped suffix: never final. Forget
        // them for validation, like the engine does, so a later sync serves them again; keep
        // serving them to peers, which may need the suffix to use an epoch proof. Blocks of
        // the new epoch synced early stay, as a node's store keeps them: the engine kept them
        // too and takes them at the switch.
        let node = &mut self.nodes[i];
        for (hash, block) in &node.blocks {
            if block.header.height > height && block.header.epoch < epoch {
                node.roots.remove(hash);
            }
        }
        let set = self.set_for_epoch(epoch);
        let set_hash = set.hash();
        if self.tracing {
            eprintln!("{:>7} n{i}: new epoch {epoch}", self.now());
        }
        self.input(
            i,
            Input::NewEpoch {
                epoch,
                validators: set,
            },
        );
        // Blocks of the new epoch synced before the switch are applied by it, so the engine
        // may already have made more final, even ended this epoch too (then the next switch
        // ran inside this input and made its own checks).
        let engine = self.nodes[i].engine.as_ref().expect("running");
        assert!(
            engine.epoch() >= epoch,
            "seed {seed}: node {i} did not switch epoch"
        );
        assert!(engine.final_tip().height >= height);
        if engine.epoch() == epoch {
            assert!(!engine.awaiting_validator_set());
            assert_eq!(
                engine.validators().hash(),
                set_hash,
                "seed {seed}: node {i} runs epoch {epoch} with another set"
            );
        }
        let now = self.now();
        let starts = &mut self.nodes[i].epoch_starts;
        let at = starts
            .iter()
            .position(|(e, _)| *e > epoch)
            .unwrap_or(starts.len());
        starts.insert(at, (epoch, now));
    }

    fn send(&mut self, from: usize, to: usize, msg: ConsensusMessage) {
        if self.nodes[from].behaviour == Behaviour::Silent {
            return;
        }
        if let Some(delay) = self.world.transit(from, to) {
            self.world
                .schedule_in(delay, Event::Deliver { from, to, msg });
        }
    }

    fn index_of(&self, addr: &Address) -> Option<usize> {
        self.nodes.iter().position(|n| n.key.address() == *addr)
    }

    fn trace_effect(&self, i: usize, e: &Effect) {
        let r = self.nodes[i]
            .engine
            .as_ref()
            .map(|e| e.round())
            .unwrap_or(0);
        let rr = |round: u64| format!("e{}:{}", round_epoch(round), round & 0xffff_ffff);
        let what = match e {
            Effect::SetTimer { .. } | Effect::PersistSafety(_) => String::new(),
            Effect::Broadcast(ConsensusMessage::Proposal(p)) => format!(
                "propose h{} r{}",
                p.block.header.height,
                rr(p.block.header.round)
            ),
            Effect::Broadcast(ConsensusMessage::Timeout(t)) => {
                format!("timeout r{} hqc{}", rr(t.round), rr(t.high_qc.round))
            }
            Effect::Broadcast(ConsensusMessage::EpochProof(p)) => {
                format!("broadcast epoch proof h{} r{}", p.qc.height, rr(p.qc.round))
            }
            Effect::SendTo {
                message: ConsensusMessage::EpochProof(p),
                to,
            } => format!("epoch proof h{} -> {:?}", p.qc.height, self.index_of(to)),
            Effect::SendTo {
                message: ConsensusMessage::Timeout(t),
                to,
            } => format!(
                "timeout r{} with TC r{} -> {:?}",
                rr(t.round),
                t.last_tc
                    .as_ref()
                    .map(|tc| rr(tc.round))
                    .unwrap_or_default(),
                self.index_of(to)
            ),
            Effect::SendTo {
                message: ConsensusMessage::Vote(v),
                to,
            } => format!("vote r{} -> {:?}", rr(v.round), self.index_of(to)),
            Effect::Certified { height, round, .. } => {
                format!("certified h{height} r{}", rr(*round))
            }
            Effect::Finalize { height, .. } => format!("FINAL h{height}"),
            Effect::RequestSync { qc } => format!("sync h{} r{}", qc.height, rr(qc.round)),
            Effect::BuildBlock(b) => format!(
                "build h{} r{}{}",
                b.height,
                rr(b.round),
                if b.empty { " (empty)" } else { "" }
            ),
            Effect::ValidateBlock(b) => {
                format!("validate h{} r{}", b.header.height, rr(b.header.round))
            }
            other => format!("{:?}", std::mem::discriminant(other)),
        };
        if !what.is_empty() {
            eprintln!("{:>7} n{i} (round {}): {what}", self.now(), rr(r));
        }
    }

    fn effect(&mut self, i: usize, e: Effect) {
        if self.tracing {
            self.trace_effect(i, &e);
        }
        match e {
            Effect::SetTimer { kind, at_ms } => {
                self.nodes[i].timers.insert(kind, at_ms);
            }
            Effect::BuildBlock(req) => {
                let mut header = Header {
                    chain_id: CHAIN.into(),
                    height: req.height,
                    round: req.round,
                    epoch: req.epoch,
                    parent_hash: req.parent_hash,
                    timestamp_ms: req.timestamp_ms,
                    proposer: req.proposer,
                    validators_hash: req.validators_hash,
                    parent_qc: req.parent_qc,
                    failed_proposers: req.failed_proposers,
                    ..Header::default()
                };
                // A suffix block (above the epoch end) only certifies the end: no txs, no
                // evidence.
                let (txs, evidence) = if req.empty {
                    (vec![], vec![])
                } else {
                    (
                        vec![format!("tx-{}-{}", req.height, req.round).into_bytes()],
                        req.evidence,
                    )
                };
                let Some(parent_root) = self.nodes[i].roots.get(&req.parent_hash).copied() else {
                    return self.input(i, Input::BuildFailed { round: req.round });
                };
                header.state_root = state_root(&parent_root, &header, &txs);
                if self.nodes[i].behaviour == Behaviour::InvalidProposer {
                    header.state_root = Hash::digest(b"wrong");
                }
                let block = Block {
                    header,
                    txs,
                    evidence,
                };
                self.nodes[i]
                    .roots
                    .insert(block.hash(), block.header.state_root);
                self.nodes[i].blocks.insert(block.hash(), block.clone());
                self.input(i, Input::BlockBuilt(block));
            }
            Effect::ValidateBlock(block) => {
                let valid = self.validate(i, &block);
                self.input(
                    i,
                    Input::BlockValidated {
                        hash: block.hash(),
                        valid,
                    },
                );
            }
            Effect::PersistSafety(s) => self.nodes[i].disk.safety = Some(s),
            Effect::Broadcast(msg) => {
                match &msg {
                    ConsensusMessage::Proposal(p) => {
                        self.nodes[i].signed_rounds.push(p.block.header.round)
                    }
                    ConsensusMessage::Timeout(t) => self.nodes[i].signed_rounds.push(t.round),
                    _ => {}
                }
                for to in 0..self.nodes.len() {
                    self.send(i, to, msg.clone());
                }
            }
            Effect::SendTo { to, message } => {
                if let ConsensusMessage::Vote(v) = &message {
                    self.nodes[i].signed_rounds.push(v.round);
                }
                if let Some(j) = self.index_of(&to) {
                    if self.nodes[i].behaviour == Behaviour::Equivocator {
                        if let ConsensusMessage::Vote(v) = &message {
                            let fake = Vote::sign(
                                &self.nodes[i].key,
                                CHAIN,
                                Hash::digest(&v.round.to_le_bytes()),
                                v.height,
                                v.round,
                            );
                            self.send(i, j, ConsensusMessage::Vote(fake));
                        }
                    }
                    self.send(i, j, message);
                }
            }
            Effect::Certified { .. } => {}
            Effect::Finalize { hash, height, qc } => self.finalize(i, hash, height, qc),
            Effect::RequestSync { qc } => {
                // Ask a random other node that holds the certified block for the chain ending
                // at it (a sync layer asks the peers that have it), down to this node's final
                // height: blocks this node's store already holds come again too, since the
                // engine may not have taken them (a node's host passes every block of an
                // answer to consensus, re-executing only those it lacks).
                let holders: Vec<usize> = (0..self.nodes.len())
                    .filter(|p| *p != i && self.nodes[*p].blocks.contains_key(&qc.block_hash))
                    .collect();
                if holders.is_empty() {
                    return;
                }
                let peer = holders[self.world.rng.gen_range(0..holders.len())];
                let final_height = self.final_height(i);
                let mut chain = Vec::new();
                let mut cursor = qc.block_hash;
                while let Some(b) = self.nodes[peer].blocks.get(&cursor) {
                    if b.header.height <= final_height {
                        break;
                    }
                    chain.push(b.clone());
                    cursor = b.header.parent_hash;
                    if chain.len() > 64 {
                        break;
                    }
                }
                if !chain.is_empty() && self.nodes[i].roots.contains_key(&cursor) {
                    chain.reverse();
                    let delay = 2 * self.world.latency();
                    self.world.schedule_in(
                        delay,
                        Event::Synced {
                            to: i,
                            blocks: chain,
                        },
                    );
                }
            }
            Effect::ReportEvidence(_) => self.nodes[i].evidence_seen += 1,
            Effect::Invalid { from, reason } => {
                let sender = usize::try_from(from.0 - 1).expect("a validator's origin");
                self.nodes[i].scored_down.push((sender, reason));
            }
            Effect::NeedValidatorSet { .. } => {
                unreachable!("answered in `input` after the other effects")
            }
        }
    }

    fn validate(&mut self, i: usize, block: &Block) -> bool {
        let node = &mut self.nodes[i];
        let Some(parent_root) = node.roots.get(&block.header.parent_hash).copied() else {
            return false;
        };
        let Some(parent) = node.blocks.get(&block.header.parent_hash) else {
            return false;
        };
        if parent.header.height + 1 != block.header.height {
            return false;
        }
        // Like the node's application: a block above its epoch's end carries nothing.
        let end = epoch_end_height(block.header.epoch, self.scenario.epoch_length);
        if block.header.height > end && (!block.txs.is_empty() || !block.evidence.is_empty()) {
            return false;
        }
        if state_root(&parent_root, &block.header, &block.txs) != block.header.state_root {
            return false;
        }
        node.roots.insert(block.hash(), block.header.state_root);
        node.blocks.insert(block.hash(), block.clone());
        true
    }

    fn finalize(&mut self, i: usize, hash: Hash, height: u64, qc: QuorumCertificate) {
        let final_height = self.final_height(i);
        let now = self.now();
        let node = &mut self.nodes[i];
        let mut cursor = hash;
        let mut newly = Vec::new();
        while let Some(b) = node.blocks.get(&cursor) {
            if b.header.height <= final_height {
                break;
            }
            newly.push((b.header.height, cursor, b.header.clone()));
            cursor = b.header.parent_hash;
        }
        assert_eq!(
            newly.first().map(|n| n.0),
            Some(height),
            "seed {}: finalized block not known locally",
            self.seed
        );
        assert_eq!(
            qc.block_hash, hash,
            "seed {}: final certificate of another block",
            self.seed
        );
        for (h, hash, header) in newly.into_iter().rev() {
            node.disk.final_blocks.insert(h, (hash, header));
        }
        node.disk.final_qc.insert(hash, qc);
        node.final_times.push(now);
        node.final_heights.push((now, height));
    }

    fn run(&mut self) {
        let end = self.scenario.duration_ms;
        loop {
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.timers.iter().map(move |(k, at)| (*at, i, *k)))
                .min_by_key(|(at, i, k)| (*at, *i, *k as u8));
            let event = match self.world.next(next_timer.map(|(at, i, _)| (at, i)), end) {
                Next::End => break,
                Next::Timer { node } => {
                    let (_, _, kind) = next_timer.expect("the timer that is due");
                    self.nodes[node].timers.remove(&kind);
                    self.input(node, Input::Timer(kind));
                    continue;
                }
                Next::Event(event) => event,
            };
            match event {
                Event::Deliver { from, to, msg } => self.input(
                    to,
                    Input::Message {
                        // Origin 0 is the node itself: validator i is origin i + 1.
                        from: Origin(from as u64 + 1),
                        message: msg,
                    },
                ),
                Event::Synced { to, blocks } => {
                    let valid: Vec<Block> = blocks
                        .into_iter()
                        .take_while(|b| self.validate(to, b))
                        .collect();
                    if !valid.is_empty() {
                        self.input(to, Input::Synced(valid));
                    }
                }
                Event::Crash(i) => {
                    self.trace.push(format!("{}: crash {i}", self.now()));
                    self.nodes[i].engine = None;
                    self.nodes[i].timers.clear();
                }
                Event::Restart(i) => {
                    self.trace.push(format!("{}: restart {i}", self.now()));
                    self.boot(i);
                }
            }
        }
    }

    fn honest(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].behaviour == Behaviour::Honest)
            .collect()
    }

    fn final_height(&self, i: usize) -> u64 {
        self.nodes[i]
            .disk
            .final_blocks
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    /// The epoch node `i`'s engine runs (None while it is down).
    fn epoch(&self, i: usize) -> Option<u64> {
        self.nodes[i].engine.as_ref().map(Engine::epoch)
    }

    /// Where every node ended: behaviour, epoch, final height, and whether its epoch's set
    /// has it.
    fn summary(&self) -> String {
        (0..self.nodes.len())
            .map(|i| match self.epoch(i) {
                Some(epoch) => {
                    let member = self
                        .set_for_epoch(epoch)
                        .get(&self.nodes[i].key.address())
                        .is_some();
                    format!(
                        "n{i} {:?} epoch {epoch}{} final h{}",
                        self.nodes[i].behaviour,
                        if member { "" } else { " (left out)" },
                        self.final_height(i)
                    )
                }
                None => format!("n{i} down"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Safety and the shape of every honest final chain.
    fn check_invariants(&self) {
        self.check_safety();
        let mut sets: HashMap<u64, ValidatorSet> = HashMap::new();
        for i in self.honest() {
            self.check_chain(i, &mut sets);
        }
        // Scoring a peer down is for faults: no honest validator is ever scored down.
        let honest = self.honest();
        for i in &honest {
            for (sender, reason) in &self.nodes[*i].scored_down {
                assert!(
                    !honest.contains(sender),
                    "seed {}: node {i} scored honest node {sender} down: {reason}",
                    self.seed
                );
            }
        }
    }

    /// No two different final blocks at one height on any two honest validators; agreeing
    /// state roots.
    fn check_safety(&self) {
        check::one_final_chain(
            self.seed,
            &self.honest(),
            |i| self.final_height(i),
            |i, h| {
                let (hash, header) = self.nodes[i].disk.final_blocks.get(&h)?;
                Some((*hash, header.state_root))
            },
        );
    }

    /// Node `i`'s final chain: every height from genesis, each block linked to the one below
    /// by hash and certificate; each block in the epoch its height belongs to, never above
    /// that epoch's end (suffix blocks are never final), proposed by its round's leader in
    /// that epoch's set; and each certificate signed by a quorum of its epoch's set.
    fn check_chain(&self, i: usize, sets: &mut HashMap<u64, ValidatorSet>) {
        let seed = self.seed;
        let length = self.epoch_length();
        let finals = &self.nodes[i].disk.final_blocks;
        let top = self.final_height(i);
        assert_eq!(
            finals.len() as u64,
            top + 1,
            "seed {seed}: node {i} has holes in its final chain"
        );
        for (&height, (hash, header)) in finals.iter().skip(1) {
            let what = format!("seed {seed}: node {i}, final block at height {height}");
            assert_eq!(hash, &header.hash(), "{what}: hash");
            assert_eq!(header.height, height, "{what}: height");
            let (parent_hash, parent) = finals.get(&(height - 1)).expect("contiguous");
            assert_eq!(&header.parent_hash, parent_hash, "{what}: parent");
            let qc = &header.parent_qc;
            assert_eq!(
                (qc.block_hash, qc.height, qc.round),
                (*parent_hash, parent.height, parent.round),
                "{what}: certificate of the parent"
            );
            assert_eq!(
                header.epoch,
                round_epoch(header.round),
                "{what}: epoch {} but round of epoch {}",
                header.epoch,
                round_epoch(header.round)
            );
            assert!(
                height <= epoch_end_height(header.epoch, length),
                "{what}: a suffix block of epoch {} (ends at {}) is final",
                header.epoch,
                epoch_end_height(header.epoch, length)
            );
            assert_eq!(
                header.epoch,
                epoch_of_next_block(height - 1, length),
                "{what}: in epoch {}",
                header.epoch
            );
            let set = sets
                .entry(header.epoch)
                .or_insert_with(|| self.set_for_epoch(header.epoch));
            assert_eq!(
                header.validators_hash,
                set.hash(),
                "{what}: validators hash of another set"
            );
            // Leader reputation may skip inactive validators, so the schedule of the whole
            // set is not binding; membership is (the engines check the exact leader).
            assert!(
                set.get(&header.proposer).is_some(),
                "{what}: proposed by a non-member"
            );
            // The certificate of the parent (genesis has none).
            if parent.height > 0 {
                let set = sets
                    .entry(parent.epoch)
                    .or_insert_with(|| self.set_for_epoch(parent.epoch));
                let stake: u64 = qc
                    .signatures
                    .iter()
                    .map(|s| {
                        set.get(&s.validator)
                            .unwrap_or_else(|| panic!("{what}: certificate signed by a stranger"))
                            .stake
                    })
                    .sum();
                assert!(
                    set.is_quorum(stake),
                    "{what}: certificate of the parent without a quorum of epoch {}",
                    parent.epoch
                );
            }
        }
        let (tip_hash, _) = finals.get(&top).expect("tip");
        let tip_qc = self.nodes[i].disk.final_qc.get(tip_hash);
        assert!(
            tip_qc.is_some_and(|qc| qc.block_hash == *tip_hash && qc.height == top),
            "seed {seed}: node {i} lacks the certificate of its final tip"
        );
    }
}

fn scenario_for(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let validators = rng.gen_range(4..=7usize);
    let f = (validators - 1) / 3;
    let mut byzantine = vec![Behaviour::Honest; validators];
    let kinds = [
        Behaviour::Silent,
        Behaviour::Equivocator,
        Behaviour::InvalidProposer,
    ];
    for slot in byzantine.iter_mut().take(rng.gen_range(0..=f)) {
        *slot = kinds[rng.gen_range(0..kinds.len())];
    }
    let duration_ms = 200_000;
    let partition = rng.gen_bool(0.4).then(|| {
        let start = rng.gen_range(5_000..40_000);
        let side: Vec<usize> = (0..validators).filter(|_| rng.gen_bool(0.5)).collect();
        Partition {
            start,
            end: start + rng.gen_range(5_000..30_000),
            side,
        }
    });
    let crash = rng
        .gen_bool(0.4)
        .then(|| Crash::draw(&mut rng, validators, 5_000..50_000));
    let (latency_ms, loss) = draw_link(&mut rng);
    // Drawn last, so the faults above are those of the runs before epochs.
    let epoch_length = rng.gen_range(3..=6);
    let sets = SetRule::Drawn {
        rotate: rng.gen_bool(0.5),
    };
    Scenario {
        validators,
        byzantine,
        block_time_ms: 1_000,
        duration_ms,
        faults: Faults {
            latency_ms,
            loss,
            partition,
            crash,
        },
        epoch_length,
        sets,
    }
}

fn run_seed(seed: u64) {
    check_run(seed, scenario_for(seed), MIN_EPOCH);
}

/// Runs `scenario` and checks the invariants, liveness after healing, and that every honest
/// validator reached `min_epoch`.
fn check_run(seed: u64, scenario: Scenario, min_epoch: u64) -> Sim {
    let mut sim = Sim::new(seed, scenario.clone());
    sim.run();
    sim.check_invariants();
    if std::env::var("SIM_STATS").is_ok() {
        eprintln!("seed {seed}: {}", sim.summary());
    }
    // Liveness: with more than 2/3 of the stake honest, once the network has healed and any
    // crashed validator is back, every honest validator finalizes a new block within bounded
    // virtual time. (Bounded generously: without leader reputation, a silent validator can be
    // drawn as leader for several rounds in a row.)
    let healed_at = scenario.faults.healed_at();
    for i in sim.honest() {
        let progress = check::progress_after(
            seed,
            i,
            &sim.nodes[i].final_times,
            healed_at,
            LIVENESS_BOUND_MS,
        );
        if let Err(stalled) = progress {
            panic!(
                "{stalled}; final height {}; {} ({scenario:?}) trace {:?}",
                sim.final_height(i),
                sim.summary(),
                sim.trace
            );
        }
    }
    // Epochs keep turning over: every honest validator (members and those left out alike)
    // reached `min_epoch`, never going back.
    for i in sim.honest() {
        let epoch = sim.epoch(i).expect("every crashed node restarts");
        assert!(
            epoch >= min_epoch,
            "seed {seed}: honest node {i} only reached epoch {epoch}; {} ({scenario:?}) trace {:?}",
            sim.summary(),
            sim.trace
        );
        for w in sim.nodes[i].epoch_starts.windows(2) {
            assert!(
                w[1].0 >= w[0].0,
                "seed {seed}: node {i} went back from epoch {} to {}",
                w[0].0,
                w[1].0
            );
        }
    }
    sim
}

/// How long after healing progress must resume.
const LIVENESS_BOUND_MS: u64 = 30_000;
/// The epoch every honest validator reaches in a random-fault run (epochs of at most 6
/// blocks, 200 s of virtual time, one-second blocks).
const MIN_EPOCH: u64 = 2;

/// Seeds of the random-fault run unless `SIM_SEEDS` says otherwise.
const DEFAULT_SEEDS: u64 = 200;

#[test]
fn random_faults_never_break_safety_and_progress_resumes() {
    run_seeds("consensus simulation", seeds(DEFAULT_SEEDS), run_seed);
}

/// Seconds after `kill_ms` until node `i`'s block rate over windows of 20 block times is
/// back to 90% of its rate in the 60 s before the kill, and holds for three windows (the
/// measure of `tests/tests/liveness.rs`, on virtual time).
fn recovery_after(sim: &Sim, i: usize, kill_ms: u64, block_time_ms: u64) -> Option<u64> {
    let heights = &sim.nodes[i].final_heights;
    let height_at = |t: u64| {
        heights
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, h)| *h)
    };
    let blocks = |from: u64, to: u64| height_at(to).saturating_sub(height_at(from));
    let before = 60_000;
    let rate = blocks(kill_ms - before, kill_ms) as f64 / before as f64;
    let window = 20 * block_time_ms;
    let good = |t: u64| blocks(t, t + window) as f64 >= 0.9 * rate * window as f64;
    let end = sim.scenario.duration_ms;
    let step = block_time_ms.max(50) / 2;
    (kill_ms..end.saturating_sub(4 * window))
        .step_by(step as usize)
        .find(|t| (0..=3 * window).step_by(step as usize).all(|d| good(t + d)))
        .map(|t| t - kill_ms)
}

/// One of four equal validators dies for good: the others are back to 90% of their block
/// rate within 10 s, at block times from 50 ms to 3 s, in short epochs as in long ones.
#[test]
fn killing_one_of_four_validators_costs_seconds_at_any_block_time() {
    for block_time_ms in [50, 300, 1_000, 3_000] {
        for epoch_length in [5, 1_000] {
            let kill_ms = 90 * block_time_ms.max(1_000);
            let duration_ms = kill_ms + 100 * block_time_ms.max(600);
            let scenario = Scenario {
                validators: 4,
                byzantine: vec![],
                block_time_ms,
                duration_ms,
                faults: Faults {
                    crash: Some(Crash {
                        at: kill_ms,
                        back: duration_ms,
                        node: 3,
                    }),
                    ..Faults::calm((5, 20))
                },
                epoch_length,
                sets: SetRule::Fixed,
            };
            let mut sim = Sim::new(7, scenario);
            sim.run();
            sim.check_invariants();
            let recovery = recovery_after(&sim, 0, kill_ms, block_time_ms);
            eprintln!(
                "block_time_ms {block_time_ms}, epoch_length {epoch_length}: back to 90% after \
                 {recovery:?} ms"
            );
            let ms = recovery.expect("the block rate came back");
            assert!(
                ms <= 10_000,
                "block_time_ms {block_time_ms}, epoch_length {epoch_length}: {ms} ms"
            );
        }
    }
}

// Two seeds of the random run that used to stall for more than 100 s (of 1,000 seeds, with
// reputation reset at every epoch and stake draws while it had no history), kept as fixed
// scenarios so that changes to the scenario generator cannot lose them.

/// Seed 243: four validators, one silent from the start, another crashed from 8 s to 27 s
/// (nothing can be final before), 4% loss, 4-block epochs. It finalized nothing for 100 s
/// after the restart; now within the liveness bound.
#[test]
fn a_silent_validator_and_a_crash_at_the_start_of_the_chain() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![Behaviour::Silent],
        block_time_ms: 1_000,
        duration_ms: 200_000,
        faults: Faults {
            latency_ms: (5, 174),
            loss: 0.044_285_141_731_362_18,
            partition: None,
            crash: Some(Crash {
                at: 8_273,
                back: 27_292,
                node: 3,
            }),
        },
        epoch_length: 4,
        sets: SetRule::Drawn { rotate: false },
    };
    check_run(243, scenario, MIN_EPOCH);
}

/// Seed 301: seven validators, two silent, one crashed from 19 s to 39 s, 5% loss, 5-block
/// epochs. It never left epoch 1 in 200 s; now within the liveness bound.
#[test]
fn two_silent_validators_of_seven_and_a_crash() {
    let scenario = Scenario {
        validators: 7,
        byzantine: vec![Behaviour::Silent, Behaviour::Silent],
        block_time_ms: 1_000,
        duration_ms: 200_000,
        faults: Faults {
            latency_ms: (5, 128),
            loss: 0.048_603_748_857_048_816,
            partition: None,
            crash: Some(Crash {
                at: 18_795,
                back: 38_769,
                node: 2,
            }),
        },
        epoch_length: 5,
        sets: SetRule::Drawn { rotate: false },
    };
    check_run(301, scenario, MIN_EPOCH);
}

// Four seeds of the 10,000-seed run that missed the 30 s bound (docs/consensus.md, "Liveness
// when validators fail", 9 to 11), kept as fixed scenarios.

/// Seed 5155: seven validators, an invalid proposer and a silent one (crashed from 30 s to
/// 41 s), a partition until 30 s, 4-block epochs with drawn sets. Two validators synced the
/// first blocks of epoch 4 just before its proof and dropped them, so leader reputation
/// differed between validators and two leaders proposed in the same rounds.
#[test]
fn blocks_synced_before_an_epoch_switch_are_not_lost() {
    let scenario = Scenario {
        validators: 7,
        byzantine: vec![Behaviour::InvalidProposer, Behaviour::Silent],
        block_time_ms: 1_000,
        duration_ms: 200_000,
        faults: Faults {
            latency_ms: (5, 117),
            loss: 0.0,
            partition: Some(Partition {
                start: 13_408,
                end: 29_968,
                side: vec![2, 5],
            }),
            crash: Some(Crash {
                at: 30_349,
                back: 41_090,
                node: 1,
            }),
        },
        epoch_length: 4,
        sets: SetRule::Drawn { rotate: true },
    };
    check_run(5155, scenario, MIN_EPOCH);
}

/// Seed 5242: four validators, an invalid proposer crashed from 24 s to 42 s, 5% loss,
/// 4-block epochs with drawn sets. In epoch 6 the two honest members had each failed a round
/// in the window, so reputation named the invalid proposer in nearly every round.
#[test]
fn a_stale_reputation_cannot_hand_the_rounds_to_one_validator() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![Behaviour::InvalidProposer],
        block_time_ms: 1_000,
        duration_ms: 200_000,
        faults: Faults {
            latency_ms: (5, 187),
            loss: 0.049_591_916_019_998_35,
            partition: None,
            crash: Some(Crash {
                at: 24_269,
                back: 42_458,
                node: 0,
            }),
        },
        epoch_length: 4,
        sets: SetRule::Drawn { rotate: true },
    };
    check_run(5242, scenario, MIN_EPOCH);
}

/// Seeds 6476 and 7319: seven validators, two silent from the start, 5% and 2% loss, short
/// epochs. Every honest timeout is needed for a TC; a next leader that missed one learnt
/// the TC a whole timeout late, and nothing was final for the first 30 s.
#[test]
fn a_next_leader_that_missed_a_timeout_still_gets_the_tc() {
    for (seed, latency, loss, epoch_length) in [
        (6476, (5, 145), 0.046_322_368_526_243_61, 6),
        (7319, (5, 173), 0.022_232_215_678_404_943, 4),
    ] {
        let scenario = Scenario {
            validators: 7,
            byzantine: vec![Behaviour::Silent, Behaviour::Silent],
            block_time_ms: 1_000,
            duration_ms: 200_000,
            faults: Faults {
                latency_ms: latency,
                loss,
                partition: None,
                crash: None,
            },
            epoch_length,
            sets: SetRule::Drawn { rotate: true },
        };
        check_run(seed, scenario, MIN_EPOCH);
    }
}

#[test]
fn drawn_sets_keep_the_fault_model() {
    for seed in 0..300 {
        let scenario = scenario_for(seed);
        let honest = |i: usize| scenario.behaviour(i) == Behaviour::Honest;
        let mut left_out = 0;
        for epoch in 0..40 {
            let stakes = stakes_for_epoch(seed, &scenario, epoch);
            assert_eq!(
                stakes,
                stakes_for_epoch(seed, &scenario, epoch),
                "deterministic"
            );
            let total: u64 = stakes.iter().sum();
            let byzantine: u64 = (0..stakes.len())
                .filter(|i| !honest(*i))
                .map(|i| stakes[i])
                .sum();
            assert!(
                3 * byzantine < total,
                "seed {seed} epoch {epoch}: {stakes:?}"
            );
            assert!(
                7 * byzantine <= 2 * total,
                "seed {seed} epoch {epoch}: {stakes:?}"
            );
            assert!(
                (0..stakes.len()).all(|i| honest(i) || stakes[i] > 0),
                "seed {seed} epoch {epoch}: a byzantine validator left out"
            );
            if epoch == 0 {
                assert_eq!(stakes, vec![GENESIS_STAKE; scenario.validators]);
            }
            left_out += stakes.iter().filter(|s| **s == 0).count();
        }
        if matches!(scenario.sets, SetRule::Drawn { rotate: true }) {
            assert!(left_out > 0, "seed {seed}: nobody ever left out");
        } else {
            assert_eq!(left_out, 0);
        }
    }
}

#[test]
fn validator_set_changes_take_effect_at_epoch_boundaries() {
    // Epoch 1 leaves validator 3 out; every other epoch has all four.
    fn stakes(epoch: u64) -> Vec<u64> {
        if epoch == 1 {
            vec![100, 100, 100, 0]
        } else {
            vec![100; 4]
        }
    }
    const L: u64 = 5;
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![],
        block_time_ms: 1_000,
        duration_ms: 60_000,
        faults: Faults::calm((5, 50)),
        epoch_length: L,
        sets: SetRule::Scripted(stakes),
    };
    let mut sim = Sim::new(5, scenario);
    sim.run();
    sim.check_invariants();
    let out = sim.nodes[3].key.address();
    let epoch_1 = sim.set_for_epoch(1);
    assert_eq!(epoch_1.len(), 3);
    assert!(epoch_1.get(&out).is_none());
    assert_eq!(sim.set_for_epoch(2).len(), 4);

    let chain: Vec<&Header> = sim.nodes[0]
        .disk
        .final_blocks
        .values()
        .map(|(_, h)| h)
        .collect();
    let top = sim.final_height(0);
    assert!(top >= 5 * L, "only {top} final blocks in 60 s");
    // The certificate of final block h is in final block h + 1.
    let signed_by = |height: u64, who: &Address| {
        chain[height as usize + 1]
            .parent_qc
            .signatures
            .iter()
            .any(|s| s.validator == *who)
    };
    let epoch_1_heights = epoch_end_height(0, L) + 1..=epoch_end_height(1, L);
    for h in epoch_1_heights.clone() {
        let header = chain[h as usize];
        assert_eq!(header.epoch, 1);
        assert_eq!(header.validators_hash, epoch_1.hash());
        assert_ne!(
            header.proposer, out,
            "h{h}: proposed by a validator out of the set"
        );
        assert!(
            !signed_by(h, &out),
            "h{h}: certified with the vote of a validator out of the set"
        );
    }
    // Left out, validator 3 signs nothing in epoch 1 but follows: it finalizes every block of
    // the epoch and switches to epoch 2 together with the others.
    let node3 = &sim.nodes[3];
    assert!(
        node3.signed_rounds.iter().all(|r| round_epoch(*r) != 1),
        "validator 3 signed in epoch 1"
    );
    assert!(node3.signed_rounds.iter().any(|r| round_epoch(*r) == 0));
    assert!(
        node3.signed_rounds.iter().any(|r| round_epoch(*r) == 2),
        "validator 3 signed nothing in epoch 2, back in the set"
    );
    for h in epoch_1_heights {
        assert_eq!(
            node3.disk.final_blocks.get(&h).map(|(hash, _)| hash),
            sim.nodes[0].disk.final_blocks.get(&h).map(|(hash, _)| hash),
            "validator 3 did not follow the chain at h{h}"
        );
    }
    let started = |i: usize, epoch: u64| {
        sim.nodes[i]
            .epoch_starts
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("node {i} never entered epoch {epoch}"))
    };
    for epoch in 1..=3 {
        let first = (0..3).map(|i| started(i, epoch)).min().unwrap();
        let lag = started(3, epoch).saturating_sub(first);
        assert!(
            lag <= 1_000,
            "validator 3 entered epoch {epoch} {lag} ms late"
        );
    }
    assert!(
        sim.final_height(3) + 2 >= top,
        "validator 3 is behind: {} vs {top}",
        sim.final_height(3)
    );
    // Back from epoch 2 on: it proposes final blocks and its votes certify them again.
    let later: Vec<u64> = (epoch_end_height(1, L) + 1..top).collect();
    assert!(later.iter().all(|h| chain[*h as usize].epoch >= 2));
    assert!(
        later.iter().any(|h| chain[*h as usize].proposer == out),
        "validator 3 proposed no final block after epoch 1"
    );
    assert!(
        later.iter().any(|h| signed_by(*h, &out)),
        "no certificate after epoch 1 has validator 3's vote"
    );
    for i in 0..4 {
        assert!(
            sim.epoch(i).unwrap() >= 5,
            "node {i} in epoch {:?}",
            sim.epoch(i)
        );
        assert_eq!(sim.nodes[i].engine.as_ref().unwrap().validators().len(), 4);
    }
}

// Two liveness bugs this simulation found (before the fix: epoch proofs are kept for 16
// epochs, answered by the sender's epoch on a timer, self-contained, and validators outside
// the set still send timeouts that draw them). Each test is a deterministic reproduction of
// a failure class seen under `SIM_SEEDS=1000`.

/// A validator left out of epoch 1 follows silently. Partitioned while epoch 1 ends, it used
/// to never learn that it ended: it sends nothing of epoch 1 that others would answer with the epoch
/// proof, it ignores the timeouts of epoch 2 as future ones, and epoch 2, which needs its
/// stake, makes no proposal it could sync from. The chain stops for good after the partition
/// heals, with every validator honest. (Random seeds: 746, 994.)
#[test]
fn a_left_out_validator_that_missed_the_epoch_end_catches_up() {
    fn stakes(epoch: u64) -> Vec<u64> {
        match epoch {
            0 => vec![100; 4],
            1 => vec![100, 100, 100, 0],
            // Validator 3 holds 40%: no quorum without it.
            _ => vec![100, 100, 100, 200],
        }
    }
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![],
        block_time_ms: 1_000,
        duration_ms: 90_000,
        faults: Faults {
            partition: Some(Partition {
                start: 8_000,
                end: 20_000,
                side: vec![3],
            }),
            ..Faults::calm((5, 50))
        },
        epoch_length: 5,
        sets: SetRule::Scripted(stakes),
    };
    check_run(21, scenario, 4);
}

/// A validator down across two epoch ends restarts in epoch 0 while the others wait in epoch
/// 2, which needs its stake. Its timeouts of epoch 0 are answered with the only proof the
/// others keep, that epoch 1 ended, which it cannot use (it checks proofs of its own epoch
/// only), and epoch 2 makes no proposal it could sync from. (Random seeds: 306, 489, 564,
/// 596, 632.)
#[test]
fn a_validator_two_epochs_behind_catches_up() {
    fn stakes(epoch: u64) -> Vec<u64> {
        if epoch < 2 {
            vec![100; 4]
        } else {
            vec![100, 100, 100, 200]
        }
    }
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![],
        block_time_ms: 1_000,
        duration_ms: 90_000,
        faults: Faults {
            crash: Some(Crash {
                at: 3_000,
                back: 20_000,
                node: 3,
            }),
            ..Faults::calm((5, 50))
        },
        epoch_length: 4,
        sets: SetRule::Scripted(stakes),
    };
    check_run(22, scenario, 4);
}

#[test]
fn four_equal_validators_keep_block_time_and_two_block_finality() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![],
        block_time_ms: 3_000,
        duration_ms: 300_000,
        faults: Faults::calm((10, 80)),
        epoch_length: 25,
        sets: SetRule::Fixed,
    };
    let mut sim = Sim::new(7, scenario);
    sim.run();
    sim.check_invariants();
    let node = &sim.nodes[0];
    let blocks: Vec<&Header> = node
        .disk
        .final_blocks
        .values()
        .map(|(_, h)| h)
        .filter(|h| h.height > 0)
        .collect();
    assert!(
        blocks.len() >= 90,
        "only {} final blocks in 300 s",
        blocks.len()
    );
    let intervals: Vec<u64> = blocks
        .windows(2)
        .map(|w| w[1].timestamp_ms - w[0].timestamp_ms)
        .collect();
    let mean = intervals.iter().sum::<u64>() as f64 / intervals.len() as f64;
    assert!(
        (2_700.0..=3_300.0).contains(&mean),
        "mean block interval {mean} ms, not within 10% of 3000"
    );
    let engine = node.engine.as_ref().expect("running");
    let lag = engine.certified_head().0 - engine.final_tip().height;
    assert!(lag <= 2, "finality lag {lag} blocks");
}

#[test]
fn epoch_changes_cost_at_most_one_round_each() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![],
        block_time_ms: 3_000,
        duration_ms: 300_000,
        faults: Faults::calm((10, 80)),
        epoch_length: 10,
        sets: SetRule::Drawn { rotate: true },
    };
    let mut sim = Sim::new(7, scenario);
    sim.run();
    sim.check_invariants();
    let node = &sim.nodes[0];
    let blocks: Vec<&Header> = node
        .disk
        .final_blocks
        .values()
        .map(|(_, h)| h)
        .filter(|h| h.height > 0)
        .collect();
    let epochs = node.engine.as_ref().expect("running").epoch();
    assert!(epochs >= 8, "only {epochs} epochs in 300 s");
    // Within an epoch blocks keep the block time. The first block of an epoch waits for the
    // end of the previous one to be final: it is proposed once a suffix block is certified,
    // about a block time after the end. It may lose one round more: a proposal of the new
    // epoch that reaches a validator before the proof that the old one ended is dropped
    // (the validator asks for a sync instead), and then the round times out.
    let timeout_ms = 2 * 3_000;
    let mut slow_starts = 0;
    for w in blocks.windows(2) {
        let gap = w[1].timestamp_ms - w[0].timestamp_ms;
        let (limit, what) = if w[1].epoch != w[0].epoch {
            (3_000 + timeout_ms + 500, "the end of the previous epoch")
        } else {
            (3_300, "its parent")
        };
        assert!(
            gap <= limit,
            "h{} (epoch {}) came {gap} ms after {what}",
            w[1].height,
            w[1].epoch
        );
        if w[1].epoch != w[0].epoch && gap > 3_300 {
            slow_starts += 1;
        }
    }
    assert!(
        slow_starts * 2 <= epochs,
        "{slow_starts} of {epochs} epochs started a round late"
    );
}

#[test]
fn equivocation_is_detected_and_reported() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![Behaviour::Equivocator],
        block_time_ms: 1_000,
        duration_ms: 30_000,
        faults: Faults::calm((5, 50)),
        epoch_length: 10,
        sets: SetRule::Fixed,
    };
    let mut sim = Sim::new(11, scenario);
    sim.run();
    sim.check_invariants();
    let honest_reports: usize = sim
        .honest()
        .iter()
        .map(|i| sim.nodes[*i].evidence_seen)
        .sum();
    assert!(
        honest_reports > 0,
        "no honest validator saw the equivocation"
    );
    // Evidence reaches final blocks, and each piece only once (the pool drains at finality).
    let node = &sim.nodes[1];
    let mut seen = std::collections::HashSet::new();
    let mut included = 0;
    for (hash, _) in node.disk.final_blocks.values() {
        for e in node
            .blocks
            .get(hash)
            .map(|b| b.evidence.clone())
            .unwrap_or_default()
        {
            assert_eq!(
                e.offender(),
                sim.nodes[0].key.address(),
                "evidence names an honest validator"
            );
            assert!(seen.insert(e.id()), "evidence {} included twice", e.id());
            included += 1;
        }
    }
    assert!(included > 0, "no evidence in any final block");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, scenario_for(seed));
        sim.run();
        sim.nodes
            .iter()
            .map(|n| {
                n.disk
                    .final_blocks
                    .values()
                    .map(|(h, _)| *h)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    for seed in [3, 17, 42] {
        let first = run(seed);
        assert!(
            first.iter().any(|chain| chain.len() > 5),
            "seed {seed} made no progress"
        );
        assert_eq!(first, run(seed), "seed {seed} is not deterministic");
    }
}

/// Leader reputation: with one of four equal validators silent from the start and epochs
/// long enough for a history, the silent one stops being drawn as leader, so after the
/// first window rounds fail only rarely. Without reputation about 44% of rounds (the silent
/// validator leads, or holds the votes as next leader) time out.
#[test]
fn a_silent_validator_stops_being_drawn_as_leader() {
    let scenario = Scenario {
        validators: 4,
        byzantine: vec![
            Behaviour::Silent,
            Behaviour::Honest,
            Behaviour::Honest,
            Behaviour::Honest,
        ],
        block_time_ms: 1_000,
        duration_ms: 300_000,
        faults: Faults::calm((10, 80)),
        epoch_length: 1_000,
        sets: SetRule::Fixed,
    };
    let mut sim = Sim::new(11, scenario);
    sim.run();
    sim.check_invariants();
    let node = &sim.nodes[1];
    let final_height = node.engine.as_ref().expect("running").final_tip().height;
    eprintln!("one silent validator of four: {final_height} final blocks in 300 s");
    // 300 s at 1 s blocks: with the silent validator skipped after warm-up, well over 200
    // blocks; without reputation (measured by disabling it): 61.
    assert!(
        final_height >= 200,
        "only {final_height} final blocks in 300 s with one silent validator"
    );
    // The next rounds' leaders (those read from the current window: rounds further on
    // count as a stall and are drawn by stake alone) and the failed leaders the chain
    // recorded in its last 100 blocks.
    let silent = sim.nodes[0].key.address();
    let engine = node.engine.as_ref().expect("running");
    let round = engine.round();
    assert!(
        (round..round + 5).all(|r| engine.leader_of(r) != silent),
        "the silent validator is still drawn as leader"
    );
    let failed = node
        .blocks
        .values()
        .filter(|b| b.header.height + 100 > final_height)
        .flat_map(|b| b.header.failed_proposers.iter())
        .filter(|a| **a == silent)
        .count();
    assert!(
        failed <= 2,
        "the silent validator led {failed} failed rounds in the last 100 blocks"
    );
}
