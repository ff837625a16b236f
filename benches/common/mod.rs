//! Shared helpers for the `harness = false` benches: the in-memory PKI (one CA, a server
//! certificate, per-node certificates via `symphony_net::pki`), rustls configurations for the
//! TLS-over-TCP baseline built from the same PEM material, latency summaries, the machine
//! description, crate versions, the JSON/table output, `/proc` readers (CPU ticks, status
//! fields, liveness) and the control frame the QUIC benches echo.
//!
//! Invariants: every bench binds 127.0.0.1 only (the netns variant uses 10.201.0.0/24 inside
//! namespaces it creates); JSON goes to `$CARGO_TARGET_DIR/bench/<name>.json` (else
//! `./target/bench`).

#![allow(dead_code)]

pub mod procs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use symphony::wire::{CommandResult, NodeMessage, node_message};
use symphony_net::pki::PemPair;
use symphony_net::{CertificateAuthority, TlsMaterial, Validity};

/// `BENCH_QUICK=1`: a ~10 s smoke run.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// One CA, one server certificate (localhost, 127.0.0.1, extra IPs), node certificates on demand.
pub struct Pki {
    /// The CA.
    pub ca: CertificateAuthority,
    /// The server's certificate and key.
    pub server: PemPair,
}

impl Pki {
    /// A fresh CA valid for a day; the server certificate also names `extra_ips`.
    pub fn new(extra_ips: &[&str]) -> Result<Self> {
        let ca = CertificateAuthority::generate(Validity::days(1))?;
        let mut names = vec!["127.0.0.1".to_owned()];
        names.extend(extra_ips.iter().map(|s| (*s).to_owned()));
        let server = ca.issue_server(&names, Validity::days(1))?;
        Ok(Self { ca, server })
    }

    /// The conductor's material.
    pub fn server_tls(&self) -> TlsMaterial {
        TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: self.server.cert_pem.clone(),
            key_pem: self.server.key_pem.clone(),
        }
    }

    /// A node's material (a new certificate whose identity is `id`).
    pub fn node_tls(&self, id: &str) -> Result<TlsMaterial> {
        let pair = self.ca.issue_node(id, Validity::days(1))?;
        Ok(TlsMaterial {
            ca_pem: self.ca.cert_pem().to_owned(),
            cert_pem: pair.cert_pem,
            key_pem: pair.key_pem,
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(m: &TlsMaterial) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(m.ca_pem.as_bytes()) {
        roots.add(cert.context("ca pem")?)?;
    }
    Ok(Arc::new(roots))
}

fn chain(m: &TlsMaterial) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(m.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("certificate pem")
}

fn key(m: &TlsMaterial) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(m.key_pem.as_bytes()).context("key pem")
}

/// Baseline server: TLS 1.3, client certificate required against the same CA (as the QUIC
/// server does; `symphony_net::tls` only builds QUIC configs, so this mirrors it for TCP).
pub fn tcp_server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(m)?, provider())
            .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(m)?, key(m)?)?;
    cfg.alpn_protocols = vec![symphony_net::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// Baseline client: trusts the CA, presents the node certificate (session resumption on).
pub fn tcp_client_config(m: &TlsMaterial) -> Result<Arc<rustls::ClientConfig>> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(m)?)
        .with_client_auth_cert(chain(m)?, key(m)?)?;
    cfg.alpn_protocols = vec![symphony_net::ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// p50/p99/max of a latency sample, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `samples` (sorted here).
    pub fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        Self {
            n: v.len(),
            p50_ms: percentile(&v, 50.0),
            p99_ms: percentile(&v, 99.0),
            max_ms: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms})
    }
}

/// Nearest-rank percentile of sorted values; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// CPU count, CPU model, kernel, user.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0);
    json!({
        "nproc": nproc,
        "cpu_model": model,
        "kernel": read_trim("/proc/sys/kernel/osrelease"),
        "mem_total_mb": mem_kb / 1024,
        "is_root": is_root(),
    })
}

/// Whether we run as uid 0 (from /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Runs a command (the netns set-ups); fails with its stderr.
pub fn sh(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {}", args[0]))?;
    if !out.status.success() {
        return Err(anyhow!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `getconf CLK_TCK`, 100 if that fails (the Linux value everywhere in practice).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a process (`"self"` or a pid), in clock ticks; `None` when its
/// `/proc/<pid>/stat` cannot be read (the process is gone) or has no command name.
pub fn try_proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state), so
    // utime and stime (fields 14 and 15) are indexes 11 and 12 here.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Some(at(11) + at(12))
}

/// utime + stime of a process (`"self"` or a pid), in clock ticks (0 if it is gone).
pub fn proc_cpu_ticks(pid: &str) -> u64 {
    try_proc_cpu_ticks(pid).unwrap_or(0)
}

/// A `kB` field (or a count) of `/proc/<pid>/status` (`pid` is `"self"` or a number), e.g.
/// `VmRSS`, `VmHWM`, `Threads`.
pub fn proc_status_field(pid: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Whether `pid` exists and is not a zombie (from `/proc/<pid>/stat`).
pub fn pid_alive(pid: impl std::fmt::Display) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// A millisecond sample as JSON: n, p50/p90/p99 (nearest rank), min, max, and the sorted
/// samples themselves when `with_samples`.
pub fn sample_json(mut xs: Vec<f64>, with_samples: bool) -> Value {
    xs.sort_by(f64::total_cmp);
    let mut v = json!({
        "n": xs.len(),
        "p50_ms": percentile(&xs, 50.0),
        "p90_ms": percentile(&xs, 90.0),
        "p99_ms": percentile(&xs, 99.0),
        "min_ms": xs.first(),
        "max_ms": xs.last(),
    });
    if with_samples {
        v["samples_ms"] = json!(xs);
    }
    v
}

/// The control frame the QUIC benches send and echo: a `CommandResult` carrying `seq`.
pub fn result_msg(seq: u64) -> NodeMessage {
    NodeMessage {
        msg: Some(node_message::Msg::Result(CommandResult {
            command_id: seq,
            ok: true,
            message: String::new(),
        })),
    }
}

/// The sequence number of a frame built by [`result_msg`]; `None` for any other message.
pub fn seq_of(m: &NodeMessage) -> Option<u64> {
    match &m.msg {
        Some(node_message::Msg::Result(r)) => Some(r.command_id),
        _ => None,
    }
}

/// Versions of the crates that matter, from the workspace Cargo.lock.
pub fn versions() -> Value {
    let lock = include_str!("../../Cargo.lock");
    let mut out = serde_json::Map::new();
    for name in [
        "quinn",
        "quinn-proto",
        "quinn-udp",
        "rustls",
        "tokio-rustls",
        "tokio",
        "prost",
        "ring",
    ] {
        let needle = format!("name = \"{name}\"\nversion = \"");
        if let Some(i) = lock.find(&needle) {
            let rest = &lock[i + needle.len()..];
            if let Some(end) = rest.find('"') {
                out.insert(name.into(), Value::String(rest[..end].to_owned()));
            }
        }
    }
    out.insert("symphony".into(), env!("CARGO_PKG_VERSION").into());
    Value::Object(out)
}

/// `$CARGO_TARGET_DIR/bench` or `./target/bench`.
pub fn out_dir() -> PathBuf {
    let base =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    base.join("bench")
}

/// Writes `{bench, machine, versions, parameters, results}` to `<out_dir>/<name>.json`.
pub fn write_json(name: &str, parameters: Value, results: Value) -> Result<PathBuf> {
    write_doc(name, &report(name, parameters, results))
}

/// The document [`write_json`] writes, for a bench that adds its own top-level fields.
pub fn report(name: &str, parameters: Value, results: Value) -> Value {
    json!({
        "bench": name,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "quick": quick(),
        "machine": machine(),
        "versions": versions(),
        "parameters": parameters,
        "results": results,
    })
}

/// Writes `doc` (pretty) to `<out_dir>/<name>.json`.
pub fn write_doc(name: &str, doc: &Value) -> Result<PathBuf> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A plain text table with right-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.len());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:>w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)));
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Microseconds since the Unix epoch (the machine clock, shared by processes on one host).
pub fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Formats milliseconds with sensible precision.
pub fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// A multi-thread runtime with one worker per CPU (the figures in BENCHMARKS.md: 2 vCPUs).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("runtime: {e}"))
}
