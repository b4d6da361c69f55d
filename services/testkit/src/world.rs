//! The world of the end-to-end tests: an edge with its tunnel listener, the
//! printer simulator, and an agent between them.

use std::time::Duration;

pub use crate::edge::*;
use relay_agent::config::AgentConfig;
pub use relay_printer_sim::{RunningSimulator, Silence, SimulatorConfig};

use relay_proto::mqtt::{Packet, PacketId, Publish, QoS, Subscribe};
use tokio_util::sync::CancellationToken;

pub const SERIAL: &str = "01P00A392800017";
pub const ACCESS_CODE: &str = "a1b2c3d4";

pub struct World {
    pub edge: TestEdge,
    pub simulator: RunningSimulator,
    pub agent: CancellationToken,
    /// The agent credential the world's agent says HELLO with.
    pub agent_credential: String,
}

pub fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The tunnel transport the tests' agents use: `RELAY_TEST_TRANSPORT`
/// (`quic`, the default, or `tcp`), so that the whole suite runs over
/// either.
pub fn test_transport() -> String {
    match std::env::var("RELAY_TEST_TRANSPORT").as_deref() {
        Ok("tcp") => "tcp".into(),
        _ => "quic".into(),
    }
}

/// An agent for `edge`'s device, dialling `tunnel`, with `credential`.
pub fn agent_config(
    edge: &TestEdge,
    tunnel: std::net::SocketAddr,
    simulator: &RunningSimulator,
    access_code: &str,
    credential: &str,
) -> AgentConfig {
    let dir = &edge.pki.dir;
    let edge_ca = write(dir, "edge-ca.pem", &edge.pki.ca_pem());
    let printer_ca = write(dir, "printer-ca.pem", &simulator.ca_pem);
    AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{tunnel}"
        server_name = "tunnel.{BASE_DOMAIN}"
        ca_file = "{}"
        credential = "{credential}"
        transport = "{transport}"

        [printer]
        kind = "bambu"
        host = "127.0.0.1"
        port = {}
        serial = "{SERIAL}"
        access_code = "{access_code}"
        ca_file = "{}"
        "#,
        edge_ca.display(),
        simulator.addr.port(),
        printer_ca.display(),
        transport = test_transport(),
    ))
    .unwrap()
}

pub fn start_agent(config: AgentConfig) -> CancellationToken {
    let printer = config.validate().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(relay_agent::tunnel::run(config, printer, stop.clone()));
    stop
}

/// Starts an edge with its tunnel listener, the simulator, and an agent
/// configured with `access_code`; waits until the agent is connected.
pub async fn world(access_code: &str) -> World {
    world_with(access_code, |_| {}, |_| {}).await
}

/// [`world`], with changes to the edge's and the agent's configuration.
pub async fn world_with(
    access_code: &str,
    change_edge: impl FnOnce(&mut relay_edge::config::EdgeConfig),
    change_agent: impl FnOnce(&mut AgentConfig),
) -> World {
    let edge = TestEdge::start_with(|config| {
        config.tunnel.listen = Some("127.0.0.1:0".parse().unwrap());
        config.tunnel.linger_seconds = 2;
        change_edge(config);
    })
    .await;
    let simulator = start_simulator().await;
    let (_, credential) = edge
        .database
        .store
        .issue_agent_credential(&edge.device)
        .await
        .unwrap();
    let tunnel = edge.edge.as_ref().unwrap().tunnel_addr.unwrap();
    let agent_credential = credential.reveal();
    let mut config = agent_config(&edge, tunnel, &simulator, access_code, &agent_credential);
    change_agent(&mut config);
    let agent = start_agent(config);
    tokio::time::timeout(
        PATIENCE,
        edge.edge.as_ref().unwrap().wait_online(&edge.device),
    )
    .await
    .expect("the agent connected");
    World {
        edge,
        simulator,
        agent,
        agent_credential,
    }
}

/// The simulated Bambu printer the worlds use: serial [`SERIAL`], access
/// code [`ACCESS_CODE`], a report every 50 ms.
pub async fn start_simulator() -> RunningSimulator {
    let mut config = SimulatorConfig::new(SERIAL, ACCESS_CODE);
    config.report_interval = Duration::from_millis(50);
    RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

pub fn report_topic() -> String {
    format!("device/{SERIAL}/report")
}

pub fn subscribe_report(packet_id: u16) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(packet_id).unwrap(),
        filters: vec![(report_topic(), QoS::AtMostOnce)],
    })
}

pub async fn next_publish(client: &mut Client) -> Publish {
    loop {
        match client.next().await {
            Some(Packet::Publish(publish)) => return publish,
            Some(_) => {}
            None => panic!("closed before a PUBLISH: {:?}", client.closed_with),
        }
    }
}
