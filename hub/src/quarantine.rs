//! Filters and publishers that get the upstream dropped, found and kept
//! away from the printer.
//!
//! Many brokers (a real Bambu printer, AWS IoT, HiveMQ with ACLs) drop the
//! whole connection when a client subscribes to a topic it may not read.
//! The hub re-subscribes every held filter on a new upstream, so one such
//! filter would make the agent reconnect to the printer over and over. So:
//!
//! - a SUBSCRIBE in flight (no SUBACK yet) when the upstream ends, and sent
//!   within [`QuarantinePolicy::suspect_window`] before, makes its filters
//!   **suspects**;
//! - on the next upstream the other filters are subscribed first, then each
//!   suspect **alone**, one at a time (its **trial**);
//! - a suspect whose trial ends the upstream again is **quarantined** for
//!   [`QuarantinePolicy::duration`]: never sent upstream again meanwhile,
//!   whichever session asks.
//!
//! A publisher is charged a **strike** when its PUBLISH was the last thing
//! before the upstream ended (QoS 1 without its PUBACK, QoS 0 at once); two
//! strikes and its PUBLISHes are refused for the same duration.
//!
//! This part only keeps the books; [`super::state`] applies them.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use relay_proto::mqtt::PacketId;

/// How suspects and quarantines are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// An upstream that ends within this time after a SUBSCRIBE (or QoS 1
    /// PUBLISH) went out, before its answer came, makes it a suspect.
    pub suspect_window: Duration,
    /// An upstream that ends within this time after a QoS 0 PUBLISH (with
    /// nothing else in flight) charges its publisher.
    pub qos0_window: Duration,
    /// How long a filter or publisher stays quarantined.
    pub duration: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        QuarantinePolicy {
            // A broker drops a client for a forbidden SUBSCRIBE as it reads
            // it: milliseconds, plus the tunnel's round trip.
            suspect_window: Duration::from_secs(5),
            qos0_window: Duration::from_secs(1),
            duration: Duration::from_secs(3600),
        }
    }
}

/// Strikes at which a publisher's PUBLISHes are refused.
pub const STRIKES_TO_REFUSE: u8 = 2;

/// Quarantined filters (and publishers) kept at most; past this the one
/// that ends soonest is forgotten first.
const MAX_QUARANTINED: usize = 1_024;

/// Suspects kept at most: each costs at most one trial (one upstream).
const MAX_SUSPECTS: usize = 256;

/// The books of suspects, trials and quarantines of one hub.
#[derive(Debug, Default)]
pub struct Quarantine {
    policy: QuarantinePolicy,
    /// Filters waiting for their trial, oldest first.
    suspects: VecDeque<String>,
    /// The SUBSCRIBE that carries a suspect alone, and its filter.
    trial: Option<(PacketId, String)>,
    /// Quarantined filters and until when.
    filters: HashMap<String, Instant>,
    /// Publishers (by client id) with strikes: how many, and when they
    /// are forgiven.
    publishers: HashMap<String, (u8, Instant)>,
}

impl Quarantine {
    pub fn new(policy: QuarantinePolicy) -> Quarantine {
        Quarantine {
            policy,
            ..Quarantine::default()
        }
    }

    pub fn policy(&self) -> QuarantinePolicy {
        self.policy
    }

    /// Whether `filter` (as sent upstream) is quarantined at `now`.
    pub fn holds_filter(&self, filter: &str, now: Instant) -> bool {
        self.filters.get(filter).is_some_and(|until| now < *until)
    }

    /// Quarantines `filter` until `now` plus the policy's duration.
    pub fn quarantine_filter(&mut self, filter: &str, now: Instant) {
        self.suspects.retain(|suspect| suspect != filter);
        if self.filters.len() >= MAX_QUARANTINED && !self.filters.contains_key(filter) {
            self.forget_expired(now);
            if let Some(soonest) = soonest_end(&self.filters) {
                self.filters.remove(&soonest);
            }
        }
        self.filters
            .insert(filter.to_owned(), now + self.policy.duration);
    }

    /// Makes `filter` a suspect (once); false when it already was one, or
    /// is on trial.
    pub fn suspect(&mut self, filter: &str) -> bool {
        let on_trial = self.trial.as_ref().is_some_and(|(_, f)| f == filter);
        if on_trial || self.suspects.iter().any(|suspect| suspect == filter) {
            return false;
        }
        if self.suspects.len() >= MAX_SUSPECTS {
            self.suspects.pop_front();
        }
        self.suspects.push_back(filter.to_owned());
        true
    }

    pub fn is_suspect(&self, filter: &str) -> bool {
        self.suspects.iter().any(|suspect| suspect == filter)
            || self.trial.as_ref().is_some_and(|(_, f)| f == filter)
    }

    /// No longer a suspect (nobody holds it any more).
    pub fn forget_suspect(&mut self, filter: &str) {
        self.suspects.retain(|suspect| suspect != filter);
    }

    /// The next suspect to try alone, if none is on trial.
    pub fn next_trial(&mut self) -> Option<String> {
        if self.trial.is_some() {
            return None;
        }
        self.suspects.pop_front()
    }

    /// `filter`'s trial went out as SUBSCRIBE `id`.
    pub fn start_trial(&mut self, id: PacketId, filter: String) {
        self.trial = Some((id, filter));
    }

    /// The trial in flight: its SUBSCRIBE's id and its filter.
    pub fn trial(&self) -> Option<(PacketId, &str)> {
        self.trial
            .as_ref()
            .map(|(id, filter)| (*id, filter.as_str()))
    }

    /// The trial's SUBACK came: the filter is cleared.
    pub fn end_trial(&mut self) -> Option<String> {
        self.trial.take().map(|(_, filter)| filter)
    }

    /// Charges `publisher` one strike; returns its strikes now.
    pub fn strike(&mut self, publisher: &str, now: Instant) -> u8 {
        if self.publishers.len() >= MAX_QUARANTINED && !self.publishers.contains_key(publisher) {
            self.forget_expired(now);
            let soonest = self
                .publishers
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(publisher, _)| publisher.clone());
            if let Some(soonest) = soonest {
                self.publishers.remove(&soonest);
            }
        }
        let until = now + self.policy.duration;
        let entry = self
            .publishers
            .entry(publisher.to_owned())
            .or_insert((0, until));
        if now >= entry.1 {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = until;
        entry.0
    }

    /// Whether `publisher`'s PUBLISHes are refused at `now`.
    pub fn refuses_publisher(&self, publisher: &str, now: Instant) -> bool {
        self.publishers
            .get(publisher)
            .is_some_and(|(strikes, until)| *strikes >= STRIKES_TO_REFUSE && now < *until)
    }

    /// Forgets quarantines and strikes that have ended.
    pub fn forget_expired(&mut self, now: Instant) {
        self.filters.retain(|_, until| now < *until);
        self.publishers.retain(|_, (_, until)| now < *until);
    }

    /// Filters quarantined now.
    pub fn quarantined_filters(&self, now: Instant) -> usize {
        self.filters.values().filter(|until| now < **until).count()
    }
}

fn soonest_end(map: &HashMap<String, Instant>) -> Option<String> {
    map.iter()
        .min_by_key(|(_, until)| **until)
        .map(|(key, _)| key.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn id(value: u16) -> PacketId {
        PacketId::new(value).unwrap()
    }

    #[test]
    fn a_suspect_is_tried_once_and_alone() {
        let mut books = Quarantine::new(QuarantinePolicy::default());
        assert!(books.suspect("a"));
        assert!(!books.suspect("a"), "a suspect is listed once");
        assert!(books.suspect("b"));
        assert_eq!(books.next_trial().as_deref(), Some("a"));
        books.start_trial(id(1), "a".into());
        assert_eq!(books.next_trial(), None, "one trial at a time");
        assert!(!books.suspect("a"), "on trial already");
        assert_eq!(books.end_trial().as_deref(), Some("a"));
        assert_eq!(books.next_trial().as_deref(), Some("b"));
    }

    #[test]
    fn a_quarantine_ends_after_its_duration() {
        let policy = QuarantinePolicy {
            duration: Duration::from_secs(60),
            ..QuarantinePolicy::default()
        };
        let mut books = Quarantine::new(policy);
        let start = crate::test_clock::start();
        books.suspect("a");
        books.quarantine_filter("a", start);
        assert!(!books.is_suspect("a"));
        assert!(books.holds_filter("a", start + Duration::from_secs(59)));
        assert!(!books.holds_filter("a", start + Duration::from_secs(60)));
        books.forget_expired(start + Duration::from_secs(60));
        assert_eq!(books.quarantined_filters(start), 0);
    }

    #[test]
    fn two_strikes_refuse_a_publisher_until_forgiven() {
        let mut books = Quarantine::new(QuarantinePolicy::default());
        let start = crate::test_clock::start();
        assert_eq!(books.strike("app", start), 1);
        assert!(!books.refuses_publisher("app", start));
        assert_eq!(books.strike("app", start), 2);
        assert!(books.refuses_publisher("app", start));
        let later = start + Duration::from_secs(3600);
        assert!(!books.refuses_publisher("app", later));
        assert_eq!(books.strike("app", later), 1, "forgiven strikes restart");
    }

    #[test]
    fn the_books_stay_bounded() {
        let mut books = Quarantine::new(QuarantinePolicy::default());
        let start = crate::test_clock::start();
        for n in 0..(MAX_QUARANTINED + 10) {
            books.quarantine_filter(&format!("f/{n}"), start + Duration::from_millis(n as u64));
            books.strike(&format!("p/{n}"), start);
            books.suspect(&format!("s/{n}"));
        }
        assert_eq!(books.filters.len(), MAX_QUARANTINED);
        assert_eq!(books.publishers.len(), MAX_QUARANTINED);
        assert_eq!(books.suspects.len(), MAX_SUSPECTS);
        assert!(
            !books.holds_filter("f/0", start),
            "the soonest to end went first"
        );
    }
}
