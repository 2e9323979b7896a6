//! `cgroup_skb/ingress`: PeerAuthentication STRICT at the destination. A STRICT workload takes
//! new connections only from its node's proxy (the end of the tunnel, which has checked the
//! peer's certificate and policy), from meshed pods of its own node (whose connects the kernel
//! attributed and judged), and from itself. Any other plaintext SYN is dropped, so dialling a
//! pod IP directly from outside the mesh does not bypass mutual TLS. Where the agent reached the
//! workload's network namespace, `weft_sk_lookup` has already refused such a SYN with a reset;
//! this drop is the backstop.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use weft_common::{Counter, WL_F_LOCAL, WL_F_MESHED, WL_F_STRICT, v4_mapped};

use crate::maps::{count, node_config, workload_at};

/// cgroup_skb return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offsets in the IPv4 header (cgroup_skb data starts at the network header).
const IP_PROTO: usize = 9;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS: usize = 13;

#[cgroup_skb]
pub fn weft_ingress(ctx: SkBuffContext) -> i32 {
    // Fail open on anything unreadable: this program must never cut a PERMISSIVE workload or
    // a packet it does not understand. Only a readable SYN to a STRICT workload is judged.
    match try_ingress(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => PASS,
    }
}

#[inline(always)]
fn try_ingress(ctx: &SkBuffContext) -> Result<i32, ()> {
    let version_ihl: u8 = ctx.load(0).map_err(|_| ())?;
    if version_ihl >> 4 != 4 {
        return Ok(PASS);
    }
    let proto: u8 = ctx.load(IP_PROTO).map_err(|_| ())?;
    if proto != IPPROTO_TCP {
        return Ok(PASS);
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let flags: u8 = ctx.load(header_len + TCP_FLAGS).map_err(|_| ())?;
    // Only a connection's first packet is judged: without an accepted SYN there is no
    // connection, and established ones (tunnel streams, replies to our own connects) flow.
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(PASS);
    }
    let dst: u32 = ctx.load(IP_DST).map_err(|_| ())?;
    let src: u32 = ctx.load(IP_SRC).map_err(|_| ())?;
    Ok(match strict_admits(src, dst) {
        None => PASS,
        Some(true) => {
            count(Counter::StrictAdmitted);
            PASS
        }
        Some(false) => {
            count(Counter::StrictDropped);
            DROP
        }
    })
}

/// The STRICT rule, for a new connection from `src` to `dst` (IPv4 addresses as they sit in
/// the packet): `None` when `dst` is not a STRICT workload of this node, else whether the
/// connection is let in. Shared with `weft_sk_lookup`, which refuses what this drops.
#[inline(always)]
pub fn strict_admits(src: u32, dst: u32) -> Option<bool> {
    let target = workload_at(&v4_mapped(dst));
    if target.flags & (WL_F_STRICT | WL_F_LOCAL) != WL_F_STRICT | WL_F_LOCAL {
        return None;
    }
    let loopback = src.to_ne_bytes()[0] == 127;
    let source = workload_at(&v4_mapped(src));
    Some(
        src == dst
            || loopback
            || v4_mapped(src) == node_config().proxy_addr
            || source.flags & (WL_F_LOCAL | WL_F_MESHED) == WL_F_LOCAL | WL_F_MESHED,
    )
}
