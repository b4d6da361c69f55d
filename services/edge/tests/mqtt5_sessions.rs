//! MQTT 5 clients at the edge, packet by packet, with a scripted printer
//! behind the hub (it speaks 3.1.1, as every printer does): the CONNACK's
//! properties, refusals with their reason codes and strings, topic
//! aliases, the read-only key's PUBACK 0x87, Receive Maximum both ways, a
//! DISCONNECT with its reason before the WebSocket close, and a v5 and a
//! 3.1.1 client seeing the same messages in the same order.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::time::Duration;

use bytes::Bytes;
use relay_edge::hub::{HubConfig, RetainedReplay, Upstream};
use relay_proto::mqtt::{self, Packet, PacketId, QoS};
use relay_proto::mqtt5::{
    self, Ack, Properties, Property, ReasonCode, Subscribe, SubscriptionOptions,
};
use relay_store::Scope;
use support::*;
use tokio::io::DuplexStream;

fn scripted_printer(edge: &TestEdge) -> MqttPeer<DuplexStream> {
    edge.scripted_printer()
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).unwrap()
}

async fn connected(edge: &TestEdge, connect: mqtt5::Connect) -> (V5Client, mqtt5::ConnAck) {
    let (client, connack) = V5Client::connect(edge, &edge.bearer(), connect).await;
    let connack = connack.expect("a CONNACK");
    assert_eq!(connack.reason, ReasonCode::SUCCESS, "{connack:?}");
    (client, connack)
}

/// Subscribes the v5 client to `filter`; the printer grants it.
async fn subscribed(
    client: &mut V5Client,
    printer: &mut MqttPeer<DuplexStream>,
    filter: &str,
    qos: QoS,
) {
    client
        .send(&mqtt5::Packet::Subscribe(Subscribe {
            packet_id: id(1),
            properties: Properties::new(),
            filters: vec![(filter.into(), SubscriptionOptions::at(qos))],
        }))
        .await;
    let Some(Packet::Subscribe(upstream)) = printer.next().await else {
        panic!("no SUBSCRIBE upstream");
    };
    printer
        .send(&Packet::SubAck(mqtt::SubAck {
            packet_id: upstream.packet_id,
            return_codes: vec![mqtt::SubscribeReturnCode::Success(QoS::AtLeastOnce)],
        }))
        .await;
    match client.next().await {
        Some(mqtt5::Packet::SubAck(suback)) => {
            assert_eq!(suback.reasons, vec![ReasonCode(qos as u8)])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn printer_publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &str) -> Packet {
    Packet::Publish(mqtt::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: packet_id.map(id),
        payload: Bytes::from(payload.to_owned()),
    })
}

#[tokio::test]
async fn the_connack_says_what_the_edge_offers() {
    let edge = TestEdge::start().await;
    let _printer = scripted_printer(&edge);
    let connect = mqtt5::Connect {
        keep_alive: 0,
        properties: Properties::new().with(Property::SessionExpiryInterval(3600)),
        ..V5Client::connect_packet("")
    };
    let (_client, connack) = connected(&edge, connect).await;
    let properties = &connack.properties;
    assert!(!connack.session_present);
    assert_eq!(properties.session_expiry_interval(), Some(0));
    assert_eq!(properties.receive_maximum(), Some(1024));
    assert_eq!(
        properties.maximum_packet_size(),
        u32::try_from(edge.config.limits.max_packet_size).ok()
    );
    assert_eq!(properties.topic_alias_maximum(), Some(32));
    assert!(properties.assigned_client_identifier().is_some());
    // Keep-alive 0 is held to the longest the edge allows, and said so.
    assert_eq!(
        properties.server_keep_alive(),
        Some(edge.config.limits.keep_alive_max_seconds)
    );
    let flags: Vec<(u8, u8)> = properties
        .iter()
        .filter_map(|property| match property {
            Property::RetainAvailable(v) => Some((0x25, *v)),
            Property::WildcardSubscriptionAvailable(v) => Some((0x28, *v)),
            Property::SubscriptionIdentifierAvailable(v) => Some((0x29, *v)),
            Property::SharedSubscriptionAvailable(v) => Some((0x2a, *v)),
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![(0x25, 1), (0x28, 1), (0x29, 0), (0x2a, 0)]);
    edge.stop().await;
}

#[tokio::test]
async fn refusals_carry_mqtt5_reason_codes_and_strings() {
    let edge = TestEdge::start().await;
    // No printer yet: the device is offline.
    let (mut client, connack) =
        V5Client::connect(&edge, &edge.bearer(), V5Client::connect_packet("a")).await;
    let connack = connack.unwrap();
    assert_eq!(connack.reason, ReasonCode::SERVER_UNAVAILABLE);
    assert_eq!(
        connack.properties.reason_string().as_deref(),
        Some("device offline")
    );
    assert_eq!(client.next().await, None);
    assert_eq!(client.closed_with, Some((1013, "device offline".into())));
    let _printer = scripted_printer(&edge);
    for (authorization, reason) in [
        (
            "Bearer rly_nosuchkey_0000000000000000000000000000".to_owned(),
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        ),
        (String::new(), ReasonCode::NOT_AUTHORIZED),
    ] {
        let (mut client, connack) =
            V5Client::connect(&edge, &authorization, V5Client::connect_packet("a")).await;
        let connack = connack.unwrap();
        assert_eq!(connack.reason, reason, "{authorization:?}");
        assert_eq!(
            connack.properties.reason_string().as_deref(),
            Some("unauthorized")
        );
        assert_eq!(client.next().await, None);
        assert_eq!(client.closed_with.unwrap().0, 1008);
    }
    // A CONNECT over the edge's packet size limit, in WebSocket messages
    // each under it: refused from its header, with CONNACK 0x95.
    let edge_small = TestEdge::start_with(|config| config.limits.max_packet_size = 4096).await;
    let big = mqtt5::Packet::Connect(mqtt5::Connect {
        properties: Properties::new()
            .with(Property::UserProperty("padding".into(), "x".repeat(10_000))),
        ..V5Client::connect_packet("a")
    });
    let mut wire = bytes::BytesMut::new();
    mqtt5::encode(&big, &mut wire).unwrap();
    let mut socket = edge_small
        .open_device("/mqtt", &[("authorization", &edge_small.bearer())])
        .await;
    for chunk in wire.chunks(1024).take(2) {
        use futures_util::SinkExt;
        socket
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                Bytes::copy_from_slice(chunk),
            ))
            .await
            .unwrap();
    }
    let mut client = V5Client::from_socket(socket);
    match client.next().await {
        Some(mqtt5::Packet::ConnAck(connack)) => {
            assert_eq!(connack.reason, ReasonCode::PACKET_TOO_LARGE)
        }
        other => panic!("expected CONNACK 0x95, got {other:?}"),
    }
    assert_eq!(client.next().await, None);
    assert_eq!(client.closed_with.unwrap().0, 1009);
    edge_small.stop().await;
    edge.stop().await;
}

#[tokio::test]
async fn topic_aliases_are_resolved_before_the_printer() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let (mut client, _) = connected(&edge, V5Client::connect_packet("aliases")).await;
    let publish = |topic: &str, alias: u16, payload: &'static [u8]| {
        mqtt5::Packet::Publish(mqtt5::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            properties: Properties::new()
                .with(Property::TopicAlias(alias))
                .with(Property::UserProperty("trace".into(), "1".into())),
            payload: Bytes::from_static(payload),
        })
    };
    client.send(&publish("device/X1/request", 1, b"one")).await;
    client.send(&publish("", 1, b"two")).await;
    for payload in ["one", "two"] {
        match printer.next().await {
            Some(Packet::Publish(received)) => {
                assert_eq!(received.topic, "device/X1/request");
                assert_eq!(received.payload, payload.as_bytes());
            }
            other => panic!("{other:?}"),
        }
    }
    // An alias never set: DISCONNECT 0x94, then the close.
    client.send(&publish("", 7, b"three")).await;
    match client.next().await {
        Some(mqtt5::Packet::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason, ReasonCode::TOPIC_ALIAS_INVALID);
            assert_eq!(
                disconnect.properties.reason_string().as_deref(),
                Some("topic alias 7 was never set")
            );
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(client.next().await, None);
    assert_eq!(client.closed_with.unwrap().0, 1002);
    edge.stop().await;
}

#[tokio::test]
async fn a_read_only_key_hears_0x87_in_its_puback_and_stays() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let read = edge.new_bearer(Scope::Read).await;
    let (mut client, connack) =
        V5Client::connect(&edge, &read, V5Client::connect_packet("reader")).await;
    assert_eq!(connack.unwrap().reason, ReasonCode::SUCCESS);
    client
        .send(&mqtt5::Packet::Publish(mqtt5::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "device/X1/request".into(),
            packet_id: Some(id(3)),
            properties: Properties::new(),
            payload: Bytes::from_static(b"{}"),
        }))
        .await;
    match client.next().await {
        Some(mqtt5::Packet::PubAck(ack)) => {
            assert_eq!(ack.packet_id, id(3));
            assert_eq!(ack.reason, ReasonCode::NOT_AUTHORIZED);
            assert_eq!(
                ack.properties.reason_string().as_deref(),
                Some("read-only key")
            );
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Still connected; the printer heard nothing but the subscription.
    subscribed(
        &mut client,
        &mut printer,
        "device/X1/report",
        QoS::AtMostOnce,
    )
    .await;
    client.send(&mqtt5::Packet::PingReq).await;
    assert_eq!(client.next().await, Some(mqtt5::Packet::PingResp));
    edge.stop().await;
}

#[tokio::test]
async fn the_clients_receive_maximum_holds_the_edges_deliveries() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let connect = mqtt5::Connect {
        properties: Properties::new().with(Property::ReceiveMaximum(2)),
        ..V5Client::connect_packet("slow-acker")
    };
    let (mut client, _) = connected(&edge, connect).await;
    subscribed(&mut client, &mut printer, "t/#", QoS::AtLeastOnce).await;
    for n in 1..=6 {
        printer
            .send(&printer_publish(
                "t/x",
                QoS::AtLeastOnce,
                Some(n),
                &n.to_string(),
            ))
            .await;
    }
    let mut unacknowledged = std::collections::VecDeque::new();
    let mut received = Vec::new();
    while received.len() < 6 {
        if unacknowledged.len() == 2 {
            // At its maximum: the edge sends nothing more until an ack.
            assert_eq!(
                client.next_within_for(Duration::from_millis(300)).await,
                None,
                "a third delivery while two are unacknowledged"
            );
            let oldest: PacketId = unacknowledged.pop_front().unwrap();
            client
                .send(&mqtt5::Packet::PubAck(Ack::success(oldest)))
                .await;
        }
        match client.next().await {
            Some(mqtt5::Packet::Publish(publish)) => {
                assert_eq!(publish.qos, QoS::AtLeastOnce);
                unacknowledged.push_back(publish.packet_id.unwrap());
                received.push(String::from_utf8(publish.payload.to_vec()).unwrap());
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(received, ["1", "2", "3", "4", "5", "6"]);
    edge.stop().await;
}

#[tokio::test]
async fn a_message_over_the_clients_maximum_packet_size_is_dropped_for_it_alone() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let mut small = V5Client::connect_packet("small");
    small.properties = Properties::new().with(mqtt5::Property::MaximumPacketSize(64));
    let (mut small, _) = connected(&edge, small).await;
    subscribed(&mut small, &mut printer, "t/#", QoS::AtMostOnce).await;
    let (mut large, _) = connected(&edge, V5Client::connect_packet("large")).await;
    large
        .send(&mqtt5::Packet::Subscribe(Subscribe {
            packet_id: id(1),
            properties: Properties::new(),
            filters: vec![("t/#".into(), SubscriptionOptions::at(QoS::AtMostOnce))],
        }))
        .await;
    assert!(matches!(large.next().await, Some(mqtt5::Packet::SubAck(_))));
    let big = "x".repeat(200);
    printer
        .send(&printer_publish("t/x", QoS::AtMostOnce, None, &big))
        .await;
    printer
        .send(&printer_publish("t/x", QoS::AtMostOnce, None, "fits"))
        .await;
    // The client that allows any size gets both; the one that allows 64
    // bytes gets the small one only (MQTT 5 §3.1.2.11.4: dropped, not cut).
    for expected in [big.as_str(), "fits"] {
        match large.next().await {
            Some(mqtt5::Packet::Publish(publish)) => assert_eq!(publish.payload, expected),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    match small.next().await {
        Some(mqtt5::Packet::Publish(publish)) => assert_eq!(publish.payload, "fits"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    edge.stop().await;
}

#[tokio::test]
async fn mqtt5_and_311_clients_see_the_same_messages_in_the_same_order() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let (mut v5, _) = connected(&edge, V5Client::connect_packet("five")).await;
    subscribed(&mut v5, &mut printer, "device/X1/report", QoS::AtMostOnce).await;
    let mut v3 = Client::connect(&edge, &edge.bearer(), connect_packet("three")).await;
    v3.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: id(1),
        filters: vec![("device/X1/report".into(), QoS::AtMostOnce)],
    }))
    .await;
    assert!(matches!(v3.next().await, Some(Packet::SubAck(_))));
    let sent: Vec<String> = (0..50).map(|n| format!("{{\"n\":{n}}}")).collect();
    for payload in &sent {
        printer
            .send(&printer_publish(
                "device/X1/report",
                QoS::AtMostOnce,
                None,
                payload,
            ))
            .await;
    }
    // Every packet must be a PUBLISH: a close or anything else fails the
    // test instead of being skipped.
    let mut seen_v5 = Vec::new();
    while seen_v5.len() < sent.len() {
        match v5.next().await {
            Some(mqtt5::Packet::Publish(publish)) => {
                seen_v5.push(String::from_utf8(publish.payload.to_vec()).unwrap())
            }
            other => panic!("expected PUBLISH {}, got {other:?}", seen_v5.len()),
        }
    }
    let mut seen_v3 = Vec::new();
    while seen_v3.len() < sent.len() {
        match v3.next().await {
            Some(Packet::Publish(publish)) => {
                seen_v3.push(String::from_utf8(publish.payload.to_vec()).unwrap())
            }
            other => panic!("expected PUBLISH {}, got {other:?}", seen_v3.len()),
        }
    }
    assert_eq!(seen_v5, sent);
    assert_eq!(seen_v3, sent);
    edge.stop().await;
}

#[tokio::test]
async fn a_replaced_session_hears_why_in_a_disconnect() {
    let edge = TestEdge::start().await;
    let _printer = scripted_printer(&edge);
    let (mut first, _) = connected(&edge, V5Client::connect_packet("same-id")).await;
    let (_second, _) = connected(&edge, V5Client::connect_packet("same-id")).await;
    match first.next().await {
        Some(mqtt5::Packet::Disconnect(disconnect)) => {
            assert_eq!(disconnect.reason, ReasonCode::SESSION_TAKEN_OVER);
            assert_eq!(
                disconnect.properties.reason_string().as_deref(),
                Some("replaced: same client id")
            );
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert_eq!(first.next().await, None);
    assert_eq!(
        first.closed_with,
        Some((1008, "replaced: same client id".into()))
    );
    edge.stop().await;
}

#[tokio::test]
async fn a_disconnect_with_will_publishes_the_will() {
    let edge = TestEdge::start().await;
    let mut printer = scripted_printer(&edge);
    let connect = mqtt5::Connect {
        will: Some(mqtt5::Will {
            properties: Properties::new().with(Property::WillDelayInterval(0)),
            topic: "device/X1/request".into(),
            payload: Bytes::from_static(b"bye"),
            qos: QoS::AtMostOnce,
            retain: false,
        }),
        ..V5Client::connect_packet("with-will")
    };
    let (mut client, _) = connected(&edge, connect).await;
    client
        .send(&mqtt5::Packet::Disconnect(mqtt5::Disconnect {
            reason: ReasonCode::DISCONNECT_WITH_WILL,
            properties: Properties::new(),
        }))
        .await;
    match printer.next().await {
        Some(Packet::Publish(will)) => assert_eq!(will.payload, &b"bye"[..]),
        other => panic!("expected the will, got {other:?}"),
    }
    edge.stop().await;
}

/// An MQTT 5 client straight to Mosquitto over TCP, or to the edge.
enum Transport {
    Edge(Box<V5Client>),
    Mosquitto(tokio::net::TcpStream, bytes::BytesMut),
}

impl Transport {
    async fn send(&mut self, packet: &mqtt5::Packet) {
        match self {
            Transport::Edge(client) => client.send(packet).await,
            Transport::Mosquitto(stream, _) => {
                use tokio::io::AsyncWriteExt;
                let mut bytes = bytes::BytesMut::new();
                mqtt5::encode(packet, &mut bytes).unwrap();
                stream.write_all(&bytes).await.unwrap();
            }
        }
    }

    async fn next(&mut self) -> mqtt5::Packet {
        match self {
            Transport::Edge(client) => client.next().await.expect("a packet"),
            Transport::Mosquitto(stream, buffer) => {
                use tokio::io::AsyncReadExt;
                tokio::time::timeout(PATIENCE, async {
                    loop {
                        if let Some(packet) = mqtt5::decode(buffer, 1 << 20).unwrap() {
                            return packet;
                        }
                        assert!(stream.read_buf(buffer).await.unwrap() > 0, "closed");
                    }
                })
                .await
                .expect("Mosquitto answered in time")
            }
        }
    }
}

fn mosquitto_address() -> String {
    std::env::var("RELAY_TEST_MQTT_ADDR").unwrap_or_else(|_| "127.0.0.1:1883".into())
}

/// A 3.1.1 connection to Mosquitto (the hub's upstream, or a publisher).
async fn mosquitto_311(client_id: &str) -> MqttPeer<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(mosquitto_address())
        .await
        .expect("Mosquitto (scripts/services starts it)");
    let mut peer = MqttPeer::new(stream);
    peer.send(&Packet::Connect(connect_packet(client_id))).await;
    assert!(
        matches!(peer.next().await, Some(Packet::ConnAck(ack)) if ack.code == mqtt::ConnectReturnCode::Accepted)
    );
    peer
}

/// What the client sees: SUBACKs, retained and live messages, the PUBACK
/// of its own publish through a topic alias, UNSUBACKs.
async fn observe(client: &mut Transport, base: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let subscribe = |id: u16, retain_handling| {
        mqtt5::Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(id).unwrap(),
            properties: Properties::new(),
            filters: vec![(
                format!("{base}/#"),
                SubscriptionOptions {
                    retain_handling,
                    ..SubscriptionOptions::at(QoS::AtLeastOnce)
                },
            )],
        })
    };
    client
        .send(&subscribe(1, mqtt5::RetainHandling::SendAtSubscribe))
        .await;
    // SUBACK, then the retained message.
    for _ in 0..2 {
        seen.push(describe(client.next().await));
    }
    // Again, Retain Handling 1: the filter exists, no retained message.
    client
        .send(&subscribe(2, mqtt5::RetainHandling::SendIfNew))
        .await;
    seen.push(describe(client.next().await));
    let publish = |topic: &str, payload: &'static [u8]| {
        mqtt5::Packet::Publish(mqtt5::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(id(7)),
            properties: Properties::new().with(Property::TopicAlias(1)),
            payload: Bytes::from_static(payload),
        })
    };
    client.send(&publish(&format!("{base}/b"), b"first")).await;
    client.send(&publish("", b"second")).await;
    // Two PUBACKs and the two messages back, in whatever interleaving.
    let mut rest: Vec<String> = Vec::new();
    for _ in 0..4 {
        rest.push(describe(client.next().await));
    }
    rest.sort();
    seen.extend(rest);
    let unsubscribe = |id: u16| {
        mqtt5::Packet::Unsubscribe(mqtt5::Unsubscribe {
            packet_id: PacketId::new(id).unwrap(),
            properties: Properties::new(),
            filters: vec![format!("{base}/#")],
        })
    };
    client.send(&unsubscribe(3)).await;
    seen.push(describe(client.next().await));
    seen
}

fn describe(packet: mqtt5::Packet) -> String {
    match packet {
        mqtt5::Packet::SubAck(ack) => format!("SUBACK {:?}", ack.reasons),
        mqtt5::Packet::UnsubAck(ack) => format!("UNSUBACK {:?}", ack.reasons),
        mqtt5::Packet::PubAck(ack) => format!("PUBACK {:?}", ack.reason),
        mqtt5::Packet::Publish(publish) => format!(
            "PUBLISH {} retain={} qos={:?} {}",
            publish.topic.rsplit('/').next().unwrap_or(""),
            publish.retain,
            publish.qos,
            String::from_utf8_lossy(&publish.payload)
        ),
        other => format!("{other:?}"),
    }
}

/// An MQTT 5 client sees through the relay what it sees on Mosquitto
/// directly: SUBACKs, retained messages per Retain Handling, its own
/// messages back, PUBACKs, UNSUBACKs. The hub's upstream is a 3.1.1
/// connection to the same Mosquitto.
#[tokio::test]
async fn a_v5_client_sees_what_it_sees_on_mosquitto() {
    let edge = TestEdge::start().await;
    let serial = relay_store::credential::random_base32(10).unwrap();
    let hub_upstream = mosquitto_311(&format!("relay-hub-{serial}")).await;
    let (reader, writer) = hub_upstream.io.into_split();
    edge.edge.as_ref().unwrap().hubs().start(
        edge.device.clone(),
        Upstream::from_halves(reader, writer),
        HubConfig {
            replay_retained: RetainedReplay::Always,
            ..HubConfig::new(256 * 1024)
        },
        None,
        Duration::ZERO,
    );
    let mut publisher = mosquitto_311(&format!("publisher-{serial}")).await;
    let mut observed = Vec::new();
    for (name, via_edge) in [("direct", false), ("relay", true)] {
        let base = format!("relay-compare/{serial}/{name}");
        publisher
            .send(&Packet::Publish(mqtt::Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: format!("{base}/a"),
                packet_id: Some(id(1)),
                payload: Bytes::from_static(b"kept"),
            }))
            .await;
        assert!(matches!(publisher.next().await, Some(Packet::PubAck(_))));
        let mut client = if via_edge {
            let connect = V5Client::connect_packet(&format!("v5-{serial}"));
            Transport::Edge(Box::new(connected(&edge, connect).await.0))
        } else {
            let stream = tokio::net::TcpStream::connect(mosquitto_address())
                .await
                .unwrap();
            let mut client = Transport::Mosquitto(stream, bytes::BytesMut::new());
            client
                .send(&mqtt5::Packet::Connect(V5Client::connect_packet(&format!(
                    "v5-direct-{serial}"
                ))))
                .await;
            assert!(
                matches!(client.next().await, mqtt5::Packet::ConnAck(ack) if ack.reason == ReasonCode::SUCCESS)
            );
            client
        };
        observed.push(observe(&mut client, &base).await);
        // Clear the retained message.
        publisher
            .send(&Packet::Publish(mqtt::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: true,
                topic: format!("{base}/a"),
                packet_id: None,
                payload: Bytes::new(),
            }))
            .await;
    }
    assert_eq!(observed[0], observed[1], "direct, then through the relay");
    assert_eq!(
        observed[0][..3],
        [
            "SUBACK [ReasonCode(1)]",
            "PUBLISH a retain=true qos=AtLeastOnce kept",
            "SUBACK [ReasonCode(1)]",
        ]
    );
    edge.stop().await;
}
