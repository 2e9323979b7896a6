//! `cargo xtask demo`: a small app on one node, in network namespaces. `productpage` calls
//! `details` (plain L4, weighted 80/20, kernel only) and `reviews` (L7 through the node proxy:
//! a 90/10 canary v1/v3, `end-user: jason` to v2, and v3 failing every other request with
//! retries hiding it); an `intruder` is denied at L4, and `legacy`, a pod outside the mesh, is
//! refused by the kernel when it dials a STRICT `details` pod's address. Then it prints what the
//! mesh saw.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use weft_testbed::{
    Pod, Testbed,
    agent::{Agent, samples, service_yaml, workload_yaml},
    probe,
};

const DETAILS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REVIEWS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

pub fn run() -> anyhow::Result<()> {
    println!("weft demo: one node, eight pods in network namespaces (seven in the mesh)...");
    let tb = Testbed::new();
    let node = tb.add_node("node1");
    let productpage = node.add_pod("productpage");
    let details = [node.add_pod("details-v1"), node.add_pod("details-v2")];
    let reviews = [node.add_pod("reviews-v1"), node.add_pod("reviews-v2"), node.add_pod("reviews-v3")];
    let intruder = node.add_pod("intruder");
    let legacy = node.add_pod("legacy");

    let probe = Testbed::probe_path();
    let mut servers = Vec::new();
    for (pod, name) in details.iter().zip(["v1", "v2"]) {
        let mut cmd = pod.command(&probe);
        cmd.args(["serve", "--port", "8080", "--mode", "reply", "--reply", name]);
        servers.push(pod.spawn(cmd));
    }
    for (pod, fail_every) in reviews.iter().zip(["0", "0", "2"]) {
        // reviews-v3 is broken: every other request answers 503.
        let mut cmd = pod.command(&probe);
        cmd.args(["http-serve", "--port", "8080", "--name", pod.name(), "--fail-every", fail_every]);
        servers.push(pod.spawn(cmd));
    }
    for pod in details.iter().chain(&reviews) {
        pod.wait_listening(8080, Duration::from_secs(5));
    }

    let proxy = format!("{}:15001", node.ip());
    let mut agent = Agent::start(&tb, &node, &["--proxy-addr", &proxy]);
    agent.write_config("demo.yaml", &config(&productpage, &details, &reviews, &intruder));
    agent.wait_ready(Duration::from_secs(20));
    agent.wait_generation_after(0, Duration::from_secs(10));
    println!("agent ready: programs on 7 pod cgroups, node proxy on {proxy}\n");

    let details_addr = format!("{DETAILS}:9080");
    println!("productpage -> details (L4, kernel load balancing 80/20): 300 connections, 4 KiB each way");
    let out = probe::run(&productpage, &["connect", "--addr", &details_addr, "--count", "300", "--read-reply", "--send", "4096"]);
    println!("  ok {} errors {}", out["ok"], out["errors"]);
    println!("intruder -> details: 20 connections (denied by AuthorizationPolicy)");
    let denied = probe::run(&intruder, &["connect", "--addr", &details_addr, "--count", "20"]);
    println!("  ok {} errors {}", denied["ok"], denied["errors"]);
    let details_pod = format!("{}:8080", details[0].ip());
    println!("legacy (not in the mesh) -> details-v1's pod IP: 5 connections (details is STRICT: mTLS only)");
    let refused = probe::run(&legacy, &["--timeout-ms", "3000", "connect", "--addr", &details_pod, "--count", "5"]);
    println!("  ok {} errors {} (a reset from the kernel, not a timeout)", refused["ok"], refused["errors"]);

    let reviews_addr = format!("{REVIEWS}:9080");
    println!("productpage -> reviews (L7, HTTPRoute canary 90/10 v1/v3): 500 requests");
    let canary = probe::run(&productpage, &["http-get", "--addr", &reviews_addr, "--count", "500", "--path", "/reviews/1"]);
    println!("  status codes {}  served by {}", canary["codes"], canary["served_by"]);
    println!("productpage as end-user jason -> reviews: 50 requests (header route to v2)");
    let jason = probe::run(&productpage, &["http-get", "--addr", &reviews_addr, "--count", "50", "--path", "/reviews/1", "--header", "end-user: jason"]);
    println!("  status codes {}  served by {}\n", jason["codes"], jason["served_by"]);

    agent.wait_metric("weft_l4_connections_closed_total", &[("reporter", "source"), ("destination_service_name", "details")], 300.0, Duration::from_secs(5));
    let metrics = agent.metrics();
    print_l4(&metrics);
    print_l7(&metrics);
    if let Some(line) = agent.access_log().lines().find(|l| l.contains("\"kind\":\"http\"")) {
        println!("\nan access log record (one per request and per closed connection):\n  {line}");
    }
    drop(servers);
    drop(agent);
    let _ = std::fs::remove_dir_all(tb.bpffs_dir());
    println!("\ndemo done; namespaces, cgroups and pins removed.");
    Ok(())
}

fn config(productpage: &Pod, details: &[Pod; 2], reviews: &[Pod; 3], intruder: &Pod) -> String {
    let mut c = service_yaml("details", "default", DETAILS, 9080, 8080, "details");
    c += &service_yaml("reviews", "default", REVIEWS, 9080, 8080, "reviews");
    for (i, pod) in reviews.iter().enumerate() {
        let version = format!("v{}", i + 1);
        c += &service_yaml(pod.name(), "default", Ipv4Addr::new(10, 96, 0, 21 + i as u8), 9080, 8080, pod.name());
        c += &workload_yaml(pod, "default", &[("app", "reviews"), ("version", &version)], 1).replace(
            "    app: \"reviews\"\n",
            &format!("    app: \"reviews\"\n    instance: \"{}\"\n", pod.name()),
        );
    }
    // Per-version services select on `instance`.
    c = c.replace("selector:\n    app: reviews-v", "selector:\n    instance: reviews-v");
    c += &workload_yaml(productpage, "default", &[("app", "productpage")], 1);
    c += &workload_yaml(&details[0], "default", &[("app", "details")], 80);
    c += &workload_yaml(&details[1], "default", &[("app", "details")], 20);
    c += &workload_yaml(intruder, "default", &[("app", "intruder")], 1);
    c += "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: details-mtls, namespace: default}\nspec:\n  selector: {matchLabels: {app: details}}\n  mtls: {mode: STRICT}\n---\n";
    c += "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-intruders\n  namespace: default\nspec:\n  targetRefs:\n  - kind: Service\n    name: details\n  action: DENY\n  rules:\n  - from:\n    - serviceAccounts: [\"intruder\"]\n---\n";
    c += "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: reviews\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n  rules:\n  - name: jason\n    matches:\n    - headers:\n      - name: end-user\n        value: jason\n    backendRefs:\n    - name: reviews-v2\n      port: 9080\n  - name: canary\n    backendRefs:\n    - name: reviews-v1\n      port: 9080\n      weight: 90\n    - name: reviews-v3\n      port: 9080\n      weight: 10\n---\n";
    c += "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: reviews-retries\n  namespace: default\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n  retries:\n    attempts: 2\n    retryOn: [\"5xx\"]\n    budget:\n      percent: 100\n      minRetriesPerSecond: 20\n";
    c
}


type Key = (String, String, String);

fn by(metrics: &str, name: &str, keys: [&str; 3], filter: impl Fn(&BTreeMap<String, String>) -> bool) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for (labels, v) in samples(metrics, name).into_iter().filter(|(l, _)| filter(l)) {
        let k = |i: usize| labels.get(keys[i]).cloned().unwrap_or_default();
        *out.entry((k(0), k(1), k(2))).or_insert(0.0) += v;
    }
    out
}

fn print_l4(metrics: &str) {
    println!("L4, from the kernel (sock_ops, reporter=source):");
    println!("  {:<12} {:<36} {:<12} {:>6} {:>9} {:>9} {:>8}", "source", "service", "workload", "conns", "sent", "received", "rtt avg");
    let source = |l: &BTreeMap<String, String>| l.get("reporter").map(String::as_str) == Some("source");
    let keys = ["source_workload", "destination_service", "destination_workload"];
    let closed = by(metrics, "weft_l4_connections_closed_total", keys, source);
    let sent = by(metrics, "weft_l4_sent_bytes_total", keys, source);
    let received = by(metrics, "weft_l4_received_bytes_total", keys, source);
    let rtt = by(metrics, "weft_l4_rtt_seconds_sum", keys, source);
    for (key, conns) in &closed {
        let get = |m: &BTreeMap<Key, f64>| m.get(key).copied().unwrap_or(0.0);
        println!(
            "  {:<12} {:<36} {:<12} {:>6} {:>8.0}K {:>8.0}K {:>6.0}us",
            key.0, key.1, key.2, conns, get(&sent) / 1024.0, get(&received) / 1024.0, get(&rtt) / conns.max(1.0) * 1e6
        );
    }
    let details: Vec<_> = closed.iter().filter(|(k, _)| k.1.starts_with("details")).collect();
    let total: f64 = details.iter().map(|(_, v)| **v).sum();
    print!("  observed L4 split for details:");
    for ((_, _, wl), v) in details {
        print!("  {wl} {:.1}%", v / total.max(1.0) * 100.0);
    }
    println!("  (configured 80/20)");
    print!("  kernel verdicts:");
    for (labels, v) in samples(metrics, "weft_datapath_events_total") {
        if v > 0.0 {
            print!("  {}/{}={v}", labels.get("hook").map_or("", String::as_str), labels.get("event").map_or("", String::as_str));
        }
    }
    println!("\n");
}

fn print_l7(metrics: &str) {
    println!("L7, from the node proxy (golden signals per route):");
    println!("  {:<12} {:<36} {:<22} {:>6} {:>7} {:>9}", "source", "service", "route", "reqs", "errors", "mean");
    let keys = ["source_workload", "destination_service", "route"];
    let all = |_: &BTreeMap<String, String>| true;
    let requests = by(metrics, "weft_proxy_requests_total", keys, all);
    let errors = by(metrics, "weft_proxy_requests_total", keys, |l| l.get("response_class").map(String::as_str) == Some("5xx"));
    let duration = by(metrics, "weft_proxy_request_duration_seconds_sum", keys, all);
    for (key, reqs) in &requests {
        let get = |m: &BTreeMap<Key, f64>| m.get(key).copied().unwrap_or(0.0);
        println!("  {:<12} {:<36} {:<22} {:>6} {:>7} {:>7.2}ms", key.0, key.1, key.2, reqs, get(&errors), get(&duration) / reqs.max(1.0) * 1e3);
    }
    let retried = samples(metrics, "weft_proxy_retries_total").into_iter().map(|(_, v)| v).sum::<f64>();
    println!("  retries taken (hiding reviews-v3's failures from the client): {retried}");
}
