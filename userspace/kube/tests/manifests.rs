//! The install manifests (`manifests/base`) parse into their Kubernetes types, grant the agent
//! exactly what its reflectors use (list and watch on [`weft_kube::KINDS`]) and run it without
//! privileged mode, with only the capabilities it needs. (The controller's manifests are
//! checked against its code in `userspace/controller/tests/manifests.rs`.)

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Namespace, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use serde::Deserialize;
use serde_yaml::Value;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/base")
}

/// Every document of every file in `manifests/base`, as (file, kind, value).
fn documents() -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(base()).expect("manifests/base").map(|e| e.expect("entry").path()).collect();
    files.sort();
    for file in files.iter().filter(|f| f.file_name().is_some_and(|n| n != "kustomization.yaml")) {
        let text = std::fs::read_to_string(file).expect("read manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = value["kind"].as_str().unwrap_or_else(|| panic!("{}: a document without kind", file.display()));
            out.push((file.display().to_string(), kind.to_owned(), value));
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents().into_iter().filter(|(_, k, _)| k == kind).collect();
    assert_eq!(docs.len(), 1, "one {kind} in manifests/base");
    let (file, _, value) = docs.into_iter().next().expect("one");
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{file}: not a valid {kind}: {e}"))
}

/// The agent's object of `kind` (the controller has its own of some kinds).
fn agent<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents()
        .into_iter()
        .filter(|(_, k, v)| k == kind && v["metadata"]["name"].as_str() == Some("weft-agent"))
        .collect();
    assert_eq!(docs.len(), 1, "one {kind} weft-agent in manifests/base");
    let (file, _, value) = docs.into_iter().next().expect("one");
    serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{file}: not a valid {kind}: {e}"))
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, kind: &str, value: &Value) {
    let _: T = serde_yaml::from_value(value.clone()).unwrap_or_else(|e| panic!("{file}: not a valid {kind}: {e}"));
}

#[test]
fn every_manifest_parses_into_its_type() {
    let docs = documents();
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ])
    );
    for (file, kind, value) in &docs {
        match kind.as_str() {
            "Namespace" => parse::<Namespace>(file, kind, value),
            "ServiceAccount" => parse::<ServiceAccount>(file, kind, value),
            "ClusterRole" => parse::<ClusterRole>(file, kind, value),
            "ClusterRoleBinding" => parse::<ClusterRoleBinding>(file, kind, value),
            "Role" => parse::<Role>(file, kind, value),
            "RoleBinding" => parse::<RoleBinding>(file, kind, value),
            "DaemonSet" => parse::<DaemonSet>(file, kind, value),
            "Deployment" => parse::<Deployment>(file, kind, value),
            "Service" => parse::<Service>(file, kind, value),
            "PodDisruptionBudget" => parse::<PodDisruptionBudget>(file, kind, value),
            other => panic!("{file}: no check for kind {other}"),
        }
    }
    let _: Namespace = one("Namespace");
    let _: DaemonSet = one("DaemonSet");

    // The kustomization names every manifest and every CRD, and only files that exist.
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(base().join("kustomization.yaml")).expect("kustomization")).expect("yaml");
    let listed: BTreeSet<String> =
        kustomization["resources"].as_sequence().expect("resources").iter().map(|r| r.as_str().expect("a path").to_owned()).collect();
    for resource in &listed {
        assert!(base().join(resource).is_file(), "kustomization lists {resource}, which does not exist");
    }
    let crds = std::fs::read_dir(base().join("../crds")).expect("crds");
    for crd in crds.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()) {
        assert!(listed.contains(&format!("../crds/{crd}")), "kustomization misses ../crds/{crd}");
    }
}

#[test]
fn the_agent_may_list_and_watch_exactly_what_it_watches() {
    let role: ClusterRole = agent("ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        assert_eq!(verbs, BTreeSet::from(["list", "watch"]), "the agent only reads: {verbs:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                granted.insert(if group.is_empty() { resource } else { format!("{resource}.{group}") });
            }
        }
    }
    let watched: BTreeSet<String> = weft_kube::KINDS.iter().map(|k| k.api_resource().to_owned()).collect();
    assert_eq!(granted, watched, "granted resources are the watched ones, no more, no fewer");

    let binding: ClusterRoleBinding = agent("ClusterRoleBinding");
    let sa: ServiceAccount = agent("ServiceAccount");
    assert_eq!(binding.role_ref.name, role.metadata.name.expect("role name"));
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), Some(&subject.name)), ("ServiceAccount", sa.metadata.name.as_ref()));
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

#[test]
fn the_daemonset_runs_unprivileged_with_the_capabilities_it_needs() {
    let ds: DaemonSet = one("DaemonSet");
    let sa: ServiceAccount = agent("ServiceAccount");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true), "the proxy and tunnel listen on the node's address");
    assert_eq!(pod.service_account_name, sa.metadata.name);
    let agent = &pod.containers[0];
    let args = agent.args.clone().unwrap_or_default();
    for flag in ["--kube", "--node-name=$(NODE_NAME)", "--cgroup-root=/host/sys/fs/cgroup", "--admin-addr=$(NODE_IP):15020"] {
        assert!(args.iter().any(|a| a == flag), "args have {flag}: {args:?}");
    }
    let security = agent.security_context.clone().expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let caps = security.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]));
    let added: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let wanted = ["BPF", "NET_ADMIN", "PERFMON", "SYS_PTRACE"].map(String::from);
    assert_eq!(added, BTreeSet::from(wanted), "no SYS_ADMIN");
    // Pods' processes are visible: their network namespaces get weft_sk_lookup.
    assert_eq!(pod.host_pid, Some(true));
    let mounts: BTreeSet<String> = agent.volume_mounts.iter().flatten().map(|m| m.mount_path.clone()).collect();
    assert!(mounts.contains("/sys/fs/bpf") && mounts.contains("/host/sys/fs/cgroup"), "{mounts:?}");
    for m in agent.volume_mounts.iter().flatten() {
        assert_ne!(m.mount_propagation.as_deref(), Some("Bidirectional"), "Bidirectional needs privileged");
    }
    let ready = agent.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness probe");
    assert_eq!(ready.path.as_deref(), Some("/ready"));
    assert!(agent.liveness_probe.is_some());
    let resources = agent.resources.clone().expect("resources");
    assert!(resources.requests.is_some() && resources.limits.is_some());
}

/// The agent asks weft-controller's issuer for certificates with a token meant for it alone,
/// at the issuer's port, and checks the issuer against the bundle the controller publishes.
#[test]
fn the_agent_is_set_up_for_the_controllers_issuer() {
    use weft_kube::issuance::{BUNDLE_CONFIG_MAP, BUNDLE_KEY, ISSUANCE_PORT, TOKEN_AUDIENCE};
    let daemon_set: DaemonSet = one("DaemonSet");
    let pod = daemon_set.spec.and_then(|s| s.template.spec).expect("pod spec");
    let agent = &pod.containers[0];
    let args = agent.args.clone().unwrap_or_default();
    let arg = |flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
            .unwrap_or_else(|| panic!("the agent runs with --{flag}"))
            .to_owned()
    };
    // The controller's Service, at the issuance port.
    let service: k8s_openapi::api::core::v1::Service = one("Service");
    let (name, namespace) = (service.metadata.name.expect("name"), service.metadata.namespace.expect("namespace"));
    let port = service.spec.and_then(|s| s.ports).unwrap_or_default().into_iter().find(|p| p.name.as_deref() == Some("issuance"));
    assert_eq!(port.map(|p| p.port), Some(i32::from(ISSUANCE_PORT)));
    assert_eq!(arg("issuer-addr"), format!("{name}.{namespace}.svc:{ISSUANCE_PORT}"));
    let mounted = |path: &str| {
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| path.starts_with(&format!("{}/", m.mount_path)))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{path} is on a mounted volume"));
        let file = path.strip_prefix(&format!("{}/", mount.mount_path)).expect("under the mount").to_owned();
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mount's volume");
        (volume.clone(), file)
    };
    let (token, file) = mounted(&arg("issuer-token"));
    let projected = token.projected.expect("a projected token").sources.expect("sources");
    let sa_token = projected.iter().find_map(|s| s.service_account_token.clone()).expect("a service-account token");
    assert_eq!((sa_token.audience.as_deref(), sa_token.path.as_str()), (Some(TOKEN_AUDIENCE), file.as_str()));
    let (bundle, file) = mounted(&arg("trust-bundle"));
    assert_eq!(bundle.config_map.expect("the bundle's ConfigMap").name, BUNDLE_CONFIG_MAP);
    assert_eq!(file, BUNDLE_KEY);
}

/// The image (`Containerfile`) builds and ships the binaries the manifests run, with the
/// agent as its entrypoint, and its build context leaves out the build output.
#[test]
fn the_image_holds_what_the_manifests_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let containerfile = std::fs::read_to_string(root.join("Containerfile")).expect("Containerfile");
    let built: BTreeSet<&str> = containerfile
        .split("cargo build --release")
        .nth(1)
        .expect("a cargo build --release step")
        .split("&&")
        .next()
        .expect("the command")
        .split_whitespace()
        .filter(|w| !["-p", "\\"].contains(w))
        .collect();
    let shipped: BTreeSet<&str> = containerfile
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("the final stage copies the binaries")
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("/usr/local/bin/").filter(|b| !b.is_empty()))
        .collect();
    assert_eq!(built, shipped, "every package built is shipped");
    for package in &built {
        let manifest = ["agent", "controller", "weftctl"]
            .iter()
            .map(|dir| std::fs::read_to_string(root.join("userspace").join(dir).join("Cargo.toml")).expect("Cargo.toml"))
            .find(|m| m.contains(&format!("name = \"{package}\"")));
        assert!(manifest.is_some(), "{package} is a package of this workspace with a binary of that name");
    }
    assert!(containerfile.contains("ENTRYPOINT [\"/usr/local/bin/weft-agent\"]"), "the agent is the entrypoint");

    let daemonset: DaemonSet = agent("DaemonSet");
    let controller: Deployment = one("Deployment");
    let containers = |spec: Option<k8s_openapi::api::core::v1::PodSpec>| spec.expect("pod spec").containers;
    let agent_container = &containers(daemonset.spec.expect("spec").template.spec)[0];
    assert_eq!(agent_container.command, None, "the agent runs as the entrypoint");
    let controller_container = &containers(controller.spec.expect("spec").template.spec)[0];
    let command = controller_container.command.clone().expect("the controller names its binary");
    let binary = command[0].strip_prefix("/usr/local/bin/").expect("a shipped path");
    assert!(shipped.contains(binary), "{binary} is in the image");
    assert_eq!(agent_container.image, controller_container.image, "one image");

    let ignored = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    for path in ["/target", "/.git"] {
        assert!(ignored.lines().any(|l| l == path), "the build context leaves out {path}");
    }
}
