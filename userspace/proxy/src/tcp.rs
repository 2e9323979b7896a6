//! Opaque TCP: bytes pass through untouched to one endpoint of the service, straight or
//! through the tunnel.

use std::net::SocketAddrV4;

use tokio::net::TcpStream;

use crate::{
    h2stream,
    upstream::{Dialer, Stream, Via},
};

pub async fn forward(mut client: TcpStream, dst: SocketAddrV4, endpoint: Option<(SocketAddrV4, Via)>, dialer: &Dialer) {
    let Some((endpoint, via)) = endpoint else {
        tracing::debug!(%dst, "opaque connection: no ready endpoint");
        return;
    };
    match dialer.connect(&via, endpoint).await {
        Ok(Stream::Tcp(mut upstream)) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Ok(Stream::Tunnel(stream)) => {
            let _ = h2stream::splice(&mut client, stream).await;
        }
        Err(e) => {
            tracing::info!(%endpoint, via = via.label(), error = %e, "opaque connection: upstream connect failed")
        }
    }
}
