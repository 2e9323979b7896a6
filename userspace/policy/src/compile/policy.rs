//! Authorization policies, enforced in two places.
//!
//! connect4 (on the connecting side) enforces what it can decide from the source workload and
//! the service port. It only sees sources that are local meshed workloads, so only they get
//! entries: DENY entries, and for ports an ALLOW policy selects, default-deny plus ALLOW entries.
//!
//! The node proxy enforces what needs a request: rules with HTTP-only fields, JwtPolicies and
//! selector targets. Their service ports are handed to it (`SVC_F_HANDOFF`). The kernel then
//! only pre-filters those ports: it denies a source when a DENY rule without HTTP-only fields
//! matches it, or when no ALLOW rule could match it whatever the request; everything else is
//! left to the proxy, which evaluates every policy (`Compiled::authz`).
//!
//! Without a proxy on the node, the kernel is the only enforcement and fails closed: the TCP
//! semantics of [`crate::authz`] apply (ALLOW rules with HTTP-only fields match nothing, DENY
//! rules ignore those fields), selector policies apply to whole service ports that have a
//! selected backend, and each such policy gets a rejection saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use weft_common::{POLICY_ALLOW, POLICY_DENY, SVC_F_DEFAULT_DENY, as_v4};

use super::routes::service_key;
use super::{Compiled, Rejection};
use crate::authz::{AuthzTable, L4Verdict, Peer, PortBackends, ProxyOnly, TRUST_DOMAIN};
use crate::model::{AuthorizationPolicy, JwtPolicy, ObjectRef, PolicyTarget, Service, Workload};

/// Fills `out.authz`, the kernel's policy entries and default-deny flags, and returns the
/// service ports the proxy must see.
pub(super) fn apply(
    out: &mut Compiled,
    policies: &[&AuthorizationPolicy],
    jwt_policies: &[&JwtPolicy],
    services: &[&Service],
    workloads: &BTreeMap<&ObjectRef, &Workload>,
    proxy: bool,
) -> BTreeSet<SocketAddrV4> {
    // Judged against the input, not the compiled maps: a headless or rejected service exists,
    // it just has no ports to protect.
    let exists = |ns: &str, name: &str| services.iter().any(|s| s.id.namespace == ns && s.id.name == name);
    for policy in policies {
        if let PolicyTarget::Service(name) = &policy.target
            && !exists(&policy.id.namespace, name)
        {
            let reason = format!("targets Service {}/{name}, which does not exist", policy.id.namespace);
            out.rejected.push(Rejection::unresolved("AuthorizationPolicy", &policy.id, "spec.targetRefs", reason));
        }
    }
    for policy in jwt_policies {
        for target in &policy.targets {
            if let PolicyTarget::Service(name) = target
                && !exists(&policy.id.namespace, name)
            {
                let reason = format!("targets Service {}/{name}, which does not exist", policy.id.namespace);
                out.rejected.push(Rejection::unresolved("JwtPolicy", &policy.id, "spec.targetRefs", reason));
            }
        }
    }

    let table = {
        let ports: Vec<PortBackends<'_>> = out
            .services
            .iter()
            .filter_map(|(key, compiled)| {
                let addr = SocketAddrV4::new(Ipv4Addr::from(as_v4(&key.addr)?.to_ne_bytes()), key.port);
                let backends =
                    compiled.backends.iter().filter_map(|b| out.names.workloads.get(&b.workload_id)).map(|n| &n.id);
                Some(PortBackends { addr, service: &compiled.service, backends: backends.collect() })
            })
            .collect();
        let workloads: Vec<&Workload> = workloads.values().copied().collect();
        AuthzTable::build(policies, jwt_policies, &ports, &workloads)
    };
    let handoff: BTreeSet<SocketAddrV4> = table.proxy_ports().collect();

    if !proxy {
        for (kind, id, why) in table.proxy_only() {
            let (field, reason) = match why {
                ProxyOnly::HttpFields => (
                    "spec.rules",
                    "has rules with HTTP-only fields (methods, paths, hosts, headers, request.* conditions), which \
                     the node proxy enforces, and this node runs none (--proxy-addr); enforced at connect instead, \
                     failing closed: ALLOW rules with them match nothing, DENY rules with them deny whole connections",
                ),
                ProxyOnly::Selector => (
                    "spec.selector",
                    "selects workloads, which the node proxy tells apart, and this node runs none (--proxy-addr); \
                     enforced at connect instead, for every service port with a selected backend",
                ),
                ProxyOnly::Jwt => (
                    "spec.rules",
                    "checks tokens in the node proxy, and this node runs none (--proxy-addr); tokens are not checked, \
                     and request.auth.* conditions match no connection",
                ),
            };
            out.rejected.push(Rejection::new(kind, id, field, reason));
        }
    }

    // Local meshed workloads are exactly the attached ones.
    let sources: Vec<(Peer, u32)> = workloads
        .values()
        .filter_map(|wl| {
            let attachment = out.attachments.get(&wl.id.to_string())?;
            Some((Peer::new(&wl.id.namespace, &wl.service_account, TRUST_DOMAIN), attachment.value.id))
        })
        .collect();
    for (addr, default_deny) in table.l4_ports(!proxy) {
        let Some(compiled) = out.services.get_mut(&service_key(addr)) else { continue };
        if default_deny {
            compiled.value.flags |= SVC_F_DEFAULT_DENY;
        }
        let port_id = compiled.value.port_id;
        let proxied = proxy && handoff.contains(&addr);
        for (peer, src_workload) in &sources {
            let verdict = match table.l4_verdict(addr, peer, proxied) {
                L4Verdict::Deny => POLICY_DENY,
                L4Verdict::Allow => POLICY_ALLOW,
                L4Verdict::Unlisted => continue,
            };
            out.policy.insert(weft_common::PolicyKey { src_workload: *src_workload, port_id }, verdict);
        }
    }
    out.authz = table;
    handoff
}
