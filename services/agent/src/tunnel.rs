//! The QUIC tunnel to the edge: dial, HELLO on the control stream, then
//! serve the printer-link streams the edge opens, relaying MQTT between
//! each and a fresh printer connection. Reconnects with jittered exponential
//! backoff; a GO_AWAY makes it reconnect at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use relay_io::FramedReader;
use relay_proto::mqtt::{self, Packet};
use relay_proto::tunnel::{
    self, GoAwayReason, Hello, LinkAccept, LinkDownReason, LinkRefused, LinkState, Message,
    PrinterLink,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, PrinterConfig};
use crate::printer;
use crate::standby::Standby;

/// Largest MQTT packet the agent relays in either direction.
const MAX_PACKET: usize = 1 << 20;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one tunnel connection ended.
#[derive(Debug, thiserror::Error)]
pub enum TunnelEnd {
    #[error("cannot reach the edge: {0}")]
    Unreachable(String),
    #[error("the edge refused this agent: {0}")]
    Refused(String),
    #[error("the edge asked to reconnect")]
    GoAway { after: Duration },
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("stopped")]
    Stopped,
}

/// Runs until `stop`: connect, serve, reconnect.
pub async fn run(config: AgentConfig, printer: PrinterConfig, stop: CancellationToken) {
    let printer = Arc::new(printer);
    let standby = config
        .always_on
        .then(|| Arc::new(Standby::start(printer.clone())));
    let mut backoff = Duration::from_millis(500);
    const MAX_BACKOFF: Duration = Duration::from_secs(60);
    loop {
        let end = run_once(&config, printer.clone(), standby.clone(), stop.clone()).await;
        let wait = match &end {
            TunnelEnd::Stopped => return,
            TunnelEnd::GoAway { after } => {
                backoff = Duration::from_millis(500);
                *after
            }
            TunnelEnd::Refused(_) => MAX_BACKOFF,
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

fn client_config(config: &AgentConfig) -> Result<quinn::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(&config.edge.ca_file)
        .map_err(|e| format!("{}: {e}", config.edge.ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(certificate.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnel::ALPN.to_vec()];
    // The credential travels in HELLO on a finished handshake, never 0-RTT.
    tls.enable_early_data = false;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(config.edge.keep_alive_seconds)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(config.edge.keep_alive_seconds * 4))
            .map_err(|e| e.to_string())?,
    ));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

async fn run_once(
    config: &AgentConfig,
    printer: Arc<PrinterConfig>,
    standby: Option<Arc<Standby>>,
    stop: CancellationToken,
) -> TunnelEnd {
    let client = match client_config(config) {
        Ok(client) => client,
        Err(error) => return TunnelEnd::Unreachable(error),
    };
    let address = match tokio::net::lookup_host(&config.edge.address)
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(address)) => address,
        Ok(None) | Err(_) => {
            return TunnelEnd::Unreachable(format!("cannot resolve {}", config.edge.address));
        }
    };
    let server_name = config.edge.server_name.clone().unwrap_or_else(|| {
        config
            .edge
            .address
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
        Err(error) => return TunnelEnd::Unreachable(error.to_string()),
    };
    let connecting = match endpoint.connect_with(client, address, &server_name) {
        Ok(connecting) => connecting,
        Err(error) => return TunnelEnd::Unreachable(error.to_string()),
    };
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(error) => return TunnelEnd::Unreachable(error.to_string()),
    };
    let end = serve_connection(config, &connection, printer, standby, stop).await;
    let reason: &[u8] = match end {
        TunnelEnd::Stopped => b"agent stopping",
        _ => b"agent reconnecting",
    };
    connection.close(
        quinn::VarInt::from_u32(tunnel::close_code::NO_ERROR),
        reason,
    );
    endpoint.wait_idle().await;
    end
}

async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> Result<(), String> {
    let mut bytes = BytesMut::new();
    tunnel::encode(message, &mut bytes).map_err(|e| e.to_string())?;
    writer.write_all(&bytes).await.map_err(|e| e.to_string())
}

async fn serve_connection(
    config: &AgentConfig,
    connection: &quinn::Connection,
    printer: Arc<PrinterConfig>,
    standby: Option<Arc<Standby>>,
    stop: CancellationToken,
) -> TunnelEnd {
    let (mut control_send, control_recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => return TunnelEnd::Lost(error.to_string()),
    };
    let hello = Message::Hello(Hello {
        version: tunnel::PROTOCOL_VERSION,
        credential: config.edge.credential.clone(),
        agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
    });
    if let Err(error) = write_message(&mut control_send, &hello).await {
        return TunnelEnd::Lost(error);
    }
    let mut control_recv = FramedReader::new(control_recv);
    let reply = match tokio::time::timeout(HELLO_TIMEOUT, control_recv.read_message()).await {
        Ok(Ok(Some(reply))) => reply,
        Ok(Ok(None)) => return TunnelEnd::Lost("control stream closed".into()),
        Ok(Err(error)) => return TunnelEnd::Protocol(error.to_string()),
        Err(_) => return TunnelEnd::Lost("no answer to HELLO".into()),
    };
    match reply {
        Message::HelloAck(ack) => {
            tracing::info!(device = %ack.device_id, epoch = ack.epoch, "connected to the edge");
        }
        Message::HelloRefused(refused) => {
            return TunnelEnd::Refused(format!(
                "{:?}{}",
                refused.reason,
                refused
                    .message
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
        other => return TunnelEnd::Protocol(format!("unexpected {other:?}")),
    }

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
    let serve = async {
        loop {
            tokio::select! {
                incoming = connection.accept_bi() => match incoming {
                    Ok((send, recv)) => {
                        let printer = printer.clone();
                        let reports = reports.clone();
                        let read_only = config.read_only;
                        let standby = standby.clone();
                        links.spawn(serve_printer_link(send, recv, printer, standby, reports, read_only));
                    }
                    Err(error) => return TunnelEnd::Lost(error.to_string()),
                },
                message = control_recv.read_message() => match message {
                    Ok(Some(Message::GoAway(go_away))) => {
                        let after = Duration::from_millis(u64::from(go_away.reconnect_after_ms.unwrap_or(0)));
                        if go_away.reason == GoAwayReason::Superseded {
                            return TunnelEnd::Refused("another agent took over this device".into());
                        }
                        return TunnelEnd::GoAway { after };
                    }
                    Ok(Some(Message::Ignored { .. })) => {}
                    Ok(Some(other)) => return TunnelEnd::Protocol(format!("unexpected {other:?} on control")),
                    Ok(None) => return TunnelEnd::Lost("control stream closed".into()),
                    Err(error) => return TunnelEnd::Lost(error.to_string()),
                },
                _ = stop.cancelled() => return TunnelEnd::Stopped,
            }
        }
    };
    let end = tokio::select! {
        end = serve => end,
        () = control_writer => TunnelEnd::Lost("control stream closed".into()),
    };
    links.close();
    end
}

/// One printer link: LINK_OPEN in, a printer connection, then MQTT
/// relayed both ways until either side ends.
async fn serve_printer_link(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    printer: Arc<PrinterConfig>,
    standby: Option<Arc<Standby>>,
    reports: mpsc::Sender<Message>,
    read_only: bool,
) {
    let mut recv = FramedReader::new(recv);
    let link_id = match recv.read_message().await {
        Ok(Some(Message::LinkOpen(open))) => open.link,
        _ => return,
    };
    // MQTT bytes the edge sent right after LINK_OPEN are in the buffer.
    let (mut recv, from_edge) = recv.into_parts();
    let link = |state, reason: Option<LinkDownReason>, detail: Option<String>| {
        Message::PrinterLink(PrinterLink {
            state,
            reason,
            detail,
            link: Some(link_id),
        })
    };
    let _ = reports.try_send(link(LinkState::Connecting, None, None));
    // Held until the link ends: the standby makes no connection meanwhile.
    let mut lease = match &standby {
        Some(standby) => Some(standby.lease().await),
        None => None,
    };
    let warm = lease.as_mut().and_then(|lease| lease.connection.take());
    let connected = match warm {
        Some(connected) => Ok(connected),
        None => printer::connect(&printer).await,
    };
    let (stream, leftover) = match connected {
        Ok(connected) => connected,
        Err(failure) => {
            tracing::warn!(reason = ?failure.reason, detail = %failure.detail, "printer connection failed");
            let _ = reports.try_send(link(
                LinkState::Down,
                Some(failure.reason),
                Some(failure.detail.clone()),
            ));
            let refused = Message::LinkRefused(LinkRefused {
                link: link_id,
                reason: failure.reason,
                detail: Some(failure.detail),
            });
            let _ = write_message(&mut send, &refused).await;
            let _ = send.finish();
            return;
        }
    };
    if write_message(
        &mut send,
        &Message::LinkAccept(LinkAccept {
            link: link_id,
            printer_kind: Some(match printer.kind {
                crate::config::PrinterKind::Bambu { .. } => tunnel::PrinterKind::Bambu,
                crate::config::PrinterKind::Mqtt { .. } => tunnel::PrinterKind::GenericMqtt,
            }),
        }),
    )
    .await
    .is_err()
    {
        return;
    }
    let _ = reports.try_send(link(LinkState::Up, None, None));
    tracing::info!(link = link_id, "printer link open");
    let (mut printer_read, mut printer_write) = tokio::io::split(stream);
    let (answers, mut answer_queue) = mpsc::channel(64);
    let to_printer = relay(
        &mut recv,
        &mut printer_write,
        from_edge,
        Direction::ToPrinter {
            read_only,
            answers: &answers,
        },
    );
    let to_edge = relay(
        &mut printer_read,
        &mut send,
        leftover,
        Direction::ToEdge {
            answers: &mut answer_queue,
        },
    );
    let outcome = tokio::select! {
        outcome = to_printer => outcome,
        outcome = to_edge => outcome,
    };
    let _ = printer_write.shutdown().await;
    let _ = send.finish();
    tracing::info!(link = link_id, ?outcome, "printer link closed");
    let (state, reason, detail) = match outcome {
        RelayEnd::EdgeClosed => (LinkState::Idle, None, None),
        RelayEnd::PrinterClosed => (LinkState::Down, Some(LinkDownReason::Dropped), None),
        RelayEnd::Refused(detail) => (
            LinkState::Down,
            Some(LinkDownReason::ProtocolError),
            Some(detail),
        ),
    };
    let _ = reports.try_send(link(state, reason, detail));
}

/// Which way packets flow, with the agent's own answers: a PUBLISH that
/// the read-only policy drops is acknowledged by the agent, so the client's
/// QoS 1 flow completes instead of hanging.
#[derive(Debug)]
enum Direction<'a> {
    ToPrinter {
        read_only: bool,
        answers: &'a mpsc::Sender<Packet>,
    },
    ToEdge {
        answers: &'a mut mpsc::Receiver<Packet>,
    },
}

#[derive(Debug)]
enum RelayEnd {
    EdgeClosed,
    PrinterClosed,
    Refused(String),
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
    loop {
        loop {
            match mqtt::decode_with_bytes(&mut buffer, MAX_PACKET) {
                Ok(Some((packet, wire))) => {
                    if let Direction::ToPrinter { read_only, answers } = &direction {
                        match &packet {
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
                                return RelayEnd::Refused(format!(
                                    "{} from the edge",
                                    other.packet_type()
                                ));
                            }
                        }
                    }
                    // Checked, and forwarded as the bytes that came.
                    out.extend_from_slice(&wire);
                }
                Ok(None) => break,
                Err(error) => return RelayEnd::Refused(error.to_string()),
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
                    if mqtt::encode(&answer, &mut out).is_err() {
                        return RelayEnd::Refused("cannot encode an answer".into());
                    }
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
