//! Keeping the kernel maps equal to the compiled config, writing only what differs.
//!
//! Order matters for connections made while we write: workloads and cgroups first (so a newly
//! attached program knows its workload), policy before services (a service never turns
//! default-deny before its allow entries exist), backends before the service value that points
//! at them, and orphans swept last.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Pod,
    maps::{HashMap, MapData},
};
use serde::Serialize;
use weft_common::{
    BackendKey, NODE_F_SKMSG, SLOT_HALF, ServiceValue,
    maps::{BACKENDS, CGROUPS, NODE_CONFIG, POLICY, SERVICES, WORKLOAD_IPS},
};
use weft_policy::Compiled;

use crate::{Datapath, Error, attach::cgroup_id};

/// What one apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub attached: usize,
    pub detached: usize,
    /// Workloads that could not be attached (missing cgroup, ...), with the reason.
    pub errors: Vec<String>,
    /// Attached workloads whose network namespace is not known yet (no process in the cgroup):
    /// `weft_sk_lookup` waits for the next try.
    pub netns_pending: usize,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.writes + self.deletes + self.attached + self.detached > 0
    }
}

impl Datapath {
    /// Makes the maps and attachments match `compiled`.
    pub fn apply(&mut self, compiled: &Compiled) -> Result<SyncReport, Error> {
        let mut report = SyncReport::default();

        let mut node = compiled.node;
        if !self.skmsg_active {
            node.flags &= !NODE_F_SKMSG;
        }
        if self.maps.node.get(&0, 0).map_err(Error::map(NODE_CONFIG))? != node {
            self.maps.node.set(0, node, 0).map_err(Error::map(NODE_CONFIG))?;
            report.writes += 1;
        }

        sync_map(&mut self.maps.workload_ips, &compiled.workload_ips, WORKLOAD_IPS, &mut report)?;
        self.sync_attachments(compiled, &mut report)?;
        sync_map(&mut self.maps.policy, &compiled.policy, POLICY, &mut report)?;
        self.sync_services(compiled, &mut report)?;
        Ok(report)
    }

    fn sync_attachments(&mut self, compiled: &Compiled, report: &mut SyncReport) -> Result<(), Error> {
        let mut wanted = BTreeMap::new();
        for (key, attachment) in &compiled.attachments {
            match cgroup_id(&attachment.cgroup) {
                Ok(id) => {
                    wanted.insert(id, (key, attachment));
                }
                Err(e) => report.errors.push(format!(
                    "workload {key}: cgroup {} not usable: {e}; does the directory exist under the cgroup v2 mount?",
                    attachment.cgroup.display()
                )),
            }
        }
        let cgroups = wanted.iter().map(|(id, (_, a))| (*id, a.value)).collect();
        sync_map(&mut self.maps.cgroups, &cgroups, CGROUPS, report)?;

        for (id, (key, attachment)) in &wanted {
            if self.attached.get(id).is_some_and(|p| !p.as_os_str().is_empty()) {
                continue;
            }
            let adopted = self.attached.contains_key(id);
            match self.attach(key, &attachment.cgroup) {
                Ok(_) if adopted => {}
                Ok(_) => report.attached += 1,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        report.netns_pending = self.attach_pending_netns(&mut report.errors);
        let gone: Vec<u64> = self.attached.keys().filter(|id| !wanted.contains_key(id)).copied().collect();
        for id in gone {
            self.detach(id)?;
            report.detached += 1;
        }
        Ok(())
    }

    fn sync_services(&mut self, compiled: &Compiled, report: &mut SyncReport) -> Result<(), Error> {
        let maps = &mut self.maps;
        let current = collect(&maps.services, SERVICES)?;
        for (key, want) in &compiled.services {
            let existing = current.get(key);
            if let Some(cur) = existing
                && same_service(cur, &want.value)
                && backends_equal(&maps.backends, cur, &want.backends)?
            {
                continue;
            }
            // Fill the half the kernel is not reading, then switch with one update.
            let half = existing.map_or(0, |cur| cur.slot_base ^ SLOT_HALF);
            for (i, backend) in want.backends.iter().enumerate() {
                let slot = half + i as u32;
                let key = BackendKey { port_id: want.value.port_id, slot };
                maps.backends.insert(key, backend, 0).map_err(Error::map(BACKENDS))?;
                report.writes += 1;
            }
            let value = ServiceValue { slot_base: half, ..want.value };
            maps.services.insert(key, value, 0).map_err(Error::map(SERVICES))?;
            report.writes += 1;
        }
        for key in current.keys().filter(|k| !compiled.services.contains_key(k)) {
            maps.services.remove(key).map_err(Error::map(SERVICES))?;
            report.deletes += 1;
        }

        // Sweep backends no service points at any more (old halves, removed services, and
        // leftovers of an agent that died mid-update).
        let live: BTreeMap<u32, ServiceValue> =
            collect(&maps.services, SERVICES)?.into_values().map(|v| (v.port_id, v)).collect();
        let keys: Vec<BackendKey> = maps.backends.keys().collect::<Result<_, _>>().map_err(Error::map(BACKENDS))?;
        for key in keys {
            let in_use = live
                .get(&key.port_id)
                .is_some_and(|v| key.slot >= v.slot_base && key.slot < v.slot_base + v.count);
            if !in_use {
                maps.backends.remove(&key).map_err(Error::map(BACKENDS))?;
                report.deletes += 1;
            }
        }
        Ok(())
    }
}

fn same_service(cur: &ServiceValue, want: &ServiceValue) -> bool {
    ServiceValue { slot_base: 0, ..*cur } == ServiceValue { slot_base: 0, ..*want }
}

fn backends_equal(
    backends: &HashMap<MapData, BackendKey, weft_common::BackendValue>,
    cur: &ServiceValue,
    want: &[weft_common::BackendValue],
) -> Result<bool, Error> {
    for (i, b) in want.iter().enumerate() {
        let key = BackendKey { port_id: cur.port_id, slot: cur.slot_base + i as u32 };
        match backends.get(&key, 0) {
            Ok(found) if found == *b => {}
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(Error::Map { name: BACKENDS, source: e }),
        }
    }
    Ok(true)
}

fn collect<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BTreeMap<K, V>, Error> {
    map.iter().collect::<Result<_, _>>().map_err(Error::map(name))
}

/// Writes entries that differ, deletes entries not wanted.
fn sync_map<K: Pod + Ord, V: Pod + PartialEq>(
    map: &mut HashMap<MapData, K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
    report: &mut SyncReport,
) -> Result<(), Error> {
    let current = collect(map, name)?;
    for (key, value) in desired {
        if current.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(Error::map(name))?;
            report.writes += 1;
        }
    }
    let stale: BTreeSet<&K> = current.keys().filter(|k| !desired.contains_key(k)).collect();
    for key in stale {
        map.remove(key).map_err(Error::map(name))?;
        report.deletes += 1;
    }
    Ok(())
}
