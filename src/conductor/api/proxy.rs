//! Mesh services from outside: `/services/{namespace}/{name}/...` is a reverse proxy to an
//! exposed HTTP service (WebSocket upgrades included, so TensorBoard and Jupyter work), and
//! `/port-forward/{namespace}/{name}` upgrades to a raw byte stream to any service, for
//! `symphony port-forward`. Both ride a tunnel the conductor opens to the binder's node.
//!
//! The upstream sees the path without the prefix and an `X-Forwarded-Prefix` header naming it
//! (TensorBoard's `--path_prefix`, Jupyter's `base_url` should be set to that prefix).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::{ApiError, ApiState};
use crate::conductor::sessions::open_to_service;

/// Marks a response that comes from a service (left as it is by the JSON error layer).
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// The `Upgrade` token of a raw TCP stream (`symphony port-forward`).
pub const TCP_UPGRADE: &str = "symphony-tcp";

/// `/services/{namespace}/{name}/` and below: the exposed service's HTTP.
pub async fn http(
    State(st): State<ApiState>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Result<Response, ApiError> {
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (namespace, name) = (get("namespace"), get("name"));
    // The path as sent (still percent-encoded), without the prefix.
    let prefix = format!("/services/{namespace}/{name}");
    let rest = req
        .uri()
        .path()
        .strip_prefix(&prefix)
        .unwrap_or("/")
        .to_owned();
    let exposed = st
        .core
        .view()
        .services
        .iter()
        .any(|s| s.namespace == namespace && s.name == name && s.exposed);
    if !exposed {
        return Err(ApiError::detail(
            StatusCode::NOT_FOUND,
            "Service not found or not exposed",
        ));
    }
    forward(&st, &namespace, &name, &rest, req).await
}

/// `/port-forward/{namespace}/{name}`: a raw stream to any service.
pub async fn tcp(
    State(st): State<ApiState>,
    Path((namespace, name)): Path<(String, String)>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let wanted = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(TCP_UPGRADE.as_bytes()));
    if !wanted {
        return Err(ApiError::detail(
            StatusCode::BAD_REQUEST,
            "expected Upgrade: symphony-tcp",
        ));
    }
    let known = st
        .core
        .view()
        .services
        .iter()
        .any(|s| s.namespace == namespace && s.name == name);
    if !known {
        return Err(ApiError::detail(StatusCode::NOT_FOUND, "Service not found"));
    }
    let tunnel = open_to_service(&st.core, &st.sessions, &namespace, &name)
        .await
        .map_err(|e| ApiError::detail(StatusCode::BAD_GATEWAY, &e))?;
    let client = hyper::upgrade::on(&mut req);
    st.sockets.spawn(async move {
        let Ok(client) = client.await else { return };
        let _ = tunnel.splice(&mut TokioIo::new(client)).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TCP_UPGRADE)
        .body(Body::empty())
        .unwrap_or_default())
}

/// Sends `req` (path rewritten to `rest`, which starts with `/`) to the service over a fresh
/// tunnel; passes an upgrade (WebSocket) through.
async fn forward(
    st: &ApiState,
    namespace: &str,
    name: &str,
    rest: &str,
    mut req: Request,
) -> Result<Response, ApiError> {
    let bad_gateway = |e: String| ApiError::detail(StatusCode::BAD_GATEWAY, &e);
    let tunnel = open_to_service(&st.core, &st.sessions, namespace, name)
        .await
        .map_err(bad_gateway)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel.into_io()))
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    st.sockets.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let path = format!("/{rest}{query}");
    *req.uri_mut() = path.parse().map_err(|_| bad_gateway("bad path".into()))?;
    // A workload never sees a caller's token.
    crate::conductor::auth::strip_request_credentials(req.headers_mut());
    let prefix = format!("/services/{namespace}/{name}");
    if let Ok(v) = HeaderValue::from_str(&prefix) {
        req.headers_mut().insert("x-forwarded-prefix", v);
    }
    let upgrading = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream = hyper::upgrade::on(&mut resp);
        st.sockets.spawn(async move {
            let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream.await) else {
                return;
            };
            let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        });
    }
    // Our side speaks HTTP/1.1 whatever the service answered with.
    *resp.version_mut() = axum::http::Version::HTTP_11;
    crate::conductor::auth::strip_response_credentials(resp.headers_mut());
    resp.extensions_mut().insert(Proxied);
    Ok(resp.map(Body::new).into_response())
}
