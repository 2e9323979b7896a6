//! Opaque TCP: bytes pass through untouched to one endpoint of the service, straight or
//! through the tunnel, until either side closes or the connection sits idle for the service's
//! idle timeout.

use std::{net::SocketAddrV4, time::Duration};

use tokio::net::TcpStream;

use crate::{
    h2stream, idle,
    upstream::{Dialer, Stream, Via},
};

pub async fn forward(
    mut client: TcpStream,
    dst: SocketAddrV4,
    endpoint: Option<(SocketAddrV4, Via)>,
    idle: Option<Duration>,
    dialer: &Dialer,
) {
    let Some((endpoint, via)) = endpoint else {
        tracing::debug!(%dst, "opaque connection: no ready endpoint");
        return;
    };
    let ended = match dialer.connect(&via, endpoint).await {
        Ok(Stream::Tcp(mut upstream)) => idle::copy_bidirectional(&mut client, &mut upstream, idle).await.0,
        Ok(Stream::Tunnel(stream)) => h2stream::splice(&mut client, stream, idle).await.map(drop),
        Err(e) => {
            return tracing::info!(%endpoint, via = via.label(), error = %e, "opaque connection: upstream connect failed");
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%dst, %endpoint, error = %e, "opaque connection ended with an error");
    }
}
