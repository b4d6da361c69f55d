//! Property tests of the MQTT 5 codec: any valid packet (properties drawn
//! from what its type allows) round-trips, byte-at-a-time decoding agrees
//! with one read, and arbitrary input never panics nor overruns the limit.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../fuzz/oracles.rs"]
mod oracles;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use relay_proto::Secret;
use relay_proto::mqtt::{PacketId, QoS};
use relay_proto::mqtt5::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, PacketType, Properties, Property, Publish,
    ReasonCode, RetainHandling, SubAck, Subscribe, SubscriptionOptions, Unsubscribe, Will, decode,
    encode,
};

const LIMIT: usize = 1024 * 1024;

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => any::<char>().prop_filter("no NUL", |c| *c != '\0'),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec(text(5).prop_map(|l| l.replace(['+', '#', '/'], "x")), 1..4)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("non-empty", |topic| !topic.is_empty())
}

fn filter() -> impl Strategy<Value = String> {
    prop_oneof![topic(), Just("#".to_owned()), Just("a/+/c".to_owned())]
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1u16..).prop_map(|id| PacketId::new(id).unwrap())
}

fn binary() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..8).prop_map(Bytes::from)
}

fn flag() -> impl Strategy<Value = u8> {
    0u8..=1
}

/// Any property with a valid value.
fn property() -> impl Strategy<Value = Property> {
    prop_oneof![
        flag().prop_map(Property::PayloadFormatIndicator),
        any::<u32>().prop_map(Property::MessageExpiryInterval),
        text(6).prop_map(Property::ContentType),
        topic().prop_map(Property::ResponseTopic),
        binary().prop_map(Property::CorrelationData),
        (1u32..=268_435_455).prop_map(Property::SubscriptionIdentifier),
        any::<u32>().prop_map(Property::SessionExpiryInterval),
        text(6).prop_map(Property::AssignedClientIdentifier),
        any::<u16>().prop_map(Property::ServerKeepAlive),
        text(6).prop_map(Property::AuthenticationMethod),
        binary().prop_map(Property::AuthenticationData),
        flag().prop_map(Property::RequestProblemInformation),
        any::<u32>().prop_map(Property::WillDelayInterval),
        flag().prop_map(Property::RequestResponseInformation),
        text(6).prop_map(Property::ResponseInformation),
        text(6).prop_map(Property::ServerReference),
        text(6).prop_map(Property::ReasonString),
        (1u16..).prop_map(Property::ReceiveMaximum),
        any::<u16>().prop_map(Property::TopicAliasMaximum),
        (1u16..).prop_map(Property::TopicAlias),
        flag().prop_map(Property::MaximumQos),
        flag().prop_map(Property::RetainAvailable),
        (text(4), text(4)).prop_map(|(name, value)| Property::UserProperty(name, value)),
        (1u32..).prop_map(Property::MaximumPacketSize),
        flag().prop_map(Property::WildcardSubscriptionAvailable),
        flag().prop_map(Property::SubscriptionIdentifierAvailable),
        flag().prop_map(Property::SharedSubscriptionAvailable),
    ]
}

/// Properties valid in `context`: drawn at random, those the context
/// refuses or already holds dropped.
fn properties(context: relay_proto::mqtt5::PropertyContext) -> impl Strategy<Value = Properties> {
    proptest::collection::vec(property(), 0..6).prop_map(move |drawn| {
        let mut kept = Properties::new();
        for property in drawn {
            let mut trial = kept.clone();
            trial.push(property);
            if trial.check(context).is_ok() {
                kept = trial;
            }
        }
        kept
    })
}

fn reason(packet: PacketType) -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_map(move |code| {
        let reason = ReasonCode(code);
        if reason.allowed_in(packet) {
            reason
        } else {
            ReasonCode::SUCCESS
        }
    })
}

fn options() -> impl Strategy<Value = SubscriptionOptions> {
    (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(|(qos, no_local, rap, handling)| {
        SubscriptionOptions {
            qos,
            no_local,
            retain_as_published: rap,
            retain_handling: match handling {
                0 => RetainHandling::SendAtSubscribe,
                1 => RetainHandling::SendIfNew,
                _ => RetainHandling::DoNotSend,
            },
        }
    })
}

fn packet() -> impl Strategy<Value = Packet> {
    use relay_proto::mqtt5::PropertyContext as C;
    let connect = (
        any::<bool>(),
        any::<u16>(),
        properties(C::Connect),
        text(8),
        proptest::option::of((properties(C::Will), topic(), binary(), qos(), any::<bool>())),
        proptest::option::of(text(6)),
        proptest::option::of(binary()),
    )
        .prop_map(
            |(clean_start, keep_alive, properties, client_id, will, username, password)| {
                Packet::Connect(Connect {
                    clean_start,
                    keep_alive,
                    properties,
                    client_id,
                    will: will.map(|(properties, topic, payload, qos, retain)| Will {
                        properties,
                        topic,
                        payload,
                        qos,
                        retain,
                    }),
                    username,
                    password: password.map(Secret::new),
                })
            },
        );
    let connack = (
        any::<bool>(),
        reason(PacketType::ConnAck),
        properties(C::ConnAck),
    )
        .prop_map(|(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: session_present && !reason.is_failure(),
                reason,
                properties,
            })
        });
    let publish = (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic(),
        packet_id(),
        properties(C::Publish),
        binary(),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload,
            })
        });
    let ack = |packet: PacketType, context: C| {
        (packet_id(), reason(packet), properties(context)).prop_map(
            |(packet_id, reason, properties)| Ack {
                packet_id,
                reason,
                properties,
            },
        )
    };
    let subscribe = (
        packet_id(),
        properties(C::Subscribe),
        proptest::collection::vec((filter(), options()), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        });
    let suback = |packet: PacketType, context: C| {
        (
            packet_id(),
            properties(context),
            proptest::collection::vec(reason(packet), 1..4),
        )
            .prop_map(|(packet_id, properties, reasons)| SubAck {
                packet_id,
                properties,
                reasons,
            })
    };
    let unsubscribe = (
        packet_id(),
        properties(C::Unsubscribe),
        proptest::collection::vec(filter(), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        });
    prop_oneof![
        connect,
        connack,
        publish,
        ack(PacketType::PubAck, C::PubAck).prop_map(Packet::PubAck),
        ack(PacketType::PubRec, C::PubRec).prop_map(Packet::PubRec),
        ack(PacketType::PubRel, C::PubRel).prop_map(Packet::PubRel),
        ack(PacketType::PubComp, C::PubComp).prop_map(Packet::PubComp),
        subscribe,
        suback(PacketType::SubAck, C::SubAck).prop_map(Packet::SubAck),
        unsubscribe,
        suback(PacketType::UnsubAck, C::UnsubAck).prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (reason(PacketType::Disconnect), properties(C::Disconnect))
            .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties })),
        (reason(PacketType::Auth), properties(C::Auth))
            .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_packets_round_trip(packet in packet()) {
        let mut wire = BytesMut::new();
        encode(&packet, &mut wire).unwrap();
        let copy = wire.clone();
        prop_assert_eq!(decode(&mut wire, LIMIT), Ok(Some(packet.clone())));
        prop_assert!(wire.is_empty());
        // A byte at a time.
        let mut buffer = BytesMut::new();
        let mut decoded = None;
        for byte in copy.iter() {
            prop_assert!(decoded.is_none());
            buffer.extend_from_slice(&[*byte]);
            decoded = decode(&mut buffer, LIMIT).unwrap();
        }
        prop_assert_eq!(decoded, Some(packet));
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_overrun(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        oracles::check_mqtt5_decode(&data);
    }
}
