//! The CRDs validate as the API server would validate them: the schema's defaults applied,
//! then its structure (types, required fields, enums, bounds, patterns, no unknown fields),
//! then the CEL rules (`x-kubernetes-validations`). Every rule compiles; every sample object in
//! `manifests/samples` passes and round-trips through its Rust type; each seeded mistake fails
//! with its rule's message.

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

/// What of the schema's structure `value` breaks, as "path: problem".
fn structural(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let mut fail = |problem: String| out.push(format!("{path}: {problem}"));
    if value.is_null() {
        if schema["nullable"] != true {
            fail("null where the schema allows none".into());
        }
        return;
    }
    let expected = schema["type"].as_str().unwrap_or("any");
    let fits = match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !fits {
        return fail(format!("not of type {expected}: {value}"));
    }
    if let Some(allowed) = schema["enum"].as_array().filter(|e| !e.contains(value)) {
        fail(format!("{value} is not one of {allowed:?}"));
    }
    if let Some(n) = value.as_f64()
        && (schema["minimum"].as_f64().is_some_and(|min| n < min)
            || schema["maximum"].as_f64().is_some_and(|max| n > max))
    {
        fail(format!("{n} is out of [{}, {}]", schema["minimum"], schema["maximum"]));
    }
    if let Some(text) = value.as_str() {
        let length = text.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| length < min)
            || schema["maxLength"].as_u64().is_some_and(|max| length > max)
        {
            fail(format!("length {length} is out of [{}, {}]", schema["minLength"], schema["maxLength"]));
        }
        if let Some(pattern) = schema["pattern"].as_str() {
            let regex = regex_lite::Regex::new(pattern).unwrap_or_else(|e| panic!("{path}: pattern {pattern}: {e}"));
            if !regex.is_match(text) {
                fail(format!("{text:?} does not match {pattern}"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        let count = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|min| count < min)
            || schema["maxItems"].as_u64().is_some_and(|max| count > max)
        {
            fail(format!("{count} items is out of [{}, {}]", schema["minItems"], schema["maxItems"]));
        }
        for (i, item) in items.iter().enumerate() {
            structural(&schema["items"], item, &format!("{path}[{i}]"), out);
        }
    }
    if let Some(object) = value.as_object() {
        for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !object.contains_key(required) {
                out.push(format!("{path}: {required} is required"));
            }
        }
        let properties = schema["properties"].as_object();
        for (name, child) in object {
            let field = format!("{path}.{name}");
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            match (properties.and_then(|p| p.get(name)), additional) {
                (Some(property), _) | (None, Some(property)) => structural(property, child, &field, out),
                // What every object has is the API server's own, as is an object the schema
                // does not describe (metadata).
                (None, None) if path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) => {}
                (None, None) if properties.is_some() => out.push(format!("{field}: unknown field")),
                (None, None) => {}
            }
        }
    }
}

/// The structural problems and the messages of the rules `object` breaks.
fn check(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().expect("kind");
    let schema = schema_of(kind);
    let mut object = object.clone();
    apply_defaults(&schema, &mut object);
    let mut problems = Vec::new();
    structural(&schema, &object, "", &mut problems);
    let mut out = Vec::new();
    violations(&schema, &object, "", &mut out);
    problems.extend(out.into_iter().map(|(path, message)| format!("{path}: {message}")));
    problems
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
fn sample_objects_validate_and_round_trip() {
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
            let kind = object["kind"].as_str().expect("kind").to_owned();
            round_trip(&kind, &object);
            kinds.insert(kind);
        }
    }
    let every: BTreeSet<String> = schemas().into_iter().map(|(kind, _)| kind).collect();
    assert_eq!(kinds, every, "the samples show every weft kind");
}

/// Through the kind's Rust type and back, nothing of `object` is lost or changed, and a second
/// trip changes nothing more.
fn round_trip(kind: &str, object: &Value) {
    use weft_api::crd::{AuthorizationPolicy, JwtPolicy, PeerAuthentication, TrafficPolicy, Workload};
    fn through<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value) -> Value {
        let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{value}: {e}"));
        serde_json::to_value(typed).expect("serializable")
    }
    fn kept(original: &Value, trip: &Value, path: &str) {
        match (original, trip) {
            (Value::Object(a), Value::Object(b)) => {
                for (key, value) in a {
                    let back = b.get(key).unwrap_or_else(|| panic!("{path}.{key} is lost through the type"));
                    kept(value, back, &format!("{path}.{key}"));
                }
            }
            (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
                a.iter().zip(b).enumerate().for_each(|(i, (x, y))| kept(x, y, &format!("{path}[{i}]")));
            }
            // Numbers may come back as another JSON number type of the same value.
            (Value::Number(a), Value::Number(b)) => assert_eq!(a.as_f64(), b.as_f64(), "{path}"),
            (a, b) => assert_eq!(a, b, "{path} changes through the type"),
        }
    }
    let trip: fn(&Value) -> Value = match kind {
        "Workload" => through::<Workload>,
        "AuthorizationPolicy" => through::<AuthorizationPolicy>,
        "JwtPolicy" => through::<JwtPolicy>,
        "TrafficPolicy" => through::<TrafficPolicy>,
        "PeerAuthentication" => through::<PeerAuthentication>,
        other => panic!("no Rust type for {other}"),
    };
    let once = trip(object);
    assert_eq!(trip(&once), once, "{kind}: a second trip changes it");
    kept(object, &once, kind);
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

#[test]
fn each_seeded_mistake_breaks_the_schema() {
    let policy = |spec: Value| json!({"kind": "TrafficPolicy", "metadata": {"name": "t"}, "spec": spec});
    let service = || json!([{"kind": "Service", "name": "web"}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "an unknown kind of target",
            policy(json!({"targetRefs": [{"kind": "Pod", "name": "web"}]})),
            ".spec.targetRefs[0].kind: \"Pod\" is not one of",
        ),
        ("no targets", policy(json!({"targetRefs": []})), ".spec.targetRefs: 0 items is out of [1"),
        (
            "a namespaced name",
            policy(json!({"targetRefs": [{"kind": "Service", "name": "shop/web"}]})),
            "does not match ^[^/]*$",
        ),
        (
            "a misspelt field",
            policy(json!({"targetRefs": service(), "retry": {"attempts": 2}})),
            ".spec.retry: unknown field",
        ),
        (
            "a string for a number",
            policy(json!({"targetRefs": service(), "retries": {"attempts": "two"}})),
            ".spec.retries.attempts: not of type integer",
        ),
        ("no target at all", policy(json!({})), ".spec: targetRefs is required"),
        (
            "a port past 65535",
            json!({"kind": "Workload", "metadata": {"name": "w"}, "spec": {"addresses": ["10.0.0.1"], "ports": {"http": 70000}}}),
            ".spec.ports.http: 70000 is out of [0",
        ),
        (
            "a mode that does not exist",
            json!({"kind": "PeerAuthentication", "metadata": {"name": "p"}, "spec": {"mtls": {"mode": "strict"}}}),
            ".spec.mtls.mode: \"strict\" is not one of",
        ),
    ];
    for (name, object, want) in cases {
        let got = check(&object);
        assert!(got.iter().any(|g| g.contains(want)), "{name}: want a problem with {want:?}, got {got:?}");
    }
}
