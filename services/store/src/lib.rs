//! Where relay's users and credentials live: tenants, devices, API keys and
//! agent credentials, on Postgres (production, several edge instances) or on
//! an embedded SQLite file (single node, the demo), with the same operations
//! and the same tests on both.
//!
//! - [`Store`]: records and operations, migrations (`migrations/`).
//! - [`credential`]: the `rly_…` / `rla_…` secret format, digests.
//! - [`Authenticator`]: from the raw inputs of an HTTP request to a verified
//!   [`Principal`] or a specific [`AuthFailure`], with a cache.
//! - [`jwt`]: operator-signed JWTs checked against a JWKS file.
//! - [`RevocationWatcher`]: revocations as events, from Postgres NOTIFY and
//!   a periodic re-check.
//! - [`registry`]: the edge instances' leases and which instance holds
//!   which device's agent (several instances on one store); an agent's
//!   HELLO is one statement that checks its credential and claims its
//!   device.
//! - [`printer_status`]: each device's printer connection as the edge last
//!   heard of it (up, down and why, silent since when, reconnects by cause).
//!
//! - [`admin`]: a tenant's own administration: login links, console
//!   sessions, API tokens, the audit log, tenant-scoped operations.
//!
//! This crate knows nothing of MQTT, WebSockets or the tunnel protocol.

pub mod admin;
pub mod auth;
pub mod clock;
pub mod credential;
mod error;
pub mod jwt;
mod migrate;
pub mod oauth_apps;
pub mod pairing;
pub mod printer_status;
pub mod registry;
pub mod revocation;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use admin::{AdminAuthFailure, AdminCaller, AdminToken, AuditEntry, AuditRecord};
pub use auth::{
    AuthConfig, AuthFailure, Authenticator, Precheck, Principal, PrincipalSource,
    RequestCredentials,
};
pub use clock::{Clock, ManualClock, Millis, SystemClock};
pub use error::StoreError;
pub use printer_status::PrinterStatus;
pub use registry::{AgentClaim, Claim, ClaimListener, Claimed, Instance};
pub use relay_proto::Secret;
pub use revocation::{RevocationEvent, RevocationWatcher, Revoked};
pub use store::{
    AgentAuthFailure, AgentCredential, ApiKey, Backend, Device, NewApiKey, Scope, Store, Tenant,
};
