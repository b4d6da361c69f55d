//! Sessions that reach an online device. The device's upstream is either a
//! scripted printer on an in-memory pipe (to see exactly what the printer
//! receives) or a real Mosquitto broker standing in for the printer.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::time::Duration;

use bytes::Bytes;
use relay_edge::hub::{HubConfig, RetainedReplay, TopicPolicy, Upstream};
use relay_proto::mqtt::{
    ConnectReturnCode, Packet, PacketId, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode,
    Unsubscribe,
};
use relay_store::{NewApiKey, Scope};
use support::*;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;

fn limits() -> HubConfig {
    HubConfig {
        upstream_keep_alive: Duration::from_secs(30),
        linger: None,
        replay_retained: RetainedReplay::WhenSeen,
        ..HubConfig::new(256 * 1024)
    }
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).unwrap()
}

fn subscribe(packet_id: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id(packet_id),
        filters: filters.iter().map(|(f, q)| (f.to_string(), *q)).collect(),
    })
}

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: packet_id.map(id),
        payload: Bytes::from_static(payload),
    })
}

/// Puts the device online with a scripted printer behind an in-memory pipe.
fn online_with_scripted_printer(edge: &TestEdge) -> MqttPeer<DuplexStream> {
    online_with_scripted_printer_and(edge, limits())
}

/// [`online_with_scripted_printer`], with the hub's configuration given.
fn online_with_scripted_printer_and(edge: &TestEdge, config: HubConfig) -> MqttPeer<DuplexStream> {
    edge.scripted_printer_with(config)
}

/// A hub whose policy is a Bambu printer's, for serial X1.
fn bambu_like() -> HubConfig {
    HubConfig {
        policy: std::sync::Arc::new(TopicPolicy {
            allow: vec!["device/X1/report".into(), "device/X1/request".into()],
            deny: Vec::new(),
            retain: false,
        }),
        ..limits()
    }
}

/// The printer answers a SUBSCRIBE with a grant per filter.
async fn grant(printer: &mut MqttPeer<DuplexStream>, qos: QoS) -> Vec<String> {
    let Some(Packet::Subscribe(subscribe)) = printer.next().await else {
        panic!("expected SUBSCRIBE upstream");
    };
    printer
        .send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            return_codes: subscribe
                .filters
                .iter()
                .map(|_| SubscribeReturnCode::Success(qos))
                .collect(),
        }))
        .await;
    subscribe.filters.into_iter().map(|(f, _)| f).collect()
}

#[tokio::test]
async fn pings_are_answered_and_subscriptions_are_shared_upstream() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let mut first = Client::connect(&edge, &bearer, connect_packet("first")).await;
    first.send(&Packet::PingReq).await;
    assert_eq!(first.next().await, Some(Packet::PingResp));

    let report = "device/01P00A/report";
    first
        .send(&subscribe(10, &[(report, QoS::AtLeastOnce)]))
        .await;
    assert_eq!(
        grant(&mut printer, QoS::AtMostOnce).await,
        vec![report.to_owned()]
    );
    assert_eq!(
        first.next().await,
        Some(Packet::SubAck(SubAck {
            packet_id: id(10),
            return_codes: vec![SubscribeReturnCode::Success(QoS::AtMostOnce)]
        }))
    );

    // A second client on the same filter: answered at once, nothing upstream.
    let mut second = Client::connect(&edge, &bearer, connect_packet("second")).await;
    second
        .send(&subscribe(
            3,
            &[
                (report, QoS::AtMostOnce),
                ("device/+/report", QoS::AtMostOnce),
            ],
        ))
        .await;
    assert_eq!(
        grant(&mut printer, QoS::AtLeastOnce).await,
        vec!["device/+/report".to_owned()]
    );
    assert!(
        matches!(second.next().await, Some(Packet::SubAck(ack)) if ack.return_codes.len() == 2)
    );

    // One printer message: each client gets it once, though the second holds
    // two matching filters.
    printer
        .send(&publish(report, QoS::AtMostOnce, None, b"{\"print\":{}}"))
        .await;
    for client in [&mut first, &mut second] {
        let Some(Packet::Publish(delivered)) = client.next().await else {
            panic!("no delivery");
        };
        assert_eq!(delivered.payload, Bytes::from_static(b"{\"print\":{}}"));
        client.send(&Packet::PingReq).await;
        assert_eq!(
            client.next().await,
            Some(Packet::PingResp),
            "a duplicate delivery came first"
        );
    }

    // The printer hears UNSUBSCRIBE only when the last holder leaves.
    first
        .send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: id(11),
            filters: vec![report.into()],
        }))
        .await;
    assert_eq!(first.next().await, Some(Packet::UnsubAck(id(11))));
    drop(second);
    let Some(Packet::Unsubscribe(unsubscribe)) = printer.next().await else {
        panic!("expected UNSUBSCRIBE upstream");
    };
    let mut filters = unsubscribe.filters;
    if let Some(Packet::Unsubscribe(more)) = printer.next().await {
        filters.extend(more.filters);
    }
    filters.sort();
    assert_eq!(
        filters,
        vec!["device/+/report".to_owned(), report.to_owned()]
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_qos1_publish_is_acknowledged_only_after_the_printer_did() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("control")).await;
    client
        .send(&publish(
            "device/01P00A/request",
            QoS::AtLeastOnce,
            Some(77),
            b"{\"pushing\":{}}",
        ))
        .await;
    let Some(Packet::Publish(upstream)) = printer.next().await else {
        panic!("expected the PUBLISH upstream");
    };
    assert_eq!(upstream.qos, QoS::AtLeastOnce);
    // The hub has handled the PUBLISH; a premature PUBACK would now be
    // queued ahead of this PINGRESP.
    client.send(&Packet::PingReq).await;
    assert_eq!(client.next().await, Some(Packet::PingResp));
    printer
        .send(&Packet::PubAck(upstream.packet_id.unwrap()))
        .await;
    assert_eq!(client.next().await, Some(Packet::PubAck(id(77))));
    edge.stop().await;
}

#[tokio::test]
async fn scope_and_limits_are_enforced_in_session() {
    let edge = TestEdge::start_with(|config| config.limits.max_subscriptions = 2).await;
    let _printer = online_with_scripted_printer(&edge);
    let (_, read_key) = edge
        .database
        .store
        .create_api_key(NewApiKey {
            tenant_id: &edge.tenant,
            device_id: Some(&edge.device),
            scope: Scope::Read,
            label: "viewer",
            expires_at: None,
        })
        .await
        .unwrap();
    let read_bearer = format!("Bearer {}", read_key.reveal());
    let mut viewer = Client::connect(&edge, &read_bearer, connect_packet("viewer")).await;
    viewer
        .send(&publish("device/x/request", QoS::AtMostOnce, None, b"{}"))
        .await;
    assert_eq!(
        viewer.closed().await,
        Some((1008, "forbidden: read-only key".into()))
    );

    let bearer = edge.bearer();
    let mut client = Client::connect(&edge, &bearer, connect_packet("long")).await;
    let long_filter = format!("device/{}", "x".repeat(130));
    client
        .send(&subscribe(1, &[(&long_filter, QoS::AtMostOnce)]))
        .await;
    let (code, reason) = client.closed().await.unwrap();
    assert_eq!(code, 1008);
    assert!(reason.starts_with("limit: topic filter"), "{reason}");

    let mut client = Client::connect(&edge, &bearer, connect_packet("many")).await;
    client
        .send(&subscribe(
            1,
            &[
                ("a", QoS::AtMostOnce),
                ("b", QoS::AtMostOnce),
                ("c", QoS::AtMostOnce),
            ],
        ))
        .await;
    assert_eq!(
        client.closed().await,
        Some((1008, "limit: more than 2 subscriptions".into()))
    );

    let mut client = Client::connect(&edge, &bearer, connect_packet("again")).await;
    client.send(&Packet::Connect(connect_packet("again"))).await;
    assert_eq!(client.closed().await, Some((1002, "second CONNECT".into())));

    let mut client = Client::connect(&edge, &bearer, connect_packet("bye")).await;
    client.send(&Packet::Disconnect).await;
    assert_eq!(client.closed().await.map(|(code, _)| code), Some(1000));
    edge.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_one_and_a_half_keep_alives() {
    let edge = TestEdge::start().await;
    let _printer = online_with_scripted_printer(&edge);
    let mut connect = connect_packet("sleepy");
    connect.keep_alive = 1;
    let mut client = Client::connect(&edge, &edge.bearer(), connect).await;
    let started = std::time::Instant::now();
    assert_eq!(
        client.closed().await,
        Some((1002, "keep-alive timeout".into()))
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed too early"
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_memory_stays_bounded() {
    let edge = TestEdge::start_with(|config| {
        config.limits.max_packet_size = 4096;
        config.limits.outbound_buffer_bytes = 16 * 1024;
    })
    .await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("stalled")).await;
    client
        .send(&subscribe(1, &[("device/x/report", QoS::AtMostOnce)]))
        .await;
    grant(&mut printer, QoS::AtMostOnce).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));

    // The client reads nothing while the printer sends 20 MB.
    static REPORT: [u8; 4096] = [b'x'; 4096];
    let sent = 5_000;
    for _ in 0..sent {
        printer
            .send(&publish("device/x/report", QoS::AtMostOnce, None, &REPORT))
            .await;
    }
    let mut received = 0;
    while let Some(packet) = client.next().await {
        assert!(matches!(packet, Packet::Publish(_)));
        received += 1;
    }
    assert!(
        received < sent,
        "a client that did not read got everything ({received})"
    );
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_close_codes_total{code=\"1008\"} 1"),
        "{metrics}"
    );
    edge.stop().await;
}

/// A delivery to an idle session whose socket is writable is written by
/// the hub's task at once; once the client's socket is full, the session's
/// writer takes over. Either way the client gets every message, in order.
#[tokio::test]
async fn deliveries_keep_their_order_whether_the_hub_or_the_session_writes_them() {
    let edge = TestEdge::start_with(|config| {
        config.limits.max_packet_size = 8 * 1024;
        config.limits.outbound_buffer_bytes = 64 * 1024 * 1024;
    })
    .await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("ordered")).await;
    client
        .send(&subscribe(1, &[("device/x/report", QoS::AtMostOnce)]))
        .await;
    grant(&mut printer, QoS::AtMostOnce).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    let path_writes = |metrics: &str, path: &str| {
        relay_testkit::processes::metric(
            metrics,
            &format!("relay_edge_client_writes_total{{path=\"{path}\"}}"),
        )
    };
    let report = |number: u32| {
        let mut payload = vec![b'x'; 4096];
        payload[..4].copy_from_slice(&number.to_be_bytes());
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "device/x/report".into(),
            packet_id: None,
            payload: Bytes::from(payload),
        })
    };
    let number_of = |packet: Option<Packet>| match packet {
        Some(Packet::Publish(publish)) => {
            u32::from_be_bytes(publish.payload[..4].try_into().unwrap())
        }
        other => panic!("expected a report, got {other:?}"),
    };

    // Read one at a time: each finds the session idle and is written by
    // the hub.
    let before = edge.admin_get("/metrics").await.1;
    for number in 0..20 {
        printer.send(&report(number)).await;
        assert_eq!(number_of(client.next().await), number);
    }
    let after = edge.admin_get("/metrics").await.1;
    assert_eq!(
        path_writes(&after, "direct") - path_writes(&before, "direct"),
        20.0,
        "{after}"
    );

    // Unread, 16 MB outgrow the sockets' buffers: the session's writer
    // takes over, and the order holds.
    let sent = 4_000;
    for number in 20..20 + sent {
        printer.send(&report(number)).await;
    }
    for number in 20..20 + sent {
        assert_eq!(number_of(client.next().await), number);
    }
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        path_writes(&metrics, "queued") > path_writes(&after, "queued"),
        "{metrics}"
    );
    assert!(path_writes(&metrics, "direct") > 20.0, "{metrics}");
    edge.stop().await;
}

#[tokio::test]
async fn losing_the_printer_or_the_key_ends_sessions() {
    let edge = TestEdge::start().await;
    let printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let mut client = Client::connect(&edge, &bearer, connect_packet("a")).await;
    drop(printer);
    // The edge closes with 1014 (IANA "bad gateway"); tungstenite, this
    // test's client, does not know 1014 and reports its own 1002 instead,
    // so the code is checked on the edge's side.
    assert!(client.closed().await.is_some());
    edge.assert_closes_counted(1014, 1).await;
    // Offline again afterwards.
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    send_connect(&mut socket, connect_packet("b")).await;
    assert_eq!(
        refusal(&mut socket).await.connack,
        Some(ConnectReturnCode::ServerUnavailable as u8)
    );

    let _printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &bearer, connect_packet("c")).await;
    edge.database
        .store
        .revoke_api_key(&edge.key.1)
        .await
        .unwrap();
    assert_eq!(
        client.closed().await,
        Some((1008, "unauthorized: revoked".into()))
    );
    edge.stop().await;
}

#[tokio::test]
async fn draining_closes_connected_sessions_with_1001() {
    let mut edge = TestEdge::start().await;
    let _printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("a")).await;
    let running = edge.edge.take().unwrap();
    running.begin_drain();
    assert_eq!(client.closed().await, Some((1001, "draining".into())));
    running.finish_drain(Duration::from_secs(5)).await;
    edge.database.cleanup().await;
}

/// The same path with a real broker standing in for the printer.
#[tokio::test]
async fn messages_flow_through_a_real_mosquitto() {
    let edge = TestEdge::start().await;
    let broker = std::env::var("RELAY_TEST_MQTT_ADDR").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let serial = relay_store::credential::random_base32(10).unwrap();
    let connect_upstream = |client_id: String| {
        let broker = broker.clone();
        async move {
            let mut peer = MqttPeer::new(
                TcpStream::connect(&broker)
                    .await
                    .expect("Mosquitto (scripts/services starts it)"),
            );
            peer.send(&Packet::Connect(connect_packet(&client_id)))
                .await;
            assert!(
                matches!(peer.next().await, Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Accepted)
            );
            peer
        }
    };
    let hub_upstream = connect_upstream(format!("relay-hub-{serial}")).await;
    let (reader, writer) = hub_upstream.io.into_split();
    edge.edge.as_ref().unwrap().hubs().start(
        edge.device.clone(),
        Upstream::from_halves(reader, writer),
        limits(),
        None,
        Duration::ZERO,
    );
    let mut printer = connect_upstream(format!("printer-{serial}")).await;

    let report = format!("device/{serial}/report");
    let bearer = edge.bearer();
    let mut clients = Vec::new();
    for name in ["app", "dashboard", "phone"] {
        let mut client = Client::connect(&edge, &bearer, connect_packet(name)).await;
        client
            .send(&subscribe(1, &[(&report, QoS::AtMostOnce)]))
            .await;
        assert!(
            matches!(client.next().await, Some(Packet::SubAck(ack)) if ack.return_codes == vec![SubscribeReturnCode::Success(QoS::AtMostOnce)])
        );
        clients.push(client);
    }
    printer
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: report.clone(),
            packet_id: None,
            payload: Bytes::from_static(b"{\"print\":{\"nozzle_temper\":215}}"),
        }))
        .await;
    for client in &mut clients {
        let Some(Packet::Publish(delivered)) = client.next().await else {
            panic!("no delivery through Mosquitto");
        };
        assert_eq!(delivered.topic, report);
    }
    // A command from an app reaches the broker.
    printer
        .send(&subscribe(
            5,
            &[(&format!("device/{serial}/request"), QoS::AtMostOnce)],
        ))
        .await;
    assert!(matches!(printer.next().await, Some(Packet::SubAck(_))));
    clients[0]
        .send(&publish(
            &format!("device/{serial}/request"),
            QoS::AtLeastOnce,
            Some(9),
            b"{\"pushing\":{\"command\":\"pushall\"}}",
        ))
        .await;
    assert_eq!(clients[0].next().await, Some(Packet::PubAck(id(9))));
    let Some(Packet::Publish(command)) = printer.next().await else {
        panic!("the command did not reach the broker");
    };
    assert_eq!(
        command.payload,
        Bytes::from_static(b"{\"pushing\":{\"command\":\"pushall\"}}")
    );
    edge.stop().await;
}

#[tokio::test]
async fn qos2_from_a_client_completes_at_the_edge_after_the_printer_has_it() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("exactly-once")).await;
    client
        .send(&publish(
            "device/01P00A/request",
            QoS::ExactlyOnce,
            Some(5),
            b"{}",
        ))
        .await;
    let Some(Packet::Publish(upstream)) = printer.next().await else {
        panic!("expected the PUBLISH upstream");
    };
    assert_eq!(
        upstream.qos,
        QoS::AtLeastOnce,
        "QoS 2 travels to the printer as QoS 1"
    );
    printer
        .send(&Packet::PubAck(upstream.packet_id.unwrap()))
        .await;
    assert_eq!(client.next().await, Some(Packet::PubRec(id(5))));
    client.send(&Packet::PubRel(id(5))).await;
    assert_eq!(client.next().await, Some(Packet::PubComp(id(5))));
    edge.stop().await;
}

/// The scripted printer behaves as a broker does with a retained message:
/// it sends it (RETAIN=1) after the SUBACK of each SUBSCRIBE that matches
/// it, and live deliveries carry RETAIN=0. The hub passes each retained
/// copy to the session whose SUBSCRIBE caused it, and to no other.
#[tokio::test]
async fn later_subscribers_get_the_printers_retained_message() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let mut retained = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: "device/x/state".into(),
        packet_id: None,
        payload: Bytes::from_static(b"idle"),
    };
    let mut first = Client::connect(&edge, &bearer, connect_packet("first")).await;
    first
        .send(&subscribe(1, &[("device/x/state", QoS::AtMostOnce)]))
        .await;
    grant(&mut printer, QoS::AtMostOnce).await;
    assert!(matches!(first.next().await, Some(Packet::SubAck(_))));
    printer.send(&Packet::Publish(retained.clone())).await;
    assert!(
        matches!(first.next().await, Some(Packet::Publish(p)) if p.payload == retained.payload && p.retain)
    );

    let mut later = Client::connect(&edge, &bearer, connect_packet("later")).await;
    later
        .send(&subscribe(
            2,
            &[
                ("device/+/state", QoS::AtMostOnce),
                ("device/x/state", QoS::AtMostOnce),
            ],
        ))
        .await;
    assert_eq!(
        grant(&mut printer, QoS::AtMostOnce).await,
        vec!["device/+/state".to_owned(), "device/x/state".to_owned()]
    );
    assert!(matches!(later.next().await, Some(Packet::SubAck(_))));
    printer.send(&Packet::Publish(retained.clone())).await;
    let Some(Packet::Publish(delivered)) = later.next().await else {
        panic!("no retained message for the later subscriber");
    };
    assert!(delivered.retain);
    assert_eq!(delivered.payload, Bytes::from_static(b"idle"));
    // The first subscriber did not get the later one's copy.
    first.send(&Packet::PingReq).await;
    assert_eq!(first.next().await, Some(Packet::PingResp));
    // An empty retained message clears it.
    retained.payload = Bytes::new();
    printer.send(&Packet::Publish(retained)).await;
    edge.stop().await;
}

#[tokio::test]
async fn the_will_goes_out_on_an_abnormal_end_only() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let with_will = |client_id: &str| {
        let mut connect = connect_packet(client_id);
        connect.will = Some(relay_proto::mqtt::Will {
            topic: "device/x/app-status".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
        });
        connect
    };
    // A polite client: DISCONNECT, no will.
    let mut polite = Client::connect(&edge, &bearer, with_will("polite")).await;
    polite.send(&Packet::Disconnect).await;
    assert_eq!(polite.closed().await.map(|(code, _)| code), Some(1000));
    // A client that vanishes: its will reaches the printer.
    let vanishing = Client::connect(&edge, &bearer, with_will("vanishing")).await;
    drop(vanishing);
    let Some(Packet::Publish(will)) = printer.next().await else {
        panic!("no will upstream");
    };
    assert_eq!(will.topic, "device/x/app-status");
    assert_eq!(will.payload, Bytes::from_static(b"gone"));
    edge.stop().await;
}

#[tokio::test]
async fn a_duplicate_client_id_replaces_the_older_session() {
    let edge = TestEdge::start().await;
    let _printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let mut older = Client::connect(&edge, &bearer, connect_packet("phone")).await;
    let mut newer = Client::connect(&edge, &bearer, connect_packet("phone")).await;
    assert_eq!(
        older.closed().await,
        Some((1008, "replaced: same client id".into()))
    );
    newer.send(&Packet::PingReq).await;
    assert_eq!(newer.next().await, Some(Packet::PingResp));
    edge.stop().await;
}

/// A client that closes the WebSocket first (no DISCONNECT) gets the close
/// frame echoed, as RFC 6455 §5.5.1 requires: Node's `ws` and browsers
/// report a clean close (1000), not 1006.
#[tokio::test]
async fn a_close_from_the_client_is_answered_with_a_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    let edge = TestEdge::start().await;
    let _printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("closer")).await;
    client
        .socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), client.socket.next())
        .await
        .expect("the edge answered the close");
    match answer {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the close frame echoed, got {other:?}"),
    }
    edge.assert_closes_counted(1000, 1).await;
    edge.stop().await;
}

/// A will is a publish: at CONNECT it meets the topic length limit and the
/// device's policy, and a refused one refuses the CONNECT (CONNACK 5) with
/// the reason; before, every one of these reached the printer.
#[tokio::test]
async fn a_will_meets_the_publish_rules_at_connect() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer_and(&edge, bambu_like());
    let bearer = edge.bearer();
    let with_will = |topic: String, retain: bool| {
        let mut connect = connect_packet("willing");
        connect.will = Some(relay_proto::mqtt::Will {
            topic,
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain,
        });
        connect
    };
    for (connect, expected) in [
        (
            with_will(format!("device/X1/{}", "x".repeat(60_000)), false),
            refused(
                Some(5),
                1008,
                "limit: will topic: topic is 60010 bytes, over the limit of 128",
            ),
        ),
        (
            with_will("device/X2/request".into(), false),
            refused(
                Some(5),
                1008,
                "forbidden: will: topic not allowed on this device",
            ),
        ),
        (
            with_will("device/X1/request".into(), true),
            refused(
                Some(5),
                1008,
                "forbidden: will: retained messages not allowed on this device",
            ),
        ),
    ] {
        let mut socket = edge
            .open_device("/mqtt", &[("authorization", &bearer)])
            .await;
        send_connect(&mut socket, connect).await;
        assert_eq!(refusal(&mut socket).await, expected);
    }
    // An allowed will is accepted, and published when its session dies.
    let client =
        Client::connect(&edge, &bearer, with_will("device/X1/request".into(), false)).await;
    drop(client);
    match printer.next().await {
        Some(Packet::Publish(will)) => assert_eq!(will.topic, "device/X1/request"),
        other => panic!("expected the will upstream, got {other:?}"),
    }
    edge.stop().await;
}

/// A client that stops reading is cut as a slow consumer, and that is not
/// silent: the close (1008 `limit: slow consumer`) is counted, logged and
/// sent, ahead of what was queued for it.
#[tokio::test]
async fn a_slow_consumer_gets_its_close_and_is_counted() {
    let edge = TestEdge::start_with(|config| config.limits.outbound_buffer_bytes = 64 * 1024).await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut reader = Client::connect(&edge, &edge.bearer(), connect_packet("reader")).await;
    reader.send(&subscribe(1, &[("t", QoS::AtMostOnce)])).await;
    grant(&mut printer, QoS::AtMostOnce).await;
    assert!(matches!(reader.next().await, Some(Packet::SubAck(_))));
    // The client reads no more; the printer talks until the edge gives up.
    static PAYLOAD: [u8; 16 * 1024] = [7; 16 * 1024];
    let cut = async {
        loop {
            let metrics = edge.admin_get("/metrics").await.1;
            if metrics.contains(r#"relay_edge_hub_refusals_total{what="slow_consumer"} 1"#) {
                return;
            }
            // Less than its queue at a time: the edge's writer keeps up
            // until the socket's buffers are full, then the queue fills.
            for _ in 0..2 {
                printer
                    .send(&publish("t", QoS::AtMostOnce, None, &PAYLOAD))
                    .await;
            }
        }
    };
    tokio::time::timeout(PATIENCE, cut)
        .await
        .expect("cut as a slow consumer");
    // Counted (and logged) though the client still reads nothing.
    let counted = async {
        loop {
            let metrics = edge.admin_get("/metrics").await.1;
            if metrics.contains(r#"relay_edge_close_codes_total{code="1008"} 1"#) {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, counted)
        .await
        .expect("the close was counted while the client read nothing");
    // Reading again, it finds the close after what was already on its way.
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match reader.next().await {
                Some(Packet::Publish(_)) => {}
                Some(other) => panic!("unexpected {other:?}"),
                None => return reader.closed_with.clone(),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(closed, Some((1008, "limit: slow consumer".to_owned())));
    edge.assert_closes_counted(1008, 1).await;
    edge.stop().await;
}

/// Sessions are capped per key and per client address (and per device and
/// tenant): before, 3,000 sessions on one device with one key were all
/// accepted. A refusal is CONNACK 3 with a `limit:` close; a closed session
/// gives its place back.
#[tokio::test]
async fn sessions_are_capped_per_key_and_per_address() {
    let edge = TestEdge::start_with(|config| {
        config.quotas.sessions_per_key = 2;
        config.quotas.sessions_per_address = 3;
    })
    .await;
    let _printer = online_with_scripted_printer(&edge);
    let bearer = edge.bearer();
    let first = Client::connect(&edge, &bearer, connect_packet("one")).await;
    let _second = Client::connect(&edge, &bearer, connect_packet("two")).await;
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &bearer)])
        .await;
    send_connect(&mut socket, connect_packet("three")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1008, "limit: too many sessions for this key")
    );
    let other_key = edge.new_bearer(Scope::Control).await;
    let _third = Client::connect(&edge, &other_key, connect_packet("four")).await;
    let yet_another = edge.new_bearer(Scope::Control).await;
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &yet_another)])
        .await;
    send_connect(&mut socket, connect_packet("five")).await;
    assert_eq!(
        refusal(&mut socket).await,
        refused(Some(3), 1008, "limit: too many sessions from this address")
    );
    // From another address, the same key gets in.
    let mut socket = edge
        .open_device_from([127, 0, 0, 2].into(), &[("authorization", &yet_another)])
        .await;
    send_connect(&mut socket, connect_packet("six")).await;
    let mut buffer = bytes::BytesMut::new();
    let answer = loop {
        use futures_util::StreamExt;
        match socket.next().await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes))) => {
                buffer.extend_from_slice(&bytes);
                if let Some(packet) = relay_proto::mqtt::decode(&mut buffer, 1024).unwrap() {
                    break packet;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(
        matches!(answer, Packet::ConnAck(ack) if ack.code == relay_proto::mqtt::ConnectReturnCode::Accepted)
    );
    // A closed session gives its place back.
    let mut first = first;
    first.send(&Packet::Disconnect).await;
    first.closed().await;
    let gone = async {
        loop {
            let metrics = edge.admin_get("/metrics").await.1;
            if metrics.contains("relay_edge_sessions_open 3") {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, gone)
        .await
        .expect("the first session ended");
    let _again = Client::connect(&edge, &bearer, connect_packet("again")).await;
    edge.stop().await;
}

/// An upgraded socket is an open connection (before, the gauge read 0 for
/// every WebSocket, as the HTTP task let go of it at the upgrade).
#[tokio::test]
async fn upgraded_sockets_count_as_open_connections() {
    let edge = TestEdge::start().await;
    let _printer = online_with_scripted_printer(&edge);
    let mut client = Client::connect(&edge, &edge.bearer(), connect_packet("counted")).await;
    client.send(&Packet::PingReq).await;
    assert_eq!(client.next().await, Some(Packet::PingResp));
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("relay_edge_connections_open 1"),
        "{metrics}"
    );
    client.send(&Packet::Disconnect).await;
    client.closed().await;
    let closed = async {
        loop {
            let metrics = edge.admin_get("/metrics").await.1;
            if metrics.contains("relay_edge_connections_open 0") {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, closed)
        .await
        .expect("the gauge came back to 0");
    edge.stop().await;
}

/// A printer packet over `max_printer_packet` is skipped, not the end of
/// the printer link: before, one oversized report ended the hub and every
/// app got 1014.
#[tokio::test]
async fn an_oversized_printer_packet_is_skipped_and_the_apps_stay() {
    let edge = TestEdge::start().await;
    let mut printer = online_with_scripted_printer(&edge);
    let mut app = Client::connect(&edge, &edge.bearer(), connect_packet("app")).await;
    app.send(&subscribe(1, &[("t", QoS::AtMostOnce)])).await;
    grant(&mut printer, QoS::AtMostOnce).await;
    assert!(matches!(app.next().await, Some(Packet::SubAck(_))));
    static HUGE: [u8; 300 * 1024] = [b'x'; 300 * 1024];
    printer
        .send(&publish("t", QoS::AtMostOnce, None, &HUGE))
        .await;
    printer
        .send(&publish("t", QoS::AtMostOnce, None, b"small"))
        .await;
    match app.next().await {
        Some(Packet::Publish(next)) => assert_eq!(next.payload, Bytes::from_static(b"small")),
        other => panic!("expected the small message, got {other:?}"),
    }
    // An oversized QoS 1 PUBLISH is acknowledged (from its first bytes),
    // or the broker would send it again on every new connection.
    printer
        .send(&publish("t", QoS::AtLeastOnce, Some(9), &HUGE))
        .await;
    loop {
        match printer.next().await {
            Some(Packet::PubAck(id)) => {
                assert_eq!(id.get(), 9);
                break;
            }
            Some(Packet::PingReq) => printer.send(&Packet::PingResp).await,
            Some(other) => panic!("expected PUBACK 9, got {other:?}"),
            None => panic!("the printer link closed"),
        }
    }
    printer
        .send(&publish("t", QoS::AtMostOnce, None, b"after"))
        .await;
    match app.next().await {
        Some(Packet::Publish(next)) => assert_eq!(next.payload, Bytes::from_static(b"after")),
        other => panic!("expected the message after, got {other:?}"),
    }
    let metrics = edge.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"relay_edge_hub_refusals_total{what="oversized_upstream"} 2"#),
        "{metrics}"
    );
    edge.stop().await;
}
