//! The node proxy on a real kernel: connect4 hands connections over, the proxy identifies them,
//! detects the protocol and routes by Gateway API HTTPRoute. Needs root, like the L4 tests.

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testbed::{
    probe::{n, run as probe},
    Node, Pod, Proc, Testbed,
    agent::{Agent, workload_yaml},
};

const SECS: Duration = Duration::from_secs(20);
const REVIEWS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const V1: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const V2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const DB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);


const USE_PROXY: &str = "  annotations:\n    weft.dev/use-proxy: \"true\"\n";

/// A service's port declared with `appProtocol: app`.
fn declare(service: String, app: &str) -> String {
    service.replace("  - name: web\n", &format!("  - name: web\n    appProtocol: {app}\n"))
}

fn service(name: &str, ns: &str, vip: Ipv4Addr, port: u16, selector: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n{extra}spec:\n  clusterIP: {vip}\n  selector:\n    {selector}\n  ports:\n  - name: web\n    port: {port}\n    targetPort: 8080\n---\n"
    )
}

/// reviews (v1 + v2) with per-version services, a server-first "db", a client in `default` and
/// one in `canary`.
struct Scene {
    tb: Testbed,
    node: Node,
    client: Pod,
    canary: Pod,
    v1: Pod,
    v2: Pod,
    db: Pod,
    _servers: Vec<Proc>,
}

impl Scene {
    fn new() -> Scene {
        let tb = Testbed::new();
        let node = tb.add_node("n1");
        let client = node.add_pod("client");
        let canary = node.add_pod("canary");
        let v1 = node.add_pod("reviews-v1");
        let v2 = node.add_pod("reviews-v2");
        let db = node.add_pod("db");
        let mut servers = Vec::new();
        for (pod, name) in [(&v1, "v1"), (&v2, "v2")] {
            let mut cmd = pod.command(Testbed::probe_path());
            cmd.args(["http-serve", "--port", "8080", "--name", name]);
            servers.push(pod.spawn(cmd));
            pod.wait_listening(8080, Duration::from_secs(5));
        }
        // Speaks first, like a database greeting, then echoes.
        let mut cmd = db.command(Testbed::probe_path());
        cmd.args(["serve", "--port", "8080", "--mode", "reply", "--reply", "hello-from-db"]);
        servers.push(db.spawn(cmd));
        db.wait_listening(8080, Duration::from_secs(5));
        Scene { tb, node, client, canary, v1, v2, db, _servers: servers }
    }

    fn proxy(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.node.ip(), 15001)
    }

    fn base(&self) -> String {
        let mut c = String::new();
        c += &service("reviews", "default", REVIEWS, 9080, "app: reviews", "");
        c += &service("reviews-v1", "default", V1, 9080, "version: v1", "");
        c += &service("reviews-v2", "default", V2, 9080, "version: v2", "");
        c += &service("db", "default", DB, 5432, "app: db", USE_PROXY);
        c + &self.workloads()
    }

    fn workloads(&self) -> String {
        let mut c = String::new();
        c += &workload_yaml(&self.client, "default", &[("app", "client")], 1);
        c += &workload_yaml(&self.canary, "canary", &[("app", "canary")], 1);
        c += &workload_yaml(&self.v1, "default", &[("app", "reviews"), ("version", "v1")], 1);
        c += &workload_yaml(&self.v2, "default", &[("app", "reviews"), ("version", "v2")], 1);
        c += &workload_yaml(&self.db, "default", &[("app", "db")], 1);
        c
    }

    fn agent(&self, config: &str) -> Agent {
        self.agent_with(config, &[])
    }

    fn agent_with(&self, config: &str, extra: &[&str]) -> Agent {
        let proxy = self.proxy().to_string();
        let mut args = vec!["--proxy-addr", &proxy];
        args.extend_from_slice(extra);
        let mut agent = Agent::start(&self.tb, &self.node, &args);
        agent.write_config("mesh.yaml", config);
        agent.wait_ready(SECS);
        agent.wait_generation_after(0, SECS);
        agent
    }
}

/// The producer route of the examples: jason -> v2, /v1only -> v1, else 90/10.
fn reviews_route(w1: u32, w2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n  rules:\n  - matches:\n    - headers:\n      - name: end-user\n        value: jason\n    backendRefs:\n    - name: reviews-v2\n      port: 9080\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /v1only\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n  - backendRefs:\n    - name: reviews-v1\n      port: 9080\n      weight: {w1}\n    - name: reviews-v2\n      port: 9080\n      weight: {w2}\n---\n"
    )
}


fn get(pod: &Pod, count: u32, path: &str, extra: &[&str]) -> Value {
    let addr = format!("{REVIEWS}:9080");
    let count = count.to_string();
    let mut args = vec!["http-get", "--addr", &addr, "--count", &count, "--path", path];
    args.extend_from_slice(extra);
    probe(pod, &args)
}

#[test]
fn weighted_canary_header_and_path_routing_over_http1_and_h2c() {
    let scene = Scene::new();
    let agent = scene.agent(&(scene.base() + &reviews_route(90, 10)));

    let out = get(&scene.client, 1000, "/", &[]);
    assert_eq!(n(&out["codes"]["200"]), 1000, "{out}");
    let v2 = n(&out["served_by"]["v2"]) as f64 / 1000.0;
    // Binomial sd for p=0.1, n=1000 is 0.0095; 0.04 is four of them.
    assert!((v2 - 0.10).abs() < 0.04, "v2 share {v2}, want 0.10: {out}");

    let jason = get(&scene.client, 50, "/", &["--header", "end-user: jason"]);
    assert_eq!(n(&jason["served_by"]["v2"]), 50, "end-user: jason goes to v2: {jason}");
    let v1only = get(&scene.client, 50, "/v1only/page", &[]);
    assert_eq!(n(&v1only["served_by"]["v1"]), 50, "path prefix routes to v1: {v1only}");
    let h2 = get(&scene.client, 50, "/", &["--h2", "--header", "end-user: jason"]);
    assert_eq!(n(&h2["served_by"]["v2"]), 50, "h2c with prior knowledge routes too: {h2}");
    assert_eq!(h2["last_body"]["version"], "HTTP/2.0", "no appProtocol: the upstream gets the client's protocol: {h2}");

    // Golden signals per route, with the source workload.
    let labels = [("source_workload", "client"), ("route", "default/reviews"), ("response_code", "200")];
    let counted = agent.metric("weft_proxy_requests_total", &labels);
    assert_eq!(counted, 1150.0, "every request counted once under its route");
    assert_eq!(agent.metric("weft_proxy_connections_total", &[("protocol", "http2")]), 1.0);
    assert_eq!(agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "handoff")]), 4.0, "one handoff per client connection");
}

#[test]
fn consumer_route_wins_for_its_namespace_only() {
    let scene = Scene::new();
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: canary-to-v2\n  namespace: canary\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    namespace: default\n    port: 9080\n  rules:\n  - backendRefs:\n    - name: reviews-v2\n      namespace: default\n      port: 9080\n";
    let _agent = scene.agent(&(scene.base() + &reviews_route(100, 0) + consumer));
    let canary = get(&scene.canary, 40, "/", &[]);
    assert_eq!(n(&canary["served_by"]["v2"]), 40, "the canary namespace's own route: {canary}");
    let default = get(&scene.client, 40, "/", &[]);
    assert_eq!(n(&default["served_by"]["v1"]), 40, "other clients keep the producer route: {default}");
}

#[test]
fn unmatched_request_gets_404_and_missing_backend_500() {
    let scene = Scene::new();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: narrow\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  rules:\n  - matches:\n    - path:\n        type: Exact\n        value: /only\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n  - matches:\n    - path:\n        type: Exact\n        value: /ghost\n    backendRefs:\n    - name: no-such-service\n      port: 9080\n";
    let agent = scene.agent(&(scene.base() + route));
    assert_eq!(n(&get(&scene.client, 5, "/only", &[])["codes"]["200"]), 5);
    assert_eq!(n(&get(&scene.client, 5, "/elsewhere", &[])["codes"]["404"]), 5, "no rule matches");
    assert_eq!(n(&get(&scene.client, 5, "/ghost", &[])["codes"]["500"]), 5, "unresolvable backendRef");
    assert_eq!(agent.metric("weft_proxy_requests_total", &[("route", "none"), ("response_code", "404")]), 5.0);
}

#[test]
fn server_first_and_opaque_tcp_pass_untouched_without_delay() {
    let scene = Scene::new();
    let agent = scene.agent(&scene.base());
    let started = Instant::now();
    let out = probe(&scene.client, &["connect", "--addr", &format!("{DB}:5432"), "--count", "5", "--read-reply", "--send", "5000"]);
    let elapsed = started.elapsed();
    assert_eq!(n(&out["ok"]), 5, "{out}");
    assert_eq!(n(&out["replies"]["hello-from-db"]), 5, "the server's greeting arrives first: {out}");
    assert_eq!(n(&out["bytes_received"]), 5 * (14 + 5000), "greeting plus the echo, byte for byte: {out}");
    // Detection waits at most --detect-timeout-ms (100 ms) for a silent client.
    assert!(elapsed < Duration::from_secs(3), "5 server-first connections took {elapsed:?}");
    assert_eq!(agent.metric("weft_proxy_connections_total", &[("protocol", "tcp")]), 5.0);
    assert_eq!(agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "handoff")]), 5.0);
}

#[test]
fn connections_without_a_handoff_record_are_refused() {
    let scene = Scene::new();
    let agent = scene.agent(&(scene.base() + &reviews_route(1, 1)));
    let proxy = scene.proxy();
    // From the node itself (not a meshed pod): nothing recorded this connection.
    let read = scene.node.run(move || {
        let mut s = TcpStream::connect_timeout(&proxy.into(), Duration::from_secs(2)).expect("connect to the proxy port");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let _ = std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).map(|_| buf.len())
    });
    assert!(matches!(read, Ok(0) | Err(_)), "closed without an answer: {read:?}");
    let refused = agent.wait_metric("weft_proxy_refused_connections_total", &[("reason", "no_handoff_record")], 1.0, SECS);
    assert_eq!(refused, 1.0);
}

#[test]
fn route_swap_under_load_loses_no_request() {
    let scene = Scene::new();
    let agent = scene.agent(&(scene.base() + &reviews_route(100, 0)));
    let mut cmd = scene.client.command(Testbed::probe_path());
    cmd.args(["http-get", "--addr", &format!("{REVIEWS}:9080"), "--count", "3000", "--path", "/"]);
    let load = scene.client.spawn(cmd);
    for (i, (w1, w2)) in [(0, 100), (50, 50), (100, 0), (10, 90)].into_iter().enumerate() {
        std::thread::sleep(Duration::from_millis(150));
        let g = agent.generation();
        agent.write_config("mesh.yaml", &(scene.base() + &reviews_route(w1, w2)));
        agent.wait_generation_after(g, SECS);
        let _ = i;
    }
    let out: Value = serde_json::from_slice(&load.wait_output(Duration::from_secs(120)).stdout).expect("http-get JSON");
    assert_eq!(n(&out["codes"]["200"]), 3000, "no request failed across four route swaps: {out}");
    assert!(n(&out["served_by"]["v2"]) > 0 && n(&out["served_by"]["v1"]) > 0, "the swaps took effect mid-run: {out}");
}

#[test]
fn filters_redirect_rewrite_headers_and_route_timeout() {
    let scene = Scene::new();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: filters\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /old\n    filters:\n    - type: RequestRedirect\n      requestRedirect:\n        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /new\n        statusCode: 301\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /api\n    filters:\n    - type: URLRewrite\n      urlRewrite:\n        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /v2\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set:\n        - name: x-weft-test\n          value: \"yes\"\n        remove: [\"x-secret\"]\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        add:\n        - name: x-route\n          value: api\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /delay\n    timeouts:\n      request: 300ms\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n";
    let _agent = scene.agent(&(scene.base() + route));

    let redirect = get(&scene.client, 1, "/old/page?x=1", &[]);
    assert_eq!(n(&redirect["codes"]["301"]), 1, "{redirect}");
    assert_eq!(redirect["last_headers"]["location"], format!("http://{REVIEWS}:9080/new/page?x=1"), "{redirect}");

    let api = get(&scene.client, 1, "/api/items", &["--header", "x-secret: hunter2"]);
    assert_eq!(n(&api["codes"]["200"]), 1, "{api}");
    let seen = &api["last_body"];
    assert_eq!(seen["path"], "/v2/items", "prefix rewritten: {api}");
    assert_eq!(seen["headers"]["x-weft-test"], "yes", "request header set: {api}");
    assert!(seen["headers"].get("x-secret").is_none(), "request header removed: {api}");
    assert_eq!(api["last_headers"]["x-route"], "api", "response header added: {api}");

    let fast = get(&scene.client, 2, "/delay/10", &[]);
    assert_eq!(n(&fast["codes"]["200"]), 2, "{fast}");
    let started = Instant::now();
    let slow = get(&scene.client, 3, "/delay/3000", &[]);
    let took = started.elapsed();
    assert_eq!(n(&slow["codes"]["504"]), 3, "the route timeout answers 504: {slow}");
    // Three requests at a 300 ms timeout: not before the timeout, and far from the 3 s delay.
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "3 timed-out requests took {took:?}");
}

/// What a port declares decides what the proxy speaks to its endpoints, whatever the client
/// spoke (as in Istio): its appProtocol, else its name's prefix. A port declared HTTP takes h2c
/// clients too; gRPC always goes as HTTP/2.
#[test]
fn the_ports_declared_protocol_decides_the_upstream_protocol() {
    let scene = Scene::new();
    let mut config = service("reviews", "default", REVIEWS, 9080, "app: reviews", "");
    // Declared by its name alone, Istio's older convention.
    config += &service("reviews-v1", "default", V1, 9080, "version: v1", USE_PROXY).replace("  - name: web\n", "  - name: http-reviews\n");
    config += &declare(service("reviews-v2", "default", V2, 9080, "version: v2", ""), "kubernetes.io/h2c");
    let agent = scene.agent(&(config + &scene.workloads() + &reviews_route(100, 0)));
    let version = |out: &Value| out["last_body"]["version"].as_str().unwrap_or_default().to_owned();

    let h2_to_v1 = get(&scene.client, 5, "/", &["--h2"]);
    assert_eq!(n(&h2_to_v1["served_by"]["v1"]), 5, "{h2_to_v1}");
    assert_eq!(version(&h2_to_v1), "HTTP/1.1", "v1's port is named http-reviews: {h2_to_v1}");
    let h1_to_v2 = get(&scene.client, 5, "/", &["--header", "end-user: jason"]);
    assert_eq!(n(&h1_to_v2["served_by"]["v2"]), 5, "{h1_to_v2}");
    assert_eq!(version(&h1_to_v2), "HTTP/2.0", "v2's port is declared h2c: {h1_to_v2}");

    // Straight to the port declared http: an h2c client is served, not cut off.
    let addr = format!("{V1}:9080");
    let direct = probe(&scene.client, &["http-get", "--addr", &addr, "--count", "5", "--path", "/", "--h2"]);
    assert_eq!(n(&direct["codes"]["200"]), 5, "h2c to a port declared http: {direct}");
    assert_eq!(version(&direct), "HTTP/1.1", "{direct}");
    // gRPC needs HTTP/2 (its status is in the trailers), whatever the port declares.
    let grpc = ["--h2", "--method", "POST", "--header", "content-type: application/grpc", "--header", "te: trailers"];
    let call = probe(&scene.client, &[&["http-get", "--addr", &addr, "--count", "5", "--path", "/reviews.Reviews/Get"][..], &grpc].concat());
    assert_eq!(n(&call["grpc_status"]["0"]), 5, "the trailers came back, so the call went as HTTP/2: {call}");
    assert_eq!(agent.metric("weft_proxy_connections_total", &[("protocol", "http2")]), 3.0);

    // A TrafficPolicy's useClientProtocol: each backend gets the protocol its client spoke.
    let policy = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: as-the-client\n  namespace: default\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  useClientProtocol: true\n";
    let g = agent.generation();
    agent.write_config("client-protocol.yaml", policy);
    agent.wait_generation_after(g, SECS);
    let h2_to_v1 = get(&scene.client, 5, "/", &["--h2"]);
    assert_eq!((n(&h2_to_v1["served_by"]["v1"]), version(&h2_to_v1)), (5, "HTTP/2.0".into()), "{h2_to_v1}");
    let h1_to_v2 = get(&scene.client, 5, "/", &["--header", "end-user: jason"]);
    assert_eq!((n(&h1_to_v2["served_by"]["v2"]), version(&h1_to_v2)), (5, "HTTP/1.1".into()), "{h1_to_v2}");
}

/// A client that sends its head and, later, a small body of known length: the proxy sends the
/// upstream (HTTP/1.1 here) both in one write, one wakeup for the upstream instead of two. A
/// body over the bound streams as it comes.
#[test]
fn a_small_body_sent_late_goes_upstream_with_its_head() {
    let scene = Scene::new();
    let mut config = service("reviews", "default", REVIEWS, 9080, "app: reviews", "");
    config += &declare(service("reviews-v1", "default", V1, 9080, "version: v1", ""), "http");
    let _agent = scene.agent(&(config + &scene.workloads() + &reviews_route(100, 0)));
    let small = "b".repeat(1000);
    for h2 in [false, true] {
        let mut args = vec!["--method", "POST", "--body", &small, "--body-delay-ms", "150"];
        if h2 {
            args.push("--h2");
        }
        let out = get(&scene.client, 3, "/", &args);
        assert_eq!(n(&out["codes"]["200"]), 3, "h2={h2}: {out}");
        assert_eq!(out["last_body"]["body"], small.as_str(), "h2={h2}: the whole body arrives");
        assert_eq!(out["last_body"]["body_with_head"], true, "h2={h2}: the body left with the head: {}", out["last_body"]["body_with_head"]);
    }
    // Over the bound (16 KiB): the head goes at once and the upstream waits for the body.
    let large = "l".repeat(20 * 1024);
    let out = get(&scene.client, 1, "/", &["--method", "POST", "--body", &large, "--body-delay-ms", "150"]);
    assert_eq!(n(&out["codes"]["200"]), 1, "{out}");
    assert_eq!(out["last_body"]["body"].as_str().map(str::len), Some(large.len()));
    assert_eq!(out["last_body"]["body_with_head"], false, "a large body streams behind its head");
}

/// A WebSocket-style upgrade: the request is routed like any other (the header match picks v2,
/// whose port is declared h2c: an upgrade still goes as HTTP/1.1), the 101 comes back with the
/// switch's headers, and then bytes pass both ways on the switched connection. An HTTP/2
/// client's WebSocket (extended CONNECT) takes the same path. Each switch is recorded when its
/// session ends, with the session's bytes.
#[test]
fn an_upgrade_is_routed_then_the_switched_connection_passes_bytes_both_ways() {
    let scene = Scene::new();
    let mut config = service("reviews", "default", REVIEWS, 9080, "app: reviews", "");
    config += &service("reviews-v1", "default", V1, 9080, "version: v1", "");
    config += &declare(service("reviews-v2", "default", V2, 9080, "version: v2", ""), "kubernetes.io/h2c");
    let agent = scene.agent(&(config + &scene.workloads() + &reviews_route(100, 0)));
    let addr = format!("{REVIEWS}:9080");
    let upgrade = |extra: &[&str]| {
        let args = [&["http-upgrade", "--addr", &addr, "--path", "/chat", "--message", "hello", "--message", "and back again"][..], extra];
        probe(&scene.client, &args.concat())
    };

    let out = upgrade(&["--header", "end-user: jason"]);
    assert_eq!(out["status"], 101, "{out}");
    assert_eq!(out["headers"]["x-served-by"], "v2", "routed by the header match: {out}");
    assert_eq!(out["headers"]["x-upgrade-path"], "/chat", "{out}");
    assert_eq!(out["headers"]["upgrade"], "websocket", "{out}");
    assert!(out["headers"]["connection"].as_str().is_some_and(|c| c.eq_ignore_ascii_case("upgrade")), "{out}");
    assert_eq!(out["echoed"], serde_json::json!(["hello", "and back again"]), "bytes pass both ways after the switch: {out}");

    let out = upgrade(&[]);
    assert_eq!((out["status"].as_u64(), out["headers"]["x-served-by"].as_str()), (Some(101), Some("v1")), "{out}");
    assert_eq!(out["echoed"], serde_json::json!(["hello", "and back again"]), "{out}");
    assert_eq!(out["headers"]["x-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==", "the client's key reaches the upstream: {out}");

    // An HTTP/2 client asks by extended CONNECT (RFC 8441): routed the same way, sent upstream
    // as the HTTP/1.1 switch with a key of the proxy's making, answered 200 on the stream.
    let out = upgrade(&["--h2", "--header", "end-user: jason"]);
    assert_eq!((out["status"].as_u64(), out["headers"]["x-served-by"].as_str()), (Some(200), Some("v2")), "{out}");
    assert_eq!(out["headers"]["x-websocket-key"].as_str().map(str::len), Some(24), "a 16-byte key, base64: {out}");
    assert!(out["headers"].get("upgrade").is_none() && out["headers"].get("sec-websocket-accept").is_none(), "{out}");
    assert_eq!(out["echoed"], serde_json::json!(["hello", "and back again"]), "{out}");
    // Each switch is one request, recorded when its session ends, with the session's bytes.
    assert_eq!(agent.wait_metric("weft_proxy_requests_total", &[("response_code", "101"), ("response_class", "1xx")], 2.0, SECS), 2.0);
    let records = agent.wait_access_records(3, SECS, |r| r["path"] == "/chat");
    assert_eq!(records.len(), 3, "{records:?}");
    let codes: Vec<(&str, u64)> = records.iter().filter_map(|r| Some((r["protocol"].as_str()?, r["status"].as_u64()?))).collect();
    assert_eq!(codes.iter().filter(|c| **c == ("HTTP/1.1", 101)).count(), 2, "{records:?}");
    assert_eq!(codes.iter().filter(|c| **c == ("HTTP/2.0", 200)).count(), 1, "{records:?}");
    let sent = ("hello".len() + "and back again".len()) as u64;
    for r in &records {
        assert_eq!(r["completed"].as_bool(), Some(true), "{r}");
        assert_eq!((r["request_bytes"].as_u64(), r["response_bytes"].as_u64()), (Some(sent), Some(sent)), "{r}");
    }
    // The connections are plain keep-alive again for requests that ask for no switch.
    let plain = get(&scene.client, 3, "/", &[]);
    assert_eq!(n(&plain["codes"]["200"]), 3, "{plain}");
}

#[test]
fn passed_through_connections_close_after_their_idle_timeout() {
    let scene = Scene::new();
    let policy = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: idle\n  namespace: default\nspec:\n  \
                  targetRefs:\n  - {kind: Service, name: reviews}\n  - {kind: Service, name: db}\n  timeouts:\n    idle: 1s\n---\n";
    let agent = scene.agent(&(scene.base() + &reviews_route(100, 0) + policy));
    let l7 = &agent.config_dump()["compiled"]["l7"];
    assert_eq!(l7[format!("{DB}:5432")]["traffic"]["idle_timeout"], "1s", "{l7}");

    // Opaque TCP (the server-first db): a pause shorter than the timeout keeps the connection,
    // a longer one ends it, so the bytes sent after it are never echoed.
    let db = format!("{DB}:5432");
    let pause = |ms: &str| probe(&scene.client, &["connect", "--addr", &db, "--read-reply", "--send", "5000", "--pause-ms", ms]);
    let out = pause("300");
    assert_eq!((n(&out["ok"]), n(&out["bytes_received"])), (1, 14 + 5000), "greeting and echo: {out}");
    let out = pause("2500");
    assert_eq!(n(&out["bytes_received"]), 14, "the greeting only; the proxy closed the idle connection: {out}");

    // A switched connection (WebSocket): the same, and the session is recorded as incomplete.
    let addr = format!("{REVIEWS}:9080");
    let upgrade = |ms: &str| {
        probe(&scene.client, &["http-upgrade", "--addr", &addr, "--path", "/chat", "--message", "hello", "--message", "still here", "--pause-ms", ms])
    };
    let out = upgrade("300");
    assert_eq!((out["status"].as_u64(), &out["echoed"]), (Some(101), &serde_json::json!(["hello", "still here"])), "{out}");
    assert!(out["ended"].is_null(), "{out}");
    let out = upgrade("2500");
    assert_eq!((out["status"].as_u64(), &out["echoed"]), (Some(101), &serde_json::json!(["hello"])), "{out}");
    assert!(out["ended"].as_str().is_some_and(|e| e.ends_with("at message 1")), "closed while idle: {out}");
    let records = agent.wait_access_records(2, SECS, |r| r["path"] == "/chat");
    let sessions: Vec<(Option<bool>, Option<u64>, Option<u64>)> =
        records.iter().map(|r| (r["completed"].as_bool(), r["request_bytes"].as_u64(), r["response_bytes"].as_u64())).collect();
    assert_eq!(sessions, [(Some(true), Some(15), Some(15)), (Some(false), Some(5), Some(5))], "{records:?}");
}

#[test]
fn grpc_method_routing() {
    let scene = Scene::new();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: reviews-grpc\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  rules:\n  - matches:\n    - method:\n        service: reviews.Reviews\n        method: Get\n    backendRefs:\n    - name: reviews-v2\n      port: 9080\n  - backendRefs:\n    - name: reviews-v1\n      port: 9080\n";
    let agent = scene.agent(&(scene.base() + route));
    let grpc = ["--h2", "--method", "POST", "--header", "content-type: application/grpc", "--header", "te: trailers"];
    let get_call = get(&scene.client, 10, "/reviews.Reviews/Get", &grpc);
    assert_eq!(n(&get_call["served_by"]["v2"]), 10, "the Get method goes to v2: {get_call}");
    let list_call = get(&scene.client, 10, "/reviews.Reviews/List", &grpc);
    assert_eq!(n(&list_call["served_by"]["v1"]), 10, "other methods go to v1: {list_call}");
    let grpc_requests = agent.metric("weft_proxy_requests_total", &[("request_protocol", "grpc"), ("route", "default/reviews-grpc")]);
    assert_eq!(grpc_requests, 20.0);
    assert_eq!(n(&get_call["grpc_status"]["0"]), 10, "the upstream's trailers reach the client: {get_call}");

    // The status of a gRPC call travels in the trailers, after the 200: the metrics read it there.
    let unavailable = [&grpc[..], &["--header", "x-grpc-status: 14"]].concat();
    let failing = get(&scene.client, 7, "/reviews.Reviews/List", &unavailable);
    assert_eq!(n(&failing["grpc_status"]["14"]), 7, "{failing}");
    let by_status = |code| agent.metric("weft_proxy_requests_total", &[("response_code", "200"), ("grpc_status", code)]);
    assert_eq!(by_status("14"), 7.0);
    assert_eq!(by_status("0"), 20.0);
}

#[test]
fn spans_are_exported_over_otlp_with_the_callers_parent() {
    let scene = Scene::new();
    let spans_file = std::env::temp_dir().join(format!("weft-test-{}-spans.jsonl", scene.tb.id()));
    let mut sink = scene.node.command(Testbed::probe_path());
    sink.args(["otlp-sink", "--listen", "127.0.0.1:4318", "--out"]).arg(&spans_file);
    let _sink = scene.node.spawn(sink);
    scene.node.wait_listening(4318, SECS);
    let agent = scene.agent_with(
        &(scene.base() + &reviews_route(100, 0)),
        &["--otlp-endpoint", "http://127.0.0.1:4318", "--trace-sample", "0"],
    );
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let out = get(&scene.client, 5, "/traced", &["--header", &format!("traceparent: {caller}")]);
    assert_eq!(n(&out["codes"]["200"]), 5, "{out}");
    // Without a caller's context and a sample rate of 0, the proxy starts unsampled traces.
    let fresh = get(&scene.client, 5, "/untraced", &[]);
    let flags = fresh["last_body"]["headers"]["traceparent"].as_str().unwrap_or_default().rsplit('-').next().map(str::to_owned);
    assert_eq!(flags.as_deref(), Some("00"), "new traces unsampled at --trace-sample 0: {fresh}");

    let deadline = Instant::now() + SECS;
    let spans: Vec<Value> = loop {
        let text = std::fs::read_to_string(&spans_file).unwrap_or_default();
        let spans: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if spans.len() >= 5 || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&spans_file);
    assert_eq!(spans.len(), 5, "one span per sampled request, none for unsampled ones: {spans:?}");
    let upstream_span = out["last_body"]["headers"]["traceparent"].as_str().unwrap_or_default().split('-').nth(2).map(str::to_owned);
    for s in &spans {
        assert_eq!(s["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{s}");
        assert_eq!(s["parent_span_id"], "00f067aa0ba902b7", "the caller's span is the parent: {s}");
        assert_eq!(s["attributes"]["weft.route"], "default/reviews", "{s}");
        assert_eq!(s["attributes"]["http.response.status_code"], 200, "{s}");
        assert_eq!(s["attributes"]["url.path"], "/traced", "{s}");
        assert_eq!(s["resource"]["service.name"], "weft-proxy", "{s}");
        assert!(s["end_ns"].as_u64() >= s["start_ns"].as_u64(), "{s}");
    }
    // The span the upstream was told is its parent is one of the exported ones.
    assert!(spans.iter().any(|s| s["span_id"].as_str() == upstream_span.as_deref()), "{upstream_span:?} in {spans:?}");
    assert_eq!(agent.wait_metric("weft_proxy_spans_total", &[("result", "exported")], 5.0, SECS), 5.0);
}

#[test]
fn mirror_receives_copies_whose_responses_are_dropped() {
    let scene = Scene::new();
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: shadow\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror:\n        backendRef:\n          name: reviews-v2\n          port: 9080\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n";
    let agent = scene.agent(&(scene.base() + route));
    let out = get(&scene.client, 30, "/", &[]);
    assert_eq!(n(&out["served_by"]["v1"]), 30, "the client only sees the primary's answers: {out}");
    // The copies arrive at v2 (asked directly, pod to pod, not through the mesh).
    let v2 = format!("{}:8080", scene.v2.ip());
    let deadline = Instant::now() + SECS;
    let served = loop {
        let count = probe(&scene.client, &["http-get", "--addr", &v2, "--path", "/__count"]);
        let served = n(&count["last_body"]["served"]);
        if served >= 30 || Instant::now() > deadline {
            break served;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(served, 30, "every request was mirrored to v2");
    assert_eq!(agent.wait_metric("weft_proxy_mirrored_requests_total", &[("result", "sent")], 30.0, SECS), 30.0);
}

#[test]
fn trace_context_continues_and_access_log_matches_traffic() {
    let scene = Scene::new();
    let agent = scene.agent(&(scene.base() + &reviews_route(100, 0)));
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let out = get(&scene.client, 20, "/traced", &["--header", &format!("traceparent: {caller}")]);
    assert_eq!(n(&out["codes"]["200"]), 20, "{out}");
    let seen = out["last_body"]["headers"]["traceparent"].as_str().unwrap_or_default().to_owned();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "upstream saw a traceparent: {out}");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace: {seen}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "a new span for the proxy hop: {seen}");
    let request_id = &out["last_headers"]["x-request-id"];
    assert!(request_id.is_string(), "the client gets the request id: {out}");
    assert_eq!(&out["last_body"]["headers"]["x-request-id"], request_id, "the upstream saw the same id");

    // One access record per request, agreeing with the traffic.
    let records = agent.wait_access_records(20, SECS, |r| r["kind"] == "http" && r["path"] == "/traced");
    assert_eq!(records.len(), 20, "records: {records:?}");
    for r in &records {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["route"], "default/reviews", "{r}");
        assert_eq!(r["source"]["workload"], "client", "{r}");
        assert_eq!(r["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{r}");
        assert_eq!(r["parent_span_id"], "00f067aa0ba902b7", "{r}");
        assert_eq!(r["original_destination"], format!("{REVIEWS}:9080"), "{r}");
        assert_eq!(r["upstream"], format!("{}:8080", scene.v1.ip()), "{r}");
    }
}

#[test]
fn idle_keep_alive_connections_are_parked_and_resume_without_loss() {
    let scene = Scene::new();
    let agent = scene.agent(&(scene.base() + &reviews_route(100, 0)));
    // Pauses from 0 to 700 ms cross the moment the proxy parks the connection (after 100-150 ms
    // idle); two pipelined requests each round must both be answered, on the same connection.
    let addr = format!("{REVIEWS}:9080");
    let out = probe(&scene.client, &["http-pipeline", "--addr", &addr, "--rounds", "12", "--max-pause-ms", "700"]);
    assert_eq!(n(&out["ok"]), 24, "{out}");
    assert_eq!(agent.metric("weft_proxy_connections_total", &[("protocol", "http1")]), 1.0, "one client connection throughout");

    // Held idle connections all end up parked, and still work afterwards.
    let mut hold = scene.client.command(Testbed::probe_path());
    hold.args(["hold-many", "--addr", &addr, "--count", "20", "--duration-ms", "3000"]);
    let held = scene.client.spawn(hold);
    assert_eq!(agent.wait_metric("weft_proxy_parked_connections", &[], 20.0, SECS), 20.0);
    let out = held.wait_output(SECS);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(agent.wait_metric("weft_proxy_parked_connections", &[], 0.0, SECS), 0.0, "closed connections leave the parked set");
}
