//! MQTT straight over TLS (mqtts, port 8883) or TCP, for apps that cannot
//! speak WebSocket: Home Assistant's Bambu Lab integration, `mosquitto_sub`,
//! ESP32 firmware.
//!
//! Such a connection runs the very session the WebSocket path runs
//! ([`crate::session::run`]): [`MqttOverTcp`] presents the byte stream as
//! a stream of binary messages, so the limits, quotas, policy, hub and
//! MQTT 3.1 / 3.1.1 / 5 handling are the same code. Without a WebSocket
//! close code, the CONNACK (or an MQTT 5 DISCONNECT) is all a client hears
//! of a refusal; the edge then closes the connection.
//!
//! The device comes from the name the client dialled (TLS SNI,
//! `<device-id>.<base_domain>`); a client that sent none (it dialled an
//! address) is served the device its key is bound to, and refused with
//! CONNACK 2 (MQTT 5: 0x85, with a reason string) when its key is not
//! bound to one device.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::devices::device_from_name;
use crate::http::RequestContext;
use crate::metrics::decrement_on_drop;
use crate::session::{self, SessionRequest};

/// Bytes read at a time from the client.
const READ_CHUNK: usize = 4096;

/// Writes are flushed once this much is buffered.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// A byte stream seen as WebSocket binary messages: each read is one
/// message (MQTT packets may span them, as over WebSocket); a binary
/// message is written as its bytes; a close message shuts the write side
/// down once what came before it is written.
#[derive(Debug)]
pub struct MqttOverTcp<IO> {
    io: IO,
    to_write: BytesMut,
    /// A close was sent: no more writes; the write side is shut down on
    /// the next flush.
    closing: bool,
    shut_down: bool,
    read_done: bool,
}

impl<IO> MqttOverTcp<IO> {
    pub fn new(io: IO) -> MqttOverTcp<IO> {
        MqttOverTcp {
            io,
            to_write: BytesMut::new(),
            closing: false,
            shut_down: false,
            read_done: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> Stream for MqttOverTcp<IO> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.read_done {
            return Poll::Ready(None);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut buffer = ReadBuf::new(&mut chunk);
        match ready!(Pin::new(&mut this.io).poll_read(cx, &mut buffer)) {
            Ok(()) if buffer.filled().is_empty() => {
                this.read_done = true;
                Poll::Ready(None)
            }
            Ok(()) => Poll::Ready(Some(Ok(Message::Binary(Bytes::copy_from_slice(
                buffer.filled(),
            ))))),
            Err(error) => {
                this.read_done = true;
                Poll::Ready(Some(Err(WsError::Io(error))))
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> MqttOverTcp<IO> {
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while !self.to_write.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.to_write))?;
            if written == 0 {
                return Poll::Ready(Err(WsError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            let _ = self.to_write.split_to(written);
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        if self.closing && !self.shut_down {
            ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            self.shut_down = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> Sink<Message> for MqttOverTcp<IO> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.to_write.len() >= WRITE_HIGH_WATER {
            ready!(this.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        let this = self.get_mut();
        if this.closing {
            return Err(WsError::AlreadyClosed);
        }
        match item {
            Message::Binary(bytes) => this.to_write.extend_from_slice(&bytes),
            Message::Close(_) => this.closing = true,
            // Nothing else has a meaning on a byte stream.
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        this.closing = true;
        this.poll_write_out(cx)
    }
}

/// The device a TLS client asked for by its SNI, `None` without one (or
/// with a name that is not a device's).
pub fn device_from_sni(server_name: Option<&str>, base_domain: &str) -> Option<String> {
    device_from_name(server_name?, base_domain)
}

/// Serves one MQTT-over-TLS (or TCP) connection as a session, tracked with
/// the WebSocket sessions (a drain waits for it).
/// `tls`: over TLS (a plain development listener lets CONNECT's user name
/// name the device).
pub fn serve<IO>(io: IO, device_id: Option<String>, tls: bool, context: RequestContext)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = context.state.clone();
    let request = SessionRequest {
        device_id,
        authorization: None,
        query_token: None,
        peer_ip: context.peer.ip(),
        device_from_key: true,
        device_from_username: !tls,
        transport: if tls { "mqtts" } else { "mqtt" },
    };
    let span = tracing::info_span!("session", peer = %context.peer, transport = "mqtt", device = request.device_id.as_deref().unwrap_or("-"));
    state.metrics.mqtt_connections.inc();
    let open = state.metrics.connections_open.clone();
    open.inc();
    context.sessions.spawn(tracing::Instrument::instrument(
        async move {
            let _counted = decrement_on_drop(open);
            session::run(MqttOverTcp::new(io), request, state, context.shutdown).await;
        },
        span,
    ));
}
