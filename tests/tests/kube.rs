//! Agents in Kubernetes mode (`--kube`), as processes on two testbed nodes, configured only by an
//! API server (a fake one, over HTTP, reached through a KUBECONFIG): pods found by UID in the
//! kubelet's cgroup layout and attached by their node's agent only if opted in, a meshed pod of
//! one node reaching a STRICT pod of the other through the tunnel with its service account's
//! identity (its certificate issued as the pod appeared, before any connection needs it), a pod
//! that opts out refused there by the kernel, and an API server outage that changes nothing.
//! Needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use weft_testbed::agent::{Agent, kernel_attachments, sum_samples};
use weft_testbed::kube_api::ApiServer;
use weft_testbed::probe::{n, run as probe};
use weft_testbed::{Node, Pod, Testbed};

const SECS: Duration = Duration::from_secs(30);
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const DB_ID: &str = "spiffe://cluster.local/ns/shop/sa/db";

/// A pod the kubelet would have made: its cgroup where the cgroupfs driver puts a BestEffort
/// pod, below `<testbed cgroup>/<node>` (that node agent's `--cgroup-root`).
fn kubelet_pod(node: &Node, name: &str, uid: &str) -> Pod {
    node.add_pod_in(name, &PathBuf::from(node.name()).join(format!("kubepods/besteffort/pod{uid}")))
}

/// The Pod object of `pod`: Running, Ready, in namespace shop, with service account `name`.
fn pod_object(pod: &Pod, node: &Node, uid: &str, labels: Value) -> Value {
    json!({
        "metadata": {"name": pod.name(), "namespace": "shop", "uid": uid, "labels": labels},
        "spec": {"nodeName": node.name(), "serviceAccountName": pod.name(), "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": pod.ip().to_string(), "podIPs": [{"ip": pod.ip().to_string()}],
                   "qosClass": "BestEffort", "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn node_object(node: &Node) -> Value {
    json!({"metadata": {"name": node.name()},
           "status": {"addresses": [{"type": "InternalIP", "address": node.ip().to_string()}]}})
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    sum_samples(&agent.metrics(), name, labels)
}

fn connect(pod: &Pod, addr: &str, count: u32, timeout_ms: u32) -> Value {
    let (count, timeout) = (count.to_string(), timeout_ms.to_string());
    probe(pod, &["--timeout-ms", &timeout, "connect", "--addr", addr, "--count", &count, "--read-reply"])
}

#[test]
fn agents_configured_by_the_api_server_mesh_pods_across_nodes() {
    let tb = Testbed::new();
    let (n1, n2) = (tb.add_node("n1"), tb.add_node("n2"));
    tb.connect_nodes(&n1, &n2);
    let (web_uid, out_uid, db_uid) = (
        "0a1b2c3d-0000-4000-8000-00000000000a",
        "0a1b2c3d-0000-4000-8000-00000000000b",
        "0a1b2c3d-0000-4000-8000-00000000000c",
    );
    let web = kubelet_pod(&n1, "web", web_uid);
    let outsider = kubelet_pod(&n1, "outsider", out_uid);
    let db = kubelet_pod(&n2, "db", db_uid);
    let mut cmd = db.command(Testbed::probe_path());
    cmd.args(["serve", "--port", "9000", "--mode", "reply", "--reply", "db"]);
    let _server = db.spawn(cmd);
    db.wait_listening(9000, Duration::from_secs(5));

    let cluster = BTreeMap::from([
        ("/api/v1/namespaces", vec![json!({"metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}}})]),
        ("/api/v1/nodes", vec![node_object(&n1), node_object(&n2)]),
        (
            "/api/v1/pods",
            vec![
                pod_object(&web, &n1, web_uid, json!({"app": "web"})),
                pod_object(&outsider, &n1, out_uid, json!({"app": "outsider", "weft.dev/mesh": "disabled"})),
                pod_object(&db, &n2, db_uid, json!({"app": "db"})),
            ],
        ),
        (
            "/api/v1/services",
            vec![json!({"metadata": {"name": "db", "namespace": "shop"},
                        "spec": {"clusterIP": DB_VIP.to_string(), "selector": {"app": "db"},
                                 "ports": [{"name": "tcp", "port": 9000, "targetPort": 9000}]}})],
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            vec![
                json!({"metadata": {"name": "db-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
                        "addressType": "IPv4", "ports": [{"name": "tcp", "port": 9000}],
                        "endpoints": [{"addresses": [db.ip().to_string()], "conditions": {"ready": true}, "nodeName": "n2",
                                       "targetRef": {"kind": "Pod", "namespace": "shop", "name": "db"}}]}),
            ],
        ),
        (
            "/apis/weft.dev/v1alpha1/peerauthentications",
            vec![json!({"metadata": {"name": "db", "namespace": "shop"},
                        "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}}})],
        ),
    ]);
    let api = ApiServer::start_in(&n1, cluster);
    let files = std::env::temp_dir();
    let kubeconfig = |node: &Node, address: Ipv4Addr| {
        api.kubeconfig(&files.join(format!("weft-kubeconfig-{}-{}", tb.id(), node.name())), address)
    };
    // The server runs in n1's netns: n1's agent reaches it on loopback, n2's over the link.
    let configs = [kubeconfig(&n1, Ipv4Addr::LOCALHOST), kubeconfig(&n2, n1.underlay_ip())];
    let start = |node: &Node, config: &PathBuf| {
        let proxy = format!("{}:15001", node.ip());
        let cgroups = tb.cgroup_root().join(node.name()).display().to_string();
        let flags = ["--proxy-addr", &proxy, "--node-name", node.name(), "--cgroup-root", &cgroups];
        let mut agent = Agent::start_kube(&tb, node, config, &flags);
        agent.wait_ready(SECS);
        agent
    };
    let agents = [start(&n1, &configs[0]), start(&n2, &configs[1])];
    for config in &configs {
        let _ = std::fs::remove_file(config);
    }

    // Each agent watched its own node's pods and the others' apart.
    let requests = api.requests();
    for selector in ["spec.nodeName%3Dn1", "spec.nodeName%21%3Dn1", "spec.nodeName%3Dn2", "spec.nodeName%21%3Dn2"] {
        assert!(requests.iter().any(|r| r.contains(selector)), "no watch with {selector}: {requests:#?}");
    }

    // Opted-in pods are attached by their own node's agent, found by UID; the opted-out one is not.
    let attached = |pod: &Pod| kernel_attachments(pod.cgroup_path());
    assert_eq!((attached(&web), attached(&outsider), attached(&db)), (4, 0, 4), "programs on web, outsider, db");
    let dump = agents[0].config_dump();
    let flags = &dump["compiled"]["workload_ips"][db.ip().to_string()]["flags"];
    assert_eq!(flags, &json!(["STRICT", "TUNNEL"]), "n1 sees db as STRICT on n2: {dump}");

    // Before any traffic, each node holds the certificates of its own meshed pods, issued as
    // the pods appeared, and no other.
    let issued = |agent: &Agent| -> Vec<String> {
        let dump = agent.config_dump();
        let certificates = dump["certificates"].as_array().cloned().unwrap_or_default();
        certificates.iter().filter_map(|c| c["identity"].as_str().map(str::to_owned)).collect()
    };
    let deadline = std::time::Instant::now() + SECS;
    while (issued(&agents[0]), issued(&agents[1])) != (vec![WEB_ID.to_owned()], vec![DB_ID.to_owned()]) {
        assert!(
            std::time::Instant::now() < deadline,
            "certificates issued ahead of use: n1 {:?}, n2 {:?}",
            issued(&agents[0]),
            issued(&agents[1])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&agents[1], "weft_tunnel_handshakes_total", &[]), 0.0, "no tunnel used yet");

    let reached = |what: &str| {
        let out = connect(&web, &format!("{DB_VIP}:9000"), 5, 5000);
        assert_eq!((n(&out["ok"]), &out["replies"]["db"]), (5, &json!(5)), "{what}: {out}");
        let seen = [("source_principal", WEB_ID), ("destination_principal", DB_ID), ("result", "ok")];
        metric(&agents[1], "weft_tunnel_inbound_streams_total", &seen)
    };
    let streams = reached("web reaches db");
    assert!(streams >= 5.0, "n2 accepted {streams} tunnel streams from {WEB_ID}:\n{}", agents[1].metrics());

    let refused =
        || metric(&agents[1], "weft_datapath_events_total", &[("hook", "sk_lookup"), ("event", "strict_refused")]);
    let before = refused();
    let out = connect(&outsider, &format!("{}:9000", db.ip()), 1, 5000);
    assert_eq!(out["errors"]["ECONNREFUSED"], 1, "the pod that opted out is plaintext to a STRICT pod: {out}");
    assert!(refused() > before, "n2's kernel refused it:\n{}", agents[1].metrics());

    // The API server goes away: both agents keep what they had, and traffic keeps flowing.
    let generations = agents.each_ref().map(Agent::generation);
    api.go_down();
    std::thread::sleep(Duration::from_secs(2));
    let after = reached("web reaches db during the outage");
    assert!(after >= streams + 5.0, "still through the tunnel: {after}");
    for (agent, generation) in agents.iter().zip(generations) {
        assert_eq!(agent.get("/ready").map(|(status, _)| status), Some(200), "still ready");
        assert_eq!(agent.generation(), generation, "no new config from an unreachable API server");
    }
    assert_eq!((attached(&web), attached(&db)), (4, 4), "still attached");
}
