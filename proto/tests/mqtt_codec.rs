//! The MQTT codec against hand-written packets: one test per validity rule,
//! byte-exact encodings, and the bounded, incremental decoding contract.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{
    ConnAck, Connect, ConnectReturnCode, DecodeError, EncodeError, Packet, PacketId, PacketType,
    ProtocolLevel, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Unsubscribe, Will, decode,
    encode, encoded_len,
};
use relay_proto::topic::TopicError;

use common::bytes_of;

const LIMIT: usize = 1024 * 1024;

fn decode_hex(hex: &str) -> Result<Option<Packet>, DecodeError> {
    decode_bytes(&bytes_of(hex))
}

fn decode_bytes(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
    let mut buffer = BytesMut::from(bytes);
    decode(&mut buffer, LIMIT)
}

fn encode_to_vec(packet: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(packet, &mut out).expect("encodable");
    assert_eq!(out.len(), encoded_len(packet).expect("encodable"));
    out.to_vec()
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).expect("non-zero")
}

#[test]
fn connect_3_1_1_round_trips_byte_exact() {
    let connect = Packet::Connect(Connect {
        protocol: ProtocolLevel::V3_1_1,
        bridge_mode: false,
        clean_session: true,
        keep_alive: 60,
        client_id: "app-1".into(),
        will: Some(Will {
            topic: "device/x/status".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: Some("bblp".into()),
        password: Some(Bytes::from_static(b"12345678").into()),
    });
    let bytes = encode_to_vec(&connect);
    assert_eq!(
        bytes,
        bytes_of(
            "10 38 0004 4d515454 04 ee 003c 0005 6170702d31
             000f 6465766963652f782f737461747573 0004 676f6e65
             0004 62626c70 0008 3132333435363738"
        )
    );
    assert_eq!(decode_bytes(&bytes), Ok(Some(connect)));
}

#[test]
fn connect_3_1_is_recognised_and_reported() {
    let packet = decode_hex("10 12 0006 4d5149736470 03 02 001e 0004 74657374").expect("valid");
    let Some(Packet::Connect(connect)) = packet else {
        panic!("not a CONNECT: {packet:?}");
    };
    assert_eq!(connect.protocol, ProtocolLevel::V3_1);
    assert_eq!(connect.client_id, "test");
}

#[test]
fn unsupported_levels_are_told_apart_from_garbage() {
    // MQTT 5 must be answered with CONNACK 1, so it needs its own error.
    assert_eq!(
        decode_hex("10 0d 0004 4d515454 05 02 001e 0001 61 00"),
        Err(DecodeError::UnsupportedProtocolLevel(5))
    );
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 03 02 001e 0000"),
        Err(DecodeError::UnsupportedProtocolLevel(3))
    );
    assert_eq!(
        decode_hex("10 0c 0004 4d515455 04 02 001e 0000"),
        Err(DecodeError::InvalidProtocolName)
    );
}

#[test]
fn connect_flag_rules() {
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 03 001e 0000"),
        Err(DecodeError::ConnectReservedFlag)
    );
    // will QoS 1 without the will flag
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 0a 001e 0000"),
        Err(DecodeError::WillFlagsWithoutWill)
    );
    // will retain without the will flag
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 22 001e 0000"),
        Err(DecodeError::WillFlagsWithoutWill)
    );
    // will QoS 3
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 1e 001e 0000"),
        Err(DecodeError::InvalidQos(3))
    );
    // password without user name
    assert_eq!(
        decode_hex("10 0e 0004 4d515454 04 42 001e 0000 0000"),
        Err(DecodeError::PasswordWithoutUsername)
    );
    // a will topic with a wildcard
    assert_eq!(
        decode_hex("10 11 0004 4d515454 04 06 001e 0000 0001 23 0000"),
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName))
    );
}

#[test]
fn connect_fields_must_fit_the_remaining_length() {
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 82 001e 0000"),
        Err(DecodeError::Truncated("user name"))
    );
    assert_eq!(
        decode_hex("10 0d 0004 4d515454 04 02 001e 0000 ff"),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn strings_must_be_utf8_without_nul() {
    assert_eq!(
        decode_hex("10 0e 0004 4d515454 04 02 001e 0002 c328"),
        Err(DecodeError::InvalidUtf8)
    );
    assert_eq!(
        decode_hex("10 0e 0004 4d515454 04 02 001e 0002 6100"),
        Err(DecodeError::NullCharacter)
    );
    // An encoded surrogate (U+D800) is not UTF-8.
    assert_eq!(
        decode_hex("30 06 0003 eda080 00"),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn reserved_types_and_header_flags_are_refused_from_the_first_byte() {
    assert_eq!(decode_hex("00"), Err(DecodeError::ReservedPacketType(0)));
    assert_eq!(decode_hex("f0"), Err(DecodeError::ReservedPacketType(15)));
    for (byte, packet_type) in [
        (0x11, PacketType::Connect),
        (0x21, PacketType::ConnAck),
        (0x42, PacketType::PubAck),
        (0x60, PacketType::PubRel),
        (0x80, PacketType::Subscribe),
        (0xa0, PacketType::Unsubscribe),
        (0xc1, PacketType::PingReq),
        (0xe2, PacketType::Disconnect),
    ] {
        assert_eq!(
            decode_bytes(&[byte]),
            Err(DecodeError::InvalidHeaderFlags {
                packet_type,
                flags: byte & 0x0f
            })
        );
    }
}

#[test]
fn remaining_length_is_at_most_four_bytes() {
    assert_eq!(
        decode_hex("30 ff ff ff ff 01"),
        Err(DecodeError::MalformedRemainingLength)
    );
    // Four bytes is fine, and then the size limit speaks.
    assert_eq!(
        decode_hex("30 ff ff ff 7f"),
        Err(DecodeError::PacketTooLarge {
            size: 5 + 268_435_455,
            max: LIMIT
        })
    );
}

#[test]
fn publish_rules() {
    assert_eq!(
        decode_hex("36 07 0001 61 0001 00"),
        Err(DecodeError::InvalidQos(3))
    );
    assert_eq!(
        decode_hex("38 04 0001 61 00"),
        Err(DecodeError::DuplicateFlagWithQos0)
    );
    assert_eq!(
        decode_hex("32 05 0001 61 0000"),
        Err(DecodeError::ZeroPacketId)
    );
    assert_eq!(
        decode_hex("30 05 0003 612f2b"),
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName))
    );
    assert_eq!(
        decode_hex("30 03 0001 23"),
        Err(DecodeError::InvalidTopicName(TopicError::WildcardInName))
    );
    assert_eq!(
        decode_hex("30 02 0000"),
        Err(DecodeError::InvalidTopicName(TopicError::Empty))
    );
    assert_eq!(
        decode_hex("32 04 0001 61 00"),
        Err(DecodeError::Truncated("packet identifier"))
    );
}

#[test]
fn publish_payload_is_a_slice_of_the_input() {
    let mut buffer = BytesMut::from(&bytes_of("31 0b 0004 74657374 68656c6c6f")[..]);
    let base = buffer.as_ptr() as usize;
    let Ok(Some(Packet::Publish(publish))) = decode(&mut buffer, LIMIT) else {
        panic!("not a PUBLISH");
    };
    assert!(publish.retain);
    assert_eq!(publish.payload, Bytes::from_static(b"hello"));
    // The payload points into the buffer the packet arrived in: no copy.
    assert_eq!(publish.payload.as_ptr() as usize, base + 8);
}

#[test]
fn acknowledgements_need_exactly_a_non_zero_id() {
    assert_eq!(decode_hex("40 02 0000"), Err(DecodeError::ZeroPacketId));
    assert_eq!(
        decode_hex("40 01 00"),
        Err(DecodeError::Truncated("packet identifier"))
    );
    assert_eq!(
        decode_hex("40 03 000100"),
        Err(DecodeError::TrailingBytes(1))
    );
    assert_eq!(decode_hex("b0 02 0000"), Err(DecodeError::ZeroPacketId));
    assert_eq!(decode_hex("c0 01 00"), Err(DecodeError::TrailingBytes(1)));
    assert_eq!(decode_hex("62 02 0007"), Ok(Some(Packet::PubRel(id(7)))));
}

#[test]
fn subscribe_rules() {
    assert_eq!(
        decode_hex("82 02 0001"),
        Err(DecodeError::NoTopicFilters(PacketType::Subscribe))
    );
    assert_eq!(
        decode_hex("82 06 0000 0001 61 00"),
        Err(DecodeError::ZeroPacketId)
    );
    assert_eq!(
        decode_hex("82 06 0001 0001 61 03"),
        Err(DecodeError::InvalidQos(3))
    );
    assert_eq!(
        decode_hex("82 06 0001 0001 61 04"),
        Err(DecodeError::SubscribeReservedBits(4))
    );
    assert_eq!(
        decode_hex("82 0a 0001 0005 612f232f62 00"),
        Err(DecodeError::InvalidTopicFilter(
            TopicError::MultiLevelWildcardNotLast
        ))
    );
    assert_eq!(
        decode_hex("82 07 0001 0002 612b 00"),
        Err(DecodeError::InvalidTopicFilter(
            TopicError::WildcardNotWholeLevel
        ))
    );
    assert_eq!(
        decode_hex("82 05 0001 0001 61"),
        Err(DecodeError::Truncated("requested QoS"))
    );
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: id(1),
        filters: vec![
            ("device/+/report".into(), QoS::AtLeastOnce),
            ("#".into(), QoS::AtMostOnce),
        ],
    });
    assert_eq!(
        decode_bytes(&encode_to_vec(&subscribe)),
        Ok(Some(subscribe))
    );
}

#[test]
fn unsubscribe_rules() {
    assert_eq!(
        decode_hex("a2 02 0001"),
        Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe))
    );
    assert_eq!(
        decode_hex("a2 06 0001 0002 2361"),
        Err(DecodeError::InvalidTopicFilter(
            TopicError::WildcardNotWholeLevel
        ))
    );
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: id(9),
        filters: vec!["a/b".into()],
    });
    assert_eq!(
        decode_bytes(&encode_to_vec(&unsubscribe)),
        Ok(Some(unsubscribe))
    );
}

#[test]
fn suback_and_connack_rules() {
    assert_eq!(
        decode_hex("90 02 0001"),
        Err(DecodeError::NoSubAckReturnCodes)
    );
    assert_eq!(
        decode_hex("90 03 0001 03"),
        Err(DecodeError::InvalidSubAckReturnCode(3))
    );
    assert_eq!(
        decode_hex("90 05 0001 00 02 80"),
        Ok(Some(Packet::SubAck(SubAck {
            packet_id: id(1),
            return_codes: vec![
                SubscribeReturnCode::Success(QoS::AtMostOnce),
                SubscribeReturnCode::Success(QoS::ExactlyOnce),
                SubscribeReturnCode::Failure,
            ],
        })))
    );
    assert_eq!(
        decode_hex("20 02 02 00"),
        Err(DecodeError::InvalidConnAckFlags(2))
    );
    assert_eq!(
        decode_hex("20 02 00 06"),
        Err(DecodeError::InvalidConnectReturnCode(6))
    );
    assert_eq!(
        decode_hex("20 02 01 05"),
        Err(DecodeError::SessionPresentOnRefusal)
    );
    assert_eq!(
        decode_hex("20 02 00 03"),
        Ok(Some(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::ServerUnavailable
        })))
    );
}

#[test]
fn need_more_bytes_is_not_an_error_and_consumes_nothing() {
    let bytes = bytes_of("32 0a 0004 74657374 0001 6869");
    for cut in 0..bytes.len() {
        let mut buffer = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode(&mut buffer, LIMIT), Ok(None), "cut at {cut}");
        assert_eq!(buffer.len(), cut);
    }
}

#[test]
fn two_packets_in_one_buffer_come_out_one_by_one() {
    let mut buffer = BytesMut::from(&bytes_of("c000 d000 e0")[..]);
    assert_eq!(decode(&mut buffer, LIMIT), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buffer, LIMIT), Ok(Some(Packet::PingResp)));
    assert_eq!(decode(&mut buffer, LIMIT), Ok(None));
    assert_eq!(&buffer[..], &[0xe0]);
}

#[test]
fn the_size_limit_is_checked_from_the_fixed_header() {
    // Only the header of a 16,390-byte PUBLISH is here; the limit is 16 KiB.
    let mut buffer = BytesMut::from(&bytes_of("30 83 80 01")[..]);
    assert_eq!(
        decode(&mut buffer, 16 * 1024),
        Err(DecodeError::PacketTooLarge {
            size: 4 + 16_387,
            max: 16_384
        })
    );
    // A packet of exactly the limit is fine.
    let packet = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        payload: Bytes::from(vec![7u8; 100]),
    });
    let bytes = encode_to_vec(&packet);
    let mut buffer = BytesMut::from(&bytes[..]);
    assert_eq!(decode(&mut buffer, bytes.len()), Ok(Some(packet)));
    let mut buffer = BytesMut::from(&bytes[..]);
    assert!(matches!(
        decode(&mut buffer, bytes.len() - 1),
        Err(DecodeError::PacketTooLarge { .. })
    ));
}

#[test]
fn remaining_length_boundaries_encode_minimally() {
    for (payload_len, header_len) in [(0, 2), (122, 2), (123, 3), (16_378, 3), (16_379, 4)] {
        let packet = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "abc".into(),
            packet_id: None,
            payload: Bytes::from(vec![0u8; payload_len]),
        });
        let bytes = encode_to_vec(&packet);
        assert_eq!(
            bytes.len(),
            header_len + 5 + payload_len,
            "payload {payload_len}"
        );
        assert_eq!(decode_bytes(&bytes), Ok(Some(packet)));
    }
}

#[test]
fn the_encoder_refuses_what_the_types_cannot_rule_out() {
    let publish = |qos, packet_id, dup| {
        Packet::Publish(Publish {
            dup,
            qos,
            retain: false,
            topic: "t".into(),
            packet_id,
            payload: Bytes::new(),
        })
    };
    let mut out = BytesMut::new();
    assert_eq!(
        encode(&publish(QoS::AtLeastOnce, None, false), &mut out),
        Err(EncodeError::MissingPacketId(QoS::AtLeastOnce))
    );
    assert_eq!(
        encode(&publish(QoS::AtMostOnce, Some(id(1)), false), &mut out),
        Err(EncodeError::UnexpectedPacketId)
    );
    assert_eq!(
        encode(&publish(QoS::AtMostOnce, None, true), &mut out),
        Err(EncodeError::DuplicateFlagWithQos0)
    );
    assert_eq!(
        encode(
            &Packet::Subscribe(Subscribe {
                packet_id: id(1),
                filters: vec![]
            }),
            &mut out
        ),
        Err(EncodeError::NoTopicFilters(PacketType::Subscribe))
    );
    let long_topic = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "a".repeat(65_536),
        packet_id: None,
        payload: Bytes::new(),
    });
    assert_eq!(
        encode(&long_topic, &mut out),
        Err(EncodeError::FieldTooLong("topic name"))
    );
    assert!(out.is_empty(), "a failed encode appended bytes");
}

#[test]
fn connect_debug_hides_the_password() {
    let connect = Connect {
        protocol: ProtocolLevel::V3_1_1,
        bridge_mode: false,
        clean_session: true,
        keep_alive: 0,
        client_id: String::new(),
        will: None,
        username: Some("bblp".into()),
        password: Some(Bytes::from_static(b"s3cr3t-access-code").into()),
    };
    let printed = format!("{connect:?}");
    assert!(!printed.contains("s3cr3t"), "{printed}");
    assert!(printed.contains("redacted"));
}

/// An oversized packet is refused from its fixed header alone, and the
/// buffer is left as it was: a caller may skip the packet and go on.
#[test]
fn an_oversized_packet_leaves_the_buffer_untouched() {
    let mut buffer = bytes::BytesMut::from(&[0x30u8, 0xff, 0xff, 0x03, b'x'][..]);
    let before = buffer.clone();
    assert!(matches!(
        relay_proto::mqtt::decode(&mut buffer, 1024),
        Err(relay_proto::mqtt::DecodeError::PacketTooLarge {
            size: 65_539,
            max: 1024
        })
    ));
    assert_eq!(buffer, before);
}

/// The packet id of a PUBLISH too large to keep is read from its first
/// bytes, as they arrive, without its payload.
#[test]
fn a_publish_prefix_gives_its_packet_id_before_the_payload() {
    use relay_proto::mqtt::{PublishPrefix, publish_prefix};
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "device/X1/report".into(),
        packet_id: PacketId::new(4242),
        payload: Bytes::from(vec![b'x'; 300_000]),
    });
    let mut wire = BytesMut::new();
    relay_proto::mqtt::encode(&publish, &mut wire).unwrap();
    let id_end = 1 + 3 + 2 + "device/X1/report".len() + 2;
    for cut in 0..id_end {
        assert!(
            matches!(publish_prefix(&wire[..cut]).unwrap(), PublishPrefix::NeedMore(n) if n > cut),
            "{cut}"
        );
    }
    assert_eq!(
        publish_prefix(&wire[..id_end]).unwrap(),
        PublishPrefix::PacketId(QoS::AtLeastOnce, PacketId::new(4242).unwrap())
    );
    let mut qos0 = BytesMut::new();
    relay_proto::mqtt::encode(&Packet::PingResp, &mut qos0).unwrap();
    assert_eq!(publish_prefix(&qos0).unwrap(), PublishPrefix::NoPacketId);
    // A packet id past the packet's own end is malformed.
    assert!(publish_prefix(&[0x32, 0x03, 0x00, 0x05, b'a']).is_err());
}
