//! The accepting node: the tunnel, bare TLS forwarders, and the targets, all on one
//! current-thread runtime (xtask pins the process to one CPU).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;
use weft_identity::{Ca, SpiffeId, server_config};
use weft_proxy::tunnel::{self, Admission, Inbound, TunnelMetrics};

use crate::{READY_FILE, TRUST_DOMAIN, identities, target_id};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sink reads per syscall; large, so the sink is never what limits a stream.
const SINK_BUF: usize = 256 << 10;

pub fn serve(dir: &Path, max: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let ca = Arc::new(Ca::load_or_create(dir, TRUST_DOMAIN).with_context(|| format!("the bench CA in {}", dir.display()))?);
        let identities = identities(&ca);
        let (echo, echo_addr) = listen().await?;
        let (sink, sink_addr) = listen().await?;
        tokio::spawn(accept(echo, |s| Box::pin(echo_conn(s))));
        tokio::spawn(accept(sink, |s| Box::pin(sink_conn(s))));

        let (tunnel_listener, tunnel_addr) = listen().await?;
        let workloads = Arc::new(Workloads { at: vec![echo_addr, sink_addr], id: target_id() });
        tokio::spawn(tunnel::serve(tunnel_listener, identities.clone(), workloads, Arc::new(TunnelMetrics::default())));

        // The bare baseline presents the same workload certificate the tunnel does for this SNI.
        let slot = identities.certs.get(&target_id()).await.context("issuing the target's certificate")?;
        let acceptor = TlsAcceptor::from(server_config(slot, &identities.bundle).context("the bare TLS server config")?);
        let (tls_echo, tls_echo_addr) = listen().await?;
        let (tls_sink, tls_sink_addr) = listen().await?;
        tokio::spawn(bare_tls(tls_echo, acceptor.clone(), echo_addr));
        tokio::spawn(bare_tls(tls_sink, acceptor, sink_addr));

        let ready = json!({
            "pid": std::process::id(),
            "tunnel": tunnel_addr.to_string(),
            "echo": echo_addr.to_string(),
            "sink": sink_addr.to_string(),
            "tls_echo": tls_echo_addr.to_string(),
            "tls_sink": tls_sink_addr.to_string(),
        });
        // Written whole, then renamed: a reader never sees half a file.
        let (tmp, path) = (dir.join(format!("{READY_FILE}.tmp")), dir.join(READY_FILE));
        std::fs::write(&tmp, ready.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        tokio::time::sleep(max).await;
        eprintln!("weft-bench-mtls serve: --max-seconds reached; exiting");
        Ok(())
    })
}

async fn listen() -> anyhow::Result<(TcpListener, SocketAddrV4)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.context("binding on 127.0.0.1")?;
    match listener.local_addr()? {
        SocketAddr::V4(addr) => Ok((listener, addr)),
        SocketAddr::V6(addr) => anyhow::bail!("bound 127.0.0.1 but got {addr}"),
    }
}

type ConnFuture = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

async fn accept(listener: TcpListener, conn: fn(TcpStream) -> ConnFuture) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(conn(stream));
            }
            Err(e) => {
                eprintln!("accept on {:?} failed: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The request-response target: every byte back.
async fn echo_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let (mut r, mut w) = stream.split();
    tokio::io::copy(&mut r, &mut w).await.map(drop)
}

/// The streaming target: batches of `u64 length (big-endian) + that many bytes`, each
/// acknowledged with its length once read; a zero length is acknowledged at once (the dialler's
/// end-of-stream marker, so no half-close needs to cross the tunnel).
async fn sink_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0; SINK_BUF];
    loop {
        let mut len = [0; 8];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let total = u64::from_be_bytes(len);
        let mut left = total;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        stream.write_all(&total.to_be_bytes()).await?;
    }
}

/// The baseline: terminate TLS, connect to `target`, splice, exactly as a tunnel stream does
/// after its checks (`tunnel.rs`, `stream`).
async fn bare_tls(listener: TcpListener, acceptor: TlsAcceptor, target: SocketAddrV4) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("bare TLS accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return eprintln!("bare TLS handshake failed: {e}"),
                Err(_) => return eprintln!("bare TLS handshake timed out"),
            };
            let mut upstream = match TcpStream::connect(target).await {
                Ok(upstream) => upstream,
                Err(e) => return eprintln!("bare TLS: connect to {target} failed: {e}"),
            };
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
        });
    }
}

/// The accepting node hosts one workload, reachable at every target address; policy admits all.
struct Workloads {
    at: Vec<SocketAddrV4>,
    id: SpiffeId,
}

impl Inbound for Workloads {
    fn local_identity(&self, target: SocketAddrV4) -> Option<SpiffeId> {
        self.at.contains(&target).then(|| self.id.clone())
    }
    fn hosts(&self, id: &SpiffeId) -> bool {
        *id == self.id
    }
    fn admit(&self, _peer: &SpiffeId, _target: SocketAddrV4) -> Result<Admission, String> {
        Ok(Admission::Open)
    }
}
