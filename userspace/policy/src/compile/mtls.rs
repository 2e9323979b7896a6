//! PeerAuthentication and the tunnel: each workload's mTLS mode, and how remote meshed
//! workloads are reached.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use serde::Serialize;

use super::Rejection;
use crate::model::{MESH_NAMESPACE, MtlsMode, Node, ObjectRef, PeerAuthentication, TUNNEL_PORT, Workload};

/// A workload's mode and the policy that set it (`None`: the PERMISSIVE default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MtlsState {
    pub mode: MtlsMode,
    pub policy: Option<ObjectRef>,
}

/// A meshed workload on another node, reached through that node's tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TunnelPeer {
    pub workload: ObjectRef,
    pub service_account: String,
    pub node: String,
    /// The node proxy's tunnel listener.
    pub tunnel: SocketAddrV4,
    pub mode: MtlsMode,
}

/// The PeerAuthentications in force: at most one per scope, the others rejected.
pub(super) struct Modes<'a> {
    mesh: Option<&'a PeerAuthentication>,
    namespaces: BTreeMap<&'a str, Option<&'a PeerAuthentication>>,
    selectors: Vec<&'a PeerAuthentication>,
}

impl<'a> Modes<'a> {
    /// `policies` sorted by id, so which of two conflicting policies wins is the same on every
    /// node.
    pub(super) fn new(policies: &[&'a PeerAuthentication], rejected: &mut Vec<Rejection>) -> Modes<'a> {
        let mut modes = Modes { mesh: None, namespaces: BTreeMap::new(), selectors: Vec::new() };
        let mut previous: Option<&ObjectRef> = None;
        for &policy in policies {
            if previous.replace(&policy.id) == Some(&policy.id) {
                let (field, reason) = super::defined_twice();
                rejected.push(Rejection::new("PeerAuthentication", &policy.id, field, reason));
                continue;
            }
            match &policy.selector {
                Some(labels) if labels.is_empty() => {
                    let reason = "an empty selector selects nothing; name at least one label, or leave selector out for the whole namespace";
                    rejected.push(Rejection::new(
                        "PeerAuthentication",
                        &policy.id,
                        "spec.selector.matchLabels",
                        reason,
                    ));
                }
                Some(_) => modes.selectors.push(policy),
                None => {
                    let ns = policy.id.namespace.as_str();
                    let slot =
                        if ns == MESH_NAMESPACE { &mut modes.mesh } else { modes.namespaces.entry(ns).or_default() };
                    match slot {
                        Some(first) => {
                            let reason = format!(
                                "PeerAuthentication {} already sets the mode of {}; keep one policy without a selector per namespace",
                                first.id,
                                if ns == MESH_NAMESPACE {
                                    "the whole mesh".to_owned()
                                } else {
                                    format!("namespace {ns}")
                                },
                            );
                            rejected.push(Rejection::new("PeerAuthentication", &policy.id, "spec.selector", reason));
                        }
                        None => *slot = Some(policy),
                    }
                }
            }
        }
        modes
    }

    /// The most specific policy selecting `wl`: a selector in its namespace (the first by name
    /// if several match), its namespace's, the mesh's, or PERMISSIVE.
    pub(super) fn of(&self, wl: &Workload) -> MtlsState {
        let selected = |p: &&&PeerAuthentication| {
            p.id.namespace == wl.id.namespace
                && p.selector.as_ref().is_some_and(|sel| wl.has_labels(sel))
        };
        let policy = self
            .selectors
            .iter()
            .find(selected)
            .copied()
            .or_else(|| self.namespaces.get(wl.id.namespace.as_str()).copied().flatten())
            .or(self.mesh);
        match policy {
            Some(p) => MtlsState { mode: p.mode, policy: Some(p.id.clone()) },
            None => MtlsState { mode: MtlsMode::Permissive, policy: None },
        }
    }
}

/// Tunnel addresses of the nodes that have one; the first Node of a name wins.
pub(super) fn node_tunnels(nodes: &[Node]) -> BTreeMap<&str, SocketAddrV4> {
    let mut out = BTreeMap::new();
    for node in nodes {
        out.entry(node.name.as_str()).or_insert(SocketAddrV4::new(node.address, TUNNEL_PORT));
    }
    out
}
