//! Route tables: attachment, producer and consumer lists, precedence, backends, rejections.

use std::time::Duration;

use super::*;

fn addr(vip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(vip), port)
}

/// reviews (the parent) and its two versions as services of their own, each with one workload.
fn mesh(routes: Vec<HttpRoute>) -> Snapshot {
    let mut s = snapshot(
        vec![svc("reviews", "10.96.0.10"), svc("reviews-v1", "10.96.0.11"), svc("reviews-v2", "10.96.0.12")],
        vec![
            wl("v1", "reviews-v1", &["10.1.0.1"]),
            wl("v2", "reviews-v2", &["10.1.0.2"]),
            weighted(wl("r", "reviews", &["10.1.0.3"]), 4),
        ],
    );
    s.routes = routes;
    s
}

fn http(name: &str, parent: &str, rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        id: id(name),
        kind: RouteKind::Http,
        parents: vec![ParentRef { service: id(parent), port: None }],
        hostnames: vec![],
        rules,
        created: None,
    }
}

fn rule(matches: Vec<RouteMatch>, backends: Vec<BackendRef>) -> RouteRule {
    RouteRule { matches, backends, ..RouteRule::default() }
}

fn to(service: &str, weight: u32) -> BackendRef {
    BackendRef { service: id(service), port: Some(80), weight, filters: vec![] }
}

fn path(path: PathMatch) -> RouteMatch {
    RouteMatch { path: Some(path), ..RouteMatch::default() }
}

fn prefix(p: &str) -> RouteMatch {
    path(PathMatch::Prefix(p.into()))
}

fn header(name: &str, value: &str) -> HeaderMatch {
    HeaderMatch { name: name.into(), value: StringMatch::Exact(value.into()) }
}

/// "route#rule" of each entry, in list order.
fn order(rules: &[CompiledRule]) -> Vec<String> {
    rules.iter().map(|r| format!("{}#{}", r.route.name, r.rule)).collect()
}

fn l7<'a>(c: &'a Compiled, vip: &str) -> &'a L7Service {
    &c.l7[&addr(vip, 80)]
}

#[test]
fn http_precedence_table() {
    let method = |m: RouteMatch| RouteMatch { method: Some("GET".into()), ..m };
    let headers =
        |m: RouteMatch, n: usize| RouteMatch { headers: (0..n).map(|i| header(&format!("x-{i}"), "1")).collect(), ..m };
    let query = |m: RouteMatch| RouteMatch {
        query: vec![QueryMatch { name: "q".into(), value: StringMatch::Exact("1".into()) }],
        ..m
    };
    // (match, expected position); rules are listed in a scrambled order.
    let cases = [
        (prefix("/"), 7),
        (path(PathMatch::Regex("/a.*".into())), 8),
        (path(PathMatch::Exact("/a/b".into())), 0),
        (prefix("/a"), 6),
        (prefix("/a/b"), 1),
        (method(prefix("/a")), 3),
        (headers(method(prefix("/a")), 2), 2),
        (headers(prefix("/a"), 1), 5),
        (query(headers(prefix("/a"), 1)), 4),
    ];
    let rules = cases.iter().map(|(m, _)| rule(vec![m.clone()], vec![to("reviews-v1", 1)])).collect();
    let c = compile(&mesh(vec![http("r", "reviews", rules)]));
    assert_eq!(c.rejected, vec![]);
    let mut want: Vec<(usize, String)> =
        cases.iter().enumerate().map(|(i, (_, pos))| (*pos, format!("r#{i}"))).collect();
    want.sort();
    let want: Vec<String> = want.into_iter().map(|(_, label)| label).collect();
    assert_eq!(order(&l7(&c, "10.96.0.10").producer), want);
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_rule_and_match() {
    let same = |name: &str, created: Option<&str>| HttpRoute {
        created: created.map(str::to_owned),
        ..http(name, "reviews", vec![rule(vec![prefix("/x")], vec![to("reviews-v1", 1)])])
    };
    let two_matches = http(
        "b",
        "reviews",
        vec![
            rule(vec![prefix("/y")], vec![to("reviews-v1", 1)]),
            rule(vec![prefix("/z"), prefix("/x")], vec![to("reviews-v1", 1)]),
        ],
    );
    let routes = vec![
        same("e", None),
        same("a", Some("2024-06-01T00:00:00Z")),
        same("d", None),
        same("c", Some("2024-01-01T00:00:00Z")),
        two_matches,
    ];
    let c = compile(&mesh(routes));
    assert_eq!(c.rejected, vec![]);
    let list = &l7(&c, "10.96.0.10").producer;
    let got: Vec<String> = list
        .iter()
        .map(|r| match &r.matcher.path {
            Some(PathMatch::Prefix(p)) => format!("{}#{}{p}", r.route.name, r.rule),
            other => panic!("{other:?}"),
        })
        .collect();
    // Same specificity throughout: timestamps first (none last), then names, rules, matches.
    assert_eq!(got, ["c#0/x", "a#0/x", "b#0/y", "b#1/z", "b#1/x", "d#0/x", "e#0/x"]);
}

#[test]
fn grpc_precedence_table() {
    let method = |service: Option<&str>, method: Option<&str>, regex: bool| RouteMatch {
        grpc: Some(GrpcMethodMatch { service: service.map(Into::into), method: method.map(Into::into), regex }),
        ..RouteMatch::default()
    };
    let cases = [
        (RouteMatch::default(), 6),
        (method(Some("a.B"), None, false), 3),
        (method(Some("a.B"), Some("Get"), false), 1),
        (method(Some("a.B.c"), Some("Get"), false), 0),
        (method(Some("a.*"), Some("Get"), true), 5),
        (method(None, Some("Get"), false), 4),
        (RouteMatch { headers: vec![header("x", "1")], ..method(Some("a.B"), None, false) }, 2),
    ];
    let rules = cases.iter().map(|(m, _)| rule(vec![m.clone()], vec![to("reviews-v1", 1)])).collect();
    let route = HttpRoute { kind: RouteKind::Grpc, ..http("g", "reviews", rules) };
    let c = compile(&mesh(vec![route]));
    assert_eq!(c.rejected, vec![]);
    let mut want: Vec<(usize, String)> =
        cases.iter().enumerate().map(|(i, (_, pos))| (*pos, format!("g#{i}"))).collect();
    want.sort();
    let want: Vec<String> = want.into_iter().map(|(_, label)| label).collect();
    let list = &l7(&c, "10.96.0.10").producer;
    assert_eq!(order(list), want);
    assert!(list.iter().all(|r| r.kind == RouteKind::Grpc && r.matcher.path.is_none()), "no HTTP path defaults");
}

#[test]
fn producer_and_consumer_lists() {
    let producer = http("own", "reviews", vec![rule(vec![], vec![to("reviews-v1", 1)])]);
    let mut consumer = http("theirs", "reviews", vec![rule(vec![prefix("/api")], vec![to("reviews-v2", 1)])]);
    consumer.id.namespace = "prod".into();
    let mut other = consumer.clone();
    other.id = ObjectRef::new("test", "mine");
    let c = compile(&mesh(vec![producer, consumer, other]));
    assert_eq!(c.rejected, vec![]);
    let table = l7(&c, "10.96.0.10");
    assert_eq!((table.service.clone(), table.port), (id("reviews"), 80));
    assert_eq!(order(&table.producer), ["own#0"]);
    assert_eq!(table.consumers.keys().collect::<Vec<_>>(), ["prod", "test"]);
    assert_eq!(order(&table.consumers["prod"]), ["theirs#0"]);
    assert_eq!(table.consumers["prod"][0].route, ObjectRef::new("prod", "theirs"));
    // Consumers replace producer routes entirely for their namespace only.
    assert_eq!(order(table.rules_for("prod")), ["theirs#0"]);
    assert_eq!(order(table.rules_for("test")), ["mine#0"]);
    assert_eq!(order(table.rules_for("default")), ["own#0"]);
    assert_eq!(order(table.rules_for("elsewhere")), ["own#0"]);
}

#[test]
fn only_consumer_routes_leave_producer_empty() {
    let mut consumer = http("theirs", "reviews", vec![rule(vec![], vec![to("reviews-v2", 1)])]);
    consumer.id.namespace = "prod".into();
    let c = compile(&mesh(vec![consumer]));
    let table = l7(&c, "10.96.0.10");
    assert!(table.producer.is_empty());
    assert_eq!(order(&table.consumers["prod"]), ["theirs#0"]);
}

#[test]
fn handoff_flag_set_on_routed_and_l7_services_only() {
    let mut s = mesh(vec![http("r", "reviews", vec![rule(vec![], vec![to("reviews-v1", 1)])])]);
    s.services.push(Service { l7: true, ..svc("web", "10.96.0.20") });
    let c = compile(&s);
    let flags = |vip: &str| c.services[&key(vip, 80)].value.flags & SVC_F_HANDOFF != 0;
    assert!(flags("10.96.0.10"), "routed parent");
    assert!(!flags("10.96.0.11") && !flags("10.96.0.12"), "backends are not handed off for being backends");
    assert!(flags("10.96.0.20"), "l7 service");
    assert_eq!(c.l7.keys().copied().collect::<Vec<_>>(), [addr("10.96.0.10", 80), addr("10.96.0.20", 80)]);
    let web = l7(&c, "10.96.0.20");
    assert!(web.producer.is_empty() && web.consumers.is_empty(), "no routes: the proxy sends to the service");
}

#[test]
fn parent_port_selects_ports() {
    let mut s = mesh(vec![]);
    s.services[0].ports = vec![
        port(80, TargetPort::Number(9080)),
        ServicePort { app_protocol: Some("http".into()), ..port(81, TargetPort::Number(9081)) },
    ];
    let mut route = http("r", "reviews", vec![rule(vec![], vec![to("reviews-v1", 1)])]);
    route.parents[0].port = Some(81);
    s.routes = vec![route.clone()];
    let c = compile(&s);
    assert_eq!(c.l7.keys().copied().collect::<Vec<_>>(), [addr("10.96.0.10", 81)]);
    assert_eq!(c.services[&key("10.96.0.10", 81)].app_protocol.as_deref(), Some("http"));
    assert_eq!(c.services[&key("10.96.0.10", 80)].value.flags, 0);

    route.parents[0].port = None;
    s.routes = vec![route.clone()];
    let c = compile(&s);
    assert_eq!(c.l7.keys().copied().collect::<Vec<_>>(), [addr("10.96.0.10", 80), addr("10.96.0.10", 81)]);

    // Naming one port twice attaches once.
    route.parents.push(ParentRef { service: id("reviews"), port: Some(80) });
    s.routes = vec![route];
    let c = compile(&s);
    assert_eq!(c.l7[&addr("10.96.0.10", 80)].producer.len(), 1);
}

#[test]
fn backends_weights_and_targets() {
    let mut s = mesh(vec![http(
        "r",
        "reviews",
        vec![rule(
            vec![],
            vec![
                to("reviews-v1", 90),
                to("reviews-v2", 10),
                to("gone", 5),
                BackendRef { port: None, ..to("reviews-v1", 0) },
                BackendRef { port: None, ..to("two-ports", 1) },
            ],
        )],
    )]);
    s.services.push(Service {
        ports: vec![port(80, TargetPort::Number(1)), port(81, TargetPort::Number(1))],
        ..svc("two-ports", "10.96.0.30")
    });
    let c = compile(&s);
    let backends: Vec<_> = l7(&c, "10.96.0.10").producer[0]
        .backends
        .iter()
        .map(|b| (b.service.name.as_str(), b.target, b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            ("reviews-v1", Some(addr("10.96.0.11", 80)), 90),
            ("reviews-v2", Some(addr("10.96.0.12", 80)), 10),
            ("gone", None, 5),
            ("reviews-v1", Some(addr("10.96.0.11", 80)), 0),
            ("two-ports", None, 1),
        ]
    );
    assert_eq!(
        rejections(&c),
        [
            "HTTPRoute default/r: spec.rules[0].backendRefs[2]: Service default/gone does not exist; this backend's \
             share of requests gets HTTP 500",
            "HTTPRoute default/r: spec.rules[0].backendRefs[4].port: required: Service default/two-ports has several \
             TCP ports (80, 81); name one; this backend's share of requests gets HTTP 500",
        ]
    );
    assert!(c.rejected.iter().all(|r| r.cause == Cause::Unresolved), "backends are references: {:?}", c.rejected);
}

#[test]
fn default_match_and_rule_without_backends() {
    let redirect = Filter::RequestRedirect {
        scheme: Some("https".into()),
        hostname: None,
        path: None,
        port: None,
        status: DEFAULT_REDIRECT_STATUS,
    };
    let rules = vec![
        RouteRule { filters: vec![redirect.clone()], ..RouteRule::default() },
        rule(vec![RouteMatch { method: Some("POST".into()), ..RouteMatch::default() }], vec![to("reviews-v1", 1)]),
    ];
    let c = compile(&mesh(vec![http("r", "reviews", rules)]));
    assert_eq!(c.rejected, vec![]);
    let list = &l7(&c, "10.96.0.10").producer;
    let root = Some(PathMatch::Prefix("/".into()));
    // Both match prefix "/", the method match ranks first.
    assert_eq!(order(list), ["r#1", "r#0"]);
    assert_eq!(
        list[0].matcher,
        RouteMatch { path: root.clone(), method: Some("POST".into()), ..RouteMatch::default() }
    );
    assert_eq!(list[1].matcher, RouteMatch { path: root, ..RouteMatch::default() });
    assert_eq!((list[1].filters.clone(), list[1].backends.len()), (vec![redirect], 0));
}

#[test]
fn matches_are_normalized() {
    let m = RouteMatch {
        headers: vec![header("End-User", "jason"), header("end-user", "other")],
        query: vec![
            QueryMatch { name: "q".into(), value: StringMatch::Exact("1".into()) },
            QueryMatch { name: "q".into(), value: StringMatch::Exact("2".into()) },
        ],
        ..RouteMatch::default()
    };
    let c = compile(&mesh(vec![http("r", "reviews", vec![rule(vec![m], vec![])])]));
    let matcher = &l7(&c, "10.96.0.10").producer[0].matcher;
    assert_eq!(matcher.headers, [header("end-user", "jason")], "first of a repeated name wins, lower case");
    assert_eq!(matcher.query.len(), 1);
}

#[test]
fn filters_and_timeouts_are_carried() {
    let modifier = HeaderModifier { set: vec![("x-a".into(), "1".into())], add: vec![], remove: vec!["x-b".into()] };
    let mirror = |port| Filter::RequestMirror { service: id("reviews-v2"), port, percent: 12.5 };
    let mut r = rule(vec![], vec![BackendRef { filters: vec![mirror(None)], ..to("reviews-v1", 1) }]);
    r.filters = vec![
        Filter::RequestHeaderModifier(modifier.clone()),
        mirror(Some(80)),
        Filter::RequestMirror { service: id("nope"), port: Some(80), percent: 100.0 },
    ];
    r.timeouts = RouteTimeouts { request: Some(Duration::from_secs(10)), backend_request: None };
    let c = compile(&mesh(vec![http("r", "reviews", vec![r])]));
    let entry = &l7(&c, "10.96.0.10").producer[0];
    // The mirror to a missing service is left out; the backend's mirror gets its port filled in.
    assert_eq!(entry.filters, [Filter::RequestHeaderModifier(modifier), mirror(Some(80))]);
    assert_eq!(entry.backends[0].filters, [mirror(Some(80))]);
    assert_eq!(entry.timeouts.request, Some(Duration::from_secs(10)));
    assert_eq!(
        rejections(&c),
        ["HTTPRoute default/r: spec.rules[0].filters[2].requestMirror.backendRef: Service default/nope does not \
          exist; requests are not mirrored to it"]
    );
    assert_eq!(c.service_addr(&id("reviews-v2"), 80), Some(addr("10.96.0.12", 80)));
}

#[test]
fn endpoints_mirror_the_kernel_backends() {
    let mut s = mesh(vec![]);
    s.workloads.push(weighted(wl("r2", "reviews", &["10.1.0.4"]), 6));
    s.workloads.push(weighted(wl("r3", "reviews", &["10.1.0.5"]), 0));
    s.endpoints.push(slice("reviews", 9080, &[("10.1.0.9", true, None), ("10.1.0.8", false, None)]));
    let c = compile(&s);
    let eps: Vec<_> = c.endpoints[&addr("10.96.0.10", 80)]
        .iter()
        .map(|e| (e.addr.to_string(), e.weight, e.workload.as_ref().map(|w| w.name.as_str())))
        .collect();
    assert_eq!(
        eps,
        [
            ("10.1.0.3:9080".to_owned(), 4, Some("r")),
            ("10.1.0.4:9080".to_owned(), 6, Some("r2")),
            ("10.1.0.9:9080".to_owned(), 1, None),
        ]
    );
    // Individual weights here, cumulative in the kernel's list; same addresses in the same order.
    let kernel: Vec<_> =
        backends(&c, "10.96.0.10", 80).into_iter().map(|(a, p, w, _)| (format!("{a}:{p}"), w)).collect();
    assert_eq!(
        kernel,
        [("10.1.0.3:9080".to_owned(), 4), ("10.1.0.4:9080".to_owned(), 10), ("10.1.0.9:9080".into(), 11)]
    );
    // Every compiled TCP port has an entry, routed or not.
    assert_eq!(c.endpoints.len(), c.services.len());
    assert_eq!(
        c.endpoints.keys().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.96.0.10:80", "10.96.0.11:80", "10.96.0.12:80"]
    );
}

#[test]
fn route_rejections_table() {
    let ok = || rule(vec![], vec![to("reviews-v1", 1)]);
    let with_match = |m: RouteMatch| http("r", "reviews", vec![rule(vec![m], vec![to("reviews-v1", 1)])]);
    let with_filters = |filters: Vec<Filter>| http("r", "reviews", vec![RouteRule { filters, ..ok() }]);
    let rewrite = |path: PathRewrite| Filter::UrlRewrite { hostname: None, path: Some(path) };
    let redirect = Filter::RequestRedirect { scheme: None, hostname: None, path: None, port: None, status: 302 };
    let grpc = |m: RouteMatch| HttpRoute { kind: RouteKind::Grpc, ..with_match(m) };
    let header_regex = RouteMatch {
        headers: vec![HeaderMatch { name: "x".into(), value: StringMatch::Regex("a(".into()) }],
        ..RouteMatch::default()
    };
    let cases: Vec<(&str, Vec<HttpRoute>, &str)> = vec![
        (
            "invalid path regex",
            vec![with_match(path(PathMatch::Regex("/(a".into())))],
            "HTTPRoute default/r: spec.rules[0].matches[0].path.value: invalid regex \"/(a\":",
        ),
        (
            "invalid header regex",
            vec![with_match(header_regex)],
            "HTTPRoute default/r: spec.rules[0].matches[0].headers[0].value: invalid regex \"a(\":",
        ),
        (
            "prefix without a leading slash",
            vec![with_match(prefix("api"))],
            "HTTPRoute default/r: spec.rules[0].matches[0].path.value: \"api\" does not start with \"/\"; paths are \
             absolute",
        ),
        (
            "missing parent",
            vec![http("r", "nope", vec![ok()])],
            "HTTPRoute default/r: spec.parentRefs[0]: Service default/nope does not exist; the route is not attached \
             to it",
        ),
        (
            "parent port that does not exist",
            vec![HttpRoute {
                parents: vec![ParentRef { service: id("reviews"), port: Some(81) }],
                ..http("r", "x", vec![ok()])
            }],
            "HTTPRoute default/r: spec.parentRefs[0].port: Service default/reviews has no TCP port 81; the route is \
             not attached to it",
        ),
        (
            "no parents",
            vec![HttpRoute { parents: vec![], ..http("r", "reviews", vec![ok()]) }],
            "HTTPRoute default/r: spec.parentRefs: empty; name the Service whose requests this route steers",
        ),
        (
            "redirect and rewrite together",
            vec![with_filters(vec![redirect.clone(), rewrite(PathRewrite::ReplaceFullPath("/x".into()))])],
            "HTTPRoute default/r: spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together",
        ),
        (
            "a filter type twice",
            vec![with_filters(vec![redirect.clone(), redirect.clone()])],
            "HTTPRoute default/r: spec.rules[0].filters[1].type: RequestRedirect is also at index 0",
        ),
        (
            "prefix rewrite of an exact match",
            vec![http(
                "r",
                "reviews",
                vec![RouteRule {
                    matches: vec![path(PathMatch::Exact("/a".into()))],
                    filters: vec![rewrite(PathRewrite::ReplacePrefixMatch("/b".into()))],
                    ..ok()
                }],
            )],
            "HTTPRoute default/r: spec.rules[0].filters[0].urlRewrite.path.type: replaces the matched path prefix, \
             but spec.rules[0].matches[0] is not a PathPrefix match",
        ),
        (
            "bad redirect status",
            vec![with_filters(vec![Filter::RequestRedirect {
                scheme: None,
                hostname: None,
                path: None,
                port: None,
                status: 200,
            }])],
            "HTTPRoute default/r: spec.rules[0].filters[0].requestRedirect.statusCode: 200 is not a redirect status",
        ),
        (
            "mirror percent out of range",
            vec![with_filters(vec![Filter::RequestMirror { service: id("reviews-v2"), port: None, percent: 101.0 }])],
            "HTTPRoute default/r: spec.rules[0].filters[0].requestMirror.percent: 101 is not a percentage",
        ),
        (
            "backend timeout longer than the request's",
            vec![http(
                "r",
                "reviews",
                vec![RouteRule {
                    timeouts: RouteTimeouts {
                        request: Some(Duration::from_secs(1)),
                        backend_request: Some(Duration::from_secs(2)),
                    },
                    ..ok()
                }],
            )],
            "HTTPRoute default/r: spec.rules[0].timeouts.backendRequest: is longer than timeouts.request",
        ),
        (
            "weight too large",
            vec![http("r", "reviews", vec![rule(vec![], vec![to("reviews-v1", MAX_WEIGHT + 1)])])],
            "HTTPRoute default/r: spec.rules[0].backendRefs[0].weight: 1000001 is too large",
        ),
        (
            "gRPC method match that names nothing",
            vec![grpc(RouteMatch { grpc: Some(GrpcMethodMatch::default()), ..RouteMatch::default() })],
            "GRPCRoute default/r: spec.rules[0].matches[0].method: matches nothing in particular; set service, \
             method or both",
        ),
        (
            "gRPC regex",
            vec![grpc(RouteMatch {
                grpc: Some(GrpcMethodMatch { service: Some("a[".into()), method: None, regex: true }),
                ..RouteMatch::default()
            })],
            "GRPCRoute default/r: spec.rules[0].matches[0].method.service: invalid regex \"a[\":",
        ),
        (
            "path match in a GRPCRoute",
            vec![grpc(prefix("/"))],
            "GRPCRoute default/r: spec.rules[0].matches[0]: a GRPCRoute matches gRPC service, method and headers",
        ),
        (
            "an HTTPRoute next to a GRPCRoute on the same service",
            vec![
                http("h", "reviews", vec![ok()]),
                HttpRoute { kind: RouteKind::Grpc, ..http("g", "reviews", vec![ok()]) },
            ],
            "HTTPRoute default/h: spec.parentRefs: GRPCRoute default/g also attaches to Service default/reviews port \
             80; the GRPCRoute wins there (GEP-1426)",
        ),
        (
            "the same route twice",
            vec![http("r", "reviews", vec![ok()]), http("r", "reviews-v1", vec![ok()])],
            "HTTPRoute default/r: metadata.name: defined twice; only the first definition is used",
        ),
    ];
    for (name, routes, want) in cases {
        let c = compile(&mesh(routes));
        let got = rejections(&c);
        assert_eq!(got.len(), 1, "{name}: {got:#?}");
        assert!(got[0].starts_with(want), "{name}: {}", got[0]);
        // A parent that names nothing usable is a reference problem; the rest is the route's own.
        let cause = if name.starts_with("missing parent") || name.starts_with("parent port") {
            Cause::Unresolved
        } else {
            Cause::Invalid
        };
        assert_eq!(c.rejected[0].cause, cause, "{name}");
    }
}

#[test]
fn a_route_with_only_bad_rules_does_not_attach() {
    let c = compile(&mesh(vec![http("r", "reviews", vec![rule(vec![prefix("nope")], vec![to("reviews-v1", 1)])])]));
    assert_eq!(c.rejected.len(), 1);
    assert!(c.l7.is_empty());
    assert_eq!(c.services[&key("10.96.0.10", 80)].value.flags, 0);

    // A bad rule is skipped; the good ones still apply.
    let rules = vec![rule(vec![prefix("nope")], vec![]), rule(vec![], vec![to("reviews-v1", 1)])];
    let c = compile(&mesh(vec![http("r", "reviews", rules)]));
    assert_eq!(order(&l7(&c, "10.96.0.10").producer), ["r#1"]);
}

#[test]
fn route_problems_match_the_compiler() {
    let route = http("r", "reviews", vec![rule(vec![], vec![]), rule(vec![prefix("x")], vec![])]);
    let problems = route_problems(&route);
    assert_eq!(problems, compile(&mesh(vec![route])).rejected);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "spec.rules[1].matches[0].path.value");
}

fn routes_snapshot() -> Snapshot {
    let mut consumer = http("c", "reviews", vec![rule(vec![prefix("/a")], vec![to("reviews-v2", 1)])]);
    consumer.id.namespace = "prod".into();
    let mut s = mesh(vec![
        http("b", "reviews", vec![rule(vec![prefix("/")], vec![to("reviews-v1", 9), to("reviews-v2", 1)])]),
        http("a", "reviews", vec![rule(vec![prefix("/")], vec![to("gone", 1)])]),
        consumer,
        HttpRoute { kind: RouteKind::Grpc, ..http("g", "reviews-v1", vec![rule(vec![], vec![to("reviews-v1", 1)])]) },
        http("dup", "reviews-v2", vec![rule(vec![], vec![to("reviews-v1", 1)])]),
        http("dup", "reviews-v2", vec![rule(vec![], vec![to("reviews-v2", 1)])]),
    ]);
    s.services.push(Service { l7: true, ..svc("web", "10.96.0.20") });
    s
}

#[test]
fn shuffled_routes_compile_identically() {
    let original = routes_snapshot();
    let want = compile(&original);
    assert_eq!(want.rejected.len(), 2, "{:?}", want.rejected);
    for rotation in 1..6 {
        let mut s = original.clone();
        s.routes.rotate_left(rotation);
        s.services.reverse();
        s.workloads.reverse();
        assert_eq!(compile(&s), want, "rotation {rotation}");
    }
    // The duplicate that wins is picked by content, not by input order.
    let dup = &want.l7[&addr("10.96.0.12", 80)].producer[0];
    assert_eq!(dup.backends[0].service, id("reviews-v1"));
}

#[test]
fn dump_spells_routes_out() {
    let dump = compile(&routes_snapshot()).dump();
    let reviews = &dump["l7"]["10.96.0.10:80"];
    assert_eq!(reviews["service"], serde_json::json!({"namespace": "default", "name": "reviews"}));
    assert_eq!(dump["services"]["10.96.0.10:80/TCP"]["app_protocol"], serde_json::Value::Null);
    assert_eq!(
        reviews["producer"][0],
        serde_json::json!({
            "route": {"namespace": "default", "name": "a"},
            "kind": "HTTPRoute",
            "rule": 0,
            "name": null,
            "matcher": {"path": {"Prefix": "/"}, "method": null, "headers": [], "query": [], "grpc": null},
            "filters": [],
            "backends": [{
                "service": {"namespace": "default", "name": "gone"},
                "target": "none (HTTP 500)",
                "weight": 1,
                "filters": []
            }],
            "timeouts": {"request": "none", "backend_request": "none"},
            "traffic": "none (the service's apply)"
        })
    );
    assert_eq!(reviews["producer"][1]["backends"][0]["target"], "10.96.0.11:80");
    assert_eq!(reviews["consumers"]["prod"][0]["matcher"]["path"], serde_json::json!({"Prefix": "/a"}));
    assert_eq!(dump["l7"]["10.96.0.11:80"]["producer"][0]["kind"], "GRPCRoute");
    assert_eq!(
        dump["l7"]["10.96.0.20:80"],
        serde_json::json!({
            "service": {"namespace": "default", "name": "web"},
            "port": 80,
            "producer": [],
            "consumers": {},
            "traffic": {
                "request_timeout": "none",
                "retries": "none",
                "circuit_breaker": {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024},
                "outlier_detection": "none",
                "load_balancer": "LeastRequest",
                "use_client_protocol": false,
                "idle_timeout": "1h"
            }
        })
    );
    assert_eq!(
        dump["endpoints"]["10.96.0.10:80"],
        serde_json::json!([{"addr": "10.1.0.3:9080", "weight": 4, "workload": {"namespace": "default", "name": "r"}}])
    );
    assert_eq!(dump["services"]["10.96.0.10:80/TCP"]["value"]["flags"], serde_json::json!(["HANDOFF"]));
}

#[test]
fn durations_read_and_write_as_gateway_api_text() {
    use crate::model::duration_text::{format, parse};
    let cases = [
        ("0s", Duration::ZERO),
        ("500ms", Duration::from_millis(500)),
        ("10s", Duration::from_secs(10)),
        ("1h2m", Duration::from_secs(3720)),
        ("1h2m3s400ms", Duration::from_millis(3_723_400)),
        ("1s5ns", Duration::new(1, 5)),
    ];
    for (text, duration) in cases {
        assert_eq!(format(duration), text);
        assert_eq!(parse(text), Ok(duration), "{text}");
    }
    for bad in ["", "10", "s", "1x", "-1s", "1.5s"] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    let timeouts: RouteTimeouts = serde_json::from_str(r#"{"request": "0s", "backend_request": "1m"}"#).unwrap();
    assert_eq!(timeouts, RouteTimeouts { request: None, backend_request: Some(Duration::from_secs(60)) });
    assert_eq!(
        serde_json::to_value(timeouts).unwrap(),
        serde_json::json!({"request": "none", "backend_request": "1m"})
    );
    assert_eq!(serde_json::from_str::<RouteTimeouts>("{}").unwrap(), RouteTimeouts::default());
}

#[test]
fn snapshot_with_routes_round_trips_through_json() {
    let mut s = routes_snapshot();
    s.routes[0].rules[0].filters = vec![
        Filter::RequestMirror { service: id("x"), port: None, percent: 0.5 },
        Filter::UrlRewrite { hostname: Some("h".into()), path: Some(PathRewrite::ReplacePrefixMatch("/p".into())) },
    ];
    s.routes[0].rules[0].timeouts.request = Some(Duration::from_millis(1500));
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), s);
    // Snapshots written before routes existed still read.
    let mut old = serde_json::to_value(Snapshot::default()).unwrap();
    old.as_object_mut().unwrap().remove("routes");
    assert_eq!(serde_json::from_value::<Snapshot>(old).unwrap(), Snapshot::default());
}
