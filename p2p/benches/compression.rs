//! Codec choice for frames above the compression threshold: zstd (levels 1 and 3) against
//! lz4 on what keel really sends (blocks of signed transfers, votes). Prints the compression
//! ratio of each payload and codec, then criterion measures compression and decompression
//! throughput. `cargo bench -p keel-p2p --bench compression`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_types::{Address, Block, Hash, Header, Keypair, Transaction, TxKind, Vote};

/// A block of `n` transfers from 50 senders to random recipients, as proposals carry them.
fn block(n: usize) -> Vec<u8> {
    let senders: Vec<Keypair> = (0..50).map(Keypair::from_seed).collect();
    let txs = (0..n)
        .map(|i| {
            let s = &senders[i % senders.len()];
            let to = Address(
                *Hash::digest(&(i as u64).to_le_bytes())
                    .as_bytes()
                    .first_chunk()
                    .unwrap(),
            );
            Transaction::sign(
                s,
                "keel-bench",
                (i / 50) as u64,
                1 + (i % 5) as u64,
                TxKind::Transfer {
                    to,
                    amount: 1_000 + i as u64,
                },
            )
            .bytes
        })
        .collect();
    Block {
        header: Header {
            chain_id: "keel-bench".into(),
            height: 1_000,
            ..Header::default()
        },
        txs,
        evidence: vec![],
    }
    .encode()
}

fn vote() -> Vec<u8> {
    Vote::sign(
        &Keypair::from_seed(1),
        "keel-bench",
        Hash([7; 32]),
        1_000,
        4_000,
    )
    .encode()
}

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("vote", vote()),
        ("block_100_txs", block(100)),
        ("block_2000_txs", block(2_000)),
    ]
}

fn ratios() {
    eprintln!(
        "{:<16} {:>9} {:>9} {:>9} {:>9}",
        "payload", "bytes", "zstd-1", "zstd-3", "lz4"
    );
    for (name, p) in payloads() {
        let z1 = zstd::bulk::compress(&p, 1).unwrap().len();
        let z3 = zstd::bulk::compress(&p, 3).unwrap().len();
        let l = lz4_flex::compress_prepend_size(&p).len();
        let r = |c: usize| p.len() as f64 / c as f64;
        eprintln!(
            "{name:<16} {:>9} {:>8.2}x {:>8.2}x {:>8.2}x",
            p.len(),
            r(z1),
            r(z3),
            r(l)
        );
    }
}

fn bench(c: &mut Criterion) {
    ratios();
    for (name, p) in payloads().into_iter().skip(1) {
        let mut g = c.benchmark_group(format!("compress/{name}"));
        g.throughput(Throughput::Bytes(p.len() as u64));
        for level in [1, 3] {
            g.bench_with_input(BenchmarkId::new("zstd", level), &p, |b, p| {
                b.iter(|| zstd::bulk::compress(p, level).unwrap())
            });
        }
        g.bench_with_input(BenchmarkId::new("lz4", 0), &p, |b, p| {
            b.iter(|| lz4_flex::compress_prepend_size(p))
        });
        g.finish();
        let mut g = c.benchmark_group(format!("decompress/{name}"));
        g.throughput(Throughput::Bytes(p.len() as u64));
        let z = keel_p2p::frame::encode(&p, 0);
        g.bench_with_input(BenchmarkId::new("zstd", 1), &z, |b, z| {
            b.iter(|| keel_p2p::frame::decode(z, 16 << 20).unwrap())
        });
        let l = lz4_flex::compress_prepend_size(&p);
        g.bench_with_input(BenchmarkId::new("lz4", 0), &l, |b, l| {
            b.iter(|| lz4_flex::decompress_size_prepended(l).unwrap())
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
