//! Authorization and JWT authentication: who may send what to a destination.
//!
//! Shaped after Istio's `AuthorizationPolicy` / `RequestAuthentication` and Gateway API GEP-3779.
//! Values written with `*` are [`Pattern`]s, parsed once at the edge; the evaluator in
//! [`crate::authz`] matches them without allocating.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ObjectRef, duration_text};

/// Serializes a type as its `Display` text and reads it back with `FromStr`, so dumps and
/// snapshots show `"/api/*"` rather than `{"Prefix": "/api/"}`.
macro_rules! text_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// One target of an AuthorizationPolicy (the model gives each policy a single target; a CRD
/// with several becomes several policies with the same id).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub id: ObjectRef,
    pub target: PolicyTarget,
    pub action: Action,
    /// ALLOW: a request matching any rule is allowed. DENY: a request matching any rule is
    /// denied. No rules: the policy matches nothing (an ALLOW policy then allows nothing).
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether any rule needs the request parsed as HTTP (see [`Rule::has_http_fields`]).
    pub fn has_http_fields(&self) -> bool {
        self.rules.iter().any(Rule::has_http_fields)
    }
}

/// What a policy protects, in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// A service, by name: every TCP port of its clusterIP.
    Service(String),
    /// Every service and every workload in the namespace.
    Namespace,
    /// The workloads (destination pods) whose labels include all of these; never empty.
    Selector(BTreeMap<String, String>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        })
    }
}

/// Matches a request when every section it has matches: `from` (any entry), `to` (any entry)
/// and `when` (every condition). An empty section matches everything; an empty rule matches
/// every request.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(from = "RuleWire")]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule reads anything only an HTTP request has: methods, paths, hosts or
    /// headers in `to`, or a `request.*` condition. Such rules are enforced by the node proxy.
    pub fn has_http_fields(&self) -> bool {
        self.to.iter().any(Operation::has_http_fields) || self.when.iter().any(|c| c.key.is_http_only())
    }
}

/// Reads rules as written now and as written before `to` held operations (`to_ports`, the
/// ports of every `to` entry flattened, which meant the same as one operation with them).
#[derive(Deserialize)]
struct RuleWire {
    #[serde(default)]
    from: Vec<Source>,
    #[serde(default)]
    to: Vec<Operation>,
    #[serde(default)]
    to_ports: Vec<u16>,
    #[serde(default)]
    when: Vec<Condition>,
}

impl From<RuleWire> for Rule {
    fn from(wire: RuleWire) -> Self {
        let mut to = wire.to;
        if !wire.to_ports.is_empty() {
            to.push(Operation { ports: wire.to_ports, ..Operation::default() });
        }
        Rule { from: wire.from, to, when: wire.when }
    }
}

/// Matches a source when every non-empty list matches: a positive list when any entry matches,
/// a `not_` list when none does. A source without an identity (plaintext, or not a meshed
/// workload) matches no positive list and every `not_` list.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(default)]
pub struct Source {
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub service_accounts: Vec<ServiceAccountPattern>,
    /// SPIFFE ids, `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
}

/// Matches a request when every non-empty list matches. `ports` are service ports (the port of
/// the clusterIP the client dialed), as at L4; everything else is HTTP-only.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(default)]
pub struct Operation {
    pub ports: Vec<u16>,
    /// Upper case, compared exactly ("GET").
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// The path without the query string, after normalization (see
    /// [`crate::authz::normalize_path`]); `/api/*` matches `/api/x` but not `/api`.
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
    /// The Host (`:authority`), case-insensitive; a pattern without a port also matches the
    /// host with any port.
    pub hosts: Vec<Pattern>,
    /// Lower-case header name -> the pattern its (first) value must match; an absent header
    /// does not match.
    pub headers: BTreeMap<String, Pattern>,
}

impl Operation {
    pub fn has_http_fields(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.headers.is_empty())
    }
}

/// Holds when the attribute named by `key` matches any of `values` (if any are given) and none
/// of `not_values`. An attribute the request lacks (no token, no such header or claim) matches
/// no value, so it fails `values` and passes `not_values`. A multi-valued attribute (a claim
/// that is a list, the audiences) matches when any of its items does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Condition {
    pub key: ConditionKey,
    #[serde(default)]
    pub values: Vec<Pattern>,
    #[serde(default)]
    pub not_values: Vec<Pattern>,
}

/// The attribute a [`Condition`] reads, written as Istio writes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConditionKey {
    /// `request.headers[<name>]`: the header's first value; the name is lower case.
    RequestHeader(String),
    /// `request.auth.principal`: `<iss>/<sub>` of the verified JWT.
    AuthPrincipal,
    /// `request.auth.audiences`: the JWT's `aud` (a string or each item of a list).
    AuthAudiences,
    /// `request.auth.presenter`: the JWT's `azp`.
    AuthPresenter,
    /// `request.auth.issuer`: the JWT's `iss` (weft's addition; Istio spells it via
    /// `request.auth.claims[iss]`).
    AuthIssuer,
    /// `request.auth.claims[<name>]`, or `[a][b]` for a claim nested in an object. Only string
    /// claims and lists of strings match; other JSON values never do.
    AuthClaim(Vec<String>),
    /// `source.namespace` of the peer's identity.
    SourceNamespace,
    /// `source.principal`: the peer's SPIFFE id.
    SourcePrincipal,
    /// `destination.port`: the service port; values are port numbers.
    DestinationPort,
}

/// The keys [`ConditionKey::from_str`] accepts, for error messages.
pub const CONDITION_KEYS: &str = "request.headers[<name>], request.auth.principal, request.auth.audiences, \
    request.auth.presenter, request.auth.issuer, request.auth.claims[<name>] (nested: [<a>][<b>]), \
    source.namespace, source.principal, destination.port";

impl ConditionKey {
    /// Whether only an HTTP request has this attribute (JWT claims arrive in HTTP headers).
    pub fn is_http_only(&self) -> bool {
        !matches!(self, ConditionKey::SourceNamespace | ConditionKey::SourcePrincipal | ConditionKey::DestinationPort)
    }
}

impl FromStr for ConditionKey {
    type Err = String;

    fn from_str(key: &str) -> Result<Self, String> {
        let unknown = || format!("unknown key \"{key}\"; use one of {CONDITION_KEYS}");
        let simple = match key {
            "request.auth.principal" => Some(ConditionKey::AuthPrincipal),
            "request.auth.audiences" => Some(ConditionKey::AuthAudiences),
            "request.auth.presenter" => Some(ConditionKey::AuthPresenter),
            "request.auth.issuer" => Some(ConditionKey::AuthIssuer),
            "source.namespace" => Some(ConditionKey::SourceNamespace),
            "source.principal" => Some(ConditionKey::SourcePrincipal),
            "destination.port" => Some(ConditionKey::DestinationPort),
            _ => None,
        };
        if let Some(simple) = simple {
            return Ok(simple);
        }
        if let Some(rest) = key.strip_prefix("request.headers") {
            let segments = bracketed(rest).ok_or_else(unknown)?;
            let [name] = segments.as_slice() else {
                return Err(format!("\"{key}\" names more than one header; write request.headers[<name>]"));
            };
            let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if !name.chars().all(token) {
                return Err(format!("\"{name}\" in \"{key}\" is not a header name"));
            }
            return Ok(ConditionKey::RequestHeader(name.to_ascii_lowercase()));
        }
        if let Some(rest) = key.strip_prefix("request.auth.claims") {
            let segments = bracketed(rest).ok_or_else(unknown)?;
            return Ok(ConditionKey::AuthClaim(segments));
        }
        Err(unknown())
    }
}

/// `[a][b]` -> ["a", "b"]; `None` unless the text is one or more non-empty bracketed names.
fn bracketed(mut text: &str) -> Option<Vec<String>> {
    let mut segments = Vec::new();
    while !text.is_empty() {
        let (segment, rest) = text.strip_prefix('[')?.split_once(']')?;
        if segment.is_empty() || segment.contains('[') {
            return None;
        }
        segments.push(segment.to_owned());
        text = rest;
    }
    (!segments.is_empty()).then_some(segments)
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConditionKey::RequestHeader(name) => write!(f, "request.headers[{name}]"),
            ConditionKey::AuthPrincipal => f.write_str("request.auth.principal"),
            ConditionKey::AuthAudiences => f.write_str("request.auth.audiences"),
            ConditionKey::AuthPresenter => f.write_str("request.auth.presenter"),
            ConditionKey::AuthIssuer => f.write_str("request.auth.issuer"),
            ConditionKey::AuthClaim(path) => {
                f.write_str("request.auth.claims")?;
                path.iter().try_for_each(|segment| write!(f, "[{segment}]"))
            }
            ConditionKey::SourceNamespace => f.write_str("source.namespace"),
            ConditionKey::SourcePrincipal => f.write_str("source.principal"),
            ConditionKey::DestinationPort => f.write_str("destination.port"),
        }
    }
}

text_serde!(ConditionKey);

/// An Istio-style string match, written as text: `abc` exactly, `abc*` a prefix, `*abc` a
/// suffix, `*` any non-empty value. A `*` anywhere else is an error rather than a literal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Present and not empty.
    Any,
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let pattern = match text {
            "" => {
                return Err("empty; write a value, \"prefix*\", \"*suffix\" or \"*\" for any value".into());
            }
            "*" => Pattern::Any,
            _ => match (text.strip_prefix('*'), text.strip_suffix('*')) {
                (Some(_), Some(_)) => {
                    return Err(format!("\"{text}\" has a \"*\" at both ends; use \"prefix*\" or \"*suffix\""));
                }
                (Some(suffix), None) => Pattern::Suffix(suffix.to_owned()),
                (None, Some(prefix)) => Pattern::Prefix(prefix.to_owned()),
                (None, None) => Pattern::Exact(text.to_owned()),
            },
        };
        if let Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) = &pattern
            && s.contains('*')
        {
            let message = format!("\"{text}\": a \"*\" may only start or end a value (a suffix or prefix match)");
            return Err(message);
        }
        Ok(pattern)
    }
}

impl Pattern {
    pub fn matches(&self, value: &str) -> bool {
        self.matches_concat(&[value])
    }

    /// Whether the concatenation of `parts` matches, without building it.
    pub fn matches_concat(&self, parts: &[&str]) -> bool {
        let bytes = || parts.iter().flat_map(|p| p.bytes());
        let len: usize = parts.iter().map(|p| p.len()).sum();
        match self {
            Pattern::Exact(s) => len == s.len() && bytes().eq(s.bytes()),
            Pattern::Prefix(s) => len >= s.len() && bytes().zip(s.bytes()).all(|(a, b)| a == b),
            Pattern::Suffix(s) => {
                let reversed = parts.iter().rev().flat_map(|p| p.bytes().rev());
                len >= s.len() && reversed.zip(s.bytes().rev()).all(|(a, b)| a == b)
            }
            Pattern::Any => len > 0,
        }
    }

    /// ASCII case-insensitive, for host names.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let (v, eq) = (value.as_bytes(), |a: &[u8], b: &str| a.eq_ignore_ascii_case(b.as_bytes()));
        match self {
            Pattern::Exact(s) => eq(v, s),
            Pattern::Prefix(s) => v.len() >= s.len() && eq(&v[..s.len()], s),
            Pattern::Suffix(s) => v.len() >= s.len() && eq(&v[v.len() - s.len()..], s),
            Pattern::Any => !v.is_empty(),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(s) => f.write_str(s),
            Pattern::Prefix(s) => write!(f, "{s}*"),
            Pattern::Suffix(s) => write!(f, "*{s}"),
            Pattern::Any => f.write_str("*"),
        }
    }
}

text_serde!(Pattern);

/// `namespace/name` or `name` (in the policy's namespace); either half may be a [`Pattern`],
/// e.g. `prod/*` for every service account in prod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccountPattern {
    /// `None`: the policy's namespace.
    pub namespace: Option<Pattern>,
    pub name: Pattern,
}

impl FromStr for ServiceAccountPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((_, name)) if name.contains('/') => {
                Err(format!("\"{text}\" has more than one \"/\"; write \"namespace/name\" or \"name\""))
            }
            Some((namespace, name)) => Ok(Self { namespace: Some(namespace.parse()?), name: name.parse()? }),
            None => Ok(Self { namespace: None, name: text.parse()? }),
        }
    }
}

impl fmt::Display for ServiceAccountPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{namespace}/{}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

text_serde!(ServiceAccountPattern);

/// JWT authentication for requests to its targets: a token found in a rule's locations is
/// verified by the rule for the token's issuer, and its claims feed AuthorizationPolicy `when`
/// conditions. Several JwtPolicies selecting one destination pool their rules.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JwtPolicy {
    pub id: ObjectRef,
    /// Never empty.
    pub targets: Vec<PolicyTarget>,
    pub rules: Vec<JwtRule>,
}

/// One issuer a destination accepts tokens from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JwtRule {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must name one of these; empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// Where the token is looked for, in order, before `from_params`.
    #[serde(default = "default_token_headers")]
    pub from_headers: Vec<TokenHeader>,
    /// Query parameters holding the token.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// A request without a token is refused (401); otherwise it goes on without claims.
    #[serde(default)]
    pub required: bool,
    /// Claims whose string value is a space-separated list, matched item by item (the
    /// verifier turns them into lists); `scope` and `permission` always are.
    #[serde(default)]
    pub space_delimited_claims: Vec<String>,
}

impl JwtRule {
    /// A rule with the default token location (`Authorization: Bearer <token>`), not required.
    pub fn new(issuer: impl Into<String>, jwks: JwksSource) -> Self {
        Self {
            issuer: issuer.into(),
            audiences: Vec::new(),
            jwks,
            from_headers: default_token_headers(),
            from_params: Vec::new(),
            required: false,
            space_delimited_claims: Vec::new(),
        }
    }
}

/// Claims that are space-separated lists in every rule (OAuth 2.0 `scope`, RFC 8693 §4.2).
pub const SPACE_DELIMITED_CLAIMS: [&str; 2] = ["scope", "permission"];

/// How long a fetched JWKS is used before it is fetched again, when a rule gives no interval.
/// Five minutes: key rotations reach the proxy quickly, at one small request per issuer and
/// node every few minutes.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JwksSource {
    /// The JWKS document itself (JSON).
    Inline(String),
    /// Fetched (by the proxy) from this http(s) URL, again every `refresh_interval`.
    Uri {
        uri: String,
        #[serde(with = "duration_text::required")]
        refresh_interval: Duration,
    },
}

/// A header that carries the token, after `prefix` (e.g. `Bearer `, matched ignoring case).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenHeader {
    /// Lower case.
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

/// `Authorization: Bearer <token>`.
pub fn default_token_headers() -> Vec<TokenHeader> {
    vec![TokenHeader { name: "authorization".into(), prefix: "Bearer ".into() }]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("/api/*", "/api/x", true),
            ("/api/*", "/api/", true),
            ("/api/*", "/api", false),
            ("*.local", "a.cluster.local", true),
            ("*.local", "local", false),
            ("*", "x", true),
            ("*", "", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for &(pattern, value, want) in cases {
            let p: Pattern = pattern.parse().unwrap();
            assert_eq!(p.matches(value), want, "{pattern} vs {value}");
            assert_eq!(p.to_string(), pattern);
        }
        for bad in ["", "a*b", "*a*", "**"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn concatenation_matches_like_the_joined_string() {
        let parts = ["https://issuer", "/", "alice"];
        let joined = parts.concat();
        for pattern in ["https://issuer/alice", "https://iss*", "*/alice", "*r/al*", "*", "https://issuer/alic"] {
            let Ok(p) = pattern.parse::<Pattern>() else { continue };
            assert_eq!(p.matches_concat(&parts), p.matches(&joined), "{pattern}");
        }
    }

    #[test]
    fn condition_keys_round_trip_and_unknown_ones_are_named() {
        for key in [
            "request.headers[x-user]",
            "request.auth.claims[groups]",
            "request.auth.claims[realm_access][roles]",
            "request.auth.principal",
            "source.namespace",
            "destination.port",
        ] {
            assert_eq!(key.parse::<ConditionKey>().unwrap().to_string(), key);
        }
        assert_eq!("request.headers[X-User]".parse::<ConditionKey>().unwrap().to_string(), "request.headers[x-user]");
        let err = "request.auth.claim[groups]".parse::<ConditionKey>().unwrap_err();
        assert!(err.starts_with("unknown key \"request.auth.claim[groups]\"; use one of request.headers"), "{err}");
        assert!("request.auth.claims[]".parse::<ConditionKey>().is_err());
        assert!("request.headers[a][b]".parse::<ConditionKey>().is_err());
    }

    #[test]
    fn old_rules_with_to_ports_still_read() {
        let rule: Rule = serde_json::from_str(r#"{"from": [], "to_ports": [80, 8080]}"#).unwrap();
        assert_eq!(rule.to, vec![Operation { ports: vec![80, 8080], ..Operation::default() }]);
        let json = serde_json::to_value(Rule { to: rule.to.clone(), ..Rule::default() }).unwrap();
        assert_eq!(serde_json::from_value::<Rule>(json).unwrap(), rule);
    }
}
