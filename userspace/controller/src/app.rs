//! The controller's flags and its run: start every task, wait for a signal or a failure, stop.
//!
//! Two kinds of work: every replica's (the cluster watch, the admin server, leader election,
//! certificate issuance) runs from start to stop; leader-only work (status) runs
//! under [`leader::while_leading`], started when this replica wins the Lease and aborted the
//! moment it loses it. Adding a task is one `spawn` in the right group.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::{admin, leader, status};

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "weft-controller",
    version,
    about = "weft's controller: status conditions and Events for weft's config, leader-elected"
)]
pub struct Args {
    /// This replica's name, written as the Lease holder and the Events' reporting instance; set
    /// it from the pod's metadata.name.
    #[arg(long, env = "POD_NAME")]
    pub identity: String,
    /// The namespace of the Lease; set it from the pod's metadata.namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    pub namespace: String,
    #[arg(long, default_value = "weft-controller")]
    pub lease_name: String,
    /// How long a leader's Lease stands without renewal before another replica takes it.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// How long a leader keeps leading while it cannot renew; shorter than --lease-duration.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub renew_deadline: Duration,
    /// How often candidates try for the Lease and the leader renews it.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub retry_period: Duration,
    /// `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:15020")]
    pub admin_addr: SocketAddr,
    /// How long after a change the objects are judged, so a burst of changes is judged once.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub debounce: Duration,
    /// Workload certificate issuance for the agents (HTTPS); every replica serves it.
    #[arg(long, env = "WEFT_ISSUANCE_ADDR", default_value = "0.0.0.0:15012")]
    pub issuance_addr: SocketAddr,
    /// Do not serve issuance (agents then need CAs of their own).
    #[arg(long)]
    pub no_issuance: bool,
    /// The controller's service account: its issuer presents spiffe://<td>/ns/<namespace>/sa/<this>.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "weft-controller")]
    pub service_account: String,
    /// The agents' service account, `namespace/name`: the only one issued certificates.
    #[arg(long, default_value = "weft-system/weft-agent")]
    pub agent_service_account: String,
    #[arg(long, default_value = weft_policy::authz::TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (agents renew them at half of it).
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub cert_ttl: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    weft_policy::duration_text::parse(text)
}

impl Args {
    pub fn issuer(&self) -> weft_kube::issuance::IssuerConfig {
        weft_kube::issuance::IssuerConfig {
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            trust_domain: self.trust_domain.clone(),
            listen: self.issuance_addr,
            agent_service_account: self.agent_service_account.clone(),
            ttl: self.cert_ttl,
        }
    }

    pub fn lease(&self) -> leader::Config {
        leader::Config {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
            ..leader::Config::new(&self.lease_name, &self.identity)
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let lease = args.lease();
    lease.check()?;
    let client = Client::try_default()
        .await
        .context("cannot configure the Kubernetes client; in a pod it uses the ServiceAccount, elsewhere KUBECONFIG")?;
    let metrics = Arc::new(Metrics::new());
    let listener = admin::bind(args.admin_addr).await?;
    let cluster = Arc::new(Cluster::start(&client, args.debounce));
    let (stop, shutdown) = watch::channel(false);
    let (leading_tx, leading) = watch::channel(false);

    // Every replica. The issuer runs until it is dropped at the end of `run`.
    let _issuer = match args.no_issuance {
        true => None,
        false => Some(
            weft_kube::issuance::start_issuer(client.clone(), &args.issuer())
                .await
                .context("certificate issuance (--no-issuance runs without it)")?,
        ),
    };
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    tasks.spawn(admin::serve(listener, cluster.clone(), metrics.clone()));
    tasks.spawn(follow_leadership(leading.clone(), metrics.clone()));
    let election = tokio::spawn(leader::run(
        Api::<Lease>::namespaced(client.clone(), &args.namespace),
        lease,
        leading_tx,
        shutdown,
    ));

    // Leader only.
    {
        let (client, cluster, metrics, identity) =
            (client.clone(), cluster.clone(), metrics.clone(), args.identity.clone());
        tasks.spawn(async move {
            let status = move || status::run(client.clone(), cluster.clone(), metrics.clone(), identity.clone());
            leader::while_leading(leading, "status", status).await;
            Ok(())
        });
    }
    tracing::info!(identity = %args.identity, namespace = %args.namespace, admin = %args.admin_addr, "weft-controller started");

    let outcome = tokio::select! {
        signal = terminated() => signal.map(|name| tracing::info!(signal = name, "shutting down")),
        Some(ended) = tasks.join_next() => Err(match ended {
            Ok(Ok(())) => anyhow::anyhow!("a task ended unexpectedly"),
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("a task panicked: {e}"),
        }),
    };
    // Stop leading first (leader-only work stops), then release the Lease so a successor
    // takes over at once.
    let _ = stop.send(true);
    if let Err(e) = election.await {
        tracing::warn!(error = %e, "leader election task failed while stopping");
    }
    tasks.shutdown().await;
    outcome
}

async fn follow_leadership(mut leading: watch::Receiver<bool>, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    loop {
        metrics.set_leader(*leading.borrow_and_update());
        leading.changed().await?;
    }
}

/// SIGTERM (what the kubelet sends) or Ctrl-C.
async fn terminated() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        ctrl_c = tokio::signal::ctrl_c() => ctrl_c.map(|()| "SIGINT").context("cannot listen for Ctrl-C"),
    }
}
