//! Mistakes a config can hold without being invalid: what `weftctl analyze` reports beyond the
//! loader's and the compiler's rejections. Each [`Finding`] names the object, the field and
//! what to change; nothing here changes what the compiler builds.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::{Action, Compiled, MtlsMode, ObjectRef, PolicyTarget, RouteKind, Snapshot, TrafficTarget, Workload};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One mistake: a stable `code` (for tests and scripts), where, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    /// "Kind ns/name".
    pub object: String,
    pub field: String,
    pub message: String,
}

fn finding(
    severity: Severity,
    code: &'static str,
    kind: &str,
    id: &ObjectRef,
    field: impl Into<String>,
    message: String,
) -> Finding {
    Finding { severity, code, object: format!("{kind} {id}"), field: field.into(), message }
}

/// Every finding for `snapshot` as `compiled` from it: the compiler's rejections as errors
/// (`rejected`: among them references to missing Services, backends and ports, conflicting
/// routes), then the checks below.
pub fn analyze(snapshot: &Snapshot, compiled: &Compiled) -> Vec<Finding> {
    let mut out: Vec<Finding> = compiled
        .rejected
        .iter()
        .map(|r| Finding {
            severity: Severity::Error,
            code: "rejected",
            object: r.object.clone(),
            field: r.field.clone(),
            message: r.reason.clone(),
        })
        .collect();
    shadowed_rules(snapshot, &mut out);
    selects_nothing(snapshot, &mut out);
    retries_beyond_timeout(snapshot, &mut out);
    strict_without_identity(snapshot, compiled, &mut out);
    services_without_endpoints(compiled, &mut out);
    out.sort_by(|a, b| (b.severity, &a.object, &a.field).cmp(&(a.severity, &b.object, &b.field)));
    out.dedup();
    out
}

/// A rule whose matches an earlier rule of the same route already lists: it never matches.
fn shadowed_rules(snapshot: &Snapshot, out: &mut Vec<Finding>) {
    for route in &snapshot.routes {
        for (r, rule) in route.rules.iter().enumerate() {
            for (m, matched) in rule.matches.iter().enumerate() {
                let earlier = route.rules[..r].iter().position(|e| e.matches.contains(matched));
                if let Some(e) = earlier {
                    out.push(finding(
                        Severity::Warning,
                        "shadowed-match",
                        route.kind.kind_name(),
                        &route.id,
                        format!("spec.rules[{r}].matches[{m}]"),
                        format!("spec.rules[{e}] has the same match and wins; remove one or make them differ"),
                    ));
                }
            }
        }
    }
}

fn selected<'a>(snapshot: &'a Snapshot, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<&'a Workload> {
    snapshot
        .workloads
        .iter()
        .filter(|w| w.id.namespace == namespace && w.has_labels(labels))
        .collect()
}

/// Policies whose selector matches no workload: they protect nothing (an ALLOW meant to open
/// a path opens none).
fn selects_nothing(snapshot: &Snapshot, out: &mut Vec<Finding>) {
    let mut check = |kind: &str, id: &ObjectRef, field: &str, labels: &BTreeMap<String, String>, what: &str| {
        if selected(snapshot, &id.namespace, labels).is_empty() {
            let message = format!("selects no workload in namespace {} (labels {labels:?}); {what}", id.namespace);
            out.push(finding(Severity::Warning, "selects-nothing", kind, id, field, message));
        }
    };
    for policy in &snapshot.policies {
        if let PolicyTarget::Selector(labels) = &policy.target {
            let what = match policy.action {
                Action::Allow => "it allows nothing and denies nothing",
                Action::Deny => "it denies nothing",
            };
            check("AuthorizationPolicy", &policy.id, "spec.selector", labels, what);
        }
    }
    for policy in &snapshot.jwt_policies {
        for target in &policy.targets {
            if let PolicyTarget::Selector(labels) = target {
                check("JwtPolicy", &policy.id, "spec.selector", labels, "no token is checked");
            }
        }
    }
    for policy in &snapshot.peer_authentications {
        if let Some(labels) = &policy.selector {
            check("PeerAuthentication", &policy.id, "spec.selector", labels, "its mode applies nowhere");
        }
    }
}

/// Retries that the request timeout cuts off: attempts after the timeout never run.
fn retries_beyond_timeout(snapshot: &Snapshot, out: &mut Vec<Finding>) {
    for policy in &snapshot.traffic_policies {
        let Some(retries) = &policy.settings.retries else { continue };
        let Some(per_try) = retries.per_try_timeout else { continue };
        let tries = retries.attempts + 1;
        let worst = per_try * tries;
        let mut timeouts: Vec<(String, Duration)> = Vec::new();
        if let Some(t) = policy.settings.request_timeout {
            timeouts.push((format!("its requestTimeout ({})", secs(t)), t));
        }
        for target in &policy.targets {
            let route = match target {
                TrafficTarget::Route { kind, name } => {
                    snapshot.routes.iter().find(|r| r.kind == *kind && r.id.name == *name)
                }
                TrafficTarget::Service(name) => snapshot.routes.iter().find(|r| {
                    r.kind == RouteKind::Http
                        && r.parents
                            .iter()
                            .any(|p| p.service.name == *name && p.service.namespace == policy.id.namespace)
                }),
            };
            for rule in route
                .into_iter()
                .filter(|r| r.id.namespace == policy.id.namespace)
                .flat_map(|r| r.rules.iter().map(move |rule| (r, rule)))
            {
                if let Some(t) = rule.1.timeouts.request {
                    timeouts
                        .push((format!("{} {} timeouts.request ({})", rule.0.kind.kind_name(), rule.0.id, secs(t)), t));
                }
            }
        }
        if let Some((what, limit)) = timeouts.into_iter().filter(|(_, t)| worst > *t).min_by_key(|(_, t)| *t) {
            let message = format!(
                "{tries} tries x perTryTimeout {} = {} exceeds {what}: the last {} retries can never run; lower attempts or perTryTimeout, or raise the timeout",
                secs(per_try),
                secs(worst),
                tries.saturating_sub(limit.as_millis().div_ceil(per_try.as_millis().max(1)) as u32),
            );
            out.push(finding(
                Severity::Warning,
                "retries-exceed-timeout",
                "TrafficPolicy",
                &policy.id,
                "spec.retries",
                message,
            ));
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// STRICT workloads that cannot hold up their end: not meshed (no programs, no identity, so
/// the tunnel cannot reach them and nothing refuses plaintext).
fn strict_without_identity(snapshot: &Snapshot, compiled: &Compiled, out: &mut Vec<Finding>) {
    for workload in &snapshot.workloads {
        let key = workload.id.to_string();
        let strict = compiled.mtls.get(&key).is_some_and(|m| m.mode == MtlsMode::Strict);
        if strict && !workload.meshed {
            let message =
                "is STRICT but not meshed: it has no identity, other nodes cannot reach it through the tunnel and \
                nothing refuses plaintext to it; mesh it or exempt it with a PERMISSIVE PeerAuthentication"
                    .to_owned();
            out.push(finding(
                Severity::Warning,
                "strict-without-identity",
                "Workload",
                &workload.id,
                "spec.meshed",
                message,
            ));
        }
    }
}

/// Service ports with no backend: connections are refused, requests get 503.
fn services_without_endpoints(compiled: &Compiled, out: &mut Vec<Finding>) {
    for (key, service) in &compiled.services {
        if service.backends.is_empty() {
            let message = format!(
                "port {} has no backend (no selected workload, no endpoint); clients get refused or 503",
                key.port
            );
            out.push(finding(Severity::Warning, "no-endpoints", "Service", &service.service, "spec.selector", message));
        }
    }
}
