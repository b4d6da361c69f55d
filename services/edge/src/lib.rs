//! The edge: relay's public side.
//!
//! Terminates `wss://<device-id>.<base-domain>/mqtt` (hyper + rustls +
//! tungstenite) and mqtts (MQTT straight over TLS, [`mqtt_tcp`]),
//! authenticates every connection against the store, and
//! speaks MQTT 3.1, 3.1.1 and 5 with each client using `relay-proto`.
//! Failures reach clients as a CONNACK code their library shows, then a
//! WebSocket close code with a short reason. An admin listener serves
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! How one printer message reaches a client socket:
//! 1. [`tunnel`] accepted the agent's QUIC (or TLS-over-TCP) connection; the
//!    agent relays the printer's MQTT bytes on a link stream.
//! 2. [`devices`] holds that tunnel and opened the link as the hub's
//!    upstream (or [`peer_link`] did, to the instance holding the agent).
//! 3. The hub's driver ([`hub`]) reads and decodes the PUBLISH and hands it
//!    to `relay_hub::HubState`, which encodes it once per protocol version.
//! 4. For each matching session, the hub's task writes the shared bytes
//!    straight into the session's socket when the session is idle and the
//!    socket writable ([`session_socket`]); otherwise the session's bounded
//!    queue ([`hub::outbound`]) takes them, and a full queue cuts that
//!    session, nobody else.
//! 5. The session's writer ([`session`]) sends what is queued, each as one
//!    WebSocket frame, and flushes what a direct write left.
//!
//! Layers, each using only those below it (`scripts/check-layers`):
//! listeners ([`server`], [`http`] with the tenant API ([`tenant_api`]) and
//! the console ([`console`]),
//! [`tunnel`], [`peer_listener`]) → live figures across instances
//! ([`live_status`]) → client
//! sessions ([`session`]; MQTT 5 through [`hub::mqtt5_session`]) → device routing ([`devices`],
//! [`cluster`]) → upstreams ([`peer_link`]) → the hub driver ([`hub`]).
//!
//! The edge never depends on the agent crate: they meet only through the
//! tunnel protocol in `relay-proto`.

pub mod app_consent;
pub mod close;
pub mod cluster;
pub mod config;
pub mod console;
pub mod devices;
pub mod form;
pub mod http;
pub mod hub;
mod limiter;
pub mod live_status;
pub mod metrics;
pub mod mqtt_tcp;
pub mod oauth_answer;
pub mod oidc;
pub mod pairing;
pub mod peer_link;
pub mod peer_listener;
mod quotas;
pub mod server;
pub mod session;
pub mod session_socket;
mod start_error;
pub mod state;
pub mod tenant_api;
pub mod tls;
pub mod tunnel;

pub use config::EdgeConfig;
pub use server::{RunningEdge, StartError};
