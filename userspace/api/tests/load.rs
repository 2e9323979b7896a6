#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft_api::{ConfigError, LoadError, Loaded, load_dir};
use weft_policy::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("weft-api-{test}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        fs::write(self.0.join(name), text).unwrap();
        self
    }

    fn load(&self) -> Loaded {
        load_dir(&self.0, node()).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn node() -> NodeSettings {
    NodeSettings { node_name: "node-a".into(), proxy: None, skmsg: true }
}

fn id(name: &str) -> ObjectRef {
    ObjectRef::new("default", name)
}

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  clusterIP: 10.96.0.10
  selector:
    app: reviews
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: dns
    port: 53
    protocol: UDP
";

const MESH: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc
  labels:
    kubernetes.io/service-name: reviews
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [10.1.0.1]
  targetRef: {kind: Pod, name: reviews-v1}
- addresses: [10.1.0.9]
  conditions: {ready: false}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v1
  labels: {app: reviews}
spec:
  serviceAccount: reviews
  addresses: [10.1.0.1]
  cgroupPath: /sys/fs/cgroup/reviews-v1
  weight: 80
  ports: {http: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v2
  namespace: default
  labels: {app: reviews}
spec:
  addresses: [10.1.0.2]
  node: node-b
  meshed: false
  weight: 20
  ports: {http: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: reviews-callers
spec:
  targetRefs:
  - {group: '', kind: Service, name: reviews}
  - {kind: Namespace, name: default}
  action: ALLOW
  rules:
  - from:
    - namespaces: [default]
      serviceAccounts: [frontend]
    - principals: ['spiffe://cluster.local/ns/prod/*']
    to:
    - ports: [80]
    - ports: [8080]
---
";

#[test]
fn valid_multi_doc_set_loads_into_the_snapshot() {
    let dir = TempDir::new("valid");
    dir.write("a-service.yaml", SERVICE).write("b-mesh.yml", MESH);
    let loaded = dir.load();

    let reviews_v1 = Workload {
        service_account: "reviews".into(),
        labels: BTreeMap::from([("app".into(), "reviews".into())]),
        cgroup: Some("/sys/fs/cgroup/reviews-v1".into()),
        weight: 80,
        ports: BTreeMap::from([("http".into(), 8080)]),
        ..Workload::new(id("reviews-v1"), vec!["10.1.0.1".parse().unwrap()])
    };
    let reviews_v2 = Workload {
        labels: BTreeMap::from([("app".into(), "reviews".into())]),
        node: Some("node-b".into()),
        meshed: false,
        weight: 20,
        ports: BTreeMap::from([("http".into(), 8080)]),
        ..Workload::new(id("reviews-v2"), vec!["10.1.0.2".parse().unwrap()])
    };
    let rules = vec![Rule {
        from: vec![
            Source {
                namespaces: vec!["default".parse().unwrap()],
                service_accounts: vec!["frontend".parse().unwrap()],
                ..Source::default()
            },
            Source { principals: vec!["spiffe://cluster.local/ns/prod/*".parse().unwrap()], ..Source::default() },
        ],
        to: vec![
            Operation { ports: vec![80], ..Operation::default() },
            Operation { ports: vec![8080], ..Operation::default() },
        ],
        when: vec![],
    }];
    let policy =
        |target| AuthorizationPolicy { id: id("reviews-callers"), target, action: Action::Allow, rules: rules.clone() };
    let expected = Loaded {
        snapshot: Snapshot {
            node: node(),
            services: vec![Service {
                id: id("reviews"),
                cluster_ip: Some("10.96.0.10".parse().unwrap()),
                ports: vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: TargetPort::Name("http".into()),
                        protocol: Protocol::Tcp,
                        app_protocol: None,
                    },
                    ServicePort {
                        name: Some("dns".into()),
                        port: 53,
                        target_port: TargetPort::Number(53),
                        protocol: Protocol::Udp,
                        app_protocol: None,
                    },
                ],
                selector: Some(BTreeMap::from([("app".into(), "reviews".into())])),
                l7: false,
            }],
            endpoints: vec![EndpointSet {
                service: id("reviews"),
                ports: vec![(Some("http".into()), 8080)],
                endpoints: vec![
                    Endpoint { ip: "10.1.0.1".parse().unwrap(), ready: true, workload: Some(id("reviews-v1")) },
                    Endpoint { ip: "10.1.0.9".parse().unwrap(), ready: false, workload: None },
                ],
            }],
            workloads: vec![reviews_v1, reviews_v2],
            policies: vec![policy(PolicyTarget::Service("reviews".into())), policy(PolicyTarget::Namespace)],
            routes: vec![],
            traffic_policies: vec![],
            jwt_policies: vec![],
            nodes: vec![],
            peer_authentications: vec![],
        },
        errors: vec![],
        files: 2,
        objects: 5,
    };
    assert_eq!(loaded, expected);

    // And it compiles: 80/20 split, the slice's pod de-duplicated.
    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let svc = compiled.services.values().next().unwrap();
    assert_eq!(svc.backends.iter().map(|b| b.weight_end).collect::<Vec<_>>(), [80, 100]);
}

#[test]
fn fixtures_load_and_compile_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let loaded = load_dir(&dir, node()).unwrap();
    assert_eq!(loaded.errors, vec![], "{:#?}", loaded.errors);
    assert_eq!((loaded.files, loaded.objects), (2, 8));
    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let weights = |vip: &str, port: u16| {
        let (_, svc) =
            compiled.services.iter().find(|(k, _)| addr_to_string(&k.addr) == vip && k.port == port).unwrap();
        let backends = svc.backends.iter().map(|b| (addr_to_string(&b.addr), b.port, b.weight_end)).collect::<Vec<_>>();
        (backends, svc.value.flags)
    };
    let (reviews, flags) = weights("10.96.0.20", 9080);
    assert_eq!(reviews, [("10.244.1.11".into(), 8080, 80), ("10.244.2.12".into(), 8080, 100)]);
    assert_ne!(flags, 0, "the ALLOW policy makes reviews default-deny");
    let (ratings, flags) = weights("10.96.0.30", 9080);
    assert_eq!(ratings, [("192.168.50.2".into(), 9080, 1)]);
    assert_eq!(flags, 0);
    // productpage is the one local meshed workload; it is allowed to both reviews ports.
    let verdicts: Vec<_> = compiled.dump()["policy"].as_array().unwrap().iter().map(|e| e["verdict"].clone()).collect();
    assert_eq!(verdicts, ["ALLOW", "ALLOW"]);
}

/// reviews with two versions, and ratings serving gRPC, one port each.
const ROUTE_SERVICES: &str = "\
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: reviews}, spec: {clusterIP: 10.96.0.10, ports: [{port: 9080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: reviews-v1}, spec: {clusterIP: 10.96.0.11, ports: [{port: 9080}]}}
- {apiVersion: v1, kind: Service, metadata: {name: reviews-v2}, spec: {clusterIP: 10.96.0.12, ports: [{port: 9080}]}}
- apiVersion: v1
  kind: Service
  metadata: {name: ratings}
  spec: {clusterIP: 10.96.0.20, ports: [{port: 9090, appProtocol: kubernetes.io/h2c}]}
";

/// Bookinfo's reviews split: jason gets v2, everyone else 90/10.
const PRODUCER_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  creationTimestamp: '2024-05-01T10:00:00+02:00'
spec:
  parentRefs:
  - {group: '', kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - headers:
      - {name: End-User, value: jason}
    backendRefs:
    - {name: reviews-v2, port: 9080}
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    timeouts: {request: 10s, backendRequest: 500ms}
";

/// Clients in prod see their own route to reviews instead of the producer's.
const CONSUMER_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: prod}
spec:
  parentRefs:
  - {group: '', kind: Service, name: reviews, namespace: default}
  rules:
  - name: api
    matches:
    - path: {type: PathPrefix, value: /api}
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-env, value: prod}]
        remove: [x-debug]
    backendRefs:
    - {name: reviews-v2, namespace: default, port: 9080}
";

const GRPC_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: ratings}
spec:
  parentRefs:
  - {kind: Service, name: ratings}
  rules:
  - matches:
    - method: {service: ratings.v1.Ratings, method: Get}
      headers:
      - {name: x-canary, value: 'yes|true', type: RegularExpression}
    backendRefs:
    - {name: ratings}
";

#[test]
fn routes_load_and_compile_into_route_tables() {
    let dir = TempDir::new("routes");
    dir.write("a-services.yaml", ROUTE_SERVICES)
        .write("b-routes.yaml", &[PRODUCER_ROUTE, CONSUMER_ROUTE, GRPC_ROUTE].join("---\n"));
    let loaded = dir.load();
    assert_eq!(loaded.errors, vec![], "{:#?}", loaded.errors);
    assert_eq!(loaded.objects, 7);

    let to = |name: &str, weight| BackendRef { service: id(name), port: Some(9080), weight, filters: vec![] };
    let producer = HttpRoute {
        id: id("reviews"),
        kind: RouteKind::Http,
        parents: vec![ParentRef { service: id("reviews"), port: Some(9080) }],
        hostnames: vec![],
        rules: vec![
            RouteRule {
                matches: vec![RouteMatch {
                    headers: vec![HeaderMatch { name: "end-user".into(), value: StringMatch::Exact("jason".into()) }],
                    ..RouteMatch::default()
                }],
                backends: vec![to("reviews-v2", 1)],
                ..RouteRule::default()
            },
            RouteRule {
                backends: vec![to("reviews-v1", 90), to("reviews-v2", 10)],
                timeouts: RouteTimeouts {
                    request: Some(Duration::from_secs(10)),
                    backend_request: Some(Duration::from_millis(500)),
                },
                ..RouteRule::default()
            },
        ],
        // Normalized to UTC.
        created: Some("2024-05-01T08:00:00Z".into()),
    };
    let consumer = HttpRoute {
        id: ObjectRef::new("prod", "reviews-canary"),
        kind: RouteKind::Http,
        parents: vec![ParentRef { service: id("reviews"), port: None }],
        hostnames: vec![],
        rules: vec![RouteRule {
            name: Some("api".into()),
            matches: vec![RouteMatch {
                path: Some(PathMatch::Prefix("/api".into())),
                method: Some("GET".into()),
                ..RouteMatch::default()
            }],
            filters: vec![Filter::RequestHeaderModifier(HeaderModifier {
                set: vec![("x-env".into(), "prod".into())],
                add: vec![],
                remove: vec!["x-debug".into()],
            })],
            backends: vec![to("reviews-v2", 1)],
            ..RouteRule::default()
        }],
        created: None,
    };
    let grpc = HttpRoute {
        id: id("ratings"),
        kind: RouteKind::Grpc,
        parents: vec![ParentRef { service: id("ratings"), port: None }],
        hostnames: vec![],
        rules: vec![RouteRule {
            matches: vec![RouteMatch {
                headers: vec![HeaderMatch { name: "x-canary".into(), value: StringMatch::Regex("yes|true".into()) }],
                grpc: Some(GrpcMethodMatch {
                    service: Some("ratings.v1.Ratings".into()),
                    method: Some("Get".into()),
                    regex: false,
                }),
                ..RouteMatch::default()
            }],
            backends: vec![BackendRef { port: None, ..to("ratings", 1) }],
            ..RouteRule::default()
        }],
        created: None,
    };
    assert_eq!(loaded.snapshot.routes, vec![producer, consumer, grpc]);

    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let vip = |ip: &str, port| std::net::SocketAddrV4::new(ip.parse().unwrap(), port);
    let reviews = &compiled.l7[&vip("10.96.0.10", 9080)];
    let summary = |rules: &[CompiledRule]| {
        rules
            .iter()
            .map(|r| {
                let backends = r.backends.iter().map(|b| (b.target.map(|t| t.to_string()), b.weight)).collect();
                (r.route.to_string(), r.rule, backends)
            })
            .collect::<Vec<(String, usize, Vec<(Option<String>, u32)>)>>()
    };
    // The header match outranks the catch-all.
    assert_eq!(
        summary(&reviews.producer),
        [
            ("default/reviews".into(), 0, vec![(Some("10.96.0.12:9080".into()), 1)]),
            (
                "default/reviews".into(),
                1,
                vec![(Some("10.96.0.11:9080".into()), 90), (Some("10.96.0.12:9080".into()), 10)]
            ),
        ]
    );
    assert_eq!(
        summary(reviews.rules_for("prod")),
        [("prod/reviews-canary".into(), 0, vec![(Some("10.96.0.12:9080".into()), 1)])]
    );
    let ratings = &compiled.l7[&vip("10.96.0.20", 9090)];
    let ratings_port = compiled.services.values().find(|s| s.service.name == "ratings").expect("ratings compiled");
    assert_eq!(ratings_port.app_protocol.as_deref(), Some("kubernetes.io/h2c"));
    assert_eq!(summary(&ratings.producer), [("default/ratings".into(), 0, vec![(Some("10.96.0.20:9090".into()), 1)])]);
    // Routed services are handed to the proxy; plain backends are not.
    let dump = compiled.dump();
    let handoff: Vec<&String> = dump["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["value"]["flags"].as_array().unwrap().contains(&"HANDOFF".into()))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(handoff, ["10.96.0.10:9080/TCP", "10.96.0.20:9090/TCP"]);
}

#[test]
fn route_to_a_missing_service_loads_and_the_compiler_names_it() {
    let dir = TempDir::new("missing-parent");
    dir.write("a.yaml", ROUTE_SERVICES).write("b.yaml", &PRODUCER_ROUTE.replace("name: reviews,", "name: nope,"));
    let loaded = dir.load();
    assert_eq!(loaded.errors, vec![]);
    let compiled = compile(&loaded.snapshot);
    let rejected: Vec<String> = compiled.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        rejected,
        ["HTTPRoute default/reviews: spec.parentRefs[0]: Service default/nope does not exist; the route is not \
          attached to it"]
    );
    assert!(compiled.l7.is_empty());
}

/// A bad document's expected error: (document, object, field, message fragment).
type Expected = (usize, Option<&'static str>, Option<&'static str>, &'static str);

#[test]
fn each_bad_input_names_file_object_and_field() {
    const WORKLOAD: &str =
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: ok}\nspec: {addresses: [10.1.0.7]}\n";
    let cases: Vec<(&str, String, Expected)> = vec![
        (
            "wrong type for a port",
            format!("{WORKLOAD}---\n{}", SERVICE.replace("port: 80", "port: eighty")),
            (
                1,
                Some("Service default/reviews"),
                Some("spec.ports[0].port"),
                "invalid type: string \"eighty\", expected i32",
            ),
        ),
        (
            "bad clusterIP",
            SERVICE.replace("10.96.0.10", "10.96.0.300"),
            (0, Some("Service default/reviews"), Some("spec.clusterIP"), "\"10.96.0.300\" is not an IPv4 address"),
        ),
        (
            "bad workload address",
            WORKLOAD.replace("[10.1.0.7]", "[10.1.0.7, fe80::1]"),
            (0, Some("Workload default/ok"), Some("spec.addresses[1]"), "fe80::1 is an IPv6 address"),
        ),
        (
            "wrong type in a CRD field",
            WORKLOAD.replace("addresses:", "weight: heavy, addresses:"),
            (0, Some("Workload default/ok"), Some("spec.weight"), "invalid type: string \"heavy\", expected u32"),
        ),
        (
            "unknown kind",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews, namespace: prod}\n".into(),
            (
                0,
                Some("Deployment prod/reviews"),
                None,
                "unsupported kind Deployment (apiVersion apps/v1); weft reads Service, EndpointSlice, Node, Workload, \
                 AuthorizationPolicy, JwtPolicy, TrafficPolicy, PeerAuthentication, HTTPRoute, GRPCRoute",
            ),
        ),
        (
            "kind typo",
            SERVICE.replace("kind: Service", "kind: Servcie"),
            (0, Some("Servcie default/reviews"), None, "unsupported kind Servcie (apiVersion v1)"),
        ),
        (
            "missing name",
            SERVICE.replace("name: reviews", "labels: {}"),
            (0, Some("Service default/<unnamed>"), Some("metadata.name"), "missing; every object needs a name"),
        ),
        ("broken YAML", format!("{WORKLOAD}---\nkind: Service\nspec: {{ports: [\n"), (1, None, None, "invalid YAML: ")),
        (
            "not an object",
            "- just\n- a list\n".into(),
            (0, None, None, "not a Kubernetes object: apiVersion and kind are required"),
        ),
        (
            "slice without its service label",
            MESH.split("---").next().unwrap().replace("kubernetes.io/service-name", "app"),
            (
                0,
                Some("EndpointSlice default/reviews-abc"),
                Some("metadata.labels[\"kubernetes.io/service-name\"]"),
                "missing; set it to the name of the Service",
            ),
        ),
        (
            "bad item in a List",
            format!(
                "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}",
                WORKLOAD.replace('\n', "\n  "),
                SERVICE.replace("10.96.0.10", "None!").replace('\n', "\n  ")
            ),
            (0, Some("Service default/reviews"), Some("items[1].spec.clusterIP"), "\"None!\" is not an IPv4 address"),
        ),
        (
            "policy targeting an unsupported kind",
            MESH.split("---").nth(3).unwrap().replace("kind: Service,", "kind: Deployment,"),
            (
                0,
                Some("AuthorizationPolicy default/reviews-callers"),
                Some("spec.targetRefs[0].kind"),
                "unsupported kind \"Deployment\"; use Service or Namespace",
            ),
        ),
        (
            "invalid path regex in a route",
            PRODUCER_ROUTE.replace("- headers:", "- path: {type: RegularExpression, value: '/(v1'}\n      headers:"),
            (
                0,
                Some("HTTPRoute default/reviews"),
                Some("spec.rules[0].matches[0].path.value"),
                "invalid regex \"/(v1\":",
            ),
        ),
        (
            "route attached to a Gateway",
            PRODUCER_ROUTE.replace("{group: '', kind: Service, name: reviews, port: 9080}", "{name: my-gateway}"),
            (
                0,
                Some("HTTPRoute default/reviews"),
                Some("spec.parentRefs[0].kind"),
                "missing, which means Gateway; weft serves mesh routes: parentRefs must name a Service",
            ),
        ),
        (
            "unsupported route filter",
            CONSUMER_ROUTE.replace("type: RequestHeaderModifier", "type: ExtensionRef"),
            (
                0,
                Some("HTTPRoute prod/reviews-canary"),
                Some("spec.rules[0].filters[0].type"),
                "ExtensionRef filters are not supported by weft",
            ),
        ),
        (
            "bad route timeout",
            PRODUCER_ROUTE.replace("request: 10s", "request: 10 seconds"),
            (
                0,
                Some("HTTPRoute default/reviews"),
                Some("spec.rules[1].timeouts.request"),
                "\"10 seconds\" is not a Gateway API duration",
            ),
        ),
        (
            "negative backend weight",
            PRODUCER_ROUTE.replace("weight: 90", "weight: -1"),
            (0, Some("HTTPRoute default/reviews"), Some("spec.rules[1].backendRefs[0].weight"), "-1 is negative"),
        ),
        (
            "invalid gRPC method regex",
            GRPC_ROUTE.replace("'yes|true'", "'yes(true'"),
            (
                0,
                Some("GRPCRoute default/ratings"),
                Some("spec.rules[0].matches[0].headers[0].value"),
                "invalid regex \"yes(true\":",
            ),
        ),
        (
            "unknown path match type",
            CONSUMER_ROUTE.replace("type: PathPrefix", "type: Glob"),
            (
                0,
                Some("HTTPRoute prod/reviews-canary"),
                Some("spec.rules[0].matches[0].path.type"),
                "unknown variant `Glob`",
            ),
        ),
        (
            "unknown retryOn token",
            TRAFFIC_POLICY.replace("\"503\"", "\"5O3\""),
            (
                0,
                Some("TrafficPolicy default/reviews"),
                Some("spec.retries.retryOn[3]"),
                "unknown retryOn token \"5O3\"; use 5xx, gateway-error, reset, connect-failure, an error status such \
                 as 503, or a gRPC status: cancelled, deadline-exceeded, resource-exhausted, internal, unavailable",
            ),
        ),
        (
            "bad traffic duration",
            TRAFFIC_POLICY.replace("perTryTimeout: 500ms", "perTryTimeout: 0.5s"),
            (
                0,
                Some("TrafficPolicy default/reviews"),
                Some("spec.retries.perTryTimeout"),
                "\"0.5s\" is not a duration; write e.g. \"10s\", \"500ms\" or \"1h30m\"",
            ),
        ),
        (
            "traffic policy without targetRefs",
            TRAFFIC_POLICY.replace("  targetRefs:", "  targets:"),
            (0, Some("TrafficPolicy default/reviews"), Some("spec.targetRefs"), "missing field `targetRefs`"),
        ),
        (
            "traffic policy with empty targetRefs",
            "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {targetRefs: []}\n".into(),
            (0, Some("TrafficPolicy default/t"), Some("spec.targetRefs"), "empty; name the Services or routes"),
        ),
        (
            "route target without the Gateway API group",
            TRAFFIC_POLICY.replace("group: gateway.networking.k8s.io", "group: ''"),
            (
                0,
                Some("TrafficPolicy default/reviews"),
                Some("spec.targetRefs[1].group"),
                "\"\" is not the group of HTTPRoute; use \"gateway.networking.k8s.io\"",
            ),
        ),
        (
            "traffic policy on an unsupported kind",
            TRAFFIC_POLICY.replace("kind: GRPCRoute", "kind: Gateway"),
            (
                0,
                Some("TrafficPolicy default/reviews"),
                Some("spec.targetRefs[2].kind"),
                "unsupported kind \"Gateway\"; use Service, HTTPRoute or GRPCRoute",
            ),
        ),
        (
            "too many retries, caught by the compiler's check",
            TRAFFIC_POLICY.replace("attempts: 3", "attempts: 11"),
            (0, Some("TrafficPolicy default/reviews"), Some("spec.retries.attempts"), "11 is too many; use 0 to 10"),
        ),
        (
            "per-try timeout longer than the request's",
            TRAFFIC_POLICY.replace("request: 15s", "request: 400ms"),
            (
                0,
                Some("TrafficPolicy default/reviews"),
                Some("spec.retries.perTryTimeout"),
                "500ms is longer than timeouts.request (400ms)",
            ),
        ),
        (
            "unknown load balancer",
            TRAFFIC_POLICY.replace("type: RoundRobin", "type: Maglev"),
            (0, Some("TrafficPolicy default/reviews"), Some("spec.loadBalancer.type"), "unknown variant `Maglev`"),
        ),
        (
            "unknown policy action",
            MESH.split("---").nth(3).unwrap().replace("ALLOW", "PERMIT"),
            (0, Some("AuthorizationPolicy default/reviews-callers"), Some("spec.action"), "unknown variant `PERMIT`"),
        ),
    ];
    for (name, bad, (document, object, field, message)) in cases {
        let dir = TempDir::new("bad");
        dir.write("a-good.yaml", &SERVICE.replace("reviews", "good")).write("b-bad.yaml", &bad);
        let loaded = dir.load();
        let [error] = loaded.errors.as_slice() else { panic!("{name}: expected one error, got {:#?}", loaded.errors) };
        assert_eq!(error.file, dir.0.join("b-bad.yaml"), "{name}");
        assert_eq!(
            (error.document, error.object.as_deref(), error.field.as_deref()),
            (document, object, field),
            "{name}: {error}"
        );
        assert!(error.message.contains(message), "{name}: {error}");
        if name == "broken YAML" {
            assert!(error.message.contains("at line 8 column 1"), "{name}: serde_yaml's position is kept: {error}");
        }
        // The good object next to it still loads.
        assert_eq!(loaded.snapshot.services.first().map(|s| s.id.name.as_str()), Some("good"), "{name}");
    }
}

/// Every field of a TrafficPolicy set, on a Service and both route kinds.
const TRAFFIC_POLICY: &str = "\
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  targetRefs:
  - {group: '', kind: Service, name: reviews}
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}
  - {group: gateway.networking.k8s.io, kind: GRPCRoute, name: ratings}
  timeouts:
    request: 15s
    idle: 10m
  retries:
    attempts: 3
    perTryTimeout: 500ms
    retryOn: [5xx, reset, connect-failure, \"503\", unavailable, \"429\", gateway-error, cancelled, \"503\"]
    backoff: {baseInterval: 10ms, maxInterval: 1s}
    budget: {percent: 12.5, minRetriesPerSecond: 3}
    retryNonIdempotent: true
    maxBodyBytes: 1024
  circuitBreaker: {maxConnections: 10, maxPendingRequests: 20, maxRequests: 30}
  outlierDetection: {consecutive5xx: 3, consecutiveGatewayErrors: 0, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 100}
  loadBalancer: {type: RoundRobin}
  useClientProtocol: true
";

#[test]
fn traffic_policy_loads_into_the_model() {
    let dir = TempDir::new("traffic");
    let minimal = "\
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: minimal, namespace: prod}
spec:
  targetRefs: [{kind: Service, name: ratings}]
  retries: {}
  outlierDetection: {}
  loadBalancer: {}
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: never-idle, namespace: prod}
spec:
  targetRefs: [{kind: Service, name: ratings}]
  timeouts: {idle: 0s}
";
    dir.write("a.yaml", ROUTE_SERVICES)
        .write("b.yaml", &[PRODUCER_ROUTE, GRPC_ROUTE].join("---\n"))
        .write("c.yaml", &format!("{TRAFFIC_POLICY}---\n{minimal}"));
    let loaded = dir.load();
    assert_eq!(loaded.errors, vec![], "{:#?}", loaded.errors);
    let full = TrafficPolicy {
        id: id("reviews"),
        targets: vec![
            TrafficTarget::Service("reviews".into()),
            TrafficTarget::Route { kind: RouteKind::Http, name: "reviews".into() },
            TrafficTarget::Route { kind: RouteKind::Grpc, name: "ratings".into() },
        ],
        settings: TrafficSettings {
            request_timeout: Some(Duration::from_secs(15)),
            retries: Some(RetryPolicy {
                attempts: 3,
                per_try_timeout: Some(Duration::from_millis(500)),
                retry_on: RetryOn {
                    server_errors: true,
                    gateway_errors: true,
                    reset: true,
                    connect_failure: true,
                    statuses: vec![429, 503],
                    grpc: vec![1, 14],
                },
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_secs(1),
                budget_percent: 12.5,
                budget_min_per_second: 3,
                retry_non_idempotent: true,
                max_body_bytes: 1024,
            }),
            circuit_breaker: CircuitBreaker { max_connections: 10, max_pending_requests: 20, max_requests: 30 },
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: 3,
                consecutive_gateway_errors: 0,
                interval: Duration::from_secs(5),
                base_ejection: Duration::from_secs(60),
                max_ejection_percent: 100,
            }),
            load_balancer: LoadBalancer::RoundRobin,
            use_client_protocol: true,
            idle_timeout: Some(Duration::from_secs(600)),
        },
    };
    // Blocks given empty get every default; retryOn the safe set.
    let minimal = TrafficPolicy {
        id: ObjectRef::new("prod", "minimal"),
        targets: vec![TrafficTarget::Service("ratings".into())],
        settings: TrafficSettings {
            retries: Some(RetryPolicy::default()),
            outlier_detection: Some(OutlierDetection::default()),
            ..TrafficSettings::default()
        },
    };
    // "0s": never.
    let never_idle = TrafficPolicy {
        id: ObjectRef::new("prod", "never-idle"),
        targets: vec![TrafficTarget::Service("ratings".into())],
        settings: TrafficSettings { idle_timeout: None, ..TrafficSettings::default() },
    };
    assert_eq!(minimal.settings.idle_timeout, Some(Duration::from_secs(3600)), "an hour without a word");
    assert_eq!(loaded.snapshot.traffic_policies, vec![full.clone(), minimal, never_idle]);
    assert_eq!(
        RetryPolicy::default().retry_on,
        RetryOn { gateway_errors: true, reset: true, connect_failure: true, ..RetryOn::none() }
    );

    // The full one compiles onto the reviews service and both routes; prod has no ratings.
    let compiled = compile(&loaded.snapshot);
    let rejected: Vec<String> = compiled.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        rejected,
        ["minimal", "never-idle"].map(|name| format!(
            "TrafficPolicy prod/{name}: spec.targetRefs[0]: Service prod/ratings does not exist; the policy does not apply to it"
        ))
    );
    let vip = |ip: &str, port| std::net::SocketAddrV4::new(ip.parse().unwrap(), port);
    let reviews = &compiled.l7[&vip("10.96.0.10", 9080)];
    assert_eq!(reviews.traffic, full.settings);
    assert!(reviews.producer.iter().all(|r| r.traffic.as_ref() == Some(&full.settings)));
    let ratings = &compiled.l7[&vip("10.96.0.20", 9090)];
    assert_eq!(ratings.traffic, TrafficSettings::default());
    assert_eq!(ratings.producer[0].traffic.as_ref(), Some(&full.settings));
}

#[test]
fn config_error_display() {
    let error = ConfigError {
        file: "config/a.yaml".into(),
        document: 1,
        object: Some("Service default/reviews".into()),
        field: Some("spec.ports[0].port".into()),
        message: "invalid type: string \"eighty\", expected u16".into(),
    };
    assert_eq!(
        error.to_string(),
        "config/a.yaml: doc 1: Service default/reviews: spec.ports[0].port: invalid type: string \"eighty\", expected u16"
    );
    let error = ConfigError { object: None, field: None, message: "invalid YAML".into(), ..error };
    assert_eq!(error.to_string(), "config/a.yaml: doc 1: invalid YAML");
}

#[test]
fn duplicate_object_in_a_later_file_is_rejected() {
    let dir = TempDir::new("dup");
    dir.write("a.yaml", SERVICE).write("b.yaml", &SERVICE.replace("10.96.0.10", "10.96.0.11"));
    let loaded = dir.load();
    assert_eq!(loaded.snapshot.services.len(), 1);
    assert_eq!(loaded.snapshot.services[0].cluster_ip, Some("10.96.0.10".parse().unwrap()));
    assert_eq!(loaded.objects, 1);
    let [error] = loaded.errors.as_slice() else { panic!("{:#?}", loaded.errors) };
    assert_eq!(
        (error.file.file_name().unwrap().to_str(), error.field.as_deref()),
        (Some("b.yaml"), Some("metadata.name"))
    );
    let first = dir.0.join("a.yaml");
    assert!(error.message.contains(&format!("in {} doc 0", first.display())), "{error}");
}

#[test]
fn reads_only_config_files_in_name_order() {
    let dir = TempDir::new("files");
    let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "None"}}"#;
    dir.write("b.json", json)
        .write("a.yml", &SERVICE.replace("reviews", "a"))
        .write("c.yaml", "# only a comment\n---\n")
        .write(".hidden.yaml", "not: [valid")
        .write("notes.txt", "not: [valid");
    fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    let loaded = dir.load();
    assert_eq!(loaded.errors, vec![]);
    assert_eq!((loaded.files, loaded.objects), (3, 2));
    let names: Vec<_> = loaded.snapshot.services.iter().map(|s| (s.id.name.as_str(), s.cluster_ip)).collect();
    assert_eq!(names, [("a", Some("10.96.0.10".parse().unwrap())), ("b", None)]);
}

#[test]
fn unreadable_directory_is_a_load_error() {
    let missing = std::env::temp_dir().join(format!("weft-api-missing-{}", std::process::id()));
    let error = load_dir(&missing, node()).unwrap_err();
    assert!(matches!(error, LoadError::ReadDir { .. }));
    assert!(error.to_string().starts_with(&format!("cannot read config directory {}: ", missing.display())), "{error}");
}

/// The issue's example: reviews' GETs under /api are open to gold members (a JWT claim), and
/// the old L4 form of a policy still loads next to it.
const L7_POLICIES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: gold-api}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: ALLOW
  rules:
  - to:
    - methods: [GET]
      paths: ["/api/*"]
    when:
    - key: request.auth.claims[groups]
      values: [gold_member]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l4-deny}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: DENY
  rules:
  - from:
    - namespaces: [sandbox]
    to:
    - ports: [80]
---
apiVersion: weft.dev/v1alpha1
kind: JwtPolicy
metadata: {name: issuer}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  rules:
  - issuer: https://issuer.example
    audiences: [reviews]
    jwksUri: https://issuer.example/.well-known/jwks.json
    fromParams: [access_token]
    required: true
"#;

#[test]
fn l7_authorization_and_jwt_policies_load_and_hand_off() {
    let dir = TempDir::new("l7-authz");
    dir.write("a-service.yaml", SERVICE).write("b-policies.yaml", L7_POLICIES);
    let mut loaded = dir.load();
    assert_eq!(loaded.errors, vec![], "{:#?}", loaded.errors);
    assert_eq!(loaded.objects, 4);
    let gold = &loaded.snapshot.policies.iter().find(|p| p.id.name == "gold-api").unwrap().rules[0];
    assert_eq!(gold.to[0].methods, ["GET"]);
    assert_eq!(gold.when[0].key.to_string(), "request.auth.claims[groups]");
    let jwt = &loaded.snapshot.jwt_policies[0];
    assert_eq!(jwt.rules[0].from_params, ["access_token"]);
    assert!(jwt.rules[0].required);
    assert!(
        matches!(jwt.rules[0].jwks, JwksSource::Uri { refresh_interval, .. } if refresh_interval == DEFAULT_JWKS_REFRESH)
    );

    loaded.snapshot.node.proxy = Some("10.0.0.1:15001".parse().unwrap());
    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let vip = "10.96.0.10:80".parse().unwrap();
    assert!(compiled.l7.contains_key(&vip), "reviews:80 is handed to the proxy");
    let dest = weft_policy::authz::Destination { service: Some(vip), workload: None };
    assert!(compiled.authz.needs_l7(&dest));
    assert_eq!(compiled.authz.jwt_rules(&dest).count(), 1);
    let dump = compiled.dump();
    assert_eq!(dump["authz"]["services"]["10.96.0.10:80"]["allow"], serde_json::json!(["default/gold-api"]));
    assert_eq!(dump["authz"]["services"]["10.96.0.10:80"]["deny"], serde_json::json!(["default/l4-deny"]));
}

#[test]
fn nodes_and_peer_authentications_load_and_bad_ones_say_what_to_fix() {
    let dir = TempDir::new("mtls");
    dir.write(
        "mesh.yaml",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\nstatus:\n  addresses: [{type: Hostname, address: n2}, {type: InternalIP, address: 192.168.0.2}]\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: db, namespace: shop}\nspec:\n  selector: {matchLabels: {app: db}}\n  mtls: {mode: STRICT}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: n3}\nstatus:\n  addresses: [{type: Hostname, address: n3}]\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: n4}\nstatus:\n  addresses: [{type: InternalIP, address: 127.0.0.1}]\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: all, namespace: shop}\nspec:\n  mtls: {mode: strict}\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: empty, namespace: shop}\nspec:\n  selector: {matchLabels: {}}\n  mtls: {mode: STRICT}\n",
    );
    let loaded = dir.load();
    assert_eq!(loaded.snapshot.nodes, vec![Node { name: "n2".into(), address: "192.168.0.2".parse().unwrap() }]);
    let db = PeerAuthentication {
        id: ObjectRef::new("shop", "db"),
        selector: Some(BTreeMap::from([("app".to_owned(), "db".to_owned())])),
        mode: MtlsMode::Strict,
    };
    assert_eq!(loaded.snapshot.peer_authentications, vec![db]);
    let errors: Vec<(Option<&str>, Option<&str>, &str)> =
        loaded.errors.iter().map(|e| (e.object.as_deref(), e.field.as_deref(), e.message.as_str())).collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].0 == Some("Node default/n3") && errors[0].2.contains("no IPv4 InternalIP"), "{errors:?}");
    assert!(errors[1].1 == Some("status.addresses[0].address") && errors[1].2.contains("not a node address"), "{errors:?}");
    assert!(errors[2].1 == Some("spec.mtls.mode") && errors[2].2.contains("unknown variant `strict`"), "{errors:?}");
    assert!(errors[3].1 == Some("spec.selector.matchLabels") && errors[3].2.contains("empty"), "{errors:?}");
}
