//! Gateway API mesh routes (GAMMA): HTTPRoutes and GRPCRoutes whose parents are Services,
//! compiled into one route table per service port for the node proxy.
//!
//! A route in its Service's namespace is the service's own ("producer") route and applies to
//! every client. A route in another namespace is a "consumer" route: it applies only to clients
//! in its own namespace, and those clients then see no producer route at all. An invalid rule is
//! skipped with a rejection while the route's other rules still apply, as the spec asks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Serialize, Serializer};
use weft_common::{PROTO_TCP, SVC_F_HANDOFF, ServiceKey};

use super::traffic::Traffic;
use super::{Cause, Compiled, CompiledService, Rejection, defined_twice, ipv4_addr};
use crate::model::{
    Filter, HeaderModifier, HttpRoute, MAX_WEIGHT, ObjectRef, PathMatch, PathRewrite, Protocol, RouteKind, RouteMatch,
    RouteRule, RouteTimeouts, Service, StringMatch, TrafficSettings,
};

/// The route table of one service port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct L7Service {
    pub service: ObjectRef,
    pub port: u16,
    /// The rules of clients without consumer routes, most specific first. Empty (with no
    /// consumers either) when the service is handed off without routes: the proxy then sends
    /// every request to the service itself.
    pub producer: Vec<CompiledRule>,
    /// Client namespace -> its consumer routes' rules, most specific first; they replace
    /// `producer` for clients in that namespace.
    pub consumers: BTreeMap<String, Vec<CompiledRule>>,
    /// What applies to requests to this port, from the TrafficPolicy targeting the Service, or
    /// the defaults; a matched rule's own `traffic` replaces it.
    pub traffic: TrafficSettings,
}

impl L7Service {
    /// The rules that apply to a client in `namespace`.
    pub fn rules_for(&self, namespace: &str) -> &[CompiledRule] {
        self.consumers.get(namespace).unwrap_or(&self.producer)
    }
}

/// One (rule, match) pair of a route; a request takes the first entry of its list that matches.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledRule {
    pub route: ObjectRef,
    pub kind: RouteKind,
    /// Index in the route's `spec.rules`.
    pub rule: usize,
    pub name: Option<String>,
    /// Defaults filled in: an HTTPRoute match without a path (or a rule without matches)
    /// matches path prefix "/". Header names are lower case and listed once.
    pub matcher: RouteMatch,
    /// Mirrors name a resolved port; mirrors to a missing Service are left out (and rejected).
    pub filters: Vec<Filter>,
    /// Empty when the rule only redirects (or has no backends: HTTP 500 per the spec).
    pub backends: Vec<CompiledBackend>,
    pub timeouts: RouteTimeouts,
    /// From a TrafficPolicy targeting this rule's route; replaces the service's settings
    /// entirely for requests this rule matches. `None`: the service's apply.
    #[serde(serialize_with = "traffic_text")]
    pub traffic: Option<TrafficSettings>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledBackend {
    pub service: ObjectRef,
    /// The backend Service's VIP:port; `None` if that Service or port does not exist, and the
    /// proxy answers HTTP 500 for this backend's share of requests, as the spec asks.
    #[serde(serialize_with = "target_text")]
    pub target: Option<SocketAddrV4>,
    /// 0 is never chosen.
    pub weight: u32,
    pub filters: Vec<Filter>,
}

fn target_text<S: Serializer>(target: &Option<SocketAddrV4>, s: S) -> Result<S::Ok, S::Error> {
    match target {
        Some(addr) => s.collect_str(addr),
        None => s.serialize_str("none (HTTP 500)"),
    }
}

fn traffic_text<S: Serializer>(traffic: &Option<TrafficSettings>, s: S) -> Result<S::Ok, S::Error> {
    match traffic {
        Some(settings) => settings.serialize(s),
        None => s.serialize_str("none (the service's apply)"),
    }
}

/// Problems knowable from the route alone (its rules, and whether it names parents and rules
/// at all). The compiler reports the same ones; the config loader uses this to name the file.
pub fn route_problems(route: &HttpRoute) -> Vec<Rejection> {
    let reject = |field: &str, reason: &str| Rejection::new(route.kind.kind_name(), &route.id, field, reason);
    let mut problems = Vec::new();
    if route.parents.is_empty() {
        problems.push(reject("spec.parentRefs", "empty; name the Service whose requests this route steers"));
    }
    if route.rules.is_empty() {
        problems.push(reject("spec.rules", "empty; add a rule"));
    }
    for (i, rule) in route.rules.iter().enumerate() {
        if let Some((field, reason)) = check_rule(route.kind, i, rule) {
            problems.push(reject(&field, &reason));
        }
    }
    problems
}

/// Why rule `index` of a `kind` route cannot be used, as (field path, reason); `None` if it can.
pub fn check_rule(kind: RouteKind, index: usize, rule: &RouteRule) -> Option<(String, String)> {
    rule_problem(kind, &format!("spec.rules[{index}]"), rule).err()
}

/// (field path, reason).
type Problem = (String, String);

fn problem(field: impl Into<String>, reason: impl Into<String>) -> Problem {
    (field.into(), reason.into())
}

fn rule_problem(kind: RouteKind, field: &str, rule: &RouteRule) -> Result<(), Problem> {
    for (j, m) in rule.matches.iter().enumerate() {
        match_problem(kind, &format!("{field}.matches[{j}]"), m)?;
    }
    filters_problem(kind, field, &format!("{field}.filters"), &rule.filters, rule, false)?;
    for (j, backend) in rule.backends.iter().enumerate() {
        let field_j = format!("{field}.backendRefs[{j}]");
        if backend.weight > MAX_WEIGHT {
            let reason = format!("{} is too large; use a weight between 0 and {MAX_WEIGHT}", backend.weight);
            return Err(problem(format!("{field_j}.weight"), reason));
        }
        filters_problem(kind, field, &format!("{field_j}.filters"), &backend.filters, rule, true)?;
    }
    if let (Some(request), Some(backend)) = (rule.timeouts.request, rule.timeouts.backend_request)
        && backend > request
    {
        let reason = "is longer than timeouts.request, which would cut it short; make it shorter or equal";
        return Err(problem(format!("{field}.timeouts.backendRequest"), reason));
    }
    Ok(())
}

fn match_problem(kind: RouteKind, field: &str, m: &RouteMatch) -> Result<(), Problem> {
    match kind {
        RouteKind::Http if m.grpc.is_some() => {
            return Err(problem(format!("{field}.method"), "a gRPC method match belongs in a GRPCRoute"));
        }
        RouteKind::Grpc if m.path.is_some() || m.method.is_some() || !m.query.is_empty() => {
            let reason =
                "a GRPCRoute matches gRPC service, method and headers, not paths, HTTP methods or query parameters";
            return Err(problem(field, reason));
        }
        _ => {}
    }
    if let Some(path) = &m.path {
        let field = format!("{field}.path.value");
        match path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) if !p.starts_with('/') => {
                return Err(problem(field, format!("\"{p}\" does not start with \"/\"; paths are absolute")));
            }
            PathMatch::Regex(r) => regex_problem(&field, r)?,
            PathMatch::Exact(_) | PathMatch::Prefix(_) => {}
        }
    }
    if let Some(method) = &m.method
        && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
    {
        let reason = format!("\"{method}\" is not an HTTP method; write it in upper case, e.g. GET");
        return Err(problem(format!("{field}.method"), reason));
    }
    for (k, header) in m.headers.iter().enumerate() {
        header_name_problem(&format!("{field}.headers[{k}].name"), &header.name)?;
        string_match_problem(&format!("{field}.headers[{k}].value"), &header.value)?;
    }
    for (k, query) in m.query.iter().enumerate() {
        if query.name.is_empty() {
            return Err(problem(format!("{field}.queryParams[{k}].name"), "empty; name the query parameter"));
        }
        string_match_problem(&format!("{field}.queryParams[{k}].value"), &query.value)?;
    }
    if let Some(grpc) = &m.grpc {
        let field = format!("{field}.method");
        if grpc.service.is_none() && grpc.method.is_none() {
            return Err(problem(field, "matches nothing in particular; set service, method or both"));
        }
        for (part, value) in [("service", &grpc.service), ("method", &grpc.method)] {
            let Some(value) = value else { continue };
            let field = format!("{field}.{part}");
            if grpc.regex {
                regex_problem(&field, value)?;
            } else if value.is_empty() || value.contains('/') {
                let reason = format!("\"{value}\" is not a gRPC {part} name; it is not empty and has no \"/\"");
                return Err(problem(field, reason));
            }
        }
    }
    Ok(())
}

fn string_match_problem(field: &str, value: &StringMatch) -> Result<(), Problem> {
    match value {
        StringMatch::Exact(_) => Ok(()),
        StringMatch::Regex(r) => regex_problem(field, r),
    }
}

/// The proxy compiles the same expressions with the same engine, so what passes here runs there.
fn regex_problem(field: &str, regex: &str) -> Result<(), Problem> {
    match regex_lite::Regex::new(regex) {
        Ok(_) => Ok(()),
        Err(e) => Err(problem(field, format!("invalid regex \"{regex}\": {}", one_line(&e.to_string())))),
    }
}

/// regex-lite explains over several lines; a rejection is one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// RFC 9110 token characters.
fn header_name_problem(field: &str, name: &str) -> Result<(), Problem> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(problem(field, format!("\"{name}\" is not a header name")));
    }
    Ok(())
}

fn filter_type(filter: &Filter) -> &'static str {
    match filter {
        Filter::RequestHeaderModifier(_) => "RequestHeaderModifier",
        Filter::ResponseHeaderModifier(_) => "ResponseHeaderModifier",
        Filter::UrlRewrite { .. } => "URLRewrite",
        Filter::RequestRedirect { .. } => "RequestRedirect",
        Filter::RequestMirror { .. } => "RequestMirror",
    }
}

/// `rule_field` is the rule's path, `field` the filter list's (the rule's or a backendRef's).
fn filters_problem(
    kind: RouteKind,
    rule_field: &str,
    field: &str,
    filters: &[Filter],
    rule: &RouteRule,
    backend: bool,
) -> Result<(), Problem> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut redirect, mut rewrite) = (false, false);
    for (k, filter) in filters.iter().enumerate() {
        let field = format!("{field}[{k}]");
        let name = filter_type(filter);
        if kind == RouteKind::Grpc && matches!(filter, Filter::UrlRewrite { .. } | Filter::RequestRedirect { .. }) {
            let reason = format!(
                "a GRPCRoute cannot use {name}; use RequestHeaderModifier, ResponseHeaderModifier or RequestMirror"
            );
            return Err(problem(format!("{field}.type"), reason));
        }
        // The spec allows each filter type once per list, except mirrors.
        if !matches!(filter, Filter::RequestMirror { .. })
            && let Some(first) = seen.insert(name, k)
        {
            let reason = format!("{name} is also at index {first}; use each filter type once (RequestMirror excepted)");
            return Err(problem(format!("{field}.type"), reason));
        }
        match filter {
            Filter::RequestHeaderModifier(m) => modifier_problem(&format!("{field}.requestHeaderModifier"), m)?,
            Filter::ResponseHeaderModifier(m) => modifier_problem(&format!("{field}.responseHeaderModifier"), m)?,
            Filter::UrlRewrite { hostname, path } => {
                rewrite = true;
                if hostname.as_deref() == Some("") {
                    return Err(problem(
                        format!("{field}.urlRewrite.hostname"),
                        "empty; leave it out to keep the host",
                    ));
                }
                if let Some(path) = path {
                    rewrite_problem(rule_field, &format!("{field}.urlRewrite.path"), path, rule)?;
                }
            }
            Filter::RequestRedirect { scheme, hostname, path, port, status } => {
                if backend {
                    let reason =
                        "a redirect answers the client itself; put it in the rule's filters, not a backendRef's";
                    return Err(problem(format!("{field}.type"), reason));
                }
                redirect = true;
                let field = format!("{field}.requestRedirect");
                if let Some(scheme) = scheme
                    && scheme != "http"
                    && scheme != "https"
                {
                    return Err(problem(format!("{field}.scheme"), format!("\"{scheme}\" is not http or https")));
                }
                if hostname.as_deref() == Some("") {
                    return Err(problem(format!("{field}.hostname"), "empty; leave it out to keep the host"));
                }
                if *port == Some(0) {
                    return Err(problem(format!("{field}.port"), "0 is not a port; use a number between 1 and 65535"));
                }
                if ![301, 302, 303, 307, 308].contains(status) {
                    let reason = format!("{status} is not a redirect status; use 301, 302, 303, 307 or 308");
                    return Err(problem(format!("{field}.statusCode"), reason));
                }
                if let Some(path) = path {
                    rewrite_problem(rule_field, &format!("{field}.path"), path, rule)?;
                }
            }
            Filter::RequestMirror { percent, .. } => {
                if !(0.0..=100.0).contains(percent) {
                    let reason = format!("{percent} is not a percentage; use 0 to 100");
                    return Err(problem(format!("{field}.requestMirror.percent"), reason));
                }
            }
        }
    }
    if redirect && rewrite {
        let reason = "RequestRedirect and URLRewrite cannot be used together: a redirect sends the client elsewhere, \
                      so nothing is forwarded to rewrite";
        return Err(problem(field, reason));
    }
    Ok(())
}

fn modifier_problem(field: &str, modifier: &HeaderModifier) -> Result<(), Problem> {
    let set = modifier.set.iter().map(|(name, _)| ("set", name));
    let add = modifier.add.iter().map(|(name, _)| ("add", name));
    let remove = modifier.remove.iter().map(|name| ("remove", name));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (list, name) in set.chain(add).chain(remove) {
        let index = counts.entry(list).or_default();
        header_name_problem(&format!("{field}.{list}[{index}]"), name)?;
        *index += 1;
    }
    Ok(())
}

fn rewrite_problem(rule_field: &str, field: &str, path: &PathRewrite, rule: &RouteRule) -> Result<(), Problem> {
    let (name, value) = match path {
        PathRewrite::ReplaceFullPath(value) => ("replaceFullPath", value),
        PathRewrite::ReplacePrefixMatch(value) => ("replacePrefixMatch", value),
    };
    if !value.starts_with('/') {
        let reason = format!("\"{value}\" does not start with \"/\"; paths are absolute");
        return Err(problem(format!("{field}.{name}"), reason));
    }
    if let PathRewrite::ReplacePrefixMatch(_) = path {
        // A match without a path matches prefix "/", so it has a prefix to replace.
        let not_prefix =
            rule.matches.iter().position(|m| matches!(m.path, Some(PathMatch::Exact(_) | PathMatch::Regex(_))));
        if let Some(j) = not_prefix {
            let reason = format!(
                "replaces the matched path prefix, but {rule_field}.matches[{j}] is not a PathPrefix match; use \
                 ReplaceFullPath or a PathPrefix match"
            );
            return Err(problem(format!("{field}.type"), reason));
        }
    }
    Ok(())
}

/// Gateway API rule precedence, most specific first; the derived order compares fields in turn.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    specificity: Specificity,
    /// Older routes first, routes without a timestamp last. Kubernetes writes creation
    /// timestamps in one fixed-width UTC form, so text order is time order.
    created: (bool, String),
    /// "ns/name", as the spec orders ties.
    route: String,
    kind: RouteKind,
    rule: usize,
    matched: usize,
}

/// HTTPRoute: path kind (exact, prefix, regex), longer prefix, method match, more header
/// matches, more query matches. GRPCRoute: exact service and method, then one of them exact,
/// then regex, then no method match; longer service, longer method, more header matches.
type Specificity = (u8, Reverse<usize>, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

fn specificity(kind: RouteKind, m: &RouteMatch) -> Specificity {
    let headers = Reverse(m.headers.len());
    match kind {
        RouteKind::Http => {
            let (class, prefix) = match &m.path {
                Some(PathMatch::Exact(_)) => (0, 0),
                Some(PathMatch::Prefix(p)) => (1, p.chars().count()),
                None => (1, 1),
                Some(PathMatch::Regex(_)) => (2, 0),
            };
            let method = if m.method.is_some() { 0 } else { 1 };
            (class, Reverse(prefix), Reverse(0), method, headers, Reverse(m.query.len()))
        }
        RouteKind::Grpc => {
            let Some(grpc) = &m.grpc else { return (3, Reverse(0), Reverse(0), 1, headers, Reverse(0)) };
            let class = match (grpc.regex, &grpc.service, &grpc.method) {
                (true, _, _) => 2,
                (false, Some(_), Some(_)) => 0,
                (false, _, _) => 1,
            };
            let chars = |part: &Option<String>| Reverse(part.as_deref().map_or(0, |p| p.chars().count()));
            (class, chars(&grpc.service), chars(&grpc.method), 1, headers, Reverse(0))
        }
    }
}

/// Fills in defaults so the proxy and the dump see what is matched: a missing HTTP path is
/// prefix "/", header names are lower case, and a repeated header or query name keeps only its
/// first entry (the spec ignores the later ones).
fn normalize(kind: RouteKind, mut m: RouteMatch) -> RouteMatch {
    if kind == RouteKind::Http && m.path.is_none() {
        m.path = Some(PathMatch::Prefix("/".to_owned()));
    }
    let mut names = BTreeSet::new();
    m.headers.retain_mut(|header| {
        header.name.make_ascii_lowercase();
        names.insert(header.name.clone())
    });
    let mut names = BTreeSet::new();
    m.query.retain(|query| names.insert(query.name.clone()));
    m
}

#[derive(Clone)]
struct Ranked {
    key: Precedence,
    rule: CompiledRule,
}

/// The route lists of one service port, while routes are added.
struct Table<'a> {
    service: &'a Service,
    producer: Vec<Ranked>,
    consumers: BTreeMap<String, Vec<Ranked>>,
}

/// Resolves references to Services against what the compiler accepted.
struct Resolver<'a, 'm> {
    services: &'a [&'a Service],
    accepted: &'a BTreeMap<&'a ObjectRef, (&'a Service, Ipv4Addr)>,
    compiled: &'m BTreeMap<ServiceKey, CompiledService>,
}

/// An accepted Service with its VIP, or why `id` names none: missing, headless or rejected.
pub(super) fn find_service<'a>(
    services: &[&Service],
    accepted: &BTreeMap<&ObjectRef, (&'a Service, Ipv4Addr)>,
    id: &ObjectRef,
) -> Result<(&'a Service, Ipv4Addr), String> {
    if let Some(&(svc, ip)) = accepted.get(id) {
        return Ok((svc, ip));
    }
    Err(match services.iter().find(|svc| &svc.id == id) {
        None => format!("Service {id} does not exist"),
        Some(svc) if svc.cluster_ip.is_none() => {
            format!("Service {id} is headless; weft steers requests sent to a clusterIP")
        }
        Some(_) => format!("Service {id} was rejected (see its rejection)"),
    })
}

impl<'a> Resolver<'a, '_> {
    fn service(&self, id: &ObjectRef) -> Result<(&'a Service, Ipv4Addr), String> {
        find_service(self.services, self.accepted, id)
    }

    /// Whether the service port made it into the kernel maps (its backends may not have).
    fn compiled(&self, addr: SocketAddrV4) -> bool {
        self.compiled.contains_key(&service_key(addr))
    }

    /// The VIP:port a reference to a Service port goes to, or (field suffix, reason).
    fn port(&self, id: &ObjectRef, port: Option<u16>) -> Result<SocketAddrV4, (&'static str, String)> {
        let (svc, ip) = self.service(id).map_err(|reason| ("", reason))?;
        let ports = tcp_ports(svc);
        let port = match (port, ports.as_slice()) {
            (Some(p), _) if ports.contains(&p) => p,
            (Some(p), _) => return Err((".port", format!("Service {id} has no TCP port {p}"))),
            (None, [only]) => *only,
            (None, []) => return Err(("", format!("Service {id} has no TCP port"))),
            (None, many) => {
                let list = many.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
                return Err((".port", format!("required: Service {id} has several TCP ports ({list}); name one")));
            }
        };
        let addr = SocketAddrV4::new(ip, port);
        if self.compiled(addr) {
            Ok(addr)
        } else {
            Err(("", format!("Service {id} port {port} was rejected (see its rejection)")))
        }
    }
}

fn tcp_ports(svc: &Service) -> Vec<u16> {
    svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.port).collect()
}

pub(super) fn service_key(addr: SocketAddrV4) -> ServiceKey {
    ServiceKey { addr: ipv4_addr(*addr.ip()), port: addr.port(), proto: PROTO_TCP, _pad: 0 }
}

pub(super) fn apply(
    out: &mut Compiled,
    routes: &[HttpRoute],
    services: &[&Service],
    accepted: &BTreeMap<&ObjectRef, (&Service, Ipv4Addr)>,
    traffic: &Traffic<'_>,
    authz: &BTreeSet<SocketAddrV4>,
) {
    let mut rejected = Vec::new();
    let mut tables: BTreeMap<SocketAddrV4, Table<'_>> = BTreeMap::new();
    {
        let resolver = Resolver { services, accepted, compiled: &out.services };
        let mut previous = None;
        for route in sorted(routes) {
            // Sorted input puts objects with the same id next to each other.
            if previous.replace((route.kind, &route.id)) == Some((route.kind, &route.id)) {
                let (field, reason) = defined_twice();
                rejected.push(Rejection::new(route.kind.kind_name(), &route.id, field, reason));
                continue;
            }
            let settings = traffic.routes.get(&(route.kind, route.id.clone())).copied();
            add_route(route, &resolver, settings, &mut tables, &mut rejected);
        }
    }

    // Services marked for the proxy, or whose TrafficPolicy the proxy applies, without routes:
    // it sends every request to the service.
    for &(svc, ip) in accepted.values().filter(|(svc, _)| svc.l7 || traffic.services.contains_key(&svc.id)) {
        for port in tcp_ports(svc) {
            let addr = SocketAddrV4::new(ip, port);
            if out.services.contains_key(&service_key(addr)) {
                tables.entry(addr).or_insert_with(|| Table {
                    service: svc,
                    producer: Vec::new(),
                    consumers: BTreeMap::new(),
                });
            }
        }
    }

    // Service ports whose authorization or JWT policies the proxy enforces, without routes of
    // their own: the proxy checks each request, then sends it to the service.
    for &addr in authz {
        let Some(compiled) = out.services.get(&service_key(addr)) else { continue };
        let Some(&(svc, _)) = accepted.get(&compiled.service) else { continue };
        tables.entry(addr).or_insert_with(|| Table { service: svc, producer: Vec::new(), consumers: BTreeMap::new() });
    }

    for (addr, table) in tables {
        let Table { service, producer, consumers } = table;
        let port = addr.port();
        let producer = finish(producer, service, port, &mut rejected);
        let consumers = consumers
            .into_iter()
            .map(|(namespace, rules)| (namespace, finish(rules, service, port, &mut rejected)))
            .collect();
        let l7 = L7Service {
            service: service.id.clone(),
            port,
            producer,
            consumers,
            traffic: traffic.services.get(&service.id).map_or_else(TrafficSettings::default, |&s| s.clone()),
        };
        if let Some(compiled) = out.services.get_mut(&service_key(addr)) {
            compiled.value.flags |= SVC_F_HANDOFF;
        }
        out.l7.insert(addr, l7);
    }
    out.rejected.extend(rejected);
}

/// Routes in one canonical order: by (kind, id), then by content, so which of two definitions
/// of the same route wins does not depend on the order they were read in.
fn sorted(routes: &[HttpRoute]) -> Vec<&HttpRoute> {
    let mut routes: Vec<&HttpRoute> = routes.iter().collect();
    // Routes are not `Ord` (a mirror percentage is a float); their JSON text is a total order.
    let text = |route: &HttpRoute| serde_json::to_string(route).unwrap_or_default();
    routes.sort_by(|a, b| (a.kind, &a.id).cmp(&(b.kind, &b.id)).then_with(|| text(a).cmp(&text(b))));
    routes
}

fn add_route<'a>(
    route: &HttpRoute,
    resolver: &Resolver<'a, '_>,
    traffic: Option<&TrafficSettings>,
    tables: &mut BTreeMap<SocketAddrV4, Table<'a>>,
    rejected: &mut Vec<Rejection>,
) {
    let kind = route.kind;
    let mut reject = |cause: Cause, field: String, reason: String| {
        let rejection = Rejection::new(kind.kind_name(), &route.id, field, reason);
        rejected.push(Rejection { cause, ..rejection });
    };
    if route.parents.is_empty() {
        let reason = "empty; name the Service whose requests this route steers";
        reject(Cause::Invalid, "spec.parentRefs".into(), reason.into());
        return;
    }
    if route.rules.is_empty() {
        reject(Cause::Invalid, "spec.rules".into(), "empty; add a rule".into());
        return;
    }

    let mut rules = Vec::new();
    for (i, rule) in route.rules.iter().enumerate() {
        if let Some((field, reason)) = check_rule(kind, i, rule) {
            reject(Cause::Invalid, field, reason);
            continue;
        }
        let field = format!("spec.rules[{i}]");
        let mut backends = Vec::new();
        for (j, backend) in rule.backends.iter().enumerate() {
            let field = format!("{field}.backendRefs[{j}]");
            let target = match resolver.port(&backend.service, backend.port) {
                Ok(addr) => Some(addr),
                Err((suffix, reason)) => {
                    reject(
                        Cause::Unresolved,
                        format!("{field}{suffix}"),
                        format!("{reason}; this backend's share of requests gets HTTP 500"),
                    );
                    None
                }
            };
            let filters = resolve_mirrors(&backend.filters, &format!("{field}.filters"), resolver, &mut reject);
            backends.push(CompiledBackend {
                service: backend.service.clone(),
                target,
                weight: backend.weight,
                filters,
            });
        }
        let filters = resolve_mirrors(&rule.filters, &format!("{field}.filters"), resolver, &mut reject);
        let matches = if rule.matches.is_empty() { vec![RouteMatch::default()] } else { rule.matches.clone() };
        for (j, m) in matches.into_iter().enumerate() {
            let matcher = normalize(kind, m);
            let key = Precedence {
                specificity: specificity(kind, &matcher),
                created: (route.created.is_none(), route.created.clone().unwrap_or_default()),
                route: route.id.to_string(),
                kind,
                rule: i,
                matched: j,
            };
            let rule = CompiledRule {
                route: route.id.clone(),
                kind,
                rule: i,
                name: rule.name.clone(),
                matcher,
                filters: filters.clone(),
                backends: backends.clone(),
                timeouts: rule.timeouts,
                traffic: traffic.cloned(),
            };
            rules.push(Ranked { key, rule });
        }
    }

    // A set: two parentRefs may name the same port (one by number, one by leaving it out).
    let mut targets: BTreeMap<SocketAddrV4, &'a Service> = BTreeMap::new();
    for (k, parent) in route.parents.iter().enumerate() {
        let field = format!("spec.parentRefs[{k}]");
        let (svc, ip) = match resolver.service(&parent.service) {
            Ok(found) => found,
            Err(reason) => {
                reject(Cause::Unresolved, field, format!("{reason}; the route is not attached to it"));
                continue;
            }
        };
        let ports = tcp_ports(svc);
        let ports = match parent.port {
            Some(port) if ports.contains(&port) => vec![port],
            Some(port) => {
                let reason = format!("Service {} has no TCP port {port}; the route is not attached to it", svc.id);
                reject(Cause::Unresolved, format!("{field}.port"), reason);
                continue;
            }
            None => ports,
        };
        for port in ports {
            let addr = SocketAddrV4::new(ip, port);
            // A port the compiler rejected already has its rejection.
            if resolver.compiled(addr) {
                targets.insert(addr, svc);
            }
        }
    }
    // With no valid rule the route would only hide others: each rule's rejection says why.
    if rules.is_empty() {
        return;
    }
    for (addr, svc) in targets {
        let table = tables.entry(addr).or_insert_with(|| Table {
            service: svc,
            producer: Vec::new(),
            consumers: BTreeMap::new(),
        });
        let list = if route.id.namespace == svc.id.namespace {
            &mut table.producer
        } else {
            table.consumers.entry(route.id.namespace.clone()).or_default()
        };
        list.extend(rules.iter().cloned());
    }
}

/// `filters` with each mirror's port resolved; mirrors to a missing Service or port are left
/// out, with a rejection.
fn resolve_mirrors(
    filters: &[Filter],
    field: &str,
    resolver: &Resolver<'_, '_>,
    reject: &mut impl FnMut(Cause, String, String),
) -> Vec<Filter> {
    let mut resolved = Vec::with_capacity(filters.len());
    for (k, filter) in filters.iter().enumerate() {
        let Filter::RequestMirror { service, port, percent } = filter else {
            resolved.push(filter.clone());
            continue;
        };
        match resolver.port(service, *port) {
            Ok(addr) => resolved.push(Filter::RequestMirror {
                service: service.clone(),
                port: Some(addr.port()),
                percent: *percent,
            }),
            Err((suffix, reason)) => reject(
                Cause::Unresolved,
                format!("{field}[{k}].requestMirror.backendRef{suffix}"),
                format!("{reason}; requests are not mirrored to it"),
            ),
        }
    }
    resolved
}

/// One list, ready for the proxy: GRPCRoute conflicts settled, most specific rule first.
fn finish(mut list: Vec<Ranked>, service: &Service, port: u16, rejected: &mut Vec<Rejection>) -> Vec<CompiledRule> {
    // GEP-1426: when a GRPCRoute and an HTTPRoute attach to the same parent, the GRPCRoute
    // wins and the HTTPRoute is not used there.
    let grpc = list.iter().filter(|r| r.rule.kind == RouteKind::Grpc).map(|r| &r.rule.route).min().cloned();
    if let Some(grpc) = grpc {
        let losers: BTreeSet<&ObjectRef> =
            list.iter().filter(|r| r.rule.kind == RouteKind::Http).map(|r| &r.rule.route).collect();
        for loser in losers {
            let reason = format!(
                "GRPCRoute {grpc} also attaches to Service {} port {port}; the GRPCRoute wins there (GEP-1426) and this \
                 route is not used for it",
                service.id
            );
            rejected.push(Rejection::new(RouteKind::Http.kind_name(), loser, "spec.parentRefs", reason));
        }
        list.retain(|r| r.rule.kind == RouteKind::Grpc);
    }
    list.sort_by(|a, b| a.key.cmp(&b.key));
    list.into_iter().map(|r| r.rule).collect()
}
