//! A fake API server behind a `kube::Client`: lists and watches (as weft-kube's tests have
//! them), and the writes the controller makes: get, create and replace (optimistic concurrency
//! on `resourceVersion`, 409 on a stale one), server-side apply of a status subresource (409
//! when the patch names a stale `resourceVersion`), and merge patches. Every request is
//! recorded with its body for assertions.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
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
type WatchSender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
}

struct Collection {
    api_version: String,
    list_kind: String,
    objects: BTreeMap<(String, String), Value>,
    events: Vec<(u64, Bytes)>,
    watches: Vec<WatchSender>,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, Collection>,
    resource_version: u64,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
pub struct ApiServer {
    state: Arc<Mutex<State>>,
}

impl ApiServer {
    pub fn start(served: &[fn(&ApiServer)]) -> (Self, kube::Client) {
        let (service, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let server = Self { state: Arc::default() };
        for serve in served {
            serve(&server);
        }
        tokio::spawn(server.clone().answer(handle));
        (server, kube::Client::new(service, "default"))
    }

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

    /// Creates or replaces an object as a user would (generation 1 for a new one, +1 for a
    /// changed spec).
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let mut value = serde_json::to_value(object).expect("serializable object");
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let mut state = self.state();
        let path = K::url_path(&(), None);
        let old = state.collections[&path].objects.get(&key(&value)).cloned();
        let generation = match &old {
            Some(old) if old["spec"] == value["spec"] => old["metadata"]["generation"].as_i64().unwrap_or(1),
            Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
            None => 1,
        };
        value["metadata"]["generation"] = json!(generation);
        state.store(&path, value);
    }

    /// The object as stored now.
    pub fn get<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state();
        state.collections[&K::url_path(&(), None)].objects.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
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
            let mut state = self.state();
            state.requests.push(Recorded {
                method: parts.method.clone(),
                path: path.clone(),
                query: query.clone(),
                body: body.clone(),
            });
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
                    for (_, line) in collection.events.iter().filter(|(rv, _)| *rv > since) {
                        let _ = send.send(Ok(Frame::data(line.clone())));
                    }
                    collection.watches.push(send);
                    let stream =
                        futures::stream::unfold(receive, |mut r| async move { r.recv().await.map(|f| (f, r)) });
                    Response::new(StreamBody::new(stream).boxed())
                }
                (&Method::GET, None) => state.list(&target.collection),
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
        let key = key(&value);
        let kind = if collection.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        collection.objects.insert(key, value.clone());
        let mut line = json!({"type": kind, "object": value}).to_string();
        line.push('\n');
        let line = Bytes::from(line);
        collection.events.push((rv, line.clone()));
        collection.watches.retain(|w| w.send(Ok(Frame::data(line.clone()))).is_ok());
        value
    }

    fn list(&self, collection: &str) -> Response<Body> {
        let c = &self.collections[collection];
        ok(&json!({
            "apiVersion": c.api_version,
            "kind": c.list_kind,
            "metadata": {"resourceVersion": self.resource_version.to_string()},
            "items": c.objects.values().collect::<Vec<_>>(),
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

/// Maps a request the controller made to (API group, resource[/subresource], RBAC verb).
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
