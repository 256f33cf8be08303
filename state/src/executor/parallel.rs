//! The parallel executor: the block's transactions are split into independent groups by
//! their access sets and the groups run on rayon.
//!
//! Every native transaction knows the accounts it may touch (`Transaction::touched`): its
//! sender, a transfer's recipient, and the block's proposer (the fee). Accounts split in two:
//!
//! - **ordered** accounts, the senders of the block: their transactions must see each other
//!   in block order (nonce, balance). Two senders are in the same group when one pays the
//!   other (union-find), so a group holds every transaction that can read an account it
//!   writes;
//! - **credit-only** accounts, everything else a transaction writes (recipients that do not
//!   send in this block, and the proposer): only credited, never read by a rule, so credits
//!   commute. Each group collects them, and they are summed into the accounts at the end.
//!   A popular recipient (an exchange, the proposer's fees) therefore never serializes the
//!   block.
//!
//! Exactness: a group's transactions run in block order with the same rules as the
//! sequential executor (`execute_tx` is shared), and nothing they read is written by another
//! group. The only order-dependent rule a credit can trigger is an overflow of the credited
//! balance; if any credit-only account's final sum does not fit in a u64, the whole block is
//! rerun sequentially (if the sum fits, no prefix of it overflowed, so the sequential run
//! would not have refused any credit either). The block also runs sequentially when the
//! proposer sends in its own block (every fee would then be ordered against its transactions).
//! Evidence is applied first, on one thread, exactly as in the sequential executor.

use std::collections::BTreeMap;

use keel_types::{Address, PublicKey, Receipt, Transaction};
use rayon::prelude::*;

use super::{run_tx, slot_in, BlockEnv, BlockRun, Execution, Ledger, Slot, State};
use crate::{fast_map, FastMap, FastSet, Result};

/// Blocks with fewer transactions run sequentially: below this the rayon tasks cost more
/// than they save. The result is the same either way.
const MIN_PARALLEL_TXS: usize = 32;

/// A set of transactions that must run in block order, and the ordered accounts they use.
#[derive(Default)]
struct Group {
    txs: Vec<usize>,
    accounts: Vec<Address>,
}

/// What one group produced.
struct GroupOutput {
    slots: FastMap<Address, Slot>,
    receipts: Vec<(usize, Receipt)>,
    credits: Vec<(Address, u64)>,
    bonded: BTreeMap<Address, PublicKey>,
}

/// One group's accounts while it runs.
struct GroupLedger<'a> {
    state: &'a State,
    env: &'a BlockEnv,
    base: u64,
    slots: FastMap<Address, Slot>,
    credit_only: &'a FastSet<Address>,
    credits: Vec<(Address, u64)>,
    bonded: BTreeMap<Address, PublicKey>,
}

impl Ledger for GroupLedger<'_> {
    fn slot(&mut self, addr: &Address) -> Result<&mut Slot> {
        // Every ordered account of the group is preloaded; a load here only happens if that
        // ever changes, and is still correct (no other group writes it).
        slot_in(
            &mut self.slots,
            self.state,
            addr,
            self.base,
            self.env.height,
        )
    }

    fn credit_only(&self, addr: &Address) -> bool {
        self.credit_only.contains(addr)
    }

    fn credits(&mut self) -> &mut Vec<(Address, u64)> {
        &mut self.credits
    }

    fn bonded(&mut self) -> &mut BTreeMap<Address, PublicKey> {
        &mut self.bonded
    }
}

/// Union-find over sender indices.
struct Groups {
    parent: Vec<u32>,
}

impl Groups {
    fn find(&mut self, mut i: u32) -> u32 {
        while self.parent[i as usize] != i {
            let up = self.parent[self.parent[i as usize] as usize];
            self.parent[i as usize] = up;
            i = up;
        }
        i
    }

    fn union(&mut self, a: u32, b: u32) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            // The smaller index becomes the root, so a group's root is its first sender.
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            self.parent[hi as usize] = lo;
        }
    }
}

/// Packs independent groups, in order, into about four work units per thread balanced by
/// transaction count. A unit runs its groups one after another: they share no ordered
/// account, so the outcome is the same, and a block of 10,000 one-transfer groups costs the
/// bookkeeping (account maps, outputs to merge) of a few units instead of 10,000.
fn into_units(groups: Vec<Group>, threads: usize) -> Vec<Group> {
    let total: usize = groups.iter().map(|g| g.txs.len()).sum();
    let target = total.div_ceil(threads.max(1).saturating_mul(4)).max(1);
    let mut units = Vec::new();
    let mut unit = Group::default();
    for group in groups {
        unit.txs.extend(group.txs);
        unit.accounts.extend(group.accounts);
        if unit.txs.len() >= target {
            units.push(std::mem::take(&mut unit));
        }
    }
    if !unit.txs.is_empty() {
        units.push(unit);
    }
    units
}

/// Splits the block into groups, or `None` if it must run sequentially.
fn plan(env: &BlockEnv, txs: &[Transaction]) -> Option<(Vec<Group>, FastSet<Address>)> {
    if txs.len() < MIN_PARALLEL_TXS || u32::try_from(txs.len()).is_err() {
        return None;
    }
    let mut sender_ids: FastMap<Address, u32> = fast_map(txs.len());
    let mut senders: Vec<Address> = Vec::new();
    for tx in txs {
        sender_ids.entry(tx.sender).or_insert_with(|| {
            senders.push(tx.sender);
            // Fits: there are fewer senders than transactions, checked above.
            (senders.len() - 1) as u32
        });
    }
    if sender_ids.contains_key(&env.proposer) {
        return None;
    }
    let mut uf = Groups {
        parent: (0..senders.len() as u32).collect(),
    };
    let mut credit_only: FastSet<Address> = FastSet::default();
    credit_only.insert(env.proposer);
    for tx in txs {
        let (sender, recipient) = tx.touched();
        if let Some(to) = recipient {
            match sender_ids.get(&to) {
                Some(&r) => uf.union(sender_ids[&sender], r),
                None => {
                    credit_only.insert(to);
                }
            }
        }
    }
    // Groups in order of their first sender, transactions in block order.
    let mut group_of_root: FastMap<u32, usize> = FastMap::default();
    let mut groups: Vec<Group> = Vec::new();
    for (i, tx) in txs.iter().enumerate() {
        let root = uf.find(sender_ids[&tx.sender]);
        let g = *group_of_root.entry(root).or_insert_with(|| {
            groups.push(Group::default());
            groups.len() - 1
        });
        groups[g].txs.push(i);
    }
    for (id, addr) in senders.iter().enumerate() {
        let root = uf.find(id as u32);
        if let Some(&g) = group_of_root.get(&root) {
            groups[g].accounts.push(*addr);
        }
    }
    Some((groups, credit_only))
}

/// Executes the block in parallel groups; `Ok(None)` means "run it sequentially" (the
/// block's shape does not allow groups, or a credit overflowed). Signatures are already
/// checked (`valid`).
pub(super) fn execute(
    state: &State,
    env: &BlockEnv,
    base: u64,
    txs: &[Transaction],
    valid: &[bool],
) -> Result<Option<Execution>> {
    let Some((groups, credit_only)) = plan(env, txs) else {
        return Ok(None);
    };
    let groups = into_units(groups, rayon::current_num_threads());

    // Load every account the block touches, in parallel.
    let mut touched: Vec<Address> = groups
        .iter()
        .flat_map(|g| g.accounts.iter().copied())
        .chain(credit_only.iter().copied())
        .chain(env.evidence.iter().map(|e| e.offender()))
        .collect();
    touched.par_sort_unstable();
    touched.dedup();
    let (loaded, read) = state.load_slots(&touched, base, env.height)?;
    let mut block = BlockRun::new(state, env, base, loaded);
    block.apply_evidence()?;

    // Hand each group its ordered accounts; the credit-only ones stay with the block.
    let mut work: Vec<(Group, FastMap<Address, Slot>)> = groups
        .into_iter()
        .map(|g| {
            let slots = fast_map(g.accounts.len());
            (g, slots)
        })
        .collect();
    let mut ordered: FastMap<Address, usize> =
        fast_map(work.iter().map(|(g, _)| g.accounts.len()).sum());
    for (i, (g, _)) in work.iter().enumerate() {
        ordered.extend(g.accounts.iter().map(|a| (*a, i)));
    }
    // Room for the ordered accounts too: they come back here after the run.
    let mut rest = fast_map(touched.len());
    for (addr, slot) in std::mem::take(&mut block.accounts) {
        match ordered.get(&addr).and_then(|&g| work.get_mut(g)) {
            Some((_, slots)) => {
                slots.insert(addr, slot);
            }
            None => {
                rest.insert(addr, slot);
            }
        }
    }
    block.accounts = rest;
    let params = &state.params;
    let outputs: Vec<GroupOutput> = work
        .into_par_iter()
        .map(|(group, slots)| {
            let mut ledger = GroupLedger {
                state,
                env,
                base,
                slots,
                credit_only: &credit_only,
                credits: Vec::new(),
                bonded: BTreeMap::new(),
            };
            let mut receipts = Vec::with_capacity(group.txs.len());
            for &i in &group.txs {
                let receipt = run_tx(&mut ledger, params, env, i, &txs[i], valid[i])?;
                receipts.push((i, receipt));
            }
            Ok(GroupOutput {
                slots: ledger.slots,
                receipts,
                credits: ledger.credits,
                bonded: ledger.bonded,
            })
        })
        .collect::<Result<_>>()?;

    // Merge: receipts by index, ordered accounts back, credits summed.
    let mut receipts: Vec<Option<Receipt>> = vec![None; txs.len()];
    let mut sums: FastMap<Address, u128> = fast_map(credit_only.len());
    for out in outputs {
        for (i, r) in out.receipts {
            receipts[i] = Some(r);
        }
        block.accounts.extend(out.slots);
        for (addr, key) in out.bonded {
            block.bonded.entry(addr).or_insert(key);
        }
        for (addr, amount) in out.credits {
            *sums.entry(addr).or_default() += u128::from(amount);
        }
    }
    for (addr, sum) in sums {
        let slot = block.slot(&addr)?;
        let total = u128::from(slot.current.balance) + sum;
        let Ok(balance) = u64::try_from(total) else {
            tracing::debug!(%addr, "credit overflow: block runs sequentially");
            return Ok(None);
        };
        slot.current.balance = balance;
        slot.dirty = true;
    }
    let receipts: Vec<Receipt> = receipts.into_iter().flatten().collect();
    debug_assert_eq!(receipts.len(), txs.len());
    let mut execution = block.finish(receipts)?;
    execution.read = read;
    Ok(Some(execution))
}

/// The number of groups and the credit-only accounts of a block, for tests.
#[cfg(test)]
pub(super) fn plan_for_tests(
    env: &BlockEnv,
    txs: &[Transaction],
) -> Option<(usize, FastSet<Address>)> {
    plan(env, txs).map(|(groups, credit_only)| (groups.len(), credit_only))
}
