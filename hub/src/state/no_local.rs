//! MQTT 5's No Local: a session's own PUBLISHes, remembered so that the
//! broker's echo of them skips it.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// Notes a PUBLISH of a session with No Local filters, so that the
    /// broker's echo of it skips that session.
    pub(super) fn remember_own(&mut self, session: SessionId, publish: &Publish, now: Instant) {
        while self
            .own_recent
            .front()
            .is_some_and(|(at, ..)| now.saturating_duration_since(*at) > OWN_ECHO_WINDOW)
            || self.own_recent.len() >= MAX_OWN_RECENT
        {
            self.own_recent.pop_front();
        }
        self.own_recent.push_back((
            now,
            session,
            publish.topic.clone(),
            digest(&publish.payload),
        ));
    }

    /// Drops from `self.matches` the sessions that published this message
    /// themselves and hold a No Local filter matching it: the broker echoes
    /// what the hub publishes for them (3.1.1 has no No Local).
    pub(super) fn drop_own_echoes(&mut self, publish: &Publish) {
        if self.own_recent.is_empty() {
            return;
        }
        let payload = digest(&publish.payload);
        let sessions = &self.sessions;
        let own_recent = &mut self.own_recent;
        self.matches.retain(|(session, _)| {
            let no_local = sessions
                .get(session)
                .and_then(|entry| entry.no_local.as_ref())
                .is_some_and(|filters| {
                    filters
                        .iter()
                        .any(|filter| topic_matches(filter, &publish.topic))
                });
            if !no_local {
                return true;
            }
            let own = own_recent.iter().position(|(_, from, topic, digest)| {
                from == session && *topic == publish.topic && *digest == payload
            });
            match own {
                Some(position) => {
                    own_recent.remove(position);
                    false
                }
                None => true,
            }
        });
    }
}

/// How long a No Local session's own PUBLISH waits for the broker's echo.
const OWN_ECHO_WINDOW: Duration = Duration::from_secs(30);

/// Own PUBLISHes remembered for No Local at most.
pub(super) const MAX_OWN_RECENT: usize = 1_024;

/// A payload's digest, to recognise the broker's echo of it.
fn digest(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut hasher);
    hasher.finish()
}
