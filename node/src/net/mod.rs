//! The node's boundary to its peers: the [`Network`] trait the consensus host sends through,
//! with the libp2p implementation ([`libp2p`]) and a deterministic in-memory one for the seeded
//! simulation ([`sim`]); and what a node serves to a peer that syncs ([`serve_blocks`]), the
//! same code on both.

pub mod libp2p;
pub mod sim;

use keel_consensus::epoch_of_next_block;
use keel_p2p::frame::ByteCounts;
use keel_types::{Address, Hash, PeerRequest, PeerResponse, MAX_SYNC_BLOCKS};

pub use keel_p2p::{Channel, PeerId, Report};

use crate::context::NodeContext;
use crate::Result;

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
/// as [`crate::host::Command::Response`] with the request's id.
pub trait Network: Send + Sync {
    /// The connected peers.
    fn peers(&self) -> Vec<PeerInfo>;
    /// Gossips a message to everyone on `channel`.
    fn broadcast(&self, channel: Channel, message: Vec<u8>);
    /// Sends a message straight to one peer.
    fn send(&self, peer: PeerId, message: Vec<u8>);
    /// Asks `peer`; the answer (or its failure) comes back as a command carrying `id`.
    fn request(&self, peer: PeerId, request: PeerRequest, id: u64);
    /// Tells the peer manager how a peer behaved.
    fn report(&self, peer: PeerId, report: Report);
    /// Bytes sent and received so far.
    fn byte_counts(&self) -> ByteCounts {
        ByteCounts::default()
    }
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

/// Blocks for a peer whose final height is `have_height` and who wants `target`: final
/// blocks above its height first (by height), then the non-final branch to `target`; oldest
/// first, at most `max` (capped at [`MAX_SYNC_BLOCKS`]), and the proof that the asker's
/// epoch ended if this node has it. Reads the store and the chain view, never the host.
pub fn serve_blocks(
    chain: &NodeContext,
    target: Hash,
    have_height: u64,
    max: u32,
) -> Result<PeerResponse> {
    let max = max.clamp(1, MAX_SYNC_BLOCKS) as usize;
    let view = chain.view();
    let finalized = view.tip.finalized.0;
    let mut blocks = Vec::new();
    let mut h = have_height.saturating_add(1);
    while h <= finalized && blocks.len() < max {
        match chain.blocks.block_at(h)? {
            Some(b) => blocks.push(b),
            None => break,
        }
        h += 1;
    }
    if blocks.len() < max {
        let mut path = Vec::new();
        let mut cursor = target;
        while let Some(b) = view.blocks.get(&cursor) {
            if b.header.height <= finalized
                || path.len() as u64 > crate::ledger::MAX_PENDING_HEIGHTS
            {
                break;
            }
            cursor = b.header.parent_hash;
            path.push(b);
        }
        path.reverse();
        let base = have_height.max(finalized);
        blocks.extend(
            path.into_iter()
                .filter(|b| b.header.height > base)
                .take(max - blocks.len())
                .map(|b| (**b).clone()),
        );
    }
    let epoch = epoch_of_next_block(have_height, chain.params.epoch_length);
    let proof = chain.records().epoch_proof(epoch)?;
    Ok(PeerResponse::Blocks { blocks, proof })
}
