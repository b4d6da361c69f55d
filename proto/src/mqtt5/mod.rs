//! MQTT 5 control packets: types with their properties and reason codes,
//! [`decode`] and [`encode`].
//!
//! Bounded and check-then-parse like the 3.1.1 codec in [`crate::mqtt`]
//! (whose field rules, UTF-8 strings and topic checks it shares): a packet
//! over the caller's limit is refused from its fixed header, before
//! anything is allocated, and `Ok(None)` leaves the buffer as it was.
//! Validity rules come with a typed error each: which properties each
//! packet allows, none twice (but user properties, and subscription
//! identifiers in a PUBLISH), value ranges, reason codes per packet,
//! subscription options, variable byte integers. The encoder applies the
//! same rules, so what it writes decodes.
//!
//! ```
//! use bytes::BytesMut;
//! use relay_proto::mqtt5::{decode, encode, Ack, Packet, Properties, Property, ReasonCode};
//! use relay_proto::mqtt::PacketId;
//!
//! let puback = Packet::PubAck(Ack {
//!     packet_id: PacketId::new(7).unwrap(),
//!     reason: ReasonCode::NOT_AUTHORIZED,
//!     properties: Properties::new().with(Property::ReasonString("read-only key".into())),
//! });
//! let mut wire = BytesMut::new();
//! encode(&puback, &mut wire).unwrap();
//! assert_eq!(decode(&mut wire, 1024), Ok(Some(puback)));
//! ```

mod codec;
pub mod properties;

use std::fmt;

use bytes::{Bytes, BytesMut};

pub use codec::{decode, encode, encoded_len, starts_with_connect};
pub use properties::{Properties, Property, PropertyContext, PropertyError};

use crate::Secret;
use crate::mqtt::decode::BodyReader;
pub use crate::mqtt::{PacketId, QoS};

/// The largest variable byte integer (four bytes).
pub const MAX_VARIABLE_INTEGER: u32 = 268_435_455;

/// The fifteen MQTT 5 control packet types.
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
    Auth = 15,
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A reason code (section 2.4). Which ones a packet may carry is checked
/// by [`ReasonCode::allowed_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReasonCode(pub u8);

impl ReasonCode {
    pub const SUCCESS: ReasonCode = ReasonCode(0x00);
    pub const NORMAL_DISCONNECTION: ReasonCode = ReasonCode(0x00);
    pub const GRANTED_QOS_0: ReasonCode = ReasonCode(0x00);
    pub const GRANTED_QOS_1: ReasonCode = ReasonCode(0x01);
    pub const GRANTED_QOS_2: ReasonCode = ReasonCode(0x02);
    pub const DISCONNECT_WITH_WILL: ReasonCode = ReasonCode(0x04);
    pub const NO_MATCHING_SUBSCRIBERS: ReasonCode = ReasonCode(0x10);
    pub const NO_SUBSCRIPTION_EXISTED: ReasonCode = ReasonCode(0x11);
    pub const CONTINUE_AUTHENTICATION: ReasonCode = ReasonCode(0x18);
    pub const RE_AUTHENTICATE: ReasonCode = ReasonCode(0x19);
    pub const UNSPECIFIED_ERROR: ReasonCode = ReasonCode(0x80);
    pub const MALFORMED_PACKET: ReasonCode = ReasonCode(0x81);
    pub const PROTOCOL_ERROR: ReasonCode = ReasonCode(0x82);
    pub const IMPLEMENTATION_SPECIFIC_ERROR: ReasonCode = ReasonCode(0x83);
    pub const UNSUPPORTED_PROTOCOL_VERSION: ReasonCode = ReasonCode(0x84);
    pub const CLIENT_IDENTIFIER_NOT_VALID: ReasonCode = ReasonCode(0x85);
    pub const BAD_USER_NAME_OR_PASSWORD: ReasonCode = ReasonCode(0x86);
    pub const NOT_AUTHORIZED: ReasonCode = ReasonCode(0x87);
    pub const SERVER_UNAVAILABLE: ReasonCode = ReasonCode(0x88);
    pub const SERVER_BUSY: ReasonCode = ReasonCode(0x89);
    pub const BANNED: ReasonCode = ReasonCode(0x8A);
    pub const SERVER_SHUTTING_DOWN: ReasonCode = ReasonCode(0x8B);
    pub const BAD_AUTHENTICATION_METHOD: ReasonCode = ReasonCode(0x8C);
    pub const KEEP_ALIVE_TIMEOUT: ReasonCode = ReasonCode(0x8D);
    pub const SESSION_TAKEN_OVER: ReasonCode = ReasonCode(0x8E);
    pub const TOPIC_FILTER_INVALID: ReasonCode = ReasonCode(0x8F);
    pub const TOPIC_NAME_INVALID: ReasonCode = ReasonCode(0x90);
    pub const PACKET_IDENTIFIER_IN_USE: ReasonCode = ReasonCode(0x91);
    pub const PACKET_IDENTIFIER_NOT_FOUND: ReasonCode = ReasonCode(0x92);
    pub const RECEIVE_MAXIMUM_EXCEEDED: ReasonCode = ReasonCode(0x93);
    pub const TOPIC_ALIAS_INVALID: ReasonCode = ReasonCode(0x94);
    pub const PACKET_TOO_LARGE: ReasonCode = ReasonCode(0x95);
    pub const MESSAGE_RATE_TOO_HIGH: ReasonCode = ReasonCode(0x96);
    pub const QUOTA_EXCEEDED: ReasonCode = ReasonCode(0x97);
    pub const ADMINISTRATIVE_ACTION: ReasonCode = ReasonCode(0x98);
    pub const PAYLOAD_FORMAT_INVALID: ReasonCode = ReasonCode(0x99);
    pub const RETAIN_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9A);
    pub const QOS_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9B);
    pub const USE_ANOTHER_SERVER: ReasonCode = ReasonCode(0x9C);
    pub const SERVER_MOVED: ReasonCode = ReasonCode(0x9D);
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: ReasonCode = ReasonCode(0x9E);
    pub const CONNECTION_RATE_EXCEEDED: ReasonCode = ReasonCode(0x9F);
    pub const MAXIMUM_CONNECT_TIME: ReasonCode = ReasonCode(0xA0);
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: ReasonCode = ReasonCode(0xA1);
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: ReasonCode = ReasonCode(0xA2);

    /// Whether this code is a failure (0x80 and above).
    pub fn is_failure(self) -> bool {
        self.0 >= 0x80
    }

    /// Whether `packet` may carry this code (table 2-6).
    pub fn allowed_in(self, packet: PacketType) -> bool {
        let allowed: &[u8] = match packet {
            PacketType::ConnAck => &[
                0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
                0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
            ],
            PacketType::PubAck | PacketType::PubRec => {
                &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
            }
            PacketType::PubRel | PacketType::PubComp => &[0x00, 0x92],
            PacketType::SubAck => &[
                0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
            ],
            PacketType::UnsubAck => &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
            PacketType::Disconnect => &[
                0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
                0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
                0xA2,
            ],
            PacketType::Auth => &[0x00, 0x18, 0x19],
            _ => &[],
        };
        allowed.contains(&self.0)
    }
}

/// A decoded or to-be-encoded MQTT 5 control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(SubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
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
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT at protocol level 5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub clean_start: bool,
    /// Keep-alive in seconds; 0 turns the mechanism off.
    pub keep_alive: u16,
    pub properties: Properties,
    /// May be empty: the server then assigns one.
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// MQTT 5 allows a password without a user name.
    pub password: Option<Secret<Bytes>>,
}

/// The will message of a CONNECT, with its own properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub properties: Properties,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Always false when `reason` is a failure.
    pub session_present: bool,
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when a topic alias stands for it.
    pub topic: String,
    /// Present exactly when `qos` is above [`QoS::AtMostOnce`].
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    /// Success, without properties.
    pub fn success(packet_id: PacketId) -> Ack {
        Ack {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::new(),
        }
    }
}

/// Retain Handling of a subscription (section 3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetainHandling {
    /// Send retained messages at subscribe time.
    SendAtSubscribe = 0,
    /// Only when the subscription did not exist.
    SendIfNew = 1,
    /// Never.
    DoNotSend = 2,
}

/// A subscription's options byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// The defaults a 3.1.1 subscription has, at `qos`.
    pub fn at(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
        }
    }

    fn byte(self) -> u8 {
        (self.qos as u8)
            | (u8::from(self.no_local) << 2)
            | (u8::from(self.retain_as_published) << 3)
            | ((self.retain_handling as u8) << 4)
    }

    fn from_byte(byte: u8) -> Result<SubscriptionOptions, DecodeError> {
        if byte & 0xc0 != 0 {
            return Err(DecodeError::InvalidSubscriptionOptions(byte));
        }
        let retain_handling = match (byte >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::InvalidSubscriptionOptions(byte)),
        };
        Ok(SubscriptionOptions {
            qos: QoS::from_bits(byte & 0b11)
                .map_err(|_| DecodeError::InvalidSubscriptionOptions(byte))?,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling,
        })
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Never empty.
    pub filters: Vec<(String, SubscriptionOptions)>,
}

/// SUBACK and UNSUBACK: one reason code per filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Never empty.
    pub reasons: Vec<ReasonCode>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Never empty.
    pub filters: Vec<String>,
}

/// DISCONNECT, from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// AUTH (enhanced authentication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// Why bytes are not a valid MQTT 5 packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A rule MQTT 5 shares with 3.1.1 (fixed header, lengths, strings,
    /// topics, packet identifiers).
    #[error(transparent)]
    Packet(#[from] crate::mqtt::DecodeError),
    #[error("{0}")]
    Property(#[from] PropertyError),
    #[error("variable byte integer longer than 4 bytes")]
    MalformedVariableByteInteger,
    #[error("invalid fixed header flags {0:#06b} for AUTH")]
    InvalidAuthFlags(u8),
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode { packet: PacketType, code: u8 },
    #[error("invalid subscription options {0:#04x}")]
    InvalidSubscriptionOptions(u8),
    #[error("No Local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("PUBLISH with an empty topic name and no topic alias")]
    EmptyTopicWithoutAlias,
    #[error("{0} carries no reason codes")]
    NoReasonCodes(PacketType),
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error(transparent)]
    Packet(#[from] crate::mqtt::EncodeError),
    #[error("{0}")]
    Property(#[from] PropertyError),
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode { packet: PacketType, code: u8 },
    #[error("No Local set on a shared subscription")]
    NoLocalOnSharedSubscription,
    #[error("PUBLISH with an empty topic name and no topic alias")]
    EmptyTopicWithoutAlias,
    #[error("{0} carries no reason codes")]
    NoReasonCodes(PacketType),
}

/// Bytes a variable byte integer takes (the remaining length's encoding).
pub(crate) fn variable_integer_len(value: u32) -> usize {
    crate::mqtt::encode::remaining_length_size(value as usize)
}

/// Writes `value` (at most [`MAX_VARIABLE_INTEGER`]) as a variable byte
/// integer.
pub(crate) fn put_variable_integer(out: &mut BytesMut, value: u32) {
    crate::mqtt::encode::put_remaining_length(out, value as usize);
}

/// Reads a variable byte integer of at most four bytes.
pub(crate) fn read_variable_integer(reader: &mut BodyReader) -> Result<u32, DecodeError> {
    let mut value = 0u32;
    for index in 0..4 {
        let byte = reader.u8("variable byte integer")?;
        value |= u32::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::MalformedVariableByteInteger)
}
