//! A client's PUBLISH on its way to the printer: the policy, the profile,
//! the session's QoS 1 and 2 flow, and the device's publish rate.

use super::*;

impl<S: SessionSink> HubState<S> {
    pub(super) fn on_client_publish(
        &mut self,
        session: SessionId,
        publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        if self
            .config
            .policy
            .check_publish(&publish.topic, publish.retain)
            .is_err()
        {
            // Acknowledged and dropped, as a broker's ACL does (an MQTT 5
            // client hears 0x87 in its PUBACK).
            self.counters.refused_publishes += 1;
            if let Some(id) = publish.packet_id {
                self.refuse_publish(session, id, publish.qos, PublishRefused::NotAuthorized, now);
            }
            return;
        }
        if self
            .publisher_of(session)
            .is_some_and(|publisher| self.quarantine.refuses_publisher(&publisher, now))
        {
            // Its PUBLISHes ended the upstream twice.
            self.counters.refused_publishes += 1;
            self.counters.quarantine_dropped_publishes += 1;
            if let Some(id) = publish.packet_id {
                self.refuse_publish(session, id, publish.qos, PublishRefused::NotAuthorized, now);
            }
            return;
        }
        if self
            .sessions
            .get(&session)
            .is_some_and(|entry| entry.no_local.is_some())
        {
            self.remember_own(session, &publish, now);
        }
        let mut out = ProfileOutput {
            actions: &mut self.profile_actions,
            counters: &mut self.counters,
        };
        let taken = self
            .profile
            .hooks_mut()
            .on_app_publish(session, &publish, now, &mut out);
        self.run_profile_actions(now);
        match taken {
            AppPublish::NotMine | AppPublish::Forward => {}
            AppPublish::Refused => {
                self.counters.refused_publishes += 1;
                if let Some(id) = publish.packet_id {
                    let why = PublishRefused::NotAuthorized;
                    self.refuse_publish(session, id, publish.qos, why, now);
                }
                return;
            }
            AppPublish::Taken => {
                match (publish.qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => self.send_to(session, &Packet::PubAck(id), now),
                    (QoS::ExactlyOnce, Some(id)) => self.send_to(session, &Packet::PubRec(id), now),
                    _ => {}
                }
                return;
            }
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(client_packet_id) = publish.packet_id else {
            if self.over_rate.is_empty() && self.take_publish_token(now) {
                self.publish_upstream(None, publish, None, now);
                self.last_qos0 = Some((now, session));
            } else {
                self.counters.throttled_publishes += 1;
            }
            return;
        };
        if publish.qos == QoS::ExactlyOnce {
            match entry.exactly_once.get(&client_packet_id) {
                // A re-sent PUBLISH already acknowledged: PUBREC again.
                Some(true) => {
                    self.send_to(session, &Packet::PubRec(client_packet_id), now);
                    return;
                }
                // Still with the printer: its PUBREC follows.
                Some(false) => return,
                None => {}
            }
        }
        if entry.unacknowledged >= entry.max_unacknowledged {
            let limit = entry.max_unacknowledged;
            self.end_session(
                session,
                Close::limit(&format!("more than {limit} unacknowledged publishes")),
                now,
            );
            return;
        }
        if self.pending.len() >= usize::from(u16::MAX) {
            self.end_session(session, Close::limit("hub busy"), now);
            return;
        }
        if let Some(entry) = self.sessions.get_mut(&session) {
            entry.unacknowledged += 1;
            if publish.qos == QoS::ExactlyOnce {
                entry.exactly_once.insert(client_packet_id, false);
            }
        }
        self.publish_within_rate(Some((session, client_packet_id)), publish, expires_at, now);
    }

    /// Takes one publish token.
    pub(super) fn take_publish_token(&mut self, now: Instant) -> bool {
        let rate = self.config.publish_rate;
        self.publish_bucket
            .take(f64::from(rate.per_second), rate.burst, now)
    }

    /// Sends what waited for the rate, as far as the rate allows now.
    pub(super) fn release_over_rate(&mut self, now: Instant) {
        while !self.over_rate.is_empty() && self.take_publish_token(now) {
            let Some((origin, publish, expires_at)) = self.over_rate.pop_front() else {
                break;
            };
            if let Some((session, _)) = origin {
                match self.sessions.get_mut(&session) {
                    Some(entry) => {
                        entry.waiting_for_rate = entry.waiting_for_rate.saturating_sub(1)
                    }
                    // Its session is gone; the token is given back.
                    None => {
                        self.publish_bucket.give_back();
                        continue;
                    }
                }
            }
            if expires_at.is_some_and(|at| now >= at) {
                // Expired while it waited: dropped, its flow completed.
                self.publish_bucket.give_back();
                self.counters.expired_publishes += 1;
                self.complete_dropped(origin, publish.qos, now);
                continue;
            }
            self.publish_upstream(origin, publish, expires_at, now);
        }
    }

    /// Publishes a will within the rate: QoS 0 only if a token is there.
    pub(super) fn publish_will(&mut self, will: Publish, now: Instant) {
        if will.qos != QoS::AtMostOnce {
            self.publish_within_rate(None, will, None, now);
        } else if self.over_rate.is_empty() && self.take_publish_token(now) {
            self.publish_upstream(None, will, None, now);
        } else {
            self.counters.throttled_publishes += 1;
        }
    }

    /// Sends a client's QoS 1 or 2 PUBLISH upstream within the rate, or
    /// queues it (its acknowledgement waits); a session past its share of
    /// the queue is cut.
    pub(super) fn publish_within_rate(
        &mut self,
        origin: Option<(SessionId, PacketId)>,
        publish: Publish,
        expires_at: Option<Instant>,
        now: Instant,
    ) {
        if self.over_rate.is_empty() && self.take_publish_token(now) {
            self.publish_upstream(origin, publish, expires_at, now);
            return;
        }
        if let Some((session, client_packet_id)) = origin {
            let max = self.config.publish_rate.max_waiting_per_session;
            let Some(entry) = self.sessions.get_mut(&session) else {
                return;
            };
            if entry.waiting_for_rate as usize >= max && entry.mqtt5 {
                // An MQTT 5 client hears it in the PUBACK and goes on.
                entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
                entry.exactly_once.remove(&client_packet_id);
                self.counters.throttled_publishes += 1;
                self.refuse_publish(
                    session,
                    client_packet_id,
                    publish.qos,
                    PublishRefused::QuotaExceeded,
                    now,
                );
                return;
            }
            if entry.waiting_for_rate as usize >= max {
                self.counters.rate_cuts += 1;
                let per_second = self.config.publish_rate.per_second;
                self.end_session(
                    session,
                    Close::limit(&format!(
                        "publishing faster than the printer takes ({per_second} a second)"
                    )),
                    now,
                );
                return;
            }
            entry.waiting_for_rate += 1;
        } else if self.over_rate.len() >= MAX_WAITING_WILLS {
            // Wills of sessions already gone, past the bound: dropped.
            self.counters.throttled_publishes += 1;
            return;
        }
        self.over_rate.push_back((origin, publish, expires_at));
    }

    /// Tells a session its PUBLISH was refused: an MQTT 5 session in its
    /// PUBACK (or PUBREC), a 3.1.1 session by a plain acknowledgement (as
    /// a broker's ACL does).
    pub(super) fn refuse_publish(
        &mut self,
        session: SessionId,
        packet_id: PacketId,
        qos: QoS,
        why: PublishRefused,
        now: Instant,
    ) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        let delivered = if entry.mqtt5 {
            entry.sink.refuse_publish(packet_id, qos, why)
        } else {
            entry.sink.deliver(encode(&match qos {
                QoS::ExactlyOnce => Packet::PubRec(packet_id),
                _ => Packet::PubAck(packet_id),
            }))
        };
        if !delivered {
            self.cut_slow_consumer(session, now);
        }
    }

    /// Completes the client's flow for a PUBLISH the edge dropped
    /// (expired while it waited).
    pub(super) fn complete_dropped(
        &mut self,
        origin: Option<(SessionId, PacketId)>,
        qos: QoS,
        now: Instant,
    ) {
        let Some((session, client_packet_id)) = origin else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
        let answer = if qos == QoS::ExactlyOnce {
            entry.exactly_once.insert(client_packet_id, true);
            Packet::PubRec(client_packet_id)
        } else {
            Packet::PubAck(client_packet_id)
        };
        self.send_to(session, &answer, now);
    }
}
