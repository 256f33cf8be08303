//! Rule-by-rule tests of the consensus engine over its public API: each test feeds
//! [`Input`]s to one [`Engine`] of a four-validator, equal-stake set and checks the
//! [`Effect`]s it returns, in Malachite's table style (description, input, expected effects).
//!
//! The rules pinned down: safety data is persisted before any vote leaves the engine; a
//! validator never votes twice in a round, across restarts too; the 2-chain voting rule; the
//! quorum threshold of certificates; round timeouts, timeout certificates and back-off; round
//! synchronisation from certificates; equivocation evidence; rejection of bad input; and the
//! epoch rules (empty suffix blocks, the commit of the epoch-ending block, the switch to the
//! next set, and catching up with an epoch proof or a sync). The whole-cluster behaviour is
//! tested in `simulation.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_consensus::{
    epoch_end_height, BuildRequest, Config, Effect, Engine, Input, Origin, SafetyData, TimerKind,
    Tip, Validator, ValidatorSet,
};
use keel_types::{
    epoch_base_round, round_epoch, Address, Block, ConsensusMessage, EpochProof, Evidence, Hash,
    Header, Keypair, Proposal, QuorumCertificate, Signature, Timeout, TimeoutCertificate,
    TimeoutSignature, Vote, VoteSignature, MAX_FAILED_PROPOSERS,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CHAIN: &str = "keel-rules";
const VALIDATORS: usize = 4;
const BLOCK_TIME_MS: u64 = 1_000;
const TIMEOUT_MS: u64 = 2_000;
const MAX_TIMEOUT_MS: u64 = 6_000;
/// The engine's allowed lead of a proposal's timestamp over its clock.
const MAX_CLOCK_DRIFT_MS: u64 = 10_000;

/// Four validators of equal stake and the genesis block they start from.
struct Net {
    keys: Vec<Keypair>,
    validators: ValidatorSet,
    genesis: Block,
}

impl Net {
    fn new() -> Net {
        let keys: Vec<Keypair> = (0..VALIDATORS as u64).map(Keypair::from_seed).collect();
        let validators = ValidatorSet::new(
            keys.iter()
                .map(|k| Validator {
                    address: k.address(),
                    public_key: k.public(),
                    stake: 100,
                })
                .collect(),
        )
        .unwrap();
        let genesis = Block {
            header: Header {
                chain_id: CHAIN.into(),
                validators_hash: validators.hash(),
                ..Header::default()
            },
            txs: vec![],
            evidence: vec![],
        };
        Net {
            keys,
            validators,
            genesis,
        }
    }

    fn config() -> Config {
        Net::config_with(1_000_000)
    }

    fn config_with(epoch_length: u64) -> Config {
        Config {
            chain_id: CHAIN.into(),
            block_time_ms: BLOCK_TIME_MS,
            timeout_ms: TIMEOUT_MS,
            max_timeout_ms: MAX_TIMEOUT_MS,
            epoch_length,
        }
    }

    fn genesis_qc(&self) -> QuorumCertificate {
        QuorumCertificate::genesis(self.genesis.hash())
    }

    fn tip(&self) -> Tip {
        Tip {
            height: 0,
            hash: self.genesis.hash(),
            round: 0,
            timestamp_ms: 0,
            qc: self.genesis_qc(),
        }
    }

    /// The engine of validator `node`, at genesis, not yet started.
    fn engine(&self, node: usize, safety: Option<SafetyData>) -> Engine {
        Engine::new(
            Net::config(),
            self.keys[node].clone(),
            self.validators.clone(),
            self.tip(),
            safety,
        )
        .unwrap()
    }

    /// The engine of validator `node`, started at time 0 (in round 1).
    fn started(&self, node: usize) -> Engine {
        let mut engine = self.engine(node, None);
        engine.handle(0, Input::Start);
        assert_eq!(engine.round(), 1);
        engine
    }

    /// Index of the leader of `round`.
    fn leader(&self, round: u64) -> usize {
        let address = self.validators.leader_in_turn(round).address;
        self.keys
            .iter()
            .position(|k| k.address() == address)
            .unwrap()
    }

    /// A validator that leads none of `rounds` (one exists for up to three rounds).
    fn bystander(&self, rounds: &[u64]) -> usize {
        (0..VALIDATORS)
            .find(|i| rounds.iter().all(|r| self.leader(*r) != *i))
            .unwrap()
    }

    /// The engine of validator `node` with the round timeout capped at `max_timeout_ms`,
    /// started at time 0.
    fn started_with_cap(&self, node: usize, max_timeout_ms: u64) -> Engine {
        self.started_with(
            node,
            Config {
                max_timeout_ms,
                ..Net::config()
            },
        )
    }

    /// The engine of validator `node` with `config`, started at time 0.
    fn started_with(&self, node: usize, config: Config) -> Engine {
        let mut engine = Engine::new(
            config,
            self.keys[node].clone(),
            self.validators.clone(),
            self.tip(),
            None,
        )
        .unwrap();
        engine.handle(0, Input::Start);
        engine
    }

    /// The validators other than `node`.
    fn others(&self, node: usize) -> Vec<usize> {
        (0..VALIDATORS).filter(|i| *i != node).collect()
    }

    /// A well-formed block of `round` extending `parent`, whose certificate is `parent_qc`;
    /// `salt` tells apart blocks of one round.
    fn block(&self, round: u64, parent: &Block, parent_qc: QuorumCertificate, salt: u8) -> Block {
        let failed_proposers = self.failed_leaders(&parent_qc, round);
        Block {
            header: Header {
                chain_id: CHAIN.into(),
                height: parent.header.height + 1,
                round,
                parent_hash: parent.hash(),
                timestamp_ms: round * BLOCK_TIME_MS,
                proposer: self.validators.leader_in_turn(round).address,
                validators_hash: self.validators.hash(),
                parent_qc,
                // The block hash covers the header only: the salt goes there.
                state_root: Hash([salt; 32]),
                failed_proposers,
                ..Header::default()
            },
            txs: vec![],
            evidence: vec![],
        }
    }

    /// The leaders of the rounds between `parent_qc` and `round` (none of these engines has
    /// a reputation history, so the schedule is by stake): what a header must list.
    fn failed_leaders(&self, parent_qc: &QuorumCertificate, round: u64) -> Vec<Address> {
        let epoch = round_epoch(round);
        let qc_round = if round_epoch(parent_qc.round) < epoch {
            epoch_base_round(epoch)
        } else {
            parent_qc.round
        };
        let first = qc_round
            .saturating_add(1)
            .max(round.saturating_sub(MAX_FAILED_PROPOSERS as u64));
        (first..round)
            .map(|r| self.validators.leader_in_turn(r).address)
            .collect()
    }

    /// `block` proposed and signed by the leader of its round.
    fn propose(&self, block: Block, tc: Option<TimeoutCertificate>) -> Proposal {
        Proposal::sign(&self.keys[self.leader(block.header.round)], block, tc)
    }

    fn vote(&self, signer: usize, block: &Block) -> Vote {
        Vote::sign(
            &self.keys[signer],
            CHAIN,
            block.hash(),
            block.header.height,
            block.header.round,
        )
    }

    /// A vote from `signer` for `block` whose signature does not verify.
    fn forged_vote(&self, signer: usize, block: &Block) -> Vote {
        Vote {
            signature: forged(&self.keys[signer]),
            ..self.vote(signer, block)
        }
    }

    /// A certificate of `block` in its round, with the votes of `signers`.
    fn qc(&self, block: &Block, signers: &[usize]) -> QuorumCertificate {
        QuorumCertificate {
            block_hash: block.hash(),
            height: block.header.height,
            round: block.header.round,
            signatures: signers
                .iter()
                .map(|i| {
                    let v = self.vote(*i, block);
                    VoteSignature {
                        validator: v.voter,
                        signature: v.signature,
                    }
                })
                .collect(),
        }
    }

    fn timeout(&self, signer: usize, round: u64, high_qc: QuorumCertificate) -> Timeout {
        Timeout::sign(&self.keys[signer], CHAIN, round, high_qc)
    }

    /// A timeout certificate of `round` from the timeouts of `parts` (signer, its high QC).
    fn tc(&self, round: u64, parts: &[(usize, QuorumCertificate)]) -> TimeoutCertificate {
        TimeoutCertificate {
            round,
            high_qc: parts
                .iter()
                .map(|(_, qc)| qc)
                .max_by_key(|qc| qc.round)
                .cloned()
                .unwrap(),
            signatures: parts
                .iter()
                .map(|(i, qc)| TimeoutSignature {
                    validator: self.keys[*i].address(),
                    high_qc_round: qc.round,
                    signature: self.timeout(*i, round, qc.clone()).signature,
                })
                .collect(),
        }
    }
}

/// A signature by `key` over another message: well-formed, but valid for nothing it is
/// attached to.
fn forged(key: &Keypair) -> Signature {
    key.sign(&Hash::digest(b"not what it claims to sign"))
}

/// A time inside `round` (blocks of round r carry the timestamp r seconds).
fn at(round: u64) -> u64 {
    round * BLOCK_TIME_MS + 100
}

fn message(engine: &mut Engine, now: u64, msg: ConsensusMessage) -> Vec<Effect> {
    engine.handle(
        now,
        Input::Message {
            from: Origin(1),
            message: msg,
        },
    )
}

/// Delivers a proposal and, if the engine asks for the block to be validated, reports it
/// valid. Returns the effects of both inputs, in order.
fn deliver(engine: &mut Engine, now: u64, p: &Proposal) -> Vec<Effect> {
    let hash = p.block.hash();
    let mut out = message(engine, now, ConsensusMessage::Proposal(p.clone()));
    if validates(&out, &hash) {
        out.extend(engine.handle(now, Input::BlockValidated { hash, valid: true }));
    }
    out
}

/// The block a node builds for `req`.
fn built(req: &BuildRequest) -> Block {
    Block {
        header: Header {
            chain_id: CHAIN.into(),
            height: req.height,
            round: req.round,
            epoch: req.epoch,
            parent_hash: req.parent_hash,
            timestamp_ms: req.timestamp_ms,
            proposer: req.proposer,
            validators_hash: req.validators_hash,
            parent_qc: req.parent_qc.clone(),
            failed_proposers: req.failed_proposers.clone(),
            ..Header::default()
        },
        txs: vec![],
        evidence: req.evidence.clone(),
    }
}

fn validates(effects: &[Effect], hash: &Hash) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, Effect::ValidateBlock(b) if b.hash() == *hash))
}

/// The votes the engine sends out.
/// The votes the engine sends out, each once however many collectors it goes to.
fn votes(effects: &[Effect]) -> Vec<&Vote> {
    let mut out: Vec<&Vote> = Vec::new();
    for e in effects {
        if let Effect::SendTo {
            message: ConsensusMessage::Vote(v),
            ..
        } = e
        {
            if !out.iter().any(|w| w.signature == v.signature) {
                out.push(v);
            }
        }
    }
    out
}

fn certified(effects: &[Effect], hash: &Hash) -> bool {
    effects
        .iter()
        .any(|e| matches!(e, Effect::Certified { hash: h, .. } if h == hash))
}

fn reported(effects: &[Effect]) -> Vec<&Evidence> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::ReportEvidence(ev) => Some(ev),
            _ => None,
        })
        .collect()
}

fn build_request(effects: &[Effect]) -> Option<&BuildRequest> {
    effects.iter().find_map(|e| match e {
        Effect::BuildBlock(req) => Some(req),
        _ => None,
    })
}

fn broadcast_timeout(effects: &[Effect]) -> Option<&Timeout> {
    effects.iter().find_map(|e| match e {
        Effect::Broadcast(ConsensusMessage::Timeout(t)) => Some(t),
        _ => None,
    })
}

/// The delay of the last round timer set, measured from `now`.
fn round_timer_delay(effects: &[Effect], now: u64) -> Option<u64> {
    effects.iter().rev().find_map(|e| match e {
        Effect::SetTimer {
            kind: TimerKind::RoundTimeout,
            at_ms,
        } => Some(at_ms - now),
        _ => None,
    })
}

fn last_persisted(effects: &[Effect]) -> Option<&SafetyData> {
    effects.iter().rev().find_map(|e| match e {
        Effect::PersistSafety(s) => Some(s),
        _ => None,
    })
}

// ----- 1. persistence before votes -----

/// Which validator takes the vote in `persist_safety_precedes_every_vote`.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// Neither this round's leader nor the next: it sends its vote away.
    Voter,
    /// The next leader, holding two votes already: its own completes a certificate.
    NextLeader,
    /// The round's leader, voting for the block it built.
    Proposer,
}

#[test]
fn persist_safety_precedes_every_vote() {
    let net = Net::new();
    let round = 1;
    let b1 = net.block(round, &net.genesis, net.genesis_qc(), 1);
    let cases = [
        ("a voter persists before sending its vote", Role::Voter),
        (
            "the next leader persists before its vote completes a certificate",
            Role::NextLeader,
        ),
        (
            "the leader persists before voting for its own block",
            Role::Proposer,
        ),
    ];
    for (desc, role) in cases {
        let effects = match role {
            Role::Voter => {
                let mut engine = net.started(net.bystander(&[1, 2]));
                deliver(&mut engine, at(1), &net.propose(b1.clone(), None))
            }
            Role::NextLeader => {
                let node = net.leader(2);
                let mut engine = net.started(node);
                for other in net.others(node).into_iter().take(2) {
                    let out = message(
                        &mut engine,
                        at(1),
                        ConsensusMessage::Vote(net.vote(other, &b1)),
                    );
                    assert!(!certified(&out, &b1.hash()), "{desc}: two votes certified");
                }
                let out = deliver(&mut engine, at(1), &net.propose(b1.clone(), None));
                assert!(
                    certified(&out, &b1.hash()),
                    "{desc}: no certificate: {out:?}"
                );
                out
            }
            Role::Proposer => {
                // With keys 0..4 the leader of round 1 does not lead round 2, so its vote
                // leaves the engine as a message.
                assert_ne!(net.leader(1), net.leader(2), "fixture assumption");
                let mut engine = net.started(net.leader(1));
                let out = engine.handle(at(1), Input::Timer(TimerKind::Propose));
                let req = build_request(&out).expect("the leader builds");
                engine.handle(at(1), Input::BlockBuilt(built(req)))
            }
        };
        let persist = effects
            .iter()
            .position(|e| matches!(e, Effect::PersistSafety(s) if s.last_voted_round == round))
            .unwrap_or_else(|| panic!("{desc}: nothing persisted: {effects:?}"));
        // Effects that carry the vote or anything derived from it.
        let first_use = effects
            .iter()
            .position(|e| {
                matches!(
                    e,
                    Effect::SendTo {
                        message: ConsensusMessage::Vote(_),
                        ..
                    } | Effect::Certified { .. }
                        | Effect::Finalize { .. }
                        | Effect::BuildBlock(_)
                )
            })
            .unwrap_or_else(|| panic!("{desc}: the vote was not used: {effects:?}"));
        assert!(
            persist < first_use,
            "{desc}: persisted at {persist}, used at {first_use}: {effects:?}"
        );
    }
}

/// A vote goes to the next two leaders, and the leader after next certifies the block when
/// the next leader is dead: the block's parent can still become final.
#[test]
fn votes_go_to_the_next_two_leaders_and_the_second_certifies_alone() {
    let net = Net::new();
    let (next, after) = (net.leader(2), net.leader(3));
    assert_ne!(next, after, "fixture assumption");
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let p1 = net.propose(b1.clone(), None);
    let voter = net.bystander(&[1, 2, 3]);
    let mut engine = net.started(voter);
    let effects = deliver(&mut engine, at(1), &p1);
    let mut to: Vec<Address> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::SendTo {
                to,
                message: ConsensusMessage::Vote(_),
            } => Some(*to),
            _ => None,
        })
        .collect();
    to.sort();
    let mut expected = vec![net.keys[next].address(), net.keys[after].address()];
    expected.sort();
    assert_eq!(to, expected);

    // The leader of round 3 forms the certificate of round 1 from three votes, without the
    // leader of round 2.
    let mut engine = net.started(after);
    engine.handle(at(1), Input::Synced(vec![b1.clone()]));
    let mut effects = Vec::new();
    for i in net.others(next) {
        effects.extend(message(
            &mut engine,
            at(1),
            ConsensusMessage::Vote(net.vote(i, &b1)),
        ));
    }
    assert!(certified(&effects, &b1.hash()), "{effects:?}");
    assert_eq!(engine.round(), 2);
}

/// The leader of round 3 is dead; the leader of round 4 certified block 2 from the votes and
/// times out round 3 carrying that certificate (as its high QC and as the certificate of its
/// latest commit, since it made block 1 final). A validator whose round-2 timer already ran
/// out (it waited a whole timeout for the proposal of round 3, which is what brings round 2's
/// certificate) joins round 3 and times it out at once, so the dead leader costs one timeout,
/// not two; one that hears the certificate before its timer fires keeps round 2's deadline.
/// A proposal of round 3 that does come gives the round a full timeout again.
#[test]
fn a_certificate_from_a_timeout_keeps_the_deadline_of_the_round_it_ends() {
    let net = Net::new();
    let (dead, after) = (net.leader(3), net.leader(4));
    let node = net.bystander(&[2, 3, 4]);
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let qc1 = net.qc(&b1, &net.others(dead));
    let b2 = net.block(2, &b1, qc1.clone(), 2);
    let qc2 = net.qc(&b2, &net.others(dead));
    let entered = at(2);
    let deadline = entered + TIMEOUT_MS;
    let timeout3 = Timeout {
        commit_qc: Some(qc2.clone()),
        ..net.timeout(after, 3, qc2.clone())
    };
    let in_round_2 = || {
        let mut engine = net.started(node);
        deliver(&mut engine, at(1), &net.propose(b1.clone(), None));
        let effects = deliver(&mut engine, entered, &net.propose(b2.clone(), None));
        assert_eq!(engine.round(), 2);
        assert_eq!(round_timer_delay(&effects, entered), Some(TIMEOUT_MS));
        engine
    };

    // Round 2's timer has fired: round 3 is timed out at once.
    let mut engine = in_round_2();
    let late = deadline + 50;
    let effects = engine.handle(late, Input::Timer(TimerKind::RoundTimeout));
    assert_eq!(broadcast_timeout(&effects).map(|t| t.round), Some(2));
    let effects = message(
        &mut engine,
        late,
        ConsensusMessage::Timeout(timeout3.clone()),
    );
    assert_eq!(engine.round(), 3);
    assert_eq!(finalized(&effects), vec![(b1.hash(), 1)]);
    assert_eq!(round_timer_delay(&effects, late), Some(0), "{effects:?}");
    let effects = engine.handle(late, Input::Timer(TimerKind::RoundTimeout));
    assert_eq!(broadcast_timeout(&effects).map(|t| t.round), Some(3));

    // Heard before round 2's deadline: round 3 ends at that deadline, not a timeout later.
    let mut engine = in_round_2();
    let early = deadline - 300;
    let effects = message(
        &mut engine,
        early,
        ConsensusMessage::Timeout(timeout3.clone()),
    );
    assert_eq!(engine.round(), 3);
    assert_eq!(round_timer_delay(&effects, early), Some(300), "{effects:?}");
    // The proposal of round 3 comes after all: a full timeout from its arrival.
    let b3 = net.block(3, &b2, qc2.clone(), 3);
    let effects = message(
        &mut engine,
        early + 100,
        ConsensusMessage::Proposal(net.propose(b3.clone(), None)),
    );
    assert_eq!(
        round_timer_delay(&effects, early + 100),
        Some(TIMEOUT_MS),
        "{effects:?}"
    );

    // The same certificate in the proposal of round 3 starts a full timeout, as always.
    let mut engine = in_round_2();
    let effects = message(
        &mut engine,
        early,
        ConsensusMessage::Proposal(net.propose(b3, None)),
    );
    assert_eq!(engine.round(), 3);
    assert_eq!(round_timer_delay(&effects, early), Some(TIMEOUT_MS));
}

/// A leader that formed the previous round's certificate itself enters its round a block time
/// before it proposes; its round timer runs from its proposal, as everyone else's runs from
/// that proposal's arrival, or it would time out just as the next proposal arrives.
#[test]
fn a_leader_times_its_round_from_its_proposal() {
    let net = Net::new();
    let node = net.leader(2);
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let mut engine = net.started(node);
    for other in net.others(node).into_iter().take(2) {
        message(
            &mut engine,
            at(1),
            ConsensusMessage::Vote(net.vote(other, &b1)),
        );
    }
    let out = deliver(&mut engine, at(1), &net.propose(b1.clone(), None));
    assert!(certified(&out, &b1.hash()), "{out:?}");
    assert_eq!(engine.round(), 2);
    assert_eq!(round_timer_delay(&out, at(1)), Some(TIMEOUT_MS));
    // It proposes a block time later; its timer restarts then.
    let propose_at = at(1) + BLOCK_TIME_MS;
    let out = engine.handle(propose_at, Input::Timer(TimerKind::Propose));
    let req = build_request(&out).expect("the leader builds").clone();
    let out = engine.handle(propose_at + 30, Input::BlockBuilt(built(&req)));
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::Broadcast(ConsensusMessage::Proposal(_)))),
        "{out:?}"
    );
    assert_eq!(round_timer_delay(&out, propose_at + 30), Some(TIMEOUT_MS));
}

/// A timeout carries the certificate of the sender's latest commit: a validator that never
/// saw it learns which block is final (fetching the certified block first if it lacks it),
/// so that leader reputation reads the same final blocks everywhere.
#[test]
fn a_timeout_tells_which_block_is_final() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let qc1 = net.qc(&b1, &[0, 1, 2]);
    let b2 = net.block(2, &b1, qc1.clone(), 2);
    // QC(B2) makes B1 final (a 2-chain); the sender's highest certificate is of a fork.
    let qc2 = net.qc(&b2, &[0, 1, 2]);
    let fork = net.block(3, &b1, qc1.clone(), 3);
    let qc_fork = net.qc(&fork, &[0, 1, 2]);
    let node = net.bystander(&[4]);
    let sender = net.others(node)[0];
    let plain = net.timeout(sender, 4, qc_fork.clone());
    let carrying = Timeout {
        commit_qc: Some(qc2.clone()),
        ..plain.clone()
    };
    let synced = |blocks: Vec<Block>| {
        let mut engine = net.started(node);
        engine.handle(at(1), Input::Synced(blocks));
        assert_eq!(engine.final_tip().height, 0);
        engine
    };
    let mut engine = synced(vec![b1.clone(), b2.clone()]);
    let effects = message(&mut engine, at(4), ConsensusMessage::Timeout(plain));
    assert!(finalized(&effects).is_empty(), "{effects:?}");
    let mut engine = synced(vec![b1.clone(), b2.clone()]);
    let effects = message(
        &mut engine,
        at(4),
        ConsensusMessage::Timeout(carrying.clone()),
    );
    assert_eq!(finalized(&effects), vec![(b1.hash(), 1)]);
    // Without B2 it asks for it, and commits once it arrives.
    let mut engine = synced(vec![b1.clone()]);
    let effects = message(&mut engine, at(4), ConsensusMessage::Timeout(carrying));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::RequestSync { qc } if *qc == qc2)),
        "{effects:?}"
    );
    let effects = engine.handle(at(4), Input::Synced(vec![b2.clone()]));
    assert_eq!(finalized(&effects), vec![(b1.hash(), 1)]);
}

// ----- 2. one vote per round -----

#[test]
fn never_votes_twice_in_a_round() {
    let net = Net::new();
    let node = net.bystander(&[1, 2]);
    let first = net.propose(net.block(1, &net.genesis, net.genesis_qc(), 1), None);
    let second = net.propose(net.block(1, &net.genesis, net.genesis_qc(), 2), None);
    assert_ne!(first.block.hash(), second.block.hash());

    let mut engine = net.started(node);
    let effects = deliver(&mut engine, at(1), &first);
    assert_eq!(votes(&effects).len(), 1, "votes for the first proposal");
    let persisted = last_persisted(&effects).unwrap().clone();
    assert_eq!(persisted.last_voted_round, 1);

    let effects = deliver(&mut engine, at(1), &second);
    assert!(
        validates(&effects, &second.block.hash()),
        "the second block is still validated"
    );
    assert!(votes(&effects).is_empty(), "voted twice in round 1");

    // Restart: what was made durable, through its byte encoding.
    let disk = SafetyData::decode(&persisted.encode()).unwrap();
    let cases = [
        (
            "restarted with the persisted safety data: no second vote",
            Some(disk),
            0,
        ),
        (
            "fresh engine without safety data: votes (the persisted data is what prevents it)",
            None,
            1,
        ),
    ];
    for (desc, safety, expected_votes) in cases {
        let mut engine = net.engine(node, safety);
        engine.handle(at(1), Input::Start);
        assert_eq!(engine.round(), 1, "{desc}");
        let effects = deliver(&mut engine, at(1), &second);
        assert!(validates(&effects, &second.block.hash()), "{desc}");
        assert_eq!(votes(&effects).len(), expected_votes, "{desc}: {effects:?}");
    }
}

// ----- 3. the voting rule -----

/// Blocks and certificates for the voting-rule cases: B1 certified in round 1, round 2 timed
/// out (though some saw B2 of round 2 certified), and a proposal for round 3 on B1.
struct AfterTimeout {
    b1: Block,
    qc1: QuorumCertificate,
    qc2: QuorumCertificate,
}

impl AfterTimeout {
    fn new(net: &Net) -> AfterTimeout {
        let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
        let qc1 = net.qc(&b1, &[0, 1, 2]);
        let b2 = net.block(2, &b1, qc1.clone(), 2);
        let qc2 = net.qc(&b2, &[0, 1, 2]);
        AfterTimeout { b1, qc1, qc2 }
    }

    /// An engine of `node` that holds B1 and has moved to round 3 on a TC of round 2.
    fn engine(&self, net: &Net, node: usize) -> Engine {
        let mut engine = net.started(node);
        engine.handle(at(1), Input::Synced(vec![self.b1.clone()]));
        for other in net.others(node) {
            let t = net.timeout(other, 2, self.qc1.clone());
            message(&mut engine, at(2), ConsensusMessage::Timeout(t));
        }
        assert_eq!(engine.round(), 3);
        assert!(engine.safety().last_voted_round < 3);
        engine
    }
}

#[test]
fn voting_rule() {
    let net = Net::new();
    let fx = AfterTimeout::new(&net);
    let node = net.bystander(&[3, 4]);
    let [a, b, c] = <[usize; 3]>::try_from(net.others(node)).unwrap();
    let g = net.genesis_qc();
    let cases: [(&str, Option<TimeoutCertificate>, bool); 5] = [
        (
            "QC of round 1 and no TC: not justified in round 3",
            None,
            false,
        ),
        (
            "TC of round 2 whose high QCs are all of round 1 (= the proposal's)",
            Some(net.tc(
                2,
                &[
                    (a, fx.qc1.clone()),
                    (b, fx.qc1.clone()),
                    (c, fx.qc1.clone()),
                ],
            )),
            true,
        ),
        (
            "TC of round 2 whose high QCs are of rounds 1 and 0 (<= the proposal's)",
            Some(net.tc(2, &[(a, fx.qc1.clone()), (b, g.clone()), (c, g.clone())])),
            true,
        ),
        (
            "TC of round 2 reporting a QC of round 2, above the proposal's",
            Some(net.tc(
                2,
                &[
                    (a, fx.qc2.clone()),
                    (b, fx.qc1.clone()),
                    (c, fx.qc1.clone()),
                ],
            )),
            false,
        ),
        (
            "TC of round 1, not of the round before the proposal",
            Some(net.tc(1, &[(a, g.clone()), (b, g.clone()), (c, g.clone())])),
            false,
        ),
    ];
    for (desc, tc, votes_for_it) in cases {
        let mut engine = fx.engine(&net, node);
        let p = net.propose(net.block(3, &fx.b1, fx.qc1.clone(), 3), tc);
        let effects = deliver(&mut engine, at(3), &p);
        assert!(
            validates(&effects, &p.block.hash()),
            "{desc}: not validated, so the voting rule was not what decided: {effects:?}"
        );
        let sent = votes(&effects);
        assert_eq!(sent.len(), usize::from(votes_for_it), "{desc}: {effects:?}");
        if let Some(v) = sent.first() {
            assert_eq!((v.round, v.block_hash), (3, p.block.hash()), "{desc}");
        }
    }
}

// ----- 4. quorum thresholds -----

/// One input to the next leader of round 1 in `qc_threshold`.
#[derive(Clone, Copy, Debug)]
enum VoteStep {
    /// A genuine vote for B1 from the i-th other validator.
    Genuine(usize),
    /// A vote for B1 in the i-th other validator's name that does not verify.
    Forged(usize),
    /// A genuine vote from the i-th other validator for another block of round 1.
    Elsewhere(usize),
    /// The leader validates B1 and votes itself.
    Own,
}

#[test]
fn qc_threshold() {
    use VoteStep::{Elsewhere, Forged, Genuine, Own};
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let other_b1 = net.block(1, &net.genesis, net.genesis_qc(), 9);
    let node = net.leader(2);
    let others = net.others(node);
    let cases: [(&str, &[VoteStep], bool); 7] = [
        ("2 of 4: no certificate", &[Genuine(0), Genuine(1)], false),
        (
            "3 of 4: certificate",
            &[Genuine(0), Genuine(1), Genuine(2)],
            true,
        ),
        (
            "2 of 4 and the leader's own: certificate",
            &[Genuine(0), Genuine(1), Own],
            true,
        ),
        (
            "2 good and 1 forged: no certificate",
            &[Genuine(0), Genuine(1), Forged(2)],
            false,
        ),
        (
            "2 good, 1 forged, then a third good one: certificate",
            &[Genuine(0), Genuine(1), Forged(2), Own],
            true,
        ),
        (
            "a repeated vote counts once",
            &[Genuine(0), Genuine(0), Genuine(1)],
            false,
        ),
        (
            "votes for different blocks do not add up",
            &[Genuine(0), Genuine(1), Elsewhere(2)],
            false,
        ),
    ];
    for (desc, steps, certifies) in cases {
        let mut engine = net.started(node);
        // The leader holds B1 without having voted for it.
        engine.handle(at(1), Input::Synced(vec![b1.clone()]));
        let mut effects = Vec::new();
        for step in steps {
            effects.extend(match *step {
                Genuine(i) => message(
                    &mut engine,
                    at(1),
                    ConsensusMessage::Vote(net.vote(others[i], &b1)),
                ),
                Forged(i) => message(
                    &mut engine,
                    at(1),
                    ConsensusMessage::Vote(net.forged_vote(others[i], &b1)),
                ),
                Elsewhere(i) => message(
                    &mut engine,
                    at(1),
                    ConsensusMessage::Vote(net.vote(others[i], &other_b1)),
                ),
                Own => deliver(&mut engine, at(1), &net.propose(b1.clone(), None)),
            });
        }
        assert_eq!(
            certified(&effects, &b1.hash()),
            certifies,
            "{desc}: {effects:?}"
        );
        assert_eq!(engine.round(), if certifies { 2 } else { 1 }, "{desc}");
        if certifies {
            assert_eq!(engine.high_qc().block_hash, b1.hash(), "{desc}");
        }
    }
}

#[test]
fn proposal_qc_needs_a_quorum_of_valid_signatures() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let node = net.bystander(&[2]);
    let forged_third = {
        let mut qc = net.qc(&b1, &[0, 1, 2]);
        qc.signatures[2].signature = forged(&net.keys[2]);
        qc
    };
    let wrong_round = QuorumCertificate {
        round: 2,
        ..net.qc(&b1, &[0, 1, 2])
    };
    let cases = [
        ("signed by 2 of 4", net.qc(&b1, &[0, 1]), false),
        ("signed by 3 of 4", net.qc(&b1, &[0, 1, 2]), true),
        ("signed by 4 of 4", net.qc(&b1, &[0, 1, 2, 3]), true),
        (
            "3 entries, one validator twice",
            net.qc(&b1, &[0, 0, 1]),
            false,
        ),
        ("3 of 4, one signature forged", forged_third, false),
        (
            "3 of 4 signatures, but claiming another round",
            wrong_round,
            false,
        ),
    ];
    for (desc, qc, accepted) in cases {
        let mut engine = net.started(node);
        engine.handle(at(1), Input::Synced(vec![b1.clone()]));
        let p = net.propose(net.block(2, &b1, qc, 2), None);
        let effects = message(&mut engine, at(2), ConsensusMessage::Proposal(p.clone()));
        assert_eq!(
            validates(&effects, &p.block.hash()),
            accepted,
            "{desc}: {effects:?}"
        );
        assert_eq!(engine.round(), if accepted { 2 } else { 1 }, "{desc}");
    }
}

// ----- 5. timeouts -----

#[test]
fn round_timeout_persists_before_broadcasting() {
    let net = Net::new();
    let mut engine = net.started(net.bystander(&[1, 2]));
    let effects = engine.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout));
    let persist = effects
        .iter()
        .position(|e| matches!(e, Effect::PersistSafety(s) if s.last_voted_round == 1))
        .unwrap_or_else(|| panic!("nothing persisted: {effects:?}"));
    let broadcast = effects
        .iter()
        .position(|e| matches!(e, Effect::Broadcast(ConsensusMessage::Timeout(_))))
        .unwrap_or_else(|| panic!("no timeout broadcast: {effects:?}"));
    assert!(persist < broadcast, "{effects:?}");
    let t = broadcast_timeout(&effects).unwrap();
    assert_eq!((t.round, &t.high_qc), (1, &net.genesis_qc()));
    assert!(
        round_timer_delay(&effects, TIMEOUT_MS).is_some(),
        "no rebroadcast timer"
    );
    assert_eq!(engine.safety().last_voted_round, 1);
}

/// One input to a validator in round 1 in `timeouts_from_a_quorum_form_a_tc`.
#[derive(Clone, Copy, Debug)]
enum TimeoutStep {
    /// Its own round timer fires.
    OwnTimer,
    /// A genuine timeout of round 1 from the i-th other validator.
    Genuine(usize),
    /// A timeout of round 1 in the i-th other validator's name that does not verify.
    Forged(usize),
}

#[test]
fn timeouts_from_a_quorum_form_a_tc() {
    use TimeoutStep::{Forged, Genuine, OwnTimer};
    let net = Net::new();
    let node = net.bystander(&[1, 2]);
    let others = net.others(node);
    let cases: [(&str, &[TimeoutStep], u64); 6] = [
        ("own and 1 other: no TC", &[OwnTimer, Genuine(0)], 1),
        (
            "own and 2 others: TC, round 2",
            &[OwnTimer, Genuine(0), Genuine(1)],
            2,
        ),
        (
            "own, 1 other and 1 forged: no TC",
            &[OwnTimer, Genuine(0), Forged(1)],
            1,
        ),
        (
            "own and the same other twice: no TC",
            &[OwnTimer, Genuine(0), Genuine(0)],
            1,
        ),
        ("1 other alone: the node waits", &[Genuine(0)], 1),
        (
            "2 others (over 1/3 of the stake): the node joins, and its timeout makes the TC",
            &[Genuine(0), Genuine(1)],
            2,
        ),
    ];
    for (desc, steps, round) in cases {
        let mut engine = net.started(node);
        let mut effects = Vec::new();
        for step in steps {
            effects.extend(match *step {
                OwnTimer => engine.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout)),
                Genuine(i) => message(
                    &mut engine,
                    TIMEOUT_MS,
                    ConsensusMessage::Timeout(net.timeout(others[i], 1, net.genesis_qc())),
                ),
                Forged(i) => {
                    let mut t = net.timeout(others[i], 1, net.genesis_qc());
                    t.signature = forged(&net.keys[others[i]]);
                    message(&mut engine, TIMEOUT_MS, ConsensusMessage::Timeout(t))
                }
            });
        }
        assert_eq!(engine.round(), round, "{desc}: {effects:?}");
        if round == 2 {
            let own = broadcast_timeout(&effects).expect("own timeout broadcast");
            assert_eq!(
                (own.round, own.voter),
                (1, net.keys[node].address()),
                "{desc}"
            );
        }
    }
}

#[test]
fn next_leader_proposes_once_a_tc_forms() {
    let net = Net::new();
    let node = net.leader(2);
    let mut engine = net.started(node);
    engine.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout));
    let mut effects = Vec::new();
    for other in net.others(node).into_iter().take(2) {
        let t = net.timeout(other, 1, net.genesis_qc());
        effects.extend(message(
            &mut engine,
            TIMEOUT_MS + 10,
            ConsensusMessage::Timeout(t),
        ));
    }
    assert_eq!(engine.round(), 2);
    let req = build_request(&effects).unwrap_or_else(|| panic!("no BuildBlock: {effects:?}"));
    assert_eq!(
        (req.round, req.height, req.parent_hash, &req.parent_qc),
        (2, 1, net.genesis.hash(), &net.genesis_qc())
    );
    // Round 1 certified nothing: its leader is listed as failed in the header.
    assert_eq!(
        req.failed_proposers,
        vec![net.validators.leader_in_turn(1).address]
    );

    // The proposal carries the TC, and another validator votes for it on that TC.
    let block = built(req);
    let effects = engine.handle(TIMEOUT_MS + 10, Input::BlockBuilt(block.clone()));
    let proposal = effects
        .iter()
        .find_map(|e| match e {
            Effect::Broadcast(ConsensusMessage::Proposal(p)) => Some(p.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no proposal: {effects:?}"));
    let tc = proposal
        .tc
        .as_ref()
        .expect("proposal after a timeout carries the TC");
    assert_eq!(tc.round, 1);
    assert!(tc.signatures.len() >= 3);

    let voter = net.bystander(&[2, 3]);
    // The same block listing no failed leader is not even validated: reputation reads the
    // list once the block is final, so it must be the one every validator computes.
    let mut unlisted = block.clone();
    unlisted.header.failed_proposers.clear();
    let forged = net.propose(unlisted, proposal.tc.clone());
    let mut other = net.started(voter);
    let effects = deliver(&mut other, TIMEOUT_MS + 20, &forged);
    assert!(!validates(&effects, &forged.block.hash()), "{effects:?}");
    let mut other = net.started(voter);
    let effects = deliver(&mut other, TIMEOUT_MS + 20, &proposal);
    assert_eq!(other.round(), 2);
    let sent = votes(&effects);
    assert_eq!(sent.len(), 1, "{effects:?}");
    assert_eq!(sent[0].block_hash, block.hash());
}

/// One input in `consecutive_timeouts_back_off_up_to_the_cap`.
enum BackoffStep {
    Start,
    /// The round timer fires.
    Timer,
    /// Two other validators time out the round, completing a TC with ours.
    TimeoutsOf(u64),
    /// Another validator's timeout of round 3 brings a certificate of round 3.
    CertificateOfRound3,
}

/// The back-off doubles the round timeout when a TC ends a round whose leader (or, if the
/// proposal got our vote, whose vote collector) was not seen failing before, up to the cap.
/// The timer firing again in a round with no TC keeps it.
#[test]
fn consecutive_timeouts_back_off_up_to_the_cap() {
    let net = Net::new();
    let node = net.bystander(&[1, 2, 3]);
    assert_ne!(net.leader(1), net.leader(2), "fixture assumption");
    let others = net.others(node);
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let b2 = net.block(2, &b1, net.qc(&b1, &[0, 1, 2]), 2);
    let b3 = net.block(3, &b2, net.qc(&b2, &[0, 1, 2]), 3);
    let qc3 = net.qc(&b3, &[0, 1, 2]);
    let cases = [
        (
            "round 1 starts with the base timeout",
            0,
            BackoffStep::Start,
            2_000,
            1,
        ),
        (
            "the timer firing with no TC keeps it",
            2_000,
            BackoffStep::Timer,
            2_000,
            1,
        ),
        (
            "a TC of a round whose leader failed for the first time doubles it",
            3_000,
            BackoffStep::TimeoutsOf(1),
            4_000,
            2,
        ),
        (
            "the timer keeps it again",
            7_000,
            BackoffStep::Timer,
            4_000,
            2,
        ),
        (
            "another failed leader doubles it again, up to the cap",
            8_000,
            BackoffStep::TimeoutsOf(2),
            6_000,
            3,
        ),
        (
            "a certificate resets it to the base",
            9_000,
            BackoffStep::CertificateOfRound3,
            2_000,
            4,
        ),
    ];
    let mut engine = net.engine(node, None);
    for (desc, now, step, delay, round) in cases {
        let effects = match step {
            BackoffStep::Start => engine.handle(now, Input::Start),
            BackoffStep::Timer => engine.handle(now, Input::Timer(TimerKind::RoundTimeout)),
            BackoffStep::TimeoutsOf(round) => others[..2]
                .iter()
                .flat_map(|i| {
                    let t = net.timeout(*i, round, net.genesis_qc());
                    message(&mut engine, now, ConsensusMessage::Timeout(t))
                })
                .collect(),
            BackoffStep::CertificateOfRound3 => {
                let t = net.timeout(others[0], 3, qc3.clone());
                message(&mut engine, now, ConsensusMessage::Timeout(t))
            }
        };
        assert_eq!(
            round_timer_delay(&effects, now),
            Some(delay),
            "{desc}: {effects:?}"
        );
        assert_eq!(engine.round(), round, "{desc}");
    }
}

/// Times out `rounds` one after the other at `engine` (its timer fires, two others' timeouts
/// complete the TC) and returns the round timeout set on entering the round after each.
fn time_out_rounds(net: &Net, engine: &mut Engine, node: usize, rounds: &[u64]) -> Vec<u64> {
    let mut now = 0;
    let mut delays = Vec::new();
    for &round in rounds {
        assert_eq!(engine.round(), round);
        engine.handle(now, Input::Timer(TimerKind::RoundTimeout));
        now += 1;
        let mut effects = Vec::new();
        for other in net.others(node).into_iter().take(2) {
            let t = net.timeout(other, round, net.genesis_qc());
            effects.extend(message(engine, now, ConsensusMessage::Timeout(t)));
        }
        assert_eq!(engine.round(), round + 1);
        delays.push(round_timer_delay(&effects, now).unwrap());
    }
    delays
}

/// The cap is the configured `max_timeout_ms` whatever it is, not a fixed multiple of the
/// base: a cap of 3x is reached after two leaders failed in a row (the round after them waits
/// on no validator seen failing, so the back-off applies).
#[test]
fn the_back_off_grows_to_a_configured_cap() {
    let net = Net::new();
    let node = net.bystander(&[1, 2, 3]);
    assert_eq!(net.leader(4), node, "fixture assumption: leaders in turn");
    let mut engine = net.started_with_cap(node, 3 * TIMEOUT_MS);
    assert_eq!(
        time_out_rounds(&net, &mut engine, node, &[1, 2]),
        [2 * TIMEOUT_MS, 3 * TIMEOUT_MS]
    );
}

/// A leader already seen failing does not grow the timeout again when its round fails, and a
/// round that waits on it (it leads the round, or the next one, whose proposal ends the
/// round) gets the base timeout whatever the back-off: a dead validator drawn again before
/// reputation stops drawing it costs one base timeout each time.
#[test]
fn a_known_failed_leader_gets_the_base_timeout() {
    let net = Net::new();
    let node = net.bystander(&[1]);
    let failing = net.leader(1);
    let again = (3..60u64).find(|r| net.leader(*r) == failing).unwrap();
    let mut engine = net.started_with_cap(node, 64 * TIMEOUT_MS);
    // Round 2 waits on the leader of round 2 and on that of round 3, neither seen failing.
    assert_eq!(time_out_rounds(&net, &mut engine, node, &[1]), [4_000]);
    // Three others time out the round before `again`: the engine joins them and moves on by
    // their TC, without timing out the rounds in between.
    let mut effects = Vec::new();
    for other in net.others(node).into_iter().take(3) {
        let t = net.timeout(other, again - 1, net.genesis_qc());
        effects.extend(message(&mut engine, 10, ConsensusMessage::Timeout(t)));
    }
    assert_eq!(engine.round(), again);
    assert_eq!(round_timer_delay(&effects, 10), Some(TIMEOUT_MS));
    // Its round fails again: no growth. The round after it, if it waits on no suspect, gets
    // the back-off of the two culprits seen (the leaders of rounds 1 and `again - 1`).
    assert_ne!(net.leader(again - 1), failing);
    assert_eq!(
        time_out_rounds(&net, &mut engine, node, &[again]),
        [
            if [again + 1, again + 2]
                .iter()
                .any(|r| net.leader(*r) == failing)
            {
                TIMEOUT_MS
            } else {
                4 * TIMEOUT_MS
            }
        ],
        "the round of a leader known failed grew the timeout"
    );
}

// ----- 6. round synchronisation -----

#[test]
fn round_sync() {
    let net = Net::new();
    let mut chain = vec![net.genesis.clone()];
    let mut qcs = vec![net.genesis_qc()];
    for round in 1..=4 {
        let block = net.block(round, chain.last().unwrap(), qcs.last().unwrap().clone(), 0);
        qcs.push(net.qc(&block, &[0, 1, 2]));
        chain.push(block);
    }
    let qc4 = qcs[4].clone();
    let p5 = net.propose(net.block(5, &chain[4], qc4.clone(), 5), None);
    let node = net.bystander(&[5, 6]);
    let mut engine = net.started(node);

    let effects = message(&mut engine, at(5), ConsensusMessage::Proposal(p5.clone()));
    assert_eq!(
        engine.round(),
        5,
        "the certificate of round 4 moves the engine to round 5"
    );
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::RequestSync { qc } if *qc == qc4)),
        "no sync of the missing parent: {effects:?}"
    );
    assert!(
        !validates(&effects, &p5.block.hash()),
        "validated without its parent"
    );

    // Once the ancestors arrive, the same proposal is validated and voted for.
    engine.handle(at(5), Input::Synced(chain[1..].to_vec()));
    let effects = deliver(&mut engine, at(5), &p5);
    assert!(validates(&effects, &p5.block.hash()), "{effects:?}");
    assert_eq!(votes(&effects).len(), 1, "{effects:?}");
}

// ----- 7. equivocation -----

#[test]
fn equivocation() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let x1 = net.block(1, &net.genesis, net.genesis_qc(), 2);
    let node = net.leader(2);
    let offender = net.others(node)[0];
    let first = net.vote(offender, &b1);
    let cases = [
        (
            "a signed vote for another block in the same round",
            net.vote(offender, &x1),
            true,
        ),
        (
            "a forged vote for another block (bad signature)",
            net.forged_vote(offender, &x1),
            false,
        ),
        ("the same vote again", first.clone(), false),
    ];
    for (desc, second, is_evidence) in cases {
        let mut engine = net.started(node);
        let mut effects = message(&mut engine, at(1), ConsensusMessage::Vote(first.clone()));
        effects.extend(message(
            &mut engine,
            at(1),
            ConsensusMessage::Vote(second.clone()),
        ));
        let expected = Evidence {
            first: first.clone(),
            second,
        };
        if is_evidence {
            let report = effects
                .iter()
                .position(|e| *e == Effect::ReportEvidence(expected.clone()));
            let gossip = effects.iter().position(|e| {
                *e == Effect::Broadcast(ConsensusMessage::Evidence(expected.clone()))
            });
            assert!(report.is_some() && gossip.is_some(), "{desc}: {effects:?}");
            assert_eq!(expected.offender(), net.keys[offender].address());
            assert_eq!(engine.evidence_pool().count(), 1, "{desc}");
        } else {
            assert!(reported(&effects).is_empty(), "{desc}: {effects:?}");
            assert!(
                !effects
                    .iter()
                    .any(|e| matches!(e, Effect::Broadcast(ConsensusMessage::Evidence(_)))),
                "{desc}: {effects:?}"
            );
            assert_eq!(engine.evidence_pool().count(), 0, "{desc}");
        }
    }
}

#[test]
fn gossiped_evidence_is_checked_before_it_is_kept() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let x1 = net.block(1, &net.genesis, net.genesis_qc(), 2);
    let node = net.bystander(&[1, 2]);
    let offender = net.others(node)[0];
    let another = net.others(node)[1];
    let cases = [
        (
            "two signed votes for different blocks",
            Evidence {
                first: net.vote(offender, &b1),
                second: net.vote(offender, &x1),
            },
            true,
        ),
        (
            "one of the votes forged",
            Evidence {
                first: net.forged_vote(offender, &b1),
                second: net.vote(offender, &x1),
            },
            false,
        ),
        (
            "two votes for the same block",
            Evidence {
                first: net.vote(offender, &b1),
                second: net.vote(offender, &b1),
            },
            false,
        ),
        (
            "votes of two different validators",
            Evidence {
                first: net.vote(offender, &b1),
                second: net.vote(another, &x1),
            },
            false,
        ),
    ];
    for (desc, evidence, kept) in cases {
        let mut engine = net.started(node);
        let effects = message(
            &mut engine,
            at(1),
            ConsensusMessage::Evidence(evidence.clone()),
        );
        assert_eq!(
            reported(&effects).len(),
            usize::from(kept),
            "{desc}: {effects:?}"
        );
        // Learnt evidence is reported once, however often it is heard.
        let again = message(&mut engine, at(1), ConsensusMessage::Evidence(evidence));
        assert!(reported(&again).is_empty(), "{desc}: reported twice");
        assert_eq!(engine.evidence_pool().count(), usize::from(kept), "{desc}");
    }
}

#[test]
fn forged_vote_does_not_silence_the_real_one() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let node = net.leader(2);
    let [a, b, c] = <[usize; 3]>::try_from(net.others(node)).unwrap();
    let mut engine = net.started(node);
    engine.handle(at(1), Input::Synced(vec![b1.clone()]));
    for v in [net.vote(a, &b1), net.vote(b, &b1), net.forged_vote(c, &b1)] {
        message(&mut engine, at(1), ConsensusMessage::Vote(v));
    }
    assert_eq!(engine.round(), 1, "the forged vote must not count");
    let effects = message(&mut engine, at(1), ConsensusMessage::Vote(net.vote(c, &b1)));
    assert!(
        certified(&effects, &b1.hash()),
        "3 genuine votes of 4 form no certificate: {effects:?}"
    );
    assert_eq!(engine.round(), 2);
}

/// The senders a node was told to score down, and why.
fn scored(effects: &[Effect]) -> Vec<(Origin, &'static str)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Invalid { from, reason } => Some((*from, *reason)),
            _ => None,
        })
        .collect()
}

/// Messages no honest validator sends are reported with their sender, so the node scores that
/// peer down; messages that are only late or for another leader are not.
#[test]
fn invalid_messages_are_reported_with_their_sender() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let node = net.leader(2);
    let [a, b, c] = <[usize; 3]>::try_from(net.others(node)).unwrap();
    let from = |engine: &mut Engine, who: u64, msg: ConsensusMessage| {
        engine.handle(
            at(1),
            Input::Message {
                from: Origin(who),
                message: msg,
            },
        )
    };
    // A vote whose signature is only checked with the quorum: reported with its own sender
    // (7), not with the sender of the vote that completed the quorum (9).
    let mut engine = net.started(node);
    engine.handle(at(1), Input::Synced(vec![b1.clone()]));
    assert!(scored(&from(
        &mut engine,
        7,
        ConsensusMessage::Vote(net.forged_vote(c, &b1))
    ))
    .is_empty());
    from(&mut engine, 8, ConsensusMessage::Vote(net.vote(a, &b1)));
    let effects = from(&mut engine, 9, ConsensusMessage::Vote(net.vote(b, &b1)));
    assert_eq!(scored(&effects), vec![(Origin(7), "badly signed vote")]);

    let mut other_chain = net.vote(a, &b1);
    other_chain.chain_id = "elsewhere".into();
    let mut badly_signed_timeout = net.timeout(a, 1, net.genesis_qc());
    badly_signed_timeout.signature = net.timeout(b, 1, net.genesis_qc()).signature;
    let mut badly_signed_proposal = net.propose(b1.clone(), None);
    badly_signed_proposal.signature = net.forged_vote(a, &b1).signature;
    let base_round = net.vote(a, &b1);
    let base_round = Vote::sign(
        &net.keys[a],
        CHAIN,
        base_round.block_hash,
        1,
        epoch_base_round(1),
    );
    let cases = [
        (
            "vote for another chain",
            ConsensusMessage::Vote(other_chain),
        ),
        (
            "badly signed timeout",
            ConsensusMessage::Timeout(badly_signed_timeout),
        ),
        (
            "badly signed proposal",
            ConsensusMessage::Proposal(badly_signed_proposal),
        ),
        (
            "vote in a round that does not exist in its epoch",
            ConsensusMessage::Vote(base_round),
        ),
    ];
    for (reason, msg) in cases {
        let mut engine = net.started(node);
        let effects = from(&mut engine, 5, msg);
        assert_eq!(scored(&effects), vec![(Origin(5), reason)], "{effects:?}");
    }
    // Honest but useless: a late vote, a vote sent to a validator that does not lead next, a
    // timeout of a past round. Not scored.
    let mut engine = net.started(net.bystander(&[2]));
    let effects = from(&mut engine, 5, ConsensusMessage::Vote(net.vote(a, &b1)));
    assert!(scored(&effects).is_empty(), "{effects:?}");
    let mut engine = net.started(node);
    engine.handle(at(1), Input::Synced(vec![b1.clone()]));
    for i in [a, b, c] {
        from(&mut engine, 5, ConsensusMessage::Vote(net.vote(i, &b1)));
    }
    assert_eq!(engine.round(), 2);
    let effects = from(
        &mut engine,
        5,
        ConsensusMessage::Timeout(net.timeout(a, 1, net.genesis_qc())),
    );
    assert!(scored(&effects).is_empty(), "{effects:?}");
    // Messages from the node itself are never reported.
    let mut engine = net.started(node);
    let effects = engine.handle(
        at(1),
        Input::Message {
            from: Origin::LOCAL,
            message: ConsensusMessage::Vote(Vote {
                chain_id: "elsewhere".into(),
                ..net.vote(a, &b1)
            }),
        },
    );
    assert!(scored(&effects).is_empty());
}

#[test]
fn forged_first_vote_never_becomes_evidence() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let x1 = net.block(1, &net.genesis, net.genesis_qc(), 2);
    let node = net.leader(2);
    let honest = net.others(node)[0];
    let mut engine = net.started(node);
    let mut effects = message(
        &mut engine,
        at(1),
        ConsensusMessage::Vote(net.forged_vote(honest, &x1)),
    );
    effects.extend(message(
        &mut engine,
        at(1),
        ConsensusMessage::Vote(net.vote(honest, &b1)),
    ));
    assert!(
        reported(&effects).is_empty(),
        "an honest validator framed by a forged vote: {effects:?}"
    );
    assert_eq!(engine.evidence_pool().count(), 0);
}

// ----- 8. bad input -----

#[test]
fn bad_proposals_are_not_validated() {
    let net = Net::new();
    let node = net.bystander(&[1]);
    let now = at(1);
    let leader = net.leader(1);
    let not_leader = net.others(leader)[0];
    let b1 = || net.block(1, &net.genesis, net.genesis_qc(), 1);
    let with_header = |edit: &dyn Fn(&mut Header)| {
        let mut block = b1();
        edit(&mut block.header);
        block
    };
    // The leader's signature over a (chain, block, round) of the test's choosing.
    let signed_for = |block: &Block, chain: &str, round: u64| Proposal {
        signature: net.keys[leader].sign(&Proposal::signing_hash(chain, &block.hash(), round)),
        block: block.clone(),
        tc: None,
    };
    let g = net.genesis_qc();
    let cases = [
        (
            "a well-formed proposal from the leader",
            net.propose(b1(), None),
            true,
        ),
        (
            "its parent certificate is for another block than its parent",
            net.propose(
                with_header(&|h| h.parent_hash = Hash::digest(b"not the genesis")),
                None,
            ),
            false,
        ),
        (
            "its parent certificate is for another height",
            net.propose(with_header(&|h| h.height = 2), None),
            false,
        ),
        (
            "names and is signed by a validator that is not the round's leader",
            Proposal::sign(
                &net.keys[not_leader],
                with_header(&|h| h.proposer = net.keys[not_leader].address()),
                None,
            ),
            false,
        ),
        (
            "signed by the leader but naming another proposer",
            Proposal::sign(
                &net.keys[leader],
                with_header(&|h| h.proposer = net.keys[not_leader].address()),
                None,
            ),
            false,
        ),
        (
            "names the leader but is signed by another key",
            Proposal::sign(&net.keys[not_leader], b1(), None),
            false,
        ),
        (
            "the leader's signature over another round",
            signed_for(&b1(), CHAIN, 2),
            false,
        ),
        (
            "wrong chain id",
            net.propose(with_header(&|h| h.chain_id = "another-chain".into()), None),
            false,
        ),
        (
            "wrong chain id in the header, signed in this chain's domain",
            signed_for(
                &with_header(&|h| h.chain_id = "another-chain".into()),
                CHAIN,
                1,
            ),
            false,
        ),
        (
            "timestamp at the clock-drift limit",
            net.propose(
                with_header(&|h| h.timestamp_ms = now + MAX_CLOCK_DRIFT_MS),
                None,
            ),
            true,
        ),
        (
            "timestamp far in the future",
            net.propose(
                with_header(&|h| h.timestamp_ms = now + MAX_CLOCK_DRIFT_MS + 1),
                None,
            ),
            false,
        ),
        (
            "parent certificate without a quorum",
            net.propose(
                with_header(&|h| {
                    h.parent_qc = QuorumCertificate {
                        signatures: net.qc(&net.genesis, &[0, 1]).signatures,
                        ..g.clone()
                    }
                }),
                None,
            ),
            false,
        ),
        (
            "an attached TC without a quorum",
            net.propose(b1(), Some(net.tc(0, &[(0, g.clone()), (1, g.clone())]))),
            false,
        ),
        (
            "a round already over",
            net.propose(net.block(0, &net.genesis, g.clone(), 1), None),
            false,
        ),
    ];
    for (desc, p, accepted) in cases {
        let mut engine = net.started(node);
        let effects = message(&mut engine, now, ConsensusMessage::Proposal(p.clone()));
        assert_eq!(
            validates(&effects, &p.block.hash()),
            accepted,
            "{desc}: {effects:?}"
        );
    }
}

/// Decodable messages that are wrong in every way a peer can make them wrong.
fn garbage(net: &Net) -> Vec<ConsensusMessage> {
    let stranger = Keypair::from_seed(99);
    let g = net.genesis_qc();
    let junk_qc = QuorumCertificate {
        block_hash: Hash([7; 32]),
        height: u64::MAX,
        round: u64::MAX,
        signatures: vec![
            VoteSignature {
                validator: net.keys[0].address(),
                signature: Signature([0; 64]),
            },
            VoteSignature {
                validator: net.keys[0].address(),
                signature: Signature([0xff; 64]),
            },
            VoteSignature {
                validator: stranger.address(),
                signature: Signature([1; 64]),
            },
        ],
    };
    let junk_tc = TimeoutCertificate {
        round: u64::MAX,
        high_qc: junk_qc.clone(),
        signatures: vec![],
    };
    let top = u64::MAX;
    let huge_block = |round: u64, parent_qc: QuorumCertificate, ts: u64| {
        let mut block = net.block(round.min(1_000), &net.genesis, parent_qc, 0xee);
        block.header.round = round;
        block.header.height = u64::MAX;
        block.header.timestamp_ms = ts;
        block.header.proposer = net.validators.leader_in_turn(round).address;
        block
    };
    let mut msgs = vec![
        ConsensusMessage::Vote(Vote::sign(&stranger, CHAIN, Hash([3; 32]), top, top)),
        ConsensusMessage::Vote(Vote {
            signature: Signature([0; 64]),
            ..net.vote(0, &net.genesis)
        }),
        ConsensusMessage::Vote(Vote::sign(&net.keys[1], "", Hash::ZERO, 0, 0)),
        ConsensusMessage::Timeout(Timeout::sign(&net.keys[1], CHAIN, top, junk_qc.clone())),
        ConsensusMessage::Timeout(Timeout::sign(&net.keys[1], CHAIN, 1, junk_qc.clone())),
        ConsensusMessage::Timeout(Timeout::sign(&stranger, CHAIN, 1, g.clone())),
        ConsensusMessage::Proposal(net.propose(huge_block(top, g.clone(), top), None)),
        ConsensusMessage::Proposal(net.propose(huge_block(1, junk_qc.clone(), 0), None)),
        ConsensusMessage::Proposal(net.propose(huge_block(1, g.clone(), 0), Some(junk_tc))),
        ConsensusMessage::Evidence(Evidence {
            first: Vote::sign(&stranger, CHAIN, Hash([1; 32]), top, top),
            second: Vote::sign(&stranger, CHAIN, Hash([2; 32]), top, top),
        }),
        ConsensusMessage::Evidence(Evidence {
            first: Vote::sign(&net.keys[2], CHAIN, Hash([1; 32]), 1, 1),
            second: Vote::sign(&net.keys[2], "other", Hash([2; 32]), 1, 1),
        }),
    ];
    // Votes for the last round (their next leader is asked to aggregate them).
    for key in &net.keys {
        msgs.push(ConsensusMessage::Vote(Vote::sign(
            key,
            CHAIN,
            Hash([5; 32]),
            top,
            top - 1,
        )));
    }
    msgs
}

#[test]
fn garbage_messages_never_panic() {
    let net = Net::new();
    for msg in garbage(&net) {
        let decoded = ConsensusMessage::decode(&msg.encode()).expect("decodable");
        assert_eq!(decoded, msg);
        for node in 0..VALIDATORS {
            for now in [0, at(1), u64::MAX] {
                let mut engine = net.started(node);
                let effects = message(&mut engine, now, decoded.clone());
                assert_eq!(engine.round(), 1, "{msg:?} moved the round");
                assert!(
                    !effects.iter().any(|e| matches!(
                        e,
                        Effect::ValidateBlock(_)
                            | Effect::SendTo { .. }
                            | Effect::ReportEvidence(_)
                            | Effect::Certified { .. }
                            | Effect::Finalize { .. }
                    )),
                    "{msg:?} at {now} on node {node}: {effects:?}"
                );
            }
        }
    }
}

#[test]
fn mutated_messages_never_panic() {
    let net = Net::new();
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let qc1 = net.qc(&b1, &[0, 1, 2]);
    let tc = net.tc(
        1,
        &[
            (0, net.genesis_qc()),
            (1, net.genesis_qc()),
            (2, net.genesis_qc()),
        ],
    );
    let valid = [
        ConsensusMessage::Proposal(net.propose(b1.clone(), None)),
        ConsensusMessage::Proposal(net.propose(net.block(2, &b1, qc1.clone(), 2), Some(tc))),
        ConsensusMessage::Vote(net.vote(0, &b1)),
        ConsensusMessage::Timeout(net.timeout(1, 1, qc1)),
        ConsensusMessage::Evidence(Evidence {
            first: net.vote(2, &b1),
            second: net.vote(2, &net.block(1, &net.genesis, net.genesis_qc(), 2)),
        }),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut engines: Vec<Engine> = (0..VALIDATORS).map(|i| net.started(i)).collect();
    let mut decoded = 0;
    for _ in 0..400 {
        for msg in &valid {
            let mut bytes = msg.encode();
            for _ in 0..rng.gen_range(1..=3) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] ^= 1 << rng.gen_range(0..8);
            }
            let Ok(m) = ConsensusMessage::decode(&bytes) else {
                continue;
            };
            decoded += 1;
            let engine = &mut engines[rng.gen_range(0..VALIDATORS)];
            let effects = message(engine, at(1), m);
            for e in effects {
                if let Effect::ValidateBlock(block) = e {
                    engine.handle(
                        at(1),
                        Input::BlockValidated {
                            hash: block.hash(),
                            valid: rng.gen_bool(0.5),
                        },
                    );
                }
            }
        }
    }
    assert!(decoded > 100, "only {decoded} mutations decoded");
}

// ----- epochs -----

/// Blocks per epoch in the epoch tests: epoch 0 ends with the block at height 2.
const EPOCH_LENGTH: u64 = 2;

/// The first round of epoch 1 (the switch restarts rounds there).
fn epoch_1_round() -> u64 {
    epoch_base_round(1) + 1
}

impl Net {
    /// The engine of validator `node` with two-block epochs, started at time 0 (in round 1).
    fn started_in_short_epochs(&self, node: usize) -> Engine {
        let engine = self.started_with(node, Net::config_with(EPOCH_LENGTH));
        assert_eq!((engine.round(), engine.epoch()), (1, 0));
        engine
    }

    /// The set of epoch 1: the same four keys, with stakes 1, 2, 3 and 4 (so its hash and
    /// leader schedule differ from epoch 0's; validators 1, 2 and 3 form a quorum).
    fn next_set(&self) -> ValidatorSet {
        ValidatorSet::new(
            self.keys
                .iter()
                .enumerate()
                .map(|(i, k)| Validator {
                    address: k.address(),
                    public_key: k.public(),
                    stake: i as u64 + 1,
                })
                .collect(),
        )
        .unwrap()
    }

    fn index_of(&self, address: &Address) -> usize {
        self.keys
            .iter()
            .position(|k| k.address() == *address)
            .unwrap()
    }

    /// A block of `epoch` proposed by `set`'s leader of `round`, a block time after `parent`
    /// (packed rounds are too large for `block`'s round-based timestamps).
    fn block_in(
        &self,
        set: &ValidatorSet,
        epoch: u64,
        round: u64,
        parent: &Block,
        parent_qc: QuorumCertificate,
        salt: u8,
    ) -> Block {
        let mut block = self.block(round, parent, parent_qc, salt);
        block.header.epoch = epoch;
        block.header.timestamp_ms = parent.header.timestamp_ms + BLOCK_TIME_MS;
        block.header.proposer = set.leader_in_turn(round).address;
        block.header.validators_hash = set.hash();
        block
    }

    /// `block` proposed and signed by its header's proposer.
    fn propose_as_proposer(&self, block: Block) -> Proposal {
        let signer = self.index_of(&block.header.proposer);
        Proposal::sign(&self.keys[signer], block, None)
    }
}

/// The end of epoch 0 with two-block epochs: B1 and B2 (the epoch-ending block) in rounds 1
/// and 2, then the empty suffix blocks S3 (round 3, on B2) and S4 (round 4, on S3). Every
/// certificate is signed by validators 0, 1 and 2.
struct EpochEnd {
    b1: Block,
    b2: Block,
    s3: Block,
    s4: Block,
    qc_b2: QuorumCertificate,
    qc_s3: QuorumCertificate,
}

impl EpochEnd {
    fn new(net: &Net) -> EpochEnd {
        assert_eq!(epoch_end_height(0, EPOCH_LENGTH), 2, "fixture assumption");
        let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
        let qc_b1 = net.qc(&b1, &[0, 1, 2]);
        let b2 = net.block(2, &b1, qc_b1, 2);
        let qc_b2 = net.qc(&b2, &[0, 1, 2]);
        let s3 = net.block(3, &b2, qc_b2.clone(), 3);
        let qc_s3 = net.qc(&s3, &[0, 1, 2]);
        let s4 = net.block(4, &s3, qc_s3.clone(), 4);
        EpochEnd {
            b1,
            b2,
            s3,
            s4,
            qc_b2,
            qc_s3,
        }
    }

    /// Delivers each block's proposal in its round (reporting it valid when asked); returns
    /// the effects of the last one.
    fn feed(net: &Net, engine: &mut Engine, blocks: &[&Block]) -> Vec<Effect> {
        let mut out = Vec::new();
        for b in blocks {
            out = deliver(engine, at(b.header.round), &net.propose((*b).clone(), None));
        }
        out
    }

    /// What proves epoch 0 over: S3 with its certificate (S3's parent B2 is from the round
    /// before it, so the QC of S3 makes B2 final).
    fn proof(&self) -> EpochProof {
        EpochProof {
            headers: vec![self.s3.header.clone()],
            qc: self.qc_s3.clone(),
        }
    }

    /// The engine of `node` after S4 (carrying the QC of S3) made B2 final: it waits for the
    /// set of epoch 1.
    fn awaiting(&self, net: &Net, node: usize) -> Engine {
        let mut engine = net.started_in_short_epochs(node);
        EpochEnd::feed(net, &mut engine, &[&self.b1, &self.b2, &self.s3, &self.s4]);
        assert!(engine.awaiting_validator_set());
        engine
    }

    /// The engine of `node` in epoch 1 (with [`Net::next_set`]), and the effects of the switch.
    fn switched(&self, net: &Net, node: usize) -> (Engine, Vec<Effect>) {
        let mut engine = self.awaiting(net, node);
        let out = engine.handle(
            at(4),
            Input::NewEpoch {
                epoch: 1,
                validators: net.next_set(),
            },
        );
        assert_eq!((engine.epoch(), engine.round()), (1, epoch_1_round()));
        (engine, out)
    }
}

fn finalized(effects: &[Effect]) -> Vec<(Hash, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Finalize { hash, height, .. } => Some((*hash, *height)),
            _ => None,
        })
        .collect()
}

fn position(effects: &[Effect], pred: impl Fn(&Effect) -> bool) -> Option<usize> {
    effects.iter().position(pred)
}

fn need_set_position(effects: &[Effect], epoch: u64, height: u64) -> Option<usize> {
    position(effects, |e| {
        *e == Effect::NeedValidatorSet { epoch, height }
    })
}

/// What happens to the block at height 3 in `suffix_blocks_carry_nothing`.
#[derive(Clone, Copy, Debug)]
enum SuffixContent {
    Empty,
    Transaction,
    Evidence,
}

#[test]
fn suffix_blocks_carry_nothing() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let alt = net.block(1, &net.genesis, net.genesis_qc(), 9);
    let evidence = Evidence {
        first: net.vote(3, &end.b1),
        second: net.vote(3, &alt),
    };
    // (description, epoch length, what the height-3 block carries, validated?)
    let cases = [
        (
            "an empty suffix block is validated",
            EPOCH_LENGTH,
            SuffixContent::Empty,
            true,
        ),
        (
            "a suffix block with a transaction is refused",
            EPOCH_LENGTH,
            SuffixContent::Transaction,
            false,
        ),
        (
            "a suffix block with evidence is refused",
            EPOCH_LENGTH,
            SuffixContent::Evidence,
            false,
        ),
        (
            "below an epoch's end a block carries transactions",
            1_000_000,
            SuffixContent::Transaction,
            true,
        ),
        (
            "below an epoch's end a block carries evidence",
            1_000_000,
            SuffixContent::Evidence,
            true,
        ),
    ];
    let node = net.bystander(&[1, 2, 3]);
    for (desc, epoch_length, content, expected) in cases {
        let mut engine = Engine::new(
            Net::config_with(epoch_length),
            net.keys[node].clone(),
            net.validators.clone(),
            net.tip(),
            None,
        )
        .unwrap();
        engine.handle(0, Input::Start);
        EpochEnd::feed(&net, &mut engine, &[&end.b1, &end.b2]);
        let mut block = end.s3.clone();
        match content {
            SuffixContent::Empty => {}
            SuffixContent::Transaction => block.txs = vec![b"transfer".to_vec()],
            SuffixContent::Evidence => block.evidence = vec![evidence.clone()],
        }
        let out = message(
            &mut engine,
            at(3),
            ConsensusMessage::Proposal(net.propose(block.clone(), None)),
        );
        assert_eq!(validates(&out, &block.hash()), expected, "{desc}: {out:?}");
    }
}

#[test]
fn suffix_blocks_are_built_empty() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let alt = net.block(1, &net.genesis, net.genesis_qc(), 9);
    let evidence = Evidence {
        first: net.vote(3, &end.b1),
        second: net.vote(3, &alt),
    };
    // The leader of round 3 builds the block at height 3 once B2 (round 2) is certified.
    let node = net.leader(3);
    let cases = [
        ("above the epoch's end: empty", EPOCH_LENGTH, true),
        ("below the epoch's end: with evidence", 1_000_000, false),
    ];
    for (desc, epoch_length, empty) in cases {
        let mut engine = Engine::new(
            Net::config_with(epoch_length),
            net.keys[node].clone(),
            net.validators.clone(),
            net.tip(),
            None,
        )
        .unwrap();
        engine.handle(0, Input::Start);
        EpochEnd::feed(&net, &mut engine, &[&end.b1]);
        let out = message(
            &mut engine,
            at(1),
            ConsensusMessage::Evidence(evidence.clone()),
        );
        assert_eq!(reported(&out).len(), 1, "{desc}: evidence not taken");
        let mut out = EpochEnd::feed(&net, &mut engine, &[&end.b2]);
        for other in net.others(node) {
            out.extend(message(
                &mut engine,
                at(3),
                ConsensusMessage::Vote(net.vote(other, &end.b2)),
            ));
        }
        let req = build_request(&out).unwrap_or_else(|| panic!("{desc}: no build: {out:?}"));
        assert_eq!((req.height, req.round), (3, 3), "{desc}");
        assert_eq!(req.empty, empty, "{desc}");
        assert_eq!(req.evidence.is_empty(), empty, "{desc}: {:?}", req.evidence);
    }
}

#[test]
fn a_suffix_certificate_finalizes_the_epoch_end_and_asks_for_the_next_set() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    // Round 3 times out instead: S3' (round 4) extends B2 with the TC, S4' (round 5) extends
    // S3', and the QC of S4' (carried by S5', round 6) is a 2-chain over two suffix blocks.
    let tc3 = net.tc(
        3,
        &[
            (0, end.qc_b2.clone()),
            (1, end.qc_b2.clone()),
            (2, end.qc_b2.clone()),
        ],
    );
    let s3x = net.block(4, &end.b2, end.qc_b2.clone(), 13);
    let s4x = net.block(5, &s3x, net.qc(&s3x, &[0, 1, 2]), 14);
    let s5x = net.block(6, &s4x, net.qc(&s4x, &[0, 1, 2]), 15);
    let cases: [(&str, Vec<Proposal>); 2] = [
        (
            "the QC of S3 (in S4) commits B2, S3's parent",
            vec![
                net.propose(end.b1.clone(), None),
                net.propose(end.b2.clone(), None),
                net.propose(end.s3.clone(), None),
                net.propose(end.s4.clone(), None),
            ],
        ),
        (
            "the QC of S4' (in S5') commits B2 below S3', and not S3'",
            vec![
                net.propose(end.b1.clone(), None),
                net.propose(end.b2.clone(), None),
                net.propose(s3x.clone(), Some(tc3)),
                net.propose(s4x.clone(), None),
                net.propose(s5x.clone(), None),
            ],
        ),
    ];
    let node = net.bystander(&[1, 2]);
    for (desc, proposals) in cases {
        let mut engine = net.started_in_short_epochs(node);
        let mut all = Vec::new();
        let mut last = Vec::new();
        for p in &proposals {
            last = deliver(&mut engine, at(p.block.header.round), p);
            all.extend(last.clone());
        }
        assert_eq!(
            finalized(&all),
            vec![(end.b1.hash(), 1), (end.b2.hash(), 2)],
            "{desc}: only B1 and B2 are final, never a suffix block"
        );
        let fin = position(&last, |e| {
            matches!(e, Effect::Finalize { hash, qc, .. } if *hash == end.b2.hash() && *qc == end.qc_b2)
        })
        .unwrap_or_else(|| panic!("{desc}: B2 not finalized by the last proposal: {last:?}"));
        let need = need_set_position(&last, 1, 2)
            .unwrap_or_else(|| panic!("{desc}: no request for the next set: {last:?}"));
        assert!(
            fin < need,
            "{desc}: the set is asked for before B2 is final"
        );
        assert!(engine.awaiting_validator_set(), "{desc}");
        assert_eq!(engine.final_tip().hash, end.b2.hash(), "{desc}");

        // Until the set arrives, every other input is ignored.
        let round = engine.round();
        let waiting: Vec<(&str, Input)> = vec![
            ("start", Input::Start),
            ("round timer", Input::Timer(TimerKind::RoundTimeout)),
            ("propose timer", Input::Timer(TimerKind::Propose)),
            (
                "a vote",
                Input::Message {
                    from: Origin(1),
                    message: ConsensusMessage::Vote(net.vote(0, &end.s4)),
                },
            ),
            (
                "a timeout",
                Input::Message {
                    from: Origin(1),
                    message: ConsensusMessage::Timeout(net.timeout(0, round, end.qc_s3.clone())),
                },
            ),
            (
                "a proposal",
                Input::Message {
                    from: Origin(1),
                    message: ConsensusMessage::Proposal(net.propose(
                        net.block(round, &end.s4, net.qc(&end.s4, &[0, 1, 2]), 20),
                        None,
                    )),
                },
            ),
            ("synced blocks", Input::Synced(vec![end.s3.clone()])),
            (
                "a validation",
                Input::BlockValidated {
                    hash: end.s4.hash(),
                    valid: true,
                },
            ),
            (
                "the set of a later epoch",
                Input::NewEpoch {
                    epoch: 2,
                    validators: net.next_set(),
                },
            ),
        ];
        for (what, input) in waiting {
            let out = engine.handle(at(round) + 10 * TIMEOUT_MS, input);
            assert!(out.is_empty(), "{desc}: {what} while waiting: {out:?}");
            assert!(engine.awaiting_validator_set(), "{desc}: {what}");
            assert_eq!(
                (engine.epoch(), engine.round()),
                (0, round),
                "{desc}: {what}"
            );
        }
        let out = engine.handle(
            at(round),
            Input::NewEpoch {
                epoch: 1,
                validators: net.next_set(),
            },
        );
        assert!(!engine.awaiting_validator_set(), "{desc}");
        assert_eq!(
            (engine.epoch(), engine.round()),
            (1, epoch_1_round()),
            "{desc}: {out:?}"
        );
        assert_eq!(engine.validators(), &net.next_set(), "{desc}");
    }
}

#[test]
fn the_next_epoch_starts_from_the_epoch_end_and_its_certificate() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let set = net.next_set();
    let round = epoch_1_round();

    // The leader of the epoch's first round proposes on B2 with B2's certificate.
    let leader = net.index_of(&set.leader_in_turn(round).address);
    let (mut engine, mut out) = end.switched(&net, leader);
    assert!(build_request(&out).is_none(), "built before the block time");
    out.extend(engine.handle(at(5), Input::Timer(TimerKind::Propose)));
    let req = build_request(&out)
        .unwrap_or_else(|| panic!("the new leader does not build: {out:?}"))
        .clone();
    assert_eq!((req.round, req.epoch, req.height), (round, 1, 3));
    assert_eq!(req.parent_hash, end.b2.hash());
    assert_eq!(req.parent_qc, end.qc_b2);
    assert_eq!(req.validators_hash, set.hash());
    assert!(!req.empty, "the first block of an epoch is no suffix block");
    let out = engine.handle(at(5), Input::BlockBuilt(built(&req)));
    assert!(
        out.iter().any(|e| matches!(e,
            Effect::Broadcast(ConsensusMessage::Proposal(p)) if p.block.header.round == round)),
        "no proposal: {out:?}"
    );

    // A validator votes in that round for a block on B2 carrying B2's certificate, and for
    // nothing else.
    let voter = (0..VALIDATORS)
        .find(|i| *i != leader && net.index_of(&set.leader_in_turn(round + 1).address) != *i)
        .unwrap();
    let on_end = net.block_in(&set, 1, round, &end.b2, end.qc_b2.clone(), 30);
    let mut old_hash = on_end.clone();
    old_hash.header.validators_hash = net.validators.hash();
    let cases = [
        (
            "a block of the first round on B2 with B2's QC",
            on_end.clone(),
            true,
        ),
        (
            "a block of the second round on B2 without a TC",
            net.block_in(&set, 1, round + 1, &end.b2, end.qc_b2.clone(), 31),
            false,
        ),
        (
            "a block on the dropped suffix",
            net.block_in(&set, 1, round, &end.s3, net.qc(&end.s3, &[1, 2, 3]), 32),
            false,
        ),
        ("a block naming the old set", old_hash, false),
        (
            "a block with the old epoch in its header",
            {
                let mut b = on_end.clone();
                b.header.epoch = 0;
                b
            },
            false,
        ),
    ];
    for (desc, block, expected) in cases {
        let (mut engine, _) = end.switched(&net, voter);
        let out = deliver(&mut engine, at(5), &net.propose_as_proposer(block.clone()));
        let voted: Vec<&Vote> = votes(&out);
        if expected {
            assert_eq!(voted.len(), 1, "{desc}: {out:?}");
            assert_eq!(
                (voted[0].block_hash, voted[0].round),
                (block.hash(), round),
                "{desc}"
            );
            assert!(
                out.iter().any(|e| matches!(e,
                    Effect::SendTo { to, message: ConsensusMessage::Vote(_) }
                        if *to == set.leader_in_turn(round + 1).address)),
                "{desc}: the vote goes to the next leader of the new set"
            );
        } else {
            assert!(voted.is_empty(), "{desc}: {out:?}");
        }
    }
}

#[test]
fn validators_left_in_the_old_epoch_are_sent_the_epoch_proof() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let s5 = net.block(5, &end.s4, net.qc(&end.s4, &[0, 1, 2]), 5);
    let sender = net.bystander(&[5]);
    // (description, message of epoch 0, who sent it)
    let cases = [
        (
            "a vote",
            ConsensusMessage::Vote(net.vote(sender, &end.s4)),
            sender,
        ),
        (
            "a timeout",
            ConsensusMessage::Timeout(net.timeout(sender, 4, end.qc_s3.clone())),
            sender,
        ),
        (
            "a proposal",
            ConsensusMessage::Proposal(net.propose(s5.clone(), None)),
            net.leader(5),
        ),
    ];
    for (desc, msg, from) in cases {
        // Any validator but the sender: the engine never sends the proof to itself.
        let node = (0..VALIDATORS).find(|i| *i != from).unwrap();
        let (mut engine, switch) = end.switched(&net, node);
        assert!(
            !switch.iter().any(|e| matches!(e, Effect::SendTo { .. })),
            "{desc}"
        );
        let out = message(&mut engine, at(5), msg.clone());
        assert_eq!(
            out,
            vec![Effect::SendTo {
                to: net.keys[from].address(),
                message: ConsensusMessage::EpochProof(end.proof()),
            }],
            "{desc}"
        );
        // Once a round for each validator.
        let again = message(&mut engine, at(5), msg);
        assert!(again.is_empty(), "{desc}: sent twice: {again:?}");
    }
}

/// What an engine of epoch 0 holds when the proof arrives, in
/// `an_epoch_proof_finalizes_the_epoch_end`.
#[derive(Clone, Copy, Debug)]
enum Held {
    /// B1, B2 and S3, the proof's block.
    ThroughS3,
    /// B1 and B2: the proof's header stands for S3.
    ThroughEnd,
    /// B1 only: B2 must be synced first.
    BelowEnd,
}

#[test]
fn an_epoch_proof_finalizes_the_epoch_end() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let mut weak = end.proof();
    weak.qc = net.qc(&end.s3, &[0, 1]);
    let mut forged = end.proof();
    forged.qc.signatures[2].signature = forged_sig(&net, 2);
    // (description, held blocks, proof, final after it)
    let cases = [
        ("holding S3", Held::ThroughS3, end.proof(), true),
        ("holding B2", Held::ThroughEnd, end.proof(), true),
        (
            "missing B2: syncs it first",
            Held::BelowEnd,
            end.proof(),
            true,
        ),
        ("a proof without a quorum", Held::ThroughS3, weak, false),
        (
            "a proof with a forged signature",
            Held::ThroughS3,
            forged,
            false,
        ),
    ];
    let node = net.bystander(&[1, 2, 3]);
    for (desc, held, proof, expected) in cases {
        let mut engine = net.started_in_short_epochs(node);
        let blocks: &[&Block] = match held {
            Held::ThroughS3 => &[&end.b1, &end.b2, &end.s3],
            Held::ThroughEnd => &[&end.b1, &end.b2],
            Held::BelowEnd => &[&end.b1],
        };
        EpochEnd::feed(&net, &mut engine, blocks);
        let mut out = message(&mut engine, at(5), ConsensusMessage::EpochProof(proof));
        if let Held::BelowEnd = held {
            assert!(
                out.iter().any(|e| *e
                    == Effect::RequestSync {
                        qc: end.qc_b2.clone()
                    }),
                "{desc}: no sync of B2: {out:?}"
            );
            assert!(finalized(&out).is_empty(), "{desc}");
            out = engine.handle(at(5), Input::Synced(vec![end.b2.clone()]));
        }
        let ended = finalized(&out).contains(&(end.b2.hash(), 2));
        assert_eq!(ended, expected, "{desc}: {out:?}");
        assert_eq!(engine.awaiting_validator_set(), expected, "{desc}");
        if expected {
            assert!(need_set_position(&out, 1, 2).is_some(), "{desc}: {out:?}");
            assert_eq!(engine.final_tip().hash, end.b2.hash(), "{desc}");
        }
    }
}

/// A signature of validator `i` over something else.
fn forged_sig(net: &Net, i: usize) -> Signature {
    forged(&net.keys[i])
}

#[test]
fn a_later_epoch_is_entered_only_through_a_verified_epoch_proof() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let set = net.next_set();
    let round = epoch_1_round();
    // Epoch 1 went on without this validator: F (first round, on B2), G (second, on F).
    let f = net.block_in(&set, 1, round, &end.b2, end.qc_b2.clone(), 40);
    let qc_f = net.qc(&f, &[1, 2, 3]);
    let g = net.block_in(&set, 1, round + 1, &f, qc_f.clone(), 41);
    let node = net.bystander(&[1, 2]);
    let mut engine = net.started_in_short_epochs(node);
    EpochEnd::feed(&net, &mut engine, &[&end.b1, &end.b2, &end.s3]);
    let out = message(
        &mut engine,
        at(6),
        ConsensusMessage::Proposal(net.propose_as_proposer(g.clone())),
    );
    assert_eq!(
        out,
        vec![Effect::RequestSync { qc: qc_f.clone() }],
        "a later epoch's proposal asks for its parent"
    );
    // A peer's synced block of epoch 1 proves nothing by itself (its certificate is signed
    // by a set this node cannot know yet).
    let out = engine.handle(at(6), Input::Synced(vec![f.clone()]));
    assert!(finalized(&out).is_empty(), "{out:?}");
    assert!(!engine.awaiting_validator_set());
    // A forged proof (certificate of S3 without a quorum) is refused.
    let mut forged = end.proof();
    forged.qc.signatures.truncate(1);
    let out = message(&mut engine, at(7), ConsensusMessage::EpochProof(forged));
    assert!(finalized(&out).is_empty(), "{out:?}");
    // A proof whose headers do not link to the certified block is refused.
    let mut unlinked = end.proof();
    unlinked.headers[0].timestamp_ms += 1;
    let out = message(&mut engine, at(7), ConsensusMessage::EpochProof(unlinked));
    assert!(finalized(&out).is_empty(), "{out:?}");
    // The real proof (which sync answers carry) ends the epoch.
    let out = message(
        &mut engine,
        at(7),
        ConsensusMessage::EpochProof(end.proof()),
    );
    assert!(finalized(&out).contains(&(end.b2.hash(), 2)), "{out:?}");
    assert!(need_set_position(&out, 1, 2).is_some(), "{out:?}");
    assert!(engine.awaiting_validator_set());
}

#[test]
fn synced_blocks_with_forged_certificates_are_not_taken() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let node = net.bystander(&[1, 2]);
    let mut engine = net.started_in_short_epochs(node);
    // B2 arrives by sync carrying a certificate of B1 with one signature: no quorum.
    let mut b2 = end.b2.clone();
    b2.header.parent_qc.signatures.truncate(1);
    let out = engine.handle(at(3), Input::Synced(vec![end.b1.clone(), b2]));
    assert!(finalized(&out).is_empty(), "{out:?}");
    assert!(
        !out.iter()
            .any(|e| matches!(e, Effect::Certified { height: 1, .. })),
        "a forged certificate certified B1: {out:?}"
    );
    // With the real certificates, the same blocks are taken.
    let out = engine.handle(at(3), Input::Synced(vec![end.b1.clone(), end.b2.clone()]));
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::Certified { height: 1, .. })),
        "{out:?}"
    );
}

#[test]
fn a_proposal_of_the_next_epoch_received_early_is_judged_after_the_switch() {
    let net = Net::new();
    let end = EpochEnd::new(&net);
    let set = net.next_set();
    let f = net.block_in(&set, 1, epoch_1_round(), &end.b2, end.qc_b2.clone(), 40);
    let node = net.bystander(&[1, 2]);
    let mut engine = net.started_in_short_epochs(node);
    EpochEnd::feed(&net, &mut engine, &[&end.b1, &end.b2, &end.s3]);
    // F (epoch 1) arrives before this validator knows epoch 0 ended.
    let out = message(
        &mut engine,
        at(6),
        ConsensusMessage::Proposal(net.propose_as_proposer(f.clone())),
    );
    assert!(
        !out.iter().any(|e| matches!(e, Effect::ValidateBlock(_))),
        "{out:?}"
    );
    let out = message(
        &mut engine,
        at(7),
        ConsensusMessage::EpochProof(end.proof()),
    );
    assert!(need_set_position(&out, 1, 2).is_some(), "{out:?}");
    let out = engine.handle(
        at(7),
        Input::NewEpoch {
            epoch: 1,
            validators: set,
        },
    );
    assert!(
        out.iter()
            .any(|e| matches!(e, Effect::ValidateBlock(b) if b.hash() == f.hash())),
        "the early proposal was dropped: {out:?}"
    );
}

/// Leader reputation weighs each validator by stake times 1000 if it proposed or voted in
/// the window and did not fail as leader since it last proposed, 10 if it did neither, 1 if
/// its latest round as leader failed (listed in a header's `failed_proposers`).
#[test]
fn leader_reputation_weighs_proposers_voters_and_failed_leaders() {
    let net = Net::new();
    let failed = net.keys[3].address();
    let present: Vec<Address> = (0..3).map(|i| net.keys[i].address()).collect();
    // Final headers of rounds 1..=10 and 12, proposed and certified by 0, 1, 2; validator 3
    // led round 11, which failed: the header of round 12 lists it.
    let header = |r: u64, signers: &[Address], failed_proposers: Vec<Address>| Header {
        chain_id: CHAIN.into(),
        height: r,
        round: r,
        proposer: present[(r % 3) as usize],
        parent_qc: QuorumCertificate {
            signatures: signers
                .iter()
                .map(|a| keel_types::VoteSignature {
                    validator: *a,
                    signature: keel_types::Signature([0; 64]),
                })
                .collect(),
            ..QuorumCertificate::default()
        },
        failed_proposers,
        ..Header::default()
    };
    let mut headers: Vec<Header> = (1..=10).map(|r| header(r, &present, vec![])).collect();
    headers.push(header(12, &present, vec![failed]));
    let rounds = 20..3020u64;
    let led = |engine: &Engine, who: Address| {
        rounds
            .clone()
            .filter(|r| engine.leader_of(*r) == who)
            .count()
    };

    // The weight of each validator in the round just after the window's newest block
    // (round 12 read from round 17), and how often the failed one would lead over 3000
    // rounds drawn with those weights.
    let weight_of = |engine: &Engine, round: u64, who: Address| {
        let weights = engine.leader_weights(round).expect("a reputation draw");
        weights.iter().find(|(a, _)| *a == who).unwrap().1
    };
    let drawn = |engine: &Engine, round: u64, who: Address| {
        let weights: Vec<u64> = engine
            .leader_weights(round)
            .unwrap()
            .iter()
            .map(|w| w.1)
            .collect();
        let set = engine.validators();
        rounds
            .clone()
            .filter(|r| set.leader_weighted(*r, &weights).address == who)
            .count()
    };

    let fresh = net.engine(0, None);
    assert!(led(&fresh, failed) > 500, "without history, by stake");
    assert_eq!(fresh.leader_weights(40), None, "in turn");
    let mut engine = net.engine(0, None);
    engine.restore_history(&headers);
    assert_eq!(weight_of(&engine, 17, failed), 1);
    assert!(present.iter().all(|a| weight_of(&engine, 17, *a) == 1000));
    let n = drawn(&engine, 17, failed);
    assert!(
        n <= 5,
        "a failed leader is drawn about once in 3000 rounds, here {n}"
    );
    // Without the failure it only neither proposed nor voted: inactive, drawn now and then.
    let mut quiet = net.engine(0, None);
    quiet.restore_history(&headers[..10]);
    assert_eq!(weight_of(&quiet, 15, failed), 10);
    let n = drawn(&quiet, 15, failed);
    assert!(
        (1..=30).contains(&n),
        "an inactive validator leads about 1 round in 300, here {n}"
    );
    // Once it proposes again after its failure it is active again.
    let mut back = headers.clone();
    back.push(Header {
        proposer: failed,
        ..header(13, &present, vec![])
    });
    let mut recovered = net.engine(0, None);
    recovered.restore_history(&back);
    assert_eq!(weight_of(&recovered, 18, failed), 1000);
    assert!(drawn(&recovered, 18, failed) > 500);
    // Rounds whose window holds fewer than three final blocks (round 7 looks at rounds up
    // to 2) fall back to the validators in turn, like a fresh engine.
    assert_eq!(engine.leader_of(7), fresh.leader_of(7));
    assert!((8..20).any(|r| engine.leader_of(r) != fresh.leader_of(r)));
}

/// Reputation reads final blocks, so it cannot change while nothing becomes final. When the
/// newest final block it reads is 12 or more rounds below the round, leaders are drawn by
/// stake alone: a stale window must not keep naming the one validator it still rates (seed
/// 5242: a byzantine validator left as the only one weighing 1000 stalled an epoch).
#[test]
fn a_stale_reputation_gives_way_to_stake() {
    let net = Net::new();
    let addr = |i: usize| net.keys[i].address();
    // Rounds 1..=10 proposed by validator 0 alone and certified by it alone (as headers:
    // reputation reads, it does not check); validators 1 and 2 failed as leaders (rounds 3
    // and 6); validator 3 took no part.
    let header = |r: u64, failed: Vec<Address>| Header {
        chain_id: CHAIN.into(),
        height: r,
        round: r,
        proposer: addr(0),
        parent_qc: QuorumCertificate {
            signatures: vec![keel_types::VoteSignature {
                validator: addr(0),
                signature: keel_types::Signature([0; 64]),
            }],
            ..QuorumCertificate::default()
        },
        failed_proposers: failed,
        ..Header::default()
    };
    let headers: Vec<Header> = (1..=10)
        .map(|r| match r {
            4 => header(r, vec![addr(1)]),
            7 => header(r, vec![addr(2)]),
            _ => header(r, vec![]),
        })
        .collect();
    let mut engine = net.engine(0, None);
    engine.restore_history(&headers);
    let weight_in = |engine: &Engine, round: u64, i: usize| {
        engine
            .leader_weights(round)
            .unwrap()
            .iter()
            .find(|(a, _)| *a == addr(i))
            .unwrap()
            .1
    };
    let weight = |round: u64, i: usize| weight_in(&engine, round, i);
    // Rounds 15 to 21 read the window: validator 0 leads nearly all of them.
    for round in 15..=21 {
        assert_eq!(
            [
                weight(round, 0),
                weight(round, 1),
                weight(round, 2),
                weight(round, 3)
            ],
            [1000, 1, 1, 10],
            "round {round}"
        );
    }
    // From round 22 (12 above the newest final block) by stake alone: everyone leads.
    for round in [22, 100, 5_000] {
        assert!((0..4).all(|i| weight(round, i) == 1), "round {round}");
    }
    for i in 0..4 {
        let led = (22..3022u64)
            .filter(|r| engine.leader_of(*r) == addr(i))
            .count();
        assert!(led > 500, "validator {i} led {led} of 3000 stale rounds");
    }
    // One more final block and the window is fresh again.
    let mut fresh = headers.clone();
    fresh.push(header(30, vec![]));
    engine.restore_history(&fresh[10..]);
    assert_eq!(weight_in(&engine, 35, 1), 1);
    assert_eq!(weight_in(&engine, 35, 0), 1000);
    assert_eq!(
        weight_in(&engine, 42, 0),
        1,
        "12 above round 30: stake alone"
    );
}

/// A validator that forms a TC hands it to the next leader (its own timeout of the round,
/// carrying the TC): a next leader that missed one timeout could not form it and would
/// learn it only from the next round's timeouts, a whole timeout later.
#[test]
fn a_new_tc_goes_to_the_next_leader() {
    let net = Net::new();
    let forwarded = |effects: &[Effect]| -> Vec<(Address, Timeout)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::SendTo {
                    to,
                    message: ConsensusMessage::Timeout(t),
                } => Some((*to, t.clone())),
                _ => None,
            })
            .collect()
    };
    let node = net.bystander(&[1, 2]);
    let others = net.others(node);
    let mut engine = net.started(node);
    let mut out = engine.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout));
    assert!(forwarded(&out).is_empty(), "no TC yet: {out:?}");
    for i in &others[..2] {
        out = message(
            &mut engine,
            TIMEOUT_MS,
            ConsensusMessage::Timeout(net.timeout(*i, 1, net.genesis_qc())),
        );
    }
    assert_eq!(engine.round(), 2);
    let sent = forwarded(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    let (to, timeout) = &sent[0];
    assert_eq!(*to, net.keys[net.leader(2)].address());
    assert_eq!(
        (timeout.round, timeout.voter),
        (1, net.keys[node].address())
    );
    let tc = timeout.last_tc.as_ref().expect("the TC rides along");
    assert_eq!(tc.round, 1);
    // The next leader, which had only two of the timeouts, enters round 2 from it.
    let leader = net.leader(2);
    let mut next = net.started(leader);
    next.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout));
    message(
        &mut next,
        TIMEOUT_MS,
        ConsensusMessage::Timeout(net.timeout(others[0], 1, net.genesis_qc())),
    );
    assert_eq!(next.round(), 1);
    message(
        &mut next,
        TIMEOUT_MS,
        ConsensusMessage::Timeout(timeout.clone()),
    );
    assert_eq!(next.round(), 2);
    // The next leader itself forms the TC: nothing to send.
    let mut own = net.started(leader);
    let mut out = own.handle(TIMEOUT_MS, Input::Timer(TimerKind::RoundTimeout));
    for i in net.others(leader).iter().take(2) {
        out.extend(message(
            &mut own,
            TIMEOUT_MS,
            ConsensusMessage::Timeout(net.timeout(*i, 1, net.genesis_qc())),
        ));
    }
    assert_eq!(own.round(), 2);
    assert!(forwarded(&out).is_empty(), "{out:?}");
}

/// A proposal whose validation was asked for is taken when the answer comes, even if the
/// validator moved past its round meanwhile: the host keeps what it validated and would not
/// fetch it again, so a block the others then certify would be missing here.
#[test]
fn a_block_validated_after_its_round_passed_is_kept() {
    let net = Net::new();
    let node = net.bystander(&[1, 2, 3]);
    let mut engine = net.started(node);
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let out = message(
        &mut engine,
        at(1),
        ConsensusMessage::Proposal(net.propose(b1.clone(), None)),
    );
    assert!(validates(&out, &b1.hash()), "{out:?}");
    // Before the answer, TCs of rounds 1 and 2 move the validator to round 3.
    let parts: Vec<(usize, QuorumCertificate)> = net
        .others(node)
        .into_iter()
        .map(|i| (i, net.genesis_qc()))
        .collect();
    let mut t = net.timeout(parts[0].0, 2, net.genesis_qc());
    t.last_tc = Some(net.tc(2, &parts));
    message(&mut engine, at(2), ConsensusMessage::Timeout(t));
    assert_eq!(engine.round(), 3);
    engine.handle(
        at(2),
        Input::BlockValidated {
            hash: b1.hash(),
            valid: true,
        },
    );
    // The proposal of round 3 builds on B1: B1 is held, so it is validated, not synced.
    let qc_b1 = net.qc(&b1, &[0, 1, 2, 3]);
    let b3 = net.block(3, &b1, qc_b1, 3);
    let out = message(
        &mut engine,
        at(3),
        ConsensusMessage::Proposal(net.propose(b3.clone(), Some(net.tc(2, &parts)))),
    );
    assert!(
        !out.iter().any(|e| matches!(e, Effect::RequestSync { .. })),
        "B1 was dropped: {out:?}"
    );
    assert!(validates(&out, &b3.hash()), "{out:?}");
}

/// The leader after next collects the votes too; when it forms the certificate, it hands the
/// votes to the next leader, which may be alive but short of one vote lost on the way: that
/// leader then certifies and proposes on time instead of a timeout later (seed 7938: one
/// silent validator of six, 3% loss, certified rounds alternating with failed ones).
#[test]
fn the_leader_after_next_hands_its_votes_to_the_next_leader() {
    let net = Net::new();
    let (next, after) = (net.leader(2), net.leader(3));
    assert_ne!(next, after, "fixture assumption");
    let b1 = net.block(1, &net.genesis, net.genesis_qc(), 1);
    let mut engine = net.started(after);
    engine.handle(at(1), Input::Synced(vec![b1.clone()]));
    let voters: Vec<usize> = net.others(next);
    let mut effects = Vec::new();
    for i in &voters {
        effects.extend(message(
            &mut engine,
            at(1),
            ConsensusMessage::Vote(net.vote(*i, &b1)),
        ));
    }
    assert!(certified(&effects, &b1.hash()), "{effects:?}");
    let handed: Vec<Vote> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::SendTo {
                to,
                message: ConsensusMessage::Vote(v),
            } if *to == net.keys[next].address() => Some(v.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(handed.len(), voters.len(), "{effects:?}");
    assert!(handed
        .iter()
        .all(|v| v.block_hash == b1.hash() && v.round == 1));

    // The next leader got only one of the votes: the handed ones complete its quorum.
    let mut leader = net.started(next);
    leader.handle(at(1), Input::Synced(vec![b1.clone()]));
    let first = message(
        &mut leader,
        at(1),
        ConsensusMessage::Vote(net.vote(voters[0], &b1)),
    );
    assert!(!certified(&first, &b1.hash()));
    let mut effects = Vec::new();
    for v in handed {
        effects.extend(message(&mut leader, at(1), ConsensusMessage::Vote(v)));
    }
    assert!(certified(&effects, &b1.hash()), "{effects:?}");
    assert_eq!(leader.round(), 2);

    // The next leader itself, forming the certificate, hands nothing on.
    let mut effects = Vec::new();
    let mut own = net.started(next);
    own.handle(at(1), Input::Synced(vec![b1.clone()]));
    for i in net.others(after) {
        effects.extend(message(
            &mut own,
            at(1),
            ConsensusMessage::Vote(net.vote(i, &b1)),
        ));
    }
    assert!(certified(&effects, &b1.hash()), "{effects:?}");
    assert!(
        !effects.iter().any(|e| matches!(
            e,
            Effect::SendTo {
                message: ConsensusMessage::Vote(_),
                ..
            }
        )),
        "{effects:?}"
    );
}
