//! Byte-exact encoding: the shortest remaining-length field, fields in the
//! order the spec gives, nothing optional written that is absent.

use bytes::{BufMut, BytesMut};

use super::{
    ConnAck, Connect, ConnectReturnCode, EncodeError, MAX_REMAINING_LENGTH, Packet, PacketType,
    Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe,
};

/// Appends the encoding of `packet` to `out`. On error nothing is appended.
pub fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    let remaining_len = body_len(packet)?;
    out.reserve(1 + remaining_length_size(remaining_len) + remaining_len);
    out.put_u8(first_byte(packet));
    put_remaining_length(out, remaining_len);
    match packet {
        Packet::Connect(connect) => put_connect(out, connect),
        Packet::ConnAck(connack) => put_connack(out, connack),
        Packet::Publish(publish) => put_publish(out, publish),
        Packet::PubAck(id)
        | Packet::PubRec(id)
        | Packet::PubRel(id)
        | Packet::PubComp(id)
        | Packet::UnsubAck(id) => out.put_u16(id.get()),
        Packet::Subscribe(subscribe) => put_subscribe(out, subscribe),
        Packet::SubAck(suback) => put_suback(out, suback),
        Packet::Unsubscribe(unsubscribe) => put_unsubscribe(out, unsubscribe),
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
    Ok(())
}

/// The number of bytes [`encode`] writes for `packet`.
pub fn encoded_len(packet: &Packet) -> Result<usize, EncodeError> {
    let remaining_len = body_len(packet)?;
    Ok(1 + remaining_length_size(remaining_len) + remaining_len)
}

fn first_byte(packet: &Packet) -> u8 {
    let packet_type = packet.packet_type();
    let flags = match packet {
        Packet::Publish(publish) => {
            (u8::from(publish.dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain)
        }
        _ => match packet_type {
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => 0b0010,
            _ => 0,
        },
    };
    ((packet_type as u8) << 4) | flags
}

/// The remaining length of `packet`, after checking what the types cannot.
fn body_len(packet: &Packet) -> Result<usize, EncodeError> {
    let len = match packet {
        Packet::Connect(connect) => connect_len(connect)?,
        Packet::ConnAck(connack) => {
            if connack.session_present && connack.code != ConnectReturnCode::Accepted {
                return Err(EncodeError::SessionPresentOnRefusal);
            }
            2
        }
        Packet::Publish(publish) => publish_len(publish)?,
        Packet::PubAck(_)
        | Packet::PubRec(_)
        | Packet::PubRel(_)
        | Packet::PubComp(_)
        | Packet::UnsubAck(_) => 2,
        Packet::Subscribe(subscribe) => {
            if subscribe.filters.is_empty() {
                return Err(EncodeError::NoTopicFilters(PacketType::Subscribe));
            }
            let mut len = 2;
            for (filter, _) in &subscribe.filters {
                len += string_len(filter, "topic filter")? + 1;
            }
            len
        }
        Packet::SubAck(suback) => {
            if suback.return_codes.is_empty() {
                return Err(EncodeError::NoSubAckReturnCodes);
            }
            2 + suback.return_codes.len()
        }
        Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.filters.is_empty() {
                return Err(EncodeError::NoTopicFilters(PacketType::Unsubscribe));
            }
            let mut len = 2;
            for filter in &unsubscribe.filters {
                len += string_len(filter, "topic filter")?;
            }
            len
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    };
    if len > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge(len));
    }
    Ok(len)
}

fn connect_len(connect: &Connect) -> Result<usize, EncodeError> {
    if connect.password.is_some() && connect.username.is_none() {
        return Err(EncodeError::PasswordWithoutUsername);
    }
    let mut len = string_len(connect.protocol.protocol_name(), "protocol name")? + 1 + 1 + 2;
    len += string_len(&connect.client_id, "client identifier")?;
    if let Some(will) = &connect.will {
        len += string_len(&will.topic, "will topic")?;
        len += binary_len(&will.payload, "will message")?;
    }
    if let Some(username) = &connect.username {
        len += string_len(username, "user name")?;
    }
    if let Some(password) = &connect.password {
        len += binary_len(password.expose(), "password")?;
    }
    Ok(len)
}

fn publish_len(publish: &Publish) -> Result<usize, EncodeError> {
    match (publish.qos, publish.packet_id) {
        (QoS::AtMostOnce, Some(_)) => return Err(EncodeError::UnexpectedPacketId),
        (QoS::AtMostOnce, None) if publish.dup => return Err(EncodeError::DuplicateFlagWithQos0),
        (qos @ (QoS::AtLeastOnce | QoS::ExactlyOnce), None) => {
            return Err(EncodeError::MissingPacketId(qos));
        }
        _ => {}
    }
    let id_len = if publish.packet_id.is_some() { 2 } else { 0 };
    Ok(string_len(&publish.topic, "topic name")? + id_len + publish.payload.len())
}

fn string_len(text: &str, field: &'static str) -> Result<usize, EncodeError> {
    binary_len(text.as_bytes(), field)
}

pub(crate) fn binary_len(bytes: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    if bytes.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong(field));
    }
    Ok(2 + bytes.len())
}

pub(crate) fn remaining_length_size(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        // Truncation is the point: seven bits at a time.
        let mut byte = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

// Lengths were checked by `body_len`, so the `as u16` casts below never truncate.
pub(crate) fn put_binary(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn put_connect(out: &mut BytesMut, connect: &Connect) {
    put_binary(out, connect.protocol.protocol_name().as_bytes());
    out.put_u8(connect.protocol.level_byte() | if connect.bridge_mode { 0x80 } else { 0 });
    let mut flags = 0u8;
    if connect.clean_session {
        flags |= 0b0000_0010;
    }
    if let Some(will) = &connect.will {
        flags |= 0b0000_0100 | ((will.qos as u8) << 3);
        if will.retain {
            flags |= 0b0010_0000;
        }
    }
    if connect.password.is_some() {
        flags |= 0b0100_0000;
    }
    if connect.username.is_some() {
        flags |= 0b1000_0000;
    }
    out.put_u8(flags);
    out.put_u16(connect.keep_alive);
    put_binary(out, connect.client_id.as_bytes());
    if let Some(will) = &connect.will {
        put_binary(out, will.topic.as_bytes());
        put_binary(out, &will.payload);
    }
    if let Some(username) = &connect.username {
        put_binary(out, username.as_bytes());
    }
    if let Some(password) = &connect.password {
        put_binary(out, password.expose());
    }
}

fn put_connack(out: &mut BytesMut, connack: &ConnAck) {
    out.put_u8(u8::from(connack.session_present));
    out.put_u8(connack.code as u8);
}

fn put_publish(out: &mut BytesMut, publish: &Publish) {
    put_binary(out, publish.topic.as_bytes());
    if let Some(id) = publish.packet_id {
        out.put_u16(id.get());
    }
    out.put_slice(&publish.payload);
}

fn put_subscribe(out: &mut BytesMut, subscribe: &Subscribe) {
    out.put_u16(subscribe.packet_id.get());
    for (filter, qos) in &subscribe.filters {
        put_binary(out, filter.as_bytes());
        out.put_u8(*qos as u8);
    }
}

fn put_suback(out: &mut BytesMut, suback: &SubAck) {
    out.put_u16(suback.packet_id.get());
    for code in &suback.return_codes {
        out.put_u8(match code {
            SubscribeReturnCode::Success(qos) => *qos as u8,
            SubscribeReturnCode::Failure => 0x80,
        });
    }
}

fn put_unsubscribe(out: &mut BytesMut, unsubscribe: &Unsubscribe) {
    out.put_u16(unsubscribe.packet_id.get());
    for filter in &unsubscribe.filters {
        put_binary(out, filter.as_bytes());
    }
}
