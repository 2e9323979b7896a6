//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection
//! does it.
//!
//! A candidate reads the Lease every `retry_period`. It takes the Lease when there is none,
//! when it has no holder (released), or when its record has not changed for the holder's
//! `leaseDurationSeconds` as measured by this process's own clock: the holder's `renewTime` is
//! another machine's clock, so it is compared for change, never against ours. The leader
//! renews every `retry_period` by writing from the Lease it last wrote; every write carries the
//! `resourceVersion` it was based on, so of two replicas racing, one gets 409 Conflict and
//! knows it lost. A leader that cannot renew for `renew_deadline` (shorter than the lease
//! duration) stops leading before anyone else may take over. On shutdown the leader clears the
//! holder so a successor takes over at once.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct Config {
    /// The Lease's name (in the namespace of the `Api` given to [`run`]).
    pub name: String,
    /// This replica, written as the holder: its pod name.
    pub identity: String,
    /// How long a holder's Lease stands without renewal before others may take it.
    pub lease_duration: Duration,
    /// How long the leader keeps leading while its renewals fail.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl Config {
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The timings must leave the leader time to notice it lost before a successor may start.
    pub fn check(&self) -> Result<(), Error> {
        if self.identity.is_empty() {
            return Err(Error::Config("the identity is empty; set --identity or POD_NAME to the pod's name".into()));
        }
        if self.lease_duration.as_secs() < 1 {
            return Err(Error::Config("--lease-duration must be at least 1s (the Lease counts whole seconds)".into()));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Config(format!(
                "--renew-deadline ({:?}) must be shorter than --lease-duration ({:?}), or a leader could still act after \
                 its lease expired",
                self.renew_deadline, self.lease_duration
            )));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(Error::Config(format!(
                "--retry-period ({:?}) must be above zero and shorter than --renew-deadline ({:?})",
                self.retry_period, self.renew_deadline
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("leader election: {0}")]
    Config(String),
    #[error(
        "cannot {action} Lease {name}: {source}; is the API server reachable, and may the controller's ServiceAccount get, create and update leases in its namespace?"
    )]
    Api {
        action: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{action} Lease {name} timed out; is the API server reachable?")]
    Timeout { action: &'static str, name: String },
}

/// Campaigns for the Lease until `shutdown` turns true, publishing on `leading` whether this
/// replica leads. On shutdown it stops leading first, then releases the Lease if it held it.
pub async fn run(api: Api<Lease>, config: Config, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
    let mut elector = Elector { api, config, observed: None, held: None };
    // When the leader last renewed.
    let mut renewed: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        // A leader's attempt may take no longer than what is left of its renew deadline.
        let budget = match renewed {
            Some(at) => (at + elector.config.renew_deadline).saturating_duration_since(Instant::now()),
            None => elector.config.renew_deadline,
        };
        let attempt = tokio::time::timeout(budget, elector.try_acquire_or_renew()).await.unwrap_or_else(|_| {
            let action = if renewed.is_some() { "renewing" } else { "acquiring" };
            Err(Error::Timeout { action, name: elector.config.name.clone() })
        });
        match attempt {
            Ok(true) => {
                if renewed.is_none() {
                    tracing::info!(lease = %elector.config.name, identity = %elector.config.identity, "leading");
                }
                renewed = Some(Instant::now());
                leading.send_if_modified(|l| !std::mem::replace(l, true));
            }
            Ok(false) => {
                if renewed.take().is_some() {
                    tracing::warn!(lease = %elector.config.name, "lost the lease to another replica; stopping leader-only work");
                }
                leading.send_if_modified(|l| std::mem::replace(l, false));
            }
            Err(error) => {
                tracing::warn!(%error, "leader election");
                if let Some(at) = renewed
                    && at.elapsed() >= elector.config.renew_deadline
                {
                    tracing::warn!(
                        lease = %elector.config.name,
                        "could not renew within the renew deadline; stopping leader-only work"
                    );
                    renewed = None;
                    elector.held = None;
                    leading.send_if_modified(|l| std::mem::replace(l, false));
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(elector.config.retry_period) => {}
            _ = shutdown.changed() => {}
        }
    }
    leading.send_if_modified(|l| std::mem::replace(l, false));
    if renewed.is_some() {
        match tokio::time::timeout(elector.config.retry_period, elector.release()).await {
            Ok(Ok(())) => tracing::info!(lease = %elector.config.name, "released the lease"),
            Ok(Err(error)) => tracing::warn!(%error, "releasing the lease; a successor takes over once it expires"),
            Err(_) => tracing::warn!("releasing the lease timed out; a successor takes over once it expires"),
        }
    }
}

/// Runs `work` whenever `leading` is true, and stops it as soon as it turns false. Work that
/// ends on its own while leading is started again after a pause.
pub async fn while_leading<F, Fut>(mut leading: watch::Receiver<bool>, name: &'static str, work: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    const RESTART: Duration = Duration::from_secs(1);
    loop {
        if leading.wait_for(|l| *l).await.map(|_| ()).is_err() {
            return;
        }
        tracing::info!(task = name, "starting leader-only work");
        let mut task = tokio::spawn(work());
        // Ok(()) once leadership is lost; Err when the election has stopped.
        let lost = async { leading.wait_for(|l| !*l).await.map(|_| ()) };
        tokio::select! {
            result = &mut task => {
                match result {
                    Ok(Ok(())) => tracing::warn!(task = name, "leader-only work ended; starting it again"),
                    Ok(Err(error)) => tracing::error!(task = name, %error, "leader-only work failed; starting it again"),
                    Err(error) => tracing::error!(task = name, %error, "leader-only work panicked; starting it again"),
                }
                tokio::time::sleep(RESTART).await;
            }
            lost = lost => {
                task.abort();
                if lost.is_err() {
                    return;
                }
                tracing::info!(task = name, "stopped leader-only work");
            }
        }
    }
}

struct Elector {
    api: Api<Lease>,
    config: Config,
    /// The Lease record last seen and when this process first saw it so.
    observed: Option<(LeaseSpec, Instant)>,
    /// The Lease as this replica last wrote it, while leading.
    held: Option<Lease>,
}

// === impl Elector ===

impl Elector {
    /// Whether this replica holds the Lease after one attempt.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, Error> {
        if let Some(held) = self.held.take() {
            return self.renew(held).await;
        }
        let current = self.api.get_opt(&self.config.name).await.map_err(|e| self.error("read", e))?;
        let Some(lease) = current else {
            return self.create().await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        if holder == Some(self.config.identity.as_str()) {
            // Ours from an earlier run of this pod (same name): carry on.
            return self.renew(lease).await;
        }
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, at)) if *seen == spec => *at,
            _ => {
                self.observed = Some((spec.clone(), now));
                now
            }
        };
        let duration = spec.lease_duration_seconds.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs);
        let expired = now.duration_since(since) >= duration.unwrap_or(self.config.lease_duration);
        if holder.is_some() && !expired {
            return Ok(false);
        }
        tracing::info!(lease = %self.config.name, previous = holder, "taking over the lease");
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some());
        let taken = Lease { spec: Some(self.record(transitions)), ..lease };
        self.write(taken).await
    }

    async fn create(&mut self) -> Result<bool, Error> {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(self.config.name.clone()), ..ObjectMeta::default() },
            spec: Some(self.record(0)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(created) => {
                self.held = Some(created);
                Ok(true)
            }
            // Another replica created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error("create", e)),
        }
    }

    async fn renew(&mut self, mut lease: Lease) -> Result<bool, Error> {
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(self.seconds());
        self.write(lease).await
    }

    /// Replaces the Lease; a 409 means it changed since it was read: someone else holds it.
    async fn write(&mut self, lease: Lease) -> Result<bool, Error> {
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(written) => {
                self.held = Some(written);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error("update", e)),
        }
    }

    /// Clears the holder, so the next candidate to look takes the Lease at once.
    async fn release(&mut self) -> Result<(), Error> {
        let Some(mut lease) = self.held.take() else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.config.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            // Someone else holds it already: nothing to release.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(self.error("release", e)),
        }
    }

    fn record(&self, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.seconds()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn error(&self, action: &'static str, source: kube::Error) -> Error {
        Error::Api { action, name: self.config.name.clone(), source: Box::new(source) }
    }
}
