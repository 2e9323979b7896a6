//! `cargo xtask bench l4`: round trips and connect rates on the testbed, each compared with a
//! baseline measured in the same run. Figures are medians over rounds; only ratios are judged.
//!
//! Layout (the same for every variant, so variants differ only in what weft does): `split` pins
//! the client to CPU 0 and the server to CPU 1, so every message costs a cross-CPU wakeup;
//! `shared` pins both to CPU 0, where the stack's own cost dominates.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use weft_testbed::{
    Node, Pod, Testbed,
    agent::{Agent, service_yaml, workload_yaml},
};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Suite {
    /// Kernel datapath: direct vs service LB vs sk_msg redirect; connect rate with/without hooks.
    L4,
    /// Node proxy (HTTP/1.1, h2c) vs direct, nginx, HAProxy and Envoy: latency at a fixed rate,
    /// max rps per core, CPU and memory. Its own fixed CPU layout (--layout does not apply).
    L7,
    /// The tunnel between nodes vs plaintext TCP and bare rustls on 127.0.0.1: latency at a
    /// fixed rate, one-stream throughput, new connections per second. Its own fixed CPU layout.
    Mtls,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PINGS: &str = "20000";

struct Scene {
    tb: Testbed,
    node: Node,
    client: Pod,
    server: Pod,
    client_cpu: &'static str,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Layout {
    Split,
    Shared,
}

impl Layout {
    fn cpus(self) -> (&'static str, &'static str) {
        match self {
            Layout::Split => ("0", "1"),
            Layout::Shared => ("0", "0"),
        }
    }
}

/// What `bench l7` and `bench mtls` run.
pub struct Options {
    pub quick: bool,
    pub memory_only: bool,
    /// Proxies to measure, by name; empty: all.
    pub only: Vec<String>,
    /// Tunnel connections the dialling side opens per identity pair (mtls; weft's default: 1).
    pub tunnel_connections: Option<u8>,
}

pub fn run(suite: Suite, rounds: Option<usize>, layout: Layout, options: Options) -> anyhow::Result<()> {
    match suite {
        Suite::L4 => l4(rounds.unwrap_or(5).max(1), layout),
        Suite::L7 => {
            if options.tunnel_connections.is_some() {
                bail!("--tunnel-connections is for `bench mtls`");
            }
            crate::bench_l7::run(rounds.unwrap_or(5), options)
        }
        Suite::Mtls => {
            if options.memory_only || !options.only.is_empty() {
                bail!("--memory-only and --only are for `bench l7`; `bench mtls` always measures plaintext TCP, the tunnel and bare rustls");
            }
            crate::bench_mtls::run(rounds.unwrap_or(3), options.quick, options.tunnel_connections)
        }
    }
}

fn l4(rounds: usize, layout: Layout) -> anyhow::Result<()> {
    let (client_cpu, server_cpu) = layout.cpus();
    let tb = Testbed::new();
    let node = tb.add_node("bench");
    let client = node.add_pod("client");
    let server = node.add_pod("server");
    let scene = Scene { tb, node, client, server, client_cpu };
    let mut cmd = scene.server.command("taskset");
    cmd.arg("-c").arg(server_cpu).arg(Testbed::probe_path()).args(["serve", "--port", "8080", "--mode", "echo"]);
    let _server = scene.server.spawn(cmd);
    scene.server.wait_listening(8080, Duration::from_secs(5));

    let direct = format!("{}:8080", scene.server.ip());
    let via_vip = format!("{VIP}:80");
    let mut rtt = Rtt::default();
    let mut rate = Rate::default();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        // Alternate the order so drift within a round does not favour one variant.
        let mut variants = [Variant::Direct, Variant::Hooks, Variant::HooksLogged, Variant::SkMsg];
        if round % 2 == 0 {
            variants.reverse();
        }
        for variant in variants {
            match variant {
                Variant::Direct => {
                    rtt.direct.push(pingpong(&scene, &direct)?);
                    rate.none.push(connect_rate(&scene, &direct)?);
                }
                Variant::Hooks => {
                    let _agent = start_agent(&scene, &[], false)?;
                    rtt.lb.push(pingpong(&scene, &via_vip)?);
                    rate.hooks.push(connect_rate(&scene, &via_vip)?);
                }
                Variant::HooksLogged => {
                    let _agent = start_agent(&scene, &[], true)?;
                    rate.hooks_logged.push(connect_rate(&scene, &via_vip)?);
                }
                Variant::SkMsg => {
                    let _agent = start_agent(&scene, &["--skmsg", "on"], false)?;
                    rtt.skmsg.push(pingpong(&scene, &via_vip)?);
                }
            }
            cleanup(&scene);
        }
    }
    rtt.report();
    rate.report();
    Ok(())
}

fn start_agent(scene: &Scene, extra: &[&str], access_log: bool) -> anyhow::Result<Agent> {
    let mut agent = Agent::start_with(&scene.tb, &scene.node, extra, access_log);
    let mut config = service_yaml("echo", "default", VIP, 80, 8080, "echo");
    config += &workload_yaml(&scene.client, "default", &[("app", "client")], 1);
    config += &workload_yaml(&scene.server, "default", &[("app", "echo")], 1);
    agent.write_config("bench.yaml", &config);
    agent.wait_ready(Duration::from_secs(20));
    agent.wait_generation_after(0, Duration::from_secs(10));
    Ok(agent)
}

/// Detaches everything between variants so the next one starts clean.
fn cleanup(scene: &Scene) {
    let _ = std::fs::remove_dir_all(scene.tb.bpffs_dir());
}

fn probe(scene: &Scene, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let pod = &scene.client;
    let mut cmd = pod.command("taskset");
    cmd.arg("-c").arg(scene.client_cpu).arg(Testbed::probe_path()).args(args);
    let out = pod.spawn(cmd).wait_output(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("weft-probe {args:?}: {stdout} {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(v)
}

/// (p50, p99) in µs.
fn pingpong(scene: &Scene, addr: &str) -> anyhow::Result<(f64, f64)> {
    let v = probe(scene, &["pingpong", "--addr", addr, "--count", PINGS, "--size", "64"])?;
    match (v["p50_us"].as_f64(), v["p99_us"].as_f64()) {
        (Some(p50), Some(p99)) => Ok((p50, p99)),
        _ => bail!("pingpong gave no percentiles: {v}"),
    }
}

/// (connections per second, failed connects).
fn connect_rate(scene: &Scene, addr: &str) -> anyhow::Result<(f64, u64)> {
    let v = probe(scene, &["connect-rate", "--addr", addr, "--duration-ms", "3000"])?;
    let rate = v["per_sec"].as_f64().with_context(|| format!("connect-rate gave no rate: {v}"))?;
    Ok((rate, v["errors"].as_u64().unwrap_or(0)))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

#[derive(Clone, Copy)]
enum Variant {
    Direct,
    Hooks,
    HooksLogged,
    SkMsg,
}

/// Median, min and max of per-round ratios `xs[i] / base[i]` (paired within a round).
fn paired(xs: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let ratios: Vec<f64> = xs.iter().zip(base).map(|(x, b)| x / b).collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(0.0, f64::max);
    (median(ratios), min, max)
}

#[derive(Default)]
struct Rtt {
    direct: Vec<(f64, f64)>,
    lb: Vec<(f64, f64)>,
    skmsg: Vec<(f64, f64)>,
}

impl Rtt {
    fn report(&self) {
        let col = |v: &[(f64, f64)], i: usize| -> Vec<f64> { v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect() };
        println!("L4 round trip, 64 B ping-pong x {PINGS}, {} rounds; ratios are medians of per-round ratios to direct [min-max]:", self.direct.len());
        println!("  {:<26} {:>7} {:>7} {:>22} {:>22}", "path", "p50 us", "p99 us", "p50 ratio", "p99 ratio");
        for (name, v, target) in [
            ("direct (no weft)", &self.direct, None),
            ("service VIP via connect4", &self.lb, Some(1.05)),
            ("service VIP + sk_msg", &self.skmsg, Some(0.7)),
        ] {
            let (r50, lo50, hi50) = paired(&col(v, 0), &col(&self.direct, 0));
            let (r99, lo99, hi99) = paired(&col(v, 1), &col(&self.direct, 1));
            let verdict = match target {
                Some(t) if r50 <= t => format!("  (p50 target <= {t}x: met)"),
                Some(t) => format!("  (p50 target <= {t}x: NOT met)"),
                None => String::new(),
            };
            println!(
                "  {name:<26} {:>7.1} {:>7.1} {r50:>6.2}x [{lo50:.2}-{hi50:.2}] {r99:>6.2}x [{lo99:.2}-{hi99:.2}]{verdict}",
                median(col(v, 0)),
                median(col(v, 1))
            );
        }
    }
}

#[derive(Default)]
struct Rate {
    none: Vec<(f64, u64)>,
    hooks: Vec<(f64, u64)>,
    hooks_logged: Vec<(f64, u64)>,
}

impl Rate {
    fn report(&self) {
        let rate = |v: &[(f64, u64)]| -> Vec<f64> { v.iter().map(|x| x.0).collect() };
        let errors = |v: &[(f64, u64)]| v.iter().map(|x| x.1).sum::<u64>();
        let base = rate(&self.none);
        println!("\nconnect+close rate, 3 s per round, {} rounds; ratios are medians of per-round ratios [min-max]:", base.len());
        println!("  no hooks (pod IP):             {:>8.0}/s  ({} failed connects)", median(base.clone()), errors(&self.none));
        let (r, lo, hi) = paired(&rate(&self.hooks), &base);
        println!(
            "  hooks attached (service VIP):  {:>8.0}/s  ({} failed)  {r:.2}x [{lo:.2}-{hi:.2}] (target >= 0.9x: {})",
            median(rate(&self.hooks)),
            errors(&self.hooks),
            if r >= 0.9 { "met" } else { "NOT met" }
        );
        let (r, lo, hi) = paired(&rate(&self.hooks_logged), &base);
        println!(
            "  hooks + L4 access log on:      {:>8.0}/s  ({} failed)  {r:.2}x [{lo:.2}-{hi:.2}] (a JSON line per closed socket, both ends)",
            median(rate(&self.hooks_logged)),
            errors(&self.hooks_logged)
        );
    }
}
