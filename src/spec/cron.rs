//! Cron: translation of standard 5-field expressions into the `cron` crate's form, and the
//! next fire time on a time zone's wall clock.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

/// One field of a standard cron expression.
struct CronField {
    name: &'static str,
    min: u32,
    max: u32,
    /// Upper bound that `*` expands to (differs from `max` for weekdays, where 7 = 0).
    star_max: u32,
    /// Three-letter names, the first one having the value `min` (empty = numbers only).
    names: &'static [&'static str],
}

const SECOND: CronField = CronField {
    name: "second",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
};
const MINUTE: CronField = CronField {
    name: "minute",
    min: 0,
    max: 59,
    star_max: 59,
    names: &[],
};
const HOUR: CronField = CronField {
    name: "hour",
    min: 0,
    max: 23,
    star_max: 23,
    names: &[],
};
const DAY_OF_MONTH: CronField = CronField {
    name: "day of month",
    min: 1,
    max: 31,
    star_max: 31,
    names: &[],
};
const MONTH: CronField = CronField {
    name: "month",
    min: 1,
    max: 12,
    star_max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const DAY_OF_WEEK: CronField = CronField {
    name: "day of week",
    min: 0,
    max: 7,
    star_max: 6,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

/// Weekday names in the `cron` crate's order (it numbers SUN=1..SAT=7; we emit names).
const CRATE_WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

impl CronField {
    fn value(&self, text: &str) -> Result<u32, String> {
        let n = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u32>()
                .map_err(|_| format!("{}: {text:?} is out of range", self.name))?
        } else {
            let upper = text.to_ascii_uppercase();
            let idx = self
                .names
                .iter()
                .position(|n| *n == upper)
                .ok_or_else(|| format!("{}: {text:?} is not a number", self.name))?;
            self.min + u32::try_from(idx).map_err(|e| e.to_string())?
        };
        if n < self.min || n > self.max {
            return Err(format!(
                "{}: {n} is out of range {}-{}",
                self.name, self.min, self.max
            ));
        }
        Ok(n)
    }

    /// Expands a field (`*`, lists, ranges `a-b`, steps `*/n`, `a-b/n`, `a/n`) to its values.
    fn expand(&self, text: &str) -> Result<BTreeSet<u32>, String> {
        let mut out = BTreeSet::new();
        if text.is_empty() {
            return Err(format!("{}: empty field", self.name));
        }
        for item in text.split(',') {
            let (base, step) = match item.split_once('/') {
                Some((base, step)) => {
                    let step: u32 = step
                        .parse()
                        .map_err(|_| format!("{}: bad step {step:?}", self.name))?;
                    if step == 0 {
                        return Err(format!("{}: step must be at least 1", self.name));
                    }
                    (base, Some(step))
                }
                None => (item, None),
            };
            let (lo, hi) = if base == "*" {
                (self.min, self.star_max)
            } else if let Some((a, b)) = base.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("{}: range {base:?} is reversed", self.name));
                }
                (a, b)
            } else {
                let a = self.value(base)?;
                // `a/n` means from a to the end of the range.
                (
                    a,
                    if step.is_some() {
                        self.star_max.max(a)
                    } else {
                        a
                    },
                )
            };
            let step = step.unwrap_or(1);
            let mut v = lo;
            while v <= hi {
                out.insert(v);
                v = match v.checked_add(step) {
                    Some(next) => next,
                    None => break,
                };
            }
        }
        Ok(out)
    }

    /// Renders a value set for the `cron` crate (`*` when it covers the whole field).
    fn render(&self, values: &BTreeSet<u32>) -> String {
        let full = (self.min..=self.star_max).all(|v| values.contains(&v));
        if full {
            return "*".to_owned();
        }
        let items: Vec<String> = values.iter().map(u32::to_string).collect();
        items.join(",")
    }
}

/// Converts a standard cron expression into a [`cron::Schedule`].
///
/// Accepted: 5 fields `minute hour day-of-month month day-of-week` (weekday 0-7, 0 and 7 =
/// Sunday; month and weekday also accept three-letter names), or 6 fields with a leading
/// seconds field (same rules otherwise, so weekday numbers keep their standard meaning), or
/// one of `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`, `@annually`.
/// Each field supports `*`, lists, ranges and steps; not `?`, `L`, `W` or `#`.
///
/// Restricting both day-of-month and day-of-week is rejected: standard cron fires when
/// *either* matches, which a single `cron::Schedule` (which requires both) cannot express.
pub fn cron_schedule(expr: &str) -> Result<cron::Schedule, String> {
    let expanded = match expr.trim() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other => other,
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let (second, rest) = match fields.as_slice() {
        [m, h, dom, mon, dow] => ("0".to_owned(), [*m, *h, *dom, *mon, *dow]),
        [s, m, h, dom, mon, dow] => {
            let seconds = SECOND.expand(s)?;
            (SECOND.render(&seconds), [*m, *h, *dom, *mon, *dow])
        }
        _ => {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
    };
    let [m, h, dom, mon, dow] = rest;
    let minutes = MINUTE.expand(m)?;
    let hours = HOUR.expand(h)?;
    let days = DAY_OF_MONTH.expand(dom)?;
    let months = MONTH.expand(mon)?;
    let weekdays: BTreeSet<u32> = DAY_OF_WEEK
        .expand(dow)?
        .into_iter()
        .map(|d| d % 7)
        .collect();
    if !dom.starts_with('*') && !dow.starts_with('*') {
        return Err(
            "restricting both day-of-month and day-of-week is not supported; use '*' for one"
                .to_owned(),
        );
    }
    let weekday_text = if (0..7).all(|d| weekdays.contains(&d)) {
        "*".to_owned()
    } else {
        let names: Vec<&str> = weekdays
            .iter()
            .filter_map(|d| CRATE_WEEKDAYS.get(usize::try_from(*d).ok()?).copied())
            .collect();
        names.join(",")
    };
    let translated = format!(
        "{second} {} {} {} {} {weekday_text}",
        MINUTE.render(&minutes),
        HOUR.render(&hours),
        DAY_OF_MONTH.render(&days),
        MONTH.render(&months),
    );
    translated
        .parse::<cron::Schedule>()
        .map_err(|e| format!("{e} (translated to {translated:?})"))
}

/// The first fire time of `schedule` strictly after `after`, evaluated on the wall clock of
/// `tz`. A local time skipped by a DST jump does not fire that day; a repeated one fires at
/// its first occurrence. `None` when it never fires again (bounded work: the `cron` crate
/// stops at the year 2100).
pub fn next_fire(
    schedule: &cron::Schedule,
    tz: chrono_tz::Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    schedule
        .after(&after.with_timezone(&tz))
        .next()
        .map(|t| t.with_timezone(&Utc))
}
