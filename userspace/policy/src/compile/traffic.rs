//! weft TrafficPolicies: the timeouts, retries, circuit breakers, outlier detection and load
//! balancing the node proxy applies to each Service and route.
//!
//! A policy targeting a Service sets what applies to every request to it, and hands the Service
//! to the proxy even without routes (the settings live there). A policy targeting a route
//! replaces the Service's settings entirely for requests its rules match. When several policies
//! target the same Service or route, the first by (namespace, name) applies there and the others
//! are rejected for that target only; settings are never merged, so what applies is always one
//! policy's, as written.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::routes::find_service;
use super::{Rejection, defined_twice};
use crate::model::{
    HttpRoute, MAX_RETRY_ATTEMPTS, ObjectRef, RouteKind, Service, TrafficPolicy, TrafficSettings, TrafficTarget,
    duration_text,
};

const KIND: &str = "TrafficPolicy";

/// The settings that apply, by what they apply to.
#[derive(Default)]
pub(super) struct Traffic<'a> {
    /// Service -> its settings; these Services are handed to the proxy.
    pub services: BTreeMap<ObjectRef, &'a TrafficSettings>,
    /// (route kind, route) -> the settings for requests matching its rules.
    pub routes: BTreeMap<(RouteKind, ObjectRef), &'a TrafficSettings>,
}

/// Problems knowable from the policy alone. The compiler reports the same ones (and leaves the
/// policy out); the config loader uses this to name the file.
pub fn traffic_problems(policy: &TrafficPolicy) -> Vec<Rejection> {
    let reject = |field: &str, reason: String| Rejection::new(KIND, &policy.id, field, reason);
    let mut problems = Vec::new();
    if policy.targets.is_empty() {
        problems.push(reject("spec.targetRefs", "empty; name the Services or routes this policy applies to".into()));
    }
    for (i, target) in policy.targets.iter().enumerate() {
        let (TrafficTarget::Service(name) | TrafficTarget::Route { name, .. }) = target;
        if name.is_empty() {
            problems.push(reject(&format!("spec.targetRefs[{i}].name"), "empty; name the target".into()));
        }
    }
    let settings = &policy.settings;
    if let Some(retries) = &settings.retries {
        if retries.attempts > MAX_RETRY_ATTEMPTS {
            let reason = format!("{} is too many; use 0 to {MAX_RETRY_ATTEMPTS}", retries.attempts);
            problems.push(reject("spec.retries.attempts", reason));
        }
        if let (Some(per_try), Some(request)) = (retries.per_try_timeout, settings.request_timeout)
            && per_try > request
        {
            let reason = format!(
                "{} is longer than timeouts.request ({}), which would cut every try short; make it shorter or equal",
                duration_text::format(per_try),
                duration_text::format(request)
            );
            problems.push(reject("spec.retries.perTryTimeout", reason));
        }
        let on = &retries.retry_on;
        if on.is_empty() {
            let reason = "retries on nothing; list what to retry on, or leave retryOn out for connect-failure, reset \
                          and gateway-error";
            problems.push(reject("spec.retries.retryOn", reason.into()));
        }
        // Retrying a success or a redirect would repeat work that already succeeded.
        if let Some(status) = on.statuses.iter().find(|s| !(400..=599).contains(*s)) {
            let reason = format!("{status} is not an error status; list statuses from 400 to 599");
            problems.push(reject("spec.retries.retryOn", reason));
        }
        if let Some(code) = on.grpc.iter().find(|c| !(1..=16).contains(*c)) {
            let reason = format!("{code} is not a gRPC error status code; use 1 to 16");
            problems.push(reject("spec.retries.retryOn", reason));
        }
        if retries.backoff_base > retries.backoff_max {
            let reason = format!(
                "{} is longer than maxInterval ({}); make it shorter or equal",
                duration_text::format(retries.backoff_base),
                duration_text::format(retries.backoff_max)
            );
            problems.push(reject("spec.retries.backoff.baseInterval", reason));
        }
        // `contains` is false for NaN too.
        if !(0.0..=100.0).contains(&retries.budget_percent) {
            let reason = format!("{} is not a percentage; use 0 to 100", retries.budget_percent);
            problems.push(reject("spec.retries.budget.percent", reason));
        }
    }
    let breaker = &settings.circuit_breaker;
    for (name, limit) in [
        ("maxConnections", breaker.max_connections),
        ("maxPendingRequests", breaker.max_pending_requests),
        ("maxRequests", breaker.max_requests),
    ] {
        if limit == 0 {
            let reason = "0 would refuse every request; use at least 1, or leave it out for 1024";
            problems.push(reject(&format!("spec.circuitBreaker.{name}"), reason.into()));
        }
    }
    if let Some(outlier) = &settings.outlier_detection
        && outlier.max_ejection_percent > 100
    {
        let reason = format!("{} is not a percentage; use 0 to 100", outlier.max_ejection_percent);
        problems.push(reject("spec.outlierDetection.maxEjectionPercent", reason));
    }
    problems
}

/// Which settings apply where; rejections for policies (or targets) left out.
pub(super) fn resolve<'a>(
    policies: &'a [TrafficPolicy],
    services: &[&Service],
    accepted: &BTreeMap<&ObjectRef, (&Service, Ipv4Addr)>,
    routes: &[HttpRoute],
    rejected: &mut Vec<Rejection>,
) -> Traffic<'a> {
    let mut traffic = Traffic::default();
    // Which policy holds each target, for conflict messages.
    let mut holders: BTreeMap<(Option<RouteKind>, ObjectRef), &ObjectRef> = BTreeMap::new();
    let mut previous = None;
    for policy in sorted(policies) {
        // Sorted input puts objects with the same id next to each other.
        if previous.replace(&policy.id) == Some(&policy.id) {
            let (field, reason) = defined_twice();
            rejected.push(Rejection::new(KIND, &policy.id, field, reason));
            continue;
        }
        let problems = traffic_problems(policy);
        if !problems.is_empty() {
            rejected.extend(problems);
            continue;
        }
        // A target listed twice is the same attachment, not a conflict with itself.
        let mut listed = BTreeSet::new();
        for (i, target) in policy.targets.iter().enumerate().filter(|(_, t)| listed.insert(*t)) {
            let (kind, name) = match target {
                TrafficTarget::Service(name) => (None, name),
                TrafficTarget::Route { kind, name } => (Some(*kind), name),
            };
            let id = ObjectRef::new(&policy.id.namespace, name);
            let what = format!("{} {id}", kind.map_or("Service", RouteKind::kind_name));
            let exists = match kind {
                None => find_service(services, accepted, &id).map(|_| ()),
                Some(kind) if routes.iter().any(|r| r.kind == kind && r.id == id) => Ok(()),
                Some(_) => Err(format!("{what} does not exist")),
            };
            if let Err(reason) = exists {
                let reason = format!("{reason}; the policy does not apply to it");
                rejected.push(Rejection::unresolved(KIND, &policy.id, format!("spec.targetRefs[{i}]"), reason));
                continue;
            }
            if let Some(holder) = holders.get(&(kind, id.clone())) {
                let reason = format!(
                    "conflicts with TrafficPolicy {holder}, which already targets {what}; that policy applies there \
                     and this one does not (policies are not merged)"
                );
                rejected.push(Rejection::new(KIND, &policy.id, format!("spec.targetRefs[{i}]"), reason));
                continue;
            }
            holders.insert((kind, id.clone()), &policy.id);
            match kind {
                None => traffic.services.insert(id, &policy.settings),
                Some(kind) => traffic.routes.insert((kind, id), &policy.settings),
            };
        }
    }
    traffic
}

/// Policies in one canonical order: by id, then by content, so which of two definitions of the
/// same policy wins does not depend on the order they were read in.
fn sorted(policies: &[TrafficPolicy]) -> Vec<&TrafficPolicy> {
    let mut policies: Vec<&TrafficPolicy> = policies.iter().collect();
    // Policies are not `Ord` (the retry budget is a float); their JSON text is a total order.
    let text = |policy: &TrafficPolicy| serde_json::to_string(policy).unwrap_or_default();
    policies.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| text(a).cmp(&text(b))));
    policies
}
