//! An Elegoo Centauri Carbon 2 behind the agent (kind `elegoo_cc2`): the
//! agent logs in as `elegoo`, registers once with its own client id and
//! keeps that registration through a printer reboot; a printer already at
//! its registration limit is reported as "too many clients". (The edge's
//! CC2 profile, which shares the agent's registration with every app, is
//! issue 15's next step: here the edge treats the printer as a generic
//! broker.)

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
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        config.tunnel.upstream_grace_seconds = 30;
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

        [printer]
        kind = "elegoo_cc2"
        host = "127.0.0.1"
        port = {}
        serial = "{CC2_SERIAL}"
        access_code = "{CC2_CODE}"
        "#,
        ca.display(),
        credential.reveal(),
        simulator.addr.port(),
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

fn subscribe_status(packet_id: u16) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(packet_id).unwrap(),
        filters: vec![(format!("elegoo/{CC2_SERIAL}/api_status"), QoS::AtMostOnce)],
    })
}

async fn next_status(client: &mut Client) -> serde_json::Value {
    loop {
        let publish = next_publish(client).await;
        if publish.topic.ends_with("/api_status") {
            return serde_json::from_slice(&publish.payload).unwrap();
        }
    }
}

#[tokio::test]
async fn the_agent_holds_one_registration_and_keeps_it_through_a_reboot() {
    let world = cc2_world(|_| {}).await;
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_status(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    assert_eq!(next_status(&mut client).await["method"], 6000);
    let registered = world.simulator.cc2_registrations();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert!(registered[0].starts_with("relay-agent-"), "{registered:?}");

    // The printer reboots: registrations forgotten, connections dropped.
    // The agent logs in and registers again; the app never noticed.
    world.simulator.reboot();
    let observations = world.simulator.observations();
    observations
        .wait_until(|seen| seen.cc2_registrations.load(Ordering::SeqCst) >= 2)
        .await;
    assert_eq!(world.simulator.cc2_registrations().len(), 1);
    assert_eq!(next_status(&mut client).await["method"], 6000);
    assert_eq!(client.closed_with, None);
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

/// The agent, the LAN's last line, keeps the shared registration safe: a
/// registration naming its own client id never reaches the printer, nor do
/// topics outside `elegoo/<sn>/`; an app's own registration does.
#[tokio::test]
async fn an_app_cannot_take_the_agents_registration() {
    use relay_proto::mqtt::{Publish, SubscribeReturnCode};
    let world = cc2_world(|_| {}).await;
    let mut client =
        Client::connect(&world.edge, &world.edge.bearer(), connect_packet("app")).await;
    client.send(&subscribe_status(1)).await;
    assert!(matches!(client.next().await, Some(Packet::SubAck(_))));
    let agent_client = world.simulator.cc2_registrations()[0].clone();
    let observations = world.simulator.observations();
    let register = |id: u16, client_id: &str| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("elegoo/{CC2_SERIAL}/api_register"),
            packet_id: PacketId::new(id),
            payload: bytes::Bytes::from(
                serde_json::json!({ "client_id": client_id, "request_id": "x_req" }).to_string(),
            ),
        })
    };
    client.send(&register(2, &agent_client)).await;
    acknowledged(&mut client, 2).await;
    client.send(&register(3, "1_PC_4242")).await;
    acknowledged(&mut client, 3).await;
    // The agent's own registration, then the app's: the one naming the
    // agent's client id never reached the printer (it would have counted).
    assert_eq!(
        observations.cc2_registrations.load(Ordering::SeqCst),
        2,
        "only the app's own registration reached the printer"
    );
    let registered = world.simulator.cc2_registrations();
    assert_eq!(registered.len(), 2, "{registered:?}");
    // Another printer's topics: refused by the agent.
    client
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(4).unwrap(),
            filters: vec![("elegoo/OTHER/api_status".into(), QoS::AtMostOnce)],
        }))
        .await;
    loop {
        match client.next().await {
            Some(Packet::SubAck(ack)) if ack.packet_id == PacketId::new(4).unwrap() => {
                assert_eq!(ack.return_codes, vec![SubscribeReturnCode::Failure]);
                break;
            }
            Some(_) => {}
            None => panic!("closed: {:?}", client.closed_with),
        }
    }
    world.agent.cancel();
    world.edge.stop().await;
}

async fn acknowledged(client: &mut Client, id: u16) {
    let id = PacketId::new(id).unwrap();
    loop {
        match client.next().await {
            Some(Packet::PubAck(acked)) if acked == id => return,
            Some(_) => {}
            None => panic!("closed: {:?}", client.closed_with),
        }
    }
}
