//! Pods as workloads: which pods take part, which are meshed, and what they carry.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use weft_api::convert::{self, MESH_LABEL};
use weft_policy::{ObjectRef, Workload};

/// A Running, Ready pod of namespace "shop" on node-a with one named port.
fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "reviews-v1-abc", "namespace": "shop", "uid": "u1", "labels": {"app": "reviews"}},
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": "reviews",
            "containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 9080}, {"containerPort": 9090}]},
                {"name": "metrics", "ports": [{"name": "metrics", "containerPort": 15090}]}
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.1.0.7",
            "podIPs": [{"ip": "10.1.0.7"}, {"ip": "fd00::7"}],
            "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn with(mut value: Value, pointer: &str, new: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let key = key.replace("~1", "/");
    let key = key.as_str();
    let target = value.pointer_mut(parent).unwrap();
    match new {
        Value::Null => {
            target.as_object_mut().unwrap().remove(key);
        }
        new => target[key] = new,
    }
    value
}

fn convert(value: Value, namespace: Option<&str>) -> Result<Option<Workload>, convert::FieldError> {
    let pod: Pod = serde_json::from_value(value).unwrap();
    let labels: Option<BTreeMap<String, String>> =
        namespace.map(|v| BTreeMap::from([(MESH_LABEL.to_owned(), v.to_owned())]));
    convert::pod(&pod, labels.as_ref())
}

#[test]
fn a_running_pod_is_a_workload_of_its_node() {
    let wl = convert(pod(), Some("enabled")).unwrap().unwrap();
    assert_eq!(wl.id, ObjectRef::new("shop", "reviews-v1-abc"));
    assert_eq!(wl.ips, ["10.1.0.7".parse::<std::net::Ipv4Addr>().unwrap()], "IPv4 only, once");
    assert_eq!(wl.service_account, "reviews");
    assert_eq!(wl.node.as_deref(), Some("node-a"));
    assert_eq!(wl.labels, BTreeMap::from([("app".into(), "reviews".into())]));
    assert_eq!(wl.ports, BTreeMap::from([("http".into(), 9080), ("metrics".into(), 15090)]));
    assert_eq!((wl.meshed, wl.weight), (true, 1));
    assert_eq!(wl.cgroup, None, "the caller finds the cgroup");

    let wl = convert(with(pod(), "/spec/serviceAccountName", Value::Null), None).unwrap().unwrap();
    assert_eq!(wl.service_account, "default");
}

#[test]
fn namespace_opts_in_and_the_pod_label_overrides() {
    let labelled =
        |value: &str| with(pod(), &format!("/metadata/labels/{}", MESH_LABEL.replace('/', "~1")), json!(value));
    let cases = [
        ("namespace enabled", pod(), Some("enabled"), true),
        ("namespace unlabelled", pod(), None, false),
        ("namespace label other than enabled", pod(), Some("disabled"), false),
        ("pod disabled in an enabled namespace", labelled("disabled"), Some("enabled"), false),
        ("pod enabled in an unlabelled namespace", labelled("enabled"), None, true),
        ("pod enabled in a disabled namespace", labelled("enabled"), Some("disabled"), true),
    ];
    for (name, value, namespace, meshed) in cases {
        let wl = convert(value, namespace).unwrap().unwrap_or_else(|| panic!("{name}: left out"));
        assert_eq!(wl.meshed, meshed, "{name}");
    }
    let error = convert(labelled("yes"), Some("enabled")).unwrap_err();
    assert_eq!(error.field, "metadata.labels[\"weft.dev/mesh\"]");
    assert!(error.message.contains("\"yes\" is not"), "{error}");
}

#[test]
fn pods_without_a_part_are_left_out() {
    let cases = [
        ("pending", with(pod(), "/status/phase", json!("Pending"))),
        ("succeeded", with(pod(), "/status/phase", json!("Succeeded"))),
        ("no status", with(pod(), "/status", Value::Null)),
        ("no address yet", with(with(pod(), "/status/podIPs", Value::Null), "/status/podIP", Value::Null)),
        (
            "IPv6 only",
            with(with(pod(), "/status/podIPs", json!([{"ip": "fd00::7"}])), "/status/podIP", json!("fd00::7")),
        ),
        ("host network", with(pod(), "/spec/hostNetwork", json!(true))),
    ];
    for (name, value) in cases {
        assert_eq!(convert(value, Some("enabled")), Ok(None), "{name}");
    }
}

#[test]
fn a_pod_that_is_not_ready_gets_no_new_connections() {
    let not_ready = with(pod(), "/status/conditions", json!([{"type": "Ready", "status": "False"}]));
    let wl = convert(not_ready, Some("enabled")).unwrap().unwrap();
    assert_eq!((wl.meshed, wl.weight), (true, 0), "kept, meshed, drained");
    let unknown = with(pod(), "/status/conditions", Value::Null);
    assert_eq!(convert(unknown, Some("enabled")).unwrap().unwrap().weight, 0);
}

#[test]
fn bad_fields_are_named() {
    let error = convert(with(pod(), "/status/podIPs", json!([{"ip": "10.1.0"}])), None).unwrap_err();
    assert_eq!(error.field, "status.podIPs[0].ip");
    let port = with(pod(), "/spec/containers/0/ports/0/containerPort", json!(70000));
    let error = convert(port, None).unwrap_err();
    assert_eq!(error.field, "spec.containers[0].ports[0].containerPort");
}
