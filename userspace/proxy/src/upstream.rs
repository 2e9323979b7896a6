//! How the proxy reaches an endpoint: straight over TCP, or, for a meshed workload on another
//! node, through the tunnel to that node's proxy with the source workload's identity. Opaque
//! TCP and the HTTP pools all connect through here.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use weft_identity::SpiffeId;

use crate::{
    route::Table,
    tunnel::{TunnelStream, Tunnels},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The way to one endpoint for one source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Direct,
    /// Through the tunnel of the endpoint's node, as `src`, expecting `dst`.
    Tunnel {
        src: SpiffeId,
        node: SocketAddr,
        dst: SpiffeId,
    },
}

impl Via {
    /// The tunnel if the endpoint is a meshed workload on another node and the source has an
    /// identity to present (the kernel attributed it to a workload of this node); else direct.
    pub fn to(table: &Table, src: Option<&SpiffeId>, endpoint: SocketAddrV4) -> Via {
        match (table.tunnel.get(endpoint.ip()), src) {
            (Some(remote), Some(src)) => Via::Tunnel { src: src.clone(), node: remote.node, dst: remote.id.clone() },
            _ => Via::Direct,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Tunnel { .. } => "tunnel",
        }
    }
}

/// A connection to an endpoint, whichever way it went.
pub enum Stream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
}

/// Opens connections; the tunnel is absent when this node runs none (no identities).
#[derive(Clone, Default)]
pub struct Dialer {
    pub tunnels: Option<Arc<Tunnels>>,
}

impl Dialer {
    pub async fn connect(&self, via: &Via, endpoint: SocketAddrV4) -> io::Result<Stream> {
        match via {
            Via::Direct => {
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await.map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, format!("connect to {endpoint} timed out"))
                    })??;
                let _ = tcp.set_nodelay(true);
                Ok(Stream::Tcp(tcp))
            }
            Via::Tunnel { src, node, dst } => {
                let Some(tunnels) = &self.tunnels else {
                    let message = format!("{endpoint} is behind the tunnel of {node}, but this node runs no tunnel");
                    return Err(io::Error::new(io::ErrorKind::Unsupported, message));
                };
                // Boxed: the tunnel's handshake state is kilobytes, and this future sits
                // inside every request's (moved with it) though it runs once per connection.
                Box::pin(tunnels.open(src, *node, dst, endpoint)).await.map(Stream::Tunnel).map_err(io::Error::other)
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tunnel(s) => s.is_write_vectored(),
        }
    }
}
