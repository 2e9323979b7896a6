//! weft's per-node L7 proxy. connect4 hands it connections to services that need L7; for each
//! one it runs the phases accept -> identify -> detect -> (opaque: forward) | (HTTP: route ->
//! filters -> upstream -> respond -> record).
#![forbid(unsafe_code)]

mod authz;
mod detect;
pub mod h2stream;
mod http;
mod idle;
pub mod jwks;
pub mod jwt;
mod metrics;
mod otlp;
mod park;
mod pool;
mod record;
mod relay;
mod replay;
mod resilience;
mod route;
mod slots;
mod switch;
mod tcp;
mod trace;
pub mod tunnel;
mod upstream;

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use weft_identity::SpiffeId;
use weft_policy::{Compiled, Names};

pub use crate::{
    detect::Protocol,
    metrics::Metrics,
    otlp::{Endpoint as OtlpEndpoint, EndpointError as OtlpEndpointError},
};
use crate::{
    metrics::{ConnLabels, RefusedLabels},
    route::{SharedTable, Table},
    upstream::{Dialer, Via},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddrV4,
    /// How long to wait for a client's first bytes before treating it as opaque TCP.
    pub detect_timeout: Duration,
    /// Fraction of requests written to the access log.
    pub access_log_sample: f64,
    /// Where to export spans (OTLP/HTTP); none: spans are not exported.
    pub otlp: Option<otlp::Endpoint>,
    /// Fraction of new traces (requests without a caller's context) the proxy samples; a
    /// caller's sampling decision is always kept.
    pub trace_sample: f64,
    /// This node's name, a resource attribute of exported spans.
    pub node_name: String,
}

/// Where per-request records go (one JSON line each).
pub trait AccessLog: Send + Sync + 'static {
    fn record(&self, line: String);
}

/// What the kernel recorded about a handed-off connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Where the application connected (the service VIP:port).
    pub dst: SocketAddrV4,
    pub src_workload: u32,
    pub svc_id: u32,
}

/// Recovers a connection's identity from its tuple (the pinned original-destination map).
pub trait Identify: Send + Sync + 'static {
    fn identify(&self, client: SocketAddrV4, local: SocketAddrV4) -> Option<Identity>;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("proxy cannot listen on {addr}: {source}; is --proxy-addr an address of this node, and the port free?")]
    Bind {
        addr: SocketAddrV4,
        #[source]
        source: std::io::Error,
    },
}

pub struct Proxy {
    listener: TcpListener,
    config: Config,
}

/// The tunnel between nodes: where it accepts, the identities it presents and trusts.
pub struct TunnelSetup {
    pub listener: TcpListener,
    pub identities: Arc<tunnel::Identities>,
    pub metrics: Arc<tunnel::TunnelMetrics>,
    /// Connections the dialling side opens per (source identity, node, destination identity).
    pub connections: usize,
}

/// The tunnel's accepting end, answered from the newest route table: which workloads this
/// node hosts, and whether the peer may reach them (their AuthorizationPolicies, judged on
/// the peer's certificate identity and the destination workload).
struct TableInbound {
    table: watch::Receiver<SharedTable>,
    metrics: Arc<Metrics>,
}

impl tunnel::Inbound for TableInbound {
    fn local_identity(&self, target: SocketAddrV4) -> Option<SpiffeId> {
        self.table.borrow().local.get(target.ip()).map(|l| l.id.clone())
    }

    fn hosts(&self, id: &SpiffeId) -> bool {
        self.table.borrow().local.values().any(|l| l.id == *id)
    }

    fn admit(&self, peer: &SpiffeId, target: SocketAddrV4) -> Result<tunnel::Admission, String> {
        let table = self.table.borrow().clone();
        let Some(local) = table.local.get(target.ip()) else {
            return Err(format!("no workload of this node at {target}"));
        };
        let source = authz::peer(peer.namespace(), peer.service_account());
        if table.authz.workload_needs_http(&local.workload) {
            let (table, metrics) = (self.table.clone(), self.metrics.clone());
            let gate = WorkloadGate { table, metrics, peer: peer.clone(), source, target };
            return Ok(tunnel::Admission::Http(Arc::new(gate)));
        }
        match table.authz.check_workload_connection(&local.workload, target.port(), Some(&source)) {
            Ok(_) => Ok(tunnel::Admission::Open),
            Err(refusal) => Err(self.metrics.refusal_reason(&refusal)),
        }
    }
}

/// Judges each request a peer sends through the tunnel to a local workload whose policies
/// read requests, on the newest table.
struct WorkloadGate {
    table: watch::Receiver<SharedTable>,
    metrics: Arc<Metrics>,
    peer: SpiffeId,
    /// `peer` as policies see it, made once per stream.
    source: weft_policy::authz::Peer,
    target: SocketAddrV4,
}

impl tunnel::RequestGate for WorkloadGate {
    fn check(&self, req: &::http::Request<hyper::body::Incoming>) -> Result<Option<::http::Uri>, (::http::StatusCode, String)> {
        let table = self.table.borrow().clone();
        let Some(local) = table.local.get(self.target.ip()) else {
            let reason = format!("no workload of this node at {} any more", self.target);
            return Err((::http::StatusCode::SERVICE_UNAVAILABLE, reason));
        };
        match table.authz.check_workload_request(&local.workload, self.target.port(), Some(&self.source), req) {
            Ok(admitted) => Ok(admitted.uri),
            Err(refusal) => {
                tracing::info!(peer = %self.peer, workload = %local.workload, path = req.uri().path(), reason = %refusal.reason, "request refused at the destination");
                Err((refusal.status, self.metrics.refusal_reason(&refusal)))
            }
        }
    }
}

/// Per-proxy state shared by every connection.
struct Ctx {
    config: Config,
    table: watch::Receiver<SharedTable>,
    identify: Arc<dyn Identify>,
    metrics: Arc<Metrics>,
    clients: http::Clients,
    upstreams: resilience::Upstreams,
    access_log: Option<Arc<dyn AccessLog>>,
    spans: Option<otlp::Exporter>,
    dialer: Dialer,
}

impl Proxy {
    pub async fn bind(config: Config) -> Result<Proxy, Error> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind { addr: config.listen, source })?;
        Ok(Proxy { listener, config })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped. `config` carries each new compiled config; the route
    /// table is rebuilt once per config and swapped for new requests, and `jwks` then fetches
    /// the config's `jwksUri`s.
    pub async fn run(
        self,
        mut config: watch::Receiver<Option<Arc<Compiled>>>,
        identify: Arc<dyn Identify>,
        metrics: Arc<Metrics>,
        access_log: Option<Arc<dyn AccessLog>>,
        tunnel: Option<TunnelSetup>,
        jwks: Arc<jwks::Fetchers>,
    ) {
        let initial = config.borrow().as_deref().map(|c| Table::build(c, &jwks)).unwrap_or_default();
        let identities = tunnel.as_ref().map(|t| t.identities.clone());
        if let Some(identities) = &identities {
            prefetch_certificates(identities, &initial);
        }
        let (publish, table) = watch::channel(Arc::new(initial));
        let tunnels = tunnel.map(|TunnelSetup { listener, identities, metrics: tunnel_metrics, connections }| {
            let inbound = Arc::new(TableInbound { table: table.clone(), metrics: metrics.clone() });
            tokio::spawn(tunnel::serve(listener, identities.clone(), inbound, tunnel_metrics.clone()));
            Arc::new(tunnel::Tunnels::with_connections(identities, tunnel_metrics, connections))
        });
        let dialer = Dialer { tunnels };
        let spans = self.config.otlp.clone().map(|endpoint| {
            let resource = vec![("service.name", "weft-proxy".to_owned()), ("host.name", self.config.node_name.clone())];
            otlp::Exporter::start(endpoint, resource, metrics.spans.clone())
        });
        let ctx = Arc::new(Ctx {
            config: self.config,
            identify,
            metrics,
            clients: http::Clients::start(dialer.clone()),
            table,
            upstreams: Default::default(),
            access_log,
            spans,
            dialer,
        });
        let updater = ctx.clone();
        tokio::spawn(async move {
            while config.changed().await.is_ok() {
                // Fetchers of jwksUris the new config no longer names stop here.
                let next = config.borrow_and_update().as_deref().map(|c| Table::build(c, &jwks));
                if let Some(next) = next {
                    // Endpoints that left the config, and sources that left this node: their
                    // pooled connections are dropped (requests in flight finish first).
                    let live: std::collections::HashSet<SocketAddrV4> = next.endpoints.values().flatten().map(|(ep, _)| *ep).collect();
                    let sources: std::collections::HashSet<&SpiffeId> = next.local.values().map(|l| &l.id).collect();
                    updater.clients.retain(|e| live.contains(e), |id| sources.contains(id));
                    if let Some(tunnels) = &updater.dialer.tunnels {
                        tunnels.retain(|src, _| sources.contains(src));
                    }
                    // Certificates of workloads that left stop rotating; those of workloads
                    // that came are issued now, before their first connection waits for one.
                    if let Some(identities) = &identities {
                        for id in identities.certs.ids() {
                            if !sources.contains(&id) {
                                identities.certs.remove(&id);
                            }
                        }
                        prefetch_certificates(identities, &next);
                    }
                    publish.send_replace(Arc::new(next));
                }
            }
        });
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ctx = ctx.clone();
            tokio::spawn(async move { connection(stream, peer, ctx).await });
        }
    }
}

/// Source of a connection as metrics and routing see it.
#[derive(Clone, Debug)]
struct Source {
    workload: String,
    namespace: String,
    /// As policies see it; `None` for a workload the config does not name.
    peer: Option<weft_policy::authz::Peer>,
    /// The identity its connections through the tunnel present.
    id: Option<SpiffeId>,
}

fn source(names: &Names, id: u32) -> Source {
    match names.workloads.get(&id) {
        Some(w) => Source {
            workload: w.id.name.clone(),
            namespace: w.id.namespace.clone(),
            peer: Some(authz::peer(&w.id.namespace, &w.service_account)),
            id: route::spiffe_id(&w.id.namespace, &w.service_account),
        },
        None => Source { workload: "unknown".into(), namespace: "unknown".into(), peer: None, id: None },
    }
}

async fn connection(stream: tokio::net::TcpStream, peer: SocketAddr, ctx: Arc<Ctx>) {
    let refuse = |reason| ctx.metrics.refused.get_or_create(&RefusedLabels { reason }).inc();
    // identify: only connections connect4 handed over from a meshed pod carry a record.
    let (SocketAddr::V4(client), Ok(SocketAddr::V4(local))) = (peer, stream.local_addr()) else {
        refuse("not_ipv4");
        return;
    };
    let Some(id) = ctx.identify.identify(client, local) else {
        refuse("no_handoff_record");
        tracing::debug!(%client, "refused: no original destination recorded (not from a meshed pod)");
        return;
    };
    let table = ctx.table.borrow().clone();
    let src = source(&table.names, id.src_workload);
    let service = table.services.get(&id.dst);

    // detect: a port handed over only for the tunnel (no routes, no L7 policy), or a
    // connection straight to a workload, is passed through without reading a byte.
    let protocol = match (service, table.declared.get(&id.dst)) {
        (None, _) | (_, Some(Protocol::Opaque)) => Protocol::Opaque,
        // Declared HTTP: clients may speak HTTP/1.1 or h2c (gRPC clients do); the preface tells.
        (Some(_), Some(_)) => match detect::sniff(&stream, ctx.config.detect_timeout).await {
            Protocol::Http2 => Protocol::Http2,
            _ => Protocol::Http1,
        },
        (Some(_), None) => detect::sniff(&stream, ctx.config.detect_timeout).await,
    };
    ctx.metrics.connections.get_or_create(&ConnLabels { protocol: protocol.label() }).inc();
    let _ = stream.set_nodelay(true);
    // The connection must not keep this config's table alive: requests read the newest.
    match protocol {
        Protocol::Opaque => {
            // authorize: once, for the whole connection.
            if let Err(refusal) = table.authz.check_connection(id.dst, src.peer.as_ref()) {
                ctx.metrics.authz_refused(&refusal);
                refuse("denied_by_policy");
                tracing::info!(%client, dst = %id.dst, reason = %refusal.reason, "opaque connection refused by policy");
                return;
            }
            // A service's endpoint, or the workload itself when the client dialled its address.
            let endpoint = table.endpoint(id.dst).or_else(|| (id.svc_id == 0).then_some(id.dst));
            let via = endpoint.map(|ep| Via::to(&table, src.id.as_ref(), ep));
            // A workload of this node: its own policies are this proxy's to judge.
            if let Some(workload) = endpoint.and_then(|ep| table.guarded_local(ep))
                && let Err(refusal) = table.authz.check_workload_connection(workload, endpoint.map_or(0, |ep| ep.port()), src.peer.as_ref())
            {
                ctx.metrics.authz_refused(&refusal);
                refuse("denied_by_policy");
                tracing::info!(%client, %workload, reason = %refusal.reason, "opaque connection refused by the workload's policy");
                return;
            }
            let idle = idle::timeout_of(table.services.get(&id.dst).map(|s| &s.traffic));
            drop(table);
            Box::pin(tcp::forward(stream, id.dst, endpoint.zip(via), idle, &ctx.dialer)).await;
        }
        Protocol::Http1 | Protocol::Http2 => {
            let destination = table
                .names
                .services
                .get(&id.svc_id)
                .map_or_else(|| id.dst.to_string(), |s| format!("{}.{}.svc.cluster.local", s.name, s.namespace));
            drop(table);
            let conn = http::Conn {
                ctx: ctx.clone(),
                dst: id.dst,
                destination,
                src,
                client,
                protocol,
                requests: Default::default(),
                in_flight: Default::default(),
                signals: Default::default(),
                upgrade: Default::default(),
            };
            http::serve(stream, Arc::new(conn)).await;
        }
    }
}

/// Has the certificate of every meshed workload of this node without one issued, one after
/// the other (a remote issuer gets one request at a time), in the background: the first
/// connection through the tunnel, either way, then finds it ready. A failure is logged and
/// left to that connection's own try.
fn prefetch_certificates(identities: &Arc<tunnel::Identities>, table: &Table) {
    let mut missing: Vec<SpiffeId> =
        table.local.values().map(|l| l.id.clone()).filter(|id| identities.certs.issued(id).is_none()).collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return;
    }
    let identities = identities.clone();
    tokio::spawn(async move {
        for id in missing {
            if let Err(error) = identities.certs.get(&id).await {
                tracing::warn!(%id, %error, "issuing the certificate ahead of use failed; the first connection tries again");
            }
        }
    });
}
