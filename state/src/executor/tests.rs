#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_storage::MemStore;
use keel_types::{Evidence, Keypair, Vote};

use super::*;
use crate::tree::verify_proof;

const CHAIN: &str = "keel-test";
const MIN_FEE: u64 = 10;
const PERIOD: u64 = 3;
/// 5%.
const SLASH_PPM: u32 = 50_000;

fn params() -> ExecParams {
    ExecParams {
        chain_id: CHAIN.into(),
        min_fee: MIN_FEE,
        unbonding_period: PERIOD,
        slash_fraction_ppm: SLASH_PPM,
    }
}

fn key(seed: u64) -> Keypair {
    Keypair::from_seed(seed)
}

fn funded(balance: u64) -> Account {
    Account {
        balance,
        ..Account::default()
    }
}

/// A chain with `accounts` at genesis (version 0, committed).
struct Chain {
    store: Arc<MemStore>,
    state: State,
    height: u64,
}

impl Chain {
    fn new(accounts: &[(Address, Account)]) -> Chain {
        Chain::with_validators(accounts, &[])
    }

    /// A chain whose genesis also registers `validators`.
    fn with_validators(accounts: &[(Address, Account)], validators: &[PublicKey]) -> Chain {
        let store = Arc::new(MemStore::new());
        let state = State::new(store.clone(), params());
        let mut batch = WriteBatch::new();
        let root = state
            .init_genesis(accounts, validators, &mut batch)
            .unwrap();
        store.write(batch).unwrap();
        assert_eq!(state.root(0).unwrap(), root);
        Chain {
            store,
            state,
            height: 0,
        }
    }

    /// Executes and commits the next block.
    fn block(&mut self, proposer: Address, txs: &[Transaction]) -> BlockOutcome {
        self.block_with_evidence(proposer, Vec::new(), txs)
    }

    /// Executes and commits the next block, carrying `evidence`.
    fn block_with_evidence(
        &mut self,
        proposer: Address,
        evidence: Vec<Evidence>,
        txs: &[Transaction],
    ) -> BlockOutcome {
        self.height += 1;
        let env = BlockEnv {
            height: self.height,
            proposer,
            evidence,
        };
        let mut batch = WriteBatch::new();
        let out = self.state.execute_block(&env, txs, &mut batch).unwrap();
        self.store.write(batch).unwrap();
        assert_eq!(self.state.root(self.height).unwrap(), out.state_root);
        assert_eq!(out.receipts.len(), txs.len());
        out
    }

    fn account(&self, addr: &Address) -> Account {
        self.state
            .account(addr, self.height)
            .unwrap()
            .unwrap_or_default()
    }
}

fn transfer(from: &Keypair, nonce: u64, fee: u64, to: Address, amount: u64) -> Transaction {
    Transaction::sign(from, CHAIN, nonce, fee, TxKind::Transfer { to, amount })
}

fn proposer() -> Address {
    Address([0xEE; 20])
}

#[test]
fn transfer_moves_funds_charges_fee_and_pays_the_proposer() {
    let (alice, bob) = (key(1), key(2));
    let mut chain = Chain::new(&[(alice.address(), funded(1_000))]);
    let tx = transfer(&alice, 0, 10, bob.address(), 100);
    let out = chain.block(proposer(), std::slice::from_ref(&tx));
    assert_eq!(
        out.receipts,
        vec![Receipt {
            tx_hash: tx.hash,
            height: 1,
            index: 0,
            success: true,
            error: None,
            fee: 10
        }]
    );
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 890,
            nonce: 1,
            ..Account::default()
        }
    );
    assert_eq!(chain.account(&bob.address()), funded(100));
    assert_eq!(chain.account(&proposer()), funded(10));
    let mut expected = vec![
        (
            alice.address(),
            Account {
                balance: 890,
                nonce: 1,
                ..Account::default()
            },
        ),
        (bob.address(), funded(100)),
        (proposer(), funded(10)),
    ];
    expected.sort_by_key(|a| a.0);
    assert_eq!(out.changed, expected);
}

/// Asserts the tx got a rejected receipt with `reason` and the state did not move.
fn assert_rejected(chain: &mut Chain, tx: Transaction, reason: &str) {
    let before = chain.state.root(chain.height).unwrap();
    let sender_before = chain.account(&tx.sender);
    let out = chain.block(proposer(), std::slice::from_ref(&tx));
    let r = &out.receipts[0];
    assert!(!r.success);
    assert_eq!(r.fee, 0);
    assert_eq!(r.error.as_deref(), Some(reason));
    assert_eq!(
        out.state_root, before,
        "a rejected tx must not change the state"
    );
    assert!(out.changed.is_empty());
    assert_eq!(chain.account(&tx.sender), sender_before);
}

#[test]
fn rejections_change_nothing() {
    let (alice, bob, pauper) = (key(1), key(2), key(3));
    let mut chain = Chain::new(&[
        (alice.address(), funded(1_000)),
        (pauper.address(), funded(5)),
    ]);
    let to = bob.address();

    let wrong_chain = Transaction::sign(&alice, "other", 0, 10, TxKind::Transfer { to, amount: 1 });
    assert_rejected(&mut chain, wrong_chain, "wrong chain id");

    let mut bad_sig = transfer(&alice, 0, 10, to, 1);
    bad_sig.signature.0[0] ^= 1;
    assert_rejected(&mut chain, bad_sig, "invalid signature");

    assert_rejected(
        &mut chain,
        transfer(&alice, 5, 10, to, 1),
        "bad nonce: expected 0, got 5",
    );
    assert_rejected(
        &mut chain,
        transfer(&alice, 0, 1, to, 1),
        "fee 1 below minimum 10",
    );
    assert_rejected(
        &mut chain,
        transfer(&pauper, 0, 10, to, 1),
        "cannot pay fee 10: balance 5",
    );
    // An account that does not exist has nonce 0 and nothing to pay with.
    assert_rejected(
        &mut chain,
        transfer(&bob, 0, 10, alice.address(), 1),
        "cannot pay fee 10: balance 0",
    );
    assert_eq!(
        chain.state.account(&bob.address(), chain.height).unwrap(),
        None
    );
}

#[test]
fn failed_transfer_keeps_fee_and_uses_nonce() {
    let (alice, bob) = (key(1), key(2));
    let mut chain = Chain::new(&[(alice.address(), funded(100))]);
    let out = chain.block(proposer(), &[transfer(&alice, 0, 10, bob.address(), 91)]);
    let r = &out.receipts[0];
    assert!(!r.success);
    assert_eq!(r.error.as_deref(), Some("insufficient funds"));
    assert_eq!(r.fee, 10);
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 90,
            nonce: 1,
            ..Account::default()
        }
    );
    assert_eq!(
        chain.state.account(&bob.address(), chain.height).unwrap(),
        None
    );
    assert_eq!(chain.account(&proposer()), funded(10));
    // Exactly the balance left after the fee works.
    let out = chain.block(proposer(), &[transfer(&alice, 1, 10, bob.address(), 80)]);
    assert!(out.receipts[0].success);
    assert_eq!(chain.account(&alice.address()).balance, 0);
}

#[test]
fn nonces_sequence_within_one_block() {
    let (alice, bob) = (key(1), key(2));
    let mut chain = Chain::new(&[(alice.address(), funded(1_000))]);
    let txs: Vec<Transaction> = (0..3)
        .map(|n| transfer(&alice, n, 10, bob.address(), 5))
        .collect();
    let out = chain.block(proposer(), &txs);
    assert!(out.receipts.iter().all(|r| r.success), "{:?}", out.receipts);
    assert_eq!(
        out.receipts.iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 955,
            nonce: 3,
            ..Account::default()
        }
    );
    assert_eq!(chain.account(&bob.address()).balance, 15);
    assert_eq!(chain.account(&proposer()).balance, 30);
    // A replay of nonce 1 is rejected in the next block.
    let out = chain.block(proposer(), &[txs[1].clone()]);
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("bad nonce: expected 3, got 1")
    );
}

#[test]
fn later_transactions_see_earlier_ones() {
    let (alice, bob, carol) = (key(1), key(2), key(3));
    let mut chain = Chain::new(&[(alice.address(), funded(100))]);
    // Bob has nothing until Alice's transfer earlier in the same block.
    let txs = [
        transfer(&alice, 0, 10, bob.address(), 50),
        transfer(&bob, 0, 10, carol.address(), 40),
    ];
    let out = chain.block(proposer(), &txs);
    assert!(out.receipts.iter().all(|r| r.success));
    assert_eq!(
        chain.account(&bob.address()),
        Account {
            balance: 0,
            nonce: 1,
            ..Account::default()
        }
    );
    assert_eq!(chain.account(&carol.address()).balance, 40);
}

#[test]
fn sending_to_oneself_costs_only_the_fee() {
    let alice = key(1);
    let mut chain = Chain::new(&[(alice.address(), funded(100))]);
    let out = chain.block(proposer(), &[transfer(&alice, 0, 10, alice.address(), 90)]);
    assert!(out.receipts[0].success);
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 90,
            nonce: 1,
            ..Account::default()
        }
    );
    // And when the sender also proposes, it costs nothing.
    let out = chain.block(
        alice.address(),
        &[transfer(&alice, 1, 10, alice.address(), 90)],
    );
    assert!(out.receipts[0].success);
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 90,
            nonce: 2,
            ..Account::default()
        }
    );
}

#[test]
fn bond_unbond_and_release_after_the_period() {
    let alice = key(1);
    let mut chain = Chain::new(&[(alice.address(), funded(1_000))]);
    let bond = |n, amount| Transaction::sign(&alice, CHAIN, n, 10, TxKind::Bond { amount });
    let unbond = |n, amount| Transaction::sign(&alice, CHAIN, n, 10, TxKind::Unbond { amount });

    let out = chain.block(proposer(), &[bond(0, 500), bond(1, 481)]);
    assert!(out.receipts[0].success);
    assert_eq!(out.receipts[1].error.as_deref(), Some("insufficient funds"));
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 480,
            nonce: 2,
            stake: 500,
            unbonding: vec![],
            jailed: false,
        }
    );

    // Height 2: unbond 200, released at 2 + 3 = 5.
    let out = chain.block(proposer(), &[unbond(2, 200), unbond(3, 301)]);
    assert!(out.receipts[0].success);
    assert_eq!(out.receipts[1].error.as_deref(), Some("insufficient stake"));
    let entry = Unbonding {
        amount: 200,
        release_height: 5,
    };
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 460,
            nonce: 4,
            stake: 300,
            unbonding: vec![entry.clone()],
            jailed: false,
        }
    );

    // Height 3 and 4: not yet.
    chain.block(proposer(), &[bond(4, 0)]);
    chain.block(proposer(), &[bond(5, 0)]);
    assert_eq!(chain.account(&alice.address()).unbonding, vec![entry]);
    assert_eq!(chain.account(&alice.address()).balance, 440);

    // Height 5: a rejected transaction does not materialise the release...
    let out = chain.block(proposer(), &[bond(0, 0)]);
    assert!(!out.receipts[0].success);
    assert!(out.changed.is_empty());
    // ...an accepted one at height 6 sees and keeps the released balance (440 + 200 - 10 fee).
    let out = chain.block(proposer(), &[transfer(&alice, 6, 10, proposer(), 630)]);
    assert!(out.receipts[0].success, "{:?}", out.receipts);
    assert_eq!(
        chain.account(&alice.address()),
        Account {
            balance: 0,
            nonce: 7,
            stake: 300,
            unbonding: vec![],
            jailed: false,
        }
    );
}

#[test]
fn overflows_are_refused_cleanly() {
    let (alice, rich) = (key(1), key(2));
    let mut chain = Chain::new(&[
        (alice.address(), funded(1_000)),
        (rich.address(), funded(u64::MAX - 5)),
    ]);
    // Recipient overflow: the transfer fails, the fee is paid.
    let out = chain.block(proposer(), &[transfer(&alice, 0, 10, rich.address(), 6)]);
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("recipient balance would overflow")
    );
    assert_eq!(out.receipts[0].fee, 10);
    assert_eq!(chain.account(&rich.address()).balance, u64::MAX - 5);
    assert_eq!(chain.account(&alice.address()).balance, 990);

    // Proposer overflow: the whole transaction is rejected.
    assert_rejected_with_proposer(
        &mut chain,
        transfer(&alice, 1, 10, proposer(), 1),
        rich.address(),
    );

    // Stake overflow.
    let mut chain = Chain::new(&[(
        alice.address(),
        Account {
            balance: 1_000,
            stake: u64::MAX,
            ..Account::default()
        },
    )]);
    let out = chain.block(
        proposer(),
        &[Transaction::sign(
            &alice,
            CHAIN,
            0,
            10,
            TxKind::Bond { amount: 1 },
        )],
    );
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("stake would overflow")
    );

    // Huge amounts are just insufficient.
    let out = chain.block(proposer(), &[transfer(&alice, 1, 10, proposer(), u64::MAX)]);
    assert_eq!(out.receipts[0].error.as_deref(), Some("insufficient funds"));
    let out = chain.block(proposer(), &[transfer(&alice, 2, u64::MAX, proposer(), 1)]);
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some(&*format!("cannot pay fee {}: balance 980", u64::MAX))
    );
}

fn assert_rejected_with_proposer(chain: &mut Chain, tx: Transaction, proposer: Address) {
    let before = chain.state.root(chain.height).unwrap();
    let out = chain.block(proposer, std::slice::from_ref(&tx));
    assert!(!out.receipts[0].success);
    assert_eq!(out.receipts[0].fee, 0);
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("fee would overflow the proposer's balance")
    );
    assert_eq!(out.state_root, before);
}

#[test]
fn unbond_release_height_overflow_is_a_failure() {
    let alice = key(1);
    let store = Arc::new(MemStore::new());
    let state = State::new(
        store.clone(),
        ExecParams {
            chain_id: CHAIN.into(),
            min_fee: 0,
            unbonding_period: u64::MAX,
            slash_fraction_ppm: 0,
        },
    );
    let mut batch = WriteBatch::new();
    state
        .init_genesis(
            &[(
                alice.address(),
                Account {
                    balance: 5,
                    stake: 5,
                    ..Account::default()
                },
            )],
            &[],
            &mut batch,
        )
        .unwrap();
    store.write(batch).unwrap();
    let tx = Transaction::sign(&alice, CHAIN, 0, 0, TxKind::Unbond { amount: 1 });
    let out = state
        .execute_block(
            &BlockEnv {
                height: 1,
                proposer: proposer(),
                evidence: Vec::new(),
            },
            &[tx],
            &mut WriteBatch::new(),
        )
        .unwrap();
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("release height would overflow")
    );
}

fn mixed_block() -> (Vec<(Address, Account)>, Vec<Transaction>) {
    let keys: Vec<Keypair> = (0..20).map(key).collect();
    let genesis: Vec<(Address, Account)> =
        keys.iter().map(|k| (k.address(), funded(10_000))).collect();
    let mut txs = Vec::new();
    for round in 0..5u64 {
        for (i, k) in keys.iter().enumerate() {
            let to = keys[(i * 7 + 3) % keys.len()].address();
            let kind = match (i + round as usize) % 4 {
                0 => TxKind::Bond { amount: 100 },
                1 => TxKind::Unbond { amount: 50 },
                _ => TxKind::Transfer {
                    to,
                    amount: 300 * (round + 1),
                },
            };
            let mut tx = Transaction::sign(k, CHAIN, round, 10 + round, kind);
            if i == 13 && round == 2 {
                tx.signature.0[5] ^= 1;
            }
            txs.push(tx);
        }
    }
    (genesis, txs)
}

#[test]
fn execution_is_deterministic() {
    let (genesis, txs) = mixed_block();
    let run = || {
        let store = Arc::new(MemStore::new());
        let state = State::new(store.clone(), params());
        let mut batch = WriteBatch::new();
        state.init_genesis(&genesis, &[], &mut batch).unwrap();
        store.write(batch).unwrap();
        let mut batch = WriteBatch::new();
        let out = state
            .execute_block(
                &BlockEnv {
                    height: 1,
                    proposer: proposer(),
                    evidence: Vec::new(),
                },
                &txs,
                &mut batch,
            )
            .unwrap();
        (out, batch)
    };
    let (a, batch_a) = run();
    let (b, batch_b) = run();
    assert_eq!(a, b);
    assert_eq!(batch_a, batch_b);
    assert!(a.receipts.iter().any(|r| r.success));
    assert!(a
        .receipts
        .iter()
        .any(|r| r.error.as_deref() == Some("invalid signature")));
}

#[test]
fn account_proofs_verify_against_the_block_root() {
    let (alice, bob) = (key(1), key(2));
    let mut chain = Chain::new(&[(alice.address(), funded(1_000))]);
    let out = chain.block(proposer(), &[transfer(&alice, 0, 10, bob.address(), 100)]);
    let (account, proof, root) = chain.state.account_with_proof(&bob.address(), 1).unwrap();
    assert_eq!(root, out.state_root);
    let account = account.unwrap();
    verify_proof(
        &root,
        &account_key(&bob.address()),
        Some(&account.encode()),
        &proof,
    )
    .unwrap();
    // An address that never appeared: a proof of absence.
    let nobody = Address([1; 20]);
    let (none, proof, root) = chain.state.account_with_proof(&nobody, 1).unwrap();
    assert_eq!(none, None);
    verify_proof(&root, &account_key(&nobody), None, &proof).unwrap();
    // Old versions still answer.
    assert_eq!(chain.state.account(&bob.address(), 0).unwrap(), None);
}

#[test]
fn heights_and_genesis_are_checked() {
    let alice = key(1);
    let chain = Chain::new(&[(alice.address(), funded(1))]);
    let mut batch = WriteBatch::new();
    let env0 = BlockEnv {
        height: 0,
        proposer: proposer(),
        evidence: Vec::new(),
    };
    assert!(matches!(
        chain.state.execute_block(&env0, &[], &mut batch),
        Err(Error::GenesisHeight)
    ));
    let env5 = BlockEnv {
        height: 5,
        proposer: proposer(),
        evidence: Vec::new(),
    };
    assert!(matches!(
        chain.state.execute_block(&env5, &[], &mut batch),
        Err(Error::VersionNotFound(4))
    ));
    let dup = [(alice.address(), funded(1)), (alice.address(), funded(2))];
    assert!(matches!(
        chain.state.init_genesis(&dup, &[], &mut batch),
        Err(Error::DuplicateGenesisAccount(_))
    ));
    // An empty block still produces a version with the parent's root.
    let out = chain
        .state
        .execute_block(
            &BlockEnv {
                height: 1,
                proposer: proposer(),
                evidence: Vec::new(),
            },
            &[],
            &mut batch,
        )
        .unwrap();
    assert_eq!(out.state_root, chain.state.root(0).unwrap());
}

// ---- Validator registry, stakes and slashing ----

fn staked(balance: u64, stake: u64) -> Account {
    Account {
        balance,
        stake,
        ..Account::default()
    }
}

fn bond(k: &Keypair, nonce: u64, amount: u64) -> Transaction {
    Transaction::sign(k, CHAIN, nonce, 10, TxKind::Bond { amount })
}

fn unbond(k: &Keypair, nonce: u64, amount: u64) -> Transaction {
    Transaction::sign(k, CHAIN, nonce, 10, TxKind::Unbond { amount })
}

/// Two votes of `k` for different blocks in `round` on `chain`.
fn equivocation(k: &Keypair, chain: &str, round: u64) -> Evidence {
    Evidence {
        first: Vote::sign(k, chain, Hash([0xA1; 32]), 4, round),
        second: Vote::sign(k, chain, Hash([0xB2; 32]), 4, round),
    }
}

/// Validators 1, 2, 3 with stakes 1,000,000 / 2,000,000 / 3,000,000 and balance 1,000, plus
/// alice (seed 10), funded and not a validator.
fn validator_chain() -> (Chain, Vec<Keypair>) {
    let vals: Vec<Keypair> = (1..=3).map(key).collect();
    let mut accounts: Vec<(Address, Account)> = vals
        .iter()
        .zip(1u64..)
        .map(|(k, i)| (k.address(), staked(1_000, i * 1_000_000)))
        .collect();
    accounts.push((key(10).address(), funded(10_000)));
    let keys: Vec<PublicKey> = vals.iter().map(Keypair::public).collect();
    (Chain::with_validators(&accounts, &keys), vals)
}

fn stake_of(entries: &[StakeEntry], addr: &Address) -> Option<u64> {
    entries.iter().find(|e| e.address == *addr).map(|e| e.stake)
}

/// Balances, stakes and unbonding of `addrs` at the chain's height, summed.
fn supply(chain: &Chain, addrs: &[Address]) -> u64 {
    addrs
        .iter()
        .map(|a| {
            let acc = chain.account(a);
            acc.balance + acc.stake + acc.unbonding.iter().map(|u| u.amount).sum::<u64>()
        })
        .sum()
}

#[test]
fn genesis_registers_the_validators_and_stakes_lists_them_by_address() {
    let (chain, vals) = validator_chain();
    let registry = chain.state.validator_registry(0).unwrap();
    assert_eq!(registry.len(), 3);
    for v in &vals {
        assert_eq!(registry.get(&v.address()), Some(&v.public()));
    }
    let stakes = chain.state.stakes(0).unwrap();
    let mut expected: Vec<StakeEntry> = vals
        .iter()
        .zip(1u64..)
        .map(|(k, i)| StakeEntry {
            address: k.address(),
            public_key: k.public(),
            stake: i * 1_000_000,
        })
        .collect();
    expected.sort_by_key(|e| e.address);
    assert_eq!(stakes, expected);

    // The registry is part of the state root, with a proof like any account.
    let (value, proof) = chain
        .state
        .tree()
        .get_with_proof(0, &ValidatorRegistry::key())
        .unwrap();
    let value = value.unwrap();
    assert_eq!(value, registry.encode());
    verify_proof(
        &chain.state.root(0).unwrap(),
        &ValidatorRegistry::key(),
        Some(&value),
        &proof,
    )
    .unwrap();

    // No validators: no registry entry, so the root is exactly the accounts' root.
    let plain = Chain::new(&[(key(10).address(), funded(10_000))]);
    assert!(plain.state.validator_registry(0).unwrap().is_empty());
    assert!(plain.state.stakes(0).unwrap().is_empty());
    let root = StateTree::new(Arc::new(MemStore::new()))
        .apply(
            None,
            0,
            &[(
                account_key(&key(10).address()),
                Some(funded(10_000).encode()),
            )],
            &mut WriteBatch::new(),
        )
        .unwrap();
    assert_eq!(plain.state.root(0).unwrap(), root);

    // A registered key without stake is not a candidate; duplicates are refused.
    let lone = Chain::with_validators(&[], &[key(4).public()]);
    assert_eq!(lone.state.validator_registry(0).unwrap().len(), 1);
    assert!(lone.state.stakes(0).unwrap().is_empty());
    assert!(matches!(
        chain.state.init_genesis(
            &[],
            &[key(4).public(), key(4).public()],
            &mut WriteBatch::new()
        ),
        Err(Error::DuplicateGenesisValidator(a)) if a == key(4).address()
    ));
    assert!(matches!(
        chain.state.stakes(7),
        Err(Error::VersionNotFound(7))
    ));
}

#[test]
fn bond_registers_a_new_validator_once_and_stakes_includes_it() {
    let (mut chain, _) = validator_chain();
    let (alice, bob) = (key(10), key(11));
    let registry_0 = chain.state.validator_registry(0).unwrap();

    // A failed bond and a zero bond register nobody.
    chain.block(proposer(), &[transfer(&alice, 0, 10, bob.address(), 100)]);
    let out = chain.block(proposer(), &[bond(&bob, 0, 0), bond(&alice, 1, 1_000_000)]);
    assert!(out.receipts[0].success);
    assert_eq!(out.receipts[1].error.as_deref(), Some("insufficient funds"));
    assert_eq!(chain.state.validator_registry(2).unwrap(), registry_0);

    // Two bonds in one block: registered once, stake is the sum, effective immediately in
    // `stakes` (consensus decides when a snapshot becomes a validator set).
    let out = chain.block(proposer(), &[bond(&alice, 2, 100), bond(&alice, 3, 50)]);
    assert!(out.receipts.iter().all(|r| r.success), "{:?}", out.receipts);
    let registry = chain.state.validator_registry(3).unwrap();
    assert_eq!(registry.len(), 4);
    assert_eq!(registry.get(&alice.address()), Some(&alice.public()));
    let stakes = chain.state.stakes(3).unwrap();
    assert_eq!(stakes.len(), 4);
    assert_eq!(stake_of(&stakes, &alice.address()), Some(150));
    assert!(stakes.windows(2).all(|w| w[0].address < w[1].address));
    // The earlier version still answers as it was.
    assert_eq!(chain.state.stakes(2).unwrap().len(), 3);

    // Bonding again changes the stake but not the registry bytes.
    let before = chain
        .state
        .tree()
        .get(3, &ValidatorRegistry::key())
        .unwrap();
    chain.block(proposer(), &[bond(&alice, 4, 5)]);
    assert_eq!(
        chain
            .state
            .tree()
            .get(4, &ValidatorRegistry::key())
            .unwrap(),
        before
    );
    assert_eq!(
        stake_of(&chain.state.stakes(4).unwrap(), &alice.address()),
        Some(155)
    );
}

#[test]
fn unbonding_to_zero_leaves_stakes_but_not_the_registry() {
    let (mut chain, vals) = validator_chain();
    let v = &vals[0];
    let out = chain.block(proposer(), &[unbond(v, 0, 1_000_000)]);
    assert!(out.receipts[0].success);
    let stakes = chain.state.stakes(1).unwrap();
    assert_eq!(stake_of(&stakes, &v.address()), None);
    assert_eq!(stakes.len(), 2);
    assert!(chain
        .state
        .validator_registry(1)
        .unwrap()
        .contains(&v.address()));
    // Bonding again brings it back, without a new registration.
    chain.block(proposer(), &[bond(v, 1, 7)]);
    assert_eq!(
        stake_of(&chain.state.stakes(2).unwrap(), &v.address()),
        Some(7)
    );
    assert_eq!(chain.state.validator_registry(2).unwrap().len(), 3);
}

#[test]
fn evidence_slashes_stake_and_unbonding_burns_it_and_jails() {
    let (mut chain, vals) = validator_chain();
    let (v, other) = (&vals[0], &vals[1]);
    let all: Vec<Address> = vals
        .iter()
        .map(Keypair::address)
        .chain([key(10).address(), proposer()])
        .collect();
    // Height 1: unbond 200,000 (released at 1 + 3 = 4).
    chain.block(proposer(), &[unbond(v, 0, 200_000)]);
    let supply_before = supply(&chain, &all);

    // Height 2: evidence, twice for the same offender in one block.
    let out = chain.block_with_evidence(
        proposer(),
        vec![equivocation(v, CHAIN, 9), equivocation(v, CHAIN, 10)],
        &[],
    );
    // 5% of 800,000 stake + 5% of the 200,000 unbonding.
    assert_eq!(out.slashed, vec![(v.address(), 40_000 + 10_000)]);
    assert_eq!(
        out.changed,
        vec![(
            v.address(),
            Account {
                balance: 990,
                nonce: 1,
                stake: 760_000,
                unbonding: vec![Unbonding {
                    amount: 190_000,
                    release_height: 4
                }],
                jailed: true,
            }
        )]
    );
    assert_eq!(supply(&chain, &all), supply_before - 50_000);
    let stakes = chain.state.stakes(2).unwrap();
    assert_eq!(stake_of(&stakes, &v.address()), None);
    assert_eq!(stake_of(&stakes, &other.address()), Some(2_000_000));
    assert_eq!(stakes.len(), 2);
    assert!(chain
        .state
        .validator_registry(2)
        .unwrap()
        .contains(&v.address()));

    // Height 3: more evidence against the jailed offender is a no-op.
    let root = chain.state.root(2).unwrap();
    let out = chain.block_with_evidence(proposer(), vec![equivocation(v, CHAIN, 11)], &[]);
    assert!(out.slashed.is_empty());
    assert!(out.changed.is_empty());
    assert_eq!(out.state_root, root);

    // Height 4: the slashed unbonding is released as it stands.
    chain.block(proposer(), &[transfer(v, 1, 10, proposer(), 0)]);
    let acc = chain.account(&v.address());
    assert_eq!(
        (acc.balance, acc.stake, acc.unbonding.len(), acc.jailed),
        (990 - 10 + 190_000, 760_000, 0, true)
    );
}

#[test]
fn invalid_evidence_is_ignored() {
    let (mut chain, vals) = validator_chain();
    let (v, w) = (&vals[0], &vals[1]);
    let good = equivocation(v, CHAIN, 3);

    let mut bad_signature = good.clone();
    bad_signature.second.signature.0[0] ^= 1;
    let not_conflicting = Evidence {
        first: good.first.clone(),
        second: good.first.clone(),
    };
    let two_voters = Evidence {
        first: good.first.clone(),
        second: Vote::sign(w, CHAIN, Hash([0xB2; 32]), 4, 3),
    };
    let mut forged = Vote::sign(w, CHAIN, Hash([0xB2; 32]), 4, 3);
    forged.voter = v.address();
    let forged = Evidence {
        first: good.first.clone(),
        second: forged,
    };
    let cases = [
        ("bad signature", bad_signature),
        ("wrong chain", equivocation(v, "other-chain", 3)),
        ("not conflicting", not_conflicting),
        ("two voters", two_voters),
        ("forged vote", forged),
        ("unknown offender", equivocation(&key(10), CHAIN, 3)),
    ];
    for (what, evidence) in cases {
        let root = chain.state.root(chain.height).unwrap();
        let out = chain.block_with_evidence(proposer(), vec![evidence], &[]);
        assert!(out.slashed.is_empty(), "{what}");
        assert!(out.changed.is_empty(), "{what}");
        assert_eq!(out.state_root, root, "{what}");
    }
    assert_eq!(chain.state.stakes(chain.height).unwrap().len(), 3);

    // An invalid piece does not stop a valid one after it.
    let out = chain.block_with_evidence(
        proposer(),
        vec![equivocation(&key(10), CHAIN, 3), good],
        &[],
    );
    assert_eq!(out.slashed, vec![(v.address(), 50_000)]);
}

#[test]
fn evidence_against_a_new_bonder_needs_its_registration_from_an_earlier_block() {
    let (mut chain, _) = validator_chain();
    let alice = key(10);
    // Evidence is applied before transactions, against the parent's registry.
    let out = chain.block_with_evidence(
        proposer(),
        vec![equivocation(&alice, CHAIN, 1)],
        &[bond(&alice, 0, 1_000)],
    );
    assert!(out.slashed.is_empty());
    assert!(out.receipts[0].success);
    let out = chain.block_with_evidence(proposer(), vec![equivocation(&alice, CHAIN, 1)], &[]);
    assert_eq!(out.slashed, vec![(alice.address(), 50)]);
    assert!(chain.account(&alice.address()).jailed);
}

#[test]
fn a_jailed_validator_cannot_bond_but_can_unbond() {
    let (mut chain, vals) = validator_chain();
    let v = &vals[0];
    // Evidence comes first, so a bond in the same block is already refused.
    let out = chain.block_with_evidence(
        proposer(),
        vec![equivocation(v, CHAIN, 1)],
        &[bond(v, 0, 10)],
    );
    assert_eq!(out.slashed, vec![(v.address(), 50_000)]);
    let r = &out.receipts[0];
    assert!(!r.success);
    assert_eq!(r.error.as_deref(), Some("validator is jailed"));
    assert_eq!(r.fee, 10);
    let acc = chain.account(&v.address());
    assert_eq!((acc.balance, acc.nonce, acc.stake), (990, 1, 950_000));

    let out = chain.block(proposer(), &[bond(v, 1, 0), unbond(v, 2, 950_000)]);
    assert_eq!(
        out.receipts[0].error.as_deref(),
        Some("validator is jailed")
    );
    assert!(out.receipts[1].success);
    let acc = chain.account(&v.address());
    assert_eq!((acc.nonce, acc.stake, acc.jailed), (3, 0, true));
    assert_eq!(
        acc.unbonding,
        vec![Unbonding {
            amount: 950_000,
            release_height: 2 + PERIOD
        }]
    );
}

#[test]
fn blocks_with_evidence_and_bonds_are_deterministic() {
    let (genesis, txs) = mixed_block();
    let vals: Vec<Keypair> = (0..4).map(key).collect();
    let validator_keys: Vec<PublicKey> = vals.iter().map(Keypair::public).collect();
    let genesis: Vec<(Address, Account)> = genesis
        .into_iter()
        .map(|(a, mut acc)| {
            if vals.iter().any(|k| k.address() == a) {
                acc.stake = 123_457;
            }
            (a, acc)
        })
        .collect();
    let mut bad = equivocation(&vals[2], CHAIN, 5);
    bad.first.signature.0[1] ^= 1;
    let evidence = vec![
        equivocation(&vals[1], CHAIN, 5),
        bad,
        equivocation(&vals[3], CHAIN, 6),
        equivocation(&vals[1], CHAIN, 7),
    ];
    let run = || {
        let store = Arc::new(MemStore::new());
        let state = State::new(store.clone(), params());
        let mut batch = WriteBatch::new();
        state
            .init_genesis(&genesis, &validator_keys, &mut batch)
            .unwrap();
        store.write(batch).unwrap();
        let mut batch = WriteBatch::new();
        let env = BlockEnv {
            height: 1,
            proposer: proposer(),
            evidence: evidence.clone(),
        };
        let out = state.execute_block(&env, &txs, &mut batch).unwrap();
        store.write(batch.clone()).unwrap();
        (out, batch, state.stakes(1).unwrap())
    };
    let (a, batch_a, stakes_a) = run();
    let (b, batch_b, stakes_b) = run();
    assert_eq!(a, b);
    assert_eq!(batch_a, batch_b);
    assert_eq!(stakes_a, stakes_b);
    // floor(123,457 * 5%) = 6,172 for each of the two valid offenders.
    assert_eq!(
        a.slashed,
        vec![(vals[1].address(), 6_172), (vals[3].address(), 6_172)]
    );
    // The mixed block bonds from 20 accounts: the 4 genesis validators plus the new bonders,
    // minus the two jailed ones (whose bonds are refused).
    assert!(stakes_a
        .iter()
        .all(|e| e.address != vals[1].address() && e.address != vals[3].address()));
    assert!(stakes_a.len() > 2);
}

// ---- The parallel executor against the sequential one ----

mod parallel_matches_sequential {
    use proptest::prelude::*;

    use super::*;

    /// Keys 0..12 send; 12..16 only receive; 16 is the hot account; validators are 0, 1, 2.
    const SENDERS: u64 = 12;
    const ACCOUNTS: u64 = 17;
    const HOT: u64 = 16;

    fn keys() -> Vec<Keypair> {
        (0..ACCOUNTS).map(|i| key(100 + i)).collect()
    }

    /// One generated transaction: (sender, nonce skew, fee, kind, recipient, amount, corrupt).
    type TxSpec = (u64, u8, u64, u8, u64, u64, bool);

    fn tx_spec() -> impl Strategy<Value = TxSpec> {
        (
            0..SENDERS,
            prop_oneof![9 => Just(0u8), 1 => 1u8..3],
            prop_oneof![9 => Just(10u64), 1 => 0u64..30],
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            // 30% to the hot account, the rest anywhere.
            prop_oneof![3 => Just(HOT), 7 => 0..ACCOUNTS],
            prop_oneof![3 => 0u64..1_000, 1 => 0u64..20_000, 1 => Just(u64::MAX / 2)],
            prop::bool::weighted(0.03),
        )
    }

    fn build(keys: &[Keypair], specs: &[TxSpec], nonces: &mut [u64]) -> Vec<Transaction> {
        specs
            .iter()
            .map(|&(s, skew, fee, kind, to, amount, corrupt)| {
                let k = &keys[s as usize];
                let nonce = nonces[s as usize] + u64::from(skew);
                if skew == 0 {
                    nonces[s as usize] += 1;
                }
                let kind = match kind {
                    0 => TxKind::Transfer {
                        to: keys[to as usize].address(),
                        amount,
                    },
                    1 => TxKind::Bond {
                        amount: amount % 5_000,
                    },
                    _ => TxKind::Unbond {
                        amount: amount % 5_000,
                    },
                };
                let mut tx = Transaction::sign(k, CHAIN, nonce, fee, kind);
                if corrupt {
                    tx.signature.0[9] ^= 2;
                }
                tx
            })
            .collect()
    }

    fn genesis(keys: &[Keypair], rich: bool) -> (Vec<(Address, Account)>, Vec<PublicKey>) {
        let accounts = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let account = match i {
                    0..=2 => staked(5_000, 1_000_000),
                    // Near the top of u64: credits to them can overflow.
                    15 | 16 if rich => funded(u64::MAX - 50_000),
                    _ => funded(10_000 + 3_000 * i as u64),
                };
                (k.address(), account)
            })
            .collect();
        (accounts, keys[..3].iter().map(Keypair::public).collect())
    }

    fn chain(accounts: &[(Address, Account)], validators: &[PublicKey]) -> Chain {
        Chain::with_validators(accounts, validators)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn receipts_state_and_batches_are_identical(
            blocks in prop::collection::vec(prop::collection::vec(tx_spec(), 32..140), 1..4),
            proposer_sends in prop::bool::weighted(0.15),
            rich in prop::bool::weighted(0.25),
            evidence_at in prop::option::weighted(0.3, 0usize..3),
        ) {
            let keys = keys();
            let (accounts, validators) = genesis(&keys, rich);
            let par = chain(&accounts, &validators);
            let seq = chain(&accounts, &validators);
            let mut nonces = vec![0u64; ACCOUNTS as usize];
            for (b, specs) in blocks.iter().enumerate() {
                let height = b as u64 + 1;
                let txs = build(&keys, specs, &mut nonces);
                let proposer = if proposer_sends { keys[3].address() } else { proposer() };
                let evidence = match evidence_at {
                    Some(v) if v == b => vec![equivocation(&keys[v], CHAIN, 7)],
                    _ => Vec::new(),
                };
                let env = BlockEnv { height, proposer, evidence };
                let parallel = par.state.execute_parallel(&env, &txs).unwrap();
                // The parallel path really runs whenever the block's shape allows it (only an
                // overflow, possible with `rich`, sends it back).
                let proposer_is_sender = txs.iter().any(|t| t.sender == proposer);
                if proposer_is_sender {
                    prop_assert!(parallel.is_none());
                } else if !rich {
                    prop_assert!(parallel.is_some());
                }
                let reference = seq.state.execute_sequential(&env, &txs).unwrap();
                if let Some(p) = &parallel {
                    prop_assert_eq!(p, &reference);
                }
                let full = par.state.execute(&env, &txs).unwrap();
                prop_assert_eq!(&full, &reference);
                let (mut bp, mut bs) = (WriteBatch::new(), WriteBatch::new());
                let op = par.state.stage(full, &mut bp).unwrap();
                let os = seq.state.stage(reference, &mut bs).unwrap();
                prop_assert_eq!(op, os);
                prop_assert_eq!(&bp, &bs);
                par.store.write(bp).unwrap();
                seq.store.write(bs).unwrap();
            }
        }
    }

    #[test]
    fn a_hot_recipient_does_not_serialize_the_block() {
        let keys = keys();
        let (accounts, validators) = genesis(&keys, false);
        let c = chain(&accounts, &validators);
        let mut nonces = vec![0u64; ACCOUNTS as usize];
        // Every sender pays the hot account, twice.
        let specs: Vec<TxSpec> = (0..2)
            .flat_map(|_| (0..SENDERS).map(|s| (s, 0, 10, 0, HOT, 7, false)))
            .chain((0..SENDERS).map(|s| (s, 0, 10, 0, 13, 1, false)))
            .collect();
        let txs = build(&keys, &specs, &mut nonces);
        let env = BlockEnv {
            height: 1,
            proposer: proposer(),
            evidence: Vec::new(),
        };
        let (groups, credit_only) = super::super::parallel::plan_for_tests(&env, &txs).unwrap();
        assert_eq!(groups, SENDERS as usize, "one group per sender");
        assert!(credit_only.contains(&keys[HOT as usize].address()));
        assert!(credit_only.contains(&proposer()));
        let out = c.state.execute_parallel(&env, &txs).unwrap().unwrap();
        assert!(out.receipts.iter().all(|r| r.success));
        let hot = out
            .changed
            .iter()
            .find(|(a, _)| *a == keys[HOT as usize].address())
            .unwrap();
        assert_eq!(
            hot.1.balance,
            accounts[HOT as usize].1.balance + 7 * 2 * SENDERS
        );
        assert_eq!(out, c.state.execute_sequential(&env, &txs).unwrap());
    }

    #[test]
    fn senders_paying_each_other_share_a_group_and_overflow_falls_back() {
        let keys = keys();
        let (accounts, validators) = genesis(&keys, true);
        let c = chain(&accounts, &validators);
        let mut nonces = vec![0u64; ACCOUNTS as usize];
        // 0 -> 1 -> 2 chain of payments (one group), the rest alone; then 10 and 11 push the
        // rich account 15 over u64::MAX.
        let mut specs: Vec<TxSpec> =
            vec![(0, 0, 10, 0, 1, 100, false), (1, 0, 10, 0, 2, 100, false)];
        specs.extend((5..SENDERS).map(|s| (s, 0, 10, 0, 13, 1, false)));
        specs.extend((0..30).map(|i| (5 + i % 7, 0, 10, 0, 14, 1, false)));
        let txs = build(&keys, &specs, &mut nonces);
        let env = BlockEnv {
            height: 1,
            proposer: proposer(),
            evidence: Vec::new(),
        };
        let (groups, _) = super::super::parallel::plan_for_tests(&env, &txs).unwrap();
        assert_eq!(groups, 1 + (SENDERS as usize - 5));
        assert!(c.state.execute_parallel(&env, &txs).unwrap().is_some());

        let mut overflow = specs.clone();
        overflow.push((10, 0, 10, 0, 15, 30_000, false));
        overflow.push((11, 0, 10, 0, 15, 30_000, false));
        let mut nonces = vec![0u64; ACCOUNTS as usize];
        let txs = build(&keys, &overflow, &mut nonces);
        assert_eq!(c.state.execute_parallel(&env, &txs).unwrap(), None);
        let out = c.state.execute(&env, &txs).unwrap();
        assert_eq!(
            out.receipts.last().unwrap().error.as_deref(),
            Some("recipient balance would overflow")
        );
        assert_eq!(out, c.state.execute_sequential(&env, &txs).unwrap());
    }
}
