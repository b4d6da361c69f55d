//! The fleet scenario: an operator's real load. Thousands of devices, each
//! with its own simulated agent (held by this process, as in the tunnels
//! scenario) that also plays the printer: it answers the edge's printer
//! link as `relay-agent` does (LINK_ACCEPT, then MQTT 3.1.1 without
//! CONNECT) and sends one report of `report_bytes` a second once
//! subscribed. Each device has one app, a wss client of its own. Measured
//! over a window: the edge's CPU as a share of one core, its memory, the
//! reports' latency and whether any was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::BytesMut;
use relay_io::FramedReader;
use relay_io::transport::{TunnelConnection, TunnelRecv, TunnelSend};
use relay_proto::Secret;
use relay_proto::mqtt::{self, Packet, Publish, QoS, SubAck, SubscribeReturnCode};
use relay_proto::tunnel::{self, Hello, LinkAccept, Message, PrinterKind};
use relay_store::{NewApiKey, Scope};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore, watch};

use crate::client::{ByteCounter, MqttClient, Target};
use crate::rig::{BASE_DOMAIN, Rig, SERIAL, SPREAD, cpu_time, rss_bytes};
use crate::scenarios::report_topic;
use crate::stats::{Percentiles, Progress, kind, read_stamp, stamped};
use crate::tunnels::{Dialer, FleetTransport, fleet_devices};

/// Apps and agents connecting at once.
const CONNECT_CONCURRENCY: usize = 128;
/// How long the reports sent in the window may take to arrive after it.
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct FleetSize {
    pub printers: usize,
    pub report_bytes: usize,
    pub window: Duration,
    pub patience: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub printers: usize,
    pub report_bytes: usize,
    pub window_seconds: f64,
    /// Until every agent was up, then until every app was subscribed and
    /// had its first report.
    pub agents_seconds: f64,
    pub apps_seconds: f64,
    /// Reports sent in the window, and received by the apps.
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub latency: Percentiles,
    /// The edge's CPU over the window as a share of one core, and per
    /// report.
    pub edge_cpu_share_of_core: f64,
    pub edge_cpu_per_report_us: f64,
    /// The load generator's (agents, printers and apps together).
    pub generator_cpu_share_of_core: f64,
    /// The edge's resident memory before the fleet, and at the window's
    /// end.
    pub edge_rss_before_bytes: u64,
    pub edge_rss_bytes: u64,
    pub edge_rss_per_printer_bytes: f64,
    /// What one core and one GiB carry at this load, from the readings.
    pub printers_per_core: f64,
    pub printers_per_gib: f64,
}

/// What the fleet's agents and apps share.
#[derive(Debug, Default)]
struct Shared {
    agents_up: AtomicUsize,
    /// Apps subscribed and with a first report.
    apps_ready: AtomicUsize,
    /// Reports are stamped as measured while set.
    measuring: AtomicBool,
    sent: AtomicU64,
    received: AtomicU64,
    /// Agents or apps that ended before the stop.
    failures: AtomicUsize,
    changed: Notify,
}

impl Shared {
    async fn wait(&self, count: usize, patience: Duration, of: impl Fn(&Shared) -> usize) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            let notified = self.changed.notified();
            if of(self) >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), notified).await;
        }
    }

    fn changed(&self) {
        self.changed.notify_waiters();
    }
}

/// Tenant-wide read keys for the apps, spread as the rig's are.
async fn app_keys(rig: &Rig, tenant: &str) -> anyhow::Result<Vec<String>> {
    let store = rig.store()?;
    let mut keys = Vec::new();
    for _ in 0..SPREAD {
        let (_, key) = store
            .create_api_key(NewApiKey {
                tenant_id: tenant,
                device_id: None,
                scope: Scope::Read,
                label: "loadtest fleet",
                expires_at: None,
            })
            .await?;
        keys.push(format!("Bearer {}", key.reveal()));
    }
    Ok(keys)
}

/// One simulated agent: its tunnel, and the printer behind every printer
/// link the edge opens on it, until the stop.
async fn agent(
    dialer: Dialer,
    credential: String,
    report: Report,
    connecting: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = report.shared.clone();
    let permit = connecting.acquire_owned().await.ok();
    let Some(connection) = dialer.dial().await else {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let Ok((mut send, recv)) = connection.open_bi().await else {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return;
    };
    let hello = Message::Hello(Hello {
        version: tunnel::PROTOCOL_VERSION,
        credential: Secret::new(credential),
        agent_version: Some("loadtest fleet".into()),
    });
    let mut bytes = BytesMut::new();
    if tunnel::encode(&hello, &mut bytes).is_err() || send.write_all(&bytes).await.is_err() {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let mut control = FramedReader::with_buffer(recv, BytesMut::with_capacity(256));
    if !matches!(control.read_message().await, Ok(Some(Message::HelloAck(_)))) {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return;
    }
    drop(permit);
    shared.agents_up.fetch_add(1, Ordering::SeqCst);
    shared.changed();
    let mut links = Vec::new();
    loop {
        tokio::select! {
            message = control.read_message() => match message {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    shared.failures.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            },
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => links.push(tokio::spawn(printer(
                    send,
                    recv,
                    report.clone(),
                    stop.clone(),
                ))),
                Err(_) => {
                    shared.failures.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
    for link in links {
        link.abort();
    }
    close(&connection);
}

fn close(connection: &TunnelConnection) {
    connection.close(tunnel::close_code::NO_ERROR, b"loadtest done");
}

/// The printer behind one printer link: LINK_ACCEPT as a generic broker
/// with the rig's serial, SUBACKs, UNSUBACKs and PINGRESPs, and a report a
/// second once something is subscribed, at `phase` within each second.
async fn printer(
    mut send: TunnelSend,
    recv: TunnelRecv,
    report: Report,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = FramedReader::with_buffer(recv, BytesMut::with_capacity(512));
    let Ok(Some(Message::LinkOpen(open))) = reader.read_message().await else {
        return;
    };
    let accept = Message::LinkAccept(LinkAccept {
        link: open.link,
        printer_kind: Some(PrinterKind::GenericMqtt),
        printer_serial: Some(SERIAL.into()),
        printer_client_id: None,
        through_agent_hub: false,
    });
    let mut out = BytesMut::new();
    if tunnel::encode(&accept, &mut out).is_err() || send.write_all(&out).await.is_err() {
        return;
    }
    let topic = report_topic();
    let mut subscribed = false;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + report.phase,
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sequence = 0u64;
    loop {
        out.clear();
        while let Ok(Some(packet)) = mqtt::decode(reader.buffer_mut(), 1 << 20) {
            let answer = match packet {
                Packet::Subscribe(subscribe) => {
                    subscribed = true;
                    Packet::SubAck(SubAck {
                        packet_id: subscribe.packet_id,
                        return_codes: subscribe
                            .filters
                            .iter()
                            .map(|_| SubscribeReturnCode::Success(QoS::AtMostOnce))
                            .collect(),
                    })
                }
                Packet::Unsubscribe(unsubscribe) => Packet::UnsubAck(unsubscribe.packet_id),
                Packet::PingReq => Packet::PingResp,
                _ => continue,
            };
            let _ = mqtt::encode(&answer, &mut out);
        }
        if !out.is_empty() && send.write_all(&out).await.is_err() {
            return;
        }
        tokio::select! {
            read = reader.read_more() => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = ticker.tick(), if subscribed => {
                let measured = report.shared.measuring.load(Ordering::SeqCst);
                let stamp = if measured { kind::DELTA } else { kind::WARM_UP };
                sequence += 1;
                let publish = Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: false,
                    topic: topic.clone(),
                    packet_id: None,
                    payload: stamped(report.epoch, sequence, stamp, report.bytes),
                });
                out.clear();
                let _ = mqtt::encode(&publish, &mut out);
                if send.write_all(&out).await.is_err() {
                    return;
                }
                if measured {
                    report.shared.sent.fetch_add(1, Ordering::SeqCst);
                }
            },
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Until the stop (a future without the watch's guard, which is not Send).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// What a simulated printer sends, and when.
#[derive(Clone)]
struct Report {
    shared: Arc<Shared>,
    epoch: Instant,
    bytes: usize,
    /// Where in each second this printer reports (spread over the fleet).
    phase: Duration,
}

/// One app: subscribes to its device's reports and reads them until the
/// stop, keeping the latency of the measured ones.
async fn app(
    target: Target,
    index: usize,
    shared: Arc<Shared>,
    connecting: Arc<Semaphore>,
    epoch: Instant,
    mut stop: watch::Receiver<bool>,
) -> Vec<Duration> {
    let mut samples = Vec::new();
    let permit = connecting.acquire_owned().await.ok();
    let counter: ByteCounter = Arc::default();
    let Ok(mut client) = MqttClient::connect(&target, &format!("fleet-app-{index}"), counter).await
    else {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return samples;
    };
    if client
        .subscribe(&report_topic(), QoS::AtMostOnce)
        .await
        .is_err()
    {
        shared.failures.fetch_add(1, Ordering::SeqCst);
        return samples;
    }
    drop(permit);
    let mut ready = false;
    loop {
        let packet = tokio::select! {
            packet = client.next() => packet,
            _ = stopped(&mut stop) => break,
        };
        match packet {
            Ok(Some(Packet::Publish(publish))) => {
                if !ready {
                    ready = true;
                    shared.apps_ready.fetch_add(1, Ordering::SeqCst);
                    shared.changed();
                }
                if let Some(stamp) = read_stamp(epoch, &publish.payload)
                    && stamp.kind == kind::DELTA
                {
                    samples.push(stamp.latency);
                    shared.received.fetch_add(1, Ordering::SeqCst);
                    shared.changed();
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                shared.failures.fetch_add(1, Ordering::SeqCst);
                break;
            }
        }
    }
    client.disconnect().await;
    samples
}

pub async fn fleet(
    rig: &mut Rig,
    size: FleetSize,
    transport: FleetTransport,
    progress: &Progress,
) -> anyhow::Result<FleetReport> {
    let count = size.printers;
    let (tenant, devices) = fleet_devices(
        rig,
        count,
        (
            "loadtest fleet of printers",
            "fleet printer",
            "fleet: devices and agent credentials",
        ),
        progress,
    )
    .await?;
    let keys = app_keys(rig, &tenant).await?;
    progress.clear();
    let pid = rig.edge.pid()?;
    let edge_rss_before = rss_bytes(pid)?;
    let shared = Arc::new(Shared::default());
    let (stop, stopped) = watch::channel(false);
    let epoch = Instant::now();

    progress.step("fleet: agents connecting", count as u64);
    let started = Instant::now();
    let (dialers, endpoints) = Dialer::for_fleet(rig, transport, count)?;
    let connecting = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let agents: Vec<_> = devices
        .iter()
        .zip(dialers)
        .enumerate()
        .map(|(index, (device, dialer))| {
            let report = Report {
                shared: shared.clone(),
                epoch,
                bytes: size.report_bytes,
                phase: Duration::from_secs(1) * index as u32 / count as u32,
            };
            tokio::spawn(agent(
                dialer,
                device.credential.clone(),
                report,
                connecting.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    let agents_up = shared
        .wait(count, size.patience, |shared| {
            shared.agents_up.load(Ordering::SeqCst)
        })
        .await;
    let agents_seconds = started.elapsed().as_secs_f64();

    let mut apps = Vec::new();
    let mut apps_seconds = 0.0;
    let mut ready = false;
    if agents_up {
        progress.step("fleet: apps subscribing", count as u64);
        let started = Instant::now();
        let relay = rig.relay.clone();
        apps = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let target = Target {
                    host: format!("{}.{BASE_DOMAIN}", device.id),
                    authorizations: keys.clone(),
                    ..relay.clone()
                };
                tokio::spawn(app(
                    target,
                    index,
                    shared.clone(),
                    connecting.clone(),
                    epoch,
                    stopped.clone(),
                ))
            })
            .collect();
        ready = shared
            .wait(count, size.patience, |shared| {
                shared.apps_ready.load(Ordering::SeqCst)
            })
            .await;
        apps_seconds = started.elapsed().as_secs_f64();
    }
    if !ready {
        let (up, subscribed) = (
            shared.agents_up.load(Ordering::SeqCst),
            shared.apps_ready.load(Ordering::SeqCst),
        );
        let _ = stop.send(true);
        for task in agents {
            let _ = task.await;
        }
        for task in apps {
            let _ = task.await;
        }
        for endpoint in &endpoints {
            endpoint.close(quinn::VarInt::from_u32(tunnel::close_code::NO_ERROR), b"");
        }
        bail!(
            "fleet: {up} of {count} agents up, {subscribed} apps with a report, within {:?}",
            size.patience
        );
    }

    progress.step("fleet: measuring", 0);
    let failures_before = shared.failures.load(Ordering::SeqCst);
    let edge_cpu_before = cpu_time(pid)?;
    let generator_cpu_before = cpu_time(std::process::id())?;
    shared.measuring.store(true, Ordering::SeqCst);
    let window_started = Instant::now();
    tokio::time::sleep(size.window).await;
    shared.measuring.store(false, Ordering::SeqCst);
    let window = window_started.elapsed();
    let edge_cpu = cpu_time(pid)?.saturating_sub(edge_cpu_before);
    let generator_cpu = cpu_time(std::process::id())?.saturating_sub(generator_cpu_before);
    let edge_rss = rss_bytes(pid)?;
    let sent = shared.sent.load(Ordering::SeqCst);
    // What was sent in the window, given time to arrive.
    let _ = shared
        .wait(sent as usize, DRAIN_PATIENCE, |shared| {
            shared.received.load(Ordering::SeqCst) as usize
        })
        .await;
    let received = shared.received.load(Ordering::SeqCst);
    let failures = shared.failures.load(Ordering::SeqCst) - failures_before;
    let _ = stop.send(true);
    let mut samples = Vec::new();
    for task in apps {
        samples.extend(task.await.unwrap_or_default());
    }
    for task in agents {
        let _ = task.await;
    }
    for endpoint in &endpoints {
        endpoint.close(quinn::VarInt::from_u32(tunnel::close_code::NO_ERROR), b"");
    }
    progress.clear();
    if failures > 0 {
        bail!("fleet: {failures} agents or apps ended during the window");
    }
    let share = edge_cpu.as_secs_f64() / window.as_secs_f64();
    let per_printer = edge_rss.saturating_sub(edge_rss_before) as f64 / count as f64;
    Ok(FleetReport {
        printers: count,
        report_bytes: size.report_bytes,
        window_seconds: window.as_secs_f64(),
        agents_seconds,
        apps_seconds,
        sent,
        received,
        lost: sent.saturating_sub(received),
        latency: Percentiles::of(&mut samples),
        edge_cpu_share_of_core: share,
        edge_cpu_per_report_us: edge_cpu.as_secs_f64() * 1e6 / sent.max(1) as f64,
        generator_cpu_share_of_core: generator_cpu.as_secs_f64() / window.as_secs_f64(),
        edge_rss_before_bytes: edge_rss_before,
        edge_rss_bytes: edge_rss,
        edge_rss_per_printer_bytes: per_printer,
        printers_per_core: if share > 0.0 {
            count as f64 / share
        } else {
            0.0
        },
        printers_per_gib: if per_printer > 0.0 {
            (1u64 << 30) as f64 / per_printer
        } else {
            0.0
        },
    })
}
