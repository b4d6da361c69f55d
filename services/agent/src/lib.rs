//! The agent: runs beside one printer on the user's LAN. It dials the edge
//! over QUIC (never the other way round), proves itself with its agent
//! credential on the control stream, and, when the edge asks, opens the one
//! MQTT connection to the printer and relays packets, checking each one. With
//! `[lan]` it also runs the hub on that connection ([`local_hub`]), which
//! apps on the LAN ([`lan`]) and the edge's links share, and may answer a
//! CC2's discovery as the printer ([`cc2_discovery`]). Its first run
//! (`setup`) can pair it with the relay by a code ([`pairing`]) instead
//! of a pasted credential. The printer's credentials never leave the agent.
//!
//! The agent never depends on the edge crate: they meet only through the
//! tunnel protocol in `relay-proto`.

pub mod cc2_discovery;
pub mod config;
pub mod lan;
pub mod local_hub;
pub mod pacing;
pub mod pairing;
pub mod printer;
pub mod setup;
pub mod standby;
pub mod tunnel;
