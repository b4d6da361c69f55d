//! The tunnels scenario: thousands of idle agents on one edge instance,
//! held by this process (no process per agent). Each simulated agent is a
//! QUIC connection speaking the agent's side of the tunnel protocol, as
//! `relay-agent` does: HELLO with its own device's credential, the same
//! keep-alive and idle timeout, GO_AWAY honoured (its `reconnect_after_ms`,
//! then the agent's jittered backoff while the edge is away). Measured:
//! the edge's memory and CPU per idle tunnel, HELLOs accepted per second,
//! store queries per HELLO, a client's latency beside the tunnels, and an
//! edge restart: how long until every agent is back, and how many store
//! queries that took.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use futures_util::StreamExt;
use relay_io::FramedReader;
use relay_io::mux::{Mux, MuxLimits, MuxRole};
use relay_io::transport::TunnelConnection;
use relay_proto::Secret;
use relay_proto::tunnel::{self, GoAwayReason, Hello, Message};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore, watch};

use crate::rig::{Rig, cpu_time, rss_bytes};
use crate::scenarios::{self, Planned, StreamResult};
use crate::stats::Progress;

/// The agent's defaults: a QUIC keep-alive every 25 s (idle timeout four
/// of them, the edge's 60 s applying), every packet ACKed at once.
const KEEP_ALIVE: Duration = Duration::from_secs(25);
/// The agent's first retry delay and its ceiling (doubling, jittered).
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Client endpoints (UDP sockets) the simulated agents are spread over,
/// each with a large receive buffer: real agents have a socket each, and
/// 20,000 GO_AWAYs at once must not overflow a few shared ones.
const ENDPOINTS: usize = 32;
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// HELLOs in flight at once while the fleet first connects.
const CONNECT_CONCURRENCY: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct TunnelsSize {
    pub tunnels: usize,
    pub transport: FleetTransport,
    /// How long the edge is watched idle, with and without the tunnels.
    pub idle_window: Duration,
    pub baseline_window: Duration,
    /// How long the fleet may take to connect, and to come back.
    pub patience: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct TunnelsReport {
    pub tunnels: usize,
    pub transport: FleetTransport,
    /// The fleet's first connect, CONNECT_CONCURRENCY HELLOs in flight.
    pub connect_seconds: f64,
    pub hellos_per_second: f64,
    /// Store queries the edge issued while the fleet connected, per HELLO
    /// (its lease renewals included).
    pub store_queries_per_hello: f64,
    /// The edge's resident memory before the fleet, with it connected, and
    /// after the idle window.
    pub edge_rss_before_bytes: u64,
    pub edge_rss_connected_bytes: u64,
    pub edge_rss_idle_bytes: u64,
    pub edge_rss_per_tunnel_bytes: f64,
    /// The edge's CPU time per minute with no simulated agents (the rig's
    /// own agent only) and with the fleet, idle.
    pub baseline_window_seconds: f64,
    pub idle_window_seconds: f64,
    pub edge_cpu_baseline_ms_per_minute: f64,
    pub edge_cpu_idle_ms_per_minute: f64,
    pub edge_cpu_per_tunnel_ms_per_minute: f64,
    /// Tunnels that ended while idle (none should).
    pub dropped_while_idle: usize,
    /// One client of the rig's device, alone and beside the fleet.
    pub latency_alone: StreamResult,
    pub latency_beside: StreamResult,
    pub restart: RestartResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestartResult {
    /// From the SIGTERM (the drain's GO_AWAY spreads the agents' return
    /// over the edge's `agent_reconnect_spread_ms`) until every agent is
    /// back, if they all came back within the patience.
    pub all_back_seconds: Option<f64>,
    /// Agents accepted again by the restarted edge.
    pub back: usize,
    /// Agents that read the drain's GO_AWAY (the others noticed the edge
    /// gone by their connection closing, or by the idle timeout).
    pub go_aways_received: u64,
    /// From the new process's readiness until every agent is back.
    pub after_ready_seconds: Option<f64>,
    /// Store queries the new process issued until every agent was back,
    /// in all and per agent.
    pub store_queries: f64,
    pub store_queries_per_agent: f64,
    /// HELLOs the new process accepted, and refused.
    pub hellos_accepted: f64,
    pub hellos_refused: f64,
}

/// What the simulated agents share.
#[derive(Debug, Default)]
struct FleetState {
    connected: AtomicUsize,
    /// Tunnels that ended for another reason than a GO_AWAY or the stop.
    dropped: AtomicUsize,
    go_aways: AtomicU64,
    /// HELLO_ACKs received, in all.
    hellos: AtomicUsize,
    changed: Notify,
}

struct Fleet {
    state: Arc<FleetState>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoints: Vec<quinn::Endpoint>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("tunnels", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Fleet {
    fn connected(&self) -> usize {
        self.state.connected.load(Ordering::SeqCst)
    }

    /// Waits until `count` tunnels are up, or the patience ends.
    async fn wait_connected(&self, count: usize, patience: Duration, progress: &Progress) -> bool {
        self.wait_for(count, patience, progress, |state| {
            state.connected.load(Ordering::SeqCst)
        })
        .await
    }

    /// Waits until `count` tunnels were accepted since `hellos_before`
    /// HELLO_ACKs (each agent back on the restarted edge, not merely still
    /// up on the old one), or the patience ends.
    async fn wait_back(
        &self,
        hellos_before: usize,
        count: usize,
        patience: Duration,
        progress: &Progress,
    ) -> bool {
        self.wait_for(count, patience, progress, |state| {
            state
                .hellos
                .load(Ordering::SeqCst)
                .saturating_sub(hellos_before)
                .min(state.connected.load(Ordering::SeqCst))
        })
        .await
    }

    async fn wait_for(
        &self,
        count: usize,
        patience: Duration,
        progress: &Progress,
        measure: impl Fn(&FleetState) -> usize,
    ) -> bool {
        let deadline = Instant::now() + patience;
        let mut shown = 0;
        loop {
            let notified = self.state.changed.notified();
            let now = measure(&self.state);
            if now > shown {
                progress.add((now - shown) as u64);
                shown = now;
            }
            if now >= count {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Woken by every change; the timeout only bounds the wait.
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), notified).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        for endpoint in &self.endpoints {
            endpoint.close(quinn::VarInt::from_u32(tunnel::close_code::NO_ERROR), b"");
        }
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
        }
    }
}

/// The agent's TLS: the rig's CA, TLS 1.3, the tunnel's ALPN.
fn tls_config(ca_pem: &std::path::Path) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(ca_pem)?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate?)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    Ok(tls)
}

fn client_config(ca_pem: &std::path::Path) -> anyhow::Result<quinn::ClientConfig> {
    let tls = tls_config(ca_pem)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(KEEP_ALIVE * 4)?));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(0));
    transport.ack_frequency_config(Some(acks));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Half to full `base` (the agent's jitter), from a cheap generator.
fn jitter(base: Duration, seed: &mut u64) -> Duration {
    // xorshift64: spreading retries needs no cryptographic randomness.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    base / 2 + base.mul_f64((*seed % 1024) as f64 / 2048.0)
}

/// How one simulated agent's tunnel ended.
enum Ended {
    /// GO_AWAY: come back after this long.
    GoAway(Duration),
    Stopped,
    /// Anything else (the edge vanished, a refusal, a failed dial).
    Failed,
}

/// Which transport the simulated agents' tunnels run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FleetTransport {
    Quic,
    /// TLS on TCP, multiplexed by yamux, as `transport = "tcp"` agents.
    Tcp,
}

/// How one simulated agent reaches the edge.
#[derive(Clone)]
pub enum Dialer {
    Quic {
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        edge: SocketAddr,
    },
    Tcp {
        tls: tokio_rustls::TlsConnector,
        edge: SocketAddr,
    },
}

impl Dialer {
    /// A dialer for each of `count` simulated agents: over QUIC spread
    /// over the fleet's client endpoints (returned, to be closed at the
    /// end), or over TLS on TCP.
    pub fn for_fleet(
        rig: &Rig,
        transport: FleetTransport,
        count: usize,
    ) -> anyhow::Result<(Vec<Dialer>, Vec<quinn::Endpoint>)> {
        let client = client_config(rig.tunnel_ca())?;
        let tcp_tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(rig.tunnel_ca())?));
        let mut endpoints = Vec::with_capacity(ENDPOINTS);
        if transport == FleetTransport::Quic {
            for _ in 0..ENDPOINTS {
                let socket = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                let udp = quinn::udp::UdpSocketState::new((&socket).into())?;
                udp.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER)?;
                let runtime = quinn::default_runtime().context("no async runtime")?;
                endpoints.push(quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    runtime,
                )?);
            }
        }
        let dialers = (0..count)
            .map(|index| match transport {
                FleetTransport::Quic => Dialer::Quic {
                    endpoint: endpoints[index % ENDPOINTS].clone(),
                    client: client.clone(),
                    edge: rig.edge.tunnel,
                },
                FleetTransport::Tcp => Dialer::Tcp {
                    tls: tcp_tls.clone(),
                    edge: rig.edge.tunnel_tcp,
                },
            })
            .collect();
        Ok((dialers, endpoints))
    }

    /// A tunnel connection, handshake done.
    pub async fn dial(&self) -> Option<TunnelConnection> {
        match self {
            Dialer::Quic {
                endpoint,
                client,
                edge,
            } => {
                let connecting = endpoint
                    .connect_with(client.clone(), *edge, "tunnel.relay.test")
                    .ok()?;
                Some(TunnelConnection::Quic(connecting.await.ok()?))
            }
            Dialer::Tcp { tls, edge } => {
                let tcp = tokio::net::TcpStream::connect(edge).await.ok()?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from("tunnel.relay.test").ok()?;
                let stream = tls.connect(name, tcp).await.ok()?;
                let mux = Mux::start(stream, MuxRole::Client, MuxLimits::default());
                Some(TunnelConnection::Tcp { mux, remote: *edge })
            }
        }
    }
}

/// One simulated agent: where it dials, with what.
struct SimulatedAgent {
    dialer: Dialer,
    credential: String,
    fleet: Arc<FleetState>,
    /// Bounds the HELLOs in flight of the fleet's first connect.
    connecting: Arc<Semaphore>,
}

async fn hold(agent: SimulatedAgent, mut stop: watch::Receiver<bool>, mut seed: u64) {
    let SimulatedAgent {
        dialer,
        credential,
        fleet,
        connecting,
    } = agent;
    let mut backoff = BACKOFF_FIRST;
    loop {
        let permit = connecting.clone().acquire_owned().await.ok();
        let mut stop_once = stop.clone();
        let ended = tokio::select! {
            ended = tunnel_once(&dialer, &credential, &fleet, permit, &mut stop_once) => ended,
            _ = stop.wait_for(|stopped| *stopped) => Ended::Stopped,
        };
        let wait = match ended {
            Ended::Stopped => return,
            Ended::GoAway(after) => {
                backoff = BACKOFF_FIRST;
                after
            }
            Ended::Failed => {
                let wait = jitter(backoff, &mut seed);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

async fn tunnel_once(
    dialer: &Dialer,
    credential: &str,
    fleet: &FleetState,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let Some(connection) = dialer.dial().await else {
        return Ended::Failed;
    };
    let Ok((mut send, recv)) = connection.open_bi().await else {
        return Ended::Failed;
    };
    let hello = Message::Hello(Hello {
        version: tunnel::PROTOCOL_VERSION,
        credential: Secret::new(credential.to_owned()),
        agent_version: Some("loadtest".into()),
    });
    let mut bytes = BytesMut::new();
    if tunnel::encode(&hello, &mut bytes).is_err() || send.write_all(&bytes).await.is_err() {
        return Ended::Failed;
    }
    let mut control = FramedReader::with_buffer(recv, BytesMut::with_capacity(256));
    match control.read_message().await {
        Ok(Some(Message::HelloAck(_))) => {}
        Ok(Some(Message::HelloRefused(refused))) => {
            drop(permit);
            if let Some(after) = refused.retry_after_ms {
                let _ = tokio::time::timeout(
                    Duration::from_millis(u64::from(after)),
                    stop.wait_for(|stopped| *stopped),
                )
                .await;
            }
            return Ended::Failed;
        }
        _ => return Ended::Failed,
    }
    drop(permit);
    fleet.connected.fetch_add(1, Ordering::SeqCst);
    fleet.hellos.fetch_add(1, Ordering::SeqCst);
    fleet.changed.notify_waiters();
    let ended = loop {
        tokio::select! {
            message = control.read_message() => match message {
                Ok(Some(Message::GoAway(go_away))) => {
                    fleet.go_aways.fetch_add(1, Ordering::Relaxed);
                    let after = match go_away.reason {
                        GoAwayReason::Draining => go_away.reconnect_after_ms.map_or(Duration::ZERO, |ms| Duration::from_millis(u64::from(ms))),
                        _ => go_away.reconnect_after_ms.map_or(BACKOFF_FIRST, |ms| Duration::from_millis(u64::from(ms))),
                    };
                    break Ended::GoAway(after);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break Ended::Failed,
            },
            _ = connection.closed() => break Ended::Failed,
            _ = stop.wait_for(|stopped| *stopped) => break Ended::Stopped,
        }
    };
    if matches!(ended, Ended::Failed) {
        fleet.dropped.fetch_add(1, Ordering::SeqCst);
    }
    fleet.connected.fetch_sub(1, Ordering::SeqCst);
    fleet.changed.notify_waiters();
    connection.close(tunnel::close_code::NO_ERROR, b"agent reconnecting");
    ended
}

/// A device of a simulated fleet: its id and its agent's credential.
pub struct FleetDevice {
    pub id: String,
    pub credential: String,
}

/// `count` devices with agent credentials, made through the store in a
/// tenant of their own (`tenant_name`, devices named `device_name` and
/// their index), shown as `step` in the progress line. Returns the
/// tenant's id and the devices.
pub async fn fleet_devices(
    rig: &Rig,
    count: usize,
    (tenant_name, device_name, step): (&str, &str, &str),
    progress: &Progress,
) -> anyhow::Result<(String, Vec<FleetDevice>)> {
    progress.step(step, count as u64);
    let store = rig.store()?;
    let tenant = store.create_tenant(tenant_name).await?;
    let made: Vec<anyhow::Result<FleetDevice>> = futures_util::stream::iter(0..count)
        .map(|index| {
            let tenant = tenant.id.clone();
            async move {
                let device = store
                    .create_device(&tenant, &format!("{device_name} {index}"))
                    .await?;
                let (_, credential) = store.issue_agent_credential(&device.id).await?;
                progress.add(1);
                Ok(FleetDevice {
                    id: device.id,
                    credential: credential.reveal(),
                })
            }
        })
        .buffer_unordered(12)
        .collect()
        .await;
    let devices = made.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((tenant.id, devices))
}

fn start_fleet(
    rig: &Rig,
    credentials: Vec<String>,
    transport: FleetTransport,
) -> anyhow::Result<Fleet> {
    let (dialers, endpoints) = Dialer::for_fleet(rig, transport, credentials.len())?;
    let state = Arc::new(FleetState::default());
    let (stop, stopped) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let tasks = credentials
        .into_iter()
        .zip(dialers)
        .enumerate()
        .map(|(index, (credential, dialer))| {
            let agent = SimulatedAgent {
                dialer,
                credential,
                fleet: state.clone(),
                connecting: connecting.clone(),
            };
            tokio::spawn(hold(
                agent,
                stopped.clone(),
                0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1),
            ))
        })
        .collect();
    Ok(Fleet {
        state,
        stop,
        tasks,
        endpoints,
    })
}

/// The edge's CPU time over `window`, as ms per minute.
async fn cpu_per_minute(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_time(pid)?;
    tokio::time::sleep(window).await;
    let used = cpu_time(pid)?.saturating_sub(before);
    Ok(used.as_secs_f64() * 1000.0 * 60.0 / window.as_secs_f64())
}

pub async fn tunnels(
    rig: &mut Rig,
    size: TunnelsSize,
    latency_plan: &[Planned],
    progress: &Progress,
) -> anyhow::Result<TunnelsReport> {
    let count = size.tunnels;
    let (_, devices) = fleet_devices(
        rig,
        count,
        (
            "loadtest fleet",
            "idle printer",
            "tunnels: devices and agent credentials",
        ),
        progress,
    )
    .await?;
    let credentials = devices
        .into_iter()
        .map(|device| device.credential)
        .collect();
    progress.clear();
    let latency_alone =
        scenarios::stream(rig, &rig.relay.clone(), 1, latency_plan, progress).await?;
    let pid = rig.edge.pid()?;
    progress.step("tunnels: the edge idle without them", 0);
    let edge_cpu_baseline = cpu_per_minute(pid, size.baseline_window).await?;
    let edge_rss_before = rss_bytes(pid)?;

    // The fleet connects.
    progress.step("tunnels: connecting", count as u64);
    let queries_before = rig.edge.metric("relay_edge_store_queries_total").await?;
    let started = Instant::now();
    let fleet = start_fleet(rig, credentials, size.transport)?;
    if !fleet.wait_connected(count, size.patience, progress).await {
        let connected = fleet.connected();
        fleet.stop().await;
        bail!(
            "only {connected} of {count} tunnels connected within {:?}",
            size.patience
        );
    }
    let connect = started.elapsed();
    let queries = rig.edge.metric("relay_edge_store_queries_total").await? - queries_before;
    let edge_rss_connected = rss_bytes(pid)?;

    // Idle.
    progress.step("tunnels: the edge idle with them", 0);
    let dropped_before = fleet.state.dropped.load(Ordering::SeqCst);
    let edge_cpu_idle = cpu_per_minute(pid, size.idle_window).await?;
    let dropped_while_idle = fleet.state.dropped.load(Ordering::SeqCst) - dropped_before;
    let edge_rss_idle = rss_bytes(pid)?;
    progress.clear();
    let latency_beside =
        scenarios::stream(rig, &rig.relay.clone(), 1, latency_plan, progress).await?;

    // The restart.
    let restart = restart(rig, &fleet, count, size.patience, progress).await;
    fleet.stop().await;
    progress.clear();
    let restart = restart?;
    rig.wait_agents(Duration::from_secs(60)).await?;
    let per_minute_delta = (edge_cpu_idle - edge_cpu_baseline).max(0.0);
    Ok(TunnelsReport {
        tunnels: count,
        transport: size.transport,
        connect_seconds: connect.as_secs_f64(),
        hellos_per_second: count as f64 / connect.as_secs_f64(),
        store_queries_per_hello: queries / count as f64,
        edge_rss_before_bytes: edge_rss_before,
        edge_rss_connected_bytes: edge_rss_connected,
        edge_rss_idle_bytes: edge_rss_idle,
        edge_rss_per_tunnel_bytes: edge_rss_idle.saturating_sub(edge_rss_before) as f64
            / count as f64,
        baseline_window_seconds: size.baseline_window.as_secs_f64(),
        idle_window_seconds: size.idle_window.as_secs_f64(),
        edge_cpu_baseline_ms_per_minute: edge_cpu_baseline,
        edge_cpu_idle_ms_per_minute: edge_cpu_idle,
        edge_cpu_per_tunnel_ms_per_minute: per_minute_delta / count as f64,
        dropped_while_idle,
        latency_alone,
        latency_beside,
        restart,
    })
}

async fn restart(
    rig: &mut Rig,
    fleet: &Fleet,
    count: usize,
    patience: Duration,
    progress: &Progress,
) -> anyhow::Result<RestartResult> {
    progress.step("tunnels: edge restarted, agents coming back", count as u64);
    let go_aways_before = fleet.state.go_aways.load(Ordering::SeqCst);
    let hellos_before = fleet.state.hellos.load(Ordering::SeqCst);
    let terminated = Instant::now();
    rig.edge.terminate().await?;
    rig.edge.start_again().await?;
    let ready = Instant::now();
    let back = fleet
        .wait_back(hellos_before, count, patience, progress)
        .await;
    let done = Instant::now();
    let metrics = rig.edge.metrics().await?;
    let value = |series: &str| crate::rig::metric(&metrics, series).unwrap_or(0.0);
    let store_queries = value("relay_edge_store_queries_total");
    // Both transports (the rig's own two agents are among them).
    let hellos = |result: &str| -> f64 {
        ["quic", "tcp"]
            .iter()
            .map(|transport| {
                value(&format!(
                    "relay_edge_agent_hellos_total{{result=\"{result}\",transport=\"{transport}\"}}"
                ))
            })
            .sum()
    };
    let hellos_accepted = hellos("accepted");
    let hellos_refused: f64 = [
        "bad_credential",
        "rate_limited",
        "fenced",
        "store_error",
        "unsupported_version",
    ]
    .iter()
    .map(|result| hellos(result))
    .sum();
    let go_aways = fleet.state.go_aways.load(Ordering::SeqCst) - go_aways_before;
    let returned = fleet
        .state
        .hellos
        .load(Ordering::SeqCst)
        .saturating_sub(hellos_before);
    if go_aways == 0 {
        bail!("the drain sent no GO_AWAY to the simulated agents");
    }
    Ok(RestartResult {
        all_back_seconds: back.then(|| done.duration_since(terminated).as_secs_f64()),
        back: returned.min(count),
        go_aways_received: go_aways,
        after_ready_seconds: back.then(|| done.duration_since(ready).as_secs_f64()),
        store_queries,
        store_queries_per_agent: store_queries / count as f64,
        hellos_accepted,
        hellos_refused,
    })
}
