//! The controller's install manifests (`manifests/base/controller-*.yaml`) parse into their
//! Kubernetes types, grant exactly what the controller's code uses ([`CLUSTER_GRANTS`],
//! [`NAMESPACE_GRANTS`]), and run it unprivileged with flags it accepts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use weft_controller::app::Args;
use weft_controller::{CLUSTER_GRANTS, Grant, NAMESPACE_GRANTS};

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base")
}

/// The one object of `kind` in the controller's manifests.
fn one<T: DeserializeOwned>(kind: &str) -> T {
    let mut found = Vec::new();
    for file in ["controller-rbac.yaml", "controller-deployment.yaml"] {
        let text = std::fs::read_to_string(base().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if value["kind"].as_str() == Some(kind) {
                found.push((file, value));
            }
        }
    }
    assert_eq!(found.len(), 1, "one {kind} in the controller's manifests");
    let (file, value) = found.pop().unwrap();
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{file}: not a valid {kind}: {e}"))
}

/// (group, resource) -> verbs, merged over rules.
fn rules(rules: Vec<PolicyRule>) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in rules {
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                out.entry((group.clone(), resource)).or_default().extend(rule.verbs.iter().cloned());
            }
        }
    }
    out
}

fn grants(grants: &[Grant]) -> BTreeMap<(String, String), BTreeSet<String>> {
    grants
        .iter()
        .map(|g| ((g.group.to_owned(), g.resource.to_owned()), g.verbs.iter().map(|v| (*v).to_owned()).collect()))
        .collect()
}

fn is_controller_account(subjects: Option<Vec<Subject>>, sa: &ServiceAccount) {
    let subjects = subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!((subjects[0].kind.as_str(), Some(&subjects[0].name)), ("ServiceAccount", sa.metadata.name.as_ref()));
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn the_roles_grant_exactly_what_the_code_uses() {
    let sa: ServiceAccount = one("ServiceAccount");
    let cluster: ClusterRole = one("ClusterRole");
    assert_eq!(rules(cluster.rules.unwrap_or_default()), grants(&CLUSTER_GRANTS));
    let role: Role = one("Role");
    assert_eq!(role.metadata.namespace, sa.metadata.namespace, "the Lease is in the controller's namespace");
    let role_rules = role.rules.unwrap_or_default();
    // Reads and writes of existing objects are narrowed to the controller's own Lease, CA
    // Secret and bundle ConfigMap (create cannot be; agents' pods have generated names).
    let lease = Args::try_parse_from(["weft-controller", "--identity=x"]).unwrap().lease_name;
    for rule in &role_rules {
        if rule.verbs.iter().any(|v| v != "create") {
            let own = match rule.resources.as_deref().unwrap_or_default() {
                [r] if r == "leases" => Some(vec![lease.clone()]),
                [r] if r == "secrets" => Some(vec![weft_kube::issuance::CA_SECRET.to_owned()]),
                [r] if r == "configmaps" => Some(vec![weft_kube::issuance::BUNDLE_CONFIG_MAP.to_owned()]),
                [r] if r == "pods" => None,
                other => panic!("a Role rule for {other:?}"),
            };
            assert_eq!(rule.resource_names, own, "{rule:?}");
        }
    }
    assert_eq!(rules(role_rules), grants(&NAMESPACE_GRANTS));
    // What issuance declares it needs in the controller's namespace is granted there.
    for (group, resource, verb) in weft_kube::issuance::NAMESPACE_ACCESS {
        assert!(NAMESPACE_GRANTS.iter().any(|g| (g.group, g.resource) == (group, resource) && g.verbs.contains(&verb)));
    }

    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, cluster.metadata.name.unwrap());
    is_controller_account(binding.subjects, &sa);
    let binding: RoleBinding = one("RoleBinding");
    assert_eq!((binding.role_ref.kind.as_str(), Some(&binding.role_ref.name)), ("Role", role.metadata.name.as_ref()));
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    is_controller_account(binding.subjects, &sa);
}

#[test]
fn the_deployment_runs_unprivileged_with_flags_the_controller_accepts() {
    let deployment: Deployment = one("Deployment");
    let sa: ServiceAccount = one("ServiceAccount");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2), "a standby takes over when the leader goes");
    let pod_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).expect("pod labels");
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    assert_ne!(pod.host_network, Some(true));
    let pod_security = pod.security_context.expect("pod securityContext");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(pod_security.seccomp_profile.map(|p| p.type_), Some("RuntimeDefault".into()));

    let [controller] = pod.containers.as_slice() else { panic!("one container") };
    let security = controller.security_context.clone().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let caps = security.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(caps.add.unwrap_or_default(), Vec::<String>::new(), "no capability added");

    // The pod name is the Lease holder.
    let env = controller.env.clone().unwrap_or_default();
    let pod_name = env.iter().find(|e| e.name == "POD_NAME").expect("POD_NAME");
    let field = pod_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("metadata.name"));

    // The controller accepts its arguments; the admin port is the probed one.
    let mut argv = vec!["weft-controller".to_owned(), "--identity=pod-a".to_owned()];
    argv.extend(controller.args.clone().unwrap_or_default());
    let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    args.lease().check().expect("consistent lease timings");
    let ports = controller.ports.clone().unwrap_or_default();
    let admin = ports.iter().find(|p| p.name.as_deref() == Some("admin")).expect("admin port");
    assert_eq!(admin.container_port, i32::from(args.admin_addr.port()));
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().and_then(|p| p.http_get.clone()).expect("an HTTP probe");
        (get.path.unwrap_or_default(), get.port)
    };
    assert_eq!(probe(&controller.readiness_probe), ("/readyz".into(), IntOrString::String("admin".into())));
    assert_eq!(probe(&controller.liveness_probe), ("/healthz".into(), IntOrString::String("admin".into())));
    let resources = controller.resources.clone().expect("resources");
    assert!(resources.requests.is_some() && resources.limits.is_some());

    // The Service and the disruption budget select these pods; one always stays.
    let service: Service = one("Service");
    let service_spec = service.spec.expect("service spec");
    let selector = service_spec.selector.expect("selector");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{selector:?} vs {pod_labels:?}");
    let target = service_spec.ports.unwrap_or_default().into_iter().map(|p| p.target_port).collect::<Vec<_>>();
    assert_eq!(target, [Some(IntOrString::String("issuance".into())), Some(IntOrString::String("admin".into()))]);
    let issuance = ports.iter().find(|p| p.name.as_deref() == Some("issuance")).expect("issuance port");
    assert_eq!(issuance.container_port, i32::from(args.issuance_addr.port()));
    assert!(!args.no_issuance, "every replica issues certificates");
    let pdb: PodDisruptionBudget = one("PodDisruptionBudget");
    let pdb = pdb.spec.expect("pdb spec");
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    let pdb_labels = pdb.selector.and_then(|s| s.match_labels).expect("pdb selector");
    assert!(pdb_labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
}
