//! Pure rendering for the client commands: aligned text tables, human ages, the `ps` and `nodes`
//! rows and the log line format.
//!
//! Nothing here does IO or reads the clock: callers pass `now` in, so every function is testable.
//! Invariants: a rendered table has one line per row plus the header, every line ends with `\n`,
//! no line has trailing spaces, and cells never contain control characters (they are replaced
//! by spaces so a hostile name cannot break the layout).

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat};

use super::{Deployment, LogEntry, Node};

/// Spaces between two columns.
const COLUMN_GAP: u16 = 2;
/// Longest cell shown, in characters (comfy-table measures widths in `u16`; a cell near that
/// would wrap and break one line per row).
const MAX_CELL_CHARS: usize = 4096;

/// Bytes in one GiB, for the memory column.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Renders `headers` and `rows` as a left-aligned table without borders (comfy-table).
///
/// Column widths are display widths. Rows shorter than the header are padded with empty
/// cells; extra cells beyond the header are ignored. Control characters in cells become
/// spaces, so a hostile name cannot add a line or break the layout.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |s: &str| -> String {
        let mut out: String = s
            .chars()
            .take(MAX_CELL_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if s.chars().nth(MAX_CELL_CHARS).is_some() {
            out.push('…');
        }
        out
    };
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::TableStyle::new())
        .set_header(headers.iter().map(|h| clean(h)));
    for row in rows {
        table.add_row((0..headers.len()).map(|i| row.get(i).map(|c| clean(c)).unwrap_or_default()));
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, COLUMN_GAP));
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Formats an age in seconds as `5s`, `3m`, `2h` or `4d` (truncated, largest unit only).
///
/// Negative ages (clock skew between client and conductor) display as `0s`.
pub fn format_age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Formats a duration in milliseconds with one decimal in its largest unit: `12.0s`, `3.5m`,
/// `23.2h`, `4.1d` (the seed's `running: 23.2h`). Negative counts as 0.
pub fn format_duration(ms: i64) -> String {
    let s = ms.max(0) as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{:.1}m", s / 60.0)
    } else if s < 86_400.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86_400.0)
    }
}

/// Bytes as a float, for display in GiB (exact below 2^53 bytes).
fn bytes_f64(bytes: u64) -> f64 {
    bytes as f64
}

/// The first eight characters of an id, as shown by `ps`.
pub fn short_id(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Headers of the `ps` table.
pub const PS_HEADERS: [&str; 7] = [
    "ID", "NAME", "DESIRED", "CURRENT", "NODE", "RESTARTS", "AGE",
];

/// One `ps` row. The age counts from `created_at_ms` to `now_ms`.
pub fn ps_row(d: &Deployment, now_ms: i64) -> Vec<String> {
    let current = d
        .current_state
        .or_else(|| d.status.as_ref().map(|s| s.state))
        .map_or_else(|| "-".to_owned(), |s| s.as_str().to_owned());
    let node = match (&d.assigned_node_id, &d.assignment_reason) {
        (Some(node), _) => node.to_string(),
        (None, Some(reason)) => format!("({reason})"),
        (None, None) => "-".to_owned(),
    };
    let restarts = d
        .status
        .as_ref()
        .map_or_else(|| "-".to_owned(), |s| s.restart_count.to_string());
    let age = format_age(now_ms.saturating_sub(d.created_at_ms) / 1000);
    vec![
        short_id(&d.id),
        d.name.clone(),
        d.desired_state.as_str().to_owned(),
        current,
        node,
        restarts,
        age,
    ]
}

/// Extra columns of `ps --wide`: the process and its GPU use (memory and SM utilisation of
/// its own processes, per GPU, e.g. `0:3.2GiB/41%`).
pub const PS_WIDE_HEADERS: [&str; 2] = ["PID", "GPU"];

/// The `ps --wide` cells of one deployment.
pub fn ps_wide_cells(d: &Deployment) -> [String; 2] {
    let status = d.status.as_ref();
    let pid = status
        .and_then(|s| s.pid)
        .map_or_else(|| "-".to_owned(), |p| p.to_string());
    let gpus: Vec<String> = status
        .map(|s| s.gpus.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|g| {
            let util = g
                .util_percent
                .map_or_else(|| "-".to_owned(), |u| format!("{u:.0}%"));
            format!(
                "{}:{:.1}GiB/{util}",
                g.gpu_index,
                bytes_f64(g.memory_bytes) / GIB
            )
        })
        .collect();
    let gpu = if gpus.is_empty() {
        "-".to_owned()
    } else {
        gpus.join(",")
    };
    [pid, gpu]
}

/// The whole `ps` table; `wide` adds [`PS_WIDE_HEADERS`].
pub fn render_ps(deployments: &[Deployment], now_ms: i64, wide: bool) -> String {
    let rows: Vec<Vec<String>> = deployments
        .iter()
        .map(|d| {
            let mut row = ps_row(d, now_ms);
            if wide {
                row.extend(ps_wide_cells(d));
            }
            row
        })
        .collect();
    if wide {
        let headers: Vec<&str> = PS_HEADERS.iter().chain(&PS_WIDE_HEADERS).copied().collect();
        render_table(&headers, &rows)
    } else {
        render_table(&PS_HEADERS, &rows)
    }
}

/// Headers of the `nodes` table.
pub const NODES_HEADERS: [&str; 9] = [
    "NODE", "STATE", "GROUPS", "CAPACITY", "CPU %", "MEM", "GPUS", "RTT", "ADDRESS",
];

/// One `nodes` row.
pub fn nodes_row(n: &Node) -> Vec<String> {
    let dash = || "-".to_owned();
    let groups = if n.groups.is_empty() {
        dash()
    } else {
        n.groups.join(",")
    };
    let classes: BTreeSet<&String> = n
        .capacities_total
        .keys()
        .chain(n.total_capacities_used.keys())
        .collect();
    let capacity = if classes.is_empty() {
        dash()
    } else {
        classes
            .into_iter()
            .map(|class| {
                let used = n.total_capacities_used.get(class).copied().unwrap_or(0);
                let total = n.capacities_total.get(class).copied().unwrap_or(0);
                format!("{class} {used}/{total}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let cpu = n
        .cpu
        .dynamic
        .as_ref()
        .map_or_else(dash, |d| format!("{:.1}", d.total_percent));
    // 0 bytes: the node has not reported its resources.
    let mem_total = Some(n.memory.static_.total_bytes)
        .filter(|&t| t > 0)
        .map(bytes_f64);
    let mem_used = n.memory.dynamic.as_ref().map(|d| bytes_f64(d.used_bytes));
    let mem = match (mem_used, mem_total) {
        (Some(u), Some(t)) => format!("{:.1}/{:.1} GiB", u / GIB, t / GIB),
        (None, Some(t)) => format!("-/{:.1} GiB", t / GIB),
        _ => dash(),
    };
    let rtt = n
        .connection
        .as_ref()
        .map_or_else(dash, |c| format!("{:.1}ms", c.rtt_ms));
    let address = n
        .connection
        .as_ref()
        .map_or_else(dash, |c| c.remote_addr.clone());
    let state = if n.state.is_empty() {
        dash()
    } else {
        n.state.clone()
    };
    vec![
        n.node_id.to_string(),
        state,
        groups,
        capacity,
        cpu,
        mem,
        n.gpus.len().to_string(),
        rtt,
        address,
    ]
}

/// The whole `nodes` table, one row per node in the given order.
pub fn render_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> String {
    let rows: Vec<Vec<String>> = nodes.into_iter().map(nodes_row).collect();
    render_table(&NODES_HEADERS, &rows)
}

/// Formats one log entry as `<RFC3339 UTC time> [<stream>] <line>`.
///
/// A timestamp outside chrono's range is printed as the raw millisecond number. Trailing line
/// terminators in `line` are dropped (the caller adds exactly one newline).
pub fn format_log_entry(entry: &LogEntry) -> String {
    let time = DateTime::from_timestamp_millis(entry.timestamp_unix_ms).map_or_else(
        || entry.timestamp_unix_ms.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
    );
    let line = entry.line.trim_end_matches(['\n', '\r']);
    format!("{time} [{}] {line}", entry.stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Deployment, RunStatus};
    use crate::model::{CurrentState, DesiredState};

    #[test]
    fn table_aligns_columns_and_trims_trailing_space() {
        let rows = vec![
            vec!["a".to_owned(), "long-value".to_owned(), "x".to_owned()],
            vec!["bbbb".to_owned(), "v".to_owned(), String::new()],
        ];
        let t = render_table(&["H1", "H2", "H3"], &rows);
        assert_eq!(
            t,
            "H1    H2          H3\n\
             a     long-value  x\n\
             bbbb  v\n"
        );
    }

    #[test]
    fn table_with_no_rows_is_just_the_header() {
        assert_eq!(render_table(&["ID", "NAME"], &[]), "ID  NAME\n");
    }

    #[test]
    fn table_pads_short_rows_ignores_extra_cells_and_measures_display_width() {
        let rows = vec![
            vec!["é€".to_owned()],
            vec!["x".to_owned(), "y".to_owned(), "ignored".to_owned()],
        ];
        let t = render_table(&["A", "B"], &rows);
        assert_eq!(t, "A   B\né€\nx   y\n");
    }

    #[test]
    fn table_keeps_one_line_per_row_for_huge_cells() {
        let rows = vec![vec!["x".repeat(70_000), "y".to_owned()]];
        let t = render_table(&["A", "B"], &rows);
        assert_eq!(t.lines().count(), 2);
        assert!(
            t.lines().nth(1).is_some_and(|l| l.ends_with("…  y")),
            "{}",
            &t[t.len() - 20..]
        );
    }

    #[test]
    fn table_replaces_control_characters() {
        let rows = vec![vec!["evil\nname\t!".to_owned(), "z".to_owned()]];
        let t = render_table(&["N", "Z"], &rows);
        assert_eq!(t.lines().count(), 2);
        assert_eq!(t.lines().nth(1), Some("evil name !  z"));
    }

    #[test]
    fn ages_use_the_largest_unit() {
        let cases = [
            (-5, "0s"),
            (0, "0s"),
            (5, "5s"),
            (59, "59s"),
            (60, "1m"),
            (3 * 60 + 59, "3m"),
            (3599, "59m"),
            (3600, "1h"),
            (2 * 3600 + 1, "2h"),
            (86_399, "23h"),
            (86_400, "1d"),
            (4 * 86_400 + 7, "4d"),
            (400 * 86_400, "400d"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(secs), want, "age of {secs}s");
        }
    }

    fn dep(id: &str, name: &str) -> Deployment {
        Deployment {
            id: id.into(),
            name: name.to_owned(),
            desired_state: DesiredState::Running,
            current_state: None,
            kind: "EXEC".to_owned(),
            created_at_ms: 1_000_000,
            updated_at_ms: 1_000_000,
            ..Deployment::default()
        }
    }

    #[test]
    fn ps_rows_fall_back_sensibly() {
        let mut running = dep("0123456789abcdef0123456789abcdef", "web");
        running.current_state = Some(CurrentState::Running);
        running.assigned_node_id = Some("node-a".into());
        running.status = Some(RunStatus {
            state: CurrentState::Running,
            restart_count: 3,
            ..RunStatus::default()
        });
        let mut pending = dep("fedcba98-7654-3210", "batch");
        pending.assignment_reason = Some("No Capacity".to_owned());
        let bare = dep("short", "x");

        let now = 1_000_000 + 2 * 3_600_000 + 5;
        assert_eq!(
            ps_row(&running, now),
            ["01234567", "web", "RUNNING", "RUNNING", "node-a", "3", "2h"]
        );
        assert_eq!(
            ps_row(&pending, now),
            [
                "fedcba98",
                "batch",
                "RUNNING",
                "-",
                "(No Capacity)",
                "-",
                "2h"
            ]
        );
        assert_eq!(ps_row(&bare, 1_000_000 + 5_000)[0], "short");
        assert_eq!(ps_row(&bare, 1_000_000 + 5_000)[6], "5s");

        let mut gpu = running.clone();
        if let Some(s) = gpu.status.as_mut() {
            s.pid = Some(77);
            s.gpus = vec![
                crate::model::GpuUse {
                    gpu_index: 0,
                    memory_bytes: 3 << 30,
                    util_percent: Some(41.0),
                    processes: 2,
                },
                crate::model::GpuUse {
                    gpu_index: 1,
                    memory_bytes: 1 << 29,
                    util_percent: None,
                    processes: 1,
                },
            ];
        }
        assert_eq!(ps_wide_cells(&gpu), ["77", "0:3.0GiB/41%,1:0.5GiB/-"]);
        assert_eq!(ps_wide_cells(&pending), ["-", "-"]);
        let wide = render_ps(std::slice::from_ref(&gpu), now, true);
        assert!(wide.lines().next().unwrap().ends_with("PID  GPU"), "{wide}");
        let table = render_ps(&[running, pending], now, false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID        NAME   DESIRED"));
        assert!(lines[1].starts_with("01234567  web    RUNNING"));
    }

    #[test]
    fn log_entries_are_rfc3339_utc() {
        let e = LogEntry {
            seq: Some(1),
            timestamp_unix_ms: 1_700_000_000_123,
            stream: "stderr".to_owned(),
            line: "boom\n".to_owned(),
        };
        assert_eq!(
            format_log_entry(&e),
            "2023-11-14T22:13:20.123Z [stderr] boom"
        );
    }
}
