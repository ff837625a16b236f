//! Cron: standard expressions on top of the `cron` crate, and the next fire time on a time
//! zone's wall clock.
//!
//! The crate parses and evaluates every field. What remains here, and why:
//! - **Seconds.** The crate wants 6 fields (seconds first); a standard 5-field expression gets
//!   `0` seconds prepended.
//! - **Weekday numbers.** The crate numbers weekdays 1-7 from Sunday; standard cron numbers them
//!   0-7 with both 0 and 7 meaning Sunday. The weekday field is expanded here and handed to the
//!   crate as names (`SUN,MON`), so `1` is Monday and `5-7` is Friday to Sunday.
//! - **Day-of-month OR day-of-week.** When both are restricted (neither starts with `*`),
//!   standard cron fires when *either* matches; the crate requires both. Such an expression is
//!   kept as two schedules (one per day field) and fires at the earlier of the two.
//! - **`@midnight`**, which the crate does not know, alongside its other shorthands.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

/// Weekday names in the order of standard cron's numbers (0 = Sunday).
const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A parsed standard cron expression: one `cron` schedule, or two whose union it is (the
/// day-of-month OR day-of-week rule).
#[derive(Debug, Clone)]
pub struct CronSchedule(Vec<cron::Schedule>);

/// Converts a standard cron expression into a [`CronSchedule`].
///
/// Accepted: 5 fields `minute hour day-of-month month day-of-week` (weekday 0-7, 0 and 7 =
/// Sunday; month and weekday also accept names), or 6 fields with a leading seconds field
/// (weekday numbers keep their standard meaning), or one of `@hourly`, `@daily`, `@midnight`,
/// `@weekly`, `@monthly`, `@yearly`, `@annually`. Each field supports `*`, lists, ranges and
/// steps; not `?`, `L`, `W` or `#`.
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
    if [second, minute, hour, dom, month]
        .iter()
        .any(|f| f.contains('?'))
    {
        return Err("'?' is not supported; use '*'".to_owned());
    }
    let weekdays = weekdays(dow)?;
    let one = |dom: &str, dow: &str| {
        let text = format!("{second} {minute} {hour} {dom} {month} {dow}");
        text.parse::<cron::Schedule>()
            .map_err(|e| format!("{e} (as {text:?})"))
    };
    let schedules = if dom.starts_with('*') || dow.starts_with('*') {
        vec![one(dom, &weekdays)?]
    } else {
        vec![one(dom, "*")?, one("*", &weekdays)?]
    };
    Ok(CronSchedule(schedules))
}

/// Expands a standard weekday field (`*`, lists, ranges, steps; numbers 0-7 or names) into the
/// crate's form: `*` or a list of names.
fn weekdays(field: &str) -> Result<String, String> {
    let value = |text: &str| -> Result<usize, String> {
        let upper = text.to_ascii_uppercase();
        if let Some(i) = WEEKDAYS.iter().position(|n| *n == upper) {
            return Ok(i);
        }
        match text.parse::<usize>() {
            Ok(n) if n <= 7 => Ok(n),
            Ok(n) => Err(format!("day of week: {n} is out of range 0-7")),
            Err(_) => Err(format!(
                "day of week: {text:?} is not a number or a day name"
            )),
        }
    };
    let mut days = BTreeSet::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => match step.parse::<usize>() {
                Ok(step) if step > 0 => (range, step),
                _ => return Err(format!("day of week: bad step {step:?}")),
            },
            None => (item, 1),
        };
        let (lo, hi) = match range.split_once('-') {
            _ if range == "*" => (0, 6),
            Some((a, b)) => (value(a)?, value(b)?),
            // `a/n` runs to the end of the week.
            None if item.contains('/') => (value(range)?, 6.max(value(range)?)),
            None => (value(range)?, value(range)?),
        };
        if lo > hi {
            return Err(format!("day of week: range {range:?} is reversed"));
        }
        days.extend((lo..=hi).step_by(step).map(|d| d % 7));
    }
    if days.len() == 7 {
        return Ok("*".to_owned());
    }
    let names: Vec<&str> = days
        .iter()
        .filter_map(|d| WEEKDAYS.get(*d).copied())
        .collect();
    Ok(names.join(","))
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
