//! Authorization decisions: which policies select a destination, and what they say about one
//! request or connection.
//!
//! [`AuthzTable`] is built once per config (by [`crate::compile`], as `Compiled::authz`), with
//! policies indexed by what they select: service ports (VIP:port) for Service and Namespace
//! targets, workloads for Namespace and selector targets. [`AuthzTable::evaluate`] is pure and
//! allocates nothing except the reason of a denial. The semantics are [`SEMANTICS`], which the
//! config dump shows next to the table:
//!
//! - DENY first: if a rule of any DENY policy selecting the destination matches, deny.
//! - Then, if any ALLOW policy selects the destination, allow only when one of its rules matches;
//!   otherwise deny. No policy at all: allow.
//! - A rule matches when each section it has matches: `from` (any entry), `to` (any entry),
//!   `when` (every condition).
//! - A connection that is not parsed as HTTP (opaque TCP) has no method, path, host, headers or
//!   token. As in Istio: an ALLOW rule with HTTP-only fields never matches it, and a DENY rule's
//!   HTTP-only fields are ignored, so the DENY applies to the whole connection when its other
//!   sections match. Either way a policy written for HTTP fails closed on TCP.
//! - A peer without an identity (plaintext, not meshed) matches no `namespaces`,
//!   `serviceAccounts` or `principals` (not even `*`) and every `not*` list.
//! - JWT claims: a string claim matches a value as a whole string; a list claim matches when any
//!   of its strings does. Space-separated string claims (`scope`, `permission` and those a
//!   JwtRule lists in `spaceDelimitedClaims`) arrive as lists, split by the JWT verifier, as
//!   Istio and Envoy do. Numbers, booleans and objects never match.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddrV4;
use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::model::{
    Action, AuthorizationPolicy, Condition, ConditionKey, JwtPolicy, JwtRule, ObjectRef, Operation, Pattern,
    PolicyTarget, Rule, Source, Workload,
};

/// How decisions are made, shown by the config dump next to the table.
pub const SEMANTICS: &str = "DENY wins: a request matching a rule of any DENY policy that selects its destination is \
    denied. Otherwise, once any ALLOW policy selects the destination, only requests matching a rule of one of them \
    are allowed and all others are denied; with no policy selecting it, a destination allows everything. A rule \
    matches when each of its sections matches: from (any entry), to (any entry), when (every condition); an empty \
    rule matches everything, a policy without rules nothing. On connections not parsed as HTTP (opaque TCP), ALLOW \
    rules with HTTP-only fields (methods, paths, hosts, headers, request.* conditions) never match and DENY rules \
    ignore those fields, so both fail closed. A peer without identity matches no namespaces, serviceAccounts or \
    principals and every not* list. A string JWT claim matches as a whole; a list claim (and space-delimited claims \
    such as scope) when any item matches. Rules with HTTP-only fields, JwtPolicies and selector targets are \
    enforced by the node proxy (their service ports are handed to it; a selector policy's HTTP rules for callers \
    on other nodes by the destination node's proxy, per request inside the tunnel); the rest also in the kernel \
    at connect.";

/// The trust domain of the SPIFFE ids weft derives from service accounts.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// A JWT's claims, as the verifier returns them.
pub type Claims = serde_json::Map<String, Value>;

/// The authenticated identity of the peer (from its certificate, or the kernel's record of a
/// local meshed workload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub namespace: String,
    pub service_account: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub principal: String,
}

impl Peer {
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>, trust_domain: &str) -> Self {
        let (namespace, service_account) = (namespace.into(), service_account.into());
        let principal = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        Self { namespace, service_account, principal }
    }
}

/// What is being authorized: a connection, or one HTTP request on it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// `None`: the peer has no identity.
    pub source: Option<&'a Peer>,
    /// The service port the client dialed (what `to.ports` and `destination.port` match).
    pub port: u16,
    /// `None` for a connection not parsed as HTTP; HTTP-only fields then follow the TCP rules.
    pub http: Option<HttpRequest<'a>>,
}

#[derive(Clone, Copy)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Without the query string, normalized by [`normalize_path`] (and forwarded normalized,
    /// so the backend serves what was authorized).
    pub path: &'a str,
    /// Host header or `:authority`.
    pub host: Option<&'a str>,
    /// A header's first value by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    /// The verified JWT's claims; `None` when the request carried no token.
    pub claims: Option<&'a Claims>,
}

/// Where a request is going. Service and Namespace targets select by `service`; selector (and
/// Namespace) targets by `workload`, so selector policies only apply where the destination
/// workload is known (at the destination, or once an endpoint is picked).
#[derive(Clone, Copy, Debug, Default)]
pub struct Destination<'a> {
    /// The service VIP:port the client dialed.
    pub service: Option<SocketAddrV4>,
    /// The workload (pod) serving the request.
    pub workload: Option<&'a ObjectRef>,
}

/// The verdict on one request or connection. The policy is shared with the table, so an
/// allowed request allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "UPPERCASE")]
pub enum Decision {
    /// `policy`: the ALLOW policy whose rule matched; `None` when no policy selects the
    /// destination.
    Allow { policy: Option<Arc<ObjectRef>> },
    /// `policy`: the DENY policy whose rule matched; `None` when ALLOW policies select the
    /// destination and none matched. `reason` names the policies, for the 403 body and log.
    Deny { policy: Option<Arc<ObjectRef>>, reason: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&ObjectRef> {
        match self {
            Decision::Allow { policy } | Decision::Deny { policy, .. } => policy.as_deref(),
        }
    }

    /// A fixed label for metrics: `allowed`, `denied_by_policy` or `no_allow_match`.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow { .. } => "allowed",
            Decision::Deny { policy: Some(_), .. } => "denied_by_policy",
            Decision::Deny { policy: None, .. } => "no_allow_match",
        }
    }
}

/// Every AuthorizationPolicy and JwtPolicy of a config, indexed by what they select.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthzTable {
    /// One entry per policy id, sorted by id; indexes below point here.
    policies: Vec<Entry>,
    jwt: Vec<JwtPolicy>,
    /// By service VIP:port: Service and Namespace targets.
    services: BTreeMap<SocketAddrV4, Selection>,
    /// By workload: Namespace and selector targets.
    workloads: BTreeMap<ObjectRef, Selection>,
    /// Service ports with a backend that a selector target selects: handed to the proxy, and
    /// (without a proxy) enforced at L4 for the whole port.
    backed: BTreeMap<SocketAddrV4, Selection>,
}

/// A policy, with the targets of every model policy sharing its id.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Entry {
    id: Arc<ObjectRef>,
    action: Action,
    targets: Vec<PolicyTarget>,
    /// Whether a rule has HTTP-only fields.
    http: bool,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Selection {
    /// The service of a service port, for the dump.
    service: Option<ObjectRef>,
    deny: Vec<usize>,
    allow: Vec<usize>,
    /// Indexes into `jwt`.
    jwt: Vec<usize>,
}

impl Selection {
    fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.jwt.is_empty()
    }
}

/// A compiled service port, as the table sees it.
pub(crate) struct PortBackends<'a> {
    pub addr: SocketAddrV4,
    pub service: &'a ObjectRef,
    /// Workloads behind its backends.
    pub backends: Vec<&'a ObjectRef>,
}

/// A JwtRule that applies to a destination, with where it comes from (to key caches of built
/// verifiers by `(policy, index)`).
#[derive(Clone, Copy, Debug)]
pub struct JwtRuleRef<'a> {
    pub policy: &'a ObjectRef,
    /// Index in the policy's rules.
    pub index: usize,
    pub rule: &'a JwtRule,
}

/// What connect4 can decide for one local source and service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum L4Verdict {
    Deny,
    Allow,
    /// No entry: the port's default applies (deny if `default_deny`).
    Unlisted,
}

/// Why only the proxy can enforce a policy exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyOnly {
    HttpFields,
    Selector,
    Jwt,
}

/// How rules with HTTP-only fields are judged on a connection without HTTP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NonHttp {
    /// The rule never matches.
    SkipRule,
    /// Its HTTP-only fields are left out; the rest decides.
    IgnoreFields,
}

impl AuthzTable {
    /// Indexes `policies` and `jwt_policies` (each sorted by id) against the compiled service
    /// ports and the accepted workloads.
    pub(crate) fn build(
        policies: &[&AuthorizationPolicy],
        jwt_policies: &[&JwtPolicy],
        ports: &[PortBackends<'_>],
        workloads: &[&Workload],
    ) -> Self {
        let mut table = AuthzTable::default();
        for policy in policies {
            // Sorted input: the targets of one policy id are next to each other.
            let index = match table.policies.iter().rposition(|e| *e.id == policy.id) {
                Some(index) => {
                    table.policies[index].targets.push(policy.target.clone());
                    index
                }
                None => {
                    table.policies.push(Entry {
                        id: Arc::new(policy.id.clone()),
                        action: policy.action,
                        targets: vec![policy.target.clone()],
                        http: policy.has_http_fields(),
                        rules: policy.rules.clone(),
                    });
                    table.policies.len() - 1
                }
            };
            let action = table.policies[index].action;
            let list: fn(&mut Selection) -> &mut Vec<usize> = match action {
                Action::Allow => |s| &mut s.allow,
                Action::Deny => |s| &mut s.deny,
            };
            table.select(&policy.id.namespace, &policy.target, ports, workloads, index, list);
        }
        table.jwt = jwt_policies.iter().map(|&p| p.clone()).collect();
        for (index, policy) in jwt_policies.iter().enumerate() {
            for target in &policy.targets {
                table.select(&policy.id.namespace, target, ports, workloads, index, |s| &mut s.jwt);
            }
        }
        table
    }

    /// Adds policy `index` to the list `list` picks of everything `target` selects.
    fn select(
        &mut self,
        namespace: &str,
        target: &PolicyTarget,
        ports: &[PortBackends<'_>],
        workloads: &[&Workload],
        index: usize,
        list: fn(&mut Selection) -> &mut Vec<usize>,
    ) {
        let add = |selection: &mut Selection| {
            let list = list(selection);
            if !list.contains(&index) {
                list.push(index);
            }
        };
        let in_namespace = |id: &ObjectRef| id.namespace == namespace;
        let selected: Vec<&ObjectRef> = workloads
            .iter()
            .filter(|wl| match target {
                PolicyTarget::Service(_) => false,
                PolicyTarget::Namespace => in_namespace(&wl.id),
                PolicyTarget::Selector(labels) => {
                    in_namespace(&wl.id) && wl.has_labels(labels)
                }
            })
            .map(|wl| &wl.id)
            .collect();
        for port in ports {
            let by_service = match target {
                PolicyTarget::Service(name) => in_namespace(port.service) && &port.service.name == name,
                PolicyTarget::Namespace => in_namespace(port.service),
                PolicyTarget::Selector(_) => false,
            };
            if by_service {
                add(self.services.entry(port.addr).or_insert_with(|| service_selection(port)));
            }
            let backed =
                matches!(target, PolicyTarget::Selector(_)) && port.backends.iter().any(|b| selected.contains(b));
            if backed {
                add(self.backed.entry(port.addr).or_insert_with(|| service_selection(port)));
            }
        }
        for wl in selected {
            add(self.workloads.entry(wl.clone()).or_default());
        }
    }

    /// The verdict on `req` to `dest`; see [`SEMANTICS`].
    pub fn evaluate(&self, dest: &Destination<'_>, req: &Request<'_>) -> Decision {
        let [by_service, by_workload] = self.selections(dest);
        let deny = union(by_service.map(|s| &s.deny[..]), by_workload.map(|s| &s.deny[..]));
        for entry in deny.map(|i| &self.policies[i]) {
            if entry.matches(req, NonHttp::IgnoreFields) {
                return Decision::Deny {
                    policy: Some(entry.id.clone()),
                    reason: format!("denied by policy {}", entry.id),
                };
            }
        }
        let allow = || union(by_service.map(|s| &s.allow[..]), by_workload.map(|s| &s.allow[..]));
        if allow().next().is_none() {
            return Decision::Allow { policy: None };
        }
        if let Some(entry) = allow().map(|i| &self.policies[i]).find(|e| e.matches(req, NonHttp::SkipRule)) {
            return Decision::Allow { policy: Some(entry.id.clone()) };
        }
        let mut reason = String::from("no ALLOW policy matched; policies selecting it:");
        for (n, entry) in allow().map(|i| &self.policies[i]).enumerate() {
            let _ = write!(reason, "{} {}", if n == 0 { "" } else { "," }, entry.id);
        }
        Decision::Deny { policy: None, reason }
    }

    /// Whether requests to `dest` are judged on HTTP attributes or need a token checked: the
    /// proxy then evaluates each request; otherwise once per connection (with `http: None`).
    pub fn needs_l7(&self, dest: &Destination<'_>) -> bool {
        let port = dest.service.map(|a| a.port());
        self.selections(dest).into_iter().flatten().any(|s| self.is_l7(s, port))
    }

    /// Whether any policy selects `dest`.
    pub fn selects(&self, dest: &Destination<'_>) -> bool {
        self.selections(dest).into_iter().flatten().any(|s| !s.is_empty())
    }

    /// The JwtRules of every JwtPolicy selecting `dest`, by policy id and then rule order.
    pub fn jwt_rules<'s>(&'s self, dest: &Destination<'_>) -> impl Iterator<Item = JwtRuleRef<'s>> + 's {
        let [by_service, by_workload] = self.selections(dest);
        union(by_service.map(|s| &s.jwt[..]), by_workload.map(|s| &s.jwt[..])).flat_map(move |i| {
            let policy = &self.jwt[i];
            policy.rules.iter().enumerate().map(move |(index, rule)| JwtRuleRef { policy: &policy.id, index, rule })
        })
    }

    /// Every JwtPolicy of the config, sorted by id (for building verifiers once per config).
    pub fn jwt_policies(&self) -> &[JwtPolicy] {
        &self.jwt
    }

    /// The human-readable form shown in `/config_dump`: [`SEMANTICS`], the policies, and which
    /// of them select each service port and workload.
    pub fn dump(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    fn selections(&self, dest: &Destination<'_>) -> [Option<&Selection>; 2] {
        [dest.service.and_then(|a| self.services.get(&a)), dest.workload.and_then(|w| self.workloads.get(w))]
    }

    // === for the compiler ===

    /// Service ports whose policies the proxy must enforce: selected by a policy with
    /// HTTP-only fields or by a JwtPolicy, or backed by a workload a selector targets.
    pub(crate) fn proxy_ports(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        let l7 = self.services.iter().filter(|(addr, s)| self.is_l7(s, Some(addr.port())));
        l7.map(|(addr, _)| *addr).chain(self.backed.iter().filter(|(_, s)| !s.is_empty()).map(|(addr, _)| *addr))
    }

    /// Service ports with authorization policies to enforce at L4, and whether each is
    /// default-deny (an ALLOW policy selects it). Selector policies count only when
    /// `with_selectors` (no proxy to enforce them per workload).
    pub(crate) fn l4_ports(&self, with_selectors: bool) -> BTreeMap<SocketAddrV4, bool> {
        let mut ports = BTreeMap::new();
        let mut note = |addr: &SocketAddrV4, s: &Selection| {
            if !s.deny.is_empty() || !s.allow.is_empty() {
                *ports.entry(*addr).or_insert(false) |= !s.allow.is_empty();
            }
        };
        self.services.iter().for_each(|(addr, s)| note(addr, s));
        if with_selectors {
            self.backed.iter().for_each(|(addr, s)| note(addr, s));
        }
        ports
    }

    /// What connect4 should do with connections from `peer` to `addr`. `proxied`: the proxy
    /// judges every connection after the kernel, so the kernel denies only what no request could
    /// be allowed (DENY rules without HTTP-only fields; sources no ALLOW rule's L4 part admits).
    /// Otherwise the kernel is the only enforcement: the TCP semantics apply, selector policies
    /// included for the whole port.
    pub(crate) fn l4_verdict(&self, addr: SocketAddrV4, peer: &Peer, proxied: bool) -> L4Verdict {
        let by_service = self.services.get(&addr);
        let backed = if proxied { None } else { self.backed.get(&addr) };
        let req = Request { source: Some(peer), port: addr.port(), http: None };
        let (deny_mode, allow_mode) = if proxied {
            (NonHttp::SkipRule, NonHttp::IgnoreFields)
        } else {
            (NonHttp::IgnoreFields, NonHttp::SkipRule)
        };
        let deny = union(by_service.map(|s| &s.deny[..]), backed.map(|s| &s.deny[..]));
        if deny.map(|i| &self.policies[i]).any(|e| e.matches(&req, deny_mode)) {
            return L4Verdict::Deny;
        }
        let mut allow = union(by_service.map(|s| &s.allow[..]), backed.map(|s| &s.allow[..]));
        if allow.any(|i| self.policies[i].matches(&req, allow_mode)) { L4Verdict::Allow } else { L4Verdict::Unlisted }
    }

    /// The policies (authorization, then JWT) only the proxy enforces exactly, as (kind, id,
    /// why).
    pub(crate) fn proxy_only(&self) -> impl Iterator<Item = (&'static str, &ObjectRef, ProxyOnly)> + '_ {
        let authz = self.policies.iter().filter_map(|e| {
            let selector = e.targets.iter().any(|t| matches!(t, PolicyTarget::Selector(_)));
            let why = match (e.http, selector) {
                (true, _) => ProxyOnly::HttpFields,
                (false, true) => ProxyOnly::Selector,
                (false, false) => return None,
            };
            Some(("AuthorizationPolicy", &*e.id, why))
        });
        authz.chain(self.jwt.iter().map(|p| ("JwtPolicy", &p.id, ProxyOnly::Jwt)))
    }
}

fn service_selection(port: &PortBackends<'_>) -> Selection {
    Selection { service: Some(port.service.clone()), ..Selection::default() }
}

/// The indexes of `a` then those of `b` not in `a`.
fn union<'s>(a: Option<&'s [usize]>, b: Option<&'s [usize]>) -> impl Iterator<Item = usize> + 's {
    let a = a.unwrap_or_default();
    a.iter().copied().chain(b.unwrap_or_default().iter().copied().filter(move |i| !a.contains(i)))
}

// === matching ===

impl Entry {
    /// Whether a rule with HTTP-only fields can apply at `port` (a rule whose `to` entries all
    /// name other ports cannot).
    fn http_at(&self, port: Option<u16>) -> bool {
        self.http
            && self.rules.iter().any(|rule| {
                rule.has_http_fields()
                    && (rule.to.is_empty()
                        || rule.to.iter().any(|op| op.ports.is_empty() || port.is_none_or(|p| op.ports.contains(&p))))
            })
    }

    fn matches(&self, req: &Request<'_>, non_http: NonHttp) -> bool {
        self.rules.iter().any(|rule| rule_matches(rule, &self.id.namespace, req, non_http))
    }
}

fn rule_matches(rule: &Rule, policy_ns: &str, req: &Request<'_>, non_http: NonHttp) -> bool {
    if req.http.is_none() && non_http == NonHttp::SkipRule && rule.has_http_fields() {
        return false;
    }
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, policy_ns, req.source)))
        && (rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, req)))
        && rule.when.iter().all(|c| condition_matches(c, req))
}

fn source_matches(source: &Source, policy_ns: &str, peer: Option<&Peer>) -> bool {
    // A positive list needs a peer with a matching entry; a negative one no matching entry.
    fn any<T>(list: &[T], peer: Option<&Peer>, f: impl Fn(&T, &Peer) -> bool) -> bool {
        list.is_empty() || peer.is_some_and(|p| list.iter().any(|x| f(x, p)))
    }
    fn none<T>(list: &[T], peer: Option<&Peer>, f: impl Fn(&T, &Peer) -> bool) -> bool {
        peer.is_none_or(|p| !list.iter().any(|x| f(x, p)))
    }
    let namespace = |pattern: &Pattern, p: &Peer| pattern.matches(&p.namespace);
    let principal = |pattern: &Pattern, p: &Peer| pattern.matches(&p.principal);
    any(&source.namespaces, peer, namespace)
        && none(&source.not_namespaces, peer, namespace)
        && any(&source.service_accounts, peer, |sa, p| {
            let namespace_ok = sa.namespace.as_ref().map_or(p.namespace == policy_ns, |n| n.matches(&p.namespace));
            namespace_ok && sa.name.matches(&p.service_account)
        })
        && any(&source.principals, peer, principal)
        && none(&source.not_principals, peer, principal)
}

/// Without HTTP, the HTTP-only fields count as matching (rules that must not be judged that
/// way were skipped by the caller).
fn operation_matches(op: &Operation, req: &Request<'_>) -> bool {
    if !op.ports.is_empty() && !op.ports.contains(&req.port) {
        return false;
    }
    let Some(http) = &req.http else { return true };
    (op.methods.is_empty() || op.methods.iter().any(|m| m == http.method))
        && !op.not_methods.iter().any(|m| m == http.method)
        && (op.paths.is_empty() || op.paths.iter().any(|p| p.matches(http.path)))
        && !op.not_paths.iter().any(|p| p.matches(http.path))
        && (op.hosts.is_empty() || http.host.is_some_and(|host| op.hosts.iter().any(|p| host_matches(p, host))))
        && op.headers.iter().all(|(name, p)| (http.header)(name).is_some_and(|v| p.matches(v)))
}

/// Case-insensitive; a host with a port also matches patterns written without one.
fn host_matches(pattern: &Pattern, host: &str) -> bool {
    if pattern.matches_ignore_case(host) {
        return true;
    }
    let without_port = host
        .rsplit_once(':')
        .filter(|(name, port)| !name.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .map(|(name, _)| name);
    without_port.is_some_and(|name| pattern.matches_ignore_case(name))
}

fn condition_matches(condition: &Condition, req: &Request<'_>) -> bool {
    if req.http.is_none() && condition.key.is_http_only() {
        return true;
    }
    let any_of = |patterns: &[Pattern]| {
        visit(&condition.key, req, &mut |parts| patterns.iter().any(|p| p.matches_concat(parts)))
    };
    (condition.values.is_empty() || any_of(&condition.values))
        && (condition.not_values.is_empty() || !any_of(&condition.not_values))
}

/// Calls `f` with each value of the attribute `key` (as parts to concatenate) until it returns
/// true; false if the attribute is absent or no value made `f` true.
fn visit(key: &ConditionKey, req: &Request<'_>, f: &mut dyn FnMut(&[&str]) -> bool) -> bool {
    let http = req.http.as_ref();
    let claims = http.and_then(|h| h.claims);
    let claim_str = |name: &str| claims.and_then(|c| c.get(name)).and_then(Value::as_str);
    match key {
        ConditionKey::RequestHeader(name) => http.and_then(|h| (h.header)(name)).is_some_and(|v| f(&[v])),
        ConditionKey::AuthPrincipal => match (claim_str("iss"), claim_str("sub")) {
            (Some(iss), Some(sub)) => f(&[iss, "/", sub]),
            _ => false,
        },
        ConditionKey::AuthAudiences => claims.and_then(|c| c.get("aud")).is_some_and(|aud| visit_strings(aud, f)),
        ConditionKey::AuthPresenter => claim_str("azp").is_some_and(|v| f(&[v])),
        ConditionKey::AuthIssuer => claim_str("iss").is_some_and(|v| f(&[v])),
        ConditionKey::AuthClaim(path) => {
            let Some((first, rest)) = path.split_first() else { return false };
            let mut value = claims.and_then(|c| c.get(first));
            for segment in rest {
                value = value.and_then(Value::as_object).and_then(|o| o.get(segment));
            }
            value.is_some_and(|v| visit_strings(v, f))
        }
        ConditionKey::SourceNamespace => req.source.is_some_and(|p| f(&[&p.namespace])),
        ConditionKey::SourcePrincipal => req.source.is_some_and(|p| f(&[&p.principal])),
        ConditionKey::DestinationPort => {
            let mut digits = [0_u8; 5];
            f(&[port_text(req.port, &mut digits)])
        }
    }
}

/// A string, or each string of a list.
fn visit_strings(value: &Value, f: &mut dyn FnMut(&[&str]) -> bool) -> bool {
    match value {
        Value::String(s) => f(&[s]),
        Value::Array(items) => items.iter().filter_map(Value::as_str).any(|s| f(&[s])),
        _ => false,
    }
}

/// The decimal text of `port`, written into `buf`.
fn port_text(port: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = port;
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[start..]).unwrap_or_default()
}

/// A request path made safe to match: percent-encoded unreserved characters decoded and dot
/// segments removed (RFC 3986 §2.3, §5.2.4), so `/./admin` and `/%61dmin` are `/admin`.
/// `None` for paths the proxy should refuse (400): not starting with `/`, or with an encoded
/// `/` or `\`, which backends disagree about. Borrows when nothing changes.
pub fn normalize_path(path: &str) -> Option<Cow<'_, str>> {
    if !path.starts_with('/') {
        return None;
    }
    let dot_segment = path.split('/').any(|s| s == "." || s == "..");
    if !path.contains('%') && !dot_segment {
        return Some(Cow::Borrowed(path));
    }
    // Percent-decoding of unreserved characters only; other escapes stay as they are.
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            match byte {
                Some(b'/' | b'\\') => return None,
                Some(b) if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                    decoded.push(char::from(b));
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        // Byte-wise copy of valid UTF-8 (only ASCII escapes were replaced above).
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        decoded.push_str(&path[i..i + len]);
        i += len;
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut parts = decoded.split('/').skip(1).peekable();
    while let Some(segment) = parts.next() {
        let last = parts.peek().is_none();
        match segment {
            "." if last => segments.push(""),
            "." => {}
            ".." => {
                segments.pop();
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(Cow::Owned(out))
}

// === dump ===

impl Serialize for AuthzTable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            semantics: &'static str,
            policies: &'a [Entry],
            jwt_policies: &'a [JwtPolicy],
            /// "10.96.0.10:80" -> who selects it.
            services: BTreeMap<String, SelectionView<'a>>,
            /// "ns/name" -> who selects it.
            workloads: BTreeMap<String, SelectionView<'a>>,
            /// Service ports handed to the proxy because a selector selects a backend.
            selector_backed: BTreeMap<String, SelectionView<'a>>,
        }
        View {
            semantics: SEMANTICS,
            policies: &self.policies,
            jwt_policies: &self.jwt,
            services: self.views_by_addr(&self.services),
            workloads: self.workloads.iter().map(|(id, s)| (id.to_string(), self.view(s, None))).collect(),
            selector_backed: self.views_by_addr(&self.backed),
        }
        .serialize(s)
    }
}

#[derive(Serialize)]
struct SelectionView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'a ObjectRef>,
    deny: Vec<String>,
    allow: Vec<String>,
    jwt: Vec<String>,
    /// Decided per HTTP request by the proxy.
    l7: bool,
}

impl AuthzTable {
    fn view<'a>(&'a self, s: &'a Selection, port: Option<u16>) -> SelectionView<'a> {
        SelectionView {
            service: s.service.as_ref(),
            deny: s.deny.iter().map(|&i| self.policies[i].id.to_string()).collect(),
            allow: s.allow.iter().map(|&i| self.policies[i].id.to_string()).collect(),
            jwt: s.jwt.iter().map(|&i| self.jwt[i].id.to_string()).collect(),
            l7: self.is_l7(s, port),
        }
    }

    fn views_by_addr<'a>(&'a self, map: &'a BTreeMap<SocketAddrV4, Selection>) -> BTreeMap<String, SelectionView<'a>> {
        map.iter().map(|(addr, s)| (addr.to_string(), self.view(s, Some(addr.port())))).collect()
    }

    /// Whether requests to `port` (any port: `None`) of what `s` describes are judged per
    /// request: a JwtPolicy selects it, or a policy has a rule with HTTP-only fields that can
    /// apply to the port.
    fn is_l7(&self, s: &Selection, port: Option<u16>) -> bool {
        !s.jwt.is_empty() || s.deny.iter().chain(&s.allow).any(|&i| self.policies[i].http_at(port))
    }
}

#[cfg(test)]
mod tests;
