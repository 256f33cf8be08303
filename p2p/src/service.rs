//! The libp2p service: TCP + noise + yamux, gossipsub for broadcast channels, a one-way
//! direct protocol for messages to one peer, a request/response protocol for status and
//! block sync, identify and ping; one tokio task owns the swarm.
//!
//! The node talks to it through a [`NetworkHandle`] (bounded command queues: consensus
//! traffic has its own queue, polled before everything else, so votes and proposals go out
//! ahead of transaction gossip and sync on a busy link) and receives [`Event`]s on a bounded
//! channel; when that channel is full, gossip is dropped (gossip is redundant) rather than
//! growing memory.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The node's side of the service. Cheap to clone.
#[derive(Clone)]
pub struct NetworkHandle {
    high: mpsc::Sender<Command>,
    low: mpsc::Sender<Command>,
    local: PeerId,
    peers: Arc<Mutex<HashSet<PeerId>>>,
    peer_count: Arc<AtomicUsize>,
    stats: Arc<ByteStats>,
    listen_addrs: Arc<Mutex<Vec<Multiaddr>>>,
}

impl NetworkHandle {
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

    fn queue(&self, channel: Channel) -> &mpsc::Sender<Command> {
        match channel {
            Channel::Consensus | Channel::Evidence => &self.high,
            Channel::Transactions | Channel::Sync => &self.low,
        }
    }

    fn push(&self, channel: Channel, command: Command) -> Result<()> {
        self.queue(channel).try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Busy,
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })
    }

    /// Broadcasts on `channel` (gossip).
    pub fn publish(&self, channel: Channel, data: Vec<u8>) -> Result<()> {
        crate::check_size(channel, data.len())?;
        self.push(channel, Command::Publish { channel, data })
    }

    /// Sends to one peer (consensus channel).
    pub fn send_direct(&self, peer: PeerId, data: Vec<u8>) -> Result<()> {
        crate::check_size(Channel::Consensus, data.len())?;
        self.push(Channel::Consensus, Command::Direct { peer, data })
    }

    /// Asks `peer` and waits for its answer (status and sync).
    pub async fn request(&self, peer: PeerId, data: Vec<u8>) -> Result<Vec<u8>> {
        crate::check_size(Channel::Sync, data.len())?;
        let (reply, answer) = oneshot::channel();
        self.push(Channel::Sync, Command::Request { peer, data, reply })?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Answers the request `id` of an [`Event::Request`].
    pub fn respond(&self, id: u64, data: Vec<u8>) -> Result<()> {
        crate::check_size(Channel::Sync, data.len())?;
        self.push(Channel::Sync, Command::Respond { id, data })
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
    gossip: gossipsub::Behaviour,
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

    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(700))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(max)
        .mesh_n(6)
        .mesh_n_low(2)
        .mesh_n_high(12)
        .mesh_outbound_min(1)
        .flood_publish(true)
        .build()
        .map_err(other("gossipsub config"))?;
    let mut gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )
    .map_err(other("gossipsub"))?;
    let topics = Topics::new(&config.chain_id);
    for t in [&topics.consensus, &topics.transactions] {
        gossip.subscribe(t).map_err(other("subscribe"))?;
    }
    let rr_config = request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT);
    let direct_protocol =
        StreamProtocol::try_from_owned(format!("/keel/{}/direct/1", config.chain_id))
            .map_err(other("protocol name"))?;
    let request_protocol =
        StreamProtocol::try_from_owned(format!("/keel/{}/req/1", config.chain_id))
            .map_err(other("protocol name"))?;
    let behaviour = Behaviour {
        gossip,
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
        listen_addrs: Arc::new(Mutex::new(Vec::new())),
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
            transactions: gossipsub::IdentTopic::new(format!("keel/{chain}/txs/1")),
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
                Some(c) = high.recv() => self.command(c),
                event = self.swarm.select_next_some() => self.swarm_event(event),
                Some(c) = low.recv() => self.command(c),
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
                match self.swarm.behaviour_mut().gossip.publish(topic, framed) {
                    Ok(_) => self.handle.stats.add_sent(len, compressed, data.len()),
                    // Alone, or a duplicate: nothing sent.
                    Err(e) => debug!(?channel, error = %e, "gossip not published"),
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
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                let Some(channel) = self.topics.channel(&message.topic) else {
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
