//! A minimal OTLP/HTTP trace collector: decodes each export (protobuf) and appends one JSON line
//! per span to a file, so tests can check what the proxy exported.

use std::{collections::BTreeMap, convert::Infallible, io::Write as _, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::{Bytes, Incoming}, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value},
};
use prost::Message as _;
use serde_json::{Value, json};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        _ => Value::Null,
    }
}

/// The export as JSON lines, one per span.
fn lines(export: &ExportTraceServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rs in &export.resource_spans {
        let resource: BTreeMap<&str, Value> =
            rs.resource.iter().flat_map(|r| &r.attributes).map(|kv| (kv.key.as_str(), value(kv.value.as_ref()))).collect();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                let attributes: BTreeMap<&str, Value> = span.attributes.iter().map(|kv| (kv.key.as_str(), value(kv.value.as_ref()))).collect();
                out.push(
                    json!({
                        "trace_id": hex(&span.trace_id),
                        "span_id": hex(&span.span_id),
                        "parent_span_id": hex(&span.parent_span_id),
                        "name": span.name,
                        "kind": span.kind,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status": span.status.as_ref().map_or(0, |s| s.code),
                        "attributes": attributes,
                        "resource": resource,
                        "scope": ss.scope.as_ref().map(|s| s.name.clone()),
                    })
                    .to_string(),
                );
            }
        }
    }
    out
}

async fn receive(req: Request<Incoming>, out: Arc<PathBuf>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, msg: &str| {
        let mut r = Response::new(Full::new(Bytes::from(msg.to_owned())));
        *r.status_mut() = status;
        Ok(r)
    };
    if req.uri().path() != "/v1/traces" || req.headers().get("content-type").is_none_or(|v| v != "application/x-protobuf") {
        return reply(StatusCode::NOT_FOUND, "want POST /v1/traces with application/x-protobuf");
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, "body");
    };
    let Ok(export) = ExportTraceServiceRequest::decode(body) else {
        return reply(StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest");
    };
    let text: String = lines(&export).into_iter().map(|l| l + "\n").collect();
    let written = std::fs::OpenOptions::new().create(true).append(true).open(&*out).and_then(|mut f| f.write_all(text.as_bytes()));
    match written {
        Ok(()) => reply(StatusCode::OK, ""),
        Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "write"),
    }
}

pub fn sink(listen: SocketAddr, out: PathBuf) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
        println!("{}", json!({ "listening": listener.local_addr()?.to_string() }));
        let out = Arc::new(out);
        loop {
            let (stream, _) = listener.accept().await?;
            let out = out.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| receive(req, out.clone()));
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}
