//! Cost per signature of keel's cofactored batch verification against ed25519-dalek's
//! (cofactorless) `verify_batch`, on the same honest signatures, in batches of 64 (the
//! executor's chunk) and 1024; and of single verification against `verify_strict`.
//!
//! The only extra work of the cofactored batch is three doublings of the combined point (and
//! blake3 rather than merlin for the coefficients), so the two should be within a few percent.
//! Run: `cargo bench -p keel-types --bench sigverify`. Throughput is in signatures.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_types::{verify_batch, Hash, Keypair, PublicKey, Signature};

fn batch(n: usize) -> (Vec<Hash>, Vec<Signature>, Vec<PublicKey>) {
    let keys: Vec<Keypair> = (0..n as u64).map(Keypair::from_seed).collect();
    let msgs: Vec<Hash> = (0..n as u64)
        .map(|i| Hash::digest(&i.to_le_bytes()))
        .collect();
    let sigs = keys.iter().zip(&msgs).map(|(k, m)| k.sign(m)).collect();
    let pubs = keys.iter().map(Keypair::public).collect();
    (msgs, sigs, pubs)
}

fn batches(c: &mut Criterion) {
    let mut group = c.benchmark_group("verify_batch");
    for n in [64usize, 1024] {
        let (msgs, sigs, pubs) = batch(n);
        // ed25519-dalek's inputs, converted outside the timed region.
        let m: Vec<&[u8]> = msgs.iter().map(|h| h.0.as_slice()).collect();
        let s: Vec<ed25519_dalek::Signature> = sigs
            .iter()
            .map(|s| ed25519_dalek::Signature::from_bytes(&s.0))
            .collect();
        let k: Vec<ed25519_dalek::VerifyingKey> = pubs
            .iter()
            .map(|p| ed25519_dalek::VerifyingKey::from_bytes(&p.to_bytes()).unwrap())
            .collect();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("keel_cofactored", n), &n, |b, _| {
            b.iter(|| verify_batch(&msgs, &sigs, &pubs).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("dalek_cofactorless", n), &n, |b, _| {
            b.iter(|| ed25519_dalek::verify_batch(&m, &s, &k).unwrap())
        });
    }
    group.finish();
}

fn single(c: &mut Criterion) {
    let (msgs, sigs, pubs) = batch(1);
    let key = ed25519_dalek::VerifyingKey::from_bytes(&pubs[0].to_bytes()).unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(&sigs[0].0);
    let mut group = c.benchmark_group("verify_one");
    group.bench_function("keel_cofactored", |b| {
        b.iter(|| pubs[0].verify(&msgs[0], &sigs[0]).unwrap())
    });
    group.bench_function("dalek_verify_strict", |b| {
        b.iter(|| key.verify_strict(msgs[0].as_bytes(), &sig).unwrap())
    });
    group.finish();
}

criterion_group!(benches, batches, single);
criterion_main!(benches);
