//! Admin server: `/metrics`, `/ready`, `/healthz`, `/config_dump`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::app::Shared;

pub async fn serve(shared: Arc<Shared>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin server cannot listen on {addr}: {e}; is another agent running there? pick one with --admin-addr"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(shared.clone(), req));
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(local)
}

type Body = Full<Bytes>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET {
        return Ok(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => match shared.metrics.encode() {
            Ok(text) => reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "metrics encoding failed\n"),
        },
        "/ready" => {
            let waiting = shared.waiting_for.as_ref().map(|w| w.borrow().clone()).unwrap_or_default();
            if shared.ready.load(Ordering::SeqCst) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else if !waiting.is_empty() {
                let message = format!("not ready: waiting for the first list of {}\n", waiting.join(", "));
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", message)
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: first config not applied to the datapath yet\n")
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/config_dump" => reply(StatusCode::OK, "application/json", config_dump(&shared)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /ready, /config_dump\n"),
    })
}

/// The workload certificates the tunnel holds: identity, expiry and when renewal is due.
fn certificates(certs: &weft_identity::CertStore) -> Vec<serde_json::Value> {
    let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let slots = certs.ids().into_iter().filter_map(|id| certs.issued(&id));
    slots
        .map(|slot| {
            let (id, not_after) = slot.current();
            json!({ "identity": id.to_string(), "expires_at_ms": ms(not_after), "renew_at_ms": ms(slot.refresh_at()) })
        })
        .collect()
}

fn config_dump(shared: &Shared) -> String {
    let published = shared.state.borrow().clone();
    let (pin_root, skmsg, attached) = {
        let dp = shared.datapath.lock().unwrap_or_else(|p| p.into_inner());
        let attached: Vec<_> = dp
            .attached()
            .iter()
            .map(|(id, path)| json!({ "cgroup_id": id, "path": path, "sk_lookup": dp.netns().get(id) }))
            .collect();
        (dp.config().pin_root.clone(), dp.skmsg_active(), attached)
    };
    let dump = json!({
        "agent": {
            "node_name": shared.args.node_name,
            "config_dir": shared.args.config_dir,
            "kube": shared.args.kube,
            "cgroup_root": shared.args.kube.then_some(&shared.args.cgroup_root),
            "kube_waiting_for": shared.waiting_for.as_ref().map(|w| w.borrow().clone()),
            "admin_addr": shared.args.admin_addr,
            "proxy_addr": shared.args.proxy_addr,
            "skmsg": shared.args.skmsg,
            "poll_ms": shared.args.poll_ms,
            "access_log": shared.args.access_log,
            "access_log_sample": shared.args.access_log_sample,
            "detect_timeout_ms": shared.args.detect_timeout_ms,
            "tunnel_connections": shared.args.tunnel_connections,
            "otlp_endpoint": shared.args.otlp_endpoint.as_ref().map(ToString::to_string),
            "trace_sample": shared.args.trace_sample,
            "jwks_ca_file": shared.args.jwks_ca_file,
            "ready": shared.ready.load(Ordering::SeqCst),
        },
        "datapath": { "pin_root": pin_root, "skmsg_active": skmsg, "attached": attached },
        "config": {
            "generation": published.generation,
            "loaded_at_ms": published.loaded_at_ms,
            "last_update_rejected": published.rejected,
            "errors": published.errors,
        },
        "compiled": published.compiled.as_deref().map(weft_policy::Compiled::dump),
        "jwks": shared.jwks.dump(),
        "certificates": shared.identities.get().map(|identities| certificates(&identities.certs)),
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
