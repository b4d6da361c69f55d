//! Unit tests of the hub's state, packet by packet.
