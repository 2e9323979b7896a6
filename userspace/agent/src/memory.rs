//! Gives the memory of a burst back. glibc keeps what a thread frees in that thread's arena and
//! returns pages to the system only from the top of a heap, so once the proxy has served a
//! burst of connections their memory stays resident after they close: measured with `cargo
//! xtask bench l7 --memory-only`, the agent stayed at 50 MB after 10,000 keep-alive connections
//! closed, against 19 MB idle, and `malloc_trim(0)` brought it back to 19 MB.
//!
//! Every [`CHECK_EVERY`] the control thread looks at the process's RSS and at the bytes the
//! allocator holds free; it trims when RSS is [`SLACK`] above what the last trim left and the
//! free bytes are [`SLACK`] above their lowest since ([`Policy`]). A trim walks every arena with
//! its lock held, so it runs after a burst, not on every check: while connections are open
//! their memory is in use, not free, and nothing happens.
//!
//! The first check once the agent is ready trims too: start-up (the kernel programs' ELF and
//! BTF parsed, the first config compiled) leaves freed memory behind, 1.7 MB of an idle
//! agent's 17 MB measured here.

use std::time::Duration;

use prometheus_client::{metrics::counter::Counter, registry::Registry};

pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// What the allocator may keep before a trim is worth its arena walk.
pub const SLACK: u64 = 8 << 20;

/// The allocator's view and the system's, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub rss: u64,
    /// Bytes the allocator holds free (resident or not).
    pub free: u64,
}

/// When to trim: RSS has grown by more than [`SLACK`] since the last trim, and the allocator
/// holds more than [`SLACK`] free beyond the least it held since then. (A trim does not change
/// what glibc counts as free, only whether those pages are resident; memory reused and freed
/// again shows as free falling, then rising.)
#[derive(Debug, Default)]
pub struct Policy {
    /// RSS after the last trim; none before the first.
    base_rss: Option<u64>,
    /// The least free since then.
    low_free: u64,
}

impl Policy {
    pub fn should_trim(&mut self, now: Reading) -> bool {
        let Some(base_rss) = self.base_rss else {
            return true;
        };
        self.low_free = self.low_free.min(now.free);
        now.rss > base_rss + SLACK && now.free > self.low_free + SLACK
    }

    /// Records what a trim left.
    pub fn trimmed(&mut self, after: Reading) {
        self.base_rss = Some(after.rss);
        self.low_free = after.free;
    }
}

#[derive(Clone, Default)]
pub struct Metrics {
    trims: Counter,
    released: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("weft_agent_memory");
        r.register(
            "trims",
            "Times the agent asked the allocator to give freed memory back.",
            m.trims.clone(),
        );
        r.register_with_unit(
            "released",
            "Resident memory those trims gave back.",
            prometheus_client::registry::Unit::Bytes,
            m.released.clone(),
        );
        m
    }
}

/// Checks every [`CHECK_EVERY`] once `ready` says the agent has applied its first config, and
/// trims when [`Policy`] says so.
pub async fn run(metrics: Metrics, ready: impl Fn() -> bool) {
    let mut policy = Policy::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !ready() {
            continue;
        }
        let Some(before) = read() else { continue };
        if !policy.should_trim(before) {
            continue;
        }
        trim();
        let Some(after) = read() else { continue };
        let released = before.rss.saturating_sub(after.rss);
        metrics.trims.inc();
        metrics.released.inc_by(released);
        tracing::debug!(
            before = before.rss,
            after = after.rss,
            free = after.free,
            "gave freed memory back"
        );
        policy.trimmed(after);
    }
}

/// This process's resident bytes, from `/proc/self/statm` (its second field, in pages).
pub fn rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64)
}

fn read() -> Option<Reading> {
    Some(Reading {
        rss: rss()?,
        free: allocator_free(),
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(
    unsafe_code,
    reason = "glibc's allocator statistics have no safe binding"
)]
fn allocator_free() -> u64 {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; glibc takes
    // each arena's lock while it reads it.
    let info = unsafe { libc::mallinfo2() };
    info.fordblks as u64
}

/// Gives the system back the free pages of every arena; true if any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim has no safe binding")]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointer, only a number of bytes to keep at each heap's top;
    // glibc takes each arena's lock while it works and leaves live allocations untouched.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Other allocators return memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn allocator_free() -> u64 {
    0
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn trims_after_a_burst_only() {
        let r = |rss_mb: u64, free_mb: u64| Reading {
            rss: rss_mb * MB,
            free: free_mb * MB,
        };
        let mut p = Policy::default();
        assert!(p.should_trim(r(19, 3)), "the first reading trims what start-up left");
        p.trimmed(r(17, 3));
        assert!(!p.should_trim(r(19, 1)), "nothing new since");
        assert!(
            !p.should_trim(r(51, 2)),
            "connections open: their memory is in use, not free"
        );
        assert!(
            p.should_trim(r(51, 33)),
            "they closed: 32 MB free and resident"
        );
        p.trimmed(r(19, 33));
        assert!(!p.should_trim(r(19, 33)), "nothing new since the trim");
        assert!(!p.should_trim(r(30, 33)), "grown, but into memory in use");
        assert!(
            !p.should_trim(r(51, 1)),
            "a second burst reuses what the first freed"
        );
        assert!(p.should_trim(r(51, 33)), "and frees it again");
        p.trimmed(r(19, 33));
        assert!(
            !p.should_trim(r(26, 40)),
            "less than the slack above the base"
        );
    }

    /// The real allocator: memory freed below a live allocation stays resident until a trim.
    #[test]
    fn trim_gives_freed_memory_back() {
        const BLOCKS: usize = 16 * 1024;
        // 4 KiB blocks, as a burst of connections leaves them, on a thread of its own (its own
        // arena, away from the other tests'), with one block kept past the end of them.
        let (before, held) = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![(i % 251) as u8; 4096]).collect();
            let keep = vec![1u8; 4096];
            let before = rss().expect("rss");
            drop(blocks);
            (before, keep)
        })
        .join()
        .expect("allocating thread");
        let freed = rss().expect("rss");
        assert!(
            before.saturating_sub(freed) < 32 * MB,
            "glibc gave the blocks back by itself ({} -> {} MB): this test no longer sees the problem",
            before / MB,
            freed / MB
        );
        assert!(trim(), "malloc_trim released nothing");
        let after = rss().expect("rss");
        assert!(
            freed.saturating_sub(after) >= 32 * MB,
            "trim left RSS at {} MB (from {} MB)",
            after / MB,
            freed / MB
        );
        drop(held);
    }
}
