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
/// The simulated CC2's serial and access code (demo values).
const CC2_SERIAL: &str = "F01CC2000000001";
const CC2_ACCESS_CODE: &str = "123456";

/// Which printer the demo simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoPrinter {
    /// A Bambu Lab printer: mqtts, `device/<serial>/report`.
    Bambu,
    /// An Elegoo Centauri Carbon 2: plain MQTT, `elegoo/<serial>/…`, a
    /// registration per app (answered by the edge).
    Cc2,
}

/// How the demo's agent reaches its edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoTunnel {
    /// QUIC, as agents do where UDP passes.
    Quic,
    /// TLS over TCP (yamux streams), as where UDP is blocked.
    Tcp,
}

impl DemoTunnel {
    fn name(self) -> &'static str {
        match self {
            DemoTunnel::Quic => "quic",
            DemoTunnel::Tcp => "tcp",
        }
    }
}

/// What the demo runs: which printer, which tunnel.
#[derive(Debug, Clone, Copy)]
pub struct DemoSetup {
    pub printer: DemoPrinter,
    pub tunnel: DemoTunnel,
    /// The mqtts port on 127.0.0.1 (0: any free port; a taken one falls
    /// back to a free one), for apps without WebSocket.
    pub mqtts_port: u16,
}
const STATE_FILE: &str = "demo.json";

/// What a second run needs to find again: ids and the secrets the demo
/// created (the store keeps only digests).
#[derive(Debug, Clone, Serialize, Deserialize)]
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

pub async fn run(data_dir: &Path, port: u16, edges: u16, setup: DemoSetup) -> anyhow::Result<()> {
    let printer = setup.printer;
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
            "store: {} ({})",
            dir.join("relay.db").display(),
            if reused {
                "tenant, device, key and agent credential reused"
            } else {
                "tenant, device and key created; the agent pairs by a code below"
            }
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

    if edges > 1 {
        return run_several(
            &dir,
            port,
            edges,
            &database_url,
            &state,
            &certificates,
            setup,
        )
        .await;
    }
    let mut config = EdgeConfig::defaults();
    config.public.listen = Some(free_or_any(port));
    config.public.mqtts_listen = Some(free_or_any(setup.mqtts_port));
    config.public.base_domain = "localhost".into();
    config.public.device_in_path = true;
    config.public.tls_cert = Some(certificates.server_cert.clone());
    config.public.tls_key = Some(certificates.server_key.clone());
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.store.database_url = database_url.clone().into();
    config.store.migrate = true;
    config.tunnel.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    // The tunnel over TCP on the same port, for `--tunnel tcp`.
    config.tunnel.tcp_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let edge = RunningEdge::start(config)
        .await
        .map_err(|error| anyhow::anyhow!("the edge did not start: {error}"))?;
    let (Some(public), Some(tunnel), Some(mqtts)) =
        (edge.public_addr, edge.tunnel_addr, edge.mqtts_addr)
    else {
        bail!("the edge started without its listeners");
    };
    step(
        3,
        &format!(
            "edge: wss on {public}, mqtts on {mqtts}, agents on udp {tunnel} and tcp {}, metrics on http://{}/metrics",
            edge.tunnel_tcp_addr
                .map_or_else(|| "-".to_owned(), |tcp| tcp.to_string()),
            edge.admin_addr
        ),
    );

    let simulator = start_simulator(&dir, printer).await?;
    let state = if state.agent_credential.is_empty() {
        pair_agent(&dir, state, public.port(), &certificates, &database_url).await?
    } else {
        state
    };
    let (stop_agent, agent) =
        start_agent(&dir, &[tunnel], &state, &certificates, &simulator, setup)?;
    tokio::time::timeout(Duration::from_secs(20), edge.wait_online(&state.device))
        .await
        .context("the agent did not reach the edge within 20 s (RELAY_LOG=info shows why)")?;
    step(
        5,
        &format!(
            "agent: connected over {}, device {}",
            setup.tunnel.name(),
            state.device
        ),
    );

    let mut snippets = Snippets::new(&state, public.port(), &certificates.ca, printer);
    snippets.add_mqtts(&state, mqtts.port(), printer);
    snippets.write(&dir)?;
    println!("{}", snippets.banner(&dir));
    println!(
        "{}",
        tenant_api_banner(&database_url, &state, public.port()).await?
    );

    relay_io::shutdown_signal().await;
    println!("relay demo: stopping");
    stop_agent.cancel();
    let _ = agent.await;
    edge.drain(Duration::from_secs(2)).await;
    simulator.stop().await;
    println!("relay demo: stopped");
    Ok(())
}

async fn start_simulator(dir: &Path, printer: DemoPrinter) -> anyhow::Result<RunningSimulator> {
    let config = match printer {
        DemoPrinter::Bambu => SimulatorConfig::new(SERIAL, ACCESS_CODE),
        DemoPrinter::Cc2 => SimulatorConfig::elegoo_cc2(CC2_SERIAL, CC2_ACCESS_CODE),
    };
    let simulator = RunningSimulator::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("the printer simulator did not start")?;
    write_private(&dir.join("printer-ca.pem"), &simulator.ca_pem)?;
    let what = match printer {
        DemoPrinter::Bambu => format!("Bambu-like broker, serial {SERIAL}, mqtts"),
        DemoPrinter::Cc2 => format!(
            "Elegoo Centauri Carbon 2, serial {CC2_SERIAL}, mqtt (four registrations at most)"
        ),
    };
    step(
        4,
        &format!("printer simulator: {what} on {}", simulator.addr),
    );
    Ok(simulator)
}

/// The agent, in this process, dialling `tunnels` in order.
fn start_agent(
    dir: &Path,
    tunnels: &[SocketAddr],
    state: &DemoState,
    certificates: &Certificates,
    simulator: &RunningSimulator,
    setup: DemoSetup,
) -> anyhow::Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let printer = setup.printer;
    let more: Vec<String> = tunnels[1..].iter().map(|t| format!("\"{t}\"")).collect();
    let printer_port = simulator.addr.port();
    let printer_section = match printer {
        DemoPrinter::Bambu => format!(
            "kind = \"bambu\"\nhost = \"127.0.0.1\"\nport = {printer_port}\nserial = \"{SERIAL}\"\n\
             access_code = \"{ACCESS_CODE}\"\nca_file = {:?}\n",
            dir.join("printer-ca.pem").display().to_string()
        ),
        DemoPrinter::Cc2 => format!(
            "kind = \"elegoo_cc2\"\nhost = \"127.0.0.1\"\nport = {printer_port}\nserial = \"{CC2_SERIAL}\"\n\
             access_code = \"{CC2_ACCESS_CODE}\"\n"
        ),
    };
    let agent_config = relay_agent::config::AgentConfig::from_toml(&format!(
        r#"
        [edge]
        address = "{tunnel}"
        addresses = [{more}]
        server_name = "localhost"
        ca_file = {ca:?}
        credential = "{credential}"
        transport = "{transport}"

        [printer]
{printer_section}
        "#,
        tunnel = tunnels[0],
        more = more.join(", "),
        ca = certificates.ca.display().to_string(),
        credential = state.agent_credential,
        transport = setup.tunnel.name(),
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
    Ok((stop_agent, agent))
}

/// One instance of `relay demo --edges N`, as its own process.
struct EdgeInstance {
    id: String,
    child: tokio::process::Child,
    /// Its stdin: when the demo goes, however it goes, the pipe closes and
    /// the instance stops.
    _lifeline: Option<tokio::process::ChildStdin>,
    public: SocketAddr,
    mqtts: SocketAddr,
    tunnel: SocketAddr,
}

/// What a demo edge process prints once it serves.
const EDGE_READY: &str = "relay demo edge: ready";

/// `relay demo --edges N`: N edge processes on the demo's SQLite store,
/// with peer links between them, and the agent on the first.
async fn run_several(
    dir: &Path,
    port: u16,
    edges: u16,
    database_url: &str,
    state: &DemoState,
    certificates: &Certificates,
    setup: DemoSetup,
) -> anyhow::Result<()> {
    let printer = setup.printer;
    let secret = relay_store::credential::random_base32(32)
        .map_err(|_| anyhow::anyhow!("no randomness for the cluster secret"))?;
    let mut instances = Vec::new();
    for number in 1..=edges {
        let id = format!("demo-edge-{number}");
        let listen = if number == 1 {
            free_or_any(port)
        } else {
            SocketAddr::from(([127, 0, 0, 1], 0))
        };
        let config = dir.join(format!("{id}.toml"));
        write_private(
            &config,
            &format!(
                r#"[public]
listen = "{listen}"
mqtts_listen = "127.0.0.1:0"
base_domain = "localhost"
device_in_path = true
tls_cert = {cert:?}
tls_key = {key:?}

[admin]
listen = "127.0.0.1:0"

[store]
database_url = {database_url:?}

[tunnel]
listen = "127.0.0.1:0"
tcp_listen = "127.0.0.1:0"

[cluster]
instance_id = "{id}"
peer_listen = "127.0.0.1:0"
secret = "{secret}"
"#,
                cert = certificates.server_cert.display().to_string(),
                key = certificates.server_key.display().to_string(),
            ),
        )?;
        instances.push(spawn_edge(&id, &config).await?);
    }
    step(
        3,
        &format!("edges: {edges} instances, each its own process, sharing the store"),
    );
    for instance in &instances {
        println!(
            "      {}  pid {:<7}  wss://127.0.0.1:{}/d/{}/mqtt  mqtts://127.0.0.1:{}",
            instance.id,
            instance.child.id().unwrap_or(0),
            instance.public.port(),
            state.device,
            instance.mqtts.port(),
        );
    }
    let simulator = start_simulator(dir, printer).await?;
    let tunnels: Vec<SocketAddr> = instances.iter().map(|i| i.tunnel).collect();
    let paired;
    let state = if state.agent_credential.is_empty() {
        let first = instances[0].public.port();
        paired = pair_agent(dir, state.clone(), first, certificates, database_url).await?;
        &paired
    } else {
        state
    };
    // The shipped keep-alive: a killed instance is noticed when what the
    // agent sends goes unanswered, within seconds.
    let (stop_agent, agent) = start_agent(dir, &tunnels, state, certificates, &simulator, setup)?;
    let store = Store::connect(database_url).await?;
    let holder = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Some(claim)) = store.device_claim(&state.device).await
                && claim.is_live(store.now())
            {
                return claim.instance_id;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .context("the agent did not reach an edge within 20 s (RELAY_LOG=info shows why)")?;
    step(
        5,
        &format!(
            "agent: connected, device {} (its tunnel is on {holder}{})",
            state.device,
            pid_of(&instances, &holder)
        ),
    );
    let snippets = Snippets::new(state, instances[0].public.port(), &certificates.ca, printer);
    snippets.write(dir)?;
    println!("{}", snippets.banner(dir));
    println!(
        "{}",
        tenant_api_banner(database_url, state, instances[0].public.port()).await?
    );
    println!(
        "\nThe other instances serve the same device (the URLs above). Kill the one\nthat holds the agent's tunnel (kill -9 <pid>): the agent moves, and the\nclients on the other instances resume."
    );

    // Report what happens until Ctrl-C: instances that exit, and the
    // agent's moves (the store is polled; SQLite has no NOTIFY).
    let mut holder = holder;
    let mut watch = tokio::time::interval(Duration::from_millis(500));
    let shutdown = relay_io::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = watch.tick() => {
                for instance in &mut instances {
                    if let Ok(Some(status)) = instance.child.try_wait() {
                        println!("relay demo: {} exited ({status})", instance.id);
                        instance.id = format!("{} (gone)", instance.id);
                    }
                }
                if let Ok(Some(claim)) = store.device_claim(&state.device).await
                    && claim.is_live(store.now())
                    && claim.instance_id != holder
                {
                    holder = claim.instance_id;
                    println!(
                        "relay demo: the agent moved to {holder}{}",
                        pid_of(&instances, &holder)
                    );
                }
            }
        }
    }
    println!("relay demo: stopping");
    stop_agent.cancel();
    let _ = agent.await;
    for instance in &mut instances {
        if let Some(pid) = instance.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
    }
    for instance in &mut instances {
        let _ = tokio::time::timeout(Duration::from_secs(10), instance.child.wait()).await;
    }
    store.close().await;
    simulator.stop().await;
    println!("relay demo: stopped");
    Ok(())
}

fn pid_of(instances: &[EdgeInstance], id: &str) -> String {
    instances
        .iter()
        .find(|instance| instance.id == id)
        .and_then(|instance| instance.child.id())
        .map(|pid| format!(", pid {pid}"))
        .unwrap_or_default()
}

/// Starts `relay demo-edge --config <config>` and waits for its ready line.
async fn spawn_edge(id: &str, config: &Path) -> anyhow::Result<EdgeInstance> {
    use tokio::io::AsyncBufReadExt;
    let program = std::env::current_exe().context("cannot find the relay binary")?;
    let mut child = tokio::process::Command::new(program)
        .arg("demo-edge")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start an edge process")?;
    let stdout = child.stdout.take().context("no edge output")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(EDGE_READY) {
                return Some(rest.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .with_context(|| format!("{id} did not start"))?;
    // The rest of its output is not needed; keep the pipe drained.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let address = |name: &str| -> anyhow::Result<SocketAddr> {
        ready
            .split_whitespace()
            .find_map(|part| part.strip_prefix(name))
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("{id} did not say its {name}"))
    };
    let lifeline = child.stdin.take();
    Ok(EdgeInstance {
        id: id.to_owned(),
        _lifeline: lifeline,
        child,
        public: address("public=")?,
        mqtts: address("mqtts=")?,
        tunnel: address("tunnel=")?,
    })
}

/// `relay demo-edge`: one edge instance from a configuration file, until
/// A fresh one-use login link to the tenant API for the demo's tenant, and
/// what to do with it.
async fn tenant_api_banner(
    database_url: &str,
    state: &DemoState,
    port: u16,
) -> anyhow::Result<String> {
    let store = Store::connect(database_url).await?;
    let (link, _) = store
        .create_login_link(&state.tenant, relay_store::admin::LOGIN_LINK_MAX_MILLIS)
        .await?;
    store.close().await;
    Ok(format!(
        "
Your devices, keys and their status (the tenant API): open this login link
once within 15 minutes, then https://localhost:{port}/api/v1/devices
  login  https://localhost:{port}/login/{}
(the device's status says online: true while the demo's agent is connected)",
        link.reveal()
    ))
}

/// A new demo's agent has no credential: it pairs by a code, as
/// `relay-agent setup --pair` does, and the demo approves the code as the
/// device's owner through the tenant API. The credential goes into the
/// demo's state file.
async fn pair_agent(
    dir: &Path,
    mut state: DemoState,
    port: u16,
    certificates: &Certificates,
    database_url: &str,
) -> anyhow::Result<DemoState> {
    use relay_agent::pairing;
    let server = pairing::PairingServer {
        host: "localhost".into(),
        port,
        connect: Some(format!("127.0.0.1:{port}")),
    };
    let tls = pairing::tls_config(&certificates.ca)?;
    let started = pairing::start(&server, &tls).await?;
    println!(
        "      agent: no credential yet: it asked to pair and shows the code {} (for {})",
        started.user_code, started.verification_uri_complete
    );
    let store = Store::connect(database_url).await?;
    let (_, token) = store
        .create_admin_token(&state.tenant, "demo pairing")
        .await?;
    store.close().await;
    let approval = serde_json::json!({ "code": started.user_code, "device_id": state.device });
    let (status, answer) = server
        .request(
            &tls,
            "/api/v1/pairings/approve",
            "application/json",
            &format!("Authorization: Bearer {}\r\n", token.reveal()),
            &approval.to_string(),
        )
        .await?;
    if status != 200 {
        bail!("the tenant API did not approve the pairing ({status}): {answer}");
    }
    println!(
        "      owner: approved the code through the tenant API (POST /api/v1/pairings/approve) for device {}",
        state.device
    );
    let paired = pairing::wait(&server, &tls, &started, &mut |text| {
        println!("      {text}")
    })
    .await?;
    println!(
        "      agent: paired at its next poll, as device {}; its credential is in {}",
        paired.device_id,
        dir.join(STATE_FILE).display()
    );
    state.agent_credential = paired.credential;
    write_private(
        &dir.join(STATE_FILE),
        &serde_json::to_string_pretty(&state)?,
    )?;
    Ok(state)
}

/// SIGTERM or Ctrl-C; says where it listens once it serves.
pub async fn run_edge_process(config: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let config = EdgeConfig::from_toml(&text).map_err(|problems| anyhow::anyhow!("{problems}"))?;
    let edge = RunningEdge::start(config)
        .await
        .map_err(|error| anyhow::anyhow!("the edge did not start: {error}"))?;
    let (Some(public), Some(mqtts), Some(tunnel)) =
        (edge.public_addr, edge.mqtts_addr, edge.tunnel_addr)
    else {
        bail!("the edge started without its listeners");
    };
    println!(
        "{EDGE_READY} public={public} mqtts={mqtts} tunnel={tunnel} admin={}",
        edge.admin_addr
    );
    // Until a signal, or the demo's end (its end of stdin closes).
    let orphaned = async {
        use tokio::io::AsyncReadExt;
        let mut stdin = tokio::io::stdin();
        let mut byte = [0u8; 1];
        while matches!(stdin.read(&mut byte).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        () = relay_io::shutdown_signal() => {}
        () = orphaned => {}
    }
    edge.drain(Duration::from_secs(2)).await;
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
    // The agent pairs by a code once the edge runs ([`pair_agent`]).
    let state = DemoState {
        tenant: tenant.id,
        device: device.id,
        key: key.reveal(),
        agent_credential: String::new(),
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
    /// What the banner says about the printer's other topics.
    topics_note: String,
    mqttjs: String,
    python: String,
    /// For apps without WebSocket: a `mosquitto_sub` line, a paho TCP
    /// script, and Home Assistant's Bambu Lab integration's settings.
    mqtts: Option<MqttsSnippets>,
}

struct MqttsSnippets {
    mosquitto_sub: String,
    python: String,
    home_assistant: String,
}

impl Snippets {
    fn new(state: &DemoState, port: u16, ca: &Path, printer: DemoPrinter) -> Snippets {
        let path = format!("/d/{}/mqtt", state.device);
        let ca = ca.display().to_string();
        let topic = match printer {
            DemoPrinter::Bambu => format!("device/{SERIAL}/report"),
            DemoPrinter::Cc2 => format!("elegoo/{CC2_SERIAL}/api_status"),
        };
        let topics_note = match printer {
            DemoPrinter::Bambu => format!("(requests: device/{SERIAL}/request)"),
            DemoPrinter::Cc2 => format!(
                "(register on elegoo/{CC2_SERIAL}/api_register; requests on elegoo/{CC2_SERIAL}/<client id>/api_request,\n         \
                 answers on …/<client id>/api_response: each app with a client id of its own)"
            ),
        };
        let mqttjs = format!(
            "npx --yes mqtt@5 sub -l wss -h 127.0.0.1 -p {port} --path {path} --ca {ca} -u demo -P {key} -t {topic} -v",
            key = state.key,
        );
        let python = match printer {
            DemoPrinter::Bambu => Self::bambu_python(state, port, &path, &ca, &topic),
            DemoPrinter::Cc2 => Self::cc2_python(state, port, &path, &ca),
        };
        Snippets {
            url: format!("wss://127.0.0.1:{port}{path}"),
            host_url: format!("wss://{}.localhost:{port}/mqtt", state.device),
            key: state.key.clone(),
            ca,
            topic,
            topics_note,
            mqttjs,
            python,
            mqtts: None,
        }
    }

    /// The mqtts listener's snippets. The demo's key is bound to its
    /// device, so a client that dials the address (no SNI) reaches it.
    fn add_mqtts(&mut self, state: &DemoState, port: u16, printer: DemoPrinter) {
        let (ca, key, topic) = (&self.ca, &state.key, &self.topic);
        let mosquitto_sub = format!(
            "mosquitto_sub -h 127.0.0.1 -p {port} --cafile {ca} -u bblp -P {key} -t {topic} -v"
        );
        let python = format!(
            r#"import paho.mqtt.client as mqtt  # pip install "paho-mqtt>=2"

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # MQTT over TLS, no WebSocket
client.username_pw_set("bblp", "{key}")
client.tls_set(ca_certs="{ca}")
client.on_connect = lambda c, userdata, flags, code, properties: c.subscribe("{topic}")
client.on_message = lambda c, userdata, message: print(message.topic, message.payload[:60], flush=True)
client.connect("127.0.0.1", {port})
client.loop_forever()
"#
        );
        let home_assistant = match printer {
            DemoPrinter::Bambu => [
                format!(
                    "host          this machine's name or address (the integration dials port 8883{port_note})",
                    port_note = if port == 8883 {
                        String::new()
                    } else {
                        format!("; this demo's mqtts is on {port}, so start it with --mqtts-port 8883")
                    },
                ),
                format!("serial        {SERIAL}"),
                format!("access code   {key}"),
                format!("CA            {ca} (only for this demo's own certificate: add it to the Home"),
                "              Assistant host's trusted CAs; with a real certificate, nothing)".to_owned(),
            ]
            .join("\n    "),
            DemoPrinter::Cc2 => "the Bambu Lab integration is for Bambu printers; a CC2 app uses the URL above".into(),
        };
        self.mqtts = Some(MqttsSnippets {
            mosquitto_sub,
            python,
            home_assistant,
        });
    }

    /// paho-mqtt as a CC2 app on the LAN: subscribe to its answers,
    /// register with its own client id, ask for the full status (1002),
    /// then follow the status.
    fn cc2_python(state: &DemoState, port: u16, path: &str, ca: &str) -> String {
        format!(
            r#"import json, random
import paho.mqtt.client as mqtt  # pip install "paho-mqtt>=2"

SN = "{CC2_SERIAL}"
CID = "demo-app-%04d" % random.randrange(10000)  # any client id of the app's own
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, transport="websockets")
client.ws_set_options(path="{path}", headers={{"Authorization": "Bearer {key}"}})
client.tls_set(ca_certs="{ca}")

def on_connect(c, userdata, flags, code, properties):
    c.subscribe([(f"elegoo/{{SN}}/{{CID}}_req/register_response", 0), (f"elegoo/{{SN}}/{{CID}}/api_response", 0)])

def on_subscribe(c, userdata, mid, codes, properties):
    if mid == 1:
        c.publish(f"elegoo/{{SN}}/api_register", json.dumps({{"client_id": CID, "request_id": CID + "_req"}}))

def on_message(c, userdata, message):
    print(message.topic, message.payload[:80].decode(), flush=True)
    if message.topic.endswith("/register_response"):
        c.publish(f"elegoo/{{SN}}/{{CID}}/api_request", json.dumps({{"id": 1, "method": 1002, "params": {{}}}}))
    elif message.topic.endswith("/api_response"):
        c.subscribe(f"elegoo/{{SN}}/api_status")

client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
client.connect("127.0.0.1", {port})
client.loop_forever()
"#,
            key = state.key,
        )
    }

    fn bambu_python(state: &DemoState, port: u16, path: &str, ca: &str, topic: &str) -> String {
        format!(
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
        )
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        write_private(
            &dir.join("subscribe-mqttjs.sh"),
            &format!("#!/bin/sh\nexec {}\n", self.mqttjs),
        )?;
        write_private(&dir.join("subscribe.py"), &self.python)?;
        if let Some(mqtts) = &self.mqtts {
            write_private(
                &dir.join("subscribe-mqtts.sh"),
                &format!("#!/bin/sh\nexec {}\n", mqtts.mosquitto_sub),
            )?;
            write_private(&dir.join("subscribe-mqtts.py"), &mqtts.python)?;
        }
        Ok(())
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
  topic  {topic}   {topics_note}

Subscribe with MQTT.js's CLI (Node 18+):
    {mqttjs}

or with Python's paho-mqtt 2.x:
{python}

(both are also in {dir}/subscribe-mqttjs.sh and {dir}/subscribe.py)
{mqtts}
Ctrl-C stops everything; the next run reuses {dir}.",
            url = self.url,
            host_url = self.host_url,
            key = self.key,
            ca = self.ca,
            topic = self.topic,
            topics_note = self.topics_note,
            mqttjs = self.mqttjs,
            dir = dir.display(),
            mqtts = self
                .mqtts
                .as_ref()
                .map_or_else(String::new, |mqtts| format!(
                    "
Apps without WebSocket (MQTT over TLS, mqtts):
    {mosquitto_sub}
  paho-mqtt over TCP: {dir}/subscribe-mqtts.py (and {dir}/subscribe-mqtts.sh)

Home Assistant (Bambu Lab integration):
    {home_assistant}
",
                    mosquitto_sub = mqtts.mosquitto_sub,
                    dir = dir.display(),
                    home_assistant = mqtts.home_assistant,
                )),
        )
    }
}
