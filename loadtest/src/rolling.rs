//! The rolling-update scenario: the rig's three instances hold the clients
//! and agents of many devices while QoS 1 flows both ways (the printer
//! publishes reports, every app publishes requests); then each instance in
//! turn is drained (SIGTERM) and started again, as a Deployment's rolling
//! update replaces its pods. Counts the clients told 1001, the longest
//! time any client went without a report, the QoS 1 messages lost each
//! way, and the agents that moved more than once in one step.
//!
//! Clients behave as MQTT libraries do: on a close they reconnect at once
//! (to the next instance, as a Service sends them to a ready pod),
//! subscribe again, and send again every QoS 1 PUBLISH that was not
//! acknowledged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use relay_proto::mqtt::{Packet, PacketId, QoS};
use relay_store::{NewApiKey, Scope};
use serde::Serialize;
use tokio::sync::watch;

use crate::client::{ByteCounter, MqttClient, Target};
use crate::rig::{EdgeProcess, Rig, SERIAL};
use crate::stats::{Percentiles, Progress};

/// How big the run is.
#[derive(Debug, Clone)]
pub struct RollingSize {
    pub devices: usize,
    pub clients: usize,
    /// Reports the printer publishes a second (QoS 1); every device's agent
    /// reads the same printer topic.
    pub printer_per_second: u32,
    /// How often each client publishes a request (QoS 1).
    pub app_interval: Duration,
    /// Traffic kept flowing after each instance is back, before the next.
    pub settle: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RollingReport {
    pub instances: usize,
    pub devices: usize,
    pub clients: usize,
    pub printer_per_second: u32,
    pub app_publish_interval_ms: u64,
    pub steps: Vec<DrainStep>,
    /// Client connections closed with 1001 (each then reconnected).
    pub clients_told_1001: usize,
    /// Client connections that ended any other way (none should).
    pub other_closes: usize,
    pub reconnects: usize,
    /// The longest time any client went without a report, from its first.
    pub longest_gap_ms: f64,
    /// Each client's longest gap.
    pub gaps_us: Percentiles,
    /// The five longest gaps: when they ended (from the first report),
    /// and whether the client had reconnected meanwhile.
    pub longest_gaps: Vec<GapSample>,
    pub app_to_printer: AppToPrinter,
    pub printer_to_app: PrinterToApp,
    /// Connects that failed (the instance was down, or no CONNACK in
    /// time), by why.
    pub failed_connects: std::collections::BTreeMap<String, usize>,
    /// Agents whose device was claimed more than once in one step.
    pub agents_reconnected_more_than_once: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainStep {
    pub instance: String,
    /// From the run's first report to the SIGTERM.
    pub at_s: f64,
    /// Reports lost within connections from this step's SIGTERM to the
    /// next one's (or the end).
    pub lost_in_session: u64,
    /// SIGTERM to exit.
    pub drain_ms: f64,
    /// Start to ready.
    pub start_ms: f64,
    /// Agents that reconnected during the step (their device's claim moved).
    pub agents_moved: usize,
    pub agents_more_than_once: usize,
    pub clients_told_1001: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct GapSample {
    pub client: u32,
    pub ended_at_s: f64,
    pub gap_ms: f64,
    pub across_reconnect: bool,
}

/// A request acknowledged and never received by the printer side.
#[derive(Debug, Clone, Serialize)]
pub struct LostRequest {
    pub client: u32,
    pub sequence: u64,
    /// From the run's first report.
    pub sent_at_s: f64,
    pub acknowledged_at_s: Option<f64>,
    /// The client's connection (0 its first) it was sent on, and
    /// acknowledged on.
    pub sent_on: usize,
    pub acknowledged_on: Option<usize>,
    pub sent_again: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AppToPrinter {
    /// Requests the clients published (each once, counted once).
    pub sent: u64,
    /// Requests acknowledged by a PUBACK.
    pub acknowledged: u64,
    /// Distinct requests the printer side received.
    pub received: u64,
    /// Sent again after a reconnect and received twice (QoS 1 allows it).
    pub duplicates: u64,
    /// Acknowledged but never received: lost.
    pub lost: u64,
    /// Never acknowledged by the end.
    pub unacknowledged: u64,
    /// The first few lost, to tell when they were lost.
    pub lost_samples: Vec<LostRequest>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PrinterToApp {
    /// Reports the printer published (each acknowledged by its broker).
    pub published: u64,
    pub deliveries: u64,
    /// Reports missing between two a client received on one connection,
    /// or after its last one: the relay dropped them.
    pub lost_in_session: u64,
    /// Reports published while a client was reconnecting: MQTT does not
    /// promise these to a clean session (the edge persists none).
    pub missed_while_reconnecting: u64,
}

const REQUEST_PAYLOAD: usize = 64;
/// How long clients get to finish (requests acknowledged, the last report
/// received) after the traffic stops.
const FINISH_PATIENCE: Duration = Duration::from_secs(20);
const SETTLE_PATIENCE: Duration = Duration::from_secs(120);

fn request_topic() -> String {
    format!("device/{SERIAL}/request")
}

fn report_topic() -> String {
    format!("device/{SERIAL}/report")
}

fn request_payload(client: u32, sequence: u64) -> Bytes {
    let mut payload = BytesMut::with_capacity(REQUEST_PAYLOAD);
    payload.put_u32(client);
    payload.put_u64(sequence);
    payload.resize(REQUEST_PAYLOAD, b'0');
    payload.freeze()
}

fn read_request(payload: &[u8]) -> Option<(u32, u64)> {
    let client = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
    Some((client, sequence))
}

fn report_payload(sequence: u64) -> Bytes {
    let mut payload = BytesMut::with_capacity(110);
    payload.put_u64(sequence);
    payload.resize(110, b'0');
    payload.freeze()
}

fn read_report(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientOutcome {
    index: u32,
    told_1001: usize,
    other_closes: usize,
    reconnects: usize,
    longest_gap: Duration,
    longest_gap_ended: Option<Instant>,
    /// The longest gap spans a reconnect.
    longest_gap_after_reconnect: bool,
    /// Reports missing within a connection: when noticed, how many.
    holes: Vec<(Instant, u64)>,
    /// Connects that failed: when, to which instance, why.
    failed_connects: Vec<(Instant, usize, String)>,
    sent: u64,
    acknowledged: u64,
    /// Requests sent and never acknowledged.
    unacknowledged: Vec<u64>,
    /// Per request: when first sent, and when acknowledged on which
    /// connection (0 the first), and whether it was sent again.
    request_times: HashMap<u64, RequestTimes>,
    /// Reports received, per connection, as (first, last, distinct).
    connections: Vec<(u64, u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct RequestTimes {
    sent: Instant,
    sent_on: usize,
    acknowledged: Option<(Instant, usize)>,
    sent_again: bool,
}

/// Reports received on one connection.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: u64,
    last: u64,
    distinct: u64,
}

impl Run {
    fn add(run: &mut Option<Run>, sequence: u64) {
        match run {
            None => {
                *run = Some(Run {
                    first: sequence,
                    last: sequence,
                    distinct: 1,
                })
            }
            Some(run) if sequence > run.last => {
                run.last = sequence;
                run.distinct += 1;
            }
            // A duplicate (QoS 1 again after a reconnect of the printer
            // side) or a late one: the distinct count stays.
            Some(_) => {}
        }
    }
}

/// What every client task reads: the traffic is on, the last report.
struct Shared {
    connected: AtomicUsize,
    told_1001: AtomicUsize,
    /// The last report's sequence once the printer stopped (u64::MAX before).
    last_report: AtomicU64,
}

struct ClientPlan {
    index: u32,
    targets: Vec<Target>,
    first: usize,
    app_interval: Duration,
}

async fn run_client(
    plan: ClientPlan,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ClientOutcome {
    let id = format!("rolling-{}", plan.index);
    let request = request_topic();
    let mut outcome = ClientOutcome {
        index: plan.index,
        ..ClientOutcome::default()
    };
    let mut instance = plan.first;
    let mut to_resend: Vec<u64> = Vec::new();
    let mut next_sequence = 0u64;
    let mut last_report_at: Option<Instant> = None;
    let mut finish_by: Option<tokio::time::Instant> = None;
    'connections: loop {
        let mut client = loop {
            let attempt = Instant::now();
            match MqttClient::connect(&plan.targets[instance], &id, ByteCounter::default()).await {
                Ok(client) => break client,
                Err(failure) => {
                    outcome
                        .failed_connects
                        .push((attempt, instance, format!("{failure:?}")));
                    instance = (instance + 1) % plan.targets.len();
                    if finish_by.is_some_and(|at| tokio::time::Instant::now() > at) {
                        outcome.unacknowledged.append(&mut to_resend);
                        return outcome;
                    }
                    // A refused connect (the instance is down) comes back at
                    // once; a library waits a little before the next try.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        if client
            .subscribe(&report_topic(), QoS::AtLeastOnce)
            .await
            .is_err()
        {
            outcome.other_closes += 1;
            outcome.reconnects += 1;
            instance = (instance + 1) % plan.targets.len();
            continue;
        }
        shared.connected.fetch_add(1, Ordering::SeqCst);
        let mut in_flight: HashMap<PacketId, u64> = HashMap::new();
        let mut failed = false;
        for sequence in std::mem::take(&mut to_resend) {
            if let Some(times) = outcome.request_times.get_mut(&sequence) {
                times.sent_again = true;
            }
            match client
                .publish(
                    &request,
                    QoS::AtLeastOnce,
                    request_payload(plan.index, sequence),
                )
                .await
            {
                Ok(Some(packet_id)) => {
                    in_flight.insert(packet_id, sequence);
                }
                _ => {
                    to_resend.push(sequence);
                    failed = true;
                }
            }
        }
        let mut run: Option<Run> = None;
        let mut tick = tokio::time::interval(plan.app_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let closed = loop {
            if failed {
                break true;
            }
            let stopping = *stop.borrow();
            if stopping && finish_by.is_none() {
                finish_by = Some(tokio::time::Instant::now() + FINISH_PATIENCE);
            }
            let last_report = shared.last_report.load(Ordering::SeqCst);
            if stopping && in_flight.is_empty() && run.is_some_and(|run| run.last >= last_report) {
                break false;
            }
            let deadline = finish_by
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tick.tick(), if !stopping => {
                    let sequence = next_sequence;
                    next_sequence += 1;
                    outcome.sent += 1;
                    outcome.request_times.insert(sequence, RequestTimes {
                        sent: Instant::now(),
                        sent_on: outcome.reconnects,
                        acknowledged: None,
                        sent_again: false,
                    });
                    match client
                        .publish(&request, QoS::AtLeastOnce, request_payload(plan.index, sequence))
                        .await
                    {
                        Ok(Some(packet_id)) => {
                            in_flight.insert(packet_id, sequence);
                        }
                        _ => {
                            to_resend.push(sequence);
                            break true;
                        }
                    }
                }
                _ = stop.changed(), if !stopping => {}
                _ = tokio::time::sleep_until(deadline), if finish_by.is_some() => break false,
                packet = client.next() => match packet {
                    Ok(Some(Packet::Publish(publish))) => {
                        if let Some(packet_id) = publish.packet_id
                            && client.send(&Packet::PubAck(packet_id)).await.is_err()
                        {
                            break true;
                        }
                        if let Some(sequence) = read_report(&publish.payload) {
                            let now = Instant::now();
                            if let Some(before) = last_report_at
                                && now - before > outcome.longest_gap
                            {
                                outcome.longest_gap = now - before;
                                outcome.longest_gap_ended = Some(now);
                                outcome.longest_gap_after_reconnect = run.is_none();
                            }
                            last_report_at = Some(now);
                            if let Some(run) = run
                                && sequence > run.last + 1
                            {
                                outcome.holes.push((now, sequence - run.last - 1));
                            }
                            Run::add(&mut run, sequence);
                        }
                    }
                    Ok(Some(Packet::PubAck(packet_id))) => {
                        if let Some(sequence) = in_flight.remove(&packet_id) {
                            outcome.acknowledged += 1;
                            if let Some(times) = outcome.request_times.get_mut(&sequence) {
                                times.acknowledged = Some((Instant::now(), outcome.reconnects));
                            }
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break true,
                },
            }
        };
        if let Some(run) = run {
            outcome
                .connections
                .push((run.first, run.last, run.distinct));
        }
        shared.connected.fetch_sub(1, Ordering::SeqCst);
        if !closed {
            outcome.unacknowledged.extend(in_flight.into_values());
            client.disconnect().await;
            return outcome;
        }
        if client.close_code() == Some(1001) {
            outcome.told_1001 += 1;
            shared.told_1001.fetch_add(1, Ordering::SeqCst);
        } else {
            outcome.other_closes += 1;
        }
        outcome.reconnects += 1;
        to_resend.extend(in_flight.into_values());
        to_resend.sort_unstable();
        // Another instance, as a Service picks one of the ready pods: the
        // next or the one after, alternately.
        instance =
            (instance + 1 + (plan.index as usize + outcome.reconnects) % 2) % plan.targets.len();
        continue 'connections;
    }
}

/// The printer side: publishes reports at QoS 1 until told to stop, and
/// returns how many its broker acknowledged.
async fn printer_publisher(
    printer: SocketAddr,
    per_second: u32,
    mut stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
) -> anyhow::Result<u64> {
    let mut client = MqttClient::connect_tcp(printer, "loadtest-rolling-printer")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;
    let topic = report_topic();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    let mut sequence = 0u64;
    let mut unacknowledged = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if *stop.borrow() {
                    break;
                }
                client.publish(&topic, QoS::AtLeastOnce, report_payload(sequence)).await?;
                sequence += 1;
                unacknowledged += 1;
            }
            _ = stop.changed() => {}
            packet = client.next() => match packet? {
                Some(Packet::PubAck(_)) => unacknowledged = unacknowledged.saturating_sub(1),
                Some(_) => {}
                None => bail!("the printer's broker closed the connection"),
            },
        }
    }
    while unacknowledged > 0 {
        match tokio::time::timeout(Duration::from_secs(10), client.next()).await {
            Ok(Ok(Some(Packet::PubAck(_)))) => unacknowledged -= 1,
            Ok(Ok(Some(_))) => {}
            _ => bail!("the printer's broker did not acknowledge every report"),
        }
    }
    shared
        .last_report
        .store(sequence.saturating_sub(1), Ordering::SeqCst);
    client.disconnect().await;
    Ok(sequence)
}

/// The printer side's view of the requests: which (client, sequence) it got.
/// The client index of the request that ends the observer's count.
const LAST_REQUEST: u32 = u32::MAX;

/// The printer side's view of the requests: which (client, sequence) it
/// got, until the marker [`end_requests`] publishes once every client is
/// done. The broker queues the marker behind every request it had
/// acknowledged before, so nothing acknowledged is still on its way.
async fn request_observer(
    mut client: MqttClient,
    clients: usize,
) -> anyhow::Result<Vec<HashMap<u64, u32>>> {
    let mut seen: Vec<HashMap<u64, u32>> = vec![HashMap::new(); clients];
    loop {
        match client.next().await? {
            Some(Packet::Publish(publish)) => {
                if let Some(packet_id) = publish.packet_id {
                    client.send(&Packet::PubAck(packet_id)).await?;
                }
                match read_request(&publish.payload) {
                    Some((LAST_REQUEST, _)) => break,
                    Some((index, sequence)) => {
                        if let Some(counts) = seen.get_mut(index as usize) {
                            *counts.entry(sequence).or_default() += 1;
                        }
                    }
                    None => {}
                }
            }
            Some(_) => {}
            None => bail!("the printer's broker closed the observer"),
        }
    }
    client.disconnect().await;
    Ok(seen)
}

/// Publishes the observer's end marker straight to the printer's broker.
async fn end_requests(printer: SocketAddr) -> anyhow::Result<()> {
    let mut client = MqttClient::connect_tcp(printer, "loadtest-rolling-end")
        .await
        .map_err(|failure| anyhow::anyhow!("end marker: {failure}"))?;
    client
        .publish(
            &request_topic(),
            QoS::AtLeastOnce,
            request_payload(LAST_REQUEST, 0),
        )
        .await?;
    loop {
        match client.next().await? {
            Some(Packet::PubAck(_)) => break,
            Some(_) => {}
            None => bail!("the printer's broker closed before the end marker's PUBACK"),
        }
    }
    client.disconnect().await;
    Ok(())
}

/// Every device's claim epoch (0 when unclaimed).
async fn claim_epochs(rig: &Rig, devices: &[String]) -> anyhow::Result<Vec<u64>> {
    let store = rig.store()?;
    let mut epochs = Vec::with_capacity(devices.len());
    for device in devices {
        epochs.push(
            store
                .device_claim(device)
                .await?
                .map_or(0, |claim| claim.epoch),
        );
    }
    Ok(epochs)
}

async fn agents_connected(instances: [&EdgeProcess; 3]) -> usize {
    let mut total = 0.0;
    for instance in instances {
        total += instance
            .metric("relay_edge_agents_connected")
            .await
            .unwrap_or(0.0);
    }
    total as usize
}

/// Waits until `agents` agents and every client are connected again.
async fn wait_settled(
    rig: &Rig,
    agents: usize,
    shared: &Shared,
    clients: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_PATIENCE;
    loop {
        let up = agents_connected([&rig.edge, &rig.cross, &rig.spare]).await;
        let connected = shared.connected.load(Ordering::SeqCst);
        if up >= agents && connected >= clients {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "rolling: after {SETTLE_PATIENCE:?} {up} of {agents} agents and {connected} of {clients} clients are connected"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn rolling_update(
    rig: &mut Rig,
    size: RollingSize,
    progress: &Progress,
) -> anyhow::Result<RollingReport> {
    if size.devices == 0 || size.clients < size.devices {
        bail!("rolling: at least one device and one client per device");
    }
    // The rig's own two agents stay on `edge`; everything here is on top.
    let agents_before = agents_connected([&rig.edge, &rig.cross, &rig.spare]).await;
    let store = rig.store()?;
    let tenant = store.create_tenant("rolling update").await?;
    let instances = [rig.edge.tunnel, rig.cross.tunnel, rig.spare.tunnel];
    let mut devices = Vec::new();
    let mut agents = Vec::new();
    let mut targets: Vec<Vec<Target>> = Vec::new();
    progress.step("rolling: devices and agents", size.devices as u64);
    for index in 0..size.devices {
        let device = store
            .create_device(&tenant.id, &format!("rolling {index}"))
            .await?;
        let (_, key) = store
            .create_api_key(NewApiKey {
                tenant_id: &tenant.id,
                device_id: Some(&device.id),
                scope: Scope::Control,
                label: "rolling",
                expires_at: None,
            })
            .await?;
        let (_, credential) = store.issue_agent_credential(&device.id).await?;
        // Each agent's first address is its own instance; the others follow.
        let addresses: Vec<SocketAddr> = (0..3).map(|k| instances[(index + k) % 3]).collect();
        agents.push(rig.spawn_agent(
            &format!("rolling-agent-{index}"),
            &credential.reveal(),
            &addresses,
        )?);
        let host = format!("{}.relay.test", device.id);
        let authorization = format!("Bearer {}", key.reveal());
        targets.push(
            [&rig.relay, &rig.relay_cross, &rig.relay_spare]
                .into_iter()
                .map(|base| Target {
                    host: host.clone(),
                    authorizations: vec![authorization.clone()],
                    ..base.clone()
                })
                .collect(),
        );
        devices.push(device.id);
        progress.add(1);
    }
    let all_agents = agents_before + size.devices;
    let shared = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        told_1001: AtomicUsize::new(0),
        last_report: AtomicU64::new(u64::MAX),
    });
    let (stop_sender, stop) = watch::channel(false);
    let mut observer = MqttClient::connect_tcp(rig.printer, "loadtest-rolling-observer")
        .await
        .map_err(|failure| anyhow::anyhow!("request observer: {failure}"))?;
    observer
        .subscribe(&request_topic(), QoS::AtLeastOnce)
        .await?;
    let observer = tokio::spawn(request_observer(observer, size.clients));
    progress.step("rolling: clients", size.clients as u64);
    let mut tasks = Vec::new();
    for index in 0..size.clients {
        let device = index % size.devices;
        let plan = ClientPlan {
            index: index as u32,
            targets: targets[device].clone(),
            first: index % 3,
            app_interval: size.app_interval,
        };
        tasks.push(tokio::spawn(run_client(plan, shared.clone(), stop.clone())));
    }
    wait_settled(rig, all_agents, &shared, size.clients).await?;
    let (printer_stop, printer_stopped) = watch::channel(false);
    let publisher = tokio::spawn(printer_publisher(
        rig.printer,
        size.printer_per_second,
        printer_stopped,
        shared.clone(),
    ));
    let traffic_start = Instant::now();
    tokio::time::sleep(size.settle).await;

    let mut steps = Vec::new();
    let mut step_starts = Vec::new();
    let mut more_than_once = vec![false; devices.len()];
    for which in 0..3 {
        let before = claim_epochs(rig, &devices).await?;
        let told_before = shared.told_1001.load(Ordering::SeqCst);
        let instance = match which {
            0 => &mut rig.edge,
            1 => &mut rig.cross,
            _ => &mut rig.spare,
        };
        let name = ["edge", "edge-cross", "edge-spare"][which].to_owned();
        progress.step(format!("rolling: draining {name}"), 0);
        let drain_started = Instant::now();
        step_starts.push(drain_started);
        instance.terminate().await?;
        let drain = drain_started.elapsed();
        let start_started = Instant::now();
        instance.start_again().await?;
        let start = start_started.elapsed();
        wait_settled(rig, all_agents, &shared, size.clients).await?;
        tokio::time::sleep(size.settle).await;
        let after = claim_epochs(rig, &devices).await?;
        let moves: Vec<u64> = before
            .iter()
            .zip(&after)
            .map(|(before, after)| after.saturating_sub(*before))
            .collect();
        for (device, &count) in moves.iter().enumerate() {
            if count > 1 {
                more_than_once[device] = true;
            }
        }
        steps.push(DrainStep {
            instance: name,
            at_s: (drain_started - traffic_start).as_secs_f64(),
            lost_in_session: 0,
            drain_ms: drain.as_secs_f64() * 1_000.0,
            start_ms: start.as_secs_f64() * 1_000.0,
            agents_moved: moves.iter().filter(|&&count| count > 0).count(),
            agents_more_than_once: moves.iter().filter(|&&count| count > 1).count(),
            clients_told_1001: shared.told_1001.load(Ordering::SeqCst) - told_before,
        });
    }

    progress.step("rolling: finishing", size.clients as u64);
    let _ = printer_stop.send(true);
    let published = publisher.await.context("printer publisher")??;
    let _ = stop_sender.send(true);
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.context("client task")?);
        progress.add(1);
    }
    // Every client is done: their requests are acknowledged, so in the
    // broker's queue to the observer ahead of the marker.
    end_requests(rig.printer).await?;
    let seen = tokio::time::timeout(FINISH_PATIENCE, observer)
        .await
        .context("the request observer did not see the end marker")?
        .context("request observer")??;
    for mut agent in agents {
        let _ = agent.kill().await;
    }
    progress.clear();

    let mut app_to_printer = AppToPrinter::default();
    let mut printer_to_app = PrinterToApp {
        published,
        ..PrinterToApp::default()
    };
    let mut gaps = Vec::new();
    let (mut told_1001, mut other_closes, mut reconnects) = (0, 0, 0);
    let last = published.saturating_sub(1);
    for outcome in &outcomes {
        told_1001 += outcome.told_1001;
        other_closes += outcome.other_closes;
        reconnects += outcome.reconnects;
        gaps.push(outcome.longest_gap);
        app_to_printer.sent += outcome.sent;
        app_to_printer.acknowledged += outcome.acknowledged;
        app_to_printer.unacknowledged += outcome.unacknowledged.len() as u64;
        let received = &seen[outcome.index as usize];
        app_to_printer.received += received.len() as u64;
        app_to_printer.duplicates += received
            .values()
            .map(|&count| u64::from(count.saturating_sub(1)))
            .sum::<u64>();
        for sequence in (0..outcome.sent).filter(|sequence| {
            !received.contains_key(sequence) && !outcome.unacknowledged.contains(sequence)
        }) {
            app_to_printer.lost += 1;
            if app_to_printer.lost_samples.len() < 10
                && let Some(times) = outcome.request_times.get(&sequence)
            {
                let since = |at: Instant| at.saturating_duration_since(traffic_start).as_secs_f64();
                app_to_printer.lost_samples.push(LostRequest {
                    client: outcome.index,
                    sequence,
                    sent_at_s: since(times.sent),
                    acknowledged_at_s: times.acknowledged.map(|(at, _)| since(at)),
                    sent_on: times.sent_on,
                    acknowledged_on: times.acknowledged.map(|(_, on)| on),
                    sent_again: times.sent_again,
                });
            }
        }
        let mut previous_last: Option<u64> = None;
        for &(first, run_last, distinct) in &outcome.connections {
            printer_to_app.deliveries += distinct;
            printer_to_app.lost_in_session += (run_last - first + 1).saturating_sub(distinct);
            if let Some(previous) = previous_last {
                printer_to_app.missed_while_reconnecting += first.saturating_sub(previous + 1);
            }
            previous_last = Some(run_last);
        }
        if let Some(final_last) = previous_last {
            printer_to_app.lost_in_session += last.saturating_sub(final_last);
        }
    }
    for outcome in &outcomes {
        for &(at, count) in &outcome.holes {
            if let Some(step) = step_starts.iter().rposition(|start| at >= *start) {
                steps[step].lost_in_session += count;
            }
        }
    }
    let mut samples: Vec<GapSample> = outcomes
        .iter()
        .filter_map(|outcome| {
            Some(GapSample {
                client: outcome.index,
                ended_at_s: outcome
                    .longest_gap_ended?
                    .saturating_duration_since(traffic_start)
                    .as_secs_f64(),
                gap_ms: outcome.longest_gap.as_secs_f64() * 1_000.0,
                across_reconnect: outcome.longest_gap_after_reconnect,
            })
        })
        .collect();
    samples.sort_by(|a, b| b.gap_ms.total_cmp(&a.gap_ms));
    samples.truncate(5);
    let longest_gap_ms = gaps
        .iter()
        .max()
        .map_or(0.0, |gap| gap.as_secs_f64() * 1_000.0);
    Ok(RollingReport {
        instances: 3,
        devices: size.devices,
        clients: size.clients,
        printer_per_second: size.printer_per_second,
        app_publish_interval_ms: size.app_interval.as_millis() as u64,
        agents_reconnected_more_than_once: more_than_once.iter().filter(|&&more| more).count(),
        steps,
        clients_told_1001: told_1001,
        other_closes,
        reconnects,
        longest_gap_ms,
        gaps_us: Percentiles::of(&mut gaps),
        longest_gaps: samples,
        failed_connects: outcomes
            .iter()
            .flat_map(|outcome| &outcome.failed_connects)
            .fold(
                std::collections::BTreeMap::new(),
                |mut counts, (_, _, why)| {
                    *counts.entry(why.clone()).or_default() += 1;
                    counts
                },
            ),
        app_to_printer,
        printer_to_app,
    })
}
