//! What every connection of one edge process shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use relay_store::Authenticator;

use crate::config::EdgeConfig;
use crate::limiter::FailureLimiter;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct EdgeState {
    pub config: Arc<EdgeConfig>,
    pub authenticator: Authenticator,
    pub metrics: Metrics,
    pub failures: FailureLimiter,
    /// Set once the drain starts: `/readyz` fails from then on.
    draining: AtomicBool,
}

impl EdgeState {
    pub fn new(
        config: Arc<EdgeConfig>,
        authenticator: Authenticator,
        metrics: Metrics,
    ) -> EdgeState {
        let failures = FailureLimiter::new(config.auth.failures_per_ip_per_minute);
        EdgeState {
            config,
            authenticator,
            metrics,
            failures,
            draining: AtomicBool::new(false),
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
