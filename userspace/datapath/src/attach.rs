//! Per-workload attach: each meshed cgroup gets connect4, getpeername4, sock_ops and the
//! STRICT ingress filter, each as a
//! bpf_link pinned at `links/<cgroup id>/<program>`. Pinned links outlive the agent; a new
//! agent adopts complete sets and rebuilds incomplete ones.
//!
//! The workload's network namespace gets `weft_sk_lookup` too, pinned beside them, once one of
//! its processes shows which namespace that is. Never the agent's own namespace or the host's:
//! a workload sharing those (host network) keeps the cgroup filter only.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkLookup, SockOps, links::FdLink};
use serde::Serialize;
use weft_common::maps::programs;

use crate::{Datapath, Error, loader::Config, loader::program};

const HOOKS: [&str; 4] = [programs::CONNECT4, programs::GETPEERNAME4, programs::SOCK_OPS, programs::INGRESS];

/// The cgroup v2 id of a cgroup directory: its inode number.
pub(crate) fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    fs::metadata(path).map(|m| m.ino())
}

/// What a previous run left attached: cgroup id -> path (learned again from the config), and
/// cgroup id -> its workload's `weft_sk_lookup`.
pub(crate) struct Adopted {
    pub cgroups: BTreeMap<u64, PathBuf>,
    pub netns: BTreeMap<u64, Netns>,
}

/// Finds the cgroups a previous run left attached. Incomplete sets (a crash mid-attach) are
/// removed so they get attached again from scratch.
pub(crate) fn adopt(config: &Config) -> Result<Adopted, Error> {
    let mut adopted = BTreeMap::new();
    let mut netns = BTreeMap::new();
    let dir = config.links_dir();
    let entries = fs::read_dir(&dir).map_err(|source| Error::PinDir { path: dir.clone(), source })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if HOOKS.iter().all(|hook| path.join(hook).exists()) {
            // The path is learned again from the config; the id is what matters.
            adopted.insert(id, PathBuf::new());
            if path.join(programs::SK_LOOKUP).exists() {
                netns.insert(id, Netns::Attached { inode: None });
            }
        } else {
            remove_links(&path)?;
        }
    }
    Ok(Adopted { cgroups: adopted, netns })
}

/// Where a workload's `weft_sk_lookup` stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Netns {
    /// Attached to the namespace with this inode (unknown when adopted from a previous run).
    Attached { inode: Option<u64> },
    /// Another workload's attachment covers the same namespace.
    Shared { inode: u64 },
    /// Not attached, for good: host network, or the namespace could not be opened. STRICT
    /// still drops at the cgroup.
    Skipped { reason: String },
}

/// What looking for a workload's network namespace found.
enum Found {
    Netns { inode: u64, file: File },
    /// The cgroup has no process yet: look again later.
    NoProcess,
    Skip(String),
}

/// The namespace of the first process found in the cgroup (or, for a pod, in its containers'
/// cgroups, one and two levels down).
fn find_netns(cgroup: &Path) -> Found {
    let Some(pid) = first_pid(cgroup, 2) else {
        return Found::NoProcess;
    };
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let file = match File::open(&path) {
        Ok(file) => file,
        // The process exited in between: look again later.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::NoProcess,
        Err(e) => {
            return Found::Skip(format!(
                "cannot open {} ({e}); the agent needs the host's PID namespace and CAP_SYS_PTRACE",
                path.display()
            ));
        }
    };
    let inode = match file.metadata() {
        Ok(m) => m.ino(),
        Err(e) => return Found::Skip(format!("cannot stat {}: {e}", path.display())),
    };
    for (own, whose) in [("/proc/self/ns/net", "the agent's"), ("/proc/1/ns/net", "the host's")] {
        if fs::metadata(own).is_ok_and(|m| m.ino() == inode) {
            return Found::Skip(format!("the workload runs in {whose} network namespace"));
        }
    }
    Found::Netns { inode, file }
}

fn first_pid(cgroup: &Path, depth: u32) -> Option<u32> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).find(|&p| p != 0) {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    fs::read_dir(cgroup).ok()?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).find_map(|e| first_pid(&e.path(), depth - 1))
}

fn remove_links(dir: &Path) -> Result<(), Error> {
    // Unlinking a pin drops the last reference to its link, which detaches the program.
    fs::remove_dir_all(dir).map_err(|source| Error::Unpin { path: dir.to_owned(), source })
}

impl Datapath {
    /// Attaches our programs to a cgroup (no-op if already attached).
    pub(crate) fn attach(&mut self, workload: &str, path: &Path) -> Result<u64, Error> {
        let cgroup_err = |source| Error::Cgroup {
            workload: workload.to_owned(),
            path: path.to_owned(),
            source,
        };
        let id = cgroup_id(path).map_err(cgroup_err)?;
        if let Some(known) = self.attached.get_mut(&id) {
            *known = path.to_owned();
            return Ok(id);
        }
        let cgroup = File::open(path).map_err(cgroup_err)?;
        let dir = self.config.links_dir().join(id.to_string());
        fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir.clone(), source })?;
        let result = self.attach_all(&cgroup, path, &dir);
        if result.is_err() {
            // Leave no half-attached cgroup behind.
            let _ = remove_links(&dir);
        }
        result?;
        self.attached.insert(id, path.to_owned());
        tracing::info!(workload, cgroup = %path.display(), id, "attached");
        Ok(id)
    }

    fn attach_all(&mut self, cgroup: &File, path: &Path, dir: &Path) -> Result<(), Error> {
        let attach_err = |program| move |source| Error::Attach { program, path: path.to_owned(), source };
        // The program types share the attach/take_link shape but no trait.
        macro_rules! attach_pinned {
            ($ty:ty, $name:expr $(, $attach_type:expr)?) => {{
                let name: &'static str = $name;
                let prog = program::<$ty>(&mut self.ebpf, name)?;
                let id = prog.attach(cgroup, $($attach_type,)? CgroupAttachMode::Single).map_err(attach_err(name))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(attach_err(name))?
                    .try_into()
                    .map_err(|source| Error::Link { program: name, source })?;
                pin(link, &dir.join(name))?;
            }};
        }
        attach_pinned!(CgroupSockAddr, programs::CONNECT4);
        attach_pinned!(CgroupSockAddr, programs::GETPEERNAME4);
        attach_pinned!(SockOps, programs::SOCK_OPS);
        attach_pinned!(CgroupSkb, programs::INGRESS, CgroupSkbAttachType::Ingress);
        Ok(())
    }

    /// Attaches `weft_sk_lookup` to the namespace of every attached cgroup's workload that has
    /// none yet. Returns how many must be looked at again (no process in the cgroup yet); what
    /// failed goes to `errors` and is tried again too.
    pub fn attach_pending_netns(&mut self, errors: &mut Vec<String>) -> usize {
        let waiting: Vec<(u64, PathBuf)> = self
            .attached
            .iter()
            // An adopted cgroup's path is learned again from the config before it is looked at.
            .filter(|(id, path)| !self.netns.contains_key(id) && !path.as_os_str().is_empty())
            .map(|(id, path)| (*id, path.clone()))
            .collect();
        let mut pending = 0;
        for (id, path) in waiting {
            match self.attach_netns(id, &path) {
                Ok(again) => pending += usize::from(again),
                Err(e) => errors.push(e.to_string()),
            }
        }
        pending
    }

    /// Attaches `weft_sk_lookup` to the namespace of an attached cgroup's workload, once. Returns
    /// whether the cgroup has to be looked at again (no process in it yet).
    fn attach_netns(&mut self, id: u64, path: &Path) -> Result<bool, Error> {
        if self.netns.contains_key(&id) {
            return Ok(false);
        }
        let state = match find_netns(path) {
            Found::NoProcess => return Ok(true),
            Found::Skip(reason) => {
                tracing::warn!(cgroup = %path.display(), %reason, "STRICT refusals stay drops for this workload");
                Netns::Skipped { reason }
            }
            Found::Netns { inode, .. } if self.netns.values().any(|n| *n == Netns::Attached { inode: Some(inode) }) => {
                Netns::Shared { inode }
            }
            Found::Netns { inode, file } => {
                let name = programs::SK_LOOKUP;
                let attach_err = |source| Error::Attach { program: name, path: path.to_owned(), source };
                let prog = program::<SkLookup>(&mut self.ebpf, name)?;
                let link = prog.attach(&file).map_err(attach_err)?;
                let link: FdLink = prog.take_link(link).map_err(attach_err)?.into();
                pin(link, &self.config.links_dir().join(id.to_string()).join(name))?;
                tracing::info!(cgroup = %path.display(), netns = inode, "sk_lookup attached");
                Netns::Attached { inode: Some(inode) }
            }
        };
        self.netns.insert(id, state);
        Ok(false)
    }

    /// Detaches our programs from a cgroup (the workload went away or left the mesh).
    pub(crate) fn detach(&mut self, id: u64) -> Result<(), Error> {
        let dir = self.config.links_dir().join(id.to_string());
        if dir.exists() {
            remove_links(&dir)?;
        }
        if let Some(Netns::Attached { inode: Some(inode) }) = self.netns.remove(&id) {
            // Workloads that shared the namespace attach it themselves next time.
            self.netns.retain(|_, n| *n != Netns::Shared { inode });
        }
        if let Some(path) = self.attached.remove(&id) {
            tracing::info!(cgroup = %path.display(), id, "detached");
        }
        Ok(())
    }
}

fn pin(link: FdLink, path: &Path) -> Result<(), Error> {
    // Dropping the returned PinnedLink only closes our fd; the pin keeps the link attached.
    link.pin(path).map(drop).map_err(|source| Error::Pin { path: path.to_owned(), source })
}
