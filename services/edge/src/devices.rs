//! Which devices are reachable: the agents' tunnels, one per device, and
//! bringing a device's hub up on its first client.

use relay_io::transport::TunnelConnection;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use bytes::BytesMut;
use dashmap::DashMap;
use relay_io::FramedReader;
use relay_proto::tunnel::{self, LinkAccept, LinkDownReason, LinkOpen, Message, PrinterKind};
use tokio::sync::{Mutex, Notify, mpsc};

use relay_proto::tunnel::{GoAway, GoAwayReason};
use relay_store::Store;

use crate::close::Close;
use crate::config::PrintersConfig;
use crate::hub::{
    BambuProfile, Cc2Profile, HubConfig, HubHandle, Hubs, PrinterIdentity, ProfileConfig,
    RetainedReplay, Silence, TunnelProbe, Upstream, UpstreamFailure, UpstreamSource,
};
use crate::peer_link::Peers;

/// An agent's live tunnel.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub epoch: u64,
    /// The id of the agent credential it said HELLO with.
    pub credential_id: String,
    pub connection: TunnelConnection,
    /// What the agent said it is in its HELLO (free text, for people).
    pub agent_version: Option<String>,
    /// Unix milliseconds of the HELLO.
    pub connected_at: u64,
    /// GO_AWAYs for the agent's control stream (a queue of small values:
    /// one is allocated per tunnel).
    pub control: mpsc::Sender<GoAway>,
}

pub use crate::hub::Unavailable;

/// Tunnels by device, and the way from a tunnel to a hub. Cloning shares
/// the table (a hub's upstream source holds one).
#[derive(Debug, Clone)]
pub struct Devices {
    table: Arc<DeviceTable>,
}

/// What every clone of [`Devices`] shares.
#[derive(Debug)]
pub struct DeviceTable {
    tunnels: DashMap<String, Tunnel>,
    /// When a device's tunnel last went away: a client arriving within the
    /// grace waits for the agent instead of being refused at once.
    gone_at: DashMap<String, Instant>,
    hubs: Arc<Hubs>,
    /// One hub opening at a time per device.
    opening: DashMap<String, Arc<Mutex<()>>>,
    next_link: AtomicU64,
    registered: Notify,
    unregistered: Notify,
    limits: HubConfig,
    printers: PrintersConfig,
    open_timeout: Duration,
    /// How long a hub keeps its sessions for a new upstream.
    grace: Duration,
    /// The registry: when a device was last served, by any instance.
    store: Store,
    /// The way to hubs on other instances.
    peers: Arc<Peers>,
    fenced: prometheus::IntCounter,
}

/// How long a hub's search for a new upstream waits for a tunnel before it
/// reports the device offline (and looks again).
const TUNNEL_RECHECK: Duration = Duration::from_secs(1);

/// Past this many, devices gone longer than the grace are forgotten.
const MAX_GONE_REMEMBERED: usize = 100_000;

/// How long a device's hub waits.
#[derive(Debug, Clone, Copy)]
pub struct DeviceTiming {
    /// For the agent to answer LINK_OPEN (its printer connection).
    pub open_timeout: Duration,
    /// For a new upstream, keeping its sessions.
    pub grace: Duration,
}

impl std::ops::Deref for Devices {
    type Target = DeviceTable;
    fn deref(&self) -> &DeviceTable {
        &self.table
    }
}

impl Devices {
    pub fn new(
        hubs: Arc<Hubs>,
        limits: HubConfig,
        printers: PrintersConfig,
        timing: DeviceTiming,
        store: Store,
        peers: Arc<Peers>,
        fenced: prometheus::IntCounter,
    ) -> Devices {
        let DeviceTiming {
            open_timeout,
            grace,
        } = timing;
        Devices {
            table: Arc::new(DeviceTable {
                tunnels: DashMap::new(),
                gone_at: DashMap::new(),
                hubs,
                opening: DashMap::new(),
                next_link: AtomicU64::new(1),
                registered: Notify::new(),
                unregistered: Notify::new(),
                limits,
                printers,
                open_timeout,
                grace,
                store,
                peers,
                fenced,
            }),
        }
    }

    pub fn hubs(&self) -> &Arc<Hubs> {
        &self.hubs
    }

    /// Registers a new tunnel for `device_id` at `epoch` (its claim in the
    /// store); returns the tunnel it replaced (to be told to go away). The
    /// device's hub moves to the new tunnel, keeping its sessions.
    pub fn register(
        &self,
        device_id: &str,
        epoch: u64,
        credential_id: &str,
        connection: TunnelConnection,
        agent_version: Option<String>,
        control: mpsc::Sender<GoAway>,
    ) -> Option<Tunnel> {
        let connected_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let previous = self.tunnels.insert(
            device_id.to_owned(),
            Tunnel {
                epoch,
                credential_id: credential_id.to_owned(),
                connection,
                agent_version,
                connected_at,
                control,
            },
        );
        self.gone_at.remove(device_id);
        if previous.is_some()
            && let Some(hub) = self.hubs.get(device_id)
        {
            // The old tunnel's printer link goes with it.
            hub.upstream_moved(epoch);
        }
        self.registered.notify_waiters();
        previous
    }

    /// Ends the tunnels that said HELLO with the agent credential
    /// `credential_id` (it was revoked or rotated): their connections close
    /// with REFUSED, and their agents' next HELLO is refused. Returns how
    /// many there were.
    pub fn end_revoked(&self, credential_id: &str) -> usize {
        let revoked: Vec<Tunnel> = self
            .tunnels
            .iter()
            .filter(|entry| entry.credential_id == credential_id)
            .map(|entry| entry.value().clone())
            .collect();
        for tunnel in &revoked {
            tracing::info!(
                epoch = tunnel.epoch,
                "agent credential revoked: ending its tunnel"
            );
            tunnel
                .connection
                .close(tunnel::close_code::REFUSED, b"agent credential revoked");
        }
        revoked.len()
    }

    /// Every local tunnel's device and epoch.
    pub fn tunnel_epochs(&self) -> Vec<(String, u64)> {
        self.tunnels
            .iter()
            .map(|entry| (entry.key().clone(), entry.epoch))
            .collect()
    }

    /// Another instance claimed `device_id` at `epoch`: a local tunnel of
    /// an older epoch is sent away (GO_AWAY superseded). True when one was.
    pub fn fence_older(&self, device_id: &str, epoch: u64) -> bool {
        let Some(tunnel) = self.tunnels.get(device_id).map(|t| t.clone()) else {
            return false;
        };
        if tunnel.epoch >= epoch {
            return false;
        }
        tracing::info!(device = %device_id, old_epoch = tunnel.epoch, epoch, "claimed by another instance: fencing the local tunnel");
        self.fenced.inc();
        let _ = tunnel.control.try_send(superseded());
        true
    }

    /// Another instance claimed `device_id` at `epoch`: a stale local tunnel
    /// is fenced, the cached owner forgotten, and a local hub whose
    /// upstream goes through an older claim moves to the new owner now.
    pub fn claimed_elsewhere(&self, device_id: &str, epoch: u64) {
        self.fence_older(device_id, epoch);
        self.peers.forget_owner(device_id);
        if let Some(hub) = self.hubs.get(device_id) {
            hub.upstream_moved(epoch);
        }
    }

    /// Sends every local tunnel away (this instance lost its lease): as a
    /// drain does, so that the agents come back soon, to an instance that
    /// holds its lease (or to this one once it renews).
    pub fn fence_all(&self) {
        for tunnel in self.tunnels() {
            self.fenced.inc();
            let _ = tunnel.control.try_send(GoAway {
                reason: GoAwayReason::Draining,
                reconnect_after_ms: Some(1_000),
            });
        }
    }

    /// Removes the tunnel of `device_id` if it is still the one of `epoch`.
    /// Its hub keeps its sessions for the grace, waiting for the agent.
    pub fn unregister(&self, device_id: &str, epoch: u64) {
        if self
            .tunnels
            .remove_if(device_id, |_, tunnel| tunnel.epoch == epoch)
            .is_some()
        {
            let now = Instant::now();
            if self.gone_at.len() >= MAX_GONE_REMEMBERED {
                let grace = self.grace;
                self.gone_at
                    .retain(|_, gone| now.saturating_duration_since(*gone) < grace);
            }
            self.gone_at.insert(device_id.to_owned(), now);
            if let Some(hub) = self.hubs.get(device_id) {
                hub.upstream_moved(u64::MAX);
            }
            self.unregistered.notify_waiters();
        }
    }
    /// Waits until `device_id` has no tunnel.
    pub async fn wait_offline(&self, device_id: &str) {
        loop {
            let unregistered = self.unregistered.notified();
            if !self.is_online(device_id) {
                return;
            }
            unregistered.await;
        }
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.tunnels.contains_key(device_id)
    }

    pub fn online_count(&self) -> usize {
        self.tunnels.len()
    }

    /// The epoch of `device_id`'s tunnel, if it has one.
    pub fn tunnel_epoch(&self, device_id: &str) -> Option<u64> {
        self.tunnels.get(device_id).map(|tunnel| tunnel.epoch)
    }

    /// Waits until `device_id` has a tunnel newer than `after_epoch` (0: any).
    pub async fn wait_online(&self, device_id: &str, after_epoch: u64) -> u64 {
        loop {
            let registered = self.registered.notified();
            if let Some(epoch) = self
                .tunnel_epoch(device_id)
                .filter(|epoch| *epoch > after_epoch)
            {
                return epoch;
            }
            registered.await;
        }
    }

    /// The tunnel of `device_id`, if its agent is here.
    pub fn tunnel(&self, device_id: &str) -> Option<Tunnel> {
        self.tunnels
            .get(device_id)
            .map(|tunnel| tunnel.value().clone())
    }

    /// Every tunnel (for the drain's GO_AWAY).
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels
            .iter()
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// How long a client of `device_id` may wait for its agent: what is
    /// left of the grace since the device was last served, here or (the
    /// registry says) on any instance, as after a restart.
    async fn wait_for_agent(&self, device_id: &str) -> Option<Duration> {
        let left = |since: Duration| self.grace.checked_sub(since).filter(|left| !left.is_zero());
        if let Some(gone) = self.gone_at.get(device_id).map(|gone| *gone) {
            return left(gone.elapsed());
        }
        let claim = self.store.device_claim(device_id).await.ok()??;
        let now = self.store.now();
        let since = now.saturating_sub(claim.last_served(now));
        left(Duration::from_millis(u64::try_from(since).unwrap_or(0)))
    }

    /// The hub of `device_id`: this instance's, with its upstream the
    /// printer link through the local tunnel, or a peer link to the hub of
    /// the instance that holds the agent. A device served within the grace
    /// (here or, the registry says, anywhere) is waited for, up to the
    /// grace's end.
    pub async fn hub_for(&self, device_id: &str) -> Result<HubHandle, Unavailable> {
        if let Some(hub) = self.hubs.get(device_id) {
            return Ok(hub);
        }
        let lock = self
            .opening
            .entry(device_id.to_owned())
            .or_default()
            .clone();
        let _opening = lock.lock().await;
        if let Some(hub) = self.hubs.get(device_id) {
            return Ok(hub);
        }
        let (upstream, accept) = match self.open_upstream(device_id).await {
            Ok(opened) => opened,
            Err(Unavailable::Offline) => {
                let wait = self
                    .wait_for_agent(device_id)
                    .await
                    .ok_or(Unavailable::Offline)?;
                tokio::time::timeout(wait, self.wait_online(device_id, 0))
                    .await
                    .map_err(|_| Unavailable::Offline)?;
                self.open_upstream(device_id).await?
            }
            Err(printer) => return Err(printer),
        };
        Ok(self.start_hub(device_id, upstream, &accept))
    }

    /// The hub of `device_id` only if its agent is on this instance (a
    /// peer link asks for it), with what its printer is.
    pub async fn local_hub_for(
        &self,
        device_id: &str,
    ) -> Result<(HubHandle, PrinterIdentity), Unavailable> {
        if let Some(hub) = self.hubs.get(device_id)
            && self.is_online(device_id)
        {
            let printer = hub.printer().clone();
            return Ok((hub, printer));
        }
        let lock = self
            .opening
            .entry(device_id.to_owned())
            .or_default()
            .clone();
        let _opening = lock.lock().await;
        if !self.is_online(device_id) {
            return Err(Unavailable::Offline);
        }
        let hub = match self.hubs.get(device_id) {
            Some(hub) => hub,
            None => {
                let (upstream, accept) = self.open_link(device_id).await?;
                self.start_hub(device_id, upstream, &accept)
            }
        };
        let printer = hub.printer().clone();
        Ok((hub, printer))
    }

    /// A new upstream for `device_id`: the printer link through the local
    /// tunnel, else a peer link to the owning instance.
    async fn open_upstream(&self, device_id: &str) -> Result<(Upstream, LinkAccept), Unavailable> {
        if self.is_online(device_id) {
            self.peers
                .metrics()
                .lookups
                .with_label_values(&["local"])
                .inc();
            return self.open_link(device_id).await;
        }
        let Some(owner) = self.peers.owner_of(&self.store, device_id).await else {
            return Err(Unavailable::Offline);
        };
        self.peers
            .open_link(&owner, device_id, self.limits.max_upstream_packet)
            .await
    }

    fn start_hub(&self, device_id: &str, upstream: Upstream, accept: &LinkAccept) -> HubHandle {
        let (replay_retained, printer) = match accept.printer_kind {
            Some(PrinterKind::Bambu) => (RetainedReplay::WhenSeen, &self.printers.bambu),
            Some(PrinterKind::ElegooCc2) => (RetainedReplay::WhenSeen, &self.printers.elegoo_cc2),
            _ => (RetainedReplay::Always, &self.printers.mqtt),
        };
        let config = HubConfig {
            replay_retained,
            policy: Arc::new(printer.policy(accept.printer_serial.as_deref())),
            churn: printer.churn(),
            quarantine: printer.quarantine(),
            publish_rate: printer.publish_rate(),
            profile: match (accept.printer_kind, &accept.printer_serial) {
                (Some(PrinterKind::Bambu), Some(serial)) => ProfileConfig::Bambu(BambuProfile {
                    pushall_interval: Duration::from_secs(printer.pushall_interval_seconds),
                    report_silence: Duration::from_secs(printer.report_silence_seconds),
                    pushall_answer: Duration::from_secs(printer.pushall_answer_seconds),
                    ..BambuProfile::new(serial)
                }),
                (Some(PrinterKind::ElegooCc2), Some(serial)) => ProfileConfig::Cc2(Cc2Profile {
                    request_interval: Duration::from_millis(printer.request_interval_ms),
                    first_request_id: first_request_id(),
                    ..Cc2Profile::new(serial, accept.printer_client_id.clone())
                }),
                _ => ProfileConfig::Generic,
            },
            printer: PrinterIdentity {
                kind: accept.printer_kind,
                serial: accept.printer_serial.clone(),
            },
            ..self.limits.clone()
        };
        self.hubs.start(
            device_id.to_owned(),
            upstream,
            config,
            Some(self.upstream_source(device_id)),
            self.grace,
        )
    }

    /// Where the hub of `device_id` finds a new upstream: the printer link
    /// through whichever tunnel serves the device by then, here or on
    /// another instance. The printer's kind is the one the hub started with.
    fn upstream_source(&self, device_id: &str) -> UpstreamSource {
        let devices = self.clone();
        let device_id = device_id.to_owned();
        Arc::new(move |silence: Option<Silence>| {
            let devices = devices.clone();
            let device_id = device_id.clone();
            Box::pin(async move {
                if let Some(silence) = silence {
                    devices.record_silence(&device_id, silence).await;
                }
                devices.reopen(&device_id).await
            })
        })
    }

    /// Notes in the store that the device's printer went silent, for
    /// `relayctl device show` (bounded: a slow store does not hold up the
    /// reconnect).
    async fn record_silence(&self, device_id: &str, silence: Silence) {
        let watchdog = match silence {
            Silence::NoPingResp => "pingresp",
            Silence::NoReport => "report",
            Silence::NoPong => "pong",
            Silence::NoStatus => "status",
        };
        let detail = silence.to_string();
        let record = self
            .store
            .record_printer_silent(device_id, watchdog, &detail);
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), record).await {
            tracing::warn!(device = %device_id, %error, "cannot record the printer's silence");
        }
    }

    async fn reopen(&self, device_id: &str) -> Result<Upstream, UpstreamFailure> {
        let opened = match self.open_upstream(device_id).await {
            Err(Unavailable::Offline) => {
                // Nowhere yet: the agent may be on its way back here.
                let _ = tokio::time::timeout(TUNNEL_RECHECK, self.wait_online(device_id, 0)).await;
                self.open_upstream(device_id).await
            }
            other => other,
        };
        match opened {
            Ok((mut upstream, accept)) => {
                upstream.printer_client = accept.printer_client_id;
                Ok(upstream)
            }
            Err(Unavailable::Offline) => Err(UpstreamFailure {
                close: Close::device_offline(),
                retry_after: Duration::ZERO,
            }),
            Err(Unavailable::Printer { reason, .. }) => Err(UpstreamFailure {
                close: Close::printer_unreachable(Unavailable::printer_text(reason)),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Opens a printer link through the device's tunnel.
    async fn open_link(&self, device_id: &str) -> Result<(Upstream, LinkAccept), Unavailable> {
        let tunnel = self
            .tunnels
            .get(device_id)
            .map(|t| t.clone())
            .ok_or(Unavailable::Offline)?;
        let link = self.next_link.fetch_add(1, Ordering::SeqCst);
        let (mut send, recv) = tunnel
            .connection
            .open_bi()
            .await
            .map_err(|_| Unavailable::Offline)?;
        let mut frame = BytesMut::new();
        let open = Message::LinkOpen(LinkOpen {
            link,
            max_packet_size: u32::try_from(self.limits.max_upstream_packet).ok(),
        });
        tunnel::encode(&open, &mut frame).map_err(|_| Unavailable::Offline)?;
        send.write_all(&frame)
            .await
            .map_err(|_| Unavailable::Offline)?;
        let mut recv =
            FramedReader::with_buffer(recv, BytesMut::with_capacity(PRINTER_LINK_READ_BUFFER));
        let reply = tokio::time::timeout(self.open_timeout, recv.read_message())
            .await
            .map_err(|_| Unavailable::Printer {
                reason: LinkDownReason::TimedOut,
                detail: Some("the agent did not answer".into()),
            })?;
        match reply.ok().flatten() {
            Some(Message::LinkAccept(accept)) if accept.link == link => {
                let connection = tunnel.connection.clone();
                let alive: TunnelProbe = Arc::new(move || !connection.is_closed());
                let upstream = Upstream::new(recv, send, Some(alive), tunnel.epoch);
                // The agent's own hub judges what ends the printer's
                // connection.
                let upstream = if accept.through_agent_hub {
                    upstream.through_hub()
                } else {
                    upstream
                };
                Ok((upstream, accept))
            }
            Some(Message::LinkRefused(refused)) => Err(Unavailable::Printer {
                reason: refused.reason,
                detail: refused.detail,
            }),
            _ => Err(Unavailable::Offline),
        }
    }
}

/// A printer link's first read buffer: a report of 1 KB and its header fit
/// (it grows for larger ones, and keeps what it grew to). Every hub holds
/// one; 4 KiB was 5 % of a device's memory at the edge.
const PRINTER_LINK_READ_BUFFER: usize = 2048;

/// Where a new CC2 hub starts its request ids: apart from the ids of the
/// hub it may replace, whose replies may still be on their way.
fn first_request_id() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    1 + nanos % (i32::MAX as u32 / 2)
}

fn superseded() -> GoAway {
    GoAway {
        reason: GoAwayReason::Superseded,
        reconnect_after_ms: None,
    }
}

/// The device id of `<device-id>.<base_domain>[:port]` (a Host header, or
/// the name a TLS client sent as SNI), lower-cased; `None` for anything
/// else.
pub fn device_from_name(host: &str, base_domain: &str) -> Option<String> {
    let host = host.rsplit_once(':').map_or(host, |(name, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            name
        } else {
            host
        }
    });
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let label = host
        .strip_suffix(&base_domain.to_ascii_lowercase())?
        .strip_suffix('.')?;
    valid_device_label(label).then(|| label.to_owned())
}

/// A device id as a DNS label: lower-case letters and digits, 1 to 63.
pub fn valid_device_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}
