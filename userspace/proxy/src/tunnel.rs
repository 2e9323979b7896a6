//! The tunnel between nodes (HBONE-like): a node proxy reaches a workload on another node over
//! one pooled mutual-TLS HTTP/2 connection per (source identity, destination node, destination
//! identity), carrying each connection as one `CONNECT` stream whose `:authority` is the
//! original destination (the workload's IP:port). An operator may ask for a few connections
//! per key instead ([`Tunnels::with_connections`]); new streams then take them in turn.
//!
//! Both ends present workload identities, never a node's: the dialling end the source
//! workload's certificate, the accepting end the destination workload's, which the dialler
//! names in SNI ([`server_name`]) and expects ([`Expected::Ids`]). The accepting end checks
//! that the stream's target really is that workload (a certificate for one workload does not
//! open streams to another), asks the node's policy ([`Inbound::admit`]) and connects to the
//! workload on its own node.

use std::{
    collections::HashMap,
    fmt,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{
    pki_types::{DnsName, ServerName},
    server::{Acceptor, ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::BufWriter,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::{
    h2stream::{H2Stream, splice},
    slots::Slots,
};
use weft_identity::{CertStore, Expected, SpiffeId, TrustBundle, client_config, peer_identity, server_config};

/// Where every node proxy accepts tunnels (the port Istio's HBONE uses).
pub use weft_policy::TUNNEL_PORT;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows: one stream may carry a bulk transfer, one connection many streams.
const STREAM_WINDOW: u32 = 4 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// The largest DATA frame either end accepts: a splice's socket read (64 KiB) goes out as one
/// frame and one write of TLS records, not four flushes of 16 KiB.
const MAX_FRAME: u32 = 64 << 10;
/// Encrypted bytes rustls holds before a write must wait for the socket: room for a whole
/// frame and its header, so a frame goes out in one write (rustls' default is 64 KiB).
const TLS_BUFFER: usize = 256 << 10;
/// The dialling end's write buffer: frames smaller than this are gathered until h2 flushes.
const PREFACE_BUFFER: usize = 4 << 10;
/// Streams one tunnel connection carries at once; more wait for a free one.
const MAX_STREAMS: u32 = 1000;
/// SNI suffix naming a workload identity: `<sa>.<ns>.id.weft.invalid`.
const SNI_SUFFIX: &str = ".id.weft.invalid";
/// Response header carrying why the accepting end refused a stream.
pub const REASON_HEADER: &str = "x-weft-reason";

/// The identities this node may present, and the roots it trusts.
pub struct Identities {
    pub certs: CertStore,
    pub bundle: TrustBundle,
}

/// A carried connection: bytes in both directions, as a socket would.
pub type TunnelStream = H2Stream;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect to tunnel {node} failed: {source}; is port {TUNNEL_PORT} open between nodes?")]
    Connect {
        node: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with tunnel {node} as {src} to {dst} failed: {source}")]
    Tls {
        node: SocketAddr,
        src: String,
        dst: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no certificate for {id}: {reason}")]
    Identity { id: String, reason: String },
    #[error("HTTP/2 with tunnel {node}: {source}")]
    Http {
        node: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("tunnel {node} refused {target}: {status} {reason}")]
    Refused { node: SocketAddr, target: SocketAddrV4, status: StatusCode, reason: String },
}

impl TunnelError {
    /// A metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::Connect { .. } => "connect_failed",
            TunnelError::Tls { .. } => "tls_failed",
            TunnelError::Identity { .. } => "no_identity",
            TunnelError::Http { .. } => "http_error",
            TunnelError::Refused { .. } => "refused",
        }
    }
}

// === SNI ===

/// The SNI that names `id` to the accepting end, which presents that identity's certificate:
/// `<service account>.<namespace>.id.weft.invalid` (the trust domain is the mesh's one). A
/// namespace is one DNS label, so the name reads back unambiguously from the right even when a
/// service account holds dots.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, TunnelError> {
    let name = format!("{}.{}{SNI_SUFFIX}", id.service_account(), id.namespace()).to_ascii_lowercase();
    let dns = DnsName::try_from(name).map_err(|e| TunnelError::Identity {
        id: id.to_string(),
        reason: format!("its names do not form a DNS name for SNI ({e}); use DNS-1123 names"),
    })?;
    Ok(ServerName::DnsName(dns))
}

/// The identity an SNI from [`server_name`] names, in `trust_domain`.
fn id_from_server_name(name: &str, trust_domain: &str) -> Option<SpiffeId> {
    let rest = name.strip_suffix(SNI_SUFFIX)?;
    let (sa, ns) = rest.rsplit_once('.')?;
    SpiffeId::new(trust_domain, ns, sa).ok()
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabels {
    pub source_principal: String,
    pub destination_principal: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub result: &'static str,
}

#[derive(Default)]
pub struct TunnelMetrics {
    pub outbound: Family<OutboundLabels, Counter>,
    pub inbound: Family<InboundLabels, Counter>,
    pub handshakes: Family<HandshakeLabels, Counter>,
}

impl TunnelMetrics {
    /// Registers under `weft_tunnel_*`.
    pub fn register(registry: &mut Registry) -> TunnelMetrics {
        let m = TunnelMetrics::default();
        let r = registry.sub_registry_with_prefix("weft_tunnel");
        r.register("outbound_streams", "Connections this node sent through tunnels, by result.", m.outbound.clone());
        r.register(
            "inbound_streams",
            "Connections other nodes tunnelled to this node's workloads, by verified source identity and result.",
            m.inbound.clone(),
        );
        r.register("handshakes", "Tunnel TLS handshakes, by direction and result.", m.handshakes.clone());
        m
    }

    fn handshake(&self, direction: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.handshakes.get_or_create(&HandshakeLabels { direction, result }).inc();
    }
}

// === outbound ===

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: SpiffeId,
    node: SocketAddr,
    dst: SpiffeId,
    /// Which of the key's connections (0 when there is one).
    lane: usize,
}

/// The dialling side: pooled tunnel connections, opened on first use and replaced when closed.
pub struct Tunnels {
    identities: Arc<Identities>,
    metrics: Arc<TunnelMetrics>,
    conns: Slots<Key, Conn>,
    /// Connections per (source, node, destination); new streams take them in turn.
    lanes: usize,
    /// Streams opened per (source, node, destination), keyed with lane 0, when lanes > 1.
    turns: Mutex<HashMap<Key, usize>>,
}

/// One pooled tunnel connection: new streams go through `send`; `closed` is set when the
/// connection's task ends.
#[derive(Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnels").finish_non_exhaustive()
    }
}

impl Tunnels {
    pub fn new(identities: Arc<Identities>, metrics: Arc<TunnelMetrics>) -> Tunnels {
        Tunnels::with_connections(identities, metrics, 1)
    }

    /// Up to `connections` (at least one) per (source, node, destination), each opened when
    /// its turn first comes. Streams spread over several sockets share each socket's lock and
    /// queue with fewer others, for a handshake and a TLS connection's memory per extra one.
    pub fn with_connections(identities: Arc<Identities>, metrics: Arc<TunnelMetrics>, connections: usize) -> Tunnels {
        let lanes = connections.max(1);
        Tunnels { identities, metrics, conns: Slots::default(), lanes, turns: Mutex::default() }
    }

    /// Opens a connection to `target`, a workload with identity `dst` behind the tunnel at
    /// `node`, on behalf of the workload `src`.
    pub async fn open(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        target: SocketAddrV4,
    ) -> Result<TunnelStream, TunnelError> {
        let result = self.try_open(src, node, dst, target).await;
        let label = result.as_ref().map_or_else(TunnelError::kind, |_| "ok");
        self.metrics.outbound.get_or_create(&OutboundLabels { result: label }).inc();
        result
    }

    async fn try_open(
        &self,
        src: &SpiffeId,
        node: SocketAddr,
        dst: &SpiffeId,
        target: SocketAddrV4,
    ) -> Result<TunnelStream, TunnelError> {
        let mut key = Key { src: src.clone(), node, dst: dst.clone(), lane: 0 };
        if self.lanes > 1 {
            let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
            let turn = turns.entry(key.clone()).or_default();
            key.lane = *turn % self.lanes;
            *turn = turn.wrapping_add(1);
        }
        let conn = self.connection(&key).await?;
        let http = |source| TunnelError::Http { node, source };
        let mut send = conn.send.ready().await.map_err(http)?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .map_err(|e| TunnelError::Identity { id: target.to_string(), reason: e.to_string() })?;
        let (response, stream) = send.send_request(req, false).map_err(http)?;
        let response = response.await.map_err(http)?;
        if response.status() != StatusCode::OK {
            let reason =
                response.headers().get(REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            return Err(TunnelError::Refused { node, target, status: response.status(), reason });
        }
        Ok(H2Stream::new(stream, response.into_body()))
    }

    /// The key's open connection, or a new one.
    async fn connection(&self, key: &Key) -> Result<Conn, TunnelError> {
        self.conns.get_or_open(key, |conn| !conn.closed.load(Ordering::Acquire), async || self.dial(key).await).await
    }

    async fn dial(&self, key: &Key) -> Result<Conn, TunnelError> {
        let node = key.node;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(node))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))
            .and_then(|r| r)
            .map_err(|source| TunnelError::Connect { node, source })?;
        let _ = tcp.set_nodelay(true);
        let identity_error = |id: &SpiffeId, e: weft_identity::Error| TunnelError::Identity {
            id: id.to_string(),
            reason: e.to_string(),
        };
        let slot = self.identities.certs.get(&key.src).await.map_err(|e| identity_error(&key.src, e))?;
        let config = client_config(slot, &self.identities.bundle, Expected::Ids(vec![key.dst.clone()]))
            .map_err(|e| identity_error(&key.src, e))?;
        let tls_error = |source| TunnelError::Tls { node, src: key.src.to_string(), dst: key.dst.to_string(), source };
        let handshake = TlsConnector::from(config).connect(server_name(&key.dst)?, tcp);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| tls_error(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")))
            .and_then(|r| r.map_err(tls_error));
        self.metrics.handshake("outbound", tls.is_ok());
        let mut tls = tls?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
        // h2 writes its preface on its own, before the connection's first flush; buffered,
        // it leaves in one TLS record and one write with the SETTINGS and the first CONNECT.
        // (h2 flushes after every batch of frames, and writes larger than the buffer pass.)
        let tls = BufWriter::with_capacity(PREFACE_BUFFER, tls);
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake(tls)
            .await
            .map_err(|source| TunnelError::Http { node, source })?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%node, error = %e, "tunnel connection ended");
            }
            ended.store(true, Ordering::Release);
        });
        Ok(Conn { send, closed })
    }

    /// Forgets pooled connections for which `keep` is false (their streams carry on).
    pub fn retain(&self, keep: impl Fn(&SpiffeId, SocketAddr) -> bool) {
        self.conns.retain(|k| keep(&k.src, k.node));
        self.turns.lock().unwrap_or_else(PoisonError::into_inner).retain(|k, _| keep(&k.src, k.node));
    }
}

// === inbound ===

/// How the accepting end carries an admitted stream.
pub enum Admission {
    /// Spliced to the workload as bytes: its policies were judged on the connection.
    Open,
    /// Served as HTTP (the workload's policies read requests): the gate judges each request
    /// before it is forwarded.
    Http(Arc<dyn RequestGate>),
}

/// Judges each request of a stream served as HTTP.
pub trait RequestGate: Send + Sync + 'static {
    /// `Ok` to forward it, with a new URI when the path was normalised; `Err` refuses it with
    /// the status and the reason.
    fn check(&self, req: &Request<hyper::body::Incoming>) -> Result<Option<http::Uri>, (StatusCode, String)>;
}

/// What the accepting end needs from the node's state.
pub trait Inbound: Send + Sync + 'static {
    /// The identity of the workload at `target` if it runs on this node.
    fn local_identity(&self, target: SocketAddrV4) -> Option<SpiffeId>;
    /// Whether a workload with this identity runs on this node (so the node may present it).
    fn hosts(&self, id: &SpiffeId) -> bool;
    /// Whether `peer` may reach `target`, and how; the error is the reason given back and
    /// logged.
    fn admit(&self, peer: &SpiffeId, target: SocketAddrV4) -> Result<Admission, String>;
}

/// Presents the identity the dialler named in SNI; the accept loop has checked this node hosts
/// it and issued its certificate before the handshake goes on.
struct InboundCerts {
    identities: Arc<Identities>,
}

impl fmt::Debug for InboundCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundCerts").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for InboundCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = id_from_server_name(hello.server_name()?, self.identities.bundle.trust_domain())?;
        let slot = self.identities.certs.issued(&id)?;
        ResolvesServerCert::resolve(&*slot, hello)
    }
}

/// Accepts tunnels on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    identities: Arc<Identities>,
    inbound: Arc<dyn Inbound>,
    metrics: Arc<TunnelMetrics>,
) {
    let certs = Arc::new(InboundCerts { identities: identities.clone() });
    let config = match server_config(certs, &identities.bundle) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "tunnel listener has no TLS config; not accepting tunnels");
            return;
        }
    };
    let trust_domain: Arc<str> = identities.bundle.trust_domain().into();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (config, identities, inbound, metrics, td) =
            (config.clone(), identities.clone(), inbound.clone(), metrics.clone(), trust_domain.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let accept = accept_tls(tcp, config, &identities, &*inbound, &td);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(mut tls)) => {
                    tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
                    tls
                }
                Ok(Err(e)) => {
                    metrics.handshake("inbound", false);
                    tracing::info!(%peer, error = %e, "tunnel handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.handshake("inbound", false);
                    tracing::info!(%peer, "tunnel handshake timed out");
                    return;
                }
            };
            let conn = tls.get_ref().1;
            let (Some(source), Some(local)) =
                (peer_identity(conn), conn.server_name().and_then(|name| id_from_server_name(name, &td)))
            else {
                // The verifiers make this unreachable; refuse rather than guess.
                metrics.handshake("inbound", false);
                return;
            };
            metrics.handshake("inbound", true);
            let (source, local) = (Arc::new(source), Arc::new(local));
            let handshake = h2::server::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONN_WINDOW)
                .max_concurrent_streams(MAX_STREAMS)
                .max_frame_size(MAX_FRAME)
                .handshake::<_, Bytes>(tls);
            let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "tunnel HTTP/2 handshake failed"),
                Err(_) => return tracing::debug!(%peer, "tunnel HTTP/2 handshake timed out"),
            };
            // Polling for the next stream also drives the connection for the open ones.
            while let Some(next) = conn.accept().await {
                match next {
                    Ok((req, respond)) => {
                        let (inbound, metrics, source, local) =
                            (inbound.clone(), metrics.clone(), source.clone(), local.clone());
                        tokio::spawn(async move { stream(req, respond, &*inbound, &metrics, &source, &local).await });
                    }
                    Err(e) => return tracing::debug!(%peer, error = %e, "tunnel connection ended"),
                }
            }
        });
    }
}

/// The TLS handshake of one tunnel. The ClientHello comes first, so the certificate of the
/// identity it names (in SNI) can be issued, perhaps by a remote CA, before the handshake goes on.
async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    identities: &Identities,
    inbound: &dyn Inbound,
    trust_domain: &str,
) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
    let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
    let hello = start.client_hello();
    let refuse = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let id = hello
        .server_name()
        .and_then(|name| id_from_server_name(name, trust_domain))
        .ok_or_else(|| refuse("no workload identity in the ClientHello's server name".into()))?;
    if !inbound.hosts(&id) {
        return Err(refuse(format!("{id} is not an identity this node hosts")));
    }
    identities.certs.get(&id).await.map_err(|e| refuse(format!("no certificate for {id}: {e}")))?;
    start.into_stream(config).await
}

/// One `CONNECT` stream: checks, connects to the workload, then splices.
async fn stream(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    inbound: &dyn Inbound,
    metrics: &TunnelMetrics,
    source: &SpiffeId,
    local: &SpiffeId,
) {
    let count = |result| {
        let labels =
            InboundLabels { source_principal: source.to_string(), destination_principal: local.to_string(), result };
        metrics.inbound.get_or_create(&labels).inc();
    };
    let opened = open_target(&req, inbound, source, local).await;
    let (mut upstream, admission) = match opened {
        Ok(opened) => opened,
        Err((status, result, reason)) => {
            count(result);
            tracing::info!(%source, destination = %local, %reason, "tunnel stream refused");
            let mut response = Response::new(());
            *response.status_mut() = status;
            if let Ok(value) = reason.parse() {
                response.headers_mut().insert(REASON_HEADER, value);
            }
            let _ = respond.send_response(response, true);
            return;
        }
    };
    count("ok");
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return tracing::debug!(%source, error = %e, "tunnel stream ended before it opened"),
    };
    let stream = H2Stream::new(send, req.into_body());
    let ended = match admission {
        // The dialling proxy holds the idle timeout; its close ends this stream too.
        Admission::Open => splice(&mut upstream, stream, None).await.map(drop).map_err(Into::into),
        Admission::Http(gate) => crate::relay::serve(stream, upstream, gate).await,
    };
    if let Err(e) = ended {
        tracing::debug!(%source, destination = %local, error = %e, "tunnel stream ended with an error");
    }
}

/// The checks of one stream, then the connect to its target: the target's socket, or the
/// status, the metric's result and the reason to refuse with.
async fn open_target(
    req: &Request<RecvStream>,
    inbound: &dyn Inbound,
    source: &SpiffeId,
    local: &SpiffeId,
) -> Result<(TcpStream, Admission), (StatusCode, &'static str, String)> {
    if req.method() != Method::CONNECT {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "bad_request", format!("{} is not CONNECT", req.method())));
    }
    let Some(target) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        let reason = format!("CONNECT target {} is not an IPv4 address:port", req.uri());
        return Err((StatusCode::BAD_REQUEST, "bad_request", reason));
    };
    match inbound.local_identity(target) {
        Some(id) if id == *local => {}
        Some(id) => {
            let reason = format!("{target} is {id}, not {local} that this tunnel was opened for");
            return Err((StatusCode::MISDIRECTED_REQUEST, "misdirected", reason));
        }
        None => return Err((StatusCode::NOT_FOUND, "unknown_target", format!("no workload of this node at {target}"))),
    }
    let admission = inbound.admit(source, target).map_err(|reason| (StatusCode::FORBIDDEN, "denied", reason))?;
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => return Err((StatusCode::BAD_GATEWAY, "connect_failed", format!("connect to {target}: {e}"))),
        Err(_) => {
            return Err((StatusCode::GATEWAY_TIMEOUT, "connect_failed", format!("connect to {target} timed out")));
        }
    };
    let _ = upstream.set_nodelay(true);
    Ok((upstream, admission))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_names_read_back() {
        for (ns, sa) in [("default", "web"), ("shop", "reviews.v2"), ("a-b", "x")] {
            let id = SpiffeId::new("cluster.local", ns, sa).expect("id");
            let ServerName::DnsName(name) = server_name(&id).expect("sni") else { panic!("not a DNS name") };
            assert_eq!(id_from_server_name(name.as_ref(), "cluster.local"), Some(id));
        }
        assert_eq!(id_from_server_name("web.default.example.com", "cluster.local"), None);
        assert_eq!(id_from_server_name("web.id.weft.invalid", "cluster.local"), None);
    }
}
