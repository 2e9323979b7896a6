//! Golden signals per (source workload, destination service, route, response code): the
//! per-route view a sidecarless mesh otherwise lacks.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    /// `ns/name` of the matched route (`#rule` if named); "default" when no route attaches;
    /// "none" when routes attach but none matched.
    pub route: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_class: &'static str,
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub kind: &'static str,
    pub reason: &'static str,
    /// `ns/name` of the deciding policy; "" when no single policy decided.
    pub policy: String,
}

/// One fetch of a remote JWKS: `ok`, or what failed (`connect`, `tls`, `timeout`, `status`,
/// `not_jwks`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksFetchLabels {
    pub uri: String,
    pub result: &'static str,
}

pub struct Metrics {
    pub authz: Family<AuthzLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub overflow: Counter,
    pub ejections: Counter,
    pub mirrored: Family<MirrorLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
    pub request_bytes: Family<RequestLabels, Histogram>,
    pub response_bytes: Family<RequestLabels, Histogram>,
    pub connections: Family<ConnLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub spans: Family<SpanLabels, Counter>,
    pub parked: Gauge,
    pub jwks_fetches: Family<JwksFetchLabels, Counter>,
}

impl Metrics {
    /// Registers under `weft_proxy_*`.
    pub fn register(registry: &mut Registry) -> Metrics {
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms .. ~65 s
            Histogram::new(exponential_buckets(0.0005, 2.0, 18))
        });
        let sizes = || Family::<RequestLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(64.0, 4.0, 10)));
        let m = Metrics {
            authz: Family::default(),
            retries: Family::default(),
            overflow: Counter::default(),
            ejections: Counter::default(),
            mirrored: Family::default(),
            requests: Family::default(),
            duration,
            request_bytes: sizes(),
            response_bytes: sizes(),
            connections: Family::default(),
            refused: Family::default(),
            spans: Family::default(),
            parked: Gauge::default(),
            jwks_fetches: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("weft_proxy");
        r.register("requests", "Requests handled by the node proxy.", m.requests.clone());
        r.register("request_duration_seconds", "Time from request headers to the end of the response body.", m.duration.clone());
        r.register("request_bytes", "Request body size in bytes.", m.request_bytes.clone());
        r.register("response_bytes", "Response body size in bytes, as sent to the client.", m.response_bytes.clone());
        r.register("connections", "Connections accepted, by detected protocol.", m.connections.clone());
        r.register("refused_connections", "Connections refused, by reason.", m.refused.clone());
        r.register("retries", "Retries: taken, or refused by the retry budget.", m.retries.clone());
        r.register("upstream_overflow", "Requests refused with 503 by the circuit breaker.", m.overflow.clone());
        r.register("outlier_ejections", "Endpoints ejected by outlier detection.", m.ejections.clone());
        r.register("parked_connections", "Idle HTTP/1.1 keep-alive connections parked without buffers.", m.parked.clone());
        r.register("spans", "Spans sent to the OTLP collector: exported, failed, or dropped (queue full).", m.spans.clone());
        r.register(
            "authz_refusals",
            "Requests (403 policy, 401 token, 400 path) and opaque connections refused by authorization, by reason and policy.",
            m.authz.clone(),
        );
        r.register("jwks_fetches", "Fetches of remote JWKS (jwksUri), by URI and result.", m.jwks_fetches.clone());
        r.register("mirrored_requests", "Mirror copies sent (responses dropped), by result.", m.mirrored.clone());
        m
    }
}

impl Metrics {
    pub fn authz_refused(&self, refusal: &crate::authz::Refusal) {
        let policy = refusal.policy.as_ref().map(ToString::to_string).unwrap_or_default();
        self.authz.get_or_create(&AuthzLabels { kind: refusal.kind, reason: refusal.label, policy }).inc();
    }

    /// Counts a refusal and words it for the caller: the reason, and the deciding policy.
    pub fn refusal_reason(&self, refusal: &crate::authz::Refusal) -> String {
        self.authz_refused(refusal);
        match &refusal.policy {
            Some(policy) if !refusal.reason.contains(&policy.to_string()) => format!("{} (policy {policy})", refusal.reason),
            _ => refusal.reason.clone(),
        }
    }
}

/// One label set's golden signals, looked up once: a connection keeps the last set its
/// requests used, so a run of requests alike skips the four family lookups (each a lock and a
/// hash of every label).
pub struct Signals {
    labels: RequestLabels,
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Signals {
    pub fn new(m: &Metrics, labels: RequestLabels) -> Signals {
        Signals {
            requests: m.requests.get_or_create(&labels).clone(),
            duration: m.duration.get_or_create(&labels).clone(),
            request_bytes: m.request_bytes.get_or_create(&labels).clone(),
            response_bytes: m.response_bytes.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Whether these are the signals of a request with these labels (the connection's own,
    /// source and destination, being the same for all its requests).
    pub fn fit(&self, route: &str, request_protocol: &str, response_code: u16, grpc_status: &str) -> bool {
        let l = &self.labels;
        l.response_code == response_code && l.request_protocol == request_protocol && l.route == route && l.grpc_status == grpc_status
    }

    pub fn observe(&self, seconds: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(seconds);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }
}

pub fn class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(route: &str, code: u16, grpc_status: &str) -> RequestLabels {
        RequestLabels {
            source_workload: "client".into(),
            source_workload_namespace: "default".into(),
            destination_service: "reviews.default.svc.cluster.local".into(),
            route: route.into(),
            request_protocol: "http",
            response_code: code,
            response_class: class(code),
            grpc_status: grpc_status.into(),
        }
    }

    #[test]
    fn signals_fit_only_their_own_labels_and_count_in_the_families() {
        let m = Metrics::register(&mut Registry::default());
        let signals = Signals::new(&m, labels("default/reviews", 200, "-"));
        assert!(signals.fit("default/reviews", "http", 200, "-"));
        assert!(!signals.fit("default/reviews", "http", 503, "-"));
        assert!(!signals.fit("default/other", "http", 200, "-"));
        assert!(!signals.fit("default/reviews", "grpc", 200, "-"));
        assert!(!signals.fit("default/reviews", "http", 200, "0"));
        signals.observe(0.002, 10, 20);
        signals.observe(0.002, 10, 20);
        assert_eq!(m.requests.get_or_create(&labels("default/reviews", 200, "-")).get(), 2);
        assert_eq!(m.requests.get_or_create(&labels("default/reviews", 503, "-")).get(), 0);
    }
}
