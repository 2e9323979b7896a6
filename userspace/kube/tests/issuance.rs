//! Certificate issuance in Kubernetes mode: a real HTTPS issuer and the agent's client, with a
//! fake API server answering the TokenReviews and pod lookups. An agent gets the identities of
//! its own node's pods and nothing else; the certificates it gets carry its own key and work for
//! mesh mTLS; the CA lives in a Secret created once; the bundle is published for agents.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use weft_identity::{
    Ca, CertSlot, CertStore, Error, Expected, Issuer, SpiffeId, TrustBundle, client_config, issuance, peer_identity,
    server_config, spiffe_id_of,
};
use weft_kube::issuance::{BUNDLE_CONFIG_MAP, CA_SECRET, Issuance, RemoteIssuer, TOKEN_AUDIENCE};

const TD: &str = "cluster.local";
const AGENT_SA: &str = "weft-system/weft-agent";
const WAIT: Duration = Duration::from_secs(20);

type Body = BoxBody<Bytes, Infallible>;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn controller_id() -> SpiffeId {
    id("weft-system", "weft-controller")
}

/// A pod `namespace/name` with service account `sa` on `node`.
fn pod(namespace: &str, name: &str, sa: &str, node: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {"phase": phase},
    })
}

/// What the fake API server knows, and what it was asked.
#[derive(Default)]
struct Cluster {
    pods: Vec<Value>,
    secrets: BTreeMap<String, Value>,
    /// Answer a Secret create with 409 (another replica won), after storing it.
    race_secret: bool,
    requests: Vec<(Method, String, Value)>,
}

impl Cluster {
    /// The TokenReview status for `token`: agents of node-a (with the node claim) and node-b
    /// (pod-bound only, as before Kubernetes 1.30), another service account, or nobody.
    fn review(token: &str, audiences: &Value) -> Value {
        if audiences != &json!([TOKEN_AUDIENCE]) {
            return json!({"authenticated": false, "error": "token audiences do not match"});
        }
        let agent = "system:serviceaccount:weft-system:weft-agent";
        match token {
            "agent-a" => json!({"authenticated": true, "audiences": [TOKEN_AUDIENCE], "user": {"username": agent,
                "extra": {"authentication.kubernetes.io/node-name": ["node-a"], "authentication.kubernetes.io/pod-name": ["weft-agent-a"]}}}),
            "agent-b" => json!({"authenticated": true, "audiences": [TOKEN_AUDIENCE], "user": {"username": agent,
                "extra": {"authentication.kubernetes.io/pod-name": ["weft-agent-b"], "authentication.kubernetes.io/pod-uid": ["uid-weft-agent-b"]}}}),
            "app" => {
                json!({"authenticated": true, "audiences": [TOKEN_AUDIENCE], "user": {"username": "system:serviceaccount:shop:web",
                "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}})
            }
            _ => json!({"authenticated": false, "error": "invalid bearer token"}),
        }
    }

    fn answer(&mut self, method: &Method, path: &str, query: &str, body: Value) -> (StatusCode, Value) {
        self.requests.push((method.clone(), format!("{path}?{query}"), body.clone()));
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
                let status =
                    Cluster::review(body["spec"]["token"].as_str().unwrap_or_default(), &body["spec"]["audiences"]);
                let mut review = body;
                review["status"] = status;
                (StatusCode::CREATED, review)
            }
            ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
                let node = query
                    .split('&')
                    .find_map(|p| p.strip_prefix("fieldSelector=spec.nodeName%3D"))
                    .expect("pods are listed by node");
                let items: Vec<&Value> = self
                    .pods
                    .iter()
                    .filter(|p| p["metadata"]["namespace"] == *ns && p["spec"]["nodeName"] == node)
                    .collect();
                (StatusCode::OK, json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}))
            }
            ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
                match self.pods.iter().find(|p| p["metadata"]["namespace"] == *ns && p["metadata"]["name"] == *name) {
                    Some(pod) => (StatusCode::OK, pod.clone()),
                    None => not_found(),
                }
            }
            ("GET", ["api", "v1", "namespaces", _, "secrets", name]) => match self.secrets.get(*name) {
                Some(secret) => (StatusCode::OK, secret.clone()),
                None => not_found(),
            },
            ("POST", ["api", "v1", "namespaces", _, "secrets"]) => {
                let name = body["metadata"]["name"].as_str().unwrap().to_owned();
                self.secrets.insert(name, body.clone());
                match self.race_secret {
                    true => (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "already exists"}),
                    ),
                    false => (StatusCode::CREATED, body),
                }
            }
            ("PATCH", ["api", "v1", "namespaces", _, "configmaps", _]) => (StatusCode::OK, body),
            _ => panic!("unexpected API request {method} {path}?{query}"),
        }
    }
}

fn assert_declared(cluster: &Mutex<Cluster>) {
    use weft_kube::issuance::{CLUSTER_ACCESS, NAMESPACE_ACCESS};
    for (method, path, _) in &cluster.lock().unwrap().requests {
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (access, namespace) = match (method.as_str(), segments.as_slice()) {
            ("POST", ["apis", group, _, resource]) => ((*group, *resource, "create"), None),
            ("GET", ["api", _, "namespaces", ns, resource]) => (("", *resource, "list"), Some(*ns)),
            ("GET", ["api", _, "namespaces", ns, resource, _]) => (("", *resource, "get"), Some(*ns)),
            ("POST", ["api", _, "namespaces", ns, resource]) => (("", *resource, "create"), Some(*ns)),
            ("PATCH", ["api", _, "namespaces", ns, resource, _]) => (("", *resource, "patch"), Some(*ns)),
            other => panic!("an undeclared request {other:?}"),
        };
        let declared = CLUSTER_ACCESS.contains(&access)
            || (NAMESPACE_ACCESS.contains(&access) && namespace == Some("weft-system"));
        assert!(declared, "{method} {path} needs {access:?}, which issuance does not declare");
    }
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
    )
}

/// A kube client whose requests `cluster` answers.
fn api(cluster: Arc<Mutex<Cluster>>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.expect("request body").to_bytes();
            let body: Value =
                if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("JSON body") };
            let (status, value) = cluster.lock().unwrap().answer(
                &parts.method,
                parts.uri.path(),
                parts.uri.query().unwrap_or_default(),
                body,
            );
            let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
            *response.status_mut() = status;
            respond.send_response(response);
        }
    });
    kube::Client::new(service, "default")
}

struct Setup {
    addr: String,
    bundle: TrustBundle,
    ca: Arc<Ca>,
    cluster: Arc<Mutex<Cluster>>,
    dir: PathBuf,
}

impl Setup {
    /// An issuer on 127.0.0.1 presenting `presents`, and pods: shop/web on node-a, shop/db on
    /// node-b, shop/batch (finished) on node-a.
    async fn start(presents: SpiffeId) -> Setup {
        let ca = Arc::new(Ca::generate(TD).unwrap());
        let bundle = TrustBundle::from_ca(&ca);
        let cluster = Arc::new(Mutex::new(Cluster {
            pods: vec![
                pod("shop", "web-1", "web", "node-a", "Running"),
                pod("shop", "db-1", "db", "node-b", "Running"),
                pod("shop", "batch-1", "batch", "node-a", "Succeeded"),
                pod("weft-system", "weft-agent-b", "weft-agent", "node-b", "Running"),
            ],
            ..Cluster::default()
        }));
        let issuance = Arc::new(Issuance {
            ca: ca.clone(),
            bundle: bundle.clone(),
            client: api(cluster.clone()),
            agent_service_account: AGENT_SA.into(),
            ttl: Duration::from_secs(3600),
        });
        let slot = Arc::new(CertSlot::new(ca.issue(&presents, Duration::from_secs(3600)).unwrap()).unwrap());
        let tls = issuance::server_config(slot).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(weft_kube::issuance::serve(listener, tls, issuance));
        let dir = std::env::temp_dir().join(format!("weft-issuance-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        Setup { addr, bundle, ca, cluster, dir }
    }

    /// The agent's client, with `token` in its token file.
    fn agent(&self, token: &str) -> RemoteIssuer {
        let path = self.dir.join(format!("token-{token}"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        RemoteIssuer::new(self.addr.clone(), controller_id(), &self.bundle, path).unwrap()
    }

    /// Every API request so far is one of the accesses issuance declares (which the
    /// controller's RBAC grants), namespaced ones in the controller's namespace.
    fn assert_declared(&self) {
        assert_declared(&self.cluster);
    }

    fn reviews(&self) -> usize {
        self.cluster.lock().unwrap().requests.iter().filter(|(_, path, _)| path.contains("tokenreviews")).count()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos().into()
}

async fn issue(issuer: &RemoteIssuer, id: &SpiffeId) -> Result<weft_identity::WorkloadCert, Error> {
    tokio::time::timeout(WAIT, issuer.issue(id)).await.expect("issuance answers")
}

fn refusal(result: Result<weft_identity::WorkloadCert, Error>) -> String {
    match result {
        Ok(cert) => panic!("expected a refusal, got a certificate for {}", cert.id),
        Err(e @ Error::Remote { .. }) => e.to_string(),
        Err(e) => panic!("expected the issuer's refusal, got {e}"),
    }
}

#[tokio::test]
async fn an_agent_gets_the_identities_of_its_own_nodes_pods_only() {
    let setup = Setup::start(controller_id()).await;
    let agent_a = setup.agent("agent-a");

    let web = id("shop", "web");
    let cert = issue(&agent_a, &web).await.expect("shop/web runs on node-a");
    assert_eq!(cert.id, web);
    assert_eq!(spiffe_id_of(&cert.chain[0]).unwrap(), web, "the leaf names the identity asked for");
    let life = cert.not_after.duration_since(cert.issued_at).unwrap();
    assert!(life <= Duration::from_secs(3600) && life > Duration::from_secs(3500), "the issuer's ttl: {life:?}");

    let db = refusal(issue(&agent_a, &id("shop", "db")).await);
    assert!(db.contains("403") && db.contains("node node-a") && db.contains("own node"), "{db}");
    let finished = refusal(issue(&agent_a, &id("shop", "batch")).await);
    assert!(finished.contains("403"), "a finished pod's identity is not handed out: {finished}");
    let nowhere = refusal(issue(&agent_a, &id("other", "web")).await);
    assert!(nowhere.contains("403"), "{nowhere}");

    // node-b's agent, whose token names its pod but not its node.
    let agent_b = setup.agent("agent-b");
    issue(&agent_b, &id("shop", "db")).await.expect("shop/db runs on node-b");
    let web_from_b = refusal(issue(&agent_b, &id("shop", "web")).await);
    assert!(web_from_b.contains("node node-b"), "{web_from_b}");
    setup.assert_declared();
}

#[tokio::test]
async fn only_the_agents_service_account_is_served() {
    let setup = Setup::start(controller_id()).await;
    let web = id("shop", "web");

    let app = refusal(issue(&setup.agent("app"), &web).await);
    assert!(app.contains("403") && app.contains("system:serviceaccount:shop:web may not"), "{app}");
    let forged = refusal(issue(&setup.agent("forged"), &web).await);
    assert!(forged.contains("401") && forged.contains("invalid bearer token"), "{forged}");
    assert_eq!(setup.reviews(), 2, "every request's token is reviewed");

    let missing = setup.dir.join("no-such-token");
    let no_file = RemoteIssuer::new(setup.addr.clone(), controller_id(), &setup.bundle, missing).unwrap();
    let no_token = issue(&no_file, &web).await.expect_err("no token, no request").to_string();
    assert!(no_token.contains("reading the service-account token"), "{no_token}");
    assert_eq!(setup.reviews(), 2, "nothing was sent");

    // The issuer refuses without a token at all, and names what to send.
    let request = issuance::PendingCert::new(&web).unwrap().1;
    let (status, body) = post_raw(&setup, None, serde_json::to_vec(&request).unwrap()).await;
    assert_eq!(status, 401);
    assert!(body.contains(TOKEN_AUDIENCE), "{body}");
}

#[tokio::test]
async fn the_issuer_must_present_the_controllers_identity() {
    let setup = Setup::start(id("shop", "web")).await;
    let error = issue(&setup.agent("agent-a"), &id("shop", "web")).await.expect_err("an impostor issuer").to_string();
    assert!(error.contains("TLS handshake"), "{error}");
    assert_eq!(setup.reviews(), 0, "the token is never sent to an impostor");
}

#[tokio::test]
async fn bad_requests_are_refused_with_what_to_fix() {
    let setup = Setup::start(controller_id()).await;
    let (status, body) = post_raw(&setup, Some("agent-a"), b"{}".to_vec()).await;
    assert_eq!(status, 400);
    assert!(body.contains("not an issue request"), "{body}");
    let bad_csr = json!({"identity": id("shop", "web").to_string(), "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"});
    let (status, body) = post_raw(&setup, Some("agent-a"), bad_csr.to_string().into_bytes()).await;
    assert_eq!(status, 400);
    assert!(body.contains("signing request is not usable"), "{body}");
    let foreign = json!({"identity": "spiffe://other.org/ns/shop/sa/web", "csr": issuance::PendingCert::new(&id("shop", "web")).unwrap().1.csr});
    let (status, body) = post_raw(&setup, Some("agent-a"), foreign.to_string().into_bytes()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("trust domain"), "{body}");
}

/// Certificates from the issuer, through two cert stores (two nodes' proxies), make a mutual
/// TLS connection in which each side sees the other's identity.
#[tokio::test]
async fn issued_certificates_carry_mesh_mtls() {
    let setup = Setup::start(controller_id()).await;
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let node_a = CertStore::new(Arc::new(setup.agent("agent-a")));
    let node_b = CertStore::new(Arc::new(setup.agent("agent-b")));
    let client_slot = node_a.get(&web).await.expect("web's certificate on node-a");
    let server_slot = node_b.get(&db).await.expect("db's certificate on node-b");
    assert_eq!(node_a.ids(), vec![web.clone()]);

    let server = server_config(server_slot, &setup.bundle).unwrap();
    let client = client_config(client_slot, &setup.bundle, Expected::Ids(vec![db.clone()])).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.unwrap();
        let peer = peer_identity(tls.get_ref().1);
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        peer
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls =
        tokio_rustls::TlsConnector::from(client).connect(name, tcp).await.expect("mTLS with issued certificates");
    assert_eq!(peer_identity(tls.get_ref().1), Some(db));
    tls.write_all(b"x").await.unwrap();
    assert_eq!(accept.await.unwrap(), Some(web));
    // Every certificate was signed by the cluster's CA, never by a node.
    assert_eq!(setup.bundle.roots(), &[setup.ca.root().clone()]);
}

#[tokio::test]
async fn the_ca_is_created_once_in_its_secret_and_its_bundle_published() {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let client = api(cluster.clone());
    let (ca, bundle) = weft_kube::issuance::load_or_create_ca(&client, "weft-system", TD).await.expect("created");
    {
        let cluster = cluster.lock().unwrap();
        let secret = &cluster.secrets[CA_SECRET];
        assert_eq!(secret["metadata"]["name"], CA_SECRET);
        assert!(secret["data"]["ca.key"].is_string() && secret["data"]["ca.crt"].is_string());
    }
    // A second start (or replica) loads the same root.
    let (again, _) = weft_kube::issuance::load_or_create_ca(&client, "weft-system", TD).await.expect("loaded");
    assert_eq!(again.root(), ca.root());
    assert_eq!(bundle.roots(), &[ca.root().clone()]);

    weft_kube::issuance::publish_bundle(&client, "weft-system", &bundle).await.expect("published");
    let cluster = cluster.lock().unwrap();
    let (method, path, body) = cluster.requests.last().unwrap();
    assert_eq!(method, Method::PATCH);
    assert!(
        path.contains(&format!("configmaps/{BUNDLE_CONFIG_MAP}")) && path.contains("fieldManager=weft-controller"),
        "{path}"
    );
    assert_eq!(body["data"]["roots.pem"], bundle.to_pem());
}

#[tokio::test]
async fn a_replica_that_loses_the_race_uses_the_winners_root() {
    let cluster = Arc::new(Mutex::new(Cluster { race_secret: true, ..Cluster::default() }));
    let client = api(cluster.clone());
    let (ca, _) = weft_kube::issuance::load_or_create_ca(&client, "weft-system", TD).await.expect("the winner's root");
    let stored = cluster.lock().unwrap().secrets[CA_SECRET]["data"]["ca.crt"].as_str().unwrap().to_owned();
    let stored = String::from_utf8(base64_decode(&stored)).unwrap();
    assert_eq!(ca.root_pem(), stored);

    // A Secret without the key is reported with what to do.
    cluster.lock().unwrap().secrets.insert(
        CA_SECRET.into(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET}, "data": {}}),
    );
    let error = weft_kube::issuance::load_or_create_ca(&client, "weft-system", TD).await.expect_err("no root in it");
    assert!(format!("{error:#}").contains("needs ca.crt and ca.key"), "{error:#}");
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value: k8s_openapi::ByteString = serde_json::from_value(json!(text)).unwrap();
    value.0
}

/// POSTs `body` to the issuer as a client would, without the client's checks.
async fn post_raw(setup: &Setup, token: Option<&str>, body: Vec<u8>) -> (u16, String) {
    let tls = issuance::client_config(&setup.bundle, Expected::Ids(vec![controller_id()])).unwrap();
    let tcp = tokio::net::TcpStream::connect(&setup.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("weft-controller").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let (mut send, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(connection);
    let mut request = Request::post(issuance::ISSUE_PATH).header("host", "weft-controller");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = send.send_request(request.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The controller's whole start: root created, bundle published, the issuer serving with its
/// own identity; an agent that trusts only the published bundle obtains a certificate.
#[tokio::test]
async fn a_started_issuer_serves_agents_that_trust_the_published_bundle() {
    let cluster = Arc::new(Mutex::new(Cluster {
        pods: vec![pod("shop", "web-1", "web", "node-a", "Running")],
        ..Cluster::default()
    }));
    let config = weft_kube::issuance::IssuerConfig {
        namespace: "weft-system".into(),
        service_account: "weft-controller".into(),
        trust_domain: TD.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        agent_service_account: AGENT_SA.into(),
        ttl: Duration::from_secs(600),
    };
    let issuer = weft_kube::issuance::start_issuer(api(cluster.clone()), &config).await.expect("started");
    let published = {
        let cluster = cluster.lock().unwrap();
        let (_, _, body) = cluster
            .requests
            .iter()
            .find(|(m, p, _)| m == Method::PATCH && p.contains("configmaps"))
            .expect("published");
        body["data"]["roots.pem"].as_str().unwrap().to_owned()
    };
    let bundle = TrustBundle::from_pem(TD, &published).unwrap();
    let dir = std::env::temp_dir().join(format!("weft-issuer-start-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "agent-a").unwrap();
    let agent = RemoteIssuer::new(issuer.addr.to_string(), controller_id(), &bundle, dir.join("token")).unwrap();
    let cert = issue(&agent, &id("shop", "web")).await;
    let _ = std::fs::remove_dir_all(&dir);
    let cert = cert.expect("issued");
    let life = cert.not_after.duration_since(cert.issued_at).unwrap();
    assert!(life <= Duration::from_secs(600) && life > Duration::from_secs(590), "the configured ttl: {life:?}");
    assert_declared(&cluster);
    drop(issuer);
}
