//! The leader's status writer: after each burst of changes ([`crate::cluster`]) it judges every
//! object ([`judge`]) and applies what differs from what the object shows.
//!
//! Writes are server-side apply on the status subresource (field manager `weft-controller`,
//! forced). weft's CRDs carry only weft's conditions. A route's `status.parents` is one atomic
//! list shared with other controllers (Gateway API does not make it a map), so weft applies the
//! other controllers' entries as it read them plus its own, with the `resourceVersion` it read:
//! a concurrent write by someone else makes the apply fail with 409 instead of being undone,
//! and the next pass starts from the new version. A condition keeps its `lastTransitionTime`
//! while its status stays; nothing is written when nothing changed. When an object stops being
//! accepted a Warning Event says why, once.

pub mod judge;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;
use weft_api::crd::{self, AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};

pub use judge::{CONTROLLER_NAME, Judged, ParentVerdict, RouteKind, Verdict, WeftKind};

use crate::MANAGER;
use crate::cluster::{Cluster, Stores};
use crate::metrics::{Metrics, WriteResult};

/// How long after a failed write the objects are judged again, changes or not.
const RETRY: Duration = Duration::from_secs(5);

/// Judges and writes until aborted (the leader-only supervisor aborts it when the lease is lost).
pub async fn run(client: Client, cluster: Arc<Cluster>, metrics: Arc<Metrics>, identity: String) -> anyhow::Result<()> {
    let reporter = Reporter { controller: MANAGER.into(), instance: Some(identity) };
    let mut writer =
        Writer { client: client.clone(), recorder: Recorder::new(client, reporter), metrics, sent: BTreeMap::new() };
    let mut changes = cluster.changes();
    let mut retry: Option<Instant> = None;
    loop {
        if *changes.borrow_and_update() > 0 {
            let failed = writer.pass(cluster.stores()).await;
            retry = (failed > 0).then(|| Instant::now() + RETRY);
        }
        tokio::select! {
            changed = changes.changed() => changed?,
            () = sleep_until(retry), if retry.is_some() => {}
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// An object's identity across kinds.
type Key = (&'static str, String, String);

struct Writer {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// What was last applied to each object, and the resourceVersion it was based on: until the
    /// store moves past that version the store's copy is stale, and writing again would repeat.
    sent: BTreeMap<Key, (Option<String>, Value)>,
}

// === impl Writer ===

impl Writer {
    /// One pass over every object; returns how many writes failed.
    async fn pass(&mut self, stores: &Stores) -> usize {
        let mut failed = 0;
        for verdict in judge::judge(stores) {
            let ok = match verdict {
                Verdict::Weft { kind, namespace, name, conditions } => match kind {
                    WeftKind::Workload => self.weft(&stores.workloads, &namespace, &name, conditions).await,
                    WeftKind::AuthorizationPolicy => {
                        self.weft(&stores.authorization_policies, &namespace, &name, conditions).await
                    }
                    WeftKind::JwtPolicy => self.weft(&stores.jwt_policies, &namespace, &name, conditions).await,
                    WeftKind::TrafficPolicy => self.weft(&stores.traffic_policies, &namespace, &name, conditions).await,
                    WeftKind::PeerAuthentication => {
                        self.weft(&stores.peer_authentications, &namespace, &name, conditions).await
                    }
                },
                Verdict::Route { kind: RouteKind::Http, namespace, name, parents } => {
                    self.route(&stores.http_routes, &namespace, &name, parents).await
                }
                Verdict::Route { kind: RouteKind::Grpc, namespace, name, parents } => {
                    self.route(&stores.grpc_routes, &namespace, &name, parents).await
                }
            };
            failed += usize::from(!ok);
        }
        // Forget objects that are gone.
        let live = |(kind, ns, name): &Key| match *kind {
            "HTTPRoute" => present(&stores.http_routes, ns, name),
            "GRPCRoute" => present(&stores.grpc_routes, ns, name),
            "Workload" => present(&stores.workloads, ns, name),
            "AuthorizationPolicy" => present(&stores.authorization_policies, ns, name),
            "JwtPolicy" => present(&stores.jwt_policies, ns, name),
            "TrafficPolicy" => present(&stores.traffic_policies, ns, name),
            _ => present(&stores.peer_authentications, ns, name),
        };
        self.sent.retain(|key, _| live(key));
        failed
    }

    /// Applies a weft object's conditions if they differ; false if the write failed.
    async fn weft<K>(&mut self, store: &Store<K>, namespace: &str, name: &str, judged: Vec<Judged>) -> bool
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + HasStatus<Status = crd::Status>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let Some(object) = store.get(&ObjectRef::new(name).within(namespace)) else { return true };
        let generation = object.meta().generation;
        let current = object.status().map(|s| s.conditions.as_slice()).unwrap_or_default();
        let conditions = conditions(judged, current, generation);
        let status = crd::Status { observed_generation: generation, conditions };
        let desired = json!(status);
        if object.status().map(|s| json!(s)) == Some(desired.clone()) {
            return true;
        }
        let was = accepted(current);
        let now = accepted(&status.conditions);
        let patch = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"name": name},
            "status": desired,
        });
        let ok = self.apply::<K>(&*object, namespace, name, patch, desired).await;
        if ok && was.0 != Some(false) && now.0 == Some(false) {
            self.warn(&*object, now.1, now.2).await;
        }
        ok
    }

    /// Applies a route's `status.parents`: other controllers' entries as read, then weft's.
    async fn route<K>(&mut self, store: &Store<K>, namespace: &str, name: &str, verdicts: Vec<ParentVerdict>) -> bool
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Serialize
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let Some(object) = store.get(&ObjectRef::new(name).within(namespace)) else { return true };
        let generation = object.meta().generation;
        let current: Vec<Value> = serde_json::to_value(&*object)
            .ok()
            .and_then(|v| v.pointer("/status/parents").and_then(Value::as_array).cloned())
            .unwrap_or_default();
        let (ours, others): (Vec<Value>, Vec<Value>) =
            current.iter().cloned().partition(|p| p["controllerName"] == json!(CONTROLLER_NAME));
        if verdicts.is_empty() && ours.is_empty() {
            // Not a mesh route, and weft never wrote to it.
            return true;
        }
        let mut parents = others;
        let mut flipped = None;
        for verdict in verdicts {
            let before = ours.iter().find(|p| p["parentRef"] == verdict.parent_ref);
            let before: Vec<Condition> =
                before.and_then(|p| serde_json::from_value(p["conditions"].clone()).ok()).unwrap_or_default();
            let conditions = conditions(verdict.conditions, &before, generation);
            let now = accepted(&conditions);
            if accepted(&before).0 != Some(false) && now.0 == Some(false) && flipped.is_none() {
                flipped = Some((now.1.to_owned(), now.2));
            }
            parents.push(
                json!({"parentRef": verdict.parent_ref, "controllerName": CONTROLLER_NAME, "conditions": conditions}),
            );
        }
        let desired = Value::Array(parents);
        if Value::Array(current) == desired {
            return true;
        }
        let patch = json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "metadata": {"name": name, "resourceVersion": object.resource_version()},
            "status": {"parents": desired},
        });
        let ok = self.apply::<K>(&*object, namespace, name, patch, desired).await;
        if ok && let Some((reason, message)) = flipped {
            self.warn(&*object, &reason, message).await;
        }
        ok
    }

    async fn apply<K>(&mut self, object: &K, namespace: &str, name: &str, patch: Value, desired: Value) -> bool
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let kind: &'static str = kind_name::<K>();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let version = object.resource_version();
        if self.sent.get(&key) == Some(&(version.clone(), desired.clone())) {
            // Written already; the watch has not brought the new version yet.
            return true;
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams::apply(MANAGER).force();
        match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
            Ok(_) => {
                tracing::debug!(kind, namespace, name, "status written");
                self.metrics.status_write(kind, WriteResult::Written);
                self.sent.insert(key, (version, desired));
                true
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(kind, namespace, name, "status changed meanwhile; judging again on the new version");
                self.metrics.status_write(kind, WriteResult::Conflict);
                true
            }
            Err(error) => {
                tracing::warn!(
                    kind,
                    namespace,
                    name,
                    %error,
                    "cannot write status; may the controller's ServiceAccount patch its status subresource? retrying"
                );
                self.metrics.status_write(kind, WriteResult::Failed);
                false
            }
        }
    }

    async fn warn<K: Resource<DynamicType = ()>>(&self, object: &K, reason: &str, message: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            // The API caps a note at 1 kB.
            note: Some(message.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, "cannot post an Event; may the controller's ServiceAccount create events (events.k8s.io)?");
        }
    }
}

fn present<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespace: &str, name: &str) -> bool {
    store.get(&ObjectRef::new(name).within(namespace)).is_some()
}

/// The kind's name as a static string, for metric labels and the write cache.
fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "HTTPRoute" => "HTTPRoute",
        "GRPCRoute" => "GRPCRoute",
        "Workload" => "Workload",
        "AuthorizationPolicy" => "AuthorizationPolicy",
        "JwtPolicy" => "JwtPolicy",
        "TrafficPolicy" => "TrafficPolicy",
        _ => "PeerAuthentication",
    }
}

/// Judged conditions as API conditions: a condition whose status did not change keeps its
/// transition time; a new or changed one gets now (whole seconds, as the API stores it).
pub fn conditions(judged: Vec<Judged>, current: &[Condition], generation: Option<i64>) -> Vec<Condition> {
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now());
    judged
        .into_iter()
        .map(|j| {
            let status = if j.status { "True" } else { "False" };
            let since = current.iter().find(|c| c.type_ == j.type_ && c.status == status);
            Condition {
                type_: j.type_.to_owned(),
                status: status.to_owned(),
                reason: j.reason.to_owned(),
                message: j.message,
                observed_generation: generation,
                last_transition_time: since.map_or(Time(now), |c| c.last_transition_time.clone()),
            }
        })
        .collect()
}

/// The Accepted condition's status (true/false), reason and message.
fn accepted(conditions: &[Condition]) -> (Option<bool>, &str, String) {
    match conditions.iter().find(|c| c.type_ == "Accepted") {
        Some(c) => (Some(c.status == "True").filter(|_| c.status != "Unknown"), &c.reason, c.message.clone()),
        None => (None, "", String::new()),
    }
}

/// Every kind the writer applies status to, as (API group, plural): for the RBAC check.
pub fn written() -> Vec<(String, String)> {
    fn of<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), format!("{}/status", K::plural(&())))
    }
    vec![
        of::<Workload>(),
        of::<AuthorizationPolicy>(),
        of::<JwtPolicy>(),
        of::<TrafficPolicy>(),
        of::<PeerAuthentication>(),
        of::<HttpRoute>(),
        of::<GrpcRoute>(),
    ]
}
