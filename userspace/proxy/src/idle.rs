//! The idle timeout of connections the proxy only passes bytes for (opaque TCP, switched
//! protocols): a copy that sees no byte either way for the timeout ends with `TimedOut`.
//!
//! Watching one side is enough: what is read from it goes one way and what is written to it
//! the other, so every byte of the copy passes through it.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use weft_policy::{DEFAULT_IDLE_TIMEOUT, TrafficSettings};

/// The idle timeout under `traffic`, the default where no policy applies.
pub fn timeout_of(traffic: Option<&TrafficSettings>) -> Option<Duration> {
    traffic.map_or(Some(DEFAULT_IDLE_TIMEOUT), |t| t.idle_timeout)
}

/// When bytes last passed, in milliseconds since `start`. Atomic only so that a future holding
/// a reference to it stays `Send`; one task reads and writes it.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    /// `stream`, with every byte through it counted, and counted as activity.
    pub fn watch<S>(&self, stream: S) -> Watched<'_, S> {
        Watched { inner: stream, activity: self, read: 0, written: 0 }
    }

    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once `idle` has passed without activity; never with `None`.
    pub async fn expired(&self, idle: Option<Duration>) {
        let Some(idle) = idle else { return std::future::pending().await };
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

/// Copies both ways until either side ends, as `tokio::io::copy_bidirectional`, or until
/// `idle` passes with no byte either way: then `TimedOut`. Returns how it ended and the bytes
/// read from and written to `a`, however it ended.
pub async fn copy_bidirectional<A, B>(a: A, b: &mut B, idle: Option<Duration>) -> (io::Result<()>, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity::new();
    let mut a = activity.watch(a);
    let ended = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, b) => copied.map(drop),
        () = activity.expired(idle) => Err(timed_out(idle)),
    };
    (ended, a.read, a.written)
}

pub fn timed_out(idle: Option<Duration>) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("idle for {:?}, the idle timeout", idle.unwrap_or_default()))
}

pub struct Watched<'a, S> {
    inner: S,
    activity: &'a Activity,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.read += read as u64;
            self.activity.touch();
        }
        polled
    }
}

impl<S> Watched<'_, S> {
    fn wrote(&mut self, n: usize) {
        if n > 0 {
            self.written += n as u64;
            self.activity.touch();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote(n);
        }
        polled
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote(n);
        }
        polled
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_copy_ends_after_the_idle_timeout_and_bytes_put_it_off() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let idle = Some(Duration::from_secs(10));
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, idle).await });
        // Bytes each way, each within the timeout of the last: the copy goes on.
        let mut buf = [0u8; 5];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"hello").await.expect("client writes");
            server.read_exact(&mut buf).await.expect("server reads");
            tokio::time::sleep(Duration::from_secs(6)).await;
            server.write_all(b"again").await.expect("server writes");
            client.read_exact(&mut buf).await.expect("client reads");
        }
        assert!(!copy.is_finished(), "36 s of traffic, never 10 s idle");
        tokio::time::sleep(Duration::from_secs(11)).await;
        let (ended, read, written) = copy.await.expect("the copy task");
        assert_eq!(ended.map_err(|e| e.kind()).err(), Some(io::ErrorKind::TimedOut));
        assert_eq!((read, written), (15, 15), "the bytes each way are counted though the copy failed");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_a_copy_waits_for_its_ends() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b, None).await });
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!copy.is_finished());
        client.write_all(b"late").await.expect("client writes");
        client.shutdown().await.expect("client ends");
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server reads");
        drop(server);
        assert_eq!(got, b"late");
        let (ended, read, written) = copy.await.expect("the copy task");
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!((read, written), (4, 0));
    }
}
