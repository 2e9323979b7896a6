//! What the controller reads, on every replica: kube-runtime reflectors (list + watch, default
//! backoff, managed fields stripped) over Services, HTTPRoutes, GRPCRoutes and weft's CRDs.
//! Standby replicas keep warm stores, so a new leader judges at once.
//!
//! A short while after any store changes (the debounce), and only once every kind has been
//! listed, the change counter goes up; the status writer recomputes on each step.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::{BoxStream, SelectAll};
use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
use weft_kube::{Signal, signal};

/// Every object the controller judges, as the reflectors last saw them.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub http_routes: Store<HttpRoute>,
    pub grpc_routes: Store<GrpcRoute>,
    pub workloads: Store<Workload>,
    pub authorization_policies: Store<AuthorizationPolicy>,
    pub jwt_policies: Store<JwtPolicy>,
    pub traffic_policies: Store<TrafficPolicy>,
    pub peer_authentications: Store<PeerAuthentication>,
}

/// The running reflectors; dropping it stops them.
pub struct Cluster {
    stores: Stores,
    changes: watch::Receiver<u64>,
    /// (group, plural) of every reflected kind, for the RBAC check.
    reflected: Vec<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

type Events = SelectAll<BoxStream<'static, (usize, Signal)>>;

impl Cluster {
    /// Starts the reflectors on the current runtime.
    pub fn start(client: &Client, debounce: Duration) -> Self {
        let all = watcher::Config::default();
        let mut r = Reflectors { client, events: Events::new(), reflected: Vec::new() };
        let stores = Stores {
            services: r.add(&all),
            http_routes: r.add(&all),
            grpc_routes: r.add(&all),
            workloads: r.add(&all),
            authorization_policies: r.add(&all),
            jwt_policies: r.add(&all),
            traffic_policies: r.add(&all),
            peer_authentications: r.add(&all),
        };
        let (bump, changes) = watch::channel(0);
        let names: Vec<String> = r.reflected.iter().map(|(g, p)| plural_with_group(g, p)).collect();
        let task = tokio::spawn(run(r.events, names, debounce, bump));
        Self { stores, changes, reflected: r.reflected, task }
    }

    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Counts builds-worth of changes: 0 until every kind has been listed, then one more a
    /// debounce after each burst of changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Every kind has been listed once.
    pub fn is_synced(&self) -> bool {
        *self.changes.borrow() > 0
    }

    /// (API group, plural) of every kind watched.
    pub fn reflected(&self) -> &[(String, String)] {
        &self.reflected
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn plural_with_group(group: &str, plural: &str) -> String {
    if group.is_empty() { plural.to_owned() } else { format!("{plural}.{group}") }
}

async fn run(mut events: Events, names: Vec<String>, debounce: Duration, bump: watch::Sender<u64>) {
    let mut listed = vec![false; names.len()];
    let mut due: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = sleep_until(due), if due.is_some() => {
                due = None;
                if listed.iter().all(|l| *l) {
                    bump.send_modify(|n| *n += 1);
                }
                continue;
            }
        };
        // The watchers retry for ever; the streams end only when the task is torn down.
        let Some((kind, signal)) = event else { return };
        let resource = &names[kind];
        match signal {
            Signal::Changed => {}
            Signal::Listed => {
                if !std::mem::replace(&mut listed[kind], true) {
                    tracing::debug!(resource, "first list complete");
                }
            }
            Signal::Absent if !listed[kind] => {
                tracing::warn!(
                    resource,
                    "the API server does not serve this resource; is its CRD installed? treating it as empty"
                );
                listed[kind] = true;
            }
            Signal::Absent => continue,
            Signal::Failed(error) => {
                tracing::warn!(
                    resource,
                    %error,
                    "cannot list or watch; is the API server reachable, and may the controller's ServiceAccount list and watch it? retrying with backoff"
                );
                continue;
            }
        }
        due.get_or_insert_with(|| Instant::now() + debounce);
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Reflectors<'a> {
    client: &'a Client,
    events: Events,
    reflected: Vec<(String, String)>,
}

impl Reflectors<'_> {
    fn add<K>(&mut self, config: &watcher::Config) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let (store, writer) = reflector::store();
        let kind = self.events.len();
        self.reflected.push((K::group(&()).into_owned(), K::plural(&()).into_owned()));
        let stream = watcher(Api::<K>::all(self.client.clone()), config.clone())
            .default_backoff()
            // Managed fields are never read and can be larger than the object.
            .modify(weft_kube::strip::<K>)
            .reflect(writer)
            .filter_map(move |event| std::future::ready(signal(event).map(|s| (kind, s))));
        self.events.push(stream.boxed());
        store
    }
}
