//! The MQTT 5 codec's validity rules, one by one, each with its typed
//! error; and round trips of every packet type.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::{Bytes, BytesMut};
use common::bytes_of;
use relay_proto::Secret;
use relay_proto::mqtt::{self, PacketId, QoS};
use relay_proto::mqtt5::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, EncodeError, Packet, Properties,
    Property, PropertyContext, PropertyError, Publish, ReasonCode, RetainHandling, SubAck,
    Subscribe, SubscriptionOptions, Unsubscribe, Will, decode, encode,
};

const LIMIT: usize = 1 << 20;

fn decode_hex(hex: &str) -> Result<Option<Packet>, DecodeError> {
    let mut buffer = BytesMut::from(&bytes_of(hex)[..]);
    let decoded = decode(&mut buffer, LIMIT);
    if let Ok(Some(_)) = decoded {
        assert!(buffer.is_empty(), "the whole packet was taken");
    }
    decoded
}

fn round_trip(packet: Packet) {
    let mut wire = BytesMut::new();
    encode(&packet, &mut wire).unwrap();
    let copy = wire.clone();
    assert_eq!(
        decode(&mut wire, LIMIT),
        Ok(Some(packet.clone())),
        "{copy:02x?}"
    );
    assert!(wire.is_empty());
    // Byte by byte, as a slow reader sees it.
    let mut buffer = BytesMut::new();
    for (index, byte) in copy.iter().enumerate() {
        buffer.extend_from_slice(&[*byte]);
        let decoded = decode(&mut buffer, LIMIT).unwrap();
        if index + 1 < copy.len() {
            assert_eq!(decoded, None);
        } else {
            assert_eq!(decoded, Some(packet.clone()));
        }
    }
}

fn id(value: u16) -> PacketId {
    PacketId::new(value).unwrap()
}

#[test]
fn every_packet_type_round_trips() {
    let user = Property::UserProperty("k".into(), "v".into());
    round_trip(Packet::Connect(Connect {
        clean_start: true,
        keep_alive: 30,
        properties: Properties::new()
            .with(Property::SessionExpiryInterval(0))
            .with(Property::ReceiveMaximum(20))
            .with(Property::TopicAliasMaximum(10))
            .with(Property::MaximumPacketSize(65_536))
            .with(user.clone()),
        client_id: "app".into(),
        will: Some(Will {
            properties: Properties::new()
                .with(Property::WillDelayInterval(5))
                .with(Property::ContentType("text/plain".into())),
            topic: "will/topic".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
        }),
        username: None,
        // MQTT 5 allows a password without a user name (3.1.2.9).
        password: Some(Secret::new(Bytes::from_static(b"rly_key"))),
    }));
    round_trip(Packet::ConnAck(ConnAck {
        session_present: false,
        reason: ReasonCode::SUCCESS,
        properties: Properties::new()
            .with(Property::AssignedClientIdentifier("auto-1".into()))
            .with(Property::ServerKeepAlive(60))
            .with(Property::RetainAvailable(1))
            .with(Property::SharedSubscriptionAvailable(0)),
    }));
    round_trip(Packet::Publish(Publish {
        dup: true,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: String::new(),
        packet_id: Some(id(9)),
        properties: Properties::new()
            .with(Property::TopicAlias(3))
            .with(Property::SubscriptionIdentifier(1))
            .with(Property::SubscriptionIdentifier(268_435_455))
            .with(Property::ResponseTopic("reply/here".into()))
            .with(Property::CorrelationData(Bytes::from_static(b"\x00\x01"))),
        payload: Bytes::from_static(b"{}"),
    }));
    for reason in [ReasonCode::SUCCESS, ReasonCode::NOT_AUTHORIZED] {
        for properties in [
            Properties::new(),
            Properties::new().with(Property::ReasonString("why".into())),
        ] {
            let ack = Ack {
                packet_id: id(4),
                reason,
                properties,
            };
            round_trip(Packet::PubAck(ack.clone()));
            round_trip(Packet::PubRec(ack));
        }
    }
    round_trip(Packet::PubRel(Ack {
        reason: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
        ..Ack::success(id(5))
    }));
    round_trip(Packet::PubComp(Ack::success(id(6))));
    round_trip(Packet::Subscribe(Subscribe {
        packet_id: id(7),
        properties: Properties::new().with(Property::SubscriptionIdentifier(42)),
        filters: vec![
            ("a/+/c".into(), SubscriptionOptions::at(QoS::AtLeastOnce)),
            (
                "#".into(),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            ),
        ],
    }));
    round_trip(Packet::SubAck(SubAck {
        packet_id: id(7),
        properties: Properties::new().with(user.clone()),
        reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED],
    }));
    round_trip(Packet::Unsubscribe(Unsubscribe {
        packet_id: id(8),
        properties: Properties::new().with(user.clone()),
        filters: vec!["a/b".into()],
    }));
    round_trip(Packet::UnsubAck(SubAck {
        packet_id: id(8),
        properties: Properties::new(),
        reasons: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
    }));
    round_trip(Packet::PingReq);
    round_trip(Packet::PingResp);
    for reason in [
        ReasonCode::NORMAL_DISCONNECTION,
        ReasonCode::SERVER_SHUTTING_DOWN,
    ] {
        round_trip(Packet::Disconnect(Disconnect {
            reason,
            properties: Properties::new(),
        }));
    }
    round_trip(Packet::Disconnect(Disconnect {
        reason: ReasonCode::ADMINISTRATIVE_ACTION,
        properties: Properties::new()
            .with(Property::ReasonString("key revoked".into()))
            .with(Property::ServerReference("other.example.com".into())),
    }));
    round_trip(Packet::Auth(Auth {
        reason: ReasonCode::CONTINUE_AUTHENTICATION,
        properties: Properties::new()
            .with(Property::AuthenticationMethod("SCRAM-SHA-1".into()))
            .with(Property::AuthenticationData(Bytes::from_static(b"abc"))),
    }));
}

#[test]
fn short_forms_mean_success_without_properties() {
    // PUBACK with only a packet id; DISCONNECT and AUTH with nothing.
    assert_eq!(
        decode_hex("40 02 0007"),
        Ok(Some(Packet::PubAck(Ack::success(id(7)))))
    );
    assert_eq!(
        decode_hex("40 03 0007 87"),
        Ok(Some(Packet::PubAck(Ack {
            reason: ReasonCode::NOT_AUTHORIZED,
            ..Ack::success(id(7))
        })))
    );
    assert_eq!(
        decode_hex("e0 00"),
        Ok(Some(Packet::Disconnect(Disconnect {
            reason: ReasonCode::NORMAL_DISCONNECTION,
            properties: Properties::new(),
        })))
    );
    assert_eq!(
        decode_hex("f0 00"),
        Ok(Some(Packet::Auth(Auth {
            reason: ReasonCode::SUCCESS,
            properties: Properties::new(),
        })))
    );
}

/// CONNECT with `properties` (hex, after the property length).
fn connect_with(properties: &str) -> String {
    let properties = bytes_of(properties);
    let body_len = 10 + 1 + properties.len() + 2;
    format!(
        "10 {body_len:02x} 0004 4d515454 05 02 003c {:02x} {} 0000",
        properties.len(),
        hex(&properties)
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn property_error(hex: &str) -> PropertyError {
    match decode_hex(hex) {
        Err(DecodeError::Property(error)) => error,
        other => panic!("expected a property error, got {other:?}"),
    }
}

#[test]
fn each_packet_allows_its_own_properties_only() {
    // Topic Alias (0x23) belongs to PUBLISH.
    assert_eq!(
        property_error(&connect_with("23 0001")),
        PropertyError::NotAllowed {
            property: 0x23,
            context: PropertyContext::Connect,
        }
    );
    // Will Delay Interval (0x18) belongs to the will, not the CONNECT.
    assert_eq!(
        property_error(&connect_with("18 00000005")),
        PropertyError::NotAllowed {
            property: 0x18,
            context: PropertyContext::Connect,
        }
    );
    // Reason String on a PUBLISH.
    assert_eq!(
        property_error("30 0a 0001 61 05 1f 0002 6869 00"),
        PropertyError::NotAllowed {
            property: 0x1f,
            context: PropertyContext::Publish,
        }
    );
    assert_eq!(
        property_error(&connect_with("7f 00")),
        PropertyError::Unknown(0x7f)
    );
}

#[test]
fn a_property_appears_once_but_user_properties_and_publish_subscription_ids_repeat() {
    assert_eq!(
        property_error(&connect_with("21 0010 21 0020")),
        PropertyError::Duplicate(0x21)
    );
    assert!(matches!(
        decode_hex(&connect_with("26 0001 61 0001 62 26 0001 61 0001 63")),
        Ok(Some(Packet::Connect(_)))
    ));
    // Two subscription identifiers: fine in a PUBLISH, not in a SUBSCRIBE.
    assert!(matches!(
        decode_hex("30 08 0001 61 04 0b 01 0b 02"),
        Ok(Some(Packet::Publish(_)))
    ));
    assert_eq!(
        property_error("82 0b 0001 04 0b 01 0b 02 0001 61 00"),
        PropertyError::Duplicate(0x0b)
    );
}

#[test]
fn property_values_stay_in_their_ranges() {
    for (properties, property, value) in [
        ("21 0000", 0x21, 0),     // Receive Maximum 0
        ("27 00000000", 0x27, 0), // Maximum Packet Size 0
        ("17 02", 0x17, 2),       // Request Problem Information 2
        ("19 05", 0x19, 5),       // Request Response Information 5
    ] {
        assert_eq!(
            property_error(&connect_with(properties)),
            PropertyError::InvalidValue { property, value },
            "{properties}"
        );
    }
    // Topic Alias 0, Payload Format Indicator 2, Subscription Identifier 0.
    assert_eq!(
        property_error("30 07 0001 61 03 23 0000"),
        PropertyError::InvalidValue {
            property: 0x23,
            value: 0
        }
    );
    assert_eq!(
        property_error("30 06 0001 61 02 01 02"),
        PropertyError::InvalidValue {
            property: 0x01,
            value: 2
        }
    );
    assert_eq!(
        property_error("30 06 0001 61 02 0b 00"),
        PropertyError::InvalidValue {
            property: 0x0b,
            value: 0
        }
    );
    // CONNACK: Maximum QoS 2 and Retain Available 2.
    assert_eq!(
        property_error("20 05 00 00 02 24 02"),
        PropertyError::InvalidValue {
            property: 0x24,
            value: 2
        }
    );
    assert_eq!(
        property_error("20 05 00 00 02 25 02"),
        PropertyError::InvalidValue {
            property: 0x25,
            value: 2
        }
    );
}

#[test]
fn strings_and_string_pairs_are_utf8_without_nul() {
    assert_eq!(
        decode_hex(&connect_with("26 0001 ff 0001 62")),
        Err(DecodeError::Packet(mqtt::DecodeError::InvalidUtf8))
    );
    assert_eq!(
        decode_hex(&connect_with("26 0001 61 0001 00")),
        Err(DecodeError::Packet(mqtt::DecodeError::NullCharacter))
    );
    // A pair cut short: the value's length runs past the properties.
    assert_eq!(
        decode_hex(&connect_with("26 0001 61 0005 62")),
        Err(DecodeError::Packet(mqtt::DecodeError::Truncated(
            "property"
        )))
    );
}

#[test]
fn variable_byte_integers_are_four_bytes_at_most() {
    // A property length of five bytes.
    assert_eq!(
        decode_hex("e0 06 00 ff ff ff ff 01"),
        Err(DecodeError::MalformedVariableByteInteger)
    );
    // A subscription identifier of five bytes.
    assert_eq!(
        decode_hex("30 0a 0001 61 06 0b ff ff ff ff 01"),
        Err(DecodeError::MalformedVariableByteInteger)
    );
    // The largest one is fine.
    let decoded = decode_hex("30 09 0001 61 05 0b ff ff ff 7f")
        .unwrap()
        .unwrap();
    let Packet::Publish(publish) = decoded else {
        panic!("{decoded:?}")
    };
    assert_eq!(
        publish
            .properties
            .subscription_identifiers()
            .collect::<Vec<_>>(),
        vec![268_435_455]
    );
    // The remaining length of five bytes, as in 3.1.1.
    assert_eq!(
        decode_hex("30 ff ff ff ff 01"),
        Err(DecodeError::Packet(
            mqtt::DecodeError::MalformedRemainingLength
        ))
    );
}

#[test]
fn reason_codes_belong_to_their_packets() {
    for (hex, packet, code) in [
        ("40 03 0001 01", "PubAck", 0x01),
        ("62 03 0001 10", "PubRel", 0x10),
        ("90 04 0001 00 03", "SubAck", 0x03),
        ("b0 04 0001 00 01", "UnsubAck", 0x01),
        ("e0 01 01", "Disconnect", 0x01),
        ("f0 01 87", "Auth", 0x87),
        ("20 03 00 01 00", "ConnAck", 0x01),
    ] {
        match decode_hex(hex) {
            Err(DecodeError::InvalidReasonCode {
                packet: found,
                code: found_code,
            }) => {
                assert_eq!((found.to_string().as_str(), found_code), (packet, code))
            }
            other => panic!("{hex}: {other:?}"),
        }
    }
    // Session present with a refusal.
    assert_eq!(
        decode_hex("20 03 01 87 00"),
        Err(DecodeError::Packet(
            mqtt::DecodeError::SessionPresentOnRefusal
        ))
    );
    // And the encoder refuses what the decoder would.
    assert_eq!(
        encode(
            &Packet::PubAck(Ack {
                reason: ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                ..Ack::success(id(1))
            }),
            &mut BytesMut::new()
        ),
        Err(EncodeError::InvalidReasonCode {
            packet: relay_proto::mqtt5::PacketType::PubAck,
            code: 0x86
        })
    );
}

#[test]
fn subscription_options_are_checked() {
    // Reserved bits 6-7, Retain Handling 3, No Local on a shared filter.
    assert_eq!(
        decode_hex("82 07 0001 00 0001 61 40"),
        Err(DecodeError::InvalidSubscriptionOptions(0x40))
    );
    assert_eq!(
        decode_hex("82 07 0001 00 0001 61 30"),
        Err(DecodeError::InvalidSubscriptionOptions(0x30))
    );
    assert_eq!(
        decode_hex("82 07 0001 00 0001 61 03"),
        Err(DecodeError::InvalidSubscriptionOptions(0x03))
    );
    assert_eq!(
        decode_hex("82 10 0001 00 000a 2473686172652f672f61 04"),
        Err(DecodeError::NoLocalOnSharedSubscription)
    );
    assert_eq!(
        decode_hex("82 03 0001 00"),
        Err(DecodeError::Packet(mqtt::DecodeError::NoTopicFilters(
            mqtt::PacketType::Subscribe
        )))
    );
}

#[test]
fn a_publish_names_its_topic_or_an_alias() {
    assert_eq!(
        decode_hex("30 03 0000 00"),
        Err(DecodeError::EmptyTopicWithoutAlias)
    );
    assert_eq!(
        decode_hex("30 06 0003 612f2b 00"),
        Err(DecodeError::Packet(mqtt::DecodeError::InvalidTopicName(
            relay_proto::topic::TopicError::WildcardInName
        )))
    );
    assert_eq!(
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: String::new(),
                packet_id: None,
                properties: Properties::new(),
                payload: Bytes::new(),
            }),
            &mut BytesMut::new()
        ),
        Err(EncodeError::EmptyTopicWithoutAlias)
    );
}

#[test]
fn connect_is_level_5_only_and_auth_has_no_flags() {
    // A 3.1.1 CONNECT.
    assert_eq!(
        decode_hex("10 0c 0004 4d515454 04 02 003c 0000"),
        Err(DecodeError::Packet(
            mqtt::DecodeError::UnsupportedProtocolLevel(4)
        ))
    );
    assert_eq!(decode_hex("f1 00"), Err(DecodeError::InvalidAuthFlags(1)));
    assert_eq!(
        decode_hex("00 00"),
        Err(DecodeError::Packet(mqtt::DecodeError::ReservedPacketType(
            0
        )))
    );
}

#[test]
fn a_packet_over_the_limit_is_refused_from_its_header() {
    // The header of a 1 MiB PUBLISH, and nothing else yet.
    let mut buffer = BytesMut::from(&bytes_of("30 80 80 40")[..]);
    assert_eq!(
        decode(&mut buffer, 1024),
        Err(DecodeError::Packet(mqtt::DecodeError::PacketTooLarge {
            size: 4 + (1 << 20),
            max: 1024
        }))
    );
    assert_eq!(buffer.len(), 4, "nothing taken");
}

#[test]
fn the_encoder_checks_properties_as_the_decoder_does() {
    let connack = |properties| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason: ReasonCode::SUCCESS,
            properties,
        })
    };
    assert_eq!(
        encode(
            &connack(Properties::new().with(Property::TopicAlias(1))),
            &mut BytesMut::new()
        ),
        Err(EncodeError::Property(PropertyError::NotAllowed {
            property: 0x23,
            context: PropertyContext::ConnAck
        }))
    );
    assert_eq!(
        encode(
            &connack(
                Properties::new()
                    .with(Property::ReceiveMaximum(1))
                    .with(Property::ReceiveMaximum(2))
            ),
            &mut BytesMut::new()
        ),
        Err(EncodeError::Property(PropertyError::Duplicate(0x21)))
    );
    let mut out = BytesMut::from(&b"kept"[..]);
    let _ = encode(
        &connack(Properties::new().with(Property::MaximumQos(3))),
        &mut out,
    );
    assert_eq!(&out[..], b"kept", "nothing appended on error");
}
