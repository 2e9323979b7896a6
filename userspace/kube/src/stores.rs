//! A reflector per kind, and the snapshot built from their stores.

use std::fmt::Debug;

use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt as _};
use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeStatus, Pod, PodCondition, PodSpec, PodStatus, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use weft_api::convert;
use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
use weft_api::{Convert, Object, ObjectError, SnapshotBuilder};
use weft_policy::NodeSettings;

use crate::Update;
use crate::cgroup::{Cgroups, QosClass};

/// A watched resource: its name in logs and readiness, and what to check when it fails.
#[derive(Debug)]
pub struct Kind {
    /// Plural resource name, with its API group unless core; pods are watched twice, this
    /// node's and the others', told apart by what follows the name.
    pub resource: &'static str,
    pub hint: &'static str,
}

impl Kind {
    /// The API resource itself (plural, with its group unless core), as RBAC names it.
    pub fn api_resource(&self) -> &'static str {
        self.resource.split_once(" (").map_or(self.resource, |(resource, _)| resource)
    }
}

const RBAC: &str =
    "cannot list or watch; is the API server reachable, and may the agent's ServiceAccount list and watch it?";
const CRD: &str = "cannot list or watch; is its CRD installed, and may the agent's ServiceAccount list and watch it?";

/// Every kind the source watches, in the order of [`Stores::new`]'s reflectors.
pub const KINDS: [Kind; 13] = [
    Kind { resource: "pods", hint: RBAC },
    Kind { resource: "pods (other nodes)", hint: RBAC },
    Kind { resource: "namespaces", hint: RBAC },
    Kind { resource: "services", hint: RBAC },
    Kind { resource: "endpointslices.discovery.k8s.io", hint: RBAC },
    Kind { resource: "nodes", hint: RBAC },
    Kind { resource: "httproutes.gateway.networking.k8s.io", hint: CRD },
    Kind { resource: "grpcroutes.gateway.networking.k8s.io", hint: CRD },
    Kind { resource: "workloads.weft.dev", hint: CRD },
    Kind { resource: "authorizationpolicies.weft.dev", hint: CRD },
    Kind { resource: "jwtpolicies.weft.dev", hint: CRD },
    Kind { resource: "trafficpolicies.weft.dev", hint: CRD },
    Kind { resource: "peerauthentications.weft.dev", hint: CRD },
];

/// What a reflector's event means to the source.
#[derive(Debug)]
pub enum Signal {
    /// An object was added, changed or deleted.
    Changed,
    /// A full list completed (the first one makes the kind ready).
    Listed,
    /// The API server does not serve the resource (404): its CRD is not installed.
    Absent,
    Failed(watcher::Error),
}

/// Every reflector's signals, tagged with the index of its kind in [`KINDS`].
pub type Events = SelectAll<BoxStream<'static, (usize, Signal)>>;

pub struct Stores {
    pods: Store<Pod>,
    /// Pods of every other node, trimmed to what makes them workloads there: where the tunnel
    /// to them ends, and the identity their node's proxy presents.
    remote_pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    http_routes: Store<HttpRoute>,
    grpc_routes: Store<GrpcRoute>,
    workloads: Store<Workload>,
    authorization_policies: Store<AuthorizationPolicy>,
    jwt_policies: Store<JwtPolicy>,
    traffic_policies: Store<TrafficPolicy>,
    peer_authentications: Store<PeerAuthentication>,
}

impl Stores {
    /// The stores and the reflector streams that fill them (nothing runs until the streams are
    /// polled). Pods of `node` are watched whole, those of other nodes trimmed; everything else
    /// is cluster-wide.
    pub fn new(client: &Client, node: &str) -> (Self, Events) {
        let all = watcher::Config::default();
        let this_node = all.clone().fields(&format!("spec.nodeName={node}"));
        let other_nodes = all.clone().fields(&format!("spec.nodeName!={node}"));
        let mut r = Reflectors { client, events: Events::new() };
        let stores = Self {
            pods: r.add::<Pod>(&this_node, keep),
            remote_pods: r.add(&other_nodes, slim_pod),
            namespaces: r.add::<Namespace>(&all, keep),
            services: r.add::<Service>(&all, keep),
            slices: r.add::<EndpointSlice>(&all, keep),
            nodes: r.add(&all, slim_node),
            http_routes: r.add::<HttpRoute>(&all, keep),
            grpc_routes: r.add::<GrpcRoute>(&all, keep),
            workloads: r.add::<Workload>(&all, keep),
            authorization_policies: r.add::<AuthorizationPolicy>(&all, keep),
            jwt_policies: r.add::<JwtPolicy>(&all, keep),
            traffic_policies: r.add::<TrafficPolicy>(&all, keep),
            peer_authentications: r.add::<PeerAuthentication>(&all, keep),
        };
        debug_assert_eq!(r.events.len(), KINDS.len());
        (stores, r.events)
    }

    /// The snapshot of everything in the stores, and how many meshed pods have no cgroup
    /// (not even an expected one) yet.
    pub fn build(&self, node: &NodeSettings, cgroups: &Cgroups) -> (Update, usize) {
        let mut builder = SnapshotBuilder::new(node.clone());
        let mut errors = Vec::new();
        add_all(&mut builder, &mut errors, &self.nodes);
        add_all(&mut builder, &mut errors, &self.services);
        add_all(&mut builder, &mut errors, &self.slices);
        add_all(&mut builder, &mut errors, &self.workloads);
        add_all(&mut builder, &mut errors, &self.http_routes);
        add_all(&mut builder, &mut errors, &self.grpc_routes);
        add_all(&mut builder, &mut errors, &self.authorization_policies);
        add_all(&mut builder, &mut errors, &self.jwt_policies);
        add_all(&mut builder, &mut errors, &self.traffic_policies);
        add_all(&mut builder, &mut errors, &self.peer_authentications);

        let mut unplaced = 0;
        let pods = self.pods.state().into_iter().chain(self.remote_pods.state()).collect();
        for pod in sorted(pods) {
            let namespace = self.namespaces.get(&ObjectRef::new(&pod.namespace().unwrap_or_default()));
            let labels = namespace.as_ref().and_then(|ns| ns.metadata.labels.as_ref());
            match convert::pod(&pod, labels) {
                Ok(Some(mut workload)) => {
                    // Another node's pod is meshed by that node's agent, in that node's cgroups.
                    let local = workload.node.as_deref() == Some(node.node_name.as_str());
                    if local && workload.meshed {
                        let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref()).and_then(QosClass::parse);
                        workload.cgroup = pod.metadata.uid.as_deref().and_then(|uid| cgroups.pod(uid, qos));
                        if workload.cgroup.is_none() {
                            tracing::debug!(pod = %workload.id, "cgroup not found yet; looking again shortly");
                            unplaced += 1;
                        }
                    }
                    builder.add(Object::Workload(workload));
                }
                Ok(None) => {}
                Err(e) => errors.push(ObjectError::new(describe("Pod", &*pod), e)),
            }
        }
        let objects = builder.objects();
        (Update { snapshot: builder.finish(), errors, objects }, unplaced)
    }

    /// Warns when no Node has this node's name: then no pod matches the field selector either.
    pub fn check_node(&self, node: &str) {
        if self.nodes.get(&ObjectRef::new(node)).is_none() {
            tracing::warn!(
                node,
                "no Node of this name; set --node-name (WEFT_NODE_NAME) from the pod's spec.nodeName, or no pod of this node is seen"
            );
        }
    }
}

struct Reflectors<'a> {
    client: &'a Client,
    events: Events,
}

impl Reflectors<'_> {
    /// A store of every `K` the watcher sees, each trimmed by `slim` first; its signals are
    /// tagged with the next index of [`KINDS`].
    fn add<K>(&mut self, config: &watcher::Config, slim: impl Fn(&mut K) + Send + 'static) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let (store, writer) = reflector::store();
        let kind = self.events.len();
        let stream = watcher(Api::<K>::all(self.client.clone()), config.clone())
            .default_backoff()
            .modify(move |object: &mut K| {
                strip(object);
                slim(object);
            })
            .reflect(writer)
            .filter_map(move |event| std::future::ready(signal(event).map(|s| (kind, s))));
        self.events.push(boxed(stream));
        store
    }
}

fn boxed<S: Stream<Item = (usize, Signal)> + Send + 'static>(stream: S) -> BoxStream<'static, (usize, Signal)> {
    stream.boxed()
}

/// What a watcher event means to a store's owner; `None` for the events of a relist in progress.
pub fn signal<K>(event: Result<watcher::Event<K>, watcher::Error>) -> Option<Signal> {
    Some(match event {
        Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Signal::Changed,
        Ok(watcher::Event::InitDone) => Signal::Listed,
        // A relist fills a buffer that the store swaps in at InitDone; until then the store,
        // and so the snapshot, is unchanged.
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => return None,
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.is_not_found() => Signal::Absent,
        Err(e) => Signal::Failed(e),
    })
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what weft never reads and can be large: managed fields and kubectl's copy of the
/// whole object.
pub fn strip<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// Keeps the object as it is.
fn keep<K>(_: &mut K) {}

/// Of another node's pod, weft reads only what [`convert::pod`] does: its name, labels,
/// service account, node, named ports, phase, addresses and readiness.
fn slim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        service_account_name: spec.service_account_name,
        host_network: spec.host_network,
        containers: spec
            .containers
            .into_iter()
            .filter(|c| c.ports.as_ref().is_some_and(|p| p.iter().any(|p| p.name.is_some())))
            .map(|c| Container {
                name: c.name,
                ports: c.ports.map(|ports| {
                    ports
                        .into_iter()
                        .filter(|p| p.name.is_some())
                        .map(|p| ContainerPort { name: p.name, container_port: p.container_port, ..ContainerPort::default() })
                        .collect()
                }),
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status.pod_ips,
        conditions: status.conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition { type_: c.type_, status: c.status, ..PodCondition::default() })
                .collect()
        }),
        ..PodStatus::default()
    });
}

/// A Node's addresses are all weft reads; its status also lists every image on it.
fn slim_node(node: &mut Node) {
    node.spec = None;
    node.status = node.status.take().map(|s| NodeStatus { addresses: s.addresses, ..NodeStatus::default() });
}

fn add_all<K: Convert + Resource<DynamicType = ()> + Clone>(
    builder: &mut SnapshotBuilder,
    errors: &mut Vec<ObjectError>,
    store: &Store<K>,
) {
    add_objects(builder, errors, store.state());
}

/// Converts `objects` (in name order) into `builder`; what fails goes to `errors`.
pub fn add_objects<K: Convert + Resource<DynamicType = ()>>(
    builder: &mut SnapshotBuilder,
    errors: &mut Vec<ObjectError>,
    objects: Vec<std::sync::Arc<K>>,
) {
    for object in sorted(objects) {
        match object.convert() {
            Ok(converted) => builder.add(converted),
            Err(e) => errors.push(ObjectError::new(describe(K::KIND, &*object), e)),
        }
    }
}

/// In (namespace, name) order, so equal stores build equal snapshots.
pub fn sorted<K: Resource>(mut objects: Vec<std::sync::Arc<K>>) -> Vec<std::sync::Arc<K>> {
    objects.sort_by(|a, b| (&a.meta().namespace, &a.meta().name).cmp(&(&b.meta().namespace, &b.meta().name)));
    objects
}

/// "Kind namespace/name", or "Kind name" for cluster-scoped objects.
pub fn describe<K: Resource>(kind: &str, object: &K) -> String {
    let name = object.meta().name.as_deref().unwrap_or("<unnamed>");
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Trimming another node's pod keeps everything its conversion reads.
    #[test]
    fn a_trimmed_pod_converts_as_the_whole_one() {
        let full: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop", "uid": "u-1", "labels": {"app": "db", "weft.dev/mesh": "enabled"},
                         "annotations": {"big": "x".repeat(4096)}, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "db-1", "uid": "r"}]},
            "spec": {"nodeName": "node-b", "serviceAccountName": "db", "containers": [
                {"name": "app", "image": "db:1", "env": [{"name": "A", "value": "b"}],
                 "ports": [{"name": "sql", "containerPort": 5432, "protocol": "TCP"}, {"containerPort": 9090}]},
                {"name": "sidecar", "image": "s:1", "ports": [{"containerPort": 1}]},
                {"name": "metrics", "image": "m:1", "ports": [{"name": "metrics", "containerPort": 9100}]}]},
            "status": {"phase": "Running", "podIP": "10.2.0.5", "podIPs": [{"ip": "10.2.0.5"}], "qosClass": "Burstable",
                       "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "app", "image": "db:1", "imageID": "x", "ready": true, "restartCount": 0}]},
        }))
        .unwrap();
        let mut slim = full.clone();
        slim_pod(&mut slim);
        let size = |p: &Pod| serde_json::to_vec(p).unwrap().len();
        assert!(size(&slim) * 4 < size(&full), "{} of {} bytes kept", size(&slim), size(&full));
        let (whole, trimmed) = (convert::pod(&full, None).unwrap(), convert::pod(&slim, None).unwrap());
        assert!(whole.is_some());
        assert_eq!(trimmed, whole);
    }
}
