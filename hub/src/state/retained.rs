//! Retained messages: which topics hold one upstream, so that a joining
//! session's filter is subscribed again only where that replays something.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// Notes that `topic` holds a retained message upstream (or no longer,
    /// for an empty one).
    pub(super) fn note_retained(&mut self, topic: &str, empty: bool) {
        let Some(seen) = &mut self.seen_retained else {
            return;
        };
        if empty {
            seen.remove(topic);
        } else if seen.len() >= MAX_SEEN_RETAINED_TOPICS {
            self.seen_retained = None;
        } else if !seen.contains(topic) {
            seen.insert(topic.to_owned());
        }
    }
}

/// Whether a joining session's held `filter` is subscribed upstream again.
pub(super) fn replay_wanted(
    replay: RetainedReplay,
    seen: Option<&std::collections::HashSet<String>>,
    filter: &str,
) -> bool {
    match (replay, seen) {
        (RetainedReplay::Always, _) | (RetainedReplay::WhenSeen, None) => true,
        (RetainedReplay::WhenSeen, Some(seen)) => {
            seen.iter().any(|topic| topic_matches(filter, topic))
        }
    }
}
