//! The one writer of agent state: reads the config source (a directory or the Kubernetes API),
//! compiles, publishes; and the syncer that applies each published config to the datapath.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use weft_datapath::SyncReport;
use weft_policy::{Compiled, NodeSettings, Snapshot};

use crate::app::Shared;

/// What readers see: the config in force and how the newest attempt went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Published {
    /// Bumped on every applied config.
    pub generation: u64,
    /// The config in force (`None` until the first load).
    pub compiled: Option<Arc<Compiled>>,
    /// Errors of the newest load. Non-empty with `rejected` set: that update was refused and
    /// the config in force is the previous one.
    pub errors: Vec<String>,
    pub rejected: bool,
    /// Unix time (ms) of the newest load attempt.
    pub loaded_at_ms: u64,
}

/// Where the config comes from.
pub enum Source {
    /// A directory of YAML, polled.
    Dir { dir: PathBuf, poll_ms: u64 },
    /// The Kubernetes API server, through reflectors.
    Kube(weft_kube::Source),
}

/// One read of a source's config: the snapshot and the objects left out of it.
struct Loaded {
    snapshot: Snapshot,
    errors: Vec<String>,
    objects: usize,
    /// What the source read, for the log line (e.g. "4 files").
    read: String,
}

/// What an update with errors does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnErrors {
    /// The whole update is refused and the last good config keeps serving (the very first
    /// applies what is valid): a half-saved file must not drop the objects it held.
    KeepLastGood,
    /// The bad objects are left out, the rest applies: in a cluster one team's mistake must not
    /// hold back everyone's changes.
    ApplyValid,
}

/// The one writer of [`Published`]: reads the source, compiles every new config and publishes
/// it. Both sources go through here, so compile, metrics, errors and generations are the same.
pub async fn run(source: Source, node: NodeSettings, publish: watch::Sender<Arc<Published>>, shared: Arc<Shared>) {
    let (loads, mut loaded) = mpsc::channel(1);
    let on_errors = match &source {
        Source::Dir { .. } => OnErrors::KeepLastGood,
        Source::Kube(_) => OnErrors::ApplyValid,
    };
    // The reader ends with this task (the app stops when it does).
    let _reader = match source {
        Source::Dir { dir, poll_ms } => AbortOnDrop(tokio::spawn(poll_dir(dir, node, poll_ms, loads))),
        Source::Kube(kube) => AbortOnDrop(tokio::spawn(follow_kube(kube, loads))),
    };
    let mut generation = 0;
    while let Some(loaded) = loaded.recv().await {
        apply(loaded, on_errors, &mut generation, &publish, &shared);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn apply(
    loaded: Loaded,
    on_errors: OnErrors,
    generation: &mut u64,
    publish: &watch::Sender<Arc<Published>>,
    shared: &Shared,
) {
    let Loaded { snapshot, errors, objects, read } = loaded;
    let previous = publish.borrow().clone();
    // A source that builds often (Kubernetes) repeats its errors; log each once.
    for e in errors.iter().filter(|e| !previous.errors.contains(e)) {
        tracing::warn!(error = %e, "invalid config");
    }
    let now = unix_ms();
    if on_errors == OnErrors::KeepLastGood && !errors.is_empty() && previous.compiled.is_some() {
        shared.metrics.config_reload("rejected");
        tracing::warn!(errors = errors.len(), "config update refused; the last good config keeps serving");
        publish.send_modify(|p| {
            let p = Arc::make_mut(p);
            p.errors = errors;
            p.rejected = true;
            p.loaded_at_ms = now;
        });
        return;
    }
    let compiled = weft_policy::compile(&snapshot);
    for r in &compiled.rejected {
        tracing::warn!(rejection = %r, "object rejected");
    }
    *generation += 1;
    shared.metrics.config_reload("applied");
    tracing::info!(
        generation = *generation,
        read,
        objects,
        errors = errors.len(),
        services = compiled.services.len(),
        workloads = compiled.attachments.len(),
        "config compiled"
    );
    publish.send_replace(Arc::new(Published {
        generation: *generation,
        compiled: Some(Arc::new(compiled)),
        errors,
        rejected: false,
        loaded_at_ms: now,
    }));
}

/// Polls the directory; on any change, loads it.
async fn poll_dir(dir: PathBuf, node: NodeSettings, poll_ms: u64, loads: mpsc::Sender<Loaded>) {
    let mut seen: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(poll_ms.max(50)));
    loop {
        tick.tick().await;
        let fingerprint = match fingerprint(&dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read config directory; keeping the config in force");
                continue;
            }
        };
        if seen == Some(fingerprint) {
            continue;
        }
        seen = Some(fingerprint);
        let loaded = match weft_api::load_dir(&dir, node.clone()) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(error = %e, "config directory unreadable; keeping the config in force");
                continue;
            }
        };
        let loaded = Loaded {
            errors: loaded.errors.iter().map(ToString::to_string).collect(),
            objects: loaded.objects,
            read: format!("{} files", loaded.files),
            snapshot: loaded.snapshot,
        };
        if loads.send(loaded).await.is_err() {
            return;
        }
    }
}

/// Passes on each build of the Kubernetes source; the first comes once every kind is listed.
async fn follow_kube(kube: weft_kube::Source, loads: mpsc::Sender<Loaded>) {
    let mut updates = kube.updates();
    loop {
        let update = updates.borrow_and_update().clone();
        if let Some(update) = update {
            let loaded = Loaded {
                snapshot: update.snapshot.clone(),
                errors: update.errors.iter().map(ToString::to_string).collect(),
                objects: update.objects,
                read: "Kubernetes".into(),
            };
            if loads.send(loaded).await.is_err() {
                return;
            }
        }
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// Applies every new config; retries while workloads could not be attached (their cgroup may
/// not exist yet), and, more cheaply, while attached workloads have no process to show their
/// network namespace yet.
pub async fn sync_datapath(shared: Arc<Shared>) {
    let mut rx = shared.state.clone();
    let (mut pending_retry, mut netns_pending) = (false, false);
    loop {
        if pending_retry || netns_pending {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !pending_retry {
                        let mut errors = Vec::new();
                        let left = shared.datapath.lock().unwrap_or_else(|p| p.into_inner()).attach_pending_netns(&mut errors);
                        for e in &errors {
                            tracing::warn!(error = %e, "attaching sk_lookup failed; will retry");
                        }
                        netns_pending = left > 0 || !errors.is_empty();
                        continue;
                    }
                }
            }
        } else if rx.changed().await.is_err() {
            return;
        }
        let Some(compiled) = rx.borrow_and_update().compiled.clone() else {
            continue;
        };
        let result = {
            let mut datapath = shared.datapath.lock().unwrap_or_else(|p| p.into_inner());
            datapath.apply(&compiled)
        };
        match result {
            Ok(report) => {
                record(&shared, &report);
                pending_retry = !report.errors.is_empty();
                netns_pending = report.netns_pending > 0;
                shared.ready.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                shared.metrics.sync_failed();
                tracing::error!(error = %e, "applying config to the datapath failed; will retry");
                pending_retry = true;
            }
        }
    }
}

fn record(shared: &Shared, report: &SyncReport) {
    shared.metrics.synced(report);
    for e in &report.errors {
        tracing::warn!(error = %e, "workload not attached; will retry");
    }
    if report.changed() {
        tracing::info!(
            writes = report.writes,
            deletes = report.deletes,
            attached = report.attached,
            detached = report.detached,
            "datapath synced"
        );
    }
}

/// A hash of every file's name and content: cheap for config-sized directories and immune to
/// coarse mtimes.
fn fingerprint(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect();
    names.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for path in names {
        path.hash(&mut h);
        if let Ok(bytes) = std::fs::read(&path) {
            bytes.hash(&mut h);
        }
    }
    Ok(h.finish())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
