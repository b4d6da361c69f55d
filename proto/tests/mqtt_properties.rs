//! Property tests of the MQTT codec: round trips, byte-at-a-time decoding,
//! and arbitrary input that must never panic nor overrun the size limit.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../fuzz/oracles.rs"]
mod oracles;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_proto::mqtt::{
    ConnAck, Connect, ConnectReturnCode, Packet, PacketId, ProtocolLevel, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, Unsubscribe, Will, decode, encode,
};

const LIMIT: usize = 1024 * 1024;

fn text_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('$'),
        1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(text_char(), 0..max).prop_map(|chars| chars.into_iter().collect())
}

fn level() -> impl Strategy<Value = String> {
    text(6).prop_map(|level| level.replace(['+', '#', '/'], "x"))
}

fn topic_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(level(), 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("non-empty", |topic| !topic.is_empty())
}

fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![3 => level(), 1 => Just("+".to_owned())];
    (proptest::collection::vec(level, 1..5), any::<bool>()).prop_map(|(mut levels, multi)| {
        if multi {
            levels.push("#".into());
        }
        let filter = levels.join("/");
        if filter.is_empty() {
            "#".into()
        } else {
            filter
        }
    })
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(|id| PacketId::new(id).expect("range starts at 1"))
}

fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn connect() -> impl Strategy<Value = Packet> {
    let will = proptest::option::of((topic_name(), binary(32), qos(), any::<bool>()).prop_map(
        |(topic, payload, qos, retain)| Will {
            topic,
            payload,
            qos,
            retain,
        },
    ));
    let credentials = proptest::option::of((text(12), proptest::option::of(binary(16))));
    (
        prop_oneof![Just(ProtocolLevel::V3_1), Just(ProtocolLevel::V3_1_1)],
        any::<bool>(),
        any::<bool>(),
        any::<u16>(),
        text(24),
        will,
        credentials,
    )
        .prop_map(
            |(protocol, bridge_mode, clean_session, keep_alive, client_id, will, credentials)| {
                let (username, password) = match credentials {
                    Some((username, password)) => (Some(username), password),
                    None => (None, None),
                };
                Packet::Connect(Connect {
                    protocol,
                    bridge_mode,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password: password.map(Into::into),
                })
            },
        )
}

fn publish() -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        binary(300),
    )
        .prop_map(|(qos, dup, retain, topic, id, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: (!at_most_once).then_some(id),
                payload,
            })
        })
}

fn connack() -> impl Strategy<Value = Packet> {
    let code = prop_oneof![
        Just(ConnectReturnCode::Accepted),
        Just(ConnectReturnCode::UnacceptableProtocolVersion),
        Just(ConnectReturnCode::IdentifierRejected),
        Just(ConnectReturnCode::ServerUnavailable),
        Just(ConnectReturnCode::BadUserNameOrPassword),
        Just(ConnectReturnCode::NotAuthorized),
    ];
    (any::<bool>(), code).prop_map(|(present, code)| {
        Packet::ConnAck(ConnAck {
            session_present: present && code == ConnectReturnCode::Accepted,
            code,
        })
    })
}

fn any_packet() -> impl Strategy<Value = Packet> {
    let suback_code = prop_oneof![
        qos().prop_map(SubscribeReturnCode::Success),
        Just(SubscribeReturnCode::Failure)
    ];
    prop_oneof![
        connect(),
        connack(),
        publish(),
        packet_id().prop_map(Packet::PubAck),
        packet_id().prop_map(Packet::PubRec),
        packet_id().prop_map(Packet::PubRel),
        packet_id().prop_map(Packet::PubComp),
        (
            packet_id(),
            proptest::collection::vec((topic_filter(), qos()), 1..5)
        )
            .prop_map(|(packet_id, filters)| Packet::Subscribe(Subscribe { packet_id, filters })),
        (packet_id(), proptest::collection::vec(suback_code, 1..5)).prop_map(
            |(packet_id, return_codes)| Packet::SubAck(SubAck {
                packet_id,
                return_codes
            })
        ),
        (packet_id(), proptest::collection::vec(topic_filter(), 1..5)).prop_map(
            |(packet_id, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, filters })
        ),
        packet_id().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn encode_all(packets: &[Packet]) -> BytesMut {
    let mut out = BytesMut::new();
    for packet in packets {
        encode(packet, &mut out).expect("generated packets are encodable");
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_with_bytes_gives_the_wire_bytes_of_each_packet(packets in proptest::collection::vec(any_packet(), 1..4)) {
        let wire = encode_all(&packets);
        let mut buffer = wire.clone();
        let mut forwarded = BytesMut::new();
        for packet in &packets {
            let (decoded, bytes) = relay_proto::mqtt::decode_with_bytes(&mut buffer, LIMIT)
                .expect("valid")
                .expect("whole");
            prop_assert_eq!(&decoded, packet);
            forwarded.extend_from_slice(&bytes);
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(forwarded, wire);
    }

    #[test]
    fn decode_inverts_encode(packet in any_packet()) {
        let mut bytes = encode_all(std::slice::from_ref(&packet));
        prop_assert_eq!(decode(&mut bytes, LIMIT), Ok(Some(packet)));
        prop_assert!(bytes.is_empty());
    }

    #[test]
    fn byte_at_a_time_gives_the_same_packets(packets in proptest::collection::vec(any_packet(), 1..6)) {
        let bytes = encode_all(&packets);
        let mut buffer = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in bytes.iter() {
            buffer.extend_from_slice(&[*byte]);
            while let Some(packet) = decode(&mut buffer, LIMIT).expect("valid stream") {
                decoded.push(packet);
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, packets);
    }

    /// The fuzz target's checks, on generated input: the first two bytes
    /// pick the size limit and the read size, the rest is the stream.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overrun_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 2..600),
    ) {
        oracles::check_mqtt_decode(&bytes);
    }

    #[test]
    fn mutated_packets_pass_the_fuzz_checks(
        packet in any_packet(),
        position in any::<usize>(),
        value in any::<u8>(),
        read_size in any::<u8>(),
    ) {
        let mut bytes = encode_all(&[packet]);
        let index = position % bytes.len();
        bytes[index] = value;
        let mut input = vec![u8::MAX, read_size];
        input.extend_from_slice(&bytes);
        oracles::check_mqtt_decode(&input);
    }
}
