//! `weftctl analyze`: loads config the way the agent does (the same loader and compiler), then
//! reports every problem at once: objects the loader or compiler refuses (errors) and config
//! that is valid but cannot do what it says ([`weft_policy::analyze`]). The config comes from
//! files (`-f`) or from a live cluster (`--cluster`: every kind the agent watches, listed once,
//! through KUBECONFIG). Exit status 1 when there are errors (or warnings, with `--strict`), 2
//! when the input cannot be read. Installed as
//! `kubectl-weft` on the PATH (a symlink), it also runs as `kubectl weft analyze`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use weft_policy::{
    NodeSettings,
    analyze::{Finding, Severity},
};

#[derive(Debug, Parser)]
#[command(name = "weftctl", version, about = "weft's command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Find mistakes in mesh config: invalid objects, references to missing Services, backends
    /// and ports, shadowed route matches, policies that select nothing, STRICT workloads without
    /// identity, retries the timeout cuts off, services without endpoints.
    Analyze {
        /// Config files or directories (their *.yaml, *.yml and *.json files), as the agent's
        /// --config-dir reads them.
        #[arg(short = 'f', long = "filename", num_args = 1.., required_unless_present = "cluster")]
        paths: Vec<PathBuf>,
        /// Analyze the live cluster KUBECONFIG (or the in-cluster service account) points at:
        /// Services, EndpointSlices, Pods, Namespaces, Nodes, routes and weft's CRDs.
        #[arg(long, conflicts_with = "paths")]
        cluster: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Warnings fail too (exit status 1).
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Serialize)]
struct Report {
    files: usize,
    objects: usize,
    errors: usize,
    warnings: usize,
    findings: Vec<Finding>,
}

/// The config to analyze, and what was wrong with its objects.
struct Input {
    snapshot: weft_policy::Snapshot,
    invalid: Vec<Finding>,
    files: usize,
    objects: usize,
}

fn main() -> ExitCode {
    let Command::Analyze { paths, cluster, output, strict } = Cli::parse().command;
    // A node with a proxy, so the checks see everything a proxy-backed node would enforce.
    let node = NodeSettings {
        node_name: "weftctl".into(),
        proxy: Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 15001)),
        skmsg: false,
    };
    let input = match cluster {
        true => from_cluster(node),
        false => from_files(&paths, node),
    };
    let input = match input {
        Ok(input) => input,
        Err(e) => {
            eprintln!("weftctl: {e}");
            return ExitCode::from(2);
        }
    };
    let compiled = weft_policy::compile(&input.snapshot);
    let mut findings = input.invalid;
    findings.extend(weft_policy::analyze::analyze(&input.snapshot, &compiled));
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let report = Report {
        files: input.files,
        objects: input.objects,
        errors: count(Severity::Error),
        warnings: count(Severity::Warning),
        findings,
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default()),
        Output::Text => print_text(&report),
    }
    let failed = report.errors > 0 || (strict && report.warnings > 0);
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn from_files(paths: &[PathBuf], node: NodeSettings) -> Result<Input, String> {
    let loaded = weft_api::load_paths(paths, node).map_err(|e| e.to_string())?;
    let invalid = loaded
        .errors
        .iter()
        .map(|e| {
            let object = e.object.clone().unwrap_or_else(|| format!("{} doc {}", e.file.display(), e.document));
            invalid(object, &e.field, format!("{} (in {} doc {})", e.message, e.file.display(), e.document))
        })
        .collect();
    Ok(Input { snapshot: loaded.snapshot, invalid, files: loaded.files, objects: loaded.objects })
}

fn from_cluster(node: NodeSettings) -> Result<Input, String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let update = runtime.block_on(async {
        let client = weft_kube::Client::try_default().await.map_err(|e| {
            format!("cannot configure the Kubernetes client ({e}); set KUBECONFIG or run inside the cluster")
        })?;
        weft_kube::list_snapshot(&client, node).await.map_err(|e| e.to_string())
    })?;
    let invalid = update.errors.iter().map(|e| invalid(e.object.clone(), &e.field, e.message.clone())).collect();
    Ok(Input { snapshot: update.snapshot, invalid, files: 0, objects: update.objects })
}

/// An object the loader or converter refused.
fn invalid(object: String, field: &Option<String>, message: String) -> Finding {
    Finding { severity: Severity::Error, code: "invalid", object, field: field.clone().unwrap_or_default(), message }
}

fn print_text(report: &Report) {
    for f in &report.findings {
        let severity = match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let at = if f.field.is_empty() { String::new() } else { format!(" {}", f.field) };
        println!("{severity}[{}]: {}{at}: {}", f.code, f.object, f.message);
    }
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let source = match report.files {
        0 => "the cluster".to_owned(),
        files => plural(files, "file"),
    };
    println!(
        "{}, {} in {source} ({})",
        plural(report.errors, "error"),
        plural(report.warnings, "warning"),
        plural(report.objects, "object"),
    );
}
