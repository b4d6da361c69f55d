//! What every connection of one edge process shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::net::IpAddr;
use std::time::Instant;

use dashmap::DashMap;
use relay_store::{AuthFailure, Authenticator, Precheck, Principal, RequestCredentials};

use crate::close::Close;
use crate::config::EdgeConfig;
use crate::devices::Devices;
use crate::hub::{HubConfig, Hubs, OutboundSender, SessionId};
use crate::limiter::{AcceptedCredentials, FailureLimiter, LimitKey};
use crate::metrics::Metrics;
use crate::quotas::Quotas;

/// Tenant API requests one address may make per minute.
const API_REQUESTS_PER_MINUTE: u32 = 600;

/// Agent pairings one address may start per minute.
const PAIRINGS_PER_MINUTE: u32 = 10;

#[derive(Debug)]
pub struct EdgeState {
    pub config: Arc<EdgeConfig>,
    pub authenticator: Authenticator,
    pub metrics: Metrics,
    pub failures: Arc<FailureLimiter>,
    /// Tenant API requests per address and minute.
    pub api_requests: Arc<FailureLimiter>,
    /// Agent pairings started per address and minute.
    pub pairing_starts: Arc<FailureLimiter>,
    /// Owners' wrong pairing codes: per address, per tenant, and in total.
    pub pairing_guesses: crate::limiter::GuessLimits,
    /// The console's live status per tenant, with when it was made: open
    /// devices pages of one tenant share one look at the store a second.
    pub console_status: DashMap<String, (Instant, Arc<str>)>,
    /// The console's open message views, per tenant.
    pub console_watchers: DashMap<String, usize>,
    /// Sign-in with the operator's OpenID Connect provider, when set.
    pub oidc: Option<Arc<crate::oidc::Oidc>>,
    /// Failed agent HELLOs, per source address (counted) and per
    /// credential id (limited).
    pub agent_failures: Arc<FailureLimiter>,
    /// Agent credentials this instance accepted: they get in even when
    /// their id is being guessed.
    pub agents_accepted: AcceptedCredentials,
    pub hubs: Arc<Hubs>,
    /// Open sessions per key, device, tenant and address.
    pub quotas: Arc<Quotas>,
    /// Agents' tunnels, and hubs opened through them.
    pub devices: Devices,
    /// This instance among several on the store.
    pub membership: crate::cluster::Membership,
    /// The way to hubs on other instances, and theirs to ours.
    pub peers: Arc<crate::peer_link::Peers>,
    /// Connected sessions, so that a revocation can end them.
    pub live_sessions: Arc<DashMap<SessionId, LiveSession>>,
    /// Set once the drain starts: `/readyz` fails from then on.
    draining: AtomicBool,
}

impl EdgeState {
    pub fn new(
        config: Arc<EdgeConfig>,
        authenticator: Authenticator,
        metrics: Metrics,
    ) -> EdgeState {
        let api_requests = Arc::new(FailureLimiter::new(API_REQUESTS_PER_MINUTE));
        let failures = Arc::new(FailureLimiter::new(config.auth.failures_per_ip_per_minute));
        let agent_failures = Arc::new(FailureLimiter::new(
            config.auth.agent_failures_per_ip_per_minute,
        ));
        let hubs = Arc::new(Hubs::with_metrics(
            metrics.printer_bytes.clone(),
            metrics.hub_refusals.clone(),
            metrics.hub_upstream_resumes.clone(),
            metrics.hub_quarantined_filters.clone(),
            metrics.printer_silences.clone(),
        ));
        let tunnel = &config.tunnel;
        let membership = crate::cluster::Membership::new(&config.cluster);
        let peers = Arc::new(peers(&membership, &config, &metrics));
        let devices = Devices::new(
            hubs.clone(),
            HubConfig {
                linger: Some(std::time::Duration::from_secs(tunnel.linger_seconds)),
                upstream_keep_alive: std::time::Duration::from_secs(
                    tunnel.printer_keep_alive_seconds,
                ),
                ..HubConfig::new(tunnel.max_printer_packet)
            },
            config.printers.clone(),
            crate::devices::DeviceTiming {
                open_timeout: std::time::Duration::from_secs(tunnel.session_open_timeout_seconds),
                grace: std::time::Duration::from_secs(tunnel.upstream_grace_seconds),
            },
            authenticator.store().clone(),
            peers.clone(),
            metrics.tunnels_fenced.clone(),
        );
        let quotas = Arc::new(Quotas::new(config.quotas.clone()));
        let oidc = config.console.oidc.clone().and_then(|oidc| {
            crate::oidc::Oidc::new(oidc)
                .map(Arc::new)
                .map_err(
                    |error| tracing::error!(%error, "console sign-in with OpenID Connect is off"),
                )
                .ok()
        });
        EdgeState {
            config,
            authenticator,
            metrics,
            failures,
            api_requests,
            pairing_starts: Arc::new(FailureLimiter::new(PAIRINGS_PER_MINUTE)),
            pairing_guesses: crate::limiter::GuessLimits::default(),
            console_status: DashMap::new(),
            console_watchers: DashMap::new(),
            oidc,
            agent_failures,
            agents_accepted: AcceptedCredentials::default(),
            quotas,
            hubs,
            devices,
            membership,
            peers,
            live_sessions: Arc::default(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Authenticates a request from `peer_ip` for `device_id` (`None`: the
    /// Host named no device), through the failure limiter: a valid cached
    /// credential always gets in; a store lookup needs room in the windows
    /// of the address and of the key id. Failures are counted and logged.
    pub async fn authenticate(
        &self,
        device_id: Option<&str>,
        credentials: RequestCredentials<'_>,
        peer_ip: IpAddr,
    ) -> Result<Principal, Refusal> {
        let now = Instant::now();
        let mut keys = vec![LimitKey::Address(peer_ip)];
        let Some(device_id) = device_id else {
            self.failures.record_failure(&keys, now);
            return Err(self.refused(AuthFailure::UnknownDevice));
        };
        let key_id = match self.authenticator.precheck(device_id, credentials) {
            Precheck::Decided(Ok(principal)) => return Ok(principal),
            Precheck::Decided(Err(AuthFailure::Unavailable)) => {
                return Err(self.refused(AuthFailure::Unavailable));
            }
            Precheck::Decided(Err(failure)) => {
                self.failures.record_failure(&keys, now);
                return Err(self.refused(failure));
            }
            Precheck::Lookup { key_id } => key_id,
        };
        keys.extend(key_id.map(LimitKey::KeyId));
        let Some(attempt) = self.failures.begin(keys, now) else {
            self.count_auth_failure("rate_limited");
            return Err(Refusal::RateLimited);
        };
        match self
            .authenticator
            .authenticate(device_id, credentials)
            .await
        {
            Ok(principal) => Ok(principal),
            // Not the client's fault: its reservation is given back.
            Err(AuthFailure::Unavailable) => Err(self.refused(AuthFailure::Unavailable)),
            Err(failure) => {
                attempt.failed();
                Err(self.refused(failure))
            }
        }
    }

    /// Authenticates a client that named no device (an MQTT-over-TLS
    /// client that sent no SNI): the device is the one its API key is
    /// bound to. The lookup is a guess like any other, through the
    /// address's failure window.
    pub async fn authenticate_bound(
        &self,
        credentials: RequestCredentials<'_>,
        peer_ip: IpAddr,
    ) -> Result<(String, Principal), Refusal> {
        let now = Instant::now();
        let Some(attempt) = self.failures.begin(vec![LimitKey::Address(peer_ip)], now) else {
            self.count_auth_failure("rate_limited");
            return Err(Refusal::RateLimited);
        };
        match self.authenticator.bound_device(credentials).await {
            Ok(Some(device_id)) => {
                drop(attempt);
                let principal = self
                    .authenticate(Some(&device_id), credentials, peer_ip)
                    .await?;
                Ok((device_id, principal))
            }
            Ok(None) => {
                attempt.failed();
                self.count_auth_failure("no_device");
                tracing::info!("refused: no device named, and the key is not bound to one");
                Err(Refusal::NoDevice)
            }
            Err(AuthFailure::Unavailable) => Err(self.refused(AuthFailure::Unavailable)),
            Err(failure) => {
                attempt.failed();
                Err(self.refused(failure))
            }
        }
    }

    fn refused(&self, failure: AuthFailure) -> Refusal {
        self.count_auth_failure(failure.label());
        if failure != AuthFailure::Unavailable {
            tracing::info!(reason = failure.label(), "authentication failed");
        }
        Refusal::Auth(failure)
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

/// Why [`EdgeState::authenticate`] let a request not in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures from its address, or for its key id.
    RateLimited,
    Auth(AuthFailure),
    /// The client named no device (no SNI) and its key is not bound to
    /// one device.
    NoDevice,
}

/// A session past CONNACK.
#[derive(Debug)]
pub struct LiveSession {
    pub key_id: String,
    pub device_id: String,
    pub outbound: OutboundSender,
    /// What the console shows of it.
    pub client_id: String,
    /// `3.1`, `3.1.1` or `5`.
    pub mqtt_version: &'static str,
    /// `wss`, `mqtts` or `mqtt`.
    pub transport: &'static str,
    pub address: IpAddr,
    /// Unix milliseconds of its CONNACK.
    pub since: relay_store::Millis,
}

/// This instance's side of the peer links. Without a usable endpoint (no
/// cluster secret, or no UDP socket) it serves only local agents.
fn peers(
    membership: &crate::cluster::Membership,
    config: &EdgeConfig,
    metrics: &Metrics,
) -> crate::peer_link::Peers {
    let peer_metrics = crate::peer_link::PeerMetrics {
        bytes: metrics.peer_bytes.clone(),
        served: metrics.peer_links_served.clone(),
        refusals: metrics.peer_refusals.clone(),
        lookups: metrics.owner_lookups.clone(),
    };
    let secret = config.cluster.secret.clone();
    crate::peer_link::Peers::new(membership.instance_id.clone(), secret, peer_metrics.clone())
        .unwrap_or_else(|error| {
            tracing::error!(%error, "cannot dial peers; serving local agents only");
            crate::peer_link::Peers::new(
                membership.instance_id.clone(),
                relay_proto::Secret::new(String::new()),
                peer_metrics,
            )
            .unwrap_or_else(|_| unreachable_without_endpoint())
        })
}

// Without a secret no endpoint is made, so this cannot fail.
#[allow(clippy::panic)]
fn unreachable_without_endpoint() -> ! {
    panic!("peers without an endpoint cannot fail")
}

impl crate::cluster::LeaseHost for EdgeState {
    fn membership(&self) -> &crate::cluster::Membership {
        &self.membership
    }

    fn devices(&self) -> &Devices {
        &self.devices
    }

    fn leases(&self) -> &prometheus::IntCounterVec {
        &self.metrics.leases
    }
}
