//! Running `weft-probe` inside a pod and reading its one JSON line.

use std::time::Duration;

use serde_json::Value;

use crate::{Pod, Testbed};

/// Runs `weft-probe <args>` in `pod` (its cgroup and netns) and parses the JSON it prints;
/// panics with its output if there is none.
pub fn run(pod: &Pod, args: &[&str]) -> Value {
    let mut cmd = pod.command(Testbed::probe_path());
    cmd.args(args);
    let out = pod.spawn(cmd).wait_output(Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("weft-probe {args:?} gave no JSON ({e}): {stdout} / {}", String::from_utf8_lossy(&out.stderr))
    })
}

/// A JSON count, 0 when absent (probes leave out zero counters).
pub fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}
