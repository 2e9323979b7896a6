//! CPU time the hypervisor took from this machine ("steal" in `/proc/stat`). On a shared host
//! it is the main source of millisecond latency spikes that no measured program caused, so the
//! benchmarks measure it around each latency sample and measure again what it spoiled.

use std::time::Duration;

/// A latency sample taken while the hypervisor took more than this share of the machine's CPU
/// time is measured again after a pause (`PAUSES`, growing, as steal comes in spells), up to
/// one attempt more than there are pauses; the least disturbed attempt counts.
pub const QUIET: f64 = 0.02;
pub const PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(3)];

/// A mark to measure steal from.
pub struct Steal {
    at: Option<(u64, u64)>,
}

impl Steal {
    pub fn mark() -> Steal {
        Steal { at: read() }
    }

    /// The share (0..1) of all CPUs' time since the mark that was stolen; 0 where the kernel
    /// does not say.
    pub fn share(&self) -> f64 {
        let (Some((steal0, total0)), Some((steal1, total1))) = (self.at, read()) else {
            return 0.0;
        };
        let total = total1.saturating_sub(total0);
        if total == 0 { 0.0 } else { steal1.saturating_sub(steal0) as f64 / total as f64 }
    }
}

/// (steal, total) ticks of all CPUs: the `cpu` line's user nice system idle iowait irq softirq
/// steal (guest time is already in user).
fn read() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).take(8).map(|t| t.parse().ok()).collect::<Option<_>>()?;
    (ticks.len() == 8).then(|| (ticks[7], ticks.iter().sum()))
}
