//! API authentication and roles.
//!
//! A request is authenticated by an API token (`SYMA1.<id>.<secret>`) from, in order: the
//! `Authorization: Bearer` header (the CLI), the `Sec-WebSocket-Protocol` field as
//! `bearer.<token>` next to `symphony` (a browser cannot set headers on a WebSocket), or the
//! `symphony_token` cookie set by `POST /auth/login` (HttpOnly, SameSite=Strict: the web UI).
//! Each operation's role comes from the OpenAPI document (`x-symphony-role`), so the document
//! and the checks cannot disagree; a route missing there needs `admin` (fail closed).
//!
//! Requests from other origins are refused when they could act (a write, a WebSocket): with
//! or without tokens, a web page the user visits cannot drive the API on their behalf.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::api::ApiState;
use super::store::{Store, StoreError};
use super::trust::{ApiTokenRecord, Role, parse_api_token, secret_matches};

/// The cookie `POST /auth/login` sets.
pub const COOKIE: &str = "symphony_token";
/// The WebSocket subprotocol a browser offers (with `bearer.<token>`); the server selects it.
pub const WS_PROTOCOL: &str = "symphony";
/// How long a token looked up in the store is trusted without looking again (tokens created
/// or revoked through the API take effect at once; through the store, within this).
const CACHE_FOR: Duration = Duration::from_secs(10);

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (`local` when authentication is off).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Whether it came from a token.
    pub token: bool,
}

/// Most tokens kept in the lookup cache (it is emptied when full).
const CACHE_MAX: usize = 10_000;

/// Token checks, shared by the API handlers.
#[derive(Debug, Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    required: bool,
    /// The API listens on loopback only: without tokens, only loopback host names are served
    /// (a DNS-rebound name pointing at 127.0.0.1 is refused).
    loopback: bool,
    /// The API speaks HTTPS (the login cookie is `Secure`).
    https: bool,
    cache: Mutex<HashMap<String, (Instant, ApiTokenRecord)>>,
}

impl Auth {
    /// `required: false` lets every request in as `local` admin (a loopback conductor).
    pub fn new(store: Store, required: bool, loopback: bool, https: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                required,
                loopback,
                https,
                cache: Mutex::default(),
            }),
        }
    }

    /// Whether the login cookie must be `Secure`.
    pub fn https(&self) -> bool {
        self.inner.https
    }

    /// Whether requests need a token.
    pub fn required(&self) -> bool {
        self.inner.required
    }

    /// Forgets what is cached of a token (after it was revoked or created).
    pub fn forget(&self, id: &str) {
        if let Ok(mut c) = self.inner.cache.lock() {
            c.remove(id);
        }
    }

    /// The principal a token names, or why not (a 401's detail).
    pub async fn check(&self, token: &str) -> Result<Principal, &'static str> {
        let (id, secret) = parse_api_token(token).ok_or("malformed API token")?;
        // Ids are 16 base32 characters: anything else is not worth a store read.
        let well_formed = id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
        if !well_formed {
            return Err("invalid or revoked API token");
        }
        let cached = self.inner.cache.lock().ok().and_then(|c| {
            c.get(id)
                .filter(|(at, _)| at.elapsed() < CACHE_FOR)
                .map(|(_, r)| r.clone())
        });
        let rec = match cached {
            Some(r) => Some(r),
            None => {
                // Misses are not cached: unknown ids cannot grow the cache.
                let r = match self.inner.store.get_api_token(id).await {
                    Ok(r) => Some(r),
                    Err(StoreError::NotFound) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "store failure reading an API token");
                        return Err("token check unavailable");
                    }
                };
                if let (Some(r), Ok(mut c)) = (&r, self.inner.cache.lock()) {
                    if c.len() >= CACHE_MAX {
                        c.clear();
                    }
                    c.insert(id.to_owned(), (Instant::now(), r.clone()));
                }
                r
            }
        };
        match rec {
            Some(r) if secret_matches(secret, &r.secret_hash) && r.revoked_at_ms.is_none() => {
                Ok(Principal {
                    name: r.name,
                    role: r.role,
                    token: true,
                })
            }
            _ => Err("invalid or revoked API token"),
        }
    }
}

/// The role each documented operation needs: `(METHOD, path template)` -> `Some(role)`, or
/// `None` for public ones (`x-symphony-role: public`).
static ROLES: LazyLock<HashMap<(String, String), Option<Role>>> = LazyLock::new(|| {
    let doc: Value = serde_json::from_str(super::api::OPENAPI).unwrap_or(Value::Null);
    let mut out = HashMap::new();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return out;
    };
    for (path, item) in paths {
        let Some(item) = item.as_object() else {
            continue;
        };
        for (method, op) in item {
            let Some(role) = op.get("x-symphony-role").and_then(Value::as_str) else {
                continue;
            };
            // The router's template where it differs from the document's (a wildcard).
            let route = op
                .get("x-axum-route")
                .and_then(Value::as_str)
                .unwrap_or(path);
            let role = if role == "public" {
                None
            } else {
                // An unknown role name needs admin (fail closed); a test checks the names.
                Some(Role::from_name(role).unwrap_or(Role::Admin))
            };
            out.insert((method.to_ascii_uppercase(), route.to_owned()), role);
        }
    }
    out
});

/// Routes that are not API operations and need no token (the UI's static files: the page
/// must load to show its login).
const PUBLIC_ROUTES: [&str; 4] = ["/", "/ui", "/ui/", "/ui/{*path}"];

/// The role `method` on the route `template` needs (`None`: public). A method the document
/// does not list on a documented path (the service proxy takes any) needs the highest role
/// listed there; an undocumented route needs admin.
pub fn required_role(method: &Method, template: &str) -> Option<Role> {
    if PUBLIC_ROUTES.contains(&template) {
        return None;
    }
    let key = (method.as_str().to_owned(), template.to_owned());
    if let Some(r) = ROLES.get(&key) {
        return *r;
    }
    let on_path: Vec<Option<Role>> = ROLES
        .iter()
        .filter(|((_, p), _)| p == template)
        .map(|(_, r)| *r)
        .collect();
    if on_path.is_empty() {
        return Some(Role::Admin);
    }
    on_path.into_iter().max().unwrap_or(Some(Role::Admin))
}

/// Where a request's token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// `Authorization: Bearer` or the WebSocket subprotocol: the caller holds the token.
    Held,
    /// The login cookie: the browser sends it for any page of this origin, including a
    /// service's page served through the proxy, so it is worth at most `operator` (what
    /// anyone who can deploy such a page has anyway); admin actions need the token itself.
    Cookie,
}

/// The token a request carries, if any, and where it came from.
fn token_of(headers: &HeaderMap) -> Option<(String, Source)> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some((t.trim().to_owned(), Source::Held));
        }
    }
    if let Some(t) =
        ws_protocols(headers).find_map(|p| p.strip_prefix("bearer.").map(str::to_owned))
    {
        return Some((t, Source::Held));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| (v.to_owned(), Source::Cookie))
        })
}

/// Removes every credential of ours from a request the proxy passes to a service (the
/// `Authorization` header, the login cookie, a `bearer.` WebSocket subprotocol), so that no
/// workload ever sees a token.
pub fn strip_request_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    let cookies: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| !kv.is_empty() && kv.split_once('=').is_none_or(|(k, _)| k != COOKIE))
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !cookies.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
    if headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        let protocols: Vec<String> = ws_protocols(headers)
            .filter(|p| !p.starts_with("bearer."))
            .map(str::to_owned)
            .collect();
        headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
        if !protocols.is_empty()
            && let Ok(v) = HeaderValue::from_str(&protocols.join(", "))
        {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
}

/// Removes a service's attempt to set our login cookie from a proxied response.
pub fn strip_response_credentials(headers: &mut HeaderMap) {
    let keep: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            v.to_str().map_or(true, |s| {
                s.split_once('=')
                    .is_none_or(|(k, _)| !k.trim().eq_ignore_ascii_case(COOKIE))
            })
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in keep {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Whether the `Host` header names this machine's loopback (`localhost`, `127.0.0.1`,
/// `[::1]`, any port).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        // HTTP/1.0 without Host: only a local client sends that.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn ws_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.is_empty())
}

/// Whether `Origin` (when sent) is this server: its host and port equal the `Host` header.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or_default();
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

fn refuse(status: StatusCode, detail: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "detail": detail }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The middleware: origin check, then the token and the role the route needs. The handler
/// runs with the token's name in [`super::core::ACTOR`], so the events its writes cause
/// name it.
pub async fn authorize(State(st): State<ApiState>, mut req: Request, next: Next) -> Response {
    let acts = is_upgrade(req.headers())
        || !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if acts && !same_origin(req.headers()) {
        return refuse(StatusCode::FORBIDDEN, "cross-origin request refused");
    }
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let need = required_role(req.method(), &template);
    let offered_protocol = ws_protocols(req.headers()).any(|p| p == WS_PROTOCOL);
    let principal = if !st.auth.required() {
        if st.auth.inner.loopback && !loopback_host(req.headers()) {
            // Without tokens the API trusts whoever reaches it: a page whose name was made
            // to resolve to 127.0.0.1 (DNS rebinding) must not be one of them.
            return refuse(
                StatusCode::FORBIDDEN,
                "this conductor serves loopback names only (Host must be localhost or a loopback address)",
            );
        }
        Principal {
            name: "local".into(),
            role: Role::Admin,
            token: false,
        }
    } else {
        match (need, token_of(req.headers())) {
            (None, None) => Principal {
                name: "anonymous".into(),
                role: Role::Viewer,
                token: false,
            },
            (_, Some((t, source))) => match st.auth.check(&t).await {
                Ok(mut p) => {
                    if source == Source::Cookie {
                        p.role = p.role.min(Role::Operator);
                    }
                    p
                }
                Err(why) => return refuse(StatusCode::UNAUTHORIZED, why),
            },
            (Some(_), None) => {
                return refuse(StatusCode::UNAUTHORIZED, "this request needs an API token");
            }
        }
    };
    if let Some(need) = need
        && principal.role < need
    {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "token {:?} has role {}; this needs {need}",
                principal.name, principal.role
            ),
        );
    }
    req.extensions_mut().insert(principal.clone());
    let mut resp = if principal.token {
        super::core::ACTOR
            .scope(principal.name, next.run(req))
            .await
    } else {
        next.run(req).await
    };
    if offered_protocol
        && resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && !resp.headers().contains_key(header::SEC_WEBSOCKET_PROTOCOL)
    {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(WS_PROTOCOL),
        );
    }
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_operation_names_a_known_role() {
        let doc: Value = serde_json::from_str(super::super::api::OPENAPI).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if !op.is_object() || method.starts_with("x-") {
                    continue;
                }
                let role = op["x-symphony-role"].as_str();
                assert!(
                    matches!(role, Some("public" | "viewer" | "operator" | "admin")),
                    "{method} {path}: x-symphony-role {role:?}"
                );
            }
        }
        assert_eq!(
            required_role(&Method::GET, "/deployments"),
            Some(Role::Viewer)
        );
        assert_eq!(
            required_role(&Method::POST, "/deployments"),
            Some(Role::Operator)
        );
        assert_eq!(required_role(&Method::GET, "/openapi.json"), None);
        assert_eq!(
            required_role(&Method::GET, "/not-documented"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&Method::GET, "/ui/{*path}"), None);
    }

    #[test]
    fn tokens_come_from_the_header_the_ws_protocol_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(
            header::COOKIE,
            "a=b; symphony_token=SYMA1.c.d".parse().unwrap(),
        );
        assert_eq!(token_of(&h), Some(("SYMA1.c.d".into(), Source::Cookie)));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "symphony, bearer.SYMA1.e.f".parse().unwrap(),
        );
        assert_eq!(token_of(&h), Some(("SYMA1.e.f".into(), Source::Held)));
        h.insert(header::AUTHORIZATION, "Bearer SYMA1.g.h".parse().unwrap());
        assert_eq!(token_of(&h), Some(("SYMA1.g.h".into(), Source::Held)));
        // What the proxy passes on keeps none of it.
        strip_request_credentials(&mut h);
        assert_eq!(token_of(&h), None);
        assert_eq!(h[header::COOKIE], "a=b");
        assert_eq!(h[header::SEC_WEBSOCKET_PROTOCOL], "symphony");
        let mut r = HeaderMap::new();
        r.append(
            header::SET_COOKIE,
            "symphony_token=x; Path=/".parse().unwrap(),
        );
        r.append(header::SET_COOKIE, "theirs=1".parse().unwrap());
        strip_response_credentials(&mut r);
        assert_eq!(r.get_all(header::SET_COOKIE).iter().count(), 1);
        assert_eq!(r[header::SET_COOKIE], "theirs=1");
    }

    #[test]
    fn only_loopback_names_without_tokens() {
        let mut h = HeaderMap::new();
        for ok in [
            "localhost:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            h.insert(header::HOST, ok.parse().unwrap());
            assert!(loopback_host(&h), "{ok}");
        }
        for bad in ["evil.example:8000", "10.0.0.1:8000", "evil.example"] {
            h.insert(header::HOST, bad.parse().unwrap());
            assert!(!loopback_host(&h), "{bad}");
        }
    }

    #[test]
    fn origins_must_match_the_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8000".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8000".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
