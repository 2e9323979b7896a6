//! The backends of one service port: selected workloads plus endpoint-slice addresses.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use weft_common::{BackendValue, MAX_BACKENDS};

use super::{Compiler, ipv4_addr};
use crate::model::{DEFAULT_WEIGHT, EndpointSet, Service, ServicePort, TargetPort, Workload};

impl<'a> Compiler<'a> {
    /// The backends of `svc.ports[index]`, sorted by (address, port) with cumulative weights,
    /// or `None` (after recording why) if the set does not fit the maps.
    pub(super) fn backends(
        &mut self,
        svc: &Service,
        index: usize,
        port: &ServicePort,
        slices: &[&EndpointSet],
    ) -> Option<Vec<BackendValue>> {
        // (address, port) -> weight. A map both sorts and de-duplicates a pod that the selector
        // and a slice both list; the selector goes first, so its workload's weight is kept.
        let mut chosen: BTreeMap<(Ipv4Addr, u16), u32> = BTreeMap::new();
        for wl in self.selected(svc) {
            // Weight 0 drains a workload: no new connections.
            if wl.weight == 0 {
                continue;
            }
            let target = match &port.target_port {
                TargetPort::Number(number) => *number,
                TargetPort::Name(name) => match wl.ports.get(name) {
                    Some(number) => *number,
                    None => {
                        let reason = format!(
                            "Workload {} has no port named \"{name}\" and gets no traffic on port {}; add the name to its spec.ports or use a port number",
                            wl.id, port.port
                        );
                        self.reject("Service", &svc.id, format!("spec.ports[{index}].targetPort"), reason);
                        continue;
                    }
                },
            };
            for &ip in &wl.ips {
                chosen.insert((ip, target), wl.weight);
            }
        }
        for slice in slices {
            let Some(&(_, target)) = slice.ports.iter().find(|(name, _)| same_port_name(name, &port.name)) else {
                continue;
            };
            for endpoint in slice.endpoints.iter().filter(|ep| ep.ready) {
                // The slice names the pod; without a targetRef the address may still be known.
                let workload = endpoint
                    .workload
                    .as_ref()
                    .and_then(|id| self.workloads.get(id))
                    .or_else(|| self.ip_owner.get(&endpoint.ip));
                let weight = workload.map_or(DEFAULT_WEIGHT, |wl| wl.weight);
                if weight > 0 {
                    chosen.entry((endpoint.ip, target)).or_insert(weight);
                }
            }
        }

        let field = format!("spec.ports[{index}]");
        if chosen.len() > MAX_BACKENDS as usize {
            let reason = format!(
                "{} ready backends, but weft supports at most {MAX_BACKENDS} per service port; split the service",
                chosen.len()
            );
            self.reject("Service", &svc.id, field, reason);
            return None;
        }
        let mut weight_end = 0_u32;
        let mut backends = Vec::with_capacity(chosen.len());
        for ((ip, target), weight) in chosen {
            let Some(end) = weight_end.checked_add(weight) else {
                let reason = "the backends' weights add up to more than 4294967295; lower the workloads' weights";
                self.reject("Service", &svc.id, field, reason);
                return None;
            };
            weight_end = end;
            let addr = ipv4_addr(ip);
            let workload_id = self.out.workload_ips.get(&addr).map_or(0, |wl| wl.id);
            backends.push(BackendValue { addr, port: target, _pad: 0, weight_end, workload_id });
        }
        Some(backends)
    }

    /// Accepted workloads in the service's namespace carrying every selector label. A missing
    /// or empty selector selects nothing (the service's backends come from slices only).
    fn selected(&self, svc: &Service) -> Vec<&'a Workload> {
        let Some(selector) = svc.selector.as_ref().filter(|s| !s.is_empty()) else {
            return Vec::new();
        };
        self.workloads
            .values()
            .copied()
            .filter(|wl| wl.id.namespace == svc.id.namespace)
            .filter(|wl| wl.has_labels(selector))
            .collect()
    }
}

/// Port names match exactly; Kubernetes writes an unnamed port as "" or leaves it out.
fn same_port_name(a: &Option<String>, b: &Option<String>) -> bool {
    a.as_deref().unwrap_or("") == b.as_deref().unwrap_or("")
}
