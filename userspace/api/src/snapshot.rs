//! Converted objects into a [`Snapshot`]: the one path both config sources take, the directory
//! loader ([`crate::load`]) and the Kubernetes reflectors (weft-kube).
//!
//! A source reads objects its own way, converts each with [`Convert`] (or [`convert::pod`]) and
//! adds the result to a [`SnapshotBuilder`]; an object that fails conversion becomes an
//! [`ObjectError`] and is left out, the rest still builds.

use std::fmt;

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use weft_policy::{NodeSettings, Snapshot};

use crate::convert::{self, FieldError};
use crate::crd;

/// One object converted into weft's model, ready for a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(weft_policy::Service),
    EndpointSet(weft_policy::EndpointSet),
    /// A weft Workload or a Pod.
    Workload(weft_policy::Workload),
    /// One per target of an AuthorizationPolicy.
    Policies(Vec<weft_policy::AuthorizationPolicy>),
    TrafficPolicy(weft_policy::TrafficPolicy),
    JwtPolicy(weft_policy::JwtPolicy),
    /// An HTTPRoute or a GRPCRoute.
    Route(weft_policy::HttpRoute),
    Node(weft_policy::Node),
    PeerAuthentication(weft_policy::PeerAuthentication),
}

/// A Kubernetes object weft converts on its own, without context from other objects (Pods need
/// their Namespace: see [`convert::pod`]).
pub trait Convert {
    /// The kind in error messages, e.g. "Service".
    const KIND: &'static str;

    fn convert(&self) -> Result<Object, FieldError>;
}

macro_rules! convert {
    ($($ty:ty => $kind:literal, $convert:path, $variant:ident;)*) => {$(
        impl Convert for $ty {
            const KIND: &'static str = $kind;

            fn convert(&self) -> Result<Object, FieldError> {
                $convert(self).map(Object::$variant)
            }
        }
    )*};
}

convert! {
    core::Service => "Service", convert::service, Service;
    discovery::EndpointSlice => "EndpointSlice", convert::endpoint_slice, EndpointSet;
    core::Node => "Node", convert::node, Node;
    crd::Workload => "Workload", convert::workload, Workload;
    crd::AuthorizationPolicy => "AuthorizationPolicy", convert::authorization_policy, Policies;
    crd::JwtPolicy => "JwtPolicy", convert::jwt_policy, JwtPolicy;
    crd::TrafficPolicy => "TrafficPolicy", convert::traffic_policy, TrafficPolicy;
    crd::PeerAuthentication => "PeerAuthentication", convert::peer_authentication, PeerAuthentication;
    HttpRoute => "HTTPRoute", convert::http_route, Route;
    GrpcRoute => "GRPCRoute", convert::grpc_route, Route;
}

/// What is wrong with one object, wherever it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// "Kind namespace/name" ("Kind name" for cluster-scoped kinds).
    pub object: String,
    /// Path of the offending field, e.g. "spec.ports[0].port".
    pub field: Option<String>,
    pub message: String,
}

impl ObjectError {
    pub fn new(object: String, error: FieldError) -> Self {
        let field = Some(error.field).filter(|f| !f.is_empty() && f != ".");
        Self { object, field, message: error.message }
    }
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.object)?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ObjectError {}

/// Collects converted objects into a snapshot for one node.
#[derive(Debug)]
pub struct SnapshotBuilder {
    snapshot: Snapshot,
    objects: usize,
}

impl SnapshotBuilder {
    pub fn new(node: NodeSettings) -> Self {
        Self { snapshot: Snapshot { node, ..Snapshot::default() }, objects: 0 }
    }

    pub fn add(&mut self, object: Object) {
        self.objects += 1;
        let snapshot = &mut self.snapshot;
        match object {
            Object::Service(s) => snapshot.services.push(s),
            Object::EndpointSet(e) => snapshot.endpoints.push(e),
            Object::Workload(w) => snapshot.workloads.push(w),
            Object::Policies(p) => snapshot.policies.extend(p),
            Object::TrafficPolicy(p) => snapshot.traffic_policies.push(p),
            Object::JwtPolicy(p) => snapshot.jwt_policies.push(p),
            Object::Route(r) => snapshot.routes.push(r),
            Object::Node(n) => snapshot.nodes.push(n),
            Object::PeerAuthentication(p) => snapshot.peer_authentications.push(p),
        }
    }

    /// Objects added so far.
    pub fn objects(&self) -> usize {
        self.objects
    }

    pub fn finish(self) -> Snapshot {
        self.snapshot
    }
}
