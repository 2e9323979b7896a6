//! Certificates that renew themselves under configs that stay put.
//!
//! A [`CertSlot`] is the certificate resolver of a rustls config: each handshake takes whatever
//! certificate the slot holds at that moment, so replacing it affects only later handshakes;
//! established connections keep the keys they agreed. A rotation task per slot renews at half
//! life and, when the issuer fails, retries while the old certificate stays in place: a slot is
//! never empty, because a stale certificate beats refusing every handshake.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{runtime::Handle, sync::OnceCell, task::JoinHandle};

use crate::{Ca, DEFAULT_CERT_TTL, Error, SpiffeId, WorkloadCert};

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest single sleep before re-reading the wall clock. Timers follow the monotonic clock,
/// certificates the wall clock; after a VM suspend or a clock step, renewal is late by at most
/// this much.
const MAX_NAP: Duration = Duration::from_secs(300);
/// Least time between renewals, so an issuer whose certificates are due on arrival (a tiny
/// ttl) does not make the task spin.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A certificate on its way.
pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, Error>> + Send + 'a>>;

/// Where workload certificates come from: the in-process CA ([`LocalIssuer`], ready at once) or a
/// remote one (weft-kube's issuance client).
pub trait Issuer: Send + Sync {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a>;
}

/// Issues from an in-process CA (standalone mode).
#[derive(Clone, Debug)]
pub struct LocalIssuer {
    pub ca: Arc<Ca>,
    pub ttl: Duration,
}

impl LocalIssuer {
    /// Certificates living [`DEFAULT_CERT_TTL`].
    pub fn new(ca: Arc<Ca>) -> LocalIssuer {
        LocalIssuer {
            ca,
            ttl: DEFAULT_CERT_TTL,
        }
    }
}

impl Issuer for LocalIssuer {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        Box::pin(std::future::ready(self.ca.issue(id, self.ttl)))
    }
}

// === impl CertSlot ===

/// The current certificate of one workload identity; a resolver for both server and client
/// configs.
pub struct CertSlot {
    id: SpiffeId,
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    refresh_at: SystemTime,
}

impl CertSlot {
    pub fn new(cert: WorkloadCert) -> Result<CertSlot, Error> {
        let current = Current::of(&cert)?;
        Ok(CertSlot {
            id: cert.id,
            current: RwLock::new(current),
        })
    }

    /// Replaces the certificate; the next handshake presents `cert`.
    pub fn set(&self, cert: WorkloadCert) -> Result<(), Error> {
        if cert.id != self.id {
            return Err(Error::SlotMismatch {
                slot: self.id.to_string(),
                cert: cert.id.to_string(),
            });
        }
        let current = Current::of(&cert)?;
        // A panic elsewhere while holding the lock cannot leave a half-written `Current`: it is
        // replaced whole.
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = current;
        Ok(())
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The identity and expiry of the certificate handshakes get now.
    pub fn current(&self) -> (SpiffeId, SystemTime) {
        (self.id.clone(), self.read().not_after)
    }

    /// When the current certificate is due for renewal.
    pub fn refresh_at(&self) -> SystemTime {
        self.read().refresh_at
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.read().key
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Current {
    fn of(cert: &WorkloadCert) -> Result<Current, Error> {
        Ok(Current {
            key: cert.to_certified_key()?,
            not_after: cert.not_after,
            refresh_at: cert.refresh_at(),
        })
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.read();
        f.debug_struct("CertSlot")
            .field("id", &self.id)
            .field("not_after", &current.not_after)
            .field("refresh_at", &current.refresh_at)
            .finish()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl Rotation ===

/// The rotation task of one slot; dropping it stops the task (the slot keeps its last
/// certificate).
#[derive(Debug)]
pub struct Rotation(JoinHandle<()>);

impl Drop for Rotation {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts renewing `slot` from `issuer` at each certificate's half life, on the current tokio
/// runtime.
pub fn spawn_rotation(slot: Arc<CertSlot>, issuer: Arc<dyn Issuer>) -> Result<Rotation, Error> {
    let runtime = Handle::try_current().map_err(|_| Error::NoRuntime)?;
    Ok(Rotation(runtime.spawn(rotate(slot, issuer))))
}

async fn rotate(slot: Arc<CertSlot>, issuer: Arc<dyn Issuer>) {
    loop {
        loop {
            let wait = slot
                .refresh_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if wait.is_zero() {
                break;
            }
            tokio::time::sleep(wait.min(MAX_NAP)).await;
        }
        let mut backoff = RETRY_MIN;
        loop {
            match issuer.issue(slot.id()).await.and_then(|cert| slot.set(cert)) {
                Ok(()) => {
                    let (id, not_after) = slot.current();
                    tracing::debug!(%id, ?not_after, "renewed workload certificate");
                    break;
                }
                Err(error) => {
                    let (id, not_after) = slot.current();
                    let expired = not_after <= SystemTime::now();
                    tracing::warn!(%id, %error, retry_in = ?backoff, ?not_after, expired, "renewing the workload certificate failed; the current one stays in use");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        tokio::time::sleep(MIN_INTERVAL).await;
    }
}

// === impl CertStore ===

/// One rotating slot per local workload identity, created on first use. The node proxy asks it
/// for the slot of each workload it serves or dials from.
pub struct CertStore {
    issuer: Arc<dyn Issuer>,
    slots: Mutex<HashMap<SpiffeId, Arc<OnceCell<Entry>>>>,
}

struct Entry {
    slot: Arc<CertSlot>,
    _rotation: Rotation,
}

impl CertStore {
    pub fn new(issuer: Arc<dyn Issuer>) -> CertStore {
        CertStore {
            issuer,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slot of `id`; the first call issues its certificate and starts its rotation
    /// (concurrent first calls wait for one issuance; a failed one is tried again by the next
    /// call). Must run on a tokio runtime.
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<CertSlot>, Error> {
        let cell = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone();
        let entry = cell
            .get_or_try_init(|| async {
                // Before issuing, so a call off the runtime fails without wasting a certificate.
                Handle::try_current().map_err(|_| Error::NoRuntime)?;
                let cert = self.issuer.issue(id).await?;
                if cert.id != *id {
                    return Err(Error::SlotMismatch {
                        slot: id.to_string(),
                        cert: cert.id.to_string(),
                    });
                }
                let slot = Arc::new(CertSlot::new(cert)?);
                let rotation = spawn_rotation(slot.clone(), self.issuer.clone())?;
                Ok(Entry {
                    slot,
                    _rotation: rotation,
                })
            })
            .await?;
        Ok(entry.slot.clone())
    }

    /// The slot of `id` if its certificate has been issued, without issuing.
    pub fn issued(&self, id: &SpiffeId) -> Option<Arc<CertSlot>> {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        Some(slots.get(id)?.get()?.slot.clone())
    }

    /// Forgets `id` and stops its rotation; configs still holding the slot keep its last
    /// certificate until it expires. Returns whether `id` had a certificate.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
            .is_some_and(|cell| cell.initialized())
    }

    /// The identities with an issued certificate, sorted.
    pub fn ids(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, cell)| cell.initialized())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("ids", &self.ids())
            .finish_non_exhaustive()
    }
}
