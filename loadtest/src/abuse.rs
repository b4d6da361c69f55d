//! The `abuse` scenario: attacks from outside, on loopback and bounded,
//! beside one legitimate app. It reports what reached the printer during
//! each attack (the edge's own count of bytes it sent upstream, and the
//! PUBLISHes the printer side received), how the edge answered, the edge's
//! memory, and whether the legitimate app was served throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_proto::mqtt::{Packet, PacketId, QoS, Subscribe, Unsubscribe};
use serde::Serialize;

use crate::client::{ByteCounter, ConnectFailure, MqttClient, Target};
use crate::rig::SERIAL;
use crate::rig::{Rig, metric, rss_bytes};
use crate::scenarios::report_topic;
use crate::stats::Progress;

/// How big each attack is.
#[derive(Debug, Clone, Copy)]
pub struct AbuseSize {
    pub foreign_subscribes: u16,
    pub churn_rounds: u16,
    pub flood_publishes: u32,
    pub sessions: usize,
    pub guesses: u8,
}

#[derive(Debug, Serialize)]
pub struct AttackOutcome {
    pub attack: String,
    /// What the attacker sent.
    pub sent: String,
    /// How the edge answered.
    pub answered: String,
    /// Bytes the edge sent the printer while the attack ran.
    pub printer_bytes: f64,
}

#[derive(Debug, Serialize)]
pub struct AbuseReport {
    pub attacks: Vec<AttackOutcome>,
    /// PUBLISHes of the flood that reached the printer.
    pub flood_reached_printer: u64,
    /// The legitimate app: reports the printer sent, reports it got.
    pub legit_sent: u64,
    pub legit_received: u64,
    /// Whether its session stayed up throughout.
    pub legit_stayed_connected: bool,
    pub edge_rss_before_bytes: u64,
    pub edge_rss_peak_bytes: u64,
    pub edge_rss_after_bytes: u64,
}

async fn printer_bytes_out(rig: &Rig) -> f64 {
    match rig.edge.metrics().await {
        Ok(text) => {
            metric(&text, "relay_edge_printer_bytes_total{direction=\"out\"}").unwrap_or(0.0)
        }
        Err(_) => 0.0,
    }
}

async fn hub_refusals(rig: &Rig, what: &str) -> f64 {
    match rig.edge.metrics().await {
        Ok(text) => metric(
            &text,
            &format!("relay_edge_hub_refusals_total{{what=\"{what}\"}}"),
        )
        .unwrap_or(0.0),
        Err(_) => 0.0,
    }
}

/// The edge's RSS now, and the peak so far.
fn sample_rss(rig: &Rig, peak: &mut u64) -> u64 {
    let rss = rig.edge.pid().and_then(rss_bytes).unwrap_or_default();
    *peak = (*peak).max(rss);
    rss
}

fn subscribe(packet_id: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(packet_id.max(1)).unwrap_or(PacketId::MIN),
        filters: vec![(filter.to_owned(), QoS::AtMostOnce)],
    })
}

/// Reads until the session ends or goes quiet; counts SUBACK failures and
/// says how it ended.
async fn drain(client: &mut MqttClient, quiet: Duration) -> (u64, bool) {
    let mut refused = 0;
    loop {
        match tokio::time::timeout(quiet, client.next()).await {
            Ok(Ok(Some(Packet::SubAck(suback)))) => {
                refused += suback
                    .return_codes
                    .iter()
                    .filter(|code| **code == relay_proto::mqtt::SubscribeReturnCode::Failure)
                    .count() as u64;
            }
            Ok(Ok(Some(_))) => {}
            Ok(_) => return (refused, true),
            Err(_) => return (refused, false),
        }
    }
}

pub async fn abuse(rig: &Rig, size: AbuseSize, progress: &Progress) -> anyhow::Result<AbuseReport> {
    let mut peak = 0;
    let edge_rss_before_bytes = sample_rss(rig, &mut peak);
    let relay = &rig.relay;
    let bytes = ByteCounter::default();

    // The legitimate app: subscribed to the report, the printer publishing
    // 10 a second all along.
    let mut legit = MqttClient::connect(relay, "abuse-legit", bytes.clone())
        .await
        .map_err(|failure| anyhow::anyhow!("legitimate app: {failure}"))?;
    legit.subscribe(&report_topic(), QoS::AtMostOnce).await?;
    let mut printer = MqttClient::connect_tcp(rig.printer, "abuse-printer")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;
    let mut printer_requests = MqttClient::connect_tcp(rig.printer, "abuse-printer-requests")
        .await
        .map_err(|failure| anyhow::anyhow!("printer side: {failure}"))?;
    printer_requests
        .subscribe(&format!("device/{SERIAL}/request"), QoS::AtMostOnce)
        .await?;
    let done = Arc::new(AtomicBool::new(false));
    // The app reads until the printer's last report has had time to come.
    let reader_done = Arc::new(AtomicBool::new(false));
    let legit_received = Arc::new(AtomicU64::new(0));
    let legit_up = Arc::new(AtomicBool::new(true));
    let flood_received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (received, up, done) = (
            legit_received.clone(),
            legit_up.clone(),
            reader_done.clone(),
        );
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                match tokio::time::timeout(Duration::from_millis(500), legit.next()).await {
                    Ok(Ok(Some(Packet::Publish(_)))) => {
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(Some(_))) | Err(_) => {}
                    Ok(_) => {
                        up.store(false, Ordering::SeqCst);
                        return;
                    }
                }
            }
            legit.disconnect().await;
        })
    };
    let requests = {
        let (received, done) = (flood_received.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                if let Ok(Ok(Some(Packet::Publish(_)))) =
                    tokio::time::timeout(Duration::from_millis(500), printer_requests.next()).await
                {
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let reports = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !done.load(Ordering::SeqCst) {
                tick.tick().await;
                let payload = Bytes::from(format!("{{\"print\":{{\"sequence\":{sent}}}}}"));
                if printer
                    .publish(&report_topic(), QoS::AtMostOnce, payload)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            // The last reports are on their way to the app.
            tokio::time::sleep(Duration::from_millis(300)).await;
            sent
        })
    };

    let mut attacks = Vec::new();

    // 1. Another serial's topics and wide filters, from a read-only view.
    progress.step("abuse: foreign filters", 1);
    let before = printer_bytes_out(rig).await;
    let mut attacker = MqttClient::connect(relay, "abuse-foreign", bytes.clone())
        .await
        .map_err(|failure| anyhow::anyhow!("attacker: {failure}"))?;
    for index in 0..size.foreign_subscribes {
        let filter = match index % 3 {
            0 => "device/01P00A000000000/report".to_owned(),
            1 => "device/+/report".to_owned(),
            _ => "#".to_owned(),
        };
        attacker.send(&subscribe(index + 1, &filter)).await?;
    }
    let (refused, _) = drain(&mut attacker, Duration::from_millis(500)).await;
    attacker.disconnect().await;
    attacks.push(AttackOutcome {
        attack: "foreign filters".into(),
        sent: format!(
            "{} SUBSCRIBEs (another serial, device/+/report, #)",
            size.foreign_subscribes
        ),
        answered: format!("{refused} SUBACK 0x80"),
        printer_bytes: printer_bytes_out(rig).await - before,
    });
    sample_rss(rig, &mut peak);

    // 2. Subscription churn.
    progress.step("abuse: churn", 1);
    let before = printer_bytes_out(rig).await;
    let mut churner = MqttClient::connect(relay, "abuse-churn", bytes.clone())
        .await
        .map_err(|failure| anyhow::anyhow!("churner: {failure}"))?;
    let mut churned = 0u64;
    'rounds: for round in 0..size.churn_rounds {
        for index in 0..100u16 {
            let filter = format!("device/{SERIAL}/churn/{index}");
            if churner.send(&subscribe(index + 1, &filter)).await.is_err() {
                break 'rounds;
            }
            let unsubscribe = Packet::Unsubscribe(Unsubscribe {
                packet_id: PacketId::new(index + 101).unwrap_or(PacketId::MIN),
                filters: vec![filter],
            });
            if churner.send(&unsubscribe).await.is_err() {
                break 'rounds;
            }
            churned += 2;
        }
        let _ = round;
    }
    let (_, cut) = drain(&mut churner, Duration::from_secs(2)).await;
    attacks.push(AttackOutcome {
        attack: "subscription churn".into(),
        sent: format!("{churned} SUBSCRIBE + UNSUBSCRIBE packets"),
        answered: if cut {
            format!("cut ({} churn cuts)", hub_refusals(rig, "churn").await)
        } else {
            "not cut".into()
        },
        printer_bytes: printer_bytes_out(rig).await - before,
    });
    sample_rss(rig, &mut peak);

    // 3. A QoS 0 publish flood.
    progress.step("abuse: publish flood", 1);
    let before = printer_bytes_out(rig).await;
    let flood_before = flood_received.load(Ordering::SeqCst);
    let mut flooder = MqttClient::connect(relay, "abuse-flood", bytes.clone())
        .await
        .map_err(|failure| anyhow::anyhow!("flooder: {failure}"))?;
    let started = Instant::now();
    let request = format!("device/{SERIAL}/request");
    for _ in 0..size.flood_publishes {
        if flooder
            .publish(
                &request,
                QoS::AtMostOnce,
                Bytes::from_static(b"{\"flood\":1}"),
            )
            .await
            .is_err()
        {
            break;
        }
    }
    let flood_seconds = started.elapsed().as_secs_f64();
    // Fenced by a QoS 1 publish: its PUBACK comes after the flood is through.
    flooder
        .publish(
            &request,
            QoS::AtLeastOnce,
            Bytes::from_static(b"{\"fence\":1}"),
        )
        .await?;
    let _ = drain(&mut flooder, Duration::from_secs(1)).await;
    flooder.disconnect().await;
    attacks.push(AttackOutcome {
        attack: "publish flood".into(),
        sent: format!(
            "{} QoS 0 PUBLISHes in {:.2} s",
            size.flood_publishes, flood_seconds
        ),
        answered: format!(
            "{} dropped over the device's rate",
            hub_refusals(rig, "throttled").await
        ),
        printer_bytes: printer_bytes_out(rig).await - before,
    });
    sample_rss(rig, &mut peak);
    let flood_reached_printer = flood_received.load(Ordering::SeqCst) - flood_before;

    // 4. Thousands of sessions with one key, from one address.
    progress.step("abuse: sessions", size.sessions as u64);
    let one_key = Target {
        authorizations: relay.authorizations.iter().take(1).cloned().collect(),
        sources: 0,
        ..relay.clone()
    };
    let mut held = Vec::new();
    let mut refused_sessions = 0;
    for index in 0..size.sessions {
        match MqttClient::connect(&one_key, &format!("abuse-session-{index}"), bytes.clone()).await
        {
            Ok(client) => held.push(client),
            Err(ConnectFailure::Refused(3)) => refused_sessions += 1,
            Err(other) => anyhow::bail!("abuse sessions: {other}"),
        }
        progress.add(1);
    }
    sample_rss(rig, &mut peak);
    attacks.push(AttackOutcome {
        attack: "sessions".into(),
        sent: format!("{} sessions, one key, one address", size.sessions),
        answered: format!("{} accepted, {refused_sessions} CONNACK 3", held.len()),
        printer_bytes: 0.0,
    });
    for client in held {
        client.disconnect().await;
    }

    // 5. Guessing a key's secret.
    progress.step("abuse: guesses", u64::from(size.guesses));
    let key_id = relay
        .authorizations
        .first()
        .and_then(|bearer| bearer.strip_prefix("Bearer rly_"))
        .and_then(|rest| rest.split('_').next())
        .unwrap_or("")
        .to_owned();
    let (mut checked, mut limited) = (0, 0);
    for attempt in 0..size.guesses {
        use base64::Engine;
        let secret = format!(
            "abcdefghijklmnopqrstuvwx{}{}",
            (b'a' + attempt / 26) as char,
            (b'a' + attempt % 26) as char
        );
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key_id}:{secret}"));
        let guesser = Target {
            authorizations: vec![format!("Basic {basic}")],
            sources: 0,
            ..relay.clone()
        };
        match MqttClient::connect(&guesser, "abuse-guess", bytes.clone()).await {
            Err(ConnectFailure::Refused(4)) => checked += 1,
            Err(ConnectFailure::Refused(5)) => limited += 1,
            Ok(client) => {
                client.disconnect().await;
                anyhow::bail!("a guessed key got in");
            }
            Err(other) => anyhow::bail!("abuse guesses: {other}"),
        }
        progress.add(1);
    }
    attacks.push(AttackOutcome {
        attack: "key guessing".into(),
        sent: format!("{} wrong secrets for one key id, one address", size.guesses),
        answered: format!(
            "{checked} checked against the store (CONNACK 4), {limited} rate-limited (CONNACK 5)"
        ),
        printer_bytes: 0.0,
    });

    done.store(true, Ordering::SeqCst);
    let legit_sent = reports.await.unwrap_or(0);
    reader_done.store(true, Ordering::SeqCst);
    let _ = reader.await;
    let _ = requests.await;
    let edge_rss_after_bytes = sample_rss(rig, &mut peak);
    Ok(AbuseReport {
        attacks,
        flood_reached_printer,
        legit_sent,
        legit_received: legit_received.load(Ordering::SeqCst),
        legit_stayed_connected: legit_up.load(Ordering::SeqCst),
        edge_rss_before_bytes,
        edge_rss_peak_bytes: peak,
        edge_rss_after_bytes,
    })
}
