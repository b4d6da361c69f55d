//! How a session ends (MQTT codes, WebSocket close code and reason): the
//! hub's [`relay_hub::close`], which the edge's sessions and listeners share.

pub use relay_hub::close::*;
