//! weft's per-node L7 proxy. connect4 hands it connections to services that need L7; for each
//! one it runs the phases accept -> identify -> detect -> (opaque: forward) | (HTTP: route ->
//! filters -> upstream -> respond -> record).
#![forbid(unsafe_code)]

mod authz;
mod detect;
mod http;
pub mod jwt;
mod metrics;
mod otlp;
mod park;
mod pool;
mod record;
mod resilience;
mod route;
mod slots;
mod tcp;
mod trace;
pub mod tunnel;

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use weft_policy::{Compiled, Names};

pub use crate::{
    detect::Protocol,
    metrics::Metrics,
    otlp::{Endpoint as OtlpEndpoint, EndpointError as OtlpEndpointError},
};
use crate::{
    metrics::{ConnLabels, RefusedLabels},
    route::{SharedTable, Table},
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
    /// table is rebuilt once per config and swapped for new requests.
    pub async fn run(
        self,
        mut config: watch::Receiver<Option<Arc<Compiled>>>,
        identify: Arc<dyn Identify>,
        metrics: Arc<Metrics>,
        access_log: Option<Arc<dyn AccessLog>>,
    ) {
        let initial = config.borrow().as_deref().map(Table::build).unwrap_or_default();
        let (publish, table) = watch::channel(Arc::new(initial));
        let spans = self.config.otlp.clone().map(|endpoint| {
            let resource = vec![("service.name", "weft-proxy".to_owned()), ("host.name", self.config.node_name.clone())];
            otlp::Exporter::start(endpoint, resource, metrics.spans.clone())
        });
        let ctx = Arc::new(Ctx {
            config: self.config,
            table,
            identify,
            metrics,
            clients: http::Clients::new(),
            upstreams: Default::default(),
            access_log,
            spans,
        });
        let updater = ctx.clone();
        tokio::spawn(async move {
            while config.changed().await.is_ok() {
                let next = config.borrow_and_update().as_deref().map(Table::build);
                if let Some(next) = next {
                    // Endpoints that left the config: their pooled h2 connections are dropped
                    // (streams in flight finish first).
                    let live: std::collections::HashSet<SocketAddrV4> = next.endpoints.values().flatten().map(|(ep, _)| *ep).collect();
                    updater.clients.h2.retain(|e| live.contains(e));
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
}

fn source(names: &Names, id: u32) -> Source {
    match names.workloads.get(&id) {
        Some(w) => Source {
            workload: w.id.name.clone(),
            namespace: w.id.namespace.clone(),
            peer: Some(authz::peer(&w.id.namespace, &w.service_account)),
        },
        None => Source { workload: "unknown".into(), namespace: "unknown".into(), peer: None },
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

    // detect
    let protocol = match service.and_then(|s| s.app_protocol) {
        Some(p) => p,
        None => detect::sniff(&stream, ctx.config.detect_timeout).await,
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
            let endpoint = table.endpoint(id.dst);
            drop(table);
            Box::pin(tcp::forward(stream, id.dst, endpoint)).await;
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
            };
            http::serve(stream, Arc::new(conn)).await;
        }
    }
}
