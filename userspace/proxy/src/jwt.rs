//! JWT authentication for JwtPolicy rules: find the token, pick the rule for its issuer,
//! verify it, and hand its claims to authorization (`weft_policy::authz`).
//!
//! Pure (no I/O): a rule's keys are parsed once into a [`JwkSet`] (per config for an inline
//! JWKS, per fetch for `jwksUri`, see `jwks.rs`); per request the proxy pairs each rule with its
//! current keys in a [`JwtVerifier`] and calls [`authenticate`].
//!
//! What is checked, in order:
//! - the header's `alg` must be the one algorithm the key named by `kid` allows (a JWKS key's
//!   `alg`, or without one: RS256 for RSA, ES256 for P-256, ES384 for P-384, EdDSA for Ed25519).
//!   `none` and HMAC (`HS*`) are never allowed: a JWKS holds public keys only, so an HS256 token
//!   "signed" with a public key (key confusion) is refused before any signature check. A token
//!   without `kid` uses the JWKS's only key, and is refused when there are several; a JWKS of
//!   one key without `kid` serves tokens with any `kid`;
//! - the signature, with that key (jsonwebtoken on ring);
//! - `exp` and `nbf` when present (as Istio, tokens without `exp` are accepted), with
//!   [`LEEWAY`] of clock skew either way;
//! - `iss` equals the rule's issuer, and `aud` names one of its audiences (if it lists any).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::Value;
use weft_policy::{JwtRule, SPACE_DELIMITED_CLAIMS};

pub use weft_policy::authz::Claims;

/// Clock skew tolerated for `exp` and `nbf`: 60 s, as Envoy's and Istio's default.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// Why a request's token was refused (HTTP 401), or a JWKS could not be used. `Display` is fit
/// for a 401 body (it never repeats the token); [`JwtError::label`] for metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("a JWT is required; send it as the destination expects (e.g. Authorization: Bearer <token>)")]
    Missing,
    #[error("the JWT is malformed")]
    Malformed,
    #[error("the JWT names a signing key (kid) the issuer's JWKS does not have")]
    UnknownKid,
    #[error("the JWT's algorithm \"{alg}\" is not allowed for its signing key")]
    AlgorithmNotAllowed { alg: String },
    #[error("the JWT's signature does not verify")]
    BadSignature,
    #[error("the JWT has expired")]
    Expired,
    #[error("the JWT is not valid yet (nbf)")]
    NotYetValid,
    #[error("the JWT's issuer is not accepted here")]
    WrongIssuer,
    #[error("the JWT's audience is not accepted here")]
    WrongAudience,
    /// The JWKS cannot be used; a configuration problem, never caused by a request.
    #[error("unusable JWKS: {0}")]
    Jwks(String),
    /// The rule for the token's issuer has no keys (its JWKS is broken, or not fetched yet);
    /// the message says which and why.
    #[error("{0}")]
    NoKeys(String),
}

impl JwtError {
    /// A fixed label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            JwtError::Missing => "missing",
            JwtError::Malformed => "malformed",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::AlgorithmNotAllowed { .. } => "algorithm_not_allowed",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::WrongAudience => "wrong_audience",
            JwtError::Jwks(_) => "jwks",
            JwtError::NoKeys(_) => "no_keys",
        }
    }
}

/// The usable keys of one JWKS document.
pub struct JwkSet {
    keys: Vec<Key>,
    /// JWKS keys left out (encryption keys, unsupported curves or algorithms), for a log line.
    skipped: Vec<String>,
}

struct Key {
    kid: Option<String>,
    /// The one algorithm this key verifies.
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for JwkSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self.keys.iter().map(|k| (k.kid.as_deref(), k.alg)).collect();
        f.debug_struct("JwkSet").field("keys", &keys).finish()
    }
}

impl JwkSet {
    /// Reads `jwks_json` (`{"keys": [...]}`). Symmetric (`oct`) keys are an error, as is a key
    /// whose `alg` does not fit its type; keys that cannot sign for us are skipped (see
    /// [`JwkSet::skipped`]), and a JWKS left with none is an error. The error says what is wrong
    /// with the document.
    pub fn parse(jwks_json: &str) -> Result<Self, String> {
        let doc: Value = serde_json::from_str(jwks_json).map_err(|e| format!("not JSON: {e}"))?;
        let list = doc.get("keys").and_then(Value::as_array);
        let list = list.ok_or("no \"keys\" list; a JWKS is {\"keys\": [...]}")?;
        let (mut keys, mut skipped) = (Vec::new(), Vec::new());
        for (i, jwk) in list.iter().enumerate() {
            match key(jwk).map_err(|e| format!("keys[{i}]: {e}"))? {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() { String::new() } else { format!(" ({})", skipped.join("; ")) };
            return Err(format!("no key that can verify signatures{why}"));
        }
        Ok(Self { keys, skipped })
    }

    /// Keys of the JWKS that were left out, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The `kid` of each usable key (`None` for a key without one).
    pub fn kids(&self) -> impl Iterator<Item = Option<&str>> {
        self.keys.iter().map(|k| k.kid.as_deref())
    }
}

/// Verifies tokens of one issuer (one JwtRule) with its keys, or refuses them with
/// [`JwtError::NoKeys`] when the rule has none.
#[derive(Debug)]
pub struct JwtVerifier {
    rule: Arc<JwtRule>,
    keys: Result<Arc<JwkSet>, String>,
}

impl JwtVerifier {
    /// A verifier with the keys of `jwks_json` (see [`JwkSet::parse`]).
    pub fn new(rule: &JwtRule, jwks_json: &str) -> Result<Self, JwtError> {
        let keys = JwkSet::parse(jwks_json).map_err(JwtError::Jwks)?;
        Ok(Self::with_keys(Arc::new(rule.clone()), Ok(Arc::new(keys))))
    }

    /// `rule` with keys already parsed; `Err(why)` when it has none, refusing its tokens with why.
    pub fn with_keys(rule: Arc<JwtRule>, keys: Result<Arc<JwkSet>, String>) -> Self {
        Self { rule, keys }
    }

    pub fn rule(&self) -> &JwtRule {
        &self.rule
    }

    /// Keys of the JWKS that were left out, and why.
    pub fn skipped(&self) -> &[String] {
        self.keys.as_ref().map_or(&[], |k| k.skipped())
    }

    /// The token's claims if it is valid for this rule at `now`. Space-delimited claims
    /// (`scope`, `permission` and the rule's `space_delimited_claims`) come back as lists.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, JwtError> {
        let mut segments = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header = decode_json(header)?;
        // RFC 7515 §4.1.11: extensions we do not understand must not be ignored.
        if header.contains_key("crit") {
            return Err(JwtError::Malformed);
        }
        let alg = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed)?;
        // `none` and HMAC never verify against public keys; refuse them before looking at keys.
        let asymmetric = Algorithm::from_str(alg)
            .is_ok_and(|a| !matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512));
        if !asymmetric {
            return Err(JwtError::AlgorithmNotAllowed { alg: printable(alg) });
        }
        let keys = self.keys.as_ref().map_err(|why| JwtError::NoKeys(why.clone()))?;
        // By kid; a JWKS of one key without a kid serves every token (as Envoy does).
        let lone = || match keys.keys.as_slice() {
            [only] => Some(only),
            _ => None,
        };
        let key = match header.get("kid") {
            Some(Value::String(kid)) => keys
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .or_else(|| lone().filter(|k| k.kid.is_none())),
            Some(_) => return Err(JwtError::Malformed),
            None => lone(),
        };
        let key = key.ok_or(JwtError::UnknownKid)?;
        if Algorithm::from_str(alg).ok() != Some(key.alg) {
            return Err(JwtError::AlgorithmNotAllowed { alg: printable(alg) });
        }

        // Signature only; the claims are checked below, against `now`.
        let mut validation = Validation::new(key.alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    JwtError::Malformed
                }
                ErrorKind::InvalidAlgorithm => JwtError::AlgorithmNotAllowed { alg: printable(alg) },
                _ => JwtError::BadSignature,
            })?
            .claims;

        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let leeway = LEEWAY.as_secs_f64();
        let time = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(value) => value.as_f64().map(Some).ok_or(JwtError::Malformed),
        };
        if time("exp")?.is_some_and(|exp| now > exp + leeway) {
            return Err(JwtError::Expired);
        }
        if time("nbf")?.is_some_and(|nbf| nbf > now + leeway) {
            return Err(JwtError::NotYetValid);
        }
        if claims.get("iss").and_then(Value::as_str) != Some(self.rule.issuer.as_str()) {
            return Err(JwtError::WrongIssuer);
        }
        if !self.rule.audiences.is_empty() {
            let accepted = |aud: &str| self.rule.audiences.iter().any(|a| a == aud);
            let ok = match claims.get("aud") {
                Some(Value::String(aud)) => accepted(aud),
                Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(accepted),
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }

        let listed =
            SPACE_DELIMITED_CLAIMS.iter().copied().chain(self.rule.space_delimited_claims.iter().map(String::as_str));
        for name in listed {
            if let Some(Value::String(text)) = claims.get(name) {
                let items = text.split_whitespace().map(|s| Value::String(s.to_owned())).collect();
                claims.insert(name.to_owned(), Value::Array(items));
            }
        }
        Ok(claims)
    }
}

/// The token a request carries for `rule`: the first of its headers present (after the prefix,
/// compared ignoring case; a header without it does not count), else the first of its query
/// parameters present.
pub fn extract_token<'a>(
    rule: &JwtRule,
    header: impl Fn(&str) -> Option<&'a str>,
    query: Option<&'a str>,
) -> Option<&'a str> {
    for location in &rule.from_headers {
        let Some(value) = header(&location.name) else { continue };
        let value = value.trim();
        let token = if location.prefix.is_empty() {
            Some(value)
        } else {
            let prefix = location.prefix.as_bytes();
            let has_prefix = value.as_bytes().get(..prefix.len()).is_some_and(|p| p.eq_ignore_ascii_case(prefix));
            // The prefix is ASCII-matched, so the cut is on a character boundary.
            has_prefix.then(|| value.get(prefix.len()..).unwrap_or_default().trim())
        };
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            return Some(token);
        }
    }
    let query = query?;
    rule.from_params.iter().find_map(|param| {
        query.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == param && !value.is_empty()).then_some(value)
        })
    })
}

/// Authenticates a request against the rules of every JwtPolicy selecting its destination.
///
/// - A token found at a rule's locations is verified by the first rule with the token's `iss`
///   (found at that rule's locations); an invalid token is refused even when no rule requires one.
///   A token from an issuer no rule accepts is refused ([`JwtError::WrongIssuer`]).
/// - No token anywhere: refused ([`JwtError::Missing`]) if any rule is `required`, otherwise
///   `Ok(None)`: the request goes on without claims.
pub fn authenticate<'a>(
    verifiers: &[&JwtVerifier],
    header: impl Fn(&str) -> Option<&'a str>,
    query: Option<&'a str>,
    now: SystemTime,
) -> Result<Option<Claims>, JwtError> {
    // The last token read and its issuer: usually all rules see the same token.
    let mut peeked: Option<(&str, Option<String>)> = None;
    for verifier in verifiers {
        let Some(token) = extract_token(&verifier.rule, &header, query) else { continue };
        let issuer = match &peeked {
            Some((seen, issuer)) if *seen == token => issuer.clone(),
            _ => {
                let issuer = unverified_issuer(token)?;
                peeked = Some((token, issuer.clone()));
                issuer
            }
        };
        if issuer.as_deref() == Some(verifier.rule.issuer.as_str()) {
            return verifier.verify(token, now).map(Some);
        }
    }
    match peeked {
        Some(_) => Err(JwtError::WrongIssuer),
        None if verifiers.iter().any(|v| v.rule.required) => Err(JwtError::Missing),
        None => Ok(None),
    }
}

/// The `iss` of a token, read without verifying it: only to choose the rule that verifies it.
fn unverified_issuer(token: &str) -> Result<Option<String>, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    Ok(decode_json(payload)?.get("iss").and_then(Value::as_str).map(str::to_owned))
}

fn decode_json(segment: &str) -> Result<serde_json::Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// An algorithm name from a request, safe to echo in a response or log.
fn printable(alg: &str) -> String {
    alg.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(16).collect()
}

/// One JWKS entry: `Err` for a broken entry (the JWKS is refused), `Ok(Err(why))` for one we
/// skip, `Ok(Ok(key))` for a usable one.
fn key(jwk: &Value) -> Result<Result<Key, String>, String> {
    let text = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kty = text("kty").ok_or("no kty")?;
    if kty == "oct" {
        return Err("a symmetric (\"oct\") key; a JWKS for verification holds public keys (RSA, EC, OKP) only, \
                    since anyone with a shared secret could sign tokens"
            .into());
    }
    if text("use").is_some_and(|u| u != "sig") {
        return Ok(Err("not a signing key (use is not \"sig\")".into()));
    }
    let kid = text("kid").map(str::to_owned);
    let named = text("alg");
    let material = |name: &str| text(name).ok_or_else(|| format!("{kty} key without \"{name}\""));
    let bad = |e: jsonwebtoken::errors::Error| format!("invalid {kty} key: {e}");
    let (alg, key) = match kty {
        "RSA" => {
            let alg = match named {
                None => Algorithm::RS256,
                Some(name @ ("RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512")) => {
                    Algorithm::from_str(name).map_err(|e| e.to_string())?
                }
                Some(encryption @ ("RSA1_5" | "RSA-OAEP" | "RSA-OAEP-256")) => {
                    return Ok(Err(format!("an encryption key (alg {encryption})")));
                }
                Some(other) => return alg_mismatch(kty, other),
            };
            (alg, DecodingKey::from_rsa_components(material("n")?, material("e")?).map_err(bad)?)
        }
        "EC" => {
            let alg = match text("crv") {
                Some("P-256") => Algorithm::ES256,
                Some("P-384") => Algorithm::ES384,
                other => {
                    return Ok(Err(format!("unsupported curve {other:?}; use P-256 or P-384")));
                }
            };
            if let Some(other) = named.filter(|n| Algorithm::from_str(n).ok() != Some(alg)) {
                return alg_mismatch(&format!("EC {alg:?}"), other);
            }
            (alg, DecodingKey::from_ec_components(material("x")?, material("y")?).map_err(bad)?)
        }
        "OKP" => {
            if text("crv") != Some("Ed25519") {
                return Ok(Err(format!("unsupported curve {:?}; use Ed25519", text("crv"))));
            }
            if let Some(other) = named.filter(|n| *n != "EdDSA") {
                return alg_mismatch("OKP Ed25519", other);
            }
            (Algorithm::EdDSA, DecodingKey::from_ed_components(material("x")?).map_err(bad)?)
        }
        other => return Ok(Err(format!("unsupported kty \"{other}\""))),
    };
    Ok(Ok(Key { kid, alg, key }))
}

fn alg_mismatch<T>(kty: &str, alg: &str) -> Result<T, String> {
    Err(format!("alg \"{}\" does not fit a {kty} key", printable(alg)))
}

#[cfg(test)]
mod tests;
