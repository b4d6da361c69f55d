//! The five scenarios. Each returns a serialisable result; `report.rs`
//! turns them into the summaries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use relay_proto::mqtt::{self, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::client::{ByteCounter, ConnectFailure, MqttClient, Target};
use crate::rig::{Rig, SERIAL, cpu_time, metric, rss_bytes};
use crate::stats::{Percentiles, Progress, kind, read_stamp, stamped};

/// Clients connecting at once while subscribers are set up.
const SETUP_CONCURRENCY: usize = 128;
/// A subscriber that hears nothing for this long gives up.
const QUIET_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the warm-up messages to reach every subscriber.
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);

pub fn report_topic() -> String {
    format!("device/{SERIAL}/report")
}

fn request_topic() -> String {
    format!("device/{SERIAL}/request")
}

/// One message of a schedule: when (from the start), what kind, how big.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    pub at: Duration,
    pub kind: u8,
    pub size: usize,
}

/// `rate` messages per second of `size` bytes for `seconds`.
pub fn steady(rate: u32, size: usize, seconds: u32) -> Vec<Planned> {
    let count = rate as u64 * seconds as u64;
    (0..count)
        .map(|index| Planned {
            at: Duration::from_secs(1) * index as u32 / rate,
            kind: kind::DELTA,
            size,
        })
        .collect()
}

/// A printer's report stream: a 4.4 KB full report each second and 110 B
/// deltas ten times a second, for `seconds`.
pub fn printer_mix(seconds: u32) -> Vec<Planned> {
    let mut plan = Vec::new();
    for tick in 0..seconds * 10 {
        let at = Duration::from_millis(100) * tick;
        if tick % 10 == 0 {
            plan.push(Planned {
                at,
                kind: kind::FULL_REPORT,
                size: 4_400,
            });
        }
        plan.push(Planned {
            at,
            kind: kind::DELTA,
            size: 110,
        });
    }
    plan
}

/// Counts subscribers that have seen a warm-up message (phase 0), then
/// those that have seen one at or after `marker` (phase 1): messages arrive
/// in order, so once all have, nothing from the warm-up is still queued
/// anywhere on the path.
#[derive(Debug)]
struct Ready {
    reached: [AtomicUsize; 2],
    marker: AtomicU64,
    changed: Notify,
}

impl Default for Ready {
    fn default() -> Ready {
        Ready {
            reached: [AtomicUsize::new(0), AtomicUsize::new(0)],
            marker: AtomicU64::new(u64::MAX),
            changed: Notify::new(),
        }
    }
}

impl Ready {
    fn reached(&self, phase: usize) -> usize {
        self.reached[phase].load(Ordering::Relaxed)
    }
}

/// What one subscriber received, by kind, and its latency per message.
#[derive(Debug, Default)]
struct Reception {
    latencies: BTreeMap<u8, Vec<Duration>>,
    by_sequence: Vec<(u64, Duration)>,
}

async fn read_stamps(
    mut client: MqttClient,
    epoch: Instant,
    ready: Arc<Ready>,
    progress: Progress,
    done: mpsc::Sender<(Reception, MqttClient)>,
) {
    let mut reception = Reception::default();
    let mut warmed = [false; 2];
    loop {
        match tokio::time::timeout(QUIET_LIMIT, client.next()).await {
            Ok(Ok(Some(Packet::Publish(publish)))) => match read_stamp(epoch, &publish.payload) {
                Some(stamp) if stamp.kind == kind::WARM_UP => {
                    let phase = if !warmed[0] {
                        Some(0)
                    } else if !warmed[1] && stamp.sequence >= ready.marker.load(Ordering::Relaxed) {
                        Some(1)
                    } else {
                        None
                    };
                    if let Some(phase) = phase {
                        warmed[phase] = true;
                        ready.reached[phase].fetch_add(1, Ordering::Relaxed);
                        ready.changed.notify_waiters();
                    }
                }
                Some(stamp) if stamp.kind == kind::END => break,
                Some(stamp) => {
                    reception
                        .latencies
                        .entry(stamp.kind)
                        .or_default()
                        .push(stamp.latency);
                    reception.by_sequence.push((stamp.sequence, stamp.latency));
                    progress.add(1);
                }
                None => {}
            },
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    // The client stays connected until every subscriber is done: one that
    // leaves early makes the edge work while others still wait.
    let _ = done.send((reception, client)).await;
}

/// Connects `count` clients to `target`, each subscribed to `filter`.
pub(crate) async fn subscribers(
    target: &Target,
    count: usize,
    filter: &str,
    label: &str,
    bytes_read: &ByteCounter,
    progress: &Progress,
) -> anyhow::Result<Vec<MqttClient>> {
    progress.step(
        format!("{label}: connecting {count} subscribers"),
        count as u64,
    );
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let target = target.clone();
        let filter = filter.to_owned();
        let bytes_read = bytes_read.clone();
        let gate = gate.clone();
        let progress = progress.clone();
        let client_id = format!("{label}-{index}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut client = MqttClient::connect(&target, &client_id, bytes_read)
                .await
                .map_err(|failure| anyhow::anyhow!("{}: {failure}", target.name))?;
            client.subscribe(&filter, QoS::AtMostOnce).await?;
            progress.add(1);
            anyhow::Ok(client)
        }));
    }
    let mut clients = Vec::with_capacity(count);
    for task in tasks {
        clients.push(task.await??);
    }
    Ok(clients)
}

/// The result of one stream to N subscribers over one path.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    pub target: String,
    pub subscribers: usize,
    /// Latency per message kind ("delta" 110 B / "full" 4.4 KB).
    pub latency: BTreeMap<String, Percentiles>,
    pub published: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    /// Messages delivered per second, all subscribers together.
    pub delivered_per_second: f64,
    /// Bytes the printer's messages took on the printer side (MQTT
    /// PUBLISH packets as the broker got them).
    pub printer_bytes_per_message: f64,
    /// Bytes that crossed the tunnel per printer message: the edge's
    /// `relay_edge_printer_bytes_total` for the relay; for rathole, every
    /// byte its clients read (each client has its own stream through it).
    pub uplink_bytes_per_message: Option<f64>,
    /// Bytes the owning instance sent over peer links per printer message
    /// (the cross-instance path only).
    pub peer_bytes_per_message: Option<f64>,
    /// Edge CPU time per printer message (relay only).
    pub edge_cpu_us_per_message: Option<f64>,
    /// The share of the edge's writes to clients that the delivering task
    /// made itself, the session idle and its socket writable (relay only;
    /// `relay_edge_client_writes_total`).
    pub direct_write_share: Option<f64>,
    /// This load generator's own CPU time per printer message (its clients
    /// share the machine's cores with the edge).
    pub load_generator_cpu_us_per_message: f64,
    /// From the first warm-up message until every subscriber had one sent
    /// after all had their first.
    pub warm_up_seconds: f64,
    /// The slowest printer messages: (index in the run, seconds after the
    /// run's start it was sent, its worst latency over all subscribers, µs).
    pub slowest: Vec<(u64, f64, f64)>,
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::FULL_REPORT => "full",
        _ => "delta",
    }
}

/// Publishes `plan` from the printer side to `subscribers` clients of
/// `target` and measures what arrives.
pub async fn stream(
    rig: &Rig,
    target: &Target,
    subscriber_count: usize,
    plan: &[Planned],
    progress: &Progress,
) -> anyhow::Result<StreamResult> {
    let label = format!("{} × {subscriber_count}", target.name);
    let bytes_read = ByteCounter::default();
    let clients = subscribers(
        target,
        subscriber_count,
        &report_topic(),
        target.name,
        &bytes_read,
        progress,
    )
    .await?;
    let mut printer = MqttClient::connect_tcp(rig.printer, "loadtest-printer")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;

    let epoch = Instant::now();
    let ready = Arc::new(Ready::default());
    let (done, mut receptions) = mpsc::channel(subscriber_count.max(1));
    for client in clients {
        tokio::spawn(read_stamps(
            client,
            epoch,
            ready.clone(),
            progress.clone(),
            done.clone(),
        ));
    }
    drop(done);

    // Warm up: until every subscriber has one message (no subscription is
    // still on its way), then until every subscriber has one sent after
    // that (nothing from the warm-up still queued): the run measures the
    // steady state. The first deliveries to new subscribers are slower;
    // `warm_up_seconds` tells how long this took.
    let topic = report_topic();
    // As big as the largest message: buffers along the path have grown to
    // it before measuring.
    let warm_up_size = plan.iter().map(|planned| planned.size).max().unwrap_or(32);
    let warm_up_started = Instant::now();
    let deadline = warm_up_started + WARM_UP_LIMIT;
    let mut sequence = 0u64;
    for phase in 0..2 {
        if phase == 1 {
            ready.marker.store(sequence, Ordering::Relaxed);
        }
        // Phase 0: a small message every 20 ms until every subscriber has
        // one. Phase 1: one message as big as the largest to come (buffers
        // on the path grow to it now), sent again only if a second passes
        // without all of them having it: nothing else is sent, so once all
        // have it nothing from the warm-up is queued anywhere.
        let (size, every) = match phase {
            0 => (32, Duration::from_millis(20)),
            _ => (warm_up_size, Duration::from_secs(1)),
        };
        while ready.reached(phase) < subscriber_count {
            // One message per period, however many subscribers report in
            // meanwhile (one per report would flood the path).
            let warm_up = stamped(epoch, sequence, kind::WARM_UP, size);
            printer.publish(&topic, QoS::AtMostOnce, warm_up).await?;
            sequence += 1;
            let next = tokio::time::Instant::now() + every;
            loop {
                let changed = ready.changed.notified();
                if ready.reached(phase) >= subscriber_count {
                    break;
                }
                if tokio::time::timeout_at(next, changed).await.is_err() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{label}: only {} of {subscriber_count} subscribers got a warm-up message within {WARM_UP_LIMIT:?}",
                    ready.reached(phase)
                );
            }
        }
    }
    let warm_up = warm_up_started.elapsed();

    let expected = plan.len() as u64 * subscriber_count as u64;
    progress.step(format!("{label}: messages delivered"), expected);
    let bytes_before = bytes_read.load(Ordering::Relaxed);
    let tunnel_before = rig.edge.printer_bytes_in().await?;
    let peer_series = "relay_edge_peer_bytes_total{direction=\"out\"}";
    let peer_before = rig.edge.metric(peer_series).await?;
    let direct_series = "relay_edge_client_writes_total{path=\"direct\"}";
    let queued_series = "relay_edge_client_writes_total{path=\"queued\"}";
    let direct_before = rig.edge.metric(direct_series).await?;
    let queued_before = rig.edge.metric(queued_series).await?;
    let edge_pid = rig.edge.pid()?;
    let cpu_before = cpu_time(edge_pid)?;
    let own_cpu_before = cpu_time(std::process::id())?;
    let mut printer_bytes = 0u64;
    let first_sequence = sequence;
    let start = tokio::time::Instant::now();
    for planned in plan {
        tokio::time::sleep_until(start + planned.at).await;
        let payload = stamped(epoch, sequence, planned.kind, planned.size);
        printer_bytes += publish_len(&topic, &payload);
        printer.publish(&topic, QoS::AtMostOnce, payload).await?;
        sequence += 1;
    }
    let end = stamped(epoch, sequence, kind::END, 32);
    printer.publish(&topic, QoS::AtMostOnce, end).await?;

    let mut latencies: BTreeMap<u8, Vec<Duration>> = BTreeMap::new();
    let mut worst: BTreeMap<u64, Duration> = BTreeMap::new();
    let mut finished = Vec::with_capacity(subscriber_count);
    while let Some((reception, client)) = receptions.recv().await {
        finished.push(client);
        for (kind, samples) in reception.latencies {
            latencies.entry(kind).or_default().extend(samples);
        }
        for (sequence, latency) in reception.by_sequence {
            let entry = worst.entry(sequence - first_sequence).or_default();
            *entry = (*entry).max(latency);
        }
    }
    let mut slowest: Vec<(u64, f64, f64)> = worst
        .into_iter()
        .map(|(index, latency)| {
            let sent_at = plan.get(index as usize).map_or(0.0, |p| p.at.as_secs_f64());
            (index, sent_at, latency.as_secs_f64() * 1e6)
        })
        .collect();
    slowest.sort_by(|a, b| b.2.total_cmp(&a.2));
    slowest.truncate(5);
    let window = start.elapsed();
    let cpu_used = cpu_time(edge_pid)?.saturating_sub(cpu_before);
    let own_cpu_used = cpu_time(std::process::id())?.saturating_sub(own_cpu_before);
    let tunnel_bytes = rig.edge.printer_bytes_in().await? - tunnel_before;
    let peer_bytes = rig.edge.metric(peer_series).await? - peer_before;
    let direct_writes = rig.edge.metric(direct_series).await? - direct_before;
    let queued_writes = rig.edge.metric(queued_series).await? - queued_before;
    let client_bytes = bytes_read.load(Ordering::Relaxed) - bytes_before;
    printer.disconnect().await;
    for client in finished {
        client.disconnect().await;
    }
    // The END message also crossed; count it in the per-message division.
    let messages = plan.len() as f64 + 1.0;
    let received: u64 = latencies.values().map(|samples| samples.len() as u64).sum();
    let is_relay = target.name.starts_with("relay");
    progress.clear();
    Ok(StreamResult {
        target: target.name.to_owned(),
        subscribers: subscriber_count,
        latency: latencies
            .iter_mut()
            .map(|(kind, samples)| (kind_name(*kind).to_owned(), Percentiles::of(samples)))
            .collect(),
        published: plan.len() as u64,
        expected,
        received,
        lost: expected.saturating_sub(received),
        delivered_per_second: received as f64 / window.as_secs_f64(),
        printer_bytes_per_message: printer_bytes as f64 / plan.len().max(1) as f64,
        uplink_bytes_per_message: match target.name {
            name if name.starts_with("relay") => Some(tunnel_bytes / messages),
            "rathole" => Some(client_bytes as f64 / messages),
            _ => None,
        },
        peer_bytes_per_message: (target.name == "relay-cross").then(|| peer_bytes / messages),
        edge_cpu_us_per_message: is_relay
            .then(|| cpu_used.as_secs_f64() * 1e6 / plan.len().max(1) as f64),
        direct_write_share: (is_relay && direct_writes + queued_writes > 0.0)
            .then(|| direct_writes / (direct_writes + queued_writes)),
        load_generator_cpu_us_per_message: own_cpu_used.as_secs_f64() * 1e6
            / plan.len().max(1) as f64,
        warm_up_seconds: warm_up.as_secs_f64(),
        slowest,
    })
}

fn publish_len(topic: &str, payload: &bytes::Bytes) -> u64 {
    mqtt::encoded_len(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.to_owned(),
        packet_id: None,
        payload: payload.clone(),
    }))
    .unwrap_or(0) as u64
}

/// Scenario 3: clients publish QoS 1 requests; PUBACK latency and what the
/// printer side received.
#[derive(Debug, Clone, Serialize)]
pub struct PublishResult {
    pub target: String,
    pub clients: usize,
    pub sent: u64,
    pub acknowledged: u64,
    pub printer_received: u64,
    pub puback: Percentiles,
    pub failures: u64,
}

pub async fn publish_path(
    rig: &Rig,
    target: &Target,
    clients: usize,
    rate_per_client: u32,
    seconds: u32,
    progress: &Progress,
) -> anyhow::Result<PublishResult> {
    let label = format!("{} publish", target.name);
    let bytes = ByteCounter::default();
    let mut connected = Vec::with_capacity(clients);
    for index in 0..clients {
        connected.push(
            MqttClient::connect(target, &format!("{label}-{index}"), bytes.clone())
                .await
                .map_err(|failure| anyhow::anyhow!("{label}: {failure}"))?,
        );
    }
    // The printer side counts what arrives on the request topic.
    let mut printer = MqttClient::connect_tcp(rig.printer, "loadtest-printer-requests")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;
    printer
        .subscribe(&format!("device/{SERIAL}/request"), QoS::AtLeastOnce)
        .await?;
    let printer_received = Arc::new(AtomicU64::new(0));
    let stop_printer = Arc::new(Notify::new());
    let printer_counted = Arc::new(Notify::new());
    let printer_task = {
        let received = printer_received.clone();
        let counted = printer_counted.clone();
        let stop = stop_printer.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    packet = printer.next() => match packet {
                        Ok(Some(Packet::Publish(publish))) => {
                            if let Some(id) = publish.packet_id {
                                let _ = printer.send(&Packet::PubAck(id)).await;
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                            counted.notify_waiters();
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                    _ = stop.notified() => break,
                }
            }
            printer.disconnect().await;
        })
    };

    let per_client = rate_per_client as u64 * seconds as u64;
    progress.step(format!("{label}: PUBACKs"), per_client * clients as u64);
    let topic = request_topic();
    let mut tasks = Vec::new();
    for (index, mut client) in connected.into_iter().enumerate() {
        let topic = topic.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client as usize);
            let mut failures = 0u64;
            let period = Duration::from_secs(1) / rate_per_client;
            // Spread the clients over one period.
            let start = tokio::time::Instant::now() + period * index as u32 / clients as u32;
            for sequence in 0..per_client {
                tokio::time::sleep_until(start + period * sequence as u32).await;
                let payload = format!(
                    r#"{{"print":{{"command":"pause","sequence_id":"{sequence}","param":""}}}}"#
                );
                let sent = Instant::now();
                let Ok(Some(packet_id)) = client
                    .publish(&topic, QoS::AtLeastOnce, payload.into())
                    .await
                else {
                    failures += 1;
                    break;
                };
                let acknowledged = loop {
                    match tokio::time::timeout(QUIET_LIMIT, client.next()).await {
                        Ok(Ok(Some(Packet::PubAck(id)))) if id == packet_id => break true,
                        Ok(Ok(Some(_))) => {}
                        _ => break false,
                    }
                };
                if !acknowledged {
                    failures += 1;
                    break;
                }
                latencies.push(sent.elapsed());
                progress.add(1);
            }
            client.disconnect().await;
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (samples, failed) = task.await?;
        latencies.extend(samples);
        failures += failed;
    }
    let acknowledged = latencies.len() as u64;
    // Every PUBACK follows the broker's own, but the printer side's
    // subscriber may still be reading: wait until it has counted them all,
    // or until it has been quiet too long.
    let deadline = tokio::time::Instant::now() + QUIET_LIMIT;
    loop {
        let counted = printer_counted.notified();
        if printer_received.load(Ordering::Relaxed) >= acknowledged {
            break;
        }
        if tokio::time::timeout_at(deadline, counted).await.is_err() {
            break;
        }
    }
    stop_printer.notify_one();
    let _ = printer_task.await;
    progress.clear();
    Ok(PublishResult {
        target: target.name.to_owned(),
        clients,
        sent: per_client * clients as u64,
        acknowledged,
        printer_received: printer_received.load(Ordering::Relaxed),
        puback: Percentiles::of(&mut latencies),
        failures,
    })
}

/// Scenario 4: a connect storm, then an edge restart.
#[derive(Debug, Clone, Serialize)]
pub struct StormResult {
    pub clients: usize,
    pub concurrency: usize,
    pub connected: usize,
    pub failures: BTreeMap<String, u64>,
    pub handshakes_per_second: f64,
    /// TCP connect to SUBACK, per client.
    pub handshake: Percentiles,
    pub sessions_open_at_edge: Option<f64>,
    /// SIGTERM to the old edge's exit (it closes every session with 1001).
    pub drain_seconds: f64,
    /// The new edge's process start to ready.
    pub start_seconds: f64,
    /// SIGTERM to the last client back (connected and subscribed).
    pub all_back_seconds: Option<f64>,
    pub back: usize,
    /// Attempts refused during the reconnect (e.g. CONNACK 3 while the agent
    /// is not yet back), by reason.
    pub reconnect_refusals: BTreeMap<String, u64>,
}

/// A tiny deterministic random source for backoff jitter.
struct Jitter(u64);

impl Jitter {
    fn below(&mut self, limit: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        limit.mul_f64((self.0 % 10_000) as f64 / 10_000.0)
    }
}

#[derive(Debug, Default)]
struct StormState {
    connected: AtomicUsize,
    back: AtomicUsize,
    restarting: std::sync::atomic::AtomicBool,
    changed: Notify,
    refusals: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl StormState {
    fn refused(&self, failure: &ConnectFailure) {
        if let Ok(mut refusals) = self.refusals.lock() {
            *refusals.entry(failure.to_string()).or_default() += 1;
        }
    }
}

/// What a storm client reports after its first connect.
type FirstConnect = Result<Duration, ConnectFailure>;

async fn storm_client(
    target: Target,
    index: usize,
    gate: Arc<Semaphore>,
    state: Arc<StormState>,
    first: mpsc::Sender<FirstConnect>,
    progress: Progress,
) {
    let client_id = format!("storm-{index}");
    let mut jitter =
        Jitter(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let connect = |target: Target, client_id: String| async move {
        let mut client = MqttClient::connect(&target, &client_id, ByteCounter::default()).await?;
        client
            .subscribe(&report_topic(), QoS::AtMostOnce)
            .await
            .map_err(|_| ConnectFailure::Closed)?;
        Ok::<_, ConnectFailure>(client)
    };
    let permit = gate.acquire_owned().await;
    let started = Instant::now();
    let result = connect(target.clone(), client_id.clone()).await;
    drop(permit);
    let mut client = match result {
        Ok(client) => {
            let _ = first.send(Ok(started.elapsed())).await;
            state.connected.fetch_add(1, Ordering::Relaxed);
            progress.add(1);
            client
        }
        Err(failure) => {
            let _ = first.send(Err(failure)).await;
            return;
        }
    };
    drop(first);
    // Hold the session until the edge closes it, then reconnect the way
    // MQTT.js does by default: about a second between attempts (here
    // spread at random over the first second, then 0.5–1.5 s).
    loop {
        while let Ok(Some(_)) = client.next().await {}
        if !state.restarting.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(jitter.below(Duration::from_secs(1))).await;
        loop {
            match connect(target.clone(), client_id.clone()).await {
                Ok(again) => {
                    client = again;
                    state.back.fetch_add(1, Ordering::Relaxed);
                    state.changed.notify_waiters();
                    progress.add(1);
                    break;
                }
                Err(failure) => {
                    state.refused(&failure);
                    tokio::time::sleep(
                        Duration::from_millis(500) + jitter.below(Duration::from_secs(1)),
                    )
                    .await;
                }
            }
        }
    }
}

pub async fn connect_storm(
    rig: &mut Rig,
    clients: usize,
    concurrency: usize,
    reconnect_limit: Duration,
    progress: &Progress,
) -> anyhow::Result<StormResult> {
    progress.step(
        format!("storm: {clients} clients connect and subscribe"),
        clients as u64,
    );
    let gate = Arc::new(Semaphore::new(concurrency));
    let state = Arc::new(StormState::default());
    let (first, mut firsts) = mpsc::channel(clients.max(1));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for index in 0..clients {
        tasks.push(tokio::spawn(storm_client(
            rig.relay.clone(),
            index,
            gate.clone(),
            state.clone(),
            first.clone(),
            progress.clone(),
        )));
    }
    drop(first);
    let mut handshakes = Vec::with_capacity(clients);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(result) = firsts.recv().await {
        match result {
            Ok(took) => handshakes.push(took),
            Err(failure) => *failures.entry(failure.to_string()).or_default() += 1,
        }
    }
    let storm_time = started.elapsed();
    let connected = handshakes.len();
    let sessions_open = metric(&rig.edge.metrics().await?, "relay_edge_sessions_open");

    // Restart the edge under the connected clients.
    progress.step("storm: edge restart, clients back", connected as u64);
    state.restarting.store(true, Ordering::Relaxed);
    let restart = Instant::now();
    rig.edge.terminate().await?;
    let drain = restart.elapsed();
    let starting = Instant::now();
    rig.edge.start_again().await?;
    let start = starting.elapsed();
    let deadline = restart + reconnect_limit;
    let mut all_back = None;
    loop {
        let changed = state.changed.notified();
        if state.back.load(Ordering::Relaxed) >= connected {
            all_back = Some(restart.elapsed());
            break;
        }
        if tokio::time::timeout_at(deadline.into(), changed)
            .await
            .is_err()
        {
            break;
        }
    }
    let back = state.back.load(Ordering::Relaxed);
    state.restarting.store(false, Ordering::Relaxed);
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    rig.wait_agents(Duration::from_secs(30))
        .await
        .context("the agent is not back after the restart")?;
    progress.clear();
    let refusals = state
        .refusals
        .lock()
        .map(|refusals| refusals.clone())
        .unwrap_or_default();
    Ok(StormResult {
        clients,
        concurrency,
        connected,
        failures,
        handshakes_per_second: connected as f64 / storm_time.as_secs_f64(),
        handshake: Percentiles::of(&mut handshakes),
        sessions_open_at_edge: sessions_open,
        drain_seconds: drain.as_secs_f64(),
        start_seconds: start.as_secs_f64(),
        all_back_seconds: all_back.map(|took| took.as_secs_f64()),
        back,
        reconnect_refusals: refusals,
    })
}

/// Scenario 5: idle sessions and memory.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// The path the sessions came in by: `relay` (wss) or `relay-mqtts`.
    pub target: String,
    pub sessions: usize,
    pub edge_rss_before_bytes: u64,
    pub edge_rss_with_sessions_bytes: u64,
    pub edge_rss_per_session_bytes: f64,
    pub edge_rss_after_close_bytes: u64,
    /// The kernel memory of the edge's side of the sessions' sockets
    /// (`ss -tmn`), and per session: not in the RSS.
    pub edge_socket_bytes: u64,
    pub edge_socket_bytes_per_session: f64,
    pub agent_rss_bytes: u64,
    pub sessions_open_at_edge: Option<f64>,
}

/// `sessions` idle subscribers on a fresh edge, coming in by `target`.
pub async fn idle_sessions(
    rig: &mut Rig,
    target: &Target,
    sessions: usize,
    progress: &Progress,
) -> anyhow::Result<IdleResult> {
    // A fresh edge, so that earlier scenarios' memory does not hide this
    // one's; one session first, so that the device's hub exists.
    progress.step("idle: fresh edge", 1);
    rig.edge.terminate().await?;
    rig.edge.start_again().await?;
    rig.wait_agents(Duration::from_secs(30)).await?;
    let bytes = ByteCounter::default();
    let first = subscribers(target, 1, &report_topic(), "idle-first", &bytes, progress).await?;
    let edge_pid = rig.edge.pid()?;
    let before = rss_bytes(edge_pid)?;
    let clients = subscribers(target, sessions, &report_topic(), "idle", &bytes, progress).await?;
    let sessions_open = metric(&rig.edge.metrics().await?, "relay_edge_sessions_open");
    let with_sessions = rss_bytes(edge_pid)?;
    let (sockets, socket_bytes) = crate::rig::socket_memory(target.addr.port())?;
    let agent = rss_bytes(rig.agent_pid()?)?;
    progress.step("idle: closing sessions", sessions as u64);
    for client in clients.into_iter().chain(first) {
        client.disconnect().await;
        progress.add(1);
    }
    // Closing is asynchronous at the edge; wait for its count to reach 0.
    let deadline = Instant::now() + QUIET_LIMIT;
    while Instant::now() < deadline {
        let open = metric(&rig.edge.metrics().await?, "relay_edge_sessions_open").unwrap_or(0.0);
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = rss_bytes(edge_pid)?;
    progress.clear();
    Ok(IdleResult {
        target: target.name.to_owned(),
        sessions,
        edge_rss_before_bytes: before,
        edge_rss_with_sessions_bytes: with_sessions,
        edge_rss_per_session_bytes: with_sessions.saturating_sub(before) as f64
            / sessions.max(1) as f64,
        edge_rss_after_close_bytes: after,
        edge_socket_bytes: socket_bytes,
        edge_socket_bytes_per_session: socket_bytes as f64 / sockets.max(1) as f64,
        agent_rss_bytes: agent,
        sessions_open_at_edge: sessions_open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printer_mix_is_one_full_report_and_ten_deltas_a_second() {
        let plan = printer_mix(3);
        let full = plan.iter().filter(|p| p.kind == kind::FULL_REPORT).count();
        let deltas = plan.iter().filter(|p| p.kind == kind::DELTA).count();
        assert_eq!((full, deltas), (3, 30));
        assert!(plan.windows(2).all(|pair| pair[0].at <= pair[1].at));
        assert_eq!(
            plan.last().map(|p| p.at),
            Some(Duration::from_millis(2_900))
        );
    }

    #[test]
    fn a_steady_plan_spaces_messages_evenly() {
        let plan = steady(1_000, 110, 2);
        assert_eq!(plan.len(), 2_000);
        assert_eq!(plan[1].at, Duration::from_millis(1));
        assert!(plan.iter().all(|p| p.size == 110));
    }
}
