//! Issuance by a remote CA (Kubernetes mode): the proxy makes its own key, sends a PKCS#10
//! request for one identity, and gets back a certificate chain. Its private key never leaves the
//! node. The wire types are JSON; the transport and how the requester proves it may have the
//! identity are the caller's (weft-kube: HTTPS with a service-account token).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData as _,
    SanType,
};
use rustls::{
    ClientConfig, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    server::ResolvesServerCert,
    version::TLS13,
};
use serde::{Deserialize, Serialize};

use crate::{
    Error, Expected, SpiffeId, SpiffeServerVerifier, TrustBundle, WorkloadCert, config, verify,
};

const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Where the issuer takes requests.
pub const ISSUE_PATH: &str = "/v1/certificates";

/// A request for one workload identity's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueRequest {
    /// The SPIFFE id asked for.
    pub identity: String,
    /// PEM PKCS#10 request over the requester's own key.
    pub csr: String,
}

/// The issued chain (leaf first, PEM) and the roots the issuer's trust domain trusts now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueResponse {
    pub cert_chain: Vec<String>,
    pub roots: Vec<String>,
}

/// A fresh key waiting for its certificate.
pub struct PendingCert {
    id: SpiffeId,
    key: KeyPair,
}

impl PendingCert {
    /// A new P-256 key for `id` and the request to send for it.
    pub fn new(id: &SpiffeId) -> Result<(PendingCert, IssueRequest), Error> {
        let generate = |source| Error::Generate {
            what: id.to_string(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = rcgen::string::Ia5String::try_from(id.to_string()).map_err(generate)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(generate)?;
        let request = IssueRequest {
            identity: id.to_string(),
            csr,
        };
        Ok((
            PendingCert {
                id: id.clone(),
                key,
            },
            request,
        ))
    }

    /// The workload certificate from the issuer's answer: the leaf must name this identity and
    /// carry this key.
    pub fn finish(self, response: &IssueResponse) -> Result<WorkloadCert, Error> {
        let bad = |detail: String| Error::BadIssued {
            id: self.id.to_string(),
            detail,
        };
        let chain = response
            .cert_chain
            .iter()
            .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad("the chain is empty".into()))?;
        let named = verify::spiffe_id_of(leaf).map_err(|e| bad(e.to_string()))?;
        if named != self.id {
            return Err(bad(format!("it names {named}")));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| bad(format!("not X.509: {e}")))?;
        if x509.public_key().subject_public_key.data.as_ref() != self.key.der_bytes() {
            return Err(bad("it certifies another key than the one requested".into()));
        }
        let time = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let (not_before, not_after) = (
            time(x509.validity().not_before),
            time(x509.validity().not_after),
        );
        let now = SystemTime::now();
        if not_after <= now {
            return Err(bad(format!("it expired at {not_after:?}")));
        }
        Ok(WorkloadCert {
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der())),
            id: self.id,
            chain,
            issued_at: now.clamp(not_before, not_after),
            not_before,
            not_after,
        })
    }
}

/// The issuer's TLS config: presents the certificate `certs` resolves (the issuer's own workload
/// identity) and asks for no client certificate: requesters prove who they are with a token, as
/// a new node has no certificate yet. TLS 1.3, HTTP/1.1.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(config::provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(Error::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

/// A requester's TLS config: no client certificate; the issuer's chain must verify against
/// `bundle` and name `expected` (the issuer's SPIFFE id).
pub fn client_config(bundle: &TrustBundle, expected: Expected) -> Result<Arc<ClientConfig>, Error> {
    let verifier = Arc::new(SpiffeServerVerifier::new(bundle, expected));
    let mut config = ClientConfig::builder_with_provider(config::provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Ca;

    fn pem_of(cert: &CertificateDer<'_>) -> String {
        ::pem::encode(&::pem::Pem::new("CERTIFICATE", cert.to_vec()))
    }

    fn answer(chain: &[CertificateDer<'_>]) -> IssueResponse {
        IssueResponse {
            cert_chain: chain.iter().map(pem_of).collect(),
            roots: Vec::new(),
        }
    }

    #[test]
    fn a_signed_request_becomes_the_requesters_certificate() {
        let ca = Ca::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let (pending, request) = PendingCert::new(&id).expect("request");
        assert_eq!(request.identity, id.to_string());
        let leaf = ca
            .sign_request(&id, &request.csr, Duration::from_secs(600))
            .expect("signed");
        let cert = pending.finish(&answer(&[leaf])).expect("usable");
        assert_eq!(cert.id, id);
        let life = cert
            .not_after
            .duration_since(cert.issued_at)
            .expect("ordered");
        assert!(
            life <= Duration::from_secs(600) && life >= Duration::from_secs(590),
            "{life:?}"
        );
        cert.to_certified_key()
            .expect("the key matches the certificate");
    }

    #[test]
    fn the_answer_must_name_the_identity_and_certify_the_key() {
        let ca = Ca::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let other = SpiffeId::new("cluster.local", "shop", "db").expect("id");

        // Signed for another identity.
        let (pending, request) = PendingCert::new(&id).expect("request");
        let leaf = ca
            .sign_request(&other, &request.csr, Duration::from_secs(600))
            .expect("signed");
        let error = pending
            .finish(&answer(&[leaf]))
            .expect_err("names db")
            .to_string();
        assert!(
            error.contains("it names spiffe://cluster.local/ns/shop/sa/db"),
            "{error}"
        );

        // Signed over another key.
        let (pending, _) = PendingCert::new(&id).expect("request");
        let (_, someone_else) = PendingCert::new(&id).expect("request");
        let leaf = ca
            .sign_request(&id, &someone_else.csr, Duration::from_secs(600))
            .expect("signed");
        let error = pending
            .finish(&answer(&[leaf]))
            .expect_err("another key")
            .to_string();
        assert!(error.contains("another key"), "{error}");

        let (pending, _) = PendingCert::new(&id).expect("request");
        let error = pending.finish(&answer(&[])).expect_err("empty").to_string();
        assert!(error.contains("the chain is empty"), "{error}");
    }

    #[test]
    fn a_request_must_be_a_signed_csr() {
        let ca = Ca::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let (_, request) = PendingCert::new(&id).expect("request");
        // Flip a byte inside the PEM body: the signature no longer verifies (or it no longer parses).
        let mut tampered = request.csr.clone().into_bytes();
        let at = tampered.len() / 2;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert!(matches!(
            ca.sign_request(&id, &tampered, Duration::from_secs(60)),
            Err(Error::BadRequest { .. })
        ));
        assert!(matches!(
            ca.sign_request(&id, "not a csr", Duration::from_secs(60)),
            Err(Error::BadRequest { .. })
        ));
        let foreign = SpiffeId::new("other.org", "shop", "web").expect("id");
        assert!(matches!(
            ca.sign_request(&foreign, &request.csr, Duration::from_secs(60)),
            Err(Error::ForeignTrustDomain { .. })
        ));
    }

    #[test]
    fn serials_are_random_even_for_a_reused_key() {
        let ca = Ca::generate("cluster.local").expect("ca");
        let id = SpiffeId::new("cluster.local", "shop", "web").expect("id");
        let (_, request) = PendingCert::new(&id).expect("request");
        let serial = |der: &CertificateDer<'_>| {
            x509_parser::parse_x509_certificate(der)
                .expect("x509")
                .1
                .raw_serial()
                .to_vec()
        };
        let a = ca
            .sign_request(&id, &request.csr, Duration::from_secs(60))
            .expect("a");
        let b = ca
            .sign_request(&id, &request.csr, Duration::from_secs(60))
            .expect("b");
        assert_ne!(serial(&a), serial(&b));
    }
}
