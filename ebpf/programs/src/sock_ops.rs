//! `sock_ops`: per-connection accounting, original-destination re-keying for the proxy, and
//! joining the sockhash for same-node redirect.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_ops,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use weft_common::{
    CONN_F_ESTABLISHED, CONN_F_HANDOFF, CONN_F_REDIRECT, ConnEvent, ConnMeta, Counter, FlowKey,
    FlowStats, NODE_F_SKMSG, OrigDst, REPORTER_DESTINATION, REPORTER_SOURCE, RTT_BUCKET_SHIFT,
    RTT_BUCKETS, SkState, TupleKey, WL_F_LOCAL, WL_F_MESHED, v4_mapped,
};

use crate::maps::{
    CONNS, EVENTS, FLOWS, ORIG_DST, SK_STATE, SOCKHASH, count, node_config, workload_at,
};

const AF_INET: u32 = 2;
/// Wake the agent only once this many bytes of records wait (it also drains on a timer): one
/// wakeup per batch instead of one per closed connection.
const EVENTS_WAKEUP_BYTES: u64 = 16 * 1024;
// include/net/tcp_states.h
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    // Observational only: nothing here may change how the connection behaves, so errors are
    // counted and the return value stays "ok".
    if let Err(counter) = try_sock_ops(&ctx) {
        count(counter);
    }
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), Counter> {
    if ctx.family() != AF_INET {
        return Ok(());
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx, REPORTER_SOURCE),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(ctx, REPORTER_DESTINATION),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(ctx),
        _ => Ok(()),
    }
}

/// This socket's tuple, ports in host order.
#[inline(always)]
fn tuple(ctx: &SockOpsContext) -> TupleKey {
    TupleKey {
        local: v4_mapped(ctx.local_ip4()),
        remote: v4_mapped(ctx.remote_ip4()),
        // local_port is host order; remote_port is network order shifted left by 16 on
        // little-endian (net/core/filter.c, sock_ops_convert_ctx_access).
        local_port: ctx.local_port() as u16,
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        _pad: 0,
    }
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: sock_ops programs may ask for the cookie of their socket.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// The local port is bound now and the SYN not yet sent: re-key a handed-off connection's
/// original destination by tuple, which is all the proxy can see when it accepts.
fn on_connect(ctx: &SockOpsContext) -> Result<(), Counter> {
    // SAFETY: value copied out at once.
    let Some(meta) = (unsafe { CONNS.get(&cookie(ctx)) }).copied() else {
        return Ok(());
    };
    if meta.flags & CONN_F_HANDOFF == 0 {
        return Ok(());
    }
    let orig = OrigDst {
        addr: meta.orig_addr,
        port: meta.orig_port,
        src_workload: meta.src_workload,
        svc_id: meta.svc_id,
        ..OrigDst::default()
    };
    ORIG_DST
        .insert(&tuple(ctx), &orig, BPF_ANY as u64)
        .map_err(|_| Counter::OrigDstInsertFailed)
}

fn on_established(ctx: &SockOpsContext, reporter: u8) -> Result<(), Counter> {
    let cookie = cookie(ctx);
    let tuple = tuple(ctx);
    let local = workload_at(&tuple.local);
    let remote = workload_at(&tuple.remote);
    // SAFETY: value copied out at once.
    let mut meta = match (reporter, unsafe { CONNS.get(&cookie) }.copied()) {
        (REPORTER_SOURCE, Some(meta)) => meta,
        (REPORTER_SOURCE, None) => ConnMeta {
            orig_addr: tuple.remote,
            orig_port: tuple.remote_port,
            src_workload: local.id,
            dst_workload: remote.id,
            port: tuple.remote_port,
            ..ConnMeta::default()
        },
        _ => ConnMeta {
            orig_addr: tuple.local,
            orig_port: tuple.local_port,
            src_workload: remote.id,
            dst_workload: local.id,
            port: tuple.local_port,
            ..ConnMeta::default()
        },
    };
    meta.reporter = reporter;
    meta.flags |= CONN_F_ESTABLISHED;
    // SAFETY: helper without arguments.
    meta.start_ns = unsafe { bpf_ktime_get_ns() };

    // Same-node fast path: both ends meshed on this node and no proxy in between.
    let node = node_config();
    if node.flags & NODE_F_SKMSG != 0
        && meta.flags & CONN_F_HANDOFF == 0
        && remote.flags & (WL_F_LOCAL | WL_F_MESHED) == WL_F_LOCAL | WL_F_MESHED
    {
        join_sockhash(ctx, &tuple, &mut meta);
    }

    CONNS.insert(&cookie, &meta, 0).map_err(|_| Counter::MetaInsertFailed)?;
    count(Counter::SockOpsEstablished);
    if let Some(stats) = flow_stats(&meta) {
        add(stats, |s| &mut s.opened, 1);
    }
    // Ask for state changes so the close is seen.
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .map_err(|_| Counter::MetaInsertFailed)
}

#[inline(always)]
fn join_sockhash(ctx: &SockOpsContext, tuple: &TupleKey, meta: &mut ConnMeta) {
    // The state goes in first: sk_msg treats a peer without state as "not redirectable".
    if SK_STATE.insert(tuple, &SkState::default(), BPF_ANY as u64).is_err() {
        count(Counter::SockhashInsertFailed);
        return;
    }
    let mut key = *tuple;
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this callback.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if SOCKHASH.update(&mut key, ops, BPF_ANY as u64).is_ok() {
        meta.flags |= CONN_F_REDIRECT;
        count(Counter::SockhashInserted);
    } else {
        let _ = SK_STATE.remove(tuple);
        count(Counter::SockhashInsertFailed);
    }
}

fn on_close(ctx: &SockOpsContext) -> Result<(), Counter> {
    let cookie = cookie(ctx);
    // SAFETY: value copied out at once.
    let Some(meta) = (unsafe { CONNS.get(&cookie) }).copied() else {
        return Ok(());
    };
    let tuple = tuple(ctx);
    let ops = ctx.ops;
    // SAFETY: reading the kernel's bpf_sock_ops fields for this callback.
    let (acked, received, segs_out, segs_in, retrans, srtt8) = unsafe {
        (
            (*ops).bytes_acked,
            (*ops).bytes_received,
            (*ops).segs_out,
            (*ops).segs_in,
            (*ops).total_retrans,
            (*ops).srtt_us,
        )
    };
    // tcp_sock keeps srtt_us scaled by 8.
    let srtt_us = srtt8 >> 3;
    let (mut redir_tx, mut redir_rx) = (0, 0);
    if meta.flags & CONN_F_REDIRECT != 0 {
        // SAFETY: value copied out at once.
        if let Some(state) = unsafe { SK_STATE.get(&tuple) } {
            redir_tx = state.redir_tx;
            redir_rx = state.redir_rx;
        }
        let _ = SK_STATE.remove(&tuple);
    }
    // The kernel's byte counters include the SYN and FIN sequence numbers. The state the socket
    // leaves tells which of them were exchanged; only the connecting side's counter holds its
    // SYN (a passive socket starts with the handshake already acked).
    let (fin_acked, fin_received) = match ctx.arg(0) {
        TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK => (1, 1),
        TCP_CLOSE_WAIT => (0, 1),
        _ => (0, 0),
    };
    let syn = u64::from(meta.reporter == REPORTER_SOURCE);
    let sent = acked.saturating_sub(syn + fin_acked) + redir_tx;
    let received = received.saturating_sub(fin_received) + redir_rx;
    // SAFETY: helper without arguments.
    let duration = unsafe { bpf_ktime_get_ns() }.saturating_sub(meta.start_ns);

    if let Some(stats) = flow_stats(&meta) {
        add(stats, |s| &mut s.closed, 1);
        add(stats, |s| &mut s.bytes_sent, sent);
        add(stats, |s| &mut s.bytes_received, received);
        add(stats, |s| &mut s.segs_out, u64::from(segs_out));
        add(stats, |s| &mut s.segs_in, u64::from(segs_in));
        add(stats, |s| &mut s.retransmits, u64::from(retrans));
        add(stats, |s| &mut s.duration_ns, duration);
        add(stats, |s| &mut s.redirected_bytes, redir_tx + redir_rx);
        add(stats, |s| &mut s.rtt_sum_us, u64::from(srtt_us));
        let bucket = rtt_bucket(srtt_us);
        // SAFETY: `stats` points into a live map value; the index is bounded.
        if let Some(slot) = unsafe { (*stats).rtt_buckets.get_mut(bucket) } {
            *slot += 1;
        }
    }

    if let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) {
        entry.write(ConnEvent {
            local: tuple.local,
            remote: tuple.remote,
            orig_addr: meta.orig_addr,
            local_port: tuple.local_port,
            remote_port: tuple.remote_port,
            orig_port: meta.orig_port,
            flags: meta.flags,
            src_workload: meta.src_workload,
            dst_workload: meta.dst_workload,
            svc_id: meta.svc_id,
            reporter: meta.reporter,
            _pad: [0; 3],
            bytes_sent: sent,
            bytes_received: received,
            segs_out,
            segs_in,
            retransmits: retrans,
            srtt_us,
            duration_ns: duration,
            redirected_bytes: redir_tx + redir_rx,
        });
        let queued = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
        let wakeup = if queued >= EVENTS_WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
        entry.submit(u64::from(wakeup));
    } else {
        count(Counter::EventDropped);
    }

    let _ = CONNS.remove(&cookie);
    if meta.flags & CONN_F_HANDOFF != 0 {
        let _ = ORIG_DST.remove(&tuple);
    }
    count(Counter::SockOpsClosed);
    Ok(())
}

/// This CPU's counters of the flow, created on first use.
#[inline(always)]
fn flow_stats(meta: &ConnMeta) -> Option<*mut FlowStats> {
    let key = FlowKey {
        src_workload: meta.src_workload,
        dst_workload: meta.dst_workload,
        svc_id: meta.svc_id,
        port: meta.port,
        reporter: meta.reporter,
        _pad: 0,
    };
    if let Some(stats) = FLOWS.get_ptr_mut(&key) {
        return Some(stats);
    }
    // Another CPU may create it first; NOEXIST keeps the counts it has.
    let _ = FLOWS.insert(&key, &FlowStats::default(), BPF_NOEXIST as u64);
    let stats = FLOWS.get_ptr_mut(&key);
    if stats.is_none() {
        count(Counter::FlowInsertFailed);
    }
    stats
}

#[inline(always)]
fn add(stats: *mut FlowStats, field: impl FnOnce(&mut FlowStats) -> &mut u64, value: u64) {
    // SAFETY: `stats` is this CPU's slot of a live per-CPU map value; nothing else writes it
    // while the program runs.
    unsafe { *field(&mut *stats) += value };
}

/// Bucket `i` holds RTTs below `2^(i + RTT_BUCKET_SHIFT)` µs; the last one is open-ended.
#[inline(always)]
fn rtt_bucket(srtt_us: u32) -> usize {
    let mut rest = srtt_us >> RTT_BUCKET_SHIFT;
    let mut bucket = 0;
    while rest > 0 && bucket < RTT_BUCKETS - 1 {
        rest >>= 1;
        bucket += 1;
    }
    bucket
}
