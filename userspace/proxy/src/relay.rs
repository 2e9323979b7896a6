//! The accepting end of a tunnel stream to a workload whose policies read requests: the
//! stream is served as HTTP (h2c when it opens with the HTTP/2 preface, else HTTP/1.1), each
//! request judged by the gate where the workload runs, and what is allowed is forwarded over
//! one connection to the workload. Refusals answer with the status, the reason in the body and
//! in `x-weft-reason`.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, client::conn as client, server::conn as server, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::Mutex};

use crate::{
    h2stream::H2Stream,
    tunnel::RequestGate,
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = Either<Incoming, Full<Bytes>>;

/// The connection to the workload: HTTP/1.1 carries one request at a time.
enum Upstream {
    Http1(Mutex<client::http1::SendRequest<Incoming>>),
    Http2(client::http2::SendRequest<Incoming>),
}

/// Serves `stream` until the caller closes it.
pub async fn serve(mut stream: H2Stream, upstream: TcpStream, gate: Arc<dyn RequestGate>) -> Result<(), BoxError> {
    let io = TokioIo::new(upstream);
    if stream.starts_with(H2_PREFACE).await? {
        let (send, conn) = client::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let upstream = Arc::new(Upstream::Http2(send));
        let service = service_fn(move |req| forward(req, gate.clone(), upstream.clone()));
        server::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await?;
    } else {
        // With upgrades on both sides: a switch the workload agrees to (WebSocket and the
        // like) joins the two connections.
        let (send, conn) = client::http1::handshake(io).await?;
        tokio::spawn(conn.with_upgrades());
        let upstream = Arc::new(Upstream::Http1(Mutex::new(send)));
        let service = service_fn(move |req| forward(req, gate.clone(), upstream.clone()));
        server::http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await?;
    }
    Ok(())
}

async fn forward(
    mut req: Request<Incoming>,
    gate: Arc<dyn RequestGate>,
    upstream: Arc<Upstream>,
) -> Result<Response<Body>, Infallible> {
    match gate.check(&req) {
        Ok(uri) => {
            if let Some(uri) = uri {
                *req.uri_mut() = uri;
            }
        }
        Err((status, reason)) => return Ok(local(status, reason)),
    }
    // The caller's side of a switch, if it asks for one.
    let switching = crate::switch::asked(req.headers()).is_some().then(|| hyper::upgrade::on(&mut req));
    let sent = match &*upstream {
        Upstream::Http1(send) => {
            let mut send = send.lock().await;
            match send.ready().await {
                Ok(()) => send.send_request(req).await,
                Err(e) => Err(e),
            }
        }
        Upstream::Http2(send) => send.clone().send_request(req).await,
    };
    Ok(match sent {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(caller) = switching
            {
                let workload = hyper::upgrade::on(&mut response);
                tokio::spawn(async move {
                    if let (Ok(caller), Ok(workload)) = (caller.await, workload.await) {
                        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(caller), &mut TokioIo::new(workload)).await;
                    }
                });
            }
            response.map(Either::Left)
        }
        Err(e) => local(StatusCode::BAD_GATEWAY, format!("the workload's connection failed: {e}")),
    })
}

fn local(status: StatusCode, reason: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!("{reason}\n")))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    crate::authz::mark_refusal(response.headers_mut(), status, &reason);
    response
}
