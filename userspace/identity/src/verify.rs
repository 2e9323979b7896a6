//! Peer verification for both ends of a mesh hop: the chain must end at a root of the trust
//! bundle (webpki: signatures, validity, key usage), and the leaf must carry exactly one URI SAN,
//! a workload SPIFFE id in the bundle's trust domain. The client end also checks that id against
//! what it dialled, in place of the DNS name check: mesh peers are named by identity, and a node
//! proxy serves many workloads under one address.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use x509_parser::extensions::GeneralName;

use crate::{Error, IdError, SpiffeId, TrustBundle, config};

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Any workload in the bundle's trust domain.
    Any,
    /// Only these (an empty list accepts nobody).
    Ids(Vec<SpiffeId>),
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Any => f.write_str("any workload of the trust domain"),
            Expected::Ids(ids) if ids.is_empty() => {
                f.write_str("no identity (empty expected list)")
            }
            Expected::Ids(ids) => {
                f.write_str("one of ")?;
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{id}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a peer certificate names no acceptable workload.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdError {
    #[error("peer certificate cannot be parsed: {0}")]
    Parse(String),
    #[error(
        "peer certificate has no URI SAN; a mesh certificate carries its SPIFFE id as one (is the peer a weft proxy?)"
    )]
    NoUri,
    #[error("peer certificate has {0} URI SANs; an X509-SVID has exactly one, its SPIFFE id")]
    ManyUris(usize),
    #[error("peer certificate's URI SAN is not a workload SPIFFE id: {0}")]
    NotSpiffe(#[source] IdError),
    #[error("peer {id} is in trust domain {:?}; this proxy trusts only {trust_domain:?}", id.trust_domain())]
    TrustDomain { id: SpiffeId, trust_domain: String },
    #[error("server presented {id}; this connection expects {expected}")]
    Unexpected { id: SpiffeId, expected: Expected },
}

/// The SPIFFE id in the one URI SAN of `cert`.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| PeerIdError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| PeerIdError::Parse(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(PeerIdError::NoUri),
        [uri] => uri.parse().map_err(PeerIdError::NotSpiffe),
        many => Err(PeerIdError::ManyUris(many.len())),
    }
}

/// The verified identity of the peer of an established connection (server or client side;
/// both deref to `CommonState`). `None` before the handshake completes or without a peer
/// certificate, which the configs of this crate never accept.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()?
        .first()
        .and_then(|leaf| spiffe_id_of(leaf).ok())
}

// === impl SpiffeClientVerifier ===

/// Verifies client certificates on the accepting proxy. Chain, validity and signatures are
/// checked by rustls' `WebPkiClientVerifier`; this adds the SPIFFE id check.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: &TrustBundle) -> Result<SpiffeClientVerifier, Error> {
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(bundle.root_store()),
            config::provider(),
        )
        .build()
        .map_err(|e| Error::Verifier {
            trust_domain: bundle.trust_domain().to_owned(),
            detail: e.to_string(),
        })?;
        Ok(SpiffeClientVerifier {
            inner,
            trust_domain: bundle.trust_domain().to_owned(),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(reject)?;
        if id.trust_domain() != self.trust_domain {
            return Err(reject(PeerIdError::TrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === impl SpiffeServerVerifier ===

/// Verifies the server certificate on the dialling proxy: chain, validity and signatures as
/// rustls' `WebPkiServerVerifier` does, but the SPIFFE id against [`Expected`] instead of the
/// server name against DNS SANs (there are none).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    expected: Expected,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: &TrustBundle, expected: Expected) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            roots: Arc::new(bundle.root_store()),
            algorithms: config::provider().signature_verification_algorithms,
            trust_domain: bundle.trust_domain().to_owned(),
            expected,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Whatever the dialler passed (usually the peer's IP); not checked, see above.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = spiffe_id_of(end_entity).map_err(reject)?;
        if id.trust_domain() != self.trust_domain {
            return Err(reject(PeerIdError::TrustDomain {
                id,
                trust_domain: self.trust_domain.clone(),
            }));
        }
        match &self.expected {
            Expected::Ids(ids) if !ids.contains(&id) => Err(reject(PeerIdError::Unexpected {
                id,
                expected: self.expected.clone(),
            })),
            Expected::Any | Expected::Ids(_) => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks that `chain` (leaf first) ends at one of `roots`, as a server certificate, now.
pub(crate) fn chain(
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    provider: &CryptoProvider,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let cert = ParsedCertificate::try_from(leaf)?;
    verify_server_cert_signed_by_trust_anchor(
        &cert,
        roots,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
}

/// A rejection rustls reports as a bad certificate (alert `bad_certificate`), keeping our reason
/// in the error text.
fn reject(reason: PeerIdError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Reason(
        reason.to_string(),
    )))))
}

/// rustls prints `CertificateError::Other` with `{:?}`; this makes that print the message.
struct Reason(String);

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reason {}
