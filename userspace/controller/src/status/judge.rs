//! What each object's status should say, from the objects alone (no I/O): every object is
//! converted by weft-api and the results compiled by weft-policy, exactly as an agent does,
//! and each conversion error and compiler rejection lands on the object it names.
//!
//! A rejection of a reference ([`Cause::Unresolved`]: a target, parent, backend or mirror that
//! names nothing usable) is a `ResolvedRefs: False`; anything else (a bad value, a conflict) is
//! an `Accepted: False`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde_json::{Value, json};
use weft_api::{Convert, ObjectError, SnapshotBuilder};
use weft_policy::{Cause, NodeSettings, Rejection};

use crate::cluster::Stores;

/// The `controllerName` of weft's entries in a route's `status.parents`.
pub const CONTROLLER_NAME: &str = "weft.dev/mesh-controller";

/// Condition messages longer than this are cut (the API allows 32 KiB; people read them).
const MAX_MESSAGE: usize = 2048;

/// One condition as judged; the writer adds the transition time and generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Which weft kind an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WeftKind {
    Workload,
    AuthorizationPolicy,
    JwtPolicy,
    TrafficPolicy,
    PeerAuthentication,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// The status one object should have.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Weft {
        kind: WeftKind,
        namespace: String,
        name: String,
        conditions: Vec<Judged>,
    },
    /// weft's entries of a route's `status.parents`: one per parentRef naming a Service.
    Route {
        kind: RouteKind,
        namespace: String,
        name: String,
        parents: Vec<ParentVerdict>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParentVerdict {
    /// The parentRef as the route's spec writes it.
    pub parent_ref: Value,
    pub conditions: Vec<Judged>,
}

/// The compile runs as on a node with a proxy: every agent the DaemonSet starts has one, and
/// without it the compiler reports policies only a proxy enforces as rejected. The address
/// itself is never used.
fn cluster_node() -> NodeSettings {
    NodeSettings { node_name: String::new(), proxy: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001)), skmsg: false }
}

/// Every object's verdict, in a stable order.
pub fn judge(stores: &Stores) -> Vec<Verdict> {
    let mut builder = SnapshotBuilder::new(cluster_node());
    let mut errors = BTreeMap::new();
    add_all(&mut builder, &mut errors, &stores.services);
    add_all(&mut builder, &mut errors, &stores.workloads);
    add_all(&mut builder, &mut errors, &stores.http_routes);
    add_all(&mut builder, &mut errors, &stores.grpc_routes);
    add_all(&mut builder, &mut errors, &stores.authorization_policies);
    add_all(&mut builder, &mut errors, &stores.jwt_policies);
    add_all(&mut builder, &mut errors, &stores.traffic_policies);
    add_all(&mut builder, &mut errors, &stores.peer_authentications);
    let compiled = weft_policy::compile(&builder.finish());
    let mut rejected: BTreeMap<&str, Vec<&Rejection>> = BTreeMap::new();
    for r in &compiled.rejected {
        rejected.entry(r.object.as_str()).or_default().push(r);
    }
    let judge = Judge { errors, rejected };

    let mut out = Vec::new();
    judge.weft(&mut out, WeftKind::Workload, &stores.workloads, false);
    judge.weft(&mut out, WeftKind::AuthorizationPolicy, &stores.authorization_policies, true);
    judge.weft(&mut out, WeftKind::JwtPolicy, &stores.jwt_policies, true);
    judge.weft(&mut out, WeftKind::TrafficPolicy, &stores.traffic_policies, true);
    judge.weft(&mut out, WeftKind::PeerAuthentication, &stores.peer_authentications, false);
    for route in sorted(stores.http_routes.state()) {
        let rules = route.spec.rules.as_ref().map_or(0, Vec::len);
        judge.route(&mut out, RouteKind::Http, &*route, &route.spec.parent_refs, rules);
    }
    for route in sorted(stores.grpc_routes.state()) {
        let rules = route.spec.rules.as_ref().map_or(0, Vec::len);
        judge.route(&mut out, RouteKind::Grpc, &*route, &route.spec.parent_refs, rules);
    }
    out
}

/// "Kind namespace/name", as conversion errors and rejections name objects.
fn describe<K: Resource>(kind: &str, object: &K) -> String {
    format!("{kind} {}/{}", object.namespace().unwrap_or_default(), object.name_any())
}

fn add_all<K: Convert + Resource<DynamicType = ()> + Clone>(
    builder: &mut SnapshotBuilder,
    errors: &mut BTreeMap<String, ObjectError>,
    store: &Store<K>,
) {
    for object in sorted(store.state()) {
        match object.convert() {
            Ok(converted) => builder.add(converted),
            Err(e) => {
                let name = describe(K::KIND, &*object);
                errors.insert(name.clone(), ObjectError::new(name, e));
            }
        }
    }
}

/// In (namespace, name) order, so equal stores judge equally.
fn sorted<K: Resource>(mut objects: Vec<Arc<K>>) -> Vec<Arc<K>> {
    objects.sort_by(|a, b| (&a.meta().namespace, &a.meta().name).cmp(&(&b.meta().namespace, &b.meta().name)));
    objects
}

struct Judge<'a> {
    /// Conversion errors by "Kind namespace/name": those objects never reached the compiler.
    errors: BTreeMap<String, ObjectError>,
    rejected: BTreeMap<&'a str, Vec<&'a Rejection>>,
}

// === impl Judge ===

impl Judge<'_> {
    fn weft<K>(&self, out: &mut Vec<Verdict>, kind: WeftKind, store: &Store<K>, has_refs: bool)
    where
        K: Convert + Resource<DynamicType = ()> + Clone,
    {
        for object in sorted(store.state()) {
            let described = describe(K::KIND, &*object);
            let mut conditions = Vec::new();
            if let Some(error) = self.errors.get(&described) {
                conditions.push(invalid(error_text(error)));
            } else {
                let rejected = self.rejected.get(described.as_str()).map(Vec::as_slice).unwrap_or_default();
                let (unresolved, invalids) = split(rejected);
                conditions.push(match invalids.is_empty() {
                    true => accepted("valid; the agents apply it"),
                    false => invalid(join(&invalids)),
                });
                if has_refs {
                    conditions.push(match unresolved.is_empty() {
                        true => resolved("every target exists"),
                        false => Judged {
                            type_: "ResolvedRefs",
                            status: false,
                            reason: "TargetNotFound",
                            message: join(&unresolved),
                        },
                    });
                }
            }
            let namespace = object.namespace().unwrap_or_default();
            out.push(Verdict::Weft { kind, namespace, name: object.name_any(), conditions });
        }
    }

    /// GAMMA: per Service parent, `Accepted` (false with `NoMatchingParent` when the parent
    /// Service or port does not resolve, `UnsupportedValue` when the route itself is refused)
    /// and `ResolvedRefs` (false with `BackendNotFound` when a backend or mirror does not).
    fn route<K, P>(
        &self,
        out: &mut Vec<Verdict>,
        kind: RouteKind,
        route: &K,
        parent_refs: &Option<Vec<P>>,
        rules: usize,
    ) where
        K: Convert + Resource<DynamicType = ()>,
        P: Serialize,
    {
        let described = describe(K::KIND, route);
        let error = self.errors.get(&described);
        let rejected = self.rejected.get(described.as_str()).map(Vec::as_slice).unwrap_or_default();
        let (unresolved, invalids) = split(rejected);
        let backends: Vec<&Rejection> =
            unresolved.iter().copied().filter(|r| r.field.starts_with("spec.rules[")).collect();
        let mut parents = Vec::new();
        for (k, parent) in parent_refs.iter().flatten().enumerate() {
            let parent_ref = serde_json::to_value(parent).unwrap_or(Value::Null);
            if !is_service(&parent_ref) {
                continue;
            }
            let mut conditions = Vec::new();
            if let Some(error) = error {
                conditions.push(not_accepted("UnsupportedValue", error_text(error)));
            } else {
                let field = format!("spec.parentRefs[{k}]");
                let missing: Vec<&Rejection> = unresolved
                    .iter()
                    .copied()
                    .filter(|r| r.field == field || r.field.starts_with(&format!("{field}.")))
                    .collect();
                conditions.push(if !missing.is_empty() {
                    not_accepted("NoMatchingParent", join(&missing))
                } else if !invalids.is_empty() {
                    not_accepted("UnsupportedValue", join(&invalids))
                } else if rules == 0 {
                    not_accepted("UnsupportedValue", "spec.rules: empty; add a rule".to_owned())
                } else {
                    accepted("attached to the Service; the agents apply it")
                });
                conditions.push(match backends.is_empty() {
                    true => resolved("every backend exists"),
                    false => Judged {
                        type_: "ResolvedRefs",
                        status: false,
                        reason: "BackendNotFound",
                        message: join(&backends),
                    },
                });
            }
            parents.push(ParentVerdict { parent_ref, conditions });
        }
        let namespace = route.namespace().unwrap_or_default();
        out.push(Verdict::Route { kind, namespace, name: route.name_any(), parents });
    }
}

/// A parentRef weft serves: kind Service in the core group (written "" or left out).
fn is_service(parent_ref: &Value) -> bool {
    parent_ref["kind"] == json!("Service") && matches!(parent_ref["group"].as_str(), None | Some("" | "core"))
}

fn split<'a>(rejected: &[&'a Rejection]) -> (Vec<&'a Rejection>, Vec<&'a Rejection>) {
    rejected.iter().copied().partition(|r| r.cause == Cause::Unresolved)
}

fn error_text(error: &ObjectError) -> String {
    let text = match &error.field {
        Some(field) => format!("{field}: {}", error.message),
        None => error.message.clone(),
    };
    cut(text)
}

fn join(rejected: &[&Rejection]) -> String {
    let text = rejected.iter().map(|r| format!("{}: {}", r.field, r.reason)).collect::<Vec<_>>().join("; ");
    cut(text)
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

fn accepted(message: &str) -> Judged {
    Judged { type_: "Accepted", status: true, reason: "Accepted", message: message.to_owned() }
}

fn invalid(message: String) -> Judged {
    not_accepted("Invalid", message)
}

fn not_accepted(reason: &'static str, message: String) -> Judged {
    Judged { type_: "Accepted", status: false, reason, message }
}

fn resolved(message: &str) -> Judged {
    Judged { type_: "ResolvedRefs", status: true, reason: "ResolvedRefs", message: message.to_owned() }
}
