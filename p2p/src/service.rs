//! The libp2p service: TCP + noise + yamux, two gossipsub instances (consensus and evidence on
//! one, transactions on their own), a one-way direct protocol for messages to one peer, a
//! request/response protocol for status and block sync, identify and ping; one tokio task owns
//! the swarm.
//!
//! The node talks to it through a [`NetworkHandle`] (bounded command queues: consensus
//! traffic has its own queue, polled before everything else, so votes and proposals go out
//! ahead of transaction gossip and sync on a busy link) and receives [`Event`]s on a bounded
//! channel; when that channel is full, gossip is dropped (gossip is redundant) rather than
//! growing memory.
//!
//! Gossipsub keeps one bounded send queue per peer and instance, and has no priorities between
//! topics: a queue full of transaction gossip would drop a proposal. Transactions therefore
//! gossip on a second instance (its own protocol, `/keel/<chain>/txgossip/1.1.0`, its own
//! per-peer queue, shorter and with shorter deadlines), so they can fill and drop only their
//! own queue. Every message given up on is counted in [`DropStats`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    gossipsub, identify, identity, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::codec::FrameCodec;
use crate::drops::{DropReason, DropStats};
use crate::frame::{self, ByteStats};
use crate::peers::{Limits, PeerManager, PeerRecord, Verdict};
use crate::{Channel, Error, Report, Result};

/// Queue length of each command queue and of the event channel.
const QUEUE: usize = 1024;
/// Most inbound requests waiting for the node's answer.
const MAX_PENDING_REQUESTS: usize = 256;
/// Request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often peers are maintained (dials, surplus, score saving).
const TICK: Duration = Duration::from_millis(500);
/// How often scores are handed to the [`PeerStore`].
const SAVE_EVERY_TICKS: u64 = 60;
/// Gossipsub heartbeat (mesh upkeep, gossip, the report of slow peers' drops).
const HEARTBEAT: Duration = Duration::from_millis(700);
/// Messages the transaction gossip instance queues per peer: batches of up to 64 KiB, so at
/// most 16 MiB per peer, a couple of seconds of heavy traffic.
const TX_PEER_QUEUE: usize = 256;
/// How long a transaction batch published here may wait in a peer's queue; a proposal
/// (consensus instance) keeps gossipsub's 5 s.
const TX_PUBLISH_DEADLINE: Duration = Duration::from_secs(2);
/// How long a forwarded transaction batch may wait in a peer's queue.
const TX_FORWARD_DEADLINE: Duration = Duration::from_secs(1);

/// Where peer scores and bans persist (the node's `peers` column).
pub trait PeerStore: Send + 'static {
    /// Records saved before.
    fn load(&self) -> Vec<PeerRecord>;
    /// Replaces the saved records.
    fn save(&self, records: &[PeerRecord]);
}

/// Configuration of the service.
pub struct Config {
    /// The chain: topics and protocol names include it, so two chains never mix.
    pub chain_id: String,
    /// The node key's 32 secret bytes: the peer id.
    pub secret: [u8; 32],
    /// Where to listen.
    pub listen: Multiaddr,
    /// Peers to stay connected to (each with `/p2p/<peer id>`).
    pub persistent_peers: Vec<Multiaddr>,
    /// Addresses to dial while below the target.
    pub seeds: Vec<Multiaddr>,
    /// Connection limits.
    pub limits: Limits,
    /// Payloads larger than this are compressed.
    pub compression_threshold_bytes: usize,
    /// Most payload bytes waiting in the low-priority queue (transactions and sync) for the
    /// service; beyond it a message is dropped, counted as [`DropReason::QueueFull`].
    /// Consensus and evidence are bounded by count only ([`QUEUE`] messages), never by bytes.
    pub queue_bytes: u64,
    /// Score persistence.
    pub store: Option<Box<dyn PeerStore>>,
}

/// What the network hands to the node.
#[derive(Debug)]
pub enum Event {
    /// A broadcast message (already unframed, not decoded).
    Gossip {
        /// Who relayed it.
        peer: PeerId,
        /// Who wrote it (the signed gossipsub source): the one to score for its content,
        /// since relays forward a message before this node has checked it.
        author: Option<PeerId>,
        /// Its channel.
        channel: Channel,
        /// The payload.
        data: Vec<u8>,
    },
    /// A message sent to this node alone.
    Direct {
        /// The sender.
        peer: PeerId,
        /// The payload.
        data: Vec<u8>,
    },
    /// A request; answer with [`NetworkHandle::respond`].
    Request {
        /// The requester.
        peer: PeerId,
        /// The id to answer with.
        id: u64,
        /// The payload.
        data: Vec<u8>,
    },
    /// A peer connected.
    Connected(PeerId),
    /// A peer's last connection closed.
    Disconnected(PeerId),
}

enum Command {
    Publish {
        channel: Channel,
        data: Vec<u8>,
    },
    Direct {
        peer: PeerId,
        data: Vec<u8>,
    },
    Request {
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Respond {
        id: u64,
        data: Vec<u8>,
    },
    Report {
        peer: PeerId,
        report: Report,
    },
    ValidatorPeers(Vec<PeerId>),
}

impl Command {
    /// Payload bytes the command holds.
    fn bytes(&self) -> u64 {
        match self {
            Command::Publish { data, .. }
            | Command::Direct { data, .. }
            | Command::Request { data, .. }
            | Command::Respond { data, .. } => data.len() as u64,
            Command::Report { .. } | Command::ValidatorPeers(_) => 0,
        }
    }
}

/// Payload bytes waiting in the command queues, for the memory budget.
#[derive(Debug, Default)]
struct QueuedBytes {
    high: AtomicU64,
    low: AtomicU64,
    /// The most the low queue may hold.
    low_limit: u64,
}

/// The node's side of the service. Cheap to clone.
#[derive(Clone)]
pub struct NetworkHandle {
    high: mpsc::Sender<Command>,
    low: mpsc::Sender<Command>,
    local: PeerId,
    peers: Arc<Mutex<HashSet<PeerId>>>,
    peer_count: Arc<AtomicUsize>,
    stats: Arc<ByteStats>,
    drops: Arc<DropStats>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
    queued: Arc<QueuedBytes>,
}

impl NetworkHandle {
    /// Payload bytes waiting in the outbound command queues now (both priorities).
    pub fn queued_bytes(&self) -> u64 {
        self.queued
            .high
            .load(Ordering::Relaxed)
            .saturating_add(self.queued.low.load(Ordering::Relaxed))
    }

    /// The most payload bytes the low-priority queue (transactions, sync) holds.
    pub fn queue_bytes_limit(&self) -> u64 {
        self.queued.low_limit
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Addresses the service listens on (known once the listener is up).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listen_addrs
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Connected peers.
    pub fn peers(&self) -> Vec<PeerId> {
        self.peers
            .lock()
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Number of connected peers.
    pub fn peer_count(&self) -> usize {
        self.peer_count.load(Ordering::Relaxed)
    }

    /// Bytes sent and received.
    pub fn byte_stats(&self) -> frame::ByteCounts {
        self.stats.counts()
    }

    /// Messages dropped so far, by channel and reason.
    pub fn drop_stats(&self) -> &DropStats {
        &self.drops
    }

    /// Counts `n` messages on `channel` that a layer above dropped before they reached this
    /// handle (such as the node's transaction batcher, [`DropReason::BatchFull`]).
    pub fn count_dropped(&self, channel: Channel, reason: DropReason, n: u64) {
        self.drops.add(channel, reason, n);
    }

    fn queue(&self, channel: Channel) -> &mpsc::Sender<Command> {
        match channel {
            Channel::Consensus | Channel::Evidence => &self.high,
            Channel::Transactions | Channel::Sync => &self.low,
        }
    }

    fn push(&self, channel: Channel, command: Command) -> Result<()> {
        let bytes = command.bytes();
        let (counter, limit) = match channel {
            Channel::Consensus | Channel::Evidence => (&self.queued.high, u64::MAX),
            Channel::Transactions | Channel::Sync => (&self.queued.low, self.queued.low_limit),
        };
        // Reserved before the check, so concurrent senders cannot overshoot together.
        let before = counter.fetch_add(bytes, Ordering::Relaxed);
        if bytes > 0 && before.saturating_add(bytes) > limit {
            counter.fetch_sub(bytes, Ordering::Relaxed);
            return Err(Error::Busy);
        }
        self.queue(channel).try_send(command).map_err(|e| {
            counter.fetch_sub(bytes, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => Error::Busy,
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            }
        })
    }

    /// [`NetworkHandle::push`] of a message: a full queue drops it, counted.
    fn push_message(&self, channel: Channel, command: Command) -> Result<()> {
        let result = self.push(channel, command);
        if let Err(Error::Busy) = result {
            self.drops.add(channel, DropReason::QueueFull, 1);
        }
        result
    }

    /// Broadcasts on `channel` (gossip).
    pub fn publish(&self, channel: Channel, data: Vec<u8>) -> Result<()> {
        crate::check_size(channel, data.len())?;
        self.push_message(channel, Command::Publish { channel, data })
    }

    /// Sends to one peer (consensus channel).
    pub fn send_direct(&self, peer: PeerId, data: Vec<u8>) -> Result<()> {
        crate::check_size(Channel::Consensus, data.len())?;
        self.push_message(Channel::Consensus, Command::Direct { peer, data })
    }

    /// Asks `peer` and waits for its answer (status and sync).
    pub async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>> {
        crate::check_size(Channel::Sync, data.len())?;
        let (reply, answer) = oneshot::channel();
        self.push_message(Channel::Sync, Command::Request { peer, data, reply })?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Answers the request `id` of an [`Event::Request`].
    pub fn respond(&self, id: u64, data: Vec<u8>) -> Result<()> {
        crate::check_size(Channel::Sync, data.len())?;
        self.push_message(Channel::Sync, Command::Respond { id, data })
    }

    /// Records a peer's behaviour.
    pub fn report(&self, peer: PeerId, report: Report) {
        let _ = self.push(Channel::Consensus, Command::Report { peer, report });
    }

    /// The current validators' peers get reserved connection slots.
    pub fn set_validator_peers(&self, peers: Vec<PeerId>) {
        let _ = self.push(Channel::Consensus, Command::ValidatorPeers(peers));
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Consensus and evidence.
    gossip: gossipsub::Behaviour,
    /// Transactions: a queue per peer of their own, so they never crowd out consensus.
    tx_gossip: gossipsub::Behaviour,
    direct: request_response::Behaviour<FrameCodec>,
    requests: request_response::Behaviour<FrameCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn other<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Error + '_ {
    move |e| Error::Setup(format!("{what}: {e}"))
}

/// The peer id a node key gives.
pub fn peer_id_of(secret: [u8; 32]) -> Result<PeerId> {
    let mut bytes = secret;
    let key = identity::Keypair::ed25519_from_bytes(&mut bytes).map_err(other("node key"))?;
    Ok(key.public().to_peer_id())
}

/// Starts the service on the current tokio runtime.
pub fn start(config: Config) -> Result<(NetworkHandle, mpsc::Receiver<Event>)> {
    start_service(config).map(|(handle, events, _task)| (handle, events))
}

/// Starts the service on the current tokio runtime; also returns its task, which ends (after
/// saving the peer book) once the event receiver is dropped.
pub fn start_service(
    config: Config,
) -> Result<(
    NetworkHandle,
    mpsc::Receiver<Event>,
    tokio::task::JoinHandle<()>,
)> {
    let mut secret = config.secret;
    let key = identity::Keypair::ed25519_from_bytes(&mut secret).map_err(other("node key"))?;
    let local = key.public().to_peer_id();
    let max = keel_types::MAX_MESSAGE_BYTES + 1024;

    let gossip_config = gossip_builder(max)
        .build()
        .map_err(other("gossipsub config"))?;
    let mut gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )
    .map_err(other("gossipsub"))?;
    // Room for the frame's flag byte and gossipsub's envelope (source, sequence number,
    // signature, key, topic) around the channel's largest payload.
    let tx_config = gossip_builder(Channel::Transactions.max_message_bytes() + 1024)
        .protocol_id_prefix(format!("/keel/{}/txgossip", config.chain_id))
        .connection_handler_queue_len(TX_PEER_QUEUE)
        .publish_queue_duration(TX_PUBLISH_DEADLINE)
        .forward_queue_duration(TX_FORWARD_DEADLINE)
        .build()
        .map_err(other("transaction gossipsub config"))?;
    let mut tx_gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        tx_config,
    )
    .map_err(other("transaction gossipsub"))?;
    let topics = Topics::new(&config.chain_id);
    gossip
        .subscribe(&topics.consensus)
        .map_err(other("subscribe"))?;
    tx_gossip
        .subscribe(&topics.transactions)
        .map_err(other("subscribe"))?;
    let rr_config = request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT);
    let direct_protocol =
        StreamProtocol::try_from_owned(format!("/keel/{}/direct/1", config.chain_id))
            .map_err(other("protocol name"))?;
    let request_protocol =
        StreamProtocol::try_from_owned(format!("/keel/{}/req/1", config.chain_id))
            .map_err(other("protocol name"))?;
    let behaviour = Behaviour {
        gossip,
        tx_gossip,
        direct: request_response::Behaviour::with_codec(
            FrameCodec { max },
            [(direct_protocol, ProtocolSupport::Full)],
            rr_config.clone(),
        ),
        requests: request_response::Behaviour::with_codec(
            FrameCodec { max },
            [(request_protocol, ProtocolSupport::Full)],
            rr_config,
        ),
        identify: identify::Behaviour::new(identify::Config::new(
            format!("/keel/{}/1", config.chain_id),
            key.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new()),
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(other("transport"))?
        .with_behaviour(|_| behaviour)
        .map_err(other("behaviour"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm
        .listen_on(config.listen.clone())
        .map_err(other("listen"))?;

    let mut persistent = Vec::new();
    for addr in &config.persistent_peers {
        match peer_of(addr) {
            Some(peer) => persistent.push((peer, addr.clone())),
            None => {
                return Err(Error::Setup(format!(
                    "persistent peer {addr} has no /p2p/<peer id>"
                )))
            }
        }
    }
    let mut manager = PeerManager::new(config.limits.clone(), persistent, config.seeds.clone());
    if let Some(store) = &config.store {
        manager.restore(store.load());
    }

    let (high_tx, high_rx) = mpsc::channel(QUEUE);
    let (low_tx, low_rx) = mpsc::channel(QUEUE);
    let (events_tx, events_rx) = mpsc::channel(QUEUE);
    let handle = NetworkHandle {
        high: high_tx,
        low: low_tx,
        local,
        peers: Arc::new(Mutex::new(HashSet::new())),
        peer_count: Arc::new(AtomicUsize::new(0)),
        stats: Arc::new(ByteStats::default()),
        drops: Arc::new(DropStats::default()),
        listen_addrs: Arc::new(Mutex::new(Vec::new())),
        queued: Arc::new(QueuedBytes {
            low_limit: config.queue_bytes,
            ..QueuedBytes::default()
        }),
    };
    let service = Service {
        swarm,
        topics,
        manager,
        store: config.store,
        threshold: config.compression_threshold_bytes,
        events: events_tx,
        handle: handle.clone(),
        inbound: HashMap::new(),
        next_inbound: 0,
        outbound: HashMap::new(),
        connected: HashSet::new(),
    };
    let task = tokio::spawn(service.run(high_rx, low_rx));
    info!(peer_id = %local, listen = %config.listen, "p2p service started");
    Ok((handle, events_rx, task))
}

/// What both gossipsub instances share: the mesh, flood publishing (a validator's message
/// reaches every peer at once), signed messages checked strictly, messages up to `max` bytes.
fn gossip_builder(max: usize) -> gossipsub::ConfigBuilder {
    let mut builder = gossipsub::ConfigBuilder::default();
    builder
        .heartbeat_interval(HEARTBEAT)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(max)
        .mesh_n(6)
        .mesh_n_low(2)
        .mesh_n_high(12)
        .mesh_outbound_min(1)
        .flood_publish(true);
    builder
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

struct Topics {
    consensus: gossipsub::IdentTopic,
    transactions: gossipsub::IdentTopic,
}

impl Topics {
    fn new(chain: &str) -> Topics {
        Topics {
            consensus: gossipsub::IdentTopic::new(format!("keel/{chain}/consensus/1")),
            // Version 2: the payload is a `TxBatch`, no longer one `SignedTx`.
            transactions: gossipsub::IdentTopic::new(format!("keel/{chain}/txs/2")),
        }
    }

    fn of(&self, channel: Channel) -> &gossipsub::IdentTopic {
        match channel {
            Channel::Consensus | Channel::Evidence | Channel::Sync => &self.consensus,
            Channel::Transactions => &self.transactions,
        }
    }

    fn channel(&self, hash: &gossipsub::TopicHash) -> Option<Channel> {
        if *hash == self.consensus.hash() {
            Some(Channel::Consensus)
        } else if *hash == self.transactions.hash() {
            Some(Channel::Transactions)
        } else {
            None
        }
    }
}

struct Service {
    swarm: libp2p::Swarm<Behaviour>,
    topics: Topics,
    manager: PeerManager,
    store: Option<Box<dyn PeerStore>>,
    threshold: usize,
    events: mpsc::Sender<Event>,
    handle: NetworkHandle,
    inbound: HashMap<u64, ResponseChannel<Vec<u8>>>,
    next_inbound: u64,
    outbound: HashMap<OutboundRequestId, oneshot::Sender<Result<Vec<u8>>>>,
    connected: HashSet<PeerId>,
}

impl Service {
    async fn run(mut self, mut high: mpsc::Receiver<Command>, mut low: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                biased;
                Some(c) = high.recv() => {
                    self.handle.queued.high.fetch_sub(c.bytes(), Ordering::Relaxed);
                    self.command(c);
                }
                event = self.swarm.select_next_some() => self.swarm_event(event),
                Some(c) = low.recv() => {
                    self.handle.queued.low.fetch_sub(c.bytes(), Ordering::Relaxed);
                    self.command(c);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.maintain(ticks % SAVE_EVERY_TICKS == 0);
                }
                else => break,
            }
            if self.events.is_closed() {
                break;
            }
        }
        self.save();
        debug!("p2p service stopped");
    }

    fn save(&self) {
        if let Some(store) = &self.store {
            store.save(&self.manager.records(now_ms()));
        }
    }

    fn maintain(&mut self, save: bool) {
        let now = now_ms();
        for addr in self.manager.due_dials(now, &self.connected) {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %e, "dial failed");
            }
        }
        if let Some(peer) = self.manager.surplus(&self.connected) {
            debug!(%peer, "over the peer target: disconnecting the lowest-scored peer");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        if save {
            self.save();
        }
    }

    fn frame(&self, data: &[u8]) -> Vec<u8> {
        let framed = frame::encode(data, self.threshold);
        self.handle.stats.record_sent(&framed, data.len());
        framed
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Publish { channel, data } => {
                let framed = frame::encode(&data, self.threshold);
                let (len, compressed) = (framed.len(), frame::is_compressed(&framed));
                let topic = self.topics.of(channel).clone();
                let behaviour = self.swarm.behaviour_mut();
                let gossip = match channel {
                    Channel::Transactions => &mut behaviour.tx_gossip,
                    _ => &mut behaviour.gossip,
                };
                match gossip.publish(topic, framed) {
                    Ok(_) => self.handle.stats.add_sent(len, compressed, data.len()),
                    // Alone, or a duplicate: nothing to send, nothing lost.
                    Err(
                        e @ (gossipsub::PublishError::NoPeersSubscribedToTopic
                        | gossipsub::PublishError::Duplicate),
                    ) => debug!(?channel, error = %e, "gossip not published"),
                    Err(e) => {
                        debug!(?channel, error = %e, "gossip publish failed");
                        self.handle.drops.add(channel, DropReason::PublishFailed, 1);
                    }
                }
            }
            Command::Direct { peer, data } => {
                let framed = self.frame(&data);
                self.swarm
                    .behaviour_mut()
                    .direct
                    .send_request(&peer, framed);
            }
            Command::Request { peer, data, reply } => {
                let framed = self.frame(&data);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .requests
                    .send_request(&peer, framed);
                self.outbound.insert(id, reply);
            }
            Command::Respond { id, data } => {
                if let Some(channel) = self.inbound.remove(&id) {
                    let framed = self.frame(&data);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .requests
                        .send_response(channel, framed);
                }
            }
            Command::Report { peer, report } => {
                if self.manager.report(&peer, report, now_ms()) == Verdict::Ban {
                    warn!(%peer, score = self.manager.score(&peer), "banning peer");
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            Command::ValidatorPeers(peers) => self.manager.set_validator_peers(peers),
        }
    }

    /// Unframes a payload from `peer`; a bad frame costs the peer score.
    fn unframe(&mut self, peer: PeerId, data: &[u8], channel: Channel) -> Option<Vec<u8>> {
        self.handle.stats.record_received(data);
        match frame::decode(data, channel.max_message_bytes()) {
            Ok(payload) => Some(payload),
            Err(e) => {
                debug!(%peer, error = %e, "bad frame");
                let report = match e {
                    frame::FrameError::TooLarge { .. } => Report::Malicious,
                    _ => Report::Invalid,
                };
                self.command(Command::Report { peer, report });
                None
            }
        }
    }

    fn emit(&mut self, event: Event) {
        if let Err(e) = self.events.try_send(event) {
            debug!(error = %e, "node is not keeping up: dropping a network event");
        }
    }

    fn set_peer_count(&self) {
        self.handle
            .peer_count
            .store(self.connected.len(), Ordering::Relaxed);
        if let Ok(mut p) = self.handle.peers.lock() {
            *p = self.connected.clone();
        }
    }

    /// An event of the gossipsub instance that carries `instance` (consensus or transactions).
    fn gossip_event(&mut self, instance: Channel, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            } => {
                // Each instance carries its own topic only; anything else is ignored.
                let Some(channel) = self
                    .topics
                    .channel(&message.topic)
                    .filter(|c| *c == instance)
                else {
                    return;
                };
                if let Some(data) = self.unframe(propagation_source, &message.data, channel) {
                    self.emit(Event::Gossip {
                        peer: propagation_source,
                        author: message.source,
                        channel,
                        data,
                    });
                }
            }
            // Reported at each heartbeat: copies for this peer that did not fit its send
            // queue or expired there (gossipsub logs each at warn; the node's default log
            // filter keeps gossipsub at error, so this count is where they show).
            gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            } => {
                debug!(peer = %peer_id, ?instance, ?failed_messages, "gossip dropped for a slow peer");
                self.handle.drops.add(
                    instance,
                    DropReason::PeerQueueFull,
                    failed_messages.non_priority as u64,
                );
            }
            _ => {}
        }
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "p2p listening");
                if let Ok(mut a) = self.handle.listen_addrs.lock() {
                    a.push(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if num_established.get() > 1 {
                    return;
                }
                let inbound = endpoint.is_listener();
                if !self
                    .manager
                    .admit(&peer_id, inbound, self.connected.len(), now_ms())
                {
                    debug!(peer = %peer_id, inbound, "connection refused (banned or over the limits)");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                self.manager.connected(&peer_id);
                self.connected.insert(peer_id);
                self.set_peer_count();
                debug!(peer = %peer_id, inbound, "peer connected");
                self.emit(Event::Connected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.manager.disconnected(&peer_id, now_ms());
                if self.connected.remove(&peer_id) {
                    self.set_peer_count();
                    self.emit(Event::Disconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                debug!(%peer, %error, "dial failed");
                self.manager.disconnected(&peer, now_ms());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(event)) => {
                self.gossip_event(Channel::Consensus, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::TxGossip(event)) => {
                self.gossip_event(Channel::Transactions, event)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Direct(
                request_response::Event::OutboundFailure { peer, error, .. },
            )) => {
                debug!(%peer, %error, "direct message failed");
                self.handle
                    .drops
                    .add(Channel::Consensus, DropReason::SendFailed, 1);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Direct(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .direct
                    .send_response(channel, Vec::new());
                if let Some(data) = self.unframe(peer, &request, Channel::Consensus) {
                    self.emit(Event::Direct { peer, data });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Requests(request_response::Event::Message {
                peer,
                message,
                ..
            })) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if self.inbound.len() >= MAX_PENDING_REQUESTS {
                        debug!(%peer, "too many pending requests: dropping one");
                        return;
                    }
                    let Some(data) = self.unframe(peer, &request, Channel::Sync) else {
                        return;
                    };
                    let id = self.next_inbound;
                    self.next_inbound = self.next_inbound.wrapping_add(1);
                    self.inbound.insert(id, channel);
                    self.emit(Event::Request { peer, id, data });
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let result = self
                        .unframe(peer, &response, Channel::Sync)
                        .ok_or(Error::BadResponse);
                    if let Some(reply) = self.outbound.remove(&request_id) {
                        let _ = reply.send(result);
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Requests(
                request_response::Event::OutboundFailure {
                    request_id, error, ..
                },
            )) => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(Error::Request(error.to_string())));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => {
                // Latency counts in the score: a peer that answers pings slowly, or not at
                // all, sinks below responsive ones and goes first when over the target.
                let slow = match result {
                    Ok(rtt) => rtt.as_millis() as u64 > crate::peers::SLOW_PING_MS,
                    Err(_) => true,
                };
                if slow {
                    self.command(Command::Report {
                        peer,
                        report: Report::Slow,
                    });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Requests(
                request_response::Event::InboundFailure { peer, error, .. },
            )) => {
                debug!(%peer, %error, "inbound request failed");
                // Stale channels of failed requests are dropped lazily.
                self.inbound.retain(|_, c| c.is_open());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeSet;
    use std::time::Instant;

    use super::*;

    fn config(seed: u8, persistent: Vec<Multiaddr>) -> Config {
        Config {
            chain_id: "p2p-test".into(),
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

    #[test]
    fn the_low_queue_holds_at_most_its_bytes_and_consensus_is_never_refused_for_bytes() {
        let (high, mut high_rx) = mpsc::channel(QUEUE);
        let (low, mut low_rx) = mpsc::channel(QUEUE);
        let handle = NetworkHandle {
            high,
            low,
            local: PeerId::random(),
            peers: Arc::default(),
            peer_count: Arc::default(),
            stats: Arc::default(),
            drops: Arc::default(),
            listen_addrs: Arc::default(),
            queued: Arc::new(QueuedBytes {
                low_limit: 100,
                ..QueuedBytes::default()
            }),
        };
        handle.publish(Channel::Transactions, vec![1; 60]).unwrap();
        assert!(matches!(
            handle.publish(Channel::Transactions, vec![2; 60]),
            Err(Error::Busy)
        ));
        assert_eq!(
            handle
                .drop_stats()
                .get(Channel::Transactions, DropReason::QueueFull),
            1
        );
        handle.publish(Channel::Consensus, vec![3; 1_000]).unwrap();
        assert_eq!(handle.queued_bytes(), 1_060);
        // What the service takes off the queues no longer counts (as `Service::run` does).
        let c = low_rx.try_recv().unwrap();
        handle.queued.low.fetch_sub(c.bytes(), Ordering::Relaxed);
        let c = high_rx.try_recv().unwrap();
        handle.queued.high.fetch_sub(c.bytes(), Ordering::Relaxed);
        assert_eq!(handle.queued_bytes(), 0);
        handle.publish(Channel::Transactions, vec![2; 60]).unwrap();
    }

    fn listen_addr(h: &NetworkHandle) -> Multiaddr {
        for _ in 0..250 {
            if let Some(a) = h.listen_addrs().first() {
                return format!("{a}/p2p/{}", h.local_peer_id()).parse().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no listen address");
    }

    /// Bytes zstd cannot shrink (xorshift), so big messages stay big on the wire.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Publishes, waiting while the node's queue to the p2p task is full.
    async fn publish(h: &NetworkHandle, channel: Channel, data: Vec<u8>) {
        loop {
            match h.publish(channel, data.clone()) {
                Err(Error::Busy) => tokio::time::sleep(Duration::from_millis(1)).await,
                other => return other.unwrap(),
            }
        }
    }

    /// Publishes on `channel` until `events` shows one arrived (the peer's subscription is
    /// known), then drains what is left.
    async fn until_gossip_flows(
        h: &NetworkHandle,
        events: &mut mpsc::Receiver<Event>,
        channel: Channel,
    ) {
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let _ = h.publish(channel, b"hello".to_vec());
                tokio::time::sleep(Duration::from_millis(200)).await;
                while let Ok(e) = events.try_recv() {
                    if matches!(e, Event::Gossip { channel: c, .. } if c == channel) {
                        return;
                    }
                }
            }
        })
        .await
        .expect("gossip flows");
    }

    /// A peer stops reading (its runtime's only thread is blocked) while this node publishes
    /// far more transaction gossip than a peer's send queue holds, then a few consensus
    /// messages. Gossipsub queues per peer and per instance with no priorities between topics:
    /// with both channels on one instance the consensus messages found the queue full of
    /// transactions and were dropped. On their own instance they wait in a queue of their own
    /// and all arrive once the peer reads again; the transaction copies that did not fit are
    /// counted as drops.
    #[test]
    fn transaction_gossip_filling_a_slow_peers_queue_drops_no_consensus_message() {
        const FREEZE: Duration = Duration::from_secs(4);
        const CONSENSUS: usize = 20;
        let a_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // One worker thread: blocking it stops everything of B, its connections included.
        let b_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (b, mut b_events) = {
            let _enter = b_runtime.enter();
            start(config(2, vec![])).unwrap()
        };
        let b_addr = listen_addr(&b);
        let (a, mut a_events) = {
            let _enter = a_runtime.enter();
            start(config(1, vec![b_addr])).unwrap()
        };

        a_runtime.block_on(async {
            until_gossip_flows(&a, &mut b_events, Channel::Consensus).await;
            until_gossip_flows(&a, &mut b_events, Channel::Transactions).await;
            // B's events are read from here on, as they come (its event queue never fills).
            let (seen_tx, mut seen) = mpsc::unbounded_channel();
            let reader = tokio::spawn(async move {
                while let Some(e) = b_events.recv().await {
                    if let Event::Gossip {
                        channel: Channel::Consensus,
                        data,
                        ..
                    } = e
                    {
                        let _ = seen_tx.send(data);
                    }
                }
            });
            tokio::spawn(async move { while a_events.recv().await.is_some() {} });

            b_runtime.spawn(async { std::thread::sleep(FREEZE) });
            tokio::time::sleep(Duration::from_millis(100)).await;
            let frozen_at = Instant::now();
            // Big batches fill the socket buffers and the stream's window, then more
            // messages than gossipsub's default per-peer queue (5,000) holds.
            for n in 0..64 {
                publish(&a, Channel::Transactions, noise(n, 60_000)).await;
            }
            for n in 0..6_000 {
                publish(&a, Channel::Transactions, noise(1_000 + n, 200)).await;
            }
            let wanted: BTreeSet<Vec<u8>> = (0..CONSENSUS)
                .map(|i| format!("proposal {i}").into_bytes())
                .collect();
            for m in &wanted {
                publish(&a, Channel::Consensus, m.clone()).await;
            }
            assert!(
                frozen_at.elapsed() < FREEZE,
                "publishing took longer than the freeze: the test proves nothing"
            );

            let mut got = BTreeSet::new();
            tokio::time::timeout(FREEZE + Duration::from_secs(15), async {
                while got.len() < wanted.len() {
                    got.insert(seen.recv().await.unwrap());
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {CONSENSUS} consensus messages arrived; drops: {:?}",
                    got.len(),
                    a.drop_stats().series()
                )
            });
            assert_eq!(got, wanted);

            // Gossipsub reports the transaction copies it dropped at its next heartbeat.
            tokio::time::timeout(Duration::from_secs(5), async {
                while a
                    .drop_stats()
                    .get(Channel::Transactions, DropReason::PeerQueueFull)
                    == 0
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
            .expect("dropped transaction gossip is counted");
            for reason in [DropReason::PeerQueueFull, DropReason::PublishFailed] {
                assert_eq!(a.drop_stats().get(Channel::Consensus, reason), 0);
            }
            reader.abort();
        });
        drop(a);
        drop(b);
        a_runtime.shutdown_background();
        b_runtime.shutdown_background();
    }
}
