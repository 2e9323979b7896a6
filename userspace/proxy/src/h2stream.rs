//! One HTTP/2 stream carrying a byte stream (a tunnel's `CONNECT` stream), straight on the h2
//! crate: [`H2Stream`] reads and writes as a socket does, for HTTP clients; [`splice`] joins a
//! stream to a TCP socket without the copies a generic reader/writer pair makes (received DATA
//! frames go to the socket as they are, several per write; socket reads become DATA frames).

use std::{
    collections::VecDeque,
    future::poll_fn,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};

use crate::idle::Activity;

/// Socket reads towards the stream: up to this much becomes one send (h2 cuts it into frames).
const READ_CHUNK: usize = 64 << 10;
/// Frames towards the socket: up to this many bytes already received go out in one write.
const GATHER_BYTES: usize = 256 << 10;
const GATHER_SLICES: usize = 64;

/// Both halves of one HTTP/2 stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    ended: bool,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").field("stream_id", &self.send.stream_id()).finish_non_exhaustive()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream { send, recv, pending: Bytes::new(), ended: false }
    }

    /// Whether the peer's bytes begin with `prefix`, waiting for as many as that takes (or the
    /// end); nothing is consumed.
    pub async fn starts_with(&mut self, prefix: &[u8]) -> io::Result<bool> {
        while self.pending.len() < prefix.len() && prefix.starts_with(&self.pending) {
            let Some(chunk) = poll_fn(|cx| poll_chunk(&mut self.recv, cx)).await? else { break };
            self.pending = if self.pending.is_empty() {
                chunk
            } else {
                let mut joined = BytesMut::from(&self.pending[..]);
                joined.extend_from_slice(&chunk);
                joined.freeze()
            };
        }
        Ok(self.pending.starts_with(prefix))
    }
}

/// A reset or error of the peer's half, as a reader sees it: the peer finishing (`NO_ERROR`)
/// or giving up (`CANCEL`) ends the bytes, anything else is an error.
fn read_end(e: h2::Error) -> io::Result<()> {
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
        _ => Err(h2_io_error(e)),
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() { e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error")) } else { io::Error::other(e) }
}

/// The next received chunk, releasing nothing yet; `None` at the end of the peer's half.
fn poll_chunk(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        return match ready!(recv.poll_data(cx)) {
            None => Poll::Ready(Ok(None)),
            Some(Ok(chunk)) if chunk.is_empty() => continue,
            Some(Ok(chunk)) => Poll::Ready(Ok(Some(chunk))),
            Some(Err(e)) => Poll::Ready(read_end(e).map(|()| None)),
        };
    }
}

/// Waits until the stream may send at least one byte of the `want` reserved; fails when the
/// peer reset it.
fn poll_send_capacity(send: &mut SendStream<Bytes>, want: usize, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if let Poll::Ready(reset) = send.poll_reset(cx) {
        let e = match reset {
            Ok(reason) => io::Error::new(io::ErrorKind::BrokenPipe, format!("stream reset by the peer: {reason}")),
            Err(e) => h2_io_error(e),
        };
        return Poll::Ready(Err(e));
    }
    send.reserve_capacity(want);
    loop {
        if send.capacity() > 0 {
            return Poll::Ready(Ok(send.capacity()));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))),
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match ready!(poll_chunk(&mut this.recv, cx))? {
                Some(chunk) => this.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.ended {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        let n = ready!(poll_send_capacity(&mut this.send, buf.len(), cx))?.min(buf.len());
        this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    /// The connection's task writes frames out as they are queued.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ended {
            this.ended = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Carries bytes both ways between `tcp` and `stream` until both directions have ended (each
/// end's close is passed on as the other's half-close), one fails, or `idle` passes without a
/// byte either way (`TimedOut`). Returns the bytes sent into the stream and out of it.
pub async fn splice(tcp: &mut TcpStream, stream: H2Stream, idle: Option<Duration>) -> io::Result<(u64, u64)> {
    let H2Stream { mut send, mut recv, pending, ended } = stream;
    let activity = Activity::new();
    let (rd, wr) = tcp.split();
    let (mut rd, mut wr) = (activity.watch(rd), activity.watch(wr));
    let inbound = async {
        if ended {
            return Ok(0);
        }
        let mut total = 0u64;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            if rd.read_buf(&mut buf).await? == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_io_error)?;
                return Ok(total);
            }
            let mut chunk = buf.split().freeze();
            total += chunk.len() as u64;
            while !chunk.is_empty() {
                let n = poll_fn(|cx| poll_send_capacity(&mut send, chunk.len(), cx)).await?.min(chunk.len());
                send.send_data(chunk.split_to(n), false).map_err(h2_io_error)?;
            }
        }
    };
    let outbound = async {
        let mut total = 0u64;
        let mut queue = VecDeque::new();
        if !pending.is_empty() {
            queue.push_back(pending);
        }
        let mut open = true;
        while open || !queue.is_empty() {
            if queue.is_empty() {
                match poll_fn(|cx| poll_chunk(&mut recv, cx)).await? {
                    Some(chunk) => queue.push_back(chunk),
                    None => open = false,
                }
            }
            // Whatever else has arrived goes out in the same write.
            let mut queued: usize = queue.iter().map(Bytes::len).sum();
            while open && queued < GATHER_BYTES && queue.len() < GATHER_SLICES {
                match poll_fn(|cx| Poll::Ready(poll_chunk(&mut recv, cx))).await {
                    Poll::Ready(Ok(Some(chunk))) => {
                        queued += chunk.len();
                        queue.push_back(chunk);
                    }
                    Poll::Ready(Ok(None)) => open = false,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
            if queue.is_empty() {
                continue;
            }
            let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
            let mut written = wr.write_vectored(&slices).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let _ = recv.flow_control().release_capacity(written);
            total += written as u64;
            while written > 0 {
                let Some(front) = queue.front_mut() else { break };
                if front.len() <= written {
                    written -= front.len();
                    queue.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        wr.shutdown().await?;
        Ok::<_, io::Error>(total)
    };
    tokio::select! {
        done = async { tokio::try_join!(inbound, outbound) } => done,
        () = activity.expired(idle) => Err(crate::idle::timed_out(idle)),
    }
}
