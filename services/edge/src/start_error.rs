//! Why the edge could not start: what `main` reports before exiting.

use std::net::SocketAddr;

use crate::tls::TlsError;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigProblems),
    #[error("store: {0}")]
    Store(#[from] relay_store::StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("JWKS: {0}")]
    Jwks(#[from] relay_store::jwt::JwksError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}
