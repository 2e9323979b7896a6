//! A fake API server behind a `kube::Client`, shared by weft-kube's and weft-controller's tests
//! (the controller's include this file).
//!
//! - Lists and watches, enough for reflectors: lists answer from its objects by request path;
//!   watches stay open and stream every later change (from the resourceVersion asked for, like
//!   the real one). A field selector of one `path=value` or `path!=value` term narrows both as
//!   the real one does: an object that stops matching is DELETED from the watch, one that starts
//!   is ADDED.
//! - The writes the controller makes: get, create and replace (optimistic concurrency on
//!   `resourceVersion`, 409 on a stale one), server-side apply of a status subresource (409 when
//!   the patch names a stale `resourceVersion`), and merge patches.
//! - Lists can be held back, and the server can go down.
//!
//! Every request is recorded with its body for assertions.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use kube::Resource;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

type Body = BoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;
type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

/// One served collection, e.g. `/api/v1/pods`.
struct Collection {
    api_version: String,
    list_kind: String,
    /// (namespace, name) -> object.
    objects: BTreeMap<(String, String), Value>,
    /// Every change, by resourceVersion.
    events: Vec<Change>,
    watches: Vec<(Option<Selector>, WatchSender)>,
}

/// An object written or deleted, and what it was before.
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
    before: Option<Value>,
}

/// A field selector of one term: the field's dotted path, the value, and whether it must equal.
#[derive(Clone)]
struct Selector {
    path: String,
    value: String,
    equal: bool,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, Collection>,
    resource_version: u64,
    /// Collections whose lists are not answered until released.
    held: BTreeSet<String>,
    waiting: Vec<(String, Respond, Option<Selector>)>,
    down: bool,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    /// A server of `served` collections (see [`ApiServer::serve`]) and the client talking to it.
    pub fn start(served: &[fn(&ApiServer)]) -> (Self, kube::Client) {
        let (service, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let server = Self { state: Arc::default() };
        for serve in served {
            serve(&server);
        }
        tokio::spawn(server.clone().answer(handle));
        (server, kube::Client::new(service, "default"))
    }

    /// Serves `K`'s cluster-wide collection (and its namespaced paths).
    pub fn serve<K: Resource<DynamicType = ()>>(&self) {
        let collection = Collection {
            api_version: K::api_version(&()).into_owned(),
            list_kind: format!("{}List", K::kind(&())),
            objects: BTreeMap::new(),
            events: Vec::new(),
            watches: Vec::new(),
        };
        self.state().collections.insert(K::url_path(&(), None), collection);
    }

    /// Creates or replaces an object as a user would (`kubectl apply`: generation 1 for a new
    /// one, +1 for a changed spec).
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let mut value = serde_json::to_value(object).expect("serializable object");
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let mut state = self.state();
        let path = K::url_path(&(), None);
        let old = state.collections.get(&path).expect("apply to a served collection").objects.get(&key(&value)).cloned();
        let generation = match &old {
            Some(old) if old["spec"] == value["spec"] => old["metadata"]["generation"].as_i64().unwrap_or(1),
            Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
            None => 1,
        };
        value["metadata"]["generation"] = json!(generation);
        state.store(&path, value);
    }

    pub fn delete<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let mut state = self.state();
        state.resource_version += 1;
        let rv = state.resource_version;
        let collection = state.collections.get_mut(&K::url_path(&(), None)).expect("delete from a served collection");
        let value = serde_json::to_value(object).expect("serializable object");
        let mut value = collection.objects.remove(&key(&value)).expect("deleting an existing object");
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        collection.publish(Change { rv, kind: "DELETED", object: value, before: None });
    }

    /// The object as stored now.
    pub fn get<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state();
        state.collections[&K::url_path(&(), None)].objects.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Lists of `K` wait until [`ApiServer::release`].
    pub fn hold<K: Resource<DynamicType = ()>>(&self) {
        self.state().held.insert(K::url_path(&(), None));
    }

    pub fn release<K: Resource<DynamicType = ()>>(&self) {
        let path = K::url_path(&(), None);
        let mut state = self.state();
        state.held.remove(&path);
        let (release, keep) = std::mem::take(&mut state.waiting).into_iter().partition(|(p, _, _)| *p == path);
        state.waiting = keep;
        for (path, respond, selector) in release {
            respond.send_response(state.list(&path, selector.as_ref()));
        }
    }

    /// The server stops answering: open watches end and every new request fails to connect.
    pub fn go_down(&self) {
        let mut state = self.state();
        state.down = true;
        for collection in state.collections.values_mut() {
            collection.watches.clear();
        }
    }

    pub fn come_back(&self) {
        self.state().down = false;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Every request so far, as "path?query".
    pub fn request_lines(&self) -> Vec<String> {
        self.requests().iter().map(|r| format!("{}?{}", r.path, r.query)).collect()
    }

    /// Requests with this method whose path ends with `suffix`.
    pub fn writes(&self, method: &Method, suffix: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.method == method && r.path.ends_with(suffix)).collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn answer(self, mut handle: Handle) {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            let query = parts.uri.query().unwrap_or_default().to_owned();
            let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
            let watch = params.get("watch") == Some(&"true");
            let selector = params.get("fieldSelector").map(|s| Selector::parse(s));
            let mut state = self.state();
            state.requests.push(Recorded {
                method: parts.method.clone(),
                path: path.clone(),
                query: query.clone(),
                body: body.clone(),
            });
            if state.down {
                respond.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "API server down"));
                continue;
            }
            let Some(target) = Target::parse(&path, &state) else {
                drop(state);
                respond.send_response(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
                continue;
            };
            let response = match (&parts.method, &target.name) {
                (&Method::GET, None) if watch => {
                    let since: u64 = params.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
                    let (send, receive) = mpsc::unbounded_channel();
                    let collection = state.collections.get_mut(&target.collection).expect("parsed");
                    for change in collection.events.iter().filter(|c| c.rv > since) {
                        if let Some(line) = change.line(selector.as_ref()) {
                            let _ = send.send(Ok(Frame::data(line)));
                        }
                    }
                    collection.watches.push((selector, send));
                    let stream =
                        futures::stream::unfold(receive, |mut r| async move { r.recv().await.map(|f| (f, r)) });
                    Response::new(StreamBody::new(stream).boxed())
                }
                (&Method::GET, None) if state.held.contains(&target.collection) => {
                    state.waiting.push((target.collection, respond, selector));
                    continue;
                }
                (&Method::GET, None) => state.list(&target.collection, selector.as_ref()),
                (&Method::GET, Some(name)) => match state.object(&target, name) {
                    Some(object) => ok(&object),
                    None => status(StatusCode::NOT_FOUND, "NotFound", &format!("\"{name}\" not found")),
                },
                (&Method::POST, None) => state.create(&target, body),
                (&Method::PUT, Some(name)) => state.replace(&target, name, body),
                (&Method::PATCH, Some(name)) => state.patch(&target, name, body),
                _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not served by the mock"),
            };
            drop(state);
            respond.send_response(response);
        }
    }
}

/// A request path taken apart: `<prefix>[/namespaces/<ns>]/<plural>[/<name>[/<sub>]]`.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str, state: &State) -> Option<Self> {
        if state.collections.contains_key(path) {
            return Some(Self { collection: path.to_owned(), namespace: None, name: None, subresource: None });
        }
        let (prefix, rest) = path.split_once("/namespaces/")?;
        let mut parts = rest.split('/');
        let namespace = parts.next()?.to_owned();
        let collection = format!("{prefix}/{}", parts.next()?);
        state.collections.contains_key(&collection).then_some(())?;
        let name = parts.next().map(str::to_owned);
        let subresource = parts.next().map(str::to_owned);
        Some(Self { collection, namespace: Some(namespace), name, subresource })
    }
}

impl State {
    fn object(&self, target: &Target, name: &str) -> Option<Value> {
        let namespace = target.namespace.clone().unwrap_or_default();
        self.collections[&target.collection].objects.get(&(namespace, name.to_owned())).cloned()
    }

    /// Stores `value` with the next resourceVersion and tells the watches.
    fn store(&mut self, collection: &str, mut value: Value) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        let collection = self.collections.get_mut(collection).expect("a served collection");
        let before = collection.objects.insert(key(&value), value.clone());
        let kind = if before.is_some() { "MODIFIED" } else { "ADDED" };
        collection.publish(Change { rv, kind, object: value.clone(), before });
        value
    }

    fn list(&self, collection: &str, selector: Option<&Selector>) -> Response<Body> {
        let c = &self.collections[collection];
        let items: Vec<_> = c.objects.values().filter(|o| selector.is_none_or(|s| s.matches(o))).collect();
        ok(&json!({
            "apiVersion": c.api_version,
            "kind": c.list_kind,
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": items,
        }))
    }

    fn create(&mut self, target: &Target, mut body: Value) -> Response<Body> {
        body["metadata"]["namespace"] = json!(target.namespace);
        if self.collections[&target.collection].objects.contains_key(&key(&body)) {
            return status(StatusCode::CONFLICT, "AlreadyExists", "already exists");
        }
        let stored = self.store(&target.collection, body);
        let mut response = ok(&stored);
        *response.status_mut() = StatusCode::CREATED;
        response
    }

    fn replace(&mut self, target: &Target, name: &str, mut body: Value) -> Response<Body> {
        let Some(current) = self.object(target, name) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "not found");
        };
        if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                "the object has been modified; apply your changes to the latest version",
            );
        }
        body["metadata"]["namespace"] = json!(target.namespace);
        body["metadata"]["name"] = json!(name);
        ok(&self.store(&target.collection, body))
    }

    fn patch(&mut self, target: &Target, name: &str, body: Value) -> Response<Body> {
        let Some(mut current) = self.object(target, name) else {
            return status(StatusCode::NOT_FOUND, "NotFound", "not found");
        };
        if target.subresource.as_deref() == Some("status") {
            let wanted = &body["metadata"]["resourceVersion"];
            if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
                return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
            }
            current["status"] = body["status"].clone();
        } else {
            merge(&mut current, &body);
        }
        ok(&self.store(&target.collection, current))
    }
}

impl Collection {
    fn publish(&mut self, change: Change) {
        self.watches.retain(|(selector, watch)| match change.line(selector.as_ref()) {
            Some(line) => watch.send(Ok(Frame::data(line))).is_ok(),
            None => !watch.is_closed(),
        });
        self.events.push(change);
    }
}

impl Change {
    /// The watch event a watch with `selector` sees, if any.
    fn line(&self, selector: Option<&Selector>) -> Option<Bytes> {
        let kind = match selector {
            None => self.kind,
            Some(s) => {
                let now = s.matches(&self.object);
                let was = self.before.as_ref().is_some_and(|b| s.matches(b));
                match (self.kind, was, now) {
                    ("DELETED", _, true) | ("MODIFIED", true, false) => "DELETED",
                    ("ADDED", _, true) | ("MODIFIED", false, true) => "ADDED",
                    ("MODIFIED", true, true) => "MODIFIED",
                    _ => return None,
                }
            }
        };
        let mut line = json!({"type": kind, "object": self.object}).to_string();
        line.push('\n');
        Some(Bytes::from(line))
    }
}

impl Selector {
    /// `spec.nodeName%3Dnode-a` or `spec.nodeName%21%3Dnode-a`, as kube encodes them.
    fn parse(query: &str) -> Self {
        let decoded = query.replace("%21", "!").replace("%3D", "=").replace("%2F", "/");
        let (path, value, equal) = match decoded.split_once("!=") {
            Some((path, value)) => (path, value, false),
            None => {
                let (path, value) = decoded.split_once('=').expect("a field selector term");
                (path, value.trim_start_matches('='), true)
            }
        };
        Self { path: path.to_owned(), value: value.to_owned(), equal }
    }

    /// A missing field reads as the empty string, as the API server's do.
    fn matches(&self, object: &Value) -> bool {
        let field = self.path.split('.').try_fold(object, |v, key| v.get(key));
        (field.and_then(Value::as_str).unwrap_or_default() == self.value) == self.equal
    }
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (k, v) in patch {
                merge(into.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (into, patch) => *into = patch.clone(),
    }
}

fn key(object: &Value) -> (String, String) {
    let text = |field: &str| object["metadata"][field].as_str().unwrap_or_default().to_owned();
    (text("namespace"), text("name"))
}

fn ok(value: &Value) -> Response<Body> {
    Response::new(Full::new(Bytes::from(value.to_string())).boxed())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "code": code.as_u16(), "reason": reason, "message": message,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = code;
    response
}

/// Waits (on the test clock) until `check` holds, or panics with `what` and the requests.
pub async fn until<T>(server: &ApiServer, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let wait = async {
        loop {
            if let Some(found) = check() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    match tokio::time::timeout(Duration::from_secs(120), wait).await {
        Ok(found) => found,
        Err(_) => {
            let requests: Vec<String> =
                server.requests().iter().map(|r| format!("{} {}?{}", r.method, r.path, r.query)).collect();
            panic!("timed out waiting for {what}; requests: {requests:#?}")
        }
    }
}

/// Maps a request to (API group, resource[/subresource], RBAC verb).
pub fn rbac_of(request: &Recorded) -> (String, String, String) {
    let (group, rest) = match request.path.strip_prefix("/api/v1/") {
        Some(rest) => (String::new(), rest.to_owned()),
        None => {
            let rest = request.path.strip_prefix("/apis/").expect("an API path");
            let mut parts = rest.splitn(3, '/');
            let group = parts.next().unwrap_or_default().to_owned();
            let _version = parts.next();
            (group, parts.next().unwrap_or_default().to_owned())
        }
    };
    let rest = match rest.strip_prefix("namespaces/") {
        Some(namespaced) => namespaced.split_once('/').map(|(_, r)| r.to_owned()).unwrap_or_default(),
        None => rest,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let resource = match parts.as_slice() {
        [plural, _name, sub] => format!("{plural}/{sub}"),
        [plural, ..] => (*plural).to_owned(),
        [] => String::new(),
    };
    let named = parts.len() > 1;
    let verb = match request.method {
        Method::GET if request.query.contains("watch=true") => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    };
    (group, resource, verb.to_owned())
}
