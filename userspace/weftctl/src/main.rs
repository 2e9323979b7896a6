//! `weftctl analyze`: loads config the way the agent does (the same loader and compiler), then
//! reports every problem at once: objects the loader or compiler refuses (errors) and config
//! that is valid but cannot do what it says ([`weft_policy::analyze`]). Exit status 1 when there
//! are errors (or warnings, with `--strict`), 2 when the input cannot be read. Installed as
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
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
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

fn main() -> ExitCode {
    let Command::Analyze { paths, output, strict } = Cli::parse().command;
    // A node with a proxy, so the checks see everything a proxy-backed node would enforce.
    let node = NodeSettings {
        node_name: "weftctl".into(),
        proxy: Some(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 15001)),
        skmsg: false,
    };
    let loaded = match weft_api::load_paths(&paths, node) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("weftctl: {e}");
            return ExitCode::from(2);
        }
    };
    let compiled = weft_policy::compile(&loaded.snapshot);
    let mut findings: Vec<Finding> = loaded
        .errors
        .iter()
        .map(|e| Finding {
            severity: Severity::Error,
            code: "invalid",
            object: e.object.clone().unwrap_or_else(|| format!("{} doc {}", e.file.display(), e.document)),
            field: e.field.clone().unwrap_or_default(),
            message: format!("{} (in {} doc {})", e.message, e.file.display(), e.document),
        })
        .collect();
    findings.extend(weft_policy::analyze::analyze(&loaded.snapshot, &compiled));
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let report = Report {
        files: loaded.files,
        objects: loaded.objects,
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
    println!(
        "{}, {} in {} ({})",
        plural(report.errors, "error"),
        plural(report.warnings, "warning"),
        plural(report.files, "file"),
        plural(report.objects, "object"),
    );
}
