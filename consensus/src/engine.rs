//! The consensus engine: inputs in, effects out.

use keel_types::{Address, Hash, Keypair, QuorumCertificate, Vote, VoteSignature};

use crate::{Error, Result, ValidatorSet};

/// Consensus timing and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Chain id, bound into every vote signature.
    pub chain_id: String,
    /// Time between a block and its child.
    pub block_time_ms: u64,
    /// Round timeout.
    pub timeout_ms: u64,
}

/// The highest certified block the node has stored: where consensus continues from.
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
/// against its lock.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SafetyData {
    /// Highest round this validator voted in.
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

/// Timers the engine asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// Time to propose the next block.
    Propose,
}

/// Everything that can happen to consensus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The node is up; consensus may schedule its first timer.
    Start,
    /// A timer set by [`Effect::SetTimer`] fired.
    Timer(TimerKind),
    /// The node built and executed the block asked for by [`Effect::BuildBlock`].
    BlockBuilt {
        /// Its height.
        height: u64,
        /// Its round.
        round: u64,
        /// Its header hash.
        hash: Hash,
    },
    /// Building that block failed (e.g. a storage error); the engine retries later.
    BuildFailed {
        /// Its height.
        height: u64,
        /// Its round.
        round: u64,
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
    /// Build a block on `parent_hash` from the mempool, execute it, and answer with
    /// [`Input::BlockBuilt`] (or [`Input::BuildFailed`]). Nothing is stored yet.
    BuildBlock {
        /// Height of the new block.
        height: u64,
        /// Its round.
        round: u64,
        /// Its epoch.
        epoch: u64,
        /// The parent it extends.
        parent_hash: Hash,
        /// The parent's certificate, to put in the header.
        parent_qc: QuorumCertificate,
        /// Header timestamp.
        timestamp_ms: u64,
        /// Proposer address for the header.
        proposer: Address,
    },
    /// Make this safety data durable (fsync) before carrying out the effects after it.
    PersistSafety(SafetyData),
    /// The block is certified: store it atomically with its certificate.
    Commit {
        /// Its height.
        height: u64,
        /// Its round.
        round: u64,
        /// Its hash.
        hash: Hash,
        /// Its certificate.
        qc: QuorumCertificate,
    },
    /// This block, and every ancestor, is final.
    Finalize {
        /// Its height.
        height: u64,
        /// Its hash.
        hash: Hash,
    },
}

/// The consensus state machine.
pub struct Engine {
    config: Config,
    key: Keypair,
    validators: ValidatorSet,
    safety: SafetyData,
    tip: Tip,
    epoch: u64,
    building: Option<(u64, u64)>,
    started: bool,
}

impl Engine {
    /// An engine continuing from `tip` with persisted `safety` data (None on first start).
    ///
    /// Refuses a validator set in which this node's own vote is not a quorum: those need the
    /// multi-validator protocol.
    pub fn new(
        config: Config,
        key: Keypair,
        validators: ValidatorSet,
        epoch: u64,
        tip: Tip,
        safety: Option<SafetyData>,
    ) -> Result<Engine> {
        let me = validators
            .get(&key.address())
            .ok_or(Error::NotAValidator(key.address()))?;
        if !validators.is_quorum(me.stake) {
            return Err(Error::InvalidValidatorSet(format!(
                "{} validators where this node holds {} of {} stake: multi-validator consensus is not \
                 available in this build",
                validators.len(),
                me.stake,
                validators.total_stake()
            )));
        }
        let safety = safety.unwrap_or_else(|| SafetyData {
            last_voted_round: tip.round,
            highest_qc: tip.qc.clone(),
        });
        Ok(Engine {
            config,
            key,
            validators,
            safety,
            tip,
            epoch,
            building: None,
            started: false,
        })
    }

    /// The block consensus continues from.
    pub fn tip(&self) -> &Tip {
        &self.tip
    }

    /// The current safety data.
    pub fn safety(&self) -> &SafetyData {
        &self.safety
    }

    /// The validator set in use.
    pub fn validators(&self) -> &ValidatorSet {
        &self.validators
    }

    /// Handles one input at time `now_ms`.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Effect> {
        match input {
            Input::Start => {
                if self.started {
                    return Vec::new();
                }
                self.started = true;
                vec![self.propose_timer(now_ms)]
            }
            Input::Timer(TimerKind::Propose) => self.on_propose_timer(now_ms),
            Input::BlockBuilt {
                height,
                round,
                hash,
            } => self.on_block_built(now_ms, height, round, hash),
            Input::BuildFailed { height, round } => {
                if self.building != Some((height, round)) {
                    return Vec::new();
                }
                self.building = None;
                let retry = self.config.block_time_ms.clamp(1, 1000);
                vec![Effect::SetTimer {
                    kind: TimerKind::Propose,
                    at_ms: now_ms.saturating_add(retry),
                }]
            }
        }
    }

    fn propose_timer(&self, now_ms: u64) -> Effect {
        let at_ms = self
            .tip
            .timestamp_ms
            .saturating_add(self.config.block_time_ms)
            .max(now_ms);
        Effect::SetTimer {
            kind: TimerKind::Propose,
            at_ms,
        }
    }

    fn on_propose_timer(&mut self, now_ms: u64) -> Vec<Effect> {
        if self.building.is_some() {
            return Vec::new();
        }
        let round = self
            .safety
            .last_voted_round
            .max(self.tip.round)
            .saturating_add(1);
        let height = self.tip.height.saturating_add(1);
        let leader = self.validators.leader(round).address;
        if leader != self.key.address() {
            // With a self-quorum the schedule may still name another validator; it cannot
            // certify anything without us, so the round passes to us on the next tick.
            self.safety.last_voted_round = round;
            return vec![
                Effect::PersistSafety(self.safety.clone()),
                Effect::SetTimer {
                    kind: TimerKind::Propose,
                    at_ms: now_ms.saturating_add(1),
                },
            ];
        }
        self.building = Some((height, round));
        vec![Effect::BuildBlock {
            height,
            round,
            epoch: self.epoch,
            parent_hash: self.tip.hash,
            parent_qc: self.tip.qc.clone(),
            timestamp_ms: now_ms.max(self.tip.timestamp_ms.saturating_add(1)),
            proposer: self.key.address(),
        }]
    }

    fn on_block_built(&mut self, now_ms: u64, height: u64, round: u64, hash: Hash) -> Vec<Effect> {
        if self.building != Some((height, round)) || round <= self.safety.last_voted_round {
            // Not what we asked for, or a round we already voted in: never vote twice.
            return Vec::new();
        }
        self.building = None;
        let vote = Vote::sign(&self.key, &self.config.chain_id, hash, height, round);
        let qc = QuorumCertificate {
            block_hash: hash,
            height,
            round,
            signatures: vec![VoteSignature {
                validator: vote.voter,
                signature: vote.signature,
            }],
        };
        self.safety = SafetyData {
            last_voted_round: round,
            highest_qc: qc.clone(),
        };
        let mut effects = vec![
            Effect::PersistSafety(self.safety.clone()),
            Effect::Commit {
                height,
                round,
                hash,
                qc: qc.clone(),
            },
        ];
        // 2-chain rule: the parent is final once its direct child (next round) is certified.
        if self.tip.height > 0 && self.tip.round.saturating_add(1) == round {
            effects.push(Effect::Finalize {
                height: self.tip.height,
                hash: self.tip.hash,
            });
        }
        self.tip = Tip {
            height,
            hash,
            round,
            timestamp_ms: now_ms,
            qc,
        };
        effects.push(self.propose_timer(now_ms));
        effects
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::Validator;

    fn engine(stakes: &[u64]) -> Engine {
        let keys: Vec<Keypair> = (0..stakes.len() as u64).map(Keypair::from_seed).collect();
        let set = ValidatorSet::new(
            keys.iter()
                .zip(stakes)
                .map(|(k, s)| Validator {
                    address: k.address(),
                    public_key: k.public(),
                    stake: *s,
                })
                .collect(),
        )
        .unwrap();
        let genesis = Hash::digest(b"genesis");
        let tip = Tip {
            height: 0,
            hash: genesis,
            round: 0,
            timestamp_ms: 1_000,
            qc: QuorumCertificate::genesis(genesis),
        };
        let cfg = Config {
            chain_id: "test".into(),
            block_time_ms: 3000,
            timeout_ms: 6000,
        };
        Engine::new(cfg, keys[0].clone(), set, 0, tip, None).unwrap()
    }

    fn built(effects: &[Effect]) -> (u64, u64, u64) {
        match effects.first() {
            Some(Effect::BuildBlock {
                height,
                round,
                timestamp_ms,
                ..
            }) => (*height, *round, *timestamp_ms),
            other => panic!("expected BuildBlock, got {other:?}"),
        }
    }

    #[test]
    fn start_schedules_a_proposal_one_block_time_after_the_tip() {
        let mut e = engine(&[10]);
        assert_eq!(
            e.handle(1_500, Input::Start),
            vec![Effect::SetTimer {
                kind: TimerKind::Propose,
                at_ms: 4_000
            }]
        );
        assert!(e.handle(1_600, Input::Start).is_empty());
    }

    #[test]
    fn built_block_is_persisted_then_committed_and_parent_finalized() {
        let mut e = engine(&[10]);
        let (h, r, _) = built(&e.handle(4_000, Input::Timer(TimerKind::Propose)));
        assert_eq!((h, r), (1, 1));
        let b1 = Hash::digest(b"b1");
        let fx = e.handle(
            4_010,
            Input::BlockBuilt {
                height: 1,
                round: 1,
                hash: b1,
            },
        );
        assert!(matches!(
            fx[0],
            Effect::PersistSafety(SafetyData {
                last_voted_round: 1,
                ..
            })
        ));
        assert!(
            matches!(&fx[1], Effect::Commit { height: 1, hash, qc, .. } if *hash == b1 && qc.signatures.len() == 1)
        );
        assert!(
            !fx.iter().any(|f| matches!(f, Effect::Finalize { .. })),
            "genesis needs no finalize"
        );
        assert_eq!(
            fx.last(),
            Some(&Effect::SetTimer {
                kind: TimerKind::Propose,
                at_ms: 7_010
            })
        );

        let (h, r, _) = built(&e.handle(7_010, Input::Timer(TimerKind::Propose)));
        assert_eq!((h, r), (2, 2));
        let fx = e.handle(
            7_020,
            Input::BlockBuilt {
                height: 2,
                round: 2,
                hash: Hash::digest(b"b2"),
            },
        );
        assert!(fx.contains(&Effect::Finalize {
            height: 1,
            hash: b1
        }));
    }

    #[test]
    fn never_votes_twice_in_a_round() {
        let mut e = engine(&[10]);
        built(&e.handle(4_000, Input::Timer(TimerKind::Propose)));
        assert!(!e
            .handle(
                4_001,
                Input::BlockBuilt {
                    height: 1,
                    round: 1,
                    hash: Hash::digest(b"a")
                }
            )
            .is_empty());
        assert!(e
            .handle(
                4_002,
                Input::BlockBuilt {
                    height: 1,
                    round: 1,
                    hash: Hash::digest(b"b")
                }
            )
            .is_empty());
    }

    #[test]
    fn restart_continues_above_the_persisted_round() {
        let mut e = engine(&[10]);
        let safety = SafetyData {
            last_voted_round: 7,
            highest_qc: e.tip().qc.clone(),
        };
        e.safety = safety;
        let (h, r, _) = built(&e.handle(4_000, Input::Timer(TimerKind::Propose)));
        assert_eq!((h, r), (1, 8));
    }

    #[test]
    fn build_failure_retries_later() {
        let mut e = engine(&[10]);
        built(&e.handle(4_000, Input::Timer(TimerKind::Propose)));
        let fx = e.handle(
            4_100,
            Input::BuildFailed {
                height: 1,
                round: 1,
            },
        );
        assert_eq!(
            fx,
            vec![Effect::SetTimer {
                kind: TimerKind::Propose,
                at_ms: 5_100
            }]
        );
        built(&e.handle(5_100, Input::Timer(TimerKind::Propose)));
    }

    #[test]
    fn a_set_where_we_are_not_a_quorum_is_refused() {
        let keys: Vec<Keypair> = (0..2).map(Keypair::from_seed).collect();
        let set = ValidatorSet::new(
            keys.iter()
                .map(|k| Validator {
                    address: k.address(),
                    public_key: k.public(),
                    stake: 5,
                })
                .collect(),
        )
        .unwrap();
        let tip = Tip {
            height: 0,
            hash: Hash::ZERO,
            round: 0,
            timestamp_ms: 0,
            qc: QuorumCertificate::genesis(Hash::ZERO),
        };
        let cfg = Config {
            chain_id: "t".into(),
            block_time_ms: 10,
            timeout_ms: 20,
        };
        assert!(Engine::new(cfg, keys[0].clone(), set, 0, tip, None).is_err());
    }

    #[test]
    fn safety_data_round_trips() {
        let s = SafetyData {
            last_voted_round: 42,
            highest_qc: QuorumCertificate::genesis(Hash([3; 32])),
        };
        assert_eq!(SafetyData::decode(&s.encode()).unwrap(), s);
        assert!(SafetyData::decode(&[1, 2]).is_err());
    }
}
