//! An Elegoo Centauri Carbon 2 behind the agent (kind `elegoo_cc2`) and the
//! edge's CC2 profile: the agent logs in as `elegoo`, registers once with
//! its own client id and keeps that registration with its heartbeat and
//! through a printer reboot; every app speaks the CC2 protocol with its own
//! client id (ten paho-mqtt apps, a client library nobody here wrote),
//! while the printer sees one connection and one registration; a printer
//! already at its registration limit is reported as "too many clients".

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use relay_proto::mqtt::{Packet, PacketId, QoS, Subscribe};
use relay_testkit::world::*;
use tokio_util::sync::CancellationToken;

const CC2_SERIAL: &str = "F01CC2000000007";
const CC2_CODE: &str = "654321";

struct Cc2World {
    edge: TestEdge,
    simulator: RunningSimulator,
    agent: CancellationToken,
}

async fn cc2_world(prepare: impl FnOnce(&mut SimulatorConfig)) -> Cc2World {
    cc2_world_with(|_| {}, prepare, "").await
}

/// `agent_printer`: more lines for the agent's `[printer]` section.
async fn cc2_world_with(
    edge: impl FnOnce(&mut relay_edge::EdgeConfig),
    prepare: impl FnOnce(&mut SimulatorConfig),
    agent_printer: &str,
) -> Cc2World {
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        config.tunnel.upstream_grace_seconds = 30;
        config.public.device_in_path = true;
        edge(config);
    })
    .await;
    let mut config = SimulatorConfig::elegoo_cc2(CC2_SERIAL, CC2_CODE);
    config.report_interval = Duration::from_millis(100);
    prepare(&mut config);
    let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let tunnel = edge.edge.as_ref().unwrap().tunnel_addr.unwrap();
    let ca = write(&edge.pki.dir, "edge-ca.pem", &edge.pki.ca_pem());
    let agent = relay_agent::config::AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{tunnel}"
        server_name = "tunnel.{BASE_DOMAIN}"
        ca_file = "{}"
        credential = "{}"
        transport = "{transport}"

        [printer]
        kind = "elegoo_cc2"
        host = "127.0.0.1"
        port = {}
        serial = "{CC2_SERIAL}"
        access_code = "{CC2_CODE}"
        {agent_printer}
        "#,
        ca.display(),
        credential.reveal(),
        simulator.addr.port(),
        transport = test_transport(),
    ))
    .unwrap();
    let agent = start_agent(agent);
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .expect("the agent connected");
    Cc2World {
        edge,
        simulator,
        agent,
    }
}

async fn next_status(client: &mut Client) -> serde_json::Value {
    loop {
        let publish = next_publish(client).await;
        if publish.topic.ends_with("/api_status") {
            return serde_json::from_slice(&publish.payload).unwrap();
        }
    }
}

/// An app of ours (the testkit's client) as a CC2 client: subscribes to
/// its answers and the status, and registers as `client_id`.
async fn cc2_app(world: &Cc2World, client_id: &str) -> Client {
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet(client_id)).await;
    client
        .send(&Packet::Subscribe(Subscribe {
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
                (format!("elegoo/{CC2_SERIAL}/api_status"), QoS::AtMostOnce),
            ],
        }))
        .await;
    let answer = register(&mut client, client_id, client_id).await;
    assert_eq!(answer["error"], "ok", "{answer}");
    client
}

/// Registers `client_id` (answers on `<answer_as>_req`) and returns the
/// answer.
async fn register(client: &mut Client, client_id: &str, answer_as: &str) -> serde_json::Value {
    client
        .send(&json_publish(
            &format!("elegoo/{CC2_SERIAL}/api_register"),
            serde_json::json!({ "client_id": client_id, "request_id": format!("{answer_as}_req") }),
        ))
        .await;
    next_on(client, &format!("{answer_as}_req/register_response")).await
}

fn json_publish(topic: &str, payload: serde_json::Value) -> Packet {
    Packet::Publish(relay_proto::mqtt::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: bytes::Bytes::from(payload.to_string()),
    })
}

/// The next message on `elegoo/<sn>/<suffix>`.
async fn next_on(client: &mut Client, suffix: &str) -> serde_json::Value {
    let topic = format!("elegoo/{CC2_SERIAL}/{suffix}");
    loop {
        let publish = next_publish(client).await;
        if publish.topic == topic {
            return serde_json::from_slice(&publish.payload).unwrap();
        }
    }
}

/// Sends a request as `client_id` and returns its answer.
async fn request(
    client: &mut Client,
    client_id: &str,
    request: serde_json::Value,
) -> serde_json::Value {
    client
        .send(&json_publish(
            &format!("elegoo/{CC2_SERIAL}/{client_id}/api_request"),
            request,
        ))
        .await;
    next_on(client, &format!("{client_id}/api_response")).await
}

#[tokio::test]
async fn the_agent_holds_one_registration_and_keeps_it_through_a_reboot() {
    let world = cc2_world(|_| {}).await;
    let mut client = cc2_app(&world, "1_PC_7001").await;
    assert_eq!(next_status(&mut client).await["method"], 6000);
    let registered = world.simulator.cc2_registrations();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert!(registered[0].starts_with("relay-agent-"), "{registered:?}");
    let answer = request(
        &mut client,
        "1_PC_7001",
        serde_json::json!({ "id": 1, "method": 1001 }),
    )
    .await;
    assert_eq!(answer["result"]["attributes"]["sn"], CC2_SERIAL);

    // The printer reboots: registrations forgotten, connections dropped.
    // The agent logs in and registers again; the app never noticed, and
    // its requests are answered as before.
    world.simulator.reboot();
    let observations = world.simulator.observations();
    observations
        .wait_until(|seen| seen.cc2_registrations.load(Ordering::SeqCst) >= 2)
        .await;
    assert_eq!(world.simulator.cc2_registrations().len(), 1);
    assert_eq!(next_status(&mut client).await["method"], 6000);
    let answer = request(
        &mut client,
        "1_PC_7001",
        serde_json::json!({ "id": 2, "method": 1001 }),
    )
    .await;
    assert_eq!(answer["id"], 2);
    assert_eq!(answer["result"]["error_code"], 0);
    assert_eq!(client.closed_with, None);
    assert_eq!(
        observations
            .cc2_unregistered_requests
            .load(Ordering::SeqCst),
        0
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// The agent's heartbeat keeps its registration through an idle hour,
/// on a compressed clock: the printer forgets a registration after 1 s
/// without one (6 minutes on a real CC2), the agent sends one every 250 ms
/// (10 s), and the test waits for 40 of them (an hour at that scale).
#[tokio::test]
async fn the_heartbeat_keeps_the_registration_through_an_idle_hour() {
    let world = cc2_world_with(
        |_| {},
        |config| {
            if let Some(cc2) = &mut config.cc2 {
                cc2.heartbeat_expiry = Duration::from_secs(1);
            }
        },
        "heartbeat_interval_ms = 250",
    )
    .await;
    let mut client = cc2_app(&world, "1_PC_7002").await;
    let observations = world.simulator.observations();
    let publishes = observations.publishes.load(Ordering::SeqCst);
    // The app is idle; only the agent's heartbeats reach the printer.
    observations
        .wait_until(|seen| seen.publishes.load(Ordering::SeqCst) >= publishes + 40)
        .await;
    assert_eq!(world.simulator.cc2_registrations().len(), 1);
    let answer = request(
        &mut client,
        "1_PC_7002",
        serde_json::json!({ "id": 3, "method": 1044 }),
    )
    .await;
    assert_eq!(answer["result"]["error_code"], 0, "{answer}");
    assert_eq!(
        observations
            .cc2_unregistered_requests
            .load(Ordering::SeqCst),
        0
    );
    assert_eq!(observations.cc2_registrations.load(Ordering::SeqCst), 1);
    world.agent.cancel();
    world.edge.stop().await;
}

#[tokio::test]
async fn a_printer_at_its_registration_limit_is_too_many_clients() {
    let world = cc2_world(|config| {
        if let Some(cc2) = &mut config.cc2 {
            cc2.registration_limit = 0;
        }
    })
    .await;
    let mut socket = world
        .edge
        .open_device("/mqtt", &[("authorization", &world.edge.bearer())])
        .await;
    send_connect(&mut socket, connect_packet("app")).await;
    let refusal = refusal(&mut socket).await;
    assert_eq!(refusal.connack, Some(3), "{refusal:?}");
    world.edge.assert_closes_counted(1014, 1).await;
    assert_eq!(
        world
            .simulator
            .observations()
            .cc2_refused_registrations
            .load(Ordering::SeqCst),
        1
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// The edge keeps the shared registration safe: a registration naming the
/// agent's client id, or another app's, is answered "fail" and reaches
/// nothing; requests as another app are dropped; no app's registration
/// reaches the printer. (The agent refuses the first too, as the LAN's
/// last line: `services/agent/src/tunnel.rs`.)
#[tokio::test]
async fn an_app_cannot_take_the_agents_registration_or_another_apps() {
    use relay_proto::mqtt::SubscribeReturnCode;
    let world = cc2_world(|_| {}).await;
    let mut first = cc2_app(&world, "1_PC_7003").await;
    let mut second = cc2_app(&world, "1_PC_7004").await;
    let agent_client = world.simulator.cc2_registrations()[0].clone();
    let answer = register(&mut second, &agent_client, "1_PC_7004").await;
    assert!(
        answer["error"].as_str().unwrap().starts_with("fail"),
        "{answer}"
    );
    let answer = register(&mut second, "1_PC_7003", "1_PC_7004").await;
    assert!(
        answer["error"].as_str().unwrap().starts_with("fail"),
        "{answer}"
    );
    // The second app asks as the first: nothing reaches the printer, and
    // the first hears nothing; its own request is answered.
    second
        .send(&json_publish(
            &format!("elegoo/{CC2_SERIAL}/1_PC_7003/api_request"),
            serde_json::json!({ "id": 66, "method": 1022 }),
        ))
        .await;
    let answer = request(
        &mut first,
        "1_PC_7003",
        serde_json::json!({ "id": 67, "method": 1001 }),
    )
    .await;
    assert_eq!(answer["id"], 67, "only its own answer: {answer}");
    let observations = world.simulator.observations();
    assert_eq!(
        observations.cc2_registrations.load(Ordering::SeqCst),
        1,
        "only the agent's registration reached the printer"
    );
    assert_eq!(world.simulator.cc2_registrations(), vec![agent_client]);
    // Another printer's topics: refused.
    second
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(4).unwrap(),
            filters: vec![("elegoo/OTHER/api_status".into(), QoS::AtMostOnce)],
        }))
        .await;
    loop {
        match second.next().await {
            Some(Packet::SubAck(ack)) if ack.packet_id == PacketId::new(4).unwrap() => {
                assert_eq!(ack.return_codes, vec![SubscribeReturnCode::Failure]);
                break;
            }
            Some(_) => {}
            None => panic!("closed: {:?}", second.closed_with),
        }
    }
    world.agent.cancel();
    world.edge.stop().await;
}

fn python() -> std::path::PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/client-tools");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success(), "scripts/client-tools failed");
    std::path::PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
        .join("venv/bin/python")
}

/// Ten paho-mqtt apps over wss, each as on the LAN with its own client id:
/// subscribe, register, then PING, a 1002 and a 1001 with the same id 1 as
/// every other app. Prints one JSON line per app.
fn ten_apps_script(world: &Cc2World, ca: &std::path::Path) -> String {
    format!(
        r#"
import json, queue, ssl, sys, threading
import paho.mqtt.client as mqtt
SN = "{CC2_SERIAL}"
APPS = 10
results = queue.Queue()

def app(n):
    cid = "1_PC_%d" % (8000 + n)
    inbox = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets")
    client.ws_set_options(path="/d/{device}/mqtt", headers={{"Authorization": "{bearer}"}})
    client.tls_set(ca_certs="{ca}")
    client.tls_insecure_set(True)  # 127.0.0.1 is not on the *.{domain} certificate; the chain is checked
    def on_connect(client, userdata, flags, reason, properties):
        client.subscribe([
            ("elegoo/%s/%s_req/register_response" % (SN, cid), 0),
            ("elegoo/%s/%s/api_response" % (SN, cid), 0),
            ("elegoo/%s/api_status" % SN, 0),
        ])
    def on_subscribe(client, userdata, mid, reasons, properties):
        client.publish("elegoo/%s/api_register" % SN, json.dumps({{"client_id": cid, "request_id": cid + "_req"}}))
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda c, u, m: inbox.put((m.topic, json.loads(m.payload)))
    client.connect("127.0.0.1", {port})
    client.loop_start()
    seen = {{"cid": cid, "register": None, "pong": False, "replies": {{}}, "first_status": None}}
    try:
        while not (seen["register"] and seen["pong"] and len(seen["replies"]) == 2 and seen["first_status"]):
            topic, message = inbox.get(timeout=60)
            if topic.endswith("register_response"):
                seen["register"] = message
                request = "elegoo/%s/%s/api_request" % (SN, cid)
                client.publish(request, json.dumps({{"type": "PING"}}))
                client.publish(request, json.dumps({{"id": 1, "method": 1002, "params": {{}}}}))
                client.publish(request, json.dumps({{"id": 1, "method": 1001, "params": {{}}}}))
            elif topic.endswith("/api_response"):
                if message.get("type") == "PONG":
                    seen["pong"] = True
                else:
                    seen["replies"][str(message["method"])] = message
            elif topic.endswith("/api_status") and seen["first_status"] is None:
                seen["first_status"] = message
    except queue.Empty:
        seen["timed_out"] = True
    results.put(seen)
    client.disconnect()
    client.loop_stop()

threads = [threading.Thread(target=app, args=(n,)) for n in range(APPS)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
while not results.empty():
    print(json.dumps(results.get()), flush=True)
"#,
        device = world.edge.device,
        bearer = world.edge.bearer(),
        ca = ca.display(),
        domain = BASE_DOMAIN,
        port = world.edge.addr.port(),
    )
}

/// Ten apps register, ask with colliding ids, PING and receive status:
/// the printer sees one connection and one registration, never says "too
/// many clients", and its cooldown drops no reply.
#[tokio::test]
async fn ten_paho_apps_share_the_agents_one_registration() {
    let world = cc2_world(|_| {}).await;
    let dir = &world.edge.pki.dir;
    let ca = write(dir, "edge-ca-for-paho.pem", &world.edge.pki.ca_pem());
    let script = write(dir, "cc2-ten-apps.py", &ten_apps_script(&world, &ca));
    let output = tokio::time::timeout(
        PATIENCE * 4,
        tokio::process::Command::new(python())
            .arg(&script)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the apps finished in time")
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let apps: Vec<serde_json::Value> = printed
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        apps.len(),
        10,
        "{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for app in &apps {
        let cid = app["cid"].as_str().unwrap();
        assert!(app.get("timed_out").is_none(), "{app}");
        assert_eq!(
            app["register"],
            serde_json::json!({ "client_id": cid, "error": "ok" })
        );
        assert_eq!(app["pong"], true);
        let full = &app["replies"]["1002"];
        assert_eq!(full["id"], 1, "{app}");
        assert_eq!(full["result"]["error_code"], 0);
        assert_eq!(full["result"]["machine_model"], "Centauri Carbon 2");
        let attributes = &app["replies"]["1001"];
        assert_eq!(attributes["id"], 1, "{app}");
        assert_eq!(attributes["result"]["attributes"]["sn"], CC2_SERIAL);
        // Its first status message is the full status (merged at the
        // edge), or a delta when it joined before the edge had one.
        assert_eq!(app["first_status"]["method"], 6000);
    }
    let observations = world.simulator.observations();
    assert_eq!(observations.connections.load(Ordering::SeqCst), 1);
    assert_eq!(observations.cc2_registrations.load(Ordering::SeqCst), 1);
    assert_eq!(world.simulator.cc2_registrations().len(), 1);
    assert_eq!(
        observations
            .cc2_refused_registrations
            .load(Ordering::SeqCst),
        0
    );
    assert_eq!(
        observations.cc2_dropped_replies.load(Ordering::SeqCst),
        0,
        "the cooldown dropped no reply"
    );
    world.agent.cancel();
    world.edge.stop().await;
}

/// An app on one instance, the agent on another: registration, heartbeat
/// and status are served where the app is; its request goes over the peer
/// link as it came, and the instance holding the agent sends it on the
/// agent's registration and gives the answer back for that app only.
#[tokio::test]
async fn an_app_on_another_instance_speaks_cc2_through_the_peer_link() {
    const SECRET: &str = "a cluster secret of some length";
    let mut world = cc2_world_with(
        |edge| {
            edge.cluster.instance_id = "edge-b".into();
            edge.cluster.peer_listen = Some("127.0.0.1:0".parse().unwrap());
            edge.cluster.secret = SECRET.into();
        },
        |_| {},
        "",
    )
    .await;
    let mut config = world.edge.config.clone();
    config.cluster.instance_id = "edge-a".into();
    config.tunnel.listen = None;
    let a = relay_edge::RunningEdge::start(config).await.unwrap();
    // The apps dial edge-a.
    world.edge.addr = a.public_addr.unwrap();
    let mut first = cc2_app(&world, "1_PC_7101").await;
    let mut second = cc2_app(&world, "1_PC_7102").await;
    let pong = request(
        &mut first,
        "1_PC_7101",
        serde_json::json!({ "type": "PING" }),
    )
    .await;
    assert_eq!(pong, serde_json::json!({ "type": "PONG" }));
    for (client, client_id) in [(&mut first, "1_PC_7101"), (&mut second, "1_PC_7102")] {
        let answer = request(
            client,
            client_id,
            serde_json::json!({ "id": 1, "method": 1044 }),
        )
        .await;
        assert_eq!(answer["id"], 1, "{answer}");
        assert_eq!(answer["result"]["error_code"], 0, "{answer}");
        assert_eq!(next_status(client).await["method"], 6000);
    }
    let observations = world.simulator.observations();
    assert_eq!(observations.cc2_registrations.load(Ordering::SeqCst), 1);
    assert_eq!(
        observations
            .cc2_unregistered_requests
            .load(Ordering::SeqCst),
        0
    );
    world.agent.cancel();
    a.drain(Duration::from_secs(2)).await;
    world.edge.stop().await;
}
