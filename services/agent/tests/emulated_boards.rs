//! The agent as built for Raspberry Pi boards (aarch64 and armv7, glibc),
//! run under qemu-user against a real edge and the printer simulator on
//! this machine: it connects, an app using paho-mqtt (Python) subscribes
//! through the edge, and a report arrives; then another on the agent's LAN
//! listener, on the same printer connection. Prints the agent's RSS under
//! emulation (timing under emulation means nothing; memory does).
//!
//! Needs the cross-built binaries: `scripts/test-pi-agent` builds them and
//! runs this test with `RELAY_PI_AGENTS` naming them, as the test suite
//! does. Ignored in a plain `cargo test`, which cannot build them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::world;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use world::*;

/// qemu-user and the target's libc for each binary's architecture.
fn emulator_for(binary: &Path) -> (&'static str, &'static str) {
    let path = binary.to_string_lossy();
    if path.contains("aarch64") {
        ("qemu-aarch64-static", "/usr/aarch64-linux-gnu")
    } else if path.contains("armv7") {
        ("qemu-arm-static", "/usr/arm-linux-gnueabihf")
    } else {
        panic!("no emulator known for {path}")
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// paho-mqtt over wss to the edge: subscribes to the report and prints the
/// topic of each message until its disconnect takes effect.
fn paho_script(edge: &TestEdge, ca: &Path) -> String {
    format!(
        r#"
import ssl, sys
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets")
client.ws_set_options(path="/d/{device}/mqtt", headers={{"Authorization": "{bearer}"}})
client.tls_set(ca_certs="{ca}")
client.tls_insecure_set(True)  # 127.0.0.1 is not on the *.{domain} certificate; the chain is checked
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("device/{serial}/report")
def on_message(client, userdata, message):
    print(message.topic, flush=True)
    client.disconnect()
client.on_connect = on_connect
client.on_message = on_message
client.connect("127.0.0.1", {port})
client.loop_forever(retry_first_connection=True)
"#,
        device = edge.device,
        bearer = edge.bearer(),
        ca = ca.display(),
        domain = BASE_DOMAIN,
        serial = SERIAL,
        port = edge.addr.port(),
    )
}

/// paho-mqtt on the agent's LAN listener (plain MQTT, the printer's own
/// login): subscribes to the report and prints the topic of the first.
fn paho_lan_script(port: u16) -> String {
    format!(
        r#"
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-lan-app")
client.username_pw_set("bblp", "{ACCESS_CODE}")
def on_connect(client, userdata, flags, reason, properties):
    client.subscribe("device/{SERIAL}/report")
def on_message(client, userdata, message):
    print(message.topic, flush=True)
    client.disconnect()
client.on_connect = on_connect
client.on_message = on_message
client.connect("127.0.0.1", {port})
client.loop_forever(retry_first_connection=True)
"#
    )
}

/// A port free on loopback now, for the emulated agent's LAN listener
/// (its log is not read, so it cannot say which port `:0` got).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a paho script and returns what it printed.
async fn run_paho(python: &Path, script: &Path) -> String {
    let output = tokio::time::timeout(
        PATIENCE * 4,
        Command::new(python).arg(script).kill_on_drop(true).output(),
    )
    .await
    .expect("paho got a report in time")
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    // A second report may arrive before the disconnect is processed.
    assert!(
        !printed.trim().is_empty() && printed.lines().all(|line| line == report_topic()),
        "paho printed {printed:?}, said {}",
        String::from_utf8_lossy(&output.stderr)
    );
    printed
}

#[tokio::test]
#[ignore = "run by scripts/test-pi-agent, which cross-builds the agents"]
async fn cross_built_agents_relay_a_printer_under_emulation() {
    let binaries = std::env::var("RELAY_PI_AGENTS").expect("RELAY_PI_AGENTS names the agents");
    let python = PathBuf::from(std::env::var("RELAY_PYTHON").expect("RELAY_PYTHON names python"));
    for binary in binaries.split(':').map(PathBuf::from) {
        let world = world_with(
            ACCESS_CODE,
            |edge| edge.public.device_in_path = true,
            |_| {},
        )
        .await;
        // The in-process agent goes: the emulated one takes its place.
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
        let tunnel = edge.tunnel_addr.unwrap();
        let config = agent_config(
            &world.edge,
            tunnel,
            &world.simulator,
            ACCESS_CODE,
            &credential.reveal(),
        );
        let dir = &world.edge.pki.dir;
        let printer = match &config.printer {
            relay_agent::config::PrinterSection::Bambu { ca_file, .. } => ca_file.clone().unwrap(),
            relay_agent::config::PrinterSection::Mqtt { .. }
            | relay_agent::config::PrinterSection::ElegooCc2 { .. } => unreachable!(),
        };
        let lan_port = free_port();
        let file = write(
            dir,
            "pi-agent.toml",
            &format!(
                "[edge]\naddress = \"{tunnel}\"\nserver_name = \"tunnel.{BASE_DOMAIN}\"\nca_file = \"{}\"\ncredential = \"{}\"\n\
                 [lan]\nlisten = \"127.0.0.1:{lan_port}\"\n\
                 [printer]\nkind = \"bambu\"\nhost = \"127.0.0.1\"\nport = {}\nserial = \"{SERIAL}\"\naccess_code = \"{ACCESS_CODE}\"\nca_file = \"{}\"\n",
                config.edge.ca_file.display(),
                credential.reveal(),
                world.simulator.addr.port(),
                printer.display(),
            ),
        );
        let (qemu, sysroot) = emulator_for(&binary);
        let agent = Command::new(qemu)
            .arg("-L")
            .arg(sysroot)
            .arg(&binary)
            .arg("--config")
            .arg(&file)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::timeout(PATIENCE * 4, edge.wait_online(&world.edge.device))
            .await
            .unwrap_or_else(|_| panic!("{} did not connect under {qemu}", binary.display()));

        let ca = write(dir, "edge-ca-for-paho.pem", &world.edge.pki.ca_pem());
        let script = write(dir, "pi-subscribe.py", &paho_script(&world.edge, &ca));
        run_paho(&python, &script).await;
        let connections = || {
            world
                .simulator
                .observations()
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = connections();
        // A LAN app on the agent's own listener, on the same printer
        // connection: the printer sees no new one.
        let script = write(dir, "pi-lan-subscribe.py", &paho_lan_script(lan_port));
        run_paho(&python, &script).await;
        assert_eq!(
            connections(),
            before,
            "the LAN app rode the printer connection the cloud app opened"
        );
        let rss = rss_kib(agent.id().unwrap());
        println!(
            "{}: connected under {qemu}, a report reached paho-mqtt through the edge and on the LAN listener; agent RSS under emulation {:.1} MiB",
            binary.display(),
            rss as f64 / 1024.0
        );
        drop(agent);
        world.edge.stop().await;
    }
}
