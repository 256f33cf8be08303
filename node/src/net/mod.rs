//! The node's boundary to its peers: the [`Network`] trait the consensus host sends through,
//! with the libp2p implementation ([`libp2p`]) and a deterministic in-memory one for the seeded
//! simulation ([`sim`]). What a node serves to a peer that syncs is `crate::sync`, the same
//! code on both.

pub mod libp2p;
pub mod sim;
pub mod tx_gossip;

use keel_types::{Address, PeerRequest};

pub use keel_p2p::{Channel, PeerId, Report};

/// A connected peer as the host sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its network identity.
    pub id: PeerId,
    /// The final height it last reported (0 until it has).
    pub final_height: u64,
    /// The validator it proved to be (a signed binding of its key to this peer id).
    pub validator: Option<Address>,
}

/// What the consensus host needs of the network. Every method returns at once: sending is
/// fire-and-forget (consensus recovers from loss), and the answer to a request arrives later
/// as a command to the host (`Command::Response`) carrying the request's id.
pub trait Network: Send + Sync {
    /// The connected peers.
    fn peers(&self) -> Vec<PeerInfo>;
    /// Gossips a message to everyone on `channel`. On [`Channel::Transactions`] the message
    /// is one transaction's `SignedTx` bytes; the libp2p network gathers them and gossips
    /// batches ([`tx_gossip`]).
    fn broadcast(&self, channel: Channel, message: Vec<u8>);
    /// Sends a message straight to one peer.
    fn send(&self, peer: PeerId, message: Vec<u8>);
    /// Asks `peer`; the answer (or its failure) comes back as a command carrying `id`.
    fn request(&self, peer: PeerId, request: PeerRequest, id: u64);
    /// Tells the peer manager how a peer behaved.
    fn report(&self, peer: PeerId, report: Report);
}

/// A network of one: nothing is sent, no peer answers. For a node run alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoNetwork;

impl Network for NoNetwork {
    fn peers(&self) -> Vec<PeerInfo> {
        Vec::new()
    }
    fn broadcast(&self, _: Channel, _: Vec<u8>) {}
    fn send(&self, _: PeerId, _: Vec<u8>) {}
    fn request(&self, _: PeerId, _: PeerRequest, _: u64) {}
    fn report(&self, _: PeerId, _: Report) {}
}
