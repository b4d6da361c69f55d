//! Which devices are reachable: the agents' tunnels, one per device, and
//! bringing a device's hub up on its first client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use relay_io::FramedReader;
use relay_proto::tunnel::{self, LinkDownReason, LinkOpen, Message, PrinterKind};
use tokio::sync::{Mutex, Notify, mpsc};

use crate::config::PrintersConfig;
use crate::hub::{BambuProfile, HubConfig, HubHandle, Hubs, RetainedReplay, TunnelProbe};

/// An agent's live tunnel.
#[derive(Debug, Clone)]
pub struct Tunnel {
    pub epoch: u64,
    pub connection: quinn::Connection,
    /// Messages for the agent's control stream (GO_AWAY).
    pub control: mpsc::Sender<Message>,
}

/// Why a device cannot serve a client now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// No agent connected.
    Offline,
    /// The agent is there but the printer refused or cannot be reached.
    Printer {
        reason: LinkDownReason,
        detail: Option<String>,
    },
}

impl Unavailable {
    /// Short text for a close reason: `printer: <this>`.
    pub fn printer_text(reason: LinkDownReason) -> &'static str {
        match reason {
            LinkDownReason::CredentialsRefused => "refused the access code",
            LinkDownReason::TlsFailure => "TLS failure",
            LinkDownReason::Unreachable => "unreachable",
            LinkDownReason::TooManyClients => "too many clients",
            LinkDownReason::Dropped => "connection lost",
            LinkDownReason::ProtocolError => "protocol error",
            LinkDownReason::TimedOut => "timed out",
            LinkDownReason::Policy => "refused by the agent's policy",
            LinkDownReason::Other(_) => "unavailable",
        }
    }
}

/// Tunnels by device, and the way from a tunnel to a hub.
#[derive(Debug)]
pub struct Devices {
    tunnels: DashMap<String, Tunnel>,
    hubs: Arc<Hubs>,
    /// One hub opening at a time per device.
    opening: DashMap<String, Arc<Mutex<()>>>,
    next_epoch: AtomicU64,
    next_link: AtomicU64,
    registered: Notify,
    unregistered: Notify,
    limits: HubConfig,
    printers: PrintersConfig,
    open_timeout: Duration,
}

impl Devices {
    pub fn new(
        hubs: Arc<Hubs>,
        limits: HubConfig,
        printers: PrintersConfig,
        open_timeout: Duration,
    ) -> Devices {
        Devices {
            tunnels: DashMap::new(),
            hubs,
            opening: DashMap::new(),
            next_epoch: AtomicU64::new(1),
            next_link: AtomicU64::new(1),
            registered: Notify::new(),
            unregistered: Notify::new(),
            limits,
            printers,
            open_timeout,
        }
    }

    pub fn hubs(&self) -> &Arc<Hubs> {
        &self.hubs
    }

    /// Registers a new tunnel for `device_id`; returns its epoch and the
    /// tunnel it replaced (to be told to go away).
    pub fn register(
        &self,
        device_id: &str,
        connection: quinn::Connection,
        control: mpsc::Sender<Message>,
    ) -> (u64, Option<Tunnel>) {
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        let previous = self.tunnels.insert(
            device_id.to_owned(),
            Tunnel {
                epoch,
                connection,
                control,
            },
        );
        if previous.is_some() {
            // The old tunnel's printer link goes with it.
            self.hubs.end(device_id);
        }
        self.registered.notify_waiters();
        (epoch, previous)
    }

    /// Removes the tunnel of `device_id` if it is still the one of `epoch`,
    /// and ends the device's hub.
    pub fn unregister(&self, device_id: &str, epoch: u64) {
        if self
            .tunnels
            .remove_if(device_id, |_, tunnel| tunnel.epoch == epoch)
            .is_some()
        {
            self.hubs.end(device_id);
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

    /// Every tunnel (for the drain's GO_AWAY).
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels
            .iter()
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// The hub of `device_id`, opening the printer link through its
    /// agent when there is none yet.
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
        let mut recv = FramedReader::new(recv);
        let reply = tokio::time::timeout(self.open_timeout, recv.read_message())
            .await
            .map_err(|_| Unavailable::Printer {
                reason: LinkDownReason::TimedOut,
                detail: Some("the agent did not answer".into()),
            })?;
        match reply.ok().flatten() {
            Some(Message::LinkAccept(accept)) if accept.link == link => {
                let connection = tunnel.connection.clone();
                let alive: TunnelProbe = Arc::new(move || connection.close_reason().is_none());
                let (replay_retained, printer) = match accept.printer_kind {
                    Some(PrinterKind::Bambu) => (RetainedReplay::WhenSeen, &self.printers.bambu),
                    _ => (RetainedReplay::Always, &self.printers.mqtt),
                };
                let config = HubConfig {
                    replay_retained,
                    policy: Arc::new(printer.policy(accept.printer_serial.as_deref())),
                    churn: printer.churn(),
                    publish_rate: printer.publish_rate(),
                    bambu: match (accept.printer_kind, &accept.printer_serial) {
                        (Some(PrinterKind::Bambu), Some(serial)) => Some(BambuProfile {
                            pushall_interval: Duration::from_secs(printer.pushall_interval_seconds),
                            ..BambuProfile::new(serial)
                        }),
                        _ => None,
                    },
                    ..self.limits.clone()
                };
                Ok(self
                    .hubs
                    .start_framed(device_id.to_owned(), recv, send, config, Some(alive)))
            }
            Some(Message::LinkRefused(refused)) => Err(Unavailable::Printer {
                reason: refused.reason,
                detail: refused.detail,
            }),
            _ => Err(Unavailable::Offline),
        }
    }
}
