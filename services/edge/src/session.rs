//! One client's MQTT session over WebSocket, from the upgrade to the close.
//!
//! Generic over any `Stream + Sink` of WebSocket messages, so it runs the
//! same over TLS, plain TCP, or an in-memory pipe. MQTT packets may span
//! binary messages or share one: bytes go through one persistent buffer and
//! the proto decoder. What needs the device's state (subscriptions, packet
//! ids, client-id takeover, wills) is the hub's: the session hands it every
//! packet it has checked. MQTT 5 clients are served here too: their
//! packets are translated to and from the hub's 3.1.1 by
//! [`crate::hub::mqtt5_session`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use relay_proto::Secret;
use relay_proto::mqtt::{self, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, Publish};
use relay_proto::mqtt5::{self, ReasonCode};
use relay_proto::topic::{TopicLimits, validate_topic_filter, validate_topic_name};
use relay_store::{AuthFailure, Principal, RequestCredentials, Scope};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::close::{Close, close_for_decode_error, close_for_v5_decode_error, connack_code_name};
use crate::devices::Unavailable;
use crate::hub::mqtt5_session::{self, Inbound, ServerOffer, V5Connect, V5Session};
use crate::hub::{
    HubHandle, Mqtt5Translator, Outbound, OutboundSender, PublishRefusal, SessionAttach, SessionId,
    outbound_queue,
};
use crate::quotas::QuotaGuard;
use crate::session_socket::{SessionSocket, WriteCounters};
use crate::state::{EdgeState, LiveSession, Refusal};

/// How long to wait for the client's answer to our close frame.
const CLOSE_HANDSHAKE_PATIENCE: Duration = Duration::from_secs(2);

/// What the HTTP request said, kept until the CONNECT arrives.
#[derive(Debug)]
pub struct SessionRequest {
    /// `None` when the Host did not name a device.
    pub device_id: Option<String>,
    pub authorization: Option<Secret<String>>,
    pub query_token: Option<Secret<String>>,
    pub peer_ip: IpAddr,
    /// With no device named, the one the client's key is bound to serves
    /// (MQTT over TLS without SNI); otherwise no device is refused.
    pub device_from_key: bool,
    /// With no device named, CONNECT's user name names it when it is a
    /// device id and the password is a whole key or token (the plain
    /// MQTT development listener, which has no SNI).
    pub device_from_username: bool,
    /// How the client came: `wss`, `mqtts` or `mqtt` (for the console).
    pub transport: &'static str,
}

/// A refused CONNECT's CONNACK, as each protocol generation says it.
#[derive(Debug, Clone, Copy)]
struct Refused {
    /// `None`: a 3.1.1 client gets no CONNACK, only the close.
    v3: Option<ConnectReturnCode>,
    v5: ReasonCode,
}

impl Refused {
    fn both(v3: ConnectReturnCode, v5: ReasonCode) -> Option<Refused> {
        Some(Refused { v3: Some(v3), v5 })
    }

    fn v5_only(v5: ReasonCode) -> Option<Refused> {
        Some(Refused { v3: None, v5 })
    }
}

/// How the first phase of a session ended.
enum Outcome {
    /// Send this CONNACK (if any), then close with this code.
    Refuse(Option<Refused>, Close),
    /// The client went away; nothing to send.
    Gone,
    /// Accepted: the device is online.
    Connected(Box<Admitted>),
}

/// The CONNECT, in the client's protocol generation.
enum FirstConnect {
    V3(Connect),
    V5(Box<mqtt5::Connect>),
}

/// An accepted client, ready to be served.
struct Admitted {
    connect: Connect,
    /// An MQTT 5 client's own asks.
    v5: Option<V5Connect>,
    principal: Principal,
    device_id: String,
    hub: HubHandle,
    /// Where the client came from, and how (for the console).
    peer_ip: IpAddr,
    transport: &'static str,
    /// The session's places in the quotas, held until it ends.
    _quota: QuotaGuard,
}

/// Runs a session to its end.
pub async fn run<S>(
    mut socket: S,
    request: SessionRequest,
    state: Arc<EdgeState>,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Unpin
        + Send
        + 'static,
{
    state.metrics.sessions_open.inc();
    let mut buffer = BytesMut::new();
    let mut v5 = false;
    let outcome = tokio::select! {
        outcome = read_connect(&mut socket, &mut buffer, &state) => match outcome {
            // Boxed here and below: a task keeps room for its largest
            // state for its whole life, and the key check's database
            // future is large; an idle session should not carry it.
            Ok(connect) => {
                v5 = matches!(connect, FirstConnect::V5(_));
                Box::pin(admit(connect, request, &state)).await
            }
            Err(outcome) => {
                v5 = mqtt5::starts_with_connect(&buffer);
                outcome
            }
        },
        _ = tokio::time::sleep(state.config.connect_timeout()) => {
            Outcome::Refuse(None, Close::protocol("no CONNECT in time"))
        }
        _ = shutdown.cancelled() => Outcome::Refuse(None, Close::draining()),
    };
    match outcome {
        Outcome::Refuse(connack, close) => finish(&mut socket, connack, close, v5, &state).await,
        // Completes a closing handshake the client began: the reply is
        // queued by the WebSocket layer and sent by this flush.
        Outcome::Gone => {
            let _ = tokio::time::timeout(CLOSE_HANDSHAKE_PATIENCE, socket.close()).await;
        }
        Outcome::Connected(admitted) => {
            Box::pin(serve(socket, buffer, *admitted, &state, shutdown)).await
        }
    }
    state.metrics.sessions_open.dec();
}

/// Reads until a whole first packet is there; it must be CONNECT.
async fn read_connect<S>(
    socket: &mut S,
    buffer: &mut BytesMut,
    state: &EdgeState,
) -> Result<FirstConnect, Outcome>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let max_packet_size = state.config.limits.max_packet_size;
    loop {
        // An MQTT 5 CONNECT is told apart by its first bytes (the 3.1.1
        // decoder would take the packet to refuse its level).
        if mqtt5::starts_with_connect(buffer) {
            match mqtt5::decode(buffer, max_packet_size) {
                Ok(Some(mqtt5::Packet::Connect(connect))) => {
                    state.metrics.messages.with_label_values(&["in"]).inc();
                    return Ok(FirstConnect::V5(Box::new(connect)));
                }
                Ok(Some(_)) => {
                    return Err(Outcome::Refuse(None, Close::protocol("expected CONNECT")));
                }
                Ok(None) => {}
                Err(mqtt5::DecodeError::Packet(error @ DecodeError::PacketTooLarge { .. })) => {
                    return Err(Outcome::Refuse(
                        Refused::v5_only(ReasonCode::PACKET_TOO_LARGE),
                        close_for_decode_error(&error),
                    ));
                }
                Err(error) => {
                    return Err(Outcome::Refuse(
                        Refused::v5_only(ReasonCode::MALFORMED_PACKET),
                        close_for_v5_decode_error(&error),
                    ));
                }
            }
        } else {
            match mqtt::decode(buffer, max_packet_size) {
                Ok(Some(Packet::Connect(connect))) => {
                    state.metrics.messages.with_label_values(&["in"]).inc();
                    return Ok(FirstConnect::V3(connect));
                }
                Ok(Some(other)) => {
                    return Err(Outcome::Refuse(
                        None,
                        Close::protocol(format!("expected CONNECT, got {}", other.packet_type())),
                    ));
                }
                Ok(None) => {}
                Err(DecodeError::UnsupportedProtocolLevel(level)) => {
                    return Err(Outcome::Refuse(
                        Refused::both(
                            ConnectReturnCode::UnacceptableProtocolVersion,
                            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                        ),
                        Close::protocol(format!(
                            "unsupported protocol level {level}; use MQTT 5, 3.1.1 or 3.1"
                        )),
                    ));
                }
                Err(error) => return Err(Outcome::Refuse(None, close_for_decode_error(&error))),
            }
        }
        match socket.next().await {
            Some(Ok(Message::Binary(bytes))) => {
                state
                    .metrics
                    .bytes
                    .with_label_values(&["in"])
                    .inc_by(bytes.len() as u64);
                buffer.extend_from_slice(&bytes);
            }
            Some(Ok(Message::Text(_))) => return Err(Outcome::Refuse(None, Close::text_frame())),
            Some(Ok(Message::Close(_))) | None => return Err(Outcome::Gone),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            Some(Err(error)) => return Err(close_for_websocket_error(error)),
        }
    }
}

fn close_for_websocket_error(error: WsError) -> Outcome {
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Outcome::Refuse(None, Close::too_large())
        }
        WsError::Protocol(problem) => {
            Outcome::Refuse(None, Close::protocol(format!("WebSocket: {problem}")))
        }
        _ => Outcome::Gone,
    }
}

/// A client id the edge assigns to an MQTT 5 client that sent none.
fn assigned_client_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    format!(
        "relay-{:016x}",
        nanos ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(32)
    )
}

/// Checks the CONNECT and the credentials; says what to answer.
async fn admit(connect: FirstConnect, request: SessionRequest, state: &EdgeState) -> Outcome {
    let limits = &state.config.limits;
    let (connect, v5) = match connect {
        FirstConnect::V3(connect) => (connect, None),
        FirstConnect::V5(connect) => {
            if connect.properties.authentication_method().is_some() {
                return Outcome::Refuse(
                    Refused::v5_only(ReasonCode::BAD_AUTHENTICATION_METHOD),
                    Close::unauthorized(),
                );
            }
            let (connect, v5) = mqtt5_session::neutral_connect(*connect, assigned_client_id);
            (connect, Some(v5))
        }
    };
    if connect.client_id.chars().count() > limits.max_client_id_len {
        return Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::IdentifierRejected,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ),
            Close::limit(&format!(
                "client id longer than {} characters",
                limits.max_client_id_len
            )),
        );
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        return Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::IdentifierRejected,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ),
            Close::protocol("an empty client id needs clean session"),
        );
    }
    // An MQTT 5 client is told the keep-alive to use instead (Server Keep
    // Alive in its CONNACK).
    if v5.is_none() && connect.keep_alive > limits.keep_alive_max_seconds {
        return Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::IdentifierRejected,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ),
            Close::limit(&format!(
                "keep-alive above {} s",
                limits.keep_alive_max_seconds
            )),
        );
    }
    if let Some(will) = &connect.will {
        let topic_limits = TopicLimits {
            max_len_bytes: limits.max_topic_len,
            max_levels: usize::MAX,
        };
        if let Err(error) = validate_topic_name(&will.topic, &topic_limits) {
            return Outcome::Refuse(
                Refused::both(
                    ConnectReturnCode::NotAuthorized,
                    ReasonCode::TOPIC_NAME_INVALID,
                ),
                Close::limit(&format!("will topic: {error}")),
            );
        }
    }
    // HTTP credentials first; clients that cannot send them (MQTTX, MQTT
    // Explorer) may put the key in CONNECT's user name and password.
    let connect_token = connect_credentials(&connect);
    let credentials = RequestCredentials {
        authorization: request.authorization.as_ref().map(Secret::as_ref),
        query_token: request
            .query_token
            .as_ref()
            .or(connect_token.as_ref())
            .map(Secret::as_ref),
    };
    let named = request.device_id.clone().or_else(|| {
        request
            .device_from_username
            .then(|| device_from_username(&connect, &state.config.public.base_domain))
            .flatten()
    });
    let result = match named {
        None if request.device_from_key => state
            .authenticate_bound(credentials, request.peer_ip)
            .await
            .map(|(device_id, principal)| (Some(device_id), principal)),
        device_id => state
            .authenticate(device_id.as_deref(), credentials, request.peer_ip)
            .await
            .map(|principal| (device_id, principal)),
    };
    match result {
        Ok((device_id, principal)) => {
            let device_id = device_id.unwrap_or_default();
            let quota = match state.quotas.admit(
                &principal.key_id,
                &device_id,
                &principal.tenant_id,
                request.peer_ip,
            ) {
                Ok(quota) => quota,
                Err(exceeded) => {
                    tracing::info!(key = %principal.key_id, %exceeded, "session refused");
                    return Outcome::Refuse(
                        Refused::both(
                            ConnectReturnCode::ServerUnavailable,
                            ReasonCode::QUOTA_EXCEEDED,
                        ),
                        Close::limit(&exceeded.to_string()),
                    );
                }
            };
            match state.devices.hub_for(&device_id).await {
                Ok(hub) => match will_refusal(&connect, &principal, &hub) {
                    Some(refusal) => {
                        tracing::info!(key = %principal.key_id, %refusal, "will refused");
                        Outcome::Refuse(
                            Refused::both(
                                ConnectReturnCode::NotAuthorized,
                                ReasonCode::NOT_AUTHORIZED,
                            ),
                            Close::forbidden(&format!("will: {refusal}")),
                        )
                    }
                    None => Outcome::Connected(Box::new(Admitted {
                        connect,
                        v5,
                        principal,
                        device_id,
                        hub,
                        peer_ip: request.peer_ip,
                        transport: request.transport,
                        _quota: quota,
                    })),
                },
                Err(Unavailable::Offline) => {
                    tracing::info!(key = %principal.key_id, "authenticated; device offline");
                    Outcome::Refuse(
                        Refused::both(
                            ConnectReturnCode::ServerUnavailable,
                            ReasonCode::SERVER_UNAVAILABLE,
                        ),
                        Close::device_offline(),
                    )
                }
                Err(Unavailable::Printer { reason, detail }) => {
                    tracing::info!(key = %principal.key_id, ?reason, detail = detail.as_deref().unwrap_or(""), "printer unavailable");
                    Outcome::Refuse(
                        Refused::both(
                            ConnectReturnCode::ServerUnavailable,
                            ReasonCode::SERVER_UNAVAILABLE,
                        ),
                        Close::printer_unreachable(Unavailable::printer_text(reason)),
                    )
                }
            }
        }
        Err(Refusal::NoDevice) => Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::IdentifierRejected,
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ),
            Close::no_device(),
        ),
        Err(Refusal::RateLimited) => Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::NotAuthorized,
                ReasonCode::CONNECTION_RATE_EXCEEDED,
            ),
            Close::limit("too many failed authentications"),
        ),
        Err(Refusal::Auth(AuthFailure::Unavailable)) => Outcome::Refuse(
            Refused::both(
                ConnectReturnCode::ServerUnavailable,
                ReasonCode::SERVER_BUSY,
            ),
            Close::store_unavailable(),
        ),
        Err(Refusal::Auth(failure)) => {
            let refused = if failure == AuthFailure::Missing {
                Refused::both(ConnectReturnCode::NotAuthorized, ReasonCode::NOT_AUTHORIZED)
            } else {
                Refused::both(
                    ConnectReturnCode::BadUserNameOrPassword,
                    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                )
            };
            Outcome::Refuse(refused, Close::unauthorized())
        }
    }
}

/// Why the device's policy refuses the CONNECT's will, if it does: a will
/// is a publish, checked when it is given. A read key's will is dropped
/// instead (it could never be published).
fn will_refusal(
    connect: &Connect,
    principal: &Principal,
    hub: &HubHandle,
) -> Option<PublishRefusal> {
    let will = connect.will.as_ref()?;
    if principal.scope != Scope::Control {
        return None;
    }
    hub.policy().check_publish(&will.topic, will.retain).err()
}

/// The device CONNECT's user name names, when the password alone is the
/// credential (a whole key or JWT).
fn device_from_username(connect: &Connect, base_domain: &str) -> Option<String> {
    let password = std::str::from_utf8(connect.password.as_ref()?.expose()).ok()?;
    if !(password.starts_with("rly_") || password.matches('.').count() == 2) {
        return None;
    }
    let username = connect.username.as_deref()?;
    crate::devices::device_from_name(&format!("{username}.{base_domain}"), base_domain)
}

/// CONNECT's user name and password as a query-token equivalent: a password
/// that is a whole key or JWT stands alone; otherwise user name = key id and
/// password = secret, as HTTP Basic.
fn connect_credentials(connect: &Connect) -> Option<Secret<String>> {
    use base64::Engine;
    let password = std::str::from_utf8(connect.password.as_ref()?.expose()).ok()?;
    if password.starts_with("rly_") || password.matches('.').count() == 2 {
        return Some(password.into());
    }
    let username = connect.username.as_deref()?;
    let basic = format!("{username}:{password}");
    Some(Secret::new(
        base64::engine::general_purpose::STANDARD.encode(basic),
    ))
}

/// Sends the CONNACK (if any) and the close frame, then waits a moment for
/// the client's close so the closing handshake completes.
async fn finish<S>(
    socket: &mut S,
    connack: Option<Refused>,
    close: Close,
    v5: bool,
    state: &EdgeState,
) where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let connack = connack.and_then(|refused| {
        if v5 {
            let packet = mqtt5_session::refused_connack(refused.v5, &close.reason);
            Some((
                format!("{:#04x}", refused.v5.0),
                mqtt5_session::encode(&packet),
            ))
        } else {
            let code = refused.v3?;
            let mut bytes = BytesMut::with_capacity(4);
            let packet = Packet::ConnAck(ConnAck {
                session_present: false,
                code,
            });
            mqtt::encode(&packet, &mut bytes).ok()?;
            Some((connack_code_name(code).to_owned(), bytes.freeze()))
        }
    });
    if let Some((label, bytes)) = connack {
        {
            state.metrics.connacks.with_label_values(&[&label]).inc();
            state.metrics.messages.with_label_values(&["out"]).inc();
            state
                .metrics
                .bytes
                .with_label_values(&["out"])
                .inc_by(bytes.len() as u64);
            if socket.send(Message::Binary(bytes)).await.is_err() {
                return;
            }
        }
    }
    if socket.send(close_message(close, state)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_PATIENCE, async {
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// QoS 1 and 2 PUBLISHes of one session that may wait for the printer's
/// PUBACK at once; past this the client is cut with `limit:`.
const MAX_UNACKNOWLEDGED_PUBLISHES: usize = 1024;

/// Serves an accepted client: CONNACK 0, then its packets until it leaves,
/// breaks a rule, stops reading, misses its keep-alive, or the edge drains.
async fn serve<S>(
    mut socket: S,
    mut buffer: BytesMut,
    admitted: Admitted,
    state: &EdgeState,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Unpin
        + Send
        + 'static,
{
    let Admitted {
        connect,
        v5,
        principal,
        device_id,
        hub,
        peer_ip,
        transport,
        _quota: _held_until_the_session_ends,
    } = admitted;
    let limits = &state.config.limits;
    let session_id = state.hubs.next_session_id();
    let (outbound, mut receiver, ended) = outbound_queue(limits.outbound_buffer_bytes);
    // The will goes out on any end but DISCONNECT, if the key may publish;
    // at its own QoS, as a broker would.
    let will = connect
        .will
        .filter(|_| principal.scope == Scope::Control)
        .map(|will| Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            packet_id: None,
            payload: will.payload,
        });
    let attach = SessionAttach {
        sink: outbound.clone(),
        client_id: connect.client_id.clone(),
        will,
        max_subscriptions: limits.max_subscriptions,
        max_unacknowledged: MAX_UNACKNOWLEDGED_PUBLISHES,
        peer: false,
        mqtt5: v5.is_some(),
    };
    // Keep-alive 0 (off) gets the longest one allowed; the client must send
    // something within one and a half keep-alives. An MQTT 5 client is
    // told in its CONNACK when that is not its own.
    let keep_alive = match connect.keep_alive {
        0 => limits.keep_alive_max_seconds,
        seconds => seconds.clamp(limits.keep_alive_min_seconds, limits.keep_alive_max_seconds),
    };
    let idle_limit = Duration::from_millis(u64::from(keep_alive) * 1500);
    // CONNACK first: the hub may queue deliveries (or a takeover's close)
    // right after the attach.
    state.metrics.connacks.with_label_values(&["0"]).inc();
    let translator = v5.map(|v5| {
        let offer = ServerOffer {
            maximum_packet_size: limits.max_packet_size,
            receive_maximum: u16::try_from(MAX_UNACKNOWLEDGED_PUBLISHES).unwrap_or(u16::MAX),
            retain_available: hub.policy().retain,
            server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
            assigned_client_id: v5.assigned_client_id.clone(),
        };
        outbound.send_direct(mqtt5_session::encode(&mqtt5_session::accepted_connack(
            &offer,
        )));
        Mqtt5Translator::new(V5Session::new(
            v5,
            principal.scope == Scope::Read,
            MAX_UNACKNOWLEDGED_PUBLISHES,
        ))
    });
    if translator.is_none() {
        outbound.send_packet(&Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Accepted,
        }));
    }
    if !hub.attach(session_id, attach).await {
        drop(receiver);
        finish(
            &mut socket,
            Refused::both(
                ConnectReturnCode::ServerUnavailable,
                ReasonCode::SERVER_UNAVAILABLE,
            ),
            Close::device_offline(),
            translator.is_some(),
            state,
        )
        .await;
        return;
    }
    state.live_sessions.insert(
        session_id,
        LiveSession {
            key_id: principal.key_id.clone(),
            device_id: device_id.clone(),
            outbound: outbound.clone(),
            client_id: connect.client_id.clone(),
            mqtt_version: match (&translator, connect.protocol) {
                (Some(_), _) => "5",
                (None, relay_proto::mqtt::ProtocolLevel::V3_1) => "3.1",
                (None, relay_proto::mqtt::ProtocolLevel::V3_1_1) => "3.1.1",
            },
            transport,
            address: peer_ip,
            since: state.authenticator.store().now(),
        },
    );
    tracing::info!(key = %principal.key_id, client = %connect.client_id, mqtt5 = translator.is_some(), "session connected");

    let (sink, mut stream) = socket.split();
    let translator = translator.map(Arc::new);
    let metrics = &state.metrics;
    // The hub (or any task with something for the client) writes into the
    // socket itself while the session's writer is idle.
    let sink = Arc::new(SessionSocket::new(
        sink,
        translator.clone(),
        // Looked up once: a label lookup hashes and locks on every use.
        WriteCounters {
            messages_out: metrics.messages.with_label_values(&["out"]),
            bytes_out: metrics.bytes.with_label_values(&["out"]),
            direct: metrics.client_writes.with_label_values(&["direct"]),
            queued: metrics.client_writes.with_label_values(&["queued"]),
        },
    ));
    outbound.write_directly_with(sink.clone());
    let mut client = ClientState {
        principal: &principal,
        disconnected: false,
        topic_limits: TopicLimits {
            max_len_bytes: limits.max_topic_len,
            max_levels: usize::MAX,
        },
        session_id,
        hub: &hub,
        outbound: &outbound,
    };
    // Whether the client began the closing handshake.
    let reader = async {
        let mut deadline = tokio::time::Instant::now() + idle_limit;
        loop {
            // Packets already buffered (the CONNECT's tail, or a burst).
            loop {
                let mut extras = None;
                let packet = match &translator {
                    None => match mqtt::decode(&mut buffer, limits.max_packet_size) {
                        Ok(packet) => packet,
                        Err(error) => {
                            outbound.end(close_for_decode_error(&error));
                            return false;
                        }
                    },
                    Some(translator) => {
                        let packet = match mqtt5::decode(&mut buffer, limits.max_packet_size) {
                            Ok(Some(packet)) => packet,
                            Ok(None) => break,
                            Err(error) => {
                                outbound.end(close_for_v5_decode_error(&error));
                                return false;
                            }
                        };
                        match translator.inbound(packet) {
                            Ok(Inbound::Neutral(packet, packet_extras)) => {
                                extras = packet_extras;
                                Some(packet)
                            }
                            Ok(Inbound::Answer(answer)) => {
                                state.metrics.messages.with_label_values(&["in"]).inc();
                                deadline = tokio::time::Instant::now() + idle_limit;
                                if !outbound.send_direct(mqtt5_session::encode(&answer)) {
                                    outbound.end(Close::limit("slow consumer"));
                                    return false;
                                }
                                continue;
                            }
                            Ok(Inbound::Nothing) => {
                                state.metrics.messages.with_label_values(&["in"]).inc();
                                deadline = tokio::time::Instant::now() + idle_limit;
                                continue;
                            }
                            Ok(Inbound::Disconnect { with_will }) => Some(if with_will {
                                // Ends the session as an abrupt end would:
                                // the will goes out.
                                outbound.end(Close::normal());
                                return false;
                            } else {
                                Packet::Disconnect
                            }),
                            Err(close) => {
                                outbound.end(close);
                                return false;
                            }
                        }
                    }
                };
                let Some(packet) = packet else {
                    break;
                };
                state.metrics.messages.with_label_values(&["in"]).inc();
                deadline = tokio::time::Instant::now() + idle_limit;
                // Boxed: handling a packet (hub calls) takes more room than
                // waiting for one, and sessions mostly wait.
                if let Err(close) = Box::pin(client.on_packet(packet, extras)).await {
                    outbound.end(close);
                    return false;
                }
            }
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(Message::Binary(bytes))) => {
                        state.metrics.bytes.with_label_values(&["in"]).inc_by(bytes.len() as u64);
                        buffer.extend_from_slice(&bytes);
                    }
                    Some(Ok(Message::Text(_))) => {
                        outbound.end(Close::text_frame());
                        return false;
                    }
                    Some(Ok(Message::Close(_))) => {
                        outbound.end(Close::normal());
                        return true;
                    }
                    None => {
                        outbound.end(Close::normal());
                        return false;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(error)) => {
                        if let Outcome::Refuse(_, close) = close_for_websocket_error(error) {
                            outbound.end(close);
                        } else {
                            outbound.end(Close::normal());
                        }
                        return false;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    outbound.end(Close::keep_alive_timeout());
                    return false;
                }
                _ = ended.cancelled() => return false,
                _ = hub.ended() => {
                    // A hub that ends because the edge drains is a drain.
                    outbound.end(if shutdown.is_cancelled() {
                        Close::draining()
                    } else {
                        Close::device_offline()
                    });
                    return false;
                }
                _ = shutdown.cancelled() => {
                    outbound.end(Close::draining());
                    return false;
                }
            }
        }
    };
    let writer = async {
        while let Some(item) = receiver.recv().await {
            let bytes = match (item, &translator) {
                (Outbound::Close(close), _) => return Some(close),
                (Outbound::Flush, _) => {
                    if sink.flush().await.is_err() {
                        return None;
                    }
                    continue;
                }
                (item, Some(translator)) => match translator.outbound(item).await {
                    Some(bytes) => bytes,
                    None => continue,
                },
                (Outbound::Direct(bytes) | Outbound::Bytes(bytes), None) => bytes,
                // The hub sends these to MQTT 5 sessions only.
                (Outbound::Refusal(_) | Outbound::Publish5(_), None) => continue,
            };
            if sink.send_counted(bytes).await.is_err() {
                return None;
            }
        }
        None
    };
    // Once the session must end, the writer gets a short grace to deliver
    // what is queued and the close; a client that does not read loses it.
    let bounded_writer = async {
        tokio::select! {
            close = writer => close,
            _ = async {
                ended.cancelled().await;
                tokio::time::sleep(CLOSE_HANDSHAKE_PATIENCE).await;
            } => None,
        }
    };
    // Each half is polled only when it was woken: a delivery wakes the
    // writer alone, not the reader's TLS read, timers and tokens.
    let (client_closed, written_close) =
        relay_io::join_woken(std::pin::pin!(reader), std::pin::pin!(bounded_writer)).await;
    // A writer held by a client that stops reading never reached the
    // close; it is still counted, logged and sent.
    let close = written_close.or_else(|| receiver.take_close());
    state.live_sessions.remove(&session_id);
    hub.detach(session_id, client.disconnected).await;
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_PATIENCE, async {
        if client_closed {
            // The WebSocket layer queued the echo of the client's close
            // frame (RFC 6455 §5.5.1); closing flushes it.
            if let Some(close) = close {
                count_close(&close, state);
            }
            let _ = sink.close().await;
        } else if let Some(close) = close {
            // An MQTT 5 client hears why in a DISCONNECT first.
            if translator.is_some() && close.code != 1000 {
                let disconnect = mqtt5_session::encode(&mqtt5_session::disconnect_for(&close));
                let _ = sink.send(Message::Binary(disconnect)).await;
            }
            let _ = sink.send(close_message(close, state)).await;
        }
    })
    .await;
}

/// Counts and logs a session's close.
fn count_close(close: &Close, state: &EdgeState) {
    state
        .metrics
        .close_codes
        .with_label_values(&[&close.code.to_string()])
        .inc();
    tracing::info!(code = close.code, reason = %close.reason, "closing session");
}

/// The close frame for `close`, counted and logged.
fn close_message(close: Close, state: &EdgeState) -> Message {
    count_close(&close, state);
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(close.code),
        reason: close.reason.into(),
    }))
}

/// A connected client's own state, and what it may do.
struct ClientState<'a> {
    principal: &'a Principal,
    /// The client sent DISCONNECT: no will message.
    disconnected: bool,
    topic_limits: TopicLimits,
    session_id: SessionId,
    hub: &'a HubHandle,
    outbound: &'a OutboundSender,
}

impl ClientState<'_> {
    /// Handles one packet from the client; `Err` ends the session. Rules
    /// that need no hub state are checked here; the hub does the rest.
    async fn on_packet(
        &mut self,
        packet: Packet,
        extras: Option<Box<crate::hub::PacketExtras>>,
    ) -> Result<(), Close> {
        match &packet {
            Packet::PingReq => {
                if !self.outbound.send_packet(&Packet::PingResp) {
                    return Err(Close::limit("slow consumer"));
                }
                return Ok(());
            }
            Packet::Subscribe(subscribe) => {
                for (filter, _) in &subscribe.filters {
                    validate_topic_filter(filter, &self.topic_limits)
                        .map_err(|error| Close::limit(&format!("topic filter: {error}")))?;
                }
            }
            Packet::Unsubscribe(_) | Packet::PubAck(_) | Packet::PubRel(_) => {}
            Packet::Publish(publish) => {
                if self.principal.scope == Scope::Read {
                    return Err(Close::forbidden("read-only key"));
                }
                validate_topic_name(&publish.topic, &self.topic_limits)
                    .map_err(|error| Close::limit(&format!("topic: {error}")))?;
            }
            Packet::Disconnect => {
                self.disconnected = true;
                return Err(Close::normal());
            }
            Packet::Connect(_) => return Err(Close::protocol("second CONNECT")),
            other => {
                return Err(Close::protocol(format!(
                    "unexpected {} from a client",
                    other.packet_type()
                )));
            }
        }
        if !self
            .hub
            .client_packet_with(self.session_id, packet, extras)
            .await
        {
            return Err(Close::device_offline());
        }
        Ok(())
    }
}
