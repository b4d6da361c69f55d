//! The device hub: one per online device. It owns the device's one upstream
//! MQTT connection (already past CONNECT/CONNACK: whoever dialled it holds
//! the printer's credentials) and multiplexes every client session over it.
//!
//! - Client subscriptions become reference-counted upstream subscriptions:
//!   the printer sees one SUBSCRIBE per distinct filter and one UNSUBSCRIBE
//!   when the last client leaves it. Upstream subscriptions are made at QoS 1
//!   at most; a client is granted `min(requested, upstream grant)`.
//! - A session that subscribes to a filter the upstream already holds makes
//!   the hub subscribe it again: the broker then re-sends its retained
//!   messages, and the hub gives them to that session only.
//! - A message from the printer is read once and fanned out: QoS 0
//!   deliveries share one encoded buffer whatever the number of clients.
//! - Packet ids are remapped: a client's QoS 1 PUBLISH is acknowledged to it
//!   only after the printer acknowledged it.
//! - Client ids are unique per device: a newer session replaces the older.
//! - Each session's outbound bytes are bounded; a client that stops reading
//!   is cut off as a slow consumer instead of growing the edge's memory.
//! - A per-device topic policy ([`policy`]) is checked before anything
//!   reaches the upstream: a refused filter gets SUBACK 0x80, a refused
//!   publish is acknowledged and dropped. Each session's SUBSCRIBE and
//!   UNSUBSCRIBE traffic towards the printer has a budget.
//!
//! The rules live in the `relay-hub` crate (re-exported here as [`state`],
//! [`policy`], [`quarantine`], [`bambu`] and [`cc2`]), a state machine with
//! no IO; `relay-hub-io`'s driver runs it over the upstream's halves and
//! the sessions' commands, with a session's bounded outbound queue (the
//! agent runs the same); [`registry`] finds and starts this edge's hubs.

pub mod registry;
mod unavailable;

pub use registry::Hubs;
pub use relay_hub::PrinterIdentity;
pub use relay_hub::{
    BambuProfile, Cc2Profile, ChurnLimit, ProfileConfig, PublishRate, PublishRefusal,
    QuarantinePolicy, TopicPolicy,
};
pub use relay_hub::{bambu, cc2, mqtt5_session, policy, profile, quarantine, state};
pub use relay_hub_io::{
    DirectWriter, HubHandle, Mqtt5Translator, Outbound, OutboundReceiver, OutboundSender,
    StreamWriter, TunnelProbe, Upstream, UpstreamFailure, UpstreamFuture, UpstreamSource, WriteNow,
    outbound, outbound_queue,
};
pub use state::{
    HubConfig, HubCounters, HubEnd, HubState, PacketExtras, PublishRefused, QuarantineEvent,
    RetainHandling, RetainedReplay, SessionAttach, SessionId, SessionSink, Silence,
    SubscriptionExtras,
};
pub use unavailable::Unavailable;
