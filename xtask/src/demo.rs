//! `cargo xtask demo`: a client pod calls a `reviews` service with two versions weighted 80/20,
//! an intruder pod is denied at L4, and the agent's view is printed.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use weft_testbed::{
    Testbed,
    agent::{Agent, samples, service_yaml, workload_yaml},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 9080;

pub fn run() -> anyhow::Result<()> {
    println!("weft demo: building a node with four pods in network namespaces...");
    let tb = Testbed::new();
    let node = tb.add_node("node1");
    let client = node.add_pod("productpage");
    let v1 = node.add_pod("reviews-v1");
    let v2 = node.add_pod("reviews-v2");
    let intruder = node.add_pod("intruder");

    let probe = Testbed::probe_path();
    let mut servers = Vec::new();
    for (pod, name) in [(&v1, "v1"), (&v2, "v2")] {
        let mut cmd = pod.command(&probe);
        cmd.args(["serve", "--port", "8080", "--mode", "reply", "--reply", name]);
        servers.push(pod.spawn(cmd));
        pod.wait_listening(8080, Duration::from_secs(5));
    }

    let mut agent = Agent::start(&tb, &node, &[]);
    let mut config = String::new();
    config += &service_yaml("reviews", "default", VIP, PORT, 8080, "reviews");
    config += &workload_yaml(&client, "default", &[("app", "productpage")], 1);
    config += &workload_yaml(&v1, "default", &[("app", "reviews"), ("version", "v1")], 80);
    config += &workload_yaml(&v2, "default", &[("app", "reviews"), ("version", "v2")], 20);
    config += &workload_yaml(&intruder, "default", &[("app", "intruder")], 1);
    config += "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: no-intruders\n  namespace: default\nspec:\n  targetRefs:\n  - kind: Service\n    name: reviews\n  action: DENY\n  rules:\n  - from:\n    - serviceAccounts: [\"intruder\"]\n";
    agent.write_config("demo.yaml", &config);
    agent.wait_ready(Duration::from_secs(20));
    agent.wait_generation_after(0, Duration::from_secs(10));
    println!("agent ready: programs attached to 4 pod cgroups; config applied\n");

    let target = format!("{VIP}:{PORT}");
    println!("productpage: 500 connections to reviews ({target}), 4 KiB each way...");
    let out = run_probe(&client, &["connect", "--addr", &target, "--count", "500", "--read-reply", "--send", "4096"])?;
    println!("  {out}");
    println!("intruder: 20 connections to reviews...");
    let denied = run_probe(&intruder, &["connect", "--addr", &target, "--count", "20"])?;
    println!("  {denied}\n");

    // Closed-connection counters land when the last FINs are processed.
    agent.wait_metric("weft_l4_connections_closed_total", &[("reporter", "source"), ("source_workload", "productpage")], 500.0, Duration::from_secs(5));
    let metrics = agent.metrics();
    print_summary(&metrics);
    if let Some(line) = agent.access_log().lines().next() {
        println!("\nfirst L4 access log record:\n  {line}");
    }
    drop(servers);
    drop(agent);
    weft_datapath_cleanup(&tb);
    println!("\ndemo done; namespaces, cgroups and pins removed.");
    Ok(())
}

fn run_probe(pod: &weft_testbed::Pod, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut cmd = pod.command(Testbed::probe_path());
    cmd.args(args);
    let out = pod.spawn(cmd).wait_output(Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| format!("weft-probe said: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
}

fn print_summary(metrics: &str) {
    println!("what the mesh saw (kernel L4 telemetry, reporter=source):");
    println!("  {:<12} {:<34} {:<12} {:>6} {:>10} {:>10} {:>9}", "source", "service", "workload", "conns", "sent", "received", "rtt avg");
    let get = |name: &str| -> BTreeMap<(String, String, String), f64> {
        samples(metrics, name)
            .into_iter()
            .filter(|(l, _)| l.get("reporter").map(String::as_str) == Some("source"))
            .map(|(l, v)| {
                let key = |k: &str| l.get(k).cloned().unwrap_or_default();
                ((key("source_workload"), key("destination_service"), key("destination_workload")), v)
            })
            .collect()
    };
    let closed = get("weft_l4_connections_closed_total");
    let sent = get("weft_l4_sent_bytes_total");
    let received = get("weft_l4_received_bytes_total");
    let rtt_sum = get("weft_l4_rtt_seconds_sum");
    let total: f64 = closed.iter().filter(|((_, s, _), _)| s.starts_with("reviews")).map(|(_, v)| v).sum();
    for (key, conns) in &closed {
        let avg_rtt = rtt_sum.get(key).map_or(0.0, |s| s / conns.max(1.0) * 1e6);
        println!(
            "  {:<12} {:<34} {:<12} {:>6} {:>9.1}K {:>9.1}K {:>7.0}us",
            key.0, key.1, key.2, conns, sent.get(key).copied().unwrap_or(0.0) / 1024.0,
            received.get(key).copied().unwrap_or(0.0) / 1024.0, avg_rtt
        );
    }
    print!("observed split for reviews:");
    for ((_, svc, wl), v) in &closed {
        if svc.starts_with("reviews") && total > 0.0 {
            print!("  {wl} {:.1}%", v / total * 100.0);
        }
    }
    println!("  (configured 80/20)");
    print!("kernel verdicts:");
    for (labels, v) in samples(metrics, "weft_datapath_events_total") {
        if v > 0.0 {
            print!("  {}/{}={v}", labels.get("hook").map_or("", String::as_str), labels.get("event").map_or("", String::as_str));
        }
    }
    println!();
}

/// Removes the pins the demo agent left (the testbed also sweeps its bpffs directory).
fn weft_datapath_cleanup(tb: &Testbed) {
    let _ = std::fs::remove_dir_all(tb.bpffs_dir());
}
