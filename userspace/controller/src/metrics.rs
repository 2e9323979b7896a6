//! The controller's metrics, served on the admin port's `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum WriteResult {
    /// Applied.
    Written,
    /// The object changed meanwhile (409); it is judged again on the new version.
    Conflict,
    Failed,
}

impl EncodeLabelValue for WriteResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let text = match self {
            WriteResult::Written => "written",
            WriteResult::Conflict => "conflict",
            WriteResult::Failed => "failed",
        };
        EncodeLabelValue::encode(&text, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    /// The object's kind, e.g. HTTPRoute.
    kind: &'static str,
    result: WriteResult,
}

pub struct Metrics {
    registry: Registry,
    leader: Gauge,
    status_writes: Family<WriteLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let leader = Gauge::default();
        let status_writes = Family::<WriteLabels, Counter>::default();
        let sub = registry.sub_registry_with_prefix("weft_controller");
        sub.register("leader", "1 while this replica holds the leader lease.", leader.clone());
        sub.register("status_writes", "Status subresource writes, by kind and result.", status_writes.clone());
        Self { registry, leader, status_writes }
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn status_write(&self, kind: &'static str, result: WriteResult) {
        self.status_writes.get_or_create(&WriteLabels { kind, result }).inc();
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
