//! Failed authentications, limited per client address and per API key id,
//! in fixed one-minute windows: guessing keys from one address, or one
//! key's secret from many, stops being cheap.
//!
//! Only attempts that need the store are limited. A credential the
//! authenticator's cache already knows to be valid gets in from a busy
//! address, so one guesser behind a NAT does not lock out everyone behind
//! it; a malformed one is refused without the store, and still counts.
//!
//! Agents' HELLOs are limited the same way per credential id, but never
//! per address: many owners' agents share a carrier's NAT, and a valid
//! agent credential is always checked (see the edge's `tunnel` module).
//!
//! The limit is exact under concurrency: an attempt reserves its place in
//! every window it is counted in before the lookup starts ([`Attempt`]),
//! and gives it back only if it succeeds.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Most windows tracked at once; past that, expired windows are swept and
/// new ones are not tracked until there is room (memory stays bounded).
const MAX_TRACKED: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

/// What a failure is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Address(IpAddr),
    /// An API key id (the public half of a key).
    KeyId(String),
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    /// Attempts reserved and not yet finished.
    in_flight: u32,
}

#[derive(Debug)]
pub struct FailureLimiter {
    allowed_per_window: u32,
    windows: DashMap<LimitKey, Window>,
}

/// One attempt's reservation. Dropped without [`Attempt::failed`], it is
/// given back (a success, or a store that could not answer).
#[derive(Debug)]
pub struct Attempt {
    limiter: Arc<FailureLimiter>,
    keys: Vec<LimitKey>,
    failed: bool,
}

impl FailureLimiter {
    pub fn new(allowed_per_window: u32) -> FailureLimiter {
        FailureLimiter {
            allowed_per_window,
            windows: DashMap::new(),
        }
    }

    /// Reserves one attempt in the window of each of `keys`; `None` when any
    /// of them has no room left (then nothing is reserved).
    pub fn begin(self: &Arc<Self>, keys: Vec<LimitKey>, now: Instant) -> Option<Attempt> {
        for (index, key) in keys.iter().enumerate() {
            if !self.reserve(key, now) {
                for reserved in &keys[..index] {
                    self.release(reserved);
                }
                return None;
            }
        }
        Some(Attempt {
            limiter: self.clone(),
            keys,
            failed: false,
        })
    }

    /// Counts a failure that needed no reservation (decided without the
    /// store: a malformed credential, a cached refusal).
    pub fn record_failure(&self, keys: &[LimitKey], now: Instant) {
        for key in keys {
            if let Some(mut window) = self.window(key, now) {
                window.failures = window.failures.saturating_add(1);
            }
        }
    }

    /// Whether `key` has no room left in its current window.
    pub fn is_blocked(&self, key: &LimitKey, now: Instant) -> bool {
        self.windows.get(key).is_some_and(|window| {
            now.duration_since(window.start) < WINDOW
                && window.failures + window.in_flight >= self.allowed_per_window
        })
    }

    fn reserve(&self, key: &LimitKey, now: Instant) -> bool {
        let Some(mut window) = self.window(key, now) else {
            // Not tracked (the table is full of live windows): let it be.
            return true;
        };
        if window.failures + window.in_flight >= self.allowed_per_window {
            return false;
        }
        window.in_flight += 1;
        true
    }

    fn release(&self, key: &LimitKey) {
        if let Some(mut window) = self.windows.get_mut(key) {
            window.in_flight = window.in_flight.saturating_sub(1);
        }
    }

    fn fail(&self, key: &LimitKey) {
        if let Some(mut window) = self.windows.get_mut(key) {
            window.in_flight = window.in_flight.saturating_sub(1);
            window.failures = window.failures.saturating_add(1);
        }
    }

    /// The current window of `key`, started afresh when the last one ended.
    fn window(
        &self,
        key: &LimitKey,
        now: Instant,
    ) -> Option<dashmap::mapref::one::RefMut<'_, LimitKey, Window>> {
        if self.windows.len() >= MAX_TRACKED && !self.windows.contains_key(key) {
            self.windows.retain(|_, window| {
                now.duration_since(window.start) < WINDOW || window.in_flight > 0
            });
            if self.windows.len() >= MAX_TRACKED {
                return None;
            }
        }
        let mut window = self.windows.entry(key.clone()).or_insert(Window {
            start: now,
            failures: 0,
            in_flight: 0,
        });
        if now.duration_since(window.start) >= WINDOW {
            window.start = now;
            window.failures = 0;
        }
        Some(window)
    }
}

impl Attempt {
    /// The attempt failed: its reservation becomes a failure.
    pub fn failed(mut self) {
        self.failed = true;
        for key in &self.keys {
            self.limiter.fail(key);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.failed {
            for key in &self.keys {
                self.limiter.release(key);
            }
        }
    }
}

/// Agent credentials this instance accepted, by their public id, as a
/// digest of the whole credential: when guessers have used up an id's
/// allowance, its real agent still gets in. Bounded: when full, it starts
/// over (the next HELLO of each agent is checked against the store as
/// usual).
#[derive(Debug, Default)]
pub struct AcceptedCredentials {
    digests: DashMap<String, [u8; 32]>,
}

impl AcceptedCredentials {
    pub fn remember(&self, id: &str, credential: &str) {
        if self.digests.len() >= MAX_TRACKED && !self.digests.contains_key(id) {
            self.digests.clear();
        }
        self.digests.insert(id.to_owned(), digest(credential));
    }

    /// Whether `credential` is the one last accepted under `id`.
    pub fn is_known(&self, id: &str, credential: &str) -> bool {
        // Digests, not secrets, are compared: timing reveals nothing an
        // attacker can steer towards the secret.
        self.digests
            .get(id)
            .is_some_and(|known| *known == digest(credential))
    }
}

fn digest(credential: &str) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(
        ring::digest::digest(&ring::digest::SHA256, credential.as_bytes()).as_ref(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> LimitKey {
        LimitKey::Address([192, 0, 2, last].into())
    }

    #[test]
    fn blocks_after_the_allowance_until_the_window_passes() {
        let limiter = Arc::new(FailureLimiter::new(2));
        let start = Instant::now();
        for _ in 0..2 {
            limiter.begin(vec![address(1)], start).unwrap().failed();
        }
        assert!(limiter.is_blocked(&address(1), start));
        assert!(limiter.begin(vec![address(1)], start).is_none());
        assert!(!limiter.is_blocked(&address(2), start));
        let later = start + WINDOW;
        assert!(!limiter.is_blocked(&address(1), later));
        limiter.begin(vec![address(1)], later).unwrap().failed();
        assert!(!limiter.is_blocked(&address(1), later));
    }

    #[test]
    fn reservations_make_the_limit_exact_and_successes_give_them_back() {
        let limiter = Arc::new(FailureLimiter::new(3));
        let now = Instant::now();
        // Ten attempts at once: three get a place, whatever they turn into.
        let attempts: Vec<_> = (0..10)
            .filter_map(|_| limiter.begin(vec![address(1)], now))
            .collect();
        assert_eq!(attempts.len(), 3);
        // Two succeed and leave; their places are free again.
        let mut attempts = attempts.into_iter();
        drop(attempts.next());
        drop(attempts.next());
        let again: Vec<_> = (0..10)
            .filter_map(|_| limiter.begin(vec![address(1)], now))
            .collect();
        assert_eq!(again.len(), 2);
        for attempt in attempts.chain(again) {
            attempt.failed();
        }
        assert!(limiter.is_blocked(&address(1), now));
    }

    #[test]
    fn one_keys_guesses_from_many_addresses_are_limited_by_its_id() {
        let limiter = Arc::new(FailureLimiter::new(5));
        let now = Instant::now();
        let key = LimitKey::KeyId("abcdefghij".into());
        let mut admitted = 0;
        for last in 0..100 {
            if let Some(attempt) = limiter.begin(vec![address(last), key.clone()], now) {
                admitted += 1;
                attempt.failed();
            }
        }
        assert_eq!(admitted, 5);
        // A refused attempt reserved nothing on its address.
        assert!(!limiter.is_blocked(&address(99), now));
    }

    #[test]
    fn an_accepted_credential_is_known_by_its_id_and_whole_value_only() {
        let accepted = AcceptedCredentials::default();
        accepted.remember("abcdefghij", "rla_abcdefghij_secret_check");
        assert!(accepted.is_known("abcdefghij", "rla_abcdefghij_secret_check"));
        assert!(!accepted.is_known("abcdefghij", "rla_abcdefghij_guessed_check"));
        assert!(!accepted.is_known("klmnopqrst", "rla_abcdefghij_secret_check"));
    }
}

/// Bounds on guessing pairing codes: wrong codes per address, per tenant
/// (its signed-in owners, from any address) and in total, each a minute's
/// window. A code is checked only when all three have room; a right code
/// costs nothing.
#[derive(Debug)]
pub struct GuessLimits {
    pub per_address: Arc<FailureLimiter>,
    pub per_tenant: Arc<FailureLimiter>,
    pub total: Arc<FailureLimiter>,
}

/// Wrong pairing codes per address and minute.
pub const GUESSES_PER_ADDRESS: u32 = 10;
/// Wrong pairing codes per tenant and minute.
pub const GUESSES_PER_TENANT: u32 = 20;
/// Wrong pairing codes per minute, everyone together: with 20^8 codes and
/// at most a few thousand pending, a guess hits one in millions.
pub const GUESSES_IN_TOTAL: u32 = 600;

impl Default for GuessLimits {
    fn default() -> Self {
        GuessLimits {
            per_address: Arc::new(FailureLimiter::new(GUESSES_PER_ADDRESS)),
            per_tenant: Arc::new(FailureLimiter::new(GUESSES_PER_TENANT)),
            total: Arc::new(FailureLimiter::new(GUESSES_IN_TOTAL)),
        }
    }
}

/// Which of [`GuessLimits`] refused a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuessRefusal {
    Address,
    Tenant,
    Total,
}

impl GuessLimits {
    /// Whether a code may be checked now for `tenant` from `address`.
    pub fn check(&self, address: IpAddr, tenant: &str, now: Instant) -> Result<(), GuessRefusal> {
        if self
            .per_address
            .is_blocked(&LimitKey::Address(address), now)
        {
            return Err(GuessRefusal::Address);
        }
        if self
            .per_tenant
            .is_blocked(&LimitKey::KeyId(tenant.to_owned()), now)
        {
            return Err(GuessRefusal::Tenant);
        }
        if self.total.is_blocked(&LimitKey::KeyId(String::new()), now) {
            return Err(GuessRefusal::Total);
        }
        Ok(())
    }

    /// Counts a wrong code against all three.
    pub fn wrong(&self, address: IpAddr, tenant: &str, now: Instant) {
        self.per_address
            .record_failure(&[LimitKey::Address(address)], now);
        self.per_tenant
            .record_failure(&[LimitKey::KeyId(tenant.to_owned())], now);
        self.total
            .record_failure(&[LimitKey::KeyId(String::new())], now);
    }
}
