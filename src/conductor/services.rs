//! The service table: which deployment binds each service of a namespace, on which port, and
//! the `SYMPH_*` variables every process of the namespace gets. Pure: the core persists.
//!
//! Invariants: a `(namespace, name)` is bound by at most one deployment; a port is used by at
//! most one service in the whole cluster (unlike the seed, whose experiments collided), so a
//! process can listen on `127.0.0.1:PORT` on any node; a deployment keeps the ports it holds
//! across patches for as long as it binds the name.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use crate::spec::{FieldError, Loc, Report, Services, service_var_prefix};

pub use crate::spec::{DEFAULT_NAMESPACE, SERVICE_HOST};

/// Where automatic ports come from (the seed's pool; fixed ports may be anywhere).
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 7000..=8999;

/// One bound service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub deployment_id: String,
    pub port: u16,
    pub exposed: bool,
}

/// Every bound service, by `(namespace, name)`.
#[derive(Debug, Clone)]
pub struct ServiceTable {
    services: BTreeMap<(String, String), Service>,
    range: RangeInclusive<u16>,
}

impl ServiceTable {
    /// A table holding `services` (as stored), allocating from `range`.
    pub fn new(services: Vec<Service>, range: RangeInclusive<u16>) -> Self {
        let services = services
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), s))
            .collect();
        Self { services, range }
    }

    /// Every service, ordered by namespace and name.
    pub fn all(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// The services `deployment_id` binds.
    pub fn of(&self, deployment_id: &str) -> Vec<Service> {
        self.all()
            .filter(|s| s.deployment_id == deployment_id)
            .cloned()
            .collect()
    }

    /// The services `deployment_id` would bind with `decl`, or every reason it cannot (each
    /// naming its field): a name bound by another deployment, a fixed port in use, a connect
    /// to a name nothing binds (when `check_connects`), no free port left. Ports it holds for names it still binds
    /// are kept; new names get the lowest free port of the range.
    pub fn plan(
        &self,
        namespace: &str,
        deployment_id: &str,
        decl: &Services,
        check_connects: bool,
    ) -> Result<Vec<Service>, Vec<FieldError>> {
        let root = Loc::new(&["body", "specification", "spec"]);
        let mut r = Report::default();
        let others = |s: &&Service| s.deployment_id != deployment_id;
        let mut taken: Vec<u16> = self.all().filter(others).map(|s| s.port).collect();
        let mut out = Vec::new();
        // Names first (fixed ports and kept ports), then automatic ports, so a fixed port
        // later in the list is never handed out before it is seen.
        let mut wanted = Vec::new();
        for (i, bind) in decl.binds.iter().enumerate() {
            let at = root.at("binds").at(i);
            let key = (namespace.to_owned(), bind.name.clone());
            let held = match self.services.get(&key) {
                Some(s) if s.deployment_id != deployment_id => {
                    let msg = format!(
                        "service {:?} is already bound by deployment {}",
                        bind.name, s.deployment_id
                    );
                    r.err(&at, "value_error", msg);
                    continue;
                }
                Some(s) => Some(s.port),
                None => None,
            };
            let port = match (bind.port, held) {
                (Some(fixed), _) => {
                    if taken.contains(&fixed) {
                        let msg = format!("port {fixed} is already used by another service");
                        r.err(&at.at(&bind.name), "value_error", msg);
                        continue;
                    }
                    Some(fixed)
                }
                (None, Some(kept)) if !taken.contains(&kept) => Some(kept),
                (None, _) => None,
            };
            if let Some(port) = port {
                taken.push(port);
            }
            wanted.push((at, bind, port));
        }
        for (at, bind, port) in wanted {
            let port = match port {
                Some(p) => p,
                None => match self.range.clone().find(|p| !taken.contains(p)) {
                    Some(p) => {
                        taken.push(p);
                        p
                    }
                    None => {
                        let msg = format!(
                            "no free service port left in {}-{}",
                            self.range.start(),
                            self.range.end()
                        );
                        r.err(&at, "value_error", msg);
                        continue;
                    }
                },
            };
            out.push(Service {
                namespace: namespace.to_owned(),
                name: bind.name.clone(),
                deployment_id: deployment_id.to_owned(),
                port,
                exposed: decl.exposes.contains(&bind.name),
            });
        }
        for (i, name) in decl.connects.iter().enumerate().filter(|_| check_connects) {
            let bound_here = decl.binds.iter().any(|b| &b.name == name);
            let key = (namespace.to_owned(), name.clone());
            if !bound_here && !self.services.contains_key(&key) {
                let msg = format!(
                    "service {name:?} is connected but not bound by any deployment in \
                     namespace {namespace:?}"
                );
                r.err(&root.at("connects").at(i), "value_error", msg);
            }
        }
        r.finish(Some(out))
    }

    /// Replaces what `deployment_id` binds with `services` (from [`ServiceTable::plan`]).
    pub fn set(&mut self, deployment_id: &str, services: Vec<Service>) {
        self.remove(deployment_id);
        for s in services {
            self.services
                .insert((s.namespace.clone(), s.name.clone()), s);
        }
    }

    /// Forgets what `deployment_id` binds.
    pub fn remove(&mut self, deployment_id: &str) {
        self.services
            .retain(|_, s| s.deployment_id != deployment_id);
    }

    /// The variables every process of `namespace` gets: `SYMPH_<N>_HOST`, `_PORT` and
    /// `_ADDR` for each of its services.
    pub fn env(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for s in self.all().filter(|s| s.namespace == namespace) {
            let prefix = service_var_prefix(&s.name);
            env.insert(format!("{prefix}_HOST"), SERVICE_HOST.to_owned());
            env.insert(format!("{prefix}_PORT"), s.port.to_string());
            env.insert(
                format!("{prefix}_ADDR"),
                format!("{SERVICE_HOST}:{}", s.port),
            );
        }
        env
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::spec::Bind;

    fn decl(binds: &[(&str, Option<u16>)], connects: &[&str], exposes: &[&str]) -> Services {
        Services {
            binds: binds
                .iter()
                .map(|(n, p)| Bind {
                    name: (*n).to_owned(),
                    port: *p,
                })
                .collect(),
            connects: connects.iter().map(|s| (*s).to_owned()).collect(),
            exposes: exposes.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn ports(services: &[Service]) -> Vec<(&str, u16)> {
        services.iter().map(|s| (s.name.as_str(), s.port)).collect()
    }

    fn locs(errors: &[FieldError]) -> Vec<String> {
        errors.iter().map(|e| e.loc[3..].join(".")).collect()
    }

    #[test]
    fn ports_are_the_lowest_free_cluster_wide_and_fixed_ones_are_kept() {
        let mut t = ServiceTable::new(Vec::new(), 7000..=7003);
        let a = t
            .plan(
                "default",
                "a",
                &decl(&[("x", None), ("tb", Some(7001))], &[], &["tb"]),
                true,
            )
            .unwrap();
        // The fixed 7001 is seen before the automatic port is chosen.
        assert_eq!(ports(&a), [("x", 7000), ("tb", 7001)]);
        assert!(a[1].exposed && !a[0].exposed);
        t.set("a", a);
        // Another namespace never gets the same port.
        let b = t
            .plan("exp", "b", &decl(&[("x", None)], &[], &[]), true)
            .unwrap();
        assert_eq!(ports(&b), [("x", 7002)]);
        t.set("b", b);
        // A patch keeps the ports held for names still bound.
        let a2 = t
            .plan(
                "default",
                "a",
                &decl(&[("new", None), ("x", None)], &[], &[]),
                true,
            )
            .unwrap();
        assert_eq!(ports(&a2), [("new", 7001), ("x", 7000)]);
        t.set("a", a2);
        let env = t.env("default");
        assert_eq!(env["SYMPH_NEW_PORT"], "7001");
        assert_eq!(env["SYMPH_X_ADDR"], "127.0.0.1:7000");
        assert_eq!(env["SYMPH_X_HOST"], "127.0.0.1");
        assert_eq!(env.len(), 6, "{env:?}");
        assert_eq!(t.env("exp")["SYMPH_X_PORT"], "7002");
        t.remove("a");
        assert_eq!(t.env("default").len(), 0);
    }

    #[test]
    fn conflicts_and_unbound_connects_name_the_field() {
        let mut t = ServiceTable::new(Vec::new(), 7000..=7001);
        t.set(
            "a",
            t.plan("default", "a", &decl(&[("x", Some(9000))], &[], &[]), true)
                .unwrap(),
        );
        let errors = t
            .plan(
                "default",
                "b",
                &decl(
                    &[
                        ("x", None),
                        ("y", Some(9000)),
                        ("z", None),
                        ("w", None),
                        ("v", None),
                    ],
                    &["x", "nobody", "z"],
                    &[],
                ),
                true,
            )
            .unwrap_err();
        assert_eq!(
            locs(&errors),
            ["binds.0", "binds.1.y", "binds.4", "connects.1"],
            "{errors:?}"
        );
        // The same name in another namespace is another service.
        assert!(
            t.plan("exp", "b", &decl(&[("x", None)], &["x"], &[]), true)
                .is_ok()
        );
        // Connecting to a name bound in the same declaration is fine.
        assert!(
            t.plan(
                "default",
                "c",
                &decl(&[("q", None)], &["q", "x"], &[]),
                true
            )
            .is_ok()
        );
        // A stored connector whose binder went away is still planned (not re-checked).
        let gone = decl(&[], &["gone"], &[]);
        assert!(t.plan("default", "d", &gone, false).is_ok());
        assert!(t.plan("default", "d", &gone, true).is_err());
    }
}
