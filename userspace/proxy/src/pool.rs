//! Upstream HTTP/2 connections: one multiplexed connection per endpoint, opened once (requests
//! that arrive while it connects wait for it rather than opening their own), retired after
//! `MAX_STREAMS` requests. Retiring early keeps a connection clear of servers' per-connection
//! limits (nginx's 1,000 requests, an h2 server's 1,024 error resets before GOAWAY) that would
//! otherwise end it with requests in flight; a retired connection finishes what it carries and
//! closes when its last stream ends. A request the connection never took (closed under it) is
//! given back and sent on a fresh one.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use http::{Request, Response};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

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

    pub async fn send(&self, endpoint: SocketAddrV4, via: Via, mut req: Request<Body>) -> Result<Response<Incoming>, SendError> {
        let key = Key { endpoint, via };
        for _ in 0..UNSENT_RESENDS {
            let mut send = self.connection(&key).await.map_err(SendError::Connect)?;
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
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
        let conn = self.conns.get_or_open(key, usable, async || open(&self.dialer, key).await).await?;
        Ok(conn.send.clone())
    }

    /// Forgets connections to endpoints no longer in `keep` (their in-flight streams finish).
    pub fn retain(&self, keep: impl Fn(&SocketAddrV4) -> bool) {
        self.conns.retain(|key| keep(&key.endpoint));
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
