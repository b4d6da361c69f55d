//! Subscriptions: upstream filters counted by the sessions holding them,
//! SUBSCRIBEs waiting for the broker's SUBACK, and UNSUBSCRIBE when the last
//! holder leaves.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// The hub holds `filter` upstream for its own sake (a CC2 agent's
    /// replies), beside any session holding it.
    pub(super) fn hold_filter(&mut self, filter: String, now: Instant) {
        if let Some(held) = self.upstream_filters.get_mut(&filter) {
            held.holders += 1;
            return;
        }
        self.upstream_filters.insert(
            filter.clone(),
            UpstreamFilter {
                holders: 1,
                granted: None,
            },
        );
        if self.lost_until.is_some() {
            // Subscribed when the upstream resumes.
            return;
        }
        self.subscribe_upstream_alone(filter, now);
    }

    /// Sends one SUBSCRIBE for `filter` alone and awaits its SUBACK;
    /// returns its packet id (`None`: every id is in use).
    pub(super) fn subscribe_upstream_alone(
        &mut self,
        filter: String,
        now: Instant,
    ) -> Option<PacketId> {
        let id = self.allocate_upstream_id()?;
        self.queue_upstream(&Packet::Subscribe(Subscribe {
            packet_id: id,
            filters: vec![(filter.clone(), QoS::AtLeastOnce)],
        }));
        self.pending.insert(
            id,
            Pending::Subscribe {
                filters: vec![filter],
                sent_at: now,
            },
        );
        Some(id)
    }

    /// The upstream filter that serves a session's `filter`: itself when
    /// the policy allows it, else what the profile maps it onto (on a
    /// Bambu printer, the report topic for `#`); `None` when refused.
    pub(super) fn upstream_of(&self, filter: &str) -> Option<String> {
        if self.config.policy.permits_filter(filter) {
            return Some(filter.to_owned());
        }
        self.profile.hooks().upstream_of(filter)
    }

    pub(super) fn on_subscribe(
        &mut self,
        session: SessionId,
        subscribe: Subscribe,
        options: &[SubscriptionExtras],
        now: Instant,
    ) {
        let mut quarantined = 0;
        let upstream_of: Vec<Option<String>> = subscribe
            .filters
            .iter()
            .map(|(filter, _)| {
                let upstream = self.upstream_of(filter)?;
                if self.quarantine.holds_filter(&upstream, now) {
                    quarantined += 1;
                    return None;
                }
                Some(upstream)
            })
            .collect();
        self.counters.quarantine_refusals += quarantined;
        let requested: Vec<(String, Option<QoS>)> = subscribe
            .filters
            .into_iter()
            .zip(&upstream_of)
            .map(|((filter, qos), upstream)| (filter, upstream.is_some().then_some(qos)))
            .collect();
        self.counters.refused_filters +=
            requested.iter().filter(|(_, qos)| qos.is_none()).count() as u64;
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        let added = requested
            .iter()
            .filter(|(filter, qos)| qos.is_some() && !entry.filters.contains_key(filter))
            .count();
        if entry.filters.len() + added > entry.max_subscriptions as usize {
            let limit = entry.max_subscriptions;
            self.end_session(
                session,
                Close::limit(&format!("more than {limit} subscriptions")),
                now,
            );
            return;
        }
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        // Filters the upstream SUBSCRIBE carries; joiners of retained
        // messages per upstream SUBSCRIBE in flight.
        let mut carried = Vec::new();
        let mut joiners = Vec::new();
        let mut declined = Vec::new();
        let mut joins_in_flight: Vec<(PacketId, String, QoS)> = Vec::new();
        for (index, ((filter, qos), upstream)) in requested.iter().zip(&upstream_of).enumerate() {
            let (Some(qos), Some(upstream)) = (qos, upstream) else {
                continue;
            };
            let option = options.get(index);
            let newly_held = entry.filters.insert(filter.clone(), *qos).is_none();
            if newly_held {
                self.index.insert(filter, session);
            }
            match option {
                Some(option) if option.no_local => {
                    entry
                        .no_local
                        .get_or_insert_with(Box::default)
                        .insert(filter.clone());
                }
                _ => {
                    if let Some(no_local) = &mut entry.no_local {
                        no_local.remove(filter);
                    }
                }
            }
            // MQTT 5 Retain Handling: retained messages at subscribe time
            // always (0, and 3.1.1), only for a filter the session did not
            // hold (1), or never (2).
            let wants_retained = match option.map(|option| option.retain_handling) {
                None | Some(RetainHandling::SendAtSubscribe) => true,
                Some(RetainHandling::SendIfNew) => newly_held,
                Some(RetainHandling::DoNotSend) => false,
            };
            if !wants_retained {
                if !self.upstream_filters.contains_key(upstream) {
                    self.upstream_filters.insert(
                        upstream.clone(),
                        UpstreamFilter {
                            holders: 1,
                            granted: None,
                        },
                    );
                    carried.push(upstream.clone());
                    declined.push(filter.clone());
                } else if newly_held && let Some(held) = self.upstream_filters.get_mut(upstream) {
                    held.holders += 1;
                }
                continue;
            }
            match self.upstream_filters.get_mut(upstream) {
                None => {
                    self.upstream_filters.insert(
                        upstream.clone(),
                        UpstreamFilter {
                            holders: 1,
                            granted: None,
                        },
                    );
                    carried.push(upstream.clone());
                    joiners.push((filter.clone(), session, *qos));
                }
                Some(held) => {
                    if newly_held {
                        held.holders += 1;
                    }
                    let in_flight = self.replays.iter().rev().find(|replay| {
                        !replay.suback_seen
                            && matches!(
                                self.pending.get(&replay.subscribe_id),
                                Some(Pending::Subscribe { filters, .. }) if filters.contains(upstream)
                            )
                    });
                    if let Some(replay) = in_flight {
                        // Its retained messages have not started yet.
                        joins_in_flight.push((replay.subscribe_id, filter.clone(), *qos));
                    } else if held.granted.is_none() || self.quarantine.is_suspect(upstream) {
                        // Subscribing, but its replay was forgotten, or a
                        // suspect waiting for its trial: it waits for the
                        // grant without retained messages.
                    } else if retained::replay_wanted(
                        self.config.replay_retained,
                        self.seen_retained.as_ref(),
                        filter,
                    ) {
                        if !carried.contains(upstream) {
                            carried.push(upstream.clone());
                        }
                        joiners.push((filter.clone(), session, *qos));
                    }
                }
            }
        }
        for (replay_id, filter, qos) in joins_in_flight {
            if let Some(replay) = self
                .replays
                .iter_mut()
                .find(|replay| replay.subscribe_id == replay_id)
            {
                replay.joiners.push((filter, session, qos));
            }
        }
        if !carried.is_empty() && self.lost_until.is_none() {
            if !self.charge_churn(session, now) {
                return;
            }
            let Some(upstream_id) = self.allocate_upstream_id() else {
                self.end_session(session, Close::limit("hub busy"), now);
                return;
            };
            let packet = Packet::Subscribe(Subscribe {
                packet_id: upstream_id,
                filters: carried
                    .iter()
                    .map(|filter| (filter.clone(), QoS::AtLeastOnce))
                    .collect(),
            });
            self.queue_upstream(&packet);
            self.pending.insert(
                upstream_id,
                Pending::Subscribe {
                    filters: carried,
                    sent_at: now,
                },
            );
            self.replays.push_back(OpenReplay {
                subscribe_id: upstream_id,
                suback_seen: false,
                joiners,
                declined,
            });
            if self.replays.len() > MAX_OPEN_REPLAYS {
                self.replays.pop_front();
            }
            self.ping_upstream(Some(upstream_id), now);
        }
        self.waiting_subscribes.push(WaitingSubscribe {
            session,
            packet_id: subscribe.packet_id,
            filters: requested,
        });
        self.answer_ready_subscribes(now);
    }

    pub(super) fn on_unsubscribe(
        &mut self,
        session: SessionId,
        unsubscribe: Unsubscribe,
        now: Instant,
    ) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        // Whether this UNSUBSCRIBE reaches the upstream: it drops a filter
        // no other session holds.
        let reaches_upstream = unsubscribe.filters.iter().any(|filter| {
            entry.filters.contains_key(filter)
                && self
                    .upstream_of(filter)
                    .and_then(|upstream| self.upstream_filters.get(&upstream))
                    .is_some_and(|upstream| upstream.holders == 1)
        });
        if reaches_upstream && !self.charge_churn(session, now) {
            return;
        }
        for filter in &unsubscribe.filters {
            self.drop_filter(session, filter);
        }
        for replay in &mut self.replays {
            replay.joiners.retain(|(filter, joiner, _)| {
                *joiner != session || !unsubscribe.filters.contains(filter)
            });
        }
        if let Some(entry) = self.sessions.get(&session) {
            // An UNSUBACK is tiny; a session over budget is caught by the
            // next delivery.
            let _ = entry
                .sink
                .deliver(encode(&Packet::UnsubAck(unsubscribe.packet_id)));
        }
    }

    /// Sends SUBACK to every waiting client whose filters all have an
    /// upstream grant by now.
    pub(super) fn answer_ready_subscribes(&mut self, now: Instant) {
        let mut answered = Vec::new();
        for waiting in std::mem::take(&mut self.waiting_subscribes) {
            let grants: Option<Vec<SubscribeReturnCode>> = waiting
                .filters
                .iter()
                .map(|(filter, requested)| {
                    let Some(requested) = requested else {
                        return Some(SubscribeReturnCode::Failure);
                    };
                    let upstream = self.upstream_of(filter)?;
                    let granted = self.upstream_filters.get(&upstream)?.granted?;
                    Some(match granted {
                        SubscribeReturnCode::Success(upstream) => {
                            SubscribeReturnCode::Success((*requested).min(upstream))
                        }
                        SubscribeReturnCode::Failure => SubscribeReturnCode::Failure,
                    })
                })
                .collect();
            match grants {
                Some(grants) => answered.push((waiting, grants)),
                None => self.waiting_subscribes.push(waiting),
            }
        }
        for (waiting, grants) in answered {
            // Filters the upstream refused are dropped again.
            for ((filter, requested), grant) in waiting.filters.iter().zip(&grants) {
                if requested.is_some() && *grant == SubscribeReturnCode::Failure {
                    self.drop_filter(waiting.session, filter);
                }
            }
            let joined: Vec<&str> = waiting
                .filters
                .iter()
                .zip(&grants)
                .filter(|(_, grant)| **grant != SubscribeReturnCode::Failure)
                .map(|((filter, _), _)| filter.as_str())
                .collect();
            self.send_to(
                waiting.session,
                &Packet::SubAck(SubAck {
                    packet_id: waiting.packet_id,
                    return_codes: grants,
                }),
                now,
            );
            let mut out = ProfileOutput {
                actions: &mut self.profile_actions,
                counters: &mut self.counters,
            };
            let upstream_up = self.lost_until.is_none();
            self.profile
                .hooks_mut()
                .joined(waiting.session, &joined, upstream_up, now, &mut out);
            self.run_profile_actions(now);
        }
    }

    pub(super) fn drop_filter(&mut self, session: SessionId, filter: &str) {
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        if entry.filters.remove(filter).is_some() {
            self.index.remove(filter, &session);
            self.release_upstream(filter);
        }
    }

    pub(super) fn release_upstream(&mut self, filter: &str) {
        let Some(filter) = self.upstream_of(filter) else {
            return;
        };
        let filter = filter.as_str();
        let Some(upstream) = self.upstream_filters.get_mut(filter) else {
            return;
        };
        upstream.holders = upstream.holders.saturating_sub(1);
        if upstream.holders > 0 {
            return;
        }
        let was_granted = matches!(upstream.granted, Some(SubscribeReturnCode::Success(_)));
        self.upstream_filters.remove(filter);
        self.quarantine.forget_suspect(filter);
        if was_granted
            && self.lost_until.is_none()
            && let Some(id) = self.allocate_upstream_id()
        {
            self.queue_upstream(&Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: vec![filter.to_owned()],
            }));
            self.pending.insert(id, Pending::Unsubscribe);
        }
    }

    pub(super) fn on_suback(&mut self, suback: SubAck, now: Instant) {
        let Some(Pending::Subscribe { filters, .. }) = self.pending.remove(&suback.packet_id)
        else {
            return;
        };
        if self
            .quarantine
            .trial()
            .is_some_and(|(trial, _)| trial == suback.packet_id)
        {
            // It did not end the upstream: cleared.
            self.quarantine.end_trial();
        }
        for (index, filter) in filters.iter().enumerate() {
            let grant = suback
                .return_codes
                .get(index)
                .copied()
                .unwrap_or(SubscribeReturnCode::Failure);
            if let Some(upstream) = self.upstream_filters.get_mut(filter) {
                // A replay keeps the first grant unless it improves it.
                if upstream.granted.is_none() || matches!(grant, SubscribeReturnCode::Success(_)) {
                    upstream.granted = Some(grant);
                }
            }
        }
        if let Some(replay) = self
            .replays
            .iter_mut()
            .find(|replay| replay.subscribe_id == suback.packet_id)
        {
            replay.suback_seen = true;
        }
        self.answer_ready_subscribes(now);
        self.advance_trials(now);
    }

    /// Distinct filters the upstream is subscribed to (or being).
    pub fn upstream_filter_count(&self) -> usize {
        self.upstream_filters.len()
    }
}

/// The filters the upstream holds, as a profile sees them.
impl HeldFilters for HashMap<String, UpstreamFilter> {
    fn holds_matching(&self, topic: &str, granted: bool) -> bool {
        self.iter().any(|(filter, held)| {
            (!granted || matches!(held.granted, Some(SubscribeReturnCode::Success(_))))
                && topic_matches(filter, topic)
        })
    }
}
