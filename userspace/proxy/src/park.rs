//! Idle HTTP/1.1 keep-alive connections are parked outside hyper. A served connection holds
//! hyper's read and write buffers (8 KiB each); most keep-alive connections spend most of their
//! life idle, so once one has had no request in flight for two ticks of `PARK_AFTER` (100 to
//! 150 ms), hyper is told to finish (it has nothing to write and keeps the socket open), the
//! socket waits for readability with no buffer at all, and a fresh hyper connection serves it
//! when the next request arrives. Bytes hyper had already read of a next request are handed
//! back and replayed first, so nothing is lost; the client sees one unbroken connection.

use std::{
    io,
    pin::Pin,
    sync::{PoisonError, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    body::{Body, Bytes, Incoming},
    server::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::{http::Conn, switch};

pub const PARK_AFTER: Duration = Duration::from_millis(50);

/// A socket with bytes to replay before reading from it again.
pub struct Replay {
    prefix: Bytes,
    inner: TcpStream,
}

impl Replay {
    pub fn new(inner: TcpStream) -> Replay {
        Replay { prefix: Bytes::new(), inner }
    }
}

impl AsyncRead for Replay {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves an HTTP/1.1 connection until it closes, parking it whenever it goes idle.
pub async fn serve_h1<S, B>(stream: TcpStream, conn: &Conn, service: S)
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut io = Replay::new(stream);
    loop {
        // Boxed: the task's own state stays small while the connection is parked.
        let mut served = Box::new(http1::Builder::new().serve_connection(TokioIo::new(io), service.clone()));
        let mut seen = conn.requests.load(Ordering::Relaxed);
        let (mut quiet_ticks, mut parking_at) = (0, None);
        let done = loop {
            tokio::select! {
                done = std::future::poll_fn(|cx| served.poll_without_shutdown(cx)) => break done,
                () = tokio::time::sleep(PARK_AFTER) => {
                    let now = conn.requests.load(Ordering::Relaxed);
                    quiet_ticks = if now == seen && conn.in_flight.load(Ordering::Relaxed) == 0 { quiet_ticks + 1 } else { 0 };
                    seen = now;
                    if quiet_ticks >= 2 && parking_at.is_none() {
                        // Idle: hyper finishes without writing anything and keeps the socket.
                        Pin::new(&mut *served).graceful_shutdown();
                        parking_at = Some(now);
                    }
                }
            }
        };
        if let Err(e) = done {
            tracing::debug!(error = %e, "downstream connection ended with an error");
            return;
        }
        // A 101 sent: the connection now belongs to the switched protocol.
        let switched = conn.upgrade.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(switch) = switched {
            let parts = served.into_parts();
            let mut client = parts.io.into_inner();
            client.prefix = Bytes::copy_from_slice(&parts.read_buf);
            // Boxed: every connection's task would otherwise be sized for the copying.
            Box::pin(switch::join(client, *switch)).await;
            return;
        }
        // hyper finished on its own (the client closed or asked to), or a request slipped in
        // after the shutdown and was answered with `connection: close`: the connection is over.
        if parking_at.is_none() || parking_at != Some(conn.requests.load(Ordering::Relaxed)) {
            return;
        }
        let parts = served.into_parts();
        io = parts.io.into_inner();
        // An empty `read_buf` still owns hyper's whole read buffer: keep only real bytes.
        io.prefix = if parts.read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&parts.read_buf) };
        drop(parts.read_buf);
        // So is what the idle connection looked up for its requests.
        conn.signals.lock().unwrap_or_else(PoisonError::into_inner).take();
        if io.prefix.is_empty() {
            let parked = &conn.ctx.metrics.parked;
            parked.inc();
            let woke = io.inner.readable().await;
            parked.dec();
            if woke.is_err() {
                return;
            }
        }
    }
}
