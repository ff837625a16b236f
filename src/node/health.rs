//! Health checks of a running deployment: exec (exit 0 = healthy), HTTP GET (2xx/3xx =
//! healthy, plain `http://` only) and TCP connect, each bounded by the check's timeout.
//!
//! [`monitor`] runs for the life of one process: it waits `initial_delay`, probes every
//! `period`, and after `failure_threshold` consecutive failures sends one restart request to
//! the supervisor's actor and ends (the actor starts a fresh monitor with the next process).
//! Results are logged on the `system-hc` stream on transitions only (first success, each
//! failure of a streak, recovery), never on every success. A malformed check fails with a
//! reason like any probe; it cannot crash-loop the monitor (the original's B13).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};

use super::logs::{LogBuffer, LogStream};
use super::runner::{ProcessSpec, run_to_exit};
use crate::spec::{HealthCheck, HealthProbe};

/// Shortest probe period accepted (a zero period would spin).
const MIN_PERIOD: Duration = Duration::from_millis(10);

/// Longest HTTP status line read.
const MAX_STATUS_LINE: u64 = 8 * 1024;

/// Runs one probe within `limit`. `exec_base` supplies the cwd and environment for exec probes
/// (its `command` is replaced by the probe's). `Err` holds a short reason.
pub async fn probe(
    probe: &HealthProbe,
    limit: Duration,
    exec_base: &ProcessSpec,
) -> Result<(), String> {
    match probe {
        HealthProbe::Exec { command } => {
            let spec = ProcessSpec {
                command: command.clone(),
                ..exec_base.clone()
            };
            match run_to_exit(&spec, limit).await? {
                0 => Ok(()),
                code => Err(format!("command exited with code {code}")),
            }
        }
        HealthProbe::Http { url } => match timeout(limit, http_get(url)).await {
            Ok(result) => result,
            Err(_) => Err(format!("http timed out after {}ms", limit.as_millis())),
        },
        HealthProbe::Tcp { host, port } => {
            match timeout(limit, TcpStream::connect((host.as_str(), *port))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("tcp connect to {host}:{port} failed: {e}")),
                Err(_) => Err(format!(
                    "tcp connect to {host}:{port} timed out after {}ms",
                    limit.as_millis()
                )),
            }
        }
    }
}

/// Host, port and path of a plain `http://` URL.
fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    if url.starts_with("https://") {
        return Err("https health checks are not supported".to_owned());
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// url: {url:?}"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("bad host in {url:?}"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || authority.contains('@') {
        return Err(format!("bad host in {url:?}"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("bad port in {url:?}"))?,
        None => 80,
    };
    Ok((host.to_owned(), port, path))
}

async fn http_get(url: &str) -> Result<(), String> {
    let (host, port, path) = parse_http_url(url)?;
    let mut stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("http connect to {host}:{port} failed: {e}"))?;
    let host_header = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: symphony-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("http request failed: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .take(MAX_STATUS_LINE)
        .read_line(&mut line)
        .await
        .map_err(|e| format!("http response failed: {e}"))?;
    let mut parts = line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("http status {code}")),
        None => Err(format!("bad http status line {:?}", line.trim_end())),
    }
}

/// Watches one process. Sends one message (the last failure) on `restart` after
/// `failure_threshold` consecutive failures, then returns. Runs until then or until dropped.
pub async fn monitor(
    check: HealthCheck,
    exec_base: ProcessSpec,
    logs: LogBuffer,
    restart: mpsc::Sender<String>,
) {
    let threshold = check.failure_threshold.max(1);
    let period = check.period.max(MIN_PERIOD);
    let limit = check.timeout.max(MIN_PERIOD);
    sleep(check.initial_delay).await;
    let mut failures = 0u32;
    let mut ever_healthy = false;
    loop {
        match probe(&check.probe, limit, &exec_base).await {
            Ok(()) => {
                if !ever_healthy {
                    logs.push(LogStream::SystemHc, "health check passed");
                } else if failures > 0 {
                    logs.push(
                        LogStream::SystemHc,
                        format!("health check passed again after {failures} failure(s)"),
                    );
                }
                ever_healthy = true;
                failures = 0;
            }
            Err(detail) => {
                failures += 1;
                logs.push(
                    LogStream::SystemHc,
                    format!("health check failed ({detail}) {failures}/{threshold}"),
                );
                if failures >= threshold {
                    logs.push(
                        LogStream::SystemHc,
                        format!(
                            "unhealthy after {failures} consecutive failures, requesting restart"
                        ),
                    );
                    // The receiver is gone only when the process is being torn down anyway.
                    let _ = restart.send(detail).await;
                    return;
                }
            }
        }
        sleep(period).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn base() -> ProcessSpec {
        ProcessSpec {
            command: vec![],
            cwd: std::env::temp_dir(),
            env: std::env::vars().collect(),
        }
    }

    fn exec(cmd: &[&str]) -> HealthProbe {
        HealthProbe::Exec {
            command: cmd.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Serves every connection with `status` until dropped.
    async fn http_server(status: u16) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn exec_probe() {
        let t = Duration::from_secs(5);
        assert_eq!(probe(&exec(&["true"]), t, &base()).await, Ok(()));
        let err = probe(&exec(&["false"]), t, &base()).await.unwrap_err();
        assert!(err.contains("code 1"), "{err}");
        let err = probe(&exec(&["sleep", "10"]), Duration::from_millis(50), &base())
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        let err = probe(&exec(&[]), t, &base()).await.unwrap_err();
        assert!(err.contains("empty command"), "{err}");
    }

    #[tokio::test]
    async fn tcp_probe() {
        let t = Duration::from_secs(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = HealthProbe::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        assert_eq!(probe(&p, t, &base()).await, Ok(()));
        drop(listener);
        let err = probe(&p, t, &base()).await.unwrap_err();
        assert!(err.contains("failed"), "{err}");
    }

    #[tokio::test]
    async fn http_probe() {
        let t = Duration::from_secs(2);
        let (ok_port, ok) = http_server(204).await;
        let (redirect_port, redirect) = http_server(302).await;
        let (bad_port, bad) = http_server(500).await;
        let url = |port: u16| HealthProbe::Http {
            url: format!("http://127.0.0.1:{port}/healthz"),
        };
        assert_eq!(probe(&url(ok_port), t, &base()).await, Ok(()));
        assert_eq!(probe(&url(redirect_port), t, &base()).await, Ok(()));
        assert_eq!(
            probe(&url(bad_port), t, &base()).await,
            Err("http status 500".to_owned())
        );
        let https = HealthProbe::Http {
            url: "https://127.0.0.1/".into(),
        };
        assert!(
            probe(&https, t, &base())
                .await
                .unwrap_err()
                .contains("https")
        );
        // A server that accepts but never answers: the timeout applies.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let err = probe(&url(port), Duration::from_millis(100), &base())
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        ok.abort();
        redirect.abort();
        bad.abort();
    }

    #[test]
    fn parses_urls() {
        let p = |u: &str| parse_http_url(u);
        assert_eq!(p("http://h:81/a?b"), Ok(("h".into(), 81, "/a?b".into())));
        assert_eq!(p("http://h"), Ok(("h".into(), 80, "/".into())));
        assert_eq!(p("http://h?x=1"), Ok(("h".into(), 80, "/?x=1".into())));
        assert_eq!(
            p("http://[::1]:8080/"),
            Ok(("::1".into(), 8080, "/".into()))
        );
        assert!(p("ftp://h").is_err());
        assert!(p("http://h:notaport/").is_err());
        assert!(p("http://:80/").is_err());
    }

    #[tokio::test]
    async fn monitor_respects_threshold_and_logs_transitions() {
        let logs = LogBuffer::in_memory(100);
        let (tx, mut rx) = mpsc::channel(1);
        // Healthy twice (the marker file is absent), then failing for good.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("count");
        let script = format!(
            "n=$(cat {m} 2>/dev/null || echo 0); echo $((n+1)) > {m}; [ $n -lt 2 ]",
            m = marker.display()
        );
        let check = HealthCheck {
            probe: exec(&["/bin/sh", "-c", &script]),
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(10),
            timeout: Duration::from_secs(5),
            failure_threshold: 3,
        };
        let task = tokio::spawn(monitor(check, base(), logs.clone(), tx));
        let detail = rx.recv().await.unwrap();
        assert!(detail.contains("code 1"), "{detail}");
        task.await.unwrap();
        let lines: Vec<String> = logs.since(0, 100).into_iter().map(|e| e.line).collect();
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert_eq!(lines[0], "health check passed");
        assert!(lines[1].ends_with("1/3"), "{lines:?}");
        assert!(lines[3].ends_with("3/3"), "{lines:?}");
        assert!(lines[4].contains("requesting restart"), "{lines:?}");
        let n: u32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(n, 5, "two passes and three failures");
    }
}
