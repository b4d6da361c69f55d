//! Several edge instances as real processes (`relay-edge`) on one Postgres,
//! with peer links between them over real QUIC on loopback, one agent and
//! the printer simulator. Apps are paho-mqtt (Python, a library nobody here
//! wrote) and the test kit's WebSocket client.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use relay_proto::mqtt::{Packet, PacketId, Publish, QoS};
use relay_testkit::processes::{EdgeProcess, metric};
use relay_testkit::world::*;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_util::sync::CancellationToken;

const EDGE: &str = env!("CARGO_BIN_EXE_relay-edge");

/// The grace the instances give a hub to find a new upstream.
const GRACE: &str = "upstream_grace_seconds = 30";

/// A database, a CA, the simulator, and an agent credential.
struct Cluster {
    setup: TestEdge,
    simulator: RunningSimulator,
    credential: String,
}

impl Cluster {
    async fn new() -> Cluster {
        let setup = TestEdge::prepare_with(|_| {}).await;
        let simulator = start_simulator().await;
        let (_, credential) = setup
            .database
            .store
            .issue_agent_credential(&setup.device)
            .await
            .unwrap();
        Cluster {
            setup,
            simulator,
            credential: credential.reveal(),
        }
    }

    async fn instance(&self, id: &str) -> EdgeProcess {
        EdgeProcess::start(Path::new(EDGE), &self.setup, id, GRACE).await
    }

    /// An instance on tokio's multi-thread runtime (`[runtime]
    /// worker_threads = 2`) instead of the default one thread.
    async fn instance_on_two_threads(&self, id: &str) -> EdgeProcess {
        let extra = format!("{GRACE}\n\n[runtime]\nworker_threads = 2");
        EdgeProcess::start(Path::new(EDGE), &self.setup, id, &extra).await
    }

    /// The agent, dialling `tunnels` in order.
    fn agent(&self, tunnels: &[std::net::SocketAddr]) -> CancellationToken {
        let mut config = agent_config(
            &self.setup,
            tunnels[0],
            &self.simulator,
            ACCESS_CODE,
            &self.credential,
        );
        // The shipped keep-alive: failover must not depend on a short one.
        config.edge.addresses = tunnels[1..].iter().map(|t| t.to_string()).collect();
        start_agent(config)
    }

    /// Waits until the registry says `instance` holds the device: what it
    /// says now, then its claim announcements.
    async fn wait_owner(&self, instance: &str) {
        let store = &self.setup.database.store;
        let device = &self.setup.device;
        let mut claims = relay_store::ClaimListener::start(store)
            .await
            .unwrap()
            .expect("Postgres announces claims");
        let holds = |claim: &relay_store::Claim| {
            claim.instance_id == instance && claim.is_live(store.now())
        };
        if let Ok(Some(claim)) = store.device_claim(device).await
            && holds(&claim)
        {
            return;
        }
        tokio::time::timeout(PATIENCE, async {
            loop {
                let claimed = claims.next().await.unwrap();
                if claimed.device_id == *device && claimed.instance_id == instance {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{instance} never held the device"));
    }

    /// The test kit's client, on `instance`.
    async fn client(&mut self, instance: &EdgeProcess, name: &str) -> Client {
        self.setup.addr = instance.public;
        let mut client =
            Client::connect(&self.setup, &self.setup.bearer(), connect_packet(name)).await;
        client.send(&subscribe_report(1)).await;
        loop {
            match client.next().await {
                Some(Packet::SubAck(_)) => return client,
                Some(_) => {}
                None => panic!("{name} closed before SUBACK: {:?}", client.closed_with),
            }
        }
    }
}

/// A survivor's client keeps its connection and receives again within
/// 10 s of `since`: a report the printer made a second after it (20
/// reports later) came the new way.
async fn resumes_within_ten_seconds(
    name: &str,
    client: &mut Client,
    last_before: u64,
    since: Instant,
    what: &str,
) {
    loop {
        let publish = next_publish(client).await;
        if is_status(&publish) && sequence_of(&publish) > last_before + 20 {
            break;
        }
    }
    let resumed = since.elapsed();
    assert!(
        client.closed_with.is_none(),
        "{name}: {:?}",
        client.closed_with
    );
    assert!(
        resumed < Duration::from_secs(10),
        "{name} resumed after {resumed:?}"
    );
    eprintln!("{name} received again {resumed:?} after the owner was {what}");
}

/// The `sequence_id` of a simulated report.
fn sequence_of(publish: &Publish) -> u64 {
    let text = String::from_utf8_lossy(&publish.payload);
    text.split("\"sequence_id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}

/// Whether a PUBLISH is one of the printer's periodic status reports
/// (answers to requests echo the request's `sequence_id` instead).
fn is_status(publish: &Publish) -> bool {
    publish.topic == report_topic()
        && String::from_utf8_lossy(&publish.payload).contains("push_status")
}

/// The next `count` status reports' sequence ids, in the order they came.
async fn sequences(client: &mut Client, count: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let publish = next_publish(client).await;
        if is_status(&publish) {
            seen.push(sequence_of(&publish));
        }
    }
    seen
}

fn strictly_increasing(sequence: &[u64]) -> bool {
    sequence.windows(2).all(|pair| pair[0] < pair[1])
}

/// A QoS 1 PUBLISH to the printer's request topic; true once PUBACKed.
async fn publish_acknowledged(client: &mut Client, id: u16) -> bool {
    client
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("device/{SERIAL}/request"),
            packet_id: PacketId::new(id),
            payload: bytes::Bytes::from_static(
                br#"{"info":{"sequence_id":"7","command":"get_version"}}"#,
            ),
        }))
        .await;
    loop {
        match client.next().await {
            Some(Packet::PubAck(acked)) if acked.get() == id => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// paho-mqtt (Python) on `instance`: subscribes to the report, publishes
/// one QoS 1 request, and prints `puback` and `report <sequence>` lines.
struct Paho {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Paho {
    async fn start(python: &Path, cluster: &Cluster, instance: &EdgeProcess, name: &str) -> Paho {
        let ca = cluster.setup.pki.dir.join("paho-ca.pem");
        std::fs::write(&ca, cluster.setup.pki.ca_pem()).unwrap();
        let script = format!(
            r#"
import json, re, sys
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="{name}", transport="websockets")
client.ws_set_options(path="/d/{device}/mqtt", headers={{"Authorization": "{bearer}"}})
client.tls_set(ca_certs="{ca}")
client.tls_insecure_set(True)  # 127.0.0.1 is not on the *.{domain} certificate; the chain is checked
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("device/{serial}/report", qos=1)
    client.publish("device/{serial}/request", '{{"info":{{"sequence_id":"1","command":"get_version"}}}}', qos=1)
def on_publish(client, userdata, mid, reason, properties):
    print("puback", flush=True)
def on_message(client, userdata, message):
    found = re.search(rb'"sequence_id":"(\d+)"', message.payload)
    print("report", found.group(1).decode() if found else "0", flush=True)
client.on_connect = on_connect
client.on_publish = on_publish
client.on_message = on_message
client.connect("127.0.0.1", {port})
client.loop_forever()
"#,
            device = cluster.setup.device,
            bearer = cluster.setup.bearer(),
            ca = ca.display(),
            domain = BASE_DOMAIN,
            serial = SERIAL,
            port = instance.public.port(),
        );
        let mut child = Command::new(python)
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Paho { child, lines }
    }

    /// Waits for a line starting with `prefix`.
    async fn said(&mut self, prefix: &str) -> String {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.lines.next_line().await.unwrap() {
                    Some(line) if line.starts_with(prefix) => return line,
                    Some(_) => {}
                    None => panic!("paho ended before {prefix:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("paho never said {prefix:?}"))
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn python() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/client-tools");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "scripts/client-tools failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim()).join("venv/bin/python")
}

#[tokio::test]
async fn three_instances_serve_one_printer_through_one_connection() {
    let python = python();
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let b = cluster.instance("edge-b").await;
    // One instance on several threads: both runtimes serve, side by side.
    let c = cluster.instance_on_two_threads("edge-c").await;
    let threads = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    assert!(
        threads(c.pid()) > threads(a.pid()),
        "edge-c has {} threads, edge-a {}",
        threads(c.pid()),
        threads(a.pid())
    );
    let agent = cluster.agent(&[b.tunnel]);
    cluster.wait_owner("edge-b").await;

    // paho on every instance receives and gets its QoS 1 publish
    // acknowledged by the printer.
    let mut pahos = Vec::new();
    for (instance, name) in [(&a, "paho-a"), (&b, "paho-b"), (&c, "paho-c")] {
        let mut paho = Paho::start(&python, &cluster, instance, name).await;
        paho.said("puback").await;
        paho.said("report").await;
        pahos.push(paho);
    }
    // One order: every client sees the printer's reports in its order.
    let mut clients = Vec::new();
    for (instance, name) in [(&a, "kit-a"), (&b, "kit-b"), (&c, "kit-c")] {
        clients.push(cluster.client(instance, name).await);
    }
    for (index, client) in clients.iter_mut().enumerate() {
        // The first may be the hub's merged state; live reports follow.
        let seen = sequences(client, 11).await;
        assert!(strictly_increasing(&seen[1..]), "client {index}: {seen:?}");
        assert!(publish_acknowledged(client, 40 + index as u16).await);
    }
    // The owner's status shows the same figures on every instance: the
    // agent, its traffic, and the six apps of all three.
    let statuses = [
        device_status(&cluster, &a).await,
        device_status(&cluster, &b).await,
        device_status(&cluster, &c).await,
    ];
    let apps_of = |status: &serde_json::Value| {
        let mut apps: Vec<(String, String, String)> = status["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|app| {
                (
                    app["client_id"].as_str().unwrap().to_owned(),
                    app["instance"].as_str().unwrap().to_owned(),
                    app["transport"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        apps.sort();
        apps
    };
    let expected: Vec<(String, String, String)> = [
        ("kit-a", "edge-a"),
        ("kit-b", "edge-b"),
        ("kit-c", "edge-c"),
        ("paho-a", "edge-a"),
        ("paho-b", "edge-b"),
        ("paho-c", "edge-c"),
    ]
    .iter()
    .map(|(client, instance)| ((*client).into(), (*instance).into(), "wss".into()))
    .collect();
    for (status, on) in statuses.iter().zip(["edge-a", "edge-b", "edge-c"]) {
        let status = &status["status"];
        assert_eq!(status["online"], true, "on {on}: {status}");
        assert_eq!(status["instance"], "edge-b", "on {on}: {status}");
        assert_eq!(status["agent"]["instance"], "edge-b", "on {on}: {status}");
        assert_eq!(status["agent"]["transport"], "quic", "on {on}: {status}");
        assert!(
            status["agent"]["version"]
                .as_str()
                .is_some_and(|version| !version.is_empty()),
            "on {on}: {status}"
        );
        assert_eq!(status["apps_connected"], 6, "on {on}: {status}");
        assert_eq!(apps_of(status), expected, "on {on}");
        assert_eq!(status["instances_unanswered"], serde_json::json!([]));
        assert!(
            status["traffic"]["from_printer_last_minute"]
                .as_u64()
                .unwrap()
                > 0,
            "on {on}: {status}"
        );
        assert!(
            status["traffic"]["to_printer_last_minute"]
                .as_u64()
                .unwrap()
                >= 6,
            "six QoS 1 publishes went to the printer; on {on}: {status}"
        );
    }
    // The printer sees one connection and one SUBSCRIBE for the report.
    let observations = cluster.simulator.observations();
    assert_eq!(observations.connections.load(Ordering::Relaxed), 1);
    let report_subscribes = observations
        .subscribe_log()
        .iter()
        .flatten()
        .filter(|filter| **filter == report_topic())
        .count();
    assert_eq!(report_subscribes, 1, "{:?}", observations.subscribe_log());
    // edge-b serves the other two instances' hubs, one peer link each.
    assert_eq!(
        metric(&b.metrics().await, "relay_edge_peer_links_served"),
        2.0
    );
    for paho in pahos {
        paho.stop().await;
    }
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

/// The tenant API's view of the cluster's device, asked of `instance`
/// with curl (a client nobody here wrote).
async fn device_status(cluster: &Cluster, instance: &EdgeProcess) -> serde_json::Value {
    let store = &cluster.setup.database.store;
    let (_, token) = store
        .create_admin_token(&cluster.setup.tenant, "status")
        .await
        .unwrap();
    let ca = write(
        &cluster.setup.pki.dir,
        "ca.pem",
        &cluster.setup.pki.ca_pem(),
    );
    let port = instance.public.port();
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "20", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("{BASE_DOMAIN}:{port}:127.0.0.1")])
        .args(["-H", &format!("Authorization: Bearer {}", token.reveal())])
        .arg(format!(
            "https://{BASE_DOMAIN}:{port}/api/v1/devices/{}",
            cluster.setup.device
        ))
        .output()
        .await
        .expect("curl runs");
    assert!(
        output.status.success(),
        "curl: {}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Peer-link bytes from the owner over printer bytes into it, while
/// `window` reports go by on `client`.
async fn peer_bytes_per_printer_byte(
    owner: &EdgeProcess,
    client: &mut Client,
    window: usize,
) -> f64 {
    let before = owner.metrics().await;
    sequences(client, window).await;
    let after = owner.metrics().await;
    let peer = metric(&after, "relay_edge_peer_bytes_total{direction=\"out\"}")
        - metric(&before, "relay_edge_peer_bytes_total{direction=\"out\"}");
    let printer = metric(&after, "relay_edge_printer_bytes_total{direction=\"in\"}")
        - metric(&before, "relay_edge_printer_bytes_total{direction=\"in\"}");
    peer / printer
}

#[tokio::test]
async fn a_printer_message_crosses_the_peer_link_once_whatever_the_clients() {
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let b = cluster.instance("edge-b").await;
    let agent = cluster.agent(&[b.tunnel]);
    cluster.wait_owner("edge-b").await;
    let mut first = cluster.client(&a, "first").await;
    sequences(&mut first, 3).await;
    let one = peer_bytes_per_printer_byte(&b, &mut first, 40).await;
    let mut others = Vec::new();
    for index in 0..99 {
        others.push(cluster.client(&a, &format!("more-{index}")).await);
    }
    sequences(&mut first, 3).await;
    let hundred = peer_bytes_per_printer_byte(&b, &mut first, 40).await;
    eprintln!(
        "peer bytes per printer byte: {one:.3} with 1 client on edge-a, {hundred:.3} with 100"
    );
    assert!(
        one > 0.5 && one < 1.5 && hundred < one * 1.2,
        "peer bytes per printer byte: {one:.3} with 1 client, {hundred:.3} with 100"
    );
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

#[tokio::test]
async fn killing_the_owner_moves_the_agent_and_the_others_resume() {
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let mut b = cluster.instance("edge-b").await;
    let c = cluster.instance("edge-c").await;
    let agent = cluster.agent(&[b.tunnel, c.tunnel]);
    cluster.wait_owner("edge-b").await;
    let mut on_a = cluster.client(&a, "on-a").await;
    let mut on_c = cluster.client(&c, "on-c").await;
    let mut on_b = cluster.client(&b, "on-b").await;
    sequences(&mut on_a, 2).await;
    sequences(&mut on_c, 2).await;
    sequences(&mut on_b, 2).await;

    let last_before = *sequences(&mut on_a, 1).await.last().unwrap();
    b.kill().await;
    let killed = Instant::now();
    // The survivors' clients keep their connections and receive again:
    // a report the printer made a second after the kill came the new way.
    for (name, client) in [("on-a", &mut on_a), ("on-c", &mut on_c)] {
        resumes_within_ten_seconds(name, client, last_before, killed, "killed").await;
    }
    cluster.wait_owner("edge-c").await;
    // The killed instance's clients come back on another instance.
    let _ = on_b.closed().await;
    let mut again = cluster.client(&a, "on-b-again").await;
    sequences(&mut again, 2).await;
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

/// The owner's network to the agent cut rather than its process killed:
/// nothing closes anywhere, the owner lives on with its lease, and the
/// agent's packets to it vanish. At the shipped settings the agent gives
/// it up and the survivors' clients receive again within 10 s.
#[tokio::test]
async fn cutting_the_owner_off_from_the_agent_moves_the_agent_within_seconds() {
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let b = cluster.instance("edge-b").await;
    let c = cluster.instance("edge-c").await;
    // The agent reaches edge-b through a gate (QUIC: a UDP gate), edge-c
    // directly.
    let gate = relay_testkit::cut::UdpGate::start(b.tunnel).await;
    gate.open();
    let mut config = agent_config(
        &cluster.setup,
        gate.addr,
        &cluster.simulator,
        ACCESS_CODE,
        &cluster.credential,
    );
    config.edge.transport = relay_agent::config::TransportChoice::Quic;
    config.edge.addresses = vec![c.tunnel.to_string()];
    let agent = start_agent(config);
    cluster.wait_owner("edge-b").await;
    let mut on_a = cluster.client(&a, "on-a").await;
    let mut on_c = cluster.client(&c, "on-c").await;
    sequences(&mut on_a, 2).await;
    sequences(&mut on_c, 2).await;

    let last_before = *sequences(&mut on_a, 1).await.last().unwrap();
    gate.close();
    let cut = Instant::now();
    for (name, client) in [("on-a", &mut on_a), ("on-c", &mut on_c)] {
        resumes_within_ten_seconds(name, client, last_before, cut, "cut off").await;
    }
    cluster.wait_owner("edge-c").await;
    drop(b);
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

#[tokio::test]
async fn draining_an_instance_moves_its_agent_and_nobody_else_notices() {
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let mut b = cluster.instance("edge-b").await;
    let c = cluster.instance("edge-c").await;
    let agent = cluster.agent(&[b.tunnel, c.tunnel]);
    cluster.wait_owner("edge-b").await;
    let mut on_a = cluster.client(&a, "on-a").await;
    let mut on_b = cluster.client(&b, "on-b").await;
    sequences(&mut on_a, 2).await;

    let status = b.terminate().await;
    assert!(status.success(), "{status:?}\n{}", b.log());
    assert_eq!(on_b.closed().await, Some((1001, "draining".into())));
    cluster.wait_owner("edge-c").await;
    // Make before break: the drained instance's tunnel served until the
    // agent was up on edge-c, whose claim then fenced it.
    let log = b.log();
    assert!(
        log.lines()
            .any(|line| line.contains("agent disconnected")
                && line.contains(r#""end":"superseded""#)),
        "{log}"
    );
    // edge-a's client never noticed: same connection, reports again.
    let before = on_a.closed_with.clone();
    sequences(&mut on_a, 5).await;
    assert_eq!(before, None);
    assert!(on_a.closed_with.is_none());
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

#[tokio::test]
async fn revoking_a_key_closes_its_session_on_every_instance() {
    let mut cluster = Cluster::new().await;
    let a = cluster.instance("edge-a").await;
    let c = cluster.instance("edge-c").await;
    let agent = cluster.agent(&[a.tunnel]);
    cluster.wait_owner("edge-a").await;
    let mut on_c = cluster.client(&c, "on-c").await;
    sequences(&mut on_c, 1).await;
    let revoked = Instant::now();
    assert!(
        cluster
            .setup
            .database
            .store
            .revoke_api_key(&cluster.setup.key.1)
            .await
            .unwrap()
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), on_c.closed())
        .await
        .expect("closed within 5 s");
    assert_eq!(closed, Some((1008, "unauthorized: revoked".into())));
    assert!(revoked.elapsed() < Duration::from_secs(5));
    agent.cancel();
    cluster.setup.database.cleanup().await;
}

/// Bad input on the peer listener: a wrong cluster secret, garbage, and a
/// client speaking another protocol are each refused, counted and logged,
/// and the listener goes on serving real peers.
#[tokio::test]
async fn the_peer_listener_refuses_what_is_not_a_peer() {
    use relay_proto::tunnel::{self, Message, PeerHello};
    let cluster = Cluster::new().await;
    let edge = cluster.instance("edge-a").await;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let peer_client = relay_edge::tls::peer_client_config().unwrap();

    // A wrong secret: HELLO_REFUSED, then the connection closes.
    let connection = endpoint
        .connect_with(peer_client.clone(), edge.peer, "relay-peer")
        .unwrap()
        .await
        .unwrap();
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let mut frame = bytes::BytesMut::new();
    tunnel::encode(
        &Message::PeerHello(PeerHello {
            version: 1,
            instance_id: "edge-mallory".into(),
            proof: [7; 32],
        }),
        &mut frame,
    )
    .unwrap();
    send.write_all(&frame).await.unwrap();
    let mut recv = relay_io::FramedReader::new(recv);
    let reply = tokio::time::timeout(PATIENCE, recv.read_message())
        .await
        .unwrap();
    assert!(
        matches!(reply, Ok(Some(Message::HelloRefused(_)))),
        "{reply:?}"
    );
    let closed = tokio::time::timeout(PATIENCE, connection.closed())
        .await
        .unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == quinn::VarInt::from_u32(tunnel::close_code::REFUSED)),
        "{closed:?}"
    );

    // Garbage instead of PEER_HELLO: closed as a protocol violation.
    let connection = endpoint
        .connect_with(peer_client.clone(), edge.peer, "relay-peer")
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0x42; 64]).await.unwrap();
    let closed = tokio::time::timeout(PATIENCE, connection.closed())
        .await
        .unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == quinn::VarInt::from_u32(tunnel::close_code::PROTOCOL_VIOLATION)),
        "{closed:?}"
    );

    // An agent (the tunnel's ALPN) dialling the peer port: no handshake.
    let mut agent_like = agent_config(
        &cluster.setup,
        edge.peer,
        &cluster.simulator,
        ACCESS_CODE,
        &cluster.credential,
    );
    agent_like.edge.keep_alive_seconds = 1;
    agent_like.edge.transport = relay_agent::config::TransportChoice::Quic;
    let printer = agent_like.validate().unwrap();
    let end = relay_agent::tunnel::run_once(
        &agent_like,
        std::sync::Arc::new(printer),
        None,
        CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(end, relay_agent::tunnel::TunnelEnd::Handshake(_)),
        "{end}"
    );

    // Still a peer listener for real peers: a client on another instance
    // reaches the device through it.
    let b = cluster.instance("edge-b").await;
    let agent = cluster.agent(&[edge.tunnel]);
    cluster.wait_owner("edge-a").await;
    let mut cluster = cluster;
    let mut on_b = cluster.client(&b, "on-b").await;
    sequences(&mut on_b, 2).await;
    // By now the listener has counted what it refused (the refused side
    // learns of a failed handshake before the listener counts it).
    let metrics = edge.metrics().await;
    for reason in ["bad_secret", "no_hello", "handshake"] {
        assert_eq!(
            metric(
                &metrics,
                &format!("relay_edge_peer_refusals_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}: {metrics}"
        );
    }
    let log = edge.log();
    assert!(log.contains("wrong cluster secret"), "{log}");
    agent.cancel();
    cluster.setup.database.cleanup().await;
}
