//! The QUIC tunnel to the edge: dial, HELLO on the control stream, then
//! serve the printer-link streams the edge opens, relaying MQTT between
//! each and a fresh printer connection. Reconnects with jittered exponential
//! backoff; a GO_AWAY makes it reconnect at once.

use relay_io::transport::{TunnelConnection, TunnelRecv, TunnelSend};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_io::{FrameError, FramedReader};
use relay_proto::mqtt::{self, Packet};
use relay_proto::tunnel::{
    self, GoAwayReason, Hello, HelloAck, LinkAccept, LinkDownReason, LinkRefused, LinkState,
    Message, PrinterLink, RefusalReason, TunnelError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, PrinterConfig, TransportChoice};
use crate::local_hub::LocalHub;
use crate::pacing::{DialError, PrinterDialler};
use crate::standby::Standby;

/// How long a printer link waits for its turn to dial the printer; past
/// that it is refused at once (the edge asks again a second later).
const LINK_DIAL_PATIENCE: Duration = Duration::from_secs(5);

/// How long what the agent sent may go unanswered before it gives the
/// edge up for dead and dials the next instance. Nothing is sent for
/// this: the printer's messages (and the keep-alives when there are none)
/// expect the edge's acknowledgement within a round trip, so a dead
/// instance is noticed this long after the printer's next message, not
/// after the keep-alive's idle timeout (four keep-alives, 100 s at the
/// default 25 s). Over TCP the kernel does the same (`TCP_USER_TIMEOUT`).
pub const UNANSWERED_LIMIT: Duration = Duration::from_secs(3);

/// How often the QUIC connection's counters are read for
/// [`UNANSWERED_LIMIT`].
const UNANSWERED_CHECK: Duration = Duration::from_millis(250);

/// Largest MQTT packet the agent relays in either direction.
const MAX_PACKET: usize = 1 << 20;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one tunnel connection ended.
#[derive(Debug, thiserror::Error)]
pub enum TunnelEnd {
    #[error("the edge settings cannot be used: {0}")]
    Setup(#[from] SetupError),
    #[error("cannot reach the edge: cannot resolve {address}")]
    Unresolvable { address: String },
    #[error("cannot reach the edge: no local UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot reach the edge: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("cannot reach the edge: {0}")]
    Handshake(quinn::ConnectionError),
    #[error("the edge refused this agent: {reason:?}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        reason: RefusalReason,
        message: Option<String>,
    },
    #[error("the edge refused this agent: another agent took over this device")]
    Superseded,
    #[error("the edge asked to reconnect")]
    GoAway { after: Duration },
    #[error("connection lost: {0}")]
    Lost(#[from] quinn::ConnectionError),
    #[error("connection lost: {0}")]
    LostIo(#[from] std::io::Error),
    #[error("connection lost: the edge answered nothing for {0:?}")]
    Unanswered(Duration),
    #[error("cannot reach the edge over TCP at {address}: {error}")]
    TcpConnect {
        address: String,
        error: std::io::Error,
    },
    #[error("no QUIC handshake with the edge in {0:?}")]
    QuicTimeout(Duration),
    /// While the tunnel was on TCP, a QUIC handshake succeeded: the tunnel
    /// moves to this connection at once.
    #[error("QUIC reaches the edge again")]
    QuicBack(QuicDialled),
    #[error("connection lost: the control stream: {0}")]
    Control(#[from] ControlError),
    #[error("connection lost: no answer to HELLO in {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    #[error("protocol error: unexpected {message} on the control stream")]
    Unexpected { message: &'static str },
    #[error("stopped")]
    Stopped,
}

/// A QUIC connection to the edge, handshake done, no HELLO yet.
#[derive(Debug)]
pub struct QuicDialled {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

/// Why the agent could not build its QUIC client from the `[edge]` settings.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {error}")]
    CaFile {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a PEM certificate: {error}")]
    CaPem {
        path: std::path::PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("keep_alive_seconds is too large")]
    KeepAlive,
}

/// Why the control stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot encode a frame: {0}")]
    Encode(#[from] TunnelError),
    #[error("{0}")]
    Write(#[from] std::io::Error),
    #[error("{0}")]
    Read(#[from] FrameError<TunnelError>),
    #[error("closed by the edge")]
    Closed,
}

/// Runs until `stop`: connect, serve, reconnect.
pub async fn run(config: AgentConfig, printer: PrinterConfig, stop: CancellationToken) {
    let started = start(config, printer, stop).await;
    let _ = started.task.await;
}

/// A started agent: where its LAN listeners listen, and its tunnel's task.
#[derive(Debug)]
pub struct Started {
    /// Where the LAN listeners that started listen.
    pub lan: crate::lan::LanBound,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the agent: with `[lan]`, its local hub and LAN listeners (bound
/// when this returns), then the tunnel, which runs until `stop`.
pub async fn start(
    config: AgentConfig,
    printer: PrinterConfig,
    stop: CancellationToken,
) -> Started {
    let printer = Arc::new(printer);
    // One dialler for the agent's life: its pacing outlives tunnels.
    let dialler = Arc::new(PrinterDialler::new());
    // With `[lan]`, the printer's one connection feeds a hub here, which
    // LAN apps and the edge's links share.
    let mut lan = crate::lan::LanBound::default();
    let local = match &config.lan {
        Some(section) => {
            let local = LocalHub::new(printer.clone(), dialler.clone(), config.read_only);
            lan = crate::lan::start(section.clone(), local.clone(), stop.clone()).await;
            Some(local)
        }
        None => None,
    };
    let task = tokio::spawn(run_tunnels(config, printer, dialler, local, stop));
    Started { lan, task }
}

async fn run_tunnels(
    config: AgentConfig,
    printer: Arc<PrinterConfig>,
    dialler: Arc<PrinterDialler>,
    local: Option<Arc<LocalHub>>,
    stop: CancellationToken,
) {
    let standby = config
        .always_on
        .then(|| Arc::new(Standby::start(printer.clone(), dialler.clone())));
    let mut backoff = Duration::from_millis(500);
    const MAX_BACKOFF: Duration = Duration::from_secs(60);
    let addresses: Vec<String> = config
        .edge
        .all_addresses()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut next_address = 0usize;
    let mut quic_ready: Option<QuicDialled> = None;
    // The tunnel of an instance that drains, still serving its links until
    // the next tunnel is up.
    let mut retiring: Option<Retiring> = None;
    loop {
        let address = &addresses[next_address % addresses.len()];
        let end = run_tunnel(
            &config,
            address,
            quic_ready.take(),
            Printer {
                config: printer.clone(),
                dialler: dialler.clone(),
                standby: standby.clone(),
                local: local.clone(),
            },
            stop.clone(),
            &mut retiring,
        )
        .await;
        let end = match end {
            TunnelEnd::QuicBack(dialled) => {
                // Same address, no wait: the apps' sessions wait for the
                // new tunnel within the edge's upstream grace.
                tracing::info!(
                    transport = "quic",
                    "QUIC reaches the edge again: moving the tunnel back from TCP"
                );
                quic_ready = Some(dialled);
                backoff = Duration::from_millis(500);
                continue;
            }
            end => end,
        };
        if addresses.len() > 1 && !matches!(end, TunnelEnd::Stopped) {
            // That instance failed, went away or drains: the next one.
            next_address += 1;
            tracing::info!(failed = %address, next = %addresses[next_address % addresses.len()], "trying the next edge address");
        }
        let wait = match &end {
            TunnelEnd::Stopped => return,
            TunnelEnd::GoAway { after } => {
                backoff = Duration::from_millis(500);
                *after
            }
            TunnelEnd::Refused { .. } | TunnelEnd::Superseded | TunnelEnd::Setup(_) => MAX_BACKOFF,
            _ => {
                backoff = (backoff * 2).min(MAX_BACKOFF);
                jitter(backoff)
            }
        };
        tracing::warn!(error = %end, retry_in = ?wait, "tunnel down");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Half to full `base`, from the system's randomness.
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    base / 2 + base * u32::from(byte[0]) / 512
}

/// The TLS client configuration for the edge: its CA, the tunnel's ALPN,
/// no 0-RTT; TLS 1.3 only over QUIC (which requires it), 1.2 too over TCP.
fn tls_config(config: &AgentConfig, quic: bool) -> Result<rustls::ClientConfig, SetupError> {
    use rustls::pki_types::pem::PemObject;
    let path = &config.edge.ca_file;
    let pem = std::fs::read(path).map_err(|error| SetupError::CaFile {
        path: path.clone(),
        error,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let certificate = certificate.map_err(|error| SetupError::CaPem {
            path: path.clone(),
            error,
        })?;
        roots.add(certificate)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if quic {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    // The credential travels in HELLO on a finished handshake, never 0-RTT.
    tls.enable_early_data = false;
    Ok(tls)
}

fn client_config(config: &AgentConfig) -> Result<quinn::ClientConfig, SetupError> {
    let tls = tls_config(config, true)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(config.edge.keep_alive_seconds)));
    // The edge ACKs every packet of ours at once instead of after its ACK
    // delay: a keep-alive then costs it one wake-up, not two.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(0));
    transport.ack_frequency_config(Some(acks));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(config.edge.keep_alive_seconds * 4))
            .map_err(|_| SetupError::KeepAlive)?,
    ));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// One tunnel connection to the first edge address, from dialling to its
/// end (no retry).
pub async fn run_once(
    config: &AgentConfig,
    printer: Arc<PrinterConfig>,
    standby: Option<Arc<Standby>>,
    stop: CancellationToken,
) -> TunnelEnd {
    run_once_at(config, &config.edge.address, printer, standby, stop).await
}

/// [`run_once`] to the edge at `address`.
pub async fn run_once_at(
    config: &AgentConfig,
    address: &str,
    printer: Arc<PrinterConfig>,
    standby: Option<Arc<Standby>>,
    stop: CancellationToken,
) -> TunnelEnd {
    let dialler = Arc::new(PrinterDialler::new());
    let printer = Printer {
        config: printer,
        dialler,
        standby,
        local: None,
    };
    run_tunnel(config, address, None, printer, stop, &mut None).await
}

/// The printer side of a tunnel: the printer's settings, the dialler that
/// paces connections to it, and the always-on standby, if any.
#[derive(Debug, Clone)]
struct Printer {
    config: Arc<PrinterConfig>,
    dialler: Arc<PrinterDialler>,
    standby: Option<Arc<Standby>>,
    /// The local hub, with `[lan]`: links are sessions of it.
    local: Option<Arc<LocalHub>>,
}

/// How long a draining instance's tunnel serves on after the next tunnel is
/// up, unless that instance closes it first (it does once the new claim
/// reaches it).
const RETIRE_PATIENCE: Duration = Duration::from_secs(5);

/// The tunnel of an instance that drains (it sent GO_AWAY): make before
/// break. Its links keep carrying the apps' sessions while the agent dials
/// the next instance, and it closes once that tunnel is up and the new
/// printer link has taken over (the printer connection keeps its client
/// id, so the printer's broker hands the session to the new one), or after
/// [`RETIRE_PATIENCE`].
struct Retiring {
    connection: TunnelConnection,
    endpoint: Option<quinn::Endpoint>,
}

impl Retiring {
    fn close(self) {
        self.connection
            .close(tunnel::close_code::NO_ERROR, b"agent moved");
        if let Some(endpoint) = self.endpoint {
            // The close goes out before the socket is released.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
            });
        }
    }
}

/// One tunnel connection: `dialled` when QUIC was found again while on
/// TCP, else dialled here by the configured transport. `retiring` is the
/// previous instance's tunnel when it drains: closed once this one is up;
/// and this one becomes it when its instance drains.
async fn run_tunnel(
    config: &AgentConfig,
    address: &str,
    dialled: Option<QuicDialled>,
    printer: Printer,
    stop: CancellationToken,
    retiring: &mut Option<Retiring>,
) -> TunnelEnd {
    let (endpoint, connection) = match dialled {
        Some(QuicDialled {
            endpoint,
            connection,
        }) => (Some(endpoint), TunnelConnection::Quic(connection)),
        None => match dial_transport(config, address).await {
            Ok(dialled) => dialled,
            Err(end) => return end,
        },
    };
    let end = serve_connection(config, address, &connection, printer, stop, retiring).await;
    if matches!(end, TunnelEnd::GoAway { .. }) {
        if let Some(older) = retiring.replace(Retiring {
            connection,
            endpoint,
        }) {
            older.close();
        }
        return end;
    }
    let reason: &[u8] = match end {
        TunnelEnd::Stopped => b"agent stopping",
        TunnelEnd::QuicBack(_) => b"agent moving to QUIC",
        _ => b"agent reconnecting",
    };
    connection.close(tunnel::close_code::NO_ERROR, reason);
    if let Some(endpoint) = endpoint {
        endpoint.wait_idle().await;
    }
    end
}

/// How long `transport = "auto"` waits for a QUIC handshake before it
/// tries TCP.
const QUIC_HANDSHAKE_PATIENCE: Duration = Duration::from_secs(5);

/// A tunnel connection by the configured transport: QUIC, TCP, or QUIC
/// first and TCP when QUIC has no handshake in time. The QUIC endpoint,
/// when there is one, is waited on after the connection closes.
async fn dial_transport(
    config: &AgentConfig,
    address: &str,
) -> Result<(Option<quinn::Endpoint>, TunnelConnection), TunnelEnd> {
    match config.edge.transport {
        TransportChoice::Quic => {
            let (endpoint, connection) = dial(config, address).await?;
            Ok((Some(endpoint), TunnelConnection::Quic(connection)))
        }
        TransportChoice::Tcp => Ok((None, dial_tcp(config, address).await?)),
        TransportChoice::Auto => {
            let quic = tokio::time::timeout(QUIC_HANDSHAKE_PATIENCE, dial(config, address)).await;
            let why = match quic {
                Ok(Ok((endpoint, connection))) => {
                    return Ok((Some(endpoint), TunnelConnection::Quic(connection)));
                }
                Ok(Err(end)) => end,
                Err(_) => TunnelEnd::QuicTimeout(QUIC_HANDSHAKE_PATIENCE),
            };
            tracing::warn!(reason = %why, tcp = %config.edge.tcp_address_for(address), "QUIC does not reach the edge: trying TCP");
            Ok((None, dial_tcp(config, address).await?))
        }
    }
}

/// The tunnel over TLS on TCP, multiplexed by yamux.
async fn dial_tcp(config: &AgentConfig, address: &str) -> Result<TunnelConnection, TunnelEnd> {
    let address = config.edge.tcp_address_for(address);
    let tcp_failure = |error: std::io::Error| TunnelEnd::TcpConnect {
        address: address.clone(),
        error,
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&address),
    )
    .await
    .map_err(|_| tcp_failure(std::io::ErrorKind::TimedOut.into()))?
    .map_err(tcp_failure)?;
    let remote = tcp.peer_addr().map_err(tcp_failure)?;
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(config.edge.keep_alive_seconds))
        .with_interval(Duration::from_secs(5))
        .with_retries(4);
    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
    // What the agent sent, unacknowledged this long: the edge is gone.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(UNANSWERED_LIMIT));
    let tls = tls_config(config, false)?;
    let server_name = config.edge.server_name.clone().unwrap_or_else(|| {
        address
            .rsplit_once(':')
            .map_or("", |(host, _)| host)
            .to_owned()
    });
    let server_name = rustls::pki_types::ServerName::try_from(server_name)
        .map_err(|error| tcp_failure(std::io::Error::other(error.to_string())))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(server_name, tcp))
        .await
        .map_err(|_| tcp_failure(std::io::ErrorKind::TimedOut.into()))?
        .map_err(tcp_failure)?;
    let mux = relay_io::mux::Mux::start(
        stream,
        relay_io::mux::MuxRole::Client,
        relay_io::mux::MuxLimits {
            max_streams: 256,
            max_pending_inbound: 64,
        },
    );
    tracing::info!(%address, "tunnel over TCP");
    Ok(TunnelConnection::Tcp { mux, remote })
}

/// A QUIC connection to the edge at `edge_address`, handshake done.
async fn dial(
    config: &AgentConfig,
    edge_address: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), TunnelEnd> {
    let client = match client_config(config) {
        Ok(client) => client,
        Err(error) => return Err(error.into()),
    };
    let address = match tokio::net::lookup_host(edge_address)
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(address)) => address,
        Ok(None) | Err(_) => {
            return Err(TunnelEnd::Unresolvable {
                address: edge_address.to_owned(),
            });
        }
    };
    let server_name = config.edge.server_name.clone().unwrap_or_else(|| {
        edge_address
            .rsplit_once(':')
            .map_or("", |(host, _)| host)
            .to_owned()
    });
    let bind: SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let endpoint = match quinn::Endpoint::client(bind) {
        Ok(endpoint) => endpoint,
        Err(error) => return Err(TunnelEnd::Socket(error)),
    };
    let connecting = match endpoint.connect_with(client, address, &server_name) {
        Ok(connecting) => connecting,
        Err(error) => return Err(error.into()),
    };
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(error) => return Err(TunnelEnd::Handshake(error)),
    };
    Ok((endpoint, connection))
}

/// Dials the edge and says HELLO, then hangs up: what `relay-agent setup`
/// checks. The edge counts it as this device's agent for that moment (a
/// running agent of the same device is fenced off and comes back later).
pub async fn probe_edge(config: &AgentConfig) -> Result<HelloAck, TunnelEnd> {
    let (endpoint, connection) = dial_transport(config, &config.edge.address).await?;
    let outcome = hello(config, &connection).await.map(|(_, _, ack)| ack);
    connection.close(tunnel::close_code::NO_ERROR, b"agent probe");
    if let Some(endpoint) = endpoint {
        endpoint.wait_idle().await;
    }
    outcome
}

/// HELLO on a new control stream, and the edge's answer.
async fn hello(
    config: &AgentConfig,
    connection: &TunnelConnection,
) -> Result<(TunnelSend, FramedReader<TunnelRecv>, HelloAck), TunnelEnd> {
    let (mut control_send, control_recv) = connection.open_bi().await?;
    let hello = Message::Hello(Hello {
        version: tunnel::PROTOCOL_VERSION,
        credential: config.edge.credential.clone(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    });
    write_message(&mut control_send, &hello).await?;
    let mut control_recv = FramedReader::new(control_recv);
    let reply = match tokio::time::timeout(HELLO_TIMEOUT, control_recv.read_message()).await {
        Ok(Ok(Some(reply))) => reply,
        Ok(Ok(None)) => return Err(ControlError::Closed.into()),
        Ok(Err(error)) => return Err(ControlError::from(error).into()),
        Err(_) => return Err(TunnelEnd::HelloTimeout),
    };
    match reply {
        Message::HelloAck(ack) => Ok((control_send, control_recv, ack)),
        Message::HelloRefused(refused) => Err(TunnelEnd::Refused {
            reason: refused.reason,
            message: refused.message,
        }),
        other => Err(TunnelEnd::Unexpected {
            message: other.name(),
        }),
    }
}

async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> Result<(), ControlError> {
    let mut bytes = BytesMut::new();
    tunnel::encode(message, &mut bytes)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// With `transport = "auto"` on a TCP tunnel: QUIC handshakes, every
/// `quic_probe_seconds` (jittered), until one succeeds. Otherwise never.
async fn probe_quic(
    config: &AgentConfig,
    address: &str,
    connection: &TunnelConnection,
) -> QuicDialled {
    if config.edge.transport != TransportChoice::Auto
        || connection.transport() != relay_io::transport::Transport::Tcp
    {
        return std::future::pending().await;
    }
    let interval = Duration::from_secs(config.edge.quic_probe_seconds);
    loop {
        tokio::time::sleep(jitter(interval)).await;
        match tokio::time::timeout(QUIC_HANDSHAKE_PATIENCE, dial(config, address)).await {
            Ok(Ok((endpoint, connection))) => {
                return QuicDialled {
                    endpoint,
                    connection,
                };
            }
            Ok(Err(end)) => {
                tracing::debug!(reason = %end, "QUIC still does not reach the edge; staying on TCP")
            }
            Err(_) => {
                tracing::debug!(patience = ?QUIC_HANDSHAKE_PATIENCE, "still no QUIC handshake with the edge; staying on TCP")
            }
        }
    }
}

async fn serve_connection(
    config: &AgentConfig,
    address: &str,
    connection: &TunnelConnection,
    printer: Printer,
    stop: CancellationToken,
    retiring: &mut Option<Retiring>,
) -> TunnelEnd {
    let (mut control_send, mut control_recv, ack) = match hello(config, connection).await {
        Ok(hello) => hello,
        Err(end) => return end,
    };
    tracing::info!(device = %ack.device_id, epoch = ack.epoch, transport = %connection.transport(), "connected to the edge");
    let retire_at = tokio::time::Instant::now() + RETIRE_PATIENCE;

    // Link-state reports go out on the control stream through one writer.
    let (reports, mut report_queue) = mpsc::channel::<Message>(64);
    let control_writer = async move {
        while let Some(message) = report_queue.recv().await {
            if write_message(&mut control_send, &message).await.is_err() {
                return;
            }
        }
    };
    let links = tokio_util::task::TaskTracker::new();
    let quic_probe = probe_quic(config, address, connection);
    tokio::pin!(quic_probe);
    let mut unanswered = Unanswered::new(connection);
    let mut check = tokio::time::interval(UNANSWERED_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let serve = async {
        loop {
            tokio::select! {
                dialled = &mut quic_probe => return TunnelEnd::QuicBack(dialled),
                _ = tokio::time::sleep_until(retire_at), if retiring.is_some() => {
                    if let Some(old) = retiring.take() {
                        old.close();
                    }
                }
                reason = async {
                    match retiring.as_ref() {
                        Some(old) => old.connection.closed().await,
                        None => std::future::pending().await,
                    }
                }, if retiring.is_some() => {
                    tracing::debug!(%reason, "the draining instance closed the old tunnel");
                    *retiring = None;
                }
                _ = check.tick(), if unanswered.is_some() => {
                    if let Some(end) = unanswered.as_mut().and_then(|u| u.check(connection, tokio::time::Instant::now())) {
                        tracing::warn!(after = ?UNANSWERED_LIMIT, "the edge answers nothing: trying again");
                        return end;
                    }
                }
                incoming = connection.accept_bi() => match incoming {
                    Ok((send, recv)) => {
                        let printer = printer.clone();
                        let reports = reports.clone();
                        let read_only = config.read_only;
                        links.spawn(serve_printer_link(send, recv, printer, reports, read_only));
                    }
                    Err(error) => return error.into(),
                },
                message = control_recv.read_message() => match message {
                    Ok(Some(Message::GoAway(go_away))) => {
                        let after = Duration::from_millis(u64::from(go_away.reconnect_after_ms.unwrap_or(0)));
                        if go_away.reason == GoAwayReason::Superseded {
                            return TunnelEnd::Superseded;
                        }
                        return TunnelEnd::GoAway { after };
                    }
                    Ok(Some(Message::Ignored { .. })) => {}
                    Ok(Some(other)) => return TunnelEnd::Unexpected { message: other.name() },
                    Ok(None) => return ControlError::Closed.into(),
                    Err(error) => return ControlError::from(error).into(),
                },
                _ = stop.cancelled() => return TunnelEnd::Stopped,
            }
        }
    };
    let end = tokio::select! {
        end = serve => end,
        () = control_writer => ControlError::Closed.into(),
    };
    links.close();
    end
}

/// Notices an edge that stopped answering a QUIC connection: frames it
/// must acknowledge went out (the edge acknowledges at once) and no
/// datagram came back for [`UNANSWERED_LIMIT`]. Reads the connection's
/// counters only; sends nothing.
#[derive(Debug)]
struct Unanswered {
    /// Frames sent that the edge must acknowledge.
    sent: u64,
    /// Datagrams received.
    received: u64,
    /// Since when something sent has had no answer.
    waiting_since: Option<tokio::time::Instant>,
}

impl Unanswered {
    /// `None` over TCP, where the kernel does this.
    fn new(connection: &TunnelConnection) -> Option<Unanswered> {
        let (sent, received) = connection.eliciting_sent_and_received()?;
        Some(Unanswered {
            sent,
            received,
            waiting_since: None,
        })
    }

    fn check(
        &mut self,
        connection: &TunnelConnection,
        now: tokio::time::Instant,
    ) -> Option<TunnelEnd> {
        let (sent, received) = connection.eliciting_sent_and_received()?;
        if received != self.received {
            self.waiting_since = None;
        } else if sent != self.sent && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        self.sent = sent;
        self.received = received;
        match self.waiting_since {
            Some(since) if now.duration_since(since) >= UNANSWERED_LIMIT => {
                connection.close(0, b"the edge answers nothing");
                Some(TunnelEnd::Unanswered(UNANSWERED_LIMIT))
            }
            _ => None,
        }
    }
}

/// One printer link: LINK_OPEN in, a printer connection, then MQTT
/// relayed both ways until either side ends.
async fn serve_printer_link(
    mut send: TunnelSend,
    recv: TunnelRecv,
    printer: Printer,
    reports: mpsc::Sender<Message>,
    read_only: bool,
) {
    let Printer {
        config: printer,
        dialler,
        standby,
        local,
    } = printer;
    let mut recv = FramedReader::new(recv);
    let link_id = match recv.read_message().await {
        Ok(Some(Message::LinkOpen(open))) => open.link,
        _ => return,
    };
    if let Some(local) = local {
        serve_hub_link(send, recv, link_id, &local, &reports).await;
        return;
    }
    // MQTT bytes the edge sent right after LINK_OPEN are in the buffer.
    let (mut recv, from_edge) = recv.into_parts();
    let link = |state, reason, detail| link_state(link_id, state, reason, detail);
    let _ = reports.try_send(link(LinkState::Connecting, None, None));
    // Held until the link ends: the standby makes no connection meanwhile.
    let mut lease = match &standby {
        Some(standby) => Some(standby.lease().await),
        None => None,
    };
    let warm = lease.as_mut().and_then(|lease| lease.connection.take());
    let connected = match warm {
        Some(connected) => Ok(connected),
        None => dialler.dial(&printer, LINK_DIAL_PATIENCE).await,
    };
    let connected_at = tokio::time::Instant::now();
    let (stream, leftover) = match connected {
        Ok(connected) => connected,
        Err(DialError { failure, dialled }) => {
            // The dialler logged it. A link refused without a dial (the
            // dialler backing off) is no news for the edge's status.
            refuse_link(&mut send, link_id, failure, dialled.then_some(&reports)).await;
            return;
        }
    };
    if write_message(
        &mut send,
        &Message::LinkAccept(LinkAccept {
            link: link_id,
            printer_serial: match &printer.kind {
                crate::config::PrinterKind::Bambu { serial, .. }
                | crate::config::PrinterKind::ElegooCc2 { serial, .. } => Some(serial.clone()),
                crate::config::PrinterKind::Mqtt { .. } => None,
            },
            printer_client_id: match &printer.kind {
                crate::config::PrinterKind::ElegooCc2 { .. } => Some(printer.client_id.clone()),
                _ => None,
            },
            printer_kind: Some(match printer.kind {
                crate::config::PrinterKind::Bambu { .. } => tunnel::PrinterKind::Bambu,
                crate::config::PrinterKind::Mqtt { .. } => tunnel::PrinterKind::GenericMqtt,
                crate::config::PrinterKind::ElegooCc2 { .. } => tunnel::PrinterKind::ElegooCc2,
            }),
            through_agent_hub: false,
        }),
    )
    .await
    .is_err()
    {
        return;
    }
    let _ = reports.try_send(link(LinkState::Up, None, None));
    tracing::info!(link = link_id, "printer link open");
    let outcome = relay_with_printer(
        &mut recv,
        &mut send,
        from_edge,
        (stream, leftover),
        &printer,
        read_only,
    )
    .await;
    send.finish().await;
    tracing::info!(link = link_id, ?outcome, "printer link closed");
    dialler.ended(connected_at.elapsed(), outcome.by_printer());
    let (state, reason, detail) = match outcome {
        RelayEnd::EdgeClosed => (LinkState::Idle, None, None),
        RelayEnd::PrinterClosed => (LinkState::Down, Some(LinkDownReason::Dropped), None),
        RelayEnd::Refused(refusal) => (
            LinkState::Down,
            Some(LinkDownReason::ProtocolError),
            Some(refusal.to_string()),
        ),
    };
    let _ = reports.try_send(link(state, reason, detail));
}

/// A printer link's state, for the edge's status.
fn link_state(
    link_id: u64,
    state: LinkState,
    reason: Option<LinkDownReason>,
    detail: Option<String>,
) -> Message {
    Message::PrinterLink(PrinterLink {
        state,
        reason,
        detail,
        link: Some(link_id),
    })
}

/// Refuses a printer link with why the printer could not be had, and
/// reports the printer down on the control stream when `reports` is
/// given (a link refused without a dial is no news for the edge's status).
async fn refuse_link(
    send: &mut TunnelSend,
    link_id: u64,
    failure: crate::printer::LinkFailure,
    reports: Option<&mpsc::Sender<Message>>,
) {
    if let Some(reports) = reports {
        let _ = reports.try_send(link_state(
            link_id,
            LinkState::Down,
            Some(failure.reason),
            Some(failure.detail.clone()),
        ));
    }
    let refused = Message::LinkRefused(LinkRefused {
        link: link_id,
        reason: failure.reason,
        detail: Some(failure.detail),
    });
    let _ = write_message(send, &refused).await;
    send.finish().await;
}

/// One printer link as a session of the local hub: the printer connection
/// is the hub's, so the link only ends (`Idle`) when the edge lets it go.
async fn serve_hub_link(
    mut send: TunnelSend,
    mut recv: FramedReader<TunnelRecv>,
    link_id: u64,
    local: &Arc<LocalHub>,
    reports: &mpsc::Sender<Message>,
) {
    let link = |state, reason, detail| link_state(link_id, state, reason, detail);
    let _ = reports.try_send(link(LinkState::Connecting, None, None));
    let hub = match local.hub().await {
        Ok(hub) => hub,
        Err(failure) => {
            refuse_link(&mut send, link_id, failure, Some(reports)).await;
            return;
        }
    };
    if write_message(&mut send, &Message::LinkAccept(local.link_accept(link_id)))
        .await
        .is_err()
    {
        return;
    }
    let _ = reports.try_send(link(LinkState::Up, None, None));
    tracing::info!(link = link_id, "printer link open, on the local hub");
    let session = local.next_session_id();
    let let_go =
        crate::local_hub::serve_edge_link(&hub, session, &mut recv, &mut send, &local.stats).await;
    send.finish().await;
    tracing::info!(link = link_id, let_go, "printer link closed");
    let _ = reports.try_send(link(LinkState::Idle, None, None));
}

/// Relays MQTT both ways between a client side (the edge's link, or the
/// local hub) and a printer connection, through the agent's checks and
/// with a CC2's heartbeat, until either side ends; then closes the
/// printer's side.
pub(crate) async fn relay_with_printer<R, W>(
    client_read: &mut R,
    client_write: &mut W,
    from_client: BytesMut,
    (stream, leftover): (Box<dyn crate::printer::PrinterStream>, BytesMut),
    printer: &PrinterConfig,
    read_only: bool,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut printer_read, mut printer_write) = tokio::io::split(stream);
    let (answers, mut answer_queue) = mpsc::channel(64);
    let own_topics = OwnTopics::of(printer);
    let (heartbeat_interval, heartbeat) = match cc2_heartbeat(printer) {
        Some((interval, ping)) => (interval, Some(ping)),
        None => (Duration::from_secs(3600), None),
    };
    let mut heartbeat_timer = tokio::time::interval_at(
        tokio::time::Instant::now() + heartbeat_interval,
        heartbeat_interval,
    );
    let to_printer = relay(
        client_read,
        &mut printer_write,
        from_client,
        Direction::ToPrinter {
            read_only,
            own_topics: own_topics.as_ref(),
            answers: &answers,
            heartbeat: heartbeat.map(|ping| (&mut heartbeat_timer, ping)),
        },
    );
    let to_client = relay(
        &mut printer_read,
        client_write,
        leftover,
        Direction::ToEdge {
            answers: &mut answer_queue,
        },
    );
    let outcome = tokio::select! {
        outcome = to_printer => outcome,
        outcome = to_client => outcome,
    };
    let _ = printer_write.shutdown().await;
    outcome
}

/// Which way packets flow, with the agent's own answers: a PUBLISH that
/// the read-only policy drops is acknowledged by the agent, so the client's
/// QoS 1 flow completes instead of hanging.
#[derive(Debug)]
enum Direction<'a> {
    ToPrinter {
        read_only: bool,
        /// A Bambu printer's own topics: nothing else reaches it.
        own_topics: Option<&'a OwnTopics>,
        answers: &'a mpsc::Sender<Packet>,
        /// A CC2's heartbeat, and when to send it.
        heartbeat: Option<(&'a mut tokio::time::Interval, BytesMut)>,
    },
    ToEdge {
        answers: &'a mut mpsc::Receiver<Packet>,
    },
}

/// What of the printer's topics apps may use, on printers whose broker
/// is the printer itself. A real Bambu printer drops its whole MQTT
/// connection when a client subscribes to another serial's topics; a CC2's
/// registration (the agent's, shared by every app) must not be replaced.
/// The edge never asks for either; the agent, the LAN's last line, makes
/// sure.
#[derive(Debug)]
enum OwnTopics {
    /// Subscribe to its report and request topics (as the edge's Bambu
    /// policy and the agent's own hub allow); publish to the request topic
    /// only.
    Bambu { report: String, request: String },
    /// Anything under `elegoo/<sn>/`, except a registration that names the
    /// agent's own client id.
    ElegooCc2 {
        prefix: String,
        register: String,
        agent_client: String,
    },
}

impl OwnTopics {
    fn of(printer: &PrinterConfig) -> Option<OwnTopics> {
        match &printer.kind {
            crate::config::PrinterKind::Bambu { serial, .. } => Some(OwnTopics::Bambu {
                report: format!("device/{serial}/report"),
                request: format!("device/{serial}/request"),
            }),
            crate::config::PrinterKind::ElegooCc2 { serial, .. } => Some(OwnTopics::ElegooCc2 {
                prefix: format!("elegoo/{serial}/"),
                register: format!("elegoo/{serial}/api_register"),
                agent_client: printer.client_id.clone(),
            }),
            crate::config::PrinterKind::Mqtt { .. } => None,
        }
    }

    fn permits_filter(&self, filter: &str) -> bool {
        match self {
            OwnTopics::Bambu { report, request } => filter == report || filter == request,
            OwnTopics::ElegooCc2 { prefix, .. } => {
                relay_proto::topic::filter_covers(&format!("{prefix}#"), filter)
            }
        }
    }

    fn permits_publish(&self, topic: &str, payload: &[u8]) -> bool {
        match self {
            OwnTopics::Bambu { request, .. } => topic == request,
            OwnTopics::ElegooCc2 {
                prefix,
                register,
                agent_client,
            } => {
                if !topic.starts_with(prefix.as_str()) {
                    return false;
                }
                topic != register
                    || serde_json::from_slice::<serde_json::Value>(payload)
                        .is_ok_and(|registration| registration["client_id"] != **agent_client)
            }
        }
    }
}

/// How often a CC2 hears the agent's heartbeat, and the heartbeat the
/// agent sends on its own registration's request topic, encoded; `None`
/// for other printers.
fn cc2_heartbeat(printer: &PrinterConfig) -> Option<(Duration, BytesMut)> {
    let crate::config::PrinterKind::ElegooCc2 {
        serial,
        heartbeat_interval,
        ..
    } = &printer.kind
    else {
        return None;
    };
    let mut ping = BytesMut::new();
    mqtt::encode(
        &Packet::Publish(mqtt::Publish {
            dup: false,
            qos: mqtt::QoS::AtMostOnce,
            retain: false,
            topic: crate::printer::cc2_request_topic(serial, &printer.client_id),
            packet_id: None,
            payload: bytes::Bytes::from_static(br#"{"type":"PING"}"#),
        }),
        &mut ping,
    )
    .ok()?;
    Some((*heartbeat_interval, ping))
}

#[derive(Debug)]
pub(crate) enum RelayEnd {
    EdgeClosed,
    PrinterClosed,
    Refused(RelayRefusal),
}

impl RelayEnd {
    /// What the printer's side did, for the dialler's pacing: nothing when
    /// the client side ended the relay.
    pub(crate) fn by_printer(&self) -> Option<LinkDownReason> {
        match self {
            RelayEnd::EdgeClosed => None,
            RelayEnd::PrinterClosed => Some(LinkDownReason::Dropped),
            RelayEnd::Refused(_) => Some(LinkDownReason::ProtocolError),
        }
    }
}

/// Why the agent stopped relaying a printer link's packets.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayRefusal {
    #[error("{0} from the edge")]
    NotFromEdge(mqtt::PacketType),
    #[error("{0}")]
    Malformed(#[from] mqtt::DecodeError),
    #[error("cannot encode an answer: {0}")]
    Answer(#[from] mqtt::EncodeError),
}

/// Copies MQTT packets from `reader` to `writer`, decoding each one: the
/// agent is the LAN's last line of defence, so only well-formed packets of
/// the kinds a client may send reach the printer.
async fn relay<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut buffer: BytesMut,
    mut direction: Direction<'_>,
) -> RelayEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let closed = match direction {
        Direction::ToPrinter { .. } => RelayEnd::EdgeClosed,
        Direction::ToEdge { .. } => RelayEnd::PrinterClosed,
    };
    let mut out = BytesMut::new();
    // Bytes of an oversized printer packet still to be thrown away.
    let mut skipping = 0usize;
    loop {
        loop {
            if skipping > 0 {
                let skipped = skipping.min(buffer.len());
                let _ = buffer.split_to(skipped);
                skipping -= skipped;
                if skipping > 0 {
                    break;
                }
            }
            match mqtt::decode_with_bytes(&mut buffer, MAX_PACKET) {
                Ok(Some((packet, wire))) => {
                    if let Direction::ToPrinter {
                        read_only,
                        own_topics,
                        answers,
                        ..
                    } = &direction
                    {
                        match &packet {
                            Packet::Subscribe(subscribe)
                                if own_topics.is_some_and(|own| {
                                    subscribe
                                        .filters
                                        .iter()
                                        .any(|(filter, _)| !own.permits_filter(filter))
                                }) =>
                            {
                                tracing::warn!(
                                    "refused a SUBSCRIBE to topics not the printer's own"
                                );
                                let refused = Packet::SubAck(mqtt::SubAck {
                                    packet_id: subscribe.packet_id,
                                    return_codes: vec![
                                        mqtt::SubscribeReturnCode::Failure;
                                        subscribe.filters.len()
                                    ],
                                });
                                if answers.send(refused).await.is_err() {
                                    return closed;
                                }
                                continue;
                            }
                            Packet::Publish(publish)
                                if own_topics.is_some_and(|own| {
                                    !own.permits_publish(&publish.topic, &publish.payload)
                                }) =>
                            {
                                tracing::warn!(
                                    "dropped a PUBLISH to a topic not the printer's own"
                                );
                                if let Some(id) = publish.packet_id
                                    && answers.send(Packet::PubAck(id)).await.is_err()
                                {
                                    return closed;
                                }
                                continue;
                            }
                            Packet::Publish(publish) if *read_only => {
                                tracing::info!("dropped a PUBLISH: this agent is read-only");
                                if let Some(id) = publish.packet_id
                                    && answers.send(Packet::PubAck(id)).await.is_err()
                                {
                                    return closed;
                                }
                                continue;
                            }
                            Packet::Subscribe(_)
                            | Packet::Unsubscribe(_)
                            | Packet::Publish(_)
                            | Packet::PubAck(_)
                            | Packet::PingReq => {}
                            other => {
                                return RelayEnd::Refused(RelayRefusal::NotFromEdge(
                                    other.packet_type(),
                                ));
                            }
                        }
                    }
                    // Checked, and forwarded as the bytes that came.
                    out.extend_from_slice(&wire);
                }
                Ok(None) => break,
                // A printer packet over the limit is skipped (its size is
                // in its header): one oversized report must not end the
                // link for every app. From the edge, it is a violation.
                Err(mqtt::DecodeError::PacketTooLarge { size, max })
                    if matches!(direction, Direction::ToEdge { .. }) =>
                {
                    tracing::warn!(size, max, "skipped a printer packet over the size limit");
                    skipping = size;
                }
                Err(error) => return RelayEnd::Refused(error.into()),
            }
        }
        if !out.is_empty() {
            if writer.write_all(&out).await.is_err() {
                return closed;
            }
            out.clear();
        }
        let read = match &mut direction {
            Direction::ToEdge { answers } => tokio::select! {
                read = reader.read_buf(&mut buffer) => read,
                Some(answer) = answers.recv() => {
                    if let Err(error) = mqtt::encode(&answer, &mut out) {
                        return RelayEnd::Refused(error.into());
                    }
                    continue;
                }
            },
            Direction::ToPrinter {
                heartbeat: Some((timer, ping)),
                ..
            } => tokio::select! {
                read = reader.read_buf(&mut buffer) => read,
                _ = timer.tick() => {
                    out.extend_from_slice(ping);
                    continue;
                }
            },
            Direction::ToPrinter { .. } => reader.read_buf(&mut buffer).await,
        };
        match read {
            Ok(0) | Err(_) => return closed,
            Ok(_) => {}
        }
    }
}
