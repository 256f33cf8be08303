//! The libp2p [`Network`]: the `keel-p2p` service, and the node's server task on top of it,
//! which decodes what peers send at the edge (bad senders lose score), feeds consensus
//! messages and answers to requests to the host's queue, admits gossiped transactions to the
//! mempool (the [`TxBatch`]es that arrived together, every transaction in them checked on its
//! own, their signatures verified in parallel), answers status and block requests, and keeps
//! the binding of validator keys to peers (from signed statuses) so votes go straight to the
//! next leader. Transactions submitted over RPC are gossiped in batches by
//! [`super::tx_gossip`], whose flusher task the server task owns.
//!
//! The network exports what the p2p service counts, read at scrape time from its atomics:
//! `keel_p2p_bytes_total{direction,compressed}`, `keel_p2p_dropped_messages_total{channel,reason}`
//! and `keel_peers`.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, RwLock};

use keel_p2p::drops::DropReason;
use keel_p2p::frame::ByteCounts;
use keel_p2p::peers::Limits;
use keel_p2p::{Event, Multiaddr, NetworkHandle};
use keel_types::{Address, Hash, Keypair, PeerRequest, PeerResponse, Status, TxBatch};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::tx_gossip::{self, TxGossip};
use super::{Channel, Network, PeerId, PeerInfo, Report};
use crate::config::Config;
use crate::context::{NodeContext, SubmitError};
use crate::host::{Command, InboundQueue, QueueCharge};
use crate::metrics::{encode_counters, encode_gauge};
use crate::sync::serve_blocks;
use crate::{Error, Result};

/// The libp2p peer id of a node key, as written in `/p2p/<peer id>` multiaddrs.
pub fn peer_id(node_key: &Keypair) -> Result<PeerId> {
    keel_p2p::peer_id_of(node_key.secret()).map_err(Error::Network)
}

/// Most bytes of gossiped transaction batches admitted together (four full batches, some
/// 1,700 transfers): the batches already queued when one arrives are verified in one call
/// (parallel chunks of `keel_state::SIGNATURE_CHUNK`).
pub const TX_ADMISSION_BYTES: usize = 4 * tx_gossip::MAX_BATCH_BYTES;

/// What the server task learned of each peer.
#[derive(Default)]
struct PeerTable {
    /// Validators' addresses and the peers they are bound to.
    validators: HashMap<PeerId, Address>,
    /// Final heights peers reported.
    heights: HashMap<PeerId, u64>,
}

/// The libp2p network as the host uses it. Cheap to clone.
#[derive(Clone)]
pub struct Libp2pNetwork {
    handle: NetworkHandle,
    /// Transactions submitted here, gathered into batches.
    txs: TxGossip,
    table: Arc<RwLock<PeerTable>>,
    runtime: tokio::runtime::Handle,
    /// Where answers to requests go: the host's queue.
    commands: SyncSender<Command>,
    /// The bytes waiting in the host's queue, bounded.
    inbound: Arc<InboundQueue>,
}

impl Libp2pNetwork {
    /// Payload bytes waiting in the p2p service's outbound queues (the memory budget).
    pub fn queued_bytes(&self) -> u64 {
        self.handle.queued_bytes()
    }

    /// Bytes of network messages and sync answers waiting in the host's queue.
    pub fn inbound_bytes(&self) -> u64 {
        self.inbound.queued()
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.handle.local_peer_id()
    }

    /// Registers `keel_p2p_bytes`, `keel_p2p_dropped_messages` and `keel_peers`, read from the
    /// p2p service at each scrape.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(P2pMetrics(self.handle.clone())));
    }
}

/// The collector of [`Libp2pNetwork::register_metrics`].
struct P2pMetrics(NetworkHandle);

impl fmt::Debug for P2pMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("P2pMetrics").finish_non_exhaustive()
    }
}

impl Collector for P2pMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_p2p(
            &mut encoder,
            self.0.byte_stats(),
            &self.0.drop_stats().series(),
            self.0.peer_count(),
        )
    }
}

/// Writes `keel_p2p_bytes` (wire bytes by direction and compression), `keel_p2p_dropped_messages`
/// (by channel and reason; both counts only grow) and `keel_peers`.
fn encode_p2p(
    encoder: &mut DescriptorEncoder<'_>,
    bytes: ByteCounts,
    drops: &[(Channel, DropReason, u64)],
    peers: usize,
) -> fmt::Result {
    encode_counters(
        encoder,
        "keel_p2p_bytes",
        "Peer-to-peer frame bytes by direction and compression",
        &[
            (
                [("direction", "sent"), ("compressed", "false")],
                bytes.sent_raw,
            ),
            (
                [("direction", "sent"), ("compressed", "true")],
                bytes.sent_compressed,
            ),
            (
                [("direction", "received"), ("compressed", "false")],
                bytes.received_raw,
            ),
            (
                [("direction", "received"), ("compressed", "true")],
                bytes.received_compressed,
            ),
        ],
    )?;
    let drops: Vec<([(&str, &str); 2], u64)> = drops
        .iter()
        .map(|(channel, reason, n)| {
            (
                [("channel", channel.as_str()), ("reason", reason.as_str())],
                *n,
            )
        })
        .collect();
    encode_counters(
        encoder,
        "keel_p2p_dropped_messages",
        "Messages the network gave up on, by channel and reason",
        &drops,
    )?;
    encode_gauge(encoder, "keel_peers", "Connected peers", peers as u64)
}

impl Network for Libp2pNetwork {
    fn peers(&self) -> Vec<PeerInfo> {
        let table = self.table.read().ok();
        self.handle
            .peers()
            .into_iter()
            .map(|id| PeerInfo {
                id,
                final_height: table
                    .as_ref()
                    .and_then(|t| t.heights.get(&id).copied())
                    .unwrap_or(0),
                validator: table.as_ref().and_then(|t| t.validators.get(&id).copied()),
            })
            .collect()
    }

    fn broadcast(&self, channel: Channel, message: Vec<u8>) {
        if channel == Channel::Transactions {
            self.txs.push(message);
            return;
        }
        if let Err(e) = self.handle.publish(channel, message) {
            debug!(?channel, error = %e, "broadcast not sent");
        }
    }

    fn send(&self, peer: PeerId, message: Vec<u8>) {
        if let Err(e) = self.handle.send_direct(peer, message) {
            debug!(%peer, error = %e, "message not sent");
        }
    }

    fn request(&self, peer: PeerId, request: PeerRequest, id: u64) {
        let (handle, commands) = (self.handle.clone(), self.commands.clone());
        let inbound = self.inbound.clone();
        self.runtime.spawn(async move {
            let mut charge = QueueCharge::none();
            let response = match handle.request(peer, request.encode()).await {
                Ok(bytes) => match PeerResponse::decode(&bytes) {
                    // Decoded, an answer takes about its encoded size again.
                    Ok(r) => match inbound.charge(2 * bytes.len() as u64) {
                        Some(c) => {
                            charge = c;
                            Some(r)
                        }
                        None => {
                            debug!(%peer, bytes = bytes.len(), "consensus is busy: dropping a sync answer");
                            handle
                                .drop_stats()
                                .add(Channel::Sync, DropReason::HostBusy, 1);
                            None
                        }
                    },
                    Err(e) => {
                        debug!(%peer, error = %e, "undecodable response");
                        handle.report(peer, Report::Invalid);
                        None
                    }
                },
                Err(e) => {
                    debug!(%peer, error = %e, "request failed");
                    None
                }
            };
            let sent = commands.try_send(Command::Response {
                id,
                peer,
                response: response.map(Box::new),
                charge,
            });
            if let Err(TrySendError::Full(_)) = sent {
                handle
                    .drop_stats()
                    .add(Channel::Sync, DropReason::HostBusy, 1);
            }
        });
    }

    fn report(&self, peer: PeerId, report: Report) {
        self.handle.report(peer, report);
    }
}

fn parse_addr(key: &'static str, text: &str) -> Result<Multiaddr> {
    text.parse::<Multiaddr>().map_err(|e| Error::BadAddress {
        key,
        value: text.to_string(),
        reason: e.to_string(),
    })
}

fn parse_addrs(key: &'static str, list: &[String]) -> Result<Vec<Multiaddr>> {
    list.iter().map(|s| parse_addr(key, s)).collect()
}

/// The running libp2p side of a node: the network for the host and the two tasks to join at
/// shutdown.
pub struct Started {
    /// The network, for the host.
    pub network: Libp2pNetwork,
    /// The p2p service (ends, after saving the peer book, once the server has stopped).
    pub service: JoinHandle<()>,
    /// The node's server task (ends when `shutdown` is cancelled).
    pub server: JoinHandle<()>,
}

/// Starts the p2p service and the server task on the current runtime.
pub fn start(
    chain: Arc<NodeContext>,
    config: &Config,
    node_key: &Keypair,
    validator_key: &Keypair,
    genesis_hash: Hash,
    commands: SyncSender<Command>,
    shutdown: CancellationToken,
) -> Result<Started> {
    let p2p = &config.p2p;
    let listen = parse_addr("p2p.listen_addr", &p2p.listen_addr)?;
    let (handle, events, service) = keel_p2p::start_service(keel_p2p::Config {
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
        // The p2p budget is split: half for the outbound low-priority queue, half for what
        // waits for the host (`Libp2pNetwork::inbound_bytes`).
        queue_bytes: crate::memory::Budgets::of(config).p2p / 2,
        store: Some(Box::new(chain.records().peer_book())),
    })
    .map_err(Error::Network)?;
    let txs = TxGossip::new(handle.clone());
    let flusher = tokio::spawn(tx_gossip::run(txs.clone(), shutdown.clone()));
    let network = Libp2pNetwork {
        handle: handle.clone(),
        txs,
        table: Arc::new(RwLock::new(PeerTable::default())),
        runtime: tokio::runtime::Handle::current(),
        commands: commands.clone(),
        inbound: InboundQueue::new(crate::memory::Budgets::of(config).p2p / 2),
    };
    let binding = Status::bind(
        validator_key,
        &chain.chain_id,
        &handle.local_peer_id().to_bytes(),
    );
    info!(peer_id = %handle.local_peer_id(), "p2p identity");
    let server = Server {
        chain,
        net: network.clone(),
        host: commands,
        binding,
        genesis_hash,
    };
    let server = tokio::spawn(server.run(events, flusher, shutdown));
    Ok(Started {
        network,
        service,
        server,
    })
}

struct Server {
    chain: Arc<NodeContext>,
    net: Libp2pNetwork,
    host: SyncSender<Command>,
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

    fn to_host(&self, command: Command) {
        match self.host.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.host_busy(),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// A consensus message dropped because the host's queue is full (by count or bytes).
    fn host_busy(&self) {
        debug!("consensus is busy: dropping a message");
        self.net
            .handle
            .drop_stats()
            .add(Channel::Consensus, DropReason::HostBusy, 1);
    }

    /// A consensus message from `peer`, its author.
    fn consensus(&self, peer: PeerId, data: &[u8]) {
        match keel_types::ConsensusMessage::decode(data) {
            // Decoded, a message takes about its encoded size again.
            Ok(message) => match self.net.inbound.charge(2 * data.len() as u64) {
                Some(charge) => self.to_host(Command::Message {
                    peer,
                    message: Box::new(message),
                    charge,
                }),
                None => self.host_busy(),
            },
            Err(e) => {
                debug!(%peer, error = %e, "undecodable consensus message");
                self.net.report(peer, Report::Invalid);
            }
        }
    }

    /// Admits the transactions of gossiped batches together, each on its own (a bad one is
    /// refused alone), and scores each relay by its message ([`batch_reports`]).
    async fn admit_transactions(&self, messages: Vec<(PeerId, Vec<u8>)>) {
        let (peers, payloads): (Vec<PeerId>, Vec<Vec<u8>>) = messages.into_iter().unzip();
        let chain = self.chain.clone();
        // Decoding, signature checks (on rayon) and admission (under the mempool lock) stay
        // off the async workers. The loop waits for the verdicts, so admission stays in
        // arrival order and the next round forms from what queued meanwhile.
        let admitted = tokio::task::spawn_blocking(move || {
            let (items, spans) = unbatch(&payloads);
            (spans, chain.admit_batch_from_peer(&items))
        })
        .await;
        let (spans, results) = match admitted {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "transaction admission failed");
                return;
            }
        };
        for (peer, report) in batch_reports(&peers, &spans, &results) {
            if report == Report::Invalid {
                debug!(%peer, "invalid transaction gossip");
            }
            self.net.report(peer, report);
        }
    }

    async fn run(
        self,
        mut events: Receiver<Event>,
        flusher: JoinHandle<()>,
        shutdown: CancellationToken,
    ) {
        let server = Arc::new(self);
        // An event taken from the queue while collecting a batch of transactions: handled next.
        let mut next: Option<Event> = None;
        loop {
            let event = match next.take() {
                Some(event) => event,
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    event = events.recv() => match event {
                        Some(event) => event,
                        None => break,
                    },
                },
            };
            match event {
                Event::Gossip {
                    peer,
                    channel: Channel::Transactions,
                    data,
                    ..
                } => {
                    let (batch, after) =
                        drain_transactions((peer, data), &mut events, TX_ADMISSION_BYTES);
                    next = after;
                    server.admit_transactions(batch).await;
                }
                Event::Gossip {
                    peer, author, data, ..
                } => server.consensus(author.unwrap_or(peer), &data),
                Event::Direct { peer, data } => server.consensus(peer, &data),
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
                    if let Ok(mut t) = server.net.table.write() {
                        t.validators.remove(&peer);
                        t.heights.remove(&peer);
                    }
                    server.update_reserved();
                }
            }
            server.chain.set_peers(server.net.handle.peer_count());
        }
        // The flusher holds nothing worth flushing at shutdown (what waits is in the mempool).
        flusher.abort();
        let _ = flusher.await;
        debug!("network server stopped");
        // Dropping `events` tells the p2p service to save the peer book and stop.
    }

    fn update_reserved(&self) {
        if let Ok(t) = self.net.table.read() {
            self.net
                .handle
                .set_validator_peers(t.validators.keys().copied().collect());
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
                self.net.report(peer, Report::Invalid);
                return;
            }
            Err(e) => {
                debug!(%peer, error = %e, "status request failed");
                return;
            }
        };
        if status.chain_id != self.chain.chain_id || status.genesis_hash != self.genesis_hash {
            warn!(%peer, chain_id = %status.chain_id, "peer is on another chain");
            self.net.report(peer, Report::Malicious);
            self.net.report(peer, Report::Malicious);
            return;
        }
        let validator = status.bound_validator(&peer.to_bytes());
        if let Ok(mut t) = self.net.table.write() {
            t.heights.insert(peer, status.final_height);
            if let Some(key) = &validator {
                // One peer per validator: a newer binding replaces an older one.
                let address = key.address();
                t.validators.retain(|_, a| *a != address);
                t.validators.insert(peer, address);
            }
        }
        if let Some(key) = validator {
            debug!(%peer, validator = %key.address(), "validator peer");
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
                self.net.report(peer, Report::Invalid);
                return;
            }
        };
        if let Err(e) = self.net.handle.respond(id, response.encode()) {
            debug!(%peer, error = %e, "response not sent");
        }
    }
}

/// `first` and the transaction gossip already queued behind it, without waiting, until the
/// payloads reach `max_bytes`. Stops at the first event of another kind and returns it to be
/// handled next, so events are still handled in arrival order.
fn drain_transactions(
    first: (PeerId, Vec<u8>),
    events: &mut Receiver<Event>,
    max_bytes: usize,
) -> (Vec<(PeerId, Vec<u8>)>, Option<Event>) {
    let mut bytes = first.1.len();
    let mut batch = vec![first];
    while bytes < max_bytes {
        match events.try_recv() {
            Ok(Event::Gossip {
                peer,
                channel: Channel::Transactions,
                data,
                ..
            }) => {
                bytes += data.len();
                batch.push((peer, data));
            }
            Ok(other) => return (batch, Some(other)),
            Err(_) => break,
        }
    }
    (batch, None)
}

/// The transactions of gossiped [`TxBatch`] payloads, in order, and where each payload's
/// transactions lie among them (`None`: the payload is not a batch).
fn unbatch(payloads: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Option<Range<usize>>>) {
    let mut items = Vec::new();
    let spans = payloads
        .iter()
        .map(|payload| {
            let batch = TxBatch::decode(payload).ok()?;
            let start = items.len();
            items.extend(batch.txs);
            Some(start..items.len())
        })
        .collect();
    (items, spans)
}

/// What each gossiped batch earns its relay (`peers[i]` relayed the batch whose transactions
/// are `results[spans[i]]`): `Invalid` when it does not decode, or holds a transaction that
/// does not decode or whose signature fails (the others in it are admitted all the same);
/// otherwise `Useful` when it added any transaction to the mempool; otherwise nothing (a
/// duplicate, a nonce or fee refusal is nothing an honest relay can foresee). One report per
/// message, not per transaction, so a busy link does not flood the p2p task with reports.
fn batch_reports(
    peers: &[PeerId],
    spans: &[Option<Range<usize>>],
    results: &[std::result::Result<Hash, SubmitError>],
) -> Vec<(PeerId, Report)> {
    peers
        .iter()
        .zip(spans)
        .filter_map(|(peer, span)| {
            let Some(span) = span else {
                return Some((*peer, Report::Invalid));
            };
            let verdicts = results.get(span.clone()).unwrap_or_default();
            let invalid = verdicts.iter().any(|r| {
                matches!(
                    r,
                    Err(SubmitError::Malformed(_) | SubmitError::BadSignature)
                )
            });
            if invalid {
                Some((*peer, Report::Invalid))
            } else if verdicts.iter().any(|r| r.is_ok()) {
                Some((*peer, Report::Useful))
            } else {
                None
            }
        })
        .collect()
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn peer(seed: u64) -> PeerId {
        keel_p2p::peer_id_of(Keypair::from_seed(seed).secret()).unwrap()
    }

    /// What a p2p service with these counts exports.
    #[derive(Debug)]
    struct Counted(ByteCounts, Vec<(Channel, DropReason, u64)>, usize);

    impl Collector for Counted {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_p2p(&mut encoder, self.0, &self.1, self.2)
        }
    }

    #[test]
    fn p2p_metrics_export_bytes_drops_and_the_peer_count() {
        let mut registry = Registry::default();
        let counts = ByteCounts {
            sent_raw: 1,
            sent_compressed: 2,
            received_raw: 3,
            received_compressed: 4,
            sent_compressed_payload: 99,
        };
        let drops = keel_p2p::drops::DropStats::default();
        drops.add(Channel::Transactions, DropReason::BatchFull, 7);
        drops.add(Channel::Consensus, DropReason::PeerQueueFull, 2);
        registry.register_collector(Box::new(Counted(counts, drops.series(), 5)));
        let text = crate::metrics::render(&registry);
        let expected = "\
            # HELP keel_p2p_bytes_total Peer-to-peer frame bytes by direction and compression.\n\
            # TYPE keel_p2p_bytes_total counter\n\
            keel_p2p_bytes_total{direction=\"sent\",compressed=\"false\"} 1\n\
            keel_p2p_bytes_total{direction=\"sent\",compressed=\"true\"} 2\n\
            keel_p2p_bytes_total{direction=\"received\",compressed=\"false\"} 3\n\
            keel_p2p_bytes_total{direction=\"received\",compressed=\"true\"} 4\n\
            # HELP keel_p2p_dropped_messages_total Messages the network gave up on, by channel and reason.\n\
            # TYPE keel_p2p_dropped_messages_total counter\n\
            keel_p2p_dropped_messages_total{channel=\"consensus\",reason=\"queue_full\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"consensus\",reason=\"peer_queue_full\"} 2\n\
            keel_p2p_dropped_messages_total{channel=\"consensus\",reason=\"publish_failed\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"consensus\",reason=\"send_failed\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"consensus\",reason=\"host_busy\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"evidence\",reason=\"queue_full\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"evidence\",reason=\"publish_failed\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"transactions\",reason=\"queue_full\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"transactions\",reason=\"peer_queue_full\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"transactions\",reason=\"publish_failed\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"transactions\",reason=\"batch_full\"} 7\n\
            keel_p2p_dropped_messages_total{channel=\"sync\",reason=\"queue_full\"} 0\n\
            keel_p2p_dropped_messages_total{channel=\"sync\",reason=\"host_busy\"} 0\n\
            # HELP keel_peers Connected peers.\n\
            # TYPE keel_peers gauge\n\
            keel_peers 5\n";
        assert_eq!(text, expected);
    }

    fn tx_gossip(peer: PeerId, n: u8) -> Event {
        Event::Gossip {
            peer,
            author: Some(peer),
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

    #[test]
    fn a_gossiped_batch_admits_each_good_transaction_and_costs_its_relay_once_for_bad_ones() {
        use crate::context::tests::{chain, transfer};

        let (chain, _) = chain();
        let (good, mixed, garbage, stale) = (peer(1), peer(2), peer(3), peer(4));
        let t: Vec<keel_types::Transaction> = (1..=6).map(|s| transfer(s, 0)).collect();
        let mut forged = t[3].bytes.clone();
        let n = forged.len();
        forged[n - 1] ^= 1;
        let batch = |txs: Vec<Vec<u8>>| TxBatch { txs }.encode();
        let messages = [
            (good, batch(vec![t[0].bytes.clone(), t[1].bytes.clone()])),
            // A good one, a bad signature, bytes that are no transaction, a good one.
            (
                mixed,
                batch(vec![
                    t[2].bytes.clone(),
                    forged,
                    b"junk".to_vec(),
                    t[4].bytes.clone(),
                ]),
            ),
            // Not a batch at all.
            (garbage, vec![0x01, 0x02]),
            // Only what the pool already holds: nothing to score.
            (stale, batch(vec![t[0].bytes.clone()])),
        ];
        let payloads: Vec<Vec<u8>> = messages.iter().map(|m| m.1.clone()).collect();
        let (items, spans) = unbatch(&payloads);
        assert_eq!(items.len(), 7);
        assert_eq!(spans, vec![Some(0..2), Some(2..6), None, Some(6..7)]);
        let results = chain.admit_batch_from_peer(&items);
        for admitted in [0, 1, 2, 4] {
            assert!(chain.mempool().contains(&t[admitted].hash), "tx {admitted}");
        }
        assert!(!chain.mempool().contains(&t[3].hash));
        assert_eq!(chain.mempool().len(), 4);
        let peers: Vec<PeerId> = messages.iter().map(|m| m.0).collect();
        assert_eq!(
            batch_reports(&peers, &spans, &results),
            vec![
                (good, Report::Useful),
                (mixed, Report::Invalid),
                (garbage, Report::Invalid)
            ]
        );
    }

    fn p2p_config(seed: u8, persistent: Vec<Multiaddr>) -> keel_p2p::Config {
        keel_p2p::Config {
            chain_id: "net-test".into(),
            secret: [seed; 32],
            listen: "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
            persistent_peers: persistent,
            seeds: vec![],
            limits: Limits {
                max_peers: 10,
                target_peers: 5,
                inbound_per_sec: 10,
            },
            compression_threshold_bytes: 1024,
            queue_bytes: 64 << 20,
            store: None,
        }
    }

    /// The transactions of the batches `events` holds, and how many gossip messages held them.
    fn take_batches(events: &mut tokio::sync::mpsc::Receiver<Event>) -> (Vec<Vec<u8>>, usize) {
        let (mut txs, mut messages) = (Vec::new(), 0);
        while let Ok(e) = events.try_recv() {
            if let Event::Gossip {
                channel: Channel::Transactions,
                data,
                ..
            } = e
            {
                messages += 1;
                txs.extend(TxBatch::decode(&data).unwrap().txs);
            }
        }
        (txs, messages)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transactions_submitted_together_cross_the_network_in_a_few_gossip_messages() {
        use std::time::{Duration, Instant};

        let (a, _a_events) = keel_p2p::start(p2p_config(1, vec![])).unwrap();
        let mut a_addr = None;
        for _ in 0..250 {
            a_addr = a.listen_addrs().first().cloned();
            if a_addr.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a_full: Multiaddr = format!("{}/p2p/{}", a_addr.unwrap(), a.local_peer_id())
            .parse()
            .unwrap();
        let (_b, mut b_events) = keel_p2p::start(p2p_config(2, vec![a_full])).unwrap();
        let gossip = TxGossip::new(a.clone());
        let shutdown = CancellationToken::new();
        let flusher = tokio::spawn(tx_gossip::run(gossip.clone(), shutdown.clone()));

        // Until B's subscription is known, what A publishes reaches nobody.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            gossip.push(b"ping".to_vec());
            tokio::time::sleep(Duration::from_millis(100)).await;
            if take_batches(&mut b_events).1 > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "transaction gossip never flowed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        take_batches(&mut b_events);

        // 2,000 transfers submitted in a burst; they have their own 15 s (the wait for the
        // subscription above may have used most of its own on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(15);
        // In two halves: the batcher holds at most MAX_PENDING_BYTES (256 KiB) waiting and
        // drops what comes beyond (`batch_full`), and 2,000 transfers are ~300 KiB; pushed
        // at once they fit only when the flusher happens to run in between.
        let sent: Vec<Vec<u8>> = (0..2_000u64).map(transfer_bytes).collect();
        for half in sent.chunks(1_000) {
            for tx in half {
                gossip.push(tx.clone());
            }
            tokio::time::sleep(2 * tx_gossip::FLUSH_INTERVAL).await;
        }
        let (mut got, mut messages) = (Vec::new(), 0);
        while got.len() < sent.len() {
            assert!(Instant::now() < deadline, "{} of 2000 arrived", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (txs, m) = take_batches(&mut b_events);
            got.extend(txs);
            messages += m;
        }
        assert_eq!(got, sent, "every transaction, in order");
        // 2,000 transfers of some 150 bytes fill five 64 KiB batches; one message each
        // before batching.
        assert!(messages <= 10, "{messages} gossip messages");
        shutdown.cancel();
        flusher.await.unwrap();
    }

    fn transfer_bytes(n: u64) -> Vec<u8> {
        keel_types::Transaction::sign(
            &Keypair::from_seed(n % 50),
            "net-test",
            n,
            1,
            keel_types::TxKind::Transfer {
                to: Address([3; 20]),
                amount: n,
            },
        )
        .bytes
    }
}
