//! weft's AuthorizationPolicy and JwtPolicy (`weft.dev/v1alpha1`) to the model: patterns
//! parsed, condition keys checked, defaults filled in, each problem reported at its field.

use std::collections::BTreeMap;
use std::str::FromStr;

use weft_policy::{
    Action, AuthorizationPolicy, Condition, ConditionKey, DEFAULT_JWKS_REFRESH, JwksSource, JwtPolicy, JwtRule,
    ObjectRef, Operation, Pattern, PolicyTarget, Rule, Source, TokenHeader, default_token_headers, duration_text,
};

use super::{FieldError, object_ref};
use crate::crd::{self, PolicyAction};

/// One policy per target: the model gives each authorization policy a single target.
pub fn authorization_policy(policy: &crd::AuthorizationPolicy) -> Result<Vec<AuthorizationPolicy>, FieldError> {
    let id = object_ref(&policy.metadata)?;
    let spec = &policy.spec;
    let targets = targets(&spec.target_refs, spec.selector.as_ref(), &id, "protects")?;
    let action = match spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, &format!("spec.rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(targets
        .into_iter()
        .map(|target| AuthorizationPolicy { id: id.clone(), target, action, rules: rules.clone() })
        .collect())
}

pub fn jwt_policy(policy: &crd::JwtPolicy) -> Result<JwtPolicy, FieldError> {
    let id = object_ref(&policy.metadata)?;
    let spec = &policy.spec;
    let targets = targets(&spec.target_refs, spec.selector.as_ref(), &id, "authenticates requests to")?;
    if spec.rules.is_empty() {
        return Err(FieldError::new("spec.rules", "empty; add a rule per issuer whose tokens are accepted"));
    }
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| jwt_rule(r, &format!("spec.rules[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(JwtPolicy { id, targets, rules })
}

/// `targetRefs` then the selector; at least one of them.
fn targets(
    refs: &[crd::TargetRef],
    selector: Option<&crd::WorkloadSelector>,
    id: &ObjectRef,
    verb: &str,
) -> Result<Vec<PolicyTarget>, FieldError> {
    if refs.is_empty() && selector.is_none() {
        let message = format!("empty; list the Services (or the Namespace) this policy {verb}, or set spec.selector");
        return Err(FieldError::new("spec.targetRefs", message));
    }
    let mut targets = Vec::with_capacity(refs.len() + 1);
    for (i, t) in refs.iter().enumerate() {
        let field = |name: &str| format!("spec.targetRefs[{i}].{name}");
        if !t.group.is_empty() {
            let message = format!("\"{}\" is not supported; use \"\" (the core group)", t.group);
            return Err(FieldError::new(field("group"), message));
        }
        if t.name.is_empty() {
            return Err(FieldError::new(field("name"), "empty; name the target"));
        }
        targets.push(match t.kind.as_str() {
            "Service" => PolicyTarget::Service(t.name.clone()),
            "Namespace" if t.name == id.namespace => PolicyTarget::Namespace,
            "Namespace" => {
                let message = format!("a policy can only target its own namespace; use \"{}\"", id.namespace);
                return Err(FieldError::new(field("name"), message));
            }
            other => {
                let message = format!("unsupported kind \"{other}\"; use Service or Namespace (or spec.selector)");
                return Err(FieldError::new(field("kind"), message));
            }
        });
    }
    if let Some(selector) = selector {
        if selector.match_labels.is_empty() {
            let message = "empty; name labels, or target the Namespace to select every workload in it";
            return Err(FieldError::new("spec.selector.matchLabels", message));
        }
        targets.push(PolicyTarget::Selector(selector.match_labels.clone()));
    }
    Ok(targets)
}

fn rule(r: &crd::PolicyRule, field: &str) -> Result<Rule, FieldError> {
    let from = r.from.iter().enumerate().map(|(j, s)| source(s, &format!("{field}.from[{j}]")));
    let to = r.to.iter().enumerate().map(|(j, d)| operation(d, &format!("{field}.to[{j}]")));
    let when = r.when.iter().enumerate().map(|(j, c)| condition(c, &format!("{field}.when[{j}]")));
    Ok(Rule {
        from: from.collect::<Result<_, _>>()?,
        to: to.collect::<Result<_, _>>()?,
        when: when.collect::<Result<_, _>>()?,
    })
}

fn source(s: &crd::PolicySource, field: &str) -> Result<Source, FieldError> {
    Ok(Source {
        namespaces: parse_all(&s.namespaces, &format!("{field}.namespaces"))?,
        not_namespaces: parse_all(&s.not_namespaces, &format!("{field}.notNamespaces"))?,
        service_accounts: parse_all(&s.service_accounts, &format!("{field}.serviceAccounts"))?,
        principals: parse_all(&s.principals, &format!("{field}.principals"))?,
        not_principals: parse_all(&s.not_principals, &format!("{field}.notPrincipals"))?,
    })
}

fn operation(d: &crd::PolicyDestination, field: &str) -> Result<Operation, FieldError> {
    if let Some(k) = d.ports.iter().position(|&p| p == 0) {
        return Err(FieldError::new(
            format!("{field}.ports[{k}]"),
            "0 is not a port; use a number between 1 and 65535",
        ));
    }
    let paths = |list: &[String], name: &str| -> Result<Vec<Pattern>, FieldError> {
        let patterns: Vec<Pattern> = parse_all(list, &format!("{field}.{name}"))?;
        for (k, pattern) in patterns.iter().enumerate() {
            if let Pattern::Exact(p) | Pattern::Prefix(p) = pattern
                && !p.starts_with('/')
            {
                let message = format!("\"{pattern}\" does not start with \"/\"; paths are absolute (or \"*suffix\")");
                return Err(FieldError::new(format!("{field}.{name}[{k}]"), message));
            }
        }
        Ok(patterns)
    };
    let mut headers = BTreeMap::new();
    for (name, value) in &d.headers {
        let at = format!("{field}.headers[{name}]");
        if !is_token(name) {
            return Err(FieldError::new(at, format!("\"{name}\" is not a header name")));
        }
        let value = value.parse().map_err(|e| FieldError::new(&at, e))?;
        if headers.insert(name.to_ascii_lowercase(), value).is_some() {
            let message = "listed again in another case; header names are case-insensitive, list each once";
            return Err(FieldError::new(at, message));
        }
    }
    Ok(Operation {
        ports: d.ports.clone(),
        methods: methods(&d.methods, &format!("{field}.methods"))?,
        not_methods: methods(&d.not_methods, &format!("{field}.notMethods"))?,
        paths: paths(&d.paths, "paths")?,
        not_paths: paths(&d.not_paths, "notPaths")?,
        hosts: parse_all(&d.hosts, &format!("{field}.hosts"))?,
        headers,
    })
}

fn methods(list: &[String], field: &str) -> Result<Vec<String>, FieldError> {
    for (k, method) in list.iter().enumerate() {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            let message = format!("\"{method}\" is not an HTTP method; write it in upper case, e.g. GET");
            return Err(FieldError::new(format!("{field}[{k}]"), message));
        }
    }
    Ok(list.to_vec())
}

fn condition(c: &crd::PolicyCondition, field: &str) -> Result<Condition, FieldError> {
    let key: ConditionKey = c.key.parse().map_err(|e| FieldError::new(format!("{field}.key"), e))?;
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(FieldError::new(field, "no values; set values, notValues or both"));
    }
    let values: Vec<Pattern> = parse_all(&c.values, &format!("{field}.values"))?;
    let not_values: Vec<Pattern> = parse_all(&c.not_values, &format!("{field}.notValues"))?;
    if key == ConditionKey::DestinationPort {
        for (name, list) in [("values", &values), ("notValues", &not_values)] {
            let bad = list.iter().position(|p| match p {
                Pattern::Exact(port) => port.parse::<u16>().map_or(true, |n| n == 0),
                Pattern::Any => false,
                Pattern::Prefix(_) | Pattern::Suffix(_) => true,
            });
            if let Some(k) = bad {
                let message = format!("\"{}\" is not a port; destination.port takes port numbers", list[k]);
                return Err(FieldError::new(format!("{field}.{name}[{k}]"), message));
            }
        }
    }
    Ok(Condition { key, values, not_values })
}

fn jwt_rule(r: &crd::JwtRuleSpec, field: &str) -> Result<JwtRule, FieldError> {
    if r.issuer.is_empty() {
        return Err(FieldError::new(format!("{field}.issuer"), "empty; write the `iss` of the tokens to accept"));
    }
    let jwks = match (&r.jwks, &r.jwks_uri) {
        (Some(jwks), None) => {
            if r.refresh_interval.is_some() {
                let message = "only applies to jwksUri; an inline jwks changes with the policy";
                return Err(FieldError::new(format!("{field}.refreshInterval"), message));
            }
            check_jwks(jwks).map_err(|e| FieldError::new(format!("{field}.jwks"), e))?;
            JwksSource::Inline(jwks.clone())
        }
        (None, Some(uri)) => {
            if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                let message = format!("\"{uri}\" is not an http(s) URL");
                return Err(FieldError::new(format!("{field}.jwksUri"), message));
            }
            let refresh_interval = match r.refresh_interval.as_deref() {
                None => DEFAULT_JWKS_REFRESH,
                Some(text) => {
                    let at = format!("{field}.refreshInterval");
                    let interval = duration_text::parse(text).map_err(|e| FieldError::new(&at, e))?;
                    if interval.is_zero() {
                        return Err(FieldError::new(at, "0 would fetch without pause; use e.g. \"5m\""));
                    }
                    interval
                }
            };
            JwksSource::Uri { uri: uri.clone(), refresh_interval }
        }
        (Some(_), Some(_)) => {
            return Err(FieldError::new(format!("{field}.jwksUri"), "set one of jwks and jwksUri, not both"));
        }
        (None, None) => {
            let message = "missing; set jwks (the issuer's keys as JSON) or jwksUri (where to fetch them)";
            return Err(FieldError::new(format!("{field}.jwks"), message));
        }
    };
    let mut from_headers = Vec::with_capacity(r.from_headers.len());
    for (k, header) in r.from_headers.iter().enumerate() {
        if !is_token(&header.name) {
            let message = format!("\"{}\" is not a header name", header.name);
            return Err(FieldError::new(format!("{field}.fromHeaders[{k}].name"), message));
        }
        from_headers.push(TokenHeader {
            name: header.name.to_ascii_lowercase(),
            prefix: header.prefix.clone().unwrap_or_default(),
        });
    }
    if let Some(k) = r.from_params.iter().position(String::is_empty) {
        return Err(FieldError::new(format!("{field}.fromParams[{k}]"), "empty; name the query parameter"));
    }
    if from_headers.is_empty() && r.from_params.is_empty() {
        from_headers = default_token_headers();
    }
    for (name, list) in [("audiences", &r.audiences), ("spaceDelimitedClaims", &r.space_delimited_claims)] {
        if let Some(k) = list.iter().position(String::is_empty) {
            return Err(FieldError::new(format!("{field}.{name}[{k}]"), "empty"));
        }
    }
    Ok(JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks,
        from_headers,
        from_params: r.from_params.clone(),
        required: r.required.unwrap_or(false),
        space_delimited_claims: r.space_delimited_claims.clone(),
    })
}

/// What can be told of a JWKS without cryptography: JSON with public keys only. The proxy's
/// verifier checks the keys themselves.
fn check_jwks(text: &str) -> Result<(), String> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let keys = doc.get("keys").and_then(serde_json::Value::as_array);
    let keys = keys.filter(|k| !k.is_empty()).ok_or("has no keys; a JWKS is {\"keys\": [...]}")?;
    for (k, key) in keys.iter().enumerate() {
        match key.get("kty").and_then(serde_json::Value::as_str) {
            Some("RSA" | "EC" | "OKP") => {}
            Some("oct") => {
                return Err(format!(
                    "keys[{k}] is a symmetric (\"oct\") key; tokens must be verified with the issuer's public keys \
                     (RSA, EC, OKP), since anyone holding a shared secret could sign them"
                ));
            }
            Some(other) => {
                return Err(format!("keys[{k}]: unsupported kty \"{other}\"; use RSA, EC or OKP keys"));
            }
            None => return Err(format!("keys[{k}] has no kty")),
        }
    }
    Ok(())
}

fn parse_all<T: FromStr<Err = String>>(list: &[String], field: &str) -> Result<Vec<T>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(k, text)| text.parse().map_err(|e| FieldError::new(format!("{field}[{k}]"), e)))
        .collect()
}

/// RFC 9110 token characters.
fn is_token(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn policy(spec: &str) -> crd::AuthorizationPolicy {
        let text = format!(
            "{{\"apiVersion\": \"weft.dev/v1alpha1\", \"kind\": \"AuthorizationPolicy\", \"metadata\": {{\"name\": \"p\", \"namespace\": \"shop\"}}, \"spec\": {spec}}}"
        );
        serde_json::from_str(&text).unwrap()
    }

    fn jwt(spec: &str) -> crd::JwtPolicy {
        let text = format!(
            "{{\"apiVersion\": \"weft.dev/v1alpha1\", \"kind\": \"JwtPolicy\", \"metadata\": {{\"name\": \"j\", \"namespace\": \"shop\"}}, \"spec\": {spec}}}"
        );
        serde_json::from_str(&text).unwrap()
    }

    const JWKS: &str = r#"{\"keys\": [{\"kty\": \"EC\", \"crv\": \"P-256\", \"x\": \"a\", \"y\": \"b\"}]}"#;

    #[test]
    fn l7_policy_converts() {
        let p = policy(
            r#"{"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW", "rules": [{
                "from": [{"serviceAccounts": ["prod/*"], "notPrincipals": ["*/sa/intruder"]}],
                "to": [{"ports": [80], "methods": ["GET"], "paths": ["/api/*"], "hosts": ["*.shop"], "headers": {"X-Env": "prod"}}],
                "when": [{"key": "request.auth.claims[groups]", "values": ["gold_member"]}]
            }]}"#,
        );
        let got = authorization_policy(&p).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].target, PolicyTarget::Selector(BTreeMap::from([("app".into(), "web".into())])));
        let rule = &got[0].rules[0];
        assert_eq!(rule.from[0].service_accounts[0].to_string(), "prod/*");
        assert_eq!(rule.to[0].paths, vec![Pattern::Prefix("/api/".into())]);
        assert_eq!(rule.to[0].headers, BTreeMap::from([("x-env".into(), Pattern::Exact("prod".into()))]));
        assert_eq!(rule.when[0].key, ConditionKey::AuthClaim(vec!["groups".into()]));
        assert!(rule.has_http_fields());
    }

    #[test]
    fn authorization_errors_name_the_field() {
        let cases = [
            (r#"{"action": "ALLOW"}"#, "spec.targetRefs"),
            (r#"{"selector": {"matchLabels": {}}, "action": "ALLOW"}"#, "spec.selector.matchLabels"),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "ALLOW", "rules": [{}, {"to": [{}, {"paths": ["/ok", "api/*"]}]}]}"#,
                "spec.rules[1].to[1].paths[1]",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"to": [{"methods": ["get"]}]}]}"#,
                "spec.rules[0].to[0].methods[0]",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"from": [{"principals": ["spiffe://a*b"]}]}]}"#,
                "spec.rules[0].from[0].principals[0]",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"when": [{"key": "request.auth.claim[x]", "values": ["a"]}]}]}"#,
                "spec.rules[0].when[0].key",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"when": [{"key": "request.headers[x]"}]}]}"#,
                "spec.rules[0].when[0]",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"when": [{"key": "destination.port", "values": ["80*"]}]}]}"#,
                "spec.rules[0].when[0].values[0]",
            ),
            (
                r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"to": [{"headers": {"bad header": "x"}}]}]}"#,
                "spec.rules[0].to[0].headers[bad header]",
            ),
        ];
        for (spec, field) in cases {
            let err = authorization_policy(&policy(spec)).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
        }
        let err = authorization_policy(&policy(
            r#"{"targetRefs": [{"kind": "Service", "name": "a"}], "action": "DENY", "rules": [{"when": [{"key": "source.ip", "values": ["1"]}]}]}"#,
        ))
        .unwrap_err();
        assert!(err.message.starts_with("unknown key \"source.ip\"; use one of request.headers[<name>]"), "{err}");
    }

    #[test]
    fn jwt_policy_defaults_and_sources() {
        let j = jwt(&format!(
            r#"{{"targetRefs": [{{"kind": "Service", "name": "web"}}], "rules": [
                {{"issuer": "https://a", "jwks": "{JWKS}"}},
                {{"issuer": "https://b", "jwksUri": "https://b/jwks.json", "fromParams": ["access_token"], "required": true}},
                {{"issuer": "https://c", "jwksUri": "https://c/jwks.json", "refreshInterval": "1m",
                  "fromHeaders": [{{"name": "X-Token"}}]}}
            ]}}"#
        ));
        let got = jwt_policy(&j).unwrap();
        assert_eq!(got.targets, vec![PolicyTarget::Service("web".into())]);
        let [a, b, c] = got.rules.as_slice() else { panic!("{got:?}") };
        assert_eq!((a.from_headers.clone(), a.required), (default_token_headers(), false));
        assert!(matches!(&a.jwks, JwksSource::Inline(text) if text.contains("P-256")));
        assert_eq!(
            b.jwks,
            JwksSource::Uri { uri: "https://b/jwks.json".into(), refresh_interval: DEFAULT_JWKS_REFRESH }
        );
        assert_eq!(
            (b.from_headers.clone(), b.from_params.clone(), b.required),
            (vec![], vec!["access_token".into()], true)
        );
        assert_eq!(c.from_headers, vec![TokenHeader { name: "x-token".into(), prefix: String::new() }]);
        assert!(matches!(c.jwks, JwksSource::Uri { refresh_interval, .. } if refresh_interval.as_secs() == 60));
    }

    #[test]
    fn jwt_errors_name_the_field() {
        let target = r#""targetRefs": [{"kind": "Service", "name": "web"}]"#;
        let cases = [
            (format!(r#"{{{target}, "rules": []}}"#), "spec.rules", "empty"),
            (format!(r#"{{{target}, "rules": [{{"issuer": "x"}}]}}"#), "spec.rules[0].jwks", "missing"),
            (
                format!(r#"{{{target}, "rules": [{{"issuer": "x", "jwks": "{JWKS}", "jwksUri": "https://x"}}]}}"#),
                "spec.rules[0].jwksUri",
                "set one of",
            ),
            (
                format!(
                    r#"{{{target}, "rules": [{{"issuer": "x", "jwks": "{{\"keys\": [{{\"kty\": \"oct\", \"k\": \"c2VjcmV0\"}}]}}"}}]}}"#
                ),
                "spec.rules[0].jwks",
                "keys[0] is a symmetric (\"oct\") key",
            ),
            (
                format!(r#"{{{target}, "rules": [{{"issuer": "x", "jwks": "nope"}}]}}"#),
                "spec.rules[0].jwks",
                "not JSON",
            ),
            (
                format!(
                    r#"{{{target}, "rules": [{{"issuer": "x", "jwksUri": "https://x", "refreshInterval": "soon"}}]}}"#
                ),
                "spec.rules[0].refreshInterval",
                "\"soon\" is not a duration",
            ),
            (
                format!(r#"{{{target}, "rules": [{{"issuer": "", "jwksUri": "https://x"}}]}}"#),
                "spec.rules[0].issuer",
                "empty",
            ),
        ];
        for (spec, field, message) in cases {
            let err = jwt_policy(&jwt(&spec)).unwrap_err();
            assert_eq!(err.field, field, "{spec}: {err}");
            assert!(err.message.starts_with(message), "{spec}: {err}");
        }
    }
}
