//! Decoding and encoding of MQTT 5 packets.

use bytes::{Buf, BufMut, BytesMut};

use super::properties::{Properties, PropertyContext};
use super::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, EncodeError, Packet, PacketId,
    PacketType, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, Unsubscribe,
    Will, put_variable_integer, variable_integer_len,
};
use crate::Secret;
use crate::mqtt::decode::{BodyReader, FixedHeader, remaining_length};
use crate::mqtt::encode::{binary_len, put_binary};
use crate::mqtt::{self, MAX_REMAINING_LENGTH};
use crate::topic::{self, TopicLimits};

/// The fixed header: type, flags, header length and remaining length.
/// AUTH (type 15, flags 0) is MQTT 5's own; the others follow 3.1.1's
/// rules.
fn fixed_header(bytes: &[u8]) -> Result<Option<(PacketType, u8, usize, usize)>, DecodeError> {
    let Some(&first) = bytes.first() else {
        return Ok(None);
    };
    if first >> 4 == 15 {
        let flags = first & 0x0f;
        if flags != 0 {
            return Err(DecodeError::InvalidAuthFlags(flags));
        }
        return Ok(remaining_length(bytes)?
            .map(|(header_len, remaining)| (PacketType::Auth, flags, header_len, remaining)));
    }
    let Some(header) = FixedHeader::parse(bytes)? else {
        return Ok(None);
    };
    let packet_type = match header.packet_type {
        mqtt::PacketType::Connect => PacketType::Connect,
        mqtt::PacketType::ConnAck => PacketType::ConnAck,
        mqtt::PacketType::Publish => PacketType::Publish,
        mqtt::PacketType::PubAck => PacketType::PubAck,
        mqtt::PacketType::PubRec => PacketType::PubRec,
        mqtt::PacketType::PubRel => PacketType::PubRel,
        mqtt::PacketType::PubComp => PacketType::PubComp,
        mqtt::PacketType::Subscribe => PacketType::Subscribe,
        mqtt::PacketType::SubAck => PacketType::SubAck,
        mqtt::PacketType::Unsubscribe => PacketType::Unsubscribe,
        mqtt::PacketType::UnsubAck => PacketType::UnsubAck,
        mqtt::PacketType::PingReq => PacketType::PingReq,
        mqtt::PacketType::PingResp => PacketType::PingResp,
        mqtt::PacketType::Disconnect => PacketType::Disconnect,
    };
    Ok(Some((
        packet_type,
        header.flags,
        header.header_len,
        header.remaining_len,
    )))
}

/// Decodes the MQTT 5 packet at the front of `buffer`, as
/// [`crate::mqtt::decode`] does for 3.1.1: `Ok(None)` until a whole packet
/// is there (the buffer untouched), a packet over `max_packet_size`
/// refused from its fixed header, the packet's bytes removed on success.
pub fn decode(
    buffer: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((packet_type, flags, header_len, remaining)) = fixed_header(buffer)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet_size {
        return Err(mqtt::DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        }
        .into());
    }
    if buffer.len() < size {
        return Ok(None);
    }
    let mut body = buffer.split_to(size).freeze();
    body.advance(header_len);
    let mut reader = BodyReader::new(body);
    let packet = match packet_type {
        PacketType::Connect => Packet::Connect(decode_connect(&mut reader)?),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(&mut reader)?),
        PacketType::Publish => Packet::Publish(decode_publish(flags, &mut reader)?),
        PacketType::PubAck => Packet::PubAck(decode_ack(packet_type, &mut reader)?),
        PacketType::PubRec => Packet::PubRec(decode_ack(packet_type, &mut reader)?),
        PacketType::PubRel => Packet::PubRel(decode_ack(packet_type, &mut reader)?),
        PacketType::PubComp => Packet::PubComp(decode_ack(packet_type, &mut reader)?),
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(&mut reader)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(packet_type, &mut reader)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(&mut reader)?),
        PacketType::UnsubAck => Packet::UnsubAck(decode_suback(packet_type, &mut reader)?),
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => {
            let (reason, properties) = decode_ending(packet_type, &mut reader)?;
            Packet::Disconnect(Disconnect { reason, properties })
        }
        PacketType::Auth => {
            let (reason, properties) = decode_ending(packet_type, &mut reader)?;
            Packet::Auth(Auth { reason, properties })
        }
    };
    reader.finish()?;
    Ok(Some(packet))
}

fn reason(packet: PacketType, code: u8) -> Result<ReasonCode, DecodeError> {
    let reason = ReasonCode(code);
    if reason.allowed_in(packet) {
        Ok(reason)
    } else {
        Err(DecodeError::InvalidReasonCode { packet, code })
    }
}

fn context_of(packet: PacketType) -> PropertyContext {
    match packet {
        PacketType::Connect => PropertyContext::Connect,
        PacketType::ConnAck => PropertyContext::ConnAck,
        PacketType::Publish => PropertyContext::Publish,
        PacketType::PubAck => PropertyContext::PubAck,
        PacketType::PubRec => PropertyContext::PubRec,
        PacketType::PubRel => PropertyContext::PubRel,
        PacketType::PubComp => PropertyContext::PubComp,
        PacketType::Subscribe => PropertyContext::Subscribe,
        PacketType::SubAck => PropertyContext::SubAck,
        PacketType::Unsubscribe => PropertyContext::Unsubscribe,
        PacketType::UnsubAck => PropertyContext::UnsubAck,
        PacketType::Disconnect | PacketType::PingReq | PacketType::PingResp => {
            PropertyContext::Disconnect
        }
        PacketType::Auth => PropertyContext::Auth,
    }
}

fn decode_connect(reader: &mut BodyReader) -> Result<Connect, DecodeError> {
    let name = reader.binary("protocol name")?;
    let level = reader.u8("protocol level")?;
    if &name[..] != b"MQTT" {
        return Err(mqtt::DecodeError::InvalidProtocolName.into());
    }
    if level != 5 {
        return Err(mqtt::DecodeError::UnsupportedProtocolLevel(level).into());
    }
    let flags = reader.u8("connect flags")?;
    if flags & 0b0000_0001 != 0 {
        return Err(mqtt::DecodeError::ConnectReservedFlag.into());
    }
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0b11)?;
    let will_retain = flags & 0b0010_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(mqtt::DecodeError::WillFlagsWithoutWill.into());
    }
    let keep_alive = reader.u16("keep alive")?;
    let properties = Properties::read(reader, PropertyContext::Connect)?;
    let client_id = reader.string("client identifier")?;
    let will = if will_flag {
        let properties = Properties::read(reader, PropertyContext::Will)?;
        let topic = reader.string("will topic")?;
        topic::validate_topic_name(&topic, &TopicLimits::SPEC)
            .map_err(mqtt::DecodeError::InvalidTopicName)?;
        Some(Will {
            properties,
            topic,
            payload: reader.binary("will payload")?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if flags & 0b1000_0000 != 0 {
        Some(reader.string("user name")?)
    } else {
        None
    };
    let password = if flags & 0b0100_0000 != 0 {
        Some(Secret::new(reader.binary("password")?))
    } else {
        None
    };
    Ok(Connect {
        clean_start: flags & 0b0000_0010 != 0,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(reader: &mut BodyReader) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8("acknowledge flags")?;
    if flags & 0xfe != 0 {
        return Err(mqtt::DecodeError::InvalidConnAckFlags(flags).into());
    }
    let reason = reason(PacketType::ConnAck, reader.u8("reason code")?)?;
    if flags == 1 && reason.is_failure() {
        return Err(mqtt::DecodeError::SessionPresentOnRefusal.into());
    }
    Ok(ConnAck {
        session_present: flags == 1,
        reason,
        properties: Properties::read(reader, PropertyContext::ConnAck)?,
    })
}

fn decode_publish(flags: u8, reader: &mut BodyReader) -> Result<Publish, DecodeError> {
    let qos = QoS::from_bits((flags >> 1) & 0b11)?;
    let topic = reader.string("topic name")?;
    if !topic.is_empty() {
        topic::validate_topic_name(&topic, &TopicLimits::SPEC)
            .map_err(mqtt::DecodeError::InvalidTopicName)?;
    }
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(reader.packet_id()?),
    };
    let properties = Properties::read(reader, PropertyContext::Publish)?;
    if topic.is_empty() && properties.topic_alias().is_none() {
        return Err(DecodeError::EmptyTopicWithoutAlias);
    }
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        properties,
        payload: reader.rest(),
    })
}

fn decode_ack(packet: PacketType, reader: &mut BodyReader) -> Result<Ack, DecodeError> {
    let packet_id = reader.packet_id()?;
    let (reason, properties) = decode_ending(packet, reader)?;
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

/// A reason code and properties that may both be left out (acks,
/// DISCONNECT, AUTH): nothing means success, a lone reason code means no
/// properties.
fn decode_ending(
    packet: PacketType,
    reader: &mut BodyReader,
) -> Result<(ReasonCode, Properties), DecodeError> {
    if reader.is_empty() {
        return Ok((ReasonCode::SUCCESS, Properties::new()));
    }
    let reason = reason(packet, reader.u8("reason code")?)?;
    if reader.is_empty() {
        return Ok((reason, Properties::new()));
    }
    Ok((reason, Properties::read(reader, context_of(packet))?))
}

fn decode_subscribe(reader: &mut BodyReader) -> Result<Subscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let properties = Properties::read(reader, PropertyContext::Subscribe)?;
    let mut filters = Vec::with_capacity(reader.count_length_prefixed(1));
    while !reader.is_empty() {
        let filter = reader.string("topic filter")?;
        topic::validate_topic_filter(&filter, &TopicLimits::SPEC)
            .map_err(mqtt::DecodeError::InvalidTopicFilter)?;
        let options = SubscriptionOptions::from_byte(reader.u8("subscription options")?)?;
        if options.no_local && filter.starts_with("$share/") {
            return Err(DecodeError::NoLocalOnSharedSubscription);
        }
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(mqtt::DecodeError::NoTopicFilters(mqtt::PacketType::Subscribe).into());
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn decode_suback(packet: PacketType, reader: &mut BodyReader) -> Result<SubAck, DecodeError> {
    let packet_id = reader.packet_id()?;
    let properties = Properties::read(reader, context_of(packet))?;
    let mut reasons = Vec::with_capacity(reader.len());
    while !reader.is_empty() {
        reasons.push(reason(packet, reader.u8("reason code")?)?);
    }
    if reasons.is_empty() {
        return Err(DecodeError::NoReasonCodes(packet));
    }
    Ok(SubAck {
        packet_id,
        properties,
        reasons,
    })
}

fn decode_unsubscribe(reader: &mut BodyReader) -> Result<Unsubscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let properties = Properties::read(reader, PropertyContext::Unsubscribe)?;
    let mut filters = Vec::with_capacity(reader.count_length_prefixed(0));
    while !reader.is_empty() {
        let filter = reader.string("topic filter")?;
        topic::validate_topic_filter(&filter, &TopicLimits::SPEC)
            .map_err(mqtt::DecodeError::InvalidTopicFilter)?;
        filters.push(filter);
    }
    if filters.is_empty() {
        return Err(mqtt::DecodeError::NoTopicFilters(mqtt::PacketType::Unsubscribe).into());
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

/// Appends the encoding of `packet` to `out`, after checking it against
/// the rules [`decode`] applies. On error nothing is appended.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    let mut body = BytesMut::new();
    put_body(packet, &mut body)?;
    if body.len() > MAX_REMAINING_LENGTH {
        return Err(mqtt::EncodeError::PacketTooLarge(body.len()).into());
    }
    let packet_type = packet.packet_type();
    let flags = match packet {
        Packet::Publish(publish) => {
            (u8::from(publish.dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    out.reserve(1 + variable_integer_len(body.len() as u32) + body.len());
    out.put_u8(((packet_type as u8) << 4) | flags);
    put_variable_integer(out, body.len() as u32);
    out.extend_from_slice(&body);
    Ok(())
}

/// The number of bytes [`encode`] writes for `packet`.
pub fn encoded_len(packet: &Packet) -> Result<usize, EncodeError> {
    let mut out = BytesMut::new();
    encode(packet, &mut out)?;
    Ok(out.len())
}

fn put_text(out: &mut BytesMut, text: &str, field: &'static str) -> Result<(), EncodeError> {
    put_bytes(out, text.as_bytes(), field)
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8], field: &'static str) -> Result<(), EncodeError> {
    binary_len(bytes, field)?;
    put_binary(out, bytes);
    Ok(())
}

fn put_properties(
    out: &mut BytesMut,
    properties: &Properties,
    context: PropertyContext,
) -> Result<(), EncodeError> {
    properties.check(context)?;
    properties.put(out)
}

fn checked_reason(packet: PacketType, reason: ReasonCode) -> Result<u8, EncodeError> {
    if reason.allowed_in(packet) {
        Ok(reason.0)
    } else {
        Err(EncodeError::InvalidReasonCode {
            packet,
            code: reason.0,
        })
    }
}

fn put_body(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    let packet_type = packet.packet_type();
    match packet {
        Packet::Connect(connect) => put_connect(out, connect)?,
        Packet::ConnAck(connack) => {
            let code = checked_reason(packet_type, connack.reason)?;
            if connack.session_present && connack.reason.is_failure() {
                return Err(mqtt::EncodeError::SessionPresentOnRefusal.into());
            }
            out.put_u8(u8::from(connack.session_present));
            out.put_u8(code);
            put_properties(out, &connack.properties, PropertyContext::ConnAck)?;
        }
        Packet::Publish(publish) => put_publish(out, publish)?,
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            out.put_u16(ack.packet_id.get());
            put_ending(out, packet_type, ack.reason, &ack.properties)?;
        }
        Packet::Subscribe(subscribe) => {
            if subscribe.filters.is_empty() {
                return Err(mqtt::EncodeError::NoTopicFilters(mqtt::PacketType::Subscribe).into());
            }
            out.put_u16(subscribe.packet_id.get());
            put_properties(out, &subscribe.properties, PropertyContext::Subscribe)?;
            for (filter, options) in &subscribe.filters {
                if options.no_local && filter.starts_with("$share/") {
                    return Err(EncodeError::NoLocalOnSharedSubscription);
                }
                put_text(out, filter, "topic filter")?;
                out.put_u8(options.byte());
            }
        }
        Packet::SubAck(suback) | Packet::UnsubAck(suback) => {
            if suback.reasons.is_empty() {
                return Err(EncodeError::NoReasonCodes(packet_type));
            }
            out.put_u16(suback.packet_id.get());
            put_properties(out, &suback.properties, context_of(packet_type))?;
            for reason in &suback.reasons {
                out.put_u8(checked_reason(packet_type, *reason)?);
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.filters.is_empty() {
                return Err(
                    mqtt::EncodeError::NoTopicFilters(mqtt::PacketType::Unsubscribe).into(),
                );
            }
            out.put_u16(unsubscribe.packet_id.get());
            put_properties(out, &unsubscribe.properties, PropertyContext::Unsubscribe)?;
            for filter in &unsubscribe.filters {
                put_text(out, filter, "topic filter")?;
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(Disconnect { reason, properties })
        | Packet::Auth(Auth { reason, properties }) => {
            put_ending(out, packet_type, *reason, properties)?;
        }
    }
    Ok(())
}

/// A reason code and properties, as short as they can be written.
fn put_ending(
    out: &mut BytesMut,
    packet: PacketType,
    reason: ReasonCode,
    properties: &Properties,
) -> Result<(), EncodeError> {
    let code = checked_reason(packet, reason)?;
    properties.check(context_of(packet))?;
    if properties.is_empty() {
        if reason != ReasonCode::SUCCESS {
            out.put_u8(code);
        }
        return Ok(());
    }
    out.put_u8(code);
    properties.put(out)
}

fn put_connect(out: &mut BytesMut, connect: &Connect) -> Result<(), EncodeError> {
    put_text(out, "MQTT", "protocol name")?;
    out.put_u8(5);
    let mut flags = u8::from(connect.clean_start) << 1;
    if let Some(will) = &connect.will {
        flags |= 0b100 | ((will.qos as u8) << 3) | (u8::from(will.retain) << 5);
    }
    if connect.password.is_some() {
        flags |= 0b0100_0000;
    }
    if connect.username.is_some() {
        flags |= 0b1000_0000;
    }
    out.put_u8(flags);
    out.put_u16(connect.keep_alive);
    put_properties(out, &connect.properties, PropertyContext::Connect)?;
    put_text(out, &connect.client_id, "client identifier")?;
    if let Some(will) = &connect.will {
        put_properties(out, &will.properties, PropertyContext::Will)?;
        put_text(out, &will.topic, "will topic")?;
        put_bytes(out, &will.payload, "will payload")?;
    }
    if let Some(username) = &connect.username {
        put_text(out, username, "user name")?;
    }
    if let Some(password) = &connect.password {
        put_bytes(out, password.expose(), "password")?;
    }
    Ok(())
}

fn put_publish(out: &mut BytesMut, publish: &Publish) -> Result<(), EncodeError> {
    match (publish.qos, publish.packet_id) {
        (QoS::AtMostOnce, Some(_)) => return Err(mqtt::EncodeError::UnexpectedPacketId.into()),
        (QoS::AtMostOnce, None) if publish.dup => {
            return Err(mqtt::EncodeError::DuplicateFlagWithQos0.into());
        }
        (qos @ (QoS::AtLeastOnce | QoS::ExactlyOnce), None) => {
            return Err(mqtt::EncodeError::MissingPacketId(qos).into());
        }
        _ => {}
    }
    if publish.topic.is_empty() && publish.properties.topic_alias().is_none() {
        return Err(EncodeError::EmptyTopicWithoutAlias);
    }
    put_text(out, &publish.topic, "topic name")?;
    if let Some(id) = publish.packet_id {
        out.put_u16(PacketId::get(id));
    }
    put_properties(out, &publish.properties, PropertyContext::Publish)?;
    out.extend_from_slice(&publish.payload);
    Ok(())
}

/// Whether `buffer` starts with an MQTT 5 CONNECT (protocol name `MQTT`,
/// level 5), whatever follows: how a server that speaks several versions
/// picks the decoder for a client's first packet.
pub fn starts_with_connect(buffer: &[u8]) -> bool {
    let Ok(Some(header)) = FixedHeader::parse(buffer) else {
        return false;
    };
    header.packet_type == mqtt::PacketType::Connect
        && buffer.get(header.header_len..header.header_len + 7)
            == Some(&[0, 4, b'M', b'Q', b'T', b'T', 5][..])
}
