//! The device hub's tokio side, which the edge and the agent share: the
//! driver that runs a [`relay_hub::HubState`] over its upstream's halves and
//! its sessions' commands ([`driver`]), a session's bounded outbound queue
//! ([`outbound`]), a session's handle on its hub ([`handle`]), and an MQTT
//! 5 session's translator ([`mqtt5`]), a byte stream the hub may write to
//! directly ([`stream_writer`]), and the hub's traffic as others see
//! it ([`activity`]). The
//! rules live in `relay-hub`, which has no IO; this crate has the IO and
//! no rules.

pub mod activity;
pub mod driver;
pub mod handle;
pub mod mqtt5;
pub mod outbound;
pub mod stream_writer;

pub use activity::{HubActivity, Traffic};
pub use driver::{
    HubMetrics, TunnelProbe, Upstream, UpstreamFailure, UpstreamFuture, UpstreamSource,
};
pub use handle::{HubHandle, start};
pub use mqtt5::Mqtt5Translator;
pub use outbound::{
    DirectWriter, Outbound, OutboundReceiver, OutboundSender, WriteNow, outbound_queue,
};
pub use stream_writer::StreamWriter;
