//! The domain model: what the node should enforce, independent of where it was read from.
//!
//! Every type is `Ord` (id first) so the compiler can sort its input into one canonical order:
//! the same objects in any order compile to the same maps.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod authz;

pub use authz::*;

/// A namespaced object's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub node: NodeSettings,
    pub services: Vec<Service>,
    pub endpoints: Vec<EndpointSet>,
    pub workloads: Vec<Workload>,
    pub policies: Vec<AuthorizationPolicy>,
    /// HTTPRoutes and GRPCRoutes; `default` so snapshots written before routes existed still read.
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    /// weft TrafficPolicies; `default` so snapshots written before they existed still read.
    #[serde(default)]
    pub traffic_policies: Vec<TrafficPolicy>,
    /// weft JwtPolicies; `default` so snapshots written before they existed still read.
    #[serde(default)]
    pub jwt_policies: Vec<JwtPolicy>,
    /// The cluster's nodes: where tunnels to their workloads end.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// weft PeerAuthentications: which workloads accept only mutual TLS.
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
}

/// The port every node's proxy accepts tunnels on (HBONE's).
pub const TUNNEL_PORT: u16 = 15008;

/// The namespace whose PeerAuthentication without a selector applies to the whole mesh.
pub const MESH_NAMESPACE: &str = "weft-system";

/// A node of the cluster (a Kubernetes Node's name and InternalIP).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Where the node's proxy accepts tunnels, on [`TUNNEL_PORT`].
    pub address: Ipv4Addr,
}

/// Whether a workload accepts plaintext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Plaintext and the tunnel are both accepted (the default).
    #[default]
    Permissive,
    /// Only the tunnel (and the workload's own node: its proxy and same-node meshed pods,
    /// whose connections the kernel already attributes and judges).
    Strict,
}

/// The mTLS mode of the workloads it selects: those of its namespace whose labels include
/// `selector`, all of its namespace without one, or the whole mesh from [`MESH_NAMESPACE`].
/// The most specific policy wins: selector, then namespace, then mesh.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerAuthentication {
    pub id: ObjectRef,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
}

/// Settings of the node this agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    pub node_name: String,
    /// The node proxy that L7 services are handed to; `None` disables handoff.
    pub proxy: Option<SocketAddrV4>,
    /// Redirect same-node meshed traffic socket to socket with `sk_msg`.
    pub skmsg: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Service {
    pub id: ObjectRef,
    /// `None` for a headless service, which has no VIP to steer and is skipped.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `None` or empty selects no workload (backends then come only from endpoint sets).
    pub selector: Option<BTreeMap<String, String>>,
    /// Connections go to the node proxy instead of a backend.
    #[serde(default)]
    pub l7: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// Only TCP is steered; other protocols are accepted and ignored.
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A named port, resolved per workload.
    Name(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// The endpoints of one service as listed by an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointSet {
    pub service: ObjectRef,
    /// (port name, port); an unnamed port matches an unnamed service port.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// The workload behind this address (the slice's `targetRef`).
    pub workload: Option<ObjectRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Workload {
    pub id: ObjectRef,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub ips: Vec<Ipv4Addr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node the workload runs on; `None` means this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Its cgroup, where the datapath attaches; without one a workload of this node cannot be
    /// meshed. Another node's workload is meshed by that node's agent: its cgroup is not read here.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub meshed: bool,
    /// Share of traffic relative to the other backends; 0 drains the workload.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Named ports, for services whose `targetPort` is a name.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

impl Workload {
    /// Whether the workload carries every label of `selector` with the same value (a label
    /// selector's `matchLabels`; the empty selector matches every workload).
    pub fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// A workload with the documented defaults: service account `default`, this node, meshed,
    /// weight 1.
    pub fn new(id: ObjectRef, ips: Vec<Ipv4Addr>) -> Self {
        Self {
            id,
            service_account: default_service_account(),
            ips,
            labels: BTreeMap::new(),
            node: None,
            cgroup: None,
            meshed: true,
            weight: default_weight(),
            ports: BTreeMap::new(),
        }
    }
}

/// The weight a workload gets when none is given.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight; keeps the sum of a service's weights far from `u32::MAX`.
pub const MAX_WEIGHT: u32 = 1_000_000;

fn default_service_account() -> String {
    "default".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// Which Gateway API route kind an [`HttpRoute`] came from; they share one model because a
/// GRPCRoute is an HTTPRoute whose matches name gRPC methods instead of paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind, for messages.
    pub fn kind_name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind_name())
    }
}

/// A mesh (GAMMA) route: it attaches to Services and steers the requests clients send to them.
///
/// Not `Eq`/`Ord` because a mirror's percentage is a float; the compiler orders routes by
/// (kind, id) instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    pub id: ObjectRef,
    pub kind: RouteKind,
    pub parents: Vec<ParentRef>,
    /// Carried for completeness; mesh routes match on the Service a client connected to, so
    /// weft does not match on them (GAMMA leaves hostnames undefined for Service parents).
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
    /// `metadata.creationTimestamp` (RFC 3339); the older route wins precedence ties.
    #[serde(default)]
    pub created: Option<String>,
}

/// A Service the route attaches to (the only parent kind a mesh route has).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ParentRef {
    pub service: ObjectRef,
    /// `None` attaches to every TCP port of the service.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteRule {
    #[serde(default)]
    pub name: Option<String>,
    /// Any one matching selects the rule; empty matches every request (path prefix "/").
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Empty is allowed, e.g. for a rule that only redirects.
    #[serde(default)]
    pub backends: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: RouteTimeouts,
}

/// Every present condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// An HTTP method, upper case ("GET").
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub query: Vec<QueryMatch>,
    /// GRPCRoute only.
    #[serde(default)]
    pub grpc: Option<GrpcMethodMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    /// Matches whole path segments: "/foo" matches "/foo" and "/foo/bar", not "/foobar".
    Prefix(String),
    /// Matches the whole path.
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lower case: header names are case-insensitive.
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueryMatch {
    /// Case-sensitive, unlike header names.
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StringMatch {
    Exact(String),
    /// Matches the whole value.
    Regex(String),
}

/// Matches the gRPC `/service/method` path; `None` parts match anything, at least one is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GrpcMethodMatch {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    /// Both parts are regular expressions rather than exact names.
    #[serde(default)]
    pub regex: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRef {
    pub service: ObjectRef,
    /// Required unless the Service has exactly one TCP port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Share of the rule's requests; 0 is allowed and never chosen.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub filters: Vec<Filter>,
}

/// The status a redirect answers with when none is given.
pub const DEFAULT_REDIRECT_STATUS: u16 = 302;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Filter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    UrlRewrite {
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        path: Option<PathRewrite>,
    },
    RequestRedirect {
        #[serde(default)]
        scheme: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        path: Option<PathRewrite>,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default = "default_redirect_status")]
        status: u16,
    },
    RequestMirror {
        service: ObjectRef,
        #[serde(default)]
        port: Option<u16>,
        /// Share of requests mirrored, 0 to 100.
        percent: f64,
    },
}

fn default_redirect_status() -> u16 {
    DEFAULT_REDIRECT_STATUS
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HeaderModifier {
    /// (name, value): replaces the header.
    #[serde(default)]
    pub set: Vec<(String, String)>,
    /// (name, value): appends to the header.
    #[serde(default)]
    pub add: Vec<(String, String)>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PathRewrite {
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `Prefix` match matched.
    ReplacePrefixMatch(String),
}

/// `None` means no timeout. Serialized as Gateway API duration text ("10s", "1h2m", "500ms")
/// or "none", so config dumps read like the YAML they came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteTimeouts {
    /// The whole request, from the client's first byte to the last response byte.
    #[serde(default, with = "duration_text")]
    pub request: Option<Duration>,
    /// One attempt at a backend.
    #[serde(default, with = "duration_text")]
    pub backend_request: Option<Duration>,
}

/// How the node proxy treats requests to Services or routes in the policy's namespace.
///
/// Not `Eq`/`Ord` because the retry budget is a float; the compiler orders policies by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrafficPolicy {
    pub id: ObjectRef,
    pub targets: Vec<TrafficTarget>,
    #[serde(default)]
    pub settings: TrafficSettings,
}

/// What a [`TrafficPolicy`] applies to, by name in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TrafficTarget {
    /// Every request to the Service, except those matching a rule of a route that has its own
    /// policy.
    Service(String),
    /// Requests matching the route's rules; replaces the Service's settings for them entirely.
    Route { kind: RouteKind, name: String },
}

/// The effective settings for a request. `Default` is what applies without a policy: no
/// timeout, an idle timeout of an hour, no retries, circuit breakers at 1024, no outlier
/// detection, least request.
///
/// Serialized with every default spelled out and absent features as "none", so the config dump
/// shows what the proxy does rather than what was left unsaid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrafficSettings {
    /// The whole request, retries and backoff included; `None` sets no limit of its own (a
    /// route's timeouts still apply).
    #[serde(with = "duration_text")]
    pub request_timeout: Option<Duration>,
    #[serde(with = "or_none")]
    pub retries: Option<RetryPolicy>,
    pub circuit_breaker: CircuitBreaker,
    #[serde(with = "or_none")]
    pub outlier_detection: Option<OutlierDetection>,
    pub load_balancer: LoadBalancer,
    /// Backends get the client's protocol rather than the one their port declares (what a
    /// request needs, gRPC or a protocol switch, still decides first).
    pub use_client_protocol: bool,
    /// A connection the proxy only passes bytes for (opaque TCP, or a request's connection
    /// once it switched protocols, e.g. to WebSocket) is closed after this long with no byte
    /// either way; `None`: never. It does not apply to requests, whose own timeouts do.
    #[serde(with = "duration_text")]
    pub idle_timeout: Option<Duration>,
}

/// How long a passed-through connection may sit idle without a policy saying otherwise: an hour,
/// as Istio's TCP idle timeout, so abandoned sessions do not hold the proxy's memory forever.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for TrafficSettings {
    fn default() -> TrafficSettings {
        TrafficSettings {
            request_timeout: None,
            retries: None,
            circuit_breaker: CircuitBreaker::default(),
            outlier_detection: None,
            load_balancer: LoadBalancer::default(),
            use_client_protocol: false,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// The most retries one request may get.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;

/// `Default` holds the default of every field a TrafficPolicy's `retries` leaves out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Retries after the first try, 0 to [`MAX_RETRY_ATTEMPTS`].
    pub attempts: u32,
    /// One try; `None` leaves only the request timeout.
    #[serde(with = "duration_text")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Exponential backoff between tries starts at this wait...
    #[serde(with = "duration_text::required")]
    pub backoff_base: Duration,
    /// ...and never waits longer than this.
    #[serde(with = "duration_text::required")]
    pub backoff_max: Duration,
    /// Retries may add at most this share (0 to 100) of a service's requests of the last one to
    /// two seconds...
    pub budget_percent: f64,
    /// ...but this many retries per second are always allowed, so a quiet service can retry.
    pub budget_min_per_second: u32,
    /// Retry methods that are not idempotent (POST, PATCH, ...) too; a retry may then repeat a
    /// side effect the failed try already had.
    pub retry_non_idempotent: bool,
    /// A copy of the request body is kept, while it is no larger than this, so it can be sent
    /// again; requests with larger bodies are not retried.
    pub max_body_bytes: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::default(),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_percent: 20.0,
            budget_min_per_second: 10,
            retry_non_idempotent: false,
            max_body_bytes: 65_536,
        }
    }
}

/// Which failed tries are retried. `Default` is the safe set used when none is given: failures
/// after which the backend most likely did not act on the request (connect failure, reset, and
/// the gateway errors 502, 503, 504), as Istio does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryOn {
    /// Any 5xx response ("5xx").
    pub server_errors: bool,
    /// 502, 503 and 504 ("gateway-error").
    pub gateway_errors: bool,
    /// The connection was reset before a response arrived ("reset").
    pub reset: bool,
    /// No connection to the backend could be made ("connect-failure").
    pub connect_failure: bool,
    /// These response statuses, sorted; error statuses (400 to 599) only.
    pub statuses: Vec<u16>,
    /// These gRPC status codes (`grpc-status`), sorted, e.g. 14 for UNAVAILABLE.
    pub grpc: Vec<u32>,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            server_errors: false,
            gateway_errors: true,
            reset: true,
            connect_failure: true,
            statuses: Vec::new(),
            grpc: Vec::new(),
        }
    }
}

impl RetryOn {
    /// Nothing is retried.
    pub fn none() -> Self {
        Self {
            server_errors: false,
            gateway_errors: false,
            reset: false,
            connect_failure: false,
            statuses: Vec::new(),
            grpc: Vec::new(),
        }
    }

    /// Whether nothing at all is retried.
    pub fn is_empty(&self) -> bool {
        *self == Self::none()
    }
}

/// The default of each circuit breaker limit.
pub const DEFAULT_CIRCUIT_LIMIT: u32 = 1024;

/// Limits per backend endpoint; past them requests fail fast (HTTP 503) instead of piling up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct CircuitBreaker {
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_CIRCUIT_LIMIT,
            max_pending_requests: DEFAULT_CIRCUIT_LIMIT,
            max_requests: DEFAULT_CIRCUIT_LIMIT,
        }
    }
}

/// Passive health checking: an endpoint that fails too often in a row is left out of load
/// balancing for a while. `Default` holds the default of every field a TrafficPolicy leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (connect failures and resets count) that eject an endpoint; 0
    /// turns this detector off.
    pub consecutive_5xx: u32,
    /// Consecutive 502, 503 or 504 responses (connect failures and resets count) that eject an
    /// endpoint; 0 turns this detector off.
    pub consecutive_gateway_errors: u32,
    /// Forgiveness: for each interval an endpoint stays in after an ejection, one of its past
    /// ejections stops counting toward the next one's length (Envoy's decaying multiplier).
    #[serde(with = "duration_text::required")]
    pub interval: Duration,
    /// An ejection lasts this long times the number of the endpoint's ejections that still
    /// count (this one included).
    #[serde(with = "duration_text::required")]
    pub base_ejection: Duration,
    /// At most this share (0 to 100) of a service's endpoints is ejected at once.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 5,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// How the proxy picks one of a service's endpoints (weights respected).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoadBalancer {
    /// The less loaded of two endpoints picked at random (power of two choices).
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

/// `None` as "none" rather than null, so a dump says a feature is off; reads null, "none" or
/// the value.
mod or_none {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => value.serialize(s),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum TextOr<T> {
            Text(String),
            Value(T),
        }
        match Option::<TextOr<T>>::deserialize(d)? {
            None => Ok(None),
            Some(TextOr::Text(text)) if text == "none" => Ok(None),
            Some(TextOr::Text(text)) => Err(serde::de::Error::custom(format!("\"{text}\" is not \"none\" or a value"))),
            Some(TextOr::Value(value)) => Ok(Some(value)),
        }
    }
}

/// Formats and parses durations as Gateway API duration text (GEP-2257).
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// "1h2m3s400ms"; "0s" for zero. Sub-millisecond parts (which GEP-2257 cannot express but a
    /// hand-built snapshot may hold) are kept as "ns" so nothing is hidden.
    pub fn format(duration: Duration) -> String {
        if duration.is_zero() {
            return "0s".to_owned();
        }
        let secs = duration.as_secs();
        let nanos = duration.subsec_nanos();
        let parts = [(secs / 3600, "h"), (secs / 60 % 60, "m"), (secs % 60, "s")];
        let mut text: String = parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect();
        if nanos / 1_000_000 > 0 {
            text.push_str(&format!("{}ms", nanos / 1_000_000));
        }
        if !nanos.is_multiple_of(1_000_000) {
            text.push_str(&format!("{}ns", nanos % 1_000_000));
        }
        text
    }

    /// Parses what [`format`] writes: one or more `<digits><unit>`, unit h, m, s, ms or ns.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let invalid = || format!("\"{text}\" is not a duration; write e.g. \"10s\", \"500ms\" or \"1h30m\"");
        let mut rest = text;
        let mut total = Duration::ZERO;
        if rest.is_empty() {
            return Err(invalid());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "h" => number.checked_mul(3600).map(Duration::from_secs),
                "m" => number.checked_mul(60).map(Duration::from_secs),
                "s" => Some(Duration::from_secs(number)),
                "ms" => Some(Duration::from_millis(number)),
                "ns" => Some(Duration::from_nanos(number)),
                _ => None,
            };
            total = part.and_then(|part| total.checked_add(part)).ok_or_else(invalid)?;
            rest = &rest[unit_len..];
        }
        Ok(total)
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => s.serialize_str(&format(*duration)),
            None => s.serialize_str("none"),
        }
    }

    /// Accepts null, "none", or duration text; "0s" (Gateway API for "disabled") reads as none.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref() {
            None | Some("none") => Ok(None),
            Some(text) => {
                parse(text).map(|duration| Some(duration).filter(|d| !d.is_zero())).map_err(serde::de::Error::custom)
            }
        }
    }

    /// For durations that always have a value: plain duration text, "0s" reads as zero.
    pub mod required {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&super::format(*value))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            super::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
        }
    }
}
