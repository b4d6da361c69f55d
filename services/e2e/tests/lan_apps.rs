//! LAN apps share the printer's one connection through the agent (`[lan]`
//! in `agent.toml`): the agent runs the hub over the printer connection,
//! LAN apps (paho-mqtt over TCP and over TLS on the "virtual printer",
//! `mosquitto_sub`, the test kit's own client) are sessions of it, and the
//! edge's printer link is one more. The printer, which takes one client,
//! sees one connection and one SUBSCRIBE; LAN apps keep receiving while
//! the tunnel is cut; wrong credentials and a client over the limit get
//! the CONNACK codes a broker gives.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use relay_io::FramedReader;
use relay_proto::mqtt::{self, ConnectReturnCode, Packet, PacketId, Publish, QoS, Subscribe};
use relay_testkit::client_tools::{client_tools, run_python_client};
use relay_testkit::world::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

/// A byte stream to the agent's LAN listener.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An MQTT 3.1.1 client over TCP, plain or TLS.
struct LanClient {
    reader: FramedReader<ReadHalf<Box<dyn Io>>>,
    writer: WriteHalf<Box<dyn Io>>,
}

impl LanClient {
    async fn open(address: SocketAddr, tls: bool) -> LanClient {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let io: Box<dyn Io> = if tls {
            let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnything))
            .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let name = rustls::pki_types::ServerName::try_from(SERIAL).unwrap();
            Box::new(connector.connect(name, tcp).await.unwrap())
        } else {
            Box::new(tcp)
        };
        let (read, writer) = tokio::io::split(io);
        LanClient {
            reader: FramedReader::new(read),
            writer,
        }
    }

    /// Connects with `user`/`password`; the CONNACK's code (`None`: closed
    /// without one).
    async fn connect(
        address: SocketAddr,
        tls: bool,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> (LanClient, Option<ConnectReturnCode>) {
        let mut client = LanClient::open(address, tls).await;
        let mut connect = connect_packet(client_id);
        if let Some((user, password)) = login {
            connect.username = Some(user.into());
            connect.password = Some(Bytes::copy_from_slice(password.as_bytes()).into());
        }
        client.send(&Packet::Connect(connect)).await;
        let code = match client.next().await {
            Some(Packet::ConnAck(connack)) => Some(connack.code),
            _ => None,
        };
        (client, code)
    }

    async fn send(&mut self, packet: &Packet) {
        let mut bytes = BytesMut::new();
        mqtt::encode(packet, &mut bytes).unwrap();
        self.writer.write_all(&bytes).await.unwrap();
    }

    async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(PATIENCE, self.reader.read_packet(4 << 20))
            .await
            .expect("a packet in time")
            .ok()
            .flatten()
    }

    async fn next_publish(&mut self) -> Publish {
        loop {
            match self.next().await {
                Some(Packet::Publish(publish)) => return publish,
                Some(_) => {}
                None => panic!("closed before a PUBLISH"),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            filters: vec![(filter.into(), QoS::AtMostOnce)],
        }))
        .await;
        match self.next().await {
            Some(Packet::SubAck(suback)) => assert_eq!(
                suback.return_codes,
                vec![mqtt::SubscribeReturnCode::Success(QoS::AtMostOnce)]
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

/// The LAN certificate is the agent's own, self-signed: apps connect with
/// verification off ("disable SSL verify"), as they do to a printer.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct LanWorld {
    edge: TestEdge,
    simulator: RunningSimulator,
    agent: CancellationToken,
    plain: SocketAddr,
    tls: SocketAddr,
    /// Where the agent answers a CC2's discovery, when asked to.
    cc2_discovery: Option<SocketAddr>,
    /// The printer's user and access code: the LAN login by default.
    user: &'static str,
    code: String,
}

/// An edge, a simulator as `simulator` sets it up, and an agent serving
/// the LAN (plain and TLS on loopback), connected to the edge.
async fn lan_world(simulator: SimulatorConfig, printer_section: String) -> LanWorld {
    lan_world_through(simulator, printer_section, "", async |address| address).await
}

/// [`lan_world`], with the agent dialling `through(the edge's tunnel
/// address for the test's transport)`.
async fn lan_world_through(
    simulator: SimulatorConfig,
    printer_section: String,
    lan_extra: &str,
    through: impl AsyncFnOnce(SocketAddr) -> SocketAddr,
) -> LanWorld {
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        config.tunnel.upstream_grace_seconds = 30;
    })
    .await;
    let user = simulator.username();
    let code = simulator.access_code.clone();
    let simulator = RunningSimulator::start(simulator, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let running = edge.edge.as_ref().unwrap();
    let tunnel = through(if test_transport() == "tcp" {
        running.tunnel_tcp_addr.unwrap()
    } else {
        running.tunnel_addr.unwrap()
    })
    .await;
    let dir = &edge.pki.dir;
    let ca = write(dir, "edge-ca.pem", &edge.pki.ca_pem());
    let printer_ca = write(dir, "printer-ca.pem", &simulator.ca_pem);
    let config = relay_agent::config::AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{tunnel}"
        server_name = "tunnel.{BASE_DOMAIN}"
        ca_file = "{}"
        credential = "{}"
        transport = "{transport}"

        [lan]
        listen = "127.0.0.1:0"
        tls_listen = "127.0.0.1:0"
        certificate_file = "{}"
        key_file = "{}"
        {lan_extra}

        [printer]
        host = "127.0.0.1"
        port = {}
        {}
        "#,
        ca.display(),
        credential.reveal(),
        dir.join("lan/certificate.pem").display(),
        dir.join("lan/key.pem").display(),
        simulator.addr.port(),
        printer_section.replace("{printer_ca}", &printer_ca.display().to_string()),
        transport = test_transport(),
    ))
    .unwrap();
    let printer = config.validate().unwrap();
    let agent = CancellationToken::new();
    let started = relay_agent::tunnel::start(config, printer, agent.clone()).await;
    let plain = started.lan.plain.unwrap();
    let tls = started.lan.tls.unwrap();
    let cc2_discovery = started.lan.cc2_discovery;
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .expect("the agent connected");
    LanWorld {
        edge,
        simulator,
        agent,
        plain,
        tls,
        cc2_discovery,
        user,
        code,
    }
}

fn bambu_section() -> String {
    format!(
        r#"kind = "bambu"
        serial = "{SERIAL}"
        access_code = "{ACCESS_CODE}"
        ca_file = "{{printer_ca}}""#
    )
}

/// paho-mqtt, as Home Assistant's Bambu Lab integration and Bambuddy use
/// it: user `bblp`, the access code, TLS with verification off (or plain
/// TCP), and as an MQTT 5 client on the plain port. Subscribes to the
/// report, receives one, publishes a QoS 1 request that gets its PUBACK;
/// the MQTT 5 client also publishes to another printer's topic, which gets
/// PUBACK 0x87. `sys.argv`: host, plain port, TLS port, user, password,
/// report topic, request topic.
const PAHO_LAN: &str = r#"
import json, ssl, sys, threading
import paho.mqtt.client as mqtt

host, plain, tls, user, password, report, request = sys.argv[1:8]

def run(name, port, use_tls, protocol):
    seen = {"scenario": name}
    done = threading.Event()
    mids = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-lan-" + name, protocol=protocol)
    client.username_pw_set(user, password)
    if use_tls:
        client.tls_set(cert_reqs=ssl.CERT_NONE)
        client.tls_insecure_set(True)
    def on_connect(c, userdata, flags, reason, properties):
        seen["connack"] = reason.value
        if reason.is_failure:
            done.set()
            return
        c.subscribe(report, qos=0)
    def on_message(c, userdata, message):
        if "message" in seen:
            return
        seen["message"] = message.topic
        seen["bytes"] = len(message.payload)
        info = c.publish(request, json.dumps({"info": {"sequence_id": "1", "command": "get_version"}}), qos=1)
        mids[info.mid] = "puback"
        if protocol == mqtt.MQTTv5:
            info = c.publish("device/00M00A000000000/request", "{}", qos=1)
            mids[info.mid] = "foreign_puback"
    def on_publish(c, userdata, mid, reason, properties):
        seen[mids.get(mid, "unexpected_puback")] = reason.value
        if len(mids) == sum(1 for key in mids.values() if key in seen):
            done.set()
    def on_disconnect(c, userdata, flags, reason, properties):
        seen.setdefault("disconnect", reason.value)
        done.set()
    client.on_connect, client.on_message = on_connect, on_message
    client.on_publish, client.on_disconnect = on_publish, on_disconnect
    try:
        client.connect(host, int(port))
    except Exception as error:
        seen["error"] = repr(error)
        print(json.dumps(seen), flush=True)
        return
    client.loop_start()
    seen["timed_out"] = not done.wait(60)
    client.disconnect()
    client.loop_stop()
    print(json.dumps(seen), flush=True)

threads = [
    threading.Thread(target=run, args=("tcp", plain, False, mqtt.MQTTv311)),
    threading.Thread(target=run, args=("tls", tls, True, mqtt.MQTTv311)),
    threading.Thread(target=run, args=("tcp5", plain, False, mqtt.MQTTv5)),
]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"#;

#[tokio::test]
async fn lan_and_cloud_apps_share_a_one_client_printer() {
    let tools = client_tools();
    let mut simulator = SimulatorConfig::new(SERIAL, ACCESS_CODE);
    simulator.report_interval = Duration::from_millis(100);
    simulator.client_limit = 1;
    let world = lan_world(simulator, bambu_section()).await;
    let login = Some((world.user, world.code.as_str()));

    // The LAN certificate was made at the first start, with the printer's
    // serial as its common name, as on the printer's own.
    let certificate = std::fs::read(world.edge.pki.dir.join("lan/certificate.pem")).unwrap();
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(&certificate).unwrap()
    };
    assert_eq!(
        relay_agent::printer::common_name(&der).as_deref(),
        Some(SERIAL)
    );

    // Two cloud apps through the edge.
    let mut cloud = Vec::new();
    for index in 0..2 {
        let mut client = Client::connect(
            &world.edge,
            &world.edge.bearer(),
            connect_packet(&format!("cloud-{index}")),
        )
        .await;
        client.send(&subscribe_report(1)).await;
        assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
        cloud.push(client);
    }
    // The test kit's client on the LAN, over plain TCP.
    let (mut lan, code) = LanClient::connect(world.plain, false, "kit-lan", login).await;
    assert_eq!(code, Some(ConnectReturnCode::Accepted));
    lan.subscribe(&report_topic()).await;

    // mosquitto_sub on the plain port, and paho over TCP and over TLS.
    let mosquitto = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &world.plain.port().to_string()])
        .args(["-u", world.user, "-P", &world.code])
        .args([
            "-i",
            "mosquitto-sub-lan",
            "-t",
            &report_topic(),
            "-C",
            "3",
            "-W",
            "30",
        ])
        .kill_on_drop(true)
        .output();
    let mosquitto5 = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &world.plain.port().to_string()])
        .args(["-u", world.user, "-P", &world.code, "-V", "mqttv5"])
        .args([
            "-i",
            "mosquitto-sub-lan-5",
            "-t",
            &report_topic(),
            "-C",
            "3",
            "-W",
            "30",
        ])
        .kill_on_drop(true)
        .output();
    let dir = &world.edge.pki.dir;
    let script = write(dir, "paho-lan.py", PAHO_LAN);
    let arguments = [
        "127.0.0.1".into(),
        world.plain.port().to_string(),
        world.tls.port().to_string(),
        world.user.into(),
        world.code.clone(),
        report_topic(),
        format!("device/{SERIAL}/request"),
    ];
    let paho = run_python_client(&tools, &script, &arguments, PATIENCE * 8);
    let (mosquitto, mosquitto5, (seen, context)) = tokio::join!(mosquitto, mosquitto5, paho);
    for mosquitto in [mosquitto.unwrap(), mosquitto5.unwrap()] {
        assert!(
            mosquitto.status.success(),
            "mosquitto_sub: {}",
            String::from_utf8_lossy(&mosquitto.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&mosquitto.stdout).lines().count(),
            3,
            "mosquitto_sub printed three reports"
        );
    }
    for transport in ["tcp", "tls", "tcp5"] {
        let run = &seen[transport];
        assert_eq!(run["connack"], 0, "{transport}: {context}");
        assert_eq!(run["message"], report_topic(), "{transport}: {context}");
        assert_eq!(run["puback"], 0, "{transport}: {context}");
        assert_ne!(run["timed_out"], true, "{transport}: {context}");
    }
    // Another printer's topic, from the MQTT 5 app: refused in its PUBACK.
    assert_eq!(seen["tcp5"]["foreign_puback"], 0x87, "{context}");
    for client in &mut cloud {
        assert_eq!(next_publish(client).await.topic, report_topic());
    }
    // The hub asked the printer for the full report when the first app
    // joined; it reaches the apps that were there.
    loop {
        if lan.next_publish().await.payload.len() > 4_000 {
            break;
        }
    }

    // A late LAN joiner gets the full report at once, from the hub's state.
    let joined = std::time::Instant::now();
    let (mut late, code) = LanClient::connect(world.plain, false, "kit-late", login).await;
    assert_eq!(code, Some(ConnectReturnCode::Accepted));
    late.subscribe(&report_topic()).await;
    let first = late.next_publish().await;
    let after = joined.elapsed();

    assert!(
        first.payload.len() > 4_000,
        "the first report to a late joiner is the full state ({} bytes)",
        first.payload.len()
    );
    println!("late LAN joiner: full report {after:?} after connecting");

    // One connection and one SUBSCRIBE for nine apps.
    let observations = world.simulator.observations();
    assert_eq!(observations.connections.load(Ordering::Relaxed), 1);
    assert_eq!(observations.max_concurrent.load(Ordering::Relaxed), 1);
    assert_eq!(observations.over_limit.load(Ordering::Relaxed), 0);
    assert_eq!(observations.subscribe_log(), vec![vec![report_topic()]]);
    assert!(observations.publishes.load(Ordering::Relaxed) >= 2);
    println!(
        "slots: the printer saw {} connection for 2 cloud apps and 7 LAN apps (2 of them MQTT 5)",
        observations.connections.load(Ordering::Relaxed)
    );

    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn wrong_credentials_and_the_26th_client_get_a_brokers_codes() {
    let mut simulator = SimulatorConfig::new(SERIAL, ACCESS_CODE);
    simulator.report_interval = Duration::from_millis(100);
    let world = lan_world(simulator, bambu_section()).await;
    let login = Some((world.user, world.code.as_str()));
    for tls in [false, true] {
        let address = if tls { world.tls } else { world.plain };
        let (_, code) =
            LanClient::connect(address, tls, "wrong", Some((world.user, "00000000"))).await;
        assert_eq!(code, Some(ConnectReturnCode::BadUserNameOrPassword));
        let (_, code) =
            LanClient::connect(address, tls, "wrong-user", Some(("admin", &world.code))).await;
        assert_eq!(code, Some(ConnectReturnCode::BadUserNameOrPassword));
        let (_, code) = LanClient::connect(address, tls, "anonymous", None).await;
        assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    }
    // MQTT 5 clients hear the same in MQTT 5's words.
    use relay_proto::mqtt5::ReasonCode;
    let wrong = v5_connack(world.plain, "v5-wrong", Some((world.user, "00000000"))).await;
    assert_eq!(wrong, Some(ReasonCode::BAD_USER_NAME_OR_PASSWORD));
    let anonymous = v5_connack(world.plain, "v5-anonymous", None).await;
    assert_eq!(anonymous, Some(ReasonCode::NOT_AUTHORIZED));

    // Twenty-five LAN apps at once, then the 26th: server unavailable.
    let mut apps = Vec::new();
    for index in 0..25 {
        let (app, code) =
            LanClient::connect(world.plain, false, &format!("app-{index}"), login).await;
        assert_eq!(code, Some(ConnectReturnCode::Accepted), "app {index}");
        apps.push(app);
    }
    let (_, code) = LanClient::connect(world.tls, true, "app-26", login).await;
    assert_eq!(code, Some(ConnectReturnCode::ServerUnavailable));
    let v5 = v5_connack(world.plain, "v5-26", login).await;
    assert_eq!(v5, Some(ReasonCode::QUOTA_EXCEEDED));
    // One leaves: a place is free again.
    apps.pop().unwrap().send(&Packet::Disconnect).await;
    let mut admitted = None;
    for _ in 0..100 {
        let (app, code) = LanClient::connect(world.plain, false, "app-again", login).await;
        if code == Some(ConnectReturnCode::Accepted) {
            admitted = Some(app);
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(admitted.is_some(), "a place came free");
    world.agent.cancel();
    world.edge.stop().await;
}

/// An MQTT 5 CONNECT on the plain LAN port; the CONNACK's reason code
/// (`None`: closed without one).
async fn v5_connack(
    address: SocketAddr,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> Option<relay_proto::mqtt5::ReasonCode> {
    use relay_proto::mqtt5;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut connect = V5Client::connect_packet(client_id);
    if let Some((user, password)) = login {
        connect.username = Some(user.into());
        connect.password = Some(Bytes::copy_from_slice(password.as_bytes()).into());
    }
    let mut bytes = BytesMut::new();
    mqtt5::encode(&mqtt5::Packet::Connect(connect), &mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut reader = FramedReader::new(stream);
    let packet = tokio::time::timeout(
        PATIENCE,
        reader.read_frame(|buffer| mqtt5::decode(buffer, 1 << 20)),
    )
    .await
    .expect("an answer in time");
    match packet {
        Ok(Some(mqtt5::Packet::ConnAck(connack))) => Some(connack.reason),
        _ => None,
    }
}

const CC2_SERIAL: &str = "F01CC2000000007";
const CC2_CODE: &str = "654321";

/// An app through the edge or on the LAN.
enum App {
    Cloud(Box<Client>),
    Lan(LanClient),
}

impl App {
    async fn send(&mut self, packet: &Packet) {
        match self {
            App::Cloud(client) => client.send(packet).await,
            App::Lan(client) => client.send(packet).await,
        }
    }

    async fn next_publish(&mut self) -> Publish {
        match self {
            App::Cloud(client) => next_publish(client).await,
            App::Lan(client) => client.next_publish().await,
        }
    }

    /// The next message on `elegoo/<sn>/<suffix>`.
    async fn next_on(&mut self, suffix: &str) -> serde_json::Value {
        let topic = format!("elegoo/{CC2_SERIAL}/{suffix}");
        loop {
            let publish = self.next_publish().await;
            if publish.topic == topic {
                return serde_json::from_slice(&publish.payload).unwrap();
            }
        }
    }

    /// Subscribes to its answers and registers as `client_id`, as a CC2
    /// client does on the LAN.
    async fn register(&mut self, client_id: &str) -> serde_json::Value {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).unwrap(),
            filters: vec![
                (
                    format!("elegoo/{CC2_SERIAL}/{client_id}_req/register_response"),
                    QoS::AtMostOnce,
                ),
                (
                    format!("elegoo/{CC2_SERIAL}/{client_id}/api_response"),
                    QoS::AtMostOnce,
                ),
            ],
        }))
        .await;
        self.send(&json_publish(
            &format!("elegoo/{CC2_SERIAL}/api_register"),
            serde_json::json!({ "client_id": client_id, "request_id": format!("{client_id}_req") }),
        ))
        .await;
        self.next_on(&format!("{client_id}_req/register_response"))
            .await
    }
}

fn json_publish(topic: &str, payload: serde_json::Value) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: Bytes::from(payload.to_string()),
    })
}

#[tokio::test]
async fn cc2_lan_and_cloud_apps_each_register_on_the_agents_one_registration() {
    let mut simulator = SimulatorConfig::elegoo_cc2(CC2_SERIAL, CC2_CODE);
    simulator.report_interval = Duration::from_millis(100);
    let section = format!(
        r#"kind = "elegoo_cc2"
        serial = "{CC2_SERIAL}"
        access_code = "{CC2_CODE}""#
    );
    let world = lan_world_through(
        simulator,
        section,
        r#"cc2_discovery_listen = "127.0.0.1:0""#,
        async |address| address,
    )
    .await;
    assert_eq!(world.user, "elegoo");
    // An app that finds the printer by its UDP discovery finds the agent,
    // and connects there.
    let discovery = world.cc2_discovery.expect("discovery answered");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(br#"{"id":0,"method":7000}"#, discovery)
        .await
        .unwrap();
    let mut datagram = [0u8; 1500];
    let (len, from) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut datagram))
        .await
        .expect("a discovery answer in time")
        .unwrap();
    assert_eq!(from, discovery);
    let found: serde_json::Value = serde_json::from_slice(&datagram[..len]).unwrap();
    assert_eq!(found["result"]["sn"], CC2_SERIAL, "{found}");
    assert_eq!(found["result"]["token_status"], 1, "{found}");
    let found_at = SocketAddr::new(from.ip(), world.plain.port());
    let login = Some((world.user, world.code.as_str()));
    let mut apps = Vec::new();
    for index in 0..5 {
        let (client, code) =
            LanClient::connect(found_at, false, &format!("lan-{index}"), login).await;
        assert_eq!(code, Some(ConnectReturnCode::Accepted));
        apps.push((format!("1_LAN_{index}"), App::Lan(client)));
    }
    for index in 0..2 {
        let client = Client::connect(
            &world.edge,
            &world.edge.bearer(),
            connect_packet(&format!("cloud-{index}")),
        )
        .await;
        apps.push((format!("1_CLOUD_{index}"), App::Cloud(Box::new(client))));
    }
    for (client_id, app) in &mut apps {
        let answer = app.register(client_id).await;
        assert_eq!(answer["error"], "ok", "{client_id}: {answer}");
    }
    // Each asks for the printer's attributes with its own request id and
    // gets its own answer.
    for (index, (client_id, app)) in apps.iter_mut().enumerate() {
        let id = 100 + index;
        app.send(&json_publish(
            &format!("elegoo/{CC2_SERIAL}/{client_id}/api_request"),
            serde_json::json!({ "id": id, "method": 1001 }),
        ))
        .await;
        let answer = app.next_on(&format!("{client_id}/api_response")).await;
        assert_eq!(answer["id"], id, "{client_id}: {answer}");
        assert_eq!(
            answer["result"]["attributes"]["sn"], CC2_SERIAL,
            "{client_id}: {answer}"
        );
    }
    let registered = world.simulator.cc2_registrations();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert!(registered[0].starts_with("relay-agent-"), "{registered:?}");
    let observations = world.simulator.observations();
    assert_eq!(observations.connections.load(Ordering::Relaxed), 1);
    assert_eq!(
        observations
            .cc2_unregistered_requests
            .load(Ordering::Relaxed),
        0
    );
    println!(
        "slots: the CC2 saw {} connection and {} registration for 5 LAN apps and 2 cloud apps",
        observations.connections.load(Ordering::Relaxed),
        registered.len()
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// Something between the agent and the edge that can be cut: a UDP gate
/// for QUIC, a TCP forwarder for the tunnel over TCP.
enum Cut {
    Quic(relay_testkit::cut::UdpGate),
    Tcp(relay_testkit::cut::CuttableLink),
}

impl Cut {
    async fn start(target: SocketAddr) -> Cut {
        if test_transport() == "tcp" {
            Cut::Tcp(relay_testkit::cut::CuttableLink::start(target).await)
        } else {
            let gate = relay_testkit::cut::UdpGate::start(target).await;
            gate.open();
            Cut::Quic(gate)
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Cut::Quic(gate) => gate.addr,
            Cut::Tcp(link) => link.addr,
        }
    }

    fn cut(&self) {
        match self {
            Cut::Quic(gate) => gate.close(),
            Cut::Tcp(link) => link.cut(),
        }
    }

    fn restore(&self) {
        match self {
            Cut::Quic(gate) => gate.open(),
            Cut::Tcp(link) => link.restore(),
        }
    }
}

/// The tunnel is cut for 60 s: LAN apps keep receiving the printer's
/// reports without a gap (the printer connection is the agent's, not the
/// tunnel's), and cloud apps are back once the tunnel is.
#[tokio::test]
async fn lan_apps_keep_receiving_while_the_tunnel_is_cut() {
    const CUT: Duration = Duration::from_secs(60);
    let mut simulator = SimulatorConfig::new(SERIAL, ACCESS_CODE);
    simulator.report_interval = Duration::from_millis(100);
    simulator.client_limit = 1;
    let mut cut = None;
    let world = {
        // The forwarder needs the edge's address first; the world makes
        // the edge.
        let cut = &mut cut;
        lan_world_through(simulator, bambu_section(), "", async move |target| {
            let started = Cut::start(target).await;
            let address = started.addr();
            *cut = Some(started);
            address
        })
        .await
    };
    let cut = cut.unwrap();
    let login = Some((world.user, world.code.as_str()));
    let (mut lan, code) =
        LanClient::connect(world.plain, false, "lan-through-the-cut", login).await;
    assert_eq!(code, Some(ConnectReturnCode::Accepted));
    lan.subscribe(&report_topic()).await;
    let edge = world.edge.edge.as_ref().unwrap();
    let epoch = edge.wait_online(&world.edge.device).await;
    let mut cloud =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("cloud")).await;
    cloud.send(&subscribe_report(1)).await;
    assert!(matches!(cloud.next().await, Some(Packet::SubAck(_))));
    next_publish(&mut cloud).await;
    lan.next_publish().await;
    drop(cloud);

    cut.cut();
    let started = std::time::Instant::now();
    let mut last = started;
    let mut longest = Duration::ZERO;
    let mut received = 0usize;
    while started.elapsed() < CUT {
        lan.next_publish().await;
        received += 1;
        longest = longest.max(last.elapsed());
        last = std::time::Instant::now();
    }
    println!("through a {CUT:?} cut: {received} reports on the LAN, longest gap {longest:?}");
    assert!(
        longest < Duration::from_secs(2),
        "LAN reports stopped for {longest:?} while the tunnel was cut"
    );
    cut.restore();
    // The agent dials again (its backoff grew during the cut): a cloud
    // app is served once its new tunnel is up.
    tokio::time::timeout(
        PATIENCE * 6,
        edge.wait_newer_tunnel(&world.edge.device, epoch),
    )
    .await
    .expect("the agent came back");
    let mut cloud = Client::connect(
        &world.edge,
        &world.edge.bearer(),
        connect_packet("cloud-again"),
    )
    .await;
    cloud.send(&subscribe_report(1)).await;
    assert!(matches!(cloud.next().await, Some(Packet::SubAck(_))));
    assert_eq!(next_publish(&mut cloud).await.topic, report_topic());
    lan.next_publish().await;
    let observations = world.simulator.observations();
    assert_eq!(
        observations.connections.load(Ordering::Relaxed),
        1,
        "the printer connection lived through the cut"
    );
    world.agent.cancel();
    world.edge.stop().await;
}
