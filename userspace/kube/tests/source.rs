//! The Kubernetes source against a fake API server: lists and watches become snapshots, opt-in
//! labels decide what is meshed, deletions leave, outages keep the last snapshot, and nothing is
//! published before every kind is listed.
//!
//! Time is paused (tokio's test clock advances whenever every task waits), so the watchers'
//! backoff and the debounce cost no wall time; each wait is still bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mock;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use mock::ApiServer;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::watch;
use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
use weft_kube::{Config, Source, Update};
use weft_policy::{NodeSettings, ObjectRef};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(60);

fn every_kind() -> Vec<fn(&ApiServer)> {
    vec![
        ApiServer::serve::<Pod>,
        ApiServer::serve::<Namespace>,
        ApiServer::serve::<Service>,
        ApiServer::serve::<EndpointSlice>,
        ApiServer::serve::<Node>,
        ApiServer::serve::<HttpRoute>,
        ApiServer::serve::<GrpcRoute>,
        ApiServer::serve::<Workload>,
        ApiServer::serve::<AuthorizationPolicy>,
        ApiServer::serve::<JwtPolicy>,
        ApiServer::serve::<TrafficPolicy>,
        ApiServer::serve::<PeerAuthentication>,
    ]
}

fn object<K: DeserializeOwned>(value: serde_json::Value) -> K {
    serde_json::from_value(value).expect("fixture matches its type")
}

fn namespace(name: &str, mesh: Option<&str>) -> Namespace {
    let labels = mesh.map(|m| json!({"weft.dev/mesh": m})).unwrap_or(json!({}));
    object(json!({"metadata": {"name": name, "labels": labels}}))
}

/// A Running, Ready Burstable pod on this node.
fn pod(namespace: &str, name: &str, ip: &str, labels: serde_json::Value) -> Pod {
    object(json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "labels": labels,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"nodeName": NODE, "serviceAccountName": name, "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "Burstable",
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))
}

fn service(namespace: &str, name: &str, cluster_ip: &str) -> Service {
    object(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
}

/// A fake cgroup v2 mount, removed on drop.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("weft-kube-source-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kubepods/burstable")).unwrap();
        Self(dir)
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The source under test, on a fake API server.
struct Harness {
    server: ApiServer,
    source: Source,
    updates: watch::Receiver<Option<Arc<Update>>>,
    cgroups: CgroupRoot,
}

impl Harness {
    fn start(served: &[fn(&ApiServer)], fixtures: impl FnOnce(&ApiServer)) -> Self {
        let (server, client) = ApiServer::start(served);
        fixtures(&server);
        let cgroups = CgroupRoot::new();
        let node = NodeSettings { node_name: NODE.into(), proxy: None, skmsg: false };
        let config = Config { cgroup_root: cgroups.0.clone(), ..Config::new(node) };
        let source = Source::start(client, config);
        let updates = source.updates();
        Self { server, source, updates, cgroups }
    }

    /// Waits until the published update satisfies `check`, and returns it.
    async fn until(&mut self, what: &str, check: impl Fn(&Update) -> bool) -> Arc<Update> {
        let wait = async {
            loop {
                if let Some(update) = self.updates.borrow_and_update().clone().filter(|u| check(u)) {
                    return update;
                }
                self.updates.changed().await.expect("source running");
            }
        };
        tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| {
            let last = self.updates.borrow().clone();
            panic!("timed out waiting for {what}; last update: {last:#?}; requests: {:#?}", self.server.request_lines())
        })
    }
}

fn workload<'a>(update: &'a Update, namespace: &str, name: &str) -> Option<&'a weft_policy::Workload> {
    update.snapshot.workloads.iter().find(|w| w.id == ObjectRef::new(namespace, name))
}

fn meshed(update: &Update) -> Vec<String> {
    update.snapshot.workloads.iter().filter(|w| w.meshed).map(|w| w.id.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn lists_become_a_snapshot() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&pod("shop", "reviews", "10.1.0.7", json!({"app": "reviews"})));
        s.apply(&service("shop", "reviews", "10.96.0.10"));
        s.apply(&object::<EndpointSlice>(json!({
            "metadata": {"name": "reviews-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "reviews"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.1.0.7"]}, {"addresses": ["10.2.0.9"]}],
        })));
        s.apply(&object::<Node>(json!({
            "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}], "images": [{"names": ["big"]}]},
        })));
        s.apply(&object::<HttpRoute>(json!({
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                     "rules": [{"backendRefs": [{"name": "reviews", "port": 80}]}]},
        })));
        s.apply(&object::<AuthorizationPolicy>(json!({
            "metadata": {"name": "reviews-viewers", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Service", "name": "reviews"}], "action": "ALLOW",
                     "rules": [{"from": [{"namespaces": ["shop"]}]}]},
        })));
        s.apply(&object::<Workload>(json!({
            "metadata": {"name": "legacy-vm", "namespace": "shop"},
            "spec": {"addresses": ["10.3.0.1"], "node": "vm-host", "meshed": false},
        })));
    });
    let pod_cgroup = h.cgroups.0.join("kubepods/burstable/poduid-reviews");
    std::fs::create_dir_all(&pod_cgroup).unwrap();

    let update = h.until("the first snapshot", |_| true).await;
    assert!(h.source.is_ready(), "published only once ready");
    assert!(update.errors.is_empty(), "{:?}", update.errors);
    let s = &update.snapshot;
    let reviews = workload(&update, "shop", "reviews").expect("the pod is a workload");
    assert_eq!(reviews.ips, ["10.1.0.7".parse::<std::net::Ipv4Addr>().unwrap()]);
    assert_eq!(
        (reviews.service_account.as_str(), reviews.node.as_deref(), reviews.meshed),
        ("reviews", Some(NODE), true)
    );
    assert_eq!(reviews.cgroup.as_deref(), Some(pod_cgroup.as_path()), "cgroup found from the pod's UID and QoS");
    assert_eq!(reviews.ports.get("http"), Some(&8080));
    assert!(workload(&update, "shop", "legacy-vm").is_some(), "weft Workloads too");
    assert_eq!(s.services.iter().map(|s| s.id.to_string()).collect::<Vec<_>>(), ["shop/reviews"]);
    assert_eq!(s.endpoints.len(), 1);
    assert_eq!(s.endpoints[0].endpoints.len(), 2);
    assert_eq!(s.routes.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), ["shop/reviews"]);
    assert_eq!(s.policies.len(), 1);
    assert_eq!(
        s.nodes.iter().map(|n| (n.name.as_str(), n.address.to_string())).collect::<Vec<_>>(),
        [(NODE, "192.168.0.1".into())]
    );
    assert_eq!(update.objects, 7, "everything but the namespace");

    // The snapshot compiles: the meshed pod gets attached, the route hands the service to the proxy.
    let compiled = weft_policy::compile(&update.snapshot);
    assert!(compiled.rejected.is_empty(), "{:?}", compiled.rejected);
    assert!(compiled.attachments.contains_key("shop/reviews"), "{:?}", compiled.attachments.keys());

    let requests = h.server.request_lines();
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/pods?") && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "pods are listed for this node only: {requests:#?}"
    );
}

#[tokio::test(start_paused = true)]
async fn namespace_and_pod_labels_opt_in() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&namespace("plain", None));
        s.apply(&pod("shop", "a", "10.1.0.1", json!({})));
        s.apply(&pod("shop", "b", "10.1.0.2", json!({"weft.dev/mesh": "disabled"})));
        s.apply(&pod("plain", "c", "10.1.0.3", json!({})));
        s.apply(&pod("plain", "d", "10.1.0.4", json!({"weft.dev/mesh": "enabled"})));
        s.apply(&pod("plain", "e", "10.1.0.5", json!({"weft.dev/mesh": "yes"})));
    });
    let update = h.until("the first snapshot", |_| true).await;
    assert_eq!(meshed(&update), ["plain/d", "shop/a"]);
    assert_eq!(update.snapshot.workloads.len(), 4, "opted-out pods are still known workloads");
    let errors: Vec<String> = update.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["Pod plain/e: metadata.labels[\"weft.dev/mesh\"]: \"yes\" is not \"enabled\" or \"disabled\""],
        "a bad label is reported and that pod left out"
    );

    // Labelling the namespace later meshes its pods that do not opt out.
    h.server.apply(&namespace("plain", Some("enabled")));
    let update = h.until("plain/c meshed", |u| meshed(u).contains(&"plain/c".to_owned())).await;
    assert_eq!(meshed(&update), ["plain/c", "plain/d", "shop/a"]);
}

#[tokio::test(start_paused = true)]
async fn watch_events_add_change_and_remove_workloads() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&pod("shop", "a", "10.1.0.1", json!({})));
        s.apply(&pod("shop", "b", "10.1.0.2", json!({})));
    });
    h.until("both pods", |u| u.snapshot.workloads.len() == 2).await;

    h.server.apply(&pod("shop", "c", "10.1.0.3", json!({})));
    h.until("the added pod", |u| workload(u, "shop", "c").is_some()).await;

    let mut not_ready = pod("shop", "a", "10.1.0.1", json!({}));
    not_ready.status.as_mut().unwrap().conditions = None;
    h.server.apply(&not_ready);
    h.until("a drained", |u| workload(u, "shop", "a").is_some_and(|w| w.weight == 0)).await;

    h.server.delete(&pod("shop", "b", "10.1.0.2", json!({})));
    let update = h.until("b gone", |u| workload(u, "shop", "b").is_none()).await;
    let names: Vec<String> = update.snapshot.workloads.iter().map(|w| w.id.to_string()).collect();
    assert_eq!(names, ["shop/a", "shop/c"]);
}

/// Pods of other nodes are workloads there: reached through their node's tunnel with their
/// own identity, never attached here. They come from a second watch, so this node's pods
/// still come from a watch of this node only.
#[tokio::test(start_paused = true)]
async fn other_nodes_pods_are_reached_through_their_node() {
    let mut db = pod("shop", "db", "10.2.0.5", json!({"app": "db"}));
    db.spec.as_mut().unwrap().node_name = Some("node-b".into());
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&pod("shop", "web", "10.1.0.7", json!({"app": "web"})));
        s.apply(&db);
        s.apply(&object::<Node>(json!({
            "metadata": {"name": "node-b"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}]},
        })));
        s.apply(&object::<PeerAuthentication>(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}},
        })));
    });
    std::fs::create_dir_all(h.cgroups.0.join("kubepods/burstable/poduid-web")).unwrap();
    let update = h.until("both pods", |u| u.snapshot.workloads.len() == 2).await;
    let remote = workload(&update, "shop", "db").expect("the other node's pod");
    assert_eq!(
        (remote.node.as_deref(), remote.service_account.as_str(), remote.meshed, remote.cgroup.as_ref()),
        (Some("node-b"), "db", true, None),
        "its node, identity and opt-in, and no cgroup looked for here"
    );
    assert_eq!(remote.ports.get("http"), Some(&8080), "named ports survive the trimming");
    assert_eq!(remote.weight, 1, "readiness survives the trimming");

    let compiled = weft_policy::compile(&update.snapshot);
    assert!(compiled.rejected.is_empty(), "{:?}", compiled.rejected);
    let peer = &compiled.tunnel[&"10.2.0.5".parse().unwrap()];
    assert_eq!((peer.node.as_str(), peer.service_account.as_str()), ("node-b", "db"));
    assert_eq!(compiled.attachments.keys().collect::<Vec<_>>(), ["shop/web"], "only this node's pod is attached");

    let requests = h.server.request_lines();
    for selector in ["spec.nodeName%3Dnode-a", "spec.nodeName%21%3Dnode-a"] {
        assert!(
            requests.iter().any(|r| r.starts_with("/api/v1/pods?") && r.contains(selector)),
            "pods watched with {selector}: {requests:#?}"
        );
    }

    h.server.delete(&db);
    let update = h.until("db gone", |u| workload(u, "shop", "db").is_none()).await;
    assert!(workload(&update, "shop", "web").is_some());
}

#[tokio::test(start_paused = true)]
async fn an_outage_keeps_the_last_snapshot() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&pod("shop", "a", "10.1.0.1", json!({})));
        s.apply(&service("shop", "a", "10.96.0.1"));
    });
    let before = h.until("the first snapshot", |_| true).await;
    let requests = h.server.request_lines().len();

    h.server.go_down();
    // Long enough for every watcher to fail and back off several times.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(h.server.request_lines().len() > requests + KINDS, "the watchers kept retrying");
    assert!(!h.updates.has_changed().unwrap(), "nothing published while the API server is down");
    let current = h.updates.borrow().clone().unwrap();
    assert!(Arc::ptr_eq(&current, &before), "the last snapshot stays");
    assert!(h.source.is_ready(), "still ready: the stores keep their objects");

    // Back up: the watchers resume and new changes flow again.
    h.server.come_back();
    h.server.apply(&pod("shop", "b", "10.1.0.2", json!({})));
    let update = h.until("the pod added after the outage", |u| workload(u, "shop", "b").is_some()).await;
    assert!(workload(&update, "shop", "a").is_some());
    assert_eq!(update.snapshot.services.len(), 1);
}

const KINDS: usize = weft_kube::KINDS.len();

#[tokio::test(start_paused = true)]
async fn nothing_is_published_until_every_kind_is_listed() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.hold::<GrpcRoute>();
        s.apply(&namespace("shop", Some("enabled")));
        s.apply(&pod("shop", "a", "10.1.0.1", json!({})));
    });
    let mut readiness = h.source.readiness();
    let wait = readiness.wait_for(|w| w.len() == 1);
    let waiting = tokio::time::timeout(WAIT, wait).await.expect("every other kind listed").unwrap().clone();
    assert_eq!(waiting, ["grpcroutes.gateway.networking.k8s.io"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!h.source.is_ready());
    assert!(h.updates.borrow().is_none(), "no snapshot from a partial view");

    h.server.release::<GrpcRoute>();
    let update = h.until("the first snapshot", |_| true).await;
    assert!(h.source.is_ready() && h.source.waiting_for().is_empty());
    assert!(workload(&update, "shop", "a").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_bad_object_is_reported_and_the_rest_applies() {
    let mut h = Harness::start(&every_kind(), |s| {
        s.apply(&service("shop", "good", "10.96.0.1"));
        s.apply(&service("shop", "bad", "10.96.0"));
    });
    let update = h.until("the first snapshot", |_| true).await;
    assert_eq!(update.snapshot.services.iter().map(|s| s.id.to_string()).collect::<Vec<_>>(), ["shop/good"]);
    let error = &update.errors[..];
    assert_eq!(error.len(), 1, "{error:?}");
    assert_eq!((error[0].object.as_str(), error[0].field.as_deref()), ("Service shop/bad", Some("spec.clusterIP")));

    // Fixed: it joins, and the error goes.
    h.server.apply(&service("shop", "bad", "10.96.0.2"));
    let update = h.until("the fixed service", |u| u.snapshot.services.len() == 2).await;
    assert!(update.errors.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_kind_the_api_server_does_not_serve_is_empty() {
    // No Gateway API CRDs on this cluster.
    let served: Vec<_> =
        every_kind().into_iter().enumerate().filter(|(i, _)| ![5, 6].contains(i)).map(|(_, s)| s).collect();
    let mut h = Harness::start(&served, |s| s.apply(&service("shop", "a", "10.96.0.1")));
    let update = h.until("the first snapshot", |_| true).await;
    assert!(update.snapshot.routes.is_empty());
    assert_eq!(update.snapshot.services.len(), 1);
    assert!(h.server.request_lines().iter().any(|r| r.starts_with(&HttpRoute::url_path(&(), None))));
}

/// `weftctl analyze` on a live cluster: one list of each kind, pods of every node, the same
/// conversion; bad objects reported, an uninstalled CRD empty, an unreachable server an error.
#[tokio::test]
async fn the_cluster_listed_once_builds_the_same_snapshot() {
    let served: Vec<_> =
        every_kind().into_iter().enumerate().filter(|(i, _)| ![5, 6].contains(i)).map(|(_, s)| s).collect();
    let (server, client) = ApiServer::start(&served);
    server.apply(&namespace("shop", Some("enabled")));
    server.apply(&pod("shop", "web", "10.0.0.5", json!({"app": "web"})));
    let mut elsewhere = pod("shop", "db", "10.0.1.7", json!({"app": "db"}));
    elsewhere.spec.as_mut().unwrap().node_name = Some("node-b".into());
    server.apply(&elsewhere);
    server.apply(&service("shop", "web", "10.96.0.1"));
    server.apply(&service("shop", "bad", "10.96.0"));
    let node = NodeSettings { node_name: "weftctl".into(), proxy: None, skmsg: false };

    let update = weft_kube::list_snapshot(&client, node.clone()).await.expect("listed");
    let workloads: Vec<String> = update.snapshot.workloads.iter().map(|w| w.id.to_string()).collect();
    assert_eq!(workloads, ["shop/db", "shop/web"], "pods of every node");
    assert!(update.snapshot.workloads.iter().all(|w| w.meshed && w.cgroup.is_none()));
    assert_eq!(update.snapshot.services.iter().map(|s| s.id.to_string()).collect::<Vec<_>>(), ["shop/web"]);
    assert_eq!(update.errors.len(), 1);
    assert_eq!(update.errors[0].object, "Service shop/bad");
    assert!(update.snapshot.routes.is_empty(), "no Gateway API CRDs: no routes, no error");
    assert!(server.request_lines().iter().all(|r| !r.contains("watch=true")), "listed, not watched");

    server.go_down();
    let error = weft_kube::list_snapshot(&client, node).await.expect_err("the server is down").to_string();
    assert!(error.contains("listing") && error.contains("KUBECONFIG"), "{error}");
}
