//! Liveness on real processes: four `keel start` validators from `keel testnet` (its default
//! timeouts), one killed, and how long the other three take to get their block rate back.
//!
//! `killing_one_of_four_validators_costs_seconds_of_pace` is the short version `make test`
//! runs (300 ms blocks). The measurement quoted in `docs/benchmarks.md` is the opt-in
//! `recovery_after_killing_one_of_four_validators_at_one_second_blocks`:
//!
//! ```text
//! cargo test -p keel-tests --test liveness -- --ignored --nocapture
//! ```
//!
//! It prints the seconds until the block rate (over windows of 20 block times) is back to 90%
//! of the rate before the kill and holds for three windows, and the blocks finalized in the minute before the kill, the minute after
//! it, and the minute after that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use keel_tests::{testnet_nodes, u64_field, TestNode};

const VALIDATORS: usize = 4;

/// The highest final height any of `nodes` reports (0 if none answers).
fn finalized(nodes: &[TestNode]) -> u64 {
    nodes
        .iter()
        .filter_map(|n| n.rpc().status().ok())
        .filter_map(|s| u64_field(&s, "finalized_height").ok())
        .max()
        .unwrap_or(0)
}

/// Final heights sampled over time: (seconds since the first sample, height).
struct Samples(Vec<(f64, u64)>);

impl Samples {
    /// Samples `nodes` every 100 ms for `secs` seconds, appending to `self`.
    fn record(&mut self, start: Instant, nodes: &[TestNode], secs: f64) {
        let until = start.elapsed().as_secs_f64() + secs;
        while start.elapsed().as_secs_f64() < until {
            self.0
                .push((start.elapsed().as_secs_f64(), finalized(nodes)));
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The final height at time `t` (the last sample at or before it).
    fn height_at(&self, t: f64) -> u64 {
        self.0
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, h)| *h)
    }

    /// Blocks finalized in `[from, to)`.
    fn blocks(&self, from: f64, to: f64) -> u64 {
        self.height_at(to).saturating_sub(self.height_at(from))
    }

    /// Seconds after `kill` until the block rate over `window` seconds is at least `share`
    /// of `rate` and stays there for `hold` seconds (every window starting in that stretch);
    /// `None` if it never does. A failed validator is drawn as leader again now and then (so
    /// it can show it is back), which costs a timeout: "stays" is over `hold`, not forever.
    fn recovery(&self, kill: f64, window: f64, hold: f64, rate: f64, share: f64) -> Option<f64> {
        let end = self.0.last().map_or(kill, |(t, _)| *t);
        let good = |from: f64| self.blocks(from, from + window) as f64 >= share * rate * window;
        let times: Vec<f64> = self.0.iter().map(|(t, _)| *t).collect();
        times
            .iter()
            .copied()
            .filter(|t| *t >= kill && *t + hold + window <= end)
            .find(|t| {
                times
                    .iter()
                    .filter(|s| **s >= *t && **s <= *t + hold)
                    .all(|s| good(*s))
            })
            .map(|t| t - kill)
    }
}

/// What one run measured.
struct Recovery {
    /// Blocks per second over the `before` seconds before the kill.
    rate_before: f64,
    /// Seconds until the rate was back to 90% and held for three windows.
    seconds: Option<f64>,
    /// Blocks finalized in the `minute`-long stretches before the kill, after it, and after
    /// that.
    per_minute: [u64; 3],
}

/// How recovery is judged: the block rate over windows of `window_blocks` block times is at
/// least `share` of the rate before the kill, in every window for `hold_windows` windows.
struct Criterion {
    window_blocks: f64,
    hold_windows: f64,
    share: f64,
}

/// The measurement's criterion: 20 block times (one lost block is within 90% of them), held
/// for three windows.
const MEASURED: Criterion = Criterion {
    window_blocks: 20.0,
    hold_windows: 3.0,
    share: 0.9,
};

/// Runs four validators at `block_time_ms`, measures the rate for `before` seconds, kills
/// one, and samples `after` seconds more. `minute` is the length of the per-minute stretches
/// (60 s in the measurement, shorter in the short test).
fn measure(
    block_time_ms: u64,
    before: f64,
    after: f64,
    minute: f64,
    criterion: &Criterion,
) -> Recovery {
    let dir = tempfile::Builder::new()
        .prefix("keel-liveness-")
        .tempdir()
        .unwrap();
    // LIVENESS_KEEP=1 keeps the homes and their `node.log`s for a look at the rounds.
    let (root, _guard) = if std::env::var_os("LIVENESS_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("homes and logs kept in {}", kept.display());
        (kept, None)
    } else {
        (dir.path().to_path_buf(), Some(dir))
    };
    // `keel testnet`'s own timeouts: what an operator running it gets.
    let mut nodes = testnet_nodes(&root, VALIDATORS, block_time_ms, "keel-live", |_| {}).unwrap();
    for n in nodes.iter_mut() {
        n.start().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while finalized(&nodes) < 10 {
        assert!(
            Instant::now() < deadline,
            "the testnet finalized no 10 blocks"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    let mut samples = Samples(Vec::new());
    samples.record(start, &nodes, before);
    let kill = start.elapsed().as_secs_f64();
    nodes[VALIDATORS - 1].kill();
    let alive = &nodes[..VALIDATORS - 1];
    samples.record(start, alive, after);
    for n in nodes[..VALIDATORS - 1].iter_mut() {
        n.assert_running().unwrap();
    }
    let rate_before = samples.blocks(kill - before, kill) as f64 / before;
    if std::env::var_os("LIVENESS_TIMELINE").is_some() {
        let mut t = kill - 6.0;
        while t < kill + after {
            eprintln!(
                "{:+6.1} s: {} blocks in 2 s",
                t - kill,
                samples.blocks(t, t + 2.0)
            );
            t += 2.0;
        }
    }
    let window = criterion.window_blocks * block_time_ms as f64 / 1000.0;
    Recovery {
        rate_before,
        seconds: samples.recovery(
            kill,
            window,
            criterion.hold_windows * window,
            rate_before,
            criterion.share,
        ),
        per_minute: [
            samples.blocks(kill - minute, kill),
            samples.blocks(kill, kill + minute),
            samples.blocks(kill + minute, kill + 2.0 * minute),
        ],
    }
}

fn report(block_time_ms: u64, minute: f64, criterion: &Criterion, r: &Recovery) {
    eprintln!(
        "block_time_ms = {block_time_ms}: {:.2} blocks/s before the kill; back to {:.0}% \
         (windows of {} block times) after {}; blocks per {minute:.0} s: {} before, {} after \
         the kill, {} in the next",
        r.rate_before,
        criterion.share * 100.0,
        criterion.window_blocks,
        r.seconds
            .map_or("never".to_string(), |s| format!("{s:.1} s")),
        r.per_minute[0],
        r.per_minute[1],
        r.per_minute[2],
    );
}

/// One of four validator processes dies: the other three are back to most of their block
/// rate within seconds (here at 300 ms blocks; the figure for 1 s blocks, at 90% over 20
/// block times, is measured by the ignored test below).
///
/// The bound is looser than the measurement's, because at 300 ms blocks a round led by the
/// dead validator costs `keel testnet`'s 1 s timeout floor, about four blocks: reputation
/// draws it again now and then (weight 10 against 1000 for each live one once its failure
/// leaves the window: about one round in 300, once in 90 s at 300 ms), and one such round in
/// a window of 20 block times is 80% of it. CI failed the 90%-of-20 version with 46 and 47 blocks of 50 in
/// the two 15 s stretches after the kill. Windows of 30 block times at 80%, held for two,
/// absorb one such round and still fail the pace before the liveness work (15 blocks in
/// the minute after a kill, a quarter of it).
#[test]
fn killing_one_of_four_validators_costs_seconds_of_pace() {
    let criterion = Criterion {
        window_blocks: 30.0,
        hold_windows: 2.0,
        share: 0.8,
    };
    let r = measure(300, 15.0, 45.0, 15.0, &criterion);
    report(300, 15.0, &criterion, &r);
    assert!(
        r.rate_before > 1.0,
        "too slow to measure: {:.2}/s",
        r.rate_before
    );
    let seconds = r.seconds.expect("the block rate never came back to 80%");
    assert!(seconds <= 20.0, "{seconds:.1} s of reduced pace");
}

/// The measurement of `docs/benchmarks.md`: 1 s blocks, a minute before the kill, two after.
#[test]
#[ignore = "takes 4 minutes: run with --ignored --nocapture"]
fn recovery_after_killing_one_of_four_validators_at_one_second_blocks() {
    let r = measure(1_000, 60.0, 120.0, 60.0, &MEASURED);
    report(1_000, 60.0, &MEASURED, &r);
    let seconds = r.seconds.expect("the block rate never came back to 90%");
    assert!(seconds <= 10.0, "{seconds:.1} s of reduced pace");
}
