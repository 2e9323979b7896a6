//! The agent runs with exactly the capabilities the DaemonSet grants (`manifests/base`), not as
//! full root: loads and pins its programs, attaches them to pods' cgroups, balances a service
//! in the kernel and serves its proxy. Needs root (to drop from).

use std::{net::Ipv4Addr, time::Duration};

use serde_yaml::Value;
use weft_testbed::{
    Testbed,
    agent::{Agent, service_yaml, workload_yaml},
    probe::{n, run as probe},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const SECS: Duration = Duration::from_secs(20);

/// `capabilities.add` of the DaemonSet's agent container, as Linux names them (`net_admin`).
fn daemonset_capabilities() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/base/agent-daemonset.yaml");
    let ds: Value = serde_yaml::from_str(&std::fs::read_to_string(path).expect("the DaemonSet manifest")).expect("YAML");
    let add = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    add.as_sequence().expect("capabilities.add").iter().map(|c| c.as_str().expect("a name").to_ascii_lowercase()).collect()
}

/// Bit numbers in the capability masks of /proc/<pid>/status.
fn bit(name: &str) -> u32 {
    match name {
        "net_admin" => 12,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("capability {other}: add its number here"),
    }
}

#[test]
fn the_agent_works_with_only_the_daemonsets_capabilities() {
    let caps = daemonset_capabilities();
    assert!(!caps.contains(&"sys_admin".to_owned()), "the DaemonSet asks for no CAP_SYS_ADMIN: {caps:?}");
    let set = format!("-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    let (inh, ambient, bounding) = (format!("--inh-caps={set}"), format!("--ambient-caps={set}"), format!("--bounding-set={set}"));
    let wrap = ["setpriv", inh.as_str(), ambient.as_str(), bounding.as_str()];

    let tb = Testbed::new();
    let node = tb.add_node("n1");
    let (client, server) = (node.add_pod("client"), node.add_pod("server"));
    let mut cmd = server.command(Testbed::probe_path());
    cmd.args(["serve", "--port", "8080", "--mode", "reply", "--reply", "server"]);
    let _server = server.spawn(cmd);
    server.wait_listening(8080, Duration::from_secs(5));
    let proxy = format!("{}:15001", node.ip());
    let mut agent = Agent::start_under(&tb, &node, &["--proxy-addr", &proxy], false, &wrap);
    let mut config = service_yaml("server", "default", VIP, 80, 8080, "server");
    config += &workload_yaml(&client, "default", &[("app", "client")], 1);
    config += &workload_yaml(&server, "default", &[("app", "server")], 1);
    agent.write_config("mesh.yaml", &config);
    agent.wait_ready(SECS);
    agent.wait_generation_after(0, SECS);

    // The process really runs with those capabilities and no others.
    let pid = agent.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim();
    let want = caps.iter().fold(0u64, |mask, c| mask | 1 << bit(c));
    assert_eq!(u64::from_str_radix(effective, 16).expect("hex"), want, "effective capabilities of the agent");

    let out = probe(&client, &["connect", "--addr", &format!("{VIP}:80"), "--count", "10", "--read-reply"]);
    assert_eq!(n(&out["ok"]), 10, "the kernel balanced the service: {out}");
    assert_eq!(n(&out["replies"]["server"]), 10, "{out}");
    let balanced = agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "balanced")]);
    assert!(balanced >= 10.0, "connect4 ran on the client's cgroup: {balanced}");
    let metrics = agent.metrics();
    assert!(metrics.contains("weft_proxy"), "the proxy's metrics are served: the proxy started");
    // With CAP_SYS_PTRACE it opens the server pod's network namespace (its process holds all
    // capabilities) and attaches weft_sk_lookup there.
    let server_cgroup = server.cgroup_path().display().to_string();
    let deadline = std::time::Instant::now() + SECS;
    let state = loop {
        let dump = agent.config_dump();
        let attached = dump["datapath"]["attached"].as_array().cloned().unwrap_or_default();
        let state = attached.iter().find(|a| a["path"] == server_cgroup.as_str()).map(|a| a["sk_lookup"].clone());
        if state.as_ref().is_some_and(|s| s["state"] == "attached") || std::time::Instant::now() > deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(state.unwrap_or_default()["state"], "attached", "sk_lookup on the server's namespace");

    // Its first memory check once ready gives back what start-up freed (checks are 5 s apart).
    let trims = agent.wait_metric("weft_agent_memory_trims_total", &[], 1.0, Duration::from_secs(12));
    assert_eq!(trims, 1.0, "one trim after start-up:\n{}", agent.metrics());
}
