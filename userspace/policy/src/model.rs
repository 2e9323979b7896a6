//! The domain model: what the node should enforce, independent of where it was read from.
//!
//! Every type is `Ord` (id first) so the compiler can sort its input into one canonical order:
//! the same objects in any order compile to the same maps.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A namespaced object's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything the compiler reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub node: NodeSettings,
    pub services: Vec<Service>,
    pub endpoints: Vec<EndpointSet>,
    pub workloads: Vec<Workload>,
    pub policies: Vec<AuthorizationPolicy>,
}

/// Settings of the node this agent runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSettings {
    pub node_name: String,
    /// The node proxy that L7 services are handed to; `None` disables handoff.
    pub proxy: Option<SocketAddrV4>,
    /// Redirect same-node meshed traffic socket to socket with `sk_msg`.
    pub skmsg: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Service {
    pub id: ObjectRef,
    /// `None` for a headless service, which has no VIP to steer and is skipped.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `None` or empty selects no workload (backends then come only from endpoint sets).
    pub selector: Option<BTreeMap<String, String>>,
    /// Connections go to the node proxy instead of a backend.
    #[serde(default)]
    pub l7: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// Only TCP is steered; other protocols are accepted and ignored.
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A named port, resolved per workload.
    Name(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// The endpoints of one service as listed by an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointSet {
    pub service: ObjectRef,
    /// (port name, port); an unnamed port matches an unnamed service port.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// The workload behind this address (the slice's `targetRef`).
    pub workload: Option<ObjectRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Workload {
    pub id: ObjectRef,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    pub ips: Vec<Ipv4Addr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node the workload runs on; `None` means this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Its cgroup, where the datapath attaches; without one the workload cannot be meshed.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub meshed: bool,
    /// Share of traffic relative to the other backends; 0 drains the workload.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Named ports, for services whose `targetPort` is a name.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

impl Workload {
    /// A workload with the documented defaults: service account `default`, this node, meshed,
    /// weight 1.
    pub fn new(id: ObjectRef, ips: Vec<Ipv4Addr>) -> Self {
        Self {
            id,
            service_account: default_service_account(),
            ips,
            labels: BTreeMap::new(),
            node: None,
            cgroup: None,
            meshed: true,
            weight: default_weight(),
            ports: BTreeMap::new(),
        }
    }
}

/// The weight a workload gets when none is given.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight; keeps the sum of a service's weights far from `u32::MAX`.
pub const MAX_WEIGHT: u32 = 1_000_000;

fn default_service_account() -> String {
    "default".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    pub id: ObjectRef,
    pub target: PolicyTarget,
    pub action: Action,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyTarget {
    /// A service in the policy's namespace, by name.
    Service(String),
    /// Every service in the policy's namespace.
    Namespace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// Matches when (`from` is empty or any source matches) and (`to_ports` is empty or holds the
/// service port).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to_ports: Vec<u16>,
}

/// Matches when every non-empty list matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub namespaces: Vec<String>,
    /// `ns/sa`, or `sa` for the policy's own namespace.
    pub service_accounts: Vec<String>,
    /// SPIFFE ids `spiffe://cluster.local/ns/<ns>/sa/<sa>`; a trailing `*` matches any suffix.
    pub principals: Vec<String>,
}
