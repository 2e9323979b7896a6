//! Admin server, on every replica: `/healthz`, `/readyz` (every kind listed once) and
//! `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::metrics::Metrics;

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("admin server cannot listen on {addr}: {e}; is the port taken? pick one with --admin-addr")
    })
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, cluster: Arc<Cluster>, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (cluster, metrics) = (cluster.clone(), metrics.clone());
        tokio::spawn(async move {
            let service =
                service_fn(move |req| std::future::ready(Ok::<_, Infallible>(handle(&cluster, &metrics, &req))));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn handle<B>(cluster: &Cluster, metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if cluster.is_synced() => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: first list of every kind not complete\n")
        }
        "/metrics" => match metrics.encode() {
            Ok(text) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "metrics encoding failed\n"),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /healthz, /readyz, /metrics\n"),
    }
}
