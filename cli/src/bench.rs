//! `keel bench`: argument handling and printing. The workloads live elsewhere: block
//! application in `keel_state::bench` (re-exported as `keel_node::bench::blocks`), RPC reads
//! while committing in `keel_node::bench`. `docs/benchmarks.md` says what each stage times.
//!
//! Text output is one line per figure; `--json` prints one JSON object per line whose field
//! names are part of the contract (`docs/benchmarks.md`, `tests/tests/cli_contract.rs`).

use anyhow::Result;
use keel_node::bench::blocks::{self, BlockBench, Figure, Mix, Stage};
use serde_json::{json, Value};

use crate::args::{BenchArgs, BenchStage};

/// The block-application stages a run reports.
fn wanted(stage: BenchStage) -> &'static [Stage] {
    match stage {
        BenchStage::Sigverify => &[Stage::Sigverify],
        BenchStage::Execute => &[Stage::Execute],
        BenchStage::Trie => &[Stage::Root],
        BenchStage::Commit => &[Stage::Commit],
        BenchStage::All => &Stage::ALL,
        BenchStage::Reads | BenchStage::Prune => &[],
    }
}

/// Runs `keel bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    anyhow::ensure!(args.accounts >= 2, "--accounts must be at least 2");
    anyhow::ensure!(args.txs >= 1, "--txs must be at least 1");
    anyhow::ensure!(args.blocks >= 1, "--blocks must be at least 1");
    if args.stage == BenchStage::Reads {
        return reads(&args);
    }
    if args.stage == BenchStage::Prune {
        return prune(&args);
    }
    let config = blocks::Config {
        accounts: args.accounts,
        txs: args.txs,
        blocks: args.blocks,
        dir: args.dir.clone(),
    };
    let threads = blocks::thread_counts();
    if args.stage == BenchStage::Sigverify {
        for figure in blocks::sigverify(&config, &threads)? {
            print_figure(&figure, args.json);
        }
        return Ok(());
    }
    let stages = wanted(args.stage);
    let mut bench = BlockBench::new(&config)?;
    eprintln!(
        "bench: state of {} accounts built in {:.1} s",
        args.accounts,
        bench.build_time().as_secs_f64()
    );
    for mix in Mix::ALL {
        for &n in &threads {
            let figures = bench.measure(mix, n, args.blocks)?;
            for figure in figures.all() {
                if stages.contains(&figure.stage) {
                    print_figure(figure, args.json);
                }
            }
        }
    }
    bench.check_hot_account()?;
    Ok(())
}

/// Prints one figure, with the peak memory of the run so far.
fn print_figure(figure: &Figure, json: bool) {
    if json {
        outln!("{}", figure_json(figure, blocks::peak_rss_mib()));
    } else {
        outln!("{}", figure_text(figure));
    }
}

/// `{stage, mix, threads, accounts, txs, tps, median_ms, peak_rss_mib}`, plus `raw_tps` and
/// `vs_raw` for sigverify.
fn figure_json(f: &Figure, peak_rss_mib: Option<u64>) -> Value {
    let mut v = json!({
        "stage": f.stage.name(),
        "mix": f.mix.name(),
        "threads": f.threads,
        "accounts": f.accounts,
        "txs": f.txs,
        "tps": f.tps().round(),
        "median_ms": (f.median.as_secs_f64() * 1e6).round() / 1e3,
        "peak_rss_mib": peak_rss_mib,
    });
    if let (Some(raw_tps), Some(vs_raw)) = (f.raw_tps(), f.vs_raw()) {
        v["raw_tps"] = json!(raw_tps.round());
        v["vs_raw"] = json!((vs_raw * 1000.0).round() / 1000.0);
    }
    v
}

fn figure_text(f: &Figure) -> String {
    let raw = match (f.raw_tps(), f.vs_raw()) {
        (Some(raw_tps), Some(vs_raw)) => {
            format!("  (raw batch {raw_tps:>9.0}/s, {:.1}%)", 100.0 * vs_raw)
        }
        _ => String::new(),
    };
    format!(
        "{:<9} {:<7} threads={:<2} {:>9.0} tx/s  {:>8.2} ms/block{}",
        f.stage.name(),
        f.mix.name(),
        f.threads,
        f.tps(),
        f.median.as_secs_f64() * 1e3,
        raw
    )
}

/// `keel bench prune`: commit latency and database size, archive against a pruning window.
/// `--json`: one `{"stage":"prune","mode",...}` object per run, then one
/// `{"stage":"prune-size","mode","height","live_sst_bytes","disk_bytes"}` per sample.
fn prune(args: &BenchArgs) -> Result<()> {
    let runs = keel_node::bench::prune_while_committing(&keel_node::bench::PruneBench {
        txs: args.txs,
        blocks: args.blocks,
        keep_recent: args.keep,
        interval: args.interval,
        block_time_ms: args.block_time_ms,
        no_compaction: args.no_compaction,
        pacing: match args.pacing {
            crate::args::PruneBenchPacing::Commits => keel_node::pruner::Pacing::Commits,
            crate::args::PruneBenchPacing::Rest => keel_node::pruner::Pacing::Resting,
        },
        low_priority_compactions: args.compaction_priority == crate::args::CompactionPriority::Low,
        pairs: args.pairs,
        dir: args.dir.clone(),
    })?;
    for (i, run) in runs.iter().enumerate() {
        let pair = i / 2 + 1;
        let mode = if run.pruning { "pruning" } else { "archive" };
        let mut pass_ms: Vec<f64> = run.passes.iter().map(|p| p.1 * 1e3).collect();
        pass_ms.sort_by(f64::total_cmp);
        let median = pass_ms.get(pass_ms.len() / 2).copied().unwrap_or(0.0);
        let max = pass_ms.last().copied().unwrap_or(0.0);
        let ms = |us: f64| (us / 10.0).round() / 100.0;
        if args.json {
            outln!(
                "{}",
                json!({
                    "stage": "prune",
                    "mode": mode,
                    "blocks": args.blocks,
                    "txs": args.txs,
                    "keep": args.keep,
                    "interval": args.interval,
                    "block_time_ms": args.block_time_ms,
                    "no_compaction": args.no_compaction,
                    "pacing": format!("{:?}", args.pacing).to_lowercase(),
                    "compaction_priority": format!("{:?}", args.compaction_priority).to_lowercase(),
                    "pair": pair,
                    "commit_p50_ms": ms(run.commit.p50_us),
                    "commit_p99_ms": ms(run.commit.p99_us),
                    "commit_max_ms": ms(run.commit.max_us),
                    "commit_in_pass_n": run.commit_in_pass.reads,
                    "commit_in_pass_p99_ms": ms(run.commit_in_pass.p99_us),
                    "commit_between_passes_n": run.commit_between_passes.reads,
                    "commit_between_passes_p99_ms": ms(run.commit_between_passes.p99_us),
                    "commit_in_background_n": run.commit_in_background.reads,
                    "commit_in_background_p99_ms": ms(run.commit_in_background.p99_us),
                    "commit_quiet_n": run.commit_quiet.reads,
                    "commit_quiet_p99_ms": ms(run.commit_quiet.p99_us),
                    "compactions": run.compactions.iter().map(|(cf, secs, gb)| json!({
                        "cf": cf, "seconds": secs, "written_gb": gb})).collect::<Vec<_>>(),
                    "block_p50_ms": ms(run.block.p50_us),
                    "block_p99_ms": ms(run.block.p99_us),
                    "prune_passes": run.passes.len(),
                    "prune_pass_median_ms": (median * 100.0).round() / 100.0,
                    "prune_pass_max_ms": (max * 100.0).round() / 100.0,
                    "seconds": (run.seconds * 1e3).round() / 1e3,
                })
            );
            for (height, live, disk, columns) in &run.sizes {
                let columns: serde_json::Map<String, serde_json::Value> = columns
                    .iter()
                    .map(|(cf, bytes)| (cf.to_string(), json!(bytes)))
                    .collect();
                outln!(
                    "{}",
                    json!({"stage": "prune-size", "mode": mode, "pair": pair, "height": height,
                           "live_sst_bytes": live, "disk_bytes": disk,
                           "live_sst_bytes_by_column": columns})
                );
            }
        } else {
            outln!(
                "prune {pair} {mode:<8} commit p50 {:>7.2} ms p99 {:>7.2} ms  block p50 {:>7.2} ms p99 {:>7.2} ms  {} passes (median {median:.1} ms, max {max:.1} ms)  {:.1} s",
                run.commit.p50_us / 1e3,
                run.commit.p99_us / 1e3,
                run.block.p50_us / 1e3,
                run.block.p99_us / 1e3,
                run.passes.len(),
                run.seconds
            );
            let sizes: Vec<String> = run
                .sizes
                .iter()
                .map(|(h, live, _, _)| format!("{h}:{:.1}MiB", *live as f64 / (1 << 20) as f64))
                .collect();
            outln!(
                "prune {pair} {mode:<8} live table bytes by height: {}",
                sizes.join(" ")
            );
        }
    }
    // Each pruning run against the archive run just before it.
    let mut ratios: Vec<f64> = runs
        .chunks(2)
        .filter_map(|pair| match pair {
            [archive, pruning] if archive.commit.p99_us > 0.0 => {
                Some(pruning.commit.p99_us / archive.commit.p99_us)
            }
            _ => None,
        })
        .collect();
    let by_pair = ratios.clone();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    if args.json {
        outln!(
            "{}",
            json!({"stage": "prune-summary", "pairs": ratios.len(),
                   "commit_p99_ratios": by_pair, "commit_p99_ratio_median": median})
        );
    } else {
        outln!(
            "prune commit p99 pruning / archive by pair: {} (median {median:.3})",
            by_pair
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// `keel bench reads`: RPC read latency without and with big blocks committing.
fn reads(args: &BenchArgs) -> Result<()> {
    let figures = keel_node::bench::reads_while_committing(&keel_node::bench::ReadBench {
        txs: args.txs,
        blocks: args.blocks,
        reads_per_sec: args.reads_per_sec,
        block_time_ms: 500,
        http: args.http,
        wrk_secs: args.wrk_secs,
        dir: args.dir.clone(),
    })?;
    for (phase, l) in [("idle", &figures.idle), ("committing", &figures.committing)] {
        if args.json {
            outln!(
                "{}",
                json!({
                    "stage": "reads",
                    "phase": phase,
                    "reads": l.reads,
                    "transport": if args.http { "http" } else { "in-process" },
                    "reads_per_sec": args.reads_per_sec,
                    "p50_us": l.p50_us.round(),
                    "p99_us": l.p99_us.round(),
                    "max_us": l.max_us.round(),
                    "blocks": figures.blocks,
                    "txs": figures.txs,
                    "seconds": (figures.seconds * 1e3).round() / 1e3,
                })
            );
        } else {
            outln!(
                "reads {phase:<10} {:>7} state_getAccount  p50 {:>8.0} us  p99 {:>8.0} us  max {:>8.0} us",
                l.reads, l.p50_us, l.p99_us, l.max_us
            );
        }
    }
    if !args.json {
        outln!(
            "reads committing: {} blocks of transfers ({} transfers) final in {:.1} s",
            figures.blocks,
            figures.txs,
            figures.seconds
        );
    }
    if let Some((idle, committing)) = &figures.wrk {
        for (phase, w) in [("idle", idle), ("committing", committing)] {
            if args.json {
                outln!(
                    "{}",
                    json!({
                        "stage": "reads-wrk",
                        "phase": phase,
                        "connections": w.connections,
                        "requests_per_sec": w.requests_per_sec.round(),
                        "p50_ms": w.p50_ms,
                        "p99_ms": w.p99_ms,
                        "errors": w.errors,
                    })
                );
            } else {
                outln!(
                    "wrk   {phase:<10} {:>9.0} requests/s ({} connections)  p50 {:.2} ms  p99 {:.2} ms  errors {}",
                    w.requests_per_sec, w.connections, w.p50_ms, w.p99_ms, w.errors
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn figure(stage: Stage, raw_ms: Option<u64>) -> Figure {
        Figure {
            stage,
            mix: Mix::Hot30,
            threads: 2,
            accounts: 3000,
            txs: 200,
            median: Duration::from_millis(4),
            raw_median: raw_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn json_lines_keep_the_documented_field_names_and_units() {
        let v = figure_json(&figure(Stage::Execute, None), Some(12));
        assert_eq!(
            v,
            json!({
                "stage": "execute", "mix": "hot30", "threads": 2, "accounts": 3000,
                "txs": 200, "tps": 50_000.0, "median_ms": 4.0, "peak_rss_mib": 12,
            })
        );
        let v = figure_json(&figure(Stage::Sigverify, Some(3)), None);
        assert_eq!(v["stage"], "sigverify");
        assert_eq!(v["raw_tps"], 66_667.0);
        assert_eq!(v["vs_raw"], 0.75);
        assert_eq!(v["peak_rss_mib"], Value::Null);
    }

    #[test]
    fn text_lines_name_stage_mix_and_threads() {
        let line = figure_text(&figure(Stage::Sigverify, Some(3)));
        assert_eq!(
            line,
            "sigverify hot30   threads=2      50000 tx/s      4.00 ms/block  (raw batch     66667/s, 75.0%)"
        );
        let line = figure_text(&figure(Stage::Root, None));
        assert!(line.starts_with("root      hot30   threads=2 "), "{line}");
        assert!(line.ends_with(" ms/block"), "{line}");
    }

    #[test]
    fn each_stage_argument_reports_its_stages() {
        assert_eq!(wanted(BenchStage::Trie), [Stage::Root]);
        assert_eq!(wanted(BenchStage::All), Stage::ALL);
        assert!(wanted(BenchStage::Reads).is_empty());
    }
}
