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

use crate::bambu::{BambuProfile, BambuState, Pushall, ReportRefusal, Watchdog, is_pushall};
use crate::cc2::{AppPublish, Cc2Action, Cc2Profile, Cc2State};
use crate::close::Close;
use crate::policy::{Bucket, ChurnBudget, ChurnLimit, PublishRate, TopicPolicy};
use crate::quarantine::{Quarantine, QuarantinePolicy, STRIKES_TO_REFUSE};

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
    /// A Bambu printer: its report state is kept, late joiners get the
    /// full report, `pushall` is absorbed.
    pub bambu: Option<BambuProfile>,
    /// An Elegoo CC2: apps' registrations and heartbeats are answered
    /// here, their requests go on the agent's registration, paced.
    pub cc2: Option<Cc2Profile>,
    /// What the printer is (for peer hubs); the state does not use it.
    pub printer: PrinterIdentity,
    /// When a filter or a publisher that gets the upstream dropped is
    /// kept away from it ([`super::quarantine`]).
    pub quarantine: QuarantinePolicy,
}

/// What a hub has refused or cut, counted; the driver exports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubCounters {
    /// SUBSCRIBE filters answered 0x80 by the policy.
    pub refused_filters: u64,
    /// PUBLISHes (and wills) dropped by the policy.
    pub refused_publishes: u64,
    /// Sessions cut for subscription churn.
    pub churn_cuts: u64,
    /// Sessions cut for not reading.
    pub slow_consumer_cuts: u64,
    /// QoS 0 PUBLISHes dropped over the device's publish rate.
    pub throttled_publishes: u64,
    /// Sessions cut for publishing faster than the rate, past the wait.
    pub rate_cuts: u64,
    /// Bambu reports passed on but not kept (over the state's bound).
    pub oversized_reports: u64,
    /// MQTT 5 PUBLISHes whose Message Expiry passed while they waited at
    /// the edge (for the rate, or for a new upstream): dropped.
    pub expired_publishes: u64,
    /// Upstream packets over `max_upstream_packet`, skipped.
    pub oversized_upstream: u64,
    /// Of those, QoS 1 PUBLISHes acknowledged (from their first bytes).
    pub oversized_acknowledged: u64,
    /// Apps' `pushall`s answered from the state or by another's answer,
    /// instead of reaching the printer.
    pub pushalls_absorbed: u64,
    /// CC2 registrations, heartbeats and full statuses answered by the
    /// edge instead of the printer.
    pub cc2_answered_at_edge: u64,
    /// CC2 requests sent on the agent's registration.
    pub cc2_requests_sent: u64,
    /// CC2 requests answered "busy" (1009): the pacing queue was full.
    pub cc2_queue_overflows: u64,
    /// Filters quarantined: their trial ended the upstream again.
    pub quarantined_filters: u64,
    /// SUBSCRIBE filters answered 0x80 (MQTT 5: 0x87) because they are
    /// quarantined (also counted in `refused_filters`).
    pub quarantine_refusals: u64,
    /// Filters taken from sessions that held them when they were
    /// quarantined.
    pub quarantine_lost_filters: u64,
    /// Publishers whose PUBLISHes ended the upstream twice: refused since.
    pub quarantined_publishers: u64,
    /// Upstreams ended because the printer went silent: no PINGRESP in
    /// time…
    pub silent_pingresp: u64,
    /// …or, on a Bambu printer, no report after the watchdog's `pushall`…
    pub silent_report: u64,
    /// …or, on a CC2, nothing at all (no PONG, no status) for 65 s…
    pub silent_pong: u64,
    /// …or, on a CC2 that apps watch, no status nor after a 1002.
    pub silent_status: u64,
    /// Watchdog 1002s sent to a CC2 whose status went quiet.
    pub watchdog_status_requests: u64,
    /// Watchdog `pushall`s sent to a Bambu printer that stopped reporting.
    pub watchdog_pushalls: u64,
    /// PUBLISHes refused because their publisher is quarantined (also
    /// counted in `refused_publishes`), or dropped instead of being sent a
    /// third time after ending the upstream twice.
    pub quarantine_dropped_publishes: u64,
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
            bambu: None,
            cc2: None,
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
    bambu: Option<BambuState>,
    cc2: Option<Cc2State>,
    /// The CC2 agent's client id on the next upstream (set before it
    /// resumes).
    next_printer_client: Option<String>,
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
        let bambu = config.bambu.clone().map(BambuState::new);
        let cc2 = config.cc2.clone().map(Cc2State::new);
        let next_printer_client = config.cc2.as_ref().and_then(|cc2| cc2.agent_client.clone());
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
            bambu,
            cc2,
            next_printer_client,
            lost_until: None,
            next_publish_order: 0,
            quarantine: Quarantine::new(config_quarantine),
            last_qos0: None,
            quarantine_events: Vec::new(),
        };
        if let Some(cc2) = &mut state.cc2 {
            cc2.watch_from(now);
        }
        if let Some(filter) = state.cc2.as_ref().and_then(Cc2State::agent_response_topic) {
            state.hold_filter(filter, now);
        }
        state
    }

    /// The hub holds `filter` upstream for its own sake (a CC2 agent's
    /// replies), beside any session holding it.
    fn hold_filter(&mut self, filter: String, now: Instant) {
        if let Some(held) = self.upstream_filters.get_mut(&filter) {
            held.holders += 1;
            return;
        }
        self.upstream_filters.insert(
            filter.clone(),
            UpstreamFilter {
                holders: 1,
                granted: None,
            },
        );
        if self.lost_until.is_some() {
            // Subscribed when the upstream resumes.
            return;
        }
        self.subscribe_upstream_alone(filter, now);
    }

    /// Sends one SUBSCRIBE for `filter` alone and awaits its SUBACK;
    /// returns its packet id (`None`: every id is in use).
    fn subscribe_upstream_alone(&mut self, filter: String, now: Instant) -> Option<PacketId> {
        let id = self.allocate_upstream_id()?;
        self.queue_upstream(&Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: vec![(filter.clone(), QoS::AtLeastOnce)],
        }));
        self.pending.insert(
            id,
            Pending::Subscribe {
                filters: vec![filter],
                sent_at: now,
            },
        );
        Some(id)
    }

    /// The client id a CC2's agent registered with on the upstream about to
    /// resume (`None` over a peer link); called before
    /// [`Self::upstream_resumed`].
    pub fn set_printer_client(&mut self, client: Option<String>, now: Instant) {
        let Some(cc2) = &self.cc2 else {
            return;
        };
        if client == self.next_printer_client {
            return;
        }
        let old = cc2.agent_response_topic();
        self.next_printer_client = client;
        if let Some(old) = old {
            self.release_upstream(&old);
        }
        if let Some(agent) = &self.next_printer_client {
            let filter = format!("elegoo/{}/{agent}/api_response", self.cc2_serial());
            self.hold_filter(filter, now);
        }
    }

    fn cc2_serial(&self) -> &str {
        self.config
            .cc2
            .as_ref()
            .map_or("", |profile| profile.serial.as_str())
    }

    /// Carries out what the CC2 profile asked for.
    fn run_cc2_actions(&mut self, now: Instant) {
        let Some(cc2) = &mut self.cc2 else {
            return;
        };
        let actions = cc2.take_actions();
        let counted = cc2.take_counters();
        self.counters.cc2_answered_at_edge += counted.answered_at_edge;
        self.counters.cc2_requests_sent += counted.requests_sent;
        self.counters.cc2_queue_overflows += counted.queue_overflows;
        for action in actions {
            match action {
                Cc2Action::Deliver {
                    session,
                    topic,
                    payload,
                } => {
                    let subscribed = self.sessions.get(&session).is_some_and(|entry| {
                        entry
                            .filters
                            .keys()
                            .any(|filter| topic_matches(filter, &topic))
                    });
                    if subscribed {
                        let publish = Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtMostOnce,
                            retain: false,
                            topic,
                            packet_id: None,
                            payload,
                        });
                        self.send_to(session, &publish, now);
                    }
                }
                Cc2Action::Upstream { topic, payload } => {
                    self.queue_upstream(&Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic,
                        packet_id: None,
                        payload,
                    }));
                }
            }
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// What was refused or cut so far.
    pub fn counters(&self) -> HubCounters {
        self.counters
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Distinct filters the upstream is subscribed to (or being).
    pub fn upstream_filter_count(&self) -> usize {
        self.upstream_filters.len()
    }

    /// Bytes waiting to be written upstream, oldest first.
    pub fn upstream_pending(&self) -> &[u8] {
        &self.to_upstream
    }

    /// The driver wrote the first `written` bytes of
    /// [`Self::upstream_pending`].
    pub fn upstream_written(&mut self, written: usize) {
        let _ = self
            .to_upstream
            .split_to(written.min(self.to_upstream.len()));
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
        let next = match self.cc2.as_ref().and_then(Cc2State::poll_timeout) {
            Some(cc2) if self.lost_until.is_none() => next.min(cc2),
            _ => next,
        };
        let next = match self.silence_deadline() {
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
            if let Some(cc2) = &mut self.cc2 {
                cc2.handle_timeout(now);
                self.run_cc2_actions(now);
            }
            self.watch_for_silence(now);
        }
        self.release_over_rate(now);
    }

    fn pingresp_deadline(&self) -> Duration {
        self.config
            .pingresp_deadline
            .unwrap_or(self.config.upstream_keep_alive.mul_f64(1.5))
    }

    /// The earliest time a watchdog may find the printer silent.
    fn silence_deadline(&self) -> Option<Instant> {
        let ping = self
            .pings_in_flight
            .front()
            .map(|(sent, _)| *sent + self.pingresp_deadline());
        let report = self.bambu.as_ref().and_then(BambuState::watchdog_deadline);
        let pong = self.cc2.as_ref().and_then(Cc2State::silence_deadline);
        let status = self.cc2.as_ref().and_then(Cc2State::status_deadline);
        [ping, report, pong, status].into_iter().flatten().min()
    }

    /// The watchdogs: a PINGREQ unanswered past its deadline, and on a
    /// Bambu printer a report topic held without reports, end the upstream
    /// as silent (a `pushall` is asked for first).
    fn watch_for_silence(&mut self, now: Instant) {
        if self
            .pings_in_flight
            .front()
            .is_some_and(|(sent, _)| now >= *sent + self.pingresp_deadline())
        {
            self.counters.silent_pingresp += 1;
            self.end
                .get_or_insert(HubEnd::UpstreamSilent(Silence::NoPingResp));
            return;
        }
        if self
            .cc2
            .as_ref()
            .and_then(Cc2State::silence_deadline)
            .is_some_and(|deadline| now >= deadline)
        {
            self.counters.silent_pong += 1;
            self.end
                .get_or_insert(HubEnd::UpstreamSilent(Silence::NoPong));
            return;
        }
        let status_held = self.cc2.as_ref().is_some_and(|cc2| {
            self.upstream_filters.iter().any(|(filter, held)| {
                matches!(held.granted, Some(SubscribeReturnCode::Success(_)))
                    && topic_matches(filter, cc2.status_topic())
            })
        });
        if let Some(cc2) = &mut self.cc2 {
            cc2.watch_status(status_held, now);
            match cc2.status_watchdog(now) {
                Ok(false) => {}
                Ok(true) => {
                    self.counters.watchdog_status_requests += 1;
                    self.run_cc2_actions(now);
                }
                Err(()) => {
                    self.counters.silent_status += 1;
                    self.end
                        .get_or_insert(HubEnd::UpstreamSilent(Silence::NoStatus));
                    return;
                }
            }
        }
        let report_held = self.report_held();
        let Some(bambu) = &mut self.bambu else {
            return;
        };
        if !report_held {
            bambu.watch(None);
            return;
        }
        match bambu.watchdog(now) {
            Watchdog::Quiet => {}
            Watchdog::AskPushall => {
                self.counters.watchdog_pushalls += 1;
                let request = bambu.pushall_publish();
                self.queue_upstream(&Packet::Publish(request));
            }
            Watchdog::Silent => {
                self.counters.silent_report += 1;
                self.end
                    .get_or_insert(HubEnd::UpstreamSilent(Silence::NoReport));
            }
        }
    }

    /// Whether the upstream holds (and was granted) a filter that matches
    /// the Bambu report topic.
    fn report_held(&self) -> bool {
        let Some(bambu) = &self.bambu else {
            return false;
        };
        self.upstream_filters.iter().any(|(filter, held)| {
            matches!(held.granted, Some(SubscribeReturnCode::Success(_)))
                && topic_matches(filter, bambu.report_topic())
        })
    }

    /// Takes one publish token.
    fn take_publish_token(&mut self, now: Instant) -> bool {
        let rate = self.config.publish_rate;
        self.publish_bucket
            .take(f64::from(rate.per_second), rate.burst, now)
    }

    /// Sends what waited for the rate, as far as the rate allows now.
    fn release_over_rate(&mut self, now: Instant) {
        while !self.over_rate.is_empty() && self.take_publish_token(now) {
            let Some((origin, publish, expires_at)) = self.over_rate.pop_front() else {
                break;
            };
            if let Some((session, _)) = origin {
                match self.sessions.get_mut(&session) {
                    Some(entry) => {
                        entry.waiting_for_rate = entry.waiting_for_rate.saturating_sub(1)
                    }
                    // Its session is gone; the token is given back.
                    None => {
                        self.publish_bucket.give_back();
                        continue;
                    }
                }
            }
            if expires_at.is_some_and(|at| now >= at) {
                // Expired while it waited: dropped, its flow completed.
                self.publish_bucket.give_back();
                self.counters.expired_publishes += 1;
                self.complete_dropped(origin, publish.qos, now);
                continue;
            }
            self.publish_upstream(origin, publish, expires_at, now);
        }
    }

    /// Publishes a will within the rate: QoS 0 only if a token is there.
    fn publish_will(&mut self, will: Publish, now: Instant) {
        if will.qos != QoS::AtMostOnce {
            self.publish_within_rate(None, will, None, now);
        } else if self.over_rate.is_empty() && self.take_publish_token(now) {
            self.publish_upstream(None, will, None, now);
        } else {
            self.counters.throttled_publishes += 1;
        }
    }

    /// Sends a client's QoS 1 or 2 PUBLISH upstream within the rate, or
    /// queues it (its acknowledgement waits); a session past its share of
    /// the queue is cut.
    fn publish_within_rate(
        &mut self,
        origin: Option<(SessionId, PacketId)>,
        publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        if self.over_rate.is_empty() && self.take_publish_token(now) {
            self.publish_upstream(origin, publish, expires_at, now);
            return;
        }
        if let Some((session, client_id)) = origin {
            let max = self.config.publish_rate.max_waiting_per_session;
            let Some(entry) = self.sessions.get_mut(&session) else {
                return;
            };
            if entry.waiting_for_rate as usize >= max && entry.mqtt5 {
                // An MQTT 5 client hears it in the PUBACK and goes on.
                entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
                entry.exactly_once.remove(&client_id);
                self.counters.throttled_publishes += 1;
                self.refuse_publish(
                    session,
                    client_id,
                    publish.qos,
                    PublishRefused::QuotaExceeded,
                    now,
                );
                return;
            }
            if entry.waiting_for_rate as usize >= max {
                self.counters.rate_cuts += 1;
                let per_second = self.config.publish_rate.per_second;
                self.end_session(
                    session,
                    Close::limit(&format!(
                        "publishing faster than the printer takes ({per_second} a second)"
                    )),
                    now,
                );
                return;
            }
            entry.waiting_for_rate += 1;
        } else if self.over_rate.len() >= MAX_WAITING_WILLS {
            // Wills of sessions already gone, past the bound: dropped.
            self.counters.throttled_publishes += 1;
            return;
        }
        self.over_rate.push_back((origin, publish, expires_at));
    }

    /// Tells a session its PUBLISH was refused: an MQTT 5 session in its
    /// PUBACK (or PUBREC), a 3.1.1 session by a plain acknowledgement (as
    /// a broker's ACL does).
    fn refuse_publish(
        &mut self,
        session: SessionId,
        packet_id: PacketId,
        qos: QoS,
        why: PublishRefused,
        now: Instant,
    ) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        let delivered = if entry.mqtt5 {
            entry.sink.refuse_publish(packet_id, qos, why)
        } else {
            entry.sink.deliver(encode(&match qos {
                QoS::ExactlyOnce => Packet::PubRec(packet_id),
                _ => Packet::PubAck(packet_id),
            }))
        };
        if !delivered {
            self.cut_slow_consumer(session, now);
        }
    }

    /// Completes the client's flow for a PUBLISH the edge dropped
    /// (expired while it waited).
    fn complete_dropped(&mut self, origin: Option<(SessionId, PacketId)>, qos: QoS, now: Instant) {
        let Some((session, client_id)) = origin else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
        let answer = if qos == QoS::ExactlyOnce {
            entry.exactly_once.insert(client_id, true);
            Packet::PubRec(client_id)
        } else {
            Packet::PubAck(client_id)
        };
        self.send_to(session, &answer, now);
    }

    /// A new session. One that holds the same client id is ended (replaced)
    /// first, as MQTT requires; its will goes out.
    pub fn attach(&mut self, session: SessionId, attach: SessionAttach<S>, now: Instant) {
        if !attach.client_id.is_empty()
            && let Some(older) = self.client_ids.insert(attach.client_id.clone(), session)
            && older != session
        {
            self.end_session(older, Close::replaced(), now);
        }
        self.idle_since = None;
        if let Some(cc2) = &mut self.cc2 {
            cc2.attach(session, attach.peer);
        }
        // The session refused a will the policy forbids already; a will
        // that slipped through is not published.
        let will = attach.will.filter(|will| {
            let permitted = self
                .config
                .policy
                .check_publish(&will.topic, will.retain)
                .is_ok();
            if !permitted {
                self.counters.refused_publishes += 1;
            }
            permitted
        });
        self.sessions.insert(
            session,
            SessionEntry {
                sink: attach.sink,
                client_id: attach.client_id,
                will: will.map(Box::new),
                filters: HashMap::new(),
                max_subscriptions: u32::try_from(attach.max_subscriptions).unwrap_or(u32::MAX),
                max_unacknowledged: u32::try_from(attach.max_unacknowledged).unwrap_or(u32::MAX),
                unacknowledged: 0,
                exactly_once: ExactlyOnce::default(),
                next_packet_id: 0,
                churn: ChurnBudget::new(self.config.churn, now),
                waiting_for_rate: 0,
                peer: attach.peer,
                mqtt5: attach.mqtt5,
                no_local: None,
            },
        );
    }

    /// The session is gone. `graceful`: it sent DISCONNECT, so its will is
    /// discarded; otherwise the will is published.
    pub fn detach(&mut self, session: SessionId, graceful: bool, now: Instant) {
        let Some(entry) = self.remove_session(session, now) else {
            return;
        };
        if !graceful && let Some(will) = entry.will {
            self.publish_will(*will, now);
        }
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

    /// Ends every session with `close` (the hub is going away).
    pub fn end_all_sessions(&mut self, close: &Close) {
        for (_, entry) in self.sessions.drain() {
            entry.sink.end(close.clone());
        }
        self.client_ids.clear();
    }

    fn remove_session(&mut self, session: SessionId, now: Instant) -> Option<SessionEntry<S>> {
        let entry = self.sessions.remove(&session)?;
        if let Some(cc2) = &mut self.cc2 {
            cc2.detach(session);
        }
        for filter in entry.filters.keys() {
            self.index.remove(filter, &session);
            self.release_upstream(filter);
        }
        self.waiting_subscribes
            .retain(|waiting| waiting.session != session);
        if entry.waiting_for_rate > 0 {
            self.over_rate
                .retain(|(origin, _, _)| origin.is_none_or(|(from, _)| from != session));
        }
        for replay in &mut self.replays {
            replay.joiners.retain(|(_, joiner, _)| *joiner != session);
        }
        if self.client_ids.get(&entry.client_id) == Some(&session) {
            self.client_ids.remove(&entry.client_id);
        }
        if self.sessions.is_empty() {
            self.idle_since = Some(now);
            if self.lost_until.is_some() {
                // Nobody waits for a new upstream.
                self.end.get_or_insert(HubEnd::Idle);
            }
        }
        Some(entry)
    }

    /// Ends a session from the hub's side: it is detached at once (its
    /// will goes out) and told to close.
    fn end_session(&mut self, session: SessionId, close: Close, now: Instant) {
        if let Some(entry) = self.remove_session(session, now) {
            entry.sink.end(close);
            if let Some(will) = entry.will {
                self.publish_will(*will, now);
            }
        }
    }

    /// Encodes `packet` for one session; a session over its budget is
    /// ended as a slow consumer.
    fn send_to(&mut self, session: SessionId, packet: &Packet, now: Instant) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        if !entry.sink.deliver(encode(packet)) {
            self.cut_slow_consumer(session, now);
        }
    }

    /// Ends a session whose client stopped reading: its queue is dropped so
    /// that the close is the next thing it gets.
    fn cut_slow_consumer(&mut self, session: SessionId, now: Instant) {
        if let Some(entry) = self.remove_session(session, now) {
            self.counters.slow_consumer_cuts += 1;
            entry.sink.abandon(Close::limit("slow consumer"));
            if let Some(will) = entry.will {
                self.publish_will(*will, now);
            }
        }
    }

    /// The upstream filter that serves a session's `filter`: itself when
    /// the policy allows it; on a Bambu printer, the report topic for any
    /// filter that can match it (`#`, `device/+/report`: MQTT Explorer's
    /// default is `#`), since that is all the printer may be asked for;
    /// `None` when refused.
    fn upstream_of(&self, filter: &str) -> Option<String> {
        if self.config.policy.permits_filter(filter) {
            return Some(filter.to_owned());
        }
        if let Some(cc2) = &self.cc2 {
            let all = cc2.all_topics();
            return relay_proto::topic::filters_overlap(filter, &all).then_some(all);
        }
        let bambu = self.bambu.as_ref()?;
        relay_proto::topic::filters_overlap(filter, bambu.report_topic())
            .then(|| bambu.report_topic().to_owned())
    }

    /// Charges one upstream SUBSCRIBE or UNSUBSCRIBE to `session`; a session
    /// over its budget is cut and false returned.
    fn charge_churn(&mut self, session: SessionId, now: Instant) -> bool {
        let limit = self.config.churn;
        let Some(entry) = self.sessions.get_mut(&session) else {
            return false;
        };
        if entry.peer || entry.churn.take(limit, now) {
            return true;
        }
        self.counters.churn_cuts += 1;
        self.end_session(
            session,
            Close::limit(&format!(
                "subscription churn (more than {} a minute)",
                limit.per_minute
            )),
            now,
        );
        false
    }

    fn queue_upstream(&mut self, packet: &Packet) {
        if self.lost_until.is_some() {
            // No upstream: what must survive is redone on resume.
            return;
        }
        // Every packet the hub builds is within MQTT's limits: its parts
        // were decoded from packets that were.
        let _ = mqtt::encode(packet, &mut self.to_upstream);
    }

    fn ping_upstream(&mut self, closes_replay: Option<PacketId>, now: Instant) {
        if self.lost_until.is_some() || self.pings_in_flight.len() >= MAX_PINGS_IN_FLIGHT {
            // Bounded: a printer that answers none is found silent by the
            // oldest; a replay without its ping is forgotten in time.
            return;
        }
        self.queue_upstream(&Packet::PingReq);
        self.pings_in_flight.push_back((now, closes_replay));
    }

    /// Whether the hub is waiting for a new upstream.
    pub fn upstream_is_lost(&self) -> bool {
        self.lost_until.is_some()
    }

    /// The upstream is gone. Sessions are kept until `until`; their
    /// subscriptions and unacknowledged QoS 1 publishes are redone on a
    /// new upstream ([`Self::upstream_resumed`]). QoS 0 publishes meanwhile
    /// are dropped (counted as throttled). A hub with no session ends now.
    pub fn upstream_lost(&mut self, until: Instant, now: Instant) {
        let peers: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, entry)| entry.peer)
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            self.end_session(peer, Close::device_offline(), now);
        }
        self.judge_loss(now);
        self.lost_until = Some(until);
        if let Some(bambu) = &mut self.bambu {
            bambu.watch(None);
        }
        if let Some(cc2) = &mut self.cc2 {
            cc2.upstream_lost();
        }
        self.to_upstream.clear();
        self.pings_in_flight.clear();
        self.replays.clear();
        // SUBSCRIBEs in flight are redone with every held filter;
        // UNSUBSCRIBEs are moot on a new connection.
        self.pending
            .retain(|_, pending| matches!(pending, Pending::Publish { .. }));
        if self.sessions.is_empty() {
            self.end.get_or_insert(HubEnd::Idle);
        }
    }

    /// A new upstream (already past CONNECT/CONNACK) serves the hub: every
    /// held filter is subscribed again (the broker re-sends its retained
    /// messages, delivered as such), unacknowledged QoS 1 publishes are
    /// sent again in their order (DUP when they had gone out), and a Bambu
    /// hub asks for the full report.
    pub fn upstream_resumed(&mut self, now: Instant) {
        self.lost_until = None;
        self.next_ping = now + self.config.upstream_keep_alive;
        // Suspects go out alone, after the rest ([`Self::advance_trials`]).
        let mut filters: Vec<String> = self
            .upstream_filters
            .keys()
            .filter(|filter| !self.quarantine.is_suspect(filter))
            .cloned()
            .collect();
        filters.sort_unstable();
        for chunk in filters.chunks(MAX_FILTERS_PER_RESUBSCRIBE) {
            let Some(id) = self.allocate_upstream_id() else {
                break;
            };
            self.queue_upstream(&Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: chunk
                    .iter()
                    .map(|filter| (filter.clone(), QoS::AtLeastOnce))
                    .collect(),
            }));
            self.pending.insert(
                id,
                Pending::Subscribe {
                    filters: chunk.to_vec(),
                    sent_at: now,
                },
            );
        }
        let mut resend: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter_map(|(id, pending)| match pending {
                Pending::Publish { order, .. } => Some((*order, *id)),
                _ => None,
            })
            .collect();
        resend.sort_unstable();
        for (_, id) in resend {
            if let Some(Pending::Publish {
                expires_at: Some(at),
                ..
            }) = self.pending.get(&id)
                && now >= *at
                && let Some(Pending::Publish {
                    origin,
                    exactly_once,
                    ..
                }) = self.pending.remove(&id)
            {
                // Expired while the hub waited for this upstream.
                self.counters.expired_publishes += 1;
                let qos = if exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                self.complete_dropped(origin, qos, now);
                continue;
            }
            let Some(Pending::Publish {
                publish,
                sent,
                sent_at,
                ..
            }) = self.pending.get_mut(&id)
            else {
                continue;
            };
            let mut again = (**publish).clone();
            again.dup = *sent;
            *sent = true;
            *sent_at = Some(now);
            self.queue_upstream(&Packet::Publish(again));
        }
        let report_held = self.bambu.as_ref().is_some_and(|bambu| {
            self.upstream_filters
                .keys()
                .any(|filter| topic_matches(filter, bambu.report_topic()))
        });
        if report_held && let Some(bambu) = &mut self.bambu {
            bambu.watch(Some(now));
        }
        if report_held
            && let Some(bambu) = &mut self.bambu
            && bambu.wants_refresh(now)
        {
            let request = bambu.pushall_publish();
            self.queue_upstream(&Packet::Publish(request));
        }
        if let Some(cc2) = &mut self.cc2 {
            cc2.upstream_resumed(self.next_printer_client.clone(), now);
            self.run_cc2_actions(now);
        }
        self.answer_ready_subscribes(now);
        self.advance_trials(now);
    }

    /// Who a session is, as a publisher the quarantine keeps books on: its
    /// client id, which outlives a reconnect.
    fn publisher_of(&self, session: SessionId) -> Option<String> {
        let entry = self.sessions.get(&session)?;
        Some(if entry.client_id.is_empty() {
            format!("session {session}")
        } else {
            entry.client_id.clone()
        })
    }

    /// The upstream just ended: what was in flight and went out shortly
    /// before is suspected of ending it. A suspect on trial is the only
    /// one blamed, and is quarantined.
    fn judge_loss(&mut self, now: Instant) {
        let policy = self.quarantine.policy();
        let recent = |at: Instant| now.saturating_duration_since(at) <= policy.suspect_window;
        if let Some((trial_id, filter)) = self.quarantine.trial() {
            let filter = filter.to_owned();
            let in_flight = matches!(
                self.pending.get(&trial_id),
                Some(Pending::Subscribe { sent_at, .. }) if recent(*sent_at)
            );
            self.quarantine.end_trial();
            if in_flight {
                self.quarantine_filter(&filter, now);
                return;
            }
            // It outlived the window: not its fault, tried again later.
            self.quarantine.suspect(&filter);
        }
        let mut blamed = false;
        let mut suspects = Vec::new();
        let mut publishers = Vec::new();
        let mut dropped = Vec::new();
        for (id, pending) in &mut self.pending {
            match pending {
                Pending::Subscribe { filters, sent_at } if recent(*sent_at) => {
                    blamed = true;
                    suspects.extend(filters.iter().cloned());
                }
                Pending::Publish {
                    origin,
                    sent_at: Some(sent_at),
                    suspect,
                    ..
                } if recent(*sent_at) => {
                    blamed = true;
                    if let Some((session, _)) = origin {
                        publishers.push(*session);
                    }
                    if *suspect {
                        dropped.push(*id);
                    }
                    *suspect = true;
                }
                _ => {}
            }
        }
        for filter in suspects {
            if self.upstream_filters.contains_key(&filter) {
                self.quarantine.suspect(&filter);
            }
        }
        if !blamed
            && let Some((at, session)) = self.last_qos0
            && now.saturating_duration_since(at) <= policy.qos0_window
        {
            publishers.push(session);
        }
        self.last_qos0 = None;
        publishers.sort_unstable();
        publishers.dedup();
        for session in publishers {
            self.strike(session, now);
        }
        for id in dropped {
            // Sent after one upstream ended, and that one ended too: not
            // sent a third time.
            let Some(Pending::Publish {
                origin,
                exactly_once,
                ..
            }) = self.pending.remove(&id)
            else {
                continue;
            };
            self.counters.quarantine_dropped_publishes += 1;
            if let Some((session, packet_id)) = origin {
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
                }
                let qos = if exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                self.refuse_publish(session, packet_id, qos, PublishRefused::NotAuthorized, now);
            }
        }
    }

    /// Charges a session's publisher a strike for an upstream that ended.
    fn strike(&mut self, session: SessionId, now: Instant) {
        let Some(publisher) = self.publisher_of(session) else {
            return;
        };
        if self.quarantine.strike(&publisher, now) == STRIKES_TO_REFUSE {
            self.counters.quarantined_publishers += 1;
            self.quarantine_events.push(QuarantineEvent::Publisher {
                client_id: publisher,
            });
        }
    }

    /// `filter` (as sent upstream) ended the upstream on its own: nobody
    /// gets it for the quarantine's duration. Sessions waiting for it are
    /// refused; sessions holding it lose it.
    fn quarantine_filter(&mut self, filter: &str, now: Instant) {
        self.quarantine.quarantine_filter(filter, now);
        self.counters.quarantined_filters += 1;
        if let Some(held) = self.upstream_filters.get_mut(filter) {
            held.granted = Some(SubscribeReturnCode::Failure);
        }
        // Waiting SUBSCRIBEs are answered 0x80 and drop it.
        self.answer_ready_subscribes(now);
        let holders: Vec<(SessionId, String)> = self
            .sessions
            .iter()
            .flat_map(|(session, entry)| {
                entry
                    .filters
                    .keys()
                    .map(move |held| (*session, held.clone()))
            })
            .filter(|(_, held)| self.upstream_of(held).as_deref() == Some(filter))
            .collect();
        let mut sessions_lost: Vec<SessionId> = holders.iter().map(|(s, _)| *s).collect();
        sessions_lost.dedup();
        for (session, held) in holders {
            self.counters.quarantine_lost_filters += 1;
            self.drop_filter(session, &held);
        }
        self.quarantine_events.push(QuarantineEvent::Filter {
            filter: filter.to_owned(),
            sessions_lost: sessions_lost.len(),
        });
    }

    /// Sends the next suspect alone, once nothing else that could end the
    /// upstream is in flight: if the upstream then ends, it was that one.
    fn advance_trials(&mut self, now: Instant) {
        if self.lost_until.is_some() || self.quarantine.trial().is_some() {
            return;
        }
        let busy = self.pending.values().any(|pending| match pending {
            Pending::Subscribe { .. } => true,
            Pending::Publish { suspect, sent, .. } => *suspect && *sent,
            Pending::Unsubscribe => false,
        });
        if busy {
            return;
        }
        while let Some(filter) = self.quarantine.next_trial() {
            if !self.upstream_filters.contains_key(&filter) {
                // Nobody holds it any more.
                continue;
            }
            if let Some(id) = self.subscribe_upstream_alone(filter.clone(), now) {
                self.quarantine.start_trial(id, filter);
            }
            return;
        }
    }

    /// What the quarantine decided since the last call.
    pub fn take_quarantine_events(&mut self) -> Vec<QuarantineEvent> {
        std::mem::take(&mut self.quarantine_events)
    }

    /// Checks the hub's invariants; returns what is broken (empty when
    /// all hold). For property tests and fuzzing: it walks every session.
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        // Every filter held upstream counts exactly the sessions' filters
        // that map onto it (a CC2 hub also holds the agent's replies).
        let mut expected: HashMap<String, usize> = HashMap::new();
        for entry in self.sessions.values() {
            for filter in entry.filters.keys() {
                if let Some(upstream) = self.upstream_of(filter) {
                    *expected.entry(upstream).or_default() += 1;
                }
            }
        }
        let agent_topic = self.cc2.as_ref().and_then(Cc2State::agent_response_topic);
        for (filter, held) in &self.upstream_filters {
            let own = usize::from(agent_topic.as_deref() == Some(filter.as_str()));
            let sessions = expected.remove(filter).unwrap_or(0);
            if held.holders != sessions + own {
                broken.push(format!(
                    "{filter}: {} holders counted, {} sessions hold it",
                    held.holders, sessions
                ));
            }
        }
        for (filter, sessions) in expected {
            broken.push(format!(
                "{filter}: held by {sessions} sessions, not upstream"
            ));
        }
        // The index says what the sessions hold.
        let indexed: usize = self
            .sessions
            .values()
            .map(|entry| entry.filters.len())
            .sum();
        if self.index.len() != indexed {
            broken.push(format!(
                "the index has {} entries for {indexed} session filters",
                self.index.len()
            ));
        }
        // Each session's count of unacknowledged publishes matches what
        // waits for the upstream or the rate.
        for (session, entry) in &self.sessions {
            let pending = self
                .pending
                .values()
                .filter(|pending| {
                    matches!(pending, Pending::Publish { origin: Some((from, _)), .. } if from == session)
                })
                .count();
            let waiting = self
                .over_rate
                .iter()
                .filter(|(origin, ..)| origin.is_some_and(|(from, _)| from == *session))
                .count();
            if entry.unacknowledged as usize != pending + waiting {
                broken.push(format!(
                    "session {session}: {} unacknowledged, {pending} pending and {waiting} waiting",
                    entry.unacknowledged
                ));
            }
        }
        // Bounded.
        for (what, len, bound) in [
            ("pending", self.pending.len(), usize::from(u16::MAX)),
            ("replays", self.replays.len(), MAX_OPEN_REPLAYS),
            ("pings", self.pings_in_flight.len(), MAX_PINGS_IN_FLIGHT),
            ("own_recent", self.own_recent.len(), MAX_OWN_RECENT),
        ] {
            if len > bound {
                broken.push(format!("{what}: {len} over {bound}"));
            }
        }
        broken
    }

    fn allocate_upstream_id(&mut self) -> Option<PacketId> {
        if self.pending.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.next_upstream_id = self.next_upstream_id.checked_add(1).unwrap_or(1);
            let id = PacketId::new(self.next_upstream_id)?;
            if !self.pending.contains_key(&id) {
                return Some(id);
            }
        }
    }

    fn on_subscribe(
        &mut self,
        session: SessionId,
        subscribe: Subscribe,
        options: &[SubscriptionExtras],
        now: Instant,
    ) {
        let mut quarantined = 0;
        let upstream_of: Vec<Option<String>> = subscribe
            .filters
            .iter()
            .map(|(filter, _)| {
                let upstream = self.upstream_of(filter)?;
                if self.quarantine.holds_filter(&upstream, now) {
                    quarantined += 1;
                    return None;
                }
                Some(upstream)
            })
            .collect();
        self.counters.quarantine_refusals += quarantined;
        let requested: Vec<(String, Option<QoS>)> = subscribe
            .filters
            .into_iter()
            .zip(&upstream_of)
            .map(|((filter, qos), upstream)| (filter, upstream.is_some().then_some(qos)))
            .collect();
        self.counters.refused_filters +=
            requested.iter().filter(|(_, qos)| qos.is_none()).count() as u64;
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let added = requested
            .iter()
            .filter(|(filter, qos)| qos.is_some() && !entry.filters.contains_key(filter))
            .count();
        if entry.filters.len() + added > entry.max_subscriptions as usize {
            let limit = entry.max_subscriptions;
            self.end_session(
                session,
                Close::limit(&format!("more than {limit} subscriptions")),
                now,
            );
            return;
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        // Filters the upstream SUBSCRIBE carries; joiners of retained
        // messages per upstream SUBSCRIBE in flight.
        let mut carried = Vec::new();
        let mut joiners = Vec::new();
        let mut declined = Vec::new();
        let mut joins_in_flight: Vec<(PacketId, String, QoS)> = Vec::new();
        for (index, ((filter, qos), upstream)) in requested.iter().zip(&upstream_of).enumerate() {
            let (Some(qos), Some(upstream)) = (qos, upstream) else {
                continue;
            };
            let option = options.get(index);
            let newly_held = entry.filters.insert(filter.clone(), *qos).is_none();
            if newly_held {
                self.index.insert(filter, session);
            }
            match option {
                Some(option) if option.no_local => {
                    entry
                        .no_local
                        .get_or_insert_with(Box::default)
                        .insert(filter.clone());
                }
                _ => {
                    if let Some(no_local) = &mut entry.no_local {
                        no_local.remove(filter);
                    }
                }
            }
            // MQTT 5 Retain Handling: retained messages at subscribe time
            // always (0, and 3.1.1), only for a filter the session did not
            // hold (1), or never (2).
            let wants_retained = match option.map(|option| option.retain_handling) {
                None | Some(RetainHandling::SendAtSubscribe) => true,
                Some(RetainHandling::SendIfNew) => newly_held,
                Some(RetainHandling::DoNotSend) => false,
            };
            if !wants_retained {
                if !self.upstream_filters.contains_key(upstream) {
                    self.upstream_filters.insert(
                        upstream.clone(),
                        UpstreamFilter {
                            holders: 1,
                            granted: None,
                        },
                    );
                    carried.push(upstream.clone());
                    declined.push(filter.clone());
                } else if newly_held && let Some(held) = self.upstream_filters.get_mut(upstream) {
                    held.holders += 1;
                }
                continue;
            }
            match self.upstream_filters.get_mut(upstream) {
                None => {
                    self.upstream_filters.insert(
                        upstream.clone(),
                        UpstreamFilter {
                            holders: 1,
                            granted: None,
                        },
                    );
                    carried.push(upstream.clone());
                    joiners.push((filter.clone(), session, *qos));
                }
                Some(held) => {
                    if newly_held {
                        held.holders += 1;
                    }
                    let in_flight = self.replays.iter().rev().find(|replay| {
                        !replay.suback_seen
                            && matches!(
                                self.pending.get(&replay.subscribe_id),
                                Some(Pending::Subscribe { filters, .. }) if filters.contains(upstream)
                            )
                    });
                    if let Some(replay) = in_flight {
                        // Its retained messages have not started yet.
                        joins_in_flight.push((replay.subscribe_id, filter.clone(), *qos));
                    } else if held.granted.is_none() || self.quarantine.is_suspect(upstream) {
                        // Subscribing, but its replay was forgotten, or a
                        // suspect waiting for its trial: it waits for the
                        // grant without retained messages.
                    } else if replay_wanted(
                        self.config.replay_retained,
                        self.seen_retained.as_ref(),
                        filter,
                    ) {
                        if !carried.contains(upstream) {
                            carried.push(upstream.clone());
                        }
                        joiners.push((filter.clone(), session, *qos));
                    }
                }
            }
        }
        for (replay_id, filter, qos) in joins_in_flight {
            if let Some(replay) = self
                .replays
                .iter_mut()
                .find(|replay| replay.subscribe_id == replay_id)
            {
                replay.joiners.push((filter, session, qos));
            }
        }
        if !carried.is_empty() && self.lost_until.is_none() {
            if !self.charge_churn(session, now) {
                return;
            }
            let Some(upstream_id) = self.allocate_upstream_id() else {
                self.end_session(session, Close::limit("hub busy"), now);
                return;
            };
            let packet = Packet::Subscribe(Subscribe {
                packet_id: upstream_id,
                filters: carried
                    .iter()
                    .map(|filter| (filter.clone(), QoS::AtLeastOnce))
                    .collect(),
            });
            self.queue_upstream(&packet);
            self.pending.insert(
                upstream_id,
                Pending::Subscribe {
                    filters: carried,
                    sent_at: now,
                },
            );
            self.replays.push_back(OpenReplay {
                subscribe_id: upstream_id,
                suback_seen: false,
                joiners,
                declined,
            });
            if self.replays.len() > MAX_OPEN_REPLAYS {
                self.replays.pop_front();
            }
            self.ping_upstream(Some(upstream_id), now);
        }
        self.waiting_subscribes.push(WaitingSubscribe {
            session,
            packet_id: subscribe.packet_id,
            filters: requested,
        });
        self.answer_ready_subscribes(now);
    }

    fn on_unsubscribe(&mut self, session: SessionId, unsubscribe: Unsubscribe, now: Instant) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        // Whether this UNSUBSCRIBE reaches the upstream: it drops a filter
        // no other session holds.
        let reaches_upstream = unsubscribe.filters.iter().any(|filter| {
            entry.filters.contains_key(filter)
                && self
                    .upstream_of(filter)
                    .and_then(|upstream| self.upstream_filters.get(&upstream))
                    .is_some_and(|upstream| upstream.holders == 1)
        });
        if reaches_upstream && !self.charge_churn(session, now) {
            return;
        }
        for filter in &unsubscribe.filters {
            self.drop_filter(session, filter);
        }
        for replay in &mut self.replays {
            replay.joiners.retain(|(filter, joiner, _)| {
                *joiner != session || !unsubscribe.filters.contains(filter)
            });
        }
        if let Some(entry) = self.sessions.get(&session) {
            // An UNSUBACK is tiny; a session over budget is caught by the
            // next delivery.
            let _ = entry
                .sink
                .deliver(encode(&Packet::UnsubAck(unsubscribe.packet_id)));
        }
    }

    /// Sends SUBACK to every waiting client whose filters all have an
    /// upstream grant by now.
    fn answer_ready_subscribes(&mut self, now: Instant) {
        let mut answered = Vec::new();
        for waiting in std::mem::take(&mut self.waiting_subscribes) {
            let grants: Option<Vec<SubscribeReturnCode>> = waiting
                .filters
                .iter()
                .map(|(filter, requested)| {
                    let Some(requested) = requested else {
                        return Some(SubscribeReturnCode::Failure);
                    };
                    let upstream = self.upstream_of(filter)?;
                    let granted = self.upstream_filters.get(&upstream)?.granted?;
                    Some(match granted {
                        SubscribeReturnCode::Success(upstream) => {
                            SubscribeReturnCode::Success((*requested).min(upstream))
                        }
                        SubscribeReturnCode::Failure => SubscribeReturnCode::Failure,
                    })
                })
                .collect();
            match grants {
                Some(grants) => answered.push((waiting, grants)),
                None => self.waiting_subscribes.push(waiting),
            }
        }
        for (waiting, grants) in answered {
            // Filters the upstream refused are dropped again.
            for ((filter, requested), grant) in waiting.filters.iter().zip(&grants) {
                if requested.is_some() && *grant == SubscribeReturnCode::Failure {
                    self.drop_filter(waiting.session, filter);
                }
            }
            let joins_report = self.bambu.as_ref().is_some_and(|bambu| {
                waiting
                    .filters
                    .iter()
                    .zip(&grants)
                    .any(|((filter, _), grant)| {
                        *grant != SubscribeReturnCode::Failure
                            && topic_matches(filter, bambu.report_topic())
                    })
            });
            let joins_status = self.cc2.as_ref().is_some_and(|cc2| {
                waiting
                    .filters
                    .iter()
                    .zip(&grants)
                    .any(|((filter, _), grant)| {
                        *grant != SubscribeReturnCode::Failure
                            && topic_matches(filter, cc2.status_topic())
                    })
            });
            self.send_to(
                waiting.session,
                &Packet::SubAck(SubAck {
                    packet_id: waiting.packet_id,
                    return_codes: grants,
                }),
                now,
            );
            if joins_report {
                if let Some(bambu) = &mut self.bambu {
                    bambu.watch(Some(now));
                }
                self.serve_late_joiner(waiting.session, now);
            }
            if joins_status && let Some(cc2) = &mut self.cc2 {
                cc2.joined_status(waiting.session, now);
                self.run_cc2_actions(now);
            }
        }
    }

    /// A session just subscribed to the Bambu report: it gets the full
    /// state now, or, with none yet, the hub asks the printer for it.
    fn serve_late_joiner(&mut self, session: SessionId, now: Instant) {
        let Some(bambu) = &mut self.bambu else {
            return;
        };
        if let Some(full) = bambu.full_report() {
            let report = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: bambu.report_topic().to_owned(),
                packet_id: None,
                payload: full,
            });
            self.send_to(session, &report, now);
        } else if self.lost_until.is_none() && bambu.wants_pushall(now) {
            let request = bambu.pushall_publish();
            self.publish_upstream(None, request, None, now);
        }
    }

    /// An app's `pushall` on a Bambu printer: answered from the state, or
    /// by a `pushall` already on its way; true when it must not go on.
    fn absorb_pushall(&mut self, session: SessionId, publish: &Publish, now: Instant) -> bool {
        let Some(bambu) = &mut self.bambu else {
            return false;
        };
        if publish.topic != bambu.request_topic() || !is_pushall(&publish.payload) {
            return false;
        }
        match bambu.on_pushall(now) {
            Pushall::Forward => return false,
            Pushall::FromState => {
                let report_topic = bambu.report_topic().to_owned();
                if let Some(full) = bambu.full_report() {
                    let report = Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtMostOnce,
                        retain: false,
                        topic: report_topic,
                        packet_id: None,
                        payload: full,
                    });
                    self.send_to(session, &report, now);
                }
            }
            Pushall::Absorbed => {}
        }
        self.counters.pushalls_absorbed += 1;
        match (publish.qos, publish.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.send_to(session, &Packet::PubAck(id), now),
            (QoS::ExactlyOnce, Some(id)) => self.send_to(session, &Packet::PubRec(id), now),
            _ => {}
        }
        true
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
        let Some(filter) = self.upstream_of(filter) else {
            return;
        };
        let filter = filter.as_str();
        let Some(upstream) = self.upstream_filters.get_mut(filter) else {
            return;
        };
        upstream.holders = upstream.holders.saturating_sub(1);
        if upstream.holders > 0 {
            return;
        }
        let was_granted = matches!(upstream.granted, Some(SubscribeReturnCode::Success(_)));
        self.upstream_filters.remove(filter);
        self.quarantine.forget_suspect(filter);
        if was_granted
            && self.lost_until.is_none()
            && let Some(id) = self.allocate_upstream_id()
        {
            self.queue_upstream(&Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: vec![filter.to_owned()],
            }));
            self.pending.insert(id, Pending::Unsubscribe);
        }
    }

    fn on_client_publish(
        &mut self,
        session: SessionId,
        publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        if self
            .config
            .policy
            .check_publish(&publish.topic, publish.retain)
            .is_err()
        {
            // Acknowledged and dropped, as a broker's ACL does (an MQTT 5
            // client hears 0x87 in its PUBACK).
            self.counters.refused_publishes += 1;
            if let Some(id) = publish.packet_id {
                self.refuse_publish(session, id, publish.qos, PublishRefused::NotAuthorized, now);
            }
            return;
        }
        if self
            .publisher_of(session)
            .is_some_and(|publisher| self.quarantine.refuses_publisher(&publisher, now))
        {
            // Its PUBLISHes ended the upstream twice.
            self.counters.refused_publishes += 1;
            self.counters.quarantine_dropped_publishes += 1;
            if let Some(id) = publish.packet_id {
                self.refuse_publish(session, id, publish.qos, PublishRefused::NotAuthorized, now);
            }
            return;
        }
        if self
            .sessions
            .get(&session)
            .is_some_and(|entry| entry.no_local.is_some())
        {
            self.remember_own(session, &publish, now);
        }
        if self.absorb_pushall(session, &publish, now) {
            return;
        }
        if let Some(cc2) = &mut self.cc2 {
            let taken = cc2.on_app_publish(session, &publish.topic, &publish.payload, now);
            self.run_cc2_actions(now);
            match taken {
                AppPublish::NotMine | AppPublish::Forward => {}
                AppPublish::Refused => {
                    self.counters.refused_publishes += 1;
                    if let Some(id) = publish.packet_id {
                        let why = PublishRefused::NotAuthorized;
                        self.refuse_publish(session, id, publish.qos, why, now);
                    }
                    return;
                }
                AppPublish::Taken => {
                    match (publish.qos, publish.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => {
                            self.send_to(session, &Packet::PubAck(id), now)
                        }
                        (QoS::ExactlyOnce, Some(id)) => {
                            self.send_to(session, &Packet::PubRec(id), now)
                        }
                        _ => {}
                    }
                    return;
                }
            }
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(client_id) = publish.packet_id else {
            if self.over_rate.is_empty() && self.take_publish_token(now) {
                self.publish_upstream(None, publish, None, now);
                self.last_qos0 = Some((now, session));
            } else {
                self.counters.throttled_publishes += 1;
            }
            return;
        };
        if publish.qos == QoS::ExactlyOnce {
            match entry.exactly_once.get(&client_id) {
                // A re-sent PUBLISH already acknowledged: PUBREC again.
                Some(true) => {
                    self.send_to(session, &Packet::PubRec(client_id), now);
                    return;
                }
                // Still with the printer: its PUBREC follows.
                Some(false) => return,
                None => {}
            }
        }
        if entry.unacknowledged >= entry.max_unacknowledged {
            let limit = entry.max_unacknowledged;
            self.end_session(
                session,
                Close::limit(&format!("more than {limit} unacknowledged publishes")),
                now,
            );
            return;
        }
        if self.pending.len() >= usize::from(u16::MAX) {
            self.end_session(session, Close::limit("hub busy"), now);
            return;
        }
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.unacknowledged += 1;
            if publish.qos == QoS::ExactlyOnce {
                entry.exactly_once.insert(client_id, false);
            }
        }
        self.publish_within_rate(Some((session, client_id)), publish, expires_at, now);
    }

    /// Notes a PUBLISH of a session with No Local filters, so that the
    /// broker's echo of it skips that session.
    fn remember_own(&mut self, session: SessionId, publish: &Publish, now: Instant) {
        while self
            .own_recent
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > OWN_ECHO_WINDOW)
            || self.own_recent.len() >= MAX_OWN_RECENT
        {
            self.own_recent.pop_front();
        }
        self.own_recent.push_back((
            now,
            session,
            publish.topic.clone(),
            digest(&publish.payload),
        ));
    }

    /// Drops from `self.matches` the sessions that published this message
    /// themselves and hold a No Local filter matching it: the broker echoes
    /// what the hub publishes for them (3.1.1 has no No Local).
    fn drop_own_echoes(&mut self, publish: &Publish) {
        if self.own_recent.is_empty() {
            return;
        }
        let payload = digest(&publish.payload);
        let sessions = &self.sessions;
        let own_recent = &mut self.own_recent;
        self.matches.retain(|(session, _)| {
            let no_local = sessions
                .get(session)
                .and_then(|entry| entry.no_local.as_ref())
                .is_some_and(|filters| {
                    filters
                        .iter()
                        .any(|filter| topic_matches(filter, &publish.topic))
                });
            if !no_local {
                return true;
            }
            let own = own_recent.iter().position(|(_, from, topic, digest)| {
                from == session && *topic == publish.topic && *digest == payload
            });
            match own {
                Some(position) => {
                    own_recent.remove(position);
                    false
                }
                None => true,
            }
        });
    }

    /// Sends a PUBLISH upstream: QoS 0 as it is, QoS 1 and 2 as QoS 1 with
    /// an upstream packet id (QoS 2 completes at the edge).
    fn publish_upstream(
        &mut self,
        origin: Option<(SessionId, PacketId)>,
        mut publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        publish.dup = false;
        if publish.retain {
            self.note_retained(&publish.topic, publish.payload.is_empty());
        }
        if publish.qos == QoS::AtMostOnce {
            if self.lost_until.is_some() {
                self.counters.throttled_publishes += 1;
                return;
            }
            publish.packet_id = None;
            self.queue_upstream(&Packet::Publish(publish));
            return;
        }
        let Some(id) = self.allocate_upstream_id() else {
            return;
        };
        let exactly_once = publish.qos == QoS::ExactlyOnce;
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = Some(id);
        let sent = self.lost_until.is_none();
        self.queue_upstream(&Packet::Publish(publish.clone()));
        let order = self.next_publish_order;
        self.next_publish_order += 1;
        self.pending.insert(
            id,
            Pending::Publish {
                origin,
                exactly_once,
                publish: Box::new(publish),
                order,
                sent,
                expires_at,
                sent_at: sent.then_some(now),
                suspect: false,
            },
        );
    }

    fn on_upstream_puback(&mut self, id: PacketId, now: Instant) {
        let acknowledged = self.pending.remove(&id);
        self.advance_trials(now);
        let Some(Pending::Publish {
            origin: Some((session, client_id)),
            exactly_once,
            ..
        }) = acknowledged
        else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
        let answer = if exactly_once {
            entry.exactly_once.insert(client_id, true);
            Packet::PubRec(client_id)
        } else {
            Packet::PubAck(client_id)
        };
        self.send_to(session, &answer, now);
    }

    fn on_suback(&mut self, suback: SubAck, now: Instant) {
        let Some(Pending::Subscribe { filters, .. }) = self.pending.remove(&suback.packet_id)
        else {
            return;
        };
        if self
            .quarantine
            .trial()
            .is_some_and(|(trial, _)| trial == suback.packet_id)
        {
            // It did not end the upstream: cleared.
            self.quarantine.end_trial();
        }
        for (index, filter) in filters.iter().enumerate() {
            let grant = suback
                .return_codes
                .get(index)
                .copied()
                .unwrap_or(SubscribeReturnCode::Failure);
            if let Some(upstream) = self.upstream_filters.get_mut(filter) {
                // A replay keeps the first grant unless it improves it.
                if upstream.granted.is_none() || matches!(grant, SubscribeReturnCode::Success(_)) {
                    upstream.granted = Some(grant);
                }
            }
        }
        if let Some(replay) = self
            .replays
            .iter_mut()
            .find(|replay| replay.subscribe_id == suback.packet_id)
        {
            replay.suback_seen = true;
        }
        self.answer_ready_subscribes(now);
        self.advance_trials(now);
    }

    /// Notes that `topic` holds a retained message upstream (or no longer,
    /// for an empty one).
    fn note_retained(&mut self, topic: &str, empty: bool) {
        let Some(seen) = &mut self.seen_retained else {
            return;
        };
        if empty {
            seen.remove(topic);
        } else if seen.len() >= MAX_SEEN_RETAINED_TOPICS {
            self.seen_retained = None;
        } else if !seen.contains(topic) {
            seen.insert(topic.to_owned());
        }
    }

    fn on_upstream_publish(&mut self, publish: Publish, now: Instant) {
        if let Some(id) = publish.packet_id {
            self.queue_upstream(&Packet::PubAck(id));
        }
        if let Some(bambu) = &mut self.bambu
            && publish.topic == bambu.report_topic()
            && let Err(ReportRefusal::TooLarge(_)) = bambu.on_report(&publish.payload, now)
        {
            self.counters.oversized_reports += 1;
        }
        if let Some(cc2) = &mut self.cc2 {
            let taken = cc2.on_upstream_publish(&publish.topic, &publish.payload, now);
            self.run_cc2_actions(now);
            if taken {
                return;
            }
        }
        if publish.retain {
            self.note_retained(&publish.topic, publish.payload.is_empty());
        }
        self.matches.clear();
        let mut retained_replay = false;
        if publish.retain {
            // A broker sets RETAIN only on what a new SUBSCRIBE makes it
            // send (MQTT-3.3.1-8/9): it goes to the sessions that joined
            // through the latest such SUBSCRIBE it matches.
            let replay = self
                .replays
                .iter()
                .rev()
                .filter(|replay| replay.suback_seen)
                .find(|replay| {
                    replay
                        .joiners
                        .iter()
                        .any(|(filter, _, _)| topic_matches(filter, &publish.topic))
                        || replay
                            .declined
                            .iter()
                            .any(|filter| topic_matches(filter, &publish.topic))
                });
            if let Some(replay) = replay {
                retained_replay = true;
                for (filter, session, qos) in &replay.joiners {
                    if topic_matches(filter, &publish.topic) {
                        self.matches.push((*session, *qos));
                    }
                }
            }
        }
        if !retained_replay {
            let sessions = &self.sessions;
            let matches = &mut self.matches;
            let topic = &publish.topic;
            let at_most_once = publish.qos == QoS::AtMostOnce;
            self.index.for_each_match(topic, |session| {
                if at_most_once {
                    // Every delivery is QoS 0: no need to find the
                    // session's best matching grant.
                    matches.push((*session, QoS::AtMostOnce));
                } else if let Some(entry) = sessions.get(session) {
                    let best = entry
                        .filters
                        .iter()
                        .filter(|(filter, _)| topic_matches(filter, topic))
                        .map(|(_, qos)| *qos)
                        .max()
                        .unwrap_or(QoS::AtMostOnce);
                    matches.push((*session, best));
                }
            });
        }
        self.deliver_publish(&publish, now);
    }

    /// Delivers `publish` once to each session in `self.matches`, at the
    /// lowest of its QoS, the session's and QoS 1.
    fn deliver_publish(&mut self, publish: &Publish, now: Instant) {
        self.drop_own_echoes(publish);
        let mut matches = std::mem::take(&mut self.matches);
        if matches.len() > 1 {
            // One delivery per session, at its best matching QoS.
            matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matches.dedup_by_key(|(session, _)| *session);
        }
        let mut shared_at_most_once: Option<Bytes> = None;
        let mut slow = Vec::new();
        for (session, wanted) in &matches {
            let Some(entry) = self.sessions.get_mut(session) else {
                continue;
            };
            let qos = (*wanted).min(publish.qos).min(QoS::AtLeastOnce);
            let delivered = if qos == QoS::AtMostOnce {
                let bytes = shared_at_most_once
                    .get_or_insert_with(|| {
                        encode(&Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtMostOnce,
                            retain: publish.retain,
                            topic: publish.topic.clone(),
                            packet_id: None,
                            payload: publish.payload.clone(),
                        }))
                    })
                    .clone();
                entry.sink.deliver(bytes)
            } else {
                let packet_id = entry.allocate_packet_id();
                entry.sink.deliver(encode(&Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: publish.retain,
                    topic: publish.topic.clone(),
                    packet_id: Some(packet_id),
                    payload: publish.payload.clone(),
                })))
            };
            if !delivered {
                slow.push(*session);
            }
        }
        matches.clear();
        self.matches = matches;
        for session in slow {
            self.cut_slow_consumer(session, now);
        }
    }
}

/// How long a No Local session's own PUBLISH waits for the broker's echo.
const OWN_ECHO_WINDOW: Duration = Duration::from_secs(30);

/// Own PUBLISHes remembered for No Local at most.
const MAX_OWN_RECENT: usize = 1_024;

/// A payload's digest, to recognise the broker's echo of it.
fn digest(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut hasher);
    hasher.finish()
}

/// Whether a joining session's held `filter` is subscribed upstream again.
fn replay_wanted(
    replay: RetainedReplay,
    seen: Option<&std::collections::HashSet<String>>,
    filter: &str,
) -> bool {
    match (replay, seen) {
        (RetainedReplay::Always, _) | (RetainedReplay::WhenSeen, None) => true,
        (RetainedReplay::WhenSeen, Some(seen)) => {
            seen.iter().any(|topic| topic_matches(filter, topic))
        }
    }
}

fn encode(packet: &Packet) -> Bytes {
    let mut bytes = BytesMut::new();
    // Packets built by the hub come from decoded, bounded parts.
    let _ = mqtt::encode(packet, &mut bytes);
    bytes.freeze()
}
