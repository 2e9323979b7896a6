//! The status writer against a fake API server: conditions and Events for weft's CRDs, GAMMA
//! parent statuses for routes, no repeated writes, and only requests the controller's RBAC
//! grants.
//!
//! Time is paused (tokio's clock jumps whenever every task waits): debounces and watcher
//! backoff cost no wall time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../kube/tests/mock/mod.rs"]
mod mock;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use http::Method;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::Resource;
use mock::{ApiServer, until};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
use weft_controller::cluster::Cluster;
use weft_controller::metrics::Metrics;
use weft_controller::status::{self, CONTROLLER_NAME};
use weft_controller::{CLUSTER_GRANTS, granted};

fn every_kind() -> Vec<fn(&ApiServer)> {
    vec![
        ApiServer::serve::<Service>,
        ApiServer::serve::<HttpRoute>,
        ApiServer::serve::<GrpcRoute>,
        ApiServer::serve::<Workload>,
        ApiServer::serve::<AuthorizationPolicy>,
        ApiServer::serve::<JwtPolicy>,
        ApiServer::serve::<TrafficPolicy>,
        ApiServer::serve::<PeerAuthentication>,
        ApiServer::serve::<Event>,
    ]
}

fn object<K: DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).expect("fixture matches its type")
}

fn service(name: &str, ip: &str) -> Service {
    object(json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
    }))
}

fn authorization(name: &str, method: &str) -> AuthorizationPolicy {
    object(json!({
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], "action": "ALLOW",
                 "rules": [{"to": [{"methods": [method]}]}]},
    }))
}

/// The status writer, leading, on a fake API server holding `fixtures`.
struct Harness {
    server: ApiServer,
    metrics: Arc<Metrics>,
    _cluster: Arc<Cluster>,
    writer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Harness {
    fn start(fixtures: impl FnOnce(&ApiServer)) -> Self {
        let (server, client) = ApiServer::start(&every_kind());
        fixtures(&server);
        let cluster = Arc::new(Cluster::start(&client, Duration::from_millis(100)));
        let metrics = Arc::new(Metrics::new());
        let writer = tokio::spawn(status::run(client, cluster.clone(), metrics.clone(), "controller-a".into()));
        Self { server, metrics, _cluster: cluster, writer }
    }

    /// The object's status once `check` accepts it.
    async fn status_of<K: Resource<DynamicType = ()>>(&self, name: &str, check: impl Fn(&Value) -> bool) -> Value {
        until(&self.server, &format!("the status of {} shop/{name}", K::kind(&())), || {
            let status = self.server.get::<K>("shop", name)?["status"].clone();
            check(&status).then_some(status)
        })
        .await
    }

    fn status_writes(&self, plural: &str, name: &str) -> usize {
        self.server.writes(&Method::PATCH, &format!("/{plural}/{name}/status")).len()
    }

    fn events(&self) -> Vec<Value> {
        self.server.writes(&Method::POST, "/events").into_iter().map(|r| r.body).collect()
    }

    /// Lets every watch deliver and every debounce fire.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    /// Every request the controller made is one its RBAC grants.
    fn assert_granted(&self) {
        assert!(!self.writer.is_finished(), "the writer is still running");
        for request in self.server.requests() {
            let (group, resource, verb) = mock::rbac_of(&request);
            assert!(granted(&group, &resource, &verb), "{verb} {resource} ({group:?}) is not granted: {request:?}");
        }
    }
}

fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
    conditions.as_array().and_then(|c| c.iter().find(|c| c["type"] == type_)).unwrap_or(&Value::Null)
}

#[tokio::test(start_paused = true)]
async fn authorization_policies_get_accepted_or_a_reason_and_a_warning() {
    let h = Harness::start(|s| {
        s.apply(&service("web", "10.96.0.10"));
        s.apply(&authorization("good", "GET"));
        s.apply(&authorization("bad", "get"));
    });
    let bad = h.status_of::<AuthorizationPolicy>("bad", |s| !s["conditions"].is_null()).await;
    let accepted = condition(&bad["conditions"], "Accepted");
    assert_eq!((accepted["status"].as_str(), accepted["reason"].as_str()), (Some("False"), Some("Invalid")), "{bad}");
    let message = accepted["message"].as_str().unwrap();
    assert!(message.starts_with("spec.rules[0].to[0].methods[0]: \"get\" is not an HTTP method"), "{message}");
    assert_eq!(accepted["observedGeneration"], 1);
    assert_eq!(bad["observedGeneration"], 1);

    let good = h.status_of::<AuthorizationPolicy>("good", |s| !s["conditions"].is_null()).await;
    assert_eq!(condition(&good["conditions"], "Accepted")["status"], "True", "{good}");
    assert_eq!(condition(&good["conditions"], "ResolvedRefs")["reason"], "ResolvedRefs", "{good}");

    // A Warning Event on the rejected policy, from weft-controller.
    let events = until(&h.server, "a Warning Event", || Some(h.events()).filter(|e| !e.is_empty())).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let event = &events[0];
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("Invalid")));
    assert_eq!(event["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(event["regarding"]["name"], "bad");
    assert_eq!(event["reportingController"], "weft-controller");
    assert!(event["note"].as_str().unwrap().contains("spec.rules[0].to[0].methods[0]"), "{event}");

    // The apply is server-side apply, by weft-controller, forced.
    let write = &h.server.writes(&Method::PATCH, "/authorizationpolicies/bad/status")[0];
    assert!(
        write.query.contains("fieldManager=weft-controller") && write.query.contains("force=true"),
        "{}",
        write.query
    );

    // Unrelated changes recompute, but nothing changed for these two: no write, no Event.
    h.settle().await;
    h.server.apply(&service("other", "10.96.0.11"));
    h.settle().await;
    assert_eq!(
        (h.status_writes("authorizationpolicies", "bad"), h.status_writes("authorizationpolicies", "good")),
        (1, 1)
    );
    assert_eq!(h.events().len(), 1, "one Event per rejection, not per recompute");

    // Fixed: accepted again, and the transition time moves with the status.
    h.server.apply(&authorization("bad", "POST"));
    let fixed = h
        .status_of::<AuthorizationPolicy>("bad", |s| condition(&s["conditions"], "Accepted")["status"] == "True")
        .await;
    assert_eq!(condition(&fixed["conditions"], "Accepted")["observedGeneration"], 2);
    let metrics = h.metrics.encode().unwrap();
    assert!(
        metrics.contains("weft_controller_status_writes_total{kind=\"AuthorizationPolicy\",result=\"written\"} 3"),
        "{metrics}"
    );
    h.assert_granted();
}

#[tokio::test(start_paused = true)]
async fn a_traffic_policy_on_a_missing_service_does_not_resolve() {
    let h = Harness::start(|s| {
        s.apply(&service("web", "10.96.0.10"));
        s.apply(&object::<TrafficPolicy>(json!({
            "metadata": {"name": "slow", "namespace": "shop"},
            "spec": {"targetRefs": [{"kind": "Service", "name": "web"}, {"kind": "Service", "name": "gone"}],
                     "timeouts": {"request": "5s"}},
        })));
    });
    let status = h.status_of::<TrafficPolicy>("slow", |s| !s["conditions"].is_null()).await;
    assert_eq!(condition(&status["conditions"], "Accepted")["status"], "True", "valid, applied to web: {status}");
    let refs = condition(&status["conditions"], "ResolvedRefs");
    assert_eq!((refs["status"].as_str(), refs["reason"].as_str()), (Some("False"), Some("TargetNotFound")), "{status}");
    let message = refs["message"].as_str().unwrap();
    assert!(message.starts_with("spec.targetRefs[1]: Service shop/gone does not exist"), "{message}");
    h.settle().await;
    assert!(h.events().is_empty(), "an accepted object gets no Warning");

    // The Service appears: resolved.
    h.server.apply(&service("gone", "10.96.0.12"));
    h.status_of::<TrafficPolicy>("slow", |s| condition(&s["conditions"], "ResolvedRefs")["status"] == "True").await;
    h.assert_granted();
}

#[tokio::test(start_paused = true)]
async fn mesh_routes_get_a_parent_entry_of_their_own() {
    let other = json!({
        "parentRef": {"name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    let other_entry = other.clone();
    let h = Harness::start(move |s| {
        s.apply(&service("reviews", "10.96.0.10"));
        s.apply(&object::<HttpRoute>(json!({
            "metadata": {"name": "split", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
                     "rules": [{"backendRefs": [{"name": "reviews", "port": 80}, {"name": "missing", "port": 80}]}]},
            "status": {"parents": [other_entry]},
        })));
        s.apply(&object::<HttpRoute>(json!({
            "metadata": {"name": "orphan", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "nope"}],
                     "rules": [{"backendRefs": [{"name": "reviews", "port": 80}]}]},
        })));
    });
    let status = h.status_of::<HttpRoute>("split", |s| s["parents"].as_array().is_some_and(|p| p.len() == 2)).await;
    let parents = status["parents"].as_array().unwrap();
    assert_eq!(parents[0], other, "another controller's entry is kept as it was");
    let ours = &parents[1];
    assert_eq!(ours["controllerName"], CONTROLLER_NAME);
    assert_eq!(ours["parentRef"], json!({"group": "", "kind": "Service", "name": "reviews", "port": 80}));
    assert_eq!(condition(&ours["conditions"], "Accepted")["status"], "True", "{ours}");
    let refs = condition(&ours["conditions"], "ResolvedRefs");
    assert_eq!((refs["status"].as_str(), refs["reason"].as_str()), (Some("False"), Some("BackendNotFound")), "{ours}");
    assert!(
        refs["message"].as_str().unwrap().contains("spec.rules[0].backendRefs[1]: Service shop/missing does not exist")
    );
    // The apply carried the version it read, so a concurrent writer's entry is never undone.
    let write = &h.server.writes(&Method::PATCH, "/httproutes/split/status")[0];
    assert!(write.body["metadata"]["resourceVersion"].is_string(), "{}", write.body);

    let orphan = h.status_of::<HttpRoute>("orphan", |s| !s["parents"].is_null()).await;
    let accepted = condition(&orphan["parents"][0]["conditions"], "Accepted");
    assert_eq!((accepted["status"].as_str(), accepted["reason"].as_str()), (Some("False"), Some("NoMatchingParent")));
    let warned = until(&h.server, "a Warning for the orphan route", || {
        h.events().into_iter().find(|e| e["regarding"]["name"] == "orphan")
    })
    .await;
    assert_eq!(warned["reason"], "NoMatchingParent");

    // Settled: recomputing finds nothing to change.
    h.settle().await;
    h.server.apply(&service("unrelated", "10.96.0.13"));
    h.settle().await;
    assert_eq!((h.status_writes("httproutes", "split"), h.status_writes("httproutes", "orphan")), (1, 1));
    assert_eq!(h.events().len(), 1);
    h.assert_granted();
}

#[tokio::test(start_paused = true)]
async fn the_grants_name_exactly_what_is_watched_and_written() {
    let (_server, client) = ApiServer::start(&every_kind());
    let cluster = Cluster::start(&client, Duration::from_millis(100));
    let with = |verbs: &[&str]| -> BTreeSet<(String, String)> {
        CLUSTER_GRANTS
            .iter()
            .filter(|g| g.verbs == verbs)
            .map(|g| (g.group.to_owned(), g.resource.to_owned()))
            .collect()
    };
    let reflected: BTreeSet<(String, String)> = cluster.reflected().iter().cloned().collect();
    assert_eq!(with(&["list", "watch"]), reflected, "list/watch grants = the reflectors");
    let written: BTreeSet<(String, String)> = status::written().into_iter().collect();
    assert_eq!(with(&["patch"]), written, "status patch grants = the kinds judged");
    let events = with(&["create", "patch"]);
    assert_eq!(events, BTreeSet::from([("events.k8s.io".to_owned(), "events".to_owned())]), "the Event recorder");
    // Certificate issuance, exactly as weft-kube declares it (its tests hold every request to that).
    let issuance: BTreeSet<(String, String)> = CLUSTER_GRANTS
        .iter()
        .flat_map(|g| g.verbs.iter().map(move |v| (g.group, g.resource, *v)))
        .filter(|access| weft_kube::issuance::CLUSTER_ACCESS.contains(access))
        .map(|(group, resource, _)| (group.to_owned(), resource.to_owned()))
        .collect();
    assert_eq!(issuance.len(), weft_kube::issuance::CLUSTER_ACCESS.len(), "issuance's cluster access is granted");
    assert_eq!(reflected.len() + written.len() + events.len() + issuance.len(), CLUSTER_GRANTS.len(), "nothing else");
}
