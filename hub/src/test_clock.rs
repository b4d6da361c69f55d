//! The tests' manual clock: an arbitrary starting instant, moved by hand.
//! The hub never reads the clock; its tests start from this one.

use std::time::Instant;

/// Where a test's time starts.
pub(crate) fn start() -> Instant {
    Instant::now()
}
