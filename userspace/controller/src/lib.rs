//! weft's controller: a small Deployment beside the node agents.
//!
//! Every replica watches the cluster ([`cluster`]) and serves its admin port ([`admin`]); the
//! replica holding the `weft-controller` Lease ([`leader`]) also writes status conditions and
//! Events ([`status`]) for weft's CRDs and for HTTPRoutes and GRPCRoutes whose parent is a
//! Service, judged by the same conversion and compiler the agents run. [`app::run`] wires it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cluster;
pub mod leader;
pub mod metrics;
pub mod status;

/// The field manager of every write, and the reporting controller of every Event.
pub const MANAGER: &str = "weft-controller";

/// One RBAC rule's worth of access the controller uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// API group; "" for the core group.
    pub group: &'static str,
    /// Plural resource, with its subresource after a slash.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

const READ: &[&str] = &["list", "watch"];
const WRITE_STATUS: &[&str] = &["patch"];

/// Everything the controller does cluster-wide (its ClusterRole, checked by a test): it watches
/// what [`cluster::Cluster`] reflects, applies the status of what [`status`] judges, posts
/// Events through kube-runtime's recorder (create, then patch for a repeat), and for
/// certificate issuance reviews agents' tokens and lists the pods of their nodes.
pub const CLUSTER_GRANTS: [Grant; 18] = [
    Grant { group: "", resource: "services", verbs: READ },
    Grant { group: "gateway.networking.k8s.io", resource: "httproutes", verbs: READ },
    Grant { group: "gateway.networking.k8s.io", resource: "grpcroutes", verbs: READ },
    Grant { group: "weft.dev", resource: "workloads", verbs: READ },
    Grant { group: "weft.dev", resource: "authorizationpolicies", verbs: READ },
    Grant { group: "weft.dev", resource: "jwtpolicies", verbs: READ },
    Grant { group: "weft.dev", resource: "trafficpolicies", verbs: READ },
    Grant { group: "weft.dev", resource: "peerauthentications", verbs: READ },
    Grant { group: "gateway.networking.k8s.io", resource: "httproutes/status", verbs: WRITE_STATUS },
    Grant { group: "gateway.networking.k8s.io", resource: "grpcroutes/status", verbs: WRITE_STATUS },
    Grant { group: "weft.dev", resource: "workloads/status", verbs: WRITE_STATUS },
    Grant { group: "weft.dev", resource: "authorizationpolicies/status", verbs: WRITE_STATUS },
    Grant { group: "weft.dev", resource: "jwtpolicies/status", verbs: WRITE_STATUS },
    Grant { group: "weft.dev", resource: "trafficpolicies/status", verbs: WRITE_STATUS },
    Grant { group: "weft.dev", resource: "peerauthentications/status", verbs: WRITE_STATUS },
    Grant { group: "events.k8s.io", resource: "events", verbs: &["create", "patch"] },
    Grant { group: "authentication.k8s.io", resource: "tokenreviews", verbs: &["create"] },
    Grant { group: "", resource: "pods", verbs: &["list"] },
];

/// What the controller does in its own namespace (its Role): leader election reads the Lease,
/// creates it when absent and updates it (renew, take over, release); issuance reads (or first
/// creates) the CA's Secret, applies the trust bundle's ConfigMap (server-side apply is
/// authorized as `create` when the object is new) and reads an agent's pod to learn its node
/// when the token does not name it.
pub const NAMESPACE_GRANTS: [Grant; 4] = [
    Grant { group: "coordination.k8s.io", resource: "leases", verbs: &["get", "create", "update"] },
    Grant { group: "", resource: "secrets", verbs: &["get", "create"] },
    Grant { group: "", resource: "configmaps", verbs: &["create", "patch"] },
    Grant { group: "", resource: "pods", verbs: &["get"] },
];

/// The grant for a request, if any: `verb` on `resource` of `group` (subresources as
/// "resource/sub"). Tests check every request the controller makes against this.
pub fn granted(group: &str, resource: &str, verb: &str) -> bool {
    CLUSTER_GRANTS
        .iter()
        .chain(&NAMESPACE_GRANTS)
        .any(|g| g.group == group && g.resource == resource && g.verbs.contains(&verb))
}
