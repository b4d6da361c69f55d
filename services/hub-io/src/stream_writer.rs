//! A byte stream's writing half shared by a session's writer and whichever
//! task delivers to the session: a [`DirectWriter`] for sessions that are
//! plain byte streams (a peer hub's link, a QUIC stream).
//!
//! The delivering task writes what the stream takes at once; what it does
//! not take is kept here, and the session's writer (told by an
//! [`Outbound::Flush`]) writes it with its own waker.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

use crate::outbound::{DirectWriter, Outbound, WriteNow};

/// The stream, and what a direct write left unwritten.
#[derive(Debug)]
struct Shared<W> {
    stream: W,
    /// Taken from a direct write the stream did not take whole: written
    /// before anything else.
    unwritten: Bytes,
    /// A direct write failed: the writer's next flush says so.
    failed: Option<io::ErrorKind>,
}

/// A byte stream's writing half behind a lock.
#[derive(Debug)]
pub struct StreamWriter<W> {
    shared: Mutex<Shared<W>>,
}

impl<W: AsyncWrite + Unpin> StreamWriter<W> {
    pub fn new(stream: W) -> StreamWriter<W> {
        StreamWriter {
            shared: Mutex::new(Shared {
                stream,
                unwritten: Bytes::new(),
                failed: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<W>> {
        // Nothing panics while holding it; the stream stays usable.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the stream (to finish or reset it).
    pub fn with_stream<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        f(&mut self.lock().stream)
    }

    /// Writes what a direct write left, then flushes. The lock is taken for
    /// each poll, never held across a wait.
    pub async fn flush(&self) -> io::Result<()> {
        poll_fn(|cx| self.lock().poll_flush(cx)).await
    }

    /// Writes all of `bytes` (after what a direct write left).
    pub async fn write_all(&self, bytes: Bytes) -> io::Result<()> {
        let mut bytes = bytes;
        poll_fn(|cx| {
            let mut shared = self.lock();
            ready!(shared.poll_unwritten(cx))?;
            while !bytes.is_empty() {
                let written = ready!(Pin::new(&mut shared.stream).poll_write(cx, &bytes))?;
                if written == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                bytes.advance(written);
            }
            Pin::new(&mut shared.stream).poll_flush(cx)
        })
        .await
    }
}

impl<W: AsyncWrite + Unpin> Shared<W> {
    /// Writes what a direct write left.
    fn poll_unwritten(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(kind) = self.failed {
            return Poll::Ready(Err(kind.into()));
        }
        while !self.unwritten.is_empty() {
            let written = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.unwritten))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.unwritten.advance(written);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_unwritten(cx))?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }
}

impl<W: AsyncWrite + Unpin + Send> DirectWriter for StreamWriter<W> {
    fn write_now(&self, item: &Outbound) -> WriteNow {
        let (Outbound::Bytes(bytes) | Outbound::Direct(bytes)) = item else {
            return WriteNow::NotNow;
        };
        let Ok(mut shared) = self.shared.try_lock() else {
            return WriteNow::NotNow;
        };
        if !shared.unwritten.is_empty() || shared.failed.is_some() {
            return WriteNow::NotNow;
        }
        // Nobody is woken by this context: what is left is the writer's,
        // with its own waker.
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut shared.stream).poll_write(&mut cx, bytes) {
            Poll::Pending => WriteNow::NotNow,
            Poll::Ready(Ok(0)) => WriteNow::NotNow,
            Poll::Ready(Ok(written)) => {
                if written < bytes.len() {
                    shared.unwritten = bytes.slice(written..);
                    return WriteNow::Unflushed;
                }
                match Pin::new(&mut shared.stream).poll_flush(&mut cx) {
                    Poll::Ready(Ok(())) => WriteNow::Written,
                    Poll::Pending => WriteNow::Unflushed,
                    Poll::Ready(Err(error)) => {
                        shared.failed = Some(error.kind());
                        WriteNow::Unflushed
                    }
                }
            }
            Poll::Ready(Err(error)) => {
                shared.failed = Some(error.kind());
                WriteNow::Unflushed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::outbound_queue;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn what_the_stream_does_not_take_is_written_by_the_writer_in_order() {
        // A pipe that holds 8 bytes: a direct write of 12 leaves 4.
        let (ours, mut theirs) = tokio::io::duplex(8);
        let writer = Arc::new(StreamWriter::new(ours));
        let (sender, mut receiver, _ended) = outbound_queue(1024);
        sender.write_directly_with(writer.clone());
        assert!(sender.send_bytes(Bytes::from_static(b"0123456789ab")));
        // Queued behind the flush, not written past the rest.
        assert!(sender.send_bytes(Bytes::from_static(b"cd")));
        let drain = tokio::spawn(async move {
            let mut all = vec![0u8; 14];
            theirs.read_exact(&mut all).await.map(|_| all)
        });
        while let Some(item) = receiver.recv().await {
            match item {
                Outbound::Flush => writer.flush().await.unwrap(),
                Outbound::Bytes(bytes) => {
                    writer.write_all(bytes).await.unwrap();
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(drain.await.unwrap().unwrap(), b"0123456789abcd");
    }

    #[tokio::test]
    async fn a_stream_with_room_is_written_at_once() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let writer = Arc::new(StreamWriter::new(ours));
        let (sender, mut receiver, _ended) = outbound_queue(1024);
        sender.write_directly_with(writer.clone());
        assert!(sender.send_bytes(Bytes::from_static(b"hello")));
        let mut read = [0u8; 5];
        theirs.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"hello");
        drop(sender);
        assert!(receiver.recv().await.is_none(), "nothing was queued");
    }
}
