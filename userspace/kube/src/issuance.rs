//! Workload certificates in Kubernetes mode: weft-controller signs, agents ask.
//!
//! An agent makes a key for each identity its node's pods need and sends a signing request over
//! HTTPS ([`RemoteIssuer`]); its private keys never leave the node. The issuer ([`Issuance`])
//! answers only an agent, and only for identities of pods scheduled on that agent's own node:
//! - the agent proves who it is with a service-account token bound to its pod and meant for
//!   [`TOKEN_AUDIENCE`], which the issuer checks with a TokenReview;
//! - the review names the agent's service account and its node (from the token's node claim,
//!   or from the pod it is bound to);
//! - the identity `spiffe://<td>/ns/<ns>/sa/<sa>` is granted when a pod of namespace `ns` with
//!   service account `sa` is scheduled on that node and not finished.
//!
//! So a compromised node can obtain the identities of its own pods, which it could use anyway,
//! and no others. The issuer presents its own SPIFFE identity, which agents check against the
//! trust bundle; it asks no client certificate (a new node has none yet).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use weft_identity::issuance::{ISSUE_PATH, IssueRequest, IssueResponse, PendingCert};
use weft_identity::{Ca, Expected, IssueFuture, Issuer, SpiffeId, TrustBundle, WorkloadCert};

/// The issuer's port on weft-controller.
pub const ISSUANCE_PORT: u16 = 15012;
/// The audience of the tokens agents present; a token minted for the API server (or anything
/// else) is not accepted.
pub const TOKEN_AUDIENCE: &str = "weft.dev/issuance";
/// The TokenReview's extra field naming the node of the pod a token is bound to (Kubernetes 1.30+).
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// Bound on a request's body: a P-256 CSR and an id are well under 2 KiB.
const MAX_REQUEST: usize = 64 * 1024;
/// Bound on an answer's body.
const MAX_RESPONSE: usize = 1024 * 1024;
/// Longest a request may take, from connecting to the last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The API access issuance uses, as (group, resource, verb): cluster-wide (every agent's token,
/// the pods of any namespace on its node) ...
pub const CLUSTER_ACCESS: [(&str, &str, &str); 2] =
    [("authentication.k8s.io", "tokenreviews", "create"), ("", "pods", "list")];
/// ... and in the controller's namespace: the CA's Secret (read, or created once), the bundle's
/// ConfigMap (server-side apply: authorized as create when new, patch after) and an agent's pod.
pub const NAMESPACE_ACCESS: [(&str, &str, &str); 5] = [
    ("", "secrets", "get"),
    ("", "secrets", "create"),
    ("", "configmaps", "create"),
    ("", "configmaps", "patch"),
    ("", "pods", "get"),
];

/// Why a request was not served, and the HTTP status that says so.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The issuing side: a CA, and the API server to check requesters with.
pub struct Issuance {
    pub ca: Arc<Ca>,
    /// The roots handed out with every certificate.
    pub bundle: TrustBundle,
    pub client: kube::Client,
    /// The agents' service account, `namespace/name`.
    pub agent_service_account: String,
    pub ttl: Duration,
}

impl Issuance {
    /// Judges and signs one request; `token` is the bearer token it came with.
    pub async fn issue(&self, token: Option<&str>, request: &IssueRequest) -> Result<IssueResponse, Refusal> {
        let id: SpiffeId = request
            .identity
            .parse()
            .map_err(|e| Refusal::BadRequest(format!("identity {:?}: {e}", request.identity)))?;
        let token = token.ok_or_else(|| {
            Refusal::Unauthenticated(format!(
                "no bearer token; send the agent's service-account token for audience {TOKEN_AUDIENCE}"
            ))
        })?;
        let node = self.authenticate(token).await?;
        self.authorize(&node, &id).await?;
        let leaf = self.ca.sign_request(&id, &request.csr, self.ttl).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        tracing::info!(%id, %node, "issued a workload certificate");
        Ok(IssueResponse {
            cert_chain: vec![pem("CERTIFICATE", &leaf)],
            roots: self.bundle.roots().iter().map(|r| pem("CERTIFICATE", r)).collect(),
        })
    }

    /// The node of the agent `token` belongs to.
    async fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("the API server could not review the token: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refusal::Unauthenticated(format!(
                "the token was not accepted ({why}); it must be a current service-account token bound to the agent's pod, for audience {TOKEN_AUDIENCE}"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = format!("system:serviceaccount:{}", self.agent_service_account.replace('/', ":"));
        if username != expected {
            return Err(Refusal::Forbidden(format!(
                "{username} may not obtain workload certificates; only the weft agent ({expected}) may"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return Ok(node);
        }
        // Before Kubernetes 1.30 a bound token names its pod but not its node.
        let (Some(pod), Some(uid)) = (first(POD_NAME_EXTRA), first(POD_UID_EXTRA)) else {
            return Err(Refusal::Unauthenticated(
                "the token is not bound to a pod; mount a projected service-account token (audience weft.dev/issuance) into the agent".into(),
            ));
        };
        let namespace = self.agent_service_account.split('/').next().unwrap_or_default();
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod)
            .await
            .map_err(|e| Refusal::Unavailable(format!("reading the agent's pod {namespace}/{pod}: {e}")))?
            .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
            .ok_or_else(|| {
                Refusal::Unauthenticated(format!("the pod the token is bound to ({namespace}/{pod}) no longer exists"))
            })?;
        pod.spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| Refusal::Forbidden("the agent's pod is not scheduled on a node".into()))
    }

    /// Whether a pod with `id`'s namespace and service account is scheduled on `node`.
    async fn authorize(&self, node: &str, id: &SpiffeId) -> Result<(), Refusal> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), id.namespace())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refusal::Unavailable(format!("listing the pods of {} on {node}: {e}", id.namespace())))?;
        let serves = |pod: &Pod| {
            let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
            on_node && sa == id.service_account() && !matches!(phase, Some("Succeeded" | "Failed"))
        };
        if pods.items.iter().any(serves) {
            return Ok(());
        }
        Err(Refusal::Forbidden(format!(
            "no running pod of namespace {} with service account {} is scheduled on node {node}; an agent obtains only the identities of its own node's pods",
            id.namespace(),
            id.service_account()
        )))
    }

    /// Answers one HTTP request.
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != ISSUE_PATH {
            return text(StatusCode::NOT_FOUND, format!("not found; certificates are issued at POST {ISSUE_PATH}"));
        }
        if request.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, format!("use POST {ISSUE_PATH}"));
        }
        let token = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = match Limited::new(request.into_body(), MAX_REQUEST).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
        };
        let issued = match serde_json::from_slice::<IssueRequest>(&body) {
            Ok(request) => self.issue(token.as_deref(), &request).await,
            Err(e) => Err(Refusal::BadRequest(format!(
                "the body is not an issue request ({e}); send {{\"identity\", \"csr\"}} as JSON"
            ))),
        };
        match issued {
            Ok(answer) => {
                let mut response =
                    Response::new(Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())));
                response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                response
            }
            Err(refusal) => {
                tracing::warn!(%refusal, "refused a certificate request");
                text(refusal.status(), refusal.to_string())
            }
        }
    }
}

fn text(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message)));
    *response.status_mut() = status;
    response
}

fn pem(tag: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(tag, der.to_vec()))
}

/// Serves issuance on `listener` with `tls` (see [`weft_identity::issuance::server_config`])
/// until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, issuance: Arc<Issuance>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "issuance accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, issuance) = (acceptor.clone(), issuance.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "issuance handshake failed"),
                Err(_) => return tracing::debug!(%peer, "issuance handshake timed out"),
            };
            let service = hyper::service::service_fn(move |request| {
                let issuance = issuance.clone();
                async move { Ok::<_, Infallible>(issuance.handle(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "issuance connection ended");
            }
        });
    }
}

// === RemoteIssuer ===

/// The agent's side: a [`weft_identity::Issuer`] that asks weft-controller.
pub struct RemoteIssuer {
    /// `host:port` of the issuer.
    pub addr: String,
    /// The TLS config checking the issuer's identity (see
    /// [`weft_identity::issuance::client_config`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The projected service-account token, read again for every request (the kubelet renews it).
    pub token: PathBuf,
}

impl RemoteIssuer {
    /// An issuer at `addr` presenting `issuer_id`, checked against `bundle`.
    pub fn new(
        addr: String,
        issuer_id: SpiffeId,
        bundle: &TrustBundle,
        token: PathBuf,
    ) -> Result<Self, weft_identity::Error> {
        let tls = weft_identity::issuance::client_config(bundle, Expected::Ids(vec![issuer_id]))?;
        Ok(Self { addr, tls, token })
    }

    async fn request(&self, id: &SpiffeId) -> Result<WorkloadCert, weft_identity::Error> {
        let failed =
            |detail: String| weft_identity::Error::Remote { id: id.to_string(), addr: self.addr.clone(), detail };
        let (pending, request) = PendingCert::new(id)?;
        let token = tokio::fs::read_to_string(&self.token)
            .await
            .map_err(|e| failed(format!("reading the service-account token {}: {e}", self.token.display())))?;
        let body = serde_json::to_vec(&request).map_err(|e| failed(e.to_string()))?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.post(token.trim(), body))
            .await
            .map_err(|_| failed(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(failed)?;
        let answer: IssueResponse =
            serde_json::from_slice(&answer).map_err(|e| failed(format!("the answer is not an issue response: {e}")))?;
        pending.finish(&answer)
    }

    /// POSTs `body` and returns the answer's body, or why there is none.
    async fn post(&self, token: &str, body: Vec<u8>) -> Result<Bytes, String> {
        let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(host, _)| host);
        let tcp = TcpStream::connect(&self.addr).await.map_err(|e| format!("connecting: {e}"))?;
        let _ = tcp.set_nodelay(true);
        // The name is only sent as SNI; the issuer is checked by its SPIFFE id.
        let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{host} is not a host name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::post(ISSUE_PATH)
            .header(header::HOST, self.addr.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = send.send_request(request).await.map_err(|e| format!("sending the request: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok(body)
    }
}

impl Issuer for RemoteIssuer {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(self.request(id))
    }
}

// === The CA's home in the cluster ===

/// The Secret (in the controller's namespace) holding the root: `ca.crt`, `ca.key`, and
/// optionally `extra-roots.pem`, more roots to trust while a root is being replaced.
pub const CA_SECRET: &str = "weft-ca";
/// The ConfigMap (same namespace) where the trust bundle is published for agents to mount:
/// key [`BUNDLE_KEY`].
pub const BUNDLE_CONFIG_MAP: &str = "weft-trust-bundle";
pub const BUNDLE_KEY: &str = "roots.pem";
const FIELD_MANAGER: &str = "weft-controller";

/// The mesh's root from the Secret [`CA_SECRET`] in `namespace`, created on first start (a
/// replica that loses the race to create it reads the winner's), and the trust bundle: the root
/// plus the Secret's `extra-roots.pem`.
pub async fn load_or_create_ca(
    client: &kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<(Ca, TrustBundle)> {
    use anyhow::Context as _;
    use k8s_openapi::api::core::v1::Secret;
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let origin = format!("Secret {namespace}/{CA_SECRET}");
    let secret = match secrets.get_opt(CA_SECRET).await.with_context(|| format!("reading {origin}"))? {
        Some(secret) => secret,
        None => {
            let ca = Ca::generate(trust_domain)?;
            let data = [("ca.crt", ca.root_pem()), ("ca.key", ca.key_pem())]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.into_bytes())))
                .collect();
            let secret = Secret {
                metadata: kube::api::ObjectMeta { name: Some(CA_SECRET.into()), ..Default::default() },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => {
                    tracing::info!(secret = %origin, trust_domain, "created the mesh's root CA");
                    created
                }
                // Another replica made one first: use that.
                Err(kube::Error::Api(e)) if e.code == 409 => secrets
                    .get(CA_SECRET)
                    .await
                    .with_context(|| format!("reading {origin} after losing the race to create it"))?,
                Err(e) => return Err(e).with_context(|| format!("creating {origin}")),
            }
        }
    };
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| {
        data.get(key).map(|v| String::from_utf8_lossy(&v.0).into_owned()).with_context(|| {
            format!("{origin} has no {key:?}; it needs ca.crt and ca.key (PEM), or delete it to have a new root made")
        })
    };
    let ca = Ca::from_pem(trust_domain, &text("ca.crt")?, &text("ca.key")?).with_context(|| origin.clone())?;
    let mut bundle = TrustBundle::from_ca(&ca);
    if let Ok(extra) = text("extra-roots.pem") {
        bundle.add_pem(&extra).with_context(|| format!("{origin}: extra-roots.pem"))?;
    }
    Ok((ca, bundle))
}

/// Writes `bundle` to the ConfigMap [`BUNDLE_CONFIG_MAP`] in `namespace` (server-side apply).
pub async fn publish_bundle(client: &kube::Client, namespace: &str, bundle: &TrustBundle) -> Result<(), kube::Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let config_map = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": BUNDLE_CONFIG_MAP, "namespace": namespace},
        "data": {BUNDLE_KEY: bundle.to_pem()},
    });
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(BUNDLE_CONFIG_MAP, &params, &kube::api::Patch::Apply(&config_map))
        .await
        .map(drop)
}

/// What weft-controller needs to serve issuance.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// The controller's namespace: the CA Secret, the bundle ConfigMap and its identity's.
    pub namespace: String,
    /// The controller's service account: its own identity is `ns/<namespace>/sa/<this>`.
    pub service_account: String,
    pub trust_domain: String,
    pub listen: std::net::SocketAddr,
    /// See [`Issuance::agent_service_account`].
    pub agent_service_account: String,
    pub ttl: Duration,
}

/// A running issuer: dropping it stops serving and renewing the issuer's own certificate.
pub struct RunningIssuer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _rotation: weft_identity::Rotation,
}

impl Drop for RunningIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Loads (or creates) the CA, publishes the bundle, gives the issuer its own rotating
/// certificate and starts serving on `config.listen`.
pub async fn start_issuer(client: kube::Client, config: &IssuerConfig) -> anyhow::Result<RunningIssuer> {
    use anyhow::Context as _;
    let (ca, bundle) = load_or_create_ca(&client, &config.namespace, &config.trust_domain).await?;
    publish_bundle(&client, &config.namespace, &bundle).await.with_context(|| {
        format!("publishing the trust bundle in ConfigMap {}/{BUNDLE_CONFIG_MAP}", config.namespace)
    })?;
    let ca = Arc::new(ca);
    let own = SpiffeId::new(&config.trust_domain, &config.namespace, &config.service_account)?;
    let local = weft_identity::LocalIssuer { ca: ca.clone(), ttl: config.ttl };
    let slot = Arc::new(weft_identity::CertSlot::new(ca.issue(&own, config.ttl)?)?);
    let rotation = weft_identity::spawn_rotation(slot.clone(), Arc::new(local))?;
    let tls = weft_identity::issuance::server_config(slot)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("the issuer cannot listen on {}; is the port free?", config.listen))?;
    let addr = listener.local_addr()?;
    let issuance = Arc::new(Issuance {
        ca,
        bundle,
        client,
        agent_service_account: config.agent_service_account.clone(),
        ttl: config.ttl,
    });
    tracing::info!(%addr, identity = %own, "issuing workload certificates");
    Ok(RunningIssuer { addr, task: tokio::spawn(serve(listener, tls, issuance)), _rotation: rotation })
}
