//! Secrets: masking `config.token` in API output and restoring it from a round-tripped mask.

use serde_json::Value;

use super::model::SECRET_MASK;

/// `spec.config.token` of a stored specification, if it has one.
pub fn token_slot(specification: &mut Value) -> Option<&mut Value> {
    specification
        .get_mut("spec")?
        .get_mut("config")?
        .get_mut("token")
}

/// Every `processes[i].config.token` of an experiment declaration, and every
/// `tasks[i].config.token` of a workflow definition.
pub fn declaration_token_slots(declaration: &mut Value) -> impl Iterator<Item = &mut Value> {
    declaration
        .as_object_mut()
        .into_iter()
        .flat_map(|m| m.iter_mut())
        .filter(|(k, _)| *k == "processes" || *k == "tasks")
        .filter_map(|(_, v)| v.as_array_mut())
        .flatten()
        .filter_map(|p| p.get_mut("config")?.get_mut("token"))
}

/// A declaration (experiment or workflow) with every token it holds masked.
pub fn mask_declaration(declaration: &Value) -> Value {
    let mut out = declaration.clone();
    for t in declaration_token_slots(&mut out).filter(|t| !t.is_null()) {
        *t = Value::String(SECRET_MASK.to_owned());
    }
    out
}

/// Replaces `spec.config.token` (when present and not null) with [`SECRET_MASK`].
pub fn mask_secrets(specification: &mut Value) {
    if let Some(token) = token_slot(specification).filter(|t| !t.is_null()) {
        *token = Value::String(SECRET_MASK.to_owned());
    }
}

/// For a PATCHed `new` specification that still carries the mask as its token (a client
/// round-tripping a GET), puts back the real token from `old`; if `old` had none, the mask
/// is removed rather than stored as a token.
pub fn restore_secrets(new: &mut Value, old: &Value) {
    let masked = token_slot(new).is_some_and(|t| t.as_str() == Some(SECRET_MASK));
    if !masked {
        return;
    }
    let repo = |v: &Value| {
        v.get("spec")
            .and_then(|s| s.get("config"))
            .and_then(|c| c.get("git_repo"))
            .cloned()
    };
    // The real token goes back only to the repository it was given for: otherwise a PATCH
    // could point `git_repo` elsewhere and have the node send the token there.
    let old_token = old
        .get("spec")
        .and_then(|s| s.get("config"))
        .and_then(|c| c.get("token"))
        .filter(|t| !t.is_null())
        .filter(|_| repo(new) == repo(old))
        .cloned();
    match old_token {
        Some(real) => {
            if let Some(slot) = token_slot(new) {
                *slot = real;
            }
        }
        None => {
            if let Some(config) = new
                .get_mut("spec")
                .and_then(|s| s.get_mut("config"))
                .and_then(Value::as_object_mut)
            {
                config.remove("token");
            }
        }
    }
}
