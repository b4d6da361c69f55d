//! A framed reader over a persistent buffer (the shape of mini-redis's
//! `Connection::read_frame`).

use bytes::BytesMut;
use relay_proto::mqtt::{self, DecodeError, Packet};
use relay_proto::tunnel::{self, Message, TunnelError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError<E> {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Decode(E),
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
}

/// Reads whole frames from `R`. The decoder it is given must be
/// check-then-parse: `Ok(None)` leaves the buffer as it was until a whole
/// frame is there (both of `relay-proto`'s decoders are).
#[derive(Debug)]
pub struct FramedReader<R> {
    reader: R,
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> FramedReader<R> {
    pub fn new(reader: R) -> FramedReader<R> {
        FramedReader::with_buffer(reader, BytesMut::with_capacity(4096))
    }

    /// A reader whose first bytes are already in `buffer`.
    pub fn with_buffer(reader: R, buffer: BytesMut) -> FramedReader<R> {
        FramedReader { reader, buffer }
    }

    /// The next frame; `Ok(None)` at a clean end of the stream. Cancel-safe:
    /// bytes read before a cancellation are kept for the next call.
    pub async fn read_frame<T, E>(
        &mut self,
        mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, FrameError<E>> {
        loop {
            if let Some(frame) = decode(&mut self.buffer).map_err(FrameError::Decode)? {
                return Ok(Some(frame));
            }
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// The next tunnel message (at most the default frame size).
    pub async fn read_message(&mut self) -> Result<Option<Message>, FrameError<TunnelError>> {
        self.read_frame(|buffer| tunnel::decode(buffer, tunnel::DEFAULT_MAX_FRAME_LEN))
            .await
    }

    /// The next MQTT packet of at most `max_packet_size` bytes.
    pub async fn read_packet(
        &mut self,
        max_packet_size: usize,
    ) -> Result<Option<Packet>, FrameError<DecodeError>> {
        self.read_frame(|buffer| mqtt::decode(buffer, max_packet_size))
            .await
    }

    /// Reads once more into the buffer; `Ok(0)` at the end of the stream.
    /// Cancel-safe, for callers that decode several frames per read.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        self.reader.read_buf(&mut self.buffer).await
    }

    /// The bytes read and not yet taken as frames.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buffer
    }

    /// The reader and what it had buffered, for a caller that goes on
    /// reading another way (a printer link's MQTT after its first frame).
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.reader, self.buffer)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use relay_proto::tunnel::{GoAway, GoAwayReason};
    use tokio::io::AsyncWriteExt;

    fn go_away() -> Message {
        Message::GoAway(GoAway {
            reason: GoAwayReason::Draining,
            reconnect_after_ms: Some(5),
        })
    }

    /// A read that loses a `select!` to another branch halfway through a
    /// frame loses nothing: the next read returns the whole frame.
    #[tokio::test]
    async fn a_cancelled_read_keeps_what_it_had_read() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut framed = FramedReader::new(reader);
        let mut frame = BytesMut::new();
        tunnel::encode(&go_away(), &mut frame).unwrap();
        frame.extend_from_slice(&[0xc0, 0x00]); // a PINGREQ after it
        writer.write_all(&frame[..3]).await.unwrap();
        tokio::select! {
            biased;
            _ = framed.read_message() => panic!("half a frame decoded"),
            () = tokio::task::yield_now() => {}
        }
        writer.write_all(&frame[3..]).await.unwrap();
        assert_eq!(framed.read_message().await.unwrap(), Some(go_away()));
        // What follows the frame is kept too.
        assert_eq!(
            framed.read_packet(1024).await.unwrap(),
            Some(Packet::PingReq)
        );
        drop(writer);
        assert_eq!(framed.read_packet(1024).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_end_inside_a_frame_is_an_error() {
        let (mut writer, reader) = tokio::io::duplex(64);
        writer.write_all(&[0x30, 0x05, 0x00]).await.unwrap();
        drop(writer);
        let mut framed = FramedReader::new(reader);
        assert!(matches!(
            framed.read_packet(1024).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn leftover_bytes_come_back_with_the_reader() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut bytes = BytesMut::new();
        tunnel::encode(&go_away(), &mut bytes).unwrap();
        bytes.extend_from_slice(&[0xd0, 0x00]);
        writer.write_all(&bytes).await.unwrap();
        let mut framed = FramedReader::new(reader);
        assert_eq!(framed.read_message().await.unwrap(), Some(go_away()));
        let (_, leftover) = framed.into_parts();
        assert_eq!(&leftover[..], &[0xd0, 0x00]);
    }
}
