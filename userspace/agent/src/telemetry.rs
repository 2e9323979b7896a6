//! Metrics: the agent's own, plus L4 flows and kernel counters read from the maps at scrape
//! time (the kernel's counts are the source of truth and survive agent restarts).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, NoLabelSet},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use tokio::sync::watch;
use weft_common::{FlowKey, REPORTER_SOURCE, RTT_BUCKET_SHIFT, RTT_BUCKETS};
use weft_datapath::{Datapath, SyncReport};
use weft_policy::Names;

use crate::state::Published;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub proxy: Arc<weft_proxy::Metrics>,
    pub tunnel: Arc<weft_proxy::tunnel::TunnelMetrics>,
    pub memory: crate::memory::Metrics,
    reloads: Family<ResultLabels, Counter>,
    syncs: Family<ResultLabels, Counter>,
    map_writes: Counter,
    attach_errors: Gauge,
}

impl Metrics {
    pub fn new(datapath: Arc<Mutex<Datapath>>, state: watch::Receiver<Arc<Published>>) -> Self {
        let mut registry = Registry::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let syncs = Family::<ResultLabels, Counter>::default();
        let map_writes = Counter::default();
        let attach_errors = Gauge::default();
        let agent = registry.sub_registry_with_prefix("weft_agent");
        agent.register("config_reloads", "Config directory loads, by result (applied, rejected).", reloads.clone());
        let dp = registry.sub_registry_with_prefix("weft_datapath");
        dp.register("syncs", "Datapath syncs, by result.", syncs.clone());
        dp.register("map_writes", "Map entries written or deleted by the syncer.", map_writes.clone());
        dp.register("attach_errors", "Workloads whose cgroup could not be attached at the last sync.", attach_errors.clone());
        registry.register_collector(Box::new(KernelCollector { datapath, state }));
        let proxy = Arc::new(weft_proxy::Metrics::register(&mut registry));
        let tunnel = Arc::new(weft_proxy::tunnel::TunnelMetrics::register(&mut registry));
        let memory = crate::memory::Metrics::register(&mut registry);
        Metrics { registry, proxy, tunnel, memory, reloads, syncs, map_writes, attach_errors }
    }

    pub fn config_reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn synced(&self, report: &SyncReport) {
        self.syncs.get_or_create(&ResultLabels { result: "ok" }).inc();
        self.map_writes.inc_by((report.writes + report.deletes) as u64);
        self.attach_errors.set(report.errors.len() as i64);
    }

    pub fn sync_failed(&self) {
        self.syncs.get_or_create(&ResultLabels { result: "error" }).inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Flow labels as a Prometheus/Kiali user expects them (Istio's names where they exist).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_port: String,
}

const UNKNOWN: &str = "unknown";

fn flow_labels(key: &FlowKey, names: Option<&Names>) -> FlowLabels {
    let workload = |id: u32| names.and_then(|n| n.workloads.get(&id));
    let src = workload(key.src_workload);
    let dst = workload(key.dst_workload);
    let svc = names.and_then(|n| n.services.get(&key.svc_id));
    let name = |o: Option<String>| o.unwrap_or_else(|| UNKNOWN.to_owned());
    FlowLabels {
        reporter: if key.reporter == REPORTER_SOURCE { "source" } else { "destination" },
        source_workload: name(src.map(|w| w.id.name.clone())),
        source_workload_namespace: name(src.map(|w| w.id.namespace.clone())),
        source_principal: name(src.map(|w| {
            format!("spiffe://cluster.local/ns/{}/sa/{}", w.id.namespace, w.service_account)
        })),
        destination_workload: name(dst.map(|w| w.id.name.clone())),
        destination_workload_namespace: name(dst.map(|w| w.id.namespace.clone())),
        destination_service: name(svc.map(|s| format!("{}.{}.svc.cluster.local", s.name, s.namespace))),
        destination_service_name: name(svc.map(|s| s.name.clone())),
        destination_service_namespace: name(svc.map(|s| s.namespace.clone())),
        destination_port: key.port.to_string(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    hook: &'static str,
    event: &'static str,
}

struct KernelCollector {
    datapath: Arc<Mutex<Datapath>>,
    state: watch::Receiver<Arc<Published>>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (flows, counters, attached) = {
            let dp = self.datapath.lock().unwrap_or_else(|p| p.into_inner());
            (dp.flows().unwrap_or_default(), dp.counters().unwrap_or_default(), dp.attached().len())
        };
        let published = self.state.borrow().clone();
        let names = published.compiled.as_ref().map(|c| &c.names);

        let gauge = ConstGauge::new(attached as i64);
        gauge.encode(encoder.encode_descriptor(
            "weft_datapath_attached_workloads",
            "Meshed cgroups with weft's programs attached.",
            None,
            gauge.metric_type(),
        )?)?;

        let mut events = encoder.encode_descriptor(
            "weft_datapath_events",
            "Kernel program verdicts and error paths, by hook.",
            None,
            MetricType::Counter,
        )?;
        for (counter, value) in counters {
            let (hook, event) = counter.describe();
            ConstCounter::new(value).encode(events.encode_family(&EventLabels { hook, event })?)?;
        }

        let labelled: Vec<_> = flows.iter().map(|f| (flow_labels(&f.key, names), f.stats)).collect();
        type Field = fn(&weft_common::FlowStats) -> f64;
        let counters: [(&str, &str, Field); 7] = [
            ("weft_l4_connections_opened", "TCP connections opened.", |s| s.opened as f64),
            ("weft_l4_connections_closed", "TCP connections closed.", |s| s.closed as f64),
            ("weft_l4_sent_bytes", "Bytes sent by the reporter (acked TCP payload plus redirected bytes), counted at close.", |s| s.bytes_sent as f64),
            ("weft_l4_received_bytes", "Bytes received by the reporter, counted at close.", |s| s.bytes_received as f64),
            ("weft_l4_retransmits", "TCP segments retransmitted.", |s| s.retransmits as f64),
            ("weft_l4_redirected_bytes", "Bytes moved by the same-node sk_msg redirect, counted at close.", |s| s.redirected_bytes as f64),
            ("weft_l4_connection_duration_seconds", "Total lifetime of closed connections.", |s| s.duration_ns as f64 / 1e9),
        ];
        for (name, help, field) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, stats) in &labelled {
                ConstCounter::new(field(stats)).encode(family.encode_family(labels)?)?;
            }
        }

        let mut rtt = encoder.encode_descriptor(
            "weft_l4_rtt_seconds",
            "Smoothed TCP round-trip time of closed connections.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, stats) in &labelled {
            let buckets: Vec<(f64, u64)> = (0..RTT_BUCKETS)
                .map(|i| {
                    let upper = if i == RTT_BUCKETS - 1 {
                        f64::INFINITY
                    } else {
                        f64::from(1u32 << (i as u32 + RTT_BUCKET_SHIFT)) / 1e6
                    };
                    (upper, stats.rtt_buckets[i])
                })
                .collect();
            rtt.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                stats.rtt_sum_us as f64 / 1e6,
                stats.closed,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}
