//! The kernel L4 datapath on a real kernel: real programs, cgroups, namespaces and sockets.
//! Needs root (the testbed panics with the reason if it is missing; nothing is skipped).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use weft_testbed::{
    probe::{n, run as probe},
    Node, Pod, Proc, Testbed,
    agent::{Agent, kernel_attachments, service_yaml, workload_yaml},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SECS: Duration = Duration::from_secs(20);


fn serve(pod: &Pod, args: &[&str]) -> Proc {
    let mut cmd = pod.command(Testbed::probe_path());
    cmd.args(["serve", "--port", "8080"]).args(args);
    let p = pod.spawn(cmd);
    pod.wait_listening(8080, Duration::from_secs(5));
    p
}

/// A node with a client and two `reviews` backends replying with their version.
struct Scene {
    tb: Testbed,
    node: Node,
    client: Pod,
    v1: Pod,
    v2: Pod,
    _servers: Vec<Proc>,
}

impl Scene {
    fn new(mode: &[&str]) -> Scene {
        let tb = Testbed::new();
        let node = tb.add_node("n1");
        let client = node.add_pod("client");
        let v1 = node.add_pod("v1");
        let v2 = node.add_pod("v2");
        let mut servers = Vec::new();
        for (pod, name) in [(&v1, "v1"), (&v2, "v2")] {
            let mut args = vec!["--mode"];
            args.extend_from_slice(mode);
            if mode == ["reply"] {
                args.extend_from_slice(&["--reply", name]);
            }
            servers.push(serve(pod, &args));
        }
        Scene { tb, node, client, v1, v2, _servers: servers }
    }

    fn config(&self, w1: u32, w2: u32) -> String {
        let mut c = service_yaml("reviews", "default", VIP, 80, 8080, "reviews");
        c += &workload_yaml(&self.client, "default", &[("app", "client")], 1);
        c += &workload_yaml(&self.v1, "default", &[("app", "reviews")], w1);
        c += &workload_yaml(&self.v2, "default", &[("app", "reviews")], w2);
        c
    }

    fn agent(&self, extra: &[&str], config: &str) -> Agent {
        let mut agent = Agent::start(&self.tb, &self.node, extra);
        agent.write_config("mesh.yaml", config);
        agent.wait_ready(SECS);
        agent.wait_generation_after(0, SECS);
        agent
    }

    fn connect(&self, count: usize) -> Value {
        probe(&self.client, &["connect", "--addr", &format!("{VIP}:80"), "--count", &count.to_string(), "--read-reply"])
    }
}


#[test]
fn weighted_split_and_vip_visible_to_getpeername() {
    let scene = Scene::new(&["reply"]);
    let agent = scene.agent(&[], &scene.config(80, 20));
    let out = scene.connect(1000);
    assert_eq!(n(&out["ok"]), 1000, "every connect must succeed: {out}");
    let v1 = n(&out["replies"]["v1"]) as f64 / 1000.0;
    // Binomial sd for p=0.8, n=1000 is 0.0126; 0.05 is four of them.
    assert!((v1 - 0.8).abs() < 0.05, "v1 share {v1}, want 0.80 +- 0.05: {out}");
    assert_eq!(n(&out["peers"][format!("{VIP}:80")]), 1000, "getpeername must show the VIP: {out}");

    // Attribution: the kernel's per-flow counts agree with what the client saw per backend.
    for (pod, version) in [(&scene.v1, "v1"), (&scene.v2, "v2")] {
        let want = n(&out["replies"][version]) as f64;
        let got = agent.wait_metric(
            "weft_l4_connections_opened_total",
            &[("reporter", "source"), ("source_workload", "client"), ("destination_workload", pod.name()), ("destination_service_name", "reviews")],
            want,
            SECS,
        );
        assert_eq!(got, want, "opened connections client -> {version}");
    }
    let balanced = agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "balanced")]);
    assert!(balanced >= 1000.0, "connect4 balanced counter {balanced}");
}

#[test]
fn l4_deny_gives_eperm_and_allow_lists_default_deny() {
    let scene = Scene::new(&["reply"]);
    let deny = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: default\nspec:\n  targetRefs:\n  - kind: Service\n    name: reviews\n  action: DENY\n  rules:\n  - from:\n    - serviceAccounts: [\"client\"]\n";
    let agent = scene.agent(&[], &(scene.config(1, 1) + deny));
    let out = scene.connect(10);
    assert_eq!(n(&out["ok"]), 0, "denied connects must fail: {out}");
    assert_eq!(n(&out["errors"]["EPERM"]), 10, "the caller sees EPERM: {out}");
    let denied = agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "denied")]);
    assert_eq!(denied, 10.0);

    // An ALLOW policy that does not name the client denies it too; one that does allows it.
    let allow = |sa: &str| format!("apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-some\n  namespace: default\nspec:\n  targetRefs:\n  - kind: Service\n    name: reviews\n  action: ALLOW\n  rules:\n  - from:\n    - serviceAccounts: [\"{sa}\"]\n");
    let g = agent.generation();
    agent.write_config("mesh.yaml", &(scene.config(1, 1) + &allow("someone-else")));
    agent.wait_generation_after(g, SECS);
    let out = scene.connect(5);
    assert_eq!(n(&out["errors"]["EPERM"]), 5, "not on the allow list: {out}");
    let g = agent.generation();
    agent.write_config("mesh.yaml", &(scene.config(1, 1) + &allow("client")));
    agent.wait_generation_after(g, SECS);
    let out = scene.connect(5);
    assert_eq!(n(&out["ok"]), 5, "on the allow list: {out}");
}

/// Sends `bytes` per connection to a sink that answers with the decimal count; checks the
/// kernel's byte counters on both sides against what was really sent.
fn byte_accounting(extra: &[&str]) -> (Scene, Agent) {
    let scene = Scene::new(&["sink"]);
    let agent = scene.agent(extra, &scene.config(1, 0));
    let (conns, bytes) = (20u64, 100_000u64);
    let via = format!("{VIP}:80");
    let (count, size) = (conns.to_string(), bytes.to_string());
    let mut args = vec!["connect", "--addr", &via, "--count", &count, "--send", &size];
    if extra.contains(&"on") {
        // See weft-probe --help: sockhash sockets wake blocked readers with a spurious EAGAIN.
        args.push("--retry-eagain");
    }
    let out = probe(&scene.client, &args);
    assert_eq!(n(&out["ok"]), conns, "{out}");
    let reply = (bytes.to_string().len() + 1) as u64; // "100000\n"
    assert_eq!(n(&out["bytes_received"]), conns * reply, "{out}");

    let src = [("reporter", "source"), ("source_workload", "client"), ("destination_workload", "v1")];
    let dst = [("reporter", "destination"), ("source_workload", "client"), ("destination_workload", "v1")];
    let closed = agent.wait_metric("weft_l4_connections_closed_total", &dst, conns as f64, SECS);
    assert_eq!(closed, conns as f64, "server-side closes");
    agent.wait_metric("weft_l4_connections_closed_total", &src, conns as f64, SECS);
    for (labels, metric, want) in [
        (&src, "weft_l4_sent_bytes_total", conns * bytes),
        (&src, "weft_l4_received_bytes_total", conns * reply),
        (&dst, "weft_l4_sent_bytes_total", conns * reply),
        (&dst, "weft_l4_received_bytes_total", conns * bytes),
        (&src, "weft_l4_connections_opened_total", conns),
    ] {
        let got = agent.metric(metric, labels);
        assert_eq!(got, want as f64, "{metric} {labels:?}; all byte counters:\n{}", byte_lines(&agent.metrics()));
    }
    // One access record per closed socket (both ends are meshed).
    // Records are drained in batches (at most ~100 ms late).
    let deadline = std::time::Instant::now() + SECS;
    let (log, records) = loop {
        let log = agent.access_log();
        let records = log.lines().filter(|l| l.contains("\"bytes_sent\":100000")).count() as u64;
        if records >= conns || std::time::Instant::now() > deadline {
            break (log, records);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(records, conns, "client-side access records with 100000 bytes sent:\n{log}");
    (scene, agent)
}

fn byte_lines(metrics: &str) -> String {
    metrics.lines().filter(|l| l.contains("_bytes_total") && l.contains("workload=")).collect::<Vec<_>>().join("\n")
}

#[test]
fn byte_and_connection_metrics_match_traffic() {
    let (_scene, agent) = byte_accounting(&[]);
    let redirected = agent.metric("weft_l4_redirected_bytes_total", &[]);
    assert_eq!(redirected, 0.0, "redirect is off");
}

#[test]
fn byte_metrics_match_traffic_with_skmsg_redirect() {
    let (_scene, agent) = byte_accounting(&["--skmsg", "on"]);
    assert_eq!(agent.config_dump()["datapath"]["skmsg_active"], true, "this kernel supports sk_msg");
    let redirected = agent.metric("weft_l4_redirected_bytes_total", &[]);
    assert!(redirected > 0.0, "bytes must have taken the sk_msg path");
    let msgs = agent.metric("weft_datapath_events_total", &[("hook", "sk_msg"), ("event", "redirected")]);
    assert!(msgs > 0.0, "sk_msg redirected messages: {msgs}");
}

#[test]
fn skmsg_delivers_byte_exact_data_between_pods() {
    let scene = Scene::new(&["echo"]);
    let agent = scene.agent(&["--skmsg", "on"], &scene.config(1, 0));
    let out = probe(&scene.client, &["transfer", "--addr", &format!("{VIP}:80"), "--bytes", "4000000", "--retry-eagain"]);
    assert_eq!(out["matched"], true, "echoed bytes must equal what was sent: {out}");
    assert_eq!(n(&out["received"]), 4_000_000, "{out}");
    agent.wait_metric("weft_l4_connections_closed_total", &[("reporter", "source")], 1.0, SECS);
    let redirected = agent.metric("weft_l4_redirected_bytes_total", &[("reporter", "source")]);
    assert!(redirected >= 4_000_000.0, "the transfer went through sk_msg: {redirected}");
}

#[test]
fn handoff_original_destination_is_recovered_by_a_listener() {
    let scene = Scene::new(&["reply"]);
    let proxy = SocketAddrV4::new(scene.node.ip(), 15001);
    let mut config = scene.config(1, 1);
    // Forces the service through the node proxy (routes will set this in the L7 proxy).
    config = config.replacen("metadata:\n  name: reviews\n", "metadata:\n  name: reviews\n  annotations:\n    weft.dev/use-proxy: \"true\"\n", 1);
    let agent = scene.agent(&["--proxy-addr", &proxy.to_string(), "--external-proxy"], &config);
    let pin_root = agent.pin_root().to_owned();

    // A plain TCP listener in the node netns stands in for the proxy.
    let listener = scene.node.run(move || TcpListener::bind(proxy).expect("bind the stand-in proxy"));
    let accept = std::thread::spawn(move || {
        let (mut sock, peer) = listener.accept().expect("accept");
        let reader = weft_datapath::OrigDstReader::open(&pin_root).expect("open pinned orig-dst map");
        let std::net::SocketAddr::V4(peer) = peer else { panic!("v4 only") };
        let record = reader.lookup(peer, proxy);
        let _ = sock.write_all(b"proxied\n");
        (peer, record)
    });
    let out = scene.connect(1);
    let (peer, record) = accept.join().expect("listener thread");
    assert_eq!(n(&out["ok"]), 1, "{out}");
    assert_eq!(n(&out["replies"]["proxied"]), 1, "the connection reached the proxy listener: {out}");
    assert_eq!(n(&out["peers"][format!("{VIP}:80")]), 1, "getpeername still shows the VIP: {out}");
    assert_eq!(*peer.ip(), scene.client.ip(), "the proxy sees the pod's own address");
    let record = record.expect("original destination recorded for the accepted connection");
    assert_eq!(record.dst, SocketAddrV4::new(VIP, 80));
    assert_ne!(record.src_workload, 0, "source workload known");
    let handoffs = agent.metric("weft_datapath_events_total", &[("hook", "connect4"), ("event", "handoff")]);
    assert_eq!(handoffs, 1.0);
}

fn links(pin_root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(pin_root.join("links")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            out.push(format!("{}/{}", dir.file_name().to_string_lossy(), f.file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

#[test]
fn agent_killed_mid_traffic_then_restart_reconciles() {
    let scene = Scene::new(&["echo"]);
    let mut agent = scene.agent(&[], &scene.config(1, 0));
    // Cgroup programs only: sk_lookup joins a pod's namespace once a process shows it, which
    // the client pod gets (the hold below) while this test runs.
    let cgroup_links = |pin_root: &Path| -> Vec<String> {
        links(pin_root).into_iter().filter(|l| !l.ends_with("/weft_sk_lookup")).collect()
    };
    let before = cgroup_links(agent.pin_root());
    assert_eq!(before.len(), 12, "four programs on each of three pods: {before:?}");
    assert_eq!(kernel_attachments(scene.client.cgroup_path()), 4);

    // A long-lived connection through the VIP keeps exchanging data across the outage.
    let mut cmd = scene.client.command(Testbed::probe_path());
    cmd.args(["hold", "--addr", &format!("{VIP}:80"), "--duration-ms", "4000", "--interval-ms", "20"]);
    let hold = scene.client.spawn(cmd);
    std::thread::sleep(Duration::from_millis(500));
    agent.kill();

    // Routing keeps working without the agent, and a config change waits for it.
    let out = probe(&scene.client, &["connect", "--addr", &format!("{VIP}:80"), "--count", "20", "--send", "10"]);
    assert_eq!(n(&out["ok"]), 20, "service routing with the agent down: {out}");
    agent.write_config("mesh.yaml", &scene.config(0, 1));
    std::thread::sleep(Duration::from_millis(500));

    agent.restart();
    agent.wait_ready(SECS);
    agent.wait_generation_after(0, SECS);
    let held = hold.wait_output(Duration::from_secs(10));
    let held: Value = serde_json::from_slice(&held.stdout).expect("hold JSON");
    assert_eq!(n(&held["failures"]), 0, "the established connection survived: {held}");
    assert!(n(&held["rounds"]) > 50, "{held}");

    assert_eq!(cgroup_links(agent.pin_root()), before, "adopted, not duplicated");
    let lookups = links(agent.pin_root()).into_iter().filter(|l| l.ends_with("/weft_sk_lookup")).count();
    assert!((2..=3).contains(&lookups), "sk_lookup in the servers' namespaces (and the client's): {lookups}");
    for pod in [&scene.client, &scene.v1, &scene.v2] {
        assert_eq!(kernel_attachments(pod.cgroup_path()), 4, "exactly our four programs on {}", pod.name());
    }
    // The change made while the agent was down now applies: everything goes to v2.
    let out = probe(&scene.client, &["connect", "--addr", &format!("{VIP}:80"), "--count", "20", "--send", "10"]);
    assert_eq!(n(&out["ok"]), 20, "{out}");
    let to_v2 = agent.wait_metric("weft_l4_connections_opened_total", &[("reporter", "source"), ("destination_workload", "v2")], 20.0, SECS);
    assert_eq!(to_v2, 20.0, "after restart, new connections follow the new weights");
}

#[test]
fn bad_config_is_rejected_and_last_good_keeps_serving() {
    let scene = Scene::new(&["reply"]);
    let agent = scene.agent(&[], &scene.config(1, 1));
    let g = agent.generation();
    let broken = scene.config(1, 1).replace("port: 80", "port: eighty");
    agent.write_config("mesh.yaml", &broken);
    let deadline = std::time::Instant::now() + SECS;
    let dump = loop {
        let dump = agent.config_dump();
        if dump["config"]["last_update_rejected"] == true || std::time::Instant::now() > deadline {
            break dump;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dump["config"]["last_update_rejected"], true, "{dump}");
    let errors = dump["config"]["errors"].to_string();
    for needle in ["mesh.yaml", "Service default/reviews", "spec.ports[0].port"] {
        assert!(errors.contains(needle), "error should name {needle}: {errors}");
    }
    assert_eq!(dump["config"]["generation"].as_u64(), Some(g), "generation unchanged");
    let out = scene.connect(10);
    assert_eq!(n(&out["ok"]), 10, "last good config keeps serving: {out}");
    assert!(agent.metric("weft_agent_config_reloads_total", &[("result", "rejected")]) >= 1.0);

    // Fixing the file applies again.
    agent.write_config("mesh.yaml", &scene.config(1, 0));
    agent.wait_generation_after(g, SECS);
    assert_eq!(agent.config_dump()["config"]["last_update_rejected"], false);
}

#[test]
fn config_change_applies_to_new_connections_only_and_removed_workloads_detach() {
    let scene = Scene::new(&["echo"]);
    let agent = scene.agent(&[], &scene.config(1, 0));
    let mut cmd = scene.client.command(Testbed::probe_path());
    cmd.args(["hold", "--addr", &format!("{VIP}:80"), "--duration-ms", "2500", "--interval-ms", "20"]);
    let hold = scene.client.spawn(cmd);
    std::thread::sleep(Duration::from_millis(400));

    let g = agent.generation();
    agent.write_config("mesh.yaml", &scene.config(0, 1));
    agent.wait_generation_after(g, SECS);
    let out = probe(&scene.client, &["connect", "--addr", &format!("{VIP}:80"), "--count", "10", "--send", "10"]);
    assert_eq!(n(&out["ok"]), 10, "{out}");
    let held: Value = serde_json::from_slice(&hold.wait_output(Duration::from_secs(10)).stdout).expect("hold JSON");
    assert_eq!(n(&held["failures"]), 0, "the connection made under the old config stays on v1: {held}");
    agent.wait_metric("weft_l4_connections_closed_total", &[("reporter", "source"), ("destination_workload", "v1")], 1.0, SECS);
    assert_eq!(agent.metric("weft_l4_connections_opened_total", &[("reporter", "source"), ("destination_workload", "v1")]), 1.0, "only the held connection went to v1");
    assert_eq!(agent.metric("weft_l4_connections_opened_total", &[("reporter", "source"), ("destination_workload", "v2")]), 10.0);

    // The syncer writes only what changed: a comment changes the file but not the config...
    let writes = agent.metric("weft_datapath_map_writes_total", &[]);
    let g = agent.generation();
    agent.write_config("mesh.yaml", &(scene.config(0, 1) + "# a comment: new file content, same config\n"));
    agent.wait_generation_after(g, SECS);
    assert_eq!(agent.metric("weft_datapath_map_writes_total", &[]), writes, "an unchanged config writes nothing");
    // ...and giving v1 a weight again rewrites one service port: two backends into the idle
    // half, the service value, and the old half's one backend deleted.
    let g = agent.generation();
    agent.write_config("mesh.yaml", &scene.config(1, 1));
    agent.wait_generation_after(g, SECS);
    assert_eq!(agent.metric("weft_datapath_map_writes_total", &[]) - writes, 4.0, "map entries written or deleted");

    // Dropping v2's workload detaches its cgroup.
    assert_eq!(kernel_attachments(scene.v2.cgroup_path()), 4);
    let g = agent.generation();
    let without_v2 = scene.config(1, 0).split("---\n").filter(|d| !d.contains(&format!("name: {}\n", scene.v2.name()))).collect::<Vec<_>>().join("---\n");
    agent.write_config("mesh.yaml", &without_v2);
    agent.wait_generation_after(g, SECS);
    assert_eq!(kernel_attachments(scene.v2.cgroup_path()), 0, "v2 detached");
    assert_eq!(kernel_attachments(scene.client.cgroup_path()), 4, "client still attached");
}

#[test]
fn programs_load_when_signals_interrupt_the_verifier() {
    // The kernel's verifier gives up with EAGAIN when a signal arrives for the loading thread;
    // the loader must try again. A harmless SIGUSR1 handler (tokio's) keeps the process alive.
    let tb = Testbed::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
    let _handler = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) })
        .expect("SIGUSR1 handler");
    let config = weft_datapath::Config { pin_root: tb.bpffs_dir().join("signalled"), skmsg: weft_datapath::SkMsgMode::Auto };
    let (ids, loader_id) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    let loader = std::thread::spawn(move || {
        let _ = ids.send(nix::sys::pthread::pthread_self());
        weft_datapath::Datapath::load(config)
    });
    let thread = loader_id.recv().expect("the loader's id");
    // A signal every millisecond for the first STORM of the load: every program's verifier
    // run in it is cut short (each takes a few milliseconds), then the loads go through.
    const STORM: Duration = Duration::from_millis(400);
    let mut sent = 0;
    while !loader.is_finished() && started.elapsed() < STORM {
        nix::sys::pthread::pthread_kill(thread, nix::sys::signal::Signal::SIGUSR1).expect("signal the loader");
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let datapath = loader.join().expect("the loader thread").expect("the datapath loads although signals came");
    assert!(
        datapath.interrupted_loads() > 0,
        "{sent} signals in the first {STORM:?} of the load, yet no program load was interrupted and tried again"
    );
}
