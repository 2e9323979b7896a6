#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use weft_api::{ConfigError, LoadError, Loaded, load_dir};
use weft_policy::*;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("weft-api-{test}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> &Self {
        fs::write(self.0.join(name), text).unwrap();
        self
    }

    fn load(&self) -> Loaded {
        load_dir(&self.0, node()).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn node() -> NodeSettings {
    NodeSettings { node_name: "node-a".into(), proxy: None, skmsg: true }
}

fn id(name: &str) -> ObjectRef {
    ObjectRef::new("default", name)
}

const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: reviews
spec:
  clusterIP: 10.96.0.10
  selector:
    app: reviews
  ports:
  - name: http
    port: 80
    targetPort: http
  - name: dns
    port: 53
    protocol: UDP
";

const MESH: &str = "\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-abc
  labels:
    kubernetes.io/service-name: reviews
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [10.1.0.1]
  targetRef: {kind: Pod, name: reviews-v1}
- addresses: [10.1.0.9]
  conditions: {ready: false}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v1
  labels: {app: reviews}
spec:
  serviceAccount: reviews
  addresses: [10.1.0.1]
  cgroupPath: /sys/fs/cgroup/reviews-v1
  weight: 80
  ports: {http: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v2
  namespace: default
  labels: {app: reviews}
spec:
  addresses: [10.1.0.2]
  node: node-b
  meshed: false
  weight: 20
  ports: {http: 8080}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: reviews-callers
spec:
  targetRefs:
  - {group: '', kind: Service, name: reviews}
  - {kind: Namespace, name: default}
  action: ALLOW
  rules:
  - from:
    - namespaces: [default]
      serviceAccounts: [frontend]
    - principals: ['spiffe://cluster.local/ns/prod/*']
    to:
    - ports: [80]
    - ports: [8080]
---
";

#[test]
fn valid_multi_doc_set_loads_into_the_snapshot() {
    let dir = TempDir::new("valid");
    dir.write("a-service.yaml", SERVICE).write("b-mesh.yml", MESH);
    let loaded = dir.load();

    let reviews_v1 = Workload {
        service_account: "reviews".into(),
        labels: BTreeMap::from([("app".into(), "reviews".into())]),
        cgroup: Some("/sys/fs/cgroup/reviews-v1".into()),
        weight: 80,
        ports: BTreeMap::from([("http".into(), 8080)]),
        ..Workload::new(id("reviews-v1"), vec!["10.1.0.1".parse().unwrap()])
    };
    let reviews_v2 = Workload {
        labels: BTreeMap::from([("app".into(), "reviews".into())]),
        node: Some("node-b".into()),
        meshed: false,
        weight: 20,
        ports: BTreeMap::from([("http".into(), 8080)]),
        ..Workload::new(id("reviews-v2"), vec!["10.1.0.2".parse().unwrap()])
    };
    let rules = vec![Rule {
        from: vec![
            Source {
                namespaces: vec!["default".into()],
                service_accounts: vec!["frontend".into()],
                principals: vec![],
            },
            Source { principals: vec!["spiffe://cluster.local/ns/prod/*".into()], ..Source::default() },
        ],
        to_ports: vec![80, 8080],
    }];
    let policy =
        |target| AuthorizationPolicy { id: id("reviews-callers"), target, action: Action::Allow, rules: rules.clone() };
    let expected = Loaded {
        snapshot: Snapshot {
            node: node(),
            services: vec![Service {
                id: id("reviews"),
                cluster_ip: Some("10.96.0.10".parse().unwrap()),
                ports: vec![
                    ServicePort {
                        name: Some("http".into()),
                        port: 80,
                        target_port: TargetPort::Name("http".into()),
                        protocol: Protocol::Tcp,
                        app_protocol: None,
                    },
                    ServicePort {
                        name: Some("dns".into()),
                        port: 53,
                        target_port: TargetPort::Number(53),
                        protocol: Protocol::Udp,
                        app_protocol: None,
                    },
                ],
                selector: Some(BTreeMap::from([("app".into(), "reviews".into())])),
                l7: false,
            }],
            endpoints: vec![EndpointSet {
                service: id("reviews"),
                ports: vec![(Some("http".into()), 8080)],
                endpoints: vec![
                    Endpoint { ip: "10.1.0.1".parse().unwrap(), ready: true, workload: Some(id("reviews-v1")) },
                    Endpoint { ip: "10.1.0.9".parse().unwrap(), ready: false, workload: None },
                ],
            }],
            workloads: vec![reviews_v1, reviews_v2],
            policies: vec![policy(PolicyTarget::Service("reviews".into())), policy(PolicyTarget::Namespace)],
        },
        errors: vec![],
        files: 2,
        objects: 5,
    };
    assert_eq!(loaded, expected);

    // And it compiles: 80/20 split, the slice's pod de-duplicated.
    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let svc = compiled.services.values().next().unwrap();
    assert_eq!(svc.backends.iter().map(|b| b.weight_end).collect::<Vec<_>>(), [80, 100]);
}

#[test]
fn fixtures_load_and_compile_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let loaded = load_dir(&dir, node()).unwrap();
    assert_eq!(loaded.errors, vec![], "{:#?}", loaded.errors);
    assert_eq!((loaded.files, loaded.objects), (2, 8));
    let compiled = compile(&loaded.snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let weights = |vip: &str, port: u16| {
        let (_, svc) =
            compiled.services.iter().find(|(k, _)| addr_to_string(&k.addr) == vip && k.port == port).unwrap();
        let backends = svc.backends.iter().map(|b| (addr_to_string(&b.addr), b.port, b.weight_end)).collect::<Vec<_>>();
        (backends, svc.value.flags)
    };
    let (reviews, flags) = weights("10.96.0.20", 9080);
    assert_eq!(reviews, [("10.244.1.11".into(), 8080, 80), ("10.244.2.12".into(), 8080, 100)]);
    assert_ne!(flags, 0, "the ALLOW policy makes reviews default-deny");
    let (ratings, flags) = weights("10.96.0.30", 9080);
    assert_eq!(ratings, [("192.168.50.2".into(), 9080, 1)]);
    assert_eq!(flags, 0);
    // productpage is the one local meshed workload; it is allowed to both reviews ports.
    let verdicts: Vec<_> = compiled.dump()["policy"].as_array().unwrap().iter().map(|e| e["verdict"].clone()).collect();
    assert_eq!(verdicts, ["ALLOW", "ALLOW"]);
}

/// A bad document's expected error: (document, object, field, message fragment).
type Expected = (usize, Option<&'static str>, Option<&'static str>, &'static str);

#[test]
fn each_bad_input_names_file_object_and_field() {
    const WORKLOAD: &str =
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\nmetadata: {name: ok}\nspec: {addresses: [10.1.0.7]}\n";
    let cases: Vec<(&str, String, Expected)> = vec![
        (
            "wrong type for a port",
            format!("{WORKLOAD}---\n{}", SERVICE.replace("port: 80", "port: eighty")),
            (
                1,
                Some("Service default/reviews"),
                Some("spec.ports[0].port"),
                "invalid type: string \"eighty\", expected i32",
            ),
        ),
        (
            "bad clusterIP",
            SERVICE.replace("10.96.0.10", "10.96.0.300"),
            (0, Some("Service default/reviews"), Some("spec.clusterIP"), "\"10.96.0.300\" is not an IPv4 address"),
        ),
        (
            "bad workload address",
            WORKLOAD.replace("[10.1.0.7]", "[10.1.0.7, fe80::1]"),
            (0, Some("Workload default/ok"), Some("spec.addresses[1]"), "fe80::1 is an IPv6 address"),
        ),
        (
            "wrong type in a CRD field",
            WORKLOAD.replace("addresses:", "weight: heavy, addresses:"),
            (0, Some("Workload default/ok"), Some("spec.weight"), "invalid type: string \"heavy\", expected u32"),
        ),
        (
            "unknown kind",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews, namespace: prod}\n".into(),
            (
                0,
                Some("Deployment prod/reviews"),
                None,
                "unsupported kind Deployment (apiVersion apps/v1); weft reads Service, EndpointSlice, Workload, AuthorizationPolicy",
            ),
        ),
        (
            "kind typo",
            SERVICE.replace("kind: Service", "kind: Servcie"),
            (0, Some("Servcie default/reviews"), None, "unsupported kind Servcie (apiVersion v1)"),
        ),
        (
            "missing name",
            SERVICE.replace("name: reviews", "labels: {}"),
            (0, Some("Service default/<unnamed>"), Some("metadata.name"), "missing; every object needs a name"),
        ),
        ("broken YAML", format!("{WORKLOAD}---\nkind: Service\nspec: {{ports: [\n"), (1, None, None, "invalid YAML: ")),
        (
            "not an object",
            "- just\n- a list\n".into(),
            (0, None, None, "not a Kubernetes object: apiVersion and kind are required"),
        ),
        (
            "slice without its service label",
            MESH.split("---").next().unwrap().replace("kubernetes.io/service-name", "app"),
            (
                0,
                Some("EndpointSlice default/reviews-abc"),
                Some("metadata.labels[\"kubernetes.io/service-name\"]"),
                "missing; set it to the name of the Service",
            ),
        ),
        (
            "bad item in a List",
            format!(
                "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}",
                WORKLOAD.replace('\n', "\n  "),
                SERVICE.replace("10.96.0.10", "None!").replace('\n', "\n  ")
            ),
            (0, Some("Service default/reviews"), Some("items[1].spec.clusterIP"), "\"None!\" is not an IPv4 address"),
        ),
        (
            "policy targeting an unsupported kind",
            MESH.split("---").nth(3).unwrap().replace("kind: Service,", "kind: Deployment,"),
            (
                0,
                Some("AuthorizationPolicy default/reviews-callers"),
                Some("spec.targetRefs[0].kind"),
                "unsupported kind \"Deployment\"; use Service or Namespace",
            ),
        ),
        (
            "unknown policy action",
            MESH.split("---").nth(3).unwrap().replace("ALLOW", "PERMIT"),
            (0, Some("AuthorizationPolicy default/reviews-callers"), Some("spec.action"), "unknown variant `PERMIT`"),
        ),
    ];
    for (name, bad, (document, object, field, message)) in cases {
        let dir = TempDir::new("bad");
        dir.write("a-good.yaml", &SERVICE.replace("reviews", "good")).write("b-bad.yaml", &bad);
        let loaded = dir.load();
        let [error] = loaded.errors.as_slice() else { panic!("{name}: expected one error, got {:#?}", loaded.errors) };
        assert_eq!(error.file, dir.0.join("b-bad.yaml"), "{name}");
        assert_eq!(
            (error.document, error.object.as_deref(), error.field.as_deref()),
            (document, object, field),
            "{name}: {error}"
        );
        assert!(error.message.contains(message), "{name}: {error}");
        if name == "broken YAML" {
            assert!(error.message.contains("at line 8 column 1"), "{name}: serde_yaml's position is kept: {error}");
        }
        // The good object next to it still loads.
        assert_eq!(loaded.snapshot.services.first().map(|s| s.id.name.as_str()), Some("good"), "{name}");
    }
}

#[test]
fn config_error_display() {
    let error = ConfigError {
        file: "config/a.yaml".into(),
        document: 1,
        object: Some("Service default/reviews".into()),
        field: Some("spec.ports[0].port".into()),
        message: "invalid type: string \"eighty\", expected u16".into(),
    };
    assert_eq!(
        error.to_string(),
        "config/a.yaml: doc 1: Service default/reviews: spec.ports[0].port: invalid type: string \"eighty\", expected u16"
    );
    let error = ConfigError { object: None, field: None, message: "invalid YAML".into(), ..error };
    assert_eq!(error.to_string(), "config/a.yaml: doc 1: invalid YAML");
}

#[test]
fn duplicate_object_in_a_later_file_is_rejected() {
    let dir = TempDir::new("dup");
    dir.write("a.yaml", SERVICE).write("b.yaml", &SERVICE.replace("10.96.0.10", "10.96.0.11"));
    let loaded = dir.load();
    assert_eq!(loaded.snapshot.services.len(), 1);
    assert_eq!(loaded.snapshot.services[0].cluster_ip, Some("10.96.0.10".parse().unwrap()));
    assert_eq!(loaded.objects, 1);
    let [error] = loaded.errors.as_slice() else { panic!("{:#?}", loaded.errors) };
    assert_eq!(
        (error.file.file_name().unwrap().to_str(), error.field.as_deref()),
        (Some("b.yaml"), Some("metadata.name"))
    );
    let first = dir.0.join("a.yaml");
    assert!(error.message.contains(&format!("in {} doc 0", first.display())), "{error}");
}

#[test]
fn reads_only_config_files_in_name_order() {
    let dir = TempDir::new("files");
    let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"clusterIP": "None"}}"#;
    dir.write("b.json", json)
        .write("a.yml", &SERVICE.replace("reviews", "a"))
        .write("c.yaml", "# only a comment\n---\n")
        .write(".hidden.yaml", "not: [valid")
        .write("notes.txt", "not: [valid");
    fs::create_dir(dir.0.join("sub.yaml")).unwrap();
    let loaded = dir.load();
    assert_eq!(loaded.errors, vec![]);
    assert_eq!((loaded.files, loaded.objects), (3, 2));
    let names: Vec<_> = loaded.snapshot.services.iter().map(|s| (s.id.name.as_str(), s.cluster_ip)).collect();
    assert_eq!(names, [("a", Some("10.96.0.10".parse().unwrap())), ("b", None)]);
}

#[test]
fn unreadable_directory_is_a_load_error() {
    let missing = std::env::temp_dir().join(format!("weft-api-missing-{}", std::process::id()));
    let error = load_dir(&missing, node()).unwrap_err();
    assert!(matches!(error, LoadError::ReadDir { .. }));
    assert!(error.to_string().starts_with(&format!("cannot read config directory {}: ", missing.display())), "{error}");
}
