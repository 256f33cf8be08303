//! The node's side of the network: decodes what peers send at the edge (bad senders lose
//! score), feeds consensus messages and sync answers to the driver, admits gossiped
//! transactions to the mempool (in batches of whatever arrived together, their signatures
//! verified in parallel), answers status and block requests, and keeps the binding of
//! validator keys to peers (from signed statuses) so votes go straight to the next leader.

use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, RwLock};

use keel_consensus::epoch_of_next_block;
use keel_p2p::peers::{Limits, PeerRecord};
use keel_p2p::{Channel, Event, Multiaddr, NetworkHandle, PeerId, PeerStore, Report};
use keel_storage::{Column, KvStore, WriteBatch};
use keel_types::{
    Address, Block, ConsensusMessage, EpochProof, Hash, Keypair, PeerRequest, PeerResponse, Status,
    MAX_SYNC_BLOCKS,
};
use tokio::sync::mpsc::Receiver;
use tracing::{debug, info, warn};

use crate::chain::{Chain, SubmitError};
use crate::config::Config;
use crate::driver::{pending_key, Command};
use crate::{Error, Result};

/// The libp2p peer id of a node key, as written in `/p2p/<peer id>` multiaddrs.
pub fn peer_id(node_key: &Keypair) -> Result<String> {
    keel_p2p::peer_id_of(node_key.secret())
        .map(|p| p.to_string())
        .map_err(|e| Error::Mismatch(e.to_string()))
}

/// Prefix of the stored proofs that an epoch ended, by epoch (big-endian), in the consensus
/// column: served to peers syncing across the boundary.
pub const EPOCH_PROOF_PREFIX: &[u8] = b"epoch_proof/";

/// Most gossiped transactions admitted together: those already queued when one arrives are
/// verified in one call (parallel batches of `keel_state::SIGNATURE_CHUNK`).
pub const TX_ADMISSION_BATCH: usize = 256;

pub(crate) fn epoch_proof_key(epoch: u64) -> Vec<u8> {
    [EPOCH_PROOF_PREFIX, &epoch.to_be_bytes()].concat()
}

/// What the driver uses of the network.
#[derive(Clone)]
pub(crate) struct Net {
    pub handle: NetworkHandle,
    /// Validators' addresses and the peers they are bound to.
    pub validator_peers: Arc<RwLock<HashMap<Address, PeerId>>>,
    /// Final heights peers reported.
    pub heights: Arc<RwLock<HashMap<PeerId, u64>>>,
    pub runtime: tokio::runtime::Handle,
}

impl Net {
    /// The peer a validator is bound to.
    pub fn peer_of(&self, validator: &Address) -> Option<PeerId> {
        self.validator_peers
            .read()
            .ok()
            .and_then(|m| m.get(validator).copied())
    }

    /// The highest final height a connected peer reported.
    pub fn best_height(&self) -> u64 {
        self.heights
            .read()
            .ok()
            .and_then(|h| h.values().max().copied())
            .unwrap_or(0)
    }

    /// A peer to sync from: the highest reported final height among connected peers, ties
    /// broken by `salt` so retries spread over peers.
    pub fn sync_peer(&self, salt: u64) -> Option<PeerId> {
        let peers = self.handle.peers();
        if peers.is_empty() {
            return None;
        }
        let heights = self.heights.read().ok();
        let best = peers
            .iter()
            .map(|p| {
                heights
                    .as_ref()
                    .and_then(|h| h.get(p).copied())
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let candidates: Vec<PeerId> = peers
            .iter()
            .filter(|p| {
                heights
                    .as_ref()
                    .and_then(|h| h.get(*p).copied())
                    .unwrap_or(0)
                    + 2
                    >= best
            })
            .copied()
            .collect();
        let pick = &candidates;
        pick.get((salt as usize) % pick.len().max(1)).copied()
    }
}

/// Peer scores in the `peers` column.
struct ColumnPeerStore(Arc<dyn KvStore>);

impl PeerStore for ColumnPeerStore {
    fn load(&self) -> Vec<PeerRecord> {
        let mut out = Vec::new();
        for item in self.0.iter_prefix(Column::Peers, b"") {
            let Ok((key, value)) = item else { continue };
            let (Ok(peer), Ok(bytes)) =
                (PeerId::from_bytes(&key), <[u8; 12]>::try_from(&value[..]))
            else {
                continue;
            };
            let mut score = [0u8; 4];
            score.copy_from_slice(&bytes[..4]);
            let mut until = [0u8; 8];
            until.copy_from_slice(&bytes[4..]);
            out.push(PeerRecord {
                peer,
                score: i32::from_le_bytes(score),
                banned_until_ms: u64::from_le_bytes(until),
            });
        }
        out
    }

    fn save(&self, records: &[PeerRecord]) {
        let mut batch = WriteBatch::new();
        for item in self.0.iter_prefix(Column::Peers, b"").flatten() {
            batch.delete(Column::Peers, item.0);
        }
        for r in records {
            let mut value = r.score.to_le_bytes().to_vec();
            value.extend(r.banned_until_ms.to_le_bytes());
            batch.put(Column::Peers, r.peer.to_bytes(), value);
        }
        if let Err(e) = self.0.write(batch) {
            warn!(error = %e, "could not save peer scores");
        }
    }
}

fn parse_addrs(key: &'static str, list: &[String]) -> Result<Vec<Multiaddr>> {
    list.iter()
        .map(|s| {
            s.parse()
                .map_err(|e| Error::Mismatch(format!("{key}: \"{s}\" is not a multiaddr: {e}")))
        })
        .collect()
}

/// Starts the p2p service and the task that serves it.
pub(crate) async fn start(
    chain: Arc<Chain>,
    config: &Config,
    node_key: &Keypair,
    validator_key: &Keypair,
    genesis_hash: Hash,
    driver: SyncSender<Command>,
) -> Result<Net> {
    let p2p = &config.p2p;
    let listen: Multiaddr = p2p.listen_addr.parse().map_err(|e| {
        Error::Mismatch(format!(
            "p2p.listen_addr: \"{}\" is not a multiaddr: {e}",
            p2p.listen_addr
        ))
    })?;
    let (handle, events) = keel_p2p::start(keel_p2p::Config {
        chain_id: chain.chain_id.clone(),
        secret: node_key.secret(),
        listen,
        persistent_peers: parse_addrs("p2p.persistent_peers", &p2p.persistent_peers)?,
        seeds: parse_addrs("p2p.seeds", &p2p.seeds)?,
        limits: Limits {
            max_peers: p2p.max_peers as usize,
            target_peers: p2p.target_peers as usize,
            inbound_per_sec: p2p.inbound_connections_per_sec,
        },
        compression_threshold_bytes: p2p.compression_threshold_bytes as usize,
        store: Some(Box::new(ColumnPeerStore(chain.blocks.kv().clone()))),
    })
    .map_err(|e| Error::Mismatch(e.to_string()))?;
    let net = Net {
        handle: handle.clone(),
        validator_peers: Arc::new(RwLock::new(HashMap::new())),
        heights: Arc::new(RwLock::new(HashMap::new())),
        runtime: tokio::runtime::Handle::current(),
    };
    let binding = Status::bind(
        validator_key,
        &chain.chain_id,
        &handle.local_peer_id().to_bytes(),
    );
    info!(peer_id = %handle.local_peer_id(), "p2p identity");
    let server = Server {
        chain,
        net: net.clone(),
        driver,
        binding,
        genesis_hash,
    };
    tokio::spawn(server.run(events));
    Ok(net)
}

struct Server {
    chain: Arc<Chain>,
    net: Net,
    driver: SyncSender<Command>,
    binding: (keel_types::PublicKey, keel_types::Signature),
    genesis_hash: Hash,
}

impl Server {
    fn status(&self) -> Status {
        let tip = self.chain.tip();
        Status {
            chain_id: self.chain.chain_id.clone(),
            genesis_hash: self.genesis_hash,
            final_height: tip.finalized.0,
            final_hash: tip.finalized.1,
            validator: Some(self.binding),
        }
    }

    fn to_driver(&self, command: Command) {
        match self.driver.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => debug!("consensus is busy: dropping a message"),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn consensus(&self, peer: PeerId, data: &[u8]) {
        match ConsensusMessage::decode(data) {
            Ok(message) => self.to_driver(Command::Message(message)),
            Err(e) => {
                debug!(%peer, error = %e, "undecodable consensus message");
                self.net.handle.report(peer, Report::Invalid);
            }
        }
    }

    /// Admits gossiped transactions together and scores each sender by its own message:
    /// undecodable or badly signed lowers it, admitted raises it, a mempool refusal (duplicate,
    /// nonce, fee...) leaves it.
    async fn admit_transactions(&self, batch: Vec<(PeerId, Vec<u8>)>) {
        let (peers, items): (Vec<PeerId>, Vec<Vec<u8>>) = batch.into_iter().unzip();
        let chain = self.chain.clone();
        // Signature checks run on rayon and admission takes the mempool lock, which the driver
        // holds while it commits: keep both off the async workers. The loop waits for the
        // verdicts, so admission stays in arrival order and the next batch forms from what
        // queued meanwhile.
        let results =
            match tokio::task::spawn_blocking(move || chain.admit_batch_from_peer(&items)).await {
                Ok(results) => results,
                Err(e) => {
                    warn!(error = %e, "transaction admission failed");
                    return;
                }
            };
        for (peer, result) in peers.into_iter().zip(results) {
            match result {
                Ok(_) => self.net.handle.report(peer, Report::Useful),
                Err(SubmitError::Malformed(_) | SubmitError::BadSignature) => {
                    self.net.handle.report(peer, Report::Invalid)
                }
                Err(_) => {}
            }
        }
    }

    async fn run(self, mut events: Receiver<Event>) {
        let server = Arc::new(self);
        // An event taken from the queue while collecting a batch of transactions: handled next.
        let mut next: Option<Event> = None;
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => match events.recv().await {
                    Some(event) => event,
                    None => break,
                },
            };
            match event {
                Event::Gossip {
                    peer,
                    channel: Channel::Transactions,
                    data,
                } => {
                    let (batch, after) =
                        drain_transactions((peer, data), &mut events, TX_ADMISSION_BATCH);
                    next = after;
                    server.admit_transactions(batch).await;
                }
                Event::Gossip { peer, data, .. } | Event::Direct { peer, data } => {
                    server.consensus(peer, &data)
                }
                Event::Request { peer, id, data } => {
                    let s = server.clone();
                    // Storage reads: off the event loop.
                    tokio::task::spawn_blocking(move || s.answer(peer, id, &data));
                }
                Event::Connected(peer) => {
                    let s = server.clone();
                    tokio::spawn(async move { s.learn_status(peer).await });
                }
                Event::Disconnected(peer) => {
                    if let Ok(mut m) = server.net.validator_peers.write() {
                        m.retain(|_, p| *p != peer);
                    }
                    if let Ok(mut h) = server.net.heights.write() {
                        h.remove(&peer);
                    }
                    server.update_reserved();
                }
            }
            server.chain.set_peers(server.net.handle.peer_count());
        }
    }

    fn update_reserved(&self) {
        if let Ok(m) = self.net.validator_peers.read() {
            self.net
                .handle
                .set_validator_peers(m.values().copied().collect());
        }
    }

    /// Asks a new peer its status: same chain and genesis, or it is dropped; a validator
    /// binding signed for this very peer id makes it the address of that validator.
    async fn learn_status(&self, peer: PeerId) {
        let answer = self
            .net
            .handle
            .request(peer, PeerRequest::Status.encode())
            .await;
        let status = match answer.map(|b| PeerResponse::decode(&b)) {
            Ok(Ok(PeerResponse::Status(s))) => s,
            Ok(_) => {
                self.net.handle.report(peer, Report::Invalid);
                return;
            }
            Err(e) => {
                debug!(%peer, error = %e, "status request failed");
                return;
            }
        };
        if status.chain_id != self.chain.chain_id || status.genesis_hash != self.genesis_hash {
            warn!(%peer, chain_id = %status.chain_id, "peer is on another chain");
            self.net.handle.report(peer, Report::Malicious);
            self.net.handle.report(peer, Report::Malicious);
            return;
        }
        if let Ok(mut h) = self.net.heights.write() {
            h.insert(peer, status.final_height);
        }
        if let Some(key) = status.bound_validator(&peer.to_bytes()) {
            debug!(%peer, validator = %key.address(), "validator peer");
            if let Ok(mut m) = self.net.validator_peers.write() {
                m.insert(key.address(), peer);
            }
            self.update_reserved();
        }
    }

    fn answer(&self, peer: PeerId, id: u64, data: &[u8]) {
        let response = match PeerRequest::decode(data) {
            Ok(PeerRequest::Status) => PeerResponse::Status(self.status()),
            Ok(PeerRequest::Blocks {
                target,
                have_height,
                max,
            }) => match serve_blocks(&self.chain, target, have_height, max) {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "cannot serve blocks");
                    return;
                }
            },
            Err(e) => {
                debug!(%peer, error = %e, "undecodable request");
                self.net.handle.report(peer, Report::Invalid);
                return;
            }
        };
        if let Err(e) = self.net.handle.respond(id, response.encode()) {
            debug!(%peer, error = %e, "response not sent");
        }
    }
}

/// `first` and the transaction gossip already queued behind it, at most `max` in all, without
/// waiting. Stops at the first event of another kind and returns it to be handled next, so
/// events are still handled in arrival order.
fn drain_transactions(
    first: (PeerId, Vec<u8>),
    events: &mut Receiver<Event>,
    max: usize,
) -> (Vec<(PeerId, Vec<u8>)>, Option<Event>) {
    let mut batch = vec![first];
    while batch.len() < max {
        match events.try_recv() {
            Ok(Event::Gossip {
                peer,
                channel: Channel::Transactions,
                data,
            }) => batch.push((peer, data)),
            Ok(other) => return (batch, Some(other)),
            Err(_) => break,
        }
    }
    (batch, None)
}

/// A non-final block this node holds (persisted by the driver).
fn pending_block(kv: &Arc<dyn KvStore>, hash: &Hash) -> Option<Block> {
    kv.get(Column::Consensus, &pending_key(hash))
        .ok()
        .flatten()
        .and_then(|b| Block::decode(&b).ok())
}

/// Blocks for a peer whose final height is `have_height` and who wants `target`: final
/// blocks above its height first (by height), then the non-final branch to `target`; oldest
/// first, at most `max` (capped at [`MAX_SYNC_BLOCKS`]), and the proof that the asker's
/// epoch ended if this node has it.
pub(crate) fn serve_blocks(
    chain: &Chain,
    target: Hash,
    have_height: u64,
    max: u32,
) -> keel_storage::Result<PeerResponse> {
    let max = max.clamp(1, MAX_SYNC_BLOCKS) as usize;
    let finalized = chain.tip().finalized.0;
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
        let kv = chain.blocks.kv();
        let mut path = Vec::new();
        let mut cursor = target;
        while let Some(b) = pending_block(kv, &cursor) {
            if b.header.height <= finalized || path.len() > 256 {
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
                .take(max - blocks.len()),
        );
    }
    let epoch = epoch_of_next_block(have_height, chain.params.epoch_length);
    let proof = chain
        .blocks
        .kv()
        .get(Column::Consensus, &epoch_proof_key(epoch))?
        .and_then(|b| ConsensusMessage::decode(&b).ok())
        .and_then(|m| match m {
            ConsensusMessage::EpochProof(p) => Some(p),
            _ => None,
        });
    Ok(PeerResponse::Blocks { blocks, proof })
}

/// Stores the proof that `epoch` ended (the block at its end is final), for peers syncing
/// across it.
pub(crate) fn store_epoch_proof(
    kv: &Arc<dyn KvStore>,
    epoch: u64,
    proof: &EpochProof,
) -> keel_storage::Result<()> {
    kv.put(
        Column::Consensus,
        &epoch_proof_key(epoch),
        &ConsensusMessage::EpochProof(proof.clone()).encode(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn peer(seed: u64) -> PeerId {
        keel_p2p::peer_id_of(Keypair::from_seed(seed).secret()).unwrap()
    }

    fn tx_gossip(peer: PeerId, n: u8) -> Event {
        Event::Gossip {
            peer,
            channel: Channel::Transactions,
            data: vec![n],
        }
    }

    #[test]
    fn queued_transaction_gossip_is_taken_in_one_batch_up_to_the_limit() {
        let (sender, mut events) = tokio::sync::mpsc::channel(64);
        let (a, b) = (peer(1), peer(2));
        for n in 1..=10u8 {
            sender
                .try_send(tx_gossip(if n % 2 == 0 { a } else { b }, n))
                .unwrap();
        }
        let (batch, next) = drain_transactions((a, vec![0]), &mut events, 4);
        assert!(next.is_none());
        let got: Vec<(PeerId, u8)> = batch.iter().map(|(p, d)| (*p, d[0])).collect();
        assert_eq!(got, [(a, 0), (b, 1), (a, 2), (b, 3)]);
        // The rest is still queued, and an empty queue ends the batch without waiting.
        let (batch, next) = drain_transactions((a, vec![0]), &mut events, 256);
        assert_eq!(batch.len(), 8);
        assert!(next.is_none());
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn a_batch_stops_at_another_event_which_is_handled_next() {
        let (sender, mut events) = tokio::sync::mpsc::channel(64);
        let a = peer(1);
        sender.try_send(tx_gossip(a, 1)).unwrap();
        sender.try_send(Event::Connected(a)).unwrap();
        sender.try_send(tx_gossip(a, 2)).unwrap();
        let (batch, next) = drain_transactions((a, vec![0]), &mut events, 256);
        assert_eq!(batch.len(), 2);
        assert!(matches!(next, Some(Event::Connected(p)) if p == a));
        // The transaction behind it is left for the next batch.
        assert!(matches!(
            events.try_recv(),
            Ok(Event::Gossip { data, .. }) if data == [2]
        ));
    }
}
