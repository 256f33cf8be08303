//! Transaction gossip in batches: what this node admits over RPC goes out as one gossip
//! message ([`TxBatch`]) per [`FLUSH_INTERVAL`] or per [`MAX_BATCH_BYTES`], whichever comes
//! first, instead of one signed gossip message per transaction (thousands a second overflowed
//! gossipsub's per-peer send queues).
//!
//! [`TxGossip::push`] (RPC `tx_submit`, through [`super::Network::broadcast`]) adds a
//! transaction to the open batch under a short lock and returns at once: RPC never waits on
//! the network. The flusher task ([`run`]) hands each batch that fills to the p2p service at
//! once and whatever is open every [`FLUSH_INTERVAL`]. Memory is bounded: at most
//! [`MAX_PENDING_BYTES`] wait here (the open batch and the full ones not yet handed over);
//! beyond that a transaction is not gossiped and counts as
//! `keel_p2p_dropped_messages_total{channel="transactions",reason="batch_full"}` (it stays in
//! this node's mempool, so its blocks still carry it), and a batch the p2p queue has no room for
//! is dropped and counted there (`reason="queue_full"`).
//!
//! Only transactions submitted here are batched. Those that arrive by gossip are not published
//! again: gossipsub forwards each batch message to its mesh itself (before this node has
//! checked it), so re-publishing would send every transaction twice.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keel_p2p::drops::DropReason;
use keel_p2p::{Channel, NetworkHandle};
use keel_types::TxBatch;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Longest a submitted transaction waits before its batch is published.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Largest batch encoding: the transactions channel's cap (`keel_p2p::check_size`).
pub const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Most bytes of transactions waiting to be published: four full batches.
pub const MAX_PENDING_BYTES: usize = 4 * MAX_BATCH_BYTES;

/// What [`Batcher::push`] did with a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// Added to the open batch.
    Added,
    /// Added, and a batch is full: publish now.
    Ready,
    /// Not added: more than [`Batcher`]'s pending cap waits already.
    Full,
    /// Not added: larger than a batch may be.
    TooLarge,
}

/// The batching rules, plain and synchronous: an open batch that is sealed when the next
/// transaction would take it over the batch size, sealed batches waiting to be taken, and a cap
/// on the bytes of both together.
#[derive(Debug)]
pub struct Batcher {
    max_batch: usize,
    max_pending: usize,
    open: TxBatch,
    open_bytes: usize,
    sealed: VecDeque<TxBatch>,
    pending_bytes: usize,
}

impl Batcher {
    /// Batches of at most `max_batch` encoded bytes; at most `max_pending` bytes waiting.
    pub fn new(max_batch: usize, max_pending: usize) -> Batcher {
        Batcher {
            max_batch,
            max_pending,
            open: TxBatch::default(),
            open_bytes: 0,
            sealed: VecDeque::new(),
            pending_bytes: 0,
        }
    }

    /// Adds one transaction's `SignedTx` bytes.
    pub fn push(&mut self, tx: Vec<u8>) -> Push {
        let entry = TxBatch::entry_len(tx.len());
        if entry > self.max_batch {
            return Push::TooLarge;
        }
        if self.pending_bytes.saturating_add(entry) > self.max_pending {
            return Push::Full;
        }
        let mut ready = false;
        if self.open_bytes + entry > self.max_batch {
            self.seal();
            ready = true;
        }
        self.open.txs.push(tx);
        self.open_bytes += entry;
        self.pending_bytes += entry;
        if ready {
            Push::Ready
        } else {
            Push::Added
        }
    }

    fn seal(&mut self) {
        if !self.open.txs.is_empty() {
            self.sealed.push_back(std::mem::take(&mut self.open));
            self.open_bytes = 0;
        }
    }

    /// The full batches, oldest first, and with `flush` the open one too.
    pub fn take(&mut self, flush: bool) -> Vec<TxBatch> {
        if flush {
            self.seal();
        }
        let batches: Vec<TxBatch> = self.sealed.drain(..).collect();
        self.pending_bytes = self.open_bytes;
        batches
    }

    /// Bytes (encoded) of the transactions waiting.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
}

/// Where batches go: the p2p service, or a test's collector.
pub trait BatchSink: Send + Sync + 'static {
    /// Hands an encoded [`TxBatch`] to the network, without waiting; one it cannot take is
    /// dropped and counted by the sink.
    fn publish(&self, batch: Vec<u8>);
    /// Counts `n` transactions that were not gossiped, for `reason`.
    fn count_dropped(&self, reason: DropReason, n: u64);
}

impl BatchSink for NetworkHandle {
    fn publish(&self, batch: Vec<u8>) {
        // A full queue is counted by the handle itself.
        if let Err(e) = NetworkHandle::publish(self, Channel::Transactions, batch) {
            debug!(error = %e, "transaction batch not published");
        }
    }

    fn count_dropped(&self, reason: DropReason, n: u64) {
        NetworkHandle::count_dropped(self, Channel::Transactions, reason, n);
    }
}

struct Shared {
    batcher: Mutex<Batcher>,
    /// Woken when a batch is full.
    ready: Notify,
    sink: Box<dyn BatchSink>,
}

impl Shared {
    fn batcher(&self) -> MutexGuard<'_, Batcher> {
        match self.batcher.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The mailbox of the batcher: cheap to clone, never blocks.
#[derive(Clone)]
pub struct TxGossip(Arc<Shared>);

impl TxGossip {
    /// A batcher of [`MAX_BATCH_BYTES`] batches and [`MAX_PENDING_BYTES`] waiting, publishing
    /// to `sink` once [`run`] runs.
    pub fn new(sink: impl BatchSink) -> TxGossip {
        TxGossip::with_limits(sink, MAX_BATCH_BYTES, MAX_PENDING_BYTES)
    }

    /// [`TxGossip::new`] with other limits.
    pub fn with_limits(sink: impl BatchSink, max_batch: usize, max_pending: usize) -> TxGossip {
        TxGossip(Arc::new(Shared {
            batcher: Mutex::new(Batcher::new(max_batch, max_pending)),
            ready: Notify::new(),
            sink: Box::new(sink),
        }))
    }

    /// Queues one transaction's `SignedTx` bytes for gossip; returns at once.
    pub fn push(&self, tx: Vec<u8>) {
        let verdict = self.0.batcher().push(tx);
        match verdict {
            Push::Added => {}
            Push::Ready => self.0.ready.notify_one(),
            Push::Full => self.0.sink.count_dropped(DropReason::BatchFull, 1),
            Push::TooLarge => self.0.sink.count_dropped(DropReason::PublishFailed, 1),
        }
    }

    /// Bytes of transactions waiting to be published.
    pub fn pending_bytes(&self) -> usize {
        self.0.batcher().pending_bytes()
    }
}

/// The flusher: publishes each full batch when it fills and the open one every
/// [`FLUSH_INTERVAL`], until `shutdown` (what waits then is dropped: it is in the mempool).
pub async fn run(gossip: TxGossip, shutdown: CancellationToken) {
    let shared = gossip.0;
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = shared.ready.notified() => false,
            _ = tick.tick() => true,
        };
        // Encoding and publishing happen outside the lock, so RPC never waits on them.
        let batches = shared.batcher().take(flush);
        for batch in batches {
            shared.sink.publish(batch.encode());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use super::*;

    fn tx(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    #[test]
    fn the_batch_size_is_the_transactions_channel_cap() {
        assert_eq!(MAX_BATCH_BYTES, Channel::Transactions.max_message_bytes());
    }

    #[test]
    fn a_batch_is_sealed_before_it_would_outgrow_the_size_limit() {
        // Entries of 100 bytes take 102 encoded: four fit in 410 bytes, a fifth does not.
        let mut b = Batcher::new(410, 10_000);
        for n in 0..4 {
            assert_eq!(b.push(tx(n, 100)), Push::Added);
        }
        assert_eq!(b.push(tx(4, 100)), Push::Ready);
        let full = b.take(false);
        assert_eq!(full.len(), 1);
        assert_eq!(full[0].txs, (0..4).map(|n| tx(n, 100)).collect::<Vec<_>>());
        assert_eq!(full[0].encoded_len(), 408);
        assert!(full[0].encode().len() <= 410);
        // The fifth opened the next batch: a flush takes it.
        assert_eq!(b.pending_bytes(), 102);
        let rest = b.take(true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].txs, vec![tx(4, 100)]);
        assert_eq!(b.pending_bytes(), 0);
        assert!(b.take(true).is_empty());
    }

    #[test]
    fn pending_bytes_are_capped_and_the_cap_frees_once_batches_are_taken() {
        let mut b = Batcher::new(410, 1_000);
        let mut verdicts = Vec::new();
        for n in 0..12 {
            verdicts.push(b.push(tx(n, 100)));
        }
        // 9 entries of 102 bytes fit under 1,000; the rest are refused.
        assert_eq!(verdicts.iter().filter(|v| **v == Push::Full).count(), 3);
        assert_eq!(b.pending_bytes(), 9 * 102);
        let taken: usize = b.take(true).iter().map(|t| t.txs.len()).sum();
        assert_eq!(taken, 9);
        assert_eq!(b.push(tx(99, 100)), Push::Added);
        // One transaction larger than a batch can never be gossiped.
        assert_eq!(b.push(tx(0, 409)), Push::TooLarge);
    }

    #[derive(Clone, Default)]
    struct Collected {
        batches: Arc<Mutex<Vec<(Instant, TxBatch)>>>,
        dropped: Arc<Mutex<Vec<(DropReason, u64)>>>,
    }

    impl BatchSink for Collected {
        fn publish(&self, batch: Vec<u8>) {
            let batch = TxBatch::decode(&batch).unwrap();
            self.batches.lock().unwrap().push((Instant::now(), batch));
        }
        fn count_dropped(&self, reason: DropReason, n: u64) {
            self.dropped.lock().unwrap().push((reason, n));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submitted_transactions_go_out_in_few_batches_within_the_flush_interval() {
        let sink = Collected::default();
        let gossip = TxGossip::with_limits(sink.clone(), 4 * 1024, 1 << 20);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(gossip.clone(), shutdown.clone()));

        // A burst of 1,000 transactions of 150 bytes: full batches leave at once.
        let start = Instant::now();
        for n in 0..1_000u32 {
            let mut t = tx(0, 150);
            t[..4].copy_from_slice(&n.to_le_bytes());
            gossip.push(t);
        }
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "push never waits"
        );
        let deadline = start + Duration::from_secs(5);
        while sink
            .batches
            .lock()
            .unwrap()
            .iter()
            .map(|b| b.1.txs.len())
            .sum::<usize>()
            < 1_000
        {
            assert!(Instant::now() < deadline, "batches published");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let batches = sink.batches.lock().unwrap().clone();
        // 4 KiB batches of 153-byte entries: 26 each, 39 batches for 1,000 (a flush tick
        // during the burst may split one more).
        assert!(
            (39..=41).contains(&batches.len()),
            "{} batches",
            batches.len()
        );
        let order: Vec<u32> = batches
            .iter()
            .flat_map(|b| b.1.txs.iter())
            .map(|t| u32::from_le_bytes(t[..4].try_into().unwrap()))
            .collect();
        assert_eq!(order, (0..1_000).collect::<Vec<_>>(), "in submission order");
        for (_, b) in &batches {
            assert!(b.encoded_len() <= 4 * 1024);
        }

        // A lone transaction waits for the next flush, no longer.
        let lone = Instant::now();
        gossip.push(tx(7, 150));
        while sink.batches.lock().unwrap().len() == batches.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let waited = sink.batches.lock().unwrap().last().unwrap().0 - lone;
        assert!(
            waited <= FLUSH_INTERVAL + Duration::from_millis(30),
            "flushed after {waited:?}"
        );
        assert_eq!(gossip.pending_bytes(), 0);
        assert!(sink.dropped.lock().unwrap().is_empty());

        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_full_batcher_drops_and_counts_instead_of_growing() {
        // Nobody flushes: the cap holds.
        let sink = Collected::default();
        let gossip = TxGossip::with_limits(sink.clone(), 1_024, 4_096);
        for n in 0..100 {
            gossip.push(tx(n, 200));
        }
        assert!(gossip.pending_bytes() <= 4_096);
        let dropped = sink.dropped.lock().unwrap().clone();
        // 20 entries of 203 bytes fit in 4,096.
        assert_eq!(dropped.len(), 80);
        assert!(dropped.iter().all(|d| *d == (DropReason::BatchFull, 1)));
    }
}
