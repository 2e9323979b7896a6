#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde_json::json;
use weft_policy::{JwksSource, TokenHeader};

use super::*;

/// A 2048-bit RSA private key (PKCS#1 DER, base64), made once for these tests with
/// `openssl genrsa -traditional 2048 | openssl rsa -outform DER -traditional | base64`.
/// It signs nothing but test tokens.
const TEST_RSA_KEY: &[&str] = &[
    "MIIEowIBAAKCAQEA3sRqTPTmy0eOzBdFatBz0iv0ByqXTYrPJ/A15G8reb1D0uCjUFdF88Z5QUCKg/fE7dcIXWvsQ9/TJR8GT4O0",
    "KXyzYoN7QZHtAco69iGhsxEiOqRICjluNqqOsUHO/93kMdyXifpv92XrpCbvkUSRqYh0xmCujQSjL2Cw21lTcQnX9vg6Q2j8sih0",
    "Xxm4MngkbbsGduBsP6f5LabUUI5EY3jPJmdTS8mSdZlxZxcBZxOUl5FwEgmbP4wJ55uexgTrM+K50n3IBiZEbYPYlzCMOM/439D9",
    "KmwxZ1yYG40SyjSmv0785DnRFa6f79pMYuroo0Nhmk4D+3ogfBObi1KmYQIDAQABAoIBAADlvaI/Dfflf9AuWS0VEqYXBCH+eOm/",
    "d+02GhN6dYfJ7rUa1Ah1KdWtF+yjPxXkn2d00EHwO5jFeYuxphsgk9ORCA7B4XMA8TmBbMprOl+Nv5lI6lIGFNAH0NU9FThq6PoX",
    "qSP7SL7wYgNMnqRFur9sZgnkDVrSnZ7lAjw+jhNf+kumTK7ENq8x5sKIgqgXf/Yk6Ki3n3NCwKjJ9Oasx24Qkae6y9ta2ys3b8wd",
    "6q6nmw7Jd0iE3TE8HcyDO3xw3xyCj13P2q37H66Ua9r84ezjD/3oqYbdlcK1UPz3eDjmGKoxWL9N7gibBRtZoJTOf9m45W/fAuSy",
    "531rAHcxCWkCgYEA/lM/YDvx4KQmWKao+IWyG8JJ04U9OK7rNVnBi8lzcWctqpksxTQVC5oIPJcuttf32TpVAlq6mQy8cWceiWJo",
    "yI0sfLV+O5OhteNEBhtaobvWjfxzvMuCNgbVKgR7JlMIJ0z5qW5TdT/UexqxDiNF3pw0BZm/yLp7Y8slfZt+HjkCgYEA4Dv3R0qF",
    "uBS2Zk6TOp14q+DYf+y02yFPZTJOD8xGr1R2N3baX65CT/fpxo0bX9bFtqedbW+wqs0ZOGr85ynhuZiA2wuBCYileF7CF7oytC/v",
    "Xwm5Hf29EO09zqzHzlyC/jj+IngH7vW+/vy5P313jnqfWd93EUT3SCTlS53KSWkCgYEA5ujQnuBuUQbY5h6TRemld7ykaQ8NMdzn",
    "I25V40RJs4n5lW4zju0lun3kwpaFTG+z0aA7tMKJrxI4OkJlIFmgR46d+LCUZyU4artodJ77X+L6/7lZn+2qUMFNYzPkWDyFJ6Gl",
    "ACdyUP9ePVNTtEFkW6S5OuiIj4h5JXc5l9zI2kkCgYAoVgEkXN5y/57UBnxrhdooKPkpAd6CsJpEnOj35IoujeX6EjI0FfetxO3T",
    "npx2//5u3fXusrG39876nBxERP9q0GkVfhtHKMKDRaBqfj8StLC9itU29ObmvZZpsCD9GR0jOANXFfpvXNtvqOx15E72XU5+7zjO",
    "7XYCD0kD8i1qSQKBgBwQejGzbyiPIU4Qq8aUOZGsOb4tGkr4S6t91UrdGjPqOsUGcFRXGljc7til1T9xbaMJoLYq/iko+56SjWnr",
    "o+TZDm0q9AjL3pK+XYNoskepKOEugWPAF//oaFUcUHpsagyW1DRRVp3B3gGqHzSqlZ8qbjDmgpWjM4487gtVsQBE",
];

const ISSUER: &str = "https://issuer.example";
const NOW: u64 = 1_700_000_000;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signing keys and the JWKS of their public halves: RSA "rsa-1" (no alg: RS256) and a fresh
/// EC P-256 "ec-1" (alg ES256).
struct Keys {
    rsa: EncodingKey,
    /// The RSA public key (PKCS#1 DER), the classic HMAC secret of key-confusion attacks.
    rsa_public: Vec<u8>,
    rsa_jwk: Value,
    ec: EncodingKey,
    ec_jwk: Value,
}

impl Keys {
    fn new() -> Self {
        let der = STANDARD.decode(TEST_RSA_KEY.concat()).unwrap();
        let pair = RsaKeyPair::from_der(&der).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        let rsa_jwk = json!({"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": b64(&public.n), "e": b64(&public.e)});
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec_pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        // Uncompressed point: 0x04 || x || y.
        let point = ec_pair.public_key().as_ref();
        let ec_jwk = json!({"kty": "EC", "kid": "ec-1", "crv": "P-256", "alg": "ES256", "x": b64(&point[1..33]), "y": b64(&point[33..])});
        Keys {
            rsa: EncodingKey::from_rsa_der(&der),
            rsa_public: pair.public().as_ref().to_vec(),
            rsa_jwk,
            ec: EncodingKey::from_ec_der(pkcs8.as_ref()),
            ec_jwk,
        }
    }

    fn jwks(&self) -> String {
        json!({"keys": [self.rsa_jwk, self.ec_jwk]}).to_string()
    }
}

fn rule() -> JwtRule {
    JwtRule { audiences: vec!["reviews".into()], ..JwtRule::new(ISSUER, JwksSource::Inline(String::new())) }
}

fn claims() -> Value {
    json!({"iss": ISSUER, "sub": "alice", "aud": "reviews", "iat": NOW, "exp": NOW + 600, "groups": ["gold_member"]})
}

/// `claims()` with `changes` applied (null removes a claim).
fn with(changes: Value) -> Value {
    let mut claims = claims();
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

fn mint(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// A token with a hand-written header and no signature.
fn unsigned(header: Value, claims: &Value) -> String {
    format!("{}.{}.", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

#[test]
fn verification_table() {
    let keys = Keys::new();
    let verifier = JwtVerifier::new(&rule(), &keys.jwks()).unwrap();
    let rs = |claims: &Value| mint(Algorithm::RS256, Some("rsa-1"), claims, &keys.rsa);
    let es = |claims: &Value| mint(Algorithm::ES256, Some("ec-1"), claims, &keys.ec);
    let tampered = {
        let token = rs(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(with(json!({"groups": ["admin"]})).to_string().as_bytes());
        format!("{}.{forged}.{}", parts[0], parts[2])
    };
    let not_allowed = |alg: &str| Err(JwtError::AlgorithmNotAllowed { alg: alg.into() });
    let cases: Vec<(&str, String, Result<(), JwtError>)> = vec![
        ("RS256 with the RSA key", rs(&claims()), Ok(())),
        ("ES256 with the EC key", es(&claims()), Ok(())),
        ("audience in a list", es(&with(json!({"aud": ["shop", "reviews"]}))), Ok(())),
        ("no exp is accepted (as Istio)", es(&with(json!({"exp": null}))), Ok(())),
        ("expired within the leeway", rs(&with(json!({"exp": NOW - 30}))), Ok(())),
        ("expired", rs(&with(json!({"exp": NOW - 61}))), Err(JwtError::Expired)),
        ("not yet valid", rs(&with(json!({"nbf": NOW + 120}))), Err(JwtError::NotYetValid)),
        ("nbf within the leeway", rs(&with(json!({"nbf": NOW + 30}))), Ok(())),
        ("exp that is not a number", rs(&with(json!({"exp": "tomorrow"}))), Err(JwtError::Malformed)),
        ("wrong audience", es(&with(json!({"aud": "billing"}))), Err(JwtError::WrongAudience)),
        ("no audience", es(&with(json!({"aud": null}))), Err(JwtError::WrongAudience)),
        ("wrong issuer", es(&with(json!({"iss": "https://evil.example"}))), Err(JwtError::WrongIssuer)),
        ("tampered payload", tampered, Err(JwtError::BadSignature)),
        ("unknown kid", mint(Algorithm::RS256, Some("rsa-2"), &claims(), &keys.rsa), Err(JwtError::UnknownKid)),
        ("no kid, several keys", mint(Algorithm::RS256, None, &claims(), &keys.rsa), Err(JwtError::UnknownKid)),
        (
            "RS256 header naming the EC key",
            mint(Algorithm::RS256, Some("ec-1"), &claims(), &keys.rsa),
            not_allowed("RS256"),
        ),
        (
            "RS384 where the RSA key allows RS256 only",
            mint(Algorithm::RS384, Some("rsa-1"), &claims(), &keys.rsa),
            not_allowed("RS384"),
        ),
        ("alg none", unsigned(json!({"alg": "none"}), &claims()), not_allowed("none")),
        ("alg none naming a key", unsigned(json!({"alg": "none", "kid": "rsa-1"}), &claims()), not_allowed("none")),
        (
            "key confusion: HS256 keyed with the RSA public key",
            mint(Algorithm::HS256, Some("rsa-1"), &claims(), &EncodingKey::from_secret(&keys.rsa_public)),
            not_allowed("HS256"),
        ),
        (
            "key confusion with the JWK's modulus as the secret",
            mint(
                Algorithm::HS512,
                Some("rsa-1"),
                &claims(),
                &EncodingKey::from_secret(keys.rsa_jwk["n"].as_str().unwrap().as_bytes()),
            ),
            not_allowed("HS512"),
        ),
        (
            "an unknown critical extension",
            unsigned(json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}), &claims()),
            Err(JwtError::Malformed),
        ),
        ("not a JWT", "abc".into(), Err(JwtError::Malformed)),
        ("two segments", "a.b".into(), Err(JwtError::Malformed)),
        ("four segments", format!("{}.x", rs(&claims())), Err(JwtError::Malformed)),
        ("a header that is not base64url JSON", "!!.e30.sig".into(), Err(JwtError::Malformed)),
    ];
    for (name, token, want) in cases {
        let got = verifier.verify(&token, now()).map(|claims| {
            assert_eq!(claims["sub"], "alice", "{name}");
        });
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_lone_key_verifies_tokens_without_kid_and_only_with_its_algorithm() {
    let keys = Keys::new();
    let verifier = JwtVerifier::new(&rule(), &json!({"keys": [keys.rsa_jwk]}).to_string()).unwrap();
    assert!(verifier.verify(&mint(Algorithm::RS256, None, &claims(), &keys.rsa), now()).is_ok());
    let other_kid = mint(Algorithm::RS256, Some("rsa-9"), &claims(), &keys.rsa);
    assert_eq!(verifier.verify(&other_kid, now()), Err(JwtError::UnknownKid), "the lone key has a kid of its own");
    let mut anonymous = keys.rsa_jwk.clone();
    anonymous.as_object_mut().unwrap().remove("kid");
    let verifier_without_kids = JwtVerifier::new(&rule(), &json!({"keys": [anonymous]}).to_string()).unwrap();
    assert!(verifier_without_kids.verify(&other_kid, now()).is_ok(), "a lone key without kid serves any kid");
    let confused = mint(Algorithm::HS256, None, &claims(), &EncodingKey::from_secret(&keys.rsa_public));
    assert_eq!(verifier.verify(&confused, now()), Err(JwtError::AlgorithmNotAllowed { alg: "HS256".into() }));
    // A key naming PS256 allows PS256 and nothing else.
    let mut ps = keys.rsa_jwk.clone();
    ps["alg"] = json!("PS256");
    let verifier = JwtVerifier::new(&rule(), &json!({"keys": [ps]}).to_string()).unwrap();
    assert!(verifier.verify(&mint(Algorithm::PS256, None, &claims(), &keys.rsa), now()).is_ok());
    let rs256 = mint(Algorithm::RS256, None, &claims(), &keys.rsa);
    assert_eq!(verifier.verify(&rs256, now()), Err(JwtError::AlgorithmNotAllowed { alg: "RS256".into() }));
}

#[test]
fn jwks_problems_table() {
    let keys = Keys::new();
    let mut wrong_alg = keys.rsa_jwk.clone();
    wrong_alg["alg"] = json!("ES256");
    let mut hs = keys.rsa_jwk.clone();
    hs["alg"] = json!("HS256");
    let mut encryption = keys.rsa_jwk.clone();
    encryption["use"] = json!("enc");
    let cases: Vec<(&str, String, &str)> = vec![
        ("not JSON", "{".into(), "unusable JWKS: not JSON"),
        ("no keys", "{}".into(), "unusable JWKS: no \"keys\" list"),
        (
            "a symmetric key",
            json!({"keys": [keys.ec_jwk, {"kty": "oct", "k": "c2VjcmV0"}]}).to_string(),
            "unusable JWKS: keys[1]: a symmetric (\"oct\") key",
        ),
        (
            "an alg that does not fit the key",
            json!({"keys": [wrong_alg]}).to_string(),
            "unusable JWKS: keys[0]: alg \"ES256\" does not fit a RSA key",
        ),
        (
            "an RSA key claiming HMAC",
            json!({"keys": [hs]}).to_string(),
            "unusable JWKS: keys[0]: alg \"HS256\" does not fit a RSA key",
        ),
        (
            "only an encryption key",
            json!({"keys": [encryption]}).to_string(),
            "unusable JWKS: no key that can verify signatures (keys[0]: not a signing key",
        ),
        (
            "bad key material",
            json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "!", "y": "!"}]}).to_string(),
            "unusable JWKS: keys[0]: invalid EC key",
        ),
    ];
    for (name, jwks, want) in cases {
        let err = JwtVerifier::new(&rule(), &jwks).unwrap_err();
        assert!(err.to_string().starts_with(want), "{name}: {err}");
        assert_eq!(err.label(), "jwks");
    }
    // Unusable keys next to usable ones are skipped, and said so.
    let p521 = json!({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"});
    let verifier = JwtVerifier::new(&rule(), &json!({"keys": [keys.ec_jwk, p521]}).to_string()).unwrap();
    assert_eq!(verifier.skipped(), ["keys[1]: unsupported curve Some(\"P-521\"); use P-256 or P-384"]);
}

#[test]
fn token_locations() {
    let headers = |list: &'static [(&'static str, &'static str)]| {
        move |name: &str| list.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    };
    let default = rule();
    assert_eq!(extract_token(&default, headers(&[("authorization", "Bearer abc.def.ghi")]), None), Some("abc.def.ghi"));
    assert_eq!(extract_token(&default, headers(&[("authorization", "bearer   abc ")]), None), Some("abc"));
    assert_eq!(extract_token(&default, headers(&[("authorization", "Basic dXNlcg==")]), None), None);
    assert_eq!(extract_token(&default, headers(&[("authorization", "Bearer ")]), None), None);
    assert_eq!(extract_token(&default, headers(&[]), Some("access_token=abc")), None, "params only when listed");
    let custom = JwtRule {
        from_headers: vec![TokenHeader { name: "x-jwt".into(), prefix: String::new() }],
        from_params: vec!["access_token".into()],
        ..rule()
    };
    assert_eq!(extract_token(&custom, headers(&[("x-jwt", "abc")]), Some("access_token=def")), Some("abc"));
    assert_eq!(extract_token(&custom, headers(&[]), Some("a=1&access_token=def&b=2")), Some("def"));
    assert_eq!(extract_token(&custom, headers(&[]), Some("access_token=&b=2")), None);
    assert_eq!(extract_token(&custom, headers(&[]), None), None);
}

#[test]
fn authentication_picks_the_rule_by_issuer() {
    let keys = Keys::new();
    let other_issuer = "https://other.example";
    let first = JwtVerifier::new(&rule(), &json!({"keys": [keys.rsa_jwk]}).to_string()).unwrap();
    let second_rule = JwtRule { issuer: other_issuer.into(), from_params: vec!["access_token".into()], ..rule() };
    let second = JwtVerifier::new(&second_rule, &json!({"keys": [keys.ec_jwk]}).to_string()).unwrap();
    let verifiers = [&first, &second];

    let token = mint(Algorithm::ES256, Some("ec-1"), &with(json!({"iss": other_issuer})), &keys.ec);
    let header = format!("Bearer {token}");
    let got = authenticate(&verifiers, |n| (n == "authorization").then_some(header.as_str()), None, now());
    assert_eq!(got.unwrap().unwrap()["iss"], other_issuer);
    // The same token in the second rule's query parameter.
    let query = format!("access_token={token}");
    let got = authenticate(&verifiers, |_| None, Some(&query), now()).unwrap().unwrap();
    assert_eq!(got["sub"], "alice");

    let unknown = mint(Algorithm::RS256, Some("rsa-1"), &with(json!({"iss": "https://nobody"})), &keys.rsa);
    let query = format!("access_token={unknown}");
    assert_eq!(authenticate(&verifiers, |_| None, Some(&query), now()), Err(JwtError::WrongIssuer));

    let expired = mint(Algorithm::RS256, Some("rsa-1"), &with(json!({"exp": NOW - 3600})), &keys.rsa);
    let header = format!("Bearer {expired}");
    let got = authenticate(&verifiers, |n| (n == "authorization").then_some(header.as_str()), None, now());
    assert_eq!(got, Err(JwtError::Expired), "an invalid token is refused even when none is required");

    assert_eq!(authenticate(&verifiers, |_| None, Some("x=1"), now()), Ok(None), "no token, none required");
    assert_eq!(authenticate(&verifiers, |_| None, Some("access_token=garbage"), now()), Err(JwtError::Malformed));
    let required =
        JwtVerifier::new(&JwtRule { required: true, ..rule() }, &json!({"keys": [keys.rsa_jwk]}).to_string()).unwrap();
    assert_eq!(authenticate(&[&first, &required], |_| None, None, now()), Err(JwtError::Missing));
}

/// A rule without keys (a broken JWKS, or a `jwksUri` not fetched yet) refuses the tokens of
/// its issuer and nothing else: other issuers' tokens are verified by their rules, and a request
/// without a token is judged as if the keys were there.
#[test]
fn a_rule_without_keys_refuses_its_issuers_tokens() {
    let keys = Keys::new();
    let other_issuer = "https://other.example";
    let why = "JWKS from https://issuer.example/jwks not fetched yet: answered 503 Service Unavailable";
    let keyless = JwtVerifier::with_keys(Arc::new(rule()), Err(why.into()));
    let other_rule = JwtRule { issuer: other_issuer.into(), ..rule() };
    let other = JwtVerifier::new(&other_rule, &json!({"keys": [keys.ec_jwk]}).to_string()).unwrap();
    let verifiers = [&keyless, &other];
    let bearer = |token: &str| format!("Bearer {token}");

    let mine = bearer(&mint(Algorithm::RS256, Some("rsa-1"), &claims(), &keys.rsa));
    let got = authenticate(&verifiers, |n| (n == "authorization").then_some(mine.as_str()), None, now());
    assert_eq!(got, Err(JwtError::NoKeys(why.into())));
    assert_eq!(JwtError::NoKeys(why.into()).label(), "no_keys");
    assert_eq!(JwtError::NoKeys(why.into()).to_string(), why);

    let theirs = bearer(&mint(Algorithm::ES256, Some("ec-1"), &with(json!({"iss": other_issuer})), &keys.ec));
    let got = authenticate(&verifiers, |n| (n == "authorization").then_some(theirs.as_str()), None, now());
    assert_eq!(got.unwrap().unwrap()["iss"], other_issuer);

    assert_eq!(authenticate(&verifiers, |_| None, None, now()), Ok(None), "no token, none required");
    let required = JwtVerifier::with_keys(Arc::new(JwtRule { required: true, ..rule() }), Err(why.into()));
    assert_eq!(authenticate(&[&required], |_| None, None, now()), Err(JwtError::Missing));
    // alg none is refused before the keys are looked at.
    let none = bearer(&unsigned(json!({"alg": "none"}), &claims()));
    let got = authenticate(&verifiers, |n| (n == "authorization").then_some(none.as_str()), None, now());
    assert_eq!(got, Err(JwtError::AlgorithmNotAllowed { alg: "none".into() }));
}

/// Verified claims drive AuthorizationPolicy `when` conditions; space-delimited claims match
/// item by item once the verifier has split them.
#[test]
fn verified_claims_feed_authorization() {
    use std::collections::BTreeMap;

    use weft_policy::authz::{Destination, HttpRequest, Request};
    use weft_policy::*;

    let keys = Keys::new();
    let rule = JwtRule { space_delimited_claims: vec!["groups".into()], ..rule() };
    let verifier = JwtVerifier::new(&rule, &keys.jwks()).unwrap();
    let token = mint(
        Algorithm::ES256,
        Some("ec-1"),
        &with(json!({"groups": "silver gold_member", "scope": "read write"})),
        &keys.ec,
    );
    let claims = verifier.verify(&token, now()).unwrap();
    assert_eq!(claims["groups"], json!(["silver", "gold_member"]));
    assert_eq!(claims["scope"], json!(["read", "write"]), "scope is always space-delimited");

    let condition = |key: &str, value: &str| Condition {
        key: key.parse().unwrap(),
        values: vec![value.parse().unwrap()],
        not_values: vec![],
    };
    let snapshot = Snapshot {
        node: NodeSettings { proxy: Some("10.0.0.1:15001".parse().unwrap()), ..NodeSettings::default() },
        services: vec![Service {
            id: ObjectRef::new("default", "reviews"),
            cluster_ip: Some("10.96.0.10".parse().unwrap()),
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: TargetPort::Number(80),
                protocol: Protocol::Tcp,
                app_protocol: None,
            }],
            selector: Some(BTreeMap::new()),
            l7: false,
        }],
        policies: vec![AuthorizationPolicy {
            id: ObjectRef::new("default", "gold"),
            target: PolicyTarget::Service("reviews".into()),
            action: Action::Allow,
            rules: vec![Rule {
                when: vec![
                    condition("request.auth.claims[groups]", "gold_member"),
                    condition("request.auth.principal", "https://issuer.example/alice"),
                ],
                ..Rule::default()
            }],
        }],
        ..Snapshot::default()
    };
    let compiled = compile(&snapshot);
    assert_eq!(compiled.rejected, vec![]);
    let dest = Destination { service: Some("10.96.0.10:80".parse().unwrap()), workload: None };
    let no_headers = |_: &str| None;
    let request = |claims| Request {
        source: None,
        port: 80,
        http: Some(HttpRequest { method: "GET", path: "/", host: None, header: &no_headers, claims }),
    };
    assert!(compiled.authz.evaluate(&dest, &request(Some(&claims))).is_allowed());
    assert!(!compiled.authz.evaluate(&dest, &request(None)).is_allowed());
}
