//! What the tests of the edge, the agent and the end-to-end suite share,
//! as one crate instead of `#[path]` includes: a throwaway certificate
//! authority, an edge on a fresh database with port-0 listeners, a
//! WebSocket MQTT client over real TLS ([`edge`]), and the whole world of
//! edge, printer simulator and agent ([`world`]), and the third-party
//! clients the tests run ([`client_tools`]).
//!
//! Test code: it panics on any failure, which is what a test wants.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    missing_debug_implementations
)]

pub mod client_tools;
pub mod cut;
pub mod edge;
pub mod mosquitto;
pub mod processes;
pub mod world;
