//! The hub's side of the printer profile: carrying out the actions a
//! profile returns, and the filter it holds for its own sake.

use super::*;

impl<S: SessionSink> HubState<S> {
    /// The client id the agent connected to the printer with, on the
    /// upstream about to resume (`None` over a peer link); called before
    /// [`Self::upstream_resumed`]. The profile keeps it; a filter the
    /// profile holds for its own sake follows it.
    pub fn set_printer_client(&mut self, client: Option<String>, now: Instant) {
        let old = self.profile.hooks().own_filter();
        self.profile.hooks_mut().set_printer_client(client);
        let new = self.profile.hooks().own_filter();
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.release_upstream(&old);
        }
        if let Some(new) = new {
            self.hold_filter(new, now);
        }
    }

    /// Carries out what the profile asked for.
    pub(super) fn run_profile_actions(&mut self, now: Instant) {
        let mut actions = std::mem::take(&mut self.profile_actions);
        for action in actions.drain(..) {
            match action {
                ProfileAction::Deliver {
                    session,
                    topic,
                    payload,
                } => self.send_to(session, &Packet::Publish(at_most_once(topic, payload)), now),
                ProfileAction::DeliverIfSubscribed {
                    session,
                    topic,
                    payload,
                } => {
                    let subscribed = self.sessions.get(&session).is_some_and(|entry| {
                        entry
                            .filters
                            .keys()
                            .any(|filter| topic_matches(filter, &topic))
                    });
                    if subscribed {
                        self.send_to(session, &Packet::Publish(at_most_once(topic, payload)), now);
                    }
                }
                ProfileAction::Upstream { topic, payload } => {
                    self.queue_upstream(&Packet::Publish(at_most_once(topic, payload)));
                }
                ProfileAction::Silent(silence) => {
                    self.end.get_or_insert(HubEnd::UpstreamSilent(silence));
                }
            }
        }
        // The buffer is kept for the next time.
        self.profile_actions = actions;
    }
}
