//! weft-bench-mtls: the measuring half of `cargo xtask bench mtls`, which pins the two ends to
//! different CPUs, runs rounds and judges the ratios.
//!
//! - `serve` is the accepting node: the tunnel listener ([`weft_proxy::tunnel::serve`]), bare
//!   rustls listeners that terminate TLS and forward to a target the way a tunnel stream does
//!   (so the two differ only by HTTP/2 CONNECT), and the targets themselves (echo, sink).
//! - `run` is the dialling node: one round of latency at a fixed rate, one-stream throughput and
//!   new-connection handshakes, each for plaintext TCP, the tunnel and bare rustls, printed as
//!   one JSON line.
//!
//! Both ends use the same CA, certificates, provider (ring), TLS 1.3 and SPIFFE verification
//! (`weft_identity`'s configs), so bare rustls is the tunnel minus its own machinery.
#![forbid(unsafe_code)]

mod measure;
mod serve;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use weft_identity::{Ca, CertStore, LocalIssuer, SpiffeId, TrustBundle};
use weft_proxy::tunnel::Identities;

const TRUST_DOMAIN: &str = "cluster.local";
/// What `serve` writes into `--dir` once it listens: its pid and addresses.
const READY_FILE: &str = "ready.json";

#[derive(Parser)]
#[command(name = "weft-bench-mtls", about = "The tunnel between nodes vs plaintext TCP and bare rustls, on 127.0.0.1")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The accepting node: creates the CA in --dir, listens on 127.0.0.1, writes --dir/ready.json.
    Serve {
        /// Holds the CA (root.pem, root.key) both ends use, and ready.json.
        #[arg(long)]
        dir: PathBuf,
        /// Exits after this long even if nobody stops it.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// The dialling node: measures one round against the `serve` whose --dir this is.
    Run(measure::RunArgs),
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Serve { dir, max_seconds } => serve::serve(&dir, Duration::from_secs(max_seconds)),
        Cmd::Run(args) => measure::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench-mtls: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The dialling workload.
fn source_id() -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "default", "bench-client").expect("a valid constant id")
}

/// The workload behind the accepting node (both targets run as it).
fn target_id() -> SpiffeId {
    SpiffeId::new(TRUST_DOMAIN, "shop", "bench-target").expect("a valid constant id")
}

fn identities(ca: &Arc<Ca>) -> Arc<Identities> {
    Arc::new(Identities { certs: CertStore::new(Arc::new(LocalIssuer::new(ca.clone()))), bundle: TrustBundle::from_ca(ca) })
}
