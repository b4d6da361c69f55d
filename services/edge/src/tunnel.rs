//! The QUIC listener agents dial: HELLO with the agent credential on the
//! first stream, one live tunnel per device (a newer one fences the older
//! with GO_AWAY and close code SUPERSEDED), printer-link reports logged.

use relay_io::transport::{TunnelConnection, TunnelRecv, TunnelSend};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

use bytes::BytesMut;
use relay_proto::tunnel::{
    self, GoAway, GoAwayReason, HelloAck, HelloRefused, LinkDownReason, LinkState, Message,
    RefusalReason, close_code,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::TunnelConfig;
use crate::limiter::LimitKey;
use crate::start_error::StartError;
use crate::state::EdgeState;
use crate::tls::TlsError;
use relay_io::FramedReader;
use std::net::SocketAddr;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The control stream's first buffer: HELLO and the agent's reports are a
/// few hundred bytes (it grows for a larger one).
const CONTROL_BUFFER: usize = 512;

/// The transport of an agent's tunnel, sized for an idle control channel
/// that carries printer links when apps watch: the agent opens one stream
/// (control) and no unidirectional ones, and sends no datagrams. quinn sets
/// up the state of every stream the peer may open at once when a
/// connection starts, so its default of 100 of each is most of an idle
/// tunnel's memory. Printer links are streams the edge opens, within the
/// agent's limits and at full windows.
pub fn transport(config: &TunnelConfig) -> Result<quinn::TransportConfig, TlsError> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(u64::from(config.idle_timeout_seconds)))
            .map_err(|error| TlsError::Quic(error.to_string()))?,
    ));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.datagram_receive_buffer_size(None);
    Ok(transport)
}

/// The QUIC endpoint agents dial, on a UDP socket with the configured
/// receive buffer.
pub fn endpoint(
    config: &TunnelConfig,
    address: SocketAddr,
    crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
) -> Result<quinn::Endpoint, StartError> {
    let listen_error = |source| StartError::Listen { address, source };
    let mut server = quinn::ServerConfig::with_crypto(crypto);
    server.transport_config(Arc::new(transport(config).map_err(StartError::Tls)?));
    let socket = std::net::UdpSocket::bind(address).map_err(listen_error)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(listen_error)?;
    if let Err(error) =
        state.set_recv_buffer_size((&socket).into(), config.socket_receive_buffer_bytes)
    {
        tracing::warn!(%error, "cannot size the tunnel socket's receive buffer");
    }
    let got = state.recv_buffer_size((&socket).into()).unwrap_or(0);
    // Linux reports twice what it grants (the other half is its overhead).
    if got / 2 < config.socket_receive_buffer_bytes {
        tracing::info!(
            asked = config.socket_receive_buffer_bytes,
            got,
            "the tunnel socket's receive buffer is smaller than configured (raise net.core.rmem_max)"
        );
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| listen_error(std::io::Error::other("no async runtime")))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(listen_error)
}

pub fn spawn_accept_loop(
    endpoint: quinn::Endpoint,
    state: Arc<EdgeState>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    // Its own tracker: waiting on the server's would wait on this loop too,
    // and so always for the whole timeout below.
    let connections = TaskTracker::new();
    tasks.spawn(async move {
        loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => return,
                },
                _ = stop.cancelled() => {
                    // Agents get GO_AWAY from their own tasks and move first;
                    // then the endpoint closes and its UDP socket is released.
                    let _ = tokio::time::timeout(tunnels_drain_patience(&state.config.shutdown), connections_drained(&connections)).await;
                    endpoint.close(quinn::VarInt::from_u32(close_code::GOING_AWAY), b"going away");
                    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
                    return;
                }
            };
            let state = state.clone();
            let stop = stop.clone();
            let span = tracing::info_span!("tunnel", peer = %incoming.remote_address());
            connections.spawn(
                async move {
                    match incoming.await {
                        Ok(connection) => {
                            serve_tunnel(TunnelConnection::Quic(connection), state, stop).await
                        }
                        Err(error) => tracing::debug!(%error, "QUIC handshake failed"),
                    }
                }
                .instrument(span),
            );
        }
    });
}

/// Time for an agent's TLS handshake on the TCP listener.
const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keep-alive on the agents' TCP connections: a vanished agent is
/// noticed within about a minute, as over QUIC.
pub fn tcp_keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(25))
        .with_interval(Duration::from_secs(5))
        .with_retries(4)
}

/// Accepts agents over TLS on TCP, multiplexed by yamux: the same tunnel
/// as over QUIC, for networks that block UDP.
pub fn spawn_tcp_accept_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<EdgeState>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let connections = TaskTracker::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tasks.spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a TCP tunnel connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => {
                    let _ = tokio::time::timeout(tunnels_drain_patience(&state.config.shutdown), connections_drained(&connections)).await;
                    return;
                }
            };
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&tcp_keepalive());
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let state = state.clone();
            let stop = stop.clone();
            let span = tracing::info_span!("tunnel", peer = %remote, transport = "tcp");
            connections.spawn(
                async move {
                    let tls = match tokio::time::timeout(TCP_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("no TLS handshake in time");
                            return;
                        }
                    };
                    if tls.get_ref().1.alpn_protocol() != Some(tunnel::ALPN) {
                        tracing::debug!("no tunnel ALPN: closing");
                        return;
                    }
                    serve_tcp_tunnel(tls, remote, state, stop).await;
                }
                .instrument(span),
            );
        }
    });
}

/// One agent over TLS on TCP, past a handshake that chose the tunnel's
/// ALPN (on the tunnel's TCP listener or the public one): yamux, then the
/// tunnel as over QUIC.
pub async fn serve_tcp_tunnel(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    remote: std::net::SocketAddr,
    state: Arc<EdgeState>,
    stop: CancellationToken,
) {
    let _ = socket2::SockRef::from(tls.get_ref().0).set_tcp_keepalive(&tcp_keepalive());
    // The agent opens one stream; the edge the printer links.
    let mux = relay_io::mux::Mux::start(
        tls,
        relay_io::mux::MuxRole::Server,
        relay_io::mux::MuxLimits {
            max_streams: 256,
            max_pending_inbound: 2,
        },
    );
    let connection = TunnelConnection::Tcp {
        mux: mux.clone(),
        remote,
    };
    serve_tunnel(connection, state, stop).await;
    mux.close("tunnel ended");
}

/// A random delay in `0..=window` ms.
/// How long a draining instance's tunnel stays up after its GO_AWAY: the
/// agent is on another instance well within it (a new tunnel and HELLO).
pub const MOVE_PATIENCE: Duration = Duration::from_secs(5);

/// How long a drain waits for its tunnels once the sessions are gone: the
/// spread of the GO_AWAYs, then [`MOVE_PATIENCE`], and a second to spare.
pub fn tunnels_drain_patience(shutdown: &crate::config::ShutdownConfig) -> Duration {
    Duration::from_millis(u64::from(shutdown.agent_reconnect_spread_ms))
        + MOVE_PATIENCE
        + Duration::from_secs(1)
}

/// Sleeps until `at`; never ends for `None` (a `select!` branch guarded by
/// `at.is_some()`).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn spread_ms(window: u32) -> u32 {
    if window == 0 {
        return 0;
    }
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u32::from_be_bytes(bytes) % (window + 1)
}

fn hello_result(state: &EdgeState, connection: &TunnelConnection, result: &str) {
    state
        .metrics
        .agent_hellos
        .with_label_values(&[result, connection.transport().name()])
        .inc();
}

/// Waits for every tunnel task to end.
async fn connections_drained(connections: &TaskTracker) {
    connections.close();
    connections.wait().await;
}

async fn send_message(send: &mut TunnelSend, message: &Message) -> bool {
    let mut bytes = BytesMut::new();
    tunnel::encode(message, &mut bytes).is_ok() && send.write_all(&bytes).await.is_ok()
}

async fn refuse(
    connection: &TunnelConnection,
    send: &mut TunnelSend,
    reason: RefusalReason,
    message: &str,
) {
    refuse_with_retry(connection, send, reason, message, None).await;
}

async fn refuse_with_retry(
    connection: &TunnelConnection,
    send: &mut TunnelSend,
    reason: RefusalReason,
    message: &str,
    retry_after_ms: Option<u32>,
) {
    let refused = Message::HelloRefused(HelloRefused {
        reason,
        message: Some(message.into()),
        retry_after_ms,
    });
    send_message(send, &refused).await;
    send.finish().await;
    // Closing at once would discard the refusal still in flight; the agent
    // closes when it has read it, or we do after a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    connection.close(close_code::REFUSED, message.as_bytes());
}

/// An agent past HELLO: its tunnel registered, HELLO_ACK sent.
struct Accepted {
    send: TunnelSend,
    control_stream: FramedReader<TunnelRecv>,
    control_queue: mpsc::Receiver<GoAway>,
    device_id: String,
    epoch: u64,
}

async fn serve_tunnel(
    connection: TunnelConnection,
    state: Arc<EdgeState>,
    stop: CancellationToken,
) {
    // Boxed: the HELLO's futures (the store query's above all) are large,
    // and would otherwise stay in every idle tunnel's task for its life.
    let Some(accepted) = Box::pin(accept_hello(&connection, &state)).await else {
        return;
    };
    hold_tunnel(&connection, &state, &stop, accepted).await;
}

/// Refuses a HELLO as rate limited, with a retry a minute later.
async fn refuse_rate_limited(
    state: &EdgeState,
    connection: &TunnelConnection,
    send: &mut TunnelSend,
    message: &str,
) {
    hello_result(state, connection, "rate_limited");
    tracing::info!(reason = message, "agent refused");
    refuse_with_retry(
        connection,
        send,
        RefusalReason::RateLimited,
        message,
        Some(60_000),
    )
    .await;
}

/// Reads and checks HELLO, claims the device, registers the tunnel and
/// answers HELLO_ACK; `None` when the agent was refused (and told why).
async fn accept_hello(connection: &TunnelConnection, state: &Arc<EdgeState>) -> Option<Accepted> {
    let streams = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi()).await;
    let Ok(Ok((mut send, recv))) = streams else {
        connection.close(close_code::PROTOCOL_VIOLATION, b"no control stream");
        return None;
    };
    let mut control_stream =
        FramedReader::with_buffer(recv, BytesMut::with_capacity(CONTROL_BUFFER));
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, control_stream.read_message()).await {
        Ok(Ok(Some(Message::Hello(hello)))) => hello,
        _ => {
            connection.close(close_code::PROTOCOL_VIOLATION, b"expected HELLO");
            return None;
        }
    };
    if hello.version != tunnel::PROTOCOL_VERSION {
        hello_result(state, connection, "unsupported_version");
        refuse(
            connection,
            &mut send,
            RefusalReason::UnsupportedVersion,
            "unsupported tunnel version",
        )
        .await;
        return None;
    }
    // Failures are counted per address, but an address past its allowance
    // refuses only credentials that cannot be valid (malformed): many
    // owners' agents share one address (a carrier's NAT, an office), and a
    // guesser among them must not lock the others out. Guessing is bounded
    // per credential id instead (a secret is guessed for one id), with a
    // reservation so that HELLOs in flight cannot exceed it; and the
    // credential this instance last accepted for an id gets in even when
    // that id's allowance is spent, so that knowing an agent's id is not
    // enough to lock it out.
    let now = std::time::Instant::now();
    let source = LimitKey::Address(connection.remote_address().ip());
    // The credential's public id, to limit guesses and to end the tunnel
    // when it is revoked (the store checks the rest).
    let credential_id = relay_store::credential::PresentedCredential::parse(
        relay_store::credential::CredentialKind::AgentCredential,
        hello.credential.expose(),
    )
    .map(|presented| presented.id.to_owned())
    .unwrap_or_default();
    let attempt = if credential_id.is_empty() {
        if state.agent_failures.is_blocked(&source, now) {
            refuse_rate_limited(
                state,
                connection,
                &mut send,
                "too many failed agent authentications from this address",
            )
            .await;
            return None;
        }
        None
    } else {
        let reserved = state
            .agent_failures
            .begin(vec![LimitKey::KeyId(credential_id.clone())], now);
        if reserved.is_none()
            && !state
                .agents_accepted
                .is_known(&credential_id, hello.credential.expose())
        {
            refuse_rate_limited(
                state,
                connection,
                &mut send,
                "too many failed authentications for this agent credential",
            )
            .await;
            return None;
        }
        reserved
    };
    if state.membership.is_fenced() {
        hello_result(state, connection, "fenced");
        refuse_with_retry(
            connection,
            &mut send,
            RefusalReason::Internal,
            "this edge instance lost its lease; try another",
            Some(1_000),
        )
        .await;
        return None;
    }
    let store = state.authenticator.store().clone();
    let instance_id = state.membership.instance_id.clone();
    // The credential check and the device's claim: one store query.
    let (device_id, epoch) = match store
        .accept_agent(hello.credential.expose(), &instance_id)
        .await
    {
        Ok(Ok(claim)) => {
            state
                .agents_accepted
                .remember(&credential_id, hello.credential.expose());
            (claim.device_id, claim.epoch)
        }
        Ok(Err(failure)) => {
            state
                .agent_failures
                .record_failure(&[source], std::time::Instant::now());
            if let Some(attempt) = attempt {
                attempt.failed();
            }
            hello_result(state, connection, "bad_credential");
            tracing::info!(reason = %failure, "agent refused");
            refuse(
                connection,
                &mut send,
                RefusalReason::BadCredential,
                "bad agent credential",
            )
            .await;
            return None;
        }
        Err(error) => {
            hello_result(state, connection, "store_error");
            tracing::warn!(%error, "cannot check an agent credential and claim its device");
            refuse(
                connection,
                &mut send,
                RefusalReason::Internal,
                "try again later",
            )
            .await;
            return None;
        }
    };
    let (control, control_queue) = mpsc::channel::<GoAway>(2);
    let previous = state.devices.register(
        &device_id,
        epoch,
        &credential_id,
        connection.clone(),
        // Free text from the agent: kept short for the console.
        hello
            .agent_version
            .as_deref()
            .map(|version| version.chars().take(64).collect()),
        control,
    );
    if let Some(previous) = previous {
        tracing::info!(device = %device_id, old_epoch = previous.epoch, epoch, "a newer agent fences the older");
        let _ = previous.control.try_send(GoAway {
            reason: GoAwayReason::Superseded,
            reconnect_after_ms: None,
        });
    }
    let ack = Message::HelloAck(HelloAck {
        version: tunnel::PROTOCOL_VERSION,
        device_id: device_id.clone(),
        epoch,
        keep_alive_ms: Some(state.config.tunnel.keep_alive_seconds.saturating_mul(1000)),
    });
    if !send_message(&mut send, &ack).await {
        state.devices.unregister(&device_id, epoch);
        return None;
    }
    hello_result(state, connection, "accepted");
    tracing::info!(device = %device_id, epoch, transport = %connection.transport(), agent = hello.agent_version.as_deref().unwrap_or("?"), "agent connected");
    Some(Accepted {
        send,
        control_stream,
        control_queue,
        device_id,
        epoch,
    })
}

/// An accepted tunnel, until it ends: the agent's reports logged, GO_AWAYs
/// sent, the claim released.
async fn hold_tunnel(
    connection: &TunnelConnection,
    state: &EdgeState,
    stop: &CancellationToken,
    accepted: Accepted,
) {
    let Accepted {
        mut send,
        mut control_stream,
        mut control_queue,
        device_id,
        epoch,
    } = accepted;
    state.metrics.agents_connected.inc();
    let by_transport = state
        .metrics
        .agents_by_transport
        .with_label_values(&[connection.transport().name()]);
    by_transport.inc();
    // Set once the instance drains: when GO_AWAY goes out, and when the
    // tunnel closes if the agent has not moved by then.
    let mut go_away_at: Option<tokio::time::Instant> = None;
    let mut close_by: Option<tokio::time::Instant> = None;
    let mut control_open = true;
    let end = loop {
        tokio::select! {
            message = control_stream.read_message(), if control_open => match message {
                Ok(Some(Message::PrinterLink(link))) => {
                    tracing::info!(device = %device_id, state = ?link.state, reason = ?link.reason, detail = link.detail.as_deref().unwrap_or(""), "printer link");
                    if link.state == LinkState::Down {
                        state.metrics.printer_link_downs.with_label_values(&[link_down_label(link.reason)]).inc();
                    }
                    // For `relayctl device show`; bounded, so that a slow
                    // store never holds up the control stream for long.
                    let record = state.authenticator.store().record_printer_link(
                        &device_id,
                        link_state_label(link.state),
                        link.reason.map(|reason| link_down_label(Some(reason))),
                        link.detail.as_deref(),
                    );
                    if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(2), record).await {
                        tracing::warn!(device = %device_id, %error, "cannot record the printer link's state");
                    }
                }
                Ok(Some(Message::Ignored { .. })) => {}
                Ok(Some(other)) => break format!("unexpected {other:?}"),
                // Told to move, the agent may end its control stream while
                // its printer links serve on until it is up elsewhere.
                Ok(None) | Err(_) if close_by.is_some() => control_open = false,
                Ok(None) => break "control stream ended".to_owned(),
                Err(error) => break format!("control stream: {error}"),
            },
            outgoing = control_queue.recv() => match outgoing {
                Some(go_away) => {
                    let superseded = go_away.reason == GoAwayReason::Superseded;
                    send_message(&mut send, &Message::GoAway(go_away)).await;
                    if superseded {
                        connection.close(close_code::SUPERSEDED, b"superseded");
                        break "superseded".to_owned();
                    }
                }
                None => break "control closed".to_owned(),
            },
            reason = connection.closed() => break reason,
            _ = stop.cancelled(), if go_away_at.is_none() => {
                let spread = spread_ms(state.config.shutdown.agent_reconnect_spread_ms);
                if state.config.cluster.peer_listen.is_none() {
                    // A lone instance: there is nowhere to move to. The
                    // agent comes back after the spread, to the next process.
                    send_message(&mut send, &Message::GoAway(GoAway { reason: GoAwayReason::Draining, reconnect_after_ms: Some(spread) })).await;
                    // The agent hangs up once it has read GO_AWAY; closing
                    // at once could discard it (and its delay) in flight.
                    send.finish().await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), connection.closed()).await;
                    connection.close(close_code::GOING_AWAY, b"draining");
                    break "draining".to_owned();
                }
                // Each agent is sent away at its own moment within the
                // configured window (all at once would be a HELLO storm at
                // the other instances); the tunnel serves on meanwhile.
                go_away_at = Some(tokio::time::Instant::now() + Duration::from_millis(u64::from(spread)));
            }
            _ = sleep_until_some(go_away_at), if go_away_at.is_some() && close_by.is_none() => {
                // Make before break: the agent dials another instance at once
                // and keeps this tunnel until its new one is up; the new
                // claim then fences this one (or the agent hangs up).
                send_message(&mut send, &Message::GoAway(GoAway { reason: GoAwayReason::Draining, reconnect_after_ms: Some(0) })).await;
                close_by = Some(tokio::time::Instant::now() + MOVE_PATIENCE);
            }
            _ = sleep_until_some(close_by), if close_by.is_some() => {
                connection.close(close_code::GOING_AWAY, b"draining");
                break "draining".to_owned();
            }
        }
    };
    state.devices.unregister(&device_id, epoch);
    state.metrics.agents_connected.dec();
    by_transport.dec();
    // A draining instance releases all its claims in one statement when it
    // ends its lease. Boxed, as the HELLO is.
    let store = state.authenticator.store();
    if !stop.is_cancelled()
        && let Err(error) =
            Box::pin(store.release_device(&device_id, &state.membership.instance_id, epoch)).await
    {
        tracing::warn!(%error, "cannot release the device's claim; the lease covers it");
    }
    tracing::info!(device = %device_id, epoch, %end, "agent disconnected");
}

/// How a printer link state is named in the store.
fn link_state_label(state: LinkState) -> &'static str {
    match state {
        LinkState::Idle => "idle",
        LinkState::Connecting => "connecting",
        LinkState::Up => "up",
        LinkState::Down => "down",
        LinkState::Other(_) => "other",
    }
}

/// The `reason` label of `relay_edge_printer_link_downs_total`.
fn link_down_label(reason: Option<LinkDownReason>) -> &'static str {
    match reason {
        Some(LinkDownReason::CredentialsRefused) => "credentials_refused",
        Some(LinkDownReason::TlsFailure) => "tls_failure",
        Some(LinkDownReason::Unreachable) => "unreachable",
        Some(LinkDownReason::TooManyClients) => "too_many_clients",
        Some(LinkDownReason::Dropped) => "dropped",
        Some(LinkDownReason::ProtocolError) => "protocol_error",
        Some(LinkDownReason::TimedOut) => "timed_out",
        Some(LinkDownReason::Policy) => "policy",
        Some(LinkDownReason::NotHere) => "not_here",
        Some(LinkDownReason::Other(_)) | None => "other",
    }
}
