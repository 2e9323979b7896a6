//! The proxy's route table: built once per config from `Compiled` (regexes compiled here, not
//! per request), swapped atomically; each request uses the table that was newest when it began.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use http::{HeaderMap, HeaderName, Method, Uri};
use regex_lite::Regex;
use weft_common::{WL_F_LOCAL, WL_F_MESHED, as_v4};
use weft_identity::SpiffeId;
use weft_policy::{
    Compiled, CompiledRule, Filter, GrpcMethodMatch, Names, ObjectRef, PathMatch, RouteMatch, StringMatch,
    TrafficSettings, authz::TRUST_DOMAIN,
};

use crate::{authz::Authz, detect::Protocol, jwks::Fetchers};

/// Everything the proxy needs from one config.
#[derive(Default)]
pub struct Table {
    pub services: HashMap<SocketAddrV4, Service>,
    /// Weighted endpoints of every service port, by VIP:port.
    pub endpoints: HashMap<SocketAddrV4, Vec<(SocketAddrV4, u32)>>,
    /// What each service port declares (its `appProtocol`, else its name's prefix), where
    /// weft knows the value.
    pub declared: HashMap<SocketAddrV4, Protocol>,
    pub names: Names,
    pub authz: Authz,
    /// Meshed workloads on other nodes, by IP: reached through their node's tunnel.
    pub tunnel: HashMap<Ipv4Addr, Remote>,
    /// Meshed workloads of this node, by IP: what the tunnel's accepting end may connect to.
    pub local: HashMap<Ipv4Addr, Local>,
}

pub struct Remote {
    /// The tunnel listener of the workload's node.
    pub node: SocketAddr,
    pub id: SpiffeId,
}

pub struct Local {
    pub id: SpiffeId,
    pub workload: ObjectRef,
}

impl Table {
    /// The workload of this node at `endpoint` when policies select it: this proxy is its
    /// node's, so it judges them once it has picked that endpoint (callers on other nodes are
    /// judged by the tunnel's accepting end).
    pub fn guarded_local(&self, endpoint: SocketAddrV4) -> Option<&ObjectRef> {
        self.local.get(endpoint.ip()).map(|l| &l.workload).filter(|w| self.authz.selects_workload(w))
    }
}

/// The SPIFFE id of a workload's service account (`None` if the names are not valid in one).
pub fn spiffe_id(namespace: &str, service_account: &str) -> Option<SpiffeId> {
    SpiffeId::new(TRUST_DOMAIN, namespace, service_account).ok()
}

pub struct Service {
    pub target: SocketAddrV4,
    pub traffic: TrafficSettings,
    producer: Vec<Rule>,
    consumers: HashMap<String, Vec<Rule>>,
}

pub struct Rule {
    /// `ns/name` of the route, with `#rule` when the rule is named: the metrics label.
    pub label: String,
    matcher: Matcher,
    /// The matched path prefix, for `ReplacePrefixMatch` rewrites.
    pub prefix: Option<String>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    /// Mirror targets (VIP:port) and the percentage of requests copied there.
    pub mirrors: Vec<(SocketAddrV4, f64)>,
    /// A TrafficPolicy on the route replaces the service's for this rule.
    pub traffic: Option<TrafficSettings>,
}

pub struct Backend {
    pub target: Option<SocketAddrV4>,
    pub weight: u32,
    pub filters: Vec<Filter>,
}

/// What the table says about one request.
pub enum Decision<'a> {
    Rule(&'a Rule),
    /// No routes attach for this client: the request goes to the service itself.
    Default(SocketAddrV4),
    /// Routes attach, none matches: 404 per the Gateway API.
    NoRoute,
}

enum StrMatch {
    Exact(String),
    Regex(Regex),
}

impl StrMatch {
    fn new(m: &StringMatch) -> Option<Self> {
        Some(match m {
            StringMatch::Exact(s) => StrMatch::Exact(s.clone()),
            StringMatch::Regex(r) => StrMatch::Regex(full(r)?),
        })
    }
    fn is_match(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => s == v,
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// Gateway API regexes match the whole value.
fn full(r: &str) -> Option<Regex> {
    Regex::new(&format!("^(?:{r})$")).ok()
}

enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

struct Matcher {
    path: Option<PathMatcher>,
    method: Option<Method>,
    headers: Vec<(HeaderName, StrMatch)>,
    query: Vec<(String, StrMatch)>,
    grpc: Option<(Option<StrMatch>, Option<StrMatch>)>,
}

impl Matcher {
    /// `None` if a regex does not compile (compile already rejected it; be safe anyway).
    fn new(m: &RouteMatch) -> Option<Self> {
        let path = match &m.path {
            None => None,
            Some(PathMatch::Exact(p)) => Some(PathMatcher::Exact(p.clone())),
            Some(PathMatch::Prefix(p)) => Some(PathMatcher::Prefix(p.trim_end_matches('/').to_owned())),
            Some(PathMatch::Regex(r)) => Some(PathMatcher::Regex(full(r)?)),
        };
        let method = match &m.method {
            Some(name) => Some(Method::from_bytes(name.as_bytes()).ok()?),
            None => None,
        };
        let mut headers = Vec::new();
        for h in &m.headers {
            headers.push((HeaderName::from_bytes(h.name.as_bytes()).ok()?, StrMatch::new(&h.value)?));
        }
        let mut query = Vec::new();
        for q in &m.query {
            query.push((q.name.clone(), StrMatch::new(&q.value)?));
        }
        let grpc = match &m.grpc {
            None => None,
            Some(GrpcMethodMatch { service, method, regex }) => {
                let one = |v: &Option<String>| -> Option<Option<StrMatch>> {
                    match v {
                        None => Some(None),
                        Some(s) if *regex => Some(Some(StrMatch::Regex(full(s)?))),
                        Some(s) => Some(Some(StrMatch::Exact(s.clone()))),
                    }
                };
                Some((one(service)?, one(method)?))
            }
        };
        Some(Matcher { path, method, headers, query, grpc })
    }

    fn matches(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> bool {
        let path = uri.path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatcher::Exact(p)) => path == p,
            // Element-wise prefix: "/foo" matches "/foo" and "/foo/bar", not "/foobar".
            Some(PathMatcher::Prefix(p)) => {
                p.is_empty() || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            Some(PathMatcher::Regex(r)) => r.is_match(path),
        };
        if !path_ok || self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let headers_ok = self.headers.iter().all(|(name, want)| {
            headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| want.is_match(v))
        });
        if !headers_ok {
            return false;
        }
        let query_ok = self.query.iter().all(|(name, want)| {
            uri.query()
                .and_then(|q| q.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| k == name))
                .is_some_and(|(_, v)| want.is_match(v))
        });
        if !query_ok {
            return false;
        }
        match &self.grpc {
            None => true,
            // gRPC paths are "/<package.Service>/<Method>".
            Some((service, method)) => {
                let mut parts = path.trim_start_matches('/').splitn(2, '/');
                let (s, m) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                service.as_ref().is_none_or(|w| w.is_match(s)) && method.as_ref().is_none_or(|w| w.is_match(m))
            }
        }
    }
}

fn rule(r: &CompiledRule, compiled: &Compiled) -> Option<Rule> {
    let label = match &r.name {
        Some(name) => format!("{}#{name}", r.route),
        None => r.route.to_string(),
    };
    let prefix = match &r.matcher.path {
        Some(PathMatch::Prefix(p)) => Some(p.clone()),
        _ => None,
    };
    Some(Rule {
        label,
        matcher: Matcher::new(&r.matcher)?,
        prefix,
        filters: r.filters.clone(),
        backends: r
            .backends
            .iter()
            .map(|b| Backend { target: b.target, weight: b.weight, filters: b.filters.clone() })
            .collect(),
        request_timeout: r.timeouts.request,
        backend_timeout: r.timeouts.backend_request,
        mirrors: r
            .filters
            .iter()
            .filter_map(|f| match f {
                // compile filled in the port (or rejected the mirror).
                Filter::RequestMirror { service, port: Some(port), percent } => {
                    compiled.service_addr(service, *port).map(|addr| (addr, *percent))
                }
                _ => None,
            })
            .collect(),
        traffic: r.traffic.clone(),
    })
}

impl Table {
    /// The table of one config; its `jwksUri`s become the ones `jwks` fetches.
    pub fn build(compiled: &Compiled, jwks: &Fetchers) -> Table {
        let rules = |list: &[CompiledRule]| list.iter().filter_map(|r| rule(r, compiled)).collect::<Vec<_>>();
        let services = compiled
            .l7
            .iter()
            .map(|(vip, s)| {
                let service = Service {
                    target: *vip,
                    traffic: s.traffic.clone(),
                    producer: rules(&s.producer),
                    consumers: s.consumers.iter().map(|(ns, list)| (ns.clone(), rules(list))).collect(),
                };
                (*vip, service)
            })
            .collect();
        let endpoints = compiled
            .endpoints
            .iter()
            .map(|(vip, eps)| (*vip, eps.iter().filter(|e| e.weight > 0).map(|e| (e.addr, e.weight)).collect()))
            .collect();
        let declared = compiled
            .services
            .iter()
            .filter_map(|(key, s)| {
                let protocol = Protocol::declared(s.app_protocol.as_deref(), s.port_name.as_deref())?;
                let ip = Ipv4Addr::from(as_v4(&key.addr)?.to_ne_bytes());
                Some((SocketAddrV4::new(ip, key.port), protocol))
            })
            .collect();
        let tunnel = compiled
            .tunnel
            .iter()
            .filter_map(|(ip, peer)| {
                let id = spiffe_id(&peer.workload.namespace, &peer.service_account)?;
                Some((*ip, Remote { node: SocketAddr::V4(peer.tunnel), id }))
            })
            .collect();
        let local = compiled
            .workload_ips
            .iter()
            .filter(|(_, wl)| wl.flags & (WL_F_LOCAL | WL_F_MESHED) == WL_F_LOCAL | WL_F_MESHED)
            .filter_map(|(addr, wl)| {
                let ip = Ipv4Addr::from(as_v4(addr)?.to_ne_bytes());
                let name = compiled.names.workloads.get(&wl.id)?;
                let id = spiffe_id(&name.id.namespace, &name.service_account)?;
                Some((ip, Local { id, workload: name.id.clone() }))
            })
            .collect();
        Table { services, endpoints, declared, names: compiled.names.clone(), authz: Authz::build(compiled, jwks), tunnel, local }
    }

    /// What the proxy speaks to `target`'s endpoints (see `Protocol::upstream`); with
    /// `use_client` (a TrafficPolicy's `useClientProtocol`) the port's declaration is not read.
    pub fn upstream_protocol(&self, target: SocketAddrV4, downstream: Protocol, needed: Option<Protocol>, use_client: bool) -> Protocol {
        let declared = if use_client { None } else { self.declared.get(&target).copied() };
        Protocol::upstream(declared, downstream, needed)
    }

    /// A weighted random endpoint of a service port.
    pub fn endpoint(&self, target: SocketAddrV4) -> Option<SocketAddrV4> {
        pick(self.endpoints.get(&target)?, |e| e.1).map(|e| e.0)
    }
}

impl Service {
    pub fn route(&self, client_ns: &str, method: &Method, uri: &Uri, headers: &HeaderMap) -> Decision<'_> {
        // A consumer route (in the client's namespace) replaces the producer's for that client.
        let rules = self.consumers.get(client_ns).unwrap_or(&self.producer);
        if rules.is_empty() {
            return Decision::Default(self.target);
        }
        rules
            .iter()
            .find(|r| r.matcher.matches(method, uri, headers))
            .map_or(Decision::NoRoute, Decision::Rule)
    }
}

/// Weighted random choice; zero weights are never picked.
pub fn pick<T>(items: &[T], weight: impl Fn(&T) -> u32) -> Option<&T> {
    let total: u64 = items.iter().map(|i| u64::from(weight(i))).sum();
    if total == 0 {
        return None;
    }
    let mut point = fastrand::u64(0..total);
    for item in items {
        let w = u64::from(weight(item));
        if point < w {
            return Some(item);
        }
        point -= w;
    }
    None
}

pub type SharedTable = Arc<Table>;
