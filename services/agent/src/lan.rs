//! LAN apps on the printer's one connection: MQTT listeners (plain, and
//! TLS as a "virtual printer" with a certificate made at the first start)
//! whose clients become sessions of the agent's local hub
//! ([`crate::local_hub`]). They need neither the edge nor the internet.
//!
//! Each client logs in with the printer's own user and access code (or
//! the `[lan]` user of the owner's choice) and is held to the same limits
//! as at the edge: client count, packet size, keep-alive, subscriptions,
//! and, through the hub, the printer's own topics and publish rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use relay_hub::SessionAttach;
use relay_hub::close::{Close, close_for_decode_error, close_for_v5_decode_error};
use relay_hub::mqtt5_session::{self, Inbound, ServerOffer, V5Session};
use relay_hub_io::{Mqtt5Translator, Outbound, outbound_queue};
use relay_io::{FrameError, FramedReader};
use relay_proto::Secret;
use relay_proto::mqtt::{self, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet};
use relay_proto::mqtt5::{self, ReasonCode};
use relay_proto::topic::{TopicLimits, validate_topic_filter, validate_topic_name};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{LanSection, PrinterConfig, PrinterKind};
use crate::local_hub::LocalHub;

/// A client that sends no CONNECT within this is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the agent logs what the printer's one connection serves.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(300);

/// Who may log in on the LAN.
#[derive(Debug, Clone)]
struct Login {
    username: Option<String>,
    password: Option<Secret<String>>,
    allow_anonymous: bool,
}

impl Login {
    /// `[lan]`'s user, or the printer's own.
    fn of(lan: &LanSection, printer: &PrinterConfig) -> Login {
        let (username, password) = match (&lan.username, &lan.password) {
            (Some(username), password) => (Some(username.clone()), password.clone()),
            (None, _) => printer.credentials(),
        };
        Login {
            username,
            password,
            allow_anonymous: lan.allow_anonymous,
        }
    }

    /// CONNACK 0, 4 (wrong user or password) or 5 (none given, or no
    /// user configured to check against).
    fn check(&self, connect: &Connect) -> ConnectReturnCode {
        let Some(given_user) = &connect.username else {
            return if self.allow_anonymous {
                ConnectReturnCode::Accepted
            } else {
                ConnectReturnCode::NotAuthorized
            };
        };
        let Some(user) = &self.username else {
            return if self.allow_anonymous {
                ConnectReturnCode::Accepted
            } else {
                ConnectReturnCode::NotAuthorized
            };
        };
        let given_password = connect
            .password
            .as_ref()
            .map(|password| password.expose().as_ref())
            .unwrap_or_default();
        let password = self
            .password
            .as_ref()
            .map(|password| password.expose().as_bytes())
            .unwrap_or_default();
        let user_ok = constant_time_eq(given_user.as_bytes(), user.as_bytes());
        let password_ok = constant_time_eq(given_password, password);
        if user_ok && password_ok {
            ConnectReturnCode::Accepted
        } else {
            ConnectReturnCode::BadUserNameOrPassword
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The LAN listeners, shared by every client.
struct Lan {
    config: LanSection,
    login: Login,
    local: Arc<LocalHub>,
}

/// Where the LAN listeners listen, once bound; `None`: not configured, or
/// could not start (logged).
#[derive(Debug, Default, Clone, Copy)]
pub struct LanBound {
    pub plain: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub cc2_discovery: Option<SocketAddr>,
}

/// Starts the listeners of `[lan]` until `stop`, and returns where they
/// listen once bound. A listener that cannot start is logged and left out;
/// the tunnel runs regardless.
pub async fn start(config: LanSection, local: Arc<LocalHub>, stop: CancellationToken) -> LanBound {
    let login = Login::of(&config, local.printer());
    let tls = match config.tls_listen {
        Some(_) => match tls_acceptor(&config, local.printer()) {
            Ok(acceptor) => Some(acceptor),
            Err(error) => {
                tracing::error!(%error, "the LAN TLS listener cannot start");
                None
            }
        },
        None => None,
    };
    let lan = Arc::new(Lan {
        config: config.clone(),
        login,
        local: local.clone(),
    });
    let mut bound = LanBound::default();
    if let Some(address) = &config.listen {
        bound.plain = spawn_listener(address, None, lan.clone(), stop.clone()).await;
    }
    if let (Some(address), Some(tls)) = (&config.tls_listen, tls) {
        bound.tls = spawn_listener(address, Some(tls), lan.clone(), stop.clone()).await;
    }
    if let (Some(address), PrinterKind::ElegooCc2 { serial, .. }) =
        (&config.cc2_discovery_listen, &local.printer().kind)
    {
        let identity = crate::cc2_discovery::DiscoveryIdentity {
            name: config.cc2_discovery_name.clone(),
            serial: serial.clone(),
            login_required: !config.allow_anonymous,
        };
        bound.cc2_discovery = crate::cc2_discovery::start(address, identity, stop.clone()).await;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SUMMARY_INTERVAL);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                () = stop.cancelled() => return,
            }
            let up = local.printer_up().await;
            tracing::info!(
                printer_connections = local.stats.printer_connections.load(Ordering::Relaxed),
                lan_refusals = local.stats.lan_refusals.load(Ordering::Relaxed),
                lan_bytes_in = local.stats.lan_bytes_in.load(Ordering::Relaxed),
                lan_bytes_out = local.stats.lan_bytes_out.load(Ordering::Relaxed),
                "{}",
                local.stats.summary(up)
            );
        }
    });
    bound
}

async fn spawn_listener(
    address: &str,
    tls: Option<tokio_rustls::TlsAcceptor>,
    lan: Arc<Lan>,
    stop: CancellationToken,
) -> Option<SocketAddr> {
    let listener = match TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%address, %error, "the LAN listener cannot start");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    tracing::info!(address = %bound, tls = tls.is_some(), "serving LAN apps");
    tokio::spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "LAN accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            let lan = lan.clone();
            let tls = tls.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = serve_connection(stream, remote, tls, &lan) => {}
                    () = stop.cancelled() => {}
                }
            });
        }
    });
    Some(bound)
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    lan: &Lan,
) {
    let _ = stream.set_nodelay(true);
    match tls {
        Some(acceptor) => {
            match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_client(stream, remote, lan).await,
                _ => {
                    lan.local.stats.lan_refusals.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, "LAN TLS handshake failed");
                }
            }
        }
        None => serve_client(stream, remote, lan).await,
    }
}

/// A LAN client's first packet, in its own MQTT version.
enum FirstConnect {
    V3(Connect),
    V5(Box<mqtt5::Connect>),
}

/// Why a LAN client's first packet is no CONNECT to serve.
enum FirstError {
    /// Another packet came first.
    NotConnect,
    V3(DecodeError),
    V5(mqtt5::DecodeError),
}

fn decode_first(
    buffer: &mut bytes::BytesMut,
    max_packet: usize,
) -> Result<Option<FirstConnect>, FirstError> {
    if mqtt5::starts_with_connect(buffer) {
        return match mqtt5::decode(buffer, max_packet) {
            Ok(Some(mqtt5::Packet::Connect(connect))) => {
                Ok(Some(FirstConnect::V5(Box::new(connect))))
            }
            Ok(Some(_)) => Err(FirstError::NotConnect),
            Ok(None) => Ok(None),
            Err(error) => Err(FirstError::V5(error)),
        };
    }
    match mqtt::decode(buffer, max_packet) {
        Ok(Some(Packet::Connect(connect))) => Ok(Some(FirstConnect::V3(connect))),
        Ok(Some(_)) => Err(FirstError::NotConnect),
        Ok(None) => Ok(None),
        Err(error) => Err(FirstError::V3(error)),
    }
}

/// A refusal in the client's own version: a 3.1.1 return code, or the MQTT
/// 5 reason code that says the same.
fn refusal_reason(code: ConnectReturnCode) -> ReasonCode {
    match code {
        ConnectReturnCode::BadUserNameOrPassword => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        ConnectReturnCode::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
        ConnectReturnCode::IdentifierRejected => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        ConnectReturnCode::UnacceptableProtocolVersion => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        _ => ReasonCode::SERVER_UNAVAILABLE,
    }
}

async fn serve_client<IO>(io: IO, remote: SocketAddr, lan: &Lan)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin,
{
    let stats = lan.local.stats.clone();
    let refused = || {
        stats.lan_refusals.fetch_add(1, Ordering::Relaxed);
    };
    let (read, mut write) = tokio::io::split(io);
    let mut read = FramedReader::new(Counted {
        inner: read,
        stats: stats.clone(),
    });
    let max_packet = lan.config.max_packet;
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read.read_frame(|buffer| decode_first(buffer, max_packet)),
    )
    .await;
    let (connect, v5) = match first {
        Ok(Ok(Some(FirstConnect::V3(connect)))) => (connect, None),
        Ok(Ok(Some(FirstConnect::V5(connect)))) => {
            if connect.properties.authentication_method().is_some() {
                refused();
                send_refusal(&mut write, None, ReasonCode::BAD_AUTHENTICATION_METHOD).await;
                return;
            }
            let (connect, v5) = mqtt5_session::neutral_connect(*connect, || {
                format!("lan-{}", lan.local.next_session_id())
            });
            (connect, Some(v5))
        }
        Ok(Err(FrameError::Decode(FirstError::V3(DecodeError::UnsupportedProtocolLevel(_))))) => {
            refused();
            send_connack(&mut write, ConnectReturnCode::UnacceptableProtocolVersion).await;
            return;
        }
        Ok(Err(FrameError::Decode(FirstError::V5(error)))) => {
            refused();
            let reason = match &error {
                mqtt5::DecodeError::Packet(DecodeError::PacketTooLarge { .. }) => {
                    ReasonCode::PACKET_TOO_LARGE
                }
                _ => ReasonCode::MALFORMED_PACKET,
            };
            tracing::info!(%remote, %error, "LAN client refused: malformed MQTT 5 CONNECT");
            send_refusal(&mut write, None, reason).await;
            return;
        }
        _ => {
            refused();
            tracing::info!(%remote, "LAN client sent no CONNECT");
            return;
        }
    };
    let v5_reason = |code| v5.as_ref().map(|_| refusal_reason(code));
    let code = lan.login.check(&connect);
    if code != ConnectReturnCode::Accepted {
        refused();
        tracing::info!(%remote, client = %connect.client_id, code = ?code, "LAN client refused: credentials");
        send_refusal_or_connack(&mut write, v5_reason(code), code).await;
        return;
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        refused();
        let code = ConnectReturnCode::IdentifierRejected;
        send_refusal_or_connack(&mut write, v5_reason(code), code).await;
        return;
    }
    // A place among the LAN clients, held until the session ends.
    let Some(_place) = Place::take(&lan.local, lan.config.max_clients) else {
        refused();
        tracing::info!(%remote, max = lan.config.max_clients, "LAN client refused: too many clients");
        let code = ConnectReturnCode::ServerUnavailable;
        send_refusal_or_connack(
            &mut write,
            v5.as_ref().map(|_| ReasonCode::QUOTA_EXCEEDED),
            code,
        )
        .await;
        return;
    };
    let hub = match lan.local.hub().await {
        Ok(hub) => hub,
        Err(failure) => {
            refused();
            tracing::info!(%remote, reason = ?failure.reason, detail = %failure.detail, "LAN client refused: the printer is not reachable");
            let code = ConnectReturnCode::ServerUnavailable;
            send_refusal_or_connack(&mut write, v5_reason(code), code).await;
            return;
        }
    };
    let will = match connect.will.clone() {
        Some(will) => {
            let allowed = validate_topic_name(&will.topic, &TopicLimits::SPEC).is_ok()
                && hub.policy().check_publish(&will.topic, will.retain).is_ok();
            if !allowed {
                refused();
                let code = ConnectReturnCode::NotAuthorized;
                send_refusal_or_connack(&mut write, v5_reason(code), code).await;
                return;
            }
            Some(mqtt::Publish {
                dup: false,
                qos: will.qos,
                retain: will.retain,
                topic: will.topic,
                packet_id: None,
                payload: will.payload,
            })
        }
        None => None,
    };
    let client_id = if connect.client_id.is_empty() {
        format!("lan-{}", lan.local.next_session_id())
    } else {
        connect.client_id.clone()
    };
    let session = lan.local.next_session_id();
    let (outbound, mut receiver, ended) = outbound_queue(lan.config.max_outbound_bytes);
    let attach = SessionAttach {
        sink: outbound.clone(),
        client_id: client_id.clone(),
        will,
        max_subscriptions: lan.config.max_subscriptions,
        max_unacknowledged: MAX_UNACKNOWLEDGED_PUBLISHES,
        peer: false,
        mqtt5: v5.is_some(),
    };
    let keep_alive = match connect.keep_alive {
        0 => lan.config.max_keep_alive_seconds,
        asked => asked.min(lan.config.max_keep_alive_seconds),
    };
    // CONNACK first: the hub's first deliveries (a retained message, the
    // full report) follow it on the same queue.
    let translator = match v5 {
        Some(v5) => {
            let offer = ServerOffer {
                maximum_packet_size: max_packet,
                receive_maximum: u16::try_from(MAX_UNACKNOWLEDGED_PUBLISHES).unwrap_or(u16::MAX),
                retain_available: hub.policy().retain,
                server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
                assigned_client_id: v5.assigned_client_id.clone(),
            };
            outbound.send_direct(mqtt5_session::encode(&mqtt5_session::accepted_connack(
                &offer,
            )));
            Some(Mqtt5Translator::new(V5Session::new(
                v5,
                false,
                MAX_UNACKNOWLEDGED_PUBLISHES,
            )))
        }
        None => {
            outbound.send_packet(&Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::Accepted,
            }));
            None
        }
    };
    if !hub.attach(session, attach).await {
        let code = ConnectReturnCode::ServerUnavailable;
        send_refusal_or_connack(
            &mut write,
            translator.as_ref().map(|_| refusal_reason(code)),
            code,
        )
        .await;
        return;
    }
    tracing::info!(%remote, client = %client_id, mqtt5 = translator.is_some(), "LAN app connected");
    let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
    let mut graceful = false;
    // Why the session ends, when the agent ends it.
    let mut close: Option<Close> = None;
    {
        let reader = async {
            loop {
                let (packet, extras) = match &translator {
                    None => {
                        match tokio::time::timeout(idle_limit, read.read_packet(max_packet)).await {
                            Err(_) => {
                                close = Some(Close::keep_alive_timeout());
                                return;
                            }
                            Ok(Ok(Some(packet))) => (packet, None),
                            Ok(Ok(None)) => return,
                            Ok(Err(FrameError::Decode(error))) => {
                                close = Some(close_for_decode_error(&error));
                                return;
                            }
                            Ok(Err(_)) => return,
                        }
                    }
                    Some(translator) => {
                        let read = read.read_frame(|buffer| mqtt5::decode(buffer, max_packet));
                        let packet = match tokio::time::timeout(idle_limit, read).await {
                            Err(_) => {
                                close = Some(Close::keep_alive_timeout());
                                return;
                            }
                            Ok(Ok(Some(packet))) => packet,
                            Ok(Ok(None)) => return,
                            Ok(Err(FrameError::Decode(error))) => {
                                close = Some(close_for_v5_decode_error(&error));
                                return;
                            }
                            Ok(Err(_)) => return,
                        };
                        match translator.inbound(packet) {
                            Ok(Inbound::Neutral(packet, extras)) => (packet, extras),
                            Ok(Inbound::Answer(answer)) => {
                                outbound.send_direct(mqtt5_session::encode(&answer));
                                continue;
                            }
                            Ok(Inbound::Nothing) => continue,
                            Ok(Inbound::Disconnect { with_will }) => {
                                // DISCONNECT 0x04 asks for the will: an end
                                // like an abrupt one.
                                graceful = !with_will;
                                return;
                            }
                            Err(refused) => {
                                close = Some(refused);
                                return;
                            }
                        }
                    }
                };
                if let Err(refused) = check_client_packet(&packet) {
                    close = Some(refused);
                    return;
                }
                match packet {
                    Packet::PingReq => {
                        outbound.send_packet(&Packet::PingResp);
                        continue;
                    }
                    Packet::Disconnect => {
                        graceful = true;
                        return;
                    }
                    _ => {}
                }
                if !hub.client_packet_with(session, packet, extras).await {
                    close = Some(Close::device_offline());
                    return;
                }
            }
        };
        let writer = async {
            while let Some(item) = receiver.recv().await {
                let bytes = match (item, &translator) {
                    (Outbound::Close(hub_close), _) => {
                        tracing::info!(client = %client_id, code = hub_close.code, reason = %hub_close.reason, "LAN app cut by the hub");
                        return Some(hub_close);
                    }
                    (item, Some(translator)) => match translator.outbound(item).await {
                        Some(bytes) => bytes,
                        None => continue,
                    },
                    (Outbound::Bytes(bytes) | Outbound::Direct(bytes), None) => bytes,
                    (Outbound::Refusal(_) | Outbound::Publish5(_) | Outbound::Flush, None) => {
                        continue;
                    }
                };
                stats
                    .lan_bytes_out
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                if write.write_all(&bytes).await.is_err() {
                    return None;
                }
            }
            None
        };
        tokio::select! {
            () = reader => {}
            hub_close = writer => {
                if hub_close.is_some() {
                    close = hub_close;
                }
            }
            () = ended.cancelled() => {
                close = receiver.take_close();
            }
            () = hub.ended() => close = Some(Close::device_offline()),
        }
    }
    hub.detach(session, graceful).await;
    // An MQTT 5 client hears why in a DISCONNECT.
    if let (Some(close), Some(_)) = (&close, &translator)
        && close.code != 1000
    {
        let disconnect = mqtt5_session::encode(&mqtt5_session::disconnect_for(close));
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, write.write_all(&disconnect)).await;
    }
    let _ = write.shutdown().await;
    let why = close
        .as_ref()
        .map_or("client closed", |close| close.reason.as_str());
    tracing::info!(%remote, client = %client_id, graceful, why, "LAN app gone");
}

/// QoS 1 and 2 PUBLISHes of one LAN client that may wait for the printer's
/// PUBACK at once.
const MAX_UNACKNOWLEDGED_PUBLISHES: usize = 100;

/// The rules a LAN client's packet must follow before it reaches the hub:
/// valid topics, nothing only a server sends, one CONNECT.
fn check_client_packet(packet: &Packet) -> Result<(), Close> {
    match packet {
        Packet::Connect(_) => Err(Close::protocol("second CONNECT")),
        Packet::Subscribe(subscribe) => subscribe.filters.iter().try_for_each(|(filter, _)| {
            validate_topic_filter(filter, &TopicLimits::SPEC)
                .map_err(|error| Close::limit(&format!("topic filter: {error}")))
        }),
        Packet::Unsubscribe(unsubscribe) => unsubscribe.filters.iter().try_for_each(|filter| {
            validate_topic_filter(filter, &TopicLimits::SPEC)
                .map_err(|error| Close::limit(&format!("topic filter: {error}")))
        }),
        Packet::Publish(publish) => validate_topic_name(&publish.topic, &TopicLimits::SPEC)
            .map_err(|error| Close::limit(&format!("topic: {error}"))),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
            Close::protocol(format!("unexpected {} from a client", packet.packet_type())),
        ),
        _ => Ok(()),
    }
}

/// An MQTT 5 CONNACK refusing the client with `reason`, then the end.
async fn send_refusal<W: AsyncWrite + Unpin>(
    write: &mut W,
    text: Option<&str>,
    reason: ReasonCode,
) {
    let packet = mqtt5_session::refused_connack(reason, text.unwrap_or_default());
    let _ = write.write_all(&mqtt5_session::encode(&packet)).await;
    let _ = write.shutdown().await;
}

/// A refusal in the client's version: MQTT 5's reason code when it speaks
/// 5, else the 3.1.1 return code.
async fn send_refusal_or_connack<W: AsyncWrite + Unpin>(
    write: &mut W,
    v5: Option<ReasonCode>,
    code: ConnectReturnCode,
) {
    match v5 {
        Some(reason) => send_refusal(write, None, reason).await,
        None => send_connack(write, code).await,
    }
}

async fn send_connack<W: AsyncWrite + Unpin>(write: &mut W, code: ConnectReturnCode) {
    let mut bytes = bytes::BytesMut::new();
    if mqtt::encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        }),
        &mut bytes,
    )
    .is_ok()
    {
        let _ = write.write_all(&bytes).await;
    }
    let _ = write.shutdown().await;
}

/// One of `[lan] max_clients` places, given back when dropped.
struct Place(Arc<crate::local_hub::LocalStats>);

impl Place {
    fn take(local: &LocalHub, max: usize) -> Option<Place> {
        let counter = &local.stats.lan_sessions;
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now < max).then_some(now + 1)
            })
            .ok()?;
        Some(Place(local.stats.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.lan_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why the TLS listener has no certificate.
#[derive(Debug, thiserror::Error)]
pub enum LanTlsError {
    #[error("{path}: {error}")]
    File {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot make the LAN certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a PEM certificate and key: {error}")]
    Pem {
        path: std::path::PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The name on the LAN certificate: the printer's serial, as on the
/// printer's own, so that Bambu-native apps see what they expect.
fn certificate_name(printer: &PrinterConfig) -> String {
    match &printer.kind {
        PrinterKind::Bambu { serial, .. } | PrinterKind::ElegooCc2 { serial, .. } => serial.clone(),
        PrinterKind::Mqtt { .. } => "relay-agent".into(),
    }
}

/// The TLS listener's certificate and key: read from `[lan]`'s files, or
/// made and written there at the first start (the key with mode 0600).
pub fn load_or_make_certificate(
    config: &LanSection,
    printer: &PrinterConfig,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    LanTlsError,
> {
    use rustls::pki_types::pem::PemObject;
    let (Some(cert_path), Some(key_path)) = (&config.certificate_file, &config.key_file) else {
        return Err(LanTlsError::File {
            path: "lan.certificate_file".into(),
            error: std::io::Error::other("not set"),
        });
    };
    if !cert_path.exists() && !key_path.exists() {
        let name = certificate_name(printer);
        let mut params = rcgen::CertificateParams::new(vec![name.clone()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.clone());
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = rcgen::KeyPair::generate()?;
        let certificate = params.self_signed(&key)?;
        write_file(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(cert_path, certificate.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), common_name = %name, "made the LAN certificate");
    }
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert_path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|error| LanTlsError::Pem {
            path: cert_path.clone(),
            error,
        })?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key_path).map_err(|error| {
        LanTlsError::Pem {
            path: key_path.clone(),
            error,
        }
    })?;
    Ok((chain, key))
}

fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<(), LanTlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file_error = |error| LanTlsError::File {
        path: path.to_owned(),
        error,
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(file_error)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut file| file.write_all(bytes))
        .map_err(file_error)
}

fn tls_acceptor(
    config: &LanSection,
    printer: &PrinterConfig,
) -> Result<tokio_rustls::TlsAcceptor, LanTlsError> {
    let (chain, key) = load_or_make_certificate(config, printer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        // Bambu-native apps and older Pythons speak TLS 1.2.
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// A LAN client's reading half, counting what it reads.
struct Counted<R> {
    inner: R,
    stats: Arc<crate::local_hub::LocalStats>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.stats
                .lan_bytes_in
                .fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}
