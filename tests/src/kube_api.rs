//! A fake Kubernetes API server for agents run with `--kube`: plain HTTP inside a node's netns,
//! reached through a KUBECONFIG as a real one would be. It answers lists of the objects it was
//! given (narrowed by a `spec.nodeName=`/`!=` field selector, as the real one does) and holds
//! watches open without events; a path it does not serve is 404, as for a CRD not installed.
//! [`ApiServer::go_down`] closes the listener and every open watch, as an outage would.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::Node;

/// Every collection the agent watches, by URL path.
pub const COLLECTIONS: [&str; 12] = [
    "/api/v1/pods",
    "/api/v1/namespaces",
    "/api/v1/services",
    "/apis/discovery.k8s.io/v1/endpointslices",
    "/api/v1/nodes",
    "/apis/gateway.networking.k8s.io/v1/httproutes",
    "/apis/gateway.networking.k8s.io/v1/grpcroutes",
    "/apis/weft.dev/v1alpha1/workloads",
    "/apis/weft.dev/v1alpha1/authorizationpolicies",
    "/apis/weft.dev/v1alpha1/jwtpolicies",
    "/apis/weft.dev/v1alpha1/trafficpolicies",
    "/apis/weft.dev/v1alpha1/peerauthentications",
];

/// How often idle threads look at whether the server went down.
const TICK: Duration = Duration::from_millis(50);

/// A running fake API server; it stops when dropped.
pub struct ApiServer {
    port: u16,
    down: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ApiServer {
    /// Serves `objects` (collection path -> items; every path of [`COLLECTIONS`] not given is
    /// an empty list) on all addresses of `node`'s netns.
    pub fn start_in(node: &Node, objects: BTreeMap<&str, Vec<Value>>) -> ApiServer {
        let mut served: BTreeMap<String, Vec<Value>> =
            COLLECTIONS.iter().map(|p| ((*p).to_owned(), Vec::new())).collect();
        served.extend(objects.into_iter().map(|(path, items)| (path.to_owned(), items)));
        // A socket stays in the netns it was made in, whichever thread uses it later.
        let listener = node.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind the fake API server"));
        let port = listener.local_addr().expect("local addr").port();
        listener.set_nonblocking(true).expect("nonblocking listener");
        let server = ApiServer { port, down: Arc::default(), requests: Arc::default() };
        let (down, requests, served) = (Arc::clone(&server.down), Arc::clone(&server.requests), Arc::new(served));
        thread::spawn(move || {
            while !down.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (down, requests, served) = (Arc::clone(&down), Arc::clone(&requests), Arc::clone(&served));
                        thread::spawn(move || serve(stream, &served, &down, &requests));
                    }
                    Err(_) => thread::sleep(TICK),
                }
            }
        });
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Writes a KUBECONFIG at `path` that reaches this server at `address`.
    pub fn kubeconfig(&self, path: &Path, address: Ipv4Addr) -> PathBuf {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{address}:{port}\"}}}}]\n\
             users: [{{name: agent, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]\n\
             current-context: fake\n",
            port = self.port
        );
        std::fs::write(path, config).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_owned()
    }

    /// Every request so far, as "path?query".
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The listener closes (connections are refused) and open watches end.
    pub fn go_down(&self) {
        self.down.store(true, Ordering::Relaxed);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.go_down();
    }
}

/// Answers the requests of one connection (kept alive between lists) until it closes, a watch
/// ends it, or the server goes down.
fn serve(stream: TcpStream, served: &BTreeMap<String, Vec<Value>>, down: &AtomicBool, requests: &Mutex<Vec<String>>) {
    let _ = stream.set_read_timeout(Some(TICK));
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
        let Some(target) = read_request(&mut reader, down) else { return };
        requests.lock().unwrap_or_else(PoisonError::into_inner).push(target.clone());
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
        let Some(items) = served.get(path) else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                "code": 404, "message": "the server could not find the requested resource"});
            if respond(&mut writer, 404, &status).is_err() {
                return;
            }
            continue;
        };
        if params.get("watch") == Some(&"true") {
            // Nothing changes: the watch stays open, quiet, until the server goes down.
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            while !down.load(Ordering::Relaxed) {
                thread::sleep(TICK);
            }
            return;
        }
        let selected: Vec<&Value> = match params.get("fieldSelector") {
            Some(selector) => items.iter().filter(|item| selects(selector, item)).collect(),
            None => items.iter().collect(),
        };
        let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": selected});
        if respond(&mut writer, 200, &list).is_err() {
            return;
        }
    }
}

/// The next request's target ("path?query"); its headers are skipped (requests here have no
/// body). `None` when the connection closes or the server goes down.
fn read_request(reader: &mut BufReader<TcpStream>, down: &AtomicBool) -> Option<String> {
    let mut head = Vec::new();
    let mut line = String::new();
    loop {
        if down.load(Ordering::Relaxed) {
            return None;
        }
        match reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) if line.ends_with('\n') => {
                if line == "\r\n" && !head.is_empty() {
                    break;
                }
                if line != "\r\n" {
                    head.push(std::mem::take(&mut line));
                }
                line.clear();
            }
            // A partial line or a read timeout: keep what was read and look again.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
    head.first()?.split(' ').nth(1).map(str::to_owned)
}

fn respond(writer: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(
        writer,
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Whether `item` passes a field selector of one `spec.nodeName` term, URL-encoded
/// (`spec.nodeName%3Dn1`, `spec.nodeName%21%3Dn1`); a missing field reads as empty.
fn selects(selector: &str, item: &Value) -> bool {
    let selector = selector.replace("%21", "!").replace("%3D", "=");
    let node = item["spec"]["nodeName"].as_str().unwrap_or_default();
    if let Some(value) = selector.strip_prefix("spec.nodeName!=") {
        node != value
    } else if let Some(value) = selector.strip_prefix("spec.nodeName=") {
        node == value
    } else {
        panic!("the fake API server knows only spec.nodeName field selectors, not {selector}")
    }
}
