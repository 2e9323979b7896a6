//! `sk_lookup`: STRICT refusals the client can see. Attached to the network namespace of each
//! meshed workload of this node, it runs when a new connection looks for its listening socket.
//! A SYN the STRICT rule turns away (`ingress::strict_admits`) is refused here: `SK_DROP` fails
//! the lookup and TCP answers with a reset, so a plaintext client from outside the mesh gets
//! "connection refused" at once instead of waiting out its connect timeout. What this program
//! does not see (a namespace the agent could not reach) is still dropped by `weft_ingress`.

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use weft_common::Counter;

use crate::{ingress::strict_admits, maps::count};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    // Fail open: anything but an IPv4 TCP lookup for a STRICT workload goes on as usual.
    // SAFETY: `lookup` is the kernel's context pointer; fields are read at fixed offsets.
    let (family, protocol, src, dst) = unsafe {
        let l = &*ctx.lookup;
        (l.family, l.protocol, l.remote_ip4, l.local_ip4)
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    match strict_admits(src, dst) {
        Some(false) => {
            count(Counter::StrictRefused);
            sk_action::SK_DROP
        }
        _ => sk_action::SK_PASS,
    }
}
