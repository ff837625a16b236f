//! Health checks of a running deployment: exec (exit 0 = healthy), HTTP(S) GET (2xx/3xx =
//! healthy; redirects are not followed, proxies are not used, and an `https://` server's
//! certificate is not verified, as Kubernetes does for its probes: the check asks "does it
//! answer", the workload is ours) and TCP connect, each bounded by the check's timeout.
//!
//! [`monitor`] runs for the life of one process: it waits `initial_delay`, probes every
//! `period`, and after `failure_threshold` consecutive failures sends one restart request to
//! the supervisor's actor and ends (the actor starts a fresh monitor with the next process).
//! Results are logged on the `system-hc` stream on transitions only (first success, each
//! failure of a streak, recovery), never on every success. A malformed check fails with a
//! reason like any probe; it cannot crash-loop the monitor (the original's B13).

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};

use super::logs::{LogBuffer, LogStream};
use super::runner::{ProcessSpec, run_to_exit};
use crate::spec::{HealthCheck, HealthProbe};

/// Shortest probe period accepted (a zero period would spin).
const MIN_PERIOD: Duration = Duration::from_millis(10);

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

/// One HTTP client for every probe of this process (connection setup is cheap; the client
/// holds the TLS configuration).
fn http_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .danger_accept_invalid_certs(true)
                .user_agent("symphony-health")
                .build()
                .map_err(|e| format!("http client: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

async fn http_get(url: &str) -> Result<(), String> {
    let client = http_client()?;
    let response = client.get(url).send().await.map_err(|e| {
        // The innermost cause says what happened (refused, reset, TLS...).
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        format!("http GET {url} failed: {cause}")
    })?;
    let code = response.status().as_u16();
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("http status {code}"))
    }
}

/// What [`monitor`] tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The first probe of this process passed.
    Healthy,
    /// `failure_threshold` probes in a row failed (the last failure's detail): restart it.
    Unhealthy(String),
}

/// Watches one process. Sends [`Verdict::Healthy`] when a probe first passes, and
/// [`Verdict::Unhealthy`] after `failure_threshold` consecutive failures, then returns. Runs
/// until then or until dropped.
pub async fn monitor(
    check: HealthCheck,
    exec_base: ProcessSpec,
    logs: LogBuffer,
    verdicts: mpsc::Sender<Verdict>,
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
                    // The receiver is gone only when the process is being torn down anyway.
                    let _ = verdicts.send(Verdict::Healthy).await;
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
                    let _ = verdicts.send(Verdict::Unhealthy(detail)).await;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        // Nothing listening: refused, with the cause.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = probe(&url(closed_port), t, &base()).await.unwrap_err();
        assert!(err.contains("failed"), "{err}");
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

    #[tokio::test]
    async fn https_probe_answers_without_verifying_the_certificate() {
        use tokio_rustls::rustls;
        // A self-signed server, as a workload would run one.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let reply = if buf.starts_with(b"GET /ok ") {
                    200
                } else {
                    503
                };
                let reply = format!("HTTP/1.1 {reply} X\r\nContent-Length: 0\r\n\r\n");
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        let t = Duration::from_secs(5);
        let at = |path: &str| HealthProbe::Http {
            url: format!("https://localhost:{port}{path}"),
        };
        assert_eq!(probe(&at("/ok"), t, &base()).await, Ok(()));
        assert_eq!(
            probe(&at("/sick"), t, &base()).await,
            Err("http status 503".to_owned())
        );
        server.abort();
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
        assert_eq!(rx.recv().await.unwrap(), Verdict::Healthy);
        let Verdict::Unhealthy(detail) = rx.recv().await.unwrap() else {
            panic!("the second verdict is the failure");
        };
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
