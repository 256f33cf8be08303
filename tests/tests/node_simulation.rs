//! Deterministic node-level simulation: N validators, each running the real consensus
//! `Engine` and the real application (`keel_node::app::App` over its own `MemStore`, blocks
//! executed by `keel-state`), over a simulated network with a seeded RNG and virtual time.
//!
//! What flows: signed transfers from funded users, submitted by a seeded workload to every
//! node's mempool; leaders pick them (consecutive nonces from the parent's state, never a
//! transaction already on the branch) and execute them; others re-execute and vote. Faults:
//! latency and jitter, message loss, one partition that heals, a crash and restart on the same
//! store (engine from the stored final tip, its certificate and the persisted safety data;
//! non-final blocks reloaded as the driver does), and one byzantine validator whose blocks
//! carry a corrupted state root.
//!
//! Invariants checked after every run, on the honest validators' stores:
//! 1. no two different blocks final at one height;
//! 2. identical state roots, and identical accounts at the common final height, equal to a
//!    plain replay of the final transfers (sender pays amount + fee, proposer gets the fee);
//! 3. progress: every honest validator's final height grows after the network healed, and
//!    every transfer submitted before that is final by the end;
//! 4. conservation: balances plus stakes at the common final height equal genesis supply;
//! 5. epochs: every final block names its epoch (`(height - 1) / epoch_length`) and that
//!    epoch's validator set, which is the stake of the replayed chain at the epoch's first
//!    height (`Bond`/`Unbond` take effect at the next boundary, not before); its proposer and
//!    the signers of its certificate are members; no suffix block is ever final; all honest
//!    nodes compute the same set for an epoch;
//!
//! and along the way: every final transaction succeeded and is final once, no byzantine block
//! is final, finalization never fails, and an honest block is never refused for its roots.
//! A failing run prints its seed; `SIM_SEED=<n>` replays one seed (`SIM_TRACE=1` prints
//! its trace), `SIM_SEEDS=<n>` runs seeds `0..n` (default 20), `SIM_KEEP_GOING=1` runs them
//! all and lists the failing ones. Two ignored tests pin consensus bugs this simulation found.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::large_enum_variant)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use keel_consensus::{
    epoch_of_next_block, Config, Effect, Engine, Input, SafetyData, TimerKind, Tip, Validator,
    ValidatorSet,
};
use keel_genesis::Genesis;
use keel_node::app::{App, BlockTemplate};
use keel_state::{ExecParams, State};
use keel_storage::{BlockStore, Column, KvStore, MemStore, WriteBatch};
use keel_types::{
    Address, Block, ConsensusMessage, Hash, Keypair, QuorumCertificate, Transaction, TxKind,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CHAIN: &str = "node-sim";
/// Keys the node uses (`node/src/driver.rs`): safety data in the consensus column, the final
/// tip's certificate in meta, non-final blocks under a prefix of the consensus column.
const SAFETY_KEY: &[u8] = b"safety";
const LATEST_QC_KEY: &str = "latest_qc";
const PENDING_BLOCK_PREFIX: &[u8] = b"block/";
/// Funded users sending transfers, and unfunded addresses that only receive.
const USERS: u64 = 5;
const RECEIVERS: u64 = 3;
/// Most transfers a proposer picks: a backlog after a partition drains in a few blocks.
const MAX_BLOCK_TXS: usize = 256;
/// Blocks handed over per sync answer; a node further behind asks again.
const SYNC_BATCH: usize = 32;

#[derive(Clone, Debug)]
struct Scenario {
    validators: usize,
    /// The validator whose blocks carry a corrupted state root.
    byzantine: Option<usize>,
    duration_ms: u64,
    latency_ms: (u64, u64),
    loss: f64,
    /// Start, end, and the validators on one side.
    partition: (u64, u64, Vec<usize>),
    /// Crash time, restart time, validator.
    crash: Option<(u64, u64, usize)>,
    /// Whether a restarted validator reloads its persisted non-final blocks (the driver does)
    /// or starts from its final tip alone and must sync them.
    reload_pending: bool,
    /// Time between two submitted transfers.
    tx_gap_ms: (u64, u64),
    /// Blocks per epoch.
    epoch_length: u64,
    /// Stake transactions: (time, validator, kind), e.g. a bond, or an unbond of all stake
    /// that takes the validator out of the next epoch's set.
    stake_txs: Vec<(u64, usize, TxKind)>,
}

impl Scenario {
    /// When the network is whole and every validator is up again.
    fn healed_at(&self) -> u64 {
        self.partition.1.max(self.crash.map_or(0, |c| c.1))
    }
}

struct Node {
    key: Keypair,
    byzantine: bool,
    /// The node's database: survives a crash (clones of a `MemStore` share its data).
    store: MemStore,
    engine: Option<Engine>,
    app: Option<App>,
    timers: HashMap<TimerKind, u64>,
    /// Transfers received and not known final (lost in a crash).
    mempool: Vec<Transaction>,
    /// Non-final blocks written to the consensus column, with their heights.
    persisted: HashMap<Hash, u64>,
    /// Blocks this node refused to vote for: (proposer, reason).
    refused: Vec<(Address, String)>,
    built: usize,
    /// Blocks received by sync, and reloaded at a restart.
    synced: usize,
    reloaded: usize,
    /// The block this validator proposed in each round (kept across restarts, outside the
    /// node), and the rounds in which it proposed a second, different block.
    proposed: HashMap<u64, Hash>,
    reproposed: Vec<u64>,
}

impl Node {
    fn kv(&self) -> Arc<dyn KvStore> {
        Arc::new(self.store.clone())
    }

    fn blocks(&self) -> BlockStore {
        BlockStore::new(self.kv())
    }

    /// Height of the newest final block in the store (running or not).
    fn final_height(&self) -> u64 {
        self.blocks().latest().unwrap().expect("genesis").0
    }

    /// As the driver's `persist_block`: kept for a restart until it is final or abandoned.
    fn persist_block(&mut self, block: &Block) {
        let hash = block.hash();
        if self.persisted.insert(hash, block.header.height).is_none() {
            let key = [PENDING_BLOCK_PREFIX, hash.as_bytes()].concat();
            self.store
                .put(Column::Consensus, &key, &block.encode())
                .unwrap();
        }
    }
}

enum Event {
    Deliver { to: usize, msg: ConsensusMessage },
    Stake(usize),
    Synced { to: usize, blocks: Vec<Block> },
    Tx { to: usize, tx: Transaction },
    Submit,
    Crash(usize),
    Restart(usize),
    Healed,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    nodes: Vec<Node>,
    validators: ValidatorSet,
    genesis: Genesis,
    params: ExecParams,
    users: Vec<Keypair>,
    receivers: Vec<Address>,
    /// When each user's transfers were submitted, by nonce.
    submitted: Vec<Vec<u64>>,
    /// Final heights of all nodes when the network healed.
    heights_at_heal: Option<Vec<u64>>,
    /// The hash of each epoch's validator set, as the first honest node computed it.
    epoch_sets: BTreeMap<u64, Hash>,
    /// Epoch switches seen, over all nodes.
    epoch_switches: usize,
    /// Stake transactions submitted: (time, transaction).
    stake_sent: Vec<(u64, Transaction)>,
    scenario: Scenario,
    trace: bool,
}

/// Writes genesis as `node/src/node.rs` does; returns the genesis block.
fn write_genesis(store: &MemStore, genesis: &Genesis, validators: &ValidatorSet) -> Block {
    let kv: Arc<dyn KvStore> = Arc::new(store.clone());
    let state = State::new(kv.clone(), genesis.exec_params());
    let blocks = BlockStore::new(kv);
    let mut batch = WriteBatch::new();
    let root = state
        .init_genesis(
            &genesis.initial_accounts().unwrap(),
            &genesis.validator_public_keys().unwrap(),
            &mut batch,
        )
        .unwrap();
    let block = Block {
        header: genesis.header(root, validators.hash()),
        txs: Vec::new(),
        evidence: Vec::new(),
    };
    let hash = block.hash();
    blocks.stage_block(&mut batch, &block, &[]);
    blocks.stage_finalized(&mut batch, 0, hash);
    blocks.kv().write(batch).unwrap();
    block
}

impl Sim {
    fn new(seed: u64, scenario: Scenario) -> Sim {
        let base = seed.wrapping_mul(1000);
        let keys: Vec<Keypair> = (0..scenario.validators as u64)
            .map(|i| Keypair::from_seed(base + i))
            .collect();
        let users: Vec<Keypair> = (0..USERS)
            .map(|u| Keypair::from_seed(base + 100 + u))
            .collect();
        let receivers: Vec<Address> = (0..RECEIVERS)
            .map(|r| Keypair::from_seed(base + 200 + r).address())
            .collect();
        let mut genesis = Genesis::generate(
            CHAIN,
            0,
            &keys.iter().map(Keypair::public).collect::<Vec<_>>(),
            &users.iter().map(Keypair::address).collect::<Vec<_>>(),
        );
        genesis.params.epoch_length = scenario.epoch_length;
        // Unbonded stake never returns within a run, so the replay below stays exact.
        genesis.params.unbonding_period = 1_000_000;
        genesis.validate().unwrap();
        let validators = ValidatorSet::new(
            genesis
                .validator_keys()
                .unwrap()
                .into_iter()
                .map(|(public_key, stake)| Validator {
                    address: public_key.address(),
                    public_key,
                    stake,
                })
                .collect(),
        )
        .unwrap();
        let mut genesis_hash = None;
        let nodes: Vec<Node> = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| {
                let store = MemStore::new();
                let hash = write_genesis(&store, &genesis, &validators).hash();
                assert_eq!(*genesis_hash.get_or_insert(hash), hash);
                Node {
                    key,
                    byzantine: scenario.byzantine == Some(i),
                    store,
                    engine: None,
                    app: None,
                    timers: HashMap::new(),
                    mempool: Vec::new(),
                    persisted: HashMap::new(),
                    refused: Vec::new(),
                    built: 0,
                    synced: 0,
                    reloaded: 0,
                    proposed: HashMap::new(),
                    reproposed: Vec::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes,
            validators,
            params: genesis.exec_params(),
            genesis,
            submitted: vec![Vec::new(); USERS as usize],
            users,
            receivers,
            heights_at_heal: None,
            epoch_sets: BTreeMap::new(),
            epoch_switches: 0,
            stake_sent: Vec::new(),
            trace: std::env::var("SIM_TRACE").is_ok(),
            scenario,
        };
        for i in 0..sim.nodes.len() {
            sim.boot(i);
        }
        if let Some((at, back, node)) = sim.scenario.crash {
            sim.schedule(at, Event::Crash(node));
            sim.schedule(back, Event::Restart(node));
        }
        // After a restart at the same instant (events at one time run in schedule order).
        sim.schedule(sim.scenario.healed_at(), Event::Healed);
        sim.schedule(0, Event::Submit);
        for k in 0..sim.scenario.stake_txs.len() {
            sim.schedule(sim.scenario.stake_txs[k].0, Event::Stake(k));
        }
        sim
    }

    /// The validator set of `epoch` from node `i`'s final state, as `Chain::validator_set`
    /// computes it: genesis's for epoch 0, else the stakes at `epoch * epoch_length` (the
    /// previous epoch's set if nobody has stake).
    fn validator_set_at(&self, i: usize, epoch: u64) -> ValidatorSet {
        if epoch == 0 {
            return self.validators.clone();
        }
        // The node's own rule (`Chain::validator_set`), on this node's store.
        let state = State::new(self.nodes[i].kv(), self.params.clone());
        keel_node::chain::epoch_validator_set(&state, epoch, self.scenario.epoch_length, &|e| {
            Ok(self.validator_set_at(i, e))
        })
        .unwrap_or_else(|e| panic!("seed {}: node {i}: set of epoch {epoch}: {e}", self.seed))
    }

    fn schedule(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, e);
    }

    fn log(&self, i: usize, what: impl FnOnce() -> String) {
        if self.trace {
            let round = self.nodes[i].engine.as_ref().map_or(0, Engine::round);
            eprintln!("{:>7} n{i} (round {round}): {}", self.now, what());
        }
    }

    /// Starts node `i` from its store, as `Node::start` and the driver do.
    fn boot(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let kv = node.kv();
        let blocks = node.blocks();
        let (height, hash) = blocks.latest().unwrap().expect("genesis written");
        let header = blocks
            .header_by_hash(&hash)
            .unwrap()
            .expect("latest header");
        let qc = match blocks.meta(LATEST_QC_KEY).unwrap() {
            Some(bytes) => QuorumCertificate::decode(&bytes).unwrap(),
            None => QuorumCertificate::genesis(hash),
        };
        let safety = kv
            .get(Column::Consensus, SAFETY_KEY)
            .unwrap()
            .map(|b| SafetyData::decode(&b).unwrap());
        let length = self.scenario.epoch_length;
        let epoch = epoch_of_next_block(height, length);
        let set = self.validator_set_at(i, epoch);
        let previous =
            (epoch > 0 && height == epoch * length).then(|| self.validator_set_at(i, epoch - 1));
        let node = &mut self.nodes[i];
        let mut engine = Engine::new(
            Config {
                chain_id: CHAIN.into(),
                block_time_ms: 1000,
                timeout_ms: 2000,
                max_timeout_ms: 16000,
                epoch_length: length,
            },
            node.key.clone(),
            set,
            Tip {
                height,
                hash,
                round: header.round,
                timestamp_ms: header.timestamp_ms,
                qc,
            },
            safety,
        )
        .unwrap();
        if let Some(previous) = previous {
            engine.set_previous_validators(previous);
        }
        // As the node does: the recent final headers, for the leader schedule.
        let recent: Vec<keel_types::Header> = (height.saturating_sub(39).max(1)..=height)
            .filter_map(|h| blocks.header_at(h).unwrap())
            .collect();
        engine.restore_history(&recent);
        let app = App::new(kv.clone(), self.params.clone()).unwrap();
        assert_eq!(app.final_tip(), (height, hash));
        node.timers.clear();
        node.persisted.clear();
        node.engine = Some(engine);
        node.app = Some(app);
        self.input(i, Input::Start);

        // The driver's `reload_pending`: re-validate the persisted non-final blocks, oldest
        // first, drop those that no longer fit, and hand the rest to consensus.
        let node = &mut self.nodes[i];
        let mut stored: Vec<Block> = kv
            .iter_prefix(Column::Consensus, PENDING_BLOCK_PREFIX)
            .map(|item| Block::decode(&item.unwrap().1).unwrap())
            .collect();
        stored.sort_by_key(|b| b.header.height);
        let app = node.app.as_mut().expect("just opened");
        let mut valid = Vec::new();
        for block in stored {
            let hash = block.hash();
            if self.scenario.reload_pending && app.validate_block(&block).is_ok() {
                node.persisted.insert(hash, block.header.height);
                valid.push(block);
            } else {
                let key = [PENDING_BLOCK_PREFIX, hash.as_bytes()].concat();
                let mut batch = WriteBatch::new();
                batch.delete(Column::Consensus, key);
                kv.write(batch).unwrap();
            }
        }
        node.reloaded += valid.len();
        if !valid.is_empty() {
            self.log(i, || format!("reloaded {} non-final blocks", valid.len()));
            self.input(i, Input::Synced(valid));
        }
    }

    /// Feeds one input and carries out the effects in order, follow-up inputs' effects after
    /// the rest, as the driver does.
    fn input(&mut self, i: usize, input: Input) {
        let Some(engine) = self.nodes[i].engine.as_mut() else {
            return;
        };
        let mut queue: VecDeque<Effect> = engine.handle(self.now, input).into();
        while let Some(effect) = queue.pop_front() {
            if let Some(follow_up) = self.effect(i, effect) {
                let engine = self.nodes[i].engine.as_mut().expect("running");
                queue.extend(engine.handle(self.now, follow_up));
            }
        }
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        let (start, end, side) = &self.scenario.partition;
        self.now >= *start && self.now < *end && side.contains(&a) != side.contains(&b)
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.scenario.latency_ms;
        self.rng.gen_range(lo..=hi)
    }

    fn send(&mut self, from: usize, to: usize, msg: ConsensusMessage) {
        if from == to || self.partitioned(from, to) || self.rng.gen_bool(self.scenario.loss) {
            return;
        }
        let at = self.now + self.latency();
        self.schedule(at, Event::Deliver { to, msg });
    }

    fn effect(&mut self, i: usize, effect: Effect) -> Option<Input> {
        if self.trace {
            let what = match &effect {
                Effect::Broadcast(ConsensusMessage::Timeout(t)) => {
                    Some(format!("timeout r{} hqc{}", t.round, t.high_qc.round))
                }
                Effect::SendTo {
                    message: ConsensusMessage::Vote(v),
                    to,
                } => {
                    let j = self.nodes.iter().position(|n| n.key.address() == *to);
                    Some(format!(
                        "vote h{} r{} -> n{}",
                        v.height,
                        v.round,
                        j.unwrap_or(99)
                    ))
                }
                Effect::Certified { height, round, .. } => {
                    Some(format!("certified h{height} r{round}"))
                }
                Effect::RequestSync { qc } => Some(format!("request sync r{}", qc.round)),
                _ => None,
            };
            if let Some(what) = what {
                self.log(i, || what);
            }
        }
        match effect {
            Effect::SetTimer { kind, at_ms } => {
                self.nodes[i].timers.insert(kind, at_ms);
                None
            }
            Effect::BuildBlock(req) => Some(self.build(i, req)),
            Effect::ValidateBlock(block) => {
                // As the driver: the block limits of genesis, then re-execution.
                let hash = block.hash();
                let limits = &self.genesis.params;
                let bytes: usize = block.txs.iter().map(Vec::len).sum();
                let node = &mut self.nodes[i];
                let result = if block.txs.len() > limits.max_block_txs as usize
                    || bytes > limits.max_block_bytes as usize
                {
                    Err(format!("{} transactions of {bytes} bytes", block.txs.len()))
                } else {
                    let app = node.app.as_mut().expect("running");
                    app.validate_block(&block).map_err(|e| e.to_string())
                };
                let valid = result.is_ok();
                match result {
                    Ok(()) => node.persist_block(&block),
                    Err(reason) => {
                        self.log(i, || format!("refused h{}: {reason}", block.header.height));
                        self.nodes[i].refused.push((block.header.proposer, reason));
                    }
                }
                Some(Input::BlockValidated { hash, valid })
            }
            Effect::PersistSafety(safety) => {
                let mut batch = WriteBatch::new();
                batch.put(Column::Consensus, SAFETY_KEY, safety.encode());
                batch.set_sync(true);
                self.nodes[i].store.write(batch).unwrap();
                None
            }
            Effect::Broadcast(msg) => {
                if let ConsensusMessage::Proposal(p) = &msg {
                    let (round, hash) = (p.block.header.round, p.block.hash());
                    let first = *self.nodes[i].proposed.entry(round).or_insert(hash);
                    if first != hash {
                        self.log(i, || format!("SECOND PROPOSAL in r{round}"));
                        self.nodes[i].reproposed.push(round);
                    }
                }
                for to in 0..self.nodes.len() {
                    self.send(i, to, msg.clone());
                }
                None
            }
            Effect::SendTo { to, message } => {
                if let Some(j) = self.nodes.iter().position(|n| n.key.address() == to) {
                    self.send(i, j, message);
                }
                None
            }
            Effect::Finalize { hash, height, qc } => {
                self.finalize(i, hash, height, &qc);
                None
            }
            Effect::RequestSync { qc } => {
                self.request_sync(i, &qc);
                None
            }
            Effect::NeedValidatorSet { epoch, height } => {
                // As the driver's `start_epoch`.
                let set = self.validator_set_at(i, epoch);
                let seed = self.seed;
                if !self.nodes[i].byzantine {
                    let first = *self.epoch_sets.entry(epoch).or_insert(set.hash());
                    assert_eq!(
                        first,
                        set.hash(),
                        "seed {seed}: node {i} computed another validator set for epoch {epoch}"
                    );
                }
                self.epoch_switches += 1;
                let node = &mut self.nodes[i];
                node.app.as_mut().expect("running").discard_pending();
                let mut batch = WriteBatch::new();
                for (hash, _) in node.persisted.drain() {
                    batch.delete(
                        Column::Consensus,
                        [PENDING_BLOCK_PREFIX, hash.as_bytes()].concat(),
                    );
                }
                node.store.write(batch).unwrap();
                let n = set.len();
                self.log(i, || {
                    format!("EPOCH {epoch} from h{height}: {n} validators")
                });
                Some(Input::NewEpoch {
                    epoch,
                    validators: set,
                })
            }
            Effect::Certified { .. } | Effect::ReportEvidence(_) => None,
        }
    }

    /// The driver's `BuildBlock`, with the mempool selection spelled out; the byzantine
    /// validator then corrupts the state root of what the app built.
    fn build(&mut self, i: usize, req: keel_consensus::BuildRequest) -> Input {
        let seed = self.seed;
        let node = &mut self.nodes[i];
        let app = node.app.as_mut().expect("running");
        let txs = if req.empty {
            Vec::new()
        } else {
            select_txs(seed, app, &node.mempool, &req.parent_hash, req.round)
        };
        let template = BlockTemplate::from(&req);
        match app.build_block(template, txs, req.evidence) {
            Ok(mut block) => {
                node.built += 1;
                if node.byzantine {
                    block.header.state_root = Hash::digest(&block.header.height.to_le_bytes());
                } else {
                    node.persist_block(&block);
                }
                let (h, r, n) = (block.header.height, block.header.round, block.txs.len());
                self.log(i, || format!("built h{h} r{r} with {n} txs"));
                Input::BlockBuilt(block)
            }
            Err(e) => panic!(
                "seed {seed}: node {i} cannot build on {} (h{}): {e}",
                req.parent_hash, req.height
            ),
        }
    }

    fn finalize(&mut self, i: usize, hash: Hash, height: u64, qc: &QuorumCertificate) {
        let seed = self.seed;
        let node = &mut self.nodes[i];
        let app = node.app.as_mut().expect("running");
        let written = app
            .finalize(&hash, qc)
            .unwrap_or_else(|e| panic!("seed {seed}: node {i} cannot finalize h{height}: {e}"));
        let final_height = app.final_tip().0;
        assert!(
            final_height >= height,
            "seed {seed}: node {i} finalized h{height} but its final tip is h{final_height}"
        );
        for f in &written {
            for (addr, nonce) in &f.new_nonces {
                node.mempool
                    .retain(|t| t.sender != *addr || t.nonce >= *nonce);
            }
        }
        let stale: Vec<Hash> = node
            .persisted
            .iter()
            .filter(|(_, h)| **h <= final_height)
            .map(|(h, _)| *h)
            .collect();
        if !stale.is_empty() {
            let mut batch = WriteBatch::new();
            for h in &stale {
                batch.delete(
                    Column::Consensus,
                    [PENDING_BLOCK_PREFIX, h.as_bytes()].concat(),
                );
                node.persisted.remove(h);
            }
            node.store.write(batch).unwrap();
        }
        if !written.is_empty() {
            self.log(i, || {
                format!("FINAL h{final_height} ({} blocks)", written.len())
            });
        }
    }

    /// Asks a random peer for the certified block and its ancestors down to one this node
    /// has; the answer arrives a round trip later and is validated oldest first.
    fn request_sync(&mut self, i: usize, qc: &QuorumCertificate) {
        let others = self.nodes.len() - 1;
        let peer = (i + 1 + self.rng.gen_range(0..others)) % self.nodes.len();
        if self.partitioned(i, peer) || self.rng.gen_bool(self.scenario.loss) {
            return;
        }
        let (Some(mine), Some(theirs)) = (&self.nodes[i].app, &self.nodes[peer].app) else {
            return;
        };
        let mut chain = Vec::new();
        let mut cursor = qc.block_hash;
        while !mine.has_block(&cursor) {
            let Some(block) = theirs.block(&cursor).unwrap() else {
                break;
            };
            cursor = block.header.parent_hash;
            chain.push(block);
        }
        if chain.is_empty() || !mine.has_block(&cursor) {
            return;
        }
        chain.reverse();
        chain.truncate(SYNC_BATCH);
        let n = chain.len();
        self.log(i, || format!("sync {n} blocks from n{peer}"));
        let at = self.now + 2 * self.latency();
        self.schedule(
            at,
            Event::Synced {
                to: i,
                blocks: chain,
            },
        );
    }

    fn synced(&mut self, i: usize, blocks: Vec<Block>) {
        let node = &mut self.nodes[i];
        let Some(app) = node.app.as_mut() else {
            return;
        };
        let valid: Vec<Block> = blocks
            .into_iter()
            .take_while(|b| app.validate_block(b).is_ok())
            .collect();
        for block in &valid {
            node.persist_block(block);
        }
        node.synced += valid.len();
        if !valid.is_empty() {
            self.input(i, Input::Synced(valid));
        }
    }

    /// One transfer from a random user to a random other account, to every node's mempool.
    fn submit(&mut self) {
        let u = self.rng.gen_range(0..USERS as usize);
        let recipients: Vec<Address> = self
            .users
            .iter()
            .map(Keypair::address)
            .chain(self.receivers.iter().copied())
            .filter(|a| *a != self.users[u].address())
            .collect();
        let to = recipients[self.rng.gen_range(0..recipients.len())];
        let nonce = self.submitted[u].len() as u64;
        let fee = self
            .rng
            .gen_range(self.params.min_fee..=self.params.min_fee + 4);
        let amount = self.rng.gen_range(1..=10_000);
        let tx = Transaction::sign(
            &self.users[u],
            CHAIN,
            nonce,
            fee,
            TxKind::Transfer { to, amount },
        );
        self.submitted[u].push(self.now);
        for to in 0..self.nodes.len() {
            let at = self.now + self.latency();
            self.schedule(at, Event::Tx { to, tx: tx.clone() });
        }
        let (lo, hi) = self.scenario.tx_gap_ms;
        let next = self.now + self.rng.gen_range(lo..=hi);
        self.schedule(next, Event::Submit);
    }

    fn run(&mut self) {
        if self.trace {
            eprintln!("seed {}: {:?}", self.seed, self.scenario);
        }
        let end = self.scenario.duration_ms;
        loop {
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.timers.iter().map(move |(k, at)| (*at, i, *k)))
                .min_by_key(|(at, i, k)| (*at, *i, *k as u8));
            let next_event = self.queue.peek().map(|Reverse((at, seq))| (*at, *seq));
            let take_timer = match (next_timer, next_event) {
                (Some((t, _, _)), Some((e, _))) => t <= e,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_timer {
                let (at, i, kind) = next_timer.expect("timer");
                if at > end {
                    break;
                }
                self.now = self.now.max(at);
                self.nodes[i].timers.remove(&kind);
                self.input(i, Input::Timer(kind));
                continue;
            }
            let Some(Reverse((at, seq))) = self.queue.pop() else {
                break;
            };
            if at > end {
                break;
            }
            self.now = self.now.max(at);
            let Some(event) = self.events.remove(&seq) else {
                continue;
            };
            match event {
                Event::Deliver { to, msg } => self.input(to, Input::Message(msg)),
                Event::Synced { to, blocks } => self.synced(to, blocks),
                Event::Tx { to, tx } => {
                    if self.nodes[to].app.is_some() {
                        self.nodes[to].mempool.push(tx);
                    }
                }
                Event::Submit => self.submit(),
                Event::Stake(k) => {
                    let (_, v, kind) = self.scenario.stake_txs[k];
                    let key = self.nodes[v].key.clone();
                    let nonce = self
                        .stake_sent
                        .iter()
                        .filter(|(_, t)| t.sender == key.address())
                        .count() as u64;
                    let tx = Transaction::sign(&key, CHAIN, nonce, self.params.min_fee, kind);
                    self.log(v, || format!("submits {:?}", tx.kind));
                    self.stake_sent.push((self.now, tx.clone()));
                    for to in 0..self.nodes.len() {
                        let at = self.now + self.latency();
                        self.schedule(at, Event::Tx { to, tx: tx.clone() });
                    }
                }
                Event::Crash(i) => {
                    self.log(i, || "CRASH".into());
                    let node = &mut self.nodes[i];
                    node.engine = None;
                    node.app = None;
                    node.timers.clear();
                    node.mempool.clear();
                }
                Event::Restart(i) => {
                    self.log(i, || "RESTART".into());
                    self.boot(i);
                }
                Event::Healed => {
                    self.heights_at_heal =
                        Some(self.nodes.iter().map(Node::final_height).collect());
                }
            }
        }
    }

    fn honest(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].byzantine)
            .collect()
    }

    /// The invariants of the module doc.
    fn check(&self) {
        let seed = self.seed;
        let honest = self.honest();
        let heights: Vec<u64> = honest
            .iter()
            .map(|i| self.nodes[*i].final_height())
            .collect();
        let reference = honest[heights
            .iter()
            .enumerate()
            .max_by_key(|(_, h)| **h)
            .map(|(k, _)| k)
            .expect("honest nodes")];
        let common = *heights.iter().min().expect("honest nodes");
        let ref_blocks = self.nodes[reference].blocks();

        // 1 and 2: one final chain, one state root per height.
        for i in &honest {
            let blocks = self.nodes[*i].blocks();
            for h in 0..=self.nodes[*i].final_height() {
                let hash = blocks.hash_at(h).unwrap();
                assert!(
                    hash.is_some(),
                    "seed {seed}: node {i} has no final block at h{h}"
                );
                assert_eq!(
                    hash,
                    ref_blocks.hash_at(h).unwrap(),
                    "seed {seed}: nodes {i} and {reference} finalized different blocks at h{h}"
                );
                assert_eq!(
                    blocks.header_at(h).unwrap().map(|x| x.state_root),
                    ref_blocks.header_at(h).unwrap().map(|x| x.state_root),
                    "seed {seed}: nodes {i} and {reference} differ in state root at h{h}"
                );
            }
        }

        // The final chain: linked, no byzantine block, every transfer succeeded, each once;
        // replayed by hand into the expected accounts at the common height.
        let mut expected: BTreeMap<Address, (u64, u64, u64)> = self
            .genesis
            .initial_accounts()
            .unwrap()
            .into_iter()
            .map(|(a, acc)| (a, (acc.balance, acc.nonce, acc.stake)))
            .collect();
        // Stakes by validator at each epoch start, from the replay (5).
        let length = self.scenario.epoch_length;
        let keys: HashMap<Address, keel_types::PublicKey> = self
            .nodes
            .iter()
            .map(|n| (n.key.address(), n.key.public()))
            .collect();
        let stakes_of = |expected: &BTreeMap<Address, (u64, u64, u64)>| -> Vec<Validator> {
            expected
                .iter()
                .filter(|(a, acc)| acc.2 > 0 && keys.contains_key(*a))
                .map(|(a, acc)| Validator {
                    address: *a,
                    public_key: keys[a],
                    stake: acc.2,
                })
                .collect()
        };
        let mut sets: BTreeMap<u64, ValidatorSet> = BTreeMap::from([(0, self.validators.clone())]);
        let mut at_common = expected.clone();
        let byzantine = self.scenario.byzantine.map(|b| self.nodes[b].key.address());
        let mut seen = HashSet::new();
        let mut final_txs = 0;
        for h in 1..=self.nodes[reference].final_height() {
            let block = ref_blocks.block_at(h).unwrap().expect("final block");
            // 5: the block's epoch and set; the set of the next epoch follows from the
            // replayed stakes once the epoch's last block is replayed (below).
            let epoch = epoch_of_next_block(h - 1, length);
            let set = sets.get(&epoch).cloned().unwrap_or_else(|| {
                panic!("seed {seed}: no replayed set for epoch {epoch} at h{h}")
            });
            assert_eq!(
                (
                    block.header.epoch,
                    keel_types::round_epoch(block.header.round)
                ),
                (epoch, epoch),
                "seed {seed}: final h{h} is not in epoch {epoch} (a suffix block went final?)"
            );
            assert_eq!(
                block.header.validators_hash,
                set.hash(),
                "seed {seed}: final h{h} does not name the replayed set of epoch {epoch}"
            );
            assert!(
                set.get(&block.header.proposer).is_some(),
                "seed {seed}: final h{h} was proposed by a non-member of epoch {epoch}"
            );
            if h >= 2 {
                let parent_set = &sets[&epoch_of_next_block(h - 2, length)];
                for s in &block.header.parent_qc.signatures {
                    assert!(
                        parent_set.get(&s.validator).is_some(),
                        "seed {seed}: the certificate of h{} has a signer outside its epoch",
                        h - 1
                    );
                }
            }
            assert_eq!(
                Some(block.header.parent_hash),
                ref_blocks.hash_at(h - 1).unwrap(),
                "seed {seed}: final h{h} does not link to h{}",
                h - 1
            );
            assert_ne!(
                Some(block.header.proposer),
                byzantine,
                "seed {seed}: a block with a corrupted state root is final at h{h}"
            );
            let receipts = ref_blocks.receipts_at(h).unwrap();
            assert_eq!(
                receipts.len(),
                block.txs.len(),
                "seed {seed}: receipts of h{h}"
            );
            for (index, (bytes, receipt)) in block.txs.iter().zip(&receipts).enumerate() {
                let tx = Transaction::decode(bytes).unwrap();
                assert!(seen.insert(tx.hash), "seed {seed}: {} final twice", tx.hash);
                let at = ref_blocks
                    .tx_location(&tx.hash)
                    .unwrap()
                    .map(|l| (l.height, l.index));
                assert_eq!(
                    at,
                    Some((h, index as u32)),
                    "seed {seed}: index of {}",
                    tx.hash
                );
                assert!(
                    receipt.success,
                    "seed {seed}: transfer {} failed at h{h}: {:?}",
                    tx.hash, receipt.error
                );
                assert_eq!(receipt.fee, tx.fee, "seed {seed}: fee of {}", tx.hash);
                final_txs += 1;
                let sender = expected.entry(tx.sender).or_default();
                assert_eq!(sender.1, tx.nonce, "seed {seed}: nonce of {}", tx.hash);
                sender.0 -= tx.fee;
                sender.1 += 1;
                match tx.kind {
                    TxKind::Transfer { to, amount } => {
                        sender.0 -= amount;
                        expected.entry(to).or_default().0 += amount;
                    }
                    TxKind::Bond { amount } => {
                        sender.0 -= amount;
                        sender.2 += amount;
                    }
                    TxKind::Unbond { amount } => sender.2 -= amount,
                }
                expected.entry(block.header.proposer).or_default().0 += tx.fee;
            }
            if h == common {
                at_common = expected.clone();
            }
            if h % length == 0 {
                let next = stakes_of(&expected);
                let set = if next.is_empty() {
                    set
                } else {
                    ValidatorSet::new(next).unwrap()
                };
                sets.insert(h / length, set);
            }
        }
        assert!(final_txs > 0, "seed {seed}: no transfer became final");

        // 2 and 4: the same accounts everywhere, as replayed; supply conserved.
        let addresses: Vec<Address> = self
            .genesis
            .initial_accounts()
            .unwrap()
            .into_iter()
            .map(|(a, _)| a)
            .chain(self.receivers.iter().copied())
            .collect();
        let supply: u128 = self
            .genesis
            .initial_accounts()
            .unwrap()
            .iter()
            .map(|(_, a)| u128::from(a.balance) + u128::from(a.stake))
            .sum();
        for i in &honest {
            let state = State::new(self.nodes[*i].kv(), self.params.clone());
            assert_eq!(
                Some(state.root(common).unwrap()),
                ref_blocks.header_at(common).unwrap().map(|x| x.state_root),
                "seed {seed}: node {i}'s stored state root at h{common} is not its header's"
            );
            let mut total: u128 = 0;
            for addr in &addresses {
                let account = state.account(addr, common).unwrap().unwrap_or_default();
                let (balance, nonce, stake) = at_common.get(addr).copied().unwrap_or_default();
                assert_eq!(
                    (account.balance, account.nonce, account.stake),
                    (balance, nonce, stake),
                    "seed {seed}: node {i}: account {addr} at h{common} (balance, nonce, stake)"
                );
                total += u128::from(account.balance)
                    + u128::from(account.stake)
                    + account
                        .unbonding
                        .iter()
                        .map(|u| u128::from(u.amount))
                        .sum::<u128>();
            }
            assert_eq!(total, supply, "seed {seed}: node {i}: supply at h{common}");
        }

        // 3: progress after healing, and every transfer submitted before it is final.
        let at_heal = self
            .heights_at_heal
            .as_ref()
            .expect("the run reached the heal time");
        for i in &honest {
            assert!(
                self.nodes[*i].final_height() > at_heal[*i],
                "seed {seed}: honest node {i} stayed at final height {} after the heal at {} ms \
                 ({:?})",
                at_heal[*i],
                self.scenario.healed_at(),
                self.scenario
            );
        }
        let healed = self.scenario.healed_at();
        let ref_state = State::new(self.nodes[reference].kv(), self.params.clone());
        let ref_height = self.nodes[reference].final_height();
        for (u, times) in self.submitted.iter().enumerate() {
            let before = times.iter().filter(|t| **t < healed).count() as u64;
            let nonce = ref_state
                .account(&self.users[u].address(), ref_height)
                .unwrap()
                .map_or(0, |a| a.nonce);
            assert!(
                nonce >= before,
                "seed {seed}: user {u} submitted {before} transfers before the heal, {nonce} final"
            );
        }

        for (at, tx) in &self.stake_sent {
            if *at < healed {
                assert!(
                    ref_blocks.tx_location(&tx.hash).unwrap().is_some(),
                    "seed {seed}: stake transaction {:?} sent at {at} ms is not final",
                    tx.kind
                );
            }
        }

        // An honest block is never refused for what its execution gives.
        for i in &honest {
            for (proposer, reason) in &self.nodes[*i].refused {
                if Some(*proposer) != byzantine {
                    assert!(
                        !reason.contains("root"),
                        "seed {seed}: node {i} refused an honest block: {reason}"
                    );
                }
            }
        }
    }
}

/// The transfers a proposer puts in a block on `parent`: per sender (in an order rotated by
/// round), consecutive nonces from the sender's nonce in the parent's state. A transfer on the
/// parent's pending branch must never be picked again.
fn select_txs(
    seed: u64,
    app: &App,
    mempool: &[Transaction],
    parent: &Hash,
    round: u64,
) -> Vec<Transaction> {
    let on_branch = app.branch_tx_hashes(parent);
    let mut by_sender: BTreeMap<Address, BTreeMap<u64, &Transaction>> = BTreeMap::new();
    for tx in mempool {
        by_sender.entry(tx.sender).or_default().insert(tx.nonce, tx);
    }
    let mut senders: Vec<Address> = by_sender.keys().copied().collect();
    if !senders.is_empty() {
        let shift = (round % senders.len() as u64) as usize;
        senders.rotate_left(shift);
    }
    let mut out = Vec::new();
    for sender in senders {
        let Ok(account) = app.account(parent, &sender) else {
            // An unknown parent: the build itself reports it.
            return Vec::new();
        };
        let mut nonce = account.map_or(0, |a| a.nonce);
        while out.len() < MAX_BLOCK_TXS {
            let Some(tx) = by_sender[&sender].get(&nonce) else {
                break;
            };
            assert!(
                !on_branch.contains(&tx.hash),
                "seed {seed}: transfer {} with nonce {nonce} is on the branch of {parent}, \
                 whose state says the next nonce is {nonce}",
                tx.hash
            );
            out.push((*tx).clone());
            nonce += 1;
        }
    }
    out
}

fn scenario_for(seed: u64) -> Scenario {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0de5_1a7e);
    let validators = rng.gen_range(4..=5usize);
    let byzantine = rng.gen_bool(0.5).then(|| rng.gen_range(0..validators));
    let start = rng.gen_range(5_000..30_000);
    let mut side: Vec<usize> = (0..validators).filter(|_| rng.gen_bool(0.5)).collect();
    if side.is_empty() || side.len() == validators {
        side = vec![rng.gen_range(0..validators)];
    }
    let partition = (start, start + rng.gen_range(5_000..25_000), side);
    let crash = rng.gen_bool(0.5).then(|| {
        let at = rng.gen_range(5_000..40_000);
        (
            at,
            at + rng.gen_range(1_000..20_000),
            rng.gen_range(0..validators),
        )
    });
    Scenario {
        validators,
        byzantine,
        duration_ms: 110_000,
        latency_ms: (5, rng.gen_range(20..300)),
        loss: if rng.gen_bool(0.5) {
            rng.gen_range(0.0..0.05)
        } else {
            0.0
        },
        partition,
        crash,
        reload_pending: rng.gen_bool(0.7),
        tx_gap_ms: (20, rng.gen_range(100..600)),
        epoch_length: rng.gen_range(3..=12),
        stake_txs: if rng.gen_bool(0.6) {
            // An honest validator bonds more (it then holds half the stake of four); another
            // (perhaps the byzantine one) unbonds everything, leaves the set, and may bond
            // again and come back.
            let honest: Vec<usize> = (0..validators).filter(|v| Some(*v) != byzantine).collect();
            let a = honest[rng.gen_range(0..honest.len())];
            let b = (a + rng.gen_range(1..validators)) % validators;
            let unbond_at = rng.gen_range(10_000..50_000);
            let mut txs = vec![
                (
                    rng.gen_range(2_000..30_000),
                    a,
                    TxKind::Bond {
                        amount: 2 * keel_genesis::DEFAULT_VALIDATOR_STAKE,
                    },
                ),
                (
                    unbond_at,
                    b,
                    TxKind::Unbond {
                        amount: keel_genesis::DEFAULT_VALIDATOR_STAKE,
                    },
                ),
            ];
            if rng.gen_bool(0.5) {
                txs.push((
                    unbond_at + rng.gen_range(15_000..40_000),
                    b,
                    TxKind::Bond {
                        amount: keel_genesis::DEFAULT_VALIDATOR_STAKE / 2,
                    },
                ));
            }
            txs
        } else {
            Vec::new()
        },
    }
}

fn run_seed(seed: u64) {
    let mut sim = Sim::new(seed, scenario_for(seed));
    sim.run();
    sim.check();
    let sum = |f: fn(&Node) -> usize| sim.nodes.iter().map(f).sum::<usize>();
    let reference = sim.nodes.iter().map(Node::final_height).max().unwrap_or(0);
    let txs = (1..=reference)
        .filter_map(|h| {
            let n = sim.nodes.iter().find(|n| n.final_height() >= h)?;
            Some(n.blocks().block_at(h).unwrap()?.txs.len())
        })
        .sum::<usize>();
    eprintln!(
        "seed {seed}: {} validators{}, final heights {:?}, {txs} final transfers, {} refused, \
         {} synced, {} reloaded, re-proposed {:?}, epoch length {}, epochs {:?}, {} distinct sets",
        sim.scenario.validators,
        if sim.scenario.byzantine.is_some() {
            " (1 byzantine)"
        } else {
            ""
        },
        sim.nodes.iter().map(Node::final_height).collect::<Vec<_>>(),
        sum(|n| n.refused.len()),
        sum(|n| n.synced),
        sum(|n| n.reloaded),
        sim.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.reproposed.is_empty())
            .map(|(i, n)| (i, n.byzantine, n.reproposed.clone()))
            .collect::<Vec<_>>(),
        sim.scenario.epoch_length,
        sim.nodes
            .iter()
            .map(|n| n.engine.as_ref().map_or(0, Engine::epoch))
            .collect::<Vec<_>>(),
        sim.epoch_sets.values().collect::<HashSet<_>>().len(),
    );
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    (0..n).collect()
}

/// Runs the seeds, printing how to replay a failing one; with `SIM_KEEP_GOING` set, runs
/// them all and lists the failures.
fn run_seeds(seeds: Vec<u64>) {
    let keep_going = std::env::var("SIM_KEEP_GOING").is_ok();
    let mut failed = Vec::new();
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed));
        if let Err(e) = result {
            eprintln!(
                "node simulation failed: rerun with SIM_SEED={seed} (SIM_TRACE=1 for a trace)"
            );
            if !keep_going {
                std::panic::resume_unwind(e);
            }
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

#[test]
fn random_faults_keep_one_final_chain_with_the_same_state_and_supply() {
    run_seeds(seeds());
}

/// Known consensus bug. A timeout certificate reaches others only inside the next leader's
/// proposal, and a `Timeout` does not carry the sender's highest TC. When that leader is down
/// and a timeout was lost, validators end up in different rounds (seed 50: rounds 5, 5, 6, 7;
/// seed 333: 12, 12, 14, 15): the ones ahead ignore timeouts for lower rounds, and no round
/// at or above a validator's own gathers timeouts from more than 1/3 of the stake, so the
/// joining rule never fires and the chain stops for good, network whole and all validators up.
#[test]
fn validators_spread_over_rounds_after_a_lost_tc_still_progress() {
    run_seeds(vec![50, 333]);
}

/// Known consensus defect: a leader that restarts in a round it already proposed in (its
/// safety data records votes and timeouts, not proposals) proposes a second, different block
/// in that round; seed 33, validator 3, round 19.
#[test]
fn a_restarted_leader_never_proposes_twice_in_one_round() {
    let mut sim = Sim::new(33, scenario_for(33));
    sim.run();
    for (i, node) in sim.nodes.iter().enumerate() {
        assert!(
            node.byzantine || node.reproposed.is_empty(),
            "validator {i} proposed a second block in rounds {:?}",
            node.reproposed
        );
    }
}

#[test]
fn honest_validators_refuse_blocks_with_a_corrupted_state_root() {
    let scenario = Scenario {
        validators: 4,
        byzantine: Some(0),
        duration_ms: 40_000,
        latency_ms: (5, 50),
        loss: 0.0,
        partition: (0, 0, vec![0]),
        crash: None,
        reload_pending: true,
        tx_gap_ms: (20, 200),
        epoch_length: 5,
        stake_txs: Vec::new(),
    };
    let mut sim = Sim::new(5, scenario);
    sim.run();
    sim.check();
    assert!(
        sim.nodes[0].built > 0,
        "the byzantine validator never led a round"
    );
    let bad = sim.nodes[0].key.address();
    for i in sim.honest() {
        let refusals = sim.nodes[i]
            .refused
            .iter()
            .filter(|(p, reason)| *p == bad && reason.contains("state root"))
            .count();
        assert!(refusals > 0, "node {i} never refused a corrupted block");
    }
}

#[test]
fn the_same_seed_gives_the_same_node_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, scenario_for(seed));
        sim.run();
        sim.nodes
            .iter()
            .map(|n| {
                let blocks = n.blocks();
                (0..=n.final_height())
                    .map(|h| blocks.hash_at(h).unwrap().expect("final"))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let first = run(3);
    assert!(first.iter().any(|chain| chain.len() > 10), "no progress");
    assert_eq!(first, run(3), "seed 3 is not deterministic");
}
