//! The CRDs' CEL rules (`x-kubernetes-validations`) run as the API server runs them, after the
//! schema's defaults are applied: every rule compiles, every sample object in
//! `manifests/samples` passes them all, and each seeded mistake fails with its rule's message.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};

/// (kind, openAPIV3Schema) of every weft CRD.
fn schemas() -> Vec<(String, Value)> {
    weft_api::crd::all()
        .into_iter()
        .map(|(_, crd)| {
            let crd = serde_json::to_value(&crd).expect("serializable CRD");
            let kind = crd["spec"]["names"]["kind"].as_str().expect("kind").to_owned();
            (kind, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
        })
        .collect()
}

fn schema_of(kind: &str) -> Value {
    schemas().into_iter().find(|(k, _)| k == kind).unwrap_or_else(|| panic!("no CRD of kind {kind}")).1
}

/// Fills in missing properties that have a `default`, at every level, as the API server does
/// before validating.
fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(object) => {
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                if let (None, Some(default)) = (object.get(name), property.get("default")) {
                    object.insert(name.clone(), default.clone());
                }
                if let Some(child) = object.get_mut(name) {
                    apply_defaults(property, child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| apply_defaults(&schema["items"], item)),
        _ => {}
    }
}

/// Runs every rule of `schema` and below on `value`: (path, message) of each that does not hold.
fn violations(schema: &Value, value: &Value, path: &str, out: &mut Vec<(String, String)>) {
    if value.is_null() {
        return;
    }
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let (text, message) =
            (rule["rule"].as_str().expect("rule"), rule["message"].as_str().unwrap_or("(no message)"));
        let program =
            cel::Program::compile(text).unwrap_or_else(|e| panic!("{path}: rule {text:?} does not compile: {e}"));
        let mut context = cel::Context::default();
        context.add_variable("self", value.clone()).expect("a JSON value");
        match program.execute(&context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => out.push((path.to_owned(), message.to_owned())),
            other => panic!("{path}: rule {text:?} on {value} gives {other:?}, not a boolean"),
        }
    }
    match value {
        Value::Object(object) => {
            for (name, child) in object {
                let property = schema["properties"].get(name).or_else(|| schema.get("additionalProperties"));
                if let Some(property) = property {
                    violations(property, child, &format!("{path}.{name}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                violations(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The messages of the rules `object` breaks.
fn check(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("kind");
    let schema = schema_of(kind);
    let mut object = object.clone();
    apply_defaults(&schema, &mut object);
    let mut out = Vec::new();
    violations(&schema, &object, "", &mut out);
    out.into_iter().map(|(path, message)| format!("{path}: {message}")).collect()
}

fn every_rule_message() -> BTreeSet<String> {
    fn walk(schema: &Value, out: &mut BTreeSet<String>) {
        for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
            out.insert(rule["message"].as_str().expect("every rule says what to fix").to_owned());
        }
        for child in schema["properties"].as_object().into_iter().flatten().map(|(_, v)| v) {
            walk(child, out);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = schema.get(key).filter(|c| c.is_object()) {
                walk(child, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    schemas().iter().for_each(|(_, schema)| walk(schema, &mut out));
    out
}

#[test]
fn sample_objects_pass_every_rule() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/samples/standalone");
    let mut kinds = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("samples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("sample");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document).expect("YAML");
            if object["apiVersion"] != "weft.dev/v1alpha1" {
                continue;
            }
            let broken = check(&object);
            assert!(
                broken.is_empty(),
                "{}: {} {}: {broken:?}",
                path.display(),
                object["kind"],
                object["metadata"]["name"]
            );
            kinds.insert(object["kind"].as_str().expect("kind").to_owned());
        }
    }
    let every: BTreeSet<String> = schemas().into_iter().map(|(kind, _)| kind).collect();
    assert_eq!(kinds, every, "the samples show every weft kind");
}

#[test]
fn each_seeded_mistake_breaks_its_rule() {
    let target = |refs: Value| json!({"kind": "TrafficPolicy", "metadata": {"name": "t"}, "spec": {"targetRefs": refs, "retries": {"attempts": 2}}});
    let jwt = |rule: Value| {
        json!({"kind": "JwtPolicy", "metadata": {"name": "j"},
               "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], "rules": [rule]}})
    };
    let group = "group \"\" for a Service, \"gateway.networking.k8s.io\" for a route";
    let one_jwks = "set exactly one of jwks and jwksUri";
    let cases: Vec<(&str, Value, Vec<String>)> = vec![
        ("a Service without a group", target(json!([{"kind": "Service", "name": "web"}])), vec![]),
        (
            "a Service in the route group",
            target(json!([{"group": "gateway.networking.k8s.io", "kind": "Service", "name": "web"}])),
            vec![format!(".spec.targetRefs[0]: {group}")],
        ),
        (
            "a route without its group (the default \"\")",
            target(json!([{"kind": "HTTPRoute", "name": "r"}])),
            vec![format!(".spec.targetRefs[0]: {group}")],
        ),
        (
            "a route in its group",
            target(json!([{"group": "gateway.networking.k8s.io", "kind": "GRPCRoute", "name": "r"}])),
            vec![],
        ),
        (
            "inline and fetched keys",
            jwt(json!({"issuer": "i", "jwks": "{}", "jwksUri": "https://i/keys"})),
            vec![format!(".spec.rules[0]: {one_jwks}")],
        ),
        ("no keys", jwt(json!({"issuer": "i"})), vec![format!(".spec.rules[0]: {one_jwks}")]),
        (
            "a refresh of inline keys",
            jwt(json!({"issuer": "i", "jwks": "{}", "refreshInterval": "5m"})),
            vec![
                ".spec.rules[0]: refreshInterval only applies to jwksUri; an inline jwks changes with the policy"
                    .to_owned(),
            ],
        ),
        (
            "a refresh of fetched keys",
            jwt(json!({"issuer": "i", "jwksUri": "https://i/keys", "refreshInterval": "5m"})),
            vec![],
        ),
        (
            "a policy on nothing (targetRefs defaults to [])",
            json!({"kind": "AuthorizationPolicy", "metadata": {"name": "a"}, "spec": {"action": "DENY"}}),
            vec![".spec: set targetRefs, selector or both".to_owned()],
        ),
        (
            "an empty selector",
            json!({"kind": "PeerAuthentication", "metadata": {"name": "p"},
                "spec": {"selector": {"matchLabels": {}}, "mtls": {"mode": "STRICT"}}}),
            vec![".spec.selector.matchLabels: name at least one label".to_owned()],
        ),
        (
            "a selector policy",
            json!({"kind": "AuthorizationPolicy", "metadata": {"name": "a"},
                "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW"}}),
            vec![],
        ),
        (
            "an empty selector on a JwtPolicy",
            json!({"kind": "JwtPolicy", "metadata": {"name": "j"},
                "spec": {"selector": {"matchLabels": {}}, "rules": [{"issuer": "i", "jwks": "{}"}]}}),
            vec![".spec.selector.matchLabels: name at least one label".to_owned()],
        ),
    ];
    let mut broken_rules = BTreeSet::new();
    for (name, object, want) in cases {
        let got = check(&object);
        assert_eq!(got, want, "{name}");
        broken_rules.extend(got.iter().map(|g| g.split_once(": ").expect("path: message").1.to_owned()));
    }
    assert_eq!(broken_rules, every_rule_message(), "every rule of the CRDs is seen to fail");
}
