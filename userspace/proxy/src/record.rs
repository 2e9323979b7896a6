//! record: what a request did, written when its response ends. The response body is wrapped so
//! the record sees every byte sent and the gRPC status wherever it comes (trailers-only
//! responses carry it in the headers, all others in the trailers); metrics, the access log and
//! the exported span are written once, when the body ends, fails, or is dropped by a client
//! that went away.

use std::{
    pin::Pin,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::SystemTime,
};

use http::{HeaderMap, Method, Version};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::time::Instant;

use crate::{
    http::Conn,
    metrics::{RequestLabels, Signals, class},
    otlp,
    trace::Span,
};

type Inner = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A request's size: known from its length, or counted as the body streams through.
pub enum RequestSize {
    Exact(u64),
    Counted(Arc<AtomicU64>),
}

impl RequestSize {
    fn get(&self) -> u64 {
        match self {
            RequestSize::Exact(n) => *n,
            RequestSize::Counted(n) => n.load(Ordering::Relaxed),
        }
    }
}

/// A request body that counts what passes (used when the length is not known up front).
pub struct Counted<B> {
    pub inner: B,
    pub seen: Arc<AtomicU64>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.seen.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Everything known about a request once its response headers are ready.
pub struct Exchange {
    pub conn: Arc<Conn>,
    pub start: Instant,
    /// Wall-clock start, for exported spans (taken only when spans are exported).
    pub wall_start: Option<SystemTime>,
    pub span: Span,
    pub grpc: bool,
    pub method: Method,
    pub path: String,
    pub version: Version,
    pub request_size: RequestSize,
    pub route: String,
    pub upstream: Option<std::net::SocketAddrV4>,
    pub code: u16,
    /// A trailers-only gRPC response carries its status in the headers.
    pub header_grpc_status: Option<String>,
    /// The authorization policy that allowed or refused the request, if one decided.
    pub policy: Option<String>,
    /// Why authorization refused it.
    pub denied: Option<String>,
}

/// The response body, recording the exchange when it ends.
pub struct Recorded {
    inner: Inner,
    sent: u64,
    trailer_grpc_status: Option<String>,
    exchange: Option<Exchange>,
}

impl Recorded {
    pub fn new(inner: Inner, exchange: Exchange) -> Recorded {
        Recorded { inner, sent: 0, trailer_grpc_status: None, exchange: Some(exchange) }
    }

    /// A body whose exchange is recorded elsewhere (a switched connection's, when it ends).
    pub fn unrecorded(inner: Inner) -> Recorded {
        Recorded { inner, sent: 0, trailer_grpc_status: None, exchange: None }
    }

    fn finish(&mut self, completed: bool) {
        if let Some(exchange) = self.exchange.take() {
            exchange.record(self.sent, self.trailer_grpc_status.take(), completed);
        }
    }
}

impl Body for Recorded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    self.trailer_grpc_status = grpc_status_text(trailers);
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // An empty body may never be polled; a body cut short by the client is recorded too.
        let completed = self.inner.is_end_stream();
        self.finish(completed);
    }
}

pub fn grpc_status_text(headers: &HeaderMap) -> Option<String> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Exchange {
    /// A request whose connection switched protocols ends with the switched session: the bytes
    /// each way after the switch count as its request's and response's.
    pub fn switch_ended(mut self, up: u64, down: u64, completed: bool) {
        self.request_size = RequestSize::Exact(self.request_size.get() + up);
        self.record(down, None, completed);
    }

    fn record(self, response_size: u64, trailer_grpc_status: Option<String>, completed: bool) {
        let conn = &self.conn;
        conn.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let elapsed = self.start.elapsed();
        let grpc_status = trailer_grpc_status.or(self.header_grpc_status).unwrap_or_else(|| {
            // A gRPC response that ended without a status is an error the client sees as such.
            if self.grpc { String::new() } else { "-".to_owned() }
        });
        let request_size = self.request_size.get();
        let request_protocol = if self.grpc { "grpc" } else { "http" };
        {
            let mut last = conn.signals.lock().unwrap_or_else(PoisonError::into_inner);
            match last.as_deref() {
                Some(signals) if signals.fit(&self.route, request_protocol, self.code, &grpc_status) => {
                    signals.observe(elapsed.as_secs_f64(), request_size, response_size);
                }
                _ => {
                    let labels = RequestLabels {
                        source_workload: conn.src.workload.clone(),
                        source_workload_namespace: conn.src.namespace.clone(),
                        destination_service: conn.destination.clone(),
                        route: self.route.clone(),
                        request_protocol,
                        response_code: self.code,
                        response_class: class(self.code),
                        grpc_status: grpc_status.clone(),
                    };
                    let signals = Signals::new(&conn.ctx.metrics, labels);
                    signals.observe(elapsed.as_secs_f64(), request_size, response_size);
                    // Kept only by a connection past its first request: one that asks once
                    // and idles holds nothing (0.4 KiB each, at 10,000 idle connections).
                    *last = (conn.requests.load(Ordering::Relaxed) > 1).then(|| Box::new(signals));
                }
            }
        }

        if let (Some(exporter), Some(wall_start)) = (&conn.ctx.spans, self.wall_start)
            && self.span.sampled
        {
            exporter.export(otlp::SpanRecord {
                trace_id: self.span.trace_id,
                span_id: self.span.span_id,
                parent_id: self.span.parent_id,
                name: format!("{} {}", conn.destination, self.route),
                start: wall_start,
                end: wall_start + elapsed,
                attributes: vec![
                    ("http.request.method", self.method.as_str().to_owned().into()),
                    ("url.path", self.path.clone().into()),
                    ("http.response.status_code", i64::from(self.code).into()),
                    ("server.address", conn.destination.clone().into()),
                    ("weft.route", self.route.clone().into()),
                    ("weft.source.workload", conn.src.workload.clone().into()),
                    ("weft.source.namespace", conn.src.namespace.clone().into()),
                    ("network.peer.address", self.upstream.map(|u| u.to_string()).unwrap_or_default().into()),
                    ("http.request.body.size", i64::try_from(request_size).unwrap_or(i64::MAX).into()),
                    ("http.response.body.size", i64::try_from(response_size).unwrap_or(i64::MAX).into()),
                    ("guid:x-request-id", self.span.request_id_text().into()),
                    ("rpc.grpc.status_code", grpc_status.clone().into()),
                ],
                error: self.code >= 500 || !completed,
            });
        }

        if let Some(log) = &conn.ctx.access_log
            && fastrand::f64() < conn.ctx.config.access_log_sample
        {
            let record = serde_json::json!({
                "kind": "http",
                "source": { "address": conn.client.to_string(), "workload": conn.src.workload, "namespace": conn.src.namespace },
                "destination_service": conn.destination,
                "original_destination": conn.dst.to_string(),
                "upstream": self.upstream.map(|u| u.to_string()),
                "route": self.route,
                "method": self.method.as_str(),
                "path": self.path,
                "protocol": format!("{:?}", self.version),
                "status": self.code,
                "grpc_status": grpc_status,
                "completed": completed,
                "duration_ms": elapsed.as_secs_f64() * 1e3,
                "request_bytes": request_size,
                "response_bytes": response_size,
                "trace_id": self.span.trace_hex(),
                "span_id": self.span.span_hex(),
                "parent_span_id": self.span.parent_hex(),
                "sampled": self.span.sampled,
                "request_id": self.span.request_id_text(),
                "authz": { "policy": self.policy, "denied": self.denied },
            });
            log.record(record.to_string());
        }
    }
}
