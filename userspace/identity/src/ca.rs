//! The issuing CA and the workload certificates it signs (X509-SVIDs,
//! <https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>).
//!
//! The root signs workload certificates directly (path length 0): one level keeps verification
//! cheap and there is no intermediate to rotate. Workload keys are fresh ECDSA P-256 keys for
//! every certificate and never leave the process.

use std::{
    fmt,
    fs::{DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
    string::Ia5String,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};

use crate::{Error, SpiffeId, config, id, verify};

/// How long a workload certificate lives unless the issuer is configured otherwise. It is
/// replaced at half its life, so a proxy survives 12 hours without its CA.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Certificates start this far in the past so peers whose clocks lag a little accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
const ROOT_CERT_FILE: &str = "root.pem";
const ROOT_KEY_FILE: &str = "root.key";

/// A certificate authority that signs workload certificates for one trust domain.
pub struct Ca {
    trust_domain: String,
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn created_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl Ca {
    /// A new self-signed root: ECDSA P-256, CN `weft root <trust domain> <hex nanoseconds of
    /// its creation>`, valid for 10 years. The suffix gives every root its own name, so a
    /// certificate from a root the peer does not trust fails as `UnknownIssuer` rather than
    /// as a bad signature against a same-named trusted root (as during a root rotation).
    pub fn generate(trust_domain: &str) -> Result<Ca, Error> {
        id::check_trust_domain_alone(trust_domain)?;
        let generate = |source| Error::Generate {
            what: format!("the root of {trust_domain}"),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let now = whole_seconds(SystemTime::now());
        let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
        let not_after = now + ROOT_VALIDITY;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weft root {trust_domain} {:x}", created_nanos()));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (Some(nb), Some(na)) = (offset_date_time(not_before), offset_date_time(not_after))
        else {
            return Err(Error::Clock { now });
        };
        params.not_before = nb;
        params.not_after = na;
        let cert = params.self_signed(&key).map_err(generate)?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
            not_after,
        })
    }

    /// Standalone mode: the root in `dir` (`root.pem` and `root.key`), created on first start.
    /// The key is written with mode 0600 and `dir`, if created, with 0700.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, Error> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let exists = |path: &Path| {
            path.try_exists().map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })
        };
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let read = |path: &Path| {
                    std::fs::read_to_string(path).map_err(|source| Error::Read {
                        path: path.to_owned(),
                        source,
                    })
                };
                let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
                Ca::load(
                    trust_domain,
                    &cert_pem,
                    &cert_path.display().to_string(),
                    &key_pem,
                    &key_path.display().to_string(),
                )
            }
            (true, false) => Err(Error::HalfPair {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(Error::HalfPair {
                present: key_path,
                missing: cert_path,
            }),
            (false, false) => {
                let ca = Ca::generate(trust_domain)?;
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| Error::Write {
                        path: dir.to_owned(),
                        source,
                    })?;
                // Key first: a crash in between leaves a key without a certificate, which the
                // next start reports instead of silently making a second root.
                write_new(&key_path, &ca.issuer.key().serialize_pem(), 0o600)?;
                write_new(&cert_path, &ca.cert_pem, 0o644)?;
                tracing::info!(trust_domain, cert = %cert_path.display(), "created a new root CA");
                Ok(ca)
            }
        }
    }

    /// A CA from a PEM certificate and its PKCS#8 PEM key, e.g. from a Kubernetes Secret.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        Ca::load(
            trust_domain,
            cert_pem,
            "root certificate PEM",
            key_pem,
            "root key PEM",
        )
    }

    /// Parses and checks a root, naming `cert_origin` / `key_origin` in errors. Checks what
    /// would otherwise only show up as failed handshakes: a key that does not belong to the
    /// certificate, a non-CA certificate, an expired root; then signs a probe certificate and
    /// verifies it, as a peer would.
    fn load(
        trust_domain: &str,
        cert_pem: &str,
        cert_origin: &str,
        key_pem: &str,
        key_origin: &str,
    ) -> Result<Ca, Error> {
        id::check_trust_domain_alone(trust_domain)?;
        let cert = single_certificate(cert_pem, cert_origin)?;
        let key = key_pair(key_pem, key_origin, cert_origin)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert).map_err(|e| Error::NotACertificate {
                origin: cert_origin.to_owned(),
                detail: format!("not X.509 DER: {e}"),
            })?;
        if x509.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(Error::KeyMismatch {
                key: key_origin.to_owned(),
                cert: cert_origin.to_owned(),
            });
        }
        if !matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
            return Err(Error::NotACa {
                origin: cert_origin.to_owned(),
            });
        }
        let not_after = UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0),
            );
        if not_after <= SystemTime::now() {
            return Err(Error::RootExpired {
                origin: cert_origin.to_owned(),
                not_after,
            });
        }
        // rcgen re-encodes the issuer name from the parsed subject; it cannot represent (and
        // would panic on) relative names with other than one attribute.
        if x509.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            return Err(Error::BadRoot {
                origin: cert_origin.to_owned(),
                detail: "its subject has a multi-valued or empty RDN; use a subject like CN=<name>"
                    .into(),
            });
        }
        let issuer = rcgen::Issuer::from_ca_cert_der(&cert, key).map_err(|e| Error::BadRoot {
            origin: cert_origin.to_owned(),
            detail: e.to_string(),
        })?;
        let ca = Ca {
            trust_domain: trust_domain.to_owned(),
            cert_pem: pem_of(&cert),
            cert,
            issuer,
            not_after,
        };
        ca.probe().map_err(|detail| Error::BadRoot {
            origin: cert_origin.to_owned(),
            detail,
        })?;
        Ok(ca)
    }

    /// Signs a throwaway certificate and verifies it against this root alone.
    fn probe(&self) -> Result<(), String> {
        let id = SpiffeId::new(&self.trust_domain, "weft-probe", "weft-probe")
            .map_err(|e| e.to_string())?;
        let probe = self
            .issue(&id, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert.clone())
            .map_err(|e| format!("not usable as a trust anchor: {e}"))?;
        verify::chain(&probe.chain, &roots, &config::provider())
            .map_err(|e| format!("a certificate it signs does not verify against it: {e}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root's private key, PKCS#8 PEM: for storing the CA (a Kubernetes Secret).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The root certificate, to hand out as (part of) the trust bundle.
    pub fn root_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A certificate for `id` valid from a minute ago (clock skew) until `ttl` from now.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<WorkloadCert, Error> {
        let now = SystemTime::now();
        let (not_before, not_after) = validity(id, now, ttl)?;
        self.sign(id, not_before, not_after, now)
    }

    /// A certificate for `id` with the given validity; for tests that need expired or not yet
    /// valid certificates. Times are truncated to whole seconds, as X.509 stores them.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        self.sign(id, not_before, not_after, SystemTime::now())
    }

    /// Signs a certificate for `id` over the public key of a PKCS#10 request (PEM), valid from
    /// a minute ago until `ttl` from now: issuance for a proxy that keeps its private key to
    /// itself. The request's signature must verify; what it asks for besides the key (subject,
    /// names, usages) is ignored: the certificate names `id` and nothing else.
    pub fn sign_request(
        &self,
        id: &SpiffeId,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, Error> {
        let request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            Error::BadRequest {
                id: id.to_string(),
                detail: e.to_string(),
            }
        })?;
        let (not_before, not_after) = validity(id, SystemTime::now(), ttl)?;
        self.sign_key(id, &request.public_key, not_before, not_after)
    }

    fn sign(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<WorkloadCert, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| {
            Error::Generate {
                what: id.to_string(),
                source,
            }
        })?;
        let cert = self.sign_key(id, &key, not_before, not_after)?;
        let (not_before, not_after) = (whole_seconds(not_before), whole_seconds(not_after));
        Ok(WorkloadCert {
            id: id.clone(),
            chain: vec![cert],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            issued_at: now.clamp(not_before, not_after),
            not_before,
            not_after,
        })
    }

    /// A workload certificate naming `id` over `public_key`.
    fn sign_key(
        &self,
        id: &SpiffeId,
        public_key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateDer<'static>, Error> {
        if id.trust_domain() != self.trust_domain {
            return Err(Error::ForeignTrustDomain {
                id: id.to_string(),
                ca: self.trust_domain.clone(),
            });
        }
        let (not_before, not_after) = (whole_seconds(not_before), whole_seconds(not_after));
        let validity = Error::Validity {
            id: id.to_string(),
            not_before,
            not_after,
        };
        let (Some(nb), Some(na)) = (offset_date_time(not_before), offset_date_time(not_after))
        else {
            return Err(validity);
        };
        if not_before >= not_after {
            return Err(validity);
        }
        let generate = |source| Error::Generate {
            what: id.to_string(),
            source,
        };
        let uri = Ia5String::try_from(id.to_string()).map_err(generate)?;
        let mut params = CertificateParams::default();
        // Empty subject, as in Istio: the identity is the URI SAN (which rcgen then marks
        // critical, RFC 5280 4.2.1.6); a CN would cap ids at 64 characters.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = nb;
        params.not_after = na;
        // A random serial: rcgen's default hashes the public key, which would repeat for a
        // requester that reuses its key.
        let mut serial = [0u8; 16];
        config::provider()
            .secure_random
            .fill(&mut serial)
            .map_err(|_| generate(rcgen::Error::RingUnspecified))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(public_key, &self.issuer).map_err(generate)?;
        Ok(cert.der().clone())
    }
}

/// A workload's certificate chain (leaf first; the root is not included, peers have it) and
/// private key.
pub struct WorkloadCert {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// When it was issued; rotation is timed from here, not from `not_before`, which lies a
    /// minute earlier for clock skew (that minute would make short-lived certificates due for
    /// renewal as soon as they are issued).
    pub issued_at: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// When to replace it: half way through its remaining life at issue, so a failing CA leaves
    /// the other half for retries.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }

    /// The chain and key as rustls serves them, with the key loaded by the ring provider.
    pub fn to_certified_key(&self) -> Result<Arc<CertifiedKey>, Error> {
        CertifiedKey::from_der(
            self.chain.clone(),
            self.key.clone_key(),
            &config::provider(),
        )
        .map(Arc::new)
        .map_err(|source| Error::CertifiedKey {
            id: self.id.to_string(),
            source,
        })
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> WorkloadCert {
        WorkloadCert {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            issued_at: self.issued_at,
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn single_certificate(pem: &str, origin: &str) -> Result<CertificateDer<'static>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::NotACertificate {
            origin: origin.to_owned(),
            detail: e.to_string(),
        })?;
    let count = certs.len();
    let mut certs = certs.into_iter();
    match (certs.next(), count) {
        (Some(cert), 1) => Ok(cert),
        (None, _) => Err(Error::NotACertificate {
            origin: origin.to_owned(),
            detail: "no CERTIFICATE block".into(),
        }),
        (Some(_), count) => Err(Error::TooManyCertificates {
            origin: origin.to_owned(),
            count,
        }),
    }
}

fn key_pair(pem: &str, origin: &str, cert_origin: &str) -> Result<KeyPair, Error> {
    let not_a_key = |detail: String| Error::NotAKey {
        origin: origin.to_owned(),
        cert: cert_origin.to_owned(),
        detail,
    };
    let key =
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| not_a_key(e.to_string()))?;
    let format = match &key {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            return KeyPair::try_from(pkcs8)
                .map_err(|e| not_a_key(format!("unsupported or malformed PKCS#8 key: {e}")));
        }
        PrivateKeyDer::Sec1(_) => "SEC1 (\"EC PRIVATE KEY\")",
        PrivateKeyDer::Pkcs1(_) => "PKCS#1 (\"RSA PRIVATE KEY\")",
        _ => "this kind of",
    };
    Err(Error::KeyFormat {
        origin: origin.to_owned(),
        format,
    })
}

/// PEM with LF line endings, as rcgen writes it (the `pem` crate defaults to CRLF).
pub(crate) fn pem_of(cert: &CertificateDer<'_>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", cert.as_ref()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let write = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    // create_new: never overwrite a root someone else just made.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write)?;
    file.write_all(contents.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)
}

/// From a minute before `now` (clock skew) until `ttl` after it.
fn validity(id: &SpiffeId, now: SystemTime, ttl: Duration) -> Result<(SystemTime, SystemTime), Error> {
    let not_before = now.checked_sub(CLOCK_SKEW).unwrap_or(now);
    let not_after = now.checked_add(ttl).ok_or_else(|| Error::Validity {
        id: id.to_string(),
        not_before,
        not_after: now,
    })?;
    Ok((not_before, not_after))
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        // Before 1970; rejected by offset_date_time.
        Err(_) => t,
    }
}

/// `None` before 1970 or after 9999 (what X.509 validity can hold without surprises).
fn offset_date_time(t: SystemTime) -> Option<time::OffsetDateTime> {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    time::OffsetDateTime::from_unix_timestamp(secs).ok()
}

#[cfg(test)]
mod tests {
    use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

    use super::*;

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        x509_parser::parse_x509_certificate(der)
            .expect("rcgen output parses")
            .1
    }

    fn secs(t: SystemTime) -> i64 {
        i64::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs()).expect("fits")
    }

    #[test]
    fn root_is_a_p256_ca_for_leaves_only() {
        let ca = Ca::generate("cluster.local").expect("generate");
        let der = ca.root().clone();
        let root = parse(&der);
        assert!(root.subject().to_string().starts_with("CN=weft root cluster.local "), "{}", root.subject());
        assert_eq!(root.subject(), root.issuer(), "self-signed");
        let bc = root
            .basic_constraints()
            .expect("one basicConstraints")
            .expect("present")
            .value;
        assert!(bc.ca);
        assert_eq!(
            bc.path_len_constraint,
            Some(0),
            "the root signs leaves directly"
        );
        let ku = root
            .key_usage()
            .expect("one keyUsage")
            .expect("present")
            .value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        assert!(root.name_constraints().expect("at most one").is_none());
        let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert_eq!(
            life,
            i64::try_from((ROOT_VALIDITY + CLOCK_SKEW).as_secs()).expect("fits")
        );
        assert_eq!(
            root.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        assert!(ca.root_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca.trust_domain(), "cluster.local");
        assert!(format!("{ca:?}").contains("cluster.local"));
    }

    #[test]
    fn issued_cert_is_an_x509_svid() {
        let ca = Ca::generate("cluster.local").expect("generate");
        let id = SpiffeId::new("cluster.local", "shop", "checkout").expect("valid id");
        let ttl = Duration::from_secs(3600);
        let before = SystemTime::now();
        let cert = ca.issue(&id, ttl).expect("issue");
        let after = SystemTime::now();
        assert_eq!(cert.id, id);
        assert_eq!(cert.chain.len(), 1, "leaf only; peers hold the root");
        let leaf = parse(&cert.chain[0]);

        let san = leaf
            .subject_alternative_name()
            .expect("one SAN extension")
            .expect("present");
        assert!(san.critical, "SAN must be critical with an empty subject");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/shop/sa/checkout"
            )]
        );
        assert_eq!(leaf.subject().iter().count(), 0, "empty subject");
        assert_eq!(leaf.issuer(), parse(ca.root()).subject());

        let eku = leaf
            .extended_key_usage()
            .expect("one EKU")
            .expect("present")
            .value;
        assert!(eku.server_auth && eku.client_auth && !eku.any && eku.other.is_empty());
        let ku = leaf
            .key_usage()
            .expect("one keyUsage")
            .expect("present")
            .value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let bc = leaf
            .basic_constraints()
            .expect("one basicConstraints")
            .expect("present")
            .value;
        assert!(!bc.ca, "X509-SVID leaves say CA:FALSE");
        assert!(
            leaf.extensions()
                .iter()
                .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER),
            "AKI helps path building across rotated roots"
        );

        // Validity: from a minute ago (skew) to ttl from now, as recorded in the struct.
        let (nb, na) = (
            leaf.validity().not_before.timestamp(),
            leaf.validity().not_after.timestamp(),
        );
        assert_eq!((nb, na), (secs(cert.not_before), secs(cert.not_after)));
        assert!(
            secs(before) - 61 <= nb && nb <= secs(after) - 59,
            "not_before {nb} is not about a minute before issue"
        );
        assert!(
            secs(before) + 3599 <= na && na <= secs(after) + 3600,
            "not_after {na} is not about ttl after issue"
        );
        assert!(before <= cert.issued_at && cert.issued_at <= after);

        // Renewal at half the ttl after issue, not half of the skew-extended validity.
        assert_eq!(
            cert.refresh_at(),
            cert.issued_at
                + cert
                    .not_after
                    .duration_since(cert.issued_at)
                    .expect("after issue")
                    / 2
        );
        let half = cert
            .refresh_at()
            .duration_since(cert.issued_at)
            .expect("later");
        assert!(
            half.abs_diff(ttl / 2) <= Duration::from_secs(1),
            "refresh {half:?} after issue, want about {:?}",
            ttl / 2
        );

        // Serials differ per certificate.
        let other = ca.issue(&id, ttl).expect("issue again");
        assert_ne!(leaf.raw_serial(), parse(&other.chain[0]).raw_serial());
        assert!(cert.to_certified_key().is_ok());
        assert!(
            !format!("{cert:?}").contains("key"),
            "Debug must not print the key: {cert:?}"
        );
    }

    #[test]
    fn refuses_foreign_trust_domain_and_bad_validity() {
        let ca = Ca::generate("cluster.local").expect("generate");
        let foreign = SpiffeId::new("other.local", "a", "b").expect("valid id");
        let err = ca
            .issue(&foreign, DEFAULT_CERT_TTL)
            .expect_err("foreign trust domain");
        assert!(matches!(err, Error::ForeignTrustDomain { .. }), "{err}");
        assert!(
            err.to_string().contains("trust domain \"cluster.local\""),
            "{err}"
        );

        let id = SpiffeId::new("cluster.local", "a", "b").expect("valid id");
        let now = SystemTime::now();
        let err = ca
            .issue_with_validity(&id, now, now - Duration::from_secs(1))
            .expect_err("ends before it starts");
        assert!(matches!(err, Error::Validity { .. }), "{err}");
        let err = ca
            .issue_with_validity(&id, UNIX_EPOCH - Duration::from_secs(1), now)
            .expect_err("before 1970");
        assert!(matches!(err, Error::Validity { .. }), "{err}");
        assert!(matches!(
            Ca::generate("Cluster"),
            Err(Error::Id(crate::IdError::TrustDomainChar { .. }))
        ));
    }

    #[test]
    fn from_pem_round_trip() {
        let ca = Ca::generate("cluster.local").expect("generate");
        let again = Ca::from_pem(
            "cluster.local",
            &ca.root_pem(),
            &ca.issuer.key().serialize_pem(),
        )
        .expect("load");
        assert_eq!(again.root_pem(), ca.root_pem());
        assert_eq!(again.not_after(), ca.not_after());
        // The loaded CA signs certificates that chain to the original root.
        let id = SpiffeId::new("cluster.local", "a", "b").expect("valid id");
        let cert = again.issue(&id, DEFAULT_CERT_TTL).expect("issue");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.root().clone()).expect("root");
        verify::chain(&cert.chain, &roots, &config::provider())
            .expect("chains to the original root");
    }

    #[test]
    fn from_pem_rejections() {
        let ca = Ca::generate("cluster.local").expect("generate");
        let key = ca.issuer.key().serialize_pem();
        let other_key = Ca::generate("cluster.local")
            .expect("generate")
            .issuer
            .key()
            .serialize_pem();
        let two = format!("{}{}", ca.root_pem(), ca.root_pem());
        let sec1 = key.replace("PRIVATE KEY", "EC PRIVATE KEY");
        let leaf = ca
            .issue(
                &SpiffeId::new("cluster.local", "a", "b").expect("valid id"),
                DEFAULT_CERT_TTL,
            )
            .expect("issue");
        let leaf_pem = pem::encode(&pem::Pem::new("CERTIFICATE", leaf.chain[0].as_ref()));
        let leaf_key = pem::encode(&pem::Pem::new("PRIVATE KEY", leaf.key.secret_der()));
        type Expect = fn(&Error) -> bool;
        let cases: Vec<(&str, &str, Expect)> = vec![
            ("", &key, |e| matches!(e, Error::NotACertificate { .. })),
            ("garbage", &key, |e| {
                matches!(e, Error::NotACertificate { .. })
            }),
            (&two, &key, |e| {
                matches!(e, Error::TooManyCertificates { count: 2, .. })
            }),
            (&leaf_pem, &leaf_key, |e| matches!(e, Error::NotACa { .. })),
        ];
        for (cert, key, expected) in cases {
            let err = Ca::from_pem("cluster.local", cert, key).expect_err("must be refused");
            assert!(expected(&err), "unexpected error: {err}");
        }
        let root = ca.root_pem();
        let err = Ca::from_pem("cluster.local", &root, "").expect_err("no key");
        assert!(matches!(err, Error::NotAKey { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("expected the key that signed root certificate PEM"),
            "{err}"
        );
        let err = Ca::from_pem("cluster.local", &root, &sec1).expect_err("SEC1 key");
        assert!(
            matches!(err, Error::KeyFormat { .. })
                && err.to_string().contains("openssl pkcs8 -topk8"),
            "{err}"
        );
        let err = Ca::from_pem("cluster.local", &root, &other_key).expect_err("wrong key");
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    }
}
