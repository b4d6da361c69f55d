//! Cross-check of the MQTT 5 codec against an outside corpus: the MQTT 5
//! fixtures of the npm package mqtt-packet (MQTT.js's parser), extracted by
//! `scripts/extract-mqtt-packet-vectors` into `tests/data/`.
//!
//! Every fixture mqtt-packet parses and generates must decode here and
//! re-encode to the same bytes; every fixture it rejects must be rejected.
//! Where the spec is stricter than mqtt-packet, the difference is listed
//! with the error this codec gives.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use bytes::BytesMut;
use common::bytes_of;
use relay_proto::mqtt5::{Packet, decode, encode};
use serde_json::Value;

const VECTORS: &str = include_str!("data/mqtt5-packet-vectors.json");
const LIMIT: usize = 1024 * 1024;

/// Fixtures mqtt-packet accepts that MQTT 5 forbids, and this codec's
/// error.
const STRICTER_THAN_MQTT_PACKET: &[(&str, &str)] = &[
    // A 3.1.1 CONNACK read as MQTT 5: return code 1 is no MQTT 5 reason
    // code (section 3.2.2.2).
    (
        "Version 4 CONACK in Version 5 mode",
        "reason code 0x01 is not valid in ConnAck",
    ),
    // A CONNACK without its reason code, or without its property length:
    // both are required in MQTT 5 (sections 3.2.2.2 and 3.2.2.3).
    (
        "Version 5 CONNACK test 1",
        "reason code runs past the end of the packet",
    ),
    (
        "Version 5 CONNACK test 2",
        "variable byte integer runs past the end of the packet",
    ),
    // Maximum QoS 2: "a value other than 0 or 1" is a protocol error
    // (section 3.2.2.3.4).
    (
        "connack MQTT 5 with properties parse",
        "property 0x24 may not be 2",
    ),
    (
        "connack MQTT 5 with properties and doubled user properties parse",
        "property 0x24 may not be 2",
    ),
];

/// Fixtures that spell out what may be left out (a success reason code, a
/// property length of 0): valid, they decode to the same packet as the
/// short form, which is what this codec writes (sections 3.4.2.1, 3.14.2.1).
const NOT_SHORTEST_FORM: &[&str] = &[
    "Version 5 PUBACK test 2.1",
    "Version 5 PUBACK test 3",
    "Version 5 DISCONNECT test 2",
    "Version 5 DISCONNECT test 3 parse",
    "puback with reason and no MQTT 5 properties parse",
];

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
        valid >= 30 && malformed >= 15,
        "{valid} valid, {malformed} malformed"
    );
}

#[test]
fn valid_fixtures_decode_and_round_trip_byte_for_byte() {
    let mut failures = Vec::new();
    for vector in vectors().iter().filter(|v| v.kind != "malformed") {
        if let Some((_, expected)) = STRICTER_THAN_MQTT_PACKET
            .iter()
            .find(|(t, _)| *t == vector.test)
        {
            let verdict = decode_stream(&vector.chunks);
            if verdict.as_ref().err().map(String::as_str) != Some(*expected) {
                failures.push(format!(
                    "{}: expected {expected:?}, got {verdict:?}",
                    vector.test
                ));
            }
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
        let original = vector.chunks.concat();
        if NOT_SHORTEST_FORM.contains(&vector.test.as_str()) {
            let again = decode_stream(&[encoded.to_vec()]).expect("the shorter form decodes");
            if again != packets || encoded.len() >= original.len() {
                failures.push(format!("{}: shorter form differs", vector.test));
            }
        } else if encoded[..] != original[..] {
            failures.push(format!(
                "{}: re-encoding differs:\n  {}\n  {}",
                vector.test,
                hex(&original),
                hex(&encoded)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
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
