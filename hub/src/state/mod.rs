//! The device hub's rules as a state machine, without IO.
//!
//! [`HubState`] takes what happens (a session attaches, a client packet
//! arrives, the upstream sends a packet, time passes) through `handle_*` and
//! `attach`/`detach` calls, with the time passed in. It answers with bytes
//! for the upstream ([`HubState::upstream_pending`]), deliveries pushed into
//! each session's [`SessionSink`], session ends, the next time it wants to be
//! woken ([`HubState::poll_timeout`]) and its own end
//! ([`HubState::take_end`]). It reads no clock, owns no socket and spawns
//! nothing: the edge's driver does that, and this crate's tests drive it
//! packet by packet.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{
    self, DecodeError, Packet, PacketId, PacketType, Publish, QoS, SubAck, Subscribe,
    SubscribeReturnCode, Unsubscribe,
};
use relay_proto::subscription_index::SubscriptionIndex;
use relay_proto::topic::topic_matches;

use crate::close::Close;
use crate::policy::{Bucket, ChurnBudget, ChurnLimit, PublishRate, TopicPolicy};
use crate::profile::{
    AppPublish, HeldFilters, PrinterProfile, ProfileAction, ProfileConfig, ProfileOutput,
};
use crate::quarantine::{Quarantine, QuarantinePolicy, STRIKES_TO_REFUSE};

mod checks;
mod continuity;
mod counters;
mod delivery;
mod no_local;
mod printer_profile;
mod publish;
mod retained;
mod sessions;
mod subscriptions;
mod upstream;

pub use counters::HubCounters;

/// Identifies a session within its edge.
pub type SessionId = u64;

/// What an MQTT 5 client's packet says that 3.1.1 has no word for: the
/// hub's model is 3.1.1's packets plus these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketExtras {
    /// A SUBSCRIBE's options, one per filter, in order.
    pub subscription: Vec<SubscriptionExtras>,
    /// A PUBLISH's Message Expiry Interval: it is dropped if it is still
    /// waiting at the edge (for the publish rate, or for a new upstream)
    /// once that has passed.
    pub message_expiry: Option<Duration>,
}

/// An MQTT 5 subscription's options beyond its QoS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionExtras {
    /// The session's own messages (echoed by the broker) are not
    /// delivered to it under this filter.
    pub no_local: bool,
    pub retain_handling: RetainHandling,
}

pub use relay_proto::mqtt5::RetainHandling;

/// Why the hub refused a client's PUBLISH, for MQTT 5 sessions, which hear
/// it in their PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRefused {
    /// The device's topic policy (0x87).
    NotAuthorized,
    /// Over the device's publish rate, past the session's wait (0x97).
    QuotaExceeded,
}

/// Where the hub puts what a session's client should receive. Pushing is
/// not IO: the production sink is a bounded in-memory queue drained by the
/// session's writer; the tests' sink is a vector.
pub trait SessionSink {
    /// Queues encoded MQTT bytes for the client. False when they do not fit
    /// the session's byte budget, or the session is gone.
    fn deliver(&self, bytes: Bytes) -> bool;
    /// Queues a QoS 0 PUBLISH already encoded as MQTT 5 (no properties),
    /// the same bytes for every MQTT 5 session it goes to; only sessions
    /// attached with `mqtt5` are given one. False as for [`Self::deliver`].
    fn deliver_mqtt5(&self, bytes: Bytes) -> bool;
    /// Ends the session with `close`, after what is already queued.
    fn end(&self, close: Close);
    /// Ends the session with `close` at once: what is queued and not yet
    /// written is dropped, so the close is next (a client that stopped
    /// reading).
    fn abandon(&self, close: Close) {
        self.end(close);
    }
    /// Tells an MQTT 5 session that its PUBLISH `packet_id` (at `qos`) was
    /// refused. Only called for sessions attached with `mqtt5`.
    fn refuse_publish(&self, packet_id: PacketId, qos: QoS, why: PublishRefused) -> bool {
        let _ = why;
        self.deliver(encode(&match qos {
            QoS::ExactlyOnce => Packet::PubRec(packet_id),
            _ => Packet::PubAck(packet_id),
        }))
    }
}

/// What the printer behind a hub is, as its agent said (LINK_ACCEPT):
/// passed on to peer hubs, which configure themselves the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrinterIdentity {
    pub kind: Option<relay_proto::tunnel::PrinterKind>,
    pub serial: Option<String>,
}

/// What a hub is told once, when it starts.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Largest packet accepted from the upstream.
    pub max_upstream_packet: usize,
    /// PINGREQ towards the upstream at this interval.
    pub upstream_keep_alive: Duration,
    /// No PINGRESP this long after a PINGREQ: the printer is silent, and
    /// its connection is ended. `None`: 1.5 × `upstream_keep_alive`, as a
    /// broker treats a client's keep-alive (MQTT 3.1.1 §3.1.2.10).
    pub pingresp_deadline: Option<Duration>,
    /// End the hub once it has had no session for this long; `None` keeps
    /// it while the upstream lives.
    pub linger: Option<Duration>,
    /// When a session subscribing to a filter the upstream already holds
    /// makes the hub subscribe it again, so that the broker re-sends its
    /// retained messages (MQTT 3.1.1 §3.8.4) for that session only.
    pub replay_retained: RetainedReplay,
    /// What sessions may subscribe to and publish.
    pub policy: Arc<TopicPolicy>,
    /// SUBSCRIBE and UNSUBSCRIBE packets one session may cause upstream.
    pub churn: ChurnLimit,
    /// PUBLISHes all sessions together may send upstream.
    pub publish_rate: PublishRate,
    /// What the printer needs beyond MQTT ([`crate::profile`]).
    pub profile: ProfileConfig,
    /// What the printer is (for peer hubs); the state does not use it.
    pub printer: PrinterIdentity,
    /// When a filter or a publisher that gets the upstream dropped is
    /// kept away from it ([`super::quarantine`]).
    pub quarantine: QuarantinePolicy,
}

/// Something the quarantine decided that deserves a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineEvent {
    /// `filter` ended the upstream twice; `sessions_lost` sessions that
    /// held it lost it, and the waiting ones were refused.
    Filter {
        filter: String,
        sessions_lost: usize,
    },
    /// The PUBLISHes of `client_id` ended the upstream twice.
    Publisher { client_id: String },
}

/// When a joining session's filter is subscribed upstream again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedReplay {
    /// Always: any client of the broker may have left retained messages
    /// (a generic broker).
    Always,
    /// Only when the hub has seen a retained message under the filter, from
    /// the upstream or from one of its sessions: a broker with no other
    /// publisher of retained messages (a Bambu printer), whose few client
    /// slots and small CPU should not hear a SUBSCRIBE per app.
    WhenSeen,
}

/// Topics with retained messages a [`RetainedReplay::WhenSeen`] hub
/// remembers; past this it replays for every joining filter.
const MAX_SEEN_RETAINED_TOPICS: usize = 1_000;

impl HubConfig {
    /// Defaults for a hub over an agent's printer link.
    pub fn new(max_upstream_packet: usize) -> HubConfig {
        HubConfig {
            max_upstream_packet,
            upstream_keep_alive: Duration::from_secs(30),
            pingresp_deadline: None,
            linger: None,
            replay_retained: RetainedReplay::Always,
            policy: Arc::new(TopicPolicy::generic()),
            churn: ChurnLimit::default(),
            publish_rate: PublishRate::generic(),
            profile: ProfileConfig::Generic,
            printer: PrinterIdentity::default(),
            quarantine: QuarantinePolicy::default(),
        }
    }
}

/// What a session brings to its hub when it attaches.
#[derive(Debug)]
pub struct SessionAttach<S> {
    pub sink: S,
    /// The client id; a later session with the same one replaces this one.
    /// Empty: no takeover.
    pub client_id: String,
    /// Published when the session ends without DISCONNECT. The session
    /// passes it only when its key may publish.
    pub will: Option<Publish>,
    /// Most filters this session may hold at once.
    pub max_subscriptions: usize,
    /// Most of its QoS 1 and 2 PUBLISHes awaiting the printer's PUBACK.
    pub max_unacknowledged: usize,
    /// Another edge instance's hub: many sessions behind one, whose limits
    /// (subscription churn) that instance enforces per session. It is ended
    /// when this hub loses its upstream, so that the peer asks the registry
    /// where the device went.
    pub peer: bool,
    /// An MQTT 5 client: refused PUBLISHes are said so in their PUBACK
    /// ([`SessionSink::refuse_publish`]) instead of acknowledged as done,
    /// and one over the rate is refused instead of cutting the session.
    pub mqtt5: bool,
}

/// Why a hub ended.
#[derive(Debug, thiserror::Error)]
pub enum HubEnd {
    #[error("the upstream closed")]
    UpstreamClosed,
    #[error("upstream I/O failed: {0}")]
    UpstreamIo(#[from] std::io::Error),
    #[error("the upstream broke the protocol: {0}")]
    UpstreamProtocol(#[from] UpstreamViolation),
    /// Replaced by a newer hub, or its tunnel ended.
    #[error("ended by the edge")]
    Ended,
    /// No session for the linger time.
    #[error("idle for the linger time")]
    Idle,
    /// The device's tunnel moved; the upstream through the old one is
    /// stale.
    #[error("the device's tunnel moved")]
    UpstreamMoved,
    /// The upstream was lost and no new one came within the grace.
    #[error("no upstream within the grace")]
    NoUpstream,
    /// The printer kept its connection but stopped answering: ended, to
    /// be made again.
    #[error("the printer went silent ({0})")]
    UpstreamSilent(Silence),
}

/// Which watchdog found the printer silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Silence {
    /// No PINGRESP within the deadline.
    NoPingResp,
    /// A Bambu printer: no report, nor after a `pushall`.
    NoReport,
    /// A CC2: nothing (no PONG to the agent's heartbeat, no status).
    NoPong,
    /// A CC2 watched by apps: no status, nor after a 1002.
    NoStatus,
}

impl std::fmt::Display for Silence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Silence::NoPingResp => "no PINGRESP in time",
            Silence::NoReport => "no report, nor after pushall",
            Silence::NoPong => "no PONG to the heartbeat, no status",
            Silence::NoStatus => "no status, nor after a full-status request",
        })
    }
}

impl HubEnd {
    /// The close its sessions get: a lost tunnel is the device going
    /// offline (1013); a lost printer behind a live tunnel is 1014.
    pub fn close(&self, tunnel_gone: bool) -> Close {
        match self {
            HubEnd::Ended | HubEnd::Idle | HubEnd::NoUpstream | HubEnd::UpstreamMoved => {
                Close::device_offline()
            }
            _ if tunnel_gone => Close::device_offline(),
            HubEnd::UpstreamSilent(_) => Close::printer_unreachable("silent"),
            _ => Close::printer_unreachable("connection lost"),
        }
    }
}

/// What the upstream did wrong.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamViolation {
    #[error("malformed MQTT: {0}")]
    Malformed(#[from] DecodeError),
    #[error("unexpected {0} from the printer")]
    Unexpected(PacketType),
}

/// A filter the upstream is subscribed to on the sessions' behalf.
#[derive(Debug)]
struct UpstreamFilter {
    /// Sessions holding it.
    holders: usize,
    /// What the upstream granted; `None` until its first SUBACK.
    granted: Option<SubscribeReturnCode>,
}

#[derive(Debug)]
struct SessionEntry<S> {
    sink: S,
    client_id: String,
    /// Boxed: most sessions have none, and every entry pays its size.
    will: Option<Box<Publish>>,
    /// Filters and the QoS this session asked for.
    filters: HashMap<String, QoS>,
    max_subscriptions: u32,
    max_unacknowledged: u32,
    /// QoS 1 and 2 PUBLISHes waiting for the printer.
    unacknowledged: u32,
    /// The client's QoS 2 packet ids between its PUBLISH and its PUBREL:
    /// true once PUBREC went out. A re-sent PUBLISH with such an id is not
    /// forwarded again (exactly once towards the edge).
    exactly_once: ExactlyOnce,
    next_packet_id: u16,
    churn: ChurnBudget,
    /// Its QoS 1 and 2 PUBLISHes waiting for the publish rate.
    waiting_for_rate: u32,
    peer: bool,
    mqtt5: bool,
    /// Filters subscribed with No Local (MQTT 5); boxed, as few have any.
    // The box is the point: 8 bytes in every entry instead of a set's 48.
    #[allow(clippy::box_collection)]
    no_local: Option<Box<std::collections::HashSet<String>>>,
}

/// A session's QoS 2 packet ids between its PUBLISH and its PUBREL (true
/// once PUBREC went out); boxed, since few sessions ever use QoS 2.
#[derive(Debug, Default)]
// The box is the point: 8 bytes in every entry instead of a map's 48.
#[allow(clippy::box_collection)]
struct ExactlyOnce(Option<Box<HashMap<PacketId, bool>>>);

impl ExactlyOnce {
    fn get(&self, id: &PacketId) -> Option<&bool> {
        self.0.as_ref()?.get(id)
    }

    fn insert(&mut self, id: PacketId, acknowledged: bool) {
        self.0
            .get_or_insert_with(Box::default)
            .insert(id, acknowledged);
    }

    fn remove(&mut self, id: &PacketId) {
        if let Some(ids) = &mut self.0 {
            ids.remove(id);
        }
    }
}

impl<S> SessionEntry<S> {
    fn allocate_packet_id(&mut self) -> PacketId {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        PacketId::new(self.next_packet_id).unwrap_or(PacketId::MIN)
    }
}

/// What an upstream packet id is waiting for.
#[derive(Debug)]
enum Pending {
    /// A SUBSCRIBE for these filters; clients' SUBSCRIBEs wait on it.
    Subscribe {
        filters: Vec<String>,
        /// When it went out: an upstream that ends soon after, before its
        /// SUBACK, makes its filters suspects.
        sent_at: Instant,
    },
    Unsubscribe,
    /// A QoS 1 PUBLISH: `origin` (a session and its own packet id) is
    /// acknowledged when the upstream does. A will has no origin. The
    /// packet is kept so that a new upstream gets it again (DUP once
    /// `sent`); `order` keeps the order they came in.
    Publish {
        origin: Option<(SessionId, PacketId)>,
        exactly_once: bool,
        publish: Box<Publish>,
        order: u64,
        sent: bool,
        /// An MQTT 5 Message Expiry: not sent again after it.
        expires_at: Option<Instant>,
        /// When it last went out.
        sent_at: Option<Instant>,
        /// It was in flight when an upstream ended: it goes out once more,
        /// and is dropped if that upstream ends too.
        suspect: bool,
    },
}

/// A client SUBSCRIBE waiting for upstream grants.
#[derive(Debug)]
struct WaitingSubscribe {
    session: SessionId,
    packet_id: PacketId,
    /// Each filter with its requested QoS; `None` when the policy refused
    /// it (answered 0x80 without the upstream).
    filters: Vec<(String, Option<QoS>)>,
}

/// Sessions waiting for the retained messages that one upstream SUBSCRIBE
/// makes the broker send. The broker answers a SUBSCRIBE with its SUBACK
/// and then those messages, and it answers packets in order: the PINGREQ
/// sent right after the SUBSCRIBE comes back once they are all through.
#[derive(Debug)]
struct OpenReplay {
    subscribe_id: PacketId,
    suback_seen: bool,
    /// (filter, session, QoS the session asked for).
    joiners: Vec<(String, SessionId, QoS)>,
    /// Filters subscribed through it whose sessions want no retained
    /// messages (MQTT 5 Retain Handling): its retained messages under them
    /// go to the joiners only, not to everyone as live messages.
    declined: Vec<String>,
}

/// A QoS 1 or 2 PUBLISH waiting for the publish rate: its origin (a
/// session and its packet id; none for a will), and its MQTT 5 expiry.
type WaitingPublish = (Option<(SessionId, PacketId)>, Publish, Option<Instant>);

/// Wills waiting for the publish rate, at most (their sessions are gone).
const MAX_WAITING_WILLS: usize = 10_000;

/// PINGREQs in flight at most.
const MAX_PINGS_IN_FLIGHT: usize = 16;

/// Filters per SUBSCRIBE when a new upstream gets every held filter.
const MAX_FILTERS_PER_RESUBSCRIBE: usize = 64;

/// Open replays kept at most; past this the oldest is forgotten (its
/// sessions then get later retained copies as live messages).
const MAX_OPEN_REPLAYS: usize = 256;

/// The hub of one device: every session's view of the one upstream.
#[derive(Debug)]
pub struct HubState<S> {
    config: HubConfig,
    sessions: HashMap<SessionId, SessionEntry<S>>,
    client_ids: HashMap<String, SessionId>,
    index: SubscriptionIndex<SessionId>,
    upstream_filters: HashMap<String, UpstreamFilter>,
    pending: HashMap<PacketId, Pending>,
    waiting_subscribes: Vec<WaitingSubscribe>,
    replays: VecDeque<OpenReplay>,
    /// One entry per PINGREQ in flight, oldest first: when it went out,
    /// and the replay it closes.
    pings_in_flight: VecDeque<(Instant, Option<PacketId>)>,
    next_upstream_id: u16,
    /// When the last session left (or the hub started).
    idle_since: Option<Instant>,
    next_ping: Instant,
    /// Encoded packets for the upstream, written by the driver.
    to_upstream: BytesMut,
    end: Option<HubEnd>,
    /// Reused per fan-out: (session, QoS) matches.
    matches: Vec<(SessionId, QoS)>,
    /// Topics known to hold a retained message upstream; `None` once
    /// there were too many to track.
    seen_retained: Option<std::collections::HashSet<String>>,
    counters: HubCounters,
    /// The device's publish rate towards the upstream.
    publish_bucket: Bucket,
    /// QoS 1 and 2 PUBLISHes over the rate, oldest first, with their origin
    /// and their MQTT 5 expiry.
    over_rate: VecDeque<WaitingPublish>,
    /// Recent PUBLISHes of sessions with No Local filters, so that the
    /// broker's echo of them is not delivered back: (when, session, topic,
    /// payload digest), oldest first.
    own_recent: VecDeque<(Instant, SessionId, String, u64)>,
    /// The printer's profile, and what it asked for, not yet done.
    profile: PrinterProfile,
    profile_actions: Vec<ProfileAction>,
    /// Set while the hub has no upstream: when the grace ends.
    lost_until: Option<Instant>,
    /// Next [`Pending::Publish`] order.
    next_publish_order: u64,
    /// Suspect and quarantined filters and publishers.
    quarantine: Quarantine,
    /// The last QoS 0 PUBLISH a session sent upstream, and when.
    last_qos0: Option<(Instant, SessionId)>,
    /// What the quarantine decided, for the driver's log.
    quarantine_events: Vec<QuarantineEvent>,
}

impl<S: SessionSink> HubState<S> {
    pub fn new(config: HubConfig, now: Instant) -> HubState<S> {
        let next_ping = now + config.upstream_keep_alive;
        let publish_bucket = Bucket::full(config.publish_rate.burst, now);
        let profile = PrinterProfile::new(config.profile.clone(), now);
        let config_quarantine = config.quarantine;
        let mut state = HubState {
            config,
            sessions: HashMap::new(),
            client_ids: HashMap::new(),
            index: SubscriptionIndex::new(),
            upstream_filters: HashMap::new(),
            pending: HashMap::new(),
            waiting_subscribes: Vec::new(),
            replays: VecDeque::new(),
            pings_in_flight: VecDeque::new(),
            next_upstream_id: 0,
            idle_since: Some(now),
            next_ping,
            to_upstream: BytesMut::new(),
            end: None,
            matches: Vec::new(),
            seen_retained: Some(std::collections::HashSet::new()),
            counters: HubCounters::default(),
            publish_bucket,
            over_rate: VecDeque::new(),
            own_recent: VecDeque::new(),
            profile,
            profile_actions: Vec::new(),
            lost_until: None,
            next_publish_order: 0,
            quarantine: Quarantine::new(config_quarantine),
            last_qos0: None,
            quarantine_events: Vec::new(),
        };
        if let Some(filter) = state.profile.hooks().own_filter() {
            state.hold_filter(filter, now);
        }
        state
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// What was refused or cut so far.
    pub fn counters(&self) -> HubCounters {
        self.counters
    }

    /// The hub's end, once it has decided to end.
    pub fn take_end(&mut self) -> Option<HubEnd> {
        self.end.take()
    }

    /// When [`Self::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Instant {
        // No keep-alive without an upstream: the grace's end instead.
        let base = self.lost_until.unwrap_or(self.next_ping);
        let next = match (self.config.linger, self.idle_since) {
            (Some(linger), Some(since)) => base.min(since + linger),
            _ => base,
        };
        let next = match self.profile.hooks().poll_timeout() {
            Some(profile) if self.lost_until.is_none() => next.min(profile),
            _ => next,
        };
        let next = match self.pingresp_due() {
            Some(deadline) if self.lost_until.is_none() => next.min(deadline),
            _ => next,
        };
        if self.over_rate.is_empty() {
            next
        } else {
            let per_second = f64::from(self.config.publish_rate.per_second);
            next.min(self.publish_bucket.next_token(per_second))
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let (Some(linger), Some(since)) = (self.config.linger, self.idle_since)
            && now >= since + linger
        {
            self.end.get_or_insert(HubEnd::Idle);
            return;
        }
        if let Some(until) = self.lost_until {
            if now >= until {
                self.end.get_or_insert(HubEnd::NoUpstream);
                return;
            }
        } else {
            if now >= self.next_ping {
                self.quarantine.forget_expired(now);
                self.ping_upstream(None, now);
                self.next_ping = now + self.config.upstream_keep_alive;
            }
            let mut out = ProfileOutput {
                actions: &mut self.profile_actions,
                counters: &mut self.counters,
            };
            self.profile.hooks_mut().handle_timeout(now, &mut out);
            self.run_profile_actions(now);
            self.watch_for_silence(now);
        }
        self.release_over_rate(now);
    }

    /// A packet from a client. The session has already checked what needs
    /// no hub state (topic syntax, its key's scope).
    pub fn handle_client_packet(&mut self, session: SessionId, packet: Packet, now: Instant) {
        self.handle_client_packet_with(session, packet, None, now);
    }

    /// [`Self::handle_client_packet`], with what an MQTT 5 client's packet
    /// adds.
    pub fn handle_client_packet_with(
        &mut self,
        session: SessionId,
        packet: Packet,
        extras: Option<&PacketExtras>,
        now: Instant,
    ) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        match packet {
            Packet::Subscribe(subscribe) => {
                let options = extras.map_or(&[][..], |extras| &extras.subscription[..]);
                self.on_subscribe(session, subscribe, options, now)
            }
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(session, unsubscribe, now),
            Packet::Publish(publish) => {
                let expires_at = extras
                    .and_then(|extras| extras.message_expiry)
                    .map(|expiry| now + expiry);
                self.on_client_publish(session, publish, expires_at, now)
            }
            Packet::PubRel(id) => {
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.exactly_once.remove(&id);
                }
                self.send_to(session, &Packet::PubComp(id), now);
            }
            // Acknowledgements of our QoS 1 deliveries: nothing is kept.
            Packet::PubAck(_) => {}
            other => self.end_session(
                session,
                Close::protocol(format!("unexpected {} from a client", other.packet_type())),
                now,
            ),
        }
    }

    /// A packet from the upstream.
    pub fn handle_upstream_packet(&mut self, packet: Packet, now: Instant) {
        match packet {
            Packet::Publish(publish) => self.on_upstream_publish(publish, now),
            Packet::SubAck(suback) => self.on_suback(suback, now),
            Packet::UnsubAck(id) => {
                // Only an UNSUBSCRIBE's: a stray one must not drop what
                // another packet id waits for.
                if matches!(self.pending.get(&id), Some(Pending::Unsubscribe)) {
                    self.pending.remove(&id);
                }
            }
            Packet::PubAck(id) => self.on_upstream_puback(id, now),
            Packet::PingResp => {
                if let Some((_, Some(replay))) = self.pings_in_flight.pop_front() {
                    self.replays.retain(|open| open.subscribe_id != replay);
                }
            }
            other => {
                self.end
                    .get_or_insert(HubEnd::UpstreamProtocol(UpstreamViolation::Unexpected(
                        other.packet_type(),
                    )));
            }
        }
    }

    /// The upstream sent a packet over `max_upstream_packet`; the driver
    /// skips its bytes and the link goes on. A QoS 1 PUBLISH's packet id
    /// (read from its first bytes) is acknowledged, so that the broker
    /// does not send it again on every new connection.
    pub fn handle_upstream_oversized(&mut self, publish: Option<(QoS, PacketId)>) {
        self.counters.oversized_upstream += 1;
        // The hub subscribes at QoS 1 at most: a QoS 2 PUBLISH is the
        // broker's mistake, and it gets no PUBREC.
        if let Some((QoS::AtLeastOnce, id)) = publish {
            self.counters.oversized_acknowledged += 1;
            self.queue_upstream(&Packet::PubAck(id));
        }
    }

    /// Bytes from the upstream that do not decode.
    pub fn handle_upstream_error(&mut self, error: DecodeError) {
        self.end
            .get_or_insert(HubEnd::UpstreamProtocol(UpstreamViolation::Malformed(
                error,
            )));
    }
}

/// A QoS 0 PUBLISH the hub makes up (for a profile).
fn at_most_once(topic: String, payload: Bytes) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic,
        packet_id: None,
        payload,
    }
}

fn encode(packet: &Packet) -> Bytes {
    let mut bytes = BytesMut::new();
    // Packets built by the hub come from decoded, bounded parts.
    let _ = mqtt::encode(packet, &mut bytes);
    bytes.freeze()
}
