//! An app reaches a printer through the edge, the QUIC tunnel and the agent:
//! every client shares the agent's one printer connection.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::mqtt::{Packet, PacketId, Publish, QoS};
use world::*;

#[tokio::test]
async fn a_client_subscribes_and_commands_the_printer() {
    let world = world(ACCESS_CODE).await;
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    let report = next_publish(&mut client).await;
    assert_eq!(report.topic, report_topic());

    client
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("device/{SERIAL}/request"),
            packet_id: Some(PacketId::new(7).unwrap()),
            payload: Bytes::from_static(br#"{"pushing":{"sequence_id":"1","command":"pushall"}}"#),
        }))
        .await;
    let mut acked = false;
    let mut full_report = false;
    while !(acked && full_report) {
        match client.next().await {
            Some(Packet::PubAck(id)) => acked = id.get() == 7,
            Some(Packet::Publish(publish)) => full_report |= publish.payload.len() > 4_000,
            other => panic!("unexpected {other:?}"),
        }
    }
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn twenty_clients_share_one_printer_connection() {
    let world = world(ACCESS_CODE).await;
    let bearer = world.edge.bearer();
    let mut clients = Vec::new();
    for index in 0..20 {
        let mut client = Client::connect(
            &world.edge,
            &bearer,
            connect_packet(&format!("viewer-{index}")),
        )
        .await;
        client.send(&subscribe_report(1)).await;
        assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
        clients.push(client);
    }
    for client in &mut clients {
        assert_eq!(next_publish(client).await.topic, report_topic());
    }
    let observations = world.simulator.observations();
    assert_eq!(
        observations.connections.load(Ordering::Relaxed),
        1,
        "one printer connection for everyone"
    );
    assert_eq!(
        observations.subscribe_log(),
        vec![vec![report_topic()]],
        "one SUBSCRIBE upstream"
    );
    assert!(observations.max_concurrent.load(Ordering::Relaxed) <= 4);
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn a_printer_that_refuses_the_agent_gives_connack_3_and_close_1014() {
    let world = world("wrongcod").await;
    let mut socket = world
        .edge
        .open_device("/mqtt", &[("authorization", &world.edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("app")).await;
    let answer = refusal(&mut socket).await;
    assert_eq!(answer.connack, Some(3));
    // tungstenite does not know 1014 and reports its own 1002; the edge's
    // count shows what it sent.
    world.edge.assert_closes_counted(1014, 1).await;
    assert_eq!(
        world
            .simulator
            .observations()
            .refused_credentials
            .load(Ordering::Relaxed),
        1
    );
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn losing_the_agent_closes_sessions_with_1013_and_recovery_works() {
    let world = world(ACCESS_CODE).await;
    let bearer = world.edge.bearer();
    let mut client = Client::connect(&world.edge, &bearer, connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    world.agent.cancel();
    assert_eq!(client.closed().await, Some((1013, "device offline".into())));
    let mut socket = world
        .edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    send_connect(&mut socket, connect_packet("later")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1013, "device offline")
    );
    world.edge.stop().await;
}

/// A printer that drops every client (it reboots, its Wi-Fi blinks) costs
/// the apps nothing: within the grace the agent reconnects to it, the hub
/// opens a new printer link and resubscribes, and the same session
/// receives again.
#[tokio::test]
async fn a_printer_dropping_everyone_keeps_the_sessions_and_they_receive_again() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.tunnel.upstream_grace_seconds = 30,
        |_| {},
    )
    .await;
    let bearer = world.edge.bearer();
    let mut client = Client::connect(&world.edge, &bearer, connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;
    let observations = world.simulator.observations();
    world.simulator.drop_all_clients();
    observations
        .wait_until(|seen| seen.connections.load(Ordering::Relaxed) >= 2)
        .await;
    // Reports from the new printer connection reach the same session.
    let before = observations.subscribe_log().len();
    observations
        .wait_until(|seen| seen.subscribe_log().len() > before)
        .await;
    world
        .simulator
        .publish_report(bytes::Bytes::from_static(b"{\"after\":\"the drop\"}"));
    loop {
        let publish = next_publish(&mut client).await;
        if publish.payload.as_ref() == b"{\"after\":\"the drop\"}" {
            break;
        }
    }
    assert_eq!(client.closed_with, None);
    assert!(
        world
            .edge
            .admin_get("/metrics")
            .await
            .1
            .contains("relay_edge_hub_upstream_resumes_total 1"),
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// A printer that stays away past the grace: its sessions get 1014.
#[tokio::test]
async fn a_printer_gone_past_the_grace_closes_sessions_with_1014() {
    let world = world(ACCESS_CODE).await;
    let bearer = world.edge.bearer();
    let mut client = Client::connect(&world.edge, &bearer, connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    world.simulator.stop().await;
    assert!(client.closed().await.is_some());
    world.edge.assert_closes_counted(1014, 1).await;
    world.agent.cancel();
    world.edge.stop().await;
}

/// An agent that blinks (its QUIC connection cut, back within the grace):
/// the apps stay connected, are resubscribed, and receive again; an app
/// that connects during the blink gets in and is served once the agent is
/// back.
#[tokio::test]
async fn an_agent_blink_within_the_grace_keeps_the_sessions() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.tunnel.upstream_grace_seconds = 30,
        |_| {},
    )
    .await;
    let edge = world.edge.edge.as_ref().unwrap();
    let first_epoch = edge.wait_online(&world.edge.device).await;
    let bearer = world.edge.bearer();
    let mut client = Client::connect(&world.edge, &bearer, connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;

    world.agent.cancel();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the tunnel went");
    let mut during = Client::connect(&world.edge, &bearer, connect_packet("during")).await;
    during.send(&subscribe_report(2)).await;

    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let again = start_agent(agent_config(
        &world.edge,
        edge.tunnel_addr.unwrap(),
        &world.simulator,
        ACCESS_CODE,
        &credential.reveal(),
    ));
    tokio::time::timeout(
        PATIENCE,
        edge.wait_newer_tunnel(&world.edge.device, first_epoch),
    )
    .await
    .expect("the agent came back");
    // The held filter is answered at once, from the hub.
    assert!(matches!(during.next().await, Some(Packet::SubAck(_))));
    let observations = world.simulator.observations();
    observations
        .wait_until(|seen| {
            seen.connections.load(Ordering::Relaxed) >= 2 && seen.subscribe_log().len() >= 2
        })
        .await;
    // What the printer says now reaches both sessions.
    let marker = bytes::Bytes::from_static(b"{\"after\":\"the blink\"}");
    world.simulator.publish_report(marker.clone());
    for session in [&mut client, &mut during] {
        while next_publish(session).await.payload != marker {}
    }
    assert_eq!(client.closed_with, None);
    again.cancel();
    world.edge.stop().await;
}

/// Rotating (revoking) an agent credential ends the tunnel that said HELLO
/// with it, not only its next HELLO (the store's tests show a revoked
/// credential claims nothing): the device goes offline at once.
#[tokio::test]
async fn a_revoked_agent_credential_ends_the_running_tunnel() {
    let world = world(ACCESS_CODE).await;
    let edge = world.edge.edge.as_ref().unwrap();
    edge.wait_online(&world.edge.device).await;
    world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the revoked agent's tunnel ended");
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn a_second_agent_for_the_device_fences_the_first() {
    let world = world(ACCESS_CODE).await;
    let edge = world.edge.edge.as_ref().unwrap();
    let first_epoch = edge.wait_online(&world.edge.device).await;
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let tunnel = edge.tunnel_addr.unwrap();
    let second = start_agent(agent_config(
        &world.edge,
        tunnel,
        &world.simulator,
        ACCESS_CODE,
        &credential.reveal(),
    ));
    let second_epoch = tokio::time::timeout(
        PATIENCE,
        edge.wait_newer_tunnel(&world.edge.device, first_epoch),
    )
    .await
    .expect("the second agent took over");
    assert!(second_epoch > first_epoch);
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;
    world.agent.cancel();
    second.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn the_agent_comes_back_after_an_edge_restart() {
    let mut world = world(ACCESS_CODE).await;
    let first = world.edge.edge.take().unwrap();
    let tunnel = first.tunnel_addr.unwrap();
    first.drain(Duration::from_secs(5)).await;
    // A new edge on the same database and the same tunnel address.
    let mut config = world.edge.config.clone();
    config.tunnel.listen = Some(tunnel);
    let restarted = relay_edge::RunningEdge::start(config).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        restarted.wait_online(&world.edge.device),
    )
    .await
    .expect("the agent reconnected to the restarted edge");
    world.edge.addr = restarted.public_addr.unwrap();
    world.edge.edge = Some(restarted);
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;
    world.agent.cancel();
    world.edge.stop().await;
}

/// The agent trusts the printer by fingerprint: learnt on first use and
/// kept, or given; a wrong one is a TLS failure the client sees as CONNACK 3
/// (and close 1014).
#[tokio::test]
async fn printer_certificates_can_be_pinned() {
    let world = world(ACCESS_CODE).await;
    let edge = world.edge.edge.as_ref().unwrap();
    let first_epoch = edge.wait_online(&world.edge.device).await;
    world.agent.cancel();
    let tunnel = edge.tunnel_addr.unwrap();
    let pin_file = world.edge.pki.dir.join("printer.fingerprint");
    let edge_ca = write(&world.edge.pki.dir, "edge-ca.pem", &world.edge.pki.ca_pem());
    let agent_with = |credential: String, pinning: String| {
        let text = format!(
            "[edge]\naddress = \"{tunnel}\"\nserver_name = \"tunnel.{BASE_DOMAIN}\"\nca_file = \"{}\"\ncredential = \"{credential}\"\n\
             [printer]\nkind = \"bambu\"\nhost = \"127.0.0.1\"\nport = {}\nserial = \"{SERIAL}\"\naccess_code = \"{ACCESS_CODE}\"\n{pinning}\n",
            edge_ca.display(),
            world.simulator.addr.port()
        );
        start_agent(relay_agent::config::AgentConfig::from_toml(&text).unwrap())
    };
    let store = &world.edge.database.store;

    // Learnt on first use, and written down.
    let (_, credential) = store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let learning = agent_with(
        credential.reveal(),
        format!(
            "pin_on_first_use = true\nfingerprint_file = \"{}\"",
            pin_file.display()
        ),
    );
    let learning_epoch = tokio::time::timeout(
        PATIENCE,
        edge.wait_newer_tunnel(&world.edge.device, first_epoch),
    )
    .await
    .unwrap();
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    let learnt = std::fs::read_to_string(&pin_file).unwrap();
    assert_eq!(learnt.trim().len(), 64, "{learnt}");
    drop(client);
    learning.cancel();

    // A wrong pin: the printer is not trusted.
    let (_, credential) = store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let wrong = agent_with(
        credential.reveal(),
        format!("fingerprint = \"{}\"", "00".repeat(32)),
    );
    tokio::time::timeout(
        PATIENCE,
        edge.wait_newer_tunnel(&world.edge.device, learning_epoch),
    )
    .await
    .unwrap();
    let mut socket = world
        .edge
        .open_device("/mqtt", &[("authorization", &world.edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("app")).await;
    assert_eq!(refusal(&mut socket).await.connack, Some(3));
    wrong.cancel();
    world.edge.stop().await;
}

/// Draining an edge with an agent connected: sessions close with 1001
/// "draining" (the hub must not end first and close them as "device
/// offline"), and the agent is told to go away only after them.
#[tokio::test]
async fn draining_with_an_agent_closes_sessions_as_draining() {
    let mut world = world(ACCESS_CODE).await;
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut client).await;
    let edge = world.edge.edge.take().unwrap();
    edge.begin_drain();
    assert_eq!(client.closed().await, Some((1001, "draining".into())));
    edge.finish_drain(Duration::from_secs(5)).await;
    world.agent.cancel();
    world.edge.database.cleanup().await;
}

/// A read-only key cannot cut every app off the printer: a real Bambu
/// printer (and the simulator, like it) drops its whole MQTT connection
/// when a client subscribes to another serial's topics. The hub's policy
/// answers those filters 0x80 and the printer never sees them.
#[tokio::test]
async fn another_serials_topics_are_refused_before_the_printer_sees_them() {
    let world = world(ACCESS_CODE).await;
    let observations = world.simulator.observations();
    let mut app = Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    app.send(&subscribe_report(1)).await;
    assert!(matches!(app.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut app).await;

    let mut attacker = Client::connect(
        &world.edge,
        &world.edge.read_bearer().await,
        connect_packet("attacker"),
    )
    .await;
    for (round, filter) in ["device/01P00A000000000/report", "device/01P00A000000000/#"]
        .into_iter()
        .enumerate()
    {
        attacker
            .send(&Packet::Subscribe(relay_proto::mqtt::Subscribe {
                packet_id: PacketId::new(round as u16 + 1).unwrap(),
                filters: vec![(filter.to_owned(), QoS::AtMostOnce)],
            }))
            .await;
        match attacker.next().await {
            Some(Packet::SubAck(suback)) => assert_eq!(
                suback.return_codes,
                vec![relay_proto::mqtt::SubscribeReturnCode::Failure],
                "{filter}"
            ),
            other => panic!("{filter}: expected SUBACK 0x80, got {other:?}"),
        }
    }
    // Wildcards that can match the report (MQTT Explorer subscribes `#`)
    // are served from the report subscription the printer already has.
    attacker
        .send(&Packet::Subscribe(relay_proto::mqtt::Subscribe {
            packet_id: PacketId::new(9).unwrap(),
            filters: vec![
                ("#".to_owned(), QoS::AtMostOnce),
                ("device/+/report".to_owned(), QoS::AtMostOnce),
            ],
        }))
        .await;
    match attacker.next().await {
        Some(Packet::SubAck(suback)) => assert!(
            suback
                .return_codes
                .iter()
                .all(|code| *code != relay_proto::mqtt::SubscribeReturnCode::Failure),
            "{suback:?}"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let seen = next_publish(&mut attacker).await;
    assert_eq!(seen.topic, report_topic(), "`#` gets the reports");
    // The app is still served, over the same printer connection.
    let before = observations.reports.load(Ordering::SeqCst);
    loop {
        let report = next_publish(&mut app).await;
        assert_eq!(report.topic, report_topic());
        if observations.reports.load(Ordering::SeqCst) > before {
            break;
        }
    }
    assert_eq!(observations.foreign_subscribes.load(Ordering::SeqCst), 0);
    assert_eq!(observations.connections.load(Ordering::SeqCst), 1);
    assert_eq!(
        observations.subscribe_log(),
        vec![vec![report_topic()]],
        "the printer saw the app's SUBSCRIBE only"
    );
    let metrics = world.edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"relay_edge_hub_refusals_total{what="filter"} 2"#),
        "{metrics}"
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// The printer gets PUBLISHes at its kind's rate (a Bambu printer: 20 at
/// once, then 10 a second), whatever an app sends: excess QoS 0 is dropped
/// and counted, and a QoS 1 PUBLISH waits for its turn and its PUBACK.
/// Before, every publish was forwarded as fast as it came.
#[tokio::test]
async fn a_flooding_app_reaches_the_printer_at_its_rate() {
    let world = world(ACCESS_CODE).await;
    let observations = world.simulator.observations();
    let mut app = Client::connect(&world.edge, &world.edge.bearer(), connect_packet("flood")).await;
    let request = format!("device/{SERIAL}/request");
    let command = |qos, packet_id: Option<u16>| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: request.clone(),
            packet_id: packet_id.map(|id| PacketId::new(id).unwrap()),
            // Not a pushall: the hub absorbs those (see below).
            payload: Bytes::from_static(
                br#"{"print":{"sequence_id":"1","command":"gcode_line","param":"M105"}}"#,
            ),
        })
    };
    for _ in 0..200 {
        app.send(&command(QoS::AtMostOnce, None)).await;
    }
    app.send(&command(QoS::AtLeastOnce, Some(9))).await;
    loop {
        match app.next().await {
            Some(Packet::PubAck(id)) if id.get() == 9 => break,
            Some(Packet::Publish(_)) => {}
            other => panic!("expected the PUBACK, got {other:?}"),
        }
    }
    let reached = observations.publishes.load(Ordering::SeqCst);
    assert!(
        (21..=30).contains(&reached),
        "{reached} publishes reached the printer"
    );
    let metrics = world.edge.admin_get("/metrics").await.1;
    let throttled = metrics
        .lines()
        .find_map(|line| line.strip_prefix(r#"relay_edge_hub_refusals_total{what="throttled"} "#))
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(throttled as usize + reached, 201, "{metrics}");
    world.agent.cancel();
    world.edge.stop().await;
}

/// A Bambu P1 sends deltas, and the full report only on `pushall`. A late
/// joiner gets the full state right after its SUBACK without asking, and
/// twenty apps that ask `pushall` on connect cost the printer one.
#[tokio::test]
async fn late_joiners_get_the_full_state_and_pushall_is_absorbed() {
    let world = world(ACCESS_CODE).await;
    let observations = world.simulator.observations();
    let bearer = world.edge.bearer();
    let full_report = |publish: &Publish| {
        serde_json::from_slice::<serde_json::Value>(&publish.payload)
            .is_ok_and(|report| report["print"]["msg"] == 0 && publish.payload.len() > 4_000)
    };
    let mut first = Client::connect(&world.edge, &bearer, connect_packet("first")).await;
    first.send(&subscribe_report(1)).await;
    assert!(matches!(first.next().await, Some(Packet::SubAck(_))));
    // The hub asked for the full report for it.
    loop {
        if full_report(&next_publish(&mut first).await) {
            break;
        }
    }
    let mut late = Client::connect(&world.edge, &bearer, connect_packet("late")).await;
    let asked_at = std::time::Instant::now();
    late.send(&subscribe_report(1)).await;
    assert!(matches!(late.next().await, Some(Packet::SubAck(_))));
    let next = tokio::time::timeout(Duration::from_secs(1), next_publish(&mut late))
        .await
        .expect("the full state within a second");
    assert!(full_report(&next), "{:?}", next.payload);
    assert!(asked_at.elapsed() < Duration::from_secs(1));

    let mut apps = Vec::new();
    for index in 0..20u16 {
        let mut app = Client::connect(
            &world.edge,
            &bearer,
            connect_packet(&format!("app-{index}")),
        )
        .await;
        app.send(&subscribe_report(1)).await;
        app.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("device/{SERIAL}/request"),
            packet_id: Some(PacketId::new(2).unwrap()),
            payload: Bytes::from_static(br#"{"pushing":{"sequence_id":"1","command":"pushall"}}"#),
        }))
        .await;
        loop {
            match app.next().await {
                Some(Packet::PubAck(_)) => break,
                Some(_) => {}
                None => panic!("app {index} closed: {:?}", app.closed_with),
            }
        }
        apps.push(app);
    }
    assert_eq!(
        observations.pushalls.load(Ordering::SeqCst),
        1,
        "one pushall reached the printer: the hub's own"
    );
    assert_eq!(observations.penalized_pushalls.load(Ordering::SeqCst), 0);
    world.agent.cancel();
    world.edge.stop().await;
}

/// An agent that goes silent (its network drops every packet; no close
/// reaches the edge) is noticed by the QUIC idle timeout, with the idle
/// tunnel's lean settings (one agent stream, every packet ACKed at once):
/// its sessions get 1013 once the timeout has passed.
#[tokio::test]
async fn a_silent_agent_is_noticed_by_the_idle_timeout() {
    use relay_testkit::cut::UdpGate;
    let world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.tunnel.keep_alive_seconds = 1;
            edge.tunnel.idle_timeout_seconds = 2;
            edge.tunnel.upstream_grace_seconds = 0;
        },
        |_| {},
    )
    .await;
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let gate = UdpGate::start(edge.tunnel_addr.unwrap()).await;
    gate.open();
    let mut config = agent_config(
        &world.edge,
        gate.addr,
        &world.simulator,
        ACCESS_CODE,
        &world.agent_credential,
    );
    config.edge.transport = relay_agent::config::TransportChoice::Quic;
    config.edge.keep_alive_seconds = 1;
    let agent = start_agent(config);
    tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .unwrap();
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    gate.close();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the idle timeout noticed the silent agent");
    assert_eq!(client.closed().await, Some((1013, "device offline".into())));
    agent.cancel();
    world.edge.stop().await;
}
