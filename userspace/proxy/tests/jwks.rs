//! JwtPolicy rules with a `jwksUri`, end to end on 127.0.0.1: a proxy serving one service whose
//! JwtPolicy names a JWKS server run by the test (http, or https with a CA made here), an
//! upstream answering 200, and a client sending tokens through the proxy. The JWKS server's
//! answer is switched by the test: not ready, a key set, a rotated key set, errors.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prometheus_client::{encoding::text::encode, registry::Registry};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::watch};
use weft_policy::{
    JwksSource, JwtPolicy, JwtRule, NodeSettings, ObjectRef, PolicyTarget, Service, ServicePort, Snapshot, TargetPort,
    Workload, compile,
};
use weft_proxy::{Identify, Identity, Metrics, Proxy, jwks};

const ISSUER: &str = "https://issuer.test";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DEADLINE: Duration = Duration::from_secs(30);
const LONG_REFRESH: Duration = Duration::from_secs(300);

// === signing keys ===

/// An EC P-256 signing key and its JWK.
struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate EC key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("EC key");
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..])});
        SigningKey { kid: kid.to_owned(), key: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk }
    }

    fn token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let claims = json!({"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 3600});
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign token")
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

// === the JWKS server ===

/// What the JWKS server answers.
#[derive(Clone)]
enum Answer {
    Status(StatusCode),
    Body(String),
}

/// A JWKS server on 127.0.0.1, plain or TLS; the test switches its answer.
struct JwksServer {
    addr: SocketAddr,
    answer: Arc<Mutex<Answer>>,
    hits: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start(answer: Answer, tls: Option<Arc<rustls::ServerConfig>>) -> JwksServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind JWKS server");
        let addr = listener.local_addr().expect("addr");
        let answer = Arc::new(Mutex::new(answer));
        let hits = Arc::new(AtomicU64::new(0));
        let (shared, counter) = (answer.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, hits, tls) = (shared.clone(), counter.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let answer = answer.lock().expect("answer").clone();
                        async move {
                            let response = match answer {
                                Answer::Status(status) => {
                                    Response::builder().status(status).body(Full::new(Bytes::new()))
                                }
                                Answer::Body(body) => Response::builder().body(Full::new(Bytes::from(body))),
                            };
                            Ok::<_, Infallible>(response.expect("response"))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(config) => {
                            // An untrusting client ends the handshake; nothing to serve then.
                            if let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer { addr, answer, hits }
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().expect("answer") = answer;
    }

    fn uri(&self, scheme: &str) -> String {
        format!("{scheme}://{}/.well-known/jwks.json", self.addr)
    }
}

/// A CA made for the test and a server config whose certificate (for 127.0.0.1) it signed.
struct TestCa {
    pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    fn new() -> TestCa {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(vec![]).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let mut leaf_params = CertificateParams::new(vec![]).expect("leaf params");
        leaf_params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(weft_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .expect("server config");
        TestCa { pem: ca.pem(), server: Arc::new(server) }
    }
}

/// A file in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("weft-jwks-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// === the proxy under test ===

/// Every connection is from an unnamed client to the service at VIP:80.
struct ToService;

impl Identify for ToService {
    fn identify(&self, _client: SocketAddrV4, _local: SocketAddrV4) -> Option<Identity> {
        Some(Identity { dst: SocketAddrV4::new(VIP, 80), src_workload: 0, svc_id: 1 })
    }
}

/// An upstream answering 200 "hello" to everything; its port.
async fn upstream() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind upstream");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    port
}

/// Service default/api at VIP:80 -> the upstream on 127.0.0.1, and, with `jwks_uri`, a
/// JwtPolicy requiring tokens of ISSUER verified with the keys there.
fn snapshot(upstream_port: u16, jwks_uri: Option<(&str, Duration)>) -> Snapshot {
    let mut api = Workload::new(ObjectRef::new("default", "api"), vec![Ipv4Addr::LOCALHOST]);
    api.labels.insert("app".into(), "api".into());
    api.cgroup = Some("/sys/fs/cgroup/api".into());
    let service = Service {
        id: ObjectRef::new("default", "api"),
        cluster_ip: Some(VIP),
        ports: vec![ServicePort {
            name: None,
            port: 80,
            target_port: TargetPort::Number(upstream_port),
            protocol: weft_policy::Protocol::Tcp,
            app_protocol: Some("http".into()),
        }],
        selector: Some(BTreeMap::from([("app".to_owned(), "api".to_owned())])),
        l7: true,
    };
    let jwt_policies = jwks_uri
        .map(|(uri, refresh_interval)| JwtPolicy {
            id: ObjectRef::new("default", "issuer"),
            targets: vec![PolicyTarget::Service("api".into())],
            rules: vec![JwtRule {
                required: true,
                ..JwtRule::new(ISSUER, JwksSource::Uri { uri: uri.to_owned(), refresh_interval })
            }],
        })
        .into_iter()
        .collect();
    Snapshot {
        node: NodeSettings {
            node_name: "n1".into(),
            proxy: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001)),
            skmsg: false,
        },
        services: vec![service],
        workloads: vec![api],
        jwt_policies,
        ..Snapshot::default()
    }
}

struct Scene {
    proxy: SocketAddr,
    upstream_port: u16,
    registry: Registry,
    fetchers: Arc<jwks::Fetchers>,
    config: watch::Sender<Option<Arc<weft_policy::Compiled>>>,
}

impl Scene {
    /// A proxy whose JwtPolicy fetches `uri` every `refresh`, trusting `ca_file` for https.
    async fn start(uri: &str, refresh: Duration, ca_file: Option<PathBuf>) -> Scene {
        let upstream_port = upstream().await;
        let compiled = compile(&snapshot(upstream_port, Some((uri, refresh))));
        assert!(compiled.rejected.is_empty(), "config rejected: {:?}", compiled.rejected);
        let (config, routes) = watch::channel(Some(Arc::new(compiled)));
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let fetchers = Arc::new(
            jwks::Fetchers::new(&jwks::Config { ca_file }, metrics.jwks_fetches.clone()).expect("JWKS fetchers"),
        );
        let proxy = Proxy::bind(weft_proxy::Config {
            listen: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0),
            detect_timeout: Duration::from_millis(100),
            access_log_sample: 0.0,
            otlp: None,
            trace_sample: 0.0,
            node_name: "n1".into(),
        })
        .await
        .expect("bind proxy");
        let addr = proxy.local_addr().expect("proxy addr");
        tokio::spawn(proxy.run(routes, Arc::new(ToService), metrics, None, None, fetchers.clone()));
        Scene { proxy: addr, upstream_port, registry, fetchers, config }
    }

    /// One GET through the proxy with `token` as a bearer token: (status, body).
    async fn get(&self, token: &str) -> (u16, String) {
        let stream = tokio::net::TcpStream::connect(self.proxy).await.expect("connect to the proxy");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        let request = Request::get("/data")
            .header("host", "api.default.svc.cluster.local")
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = tokio::time::timeout(DEADLINE, send.send_request(request))
            .await
            .expect("an answer in time")
            .expect("an answer");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).trim_end().to_owned())
    }

    /// Sends `token` until the answer satisfies `done`; the last answer. Panics with `what` and
    /// the last answer at the deadline.
    async fn until(&self, token: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (status, body) = self.get(token).await;
            if done(status, &body) {
                return (status, body);
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: still {status} {body:?} after {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `weft_proxy_jwks_fetches_total` for `uri` and `result`.
    fn fetches(&self, uri: &str, result: &str) -> f64 {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("encode metrics");
        let labels = [format!("uri=\"{uri}\""), format!("result=\"{result}\"")];
        text.lines()
            .filter(|l| l.starts_with("weft_proxy_jwks_fetches_total{") && labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `weft_proxy_jwks_fetches_total{uri,result}` reaches `at_least`.
    async fn wait_fetches(&self, uri: &str, result: &str, at_least: f64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.fetches(uri, result) < at_least {
            assert!(tokio::time::Instant::now() < deadline, "no {at_least} fetches of {uri} with result {result}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_with_the_reason_until_the_first_fetch_then_accepted() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start(Answer::Status(StatusCode::SERVICE_UNAVAILABLE), None).await;
    let uri = server.uri("http");
    let scene = Scene::start(&uri, LONG_REFRESH, None).await;

    let (_, body) = scene
        .until(&key.token(), "401 naming the failed fetch", |status, body| status == 401 && body.contains("503"))
        .await;
    let want =
        format!("JwtPolicy default/issuer rule 0: JWKS from {uri} not fetched yet: answered 503 Service Unavailable");
    assert_eq!(body, want);
    assert!(scene.fetches(&uri, "status") >= 1.0);

    server.answer(Answer::Body(jwks(&[&key])));
    let (_, body) = scene.until(&key.token(), "the token accepted once fetched", |status, _| status == 200).await;
    assert_eq!(body, "hello");
    assert!(scene.fetches(&uri, "ok") >= 1.0);
    let dump = scene.fetchers.dump();
    assert_eq!(dump["uris"][0]["uri"], uri.as_str());
    assert_eq!(dump["uris"][0]["kids"], json!(["k1"]));
    assert!(dump["uris"][0]["fetched_at_ms"].is_u64(), "{dump}");

    let stranger = SigningKey::new("k1");
    let (status, body) = scene.get(&stranger.token()).await;
    assert_eq!(
        (status, body.as_str()),
        (401, "the JWT's signature does not verify"),
        "a key of the same kid, not the issuer's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_early_when_a_token_names_it() {
    let (old, new) = (SigningKey::new("k1"), SigningKey::new("k2"));
    let server = JwksServer::start(Answer::Body(jwks(&[&old])), None).await;
    let uri = server.uri("http");
    // The interval is far off, and no request asks for a fetch before the first one is done:
    // only the refetch a token with the new kid asks for can pick up the rotation.
    let scene = Scene::start(&uri, LONG_REFRESH, None).await;
    scene.wait_fetches(&uri, "ok", 1.0).await;
    assert_eq!(scene.get(&old.token()).await.0, 200);

    server.answer(Answer::Body(jwks(&[&new])));
    scene.until(&new.token(), "the rotated key accepted", |status, _| status == 200).await;
    assert!(scene.fetches(&uri, "ok") >= 2.0);
    assert_eq!(scene.fetchers.dump()["uris"][0]["kids"], json!(["k2"]));

    let (status, body) = scene.get(&old.token()).await;
    assert_eq!(status, 401, "the retired key is gone with the old set: {body}");
    assert_eq!(body, "the JWT names a signing key (kid) the issuer's JWKS does not have");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_keeps_the_last_good_keys() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start(Answer::Body(jwks(&[&key])), None).await;
    let uri = server.uri("http");
    let scene = Scene::start(&uri, Duration::from_millis(100), None).await;
    scene.until(&key.token(), "the key accepted", |status, _| status == 200).await;

    server.answer(Answer::Status(StatusCode::INTERNAL_SERVER_ERROR));
    scene.wait_fetches(&uri, "status", 2.0).await;
    assert_eq!(scene.get(&key.token()).await.0, 200, "still served after failed refreshes");

    server.answer(Answer::Body("{\"issuer\": \"not a key set\"}".into()));
    scene.wait_fetches(&uri, "not_jwks", 2.0).await;
    assert_eq!(scene.get(&key.token()).await.0, 200, "still served after a refresh that is not a JWKS");
    let error = scene.fetchers.dump()["uris"][0]["last_error"].clone();
    assert_eq!(error, "the answer is not a JSON Web Key Set: no \"keys\" list; a JWKS is {\"keys\": [...]}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_no_policy_names_stops_being_fetched() {
    let key = SigningKey::new("k1");
    let server = JwksServer::start(Answer::Body(jwks(&[&key])), None).await;
    let uri = server.uri("http");
    let refresh = Duration::from_millis(50);
    let scene = Scene::start(&uri, refresh, None).await;
    scene.wait_fetches(&uri, "ok", 2.0).await;

    scene.config.send_replace(Some(Arc::new(compile(&snapshot(scene.upstream_port, None)))));
    scene.until("not.a.token", "the new config: no JwtPolicy left to refuse tokens", |status, _| status == 200).await;
    assert_eq!(scene.fetchers.dump()["uris"], json!([]));
    // Ten intervals without a fetch: the fetcher is gone, not slow.
    let before = server.hits.load(Ordering::SeqCst);
    tokio::time::sleep(refresh * 10).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_is_verified_against_the_configured_ca() {
    let key = SigningKey::new("k1");
    let trusted = TestCa::new();
    let server = JwksServer::start(Answer::Body(jwks(&[&key])), Some(trusted.server.clone())).await;
    let uri = server.uri("https");
    let ca_file = TempFile::new("ca.pem", &trusted.pem);

    let scene = Scene::start(&uri, LONG_REFRESH, Some(ca_file.0.clone())).await;
    let (_, body) = scene.until(&key.token(), "the key fetched over https", |status, _| status == 200).await;
    assert_eq!(body, "hello");
    assert_eq!(scene.fetchers.dump()["trust"], ca_file.0.display().to_string());

    // The same server, and a proxy trusting another CA only.
    let other_file = TempFile::new("other-ca.pem", &TestCa::new().pem);
    let untrusting = Scene::start(&uri, LONG_REFRESH, Some(other_file.0.clone())).await;
    let (_, body) = untrusting
        .until(&key.token(), "401 naming the TLS failure", |status, body| status == 401 && body.contains("TLS"))
        .await;
    assert!(
        body.starts_with(&format!(
            "JwtPolicy default/issuer rule 0: JWKS from {uri} not fetched yet: TLS with 127.0.0.1 failed"
        )),
        "{body}"
    );
    assert!(untrusting.fetches(&uri, "tls") >= 1.0);
    assert_eq!(untrusting.fetches(&uri, "ok"), 0.0);
}

#[test]
fn a_ca_file_that_is_not_pem_stops_the_start() {
    let file = TempFile::new("not-pem", "hello");
    let config = jwks::Config { ca_file: Some(file.0.clone()) };
    let err = jwks::Fetchers::new(&config, Default::default()).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("no usable CA certificate") && text.contains("--jwks-ca-file"), "{text}");
    let missing = jwks::Config { ca_file: Some(file.0.with_extension("missing")) };
    let err = jwks::Fetchers::new(&missing, Default::default()).err().expect("refused");
    assert!(err.to_string().contains("cannot read it"), "{err}");
}
