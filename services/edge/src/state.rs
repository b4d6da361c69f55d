//! What every connection of one edge process shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use relay_store::Authenticator;

use crate::close::Close;
use crate::config::EdgeConfig;
use crate::devices::Devices;
use crate::hub::{HubConfig, Hubs, OutboundSender, SessionId};
use crate::limiter::FailureLimiter;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct EdgeState {
    pub config: Arc<EdgeConfig>,
    pub authenticator: Authenticator,
    pub metrics: Metrics,
    pub failures: FailureLimiter,
    pub hubs: Arc<Hubs>,
    /// Agents' tunnels, and hubs opened through them.
    pub devices: Devices,
    /// Connected sessions, so that a revocation can end them.
    pub live_sessions: DashMap<SessionId, LiveSession>,
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
        let hubs = Arc::new(Hubs::with_metrics(
            metrics.printer_bytes.clone(),
            metrics.hub_refusals.clone(),
        ));
        let tunnel = &config.tunnel;
        let devices = Devices::new(
            hubs.clone(),
            HubConfig {
                linger: Some(std::time::Duration::from_secs(tunnel.linger_seconds)),
                ..HubConfig::new(tunnel.max_printer_packet)
            },
            config.printers.clone(),
            std::time::Duration::from_secs(tunnel.session_open_timeout_seconds),
        );
        EdgeState {
            config,
            authenticator,
            metrics,
            failures,
            hubs,
            devices,
            live_sessions: DashMap::new(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn count_auth_failure(&self, reason: &str) {
        self.metrics
            .auth_failures
            .with_label_values(&[reason])
            .inc();
    }

    /// Ends every connected session that `matches`, with `close`.
    pub fn end_sessions(&self, matches: impl Fn(&LiveSession) -> bool, close: &Close) -> usize {
        let mut ended = 0;
        for session in self.live_sessions.iter() {
            if matches(session.value()) {
                session.outbound.end(close.clone());
                ended += 1;
            }
        }
        ended
    }
}

/// A session past CONNACK.
#[derive(Debug)]
pub struct LiveSession {
    pub key_id: String,
    pub device_id: String,
    pub outbound: OutboundSender,
}
