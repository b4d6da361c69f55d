//! Sans-IO wire formats shared by relay's edge and agent.
//!
//! - [`mqtt`]: an MQTT 3.1 / 3.1.1 packet codec. Decoding is check-then-parse
//!   over a caller-owned `BytesMut`, bounded by a caller-given maximum packet
//!   size that is checked from the fixed header before anything is allocated.
//! - [`mqtt5`]: an MQTT 5 packet codec (properties, reason codes and their
//!   rules), bounded the same way and sharing the 3.1.1 codec's field rules.
//! - [`topic`]: topic name and filter validation, and filter matching.
//! - [`subscription_index`]: a trie from filters to subscribers.
//! - [`Secret`]: a value whose `Debug` never prints it (credentials,
//!   passwords, access codes).
//! - [`tunnel`]: the versioned messages the edge and the agent exchange over
//!   QUIC (documented byte by byte in `proto/PROTOCOL.md`).
//!
//! This crate must not depend on an IO runtime (tokio, mio, sockets) and never
//! reads a clock: whoever needs time passes it in. It builds on its own.

pub mod mqtt;
pub mod mqtt5;
mod secret;
pub mod subscription_index;
pub mod topic;
pub mod tunnel;

pub use secret::Secret;
