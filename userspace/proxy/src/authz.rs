//! authorize: the phase between detect and route. AuthorizationPolicies and JwtPolicies from
//! the compiled config ([`AuthzTable`]), judged per request on HTTP (path normalised first, the
//! token verified, claims fed to `when`) and once per connection on opaque TCP.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
    sync::Arc,
    time::SystemTime,
};

use http::{StatusCode, Uri};
use weft_policy::{
    AuthzTable, Compiled, JwksSource, JwtRule, ObjectRef,
    authz::{Decision, Destination, HttpRequest, Peer, Request, TRUST_DOMAIN, normalize_path},
};

use crate::{
    jwks::{Fetchers, Remote},
    jwt::{self, JwkSet, JwtError, JwtVerifier},
};

/// The authorization state of one config: its table and the keys of each JwtPolicy rule.
#[derive(Default)]
pub struct Authz {
    table: Arc<AuthzTable>,
    /// By (JwtPolicy, rule index).
    rules: HashMap<(ObjectRef, usize), RuleKeys>,
}

struct RuleKeys {
    rule: Arc<JwtRule>,
    keys: Keys,
}

enum Keys {
    /// Parsed once per config; `Err` says why the rule has none.
    Inline(Result<Arc<JwkSet>, String>),
    /// Whatever its fetcher last got.
    Remote(Arc<Remote>),
}

/// Why a request or connection was refused: the answer, the metric label and the log reason.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    /// `authz` (a policy's verdict), `jwt` (the token) or `path` (not normalisable).
    pub kind: &'static str,
    /// `denied_by_policy`, `no_allow_match`, `bad_path`, or the token's problem (`expired`...).
    pub label: &'static str,
    pub policy: Option<ObjectRef>,
    pub reason: String,
}

/// What an allowed request carries on: its path normalised when that changed it.
pub struct Admitted {
    pub policy: Option<ObjectRef>,
    pub uri: Option<Uri>,
}

impl Authz {
    /// The config's authorization; the rules' `jwksUri`s become exactly the ones `fetchers` fetch.
    pub fn build(compiled: &Compiled, fetchers: &Fetchers) -> Authz {
        let table = Arc::new(compiled.authz.clone());
        // One fetcher per URI, at the shortest interval any rule naming it asks for.
        let mut wanted = BTreeMap::new();
        for rule in table.jwt_policies().iter().flat_map(|p| &p.rules) {
            if let JwksSource::Uri { uri, refresh_interval } = &rule.jwks {
                let interval = wanted.entry(uri.clone()).or_insert(*refresh_interval);
                *interval = (*interval).min(*refresh_interval);
            }
        }
        let remotes = fetchers.sync(&wanted);
        let mut rules = HashMap::new();
        for policy in table.jwt_policies() {
            for (index, rule) in policy.rules.iter().enumerate() {
                let keys = match &rule.jwks {
                    JwksSource::Inline(jwks) => {
                        let keys = JwkSet::parse(jwks).map(Arc::new).map_err(|e| {
                            tracing::warn!(policy = %policy.id, rule = index, error = %e, "JwtPolicy rule has no usable keys; its tokens are refused");
                            format!("JwtPolicy {} rule {index}: unusable JWKS: {e}", policy.id)
                        });
                        Keys::Inline(keys)
                    }
                    JwksSource::Uri { uri, .. } => match remotes.get(uri) {
                        Some(remote) => Keys::Remote(remote.clone()),
                        None => {
                            Keys::Inline(Err(format!("JwtPolicy {} rule {index}: no fetcher for {uri}", policy.id)))
                        }
                    },
                };
                rules.insert((policy.id.clone(), index), RuleKeys { rule: Arc::new(rule.clone()), keys });
            }
        }
        Authz { table, rules }
    }

    /// The verdict on one HTTP request from `peer` to the service at `dst`.
    pub fn check_request(&self, dst: SocketAddrV4, peer: Option<&Peer>, req: &http::Request<impl Sized>) -> Result<Admitted, Refusal> {
        self.check_http(&Destination { service: Some(dst), workload: None }, dst.port(), peer, req)
    }

    /// The verdict on one HTTP request arriving through the tunnel for `workload` on `port`:
    /// the workload's own policies (selector and namespace targets), judged where it runs.
    pub fn check_workload_request(&self, workload: &ObjectRef, port: u16, peer: Option<&Peer>, req: &http::Request<impl Sized>) -> Result<Admitted, Refusal> {
        self.check_http(&Destination { service: None, workload: Some(workload) }, port, peer, req)
    }

    /// Whether any policy selects the workload itself (selector or namespace targets).
    pub fn selects_workload(&self, workload: &ObjectRef) -> bool {
        self.table.selects(&Destination { service: None, workload: Some(workload) })
    }

    /// Whether the workload's policies read requests (HTTP-only fields, JwtPolicies), so a
    /// stream to it is served as HTTP rather than judged once as a connection.
    pub fn workload_needs_http(&self, workload: &ObjectRef) -> bool {
        self.table.needs_l7(&Destination { service: None, workload: Some(workload) })
    }

    fn check_http(&self, dest: &Destination<'_>, port: u16, peer: Option<&Peer>, req: &http::Request<impl Sized>) -> Result<Admitted, Refusal> {
        if !self.table.selects(dest) {
            return Ok(Admitted { policy: None, uri: None });
        }
        let raw = req.uri().path();
        let Some(path) = normalize_path(raw) else {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                kind: "path",
                label: "bad_path",
                policy: None,
                reason: format!("path {raw} has an encoded / or \\, which weft refuses where policies apply"),
            });
        };
        let headers = req.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let claims = self.authenticate(dest, &header, req.uri().query())?;
        let host = header("host").or_else(|| req.uri().authority().map(|a| a.as_str()));
        let http = HttpRequest { method: req.method().as_str(), path: &path, host, header: &header, claims: claims.as_ref() };
        let request = Request { source: peer, port, http: Some(http) };
        let policy = admit(self.table.evaluate(dest, &request))?;
        let uri = match &path {
            std::borrow::Cow::Owned(normalized) => with_path(req.uri(), normalized),
            std::borrow::Cow::Borrowed(_) => None,
        };
        Ok(Admitted { policy, uri })
    }

    /// The verdict on an opaque TCP connection (HTTP-only rule fields as Istio treats them).
    pub fn check_connection(&self, dst: SocketAddrV4, peer: Option<&Peer>) -> Result<Option<ObjectRef>, Refusal> {
        let dest = Destination { service: Some(dst), workload: None };
        admit(self.table.evaluate(&dest, &Request { source: peer, port: dst.port(), http: None }))
    }

    /// A connection arriving through the tunnel for `workload`: the service the client dialled
    /// is not known here (the source node judged the service's policies), the workload is.
    pub fn check_workload_connection(&self, workload: &ObjectRef, port: u16, peer: Option<&Peer>) -> Result<Option<ObjectRef>, Refusal> {
        let dest = Destination { service: None, workload: Some(workload) };
        admit(self.table.evaluate(&dest, &Request { source: peer, port, http: None }))
    }

    fn authenticate<'a>(
        &self,
        dest: &Destination<'_>,
        header: &impl Fn(&str) -> Option<&'a str>,
        query: Option<&'a str>,
    ) -> Result<Option<jwt::Claims>, Refusal> {
        // Each rule with its keys as they are now. A rule without keys refuses the tokens of its
        // issuer (fail closed) and leaves the other issuers' tokens to their rules.
        let mut verifiers = Vec::new();
        let mut remotes = Vec::new();
        for rule in self.table.jwt_rules(dest) {
            let Some(entry) = self.rules.get(&(rule.policy.clone(), rule.index)) else { continue };
            let keys = match &entry.keys {
                Keys::Inline(keys) => keys.clone(),
                Keys::Remote(remote) => {
                    remotes.push(remote);
                    remote.keys().map_err(|why| format!("JwtPolicy {} rule {}: {why}", rule.policy, rule.index))
                }
            };
            verifiers.push(JwtVerifier::with_keys(entry.rule.clone(), keys));
        }
        if verifiers.is_empty() {
            return Ok(None);
        }
        let verifiers: Vec<&JwtVerifier> = verifiers.iter().collect();
        let result = jwt::authenticate(&verifiers, header, query, SystemTime::now());
        if let Err(JwtError::UnknownKid | JwtError::NoKeys(_)) = &result {
            // The issuer may have rotated its keys, or be back: fetch again soon (rate-limited).
            remotes.iter().for_each(|r| r.refetch_soon());
        }
        result.map_err(|e| Refusal {
            status: StatusCode::UNAUTHORIZED,
            kind: "jwt",
            label: e.label(),
            policy: None,
            reason: e.to_string(),
        })
    }
}

fn admit(decision: Decision) -> Result<Option<ObjectRef>, Refusal> {
    let label = decision.label();
    match decision {
        Decision::Allow { policy } => Ok(policy.map(|p| (*p).clone())),
        Decision::Deny { policy, reason } => {
            Err(Refusal { status: StatusCode::FORBIDDEN, kind: "authz", label, policy: policy.map(|p| (*p).clone()), reason })
        }
    }
}

/// `uri` with its path replaced (query kept).
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Marks a refusal's answer: the reason in `x-weft-reason` and, for a token problem, the
/// `WWW-Authenticate` challenge. Used by the node proxy and by the tunnel's accepting end.
pub fn mark_refusal(headers: &mut http::HeaderMap, status: StatusCode, reason: &str) {
    if let Ok(value) = http::HeaderValue::from_str(reason) {
        headers.insert(crate::tunnel::REASON_HEADER, value);
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
}

/// A source workload as policies see it, from the compiled names.
pub fn peer(namespace: &str, service_account: &str) -> Peer {
    Peer::new(namespace, service_account, TRUST_DOMAIN)
}
