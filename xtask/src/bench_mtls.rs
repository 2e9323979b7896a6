//! `cargo xtask bench mtls`: the tunnel between nodes (mTLS, HTTP/2 CONNECT) against plaintext
//! TCP and bare rustls, all measured in the same run. The measuring is `weft-bench-mtls`; this
//! runs it, pairs the rounds and judges the targets.
//!
//! Layout: 127.0.0.1 in this machine's own network namespace (no root, no testbed). The
//! accepting side (`weft-bench-mtls serve`: the tunnel listener, bare TLS servers that forward
//! to the target as a tunnel stream does, echo and sink targets) is pinned to CPU 1; the
//! dialling side (`weft-bench-mtls run`) to CPU 0. One server serves every round; each round is
//! a new client, which runs every measurement with the variants interleaved in slices (order
//! reversed on even rounds), so a busy spell of the machine falls on all of them alike. A
//! latency slice during which the hypervisor stole more than 2% of the machine's CPU time is
//! measured again after a pause (twice at most), as in `bench l7`; the least disturbed counts.
//! Figures are medians over rounds; ratios and added latency are paired within a round.
//! `weft-bench-mtls run --help` lists the knobs (rate, connections, write size, one path or
//! measurement only) for runs by hand against a `weft-bench-mtls serve`.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::Value;
use weft_testbed::Proc;

use crate::bench_l7::{by_round, median};

/// The dialling side.
const CLIENT_CPU: &str = "0";
/// The accepting side and the targets.
const SERVER_CPU: &str = "1";
/// Variants in the order of the report, with their names in weft-bench-mtls's output.
const PATHS: [(&str, &str); 3] = [("plain", "plaintext TCP"), ("tunnel", "tunnel"), ("tls", "bare rustls")];
/// Bounds one client run (a full round takes about a minute).
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

// Targets from the issue.
const TARGET_THROUGHPUT_VS_TLS: f64 = 0.8;
const TARGET_ADDED_P99_MS: f64 = 0.3;

pub fn run(rounds: usize, quick: bool, tunnel_connections: Option<u8>) -> anyhow::Result<()> {
    let bin = crate::target_dir().join("release/weft-bench-mtls");
    if !bin.is_file() {
        bail!("{} is missing; `cargo build --release -p weft-bench-mtls` builds it", bin.display());
    }
    let rounds = if quick { 1 } else { rounds.max(1) };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let (client_cpu, server_cpu) = if cpus >= 2 { (CLIENT_CPU, SERVER_CPU) } else { (CLIENT_CPU, CLIENT_CPU) };
    if cpus < 2 {
        eprintln!("note: one CPU available; both sides share CPU {CLIENT_CPU}");
    }
    let dir = TempDir(std::env::temp_dir().join(format!("weft-bench-mtls-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    eprintln!(
        "bench mtls: {rounds} round(s) of {{plaintext TCP, tunnel, bare rustls}} x {{latency, throughput, new connections}}; \
         about {} min, and up to 5 s more for each latency slice measured again (steal)",
        (rounds as u64 * if quick { 25 } else { 60 }).div_ceil(60)
    );
    let mut server = Server::start(&bin, &dir.0, server_cpu, rounds)?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", client_cpu]).arg(&bin).arg("run").arg("--dir").arg(&dir.0);
        if quick {
            cmd.arg("--quick");
        }
        if round % 2 == 0 {
            cmd.arg("--reverse");
        }
        if let Some(n) = tunnel_connections {
            cmd.args(["--tunnel-connections", &n.to_string()]);
        }
        // As in `bench l7`: `WEFT_BENCH_TIMELINES=<dir>` keeps every latency slice's requests.
        if let Some(dir) = std::env::var_os("WEFT_BENCH_TIMELINES") {
            cmd.arg("--timeline").arg(Path::new(&dir).join(format!("mtls-round-{round}")));
        }
        let out = Proc::spawn(cmd).wait_output(ROUND_TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A failed round is reported as missing, not fatal: the others still count.
        match serde_json::from_str::<Value>(stdout.trim()) {
            Ok(v) if out.status.success() => {
                eprintln!("  {}", summary(&v));
                results.push(Some(v));
            }
            _ => {
                eprintln!("  round {round} failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
                results.push(None);
            }
        }
        server.check()?;
    }
    drop(server);
    print!("{}", report(&results, client_cpu, server_cpu));
    Ok(())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The accepting side, killed on drop.
struct Server {
    proc: Option<Proc>,
}

impl Server {
    fn start(bin: &Path, dir: &Path, cpu: &str, rounds: usize) -> anyhow::Result<Server> {
        // Outlives the rounds only if this process dies without killing it.
        let max_seconds = (rounds as u64 * ROUND_TIMEOUT.as_secs() + 60).to_string();
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", cpu]).arg(bin).arg("serve").arg("--dir").arg(dir).args(["--max-seconds", &max_seconds]);
        let mut proc = Proc::spawn(cmd);
        let ready = dir.join("ready.json");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.is_file() {
            if proc.try_wait().is_some() || Instant::now() > deadline {
                let out = proc.wait_output(Duration::from_secs(1));
                bail!(
                    "weft-bench-mtls serve did not write {} within 10 s ({}): {}{}",
                    ready.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Server { proc: Some(proc) })
    }

    /// Fails if the server has exited (every later round would fail too).
    fn check(&mut self) -> anyhow::Result<()> {
        if let Some(proc) = self.proc.as_mut()
            && proc.try_wait().is_some()
        {
            let out = self.proc.take().map(|p| p.wait_output(Duration::from_secs(1)));
            let text = out.map_or_else(String::new, |o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
            bail!("weft-bench-mtls serve exited during the run: {text}");
        }
        Ok(())
    }
}

// === figures ===

/// `v[a][b]...` as a number.
fn num_at(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// One figure from each round that has it.
fn per_round(results: &[Option<Value>], path: &[&str]) -> Vec<f64> {
    results.iter().flatten().filter_map(|v| num_at(v, path)).collect()
}

/// Per-round `f(round)` where every figure it needs is there (pairs stay within a round).
fn paired(results: &[Option<Value>], f: impl Fn(&Value) -> Option<f64>) -> Vec<f64> {
    results.iter().flatten().filter_map(f).collect()
}

/// A cost per unit: `(client or server CPU s) * scale / units`, per round.
fn cost(results: &[Option<Value>], section: &[&str], side: &str, units: &str, scale: f64) -> Vec<f64> {
    paired(results, |v| {
        let s = section.iter().try_fold(v, |v, k| v.get(k))?;
        Some(s.get(side)?.as_f64()? * scale / s.get(units)?.as_f64()?)
    })
}

/// Median with the [min..max] of the rounds.
fn spread(xs: &[f64], prec: usize) -> String {
    spread_unit(xs, prec, "")
}

/// A ratio: median with the [min..max] of the rounds.
fn times(xs: &[f64]) -> String {
    spread_unit(xs, 2, "x")
}

fn spread_unit(xs: &[f64], prec: usize, unit: &str) -> String {
    if xs.is_empty() {
        return "-".to_owned();
    }
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.prec$}{unit} [{lo:.prec$}..{hi:.prec$}]", median(xs.to_vec()))
}

fn fixed(x: f64, prec: usize) -> String {
    if x.is_finite() { format!("{x:.prec$}") } else { "-".to_owned() }
}

fn verdict(x: f64, ok: impl Fn(f64) -> bool) -> &'static str {
    if !x.is_finite() {
        "no data"
    } else if ok(x) {
        "met"
    } else {
        "NOT met"
    }
}

/// One line per round for the progress log.
fn summary(v: &Value) -> String {
    let mut s = String::new();
    for (key, _) in PATHS {
        let _ = write!(
            s,
            "{key}: p99 {} ms, {} MiB/s, {} conn/s; ",
            fixed(num_at(v, &["latency", key, "p99_us"]).unwrap_or(f64::NAN) / 1000.0, 3),
            fixed(num_at(v, &["throughput", key, "mib_s"]).unwrap_or(f64::NAN), 0),
            fixed(num_at(v, &["handshakes", "1", key, "per_sec"]).unwrap_or(f64::NAN), 0),
        );
    }
    s.trim_end_matches("; ").to_owned()
}

fn report(results: &[Option<Value>], client_cpu: &str, server_cpu: &str) -> String {
    let mut o = String::new();
    let ok = results.iter().flatten().count();
    let failed = results.len() - ok;
    let Some(first) = results.iter().flatten().next() else {
        return "\nmTLS bench: no round completed (see the errors above)\n".to_owned();
    };
    let param = |k: &str| first["params"][k].clone();
    let concurrency = first["handshakes"].as_object().and_then(|m| m.keys().find(|k| *k != "1").cloned()).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        o,
        "\nmTLS tunnel bench: {ok} round(s){}; over 127.0.0.1 (loopback, this machine's network namespace); \
         dialling side on CPU {client_cpu}, accepting side (tunnel / bare TLS server, echo and sink targets) on CPU {server_cpu}.",
        if failed > 0 { format!(" ({failed} failed)") } else { String::new() }
    );
    let _ = writeln!(
        o,
        "Both ends use weft-identity's configs (TLS 1.3, ring, SPIFFE verification, the same certificates); bare rustls \
         terminates TLS and forwards to the target as a tunnel stream does. Each measurement interleaves the paths in {} slices. \
         Medians over rounds [min..max]; ratios and added latency are paired within a round. \
         CPU d/a: the dialling / accepting process, from schedstat.",
        param("slices")
    );

    let _ = writeln!(
        o,
        "\nLatency: {} rps fixed rate (open loop, from each request's scheduled start), {} long-lived connections \
         (tunnel: CONNECT streams on {} pooled connection(s)), {} B echo, {} s:",
        param("rate"),
        param("connections"),
        param("tunnel_connections"),
        param("size"),
        param("latency_s")
    );
    let steal: Vec<f64> = per_round(results, &["latency", "steal_share"]).iter().map(|s| s * 100.0).collect();
    let retries: f64 = per_round(results, &["latency", "retries"]).iter().sum();
    let _ = writeln!(
        o,
        "  (the hypervisor took {} % of the machine's CPU time during the slices that count: what makes p99 jump here. \
         Slices above {}% were measured again, up to {} times, keeping the least disturbed: {retries} extra runs.)",
        spread(&steal, 2),
        weft_testbed::steal::QUIET * 100.0,
        weft_testbed::steal::PAUSES.len(),
    );
    let _ = writeln!(o, "  {:<14} {:>7} {:>22} {:>9} {:>22} {:>17}", "path", "p50 ms", "p99 ms [min..max]", "p99.9 ms", "+p99 ms vs plain", "CPU us/req d/a");
    let added = |key: &str| {
        paired(results, |v| Some((num_at(v, &["latency", key, "p99_us"])? - num_at(v, &["latency", "plain", "p99_us"])?) / 1000.0))
    };
    for (key, name) in PATHS {
        let ms = |field: &str| per_round(results, &["latency", key, field]).into_iter().map(|x| x / 1000.0).collect::<Vec<_>>();
        let per_req = |side| median(cost(results, &["latency", key], side, "requests", 1e6));
        let _ = writeln!(
            o,
            "  {name:<14} {:>7} {:>22} {:>9} {:>22} {:>17}",
            fixed(median(ms("p50_us")), 3),
            spread(&ms("p99_us"), 3),
            fixed(median(ms("p999_us")), 3),
            if key == "plain" { "-".to_owned() } else { spread(&added(key), 3) },
            format!("{} / {}", fixed(per_req("client_cpu_s"), 0), fixed(per_req("server_cpu_s"), 0)),
        );
    }
    let ratio = |section: &[&str], field: &str| {
        paired(results, |v| {
            let at = |key: &str| {
                let mut path = section.to_vec();
                path.extend([key, field]);
                num_at(v, &path)
            };
            Some(at("tunnel")? / at("tls")?)
        })
    };
    let _ = writeln!(
        o,
        "  tunnel / bare rustls: p50 {}, p99 {}",
        times(&ratio(&["latency"], "p50_us")),
        times(&ratio(&["latency"], "p99_us"))
    );

    let _ = writeln!(
        o,
        "\nThroughput on one stream, one way (dialler -> sink), up to {} MiB or {} s in {} KiB writes:",
        param("stream_mib"),
        param("stream_max_s"),
        param("write_kib")
    );
    let _ = writeln!(o, "  {:<14} {:>22} {:>20}", "path", "MiB/s [min..max]", "CPU ms/MiB d/a");
    for (key, name) in PATHS {
        let per_mib = |side| median(cost(results, &["throughput", key], side, "bytes", 1e3 * f64::from(1u32 << 20)));
        let _ = writeln!(
            o,
            "  {name:<14} {:>22} {:>20}",
            spread(&per_round(results, &["throughput", key, "mib_s"]), 0),
            format!("{} / {}", fixed(per_mib("client_cpu_s"), 2), fixed(per_mib("server_cpu_s"), 2)),
        );
    }
    let throughput = ratio(&["throughput"], "mib_s");
    let _ = writeln!(o, "  tunnel / bare rustls: {}", times(&throughput));

    let _ = writeln!(
        o,
        "\nNew connections per second: connect + TLS handshake (tunnel: from an empty pool, + HTTP/2 + first CONNECT) + a 1-byte \
         round trip to the target; one dialler, then {concurrency} at once, {} s each:",
        param("handshake_s")
    );
    let _ = writeln!(o, "  {:<14} {:>20} {:>20} {:>20}", "path", "x1 /s [min..max]", format!("x{concurrency} /s [min..max]"), "CPU us/conn d/a (x1)");
    for (key, name) in PATHS {
        let per_conn = |side| median(cost(results, &["handshakes", "1", key], side, "count", 1e6));
        let _ = writeln!(
            o,
            "  {name:<14} {:>20} {:>20} {:>20}",
            spread(&per_round(results, &["handshakes", "1", key, "per_sec"]), 0),
            spread(&per_round(results, &["handshakes", concurrency.as_str(), key, "per_sec"]), 0),
            format!("{} / {}", fixed(per_conn("client_cpu_s"), 0), fixed(per_conn("server_cpu_s"), 0)),
        );
    }
    let _ = writeln!(
        o,
        "  tunnel / bare rustls: x1 {}, x{concurrency} {}",
        times(&ratio(&["handshakes", "1"], "per_sec")),
        times(&ratio(&["handshakes", concurrency.as_str()], "per_sec"))
    );

    let _ = writeln!(o, "\nTargets:");
    if param("tunnel_connections") != 1 {
        let _ = writeln!(o, "  (with {} tunnel connections per identity pair: the issue's targets are for one)", param("tunnel_connections"));
    }
    let t = median(throughput.clone());
    let _ = writeln!(
        o,
        "  tunnel throughput >= {TARGET_THROUGHPUT_VS_TLS}x bare rustls: {}x: {}{}",
        fixed(t, 2),
        verdict(t, |t| t >= TARGET_THROUGHPUT_VS_TLS),
        by_round((throughput.iter().filter(|t| **t >= TARGET_THROUGHPUT_VS_TLS).count(), throughput.len()))
    );
    let added_tunnel = added("tunnel");
    let a = median(added_tunnel.clone());
    let _ = writeln!(
        o,
        "  added p99 over plaintext <= {TARGET_ADDED_P99_MS} ms at {} rps: {} ms: {}{}",
        param("rate"),
        fixed(a, 3),
        verdict(a, |a| a <= TARGET_ADDED_P99_MS),
        by_round((added_tunnel.iter().filter(|a| **a <= TARGET_ADDED_P99_MS).count(), added_tunnel.len()))
    );
    o
}
