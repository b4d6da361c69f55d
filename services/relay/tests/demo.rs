//! `relay demo` end to end, as a newcomer runs it: the binary starts, two
//! MQTT clients nobody here wrote (Python's paho-mqtt and MQTT.js's CLI) run
//! the exact commands it printed and receive the simulated printer's
//! reports, Ctrl-C stops it cleanly, and a second run reuses its data.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use relay_testkit::client_tools::client_tools;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Generous: the first npx run may fetch MQTT.js's dependencies.
const PATIENCE: Duration = Duration::from_secs(90);
const REPORT_TOPIC: &str = "device/01P00A000000001/report";

struct Demo {
    child: Child,
    output: Lines<BufReader<ChildStdout>>,
    said: String,
}

impl Demo {
    fn start(data_dir: &Path) -> Demo {
        Self::start_with(data_dir, &[])
    }

    fn start_with(data_dir: &Path, more: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(["demo", "--port", "0", "--mqtts-port", "0", "--data-dir"])
            .arg(data_dir)
            .args(more)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = BufReader::new(child.stdout.take().unwrap()).lines();
        Demo {
            child,
            output,
            said: String::new(),
        }
    }

    /// Reads the demo's output up to a line containing `text`.
    async fn read_until(&mut self, text: &str) {
        let read = async {
            loop {
                match self.output.next_line().await.unwrap() {
                    Some(line) => {
                        self.said.push_str(&line);
                        self.said.push('\n');
                        if line.contains(text) {
                            return;
                        }
                    }
                    None => panic!("the demo ended before {text:?}; it said:\n{}", self.said),
                }
            }
        };
        if tokio::time::timeout(PATIENCE, read).await.is_err() {
            panic!("the demo did not say {text:?}; it said:\n{}", self.said);
        }
    }

    /// Ctrl-C, as a user would press it; the demo must stop cleanly.
    async fn interrupt(mut self) -> String {
        let pid = self.child.id().unwrap().to_string();
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        self.read_until("relay demo: stopped").await;
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("the demo exited after Ctrl-C")
            .unwrap();
        assert!(status.success(), "{status:?}\n{}", self.said);
        self.said
    }
}

/// Runs `program args…` in `dir` and returns its first line of output;
/// then ends it with everything it started (npx runs MQTT.js as a child).
async fn first_line(program: &Path, args: &[&Path], dir: &Path) -> String {
    first_line_with(program, args, dir, &[]).await
}

async fn first_line_with(
    program: &Path,
    args: &[&Path],
    dir: &Path,
    env: &[(&str, &Path)],
) -> String {
    first_lines(program, args, dir, env, 1).await.remove(0)
}

/// Runs `program args…` in `dir` until it printed `count` lines; then
/// ends it with everything it started.
async fn first_lines(
    program: &Path,
    args: &[&Path],
    dir: &Path,
    env: &[(&str, &Path)],
    count: usize,
) -> Vec<String> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(name, value)| (*name, *value)))
        .current_dir(dir)
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    while printed.len() < count {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} printed only {printed:?}", program.display()))
            .unwrap()
            .unwrap_or_else(|| panic!("{} ended after {printed:?}", program.display()));
        printed.push(line);
    }
    let group = format!("-{}", child.id().unwrap());
    let status = Command::new("kill")
        .args(["-TERM", "--", &group])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    child.wait().await.unwrap();
    printed
}

/// The book's code blocks marked `<!-- snippet: <file name> -->`, from
/// every page under `docs/`.
fn book_snippets() -> Vec<(String, String)> {
    fn pages(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pages(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    pages(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs"),
        &mut found,
    );
    found.sort();
    let mut snippets = Vec::new();
    for page in found {
        let text = std::fs::read_to_string(&page).unwrap();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(name) = line
                .strip_prefix("<!-- snippet: ")
                .and_then(|rest| rest.strip_suffix(" -->"))
            else {
                continue;
            };
            assert!(lines.next().unwrap().starts_with("```"), "{name}");
            let code: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            snippets.push((name.to_owned(), code.join("\n") + "\n"));
        }
    }
    snippets
}

fn said_value<'a>(said: &'a str, label: &str) -> &'a str {
    said.lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in:\n{said}"))
        .trim()
}

fn device_of(said: &str) -> String {
    said.lines()
        .filter(|line| line.starts_with("[5/5] agent: connected"))
        .find_map(|line| line.split_once("device ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no device line in:\n{said}"))
        .to_owned()
}

#[tokio::test]
async fn the_demo_serves_real_clients_and_restarts_on_its_data() {
    let tools = client_tools();
    let data_dir = std::env::temp_dir().join(format!(
        "relay-demo-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let python = tools.join("venv/bin/python");

    let mut demo = Demo::start(&data_dir);
    demo.read_until("relay demo is ready.").await;
    demo.read_until("Ctrl-C stops everything").await;
    assert!(demo.said.contains("created"), "{}", demo.said);
    assert!(demo.said.contains("wss://127.0.0.1:"), "{}", demo.said);
    let device = device_of(&demo.said);
    // A new demo's agent pairs by a code, approved through the tenant API.
    for said in [
        "agent: no credential yet: it asked to pair and shows the code ",
        "owner: approved the code through the tenant API",
        &format!("agent: paired at its next poll, as device {device}"),
    ] {
        assert!(demo.said.contains(said), "{said:?} in {}", demo.said);
    }
    assert!(!demo.said.contains("rla_"), "no credential printed");
    assert!(
        demo.said.contains(&format!("/d/{device}/mqtt")),
        "{}",
        demo.said
    );

    let line = first_line(&python, &[&data_dir.join("subscribe.py")], &data_dir).await;
    assert!(line.starts_with(REPORT_TOPIC), "paho printed {line:?}");
    let line = first_line(
        Path::new("sh"),
        &[&data_dir.join("subscribe-mqttjs.sh")],
        &tools.join("node"),
    )
    .await;
    assert!(line.starts_with(REPORT_TOPIC), "MQTT.js printed {line:?}");
    // Apps without WebSocket: mosquitto_sub and paho over mqtts, as printed.
    assert!(demo.said.contains("Home Assistant (Bambu Lab integration)"));
    assert!(demo.said.contains("access code"), "{}", demo.said);
    let line = first_line(
        Path::new("sh"),
        &[&data_dir.join("subscribe-mqtts.sh")],
        &data_dir,
    )
    .await;
    assert!(
        line.starts_with(REPORT_TOPIC),
        "mosquitto_sub printed {line:?}"
    );
    let line = first_line(&python, &[&data_dir.join("subscribe-mqtts.py")], &data_dir).await;
    assert!(
        line.starts_with(REPORT_TOPIC),
        "paho over mqtts printed {line:?}"
    );

    // Every snippet the book marks, with this demo's values put in.
    let key = said_value(&demo.said, "key ").to_owned();
    let url = said_value(&demo.said, "URL ").to_owned();
    let port = url
        .strip_prefix("wss://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let mqtts_port = demo
        .said
        .split("mqtts on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap()
        .to_owned();
    let ca = data_dir.join("ca.pem");

    // The tenant API: the printed login link signs in (curl keeps the
    // cookie), and the demo's device is online.
    demo.read_until("online: true while").await;
    let login = said_value(&demo.said, "login ").to_owned();
    let (base, token) = login.split_once("/login/").unwrap();
    let jar = data_dir.join("cookies.txt");
    let curl = |args: Vec<String>| {
        let ca = ca.clone();
        async move {
            let output = tokio::process::Command::new("curl")
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&ca)
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let signed_in = curl(vec![
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-c".into(),
        jar.display().to_string(),
        "--data".into(),
        format!("token={token}"),
        format!("{base}/login"),
    ])
    .await;
    assert_eq!(signed_in, "303");
    let devices = curl(vec![
        "-b".into(),
        jar.display().to_string(),
        format!("{base}/api/v1/devices"),
    ])
    .await;
    let devices: serde_json::Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(devices[0]["id"], device.as_str(), "{devices}");
    assert_eq!(devices[0]["status"]["online"], true, "{devices}");

    let snippets = book_snippets();
    assert_eq!(snippets.len(), 8, "{snippets:?}");
    for (name, code) in snippets {
        let code = code
            .replace("DEVICE_ID", &device)
            .replace("rly_YOUR_KEY", &key)
            .replace("data/demo/ca.pem", ca.to_str().unwrap())
            .replace("8443", &port)
            .replace("8883", &mqtts_port);
        let line = if name.ends_with(".mjs") {
            let file = tools.join("node").join(&name);
            std::fs::write(&file, code).unwrap();
            first_line_with(
                Path::new("node"),
                &[&file],
                &tools.join("node"),
                &[("NODE_EXTRA_CA_CERTS", &ca)],
            )
            .await
        } else if name.ends_with(".py") {
            let file = data_dir.join(&name);
            std::fs::write(&file, code).unwrap();
            first_line(&python, &[&file], &data_dir).await
        } else {
            let file = data_dir.join(&name);
            std::fs::write(&file, code).unwrap();
            first_line(Path::new("sh"), &[&file], &tools.join("node")).await
        };
        assert!(line.starts_with(REPORT_TOPIC), "{name} printed {line:?}");
    }
    // The device's own name is on the certificate: Python (OpenSSL) does
    // not accept a `*.localhost` wildcard for it.
    let check = data_dir.join("check-name.py");
    std::fs::write(
        &check,
        format!(
            "import socket, ssl\n\
             context = ssl.create_default_context(cafile={ca:?})\n\
             with socket.create_connection(('127.0.0.1', {port})) as raw:\n\
             \x20   with context.wrap_socket(raw, server_hostname='{device}.localhost') as tls:\n\
             \x20       print('verified', tls.version())\n",
            ca = ca.to_str().unwrap(),
        ),
    )
    .unwrap();
    let line = first_line(&python, &[&check], &data_dir).await;
    assert!(line.starts_with("verified"), "{line}");

    let said = demo.interrupt().await;
    assert!(said.contains("relay demo: stopping"), "{said}");

    // The second run finds its device, keys and certificates again.
    let mut again = Demo::start(&data_dir);
    again.read_until("relay demo is ready.").await;
    assert!(again.said.contains("reused"), "{}", again.said);
    assert!(!again.said.contains("asked to pair"), "paired once");
    assert_eq!(device_of(&again.said), device);
    let line = first_line(&python, &[&data_dir.join("subscribe.py")], &data_dir).await;
    assert!(line.starts_with(REPORT_TOPIC), "paho printed {line:?}");
    again.interrupt().await;
    std::fs::remove_dir_all(&data_dir).unwrap();
}

/// `relay demo --edges 3`: three edge processes on the demo's store. A
/// paho client on an instance that does not hold the agent's tunnel keeps
/// receiving after the one that does is killed: the agent moves and the
/// client's hub finds it.
#[tokio::test]
async fn the_demo_with_three_edges_shows_the_failover() {
    let tools = client_tools();
    let python = tools.join("venv/bin/python");
    let data_dir = std::env::temp_dir().join(format!(
        "relay-demo-edges-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut demo = Demo::start_with(&data_dir, &["--edges", "3"]);
    demo.read_until("relay demo is ready.").await;
    demo.read_until("clients on the other instances resume")
        .await;
    let said = demo.said.clone();
    let device = device_of(&said);
    let holder = said
        .lines()
        .find_map(|line| line.split("(its tunnel is on ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .to_owned();
    let holder_pid = said
        .lines()
        .find_map(|line| line.split(&format!("{holder}, pid ")).nth(1))
        .and_then(|rest| rest.split(')').next())
        .unwrap()
        .to_owned();
    // An instance that does not hold the tunnel, and its ports.
    let (other, other_port, other_mqtts_port) = said
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let id = line.split_whitespace().next()?;
            let url = line.split_whitespace().find(|w| w.starts_with("wss://"))?;
            let port = url.strip_prefix("wss://127.0.0.1:")?.split('/').next()?;
            let mqtts = line
                .split_whitespace()
                .find(|w| w.starts_with("mqtts://"))?;
            let mqtts_port = mqtts.strip_prefix("mqtts://127.0.0.1:")?;
            (id.starts_with("demo-edge-") && id != holder)
                .then(|| (id.to_owned(), port.to_owned(), mqtts_port.to_owned()))
        })
        .next()
        .unwrap_or_else(|| panic!("no other instance in:\n{said}"));
    let key = said_value(&said, "key ").to_owned();
    // mosquitto_sub over that instance's mqtts gets a report too.
    let mosquitto_sub = tokio::time::timeout(
        PATIENCE,
        Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &other_mqtts_port, "--cafile"])
            .arg(data_dir.join("ca.pem"))
            .args([
                "-u",
                "bblp",
                "-P",
                &key,
                "-t",
                REPORT_TOPIC,
                "-C",
                "1",
                "-v",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_sub received in time")
    .unwrap();
    assert!(
        String::from_utf8_lossy(&mosquitto_sub.stdout).starts_with(REPORT_TOPIC),
        "mosquitto_sub over {other}'s mqtts: {}",
        String::from_utf8_lossy(&mosquitto_sub.stderr)
    );
    let script = data_dir.join("follow.py");
    std::fs::write(
        &script,
        format!(
            r#"import time
import paho.mqtt.client as mqtt
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets")
client.ws_set_options(path="/d/{device}/mqtt", headers={{"Authorization": "Bearer {key}"}})
client.tls_set(ca_certs="{ca}")
client.on_connect = lambda c, userdata, flags, code, properties: c.subscribe("{REPORT_TOPIC}")
client.on_message = lambda c, userdata, message: print(time.time(), message.topic, flush=True)
client.connect("127.0.0.1", {other_port})
client.loop_forever()
"#,
            ca = data_dir.join("ca.pem").display(),
        ),
    )
    .unwrap();
    let mut follower = Command::new(&python)
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains(REPORT_TOPIC), "{first}");

    let status = Command::new("kill")
        .args(["-KILL", &holder_pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    demo.read_until("relay demo: the agent moved to").await;
    // A report made after the kill reaches the client on the other instance.
    let resumed = tokio::time::timeout(PATIENCE, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("paho kept running");
            let at: f64 = line.split_whitespace().next().unwrap().parse().unwrap();
            if at > killed_at + 1.0 {
                return at - killed_at;
            }
        }
    })
    .await
    .expect("the client on the surviving instance received again");
    eprintln!("the client on {other} received again {resumed:.1} s after {holder} was killed");
    let _ = follower.start_kill();
    let said = demo.interrupt().await;
    assert!(said.contains(&format!("{holder} exited")), "{said}");
    std::fs::remove_dir_all(&data_dir).unwrap();
}

/// `relay demo --printer cc2`: the printed paho snippet speaks the CC2
/// protocol through the relay as on the LAN: its registration is answered
/// (by the edge), its 1002 request gets the full status with its own id,
/// and status deltas follow.
#[tokio::test]
async fn the_cc2_demo_serves_the_cc2_protocol_to_paho() {
    let tools = client_tools();
    let data_dir = std::env::temp_dir().join(format!(
        "relay-demo-cc2-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut demo = Demo::start_with(&data_dir, &["--printer", "cc2"]);
    demo.read_until("relay demo is ready.").await;
    demo.read_until("Ctrl-C stops everything").await;
    assert!(
        demo.said.contains("Elegoo Centauri Carbon 2"),
        "{}",
        demo.said
    );
    assert!(
        demo.said.contains("elegoo/F01CC2000000001/api_status"),
        "{}",
        demo.said
    );
    let python = tools.join("venv/bin/python");
    let lines = first_lines(
        &python,
        &[&data_dir.join("subscribe.py")],
        &data_dir,
        &[],
        3,
    )
    .await;
    assert!(
        lines[0].contains("_req/register_response") && lines[0].contains(r#""error":"ok""#),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("/api_response") && lines[1].contains(r#""id":1"#),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("elegoo/F01CC2000000001/api_status"),
        "{lines:?}"
    );
    let said = demo.interrupt().await;
    assert!(said.contains("relay demo: stopped"), "{said}");
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// `relay demo --tunnel tcp`: the agent reaches the edge over TLS on TCP,
/// and paho (the printed snippet) receives the printer's reports.
#[tokio::test]
async fn the_demo_over_the_tcp_tunnel_serves_paho() {
    let tools = client_tools();
    let data_dir = std::env::temp_dir().join(format!(
        "relay-demo-tcp-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut demo = Demo::start_with(&data_dir, &["--tunnel", "tcp"]);
    demo.read_until("relay demo is ready.").await;
    demo.read_until("Ctrl-C stops everything").await;
    assert!(
        demo.said.contains("[5/5] agent: connected over tcp"),
        "{}",
        demo.said
    );
    let python = tools.join("venv/bin/python");
    let line = first_line(&python, &[&data_dir.join("subscribe.py")], &data_dir).await;
    assert!(line.starts_with(REPORT_TOPIC), "paho printed {line:?}");
    let said = demo.interrupt().await;
    assert!(said.contains("relay demo: stopped"), "{said}");
    let _ = std::fs::remove_dir_all(&data_dir);
}
