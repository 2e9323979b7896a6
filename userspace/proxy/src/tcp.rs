//! Opaque TCP: bytes pass through untouched to one endpoint of the service.

use std::net::SocketAddrV4;

use tokio::net::TcpStream;

pub async fn forward(mut client: TcpStream, dst: SocketAddrV4, endpoint: Option<SocketAddrV4>) {
    let Some(endpoint) = endpoint else {
        tracing::debug!(%dst, "opaque connection: no ready endpoint");
        return;
    };
    match TcpStream::connect(endpoint).await {
        Ok(mut upstream) => {
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Err(e) => tracing::debug!(%endpoint, error = %e, "opaque connection: upstream connect failed"),
    }
}
