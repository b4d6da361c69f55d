//! One client's MQTT session over WebSocket, from the upgrade to the close.
//!
//! Generic over any `Stream + Sink` of WebSocket messages, so it runs the
//! same over TLS, plain TCP, or an in-memory pipe. MQTT packets may span
//! binary messages or share one: bytes go through one persistent buffer and
//! the proto decoder. Until the device hub exists (agents and tunnels come
//! next), every authenticated client learns that its device is offline.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use relay_proto::mqtt::{self, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet};
use relay_store::{AuthFailure, RequestCredentials};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::close::{Close, connack_code_name};
use crate::state::EdgeState;

/// How long to wait for the client's answer to our close frame.
const CLOSE_HANDSHAKE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// What the HTTP request said, kept until the CONNECT arrives. The
/// credentials are secret: never logged.
pub struct SessionRequest {
    /// `None` when the Host did not name a device.
    pub device_id: Option<String>,
    pub authorization: Option<String>,
    pub query_token: Option<String>,
    pub peer_ip: IpAddr,
}

impl std::fmt::Debug for SessionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRequest")
            .field("device_id", &self.device_id)
            .field("peer_ip", &self.peer_ip)
            .finish_non_exhaustive()
    }
}

/// How the first phase of a session ended.
enum Outcome {
    /// Send this CONNACK (if any), then close with this code.
    Refuse(Option<ConnectReturnCode>, Close),
    /// The client went away; nothing to send.
    Gone,
}

/// Runs a session to its end.
pub async fn run<S>(
    mut socket: S,
    request: SessionRequest,
    state: Arc<EdgeState>,
    shutdown: CancellationToken,
) where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    state.metrics.sessions_open.inc();
    let mut buffer = BytesMut::new();
    let outcome = tokio::select! {
        outcome = read_connect(&mut socket, &mut buffer, &state) => match outcome {
            Ok(connect) => admit(connect, request, &state).await,
            Err(outcome) => outcome,
        },
        _ = tokio::time::sleep(state.config.connect_timeout()) => {
            Outcome::Refuse(None, Close::protocol("no CONNECT in time"))
        }
        _ = shutdown.cancelled() => Outcome::Refuse(None, Close::draining()),
    };
    if let Outcome::Refuse(connack, close) = outcome {
        finish(&mut socket, connack, close, &state).await;
    }
    state.metrics.sessions_open.dec();
}

/// Reads until a whole first packet is there; it must be CONNECT.
async fn read_connect<S>(
    socket: &mut S,
    buffer: &mut BytesMut,
    state: &EdgeState,
) -> Result<Connect, Outcome>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match mqtt::decode(buffer, state.config.limits.max_packet_size) {
            Ok(Some(Packet::Connect(connect))) => {
                state.metrics.messages.with_label_values(&["in"]).inc();
                return Ok(connect);
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
                    Some(ConnectReturnCode::UnacceptableProtocolVersion),
                    Close::protocol(format!(
                        "unsupported protocol level {level}; use MQTT 3.1.1 or 3.1"
                    )),
                ));
            }
            Err(error) => return Err(Outcome::Refuse(None, close_for_decode_error(&error))),
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

/// The close for a decoding failure: oversize packets get 1009, the rest 1002.
pub fn close_for_decode_error(error: &DecodeError) -> Close {
    match error {
        DecodeError::PacketTooLarge { .. } => Close::too_large(),
        other => Close::protocol(format!("malformed MQTT: {other}")),
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

/// Checks the CONNECT and the credentials; says what to answer.
async fn admit(connect: Connect, request: SessionRequest, state: &EdgeState) -> Outcome {
    let limits = &state.config.limits;
    if connect.client_id.chars().count() > limits.max_client_id_len {
        return Outcome::Refuse(
            Some(ConnectReturnCode::IdentifierRejected),
            Close::limit(&format!(
                "client id longer than {} characters",
                limits.max_client_id_len
            )),
        );
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        return Outcome::Refuse(
            Some(ConnectReturnCode::IdentifierRejected),
            Close::protocol("an empty client id needs clean session"),
        );
    }
    if connect.keep_alive > limits.keep_alive_max_seconds {
        return Outcome::Refuse(
            Some(ConnectReturnCode::IdentifierRejected),
            Close::limit(&format!(
                "keep-alive above {} s",
                limits.keep_alive_max_seconds
            )),
        );
    }
    if state.failures.is_blocked(request.peer_ip, Instant::now()) {
        state
            .metrics
            .auth_failures
            .with_label_values(&["rate_limited"])
            .inc();
        return Outcome::Refuse(
            Some(ConnectReturnCode::NotAuthorized),
            Close::limit("too many failed authentications"),
        );
    }

    // HTTP credentials first; clients that cannot send them (MQTTX, MQTT
    // Explorer) may put the key in CONNECT's user name and password.
    let connect_token = connect_credentials(&connect);
    let credentials = RequestCredentials {
        authorization: request.authorization.as_deref(),
        query_token: request.query_token.as_deref().or(connect_token.as_deref()),
    };
    let result = match &request.device_id {
        Some(device_id) => {
            state
                .authenticator
                .authenticate(device_id, credentials)
                .await
        }
        None => Err(AuthFailure::UnknownDevice),
    };
    match result {
        Ok(principal) => {
            tracing::info!(key = %principal.key_id, scope = ?principal.scope, "authenticated; device offline");
            // No device hub yet: agents and tunnels arrive next.
            Outcome::Refuse(
                Some(ConnectReturnCode::ServerUnavailable),
                Close::device_offline(),
            )
        }
        Err(AuthFailure::Unavailable) => {
            state
                .metrics
                .auth_failures
                .with_label_values(&["unavailable"])
                .inc();
            Outcome::Refuse(
                Some(ConnectReturnCode::ServerUnavailable),
                Close::store_unavailable(),
            )
        }
        Err(failure) => {
            state
                .metrics
                .auth_failures
                .with_label_values(&[failure.label()])
                .inc();
            state
                .failures
                .record_failure(request.peer_ip, Instant::now());
            tracing::info!(reason = failure.label(), "authentication failed");
            let code = if failure == AuthFailure::Missing {
                ConnectReturnCode::NotAuthorized
            } else {
                ConnectReturnCode::BadUserNameOrPassword
            };
            Outcome::Refuse(Some(code), Close::unauthorized())
        }
    }
}

/// CONNECT's user name and password as a query-token equivalent: a password
/// that is a whole key or JWT stands alone; otherwise user name = key id and
/// password = secret, as HTTP Basic.
fn connect_credentials(connect: &Connect) -> Option<String> {
    use base64::Engine;
    let password = std::str::from_utf8(connect.password.as_ref()?).ok()?;
    if password.starts_with("rly_") || password.matches('.').count() == 2 {
        return Some(password.to_owned());
    }
    let username = connect.username.as_deref()?;
    Some(base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")))
}

/// Sends the CONNACK (if any) and the close frame, then waits a moment for
/// the client's close so the closing handshake completes.
async fn finish<S>(
    socket: &mut S,
    connack: Option<ConnectReturnCode>,
    close: Close,
    state: &EdgeState,
) where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    if let Some(code) = connack {
        let mut bytes = BytesMut::with_capacity(4);
        let packet = Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        });
        if mqtt::encode(&packet, &mut bytes).is_ok() {
            state
                .metrics
                .connacks
                .with_label_values(&[connack_code_name(code)])
                .inc();
            state.metrics.messages.with_label_values(&["out"]).inc();
            state
                .metrics
                .bytes
                .with_label_values(&["out"])
                .inc_by(bytes.len() as u64);
            if socket.send(Message::Binary(bytes.freeze())).await.is_err() {
                return;
            }
        }
    }
    state
        .metrics
        .close_codes
        .with_label_values(&[&close.code.to_string()])
        .inc();
    tracing::info!(code = close.code, reason = %close.reason, "closing session");
    let frame = CloseFrame {
        code: CloseCode::from(close.code),
        reason: close.reason.into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
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
