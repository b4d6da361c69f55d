//! MQTT straight over TLS (mqtts) and TCP, for apps without WebSocket:
//! the device from SNI, or from a device-bound key without SNI; `bblp` and
//! the whole key as password (Home Assistant's Bambu Lab integration); the
//! refusals as CONNACK codes; ALPN `mqtt` on the public listener only when
//! enabled; a wss and an mqtts client seeing the same messages over one
//! printer connection; and `mosquitto_sub` (Debian's mosquitto-clients, a
//! client nobody here wrote) through it all.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::edge as support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use relay_proto::mqtt::{self, ConnectReturnCode, Packet, PacketId, QoS};
use relay_store::{NewApiKey, Scope};
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

async fn mqtts_edge() -> TestEdge {
    TestEdge::start_with(|config| {
        config.public.mqtts_listen = Some("127.0.0.1:0".parse().unwrap());
        config.public.mqtt_plain_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

fn scripted_printer(edge: &TestEdge) -> MqttPeer<DuplexStream> {
    edge.scripted_printer()
}

fn connector(edge: &TestEdge, alpn: Option<&[u8]>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(edge.pki.ca_der()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.map(|alpn| vec![alpn.to_vec()]).unwrap_or_default();
    TlsConnector::from(Arc::new(config))
}

/// TLS to `addr` with `sni` as the name the client dialled.
async fn tls_to(
    edge: &TestEdge,
    addr: std::net::SocketAddr,
    sni: &str,
    alpn: Option<&[u8]>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    connector(edge, alpn).connect(name, tcp).await
}

fn mqtts_addr(edge: &TestEdge) -> std::net::SocketAddr {
    edge.edge.as_ref().unwrap().mqtts_addr.unwrap()
}

fn connect_with(client_id: &str, username: &str, password: &str) -> Packet {
    Packet::Connect(mqtt::Connect {
        username: Some(username.into()),
        password: Some(relay_proto::Secret::new(Bytes::from(password.to_owned()))),
        ..connect_packet(client_id)
    })
}

async fn connack<T>(client: &mut MqttPeer<T>) -> ConnectReturnCode
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match client.next().await {
        Some(Packet::ConnAck(connack)) => connack.code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The printer's side: the next packet is a SUBSCRIBE, granted at QoS 1.
async fn grant_the_subscribe(printer: &mut MqttPeer<DuplexStream>) {
    let Some(Packet::Subscribe(upstream)) = printer.next().await else {
        panic!("no SUBSCRIBE upstream");
    };
    printer
        .send(&Packet::SubAck(mqtt::SubAck {
            packet_id: upstream.packet_id,
            return_codes: vec![mqtt::SubscribeReturnCode::Success(QoS::AtLeastOnce)],
        }))
        .await;
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).unwrap()
}

async fn device_bound_key(edge: &TestEdge) -> String {
    let (_, credential) = edge
        .database
        .store
        .create_api_key(NewApiKey {
            tenant_id: &edge.tenant,
            device_id: Some(&edge.device),
            scope: Scope::Control,
            label: "home assistant",
            expires_at: None,
        })
        .await
        .unwrap();
    credential.reveal()
}

#[tokio::test]
async fn bblp_and_the_key_over_mqtts_with_sni_share_the_printer_with_a_wss_client() {
    let edge = mqtts_edge().await;
    let mut printer = scripted_printer(&edge);
    let tls = tls_to(&edge, mqtts_addr(&edge), &edge.host(), None)
        .await
        .unwrap();
    let mut ha = MqttPeer::new(tls);
    // Home Assistant's Bambu Lab integration: user `bblp`, the key as the
    // access code.
    ha.send(&connect_with("ha", "bblp", &edge.key.0)).await;
    assert_eq!(connack(&mut ha).await, ConnectReturnCode::Accepted);
    ha.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: id(1),
        filters: vec![("device/X1/report".into(), QoS::AtLeastOnce)],
    }))
    .await;
    grant_the_subscribe(&mut printer).await;
    assert!(matches!(ha.next().await, Some(Packet::SubAck(_))));
    let mut web = Client::connect(&edge, &edge.bearer(), connect_packet("web")).await;
    web.send(&Packet::Subscribe(mqtt::Subscribe {
        packet_id: id(1),
        filters: vec![("device/X1/report".into(), QoS::AtMostOnce)],
    }))
    .await;
    assert!(matches!(web.next().await, Some(Packet::SubAck(_))));
    let sent: Vec<String> = (0..20).map(|n| format!("{{\"n\":{n}}}")).collect();
    for payload in &sent {
        printer
            .send(&Packet::Publish(mqtt::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "device/X1/report".into(),
                packet_id: None,
                payload: Bytes::from(payload.clone()),
            }))
            .await;
    }
    for client in ["mqtts", "wss"] {
        let mut seen = Vec::new();
        while seen.len() < sent.len() {
            let packet = if client == "mqtts" {
                ha.next().await
            } else {
                web.next().await
            };
            match packet {
                Some(Packet::Publish(publish)) => {
                    seen.push(String::from_utf8(publish.payload.to_vec()).unwrap())
                }
                other => panic!("{client}: expected PUBLISH, got {other:?}"),
            }
        }
        assert_eq!(seen, sent, "{client} sees the printer's order");
    }
    // A QoS 1 PUBLISH over mqtts is acknowledged after the printer's.
    ha.send(&Packet::Publish(mqtt::Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "device/X1/request".into(),
        packet_id: Some(id(7)),
        payload: Bytes::from_static(b"{}"),
    }))
    .await;
    let Some(Packet::Publish(upstream)) = printer.next().await else {
        panic!("no PUBLISH upstream");
    };
    printer
        .send(&Packet::PubAck(upstream.packet_id.unwrap()))
        .await;
    assert_eq!(ha.next().await, Some(Packet::PubAck(id(7))));
    let (_, metrics) = edge.admin_get("/metrics").await;
    assert!(
        metrics.contains("relay_edge_mqtt_connections_total 1"),
        "{metrics}"
    );
    edge.stop().await;
}

#[tokio::test]
async fn refusals_over_mqtts_are_the_connack_then_the_connection_closes() {
    let edge = mqtts_edge().await;
    let _printer = scripted_printer(&edge);
    let cases = [
        // A wrong secret.
        (
            edge.host(),
            "bblp".to_owned(),
            format!("{}x", edge.key.0),
            ConnectReturnCode::BadUserNameOrPassword,
        ),
        // No credential at all.
        (
            edge.host(),
            String::new(),
            String::new(),
            ConnectReturnCode::NotAuthorized,
        ),
        // No SNI with a tenant-wide key: `mosquitto_sub_without_sni_needs_a_device_bound_key`.
    ];
    for (sni, username, password, expected) in cases {
        let tls = tls_to(&edge, mqtts_addr(&edge), &sni, None).await.unwrap();
        let mut client = MqttPeer::new(tls);
        let connect = if username.is_empty() {
            Packet::Connect(connect_packet("refused"))
        } else {
            connect_with("refused", &username, &password)
        };
        client.send(&connect).await;
        assert_eq!(connack(&mut client).await, expected, "SNI {sni}");
        assert_eq!(client.next().await, None, "closed after the CONNACK");
    }
    edge.stop().await;
}

#[tokio::test]
async fn alpn_mqtt_on_the_public_listener_only_when_enabled() {
    for enabled in [false, true] {
        let edge = TestEdge::start_with(|config| {
            config.public.mqtt_on_public_listener = enabled;
        })
        .await;
        let _printer = scripted_printer(&edge);
        let tls = tls_to(&edge, edge.addr, &edge.host(), Some(b"mqtt")).await;
        match (enabled, tls) {
            (false, Err(_)) => {}
            (false, Ok(_)) => panic!("ALPN mqtt accepted while off"),
            (true, Ok(tls)) => {
                let mut client = MqttPeer::new(tls);
                client
                    .send(&connect_with("alpn", "bblp", &edge.key.0))
                    .await;
                assert_eq!(connack(&mut client).await, ConnectReturnCode::Accepted);
            }
            (true, Err(error)) => panic!("ALPN mqtt refused while on: {error}"),
        }
        // WebSocket clients are served as before.
        let _web = Client::connect(&edge, &edge.bearer(), connect_packet("web")).await;
        edge.stop().await;
    }
}

#[tokio::test]
async fn the_plain_development_listener_takes_the_device_from_the_user_name() {
    let edge = mqtts_edge().await;
    let _printer = scripted_printer(&edge);
    let addr = edge.edge.as_ref().unwrap().mqtt_plain_addr.unwrap();
    let mut client = MqttPeer::new(TcpStream::connect(addr).await.unwrap());
    client
        .send(&connect_with("dev", &edge.device, &edge.key.0))
        .await;
    assert_eq!(connack(&mut client).await, ConnectReturnCode::Accepted);
    edge.stop().await;
}

/// `mosquitto_sub` over mqtts to an address (no SNI): a device-bound key
/// works; a tenant-wide key hears "identifier rejected".
#[tokio::test]
async fn mosquitto_sub_without_sni_needs_a_device_bound_key() {
    let edge = mqtts_edge().await;
    let mut printer = scripted_printer(&edge);
    let ca = edge.pki.dir.join("mqtts-ca.pem");
    std::fs::write(&ca, edge.pki.ca_pem()).unwrap();
    let port = mqtts_addr(&edge).port().to_string();
    let mosquitto_sub_as = |version: &'static str, password: &str| {
        tokio::process::Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version])
            .arg("--cafile")
            .arg(&ca)
            // The certificate names *.relay.test, not the address.
            .arg("--insecure")
            .args(["-u", "bblp", "-P", password])
            .args(["-t", "device/X1/report", "-C", "1", "-W", "20", "-i", "sub"])
            .kill_on_drop(true)
            .output()
    };
    let mosquitto_sub = |password: &str| mosquitto_sub_as("mqttv311", password);
    let refused = mosquitto_sub(&edge.key.0).await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(stderr.contains("identifier rejected"), "{stderr}");
    // MQTT 5: 0x85, Client Identifier not valid.
    let refused = mosquitto_sub_as("mqttv5", &edge.key.0).await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(stderr.contains("client identifier not valid"), "{stderr}");

    let key = device_bound_key(&edge).await;
    let subscriber = tokio::spawn(mosquitto_sub(&key));
    grant_the_subscribe(&mut printer).await;
    printer
        .send(&Packet::Publish(mqtt::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "device/X1/report".into(),
            packet_id: None,
            payload: Bytes::from_static(b"{\"print\":{}}"),
        }))
        .await;
    let output = subscriber.await.unwrap().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "{\"print\":{}}"
    );
    edge.stop().await;
}

/// The adversarial basics over mqtts: a TLS handshake that never comes and
/// a CONNECT that never comes are timed out; a packet over the limit ends
/// the session; guessing keys from one address is cut off.
#[tokio::test]
async fn mqtts_times_out_the_silent_refuses_the_oversized_and_limits_guessing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let edge = TestEdge::start_with(|config| {
        config.public.mqtts_listen = Some("127.0.0.1:0".parse().unwrap());
        config.auth.failures_per_ip_per_minute = 3;
    })
    .await;
    let _printer = scripted_printer(&edge);
    let patience = Duration::from_secs(10);

    // No TLS handshake: closed after tls_handshake_timeout (1 s here).
    let mut silent = TcpStream::connect(mqtts_addr(&edge)).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(patience, silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

    // A handshake, then no CONNECT: closed after connect_timeout (1 s).
    let mut quiet = tls_to(&edge, mqtts_addr(&edge), &edge.host(), None)
        .await
        .unwrap();
    let read = tokio::time::timeout(patience, quiet.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

    // A PUBLISH over max_packet_size (64 KiB) after CONNACK ends the session.
    let tls = tls_to(&edge, mqtts_addr(&edge), &edge.host(), None)
        .await
        .unwrap();
    let mut client = MqttPeer::new(tls);
    client.send(&connect_with("big", "bblp", &edge.key.0)).await;
    assert_eq!(connack(&mut client).await, ConnectReturnCode::Accepted);
    let header = [0x30u8, 0x80, 0x80, 0x10]; // PUBLISH, remaining length 256 KiB
    client.io.write_all(&header).await.unwrap();
    client.io.write_all(&[0u8; 1024]).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(patience, client.io.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the oversized packet did not end the session");

    // Guessing: after 3 failures from this address, CONNACK 5 without a
    // look at the store.
    let mut codes = Vec::new();
    for attempt in 0..5 {
        let tls = tls_to(&edge, mqtts_addr(&edge), &edge.host(), None)
            .await
            .unwrap();
        let mut guesser = MqttPeer::new(tls);
        // The key id as user name and a wrong, well-formed secret (a new
        // one each time): only the store could tell, so each is a guess.
        let secret: String = "abcdefghijklmnopqrstuvwxyz"
            .chars()
            .cycle()
            .skip(attempt)
            .take(26)
            .collect();
        guesser
            .send(&connect_with("guess", &edge.key.1, &secret))
            .await;
        codes.push(connack(&mut guesser).await);
    }
    assert_eq!(
        codes,
        [
            ConnectReturnCode::BadUserNameOrPassword,
            ConnectReturnCode::BadUserNameOrPassword,
            ConnectReturnCode::BadUserNameOrPassword,
            ConnectReturnCode::NotAuthorized,
            ConnectReturnCode::NotAuthorized,
        ]
    );
    edge.stop().await;
}
