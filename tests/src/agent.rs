//! Runs a `weft-agent` on a testbed node: standalone on a config directory of YAML, or with
//! `--kube` on an API server named by a KUBECONFIG; a pin root under the testbed's bpffs
//! directory, the admin server reached from inside the node netns.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{Node, Pod, Proc, Testbed};

/// Where the admin server listens inside the node netns.
pub const ADMIN_PORT: u16 = 15020;

/// A `weft-agent` process and its files. Killed (not cleaned) on drop; the testbed removes pins.
pub struct Agent {
    node: Node,
    config_dir: PathBuf,
    pin_root: PathBuf,
    access_log: PathBuf,
    args: Vec<String>,
    with_access_log: bool,
    /// `--kube` with this KUBECONFIG instead of the config directory.
    kubeconfig: Option<PathBuf>,
    /// A command the agent runs under (e.g. `setpriv` with fewer capabilities).
    wrap: Vec<String>,
    proc: Option<Proc>,
}

impl Agent {
    /// Starts an agent on `node` with `extra` flags (e.g. `--skmsg on`), config directory empty,
    /// writing an access log.
    pub fn start(tb: &Testbed, node: &Node, extra: &[&str]) -> Agent {
        Self::start_with(tb, node, extra, true)
    }

    /// Like [`Agent::start`]; without an access log (the agent's default) if `access_log` is false.
    pub fn start_with(tb: &Testbed, node: &Node, extra: &[&str], access_log: bool) -> Agent {
        Self::start_under(tb, node, extra, access_log, &[])
    }

    /// Like [`Agent::start_with`], run under `wrap` (a command that execs its arguments).
    pub fn start_under(tb: &Testbed, node: &Node, extra: &[&str], access_log: bool, wrap: &[&str]) -> Agent {
        let mut agent = Self::new(tb, node, extra, access_log, wrap);
        agent.spawn();
        agent
    }

    /// Starts an agent on `node` in Kubernetes mode (`--kube`) on the API server `kubeconfig`
    /// names, with `extra` flags and an access log.
    pub fn start_kube(tb: &Testbed, node: &Node, kubeconfig: &Path, extra: &[&str]) -> Agent {
        let mut agent = Self::new(tb, node, extra, true, &[]);
        agent.kubeconfig = Some(kubeconfig.to_owned());
        agent.spawn();
        agent
    }

    /// The agent's files and flags; nothing runs yet.
    fn new(tb: &Testbed, node: &Node, extra: &[&str], access_log: bool, wrap: &[&str]) -> Agent {
        let base = Path::new("/tmp").join(format!("weft-test-{}-{}", tb.id(), node.name()));
        let mut args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        if !args.iter().any(|a| a == "--ca-dir") {
            // One CA per testbed: every node's tunnel trusts every other's, and nothing is
            // written outside the test's own files.
            args.push("--ca-dir".into());
            args.push(Self::ca_dir(tb).display().to_string());
        }
        let config_dir = base.join("config");
        fs::create_dir_all(&config_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", config_dir.display()));
        Agent {
            node: node.clone(),
            config_dir,
            pin_root: tb.bpffs_dir().join(format!("agent-{}", node.name())),
            access_log: base.join("access.log"),
            args,
            with_access_log: access_log,
            kubeconfig: None,
            wrap: wrap.iter().map(|s| (*s).to_owned()).collect(),
            proc: None,
        }
    }

    /// The CA directory agents of this testbed share unless given their own `--ca-dir`; the
    /// testbed removes it.
    pub fn ca_dir(tb: &Testbed) -> PathBuf {
        Path::new("/tmp").join(format!("weft-test-{}-ca", tb.id()))
    }

    /// The weft-agent binary: `$WEFT_AGENT`, else beside weft-probe.
    pub fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("WEFT_AGENT") {
            return PathBuf::from(p);
        }
        let probe = Testbed::probe_path();
        let path = probe.with_file_name("weft-agent");
        assert!(
            path.is_file(),
            "{} not found; build it with `cargo build -p weft-agent` (make test does)",
            path.display()
        );
        path
    }

    fn spawn(&mut self) {
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut cmd = self.node.command(program);
                cmd.args(args).arg(Self::binary());
                cmd
            }
            None => self.node.command(Self::binary()),
        };
        match &self.kubeconfig {
            Some(kubeconfig) => cmd.arg("--kube").env("KUBECONFIG", kubeconfig),
            None => cmd.arg("--config-dir").arg(&self.config_dir),
        };
        cmd.arg("--pin-root")
            .arg(&self.pin_root)
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{ADMIN_PORT}"))
            .arg("--poll-ms")
            .arg("100")
            .args(&self.args)
            .env("WEFT_LOG", "info");
        if self.with_access_log {
            cmd.arg("--access-log").arg(&self.access_log);
        }
        self.proc = Some(Proc::spawn(cmd));
    }

    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    pub fn pin_root(&self) -> &Path {
        &self.pin_root
    }

    pub fn access_log(&self) -> String {
        fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// The access records `keep` selects, once there are `want` of them or `timeout` has
    /// passed (records land as responses end, flushed at most ~100 ms late).
    pub fn wait_access_records(&self, want: usize, timeout: Duration, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let records: Vec<serde_json::Value> =
                self.access_log().lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|r| keep(r)).collect();
            if records.len() >= want || std::time::Instant::now() > deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes a config file atomically (the agent never sees half a file).
    pub fn write_config(&self, name: &str, yaml: &str) {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
        fs::rename(&tmp, self.config_dir.join(name))
            .unwrap_or_else(|e| panic!("renaming {name}: {e}"));
    }

    pub fn remove_config(&self, name: &str) {
        let _ = fs::remove_file(self.config_dir.join(name));
    }

    /// SIGKILL: no cleanup code runs, as when the node kills a crashing agent.
    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The agent's stderr so far is not collected; this says whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_wait().is_none())
    }

    /// `GET path` on the admin server: (status, body). `None` if it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let path = path.to_owned();
        self.node
            .run(move || http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)), &path))
    }

    /// Waits for `/ready`; panics with the agent's state if it never comes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.get("/ready") {
                return;
            }
            if !self.is_running() {
                let out = self
                    .proc
                    .take()
                    .map(|p| p.wait_output(Duration::from_secs(1)));
                panic!("weft-agent exited before it was ready: {out:?}");
            }
            assert!(
                Instant::now() < deadline,
                "weft-agent not ready after {timeout:?}: {:?}",
                self.get("/ready")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self
            .get("/config_dump")
            .expect("admin server does not answer");
        assert_eq!(status, 200, "config_dump: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("config_dump is not JSON ({e}): {body}"))
    }

    /// The config generation in force.
    pub fn generation(&self) -> u64 {
        self.config_dump()["config"]["generation"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Waits until the agent has applied a generation above `after` and synced it.
    pub fn wait_generation_after(&self, after: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let generation = self.generation();
            if generation > after {
                // One more poll so the syncer has applied it too.
                std::thread::sleep(Duration::from_millis(200));
                return generation;
            }
            assert!(
                Instant::now() < deadline,
                "no config generation after {after} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").expect("admin server does not answer");
        assert_eq!(status, 200, "metrics: {body}");
        body
    }

    /// Sum of every sample of `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum_samples(&self.metrics(), name, labels)
    }

    /// Polls `metric` until it equals `want`, returning the last value seen.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(name, labels);
            if v == want || Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if let Some(base) = self.config_dir.parent() {
            let _ = fs::remove_dir_all(base);
        }
    }
}

/// weft's programs attached to a cgroup, as the kernel lists them.
pub fn kernel_attachments(cgroup: &Path) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap_or_else(|e| panic!("bpftool missing ({e}); `make setup` installs it"));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("weft_")).count()
}

/// Sums the samples of a text-format metric whose label set contains `labels`.
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .into_iter()
        .filter(|(have, _)| labels.iter().all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, value)| value)
        .sum()
}

/// A minimal HTTP/1.0 GET (the admin server is local; no client library needed in tests).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

// === config builders ===

/// A weft `Workload` standing in for a pod.
pub fn workload_yaml(pod: &Pod, namespace: &str, labels: &[(&str, &str)], weight: u32) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{labels}    weft.dev/pod: \"{name}\"\nspec:\n  serviceAccount: {name}\n  addresses: [\"{ip}\"]\n  cgroupPath: {cgroup}\n  weight: {weight}\n---\n",
        name = pod.name(),
        ip = pod.ip(),
        cgroup = pod.cgroup_path().display(),
    )
}

/// A ClusterIP `Service` selecting `app=<app>`.
pub fn service_yaml(
    name: &str,
    namespace: &str,
    vip: Ipv4Addr,
    port: u16,
    target: u16,
    app: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {vip}\n  selector:\n    app: {app}\n  ports:\n  - name: main\n    port: {port}\n    targetPort: {target}\n---\n"
    )
}

/// Every sample of `name`: its labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let labels = rest
                .trim_end_matches('}')
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((
                        k.trim_matches(',').to_owned(),
                        v.trim_end_matches('"').to_owned(),
                    ))
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}
