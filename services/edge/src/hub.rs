//! The device hub: one per online device. It owns the device's one upstream
//! MQTT connection (already past CONNECT/CONNACK: whoever dialled it holds
//! the printer's credentials) and multiplexes every client session over it.
//!
//! - Client subscriptions become reference-counted upstream subscriptions:
//!   the printer sees one SUBSCRIBE per distinct filter and one UNSUBSCRIBE
//!   when the last client leaves it. Upstream subscriptions are made at QoS 1
//!   at most; a client is granted `min(requested, upstream grant)`.
//! - A message from the printer is read once and fanned out: QoS 0
//!   deliveries share one encoded buffer whatever the number of clients.
//! - Packet ids are remapped: a client's QoS 1 PUBLISH is acknowledged to it
//!   only after the printer acknowledged it.
//! - Each session's outbound bytes are bounded; a client that stops reading
//!   is cut off as a slow consumer instead of growing the edge's memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use relay_proto::mqtt::{
    self, Packet, PacketId, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe,
};
use relay_proto::subscription_index::SubscriptionIndex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::close::Close;

pub type SessionId = u64;

/// What a session receives from its hub, in order.
#[derive(Debug)]
pub enum Outbound {
    /// Encoded MQTT bytes for the client.
    Bytes(Bytes),
    /// End the session with this close.
    Close(Close),
}

/// A session's outbound queue: a deque under a lock and a wake-up for the
/// writer. Lighter than a channel (which allocates a 32-slot block and a
/// padded header, about 1.8 KiB, per session up front): an idle session
/// holds a few hundred bytes here.
#[derive(Debug, Default)]
struct OutboundQueue {
    items: std::sync::Mutex<VecDeque<Outbound>>,
    /// Wakes the writer (a stored permit if it is not waiting yet).
    ready: Notify,
    /// Bytes queued, charged before queueing.
    queued: AtomicUsize,
    /// Live senders; the writer sees the end once none is left.
    senders: AtomicUsize,
    /// The writer is gone: sending fails.
    closed: AtomicBool,
}

impl OutboundQueue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        // No code panics while holding the lock; a poisoned lock still
        // holds a consistent deque.
        self.items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, item: Outbound) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        self.items().push_back(item);
        self.ready.notify_one();
        true
    }
}

/// The sending half of a session's outbound queue, with its byte budget.
/// The queue itself has no count limit, but every byte in it is charged to
/// `queued` first and nothing is queued past `limit`: a session's memory is
/// bounded by bytes, which is what matters.
#[derive(Debug)]
pub struct OutboundSender {
    queue: Arc<OutboundQueue>,
    limit: usize,
    /// Cancelled when the session must end (slow consumer, hub gone).
    ended: CancellationToken,
}

impl Clone for OutboundSender {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::SeqCst);
        OutboundSender {
            queue: self.queue.clone(),
            limit: self.limit,
            ended: self.ended.clone(),
        }
    }
}

impl Drop for OutboundSender {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.queue.ready.notify_one();
        }
    }
}

/// The receiving half, owned by the session's writer.
#[derive(Debug)]
pub struct OutboundReceiver {
    queue: Arc<OutboundQueue>,
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::SeqCst);
        self.queue.items().clear();
    }
}

/// A bounded outbound queue for one session.
pub fn outbound_queue(limit: usize) -> (OutboundSender, OutboundReceiver, CancellationToken) {
    let queue = Arc::new(OutboundQueue {
        senders: AtomicUsize::new(1),
        ..OutboundQueue::default()
    });
    let ended = CancellationToken::new();
    (
        OutboundSender {
            queue: queue.clone(),
            limit,
            ended: ended.clone(),
        },
        OutboundReceiver { queue },
        ended,
    )
}

impl OutboundSender {
    /// Queues bytes for the client. Returns false, and ends the session as a
    /// slow consumer, when they do not fit the budget.
    pub fn send_bytes(&self, bytes: Bytes) -> bool {
        let len = bytes.len();
        let queued = &self.queue.queued;
        let before = queued.fetch_add(len, Ordering::SeqCst);
        if before + len > self.limit {
            queued.fetch_sub(len, Ordering::SeqCst);
            self.end(Close::limit("slow consumer"));
            return false;
        }
        if !self.queue.push(Outbound::Bytes(bytes)) {
            queued.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Encodes and queues a packet.
    pub fn send_packet(&self, packet: &Packet) -> bool {
        let mut bytes = BytesMut::new();
        match mqtt::encode(packet, &mut bytes) {
            Ok(()) => self.send_bytes(bytes.freeze()),
            Err(error) => {
                tracing::error!(%error, "cannot encode a packet for a client");
                false
            }
        }
    }

    /// Ends the session: the close goes after what is queued, and the
    /// session's reader stops at once.
    pub fn end(&self, close: Close) {
        let _ = self.queue.push(Outbound::Close(close));
        self.ended.cancel();
    }
}

impl OutboundReceiver {
    /// The next item; `None` once every sender is gone and the queue is
    /// empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            let notified = self.queue.ready.notified();
            if let Some(item) = self.queue.items().pop_front() {
                if let Outbound::Bytes(bytes) = &item {
                    self.queue.queued.fetch_sub(bytes.len(), Ordering::SeqCst);
                }
                return Some(item);
            }
            if self.queue.senders.load(Ordering::SeqCst) == 0 {
                return None;
            }
            // A push between the check and here left a permit: no wake-up
            // is lost (one receiver, `notify_one`).
            notified.await;
        }
    }
}

/// Requests from sessions to their hub.
#[derive(Debug)]
enum Command {
    Attach {
        session: SessionId,
        outbound: OutboundSender,
    },
    Subscribe {
        session: SessionId,
        subscribe: Subscribe,
    },
    Unsubscribe {
        session: SessionId,
        unsubscribe: Unsubscribe,
    },
    Publish {
        session: SessionId,
        publish: Publish,
    },
    Detach {
        session: SessionId,
    },
}

/// A session's handle on its device's hub.
#[derive(Debug, Clone)]
pub struct HubHandle {
    commands: mpsc::Sender<Command>,
    /// Cancelled when the hub ends (upstream lost).
    ended: CancellationToken,
}

/// Commands queued per hub before senders wait: sessions are throttled by a
/// busy hub rather than queueing without bound.
const COMMAND_QUEUE: usize = 1024;

impl HubHandle {
    pub async fn attach(&self, session: SessionId, outbound: OutboundSender) -> bool {
        self.commands
            .send(Command::Attach { session, outbound })
            .await
            .is_ok()
    }

    pub async fn subscribe(&self, session: SessionId, subscribe: Subscribe) -> bool {
        self.commands
            .send(Command::Subscribe { session, subscribe })
            .await
            .is_ok()
    }

    pub async fn unsubscribe(&self, session: SessionId, unsubscribe: Unsubscribe) -> bool {
        self.commands
            .send(Command::Unsubscribe {
                session,
                unsubscribe,
            })
            .await
            .is_ok()
    }

    pub async fn publish(&self, session: SessionId, publish: Publish) -> bool {
        self.commands
            .send(Command::Publish { session, publish })
            .await
            .is_ok()
    }

    pub async fn detach(&self, session: SessionId) {
        let _ = self.commands.send(Command::Detach { session }).await;
    }

    /// Resolves when the hub has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }
}

/// The online devices of this edge and their hubs.
#[derive(Debug, Default)]
pub struct Hubs {
    by_device: DashMap<String, HubHandle>,
    next_session: AtomicUsize,
    /// Bytes between hubs and printers (through tunnels), by direction.
    upstream_bytes: Option<prometheus::IntCounterVec>,
}

/// Hub settings.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Largest packet accepted from the printer.
    pub max_upstream_packet: usize,
    /// Keep-alive towards the printer (the upstream connection's CONNECT).
    pub upstream_keep_alive: Duration,
    /// End the hub (and so the printer connection) once it has had no
    /// session for this long; `None` keeps it while the upstream lives.
    pub linger: Option<Duration>,
}

/// Tells whether the way to the device (the agent's tunnel) still stands,
/// so that a lost upstream can be told apart: tunnel gone (1013, device
/// offline) or printer gone (1014).
pub type TunnelProbe = Arc<dyn Fn() -> bool + Send + Sync>;

impl Hubs {
    /// Hubs that count the bytes they exchange with printers.
    pub fn with_byte_counter(upstream_bytes: prometheus::IntCounterVec) -> Hubs {
        Hubs {
            upstream_bytes: Some(upstream_bytes),
            ..Hubs::default()
        }
    }

    /// The hub of a device, if it is online.
    pub fn get(&self, device_id: &str) -> Option<HubHandle> {
        self.by_device.get(device_id).map(|hub| hub.clone())
    }

    pub fn online_devices(&self) -> usize {
        self.by_device.len()
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed) as SessionId
    }

    /// Starts the hub of `device_id` over an upstream connection that is
    /// already past CONNECT/CONNACK. A hub that was there is replaced (its
    /// sessions end). Returns the hub's task, which ends when the upstream
    /// connection does.
    pub fn start<U>(
        self: &Arc<Self>,
        device_id: String,
        upstream: U,
        limits: HubLimits,
        tunnel_alive: Option<TunnelProbe>,
    ) -> HubHandle
    where
        U: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let ended = CancellationToken::new();
        let handle = HubHandle {
            commands,
            ended: ended.clone(),
        };
        if let Some(previous) = self.by_device.insert(device_id.clone(), handle.clone()) {
            previous.ended.cancel();
        }
        let hubs = self.clone();
        let hub_ended = ended.clone();
        tokio::spawn(async move {
            let mut hub = Hub::new(limits, tunnel_alive);
            hub.byte_counter = hubs.upstream_bytes.clone();
            let outcome = hub.run(upstream, receiver, hub_ended.clone()).await;
            tracing::info!(device = %device_id, ?outcome, "device hub ended");
            hub_ended.cancel();
            hubs.by_device
                .remove_if(&device_id, |_, current| current.ended.is_cancelled());
        });
        handle
    }

    /// Ends the hub of `device_id`, if any (its tunnel is gone).
    pub fn end(&self, device_id: &str) {
        if let Some((_, hub)) = self.by_device.remove(device_id) {
            hub.ended.cancel();
        }
    }
}

/// A filter the printer is subscribed to on the clients' behalf.
#[derive(Debug)]
struct UpstreamFilter {
    /// Sessions holding it.
    holders: usize,
    /// What the printer granted; `None` while its SUBACK is awaited.
    granted: Option<SubscribeReturnCode>,
}

#[derive(Debug)]
struct SessionEntry {
    outbound: OutboundSender,
    /// Filters and the QoS this session asked for.
    filters: HashMap<String, QoS>,
    next_packet_id: u16,
}

impl SessionEntry {
    fn allocate_packet_id(&mut self) -> PacketId {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        PacketId::new(self.next_packet_id).unwrap_or(PacketId::MIN)
    }
}

/// What an upstream packet id is waiting for.
#[derive(Debug)]
enum Pending {
    /// A SUBSCRIBE for these new filters; clients' SUBSCRIBEs wait on it.
    Subscribe {
        filters: Vec<String>,
    },
    Unsubscribe,
    /// A client's QoS 1 (or 2) PUBLISH: acknowledge the client's id when the
    /// printer does (PUBACK, or PUBREC for QoS 2).
    Publish {
        session: SessionId,
        client_packet_id: PacketId,
        exactly_once: bool,
    },
}

/// A client SUBSCRIBE waiting for upstream grants.
#[derive(Debug)]
struct WaitingSubscribe {
    session: SessionId,
    packet_id: PacketId,
    filters: Vec<(String, QoS)>,
    /// Filters whose retained messages the hub delivers after the SUBACK
    /// (the printer will not resend them).
    retained_for: Vec<String>,
}

#[derive(Debug)]
pub enum HubEnd {
    UpstreamClosed,
    UpstreamError(String),
    ProtocolError(String),
    /// Replaced by a newer hub, or its tunnel ended.
    Ended,
    /// No session for the linger time.
    Idle,
}

struct Hub {
    limits: HubLimits,
    byte_counter: Option<prometheus::IntCounterVec>,
    tunnel_alive: Option<TunnelProbe>,
    sessions: HashMap<SessionId, SessionEntry>,
    index: SubscriptionIndex<SessionId>,
    upstream_filters: HashMap<String, UpstreamFilter>,
    pending: HashMap<PacketId, Pending>,
    waiting_subscribes: Vec<WaitingSubscribe>,
    next_upstream_id: u16,
    /// When the last session left (or the hub started).
    idle_since: tokio::time::Instant,
    /// The printer's retained messages by topic, encoded with RETAIN set,
    /// for clients that subscribe after the printer sent them.
    retained: HashMap<String, Bytes>,
    retained_bytes: usize,
    /// Bytes for the printer, written by the run loop.
    to_upstream: BytesMut,
}

impl Hub {
    fn new(limits: HubLimits, tunnel_alive: Option<TunnelProbe>) -> Hub {
        Hub {
            limits,
            byte_counter: None,
            tunnel_alive,
            sessions: HashMap::new(),
            index: SubscriptionIndex::new(),
            upstream_filters: HashMap::new(),
            pending: HashMap::new(),
            waiting_subscribes: Vec::new(),
            next_upstream_id: 0,
            idle_since: tokio::time::Instant::now(),
            retained: HashMap::new(),
            retained_bytes: 0,
            to_upstream: BytesMut::new(),
        }
    }

    async fn run<U>(
        mut self,
        upstream: U,
        mut commands: mpsc::Receiver<Command>,
        ended: CancellationToken,
    ) -> HubEnd
    where
        U: AsyncRead + AsyncWrite,
    {
        let (mut reader, mut writer) = tokio::io::split(upstream);
        let mut read_buffer = BytesMut::with_capacity(4096);
        let mut ping = tokio::time::interval(self.limits.upstream_keep_alive);
        ping.reset();
        let linger = self.limits.linger;
        let end = loop {
            let idle_deadline = match linger {
                Some(linger) if self.sessions.is_empty() => Some(self.idle_since + linger),
                _ => None,
            };
            if !self.to_upstream.is_empty() {
                let bytes = self.to_upstream.split().freeze();
                if let Some(counter) = &self.byte_counter {
                    counter
                        .with_label_values(&["out"])
                        .inc_by(bytes.len() as u64);
                }
                if let Err(error) = writer.write_all(&bytes).await {
                    break HubEnd::UpstreamError(error.to_string());
                }
            }
            tokio::select! {
                read = reader.read_buf(&mut read_buffer) => match read {
                    Ok(0) => break HubEnd::UpstreamClosed,
                    Ok(read) => {
                        if let Some(counter) = &self.byte_counter {
                            counter.with_label_values(&["in"]).inc_by(read as u64);
                        }
                        if let Err(problem) = self.on_upstream_bytes(&mut read_buffer) {
                            break HubEnd::ProtocolError(problem);
                        }
                    }
                    Err(error) => break HubEnd::UpstreamError(error.to_string()),
                },
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break HubEnd::UpstreamClosed,
                },
                _ = ping.tick() => self.queue_upstream(&Packet::PingReq),
                _ = ended.cancelled() => break HubEnd::Ended,
                _ = async {
                    match idle_deadline {
                        Some(deadline) => tokio::time::sleep_until(deadline).await,
                        None => std::future::pending().await,
                    }
                } => break HubEnd::Idle,
            }
        };
        let tunnel_gone = self.tunnel_alive.as_ref().is_some_and(|alive| !alive());
        let close = match &end {
            HubEnd::Ended | HubEnd::Idle => Close::device_offline(),
            _ if tunnel_gone => Close::device_offline(),
            _ => Close::printer_unreachable("connection lost"),
        };
        for session in self.sessions.values() {
            session.outbound.end(close.clone());
        }
        let _ = writer.shutdown().await;
        end
    }

    fn queue_upstream(&mut self, packet: &Packet) {
        if let Err(error) = mqtt::encode(packet, &mut self.to_upstream) {
            tracing::error!(%error, "cannot encode a packet for the printer");
        }
    }

    fn allocate_upstream_id(&mut self) -> PacketId {
        loop {
            self.next_upstream_id = self.next_upstream_id.checked_add(1).unwrap_or(1);
            let id = PacketId::new(self.next_upstream_id).unwrap_or(PacketId::MIN);
            if !self.pending.contains_key(&id) {
                return id;
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Attach { session, outbound } => {
                self.sessions.insert(
                    session,
                    SessionEntry {
                        outbound,
                        filters: HashMap::new(),
                        next_packet_id: 0,
                    },
                );
            }
            Command::Subscribe { session, subscribe } => self.on_subscribe(session, subscribe),
            Command::Unsubscribe {
                session,
                unsubscribe,
            } => {
                for filter in &unsubscribe.filters {
                    self.drop_filter(session, filter);
                }
                if let Some(entry) = self.sessions.get(&session) {
                    entry
                        .outbound
                        .send_packet(&Packet::UnsubAck(unsubscribe.packet_id));
                }
            }
            Command::Publish { session, publish } => self.on_client_publish(session, publish),
            Command::Detach { session } => {
                if self.sessions.len() == 1 && self.sessions.contains_key(&session) {
                    self.idle_since = tokio::time::Instant::now();
                }
                if let Some(entry) = self.sessions.remove(&session) {
                    for filter in entry.filters.keys() {
                        self.index.remove(filter, &session);
                        self.release_upstream(filter);
                    }
                }
                self.waiting_subscribes
                    .retain(|waiting| waiting.session != session);
            }
        }
    }

    fn on_subscribe(&mut self, session: SessionId, subscribe: Subscribe) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let mut new_upstream = Vec::new();
        // Filters the printer already serves: it will not resend retained
        // messages for them, so the hub does.
        let mut already_upstream = Vec::new();
        for (filter, qos) in &subscribe.filters {
            if self
                .upstream_filters
                .get(filter)
                .is_some_and(|upstream| upstream.granted.is_some())
            {
                already_upstream.push(filter.clone());
            }
            if entry.filters.insert(filter.clone(), *qos).is_none() {
                self.index.insert(filter, session);
                let upstream =
                    self.upstream_filters
                        .entry(filter.clone())
                        .or_insert(UpstreamFilter {
                            holders: 0,
                            granted: None,
                        });
                upstream.holders += 1;
                if upstream.holders == 1 {
                    new_upstream.push(filter.clone());
                }
            }
        }
        if !new_upstream.is_empty() {
            let id = self.allocate_upstream_id();
            let packet = Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: new_upstream
                    .iter()
                    .map(|f| (f.clone(), QoS::AtLeastOnce))
                    .collect(),
            });
            self.queue_upstream(&packet);
            self.pending.insert(
                id,
                Pending::Subscribe {
                    filters: new_upstream,
                },
            );
        }
        self.waiting_subscribes.push(WaitingSubscribe {
            session,
            packet_id: subscribe.packet_id,
            filters: subscribe.filters,
            retained_for: already_upstream,
        });
        self.answer_ready_subscribes();
    }

    /// Keeps the printer's retained message for `publish.topic` (an empty
    /// payload clears it), within bounds: at most this many topics and bytes.
    fn remember_retained(&mut self, publish: &Publish) {
        const MAX_TOPICS: usize = 1_000;
        const MAX_BYTES: usize = 4 * 1024 * 1024;
        if let Some(old) = self.retained.remove(&publish.topic) {
            self.retained_bytes -= old.len();
        }
        if publish.payload.is_empty() {
            return;
        }
        let mut encoded = BytesMut::new();
        let packet = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: publish.topic.clone(),
            packet_id: None,
            payload: publish.payload.clone(),
        });
        if mqtt::encode(&packet, &mut encoded).is_err()
            || self.retained.len() >= MAX_TOPICS
            || self.retained_bytes + encoded.len() > MAX_BYTES
        {
            return;
        }
        self.retained_bytes += encoded.len();
        self.retained
            .insert(publish.topic.clone(), encoded.freeze());
    }

    /// Sends SUBACK to every waiting client whose filters all have an
    /// upstream grant by now.
    fn answer_ready_subscribes(&mut self) {
        let mut still_waiting = Vec::new();
        for waiting in std::mem::take(&mut self.waiting_subscribes) {
            let grants: Option<Vec<SubscribeReturnCode>> = waiting
                .filters
                .iter()
                .map(|(filter, requested)| {
                    let granted = self.upstream_filters.get(filter)?.granted?;
                    Some(match granted {
                        SubscribeReturnCode::Success(upstream) => {
                            SubscribeReturnCode::Success((*requested).min(upstream))
                        }
                        SubscribeReturnCode::Failure => SubscribeReturnCode::Failure,
                    })
                })
                .collect();
            let Some(grants) = grants else {
                still_waiting.push(waiting);
                continue;
            };
            // Refused filters are dropped again.
            for ((filter, _), grant) in waiting.filters.iter().zip(&grants) {
                if *grant == SubscribeReturnCode::Failure {
                    self.drop_filter(waiting.session, filter);
                }
            }
            if let Some(entry) = self.sessions.get(&waiting.session) {
                entry.outbound.send_packet(&Packet::SubAck(SubAck {
                    packet_id: waiting.packet_id,
                    return_codes: grants,
                }));
                for (topic, encoded) in &self.retained {
                    if waiting
                        .retained_for
                        .iter()
                        .any(|filter| relay_proto::topic::topic_matches(filter, topic))
                    {
                        entry.outbound.send_bytes(encoded.clone());
                    }
                }
            }
        }
        self.waiting_subscribes = still_waiting;
    }

    fn drop_filter(&mut self, session: SessionId, filter: &str) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        if entry.filters.remove(filter).is_some() {
            self.index.remove(filter, &session);
            self.release_upstream(filter);
        }
    }

    fn release_upstream(&mut self, filter: &str) {
        let Some(upstream) = self.upstream_filters.get_mut(filter) else {
            return;
        };
        upstream.holders = upstream.holders.saturating_sub(1);
        if upstream.holders > 0 {
            return;
        }
        let was_granted = matches!(upstream.granted, Some(SubscribeReturnCode::Success(_)));
        self.upstream_filters.remove(filter);
        if was_granted {
            let id = self.allocate_upstream_id();
            self.queue_upstream(&Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: vec![filter.to_owned()],
            }));
            self.pending.insert(id, Pending::Unsubscribe);
        }
    }

    fn on_client_publish(&mut self, session: SessionId, mut publish: Publish) {
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => {
                publish.dup = false;
                self.queue_upstream(&Packet::Publish(publish));
            }
            (qos, Some(client_packet_id)) => {
                // QoS 2 travels to the printer as QoS 1; the client's own
                // QoS 2 handshake completes at the edge.
                let id = self.allocate_upstream_id();
                publish.packet_id = Some(id);
                publish.qos = QoS::AtLeastOnce;
                publish.dup = false;
                self.queue_upstream(&Packet::Publish(publish));
                self.pending.insert(
                    id,
                    Pending::Publish {
                        session,
                        client_packet_id,
                        exactly_once: qos == QoS::ExactlyOnce,
                    },
                );
            }
            (_, None) => {}
        }
    }

    fn on_upstream_bytes(&mut self, buffer: &mut BytesMut) -> Result<(), String> {
        while let Some(packet) =
            mqtt::decode(buffer, self.limits.max_upstream_packet).map_err(|e| e.to_string())?
        {
            match packet {
                Packet::Publish(publish) => {
                    if publish.retain {
                        self.remember_retained(&publish);
                    }
                    self.fan_out(publish);
                }
                Packet::SubAck(suback) => self.on_suback(suback),
                Packet::UnsubAck(id) => {
                    self.pending.remove(&id);
                }
                Packet::PubAck(id) => {
                    if let Some(Pending::Publish {
                        session,
                        client_packet_id,
                        exactly_once,
                    }) = self.pending.remove(&id)
                        && let Some(entry) = self.sessions.get(&session)
                    {
                        entry.outbound.send_packet(&if exactly_once {
                            Packet::PubRec(client_packet_id)
                        } else {
                            Packet::PubAck(client_packet_id)
                        });
                    }
                }
                Packet::PingResp => {}
                other => {
                    return Err(format!(
                        "unexpected {} from the printer",
                        other.packet_type()
                    ));
                }
            }
        }
        Ok(())
    }

    fn on_suback(&mut self, suback: SubAck) {
        let Some(Pending::Subscribe { filters }) = self.pending.remove(&suback.packet_id) else {
            return;
        };
        for (index, filter) in filters.iter().enumerate() {
            let grant = suback
                .return_codes
                .get(index)
                .copied()
                .unwrap_or(SubscribeReturnCode::Failure);
            if let Some(upstream) = self.upstream_filters.get_mut(filter) {
                upstream.granted = Some(grant);
            }
        }
        self.answer_ready_subscribes();
    }

    /// Delivers a printer message to every session with a matching filter,
    /// once per session, at the lowest of the message's QoS and the session's
    /// best matching grant.
    fn fan_out(&mut self, publish: Publish) {
        if let Some(id) = publish.packet_id {
            self.queue_upstream(&Packet::PubAck(id));
        }
        let mut deliveries: HashMap<SessionId, QoS> = HashMap::new();
        let sessions = &self.sessions;
        self.index.for_each_match(&publish.topic, |session| {
            if publish.qos == QoS::AtMostOnce {
                // Every delivery is QoS 0: no need to find the session's best
                // matching grant (a topic match per filter per session).
                if sessions.contains_key(session) {
                    deliveries.insert(*session, QoS::AtMostOnce);
                }
            } else if let Some(entry) = sessions.get(session) {
                let best = entry
                    .filters
                    .iter()
                    .filter(|(filter, _)| relay_proto::topic::topic_matches(filter, &publish.topic))
                    .map(|(_, qos)| *qos)
                    .max()
                    .unwrap_or(QoS::AtMostOnce);
                deliveries.insert(*session, best.min(publish.qos).min(QoS::AtLeastOnce));
            }
        });
        let mut shared_at_most_once: Option<Bytes> = None;
        for (session, qos) in deliveries {
            let Some(entry) = self.sessions.get_mut(&session) else {
                continue;
            };
            if qos == QoS::AtMostOnce {
                let bytes = shared_at_most_once
                    .get_or_insert_with(|| {
                        let mut bytes = BytesMut::new();
                        let packet = Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtMostOnce,
                            retain: publish.retain,
                            topic: publish.topic.clone(),
                            packet_id: None,
                            payload: publish.payload.clone(),
                        });
                        let _ = mqtt::encode(&packet, &mut bytes);
                        bytes.freeze()
                    })
                    .clone();
                entry.outbound.send_bytes(bytes);
            } else {
                let packet_id = entry.allocate_packet_id();
                entry.outbound.send_packet(&Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: publish.retain,
                    topic: publish.topic.clone(),
                    packet_id: Some(packet_id),
                    payload: publish.payload.clone(),
                }));
            }
        }
    }
}
