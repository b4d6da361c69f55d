//! An MQTT 5 session's translator, shared by its reader and writer (one
//! task): [`relay_hub::mqtt5_session::V5Session`]'s rules, plus the wait
//! that holds a QoS 1 delivery while the client has its Receive Maximum of
//! them unacknowledged. The edge's sessions and the agent's LAN sessions
//! use it alike.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use relay_hub::close::Close;
use relay_hub::mqtt5_session::{Inbound, V5Session};
use relay_proto::mqtt::{self, Packet};
use relay_proto::mqtt5;
use tokio::sync::Notify;

use crate::Outbound;

/// One MQTT 5 session's translation state and its acknowledgement wake-up.
#[derive(Debug)]
pub struct Mqtt5Translator {
    session: Mutex<V5Session>,
    /// Wakes the writer when the client acknowledges a delivery.
    acknowledged: Notify,
}

impl Mqtt5Translator {
    pub fn new(session: V5Session) -> Mqtt5Translator {
        Mqtt5Translator {
            session: Mutex::new(session),
            acknowledged: Notify::new(),
        }
    }

    /// The reader and the writer run in one task: the lock is never
    /// contended; a poisoned one still holds consistent counts.
    fn lock(&self) -> std::sync::MutexGuard<'_, V5Session> {
        self.session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether an MQTT 5 packet of `len` bytes fits the client's Maximum
    /// Packet Size.
    pub fn fits(&self, len: usize) -> bool {
        self.lock().fits(len)
    }

    /// A packet from the client, as the hub's (see [`V5Session::inbound`]).
    pub fn inbound(&self, packet: mqtt5::Packet) -> Result<Inbound, Close> {
        let inbound = self.lock().inbound(packet);
        if let Ok(Inbound::Neutral(Packet::PubAck(_), _)) = &inbound {
            self.acknowledged.notify_one();
        }
        inbound
    }

    /// The bytes to send the client for one queued item other than a
    /// close; `None`: nothing to send. A QoS 1 delivery waits here while
    /// the client holds its Receive Maximum of them unacknowledged.
    pub async fn outbound(&self, item: Outbound) -> Option<Bytes> {
        match item {
            // A flush is the writer's own business, not bytes.
            Outbound::Close(_) | Outbound::Flush => None,
            Outbound::Direct(bytes) => Some(bytes),
            // The hub's refusal of one of the client's PUBLISHes answers
            // it, as a PUBACK passing through would.
            Outbound::Refusal(bytes) => {
                self.lock().answered();
                Some(bytes)
            }
            Outbound::Publish5(bytes) => self.fits(bytes.len()).then_some(bytes),
            Outbound::Bytes(bytes) => self.translate(bytes).await,
        }
    }

    /// The hub's 3.1.1 bytes, as MQTT 5.
    async fn translate(&self, bytes: Bytes) -> Option<Bytes> {
        let mut buffer = BytesMut::from(&bytes[..]);
        let mut out = BytesMut::new();
        while let Ok(Some(packet)) = mqtt::decode(&mut buffer, usize::MAX) {
            let delivery =
                matches!(&packet, Packet::Publish(publish) if publish.qos != mqtt::QoS::AtMostOnce);
            if delivery {
                loop {
                    let notified = self.acknowledged.notified();
                    if self.lock().may_deliver() {
                        break;
                    }
                    notified.await;
                }
            }
            let translated = self.lock().outbound(packet);
            if let Some(packet) = translated
                && mqtt5::encode(&packet, &mut out).is_err()
            {
                tracing::warn!("a packet for an MQTT 5 client did not encode");
            }
        }
        (!out.is_empty()).then(|| out.freeze())
    }
}
