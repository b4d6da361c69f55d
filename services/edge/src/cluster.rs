//! This instance among several edge instances on one store: its lease,
//! renewed every few seconds, and the claims it holds. A claim another
//! instance made (announced by NOTIFY, or found by the periodic check)
//! fences the stale local tunnel with GO_AWAY superseded; an instance that
//! cannot renew its lease for the lease's length fences itself: it sends
//! its agents away, fails readiness and refuses HELLOs until it renews.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_store::{ClaimListener, Store};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::devices::Devices;

/// Who this instance is, and whether it may serve its claims.
#[derive(Debug)]
pub struct Membership {
    pub instance_id: String,
    /// Where peers reach this instance; set once the peer listener is
    /// bound when the configuration leaves it empty.
    peer_address: std::sync::RwLock<String>,
    lease: Duration,
    renew: Duration,
    /// True while the lease is lost.
    fenced: watch::Sender<bool>,
}

impl Membership {
    pub fn new(config: &ClusterConfig) -> Membership {
        let instance_id = if config.instance_id.is_empty() {
            let suffix = relay_store::credential::random_base32(8)
                .unwrap_or_else(|_| format!("{:x}", std::process::id()));
            format!("edge-{suffix}")
        } else {
            config.instance_id.clone()
        };
        Membership {
            instance_id,
            peer_address: std::sync::RwLock::new(config.peer_address.clone()),
            lease: Duration::from_secs(config.lease_seconds),
            renew: Duration::from_secs(config.renew_seconds),
            fenced: watch::Sender::new(false),
        }
    }

    pub fn peer_address(&self) -> String {
        self.peer_address
            .read()
            .map(|address| address.clone())
            .unwrap_or_default()
    }

    /// Advertises the peer listener's bound address, unless one is
    /// configured.
    pub fn bound_peer_listener(&self, bound: std::net::SocketAddr) {
        if let Ok(mut address) = self.peer_address.write()
            && address.is_empty()
        {
            *address = bound.to_string();
        }
    }

    /// Renews (or takes) this instance's lease in `store`.
    pub async fn renew(&self, store: &Store) -> Result<i64, relay_store::StoreError> {
        store
            .renew_instance_lease(&self.instance_id, &self.peer_address(), self.lease_millis())
            .await
    }

    /// Whether this instance lost its lease and fenced itself.
    pub fn is_fenced(&self) -> bool {
        *self.fenced.borrow()
    }

    /// Waits until this instance is fenced (`true`) or serving (`false`).
    pub async fn wait_fenced(&self, fenced: bool) {
        let mut changes = self.fenced.subscribe();
        let _ = changes.wait_for(|now| *now == fenced).await;
    }

    /// Sets the fenced state; returns the previous one.
    fn set_fenced(&self, fenced: bool) -> bool {
        self.fenced.send_replace(fenced)
    }

    fn lease_millis(&self) -> i64 {
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Renews the lease and keeps the claims true until `stop`; ends the lease
/// when stopped.
/// What the lease loop reaches: this instance's membership, its devices'
/// tunnels (to fence) and the lease counter. The edge's shared state
/// provides it; the cluster layer does not know that state.
pub trait LeaseHost: Send + Sync + 'static {
    fn membership(&self) -> &Membership;
    fn devices(&self) -> &Devices;
    /// `relay_edge_instance_leases_total{outcome}`.
    fn leases(&self) -> &prometheus::IntCounterVec;
}

pub async fn run<H: LeaseHost>(state: Arc<H>, store: Store, stop: CancellationToken) {
    let membership = state.membership();
    let mut listener = start_listener(&store).await;
    let mut renew = tokio::time::interval(membership.renew);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed_at = Instant::now();
    let mut checks = ClaimChecks::default();
    loop {
        tokio::select! {
            _ = renew.tick() => {
                // Local tunnels before the query: one registered after it
                // may be newer than what the query saw.
                let local = state.devices().tunnel_epochs();
                match membership.renew(&store).await {
                    Ok(_) => {
                        renewed_at = Instant::now();
                        state.leases().with_label_values(&["renewed"]).inc();
                        if membership.set_fenced(false) {
                            tracing::info!(instance = %membership.instance_id, "lease renewed again: serving");
                        }
                        checks.check(state.as_ref(), &store, local).await;
                        if listener.is_none() {
                            listener = start_listener(&store).await;
                        }
                    }
                    Err(error) => {
                        state.leases().with_label_values(&["failed"]).inc();
                        tracing::warn!(%error, "cannot renew this instance's lease");
                        if renewed_at.elapsed() >= membership.lease
                            && !membership.set_fenced(true)
                        {
                            state.leases().with_label_values(&["lost"]).inc();
                            tracing::error!(instance = %membership.instance_id, "lease lost: fencing this instance (its agents are sent away)");
                            state.devices().fence_all();
                        }
                    }
                }
            }
            claimed = next_claim(&mut listener) => match claimed {
                Ok(claimed) => {
                    if claimed.instance_id != membership.instance_id {
                        state.devices().claimed_elsewhere(&claimed.device_id, claimed.epoch);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "lost the claim announcements; the periodic check covers them");
                    listener = None;
                }
            },
            _ = stop.cancelled() => break,
        }
    }
    if let Err(error) = store.end_instance_lease(&membership.instance_id).await {
        tracing::warn!(%error, "cannot end this instance's lease; it runs out by itself");
    }
}

async fn start_listener(store: &Store) -> Option<ClaimListener> {
    match ClaimListener::start(store).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for claims; the periodic check covers them");
            None
        }
    }
}

async fn next_claim(
    listener: &mut Option<ClaimListener>,
) -> Result<relay_store::Claimed, relay_store::StoreError> {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}

/// A full listing of this instance's claims every this many renewals (a
/// minute at the default 3 s); in between, only the claims other instances
/// made since the last check, which are usually none. With tens of
/// thousands of tunnels, listing them all at every renewal was most of an
/// idle edge's work.
const FULL_CHECK_EVERY: u32 = 20;

/// The periodic check of this instance's claims, behind the NOTIFY
/// announcements (which may be missed while the LISTEN connection is down).
#[derive(Debug, Default)]
struct ClaimChecks {
    renewals: u32,
    /// When the last check started, by the store's clock.
    last: Option<relay_store::Millis>,
    /// What the last recent-claims check found (the look-back overlaps,
    /// and each claim needs acting on once).
    seen: HashSet<(String, u64)>,
}

impl ClaimChecks {
    async fn check<H: LeaseHost>(&mut self, state: &H, store: &Store, local: Vec<(String, u64)>) {
        let started = store.now();
        let full = self.renewals.is_multiple_of(FULL_CHECK_EVERY);
        let done = match self.last {
            // Other instances' clocks may lag ours: look back a lease more.
            Some(last) if !full => {
                let lease = i64::try_from(state.membership().lease.as_millis()).unwrap_or(i64::MAX);
                recent_claims(state, store, last.saturating_sub(lease), &mut self.seen).await
            }
            _ => all_claims(state, store, local).await,
        };
        if done {
            self.renewals = self.renewals.wrapping_add(1);
            self.last = Some(started);
        }
    }
}

/// Fences the local tunnels of devices other instances claimed since
/// `since`. False when the store could not answer.
async fn recent_claims<H: LeaseHost>(
    state: &H,
    store: &Store,
    since: relay_store::Millis,
    seen: &mut HashSet<(String, u64)>,
) -> bool {
    match store
        .claims_since(since, &state.membership().instance_id)
        .await
    {
        Ok(claims) => {
            let mut found = HashSet::with_capacity(claims.len());
            for claimed in claims {
                let key = (claimed.device_id, claimed.epoch);
                if !seen.contains(&key) {
                    state.devices().claimed_elsewhere(&key.0, key.1);
                }
                found.insert(key);
            }
            *seen = found;
            true
        }
        Err(error) => {
            tracing::warn!(%error, "cannot check this instance's claims");
            false
        }
    }
}

/// Fences every local tunnel (of those in `local`) whose claim this
/// instance no longer holds in the store. False when the store could not
/// answer.
async fn all_claims<H: LeaseHost>(state: &H, store: &Store, local: Vec<(String, u64)>) -> bool {
    if local.is_empty() {
        return true;
    }
    let held: HashSet<(String, u64)> = match store.claims_of(&state.membership().instance_id).await
    {
        Ok(claims) => claims.into_iter().collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot check this instance's claims");
            return false;
        }
    };
    for (device_id, epoch) in local {
        if !held.contains(&(device_id.clone(), epoch)) {
            state.devices().fence_older(&device_id, epoch + 1);
        }
    }
    true
}
