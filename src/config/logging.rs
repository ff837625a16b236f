//! Process-wide logging set up from `logging.level` / `logging.json` (and their CLI overrides).
//!
//! Logs go to stderr: plain text (coloured only on a terminal) or one JSON object per line.
//! `RUST_LOG`, when set and non-empty, wins over the configured level. Setting up twice is
//! harmless: the second call keeps the first subscriber and returns `Ok`.

use std::io::IsTerminal;

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

use super::{ConfigError, normalize_level};

/// Installs the global subscriber: `level` is one of trace/debug/info/warn/error (any case;
/// `warning` and `critical` accepted), `json` selects the JSON formatter. `RUST_LOG` wins if
/// set. An already installed subscriber is kept (no error).
pub fn init_logging(level: &str, json: bool) -> Result<(), ConfigError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(level, rust_log.as_deref())?;
    let ansi = std::io::stderr().is_terminal();
    // Fails only when a global subscriber (or `log` logger) is already set: keep that one.
    let _already_set = build(filter, json, ansi, std::io::stderr).try_init();
    Ok(())
}

/// The filter: `RUST_LOG` if set and non-empty, else the checked level.
pub(super) fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, ConfigError> {
    if let Some(directives) = rust_log.filter(|s| !s.trim().is_empty()) {
        return EnvFilter::try_new(directives)
            .map_err(|e| ConfigError::Logging(format!("invalid RUST_LOG {directives:?}: {e}")));
    }
    let level = normalize_level(level).ok_or_else(|| {
        ConfigError::Logging(format!(
            "invalid log level {level:?}: expected trace, debug, info, warn or error"
        ))
    })?;
    EnvFilter::try_new(level).map_err(|e| ConfigError::Logging(format!("{level}: {e}")))
}

/// The subscriber writing to `writer`.
pub(super) fn build<W>(
    filter: EnvFilter,
    json: bool,
    ansi: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        Box::new(builder.json().finish())
    } else {
        Box::new(builder.with_ansi(ansi).finish())
    }
}
