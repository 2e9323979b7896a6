//! Workload identity for weft's mesh: who a connection's peer is, proven with mutual TLS.
//!
//! The parts, in the order a node proxy uses them:
//! - [`SpiffeId`]: a workload's name, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! - [`Ca`]: the issuing authority. In standalone mode the agent keeps one self-signed root on
//!   disk ([`Ca::load_or_create`]) and signs short-lived [`WorkloadCert`]s with it.
//! - [`TrustBundle`]: the roots a proxy accepts for its trust domain; more than one while a root
//!   is being replaced, so certificates from the old and the new root both verify.
//! - [`server_config`] / [`client_config`]: rustls configs for the two ends of a mesh hop. Both
//!   verify the chain against the bundle *and* take the peer's identity from the one SPIFFE URI
//!   SAN of its leaf; the client side checks that identity against what it dialled
//!   ([`Expected`]) instead of a DNS name. [`peer_identity`] reads it back after the handshake.
//! - [`CertSlot`], [`Issuer`], [`spawn_rotation`], [`CertStore`]: a config is built once around a
//!   slot; a task replaces the slot's certificate at half its life, so new handshakes get the new
//!   certificate while established connections carry on.
//! - [`issuance`]: the request and answer of a remote CA (Kubernetes mode), where the proxy keeps
//!   its key and sends a signing request.
//!
//! Crypto is rustls with the ring provider, TLS 1.3 only. ring keeps the build lean (it needs
//! only the system C compiler: no cmake, no nasm, no aws-lc), and it is the same provider the
//! JWT code uses, so the agent links one crypto library. TLS 1.2 is not compiled in: every mesh peer is a weft
//! proxy, so there is no old client to serve.
#![forbid(unsafe_code)]

mod bundle;
mod ca;
mod config;
mod id;
pub mod issuance;
mod rotate;
mod verify;

use std::{path::PathBuf, time::SystemTime};

pub use crate::{
    bundle::TrustBundle,
    ca::{Ca, DEFAULT_CERT_TTL, WorkloadCert},
    config::{client_config, provider, server_config},
    id::{IdError, SpiffeId},
    rotate::{CertSlot, CertStore, IssueFuture, Issuer, LocalIssuer, Rotation, spawn_rotation},
    verify::{
        Expected, PeerIdError, SpiffeClientVerifier, SpiffeServerVerifier, peer_identity,
        spiffe_id_of,
    },
};

/// Everything that can go wrong building identities and TLS configs. Handshake failures are not
/// here: they are `rustls::Error`s on the connection, with the reason in their message. Ids are
/// kept as strings here, which keeps the error small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Id(#[from] IdError),

    #[error(
        "{path}: cannot read it ({source}); check that the file exists and the agent may read it"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: cannot write it ({source}); the CA directory must be writable by the agent when it creates the root"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{present} exists but {missing} does not; restore {missing}, or delete {present} to create a new root (every proxy must then trust the new root)"
    )]
    HalfPair { present: PathBuf, missing: PathBuf },

    #[error(
        "{origin}: no PEM certificate in it ({detail}); expected a \"-----BEGIN CERTIFICATE-----\" block"
    )]
    NotACertificate { origin: String, detail: String },
    #[error(
        "{origin}: holds {count} certificates; a CA file holds exactly its own certificate (put other trusted roots in the trust bundle)"
    )]
    TooManyCertificates { origin: String, count: usize },
    #[error("{origin}: not a PEM private key ({detail}); expected the key that signed {cert}")]
    NotAKey {
        origin: String,
        cert: String,
        detail: String,
    },
    #[error(
        "{origin}: {format} keys are not supported; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in {origin}`"
    )]
    KeyFormat {
        origin: String,
        format: &'static str,
    },
    #[error(
        "{key} does not match {cert}: the key's public half differs from the certificate's; put the root's own key next to it"
    )]
    KeyMismatch { key: String, cert: String },
    #[error(
        "{origin}: not a CA certificate (basicConstraints CA is not set); give the root certificate, not a workload certificate"
    )]
    NotACa { origin: String },
    #[error(
        "{origin}: the root certificate expired at {not_after:?}; create a new root (delete root.pem and root.key in standalone mode) and roll it out to every proxy's trust bundle"
    )]
    RootExpired {
        origin: String,
        not_after: SystemTime,
    },
    #[error("{origin}: cannot sign workload certificates with this root ({detail})")]
    BadRoot { origin: String, detail: String },

    #[error(
        "cannot issue {id}: this CA serves trust domain {ca:?}; the workload's id must use the same trust domain"
    )]
    ForeignTrustDomain { id: String, ca: String },
    #[error(
        "invalid validity for {id}: not_before {not_before:?} must be earlier than not_after {not_after:?}, both between 1970 and 9999"
    )]
    Validity {
        id: String,
        not_before: SystemTime,
        not_after: SystemTime,
    },
    #[error(
        "the system clock reads {now:?}, which a certificate cannot start from; fix the node's clock"
    )]
    Clock { now: SystemTime },
    #[error("generating a key or certificate for {what} failed: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot sign a certificate for {id}: the signing request is not usable ({detail}); send a PEM PKCS#10 request signed by its own key")]
    BadRequest { id: String, detail: String },
    #[error("obtaining a certificate for {id} from the issuer at {addr} failed: {detail}")]
    Remote {
        id: String,
        addr: String,
        detail: String,
    },
    #[error("the certificate issued for {id} is not usable: {detail}")]
    BadIssued { id: String, detail: String },
    #[error("the certificate and key of {id} cannot be used for TLS: {source}")]
    CertifiedKey {
        id: String,
        #[source]
        source: rustls::Error,
    },

    #[error("{origin}: trust bundle certificate #{index} is not a usable root ({source})")]
    BadBundleRoot {
        origin: String,
        index: usize,
        #[source]
        source: rustls::Error,
    },
    #[error("trust bundle for {trust_domain:?} cannot verify client certificates: {detail}")]
    Verifier {
        trust_domain: String,
        detail: String,
    },
    #[error("building the TLS config failed: {0}")]
    Tls(#[source] rustls::Error),

    #[error(
        "a certificate for {cert} cannot go into the slot of {slot}; each slot holds one identity"
    )]
    SlotMismatch { slot: String, cert: String },
    #[error(
        "certificate rotation needs a tokio runtime; create the cert store or call spawn_rotation from within one"
    )]
    NoRuntime,
}
