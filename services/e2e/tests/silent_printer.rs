//! A printer that goes silent (keeps its connection, answers nothing) is
//! noticed and reconnected before any app gives up, at the defaults:
//!
//! - the Bambu simulator going silent (firmware 01.04's "connected, no
//!   data") and half-open (it stops reading), each while three apps watch:
//!   the edge asks for `pushall` 20 s after the last report and ends the
//!   connection 10 s later; the agent makes a new one and every app gets
//!   reports again, none disconnected;
//! - a Mosquitto stopped with SIGSTOP: noticed by the PINGRESP deadline,
//!   and a QoS 1 PUBLISH that waited is delivered once it is resumed.
//!
//! The watchdogs are the edge's; the tunnel's transport plays no part, so
//! the suite's run over TCP skips these.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_proto::mqtt::{Packet, PacketId, Publish, QoS, Subscribe};
use relay_testkit::mosquitto::{agent_config, start_broker};
use relay_testkit::world::*;

/// Three apps watch the report; the printer goes quiet as `silence` says.
async fn three_apps_ride_out(silence: Silence) -> Duration {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.tunnel.upstream_grace_seconds = 30,
        |_| {},
    )
    .await;
    let bearer = world.edge.bearer();
    let mut apps = Vec::new();
    for index in 0..3u16 {
        let mut app = Client::connect(
            &world.edge,
            &bearer,
            connect_packet(&format!("app-{index}")),
        )
        .await;
        app.send(&subscribe_report(1)).await;
        next_publish(&mut app).await;
        apps.push(app);
    }
    let observations = world.simulator.observations();
    let connections = observations.connections.load(Ordering::SeqCst);
    let silent_at = Instant::now();
    world.simulator.go_silent(silence);
    // The agent makes a new connection once the edge has found the
    // printer silent (30 s at the defaults, after the last report).
    tokio::time::timeout(
        Duration::from_secs(40),
        observations.wait_until(|seen| seen.connections.load(Ordering::SeqCst) > connections),
    )
    .await
    .expect("a new printer connection");
    let reconnected = silent_at.elapsed();
    // Every app gets reports again, on the same session.
    let mut again = Duration::ZERO;
    for app in &mut apps {
        loop {
            let report = tokio::time::timeout(Duration::from_secs(10), next_publish(app))
                .await
                .expect("reports again");
            assert_eq!(report.topic, report_topic());
            if silent_at.elapsed() > reconnected {
                break;
            }
        }
        again = again.max(silent_at.elapsed());
        assert!(app.closed_with.is_none());
    }
    if silence == Silence::Silent {
        // The silent connection was closed by the agent (a half-open one
        // is never read again, so the simulator cannot tell).
        tokio::time::timeout(
            PATIENCE,
            observations.wait_until(|seen| seen.silenced_closed.load(Ordering::SeqCst) >= 1),
        )
        .await
        .expect("the silent connection closed");
    }
    // What `relayctl device show` prints: recorded before the new
    // connection was asked for.
    let status = world
        .edge
        .database
        .store
        .printer_status(&world.edge.device)
        .await
        .unwrap()
        .expect("a printer status");
    assert_eq!(
        status.reconnects.get("silent_report"),
        Some(&1),
        "{status:?}"
    );
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"relay_edge_printer_silences_total{watchdog="report"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"relay_edge_hub_refusals_total{what="watchdog_pushall"} 1"#),
        "{metrics}"
    );
    println!(
        "{silence:?}: a new printer connection {reconnected:?} after the silence, all three apps had reports again {again:?} after it"
    );
    world.agent.cancel();
    world.edge.stop().await;
    again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_half_open_printer_is_reconnected_while_apps_watch() {
    if test_transport() == "tcp" {
        println!("the watchdogs are the edge's: run over QUIC only");
        return;
    }
    let (silent, half_open) = tokio::join!(
        three_apps_ride_out(Silence::Silent),
        three_apps_ride_out(Silence::HalfOpen)
    );
    // 20 s to the pushall, 10 s to its answer, then the new connection.
    for again in [silent, half_open] {
        assert!(again < Duration::from_secs(35), "{again:?}");
    }
}

/// A generic broker stopped with SIGSTOP (its TCP connections stay open,
/// nothing answers): the PINGRESP deadline ends the printer connection, a
/// QoS 1 PUBLISH that was waiting is re-sent on the new one once the broker
/// runs again, and both apps stay connected.
#[tokio::test]
async fn a_stopped_broker_is_noticed_by_the_pingresp_deadline_and_nothing_waiting_is_lost() {
    if test_transport() == "tcp" {
        println!("the watchdogs are the edge's: run over QUIC only");
        return;
    }
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        config.tunnel.upstream_grace_seconds = 30;
        config.tunnel.printer_keep_alive_seconds = 1;
    })
    .await;
    let (broker, ca) = start_broker(&edge.pki.dir);
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let config = agent_config(
        &edge,
        &broker,
        &ca,
        relay_testkit::mosquitto::PASSWORD,
        &credential.reveal(),
    );
    let agent = start_agent(config);
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .unwrap();

    let topic = format!(
        "relay-test/{}/cmd",
        relay_store::credential::random_base32(8).unwrap()
    );
    let bearer = edge.bearer();
    let mut listener = Client::connect(&edge, &bearer, connect_packet("listener")).await;
    listener
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![(topic.clone(), QoS::AtLeastOnce)],
        }))
        .await;
    assert!(matches!(listener.next().await, Some(Packet::SubAck(_))));
    let mut talker = Client::connect(&edge, &bearer, connect_packet("talker")).await;

    let pid = broker.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    talker
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id: PacketId::new(5),
            payload: Bytes::from_static(b"waited"),
        }))
        .await;
    // Noticed: no PINGRESP within 1.5 s of a PINGREQ.
    let noticed = async {
        loop {
            let metrics = edge.admin_get("/metrics").await.1;
            if metrics.contains(r#"relay_edge_printer_silences_total{watchdog="pingresp"} 1"#) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, noticed)
        .await
        .expect("the silence noticed");
    let status = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    // The PUBLISH reaches the broker (and the listener) and is
    // acknowledged to the talker, at least once.
    assert_eq!(
        talker.next().await,
        Some(Packet::PubAck(PacketId::new(5).unwrap()))
    );
    loop {
        match listener.next().await {
            Some(Packet::Publish(publish)) => {
                assert_eq!(&publish.payload[..], b"waited");
                if let Some(id) = publish.packet_id {
                    listener.send(&Packet::PubAck(id)).await;
                }
                break;
            }
            Some(_) => {}
            None => panic!("the listener was closed: {:?}", listener.closed_with),
        }
    }
    assert!(talker.closed_with.is_none());
    agent.cancel();
    edge.stop().await;
}
