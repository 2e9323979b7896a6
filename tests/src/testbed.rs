//! Nodes and pods as network namespaces and cgroups. See the crate docs for the layout.

use std::ffi::OsStr;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::proc::{Proc, wait_for_tcp};
use crate::sys::{self, BPFFS, DIR_PREFIX, NETNS_DIR, ip};

/// Distinguishes testbeds created by one process.
static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

/// A set of nodes and pods that exist until this value is dropped.
pub struct Testbed {
    shared: Arc<Shared>,
}

/// What nodes need from their testbed; shared so `Node` can outlive a borrow of `Testbed`.
struct Shared {
    id: String,
    cgroup_root: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every namespace created, in creation order, so teardown can go in reverse.
    netns: Vec<String>,
    nodes: u8,
    links: u8,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked elsewhere must not stop teardown of the rest.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a netns and records it first, so teardown removes it even if setup fails later.
    fn add_netns(&self, name: &str) {
        ip(&["netns", "add", name]);
        self.state().netns.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }
}

// === impl Testbed ===

impl Testbed {
    /// Checks prerequisites (panicking with the reason), sweeps leftovers of crashed runs and creates
    /// this testbed's parent cgroup.
    pub fn new() -> Testbed {
        assert!(
            nix::unistd::geteuid().is_root(),
            "weft-testbed needs root (euid 0) for network namespaces, cgroups and bpffs; \
             run the tests with sudo or as root"
        );
        sys::require_binary("ip", "-V", "iproute2");
        sys::require_binary("nsenter", "--version", "util-linux (nsenter)");
        let cgroup2 = sys::cgroup2_mount();
        sys::ensure_bpffs();
        sys::sweep_stale(&cgroup2);
        sys::clean_up_on_signal();

        // The pid comes first so a sweep can tell whether the creator still runs; the salt keeps a
        // recycled pid from colliding with leftovers of the earlier process that had it.
        static SALT: OnceLock<u32> = OnceLock::new();
        let salt = *SALT.get_or_init(|| {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            (nanos ^ std::process::id()) & 0xffff
        });
        let n = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
        let id = format!("wt{}x{salt:04x}{n}", std::process::id());

        let cgroup_root = cgroup2.join(format!("{DIR_PREFIX}{id}"));
        fs::create_dir(&cgroup_root).unwrap_or_else(|e| {
            panic!(
                "mkdir {} failed: {e}; is cgroup2 mounted read-write?",
                cgroup_root.display()
            )
        });
        Testbed {
            shared: Arc::new(Shared {
                id,
                cgroup_root,
                state: Mutex::default(),
            }),
        }
    }

    /// Unique id; every resource name of this testbed starts with it.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// This testbed's parent cgroup, `<cgroup2 mount>/weft-test-<id>`; pod cgroups live below it.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// `/sys/fs/bpf/weft-test-<id>`: where tests should pin. Not created here; removed on Drop.
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(format!("{DIR_PREFIX}{}", self.shared.id))
    }

    /// Adds node number `i` (1, 2, ...): netns `<id>-<name>` with bridge `br0` at 10.244.i.1/24 and
    /// IPv4 forwarding on, so its pods reach other nodes through it.
    pub fn add_node(&self, name: &str) -> Node {
        check_name(name);
        let index = {
            let mut st = self.shared.state();
            assert!(st.nodes < 250, "a testbed supports at most 250 nodes");
            st.nodes += 1;
            st.nodes
        };
        let netns = format!("{}-{name}", self.shared.id);
        self.shared.add_netns(&netns);
        let cidr = format!("10.244.{index}.1/24");
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &netns, "addr", "add", &cidr, "dev", "br0"]);
        ip(&["-n", &netns, "link", "set", "br0", "up"]);
        let node = Node {
            inner: Arc::new(NodeInner {
                bed: Arc::clone(&self.shared),
                name: name.to_owned(),
                netns,
                index,
                pods: AtomicU8::new(0),
                underlay: OnceLock::new(),
            }),
        };
        // /proc/sys/net is per network namespace of the opening thread.
        node.run(|| {
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .unwrap_or_else(|e| panic!("enabling ip_forward in a node netns failed: {e}"));
        });
        node
    }

    /// Joins two nodes with a veth (link `x` gets 172.30.x.<node index>/24 on each end) and routes
    /// each node's pod subnet through the other end.
    pub fn connect_nodes(&self, a: &Node, b: &Node) {
        assert!(
            Arc::ptr_eq(&a.inner.bed, &self.shared) && Arc::ptr_eq(&b.inner.bed, &self.shared),
            "connect_nodes: both nodes must belong to this testbed"
        );
        assert_ne!(
            a.index(),
            b.index(),
            "connect_nodes: cannot connect a node to itself"
        );
        let x = {
            let mut st = self.shared.state();
            assert!(st.links < 255, "a testbed supports at most 255 node links");
            st.links += 1;
            st.links
        };
        // Created straight inside the node namespaces, so the same short name cannot clash with
        // anything and nothing ever appears in the root namespace.
        let dev = format!("ul{x}");
        ip(&[
            "-n",
            a.netns(),
            "link",
            "add",
            &dev,
            "type",
            "veth",
            "peer",
            "name",
            &dev,
            "netns",
            b.netns(),
        ]);
        let addr = |n: &Node| Ipv4Addr::new(172, 30, x, n.index());
        for (this, peer) in [(a, b), (b, a)] {
            let ns = this.netns();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", addr(this)),
                "dev",
                &dev,
            ]);
            ip(&["-n", ns, "link", "set", &dev, "up"]);
            let subnet = format!("10.244.{}.0/24", peer.index());
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &subnet,
                "via",
                &addr(peer).to_string(),
            ]);
            // Only the first link counts as the node's underlay address.
            let _ = this.inner.underlay.set(addr(this));
        }
    }

    /// The weft-probe binary: `$WEFT_PROBE`, else next to the running executable or one directory
    /// up (tests run from target/<profile>/deps, the binary sits in target/<profile>).
    pub fn probe_path() -> PathBuf {
        const HINT: &str = "build it with `cargo build -p weft-testbed --bin weft-probe`";
        if let Some(path) = std::env::var_os("WEFT_PROBE") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "WEFT_PROBE={} does not exist; {HINT}",
                path.display()
            );
            return path;
        }
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe failed: {e}"));
        let dir = exe.parent().unwrap_or(Path::new("."));
        [dir.join("weft-probe"), dir.join("../weft-probe")]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "weft-probe not found next to {} or in its parent; {HINT}",
                    exe.display()
                )
            })
    }
}

impl Default for Testbed {
    fn default() -> Self {
        Testbed::new()
    }
}

impl Drop for Testbed {
    /// Reverse order of creation: processes and cgroups, then namespaces with any process still
    /// in them (deleting a namespace deletes its veths), then bpffs pins and the files agents
    /// share (their CA). Logs instead of panicking, since it may run during a panic unwind.
    fn drop(&mut self) {
        sys::cgroup_remove_tree(&self.shared.cgroup_root);
        let netns = std::mem::take(&mut self.shared.state().netns);
        for ns in netns.iter().rev() {
            sys::delete_netns(ns);
        }
        let shared_files = Path::new("/tmp").join(format!("weft-test-{}-ca", self.shared.id));
        for dir in [self.bpffs_dir(), shared_files] {
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(&dir)
            {
                sys::log(format_args!("removing {} failed: {e}", dir.display()));
            }
        }
    }
}

/// Names end up in netns names, cgroup paths and a shell script; keep them boring.
fn check_name(name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "invalid name {name:?}: use 1-32 characters of [a-z0-9-]"
    );
}

/// `nsenter --net=/run/netns/<netns> -- program`: runs a program in a netns without `ip netns exec`,
/// which would remount /sys and hide cgroupfs and bpffs from the program.
fn nsenter(netns: &str, program: &OsStr) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{netns}"))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `f` on a fresh thread inside `netns`; the thread ends with `f`, so the namespace change
/// cannot leak to other code. Panics in `f` propagate with their original message.
fn run_in<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|s| {
        let handle = s.spawn(|| {
            sys::enter_netns(netns);
            f()
        });
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Polls in `netns` until `ip:port` or 127.0.0.1:port accepts; which one works depends on the
/// address the server bound.
fn wait_listening_in(netns: &str, ip: Ipv4Addr, port: u16, timeout: Duration) {
    let addrs = [
        SocketAddr::new(IpAddr::V4(ip), port),
        SocketAddr::from(([127, 0, 0, 1], port)),
    ];
    let ok = run_in(netns, || wait_for_tcp(&addrs, timeout));
    assert!(
        ok,
        "nothing accepted on port {port} in netns {netns} within {timeout:?}; did the server start (check its stderr)?"
    );
}

// === impl Node ===

/// A node: a network namespace with a bridge its pods hang off. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    bed: Arc<Shared>,
    name: String,
    netns: String,
    index: u8,
    pods: AtomicU8,
    underlay: OnceLock<Ipv4Addr>,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn netns(&self) -> &str {
        &self.inner.netns
    }

    /// The bridge address, 10.244.<index>.1: the pods' default gateway.
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.inner.index, 1)
    }

    /// 1-based position in the order nodes were added; the third octet of the pod subnet.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// This node's address on its first link made by [`Testbed::connect_nodes`].
    pub fn underlay_ip(&self) -> Ipv4Addr {
        *self.inner.underlay.get().unwrap_or_else(|| {
            panic!(
                "node {} has no underlay link; call Testbed::connect_nodes first",
                self.name()
            )
        })
    }

    /// Adds pod number `k` (0, 1, ...): netns `<id>-<node>-<pod>` whose eth0 (10.244.i.(10+k)/24,
    /// default route via the bridge) is a veth into the node's br0, and cgroup
    /// `<cgroup_root>/<node>-<pod>`.
    pub fn add_pod(&self, name: &str) -> Pod {
        self.add_pod_in(name, Path::new(&format!("{}-{name}", self.name())))
    }

    /// Like [`Node::add_pod`], with the cgroup at `<cgroup_root>/<cgroup>` (a relative path;
    /// missing levels are created), e.g. where the kubelet would put it.
    pub fn add_pod_in(&self, name: &str, cgroup: &Path) -> Pod {
        check_name(name);
        assert!(cgroup.is_relative(), "a pod's cgroup is relative to the testbed's: {}", cgroup.display());
        let k = self.inner.pods.fetch_add(1, Ordering::Relaxed);
        assert!(k <= 244, "node {} supports at most 245 pods", self.name());
        let bed = &self.inner.bed;
        let node_ns = self.netns();
        let netns = format!("{}-{}-{name}", bed.id, self.name());
        bed.add_netns(&netns);

        // Interface names are limited to 15 bytes; the `v<k>-` prefix alone keeps them unique
        // within this node's namespace, the pod name is only there to help whoever debugs.
        let mut host_if = format!("v{k}-{name}");
        host_if.truncate(15);
        let ip_addr = Ipv4Addr::new(10, 244, self.index(), 10 + k);
        ip(&[
            "-n", node_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ]);
        ip(&[
            "-n", node_ns, "link", "set", &host_if, "master", "br0", "up",
        ]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.ip().to_string(),
        ]);

        let cgroup = bed.cgroup_root.join(cgroup);
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("mkdir {} failed: {e}", cgroup.display()));
        // Inode number of the cgroup directory == the id bpf_get_current_cgroup_id() returns.
        let cgroup_id = fs::metadata(&cgroup)
            .unwrap_or_else(|e| panic!("stat {} failed: {e}", cgroup.display()))
            .ino();
        Pod {
            name: name.to_owned(),
            netns,
            ip: ip_addr,
            cgroup,
            cgroup_id,
        }
    }

    /// A command that runs `program` in this node's netns (cgroup unchanged). Add arguments with
    /// `.arg()`/`.args()`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        nsenter(self.netns(), program.as_ref())
    }

    /// Spawns `cmd` (usually from [`Node::command`]) as a guard that kills it on drop.
    pub fn spawn(&self, cmd: Command) -> Proc {
        Proc::spawn(cmd)
    }

    /// Runs `f` on a thread inside this node's netns and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(self.netns(), f)
    }

    /// Waits until a TCP server in this node's netns accepts on `port` (on the bridge address or
    /// 127.0.0.1); panics after `timeout`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) {
        wait_listening_in(self.netns(), self.ip(), port, timeout);
    }
}

// === impl Pod ===

/// A pod: its own netns and cgroup, attached to a node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    cgroup: PathBuf,
    cgroup_id: u64,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn cgroup_path(&self) -> &Path {
        &self.cgroup
    }

    /// The cgroup v2 id, as seen by BPF programs (`bpf_get_current_cgroup_id`).
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// A command that runs `program` inside this pod's cgroup and netns. Add arguments with
    /// `.arg()`/`.args()`; they reach `program` unchanged.
    ///
    /// The shell joins the cgroup before anything else runs, so every process of the pod is
    /// attributed to it (cgroup hooks see its first connect), then `exec`s nsenter, which `exec`s
    /// the program: the spawned pid is the program's own.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        // Names are checked to [a-z0-9-], so these paths need no quoting beyond single quotes.
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec nsenter '--net={NETNS_DIR}/{}' -- \"$0\" \"$@\"",
            self.cgroup.display(),
            self.netns
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg(program.as_ref());
        cmd
    }

    /// Spawns `cmd` (usually from [`Pod::command`]) as a guard that kills it on drop.
    pub fn spawn(&self, cmd: Command) -> Proc {
        Proc::spawn(cmd)
    }

    /// Runs `f` on a thread inside this pod's netns (not its cgroup: a thread cannot join a cgroup
    /// on its own in cgroup v2 unless threaded mode is set up).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&self.netns, f)
    }

    /// Waits until a TCP server in this pod accepts on `port` (on the pod address or 127.0.0.1);
    /// panics after `timeout`.
    pub fn wait_listening(&self, port: u16, timeout: Duration) {
        wait_listening_in(&self.netns, self.ip, port, timeout);
    }
}
