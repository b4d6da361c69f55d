//! A session's outbound queue: what its hub (and the session itself) has
//! for the client, bounded in bytes, drained by the session's writer.
//!
//! A session may also give its queue a [`DirectWriter`]: while nothing is
//! queued and its writer is idle, what is sent is written into the
//! client's socket at once by the task that has it (the hub's, mostly),
//! and the session's own task is not woken. Only when the socket would
//! block does the writer take over (an [`Outbound::Flush`] is queued).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use relay_proto::mqtt::{self, Packet};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use relay_hub::close::Close;
use relay_hub::state::SessionSink;

/// What a session receives from its hub, in order.
#[derive(Debug)]
pub enum Outbound {
    /// Encoded MQTT 3.1.1 bytes for the client (an MQTT 5 session's writer
    /// translates them).
    Bytes(Bytes),
    /// Bytes already in the client's own protocol (the session's answers
    /// of its own: CONNACK, PINGRESP, v5 SUBACKs), sent as they are.
    Direct(Bytes),
    /// The hub's MQTT 5 PUBACK or PUBREC refusing one of the client's
    /// PUBLISHes: sent as it is, and it answers that PUBLISH.
    Refusal(Bytes),
    /// A QoS 0 PUBLISH the hub encoded once as MQTT 5 for every MQTT 5
    /// session it goes to: sent as it is (unless over the client's
    /// Maximum Packet Size).
    Publish5(Bytes),
    /// End the session with this close.
    Close(Close),
    /// Bytes written by a [`DirectWriter`] wait in the socket's buffer
    /// (the socket would have blocked): the writer flushes them.
    Flush,
}

/// How a [`DirectWriter`] dealt with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteNow {
    /// Written into the socket, and flushed.
    Written,
    /// Taken, but not all flushed: the socket would block (or failed, which
    /// the session's writer then finds out). The writer must flush.
    Unflushed,
    /// Not taken (the socket is not ready, or the item needs the session's
    /// writer): it is queued as usual.
    NotNow,
}

/// Writes a session's items into its client's socket from whichever task
/// has them, without waiting: a non-blocking attempt. Implemented by the
/// session over its socket's sending half.
pub trait DirectWriter: Send + Sync {
    /// Writes `item` now if the socket takes it without waiting.
    fn write_now(&self, item: &Outbound) -> WriteNow;
}

impl Outbound {
    /// Bytes it holds against the budget.
    fn len(&self) -> usize {
        match self {
            Outbound::Bytes(bytes)
            | Outbound::Direct(bytes)
            | Outbound::Refusal(bytes)
            | Outbound::Publish5(bytes) => bytes.len(),
            Outbound::Close(_) | Outbound::Flush => 0,
        }
    }
}

/// A session's outbound queue: a deque under a lock and a wake-up for the
/// writer. Lighter than a channel (which allocates a 32-slot block and a
/// padded header, about 1.8 KiB, per session up front): an idle session
/// holds a few hundred bytes here.
#[derive(Default)]
struct OutboundQueue {
    state: std::sync::Mutex<QueueState>,
    /// Wakes the writer (a stored permit if it is not waiting yet).
    ready: Notify,
    /// Bytes queued, charged before queueing.
    queued: AtomicUsize,
    /// Live senders; the writer sees the end once none is left.
    senders: AtomicUsize,
    /// The writer is gone: sending fails.
    closed: AtomicBool,
}

/// What the queue's lock guards.
#[derive(Default)]
struct QueueState {
    items: VecDeque<Outbound>,
    /// The writer took an item and has not finished writing it: nothing
    /// may be written past it.
    writer_busy: bool,
    /// Writes into the client's socket when the queue is empty and the
    /// writer idle; dropped with the receiver.
    direct: Option<Arc<dyn DirectWriter>>,
}

impl std::fmt::Debug for OutboundQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboundQueue")
            .field("queued", &self.queued)
            .field("senders", &self.senders)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl OutboundQueue {
    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // No code panics while holding the lock; a poisoned lock still
        // holds a consistent deque.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, item: Outbound) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        self.state().items.push_back(item);
        self.ready.notify_one();
        true
    }
}

/// The sending half of a session's outbound queue, with its byte budget.
/// The queue itself has no count limit, but every byte in it is charged to
/// `queued` first and nothing is queued past `limit`: a session's memory is
/// bounded by bytes, which is what matters.
#[derive(Debug)]
pub struct OutboundSender {
    queue: Arc<OutboundQueue>,
    limit: usize,
    /// Cancelled when the session must end (slow consumer, hub gone).
    ended: CancellationToken,
}

impl Clone for OutboundSender {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::SeqCst);
        OutboundSender {
            queue: self.queue.clone(),
            limit: self.limit,
            ended: self.ended.clone(),
        }
    }
}

impl Drop for OutboundSender {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.queue.ready.notify_one();
        }
    }
}

/// The receiving half, owned by the session's writer.
#[derive(Debug)]
pub struct OutboundReceiver {
    queue: Arc<OutboundQueue>,
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::SeqCst);
        let mut state = self.queue.state();
        state.items.clear();
        state.direct = None;
    }
}

/// A bounded outbound queue for one session.
pub fn outbound_queue(limit: usize) -> (OutboundSender, OutboundReceiver, CancellationToken) {
    let queue = Arc::new(OutboundQueue {
        senders: AtomicUsize::new(1),
        ..OutboundQueue::default()
    });
    let ended = CancellationToken::new();
    (
        OutboundSender {
            queue: queue.clone(),
            limit,
            ended: ended.clone(),
        },
        OutboundReceiver { queue },
        ended,
    )
}

impl OutboundSender {
    /// Queues bytes for the client. Returns false, queueing nothing, when
    /// they do not fit the budget or the writer is gone.
    pub fn send_bytes(&self, bytes: Bytes) -> bool {
        self.send(Outbound::Bytes(bytes))
    }

    /// Queues bytes in the client's own protocol, sent untranslated.
    pub fn send_direct(&self, bytes: Bytes) -> bool {
        self.send(Outbound::Direct(bytes))
    }

    fn send(&self, item: Outbound) -> bool {
        if self.write_directly(&item) {
            return true;
        }
        let len = item.len();
        let queued = &self.queue.queued;
        let before = queued.fetch_add(len, Ordering::SeqCst);
        if before + len > self.limit {
            queued.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        if !self.queue.push(item) {
            queued.fetch_sub(len, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Writes `item` into the client's socket at once when the session
    /// gave a [`DirectWriter`], nothing is queued, the writer is idle and
    /// the socket takes it; true when it was taken.
    fn write_directly(&self, item: &Outbound) -> bool {
        if self.queue.closed.load(Ordering::SeqCst) || self.ended.is_cancelled() {
            return false;
        }
        // Held while writing: the writer cannot take an item meanwhile,
        // so nothing is written out of order.
        let mut state = self.queue.state();
        if !state.items.is_empty() || state.writer_busy {
            return false;
        }
        let Some(direct) = &state.direct else {
            return false;
        };
        match direct.write_now(item) {
            WriteNow::Written => true,
            WriteNow::Unflushed => {
                state.items.push_back(Outbound::Flush);
                drop(state);
                self.queue.ready.notify_one();
                true
            }
            WriteNow::NotNow => false,
        }
    }

    /// Gives the queue a way to write into the client's socket from the
    /// sender's task (see [`DirectWriter`]).
    pub fn write_directly_with(&self, direct: Arc<dyn DirectWriter>) {
        if !self.queue.closed.load(Ordering::SeqCst) {
            self.queue.state().direct = Some(direct);
        }
    }

    /// Encodes and queues a packet.
    pub fn send_packet(&self, packet: &Packet) -> bool {
        let mut bytes = BytesMut::new();
        match mqtt::encode(packet, &mut bytes) {
            Ok(()) => self.send_bytes(bytes.freeze()),
            Err(error) => {
                tracing::error!(%error, "cannot encode a packet for a client");
                false
            }
        }
    }

    /// Whether the session was ended (it may still be saying goodbye).
    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Ends the session: the close goes after what is queued, and the
    /// session's reader stops at once.
    pub fn end(&self, close: Close) {
        let _ = self.queue.push(Outbound::Close(close));
        self.ended.cancel();
    }

    /// Ends the session at once: what is queued is dropped (and its bytes
    /// released), and the close is next.
    pub fn abandon(&self, close: Close) {
        if !self.queue.closed.load(Ordering::SeqCst) {
            let mut state = self.queue.state();
            let dropped: usize = state.items.iter().map(Outbound::len).sum();
            state.items.clear();
            self.queue.queued.fetch_sub(dropped, Ordering::SeqCst);
            state.items.push_back(Outbound::Close(close));
            drop(state);
            self.queue.ready.notify_one();
        }
        self.ended.cancel();
    }
}

impl OutboundReceiver {
    /// The close the session was ended with, if one is still queued (its
    /// writer never got to it); what is queued before it is dropped.
    pub fn take_close(&mut self) -> Option<Close> {
        let mut state = self.queue.state();
        while let Some(item) = state.items.pop_front() {
            self.queue.queued.fetch_sub(item.len(), Ordering::SeqCst);
            if let Outbound::Close(close) = item {
                return Some(close);
            }
        }
        None
    }

    /// The next item; `None` once every sender is gone and the queue is
    /// empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            let notified = self.queue.ready.notified();
            {
                let mut state = self.queue.state();
                if let Some(item) = state.items.pop_front() {
                    // Busy until it asks for the next one.
                    state.writer_busy = true;
                    self.queue.queued.fetch_sub(item.len(), Ordering::SeqCst);
                    return Some(item);
                }
                state.writer_busy = false;
            }
            if self.queue.senders.load(Ordering::SeqCst) == 0 {
                return None;
            }
            // A push between the check and here left a permit: no wake-up
            // is lost (one receiver, `notify_one`).
            notified.await;
        }
    }
}

impl SessionSink for OutboundSender {
    fn deliver(&self, bytes: Bytes) -> bool {
        self.send_bytes(bytes)
    }

    /// Only MQTT 5 sessions are asked: the answer is in their protocol.
    fn refuse_publish(
        &self,
        packet_id: relay_proto::mqtt::PacketId,
        qos: relay_proto::mqtt::QoS,
        why: relay_hub::state::PublishRefused,
    ) -> bool {
        use relay_proto::mqtt5::{self, Ack, Properties, Property, ReasonCode};
        let (reason, text) = match why {
            relay_hub::state::PublishRefused::NotAuthorized => {
                (ReasonCode::NOT_AUTHORIZED, "refused by the device's policy")
            }
            relay_hub::state::PublishRefused::QuotaExceeded => (
                ReasonCode::QUOTA_EXCEEDED,
                "publishing faster than the printer takes",
            ),
        };
        let ack = Ack {
            packet_id,
            reason,
            properties: Properties::new().with(Property::ReasonString(text.into())),
        };
        let packet = match qos {
            relay_proto::mqtt::QoS::ExactlyOnce => mqtt5::Packet::PubRec(ack),
            _ => mqtt5::Packet::PubAck(ack),
        };
        let mut bytes = BytesMut::new();
        if mqtt5::encode(&packet, &mut bytes).is_err() {
            return false;
        }
        self.send(Outbound::Refusal(bytes.freeze()))
    }

    fn deliver_mqtt5(&self, bytes: Bytes) -> bool {
        self.send(Outbound::Publish5(bytes))
    }

    fn end(&self, close: Close) {
        OutboundSender::end(self, close);
    }

    fn abandon(&self, close: Close) {
        OutboundSender::abandon(self, close);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A socket that takes what it is told to, and records it.
    #[derive(Default)]
    struct Socket {
        answer: std::sync::Mutex<Option<WriteNow>>,
        written: std::sync::Mutex<Vec<Bytes>>,
    }

    impl Socket {
        fn answering(answer: WriteNow) -> Arc<Socket> {
            Arc::new(Socket {
                answer: std::sync::Mutex::new(Some(answer)),
                ..Socket::default()
            })
        }

        fn written(&self) -> Vec<Bytes> {
            self.written.lock().unwrap().clone()
        }
    }

    impl DirectWriter for Socket {
        fn write_now(&self, item: &Outbound) -> WriteNow {
            let answer = self.answer.lock().unwrap().unwrap_or(WriteNow::NotNow);
            if let (Outbound::Bytes(bytes), WriteNow::Written | WriteNow::Unflushed) =
                (item, answer)
            {
                self.written.lock().unwrap().push(bytes.clone());
            }
            answer
        }
    }

    fn bytes(text: &'static str) -> Bytes {
        Bytes::from_static(text.as_bytes())
    }

    #[test]
    fn an_idle_sessions_delivery_is_written_at_once_and_nothing_is_queued() {
        let (sender, mut receiver, _ended) = outbound_queue(1024);
        let socket = Socket::answering(WriteNow::Written);
        sender.write_directly_with(socket.clone());
        assert!(sender.send_bytes(bytes("one")));
        assert_eq!(socket.written(), vec![bytes("one")]);
        assert_eq!(sender.queue.queued.load(Ordering::SeqCst), 0);
        assert!(receiver.recv().now_or_never().is_none(), "nothing queued");
    }

    #[test]
    fn a_delivery_behind_queued_items_waits_its_turn() {
        let (sender, mut receiver, _ended) = outbound_queue(1024);
        assert!(sender.send_bytes(bytes("first")));
        let socket = Socket::answering(WriteNow::Written);
        sender.write_directly_with(socket.clone());
        assert!(sender.send_bytes(bytes("second")));
        assert!(socket.written().is_empty(), "written past a queued item");
        let first = receiver.recv().now_or_never().flatten();
        assert!(matches!(first, Some(Outbound::Bytes(b)) if b == bytes("first")));
        // The writer holds "first" (it has not asked again): still queued.
        assert!(sender.send_bytes(bytes("third")));
        assert!(
            socket.written().is_empty(),
            "written past the writer's item"
        );
        let second = receiver.recv().now_or_never().flatten();
        assert!(matches!(second, Some(Outbound::Bytes(b)) if b == bytes("second")));
        let third = receiver.recv().now_or_never().flatten();
        assert!(matches!(third, Some(Outbound::Bytes(b)) if b == bytes("third")));
        // The writer is idle again: the next goes straight out.
        assert!(receiver.recv().now_or_never().is_none());
        assert!(sender.send_bytes(bytes("fourth")));
        assert_eq!(socket.written(), vec![bytes("fourth")]);
    }

    #[test]
    fn a_socket_that_would_block_hands_the_flush_to_the_writer() {
        let (sender, mut receiver, _ended) = outbound_queue(1024);
        let socket = Socket::answering(WriteNow::Unflushed);
        sender.write_directly_with(socket.clone());
        assert!(sender.send_bytes(bytes("one")));
        assert!(matches!(
            receiver.recv().now_or_never().flatten(),
            Some(Outbound::Flush)
        ));
        // Until the writer asks again, the next is queued behind the flush.
        assert!(sender.send_bytes(bytes("two")));
        assert_eq!(socket.written(), vec![bytes("one")]);
        assert_eq!(sender.queue.queued.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn what_the_socket_does_not_take_is_queued_within_the_budget() {
        let (sender, mut receiver, _ended) = outbound_queue(4);
        sender.write_directly_with(Socket::answering(WriteNow::NotNow));
        assert!(sender.send_bytes(bytes("four")));
        assert!(!sender.send_bytes(bytes("five!")), "over the budget");
        let item = receiver.recv().now_or_never().flatten();
        assert!(matches!(item, Some(Outbound::Bytes(b)) if b == bytes("four")));
    }

    #[test]
    fn an_ended_session_is_not_written_to_and_lets_its_socket_go() {
        let (sender, receiver, _ended) = outbound_queue(1024);
        let socket = Socket::answering(WriteNow::Written);
        sender.write_directly_with(socket.clone());
        sender.end(Close::normal());
        assert!(sender.send_bytes(bytes("late")));
        assert!(socket.written().is_empty());
        drop(receiver);
        assert!(!sender.send_bytes(bytes("later")));
        assert_eq!(Arc::strong_count(&socket), 1, "the queue still holds it");
    }
}
