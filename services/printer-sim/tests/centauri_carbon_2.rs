//! The simulator as an Elegoo Centauri Carbon 2, seen by paho-mqtt (Python,
//! a client library nobody here wrote) connecting straight to it, as apps on
//! the LAN do: plain MQTT with user `elegoo`, a registration per app, the
//! fifth refused with "too many clients", requests answered on the app's own
//! topic, PING answered with PONG, status on `api_status`, and a reboot that
//! forgets every registration.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use relay_printer_sim::{RunningSimulator, SimulatorConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const SERIAL: &str = "F01CC2000000042";
const CODE: &str = "123456";
const PATIENCE: Duration = Duration::from_secs(30);

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

/// paho apps, one after the other, each registering as `app-<n>` and then,
/// if registered, asking for the full status (1002) and sending a PING.
/// Prints one line per event.
fn apps_script(port: u16, apps: usize) -> String {
    format!(
        r#"
import json, queue, sys
import paho.mqtt.client as mqtt
SN = "{SERIAL}"
clients = []
for n in range({apps}):
    cid = "app-%d" % n
    inbox = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    client.username_pw_set("elegoo", "{CODE}")
    client.on_message = lambda c, u, m, inbox=inbox: inbox.put((m.topic, json.loads(m.payload)))
    client.connect("127.0.0.1", {port})
    client.loop_start()
    client.subscribe("elegoo/%s/%s_req/register_response" % (SN, cid))
    client.subscribe("elegoo/%s/%s/api_response" % (SN, cid))
    client.subscribe("elegoo/%s/api_status" % SN)
    import time; time.sleep(0.3)
    client.publish("elegoo/%s/api_register" % SN, json.dumps({{"client_id": cid, "request_id": cid + "_req"}}))
    registered = None
    status = reply = pong = False
    while registered is None or not (status and reply and pong):
        topic, message = inbox.get(timeout=10)
        if topic.endswith("register_response"):
            registered = message["error"]
            print(cid, "register", registered, flush=True)
            if registered != "ok":
                break
            client.publish("elegoo/%s/%s/api_request" % (SN, cid), json.dumps({{"id": 7, "method": 1002, "params": {{}}}}))
            client.publish("elegoo/%s/%s/api_request" % (SN, cid), json.dumps({{"type": "PING"}}))
        elif topic.endswith("api_response"):
            if message.get("type") == "PONG":
                pong = True
                print(cid, "pong", flush=True)
            else:
                reply = True
                print(cid, "reply", message["id"], message["method"], message["result"]["error_code"], flush=True)
        elif topic.endswith("api_status") and message.get("method") == 6000:
            status = True
    clients.append(client)
print("done", flush=True)
"#
    )
}

#[tokio::test]
async fn a_fifth_app_straight_to_the_printer_gets_too_many_clients() {
    let python = python();
    let mut config = SimulatorConfig::elegoo_cc2(SERIAL, CODE);
    config.report_interval = Duration::from_millis(100);
    // The apps' requests come in quick succession: without the cooldown
    // quirk here (its own unit test covers it), every one is answered.
    if let Some(cc2) = &mut config.cc2 {
        cc2.cooldown = None;
    }
    let simulator = RunningSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(apps_script(simulator.addr.port(), 5))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "done" {
                return;
            }
            said.push(line);
        }
        panic!("the apps ended early: {said:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("the apps did not finish: {said:?}"));
    for n in 0..4 {
        for expected in [
            format!("app-{n} register ok"),
            format!("app-{n} reply 7 1002 0"),
            format!("app-{n} pong"),
        ] {
            assert!(said.contains(&expected), "{expected} missing from {said:?}");
        }
    }
    assert!(
        said.contains(&"app-4 register too many clients".to_owned()),
        "{said:?}"
    );
    let observations = simulator.observations();
    assert_eq!(observations.cc2_registrations.load(Ordering::SeqCst), 4);
    assert_eq!(
        observations
            .cc2_refused_registrations
            .load(Ordering::SeqCst),
        1
    );
    assert_eq!(simulator.cc2_registrations().len(), 4);

    // A reboot forgets them all; the connections are dropped.
    simulator.reboot();
    assert!(simulator.cc2_registrations().is_empty());
    let _ = child.start_kill();
    simulator.stop().await;
}

#[tokio::test]
async fn the_access_code_and_user_are_checked() {
    let python = python();
    let simulator = RunningSimulator::start(
        SimulatorConfig::elegoo_cc2(SERIAL, CODE),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let script = format!(
        r#"
import paho.mqtt.client as mqtt
for user, password in [("elegoo", "wrong"), ("bblp", "{CODE}"), ("elegoo", "{CODE}")]:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set(user, password)
    codes = []
    client.on_connect = lambda c, u, f, reason, p: (codes.append(reason.value), c.disconnect())
    client.connect("127.0.0.1", {port})
    client.loop_forever()
    print(user, password == "{CODE}", codes[0], flush=True)
"#,
        port = simulator.addr.port()
    );
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(&python).arg("-c").arg(script).output(),
    )
    .await
    .unwrap()
    .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        // paho reports CONNACK 5 as MQTT 5's 0x87 (135), not authorized.
        vec!["elegoo False 135", "bblp True 135", "elegoo True 0"],
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        simulator
            .observations()
            .refused_credentials
            .load(Ordering::SeqCst),
        2
    );
    simulator.stop().await;
}
