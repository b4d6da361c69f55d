//! Check-then-parse decoding of one packet from the front of a buffer.

use bytes::{Buf, Bytes, BytesMut};

use super::{
    ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, PacketId, PacketType, ProtocolLevel,
    Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe, Will,
};
use crate::Secret;
use crate::topic::{self, TopicLimits};

/// What the first bytes of a packet say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub packet_type: PacketType,
    /// The low nibble of the first byte.
    pub flags: u8,
    /// Bytes taken by the first byte and the remaining-length field.
    pub header_len: usize,
    /// The remaining length: bytes that follow the fixed header.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// The whole packet's size on the wire.
    pub fn packet_len(&self) -> usize {
        self.header_len + self.remaining_len
    }

    /// Reads the fixed header at the start of `bytes` without consuming
    /// anything. `Ok(None)` means the header is not complete yet. The type and
    /// its flags are checked as soon as the first byte is there.
    pub fn parse(bytes: &[u8]) -> Result<Option<FixedHeader>, DecodeError> {
        let Some(&first) = bytes.first() else {
            return Ok(None);
        };
        let nibble = first >> 4;
        let flags = first & 0x0f;
        let packet_type =
            PacketType::from_nibble(nibble).ok_or(DecodeError::ReservedPacketType(nibble))?;
        match packet_type.required_flags() {
            Some(required) if required != flags => {
                return Err(DecodeError::InvalidHeaderFlags { packet_type, flags });
            }
            Some(_) => {}
            None => {
                let qos_bits = (flags >> 1) & 0b11;
                QoS::from_bits(qos_bits)?;
                if qos_bits == 0 && flags & 0b1000 != 0 {
                    return Err(DecodeError::DuplicateFlagWithQos0);
                }
            }
        }
        Ok(
            remaining_length(bytes)?.map(|(header_len, remaining_len)| FixedHeader {
                packet_type,
                flags,
                header_len,
                remaining_len,
            }),
        )
    }
}

/// The remaining-length field after a packet's first byte: the fixed
/// header's length and the remaining length, or `None` while incomplete.
pub(crate) fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining_len = 0usize;
    for index in 0..4 {
        let Some(&byte) = bytes.get(1 + index) else {
            return Ok(None);
        };
        remaining_len |= usize::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok(Some((2 + index, remaining_len)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Decodes the packet at the front of `buffer`.
///
/// Returns `Ok(None)` when more bytes are needed; the buffer is then left
/// untouched. On success the packet's bytes are removed from the buffer. A
/// packet whose size (fixed header included) exceeds `max_packet_size` is
/// refused as soon as its fixed header is readable, before its body is
/// buffered or anything is allocated; the buffer is then left untouched, so
/// a caller may skip the packet's `size` bytes and go on. After any other
/// error the connection must be closed; the buffer's contents are
/// unspecified.
pub fn decode(
    buffer: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(header) = FixedHeader::parse(buffer)? else {
        return Ok(None);
    };
    let size = header.packet_len();
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buffer.len() < size {
        return Ok(None);
    }
    let mut body = buffer.split_to(size).freeze();
    body.advance(header.header_len);
    decode_body(header, body).map(Some)
}

/// What the first bytes of a PUBLISH say about its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishPrefix {
    /// More bytes are needed: at least this many in all.
    NeedMore(usize),
    /// Not a PUBLISH, or a QoS 0 one: nothing to acknowledge.
    NoPacketId,
    /// A QoS 1 or 2 PUBLISH with this packet id.
    PacketId(QoS, PacketId),
}

/// Reads a PUBLISH's QoS and packet id from the start of `bytes`, which
/// hold its fixed header, topic and packet id before the payload: enough to
/// acknowledge a PUBLISH whose payload is too large to keep (its bytes are
/// then skipped). Reads nothing past the packet id; allocates nothing.
pub fn publish_prefix(bytes: &[u8]) -> Result<PublishPrefix, DecodeError> {
    let Some(header) = FixedHeader::parse(bytes)? else {
        return Ok(PublishPrefix::NeedMore(bytes.len() + 1));
    };
    if header.packet_type != PacketType::Publish {
        return Ok(PublishPrefix::NoPacketId);
    }
    let qos = QoS::from_bits((header.flags >> 1) & 0b11)?;
    if qos == QoS::AtMostOnce {
        return Ok(PublishPrefix::NoPacketId);
    }
    let topic_at = header.header_len;
    let (Some(&high), Some(&low)) = (bytes.get(topic_at), bytes.get(topic_at + 1)) else {
        return Ok(PublishPrefix::NeedMore(topic_at + 2));
    };
    let id_at = topic_at + 2 + usize::from(u16::from_be_bytes([high, low]));
    if id_at + 2 > header.packet_len() {
        return Err(DecodeError::Truncated("packet id"));
    }
    let (Some(&high), Some(&low)) = (bytes.get(id_at), bytes.get(id_at + 1)) else {
        return Ok(PublishPrefix::NeedMore(id_at + 2));
    };
    let id = PacketId::new(u16::from_be_bytes([high, low])).ok_or(DecodeError::ZeroPacketId)?;
    Ok(PublishPrefix::PacketId(qos, id))
}

/// Like [`decode`], and also returns the packet's bytes as they were on
/// the wire (a slice of the same buffer, not a copy), for a relay that
/// checks packets but forwards them unchanged.
pub fn decode_with_bytes(
    buffer: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<(Packet, Bytes)>, DecodeError> {
    let Some(header) = FixedHeader::parse(buffer)? else {
        return Ok(None);
    };
    let size = header.packet_len();
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buffer.len() < size {
        return Ok(None);
    }
    let wire = buffer.split_to(size).freeze();
    let mut body = wire.clone();
    body.advance(header.header_len);
    decode_body(header, body).map(|packet| Some((packet, wire)))
}

fn decode_body(header: FixedHeader, body: Bytes) -> Result<Packet, DecodeError> {
    let mut reader = BodyReader::new(body);
    let packet = match header.packet_type {
        PacketType::Connect => Packet::Connect(decode_connect(&mut reader)?),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(&mut reader)?),
        PacketType::Publish => Packet::Publish(decode_publish(header.flags, &mut reader)?),
        PacketType::PubAck => Packet::PubAck(reader.packet_id()?),
        PacketType::PubRec => Packet::PubRec(reader.packet_id()?),
        PacketType::PubRel => Packet::PubRel(reader.packet_id()?),
        PacketType::PubComp => Packet::PubComp(reader.packet_id()?),
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(&mut reader)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(&mut reader)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(&mut reader)?),
        PacketType::UnsubAck => Packet::UnsubAck(reader.packet_id()?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect,
    };
    reader.finish()?;
    Ok(packet)
}

fn decode_connect(reader: &mut BodyReader) -> Result<Connect, DecodeError> {
    let name = reader.binary("protocol name")?;
    let level_byte = reader.u8("protocol level")?;
    let bridge_mode = level_byte & 0x80 != 0;
    let protocol = match (&name[..], level_byte & 0x7f) {
        (b"MQTT", 4) => ProtocolLevel::V3_1_1,
        (b"MQIsdp", 3) => ProtocolLevel::V3_1,
        (b"MQTT" | b"MQIsdp", _) => {
            return Err(DecodeError::UnsupportedProtocolLevel(level_byte));
        }
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let flags = reader.u8("connect flags")?;
    if flags & 0b0000_0001 != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let clean_session = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0b11)?;
    let will_retain = flags & 0b0010_0000 != 0;
    let password_flag = flags & 0b0100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    if password_flag && !username_flag {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = reader.u16("keep alive")?;
    let client_id = reader.string("client identifier")?;
    let will = if will_flag {
        let topic = reader.string("will topic")?;
        topic::validate_topic_name(&topic, &TopicLimits::SPEC)
            .map_err(DecodeError::InvalidTopicName)?;
        let payload = reader.binary("will message")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(reader.string("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(Secret::new(reader.binary("password")?))
    } else {
        None
    };
    Ok(Connect {
        protocol,
        bridge_mode,
        clean_session,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(reader: &mut BodyReader) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8("acknowledge flags")?;
    if flags & 0xfe != 0 {
        return Err(DecodeError::InvalidConnAckFlags(flags));
    }
    let session_present = flags == 1;
    let code = ConnectReturnCode::from_byte(reader.u8("return code")?)?;
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(DecodeError::SessionPresentOnRefusal);
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish(flags: u8, reader: &mut BodyReader) -> Result<Publish, DecodeError> {
    // The fixed header already checked QoS and DUP.
    let qos = QoS::from_bits((flags >> 1) & 0b11)?;
    let topic = reader.string("topic name")?;
    topic::validate_topic_name(&topic, &TopicLimits::SPEC)
        .map_err(DecodeError::InvalidTopicName)?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(reader.packet_id()?),
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: reader.rest(),
    })
}

fn decode_subscribe(reader: &mut BodyReader) -> Result<Subscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let mut filters = Vec::with_capacity(count_length_prefixed(&reader.body, 1));
    while !reader.is_empty() {
        let filter = reader.string("topic filter")?;
        topic::validate_topic_filter(&filter, &TopicLimits::SPEC)
            .map_err(DecodeError::InvalidTopicFilter)?;
        let options = reader.u8("requested QoS")?;
        if options & 0xfc != 0 {
            return Err(DecodeError::SubscribeReservedBits(options));
        }
        filters.push((filter, QoS::from_bits(options)?));
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe { packet_id, filters })
}

fn decode_suback(reader: &mut BodyReader) -> Result<SubAck, DecodeError> {
    let packet_id = reader.packet_id()?;
    let mut return_codes = Vec::with_capacity(reader.body.len());
    while !reader.is_empty() {
        return_codes.push(match reader.u8("return code")? {
            0 => SubscribeReturnCode::Success(QoS::AtMostOnce),
            1 => SubscribeReturnCode::Success(QoS::AtLeastOnce),
            2 => SubscribeReturnCode::Success(QoS::ExactlyOnce),
            0x80 => SubscribeReturnCode::Failure,
            other => return Err(DecodeError::InvalidSubAckReturnCode(other)),
        });
    }
    if return_codes.is_empty() {
        return Err(DecodeError::NoSubAckReturnCodes);
    }
    Ok(SubAck {
        packet_id,
        return_codes,
    })
}

fn decode_unsubscribe(reader: &mut BodyReader) -> Result<Unsubscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let mut filters = Vec::with_capacity(count_length_prefixed(&reader.body, 0));
    while !reader.is_empty() {
        let filter = reader.string("topic filter")?;
        topic::validate_topic_filter(&filter, &TopicLimits::SPEC)
            .map_err(DecodeError::InvalidTopicFilter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe { packet_id, filters })
}

/// Counts the length-prefixed entries (each followed by `trailer` bytes) at
/// the front of `body`, so that a list is allocated once at its final size:
/// growing it by doubling would allocate about twice what it keeps.
fn count_length_prefixed(body: &[u8], trailer: usize) -> usize {
    let mut count = 0;
    let mut rest = body;
    while let [high, low, tail @ ..] = rest {
        let entry = usize::from(u16::from_be_bytes([*high, *low])) + trailer;
        if tail.len() < entry {
            break;
        }
        rest = &tail[entry..];
        count += 1;
    }
    count
}

/// Reads fields from a packet body whose length is already known; every read
/// is checked against what is left. Shared with the MQTT 5 codec.
pub(crate) struct BodyReader {
    body: Bytes,
}

impl BodyReader {
    pub(crate) fn new(body: Bytes) -> BodyReader {
        BodyReader { body }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Bytes left.
    pub(crate) fn len(&self) -> usize {
        self.body.len()
    }

    /// The next `len` bytes as a reader of their own.
    pub(crate) fn take(
        &mut self,
        len: usize,
        field: &'static str,
    ) -> Result<BodyReader, DecodeError> {
        if self.body.len() < len {
            return Err(DecodeError::Truncated(field));
        }
        Ok(BodyReader::new(self.body.split_to(len)))
    }

    /// Entries of a list of length-prefixed fields (each followed by
    /// `trailer` bytes) at the front of what is left.
    pub(crate) fn count_length_prefixed(&self, trailer: usize) -> usize {
        count_length_prefixed(&self.body, trailer)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        if self.body.len() < 4 {
            return Err(DecodeError::Truncated(field));
        }
        Ok(self.body.get_u32())
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        if self.body.is_empty() {
            return Err(DecodeError::Truncated(field));
        }
        Ok(self.body.get_u8())
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        if self.body.len() < 2 {
            return Err(DecodeError::Truncated(field));
        }
        Ok(self.body.get_u16())
    }

    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16("packet identifier")?).ok_or(DecodeError::ZeroPacketId)
    }

    /// A two-byte length followed by that many bytes.
    pub(crate) fn binary(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if self.body.len() < len {
            return Err(DecodeError::Truncated(field));
        }
        Ok(self.body.split_to(len))
    }

    /// A UTF-8 string as MQTT defines it: valid UTF-8 without U+0000.
    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.binary(field)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if text.contains('\0') {
            return Err(DecodeError::NullCharacter);
        }
        Ok(text.to_owned())
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.body)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.body.len()))
        }
    }
}
