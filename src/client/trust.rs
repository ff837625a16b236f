//! Client commands for trust: `symphony token create|ls|revoke` (join tokens),
//! `symphony api-token create|ls|revoke`, `symphony node revoke ID`.

use std::io::Write;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, ClientError, Exit, print_json, render};
use crate::time::now_ms;

/// `symphony token create`: prints the join token (shown once).
pub async fn token_create(
    api: &str,
    groups: &[String],
    ttl_sec: u64,
    uses: Option<u64>,
    node_id_prefix: Option<&str>,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let mut body = json!({"groups": groups, "ttl_sec": ttl_sec, "uses": uses});
    if let Some(p) = node_id_prefix {
        body["node_id_prefix"] = json!(p);
    }
    let made: Value = client
        .request(Method::POST, &["tokens"], &[], Some(&body))
        .await?;
    writeln!(out, "{}", made["token"].as_str().unwrap_or_default())?;
    Ok(Exit::Ok)
}

/// `symphony token ls`.
pub async fn token_ls(api: &str, json: bool, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let all: Vec<Value> = client.request(Method::GET, &["tokens"], &[], None).await?;
    if json {
        print_json(out, &Value::Array(all))?;
        return Ok(Exit::Ok);
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|t| {
            let state = if t["revoked_at_ms"].is_i64() {
                "revoked"
            } else if t["expires_at_ms"].as_i64().is_some_and(|e| e <= now) {
                "expired"
            } else if t["max_uses"]
                .as_i64()
                .is_some_and(|m| t["uses"].as_i64().unwrap_or(0) >= m)
            {
                "used up"
            } else {
                "active"
            };
            let uses = match t["max_uses"].as_i64() {
                Some(m) => format!("{}/{m}", t["uses"]),
                None => t["uses"].to_string(),
            };
            let groups: Vec<&str> = t["groups"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            vec![
                t["id"].as_str().unwrap_or_default().to_owned(),
                state.to_owned(),
                groups.join(","),
                uses,
                t["node_id_prefix"].as_str().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    let headers = ["ID", "STATE", "GROUPS", "USES", "PREFIX"];
    out.write_all(render::render_table(&headers, &rows).as_bytes())?;
    Ok(Exit::Ok)
}

/// `symphony token revoke ID`.
pub async fn token_revoke(api: &str, id: &str, out: &mut impl Write) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    client
        .request_empty(Method::DELETE, &["tokens", id])
        .await?;
    writeln!(out, "join token {id} revoked")?;
    Ok(Exit::Ok)
}

/// `symphony api-token create` through the API (an admin's token).
pub async fn api_token_create(
    api: &str,
    name: &str,
    role: &str,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let made: Value = client
        .request(
            Method::POST,
            &["api-tokens"],
            &[],
            Some(&json!({"name": name, "role": role})),
        )
        .await?;
    writeln!(out, "{}", made["token"].as_str().unwrap_or_default())?;
    Ok(Exit::Ok)
}

/// `symphony api-token ls`.
pub async fn api_token_ls(
    api: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    let all: Vec<Value> = client
        .request(Method::GET, &["api-tokens"], &[], None)
        .await?;
    if json {
        print_json(out, &Value::Array(all))?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|t| {
            vec![
                t["id"].as_str().unwrap_or_default().to_owned(),
                t["name"].as_str().unwrap_or_default().to_owned(),
                t["role"].as_str().unwrap_or_default().to_owned(),
                if t["revoked_at_ms"].is_i64() {
                    "revoked"
                } else {
                    "active"
                }
                .to_owned(),
            ]
        })
        .collect();
    out.write_all(render::render_table(&["ID", "NAME", "ROLE", "STATE"], &rows).as_bytes())?;
    Ok(Exit::Ok)
}

/// `symphony api-token revoke ID`.
pub async fn api_token_revoke(
    api: &str,
    id: &str,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    client
        .request_empty(Method::DELETE, &["api-tokens", id])
        .await?;
    writeln!(out, "API token {id} revoked")?;
    Ok(Exit::Ok)
}

/// `symphony node revoke ID`.
pub async fn node_revoke(
    api: &str,
    id: &str,
    reason: Option<&str>,
    revoke_token: bool,
    out: &mut impl Write,
) -> Result<Exit, ClientError> {
    let client = Client::new(api)?;
    client
        .send(
            Method::POST,
            &["nodes", id, "revoke"],
            &[],
            Some(&json!({"reason": reason, "revoke_token": revoke_token})),
        )
        .await?;
    writeln!(out, "node {id} revoked")?;
    if !revoke_token {
        writeln!(
            out,
            "(its join token can still enroll new nodes; `symphony token revoke ID`, or \
             --revoke-token next time)"
        )?;
    }
    Ok(Exit::Ok)
}
