//! Span export over OTLP/HTTP (protobuf), when an endpoint is configured. Requests hand their
//! span to a bounded queue and never wait on the collector: one task batches the queue (up to
//! 512 spans or 1 s) and posts each batch to `<endpoint>/v1/traces`. A full queue drops spans
//! and counts them, so a slow collector costs telemetry, never latency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::metrics::SpanLabels;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const BATCH_WAIT: Duration = Duration::from_secs(1);
const POST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("OTLP endpoint {0:?} is not a URL; give e.g. http://otel-collector:4318")]
    NotAUrl(String),
    #[error("OTLP endpoint {0:?}: only http:// is supported (OTLP/HTTP with protobuf); use the collector's plain-text port, e.g. http://otel-collector:4318")]
    Scheme(String),
}

/// Where spans go: the collector's base URL (`/v1/traces` is added unless already there).
#[derive(Clone, Debug)]
pub struct Endpoint(Uri);

impl std::str::FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        let uri: Uri = s.parse().map_err(|_| EndpointError::NotAUrl(s.to_owned()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(if uri.authority().is_none() { EndpointError::NotAUrl(s.to_owned()) } else { EndpointError::Scheme(s.to_owned()) });
        }
        let path = uri.path().trim_end_matches('/');
        let path = if path.ends_with("/v1/traces") { path.to_owned() } else { format!("{path}/v1/traces") };
        let full = format!("http://{}{path}", uri.authority().map(|a| a.as_str()).unwrap_or_default());
        full.parse().map(Endpoint).map_err(|_| EndpointError::NotAUrl(s.to_owned()))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An attribute value.
pub enum Value {
    Str(String),
    Int(i64),
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

/// One finished proxy hop.
pub struct SpanRecord {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

pub struct Exporter {
    queue: mpsc::Sender<SpanRecord>,
    spans: Family<SpanLabels, Counter>,
}

impl Exporter {
    /// Starts the batching task on the current runtime. `resource` names this proxy
    /// (`service.name`, `host.name`, ...).
    pub fn start(endpoint: Endpoint, resource: Vec<(&'static str, String)>, spans: Family<SpanLabels, Counter>) -> Exporter {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, endpoint, resource, spans.clone()));
        Exporter { queue, spans }
    }

    /// Queues a span; never waits.
    pub fn export(&self, span: SpanRecord) {
        if self.queue.try_send(span).is_err() {
            self.spans.get_or_create(&SpanLabels { result: "dropped" }).inc();
        }
    }
}

async fn run(mut rx: mpsc::Receiver<SpanRecord>, endpoint: Endpoint, resource: Vec<(&'static str, String)>, spans: Family<SpanLabels, Counter>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let resource = Resource {
        attributes: resource.into_iter().map(|(k, v)| attribute(k, Value::Str(v))).collect(),
        ..Default::default()
    };
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope { name: "weft-proxy".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
                    spans: batch.drain(..).map(encode).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let result = post(&client, &endpoint, request.encode_to_vec()).await;
        let label = match &result {
            Ok(()) => "exported",
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, spans = n, "OTLP export failed; spans dropped");
                "failed"
            }
        };
        spans.get_or_create(&SpanLabels { result: label }).inc_by(n);
    }
}

async fn post(client: &Client<HttpConnector, Full<Bytes>>, endpoint: &Endpoint, body: Vec<u8>) -> Result<(), String> {
    let request = Request::post(endpoint.0.clone())
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(POST_TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("no answer within {POST_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // Drain so the connection can be reused.
    let _ = response.into_body().collect().await;
    if status.is_success() { Ok(()) } else { Err(format!("collector answered {status}")) }
}

fn attribute(key: &str, value: Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
    };
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn encode(span: SpanRecord) -> Span {
    Span {
        trace_id: span.trace_id.to_be_bytes().to_vec(),
        span_id: span.span_id.to_be_bytes().to_vec(),
        parent_span_id: span.parent_id.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        // W3C trace flags: sampled (only sampled spans are exported).
        flags: 1,
        name: span.name,
        // The proxy hop is the caller's side of the call to the upstream, as a sidecar's is.
        kind: SpanKind::Client as i32,
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(span.end),
        attributes: span.attributes.into_iter().map(|(k, v)| attribute(k, v)).collect(),
        status: Some(Status {
            code: if span.error { StatusCode::Error } else { StatusCode::Unset } as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_traces_path_and_bad_ones_say_what_to_fix() {
        let e: Endpoint = "http://collector:4318".parse().expect("base URL");
        assert_eq!(e.to_string(), "http://collector:4318/v1/traces");
        let e: Endpoint = "http://collector:4318/v1/traces".parse().expect("full URL");
        assert_eq!(e.to_string(), "http://collector:4318/v1/traces");
        let e: Endpoint = "http://collector:4318/otlp/".parse().expect("prefixed");
        assert_eq!(e.to_string(), "http://collector:4318/otlp/v1/traces");
        let err = "https://collector:4318".parse::<Endpoint>().expect_err("https");
        assert!(err.to_string().contains("only http://"), "{err}");
        assert!("collector".parse::<Endpoint>().is_err());
    }

    #[test]
    fn spans_encode_ids_as_bytes() {
        let span = encode(SpanRecord {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            span_id: 0x00f0_67aa_0ba9_02b7,
            parent_id: None,
            name: "x".into(),
            start: UNIX_EPOCH + Duration::from_nanos(5),
            end: UNIX_EPOCH + Duration::from_nanos(9),
            attributes: vec![("n", Value::Int(3))],
            error: true,
        });
        assert_eq!(span.trace_id, [0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]);
        assert_eq!(span.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert!(span.parent_span_id.is_empty());
        assert_eq!((span.start_time_unix_nano, span.end_time_unix_nano), (5, 9));
        assert_eq!(span.status.map(|s| s.code), Some(StatusCode::Error as i32));
    }
}
