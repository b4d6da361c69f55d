//! A device's live figures, the same whichever instance serves the page:
//! the apps connected now (each instance knows its own sessions), and the
//! agent and its traffic (known to the instance that holds the agent).
//!
//! The serving instance asks: its own sessions, plus a PEER_STATUS_QUERY
//! to every other live instance over the peer connection, answered at once
//! from memory. Nothing is published ahead, so an instance nobody looks at
//! does no work for the console. An instance that does not answer within
//! [`ASK_TIMEOUT`] is named in `unanswered`, and the figures say so.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::devices::Devices;
use crate::hub::SessionId;
use crate::state::{EdgeState, LiveSession};

/// How long the serving instance waits for another's figures.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Apps one instance lists per device; past it they are counted only.
pub const MAX_APPS_LISTED: usize = 50;

/// One device's live figures: from one instance, or merged from all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceFigures {
    pub apps: Vec<AppFigure>,
    /// Apps connected but not listed (past [`MAX_APPS_LISTED`]).
    pub apps_left_out: usize,
    /// Set by the instance that holds the agent.
    pub agent: Option<AgentFigure>,
    /// Set by the instance that holds the agent.
    pub traffic: Option<TrafficFigure>,
}

/// An app's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppFigure {
    pub client_id: String,
    /// `3.1`, `3.1.1` or `5`.
    pub mqtt_version: String,
    /// `wss`, `mqtts` or `mqtt`.
    pub transport: String,
    pub address: IpAddr,
    /// Unix milliseconds of its CONNACK.
    pub since: i64,
    pub key_id: String,
    /// The instance it is connected to.
    pub instance: String,
}

/// The device's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFigure {
    /// What the agent said it is, if it did.
    pub version: Option<String>,
    /// `quic` or `tcp`.
    pub transport: String,
    /// Unix milliseconds of its HELLO.
    pub connected_since: u64,
    pub instance: String,
}

/// PUBLISHes through the device's hub on the agent's instance, and what
/// the printer said it is when the hub's link opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficFigure {
    /// `bambu`, `elegoo_cc2` or `mqtt`.
    pub printer_kind: Option<String>,
    pub printer_serial: Option<String>,
    pub from_printer_last_minute: u64,
    pub to_printer_last_minute: u64,
    /// Unix milliseconds of the printer's last PUBLISH.
    pub last_printer_message_at: Option<u64>,
}

impl DeviceFigures {
    /// Adds another instance's figures of the same device.
    fn merge(&mut self, other: DeviceFigures) {
        self.apps.extend(other.apps);
        self.apps_left_out += other.apps_left_out;
        self.agent = self.agent.take().or(other.agent);
        self.traffic = self.traffic.take().or(other.traffic);
    }

    /// Apps connected on every instance that answered.
    pub fn apps_connected(&self) -> usize {
        self.apps.len() + self.apps_left_out
    }
}

/// What this instance knows live: its sessions and its agents.
#[derive(Debug, Clone)]
pub struct LocalStatus {
    pub instance_id: String,
    pub sessions: Arc<DashMap<SessionId, LiveSession>>,
    pub devices: Devices,
}

impl LocalStatus {
    /// This instance's figures of `device_ids`, for those it knows
    /// something of.
    pub fn figures(&self, device_ids: &[String]) -> HashMap<String, DeviceFigures> {
        let wanted: HashSet<&str> = device_ids.iter().map(String::as_str).collect();
        let mut figures: HashMap<String, DeviceFigures> = HashMap::new();
        for session in self.sessions.iter() {
            // A session told to end (revoked, say) is gone for its owner,
            // even while it says goodbye.
            if !wanted.contains(session.device_id.as_str()) || session.outbound.is_ended() {
                continue;
            }
            let device = figures.entry(session.device_id.clone()).or_default();
            if device.apps.len() >= MAX_APPS_LISTED {
                device.apps_left_out += 1;
                continue;
            }
            device.apps.push(AppFigure {
                client_id: session.client_id.clone(),
                mqtt_version: session.mqtt_version.to_owned(),
                transport: session.transport.to_owned(),
                address: session.address,
                since: session.since,
                key_id: session.key_id.clone(),
                instance: self.instance_id.clone(),
            });
        }
        let now = std::time::Instant::now();
        for device_id in wanted {
            let Some(tunnel) = self.devices.tunnel(device_id) else {
                continue;
            };
            let device = figures.entry(device_id.to_owned()).or_default();
            device.agent = Some(AgentFigure {
                version: tunnel.agent_version.clone(),
                transport: tunnel.connection.transport().name().to_owned(),
                connected_since: tunnel.connected_at,
                instance: self.instance_id.clone(),
            });
            device.traffic = self.devices.hubs().get(device_id).map(|hub| {
                let traffic = hub.activity().traffic(now);
                let printer = hub.printer();
                TrafficFigure {
                    printer_kind: printer.kind.map(|kind| {
                        match kind {
                            relay_proto::tunnel::PrinterKind::Bambu => "bambu",
                            relay_proto::tunnel::PrinterKind::ElegooCc2 => "elegoo_cc2",
                            relay_proto::tunnel::PrinterKind::GenericMqtt => "mqtt",
                            relay_proto::tunnel::PrinterKind::Other(_) => "other",
                        }
                        .to_owned()
                    }),
                    printer_serial: printer.serial.clone(),
                    from_printer_last_minute: traffic.from_printer_last_minute,
                    to_printer_last_minute: traffic.to_printer_last_minute,
                    last_printer_message_at: traffic.last_printer_message_ms,
                }
            });
        }
        figures
    }
}

/// What `state`'s instance knows live, for the console and for peers.
pub fn local(state: &EdgeState) -> LocalStatus {
    LocalStatus {
        instance_id: state.membership.instance_id.clone(),
        sessions: state.live_sessions.clone(),
        devices: state.devices.clone(),
    }
}

/// Every live instance's figures of some devices, merged.
#[derive(Debug, Default)]
pub struct Gathered {
    pub figures: HashMap<String, DeviceFigures>,
    /// Live instances that did not answer in time: their apps are missing.
    pub unanswered: Vec<String>,
}

impl Gathered {
    /// The figures of `device_id` (empty when nobody knew anything).
    pub fn of(&self, device_id: &str) -> DeviceFigures {
        self.figures.get(device_id).cloned().unwrap_or_default()
    }
}

/// Asks this instance and every other live one about `device_ids`.
pub async fn gather(state: &EdgeState, device_ids: &[String]) -> Gathered {
    let local = local(state);
    let mut gathered = Gathered {
        figures: local.figures(device_ids),
        unanswered: Vec::new(),
    };
    if device_ids.is_empty() {
        return gathered;
    }
    let instances = match state.authenticator.store().list_instances().await {
        Ok(instances) => instances,
        Err(error) => {
            tracing::warn!(%error, "cannot list the instances for live status");
            return gathered;
        }
    };
    let others = instances
        .into_iter()
        .filter(|instance| instance.live && instance.id != local.instance_id);
    let asks = others.map(|instance| async move {
        let answer = tokio::time::timeout(
            ASK_TIMEOUT,
            state
                .peers
                .ask_status(&instance.id, &instance.peer_address, device_ids),
        )
        .await;
        (instance.id, answer)
    });
    for (instance, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(Ok(answers)) => {
                for (device_id, figures) in answers {
                    let Ok(figures) = serde_json::from_str::<DeviceFigures>(&figures) else {
                        tracing::warn!(peer = %instance, "unreadable live status from an instance");
                        continue;
                    };
                    gathered
                        .figures
                        .entry(device_id)
                        .or_default()
                        .merge(figures);
                }
            }
            Ok(Err(error)) => {
                tracing::info!(peer = %instance, %error, "no live status from an instance");
                gathered.unanswered.push(instance);
            }
            Err(_) => {
                tracing::info!(peer = %instance, "no live status from an instance in time");
                gathered.unanswered.push(instance);
            }
        }
    }
    gathered
}

/// This instance's answer to a PEER_STATUS_QUERY: each device's figures
/// as JSON.
pub fn answer(local: &LocalStatus, device_ids: &str) -> Vec<(String, String)> {
    let ids: Vec<String> = device_ids
        .split(',')
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    local
        .figures(&ids)
        .into_iter()
        .filter_map(|(device_id, figures)| {
            serde_json::to_string(&figures)
                .ok()
                .map(|json| (device_id, json))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_app_and_the_one_agent() {
        let app = |instance: &str| AppFigure {
            client_id: "c".into(),
            mqtt_version: "3.1.1".into(),
            transport: "wss".into(),
            address: IpAddr::from([127, 0, 0, 1]),
            since: 1,
            key_id: "k".into(),
            instance: instance.into(),
        };
        let mut here = DeviceFigures {
            apps: vec![app("a")],
            ..DeviceFigures::default()
        };
        here.merge(DeviceFigures {
            apps: vec![app("b")],
            apps_left_out: 3,
            agent: Some(AgentFigure {
                version: Some("1".into()),
                transport: "quic".into(),
                connected_since: 5,
                instance: "b".into(),
            }),
            traffic: None,
        });
        assert_eq!(here.apps_connected(), 5);
        assert_eq!(here.agent.as_ref().map(|a| a.instance.as_str()), Some("b"));
    }
}
