//! The tunnel wire format: exact bytes of the documented examples, forward
//! compatibility rules, bounded decoding and round-trip properties.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../fuzz/oracles.rs"]
mod oracles;

mod common;

use bytes::BytesMut;
use common::bytes_of;
use proptest::prelude::*;
use relay_proto::tunnel::{
    GoAway, GoAwayReason, Hello, HelloAck, HelloRefused, LinkAccept, LinkDownReason, LinkOpen,
    LinkRefused, LinkState, Message, PrinterLink, RefusalReason, TunnelError, decode, encode,
};

const LIMIT: usize = 64 * 1024;

fn encoded(message: &Message) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(message, &mut out).expect("encodable");
    out.to_vec()
}

fn decode_hex(hex: &str) -> Result<Option<Message>, TunnelError> {
    decode(&mut BytesMut::from(&bytes_of(hex)[..]), LIMIT)
}

/// The HELLO example of PROTOCOL.md, byte for byte.
#[test]
fn hello_matches_the_documented_bytes() {
    let hello = Message::Hello(Hello {
        version: 1,
        credential: "rla_k1_s3cret".into(),
        agent_version: Some("0.1.0".into()),
    });
    let expected = "01 0000001d
                    01 0002 0001
                    02 000d 726c615f6b315f7333637265 74
                    03 0005 302e312e30";
    assert_eq!(encoded(&hello), bytes_of(expected));
    assert_eq!(decode_hex(expected), Ok(Some(hello)));
}

#[test]
fn session_open_matches_the_documented_bytes() {
    let open = Message::LinkOpen(LinkOpen {
        link: 7,
        max_packet_size: Some(262_144),
    });
    let expected = "06 00000012 01 0008 0000000000000007 02 0004 00040000";
    assert_eq!(encoded(&open), bytes_of(expected));
    assert_eq!(decode_hex(expected), Ok(Some(open)));
}

#[test]
fn unknown_fields_are_skipped() {
    // LINK_ACCEPT with an extra field 0x09 from a newer peer.
    assert_eq!(
        decode_hex("07 00000010 09 0002 abcd 01 0008 0000000000000003"),
        Ok(Some(Message::LinkAccept(LinkAccept {
            link: 3,
            printer_kind: None,
            printer_serial: None,
            printer_client_id: None,
            through_agent_hub: false,
        })))
    );
}

#[test]
fn unknown_types_split_on_the_high_bit() {
    assert_eq!(
        decode_hex("90 00000003 01 0000"),
        Ok(Some(Message::Ignored { message_type: 0x90 }))
    );
    // Refused from the header, before the body arrives.
    assert_eq!(
        decode_hex("40 00000003"),
        Err(TunnelError::UnknownMessageType(0x40))
    );
    assert_eq!(
        decode_hex("00 00000000"),
        Err(TunnelError::UnknownMessageType(0))
    );
}

#[test]
fn field_errors_are_specific() {
    assert_eq!(
        decode_hex("07 00000000"),
        Err(TunnelError::MissingField { field: "link" })
    );
    assert_eq!(
        decode_hex("07 00000007 01 0004 00000003"),
        Err(TunnelError::InvalidFieldLength {
            field: "link",
            len: 4,
            expected: 8
        })
    );
    assert_eq!(
        decode_hex("07 00000016 01 0008 0000000000000003 01 0008 0000000000000004"),
        Err(TunnelError::DuplicateField { field: "link" })
    );
    assert_eq!(
        decode_hex("07 00000002 01 00"),
        Err(TunnelError::TruncatedField)
    );
    assert_eq!(
        decode_hex("07 00000004 01 0008 00"),
        Err(TunnelError::TruncatedField)
    );
    assert_eq!(
        decode_hex("01 00000009 01 0002 0001 02 0001 ff"),
        Err(TunnelError::InvalidUtf8 {
            field: "credential"
        })
    );
}

#[test]
fn oversize_frames_are_refused_from_the_header() {
    let mut buffer = BytesMut::from(&bytes_of("04 7fffffff")[..]);
    assert_eq!(
        decode(&mut buffer, LIMIT),
        Err(TunnelError::FrameTooLarge {
            size: 5 + 0x7fff_ffff,
            max: LIMIT
        })
    );
}

#[test]
fn partial_frames_wait_and_consume_nothing() {
    let bytes = encoded(&Message::GoAway(GoAway {
        reason: GoAwayReason::Draining,
        reconnect_after_ms: Some(250),
    }));
    for cut in 0..bytes.len() {
        let mut buffer = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode(&mut buffer, LIMIT), Ok(None), "cut at {cut}");
        assert_eq!(buffer.len(), cut);
    }
}

#[test]
fn unknown_codes_survive_a_round_trip() {
    let link = Message::PrinterLink(PrinterLink {
        state: LinkState::Other(77),
        reason: Some(LinkDownReason::Other(200)),
        detail: None,
        link: None,
    });
    let mut buffer = BytesMut::from(&encoded(&link)[..]);
    assert_eq!(decode(&mut buffer, LIMIT), Ok(Some(link)));
}

#[test]
fn hello_debug_hides_the_credential() {
    let hello = Hello {
        version: 1,
        credential: "rla_k1_topsecret".into(),
        agent_version: None,
    };
    assert!(!format!("{hello:?}").contains("topsecret"));
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..20).prop_map(|c| c.into_iter().collect())
}

fn link_down_reason() -> impl Strategy<Value = LinkDownReason> {
    prop_oneof![
        (1u8..=9).prop_map(LinkDownReason::from_code),
        (10u8..).prop_map(LinkDownReason::Other),
        Just(LinkDownReason::Other(0)),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), text(), proptest::option::of(text())).prop_map(
            |(version, credential, agent_version)| {
                Message::Hello(Hello {
                    version,
                    credential: credential.into(),
                    agent_version,
                })
            }
        ),
        (
            any::<u16>(),
            text(),
            any::<u64>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(
                |(version, device_id, epoch, keep_alive_ms)| Message::HelloAck(HelloAck {
                    version,
                    device_id,
                    epoch,
                    keep_alive_ms
                })
            ),
        (
            any::<u16>(),
            proptest::option::of(text()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(code, message, retry_after_ms)| Message::HelloRefused(
                HelloRefused {
                    reason: RefusalReason::from_code(code),
                    message,
                    retry_after_ms
                }
            )),
        (
            any::<u8>(),
            proptest::option::of(link_down_reason()),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(state, reason, detail, session)| Message::PrinterLink(
                PrinterLink {
                    state: LinkState::from_code(state),
                    reason,
                    detail,
                    link: session
                }
            )),
        (any::<u16>(), proptest::option::of(any::<u32>())).prop_map(
            |(code, reconnect_after_ms)| {
                Message::GoAway(GoAway {
                    reason: GoAwayReason::from_code(code),
                    reconnect_after_ms,
                })
            }
        ),
        (any::<u64>(), proptest::option::of(any::<u32>())).prop_map(
            |(session, max_packet_size)| {
                Message::LinkOpen(LinkOpen {
                    link: session,
                    max_packet_size,
                })
            }
        ),
        (
            any::<u64>(),
            proptest::option::of(any::<u8>()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            any::<bool>()
        )
            .prop_map(|(session, kind, serial, client_id, through_agent_hub)| {
                Message::LinkAccept(LinkAccept {
                    link: session,
                    printer_kind: kind.map(relay_proto::tunnel::PrinterKind::from_code),
                    printer_serial: serial,
                    printer_client_id: client_id,
                    through_agent_hub,
                })
            }),
        (
            any::<u64>(),
            link_down_reason(),
            proptest::option::of(text())
        )
            .prop_map(
                |(session, reason, detail)| Message::LinkRefused(LinkRefused {
                    link: session,
                    reason,
                    detail
                })
            ),
        (any::<u16>(), text(), any::<[u8; 32]>()).prop_map(|(version, instance_id, proof)| {
            Message::PeerHello(relay_proto::tunnel::PeerHello {
                version,
                instance_id,
                proof,
            })
        }),
        (text(), any::<[u8; 32]>()).prop_map(|(instance_id, proof)| {
            Message::PeerWelcome(relay_proto::tunnel::PeerWelcome { instance_id, proof })
        }),
        (text(), proptest::option::of(any::<u32>())).prop_map(|(device_id, max_packet_size)| {
            Message::PeerLinkOpen(relay_proto::tunnel::PeerLinkOpen {
                device_id,
                max_packet_size,
            })
        }),
        text().prop_map(|device_ids| {
            Message::PeerStatusQuery(relay_proto::tunnel::PeerStatusQuery { device_ids })
        }),
        (text(), text()).prop_map(|(device_id, figures)| {
            Message::PeerStatus(relay_proto::tunnel::PeerStatus { device_id, figures })
        }),
        (0x80u8..).prop_map(|message_type| Message::Ignored { message_type }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_inverts_encode(messages in proptest::collection::vec(any_message(), 1..5)) {
        let mut bytes = BytesMut::new();
        for message in &messages {
            encode(message, &mut bytes).expect("encodable");
        }
        // Byte at a time, as a stream would deliver it.
        let mut buffer = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in bytes.iter() {
            buffer.extend_from_slice(&[*byte]);
            while let Some(message) = decode(&mut buffer, LIMIT).expect("valid stream") {
                decoded.push(message);
            }
        }
        prop_assert_eq!(decoded, messages);
    }

    /// The fuzz target's checks, on generated input: the first two bytes
    /// pick the size limit and the read size, the rest is the stream.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overrun_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 2..300),
    ) {
        oracles::check_tunnel_decode(&bytes);
    }
}
