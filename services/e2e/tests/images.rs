//! The images operators run (built by `scripts/build-images`), run as the
//! production Kubernetes overlay runs them. Everything a pod gets is read
//! from the overlay's rendering (`kubectl kustomize`, as
//! `scripts/validate-kubernetes` renders it), not from a copy: the user,
//! the read-only root, the dropped capabilities, the ConfigMap's
//! `edge.toml` at the Deployment's path, the certificate Secret's mount,
//! the environment (Secrets, the downward API's pod name and IP, and
//! `$(VAR)` references resolved as Kubernetes resolves them), the init
//! container's migration, the ports, the probes, the preStop sleep and the
//! termination grace.
//!
//! Each container gets its own IP on podman's bridge network, as a pod
//! does, so the ports are the manifest's. Two deliberate differences, both
//! stated where they happen: the ConfigMap's `base_domain` is set to the
//! test's domain (the edit the overlay asks operators to make), and the
//! host's Postgres and printer simulator are reached through the bridge's
//! gateway.
//!
//! Ignored by `cargo test`: `scripts/test-images` builds the images and
//! runs it, or says why it cannot.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use relay_store::testing::TestDatabase;
use relay_testkit::client_tools::{client_tools, run_python_client};
use relay_testkit::edge::{
    BASE_DOMAIN, Client, TestEdge, TestPki, connect_packet, http_get, provision,
};
use relay_testkit::processes::metric;
use relay_testkit::world::*;
use serde_json::Value;

/// How long a container may take to answer `/readyz`.
const READY_PATIENCE: Duration = Duration::from_secs(30);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is unset: run scripts/test-images"))
}

/// The production overlay's rendering: the edge's Deployment and the
/// ConfigMap it mounts.
struct Render {
    pod: Value,
    edge_toml: String,
}

impl Render {
    fn load() -> Render {
        let objects: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(env("RELAY_RENDERED")).unwrap()).unwrap();
        let deployment = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "relay-edge")
            .expect("the render has the Deployment relay-edge");
        let pod = deployment["spec"]["template"]["spec"].clone();
        let config_volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .expect("the pod has the volume config");
        let config_map = config_volume["configMap"]["name"].as_str().unwrap();
        let mount = Render::mount_of(&pod, "config");
        let sub_path = mount["subPath"]
            .as_str()
            .expect("config is mounted by subPath");
        let edge_toml = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == config_map)
            .unwrap_or_else(|| panic!("the render has the ConfigMap {config_map}"))["data"]
            [sub_path]
            .as_str()
            .unwrap_or_else(|| panic!("the ConfigMap {config_map} has {sub_path}"))
            .to_owned();
        Render { pod, edge_toml }
    }

    fn edge(&self) -> &Value {
        self.pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "edge")
            .expect("the pod has the container edge")
    }

    fn migrate(&self) -> &Value {
        self.pod["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "migrate")
            .expect("the pod has the init container migrate")
    }

    fn mount_of<'a>(pod: &'a Value, volume: &str) -> &'a Value {
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .unwrap_or_else(|| panic!("the edge container mounts {volume}"))
    }

    /// A named container port of the edge.
    fn port(&self, name: &str) -> u16 {
        self.edge()["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the edge container has no port named {name}"))
            ["containerPort"]
            .as_u64()
            .unwrap() as u16
    }

    /// A probe's path and port (a number, or a port's name).
    fn probe(&self, probe: &str) -> (String, u16) {
        let get = &self.edge()[probe]["httpGet"];
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => self.port(name),
            other => panic!("{probe}'s port is {other}"),
        };
        (get["path"].as_str().unwrap().to_owned(), port)
    }

    fn seconds(&self, value: &Value, what: &str) -> Duration {
        Duration::from_secs(value.as_u64().unwrap_or_else(|| panic!("{what} is unset")))
    }

    fn termination_grace(&self) -> Duration {
        self.seconds(
            &self.pod["terminationGracePeriodSeconds"],
            "terminationGracePeriodSeconds",
        )
    }

    fn pre_stop_sleep(&self) -> Duration {
        self.seconds(
            &self.edge()["lifecycle"]["preStop"]["sleep"]["seconds"],
            "the preStop sleep",
        )
    }
}

/// The podman command line for `container` of the render's pod, with
/// everything Kubernetes would give it.
struct PodContainer<'a> {
    pod: &'a Value,
    container: &'a Value,
    name: String,
    ip: IpAddr,
    secrets: &'a HashMap<(String, String), String>,
    /// Host paths for the pod's volumes, by volume name.
    volumes: &'a HashMap<String, PathBuf>,
}

impl PodContainer<'_> {
    /// The container's environment as the kubelet sets it: literal values
    /// with `$(VAR)` references to earlier variables resolved, Secrets,
    /// and the downward API's pod name and IP.
    fn environment(&self) -> Vec<(String, String)> {
        let mut resolved: Vec<(String, String)> = Vec::new();
        for variable in self.container["env"].as_array().into_iter().flatten() {
            let name = variable["name"].as_str().unwrap().to_owned();
            let value = if let Some(value) = variable["value"].as_str() {
                let mut value = value.to_owned();
                for (earlier, earlier_value) in &resolved {
                    value = value.replace(&format!("$({earlier})"), earlier_value);
                }
                value
            } else if let Some(secret) = variable["valueFrom"]["secretKeyRef"].as_object() {
                let key = (
                    secret["name"].as_str().unwrap().to_owned(),
                    secret["key"].as_str().unwrap().to_owned(),
                );
                self.secrets
                    .get(&key)
                    .unwrap_or_else(|| {
                        panic!("the render reads Secret {key:?}, unknown to the test")
                    })
                    .clone()
            } else if let Some(field) = variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => self.name.clone(),
                    "status.podIP" => self.ip.to_string(),
                    other => panic!("the render reads field {other}, unknown to the test"),
                }
            } else {
                panic!("the render sets {name} in a way unknown to the test: {variable}");
            };
            resolved.push((name, value));
        }
        resolved
    }

    fn command(&self, image: &str, detach: bool) -> Command {
        let mut podman = Command::new("podman");
        podman.args(["run", "--name", &self.name, "--network", "podman"]);
        podman.args(["--ip", &self.ip.to_string()]);
        if detach {
            podman.arg("--detach");
        }
        let pod_security = &self.pod["securityContext"];
        let security = &self.container["securityContext"];
        let user = security["runAsUser"]
            .as_u64()
            .or(pod_security["runAsUser"].as_u64())
            .expect("the pod sets runAsUser");
        let group = security["runAsGroup"]
            .as_u64()
            .or(pod_security["runAsGroup"].as_u64())
            .expect("the pod sets runAsGroup");
        assert_eq!(pod_security["runAsNonRoot"], true, "runAsNonRoot");
        podman.args(["--user", &format!("{user}:{group}")]);
        if security["readOnlyRootFilesystem"] == true {
            // Kubernetes adds no writable /tmp or /run; podman would.
            podman.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if security["allowPrivilegeEscalation"] == false {
            podman.args(["--security-opt", "no-new-privileges"]);
        }
        for dropped in security["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
        {
            podman.args(["--cap-drop", dropped.as_str().unwrap()]);
        }
        for (name, value) in self.environment() {
            podman.args(["--env", &format!("{name}={value}")]);
        }
        for mount in self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let volume = mount["name"].as_str().unwrap();
            let mut source = self.volumes[volume].clone();
            if let Some(sub_path) = mount["subPath"].as_str() {
                source = source.join(sub_path);
            }
            let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
            podman.args([
                "--volume",
                &format!(
                    "{}:{}{read_only}",
                    source.display(),
                    mount["mountPath"].as_str().unwrap()
                ),
            ]);
        }
        // Kubernetes' command replaces the image's ENTRYPOINT, its args
        // the CMD.
        if let Some(command) = self.container["command"].as_array() {
            podman.args(["--entrypoint", &serde_json::to_string(command).unwrap()]);
        }
        podman.arg(image);
        for argument in self.container["args"].as_array().into_iter().flatten() {
            podman.arg(argument.as_str().unwrap());
        }
        podman
    }
}

/// Containers this test started, removed when it ends however it ends.
struct Containers(Vec<String>);

impl Containers {
    async fn start(&mut self, name: &str, command: Command) {
        let output = self.launch(name, command).await;
        assert!(
            output.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs a container to its end; its exit code and output.
    async fn run(&mut self, name: &str, command: Command) -> (i32, String) {
        let output = self.launch(name, command).await;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code().unwrap_or(-1), printed)
    }

    /// Runs `podman run …` for `name` (a leftover of that name removed
    /// first) and remembers it for removal.
    async fn launch(&mut self, name: &str, command: Command) -> std::process::Output {
        let _ = Command::new("podman")
            .args(["rm", "--force", name])
            .output();
        self.0.push(name.to_owned());
        tokio::process::Command::from(command)
            .output()
            .await
            .unwrap()
    }

    fn logs(&self, name: &str) -> String {
        container_logs(name)
    }

    fn exit_code(&self, name: &str) -> i64 {
        let output = Command::new("podman")
            .args(["inspect", "--format", "{{.State.ExitCode}}", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("podman")
                .args(["rm", "--force", name])
                .output();
        }
    }
}

/// The gateway of podman's bridge network: where containers reach the host.
fn bridge_gateway() -> (IpAddr, u8) {
    let output = Command::new("podman")
        .args(["network", "inspect", "podman"])
        .output()
        .unwrap();
    let networks: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("podman network inspect podman: {output:?}"));
    let subnet = &networks[0]["subnets"][0];
    let prefix: u8 = subnet["subnet"]
        .as_str()
        .unwrap()
        .rsplit_once('/')
        .unwrap()
        .1
        .parse()
        .unwrap();
    (subnet["gateway"].as_str().unwrap().parse().unwrap(), prefix)
}

/// Addresses for this run's containers in a /16 bridge network, apart from
/// what podman hands out from the bottom.
fn container_ip(gateway: IpAddr, index: u8) -> IpAddr {
    let IpAddr::V4(gateway) = gateway else {
        panic!("podman's network is not IPv4")
    };
    let [a, b, _, _] = gateway.octets();
    let block = 100 + (std::process::id() % 100) as u8;
    IpAddr::from([a, b, block, 10 + index])
}

/// Forwards TCP connections from `listen` to `target`, as long as the test
/// runs: the containers reach the host's loopback-only Postgres this way.
async fn forward(target: SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// A status code, or none while nothing answers.
async fn try_get(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// Polls a probe as the kubelet does until it answers 200; the time taken.
async fn until_ok(addr: SocketAddr, path: &str, started: Instant) -> Duration {
    let deadline = started + READY_PATIENCE;
    while Instant::now() < deadline {
        if try_get(addr, path).await == Some(200) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} on {addr} did not answer 200 within {READY_PATIENCE:?}");
}

/// A folder the containers' nonroot user can read.
fn readable_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn readable_file(dir: &Path, name: &str, contents: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// paho-mqtt over wss: the device's hostname resolved to `ip` (as DNS
/// would point it at the Service), subscribe to the report, receive one.
const PAHO_WSS: &str = r#"
import json, socket, sys, threading
import paho.mqtt.client as mqtt

ip, port, host, ca, report, key = sys.argv[1:7]
resolve = socket.getaddrinfo
def to_the_pod(name, *rest, **kw):
    return resolve(ip if name == host else name, *rest, **kw)
socket.getaddrinfo = to_the_pod

seen = {"scenario": "wss"}
done = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-image", transport="websockets")
client.ws_set_options(path="/mqtt", headers={"Authorization": "Bearer " + key})
client.tls_set(ca_certs=ca)
def on_connect(c, userdata, flags, reason, properties):
    seen["connack"] = reason.value
    if reason.is_failure:
        done.set()
    else:
        c.subscribe(report, qos=0)
def on_message(c, userdata, message):
    seen["message"] = message.topic
    done.set()
client.on_connect, client.on_message = on_connect, on_message
client.connect(host, int(port))
client.loop_start()
seen["timed_out"] = not done.wait(30)
client.disconnect()
client.loop_stop()
print(json.dumps(seen), flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the images and podman: scripts/test-images"]
async fn the_images_run_as_the_production_overlay_runs_them() {
    let edge_image = env("RELAY_EDGE_IMAGE");
    let agent_image = env("RELAY_AGENT_IMAGE");
    let render = Render::load();
    let tools = client_tools();
    let mut containers = Containers(Vec::new());
    let run_id = std::process::id();
    let work = readable_dir(&std::env::temp_dir(), &format!("relay-images-{run_id}"));

    // Both images run as the nonroot user by themselves (docker run), and
    // the pod asks for the same one.
    for image in [&edge_image, &agent_image] {
        let output = Command::new("podman")
            .args(["image", "inspect", "--format", "{{.Config.User}}", image])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "65532:65532",
            "{image}'s USER"
        );
    }
    assert_eq!(render.pod["securityContext"]["runAsUser"], 65532);
    // relayctl by name, as `kubectl exec deploy/relay-edge -- relayctl`
    // runs it (the book's Kubernetes page).
    let output = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--read-only",
            "--entrypoint",
            "relayctl",
            &edge_image,
            "--help",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "relayctl by name in the edge's image: {output:?}"
    );

    // The init container and the edge run one image.
    assert_eq!(
        render.migrate()["image"],
        render.edge()["image"],
        "the migration runs from the edge's image"
    );

    // Postgres, empty, behind a forwarder on the bridge's gateway.
    let (gateway, prefix) = bridge_gateway();
    assert_eq!(prefix, 16, "the test places containers in a /16 bridge");
    let database = TestDatabase::postgres_unmigrated().await;
    let (_, rest) = database.url.split_once('@').unwrap();
    let (host_port, _) = rest.split_once('/').unwrap();
    let forwarded = forward(host_port.parse().unwrap()).await;
    let pod_database_url = database
        .url
        .replace(host_port, &format!("{gateway}:{forwarded}"));
    let secrets: HashMap<(String, String), String> = [
        (("relay-edge-database", "url"), pod_database_url),
        (
            ("relay-edge-cluster", "secret"),
            format!("images-test-cluster-secret-{run_id}-0123456789abcdef"),
        ),
    ]
    .into_iter()
    .map(|((secret, key), value)| ((secret.into(), key.into()), value))
    .collect();

    // The ConfigMap's edge.toml, with the operator's one edit: the domain.
    let example_domain = "base_domain = \"relay.example.com\"";
    assert!(
        render.edge_toml.contains(example_domain),
        "the production edge.toml sets {example_domain}"
    );
    let edge_toml = render
        .edge_toml
        .replace(example_domain, &format!("base_domain = \"{BASE_DOMAIN}\""));
    let config_dir = readable_dir(&work, "config");
    let sub_path = Render::mount_of(&render.pod, "config")["subPath"]
        .as_str()
        .unwrap();
    readable_file(&config_dir, sub_path, edge_toml.as_bytes());

    // The certificate Secret, with the file names edge.toml reads, mounted
    // where the Deployment mounts it.
    let pki = TestPki::new();
    let (cert, key, _) = pki.issue("server", &[&format!("*.{BASE_DOMAIN}")]);
    let tls_mount = Render::mount_of(&render.pod, "tls")["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let parsed: toml::Value = toml::from_str(&edge_toml).unwrap();
    let tls_dir = readable_dir(&work, "tls");
    for (setting, file) in [("tls_cert", &cert), ("tls_key", &key)] {
        let path = Path::new(parsed["public"][setting].as_str().unwrap());
        assert_eq!(
            path.parent().unwrap(),
            Path::new(&tls_mount),
            "edge.toml's {setting} is in the Secret's mount {tls_mount}"
        );
        readable_file(
            &tls_dir,
            path.file_name().unwrap().to_str().unwrap(),
            &std::fs::read(file).unwrap(),
        );
    }
    let volumes: HashMap<String, PathBuf> = [
        ("config".to_owned(), config_dir),
        ("tls".to_owned(), tls_dir),
    ]
    .into();

    let pod = |index: u8| PodContainer {
        pod: &render.pod,
        container: render.edge(),
        name: format!("relay-edge-images-{run_id}-{index}"),
        ip: container_ip(gateway, index),
        secrets: &secrets,
        volumes: &volumes,
    };

    // The init container migrates the empty database.
    let migrate = PodContainer {
        container: render.migrate(),
        name: format!("relay-edge-images-{run_id}-migrate"),
        ..pod(9)
    };
    let (code, printed) = containers
        .run(&migrate.name.clone(), migrate.command(&edge_image, false))
        .await;
    assert_eq!(code, 0, "relayctl migrate in the image: {printed}");

    // A tenant, a device, a key and an agent credential in the migrated
    // database.
    let (tenant, device, key) = provision(&database.store, "images").await;
    let (_, agent_credential) = database
        .store
        .issue_agent_credential(&device)
        .await
        .unwrap();

    // Two edge pods.
    let (probe_path, probe_port) = render.probe("readinessProbe");
    let (startup_path, startup_port) = render.probe("startupProbe");
    let (liveness_path, liveness_port) = render.probe("livenessProbe");
    let mut ready_after = Vec::new();
    for index in [0, 1] {
        let edge = pod(index);
        let started = Instant::now();
        containers
            .start(&edge.name.clone(), edge.command(&edge_image, true))
            .await;
        let startup = until_ok(
            SocketAddr::new(edge.ip, startup_port),
            &startup_path,
            started,
        )
        .await;
        let ready = until_ok(SocketAddr::new(edge.ip, probe_port), &probe_path, started).await;
        let live = try_get(SocketAddr::new(edge.ip, liveness_port), &liveness_path).await;
        assert_eq!(live, Some(200), "{liveness_path} on {}", edge.name);
        println!(
            "images: {} answers {startup_path} after {} ms and {probe_path} after {} ms",
            edge.name,
            startup.as_millis(),
            ready.as_millis()
        );
        ready_after.push(ready);
    }
    let (owner, other) = (pod(0), pod(1));

    // The agent's image, its config mounted read-only, dialling the first
    // pod (the second after it).
    let simulator = {
        let mut config = SimulatorConfig::new(SERIAL, ACCESS_CODE);
        config.report_interval = Duration::from_millis(50);
        RunningSimulator::start(config, "0.0.0.0:0".parse().unwrap())
            .await
            .unwrap()
    };
    let tunnel = render.port("tunnel");
    assert_eq!(render.port("tunnel-tcp"), tunnel, "the tunnel's TCP port");
    let agent_dir = readable_dir(&work, "agent");
    readable_file(&agent_dir, "edge-ca.pem", pki.ca_pem().as_bytes());
    readable_file(&agent_dir, "printer-ca.pem", simulator.ca_pem.as_bytes());
    readable_file(
        &agent_dir,
        "agent.toml",
        format!(
            r#"
            [edge]
            address = "{}:{tunnel}"
            addresses = ["{}:{tunnel}"]
            server_name = "tunnel.{BASE_DOMAIN}"
            ca_file = "/etc/relay/edge-ca.pem"
            credential = "{}"
            transport = "{}"

            [printer]
            kind = "bambu"
            host = "{gateway}"
            port = {}
            serial = "{SERIAL}"
            access_code = "{ACCESS_CODE}"
            ca_file = "/etc/relay/printer-ca.pem"
            "#,
            owner.ip,
            other.ip,
            agent_credential.reveal(),
            test_transport(),
            simulator.addr.port(),
        )
        .as_bytes(),
    );
    let agent_name = format!("relay-agent-images-{run_id}");
    let mut agent = Command::new("podman");
    agent.args([
        "run",
        "--detach",
        "--name",
        &agent_name,
        "--network",
        "podman",
    ]);
    agent.args([
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
    ]);
    agent.args(["--security-opt", "no-new-privileges"]);
    agent.args([
        "--volume",
        &format!("{}:/etc/relay:ro", agent_dir.display()),
    ]);
    agent.arg(&agent_image);
    containers.start(&agent_name, agent).await;

    // Clients on both pods: the device's hub is on the pod that holds the
    // agent's tunnel, the other reaches it over the peer link with the
    // cluster secret.
    let mut client_edge = TestEdge {
        edge: None,
        pki,
        database,
        tenant,
        device: device.clone(),
        key,
        addr: SocketAddr::new(owner.ip, render.port("wss")),
        admin: SocketAddr::new(owner.ip, probe_port),
        config: relay_edge::EdgeConfig::defaults(),
    };
    // The agent's container is up once the owner counts it.
    agent_connected(
        SocketAddr::new(owner.ip, render.port("admin")),
        &owner.name,
        &agent_name,
    )
    .await;
    let mut on_owner = Client::connect(
        &client_edge,
        &client_edge.bearer(),
        connect_packet("on-owner"),
    )
    .await;
    on_owner.send(&subscribe_report(1)).await;
    wait_for_report(&mut on_owner).await;
    client_edge.addr = SocketAddr::new(other.ip, render.port("wss"));
    let mut on_other = Client::connect(
        &client_edge,
        &client_edge.bearer(),
        connect_packet("on-other"),
    )
    .await;
    on_other.send(&subscribe_report(1)).await;
    wait_for_report(&mut on_other).await;

    // paho over wss, on the other pod.
    let ca = work.join("edge-ca.pem");
    std::fs::write(&ca, client_edge.pki.ca_pem()).unwrap();
    let script = work.join("paho-wss.py");
    std::fs::write(&script, PAHO_WSS).unwrap();
    let (seen, context) = run_python_client(
        &tools,
        &script,
        &[
            other.ip.to_string(),
            render.port("wss").to_string(),
            client_edge.host(),
            ca.display().to_string(),
            report_topic(),
            client_edge.key.0.clone(),
        ],
        PATIENCE * 8,
    )
    .await;
    assert_eq!(seen["wss"]["connack"], 0, "{context}");
    assert_eq!(seen["wss"]["message"], report_topic(), "{context}");

    // Kubernetes' termination: the preStop sleep (the pod leaves the
    // Service first; not replayed here), then SIGTERM, then SIGKILL once
    // the grace is spent. The edge must be gone before that.
    let grace = render.termination_grace() - render.pre_stop_sleep();
    let draining = Instant::now();
    let stop = tokio::process::Command::new("podman")
        .args(["stop", "--time", &grace.as_secs().to_string(), &owner.name])
        .output();
    let (closed, stopped) = tokio::join!(on_owner.closed(), stop);
    let drained_in = draining.elapsed();
    assert!(stopped.unwrap().status.success(), "podman stop");
    let owner_logs = containers.logs(&owner.name);
    assert_eq!(
        containers.exit_code(&owner.name),
        0,
        "the edge exited by itself, before SIGKILL: {owner_logs}"
    );
    assert!(drained_in < grace, "drained in {drained_in:?}");
    assert_eq!(
        closed.map(|(code, _)| code),
        Some(1001),
        "a client on the draining pod is told 1001 (going away)"
    );
    // The edge logs JSON, as RELAY_LOG_JSON asks.
    assert!(
        owner_logs.contains("edge started"),
        "the edge's log: {owner_logs}"
    );
    for line in owner_logs.lines().filter(|line| !line.trim().is_empty()) {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "a log line is not JSON: {line}"
        );
    }
    // The agent was told GO_AWAY and moved to the other pod, where the
    // client kept its session.
    let moved = Instant::now();
    agent_connected(
        SocketAddr::new(other.ip, render.port("admin")),
        &other.name,
        &agent_name,
    )
    .await;
    wait_for_report(&mut on_other).await;
    let agent_logs = containers.logs(&agent_name);
    assert!(
        agent_logs.contains("the edge asked to reconnect"),
        "the agent was told GO_AWAY: {agent_logs}"
    );
    println!(
        "images: {} drained in {} ms (SIGTERM to exit; grace {} s after the preStop sleep); \
         the client on {} received again {} ms after the drain",
        owner.name,
        drained_in.as_millis(),
        grace.as_secs(),
        other.name,
        moved.elapsed().as_millis()
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A container's output, both streams.
fn container_logs(name: &str) -> String {
    let output = Command::new("podman")
        .args(["logs", name])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Waits until the edge at `admin` counts the agent connected.
async fn agent_connected(admin: SocketAddr, edge: &str, agent: &str) {
    let since = Instant::now();
    while metric(
        &http_get(admin, "/metrics").await.1,
        "relay_edge_agents_connected",
    ) < 1.0
    {
        assert!(
            since.elapsed() < PATIENCE * 4,
            "the agent did not reach {edge}: {}",
            container_logs(agent)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until a report arrives (or the client's patience runs out).
async fn wait_for_report(client: &mut Client) {
    while next_publish(client).await.topic != report_topic() {}
}
