//! Reading what the kernel counted: flows, counters, original destinations.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use weft_common::{
    Counter, FlowKey, FlowStats, OrigDst, RTT_BUCKETS, TupleKey, as_v4, maps as names, v4_mapped,
};

use crate::{Datapath, Error};

/// A flow's counters summed over CPUs.
#[derive(Clone, Copy, Debug)]
pub struct FlowRecord {
    pub key: FlowKey,
    pub stats: FlowStats,
}

impl Datapath {
    /// Every flow the kernel has counted (per-CPU values summed).
    pub fn flows(&self) -> Result<Vec<FlowRecord>, Error> {
        let mut out = Vec::new();
        for entry in self.maps.flows.iter() {
            let (key, per_cpu) = entry.map_err(Error::map(names::FLOWS))?;
            let mut stats = FlowStats::default();
            for s in per_cpu.iter() {
                stats.opened += s.opened;
                stats.closed += s.closed;
                stats.bytes_sent += s.bytes_sent;
                stats.bytes_received += s.bytes_received;
                stats.segs_out += s.segs_out;
                stats.segs_in += s.segs_in;
                stats.retransmits += s.retransmits;
                stats.duration_ns += s.duration_ns;
                stats.redirected_bytes += s.redirected_bytes;
                stats.rtt_sum_us += s.rtt_sum_us;
                for i in 0..RTT_BUCKETS {
                    stats.rtt_buckets[i] += s.rtt_buckets[i];
                }
            }
            out.push(FlowRecord { key, stats });
        }
        Ok(out)
    }

    /// Every kernel counter, summed over CPUs. A counters map pinned by an older agent has no
    /// slot for counters added since (until the instance's pins are removed): those are left out.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, Error> {
        let mut out = Vec::with_capacity(Counter::ALL.len());
        for c in Counter::ALL {
            match self.maps.counters.get(&(c as u32), 0) {
                Ok(values) => out.push((c, values.iter().sum())),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::Map { name: names::COUNTERS, source: e }),
            }
        }
        Ok(out)
    }

    /// The original destination of a connection handed to the proxy.
    pub fn orig_dst(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<OrigDstRecord> {
        lookup(&self.maps.orig_dst, client, listener)
    }
}

/// What a proxy learns about a handed-off connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDstRecord {
    pub dst: SocketAddrV4,
    pub src_workload: u32,
    pub svc_id: u32,
}

fn lookup(
    map: &HashMap<MapData, TupleKey, OrigDst>,
    client: SocketAddrV4,
    listener: SocketAddrV4,
) -> Option<OrigDstRecord> {
    let key = TupleKey {
        local: v4_mapped(u32::from_ne_bytes(client.ip().octets())),
        remote: v4_mapped(u32::from_ne_bytes(listener.ip().octets())),
        local_port: client.port(),
        remote_port: listener.port(),
        _pad: 0,
    };
    let found = map.get(&key, 0).ok()?;
    let ip = Ipv4Addr::from(as_v4(&found.addr)?.to_ne_bytes());
    Some(OrigDstRecord {
        dst: SocketAddrV4::new(ip, found.port),
        src_workload: found.src_workload,
        svc_id: found.svc_id,
    })
}

/// Reads original destinations from a pinned map, without loading anything: for a proxy
/// process (or a test listener) next to the agent.
pub struct OrigDstReader {
    map: HashMap<MapData, TupleKey, OrigDst>,
}

impl OrigDstReader {
    pub fn open(pin_root: &Path) -> Result<Self, Error> {
        let path = pin_root.join("maps").join(names::ORIG_DST);
        let data = MapData::from_pin(&path).map_err(Error::map(names::ORIG_DST))?;
        let map = HashMap::try_from(Map::LruHashMap(data)).map_err(Error::map(names::ORIG_DST))?;
        Ok(OrigDstReader { map })
    }

    /// `client` is the accepted socket's peer, `listener` its local address.
    pub fn lookup(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<OrigDstRecord> {
        lookup(&self.map, client, listener)
    }
}
