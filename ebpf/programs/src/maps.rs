//! Every map of weft's kernel programs. Names and sizes come from `weft_common::maps`; the
//! `name = "..."` literals must match those constants (user space checks them at load time).
//! All maps are pinned by name so a restarted agent adopts them with their state.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use weft_common::{
    Addr, BackendKey, BackendValue, Counter, ConnMeta, FlowKey, FlowStats, NodeConfig, OrigDst,
    PolicyKey, ServiceKey, ServiceValue, SkState, TupleKey, WorkloadValue, maps as m,
};

#[map(name = "weft_services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(m::SERVICES_MAX, 0);

#[map(name = "weft_backends")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(m::BACKENDS_MAX, 0);

#[map(name = "weft_wl_ips")]
pub static WORKLOAD_IPS: HashMap<Addr, WorkloadValue> = HashMap::pinned(m::WORKLOADS_MAX, 0);

#[map(name = "weft_cgroups")]
pub static CGROUPS: HashMap<u64, WorkloadValue> = HashMap::pinned(m::WORKLOADS_MAX, 0);

#[map(name = "weft_policy")]
pub static POLICY: HashMap<PolicyKey, u32> = HashMap::pinned(m::POLICY_MAX, 0);

#[map(name = "weft_conns")]
pub static CONNS: LruHashMap<u64, ConnMeta> = LruHashMap::pinned(m::CONNS_MAX, 0);

#[map(name = "weft_orig_dst")]
pub static ORIG_DST: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(m::ORIG_DST_MAX, 0);

#[map(name = "weft_sk_state")]
pub static SK_STATE: LruHashMap<TupleKey, SkState> = LruHashMap::pinned(m::SOCKHASH_MAX, 0);

// Per CPU: counters are plain adds, user space sums the CPUs. Not preallocated: flows are few
// compared to the table's capacity.
#[map(name = "weft_flows")]
pub static FLOWS: PerCpuHashMap<FlowKey, FlowStats> =
    PerCpuHashMap::pinned(m::FLOWS_MAX, BPF_F_NO_PREALLOC);

#[map(name = "weft_sockhash")]
pub static SOCKHASH: SockHash<TupleKey> = SockHash::pinned(m::SOCKHASH_MAX, 0);

#[map(name = "weft_counters")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[map(name = "weft_node_cfg")]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map(name = "weft_events")]
pub static EVENTS: RingBuf = RingBuf::pinned(m::EVENTS_BYTES, 0);

/// Bumps a per-CPU counter (no atomics needed).
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// The node settings, or defaults (no proxy, no redirect) if user space has not written them.
#[inline(always)]
pub fn node_config() -> NodeConfig {
    NODE_CONFIG.get(0).copied().unwrap_or_default()
}

/// The workload at this address, if user space knows it.
#[inline(always)]
pub fn workload_at(addr: &Addr) -> WorkloadValue {
    // SAFETY: plain-old-data copied out at once; user space replaces whole values.
    unsafe { WORKLOAD_IPS.get(addr) }.copied().unwrap_or_default()
}
