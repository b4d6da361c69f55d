//! The relay measured end to end, in one process on loopback: printer →
//! client latency through edge, QUIC tunnel and agent, beside a client
//! connected straight to the printer simulator in the same run; fan-out of a
//! 4.4 KB report to 1, 100 and 1,000 subscribers; and tunnel bytes per
//! printer message at 1 and 100 subscribers (they must be equal).
//!
//! `cargo bench -p relay-e2e --bench relay` (needs the local Postgres).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use relay_proto::mqtt::{self, Packet, PacketId, QoS, Subscribe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use world::*;

const TOPIC: &str = "bench/stream";

fn subscribe_bench() -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::MIN,
        filters: vec![("bench/#".into(), QoS::AtMostOnce)],
    })
}

/// A payload of `size` bytes that starts with its send time (nanoseconds
/// since `epoch`) and a sequence number.
fn stamped(epoch: Instant, sequence: u64, size: usize) -> Bytes {
    let mut payload = BytesMut::with_capacity(size);
    payload.put_u64(epoch.elapsed().as_nanos() as u64);
    payload.put_u64(sequence);
    payload.resize(size.max(16), b'x');
    payload.freeze()
}

fn latency_of(epoch: Instant, payload: &[u8]) -> Duration {
    let sent = u64::from_be_bytes(payload[..8].try_into().unwrap());
    Duration::from_nanos((epoch.elapsed().as_nanos() as u64).saturating_sub(sent))
}

fn summary(name: &str, mut samples: Vec<Duration>, expected: usize) {
    samples.sort();
    if samples.is_empty() {
        println!("{name:<52} nothing received");
        return;
    }
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<52} p50 {:>9.1?}  p90 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}  lost {}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0),
        expected.saturating_sub(samples.len())
    );
}

/// Collects latencies of `expected` bench messages on a relay client.
async fn collect_relay(
    mut client: Client,
    epoch: Instant,
    expected: usize,
    results: mpsc::Sender<Vec<Duration>>,
) {
    let mut samples = Vec::with_capacity(expected);
    while samples.len() < expected {
        match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Some(Packet::Publish(publish))) if publish.topic == TOPIC => {
                samples.push(latency_of(epoch, &publish.payload))
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let _ = results.send(samples).await;
}

async fn relay_subscribers(world: &World, count: usize) -> Vec<Client> {
    let bearer = world.edge.bearer();
    let mut clients = Vec::with_capacity(count);
    for index in 0..count {
        let mut client = Client::connect(
            &world.edge,
            &bearer,
            connect_packet(&format!("bench-{index}")),
        )
        .await;
        client.send(&subscribe_bench()).await;
        while !matches!(client.next().await, Some(Packet::SubAck(_))) {}
        clients.push(client);
    }
    clients
}

/// Publishes `count` stamped messages of `size` bytes at `rate` per second.
async fn publish_paced(world: &World, epoch: Instant, count: usize, size: usize, rate: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    for sequence in 0..count as u64 {
        tick.tick().await;
        world
            .simulator
            .publish(TOPIC, stamped(epoch, sequence, size));
    }
}

async fn printer_bytes_in(world: &World) -> f64 {
    let metrics = world.edge.admin_get("/metrics").await.1;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("relay_edge_printer_bytes_total{direction=\"in\"} "))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (latency_count, fan_out_sizes, fan_out_count): (usize, &[usize], usize) = if full {
        (2_000, &[1, 100, 1_000], 20)
    } else {
        (20, &[1, 3], 3)
    };
    let world = world(ACCESS_CODE).await;
    let epoch = Instant::now();

    // 1. Latency at 110 B × 1,000/s: through the relay, and straight to the
    //    simulator (the agent's own printer connection code, in this process).
    let (relay_results, mut relay_received) = mpsc::channel(1);
    let relay_client = relay_subscribers(&world, 1).await.pop().unwrap();
    tokio::spawn(collect_relay(
        relay_client,
        epoch,
        latency_count,
        relay_results,
    ));
    let printer = world_printer_config(&world);
    let (mut direct, mut buffer) = relay_agent::printer::connect(&printer).await.unwrap();
    let mut subscribe = BytesMut::new();
    mqtt::encode(&subscribe_bench(), &mut subscribe).unwrap();
    direct.write_all(&subscribe).await.unwrap();
    // Wait for the SUBACK, so that no message is published before the
    // direct subscription exists.
    'suback: loop {
        while let Some(packet) = mqtt::decode(&mut buffer, 1 << 20).unwrap() {
            if matches!(packet, Packet::SubAck(_)) {
                break 'suback;
            }
        }
        direct.read_buf(&mut buffer).await.unwrap();
    }
    let (direct_results, mut direct_received) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut samples = Vec::new();
        while samples.len() < latency_count {
            while let Some(packet) = mqtt::decode(&mut buffer, 1 << 20).unwrap() {
                if let Packet::Publish(publish) = packet
                    && publish.topic == TOPIC
                {
                    samples.push(latency_of(epoch, &publish.payload));
                }
            }
            if samples.len() >= latency_count {
                break;
            }
            match tokio::time::timeout(Duration::from_secs(5), direct.read_buf(&mut buffer)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => break,
            }
        }
        let _ = direct_results.send(samples).await;
    });
    publish_paced(&world, epoch, latency_count, 110, 1_000).await;
    let mut relay = relay_received.recv().await.unwrap();
    let mut direct_samples = direct_received.recv().await.unwrap();
    relay.sort();
    direct_samples.sort();
    println!("printer → client latency, 110 B at 1,000 msg/s, {latency_count} messages:");
    summary(
        "  through the relay (wss, edge, QUIC, agent)",
        relay.clone(),
        latency_count,
    );
    summary(
        "  direct to the simulator (TLS MQTT)",
        direct_samples.clone(),
        latency_count,
    );
    if !relay.is_empty() && !direct_samples.is_empty() {
        let added = relay[relay.len() / 2].saturating_sub(direct_samples[direct_samples.len() / 2]);
        println!("  added p50 latency: {added:.1?}");
    }

    // 2. Fan-out of a 4.4 KB report, and 3. tunnel bytes per message.
    println!("fan-out of a 4.4 KB report, {fan_out_count} messages at 10/s:");
    for &subscribers in fan_out_sizes {
        let clients = relay_subscribers(&world, subscribers).await;
        let (results, mut received) = mpsc::channel(subscribers);
        for client in clients {
            tokio::spawn(collect_relay(client, epoch, fan_out_count, results.clone()));
        }
        let before = printer_bytes_in(&world).await;
        publish_paced(&world, epoch, fan_out_count, 4_400, 10).await;
        let mut all = Vec::new();
        for _ in 0..subscribers {
            all.extend(received.recv().await.unwrap());
        }
        let after = printer_bytes_in(&world).await;
        summary(
            &format!("  {subscribers:>5} subscribers"),
            all,
            subscribers * fan_out_count,
        );
        // Periodic reports from the simulator (on another topic) also cross
        // the tunnel only if subscribed; bench clients hold only bench/#.
        println!(
            "  {subscribers:>5} subscribers: tunnel bytes from the printer per message: {:.0}",
            (after - before) / fan_out_count as f64
        );
    }
    world.agent.cancel();
    world.edge.stop().await;
}

fn world_printer_config(world: &World) -> relay_agent::config::PrinterConfig {
    let dir = &world.edge.pki.dir;
    let printer_ca = write(dir, "bench-printer-ca.pem", &world.simulator.ca_pem);
    relay_agent::config::AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "127.0.0.1:1"
        ca_file = "{}"
        credential = "rla_unused"
        [printer]
        kind = "bambu"
        host = "127.0.0.1"
        port = {}
        serial = "{SERIAL}"
        access_code = "{ACCESS_CODE}"
        ca_file = "{}"
        "#,
        printer_ca.display(),
        world.simulator.addr.port(),
        printer_ca.display()
    ))
    .unwrap()
    .validate()
    .unwrap()
}
