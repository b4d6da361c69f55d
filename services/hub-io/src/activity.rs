//! What a hub's traffic looks like from outside: PUBLISHes from the printer
//! and to it, counted in the last minute, and when the printer last sent
//! one. The driver writes it; the edge's console and tenant API read it
//! from the hub's handle.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far apart the samples the last minute is counted from are.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: a minute of them, and one more for the minute's start.
const SAMPLES: usize = 13;

/// A hub's traffic, shared between its driver and its handles.
#[derive(Debug)]
pub struct HubActivity {
    from_printer: AtomicU64,
    to_printer: AtomicU64,
    /// Unix milliseconds of the printer's last PUBLISH; 0 before the first.
    last_printer_message_ms: AtomicU64,
    /// The totals every [`SAMPLE_EVERY`], oldest first.
    samples: Mutex<Samples>,
}

#[derive(Debug)]
struct Samples {
    next_at: Instant,
    taken: std::collections::VecDeque<(Instant, u64, u64)>,
}

/// PUBLISHes counted over the last minute (or since the hub started, when
/// that is less than a minute ago).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub from_printer_last_minute: u64,
    pub to_printer_last_minute: u64,
    /// Unix milliseconds of the printer's last PUBLISH to this hub.
    pub last_printer_message_ms: Option<u64>,
}

impl HubActivity {
    pub fn new(now: Instant) -> HubActivity {
        let mut taken = std::collections::VecDeque::with_capacity(SAMPLES);
        taken.push_back((now, 0, 0));
        HubActivity {
            from_printer: AtomicU64::new(0),
            to_printer: AtomicU64::new(0),
            last_printer_message_ms: AtomicU64::new(0),
            samples: Mutex::new(Samples {
                next_at: now + SAMPLE_EVERY,
                taken,
            }),
        }
    }

    /// The printer sent a PUBLISH.
    pub fn from_printer(&self) {
        self.from_printer.fetch_add(1, Ordering::Relaxed);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        self.last_printer_message_ms
            .store(millis, Ordering::Relaxed);
    }

    /// An app's PUBLISH was handed to the hub for the printer.
    pub fn to_printer(&self) {
        self.to_printer.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a sample when one is due (the driver calls it as it loops).
    pub fn sample(&self, now: Instant) {
        let Ok(mut samples) = self.samples.try_lock() else {
            return;
        };
        if now < samples.next_at {
            return;
        }
        samples.next_at = now + SAMPLE_EVERY;
        if samples.taken.len() == SAMPLES {
            samples.taken.pop_front();
        }
        let totals = (
            now,
            self.from_printer.load(Ordering::Relaxed),
            self.to_printer.load(Ordering::Relaxed),
        );
        samples.taken.push_back(totals);
    }

    /// The traffic of the last minute, counted from the sample a minute
    /// old (at most [`SAMPLE_EVERY`] more).
    pub fn traffic(&self, now: Instant) -> Traffic {
        self.sample(now);
        let from = self.from_printer.load(Ordering::Relaxed);
        let to = self.to_printer.load(Ordering::Relaxed);
        let minute_ago = now.checked_sub(Duration::from_secs(60));
        let (from_then, to_then) = self
            .samples
            .lock()
            .map(|samples| {
                samples
                    .taken
                    .iter()
                    .rev()
                    .find(|(at, _, _)| minute_ago.is_some_and(|minute_ago| *at <= minute_ago))
                    .or(samples.taken.front())
                    .map_or((0, 0), |(_, from, to)| (*from, *to))
            })
            .unwrap_or((0, 0));
        let last = self.last_printer_message_ms.load(Ordering::Relaxed);
        Traffic {
            from_printer_last_minute: from.saturating_sub(from_then),
            to_printer_last_minute: to.saturating_sub(to_then),
            last_printer_message_ms: (last != 0).then_some(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_last_minute_from_samples() {
        let start = Instant::now();
        let activity = HubActivity::new(start);
        for second in 1..=120u64 {
            activity.from_printer();
            if second % 2 == 0 {
                activity.to_printer();
            }
            activity.sample(start + Duration::from_secs(second));
        }
        let traffic = activity.traffic(start + Duration::from_secs(120));
        // The sample a minute old is at most 5 s older than that.
        assert!(
            (60..=65).contains(&traffic.from_printer_last_minute),
            "{traffic:?}"
        );
        assert!(
            (30..=33).contains(&traffic.to_printer_last_minute),
            "{traffic:?}"
        );
        assert!(traffic.last_printer_message_ms.is_some());
    }

    #[test]
    fn a_young_hub_counts_since_it_started() {
        let start = Instant::now();
        let activity = HubActivity::new(start);
        for _ in 0..7 {
            activity.from_printer();
        }
        let traffic = activity.traffic(start + Duration::from_secs(10));
        assert_eq!(traffic.from_printer_last_minute, 7);
        assert_eq!(traffic.to_printer_last_minute, 0);
    }

    #[test]
    fn no_message_yet_is_none() {
        let activity = HubActivity::new(Instant::now());
        assert_eq!(
            activity.traffic(Instant::now()).last_printer_message_ms,
            None
        );
    }
}
