//! weft's TrafficPolicy (`weft.dev/v1alpha1`) to the model: defaults filled in, durations and
//! retryOn tokens parsed, and the checks the compiler would make of the policy alone.

use std::time::Duration;

use weft_policy::{
    CircuitBreaker, DEFAULT_IDLE_TIMEOUT, LoadBalancer, OutlierDetection, RetryOn, RetryPolicy, RouteKind, TrafficPolicy, TrafficSettings,
    TrafficTarget, duration_text,
};

use super::{FieldError, object_ref};
use crate::crd::{self, LoadBalancerType};

/// The group of HTTPRoute and GRPCRoute.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// gRPC status names accepted in retryOn, with their codes.
const GRPC_STATUSES: [(&str, u32); 5] =
    [("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14)];

pub fn traffic_policy(policy: &crd::TrafficPolicy) -> Result<TrafficPolicy, FieldError> {
    let id = object_ref(&policy.metadata)?;
    let spec = &policy.spec;
    if spec.target_refs.is_empty() {
        return Err(FieldError::new("spec.targetRefs", "empty; name the Services or routes this policy applies to"));
    }
    let targets = spec
        .target_refs
        .iter()
        .enumerate()
        .map(|(i, t)| target(t, &format!("spec.targetRefs[{i}]"), &id.namespace))
        .collect::<Result<_, _>>()?;
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    let request_timeout = optional_duration(timeouts.request.as_deref(), "spec.timeouts.request")?;
    let idle_timeout = match timeouts.idle.as_deref() {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        idle => optional_duration(idle, "spec.timeouts.idle")?,
    };
    let settings = TrafficSettings {
        request_timeout,
        retries: spec.retries.as_ref().map(retries).transpose()?,
        circuit_breaker: circuit_breaker(spec.circuit_breaker.as_ref()),
        outlier_detection: spec.outlier_detection.as_ref().map(outlier_detection).transpose()?,
        load_balancer: match spec.load_balancer.as_ref().and_then(|lb| lb.type_) {
            None | Some(LoadBalancerType::LeastRequest) => LoadBalancer::LeastRequest,
            Some(LoadBalancerType::RoundRobin) => LoadBalancer::RoundRobin,
            Some(LoadBalancerType::Random) => LoadBalancer::Random,
        },
        use_client_protocol: spec.use_client_protocol.unwrap_or(false),
        idle_timeout,
    };
    let policy = TrafficPolicy { id, targets, settings };
    match weft_policy::traffic_problems(&policy).into_iter().next() {
        Some(problem) => Err(FieldError::new(problem.field, problem.reason)),
        None => Ok(policy),
    }
}

fn target(t: &crd::TrafficTargetRef, field: &str, namespace: &str) -> Result<TrafficTarget, FieldError> {
    if t.name.is_empty() {
        return Err(FieldError::new(format!("{field}.name"), "empty; name the target"));
    }
    let (kind, group) = match t.kind.as_str() {
        "Service" => (None, ""),
        "HTTPRoute" => (Some(RouteKind::Http), GATEWAY_GROUP),
        "GRPCRoute" => (Some(RouteKind::Grpc), GATEWAY_GROUP),
        other => {
            let message = format!("unsupported kind \"{other}\"; use Service, HTTPRoute or GRPCRoute");
            return Err(FieldError::new(format!("{field}.kind"), message));
        }
    };
    let group_ok = t.group == group || (kind.is_none() && t.group == "core");
    if !group_ok {
        let message = format!("\"{}\" is not the group of {}; use \"{group}\"", t.group, t.kind);
        return Err(FieldError::new(format!("{field}.group"), message));
    }
    // Targets are local references; the name is all there is, and it is looked up in the
    // policy's namespace, so a "ns/name" here is a mistake worth naming.
    if t.name.contains('/') {
        let message = format!("\"{}\" is not a name; targets are in the policy's namespace ({namespace})", t.name);
        return Err(FieldError::new(format!("{field}.name"), message));
    }
    Ok(match kind {
        None => TrafficTarget::Service(t.name.clone()),
        Some(kind) => TrafficTarget::Route { kind, name: t.name.clone() },
    })
}

fn retries(r: &crd::RetrySpec) -> Result<RetryPolicy, FieldError> {
    let defaults = RetryPolicy::default();
    let backoff = r.backoff.clone().unwrap_or_default();
    let budget = r.budget.clone().unwrap_or_default();
    Ok(RetryPolicy {
        attempts: r.attempts.unwrap_or(defaults.attempts),
        per_try_timeout: optional_duration(r.per_try_timeout.as_deref(), "spec.retries.perTryTimeout")?,
        retry_on: match &r.retry_on {
            Some(tokens) => retry_on(tokens, "spec.retries.retryOn")?,
            None => defaults.retry_on,
        },
        backoff_base: duration(backoff.base_interval.as_deref(), "spec.retries.backoff.baseInterval")?
            .unwrap_or(defaults.backoff_base),
        backoff_max: duration(backoff.max_interval.as_deref(), "spec.retries.backoff.maxInterval")?
            .unwrap_or(defaults.backoff_max),
        budget_percent: budget.percent.unwrap_or(defaults.budget_percent),
        budget_min_per_second: budget.min_retries_per_second.unwrap_or(defaults.budget_min_per_second),
        retry_non_idempotent: r.retry_non_idempotent.unwrap_or(defaults.retry_non_idempotent),
        max_body_bytes: r.max_body_bytes.unwrap_or(defaults.max_body_bytes),
    })
}

/// Tokens to conditions; each unknown token is named with its index.
fn retry_on(tokens: &[String], field: &str) -> Result<RetryOn, FieldError> {
    let mut on = RetryOn::none();
    for (i, token) in tokens.iter().enumerate() {
        let field = || format!("{field}[{i}]");
        match token.as_str() {
            "5xx" => on.server_errors = true,
            "gateway-error" => on.gateway_errors = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            // Envoy's way of saying "the listed statuses"; here the statuses are the tokens.
            "retriable-status-codes" => {
                let message = "\"retriable-status-codes\" is not needed: list the statuses themselves, e.g. \"503\"";
                return Err(FieldError::new(field(), message));
            }
            status if status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()) => {
                // Three digits always fit.
                let status: u16 = status.parse().map_err(|_| FieldError::new(field(), "not a status"))?;
                // Retrying a success or a redirect would repeat work that already succeeded.
                if !(400..=599).contains(&status) {
                    let message = format!("{status} is not an error status; list statuses from 400 to 599");
                    return Err(FieldError::new(field(), message));
                }
                on.statuses.push(status);
            }
            name => match GRPC_STATUSES.iter().find(|(grpc, _)| *grpc == name) {
                Some(&(_, code)) => on.grpc.push(code),
                None => {
                    let grpc = GRPC_STATUSES.map(|(name, _)| name).join(", ");
                    let message = format!(
                        "unknown retryOn token \"{name}\"; use 5xx, gateway-error, reset, connect-failure, an error \
                         status such as 503, or a gRPC status: {grpc}"
                    );
                    return Err(FieldError::new(field(), message));
                }
            },
        }
    }
    on.statuses.sort_unstable();
    on.statuses.dedup();
    on.grpc.sort_unstable();
    on.grpc.dedup();
    Ok(on)
}

fn circuit_breaker(c: Option<&crd::CircuitBreakerSpec>) -> CircuitBreaker {
    let defaults = CircuitBreaker::default();
    let Some(c) = c else { return defaults };
    CircuitBreaker {
        max_connections: c.max_connections.unwrap_or(defaults.max_connections),
        max_pending_requests: c.max_pending_requests.unwrap_or(defaults.max_pending_requests),
        max_requests: c.max_requests.unwrap_or(defaults.max_requests),
    }
}

fn outlier_detection(o: &crd::OutlierDetectionSpec) -> Result<OutlierDetection, FieldError> {
    let defaults = OutlierDetection::default();
    Ok(OutlierDetection {
        consecutive_5xx: o.consecutive_5xx.unwrap_or(defaults.consecutive_5xx),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(defaults.consecutive_gateway_errors),
        interval: duration(o.interval.as_deref(), "spec.outlierDetection.interval")?.unwrap_or(defaults.interval),
        base_ejection: duration(o.base_ejection_time.as_deref(), "spec.outlierDetection.baseEjectionTime")?
            .unwrap_or(defaults.base_ejection),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(defaults.max_ejection_percent),
    })
}

/// Duration text, as written; `None` when absent.
fn duration(text: Option<&str>, field: &str) -> Result<Option<Duration>, FieldError> {
    text.map(|text| duration_text::parse(text).map_err(|message| FieldError::new(field, message))).transpose()
}

/// A limit that "0s" (the Gateway API's "disabled") turns off, like absence.
fn optional_duration(text: Option<&str>, field: &str) -> Result<Option<Duration>, FieldError> {
    Ok(duration(text, field)?.filter(|d| !d.is_zero()))
}
