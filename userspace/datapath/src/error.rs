use std::{io, path::PathBuf};

/// What went wrong in the datapath, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bpffs is not mounted at /sys/fs/bpf; mount it with `mount -t bpf bpffs /sys/fs/bpf` (make setup does)")]
    NoBpffs,
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading weft's kernel object failed (are you root on a kernel with BTF?): {0}")]
    Load(#[source] aya::EbpfError),
    #[error("kernel object has no program {0}; rebuild with `cargo xtask build-ebpf`")]
    MissingProgram(&'static str),
    #[error("kernel object has no map {0}; rebuild with `cargo xtask build-ebpf`")]
    MissingMap(&'static str),
    #[error("program {name} was rejected by the kernel: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "program {name}: signals interrupted the kernel's verifier in each of {attempts} attempts over {secs} s \
         (EAGAIN); stop whatever keeps signalling the agent while it starts"
    )]
    Interrupted { name: &'static str, attempts: usize, secs: u64 },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot open cgroup {path} of workload {workload}: {source}; does the directory exist under the cgroup v2 mount?")]
    Cgroup {
        workload: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("attaching {program} to cgroup {path}: {source}")]
    Attach {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link of {program} is not a bpf_link (kernel older than 5.7?): {source}")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("removing pins under {path}: {source}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
        move |source| Error::Map { name, source }
    }
}
