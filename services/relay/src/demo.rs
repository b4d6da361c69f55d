//! The local demo: everything in one process, on loopback, with its state
//! (SQLite database, CA and certificate, the demo's keys) in one directory
//! that later runs reuse.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use relay_edge::{EdgeConfig, RunningEdge};
use relay_printer_sim::{RunningSimulator, SimulatorConfig};
use relay_store::{NewApiKey, Scope, Store};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// The simulated printer's serial and LAN access code (demo values).
const SERIAL: &str = "01P00A000000001";
const ACCESS_CODE: &str = "12345678";
const STATE_FILE: &str = "demo.json";

/// What a second run needs to find again: ids and the secrets the demo
/// created (the store keeps only digests).
#[derive(Debug, Serialize, Deserialize)]
struct DemoState {
    tenant: String,
    device: String,
    /// The control key, `rly_…`.
    key: String,
    /// The agent's credential, `rla_…`.
    agent_credential: String,
}

fn step(number: u8, text: &str) {
    println!("[{number}/5] {text}");
}

pub async fn run(data_dir: &Path, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot open {}", data_dir.display()))?;
    println!("relay demo: data in {}", dir.display());

    let database_url = format!("sqlite:{}", dir.join("relay.db").display());
    let store = Store::connect(&database_url)
        .await
        .context("cannot open the demo database")?;
    store
        .migrate()
        .await
        .context("cannot migrate the demo database")?;
    let (state, reused) = demo_state(&store, &dir).await?;
    store.close().await;
    step(
        1,
        &format!(
            "store: {} (tenant, device, key and agent credential {})",
            dir.join("relay.db").display(),
            if reused { "reused" } else { "created" }
        ),
    );

    let certificates = Certificates::load_or_create(&dir, &state.device)?;
    step(
        2,
        &format!(
            "certificates: CA {} (server certificate for localhost, {}.localhost, *.localhost, 127.0.0.1, ::1)",
            certificates.ca.display(),
            state.device
        ),
    );

    let mut config = EdgeConfig::defaults();
    config.public.listen = Some(free_or_any(port));
    config.public.base_domain = "localhost".into();
    config.public.device_in_path = true;
    config.public.tls_cert = Some(certificates.server_cert.clone());
    config.public.tls_key = Some(certificates.server_key.clone());
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.store.database_url = database_url.into();
    config.store.migrate = true;
    config.tunnel.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let edge = RunningEdge::start(config)
        .await
        .map_err(|error| anyhow::anyhow!("the edge did not start: {error}"))?;
    let (Some(public), Some(tunnel)) = (edge.public_addr, edge.tunnel_addr) else {
        bail!("the edge started without its listeners");
    };
    step(
        3,
        &format!(
            "edge: wss on {public}, agents on udp {tunnel}, metrics on http://{}/metrics",
            edge.admin_addr
        ),
    );

    let simulator = RunningSimulator::start(
        SimulatorConfig::new(SERIAL, ACCESS_CODE),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .context("the printer simulator did not start")?;
    let printer_ca = dir.join("printer-ca.pem");
    write_private(&printer_ca, &simulator.ca_pem)?;
    step(
        4,
        &format!(
            "printer simulator: Bambu-like broker, serial {SERIAL}, mqtts on {}",
            simulator.addr
        ),
    );

    let agent_config = relay_agent::config::AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{tunnel}"
        server_name = "localhost"
        ca_file = {ca:?}
        credential = "{credential}"

        [printer]
        kind = "bambu"
        host = "127.0.0.1"
        port = {printer_port}
        serial = "{SERIAL}"
        access_code = "{ACCESS_CODE}"
        ca_file = {printer_ca:?}
        "#,
        ca = certificates.ca.display().to_string(),
        credential = state.agent_credential,
        printer_port = simulator.addr.port(),
        printer_ca = printer_ca.display().to_string(),
    ))
    .map_err(|problems| anyhow::anyhow!("agent configuration: {}", problems.join("; ")))?;
    let printer = agent_config
        .validate()
        .map_err(|problems| anyhow::anyhow!("agent configuration: {}", problems.join("; ")))?;
    let stop_agent = CancellationToken::new();
    let agent = tokio::spawn(relay_agent::tunnel::run(
        agent_config,
        printer,
        stop_agent.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(20), edge.wait_online(&state.device))
        .await
        .context("the agent did not reach the edge within 20 s (RELAY_LOG=info shows why)")?;
    step(5, &format!("agent: connected, device {}", state.device));

    let snippets = Snippets::new(&state, public.port(), &certificates.ca);
    snippets.write(&dir)?;
    println!("{}", snippets.banner(&dir));

    relay_io::shutdown_signal().await;
    println!("relay demo: stopping");
    stop_agent.cancel();
    let _ = agent.await;
    edge.drain(Duration::from_secs(2)).await;
    simulator.stop().await;
    println!("relay demo: stopped");
    Ok(())
}

/// The port asked for when it is free, else any free port.
fn free_or_any(port: u16) -> SocketAddr {
    let wanted = SocketAddr::from(([127, 0, 0, 1], port));
    if port != 0 && TcpListener::bind(wanted).is_err() {
        println!("relay demo: port {port} is taken; using a free port");
        return SocketAddr::from(([127, 0, 0, 1], 0));
    }
    wanted
}

/// Finds the previous run's tenant, device and keys, or makes new ones.
async fn demo_state(store: &Store, dir: &Path) -> anyhow::Result<(DemoState, bool)> {
    let path = dir.join(STATE_FILE);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(state) = serde_json::from_str::<DemoState>(&text)
        && store
            .device(&state.device)
            .await
            .is_ok_and(|device| device.deleted_at.is_none())
    {
        return Ok((state, true));
    }
    let tenant = match store.tenant("demo").await {
        Ok(tenant) => tenant,
        Err(_) => store.create_tenant("demo").await?,
    };
    let device = store.create_device(&tenant.id, "demo printer").await?;
    let (_, key) = store
        .create_api_key(NewApiKey {
            tenant_id: &tenant.id,
            device_id: Some(&device.id),
            scope: Scope::Control,
            label: "demo",
            expires_at: None,
        })
        .await?;
    let (_, agent_credential) = store.issue_agent_credential(&device.id).await?;
    let state = DemoState {
        tenant: tenant.id,
        device: device.id,
        key: key.reveal(),
        agent_credential: agent_credential.reveal(),
    };
    write_private(&path, &serde_json::to_string_pretty(&state)?)?;
    Ok((state, false))
}

/// Writes a file only its owner can read (it may hold a key).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The demo's CA and the edge's certificate, made once and kept.
struct Certificates {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Certificates {
    /// The server certificate names the device itself: Python, curl and
    /// Node refuse a `*.localhost` wildcard for `<device>.localhost`.
    fn load_or_create(dir: &Path, device: &str) -> anyhow::Result<Certificates> {
        let certificates = Certificates {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        let names = vec![
            "localhost".to_owned(),
            format!("{device}.localhost"),
            "*.localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        // What the kept certificate was made for; another device (or an
        // older demo's certificate) makes a new one.
        let names_file = dir.join("server.names");
        let kept_names = std::fs::read_to_string(&names_file).unwrap_or_default();
        if kept_names == names.join("\n")
            && [
                &certificates.ca,
                &certificates.server_cert,
                &certificates.server_key,
            ]
            .iter()
            .all(|path| path.is_file())
        {
            return Ok(certificates);
        }
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "relay demo CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let mut server_params = CertificateParams::new(names.clone())?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_key = KeyPair::generate()?;
        let server = server_params.signed_by(&server_key, &ca)?;
        write_private(&certificates.server_key, &server_key.serialize_pem())?;
        write_private(&certificates.server_cert, &server.pem())?;
        write_private(&certificates.ca, &ca.pem())?;
        write_private(&names_file, &names.join("\n"))?;
        Ok(certificates)
    }
}

/// Ready-to-run client commands, with this run's values filled in.
struct Snippets {
    url: String,
    host_url: String,
    key: String,
    ca: String,
    topic: String,
    mqttjs: String,
    python: String,
}

impl Snippets {
    fn new(state: &DemoState, port: u16, ca: &Path) -> Snippets {
        let path = format!("/d/{}/mqtt", state.device);
        let ca = ca.display().to_string();
        let topic = format!("device/{SERIAL}/report");
        let mqttjs = format!(
            "npx --yes mqtt@5 sub -l wss -h 127.0.0.1 -p {port} --path {path} --ca {ca} -u demo -P {key} -t {topic} -v",
            key = state.key,
        );
        let python = format!(
            r#"import paho.mqtt.client as mqtt  # pip install "paho-mqtt>=2"

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets")
client.ws_set_options(path="{path}", headers={{"Authorization": "Bearer {key}"}})
client.tls_set(ca_certs="{ca}")
client.on_connect = lambda c, userdata, flags, code, properties: c.subscribe("{topic}")
client.on_message = lambda c, userdata, message: print(message.topic, message.payload[:60], flush=True)
client.connect("127.0.0.1", {port})
client.loop_forever()
"#,
            key = state.key,
        );
        Snippets {
            url: format!("wss://127.0.0.1:{port}{path}"),
            host_url: format!("wss://{}.localhost:{port}/mqtt", state.device),
            key: state.key.clone(),
            ca,
            topic,
            mqttjs,
            python,
        }
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(
            &dir.join("subscribe-mqttjs.sh"),
            &format!("#!/bin/sh\nexec {}\n", self.mqttjs),
        )?;
        write_private(&dir.join("subscribe.py"), &self.python)
    }

    fn banner(&self, dir: &Path) -> String {
        let python = self
            .python
            .lines()
            .map(|line| format!("    {line}"))
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "
relay demo is ready.

  URL    {url}
         ({host_url} works too where *.localhost resolves; the certificate names it)
  key    {key}
         (Authorization: Bearer <key>, or as the MQTT password with any user name)
  CA     {ca}
  topic  {topic}   (requests: device/{SERIAL}/request)

Subscribe with MQTT.js's CLI (Node 18+):
    {mqttjs}

or with Python's paho-mqtt 2.x:
{python}

(both are also in {dir}/subscribe-mqttjs.sh and {dir}/subscribe.py)

Ctrl-C stops everything; the next run reuses {dir}.",
            url = self.url,
            host_url = self.host_url,
            key = self.key,
            ca = self.ca,
            topic = self.topic,
            mqttjs = self.mqttjs,
            dir = dir.display(),
        )
    }
}
