//! weft's Kubernetes config source: kube-runtime reflectors over the API server, built into a
//! [`weft_policy::Snapshot`] through weft-api's conversion, the same path the standalone config
//! directory takes.
//!
//! One task owns everything: it drives a reflector per kind, and a short while after any store
//! changes (`Config::debounce`) builds a snapshot from all stores and publishes it if it
//! differs from the last. Nothing is published until every reflector has finished its first
//! full list, so the first snapshot is never a partial view of the cluster. When the API server
//! cannot be reached the watchers back off and retry while the stores, and so the published
//! snapshot, stay as they were.
#![forbid(unsafe_code)]

pub mod cgroup;
pub mod issuance;
mod list;
mod stores;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::watch;
use tokio::time::Instant;
use weft_api::ObjectError;
use weft_policy::{NodeSettings, Snapshot};

pub use cgroup::Cgroups;
pub use kube::Client;
pub use list::{ListError, list_snapshot};
pub use stores::{KINDS, Kind, Signal, signal, strip};

use stores::Stores;

/// Where the kubelet's cgroups are, on the host.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Clone, Debug)]
pub struct Config {
    /// This node: its name selects the pods watched, and makes them local.
    pub node: NodeSettings,
    /// The host's cgroup v2 mount, where pods' cgroups are found.
    pub cgroup_root: PathBuf,
    /// How long after a change the snapshot is built, so a burst of changes builds once.
    pub debounce: Duration,
}

impl Config {
    pub fn new(node: NodeSettings) -> Self {
        Self { node, cgroup_root: DEFAULT_CGROUP_ROOT.into(), debounce: Duration::from_millis(100) }
    }
}

/// One build of the cluster's state for this node.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub snapshot: Snapshot,
    /// Objects left out of the snapshot, and why.
    pub errors: Vec<ObjectError>,
    /// Objects in the snapshot.
    pub objects: usize,
}

/// A running Kubernetes source; dropping it stops the reflectors.
#[derive(Debug)]
pub struct Source {
    updates: watch::Receiver<Option<Arc<Update>>>,
    waiting: watch::Receiver<Vec<&'static str>>,
    task: tokio::task::JoinHandle<()>,
}

/// How often the snapshot is built again while a meshed pod's cgroup cannot be placed.
const CGROUP_RETRY: Duration = Duration::from_secs(2);

impl Source {
    /// Starts the reflectors on the current runtime.
    pub fn start(client: kube::Client, config: Config) -> Self {
        let (stores, events) = Stores::new(&client, &config.node.node_name);
        let (publish, updates) = watch::channel(None);
        let (waiting_tx, waiting) = watch::channel(KINDS.iter().map(|k| k.resource).collect());
        let task = tokio::spawn(run(stores, events, config, publish, waiting_tx));
        Self { updates, waiting, task }
    }

    /// The newest build; `None` until every kind has been listed once.
    pub fn updates(&self) -> watch::Receiver<Option<Arc<Update>>> {
        self.updates.clone()
    }

    /// Every reflector has completed its first full list.
    pub fn is_ready(&self) -> bool {
        self.waiting.borrow().is_empty()
    }

    /// The resources (plural, with their group) not listed yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.waiting.borrow().clone()
    }

    /// Follows readiness as it changes.
    pub fn readiness(&self) -> watch::Receiver<Vec<&'static str>> {
        self.waiting.clone()
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    stores: Stores,
    mut events: stores::Events,
    config: Config,
    publish: watch::Sender<Option<Arc<Update>>>,
    waiting: watch::Sender<Vec<&'static str>>,
) {
    let cgroups = Cgroups::new(&config.cgroup_root);
    let mut listed = [false; KINDS.len()];
    // When the next build is due; `None`: nothing changed since the last.
    let mut due: Option<Instant> = None;
    let mut checked_node = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = sleep_until(due), if due.is_some() => {
                due = None;
                if !listed.iter().all(|&l| l) {
                    continue;
                }
                if !checked_node {
                    checked_node = true;
                    stores.check_node(&config.node.node_name);
                }
                let (update, unplaced) = stores.build(&config.node, &cgroups);
                if unplaced > 0 {
                    due = Some(Instant::now() + CGROUP_RETRY);
                }
                publish.send_if_modified(|current| {
                    let changed = current.as_deref() != Some(&update);
                    if changed {
                        *current = Some(Arc::new(update));
                    }
                    changed
                });
                continue;
            }
        };
        // The reflectors' streams retry for ever; they end only if the task is torn down.
        let Some((kind, signal)) = event else { return };
        let resource = KINDS[kind].resource;
        match signal {
            Signal::Changed => {}
            Signal::Listed => {
                if !listed[kind] {
                    listed[kind] = true;
                    tracing::debug!(resource, "first list complete");
                    waiting.send_modify(|w| w.retain(|r| *r != resource));
                }
            }
            Signal::Absent if !listed[kind] => {
                tracing::warn!(
                    resource,
                    "the API server does not serve this resource; is its CRD installed? treating it as empty until it appears"
                );
                listed[kind] = true;
                waiting.send_modify(|w| w.retain(|r| *r != resource));
            }
            Signal::Absent => continue,
            Signal::Failed(error) => {
                tracing::warn!(resource, %error, "{}; retrying with backoff, the config in force stays", KINDS[kind].hint);
                continue;
            }
        }
        due.get_or_insert_with(|| Instant::now() + config.debounce);
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
