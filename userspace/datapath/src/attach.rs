//! Per-workload attach: each meshed cgroup gets connect4, getpeername4, sock_ops and the
//! STRICT ingress filter, each as a
//! bpf_link pinned at `links/<cgroup id>/<program>`. Pinned links outlive the agent; a new
//! agent adopts complete sets and rebuilds incomplete ones.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps, links::FdLink};
use weft_common::maps::programs;

use crate::{Datapath, Error, loader::Config, loader::program};

const HOOKS: [&str; 4] = [programs::CONNECT4, programs::GETPEERNAME4, programs::SOCK_OPS, programs::INGRESS];

/// The cgroup v2 id of a cgroup directory: its inode number.
pub(crate) fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    fs::metadata(path).map(|m| m.ino())
}

/// Finds the cgroups a previous run left attached. Incomplete sets (a crash mid-attach) are
/// removed so they get attached again from scratch.
pub(crate) fn adopt(config: &Config) -> Result<BTreeMap<u64, PathBuf>, Error> {
    let mut adopted = BTreeMap::new();
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
        } else {
            remove_links(&path)?;
        }
    }
    Ok(adopted)
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

    /// Detaches our programs from a cgroup (the workload went away or left the mesh).
    pub(crate) fn detach(&mut self, id: u64) -> Result<(), Error> {
        let dir = self.config.links_dir().join(id.to_string());
        if dir.exists() {
            remove_links(&dir)?;
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
