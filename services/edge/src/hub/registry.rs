//! The online devices of this edge and their hubs: starting a hub's driver
//! as a tracked task, finding it, ending it, and the handle sessions use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use std::time::Duration;

use relay_proto::mqtt::Packet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::driver::{self, Command, HubIo, Upstream, UpstreamSource};
use super::outbound::OutboundSender;
use relay_hub::TopicPolicy;
use relay_hub::{HubConfig, PacketExtras, PrinterIdentity, SessionAttach, SessionId};

/// Commands queued per hub before senders wait: sessions are throttled by a
/// busy hub rather than queueing without bound.
const COMMAND_QUEUE: usize = 1024;

/// A session's handle on its device's hub.
#[derive(Debug, Clone)]
pub struct HubHandle {
    /// What the printer is.
    printer: PrinterIdentity,
    commands: mpsc::Sender<Command>,
    /// The device's topic policy, for checks a session makes before it
    /// attaches (its will).
    policy: Arc<TopicPolicy>,
    /// Cancelled when the hub ends (upstream lost, replaced, drained).
    ended: CancellationToken,
}

impl HubHandle {
    pub fn policy(&self) -> &TopicPolicy {
        &self.policy
    }

    pub fn printer(&self) -> &PrinterIdentity {
        &self.printer
    }

    /// Attaches a session; false when the hub has ended.
    pub async fn attach(&self, session: SessionId, attach: SessionAttach<OutboundSender>) -> bool {
        self.commands
            .send(Command::Attach { session, attach })
            .await
            .is_ok()
    }

    /// Hands the hub a client packet; false when the hub has ended.
    pub async fn client_packet(&self, session: SessionId, packet: Packet) -> bool {
        self.client_packet_with(session, packet, None).await
    }

    /// [`Self::client_packet`], with what an MQTT 5 client's packet adds.
    pub async fn client_packet_with(
        &self,
        session: SessionId,
        packet: Packet,
        extras: Option<Box<PacketExtras>>,
    ) -> bool {
        self.commands
            .send(Command::ClientPacket {
                session,
                packet,
                extras,
            })
            .await
            .is_ok()
    }

    /// The session is gone; `graceful` when its client sent DISCONNECT.
    pub async fn detach(&self, session: SessionId, graceful: bool) {
        let _ = self
            .commands
            .send(Command::Detach { session, graceful })
            .await;
    }

    /// The device's tunnel moved to `epoch` (or went, `u64::MAX`): the hub
    /// drops an upstream through an older one and finds the new one,
    /// keeping its sessions.
    pub fn upstream_moved(&self, epoch: u64) {
        let _ = self.commands.try_send(Command::UpstreamMoved { epoch });
    }

    /// Resolves when the hub has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }
}

/// Tells whether the way to the device (the agent's tunnel) still stands,
/// so that a lost upstream can be told apart: tunnel gone (1013, device
/// offline) or printer gone (1014).
pub type TunnelProbe = Arc<dyn Fn() -> bool + Send + Sync>;

/// The online devices of this edge and their hubs.
#[derive(Debug, Default)]
pub struct Hubs {
    by_device: DashMap<String, HubHandle>,
    next_session: AtomicU64,
    /// Bytes between hubs and their upstreams, by direction.
    upstream_bytes: Option<prometheus::IntCounterVec>,
    /// What hubs refused or cut (`HubCounters`), by what.
    refusals: Option<prometheus::IntCounterVec>,
    /// Hubs that found a new upstream within the grace.
    resumes: Option<prometheus::IntCounter>,
    /// Filters hubs quarantined.
    quarantines: Option<prometheus::IntCounter>,
    /// Printers hubs found silent, by watchdog.
    silences: Option<prometheus::IntCounterVec>,
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
            upstream_bytes: Some(upstream_bytes),
            refusals: Some(refusals),
            resumes: Some(resumes),
            quarantines: Some(quarantines),
            silences: Some(silences),
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
        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        let ended = CancellationToken::new();
        let handle = HubHandle {
            printer: config.printer.clone(),
            commands,
            policy: config.policy.clone(),
            ended: ended.clone(),
        };
        if let Some(previous) = self.by_device.insert(device_id.clone(), handle.clone()) {
            previous.ended.cancel();
        }
        let hubs = self.clone();
        let io = HubIo {
            upstream,
            source,
            grace,
            commands: receiver,
            ended: ended.clone(),
            byte_counter: self.upstream_bytes.clone(),
            refusals: self.refusals.clone(),
            resumes: self.resumes.clone(),
            quarantines: self.quarantines.clone(),
            silences: self.silences.clone(),
        };
        let span = tracing::info_span!("hub", device = %device_id);
        self.drivers.spawn(
            async move {
                let end = driver::run(config, io).await;
                tracing::info!(%end, "device hub ended");
                ended.cancel();
                hubs.by_device
                    .remove_if(&device_id, |_, current| current.ended.is_cancelled());
            }
            .instrument(span),
        );
        handle
    }

    /// Ends the hub of `device_id`, if any (its tunnel is gone).
    pub fn end(&self, device_id: &str) {
        if let Some((_, hub)) = self.by_device.remove(device_id) {
            hub.ended.cancel();
        }
    }

    /// Ends every hub and waits for their drivers (the drain's last step).
    pub async fn end_all(&self) {
        for hub in self.by_device.iter() {
            hub.ended.cancel();
        }
        self.by_device.clear();
        self.drivers.close();
        self.drivers.wait().await;
    }
}
