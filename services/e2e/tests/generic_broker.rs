//! The `mqtt` printer kind against the machine's real Mosquitto, started by
//! the test with a password file and TLS on a port of its own.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use bytes::Bytes;
use relay_proto::mqtt::{Packet, PacketId, Publish, QoS, Subscribe};
use support::*;
use tokio_util::sync::CancellationToken;

use relay_testkit::mosquitto::{Broker, PASSWORD, USER, agent_config, start_broker};

/// An edge with its tunnel listener, a Mosquitto of its own, and an agent
/// of the `mqtt` kind logging in with `password`, connected.
async fn edge_with_agent(password: &str) -> (TestEdge, Broker, CancellationToken) {
    let edge =
        TestEdge::start_with(|config| config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap()))
            .await;
    let (broker, ca) = start_broker(&edge.pki.dir);
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let config = agent_config(&edge, &broker, &ca, password, &credential.reveal());
    let printer = config.validate().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(relay_agent::tunnel::run(config, printer, stop.clone()));
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .unwrap();
    (edge, broker, stop)
}

#[tokio::test]
async fn the_mqtt_kind_works_with_a_passworded_tls_mosquitto() {
    let (edge, _broker, stop) = edge_with_agent(PASSWORD).await;

    let topic = format!(
        "relay-test/{}/status",
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
    for (index, payload) in [&b"one"[..], b"two", b"three"].iter().enumerate() {
        talker
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: Some(PacketId::new(index as u16 + 1).unwrap()),
                payload: Bytes::copy_from_slice(payload),
            }))
            .await;
        assert_eq!(
            talker.next().await,
            Some(Packet::PubAck(PacketId::new(index as u16 + 1).unwrap()))
        );
    }
    // Through the agent to Mosquitto and back, in order.
    for expected in [&b"one"[..], b"two", b"three"] {
        match listener.next().await {
            Some(Packet::Publish(publish)) => {
                assert_eq!(&publish.payload[..], expected);
                if let Some(id) = publish.packet_id {
                    listener.send(&Packet::PubAck(id)).await;
                }
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }
    stop.cancel();
    edge.stop().await;
}

#[tokio::test]
async fn a_wrong_broker_password_is_reported_as_a_printer_refusal() {
    let (edge, _broker, stop) = edge_with_agent("not-the-password").await;
    let mut socket = edge
        .open_device("/mqtt", &[("authorization", &edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("app")).await;
    assert_eq!(refusal(&mut socket).await.connack, Some(3));
    edge.assert_closes_counted(1014, 1).await;
    stop.cancel();
    edge.stop().await;
}

/// An app of the comparison: through the relay, or straight to the broker.
enum App {
    Relay(Box<Client>),
    Direct(Box<MqttPeer<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

impl App {
    async fn send(&mut self, packet: &Packet) {
        match self {
            App::Relay(client) => client.send(packet).await,
            App::Direct(peer) => peer.send(packet).await,
        }
    }

    async fn next(&mut self) -> Option<Packet> {
        match self {
            App::Relay(client) => client.next().await,
            App::Direct(peer) => peer.next().await,
        }
    }

    /// The next PUBLISH, acknowledged if it asks to be.
    async fn next_publish(&mut self) -> Publish {
        match self.next().await {
            Some(Packet::Publish(publish)) => {
                if let Some(id) = publish.packet_id {
                    self.send(&Packet::PubAck(id)).await;
                }
                publish
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(9).unwrap(),
            filters: vec![(filter.to_owned(), qos)],
        }))
        .await;
        assert!(matches!(self.next().await, Some(Packet::SubAck(_))));
    }

    async fn publish(&mut self, topic: &str, payload: &'static [u8], retain: bool) {
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic: topic.to_owned(),
            packet_id: Some(PacketId::new(3).unwrap()),
            payload: Bytes::from_static(payload),
        }))
        .await;
        assert_eq!(
            self.next().await,
            Some(Packet::PubAck(PacketId::new(3).unwrap()))
        );
    }
}

/// Opens apps one way or the other.
struct Apps<'a> {
    edge: &'a TestEdge,
    broker: &'a Broker,
    ca: &'a std::path::Path,
    through_relay: bool,
}

impl Apps<'_> {
    async fn open(&self, client_id: &str, will: Option<relay_proto::mqtt::Will>) -> App {
        let mut connect = connect_packet(client_id);
        connect.will = will;
        if self.through_relay {
            return App::Relay(Box::new(
                Client::connect(self.edge, &self.edge.bearer(), connect).await,
            ));
        }
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::CertificateDer::pem_file_iter(self.ca).unwrap() {
            roots.add(certificate.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.broker.port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::from(std::net::IpAddr::from([127, 0, 0, 1])),
                tcp,
            )
            .await
            .unwrap();
        connect.username = Some(USER.into());
        connect.password = Some(Bytes::from_static(PASSWORD.as_bytes()).into());
        let mut peer = MqttPeer::new(tls);
        peer.send(&Packet::Connect(connect)).await;
        assert!(
            matches!(peer.next().await, Some(Packet::ConnAck(ack)) if ack.code == relay_proto::mqtt::ConnectReturnCode::Accepted)
        );
        App::Direct(Box::new(peer))
    }
}

/// Retained messages and wills as a client sees them, the same through the
/// relay as straight to Mosquitto: the issue's missing, stale, cleared and
/// duplicate cases, and a QoS 1 will.
async fn retained_and_wills_as_mosquitto_serves_them(apps: &Apps<'_>) {
    let base = format!(
        "relay-test/{}",
        relay_store::credential::random_base32(8).unwrap()
    );
    let all = format!("{base}/#");
    let (x, y, marker) = (
        format!("{base}/x"),
        format!("{base}/y"),
        format!("{base}/m"),
    );
    let mut setter = apps.open("setter", None).await;
    let mut a = apps.open("a", None).await;
    a.subscribe(&all, QoS::AtLeastOnce).await;

    // Missing: retained while A holds the filter; B subscribes later.
    setter.publish(&x, b"v1", true).await;
    let live = a.next_publish().await;
    assert_eq!((live.retain, &live.payload[..]), (false, &b"v1"[..]));
    let mut b = apps.open("b", None).await;
    b.subscribe(&all, QoS::AtLeastOnce).await;
    let replayed = b.next_publish().await;
    assert_eq!((replayed.retain, &replayed.payload[..]), (true, &b"v1"[..]));
    assert_eq!(replayed.qos, QoS::AtLeastOnce);

    // Stale: v2 replaces v1; a new subscriber gets v2.
    setter.publish(&x, b"v2", true).await;
    for app in [&mut a, &mut b] {
        let live = app.next_publish().await;
        assert_eq!((live.retain, &live.payload[..]), (false, &b"v2"[..]));
    }
    let mut c = apps.open("c", None).await;
    c.subscribe(&all, QoS::AtMostOnce).await;
    let replayed = c.next_publish().await;
    assert_eq!((replayed.retain, &replayed.payload[..]), (true, &b"v2"[..]));
    assert_eq!(replayed.qos, QoS::AtMostOnce);

    // Cleared: a new subscriber gets nothing before a live marker.
    setter.publish(&x, b"", true).await;
    for app in [&mut a, &mut b, &mut c] {
        assert!(app.next_publish().await.payload.is_empty());
    }
    let mut d = apps.open("d", None).await;
    d.subscribe(&all, QoS::AtMostOnce).await;
    setter.publish(&marker, b"marker", false).await;
    assert_eq!(&d.next_publish().await.payload[..], b"marker");
    for app in [&mut a, &mut b, &mut c] {
        assert_eq!(&app.next_publish().await.payload[..], b"marker");
    }

    // Duplicate: y retained; B adds a new overlapping filter. B gets y
    // again with RETAIN=1; A, which holds only the first filter, does not.
    setter.publish(&y, b"on", true).await;
    for app in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(&app.next_publish().await.payload[..], b"on");
    }
    b.subscribe(&format!("{base}/+"), QoS::AtMostOnce).await;
    let replayed = b.next_publish().await;
    assert_eq!((replayed.retain, &replayed.payload[..]), (true, &b"on"[..]));
    setter.publish(&marker, b"after", false).await;
    assert_eq!(&a.next_publish().await.payload[..], b"after");

    // A QoS 1 will reaches a QoS 1 subscriber at QoS 1.
    let will = relay_proto::mqtt::Will {
        topic: format!("{base}/will"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    let vanishing = apps.open("vanishing", Some(will)).await;
    drop(vanishing);
    let will = a.next_publish().await;
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    // Leave nothing retained behind on the shared broker.
    setter.publish(&y, b"", true).await;
}

#[tokio::test]
async fn retained_messages_and_wills_look_the_same_through_the_relay_as_direct() {
    let (edge, broker, stop) = edge_with_agent(PASSWORD).await;
    let ca = edge.pki.dir.join("broker-ca.pem");
    for through_relay in [false, true] {
        let apps = Apps {
            edge: &edge,
            broker: &broker,
            ca: &ca,
            through_relay,
        };
        retained_and_wills_as_mosquitto_serves_them(&apps).await;
    }
    stop.cancel();
    edge.stop().await;
}

/// The one deliberate difference from Mosquitto in what an app may
/// subscribe to on a generic broker: its `$SYS` tree. Straight to Mosquitto
/// `$SYS/#` is granted; through the relay it is refused (SUBACK 0x80) and
/// never reaches the broker, while `#` is granted by both.
#[tokio::test]
async fn sys_topics_are_the_one_filter_refused_compared_with_mosquitto() {
    let (edge, broker, stop) = edge_with_agent(PASSWORD).await;
    let ca = edge.pki.dir.join("broker-ca.pem");
    for through_relay in [false, true] {
        let apps = Apps {
            edge: &edge,
            broker: &broker,
            ca: &ca,
            through_relay,
        };
        let mut app = apps.open("sys-watcher", None).await;
        app.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(4).unwrap(),
            filters: vec![
                ("$SYS/#".to_owned(), QoS::AtMostOnce),
                ("#".to_owned(), QoS::AtMostOnce),
            ],
        }))
        .await;
        let codes = loop {
            match app.next().await {
                Some(Packet::SubAck(suback)) => break suback.return_codes,
                Some(Packet::Publish(_)) => {}
                other => panic!("expected SUBACK, got {other:?}"),
            }
        };
        let granted = relay_proto::mqtt::SubscribeReturnCode::Success(QoS::AtMostOnce);
        let expected = if through_relay {
            vec![relay_proto::mqtt::SubscribeReturnCode::Failure, granted]
        } else {
            vec![granted, granted]
        };
        assert_eq!(codes, expected, "through the relay: {through_relay}");
    }
    stop.cancel();
    edge.stop().await;
}

/// A broker message too large for the relay (over the agent's 1 MiB, and
/// the edge's 256 KiB) is skipped where it is found too large, not the end
/// of the printer link: the app behind the relay gets the next message and
/// stays connected. Before, the agent ended the link and every app got 1014.
#[tokio::test]
async fn a_message_too_large_for_the_relay_is_skipped_and_the_app_stays() {
    let (edge, broker, stop) = edge_with_agent(PASSWORD).await;
    let ca = edge.pki.dir.join("broker-ca.pem");
    let relay_apps = Apps {
        edge: &edge,
        broker: &broker,
        ca: &ca,
        through_relay: true,
    };
    let direct_apps = Apps {
        through_relay: false,
        ..relay_apps
    };
    let mut reader = relay_apps.open("reader", None).await;
    reader.subscribe("big/#", QoS::AtMostOnce).await;
    let mut writer = direct_apps.open("writer", None).await;
    for payload in [vec![b'x'; 1_500_000], vec![b'y'; 400_000]] {
        writer
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "big/x".into(),
                packet_id: None,
                payload: Bytes::from(payload),
            }))
            .await;
    }
    writer.publish("big/x", b"small", false).await;
    let next = reader.next_publish().await;
    assert_eq!(next.payload, Bytes::from_static(b"small"));
    stop.cancel();
    edge.stop().await;
}
