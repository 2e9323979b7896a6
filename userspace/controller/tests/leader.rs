//! Leader election against a fake API server: a free Lease is taken, a fresh one held by
//! someone else is left alone, an expired one is taken over, a 409 on renewal ends leading,
//! and shutdown releases the Lease.
//!
//! Time is paused: tokio's clock jumps whenever every task waits, so lease durations cost no
//! wall time, and waits are counted in the test clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../kube/tests/mock/mod.rs"]
mod mock;

use std::time::Duration;

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use mock::{ApiServer, until};
use serde_json::json;
use tokio::sync::watch;
use weft_controller::leader::{self, Config};

const NAMESPACE: &str = "weft-system";
const LEASE: &str = "weft-controller";

struct Candidate {
    server: ApiServer,
    leading: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Candidate {
    fn start(fixtures: impl FnOnce(&ApiServer)) -> Self {
        let (server, client) = ApiServer::start(&[ApiServer::serve::<Lease>]);
        fixtures(&server);
        let (leading_tx, leading) = watch::channel(false);
        let (stop, shutdown) = watch::channel(false);
        let config = Config::new(LEASE, "controller-a");
        config.check().expect("defaults are consistent");
        let api = Api::<Lease>::namespaced(client, NAMESPACE);
        let task = tokio::spawn(leader::run(api, config, leading_tx, shutdown));
        Self { server, leading, stop, task: Some(task) }
    }

    async fn until_leading(&mut self, want: bool) {
        let wait = self.leading.wait_for(|l| *l == want);
        tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| panic!("leading never became {want}; requests: {:#?}", self.server.requests()))
            .expect("election running");
    }

    fn lease(&self) -> serde_json::Value {
        self.server.get::<Lease>(NAMESPACE, LEASE).expect("the lease exists")
    }
}

/// A Lease held by `holder`, as that holder would have written it.
fn held_by(holder: &str, transitions: i32) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": LEASE, "namespace": NAMESPACE},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions,
                 "acquireTime": "2026-01-01T00:00:00.000000Z", "renewTime": "2026-01-01T00:00:00.000000Z"},
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn acquires_a_free_lease_and_renews_it() {
    let mut c = Candidate::start(|_| {});
    c.until_leading(true).await;
    let created = c.server.writes(&Method::POST, "/namespaces/weft-system/leases");
    assert_eq!(created.len(), 1, "one create");
    let spec = &created[0].body["spec"];
    assert_eq!(spec["holderIdentity"], "controller-a");
    assert_eq!(spec["leaseDurationSeconds"], 15);
    assert_eq!(spec["leaseTransitions"], 0);
    assert!(spec["renewTime"].is_string() && spec["acquireTime"].is_string(), "{spec}");

    // Renewals: updates carrying the version they replace, well inside the lease duration.
    let first = c.lease()["metadata"]["resourceVersion"].clone();
    until(&c.server, "two renewals", || {
        (c.server.writes(&Method::PUT, "/leases/weft-controller").len() >= 2).then_some(())
    })
    .await;
    let renewals = c.server.writes(&Method::PUT, "/leases/weft-controller");
    assert_eq!(renewals[0].body["metadata"]["resourceVersion"], first, "based on what it wrote");
    assert_eq!(renewals[0].body["spec"]["holderIdentity"], "controller-a");
    assert!(*c.leading.borrow(), "still leading");
}

#[tokio::test(start_paused = true)]
async fn leaves_a_fresh_lease_alone_and_takes_over_once_it_expires() {
    let mut c = Candidate::start(|s| s.apply(&held_by("controller-b", 3)));
    // The holder renews every 5 s for a minute: its lease never goes stale.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!*c.leading.borrow(), "does not lead while another holder renews");
        let mut renewed = held_by("controller-b", 3);
        let spec = renewed.spec.as_mut().unwrap();
        spec.renew_time =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()));
        c.server.apply(&renewed);
    }
    assert!(c.server.writes(&Method::PUT, "/leases/weft-controller").is_empty(), "no write to another's lease");
    assert!(c.server.writes(&Method::POST, "/leases").is_empty());

    // The holder stops renewing: after its duration (on this process's clock) the lease is taken.
    c.until_leading(true).await;
    let lease = c.lease();
    assert_eq!(lease["spec"]["holderIdentity"], "controller-a");
    assert_eq!(lease["spec"]["leaseTransitions"], 4, "a takeover counts a transition");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test(start_paused = true)]
async fn a_released_lease_is_taken_at_once() {
    let mut c = Candidate::start(|s| {
        let mut released = held_by("", 1);
        released.spec.as_mut().unwrap().holder_identity = None;
        s.apply(&released);
    });
    let started = tokio::time::Instant::now();
    c.until_leading(true).await;
    assert!(started.elapsed() < Duration::from_secs(15), "no wait for a lease nobody holds");
    assert_eq!(c.lease()["spec"]["holderIdentity"], "controller-a");
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_renewal_stops_leading() {
    let mut c = Candidate::start(|_| {});
    c.until_leading(true).await;
    // Another replica writes the lease (as if it took it after a partition): our next renewal
    // is based on an older version and gets 409.
    c.server.apply(&held_by("controller-b", 1));
    c.until_leading(false).await;
    let conflicts = c
        .server
        .writes(&Method::PUT, "/leases/weft-controller")
        .into_iter()
        .filter(|r| r.body["spec"]["holderIdentity"] == "controller-a")
        .count();
    assert!(conflicts >= 1, "the losing renewal was attempted");
    assert_eq!(c.lease()["spec"]["holderIdentity"], "controller-b", "the winner's lease is untouched");
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_the_lease() {
    let mut c = Candidate::start(|_| {});
    c.until_leading(true).await;
    c.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), c.task.take().unwrap())
        .await
        .expect("stops promptly")
        .expect("no panic");
    assert!(!*c.leading.borrow(), "stopped leading before releasing");
    let lease = c.lease();
    assert!(lease["spec"]["holderIdentity"].is_null(), "holder cleared: {lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
}

#[tokio::test(start_paused = true)]
async fn leader_only_work_stops_when_leadership_ends() {
    let (leading_tx, leading) = watch::channel(false);
    let (ran_tx, mut ran) = watch::channel(0u32);
    let supervisor = tokio::spawn(leader::while_leading(leading, "test", move || {
        let ran_tx = ran_tx.clone();
        async move {
            ran_tx.send_modify(|n| *n += 1);
            // Work that runs until stopped; it counts its ticks.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                ran_tx.send_modify(|n| *n += 1);
            }
        }
    }));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(*ran.borrow_and_update(), 0, "nothing runs before leading");
    leading_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(*ran.borrow_and_update() >= 2, "runs while leading");
    leading_tx.send(false).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let stopped_at = *ran.borrow_and_update();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(*ran.borrow(), stopped_at, "aborted when leadership ended");
    drop(leading_tx);
    tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("ends with the election").unwrap();
}

#[test]
fn inconsistent_timings_are_refused() {
    let base = Config::new(LEASE, "a");
    assert!(base.check().is_ok());
    let err = Config { renew_deadline: Duration::from_secs(15), ..base.clone() }.check().unwrap_err();
    assert!(err.to_string().contains("--renew-deadline"), "{err}");
    let err = Config { retry_period: Duration::from_secs(10), ..base.clone() }.check().unwrap_err();
    assert!(err.to_string().contains("--retry-period"), "{err}");
    let err = Config { identity: String::new(), ..base }.check().unwrap_err();
    assert!(err.to_string().contains("POD_NAME"), "{err}");
}
