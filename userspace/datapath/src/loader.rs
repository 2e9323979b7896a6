//! Loading the object, adopting pinned maps, loading programs, probing features.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
    programs::{CgroupSkb, CgroupSockAddr, ProgramError, ProgramType, SkLookup, SkMsg, SockOps},
};
use serde::Serialize;
use weft_common::{
    Addr, BackendKey, BackendValue, FlowKey, FlowStats, NodeConfig, PolicyKey, ServiceKey,
    ServiceValue, TupleKey, WorkloadValue,
    maps::{self as names, programs},
};

use crate::{Error, OBJECT, attach::Netns};

/// Whether the same-node `sk_msg` redirect runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SkMsgMode {
    /// On where the kernel supports it and the config asks for it.
    #[default]
    Auto,
    /// Never loaded.
    Off,
}

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Instance pin directory, e.g. `/sys/fs/bpf/weft/default`.
    pub pin_root: PathBuf,
    pub skmsg: SkMsgMode,
}

impl Config {
    pub fn maps_dir(&self) -> PathBuf {
        self.pin_root.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.pin_root.join("links")
    }
}

/// Typed handles on every map user space writes or reads.
pub(crate) struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, BackendValue>,
    pub workload_ips: HashMap<MapData, Addr, WorkloadValue>,
    pub cgroups: HashMap<MapData, u64, WorkloadValue>,
    pub policy: HashMap<MapData, PolicyKey, u32>,
    pub flows: PerCpuHashMap<MapData, FlowKey, FlowStats>,
    pub counters: PerCpuArray<MapData, u64>,
    pub node: Array<MapData, NodeConfig>,
    pub orig_dst: HashMap<MapData, TupleKey, weft_common::OrigDst>,
}

/// The loaded programs and maps of one agent instance.
pub struct Datapath {
    pub(crate) config: Config,
    pub(crate) ebpf: Ebpf,
    pub(crate) maps: Maps,
    pub(crate) events: Option<RingBuf<MapData>>,
    /// Cgroup id -> path of every cgroup our programs are attached to.
    pub(crate) attached: BTreeMap<u64, PathBuf>,
    /// Cgroup id -> its workload's `weft_sk_lookup`.
    pub(crate) netns: BTreeMap<u64, Netns>,
    pub(crate) skmsg_active: bool,
    /// Program loads the verifier abandoned because a signal came, and that were tried again.
    pub(crate) interrupted_loads: usize,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::MissingMap(name))?;
    T::try_from(map).map_err(Error::map(name))
}

impl Datapath {
    /// Loads the programs, reusing maps pinned by an earlier run of this instance, and adopts
    /// the cgroup links that run left pinned.
    pub fn load(config: Config) -> Result<Self, Error> {
        if !is_bpffs(Path::new("/sys/fs/bpf")) {
            return Err(Error::NoBpffs);
        }
        for dir in [config.maps_dir(), config.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| Error::PinDir { path: dir.clone(), source })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(config.maps_dir())
            .load(OBJECT)
            .map_err(Error::Load)?;

        // The verifier gives up when a signal arrives for this thread; each load is tried again.
        let mut interrupted = 0;
        for name in [programs::CONNECT4, programs::GETPEERNAME4] {
            let prog = program::<CgroupSockAddr>(&mut ebpf, name)?;
            interrupted += load_program(name, || prog.load())?;
        }
        let prog = program::<SockOps>(&mut ebpf, programs::SOCK_OPS)?;
        interrupted += load_program(programs::SOCK_OPS, || prog.load())?;
        let prog = program::<CgroupSkb>(&mut ebpf, programs::INGRESS)?;
        interrupted += load_program(programs::INGRESS, || prog.load())?;
        let prog = program::<SkLookup>(&mut ebpf, programs::SK_LOOKUP)?;
        interrupted += load_program(programs::SK_LOOKUP, || prog.load())?;

        let skmsg_active = config.skmsg == SkMsgMode::Auto && skmsg_supported();
        if skmsg_active {
            let sockhash: SockHash<MapData, TupleKey> = take(&mut ebpf, names::SOCKHASH)?;
            let prog = program::<SkMsg>(&mut ebpf, programs::SK_MSG)?;
            interrupted += load_program(programs::SK_MSG, || prog.load())?;
            let link = prog
                .attach(sockhash.fd())
                .map_err(|source| Error::Program { name: programs::SK_MSG, source })?;
            // The attachment lives with the (pinned) sockhash. Dropping the link would detach
            // it when the agent exits, breaking the fast path for new connections while the
            // agent is away, so it is deliberately leaked; a restart replaces the program.
            let link = prog
                .take_link(link)
                .map_err(|source| Error::Program { name: programs::SK_MSG, source })?;
            std::mem::forget(link);
        }

        let maps = Maps {
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            workload_ips: take(&mut ebpf, names::WORKLOAD_IPS)?,
            cgroups: take(&mut ebpf, names::CGROUPS)?,
            policy: take(&mut ebpf, names::POLICY)?,
            flows: take(&mut ebpf, names::FLOWS)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            node: take(&mut ebpf, names::NODE_CONFIG)?,
            orig_dst: take(&mut ebpf, names::ORIG_DST)?,
        };
        let events = Some(take(&mut ebpf, names::EVENTS)?);
        let crate::attach::Adopted { cgroups: attached, netns } = crate::attach::adopt(&config)?;
        tracing::info!(
            pin_root = %config.pin_root.display(),
            adopted_cgroups = attached.len(),
            skmsg = skmsg_active,
            interrupted_loads = interrupted,
            "datapath loaded"
        );
        Ok(Datapath { config, ebpf, maps, events, attached, netns, skmsg_active, interrupted_loads: interrupted })
    }

    /// The ring buffer of closed-connection records; taken once by the event reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn skmsg_active(&self) -> bool {
        self.skmsg_active
    }

    /// Program loads tried again because a signal interrupted the verifier.
    pub fn interrupted_loads(&self) -> usize {
        self.interrupted_loads
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cgroups our programs are attached to (id -> path).
    pub fn attached(&self) -> &BTreeMap<u64, PathBuf> {
        &self.attached
    }

    /// Cgroup id -> where its workload's `weft_sk_lookup` stands.
    pub fn netns(&self) -> &BTreeMap<u64, Netns> {
        &self.netns
    }

    /// Detaches everything and removes the instance's pins: maps and links go away with the
    /// last reference. Connections already open keep working as plain TCP.
    pub fn remove_pins(pin_root: &Path) -> Result<(), Error> {
        match fs::remove_dir_all(pin_root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Unpin { path: pin_root.to_owned(), source }),
        }
    }
}

/// How long one program's load is tried again while signals interrupt the verifier. It
/// answers EAGAIN when a signal arrives for the loading thread (Linux 4.20 on), and the load
/// is to be tried again, as libbpf and cilium/ebpf do. Bounded in time rather than in tries: a
/// burst of signals can cut many tries short in a few milliseconds.
const LOAD_RETRY_FOR: Duration = Duration::from_secs(10);

/// Runs `load` until the verifier finishes without a signal interrupting it, for at most
/// `LOAD_RETRY_FOR`; returns how many attempts were interrupted.
fn load_program(name: &'static str, load: impl FnMut() -> Result<(), ProgramError>) -> Result<usize, Error> {
    let interrupted = |e: &ProgramError| {
        matches!(e, ProgramError::LoadError { io_error, .. } if io_error.kind() == io::ErrorKind::WouldBlock)
    };
    retry_interrupted(LOAD_RETRY_FOR, interrupted, load).map_err(|e| match e {
        Retried::Failed(source) => Error::Program { name, source },
        Retried::Interrupted(attempts) => Error::Interrupted { name, attempts, secs: LOAD_RETRY_FOR.as_secs() },
    })
}

enum Retried<E> {
    Failed(E),
    /// Still interrupted when the time was up, after this many attempts.
    Interrupted(usize),
}

fn retry_interrupted<E>(
    retry_for: Duration,
    interrupted: impl Fn(&E) -> bool,
    mut run: impl FnMut() -> Result<(), E>,
) -> Result<usize, Retried<E>> {
    let deadline = Instant::now() + retry_for;
    let mut tried = 0;
    loop {
        match run() {
            Ok(()) => return Ok(tried),
            Err(e) if interrupted(&e) => {
                tried += 1;
                if Instant::now() >= deadline {
                    return Err(Retried::Interrupted(tried));
                }
            }
            Err(e) => return Err(Retried::Failed(e)),
        }
    }
}

pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    prog.try_into().map_err(|source| Error::Program { name, source })
}

/// sk_msg programs and sockhash maps both have to be there (the feature probe of the design).
fn skmsg_supported() -> bool {
    let prog = aya::sys::is_program_supported(ProgramType::SkMsg).unwrap_or(false);
    let map = aya::sys::is_map_supported(aya::maps::MapType::SockHash).unwrap_or(false);
    if !(prog && map) {
        tracing::warn!(prog, map, "kernel lacks sk_msg/sockhash; same-node redirect stays off");
    }
    prog && map
}

fn is_bpffs(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .map(|mounts| {
            mounts.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, at, fstype) = (f.next(), f.next(), f.next());
                at == path.to_str() && fstype == Some("bpf")
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interrupted(e: &io::ErrorKind) -> bool {
        *e == io::ErrorKind::WouldBlock
    }

    /// Fails with each of `errors` in turn, then succeeds; counts its calls.
    fn failing(errors: Vec<io::ErrorKind>, calls: &mut usize) -> impl FnMut() -> Result<(), io::ErrorKind> + '_ {
        let mut errors = errors.into_iter();
        move || {
            *calls += 1;
            errors.next().map_or(Ok(()), Err)
        }
    }

    #[test]
    fn an_interrupted_load_is_tried_again_until_it_finishes() {
        let mut calls = 0;
        let run = failing(vec![io::ErrorKind::WouldBlock; 3], &mut calls);
        assert!(matches!(retry_interrupted(Duration::from_secs(10), interrupted, run), Ok(3)));
        assert_eq!(calls, 4);
    }

    #[test]
    fn a_rejection_is_not_tried_again() {
        let mut calls = 0;
        let run = failing(vec![io::ErrorKind::WouldBlock, io::ErrorKind::InvalidInput], &mut calls);
        let result = retry_interrupted(Duration::from_secs(10), interrupted, run);
        assert!(matches!(result, Err(Retried::Failed(io::ErrorKind::InvalidInput))));
        assert_eq!(calls, 2);
    }

    #[test]
    fn interruptions_end_when_the_time_is_up() {
        let mut calls = 0;
        let run = failing(vec![io::ErrorKind::WouldBlock; 100], &mut calls);
        assert!(matches!(retry_interrupted(Duration::ZERO, interrupted, run), Err(Retried::Interrupted(1))));
        assert_eq!(calls, 1);
    }
}
