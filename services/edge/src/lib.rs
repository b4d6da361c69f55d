//! The edge: relay's public side.
//!
//! Terminates `wss://<device-id>.<base-domain>/mqtt` (hyper + rustls +
//! tungstenite), authenticates every connection against the store, and
//! speaks MQTT 3.1 / 3.1.1 with each client using `relay-proto`. Failures
//! reach clients as a CONNACK code their library shows, then a WebSocket
//! close code with a short reason. An admin listener serves `/metrics`,
//! `/healthz` and `/readyz`.
//!
//! The edge never depends on the agent crate: they meet only through the
//! tunnel protocol in `relay-proto`.

pub mod close;
pub mod cluster;
pub mod config;
pub mod devices;
pub mod http;
pub mod hub;
mod limiter;
pub mod metrics;
pub mod peer_link;
pub mod peer_listener;
mod quotas;
pub mod server;
pub mod session;
pub mod session_v5;
mod start_error;
pub mod state;
pub mod tls;
pub mod tunnel;

pub use config::EdgeConfig;
pub use server::{RunningEdge, StartError};
