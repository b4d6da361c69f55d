//! The simulator behaves like a printer: credentials, reports, request
//! answers, the client limit in its three modes, retained messages, faults,
//! and TLS with a certificate named by the serial alone.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use relay_printer_sim::{OverLimit, Profile, RunningSimulator, SimulatorConfig};
use relay_proto::mqtt::{
    self, Connect, ConnectReturnCode, Packet, PacketId, ProtocolLevel, Publish, QoS, Subscribe,
};
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const PATIENCE: Duration = Duration::from_secs(10);
const SERIAL: &str = "01P00A123456789";
const CODE: &str = "ab12cd34";

struct Peer<T> {
    io: T,
    buffer: BytesMut,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Peer<T> {
    async fn send(&mut self, packet: Packet) {
        let mut bytes = BytesMut::new();
        mqtt::encode(&packet, &mut bytes).unwrap();
        self.io.write_all(&bytes).await.unwrap();
    }

    async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(packet) = mqtt::decode(&mut self.buffer, 1 << 20).unwrap() {
                    return Some(packet);
                }
                match self.io.read_buf(&mut self.buffer).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("the simulator answered in time")
    }

    async fn connect(io: T, password: &str) -> (Peer<T>, ConnectReturnCode) {
        let mut peer = Peer {
            io,
            buffer: BytesMut::new(),
        };
        peer.send(Packet::Connect(Connect {
            protocol: ProtocolLevel::V3_1_1,
            bridge_mode: false,
            clean_session: true,
            keep_alive: 60,
            client_id: "test".into(),
            will: None,
            username: Some("bblp".into()),
            password: Some(Bytes::from(password.to_owned()).into()),
        }))
        .await;
        let Some(Packet::ConnAck(ack)) = peer.next().await else {
            panic!("no CONNACK");
        };
        (peer, ack.code)
    }

    async fn subscribe(&mut self, filter: &str) {
        self.send(Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![(filter.into(), QoS::AtMostOnce)],
        }))
        .await;
        assert!(matches!(self.next().await, Some(Packet::SubAck(_))));
    }
}

fn plain_config() -> SimulatorConfig {
    let mut config = SimulatorConfig::new(SERIAL, CODE);
    config.tls = false;
    config.report_interval = Duration::from_millis(20);
    config
}

async fn plain_peer(
    simulator: &RunningSimulator,
    password: &str,
) -> (Peer<TcpStream>, ConnectReturnCode) {
    Peer::connect(TcpStream::connect(simulator.addr).await.unwrap(), password).await
}

#[tokio::test]
async fn reports_flow_and_requests_are_answered() {
    let simulator = RunningSimulator::start(plain_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (_, code) = plain_peer(&simulator, "wrong").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (mut peer, code) = plain_peer(&simulator, CODE).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let report = format!("device/{SERIAL}/report");
    peer.subscribe(&report).await;
    let Some(Packet::Publish(delta)) = peer.next().await else {
        panic!("no report");
    };
    assert_eq!(delta.topic, report);
    assert!(delta.payload.len() < 200);

    peer.send(Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: format!("device/{SERIAL}/request"),
        packet_id: Some(PacketId::new(5).unwrap()),
        payload: Bytes::from_static(br#"{"system":{"sequence_id":"77","command":"ledctrl","led_node":"chamber_light","led_mode":"on"}}"#),
    }))
    .await;
    let mut acked = false;
    let mut answered = false;
    while !(acked && answered) {
        match peer.next().await {
            Some(Packet::PubAck(id)) => acked = id.get() == 5,
            Some(Packet::Publish(publish)) => {
                let text = String::from_utf8_lossy(&publish.payload).into_owned();
                if text.contains("\"sequence_id\":\"77\"") {
                    assert!(text.contains("\"result\":\"success\""), "{text}");
                    answered = true;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(simulator.observations().subscribe_log(), vec![vec![report]]);
}

#[tokio::test]
async fn the_client_limit_holds_in_every_mode() {
    for mode in [
        OverLimit::Refuse,
        OverLimit::AcceptSilently,
        OverLimit::DropOldest,
    ] {
        let mut config = plain_config();
        config.client_limit = 2;
        config.over_limit = mode;
        let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let (mut first, _) = plain_peer(&simulator, CODE).await;
        let (_second, _) = plain_peer(&simulator, CODE).await;
        let (mut third, code) = plain_peer(&simulator, CODE).await;
        let observations = simulator.observations();
        assert_eq!(observations.over_limit.load(Ordering::Relaxed), 1);
        match mode {
            OverLimit::Refuse => assert_eq!(code, ConnectReturnCode::ServerUnavailable),
            OverLimit::AcceptSilently => {
                assert_eq!(code, ConnectReturnCode::Accepted);
                third.send(Packet::PingReq).await;
                let silent = tokio::time::timeout(Duration::from_millis(300), third.next()).await;
                assert!(silent.is_err(), "a silent client got an answer");
            }
            OverLimit::DropOldest => {
                assert_eq!(code, ConnectReturnCode::Accepted);
                assert_eq!(
                    first.next().await,
                    None,
                    "the oldest client was not dropped"
                );
            }
        }
        assert!(observations.max_concurrent.load(Ordering::Relaxed) <= 2);
    }
}

#[tokio::test]
async fn retained_messages_and_faults() {
    let mut config = plain_config();
    config.profile = Profile::X1;
    let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (mut writer, _) = plain_peer(&simulator, CODE).await;
    writer
        .send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: format!("device/{SERIAL}/state"),
            packet_id: None,
            payload: Bytes::from_static(b"on"),
        }))
        .await;
    writer.send(Packet::PingReq).await;
    assert_eq!(writer.next().await, Some(Packet::PingResp));
    let (mut reader, _) = plain_peer(&simulator, CODE).await;
    reader
        .send(Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![(format!("device/{SERIAL}/state"), QoS::AtMostOnce)],
        }))
        .await;
    assert!(matches!(reader.next().await, Some(Packet::SubAck(_))));
    let Some(Packet::Publish(retained)) = reader.next().await else {
        panic!("no retained message");
    };
    assert!(retained.retain);
    assert_eq!(retained.payload, Bytes::from_static(b"on"));

    // X1 sends the full report every time; a stall stops it; drop ends all.
    reader.subscribe(&format!("device/{SERIAL}/report")).await;
    let Some(Packet::Publish(full)) = reader.next().await else {
        panic!("no report");
    };
    assert!(full.payload.len() > 4_000);
    simulator.drop_all_clients();
    while reader.next().await.is_some() {}
    assert_eq!(writer.next().await, None);
}

/// Like a real Bambu printer, the simulator drops a client that subscribes
/// to another serial's topics, or to a filter that could match them.
#[tokio::test]
async fn a_subscribe_to_another_serials_topics_drops_the_client() {
    let simulator = RunningSimulator::start(plain_config(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for filter in ["device/01P00A000000000/report", "device/+/report", "#"] {
        let (mut peer, _) = plain_peer(&simulator, CODE).await;
        peer.send(Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN,
            filters: vec![(filter.into(), QoS::AtMostOnce)],
        }))
        .await;
        assert_eq!(peer.next().await, None, "{filter}");
    }
    assert_eq!(
        simulator
            .observations()
            .foreign_subscribes
            .load(Ordering::SeqCst),
        3
    );
    // Its own topics are fine.
    let (mut peer, _) = plain_peer(&simulator, CODE).await;
    peer.send(Packet::Subscribe(Subscribe {
        packet_id: PacketId::MIN,
        filters: vec![(format!("device/{SERIAL}/#"), QoS::AtMostOnce)],
    }))
    .await;
    assert!(matches!(peer.next().await, Some(Packet::SubAck(_))));
}

/// A `pushall` sooner than the printer likes is answered late (counted),
/// as printers handle it poorly.
#[tokio::test]
async fn a_pushall_too_soon_is_answered_with_a_penalty() {
    let mut config = plain_config();
    config.pushall_min_interval = Duration::from_secs(60);
    config.pushall_penalty = Duration::from_millis(100);
    let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (mut peer, _) = plain_peer(&simulator, CODE).await;
    peer.subscribe(&format!("device/{SERIAL}/report")).await;
    for _ in 0..2 {
        peer.send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: format!("device/{SERIAL}/request"),
            packet_id: None,
            payload: Bytes::from_static(br#"{"pushing":{"sequence_id":"1","command":"pushall"}}"#),
        }))
        .await;
    }
    // Both are answered, the second after its penalty.
    let mut full = 0;
    while full < 2 {
        match peer.next().await {
            Some(Packet::Publish(report)) if report.payload.len() > 4_000 => full += 1,
            Some(_) => {}
            None => panic!("the simulator closed after {full} full reports"),
        }
    }
    let observations = simulator.observations();
    assert_eq!(observations.pushalls.load(Ordering::SeqCst), 2);
    assert_eq!(observations.penalized_pushalls.load(Ordering::SeqCst), 1);
}

/// The TLS certificate is named only by the serial (common name, no SAN),
/// as on real printers; a client must check the chain and the CN itself.
#[tokio::test]
async fn tls_presents_a_certificate_named_by_the_serial() {
    let mut config = plain_config();
    config.tls = true;
    let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for certificate in
        rustls::pki_types::CertificateDer::pem_slice_iter(simulator.ca_pem.as_bytes())
    {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(simulator.addr).await.unwrap();
    // Standard hostname verification fails: there is no SAN to match.
    let name = rustls::pki_types::ServerName::try_from(SERIAL).unwrap();
    let error = connector.connect(name, tcp).await.unwrap_err();
    assert!(
        error.to_string().contains("not valid for name")
            || error.to_string().contains("NotValidForName"),
        "{error}"
    );
}
