//! The cluster's config read once, for `weftctl analyze` on a live cluster: one list of every
//! kind the agent watches (pods of every node), converted and built the way the agent builds
//! its snapshot, without cgroups (nothing is attached).

use std::collections::BTreeMap;
use std::sync::Arc;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
use weft_api::{Object, ObjectError, SnapshotBuilder, convert};
use weft_policy::NodeSettings;

use crate::Update;
use crate::stores::{add_objects, describe, sorted};

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
#[error("listing {resource}: {source}; is the cluster reachable (KUBECONFIG), and may you list it?")]
pub struct ListError {
    pub resource: &'static str,
    #[source]
    pub source: kube::Error,
}

/// Lists every kind once and builds the snapshot `node` would get if every pod were its own. A
/// kind the API server does not serve (its CRD not installed) is taken as empty.
pub async fn list_snapshot(client: &Client, node: NodeSettings) -> Result<Update, ListError> {
    let mut builder = SnapshotBuilder::new(node);
    let mut errors = Vec::new();
    add_objects(&mut builder, &mut errors, list::<Node>(client, "nodes").await?);
    add_objects(&mut builder, &mut errors, list::<Service>(client, "services").await?);
    add_objects(&mut builder, &mut errors, list::<EndpointSlice>(client, "endpointslices").await?);
    add_objects(&mut builder, &mut errors, list::<Workload>(client, "workloads.weft.dev").await?);
    add_objects(&mut builder, &mut errors, list::<HttpRoute>(client, "httproutes").await?);
    add_objects(&mut builder, &mut errors, list::<GrpcRoute>(client, "grpcroutes").await?);
    add_objects(
        &mut builder,
        &mut errors,
        list::<AuthorizationPolicy>(client, "authorizationpolicies.weft.dev").await?,
    );
    add_objects(&mut builder, &mut errors, list::<JwtPolicy>(client, "jwtpolicies.weft.dev").await?);
    add_objects(&mut builder, &mut errors, list::<TrafficPolicy>(client, "trafficpolicies.weft.dev").await?);
    add_objects(&mut builder, &mut errors, list::<PeerAuthentication>(client, "peerauthentications.weft.dev").await?);
    let namespaces: BTreeMap<String, Arc<Namespace>> = list::<Namespace>(client, "namespaces")
        .await?
        .into_iter()
        .map(|ns| (ns.metadata.name.clone().unwrap_or_default(), ns))
        .collect();
    for pod in sorted(list::<Pod>(client, "pods").await?) {
        let namespace = pod.metadata.namespace.as_deref().and_then(|ns| namespaces.get(ns));
        match convert::pod(&pod, namespace.and_then(|ns| ns.metadata.labels.as_ref())) {
            Ok(Some(workload)) => builder.add(Object::Workload(workload)),
            Ok(None) => {}
            Err(e) => errors.push(ObjectError::new(describe("Pod", &*pod), e)),
        }
    }
    let objects = builder.objects();
    Ok(Update { snapshot: builder.finish(), errors, objects })
}

async fn list<K>(client: &Client, resource: &'static str) -> Result<Vec<Arc<K>>, ListError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match Api::<K>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => Ok(list.items.into_iter().map(Arc::new).collect()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(Vec::new()),
        Err(source) => Err(ListError { resource, source }),
    }
}
