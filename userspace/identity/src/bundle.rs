//! The roots a proxy trusts for its trust domain.
//!
//! A bundle names its trust domain because X.509 roots do not carry one: a peer is accepted only
//! if its chain ends at one of these roots *and* its SPIFFE id is in this trust domain. Holding
//! several roots is how a root is replaced without an outage: first every proxy trusts old and
//! new, then the CA switches to the new root, then the old one is dropped.

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};

use crate::{Ca, Error, ca, id};

#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle from one or more concatenated PEM certificates.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<TrustBundle, Error> {
        id::check_trust_domain_alone(trust_domain)?;
        let mut bundle = TrustBundle {
            trust_domain: trust_domain.to_owned(),
            roots: Vec::new(),
        };
        bundle.add_pem(pem)?;
        Ok(bundle)
    }

    /// A bundle holding `ca`'s root, for its trust domain.
    pub fn from_ca(ca: &Ca) -> TrustBundle {
        TrustBundle {
            trust_domain: ca.trust_domain().to_owned(),
            roots: vec![ca.root().clone()],
        }
    }

    /// Adds every certificate in `pem` (one or more), or none if any is not a usable root.
    /// Roots already present are not added twice.
    pub fn add_pem(&mut self, pem: &str) -> Result<(), Error> {
        const ORIGIN: &str = "trust bundle PEM";
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::NotACertificate {
                origin: ORIGIN.into(),
                detail: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(Error::NotACertificate {
                origin: ORIGIN.into(),
                detail: "no CERTIFICATE block".into(),
            });
        }
        for (index, cert) in certs.iter().enumerate() {
            RootCertStore::empty()
                .add(cert.clone())
                .map_err(|source| Error::BadBundleRoot {
                    origin: ORIGIN.into(),
                    index,
                    source,
                })?;
        }
        for cert in certs {
            if !self.roots.contains(&cert) {
                self.roots.push(cert);
            }
        }
        Ok(())
    }

    /// Adds `ca`'s root (e.g. the next root, while rotating).
    pub fn add_ca(&mut self, ca: &Ca) {
        if !self.roots.contains(ca.root()) {
            self.roots.push(ca.root().clone());
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as PEM, e.g. to publish in a ConfigMap.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(ca::pem_of).collect()
    }

    /// The roots as rustls trust anchors.
    pub fn root_store(&self) -> RootCertStore {
        let mut store = RootCertStore::empty();
        // Every root was parsed as a trust anchor when it was added, so none is skipped here.
        store.add_parsable_certificates(self.roots.iter().cloned());
        store
    }
}
