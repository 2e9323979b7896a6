//! L4 authorization, enforced by connect4 on the connecting side.
//!
//! connect4 only sees sources that are local meshed workloads, so only they get entries. An
//! ALLOW policy marks its service ports default-deny; local meshed sources without an ALLOW
//! entry are then refused. DENY beats ALLOW whatever order the policies come in.

use std::collections::BTreeMap;

use weft_common::{POLICY_ALLOW, POLICY_DENY, PolicyKey, SVC_F_DEFAULT_DENY};

use super::{Compiled, Rejection};
use crate::model::{Action, AuthorizationPolicy, ObjectRef, PolicyTarget, Rule, Service, Source, Workload};

/// The trust domain of the principals weft derives from service accounts.
const TRUST_DOMAIN: &str = "cluster.local";

pub(super) fn apply(
    out: &mut Compiled,
    policies: &[&AuthorizationPolicy],
    services: &[&Service],
    workloads: &BTreeMap<&ObjectRef, &Workload>,
) {
    // Local meshed workloads are exactly the attached ones.
    let sources: Vec<(&Workload, u32)> = workloads
        .values()
        .filter_map(|wl| out.attachments.get(&wl.id.to_string()).map(|a| (*wl, a.value.id)))
        .collect();

    for policy in policies {
        let ns = policy.id.namespace.as_str();
        if let PolicyTarget::Service(name) = &policy.target {
            // Judged against the input, not the compiled maps: a headless or rejected service
            // exists, it just has no ports to protect.
            if !services.iter().any(|s| s.id.namespace == ns && &s.id.name == name) {
                let reason = format!("targets Service {ns}/{name}, which does not exist");
                out.rejected.push(Rejection::new("AuthorizationPolicy", &policy.id, "spec.targetRefs", reason));
                continue;
            }
        }
        let targeted = out.services.iter_mut().filter(|(_, cs)| match &policy.target {
            PolicyTarget::Service(name) => cs.service.namespace == ns && &cs.service.name == name,
            PolicyTarget::Namespace => cs.service.namespace == ns,
        });
        for (key, compiled) in targeted {
            if policy.action == Action::Allow {
                compiled.value.flags |= SVC_F_DEFAULT_DENY;
            }
            for &(wl, src_workload) in &sources {
                if !policy.rules.iter().any(|rule| rule_matches(rule, wl, key.port, ns)) {
                    continue;
                }
                let entry = PolicyKey { src_workload, port_id: compiled.value.port_id };
                match policy.action {
                    Action::Deny => {
                        out.policy.insert(entry, POLICY_DENY);
                    }
                    Action::Allow => {
                        out.policy.entry(entry).or_insert(POLICY_ALLOW);
                    }
                }
            }
        }
    }
}

fn rule_matches(rule: &Rule, wl: &Workload, port: u16, policy_ns: &str) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|source| source_matches(source, wl, policy_ns)))
        && (rule.to_ports.is_empty() || rule.to_ports.contains(&port))
}

fn source_matches(source: &Source, wl: &Workload, policy_ns: &str) -> bool {
    let ns = wl.id.namespace.as_str();
    let principal = format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{}", wl.service_account);
    let any_or_empty =
        |list: &[String], matches: &dyn Fn(&str) -> bool| list.is_empty() || list.iter().any(|s| matches(s));
    any_or_empty(&source.namespaces, &|n| n == ns)
        && any_or_empty(&source.service_accounts, &|entry| {
            // "sa" alone means the policy's namespace.
            let (sa_ns, sa) = entry.split_once('/').unwrap_or((policy_ns, entry));
            sa_ns == ns && sa == wl.service_account
        })
        && any_or_empty(&source.principals, &|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => principal.starts_with(prefix),
            None => principal == pattern,
        })
}
