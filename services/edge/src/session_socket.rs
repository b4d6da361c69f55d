//! A session's sending half, shared by the session's writer and whichever
//! task delivers to the session (its hub's, mostly).
//!
//! A delivery to an idle session whose socket is writable is written from
//! the delivering task at once ([`relay_hub_io::DirectWriter`]): the
//! session's task is not woken and no queue is crossed. Only when the
//! socket would block does the session's writer take over, flushing what
//! is left with its own waker. The lock is never contended on the default
//! one-thread runtime (tasks do not run at once); on more threads a
//! contended write goes through the queue instead.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use futures_util::{Sink, SinkExt};
use prometheus::IntCounter;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::hub::{DirectWriter, Mqtt5Translator, Outbound, WriteNow};

/// The sending half of a session's socket, behind a lock.
pub struct SessionSocket<K> {
    sink: Mutex<K>,
    /// An MQTT 5 session's translator: only items that need no
    /// translation are written directly.
    translator: Option<Arc<Mqtt5Translator>>,
    counters: WriteCounters,
}

/// What a session's writes are counted in.
#[derive(Debug, Clone)]
pub struct WriteCounters {
    pub messages_out: IntCounter,
    pub bytes_out: IntCounter,
    /// Writes by the delivering task.
    pub direct: IntCounter,
    /// Writes by the session's writer.
    pub queued: IntCounter,
}

impl WriteCounters {
    fn count(&self, path: &IntCounter, bytes: &Bytes) {
        self.messages_out.inc();
        self.bytes_out.inc_by(bytes.len() as u64);
        path.inc();
    }
}

impl<K> std::fmt::Debug for SessionSocket<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSocket")
            .field("mqtt5", &self.translator.is_some())
            .finish_non_exhaustive()
    }
}

impl<K> SessionSocket<K>
where
    K: Sink<Message, Error = WsError> + Unpin,
{
    pub fn new(
        sink: K,
        translator: Option<Arc<Mqtt5Translator>>,
        counters: WriteCounters,
    ) -> SessionSocket<K> {
        SessionSocket {
            sink: Mutex::new(sink),
            translator,
            counters,
        }
    }

    fn lock(&self) -> MutexGuard<'_, K> {
        // Nothing panics while holding it; a poisoned sink is as usable as
        // the socket under it.
        self.sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one MQTT message to the client (counted), and flushes.
    pub async fn send_counted(&self, bytes: Bytes) -> Result<(), WsError> {
        self.counters.count(&self.counters.queued, &bytes);
        self.send(Message::Binary(bytes)).await
    }

    /// Sends one message, and flushes. The lock is taken for each poll,
    /// never held across a wait.
    pub async fn send(&self, message: Message) -> Result<(), WsError> {
        let mut message = Some(message);
        std::future::poll_fn(|cx| {
            let mut sink = self.lock();
            if message.is_some() {
                ready!(sink.poll_ready_unpin(cx))?;
                if let Some(message) = message.take() {
                    sink.start_send_unpin(message)?;
                }
            }
            sink.poll_flush_unpin(cx)
        })
        .await
    }

    /// Flushes what is buffered (what a direct write left).
    pub async fn flush(&self) -> Result<(), WsError> {
        std::future::poll_fn(|cx| self.lock().poll_flush_unpin(cx)).await
    }

    /// Flushes and closes the sending half.
    pub async fn close(&self) -> Result<(), WsError> {
        std::future::poll_fn(|cx| self.lock().poll_close_unpin(cx)).await
    }
}

impl<K> DirectWriter for SessionSocket<K>
where
    K: Sink<Message, Error = WsError> + Unpin + Send,
{
    fn write_now(&self, item: &Outbound) -> WriteNow {
        let bytes = match (item, &self.translator) {
            (Outbound::Bytes(bytes) | Outbound::Direct(bytes), None) => bytes,
            (Outbound::Direct(bytes), Some(_)) => bytes,
            (Outbound::Publish5(bytes), Some(translator)) if translator.fits(bytes.len()) => bytes,
            // Translated (or refused, or a close) by the session's writer.
            _ => return WriteNow::NotNow,
        };
        // A task that used up its turn's budget (tokio's cooperative
        // scheduling: a hub delivering to hundreds of sessions in one
        // poll) would find the socket "not ready" half-way through a
        // write and wake the session anyway; the queue is cheaper then.
        if !tokio::task::coop::has_budget_remaining() {
            return WriteNow::NotNow;
        }
        let Ok(mut sink) = self.sink.try_lock() else {
            return WriteNow::NotNow;
        };
        // Nobody is woken by this context: when the socket would block,
        // the session's writer is told to flush, with its own waker.
        let mut cx = Context::from_waker(Waker::noop());
        match sink.poll_ready_unpin(&mut cx) {
            Poll::Ready(Ok(())) => {}
            // Still flushing (the writer is told so already), or broken
            // (the writer finds out).
            Poll::Pending | Poll::Ready(Err(_)) => return WriteNow::NotNow,
        }
        self.counters.count(&self.counters.direct, bytes);
        if sink
            .start_send_unpin(Message::Binary(bytes.clone()))
            .is_err()
        {
            // The socket is gone; the writer's flush ends the session.
            return WriteNow::Unflushed;
        }
        match sink.poll_flush_unpin(&mut cx) {
            Poll::Ready(Ok(())) => WriteNow::Written,
            Poll::Pending | Poll::Ready(Err(_)) => WriteNow::Unflushed,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::sink;

    fn socket() -> SessionSocket<impl Sink<Message, Error = WsError> + Unpin + Send> {
        let counter = |name: &str| IntCounter::new(name, "test").unwrap();
        SessionSocket::new(
            sink::drain().sink_map_err(|never| match never {}),
            None,
            WriteCounters {
                messages_out: counter("messages"),
                bytes_out: counter("bytes"),
                direct: counter("direct"),
                queued: counter("queued"),
            },
        )
    }

    #[tokio::test]
    async fn a_task_that_used_up_its_budget_leaves_the_write_to_the_queue() {
        let socket = socket();
        let report = Outbound::Bytes(Bytes::from_static(b"report"));
        assert_eq!(socket.write_now(&report), WriteNow::Written);
        // Each ready receive takes one unit of the task's budget.
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1_000 {
            sender.send(()).unwrap();
        }
        while tokio::task::coop::has_budget_remaining() {
            receiver.recv().await;
        }
        assert_eq!(socket.write_now(&report), WriteNow::NotNow);
        assert_eq!(socket.counters.direct.get(), 1);
    }

    #[tokio::test]
    async fn what_needs_translating_or_closing_is_left_to_the_writer() {
        let socket = socket();
        assert_eq!(
            socket.write_now(&Outbound::Publish5(Bytes::from_static(b"v5"))),
            WriteNow::NotNow
        );
        assert_eq!(
            socket.write_now(&Outbound::Close(crate::close::Close::normal())),
            WriteNow::NotNow
        );
    }
}
