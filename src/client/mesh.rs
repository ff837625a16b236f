//! Client commands for mesh services: `symphony services`, `symphony port-forward` (raw TCP
//! from this machine to a service, through the conductor, like `kubectl port-forward`) and
//! `symphony visit` (the URL of an exposed service).

use std::io::Write;

use reqwest::{Method, Url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Client, ClientError, Exit, print_json, render};
use crate::model::ServiceInfo;

/// The most a port-forward upgrade answer's head may hold.
const MAX_HEAD: usize = 16 * 1024;

async fn list(client: &Client) -> Result<Vec<ServiceInfo>, ClientError> {
    let raw = client
        .request(Method::GET, &["services"], &[], None)
        .await?;
    serde_json::from_value(raw).map_err(|e| ClientError::Decode(e.to_string()))
}

/// The service `wanted` names: `name` (unique across namespaces) or `namespace/name`.
fn find<'a>(services: &'a [ServiceInfo], wanted: &str) -> Result<&'a ServiceInfo, ClientError> {
    let matches: Vec<&ServiceInfo> = services
        .iter()
        .filter(|s| match wanted.split_once('/') {
            Some((ns, name)) => s.namespace == ns && s.name == name,
            None => s.name == wanted,
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(ClientError::Usage(format!("no service named '{wanted}'"))),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect();
            Err(ClientError::Usage(format!(
                "'{wanted}' is ambiguous; it matches: {}",
                names.join(", ")
            )))
        }
    }
}

/// Each connector node's path, e.g. `n1 direct 0.4ms, n2 relay 31ms`.
fn paths_cell(paths: &[crate::model::ServicePath]) -> String {
    if paths.is_empty() {
        return "-".to_owned();
    }
    paths
        .iter()
        .map(|p| match p.rtt_ms {
            Some(ms) => format!("{} {} {ms:.1}ms", p.node_id, p.path),
            None => format!("{} {}", p.node_id, p.path),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `symphony services`: one row per bound service.
pub async fn services(api: &str, json: bool, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let list = list(&client).await?;
    if json {
        let v = serde_json::to_value(&list).map_err(|e| ClientError::Decode(e.to_string()))?;
        print_json(out, &v)?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.namespace.clone(),
                s.name.clone(),
                s.port.to_string(),
                if s.exposed { "yes" } else { "no" }.to_owned(),
                s.deployment_name.clone(),
                s.node_id.clone().unwrap_or_else(|| "-".to_owned()),
                s.connectors.len().to_string(),
                paths_cell(&s.paths),
            ]
        })
        .collect();
    let headers = [
        "NAMESPACE",
        "NAME",
        "PORT",
        "EXPOSED",
        "BINDER",
        "NODE",
        "CONNECTORS",
        "PATHS",
    ];
    out.write_all(render::render_table(&headers, &rows).as_bytes())?;
    Ok(Exit::Ok)
}

/// `symphony visit`: prints the URL of an exposed service (and opens it unless `url_only`).
pub async fn visit(
    api: &str,
    service: &str,
    url_only: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let list = list(&client).await?;
    let s = find(&list, service)?;
    if !s.exposed {
        return Err(ClientError::Usage(format!(
            "service '{}' is not exposed; add it to the binder's `exposes`, or use \
             `symphony port-forward {}`",
            s.name, s.name
        )));
    }
    let mut url = client.url(&["services", &s.namespace, &s.name])?;
    url.path_segments_mut()
        .map_err(|()| ClientError::Usage(format!("invalid conductor URL '{api}'")))?
        .push("");
    writeln!(out, "{url}")?;
    if !url_only {
        // Best effort: a machine without a browser opener still has the URL printed.
        let _ = std::process::Command::new("xdg-open")
            .arg(url.as_str())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    Ok(Exit::Ok)
}

/// `symphony port-forward`: listens on `127.0.0.1:local_port` (default: the service's port)
/// and carries each connection to the service through the conductor, until interrupted.
pub async fn port_forward(
    api: &str,
    service: &str,
    local_port: Option<u16>,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let list = list(&client).await?;
    let s = find(&list, service)?;
    let url = client.url(&["port-forward", &s.namespace, &s.name])?;
    let listener = TcpListener::bind(("127.0.0.1", local_port.unwrap_or(s.port))).await?;
    let local = listener.local_addr()?;
    writeln!(
        out,
        "Forwarding {local} -> {}/{} (port {})",
        s.namespace, s.name, s.port
    )?;
    out.flush()?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (url, token, tls) = (url.clone(), client.token.clone(), client.tls.clone());
                tokio::spawn(async move {
                    if let Err(e) = forward_one(tcp, &url, token.as_deref(), tls).await {
                        eprintln!("port-forward: {e}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Ok),
        }
    }
}

/// One forwarded connection: an HTTP upgrade to the conductor, then raw bytes both ways.
async fn forward_one(
    local: TcpStream,
    url: &Url,
    token: Option<&str>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<(), String> {
    let host = url.host_str().ok_or("no host in the API URL")?;
    let port = url
        .port_or_known_default()
        .ok_or("no port in the API URL")?;
    let up = TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = up.set_nodelay(true);
    match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| e.to_string())?;
            let up = tokio_rustls::TlsConnector::from(config)
                .connect(name, up)
                .await
                .map_err(|e| e.to_string())?;
            forward_over(local, up, url, host, port, token).await
        }
        None => forward_over(local, up, url, host, port, token).await,
    }
}

/// The upgrade request and the copy, over a plain or TLS connection to the conductor.
async fn forward_over<S>(
    mut local: TcpStream,
    mut up: S,
    url: &Url,
    host: &str,
    port: u16,
    token: Option<&str>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: upgrade\r\nUpgrade: {}\r\n{auth}\r\n",
        url.path(),
        crate::conductor::api::TCP_UPGRADE
    );
    up.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Read the answer's head byte by byte (raw bytes follow it at once).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err("the conductor's answer is too long".into());
        }
        let b = up.read_u8().await.map_err(|e| e.to_string())?;
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 101 ") {
        return Err(format!("the conductor refused: {status}"));
    }
    let _ = local.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut local, &mut up)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
