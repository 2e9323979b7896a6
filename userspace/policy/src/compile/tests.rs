#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use weft_common::*;

use super::*;
use crate::model::*;

const NS: &str = "default";
const NODE: &str = "node-a";

fn id(name: &str) -> ObjectRef {
    ObjectRef::new(NS, name)
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// A local meshed workload labelled app=<app>.
fn wl(name: &str, app: &str, ips: &[&str]) -> Workload {
    let mut w = Workload::new(id(name), ips.iter().map(|s| ip(s)).collect());
    w.labels.insert("app".into(), app.into());
    w.service_account = name.into();
    w.cgroup = Some(format!("/sys/fs/cgroup/{name}").into());
    w
}

fn weighted(mut w: Workload, weight: u32) -> Workload {
    w.weight = weight;
    w
}

fn port(number: u16, target: TargetPort) -> ServicePort {
    ServicePort { name: None, port: number, target_port: target, protocol: Protocol::Tcp, app_protocol: None }
}

/// A service selecting app=<name> on port 80 -> 9080.
fn svc(name: &str, vip: &str) -> Service {
    Service {
        id: id(name),
        cluster_ip: Some(ip(vip)),
        ports: vec![port(80, TargetPort::Number(9080))],
        selector: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
        l7: false,
    }
}

fn snapshot(services: Vec<Service>, workloads: Vec<Workload>) -> Snapshot {
    Snapshot {
        node: NodeSettings { node_name: NODE.into(), proxy: None, skmsg: false },
        services,
        workloads,
        ..Snapshot::default()
    }
}

fn key(vip: &str, port: u16) -> ServiceKey {
    ServiceKey { addr: ipv4_addr(ip(vip)), port, proto: PROTO_TCP, _pad: 0 }
}

/// (address, port, weight_end, workload name) of each backend.
fn backends<'a>(c: &'a Compiled, vip: &str, port: u16) -> Vec<(String, u16, u32, Option<&'a str>)> {
    c.services[&key(vip, port)]
        .backends
        .iter()
        .map(|b| {
            let owner = c.names.workloads.get(&b.workload_id).map(|n| n.id.name.as_str());
            (addr_to_string(&b.addr), b.port, b.weight_end, owner)
        })
        .collect()
}

fn rejections(c: &Compiled) -> Vec<String> {
    c.rejected.iter().map(ToString::to_string).collect()
}

fn slice(service: &str, port: u16, endpoints: &[(&str, bool, Option<&str>)]) -> EndpointSet {
    EndpointSet {
        service: id(service),
        ports: vec![(None, port)],
        endpoints: endpoints
            .iter()
            .map(|&(addr, ready, workload)| Endpoint { ip: ip(addr), ready, workload: workload.map(id) })
            .collect(),
    }
}

#[test]
fn ids_are_fnv1a_and_never_zero() {
    assert_eq!(fnv1a(""), 0x811c_9dc5);
    assert_eq!(fnv1a("a"), 0xe40c_292c);
    assert_eq!(workload_id(&id("x")), fnv1a("wl:default/x"));
    assert_eq!(service_id(&id("x")), fnv1a("svc:default/x"));
    assert_eq!(port_id(&id("x"), 80), fnv1a("port:default/x:80"));
    assert_ne!(workload_id(&id("x")), service_id(&id("x")));
}

#[test]
fn weighted_service_from_selector() {
    let c = compile(&snapshot(
        vec![svc("reviews", "10.96.0.10")],
        vec![
            weighted(wl("reviews-v1", "reviews", &["10.1.0.1"]), 80),
            weighted(wl("reviews-v2", "reviews", &["10.1.0.2"]), 20),
        ],
    ));
    assert_eq!(c.rejected, vec![]);
    assert_eq!(
        backends(&c, "10.96.0.10", 80),
        vec![("10.1.0.1".into(), 9080, 80, Some("reviews-v1")), ("10.1.0.2".into(), 9080, 100, Some("reviews-v2"))]
    );
    let value = c.services[&key("10.96.0.10", 80)].value;
    assert_eq!(
        value,
        ServiceValue {
            port_id: port_id(&id("reviews"), 80),
            svc_id: service_id(&id("reviews")),
            count: 2,
            total_weight: 100,
            slot_base: 0,
            flags: 0
        }
    );
    assert_eq!(c.names.services[&value.svc_id], id("reviews"));
}

#[test]
fn backend_sources_table() {
    struct Case {
        name: &'static str,
        service: Service,
        workloads: Vec<Workload>,
        slices: Vec<EndpointSet>,
        want: Vec<(&'static str, u16, u32)>,
        rejected: usize,
    }
    let named = |name: &str| {
        let mut s = svc("web", "10.96.0.1");
        s.ports[0].target_port = TargetPort::Name(name.into());
        s
    };
    let with_port = |mut w: Workload, name: &str, number: u16| {
        w.ports.insert(name.into(), number);
        w
    };
    let cases = vec![
        Case {
            name: "selector and slice list the same pod once, weight from the workload",
            service: svc("web", "10.96.0.1"),
            workloads: vec![weighted(wl("web-1", "web", &["10.1.0.1"]), 5)],
            slices: vec![slice("web", 9080, &[("10.1.0.1", true, Some("web-1")), ("10.1.0.9", true, None)])],
            want: vec![("10.1.0.1", 9080, 5), ("10.1.0.9", 9080, 6)],
            rejected: 0,
        },
        Case {
            name: "slice weight comes from the targetRef workload",
            service: Service { selector: None, ..svc("web", "10.96.0.1") },
            workloads: vec![weighted(wl("web-1", "web", &["10.1.0.1"]), 7)],
            slices: vec![slice("web", 9080, &[("10.1.0.1", true, Some("web-1"))])],
            want: vec![("10.1.0.1", 9080, 7)],
            rejected: 0,
        },
        Case {
            name: "not-ready endpoints are excluded",
            service: svc("web", "10.96.0.1"),
            workloads: vec![],
            slices: vec![slice("web", 9080, &[("10.1.0.1", false, None), ("10.1.0.2", true, None)])],
            want: vec![("10.1.0.2", 9080, 1)],
            rejected: 0,
        },
        Case {
            name: "weight 0 drains, from the selector and from slices",
            service: svc("web", "10.96.0.1"),
            workloads: vec![weighted(wl("web-1", "web", &["10.1.0.1"]), 0), wl("web-2", "web", &["10.1.0.2"])],
            slices: vec![slice("web", 9080, &[("10.1.0.1", true, Some("web-1"))])],
            want: vec![("10.1.0.2", 9080, 1)],
            rejected: 0,
        },
        Case {
            name: "named targetPort resolves per workload; a missing name is skipped and reported",
            service: named("http"),
            workloads: vec![
                with_port(wl("web-1", "web", &["10.1.0.1"]), "http", 8080),
                wl("web-2", "web", &["10.1.0.2"]),
            ],
            slices: vec![],
            want: vec![("10.1.0.1", 8080, 1)],
            rejected: 1,
        },
        Case {
            name: "one backend per workload address, sorted by address",
            service: svc("web", "10.96.0.1"),
            workloads: vec![wl("web-1", "web", &["10.1.0.20", "10.1.0.3"])],
            slices: vec![],
            want: vec![("10.1.0.3", 9080, 1), ("10.1.0.20", 9080, 2)],
            rejected: 0,
        },
        Case {
            name: "selector only matches its own namespace and every label",
            service: Service {
                selector: Some(BTreeMap::from([("app".into(), "web".into()), ("tier".into(), "x".into())])),
                ..svc("web", "10.96.0.1")
            },
            workloads: vec![wl("web-1", "web", &["10.1.0.1"]), {
                let mut w = wl("web-2", "web", &["10.1.0.2"]);
                w.id.namespace = "other".into();
                w.labels.insert("tier".into(), "x".into());
                w
            }],
            slices: vec![],
            want: vec![],
            rejected: 0,
        },
        Case {
            name: "slice port must match the service port name",
            service: Service {
                ports: vec![ServicePort { name: Some("http".into()), ..port(80, TargetPort::Number(80)) }],
                ..svc("web", "10.96.0.1")
            },
            workloads: vec![],
            slices: vec![EndpointSet {
                ports: vec![(Some("grpc".into()), 9090), (Some("http".into()), 8080)],
                ..slice("web", 0, &[("10.1.0.1", true, None)])
            }],
            want: vec![("10.1.0.1", 8080, 1)],
            rejected: 0,
        },
    ];
    for case in cases {
        let mut s = snapshot(vec![case.service], case.workloads);
        s.endpoints = case.slices;
        let c = compile(&s);
        let got: Vec<_> = backends(&c, "10.96.0.1", 80).into_iter().map(|(a, p, w, _)| (a, p, w)).collect();
        let want: Vec<_> = case.want.iter().map(|&(a, p, w)| (a.to_owned(), p, w)).collect();
        assert_eq!(got, want, "{}", case.name);
        assert_eq!(c.rejected.len(), case.rejected, "{}: {:?}", case.name, c.rejected);
        let value = c.services[&key("10.96.0.1", 80)].value;
        assert_eq!(value.count as usize, want.len(), "{}", case.name);
        assert_eq!(value.total_weight, want.last().map_or(0, |b| b.2), "{}", case.name);
    }
}

#[test]
fn named_port_rejection_says_what_to_fix() {
    let mut s = svc("web", "10.96.0.1");
    s.ports[0].target_port = TargetPort::Name("http".into());
    let c = compile(&snapshot(vec![s], vec![wl("web-1", "web", &["10.1.0.1"])]));
    assert_eq!(
        rejections(&c),
        vec![
            "Service default/web: spec.ports[0].targetPort: Workload default/web-1 has no port named \"http\" and gets no \
             traffic on port 80; add the name to its spec.ports or use a port number"
        ]
    );
}

#[test]
fn headless_skipped_and_udp_ignored() {
    let headless = Service { cluster_ip: None, ..svc("headless", "10.96.0.1") };
    let mut dns = svc("dns", "10.96.0.10");
    dns.ports = vec![
        ServicePort { protocol: Protocol::Udp, ..port(53, TargetPort::Number(53)) },
        port(53, TargetPort::Number(53)),
        ServicePort { protocol: Protocol::Sctp, ..port(54, TargetPort::Number(54)) },
    ];
    let c = compile(&snapshot(vec![headless, dns], vec![]));
    assert_eq!(c.rejected, vec![]);
    assert_eq!(c.services.keys().copied().collect::<Vec<_>>(), vec![key("10.96.0.10", 53)]);
}

#[test]
fn rejections_table() {
    let twice = |mut w: Workload, other: &str| {
        w.ips.push(ip(other));
        w
    };
    let cases: Vec<(&str, Snapshot, &str)> = vec![
        (
            "duplicate VIP names both services",
            snapshot(vec![svc("b", "10.96.0.1"), svc("a", "10.96.0.1")], vec![]),
            "Service default/b: spec.ports[0].port: 10.96.0.1:80/TCP is claimed by Service default/a and Service \
             default/b; default/a keeps it, give each service its own clusterIP",
        ),
        (
            "unspecified clusterIP",
            snapshot(vec![svc("a", "0.0.0.0")], vec![]),
            "Service default/a: spec.clusterIP: 0.0.0.0 is not a usable service address; set a real clusterIP, or \
             \"None\" for a headless service",
        ),
        (
            "duplicate port number",
            snapshot(
                vec![Service {
                    ports: vec![port(80, TargetPort::Number(1)), port(80, TargetPort::Number(2))],
                    ..svc("a", "10.96.0.1")
                }],
                vec![],
            ),
            "Service default/a: spec.ports[1].port: port 80/TCP is also listed at spec.ports[0]; list each port once",
        ),
        (
            "workload without addresses",
            snapshot(vec![], vec![wl("w", "w", &[])]),
            "Workload default/w: spec.addresses: no addresses; list the workload's IPv4 addresses",
        ),
        (
            "weight too large",
            snapshot(vec![], vec![weighted(wl("w", "w", &["10.1.0.1"]), 1_000_001)]),
            "Workload default/w: spec.weight: weight 1000001 is too large; use a weight between 0 and 1000000",
        ),
        (
            "address claimed twice",
            snapshot(vec![], vec![wl("a", "a", &["10.1.0.1"]), twice(wl("b", "b", &["10.1.0.2"]), "10.1.0.1")]),
            "Workload default/b: spec.addresses[1]: address 10.1.0.1 is already used by Workload default/a; give each \
             workload its own addresses",
        ),
        (
            "the same id twice",
            snapshot(vec![], vec![wl("w", "w", &["10.1.0.2"]), wl("w", "w", &["10.1.0.1"])]),
            "Workload default/w: metadata.name: defined twice; only the first definition is used",
        ),
        (
            "policy targets a missing service",
            Snapshot {
                policies: vec![AuthorizationPolicy {
                    id: id("p"),
                    target: PolicyTarget::Service("nope".into()),
                    action: Action::Deny,
                    rules: vec![Rule::default()],
                }],
                ..snapshot(vec![], vec![])
            },
            "AuthorizationPolicy default/p: spec.targetRefs: targets Service default/nope, which does not exist",
        ),
    ];
    for (name, snap, want) in cases {
        let c = compile(&snap);
        assert_eq!(rejections(&c), vec![want.to_owned()], "{name}");
    }
}

#[test]
fn rejected_objects_are_left_out_and_the_rest_compiles() {
    let c = compile(&snapshot(
        vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.1")],
        vec![wl("a-1", "a", &["10.1.0.1"]), wl("b-1", "b", &["10.1.0.1"])],
    ));
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.services[&key("10.96.0.1", 80)].service, id("a"));
    assert_eq!(backends(&c, "10.96.0.1", 80), vec![("10.1.0.1".into(), 9080, 1, Some("a-1"))]);
    assert_eq!(c.workload_ips.len(), 1);
    assert!(!c.attachments.contains_key("default/b-1"));
    assert_eq!(c.rejected.len(), 2);
}

#[test]
fn workload_flags_table() {
    type Edit = fn(&mut Workload);
    let cases: [(&str, Edit, u32); 5] = [
        ("no node means this node", |_| (), WL_F_LOCAL | WL_F_MESHED),
        ("named this node", |w| w.node = Some(NODE.into()), WL_F_LOCAL | WL_F_MESHED),
        ("another node (without an address: no tunnel)", |w| w.node = Some("node-b".into()), 0),
        ("no cgroup cannot be meshed", |w| w.cgroup = None, WL_F_LOCAL),
        ("meshed: false", |w| w.meshed = false, WL_F_LOCAL),
    ];
    for (name, edit, flags) in cases {
        let mut w = wl("w", "w", &["10.1.0.1"]);
        edit(&mut w);
        let c = compile(&snapshot(vec![], vec![w]));
        let want = WorkloadValue { id: workload_id(&id("w")), flags };
        assert_eq!(c.workload_ips[&ipv4_addr(ip("10.1.0.1"))], want, "{name}");
        let attachment = c.attachments.get("default/w");
        assert_eq!(attachment.is_some(), flags & WL_F_MESHED != 0, "{name}");
        if let Some(a) = attachment {
            assert_eq!((a.value, a.cgroup.to_str()), (want, Some("/sys/fs/cgroup/w")), "{name}");
        }
        assert_eq!(c.names.workloads[&want.id], WorkloadName { id: id("w"), service_account: "w".into() }, "{name}");
    }
}

/// reviews (the target) plus three local meshed sources and one non-meshed.
fn policy_snapshot(policies: Vec<AuthorizationPolicy>) -> Snapshot {
    let mut prod = wl("prod-client", "x", &["10.1.0.2"]);
    prod.id.namespace = "prod".into();
    let mut remote = wl("remote", "x", &["10.1.0.4"]);
    remote.node = Some("node-b".into());
    let mut s = snapshot(
        vec![Service {
            ports: vec![port(80, TargetPort::Number(1)), port(81, TargetPort::Number(1))],
            ..svc("reviews", "10.96.0.1")
        }],
        vec![wl("frontend", "x", &["10.1.0.1"]), prod, wl("batch", "x", &["10.1.0.3"]), remote],
    );
    s.policies = policies;
    s
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy { id: id(name), target: PolicyTarget::Service("reviews".into()), action, rules }
}

fn pattern(s: &str) -> Pattern {
    s.parse().unwrap()
}

fn ports(ports: &[u16]) -> Operation {
    Operation { ports: ports.to_vec(), ..Operation::default() }
}

fn from(source: Source) -> Rule {
    Rule { from: vec![source], ..Rule::default() }
}

/// (source workload name, port, verdict) of every policy entry.
fn entries(c: &Compiled) -> Vec<(String, u16, u32)> {
    let port_of = |port_id: u32| [80, 81].into_iter().find(|&p| port_id == super::port_id(&id("reviews"), p)).unwrap();
    let mut entries: Vec<_> = c
        .policy
        .iter()
        .map(|(k, v)| (c.names.workloads[&k.src_workload].id.name.clone(), port_of(k.port_id), *v))
        .collect();
    entries.sort();
    entries
}

fn default_deny(c: &Compiled, port: u16) -> bool {
    c.services[&key("10.96.0.1", port)].value.flags & SVC_F_DEFAULT_DENY != 0
}

#[test]
fn policy_table() {
    let sa = |s: &str| Source { service_accounts: vec![s.parse().unwrap()], ..Source::default() };
    let principal = |s: &str| Source { principals: vec![s.parse().unwrap()], ..Source::default() };
    let namespace = |s: &str| Source { namespaces: vec![s.parse().unwrap()], ..Source::default() };
    let (allow, deny) = (POLICY_ALLOW, POLICY_DENY);
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<AuthorizationPolicy>, Vec<(&str, u16, u32)>, bool)> = vec![
        (
            "deny by namespace: entries for matching local meshed sources only, no default deny",
            vec![policy("p", Action::Deny, vec![from(namespace("prod"))])],
            vec![("prod-client", 80, deny), ("prod-client", 81, deny)],
            false,
        ),
        (
            "allow by service account: default deny plus allow entries for the match",
            vec![policy("p", Action::Allow, vec![from(sa("frontend"))])],
            vec![("frontend", 80, allow), ("frontend", 81, allow)],
            true,
        ),
        (
            "\"ns/sa\" form names another namespace",
            vec![policy("p", Action::Allow, vec![from(sa("prod/prod-client"))])],
            vec![("prod-client", 80, allow), ("prod-client", 81, allow)],
            true,
        ),
        (
            "allow with to_ports only covers those ports",
            vec![policy(
                "p",
                Action::Allow,
                vec![Rule { from: vec![sa("frontend")], to: vec![ports(&[81])], ..Rule::default() }],
            )],
            vec![("frontend", 81, allow)],
            true,
        ),
        (
            "deny wins over allow in either order",
            vec![
                policy("a", Action::Deny, vec![from(sa("frontend"))]),
                policy("b", Action::Allow, vec![from(namespace("default"))]),
            ],
            vec![("batch", 80, allow), ("batch", 81, allow), ("frontend", 80, deny), ("frontend", 81, deny)],
            true,
        ),
        (
            "principal prefix wildcard",
            vec![policy("p", Action::Deny, vec![from(principal("spiffe://cluster.local/ns/prod/*"))])],
            vec![("prod-client", 80, deny), ("prod-client", 81, deny)],
            false,
        ),
        (
            "exact principal",
            vec![policy("p", Action::Deny, vec![from(principal("spiffe://cluster.local/ns/default/sa/batch"))])],
            vec![("batch", 80, deny), ("batch", 81, deny)],
            false,
        ),
        (
            "lone \"*\" and an empty rule match every local meshed source",
            vec![
                policy("p", Action::Deny, vec![from(principal("*"))]),
                policy("q", Action::Deny, vec![Rule::default()]),
            ],
            ["batch", "frontend", "prod-client"].iter().flat_map(|w| [(*w, 80, deny), (*w, 81, deny)]).collect(),
            false,
        ),
        (
            "every list of a source must match",
            vec![policy("p", Action::Deny, vec![from(Source { namespaces: vec![pattern("prod")], ..sa("frontend") })])],
            vec![],
            false,
        ),
        ("allow without rules denies everyone", vec![policy("p", Action::Allow, vec![])], vec![], true),
        (
            "namespace target covers the namespace's services",
            vec![AuthorizationPolicy {
                target: PolicyTarget::Namespace,
                ..policy("p", Action::Deny, vec![from(sa("batch"))])
            }],
            vec![("batch", 80, deny), ("batch", 81, deny)],
            false,
        ),
        (
            "a policy in another namespace does not apply",
            vec![AuthorizationPolicy {
                id: ObjectRef::new("prod", "p"),
                target: PolicyTarget::Namespace,
                ..policy("p", Action::Allow, vec![])
            }],
            vec![],
            false,
        ),
    ];
    for (name, policies, want, dd) in cases {
        let c = compile(&policy_snapshot(policies));
        assert_eq!(c.rejected, vec![], "{name}");
        let want: Vec<_> = want.into_iter().map(|(w, p, v)| (w.to_owned(), p, v)).collect();
        assert_eq!(entries(&c), want, "{name}");
        assert_eq!((default_deny(&c, 80), default_deny(&c, 81)), (dd, dd), "{name}");
    }
}

#[test]
fn l7_service_hands_off() {
    let c = compile(&snapshot(vec![Service { l7: true, ..svc("a", "10.96.0.1") }, svc("b", "10.96.0.2")], vec![]));
    assert_eq!(c.services[&key("10.96.0.1", 80)].value.flags, SVC_F_HANDOFF);
    assert_eq!(c.services[&key("10.96.0.2", 80)].value.flags, 0);
}

#[test]
fn node_config_table() {
    let proxy = SocketAddrV4::new(ip("10.0.0.1"), 15001);
    let cases = [
        (None, false, NodeConfig::default()),
        (None, true, NodeConfig { flags: NODE_F_SKMSG, ..NodeConfig::default() }),
        (
            Some(proxy),
            true,
            NodeConfig {
                proxy_addr: ipv4_addr(ip("10.0.0.1")),
                proxy_port: 15001,
                _pad: 0,
                flags: NODE_F_PROXY | NODE_F_SKMSG,
            },
        ),
    ];
    for (proxy, skmsg, want) in cases {
        let s = Snapshot { node: NodeSettings { node_name: NODE.into(), proxy, skmsg }, ..Snapshot::default() };
        assert_eq!(compile(&s).node, want, "{proxy:?} {skmsg}");
    }
}

fn busy_snapshot() -> Snapshot {
    let mut s = policy_snapshot(vec![
        policy("a", Action::Deny, vec![from(Source { namespaces: vec![pattern("prod")], ..Source::default() })]),
        policy("b", Action::Allow, vec![Rule::default()]),
    ]);
    s.services.push(svc("x", "10.96.0.1")); // loses the VIP to reviews
    s.services.push(Service { l7: true, ..svc("web", "10.96.0.5") });
    s.workloads.push(weighted(wl("web-1", "web", &["10.1.1.1", "10.1.1.2"]), 3));
    s.workloads.push(wl("web-2", "web", &["10.1.1.1"])); // loses the address to web-1
    s.endpoints.push(slice("web", 9080, &[("10.1.1.9", true, None), ("10.1.1.1", true, Some("web-1"))]));
    s.endpoints.push(slice("web", 9080, &[("10.1.1.8", true, None)]));
    s.node.proxy = Some(SocketAddrV4::new(ip("10.0.0.1"), 15001));
    s
}

#[test]
fn shuffled_input_compiles_identically() {
    let original = busy_snapshot();
    let want = compile(&original);
    assert_eq!(want.rejected.len(), 2, "{:?}", want.rejected);
    for rotation in 1..4 {
        let mut s = original.clone();
        s.services.reverse();
        s.workloads.rotate_left(rotation);
        s.endpoints.reverse();
        s.policies.reverse();
        assert_eq!(compile(&s), want, "rotation {rotation}");
    }
}

#[test]
fn dump_is_human_readable() {
    let c = compile(&busy_snapshot());
    let dump = c.dump();
    assert_eq!(dump["node"], serde_json::json!({"proxy": "10.0.0.1:15001", "flags": ["PROXY"]}));
    let web = &dump["services"]["10.96.0.5:80/TCP"];
    assert_eq!(web["value"]["flags"], serde_json::json!(["HANDOFF"]));
    assert_eq!(web["value"]["total_weight"], 3 + 3 + 1 + 1);
    assert_eq!(
        web["backends"][0],
        serde_json::json!({
            "addr": "10.1.1.1", "port": 9080, "weight": 3, "weight_end": 3, "workload_id": workload_id(&id("web-1"))
        })
    );
    assert_eq!(web["service"], serde_json::json!({"namespace": "default", "name": "web"}));
    assert_eq!(dump["services"]["10.96.0.1:80/TCP"]["value"]["flags"], serde_json::json!(["DEFAULT_DENY"]));
    assert_eq!(dump["workload_ips"]["10.1.0.4"], serde_json::json!({"id": workload_id(&id("remote")), "flags": []}));
    assert_eq!(dump["workload_ips"]["10.1.0.1"]["flags"], serde_json::json!(["LOCAL", "MESHED"]));
    assert_eq!(dump["policy"][0]["verdict"], serde_json::json!("ALLOW"));
    assert!(dump["rejected"][0]["reason"].is_string());
}

mod routes;
mod traffic;

/// How authorization compiles for reviews' two ports: kernel entries, flags, and the ports
/// handed to the proxy, with and without a proxy on the node.
#[test]
fn l7_authz_interplay_table() {
    struct Case {
        name: &'static str,
        proxy: bool,
        policies: Vec<AuthorizationPolicy>,
        jwt: Vec<JwtPolicy>,
        entries: Vec<(&'static str, u16, u32)>,
        /// Default deny on (80, 81).
        default_deny: (bool, bool),
        /// Handed off on (80, 81).
        handoff: (bool, bool),
        rejected: usize,
    }
    let (allow, deny) = (POLICY_ALLOW, POLICY_DENY);
    let sa = |s: &str| Source { service_accounts: vec![s.parse().unwrap()], ..Source::default() };
    let namespace = |s: &str| Source { namespaces: vec![pattern(s)], ..Source::default() };
    let get = || Operation { methods: vec!["GET".into()], ..Operation::default() };
    let l7_rule = |source: Source| Rule { from: vec![source], to: vec![get()], ..Rule::default() };
    let selector = |p: AuthorizationPolicy| AuthorizationPolicy {
        target: PolicyTarget::Selector(BTreeMap::from([("app".into(), "reviews".into())])),
        ..p
    };
    let jwt = JwtPolicy {
        id: id("jwt"),
        targets: vec![PolicyTarget::Service("reviews".into())],
        rules: vec![JwtRule::new("https://issuer", JwksSource::Inline("{\"keys\":[]}".into()))],
    };
    let cases = vec![
        Case {
            name: "L4-only ALLOW stays in the kernel, no handoff",
            proxy: true,
            policies: vec![policy("p", Action::Allow, vec![from(sa("frontend"))])],
            jwt: vec![],
            entries: vec![("frontend", 80, allow), ("frontend", 81, allow)],
            default_deny: (true, true),
            handoff: (false, false),
            rejected: 0,
        },
        Case {
            name: "L7 ALLOW: handed off; the kernel pre-filters by source only (GET or not is the proxy's call)",
            proxy: true,
            policies: vec![policy("p", Action::Allow, vec![l7_rule(sa("frontend"))])],
            jwt: vec![],
            entries: vec![("frontend", 80, allow), ("frontend", 81, allow)],
            default_deny: (true, true),
            handoff: (true, true),
            rejected: 0,
        },
        Case {
            name: "L7 ALLOW next to an L4 ALLOW: both sources pass the kernel",
            proxy: true,
            policies: vec![
                policy("a", Action::Allow, vec![l7_rule(sa("frontend"))]),
                policy("b", Action::Allow, vec![from(sa("batch"))]),
            ],
            jwt: vec![],
            entries: vec![("batch", 80, allow), ("batch", 81, allow), ("frontend", 80, allow), ("frontend", 81, allow)],
            default_deny: (true, true),
            handoff: (true, true),
            rejected: 0,
        },
        Case {
            name: "L7 DENY: no kernel deny (POST must pass), the proxy judges",
            proxy: true,
            policies: vec![policy("p", Action::Deny, vec![l7_rule(namespace("prod"))])],
            jwt: vec![],
            entries: vec![],
            default_deny: (false, false),
            handoff: (true, true),
            rejected: 0,
        },
        Case {
            name: "L4 DENY still denies in the kernel on a handed-off port",
            proxy: true,
            policies: vec![
                policy("a", Action::Deny, vec![from(namespace("prod"))]),
                policy("b", Action::Allow, vec![l7_rule(namespace("*"))]),
            ],
            jwt: vec![],
            entries: vec![
                ("batch", 80, allow),
                ("batch", 81, allow),
                ("frontend", 80, allow),
                ("frontend", 81, allow),
                ("prod-client", 80, deny),
                ("prod-client", 81, deny),
            ],
            default_deny: (true, true),
            handoff: (true, true),
            rejected: 0,
        },
        Case {
            name: "L7 rule scoped to one port hands off only that port",
            proxy: true,
            policies: vec![policy(
                "p",
                Action::Deny,
                vec![Rule { to: vec![Operation { ports: vec![81], ..get() }], ..Rule::default() }],
            )],
            jwt: vec![],
            entries: vec![],
            default_deny: (false, false),
            handoff: (false, true),
            rejected: 0,
        },
        Case {
            name: "no proxy: an L7 ALLOW rule matches nothing at connect (fail closed)",
            proxy: false,
            policies: vec![policy("p", Action::Allow, vec![l7_rule(sa("frontend"))])],
            jwt: vec![],
            entries: vec![],
            default_deny: (true, true),
            handoff: (true, true),
            rejected: 1,
        },
        Case {
            name: "no proxy: an L7 DENY denies its sources' whole connections (fail closed)",
            proxy: false,
            policies: vec![policy(
                "p",
                Action::Deny,
                vec![Rule {
                    from: vec![namespace("prod")],
                    to: vec![Operation { ports: vec![81], ..get() }],
                    ..Rule::default()
                }],
            )],
            jwt: vec![],
            entries: vec![("prod-client", 81, deny)],
            default_deny: (false, false),
            handoff: (false, true),
            rejected: 1,
        },
        Case {
            name: "selector ALLOW: the proxy enforces it per workload, the kernel stays out",
            proxy: true,
            policies: vec![selector(policy("p", Action::Allow, vec![from(sa("frontend"))]))],
            jwt: vec![],
            entries: vec![],
            default_deny: (false, false),
            handoff: (true, true),
            rejected: 0,
        },
        Case {
            name: "no proxy: a selector ALLOW applies to the whole backed port",
            proxy: false,
            policies: vec![selector(policy("p", Action::Allow, vec![from(sa("frontend"))]))],
            jwt: vec![],
            entries: vec![("frontend", 80, allow), ("frontend", 81, allow)],
            default_deny: (true, true),
            handoff: (true, true),
            rejected: 1,
        },
        Case {
            name: "a JwtPolicy hands its service off",
            proxy: true,
            policies: vec![],
            jwt: vec![jwt.clone()],
            entries: vec![],
            default_deny: (false, false),
            handoff: (true, true),
            rejected: 0,
        },
    ];
    for case in cases {
        let mut s = policy_snapshot(case.policies);
        // A remote backend for reviews, for selectors to select.
        let mut backend = wl("reviews-1", "reviews", &["10.1.0.9"]);
        backend.node = Some("node-b".into());
        s.workloads.push(backend);
        s.jwt_policies = case.jwt;
        if case.proxy {
            s.node.proxy = Some(SocketAddrV4::new(ip("10.0.0.1"), 15001));
        }
        let c = compile(&s);
        let name = case.name;
        let mut reversed = s.clone();
        reversed.policies.reverse();
        reversed.workloads.reverse();
        assert_eq!(compile(&reversed), c, "{name}: input order matters");
        assert_eq!(c.rejected.len(), case.rejected, "{name}: {:#?}", c.rejected);
        let want: Vec<_> = case.entries.into_iter().map(|(w, p, v)| (w.to_owned(), p, v)).collect();
        assert_eq!(entries(&c), want, "{name}");
        assert_eq!((default_deny(&c, 80), default_deny(&c, 81)), case.default_deny, "{name}");
        let handoff = |port| c.services[&key("10.96.0.1", port)].value.flags & SVC_F_HANDOFF != 0;
        assert_eq!((handoff(80), handoff(81)), case.handoff, "{name}");
        let l7 = |port| c.l7.contains_key(&SocketAddrV4::new(ip("10.96.0.1"), port));
        assert_eq!((l7(80), l7(81)), case.handoff, "{name}: every handed-off port has a route table");
    }
}

#[test]
fn jwt_policy_on_a_missing_service_is_rejected() {
    let mut s = policy_snapshot(vec![]);
    s.node.proxy = Some(SocketAddrV4::new(ip("10.0.0.1"), 15001));
    s.jwt_policies = vec![JwtPolicy {
        id: id("j"),
        targets: vec![PolicyTarget::Service("nope".into())],
        rules: vec![JwtRule::new("https://issuer", JwksSource::Inline("{}".into()))],
    }];
    assert_eq!(
        rejections(&compile(&s)),
        ["JwtPolicy default/j: spec.targetRefs: targets Service default/nope, which does not exist"]
    );
}

#[test]
fn dump_includes_the_authz_table() {
    let c = compile(&busy_snapshot());
    let dump = c.dump();
    assert_eq!(dump["authz"]["semantics"], crate::authz::SEMANTICS);
    assert_eq!(dump["authz"]["services"]["10.96.0.1:80"]["deny"], serde_json::json!(["default/a"]));
    assert_eq!(dump["authz"]["services"]["10.96.0.1:80"]["allow"], serde_json::json!(["default/b"]));
}

fn peer_auth(namespace: &str, name: &str, selector: Option<&str>, mode: MtlsMode) -> PeerAuthentication {
    let selector = selector.map(|app| BTreeMap::from([("app".to_owned(), app.to_owned())]));
    PeerAuthentication { id: ObjectRef::new(namespace, name), selector, mode }
}

/// db on node-b (reachable: node-b has an address) behind service db; web local.
fn mtls_snapshot(policies: Vec<PeerAuthentication>, nodes: Vec<Node>, proxy: bool) -> Snapshot {
    let mut db = wl("db", "db", &["10.2.0.5"]);
    db.node = Some("node-b".into());
    let mut s = snapshot(vec![svc("db", "10.96.0.9")], vec![wl("web", "web", &["10.1.0.1"]), db]);
    s.node.proxy = proxy.then(|| "10.1.0.254:15001".parse().unwrap());
    s.peer_authentications = policies;
    s.nodes = nodes;
    s
}

#[test]
fn mtls_mode_most_specific_policy_wins() {
    use MtlsMode::{Permissive, Strict};
    let mesh = || peer_auth(MESH_NAMESPACE, "mesh", None, Strict);
    let ns = |mode| peer_auth(NS, "ns", None, mode);
    let sel = |mode| peer_auth(NS, "db-only", Some("db"), mode);
    let cases: Vec<(&str, Vec<PeerAuthentication>, MtlsMode, MtlsMode)> = vec![
        ("no policy: permissive", vec![], Permissive, Permissive),
        ("mesh-wide strict", vec![mesh()], Strict, Strict),
        ("namespace beats mesh", vec![mesh(), ns(Permissive)], Permissive, Permissive),
        ("selector beats namespace", vec![ns(Strict), sel(Permissive)], Strict, Permissive),
        ("selector selects only its labels", vec![sel(Strict)], Permissive, Strict),
        ("other namespace does not apply", vec![peer_auth("shop", "ns", None, Strict)], Permissive, Permissive),
    ];
    for (name, policies, web, db) in cases {
        let c = compile(&mtls_snapshot(policies, vec![], false));
        assert_eq!(c.mtls["default/web"].mode, web, "{name}");
        assert_eq!(c.mtls["default/db"].mode, db, "{name}");
        let flags = c.workload_ips[&ipv4_addr(ip("10.1.0.1"))].flags;
        assert_eq!(flags & WL_F_STRICT != 0, web == Strict, "{name}: web flags {flags:#x}");
    }
}

#[test]
fn conflicting_peer_authentications_are_rejected() {
    let c = compile(&mtls_snapshot(
        vec![peer_auth(NS, "a", None, MtlsMode::Strict), peer_auth(NS, "b", None, MtlsMode::Permissive)],
        vec![],
        false,
    ));
    assert_eq!(c.mtls["default/web"].policy, Some(id("a")));
    let conflict: Vec<_> = c.rejected.iter().filter(|r| r.object == "PeerAuthentication default/b").collect();
    assert_eq!(conflict.len(), 1, "{:?}", c.rejected);
    assert!(conflict[0].reason.contains("already sets the mode of namespace default"), "{:?}", c.rejected);
}

#[test]
fn strict_remote_backends_go_through_the_proxy_and_its_tunnel() {
    let strict = || vec![peer_auth(NS, "db-only", Some("db"), MtlsMode::Strict)];
    let node_b = || vec![Node { name: "node-b".into(), address: ip("192.168.0.2") }];
    let db = ipv4_addr(ip("10.2.0.5"));
    let handoff = |c: &Compiled| c.services[&key("10.96.0.9", 80)].value.flags & SVC_F_HANDOFF != 0;

    let c = compile(&mtls_snapshot(strict(), node_b(), true));
    assert_eq!(c.workload_ips[&db].flags, WL_F_STRICT | WL_F_TUNNEL);
    assert!(handoff(&c), "a STRICT backend on another node is reached through the proxy");
    let peer = &c.tunnel[&ip("10.2.0.5")];
    assert_eq!((peer.tunnel, peer.service_account.as_str(), peer.node.as_str()), ("192.168.0.2:15008".parse().unwrap(), "db", "node-b"));

    // PERMISSIVE: tunnel known, but plaintext still works, so the kernel balances directly.
    let c = compile(&mtls_snapshot(vec![], node_b(), true));
    assert_eq!(c.workload_ips[&db].flags, WL_F_TUNNEL);
    assert!(!handoff(&c));

    // Another node's cgroup is that node's business: a Kubernetes pod of node-b has none here
    // and is still reached through node-b's tunnel.
    let mut from_the_api = mtls_snapshot(strict(), node_b(), true);
    from_the_api.workloads.iter_mut().filter(|w| w.node.is_some()).for_each(|w| w.cgroup = None);
    assert_eq!(compile(&from_the_api).workload_ips[&db].flags, WL_F_STRICT | WL_F_TUNNEL);
    let mut outside = from_the_api;
    outside.workloads.iter_mut().filter(|w| w.node.is_some()).for_each(|w| w.meshed = false);
    assert_eq!(compile(&outside).workload_ips[&db].flags, 0, "outside the mesh: plaintext, no tunnel");

    // No proxy on this node: nothing to hand to.
    assert!(!handoff(&compile(&mtls_snapshot(strict(), node_b(), false))));

    // The node has no address: no tunnel, and the config says why STRICT db is unreachable.
    let c = compile(&mtls_snapshot(strict(), vec![], true));
    assert_eq!(c.workload_ips[&db].flags, WL_F_STRICT);
    assert!(c.tunnel.is_empty() && !handoff(&c));
    assert!(rejections(&c).iter().any(|r| r.contains("add a v1 Node node-b")), "{:?}", c.rejected);
}
