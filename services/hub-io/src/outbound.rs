//! A session's outbound queue: what its hub (and the session itself) has
//! for the client, bounded in bytes, drained by the session's writer.

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
}

impl Outbound {
    /// Bytes it holds against the budget.
    fn len(&self) -> usize {
        match self {
            Outbound::Bytes(bytes)
            | Outbound::Direct(bytes)
            | Outbound::Refusal(bytes)
            | Outbound::Publish5(bytes) => bytes.len(),
            Outbound::Close(_) => 0,
        }
    }
}

/// A session's outbound queue: a deque under a lock and a wake-up for the
/// writer. Lighter than a channel (which allocates a 32-slot block and a
/// padded header, about 1.8 KiB, per session up front): an idle session
/// holds a few hundred bytes here.
#[derive(Debug, Default)]
struct OutboundQueue {
    items: std::sync::Mutex<VecDeque<Outbound>>,
    /// Wakes the writer (a stored permit if it is not waiting yet).
    ready: Notify,
    /// Bytes queued, charged before queueing.
    queued: AtomicUsize,
    /// Live senders; the writer sees the end once none is left.
    senders: AtomicUsize,
    /// The writer is gone: sending fails.
    closed: AtomicBool,
}

impl OutboundQueue {
    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<Outbound>> {
        // No code panics while holding the lock; a poisoned lock still
        // holds a consistent deque.
        self.items
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, item: Outbound) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        self.items().push_back(item);
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
        self.queue.items().clear();
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
            let mut items = self.queue.items();
            let dropped: usize = items.iter().map(Outbound::len).sum();
            items.clear();
            self.queue.queued.fetch_sub(dropped, Ordering::SeqCst);
            items.push_back(Outbound::Close(close));
            drop(items);
            self.queue.ready.notify_one();
        }
        self.ended.cancel();
    }
}

impl OutboundReceiver {
    /// The close the session was ended with, if one is still queued (its
    /// writer never got to it); what is queued before it is dropped.
    pub fn take_close(&mut self) -> Option<Close> {
        let mut items = self.queue.items();
        while let Some(item) = items.pop_front() {
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
            if let Some(item) = self.queue.items().pop_front() {
                self.queue.queued.fetch_sub(item.len(), Ordering::SeqCst);
                return Some(item);
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
