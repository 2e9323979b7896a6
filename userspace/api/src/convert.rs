//! Kubernetes-shaped objects to weft's domain model. Everything an object can get wrong is
//! caught here, at the edge, with the path of the field to fix.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_policy::{
    Endpoint, EndpointSet, MtlsMode, Node, ObjectRef, PeerAuthentication, Protocol, Service, ServicePort, TargetPort,
    Workload,
};

use crate::crd;

mod authz;
mod routes;
mod traffic;

pub use authz::{authorization_policy, jwt_policy};
pub use routes::{grpc_route, http_route};
pub use traffic::traffic_policy;

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Service annotation that sends every connection to the service through the node proxy,
/// whether or not routes or L7 policy attach to it (like a waypoint opt-in).
pub const USE_PROXY_ANNOTATION: &str = "weft.dev/use-proxy";
/// The namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Namespace label opting its pods into the mesh ("enabled"); on a pod, "enabled" or
/// "disabled" overrides its namespace.
pub const MESH_LABEL: &str = "weft.dev/mesh";

/// What is wrong with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. "spec.ports[0].port".
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// The object's identity; the namespace defaults to "default".
pub fn object_ref(meta: &ObjectMeta) -> Result<ObjectRef, FieldError> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| FieldError::new("metadata.name", "missing; every object needs a name"))?;
    let namespace = meta.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(DEFAULT_NAMESPACE);
    Ok(ObjectRef::new(namespace, name))
}

pub fn service(svc: &core::Service) -> Result<Service, FieldError> {
    let id = object_ref(&svc.metadata)?;
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| FieldError::new("spec", "missing; a Service needs spec.clusterIP and spec.ports"))?;
    let cluster_ip = match (spec.type_.as_deref(), spec.cluster_ip.as_deref()) {
        // An ExternalName service is a DNS alias: no VIP to steer.
        (Some("ExternalName"), _) | (_, Some("None")) => None,
        (_, None | Some("")) => {
            let message = "missing; weft does not allocate service addresses: set an IPv4 address, or \"None\" for a headless service";
            return Err(FieldError::new("spec.clusterIP", message));
        }
        (_, Some(ip)) => Some(ipv4(ip, "spec.clusterIP")?),
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let ports = ports
        .iter()
        .enumerate()
        .map(|(i, p)| service_port(p, &format!("spec.ports[{i}]")))
        .collect::<Result<_, _>>()?;
    let l7 = match svc.metadata.annotations.as_ref().and_then(|a| a.get(USE_PROXY_ANNOTATION)).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            let field = format!("metadata.annotations[{USE_PROXY_ANNOTATION}]");
            return Err(FieldError::new(field, format!("\"{other}\" is not \"true\" or \"false\"")));
        }
    };
    Ok(Service { id, cluster_ip, ports, selector: spec.selector.clone(), l7 })
}

fn service_port(p: &core::ServicePort, field: &str) -> Result<ServicePort, FieldError> {
    let port = port_number(p.port, &format!("{field}.port"))?;
    let target_port = match &p.target_port {
        None => TargetPort::Number(port),
        Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n, &format!("{field}.targetPort"))?),
        // "8080" is a number written as a string, not a port name (names need a letter).
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) if n > 0 => TargetPort::Number(n),
            _ if !s.is_empty() => TargetPort::Name(s.clone()),
            _ => return Err(FieldError::new(format!("{field}.targetPort"), "empty; use a port number or a port name")),
        },
    };
    Ok(ServicePort {
        name: p.name.clone().filter(|n| !n.is_empty()),
        port,
        target_port,
        protocol: protocol(p.protocol.as_deref(), &format!("{field}.protocol"))?,
        app_protocol: p.app_protocol.clone(),
    })
}

/// Kubernetes leaves the protocol out for TCP.
fn protocol(value: Option<&str>, field: &str) -> Result<Protocol, FieldError> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(FieldError::new(field, format!("unknown protocol \"{other}\"; use TCP, UDP or SCTP"))),
    }
}

fn port_number(value: i32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| FieldError::new(field, format!("{value} is not a port; use a number between 1 and 65535")))
}

fn ipv4(value: &str, field: &str) -> Result<Ipv4Addr, FieldError> {
    if let Ok(ip) = value.parse() {
        return Ok(ip);
    }
    let message = if value.parse::<Ipv6Addr>().is_ok() {
        format!("{value} is an IPv6 address, which weft does not support yet; use an IPv4 address")
    } else {
        format!("\"{value}\" is not an IPv4 address; write it dotted, e.g. 10.96.0.10")
    };
    Err(FieldError::new(field, message))
}

pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSet, FieldError> {
    let id = object_ref(&slice.metadata)?;
    let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).filter(|s| !s.is_empty());
    let service = service.ok_or_else(|| {
        let message = "missing; set it to the name of the Service this slice belongs to";
        FieldError::new(format!("metadata.labels[\"{SERVICE_NAME_LABEL}\"]"), message)
    })?;
    if slice.address_type != "IPv4" {
        let message = format!("\"{}\" slices are not supported; weft reads IPv4 slices", slice.address_type);
        return Err(FieldError::new("addressType", message));
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        // Only TCP is steered.
        if protocol(p.protocol.as_deref(), &format!("ports[{i}].protocol"))? != Protocol::Tcp {
            continue;
        }
        let field = format!("ports[{i}].port");
        let number = p.port.ok_or_else(|| FieldError::new(&field, "missing; weft needs each port's number"))?;
        ports.push((p.name.clone().filter(|n| !n.is_empty()), port_number(number, &field)?));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // Kubernetes: an unknown readiness counts as ready.
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let workload = ep.target_ref.as_ref().and_then(|r| {
            // Pods and weft Workloads share names, so either identifies the workload.
            let kind_ok = matches!(r.kind.as_deref(), None | Some("Pod" | "Workload"));
            let name = r.name.as_ref().filter(|n| kind_ok && !n.is_empty())?;
            Some(ObjectRef::new(r.namespace.as_deref().unwrap_or(&id.namespace), name))
        });
        for (j, addr) in ep.addresses.iter().enumerate() {
            let ip = ipv4(addr, &format!("endpoints[{i}].addresses[{j}]"))?;
            endpoints.push(Endpoint { ip, ready, workload: workload.clone() });
        }
    }
    Ok(EndpointSet { service: ObjectRef::new(id.namespace, service), ports, endpoints })
}

pub fn workload(wl: &crd::Workload) -> Result<Workload, FieldError> {
    let id = object_ref(&wl.metadata)?;
    let spec = &wl.spec;
    let ips = spec
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| ipv4(a, &format!("spec.addresses[{i}]")))
        .collect::<Result<_, _>>()?;
    if let Some((name, _)) = spec.ports.iter().find(|(_, port)| **port == 0) {
        return Err(FieldError::new(format!("spec.ports.{name}"), "0 is not a port; use a number between 1 and 65535"));
    }
    let defaults = Workload::new(id, ips);
    Ok(Workload {
        service_account: spec.service_account.clone().filter(|sa| !sa.is_empty()).unwrap_or(defaults.service_account),
        labels: wl.metadata.labels.clone().unwrap_or_default(),
        node: spec.node.clone().filter(|n| !n.is_empty()),
        cgroup: spec.cgroup_path.as_ref().filter(|p| !p.is_empty()).map(Into::into),
        meshed: spec.meshed.unwrap_or(defaults.meshed),
        weight: spec.weight.unwrap_or(defaults.weight),
        ports: spec.ports.clone(),
        ..defaults
    })
}

/// A Pod as a workload of this node's snapshot, or `None` for a pod that has no part in it:
/// not Running, without an IPv4 address, or on the host's network (it shares the node's
/// address).
///
/// It is meshed (weft's programs attach to it) when opted in: its namespace has
/// [`MESH_LABEL`]`: enabled`, unless the pod's own [`MESH_LABEL`] says otherwise. A pod that is
/// not Ready is kept (its identity still matters) at weight 0, so it gets no new connections.
/// Its cgroup is left for the caller to find on the node.
pub fn pod(pod: &core::Pod, namespace_labels: Option<&BTreeMap<String, String>>) -> Result<Option<Workload>, FieldError> {
    let id = object_ref(&pod.metadata)?;
    let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
        return Ok(None);
    };
    if spec.host_network == Some(true) || status.phase.as_deref() != Some("Running") {
        return Ok(None);
    }
    let mut ips = Vec::new();
    let pod_ips =
        status.pod_ips.iter().flatten().enumerate().map(|(i, p)| (p.ip.as_str(), format!("status.podIPs[{i}].ip")));
    // podIPs repeats podIP first; older API servers only set podIP.
    let pod_ip = status.pod_ip.as_deref().map(|ip| (ip, "status.podIP".to_owned()));
    for (ip, field) in pod_ips.chain(pod_ip) {
        if ip.contains(':') {
            continue;
        }
        let ip = ipv4(ip, &field)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }

    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let namespace_enabled = namespace_labels.and_then(|l| l.get(MESH_LABEL)).is_some_and(|v| v == "enabled");
    let meshed = match labels.get(MESH_LABEL).map(String::as_str) {
        None => namespace_enabled,
        Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            let field = format!("metadata.labels[\"{MESH_LABEL}\"]");
            return Err(FieldError::new(field, format!("\"{other}\" is not \"enabled\" or \"disabled\"")));
        }
    };
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");

    let mut ports = BTreeMap::new();
    for (i, container) in spec.containers.iter().enumerate() {
        for (j, port) in container.ports.iter().flatten().enumerate() {
            let Some(name) = port.name.as_ref().filter(|n| !n.is_empty()) else { continue };
            let field = format!("spec.containers[{i}].ports[{j}].containerPort");
            // Kubernetes keeps port names unique within a pod; the first one stands.
            ports.entry(name.clone()).or_insert(port_number(port.container_port, &field)?);
        }
    }

    let defaults = Workload::new(id, ips);
    Ok(Some(Workload {
        service_account: spec
            .service_account_name
            .clone()
            .filter(|sa| !sa.is_empty())
            .unwrap_or(defaults.service_account),
        labels,
        node: spec.node_name.clone().filter(|n| !n.is_empty()),
        meshed,
        weight: if ready { defaults.weight } else { 0 },
        ports,
        ..defaults
    }))
}

/// A Node's name and the first InternalIP in `status.addresses`: where its proxy accepts
/// tunnels.
pub fn node(node: &core::Node) -> Result<Node, FieldError> {
    let name = node.metadata.name.as_deref().filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| FieldError::new("metadata.name", "missing; every object needs a name"))?;
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or_default();
    let Some((i, internal)) = addresses.iter().enumerate().find(|(_, a)| a.type_ == "InternalIP" && !a.address.contains(':'))
    else {
        let message = "no IPv4 InternalIP; list the node's address as {type: InternalIP, address: <IPv4>}";
        return Err(FieldError::new("status.addresses", message));
    };
    let field = format!("status.addresses[{i}].address");
    let address = ipv4(&internal.address, &field)?;
    if address.is_unspecified() || address.is_loopback() || address.is_broadcast() || address.is_multicast() {
        return Err(FieldError::new(field, format!("{address} is not a node address other nodes can reach")));
    }
    Ok(Node { name: name.to_owned(), address })
}

pub fn peer_authentication(policy: &crd::PeerAuthentication) -> Result<PeerAuthentication, FieldError> {
    let id = object_ref(&policy.metadata)?;
    let selector = match &policy.spec.selector {
        Some(sel) if sel.match_labels.is_empty() => {
            let message = "empty; name at least one label, or leave selector out for the whole namespace";
            return Err(FieldError::new("spec.selector.matchLabels", message));
        }
        Some(sel) => Some(sel.match_labels.clone()),
        None => None,
    };
    let mode = match policy.spec.mtls.mode {
        crd::MtlsMode::Permissive => MtlsMode::Permissive,
        crd::MtlsMode::Strict => MtlsMode::Strict,
    };
    Ok(PeerAuthentication { id, selector, mode })
}
