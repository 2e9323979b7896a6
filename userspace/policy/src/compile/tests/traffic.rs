//! TrafficPolicies: defaults, service and route level, handoff, conflicts, rejections.

use std::time::Duration;

use serde_json::json;

use super::*;

fn addr(vip: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(vip), port)
}

fn traffic(name: &str, targets: Vec<TrafficTarget>, settings: TrafficSettings) -> TrafficPolicy {
    TrafficPolicy { id: id(name), targets, settings }
}

fn to_service(name: &str) -> TrafficTarget {
    TrafficTarget::Service(name.into())
}

fn to_route(name: &str) -> TrafficTarget {
    TrafficTarget::Route { kind: RouteKind::Http, name: name.into() }
}

fn timeout(secs: u64) -> TrafficSettings {
    TrafficSettings { request_timeout: Some(Duration::from_secs(secs)), ..TrafficSettings::default() }
}

fn retrying(retries: RetryPolicy) -> TrafficSettings {
    TrafficSettings { retries: Some(retries), ..TrafficSettings::default() }
}

/// reviews (port 80, and 81 with UDP 53 beside it), its backend reviews-v1, and a route
/// "split" on reviews whose rule 0 matches /api.
fn mesh(policies: Vec<TrafficPolicy>) -> Snapshot {
    let mut reviews = svc("reviews", "10.96.0.10");
    reviews.ports.push(port(81, TargetPort::Number(9081)));
    reviews.ports.push(ServicePort { protocol: Protocol::Udp, ..port(53, TargetPort::Number(53)) });
    let mut s = snapshot(
        vec![reviews, svc("reviews-v1", "10.96.0.11"), Service { cluster_ip: None, ..svc("headless", "10.96.0.1") }],
        vec![wl("v1", "reviews-v1", &["10.1.0.1"])],
    );
    s.routes = vec![HttpRoute {
        id: id("split"),
        kind: RouteKind::Http,
        parents: vec![ParentRef { service: id("reviews"), port: Some(80) }],
        hostnames: vec![],
        rules: vec![RouteRule {
            matches: vec![RouteMatch { path: Some(PathMatch::Prefix("/api".into())), ..RouteMatch::default() }],
            backends: vec![BackendRef { service: id("reviews-v1"), port: Some(80), weight: 1, filters: vec![] }],
            ..RouteRule::default()
        }],
        created: None,
    }];
    s.traffic_policies = policies;
    s
}

fn handoff(c: &Compiled, vip: &str, port: u16) -> bool {
    c.services[&key(vip, port)].value.flags & SVC_F_HANDOFF != 0
}

#[test]
fn defaults_are_spelled_out() {
    let defaults = json!({
        "request_timeout": "none",
        "retries": "none",
        "circuit_breaker": {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024},
        "outlier_detection": "none",
        "load_balancer": "LeastRequest",
        "use_client_protocol": false,
        "idle_timeout": "1h"
    });
    assert_eq!(serde_json::to_value(TrafficSettings::default()).unwrap(), defaults);
    // A policy that only turns retries and outlier detection on shows every default they bring.
    let settings = TrafficSettings {
        retries: Some(RetryPolicy::default()),
        outlier_detection: Some(OutlierDetection::default()),
        ..TrafficSettings::default()
    };
    let dump = compile(&mesh(vec![traffic("p", vec![to_service("reviews")], settings)])).dump();
    assert_eq!(
        dump["l7"]["10.96.0.10:81"]["traffic"],
        json!({
            "request_timeout": "none",
            "retries": {
                "attempts": 2,
                "per_try_timeout": "none",
                "retry_on": {
                    "server_errors": false,
                    "gateway_errors": true,
                    "reset": true,
                    "connect_failure": true,
                    "statuses": [],
                    "grpc": []
                },
                "backoff_base": "25ms",
                "backoff_max": "250ms",
                "budget_percent": 20.0,
                "budget_min_per_second": 10,
                "retry_non_idempotent": false,
                "max_body_bytes": 65536
            },
            "circuit_breaker": {"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 1024},
            "outlier_detection": {
                "consecutive_5xx": 5,
                "consecutive_gateway_errors": 5,
                "interval": "10s",
                "base_ejection": "30s",
                "max_ejection_percent": 50
            },
            "load_balancer": "LeastRequest",
            "use_client_protocol": false,
            "idle_timeout": "1h"
        })
    );
    // Without any policy a routed service shows the defaults, and its rules defer to them.
    let dump = compile(&mesh(vec![])).dump();
    assert_eq!(dump["l7"]["10.96.0.10:80"]["traffic"], defaults);
    assert_eq!(dump["l7"]["10.96.0.10:80"]["producer"][0]["traffic"], "none (the service's apply)");
}

#[test]
fn service_and_route_level_table() {
    struct Case {
        name: &'static str,
        policies: Vec<TrafficPolicy>,
        /// The service-level request timeout, in seconds.
        service: Option<u64>,
        /// The route rule's own request timeout, if it has settings of its own.
        route: Option<Option<u64>>,
    }
    let cases = [
        Case { name: "no policy", policies: vec![], service: None, route: None },
        Case {
            name: "service level applies to every port; the route defers to it",
            policies: vec![traffic("p", vec![to_service("reviews")], timeout(5))],
            service: Some(5),
            route: None,
        },
        Case {
            name: "route level only",
            policies: vec![traffic("p", vec![to_route("split")], timeout(7))],
            service: None,
            route: Some(Some(7)),
        },
        Case {
            name: "route level replaces service level entirely, even with fields left at their defaults",
            policies: vec![
                traffic("a", vec![to_service("reviews")], timeout(5)),
                traffic("b", vec![to_route("split")], retrying(RetryPolicy::default())),
            ],
            service: Some(5),
            route: Some(None),
        },
        Case {
            name: "one policy on both",
            policies: vec![traffic("p", vec![to_service("reviews"), to_route("split")], timeout(3))],
            service: Some(3),
            route: Some(Some(3)),
        },
    ];
    for case in cases {
        let c = compile(&mesh(case.policies));
        assert_eq!(c.rejected, vec![], "{}", case.name);
        let secs = |t: Option<Duration>| t.map(|t| t.as_secs());
        // Port 81 has no route: only a service-level policy hands it to the proxy.
        assert_eq!(c.l7.contains_key(&addr("10.96.0.10", 81)), case.service.is_some(), "{}", case.name);
        for table in c.l7.values() {
            assert_eq!(secs(table.traffic.request_timeout), case.service, "{}: port {}", case.name, table.port);
        }
        let rule = &c.l7[&addr("10.96.0.10", 80)].producer[0];
        let route = rule.traffic.as_ref().map(|t| secs(t.request_timeout));
        assert_eq!(route, case.route, "{}", case.name);
        if let Some(settings) = &rule.traffic {
            assert_eq!(settings.retries.is_some(), case.name.starts_with("route level replaces"), "{}", case.name);
        }
    }
}

#[test]
fn a_policy_makes_its_service_l7() {
    let c = compile(&mesh(vec![]));
    assert_eq!(c.l7.keys().copied().collect::<Vec<_>>(), [addr("10.96.0.10", 80)], "only the routed port");
    assert!(!handoff(&c, "10.96.0.10", 81) && !handoff(&c, "10.96.0.11", 80));

    let settings = TrafficSettings { load_balancer: LoadBalancer::RoundRobin, ..TrafficSettings::default() };
    let c = compile(&mesh(vec![traffic("p", vec![to_service("reviews-v1"), to_service("reviews")], settings)]));
    assert_eq!(c.rejected, vec![]);
    // Every TCP port of both, routes or not; the UDP port is not steered at all.
    assert_eq!(
        c.l7.keys().copied().collect::<Vec<_>>(),
        [addr("10.96.0.10", 80), addr("10.96.0.10", 81), addr("10.96.0.11", 80)]
    );
    for (vip, port) in [("10.96.0.10", 80), ("10.96.0.10", 81), ("10.96.0.11", 80)] {
        assert!(handoff(&c, vip, port), "{vip}:{port}");
        assert_eq!(c.l7[&addr(vip, port)].traffic.load_balancer, LoadBalancer::RoundRobin, "{vip}:{port}");
    }
    let v1 = &c.l7[&addr("10.96.0.11", 80)];
    assert!(v1.producer.is_empty() && v1.consumers.is_empty(), "no routes: the proxy sends to the service");

    // A policy on a route alone hands nothing new to the proxy.
    let c = compile(&mesh(vec![traffic("p", vec![to_route("split")], timeout(1))]));
    assert_eq!(c.l7.len(), 1);
    assert!(!handoff(&c, "10.96.0.10", 81));
}

#[test]
fn the_first_policy_by_namespace_and_name_wins_a_target() {
    let mut other_ns = traffic("a", vec![to_service("reviews")], timeout(9));
    other_ns.id.namespace = "prod".into();
    let policies = vec![
        traffic("c", vec![to_route("split"), to_service("reviews-v1")], timeout(3)),
        traffic("b", vec![to_service("reviews"), to_route("split")], timeout(2)),
        traffic("d", vec![to_service("reviews-v1"), to_service("reviews-v1")], timeout(4)),
        other_ns,
    ];
    let want = compile(&mesh(policies.clone()));
    assert_eq!(
        rejections(&want),
        [
            "TrafficPolicy default/c: spec.targetRefs[0]: conflicts with TrafficPolicy default/b, which already \
             targets HTTPRoute default/split; that policy applies there and this one does not (policies are not \
             merged)",
            "TrafficPolicy default/d: spec.targetRefs[0]: conflicts with TrafficPolicy default/c, which already \
             targets Service default/reviews-v1; that policy applies there and this one does not (policies are not \
             merged)",
            "TrafficPolicy prod/a: spec.targetRefs[0]: Service prod/reviews does not exist; the policy does not apply \
             to it",
        ]
    );
    let request = |vip: &str| want.l7[&addr(vip, 80)].traffic.request_timeout;
    assert_eq!(request("10.96.0.10"), Some(Duration::from_secs(2)));
    // c lost the route but keeps its other target.
    assert_eq!(request("10.96.0.11"), Some(Duration::from_secs(3)));
    let rule = &want.l7[&addr("10.96.0.10", 80)].producer[0];
    assert_eq!(rule.traffic.as_ref().and_then(|t| t.request_timeout), Some(Duration::from_secs(2)));

    // Input order does not matter.
    for rotation in 1..4 {
        let mut s = mesh(policies.clone());
        s.traffic_policies.rotate_left(rotation);
        assert_eq!(compile(&s), want, "rotation {rotation}");
    }
}

#[test]
fn traffic_rejections_table() {
    let retries = |edit: fn(&mut RetryPolicy)| {
        let mut r = RetryPolicy::default();
        edit(&mut r);
        traffic("p", vec![to_service("reviews")], retrying(r))
    };
    let on_service = |settings: TrafficSettings| traffic("p", vec![to_service("reviews")], settings);
    let breaker = |edit: fn(&mut CircuitBreaker)| {
        let mut circuit_breaker = CircuitBreaker::default();
        edit(&mut circuit_breaker);
        on_service(TrafficSettings { circuit_breaker, ..TrafficSettings::default() })
    };
    let cases: Vec<(&str, TrafficPolicy, &str)> = vec![
        (
            "missing service",
            traffic("p", vec![to_service("nope")], timeout(1)),
            "TrafficPolicy default/p: spec.targetRefs[0]: Service default/nope does not exist; the policy does not \
             apply to it",
        ),
        (
            "headless service",
            traffic("p", vec![to_service("headless")], timeout(1)),
            "TrafficPolicy default/p: spec.targetRefs[0]: Service default/headless is headless; weft steers requests \
             sent to a clusterIP; the policy does not apply to it",
        ),
        (
            "missing route (an HTTPRoute is not a GRPCRoute)",
            traffic("p", vec![TrafficTarget::Route { kind: RouteKind::Grpc, name: "split".into() }], timeout(1)),
            "TrafficPolicy default/p: spec.targetRefs[0]: GRPCRoute default/split does not exist; the policy does \
             not apply to it",
        ),
        (
            "no targets",
            traffic("p", vec![], timeout(1)),
            "TrafficPolicy default/p: spec.targetRefs: empty; name the Services or routes this policy applies to",
        ),
        (
            "too many attempts",
            retries(|r| r.attempts = 11),
            "TrafficPolicy default/p: spec.retries.attempts: 11 is too many; use 0 to 10",
        ),
        (
            "budget over 100%",
            retries(|r| r.budget_percent = 100.5),
            "TrafficPolicy default/p: spec.retries.budget.percent: 100.5 is not a percentage; use 0 to 100",
        ),
        (
            "negative budget",
            retries(|r| r.budget_percent = -1.0),
            "TrafficPolicy default/p: spec.retries.budget.percent: -1 is not a percentage; use 0 to 100",
        ),
        (
            "NaN budget",
            retries(|r| r.budget_percent = f64::NAN),
            "TrafficPolicy default/p: spec.retries.budget.percent: NaN is not a percentage; use 0 to 100",
        ),
        (
            "per-try timeout longer than the request timeout",
            on_service(TrafficSettings {
                retries: Some(RetryPolicy { per_try_timeout: Some(Duration::from_secs(2)), ..RetryPolicy::default() }),
                ..timeout(1)
            }),
            "TrafficPolicy default/p: spec.retries.perTryTimeout: 2s is longer than timeouts.request (1s), which \
             would cut every try short; make it shorter or equal",
        ),
        (
            "backoff base above its maximum",
            retries(|r| r.backoff_base = Duration::from_secs(1)),
            "TrafficPolicy default/p: spec.retries.backoff.baseInterval: 1s is longer than maxInterval (250ms); make \
             it shorter or equal",
        ),
        (
            "retries on nothing",
            retries(|r| r.retry_on = RetryOn::none()),
            "TrafficPolicy default/p: spec.retries.retryOn: retries on nothing; list what to retry on, or leave \
             retryOn out for connect-failure, reset and gateway-error",
        ),
        (
            "retry on a success",
            retries(|r| r.retry_on.statuses = vec![200]),
            "TrafficPolicy default/p: spec.retries.retryOn: 200 is not an error status; list statuses from 400 to 599",
        ),
        (
            "retry on gRPC OK",
            retries(|r| r.retry_on.grpc = vec![0]),
            "TrafficPolicy default/p: spec.retries.retryOn: 0 is not a gRPC error status code; use 1 to 16",
        ),
        (
            "ejection percent over 100",
            on_service(TrafficSettings {
                outlier_detection: Some(OutlierDetection { max_ejection_percent: 101, ..OutlierDetection::default() }),
                ..TrafficSettings::default()
            }),
            "TrafficPolicy default/p: spec.outlierDetection.maxEjectionPercent: 101 is not a percentage; use 0 to 100",
        ),
        (
            "no connections",
            breaker(|b| b.max_connections = 0),
            "TrafficPolicy default/p: spec.circuitBreaker.maxConnections: 0 would refuse every request; use at least \
             1, or leave it out for 1024",
        ),
        (
            "no pending requests",
            breaker(|b| b.max_pending_requests = 0),
            "TrafficPolicy default/p: spec.circuitBreaker.maxPendingRequests: 0 would refuse every request",
        ),
        (
            "no requests",
            breaker(|b| b.max_requests = 0),
            "TrafficPolicy default/p: spec.circuitBreaker.maxRequests: 0 would refuse every request",
        ),
    ];
    for (name, policy, want) in cases {
        let c = compile(&mesh(vec![policy]));
        let got = rejections(&c);
        assert_eq!(got.len(), 1, "{name}: {got:#?}");
        assert!(got[0].starts_with(want), "{name}: {}", got[0]);
        // Only a target that names nothing usable is a reference problem; the rest is the policy's own.
        let cause = if want.contains("spec.targetRefs[0]:") { Cause::Unresolved } else { Cause::Invalid };
        assert_eq!(c.rejected[0].cause, cause, "{name}");
        // A rejected policy (or target) changes nothing.
        assert_eq!(c.l7.len(), 1, "{name}");
        assert_eq!(c.l7[&addr("10.96.0.10", 80)].traffic, TrafficSettings::default(), "{name}");
    }
}

#[test]
fn the_same_policy_twice() {
    let c = compile(&mesh(vec![
        traffic("p", vec![to_service("reviews")], timeout(2)),
        traffic("p", vec![to_service("reviews")], timeout(1)),
    ]));
    assert_eq!(
        rejections(&c),
        ["TrafficPolicy default/p: metadata.name: defined twice; only the first definition is used"]
    );
    // Picked by content, not by input order.
    assert_eq!(c.l7[&addr("10.96.0.10", 80)].traffic.request_timeout, Some(Duration::from_secs(1)));
}

#[test]
fn traffic_problems_match_the_compiler() {
    let mut r = RetryPolicy { attempts: 20, ..RetryPolicy::default() };
    r.retry_on.grpc = vec![99];
    let policy = traffic("p", vec![to_service("reviews")], retrying(r));
    let problems = traffic_problems(&policy);
    assert_eq!(
        problems.iter().map(|p| p.field.as_str()).collect::<Vec<_>>(),
        ["spec.retries.attempts", "spec.retries.retryOn"]
    );
    assert_eq!(problems, compile(&mesh(vec![policy])).rejected);
}

#[test]
fn snapshot_with_traffic_policies_round_trips_through_json() {
    let settings = TrafficSettings {
        request_timeout: Some(Duration::from_millis(1500)),
        retries: Some(RetryPolicy {
            attempts: 3,
            per_try_timeout: Some(Duration::from_millis(500)),
            retry_on: RetryOn { server_errors: true, statuses: vec![429], grpc: vec![14], ..RetryOn::none() },
            budget_percent: 12.5,
            ..RetryPolicy::default()
        }),
        circuit_breaker: CircuitBreaker { max_connections: 1, max_pending_requests: 2, max_requests: 3 },
        outlier_detection: Some(OutlierDetection { interval: Duration::ZERO, ..OutlierDetection::default() }),
        load_balancer: LoadBalancer::Random,
        use_client_protocol: true,
        // "none" must come back as no timeout, not as the default hour.
        idle_timeout: None,
    };
    let s = mesh(vec![
        traffic("p", vec![to_service("reviews"), to_route("split")], settings),
        traffic("q", vec![to_service("reviews-v1")], TrafficSettings::default()),
    ]);
    let text = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), s);
    // Hand-written snapshots may leave defaults out, or say "none".
    let written = json!({
        "id": {"namespace": "default", "name": "p"},
        "targets": [{"Service": "reviews"}],
        "settings": {"retries": {"attempts": 1}, "outlier_detection": "none"}
    });
    let policy: TrafficPolicy = serde_json::from_value(written).unwrap();
    assert_eq!(policy.settings, retrying(RetryPolicy { attempts: 1, ..RetryPolicy::default() }));
    // Snapshots written before traffic policies existed still read.
    let mut old = serde_json::to_value(Snapshot::default()).unwrap();
    old.as_object_mut().unwrap().remove("traffic_policies");
    assert_eq!(serde_json::from_value::<Snapshot>(old).unwrap(), Snapshot::default());
}
