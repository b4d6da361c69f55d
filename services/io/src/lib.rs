//! The tokio side that relay's binaries share, kept out of `relay-proto`
//! (which stays sans-IO):
//!
//! - [`FramedReader`]: one cancel-safe reader of frames over any
//!   `AsyncRead`, for MQTT packets and tunnel messages alike. Bytes read
//!   stay in its persistent buffer, so a `read_frame` inside `select!` that
//!   loses to another branch loses nothing (unlike `read_exact`).
//! - [`shutdown_signal`]: SIGINT and SIGTERM alike, for every binary (the
//!   agent runs under systemd and as a container's PID 1, which get
//!   SIGTERM).
//!
//! - [`mux`]: streams over one TCP (TLS) connection, multiplexed by yamux,
//!   and [`transport`]: the tunnel's connection over QUIC or over that, for
//!   networks that block UDP.
//!
//! - [`http_client`]: a small HTTP/1.1 client (one request per
//!   connection) for the agent's pairing and the edge's OpenID Connect
//!   sign-in.
//!
//! - [`join_woken`]: two futures on one task, each polled only when its
//!   own waker fired (a session's reader and writer).
//!
//! It must not depend on the edge, the agent or the store.

mod framed;
pub mod http_client;
mod join_woken;
pub mod mux;
mod shutdown;
pub mod transport;

pub use framed::{FrameError, FramedReader};
pub use join_woken::{JoinWoken, join_woken};
pub use shutdown::shutdown_signal;
