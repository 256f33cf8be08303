//! `tx_submit` calls admitted together, so their signatures are verified in batches.
//!
//! A lone ed25519 check costs about twice a checked signature's share of a batch, and a node
//! under load receives its RPC submissions one per call. Each call queues its transaction
//! here and waits for its verdict; whichever call finds nobody working takes the queue (up
//! to [`MAX_BATCH`] at a time) to a blocking thread and admits it with
//! [`NodeContext::submit_batch`], and goes on while more has queued meanwhile. Nothing waits
//! for a batch to fill: an idle node admits a lone submission at once (checked alone), a
//! busy one gathers what arrived while the last batch was verified. The verdict on each
//! transaction is the one it would get alone.
//!
//! The queue holds at most the calls in flight, which `rpc.max_connections`,
//! `rpc.max_batch_size` and `rpc.max_request_bytes` bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_types::Hash;
use tokio::sync::oneshot;

use crate::context::{NodeContext, SubmitError};

/// Most transactions admitted in one batch.
pub const MAX_BATCH: usize = 1024;

/// A queued transaction and where its verdict goes.
type Queued = (Vec<u8>, oneshot::Sender<Result<Hash, SubmitError>>);

/// Submitted transactions waiting for admission, and whether a thread is admitting them.
pub struct Submissions {
    chain: Arc<NodeContext>,
    queue: Mutex<Vec<Queued>>,
    draining: AtomicBool,
    batches: AtomicU64,
}

/// The admission stopped before answering (it panicked): the call gets an internal error.
#[derive(Debug)]
pub struct Abandoned;

impl Submissions {
    /// Submissions admitted into `chain`.
    pub fn new(chain: Arc<NodeContext>) -> Arc<Submissions> {
        Arc::new(Submissions {
            chain,
            queue: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
            batches: AtomicU64::new(0),
        })
    }

    /// Admits `bytes` (as [`NodeContext::submit`] would) together with whatever else is
    /// submitted meanwhile. Call from a Tokio runtime.
    pub async fn submit(
        self: &Arc<Self>,
        bytes: Vec<u8>,
    ) -> Result<Result<Hash, SubmitError>, Abandoned> {
        let (reply, verdict) = oneshot::channel();
        self.lock().push((bytes, reply));
        if !self.draining.swap(true, Ordering::SeqCst) {
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.drain());
        }
        verdict.await.map_err(|_| Abandoned)
    }

    /// Batches admitted since start.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Queued>> {
        // Pushing and draining a Vec cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits batches until the queue is empty; runs while `draining` is held.
    fn drain(&self) {
        // Should admission panic, the next submission starts a new drain (the calls of the
        // batch in hand are answered "abandoned" as their senders drop).
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let mut release = Some(Release(&self.draining));
        loop {
            let batch: Vec<Queued> = {
                let mut queue = self.lock();
                let n = queue.len().min(MAX_BATCH);
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                drop(release.take());
                // A submission queued between the take above and the release saw `draining`
                // held and left its transaction to this loop: take the work back, unless
                // another drain already has.
                if self.lock().is_empty() || self.draining.swap(true, Ordering::SeqCst) {
                    return;
                }
                release = Some(Release(&self.draining));
                continue;
            }
            let (items, replies): (Vec<Vec<u8>>, Vec<_>) = batch.into_iter().unzip();
            let verdicts = self.chain.submit_batch(&items);
            self.batches.fetch_add(1, Ordering::Relaxed);
            for (reply, verdict) in replies.into_iter().zip(verdicts) {
                // The caller may have gone (connection closed): nothing to answer.
                let _ = reply.send(verdict);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::context::tests::{chain, transfer};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_submissions_are_admitted_in_one_batch_with_their_own_verdicts() {
        let (chain, _store) = chain();
        let chain = Arc::new(chain);
        let submissions = Submissions::new(chain.clone());
        // Senders 1..=8 are funded: 8 x 25 good transfers, one with a bad signature and one
        // that is not a transaction.
        let mut items: Vec<Vec<u8>> = Vec::new();
        for from in 1..=8 {
            for nonce in 0..25 {
                items.push(transfer(from, nonce).bytes.to_vec());
            }
        }
        let mut forged = transfer(1, 25).bytes.to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        items.push(forged);
        items.push(vec![0xff; 10]);

        // Hold the drain until every call has queued, so they make exactly one batch.
        submissions.draining.store(true, Ordering::SeqCst);
        let calls: Vec<_> = items
            .iter()
            .map(|bytes| {
                let s = submissions.clone();
                let bytes = bytes.clone();
                tokio::spawn(async move { s.submit(bytes).await.unwrap() })
            })
            .collect();
        while submissions.lock().len() < items.len() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let drain = submissions.clone();
        tokio::task::spawn_blocking(move || drain.drain());
        let mut verdicts = Vec::new();
        for call in calls {
            verdicts.push(call.await.unwrap());
        }
        assert_eq!(submissions.batches(), 1);
        for (bytes, verdict) in items[..200].iter().zip(&verdicts) {
            let hash = keel_types::Transaction::decode(bytes).unwrap().hash;
            assert_eq!(verdict.as_ref().unwrap(), &hash);
        }
        assert!(matches!(verdicts[200], Err(SubmitError::BadSignature)));
        assert!(matches!(verdicts[201], Err(SubmitError::Malformed(_))));
        assert_eq!(chain.mempool().len(), 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_submission_is_answered_however_calls_and_drains_interleave() {
        let (chain, _store) = chain();
        let submissions = Submissions::new(Arc::new(chain));
        // Waves of concurrent calls, each wave after the last drain ended or while it runs.
        for wave in 0..20u64 {
            let calls: Vec<_> = (1..=8)
                .map(|from| {
                    let s = submissions.clone();
                    let tx = transfer(from, wave);
                    tokio::spawn(async move { (tx.hash, s.submit(tx.bytes.to_vec()).await) })
                })
                .collect();
            for call in calls {
                let (hash, verdict) =
                    tokio::time::timeout(std::time::Duration::from_secs(30), call)
                        .await
                        .expect("a submission was never answered")
                        .unwrap();
                assert_eq!(verdict.unwrap().unwrap(), hash);
            }
        }
        let batches = submissions.batches();
        assert!((1..=160).contains(&batches), "{batches}");
    }
}
