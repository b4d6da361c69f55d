// What the fuzz targets check for every input. Shared with
// `proto/tests/fuzz_seeds.rs`, which replays the seed corpus in CI.
//
// Input layout: the first byte picks the size limit, the second how the rest
// is cut into reads; the rest is the byte stream.

// Each includer (fuzz target or test) uses only part of this file.
#![allow(clippy::expect_used, dead_code)]

use bytes::BytesMut;
use relay_proto::{mqtt, mqtt5, tunnel};

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
    let whole = decode_stream(stream, limit, stream.len().max(1), mqtt::decode);
    let chunked = decode_stream(stream, limit, chunk, mqtt::decode);
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

/// The same contract for the MQTT 5 codec. Re-encoding may be shorter
/// than the input (an acknowledgement's success written in full, a
/// variable byte integer longer than it needs), never longer.
pub fn check_mqtt5_decode(data: &[u8]) {
    let Some((limit, chunk, stream)) = split_input(data) else {
        return;
    };
    let whole = decode_stream(stream, limit, stream.len().max(1), mqtt5::decode);
    let chunked = decode_stream(stream, limit, chunk, mqtt5::decode);
    assert_eq!(whole, chunked, "verdict depends on how the bytes arrive");
    for packet in whole.0 {
        let mut encoded = BytesMut::new();
        mqtt5::encode(&packet, &mut encoded).expect("a decoded packet encodes");
        assert!(encoded.len() <= limit, "re-encoding grew past the limit");
        let again = mqtt5::decode(&mut encoded, limit).expect("re-encoded packet decodes");
        assert_eq!(
            again.as_ref(),
            Some(&packet),
            "round trip changed the packet"
        );
        assert!(encoded.is_empty());
    }
}

/// The same contract for tunnel frames.
pub fn check_tunnel_decode(data: &[u8]) {
    let Some((limit, chunk, stream)) = split_input(data) else {
        return;
    };
    let whole = decode_stream(stream, limit, stream.len().max(1), tunnel::decode);
    let chunked = decode_stream(stream, limit, chunk, tunnel::decode);
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

type Decoder<T, E> = fn(&mut BytesMut, usize) -> Result<Option<T>, E>;

/// Feeds `stream` in reads of `chunk` bytes, decoding after each read as a
/// connection's read loop does, until the end or the first error.
fn decode_stream<T, E>(
    stream: &[u8],
    limit: usize,
    chunk: usize,
    decode: Decoder<T, E>,
) -> (Vec<T>, Option<E>) {
    let mut buffer = BytesMut::new();
    let mut decoded = Vec::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            let before = buffer.len();
            match decode(&mut buffer, limit) {
                Ok(Some(item)) => {
                    assert!(
                        before - buffer.len() <= limit,
                        "decoded more than the limit"
                    );
                    decoded.push(item);
                }
                Ok(None) => {
                    assert_eq!(before, buffer.len(), "need-more consumed bytes");
                    break;
                }
                Err(error) => return (decoded, Some(error)),
            }
        }
    }
    (decoded, None)
}
