//! MQTT 3.1 and 3.1.1 control packets: types, [`decode`] and [`encode`].
//!
//! Decoding is check-then-parse: [`decode`] looks at the fixed header in the
//! caller's buffer, refuses a packet larger than the caller's limit before it
//! allocates anything, and takes bytes out of the buffer only once a whole
//! packet is there. Until then it returns `Ok(None)` and leaves the buffer as
//! it was, so a read loop can call it again after every read (and it is safe
//! to use inside `select!`). Payloads are [`Bytes`] slices of the buffer that
//! carried them: forwarding a decoded PUBLISH copies no payload.
//!
//! ```
//! use bytes::BytesMut;
//! use relay_proto::mqtt::{decode, encode, Packet};
//!
//! // A read loop: bytes arrive in any split; packets come out whole.
//! let mut buffer = BytesMut::new();
//! buffer.extend_from_slice(&[0xc0]); // half of a PINGREQ
//! assert_eq!(decode(&mut buffer, 1024), Ok(None));
//! buffer.extend_from_slice(&[0x00]);
//! assert_eq!(decode(&mut buffer, 1024), Ok(Some(Packet::PingReq)));
//!
//! let mut out = BytesMut::new();
//! encode(&Packet::PingResp, &mut out).unwrap();
//! assert_eq!(&out[..], &[0xd0, 0x00]);
//! ```
//!
//! Both protocol levels share one codec. They differ only in CONNECT, whose
//! [`Connect::protocol`] tells which level the client speaks.

pub(crate) mod decode;
pub(crate) mod encode;

use std::fmt;
use std::num::NonZeroU16;

use bytes::Bytes;

pub use decode::{FixedHeader, PublishPrefix, decode, decode_with_bytes, publish_prefix};
pub use encode::{encode, encoded_len};

use crate::Secret;
use crate::topic::TopicError;

/// A packet identifier. Zero is not a valid identifier in MQTT, so the type
/// cannot hold it.
pub type PacketId = NonZeroU16;

/// The largest value the remaining-length field can carry (four bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The protocol level a client asks for in its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolLevel {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
}

impl ProtocolLevel {
    /// The protocol name written in CONNECT for this level.
    pub fn protocol_name(self) -> &'static str {
        match self {
            ProtocolLevel::V3_1 => "MQIsdp",
            ProtocolLevel::V3_1_1 => "MQTT",
        }
    }

    /// The level byte written in CONNECT (without the bridge bit).
    pub fn level_byte(self) -> u8 {
        match self {
            ProtocolLevel::V3_1 => 3,
            ProtocolLevel::V3_1_1 => 4,
        }
    }
}

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for its two-bit wire value; 3 is not a QoS.
    pub fn from_bits(bits: u8) -> Result<QoS, DecodeError> {
        match bits {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            other => Err(DecodeError::InvalidQos(other)),
        }
    }
}

/// The fourteen MQTT 3.1.1 control packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
}

impl PacketType {
    fn from_nibble(nibble: u8) -> Option<PacketType> {
        Some(match nibble {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            _ => return None,
        })
    }

    /// The low nibble of the first byte that the spec requires, for every
    /// type but PUBLISH (whose nibble carries DUP, QoS and RETAIN).
    fn required_flags(self) -> Option<u8> {
        match self {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A decoded or to-be-encoded MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PacketId),
    PubRec(PacketId),
    PubRel(PacketId),
    PubComp(PacketId),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(PacketId),
    PingReq,
    PingResp,
    Disconnect,
}

impl Packet {
    /// The control packet type of this packet.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect => PacketType::Disconnect,
        }
    }
}

/// CONNECT: the first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The level the client speaks.
    pub protocol: ProtocolLevel,
    /// The non-standard bridge bit (0x80 on the level byte) that Mosquitto
    /// bridges set; kept so that such a CONNECT round-trips.
    pub bridge_mode: bool,
    pub clean_session: bool,
    /// Keep-alive in seconds; 0 turns the mechanism off.
    pub keep_alive: u16,
    /// May be empty (3.1.1); what the server does with that is its choice.
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Secret<Bytes>>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// CONNACK: the server's answer to CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Always false when `code` is not [`ConnectReturnCode::Accepted`].
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

/// The CONNACK return codes of MQTT 3.1.1 (section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUserNameOrPassword = 4,
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    fn from_byte(byte: u8) -> Result<ConnectReturnCode, DecodeError> {
        Ok(match byte {
            0 => ConnectReturnCode::Accepted,
            1 => ConnectReturnCode::UnacceptableProtocolVersion,
            2 => ConnectReturnCode::IdentifierRejected,
            3 => ConnectReturnCode::ServerUnavailable,
            4 => ConnectReturnCode::BadUserNameOrPassword,
            5 => ConnectReturnCode::NotAuthorized,
            other => return Err(DecodeError::InvalidConnectReturnCode(other)),
        })
    }
}

/// PUBLISH: an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    /// Present exactly when `qos` is above [`QoS::AtMostOnce`].
    pub packet_id: Option<PacketId>,
    pub payload: Bytes,
}

/// SUBSCRIBE: one or more topic filters with the QoS asked for each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    /// Never empty.
    pub filters: Vec<(String, QoS)>,
}

/// SUBACK: one return code per filter of the SUBSCRIBE it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    /// Never empty.
    pub return_codes: Vec<SubscribeReturnCode>,
}

/// The outcome of one filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscribeReturnCode {
    /// Granted, at this maximum QoS.
    Success(QoS),
    /// Refused (0x80).
    Failure,
}

/// UNSUBSCRIBE: one or more topic filters to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    /// Never empty.
    pub filters: Vec<String>,
}

/// Why bytes are not a valid MQTT 3.1 / 3.1.1 packet. Every variant is a
/// protocol violation after which the connection cannot continue, except
/// [`DecodeError::UnsupportedProtocolLevel`], which the server answers with
/// CONNACK 1 before closing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for {packet_type}")]
    InvalidHeaderFlags { packet_type: PacketType, flags: u8 },
    #[error("remaining length is longer than 4 bytes")]
    MalformedRemainingLength,
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("invalid QoS {0}")]
    InvalidQos(u8),
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DuplicateFlagWithQos0,
    #[error("packet identifier 0")]
    ZeroPacketId,
    #[error("{0} runs past the end of the packet")]
    Truncated(&'static str),
    #[error("{0} bytes left over after the packet's last field")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("unknown protocol name")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolLevel(u8),
    #[error("CONNECT reserved flag is set")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    #[error("password flag set without the user name flag")]
    PasswordWithoutUsername,
    #[error("invalid CONNACK acknowledge flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    #[error("session present set on a refused CONNACK")]
    SessionPresentOnRefusal,
    #[error("invalid CONNACK return code {0}")]
    InvalidConnectReturnCode(u8),
    #[error("invalid topic name: {0}")]
    InvalidTopicName(TopicError),
    #[error("invalid topic filter: {0}")]
    InvalidTopicFilter(TopicError),
    #[error("reserved bits set in a requested QoS byte {0:#04x}")]
    SubscribeReservedBits(u8),
    #[error("{0} carries no topic filters")]
    NoTopicFilters(PacketType),
    #[error("SUBACK carries no return codes")]
    NoSubAckReturnCodes,
    #[error("invalid SUBACK return code {0:#04x}")]
    InvalidSubAckReturnCode(u8),
}

/// Why a packet cannot be encoded: it breaks a rule that its types cannot
/// express. The encoder checks structure (lengths, identifiers, non-empty
/// lists); topic syntax is the decoder's and [`crate::topic`]'s business.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} is longer than 65535 bytes")]
    FieldTooLong(&'static str),
    #[error("packet body of {0} bytes exceeds the MQTT maximum")]
    PacketTooLarge(usize),
    #[error("QoS {0:?} PUBLISH without a packet identifier")]
    MissingPacketId(QoS),
    #[error("QoS 0 PUBLISH with a packet identifier")]
    UnexpectedPacketId,
    #[error("DUP flag set on a QoS 0 PUBLISH")]
    DuplicateFlagWithQos0,
    #[error("{0} carries no topic filters")]
    NoTopicFilters(PacketType),
    #[error("SUBACK carries no return codes")]
    NoSubAckReturnCodes,
    #[error("password without a user name")]
    PasswordWithoutUsername,
    #[error("session present set on a refused CONNACK")]
    SessionPresentOnRefusal,
}
