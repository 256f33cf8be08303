//! The deterministic simulation kit both of keel's simulations run on: the consensus
//! simulation (the engine with a toy application, `consensus/tests/simulation.rs`) and the
//! node simulation (the real boot path, consensus host, ledger and mempool over `MemStore`,
//! `tests/tests/node_simulation.rs`).
//!
//! It holds what does not depend on what is simulated:
//! - [`World`]: virtual time, the seeded RNG and the event queue (events at one instant run
//!   in the order they were scheduled), merged with the nodes' timers by [`World::next`];
//! - [`Faults`]: the network model (latency with jitter, loss, a partition that heals) and a
//!   crash/restart plan, which decide whether and when a message arrives ([`World::transit`]);
//! - [`seeds`] and [`run_seeds`]: `SIM_SEED=<n>` replays one seed, `SIM_SEEDS=<n>` runs seeds
//!   `0..n` (`SIM_FROM=<k>`: `k..n`), `SIM_KEEP_GOING=1` runs them all and lists the failing ones; a failure prints the
//!   seed that reproduces it;
//! - [`check`]: invariants shared by both simulations.
//!
//! Invariant: everything is a function of the seed. No wall clock, no thread, no global RNG,
//! no iteration over a hash map whose order could leak into a decision: the same seed gives
//! the same trace.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A network split: during `[start, end)`, nodes in `side` and the others cannot reach each
/// other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// When it starts (virtual ms).
    pub start: u64,
    /// When it heals.
    pub end: u64,
    /// The nodes on one side.
    pub side: Vec<usize>,
}

/// A node that stops at `at` and restarts at `back` (on the same store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crash {
    /// When it stops.
    pub at: u64,
    /// When it restarts.
    pub back: u64,
    /// Which node.
    pub node: usize,
}

impl Crash {
    /// A crash of a random one of `nodes` at a time drawn in `at`, back 1 to 20 s later.
    pub fn draw(rng: &mut impl Rng, nodes: usize, at: std::ops::Range<u64>) -> Crash {
        let at = rng.gen_range(at);
        Crash {
            at,
            back: at + rng.gen_range(1_000..20_000),
            node: rng.gen_range(0..nodes),
        }
    }
}

/// A link drawn for a random run: latency from 5 ms to an upper bound drawn in 20..300 ms,
/// and, half the time, a loss rate below 5% (else none).
pub fn draw_link(rng: &mut impl Rng) -> ((u64, u64), f64) {
    let latency_ms = (5, rng.gen_range(20..300));
    let loss = if rng.gen_bool(0.5) {
        rng.gen_range(0.0..0.05)
    } else {
        0.0
    };
    (latency_ms, loss)
}

/// The fault model of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Faults {
    /// Delivery delay of one message, drawn uniformly in `[lo, hi]` ms.
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost.
    pub loss: f64,
    /// A partition that heals.
    pub partition: Option<Partition>,
    /// A crash and restart.
    pub crash: Option<Crash>,
}

impl Faults {
    /// A network with `latency_ms`, no loss and no fault.
    pub fn calm(latency_ms: (u64, u64)) -> Faults {
        Faults {
            latency_ms,
            loss: 0.0,
            partition: None,
            crash: None,
        }
    }

    /// When the network is whole and every node is up again.
    pub fn healed_at(&self) -> u64 {
        let split = self.partition.as_ref().map_or(0, |p| p.end);
        split.max(self.crash.map_or(0, |c| c.back))
    }

    /// Whether the partition separates `a` and `b` at `now`.
    pub fn split(&self, now: u64, a: usize, b: usize) -> bool {
        self.partition.as_ref().is_some_and(|p| {
            now >= p.start && now < p.end && p.side.contains(&a) != p.side.contains(&b)
        })
    }
}

/// What comes next in a run.
#[derive(Debug)]
pub enum Next<E> {
    /// A node's earliest timer is due (the clock is at it).
    Timer {
        /// The node.
        node: usize,
    },
    /// A scheduled event (the clock is at its time).
    Event(E),
    /// Nothing left before the end of the run.
    End,
}

/// Virtual time, the seeded RNG, the event queue and the fault model of one run.
pub struct World<E> {
    seed: u64,
    /// The run's RNG: every random decision of the simulation draws from it, in order.
    pub rng: ChaCha8Rng,
    /// The fault model.
    pub faults: Faults,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, E>,
}

impl<E> World<E> {
    /// A world at time 0 whose RNG is seeded with `seed`.
    pub fn new(seed: u64, faults: Faults) -> World<E> {
        World {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            faults,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The virtual time, in ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Schedules `event` at `at` (after the events already scheduled at that instant).
    pub fn schedule(&mut self, at: u64, event: E) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// Schedules `event` after `delay` ms.
    pub fn schedule_in(&mut self, delay: u64, event: E) {
        self.schedule(self.now.saturating_add(delay), event);
    }

    /// One message delay.
    pub fn latency(&mut self) -> u64 {
        let (lo, hi) = self.faults.latency_ms;
        self.rng.gen_range(lo..=hi)
    }

    /// Whether a message from `from` to `to` sent now arrives, and after how long: `None` if
    /// they are the same node, split by the partition, or the message is lost.
    pub fn transit(&mut self, from: usize, to: usize) -> Option<u64> {
        if from == to || self.faults.split(self.now, from, to) {
            return None;
        }
        if self.rng.gen_bool(self.faults.loss) {
            return None;
        }
        Some(self.latency())
    }

    /// The next thing to handle before `end`, given the nodes' earliest timer (time, node):
    /// a timer runs before events scheduled at the same instant. Moves the clock to it.
    pub fn next(&mut self, next_timer: Option<(u64, usize)>, end: u64) -> Next<E> {
        loop {
            let next_event = self.queue.peek().map(|Reverse((at, _))| *at);
            let take_timer = match (next_timer, next_event) {
                (Some((t, _)), Some(e)) => t <= e,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return Next::End,
            };
            if take_timer {
                let Some((at, node)) = next_timer else {
                    return Next::End;
                };
                if at > end {
                    return Next::End;
                }
                self.now = self.now.max(at);
                return Next::Timer { node };
            }
            let Some(Reverse((at, seq))) = self.queue.pop() else {
                return Next::End;
            };
            if at > end {
                return Next::End;
            }
            self.now = self.now.max(at);
            if let Some(event) = self.events.remove(&seq) {
                return Next::Event(event);
            }
        }
    }
}

/// Whether `SIM_TRACE` is set: simulations then print what every node does.
pub fn tracing() -> bool {
    std::env::var_os("SIM_TRACE").is_some()
}

/// The seeds to run: `SIM_SEED=<n>` alone, else `SIM_FROM..SIM_SEEDS` (`SIM_FROM` defaults
/// to 0, `SIM_SEEDS` to `default_count`; a long run can be split over processes with it).
pub fn seeds(default_count: u64) -> Vec<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(seed) = var("SIM_SEED") {
        return vec![seed];
    }
    let n = var("SIM_SEEDS").unwrap_or(default_count);
    (var("SIM_FROM").unwrap_or(0)..n).collect()
}

/// Runs `run` for every seed, printing how to replay a failing one (`what` names the
/// simulation); with `SIM_KEEP_GOING` set, runs them all and then fails listing the failing
/// seeds.
pub fn run_seeds(what: &str, seeds: Vec<u64>, run: impl Fn(u64)) {
    let keep_going = std::env::var_os("SIM_KEEP_GOING").is_some();
    let mut failed = Vec::new();
    for seed in seeds {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(seed)));
        if let Err(e) = result {
            eprintln!("{what} failed: rerun with SIM_SEED={seed} (SIM_TRACE=1 for a trace)");
            if !keep_going {
                std::panic::resume_unwind(e);
            }
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "{what}: failing seeds {failed:?}");
}

/// Invariants both simulations check.
pub mod check {
    use std::fmt::Debug;

    /// One final chain: for every two of `nodes` and every height both have final, the same
    /// block. `final_height(i)` is node `i`'s final height; `final_at(i, h)` what it holds
    /// final at `h` (a hash, or a hash and a state root), `None` for a gap, which is an error
    /// too.
    pub fn one_final_chain<B: PartialEq + Debug>(
        seed: u64,
        nodes: &[usize],
        final_height: impl Fn(usize) -> u64,
        final_at: impl Fn(usize, u64) -> Option<B>,
    ) {
        let Some(&reference) = nodes
            .iter()
            .max_by_key(|i| (final_height(**i), Reverse(**i)))
        else {
            return;
        };
        for &i in nodes {
            for h in 0..=final_height(i) {
                let mine = final_at(i, h);
                assert!(
                    mine.is_some(),
                    "seed {seed}: node {i} has no final block at h{h}"
                );
                assert_eq!(
                    mine,
                    final_at(reference, h),
                    "seed {seed}: nodes {i} and {reference} hold different final blocks at h{h}"
                );
            }
        }
    }

    use std::cmp::Reverse;

    /// Progress after healing: the first time in `final_times` (when node `node` finalized
    /// something) after `healed_at` is at most `bound_ms` later.
    pub fn progress_after(
        seed: u64,
        node: usize,
        final_times: &[u64],
        healed_at: u64,
        bound_ms: u64,
    ) -> Result<u64, String> {
        let bound = healed_at.saturating_add(bound_ms);
        match final_times.iter().copied().find(|t| *t > healed_at) {
            Some(t) if t <= bound => Ok(t),
            _ => Err(format!(
                "seed {seed}: node {node} finalized nothing between {healed_at} ms (healed) and \
                 {bound} ms"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn faults() -> Faults {
        Faults {
            latency_ms: (5, 50),
            loss: 0.1,
            partition: Some(Partition {
                start: 100,
                end: 200,
                side: vec![0],
            }),
            crash: Some(Crash {
                at: 50,
                back: 300,
                node: 2,
            }),
        }
    }

    #[test]
    fn events_at_one_instant_run_in_schedule_order_and_timers_first() {
        let mut w: World<&str> = World::new(1, Faults::calm((1, 1)));
        w.schedule(10, "a");
        w.schedule(10, "b");
        w.schedule(5, "c");
        assert!(matches!(w.next(None, 100), Next::Event("c")));
        assert!(matches!(
            w.next(Some((10, 3)), 100),
            Next::Timer { node: 3 }
        ));
        assert_eq!(w.now(), 10);
        assert!(matches!(w.next(None, 100), Next::Event("a")));
        assert!(matches!(w.next(None, 100), Next::Event("b")));
        assert!(matches!(w.next(Some((101, 0)), 100), Next::End));
    }

    #[test]
    fn partitions_split_sides_only_while_they_last_and_healing_counts_restarts() {
        let f = faults();
        assert!(f.split(150, 0, 1) && !f.split(150, 1, 2) && !f.split(200, 0, 1));
        assert_eq!(f.healed_at(), 300);
    }

    #[test]
    fn the_same_seed_makes_the_same_decisions() {
        let run = |seed| {
            let mut w: World<()> = World::new(seed, faults());
            (0..200)
                .map(|k| w.transit(k % 3, (k + 1) % 3))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(
            run(7).iter().any(Option::is_none),
            "10% loss loses something"
        );
    }

    #[test]
    fn one_final_chain_catches_a_fork() {
        let chains = [vec![1, 2, 3], vec![1, 2], vec![1, 9, 3]];
        let height = |i: usize| chains[i].len() as u64 - 1;
        let at = |i: usize, h: u64| chains[i].get(h as usize).copied();
        check::one_final_chain(0, &[0, 1], height, at);
        let forked = std::panic::catch_unwind(|| check::one_final_chain(0, &[0, 2], height, at));
        assert!(forked.is_err());
    }
}
