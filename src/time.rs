//! Clock readings in milliseconds: one definition for the whole crate.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time: milliseconds since the Unix epoch (0 if the clock is before 1970,
/// `i64::MAX` past the year 292 million).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whole milliseconds of `d`, saturating at `u64::MAX` (for monotonic clocks and timeouts).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_ms_is_after_2020_and_millis_saturates() {
        // 2020-01-01T00:00:00Z: a reading before that means the unit or epoch is wrong.
        assert!(now_ms() > 1_577_836_800_000);
        assert_eq!(millis(Duration::from_micros(2_500)), 2);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }
}
