//! Upstream continuity: keeping sessions across a lost upstream, redoing
//! subscriptions and unacknowledged PUBLISHes on the next one, and judging
//! what ended it (the quarantine's suspects and strikes).

use super::*;

impl<S: SessionSink> HubState<S> {
    /// Whether the hub is waiting for a new upstream.
    pub fn upstream_is_lost(&self) -> bool {
        self.lost_until.is_some()
    }

    /// The upstream is gone. Sessions are kept until `until`; their
    /// subscriptions and unacknowledged QoS 1 publishes are redone on a
    /// new upstream ([`Self::upstream_resumed`]). QoS 0 publishes meanwhile
    /// are dropped (counted as throttled). A hub with no session ends now.
    pub fn upstream_lost(&mut self, until: Instant, now: Instant) {
        self.lose_upstream(until, now, true);
    }

    /// As [`Self::upstream_lost`], for an upstream that ended in a way no
    /// app's message can cause: the device's tunnel moved, the way to the
    /// device went, or the upstream is another hub (which judges its own
    /// printer's losses). Nothing in flight is suspected of it.
    pub fn upstream_lost_blameless(&mut self, until: Instant, now: Instant) {
        self.lose_upstream(until, now, false);
    }

    fn lose_upstream(&mut self, until: Instant, now: Instant, judge: bool) {
        let peers: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, entry)| entry.peer)
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            self.end_session(peer, Close::device_offline(), now);
        }
        if judge {
            self.judge_loss(now);
        }
        self.lost_until = Some(until);
        self.profile.hooks_mut().upstream_lost();
        self.to_upstream.clear();
        self.pings_in_flight.clear();
        self.replays.clear();
        // SUBSCRIBEs in flight are redone with every held filter;
        // UNSUBSCRIBEs are moot on a new connection.
        self.pending
            .retain(|_, pending| matches!(pending, Pending::Publish { .. }));
        if self.sessions.is_empty() {
            self.end.get_or_insert(HubEnd::Idle);
        }
    }

    /// A new upstream (already past CONNECT/CONNACK) serves the hub: every
    /// held filter is subscribed again (the broker re-sends its retained
    /// messages, delivered as such), unacknowledged QoS 1 publishes are
    /// sent again in their order (DUP when they had gone out), and a Bambu
    /// hub asks for the full report.
    pub fn upstream_resumed(&mut self, now: Instant) {
        self.lost_until = None;
        self.next_ping = now + self.config.upstream_keep_alive;
        // Suspects go out alone, after the rest ([`Self::advance_trials`]).
        let mut filters: Vec<String> = self
            .upstream_filters
            .keys()
            .filter(|filter| !self.quarantine.is_suspect(filter))
            .cloned()
            .collect();
        filters.sort_unstable();
        for chunk in filters.chunks(MAX_FILTERS_PER_RESUBSCRIBE) {
            let Some(id) = self.allocate_upstream_id() else {
                break;
            };
            self.queue_upstream(&Packet::Subscribe(Subscribe {
                packet_id: id,
                filters: chunk
                    .iter()
                    .map(|filter| (filter.clone(), QoS::AtLeastOnce))
                    .collect(),
            }));
            self.pending.insert(
                id,
                Pending::Subscribe {
                    filters: chunk.to_vec(),
                    sent_at: now,
                },
            );
        }
        let mut resend: Vec<(u64, PacketId)> = self
            .pending
            .iter()
            .filter_map(|(id, pending)| match pending {
                Pending::Publish { order, .. } => Some((*order, *id)),
                _ => None,
            })
            .collect();
        resend.sort_unstable();
        for (_, id) in resend {
            if let Some(Pending::Publish {
                expires_at: Some(at),
                ..
            }) = self.pending.get(&id)
                && now >= *at
                && let Some(Pending::Publish {
                    origin,
                    exactly_once,
                    ..
                }) = self.pending.remove(&id)
            {
                // Expired while the hub waited for this upstream.
                self.counters.expired_publishes += 1;
                let qos = if exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                self.complete_dropped(origin, qos, now);
                continue;
            }
            let Some(Pending::Publish {
                publish,
                sent,
                sent_at,
                ..
            }) = self.pending.get_mut(&id)
            else {
                continue;
            };
            let mut again = (**publish).clone();
            again.dup = *sent;
            *sent = true;
            *sent_at = Some(now);
            self.queue_upstream(&Packet::Publish(again));
        }
        let mut out = ProfileOutput {
            actions: &mut self.profile_actions,
            counters: &mut self.counters,
        };
        self.profile
            .hooks_mut()
            .upstream_resumed(&self.upstream_filters, now, &mut out);
        self.run_profile_actions(now);
        self.answer_ready_subscribes(now);
        self.advance_trials(now);
    }

    /// Who a session is, as a publisher the quarantine keeps books on: its
    /// client id, which outlives a reconnect.
    pub(super) fn publisher_of(&self, session: SessionId) -> Option<String> {
        let entry = self.sessions.get(&session)?;
        Some(if entry.client_id.is_empty() {
            format!("session {session}")
        } else {
            entry.client_id.clone()
        })
    }

    /// The upstream just ended: what was in flight and went out shortly
    /// before is suspected of ending it. A suspect on trial is the only
    /// one blamed, and is quarantined.
    pub(super) fn judge_loss(&mut self, now: Instant) {
        let policy = self.quarantine.policy();
        let recent = |at: Instant| now.saturating_duration_since(at) <= policy.suspect_window;
        if let Some((trial_id, filter)) = self.quarantine.trial() {
            let filter = filter.to_owned();
            let in_flight = matches!(
                self.pending.get(&trial_id),
                Some(Pending::Subscribe { sent_at, .. }) if recent(*sent_at)
            );
            self.quarantine.end_trial();
            if in_flight {
                self.quarantine_filter(&filter, now);
                return;
            }
            // It outlived the window: not its fault, tried again later.
            self.quarantine.suspect(&filter);
        }
        let mut blamed = false;
        let mut suspects = Vec::new();
        let mut publishers = Vec::new();
        let mut dropped = Vec::new();
        for (id, pending) in &mut self.pending {
            match pending {
                Pending::Subscribe { filters, sent_at } if recent(*sent_at) => {
                    blamed = true;
                    suspects.extend(filters.iter().cloned());
                }
                Pending::Publish {
                    origin,
                    sent_at: Some(sent_at),
                    suspect,
                    ..
                } if recent(*sent_at) => {
                    blamed = true;
                    if let Some((session, _)) = origin {
                        publishers.push(*session);
                    }
                    if *suspect {
                        dropped.push(*id);
                    }
                    *suspect = true;
                }
                _ => {}
            }
        }
        for filter in suspects {
            if self.upstream_filters.contains_key(&filter) {
                self.quarantine.suspect(&filter);
            }
        }
        if !blamed
            && let Some((at, session)) = self.last_qos0
            && now.saturating_duration_since(at) <= policy.qos0_window
        {
            publishers.push(session);
        }
        self.last_qos0 = None;
        publishers.sort_unstable();
        publishers.dedup();
        for session in publishers {
            self.strike(session, now);
        }
        for id in dropped {
            // Sent after one upstream ended, and that one ended too: not
            // sent a third time.
            let Some(Pending::Publish {
                origin,
                exactly_once,
                ..
            }) = self.pending.remove(&id)
            else {
                continue;
            };
            self.counters.quarantine_dropped_publishes += 1;
            if let Some((session, packet_id)) = origin {
                if let Some(entry) = self.sessions.get_mut(&session) {
                    entry.unacknowledged = entry.unacknowledged.saturating_sub(1);
                }
                let qos = if exactly_once {
                    QoS::ExactlyOnce
                } else {
                    QoS::AtLeastOnce
                };
                self.refuse_publish(session, packet_id, qos, PublishRefused::NotAuthorized, now);
            }
        }
    }

    /// Charges a session's publisher a strike for an upstream that ended.
    pub(super) fn strike(&mut self, session: SessionId, now: Instant) {
        let Some(publisher) = self.publisher_of(session) else {
            return;
        };
        if self.quarantine.strike(&publisher, now) == STRIKES_TO_REFUSE {
            self.counters.quarantined_publishers += 1;
            self.quarantine_events.push(QuarantineEvent::Publisher {
                client_id: publisher,
            });
        }
    }

    /// `filter` (as sent upstream) ended the upstream on its own: nobody
    /// gets it for the quarantine's duration. Sessions waiting for it are
    /// refused; sessions holding it lose it.
    pub(super) fn quarantine_filter(&mut self, filter: &str, now: Instant) {
        self.quarantine.quarantine_filter(filter, now);
        self.counters.quarantined_filters += 1;
        if let Some(held) = self.upstream_filters.get_mut(filter) {
            held.granted = Some(SubscribeReturnCode::Failure);
        }
        // Waiting SUBSCRIBEs are answered 0x80 and drop it.
        self.answer_ready_subscribes(now);
        let holders: Vec<(SessionId, String)> = self
            .sessions
            .iter()
            .flat_map(|(session, entry)| {
                entry
                    .filters
                    .keys()
                    .map(move |held| (*session, held.clone()))
            })
            .filter(|(_, held)| self.upstream_of(held).as_deref() == Some(filter))
            .collect();
        let mut sessions_lost: Vec<SessionId> = holders.iter().map(|(s, _)| *s).collect();
        sessions_lost.dedup();
        for (session, held) in holders {
            self.counters.quarantine_lost_filters += 1;
            self.drop_filter(session, &held);
        }
        self.quarantine_events.push(QuarantineEvent::Filter {
            filter: filter.to_owned(),
            sessions_lost: sessions_lost.len(),
        });
    }

    /// Sends the next suspect alone, once nothing else that could end the
    /// upstream is in flight: if the upstream then ends, it was that one.
    pub(super) fn advance_trials(&mut self, now: Instant) {
        if self.lost_until.is_some() || self.quarantine.trial().is_some() {
            return;
        }
        let busy = self.pending.values().any(|pending| match pending {
            Pending::Subscribe { .. } => true,
            Pending::Publish { suspect, sent, .. } => *suspect && *sent,
            Pending::Unsubscribe => false,
        });
        if busy {
            return;
        }
        while let Some(filter) = self.quarantine.next_trial() {
            if !self.upstream_filters.contains_key(&filter) {
                // Nobody holds it any more.
                continue;
            }
            if let Some(id) = self.subscribe_upstream_alone(filter.clone(), now) {
                self.quarantine.start_trial(id, filter);
            }
            return;
        }
    }

    /// What the quarantine decided since the last call.
    pub fn take_quarantine_events(&mut self) -> Vec<QuarantineEvent> {
        std::mem::take(&mut self.quarantine_events)
    }
}
