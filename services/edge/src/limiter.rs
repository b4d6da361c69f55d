//! Failed authentications per client IP, in fixed one-minute windows, so
//! that guessing keys from one address stops being cheap.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Most addresses tracked at once; past that, expired windows are swept and
/// new addresses are not tracked until there is room (memory stays bounded).
const MAX_TRACKED: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct FailureLimiter {
    allowed_per_window: u32,
    windows: DashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    pub fn new(allowed_per_window: u32) -> FailureLimiter {
        FailureLimiter {
            allowed_per_window,
            windows: DashMap::new(),
        }
    }

    /// Whether `ip` used up its failures for the current window.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.windows.get(&ip).is_some_and(|entry| {
            now.duration_since(entry.0) < WINDOW && entry.1 >= self.allowed_per_window
        })
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        if self.windows.len() >= MAX_TRACKED && !self.windows.contains_key(&ip) {
            self.windows
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if self.windows.len() >= MAX_TRACKED {
                return;
            }
        }
        let mut entry = self.windows.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_allowance_until_the_window_passes() {
        let limiter = FailureLimiter::new(2);
        let ip: IpAddr = [192, 0, 2, 1].into();
        let other: IpAddr = [192, 0, 2, 2].into();
        let start = Instant::now();
        limiter.record_failure(ip, start);
        assert!(!limiter.is_blocked(ip, start));
        limiter.record_failure(ip, start);
        assert!(limiter.is_blocked(ip, start));
        assert!(!limiter.is_blocked(other, start));
        let later = start + WINDOW;
        assert!(!limiter.is_blocked(ip, later));
        limiter.record_failure(ip, later);
        assert!(!limiter.is_blocked(ip, later));
    }
}
