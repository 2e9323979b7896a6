//! Compiles a [`Snapshot`] into the entries of weft's kernel maps.
//!
//! Invalid objects are not fatal: each is skipped with a [`Rejection`] saying what to fix, and
//! everything else still compiles, so one bad object never takes a node's mesh down.

mod backends;
mod dump;
mod mtls;
mod policy;
mod routes;
#[cfg(test)]
mod tests;
mod traffic;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

pub use dump::{addr_to_string, service_key_to_string};
pub use mtls::{MtlsState, TunnelPeer};
pub use routes::{CompiledBackend, CompiledRule, L7Service, check_rule, route_problems};
use serde::Serialize;
pub use traffic::traffic_problems;
use weft_common::{
    Addr, BackendValue, NODE_F_PROXY, NODE_F_SKMSG, NodeConfig, PROTO_TCP, PolicyKey, SVC_F_HANDOFF, ServiceKey,
    ServiceValue, WL_F_LOCAL, WL_F_MESHED, WL_F_STRICT, WL_F_TUNNEL, WorkloadValue, as_v4, v4_mapped,
};

use crate::authz::AuthzTable;
use crate::model::{
    EndpointSet, MAX_WEIGHT, MtlsMode, NodeSettings, ObjectRef, Protocol, Service, Snapshot, Workload,
};

/// Everything the datapath writes into the kernel, plus what was left out and why.
///
/// `Serialize` renders it for humans (the agent's `/config_dump`): addresses dotted, flags by
/// name, map keys as strings.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Compiled {
    #[serde(serialize_with = "dump::node")]
    pub node: NodeConfig,
    /// One entry per (cluster IP, TCP port).
    #[serde(serialize_with = "dump::services")]
    pub services: BTreeMap<ServiceKey, CompiledService>,
    /// Every workload address, on this node or not: connect4 needs remote ones to attribute
    /// backends and local ones to identify sources.
    #[serde(serialize_with = "dump::workload_ips")]
    pub workload_ips: BTreeMap<Addr, WorkloadValue>,
    /// Cgroups to attach to, keyed by "ns/name": local meshed workloads only.
    pub attachments: BTreeMap<String, Attachment>,
    #[serde(serialize_with = "dump::policy")]
    pub policy: BTreeMap<PolicyKey, u32>,
    /// Route tables for the node proxy, by the service VIP:port a client connected to: every
    /// service port handed off (`SVC_F_HANDOFF`) has one.
    #[serde(serialize_with = "dump::by_addr")]
    pub l7: BTreeMap<SocketAddrV4, L7Service>,
    /// The ready backends of every compiled TCP service port, by VIP:port: the same set and
    /// weights as the kernel's backends, for the proxy's own balancing.
    #[serde(serialize_with = "dump::by_addr")]
    pub endpoints: BTreeMap<SocketAddrV4, Vec<L7Endpoint>>,
    pub names: Names,
    /// Every AuthorizationPolicy and JwtPolicy, indexed by what they select, for the proxy's
    /// decisions; dumped with the semantics it applies.
    pub authz: AuthzTable,
    /// Every workload's mTLS mode (PeerAuthentication), by "ns/name".
    pub mtls: BTreeMap<String, MtlsState>,
    /// Meshed workloads on other nodes whose node has an address, by workload IP: the node
    /// proxy reaches them through the tunnel.
    pub tunnel: BTreeMap<Ipv4Addr, TunnelPeer>,
    pub rejected: Vec<Rejection>,
}

impl Compiled {
    /// The human-readable form served as `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        // Cannot fail: every map key serializes as a string or an integer.
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// The VIP:port of a compiled service port, e.g. where a route's mirror sends copies.
    pub fn service_addr(&self, service: &ObjectRef, port: u16) -> Option<SocketAddrV4> {
        let (key, _) = self.services.iter().find(|(key, s)| key.port == port && &s.service == service)?;
        let word = as_v4(&key.addr)?;
        Some(SocketAddrV4::new(Ipv4Addr::from(word.to_ne_bytes()), port))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CompiledService {
    /// `slot_base` is always 0: the datapath picks the half it writes to.
    #[serde(serialize_with = "dump::service_value")]
    pub value: ServiceValue,
    /// Sorted by (address, port), `weight_end` cumulative.
    #[serde(serialize_with = "dump::backends")]
    pub backends: Vec<BackendValue>,
    pub service: ObjectRef,
    pub port_name: Option<String>,
    /// The port's `appProtocol`. With it, or else the prefix of `port_name` (`http-web`), the
    /// proxy knows what it accepts there and speaks to its endpoints.
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Attachment {
    pub workload: ObjectRef,
    pub cgroup: PathBuf,
    #[serde(serialize_with = "dump::workload_value")]
    pub value: WorkloadValue,
}

/// One backend of a service port as the node proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct L7Endpoint {
    pub addr: SocketAddrV4,
    /// This backend's own share (not cumulative); never 0, drained backends are left out.
    pub weight: u32,
    pub workload: Option<ObjectRef>,
}

/// Ids back to names, for metric labels and logs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Names {
    pub workloads: BTreeMap<u32, WorkloadName>,
    pub services: BTreeMap<u32, ObjectRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadName {
    pub id: ObjectRef,
    pub service_account: String,
}

/// An object (or part of one) the compiler left out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{object}: {field}: {reason}")]
pub struct Rejection {
    /// "Kind ns/name".
    pub object: String,
    /// Path of the offending field, e.g. "spec.ports[1].port".
    pub field: String,
    pub reason: String,
    pub cause: Cause,
}

/// Whether the object itself is at fault or something it refers to; the controller reports the
/// first as `Accepted: False` and the second as `ResolvedRefs: False`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    /// A value of the object, or a conflict with another object.
    #[default]
    Invalid,
    /// A reference (target, parent, backend, mirror) to a Service, port or route that does not
    /// exist or cannot carry traffic (headless, rejected).
    Unresolved,
}

impl Rejection {
    fn new(kind: &str, id: &ObjectRef, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { object: format!("{kind} {id}"), field: field.into(), reason: reason.into(), cause: Cause::Invalid }
    }

    fn unresolved(kind: &str, id: &ObjectRef, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { cause: Cause::Unresolved, ..Self::new(kind, id, field, reason) }
    }
}

/// Id of a workload in the maps; FNV-1a of "wl:ns/name", never 0 (0 means "no workload").
pub fn workload_id(id: &ObjectRef) -> u32 {
    fnv1a(&format!("wl:{id}"))
}

/// Id of a service for metrics; FNV-1a of "svc:ns/name", never 0.
pub fn service_id(id: &ObjectRef) -> u32 {
    fnv1a(&format!("svc:{id}"))
}

/// Id of one service port, which keys its backends and policy; FNV-1a of "port:ns/name:port".
pub fn port_id(svc: &ObjectRef, port: u16) -> u32 {
    fnv1a(&format!("port:{svc}:{port}"))
}

fn fnv1a(s: &str) -> u32 {
    let hash = s.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    if hash == 0 { 1 } else { hash }
}

/// The map form of an IPv4 address.
pub fn ipv4_addr(ip: Ipv4Addr) -> Addr {
    v4_mapped(u32::from_ne_bytes(ip.octets()))
}

pub fn compile(snapshot: &Snapshot) -> Compiled {
    let mut out = Compiled { node: node_config(&snapshot.node), ..Compiled::default() };
    // Canonical order first: which of two conflicting objects wins must not depend on the
    // order they were read in.
    let modes = mtls::Modes::new(&sorted(&snapshot.peer_authentications), &mut out.rejected);
    let mut compiler = Compiler {
        out,
        node_name: &snapshot.node.node_name,
        proxy: snapshot.node.proxy.is_some(),
        modes,
        node_tunnels: mtls::node_tunnels(&snapshot.nodes),
        workloads: BTreeMap::new(),
        ip_owner: BTreeMap::new(),
        accepted: BTreeMap::new(),
    };
    compiler.workloads(&sorted(&snapshot.workloads));
    let services = sorted(&snapshot.services);
    compiler.services(&services, &sorted(&snapshot.endpoints));
    let policies = sorted(&snapshot.policies);
    let jwt_policies = sorted(&snapshot.jwt_policies);
    let authz_ports = policy::apply(
        &mut compiler.out,
        &policies,
        &jwt_policies,
        &services,
        &compiler.workloads,
        snapshot.node.proxy.is_some(),
    );
    let traffic = traffic::resolve(
        &snapshot.traffic_policies,
        &services,
        &compiler.accepted,
        &snapshot.routes,
        &mut compiler.out.rejected,
    );
    routes::apply(&mut compiler.out, &snapshot.routes, &services, &compiler.accepted, &traffic, &authz_ports);
    compiler.out
}

fn sorted<T: Ord>(items: &[T]) -> Vec<&T> {
    let mut items: Vec<&T> = items.iter().collect();
    items.sort();
    items
}

fn node_config(node: &NodeSettings) -> NodeConfig {
    let mut config = NodeConfig::default();
    if let Some(proxy) = node.proxy {
        config.proxy_addr = ipv4_addr(*proxy.ip());
        config.proxy_port = proxy.port();
        config.flags |= NODE_F_PROXY;
    }
    if node.skmsg {
        config.flags |= NODE_F_SKMSG;
    }
    config
}

struct Compiler<'a> {
    out: Compiled,
    node_name: &'a str,
    /// This node has a proxy, so connections can be handed to it (and its tunnel).
    proxy: bool,
    modes: mtls::Modes<'a>,
    node_tunnels: BTreeMap<&'a str, SocketAddrV4>,
    /// Accepted workloads by id.
    workloads: BTreeMap<&'a ObjectRef, &'a Workload>,
    ip_owner: BTreeMap<Ipv4Addr, &'a Workload>,
    /// Accepted services with their VIP; routes resolve their parents and backends here.
    accepted: BTreeMap<&'a ObjectRef, (&'a Service, Ipv4Addr)>,
}

impl<'a> Compiler<'a> {
    fn reject(&mut self, kind: &str, id: &ObjectRef, field: impl Into<String>, reason: impl Into<String>) {
        self.out.rejected.push(Rejection::new(kind, id, field, reason));
    }

    fn workloads(&mut self, workloads: &[&'a Workload]) {
        let mut previous = None;
        for &wl in workloads {
            // Sorted input puts objects with the same id next to each other.
            let problem =
                if previous.replace(&wl.id) == Some(&wl.id) { Some(defined_twice()) } else { self.check_workload(wl) };
            if let Some((field, reason)) = problem {
                self.reject("Workload", &wl.id, field, reason);
                continue;
            }
            let id = workload_id(&wl.id);
            self.out
                .names
                .workloads
                .insert(id, WorkloadName { id: wl.id.clone(), service_account: wl.service_account.clone() });
            let local = wl.node.as_deref().is_none_or(|node| node == self.node_name);
            // This node attaches to a local workload's cgroup, so without one it is not in the
            // mesh; another node's workload is attached by that node's agent.
            let in_mesh = wl.meshed && (wl.cgroup.is_some() || !local);
            let meshed = local && in_mesh;
            let mtls = self.modes.of(wl);
            let strict = in_mesh && mtls.mode == MtlsMode::Strict;
            let tunnel = match (local, in_mesh, wl.node.as_deref()) {
                (false, true, Some(node)) => self.tunnel_of(wl, node, &mtls),
                _ => None,
            };
            let flags = if local { WL_F_LOCAL } else { 0 }
                | if meshed { WL_F_MESHED } else { 0 }
                | if strict { WL_F_STRICT } else { 0 }
                | if tunnel.is_some() { WL_F_TUNNEL } else { 0 };
            self.out.mtls.insert(wl.id.to_string(), mtls);
            let value = WorkloadValue { id, flags };
            if let Some(peer) = &tunnel {
                for &ip in &wl.ips {
                    self.out.tunnel.insert(ip, peer.clone());
                }
            }
            for &ip in &wl.ips {
                self.out.workload_ips.insert(ipv4_addr(ip), value);
                self.ip_owner.insert(ip, wl);
            }
            if let (true, Some(cgroup)) = (meshed, &wl.cgroup) {
                let attachment = Attachment { workload: wl.id.clone(), cgroup: cgroup.clone(), value };
                self.out.attachments.insert(wl.id.to_string(), attachment);
            }
            self.workloads.insert(&wl.id, wl);
        }
    }

    /// How a meshed workload on `node` is reached: through that node's tunnel, if the config
    /// gives the node an address. A STRICT workload without one cannot be reached at all.
    fn tunnel_of(&mut self, wl: &Workload, node: &str, mtls: &MtlsState) -> Option<TunnelPeer> {
        let Some(&tunnel) = self.node_tunnels.get(node) else {
            if mtls.mode == MtlsMode::Strict {
                let reason = format!(
                    "STRICT, but node {node} has no address, so no tunnel reaches it and its plaintext connections are refused; add a v1 Node {node} with an InternalIP in status.addresses"
                );
                self.reject("Workload", &wl.id, "spec.node", reason);
            }
            return None;
        };
        Some(TunnelPeer {
            workload: wl.id.clone(),
            service_account: wl.service_account.clone(),
            node: node.to_owned(),
            tunnel,
            mode: mtls.mode,
        })
    }

    /// Why `wl` cannot be accepted, as (field, reason).
    fn check_workload(&self, wl: &Workload) -> Option<(String, String)> {
        if wl.ips.is_empty() {
            return Some(("spec.addresses".into(), "no addresses; list the workload's IPv4 addresses".into()));
        }
        if wl.weight > MAX_WEIGHT {
            let reason = format!("weight {} is too large; use a weight between 0 and {MAX_WEIGHT}", wl.weight);
            return Some(("spec.weight".into(), reason));
        }
        for (i, ip) in wl.ips.iter().enumerate() {
            if ip.is_unspecified() {
                return Some((format!("spec.addresses[{i}]"), format!("{ip} is not a workload address")));
            }
            if let Some(owner) = self.ip_owner.get(ip) {
                let reason = format!(
                    "address {ip} is already used by Workload {}; give each workload its own addresses",
                    owner.id
                );
                return Some((format!("spec.addresses[{i}]"), reason));
            }
        }
        let id = workload_id(&wl.id);
        if let Some(other) = self.out.names.workloads.get(&id) {
            let reason = format!("its id {id:#x} collides with Workload {}; rename one of them", other.id);
            return Some(("metadata.name".into(), reason));
        }
        None
    }

    fn services(&mut self, services: &[&'a Service], endpoints: &[&'a EndpointSet]) {
        let mut vips: BTreeMap<(Ipv4Addr, u16), &ObjectRef> = BTreeMap::new();
        let mut port_ids: BTreeMap<u32, (&ObjectRef, u16)> = BTreeMap::new();
        let mut previous = None;
        for &svc in services {
            let duplicate = previous.replace(&svc.id) == Some(&svc.id);
            // Headless: no VIP to steer.
            let Some(ip) = svc.cluster_ip else { continue };
            let problem = if duplicate {
                Some(defined_twice())
            } else {
                check_service(svc, ip, &vips, &port_ids, &self.out.names.services)
            };
            if let Some((field, reason)) = problem {
                self.reject("Service", &svc.id, field, reason);
                continue;
            }
            let svc_id = service_id(&svc.id);
            self.out.names.services.insert(svc_id, svc.id.clone());
            self.accepted.insert(&svc.id, (svc, ip));
            let slices: Vec<&EndpointSet> = endpoints.iter().copied().filter(|es| es.service == svc.id).collect();
            for (i, port) in svc.ports.iter().enumerate().filter(|(_, p)| p.protocol == Protocol::Tcp) {
                vips.insert((ip, port.port), &svc.id);
                port_ids.insert(port_id(&svc.id, port.port), (&svc.id, port.port));
                let Some(backends) = self.backends(svc, i, port, &slices) else { continue };
                let endpoints = self.l7_endpoints(&backends);
                self.out.endpoints.insert(SocketAddrV4::new(ip, port.port), endpoints);
                let value = ServiceValue {
                    port_id: port_id(&svc.id, port.port),
                    svc_id,
                    // At most MAX_BACKENDS, checked by `backends`.
                    count: backends.len() as u32,
                    total_weight: backends.last().map_or(0, |b| b.weight_end),
                    slot_base: 0,
                    flags: if svc.l7 || self.tunnelled(&backends) { SVC_F_HANDOFF } else { 0 },
                };
                let key = ServiceKey { addr: ipv4_addr(ip), port: port.port, proto: PROTO_TCP, _pad: 0 };
                let compiled = CompiledService {
                    value,
                    backends,
                    service: svc.id.clone(),
                    port_name: port.name.clone(),
                    app_protocol: port.app_protocol.clone(),
                };
                self.out.services.insert(key, compiled);
            }
        }
    }
}

impl Compiler<'_> {
    /// Whether a port must go through the node proxy because some backend is a STRICT
    /// workload on another node, which accepts only the tunnel.
    fn tunnelled(&self, backends: &[BackendValue]) -> bool {
        let strict_remote = WL_F_STRICT | WL_F_TUNNEL;
        self.proxy
            && backends.iter().any(|b| {
                self.out.workload_ips.get(&b.addr).is_some_and(|w| w.flags & strict_remote == strict_remote)
            })
    }

    /// The proxy's view of a port's backends: the same entries, with each one's own weight.
    fn l7_endpoints(&self, backends: &[BackendValue]) -> Vec<L7Endpoint> {
        let mut start = 0;
        let mut endpoints = Vec::with_capacity(backends.len());
        for backend in backends {
            let weight = backend.weight_end.saturating_sub(start);
            start = backend.weight_end;
            // Always IPv4-mapped: `backends` builds them from IPv4 addresses.
            let Some(word) = as_v4(&backend.addr) else { continue };
            let addr = SocketAddrV4::new(Ipv4Addr::from(word.to_ne_bytes()), backend.port);
            let workload = self.out.names.workloads.get(&backend.workload_id).map(|name| name.id.clone());
            endpoints.push(L7Endpoint { addr, weight, workload });
        }
        endpoints
    }
}

fn defined_twice() -> (String, String) {
    ("metadata.name".into(), "defined twice; only the first definition is used".into())
}

/// Why `svc` cannot be accepted, as (field, reason). The whole service is checked before any
/// of its ports is written, so a conflict leaves all of it out rather than half of it.
fn check_service(
    svc: &Service,
    ip: Ipv4Addr,
    vips: &BTreeMap<(Ipv4Addr, u16), &ObjectRef>,
    port_ids: &BTreeMap<u32, (&ObjectRef, u16)>,
    svc_ids: &BTreeMap<u32, ObjectRef>,
) -> Option<(String, String)> {
    if ip.is_unspecified() {
        let reason =
            format!("{ip} is not a usable service address; set a real clusterIP, or \"None\" for a headless service");
        return Some(("spec.clusterIP".into(), reason));
    }
    let mut seen: BTreeMap<(u16, Protocol), usize> = BTreeMap::new();
    for (i, port) in svc.ports.iter().enumerate() {
        if let Some(first) = seen.insert((port.port, port.protocol), i) {
            let reason = format!(
                "port {}/{} is also listed at spec.ports[{first}]; list each port once",
                port.port, port.protocol
            );
            return Some((format!("spec.ports[{i}].port"), reason));
        }
        if port.protocol != Protocol::Tcp {
            continue;
        }
        if let Some(other) = vips.get(&(ip, port.port)) {
            let reason = format!(
                "{ip}:{}/TCP is claimed by Service {other} and Service {}; {other} keeps it, give each service its own clusterIP",
                port.port, svc.id
            );
            return Some((format!("spec.ports[{i}].port"), reason));
        }
        if let Some((other, other_port)) = port_ids.get(&port_id(&svc.id, port.port)) {
            let reason = format!("its id collides with Service {other} port {other_port}; rename one of them");
            return Some((format!("spec.ports[{i}].port"), reason));
        }
    }
    if let Some(other) = svc_ids.get(&service_id(&svc.id)) {
        return Some(("metadata.name".into(), format!("its id collides with Service {other}; rename one of them")));
    }
    None
}
