//! weft's own resources, `weft.dev/v1alpha1`. `kube::CustomResourceExt::crd()` renders their
//! CustomResourceDefinitions; the doc comments become the schema's descriptions.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Something weft meshes: a pod, VM or process, known by its addresses. Its labels (in
/// metadata) are what Service selectors match.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "Workload", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Identity for authorization policy; defaults to "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// IPv4 addresses of the workload.
    pub addresses: Vec<String>,
    /// The workload's cgroup (on its node), where weft attaches; without one it is not meshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<String>,
    /// The node it runs on; absent means the node reading this config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Whether weft's programs steer the workload's connections; defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meshed: Option<bool>,
    /// Share of traffic among a service's backends, 0 (drained) to 1000000; defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000))]
    pub weight: Option<u32>,
    /// Named ports, for Services whose targetPort is a name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

/// L4 authorization for connections to services, enforced where they are opened.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "weft.dev", version = "v1alpha1", kind = "AuthorizationPolicy", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// What the policy protects: Services in its namespace, or its whole Namespace.
    pub target_refs: Vec<TargetRef>,
    pub action: PolicyAction,
    /// ALLOW: connections matching a rule are allowed, all others denied. DENY: connections
    /// matching a rule are denied.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// "" (the core group).
    #[serde(default)]
    pub group: String,
    /// "Service" or "Namespace".
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyAction {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches a connection when any `from` entry matches its source (or `from` is empty) and any
/// `to` entry matches its port (or `to` is empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub from: Vec<PolicySource>,
    #[serde(default)]
    pub to: Vec<PolicyDestination>,
}

/// Matches a source when every non-empty list matches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// "namespace/name", or "name" for the policy's namespace.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// SPIFFE ids, spiffe://cluster.local/ns/<ns>/sa/<sa>; a trailing "*" matches any suffix.
    #[serde(default)]
    pub principals: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDestination {
    /// Service ports.
    #[serde(default)]
    pub ports: Vec<u16>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn crds_render() {
        for (crd, kind) in [(Workload::crd(), "Workload"), (AuthorizationPolicy::crd(), "AuthorizationPolicy")] {
            assert_eq!(crd.spec.group, "weft.dev");
            assert_eq!(crd.spec.names.kind, kind);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.versions.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v1alpha1"]);
            let yaml = serde_yaml::to_string(&crd).unwrap();
            assert!(yaml.contains("openAPIV3Schema"), "{yaml}");
        }
    }
}
