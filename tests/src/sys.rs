//! Small wrappers around the tools and kernel interfaces the testbed drives: `ip`, cgroupfs, bpffs,
//! setns and the sweep of resources left behind by crashed runs.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs};
use nix::unistd::Pid;

/// Where `ip netns add` creates its namespace files.
pub(crate) const NETNS_DIR: &str = "/run/netns";
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// Prefix of every cgroup and bpffs directory a testbed creates.
pub(crate) const DIR_PREFIX: &str = "weft-test-";

const ROOT_HINT: &str = "are you root with iproute2 installed?";

/// Runs `ip <args>` and panics with the command line, its stderr and a hint if it fails.
pub(crate) fn ip(args: &[&str]) {
    let line = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{line} could not start: {e}; {ROOT_HINT}"));
    if !out.status.success() {
        panic!(
            "{line} failed ({}): {}; {ROOT_HINT}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// Like [`ip`] but for teardown paths that must not panic: failures are logged to stderr.
pub(crate) fn ip_logged(args: &[&str]) {
    match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => log(format_args!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => log(format_args!("ip {} could not start: {e}", args.join(" "))),
    }
}

pub(crate) fn log(msg: std::fmt::Arguments<'_>) {
    eprintln!("weft-testbed: {msg}");
}

/// Panics unless `program --version` (or `-V`) runs, i.e. the binary is installed.
pub(crate) fn require_binary(program: &str, version_flag: &str, package: &str) {
    let ok = Command::new(program)
        .arg(version_flag)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{program} {version_flag}` did not run; install {package}"
    );
}

fn fs_type(path: &str) -> Option<FsType> {
    statfs(path).ok().map(|s| s.filesystem_type())
}

/// The cgroup2 mount point. Hybrid hosts (v1 controllers plus a v2 tree) mount v2 at `unified`.
pub(crate) fn cgroup2_mount() -> PathBuf {
    cgroup2().unwrap_or_else(|| {
        panic!(
            "no cgroup2 mount at /sys/fs/cgroup/unified or /sys/fs/cgroup; \
             mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
        )
    })
}

fn cgroup2() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| fs_type(p) == Some(CGROUP2_SUPER_MAGIC))
        .map(PathBuf::from)
}

/// Makes sure bpffs is mounted at /sys/fs/bpf, because later tests pin maps and links there.
pub(crate) fn ensure_bpffs() {
    if fs_type(BPFFS) == Some(BPF_FS_MAGIC) {
        return;
    }
    nix::mount::mount(
        Some("bpffs"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| {
        panic!("/sys/fs/bpf is not bpffs and `mount -t bpf bpffs /sys/fs/bpf` failed: {e}")
    });
}

/// Moves the calling thread into the network namespace `netns` (a name under /run/netns).
/// Only call this on a thread that exits afterwards: the namespace sticks to the thread.
pub(crate) fn enter_netns(netns: &str) {
    let path = format!("{NETNS_DIR}/{netns}");
    let file = File::open(&path)
        .unwrap_or_else(|e| panic!("open {path} failed: {e}; was the testbed dropped already?"));
    setns(&file, CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns into {path} failed: {e}; are you root?"));
}

// === cgroups ===

/// Kills every process in the cgroup subtree at `dir`, waits until it is empty and removes every
/// directory in it, deepest first. Returns false (after logging why) if something is left.
pub(crate) fn cgroup_remove_tree(dir: &Path) -> bool {
    if !dir.exists() {
        return true;
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, so forks cannot escape.
    let kill_file = dir.join("cgroup.kill");
    if !(kill_file.exists() && fs::write(&kill_file, "1").is_ok()) {
        for d in subtree(dir) {
            for pid in cgroup_pids(&d) {
                // Already gone is fine; anything else shows up as a non-empty cgroup below.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    // Killing is asynchronous; rmdir fails with EBUSY until the last task has exited.
    let deadline = Instant::now() + Duration::from_secs(5);
    while subtree(dir).iter().any(|d| !cgroup_pids(d).is_empty()) {
        if Instant::now() > deadline {
            log(format_args!(
                "processes in {} survived SIGKILL for 5s",
                dir.display()
            ));
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut ok = true;
    for d in subtree(dir).iter().rev() {
        if let Err(e) = fs::remove_dir(d) {
            log(format_args!("rmdir {} failed: {e}", d.display()));
            ok = false;
        }
    }
    ok
}

/// `dir` and every cgroup below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    out
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

// === stale resources ===

/// The pid embedded in a testbed id (`wt<pid>x...`), from any name that starts with one.
pub(crate) fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("wt")?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    if !rest[digits..].starts_with('x') {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Removes what earlier runs that crashed (or were killed before Drop ran) left behind: netns,
/// cgroups and bpffs directories whose creating pid no longer exists. Runs once per process;
/// resources of live processes, including other tests running right now, are left alone.
pub(crate) fn sweep_stale(cgroup2: &Path) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| sweep(cgroup2));
}

fn sweep(cgroup2: &Path) {
    let dead = |pid: i32| !Path::new(&format!("/proc/{pid}")).exists();
    remove_runs(Some(cgroup2), "stale", dead);
}

/// Removes the netns (with what runs in them), cgroups and bpffs directories of every run
/// whose pid `owner` accepts; `what` says whose they are in the log.
fn remove_runs(cgroup2: Option<&Path>, what: &str, owner: impl Fn(i32) -> bool) {
    let owned = |name: &str| owner_pid(name).is_some_and(&owner);
    for name in dir_names(Path::new(NETNS_DIR)) {
        if owned(&name) {
            log(format_args!("removing {what} netns {name}"));
            delete_netns(&name);
        }
    }
    if let Some(cgroup2) = cgroup2 {
        for name in dir_names(cgroup2) {
            if name.strip_prefix(DIR_PREFIX).is_some_and(owned) {
                log(format_args!("removing {what} cgroup {name}"));
                cgroup_remove_tree(&cgroup2.join(&name));
            }
        }
    }
    for name in dir_names(Path::new(BPFFS)) {
        if name.strip_prefix(DIR_PREFIX).is_some_and(owned) {
            log(format_args!("removing {what} bpffs pins {name}"));
            if let Err(e) = fs::remove_dir_all(Path::new(BPFFS).join(&name)) {
                log(format_args!("removing {BPFFS}/{name} failed: {e}"));
            }
        }
    }
}

/// For a process that makes testbeds: on SIGINT, SIGTERM or SIGHUP, SIGKILLs this process's
/// descendants, removes every testbed it made (as their Drop would) and exits with 128 + the
/// signal's number. A signal otherwise ends the process before any Drop runs: its namespaces
/// and cgroups would wait for the next run's sweep, and what runs outside them (a benchmark's
/// load, a proxy in the node's netns) would go on running until then.
/// [`Testbed::new`](crate::Testbed::new) calls it; xtask's demo and benches call it first
/// thing, so a bench without a testbed stops its processes too.
/// Returns once the signals are caught; later calls do nothing.
pub fn clean_up_on_signal() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let (caught, ready) = std::sync::mpsc::channel();
        let spawned = thread::Builder::new()
            .name("testbed-signals".into())
            .spawn(move || {
                let Some((name, number)) = wait_for_signal(caught) else {
                    return;
                };
                log(format_args!(
                    "{name}: killing this run's processes and removing its testbeds"
                ));
                kill_descendants();
                remove_runs(cgroup2().as_deref(), "this run's", |pid| {
                    pid.unsigned_abs() == std::process::id()
                });
                std::process::exit(128 + number);
            });
        match spawned {
            // The thread reports once it listens (or gave up, having logged why).
            Ok(_) => drop(ready.recv()),
            Err(e) => log(format_args!(
                "no thread to catch signals ({e}); a signal leaves testbeds to the next sweep"
            )),
        }
    });
}

/// Listens for SIGINT, SIGTERM and SIGHUP, says so on `listening`, and returns the first that
/// comes (its name and number); `None`, having logged why, if it cannot listen.
fn wait_for_signal(listening: std::sync::mpsc::Sender<()>) -> Option<(&'static str, i32)> {
    use tokio::signal::unix::{SignalKind, signal};
    let unheard = |e: std::io::Error| {
        log(format_args!(
            "cannot catch signals ({e}); a signal leaves testbeds to the next sweep"
        ));
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(unheard)
        .ok()?;
    rt.block_on(async {
        let listen = || -> std::io::Result<_> {
            Ok((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ))
        };
        let listened = listen().map_err(unheard);
        let _ = listening.send(());
        let (mut int, mut term, mut hup) = listened.ok()?;
        Some(tokio::select! {
            _ = int.recv() => ("SIGINT", libc::SIGINT),
            _ = term.recv() => ("SIGTERM", libc::SIGTERM),
            _ = hup.recv() => ("SIGHUP", libc::SIGHUP),
        })
    })
}

/// SIGKILLs every process descended from this one (found through each process's parent in
/// /proc/<pid>/stat).
fn kill_descendants() {
    let parents: Vec<(i32, i32)> = dir_names(Path::new("/proc"))
        .iter()
        .filter_map(|pid| Some((pid.parse().ok()?, parent_pid(pid)?)))
        .collect();
    let mut family = vec![i32::try_from(std::process::id()).unwrap_or(i32::MAX)];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            parents
                .iter()
                .filter(|&&(_, p)| p == parent)
                .map(|&(pid, _)| pid),
        );
        i += 1;
    }
    for &pid in &family[1..] {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The parent of `pid` (a /proc entry's name): the second field after the command's closing
/// parenthesis in its stat file (the command itself may hold spaces and parentheses).
fn parent_pid(pid: &str) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Deletes the network namespace `netns` (a name under /run/netns) and kills what still runs
/// in it first: deleting only the name would leave those processes running in a namespace
/// nothing can reach. Pod processes go with their cgroups; this catches node processes (an
/// agent, a benchmarked proxy) of a run that ended without killing them.
pub(crate) fn delete_netns(netns: &str) {
    kill_netns_processes(netns);
    ip_logged(&["netns", "del", netns]);
}

/// SIGKILLs every process whose network namespace is `netns`, and waits up to 5 s for them to
/// exit (logging any that do not).
fn kill_netns_processes(netns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = netns_processes(netns);
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            log(format_args!(
                "processes {pids:?} in netns {netns} survived SIGKILL for 5s"
            ));
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The processes, other than this one, whose network namespace is `netns` (none if it does
/// not exist). An exited process no longer has a namespace (its link fails to resolve), so
/// zombies waiting for their parent to reap them do not count.
fn netns_processes(netns: &str) -> Vec<i32> {
    let Ok(ns) = fs::metadata(Path::new(NETNS_DIR).join(netns)) else {
        return Vec::new();
    };
    let me = std::process::id().to_string();
    dir_names(Path::new("/proc"))
        .into_iter()
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()) && *name != me)
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| (m.dev(), m.ino()) == (ns.dev(), ns.ino()))
        })
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

fn dir_names(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_testbed_names() {
        assert_eq!(owner_pid("wt4242x0a1b3-n1-a"), Some(4242));
        assert_eq!(owner_pid("wt4242x0a1b3"), Some(4242));
        assert_eq!(owner_pid("wtx1"), None);
        assert_eq!(owner_pid("wt12-n1"), None);
        assert_eq!(owner_pid("cni-1234"), None);
    }

    /// What a run killed before its testbed's Drop leaves: a netns named for a pid that no
    /// longer exists, a process still in it. The sweep kills the process and deletes the netns.
    #[test]
    fn sweep_kills_what_runs_in_a_dead_runs_netns() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root (netns)");
        let dead = Command::new("true").spawn().expect("spawn true");
        let pid = dead.id();
        let _ = dead.wait_with_output();
        let netns = format!("wt{pid}x0000sweep");
        ip(&["netns", "add", &netns]);
        let mut sleeper = Command::new("nsenter")
            .arg(format!("--net={NETNS_DIR}/{netns}"))
            .args(["--", "sleep", "600"])
            .spawn()
            .expect("spawn nsenter sleep");
        // nsenter enters the namespace before it execs sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        let sleeper_pid = i32::try_from(sleeper.id()).expect("pid");
        while !netns_processes(&netns).contains(&sleeper_pid) {
            assert!(Instant::now() < deadline, "sleep never entered {netns}");
            thread::sleep(Duration::from_millis(10));
        }

        sweep(&cgroup2_mount());
        let gone = sleeper.try_wait().expect("try_wait");
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(
            gone.is_some(),
            "a process in the dead run's netns survived the sweep"
        );
        assert!(
            !Path::new(NETNS_DIR).join(&netns).exists(),
            "the dead run's netns {netns} survived the sweep"
        );
    }
}
