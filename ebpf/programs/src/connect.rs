//! `cgroup/connect4` and `cgroup/getpeername4`: service load balancing, handoff to the node
//! proxy, L4 deny, and keeping the VIP visible to the application.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use weft_common::{
    BACKEND_SEARCH_STEPS, BackendKey, BackendValue, CONN_F_HANDOFF, CONN_F_VIP, ConnMeta,
    Counter, NODE_F_PROXY, POLICY_ALLOW, POLICY_DENY, PROTO_TCP, PolicyKey, REPORTER_SOURCE,
    SVC_F_DEFAULT_DENY, SVC_F_HANDOFF, ServiceKey, ServiceValue, WL_F_STRICT, WL_F_TUNNEL, as_v4,
    v4_mapped,
};

use crate::maps::{BACKENDS, CGROUPS, CONNS, POLICY, SERVICES, count, node_config, workload_at};

/// cgroup sock_addr return values.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
const ECONNREFUSED: i32 = 111;
/// Deepest cgroup level searched for a meshed ancestor (containers below the pod cgroup).
const MAX_CGROUP_DEPTH: i32 = 16;

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    // Fail open: a weft error must never break an application's connect. The connect then
    // goes where the application asked, and the error is counted.
    match try_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(counter) => {
            count(counter);
            ALLOW
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, Counter> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid context for the duration of the program.
    let (sock_type, ip, port_be) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if sock_type != SOCK_STREAM {
        return Ok(ALLOW);
    }
    // user_port holds the port in network order in its low 16 bits.
    let port = u16::from_be(port_be as u16);
    let vip = v4_mapped(ip);
    let key = ServiceKey { addr: vip, port, proto: PROTO_TCP, _pad: 0 };
    // SAFETY: the value is copied out at once; user space replaces whole values atomically.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return tunnel(ctx, ip, port);
    };

    let src_workload = current_workload();
    if denied(src_workload, &svc) {
        count(Counter::ConnectDenied);
        return Ok(REJECT); // the caller sees EPERM
    }

    // SAFETY: sock_addr programs may ask for the socket cookie of their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut meta = ConnMeta {
        orig_addr: vip,
        orig_port: port,
        flags: CONN_F_VIP,
        src_workload,
        svc_id: svc.svc_id,
        port,
        reporter: REPORTER_SOURCE,
        ..ConnMeta::default()
    };

    if svc.flags & SVC_F_HANDOFF != 0 {
        let node = node_config();
        if node.flags & NODE_F_PROXY == 0 {
            // L7 wanted but no proxy on this node: plain balancing beats a failed connect.
            count(Counter::ConnectNoProxy);
        } else if let Some(proxy_ip) = as_v4(&node.proxy_addr) {
            meta.flags |= CONN_F_HANDOFF;
            // Without the record the proxy cannot tell where the connection was going.
            CONNS
                .insert(&cookie, &meta, 0)
                .map_err(|_| Counter::MetaInsertFailed)?;
            // SAFETY: writable context fields of connect4.
            unsafe {
                (*sa).user_ip4 = proxy_ip;
                (*sa).user_port = u32::from(node.proxy_port.to_be());
            }
            count(Counter::ConnectHandoff);
            return Ok(ALLOW);
        }
    }

    if svc.count == 0 || svc.total_weight == 0 {
        count(Counter::ConnectNoBackend);
        // SAFETY: cgroup programs may set the syscall's return value (kernel >= 5.18).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return Ok(REJECT);
    }
    let backend = pick_backend(&svc)?;
    let Some(backend_ip) = as_v4(&backend.addr) else {
        return Err(Counter::ConnectBackendMissing);
    };
    meta.dst_workload = backend.workload_id;
    if CONNS.insert(&cookie, &meta, 0).is_err() {
        // The connection still works; only getpeername and attribution degrade.
        count(Counter::MetaInsertFailed);
    }
    // SAFETY: writable context fields of connect4.
    unsafe {
        (*sa).user_ip4 = backend_ip;
        (*sa).user_port = u32::from(backend.port.to_be());
    }
    count(Counter::ConnectBalanced);
    Ok(ALLOW)
}

/// A connection straight to a workload address (no service): one to a STRICT workload on
/// another node goes to the node proxy, which carries it through the tunnel; plaintext would be
/// dropped at the destination. Everything else is left alone.
#[inline(always)]
fn tunnel(ctx: &SockAddrContext, ip: u32, port: u16) -> Result<i32, Counter> {
    let addr = v4_mapped(ip);
    let wl = workload_at(&addr);
    let node = node_config();
    let proxy_ip = as_v4(&node.proxy_addr);
    let (true, Some(proxy_ip)) = (
        wl.flags & (WL_F_STRICT | WL_F_TUNNEL) == WL_F_STRICT | WL_F_TUNNEL
            && node.flags & NODE_F_PROXY != 0,
        proxy_ip,
    ) else {
        count(Counter::ConnectPassthrough);
        return Ok(ALLOW);
    };
    // SAFETY: sock_addr programs may ask for the socket cookie of their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let meta = ConnMeta {
        orig_addr: addr,
        orig_port: port,
        flags: CONN_F_HANDOFF,
        src_workload: current_workload(),
        dst_workload: wl.id,
        port,
        reporter: REPORTER_SOURCE,
        ..ConnMeta::default()
    };
    CONNS
        .insert(&cookie, &meta, 0)
        .map_err(|_| Counter::MetaInsertFailed)?;
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: writable context fields of connect4.
    unsafe {
        (*sa).user_ip4 = proxy_ip;
        (*sa).user_port = u32::from(node.proxy_port.to_be());
    }
    count(Counter::ConnectTunnel);
    Ok(ALLOW)
}

/// The meshed workload whose process is connecting: its cgroup, or the nearest meshed
/// ancestor (processes may sit in container cgroups below the pod's). 0 if unknown.
#[inline(always)]
fn current_workload() -> u32 {
    // SAFETY: helpers without arguments, valid in cgroup programs.
    let id = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: value copied out at once.
    if let Some(w) = unsafe { CGROUPS.get(&id) } {
        return w.id;
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level >= 0 {
        // SAFETY: returns 0 for levels deeper than the current cgroup.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor != 0 {
            // SAFETY: value copied out at once.
            if let Some(w) = unsafe { CGROUPS.get(&ancestor) } {
                return w.id;
            }
        }
        level -= 1;
    }
    0
}

/// DENY entries win; with an ALLOW policy on the service, only allowed sources pass.
#[inline(always)]
fn denied(src_workload: u32, svc: &ServiceValue) -> bool {
    let key = PolicyKey { src_workload, port_id: svc.port_id };
    // SAFETY: value copied out at once.
    match unsafe { POLICY.get(&key) }.copied() {
        Some(POLICY_DENY) => true,
        Some(POLICY_ALLOW) => false,
        _ => svc.flags & SVC_F_DEFAULT_DENY != 0,
    }
}

/// Weighted pick: a random point in `[0, total_weight)`, found by binary search over the
/// backends' cumulative weights.
#[inline(always)]
fn pick_backend(svc: &ServiceValue) -> Result<BackendValue, Counter> {
    // SAFETY: helper without arguments.
    let point = unsafe { bpf_get_prandom_u32() } % svc.total_weight;
    let (mut lo, mut hi) = (0u32, svc.count);
    let mut step = 0;
    while step < BACKEND_SEARCH_STEPS && lo < hi {
        let mid = lo + (hi - lo) / 2;
        let key = BackendKey { port_id: svc.port_id, slot: svc.slot_base + mid };
        // SAFETY: value copied out at once.
        let end = unsafe { BACKENDS.get(&key) }
            .map(|b| b.weight_end)
            .ok_or(Counter::ConnectBackendMissing)?;
        if end > point {
            hi = mid;
        } else {
            lo = mid + 1;
        }
        step += 1;
    }
    let key = BackendKey { port_id: svc.port_id, slot: svc.slot_base + lo };
    // SAFETY: value copied out at once.
    unsafe { BACKENDS.get(&key) }.copied().ok_or(Counter::ConnectBackendMissing)
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    // Must always allow: getpeername cannot be refused. Errors just show the real peer.
    getpeername4(&ctx);
    ALLOW
}

#[inline(always)]
fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: sock_addr programs may ask for the socket cookie of their context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Only sockets this workload connected carry CONN_F_VIP; accepted sockets have their own
    // cookie and a destination-side record, so they keep showing their real peer.
    // SAFETY: value copied out at once.
    let Some(meta) = (unsafe { CONNS.get(&cookie) }).copied() else {
        return;
    };
    if meta.flags & CONN_F_VIP == 0 || meta.reporter != REPORTER_SOURCE {
        return;
    }
    let Some(vip) = as_v4(&meta.orig_addr) else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: writable context fields of getpeername4.
    unsafe {
        (*sa).user_ip4 = vip;
        (*sa).user_port = u32::from(meta.orig_port.to_be());
    }
    count(Counter::PeerNameRewritten);
}
