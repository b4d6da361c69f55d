//! MQTT 5 properties (section 2.2.2): each one's identifier, value type,
//! the packets that may carry it and the values it may take.
//!
//! [`Properties`] keeps them in wire order, so that a packet re-encodes to
//! the bytes it came in; accessors find one by kind.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DecodeError, EncodeError, MAX_VARIABLE_INTEGER, put_variable_integer};
use crate::mqtt::decode::BodyReader;
use crate::mqtt::encode::{binary_len, put_binary};

/// One property with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Property {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(String),
    ResponseTopic(String),
    CorrelationData(Bytes),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(String),
    ServerKeepAlive(u16),
    AuthenticationMethod(String),
    AuthenticationData(Bytes),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(String),
    ServerReference(String),
    ReasonString(String),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQos(u8),
    RetainAvailable(u8),
    UserProperty(String, String),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

/// Where properties appear: a packet's own, or a CONNECT's will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl std::fmt::Display for PropertyContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Why properties are not valid where they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PropertyError {
    #[error("unknown property {0:#04x}")]
    Unknown(u8),
    #[error("property {property:#04x} is not allowed in {context}")]
    NotAllowed {
        property: u8,
        context: PropertyContext,
    },
    #[error("property {0:#04x} appears more than once")]
    Duplicate(u8),
    #[error("property {property:#04x} may not be {value}")]
    InvalidValue { property: u8, value: u32 },
}

/// The value type of each property identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueType {
    Byte,
    TwoBytes,
    FourBytes,
    VariableInteger,
    Text,
    Binary,
    TextPair,
}

/// Identifier, value type and the contexts that allow it, for every
/// property of MQTT 5 (table 2-4).
fn describe(id: u8) -> Option<(ValueType, &'static [PropertyContext])> {
    use PropertyContext::*;
    use ValueType::*;
    const MESSAGE: &[PropertyContext] = &[Publish, Will];
    const REASONED: &[PropertyContext] = &[
        ConnAck, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, Disconnect, Auth,
    ];
    const EVERY: &[PropertyContext] = &[
        Connect,
        Will,
        ConnAck,
        Publish,
        PubAck,
        PubRec,
        PubRel,
        PubComp,
        Subscribe,
        SubAck,
        Unsubscribe,
        UnsubAck,
        Disconnect,
        Auth,
    ];
    Some(match id {
        0x01 => (Byte, MESSAGE),
        0x02 => (FourBytes, MESSAGE),
        0x03 => (Text, MESSAGE),
        0x08 => (Text, MESSAGE),
        0x09 => (Binary, MESSAGE),
        0x0B => (VariableInteger, &[Publish, Subscribe]),
        0x11 => (FourBytes, &[Connect, ConnAck, Disconnect]),
        0x12 => (Text, &[ConnAck]),
        0x13 => (TwoBytes, &[ConnAck]),
        0x15 => (Text, &[Connect, ConnAck, Auth]),
        0x16 => (Binary, &[Connect, ConnAck, Auth]),
        0x17 => (Byte, &[Connect]),
        0x18 => (FourBytes, &[Will]),
        0x19 => (Byte, &[Connect]),
        0x1A => (Text, &[ConnAck]),
        0x1C => (Text, &[ConnAck, Disconnect]),
        0x1F => (Text, REASONED),
        0x21 => (TwoBytes, &[Connect, ConnAck]),
        0x22 => (TwoBytes, &[Connect, ConnAck]),
        0x23 => (TwoBytes, &[Publish]),
        0x24 => (Byte, &[ConnAck]),
        0x25 => (Byte, &[ConnAck]),
        0x26 => (TextPair, EVERY),
        0x27 => (FourBytes, &[Connect, ConnAck]),
        0x28 => (Byte, &[ConnAck]),
        0x29 => (Byte, &[ConnAck]),
        0x2A => (Byte, &[ConnAck]),
        _ => return None,
    })
}

impl Property {
    /// The property's identifier on the wire.
    pub fn id(&self) -> u8 {
        match self {
            Property::PayloadFormatIndicator(_) => 0x01,
            Property::MessageExpiryInterval(_) => 0x02,
            Property::ContentType(_) => 0x03,
            Property::ResponseTopic(_) => 0x08,
            Property::CorrelationData(_) => 0x09,
            Property::SubscriptionIdentifier(_) => 0x0B,
            Property::SessionExpiryInterval(_) => 0x11,
            Property::AssignedClientIdentifier(_) => 0x12,
            Property::ServerKeepAlive(_) => 0x13,
            Property::AuthenticationMethod(_) => 0x15,
            Property::AuthenticationData(_) => 0x16,
            Property::RequestProblemInformation(_) => 0x17,
            Property::WillDelayInterval(_) => 0x18,
            Property::RequestResponseInformation(_) => 0x19,
            Property::ResponseInformation(_) => 0x1A,
            Property::ServerReference(_) => 0x1C,
            Property::ReasonString(_) => 0x1F,
            Property::ReceiveMaximum(_) => 0x21,
            Property::TopicAliasMaximum(_) => 0x22,
            Property::TopicAlias(_) => 0x23,
            Property::MaximumQos(_) => 0x24,
            Property::RetainAvailable(_) => 0x25,
            Property::UserProperty(..) => 0x26,
            Property::MaximumPacketSize(_) => 0x27,
            Property::WildcardSubscriptionAvailable(_) => 0x28,
            Property::SubscriptionIdentifierAvailable(_) => 0x29,
            Property::SharedSubscriptionAvailable(_) => 0x2A,
        }
    }

    /// The value when it is outside the property's range.
    fn out_of_range(&self) -> Option<u32> {
        let flag = |value: u8| (value > 1).then_some(u32::from(value));
        match self {
            Property::PayloadFormatIndicator(value)
            | Property::RequestProblemInformation(value)
            | Property::RequestResponseInformation(value)
            | Property::MaximumQos(value)
            | Property::RetainAvailable(value)
            | Property::WildcardSubscriptionAvailable(value)
            | Property::SubscriptionIdentifierAvailable(value)
            | Property::SharedSubscriptionAvailable(value) => flag(*value),
            Property::SubscriptionIdentifier(value) => {
                (*value == 0 || *value > MAX_VARIABLE_INTEGER).then_some(*value)
            }
            Property::ReceiveMaximum(value) | Property::TopicAlias(value) => {
                (*value == 0).then_some(0)
            }
            Property::MaximumPacketSize(value) => (*value == 0).then_some(0),
            _ => None,
        }
    }

    fn value_len(&self) -> Result<usize, EncodeError> {
        Ok(match self {
            Property::PayloadFormatIndicator(_)
            | Property::RequestProblemInformation(_)
            | Property::RequestResponseInformation(_)
            | Property::MaximumQos(_)
            | Property::RetainAvailable(_)
            | Property::WildcardSubscriptionAvailable(_)
            | Property::SubscriptionIdentifierAvailable(_)
            | Property::SharedSubscriptionAvailable(_) => 1,
            Property::ServerKeepAlive(_)
            | Property::ReceiveMaximum(_)
            | Property::TopicAliasMaximum(_)
            | Property::TopicAlias(_) => 2,
            Property::MessageExpiryInterval(_)
            | Property::SessionExpiryInterval(_)
            | Property::WillDelayInterval(_)
            | Property::MaximumPacketSize(_) => 4,
            Property::SubscriptionIdentifier(value) => super::variable_integer_len(*value),
            Property::ContentType(text)
            | Property::ResponseTopic(text)
            | Property::AssignedClientIdentifier(text)
            | Property::AuthenticationMethod(text)
            | Property::ResponseInformation(text)
            | Property::ServerReference(text)
            | Property::ReasonString(text) => binary_len(text.as_bytes(), "property")?,
            Property::CorrelationData(bytes) | Property::AuthenticationData(bytes) => {
                binary_len(bytes, "property")?
            }
            Property::UserProperty(name, value) => {
                binary_len(name.as_bytes(), "user property name")?
                    + binary_len(value.as_bytes(), "user property value")?
            }
        })
    }

    fn put(&self, out: &mut BytesMut) {
        out.put_u8(self.id());
        match self {
            Property::PayloadFormatIndicator(value)
            | Property::RequestProblemInformation(value)
            | Property::RequestResponseInformation(value)
            | Property::MaximumQos(value)
            | Property::RetainAvailable(value)
            | Property::WildcardSubscriptionAvailable(value)
            | Property::SubscriptionIdentifierAvailable(value)
            | Property::SharedSubscriptionAvailable(value) => out.put_u8(*value),
            Property::ServerKeepAlive(value)
            | Property::ReceiveMaximum(value)
            | Property::TopicAliasMaximum(value)
            | Property::TopicAlias(value) => out.put_u16(*value),
            Property::MessageExpiryInterval(value)
            | Property::SessionExpiryInterval(value)
            | Property::WillDelayInterval(value)
            | Property::MaximumPacketSize(value) => out.put_u32(*value),
            Property::SubscriptionIdentifier(value) => put_variable_integer(out, *value),
            Property::ContentType(text)
            | Property::ResponseTopic(text)
            | Property::AssignedClientIdentifier(text)
            | Property::AuthenticationMethod(text)
            | Property::ResponseInformation(text)
            | Property::ServerReference(text)
            | Property::ReasonString(text) => put_binary(out, text.as_bytes()),
            Property::CorrelationData(bytes) | Property::AuthenticationData(bytes) => {
                put_binary(out, bytes)
            }
            Property::UserProperty(name, value) => {
                put_binary(out, name.as_bytes());
                put_binary(out, value.as_bytes());
            }
        }
    }

    fn read(id: u8, reader: &mut BodyReader) -> Result<Property, DecodeError> {
        let Some((value_type, _)) = describe(id) else {
            return Err(PropertyError::Unknown(id).into());
        };
        const FIELD: &str = "property";
        let byte = |reader: &mut BodyReader| reader.u8(FIELD);
        Ok(match (id, value_type) {
            (0x0B, _) => Property::SubscriptionIdentifier(super::read_variable_integer(reader)?),
            (0x26, _) => Property::UserProperty(reader.string(FIELD)?, reader.string(FIELD)?),
            (0x09, _) => Property::CorrelationData(reader.binary(FIELD)?),
            (0x16, _) => Property::AuthenticationData(reader.binary(FIELD)?),
            (_, ValueType::Byte) => {
                let value = byte(reader)?;
                match id {
                    0x01 => Property::PayloadFormatIndicator(value),
                    0x17 => Property::RequestProblemInformation(value),
                    0x19 => Property::RequestResponseInformation(value),
                    0x24 => Property::MaximumQos(value),
                    0x25 => Property::RetainAvailable(value),
                    0x28 => Property::WildcardSubscriptionAvailable(value),
                    0x29 => Property::SubscriptionIdentifierAvailable(value),
                    _ => Property::SharedSubscriptionAvailable(value),
                }
            }
            (_, ValueType::TwoBytes) => {
                let value = reader.u16(FIELD)?;
                match id {
                    0x13 => Property::ServerKeepAlive(value),
                    0x21 => Property::ReceiveMaximum(value),
                    0x22 => Property::TopicAliasMaximum(value),
                    _ => Property::TopicAlias(value),
                }
            }
            (_, ValueType::FourBytes) => {
                let value = reader.u32(FIELD)?;
                match id {
                    0x02 => Property::MessageExpiryInterval(value),
                    0x11 => Property::SessionExpiryInterval(value),
                    0x18 => Property::WillDelayInterval(value),
                    _ => Property::MaximumPacketSize(value),
                }
            }
            (_, _) => {
                let text = reader.string(FIELD)?;
                match id {
                    0x03 => Property::ContentType(text),
                    0x08 => Property::ResponseTopic(text),
                    0x12 => Property::AssignedClientIdentifier(text),
                    0x15 => Property::AuthenticationMethod(text),
                    0x1A => Property::ResponseInformation(text),
                    0x1C => Property::ServerReference(text),
                    _ => Property::ReasonString(text),
                }
            }
        })
    }
}

/// A packet's properties, in the order they came (or will go).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<Property>);

macro_rules! accessor {
    ($(#[$doc:meta])* $name:ident, $variant:ident, $type:ty) => {
        $(#[$doc])*
        pub fn $name(&self) -> Option<$type> {
            self.0.iter().find_map(|property| match property {
                Property::$variant(value) => Some(value.clone()),
                _ => None,
            })
        }
    };
}

impl Properties {
    pub fn new() -> Properties {
        Properties::default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn push(&mut self, property: Property) {
        self.0.push(property);
    }

    /// With `property` added.
    pub fn with(mut self, property: Property) -> Properties {
        self.0.push(property);
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = &Property> {
        self.0.iter()
    }

    accessor!(payload_format_indicator, PayloadFormatIndicator, u8);
    accessor!(message_expiry_interval, MessageExpiryInterval, u32);
    accessor!(content_type, ContentType, String);
    accessor!(response_topic, ResponseTopic, String);
    accessor!(correlation_data, CorrelationData, Bytes);
    accessor!(session_expiry_interval, SessionExpiryInterval, u32);
    accessor!(assigned_client_identifier, AssignedClientIdentifier, String);
    accessor!(server_keep_alive, ServerKeepAlive, u16);
    accessor!(authentication_method, AuthenticationMethod, String);
    accessor!(request_problem_information, RequestProblemInformation, u8);
    accessor!(will_delay_interval, WillDelayInterval, u32);
    accessor!(reason_string, ReasonString, String);
    accessor!(
        /// At most this many QoS 1 and 2 PUBLISHes unacknowledged towards
        /// the sender (absent: 65,535).
        receive_maximum,
        ReceiveMaximum,
        u16
    );
    accessor!(topic_alias_maximum, TopicAliasMaximum, u16);
    accessor!(topic_alias, TopicAlias, u16);
    accessor!(maximum_packet_size, MaximumPacketSize, u32);

    /// Every subscription identifier (a PUBLISH may carry several).
    pub fn subscription_identifiers(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().filter_map(|property| match property {
            Property::SubscriptionIdentifier(id) => Some(*id),
            _ => None,
        })
    }

    /// Every user property, in order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().filter_map(|property| match property {
            Property::UserProperty(name, value) => Some((name.as_str(), value.as_str())),
            _ => None,
        })
    }

    /// Checks the properties against where they are: each allowed there,
    /// none twice (but user properties, and subscription identifiers in a
    /// PUBLISH), every value in its range.
    pub fn check(&self, context: PropertyContext) -> Result<(), PropertyError> {
        let mut seen = 0u64;
        for property in &self.0 {
            let id = property.id();
            let allowed = describe(id).is_some_and(|(_, contexts)| contexts.contains(&context));
            if !allowed {
                return Err(PropertyError::NotAllowed {
                    property: id,
                    context,
                });
            }
            let repeatable = id == 0x26 || (id == 0x0B && context == PropertyContext::Publish);
            let bit = 1u64 << id;
            if seen & bit != 0 && !repeatable {
                return Err(PropertyError::Duplicate(id));
            }
            seen |= bit;
            if let Some(value) = property.out_of_range() {
                return Err(PropertyError::InvalidValue {
                    property: id,
                    value,
                });
            }
        }
        Ok(())
    }

    /// The bytes of the properties, without their length.
    pub(super) fn body_len(&self) -> Result<usize, EncodeError> {
        let mut len = 0usize;
        for property in &self.0 {
            len += 1 + property.value_len()?;
        }
        if len > MAX_VARIABLE_INTEGER as usize {
            return Err(EncodeError::Packet(
                crate::mqtt::EncodeError::PacketTooLarge(len),
            ));
        }
        Ok(len)
    }

    /// Writes the length and the properties.
    pub(super) fn put(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let len = self.body_len()?;
        put_variable_integer(out, len as u32);
        for property in &self.0 {
            property.put(out);
        }
        Ok(())
    }

    /// Reads a property length and the properties within it, and checks
    /// them for `context`.
    pub(super) fn read(
        reader: &mut BodyReader,
        context: PropertyContext,
    ) -> Result<Properties, DecodeError> {
        let len = super::read_variable_integer(reader)? as usize;
        let mut within = reader.take(len, "properties")?;
        let mut properties = Vec::new();
        while !within.is_empty() {
            let id = within.u8("property identifier")?;
            properties.push(Property::read(id, &mut within)?);
        }
        let properties = Properties(properties);
        properties.check(context)?;
        Ok(properties)
    }
}
