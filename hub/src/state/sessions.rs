//! The session table: attaching, detaching and ending sessions, a
//! session's sink, and its subscription churn budget.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// A new session. One that holds the same client id is ended (replaced)
    /// first, as MQTT requires; its will goes out.
    pub fn attach(&mut self, session: SessionId, attach: SessionAttach<S>, now: Instant) {
        if !attach.client_id.is_empty()
            && let Some(older) = self.client_ids.insert(attach.client_id.clone(), session)
            && older != session
        {
            self.end_session(older, Close::replaced(), now);
        }
        self.idle_since = None;
        self.profile.hooks_mut().attach(session, attach.peer);
        // The session refused a will the policy forbids already; a will
        // that slipped through is not published.
        let will = attach.will.filter(|will| {
            let permitted = self
                .config
                .policy
                .check_publish(&will.topic, will.retain)
                .is_ok();
            if !permitted {
                self.counters.refused_publishes += 1;
            }
            permitted
        });
        self.sessions.insert(
            session,
            SessionEntry {
                sink: attach.sink,
                client_id: attach.client_id,
                will: will.map(Box::new),
                filters: HashMap::new(),
                max_subscriptions: u32::try_from(attach.max_subscriptions).unwrap_or(u32::MAX),
                max_unacknowledged: u32::try_from(attach.max_unacknowledged).unwrap_or(u32::MAX),
                unacknowledged: 0,
                exactly_once: ExactlyOnce::default(),
                next_packet_id: 0,
                churn: ChurnBudget::new(self.config.churn, now),
                waiting_for_rate: 0,
                peer: attach.peer,
                mqtt5: attach.mqtt5,
                no_local: None,
            },
        );
    }

    /// The session is gone. `graceful`: it sent DISCONNECT, so its will is
    /// discarded; otherwise the will is published.
    pub fn detach(&mut self, session: SessionId, graceful: bool, now: Instant) {
        let Some(entry) = self.remove_session(session, now) else {
            return;
        };
        if !graceful && let Some(will) = entry.will {
            self.publish_will(*will, now);
        }
    }

    /// Ends every session with `close` (the hub is going away).
    pub fn end_all_sessions(&mut self, close: &Close) {
        for (_, entry) in self.sessions.drain() {
            entry.sink.end(close.clone());
        }
        self.client_ids.clear();
    }

    pub(super) fn remove_session(
        &mut self,
        session: SessionId,
        now: Instant,
    ) -> Option<SessionEntry<S>> {
        let entry = self.sessions.remove(&session)?;
        self.profile.hooks_mut().detach(session);
        for filter in entry.filters.keys() {
            self.index.remove(filter, &session);
            self.release_upstream(filter);
        }
        self.waiting_subscribes
            .retain(|waiting| waiting.session != session);
        if entry.waiting_for_rate > 0 {
            self.over_rate
                .retain(|(origin, _, _)| origin.is_none_or(|(from, _)| from != session));
        }
        for replay in &mut self.replays {
            replay.joiners.retain(|(_, joiner, _)| *joiner != session);
        }
        if self.client_ids.get(&entry.client_id) == Some(&session) {
            self.client_ids.remove(&entry.client_id);
        }
        if self.sessions.is_empty() {
            self.idle_since = Some(now);
            if self.lost_until.is_some() {
                // Nobody waits for a new upstream.
                self.end.get_or_insert(HubEnd::Idle);
            }
        }
        Some(entry)
    }

    /// Ends a session from the hub's side: it is detached at once (its
    /// will goes out) and told to close.
    pub(super) fn end_session(&mut self, session: SessionId, close: Close, now: Instant) {
        if let Some(entry) = self.remove_session(session, now) {
            entry.sink.end(close);
            if let Some(will) = entry.will {
                self.publish_will(*will, now);
            }
        }
    }

    /// Encodes `packet` for one session; a session over its budget is
    /// ended as a slow consumer.
    pub(super) fn send_to(&mut self, session: SessionId, packet: &Packet, now: Instant) {
        let Some(entry) = self.sessions.get(&session) else {
            return;
        };
        if !entry.sink.deliver(encode(packet)) {
            self.cut_slow_consumer(session, now);
        }
    }

    /// Ends a session whose client stopped reading: its queue is dropped so
    /// that the close is the next thing it gets.
    pub(super) fn cut_slow_consumer(&mut self, session: SessionId, now: Instant) {
        if let Some(entry) = self.remove_session(session, now) {
            self.counters.slow_consumer_cuts += 1;
            entry.sink.abandon(Close::limit("slow consumer"));
            if let Some(will) = entry.will {
                self.publish_will(*will, now);
            }
        }
    }

    /// Charges one upstream SUBSCRIBE or UNSUBSCRIBE to `session`; a session
    /// over its budget is cut and false returned.
    pub(super) fn charge_churn(&mut self, session: SessionId, now: Instant) -> bool {
        let limit = self.config.churn;
        let Some(entry) = self.sessions.get_mut(&session) else {
            return false;
        };
        if entry.peer || entry.churn.take(limit, now) {
            return true;
        }
        self.counters.churn_cuts += 1;
        self.end_session(
            session,
            Close::limit(&format!(
                "subscription churn (more than {} a minute)",
                limit.per_minute
            )),
            now,
        );
        false
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
