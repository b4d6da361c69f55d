//! The processes under test, started on loopback for one run: a Mosquitto
//! with a plain MQTT listener (the "printer" every path reads from) and a
//! WebSocket listener (the direct baseline), rathole's server and client in
//! front of that listener (the plain-tunnel baseline), and relay's edge and
//! agent as their own release binaries (so their memory can be read and the
//! edge restarted). State lives in a fresh Postgres database and the run's
//! directory.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use relay_store::testing::TestDatabase;
use relay_store::{NewApiKey, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;

use crate::client::{ByteCounter, MqttClient, Target, Wire};

/// The simulated printer's serial; its reports go to `device/<serial>/report`.
pub const SERIAL: &str = "01P00A000000042";
pub const BASE_DOMAIN: &str = "relay.test";
/// How long a process gets to come up.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// Where the binaries are: next to this one (one `cargo build`), unless
/// flags say otherwise.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub edge: PathBuf,
    pub agent: PathBuf,
    pub mosquitto: PathBuf,
    pub rathole: Option<PathBuf>,
    /// The edges' `[runtime] worker_threads`; `None`: the edge's default.
    pub edge_worker_threads: Option<usize>,
}

/// A port nobody listens on now (bound and released: the processes here
/// take their ports from configuration files, and the edge must get the
/// same ports back when it restarts).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Keys and loopback source addresses the clients are spread over: 10,000
/// clients are 625 per key and per address, under the edge's default caps
/// of 1,000.
pub const SPREAD: u8 = 16;

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Resident memory of a process, in bytes (`VmRSS` of /proc).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .context("no VmRSS in /proc/<pid>/status")
}

/// CPU time a process has used (user + system), from /proc/<pid>/stat.
/// The kernel memory of the established TCP sockets on local `port` (the
/// edge's side of its clients' connections), from `ss -tmn`: how many
/// there are, and the bytes they hold (receive queue, send queue, forward
/// allocation, option memory and backlog: `r`, `w`, `f`, `o`, `bl`; the
/// `rb`/`tb` limits are not memory).
pub fn socket_memory(port: u16) -> anyhow::Result<(usize, u64)> {
    let port = format!(":{port}");
    let output = std::process::Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            "(",
            "sport",
            "=",
            &port,
            ")",
        ])
        .output()
        .context("cannot run ss (iproute2)")?;
    if !output.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(parse_socket_memory(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

fn parse_socket_memory(text: &str) -> (usize, u64) {
    let mut sockets = 0;
    let mut bytes = 0;
    for fields in text
        .split("skmem:(")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
    {
        sockets += 1;
        for field in fields.split(',') {
            let name: String = field
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            if matches!(name.as_str(), "r" | "w" | "f" | "o" | "bl") {
                bytes += field[name.len()..].parse::<u64>().unwrap_or(0);
            }
        }
    }
    (sockets, bytes)
}

pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let after = stat.rsplit_once(')').context("odd /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(user, system)| Some(user.parse::<u64>().ok()? + system.parse::<u64>().ok()?))
        .context("odd /proc/<pid>/stat")?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// The run's CA and the certificate the edge serves (wildcard for device
/// subdomains, also used by the QUIC tunnel).
struct Pki {
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// For wss: ALPN `http/1.1`, as browsers and MQTT.js offer.
    connector: TlsConnector,
    /// For mqtts: no ALPN, as mosquitto_sub and paho offer.
    mqtts_connector: TlsConnector,
}

fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "relay loadtest CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(vec![
        BASE_DOMAIN.to_owned(),
        format!("*.{BASE_DOMAIN}"),
        "localhost".to_owned(),
    ])?;
    params
        .distinguished_name
        .push(DnType::CommonName, BASE_DOMAIN);
    let key_pair = KeyPair::generate()?;
    let cert = params.signed_by(&key_pair, &ca)?;
    let pki = Pki {
        ca_pem: dir.join("ca.pem"),
        cert: dir.join("edge.pem"),
        key: dir.join("edge.key"),
        connector: client_tls(ca.der(), &[b"http/1.1"])?,
        mqtts_connector: client_tls(ca.der(), &[])?,
    };
    std::fs::write(&pki.ca_pem, ca.pem())?;
    std::fs::write(&pki.cert, cert.pem())?;
    std::fs::write(&pki.key, key_pair.serialize_pem())?;
    Ok(pki)
}

/// A TLS client that trusts `ca` and offers `alpn`.
fn client_tls(
    ca: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Waits until something accepts TCP connections on `addr`.
async fn wait_for_listener(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_PATIENCE;
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{what} does not listen on {addr} after {START_PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
    let file = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Ok((Stdio::from(file.try_clone()?), Stdio::from(file)))
}

fn spawn(program: &Path, args: &[&str], dir: &Path, log: &str) -> anyhow::Result<Child> {
    let (stdout, stderr) = log_file(dir, log)?;
    Command::new(program)
        .args(args)
        // Quiet unless asked (RELAY_LOG=info loadtest/run … to debug).
        .env(
            "RELAY_LOG",
            std::env::var("RELAY_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))
}

/// A plain HTTP GET on the edge's admin listener.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("odd HTTP response")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One sample of a Prometheus text exposition (`name{labels} value`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The edge as its own process, restartable on the same ports.
#[derive(Debug)]
pub struct EdgeProcess {
    child: Child,
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    /// Its instance id, and the name of its files.
    name: String,
    starts: u32,
    pub public: SocketAddr,
    pub plain: SocketAddr,
    /// MQTT over TLS on TCP (mqtts).
    pub mqtts: SocketAddr,
    pub admin: SocketAddr,
    pub tunnel: SocketAddr,
    /// The tunnel over TLS on TCP (for agents on `transport = "tcp"`).
    pub tunnel_tcp: SocketAddr,
}

/// The cluster secret of the rig's edge instances.
const CLUSTER_SECRET: &str = "the load test's cluster secret";

impl EdgeProcess {
    async fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        database_url: &str,
        pki: &Pki,
        worker_threads: Option<usize>,
    ) -> anyhow::Result<EdgeProcess> {
        let public = loopback(free_tcp_port()?);
        let plain = loopback(free_tcp_port()?);
        let mqtts = loopback(free_tcp_port()?);
        let admin = loopback(free_tcp_port()?);
        let tunnel = loopback(free_udp_port()?);
        let tunnel_tcp = loopback(free_tcp_port()?);
        let peer = loopback(free_udp_port()?);
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[public]
listen = "{public}"
plain_listen = "{plain}"
mqtts_listen = "{mqtts}"
base_domain = "{BASE_DOMAIN}"
tls_cert = {cert:?}
tls_key = {key:?}

[admin]
listen = "{admin}"

[store]
database_url = "{database_url}"
migrate = false

[limits]
max_packet_size = 65536

# The printer is Mosquitto, reached as a generic broker, with the rules of
# a real printer: its own device's topics only, and a rate a small
# computer takes (five times what the publish scenario sends).
[printers.mqtt]
allow = ["device/{SERIAL}/#"]
publishes_per_second = 500
publish_burst = 500

[auth]
cache_success_seconds = 300

[shutdown]
grace_period_seconds = 5

[tunnel]
listen = "{tunnel}"
tcp_listen = "{tunnel_tcp}"
linger_seconds = 30

[cluster]
instance_id = "{name}"
peer_listen = "{peer}"
secret = "{CLUSTER_SECRET}"
{runtime}"#,
                runtime = worker_threads
                    .map(|threads| format!("\n[runtime]\nworker_threads = {threads}\n"))
                    .unwrap_or_default(),
                cert = pki.cert.display().to_string(),
                key = pki.key.display().to_string(),
            ),
        )?;
        let child = spawn(
            binary,
            &["--config", &config.display().to_string()],
            dir,
            &format!("{name}-1"),
        )?;
        let mut edge = EdgeProcess {
            child,
            binary: binary.to_owned(),
            config,
            dir: dir.to_owned(),
            name: name.to_owned(),
            starts: 1,
            public,
            plain,
            mqtts,
            admin,
            tunnel,
            tunnel_tcp,
        };
        edge.wait_ready().await?;
        Ok(edge)
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the edge has exited")
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the edge exited with {status} (see {}/{}-{}.log)",
                    self.dir.display(),
                    self.name,
                    self.starts
                );
            }
            if matches!(admin_get(self.admin, "/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the edge is not ready after {START_PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads the edge's /metrics.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(admin_get(self.admin, "/metrics").await?.1)
    }

    /// Bytes that crossed the tunnel from the printer, per the edge (the
    /// series appears with the first byte).
    pub async fn printer_bytes_in(&self) -> anyhow::Result<f64> {
        Ok(metric(
            &self.metrics().await?,
            "relay_edge_printer_bytes_total{direction=\"in\"}",
        )
        .unwrap_or(0.0))
    }

    /// Waits until `count` agents have their tunnels up.
    pub async fn wait_agents(&self, count: usize, patience: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            let text = self.metrics().await.unwrap_or_default();
            if metric(&text, "relay_edge_agents_connected").is_some_and(|up| up >= count as f64) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent did not connect within {patience:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (the edge drains: clients get 1001), wait for the exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the edge again with the same configuration.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        self.child = spawn(
            &self.binary,
            &["--config", &self.config.display().to_string()],
            &self.dir,
            &format!("{}-{}", self.name, self.starts),
        )?;
        self.wait_ready().await
    }

    /// A crash: SIGKILL, and the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// A value of this edge's /metrics (0 when absent).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        Ok(metric(&self.metrics().await?, series).unwrap_or(0.0))
    }
}

/// What every agent process of a run shares: its binary, the run's
/// directory, the CA of the edge's tunnel certificate, and the printer
/// (Mosquitto, as a generic MQTT broker).
struct AgentSetup {
    binary: PathBuf,
    dir: PathBuf,
    ca: PathBuf,
    printer: SocketAddr,
}

impl AgentSetup {
    /// Writes `<name>.toml` with `edge` (the `[edge]` table's address
    /// lines) and starts the agent on it.
    fn spawn(&self, name: &str, credential: &str, edge: &str) -> anyhow::Result<Child> {
        let conf = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                r#"
[edge]
{edge}
server_name = "tunnel.{BASE_DOMAIN}"
ca_file = {ca:?}
credential = "{credential}"

[printer]
kind = "mqtt"
host = "127.0.0.1"
port = {port}
tls = false
"#,
                ca = self.ca.display().to_string(),
                port = self.printer.port(),
            ),
        )?;
        spawn(
            &self.binary,
            &["--config", &conf.display().to_string()],
            &self.dir,
            name,
        )
    }
}

/// Everything one run needs, started and ready.
#[derive(Debug)]
pub struct Rig {
    database: Option<TestDatabase>,
    _mosquitto: Child,
    _rathole: Vec<Child>,
    pub agent: Child,
    /// A second device's agent, on `transport = "tcp"` to `edge`: the
    /// `relay-tcp` path.
    agent_tcp: Child,
    /// The instance the agent dials: every same-instance path.
    pub edge: EdgeProcess,
    /// Instances whose clients reach the device through a peer link to
    /// `edge`: `cross` (the cross-instance path) and `spare` (where the
    /// agent goes when `edge` is killed).
    pub cross: EdgeProcess,
    pub spare: EdgeProcess,
    pub relay_cross: Target,
    pub relay_spare: Target,
    /// What a new agent needs: its binary, its directory, the CA, the
    /// credential, the printer.
    agent_binary: PathBuf,
    agent_dir: PathBuf,
    agent_ca: PathBuf,
    agent_credential: String,
    device_id: String,
    /// Mosquitto's plain MQTT listener: the printer side of every path.
    pub printer: SocketAddr,
    pub relay: Target,
    /// The same edge, a device whose agent's tunnel runs over TLS on TCP.
    pub relay_tcp: Target,
    /// The same edge and device over mqtts (MQTT straight over TLS, no
    /// WebSocket), the key as the CONNECT password.
    pub relay_mqtts: Target,
    /// The same edge over its plain ws:// listener (no TLS), to compare
    /// with the plain ws baselines.
    pub relay_ws: Target,
    pub direct: Target,
    pub rathole: Option<Target>,
}

impl Rig {
    pub async fn start(binaries: &Binaries, dir: &Path) -> anyhow::Result<Rig> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let pki = make_pki(&dir)?;

        // The store: a fresh Postgres database with a tenant, a device, a
        // control key and the agent's credential.
        let database = TestDatabase::postgres().await;
        let store = &database.store;
        let tenant = store.create_tenant("loadtest").await?;
        let device = store.create_device(&tenant.id, "loadtest printer").await?;
        // Clients are spread over keys and source addresses, as many users
        // would be: the edge caps sessions per key and per address.
        let mut keys = Vec::new();
        for _ in 0..SPREAD {
            let (_, key) = store
                .create_api_key(NewApiKey {
                    tenant_id: &tenant.id,
                    device_id: Some(&device.id),
                    scope: Scope::Control,
                    label: "loadtest",
                    expires_at: None,
                })
                .await?;
            keys.push(key);
        }
        let (_, agent_credential) = store.issue_agent_credential(&device.id).await?;
        let device_tcp = store
            .create_device(&tenant.id, "loadtest printer over TCP")
            .await?;
        let mut keys_tcp = Vec::new();
        for _ in 0..SPREAD {
            let (_, key) = store
                .create_api_key(NewApiKey {
                    tenant_id: &tenant.id,
                    device_id: Some(&device_tcp.id),
                    scope: Scope::Control,
                    label: "loadtest",
                    expires_at: None,
                })
                .await?;
            keys_tcp.push(key);
        }
        let (_, agent_tcp_credential) = store.issue_agent_credential(&device_tcp.id).await?;

        // Mosquitto: plain MQTT on loopback for the printer side, WebSocket
        // for the direct baseline. Debian's build cannot bind a WebSocket
        // listener to an address, so that one is IPv4 on all interfaces.
        let printer = loopback(free_tcp_port()?);
        let websocket = loopback(free_tcp_port()?);
        let mosquitto_conf = dir.join("mosquitto.conf");
        std::fs::write(
            &mosquitto_conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\nset_tcp_nodelay true\n\
                 max_queued_messages 100000\npersistence false\n\
                 listener {} 127.0.0.1\n\
                 listener {}\nprotocol websockets\nsocket_domain ipv4\n",
                printer.port(),
                websocket.port()
            ),
        )?;
        let mosquitto = spawn(
            &binaries.mosquitto,
            &["-c", &mosquitto_conf.display().to_string()],
            &dir,
            "mosquitto",
        )?;
        wait_for_listener(printer, "mosquitto").await?;
        wait_for_listener(websocket, "mosquitto's websocket listener").await?;
        let direct = Target {
            name: "direct",
            addr: websocket,
            host: "localhost".into(),
            path: "/mqtt".into(),
            tls: None,
            wire: Wire::WebSocket,
            authorizations: Vec::new(),
            sources: SPREAD,
        };

        // rathole: server on loopback, client next to Mosquitto; clients
        // connect to the server's service port.
        let mut rathole_children = Vec::new();
        let rathole = match &binaries.rathole {
            Some(binary) => {
                let control = loopback(free_tcp_port()?);
                let service = loopback(free_tcp_port()?);
                let server_conf = dir.join("rathole-server.toml");
                let client_conf = dir.join("rathole-client.toml");
                std::fs::write(
                    &server_conf,
                    format!(
                        "[server]\nbind_addr = \"{control}\"\n\n[server.services.mqtt]\n\
                         token = \"loadtest\"\nbind_addr = \"{service}\"\nnodelay = true\n"
                    ),
                )?;
                std::fs::write(
                    &client_conf,
                    format!(
                        "[client]\nremote_addr = \"{control}\"\n\n[client.services.mqtt]\n\
                         token = \"loadtest\"\nlocal_addr = \"{websocket}\"\nnodelay = true\n"
                    ),
                )?;
                rathole_children.push(spawn(
                    binary,
                    &["--server", &server_conf.display().to_string()],
                    &dir,
                    "rathole-server",
                )?);
                wait_for_listener(control, "rathole server").await?;
                rathole_children.push(spawn(
                    binary,
                    &["--client", &client_conf.display().to_string()],
                    &dir,
                    "rathole-client",
                )?);
                let target = Target {
                    name: "rathole",
                    addr: service,
                    ..direct.clone()
                };
                // The service port opens once the client has registered;
                // a full MQTT connect proves the path.
                let deadline = Instant::now() + START_PATIENCE;
                loop {
                    match MqttClient::connect(&target, "probe", ByteCounter::default()).await {
                        Ok(client) => {
                            client.disconnect().await;
                            break;
                        }
                        Err(failure) if Instant::now() > deadline => {
                            bail!("no MQTT through rathole after {START_PATIENCE:?}: {failure}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                Some(target)
            }
            None => None,
        };

        let edge = EdgeProcess::start(
            &binaries.edge,
            &dir,
            "edge",
            &database.url,
            &pki,
            binaries.edge_worker_threads,
        )
        .await?;
        let cross = EdgeProcess::start(
            &binaries.edge,
            &dir,
            "edge-cross",
            &database.url,
            &pki,
            binaries.edge_worker_threads,
        )
        .await?;
        let spare = EdgeProcess::start(
            &binaries.edge,
            &dir,
            "edge-spare",
            &database.url,
            &pki,
            binaries.edge_worker_threads,
        )
        .await?;

        // The agent, with Mosquitto as its printer (a generic MQTT broker).
        // The second device's agent: the same printer, the tunnel over TCP.
        let agents = AgentSetup {
            binary: binaries.agent.clone(),
            dir: dir.clone(),
            ca: pki.ca_pem.clone(),
            printer,
        };
        let tunnel = |transport: &str| {
            format!(
                "address = \"{}\"\ntcp_address = \"{}\"\ntransport = \"{transport}\"",
                edge.tunnel, edge.tunnel_tcp
            )
        };
        let agent = agents.spawn("agent", &agent_credential.reveal(), &tunnel("quic"))?;
        let agent_tcp =
            agents.spawn("agent-tcp", &agent_tcp_credential.reveal(), &tunnel("tcp"))?;
        edge.wait_agents(2, START_PATIENCE).await?;

        let relay = Target {
            name: "relay",
            addr: edge.public,
            host: format!("{}.{BASE_DOMAIN}", device.id),
            path: "/mqtt".into(),
            tls: Some(pki.connector.clone()),
            wire: Wire::WebSocket,
            authorizations: keys
                .iter()
                .map(|key| format!("Bearer {}", key.reveal()))
                .collect(),
            sources: SPREAD,
        };
        let relay_tcp = Target {
            name: "relay-tcp",
            host: format!("{}.{BASE_DOMAIN}", device_tcp.id),
            authorizations: keys_tcp
                .iter()
                .map(|key| format!("Bearer {}", key.reveal()))
                .collect(),
            ..relay.clone()
        };
        let relay_mqtts = Target {
            name: "relay-mqtts",
            addr: edge.mqtts,
            path: String::new(),
            tls: Some(pki.mqtts_connector.clone()),
            wire: Wire::Mqtt,
            ..relay.clone()
        };
        let relay_ws = Target {
            name: "relay-ws",
            addr: edge.plain,
            tls: None,
            ..relay.clone()
        };
        let relay_cross = Target {
            name: "relay-cross",
            addr: cross.public,
            ..relay.clone()
        };
        let relay_spare = Target {
            name: "relay-spare",
            addr: spare.public,
            ..relay.clone()
        };
        Ok(Rig {
            cross,
            spare,
            relay_cross,
            relay_spare,
            agent_binary: binaries.agent.clone(),
            agent_dir: dir.clone(),
            agent_ca: pki.ca_pem.clone(),
            agent_credential: agent_credential.reveal(),
            device_id: device.id.clone(),
            database: Some(database),
            _mosquitto: mosquitto,
            _rathole: rathole_children,
            agent,
            agent_tcp,
            edge,
            printer,
            relay,
            relay_tcp,
            relay_mqtts,
            relay_ws,
            direct,
            rathole,
        })
    }

    /// Replaces the agent with one dialling `edge` then `spare`, at the
    /// agent's shipped settings, and waits until it is on `edge`.
    pub async fn restart_agent_for_failover(&mut self) -> anyhow::Result<()> {
        let _ = self.agent.kill().await;
        let store = &self.database.as_ref().context("no database")?.store;
        let claim_epoch = || async {
            store
                .device_claim(&self.device_id)
                .await
                .ok()
                .flatten()
                .map(|claim| (claim.instance_id, claim.epoch))
        };
        let before = claim_epoch().await.map_or(0, |(_, epoch)| epoch);
        self.agent = self.spawn_agent(
            "agent-failover",
            &self.agent_credential,
            &[self.edge.tunnel, self.spare.tunnel],
        )?;
        // The new agent claims the device on `edge` (the killed one's
        // tunnel is fenced there).
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if let Some((instance, epoch)) = claim_epoch().await
                && instance == "edge"
                && epoch > before
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the failover agent did not reach the edge");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts one more agent process for another device, with Mosquitto as
    /// its printer, dialling `addresses` in order (the first, then the next
    /// when one fails or drains), at the agent's shipped settings.
    pub fn spawn_agent(
        &self,
        name: &str,
        credential: &str,
        addresses: &[SocketAddr],
    ) -> anyhow::Result<Child> {
        let (first, rest) = addresses.split_first().context("no address")?;
        let rest: Vec<String> = rest
            .iter()
            .map(|address| format!("\"{address}\""))
            .collect();
        let edge = format!("address = \"{first}\"\naddresses = [{}]", rest.join(", "));
        AgentSetup {
            binary: self.agent_binary.clone(),
            dir: self.agent_dir.clone(),
            ca: self.agent_ca.clone(),
            printer: self.printer,
        }
        .spawn(name, credential, &edge)
    }

    /// Waits until both of the rig's agents (QUIC and TCP) are on `edge`.
    pub async fn wait_agents(&self, patience: Duration) -> anyhow::Result<()> {
        self.edge.wait_agents(2, patience).await
    }

    /// The run's store.
    pub fn store(&self) -> anyhow::Result<&relay_store::Store> {
        Ok(&self.database.as_ref().context("no database")?.store)
    }

    /// The CA agents trust for the edge's tunnel certificate.
    pub fn tunnel_ca(&self) -> &Path {
        &self.agent_ca
    }

    pub fn agent_pid(&self) -> anyhow::Result<u32> {
        self.agent.id().context("the agent has exited")
    }

    /// Stops everything and drops the database.
    pub async fn stop(mut self) {
        let _ = self.edge.terminate().await;
        let _ = self.cross.terminate().await;
        let _ = self.spare.terminate().await;
        let _ = self.agent.kill().await;
        let _ = self.agent_tcp.kill().await;
        if let Some(database) = self.database.take() {
            database.cleanup().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_memory_adds_what_the_sockets_hold_not_their_limits() {
        let text = "0 0 127.0.0.1:8443 127.0.0.1:5000\n\t skmem:(r0,rb131072,t0,tb2626560,f4096,w0,o0,bl0,d0)\n0 0 127.0.0.1:8443 127.0.0.1:5001\n\t skmem:(r512,rb131072,t0,tb2626560,f0,w1024,o8,bl0,d3)\n";
        assert_eq!(parse_socket_memory(text), (2, 4096 + 512 + 1024 + 8));
    }

    #[test]
    fn a_metric_is_read_by_its_full_series_name() {
        let text = "# HELP x\nrelay_edge_printer_bytes_total{direction=\"in\"} 4417\n\
                    relay_edge_printer_bytes_total{direction=\"out\"} 12\nrelay_edge_agents_connected 1\n";
        assert_eq!(
            metric(text, "relay_edge_printer_bytes_total{direction=\"in\"}"),
            Some(4417.0)
        );
        assert_eq!(metric(text, "relay_edge_agents_connected"), Some(1.0));
        assert_eq!(metric(text, "relay_edge_agents"), None);
    }

    #[test]
    fn this_process_has_resident_memory_and_cpu_time() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert!(cpu_time(std::process::id()).is_ok());
    }
}
