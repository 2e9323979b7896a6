//! A fake API server behind a `kube::Client`, enough for reflectors: it answers lists from its
//! objects by request path, holds watches open and streams every later change to them (from the
//! resourceVersion asked for, like the real one), and can hold lists back or go down. A field
//! selector of one `path=value` or `path!=value` term narrows lists and watches as the real one
//! does: an object that stops matching is DELETED from the watch, one that starts is ADDED.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
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
    requests: Vec<String>,
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

    /// Serves `K`'s cluster-wide collection.
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

    /// Creates or replaces an object, as `kubectl apply` would.
    pub fn apply<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let mut state = self.state();
        state.resource_version += 1;
        let rv = state.resource_version;
        let mut value = serde_json::to_value(object).expect("serializable object");
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        let collection = state.collections.get_mut(&K::url_path(&(), None)).expect("apply to a served collection");
        let key = key(&value);
        let before = collection.objects.insert(key, value.clone());
        let kind = if before.is_some() { "MODIFIED" } else { "ADDED" };
        collection.publish(Change { rv, kind, object: value, before });
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

    /// Lists of `K` wait until [`ApiServer::release`].
    pub fn hold<K: Resource<DynamicType = ()>>(&self) {
        self.state().held.insert(K::url_path(&(), None));
    }

    pub fn release<K: Resource<DynamicType = ()>>(&self) {
        let path = K::url_path(&(), None);
        let waiting = {
            let mut state = self.state();
            state.held.remove(&path);
            let (release, keep) = std::mem::take(&mut state.waiting).into_iter().partition(|(p, _, _)| *p == path);
            state.waiting = keep;
            release
        };
        for (path, respond, selector) in waiting {
            let response = self.list(&path, selector.as_ref());
            respond.send_response(response);
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

    /// Every request so far, as "path?query".
    pub fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn answer(self, mut handle: Handle) {
        while let Some((request, respond)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
            let selector = params.get("fieldSelector").map(|s| Selector::parse(s));
            let mut state = self.state();
            state.requests.push(format!("{path}?{query}"));
            if state.down {
                respond.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "API server down"));
                continue;
            }
            if !state.collections.contains_key(&path) {
                drop(state);
                respond.send_response(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
                continue;
            }
            if params.get("watch") == Some(&"true") {
                let since: u64 = params.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
                let (send, receive) = mpsc::unbounded_channel();
                let collection = state.collections.get_mut(&path).expect("checked above");
                for change in collection.events.iter().filter(|c| c.rv > since) {
                    if let Some(line) = change.line(selector.as_ref()) {
                        let _ = send.send(Ok(Frame::data(line)));
                    }
                }
                collection.watches.push((selector, send));
                drop(state);
                let stream = futures::stream::unfold(receive, |mut r| async move { r.recv().await.map(|f| (f, r)) });
                respond.send_response(Response::new(StreamBody::new(stream).boxed()));
            } else if state.held.contains(&path) {
                state.waiting.push((path, respond, selector));
            } else {
                drop(state);
                respond.send_response(self.list(&path, selector.as_ref()));
            }
        }
    }

    fn list(&self, path: &str, selector: Option<&Selector>) -> Response<Body> {
        let state = self.state();
        let collection = &state.collections[path];
        let items: Vec<_> = collection.objects.values().filter(|o| selector.is_none_or(|s| s.matches(o))).collect();
        let list = json!({
            "apiVersion": collection.api_version,
            "kind": collection.list_kind,
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        });
        Response::new(Full::new(Bytes::from(list.to_string())).boxed())
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

fn key(object: &Value) -> (String, String) {
    let text = |field: &str| object["metadata"][field].as_str().unwrap_or_default().to_owned();
    (text("namespace"), text("name"))
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
