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

/// The arguments of `relay-agent setup` for this world's edge and printer.
fn setup_args(
    world: &World,
    file: &std::path::Path,
    credential: &str,
    access_code: &str,
) -> Vec<String> {
    let tunnel = world.edge.edge.as_ref().unwrap().tunnel_addr.unwrap();
    let dir = &world.edge.pki.dir;
    let edge_ca = write(dir, "setup-edge-ca.pem", &world.edge.pki.ca_pem());
    let printer_ca = write(dir, "setup-printer-ca.pem", &world.simulator.ca_pem);
    [
        "setup".to_owned(),
        "--config".into(),
        file.display().to_string(),
        "--edge".into(),
        tunnel.to_string(),
        "--server-name".into(),
        format!("tunnel.{BASE_DOMAIN}"),
        "--edge-ca".into(),
        edge_ca.display().to_string(),
        "--credential".into(),
        credential.into(),
        "--kind".into(),
        "bambu".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        world.simulator.addr.port().to_string(),
        "--serial".into(),
        SERIAL.into(),
        "--access-code".into(),
        access_code.into(),
        "--printer-ca".into(),
        printer_ca.display().to_string(),
    ]
    .into()
}

/// `relay-agent setup` driven by flags: it writes a 0600 file the agent
/// accepts, tries the edge and the printer, and says what works; a wrong
/// access code is reported in plain words, and never printed.
#[tokio::test]
async fn setup_with_flags_writes_the_file_and_says_what_works() {
    use std::os::unix::fs::PermissionsExt;
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let file = world.edge.pki.dir.join("setup/agent.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .args(setup_args(&world, &file, &credential.reveal(), ACCESS_CODE))
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{said}");
    assert!(
        said.contains("edge: works") && said.contains(&world.edge.device),
        "{said}"
    );
    assert!(said.contains("printer: works"), "{said}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let config =
        relay_agent::config::AgentConfig::from_toml(&std::fs::read_to_string(&file).unwrap())
            .unwrap();
    assert!(config.validate().is_ok());

    // Again, with a wrong access code: the file is refused without --force,
    // then written, and the printer's refusal is said plainly.
    let again = Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .args(setup_args(&world, &file, &credential.reveal(), "wrongcod"))
        .output()
        .await
        .unwrap();
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let forced = Command::new(env!("CARGO_BIN_EXE_relay-agent"))
        .args(setup_args(&world, &file, &credential.reveal(), "wrongcod"))
        .arg("--force")
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&forced.stdout).to_string()
        + &String::from_utf8_lossy(&forced.stderr);
    assert_eq!(forced.status.code(), Some(1), "{said}");
    assert!(said.contains("printer: does not work"), "{said}");
    assert!(
        !said.contains("wrongcod") && !said.contains(&credential.reveal()),
        "{said}"
    );
    world.edge.stop().await;
}

/// `relay-agent setup` in a terminal, as a person uses it (a tmux pane):
/// it asks for what the flags left out, and the answers make a working
/// configuration.
#[tokio::test]
async fn setup_in_a_terminal_asks_for_what_is_missing() {
    let world = world(ACCESS_CODE).await;
    world.agent.cancel();
    let (_, credential) = world
        .edge
        .database
        .store
        .rotate_agent_credential(&world.edge.device)
        .await
        .unwrap();
    let file = world.edge.pki.dir.join("tty/agent.toml");
    let mut args = setup_args(&world, &file, &credential.reveal(), ACCESS_CODE);
    // Leave out the credential and the access code: setup must ask.
    for flag in ["--credential", "--access-code"] {
        let at = args.iter().position(|arg| arg == flag).unwrap();
        args.drain(at..at + 2);
    }
    let session = format!("relay-setup-{}", std::process::id());
    let command = std::iter::once(env!("CARGO_BIN_EXE_relay-agent").to_owned())
        .chain(args)
        .map(|arg| format!("'{arg}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let tmux = |args: &[&str]| {
        let output = std::process::Command::new("tmux")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "50",
        &format!("{command}; echo setup-exit-$?; sleep 60"),
    ]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session, "-S", "-50"]);
    // Waits (bounded) for the pane to show `text`.
    let wait_for = |text: &'static str| {
        let screen = &screen;
        async move {
            tokio::time::timeout(PATIENCE, async {
                loop {
                    let shown = screen();
                    if shown.contains(text) {
                        return shown;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the terminal never showed {text:?}:\n{}", screen()))
        }
    };
    wait_for("Agent credential").await;
    tmux(&["send-keys", "-t", &session, &credential.reveal(), "Enter"]);
    wait_for("LAN access code").await;
    tmux(&["send-keys", "-t", &session, ACCESS_CODE, "Enter"]);
    // Serve LAN apps on 1883 (plain) and 8883 (TLS).
    wait_for("Plain MQTT port").await;
    tmux(&["send-keys", "-t", &session, "1883", "Enter"]);
    wait_for("MQTT over TLS port").await;
    tmux(&["send-keys", "-t", &session, "8883", "Enter"]);
    let shown = wait_for("setup-exit-").await;
    tmux(&["kill-session", "-t", &session]);
    assert!(shown.contains("setup-exit-0"), "{shown}");
    assert!(
        shown.contains("edge: works") && shown.contains("printer: works"),
        "{shown}"
    );
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(written.contains(&credential.reveal()));
    assert!(
        written.contains("[lan]") && written.contains("0.0.0.0:8883"),
        "{written}"
    );
    assert!(
        shown.contains("Home Assistant") && shown.contains("-p 1883 -u bblp"),
        "{shown}"
    );
    world.edge.stop().await;
}
