//! How often the agent may dial the printer.
//!
//! A printer is a small computer with a handful of MQTT client slots, and
//! some firmware is known to restart under "continuous reconnection of MQTT
//! by third-party tools". Whatever makes its connection end (a refused
//! access code, a broker that drops the client for a forbidden SUBSCRIBE, a
//! printer gone silent), the agent dials it:
//!
//! - never more than once a second;
//! - after each connection that failed, or ended by the printer's doing
//!   within a minute of being made, later and later: 1, 2, 4, 8, 16, then
//!   30 s, each jittered by up to a fifth so that many agents behind one
//!   power cut do not come back in step;
//! - at once again (within the one-second floor) after a connection that
//!   lived a minute.
//!
//! [`DialPacing`] keeps those books without IO (time and randomness are
//! passed in); [`PrinterDialler`] waits its turn on tokio's clock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use relay_proto::tunnel::LinkDownReason;

use crate::config::PrinterConfig;
use crate::printer::{self, LinkFailure, PrinterStream};

/// Never two dials closer than this.
pub const MIN_DIAL_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between dials while connections keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff.
pub const HEALTHY_CONNECTION: Duration = Duration::from_secs(60);

/// The dial books of one printer.
#[derive(Debug, Default)]
pub struct DialPacing {
    last_dial: Option<Instant>,
    /// No dial before this.
    next_allowed: Option<Instant>,
    /// Connections in a row that failed or ended early by the printer.
    failures: u32,
    /// Why the last one failed.
    last_failure: Option<LinkDownReason>,
    /// Reconnects, by cause.
    reconnects: BTreeMap<&'static str, u64>,
    /// Dials under way. While connections fail, nobody else dials until
    /// the outcome of the one under way is known.
    dialling: u32,
}

/// The name of a cause, for logs and counts.
pub fn cause_name(reason: LinkDownReason) -> &'static str {
    match reason {
        LinkDownReason::CredentialsRefused => "credentials_refused",
        LinkDownReason::TlsFailure => "tls_failure",
        LinkDownReason::Unreachable => "unreachable",
        LinkDownReason::TooManyClients => "too_many_clients",
        LinkDownReason::Dropped => "dropped",
        LinkDownReason::ProtocolError => "protocol_error",
        LinkDownReason::TimedOut => "timed_out",
        LinkDownReason::Policy => "policy",
        LinkDownReason::NotHere => "not_here",
        LinkDownReason::Other(_) => "other",
    }
}

impl DialPacing {
    /// Takes the next turn to dial if it comes within `patience` of
    /// `now`: `Ok(when)` to dial at, or `Err(wait)` until the next turn.
    pub fn reserve(&mut self, now: Instant, patience: Duration) -> Result<Instant, Duration> {
        if self.dialling > 0 && self.failures > 0 {
            // Backing off: its outcome decides when the next may come.
            return Err(MIN_DIAL_INTERVAL);
        }
        let at = self.next_allowed.map_or(now, |allowed| allowed.max(now));
        let wait = at - now;
        if wait > patience {
            return Err(wait);
        }
        self.last_dial = Some(at);
        self.next_allowed = Some(at + MIN_DIAL_INTERVAL);
        self.dialling += 1;
        Ok(at)
    }

    /// A reserved dial is over, whatever its outcome (told apart by
    /// [`Self::failed`]).
    pub fn dialled(&mut self) {
        self.dialling = self.dialling.saturating_sub(1);
    }

    /// The backoff after `failures` failures in a row, jittered by
    /// `random` in [0, 1).
    fn backoff(failures: u32, random: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(16);
        let base = MIN_DIAL_INTERVAL
            .saturating_mul(1u32 << exponent)
            .min(MAX_BACKOFF);
        let jittered = base.mul_f64(1.0 + 0.2 * random.clamp(0.0, 1.0));
        jittered.clamp(MIN_DIAL_INTERVAL, MAX_BACKOFF)
    }

    /// One more failure in a row, for `cause`: the next dial waits.
    /// Returns the wait from `now`.
    pub fn failed(&mut self, reason: LinkDownReason, now: Instant, random: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(reason);
        *self.reconnects.entry(cause_name(reason)).or_default() += 1;
        let floor = self.last_dial.map_or(now, |dial| dial + MIN_DIAL_INTERVAL);
        let at = floor.max(now + Self::backoff(self.failures, random));
        self.next_allowed = Some(at);
        at - now
    }

    /// A connection that had been made ended after `lived`; `by_printer`
    /// when the printer (or its silence) ended it, not the edge. Returns
    /// the wait before the next dial, when it counts as a failure.
    pub fn ended(
        &mut self,
        lived: Duration,
        by_printer: Option<LinkDownReason>,
        now: Instant,
        random: f64,
    ) -> Option<Duration> {
        if lived >= HEALTHY_CONNECTION {
            self.failures = 0;
            self.last_failure = None;
            if let Some(reason) = by_printer {
                *self.reconnects.entry(cause_name(reason)).or_default() += 1;
            }
            return None;
        }
        let reason = by_printer?;
        Some(self.failed(reason, now, random))
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Why the last connection failed, while failures go on.
    pub fn last_failure(&self) -> Option<LinkDownReason> {
        self.last_failure
    }

    /// Reconnects so far, by cause.
    pub fn reconnects(&self) -> &BTreeMap<&'static str, u64> {
        &self.reconnects
    }
}

/// Dials one printer, in turn: shared by every printer link and the
/// always-on standby of one agent.
#[derive(Debug, Default)]
pub struct PrinterDialler {
    pacing: Mutex<DialPacing>,
}

/// The connection made, or why not.
pub type Dialled = Result<(Box<dyn PrinterStream>, bytes::BytesMut), DialError>;

/// Why [`PrinterDialler::dial`] has no connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    pub failure: LinkFailure,
    /// False when the printer was not dialled at all: its turn is further
    /// off than the caller's patience.
    pub dialled: bool,
}

fn random_fraction() -> f64 {
    let mut bytes = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    f64::from(u16::from_le_bytes(bytes)) / 65_536.0
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A reserved turn to dial; its end lets the next caller reserve.
struct Turn<'a>(&'a PrinterDialler);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.pacing().dialled();
    }
}

impl PrinterDialler {
    pub fn new() -> PrinterDialler {
        PrinterDialler::default()
    }

    fn pacing(&self) -> std::sync::MutexGuard<'_, DialPacing> {
        // The books stay consistent whatever a panicking holder did.
        self.pacing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Dials the printer once its turn comes, if that is within
    /// `patience`; otherwise fails at once, saying when the next turn is,
    /// without touching the printer.
    pub async fn dial(&self, printer: &PrinterConfig, patience: Duration) -> Dialled {
        let reserved = self.pacing().reserve(now(), patience);
        let _turn = match reserved {
            Ok(at) => {
                // Whatever happens to this future, the turn is given back.
                let turn = Turn(self);
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                turn
            }
            Err(wait) => {
                let reason = self
                    .pacing()
                    .last_failure()
                    .unwrap_or(LinkDownReason::Unreachable);
                return Err(DialError {
                    failure: LinkFailure {
                        reason,
                        detail: format!(
                            "the agent is backing off after failed printer connections: next attempt in {} s",
                            wait.as_secs().max(1)
                        ),
                    },
                    dialled: false,
                });
            }
        };
        let dialled = printer::connect(printer).await;
        if let Err(failure) = &dialled {
            let mut pacing = self.pacing();
            let wait = pacing.failed(failure.reason, now(), random_fraction());
            tracing::warn!(
                cause = cause_name(failure.reason),
                detail = %failure.detail,
                failures_in_a_row = pacing.failures(),
                next_attempt_in = ?wait,
                reconnects = ?pacing.reconnects(),
                "printer connection failed; backing off"
            );
        }
        dialled.map_err(|failure| DialError {
            failure,
            dialled: true,
        })
    }

    /// A connection this dialler made ended after `lived`; `by_printer`
    /// names the cause when the printer's side ended it.
    pub fn ended(&self, lived: Duration, by_printer: Option<LinkDownReason>) {
        let mut pacing = self.pacing();
        if let Some(wait) = pacing.ended(lived, by_printer, now(), random_fraction()) {
            tracing::warn!(
                cause = by_printer.map(cause_name).unwrap_or("other"),
                lived = ?lived,
                failures_in_a_row = pacing.failures(),
                next_attempt_in = ?wait,
                reconnects = ?pacing.reconnects(),
                "printer connection ended early; backing off"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A printer that refuses every connection, dialled as soon as
    /// allowed, with a second link asking while each dial is under way.
    fn dial_times(pacing: &mut DialPacing, start: Instant, window: Duration) -> Vec<Duration> {
        let mut now = start;
        let mut dials = Vec::new();
        while now < start + window {
            match pacing.reserve(now, Duration::ZERO) {
                Ok(at) => {
                    if !dials.is_empty() {
                        assert_eq!(pacing.reserve(at, Duration::MAX), Err(MIN_DIAL_INTERVAL));
                    }
                    dials.push(at - start);
                    pacing.failed(LinkDownReason::CredentialsRefused, at, 0.5);
                    pacing.dialled();
                }
                Err(wait) => now += wait,
            }
        }
        dials
    }

    #[test]
    fn a_refusing_printer_is_dialled_at_most_once_a_second_then_more_slowly() {
        let mut pacing = DialPacing::default();
        let start = Instant::now();
        let dials = dial_times(&mut pacing, start, Duration::from_secs(60));
        assert_eq!(dials.len(), 6, "{dials:?}");
        let gaps: Vec<Duration> = dials.windows(2).map(|pair| pair[1] - pair[0]).collect();
        for gap in &gaps {
            assert!(*gap >= MIN_DIAL_INTERVAL && *gap <= MAX_BACKOFF, "{gaps:?}");
        }
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "growing: {gaps:?}");
        assert_eq!(pacing.reconnects()["credentials_refused"], 6);
    }

    #[test]
    fn the_backoff_stops_at_thirty_seconds_and_resets_after_a_healthy_minute() {
        let mut pacing = DialPacing::default();
        let mut now = Instant::now();
        for _ in 0..20 {
            let at = pacing.reserve(now, Duration::MAX).unwrap();
            let wait = pacing.failed(LinkDownReason::Dropped, at, 0.99);
            pacing.dialled();
            assert!(wait <= MAX_BACKOFF, "{wait:?}");
            now = at;
        }
        assert_eq!(pacing.failures(), 20);
        // A connection that lived a minute: back to the one-second floor.
        let at = pacing.reserve(now, Duration::MAX).unwrap();
        pacing.dialled();
        let after = at + HEALTHY_CONNECTION;
        let waited = pacing.ended(
            HEALTHY_CONNECTION,
            Some(LinkDownReason::Dropped),
            after,
            0.5,
        );
        assert_eq!(waited, None);
        assert_eq!(pacing.failures(), 0);
        assert_eq!(pacing.reserve(after, Duration::ZERO), Ok(after));
        // Healthy: a second link may dial beside it, a second later.
        assert_eq!(
            pacing.reserve(after, Duration::MAX),
            Ok(after + MIN_DIAL_INTERVAL)
        );
    }

    #[test]
    fn a_connection_the_printer_drops_at_once_counts_as_a_failure_and_one_the_edge_ends_does_not() {
        let mut pacing = DialPacing::default();
        let start = Instant::now();
        let at = pacing.reserve(start, Duration::ZERO).unwrap();
        pacing.dialled();
        let dropped = pacing.ended(
            Duration::from_millis(5),
            Some(LinkDownReason::Dropped),
            at,
            0.0,
        );
        assert_eq!(dropped, Some(MIN_DIAL_INTERVAL));
        assert_eq!(pacing.failures(), 1);
        let at = pacing.reserve(at, Duration::MAX).unwrap();
        pacing.dialled();
        assert_eq!(pacing.ended(Duration::from_secs(5), None, at, 0.0), None);
        assert_eq!(pacing.failures(), 1, "the edge's doing changes nothing");
        // Past the patience: refused, with the wait.
        pacing.failed(LinkDownReason::Dropped, at, 0.0);
        assert!(pacing.reserve(at, Duration::ZERO).is_err());
    }
}
