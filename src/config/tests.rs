//! Tests for config loading: the original's example configs, key-naming errors, warnings,
//! overrides, path resolution and the logging formatters.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

const CONDUCTOR_YAML: &str = "\
mode: conductor
logging:
  level: INFO
  json: false
conductor:
  listen: 0.0.0.0:50051
  server: 203.0.113.7
  tls:
    cert_path: ./certs
";

/// The original README's node config, with the TLS files under `dir`.
fn node_yaml(dir: &Path) -> String {
    format!(
        "\
mode: node
logging:
  level: DEBUG
node:
  node_id: gpu-box-1
  conductor_addr: conductor.example.com:50051
  groups: [gpu, eu]
  capacities_total:
    GPU: 2
    CPU: 16
  heartbeat_sec: 3.0
  tls:
    ca_file: {0}/ca.pem
    cert_file: {0}/node.pem
    key_file: {0}/node.key
",
        dir.display()
    )
}

/// A temp folder holding the three node TLS files.
fn tls_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "node.pem", "node.key"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    dir
}

fn err(text: &str) -> ConfigError {
    parse_str(text, "c.yaml").unwrap_err()
}

#[test]
fn original_conductor_example_parses() {
    let (cfg, warnings) = parse_str(CONDUCTOR_YAML, "conductor.yaml").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cfg.mode, Mode::Conductor);
    assert_eq!(
        cfg.logging,
        LoggingConfig {
            level: "info".into(),
            json: false
        }
    );
    assert!(cfg.node.is_none());
    let c = cfg.conductor_config().unwrap();
    assert_eq!(c.listen, "0.0.0.0:50051".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.as_deref(), Some("203.0.113.7"));
    assert_eq!(c.cert_dir, PathBuf::from("./certs"));
    // Our keys keep their defaults.
    assert_eq!(
        c.http_listen,
        "127.0.0.1:8000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.storage_dir, PathBuf::from("storage"));
    assert_eq!(c.node_grace, Duration::from_secs(30));
    assert_eq!(c.suspect_after, Duration::from_secs(10));
    assert_eq!(c.scheduling, Scheduling::Spread);
}

#[test]
fn original_node_example_parses() {
    let dir = tls_dir();
    let (cfg, warnings) = parse_str(&node_yaml(dir.path()), "node.yaml").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cfg.mode, Mode::Node);
    assert_eq!(cfg.logging.level, "debug");
    assert!(cfg.conductor.is_none());
    let n = cfg.node_config().unwrap();
    assert_eq!(n.node_id, "gpu-box-1");
    assert_eq!(n.conductor_addr, "conductor.example.com:50051");
    assert_eq!(n.server_name, None);
    assert_eq!(n.groups, vec!["gpu".to_owned(), "eu".to_owned()]);
    let caps: BTreeMap<String, i64> = [("CPU".to_owned(), 16), ("GPU".to_owned(), 2)].into();
    assert_eq!(n.capacities_total, caps);
    assert_eq!(n.heartbeat, Duration::from_secs(3));
    assert_eq!(n.tls.ca_file, dir.path().join("ca.pem"));
    assert_eq!(n.tls.cert_file, dir.path().join("node.pem"));
    assert_eq!(n.tls.key_file, dir.path().join("node.key"));
    assert_eq!(n.work_dir, PathBuf::from("symphony-node"));
    assert_eq!(n.keep_alive, Duration::from_secs(5));
    assert_eq!(n.idle_timeout, Duration::from_secs(20));
}

#[test]
fn all_our_keys_parse() {
    let dir = tls_dir();
    let text = format!(
        "{}  http_listen: \"[::1]:9000\"\n  storage_dir: /var/lib/sym\n  node_grace_sec: 12.5\n  \
         suspect_after_sec: 4\n  scheduling: BinPack\n{}  server_name: conductor.internal\n  \
         work_dir: /srv/n\n  keep_alive_sec: 2\n  idle_timeout_sec: 8\n",
        CONDUCTOR_YAML,
        node_yaml(dir.path()).replace("mode: node\nlogging:\n  level: DEBUG\n", "")
    );
    let (cfg, warnings) = parse_str(&text, "both.yaml").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cfg.mode, Mode::Conductor);
    let c = cfg.conductor.as_ref().unwrap();
    assert_eq!(c.http_listen, "[::1]:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.storage_dir, PathBuf::from("/var/lib/sym"));
    assert_eq!(c.node_grace, Duration::from_millis(12_500));
    assert_eq!(c.suspect_after, Duration::from_secs(4));
    assert_eq!(c.scheduling, Scheduling::Binpack);
    let n = cfg.node.as_ref().unwrap();
    assert_eq!(n.server_name.as_deref(), Some("conductor.internal"));
    assert_eq!(n.work_dir, PathBuf::from("/srv/n"));
    assert_eq!(n.keep_alive, Duration::from_secs(2));
    assert_eq!(n.idle_timeout, Duration::from_secs(8));
}

#[test]
fn capacity_float_names_the_key() {
    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("GPU: 2", "GPU: 1.5");
    let e = parse_str(&text, "conductor.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "conductor.yaml: node.capacities_total.GPU: expected a non-negative integer, got 1.5"
    );
    for bad in ["\"2\"", "-1", "2.0", "true", "[1]"] {
        let text = node_yaml(dir.path()).replace("GPU: 2", &format!("GPU: {bad}"));
        let e = parse_str(&text, "n.yaml").unwrap_err();
        assert_eq!(
            e.key_name(),
            Some("node.capacities_total.GPU"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn bad_mode_names_the_key() {
    let e = err("mode: worker\n");
    assert_eq!(e.key_name(), Some("mode"));
    assert!(e.to_string().starts_with("c.yaml: mode: "), "{e}");
    assert!(e.to_string().contains("worker"), "{e}");
    assert_eq!(err("mode: 3\n").key_name(), Some("mode"));
}

#[test]
fn missing_node_id_names_the_key() {
    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("  node_id: gpu-box-1\n", "");
    let e = parse_str(&text, "node.yaml").unwrap_err();
    assert_eq!(e.to_string(), "node.yaml: node.node_id: missing (required)");
    let text = node_yaml(dir.path()).replace("gpu-box-1", "\"bad id!\"");
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.node_id")
    );
    let text = node_yaml(dir.path()).replace("  conductor_addr: conductor.example.com:50051\n", "");
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.conductor_addr")
    );
}

#[test]
fn node_mode_without_node_section_fails() {
    assert_eq!(err("mode: node\n").key_name(), Some("node"));
}

#[test]
fn tls_keys_are_required_and_must_exist() {
    let dir = tls_dir();
    let base = node_yaml(dir.path());
    let key_line = format!("    key_file: {}/node.key\n", dir.path().display());
    let e = parse_str(&base.replace(&key_line, ""), "node.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "node.yaml: node.tls.key_file: missing (required)"
    );

    let tls_start = base.find("  tls:").unwrap();
    let e = parse_str(&base[..tls_start], "node.yaml").unwrap_err();
    assert_eq!(e.key_name(), Some("node.tls"));

    std::fs::remove_file(dir.path().join("node.pem")).unwrap();
    let e = parse_str(&base, "node.yaml").unwrap_err();
    assert_eq!(e.key_name(), Some("node.tls.cert_file"));
    let missing = dir.path().join("node.pem");
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
}

#[test]
fn tls_files_are_checked_only_in_node_mode_until_asked() {
    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("mode: node", "mode: conductor");
    std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
    let (mut cfg, _) = parse_str(&text, "x.yaml").unwrap();
    apply_overrides(
        &mut cfg,
        &Overrides {
            mode: Some(Mode::Node),
            ..Default::default()
        },
    );
    assert_eq!(
        cfg.node_config().unwrap_err().key_name(),
        Some("node.tls.ca_file")
    );
}

#[test]
fn bad_addresses_name_the_key() {
    let e = err("conductor:\n  listen: nowhere\n");
    assert_eq!(e.key_name(), Some("conductor.listen"));
    assert!(
        e.to_string().starts_with("c.yaml: conductor.listen: "),
        "{e}"
    );
    assert_eq!(
        err("conductor:\n  listen: 0.0.0.0:99999\n").key_name(),
        Some("conductor.listen")
    );
    assert_eq!(
        err("conductor:\n  http_listen: 8000\n").key_name(),
        Some("conductor.http_listen")
    );

    let dir = tls_dir();
    let good = node_yaml(dir.path());
    for bad in [
        "conductor.example.com",
        "host:0",
        "host:x",
        "::1:5",
        ":50051",
        "[::1]50051",
    ] {
        let text = good.replace("conductor.example.com:50051", &format!("\"{bad}\""));
        let e = parse_str(&text, "n.yaml").unwrap_err();
        assert_eq!(e.key_name(), Some("node.conductor_addr"), "{bad}: {e}");
    }
    for ok in ["10.0.0.1:1", "[::1]:50051", "localhost:65535"] {
        let text = good.replace("conductor.example.com:50051", &format!("\"{ok}\""));
        let (cfg, _) = parse_str(&text, "n.yaml").unwrap();
        assert_eq!(cfg.node.unwrap().conductor_addr, ok);
    }
}

#[test]
fn durations_must_be_positive() {
    for bad in ["-5", "0", "\"30\"", ".inf"] {
        let e = err(&format!("conductor:\n  node_grace_sec: {bad}\n"));
        assert_eq!(e.key_name(), Some("conductor.node_grace_sec"), "{bad}: {e}");
    }
    let e = err("conductor:\n  node_grace_sec: -5\n");
    assert!(e.to_string().contains("greater than 0, got -5"), "{e}");
    let e = err("conductor:\n  node_grace_sec: 10\n  suspect_after_sec: 10\n");
    assert_eq!(e.key_name(), Some("conductor.suspect_after_sec"));
    // An unset suspect delay follows a short grace.
    let (cfg, _) = parse_str("conductor:\n  node_grace_sec: 4\n", "c.yaml").unwrap();
    assert_eq!(cfg.conductor.unwrap().suspect_after, Duration::from_secs(2));

    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("heartbeat_sec: 3.0", "heartbeat_sec: 0");
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.heartbeat_sec")
    );
    let text = format!("{}  keep_alive_sec: 30\n", node_yaml(dir.path()));
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.keep_alive_sec")
    );
}

#[test]
fn other_type_errors_name_the_key() {
    assert_eq!(
        err("logging:\n  level: loud\n").key_name(),
        Some("logging.level")
    );
    assert_eq!(
        err("logging:\n  json: \"yes\"\n").key_name(),
        Some("logging.json")
    );
    assert_eq!(err("logging: [a]\n").key_name(), Some("logging"));
    assert_eq!(
        err("conductor:\n  tls: 5\n").key_name(),
        Some("conductor.tls")
    );
    assert_eq!(
        err("conductor:\n  scheduling: random\n").key_name(),
        Some("conductor.scheduling")
    );
    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("[gpu, eu]", "[gpu, 7]");
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.groups[1]")
    );
    let text = node_yaml(dir.path()).replace("[gpu, eu]", "gpu");
    assert_eq!(
        parse_str(&text, "n").unwrap_err().key_name(),
        Some("node.groups")
    );
}

#[test]
fn syntax_errors_name_the_file() {
    let e = err("mode: [conductor\n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    assert!(e.to_string().starts_with("c.yaml: not valid YAML"), "{e}");
    let e = err("- a\n- b\n");
    assert!(
        e.to_string()
            .contains("expected a mapping at the top level"),
        "{e}"
    );
    // Duplicate keys are an error, not a silent overwrite.
    assert!(matches!(
        err("mode: node\nmode: conductor\n"),
        ConfigError::Syntax { .. }
    ));
}

#[test]
fn unknown_keys_warn_and_do_not_fail() {
    let text = "mode: conductor\nextra: 1\nlogging:\n  colour: true\nconductor:\n  lisen: \
                0.0.0.0:1\n  tls:\n    cert_pth: x\n";
    let (cfg, warnings) = parse_str(text, "conductor.yaml").unwrap();
    assert_eq!(
        cfg.conductor.unwrap().listen,
        "127.0.0.1:50051".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        warnings,
        vec![
            "conductor.yaml: unknown key extra (ignored)",
            "conductor.yaml: unknown key logging.colour (ignored)",
            "conductor.yaml: unknown key conductor.lisen (ignored; did you mean conductor.listen?)",
            "conductor.yaml: unknown key conductor.tls.cert_pth (ignored; did you mean \
             conductor.tls.cert_path?)",
        ]
    );
}

#[test]
fn empty_file_and_mode_inference() {
    let (cfg, warnings) = parse_str("", "empty.yaml").unwrap();
    assert!(warnings.is_empty());
    assert_eq!(cfg.mode, Mode::Conductor);
    assert_eq!(
        cfg.conductor,
        Some(ConductorConfig::with_defaults(Path::new("")))
    );
    assert_eq!(cfg.logging, LoggingConfig::default());

    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("mode: node\n", "");
    let (cfg, _) = parse_str(&text, "n.yaml").unwrap();
    assert_eq!(cfg.mode, Mode::Node);
    assert!(cfg.conductor.is_none());
}

#[test]
fn overrides_win_over_the_file() {
    let (mut cfg, _) = parse_str(CONDUCTOR_YAML, "conductor.yaml").unwrap();
    apply_overrides(&mut cfg, &Overrides::default());
    assert_eq!(
        (cfg.mode, cfg.logging.level.as_str(), cfg.logging.json),
        (Mode::Conductor, "info", false)
    );
    let o = Overrides {
        mode: Some(Mode::Node),
        log_level: Some("WARNING".into()),
        log_json: Some(true),
    };
    apply_overrides(&mut cfg, &o);
    assert_eq!(cfg.mode, Mode::Node);
    assert_eq!(
        cfg.logging,
        LoggingConfig {
            level: "warn".into(),
            json: true
        }
    );
    assert_eq!(cfg.node_config().unwrap_err().key_name(), Some("node"));

    // Switching a node file to conductor mode fills in the conductor defaults.
    let dir = tls_dir();
    let (mut cfg, _) = parse_str(&node_yaml(dir.path()), "sub/node.yaml").unwrap();
    apply_overrides(
        &mut cfg,
        &Overrides {
            mode: Some(Mode::Conductor),
            ..Default::default()
        },
    );
    let c = cfg.conductor_config().unwrap();
    assert_eq!(c.storage_dir, PathBuf::from("sub/storage"));
    assert!(cfg.node.is_some());
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let dir = tls_dir();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    let path = dir.path().join("etc").join("conductor.yaml");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"conductor:\n  storage_dir: ../data\n")
        .unwrap();
    let (cfg, _) = load(&path).unwrap();
    let etc = dir.path().join("etc");
    assert_eq!(cfg.base_dir, etc);
    assert_eq!(cfg.origin, path.display().to_string());
    let c = cfg.conductor.unwrap();
    assert_eq!(c.storage_dir, etc.join("../data"));
    assert_eq!(c.cert_dir, etc.join("../data").join("certs"));

    // Defaults are relative to the folder too; absolute paths stay as written.
    std::fs::write(&path, "conductor:\n  tls:\n    cert_path: /abs/certs\n").unwrap();
    let c = load(&path).unwrap().0.conductor.unwrap();
    assert_eq!(c.storage_dir, etc.join("storage"));
    assert_eq!(c.cert_dir, PathBuf::from("/abs/certs"));

    // A node config with relative TLS paths finds files next to it.
    let node = "mode: node\nnode:\n  node_id: n1\n  conductor_addr: h:1\n  tls:\n    ca_file: \
                ../ca.pem\n    cert_file: ../node.pem\n    key_file: ../node.key\n";
    std::fs::write(&path, node).unwrap();
    let (cfg, _) = load(&path).unwrap();
    let n = cfg.node_config().unwrap();
    assert_eq!(n.tls.ca_file, etc.join("../ca.pem"));
    assert_eq!(n.work_dir, etc.join("symphony-node"));
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.yaml");
    let e = load(&path).unwrap_err();
    assert!(matches!(e, ConfigError::NotFound { .. }));
    assert_eq!(
        e.to_string(),
        format!("config file not found: {}", path.display())
    );
}

#[test]
fn log_filter_checks_level_and_prefers_rust_log() {
    assert!(logging::filter("info", None).is_ok());
    assert!(logging::filter("CRITICAL", None).is_ok());
    let e = logging::filter("loud", None).unwrap_err();
    assert!(e.to_string().contains("invalid log level \"loud\""), "{e}");
    assert!(logging::filter("loud", Some("debug")).is_ok());
    assert!(logging::filter("info", Some("  ")).is_ok());
    assert!(logging::filter("info", Some("x=notalevel")).is_err());
}

/// A `MakeWriter` that appends to a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buf {
    type Writer = Buf;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn json_logging_writes_one_object_per_line() {
    let buf = Buf::default();
    let sub = logging::build(
        logging::filter("info", None).unwrap(),
        true,
        false,
        buf.clone(),
    );
    tracing::subscriber::with_default(sub, || {
        tracing::debug!("hidden");
        tracing::info!(node = "n1", "hello");
        tracing::warn!("second");
    });
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["level"], "INFO");
    assert_eq!(lines[0]["fields"]["message"], "hello");
    assert_eq!(lines[0]["fields"]["node"], "n1");
    assert_eq!(lines[1]["level"], "WARN");

    let buf = Buf::default();
    let sub = logging::build(
        logging::filter("debug", None).unwrap(),
        false,
        false,
        buf.clone(),
    );
    tracing::subscriber::with_default(sub, || tracing::debug!("plain"));
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        out.contains("DEBUG") && out.contains("plain") && !out.starts_with('{'),
        "{out}"
    );
}

#[test]
fn init_logging_is_idempotent() {
    // RUST_LOG may be set by whoever runs the tests; a valid one must not fail either call.
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        return;
    }
    // "error" keeps other tests' logs quiet: the global subscriber outlives this test.
    init_logging("error", false).unwrap();
    init_logging("debug", true).unwrap();
    assert!(init_logging("loud", false).is_err());
}

#[test]
fn several_bad_keys_are_all_reported() {
    let dir = tls_dir();
    let text = node_yaml(dir.path())
        .replace("heartbeat_sec: 3.0", "heartbeat_sec: -1")
        .replace("conductor.example.com:50051", "conductor.example.com")
        .replace("level: DEBUG", "level: loud");
    let e = parse_str(&text, "n.yaml").unwrap_err();
    assert!(
        matches!(&e, ConfigError::Invalid { errors, .. } if errors.len() == 3),
        "{e:?}"
    );
    // Listed in the order of the file shape (mode, logging, conductor, node), not the file's.
    assert_eq!(e.key_name(), Some("logging.level"));
    let text = e.to_string();
    let at: Vec<usize> = [
        "n.yaml: logging.level: expected trace, debug, info, warn or error, got \"loud\"",
        "n.yaml: node.conductor_addr: expected host:port, got \"conductor.example.com\" (no port)",
        "n.yaml: node.heartbeat_sec: expected a number of seconds greater than 0, got -1",
    ]
    .iter()
    .map(|part| {
        text.find(part)
            .unwrap_or_else(|| panic!("{part} not in {text}"))
    })
    .collect();
    assert!(at.is_sorted(), "{text}");

    // Every missing TLS file is named, not only the first.
    std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
    std::fs::remove_file(dir.path().join("node.key")).unwrap();
    let e = parse_str(&node_yaml(dir.path()), "n.yaml").unwrap_err();
    let ConfigError::Invalid { errors, .. } = &e else {
        panic!("{e:?}")
    };
    let keys: Vec<&str> = errors.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["node.tls.ca_file", "node.tls.key_file"]);
}

#[test]
fn unknown_nested_keys_warn_with_their_dotted_path() {
    let dir = tls_dir();
    let text = node_yaml(dir.path())
        .replace("  heartbeat_sec: 3.0\n", "  heartbeat_secs: 3.0\n")
        .replace("  tls:\n", "  tls:\n    ca_flie: x\n    colour: red\n");
    let (cfg, warnings) = parse_str(&text, "n.yaml").unwrap();
    assert_eq!(cfg.node.unwrap().heartbeat, Duration::from_secs(1));
    assert_eq!(
        warnings,
        vec![
            "n.yaml: unknown key node.heartbeat_secs (ignored; did you mean node.heartbeat_sec?)",
            "n.yaml: unknown key node.tls.ca_flie (ignored; did you mean node.tls.ca_file?)",
            "n.yaml: unknown key node.tls.colour (ignored)",
        ]
    );
}

#[test]
fn type_errors_deep_in_lists_and_maps_name_the_item() {
    let dir = tls_dir();
    let text = node_yaml(dir.path()).replace("[gpu, eu]", "[gpu, eu, 7]");
    let e = parse_str(&text, "n.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "n.yaml: node.groups[2]: expected a string, got 7 (quote it: \"7\")"
    );
    let text = node_yaml(dir.path()).replace("[gpu, eu]", "[gpu, \" \"]");
    assert_eq!(
        parse_str(&text, "n.yaml").unwrap_err().to_string(),
        "n.yaml: node.groups[1]: must not be empty"
    );
    let text = node_yaml(dir.path()).replace("CPU: 16", "CPU: \"16\"");
    let e = parse_str(&text, "n.yaml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "n.yaml: node.capacities_total.CPU: expected a non-negative integer, got \"16\""
    );
    let text = node_yaml(dir.path()).replace("GPU: 2", "GPU: -2");
    assert_eq!(
        parse_str(&text, "n.yaml").unwrap_err().to_string(),
        "n.yaml: node.capacities_total.GPU: expected a non-negative integer, got -2"
    );
}

#[test]
fn service_ports_are_a_range() {
    let (cfg, warnings) = parse_str("conductor:\n  service_ports: 9000-9100\n", "c.yaml").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(cfg.conductor.unwrap().service_ports, 9000..=9100);
    let (cfg, _) = parse_str("mode: conductor\n", "c.yaml").unwrap();
    assert_eq!(cfg.conductor.unwrap().service_ports, 7000..=8999);
    for bad in ["9-1", "0-10", "7000", "a-b", "1-70000"] {
        let e = err(&format!("conductor:\n  service_ports: \"{bad}\"\n"));
        assert_eq!(e.key_name(), Some("conductor.service_ports"), "{bad}: {e}");
    }
}

#[test]
fn direct_paths_default_on_and_take_a_boolean() {
    let (cfg, _) = parse_str("mode: conductor\n", "c.yaml").unwrap();
    assert!(cfg.conductor.unwrap().direct_paths);
    let (cfg, warnings) = parse_str("conductor:\n  direct_paths: false\n", "c.yaml").unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!cfg.conductor.unwrap().direct_paths);
    let e = err("conductor:\n  direct_paths: sometimes\n");
    assert_eq!(e.key_name(), Some("conductor.direct_paths"), "{e}");
}

#[test]
fn events_retention_has_defaults_and_names_a_bad_key() {
    let (cfg, _) = parse_str("mode: conductor\n", "c.yaml").unwrap();
    let events = cfg.conductor.unwrap().events;
    assert_eq!(events, crate::conductor::events::Retention::default());
    let (cfg, warnings) = parse_str(
        "conductor:\n  events_keep: 0\n  events_max_age_sec: 3600\n",
        "c.yaml",
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let events = cfg.conductor.unwrap().events;
    assert_eq!((events.keep, events.max_age.as_secs()), (0, 3600));
    let e = err("conductor:\n  events_keep: -1\n");
    assert_eq!(e.key_name(), Some("conductor.events_keep"), "{e}");
    let e = err("conductor:\n  events_max_age_sec: 0\n");
    assert_eq!(e.key_name(), Some("conductor.events_max_age_sec"), "{e}");
}

#[test]
fn trust_keys_have_defaults_and_name_a_bad_key() {
    let (cfg, _) = parse_str("mode: conductor\n", "c.yaml").unwrap();
    let c = cfg.conductor.unwrap();
    assert_eq!(c.api_auth, None);
    assert_eq!(c.api_tls, None);
    assert_eq!(c.node_cert_ttl, crate::conductor::DEFAULT_NODE_CERT_TTL);
    assert_eq!(c.renew_grace, crate::conductor::DEFAULT_RENEW_GRACE);
    let (cfg, warnings) = parse_str(
        "conductor:\n  api_auth: true\n  node_cert_ttl_sec: 3600\n  renew_grace_sec: 60\n",
        "c.yaml",
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let c = cfg.conductor.unwrap();
    assert_eq!(c.api_auth, Some(true));
    assert_eq!(
        (c.node_cert_ttl.as_secs(), c.renew_grace.as_secs()),
        (3600, 60)
    );
    let e = err("conductor:\n  node_cert_ttl_sec: 0\n");
    assert_eq!(e.key_name(), Some("conductor.node_cert_ttl_sec"), "{e}");
    let e = err("conductor:\n  api_tls: { cert_file: /nonexistent/api.pem }\n");
    assert_eq!(e.key_name(), Some("conductor.api_tls.key_file"), "{e}");
    let e = err(
        "conductor:\n  api_tls: { cert_file: /nonexistent/api.pem, key_file: /nonexistent/k }\n",
    );
    assert!(e.to_string().contains("conductor.api_tls.cert_file"), "{e}");
}
