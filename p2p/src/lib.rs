//! keel peer-to-peer networking: the boundary between the node and the network.
//!
//! Status: this crate holds the [`Network`] trait and its message types. The libp2p
//! implementation (TCP + noise + yamux, gossip, request/response sync, peer manager,
//! compression) arrives with the networking issue; until then a node runs alone as a single
//! validator and never constructs a network. The in-process simulated network used by the
//! consensus simulation implements the same trait.
//!
//! Invariants: messages cross this boundary as prost bytes with a [`Channel`] tag; each
//! implementation caps message sizes and decodes nothing itself beyond its own framing.

use keel_types::MAX_MESSAGE_BYTES;

/// A peer's identity (a libp2p peer id's bytes, or an index in a simulation).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub Vec<u8>);

/// Logical channels, in priority order: a congested link sends consensus traffic first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Proposals, votes, timeouts, certificates.
    Consensus,
    /// Slashing evidence.
    Evidence,
    /// Transaction gossip.
    Transactions,
    /// Block sync requests and responses.
    Sync,
}

impl Channel {
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
}

/// Errors of a network implementation.
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
    /// The peer is not connected.
    #[error("peer not connected")]
    NotConnected,
    /// The network has shut down.
    #[error("network closed")]
    Closed,
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What the node needs from a network: send to one peer, broadcast to all, report behaviour.
/// Incoming messages reach the node through a bounded channel the implementation owns.
pub trait Network: Send + Sync + 'static {
    /// Sends `bytes` to one peer on `channel`.
    fn send(&self, peer: &PeerId, channel: Channel, bytes: Vec<u8>) -> Result<()>;
    /// Sends `bytes` to every connected peer on `channel`.
    fn broadcast(&self, channel: Channel, bytes: Vec<u8>) -> Result<()>;
    /// Records a peer's behaviour for scoring.
    fn report(&self, peer: &PeerId, report: Report);
    /// Number of connected peers.
    fn peer_count(&self) -> usize;
}

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
