//! The online devices of this edge and their hubs: starting a hub's driver
//! as a tracked task, finding it, ending it, and the handle sessions use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::Instrument;

use relay_hub::{HubConfig, SessionId};
use relay_hub_io::{HubHandle, HubMetrics, Upstream, UpstreamSource};

/// The online devices of this edge and their hubs.
#[derive(Debug, Default)]
pub struct Hubs {
    by_device: DashMap<String, HubHandle>,
    next_session: AtomicU64,
    /// What every hub's driver counts in.
    metrics: HubMetrics,
    /// Every hub's driver; the drain waits for them.
    drivers: TaskTracker,
}

impl Hubs {
    /// Hubs that count the bytes they exchange with their upstreams, and
    /// what they refuse.
    pub fn with_metrics(
        upstream_bytes: prometheus::IntCounterVec,
        refusals: prometheus::IntCounterVec,
        resumes: prometheus::IntCounter,
        quarantines: prometheus::IntCounter,
        silences: prometheus::IntCounterVec,
    ) -> Hubs {
        Hubs {
            metrics: HubMetrics {
                upstream_bytes: Some(upstream_bytes),
                refusals: Some(refusals),
                resumes: Some(resumes),
                quarantines: Some(quarantines),
                silences: Some(silences),
            },
            ..Hubs::default()
        }
    }

    /// The hub of a device, if it is online.
    pub fn get(&self, device_id: &str) -> Option<HubHandle> {
        self.by_device.get(device_id).map(|hub| hub.clone())
    }

    pub fn online_devices(&self) -> usize {
        self.by_device.len()
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts the hub of `device_id` over an upstream MQTT connection that
    /// is already past CONNECT/CONNACK. A hub that was there is replaced
    /// (its sessions end). When the upstream ends, the hub keeps its
    /// sessions for `grace` while `source` finds a new one; with no source
    /// (or no grace) the hub ends with it. The driver is a tracked task.
    pub fn start(
        self: &Arc<Self>,
        device_id: String,
        upstream: Upstream,
        config: HubConfig,
        source: Option<UpstreamSource>,
        grace: Duration,
    ) -> HubHandle {
        let (handle, driver) =
            relay_hub_io::start(upstream, config, source, grace, self.metrics.clone());
        if let Some(previous) = self.by_device.insert(device_id.clone(), handle.clone()) {
            previous.end();
        }
        let hubs = self.clone();
        let span = tracing::info_span!("hub", device = %device_id);
        // Mapped, not awaited in an `async` block, which would hold the
        // driver's future twice.
        self.drivers.spawn(
            futures_util::FutureExt::map(driver, move |end| {
                tracing::info!(%end, "device hub ended");
                hubs.by_device
                    .remove_if(&device_id, |_, current| current.has_ended());
            })
            .instrument(span),
        );
        handle
    }

    /// Ends the hub of `device_id`, if any (its tunnel is gone).
    pub fn end(&self, device_id: &str) {
        if let Some((_, hub)) = self.by_device.remove(device_id) {
            hub.end();
        }
    }

    /// Ends every hub and waits for their drivers (the drain's last step).
    pub async fn end_all(&self) {
        for hub in self.by_device.iter() {
            hub.end();
        }
        self.by_device.clear();
        self.drivers.close();
        self.drivers.wait().await;
    }
}
