//! Timestamped payloads, percentiles, and a progress line.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// What a stamped message is for.
pub mod kind {
    /// Sent until every subscriber has seen one; not measured.
    pub const WARM_UP: u8 = 0;
    pub const DELTA: u8 = 1;
    pub const FULL_REPORT: u8 = 2;
    /// The last message of a run.
    pub const END: u8 = 255;
}

/// A payload of `size` bytes (at least 17) that starts with its send time
/// (nanoseconds since `epoch`), a sequence number and its kind; the rest is
/// JSON-ish filler.
pub fn stamped(epoch: Instant, sequence: u64, kind: u8, size: usize) -> Bytes {
    let mut payload = BytesMut::with_capacity(size.max(17));
    payload.put_u64(epoch.elapsed().as_nanos() as u64);
    payload.put_u64(sequence);
    payload.put_u8(kind);
    payload.resize(size.max(17), b'0');
    payload.freeze()
}

/// What a stamped payload says, read on arrival.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    pub kind: u8,
    pub sequence: u64,
    /// Printer → here.
    pub latency: Duration,
}

pub fn read_stamp(epoch: Instant, payload: &[u8]) -> Option<Stamp> {
    let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let sequence = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    let kind = *payload.get(16)?;
    let now = epoch.elapsed().as_nanos() as u64;
    Some(Stamp {
        kind,
        sequence,
        latency: Duration::from_nanos(now.saturating_sub(sent)),
    })
}

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() - 1) as f64 * q).round() as usize;
            samples[index].as_nanos() as f64 / 1_000.0
        };
        Percentiles {
            count: samples.len(),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            max_us: at(1.0),
        }
    }
}

/// "123 µs" or "4.5 ms".
pub fn micros(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1} ms", value / 1_000.0)
    } else if value >= 1_000.0 {
        format!("{:.2} ms", value / 1_000.0)
    } else {
        format!("{value:.0} µs")
    }
}

/// A progress line on stderr: rewritten in place on a terminal, one line
/// every few seconds otherwise.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    inner: Arc<ProgressState>,
}

#[derive(Debug, Default)]
struct ProgressState {
    label: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn start() -> Progress {
        let progress = Progress::default();
        let shown = progress.clone();
        tokio::spawn(async move {
            let terminal = std::io::stderr().is_terminal();
            let every = if terminal {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            };
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let label = shown
                    .inner
                    .label
                    .lock()
                    .map(|l| l.clone())
                    .unwrap_or_default();
                if label.is_empty() {
                    continue;
                }
                let done = shown.inner.done.load(Ordering::Relaxed);
                let total = shown.inner.total.load(Ordering::Relaxed);
                let line = format!("  … {label}: {done}/{total}");
                let mut err = std::io::stderr();
                if terminal {
                    let _ = write!(err, "\r{line:<78}\r");
                } else {
                    let _ = writeln!(err, "{line}");
                }
            }
        });
        progress
    }

    /// Names the step under way and its size.
    pub fn step(&self, label: impl Into<String>, total: u64) {
        if let Ok(mut current) = self.inner.label.lock() {
            *current = label.into();
        }
        self.inner.done.store(0, Ordering::Relaxed);
        self.inner.total.store(total, Ordering::Relaxed);
    }

    pub fn add(&self, count: u64) {
        self.inner.done.fetch_add(count, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        if let Ok(mut current) = self.inner.label.lock() {
            current.clear();
        }
        if std::io::stderr().is_terminal() {
            let _ = write!(std::io::stderr(), "\r{:<80}\r", "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        samples.reverse();
        let p = Percentiles::of(&mut samples);
        assert_eq!(p.count, 100);
        assert_eq!(p.p50_us, 51.0);
        assert_eq!(p.p90_us, 90.0);
        assert_eq!(p.p99_us, 99.0);
        assert_eq!(p.max_us, 100.0);
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[test]
    fn a_stamp_reads_back_its_kind_sequence_and_age() {
        let epoch = Instant::now();
        let payload = stamped(epoch, 42, kind::FULL_REPORT, 4_400);
        assert_eq!(payload.len(), 4_400);
        let stamp = read_stamp(epoch, &payload).unwrap();
        assert_eq!((stamp.kind, stamp.sequence), (kind::FULL_REPORT, 42));
        assert!(stamp.latency < Duration::from_secs(5));
        assert!(read_stamp(epoch, &payload[..10]).is_none());
        assert_eq!(stamped(epoch, 0, kind::DELTA, 3).len(), 17);
    }

    #[test]
    fn durations_print_in_the_unit_that_reads_best() {
        assert_eq!(micros(141.2), "141 µs");
        assert_eq!(micros(2_204.0), "2.20 ms");
        assert_eq!(micros(39_210.0), "39.2 ms");
    }
}
