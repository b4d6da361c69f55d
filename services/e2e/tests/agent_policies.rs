//! The agent's options (always-on printer connection, read-only policy) and
//! the printer's slow or silent moods, seen from a client through the edge;
//! retained messages from the printer across the whole path.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::mqtt::{Packet, PacketId, Publish, QoS, Subscribe};
use world::*;

fn request(packet_id: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("device/{SERIAL}/request"),
        packet_id: Some(PacketId::new(packet_id).unwrap()),
        payload: Bytes::from_static(payload),
    })
}

async fn subscribed_client(world: &World, client_id: &str) -> Client {
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet(client_id)).await;
    client.send(&subscribe_report(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    client
}

/// With `always_on`, the agent logs in to the printer before any client
/// comes, the first client uses that connection, and once the edge lets the
/// link go the agent makes a fresh one, never holding two at once.
#[tokio::test]
async fn an_always_on_agent_holds_the_printer_before_the_first_client() {
    let world = world_with(ACCESS_CODE, |_| {}, |agent| agent.always_on = true).await;
    let observations = world.simulator.observations();
    tokio::time::timeout(
        PATIENCE,
        observations.wait_until(|seen| seen.connections.load(Ordering::Relaxed) == 1),
    )
    .await
    .expect("the agent connected to the printer without a client");

    let mut client = subscribed_client(&world, "app").await;
    assert_eq!(next_publish(&mut client).await.topic, report_topic());
    assert_eq!(
        observations.connections.load(Ordering::Relaxed),
        1,
        "the client used the waiting connection"
    );
    drop(client);
    // The edge lets the link go after its linger (2 s here); the agent's
    // next standby connection is the second.
    tokio::time::timeout(
        PATIENCE,
        observations.wait_until(|seen| seen.connections.load(Ordering::Relaxed) == 2),
    )
    .await
    .expect("the agent made a fresh standby connection");
    assert_eq!(observations.max_concurrent.load(Ordering::Relaxed), 1);
    let mut again = subscribed_client(&world, "again").await;
    assert_eq!(next_publish(&mut again).await.topic, report_topic());
    assert_eq!(observations.connections.load(Ordering::Relaxed), 2);
    world.agent.cancel();
    world.edge.stop().await;
}

/// A read-only agent publishes nothing to the printer; the client's QoS 1
/// flow still completes (the agent acknowledges what it dropped) and
/// subscriptions work as before.
#[tokio::test]
async fn a_read_only_agent_forwards_no_publish() {
    let world = world_with(ACCESS_CODE, |_| {}, |agent| agent.read_only = true).await;
    let mut client = subscribed_client(&world, "app").await;
    next_publish(&mut client).await;
    client
        .send(&request(
            9,
            br#"{"print":{"sequence_id":"1","command":"stop"}}"#,
        ))
        .await;
    loop {
        match client.next().await {
            Some(Packet::PubAck(id)) => {
                assert_eq!(id.get(), 9);
                break;
            }
            Some(Packet::Publish(report)) => {
                assert!(
                    !String::from_utf8_lossy(&report.payload).contains(r#""command":"stop""#),
                    "the printer answered a request it must not have seen"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let observations = world.simulator.observations();
    assert_eq!(observations.publishes.load(Ordering::Relaxed), 0);
    // The session is still whole: reports keep coming.
    next_publish(&mut client).await;
    world.agent.cancel();
    world.edge.stop().await;
}

/// A printer that stops reporting leaves sessions open and still answers
/// requests; when it resumes, reports flow again.
#[tokio::test]
async fn stalled_reports_keep_sessions_open() {
    let world = world(ACCESS_CODE).await;
    let mut client = subscribed_client(&world, "app").await;
    next_publish(&mut client).await;
    world.simulator.stall_reports(true);
    client
        .send(&request(
            3,
            br#"{"info":{"sequence_id":"42","command":"get_version"}}"#,
        ))
        .await;
    let mut acked = false;
    let mut answered = false;
    while !(acked && answered) {
        match client.next().await {
            Some(Packet::PubAck(_)) => acked = true,
            Some(Packet::Publish(publish)) => {
                let text = String::from_utf8_lossy(&publish.payload).into_owned();
                answered |= text.contains(r#""sequence_id":"42""#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    client.send(&Packet::PingReq).await;
    loop {
        match client.next().await {
            Some(Packet::PingResp) => break,
            Some(Packet::Publish(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let reports_during_stall = world
        .simulator
        .observations()
        .reports
        .load(Ordering::SeqCst);
    world.simulator.stall_reports(false);
    loop {
        next_publish(&mut client).await;
        if world
            .simulator
            .observations()
            .reports
            .load(Ordering::SeqCst)
            > reports_during_stall
        {
            break;
        }
    }
    world.agent.cancel();
    world.edge.stop().await;
}

/// A printer slower to shake hands than the edge waits: the client gets
/// CONNACK 3 and close 1014 ("timed out"); once the printer is quick again,
/// clients get in.
#[tokio::test]
async fn a_printer_slower_than_the_edge_waits_gives_1014() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.tunnel.session_open_timeout_seconds = 1,
        |_| {},
    )
    .await;
    world.simulator.delay_handshakes(Duration::from_secs(5));
    let mut socket = world
        .edge
        .open_device("/mqtt", &[("authorization", &world.edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("app")).await;
    assert_eq!(refusal(&mut socket).await.connack, Some(3));
    world.edge.assert_closes_counted(1014, 1).await;

    // A slow but acceptable handshake only delays the CONNACK.
    world.simulator.delay_handshakes(Duration::from_millis(300));
    let mut client = subscribed_client(&world, "patient").await;
    assert_eq!(next_publish(&mut client).await.topic, report_topic());
    world.agent.cancel();
    world.edge.stop().await;
}

/// A retained message on the printer reaches every subscriber, each from
/// the printer itself: a later subscriber's SUBSCRIBE goes upstream again (a
/// replacement, which makes the broker re-send what it retains), and the
/// copy it brings back reaches that subscriber only.
#[tokio::test]
async fn retained_messages_reach_later_subscribers() {
    // A Bambu printer has no use for retained messages, and neither the
    // edge nor the agent lets an app publish anywhere but its request
    // topic. The hub's replay is what is tested here, so the agent reaches
    // the simulator as a generic broker (kind `mqtt`, user bblp over TLS),
    // which retains what it is given.
    let world = world_with(
        ACCESS_CODE,
        |_| {},
        |agent| {
            let relay_agent::config::PrinterSection::Bambu {
                host,
                port,
                access_code,
                ..
            } = agent.printer.clone()
            else {
                unreachable!()
            };
            agent.printer = relay_agent::config::PrinterSection::Mqtt {
                host,
                port,
                username: Some("bblp".into()),
                password: Some(access_code),
                keep_alive_seconds: None,
                tls: true,
                // The simulator's certificate is named by the serial, as a
                // Bambu printer's; a generic broker's check wants the host.
                ca_file: None,
                insecure: true,
                protocol: None,
                client_cert: None,
                client_key: None,
                ciphers: None,
            };
        },
    )
    .await;
    let state_topic = format!("device/{SERIAL}/state");
    let mut publisher =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("setter")).await;
    publisher
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: state_topic.clone(),
            packet_id: Some(PacketId::new(1).unwrap()),
            payload: Bytes::from_static(b"idle"),
        }))
        .await;
    assert!(matches!(publisher.next().await, Some(Packet::PubAck(_))));

    let subscribe_state = Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(5).unwrap(),
        filters: vec![(state_topic.clone(), QoS::AtMostOnce)],
    });
    let mut viewers = Vec::new();
    for viewer in ["first", "second"] {
        let mut client =
            Client::connect(&world.edge, &world.edge.bearer(), connect_packet(viewer)).await;
        client.send(&subscribe_state).await;
        assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
        let retained = next_publish(&mut client).await;
        assert_eq!(retained.topic, state_topic, "{viewer}");
        assert!(retained.retain, "{viewer}");
        assert_eq!(retained.payload, Bytes::from_static(b"idle"), "{viewer}");
        // Kept connected, so the filter stays subscribed upstream.
        viewers.push(client);
    }
    // The first viewer did not get the second one's copy.
    viewers[0].send(&Packet::PingReq).await;
    assert_eq!(viewers[0].next().await, Some(Packet::PingResp));
    assert_eq!(
        world.simulator.observations().subscribe_log(),
        vec![vec![state_topic.clone()], vec![state_topic]],
        "the second viewer's SUBSCRIBE replaced the first upstream"
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// `insecure = true`, set explicitly, connects without any certificate
/// check (for printers whose CA the owner cannot get).
#[tokio::test]
async fn an_insecure_agent_connects_without_a_ca() {
    let world = world_with(
        ACCESS_CODE,
        |_| {},
        |agent| match &mut agent.printer {
            relay_agent::config::PrinterSection::Bambu {
                ca_file, insecure, ..
            } => {
                *ca_file = None;
                *insecure = true;
            }
            relay_agent::config::PrinterSection::Mqtt { .. }
            | relay_agent::config::PrinterSection::ElegooCc2 { .. } => unreachable!(),
        },
    )
    .await;
    let mut client = subscribed_client(&world, "app").await;
    assert_eq!(next_publish(&mut client).await.topic, report_topic());
    world.agent.cancel();
    world.edge.stop().await;
}

/// Failed agent HELLOs are limited per credential id and refused with the
/// "rate limited" reason; malformed ones per source address. A valid
/// credential from that busy address (a carrier's NAT) is accepted at once.
#[tokio::test]
async fn failed_hellos_are_limited_without_locking_out_a_valid_agent_at_the_same_address() {
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.auth.agent_failures_per_ip_per_minute = 3,
        |_| {},
    )
    .await;
    // The world's own agent goes, so that only this test's HELLOs count.
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let store = &world.edge.database.store;
    let (_, stale) = store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let (_, current) = store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let tunnel = world.edge.edge.as_ref().unwrap().tunnel_addr.unwrap();
    let hello = |credential: &str| {
        let config = agent_config(
            &world.edge,
            tunnel,
            &world.simulator,
            ACCESS_CODE,
            credential,
        );
        let printer = std::sync::Arc::new(config.validate().unwrap());
        async move {
            match relay_agent::tunnel::run_once(
                &config,
                printer,
                None,
                tokio_util::sync::CancellationToken::new(),
            )
            .await
            {
                relay_agent::tunnel::TunnelEnd::Refused { reason, .. } => reason,
                other => panic!("expected a refusal, got {other}"),
            }
        }
    };
    use relay_proto::tunnel::RefusalReason::{BadCredential, RateLimited};
    // Guesses on one id: the allowance, then refused unchecked.
    let mut reasons = Vec::new();
    for _ in 0..20 {
        reasons.push(hello(&stale.reveal()).await);
    }
    let mut expected = vec![BadCredential; 3];
    expected.extend([RateLimited; 17]);
    assert_eq!(reasons, expected);
    // Credentials that cannot be valid, from the address past its
    // allowance: refused unchecked.
    let mut corrupt = stale.reveal();
    let last = corrupt.pop().unwrap();
    corrupt.push(if last == 'a' { 'b' } else { 'a' });
    for _ in 0..5 {
        assert_eq!(hello(&corrupt).await, RateLimited);
    }
    let before = world.edge.admin_get("/metrics").await.1;
    // The device's valid credential, from the same address: in at once.
    let agent = start_agent(agent_config(
        &world.edge,
        tunnel,
        &world.simulator,
        ACCESS_CODE,
        &current.reveal(),
    ));
    tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .expect("the valid agent was accepted from the busy address");
    let after = world.edge.admin_get("/metrics").await.1;
    let accepted = |text: &str| {
        text.lines()
            .filter(|line| line.starts_with("relay_edge_agent_hellos_total{result=\"accepted\""))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(
        accepted(&after) - accepted(&before),
        1.0,
        "accepted on its first HELLO"
    );
    // The guesses stay limited.
    assert_eq!(hello(&stale.reveal()).await, RateLimited);
    agent.cancel();
    world.edge.stop().await;
}

/// Defence in depth: with an edge misconfigured to allow anything on a
/// Bambu printer, the agent still lets only the printer's own topics
/// through. A SUBSCRIBE to another serial's report gets SUBACK 0x80 from
/// the agent, and a PUBLISH elsewhere is acknowledged and dropped: the
/// printer (which would drop every app) never sees them.
#[tokio::test]
async fn the_agent_lets_only_the_printers_own_topics_through() {
    let world = world_with(
        ACCESS_CODE,
        |edge| {
            edge.printers.bambu.allow = vec!["#".into()];
            edge.printers.bambu.retain = true;
        },
        |_| {},
    )
    .await;
    let observations = world.simulator.observations();
    let mut app = subscribed_client(&world, "app").await;
    // The hub's own pushall (asked for the first subscriber) is through
    // once the full report is here.
    loop {
        if next_publish(&mut app).await.payload.len() > 4_000 {
            break;
        }
    }
    let publishes_before = observations.publishes.load(Ordering::SeqCst);
    let mut stray =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("stray")).await;
    stray
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(3).unwrap(),
            filters: vec![("device/01P00A000000000/report".into(), QoS::AtMostOnce)],
        }))
        .await;
    match stray.next().await {
        Some(Packet::SubAck(suback)) => assert_eq!(
            suback.return_codes,
            vec![relay_proto::mqtt::SubscribeReturnCode::Failure]
        ),
        other => panic!("expected SUBACK 0x80, got {other:?}"),
    }
    stray
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "device/01P00A000000000/request".into(),
            packet_id: Some(PacketId::new(4).unwrap()),
            payload: Bytes::from_static(b"{}"),
        }))
        .await;
    loop {
        match stray.next().await {
            Some(Packet::PubAck(id)) if id.get() == 4 => break,
            Some(Packet::Publish(_)) => {}
            other => panic!("expected the PUBACK, got {other:?}"),
        }
    }
    assert_eq!(observations.foreign_subscribes.load(Ordering::SeqCst), 0);
    assert_eq!(
        observations.publishes.load(Ordering::SeqCst),
        publishes_before
    );
    assert_eq!(observations.connections.load(Ordering::SeqCst), 1);
    // The other app is still served.
    next_publish(&mut app).await;
    world.agent.cancel();
    world.edge.stop().await;
}

/// An app that subscribes to a Bambu printer's report and request topics
/// in one SUBSCRIBE (both allowed by the edge's default policy) gets both
/// granted: the agent lets the printer's own request topic through too,
/// and receives the reports. Before, the agent refused the whole SUBSCRIBE.
#[tokio::test]
async fn report_and_request_in_one_subscribe_are_both_granted() {
    let world = world(ACCESS_CODE).await;
    let mut app = Client::connect(&world.edge, &world.edge.bearer(), connect_packet("both")).await;
    app.send(&Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        filters: vec![
            (report_topic(), QoS::AtMostOnce),
            (format!("device/{SERIAL}/request"), QoS::AtMostOnce),
        ],
    }))
    .await;
    match app.next().await {
        Some(Packet::SubAck(suback)) => assert_eq!(
            suback.return_codes,
            vec![relay_proto::mqtt::SubscribeReturnCode::Success(QoS::AtMostOnce); 2]
        ),
        other => panic!("expected the SUBACK, got {other:?}"),
    }
    assert_eq!(next_publish(&mut app).await.topic, report_topic());
    world.agent.cancel();
    world.edge.stop().await;
}
