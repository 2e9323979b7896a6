//! Human-readable serialization of the kernel map types (which are `no_std` and carry no serde):
//! addresses dotted, ports as numbers, flags by name, every field spelled out.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use serde::{Serialize, Serializer};
use weft_common::{
    Addr, BackendValue, NODE_F_PROXY, NODE_F_SKMSG, NodeConfig, POLICY_ALLOW, POLICY_DENY, PROTO_TCP, PolicyKey,
    SVC_F_DEFAULT_DENY, SVC_F_HANDOFF, ServiceKey, ServiceValue, WL_F_LOCAL, WL_F_MESHED, WL_F_STRICT, WL_F_TUNNEL, WorkloadValue, as_v4,
};

use super::CompiledService;

/// An address as text: dotted for IPv4-mapped ones.
pub fn addr_to_string(addr: &Addr) -> String {
    match as_v4(addr) {
        Some(word) => Ipv4Addr::from(word.to_ne_bytes()).to_string(),
        None => {
            let mut bytes = [0_u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ipv6Addr::from(bytes).to_string()
        }
    }
}

/// "10.96.0.10:80/TCP".
pub fn service_key_to_string(key: &ServiceKey) -> String {
    let proto = if key.proto == PROTO_TCP { "TCP".to_owned() } else { format!("proto{}", key.proto) };
    format!("{}:{}/{proto}", addr_to_string(&key.addr), key.port)
}

/// Names of the set bits; unknown bits show as hex so nothing is hidden.
fn flag_names(flags: u32, known: &[(u32, &str)]) -> Vec<String> {
    let mut names: Vec<String> =
        known.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| (*n).to_owned()).collect();
    let unknown = known.iter().fold(flags, |rest, (bit, _)| rest & !bit);
    if unknown != 0 {
        names.push(format!("{unknown:#x}"));
    }
    names
}

pub(super) fn node<S: Serializer>(node: &NodeConfig, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct View {
        proxy: Option<String>,
        flags: Vec<String>,
    }
    let proxy =
        (node.flags & NODE_F_PROXY != 0).then(|| format!("{}:{}", addr_to_string(&node.proxy_addr), node.proxy_port));
    View { proxy, flags: flag_names(node.flags, &[(NODE_F_SKMSG, "SKMSG"), (NODE_F_PROXY, "PROXY")]) }.serialize(s)
}

pub(super) fn services<S: Serializer>(map: &BTreeMap<ServiceKey, CompiledService>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(key, value)| (service_key_to_string(key), value)))
}

pub(super) fn service_value<S: Serializer>(value: &ServiceValue, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct View {
        port_id: u32,
        svc_id: u32,
        count: u32,
        total_weight: u32,
        slot_base: u32,
        flags: Vec<String>,
    }
    let flags = flag_names(value.flags, &[(SVC_F_HANDOFF, "HANDOFF"), (SVC_F_DEFAULT_DENY, "DEFAULT_DENY")]);
    let ServiceValue { port_id, svc_id, count, total_weight, slot_base, .. } = *value;
    View { port_id, svc_id, count, total_weight, slot_base, flags }.serialize(s)
}

pub(super) fn backends<S: Serializer>(backends: &[BackendValue], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct View {
        addr: String,
        port: u16,
        /// This backend's own share, recovered from the cumulative bounds.
        weight: u32,
        weight_end: u32,
        workload_id: u32,
    }
    let mut start = 0;
    s.collect_seq(backends.iter().map(|b| {
        let weight = b.weight_end.saturating_sub(start);
        start = b.weight_end;
        View {
            addr: addr_to_string(&b.addr),
            port: b.port,
            weight,
            weight_end: b.weight_end,
            workload_id: b.workload_id,
        }
    }))
}

#[derive(Serialize)]
struct WorkloadView {
    id: u32,
    flags: Vec<String>,
}

fn workload_view(value: &WorkloadValue) -> WorkloadView {
    WorkloadView { id: value.id, flags: flag_names(
            value.flags,
            &[(WL_F_LOCAL, "LOCAL"), (WL_F_MESHED, "MESHED"), (WL_F_STRICT, "STRICT"), (WL_F_TUNNEL, "TUNNEL")],
        ) }
}

pub(super) fn workload_value<S: Serializer>(value: &WorkloadValue, s: S) -> Result<S::Ok, S::Error> {
    workload_view(value).serialize(s)
}

pub(super) fn workload_ips<S: Serializer>(map: &BTreeMap<Addr, WorkloadValue>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(addr, value)| (addr_to_string(addr), workload_view(value))))
}

/// A list rather than a map: a (source, port) pair reads better as two fields than as one key.
pub(super) fn policy<S: Serializer>(map: &BTreeMap<PolicyKey, u32>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct View {
        src_workload: u32,
        port_id: u32,
        verdict: String,
    }
    s.collect_seq(map.iter().map(|(key, verdict)| View {
        src_workload: key.src_workload,
        port_id: key.port_id,
        verdict: match *verdict {
            POLICY_ALLOW => "ALLOW".to_owned(),
            POLICY_DENY => "DENY".to_owned(),
            other => other.to_string(),
        },
    }))
}

/// A map keyed by "10.96.0.10:9080".
pub(super) fn by_addr<S: Serializer, V: Serialize>(map: &BTreeMap<SocketAddrV4, V>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(addr, value)| (addr.to_string(), value)))
}
