//! Messages the network gave up on, by channel and reason: exported by the node as
//! `keel_p2p_dropped_messages_total{channel, reason}` (`docs/networking.md`). Counts only
//! grow; the p2p task and the node's senders add to them without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Channel;

/// Why a message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The node's bounded queue to the p2p task was full.
    QueueFull,
    /// Gossipsub's send queue to one peer was full, or the message waited there past its
    /// deadline: one copy, to one peer, lost.
    PeerQueueFull,
    /// Gossipsub published the message to no peer (every peer's queue full, or too large).
    PublishFailed,
    /// A message to one peer failed on the way (timeout, closed connection, unsupported).
    SendFailed,
    /// The sender's own batching buffer was full (the node's transaction batcher: each
    /// transaction not gossiped counts one).
    BatchFull,
    /// Received, but the node's consensus thread had no room for it: its queue was full by
    /// count or by bytes (consensus messages, sync answers).
    HostBusy,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 6] = [
        DropReason::QueueFull,
        DropReason::PeerQueueFull,
        DropReason::PublishFailed,
        DropReason::SendFailed,
        DropReason::BatchFull,
        DropReason::HostBusy,
    ];

    /// Its `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::PeerQueueFull => "peer_queue_full",
            DropReason::PublishFailed => "publish_failed",
            DropReason::SendFailed => "send_failed",
            DropReason::BatchFull => "batch_full",
            DropReason::HostBusy => "host_busy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The (channel, reason) pairs that can occur, in export order. Gossipsub's own drops
/// (`PeerQueueFull`) are told apart by instance only, so evidence, which shares the consensus
/// instance, counts there under `consensus`.
pub const DROP_SERIES: [(Channel, DropReason); 13] = [
    (Channel::Consensus, DropReason::QueueFull),
    (Channel::Consensus, DropReason::PeerQueueFull),
    (Channel::Consensus, DropReason::PublishFailed),
    (Channel::Consensus, DropReason::SendFailed),
    (Channel::Consensus, DropReason::HostBusy),
    (Channel::Evidence, DropReason::QueueFull),
    (Channel::Evidence, DropReason::PublishFailed),
    (Channel::Transactions, DropReason::QueueFull),
    (Channel::Transactions, DropReason::PeerQueueFull),
    (Channel::Transactions, DropReason::PublishFailed),
    (Channel::Transactions, DropReason::BatchFull),
    (Channel::Sync, DropReason::QueueFull),
    (Channel::Sync, DropReason::HostBusy),
];

/// Dropped-message counters, one per channel and reason.
#[derive(Debug, Default)]
pub struct DropStats {
    counts: [[AtomicU64; DropReason::ALL.len()]; Channel::ALL.len()],
}

impl DropStats {
    /// Adds `n` drops.
    pub fn add(&self, channel: Channel, reason: DropReason, n: u64) {
        if let Some(c) = self
            .counts
            .get(channel.index())
            .and_then(|row| row.get(reason.index()))
        {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Drops so far on `channel` for `reason`.
    pub fn get(&self, channel: Channel, reason: DropReason) -> u64 {
        self.counts
            .get(channel.index())
            .and_then(|row| row.get(reason.index()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every series of [`DROP_SERIES`] with its count.
    pub fn series(&self) -> Vec<(Channel, DropReason, u64)> {
        DROP_SERIES
            .iter()
            .map(|&(channel, reason)| (channel, reason, self.get(channel, reason)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_per_channel_and_reason() {
        let stats = DropStats::default();
        stats.add(Channel::Transactions, DropReason::BatchFull, 3);
        stats.add(Channel::Transactions, DropReason::BatchFull, 1);
        stats.add(Channel::Consensus, DropReason::PeerQueueFull, 2);
        assert_eq!(stats.get(Channel::Transactions, DropReason::BatchFull), 4);
        assert_eq!(stats.get(Channel::Consensus, DropReason::PeerQueueFull), 2);
        assert_eq!(stats.get(Channel::Consensus, DropReason::BatchFull), 0);
        let series = stats.series();
        assert_eq!(series.len(), DROP_SERIES.len());
        let total: u64 = series.iter().map(|s| s.2).sum();
        assert_eq!(total, 6);
    }
}
