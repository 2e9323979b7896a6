//! A fake API server behind a `kube::Client`, enough for reflectors: it answers lists from its
//! objects by request path, holds watches open and streams every later change to them (from the
//! resourceVersion asked for, like the real one), and can hold lists back or go down.

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
    /// Every change as a watch event line, by resourceVersion.
    events: Vec<(u64, Bytes)>,
    watches: Vec<WatchSender>,
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, Collection>,
    resource_version: u64,
    /// Collections whose lists are not answered until released.
    held: BTreeSet<String>,
    waiting: Vec<(String, Respond)>,
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
        let kind = if collection.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        collection.objects.insert(key, value.clone());
        collection.publish(rv, kind, value);
    }

    pub fn delete<K: Resource<DynamicType = ()> + Serialize>(&self, object: &K) {
        let mut state = self.state();
        state.resource_version += 1;
        let rv = state.resource_version;
        let collection = state.collections.get_mut(&K::url_path(&(), None)).expect("delete from a served collection");
        let value = serde_json::to_value(object).expect("serializable object");
        let mut value = collection.objects.remove(&key(&value)).expect("deleting an existing object");
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        collection.publish(rv, "DELETED", value);
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
            let (release, keep) = std::mem::take(&mut state.waiting).into_iter().partition(|(p, _)| *p == path);
            state.waiting = keep;
            release
        };
        for (path, respond) in waiting {
            let response = self.list(&path);
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
                for (_, line) in collection.events.iter().filter(|(rv, _)| *rv > since) {
                    let _ = send.send(Ok(Frame::data(line.clone())));
                }
                collection.watches.push(send);
                drop(state);
                let stream = futures::stream::unfold(receive, |mut r| async move { r.recv().await.map(|f| (f, r)) });
                respond.send_response(Response::new(StreamBody::new(stream).boxed()));
            } else if state.held.contains(&path) {
                state.waiting.push((path, respond));
            } else {
                drop(state);
                respond.send_response(self.list(&path));
            }
        }
    }

    fn list(&self, path: &str) -> Response<Body> {
        let state = self.state();
        let collection = &state.collections[path];
        let list = json!({
            "apiVersion": collection.api_version,
            "kind": collection.list_kind,
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": collection.objects.values().collect::<Vec<_>>(),
        });
        Response::new(Full::new(Bytes::from(list.to_string())).boxed())
    }
}

impl Collection {
    fn publish(&mut self, rv: u64, kind: &str, object: Value) {
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        let line = Bytes::from(line);
        self.events.push((rv, line.clone()));
        self.watches.retain(|w| w.send(Ok(Frame::data(line.clone()))).is_ok());
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
