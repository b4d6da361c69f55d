//! No app can make the agent hammer the printer: a generic broker (the
//! simulator, plain MQTT, behind an agent of kind `mqtt`) that drops a
//! client subscribing to another serial's topics, as a real Bambu printer,
//! AWS IoT or HiveMQ with ACLs do, sees at most three connections in the
//! minute after a read-only app asks for such a topic, however often the
//! app asks again; and a printer that refuses the access code is dialled
//! at most once a second, then more slowly, however often apps connect.
//!
//! Both measure a minute, side by side in one test. The tunnel's transport
//! plays no part, so the suite's run over TCP skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use relay_agent::config::AgentConfig;
use relay_proto::mqtt::{Packet, PacketId, QoS, Subscribe, SubscribeReturnCode};
use relay_proto::mqtt5;
use relay_testkit::world::*;
use tokio_util::sync::CancellationToken;

/// How long each scenario watches the printer.
const WINDOW: Duration = Duration::from_secs(60);

/// A generic broker: the simulator without TLS, reporting every 200 ms.
async fn generic_broker() -> RunningSimulator {
    let mut config = SimulatorConfig::new(SERIAL, ACCESS_CODE);
    config.tls = false;
    config.report_interval = Duration::from_millis(200);
    RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// An edge, and an agent of kind `mqtt` logging in to `broker` with
/// `password`, connected.
async fn edge_with_generic_agent(
    broker: &RunningSimulator,
    password: &str,
) -> (TestEdge, CancellationToken) {
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        // The default: apps ride out a printer drop.
        config.tunnel.upstream_grace_seconds = 30;
    })
    .await;
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let edge_ca = write(&edge.pki.dir, "edge-ca.pem", &edge.pki.ca_pem());
    let config = AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{}"
        server_name = "tunnel.{BASE_DOMAIN}"
        ca_file = "{}"
        credential = "{}"

        [printer]
        kind = "mqtt"
        host = "127.0.0.1"
        port = {}
        username = "bblp"
        password = "{password}"
        tls = false
        "#,
        edge.edge.as_ref().unwrap().tunnel_addr.unwrap(),
        edge_ca.display(),
        credential.reveal(),
        broker.addr.port(),
    ))
    .unwrap();
    let agent = start_agent(config);
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .expect("the agent connected");
    (edge, agent)
}

fn subscribe(packet_id: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(packet_id).unwrap(),
        filters: vec![(filter.to_owned(), QoS::AtMostOnce)],
    })
}

/// The SUBACK's return code, skipping anything else.
async fn suback_code(client: &mut Client) -> SubscribeReturnCode {
    loop {
        match client.next().await {
            Some(Packet::SubAck(ack)) => return ack.return_codes[0],
            Some(_) => {}
            None => panic!("closed before SUBACK: {:?}", client.closed_with),
        }
    }
}

/// A read-only app subscribes to another serial's report, then reconnects
/// and asks again every second for the rest of the minute, while a
/// legitimate app watches the printer's own report.
async fn poisoned_filter() {
    let broker = generic_broker().await;
    let observations = broker.observations();
    let (edge, _agent) = edge_with_generic_agent(&broker, ACCESS_CODE).await;
    let full = edge.bearer();
    let read_only = edge.read_bearer().await;

    let mut watcher = Client::connect(&edge, &full, connect_packet("watcher")).await;
    watcher.send(&subscribe(1, &report_topic())).await;
    assert_eq!(
        suback_code(&mut watcher).await,
        SubscribeReturnCode::Success(QoS::AtMostOnce)
    );
    // Reports flow: the printer's connection is up.
    next_publish(&mut watcher).await;
    let before = observations.connections.load(Ordering::SeqCst);
    let started = Instant::now();

    // The watcher's reports, timed, until the window ends.
    let watching = tokio::spawn(async move {
        let mut arrivals = Vec::new();
        while started.elapsed() < WINDOW {
            match tokio::time::timeout(Duration::from_secs(40), watcher.next()).await {
                Ok(Some(Packet::Publish(_))) => arrivals.push(started.elapsed()),
                Ok(Some(_)) => {}
                Ok(None) => panic!("the watcher was closed: {:?}", watcher.closed_with),
                Err(_) => panic!("no report for 40 s"),
            }
        }
        arrivals
    });

    let foreign = "device/01P00A999999999/report";
    let mut attacker = Client::connect(&edge, &read_only, connect_packet("attacker")).await;
    attacker.send(&subscribe(7, foreign)).await;
    // Two printer connections end on it; then it is quarantined.
    assert_eq!(
        suback_code(&mut attacker).await,
        SubscribeReturnCode::Failure
    );
    let foreign_drops = observations.foreign_subscribes.load(Ordering::SeqCst);
    assert_eq!(foreign_drops, 2, "the first SUBSCRIBE and its trial");
    // An MQTT 5 client asking for it hears 0x87 (not authorized).
    let (mut v5, connack) =
        V5Client::connect(&edge, &read_only, V5Client::connect_packet("attacker-v5")).await;
    assert!(connack.is_some());
    v5.send(&mqtt5::Packet::Subscribe(mqtt5::Subscribe {
        packet_id: PacketId::new(3).unwrap(),
        properties: mqtt5::Properties::new(),
        filters: vec![(
            foreign.to_owned(),
            mqtt5::SubscriptionOptions::at(QoS::AtMostOnce),
        )],
    }))
    .await;
    match v5.next().await {
        Some(mqtt5::Packet::SubAck(ack)) => {
            assert_eq!(ack.reasons, vec![mqtt5::ReasonCode::NOT_AUTHORIZED])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    drop(v5);
    // It comes back every second and asks again: refused at once.
    let mut attempts = 0;
    while started.elapsed() < WINDOW - Duration::from_secs(2) {
        drop(attacker);
        attacker = Client::connect(&edge, &read_only, connect_packet("attacker")).await;
        attacker.send(&subscribe(7, foreign)).await;
        assert_eq!(
            suback_code(&mut attacker).await,
            SubscribeReturnCode::Failure
        );
        attempts += 1;
        let next = tokio::time::Instant::now() + Duration::from_secs(1);
        tokio::time::sleep_until(next).await;
    }
    let arrivals = watching.await.unwrap();
    let connections = observations.connections.load(Ordering::SeqCst) - before;
    let gaps: Vec<Duration> = arrivals.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    let long_gaps = gaps
        .iter()
        .filter(|gap| **gap > Duration::from_secs(1))
        .count();
    println!(
        "poisoned filter: {connections} printer connections in {:?}; {attempts} more SUBSCRIBEs refused at the edge; \
         the watcher got {} reports, longest gap {longest:?}, {long_gaps} gaps over 1 s",
        WINDOW,
        arrivals.len(),
    );
    assert!(connections <= 3, "{connections} printer connections");
    assert_eq!(
        observations.foreign_subscribes.load(Ordering::SeqCst),
        2,
        "never asked again"
    );
    assert!(attempts >= 40, "{attempts}");
    // Each of the two drops costs the watcher one gap within the grace.
    assert!(longest < Duration::from_secs(30), "{longest:?}");
    assert!(long_gaps <= 2, "{gaps:?}");
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_hub_quarantined_filters_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_edge_hub_refusals_total{what=\"quarantined_filter\"}"),
        "{metrics}"
    );
}

/// Apps connect five times a second for a minute to a device whose agent
/// has the wrong access code.
async fn refusing_printer() {
    let broker = generic_broker().await;
    let observations = broker.observations();
    let (edge, _agent) = edge_with_generic_agent(&broker, "wrong-code").await;
    let full = edge.bearer();
    let started = Instant::now();
    // The printer's count when the minute is up (an app still waiting
    // then may be served by one more dial after it).
    let at_minute = {
        let observations = observations.clone();
        let end = tokio::time::Instant::from_std(started + WINDOW);
        tokio::spawn(async move {
            tokio::time::sleep_until(end).await;
            observations.refused_credentials.load(Ordering::SeqCst)
        })
    };
    let mut refused_apps = 0;
    while started.elapsed() < WINDOW {
        let mut socket = edge.open_device("/mqtt", &[("authorization", &full)]).await;
        send_connect(&mut socket, connect_packet("hammer")).await;
        let refusal = refusal(&mut socket).await;
        assert_eq!(refusal.connack, Some(3), "{refusal:?}");
        refused_apps += 1;
        tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(200)).await;
    }
    let dials = at_minute.await.unwrap();
    println!(
        "refusing printer: {dials} printer connections in {WINDOW:?} while {refused_apps} app connections were refused"
    );
    assert!(dials >= 2, "dialled again: {dials}");
    // 0, 1, 3, 7, 15, 31 s (+ up to a fifth): never more than once a
    // second, then more slowly.
    assert!(dials <= 6, "{dials} dials");
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_printer_link_downs_total{reason=\"credentials_refused\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_app_can_make_the_agent_hammer_the_printer() {
    if test_transport() == "tcp" {
        println!("the tunnel's transport plays no part here: run over QUIC only");
        return;
    }
    tokio::join!(poisoned_filter(), refusing_printer());
}
