//! rustls configs for the two ends of a mesh hop: TLS 1.3 only, ALPN `h2`, a client certificate
//! required, peers verified by SPIFFE id.
//!
//! Session resumption is off on both ends. A resumed TLS 1.3 session skips the certificate
//! exchange, so the peer's chain would not be checked again against the current bundle and
//! clock (an expired or no longer trusted peer could resume), and on the client the cache is
//! keyed by server name, not by expected identity. Proxies keep long-lived h2 connections to
//! each peer, so a full handshake per connection costs little.

use std::sync::{Arc, LazyLock};

use rustls::{
    ClientConfig, ServerConfig,
    client::{ResolvesClientCert, Resumption},
    crypto::CryptoProvider,
    server::{NoServerSessionStorage, ResolvesServerCert},
    version::TLS13,
};

use crate::{Error, Expected, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle};

const ALPN_H2: &[u8] = b"h2";

static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// The ring provider every config here uses. Configs are built with it explicitly rather than
/// through rustls' process-wide default, so nothing depends on which provider another crate in
/// the binary installs, and nothing panics when two are compiled in.
pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// The accepting proxy's config: presents the certificate `certs` resolves (usually a
/// [`CertSlot`](crate::CertSlot)) and requires a client certificate that verifies against
/// `bundle` and names a workload of its trust domain.
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = Arc::new(SpiffeClientVerifier::new(bundle)?);
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption, see the module docs: no stateful cache and no tickets.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The dialling proxy's config: presents the certificate `certs` resolves and accepts a server
/// whose chain verifies against `bundle` and whose SPIFFE id is `expected`. The `ServerName`
/// given to `connect` is not checked against the certificate; pass the peer's IP address (then
/// no SNI is sent either).
pub fn client_config(
    certs: Arc<dyn ResolvesClientCert>,
    bundle: &TrustBundle,
    expected: Expected,
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
