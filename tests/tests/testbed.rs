//! Self-test of the testbed: real namespaces, veths and cgroups, so it needs root. Without root
//! `Testbed::new` panics with the reason; these tests never skip.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use weft_testbed::{Pod, Proc, Testbed};

const PROBE: &str = env!("CARGO_BIN_EXE_weft-probe");
const WAIT: Duration = Duration::from_secs(10);

/// The single JSON line a successful weft-probe run prints.
fn probe_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft-probe failed ({}): stdout: {stdout} stderr: {stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("weft-probe printed no single JSON line ({e}): {stdout:?}; stderr: {stderr}")
    })
}

fn echo_server(pod: &Pod, port: u16) -> Proc {
    let mut cmd = pod.command(PROBE);
    cmd.args(["serve", "--port", &port.to_string(), "--mode", "echo"]);
    let server = Proc::spawn(cmd);
    pod.wait_listening(port, WAIT);
    server
}

fn transfer(from: &Pod, to: &Pod, port: u16, bytes: u64) -> Value {
    let mut cmd = from.command(PROBE);
    cmd.args([
        "transfer",
        "--addr",
        &format!("{}:{port}", to.ip()),
        "--bytes",
        &bytes.to_string(),
    ]);
    probe_json(&Proc::spawn(cmd).wait_output(WAIT))
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pods_on_one_node_exchange_bytes() {
    let bed = Testbed::new();
    let node = bed.add_node("n1");
    let (a, b) = (node.add_pod("a"), node.add_pod("b"));
    assert_eq!(
        (a.ip().to_string(), b.ip().to_string()),
        ("10.244.1.10".into(), "10.244.1.11".into())
    );

    let _server = echo_server(&b, 8080);
    let result = transfer(&a, &b, 8080, 100_000);
    assert_eq!(result["matched"], true, "{result}");
    assert_eq!(result["received"], 100_000, "{result}");
    assert_eq!(result["peer"], format!("{}:8080", b.ip()), "{result}");
}

#[test]
fn run_executes_in_the_right_netns() {
    let bed = Testbed::new();
    let node = bed.add_node("n1");
    let pod = node.add_pod("a");
    // An address can only be bound in the namespace that owns it.
    let (pod_ip, node_ip) = (pod.ip(), node.ip());
    assert!(
        pod.run(move || TcpListener::bind((pod_ip, 0)).is_ok()),
        "pod ip not bindable in pod.run"
    );
    assert!(
        node.run(move || TcpListener::bind((node_ip, 0)).is_ok()),
        "node ip not bindable in node.run"
    );
    assert!(
        TcpListener::bind((pod_ip, 0)).is_err(),
        "pod ip leaked into the test's own netns"
    );
    let forwarding = node
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read ip_forward"));
    assert_eq!(forwarding.trim(), "1");
    // Panics inside run() reach the caller with their message.
    let caught = std::panic::catch_unwind(|| pod.run(|| panic!("boom from the pod")));
    let msg = caught.expect_err("run must propagate panics");
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom from the pod"));
}

#[test]
fn pod_processes_run_in_the_pod_cgroup() {
    let bed = Testbed::new();
    let pod = bed.add_node("n1").add_pod("a");
    let mut cat = pod.command("cat");
    cat.arg("/proc/self/cgroup");
    let out = Proc::spawn(cat).wait_output(WAIT);
    let cgroups = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mount = bed
        .cgroup_root()
        .parent()
        .expect("cgroup root has a parent");
    let relative = Path::new("/").join(
        pod.cgroup_path()
            .strip_prefix(mount)
            .expect("pod cgroup under the mount"),
    );
    let expected = format!("0::{}", relative.display());
    assert!(
        cgroups.lines().any(|l| l == expected),
        "expected {expected:?} in /proc/self/cgroup:\n{cgroups}"
    );
    assert_eq!(
        relative,
        Path::new(&format!("/weft-test-{}/n1-a", bed.id()))
    );
    assert_ne!(pod.cgroup_id(), 0);
}

#[test]
fn pods_on_two_nodes_reach_each_other() {
    let bed = Testbed::new();
    let (n1, n2) = (bed.add_node("n1"), bed.add_node("n2"));
    bed.connect_nodes(&n1, &n2);
    assert_eq!(n1.underlay_ip().octets()[3], 1);
    assert_eq!(n2.underlay_ip().octets()[3], 2);
    let (a, b) = (n1.add_pod("a"), n2.add_pod("b"));

    let _server = echo_server(&b, 9000);
    let result = transfer(&a, &b, 9000, 50_000);
    assert_eq!(result["matched"], true, "{result}");
    // And the other way round, from a node netns to a pod on the other node.
    let mut cmd = n2.command(PROBE);
    cmd.args([
        "connect",
        "--addr",
        &format!("{}:9000", b.ip()),
        "--count",
        "3",
        "--send",
        "1000",
    ]);
    let result = probe_json(&n2.spawn(cmd).wait_output(WAIT));
    assert_eq!(result["ok"], 3, "{result}");
    assert_eq!(result["bytes_received"], 3000, "{result}");
}

#[test]
fn drop_removes_namespaces_and_cgroups() {
    let bed = Testbed::new();
    let id = bed.id().to_owned();
    let node = bed.add_node("n1");
    let pod = node.add_pod("a");
    let netns = [node.netns().to_owned(), pod.netns().to_owned()];
    let cgroup_root = bed.cgroup_root().to_owned();
    // A process still in the pod cgroup must not keep the cgroup alive.
    let mut sleep = pod.command("sleep");
    sleep.arg("600");
    let mut sleeper = Proc::spawn(sleep);
    // Nor may one in the node's netns, outside any testbed cgroup (an agent, a proxy), keep
    // running in a namespace nothing can reach.
    let mut node_sleep = node.command("sleep");
    node_sleep.arg("600");
    let mut node_sleeper = Proc::spawn(node_sleep);
    let listed = netns_list();
    assert!(
        netns.iter().all(|ns| listed.contains(ns.as_str())),
        "{netns:?} not in:\n{listed}"
    );

    drop(bed);
    assert!(
        sleeper.try_wait().is_some(),
        "process in the pod cgroup survived teardown"
    );
    assert!(
        node_sleeper.try_wait().is_some(),
        "process in the node netns survived teardown"
    );
    let listed = netns_list();
    // The trailing dash keeps a concurrent testbed whose id extends this one from matching.
    assert!(
        !listed.contains(&format!("{id}-")),
        "netns of {id} left behind:\n{listed}"
    );
    assert!(
        !cgroup_root.exists(),
        "{} left behind",
        cgroup_root.display()
    );
}

/// Set in the child of `a_signal_removes_the_testbeds_of_the_run_it_ends`: where it reports
/// what it made.
const HOLD_ENV: &str = "WEFT_TESTBED_HOLD_REPORT";

/// SIGTERM to a process holding a testbed (this test binary, run again as a child) kills what
/// it started, inside and outside the testbed, and removes the testbed at once, as its Drop
/// would have; the process exits 128 + 15.
#[test]
fn a_signal_removes_the_testbeds_of_the_run_it_ends() {
    if let Some(report) = std::env::var_os(HOLD_ENV) {
        return hold_until_signalled(Path::new(&report));
    }
    let report = std::env::temp_dir().join(format!("weft-hold-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&report);
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "a_signal_removes_the_testbeds_of_the_run_it_ends",
            "--nocapture",
        ])
        .env(HOLD_ENV, &report)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn this test binary again");
    let deadline = Instant::now() + Duration::from_secs(60);
    let made: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&report) {
            break serde_json::from_str(&text).expect("the child's report is JSON");
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the child ended ({status}) before it made its testbed");
        }
        assert!(
            Instant::now() < deadline,
            "the child made no testbed within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_file(&report);
    let child_pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    kill(child_pid, Signal::SIGTERM).expect("SIGTERM the child");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the child's exit after SIGTERM: {status}"
    );
    let listed = netns_list();
    for netns in made["netns"].as_array().expect("netns") {
        let netns = netns.as_str().expect("name");
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(netns)),
            "netns {netns} left behind"
        );
    }
    let cgroup_root = made["cgroup_root"].as_str().expect("cgroup_root");
    assert!(
        !Path::new(cgroup_root).exists(),
        "{cgroup_root} left behind"
    );
    for (what, pid) in made["pids"].as_object().expect("pids") {
        let pid = pid.as_u64().expect("pid");
        assert!(!running(pid), "{what} (pid {pid}) survived the signal");
    }
}

/// The child's part: a testbed with a pod, a process in the pod, one in the node's netns and
/// one outside both (as a bench's load runs), reported to `report`; then it waits for the signal.
fn hold_until_signalled(report: &Path) {
    let bed = Testbed::new();
    let node = bed.add_node("n1");
    let pod = node.add_pod("a");
    let sleep = |mut cmd: Command| {
        cmd.arg("600");
        Proc::spawn(cmd)
    };
    let in_pod = sleep(pod.command("sleep"));
    let in_node = sleep(node.command("sleep"));
    let outside = sleep(Command::new("sleep"));
    let made = serde_json::json!({
        "netns": [node.netns(), pod.netns()],
        "cgroup_root": bed.cgroup_root(),
        "pids": { "the pod's process": in_pod.pid(), "the node's process": in_node.pid(), "the child's own child": outside.pid() },
    });
    let tmp = report.with_extension("tmp");
    std::fs::write(&tmp, made.to_string()).expect("write the report");
    std::fs::rename(&tmp, report).expect("rename the report");
    std::thread::sleep(Duration::from_secs(60));
    panic!("no signal came within 60 s");
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn probe_path_finds_the_built_binary() {
    let found = Testbed::probe_path()
        .canonicalize()
        .expect("probe path exists");
    assert_eq!(
        found,
        Path::new(PROBE)
            .canonicalize()
            .expect("CARGO_BIN_EXE exists")
    );
}
