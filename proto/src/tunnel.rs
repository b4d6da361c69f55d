//! The messages the edge and the agent exchange over a QUIC connection,
//! version 1. `proto/PROTOCOL.md` documents the bytes; this module is the
//! reference implementation of that document.
//!
//! Every message is a frame: a type byte, a 4-byte big-endian body length and
//! a body of tagged fields (tag byte, 2-byte big-endian length, value).
//! Forward compatibility is built into the frame rather than negotiated:
//! unknown fields are skipped, unknown message types from `0x80` up are
//! reported as [`Message::Ignored`] for the caller to drop, and unknown
//! message types below `0x80` are errors. Decoding is check-then-parse and
//! bounded like the MQTT codec: `Ok(None)` until the whole frame is there,
//! and a frame over the caller's limit is refused from its 5-byte header.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Secret;

/// The tunnel protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The ALPN protocol id of this version, offered by the agent and required by
/// the edge.
pub const ALPN: &[u8] = b"relay-tunnel/1";

/// The ALPN protocol id of the peer links between edge instances, which
/// share this framing (PEER_HELLO, PEER_WELCOME, PEER_LINK_OPEN, then
/// LINK_ACCEPT / LINK_REFUSED; PEER_STATUS_QUERY, then PEER_STATUS) on a
/// listener of their own.
pub const PEER_ALPN: &[u8] = b"relay-peer/1";

/// Bytes of a peer's proof of the cluster secret (an HMAC-SHA256).
pub const PEER_PROOF_LEN: usize = 32;

/// Bytes of a frame header: type and body length.
pub const FRAME_HEADER_LEN: usize = 5;

/// A sensible maximum frame size for control frames and printer-link headers.
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Application error codes for closing a QUIC connection or resetting a
/// stream; see PROTOCOL.md.
pub mod close_code {
    /// Orderly close.
    pub const NO_ERROR: u32 = 0;
    /// The peer broke this protocol (bad frame, unexpected message).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The edge refused the agent (after HELLO_REFUSED).
    pub const REFUSED: u32 = 2;
    /// A newer tunnel for the same device replaced this one.
    pub const SUPERSEDED: u32 = 3;
    /// The edge is shutting down (after GO_AWAY).
    pub const GOING_AWAY: u32 = 4;
    /// Something failed inside the sender.
    pub const INTERNAL_ERROR: u32 = 5;
}

mod message_type {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_ACK: u8 = 0x02;
    pub const HELLO_REFUSED: u8 = 0x03;
    pub const PRINTER_LINK: u8 = 0x04;
    pub const GO_AWAY: u8 = 0x05;
    pub const LINK_OPEN: u8 = 0x06;
    pub const LINK_ACCEPT: u8 = 0x07;
    pub const LINK_REFUSED: u8 = 0x08;
    pub const PEER_HELLO: u8 = 0x09;
    pub const PEER_WELCOME: u8 = 0x0a;
    pub const PEER_LINK_OPEN: u8 = 0x0b;
    pub const PEER_STATUS_QUERY: u8 = 0x0c;
    pub const PEER_STATUS: u8 = 0x0d;
    /// Types from here up may be ignored by a peer that does not know them.
    pub const FIRST_IGNORABLE: u8 = 0x80;
}

/// One tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    HelloRefused(HelloRefused),
    PrinterLink(PrinterLink),
    GoAway(GoAway),
    LinkOpen(LinkOpen),
    LinkAccept(LinkAccept),
    LinkRefused(LinkRefused),
    PeerHello(PeerHello),
    PeerWelcome(PeerWelcome),
    PeerLinkOpen(PeerLinkOpen),
    PeerStatusQuery(PeerStatusQuery),
    PeerStatus(PeerStatus),
    /// A message of an unknown type at or above `0x80`, which its sender
    /// allows a receiver to drop.
    Ignored {
        message_type: u8,
    },
}

impl Message {
    /// The message's name as `PROTOCOL.md` spells it, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::HelloAck(_) => "HELLO_ACK",
            Message::HelloRefused(_) => "HELLO_REFUSED",
            Message::PrinterLink(_) => "PRINTER_LINK",
            Message::GoAway(_) => "GO_AWAY",
            Message::LinkOpen(_) => "LINK_OPEN",
            Message::LinkAccept(_) => "LINK_ACCEPT",
            Message::LinkRefused(_) => "LINK_REFUSED",
            Message::PeerHello(_) => "PEER_HELLO",
            Message::PeerWelcome(_) => "PEER_WELCOME",
            Message::PeerLinkOpen(_) => "PEER_LINK_OPEN",
            Message::PeerStatusQuery(_) => "PEER_STATUS_QUERY",
            Message::PeerStatus(_) => "PEER_STATUS",
            Message::Ignored { .. } => "an ignorable message",
        }
    }
}

/// Agent → edge, the first frame of the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The agent credential.
    pub credential: Secret<String>,
    /// The agent's software version, for logs.
    pub agent_version: Option<String>,
}

/// Edge → agent: the agent is accepted as the tunnel of `device_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub version: u16,
    pub device_id: String,
    /// Grows with every accepted tunnel of the device; a tunnel with a lower
    /// epoch is fenced off.
    pub epoch: u64,
    /// How often the agent should send QUIC keep-alives.
    pub keep_alive_ms: Option<u32>,
}

/// Edge → agent: the agent is refused; the edge then closes with
/// [`close_code::REFUSED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRefused {
    pub reason: RefusalReason,
    pub message: Option<String>,
    /// When to try again, if at all worth it.
    pub retry_after_ms: Option<u32>,
}

/// Why the edge refused an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    BadCredential,
    UnsupportedVersion,
    DeviceDisabled,
    RateLimited,
    Internal,
    /// A code this version does not know.
    Other(u16),
}

/// Agent → edge, on the control stream: the state of the printer link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrinterLink {
    pub state: LinkState,
    /// Why the link is down; absent when it is not.
    pub reason: Option<LinkDownReason>,
    /// Human-readable detail, free of secrets.
    pub detail: Option<String>,
    /// The printer link the state belongs to, if any.
    pub link: Option<u64>,
}

/// The printer link's state as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// No printer connection and none wanted (no clients).
    Idle,
    Connecting,
    Up,
    Down,
    Other(u8),
}

/// Why the printer link is down, or why a printer link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkDownReason {
    /// The printer answered CONNACK 4 or 5: wrong access code or user.
    CredentialsRefused,
    /// The TLS handshake with the printer failed (certificate, version).
    TlsFailure,
    /// No route, connection refused, or DNS failure.
    Unreachable,
    /// The printer refused or ignored one more client.
    TooManyClients,
    /// An established connection was lost.
    Dropped,
    /// The printer broke MQTT, or the agent's validation refused a packet.
    ProtocolError,
    /// The printer did not answer in time.
    TimedOut,
    /// The agent's local policy refused.
    Policy,
    /// Over a peer link: the device's agent is not on this instance (any
    /// more); ask the registry again.
    NotHere,
    Other(u8),
}

/// Edge → agent: reconnect (to another edge instance) soon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    pub reason: GoAwayReason,
    /// How long to wait before reconnecting; absent means at once.
    pub reconnect_after_ms: Option<u32>,
}

/// The kind of broker behind a printer link, as the agent reports it in
/// LINK_ACCEPT: the edge's hub adapts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrinterKind {
    /// Any MQTT broker: other clients may publish, and retain, on it.
    GenericMqtt,
    /// A Bambu Lab printer's own broker.
    Bambu,
    /// An Elegoo Centauri Carbon 2's broker (topics `elegoo/<sn>/…`; the
    /// agent holds the one registration).
    ElegooCc2,
    Other(u8),
}

/// Why the edge sends GO_AWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoAwayReason {
    Draining,
    Superseded,
    Other(u16),
}

/// Edge → agent, the first frame of a printer-link stream (a
/// bidirectional stream the edge opens): open a printer connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkOpen {
    /// The link's id, unique within the tunnel.
    pub link: u64,
    /// The largest MQTT packet the edge accepts from the printer.
    pub max_packet_size: Option<u32>,
}

/// Agent → edge, the first frame back on a printer-link stream: the printer
/// accepted the connection. MQTT packets follow in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAccept {
    pub link: u64,
    /// What kind of broker the agent reached; absent from agents that
    /// predate the field (the edge then assumes a generic broker).
    pub printer_kind: Option<PrinterKind>,
    /// The printer's serial, for printers whose topics name it (a Bambu
    /// printer's `device/<serial>/…`): the edge's topic policy needs it.
    pub printer_serial: Option<String>,
    /// The client id the agent registered with, on printers that register
    /// clients (a CC2): the edge sends every app's requests on that
    /// registration. Absent over a peer link: the owning instance does.
    pub printer_client_id: Option<String>,
    /// The agent runs a hub of its own on the printer's connection (it
    /// serves LAN apps too), and this link is one session of it: the edge's
    /// hub treats it as a peer link's upstream. False from agents that
    /// predate the field.
    pub through_agent_hub: bool,
}

/// Agent → edge, the only frame back on a printer-link stream that failed; the
/// agent then finishes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRefused {
    pub link: u64,
    pub reason: LinkDownReason,
    pub detail: Option<String>,
}

/// Edge instance → edge instance, the first frame of the first stream of a
/// peer connection: who dials, and its proof of the cluster secret bound to
/// this TLS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub version: u16,
    pub instance_id: String,
    pub proof: [u8; PEER_PROOF_LEN],
}

/// The answer to PEER_HELLO: the listener's own id and proof. A wrong
/// proof gets HELLO_REFUSED (bad credential) instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerWelcome {
    pub instance_id: String,
    pub proof: [u8; PEER_PROOF_LEN],
}

/// The first frame of every later stream of a peer connection: the dialing
/// instance's hub asks for the device's hub on the instance that holds its
/// agent. LINK_ACCEPT (link 0) then raw MQTT 3.1.1 packets, as on a
/// printer link; or LINK_REFUSED (`NotHere` when the agent is elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLinkOpen {
    pub device_id: String,
    pub max_packet_size: Option<u32>,
}

/// The first frame of a peer connection's stream that asks, instead of a
/// link, what the listening instance knows live of some devices: its
/// sessions of them, and the agent and traffic of those whose agent it
/// holds. Answered by one PEER_STATUS per device it knows something of,
/// then the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatusQuery {
    /// Device ids, separated by `,` (device ids are DNS labels).
    pub device_ids: String,
}

/// One device's live figures on the instance that answers a
/// PEER_STATUS_QUERY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub device_id: String,
    /// The figures, as JSON (the edge's `live_status` module's shape).
    pub figures: String,
}

/// Why bytes are not a valid tunnel frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("unknown message type {0:#04x}")]
    UnknownMessageType(u8),
    #[error("field header or value runs past the end of the frame")]
    TruncatedField,
    #[error("field {field} appears twice")]
    DuplicateField { field: &'static str },
    #[error("required field {field} is missing")]
    MissingField { field: &'static str },
    #[error("field {field} has length {len}, expected {expected}")]
    InvalidFieldLength {
        field: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("field {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("field {field} is longer than 65535 bytes")]
    FieldTooLong { field: &'static str },
}

/// Decodes the frame at the front of `buffer`. `Ok(None)` means more bytes
/// are needed and the buffer is untouched; on success the frame is removed.
pub fn decode(buffer: &mut BytesMut, max_frame_len: usize) -> Result<Option<Message>, TunnelError> {
    if buffer.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let message_type = buffer[0];
    let body_len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    let size = FRAME_HEADER_LEN.saturating_add(body_len);
    if size > max_frame_len {
        return Err(TunnelError::FrameTooLarge {
            size,
            max: max_frame_len,
        });
    }
    if message_type < message_type::FIRST_IGNORABLE && !is_known(message_type) {
        return Err(TunnelError::UnknownMessageType(message_type));
    }
    if buffer.len() < size {
        return Ok(None);
    }
    let mut frame = buffer.split_to(size).freeze();
    frame.advance(FRAME_HEADER_LEN);
    decode_body(message_type, frame).map(Some)
}

fn is_known(message_type: u8) -> bool {
    (message_type::HELLO..=message_type::PEER_STATUS).contains(&message_type)
}

fn decode_body(message_type: u8, body: Bytes) -> Result<Message, TunnelError> {
    if !is_known(message_type) {
        return Ok(Message::Ignored { message_type });
    }
    let fields = Fields::parse(body)?;
    Ok(match message_type {
        message_type::HELLO => Message::Hello(Hello {
            version: fields.required(1, "version", Fields::u16)?,
            credential: Secret::new(fields.required(2, "credential", Fields::string)?),
            agent_version: fields.optional(3, "agent_version", Fields::string)?,
        }),
        message_type::HELLO_ACK => Message::HelloAck(HelloAck {
            version: fields.required(1, "version", Fields::u16)?,
            device_id: fields.required(2, "device_id", Fields::string)?,
            epoch: fields.required(3, "epoch", Fields::u64)?,
            keep_alive_ms: fields.optional(4, "keep_alive_ms", Fields::u32)?,
        }),
        message_type::HELLO_REFUSED => Message::HelloRefused(HelloRefused {
            reason: RefusalReason::from_code(fields.required(1, "reason", Fields::u16)?),
            message: fields.optional(2, "message", Fields::string)?,
            retry_after_ms: fields.optional(3, "retry_after_ms", Fields::u32)?,
        }),
        message_type::PRINTER_LINK => Message::PrinterLink(PrinterLink {
            state: LinkState::from_code(fields.required(1, "state", Fields::u8)?),
            reason: fields
                .optional(2, "reason", Fields::u8)?
                .map(LinkDownReason::from_code),
            detail: fields.optional(3, "detail", Fields::string)?,
            link: fields.optional(4, "link", Fields::u64)?,
        }),
        message_type::GO_AWAY => Message::GoAway(GoAway {
            reason: GoAwayReason::from_code(fields.required(1, "reason", Fields::u16)?),
            reconnect_after_ms: fields.optional(2, "reconnect_after_ms", Fields::u32)?,
        }),
        message_type::LINK_OPEN => Message::LinkOpen(LinkOpen {
            link: fields.required(1, "link", Fields::u64)?,
            max_packet_size: fields.optional(2, "max_packet_size", Fields::u32)?,
        }),
        message_type::LINK_ACCEPT => Message::LinkAccept(LinkAccept {
            link: fields.required(1, "link", Fields::u64)?,
            printer_kind: fields
                .optional(2, "printer_kind", Fields::u8)?
                .map(PrinterKind::from_code),
            printer_serial: fields.optional(3, "printer_serial", Fields::string)?,
            printer_client_id: fields.optional(4, "printer_client_id", Fields::string)?,
            through_agent_hub: fields
                .optional(5, "through_agent_hub", Fields::u8)?
                .is_some_and(|flag| flag != 0),
        }),
        message_type::PEER_HELLO => Message::PeerHello(PeerHello {
            version: fields.required(1, "version", Fields::u16)?,
            instance_id: fields.required(2, "instance_id", Fields::string)?,
            proof: fields.required(3, "proof", Fields::fixed)?,
        }),
        message_type::PEER_WELCOME => Message::PeerWelcome(PeerWelcome {
            instance_id: fields.required(1, "instance_id", Fields::string)?,
            proof: fields.required(2, "proof", Fields::fixed)?,
        }),
        message_type::PEER_LINK_OPEN => Message::PeerLinkOpen(PeerLinkOpen {
            device_id: fields.required(1, "device_id", Fields::string)?,
            max_packet_size: fields.optional(2, "max_packet_size", Fields::u32)?,
        }),
        message_type::PEER_STATUS_QUERY => Message::PeerStatusQuery(PeerStatusQuery {
            device_ids: fields.required(1, "device_ids", Fields::string)?,
        }),
        message_type::PEER_STATUS => Message::PeerStatus(PeerStatus {
            device_id: fields.required(1, "device_id", Fields::string)?,
            figures: fields.required(2, "figures", Fields::string)?,
        }),
        _ => Message::LinkRefused(LinkRefused {
            link: fields.required(1, "link", Fields::u64)?,
            reason: LinkDownReason::from_code(fields.required(2, "reason", Fields::u8)?),
            detail: fields.optional(3, "detail", Fields::string)?,
        }),
    })
}

/// The highest field tag any version-1 message defines.
const MAX_KNOWN_TAG: usize = 5;

/// The known fields of one frame body, by tag. Unknown tags are skipped.
struct Fields {
    by_tag: [Option<Bytes>; MAX_KNOWN_TAG + 1],
    /// Bit `tag` is set when that known tag appeared more than once.
    duplicates: u16,
}

impl Fields {
    fn parse(mut body: Bytes) -> Result<Fields, TunnelError> {
        let mut fields = Fields {
            by_tag: Default::default(),
            duplicates: 0,
        };
        while !body.is_empty() {
            if body.len() < 3 {
                return Err(TunnelError::TruncatedField);
            }
            let tag = body.get_u8();
            let len = usize::from(body.get_u16());
            if body.len() < len {
                return Err(TunnelError::TruncatedField);
            }
            let value = body.split_to(len);
            if let Some(slot) = fields.by_tag.get_mut(usize::from(tag)) {
                if slot.is_some() {
                    fields.duplicates |= 1 << tag;
                }
                *slot = Some(value);
            }
        }
        Ok(fields)
    }

    fn optional<T>(
        &self,
        tag: u8,
        field: &'static str,
        convert: fn(&Bytes, &'static str) -> Result<T, TunnelError>,
    ) -> Result<Option<T>, TunnelError> {
        if self.duplicates & (1 << tag) != 0 {
            return Err(TunnelError::DuplicateField { field });
        }
        self.by_tag[usize::from(tag)]
            .as_ref()
            .map(|value| convert(value, field))
            .transpose()
    }

    fn required<T>(
        &self,
        tag: u8,
        field: &'static str,
        convert: fn(&Bytes, &'static str) -> Result<T, TunnelError>,
    ) -> Result<T, TunnelError> {
        self.optional(tag, field, convert)?
            .ok_or(TunnelError::MissingField { field })
    }

    fn fixed<const N: usize>(value: &Bytes, field: &'static str) -> Result<[u8; N], TunnelError> {
        <[u8; N]>::try_from(&value[..]).map_err(|_| TunnelError::InvalidFieldLength {
            field,
            len: value.len(),
            expected: N,
        })
    }

    fn u8(value: &Bytes, field: &'static str) -> Result<u8, TunnelError> {
        Self::fixed::<1>(value, field).map(|bytes| bytes[0])
    }

    fn u16(value: &Bytes, field: &'static str) -> Result<u16, TunnelError> {
        Self::fixed(value, field).map(u16::from_be_bytes)
    }

    fn u32(value: &Bytes, field: &'static str) -> Result<u32, TunnelError> {
        Self::fixed(value, field).map(u32::from_be_bytes)
    }

    fn u64(value: &Bytes, field: &'static str) -> Result<u64, TunnelError> {
        Self::fixed(value, field).map(u64::from_be_bytes)
    }

    fn string(value: &Bytes, field: &'static str) -> Result<String, TunnelError> {
        String::from_utf8(value.to_vec()).map_err(|_| TunnelError::InvalidUtf8 { field })
    }
}

/// Appends the frame of `message` to `out`. [`Message::Ignored`] encodes as
/// an empty frame of its type. On error nothing is appended.
pub fn encode(message: &Message, out: &mut BytesMut) -> Result<(), TunnelError> {
    let mut body = FieldWriter::default();
    let message_type = match message {
        Message::Hello(hello) => {
            body.u16(1, hello.version);
            body.string(2, "credential", hello.credential.expose())?;
            body.optional_string(3, "agent_version", hello.agent_version.as_deref())?;
            message_type::HELLO
        }
        Message::HelloAck(ack) => {
            body.u16(1, ack.version);
            body.string(2, "device_id", &ack.device_id)?;
            body.u64(3, ack.epoch);
            if let Some(keep_alive_ms) = ack.keep_alive_ms {
                body.u32(4, keep_alive_ms);
            }
            message_type::HELLO_ACK
        }
        Message::HelloRefused(refused) => {
            body.u16(1, refused.reason.code());
            body.optional_string(2, "message", refused.message.as_deref())?;
            if let Some(retry_after_ms) = refused.retry_after_ms {
                body.u32(3, retry_after_ms);
            }
            message_type::HELLO_REFUSED
        }
        Message::PrinterLink(link) => {
            body.u8(1, link.state.code());
            if let Some(reason) = link.reason {
                body.u8(2, reason.code());
            }
            body.optional_string(3, "detail", link.detail.as_deref())?;
            if let Some(id) = link.link {
                body.u64(4, id);
            }
            message_type::PRINTER_LINK
        }
        Message::GoAway(go_away) => {
            body.u16(1, go_away.reason.code());
            if let Some(after) = go_away.reconnect_after_ms {
                body.u32(2, after);
            }
            message_type::GO_AWAY
        }
        Message::LinkOpen(open) => {
            body.u64(1, open.link);
            if let Some(max) = open.max_packet_size {
                body.u32(2, max);
            }
            message_type::LINK_OPEN
        }
        Message::LinkAccept(accept) => {
            body.u64(1, accept.link);
            if let Some(kind) = accept.printer_kind {
                body.u8(2, kind.code());
            }
            if let Some(serial) = &accept.printer_serial {
                body.string(3, "printer_serial", serial)?;
            }
            body.optional_string(4, "printer_client_id", accept.printer_client_id.as_deref())?;
            if accept.through_agent_hub {
                body.u8(5, 1);
            }
            message_type::LINK_ACCEPT
        }
        Message::LinkRefused(refused) => {
            body.u64(1, refused.link);
            body.u8(2, refused.reason.code());
            body.optional_string(3, "detail", refused.detail.as_deref())?;
            message_type::LINK_REFUSED
        }
        Message::PeerHello(hello) => {
            body.u16(1, hello.version);
            body.string(2, "instance_id", &hello.instance_id)?;
            body.raw(3, &hello.proof);
            message_type::PEER_HELLO
        }
        Message::PeerWelcome(welcome) => {
            body.string(1, "instance_id", &welcome.instance_id)?;
            body.raw(2, &welcome.proof);
            message_type::PEER_WELCOME
        }
        Message::PeerLinkOpen(open) => {
            body.string(1, "device_id", &open.device_id)?;
            if let Some(max) = open.max_packet_size {
                body.u32(2, max);
            }
            message_type::PEER_LINK_OPEN
        }
        Message::PeerStatusQuery(query) => {
            body.string(1, "device_ids", &query.device_ids)?;
            message_type::PEER_STATUS_QUERY
        }
        Message::PeerStatus(status) => {
            body.string(1, "device_id", &status.device_id)?;
            body.string(2, "figures", &status.figures)?;
            message_type::PEER_STATUS
        }
        Message::Ignored { message_type } => *message_type,
    };
    let body = body.bytes;
    // Bodies are a handful of fields of at most 64 KiB each: far below 4 GiB.
    let body_len = u32::try_from(body.len()).map_err(|_| TunnelError::FrameTooLarge {
        size: body.len(),
        max: u32::MAX as usize,
    })?;
    out.reserve(FRAME_HEADER_LEN + body.len());
    out.put_u8(message_type);
    out.put_u32(body_len);
    out.put_slice(&body);
    Ok(())
}

#[derive(Default)]
struct FieldWriter {
    bytes: Vec<u8>,
}

impl FieldWriter {
    fn raw(&mut self, tag: u8, value: &[u8]) {
        self.bytes.put_u8(tag);
        // Callers check string lengths; fixed-width values are at most 8 bytes.
        self.bytes.put_u16(value.len() as u16);
        self.bytes.put_slice(value);
    }

    fn u8(&mut self, tag: u8, value: u8) {
        self.raw(tag, &[value]);
    }

    fn u16(&mut self, tag: u8, value: u16) {
        self.raw(tag, &value.to_be_bytes());
    }

    fn u32(&mut self, tag: u8, value: u32) {
        self.raw(tag, &value.to_be_bytes());
    }

    fn u64(&mut self, tag: u8, value: u64) {
        self.raw(tag, &value.to_be_bytes());
    }

    fn string(&mut self, tag: u8, field: &'static str, value: &str) -> Result<(), TunnelError> {
        if value.len() > usize::from(u16::MAX) {
            return Err(TunnelError::FieldTooLong { field });
        }
        self.raw(tag, value.as_bytes());
        Ok(())
    }

    fn optional_string(
        &mut self,
        tag: u8,
        field: &'static str,
        value: Option<&str>,
    ) -> Result<(), TunnelError> {
        match value {
            Some(value) => self.string(tag, field, value),
            None => Ok(()),
        }
    }
}

/// Maps a wire code to and from an enum with an `Other` fallback, so that a
/// code from a newer peer survives a round trip.
macro_rules! wire_codes {
    ($name:ident: $repr:ty { $($variant:ident = $code:literal),+ $(,)? }) => {
        impl $name {
            /// The enum value for a wire code; unknown codes become `Other`.
            pub fn from_code(code: $repr) -> Self {
                match code {
                    $($code => $name::$variant,)+
                    other => $name::Other(other),
                }
            }

            /// The wire code of this value.
            pub fn code(self) -> $repr {
                match self {
                    $($name::$variant => $code,)+
                    $name::Other(other) => other,
                }
            }
        }
    };
}

wire_codes!(RefusalReason: u16 {
    BadCredential = 1,
    UnsupportedVersion = 2,
    DeviceDisabled = 3,
    RateLimited = 4,
    Internal = 5,
});

wire_codes!(LinkState: u8 {
    Idle = 1,
    Connecting = 2,
    Up = 3,
    Down = 4,
});

wire_codes!(LinkDownReason: u8 {
    CredentialsRefused = 1,
    TlsFailure = 2,
    Unreachable = 3,
    TooManyClients = 4,
    Dropped = 5,
    ProtocolError = 6,
    TimedOut = 7,
    Policy = 8,
    NotHere = 9,
});

wire_codes!(PrinterKind: u8 {
    GenericMqtt = 1,
    Bambu = 2,
    ElegooCc2 = 3,
});

wire_codes!(GoAwayReason: u16 {
    Draining = 1,
    Superseded = 2,
});
