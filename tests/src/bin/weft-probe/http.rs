//! HTTP/1.1 and h2c for the L7 tests: a server that says who it is, and a client that counts.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    header::HeaderValue,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

/// Serves HTTP/1.1 and h2c (prior knowledge) on one port until killed. Every response carries
/// `x-served-by: <name>`; the body is JSON with the name, the HTTP version, method, path,
/// request headers, request body (as text) and whether the body's first bytes had arrived
/// with the head (`body_with_head`).
/// `/status/<code>` answers that code, `/delay/<ms>` waits first, and `/__count` answers how
/// many other requests were served.
/// With `fail_every` N > 0, every Nth request (1st, N+1th, ...) answers 503: a deterministic
/// "fails 1/N of requests" backend.
/// With `early`, it answers without reading the request body (as a server refusing a request
/// may), which proxies must survive.
/// With `lean` (the benchmark's upstream), every request is read to its end and answered 200
/// with a fixed 1 KiB body.
pub fn serve(addr: SocketAddr, name: String, fail_every: u64, early: bool, lean: bool) -> anyhow::Result<Value> {
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
        println!("{}", json!({ "listening": listener.local_addr()?.to_string() }));
        let fixed = Bytes::from(vec![b'x'; 1024]);
        let served_by = HeaderValue::from_str(&name).context("--name is not a header value")?;
        loop {
            let (stream, _) = listener.accept().await?;
            let io = TokioIo::new(stream);
            let name = name.clone();
            let (fixed, served_by) = (fixed.clone(), served_by.clone());
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = if lean {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (fixed, served_by) = (fixed.clone(), served_by.clone());
                        async move {
                            let _ = req.into_body().collect().await;
                            let mut resp = Response::new(Full::new(fixed));
                            resp.headers_mut().insert("x-served-by", served_by);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    builder.serve_connection(io, svc).await
                } else {
                    let svc = service_fn(move |req| respond(req, name.clone(), fail_every, early));
                    builder.serve_connection_with_upgrades(io, svc).await
                };
            });
        }
    })
}

static SERVED: AtomicU64 = AtomicU64::new(0);

type Body = BoxBody<Bytes, Infallible>;

async fn respond(mut req: Request<Incoming>, name: String, fail_every: u64, early: bool) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned() {
        return Ok(switch(&mut req, protocol, &name));
    }
    if path == "/__count" {
        return Ok(Response::new(Full::new(Bytes::from(json!({ "served": SERVED.load(Ordering::Relaxed) }).to_string())).boxed()));
    }
    let nth = SERVED.fetch_add(1, Ordering::Relaxed);
    let mut status = StatusCode::OK;
    if fail_every > 0 && nth.is_multiple_of(fail_every) {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()) {
        status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    }
    let (parts, mut body) = req.into_parts();
    // Whether the body's first bytes had arrived with the head: polled without waiting for the
    // network, yielding in between so an HTTP/1.1 connection's task can pass on what it has
    // read already.
    let mut first = None;
    for _ in 0..(if early { 0 } else { 8 }) {
        let polled = {
            let noop = &mut std::task::Context::from_waker(std::task::Waker::noop());
            hyper::body::Body::poll_frame(std::pin::Pin::new(&mut body), noop)
        };
        if let std::task::Poll::Ready(frame) = polled {
            first = Some(frame);
            break;
        }
        tokio::task::yield_now().await;
    }
    let (body_with_head, mut received) = match first {
        Some(Some(Ok(frame))) => {
            (true, frame.into_data().map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default())
        }
        _ => (false, String::new()),
    };
    // Read the request to its end before answering, as most servers do.
    if !early {
        received += &body.collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
    }
    let req = Request::from_parts(parts, ());
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let version = format!("{:?}", req.version());
    let body = json!({ "name": name, "version": version, "method": req.method().as_str(), "path": path, "query": req.uri().query(), "headers": headers, "body": received, "body_with_head": body_with_head });
    let mut resp = match headers.get("content-type") {
        // gRPC: one length-prefixed message, the status in the trailers (`x-grpc-status` asks
        // for one, else 0).
        Some(ct) if ct.starts_with("application/grpc") => {
            let message = body.to_string();
            let mut framed = vec![0u8];
            framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
            framed.extend_from_slice(message.as_bytes());
            let mut trailers = HeaderMap::new();
            let code = headers.get("x-grpc-status").map_or("0", String::as_str);
            trailers.insert("grpc-status", code.parse().unwrap_or_else(|_| HeaderValue::from_static("2")));
            let body = Full::new(Bytes::from(framed)).with_trailers(std::future::ready(Some(Ok(trailers))));
            let mut resp = Response::new(body.boxed());
            resp.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
            resp
        }
        _ => Response::new(Full::new(Bytes::from(body.to_string())).boxed()),
    };
    *resp.status_mut() = status;
    if let Ok(v) = name.parse() {
        resp.headers_mut().insert("x-served-by", v);
    }
    Ok(resp)
}

/// Answers an upgrade request by switching to the protocol asked for, which is an echo: every
/// byte sent on the upgraded connection comes back. The 101 carries `x-served-by`,
/// `x-upgrade-path` and the `Sec-WebSocket-Key` it was sent (as `x-websocket-key`). A WebSocket
/// switch without a key is refused with 400, as RFC 6455 servers do.
fn switch(req: &mut Request<Incoming>, protocol: HeaderValue, name: &str) -> Response<Body> {
    SERVED.fetch_add(1, Ordering::Relaxed);
    let key = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY).cloned();
    if protocol.as_bytes().eq_ignore_ascii_case(b"websocket") && key.is_none() {
        let mut refused = Response::new(Full::new(Bytes::from_static(b"Sec-WebSocket-Key missing\n")).boxed());
        *refused.status_mut() = StatusCode::BAD_REQUEST;
        return refused;
    }
    let upgraded = hyper::upgrade::on(&mut *req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgraded.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(hyper::header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(hyper::header::UPGRADE, protocol);
    if let Ok(v) = name.parse() {
        h.insert("x-served-by", v);
    }
    if let Ok(v) = req.uri().path().parse() {
        h.insert("x-upgrade-path", v);
    }
    if let Some(key) = key {
        h.insert("x-websocket-key", key);
    }
    resp
}

/// One switch asked by an HTTP/2 client (prior knowledge): an extended CONNECT (RFC 8441) with
/// `:protocol`; after a 200, sends each message on the stream and reads back as many bytes.
pub fn extended_connect(addr: SocketAddr, path: &str, protocol: &str, headers: &[String], messages: &[String], timeout: Duration) -> anyhow::Result<Value> {
    runtime()?.block_on(async move {
        tokio::time::timeout(timeout, async move {
            let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.context("h2 handshake")?;
            tokio::spawn(conn);
            let mut req = Request::builder().method(hyper::Method::CONNECT).uri(format!("http://{addr}{path}"));
            req = req.header("sec-websocket-version", "13");
            for h in headers {
                let (k, v) = h.split_once(':').with_context(|| format!("header {h:?} is not name: value"))?;
                req = req.header(k.trim(), v.trim());
            }
            let mut req = req.body(http_body_util::Empty::<Bytes>::new())?;
            req.extensions_mut().insert(hyper::ext::Protocol::from(protocol));
            let mut resp = sender.send_request(req).await.context("send the extended CONNECT")?;
            let status = resp.status().as_u16();
            let head: BTreeMap<String, String> =
                resp.headers().iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
            let mut echoed = Vec::new();
            if status == 200 {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut stream = TokioIo::new(hyper::upgrade::on(&mut resp).await.context("the stream after the 200")?);
                for m in messages {
                    stream.write_all(m.as_bytes()).await.with_context(|| format!("send {m:?} after the switch"))?;
                    let mut back = vec![0; m.len()];
                    stream.read_exact(&mut back).await.with_context(|| format!("read the echo of {m:?}"))?;
                    echoed.push(String::from_utf8_lossy(&back).into_owned());
                }
                // A clean close: this side ends, then the other side's end is awaited.
                stream.shutdown().await.context("end the stream")?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await.context("await the other side's end")?;
            }
            Ok(json!({ "status": status, "headers": head, "echoed": echoed }))
        })
        .await
        .context("timed out")?
    })
}

pub struct GetArgs {
    pub addr: SocketAddr,
    pub count: u32,
    pub path: String,
    pub method: String,
    pub headers: Vec<String>,
    pub h2: bool,
    pub body: String,
    pub chunked: bool,
    pub body_delay: Duration,
    pub timeout: Duration,
}

/// A body of one frame, sent `delay` after the head; its length is told unless `sized` is
/// false (then HTTP/1.1 sends it chunked, and h2c without content-length).
struct OneFrame {
    data: Option<Bytes>,
    sized: bool,
    delay: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for OneFrame {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::task::ready!(self.delay.as_mut().poll(cx));
        std::task::Poll::Ready(self.data.take().map(|data| Ok(hyper::body::Frame::data(data))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.data {
            Some(d) if self.sized => hyper::body::SizeHint::with_exact(d.len() as u64),
            Some(_) => hyper::body::SizeHint::default(),
            None => hyper::body::SizeHint::with_exact(0),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }
}

/// `count` sequential requests over pooled connections; tallies status codes and who served.
pub fn get(args: GetArgs) -> anyhow::Result<Value> {
    runtime()?.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).http2_only(args.h2).build(connector);
        let (mut codes, mut served_by, mut errors) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
        let mut grpc_status = BTreeMap::<String, u64>::new();
        let (mut last_body, mut last_headers) = (Value::Null, BTreeMap::new());
        for _ in 0..args.count {
            let mut req = Request::builder().method(args.method.as_str()).uri(format!("http://{}{}", args.addr, args.path));
            for h in &args.headers {
                if let Some((k, v)) = h.split_once(':') {
                    req = req.header(k.trim(), v.trim());
                }
            }
            let data = Bytes::from(args.body.clone());
            let body = if args.chunked || !args.body_delay.is_zero() {
                OneFrame { data: Some(data), sized: !args.chunked, delay: Box::pin(tokio::time::sleep(args.body_delay)) }.boxed()
            } else {
                Full::new(data).boxed()
            };
            let req = req.body(body).context("request")?;
            match tokio::time::timeout(args.timeout, client.request(req)).await {
                Ok(Ok(resp)) => {
                    *codes.entry(resp.status().as_u16().to_string()).or_default() += 1;
                    let by = resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                    *served_by.entry(by).or_default() += 1;
                    last_headers = resp
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
                        .collect();
                    let from_headers = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
                    let collected = resp.into_body().collect().await.ok();
                    let from_trailers = collected
                        .as_ref()
                        .and_then(|c| c.trailers())
                        .and_then(|t| t.get("grpc-status"))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if let Some(status) = from_trailers.or(from_headers) {
                        *grpc_status.entry(status).or_default() += 1;
                    }
                    let bytes = collected.map(|c| c.to_bytes()).unwrap_or_default();
                    last_body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
                }
                Ok(Err(e)) => *errors.entry(format!("{e}")).or_default() += 1,
                Err(_) => *errors.entry("timeout".into()).or_default() += 1,
            }
        }
        Ok(json!({ "codes": codes, "served_by": served_by, "errors": errors, "grpc_status": grpc_status, "last_body": last_body, "last_headers": last_headers }))
    })
}
