//! weft's developer tasks. `cargo xtask --help` lists them.

mod bench;
mod bench_l7;
mod bench_mtls;
mod demo;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "weft developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel object (via weft-datapath's build script) and load it through the
    /// verifier, printing compiler or verifier errors.
    BuildEbpf,
    /// Build everything and run the whole test suite (root-only kernel tests included).
    Test,
    /// Write the CRD YAML in manifests/crds/ from the Rust types.
    Codegen,
    /// Run the mesh on a small scene in network namespaces and show what it sees.
    Demo,
    /// Benchmarks; print ratios against a baseline measured in the same run.
    Bench {
        #[arg(value_enum)]
        suite: bench::Suite,
        /// Rounds per measurement (the median is reported); default 5 (l4, l7) or 3 (mtls).
        #[arg(long)]
        rounds: Option<usize>,
        /// Where client and server run (the same for every variant; l4).
        #[arg(long, value_enum, default_value_t = bench::Layout::Shared)]
        layout: bench::Layout,
        /// One round of shorter runs: a smoke test (l7, mtls).
        #[arg(long)]
        quick: bool,
        /// Only the memory measurements (l7): idle and with held connections.
        #[arg(long)]
        memory_only: bool,
        /// Only these proxies (l7), comma-separated: weft, nginx, haproxy, envoy (direct always runs).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Tunnel connections the dialling side opens per identity pair (mtls), as the agent's
        /// --tunnel-connections; the targets are judged at the default, one.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
        tunnel_connections: Option<u8>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => build_ebpf(),
        Task::Test => test(),
        Task::Codegen => codegen(),
        Task::Demo => {
            weft_testbed::clean_up_on_signal();
            cargo(&["build", "-p", "weft-agent", "-p", "weft-testbed", "--bins"])?;
            demo::run()
        }
        Task::Bench { suite, rounds, layout, quick, memory_only, only, tunnel_connections } => {
            // Ctrl-C or SIGTERM stops the load, the proxies and the servers with the bench.
            weft_testbed::clean_up_on_signal();
            match suite {
                // Loopback only: no agent, no testbed binaries, no root.
                bench::Suite::Mtls => cargo(&["build", "--release", "-p", "weft-bench-mtls"])?,
                bench::Suite::L4 | bench::Suite::L7 => cargo(&["build", "--release", "-p", "weft-agent", "-p", "weft-testbed", "--bins"])?,
            }
            bench::run(suite, rounds, layout, bench::Options { quick, memory_only, only, tunnel_connections })
        }
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo).args(args).status().with_context(|| format!("running cargo {args:?}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub(crate) fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn build_ebpf() -> anyhow::Result<()> {
    cargo(&["build", "-p", "weft-agent"])?;
    let agent = target_dir().join("debug/weft-agent");
    let status = Command::new(&agent).arg("verify").status().with_context(|| format!("running {}", agent.display()))?;
    if !status.success() {
        bail!("the kernel rejected weft's programs (see the verifier log above)");
    }
    Ok(())
}

fn codegen() -> anyhow::Result<()> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, crd) in weft_api::crd::all() {
        let path = dir.join(file);
        std::fs::write(&path, weft_api::crd::render(&crd)).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("the test suite loads eBPF programs and creates namespaces: run it as root");
    }
    cargo(&["build", "--workspace", "--bins"])?;
    build_ebpf()?;
    cargo(&["test", "--workspace", "--no-fail-fast"])
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
