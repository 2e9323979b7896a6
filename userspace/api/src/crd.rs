//! weft's own resources, `weft.dev/v1alpha1`. `kube::CustomResourceExt::crd()` renders their
//! CustomResourceDefinitions; the doc comments become the schema's descriptions.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Something weft meshes: a pod, VM or process, known by its addresses. Its labels (in
/// metadata) are what Service selectors match.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "Workload", namespaced, status = "Status")]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Identity for authorization policy; defaults to "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// IPv4 addresses of the workload.
    pub addresses: Vec<String>,
    /// The workload's cgroup (on its node), where weft attaches; without one it is not meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// The node it runs on; absent means the node reading this config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Whether weft's programs steer the workload's connections; defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meshed: Option<bool>,
    /// Share of traffic among a service's backends, 0 (drained) to 1000000; defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000))]
    pub weight: Option<u32>,
    /// Named ports, for Services whose targetPort is a name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

/// Who may send what to services and workloads. Rules naming only sources and ports are
/// enforced when a connection is opened (in the kernel); rules with HTTP attributes (methods,
/// paths, hosts, headers, request.* conditions) and selector targets are enforced by the node
/// proxy for each request (denied: HTTP 403 naming the policy).
///
/// DENY wins: a request matching a rule of a DENY policy is denied. Once any ALLOW policy
/// selects a destination, requests matching no ALLOW rule are denied. On connections that are
/// not HTTP, ALLOW rules with HTTP attributes never match and DENY rules ignore those attributes
/// (both fail closed, as in Istio).
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "AuthorizationPolicy", namespaced, status = "Status")]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.targetRefs) > 0 || has(self.selector)").message("set targetRefs, selector or both"))]
pub struct AuthorizationPolicySpec {
    /// What the policy protects: Services in its namespace, or its whole Namespace (every
    /// service and workload in it).
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Workloads (destination pods) in the policy's namespace whose labels include these; the
    /// node proxy enforces the policy for requests those workloads serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub action: PolicyAction,
    /// ALLOW: requests matching a rule are allowed, all others denied. DENY: requests matching
    /// a rule are denied. No rules: the policy matches nothing.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

// The schema says what it can without CEL (enums, lengths), so no rule here costs the API
// server more than a comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// "" (the core group).
    #[serde(default)]
    #[schemars(extend("enum" = [""]))]
    pub group: String,
    /// "Service" or "Namespace".
    #[schemars(extend("enum" = ["Service", "Namespace"]))]
    pub kind: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must all have; not empty (target the Namespace to select every
    /// workload).
    #[x_kube(validation = Rule::new("size(self) > 0").message("name at least one label"))]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches a request when each section it has matches: any `from` entry, any `to` entry, and
/// every `when` condition. An empty rule matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<PolicySource>,
    #[serde(default)]
    pub to: Vec<PolicyDestination>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<PolicyCondition>,
}

/// Matches a source when every non-empty list matches: a list when any entry matches, a `not`
/// list when none does. Values may be "prefix*", "*suffix" or "*" (any). A source without an
/// identity matches no list and every `not` list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// "namespace/name", or "name" for the policy's namespace.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// SPIFFE ids, spiffe://cluster.local/ns/<ns>/sa/<sa>.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
}

/// Matches a request when every non-empty list matches. Everything but `ports` needs HTTP.
/// Values may be "prefix*", "*suffix" or "*" (any).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDestination {
    /// Service ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// HTTP methods, upper case, e.g. GET.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths without the query string: "/exact", or "/prefix/*" (which does not match
    /// "/prefix" itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Host header values, case-insensitive; a host without a port matches it with any port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Header name -> the value its first occurrence must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Holds when the attribute `key` matches any of `values` (if given) and none of `notValues`;
/// an attribute the request lacks matches no value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyCondition {
    /// request.headers[<name>], request.auth.principal (iss/sub), request.auth.audiences,
    /// request.auth.presenter, request.auth.issuer, request.auth.claims[<name>] (nested:
    /// [<a>][<b>]), source.namespace, source.principal or destination.port.
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// JWT authentication of requests to services or workloads, by the node proxy: a token is
/// looked for where each rule says, verified by the rule for its issuer (signature with the
/// issuer's keys, exp and nbf with 60s leeway, audience), and its claims feed
/// AuthorizationPolicy `when` conditions. An invalid token is refused with HTTP 401; a missing
/// one too when the rule is `required`.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "JwtPolicy", namespaced, status = "Status")]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.targetRefs) > 0 || has(self.selector)").message("set targetRefs, selector or both"))]
pub struct JwtPolicySpec {
    /// Services in the policy's namespace, or its whole Namespace.
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    /// Workloads (destination pods) in the policy's namespace whose labels include these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// One per accepted issuer.
    #[schemars(length(min = 1))]
    pub rules: Vec<JwtRuleSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.jwks) != has(self.jwksUri)").message("set exactly one of jwks and jwksUri"))]
#[x_kube(validation = Rule::new("!has(self.refreshInterval) || has(self.jwksUri)").message("refreshInterval only applies to jwksUri; an inline jwks changes with the policy"))]
pub struct JwtRuleSpec {
    /// The token's `iss` must equal it.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// The token's `aud` must name one of these; empty: not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The issuer's public keys as a JWKS document (JSON). RSA, EC (P-256, P-384) and Ed25519
    /// keys; symmetric ("oct") keys are refused. A key allows the algorithm in its "alg", or
    /// without one: RS256 (RSA), ES256 (P-256), ES384 (P-384), EdDSA (Ed25519).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Where the proxy fetches the JWKS instead (https, or http for a trusted network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// How often the JWKS at jwksUri is fetched again; defaults to 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_interval: Option<String>,
    /// Headers carrying the token. With neither fromHeaders nor fromParams: "Authorization"
    /// with prefix "Bearer ".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters carrying the token, e.g. access_token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Refuse requests without a token (HTTP 401); defaults to false: they go on without claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// Claims whose string value is a space-separated list, matched item by item in `when`;
    /// "scope" and "permission" always are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub space_delimited_claims: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    /// Text before the token, e.g. "Bearer " (compared ignoring case); defaults to none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// How weft's node proxy treats requests to Services or routes in the policy's namespace:
/// timeouts, retries, circuit breaking, outlier detection and load balancing. A policy on a route
/// replaces the one on its Service for the requests the route's rules match; of several
/// policies on one target, the first by namespace and name applies.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "TrafficPolicy", namespaced, status = "Status")]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// Services, HTTPRoutes or GRPCRoutes in the policy's namespace.
    #[schemars(length(min = 1))]
    pub target_refs: Vec<TrafficTargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TrafficTimeouts>,
    /// Absent: no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    /// Absent: 1024 for each limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Absent: no outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Absent: LeastRequest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Speak to the backends the protocol the client spoke (HTTP/1.1 or h2c) instead of the one
    /// their port declares, as Istio's `connectionPool.http.useClientProtocol`. gRPC still goes
    /// as HTTP/2 and a protocol switch as HTTP/1.1. Absent: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_client_protocol: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'Service' ? self.group in ['', 'core'] : self.group == 'gateway.networking.k8s.io'").message("group \"\" for a Service, \"gateway.networking.k8s.io\" for a route"))]
pub struct TrafficTargetRef {
    /// "" for a Service, "gateway.networking.k8s.io" for a route.
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub group: String,
    /// "Service", "HTTPRoute" or "GRPCRoute".
    #[schemars(extend("enum" = ["Service", "HTTPRoute", "GRPCRoute"]))]
    pub kind: String,
    /// A name in the policy's namespace (not "namespace/name").
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[^/]*$"))]
    pub name: String,
}

/// Durations are Gateway API duration text: "15s", "500ms", "1h30m".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTimeouts {
    /// The whole request, retries included; absent or "0s": no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// A connection the proxy only passes bytes for (opaque TCP, or one that switched protocols,
    /// e.g. to WebSocket) closes after this long with no byte either way. Absent: "1h", as
    /// Istio's TCP idle timeout; "0s": never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Retries after the first try, 0 to 10; defaults to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10))]
    pub attempts: Option<u32>,
    /// Limit on each try; absent: only the request timeout applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// What to retry: "5xx", "gateway-error" (502, 503, 504), "reset", "connect-failure", an
    /// error status such as "503", or a gRPC status: "cancelled", "deadline-exceeded",
    /// "internal", "resource-exhausted", "unavailable". Defaults to connect-failure, reset and
    /// gateway-error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetSpec>,
    /// Also retry methods that are not idempotent (POST, PATCH, ...); defaults to false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
    /// A request body is streamed upstream with a copy kept so it can be sent again, up to
    /// this size (known in advance or not); past it the copy is dropped and the request is not
    /// retried. Defaults to 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
}

/// Exponential backoff with jitter between tries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffSpec {
    /// Defaults to 25ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<String>,
    /// Defaults to 250ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<String>,
}

/// Retries may add at most `percent` of a service's requests of the last one to two seconds,
/// but `minRetriesPerSecond` are always allowed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetSpec {
    /// 0 to 100; defaults to 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<f64>,
    /// Defaults to 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// Limits per backend endpoint; each defaults to 1024. A request past the limit waits for a
/// slot, first come first served, until the route's timeout; one past `maxPendingRequests`
/// waiting gets 503 (counted in `weft_proxy_upstream_overflow_total`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Connections to the endpoint over HTTP/1.1, where each carries one request at a time:
    /// requests in flight there are bounded by this too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a slot at the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the endpoint, over either protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
}

/// Ejects endpoints that fail too often in a row from load balancing for a while.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx that eject an endpoint; 0 turns this off. Defaults to 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 or 504 that eject an endpoint; 0 turns this off. Defaults to 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// For each interval an endpoint stays in after an ejection, one of its past ejections is
    /// forgiven (stops lengthening the next one). Defaults to 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// An ejection lasts this long times the endpoint's ejections not yet forgiven (this one
    /// included); defaults to 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// At most this share of a service's endpoints is ejected at once, 0 to 100; defaults to 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LoadBalancerSpec {
    /// Defaults to LeastRequest.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<LoadBalancerType>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LoadBalancerType {
    /// The less loaded of two endpoints picked at random (power of two choices).
    LeastRequest,
    RoundRobin,
    Random,
}

/// Which workloads accept only mutual TLS. Without a selector it sets the mode of its whole
/// namespace, or of the whole mesh when it is in `weft-system`; with one, of the workloads of
/// its namespace carrying those labels. The most specific policy wins (selector, namespace,
/// mesh); without any, workloads are PERMISSIVE.
///
/// STRICT is enforced at the destination, in the kernel: a STRICT workload accepts new
/// connections only through its node's tunnel (mutual TLS, the peer's identity checked and
/// authorized), from meshed workloads of its own node, and from its node. Meshed clients on
/// other nodes reach it through the tunnel automatically, by service or by pod IP.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "PeerAuthentication", namespaced, status = "Status")]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads of the policy's namespace whose labels include these; absent: the whole
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub mtls: MutualTls,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MutualTls {
    pub mode: MtlsMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Plaintext and mutual TLS are both accepted.
    Permissive,
    /// Plaintext from outside the mesh is refused.
    Strict,
}

/// What weft's controller last observed of an object (the `status` subresource of every weft
/// kind; only the controller writes it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The `metadata.generation` the conditions were computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: the object is valid and in force (reason `Accepted`, or `Invalid` with the field
    /// to fix). `ResolvedRefs`, for kinds that name other objects: every reference resolves
    /// (reason `ResolvedRefs`, or `TargetNotFound`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Every weft CRD with the file it is written to under `manifests/crds/` (by `cargo xtask
/// codegen`; a test fails when the checked-in files drift from these types).
pub fn all() -> Vec<(&'static str, k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition)>
{
    use kube::CustomResourceExt as _;
    vec![
        ("workloads.weft.dev.yaml", Workload::crd()),
        ("authorizationpolicies.weft.dev.yaml", AuthorizationPolicy::crd()),
        ("trafficpolicies.weft.dev.yaml", TrafficPolicy::crd()),
        ("jwtpolicies.weft.dev.yaml", JwtPolicy::crd()),
        ("peerauthentications.weft.dev.yaml", PeerAuthentication::crd()),
    ]
}

/// A CRD as the YAML checked into `manifests/crds/`.
pub fn render(crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition) -> String {
    let yaml = serde_yaml::to_string(crd).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    format!("# Generated from userspace/api/src/crd.rs by `cargo xtask codegen`; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn crds_render() {
        let crds = [
            (Workload::crd(), "Workload"),
            (AuthorizationPolicy::crd(), "AuthorizationPolicy"),
            (TrafficPolicy::crd(), "TrafficPolicy"),
            (JwtPolicy::crd(), "JwtPolicy"),
            (PeerAuthentication::crd(), "PeerAuthentication"),
        ];
        for (crd, kind) in crds {
            assert_eq!(crd.spec.group, "weft.dev");
            assert_eq!(crd.spec.names.kind, kind);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v1alpha1"]);
            let yaml = serde_yaml::to_string(&crd).unwrap();
            assert!(yaml.contains("openAPIV3Schema"), "{yaml}");
        }
    }

    #[test]
    fn authorization_schemas_carry_their_cel_rules() {
        let rules =
            |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
                serde_json::to_value(crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                .clone()
            };
        let authz = rules(&AuthorizationPolicy::crd());
        assert_eq!(authz["required"], serde_json::json!(["action"]));
        assert_eq!(authz["x-kubernetes-validations"][0]["rule"], "size(self.targetRefs) > 0 || has(self.selector)");
        let jwt = rules(&JwtPolicy::crd());
        let rule = &jwt["properties"]["rules"]["items"];
        assert_eq!(rule["x-kubernetes-validations"][0]["rule"], "has(self.jwks) != has(self.jwksUri)");
        assert_eq!(rule["required"], serde_json::json!(["issuer"]));
    }

    #[test]
    fn every_kind_has_a_status_subresource_with_conditions() {
        for (file, crd) in all() {
            let version = &crd.spec.versions[0];
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{file}");
            let schema = serde_json::to_value(&version.schema).unwrap();
            let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
            // A map keyed by type: server-side apply merges conditions one by one.
            assert_eq!(conditions["x-kubernetes-list-type"], "map", "{file}: {conditions}");
            assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]), "{file}");
            assert_eq!(conditions["items"]["required"].as_array().map(Vec::len), Some(5), "{file}: {conditions}");
        }
        let status: Status = serde_json::from_value(serde_json::json!({"observedGeneration": 3, "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ]}))
        .unwrap();
        assert_eq!((status.observed_generation, status.conditions[0].type_.as_str()), (Some(3), "Accepted"));
    }

    #[test]
    fn target_refs_are_checked_by_the_schema() {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition as Crd;
        let items = |crd: &Crd| {
            serde_json::to_value(crd).unwrap()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
                ["properties"]["targetRefs"]["items"]
                .clone()
        };
        let traffic = items(&TrafficPolicy::crd());
        assert_eq!(traffic["properties"]["kind"]["enum"], serde_json::json!(["Service", "HTTPRoute", "GRPCRoute"]));
        assert_eq!(traffic["properties"]["name"]["pattern"], "^[^/]*$");
        let rule = traffic["x-kubernetes-validations"][0]["rule"].as_str().unwrap();
        assert!(rule.starts_with("self.kind == 'Service' ? self.group in ['', 'core']"), "{rule}");
        for authz in [items(&AuthorizationPolicy::crd()), items(&JwtPolicy::crd())] {
            assert_eq!(authz["properties"]["kind"]["enum"], serde_json::json!(["Service", "Namespace"]));
            assert_eq!(authz["properties"]["group"]["enum"], serde_json::json!([""]));
        }
        let jwt = serde_json::to_value(JwtPolicy::crd()).unwrap();
        let rule = &jwt["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rules"]
            ["items"]["x-kubernetes-validations"][1]["rule"];
        assert_eq!(rule, "!has(self.refreshInterval) || has(self.jwksUri)");
    }

    #[test]
    fn traffic_policy_schema_names_fields_as_written() {
        let crd = serde_json::to_value(TrafficPolicy::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["targetRefs"]));
        assert_eq!(spec["properties"]["targetRefs"]["minItems"], 1);
        let outlier = &spec["properties"]["outlierDetection"]["properties"];
        assert!(outlier["consecutive5xx"].is_object(), "{outlier}");
        assert!(outlier["baseEjectionTime"].is_object(), "{outlier}");
        let budget = &spec["properties"]["retries"]["properties"]["budget"]["properties"];
        assert_eq!(
            (budget["percent"]["minimum"].as_f64(), budget["percent"]["maximum"].as_f64()),
            (Some(0.0), Some(100.0))
        );
        let lb = &spec["properties"]["loadBalancer"]["properties"]["type"];
        let mut types: Vec<&str> = lb["enum"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
        types.sort_unstable();
        assert_eq!(types, ["LeastRequest", "Random", "RoundRobin"], "{lb}");
    }
}
