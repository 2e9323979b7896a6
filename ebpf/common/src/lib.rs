//! Types shared by weft's kernel programs (`weft-ebpf`) and user space (`weft-datapath`).
//!
//! Rules: `#[repr(C)]`, explicit padding, no `bool`/`Option`/`usize`, one size assertion per
//! type, and map names as constants so both sides agree.
//!
//! Byte order: addresses are kept as the kernel hands them over (network order, read as native
//! `u32` words); IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`) so IPv6 can follow
//! without reshaping any map. Ports are always host order in maps; each hook converts at its edge.
#![no_std]
#![deny(unsafe_code)]

pub mod maps;

/// An address as four network-order words. IPv4 is `[0, 0, 0xffff (network order), ip]`.
pub type Addr = [u32; 4];

/// The IPv4-mapped form of a network-order IPv4 word.
#[inline(always)]
pub const fn v4_mapped(ip_be: u32) -> Addr {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip_be]
}

/// The IPv4 word of an IPv4-mapped address, if it is one.
#[inline(always)]
pub const fn as_v4(addr: &Addr) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}

macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: every listed type is `#[repr(C)]`, `Copy`, has explicit padding and is valid
            // for any bit pattern.
            #[cfg(feature = "user")]
            #[allow(unsafe_code)]
            unsafe impl aya::Pod for $t {}
        )*
    };
}

/// IP protocol numbers used in keys.
pub const PROTO_TCP: u8 = 6;

/// Key of the services map: one entry per service VIP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(ServiceKey, 20);

/// Connections to this service port go to the node proxy instead of a backend.
pub const SVC_F_HANDOFF: u32 = 1 << 0;
/// An ALLOW policy selects this service port: sources without an allow entry are denied.
pub const SVC_F_DEFAULT_DENY: u32 = 1 << 1;

/// Value of the services map.
///
/// Backends live in [`maps::BACKENDS`] under `(port_id, slot_base + i)` for `i < count`. An
/// update writes the new set into the other half (`slot_base ^ SLOT_HALF`) and then replaces
/// this value in one map update, so a connect sees either the old or the new set, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Identifies this (service, port) pair: backends and policy are keyed by it.
    pub port_id: u32,
    /// Identifies the service for metrics (shared by all its ports).
    pub svc_id: u32,
    pub count: u32,
    /// Sum of backend weights; 0 means no ready backend.
    pub total_weight: u32,
    pub slot_base: u32,
    pub flags: u32,
}
assert_size!(ServiceValue, 24);

/// Offset between the two halves of a service's backend slots.
pub const SLOT_HALF: u32 = 1 << 16;
/// Upper bound on ready backends per service port (one half of the slot space).
pub const MAX_BACKENDS: u32 = SLOT_HALF;
/// Binary search steps that cover [`MAX_BACKENDS`].
pub const BACKEND_SEARCH_STEPS: u32 = 17;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub port_id: u32,
    pub slot: u32,
}
assert_size!(BackendKey, 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
    /// Exclusive upper bound of this backend's share of `[0, total_weight)`; cumulative.
    pub weight_end: u32,
    pub workload_id: u32,
}
assert_size!(BackendValue, 28);

/// The workload runs on this node.
pub const WL_F_LOCAL: u32 = 1 << 0;
/// The workload is meshed (its cgroup has weft's programs).
pub const WL_F_MESHED: u32 = 1 << 1;
/// The workload accepts only mutual TLS (PeerAuthentication STRICT): on its own node the
/// ingress program drops plaintext connection attempts from outside the mesh; on other nodes
/// connect4 sends connections to it through the node proxy's tunnel.
pub const WL_F_STRICT: u32 = 1 << 2;
/// A meshed workload on another node whose node proxy accepts tunnels.
pub const WL_F_TUNNEL: u32 = 1 << 3;

/// Value of the workload maps (by IP and by cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadValue {
    pub id: u32,
    pub flags: u32,
}
assert_size!(WorkloadValue, 8);

/// Key of the L4 policy map: may this source workload connect to this service port?
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_workload: u32,
    pub port_id: u32,
}
assert_size!(PolicyKey, 8);

pub const POLICY_ALLOW: u32 = 1;
pub const POLICY_DENY: u32 = 2;

/// Connection metadata flags.
pub const CONN_F_VIP: u16 = 1 << 0;
pub const CONN_F_HANDOFF: u16 = 1 << 1;
pub const CONN_F_REDIRECT: u16 = 1 << 2;
pub const CONN_F_ESTABLISHED: u16 = 1 << 3;

/// Who reports a flow: the connecting side or the accepting side.
pub const REPORTER_SOURCE: u8 = 0;
pub const REPORTER_DESTINATION: u8 = 1;

/// Per-socket state, keyed by socket cookie. Created by `connect4` (client side) or by
/// `sock_ops` when a connection is accepted, removed when the socket closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnMeta {
    /// The destination the application asked for (the VIP for services).
    pub orig_addr: Addr,
    pub orig_port: u16,
    pub flags: u16,
    pub src_workload: u32,
    pub dst_workload: u32,
    pub svc_id: u32,
    pub port: u16,
    pub reporter: u8,
    pub _pad: u8,
    pub start_ns: u64,
}
assert_size!(ConnMeta, 48);

/// A TCP 4-tuple from one socket's point of view. Used for the original-destination table and
/// the sockhash (a socket registers its own tuple; its peer looks it up reversed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TupleKey {
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}
assert_size!(TupleKey, 40);

/// What the node proxy reads back for a handed-off connection, keyed by the client's tuple
/// (`local` = the pod, `remote` = the proxy listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
    pub src_workload: u32,
    pub svc_id: u32,
    pub _pad2: u32,
}
assert_size!(OrigDst, 32);

/// `sk_msg` has not decided yet how this socket's sends travel.
pub const SK_MODE_UNDECIDED: u32 = 0;
/// This socket's sends are redirected to the peer socket.
pub const SK_MODE_REDIRECT: u32 = 1;
/// This socket's sends go through TCP for the connection's lifetime.
pub const SK_MODE_TCP: u32 = 2;

/// State of a socket in the sockhash, keyed by its own tuple.
///
/// The send path is decided once, on the first message: a socket whose first bytes went
/// through TCP (its peer was not in the sockhash yet) keeps using TCP, because the receiver
/// reads redirected data before TCP data and mixing paths could reorder the stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkState {
    pub mode: u32,
    pub _pad: u32,
    pub redir_tx: u64,
    pub redir_rx: u64,
}
assert_size!(SkState, 24);

/// Aggregation key of the L4 flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_workload: u32,
    pub dst_workload: u32,
    pub svc_id: u32,
    pub port: u16,
    pub reporter: u8,
    pub _pad: u8,
}
assert_size!(FlowKey, 16);

/// RTT histogram buckets: bucket `i` counts smoothed RTTs below `2^(i+RTT_BUCKET_SHIFT)` µs;
/// the last bucket is open-ended.
pub const RTT_BUCKETS: usize = 16;
pub const RTT_BUCKET_SHIFT: u32 = 4;

/// Counters of the L4 flow table: one copy per CPU (plain adds), summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub opened: u64,
    pub closed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_out: u64,
    pub segs_in: u64,
    pub retransmits: u64,
    pub duration_ns: u64,
    pub redirected_bytes: u64,
    pub rtt_sum_us: u64,
    pub rtt_buckets: [u64; RTT_BUCKETS],
}
assert_size!(FlowStats, 208);

/// One closed connection, sent through the events ring buffer (the L4 access record).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub local: Addr,
    pub remote: Addr,
    pub orig_addr: Addr,
    pub local_port: u16,
    pub remote_port: u16,
    pub orig_port: u16,
    pub flags: u16,
    pub src_workload: u32,
    pub dst_workload: u32,
    pub svc_id: u32,
    pub reporter: u8,
    pub _pad: [u8; 3],
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub duration_ns: u64,
    pub redirected_bytes: u64,
}
assert_size!(ConnEvent, 120);

/// Node-wide settings, the single entry of [`maps::NODE_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub proxy_addr: Addr,
    pub proxy_port: u16,
    pub _pad: u16,
    pub flags: u32,
}
assert_size!(NodeConfig, 24);

/// Same-node `sk_msg` redirect between meshed sockets is on.
pub const NODE_F_SKMSG: u32 = 1 << 0;
/// A node proxy address is set (handoff is possible).
pub const NODE_F_PROXY: u32 = 1 << 1;

/// Counters in [`maps::COUNTERS`], one per verdict and per error path.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counter {
    /// connect4: destination is no service; left alone.
    ConnectPassthrough = 0,
    /// connect4: service VIP rewritten to a backend.
    ConnectBalanced,
    /// connect4: handed to the node proxy.
    ConnectHandoff,
    /// connect4: denied by L4 policy (EPERM).
    ConnectDenied,
    /// connect4: service without ready backends (ECONNREFUSED).
    ConnectNoBackend,
    /// connect4: handoff wanted but no proxy configured; balanced instead.
    ConnectNoProxy,
    /// connect4: error, connection allowed unchanged (fail open).
    ConnectError,
    /// connect4: the backend table was inconsistent during a lookup.
    ConnectBackendMissing,
    /// connect4/sock_ops: per-socket metadata could not be stored.
    MetaInsertFailed,
    /// sock_ops: connection established (either side).
    SockOpsEstablished,
    /// sock_ops: connection closed and accounted.
    SockOpsClosed,
    /// sock_ops: flow table full, flow not accounted.
    FlowInsertFailed,
    /// sock_ops: the events ring buffer was full, access record lost.
    EventDropped,
    /// sock_ops: original destination could not be re-keyed by tuple.
    OrigDstInsertFailed,
    /// sock_ops: a socket joined the sockhash for same-node redirect.
    SockhashInserted,
    /// sock_ops: a socket could not join the sockhash.
    SockhashInsertFailed,
    /// sk_msg: message redirected to the peer socket.
    SkMsgRedirected,
    /// sk_msg: peer not in the sockhash, message passed to TCP.
    SkMsgPassed,
    /// getpeername4: the VIP was shown instead of the backend.
    PeerNameRewritten,
    /// connect4: a connection straight to a STRICT workload on another node was handed to the
    /// node proxy, which carries it through the tunnel.
    ConnectTunnel,
    /// cgroup_skb ingress: a plaintext connection attempt to a STRICT workload from outside the
    /// mesh was dropped.
    StrictDropped,
    /// cgroup_skb ingress: a connection attempt to a STRICT workload came from its node's proxy
    /// or a meshed pod of its node, and was let in.
    StrictAdmitted,
    /// sk_lookup: a plaintext connection attempt to a STRICT workload from outside the mesh was
    /// refused (the client got a reset).
    StrictRefused,
}

impl Counter {
    pub const ALL: [Counter; 23] = [
        Counter::ConnectPassthrough,
        Counter::ConnectBalanced,
        Counter::ConnectHandoff,
        Counter::ConnectDenied,
        Counter::ConnectNoBackend,
        Counter::ConnectNoProxy,
        Counter::ConnectError,
        Counter::ConnectBackendMissing,
        Counter::MetaInsertFailed,
        Counter::SockOpsEstablished,
        Counter::SockOpsClosed,
        Counter::FlowInsertFailed,
        Counter::EventDropped,
        Counter::OrigDstInsertFailed,
        Counter::SockhashInserted,
        Counter::SockhashInsertFailed,
        Counter::SkMsgRedirected,
        Counter::SkMsgPassed,
        Counter::PeerNameRewritten,
        Counter::ConnectTunnel,
        Counter::StrictDropped,
        Counter::StrictAdmitted,
        Counter::StrictRefused,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// (hook, name) for metric labels.
    pub const fn describe(self) -> (&'static str, &'static str) {
        match self {
            Counter::ConnectPassthrough => ("connect4", "passthrough"),
            Counter::ConnectBalanced => ("connect4", "balanced"),
            Counter::ConnectHandoff => ("connect4", "handoff"),
            Counter::ConnectDenied => ("connect4", "denied"),
            Counter::ConnectNoBackend => ("connect4", "no_backend"),
            Counter::ConnectNoProxy => ("connect4", "no_proxy"),
            Counter::ConnectError => ("connect4", "error"),
            Counter::ConnectBackendMissing => ("connect4", "backend_missing"),
            Counter::MetaInsertFailed => ("connect4", "meta_insert_failed"),
            Counter::SockOpsEstablished => ("sock_ops", "established"),
            Counter::SockOpsClosed => ("sock_ops", "closed"),
            Counter::FlowInsertFailed => ("sock_ops", "flow_insert_failed"),
            Counter::EventDropped => ("sock_ops", "event_dropped"),
            Counter::OrigDstInsertFailed => ("sock_ops", "orig_dst_insert_failed"),
            Counter::SockhashInserted => ("sock_ops", "sockhash_inserted"),
            Counter::SockhashInsertFailed => ("sock_ops", "sockhash_insert_failed"),
            Counter::SkMsgRedirected => ("sk_msg", "redirected"),
            Counter::SkMsgPassed => ("sk_msg", "passed"),
            Counter::PeerNameRewritten => ("getpeername4", "rewritten"),
            Counter::ConnectTunnel => ("connect4", "tunnel"),
            Counter::StrictDropped => ("ingress", "strict_dropped"),
            Counter::StrictAdmitted => ("ingress", "strict_admitted"),
            Counter::StrictRefused => ("sk_lookup", "strict_refused"),
        }
    }
}

user_pod!(
    ServiceKey,
    ServiceValue,
    BackendKey,
    BackendValue,
    WorkloadValue,
    PolicyKey,
    ConnMeta,
    TupleKey,
    OrigDst,
    SkState,
    FlowKey,
    FlowStats,
    ConnEvent,
    NodeConfig,
);

/// Reads a map type from raw bytes (e.g. a ring buffer record), if there are enough of them.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
pub fn from_bytes<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is valid for any bit pattern, and `bytes` holds at least
    // `size_of::<T>()` bytes; `read_unaligned` copes with any alignment.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}
