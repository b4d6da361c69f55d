// What the fuzz targets check for every input. Shared with
// `proto/tests/fuzz_seeds.rs`, which replays the seed corpus in CI.
//
// Input layout: the first byte picks the size limit, the second how the rest
// is cut into reads; the rest is the byte stream.

#![allow(clippy::expect_used)]

use bytes::BytesMut;
use relay_proto::{mqtt, tunnel};

fn split_input(data: &[u8]) -> Option<(usize, usize, &[u8])> {
    let [limit_byte, chunk_byte, stream @ ..] = data else {
        return None;
    };
    let limit = 2 + usize::from(*limit_byte) * 64;
    let chunk = 1 + usize::from(*chunk_byte);
    Some((limit, chunk, stream))
}

/// Decodes `stream` as one read and as reads of `chunk` bytes; both must give
/// the same packets and the same verdict, every packet must fit the limit,
/// and every packet must survive encode then decode unchanged.
pub fn check_mqtt_decode(data: &[u8]) {
    let Some((limit, chunk, stream)) = split_input(data) else {
        return;
    };
    let whole = decode_mqtt_stream(stream, limit, stream.len().max(1));
    let chunked = decode_mqtt_stream(stream, limit, chunk);
    assert_eq!(whole, chunked, "verdict depends on how the bytes arrive");
    for packet in whole.0 {
        let mut encoded = BytesMut::new();
        mqtt::encode(&packet, &mut encoded).expect("a decoded packet encodes");
        assert!(encoded.len() <= limit, "re-encoding grew past the limit");
        let again = mqtt::decode(&mut encoded, limit).expect("re-encoded packet decodes");
        assert_eq!(
            again.as_ref(),
            Some(&packet),
            "round trip changed the packet"
        );
        assert!(encoded.is_empty());
    }
}

type MqttOutcome = (Vec<mqtt::Packet>, Option<mqtt::DecodeError>);

fn decode_mqtt_stream(stream: &[u8], limit: usize, chunk: usize) -> MqttOutcome {
    let mut buffer = BytesMut::new();
    let mut packets = Vec::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            let before = buffer.len();
            match mqtt::decode(&mut buffer, limit) {
                Ok(Some(packet)) => {
                    assert!(before - buffer.len() <= limit, "packet over the limit");
                    packets.push(packet);
                }
                Ok(None) => {
                    assert_eq!(before, buffer.len(), "need-more consumed bytes");
                    break;
                }
                Err(error) => return (packets, Some(error)),
            }
        }
    }
    (packets, None)
}

/// The same contract for tunnel frames.
pub fn check_tunnel_decode(data: &[u8]) {
    let Some((limit, chunk, stream)) = split_input(data) else {
        return;
    };
    let whole = decode_tunnel_stream(stream, limit, stream.len().max(1));
    let chunked = decode_tunnel_stream(stream, limit, chunk);
    assert_eq!(whole, chunked, "verdict depends on how the bytes arrive");
    for message in whole.0 {
        let mut encoded = BytesMut::new();
        tunnel::encode(&message, &mut encoded).expect("a decoded message encodes");
        let again = tunnel::decode(&mut encoded, usize::MAX).expect("re-encoded message decodes");
        assert_eq!(
            again.as_ref(),
            Some(&message),
            "round trip changed the message"
        );
    }
}

type TunnelOutcome = (Vec<tunnel::Message>, Option<tunnel::TunnelError>);

fn decode_tunnel_stream(stream: &[u8], limit: usize, chunk: usize) -> TunnelOutcome {
    let mut buffer = BytesMut::new();
    let mut messages = Vec::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            let before = buffer.len();
            match tunnel::decode(&mut buffer, limit) {
                Ok(Some(message)) => {
                    assert!(before - buffer.len() <= limit, "frame over the limit");
                    messages.push(message);
                }
                Ok(None) => {
                    assert_eq!(before, buffer.len(), "need-more consumed bytes");
                    break;
                }
                Err(error) => return (messages, Some(error)),
            }
        }
    }
    (messages, None)
}
