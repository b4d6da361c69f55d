//! What a device's sessions may ask of its printer: the topic policy the hub
//! checks before anything reaches the upstream, and the per-session budget
//! for subscription churn towards it. Both are plain data and arithmetic on
//! a passed-in clock, like the rest of the hub's state.
//!
//! A refused SUBSCRIBE filter gets SUBACK 0x80 and costs the printer
//! nothing. A refused PUBLISH is acknowledged and dropped, as Mosquitto does
//! with a publish its ACL denies (MQTT 3.1.1 has no negative PUBACK). A
//! refused will refuses the CONNECT.

use std::time::{Duration, Instant};

use relay_proto::topic::{filter_covers, filters_overlap, topic_matches};

/// Which filters a session may subscribe to and which topics it may publish
/// to, for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPolicy {
    /// A filter is allowed when one of these covers it (every topic it
    /// matches is matched here too); a topic when one of these matches it.
    /// Empty: nothing is allowed.
    pub allow: Vec<String>,
    /// Refused even inside `allow`: a filter that could match any topic
    /// matched here, and a topic matched here.
    pub deny: Vec<String>,
    /// Whether a client may publish with RETAIN=1 (and leave a retained
    /// will).
    pub retain: bool,
}

/// Why a publish (or a will) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishRefusal {
    #[error("topic not allowed on this device")]
    Topic,
    #[error("retained messages not allowed on this device")]
    Retain,
}

impl TopicPolicy {
    /// Anything but the broker's own `$SYS` tree: the default for a generic
    /// broker.
    pub fn generic() -> TopicPolicy {
        TopicPolicy {
            allow: vec!["#".into()],
            deny: vec!["$SYS/#".into()],
            retain: true,
        }
    }

    /// Everything, for tests and the hub's defaults.
    pub fn open() -> TopicPolicy {
        TopicPolicy {
            allow: vec!["#".into(), "$SYS/#".into()],
            deny: Vec::new(),
            retain: true,
        }
    }

    pub fn permits_filter(&self, filter: &str) -> bool {
        self.allow.iter().any(|allow| filter_covers(allow, filter))
            && !self.deny.iter().any(|deny| filters_overlap(deny, filter))
    }

    pub fn permits_topic(&self, topic: &str) -> bool {
        self.allow.iter().any(|allow| topic_matches(allow, topic))
            && !self.deny.iter().any(|deny| topic_matches(deny, topic))
    }

    /// Whether a client may publish to `topic` with `retain`.
    pub fn check_publish(&self, topic: &str, retain: bool) -> Result<(), PublishRefusal> {
        if !self.permits_topic(topic) {
            return Err(PublishRefusal::Topic);
        }
        if retain && !self.retain {
            return Err(PublishRefusal::Retain);
        }
        Ok(())
    }
}

/// How many SUBSCRIBE and UNSUBSCRIBE packets one session may cause towards
/// the printer: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChurnLimit {
    pub burst: u32,
    pub per_minute: u32,
}

impl Default for ChurnLimit {
    /// An app subscribes a few filters when it connects and changes them
    /// now and then; 100 at once and 60 a minute is far above that and far
    /// below what a printer notices.
    fn default() -> ChurnLimit {
        ChurnLimit {
            burst: 100,
            per_minute: 60,
        }
    }
}

/// How fast the device's sessions together may publish to the printer:
/// `burst` at once, then `per_second`. Excess QoS 0 is dropped; excess
/// QoS 1 and 2 waits (without its PUBACK) in order, up to
/// `max_waiting_per_session` per session, past which the session is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRate {
    pub per_second: u32,
    pub burst: u32,
    pub max_waiting_per_session: usize,
}

impl PublishRate {
    /// A generic broker: far above what the load test's publish scenario
    /// sends (1,000 QoS 1 PUBLISHes from 10 clients), far below the
    /// 19,000/s one client managed to put on a printer before.
    pub fn generic() -> PublishRate {
        PublishRate {
            per_second: 2_000,
            burst: 2_000,
            max_waiting_per_session: 100,
        }
    }
}

/// A token bucket on the hub's clock, refilled at `per_second` up to
/// `burst`.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub(crate) fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            updated: now,
        }
    }

    fn refill(&mut self, per_second: f64, burst: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * per_second).min(f64::from(burst));
    }

    /// Takes one token; false when there is none.
    pub(crate) fn take(&mut self, per_second: f64, burst: u32, now: Instant) -> bool {
        self.refill(per_second, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Returns a token taken for nothing.
    pub(crate) fn give_back(&mut self) {
        self.tokens += 1.0;
    }

    /// When the next token will be there.
    pub(crate) fn next_token(&self, per_second: f64) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.updated + Duration::from_secs_f64(missing / per_second.max(f64::MIN_POSITIVE))
    }
}

/// One session's churn budget: a token bucket on the hub's clock.
#[derive(Debug, Clone)]
pub(crate) struct ChurnBudget {
    tokens: f64,
    updated: Instant,
}

impl ChurnBudget {
    pub(crate) fn new(limit: ChurnLimit, now: Instant) -> ChurnBudget {
        ChurnBudget {
            tokens: f64::from(limit.burst),
            updated: now,
        }
    }

    /// Takes one upstream packet's worth; false when the budget is spent.
    pub(crate) fn take(&mut self, limit: ChurnLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = now;
        let refill = elapsed.as_secs_f64() * f64::from(limit.per_minute) / 60.0;
        self.tokens = (self.tokens + refill).min(f64::from(limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long a spent budget takes to allow one more packet (for messages).
pub fn churn_refill_interval(limit: ChurnLimit) -> Duration {
    Duration::from_secs(60) / limit.per_minute.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bambu_like() -> TopicPolicy {
        TopicPolicy {
            allow: vec!["device/X1/report".into(), "device/X1/request".into()],
            deny: Vec::new(),
            retain: false,
        }
    }

    #[test]
    fn another_serial_and_wide_filters_are_refused() {
        let policy = bambu_like();
        assert!(policy.permits_filter("device/X1/report"));
        for refused in [
            "device/X2/report",
            "device/+/report",
            "#",
            "device/X1/#",
            "$SYS/#",
        ] {
            assert!(!policy.permits_filter(refused), "{refused}");
        }
        assert_eq!(policy.check_publish("device/X1/request", false), Ok(()));
        assert_eq!(
            policy.check_publish("device/X2/request", false),
            Err(PublishRefusal::Topic)
        );
        assert_eq!(
            policy.check_publish("device/X1/request", true),
            Err(PublishRefusal::Retain)
        );
    }

    #[test]
    fn the_generic_policy_allows_all_but_sys() {
        let policy = TopicPolicy::generic();
        for allowed in ["#", "a/+/b", "octoPrint/#"] {
            assert!(policy.permits_filter(allowed), "{allowed}");
        }
        for refused in ["$SYS/#", "$SYS/broker/load", "$SYS/+"] {
            assert!(!policy.permits_filter(refused), "{refused}");
        }
        assert!(!policy.permits_topic("$SYS/x"));
        assert!(policy.permits_topic("a/b"));
    }

    #[test]
    fn the_churn_budget_refills_over_time() {
        let limit = ChurnLimit {
            burst: 2,
            per_minute: 60,
        };
        let start = crate::test_clock::start();
        let mut budget = ChurnBudget::new(limit, start);
        assert!(budget.take(limit, start));
        assert!(budget.take(limit, start));
        assert!(!budget.take(limit, start));
        let later = start + churn_refill_interval(limit);
        assert!(budget.take(limit, later));
        assert!(!budget.take(limit, later));
        // Never more than the burst, however long it waited.
        let much_later = later + Duration::from_secs(3600);
        assert!(budget.take(limit, much_later));
        assert!(budget.take(limit, much_later));
        assert!(!budget.take(limit, much_later));
    }
}
