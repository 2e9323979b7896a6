//! `sk_msg`: same-node redirect between two meshed sockets, skipping the TCP stack. Attached to
//! the sockhash; only sockets that `sock_ops` put there run it.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use weft_common::{
    Counter, SK_MODE_REDIRECT, SK_MODE_TCP, SK_MODE_UNDECIDED, SkState, TupleKey, v4_mapped,
};

use crate::maps::{SK_STATE, SOCKHASH, count};

#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    // Fall back to TCP on any doubt: the data still arrives, only slower.
    match try_sk_msg(&ctx) {
        Ok(verdict) => verdict,
        Err(()) => {
            count(Counter::SkMsgPassed);
            SK_PASS
        }
    }
}

fn try_sk_msg(ctx: &SkMsgContext) -> Result<u32, ()> {
    let md = ctx.msg;
    // SAFETY: reading the kernel's sk_msg_md for this call.
    let (local_ip, remote_ip, local_port, remote_port) =
        unsafe { ((*md).local_ip4, (*md).remote_ip4, (*md).local_port, (*md).remote_port) };
    // Same encoding as sock_ops: local port host order, remote port network order << 16.
    let own = TupleKey {
        local: v4_mapped(local_ip),
        remote: v4_mapped(remote_ip),
        local_port: local_port as u16,
        remote_port: u16::from_be((remote_port >> 16) as u16),
        _pad: 0,
    };
    let mut peer = TupleKey {
        local: own.remote,
        remote: own.local,
        local_port: own.remote_port,
        remote_port: own.local_port,
        _pad: 0,
    };
    let state = SK_STATE.get_ptr_mut(&own).ok_or(())?;
    // SAFETY: `state` points into a live map value; only this socket's sends write `mode`
    // and `redir_tx`, and the socket lock serialises them.
    let state: &mut SkState = unsafe { &mut *state };
    if state.mode == SK_MODE_UNDECIDED {
        state.mode = if SK_STATE.get_ptr(&peer).is_some() { SK_MODE_REDIRECT } else { SK_MODE_TCP };
    }
    if state.mode != SK_MODE_REDIRECT {
        return Err(());
    }
    let size = u64::from(ctx.size());
    if SOCKHASH.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) as u32 != SK_PASS {
        // Peer socket gone (closing): nothing left to deliver to, let TCP handle it.
        return Err(());
    }
    state.redir_tx += size;
    if let Some(peer_state) = SK_STATE.get_ptr_mut(&peer) {
        // SAFETY: live map value, 8-byte aligned. The peer's own sends never touch redir_rx,
        // but the peer may be sent to from two CPUs, hence the atomic add.
        unsafe { crate::atomic::add(&raw mut (*peer_state).redir_rx, size) };
    }
    count(Counter::SkMsgRedirected);
    Ok(SK_PASS)
}
