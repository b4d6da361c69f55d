//! The agent's local hub: the same `relay-hub` the edge runs, over the
//! printer's one connection, so that LAN apps ([`crate::lan`]) and the
//! edge's printer links share it. The edge's link is one subscriber here,
//! as a peer hub is one subscriber of its owner's hub: the printer sees one
//! connection and one SUBSCRIBE per filter, whoever asks, and a printer
//! message crosses the tunnel once.
//!
//! Between the hub and the printer runs the agent's packet check
//! (`crate::tunnel::relay_with_printer`): only well-formed client packets of the
//! printer's own topics reach it, a read-only agent drops PUBLISHes, and a
//! CC2 hears the agent's heartbeat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use relay_hub::state::RetainedReplay;
use relay_hub::{
    BambuProfile, Cc2Profile, HubConfig, PrinterIdentity, ProfileConfig, PublishRate, TopicPolicy,
};
use relay_hub_io::{HubHandle, HubMetrics, Upstream, UpstreamFailure, UpstreamSource};
use relay_proto::tunnel;
use tokio::io::AsyncWriteExt;

use crate::config::{PrinterConfig, PrinterKind};
use crate::pacing::{DialError, PrinterDialler};
use crate::printer::LinkFailure;
use crate::tunnel::relay_with_printer;

/// How long a hub with no session keeps the printer connection.
const LINGER: Duration = Duration::from_secs(30);

/// How long sessions wait for the printer to come back before they end.
const GRACE: Duration = Duration::from_secs(30);

/// How long a session (or the edge's link) waits for the printer's turn.
const DIAL_PATIENCE: Duration = Duration::from_secs(5);

/// Bytes in flight between the hub and the printer's packet check.
const PIPE_BYTES: usize = 64 * 1024;

/// The largest packet from the printer.
const MAX_PACKET: usize = 1 << 20;

/// What the local hub has seen, for the agent's log and `status`.
#[derive(Debug, Default)]
pub struct LocalStats {
    /// Printer connections made, in total.
    pub printer_connections: AtomicU64,
    /// Sessions on the hub now: LAN apps and the edge's links.
    pub lan_sessions: AtomicUsize,
    pub edge_links: AtomicUsize,
    /// LAN connections refused, in total.
    pub lan_refusals: AtomicU64,
    /// Bytes to and from LAN apps.
    pub lan_bytes_in: AtomicU64,
    pub lan_bytes_out: AtomicU64,
}

impl LocalStats {
    /// "the printer sees 1 client for N apps" (N: LAN apps, plus the
    /// edge's links).
    pub fn summary(&self, printer_up: bool) -> String {
        format!(
            "the printer sees {} client for {} LAN apps and {} edge links",
            usize::from(printer_up),
            self.lan_sessions.load(Ordering::Relaxed),
            self.edge_links.load(Ordering::Relaxed),
        )
    }
}

/// The hub over the printer's one connection, started when the first
/// session needs it and ended 30 s after the last session.
pub struct LocalHub {
    printer: Arc<PrinterConfig>,
    dialler: Arc<PrinterDialler>,
    read_only: bool,
    current: tokio::sync::Mutex<Option<HubHandle>>,
    next_session: AtomicU64,
    pub stats: Arc<LocalStats>,
}

impl std::fmt::Debug for LocalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHub").finish_non_exhaustive()
    }
}

impl LocalHub {
    pub fn new(
        printer: Arc<PrinterConfig>,
        dialler: Arc<PrinterDialler>,
        read_only: bool,
    ) -> Arc<LocalHub> {
        Arc::new(LocalHub {
            printer,
            dialler,
            read_only,
            current: tokio::sync::Mutex::new(None),
            next_session: AtomicU64::new(1),
            stats: Arc::new(LocalStats::default()),
        })
    }

    pub fn printer(&self) -> &PrinterConfig {
        &self.printer
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The running hub, or a new one over a new printer connection.
    pub async fn hub(self: &Arc<Self>) -> Result<HubHandle, LinkFailure> {
        let mut current = self.current.lock().await;
        if let Some(hub) = current.as_ref()
            && !hub.has_ended()
        {
            return Ok(hub.clone());
        }
        let upstream = self
            .open_upstream()
            .await
            .map_err(|DialError { failure, .. }| failure)?;
        let (hub, driver) = relay_hub_io::start(
            upstream,
            self.hub_config(),
            Some(self.upstream_source()),
            GRACE,
            HubMetrics::default(),
        );
        tokio::spawn(async move {
            let end = driver.await;
            tracing::info!(%end, "local hub ended");
        });
        *current = Some(hub.clone());
        Ok(hub)
    }

    /// Whether a hub holds the printer's connection now.
    pub async fn printer_up(&self) -> bool {
        self.current
            .lock()
            .await
            .as_ref()
            .is_some_and(|hub| !hub.has_ended())
    }

    /// What the edge's hub is told about the printer on a link.
    pub fn link_accept(&self, link: u64) -> tunnel::LinkAccept {
        let (kind, serial) = match &self.printer.kind {
            PrinterKind::Bambu { serial, .. } => (tunnel::PrinterKind::Bambu, Some(serial.clone())),
            PrinterKind::ElegooCc2 { serial, .. } => {
                (tunnel::PrinterKind::ElegooCc2, Some(serial.clone()))
            }
            PrinterKind::Mqtt { .. } => (tunnel::PrinterKind::GenericMqtt, None),
        };
        tunnel::LinkAccept {
            link,
            printer_kind: Some(kind),
            printer_serial: serial,
            // This hub sends requests on the agent's registration; the
            // edge's hub passes them on, as over a peer link.
            printer_client_id: None,
            through_agent_hub: true,
        }
    }

    fn hub_config(&self) -> HubConfig {
        let base = HubConfig {
            linger: Some(LINGER),
            ..HubConfig::new(MAX_PACKET)
        };
        let own = |allow: Vec<String>| {
            Arc::new(TopicPolicy {
                allow,
                deny: Vec::new(),
                retain: false,
            })
        };
        let printer_rate = PublishRate {
            per_second: 10,
            burst: 20,
            ..PublishRate::generic()
        };
        match &self.printer.kind {
            PrinterKind::Bambu { serial, .. } => HubConfig {
                replay_retained: RetainedReplay::WhenSeen,
                policy: own(vec![
                    format!("device/{serial}/report"),
                    format!("device/{serial}/request"),
                ]),
                publish_rate: printer_rate,
                profile: ProfileConfig::Bambu(BambuProfile::new(serial)),
                printer: PrinterIdentity {
                    kind: Some(tunnel::PrinterKind::Bambu),
                    serial: Some(serial.clone()),
                },
                ..base
            },
            PrinterKind::ElegooCc2 { serial, .. } => HubConfig {
                replay_retained: RetainedReplay::WhenSeen,
                policy: own(vec![format!("elegoo/{serial}/#")]),
                publish_rate: printer_rate,
                profile: ProfileConfig::Cc2(Cc2Profile {
                    first_request_id: first_request_id(),
                    ..Cc2Profile::new(serial, Some(self.printer.client_id.clone()))
                }),
                printer: PrinterIdentity {
                    kind: Some(tunnel::PrinterKind::ElegooCc2),
                    serial: Some(serial.clone()),
                },
                ..base
            },
            PrinterKind::Mqtt { .. } => HubConfig {
                policy: Arc::new(TopicPolicy::generic()),
                printer: PrinterIdentity {
                    kind: Some(tunnel::PrinterKind::GenericMqtt),
                    serial: None,
                },
                ..base
            },
        }
    }

    fn upstream_source(self: &Arc<Self>) -> UpstreamSource {
        let local = Arc::downgrade(self);
        Arc::new(move |silence| {
            let local = local.clone();
            Box::pin(async move {
                if let Some(silence) = silence {
                    tracing::warn!(%silence, "the printer went silent: connecting again");
                }
                let Some(local) = local.upgrade() else {
                    return Err(UpstreamFailure {
                        close: relay_hub::Close::draining(),
                        retry_after: Duration::from_secs(1),
                    });
                };
                local
                    .open_upstream()
                    .await
                    .map_err(|error| UpstreamFailure {
                        close: relay_hub::Close::printer_unreachable(&error.failure.detail),
                        retry_after: Duration::from_secs(1),
                    })
            })
        })
    }

    /// A new printer connection, through the agent's packet check, as the
    /// hub's upstream.
    async fn open_upstream(&self) -> Result<Upstream, DialError> {
        let (stream, leftover) = self.dialler.dial(&self.printer, DIAL_PATIENCE).await?;
        self.stats
            .printer_connections
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!("printer connected for the local hub");
        let (hub_side, check_side) = tokio::io::duplex(PIPE_BYTES);
        let printer = self.printer.clone();
        let dialler = self.dialler.clone();
        let read_only = self.read_only;
        tokio::spawn(async move {
            let connected_at = Instant::now();
            let (mut from_hub, mut to_hub) = tokio::io::split(check_side);
            let outcome = relay_with_printer(
                &mut from_hub,
                &mut to_hub,
                bytes::BytesMut::new(),
                (stream, leftover),
                &printer,
                read_only,
            )
            .await;
            tracing::info!(?outcome, "printer connection of the local hub closed");
            dialler.ended(connected_at.elapsed(), outcome.by_printer());
        });
        let (hub_read, hub_write) = tokio::io::split(hub_side);
        Ok(Upstream::from_halves(hub_read, hub_write))
    }
}

/// Where a new CC2 hub starts its request ids: apart from a previous
/// hub's, whose replies may still be on their way.
fn first_request_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    1 + nanos % (i32::MAX as u32 / 2)
}

/// Bytes queued for the edge's link before it counts as a slow consumer
/// (it carries every cloud app's messages).
const EDGE_LINK_OUTBOUND: usize = 8 * 1024 * 1024;

/// Serves one of the edge's printer links as one session of the local
/// hub, as a peer hub is served: the edge's hub sends SUBSCRIBE, PUBLISH,
/// PUBACK and PINGREQ as to a printer, and gets the printer's messages.
/// Returns when either side ends; `true` when the edge let the link go.
pub async fn serve_edge_link<R, W>(
    hub: &HubHandle,
    session: u64,
    recv: &mut relay_io::FramedReader<R>,
    send: &mut W,
    stats: &LocalStats,
) -> bool
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use relay_hub::SessionAttach;
    use relay_hub_io::{Outbound, outbound_queue};
    use relay_proto::mqtt::Packet;

    let (outbound, mut receiver, ended) = outbound_queue(EDGE_LINK_OUTBOUND);
    let attach = SessionAttach {
        sink: outbound.clone(),
        client_id: String::new(),
        will: None,
        max_subscriptions: 100_000,
        max_unacknowledged: 60_000,
        peer: true,
        mqtt5: false,
    };
    if !hub.attach(session, attach).await {
        return false;
    }
    stats.edge_links.fetch_add(1, Ordering::Relaxed);
    let mut let_go = false;
    {
        let reader = async {
            loop {
                match recv.read_packet(MAX_PACKET).await {
                    Ok(Some(Packet::PingReq)) => {
                        outbound.send_packet(&Packet::PingResp);
                    }
                    Ok(Some(Packet::Disconnect)) => {
                        let_go = true;
                        return;
                    }
                    Ok(Some(
                        packet @ (Packet::Subscribe(_)
                        | Packet::Unsubscribe(_)
                        | Packet::Publish(_)
                        | Packet::PubAck(_)),
                    )) => {
                        if !hub.client_packet(session, packet).await {
                            return;
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(packet = %other.packet_type(), "the edge sent what a client may not: link closed");
                        return;
                    }
                    Ok(None) => {
                        let_go = true;
                        return;
                    }
                    Err(_) => return,
                }
            }
        };
        let writer = async {
            while let Some(item) = receiver.recv().await {
                match item {
                    Outbound::Bytes(bytes) | Outbound::Direct(bytes) => {
                        if send.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Outbound::Refusal(_) | Outbound::Publish5(_) | Outbound::Flush => {}
                    Outbound::Close(_) => return,
                }
            }
        };
        tokio::select! {
            () = reader => {}
            () = writer => {}
            () = ended.cancelled() => {}
            () = hub.ended() => {}
        }
    }
    hub.detach(session, let_go).await;
    stats.edge_links.fetch_sub(1, Ordering::Relaxed);
    let_go
}
