//! Block execution: the parallel executor against the sequential reference, with one thread
//! and with the whole rayon pool, on the same blocks of signed transfers (signatures cached,
//! as after mempool admission). Execution only reads the parent version, so every iteration
//! executes the same block on the same committed state. That favours the sequential
//! reference, whose single-key reads keep every node in the LRU; the parallel executor's
//! batched reads keep only the upper levels (docs/benchmarks.md says why and which figures
//! count).
//!
//! `cargo bench -p keel-state --bench execute` (`KEEL_BENCH_ACCOUNTS`, default 200,000, and
//! `KEEL_BENCH_TXS`, default 4,000, resize it).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_state::{Account, BlockEnv, ExecParams, SigCache, State};
use keel_storage::{KvStore, MemStore, WriteBatch};
use keel_types::{Address, Hash, Keypair, Transaction, TxKind};
use rand::{Rng, SeedableRng};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn address(i: u64, senders: &[Keypair]) -> Address {
    match senders.get(i as usize) {
        Some(k) => k.address(),
        None => {
            let h = Hash::digest(&i.to_le_bytes());
            let mut a = [0u8; 20];
            a.copy_from_slice(&h.0[..20]);
            Address(a)
        }
    }
}

fn bench_execute(c: &mut Criterion) {
    let accounts = env_or("KEEL_BENCH_ACCOUNTS", 200_000);
    let txs = env_or("KEEL_BENCH_TXS", 4_000) as usize;
    let senders: Vec<Keypair> = (0..txs as u64).map(|i| Keypair::from_seed(i + 1)).collect();
    let store = Arc::new(MemStore::new());
    let cache = Arc::new(SigCache::default());
    let params = ExecParams {
        chain_id: "bench".into(),
        min_fee: 10,
        unbonding_period: 100,
        slash_fraction_ppm: 0,
    };
    let state = State::new(store.clone(), params).with_signature_cache(cache.clone());
    let genesis: Vec<(Address, Account)> = (0..accounts)
        .map(|i| {
            let account = Account {
                balance: 1_000_000_000,
                ..Account::default()
            };
            (address(i, &senders), account)
        })
        .collect();
    let mut batch = WriteBatch::new();
    state.init_genesis(&genesis, &[], &mut batch).unwrap();
    store.write(batch).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let hot = address(accounts - 1, &senders);
    let mut group = c.benchmark_group("execute");
    group.sample_size(10);
    group.throughput(Throughput::Elements(txs as u64));
    for (mix, share) in [("uniform", 0.0), ("hot30", 0.3)] {
        let block: Vec<Transaction> = senders
            .iter()
            .map(|k| {
                let to = if rng.gen_bool(share) {
                    hot
                } else {
                    address(rng.gen_range(0..accounts), &senders)
                };
                Transaction::sign(k, "bench", 0, 10, TxKind::Transfer { to, amount: 1 })
            })
            .collect();
        cache.insert_all(block.iter().map(|t| &t.hash));
        let env = BlockEnv {
            height: 1,
            proposer: Address([0xEE; 20]),
            evidence: Vec::new(),
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for threads in [1, cores] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            group.bench_function(BenchmarkId::new(format!("parallel/{mix}"), threads), |b| {
                b.iter(|| pool.install(|| state.execute(&env, &block).unwrap()))
            });
        }
        group.bench_function(BenchmarkId::new(format!("sequential/{mix}"), 1), |b| {
            b.iter(|| state.execute_sequential(&env, &block).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_execute);
criterion_main!(benches);
