//! End-to-end tests of relay live in `tests/`: an edge, an agent, the
//! printer simulator and a real database together, through real TLS, QUIC
//! and WebSocket sockets on loopback. This crate has no code of its own; it
//! exists so that the edge and the agent meet only here, never as each
//! other's dependencies.
