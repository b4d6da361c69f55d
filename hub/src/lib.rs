//! The device hub's rules: how many MQTT sessions share one upstream
//! connection to a printer, as a state machine without IO.
//!
//! [`HubState`] takes what happens (a session attaches, a client packet
//! arrives, the upstream sends a packet or is lost, time passes) through
//! `handle_*`, `attach`, `detach` and `upstream_*` calls, with the time
//! passed in, and answers with bytes for the upstream, deliveries into each
//! session's [`SessionSink`], session ends, the next time it wants to be
//! woken and its own end. It depends on `relay-proto` and nothing that does
//! IO: no tokio, no sockets, no clock (this crate's `Cargo.toml` is the
//! proof). The edge drives it over the agent's printer link or a peer link;
//! the agent, with `[lan]`, over the printer's own connection.
//!
//! - [`state`]: the hub itself: sessions, reference-counted upstream
//!   subscriptions, packet-id remapping, QoS, retained replay, upstream
//!   continuity, the watchdogs that find a silent printer.
//! - [`policy`]: what sessions may subscribe to and publish, the churn and
//!   publish-rate budgets.
//! - [`quarantine`]: filters and publishers that get the upstream dropped.
//! - [`profile`]: what a kind of printer needs beyond MQTT, behind one
//!   trait whose hooks return actions; [`bambu`] and [`cc2`] implement it
//!   for a Bambu Lab printer and an Elegoo Centauri Carbon 2 (report
//!   state, `pushall`, registrations).
//! - [`close`]: how a session ends, as MQTT codes and a WebSocket close.
//! - [`mqtt5_session`]: an MQTT 5 client's session, translated to and from
//!   the hub's 3.1.1 model.

pub mod bambu;
pub mod cc2;
pub mod close;
#[cfg(test)]
mod fake_broker;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod invariants;
pub mod mqtt5_session;
pub mod policy;
pub mod profile;
pub mod quarantine;
pub mod state;
#[cfg(any(test, feature = "fuzzing"))]
mod test_clock;
#[cfg(test)]
mod tests;

pub use bambu::BambuProfile;
pub use cc2::Cc2Profile;
pub use close::Close;
pub use policy::{ChurnLimit, PublishRate, PublishRefusal, TopicPolicy};
pub use profile::{Profile, ProfileConfig};
pub use quarantine::QuarantinePolicy;
pub use state::{
    HubConfig, HubCounters, HubEnd, HubState, PacketExtras, PrinterIdentity, PublishRefused,
    QuarantineEvent, RetainHandling, RetainedReplay, SessionAttach, SessionId, SessionSink,
    Silence, SubscriptionExtras,
};
