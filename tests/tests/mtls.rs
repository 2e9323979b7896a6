//! Two nodes joined by a link, an agent on each: meshed traffic to a STRICT workload on the
//! other node goes through the tunnel (mutual TLS with the caller's identity, which the
//! destination sees and judges); plaintext from outside the mesh is dropped by the
//! destination's kernel; a node whose root is not trusted is refused; certificates renew under
//! load without a failed request. Needs root.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testbed::{
    Node, Pod, Proc, Testbed,
    agent::{Agent, sum_samples},
    probe::{n, run as probe},
};

const SECS: Duration = Duration::from_secs(20);
const SRV: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const SRV_HTTP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 51);
const OPEN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 52);
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SRV_ID: &str = "spiffe://cluster.local/ns/default/sa/srv";

/// A Workload on `node`; `meshed: false` stands for a pod outside the mesh.
fn workload(pod: &Pod, node: &Node, meshed: bool) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\nspec:\n  serviceAccount: {name}\n  addresses: [\"{ip}\"]\n  cgroupPath: {cgroup}\n  node: {node}\n  meshed: {meshed}\n---\n",
        name = pod.name(),
        ip = pod.ip(),
        cgroup = pod.cgroup_path().display(),
        node = node.name(),
    )
}

fn node_object(node: &Node) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{ip}\"}}]\n---\n",
        name = node.name(),
        ip = node.ip(),
    )
}

fn service(name: &str, vip: Ipv4Addr, port: u16, target: u16, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: {app}}}\n  ports: [{{name: main, port: {port}, targetPort: {target}}}]\n---\n"
    )
}

fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: srv-mtls, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: srv}}}}\n  mtls: {{mode: {mode}}}\n---\n"
    )
}

/// An HTTPRoute on srv-http: its traffic takes the proxy's HTTP path (pooled HTTP/1.1
/// through the tunnel) rather than opaque TCP.
const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: srv-http, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: srv-http, port: 80}]\n  rules:\n  - backendRefs: [{name: srv-http, port: 80}]\n---\n";

struct Scene {
    _tb: Testbed,
    n2: Node,
    client: Pod,
    intruder: Pod,
    neighbor: Pod,
    srv: Pod,
    open: Pod,
    agents: [Agent; 2],
    _servers: Vec<Proc>,
    base: String,
}

impl Scene {
    /// `n2_extra`: more flags for node 2's agent (e.g. its own CA).
    fn new(extra: &[&str], n2_extra: &[&str]) -> Scene {
        let tb = Testbed::new();
        let (n1, n2) = (tb.add_node("n1"), tb.add_node("n2"));
        tb.connect_nodes(&n1, &n2);
        let (client, intruder) = (n1.add_pod("client"), n1.add_pod("intruder"));
        let (srv, open, neighbor) = (n2.add_pod("srv"), n2.add_pod("open"), n2.add_pod("neighbor"));
        let mut servers = Vec::new();
        for pod in [&srv, &open] {
            let mut cmd = pod.command(Testbed::probe_path());
            cmd.args(["serve", "--port", "9000", "--mode", "reply", "--reply", pod.name()]);
            servers.push(pod.spawn(cmd));
            pod.wait_listening(9000, Duration::from_secs(5));
        }
        let mut cmd = srv.command(Testbed::probe_path());
        cmd.args(["http-serve", "--port", "8080", "--name", "srv"]);
        servers.push(srv.spawn(cmd));
        srv.wait_listening(8080, Duration::from_secs(5));

        let start = |node: &Node, more: &[&str]| {
            let proxy = format!("{}:15001", node.ip());
            let mut args = vec!["--proxy-addr", &proxy, "--node-name", node.name()];
            args.extend_from_slice(extra);
            args.extend_from_slice(more);
            let mut agent = Agent::start(&tb, node, &args);
            agent.wait_ready(SECS);
            agent
        };
        let agents = [start(&n1, &[]), start(&n2, n2_extra)];
        let mut base = node_object(&n1) + &node_object(&n2);
        base += &service("srv", SRV, 9000, 9000, "srv");
        base += &service("srv-http", SRV_HTTP, 80, 8080, "srv");
        base += &service("open", OPEN, 9000, 9000, "open");
        base += ROUTE;
        for (pod, node, meshed) in [
            (&client, &n1, true),
            (&intruder, &n1, false),
            (&srv, &n2, true),
            (&open, &n2, true),
            (&neighbor, &n2, true),
        ] {
            base += &workload(pod, node, meshed);
        }
        let scene = Scene { _tb: tb, n2, client, intruder, neighbor, srv, open, agents, _servers: servers, base };
        scene.configure(&peer_authentication("STRICT"));
        scene
    }

    /// The same config on both nodes, plus `more`; waits until both run it.
    fn configure(&self, more: &str) {
        for agent in &self.agents {
            let before = agent.generation();
            agent.write_config("mesh.yaml", &format!("{}{more}", self.base));
            agent.wait_generation_after(before, SECS);
        }
    }

    fn metric(&self, node: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.agents[node].metrics(), name, labels)
    }
}

/// `count` connections from `pod` to `addr`, each reading the server's reply line.
fn connect(pod: &Pod, addr: String, count: u32, timeout_ms: u32) -> Value {
    probe(
        pod,
        &[
            "--timeout-ms",
            &timeout_ms.to_string(),
            "connect",
            "--addr",
            &addr,
            "--count",
            &count.to_string(),
            "--read-reply",
        ],
    )
}

#[test]
fn strict_workload_is_reached_through_the_tunnel_with_the_callers_identity() {
    let scene = Scene::new(&[], &[]);
    let dump = scene.agents[0].config_dump();
    let flags = &dump["compiled"]["workload_ips"][scene.srv.ip().to_string()]["flags"];
    assert_eq!(flags, &serde_json::json!(["STRICT", "TUNNEL"]), "node 1 sees srv as remote STRICT: {dump}");
    assert_eq!(dump["compiled"]["mtls"]["default/srv"]["mode"], "STRICT");
    assert_eq!(dump["compiled"]["mtls"]["default/open"]["mode"], "PERMISSIVE");

    // By service (handed to the proxy only for the tunnel), by pod IP (connect4), and over the
    // proxy's HTTP path.
    let by_vip = connect(&scene.client, format!("{SRV}:9000"), 5, 5000);
    assert_eq!(n(&by_vip["ok"]), 5, "{by_vip}");
    assert_eq!(by_vip["replies"]["srv"], 5, "{by_vip}");
    let by_ip = connect(&scene.client, format!("{}:9000", scene.srv.ip()), 5, 5000);
    assert_eq!(n(&by_ip["ok"]), 5, "{by_ip}");
    let http = probe(&scene.client, &["http-get", "--addr", &format!("{SRV_HTTP}:80"), "--count", "5"]);
    assert_eq!(http["codes"]["200"], 5, "{http}");
    let h2 = probe(&scene.client, &["http-get", "--addr", &format!("{SRV_HTTP}:80"), "--count", "5", "--h2"]);
    assert_eq!(h2["codes"]["200"], 5, "{h2}");

    // The destination saw the caller's certificate identity on every stream.
    let seen = [("source_principal", CLIENT_ID), ("destination_principal", SRV_ID), ("result", "ok")];
    let streams = scene.metric(1, "weft_tunnel_inbound_streams_total", &seen);
    assert!(
        streams >= 11.0,
        "node 2 accepted {streams} tunnel streams from {CLIENT_ID}:\n{}",
        scene.agents[1].metrics()
    );
    assert!(scene.metric(0, "weft_datapath_events_total", &[("hook", "connect4"), ("event", "tunnel")]) >= 5.0);
    assert!(scene.metric(1, "weft_tunnel_handshakes_total", &[("direction", "inbound"), ("result", "ok")]) >= 1.0);

    // The destination judges that identity: an ALLOW for another service account shuts the
    // caller out at node 2 (node 1 has no policy selecting the service).
    let allow = |sa: &str| {
        format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: srv-callers, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: srv}}}}\n  action: ALLOW\n  rules: [{{from: [{{serviceAccounts: [{sa}]}}]}}]\n---\n"
        )
    };
    scene.configure(&(peer_authentication("STRICT") + &allow("someone-else")));
    let denied = connect(&scene.client, format!("{SRV}:9000"), 3, 5000);
    assert_eq!(n(&denied["ok"]), 0, "{denied}");
    let refused = [("source_principal", CLIENT_ID), ("result", "denied")];
    assert!(scene.metric(1, "weft_tunnel_inbound_streams_total", &refused) >= 3.0, "{}", scene.agents[1].metrics());
    // No ALLOW rule matched, so no single policy is to blame: the reason says so.
    let counted =
        scene.metric(1, "weft_proxy_authz_refusals_total", &[("kind", "authz"), ("reason", "no_allow_match")]);
    assert!(counted >= 3.0, "refusals counted: {counted}\n{}", scene.agents[1].metrics());

    scene.configure(&(peer_authentication("STRICT") + &allow("client")));
    let allowed = connect(&scene.client, format!("{SRV}:9000"), 3, 5000);
    assert_eq!(n(&allowed["ok"]), 3, "{allowed}");
}

/// Request rules of a selector policy are judged by the destination node's proxy, which
/// serves the tunnel stream as HTTP: what the rule allows passes, the rest gets the
/// destination's 403 with its reason, over HTTP/1.1 and h2c; the source node, which no policy
/// of the service binds, refuses nothing. Opaque traffic to that workload fails closed.
#[test]
fn request_rules_of_the_destination_are_judged_there() {
    // Two tunnel connections per identity pair: this caller's streams take both in turn.
    let scene = Scene::new(&["--tunnel-connections", "2"], &[]);
    let policy = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: srv-paths, namespace: default}\nspec:\n  selector: {matchLabels: {app: srv}}\n  action: ALLOW\n  rules: [{from: [{serviceAccounts: [client]}], to: [{paths: [\"/public/*\"]}]}]\n---\n";
    scene.configure(&(peer_authentication("STRICT") + policy));
    let get = |path: &str, h2: bool| {
        let mut args = vec!["http-get", "--addr", "10.96.0.51:80", "--count", "3", "--path", path];
        if h2 {
            args.push("--h2");
        }
        probe(&scene.client, &args)
    };
    for h2 in [false, true] {
        let allowed = get("/public/page", h2);
        assert_eq!(allowed["codes"]["200"], 3, "h2={h2}: {allowed}");
        let refused = get("/private/page", h2);
        assert_eq!(refused["codes"]["403"], 3, "h2={h2}: {refused}");
    }
    // A protocol switch is judged like any request, then the switched connection carries
    // bytes both ways through the tunnel and the destination's proxy.
    let upgrade = |path: &str| {
        probe(&scene.client, &["http-upgrade", "--addr", "10.96.0.51:80", "--path", path, "--message", "over the tunnel"])
    };
    let switched = upgrade("/public/chat");
    assert_eq!(switched["status"], 101, "{switched}");
    assert_eq!(switched["echoed"], serde_json::json!(["over the tunnel"]), "{switched}");
    let refused = upgrade("/private/chat");
    assert_eq!(refused["status"], 403, "{refused}");
    let at_destination =
        scene.metric(1, "weft_proxy_authz_refusals_total", &[("kind", "authz"), ("reason", "no_allow_match")]);
    assert!(at_destination >= 6.0, "node 2 refused the private requests: {}", scene.agents[1].metrics());
    let at_source = scene.metric(0, "weft_proxy_authz_refusals_total", &[]);
    assert_eq!(at_source, 0.0, "node 1 refused nothing itself: {}", scene.agents[0].metrics());

    let opaque = connect(&scene.client, format!("{SRV}:9000"), 1, 2000);
    assert_eq!(n(&opaque["ok"]), 0, "a connection that is not HTTP cannot satisfy a path rule: {opaque}");

    let dialled = scene.metric(0, "weft_tunnel_handshakes_total", &[("direction", "outbound"), ("result", "ok")]);
    assert_eq!(dialled, 2.0, "node 1 dialled both of the pair's connections: {}", scene.agents[0].metrics());
    assert_eq!(scene.agents[0].config_dump()["agent"]["tunnel_connections"], 2);
}

#[test]
fn plaintext_to_a_strict_workload_is_refused_by_its_kernel() {
    let scene = Scene::new(&[], &[]);
    let event = |hook: &str, event: &str| scene.metric(1, "weft_datapath_events_total", &[("hook", hook), ("event", event)]);
    // From outside the mesh, straight to the pod: the SYN never reaches the server. The pod's
    // namespace has weft_sk_lookup, so the client is refused at once rather than timing out.
    // (Attached once a process in the pod's cgroup shows its namespace: retried every second.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let srv_cgroup = scene.srv.cgroup_path().display().to_string();
    let (dump, srv) = loop {
        let dump = scene.agents[1].config_dump();
        let attached = dump["datapath"]["attached"].as_array().cloned().unwrap_or_default();
        let srv = attached.into_iter().find(|a| a["path"] == srv_cgroup.as_str()).unwrap_or_default();
        if srv["sk_lookup"]["state"] == "attached" || Instant::now() > deadline {
            break (dump, srv);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(srv["sk_lookup"]["state"], "attached", "node 2 attached sk_lookup to srv's namespace: {dump}");
    let (refused, dropped) = (event("sk_lookup", "strict_refused"), event("ingress", "strict_dropped"));
    let started = Instant::now();
    let out = connect(&scene.intruder, format!("{}:9000", scene.srv.ip()), 1, 5000);
    assert_eq!(out["errors"]["ECONNREFUSED"], 1, "refused with a reset, not dropped: {out}");
    assert!(started.elapsed() < Duration::from_secs(4), "refused before the 5 s connect timeout: {out}");
    assert!(event("sk_lookup", "strict_refused") > refused, "node 2 counted no refusal:\n{}", scene.agents[1].metrics());
    assert_eq!(event("ingress", "strict_dropped"), dropped, "the SYN did not get as far as the cgroup filter");

    // Without sk_lookup (its pin removed: the link goes with it), the cgroup filter still drops.
    let pin_root = dump["datapath"]["pin_root"].as_str().expect("pin_root").to_owned();
    std::fs::remove_file(format!("{pin_root}/links/{}/weft_sk_lookup", srv["cgroup_id"])).expect("unpin sk_lookup");
    let out = connect(&scene.intruder, format!("{}:9000", scene.srv.ip()), 1, 1500);
    assert_eq!(out["errors"]["ETIMEDOUT"], 1, "dropped: {out}");
    assert!(event("ingress", "strict_dropped") > dropped, "node 2 counted no dropped SYN:\n{}", scene.agents[1].metrics());
    // The same pod reaches a PERMISSIVE workload, and a meshed pod of srv's own node reaches srv.
    let out = connect(&scene.intruder, format!("{}:9000", scene.open.ip()), 1, 5000);
    assert_eq!(n(&out["ok"]), 1, "{out}");
    let out = connect(&scene.neighbor, format!("{}:9000", scene.srv.ip()), 1, 5000);
    assert_eq!(n(&out["ok"]), 1, "{out}");
    assert!(scene.metric(1, "weft_datapath_events_total", &[("hook", "ingress"), ("event", "strict_admitted")]) >= 1.0);

    // PERMISSIVE again: plaintext is accepted.
    scene.configure(&peer_authentication("PERMISSIVE"));
    let out = connect(&scene.intruder, format!("{}:9000", scene.srv.ip()), 1, 5000);
    assert_eq!(n(&out["ok"]), 1, "{out}");
    assert_eq!(scene.agents[1].config_dump()["compiled"]["mtls"]["default/srv"]["mode"], "PERMISSIVE");
    let _ = &scene.n2;
}

#[test]
fn a_node_whose_root_is_not_trusted_is_refused() {
    let dir = std::env::temp_dir().join(format!("weft-test-mtls-other-ca-{}", std::process::id()));
    let other = dir.display().to_string();
    let scene = Scene::new(&[], &["--ca-dir", &other]);
    let out = connect(&scene.client, format!("{SRV}:9000"), 2, 5000);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(n(&out["ok"]), 0, "{out}");
    let failed = scene.metric(0, "weft_tunnel_outbound_streams_total", &[("result", "tls_failed")]);
    assert!(failed >= 1.0, "node 1 counted no failed handshake:\n{}", scene.agents[0].metrics());
    assert_eq!(scene.metric(1, "weft_tunnel_inbound_streams_total", &[("result", "ok")]), 0.0);
}

#[test]
fn certificates_renew_under_load_without_a_failed_request() {
    // 3 s certificates renew every 1.5 s: 8 s of load spans several renewals on both ends.
    let scene = Scene::new(&["--cert-ttl", "3s"], &[]);
    let deadline = Instant::now() + Duration::from_secs(8);
    let (mut rounds, mut ok) = (0, 0);
    while Instant::now() < deadline && rounds < 1000 {
        let out = connect(&scene.client, format!("{SRV}:9000"), 10, 5000);
        assert_eq!(n(&out["ok"]), 10, "round {rounds} failed: {out}");
        let http = probe(&scene.client, &["http-get", "--addr", &format!("{SRV_HTTP}:80"), "--count", "10"]);
        assert_eq!(http["codes"]["200"], 10, "round {rounds} failed: {http}");
        ok += 20;
        rounds += 1;
    }
    assert!(rounds >= 3, "only {rounds} rounds ran");
    let seen = [("source_principal", CLIENT_ID), ("result", "ok")];
    assert!(scene.metric(1, "weft_tunnel_inbound_streams_total", &seen) >= f64::from(ok) / 2.0);

    // The first certificates expired long ago; a new tunnel (node 2's agent restarted, so
    // node 1 must handshake again) works only with renewed ones on both ends.
    let mut scene = scene;
    scene.agents[1].restart();
    scene.agents[1].wait_ready(SECS);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = connect(&scene.client, format!("{SRV}:9000"), 1, 2000);
        if n(&out["ok"]) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no new tunnel after the restart: {out}\n{}", scene.agents[0].metrics());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = connect(&scene.client, format!("{SRV}:9000"), 10, 5000);
    assert_eq!(n(&out["ok"]), 10, "{out}");
    assert!(scene.metric(1, "weft_tunnel_handshakes_total", &[("direction", "inbound"), ("result", "ok")]) >= 1.0);
    let _ = (&scene.open, &scene.neighbor, &scene.intruder);
}
