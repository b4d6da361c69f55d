//! Cross-check against an outside corpus: the MQTT 3.1 / 3.1.1 fixtures of
//! the npm package mqtt-packet (MQTT.js's parser), extracted by
//! `scripts/extract-mqtt-packet-vectors` into `tests/data/`.
//!
//! Every fixture mqtt-packet parses and generates must decode here and
//! re-encode to the same bytes; every fixture it rejects must be rejected.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::bytes_of;
use relay_proto::mqtt::{Packet, decode, encode};
use serde_json::Value;

const VECTORS: &str = include_str!("data/mqtt-packet-vectors.json");
const LIMIT: usize = 1024 * 1024;

/// Fixtures mqtt-packet accepts that the spec forbids, and the error this
/// codec gives instead. mqtt-packet does not tie the protocol name to the
/// level; MQTT 3.1.1 section 3.1.2.2 does, and so does Mosquitto (`MQIsdp`
/// goes with level 3 only).
const STRICTER_THAN_MQTT_PACKET: &[(&str, &str)] = &[(
    "connect MQTT bridge 132 parse",
    "unsupported protocol level 132",
)];

struct Vector {
    test: String,
    kind: String,
    chunks: Vec<Vec<u8>>,
    expected_packets: usize,
}

fn vectors() -> Vec<Vector> {
    let corpus: Value = serde_json::from_str(VECTORS).expect("corpus is JSON");
    corpus["vectors"]
        .as_array()
        .expect("vectors array")
        .iter()
        .map(|v| Vector {
            test: v["test"].as_str().expect("test name").to_owned(),
            kind: v["kind"].as_str().expect("kind").to_owned(),
            chunks: v["chunks"]
                .as_array()
                .expect("chunks")
                .iter()
                .map(|chunk| bytes_of(chunk.as_str().expect("hex chunk")))
                .collect(),
            expected_packets: v["packets"].as_array().expect("packets").len(),
        })
        .collect()
}

/// Feeds the chunks as a stream, decoding after each one as a read loop does.
fn decode_stream(chunks: &[Vec<u8>]) -> Result<Vec<Packet>, String> {
    let mut buffer = BytesMut::new();
    let mut packets = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        while let Some(packet) = decode(&mut buffer, LIMIT).map_err(|e| e.to_string())? {
            packets.push(packet);
        }
    }
    if buffer.is_empty() {
        Ok(packets)
    } else {
        Err(format!("{} bytes left undecoded", buffer.len()))
    }
}

#[test]
fn corpus_is_substantial() {
    let vectors = vectors();
    let valid = vectors.iter().filter(|v| v.kind != "malformed").count();
    let malformed = vectors.len() - valid;
    assert!(
        valid >= 30 && malformed >= 40,
        "{valid} valid, {malformed} malformed"
    );
}

#[test]
fn valid_fixtures_round_trip_byte_for_byte() {
    let mut failures = Vec::new();
    for vector in vectors().iter().filter(|v| v.kind != "malformed") {
        if let Some((_, expected)) = STRICTER_THAN_MQTT_PACKET
            .iter()
            .find(|(t, _)| *t == vector.test)
        {
            assert_eq!(
                decode_stream(&vector.chunks).err().as_deref(),
                Some(*expected)
            );
            continue;
        }
        let packets = match decode_stream(&vector.chunks) {
            Ok(packets) => packets,
            Err(error) => {
                failures.push(format!("{}: {error}", vector.test));
                continue;
            }
        };
        if packets.len() != vector.expected_packets {
            failures.push(format!(
                "{}: {} packets, mqtt-packet saw {}",
                vector.test,
                packets.len(),
                vector.expected_packets
            ));
            continue;
        }
        let mut encoded = BytesMut::new();
        for packet in &packets {
            encode(packet, &mut encoded).expect("decoded packets encode");
        }
        if encoded[..] != vector.chunks.concat()[..] {
            failures.push(format!("{}: re-encoding differs", vector.test));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn malformed_fixtures_are_rejected() {
    let mut accepted = Vec::new();
    for vector in vectors().iter().filter(|v| v.kind == "malformed") {
        if let Ok(packets) = decode_stream(&vector.chunks) {
            accepted.push(format!("{}: decoded {packets:?}", vector.test));
        }
    }
    assert!(accepted.is_empty(), "{accepted:#?}");
}
