//! The one writer of agent state: watches the config directory, compiles, publishes; and the
//! syncer that applies each published config to the datapath.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::watch;
use weft_datapath::SyncReport;
use weft_policy::{Compiled, NodeSettings};

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

/// Polls the directory; on any change, loads and compiles it. An update with errors is refused
/// as a whole (the last good config keeps serving); the very first load applies what is valid.
pub async fn watch_dir(
    dir: PathBuf,
    node: NodeSettings,
    poll_ms: u64,
    publish: watch::Sender<Arc<Published>>,
    shared: Arc<Shared>,
) {
    let mut seen: Option<u64> = None;
    let mut generation = 0;
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
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        for e in &errors {
            tracing::warn!(error = %e, "invalid config");
        }
        let previous = publish.borrow().compiled.clone();
        let now = unix_ms();
        if !errors.is_empty() && previous.is_some() {
            shared.metrics.config_reload("rejected");
            tracing::warn!(errors = errors.len(), "config update refused; the last good config keeps serving");
            publish.send_modify(|p| {
                let p = Arc::make_mut(p);
                p.errors = errors;
                p.rejected = true;
                p.loaded_at_ms = now;
            });
            continue;
        }
        let compiled = weft_policy::compile(&loaded.snapshot);
        for r in &compiled.rejected {
            tracing::warn!(rejection = %r, "object rejected");
        }
        generation += 1;
        shared.metrics.config_reload("applied");
        tracing::info!(
            generation,
            files = loaded.files,
            objects = loaded.objects,
            services = compiled.services.len(),
            workloads = compiled.attachments.len(),
            "config compiled"
        );
        publish.send_replace(Arc::new(Published {
            generation,
            compiled: Some(Arc::new(compiled)),
            errors,
            rejected: false,
            loaded_at_ms: now,
        }));
    }
}

/// Applies every new config; retries while workloads could not be attached (their cgroup may
/// not exist yet).
pub async fn sync_datapath(shared: Arc<Shared>) {
    let mut rx = shared.state.clone();
    let mut pending_retry = false;
    loop {
        if pending_retry {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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
