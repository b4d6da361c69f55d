//! The agent binary says, within seconds of starting, whether it reached
//! the edge and the printer, and why not.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use world::*;

/// Starts `relay-agent --config <file>` with the access code given by flag
/// and the credential by environment, as a printer owner might; the file's
/// own values for both are wrong, so the test also shows the overrides win.
fn spawn_agent(world: &World, credential: &str, access_code: &str) -> Child {
    let tunnel = world.edge.edge.as_ref().unwrap().tunnel_addr.unwrap();
    let dir = &world.edge.pki.dir;
    let edge_ca = write(dir, "edge-ca.pem", &world.edge.pki.ca_pem());
    let printer_ca = write(dir, "printer-ca.pem", &world.simulator.ca_pem);
    let file = write(
        dir,
        "agent.toml",
        &format!(
            "[edge]\naddress = \"{tunnel}\"\nserver_name = \"tunnel.{BASE_DOMAIN}\"\nca_file = \"{}\"\ncredential = \"rla_in_the_file\"\n\
             [printer]\nkind = \"bambu\"\nhost = \"127.0.0.1\"\nport = {}\nserial = \"{SERIAL}\"\naccess_code = \"00000000\"\nca_file = \"{}\"\n",
            edge_ca.display(),
            world.simulator.addr.port(),
            printer_ca.display(),
        ),
    );
    Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .arg("--config")
        .arg(&file)
        .arg("--access-code")
        .arg(access_code)
        .env("RELAY_AGENT_CREDENTIAL", credential)
        .env("NO_COLOR", "1")
        .env_remove("RELAY_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads the agent's log until every `wanted` text has appeared.
async fn wait_for_lines(agent: &mut Child, wanted: &[&str]) -> String {
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let read = async {
        while !wanted.iter().all(|text| seen.contains(text)) {
            match lines.next_line().await.unwrap() {
                Some(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                None => panic!("the agent exited; it said:\n{seen}"),
            }
        }
    };
    if tokio::time::timeout(PATIENCE, read).await.is_err() {
        panic!("the agent did not say {wanted:?}; it said:\n{seen}");
    }
    seen
}

#[tokio::test]
async fn the_agent_says_it_reached_the_edge_and_the_printer() {
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let mut agent = spawn_agent(&world, &credential.reveal(), ACCESS_CODE);
    let said = wait_for_lines(&mut agent, &["connected to the edge", "printer reachable"]).await;
    assert!(said.contains(&world.edge.device), "{said}");
    assert!(!said.contains(&credential.reveal()), "{said}");
    assert!(!said.contains(ACCESS_CODE), "{said}");
    agent.kill().await.unwrap();
    world.edge.stop().await;
}

#[tokio::test]
async fn the_agent_says_why_it_cannot_reach_them() {
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    // A rotated-away credential, and a wrong access code.
    let store = &world.edge.database.store;
    let (_, stale) = store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let mut agent = spawn_agent(&world, &stale.reveal(), "wrongcod");
    let said = wait_for_lines(
        &mut agent,
        &[
            "the edge refused this agent",
            "printer not reachable",
            "CredentialsRefused",
        ],
    )
    .await;
    assert!(!said.contains("wrongcod"), "{said}");
    assert!(!said.contains(&stale.reveal()), "{said}");
    agent.kill().await.unwrap();
    world.edge.stop().await;
}

/// SIGTERM (systemd's stop, a container runtime's) stops the agent cleanly:
/// it closes its QUIC connection with a reason, so the edge knows at once
/// instead of after the idle timeout, and exits 0.
#[tokio::test]
async fn sigterm_stops_the_agent_and_the_edge_knows_at_once() {
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let edge = world.edge.edge.as_ref().unwrap();
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .unwrap();
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let mut agent = spawn_agent(&world, &credential.reveal(), ACCESS_CODE);
    wait_for_lines(&mut agent, &["connected to the edge"]).await;
    tokio::time::timeout(PATIENCE, edge.wait_online(&world.edge.device))
        .await
        .unwrap();
    let pid = agent.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(PATIENCE, agent.wait())
        .await
        .expect("the agent stopped on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // Far sooner than QUIC's idle timeout (4 × 15 s).
    tokio::time::timeout(PATIENCE, edge.wait_offline(&world.edge.device))
        .await
        .expect("the edge saw the agent go");
    world.edge.stop().await;
}
