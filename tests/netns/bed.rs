//! The NAT test bed: network namespaces, veth links, an nftables NAT router, and the real
//! `symphony` binary running inside them.
//!
//! Topology (one bed per test; every name carries `symt-<test pid>-<random tag>`):
//!
//! ```text
//!  root ns (the test) 203.0.113.1/30 ──veth── public ns 203.0.113.2/30  (HTTP API :8000)
//!                                             public ns 198.51.100.1/24 (conductor QUIC :50051)
//!                                                 │ veth
//!                                             router ns WAN 198.51.100.2/24 (+ .3 on a public-IP change)
//!                                             nft: masquerade random out of WAN, inbound only
//!                                             for established flows (endpoint-dependent filtering)
//!                                                 │ one veth per pod, 100.64.0.{16i+1}/28
//!                                             pod ns i 100.64.0.{16i+2}/28 (node agent i + workloads)
//! ```
//!
//! With [`Params::second_nat`], the last pod sits behind a second NAT on another network, and
//! the public namespace routes between the two NATs (as the internet does; adjacent NATs on
//! one segment defeat the low-TTL hole punch):
//!
//! ```text
//!  public ns 192.0.2.1/24 ──veth── nat2 ns WAN 192.0.2.2/24 ── last pod 100.64.0.{16i+2}/28
//! ```
//!
//! [`Params::nat`] and [`Params::second_nat`] choose each NAT's mapping: `masquerade random`
//! (a new public port per destination, like a symmetric NAT; the default) or plain
//! `masquerade` (keeps the source port when it can).
//!
//! The public namespace has no route to 100.64.0.0/24, so every node connection is outbound
//! through a NAT. The test process reaches the conductor's HTTP API over the management veth
//! (root <-> public), never through the NAT.
//!
//! Invariants: a [`Bed`] owns everything it created; dropping it (also while a test panics)
//! stops the processes (SIGTERM, then SIGKILL of anything left in its namespaces) and deletes
//! the namespaces, which destroys every veth. Namespaces left by a test process that died
//! without cleaning up (SIGKILL) are removed, with their temporary folders, by the next bed
//! ([`sweep_stale`]). Beds never run concurrently: [`serial`] holds a process-wide mutex and a
//! file lock across processes. The bed installs nothing; [`preflight`] says what is missing.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::api::Api;

/// The conductor's public address (QUIC).
pub const CONDUCTOR_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The NAT's public (WAN) address.
pub const NAT_WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The NAT's second WAN address (public-IP change).
pub const NAT_WAN_IP2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
/// The public namespace's address towards the second NAT.
const ROUTER2_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The second NAT's public (WAN) address.
pub const NAT2_WAN_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Root side of the management link.
const MGMT_HOST_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Public-namespace side of the management link; the conductor's HTTP API listens here.
const MGMT_CONDUCTOR_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The conductor's QUIC port.
pub const QUIC_PORT: u16 = 50051;
/// The conductor's HTTP port.
const HTTP_PORT: u16 = 8000;
/// Prefix of every namespace a bed creates.
const NS_PREFIX: &str = "symt-";
/// Prefix of every bed's temporary folder (configs, certificates, logs, work dirs).
const TMP_PREFIX: &str = "symphony-netns-";
/// The node group every test node joins.
pub const GROUP: &str = "netns";

/// Writes a line to the real stderr, past libtest's output capture, so skips and per-scenario
/// observations show in a normal `cargo test` run.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "netns: {line}");
}

/// Whether we run under CI (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// This process's effective uid, from /proc (nix's `geteuid` needs a feature we do not enable).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Checks that this process can build the bed. `false`: skip (the reason is printed).
/// Under CI a missing prerequisite is a failure (panics).
pub fn preflight(scenario: &str) -> bool {
    let mut problems = Vec::new();
    if effective_uid() != Some(0) {
        problems.push(
            "not running as root (network namespaces need it): run `sudo -E cargo test --test netns`".to_owned(),
        );
    }
    let tools = [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("conntrack", "conntrack"),
    ];
    let missing: Vec<(&str, &str)> = tools
        .into_iter()
        .filter(|(t, _)| find_tool(t).is_none())
        .collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
        let pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        problems.push(format!(
            "missing tools {names:?}: install them with `apt-get install -y {}`",
            pkgs.join(" ")
        ));
    }
    if problems.is_empty() {
        return true;
    }
    let msg = problems.join("; ");
    assert!(!in_ci(), "netns suite cannot run under CI: {msg}");
    say(&format!("SKIPPED {scenario}: {msg}"));
    false
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Held while a bed exists: one bed at a time in this process and across processes.
pub struct Serial {
    _guard: MutexGuard<'static, ()>,
    _file: File,
}

/// Waits for the right to build a bed.
pub fn serial() -> Serial {
    let guard = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let path = std::env::temp_dir().join("symphony-netns.lock");
    let file = File::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    file.lock().unwrap();
    Serial {
        _guard: guard,
        _file: file,
    }
}

/// Runs a command; panics with its output if it fails. Returns stdout.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "`{prog} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failures (cleanup paths). Returns stdout (empty on failure).
fn run_quiet(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Pids of the processes whose network namespace is `ns`.
pub fn ns_pids(ns: &str) -> Vec<u32> {
    run_quiet("ip", &["netns", "pids", ns])
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A process's command line, split at NULs (None if it is gone).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None; // a zombie
    }
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces left by test processes that no longer exist.
fn sweep_stale() {
    for line in run_quiet("ip", &["netns", "list"]).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let owner: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if owner.is_some_and(pid_alive) {
            continue;
        }
        say(&format!("removing stale namespace {name}"));
        for pid in ns_pids(name) {
            let _ = kill(
                Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                Signal::SIGKILL,
            );
        }
        run_quiet("ip", &["netns", "del", name]);
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let owner: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if owner.is_some_and(|p| !pid_alive(p)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Timing and topology knobs of one bed.
#[derive(Debug, Clone)]
pub struct Params {
    /// Pod namespaces, one node each (`n0`, `n1`, ...).
    pub pods: usize,
    /// `conductor.node_grace_sec`.
    pub node_grace_sec: f64,
    /// `conductor.suspect_after_sec`.
    pub suspect_after_sec: f64,
    /// `node.heartbeat_sec` (None: the default).
    pub heartbeat_sec: Option<f64>,
    /// `node.keep_alive_sec` (None: the default).
    pub keep_alive_sec: Option<f64>,
    /// `node.idle_timeout_sec` (None: the default).
    pub idle_timeout_sec: Option<f64>,
    /// UDP conntrack timeouts (both `nf_conntrack_udp_timeout` and `_stream`) in the router.
    pub udp_conntrack_timeout_sec: Option<u32>,
    /// How the (first) NAT maps ports.
    pub nat: Nat,
    /// Put the last pod behind a second NAT mapping this way (see the module docs).
    pub second_nat: Option<Nat>,
}

/// How a NAT maps a pod's UDP port to a public one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade random`: a fresh public port per mapping (so per destination).
    Random,
    /// `masquerade`: the pod's own port when it is free.
    PortPreserving,
}

impl Nat {
    fn rule(self) -> &'static str {
        match self {
            Nat::Random => "masquerade random",
            Nat::PortPreserving => "masquerade",
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self {
            pods: 1,
            node_grace_sec: 60.0,
            suspect_after_sec: 10.0,
            heartbeat_sec: None,
            keep_alive_sec: None,
            idle_timeout_sec: None,
            udp_conntrack_timeout_sec: None,
            nat: Nat::Random,
            second_nat: None,
        }
    }
}

/// One pod namespace and its node.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The namespace.
    pub ns: String,
    /// The node's id (`n<i>`).
    pub node_id: String,
    /// The pod's current address.
    pub ip: Ipv4Addr,
    /// The address a pod-IP change moves to.
    alt_ip: Ipv4Addr,
    /// The NAT namespace in front of it.
    router: String,
    router_if: String,
    pod_if: String,
}

struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

/// A built test bed. See the module docs.
pub struct Bed {
    /// The scenario's name (for messages).
    pub scenario: &'static str,
    /// The parameters it was built with.
    pub params: Params,
    /// The conductor's HTTP API.
    pub api: Api,
    /// The pods, index = node number.
    pub pods: Vec<Pod>,
    ns_public: String,
    ns_router: String,
    wan_if: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
    bin: &'static str,
    _serial: Serial,
}

impl Bed {
    /// Builds the network, starts the conductor, issues certificates and starts one node per
    /// pod. Does not wait for the nodes to register.
    pub async fn up(scenario: &'static str, params: Params, serial: Serial) -> Self {
        sweep_stale();
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let prefix = format!("{NS_PREFIX}{}-{tag}", std::process::id());
        let pods = (0..params.pods)
            .map(|i| {
                let base = u8::try_from(16 * i).unwrap();
                let second = params.second_nat.is_some() && i + 1 == params.pods;
                Pod {
                    ns: format!("{prefix}-pod{i}"),
                    node_id: format!("n{i}"),
                    ip: Ipv4Addr::new(100, 64, 0, base + 2),
                    alt_ip: Ipv4Addr::new(100, 64, 0, base + 3),
                    router: format!("{prefix}-nat{}", if second { "2" } else { "" }),
                    router_if: format!("l{tag}r{i}"),
                    pod_if: format!("l{tag}p{i}"),
                }
            })
            .collect();
        let mut bed = Self {
            scenario,
            params,
            api: Api::new(&format!("http://{MGMT_CONDUCTOR_IP}:{HTTP_PORT}"), ""),
            pods,
            ns_public: format!("{prefix}-pub"),
            ns_router: format!("{prefix}-nat"),
            wan_if: format!("w{tag}r"),
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
                .tempdir()
                .unwrap(),
            bin: env!("CARGO_BIN_EXE_symphony"),
            _serial: serial,
        };
        bed.build_network(&tag);
        // The API listens beyond loopback: the first admin token is made on the conductor's
        // host, against its store, before it starts (what an operator does).
        let storage = bed.dir().join("conductor").join("storage");
        let admin = run(
            bed.bin,
            &[
                "api-token",
                "create",
                "--role",
                "admin",
                "--name",
                "bed",
                "--storage",
                storage.to_str().unwrap(),
            ],
        );
        bed.api = Api::new(
            &format!("http://{MGMT_CONDUCTOR_IP}:{HTTP_PORT}"),
            admin.trim(),
        );
        bed.start_conductor().await;
        for i in 0..bed.pods.len() {
            bed.issue_cert(i);
            bed.start_node(i);
        }
        bed
    }

    fn add_ns(&mut self, name: &str) {
        run("ip", &["netns", "add", name]);
        self.namespaces.push(name.to_owned());
        run("ip", &["-n", name, "link", "set", "lo", "up"]);
    }

    /// Runs a command inside a namespace; panics on failure.
    pub fn ns_exec(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Writes a sysctl inside a namespace (through /proc/sys; no procps needed).
    fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.ns_exec(ns, &["sh", "-c", &format!("printf %s {value} > {path}")]);
    }

    fn build_network(&mut self, tag: &str) {
        let (public, router) = (self.ns_public.clone(), self.ns_router.clone());
        self.add_ns(&public);
        self.add_ns(&router);
        // Management link: root <-> public (the test reaches the HTTP API over it).
        let (mh, mc) = (format!("m{tag}h"), format!("m{tag}c"));
        run(
            "ip",
            &[
                "link", "add", &mh, "type", "veth", "peer", "name", &mc, "netns", &public,
            ],
        );
        run(
            "ip",
            &["addr", "add", &format!("{MGMT_HOST_IP}/30"), "dev", &mh],
        );
        run("ip", &["link", "set", &mh, "up"]);
        run(
            "ip",
            &[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{MGMT_CONDUCTOR_IP}/30"),
                "dev",
                &mc,
            ],
        );
        run("ip", &["-n", &public, "link", "set", &mc, "up"]);
        // WAN: public <-> router.
        let wc = format!("w{tag}c");
        run(
            "ip",
            &[
                "link",
                "add",
                &self.wan_if,
                "netns",
                &router,
                "type",
                "veth",
                "peer",
                "name",
                &wc,
                "netns",
                &public,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{CONDUCTOR_IP}/24"),
                "dev",
                &wc,
            ],
        );
        run("ip", &["-n", &public, "link", "set", &wc, "up"]);
        run(
            "ip",
            &[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{NAT_WAN_IP}/24"),
                "dev",
                &self.wan_if,
            ],
        );
        run("ip", &["-n", &router, "link", "set", &self.wan_if, "up"]);
        let wan = self.wan_if.clone();
        self.setup_nat(&router, &wan, self.params.nat, "nat.nft");
        if let Some(nat2) = self.params.second_nat {
            self.build_second_nat(tag, nat2);
        }
        // Pods.
        for (i, pod) in self.pods.clone().iter().enumerate() {
            let router = pod.router.clone();
            self.add_ns(&pod.ns);
            let base = u8::try_from(16 * i).unwrap();
            let gw = Ipv4Addr::new(100, 64, 0, base + 1);
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &pod.router_if,
                    "netns",
                    &router,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &pod.pod_if,
                    "netns",
                    &pod.ns,
                ],
            );
            run(
                "ip",
                &[
                    "-n",
                    &router,
                    "addr",
                    "add",
                    &format!("{gw}/28"),
                    "dev",
                    &pod.router_if,
                ],
            );
            run("ip", &["-n", &router, "link", "set", &pod.router_if, "up"]);
            self.sysctl(&pod.ns, "net.ipv4.conf.all.promote_secondaries", "1");
            self.sysctl(&pod.ns, "net.ipv4.conf.default.promote_secondaries", "1");
            run(
                "ip",
                &[
                    "-n",
                    &pod.ns,
                    "addr",
                    "add",
                    &format!("{}/28", pod.ip),
                    "dev",
                    &pod.pod_if,
                ],
            );
            run("ip", &["-n", &pod.ns, "link", "set", &pod.pod_if, "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &pod.ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                ],
            );
        }
    }

    /// Makes `router` a NAT out of `wan_if`: forwarding, conntrack timeouts, the mapping, and
    /// only established flows in from the WAN (endpoint-dependent filtering).
    fn setup_nat(&self, router: &str, wan_if: &str, nat: Nat, rules_name: &str) {
        self.sysctl(router, "net.ipv4.conf.all.promote_secondaries", "1");
        self.sysctl(router, "net.ipv4.conf.default.promote_secondaries", "1");
        self.sysctl(router, "net.ipv4.ip_forward", "1");
        if let Some(t) = self.params.udp_conntrack_timeout_sec {
            for key in [
                "net.netfilter.nf_conntrack_udp_timeout",
                "net.netfilter.nf_conntrack_udp_timeout_stream",
            ] {
                self.sysctl(router, key, &t.to_string());
            }
        }
        // `masquerade random`: a fresh conntrack entry gets a fresh port, so a flush really
        // rebinds; plain `masquerade` keeps the pod's port when it can.
        let rules = format!(
            "table ip nat {{\n\
             \tchain prerouting {{ type nat hook prerouting priority dstnat; }}\n\
             \tchain postrouting {{ type nat hook postrouting priority srcnat; oifname \"{wan_if}\" {mapping}; }}\n\
             }}\n\
             table ip filter {{\n\
             \tchain forward {{ type filter hook forward priority filter; iifname \"{wan_if}\" ct state established,related accept; iifname \"{wan_if}\" drop; }}\n\
             }}\n",
            mapping = nat.rule(),
        );
        let rules_file = self.dir.path().join(rules_name);
        std::fs::write(&rules_file, rules).unwrap();
        self.ns_exec(router, &["nft", "-f", rules_file.to_str().unwrap()]);
    }

    /// The second NAT (see the module docs): its WAN on 192.0.2.0/24 towards the public
    /// namespace, which now routes between the two NATs.
    fn build_second_nat(&mut self, tag: &str, nat: Nat) {
        let (public, router) = (self.ns_public.clone(), format!("{}2", self.ns_router));
        self.add_ns(&router);
        let (wan, wc) = (format!("v{tag}r"), format!("v{tag}c"));
        run(
            "ip",
            &[
                "link", "add", &wan, "netns", &router, "type", "veth", "peer", "name", &wc,
                "netns", &public,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &public,
                "addr",
                "add",
                &format!("{ROUTER2_IP}/24"),
                "dev",
                &wc,
            ],
        );
        run("ip", &["-n", &public, "link", "set", &wc, "up"]);
        self.sysctl(&public, "net.ipv4.ip_forward", "1");
        run(
            "ip",
            &[
                "-n",
                &router,
                "addr",
                "add",
                &format!("{NAT2_WAN_IP}/24"),
                "dev",
                &wan,
            ],
        );
        run("ip", &["-n", &router, "link", "set", &wan, "up"]);
        let gw = ROUTER2_IP.to_string();
        run(
            "ip",
            &["-n", &router, "route", "add", "default", "via", &gw],
        );
        // The first NAT reaches the second one's network through the public namespace.
        let first = self.ns_router.clone();
        run(
            "ip",
            &[
                "-n",
                &first,
                "route",
                "add",
                "192.0.2.0/24",
                "via",
                &CONDUCTOR_IP.to_string(),
            ],
        );
        self.setup_nat(&router, &wan, nat, "nat2.nft");
    }

    /// Whether the public namespace (the conductor's) has a route to `ip`.
    pub fn public_routes_to(&self, ip: Ipv4Addr) -> bool {
        Command::new("ip")
            .args(["-n", &self.ns_public, "route", "get", &ip.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, name: &str, ns: &str, args: &[&str]) {
        self.spawn_env(name, ns, args, &[]);
    }

    /// Starts a node in pod `i`'s namespace as a pod template would: `symphony node` with only
    /// `SYMPHONY_JOIN_TOKEN` and `SYMPHONY_CONDUCTOR` (and a work dir of its own).
    pub fn start_joining_node(&mut self, name: &str, i: usize, join_token: &str) {
        let ns = self.pods[i].ns.clone();
        let work = self.dir().join(name);
        std::fs::create_dir_all(&work).unwrap();
        let conductor = format!("{CONDUCTOR_IP}:{QUIC_PORT}");
        self.spawn_env(
            name,
            &ns,
            &["node", "--work-dir", work.to_str().unwrap()],
            &[
                ("SYMPHONY_JOIN_TOKEN", join_token),
                ("SYMPHONY_CONDUCTOR", &conductor),
            ],
        );
    }

    fn spawn_env(&mut self, name: &str, ns: &str, args: &[&str], env: &[(&str, &str)]) {
        assert!(
            self.procs
                .iter()
                .all(|p| p.name != name || p.child.is_none()),
            "{name} already runs"
        );
        let log = self.dir().join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns, self.bin])
            .args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        match self.procs.iter_mut().find(|p| p.name == name) {
            Some(p) => p.child = Some(child),
            None => self.procs.push(Proc {
                name: name.to_owned(),
                child: Some(child),
                log,
            }),
        }
    }

    fn conductor_yaml(&self) -> PathBuf {
        let d = self.dir().join("conductor");
        let path = self.dir().join("conductor.yaml");
        let text = format!(
            "mode: conductor\n\
             logging: {{ level: info }}\n\
             conductor:\n\
             \x20 listen: {CONDUCTOR_IP}:{QUIC_PORT}\n\
             \x20 server: {CONDUCTOR_IP}\n\
             \x20 http_listen: {MGMT_CONDUCTOR_IP}:{HTTP_PORT}\n\
             \x20 api_auth: true\n\
             \x20 storage_dir: {storage}\n\
             \x20 tls: {{ cert_path: {certs} }}\n\
             \x20 node_grace_sec: {grace}\n\
             \x20 suspect_after_sec: {suspect}\n",
            storage = d.join("storage").display(),
            certs = d.join("certs").display(),
            grace = self.params.node_grace_sec,
            suspect = self.params.suspect_after_sec,
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the conductor in the public namespace and waits until its API answers.
    pub async fn start_conductor(&mut self) {
        let cfg = self.conductor_yaml();
        let ns = self.ns_public.clone();
        self.spawn("conductor", &ns, &["--config", cfg.to_str().unwrap()]);
        let api = self.api.clone();
        super::api::until(
            "the conductor's API answers",
            Duration::from_secs(30),
            async || {
                self.check_running("conductor")?;
                api.nodes().await.map(|_| ())
            },
        )
        .await;
    }

    /// Fails if a process of this bed has exited.
    pub fn check_running(&mut self, name: &str) -> Result<(), String> {
        let p = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or(format!("no process {name}"))?;
        match p.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(st))) => panic!("{name} exited early: {st}"),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(format!("{name} is not running")),
        }
    }

    fn issue_cert(&self, i: usize) {
        let pod = &self.pods[i];
        let certs = self.dir().join("conductor").join("certs");
        let out = self.dir().join(&pod.node_id).join("certs");
        run(
            self.bin,
            &[
                "cert",
                "node",
                &pod.node_id,
                "--cert-path",
                certs.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
    }

    fn node_yaml(&self, i: usize) -> PathBuf {
        let pod = &self.pods[i];
        let d = self.dir().join(&pod.node_id);
        let certs = d.join("certs");
        let mut text = format!(
            "mode: node\n\
             logging: {{ level: info }}\n\
             node:\n\
             \x20 node_id: {id}\n\
             \x20 conductor_addr: {CONDUCTOR_IP}:{QUIC_PORT}\n\
             \x20 groups: [{GROUP}, {id}]\n\
             \x20 capacities_total: {{ slot: 4 }}\n\
             \x20 work_dir: {work}\n\
             \x20 tls: {{ ca_file: {ca}, cert_file: {cert}, key_file: {key} }}\n",
            id = pod.node_id,
            work = d.join("work").display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("{}.pem", pod.node_id)).display(),
            key = certs.join(format!("{}.key", pod.node_id)).display(),
        );
        for (key, v) in [
            ("heartbeat_sec", self.params.heartbeat_sec),
            ("keep_alive_sec", self.params.keep_alive_sec),
            ("idle_timeout_sec", self.params.idle_timeout_sec),
        ] {
            if let Some(v) = v {
                text.push_str(&format!("  {key}: {v}\n"));
            }
        }
        let path = d.join("node.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts node `i` in its pod namespace.
    pub fn start_node(&mut self, i: usize) {
        let cfg = self.node_yaml(i);
        let (name, ns) = (self.pods[i].node_id.clone(), self.pods[i].ns.clone());
        self.spawn(&name, &ns, &["--config", cfg.to_str().unwrap()]);
    }

    /// The running child `name`, taken out of the bed (it is about to end).
    fn take_child(&mut self, name: &str) -> Child {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .child
            .take()
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// Sends SIGTERM to a process of the bed and waits (at most 20 s) for it to exit.
    pub fn stop(&mut self, name: &str) -> ExitStatus {
        let mut child = self.take_child(name);
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` of a process of the bed (what an OOM killer or a crash does); waits for it.
    pub fn kill9(&mut self, name: &str) {
        let mut child = self.take_child(name);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `conntrack -F` in the router: every NAT mapping is forgotten, so the next packet of
    /// each flow gets a fresh (random) public port.
    pub fn flush_conntrack(&self) {
        let mut routers: Vec<&str> = self.pods.iter().map(|p| p.router.as_str()).collect();
        routers.push(&self.ns_router);
        routers.sort_unstable();
        routers.dedup();
        for r in routers {
            self.ns_exec(r, &["conntrack", "-F"]);
        }
    }

    /// Moves pod `i` to its alternate address (add the new one, delete the old primary; the
    /// new one is promoted and the default route stays). Returns the new address.
    pub fn change_pod_ip(&mut self, i: usize) -> Ipv4Addr {
        let pod = self.pods[i].clone();
        run(
            "ip",
            &[
                "-n",
                &pod.ns,
                "addr",
                "add",
                &format!("{}/28", pod.alt_ip),
                "dev",
                &pod.pod_if,
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &pod.ns,
                "addr",
                "del",
                &format!("{}/28", pod.ip),
                "dev",
                &pod.pod_if,
            ],
        );
        let addrs = run(
            "ip",
            &[
                "-n",
                &pod.ns,
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                &pod.pod_if,
            ],
        );
        assert!(
            addrs.contains(&pod.alt_ip.to_string()) && !addrs.contains(&format!("{}/", pod.ip)),
            "{addrs}"
        );
        let routes = run("ip", &["-n", &pod.ns, "route", "show", "default"]);
        assert!(
            routes.contains("default"),
            "the pod lost its default route: {routes:?}"
        );
        self.pods[i].alt_ip = pod.ip;
        self.pods[i].ip = pod.alt_ip;
        pod.alt_ip
    }

    /// Moves the NAT to its second public address: SNAT to it, forget every mapping, then
    /// remove the old address.
    pub fn change_public_ip(&self) {
        let r = &self.ns_router;
        run(
            "ip",
            &[
                "-n",
                r,
                "addr",
                "add",
                &format!("{NAT_WAN_IP2}/24"),
                "dev",
                &self.wan_if,
            ],
        );
        self.ns_exec(r, &["nft", "flush", "chain", "ip", "nat", "postrouting"]);
        let to = NAT_WAN_IP2.to_string();
        self.ns_exec(
            r,
            &[
                "nft",
                "add",
                "rule",
                "ip",
                "nat",
                "postrouting",
                "oifname",
                &self.wan_if,
                "snat",
                "to",
                &to,
                "random",
            ],
        );
        self.flush_conntrack();
        run(
            "ip",
            &[
                "-n",
                r,
                "addr",
                "del",
                &format!("{NAT_WAN_IP}/24"),
                "dev",
                &self.wan_if,
            ],
        );
    }

    /// Cuts pod `i`'s link (the router's end goes down; the pod keeps its routes).
    pub fn cut(&self, i: usize) {
        run(
            "ip",
            &[
                "-n",
                &self.pods[i].router,
                "link",
                "set",
                &self.pods[i].router_if,
                "down",
            ],
        );
    }

    /// Restores pod `i`'s link.
    pub fn restore(&self, i: usize) {
        run(
            "ip",
            &[
                "-n",
                &self.pods[i].router,
                "link",
                "set",
                &self.pods[i].router_if,
                "up",
            ],
        );
    }

    /// Pids in pod `i`'s namespace running `sleep <token>` (the test workloads).
    pub fn workload_pids(&self, i: usize, token: &str) -> Vec<u32> {
        ns_pids(&self.pods[i].ns)
            .into_iter()
            .filter(|&pid| {
                cmdline(pid)
                    .is_some_and(|c| c.len() == 2 && c[0].ends_with("sleep") && c[1] == token)
            })
            .collect()
    }

    /// Index of the pod that runs node `node_id`.
    pub fn pod_of(&self, node_id: &str) -> usize {
        self.pods
            .iter()
            .position(|p| p.node_id == node_id)
            .unwrap_or_else(|| panic!("no node {node_id}"))
    }

    fn teardown(&mut self) {
        // Nodes first (a node's own shutdown stops its workloads), then the conductor.
        self.procs.sort_by_key(|p| p.name == "conductor");
        for p in &mut self.procs {
            if let Some(c) = &p.child {
                let _ = kill(
                    Pid::from_raw(i32::try_from(c.id()).unwrap_or(0)),
                    Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for ns in &self.namespaces {
            for pid in ns_pids(ns) {
                let _ = kill(
                    Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
                    Signal::SIGKILL,
                );
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            run_quiet("ip", &["netns", "del", &ns]);
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // On failure (or with SYMPHONY_NETNS_LOGS set) show what the processes said.
        if std::thread::panicking() || std::env::var_os("SYMPHONY_NETNS_LOGS").is_some() {
            for p in &self.procs {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!(
                    "---- {} ({}): last {} lines of {} ----",
                    self.scenario,
                    p.name,
                    tail.len(),
                    p.log.display()
                );
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
        self.teardown();
    }
}
