//! Map names (at most 15 bytes: the kernel's object name limit) and sizes, used by the kernel
//! programs to declare maps and by user space to find them and their pins.

/// `ServiceKey` -> `ServiceValue`.
pub const SERVICES: &str = "weft_services";
/// `BackendKey` -> `BackendValue`.
pub const BACKENDS: &str = "weft_backends";
/// Workload IP (`Addr`) -> `WorkloadValue`.
pub const WORKLOAD_IPS: &str = "weft_wl_ips";
/// cgroup id (`u64`) -> `WorkloadValue`.
pub const CGROUPS: &str = "weft_cgroups";
/// `PolicyKey` -> `POLICY_ALLOW` / `POLICY_DENY`.
pub const POLICY: &str = "weft_policy";
/// socket cookie (`u64`) -> `ConnMeta` (LRU).
pub const CONNS: &str = "weft_conns";
/// `TupleKey` -> `OrigDst` (LRU).
pub const ORIG_DST: &str = "weft_orig_dst";
/// `TupleKey` -> `SkState` of sockets in the sockhash (LRU).
pub const SK_STATE: &str = "weft_sk_state";
/// `FlowKey` -> `FlowStats`.
pub const FLOWS: &str = "weft_flows";
/// `TupleKey` -> socket, for `sk_msg` redirect.
pub const SOCKHASH: &str = "weft_sockhash";
/// Per-CPU `u64` per `Counter`.
pub const COUNTERS: &str = "weft_counters";
/// One `NodeConfig`.
pub const NODE_CONFIG: &str = "weft_node_cfg";
/// Ring buffer of `ConnEvent`.
pub const EVENTS: &str = "weft_events";

/// Every map, in a fixed order (for pin checks and dumps).
pub const ALL: [&str; 13] = [
    SERVICES,
    BACKENDS,
    WORKLOAD_IPS,
    CGROUPS,
    POLICY,
    CONNS,
    ORIG_DST,
    SK_STATE,
    FLOWS,
    SOCKHASH,
    COUNTERS,
    NODE_CONFIG,
    EVENTS,
];

pub const SERVICES_MAX: u32 = 16_384;
pub const BACKENDS_MAX: u32 = 131_072;
pub const WORKLOADS_MAX: u32 = 16_384;
pub const POLICY_MAX: u32 = 65_536;
pub const CONNS_MAX: u32 = 65_536;
pub const ORIG_DST_MAX: u32 = 65_536;
pub const FLOWS_MAX: u32 = 16_384;
pub const SOCKHASH_MAX: u32 = 65_536;
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Program names, as in the object file.
pub mod programs {
    pub const CONNECT4: &str = "weft_connect4";
    pub const GETPEERNAME4: &str = "weft_getpeername4";
    pub const SOCK_OPS: &str = "weft_sock_ops";
    pub const SK_MSG: &str = "weft_sk_msg";
    pub const INGRESS: &str = "weft_ingress";
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
}
