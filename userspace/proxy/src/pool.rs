//! Upstream connections, per endpoint and way there (through the tunnel, per source identity).
//!
//! HTTP/2: one multiplexed connection per endpoint, opened once (requests that arrive while it
//! connects wait for it rather than opening their own), retired after `MAX_STREAMS` requests.
//! Retiring early keeps a connection clear of servers' per-connection limits (nginx's 1,000
//! requests, an h2 server's 1,024 error resets before GOAWAY) that would otherwise end it with
//! requests in flight; a retired connection finishes what it carries and closes when its last
//! stream ends.
//!
//! HTTP/1.1: keep-alive connections, one request at a time each. A connection goes back to
//! its endpoint's idle list when its response body ends, straight from the body (no task per
//! request), and the most recently used idle one is taken first. Idle connections close after
//! `H1_IDLE`.
//!
//! Both: a request the connection never took (closed under it) is given back and sent on
//! another one.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::{
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

use crate::{
    resilience::TryResult,
    slots::Slots,
    upstream::{Dialer, Via},
};

type Body = http_body_util::combinators::BoxBody<hyper::body::Bytes, hyper::Error>;

/// Streams one upstream connection carries before it is retired.
pub const MAX_STREAMS: u64 = 500;
/// Sends of a request the pool's connection handed back unsent.
const UNSENT_RESENDS: usize = 3;
/// How long an HTTP/1.1 connection waits idle in the pool before it is closed.
pub const H1_IDLE: Duration = Duration::from_secs(90);

struct Conn {
    send: http2::SendRequest<Body>,
    streams: AtomicU64,
}

/// One pooled connection per endpoint and way there: through the tunnel, per source identity.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    endpoint: SocketAddrV4,
    via: Via,
}

#[derive(Default)]
pub struct H2Pool {
    conns: Slots<Key, Arc<Conn>>,
    dialer: Dialer,
}

/// Why a request got no response.
pub enum SendError {
    Connect(std::io::Error),
    Http(hyper::Error),
    /// Every connection tried closed before taking the request.
    Unsent,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Http(e) => std::fmt::Display::fmt(e, f),
            SendError::Unsent => write!(f, "upstream closed {UNSENT_RESENDS} connections before taking the request"),
        }
    }
}

impl SendError {
    pub fn kind(&self) -> TryResult {
        match self {
            SendError::Connect(_) => TryResult::ConnectFailure,
            SendError::Http(_) | SendError::Unsent => TryResult::Reset,
        }
    }
}

impl H2Pool {
    pub fn new(dialer: Dialer) -> H2Pool {
        H2Pool { conns: Slots::default(), dialer }
    }

    pub async fn send(&self, endpoint: SocketAddrV4, via: Via, mut req: Request<Body>) -> Result<Response<Body>, SendError> {
        let key = Key { endpoint, via };
        for _ in 0..UNSENT_RESENDS {
            let mut send = self.connection(&key).await.map_err(SendError::Connect)?;
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|b| b.boxed())),
                Err(mut e) => match e.take_message() {
                    // The connection closed before taking the request: send it on a new one.
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
            tracing::debug!(%endpoint, "upstream h2 connection closed before the request was sent; resending");
        }
        Err(SendError::Unsent)
    }

    /// The endpoint's current connection, opening one if it has none, it closed, or it is full.
    async fn connection(&self, key: &Key) -> Result<http2::SendRequest<Body>, std::io::Error> {
        let usable = |conn: &Arc<Conn>| !conn.send.is_closed() && conn.streams.fetch_add(1, Ordering::Relaxed) < MAX_STREAMS;
        // Boxed as in `H1Pool::send`.
        let conn = self.conns.get_or_open(key, usable, async || Box::pin(open(&self.dialer, key)).await).await?;
        Ok(conn.send.clone())
    }

    /// Forgets the connections of keys for which `keep` is false (their streams in flight
    /// finish).
    pub fn retain(&self, keep: impl Fn(&SocketAddrV4, &Via) -> bool) {
        self.conns.retain(|key| keep(&key.endpoint, &key.via));
    }
}

async fn open(dialer: &Dialer, key: &Key) -> Result<Arc<Conn>, std::io::Error> {
    let endpoint = key.endpoint;
    let stream = dialer.connect(&key.via, endpoint).await?;
    let (send, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%endpoint, error = %e, "upstream h2 connection ended");
        }
    });
    Ok(Arc::new(Conn { send, streams: AtomicU64::new(1) }))
}

/// Idle HTTP/1.1 connections, the most recently returned last.
pub struct H1Pool {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    dialer: Dialer,
}

struct Idle {
    send: http1::SendRequest<Body>,
    since: Instant,
}

impl H1Pool {
    /// A pool whose idle connections are closed by a sweep every `H1_IDLE / 3` (the sweep
    /// ends with the pool).
    pub fn start(dialer: Dialer) -> Arc<H1Pool> {
        let pool = Arc::new(H1Pool { idle: Mutex::default(), dialer });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(H1_IDLE / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep(Instant::now());
            }
        });
        pool
    }

    pub async fn send(self: &Arc<Self>, endpoint: SocketAddrV4, via: Via, mut req: Request<Body>) -> Result<Response<Body>, SendError> {
        let key = Key { endpoint, via };
        for _ in 0..UNSENT_RESENDS {
            let mut send = match self.checkout(&key) {
                Some(send) => send,
                // Boxed: connecting is rare, and its state would otherwise ride in every
                // request's future.
                None => Box::pin(self.open(&key)).await.map_err(SendError::Connect)?,
            };
            match send.try_send_request(req).await {
                Ok(resp) => {
                    let pool = Arc::downgrade(self);
                    return Ok(resp.map(|body| Returning::new(body, Back { pool, key, send }).boxed()));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(SendError::Http(e.into_error())),
                },
            }
            tracing::debug!(%endpoint, "upstream connection closed before the request was sent; resending");
        }
        Err(SendError::Unsent)
    }

    /// The most recently returned idle connection of `key` that is ready for a request.
    /// Closed ones are dropped; one not ready yet (its connection task has not caught up with
    /// the end of the last response) stays for a later request.
    fn checkout(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(key)?;
        let mut busy = Vec::new();
        let mut found = None;
        while let Some(conn) = list.pop() {
            if conn.send.is_ready() {
                found = Some(conn.send);
                break;
            }
            if !conn.send.is_closed() {
                busy.push(conn);
            }
        }
        list.extend(busy.into_iter().rev());
        found
    }

    async fn open(&self, key: &Key) -> std::io::Result<http1::SendRequest<Body>> {
        let endpoint = key.endpoint;
        let stream = self.dialer.connect(&key.via, endpoint).await?;
        let (send, connection) = http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            // With upgrades: a 101 hands the connection to the switched session.
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, error = %e, "upstream connection ended");
            }
        });
        Ok(send)
    }

    fn put(&self, key: Key, send: http1::SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.entry(key).or_default().push(Idle { send, since: Instant::now() });
    }

    /// Closes connections idle since before `now - H1_IDLE`, and drops closed ones.
    fn sweep(&self, now: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for list in idle.values_mut() {
            list.retain(|conn| !conn.send.is_closed() && now.duration_since(conn.since) < H1_IDLE);
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// Forgets the idle connections of keys for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&SocketAddrV4, &Via) -> bool) {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).retain(|key, _| keep(&key.endpoint, &key.via));
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).values().map(Vec::len).sum()
    }
}

/// Where a connection goes back when its response has been read.
struct Back {
    pool: Weak<H1Pool>,
    key: Key,
    send: http1::SendRequest<Body>,
}

/// A response body that returns its connection to the pool once it has ended. A body dropped
/// before its end returns nothing: hyper closes that connection.
struct Returning {
    inner: Incoming,
    back: Option<Back>,
}

impl Returning {
    fn new(inner: Incoming, back: Back) -> Returning {
        let mut body = Returning { inner, back: Some(back) };
        // No body at all (HEAD, 204, 304, 101): the connection is free already.
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    fn give_back(&mut self) {
        if let Some(Back { pool, key, send }) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.put(key, send);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // A failed body leaves its connection unusable.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
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

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicUsize};

    use http_body_util::{Empty, Full};
    use hyper::{body::Bytes, server::conn::http1 as server, service::service_fn};
    use tokio::net::TcpListener;

    use super::*;

    /// An HTTP/1.1 server on loopback that counts the connections it accepts. `/close` answers
    /// with `Connection: close`.
    async fn server() -> (SocketAddrV4, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!() };
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(|req: Request<Incoming>| async move {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"0123456789")));
                    if req.uri().path() == "/close" {
                        resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(resp)
                });
                tokio::spawn(server::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        (addr, accepted)
    }

    fn get(path: &str) -> Request<Body> {
        let body = Empty::new().map_err(|never| match never {}).boxed();
        Request::builder().uri(path).header("host", "up").body(body).expect("request")
    }

    async fn read(pool: &Arc<H1Pool>, addr: SocketAddrV4, path: &str) -> Bytes {
        let resp = pool.send(addr, Via::Direct, get(path)).await.map_err(|e| e.to_string()).expect("response");
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn keeps_connections_alive_and_reuses_them() {
        let (addr, accepted) = server().await;
        let pool = H1Pool::start(Dialer::default());
        for _ in 0..5 {
            assert_eq!(read(&pool, addr, "/").await, Bytes::from_static(b"0123456789"));
            assert_eq!(pool.idle_count(), 1, "the connection is back once its body is read");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "five requests, one connection");

        // Two at once need two connections, and both come back.
        let (a, b) = tokio::join!(pool.send(addr, Via::Direct, get("/")), pool.send(addr, Via::Direct, get("/")));
        let (a, b) = (a.map_err(|e| e.to_string()).expect("a"), b.map_err(|e| e.to_string()).expect("b"));
        assert_eq!(pool.idle_count(), 0, "both are out while their bodies are unread");
        let _ = (a.into_body().collect().await, b.into_body().collect().await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 2);
    }

    #[tokio::test]
    async fn unread_closed_and_expired_connections_are_not_reused() {
        let (addr, accepted) = server().await;
        let pool = H1Pool::start(Dialer::default());

        // A body dropped unread leaves its connection out of the pool.
        let resp = pool.send(addr, Via::Direct, get("/")).await.map_err(|e| e.to_string()).expect("response");
        drop(resp);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(read(&pool, addr, "/").await.len(), 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // The server closes after this one: the next request goes on a new connection, unharmed.
        assert_eq!(read(&pool, addr, "/close").await.len(), 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(read(&pool, addr, "/").await.len(), 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);

        // Idle past H1_IDLE: swept.
        assert_eq!(pool.idle_count(), 1);
        pool.sweep(Instant::now() + H1_IDLE / 2);
        assert_eq!(pool.idle_count(), 1, "not idle for long enough yet");
        pool.sweep(Instant::now() + H1_IDLE);
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(read(&pool, addr, "/").await.len(), 10);
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_requests_future_does_not_carry_the_connect_state() {
        // Connecting (through the tunnel: a TLS handshake) is boxed; unboxed, each of these
        // futures was over 5 KiB, moved with every request.
        let ep = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 1);
        let h1 = H1Pool::start(Dialer::default());
        let h2 = H2Pool::new(Dialer::default());
        let sizes = [
            std::mem::size_of_val(&h1.send(ep, Via::Direct, get("/"))),
            std::mem::size_of_val(&h2.send(ep, Via::Direct, get("/"))),
            std::mem::size_of_val(&Dialer::default().connect(&Via::Direct, ep)),
        ];
        assert!(sizes.iter().all(|&n| n < 2048), "h1 send, h2 send, connect: {sizes:?} bytes");
    }

    #[tokio::test]
    async fn connect_failure_is_told_apart() {
        // A port nothing listens on: bind, note the port, close.
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!() };
            addr
        };
        let pool = H1Pool::start(Dialer::default());
        let err = pool.send(addr, Via::Direct, get("/")).await.expect_err("no server");
        assert!(matches!(err.kind(), TryResult::ConnectFailure), "{err}");
    }
}
