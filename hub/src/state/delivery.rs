//! A PUBLISH from the printer to the sessions it matches: the fan-out,
//! once per session, sharing the encoded bytes where the QoS allows.

use super::*;

impl<S: SessionSink> HubState<S> {
    pub(super) fn on_upstream_publish(&mut self, publish: Publish, now: Instant) {
        if let Some(id) = publish.packet_id {
            self.queue_upstream(&Packet::PubAck(id));
        }
        let mut out = ProfileOutput {
            actions: &mut self.profile_actions,
            counters: &mut self.counters,
        };
        let taken = self
            .profile
            .hooks_mut()
            .on_upstream_publish(&publish, now, &mut out);
        self.run_profile_actions(now);
        if taken {
            return;
        }
        if publish.retain {
            self.note_retained(&publish.topic, publish.payload.is_empty());
        }
        self.matches.clear();
        let mut retained_replay = false;
        if publish.retain {
            // A broker sets RETAIN only on what a new SUBSCRIBE makes it
            // send (MQTT-3.3.1-8/9): it goes to the sessions that joined
            // through the latest such SUBSCRIBE it matches.
            let replay = self
                .replays
                .iter()
                .rev()
                .filter(|replay| replay.suback_seen)
                .find(|replay| {
                    replay
                        .joiners
                        .iter()
                        .any(|(filter, _, _)| topic_matches(filter, &publish.topic))
                        || replay
                            .declined
                            .iter()
                            .any(|filter| topic_matches(filter, &publish.topic))
                });
            if let Some(replay) = replay {
                retained_replay = true;
                for (filter, session, qos) in &replay.joiners {
                    if topic_matches(filter, &publish.topic) {
                        self.matches.push((*session, *qos));
                    }
                }
            }
        }
        if !retained_replay {
            let sessions = &self.sessions;
            let matches = &mut self.matches;
            let topic = &publish.topic;
            let at_most_once = publish.qos == QoS::AtMostOnce;
            self.index.for_each_match(topic, |session| {
                if at_most_once {
                    // Every delivery is QoS 0: no need to find the
                    // session's best matching grant.
                    matches.push((*session, QoS::AtMostOnce));
                } else if let Some(entry) = sessions.get(session) {
                    let best = entry
                        .filters
                        .iter()
                        .filter(|(filter, _)| topic_matches(filter, topic))
                        .map(|(_, qos)| *qos)
                        .max()
                        .unwrap_or(QoS::AtMostOnce);
                    matches.push((*session, best));
                }
            });
        }
        self.deliver_publish(&publish, now);
    }

    /// Delivers `publish` once to each session in `self.matches`, at the
    /// lowest of its QoS, the session's and QoS 1.
    pub(super) fn deliver_publish(&mut self, publish: &Publish, now: Instant) {
        self.drop_own_echoes(publish);
        let mut matches = std::mem::take(&mut self.matches);
        if matches.len() > 1 {
            // One delivery per session, at its best matching QoS.
            matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matches.dedup_by_key(|(session, _)| *session);
        }
        // A QoS 0 message is encoded once per protocol version and the
        // same bytes go to every session of that version.
        let mut shared_at_most_once: Option<Bytes> = None;
        let mut shared_at_most_once_v5: Option<Bytes> = None;
        let mut slow = Vec::new();
        for (session, wanted) in &matches {
            let Some(entry) = self.sessions.get_mut(session) else {
                continue;
            };
            let qos = (*wanted).min(publish.qos).min(QoS::AtLeastOnce);
            let delivered = if qos == QoS::AtMostOnce && entry.mqtt5 {
                let bytes = shared_at_most_once_v5
                    .get_or_insert_with(|| encode_mqtt5_at_most_once(publish))
                    .clone();
                entry.sink.deliver_mqtt5(bytes)
            } else if qos == QoS::AtMostOnce {
                let bytes = shared_at_most_once
                    .get_or_insert_with(|| {
                        encode(&Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtMostOnce,
                            retain: publish.retain,
                            topic: publish.topic.clone(),
                            packet_id: None,
                            payload: publish.payload.clone(),
                        }))
                    })
                    .clone();
                entry.sink.deliver(bytes)
            } else {
                let packet_id = entry.allocate_packet_id();
                entry.sink.deliver(encode(&Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: publish.retain,
                    topic: publish.topic.clone(),
                    packet_id: Some(packet_id),
                    payload: publish.payload.clone(),
                })))
            };
            if !delivered {
                slow.push(*session);
            }
        }
        matches.clear();
        self.matches = matches;
        for session in slow {
            self.cut_slow_consumer(session, now);
        }
    }
}

/// `publish` as an MQTT 5 QoS 0 PUBLISH without properties.
fn encode_mqtt5_at_most_once(publish: &Publish) -> Bytes {
    let packet = relay_proto::mqtt5::Packet::Publish(relay_proto::mqtt5::Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: publish.retain,
        topic: publish.topic.clone(),
        packet_id: None,
        properties: relay_proto::mqtt5::Properties::new(),
        payload: publish.payload.clone(),
    });
    let mut bytes = BytesMut::new();
    // Built from a decoded, bounded PUBLISH.
    let _ = relay_proto::mqtt5::encode(&packet, &mut bytes);
    bytes.freeze()
}
