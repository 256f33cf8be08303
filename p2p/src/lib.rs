//! keel peer-to-peer networking over libp2p: TCP + noise + yamux, gossipsub for broadcast,
//! a direct protocol for messages to one peer, request/response for status and block sync,
//! identify and ping; per-peer scores and bans, connection limits, compression of payloads
//! above a threshold (`docs/networking.md`).
//!
//! Invariants: messages cross this boundary as bytes tagged with a [`Channel`]; every frame
//! is size-capped per channel before it is read or decompressed; the crate decodes nothing
//! beyond its own framing (the node decodes at the edge and reports bad senders).

pub mod codec;
pub mod drops;
pub mod frame;
pub mod peers;
mod service;

use keel_types::MAX_MESSAGE_BYTES;

pub use libp2p::{Multiaddr, PeerId};
pub use service::{peer_id_of, start, start_service, Config, Event, NetworkHandle, PeerStore};

/// Logical channels, in priority order: a congested link sends consensus traffic first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Proposals, votes, timeouts, certificates.
    Consensus,
    /// Slashing evidence.
    Evidence,
    /// Transaction gossip (batches of transactions, on a gossipsub instance of their own).
    Transactions,
    /// Block sync requests and responses.
    Sync,
}

impl Channel {
    /// Every channel, in priority order.
    pub const ALL: [Channel; 4] = [
        Channel::Consensus,
        Channel::Evidence,
        Channel::Transactions,
        Channel::Sync,
    ];

    /// Its `channel` label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Consensus => "consensus",
            Channel::Evidence => "evidence",
            Channel::Transactions => "transactions",
            Channel::Sync => "sync",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Largest message accepted on this channel.
    pub fn max_message_bytes(self) -> usize {
        match self {
            Channel::Consensus | Channel::Sync => MAX_MESSAGE_BYTES,
            Channel::Evidence => 64 * 1024,
            Channel::Transactions => 64 * 1024,
        }
    }
}

/// How a peer behaved, for its score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Sent a valid, useful message.
    Useful,
    /// Sent a message that failed to decode or verify.
    Invalid,
    /// Sent something oversized or abusive.
    Malicious,
    /// Answered a ping slowly (over [`peers::SLOW_PING_MS`]) or not at all.
    Slow,
}

/// Errors of the network.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message larger than its channel allows.
    #[error("message of {len} bytes exceeds the {max}-byte limit of channel {channel:?}")]
    TooLarge {
        /// The channel.
        channel: Channel,
        /// Message length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The outgoing queue is full: the message was dropped.
    #[error("network queue full")]
    Busy,
    /// The network has shut down.
    #[error("network closed")]
    Closed,
    /// Setting the service up failed.
    #[error("p2p setup: {0}")]
    Setup(String),
    /// A request failed (timeout, refused, disconnected).
    #[error("request failed: {0}")]
    Request(String),
    /// A response that did not unframe.
    #[error("bad response")]
    BadResponse,
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks a message against its channel's size cap.
pub fn check_size(channel: Channel, len: usize) -> Result<()> {
    let max = channel.max_message_bytes();
    if len > max {
        return Err(Error::TooLarge { channel, len, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_are_refused_per_channel() {
        assert!(check_size(Channel::Transactions, 64 * 1024).is_ok());
        assert!(check_size(Channel::Transactions, 64 * 1024 + 1).is_err());
        assert!(check_size(Channel::Consensus, MAX_MESSAGE_BYTES + 1).is_err());
    }
}
