//! The mempool: transactions waiting for a block, as a plain data structure (no I/O, no
//! async; the node keeps it behind a mutex).
//!
//! Invariants:
//! - At most `max_txs` transactions and `max_bytes` bytes (sum of [`held_bytes`]: each
//!   one's encoded size, chain id and bookkeeping) are held, and every index is bounded by the number of transactions, so memory is bounded by
//!   the limits.
//! - Each sender has at most [`MAX_NONCE_GAP`]` + 1` pending transactions, with nonces in
//!   `[committed, committed + MAX_NONCE_GAP]`; one per nonce.
//! - Eviction only ever removes the highest-nonce pending transaction of a sender, so it never
//!   opens a nonce gap.
//! - [`Mempool::select`] is a deterministic function of the pool's contents.
//!
//! The pool remembers each sender's committed nonce (the nonce its next transaction must
//! carry) from [`Mempool::insert`]'s `account_nonce` and [`Mempool::remove_committed`]'s
//! `new_nonces`, keeping the highest seen, since committed nonces only grow. It forgets a
//! sender when none of its transactions is left.
//!
//! The pool exports its size as `keel_mempool_txs`, a gauge it sets whenever a transaction
//! comes or goes, so a scrape reads it without taking the node's mempool lock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;

use keel_types::{Address, Hash, Transaction, TxKind};

use crate::units::allocation_size;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Largest accepted transaction (its `SignedTx` bytes).
pub const MAX_TX_BYTES: usize = 64 * 1024;

/// What the pool's hash index costs a transaction: its bucket (hash and sender/nonce) in a
/// table between half and seven-eighths full, with its control byte. [`held_bytes`] charges
/// this; [`Mempool::memory_bytes`] counts the table as it is instead.
const INDEX_BYTES: usize =
    (std::mem::size_of::<Hash>() + std::mem::size_of::<(Address, u64)>()) * 3 / 2 + 2;

/// What the pool charges a transaction besides its encoded bytes and chain id: its decoded
/// form (an allocation of its own), its slot in the sender's queue (a B-tree of nonces to
/// those allocations: 16 bytes a slot, counted three times over because a loaded node's
/// queues hold a few transactions each, in nodes of 11 slots) and its entry in the hash
/// index ([`INDEX_BYTES`]). With these, `max_bytes` bounds the memory the pool holds, not
/// only the encoded sizes (a 150-byte transfer costs about four times that).
pub const TX_OVERHEAD: usize =
    std::mem::size_of::<Entry>() + 3 * (8 + std::mem::size_of::<Box<Entry>>()) + INDEX_BYTES;

/// The smallest `max_bytes` that holds one transaction of the largest size.
pub const MIN_POOL_BYTES: u64 = (MAX_TX_BYTES + 1024) as u64;

/// Bytes the pool charges `tx` against `max_bytes`: what holding it costs in memory.
/// Each allocation counts at the allocator's size class ([`allocation_size`]), as jemalloc
/// does (a 150-byte transfer's bytes take 160).
pub fn held_bytes(tx: &Transaction) -> u64 {
    let entry = std::mem::size_of::<Entry>();
    // `TX_OVERHEAD` holds the entry at its requested size: swap in its size class.
    (TX_OVERHEAD - entry
        + allocation_size(entry)
        + allocation_size(tx.bytes.len())
        + allocation_size(tx.chain_id.len())) as u64
}

/// The pool's tables: std's hasher (SipHash with a per-process random key: peers choose the
/// senders and hashes) in hashbrown's table, which says how many bytes it holds.
type Map<K, V> = hashbrown::HashMap<K, V, std::collections::hash_map::RandomState>;

/// Bytes a table holds (its buckets and control bytes): it never shrinks by itself.
fn table_bytes<K: Eq + std::hash::Hash, V>(map: &Map<K, V>) -> u64 {
    allocation_size(map.allocation_size()) as u64
}

/// Tables of this many buckets or fewer are never shrunk (tens of KiB at most).
const MIN_SHRINK_BUCKETS: usize = 1024;

/// Shrinks `map` once less than a quarter of its buckets are in use, to about half full.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut Map<K, V>) {
    // (`capacity` is no guide: removals that leave tombstones lower it.)
    let buckets = map.allocation_size() / (std::mem::size_of::<(K, V)>() + 1);
    if buckets > MIN_SHRINK_BUCKETS && map.len() < buckets / 4 {
        map.shrink_to(map.len() * 3 / 2);
    }
}

/// How far ahead of a sender's committed nonce a transaction's nonce may be.
pub const MAX_NONCE_GAP: u64 = 64;

/// A transaction replacing a pending one with the same sender and nonce must pay a fee at
/// least this many percent higher (and strictly higher).
pub const REPLACEMENT_FEE_BUMP_PERCENT: u64 = 10;

/// Capacity of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MempoolLimits {
    /// Most transactions held.
    pub max_txs: usize,
    /// Most bytes held (sum of the transactions' [`held_bytes`]).
    pub max_bytes: u64,
}

/// Why a transaction was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The same transaction (by hash) is already pending.
    #[error("transaction already in the mempool")]
    Duplicate,
    /// The transaction is for another chain.
    #[error("wrong chain id: expected \"{expected}\", got \"{got}\"")]
    WrongChain {
        /// This node's chain id.
        expected: String,
        /// The transaction's chain id.
        got: String,
    },
    /// The fee is below the chain's minimum fee.
    #[error("fee {got} is below the minimum fee {min}")]
    FeeTooLow {
        /// The minimum fee.
        min: u64,
        /// The transaction's fee.
        got: u64,
    },
    /// The nonce is already used.
    #[error("nonce {got} is too low: the account's next nonce is {expected}")]
    NonceTooLow {
        /// The sender's committed nonce.
        expected: u64,
        /// The transaction's nonce.
        got: u64,
    },
    /// The nonce is too far ahead of the sender's committed nonce.
    #[error(
        "nonce {got} is too high: the account's next nonce is {expected} and at most {max_gap} \
         nonces ahead are accepted"
    )]
    NonceTooHigh {
        /// The sender's committed nonce.
        expected: u64,
        /// The transaction's nonce.
        got: u64,
        /// The largest accepted distance.
        max_gap: u64,
    },
    /// The balance does not cover this transaction and the sender's earlier pending ones.
    #[error(
        "insufficient funds: balance {balance}, needed {needed} for the fees and amounts of this \
         and the sender's earlier pending transactions"
    )]
    InsufficientFunds {
        /// The sender's committed balance.
        balance: u64,
        /// Fees plus amounts of the pending transactions up to and including this one
        /// (`u64::MAX` if the sum overflows).
        needed: u64,
    },
    /// The pool is full and the fee is too low to evict anything.
    #[error("mempool is full: the fee is too low to evict a pending transaction")]
    Full,
    /// The transaction is larger than [`MAX_TX_BYTES`].
    #[error("transaction of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The transaction's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A pending transaction has the same sender and nonce, and this one does not pay enough
    /// more to replace it.
    #[error(
        "a pending transaction has the same nonce: a replacement must pay a fee at least 10% \
         higher"
    )]
    Underpriced,
}

/// A pending transaction and what it may take from the sender's balance.
struct Entry {
    tx: Transaction,
    /// Fee plus transferred or bonded amount.
    cost: u64,
}

/// One sender's pending transactions.
struct SenderQueue {
    /// The nonce the sender's next committed transaction must carry.
    committed: u64,
    /// Boxed: B-tree nodes hold 11 slots, mostly empty in a queue of a few transactions.
    txs: BTreeMap<u64, Box<Entry>>,
}

impl SenderQueue {
    /// The eviction key of the highest-nonce transaction.
    fn tail_key(&self) -> Option<(u64, Hash)> {
        self.txs
            .last_key_value()
            .map(|(_, e)| (e.tx.fee, e.tx.hash))
    }
}

/// Pending transactions, ordered for block building and bounded for memory.
pub struct Mempool {
    limits: MempoolLimits,
    chain_id: String,
    min_fee: u64,
    senders: Map<Address, SenderQueue>,
    by_hash: Map<Hash, (Address, u64)>,
    /// `(fee, hash)` of every sender's highest-nonce transaction: the eviction candidates.
    tails: BTreeSet<(u64, Hash)>,
    bytes: u64,
    /// `keel_mempool_txs`: the number of transactions held, set at every change.
    txs_gauge: Gauge,
}

impl fmt::Debug for Mempool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mempool")
            .field("limits", &self.limits)
            .field("chain_id", &self.chain_id)
            .field("min_fee", &self.min_fee)
            .field("txs", &self.by_hash.len())
            .field("senders", &self.senders.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// A sender's next selectable transaction; the max-heap order is highest fee, then lowest hash.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    fee: u64,
    hash: Reverse<Hash>,
    sender: Address,
    nonce: u64,
}

impl Mempool {
    /// An empty pool for `chain_id` admitting transactions paying at least `min_fee`.
    pub fn new(limits: MempoolLimits, chain_id: String, min_fee: u64) -> Mempool {
        Mempool {
            limits,
            chain_id,
            min_fee,
            senders: Map::default(),
            by_hash: Map::default(),
            tails: BTreeSet::new(),
            bytes: 0,
            txs_gauge: Gauge::default(),
        }
    }

    /// Registers `keel_mempool_txs`, the number of transactions held.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "keel_mempool_txs",
            "Transactions in the mempool",
            self.txs_gauge.clone(),
        );
    }

    /// Admits `tx`, whose signature the caller has verified. `account_nonce` and `balance`
    /// are the sender's committed state.
    ///
    /// Rules, checked in this order: not already pending; at most [`MAX_TX_BYTES`]; this
    /// chain; fee at least the minimum; nonce in `[committed, committed + MAX_NONCE_GAP]`;
    /// a pending transaction with the same nonce is replaced only by a fee at least
    /// [`REPLACEMENT_FEE_BUMP_PERCENT`]% (and strictly) higher; the balance covers fee plus
    /// amount (transfer or bond; an unbond costs its fee) of this and the sender's pending
    /// transactions with lower nonces; if the pool would exceed a limit, the lowest-fee
    /// highest-nonce transactions of other senders that pay less than `tx` are evicted to make
    /// room, and if that cannot make room nothing is evicted and the answer is `Full`.
    ///
    /// Pending transactions of the sender with nonces below the committed nonce are dropped.
    /// Pending transactions with higher nonces are not re-checked against the balance: the
    /// executor refuses any that turn out unaffordable.
    pub fn insert(
        &mut self,
        tx: Transaction,
        account_nonce: u64,
        balance: u64,
    ) -> Result<(), Rejection> {
        if self.by_hash.contains_key(&tx.hash) {
            return Err(Rejection::Duplicate);
        }
        let size = tx.bytes.len();
        if size > MAX_TX_BYTES {
            return Err(Rejection::TooLarge {
                size,
                max: MAX_TX_BYTES,
            });
        }
        if tx.chain_id != self.chain_id {
            return Err(Rejection::WrongChain {
                expected: self.chain_id.clone(),
                got: tx.chain_id.clone(),
            });
        }
        if tx.fee < self.min_fee {
            return Err(Rejection::FeeTooLow {
                min: self.min_fee,
                got: tx.fee,
            });
        }
        let committed = self
            .senders
            .get(&tx.sender)
            .map_or(account_nonce, |q| q.committed.max(account_nonce));
        if tx.nonce < committed {
            return Err(Rejection::NonceTooLow {
                expected: committed,
                got: tx.nonce,
            });
        }
        if tx.nonce - committed > MAX_NONCE_GAP {
            return Err(Rejection::NonceTooHigh {
                expected: committed,
                got: tx.nonce,
                max_gap: MAX_NONCE_GAP,
            });
        }
        self.advance_sender(&tx.sender, committed);

        let cost = tx_cost(&tx);
        let mut replaced: Option<(Hash, u64)> = None;
        let mut needed = cost;
        if let Some(queue) = self.senders.get(&tx.sender) {
            if let Some(old) = queue.txs.get(&tx.nonce) {
                if !pays_replacement_bump(old.tx.fee, tx.fee) {
                    return Err(Rejection::Underpriced);
                }
                replaced = Some((old.tx.hash, held_bytes(&old.tx)));
            }
            for entry in queue.txs.range(committed..tx.nonce).map(|(_, e)| e) {
                needed = needed.and_then(|n| n.checked_add(entry.cost));
            }
        }
        match needed {
            Some(needed) if needed <= balance => {}
            needed => {
                return Err(Rejection::InsufficientFunds {
                    balance,
                    needed: needed.unwrap_or(u64::MAX),
                })
            }
        }

        let (added_count, freed_bytes) = match replaced {
            Some((_, old_size)) => (0, old_size),
            None => (1, 0),
        };
        let new_len = self.len().saturating_add(added_count);
        let new_bytes = self
            .bytes
            .saturating_sub(freed_bytes)
            .saturating_add(held_bytes(&tx));
        let need_count = new_len.saturating_sub(self.limits.max_txs);
        let need_bytes = new_bytes.saturating_sub(self.limits.max_bytes);
        if need_count > 0 || need_bytes > 0 {
            let evicted = self
                .plan_evictions(&tx.sender, tx.fee, need_count, need_bytes)
                .ok_or(Rejection::Full)?;
            for hash in evicted {
                self.remove_tx(&hash);
            }
        }
        if let Some((old_hash, _)) = replaced {
            self.remove_tx(&old_hash);
        }
        // `needed` is `Some` here, so so is `cost`.
        self.add_tx(tx, cost.unwrap_or(u64::MAX), committed);
        Ok(())
    }

    /// Up to `max_txs` transactions of at most `max_bytes` in all, for the next block.
    ///
    /// Highest fee first across senders (ties: lowest hash), but each sender's transactions
    /// strictly in nonce order without gaps, starting at the committed nonce the pool holds for
    /// it (see the module doc). A sender whose next transaction does not fit in the bytes left
    /// contributes nothing more. Deterministic: the same pool gives the same list.
    pub fn select(&self, max_txs: usize, max_bytes: usize) -> Vec<Transaction> {
        self.select_excluding(max_txs, max_bytes, &std::collections::HashSet::new())
    }

    /// [`Mempool::select`] passing over the transactions in `exclude` (those a block on the
    /// branch being extended already holds): they are neither returned nor counted against
    /// the limits, and their senders' next transactions stay candidates. Only what is
    /// returned is cloned.
    pub fn select_excluding(
        &self,
        max_txs: usize,
        max_bytes: usize,
        exclude: &std::collections::HashSet<Hash>,
    ) -> Vec<Transaction> {
        let mut heap: BinaryHeap<Candidate> = self
            .senders
            .iter()
            .filter_map(|(sender, queue)| {
                queue.txs.get(&queue.committed).map(|e| Candidate {
                    fee: e.tx.fee,
                    hash: Reverse(e.tx.hash),
                    sender: *sender,
                    nonce: queue.committed,
                })
            })
            .collect();
        let mut selected = Vec::new();
        let mut used = 0usize;
        while selected.len() < max_txs {
            let Some(candidate) = heap.pop() else { break };
            let Some(queue) = self.senders.get(&candidate.sender) else {
                continue;
            };
            let Some(entry) = queue.txs.get(&candidate.nonce) else {
                continue;
            };
            if !exclude.contains(&entry.tx.hash) {
                let Some(total) = used
                    .checked_add(entry.tx.bytes.len())
                    .filter(|t| *t <= max_bytes)
                else {
                    continue;
                };
                used = total;
                selected.push(entry.tx.clone());
            }
            let next = candidate
                .nonce
                .checked_add(1)
                .and_then(|n| queue.txs.get(&n).map(|e| (n, e)));
            if let Some((nonce, next)) = next {
                heap.push(Candidate {
                    fee: next.tx.fee,
                    hash: Reverse(next.tx.hash),
                    sender: candidate.sender,
                    nonce,
                });
            }
        }
        selected
    }

    /// After a block commits: drops the `included` transactions, and every pending transaction
    /// whose nonce is below its sender's new committed nonce (`new_nonces`: sender and its
    /// committed nonce after the block; pass every sender of the block).
    pub fn remove_committed(&mut self, included: &[Hash], new_nonces: &[(Address, u64)]) {
        for hash in included {
            self.remove_tx(hash);
        }
        for (sender, nonce) in new_nonces {
            self.advance_sender(sender, *nonce);
        }
        // Hash tables keep their buckets as they empty: after a peak, give back most of a
        // table less than a quarter full (rarely: only after the pool shrank fourfold).
        shrink_if_sparse(&mut self.by_hash);
        shrink_if_sparse(&mut self.senders);
    }

    /// Whether a transaction with this hash is pending.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// The pending transaction with this hash.
    pub fn get(&self, hash: &Hash) -> Option<&Transaction> {
        let (sender, nonce) = self.by_hash.get(hash)?;
        self.senders.get(sender)?.txs.get(nonce).map(|e| &e.tx)
    }

    /// Number of pending transactions.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Bytes the pending transactions hold: the sum of their [`held_bytes`] (what
    /// `max_bytes` bounds).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes the pool holds in memory (the `mempool` memory consumer): [`Mempool::bytes`]
    /// with its hash index counted as the table it is rather than as [`held_bytes`]
    /// estimates it, plus the table of senders.
    pub fn memory_bytes(&self) -> u64 {
        let estimated = (self.by_hash.len() * INDEX_BYTES) as u64;
        self.bytes
            .saturating_sub(estimated)
            .saturating_add(table_bytes(&self.by_hash))
            .saturating_add(table_bytes(&self.senders))
    }

    /// The capacity of the pool.
    pub fn limits(&self) -> MempoolLimits {
        self.limits
    }

    /// The nonce the sender's next transaction should carry counting its pending ones: the
    /// committed nonce plus the run of consecutive pending nonces from it. `None` if the sender
    /// has nothing pending (use the committed nonce from the state then).
    pub fn pending_nonce(&self, sender: &Address) -> Option<u64> {
        let queue = self.senders.get(sender)?;
        let mut next = queue.committed;
        while queue.txs.contains_key(&next) {
            next = next.checked_add(1)?;
        }
        Some(next)
    }

    /// Raises the sender's committed nonce to `nonce` and drops its transactions below it.
    fn advance_sender(&mut self, sender: &Address, nonce: u64) {
        let Some(queue) = self.senders.get_mut(sender) else {
            return;
        };
        queue.committed = queue.committed.max(nonce);
        let stale: Vec<Hash> = queue.txs.range(..nonce).map(|(_, e)| e.tx.hash).collect();
        for hash in stale {
            self.remove_tx(&hash);
        }
    }

    fn add_tx(&mut self, tx: Transaction, cost: u64, committed: u64) {
        let queue = self
            .senders
            .entry(tx.sender)
            .or_insert_with(|| SenderQueue {
                committed,
                txs: BTreeMap::new(),
            });
        let old_tail = queue.tail_key();
        self.by_hash.insert(tx.hash, (tx.sender, tx.nonce));
        self.bytes = self.bytes.saturating_add(held_bytes(&tx));
        queue.txs.insert(tx.nonce, Box::new(Entry { tx, cost }));
        retail(&mut self.tails, old_tail, queue.tail_key());
        self.txs_gauge.set(self.len() as i64);
    }

    fn remove_tx(&mut self, hash: &Hash) -> Option<Transaction> {
        let (sender, nonce) = self.by_hash.remove(hash)?;
        let queue = self.senders.get_mut(&sender)?;
        let old_tail = queue.tail_key();
        let entry = queue.txs.remove(&nonce)?;
        retail(&mut self.tails, old_tail, queue.tail_key());
        if queue.txs.is_empty() {
            self.senders.remove(&sender);
        }
        self.bytes = self.bytes.saturating_sub(held_bytes(&entry.tx));
        self.txs_gauge.set(self.len() as i64);
        Some(entry.tx)
    }

    /// The transactions to evict so that `need_count` more transactions and `need_bytes` more
    /// bytes fit, each paying less than `fee` and the highest-nonce pending one of its sender
    /// at its turn (a sender's earlier transaction becomes a candidate once its last is
    /// planned), lowest fee first, never touching `protected`'s. `None` if that cannot free
    /// enough.
    fn plan_evictions(
        &self,
        protected: &Address,
        fee: u64,
        need_count: usize,
        need_bytes: u64,
    ) -> Option<Vec<Hash>> {
        let mut plan = Vec::new();
        let (mut freed_count, mut freed_bytes) = (0usize, 0u64);
        let mut tails = self
            .tails
            .iter()
            .filter(|(_, hash)| self.by_hash.get(hash).is_some_and(|(s, _)| s != protected))
            .peekable();
        let mut promoted: BinaryHeap<Reverse<(u64, Hash)>> = BinaryHeap::new();
        while freed_count < need_count || freed_bytes < need_bytes {
            let from_tails = tails.peek().map(|k| **k);
            let from_promoted = promoted.peek().map(|Reverse(k)| *k);
            let next = match (from_tails, from_promoted) {
                (Some(t), Some(p)) if p < t => promoted.pop().map(|Reverse(k)| k),
                (Some(_), _) => tails.next().copied(),
                (None, Some(_)) => promoted.pop().map(|Reverse(k)| k),
                (None, None) => None,
            };
            let (victim_fee, victim) = next?;
            if victim_fee >= fee {
                return None;
            }
            let (sender, nonce) = self.by_hash.get(&victim)?;
            let queue = self.senders.get(sender)?;
            let entry = queue.txs.get(nonce)?;
            plan.push(victim);
            freed_count += 1;
            freed_bytes = freed_bytes.saturating_add(held_bytes(&entry.tx));
            if let Some((_, previous)) = queue.txs.range(..*nonce).next_back() {
                promoted.push(Reverse((previous.tx.fee, previous.tx.hash)));
            }
        }
        Some(plan)
    }

    /// Checks every internal index against the transactions held.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut count = 0;
        let mut bytes = 0u64;
        let mut tails = BTreeSet::new();
        for (sender, queue) in &self.senders {
            assert!(!queue.txs.is_empty(), "empty sender queue kept");
            for (nonce, entry) in &queue.txs {
                assert_eq!(entry.tx.nonce, *nonce);
                assert_eq!(&entry.tx.sender, sender);
                assert!(*nonce >= queue.committed && *nonce - queue.committed <= MAX_NONCE_GAP);
                assert_eq!(self.by_hash.get(&entry.tx.hash), Some(&(*sender, *nonce)));
                count += 1;
                bytes += held_bytes(&entry.tx);
            }
            tails.extend(queue.tail_key());
        }
        assert_eq!(count, self.by_hash.len());
        assert_eq!(self.txs_gauge.get(), count as i64, "keel_mempool_txs");
        assert_eq!(bytes, self.bytes);
        assert_eq!(tails, self.tails);
        assert!(self.len() <= self.limits.max_txs);
        assert!(self.bytes <= self.limits.max_bytes);
    }
}

/// Replaces `old` by `new` in the eviction index.
fn retail(tails: &mut BTreeSet<(u64, Hash)>, old: Option<(u64, Hash)>, new: Option<(u64, Hash)>) {
    if old != new {
        if let Some(old) = old {
            tails.remove(&old);
        }
        if let Some(new) = new {
            tails.insert(new);
        }
    }
}

/// What a transaction may take from the sender's balance: fee plus transferred or bonded
/// amount (`None` on overflow).
fn tx_cost(tx: &Transaction) -> Option<u64> {
    match tx.kind {
        TxKind::Transfer { amount, .. } | TxKind::Bond { amount } => tx.fee.checked_add(amount),
        TxKind::Unbond { .. } => Some(tx.fee),
    }
}

/// Whether `new_fee` is strictly above `old_fee` and at least 10% above it.
fn pays_replacement_bump(old_fee: u64, new_fee: u64) -> bool {
    let old = u128::from(old_fee);
    let new = u128::from(new_fee);
    new > old && new * 100 >= old * u128::from(100 + REPLACEMENT_FEE_BUMP_PERCENT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use keel_types::Keypair;

    const CHAIN: &str = "keel-test";
    const RICH: u64 = 1_000_000_000;

    fn limits(max_txs: usize, max_bytes: u64) -> MempoolLimits {
        MempoolLimits { max_txs, max_bytes }
    }

    fn new_pool(max_txs: usize) -> Mempool {
        Mempool::new(limits(max_txs, 1 << 30), CHAIN.to_string(), 1)
    }

    fn transfer(seed: u64, nonce: u64, fee: u64, amount: u64) -> Transaction {
        let to = Address([7; 20]);
        Transaction::sign(
            &Keypair::from_seed(seed),
            CHAIN,
            nonce,
            fee,
            TxKind::Transfer { to, amount },
        )
    }

    fn addr(seed: u64) -> Address {
        Keypair::from_seed(seed).address()
    }

    fn hashes(txs: &[Transaction]) -> Vec<Hash> {
        txs.iter().map(|t| t.hash).collect()
    }

    #[test]
    fn the_exported_size_follows_admission_eviction_and_commit() {
        let mut pool = new_pool(2);
        let mut registry = Registry::default();
        pool.register_metrics(&mut registry);
        let exported = |registry: &Registry| {
            let text = crate::metrics::render(registry);
            let head = "# HELP keel_mempool_txs Transactions in the mempool.\n\
                        # TYPE keel_mempool_txs gauge\nkeel_mempool_txs ";
            let at = text.find(head).unwrap_or_else(|| panic!("{text}")) + head.len();
            text[at..].lines().next().unwrap().parse::<u64>().unwrap()
        };
        assert_eq!(exported(&registry), 0);
        let (a, b) = (transfer(1, 0, 5, 10), transfer(2, 0, 5, 10));
        pool.insert(a.clone(), 0, RICH).unwrap();
        pool.insert(b, 0, RICH).unwrap();
        assert_eq!(exported(&registry), 2);
        // Full: a higher fee evicts one, the count stays at the limit.
        pool.insert(transfer(3, 0, 50, 10), 0, RICH).unwrap();
        assert_eq!(exported(&registry), 2);
        pool.remove_committed(&[a.hash], &[(addr(1), 1)]);
        assert_eq!(exported(&registry), pool.len() as u64);
        pool.check_invariants();
    }

    #[test]
    fn admits_and_finds_a_transaction() {
        let mut pool = new_pool(10);
        let tx = transfer(1, 0, 5, 10);
        pool.insert(tx.clone(), 0, RICH).unwrap();
        assert!(pool.contains(&tx.hash));
        assert_eq!(pool.get(&tx.hash), Some(&tx));
        assert_eq!(pool.len(), 1);
        assert!(!pool.is_empty());
        assert_eq!(pool.bytes(), held_bytes(&tx));
        assert_eq!(pool.pending_nonce(&addr(1)), Some(1));
        assert_eq!(pool.pending_nonce(&addr(2)), None);
        pool.check_invariants();
    }

    #[test]
    fn refuses_duplicates() {
        let mut pool = new_pool(10);
        let tx = transfer(1, 0, 5, 10);
        pool.insert(tx.clone(), 0, RICH).unwrap();
        assert_eq!(pool.insert(tx, 0, RICH), Err(Rejection::Duplicate));
    }

    #[test]
    fn refuses_other_chains_low_fees_and_oversized_transactions() {
        let mut pool = new_pool(10);
        let other = Transaction::sign(
            &Keypair::from_seed(1),
            "other",
            0,
            5,
            TxKind::Bond { amount: 1 },
        );
        assert_eq!(
            pool.insert(other, 0, RICH),
            Err(Rejection::WrongChain {
                expected: CHAIN.into(),
                got: "other".into()
            })
        );
        assert_eq!(
            pool.insert(transfer(1, 0, 0, 1), 0, RICH),
            Err(Rejection::FeeTooLow { min: 1, got: 0 })
        );
        let mut big = transfer(1, 0, 5, 1);
        big.bytes.resize(MAX_TX_BYTES + 1, 0);
        assert_eq!(
            pool.insert(big.clone(), 0, RICH),
            Err(Rejection::TooLarge {
                size: MAX_TX_BYTES + 1,
                max: MAX_TX_BYTES
            })
        );
        big.bytes.truncate(MAX_TX_BYTES);
        assert_eq!(pool.insert(big, 0, RICH), Ok(()));
        assert_eq!(pool.len(), 1);
        pool.check_invariants();
    }

    #[test]
    fn nonce_must_be_within_the_gap_above_the_committed_nonce() {
        let mut pool = new_pool(200);
        assert_eq!(
            pool.insert(transfer(1, 4, 5, 1), 5, RICH),
            Err(Rejection::NonceTooLow {
                expected: 5,
                got: 4
            })
        );
        assert_eq!(
            pool.insert(transfer(1, 5 + MAX_NONCE_GAP + 1, 5, 1), 5, RICH),
            Err(Rejection::NonceTooHigh {
                expected: 5,
                got: 5 + MAX_NONCE_GAP + 1,
                max_gap: MAX_NONCE_GAP
            })
        );
        pool.insert(transfer(1, 5 + MAX_NONCE_GAP, 5, 1), 5, RICH)
            .unwrap();
        pool.insert(transfer(1, 5, 5, 1), 5, RICH).unwrap();
        // A stale (lower) account nonce does not undo what the pool already knows.
        assert_eq!(
            pool.insert(transfer(1, 3, 5, 1), 2, RICH),
            Err(Rejection::NonceTooLow {
                expected: 5,
                got: 3
            })
        );
        assert_eq!(
            pool.insert(transfer(1, u64::MAX, 5, 1), 5, RICH)
                .unwrap_err(),
            Rejection::NonceTooHigh {
                expected: 5,
                got: u64::MAX,
                max_gap: MAX_NONCE_GAP
            }
        );
        pool.check_invariants();
    }

    #[test]
    fn replacement_needs_a_ten_percent_higher_fee() {
        let mut pool = new_pool(10);
        let original = transfer(1, 0, 100, 1);
        pool.insert(original.clone(), 0, RICH).unwrap();
        assert_eq!(
            pool.insert(transfer(1, 0, 109, 1), 0, RICH),
            Err(Rejection::Underpriced)
        );
        assert_eq!(
            pool.insert(transfer(1, 0, 100, 2), 0, RICH),
            Err(Rejection::Underpriced)
        );
        let better = transfer(1, 0, 110, 1);
        pool.insert(better.clone(), 0, RICH).unwrap();
        assert!(!pool.contains(&original.hash));
        assert!(pool.contains(&better.hash));
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.bytes(), held_bytes(&better));
        pool.check_invariants();

        // With no minimum fee, a zero fee cannot be "bumped" by another zero.
        let mut free = Mempool::new(limits(10, 1 << 20), CHAIN.into(), 0);
        free.insert(transfer(1, 0, 0, 1), 0, RICH).unwrap();
        assert_eq!(
            free.insert(transfer(1, 0, 0, 2), 0, RICH),
            Err(Rejection::Underpriced)
        );
        free.insert(transfer(1, 0, 1, 2), 0, RICH).unwrap();
        assert!(pays_replacement_bump(u64::MAX / 2, u64::MAX));
        assert!(!pays_replacement_bump(u64::MAX, u64::MAX));
    }

    #[test]
    fn balance_covers_fees_and_amounts_of_earlier_pending_transactions() {
        let mut pool = new_pool(10);
        pool.insert(transfer(1, 0, 10, 50), 0, 100).unwrap();
        assert_eq!(
            pool.insert(transfer(1, 1, 10, 41), 0, 100),
            Err(Rejection::InsufficientFunds {
                balance: 100,
                needed: 111
            })
        );
        pool.insert(transfer(1, 1, 10, 29), 0, 100).unwrap();
        let key = Keypair::from_seed(1);
        let bond = Transaction::sign(&key, CHAIN, 2, 1, TxKind::Bond { amount: 1 });
        assert_eq!(
            pool.insert(bond, 0, 100),
            Err(Rejection::InsufficientFunds {
                balance: 100,
                needed: 101
            })
        );
        // An unbond spends only its fee.
        let unbond = Transaction::sign(&key, CHAIN, 2, 1, TxKind::Unbond { amount: 1_000 });
        pool.insert(unbond, 0, 100).unwrap();
        // A replacement counts its own cost, not the one it replaces: 60 + 40 (not + 39).
        pool.insert(transfer(1, 1, 11, 29), 0, 100).unwrap();
        assert_eq!(
            pool.insert(transfer(1, 1, 13, 28), 0, 100),
            Err(Rejection::InsufficientFunds {
                balance: 100,
                needed: 101
            })
        );
        // Overflowing sums are refused, not wrapped.
        assert_eq!(
            pool.insert(transfer(2, 0, 10, u64::MAX), 0, u64::MAX),
            Err(Rejection::InsufficientFunds {
                balance: u64::MAX,
                needed: u64::MAX
            })
        );
        pool.check_invariants();
    }

    #[test]
    fn select_orders_by_fee_but_keeps_each_senders_nonces_in_order() {
        let mut pool = new_pool(10);
        let a0 = transfer(1, 0, 10, 1);
        let a1 = transfer(1, 1, 100, 1);
        let b0 = transfer(2, 0, 50, 1);
        let c3 = transfer(3, 3, 1_000, 1); // gap: C's committed nonce is 2
        for (tx, nonce) in [(a1.clone(), 0), (a0.clone(), 0), (b0.clone(), 0), (c3, 2)] {
            pool.insert(tx, nonce, RICH).unwrap();
        }
        let selected = pool.select(10, usize::MAX);
        assert_eq!(
            hashes(&selected),
            hashes(&[b0.clone(), a0.clone(), a1.clone()])
        );
        assert_eq!(
            pool.select(10, usize::MAX),
            selected,
            "select is deterministic"
        );
        assert_eq!(
            hashes(&pool.select(2, usize::MAX)),
            hashes(&[b0.clone(), a0.clone()])
        );
        let one = b0.bytes.len();
        assert_eq!(hashes(&pool.select(10, one)), vec![b0.hash]);
        assert_eq!(pool.select(0, usize::MAX), vec![]);
        assert_eq!(pool.select(10, one - 1), vec![]);
        assert_eq!(pool.pending_nonce(&addr(3)), Some(2));
        assert_eq!(pool.pending_nonce(&addr(1)), Some(2));
    }

    #[test]
    fn remove_committed_drops_included_and_stale_transactions() {
        let mut pool = new_pool(10);
        let a: Vec<Transaction> = (0..4).map(|n| transfer(1, n, 5, 1)).collect();
        let b0 = transfer(2, 0, 5, 1);
        for tx in a.iter().chain([&b0]) {
            pool.insert(tx.clone(), 0, RICH).unwrap();
        }
        // A block included a0 and a1; a2 was included elsewhere by a competing tx with the same
        // nonce, so only the new nonce tells the pool about it.
        pool.remove_committed(&[a[0].hash, a[1].hash], &[(addr(1), 3), (addr(2), 0)]);
        assert_eq!(pool.len(), 2);
        assert!(pool.contains(&a[3].hash) && pool.contains(&b0.hash));
        let selected: BTreeSet<Hash> = hashes(&pool.select(10, usize::MAX)).into_iter().collect();
        assert_eq!(selected, BTreeSet::from([a[3].hash, b0.hash]));
        assert_eq!(pool.pending_nonce(&addr(1)), Some(4));
        pool.remove_committed(&[a[3].hash, b0.hash], &[(addr(1), 4), (addr(2), 1)]);
        assert!(pool.is_empty());
        assert_eq!(pool.bytes(), 0);
        assert_eq!(pool.pending_nonce(&addr(1)), None);
        pool.check_invariants();
    }

    #[test]
    fn full_pool_evicts_the_cheapest_last_transaction_of_another_sender() {
        let mut pool = new_pool(3);
        let a0 = transfer(1, 0, 5, 1); // cheapest, but not its sender's last
        let a1 = transfer(1, 1, 50, 1);
        let b0 = transfer(2, 0, 20, 1);
        for tx in [&a0, &a1, &b0] {
            pool.insert(tx.clone(), 0, RICH).unwrap();
        }
        assert_eq!(
            pool.insert(transfer(3, 0, 20, 1), 0, RICH),
            Err(Rejection::Full)
        );
        assert_eq!(pool.len(), 3);
        let c0 = transfer(3, 0, 21, 1);
        pool.insert(c0.clone(), 0, RICH).unwrap();
        assert!(!pool.contains(&b0.hash));
        assert!(pool.contains(&a0.hash) && pool.contains(&a1.hash) && pool.contains(&c0.hash));
        pool.check_invariants();

        // The newcomer's own sender is never a victim (that would open a gap before it).
        let mut pool2 = new_pool(2);
        pool2.insert(transfer(1, 0, 1, 1), 0, RICH).unwrap();
        pool2.insert(transfer(2, 0, 100, 1), 0, RICH).unwrap();
        assert_eq!(
            pool2.insert(transfer(1, 1, 50, 1), 0, RICH),
            Err(Rejection::Full)
        );
        pool2.check_invariants();
    }

    #[test]
    fn selection_passes_over_excluded_transactions_without_counting_them() {
        let mut pool = new_pool(100);
        let a: Vec<Transaction> = (0..3).map(|n| transfer(1, n, 5, 1)).collect();
        let b0 = transfer(2, 0, 3, 1);
        for tx in a.iter().chain([&b0]) {
            pool.insert(tx.clone(), 0, RICH).unwrap();
        }
        // A's first two are on the branch: A's third is next in line, then B's.
        let exclude: std::collections::HashSet<Hash> = [a[0].hash, a[1].hash].into();
        assert_eq!(
            hashes(&pool.select_excluding(10, usize::MAX, &exclude)),
            vec![a[2].hash, b0.hash]
        );
        // Excluded transactions take none of the limits.
        let one = a[2].bytes.len();
        assert_eq!(
            hashes(&pool.select_excluding(1, usize::MAX, &exclude)),
            vec![a[2].hash]
        );
        assert_eq!(
            hashes(&pool.select_excluding(10, one, &exclude)),
            vec![a[2].hash]
        );
        // Without exclusions it is `select`.
        let none = std::collections::HashSet::new();
        assert_eq!(
            pool.select_excluding(10, usize::MAX, &none),
            pool.select(10, usize::MAX)
        );
    }

    #[test]
    fn memory_counts_the_index_as_it_is_and_a_sparse_index_shrinks() {
        let mut pool = new_pool(100_000);
        let txs: Vec<Transaction> = (0..3_000).map(|s| transfer(s + 1, 0, 5, 1)).collect();
        for tx in &txs {
            pool.insert(tx.clone(), 0, RICH).unwrap();
        }
        // 3,000 entries in 4,096 buckets of 65 bytes: about what `held_bytes` estimates.
        let estimated = 3_000 * INDEX_BYTES as u64;
        let index = table_bytes(&pool.by_hash);
        assert!(
            index.abs_diff(estimated) < estimated / 5,
            "{index} vs {estimated}"
        );
        assert_eq!(
            pool.memory_bytes(),
            pool.bytes() - estimated + index + table_bytes(&pool.senders)
        );

        // The table keeps its buckets while the pool empties to a third ...
        let first: Vec<Hash> = txs[..2_000].iter().map(|t| t.hash).collect();
        for hash in &first[..1_000] {
            assert!(pool.remove_tx(hash).is_some());
        }
        assert_eq!(table_bytes(&pool.by_hash), index);
        assert_eq!(
            pool.memory_bytes(),
            pool.bytes() - 2_000 * INDEX_BYTES as u64 + index + table_bytes(&pool.senders)
        );
        assert!(pool.memory_bytes() > pool.bytes());

        // ... and gives them back once a block leaves it less than a quarter full.
        pool.remove_committed(&first[1_000..], &[]);
        assert_eq!(pool.len(), 1_000);
        assert!(table_bytes(&pool.by_hash) <= index / 2);
        pool.check_invariants();
    }

    #[test]
    fn byte_limit_evicts_as_many_as_needed_from_the_back_or_nothing() {
        let size = held_bytes(&transfer(1, 0, 1, 1));
        let mut pool = Mempool::new(limits(100, 4 * size + 10), CHAIN.into(), 1);
        let a0 = transfer(1, 0, 4, 1);
        let a1 = transfer(1, 1, 2, 1);
        let b0 = transfer(2, 0, 3, 1);
        let c0 = transfer(3, 0, 90, 1);
        for tx in [&a0, &a1, &b0, &c0] {
            pool.insert(tx.clone(), 0, RICH).unwrap();
        }
        // Needs three slots' worth of bytes: a1 (fee 2), then b0 (3), then a0 (4), which became
        // A's last once a1 was planned.
        // Encoded sizes such that each holds three transfers' worth of bytes.
        // (The largest such size: allocations count at their size classes.)
        let mut big = transfer(4, 0, 10, 1);
        let mut encoded = (3 * size - (size - big.bytes.len() as u64)) as usize;
        big.bytes.resize(encoded, 0);
        while held_bytes(&big) > 3 * size {
            encoded -= 1;
            big.bytes.truncate(encoded);
        }
        assert!(held_bytes(&big) > 2 * size + 10);
        let mut too_cheap = transfer(4, 0, 4, 1);
        too_cheap.bytes.resize(encoded, 0);
        assert_eq!(pool.insert(too_cheap, 0, RICH), Err(Rejection::Full));
        assert_eq!(pool.len(), 4, "a failed insert evicts nothing");
        pool.insert(big.clone(), 0, RICH).unwrap();
        assert_eq!(hashes(&pool.select(10, usize::MAX)).len(), 2);
        assert!(pool.contains(&c0.hash) && pool.contains(&big.hash));
        pool.check_invariants();
        // Too large for the pool even when empty.
        let mut tiny = Mempool::new(limits(10, 10), CHAIN.into(), 1);
        assert_eq!(
            tiny.insert(transfer(1, 0, 5, 1), 0, RICH),
            Err(Rejection::Full)
        );
    }

    /// xorshift64*: a tiny seeded generator, so the randomized test needs no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_operations_keep_the_invariants() {
        const SENDERS: u64 = 6;
        let (mut oks, mut fulls, mut evictions, mut replacements) = (0, 0, 0, 0);
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let size = held_bytes(&transfer(1, 0, 1, 1));
            let max_txs = 5 + rng.below(20) as usize;
            let max_bytes = size * (3 + rng.below(25)) + rng.below(size);
            let mut pool = Mempool::new(limits(max_txs, max_bytes), CHAIN.into(), 1);
            let mut committed = [0u64; SENDERS as usize];
            for step in 0..400 {
                if rng.below(5) == 0 {
                    let max_select = rng.below(12) as usize;
                    let max_select_bytes = (size * rng.below(12)) as usize;
                    let block = pool.select(max_select, max_select_bytes);
                    assert_eq!(
                        block,
                        pool.select(max_select, max_select_bytes),
                        "seed {seed} step {step}"
                    );
                    assert!(block.len() <= max_select);
                    assert!(block.iter().map(|t| t.bytes.len()).sum::<usize>() <= max_select_bytes);
                    let mut next = committed;
                    for tx in &block {
                        let i = (0..SENDERS).position(|s| addr(s) == tx.sender).unwrap();
                        assert_eq!(
                            tx.nonce, next[i],
                            "seed {seed} step {step}: gap or disorder"
                        );
                        next[i] += 1;
                    }
                    committed = next;
                    let new_nonces: Vec<(Address, u64)> = (0..SENDERS)
                        .map(|s| (addr(s), committed[s as usize]))
                        .collect();
                    pool.remove_committed(&hashes(&block), &new_nonces);
                    for tx in &block {
                        assert!(!pool.contains(&tx.hash));
                    }
                } else {
                    let s = rng.below(SENDERS);
                    let nonce = committed[s as usize] + rng.below(6);
                    let tx = transfer(s, nonce, 1 + rng.below(100), rng.below(1_000));
                    let balance = rng.below(20_000);
                    let before: Vec<(Hash, Address, u64)> = pool
                        .by_hash
                        .keys()
                        .filter_map(|h| pool.get(h).map(|t| (t.hash, t.sender, t.fee)))
                        .collect();
                    match pool.insert(tx.clone(), committed[s as usize], balance) {
                        Ok(()) => {
                            oks += 1;
                            assert!(pool.contains(&tx.hash));
                            for (hash, sender, fee) in &before {
                                if pool.contains(hash) {
                                    continue;
                                }
                                if *sender == tx.sender {
                                    replacements += 1;
                                } else {
                                    evictions += 1;
                                    assert!(
                                        *fee < tx.fee,
                                        "seed {seed} step {step}: evicted a richer tx"
                                    );
                                }
                            }
                        }
                        Err(rejection) => {
                            if rejection == Rejection::Full {
                                fulls += 1;
                            }
                            assert!(!pool.contains(&tx.hash));
                            assert!(before.iter().all(|(h, _, _)| pool.contains(h)));
                        }
                    }
                }
                pool.check_invariants();
            }
        }
        // The run must exercise the interesting paths, not just the easy one.
        assert!(
            oks > 100 && fulls > 10 && evictions > 10 && replacements > 5,
            "{oks} {fulls} {evictions} {replacements}"
        );
    }
}
