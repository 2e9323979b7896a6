//! HTTP/1.1 and h2c: route -> filters -> upstream -> respond -> record, per request.

use std::{
    convert::Infallible,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    body::{Body as _, Bytes, Incoming},
    server::conn::http2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::either::Either;
use weft_identity::SpiffeId;
use weft_policy::{Filter, HeaderModifier, PathRewrite, TrafficSettings};

use crate::{
    Ctx, Source,
    detect::Protocol,
    idle, park, switch,
    pool::{self, H1Pool, H2Pool},
    replay::Replay,
    resilience::{self, NoSlot, TryResult},
    trace,
    metrics::{MirrorLabels, RetryLabels, Signals},
    record::{self, Counted, Exchange, Recorded, RequestSize},
    route::{Decision, Table, pick},
    upstream::{Dialer, Via},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request body buffered to send a mirror copy; bigger bodies are not mirrored.
const MIRROR_BODY_LIMIT: usize = 1 << 20;

/// Pooled upstream connections: HTTP/1.1 keep-alive and HTTP/2 multiplexing, per endpoint (and,
/// through the tunnel, per source identity).
pub struct Clients {
    h1: Arc<H1Pool>,
    h2: H2Pool,
}

impl Clients {
    /// Starts the HTTP/1.1 pool's idle sweep: call within the runtime.
    pub fn start(dialer: Dialer) -> Clients {
        Clients { h1: H1Pool::start(dialer.clone()), h2: H2Pool::new(dialer) }
    }

    /// Forgets pooled connections to endpoints not in `live` and of sources not in `sources`
    /// (requests in flight on them finish).
    pub fn retain(&self, live: impl Fn(&SocketAddrV4) -> bool, sources: impl Fn(&SpiffeId) -> bool) {
        let keep = |endpoint: &SocketAddrV4, via: &Via| {
            live(endpoint) && match via {
                Via::Direct => true,
                Via::Tunnel { src, .. } => sources(src),
            }
        };
        self.h1.retain(keep);
        self.h2.retain(keep);
    }

    /// Sends a request made ready by [`outgoing`] to `endpoint`: the pool's own future, not one
    /// of ours around it, so a request's future holds no second copy of the request.
    fn send(
        &self,
        endpoint: SocketAddrV4,
        via: Via,
        req: Outgoing,
    ) -> impl Future<Output = Result<Response<Body>, pool::SendError>> + Send + '_ {
        match req {
            Outgoing::Http2(req) => Either::Left(self.h2.send(endpoint, via, req)),
            Outgoing::Http1(req) => Either::Right(self.h1.send(endpoint, via, req)),
        }
    }
}

impl From<pool::SendError> for Failure {
    fn from(e: pool::SendError) -> Failure {
        let reason = match &e {
            pool::SendError::Http(h) => innermost(h),
            other => other.to_string(),
        };
        Failure { kind: e.kind(), reason }
    }
}

/// A request made ready for one endpoint in one protocol. Made apart from the send, so that
/// `forward` can await a pool's send directly, with no future of ours between.
enum Outgoing {
    Http1(Request<Body>),
    Http2(Request<Body>),
}

/// `req` as it goes to `endpoint` in `protocol` (see `Table::upstream_protocol`).
fn outgoing(protocol: Protocol, endpoint: SocketAddrV4, req: Request<Body>) -> Result<Outgoing, Failure> {
    let (mut parts, body) = req.into_parts();
    let upgrade = switch::asked(&parts.headers).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    Ok(match protocol {
        Protocol::Http2 => {
            // The pool connects to the endpoint; :authority stays the name the client used
            // (or a rewrite set), and h2 forbids a Host header beside it.
            let authority = match parts.headers.remove(header::HOST) {
                Some(host) => Authority::try_from(host.as_bytes()).ok(),
                None => parts.uri.authority().cloned(),
            };
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = authority.or_else(|| Authority::try_from(endpoint.to_string()).ok());
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|_| Failure::from(TryResult::Reset))?;
            parts.version = Version::HTTP_2;
            Outgoing::Http2(Request::from_parts(parts, body))
        }
        _ => {
            // The connection is to the endpoint already: the request line carries the path
            // (origin form), and Host keeps the name the client used.
            if !parts.headers.contains_key(header::HOST) {
                let host = match parts.uri.authority() {
                    Some(a) => HeaderValue::from_str(a.as_str()),
                    None => HeaderValue::from_str(&endpoint.to_string()),
                };
                if let Ok(host) = host {
                    parts.headers.insert(header::HOST, host);
                }
            }
            parts.uri = if parts.method == http::Method::CONNECT {
                // CONNECT names where to connect (authority form), as the client would.
                Authority::try_from(endpoint.to_string()).map_or_else(|_| Uri::from(path), Uri::from)
            } else {
                Uri::from(path)
            };
            parts.version = Version::HTTP_11;
            // An upgrade is asked of the upstream in turn: these two are hop-by-hop, but
            // the switch has to reach the server that makes it.
            if let Some(protocol) = upgrade {
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol);
            }
            Outgoing::Http1(Request::from_parts(parts, body))
        }
    })
}

/// An error's innermost cause: what an operator needs (hyper-util's error wraps hyper's,
/// which wraps h2's or the socket's).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = s.to_string();
        source = s.source();
    }
    reason
}

/// One downstream connection.
pub struct Conn {
    pub ctx: Arc<Ctx>,
    pub dst: SocketAddrV4,
    /// The destination service's metric label, computed once per connection.
    pub destination: String,
    pub src: Source,
    pub client: SocketAddrV4,
    pub protocol: Protocol,
    /// Requests started on this connection, and those whose response has not yet ended: an
    /// HTTP/1.1 connection with none in flight for a while is parked.
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    /// The golden signals of the last label set this connection's requests used.
    pub signals: Mutex<Option<Box<Signals>>>,
    /// The protocol switch this connection's last response agreed to.
    pub upgrade: Mutex<Option<Box<switch::Switch>>>,
}

pub async fn serve(stream: TcpStream, conn: Arc<Conn>) {
    // Boxed: an HTTP/1.1 connection holds its request's future, and every idle connection
    // would be sized for it; an HTTP/2 stream's task would be copied whole as hyper spawns it.
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            conn.requests.fetch_add(1, Ordering::Relaxed);
            conn.in_flight.fetch_add(1, Ordering::Relaxed);
            Box::pin(handle(req, conn.clone()))
        })
    };
    match conn.protocol {
        Protocol::Http2 => {
            // Boxed so every connection's task is not sized for HTTP/2's state.
            // Extended CONNECT (RFC 8441) is how HTTP/2 clients ask for WebSocket.
            let served = Box::pin(
                http2::Builder::new(TokioExecutor::new()).enable_connect_protocol().serve_connection(TokioIo::new(stream), service),
            );
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "downstream connection ended with an error");
            }
        }
        _ => {
            park::serve_h1(stream, &conn, service).await;
            // A switch agreed to but never joined (the connection failed first) is a request
            // that did not complete; taking it also frees the connection it refers back to.
            let unjoined = conn.upgrade.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(switch) = unjoined {
                switch.exchange.switch_ended(0, 0, false);
            }
        }
    }
}

/// How a request ended, for metrics and the access log.
struct Outcome {
    route: String,
    response: Response<Body>,
    upstream: Option<SocketAddrV4>,
    /// The idle timeout of the session, should the response switch protocols.
    idle: Option<Duration>,
}

async fn handle(mut req: Request<Incoming>, conn: Arc<Conn>) -> Result<Response<Recorded>, Infallible> {
    let start = Instant::now();
    let wall_start = conn.ctx.spans.is_some().then(SystemTime::now);
    // The table newest at the start of the request serves all of it (route swaps are atomic).
    let table = conn.ctx.table.borrow().clone();
    let span = trace::continue_trace(req.headers_mut(), conn.ctx.config.trace_sample);
    // The response carries the request's id back (the value as set, never indexed).
    let request_id = span.request_id.clone();
    let grpc = is_grpc(req.headers());
    // An HTTP/2 client's WebSocket (extended CONNECT) from here on reads as an HTTP/1.1 switch.
    let stream = switch::from_extended_connect(&mut req);
    let upgrade = switch::asked(req.headers()).is_some();
    let (method, path, version) = (req.method().clone(), req.uri().path().to_owned(), req.version());
    // authorize: before routing, on the path as policies read it.
    let verdict = table.authz.check_request(conn.dst, conn.src.peer.as_ref(), &req);
    let policy = match &verdict {
        Ok(admitted) => admitted.policy.as_ref(),
        Err(refusal) => refusal.policy.as_ref(),
    }
    .map(ToString::to_string);
    let (req, request_size) = match req.body().size_hint().exact() {
        Some(n) => (req.map(|b| b.boxed()), RequestSize::Exact(n)),
        None => {
            let seen = Arc::new(AtomicU64::new(0));
            (req.map(|inner| Counted { inner, seen: seen.clone() }.boxed()), RequestSize::Counted(seen))
        }
    };
    let (Outcome { route, mut response, upstream, idle }, denied) = match verdict {
        Ok(admitted) => {
            let mut req = req;
            if let Some(uri) = admitted.uri {
                *req.uri_mut() = uri;
            }
            let outcome = match plan(&mut req, &conn, &table) {
                Routed::Answer(answered) => answered,
                Routed::Forward(plan) => {
                    if !plan.mirrors.is_empty() {
                        let use_client = plan.traffic.is_some_and(|t| t.use_client_protocol);
                        // Boxed: mirroring is rare, and its state would otherwise ride in
                        // every request's future.
                        req = Box::pin(mirror(req, plan.mirrors, use_client, &conn, &table)).await;
                    }
                    let (mut response, upstream) = forward(req, plan.target, plan.limits, plan.traffic, &conn, &table).await;
                    for filter in plan.filters.into_iter().flatten() {
                        if let Filter::ResponseHeaderModifier(m) = filter {
                            modify(response.headers_mut(), m);
                        }
                    }
                    Outcome { route: plan.route.to_owned(), response, upstream, idle: idle::timeout_of(plan.traffic) }
                }
            };
            (outcome, None)
        }
        Err(refusal) => {
            conn.ctx.metrics.authz_refused(&refusal);
            (Outcome { route: "authz".into(), response: refused(&refusal), upstream: None, idle: None }, Some(refusal.reason))
        }
    };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !upgrade {
        response = local(StatusCode::BAD_GATEWAY, "upstream switched protocols unasked");
    }
    let switched = (switching && upgrade).then(|| hyper::upgrade::on(&mut response));
    if switched.is_some() && stream.is_some() {
        // An HTTP/2 client is answered 200 on its stream (and that is the code recorded).
        switch::answer_extended_connect(&mut response);
    }
    response.headers_mut().insert("x-request-id", request_id);
    let exchange = Exchange {
        start,
        wall_start,
        span,
        grpc,
        method,
        path,
        version,
        request_size,
        route,
        upstream,
        code: response.status().as_u16(),
        header_grpc_status: record::grpc_status_text(response.headers()),
        policy,
        denied,
        conn: conn.clone(),
    };
    if let Some(upstream) = switched {
        // The request lasts as long as the switched session, and is recorded when it ends,
        // with its bytes (as Envoy counts an upgrade).
        let switch = switch::Switch { upstream, exchange, idle };
        match stream {
            // HTTP/2: the stream carries the session once its 200 is sent.
            Some(client) => drop(tokio::spawn(switch::join_stream(client, switch))),
            // HTTP/1.1: once hyper has sent the 101, the connection's loop joins the two
            // switched connections (see `park::serve_h1`).
            None => *conn.upgrade.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(switch)),
        }
        return Ok(response.map(Recorded::unrecorded));
    }
    Ok(response.map(|body| Recorded::new(body, exchange)))
}

/// Where routing sends a request and under which settings. Routing is worked out without
/// awaiting, so the request's one future holds `forward` and no future per routing step.
struct Plan<'t> {
    route: &'t str,
    target: SocketAddrV4,
    limits: Limits,
    traffic: Option<&'t TrafficSettings>,
    /// The rule's and the chosen backend's filters, whose response header modifiers apply to
    /// the response.
    filters: [&'t [Filter]; 2],
    mirrors: &'t [(SocketAddrV4, f64)],
}

/// What routing made of a request.
enum Routed<'t> {
    Forward(Plan<'t>),
    /// The answer routing gives itself (no route, a redirect, no backend).
    Answer(Outcome),
}

/// Routes a request (applying the request filters of the rule it takes).
fn plan<'t>(req: &mut Request<Body>, conn: &Conn, table: &'t Table) -> Routed<'t> {
    let service = table.services.get(&conn.dst);
    let decision = match service {
        Some(s) => s.route(&conn.src.namespace, req.method(), req.uri(), req.headers()),
        // Handed over but no L7 entry (e.g. `weft.dev/use-proxy` just removed): go to the service.
        None => Decision::Default(conn.dst),
    };
    let rule = match decision {
        Decision::NoRoute => {
            let response = local(StatusCode::NOT_FOUND, "no route matched");
            return Routed::Answer(Outcome { route: "none".into(), response, upstream: None, idle: None });
        }
        Decision::Default(target) => {
            let traffic = service.map(|s| &s.traffic);
            return Routed::Forward(Plan { route: "default", target, limits: Limits::default(), traffic, filters: [&[], &[]], mirrors: &[] });
        }
        Decision::Rule(rule) => rule,
    };
    let traffic = rule.traffic.as_ref().or_else(|| service.map(|s| &s.traffic));
    let answer = |response| Outcome { route: rule.label.clone(), response, upstream: None, idle: idle::timeout_of(traffic) };
    if let Some(redirect) = rule.filters.iter().find(|f| matches!(f, Filter::RequestRedirect { .. })) {
        return Routed::Answer(answer(redirect_response(req, redirect, rule.prefix.as_deref())));
    }
    let Some(backend) = pick(&rule.backends, |b| b.weight) else {
        return Routed::Answer(answer(local(StatusCode::INTERNAL_SERVER_ERROR, "route has no backend with weight")));
    };
    let Some(target) = backend.target else {
        // Gateway API: an unresolvable backendRef answers 500 for its share of requests.
        return Routed::Answer(answer(local(StatusCode::INTERNAL_SERVER_ERROR, "backend service not found")));
    };
    for filter in rule.filters.iter().chain(&backend.filters) {
        match filter {
            Filter::RequestHeaderModifier(m) => modify(req.headers_mut(), m),
            Filter::UrlRewrite { hostname, path } => rewrite(req, hostname.as_deref(), path.as_ref(), rule.prefix.as_deref()),
            _ => {}
        }
    }
    Routed::Forward(Plan {
        route: &rule.label,
        target,
        limits: Limits { request: rule.request_timeout, per_try: rule.backend_timeout },
        traffic,
        filters: [&rule.filters, &backend.filters],
        mirrors: &rule.mirrors,
    })
}

/// Timeouts a route sets (Gateway API `timeouts`).
#[derive(Clone, Copy, Default)]
struct Limits {
    request: Option<Duration>,
    per_try: Option<Duration>,
}

fn min_some(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// upstream: tries endpoints of `target` under the traffic policy (endpoint choice, circuit
/// breaker, outlier ejection, retries within the budget) and the route's timeouts.
async fn forward(
    req: Request<Body>,
    target: SocketAddrV4,
    limits: Limits,
    traffic: Option<&TrafficSettings>,
    conn: &Conn,
    table: &Table,
) -> (Response<Body>, Option<SocketAddrV4>) {
    let default = TrafficSettings::default();
    let traffic = traffic.unwrap_or(&default);
    let Some(endpoints) = table.endpoints.get(&target) else {
        return (local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"), None);
    };
    let upstreams = &conn.ctx.upstreams;
    let target_state = upstreams.target(target);
    let ticket = target_state.request_started();
    let metrics = &conn.ctx.metrics;

    let retry = traffic.retries.as_ref().filter(|r| r.attempts > 0);
    let per_try = min_some(retry.and_then(|r| r.per_try_timeout), limits.per_try);
    let deadline = min_some(limits.request, traffic.request_timeout).map(|t| Instant::now() + t);

    // A retried request needs its body again: it is streamed with a copy kept, up to the
    // policy's bound (see replay.rs).
    let (mut parts, body) = req.into_parts();
    let body = match gather(body, deadline).await {
        Ok(body) => body,
        Err(response) => return (response, None),
    };
    let mut body = Some(body);
    let replay = match retry {
        Some(r) if resilience::idempotent(&parts.method) || r.retry_non_idempotent => {
            body.take().map(|b| Replay::new(b, r.max_body_bytes))
        }
        _ => None,
    };

    let protocol = table.upstream_protocol(target, conn.protocol, needed_protocol(&parts.headers), traffic.use_client_protocol);
    let limit = request_limit(&traffic.circuit_breaker, protocol);
    let mut retries = 0;
    loop {
        let Ok((endpoint, state)) =
            resilience::pick_endpoint(upstreams, &target_state, endpoints, traffic.load_balancer, limit)
        else {
            return (local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"), None);
        };
        // Past the limit the request waits, as one of at most maxPendingRequests.
        let slot = match state.acquire(limit, traffic.circuit_breaker.max_pending_requests, deadline).await {
            Ok(slot) => slot,
            Err(NoSlot::Overflow) => {
                metrics.overflow.inc();
                return (local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow: circuit breaker open"), None);
            }
            Err(NoSlot::TimedOut) => return (local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"), None),
        };
        let attempt_body = match (&replay, body.take()) {
            (Some(replay), _) => replay.next_try(),
            (None, b) => b,
        };
        // The body went with an earlier try and is kept nowhere; nothing left to retry with.
        let Some(attempt_body) = attempt_body else {
            return (local(StatusCode::SERVICE_UNAVAILABLE, "upstream failed"), Some(endpoint));
        };
        let now = Instant::now();
        if deadline.is_some_and(|d| d <= now) {
            return (local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"), Some(endpoint));
        }
        let try_timeout = min_some(per_try, deadline.map(|d| d - now));
        let via = Via::to(table, conn.src.id.as_ref(), endpoint);
        // A request that may be tried again keeps its head for the next try; the only try
        // takes it (a retry needs `replay`, so the empty head left behind is never sent).
        let head = match &replay {
            Some(_) => parts.clone(),
            None => std::mem::replace(&mut parts, Request::new(()).into_parts().0),
        };
        let attempt = Request::from_parts(head, attempt_body);
        // A workload of this node: its own policies are judged here, on the request as routed.
        if let Some(workload) = table.guarded_local(endpoint).filter(|_| via == Via::Direct)
            && let Err(refusal) = table.authz.check_workload_request(workload, endpoint.port(), conn.src.peer.as_ref(), &attempt)
        {
            metrics.authz_refused(&refusal);
            return (refused(&refusal), Some(endpoint));
        }
        let result = match outgoing(protocol, endpoint, attempt) {
            Ok(attempt) => {
                let call = conn.ctx.clients.send(endpoint, via, attempt);
                // Boxed when a timeout applies: the timer's state would otherwise ride in
                // every request's future.
                match try_timeout {
                    Some(t) => match Box::pin(tokio::time::timeout(t, call)).await {
                        Ok(sent) => sent.map_err(Failure::from),
                        Err(_) => Err(Failure::from(TryResult::Timeout)),
                    },
                    None => call.await.map_err(Failure::from),
                }
            }
            Err(failure) => Err(failure),
        };
        drop(slot);
        if let Err(f) = &result {
            tracing::debug!(%endpoint, reason = %f.reason, "upstream request failed");
        }
        let outcome = match &result {
            Ok(resp) => TryResult::Status(resp.status(), grpc_status(resp.headers())),
            Err(failure) => failure.kind,
        };
        if resilience::record_outcome(upstreams, &state, outcome, traffic.outlier_detection.as_ref(), endpoints) {
            metrics.ejections.inc();
            tracing::info!(%endpoint, "outlier ejected");
        }
        if let Some(r) = retry
            && outcome.retriable(&r.retry_on)
            && retries < r.attempts
            && replay.as_ref().is_some_and(Replay::replayable)
        {
            if target_state.try_retry(r, ticket) {
                metrics.retries.get_or_create(&RetryLabels { result: "retried" }).inc();
                retries += 1;
                tokio::time::sleep(resilience::backoff(r, retries - 1)).await;
                continue;
            }
            metrics.retries.get_or_create(&RetryLabels { result: "budget_exhausted" }).inc();
        }
        let response = match result {
            Ok(resp) => resp,
            Err(Failure { kind: TryResult::ConnectFailure, .. }) => {
                local(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
            }
            Err(Failure { kind: TryResult::Timeout, .. }) => local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            // Like Envoy, say why: the reset reason is what an operator needs.
            Err(Failure { reason, .. }) => local_text(StatusCode::BAD_GATEWAY, format!("upstream reset: {reason}")),
        };
        return (response, Some(endpoint));
    }
}

/// Request bodies of a known length up to this are gathered before the request goes upstream.
const GATHER_LIMIT: u64 = 16 * 1024;

/// Gathers a small body of known length that has not all arrived yet, so the request's head
/// and body leave for the upstream in one write: clients often send them apart (an h2
/// client's HEADERS and DATA frames), and each write wakes the upstream. The upstream could
/// not answer before the body anyway; polling the body also answers `Expect: 100-continue`.
async fn gather(body: Body, deadline: Option<Instant>) -> Result<Body, Response<Body>> {
    match body.size_hint().exact() {
        Some(n) if n > 0 && n <= GATHER_LIMIT && !body.is_end_stream() => {}
        _ => return Ok(body),
    }
    let collected = match deadline {
        Some(d) => tokio::time::timeout_at(d, body.collect())
            .await
            .map_err(|_| local(StatusCode::REQUEST_TIMEOUT, "request body not received in time"))?,
        None => body.collect().await,
    };
    let collected = collected.map_err(|e| local_text(StatusCode::BAD_REQUEST, format!("request body: {}", innermost(&e))))?;
    let trailers = collected.trailers().cloned();
    let full = Full::new(collected.to_bytes()).map_err(|never| match never {});
    Ok(match trailers {
        Some(t) => full.with_trailers(std::future::ready(Some(Ok(t)))).boxed(),
        None => full.boxed(),
    })
}

/// Requests one endpoint may have in flight: over HTTP/1.1 each holds a connection, so
/// `maxConnections` bounds them too; over HTTP/2 they share one.
fn request_limit(breaker: &weft_policy::CircuitBreaker, protocol: Protocol) -> u32 {
    match protocol {
        Protocol::Http1 => breaker.max_requests.min(breaker.max_connections),
        _ => breaker.max_requests,
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// A try that got no response.
struct Failure {
    kind: TryResult,
    reason: String,
}

impl From<TryResult> for Failure {
    fn from(kind: TryResult) -> Self {
        Failure { kind, reason: String::new() }
    }
}

/// Sends copies of the request to the mirror targets (their responses are dropped) and returns
/// the request to forward. The body is buffered only when a copy is due.
async fn mirror(req: Request<Body>, mirrors: &[(SocketAddrV4, f64)], use_client: bool, conn: &Conn, table: &Table) -> Request<Body> {
    let due: Vec<SocketAddrV4> =
        mirrors.iter().filter(|(_, percent)| fastrand::f64() * 100.0 < *percent).map(|(t, _)| *t).collect();
    if due.is_empty() {
        return req;
    }
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::Limited::new(body, MIRROR_BODY_LIMIT).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            // Too large or broken: forward nothing rather than a truncated body.
            conn.ctx.metrics.mirrored.get_or_create(&MirrorLabels { result: "body_too_large" }).inc();
            return Request::from_parts(parts, Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
        }
    };
    let full = |b: Bytes| Full::new(b).map_err(|never| match never {}).boxed();
    for target in due {
        let Some(endpoint) = table.endpoint(target) else {
            conn.ctx.metrics.mirrored.get_or_create(&MirrorLabels { result: "no_endpoint" }).inc();
            continue;
        };
        let protocol = table.upstream_protocol(target, conn.protocol, needed_protocol(&parts.headers), use_client);
        let Ok(copy) = outgoing(protocol, endpoint, Request::from_parts(parts.clone(), full(bytes.clone()))) else {
            conn.ctx.metrics.mirrored.get_or_create(&MirrorLabels { result: "error" }).inc();
            continue;
        };
        let ctx = conn.ctx.clone();
        let via = Via::to(table, conn.src.id.as_ref(), endpoint);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(Duration::from_secs(30), ctx.clients.send(endpoint, via, copy)).await {
                // Drain the body so the pooled connection can be reused; the response is dropped.
                Ok(Ok(resp)) => resp.into_body().collect().await.map_or("error", |_| "sent"),
                _ => "error",
            };
            ctx.metrics.mirrored.get_or_create(&MirrorLabels { result }).inc();
        });
    }
    Request::from_parts(parts, full(bytes))
}

/// The answer to a request authorization refused: the reason in the body and a header.
fn refused(refusal: &crate::authz::Refusal) -> Response<Body> {
    let mut resp = local_text(refusal.status, refusal.reason.clone());
    crate::authz::mark_refusal(resp.headers_mut(), refusal.status, &refusal.reason);
    resp
}

fn local(status: StatusCode, message: &'static str) -> Response<Body> {
    local_text(status, message.to_owned())
}

fn local_text(status: StatusCode, message: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(message + "\n")).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp.headers_mut().insert("x-weft-proxy", HeaderValue::from_static("local"));
    resp
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"))
}

/// What a request needs of the upstream whatever its port declares: gRPC proper needs HTTP/2
/// for its trailers (gRPC-Web was made for HTTP/1.1); a protocol switch takes over an
/// HTTP/1.1 connection.
fn needed_protocol(headers: &HeaderMap) -> Option<Protocol> {
    let grpc = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes).is_some_and(|v| {
        v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
    });
    if grpc {
        Some(Protocol::Http2)
    } else {
        switch::asked(headers).map(|_| Protocol::Http1)
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = switch::connection_tokens(headers).filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        // gRPC needs "te: trailers" end to end.
        if name == header::TE && headers.get(&name).is_some_and(|v| v == "trailers") {
            continue;
        }
        headers.remove(name);
    }
}

fn modify(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

/// The request path after a rewrite.
fn rewritten_path(path: &str, rewrite: &PathRewrite, prefix: Option<&str>) -> String {
    match rewrite {
        PathRewrite::ReplaceFullPath(p) => p.clone(),
        PathRewrite::ReplacePrefixMatch(p) => {
            let matched = prefix.unwrap_or("/").trim_end_matches('/');
            let rest = path.strip_prefix(matched).unwrap_or(path);
            let joined = format!("{}/{}", p.trim_end_matches('/'), rest.trim_start_matches('/'));
            if rest.is_empty() && p != "/" { joined.trim_end_matches('/').to_owned() } else { joined }
        }
    }
}

fn rewrite(req: &mut Request<Body>, hostname: Option<&str>, path: Option<&PathRewrite>, prefix: Option<&str>) {
    if let Some(host) = hostname.and_then(|h| HeaderValue::from_str(h).ok()) {
        req.headers_mut().insert(header::HOST, host);
    }
    if let Some(path) = path {
        let new_path = rewritten_path(req.uri().path(), path, prefix);
        let pq = match req.uri().query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        if let Ok(uri) = pq.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
}

fn redirect_response(req: &Request<Body>, filter: &Filter, prefix: Option<&str>) -> Response<Body> {
    let Filter::RequestRedirect { scheme, hostname, path, port, status } = filter else {
        return local(StatusCode::INTERNAL_SERVER_ERROR, "not a redirect");
    };
    let host_header = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| req.uri().host());
    let (req_host, req_port) = match host_header.and_then(|h| h.rsplit_once(':')) {
        Some((h, p)) => (h.to_owned(), p.parse::<u16>().ok()),
        None => (host_header.unwrap_or_default().to_owned(), None),
    };
    let scheme = scheme.clone().unwrap_or_else(|| "http".into());
    let host = hostname.clone().unwrap_or(req_host);
    // Per the spec a redirect keeps the request's port only when neither scheme nor port is set.
    let port = port.or(if scheme == "http" { req_port } else { None });
    let default_port = matches!((scheme.as_str(), port), ("http", Some(80)) | ("https", Some(443)));
    let authority = match port {
        Some(p) if !default_port => format!("{host}:{p}"),
        _ => host,
    };
    let new_path = path.as_ref().map_or_else(|| req.uri().path().to_owned(), |p| rewritten_path(req.uri().path(), p, prefix));
    let location = match req.uri().query() {
        Some(q) => format!("{scheme}://{authority}{new_path}?{q}"),
        None => format!("{scheme}://{authority}{new_path}"),
    };
    let mut resp = local(StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND), "redirect");
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, pin::Pin, task::Poll};

    use hyper::body::{Frame, SizeHint};

    use super::*;

    /// Frames handed out one per poll, the last followed by nothing at all (`stall`) or the end.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        hint: Option<u64>,
        stall: bool,
    }

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            match self.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn size_hint(&self) -> SizeHint {
            self.hint.map_or_else(SizeHint::default, SizeHint::with_exact)
        }
    }

    fn frames(frames: Vec<Frame<Bytes>>, hint: Option<u64>, stall: bool) -> Body {
        Frames { frames: frames.into(), hint, stall }.boxed()
    }

    #[tokio::test]
    async fn gather_joins_a_small_body_and_keeps_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("1"));
        let parts = vec![Frame::data(Bytes::from("ab")), Frame::data(Bytes::from("cd")), Frame::trailers(trailers)];
        let mut gathered = gather(frames(parts, Some(4), false), None).await.map_err(|r| r.status()).expect("gathered");
        let first = gathered.frame().await.expect("a frame").expect("no error");
        assert_eq!(first.into_data().ok(), Some(Bytes::from("abcd")), "one frame with the whole body");
        let rest = gathered.collect().await.expect("no error");
        assert_eq!(rest.trailers().and_then(|t| t.get("x-checksum")), Some(&HeaderValue::from_static("1")));
    }

    #[tokio::test]
    async fn gather_answers_408_when_the_body_is_late_and_leaves_others_alone() {
        let deadline = Instant::now() + Duration::from_millis(50);
        let late = gather(frames(vec![], Some(10), true), Some(deadline)).await;
        assert_eq!(late.err().map(|r| r.status()), Some(StatusCode::REQUEST_TIMEOUT));
        // Unknown length (streams, gRPC) and bodies over the bound are not waited for.
        for hint in [None, Some(GATHER_LIMIT + 1)] {
            let streamed = tokio::time::timeout(Duration::from_secs(5), gather(frames(vec![], hint, true), None)).await;
            assert!(matches!(streamed, Ok(Ok(_))), "hint {hint:?}: passed on as it is");
        }
    }

    #[test]
    fn prefix_rewrites() {
        let cases = [
            ("/api/v1/users", PathRewrite::ReplacePrefixMatch("/v2".into()), Some("/api/v1"), "/v2/users"),
            ("/api/v1", PathRewrite::ReplacePrefixMatch("/v2".into()), Some("/api/v1"), "/v2"),
            ("/api/v1/x", PathRewrite::ReplacePrefixMatch("/".into()), Some("/api/v1"), "/x"),
            ("/anything", PathRewrite::ReplaceFullPath("/fixed".into()), None, "/fixed"),
        ];
        for (path, rewrite, prefix, want) in cases {
            assert_eq!(rewritten_path(path, &rewrite, prefix), want, "{path} {rewrite:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("x-custom, keep-alive"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-custom").is_none() && h.get("connection").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-end-to-end").is_some());
    }

    /// The size of the future `make` would return (it is never called).
    fn future_size<F: FnOnce() -> Fut, Fut>(_make: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn a_requests_future_holds_no_future_per_routing_step() {
        // Each request's future is boxed, and moved whole; with routing, the route's rule and
        // each try as futures nested in it, it was 6,464 bytes; with each try's send to the
        // pool nested in one more future, 5,120.
        let size = future_size(|| handle(todo!(), todo!()));
        assert!(size < 4_800, "a request's future is {size} bytes");
    }
}
