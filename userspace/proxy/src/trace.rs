//! Trace context across the proxy hop: W3C `traceparent` and B3 (multi-header) are continued
//! with a new span id for this hop; a request with neither starts a trace. `x-request-id` is
//! kept or created.

use http::{HeaderMap, HeaderValue};

/// This hop's span in a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// The caller's span, if the request carried one.
    pub parent_id: Option<String>,
    pub sampled: bool,
    pub request_id: String,
}

/// Appends the low `digits` hex digits of `v`, lowercase, most significant first.
fn push_hex(out: &mut String, v: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
}

/// A random 128-bit trace id as 32 lowercase hex digits.
fn trace_hex() -> String {
    let mut s = String::with_capacity(32);
    push_hex(&mut s, fastrand::u128(1..), 32);
    s
}

/// A random 64-bit span id as 16 lowercase hex digits.
fn span_hex() -> String {
    let mut s = String::with_capacity(16);
    push_hex(&mut s, u128::from(fastrand::u64(1..)), 16);
    s
}

/// A random id in the UUID layout (8-4-4-4-12 hex digits).
fn request_id() -> String {
    let r = fastrand::u128(..);
    let mut s = String::with_capacity(36);
    for (shift, digits) in [(96, 8), (80, 4), (64, 4), (48, 4), (0, 12)] {
        if shift != 96 {
            s.push('-');
        }
        push_hex(&mut s, r >> shift, digits);
    }
    s
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// A header value that differs on every request, marked so HPACK sends it as a literal that is
/// never indexed: entering it in the connection's table would only evict entries that repeat
/// (and cost a search of the entries of the same name on every request).
fn unique(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>`
fn parse_traceparent(v: &str) -> Option<(String, String, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || !is_hex(trace, 32) || !is_hex(parent, 16) || flags.len() != 2 {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_ascii_lowercase(), parent.to_ascii_lowercase(), sampled))
}

/// Reads the caller's context, creates this hop's span and rewrites the headers the upstream
/// sees so its parent is this hop. A trace the proxy starts is sampled with probability
/// `sample`; a caller's decision is kept.
pub fn continue_trace(headers: &mut HeaderMap, sample: f64) -> Span {
    let get = |h: &HeaderMap, n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let w3c = get(headers, "traceparent").and_then(|v| parse_traceparent(&v));
    let b3 = match (get(headers, "x-b3-traceid"), get(headers, "x-b3-spanid")) {
        (Some(t), Some(s)) if (is_hex(&t, 32) || is_hex(&t, 16)) && is_hex(&s, 16) => {
            let sampled = get(headers, "x-b3-sampled").is_none_or(|v| v == "1" || v == "true");
            // A 64-bit B3 trace id is left-padded to W3C's 128 bits.
            Some((format!("{t:0>32}").to_ascii_lowercase(), s.to_ascii_lowercase(), sampled))
        }
        _ => None,
    };
    let (trace_id, parent_id, sampled) = match w3c.or(b3) {
        Some((t, p, s)) => (t, Some(p), s),
        None => (trace_hex(), None, sample >= 1.0 || fastrand::f64() < sample),
    };
    let span_id = span_hex();
    let request_id = get(headers, "x-request-id").unwrap_or_else(request_id);

    // Ids differ on every request: HTTP/2 sends them never indexed (see `unique`).
    let set = |h: &mut HeaderMap, n: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(n, unique(v));
        }
    };
    let mut traceparent = String::with_capacity(55);
    for part in ["00-", &trace_id, "-", &span_id, if sampled { "-01" } else { "-00" }] {
        traceparent.push_str(part);
    }
    set(headers, "traceparent", traceparent);
    // Keep B3 in step for callees that only read B3.
    if headers.contains_key("x-b3-traceid") {
        set(headers, "x-b3-traceid", trace_id.clone());
        set(headers, "x-b3-spanid", span_id.clone());
        if let Some(p) = &parent_id {
            set(headers, "x-b3-parentspanid", p.clone());
        }
        set(headers, "x-b3-sampled", if sampled { "1" } else { "0" }.to_owned());
    }
    set(headers, "x-request-id", request_id.clone());
    Span { trace_id, span_id, parent_id, sampled, request_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn continues_a_w3c_trace_with_a_new_span() {
        let mut h = headers(&[("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]);
        let span = continue_trace(&mut h, 1.0);
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(span.span_id, "00f067aa0ba902b7");
        assert_eq!(h["traceparent"], format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", span.span_id).as_str());
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn continues_b3_and_starts_new_traces() {
        let mut h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-sampled", "1")]);
        let span = continue_trace(&mut h, 1.0);
        assert_eq!(span.trace_id, "0000000000000000a3ce929d0e0e4736");
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-spanid"], span.span_id.as_str());

        let mut fresh = HeaderMap::new();
        let span = continue_trace(&mut fresh, 1.0);
        assert!(span.parent_id.is_none() && is_hex(&span.trace_id, 32) && span.sampled);
        let mut unsampled = HeaderMap::new();
        assert!(!continue_trace(&mut unsampled, 0.0).sampled);
        assert!(unsampled["traceparent"].to_str().is_ok_and(|v| v.ends_with("-00")));
        // Invalid (all-zero) ids start a new trace instead of continuing garbage.
        let mut bad = headers(&[("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")]);
        assert!(continue_trace(&mut bad, 1.0).parent_id.is_none());
    }

    #[test]
    fn new_ids_are_hex_of_their_size_and_never_indexed() {
        let mut h = HeaderMap::new();
        let span = continue_trace(&mut h, 1.0);
        assert!(is_hex(&span.trace_id, 32) && is_hex(&span.span_id, 16), "{span:?}");
        let parts: Vec<usize> = span.request_id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{}", span.request_id);
        assert!(span.request_id.split('-').all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())));
        assert!(h["traceparent"].is_sensitive() && h["x-request-id"].is_sensitive());
    }

    #[test]
    fn hex_is_zero_padded_lowercase_of_the_low_digits() {
        let mut s = String::new();
        push_hex(&mut s, 0x1_0abc, 4);
        push_hex(&mut s, u128::MAX, 2);
        assert_eq!(s, "0abcff");
    }

    #[test]
    fn keeps_the_callers_request_id() {
        let mut h = headers(&[("x-request-id", "abc-123")]);
        assert_eq!(continue_trace(&mut h, 1.0).request_id, "abc-123");
    }
}
