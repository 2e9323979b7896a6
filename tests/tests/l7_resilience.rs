//! TrafficPolicy on a real kernel + proxy: retries and their budget, circuit breaking, outlier
//! ejection and restore. Backends fail deterministically (`weft-probe http-serve --fail-every`).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use serde_json::Value;
use weft_testbed::{
    probe::{n, run as probe},
    Node, Pod, Proc, Testbed,
    agent::{Agent, workload_yaml},
};

const SECS: Duration = Duration::from_secs(20);
const FLAKY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 1);
const MIXED: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 2);
const SLOW: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 3);



struct Scene {
    tb: Testbed,
    node: Node,
    client: Pod,
    flaky: Pod,
    good: Pod,
    bad: Pod,
    _servers: Vec<Proc>,
}

impl Scene {
    fn new() -> Scene {
        let tb = Testbed::new();
        let node = tb.add_node("n1");
        let client = node.add_pod("client");
        let flaky = node.add_pod("flaky");
        let good = node.add_pod("good");
        let bad = node.add_pod("bad");
        let mut servers = Vec::new();
        // flaky: every 2nd request fails (50%); bad: every request fails.
        for (pod, fail_every) in [(&flaky, "2"), (&good, "0"), (&bad, "1")] {
            let mut cmd = pod.command(Testbed::probe_path());
            cmd.args(["http-serve", "--port", "8080", "--name", pod.name(), "--fail-every", fail_every]);
            servers.push(pod.spawn(cmd));
            pod.wait_listening(8080, Duration::from_secs(5));
        }
        Scene { tb, node, client, flaky, good, bad, _servers: servers }
    }

    fn config(&self, policy: &str) -> String {
        let svc = |name: &str, vip: Ipv4Addr, selector: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {vip}\n  selector:\n    {selector}\n  ports:\n  - name: web\n    port: 80\n    targetPort: 8080\n---\n")
        };
        let mut c = svc("flaky", FLAKY, "app: flaky") + &svc("mixed", MIXED, "tier: mixed") + &svc("slow", SLOW, "app: good");
        c += &workload_yaml(&self.client, "default", &[("app", "client")], 1);
        c += &workload_yaml(&self.flaky, "default", &[("app", "flaky")], 1);
        c += &workload_yaml(&self.good, "default", &[("app", "good"), ("tier", "mixed")], 1);
        c += &workload_yaml(&self.bad, "default", &[("app", "bad"), ("tier", "mixed")], 1);
        c + policy
    }

    fn agent(&self, policy: &str) -> Agent {
        let proxy = SocketAddrV4::new(self.node.ip(), 15001);
        let mut agent = Agent::start(&self.tb, &self.node, &["--proxy-addr", &proxy.to_string()]);
        agent.write_config("mesh.yaml", &self.config(policy));
        agent.wait_ready(SECS);
        agent.wait_generation_after(0, SECS);
        agent
    }

    fn get(&self, vip: Ipv4Addr, count: u32, path: &str) -> Value {
        probe(&self.client, &["http-get", "--addr", &format!("{vip}:80"), "--count", &count.to_string(), "--path", path])
    }
}

fn policy(service: &str, spec: &str) -> String {
    format!("apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {service}-policy\n  namespace: default\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: {service}\n{spec}")
}

#[test]
fn retries_mask_a_backend_failing_half_the_requests() {
    let scene = Scene::new();
    let spec = "  retries:\n    attempts: 2\n    retryOn: [\"5xx\"]\n    backoff:\n      baseInterval: 1ms\n      maxInterval: 5ms\n    budget:\n      percent: 100\n      minRetriesPerSecond: 10\n";
    let agent = scene.agent(&policy("flaky", spec));
    let out = scene.get(FLAKY, 200, "/");
    let retries = || {
        let text = agent.metrics();
        text.lines().filter(|l| l.starts_with("weft_proxy_retries_total") || l.starts_with("weft_proxy_upstream")).collect::<Vec<_>>().join("\n")
    };
    assert_eq!(n(&out["codes"]["200"]), 200, "every failure was retried away: {out}\n{}", retries());
    // Every 2nd try fails and requests are sequential, so each request's first try fails and
    // its retry succeeds: half of all tries failed, none reached the client.
    let retried = agent.metric("weft_proxy_retries_total", &[("result", "retried")]);
    assert_eq!(retried, 200.0, "one retry per request");

    // POST is not idempotent: not retried unless the policy says retryNonIdempotent.
    let posts = probe(&scene.client, &["http-get", "--addr", &format!("{FLAKY}:80"), "--count", "20", "--method", "POST"]);
    assert_eq!(n(&posts["codes"]["503"]), 10, "every other POST fails and is not retried: {posts}");
    assert_eq!(agent.metric("weft_proxy_retries_total", &[("result", "retried")]), 200.0);
}

/// A body of unknown length (chunked over HTTP/1.1, without content-length over h2c, as gRPC
/// clients send it) is retried too: streamed on the first try with a copy kept, and whole on
/// the try that succeeds.
#[test]
fn bodies_of_unknown_length_are_retried_whole() {
    let scene = Scene::new();
    let spec = "  retries:\n    attempts: 2\n    retryOn: [\"5xx\"]\n    retryNonIdempotent: true\n    backoff:\n      baseInterval: 1ms\n      maxInterval: 5ms\n    budget:\n      percent: 100\n      minRetriesPerSecond: 10\n";
    let agent = scene.agent(&policy("flaky", spec));
    let addr = format!("{FLAKY}:80");
    for h2 in [false, true] {
        let mut args = vec!["http-get", "--addr", &addr, "--count", "10", "--method", "POST", "--body", "hello-weft", "--chunked"];
        if h2 {
            args.push("--h2");
        }
        let out = probe(&scene.client, &args);
        assert_eq!(n(&out["codes"]["200"]), 10, "h2={h2}: every first try failed and was retried: {out}");
        assert_eq!(out["last_body"]["body"], "hello-weft", "h2={h2}: the body arrived whole on the retry: {out}");
    }
    assert_eq!(agent.metric("weft_proxy_retries_total", &[("result", "retried")]), 20.0);
}

#[test]
fn retries_stop_at_the_budget() {
    let scene = Scene::new();
    // Without the budget every failure would be retried; the budget allows 20% of requests.
    let spec = "  retries:\n    attempts: 2\n    retryOn: [\"5xx\"]\n    backoff:\n      baseInterval: 1ms\n      maxInterval: 2ms\n    budget:\n      percent: 20\n      minRetriesPerSecond: 0\n";
    let agent = scene.agent(&policy("flaky", spec));
    let out = scene.get(FLAKY, 300, "/");
    let retried = agent.metric("weft_proxy_retries_total", &[("result", "retried")]);
    let refused = agent.metric("weft_proxy_retries_total", &[("result", "budget_exhausted")]);
    // Per one-second window, retries <= 20% of that window's requests: at most 20% overall, plus
    // rounding at each window start.
    assert!(retried <= 300.0 * 0.2 + 5.0, "retries {retried} exceed the budget: {out}");
    assert!(refused > 0.0, "some retries were refused by the budget");
    assert!(n(&out["codes"]["503"]) > 0, "failures beyond the budget reach the client: {out}");
    assert_eq!(n(&out["codes"]["200"]) + n(&out["codes"]["503"]), 300, "{out}");
}

#[test]
fn circuit_breaker_overflows_to_503() {
    let scene = Scene::new();
    let agent = scene.agent(&policy("slow", "  circuitBreaker:\n    maxConnections: 1\n    maxPendingRequests: 1\n    maxRequests: 1\n"));
    // Clients at once against a 300 ms endpoint allowed one request at a time, and one more
    // waiting for it.
    let spawn = || {
        let mut cmd = scene.client.command(Testbed::probe_path());
        cmd.args(["http-get", "--addr", &format!("{SLOW}:80"), "--count", "3", "--path", "/delay/300"]);
        scene.client.spawn(cmd)
    };
    let parse = |p: Proc| -> Value { serde_json::from_slice(&p.wait_output(Duration::from_secs(60)).stdout).expect("JSON") };
    let codes = |runs: &[Value], code: &str| runs.iter().map(|r| n(&r["codes"][code])).sum::<u64>();

    // Two: one is served while the other waits its turn; nothing overflows.
    let (a, b) = (spawn(), spawn());
    let two = [parse(a), parse(b)];
    assert_eq!((codes(&two, "200"), codes(&two, "503")), (6, 0), "the second waits as the one pending request: {two:?}");
    assert_eq!(agent.metric("weft_proxy_upstream_overflow_total", &[]), 0.0);

    // Three: one served, one waiting, the third overflows.
    let (a, b, c) = (spawn(), spawn(), spawn());
    let three = [parse(a), parse(b), parse(c)];
    let (ok, overflow) = (codes(&three, "200"), codes(&three, "503"));
    assert!(ok >= 4 && overflow >= 1 && ok + overflow == 9, "one at a time, one waiting, the rest overflow: {three:?}");
    assert_eq!(agent.metric("weft_proxy_upstream_overflow_total", &[]), overflow as f64);
}

#[test]
fn outlier_detection_ejects_and_later_restores_a_backend() {
    let scene = Scene::new();
    let spec = "  loadBalancer:\n    type: RoundRobin\n  outlierDetection:\n    consecutive5xx: 3\n    consecutiveGatewayErrors: 0\n    interval: 1s\n    baseEjectionTime: 1s\n    maxEjectionPercent: 50\n";
    let agent = scene.agent(&policy("mixed", spec));
    let first = scene.get(MIXED, 40, "/");
    // Round robin alternates: the bad endpoint fails 3 times in a row, then is ejected.
    assert_eq!(n(&first["codes"]["503"]), 3, "ejected after 3 consecutive 5xx: {first}");
    assert_eq!(n(&first["served_by"]["good"]), 37, "{first}");
    assert_eq!(agent.metric("weft_proxy_outlier_ejections_total", &[]), 1.0);
    // After the ejection time the endpoint gets traffic again (and, still failing, is ejected
    // again, for longer).
    std::thread::sleep(Duration::from_millis(1300));
    let later = scene.get(MIXED, 20, "/");
    assert!(n(&later["codes"]["503"]) >= 1, "restored endpoint receives requests again: {later}");
    assert_eq!(agent.metric("weft_proxy_outlier_ejections_total", &[]), 2.0);
}

#[test]
fn h2_upstream_that_answers_before_reading_bodies_loses_no_request() {
    // A server may answer before reading a request body, then reset the stream; an h2 server
    // counts such resets and, past a limit, sends GOAWAY. The proxy's pooled upstream h2
    // connection must survive that: requests the server never processed are sent again.
    let scene = Scene::new();
    let early = scene.node.add_pod("early");
    let mut cmd = early.command(Testbed::probe_path());
    cmd.args(["http-serve", "--port", "8080", "--name", "early", "--early-response"]);
    let _server = early.spawn(cmd);
    early.wait_listening(8080, Duration::from_secs(5));
    let vip = Ipv4Addr::new(10, 96, 1, 4);
    let config = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: early\n  namespace: default\n  annotations:\n    weft.dev/use-proxy: \"true\"\nspec:\n  clusterIP: {vip}\n  selector:\n    app: early\n  ports:\n  - name: web\n    port: 80\n    targetPort: 8080\n---\n{}",
        workload_yaml(&early, "default", &[("app", "early")], 1)
    );
    let _agent = scene.agent(&config);
    let out = probe(
        &scene.client,
        &["http-load", "--addr", &format!("{vip}:80"), "--h2", "--closed", "--connections", "16", "--body-bytes", "1024", "--duration-ms", "4000", "--warmup-ms", "0"],
    );
    assert!(n(&out["requests"]) > 2000, "enough requests to pass the server's reset limit (1024): {out}");
    assert_eq!(n(&out["errors"]), 0, "{out}");
}
