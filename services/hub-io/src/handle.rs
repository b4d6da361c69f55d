//! A session's handle on its hub, and starting a hub: its driver is a
//! future for the caller to spawn (the edge tracks one per device, the
//! agent runs one for its printer).

use std::sync::Arc;
use std::time::Duration;

use relay_hub::TopicPolicy;
use relay_hub::{HubConfig, HubEnd, PacketExtras, PrinterIdentity, SessionAttach, SessionId};
use relay_proto::mqtt::Packet;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::activity::HubActivity;
use crate::driver::{self, Command, HubIo, HubMetrics, Upstream, UpstreamSource};
use crate::outbound::OutboundSender;

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
    /// Its traffic, counted by the driver.
    activity: Arc<HubActivity>,
}

impl HubHandle {
    pub fn policy(&self) -> &TopicPolicy {
        &self.policy
    }

    pub fn printer(&self) -> &PrinterIdentity {
        &self.printer
    }

    /// The hub's traffic: PUBLISHes each way in the last minute, and the
    /// printer's last.
    pub fn activity(&self) -> &HubActivity {
        &self.activity
    }

    /// Attaches a session; false when the hub has ended.
    pub async fn attach(&self, session: SessionId, attach: SessionAttach<OutboundSender>) -> bool {
        self.commands
            .send(Command::Attach {
                session,
                attach: Box::new(attach),
            })
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
                packet: Box::new(packet),
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

    /// Whether the hub has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Ends the hub from outside (replaced, its tunnel gone, a drain).
    pub fn end(&self) {
        self.ended.cancel();
    }
}

/// A hub over an upstream MQTT connection that is already past
/// CONNECT/CONNACK: its handle, and its driver, a future the caller spawns
/// (the handle sees the end once it returns). When the upstream ends, the
/// hub keeps its sessions for `grace` while `source` finds a new one; with
/// no source (or no grace) the hub ends with it.
pub fn start(
    upstream: Upstream,
    config: HubConfig,
    source: Option<UpstreamSource>,
    grace: Duration,
    metrics: HubMetrics,
) -> (
    HubHandle,
    impl std::future::Future<Output = HubEnd> + Send + 'static,
) {
    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    let ended = CancellationToken::new();
    let activity = Arc::new(HubActivity::new(std::time::Instant::now()));
    let handle = HubHandle {
        activity: activity.clone(),
        printer: config.printer.clone(),
        commands,
        policy: config.policy.clone(),
        ended: ended.clone(),
    };
    let io = HubIo {
        upstream,
        source,
        grace,
        commands: receiver,
        ended: ended.clone(),
        metrics,
        activity,
    };
    // A combinator, not an `async` block: a block would hold the driver's
    // future twice (as what it captured and as what it awaits), and every
    // hub's task pays its size.
    let driver = futures_util::FutureExt::map(driver::run(config, io), move |end| {
        ended.cancel();
        end
    });
    (handle, driver)
}
