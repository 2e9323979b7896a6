//! Upstream HTTP/2 connections: one multiplexed connection per endpoint, opened once (requests
//! that arrive while it connects wait for it rather than opening their own), retired after
//! `MAX_STREAMS` requests. Retiring early keeps a connection clear of servers' per-connection
//! limits (nginx's 1,000 requests, an h2 server's 1,024 error resets before GOAWAY) that would
//! otherwise end it with requests in flight; a retired connection finishes what it carries and
//! closes when its last stream ends. A request the connection never took (closed under it) is
//! given back and sent on a fresh one.

use std::{
    future::poll_fn,
    net::SocketAddrV4,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Request, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame};

use crate::{
    BoxError,
    h2stream::poll_send_capacity,
    resilience::TryResult,
    slots::Slots,
    upstream::{Dialer, Via},
};

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Flow-control windows offered to upstreams, as hyper's client offers them.
const STREAM_WINDOW: u32 = 2 << 20;
const CONN_WINDOW: u32 = 5 << 20;

/// Streams one upstream connection carries before it is retired.
pub const MAX_STREAMS: u64 = 500;
/// Sends of a request the pool's connection handed back unsent.
const UNSENT_RESENDS: usize = 3;

struct Conn {
    send: SendRequest<Bytes>,
    streams: AtomicU64,
    /// Set when the connection's task ends.
    closed: Arc<AtomicBool>,
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
    Http(h2::Error),
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

    pub async fn send(&self, endpoint: SocketAddrV4, via: Via, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let key = Key { endpoint, via };
        let (parts, body) = req.into_parts();
        let head = Request::from_parts(parts, ());
        for _ in 0..UNSENT_RESENDS {
            let send = self.connection(&key).await.map_err(SendError::Connect)?;
            let eos = body.is_end_stream();
            // Until the request is taken, the body is still ours: a connection that closed (or
            // went away) first is no harm, the request goes on a fresh one.
            let taken = match send.ready().await {
                Ok(mut ready) => ready.send_request(head.clone(), eos),
                Err(e) => Err(e),
            };
            let (response, stream) = match taken {
                Ok(taken) => taken,
                Err(e) if e.is_go_away() || e.is_io() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                    tracing::debug!(%endpoint, error = %e, "upstream h2 connection closed before the request was sent; resending");
                    continue;
                }
                Err(e) => return Err(SendError::Http(e)),
            };
            if !eos {
                send_body(body, stream);
            }
            let response = response.await.map_err(SendError::Http)?;
            return Ok(response.map(|recv| Received(recv).boxed()));
        }
        Err(SendError::Unsent)
    }

    /// The endpoint's current connection, opening one if it has none, it closed, or it is full.
    async fn connection(&self, key: &Key) -> Result<SendRequest<Bytes>, std::io::Error> {
        let usable = |conn: &Arc<Conn>| !conn.closed.load(Ordering::Relaxed) && conn.streams.fetch_add(1, Ordering::Relaxed) < MAX_STREAMS;
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
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .handshake(stream)
        .await
        .map_err(std::io::Error::other)?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%endpoint, error = %e, "upstream h2 connection ended");
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok(Arc::new(Conn { send, streams: AtomicU64::new(1), closed }))
}

/// Sends the request body on `stream`. A first frame already there goes at once, queued behind
/// the HEADERS so both leave in one write (the body is looked at with a no-op waker: a stream
/// whose caller waits for the response before sending is not held up); the rest follows in a
/// task, as flow control allows.
fn send_body(mut body: Body, mut stream: SendStream<Bytes>) {
    let mut cx = Context::from_waker(Waker::noop());
    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(&mut cx) {
        let end = body.is_end_stream();
        if send_frame(&mut stream, frame, end) == Sent::Done {
            return;
        }
    }
    tokio::spawn(async move {
        loop {
            let frame = body.frame().await;
            if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
                && let Some(data) = data.filter(|d| !d.is_empty())
                && poll_fn(|cx| poll_send_capacity(&mut stream, data.len(), cx)).await.is_err()
            {
                return;
            }
            let end = body.is_end_stream();
            if send_frame(&mut stream, frame, end) == Sent::Done {
                return;
            }
        }
    });
}

#[derive(PartialEq, Eq)]
enum Sent {
    More,
    Done,
}

/// Queues one frame of the body (`None`: its end); `end`: the body has nothing after it.
fn send_frame(stream: &mut SendStream<Bytes>, frame: Option<Result<Frame<Bytes>, BoxError>>, end: bool) -> Sent {
    let sent = match frame {
        None => stream.send_data(Bytes::new(), true).map(|()| true),
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => stream.send_data(data, end).map(|()| end),
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => stream.send_trailers(trailers).map(|()| true),
                Err(_) => Ok(end),
            },
        },
        Some(Err(e)) => {
            tracing::debug!(error = %e, "request body failed; resetting the upstream stream");
            stream.send_reset(h2::Reason::CANCEL);
            Ok(true)
        }
    };
    match sent {
        Ok(false) => Sent::More,
        // Ended, or the stream is gone (its error comes with the response).
        Ok(true) | Err(_) => Sent::Done,
    }
}

/// An upstream response body: data as it arrives (its flow-control window given back as it is
/// read), then trailers.
struct Received(RecvStream);

impl hyper::body::Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let recv = &mut self.0;
        if !recv.is_end_stream() {
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        match recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}
