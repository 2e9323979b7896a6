//! Gateway API HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`) to weft's route model.
//!
//! weft is a mesh, so routes attach to Services (GAMMA), never to Gateways. The Gateway API's
//! own defaults are applied here, as its CRDs would on a cluster: a match without a path type
//! is a PathPrefix, header and query matches are Exact, a redirect answers 302, a weight is 1.

use std::str::FromStr;
use std::time::Duration;

use gateway_api::apis::standard::grpcroutes::{GrpcRoute, GrpcRouteRulesMatches, GrpcRouteRulesMatchesMethodType};
use gateway_api::apis::standard::httproutes::{
    HttpRoute as GatewayHttpRoute, HttpRouteParentRefs, HttpRouteRulesBackendRefs, HttpRouteRulesFilters,
    HttpRouteRulesFiltersRequestHeaderModifier, HttpRouteRulesFiltersRequestRedirectPathType,
    HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
    HttpRouteRulesTimeouts,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde::de::DeserializeOwned;
use weft_policy::{
    BackendRef, DEFAULT_REDIRECT_STATUS, DEFAULT_WEIGHT, Filter, GrpcMethodMatch, HeaderMatch, HeaderModifier,
    HttpRoute, ObjectRef, ParentRef, PathMatch, PathRewrite, QueryMatch, RouteKind, RouteMatch, RouteRule,
    RouteTimeouts, StringMatch,
};

use super::{FieldError, object_ref, port_number};

pub fn http_route(route: &GatewayHttpRoute) -> Result<HttpRoute, FieldError> {
    let id = object_ref(&route.metadata)?;
    let spec = &route.spec;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let field = format!("spec.rules[{i}]");
        rules.push(RouteRule {
            name: rule.name.clone(),
            matches: rule.matches.iter().flatten().map(http_match).collect(),
            filters: filters(rule.filters.iter().flatten(), &format!("{field}.filters"), &id)?,
            backends: backends(rule.backend_refs.iter().flatten(), &field, &id)?,
            timeouts: timeouts(rule.timeouts.as_ref(), &format!("{field}.timeouts"))?,
        });
    }
    finish(RouteKind::Http, id, &route.metadata, spec.parent_refs.iter().flatten(), spec.hostnames.as_ref(), rules)
}

pub fn grpc_route(route: &GrpcRoute) -> Result<HttpRoute, FieldError> {
    let id = object_ref(&route.metadata)?;
    let spec = &route.spec;
    // GRPCRoute's parent, backend and filter types have HTTPRoute's shape (a subset of its
    // filters); re-typing them lets one conversion serve both kinds.
    let parents: Vec<HttpRouteParentRefs> = retype(&spec.parent_refs.clone().unwrap_or_default(), "spec.parentRefs")?;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let field = format!("spec.rules[{i}]");
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().flatten().enumerate() {
            matches.push(grpc_match(m, &format!("{field}.matches[{j}]"))?);
        }
        let rule_filters: Vec<HttpRouteRulesFilters> =
            retype(&rule.filters.clone().unwrap_or_default(), &format!("{field}.filters"))?;
        let backend_refs: Vec<HttpRouteRulesBackendRefs> =
            retype(&rule.backend_refs.clone().unwrap_or_default(), &format!("{field}.backendRefs"))?;
        rules.push(RouteRule {
            name: rule.name.clone(),
            matches,
            filters: filters(rule_filters.iter(), &format!("{field}.filters"), &id)?,
            backends: backends(backend_refs.iter(), &field, &id)?,
            timeouts: RouteTimeouts::default(),
        });
    }
    finish(RouteKind::Grpc, id, &route.metadata, parents.iter(), spec.hostnames.as_ref(), rules)
}

/// The parts both kinds share, then the checks the compiler would make of the route alone, so
/// a bad route is reported against the file it is in.
fn finish<'a>(
    kind: RouteKind,
    id: ObjectRef,
    meta: &ObjectMeta,
    parent_refs: impl Iterator<Item = &'a HttpRouteParentRefs>,
    hostnames: Option<&Vec<String>>,
    rules: Vec<RouteRule>,
) -> Result<HttpRoute, FieldError> {
    let mut parents = Vec::new();
    for (k, parent) in parent_refs.enumerate() {
        parents.push(parent_ref(parent, &format!("spec.parentRefs[{k}]"), &id)?);
    }
    // Kubernetes writes one fixed UTC form, which keeps text order equal to time order.
    let created = meta.creation_timestamp.as_ref().and_then(|t| serde_json::to_value(t).ok());
    let route = HttpRoute {
        id,
        kind,
        parents,
        hostnames: hostnames.cloned().unwrap_or_default(),
        rules,
        created: created.as_ref().and_then(serde_json::Value::as_str).map(str::to_owned),
    };
    match weft_policy::route_problems(&route).into_iter().next() {
        Some(problem) => Err(FieldError::new(problem.field, problem.reason)),
        None => Ok(route),
    }
}

/// Re-types a value between generated types of the same shape.
fn retype<A: Serialize, B: DeserializeOwned>(value: &A, field: &str) -> Result<B, FieldError> {
    let json = serde_json::to_value(value).map_err(|e| FieldError::new(field, e.to_string()))?;
    serde_json::from_value(json).map_err(|e| FieldError::new(field, e.to_string()))
}

/// The text of a generated enum, as written in YAML ("GET", "https").
fn enum_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}

/// Only the core group's Service; `default_kind` is what a missing kind means.
fn service_ref(
    group: Option<&str>,
    kind: Option<&str>,
    default_kind: &str,
    field: &str,
    what: &str,
) -> Result<(), FieldError> {
    if kind.unwrap_or(default_kind) != "Service" {
        let said = match kind {
            Some(kind) => format!("\"{kind}\" is not supported"),
            None => format!("missing, which means {default_kind}"),
        };
        let message = format!("{said}; {what} must name a Service (kind: Service)");
        return Err(FieldError::new(format!("{field}.kind"), message));
    }
    match group {
        // A parentRef's group defaults to gateway.networking.k8s.io, which has no Service kind:
        // with kind Service, a missing group can only mean the core one.
        None | Some("" | "core") => Ok(()),
        Some(group) => {
            let message = format!("\"{group}\" is not supported; {what} must name a core Service (group: \"\")");
            Err(FieldError::new(format!("{field}.group"), message))
        }
    }
}

fn parent_ref(parent: &HttpRouteParentRefs, field: &str, id: &ObjectRef) -> Result<ParentRef, FieldError> {
    // The Gateway API's default parent kind is Gateway; weft has none.
    service_ref(
        parent.group.as_deref(),
        parent.kind.as_deref(),
        "Gateway",
        field,
        "weft serves mesh routes: parentRefs",
    )?;
    if parent.section_name.is_some() {
        let message = "is not supported for Service parents; use port to attach to one port";
        return Err(FieldError::new(format!("{field}.sectionName"), message));
    }
    let port = parent.port.map(|p| port_number(p, &format!("{field}.port"))).transpose()?;
    let namespace = parent.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(&id.namespace);
    Ok(ParentRef { service: ObjectRef::new(namespace, &parent.name), port })
}

fn http_match(m: &HttpRouteRulesMatches) -> RouteMatch {
    let path = m.path.as_ref().map(|path| {
        let value = path.value.clone().unwrap_or_else(|| "/".to_owned());
        match path.r#type.as_ref().unwrap_or(&HttpRouteRulesMatchesPathType::PathPrefix) {
            HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(value),
            HttpRouteRulesMatchesPathType::PathPrefix => PathMatch::Prefix(value),
            HttpRouteRulesMatchesPathType::RegularExpression => PathMatch::Regex(value),
        }
    });
    let headers = m.headers.iter().flatten().map(|h| HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        value: string_match(&h.value, matches!(h.r#type, Some(HttpRouteRulesMatchesHeadersType::RegularExpression))),
    });
    let query = m.query_params.iter().flatten().map(|q| QueryMatch {
        name: q.name.clone(),
        value: string_match(
            &q.value,
            matches!(q.r#type, Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression)),
        ),
    });
    RouteMatch {
        path,
        method: m.method.as_ref().map(enum_text),
        headers: headers.collect(),
        query: query.collect(),
        grpc: None,
    }
}

fn grpc_match(m: &GrpcRouteRulesMatches, field: &str) -> Result<RouteMatch, FieldError> {
    let headers = m.headers.iter().flatten().enumerate().map(|(k, h)| {
        // Same shape as HTTPRoute's header match type.
        let regex: Option<HttpRouteRulesMatchesHeadersType> = retype(&h.r#type, &format!("{field}.headers[{k}].type"))?;
        Ok(HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            value: string_match(&h.value, matches!(regex, Some(HttpRouteRulesMatchesHeadersType::RegularExpression))),
        })
    });
    let grpc = m.method.as_ref().map(|method| GrpcMethodMatch {
        service: method.service.clone(),
        method: method.method.clone(),
        regex: matches!(method.r#type, Some(GrpcRouteRulesMatchesMethodType::RegularExpression)),
    });
    Ok(RouteMatch { headers: headers.collect::<Result<_, FieldError>>()?, grpc, ..RouteMatch::default() })
}

fn string_match(value: &str, regex: bool) -> StringMatch {
    if regex { StringMatch::Regex(value.to_owned()) } else { StringMatch::Exact(value.to_owned()) }
}

fn backends<'a>(
    refs: impl Iterator<Item = &'a HttpRouteRulesBackendRefs>,
    rule_field: &str,
    id: &ObjectRef,
) -> Result<Vec<BackendRef>, FieldError> {
    let mut backends = Vec::new();
    for (j, backend) in refs.enumerate() {
        let field = format!("{rule_field}.backendRefs[{j}]");
        service_ref(
            backend.group.as_deref(),
            backend.kind.as_deref(),
            "Service",
            &field,
            "weft routes to Services: backendRefs",
        )?;
        let weight = match backend.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => u32::try_from(w).map_err(|_| {
                FieldError::new(format!("{field}.weight"), format!("{w} is negative; use a weight of 0 or more"))
            })?,
        };
        let namespace = backend.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(&id.namespace);
        // Backend filters have the rule filters' shape.
        let backend_filters: Vec<HttpRouteRulesFilters> =
            retype(&backend.filters.clone().unwrap_or_default(), &format!("{field}.filters"))?;
        backends.push(BackendRef {
            service: ObjectRef::new(namespace, &backend.name),
            port: backend.port.map(|p| port_number(p, &format!("{field}.port"))).transpose()?,
            weight,
            filters: filters(backend_filters.iter(), &format!("{field}.filters"), id)?,
        });
    }
    Ok(backends)
}

fn filters<'a>(
    list: impl Iterator<Item = &'a HttpRouteRulesFilters>,
    field: &str,
    id: &ObjectRef,
) -> Result<Vec<Filter>, FieldError> {
    list.enumerate().map(|(k, f)| filter(f, &format!("{field}[{k}]"), id)).collect()
}

fn filter(f: &HttpRouteRulesFilters, field: &str, id: &ObjectRef) -> Result<Filter, FieldError> {
    /// The filter's settings, which its `type` requires.
    fn settings<'s, T>(value: &'s Option<T>, field: &str, name: &str, kind: &str) -> Result<&'s T, FieldError> {
        value
            .as_ref()
            .ok_or_else(|| FieldError::new(format!("{field}.{name}"), format!("missing; type {kind} needs it")))
    }
    Ok(match f.r#type {
        HttpRouteRulesFiltersType::RequestHeaderModifier => Filter::RequestHeaderModifier(modifier(settings(
            &f.request_header_modifier,
            field,
            "requestHeaderModifier",
            "RequestHeaderModifier",
        )?)),
        HttpRouteRulesFiltersType::ResponseHeaderModifier => {
            // Same shape as the request one.
            let m = settings(&f.response_header_modifier, field, "responseHeaderModifier", "ResponseHeaderModifier")?;
            let m: HttpRouteRulesFiltersRequestHeaderModifier = retype(m, &format!("{field}.responseHeaderModifier"))?;
            Filter::ResponseHeaderModifier(modifier(&m))
        }
        HttpRouteRulesFiltersType::UrlRewrite => {
            let rewrite = settings(&f.url_rewrite, field, "urlRewrite", "URLRewrite")?;
            let path = match &rewrite.path {
                None => None,
                Some(p) => Some(path_rewrite(
                    matches!(p.r#type, HttpRouteRulesFiltersUrlRewritePathType::ReplacePrefixMatch),
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                    &format!("{field}.urlRewrite.path"),
                )?),
            };
            Filter::UrlRewrite { hostname: rewrite.hostname.clone(), path }
        }
        HttpRouteRulesFiltersType::RequestRedirect => {
            let redirect = settings(&f.request_redirect, field, "requestRedirect", "RequestRedirect")?;
            let field = format!("{field}.requestRedirect");
            let path = match &redirect.path {
                None => None,
                Some(p) => Some(path_rewrite(
                    matches!(p.r#type, HttpRouteRulesFiltersRequestRedirectPathType::ReplacePrefixMatch),
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                    &format!("{field}.path"),
                )?),
            };
            let status = match redirect.status_code {
                None => DEFAULT_REDIRECT_STATUS,
                Some(code) => u16::try_from(code).map_err(|_| {
                    let message = format!("{code} is not a redirect status; use 301, 302, 303, 307 or 308");
                    FieldError::new(format!("{field}.statusCode"), message)
                })?,
            };
            Filter::RequestRedirect {
                scheme: redirect.scheme.as_ref().map(enum_text),
                hostname: redirect.hostname.clone(),
                path,
                port: redirect.port.map(|p| port_number(p, &format!("{field}.port"))).transpose()?,
                status,
            }
        }
        HttpRouteRulesFiltersType::RequestMirror => {
            let mirror = settings(&f.request_mirror, field, "requestMirror", "RequestMirror")?;
            let field = format!("{field}.requestMirror");
            let backend = &mirror.backend_ref;
            let backend_field = format!("{field}.backendRef");
            let what = "weft mirrors to Services: backendRef";
            service_ref(backend.group.as_deref(), backend.kind.as_deref(), "Service", &backend_field, what)?;
            let namespace = backend.namespace.as_deref().filter(|ns| !ns.is_empty()).unwrap_or(&id.namespace);
            let percent = match (mirror.percent, &mirror.fraction) {
                (None, None) => 100.0,
                (Some(percent), None) => f64::from(percent),
                (None, Some(fraction)) => {
                    let denominator = fraction.denominator.unwrap_or(100);
                    if denominator <= 0 {
                        let message = format!("{denominator} cannot divide; use a positive denominator");
                        return Err(FieldError::new(format!("{field}.fraction.denominator"), message));
                    }
                    100.0 * f64::from(fraction.numerator) / f64::from(denominator)
                }
                (Some(_), Some(_)) => {
                    return Err(FieldError::new(field, "set percent or fraction, not both"));
                }
            };
            Filter::RequestMirror {
                service: ObjectRef::new(namespace, &backend.name),
                port: backend.port.map(|p| port_number(p, &format!("{backend_field}.port"))).transpose()?,
                percent,
            }
        }
        HttpRouteRulesFiltersType::ExtensionRef => {
            let message = "ExtensionRef filters are not supported by weft; remove the filter";
            return Err(FieldError::new(format!("{field}.type"), message));
        }
        HttpRouteRulesFiltersType::Cors => {
            let message = "CORS filters are not supported by weft yet; remove the filter";
            return Err(FieldError::new(format!("{field}.type"), message));
        }
    })
}

fn modifier(m: &HttpRouteRulesFiltersRequestHeaderModifier) -> HeaderModifier {
    HeaderModifier {
        set: m.set.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
        add: m.add.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
        remove: m.remove.clone().unwrap_or_default(),
    }
}

fn path_rewrite(
    prefix: bool,
    full: Option<&String>,
    prefix_value: Option<&String>,
    field: &str,
) -> Result<PathRewrite, FieldError> {
    let (name, value) = if prefix { ("replacePrefixMatch", prefix_value) } else { ("replaceFullPath", full) };
    let value = value.ok_or_else(|| {
        let kind = if prefix { "ReplacePrefixMatch" } else { "ReplaceFullPath" };
        FieldError::new(format!("{field}.{name}"), format!("missing; type {kind} needs it"))
    })?;
    Ok(if prefix {
        PathRewrite::ReplacePrefixMatch(value.clone())
    } else {
        PathRewrite::ReplaceFullPath(value.clone())
    })
}

fn timeouts(t: Option<&HttpRouteRulesTimeouts>, field: &str) -> Result<RouteTimeouts, FieldError> {
    let Some(t) = t else { return Ok(RouteTimeouts::default()) };
    Ok(RouteTimeouts {
        request: duration(t.request.as_deref(), &format!("{field}.request"))?,
        backend_request: duration(t.backend_request.as_deref(), &format!("{field}.backendRequest"))?,
    })
}

/// Gateway API duration text (GEP-2257); "0s" disables the timeout.
fn duration(text: Option<&str>, field: &str) -> Result<Option<Duration>, FieldError> {
    let Some(text) = text else { return Ok(None) };
    let parsed = gateway_api::Duration::from_str(text).map_err(|e| {
        let message =
            format!("\"{text}\" is not a Gateway API duration ({e}); write e.g. \"10s\", \"500ms\" or \"1h30m\"");
        FieldError::new(field, message)
    })?;
    // GEP-2257 durations are whole milliseconds below 100000 hours, so this always fits.
    let millis = u64::try_from(parsed.as_millis()).map_err(|_| FieldError::new(field, "too long"))?;
    Ok(Some(Duration::from_millis(millis)).filter(|d| !d.is_zero()))
}
