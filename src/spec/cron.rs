//! Cron: standard expressions evaluated by the `cron` crate, and the next fire time on a time
//! zone's wall clock.
//!
//! The crate evaluates (next fire times, the year-2100 bound); reading the standard syntax
//! stays here, because the crate's differs in ways that would change what users wrote:
//! - **Weekday numbers.** The crate numbers weekdays 1-7 from Sunday; standard cron numbers
//!   them 0-7 with both 0 and 7 meaning Sunday (`1` is Monday, `5-7` Friday to Sunday).
//! - **Steps and names.** The crate refuses a step larger than the field (`*/60`, `0 */24`),
//!   a name before a step (`JAN/3`) and mixed ranges (`JAN-3`), which standard cron and our
//!   earlier releases accept (stored specs must keep parsing).
//! - **Day-of-month OR day-of-week.** When both are restricted (neither starts with `*`),
//!   standard cron fires when *either* matches; the crate requires both. Such an expression is
//!   kept as two schedules (one per day field) and fires at the earlier of the two.
//! - **Seconds** (the crate wants 6 fields) and **`@midnight`** (the crate lacks it).
//!
//! So each field is expanded here to the explicit list of its values (one-line errors naming
//! the field) and the crate gets that list.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

/// One field of a cron expression: its name, its range, and the names of its values.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    /// What `*` covers (the weekday field allows 7 but `*` means 0-6).
    star_max: u32,
    /// Three-letter names, the first one having the value `min`.
    names: &'static [&'static str],
}

const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];

const fn field(name: &'static str, min: u32, max: u32) -> Field {
    Field {
        name,
        min,
        max,
        star_max: max,
        names: &[],
    }
}

const SECOND: Field = field("second", 0, 59);
const MINUTE: Field = field("minute", 0, 59);
const HOUR: Field = field("hour", 0, 23);
const DAY_OF_MONTH: Field = field("day of month", 1, 31);
const MONTH: Field = Field {
    names: &MONTHS,
    ..field("month", 1, 12)
};
const DAY_OF_WEEK: Field = Field {
    star_max: 6,
    names: &WEEKDAYS,
    ..field("day of week", 0, 7)
};

impl Field {
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

    /// Expands a field (`*`, lists, ranges `a-b`, steps `*/n`, `a-b/n`, `a/n`) to its values,
    /// rendered for the crate: `*` when it covers the field, else the list.
    fn expand(&self, text: &str) -> Result<String, String> {
        let mut values = BTreeSet::new();
        for item in text.split(',') {
            let (base, step) = match item.split_once('/') {
                Some((base, step)) => match step.parse::<u32>() {
                    Ok(step) if step > 0 => (base, Some(step)),
                    _ => return Err(format!("{}: bad step {step:?}", self.name)),
                },
                None => (item, None),
            };
            let (lo, hi) = match base.split_once('-') {
                _ if base == "*" => (self.min, self.star_max),
                Some((a, b)) => (self.value(a)?, self.value(b)?),
                // `a/n` runs to the end of the field.
                None => {
                    let a = self.value(base)?;
                    (
                        a,
                        if step.is_some() {
                            self.star_max.max(a)
                        } else {
                            a
                        },
                    )
                }
            };
            if lo > hi {
                return Err(format!("{}: range {base:?} is reversed", self.name));
            }
            let step = usize::try_from(step.unwrap_or(1)).unwrap_or(usize::MAX);
            values.extend((lo..=hi).step_by(step));
        }
        if self.names == WEEKDAYS {
            // Standard 0-7 (0 and 7 = Sunday) to the crate's names.
            let days: BTreeSet<usize> = values
                .iter()
                .filter_map(|d| usize::try_from(d % 7).ok())
                .collect();
            if days.len() == 7 {
                return Ok("*".to_owned());
            }
            let names: Vec<&str> = days
                .iter()
                .filter_map(|d| WEEKDAYS.get(*d).copied())
                .collect();
            return Ok(names.join(","));
        }
        if (self.min..=self.star_max).all(|v| values.contains(&v)) {
            return Ok("*".to_owned());
        }
        let items: Vec<String> = values.iter().map(u32::to_string).collect();
        Ok(items.join(","))
    }
}

/// A parsed standard cron expression: one `cron` schedule, or two whose union it is (the
/// day-of-month OR day-of-week rule).
#[derive(Debug, Clone)]
pub struct CronSchedule(Vec<cron::Schedule>);

/// Converts a standard cron expression into a [`CronSchedule`].
///
/// Accepted: 5 fields `minute hour day-of-month month day-of-week` (weekday 0-7, 0 and 7 =
/// Sunday; month and weekday also accept three-letter names), or 6 fields with a leading
/// seconds field, or one of `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`,
/// `@annually`. Each field supports `*`, lists, ranges and steps; not `?`, `L`, `W` or `#`.
pub fn cron_schedule(expr: &str) -> Result<CronSchedule, String> {
    let expanded = match expr.trim() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        other => other,
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let (second, [minute, hour, dom, month, dow]) = match fields.as_slice() {
        [m, h, dom, mon, dow] => ("0", [*m, *h, *dom, *mon, *dow]),
        [s, m, h, dom, mon, dow] => (*s, [*m, *h, *dom, *mon, *dow]),
        _ => {
            return Err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), got {}",
                fields.len()
            ));
        }
    };
    let head = format!(
        "{} {} {}",
        SECOND.expand(second)?,
        MINUTE.expand(minute)?,
        HOUR.expand(hour)?
    );
    let days = DAY_OF_MONTH.expand(dom)?;
    let months = MONTH.expand(month)?;
    let weekdays = DAY_OF_WEEK.expand(dow)?;
    let one = |days: &str, weekdays: &str| {
        format!("{head} {days} {months} {weekdays}")
            .parse::<cron::Schedule>()
            .map_err(|e| format!("{expr:?}: {}", e.to_string().replace('\n', " ")))
    };
    let schedules = if dom.starts_with('*') || dow.starts_with('*') {
        vec![one(&days, &weekdays)?]
    } else {
        vec![one(&days, "*")?, one("*", &weekdays)?]
    };
    Ok(CronSchedule(schedules))
}

/// The first fire time of `schedule` strictly after `after`, evaluated on the wall clock of
/// `tz`. A local time skipped by a DST jump does not fire that day; a repeated one fires at
/// its first occurrence. `None` when it never fires again (bounded work: the `cron` crate
/// stops at the year 2100).
pub fn next_fire(
    schedule: &CronSchedule,
    tz: chrono_tz::Tz,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let local = after.with_timezone(&tz);
    schedule
        .0
        .iter()
        .filter_map(|s| s.after(&local).next())
        .min()
        .map(|t| t.with_timezone(&Utc))
}
