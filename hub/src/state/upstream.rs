//! The upstream connection: bytes queued for it, upstream packet ids, QoS 1
//! PUBLISHes awaiting the broker's PUBACK, PINGREQs and their deadline.

use super::*;

impl<S: SessionSink> HubState<S> {
    pub(super) fn queue_upstream(&mut self, packet: &Packet) {
        if self.lost_until.is_some() {
            // No upstream: what must survive is redone on resume.
            return;
        }
        // Every packet the hub builds is within MQTT's limits: its parts
        // were decoded from packets that were.
        let _ = mqtt::encode(packet, &mut self.to_upstream);
    }

    pub(super) fn ping_upstream(&mut self, closes_replay: Option<PacketId>, now: Instant) {
        if self.lost_until.is_some() || self.pings_in_flight.len() >= MAX_PINGS_IN_FLIGHT {
            // Bounded: a printer that answers none is found silent by the
            // oldest; a replay without its ping is forgotten in time.
            return;
        }
        self.queue_upstream(&Packet::PingReq);
        self.pings_in_flight.push_back((now, closes_replay));
    }

    pub(super) fn allocate_upstream_id(&mut self) -> Option<PacketId> {
        if self.pending.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            self.next_upstream_id = self.next_upstream_id.checked_add(1).unwrap_or(1);
            let id = PacketId::new(self.next_upstream_id)?;
            if !self.pending.contains_key(&id) {
                return Some(id);
            }
        }
    }

    /// Sends a PUBLISH upstream: QoS 0 as it is, QoS 1 and 2 as QoS 1 with
    /// an upstream packet id (QoS 2 completes at the edge).
    pub(super) fn publish_upstream(
        &mut self,
        origin: Option<(SessionId, PacketId)>,
        mut publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        publish.dup = false;
        if publish.retain {
            self.note_retained(&publish.topic, publish.payload.is_empty());
        }
        if publish.qos == QoS::AtMostOnce {
            if self.lost_until.is_some() {
                self.counters.throttled_publishes += 1;
                return;
            }
            publish.packet_id = None;
            self.queue_upstream(&Packet::Publish(publish));
            return;
        }
        let Some(id) = self.allocate_upstream_id() else {
            return;
        };
        let exactly_once = publish.qos == QoS::ExactlyOnce;
        publish.qos = QoS::AtLeastOnce;
        publish.packet_id = Some(id);
        let sent = self.lost_until.is_none();
        self.queue_upstream(&Packet::Publish(publish.clone()));
        let order = self.next_publish_order;
        self.next_publish_order += 1;
        self.pending.insert(
            id,
            Pending::Publish {
                origin,
                exactly_once,
                publish: Box::new(publish),
                order,
                sent,
                expires_at,
                sent_at: sent.then_some(now),
                suspect: false,
            },
        );
    }

    pub(super) fn on_upstream_puback(&mut self, id: PacketId, now: Instant) {
        let acknowledged = self.pending.remove(&id);
        self.advance_trials(now);
        let Some(Pending::Publish {
            origin: Some((session, client_packet_id)),
            exactly_once,
            ..
        }) = acknowledged
        else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
        let answer = if exactly_once {
            entry.exactly_once.insert(client_packet_id, true);
            Packet::PubRec(client_packet_id)
        } else {
            Packet::PubAck(client_packet_id)
        };
        self.send_to(session, &answer, now);
    }

    pub(super) fn pingresp_deadline(&self) -> Duration {
        self.config
            .pingresp_deadline
            .unwrap_or(self.config.upstream_keep_alive.mul_f64(1.5))
    }

    /// When the oldest PINGREQ in flight is past its deadline.
    pub(super) fn pingresp_due(&self) -> Option<Instant> {
        self.pings_in_flight
            .front()
            .map(|(sent, _)| *sent + self.pingresp_deadline())
    }

    /// The watchdogs: a PINGREQ unanswered past its deadline ends the
    /// upstream as silent; then the profile's own watchdogs.
    pub(super) fn watch_for_silence(&mut self, now: Instant) {
        if self.pingresp_due().is_some_and(|due| now >= due) {
            self.counters.silent_pingresp += 1;
            self.end
                .get_or_insert(HubEnd::UpstreamSilent(Silence::NoPingResp));
            return;
        }
        let mut out = ProfileOutput {
            actions: &mut self.profile_actions,
            counters: &mut self.counters,
        };
        self.profile
            .hooks_mut()
            .watch(&self.upstream_filters, now, &mut out);
        self.run_profile_actions(now);
    }

    /// Bytes waiting to be written upstream, oldest first.
    pub fn upstream_pending(&self) -> &[u8] {
        &self.to_upstream
    }

    /// The driver wrote the first `written` bytes of
    /// [`Self::upstream_pending`].
    pub fn upstream_written(&mut self, written: usize) {
        let _ = self
            .to_upstream
            .split_to(written.min(self.to_upstream.len()));
    }
}
