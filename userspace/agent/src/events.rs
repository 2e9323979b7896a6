//! The L4 access log: one JSON line per closed connection, from the kernel's ring buffer, to
//! its own sink (a file or stdout), apart from the agent's logs.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use weft_common::{Addr, CONN_F_HANDOFF, CONN_F_REDIRECT, ConnEvent, REPORTER_SOURCE, as_v4};
use weft_policy::Names;

use crate::{access_log::AccessLog, app::Shared};

/// How long a record may wait in the ring buffer before the agent drains it anyway.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Serialize)]
struct Endpoint<'a> {
    address: String,
    workload: Option<&'a str>,
    namespace: Option<&'a str>,
}

#[derive(Serialize)]
struct Record<'a> {
    kind: &'static str,
    reporter: &'static str,
    source: Endpoint<'a>,
    destination: Endpoint<'a>,
    /// Where the application connected (the service VIP for services).
    original_destination: String,
    service: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: f64,
    rtt_us: u32,
    retransmits: u32,
    redirected: bool,
    handed_to_proxy: bool,
}

fn ip(addr: &Addr) -> Ipv4Addr {
    as_v4(addr).map_or(Ipv4Addr::UNSPECIFIED, |w| Ipv4Addr::from(w.to_ne_bytes()))
}

fn record<'a>(e: &ConnEvent, names: Option<&'a Names>) -> Record<'a> {
    let workload = |id: u32| names.and_then(|n| n.workloads.get(&id));
    let local = SocketAddrV4::new(ip(&e.local), e.local_port).to_string();
    let remote = SocketAddrV4::new(ip(&e.remote), e.remote_port).to_string();
    let (src_addr, dst_addr) = if e.reporter == REPORTER_SOURCE { (local, remote) } else { (remote, local) };
    let (src, dst) = (workload(e.src_workload), workload(e.dst_workload));
    Record {
        kind: "l4",
        reporter: if e.reporter == REPORTER_SOURCE { "source" } else { "destination" },
        source: Endpoint {
            address: src_addr,
            workload: src.map(|w| w.id.name.as_str()),
            namespace: src.map(|w| w.id.namespace.as_str()),
        },
        destination: Endpoint {
            address: dst_addr,
            workload: dst.map(|w| w.id.name.as_str()),
            namespace: dst.map(|w| w.id.namespace.as_str()),
        },
        original_destination: SocketAddrV4::new(ip(&e.orig_addr), e.orig_port).to_string(),
        service: names
            .and_then(|n| n.services.get(&e.svc_id))
            .map(|s| format!("{}.{}.svc.cluster.local", s.name, s.namespace)),
        bytes_sent: e.bytes_sent,
        bytes_received: e.bytes_received,
        duration_ms: e.duration_ns as f64 / 1e6,
        rtt_us: e.srtt_us,
        retransmits: e.retransmits,
        redirected: e.flags & CONN_F_REDIRECT != 0,
        handed_to_proxy: e.flags & CONN_F_HANDOFF != 0,
    }
}

/// Drains the ring buffer as it fills. Without an access log the records are drained
/// unformatted, so the buffer never fills up and drops.
pub async fn run(ring: RingBuf<MapData>, log: Arc<AccessLog>, shared: Arc<Shared>) {
    // The safe constructor is deprecated for types that might close their fd while registered;
    // RingBuf owns its fd and lives inside the AsyncFd, so that cannot happen here, and the
    // replacement is `unsafe`, which this crate forbids.
    #[expect(deprecated, reason = "RingBuf owns its fd for the AsyncFd's whole life")]
    let registered = AsyncFd::new(ring);
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the events ring buffer; no access log");
            return;
        }
    };
    // The kernel wakes us only when a batch is waiting; the tick picks up the rest (and flushes
    // the proxy's records too).
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    drain(guard.get_inner_mut(), &log, &shared);
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "events ring buffer poll failed; no access log");
                    return;
                }
            },
            _ = tick.tick() => drain(fd.get_mut(), &log, &shared),
        }
    }
}

/// Writes every waiting record, then flushes once.
fn drain(ring: &mut RingBuf<MapData>, log: &AccessLog, shared: &Shared) {
    if !log.enabled() {
        while ring.next().is_some() {}
        return;
    }
    let published = shared.state.borrow().clone();
    let names = published.compiled.as_ref().map(|c| &c.names);
    let mut lines = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(event) = weft_common::from_bytes::<ConnEvent>(&item)
            && let Ok(line) = serde_json::to_string(&record(&event, names))
        {
            lines.push(line);
        }
    }
    log.write_all(lines);
    log.flush();
}
