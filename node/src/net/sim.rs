//! A deterministic in-memory [`Network`] for the seeded simulation: what a node sends is put
//! in its outbox, in order, and the simulation decides when (latency, jitter), whether (loss,
//! partitions) and to whom it arrives. The peers a node sees are set by the simulation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_types::PeerRequest;

use super::{Channel, Network, PeerId, PeerInfo, Report};

/// Something a simulated node sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    /// Gossip to everyone.
    Broadcast {
        /// The gossip channel.
        channel: Channel,
        /// The message.
        message: Vec<u8>,
    },
    /// A message to one peer.
    Send {
        /// The peer.
        to: PeerId,
        /// The message.
        message: Vec<u8>,
    },
    /// A request to one peer.
    Request {
        /// The peer.
        to: PeerId,
        /// The request.
        request: PeerRequest,
        /// Its id, to be answered with.
        id: u64,
    },
    /// A report on a peer's behaviour.
    Report {
        /// The peer.
        peer: PeerId,
        /// How it behaved.
        report: Report,
    },
}

#[derive(Default)]
struct Inner {
    peers: Vec<PeerInfo>,
    outbox: VecDeque<Outgoing>,
}

/// One node's end of the simulated network. Clones share the outbox and the peer list.
#[derive(Clone, Default)]
pub struct SimNetwork(Arc<Mutex<Inner>>);

impl SimNetwork {
    /// A node with no peers yet.
    pub fn new() -> SimNetwork {
        SimNetwork::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        match self.0.lock() {
            Ok(i) => i,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sets the peers the node is connected to.
    pub fn set_peers(&self, peers: Vec<PeerInfo>) {
        self.inner().peers = peers;
    }

    /// Takes everything sent since the last call, in order.
    pub fn take_outbox(&self) -> Vec<Outgoing> {
        self.inner().outbox.drain(..).collect()
    }

    fn push(&self, out: Outgoing) {
        self.inner().outbox.push_back(out);
    }
}

impl Network for SimNetwork {
    fn peers(&self) -> Vec<PeerInfo> {
        self.inner().peers.clone()
    }

    fn broadcast(&self, channel: Channel, message: Vec<u8>) {
        self.push(Outgoing::Broadcast { channel, message });
    }

    fn send(&self, peer: PeerId, message: Vec<u8>) {
        self.push(Outgoing::Send { to: peer, message });
    }

    fn request(&self, peer: PeerId, request: PeerRequest, id: u64) {
        self.push(Outgoing::Request {
            to: peer,
            request,
            id,
        });
    }

    fn report(&self, peer: PeerId, report: Report) {
        self.push(Outgoing::Report { peer, report });
    }
}
