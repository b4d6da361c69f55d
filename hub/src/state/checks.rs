//! The hub's invariants, checked on demand by property tests and fuzzing.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// Checks the hub's invariants; returns what is broken (empty when
    /// all hold). For property tests and fuzzing: it walks every session.
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        // Every filter held upstream counts exactly the sessions' filters
        // that map onto it (a CC2 hub also holds the agent's replies).
        let mut expected: HashMap<String, usize> = HashMap::new();
        for entry in self.sessions.values() {
            for filter in entry.filters.keys() {
                if let Some(upstream) = self.upstream_of(filter) {
                    *expected.entry(upstream).or_default() += 1;
                }
            }
        }
        let agent_topic = self.profile.hooks().own_filter();
        for (filter, held) in &self.upstream_filters {
            let own = usize::from(agent_topic.as_deref() == Some(filter.as_str()));
            let sessions = expected.remove(filter).unwrap_or(0);
            if held.holders != sessions + own {
                broken.push(format!(
                    "{filter}: {} holders counted, {} sessions hold it",
                    held.holders, sessions
                ));
            }
        }
        for (filter, sessions) in expected {
            broken.push(format!(
                "{filter}: held by {sessions} sessions, not upstream"
            ));
        }
        // The index says what the sessions hold.
        let indexed: usize = self
            .sessions
            .values()
            .map(|entry| entry.filters.len())
            .sum();
        if self.index.len() != indexed {
            broken.push(format!(
                "the index has {} entries for {indexed} session filters",
                self.index.len()
            ));
        }
        // Each session's count of unacknowledged publishes matches what
        // waits for the upstream or the rate.
        for (session, entry) in &self.sessions {
            let pending = self
                .pending
                .values()
                .filter(|pending| {
                    matches!(pending, Pending::Publish { origin: Some((from, _)), .. } if from == session)
                })
                .count();
            let waiting = self
                .over_rate
                .iter()
                .filter(|(origin, ..)| origin.is_some_and(|(from, _)| from == *session))
                .count();
            if entry.unacknowledged as usize != pending + waiting {
                broken.push(format!(
                    "session {session}: {} unacknowledged, {pending} pending and {waiting} waiting",
                    entry.unacknowledged
                ));
            }
        }
        // Bounded.
        for (what, len, bound) in [
            ("pending", self.pending.len(), usize::from(u16::MAX)),
            ("replays", self.replays.len(), MAX_OPEN_REPLAYS),
            ("pings", self.pings_in_flight.len(), MAX_PINGS_IN_FLIGHT),
            (
                "own_recent",
                self.own_recent.len(),
                no_local::MAX_OWN_RECENT,
            ),
        ] {
            if len > bound {
                broken.push(format!("{what}: {len} over {bound}"));
            }
        }
        broken
    }
}
