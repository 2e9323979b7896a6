//! L7 authorization and JWT in the node proxy on a real kernel: connect4 hands the protected
//! service to the proxy, which judges each request (identity x path x method x claim) and
//! answers 403 (policy) or 401 (token) with the reason, counted and access-logged. Needs root.

use std::{
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde_json::{Value, json};
use weft_testbed::{
    Pod, Proc, Testbed,
    agent::{Agent, service_yaml, workload_yaml},
    probe::{n, run as probe},
};

const SECS: Duration = Duration::from_secs(20);
const API: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const ISSUER: &str = "https://issuer.weft.test";

/// An ES256 signing key and its JWKS.
struct Issuer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl Issuer {
    fn new() -> Issuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("load key");
        Issuer { key, rng }
    }

    fn jwks(&self) -> String {
        // Uncompressed point: 0x04 || X || Y.
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        json!({ "keys": [{ "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": B64.encode(x), "y": B64.encode(y) }] })
            .to_string()
    }

    fn token(&self, header: Value, claims: Value) -> String {
        let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let signature = self.key.sign(&self.rng, input.as_bytes()).expect("sign");
        format!("{input}.{}", B64.encode(signature.as_ref()))
    }

    fn valid(&self, groups: &[&str], exp_in: i64) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64;
        let claims = json!({ "iss": ISSUER, "aud": "api", "sub": "alice", "groups": groups, "iat": now, "exp": now + exp_in });
        self.token(json!({ "alg": "ES256", "typ": "JWT", "kid": "k1" }), claims)
    }
}

fn policies(jwks: &str) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: api-readers, namespace: default}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  action: ALLOW
  rules:
  - from:
    - serviceAccounts: [web]
    to:
    - methods: [GET]
      paths: ["/public/*"]
  - to:
    - paths: ["/gold/*"]
    when:
    - key: request.auth.claims[groups]
      values: [gold_member]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: default}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  action: DENY
  rules:
  - to:
    - paths: ["/admin*", "/public/admin*"]
---
apiVersion: weft.dev/v1alpha1
kind: JwtPolicy
metadata: {{name: issuer, namespace: default}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  rules:
  - issuer: {ISSUER}
    audiences: [api]
    jwks: '{jwks}'
---
"#
    )
}

struct Scene {
    _tb: Testbed,
    web: Pod,
    other: Pod,
    agent: Agent,
    _server: Proc,
}

impl Scene {
    fn new(issuer: &Issuer) -> Scene {
        Scene::with_policies(&policies(&issuer.jwks()))
    }

    fn with_policies(policies: &str) -> Scene {
        let tb = Testbed::new();
        let node = tb.add_node("n1");
        let (web, other, api) = (node.add_pod("web"), node.add_pod("other"), node.add_pod("api"));
        let mut cmd = api.command(Testbed::probe_path());
        cmd.args(["http-serve", "--port", "8080", "--name", "api"]);
        let server = api.spawn(cmd);
        api.wait_listening(8080, Duration::from_secs(5));
        let proxy = format!("{}:15001", node.ip());
        let mut agent = Agent::start_with(&tb, &node, &["--proxy-addr", &proxy], true);
        let mut config = service_yaml("api", "default", API, 80, 8080, "api");
        for pod in [&web, &other, &api] {
            config += &workload_yaml(pod, "default", &[("app", pod.name())], 1);
        }
        config += policies;
        agent.write_config("mesh.yaml", &config);
        agent.wait_ready(SECS);
        agent.wait_generation_after(0, SECS);
        Scene { _tb: tb, web, other, agent, _server: server }
    }
}

/// (who, method, path, headers, expected status, text the body must contain).
type Case<'a> = (&'a Pod, &'a str, &'a str, Vec<String>, u64, &'a str);

/// One request from `pod`: (status, body).
fn request(pod: &Pod, method: &str, path: &str, headers: &[&str]) -> (u64, String) {
    let addr = format!("{API}:80");
    let mut args = vec!["http-get", "--addr", &addr, "--path", path, "--method", method];
    for h in headers {
        args.extend_from_slice(&["--header", h]);
    }
    let out = probe(pod, &args);
    let codes = out["codes"].as_object().unwrap_or_else(|| panic!("no codes: {out}"));
    assert_eq!(codes.len(), 1, "{out}");
    let (code, _) = codes.iter().next().expect("one code");
    (code.parse().expect("numeric code"), out["last_body"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn requests_are_judged_by_identity_path_method_and_claims() {
    let issuer = Issuer::new();
    let scene = Scene::new(&issuer);
    let bearer = |token: &str| format!("authorization: Bearer {token}");
    let gold = bearer(&issuer.valid(&["gold_member"], 3600));
    let silver = bearer(&issuer.valid(&["silver"], 3600));
    let expired = bearer(&issuer.valid(&["gold_member"], -3600));
    let mut tampered = issuer.valid(&["silver"], 3600);
    // Swap in a payload claiming gold, keeping silver's signature.
    let gold_payload = issuer.valid(&["gold_member"], 3600).split('.').nth(1).expect("payload").to_owned();
    let parts: Vec<&str> = tampered.split('.').collect();
    tampered = format!("{}.{gold_payload}.{}", parts[0], parts[2]);
    let alg_none = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        B64.encode(json!({"iss": ISSUER, "aud": "api", "groups": ["gold_member"]}).to_string())
    );

    // (who, method, path, headers) -> status, reason in the body
    let cases: Vec<Case> = vec![
        (&scene.web, "GET", "/public/a", vec![], 200, ""),
        (&scene.web, "POST", "/public/a", vec![], 403, "no ALLOW policy matched; policies selecting it: default/api-readers"),
        (&scene.other, "GET", "/public/a", vec![], 403, "no ALLOW policy matched"),
        (&scene.web, "GET", "/admin", vec![], 403, "denied by policy default/no-admin"),
        // Normalised before judging: dot segments cannot dodge the DENY.
        (&scene.web, "GET", "/public/../admin/x", vec![], 403, "denied by policy default/no-admin"),
        (&scene.other, "GET", "/gold/x", vec![], 403, "no ALLOW policy matched"),
        (&scene.other, "GET", "/gold/x", vec![gold.clone()], 200, ""),
        (&scene.other, "POST", "/gold/x", vec![gold.clone()], 200, ""),
        (&scene.other, "GET", "/gold/x", vec![silver.clone()], 403, "no ALLOW policy matched"),
        (&scene.other, "GET", "/gold/x", vec![expired], 401, ""),
        (&scene.other, "GET", "/gold/x", vec![bearer(&tampered)], 401, ""),
        (&scene.other, "GET", "/gold/x", vec![bearer(&alg_none)], 401, ""),
        // A bad token is refused even where no claim is needed.
        (&scene.web, "GET", "/public/a", vec![bearer("not.a.token")], 401, ""),
    ];
    for (pod, method, path, headers, want, reason) in &cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, body) = request(pod, method, path, &headers);
        assert_eq!(status, *want, "{} {method} {path} {headers:?}: {body}", pod.name());
        assert!(body.contains(reason), "{} {method} {path}: body {body:?} lacks {reason:?}", pod.name());
    }

    let deny_admin = scene.agent.metric(
        "weft_proxy_authz_refusals_total",
        &[("kind", "authz"), ("reason", "denied_by_policy"), ("policy", "default/no-admin")],
    );
    assert_eq!(deny_admin, 2.0, "two requests hit the DENY policy");
    let no_match = scene.agent.metric("weft_proxy_authz_refusals_total", &[("kind", "authz"), ("reason", "no_allow_match")]);
    assert_eq!(no_match, 4.0);
    let jwt = scene.agent.metric("weft_proxy_authz_refusals_total", &[("kind", "jwt")]);
    assert_eq!(jwt, 4.0, "expired, tampered, alg none, malformed");
    assert_eq!(scene.agent.metric("weft_proxy_authz_refusals_total", &[("kind", "jwt"), ("reason", "expired")]), 1.0);

    // The access log names the deciding policy and why (lines land as responses end).
    let lines = scene.agent.wait_access_records(cases.len(), SECS, |v| v["kind"] == "http");
    let log = scene.agent.access_log();
    let admin = lines.iter().find(|l| l["path"] == "/admin").unwrap_or_else(|| panic!("no /admin line in\n{log}"));
    assert_eq!(admin["status"], 403);
    assert_eq!(admin["route"], "authz");
    assert_eq!(admin["authz"]["policy"], "default/no-admin");
    assert!(admin["authz"]["denied"].as_str().is_some_and(|r| r.contains("denied by policy")), "{admin}");
    let allowed = lines.iter().find(|l| l["path"] == "/gold/x" && l["status"] == 200).expect("an allowed /gold line");
    assert_eq!(allowed["authz"]["policy"], "default/api-readers");
    assert_eq!(n(&json!(lines.len())), cases.len() as u64, "one line per request");
}

/// A selector policy binds the pods it selects, whoever's Service the caller dialled: this node's
/// proxy judges it once it has picked a local endpoint, on the request as routed.
#[test]
fn a_selector_policy_is_judged_for_callers_on_the_same_node() {
    let scene = Scene::with_policies(
        r#"apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-pods, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from:
    - serviceAccounts: [web]
    to:
    - methods: [GET]
      paths: ["/public/*"]
---
"#,
    );
    let cases = [
        (&scene.web, "GET", "/public/a", 200, ""),
        (&scene.web, "GET", "/private/a", 403, "no ALLOW policy matched; policies selecting it: default/api-pods"),
        (&scene.web, "POST", "/public/a", 403, "no ALLOW policy matched"),
        (&scene.other, "GET", "/public/a", 403, "no ALLOW policy matched"),
    ];
    for (pod, method, path, want, reason) in cases {
        let (status, body) = request(pod, method, path, &[]);
        assert_eq!(status, want, "{} {method} {path}: {body}", pod.name());
        assert!(body.contains(reason), "{} {method} {path}: body {body:?} lacks {reason:?}", pod.name());
    }
    let refused = scene.agent.metric("weft_proxy_authz_refusals_total", &[("kind", "authz"), ("reason", "no_allow_match")]);
    assert_eq!(refused, 3.0);
}
