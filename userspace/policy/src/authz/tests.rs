#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::compile::compile;
use crate::model::*;

const VIP: &str = "10.96.0.10";

fn id(name: &str) -> ObjectRef {
    ObjectRef::new("default", name)
}

fn p(s: &str) -> Pattern {
    s.parse().unwrap()
}

fn patterns(list: &[&str]) -> Vec<Pattern> {
    list.iter().map(|s| p(s)).collect()
}

fn addr(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(VIP.parse().unwrap(), port)
}

fn workload(name: &str, version: &str, ip: &str) -> Workload {
    let mut w = Workload::new(id(name), vec![ip.parse().unwrap()]);
    w.labels = BTreeMap::from([("app".into(), "reviews".into()), ("version".into(), version.into())]);
    w
}

/// Service reviews (ports 80 and 81) backed by reviews-v1 and reviews-v2, plus `policies`.
fn table(policies: Vec<AuthorizationPolicy>) -> AuthzTable {
    let port = |n| ServicePort {
        name: None,
        port: n,
        target_port: TargetPort::Number(9080),
        protocol: Protocol::Tcp,
        app_protocol: None,
    };
    let snapshot = Snapshot {
        services: vec![Service {
            id: id("reviews"),
            cluster_ip: Some(VIP.parse().unwrap()),
            ports: vec![port(80), port(81)],
            selector: Some(BTreeMap::from([("app".into(), "reviews".into())])),
            l7: false,
        }],
        workloads: vec![workload("reviews-v1", "v1", "10.1.0.1"), workload("reviews-v2", "v2", "10.1.0.2")],
        policies,
        node: NodeSettings { proxy: Some("10.0.0.1:15001".parse().unwrap()), ..NodeSettings::default() },
        ..Snapshot::default()
    };
    let compiled = compile(&snapshot);
    assert_eq!(compiled.rejected, vec![]);
    compiled.authz
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy { id: id(name), target: PolicyTarget::Service("reviews".into()), action, rules }
}

fn peer(ns: &str, sa: &str) -> Peer {
    Peer::new(ns, sa, TRUST_DOMAIN)
}

/// One request of a table: `method: None` is an opaque TCP connection.
#[derive(Clone, Default)]
struct Req {
    source: Option<Peer>,
    port: u16,
    method: Option<&'static str>,
    path: &'static str,
    host: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    claims: Option<Claims>,
}

impl Req {
    fn http(source: Option<Peer>, method: &'static str, path: &'static str) -> Self {
        Req { source, port: 80, method: Some(method), path, ..Req::default() }
    }

    fn tcp(source: Option<Peer>) -> Self {
        Req { source, port: 80, ..Req::default() }
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }

    fn claims(mut self, claims: serde_json::Value) -> Self {
        self.claims = Some(claims.as_object().unwrap().clone());
        self
    }

    fn eval(&self, table: &AuthzTable, dest: &Destination<'_>) -> Decision {
        let header = |name: &str| self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
        let http = self.method.map(|method| HttpRequest {
            method,
            path: self.path,
            host: self.host,
            header: &header,
            claims: self.claims.as_ref(),
        });
        table.evaluate(dest, &Request { source: self.source.as_ref(), port: self.port, http })
    }
}

fn to_service() -> Destination<'static> {
    Destination { service: Some(addr(80)), workload: None }
}

fn allow(name: &str) -> Decision {
    Decision::Allow { policy: Some(Arc::new(id(name))) }
}

fn denied_by(name: &str) -> Decision {
    Decision::Deny { policy: Some(Arc::new(id(name))), reason: format!("denied by policy default/{name}") }
}

fn no_allow(names: &str) -> Decision {
    Decision::Deny { policy: None, reason: format!("no ALLOW policy matched; policies selecting it: {names}") }
}

fn op(f: impl FnOnce(&mut Operation)) -> Operation {
    let mut op = Operation::default();
    f(&mut op);
    op
}

fn when(key: &str, values: &[&str]) -> Condition {
    Condition { key: key.parse().unwrap(), values: patterns(values), not_values: vec![] }
}

/// The example set: readers of /api, gold members of /premium, no debug headers, and
/// no admin from prod.
fn bookstore() -> AuthzTable {
    table(vec![
        policy(
            "api-readers",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    principals: patterns(&["spiffe://cluster.local/ns/default/sa/frontend"]),
                    ..Source::default()
                }],
                to: vec![op(|o| {
                    o.methods = vec!["GET".into(), "HEAD".into()];
                    o.paths = patterns(&["/api/*"]);
                })],
                when: vec![],
            }],
        ),
        policy(
            "gold",
            Action::Allow,
            vec![Rule {
                to: vec![op(|o| o.paths = patterns(&["/premium/*"]))],
                when: vec![when("request.auth.claims[groups]", &["gold_member"])],
                ..Rule::default()
            }],
        ),
        policy(
            "no-debug",
            Action::Deny,
            vec![Rule {
                to: vec![op(|o| o.headers = BTreeMap::from([("x-debug".into(), p("*"))]))],
                ..Rule::default()
            }],
        ),
        policy(
            "no-prod-admin",
            Action::Deny,
            vec![Rule {
                from: vec![Source { namespaces: patterns(&["prod"]), ..Source::default() }],
                to: vec![op(|o| o.paths = patterns(&["/admin", "/admin/*"]))],
                ..Rule::default()
            }],
        ),
    ])
}

#[test]
fn identity_path_method_claim_matrix() {
    let table = bookstore();
    let frontend = || Some(peer("default", "frontend"));
    let prod = || Some(peer("prod", "frontend"));
    let batch = || Some(peer("default", "batch"));
    let none_matched = no_allow("default/api-readers, default/gold");
    let cases: Vec<(&str, Req, Decision)> = vec![
        ("reader GETs the API", Req::http(frontend(), "GET", "/api/books"), allow("api-readers")),
        ("HEAD is listed too", Req::http(frontend(), "HEAD", "/api/books"), allow("api-readers")),
        ("prefix /api/* includes /api/", Req::http(frontend(), "GET", "/api/"), allow("api-readers")),
        ("prefix /api/* excludes /api itself", Req::http(frontend(), "GET", "/api"), none_matched.clone()),
        ("POST is not allowed", Req::http(frontend(), "POST", "/api/books"), none_matched.clone()),
        ("another service account", Req::http(batch(), "GET", "/api/books"), none_matched.clone()),
        ("same account name, other namespace", Req::http(prod(), "GET", "/api/books"), none_matched.clone()),
        ("unidentified peer", Req::http(None, "GET", "/api/books"), none_matched.clone()),
        (
            "a debug header is denied even for an allowed reader",
            Req::http(frontend(), "GET", "/api/books").header("x-debug", "1"),
            denied_by("no-debug"),
        ),
        (
            "gold members (list claim) get premium",
            Req::http(None, "GET", "/premium/x").claims(json!({"groups": ["silver", "gold_member"]})),
            allow("gold"),
        ),
        (
            "a string claim equal to the value matches",
            Req::http(batch(), "GET", "/premium/x").claims(json!({"groups": "gold_member"})),
            allow("gold"),
        ),
        (
            "a space-separated string claim is one string (the verifier splits configured claims)",
            Req::http(batch(), "GET", "/premium/x").claims(json!({"groups": "silver gold_member"})),
            none_matched.clone(),
        ),
        (
            "non-string claim items never match",
            Req::http(batch(), "GET", "/premium/x").claims(json!({"groups": [1, true, {"gold_member": 1}]})),
            none_matched.clone(),
        ),
        ("no token, no claims", Req::http(batch(), "GET", "/premium/x"), none_matched.clone()),
        (
            "gold members only get premium",
            Req::http(batch(), "GET", "/api/books").claims(json!({"groups": ["gold_member"]})),
            none_matched.clone(),
        ),
        ("prod may not reach admin", Req::http(prod(), "GET", "/admin"), denied_by("no-prod-admin")),
        ("prod may not reach under admin", Req::http(prod(), "POST", "/admin/users"), denied_by("no-prod-admin")),
        (
            "default reaches admin's DENY check but no ALLOW",
            Req::http(frontend(), "GET", "/admin"),
            none_matched.clone(),
        ),
        // TCP: the ALLOW rules all have HTTP fields and never match; the no-debug DENY's only
        // field is HTTP-only, so it is ignored and the DENY covers the whole connection.
        ("opaque TCP fails closed", Req::tcp(frontend()), denied_by("no-debug")),
    ];
    for (name, req, want) in cases {
        assert_eq!(req.eval(&table, &to_service()), want, "{name}");
    }
}

#[test]
fn basics_table() {
    let everyone = || vec![Rule::default()];
    let cases: Vec<(&str, Vec<AuthorizationPolicy>, Decision)> = vec![
        ("no policy allows", vec![], Decision::Allow { policy: None }),
        ("an empty ALLOW rule allows all", vec![policy("all", Action::Allow, everyone())], allow("all")),
        ("ALLOW without rules allows nothing", vec![policy("none", Action::Allow, vec![])], no_allow("default/none")),
        (
            "DENY without rules denies nothing",
            vec![policy("none", Action::Deny, vec![])],
            Decision::Allow { policy: None },
        ),
        (
            "DENY wins over ALLOW (DENY sorts first)",
            vec![policy("a-deny", Action::Deny, everyone()), policy("b-allow", Action::Allow, everyone())],
            denied_by("a-deny"),
        ),
        (
            "DENY wins over ALLOW (ALLOW sorts first)",
            vec![policy("a-allow", Action::Allow, everyone()), policy("b-deny", Action::Deny, everyone())],
            denied_by("b-deny"),
        ),
        (
            "the first matching ALLOW by name is reported",
            vec![policy("b", Action::Allow, everyone()), policy("a", Action::Allow, everyone())],
            allow("a"),
        ),
        (
            "a policy on another service does not apply",
            vec![AuthorizationPolicy {
                target: PolicyTarget::Namespace,
                id: ObjectRef::new("prod", "elsewhere"),
                ..policy("x", Action::Deny, everyone())
            }],
            Decision::Allow { policy: None },
        ),
    ];
    for (name, policies, want) in cases {
        let req = Req::http(Some(peer("default", "frontend")), "GET", "/");
        assert_eq!(req.eval(&table(policies), &to_service()), want, "{name}");
    }
}

#[test]
fn source_wildcards_table() {
    let source = |f: fn(&mut Source)| {
        let mut s = Source::default();
        f(&mut s);
        s
    };
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Source, Vec<(Option<Peer>, bool)>)> = vec![
        (
            "namespace prefix",
            source(|s| s.namespaces = patterns(&["team-*"])),
            vec![(Some(peer("team-a", "x")), true), (Some(peer("teams", "x")), false), (None, false)],
        ),
        (
            "namespace suffix",
            source(|s| s.namespaces = patterns(&["*-staging"])),
            vec![(Some(peer("web-staging", "x")), true), (Some(peer("staging", "x")), false)],
        ),
        (
            "service account in the policy's namespace",
            source(|s| s.service_accounts = vec!["reader-*".parse().unwrap()]),
            vec![(Some(peer("default", "reader-1")), true), (Some(peer("prod", "reader-1")), false)],
        ),
        (
            "every service account of a namespace",
            source(|s| s.service_accounts = vec!["prod/*".parse().unwrap()]),
            vec![(Some(peer("prod", "anything")), true), (Some(peer("default", "anything")), false), (None, false)],
        ),
        (
            "one service account name in any namespace",
            source(|s| s.service_accounts = vec!["*/admin".parse().unwrap()]),
            vec![(Some(peer("a", "admin")), true), (Some(peer("b", "admin")), true), (Some(peer("a", "x")), false)],
        ),
        (
            "principal suffix",
            source(|s| s.principals = patterns(&["*/sa/admin"])),
            vec![(Some(peer("x", "admin")), true), (Some(peer("x", "sadmin")), false)],
        ),
        (
            "any identified peer",
            source(|s| s.principals = patterns(&["*"])),
            vec![(Some(peer("x", "y")), true), (None, false)],
        ),
        (
            "negatives: every identity but prod's, and peers without one",
            source(|s| s.not_namespaces = patterns(&["prod"])),
            vec![(Some(peer("default", "a")), true), (Some(peer("prod", "a")), false), (None, true)],
        ),
        (
            "positive and negative lists combine",
            source(|s| {
                s.namespaces = patterns(&["default"]);
                s.not_principals = patterns(&["*/sa/intruder"]);
            }),
            vec![(Some(peer("default", "a")), true), (Some(peer("default", "intruder")), false), (None, false)],
        ),
    ];
    for (name, source, peers) in cases {
        let table = table(vec![policy("p", Action::Allow, vec![Rule { from: vec![source], ..Rule::default() }])]);
        for (peer, want) in peers {
            let who = format!("{name}: {:?}", peer.as_ref().map(|p| &p.principal));
            let got = Req::http(peer, "GET", "/").eval(&table, &to_service());
            assert_eq!(got.is_allowed(), want, "{who}");
        }
    }
}

#[test]
fn destination_fields_table() {
    let rule_to = |o: Operation| vec![Rule { to: vec![o], ..Rule::default() }];
    let cases: Vec<(&str, Operation, Req, bool)> = vec![
        ("port", op(|o| o.ports = vec![81]), Req::http(None, "GET", "/"), false),
        ("port matches", op(|o| o.ports = vec![80]), Req::http(None, "GET", "/"), true),
        ("not method", op(|o| o.not_methods = vec!["DELETE".into()]), Req::http(None, "DELETE", "/"), false),
        ("not path", op(|o| o.not_paths = patterns(&["/healthz"])), Req::http(None, "GET", "/healthz"), false),
        ("not path, other path", op(|o| o.not_paths = patterns(&["/healthz"])), Req::http(None, "GET", "/x"), true),
        (
            "host ignores case",
            op(|o| o.hosts = patterns(&["reviews.default.svc.cluster.local"])),
            Req { host: Some("Reviews.Default.svc.cluster.local"), ..Req::http(None, "GET", "/") },
            true,
        ),
        (
            "host with a port matches a pattern without one",
            op(|o| o.hosts = patterns(&["reviews"])),
            Req { host: Some("reviews:9080"), ..Req::http(None, "GET", "/") },
            true,
        ),
        (
            "host suffix",
            op(|o| o.hosts = patterns(&["*.example.com"])),
            Req { host: Some("api.example.com"), ..Req::http(None, "GET", "/") },
            true,
        ),
        ("no host", op(|o| o.hosts = patterns(&["reviews"])), Req::http(None, "GET", "/"), false),
        (
            "header prefix",
            op(|o| o.headers = BTreeMap::from([("x-env".into(), p("prod-*"))])),
            Req::http(None, "GET", "/").header("x-env", "prod-eu"),
            true,
        ),
        (
            "header suffix",
            op(|o| o.headers = BTreeMap::from([("x-env".into(), p("*-eu"))])),
            Req::http(None, "GET", "/").header("x-env", "prod-us"),
            false,
        ),
        (
            "absent header",
            op(|o| o.headers = BTreeMap::from([("x-env".into(), p("*"))])),
            Req::http(None, "GET", "/"),
            false,
        ),
    ];
    for (name, operation, req, want) in cases {
        let table = table(vec![policy("p", Action::Allow, rule_to(operation))]);
        assert_eq!(req.eval(&table, &to_service()).is_allowed(), want, "{name}");
    }
}

#[test]
fn conditions_table() {
    let not = |key: &str, values: &[&str]| Condition {
        key: key.parse().unwrap(),
        values: vec![],
        not_values: patterns(values),
    };
    let token = json!({
        "iss": "https://issuer.example",
        "sub": "alice",
        "aud": ["shop", "books"],
        "azp": "web",
        "realm_access": {"roles": ["admin"]},
    });
    let cases: Vec<(&str, Condition, Req, bool)> = vec![
        (
            "principal is iss/sub",
            when("request.auth.principal", &["https://issuer.example/alice"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            true,
        ),
        (
            "principal prefix",
            when("request.auth.principal", &["https://issuer.example/*"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            true,
        ),
        (
            "audiences: any item",
            when("request.auth.audiences", &["books"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            true,
        ),
        (
            "presenter",
            when("request.auth.presenter", &["web"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            true,
        ),
        (
            "issuer",
            when("request.auth.issuer", &["https://other"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            false,
        ),
        (
            "nested claim",
            when("request.auth.claims[realm_access][roles]", &["admin"]),
            Req::http(None, "GET", "/").claims(token.clone()),
            true,
        ),
        (
            "notValues: a claim without the value",
            not("request.auth.claims[groups]", &["banned"]),
            Req::http(None, "GET", "/").claims(json!({"groups": ["ok"]})),
            true,
        ),
        (
            "notValues: the value present",
            not("request.auth.claims[groups]", &["banned"]),
            Req::http(None, "GET", "/").claims(json!({"groups": ["ok", "banned"]})),
            false,
        ),
        (
            "notValues: no token at all passes (as in Istio)",
            not("request.auth.claims[groups]", &["banned"]),
            Req::http(None, "GET", "/"),
            true,
        ),
        (
            "request header",
            when("request.headers[x-tenant]", &["acme"]),
            Req::http(None, "GET", "/").header("x-tenant", "acme"),
            true,
        ),
        ("source namespace", when("source.namespace", &["prod"]), Req::http(Some(peer("prod", "a")), "GET", "/"), true),
        ("source of an unidentified peer", when("source.namespace", &["*"]), Req::http(None, "GET", "/"), false),
        ("destination port", when("destination.port", &["80"]), Req::http(None, "GET", "/"), true),
        ("destination port suffix", when("destination.port", &["*1"]), Req::http(None, "GET", "/"), false),
        // L4 conditions still apply to TCP; rules with them are not HTTP-only.
        ("destination port on TCP", when("destination.port", &["80"]), Req::tcp(None), true),
        (
            "HTTP condition on TCP: the ALLOW rule never matches",
            when("request.headers[x]", &["*"]),
            Req::tcp(None),
            false,
        ),
    ];
    for (name, condition, req, want) in cases {
        let table = table(vec![policy("p", Action::Allow, vec![Rule { when: vec![condition], ..Rule::default() }])]);
        assert_eq!(req.eval(&table, &to_service()).is_allowed(), want, "{name}");
    }
}

#[test]
fn tcp_connections_follow_istio() {
    let http_only_deny = policy(
        "no-get",
        Action::Deny,
        vec![Rule { to: vec![op(|o| o.methods = vec!["GET".into()])], ..Rule::default() }],
    );
    let port_scoped_deny = policy(
        "no-get-81",
        Action::Deny,
        vec![Rule {
            to: vec![op(|o| {
                o.methods = vec!["GET".into()];
                o.ports = vec![81];
            })],
            ..Rule::default()
        }],
    );
    let source = Some(peer("default", "a"));
    // A DENY with only HTTP fields denies every TCP connection, and HTTP requests it does not match pass.
    let t = table(vec![http_only_deny]);
    assert_eq!(Req::tcp(source.clone()).eval(&t, &to_service()), denied_by("no-get"));
    assert!(Req::http(source.clone(), "POST", "/").eval(&t, &to_service()).is_allowed());
    // Its L4 part still scopes it: port 80 is not denied.
    let t = table(vec![port_scoped_deny]);
    assert!(Req::tcp(source.clone()).eval(&t, &to_service()).is_allowed());
    let on_81 = Destination { service: Some(addr(81)), workload: None };
    assert_eq!(Req { port: 81, ..Req::tcp(source.clone()) }.eval(&t, &on_81), denied_by("no-get-81"));
    // An ALLOW rule without HTTP fields still allows TCP next to one with them.
    let t = table(vec![policy(
        "mixed",
        Action::Allow,
        vec![
            Rule { to: vec![op(|o| o.methods = vec!["GET".into()])], ..Rule::default() },
            Rule { to: vec![op(|o| o.ports = vec![80])], ..Rule::default() },
        ],
    )]);
    assert_eq!(Req::tcp(source).eval(&t, &to_service()), allow("mixed"));
}

#[test]
fn selectors_and_namespaces_select_workloads() {
    let v2_only = AuthorizationPolicy {
        target: PolicyTarget::Selector(BTreeMap::from([("version".into(), "v2".into())])),
        ..policy(
            "v2-frontend-only",
            Action::Allow,
            vec![Rule {
                from: vec![Source { service_accounts: vec!["frontend".parse().unwrap()], ..Source::default() }],
                ..Rule::default()
            }],
        )
    };
    let ns_deny = AuthorizationPolicy {
        target: PolicyTarget::Namespace,
        ..policy(
            "ns-no-intruder",
            Action::Deny,
            vec![Rule {
                from: vec![Source { service_accounts: vec!["intruder".parse().unwrap()], ..Source::default() }],
                ..Rule::default()
            }],
        )
    };
    let t = table(vec![v2_only, ns_deny]);
    let (v1, v2) = (id("reviews-v1"), id("reviews-v2"));
    let at = |workload| Destination { service: Some(addr(80)), workload: Some(workload) };
    let batch = Req::http(Some(peer("default", "batch")), "GET", "/");
    assert_eq!(batch.eval(&t, &at(&v1)), Decision::Allow { policy: None }, "v1 is not selected");
    assert_eq!(batch.eval(&t, &at(&v2)), no_allow("default/v2-frontend-only"));
    assert_eq!(batch.eval(&t, &to_service()), Decision::Allow { policy: None }, "no workload known");
    let frontend = Req::http(Some(peer("default", "frontend")), "GET", "/");
    assert_eq!(frontend.eval(&t, &at(&v2)), allow("v2-frontend-only"));
    // The namespace policy selects both the service and the workload, and is reported once.
    let intruder = Req::http(Some(peer("default", "intruder")), "GET", "/");
    assert_eq!(intruder.eval(&t, &at(&v1)), denied_by("ns-no-intruder"));
    let only_workload = Destination { service: None, workload: Some(&v1) };
    assert_eq!(intruder.eval(&t, &only_workload), denied_by("ns-no-intruder"));
}

#[test]
fn needs_l7_and_selects() {
    let l4 = policy("l4", Action::Deny, vec![Rule { to: vec![op(|o| o.ports = vec![80])], ..Rule::default() }]);
    let l7 =
        policy("l7", Action::Deny, vec![Rule { to: vec![op(|o| o.paths = patterns(&["/x"]))], ..Rule::default() }]);
    let t = table(vec![l4.clone()]);
    assert!(t.selects(&to_service()));
    assert!(!t.needs_l7(&to_service()));
    let t = table(vec![l4, l7]);
    assert!(t.needs_l7(&to_service()));
    let elsewhere = Destination { service: Some(SocketAddrV4::new("10.96.9.9".parse().unwrap(), 80)), workload: None };
    assert!(!t.selects(&elsewhere) && !t.needs_l7(&elsewhere));
}

#[test]
fn decisions_serialize_with_their_verdict() {
    assert_eq!(
        serde_json::to_value(denied_by("p")).unwrap(),
        json!({"verdict": "DENY", "policy": {"namespace": "default", "name": "p"}, "reason": "denied by policy default/p"})
    );
    assert_eq!(
        serde_json::to_value(Decision::Allow { policy: None }).unwrap(),
        json!({"verdict": "ALLOW", "policy": null})
    );
    assert_eq!(denied_by("p").label(), "denied_by_policy");
    assert_eq!(no_allow("x").label(), "no_allow_match");
}

#[test]
fn dump_shows_semantics_and_who_selects_what() {
    let dump = bookstore().dump();
    assert_eq!(dump["semantics"], SEMANTICS);
    let reviews = &dump["services"]["10.96.0.10:80"];
    assert_eq!(reviews["service"], json!({"namespace": "default", "name": "reviews"}));
    assert_eq!(reviews["allow"], json!(["default/api-readers", "default/gold"]));
    assert_eq!(reviews["deny"], json!(["default/no-debug", "default/no-prod-admin"]));
    assert_eq!(reviews["l7"], true);
    let readers = &dump["policies"][0];
    assert_eq!(readers["id"]["name"], "api-readers");
    assert_eq!(readers["rules"][0]["to"][0]["paths"], json!(["/api/*"]));
    assert_eq!(dump["policies"][1]["rules"][0]["when"][0]["key"], "request.auth.claims[groups]");
}

#[test]
fn normalize_path_table() {
    let cases: &[(&str, Option<&str>)] = &[
        ("/api/books", Some("/api/books")),
        ("/api/./books", Some("/api/books")),
        ("/api/../admin", Some("/admin")),
        ("/../../admin", Some("/admin")),
        ("/%61dmin", Some("/admin")),
        ("/api/%2e%2e/admin", Some("/admin")),
        ("/a/b/..", Some("/a/")),
        ("/a/.", Some("/a/")),
        ("/a%20b", Some("/a%20b")),
        ("/caf\u{e9}/%7Eme", Some("/caf\u{e9}/~me")),
        ("/api%2Fadmin", None),
        ("/api%5cadmin", None),
        ("api", None),
        ("/%zz", Some("/%zz")),
    ];
    for &(path, want) in cases {
        assert_eq!(normalize_path(path).as_deref(), want, "{path}");
    }
    assert!(matches!(normalize_path("/plain/path"), Some(Cow::Borrowed(_))));
}

#[test]
fn jwt_rules_for_a_destination() {
    let rule = |issuer: &str| JwtRule::new(issuer, JwksSource::Inline("{\"keys\":[]}".into()));
    let mut snapshot = Snapshot {
        services: vec![Service {
            id: id("reviews"),
            cluster_ip: Some(VIP.parse().unwrap()),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: TargetPort::Number(80),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            selector: None,
            l7: false,
        }],
        ..Snapshot::default()
    };
    snapshot.jwt_policies = vec![
        JwtPolicy { id: id("b"), targets: vec![PolicyTarget::Namespace], rules: vec![rule("https://b")] },
        JwtPolicy {
            id: id("a"),
            targets: vec![PolicyTarget::Service("reviews".into()), PolicyTarget::Namespace],
            rules: vec![rule("https://a1"), rule("https://a2")],
        },
    ];
    let compiled = compile(&snapshot);
    let got: Vec<_> = compiled
        .authz
        .jwt_rules(&to_service())
        .map(|r| (r.policy.name.as_str(), r.index, r.rule.issuer.as_str()))
        .collect();
    assert_eq!(got, [("a", 0, "https://a1"), ("a", 1, "https://a2"), ("b", 0, "https://b")]);
    assert!(compiled.authz.needs_l7(&to_service()));
}
