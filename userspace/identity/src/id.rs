//! SPIFFE ids of Kubernetes workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service
//! account>`, the same shape Istio and Linkerd use, so policies can name a peer by namespace and
//! service account. Character rules follow the SPIFFE-ID spec
//! (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>); a value of this type is
//! always valid, so it can be put into a certificate as is.

use std::{fmt, str::FromStr};

const SCHEME: &str = "spiffe://";
/// SPIFFE-ID spec section 2.1: a trust domain is at most 255 bytes.
const MAX_TRUST_DOMAIN: usize = 255;
/// SPIFFE-ID spec section 2.3: a whole SPIFFE id is at most 2048 bytes.
const MAX_ID: usize = 2048;

/// Why a string is not a workload SPIFFE id. Each message quotes the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{input:?}: a SPIFFE id starts with \"spiffe://\" (lowercase)")]
    Scheme { input: String },
    #[error("{input:?}: the trust domain (after \"spiffe://\") is empty")]
    EmptyTrustDomain { input: String },
    #[error(
        "{input:?}: the trust domain may only hold lowercase letters, digits, '.', '-' and '_'; found {found:?}"
    )]
    TrustDomainChar { input: String, found: char },
    #[error("{input:?}: the trust domain is longer than {MAX_TRUST_DOMAIN} bytes")]
    TrustDomainTooLong { input: String },
    #[error("{input:?}: longer than {MAX_ID} bytes")]
    TooLong { input: String },
    #[error("{input:?}: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
    Shape { input: String },
    #[error("{input:?}: empty path segment (\"//\" or a trailing '/')")]
    EmptySegment { input: String },
    #[error(
        "{input:?}: path segment {segment:?} may only hold letters, digits, '.', '-' and '_'; found {found:?}"
    )]
    SegmentChar {
        input: String,
        segment: String,
        found: char,
    },
    #[error("{input:?}: \".\" and \"..\" are not allowed as path segments")]
    DotSegment { input: String },
}

/// A workload identity. Construct with [`SpiffeId::new`] or `parse`; both validate, which is why
/// the fields are private.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, IdError> {
        let input = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_trust_domain(&input, trust_domain)?;
        check_segment(&input, namespace)?;
        check_segment(&input, service_account)?;
        check_len(&input)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(input: &str) -> Result<SpiffeId, IdError> {
        let rest = input.strip_prefix(SCHEME).ok_or_else(|| IdError::Scheme {
            input: input.to_owned(),
        })?;
        check_len(input)?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(input, trust_domain)?;
        if path.is_empty() && !rest.ends_with('/') {
            // A bare trust domain id names no workload.
            return Err(IdError::Shape {
                input: input.to_owned(),
            });
        }
        let segments: Vec<&str> = path.split('/').collect();
        // Character errors first: they say more than "wrong shape" about e.g. a query string.
        for segment in &segments {
            check_segment(input, segment)?;
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => Ok(SpiffeId {
                trust_domain: trust_domain.to_owned(),
                namespace: (*namespace).to_owned(),
                service_account: (*service_account).to_owned(),
            }),
            _ => Err(IdError::Shape {
                input: input.to_owned(),
            }),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;

    fn try_from(s: String) -> Result<SpiffeId, IdError> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

/// For a trust domain on its own (CA and bundle configuration).
pub(crate) fn check_trust_domain_alone(trust_domain: &str) -> Result<(), IdError> {
    check_trust_domain(trust_domain, trust_domain)
}

fn check_len(input: &str) -> Result<(), IdError> {
    if input.len() > MAX_ID {
        return Err(IdError::TooLong {
            input: input.to_owned(),
        });
    }
    Ok(())
}

fn check_trust_domain(input: &str, trust_domain: &str) -> Result<(), IdError> {
    if trust_domain.is_empty() {
        return Err(IdError::EmptyTrustDomain {
            input: input.to_owned(),
        });
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN {
        return Err(IdError::TrustDomainTooLong {
            input: input.to_owned(),
        });
    }
    match trust_domain
        .chars()
        .find(|&c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(found) => Err(IdError::TrustDomainChar {
            input: input.to_owned(),
            found,
        }),
        None => Ok(()),
    }
}

fn check_segment(input: &str, segment: &str) -> Result<(), IdError> {
    if segment.is_empty() {
        return Err(IdError::EmptySegment {
            input: input.to_owned(),
        });
    }
    if segment == "." || segment == ".." {
        return Err(IdError::DotSegment {
            input: input.to_owned(),
        });
    }
    match segment
        .chars()
        .find(|&c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(found) => Err(IdError::SegmentChar {
            input: input.to_owned(),
            segment: segment.to_owned(),
            found,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = SpiffeId::new("cluster.local", "shop", "checkout-v2").expect("valid id");
        let s = id.to_string();
        assert_eq!(s, "spiffe://cluster.local/ns/shop/sa/checkout-v2");
        assert_eq!(s.parse::<SpiffeId>(), Ok(id.clone()));
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "shop", "checkout-v2")
        );
    }

    #[test]
    fn serde_as_string() {
        let id = SpiffeId::new("td", "a", "B_c.d").expect("valid id");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, r#""spiffe://td/ns/a/sa/B_c.d""#);
        assert_eq!(
            serde_json::from_str::<SpiffeId>(&json).expect("deserialize"),
            id
        );
        let bad = serde_json::from_str::<SpiffeId>(r#""spiffe://td/ns/a""#)
            .expect_err("wrong shape must not deserialize");
        assert!(
            bad.to_string()
                .contains("expected spiffe://<trust domain>/ns/"),
            "{bad}"
        );
    }

    #[test]
    fn rejections() {
        type Expect = fn(&IdError) -> bool;
        let cases: &[(&str, Expect)] = &[
            ("http://td/ns/a/sa/b", |e| {
                matches!(e, IdError::Scheme { .. })
            }),
            ("SPIFFE://td/ns/a/sa/b", |e| {
                matches!(e, IdError::Scheme { .. })
            }),
            ("td/ns/a/sa/b", |e| matches!(e, IdError::Scheme { .. })),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, IdError::EmptyTrustDomain { .. })
            }),
            ("spiffe://Cluster.local/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainChar { found: 'C', .. })
            }),
            ("spiffe://td:8443/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainChar { found: ':', .. })
            }),
            ("spiffe://user@td/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainChar { found: '@', .. })
            }),
            ("spiffe://td", |e| matches!(e, IdError::Shape { .. })),
            ("spiffe://td/", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://td/ns/a", |e| matches!(e, IdError::Shape { .. })),
            ("spiffe://td/ns/a/sa", |e| {
                matches!(e, IdError::Shape { .. })
            }),
            ("spiffe://td/sa/b/ns/a", |e| {
                matches!(e, IdError::Shape { .. })
            }),
            ("spiffe://td/ns/a/sa/b/extra", |e| {
                matches!(e, IdError::Shape { .. })
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, IdError::EmptySegment { .. })
            }),
            ("spiffe://td/ns/./sa/b", |e| {
                matches!(e, IdError::DotSegment { .. })
            }),
            ("spiffe://td/ns/a/sa/..", |e| {
                matches!(e, IdError::DotSegment { .. })
            }),
            ("spiffe://td/ns/a%20b/sa/b", |e| {
                matches!(e, IdError::SegmentChar { found: '%', .. })
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(e, IdError::SegmentChar { found: '?', .. })
            }),
            ("spiffe://td/ns/a/sa/b#frag", |e| {
                matches!(e, IdError::SegmentChar { found: '#', .. })
            }),
        ];
        for (input, expected) in cases {
            let err = input.parse::<SpiffeId>().expect_err(input);
            assert!(expected(&err), "{input}: unexpected error {err:?}");
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "message must quote the input: {err}"
            );
        }
        let long_td = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
        assert!(matches!(
            long_td.parse::<SpiffeId>(),
            Err(IdError::TrustDomainTooLong { .. })
        ));
        let long_id = format!("spiffe://td/ns/{}/sa/b", "a".repeat(2048));
        assert!(matches!(
            long_id.parse::<SpiffeId>(),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn new_validates_each_part() {
        assert!(matches!(
            SpiffeId::new("TD", "a", "b"),
            Err(IdError::TrustDomainChar { found: 'T', .. })
        ));
        assert!(matches!(
            SpiffeId::new("td", "a/sa/x", "b"),
            Err(IdError::SegmentChar { found: '/', .. })
        ));
        assert!(matches!(
            SpiffeId::new("td", "", "b"),
            Err(IdError::EmptySegment { .. })
        ));
        assert!(matches!(
            SpiffeId::new("td", "a", ".."),
            Err(IdError::DotSegment { .. })
        ));
    }
}
