//! The cross-instance scenario: clients on one edge instance, the agent on
//! another, measured in the same run as the same-instance path. Latency
//! added by the peer link, peer-link bytes per printer message at growing
//! client counts on the other instance, and the time every client on the
//! surviving instances takes to receive again after a SIGKILL of the
//! instance holding the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use relay_proto::mqtt::{Packet, QoS};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::client::{ByteCounter, MqttClient};
use crate::rig::Rig;
use crate::scenarios::{self, Planned, StreamResult, report_topic};
use crate::stats::{Percentiles, Progress, kind, read_stamp, stamped};

#[derive(Debug, Clone, Serialize)]
pub struct CrossReport {
    /// The same-instance path (`relay`) and the cross-instance one
    /// (`relay-cross`), back to back with the same plan.
    pub latency: Vec<StreamResult>,
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    /// The cross-instance path at each client count.
    pub fan_out: Vec<StreamResult>,
    pub failover: FailoverResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    /// Clients on the two surviving instances together.
    pub clients: usize,
    /// The agent's QUIC keep-alive: the shipped default. The agent
    /// notices the dead instance when what it sends goes unanswered for
    /// 3 s, not by the keep-alive.
    pub agent_keep_alive_seconds: u64,
    /// Clients that received a message sent after the kill, within the
    /// patience.
    pub resumed: usize,
    /// From the SIGKILL to each client's first message sent after it.
    pub resume_us: Percentiles,
    /// Clients that lost their connection meanwhile (none should).
    pub disconnected: usize,
}

fn delta(runs: &[StreamResult], pick: impl Fn(&Percentiles) -> f64) -> Option<f64> {
    let of = |target: &str| {
        runs.iter()
            .find(|run| run.target == target)
            .and_then(|run| run.latency.get("delta"))
            .map(&pick)
    };
    Some(of("relay-cross")? - of("relay")?)
}

pub async fn cross_instance(
    rig: &mut Rig,
    latency_plan: &[Planned],
    fan_out: &[usize],
    fan_out_seconds: u32,
    failover_clients: usize,
    progress: &Progress,
) -> anyhow::Result<CrossReport> {
    let mut latency = Vec::new();
    for target in [rig.relay.clone(), rig.relay_cross.clone()] {
        latency.push(scenarios::stream(rig, &target, 1, latency_plan, progress).await?);
    }
    let added_p50_us = delta(&latency, |p| p.p50_us);
    let added_p99_us = delta(&latency, |p| p.p99_us);
    let plan = scenarios::printer_mix(fan_out_seconds);
    let mut runs = Vec::new();
    for &subscribers in fan_out {
        let target = rig.relay_cross.clone();
        runs.push(scenarios::stream(rig, &target, subscribers, &plan, progress).await?);
    }
    let failover = failover(rig, failover_clients, progress).await?;
    Ok(CrossReport {
        latency,
        added_p50_us,
        added_p99_us,
        fan_out: runs,
        failover,
    })
}

/// How long the clients on the survivors wait for a message at most.
const FAILOVER_PATIENCE: Duration = Duration::from_secs(60);

async fn failover(
    rig: &mut Rig,
    clients: usize,
    progress: &Progress,
) -> anyhow::Result<FailoverResult> {
    rig.restart_agent_for_failover().await?;
    let bytes = ByteCounter::default();
    let topic = report_topic();
    let half = clients / 2;
    let mut subscribers = scenarios::subscribers(
        &rig.relay_cross,
        half,
        &topic,
        "failover-cross",
        &bytes,
        progress,
    )
    .await?;
    subscribers.extend(
        scenarios::subscribers(
            &rig.relay_spare,
            clients - half,
            &topic,
            "failover-spare",
            &bytes,
            progress,
        )
        .await?,
    );
    let mut printer = MqttClient::connect_tcp(rig.printer, "loadtest-printer-failover")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;
    let epoch = Instant::now();
    // Messages from this sequence on were sent after the kill.
    let after_kill = Arc::new(AtomicU64::new(u64::MAX));
    let warm = Arc::new(AtomicUsize::new(0));
    let warmed = Arc::new(Notify::new());
    let (resumed, mut resumptions) = mpsc::channel::<Option<Instant>>(clients.max(1));
    for mut client in subscribers {
        let after_kill = after_kill.clone();
        let warm = warm.clone();
        let warmed = warmed.clone();
        let resumed = resumed.clone();
        tokio::spawn(async move {
            let mut counted = false;
            loop {
                match client.next().await {
                    Ok(Some(Packet::Publish(publish))) => {
                        let Some(stamp) = read_stamp(epoch, &publish.payload) else {
                            continue;
                        };
                        if !counted {
                            counted = true;
                            warm.fetch_add(1, Ordering::SeqCst);
                            warmed.notify_one();
                        }
                        if stamp.sequence >= after_kill.load(Ordering::SeqCst) {
                            let _ = resumed.send(Some(Instant::now())).await;
                            client.disconnect().await;
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        let _ = resumed.send(None).await;
                        return;
                    }
                }
            }
        });
    }
    drop(resumed);
    // Every client has a message before the kill.
    progress.step("failover: warming up", clients as u64);
    let mut sequence = 0u64;
    let deadline = Instant::now() + FAILOVER_PATIENCE;
    while warm.load(Ordering::SeqCst) < clients {
        printer
            .publish(
                &topic,
                QoS::AtMostOnce,
                stamped(epoch, sequence, kind::WARM_UP, 32),
            )
            .await?;
        sequence += 1;
        let _ = tokio::time::timeout(Duration::from_millis(50), warmed.notified()).await;
        if Instant::now() > deadline {
            bail!(
                "failover: only {} of {clients} clients got a message",
                warm.load(Ordering::SeqCst)
            );
        }
    }
    progress.step(
        "failover: the owner killed, waiting for every client",
        clients as u64,
    );
    rig.edge.kill().await?;
    let killed = Instant::now();
    after_kill.store(sequence, Ordering::SeqCst);
    let mut times = Vec::with_capacity(clients);
    let mut disconnected = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while times.len() + disconnected < clients && killed.elapsed() < FAILOVER_PATIENCE {
        tokio::select! {
            _ = tick.tick() => {
                printer
                    .publish(&topic, QoS::AtMostOnce, stamped(epoch, sequence, kind::WARM_UP, 32))
                    .await?;
                sequence += 1;
            }
            resumption = resumptions.recv() => match resumption {
                Some(Some(at)) => {
                    times.push(at.saturating_duration_since(killed));
                    progress.add(1);
                }
                Some(None) => disconnected += 1,
                None => break,
            },
        }
    }
    printer.disconnect().await;
    progress.clear();
    Ok(FailoverResult {
        clients,
        // The agent's default (relay-agent's `edge.keep_alive_seconds`).
        agent_keep_alive_seconds: 25,
        resumed: times.len(),
        resume_us: Percentiles::of(&mut times),
        disconnected,
    })
}
