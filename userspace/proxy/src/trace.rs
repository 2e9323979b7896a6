//! Trace context across the proxy hop: W3C `traceparent` and B3 (multi-header) are continued
//! with a new span id for this hop; a request with neither starts a trace. `x-request-id` is
//! kept or created.

use http::{HeaderMap, HeaderValue};

/// This hop's span in a trace. Ids are kept as numbers; they are spelled in hex only where
/// they are written (headers, the access log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span, if the request carried one.
    pub parent_id: Option<u64>,
    pub sampled: bool,
    /// `x-request-id` as sent upstream, and returned to the client.
    pub request_id: HeaderValue,
}

impl Span {
    /// 32 lowercase hex digits.
    pub fn trace_hex(&self) -> String {
        hex(self.trace_id, 32)
    }

    /// 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        hex(u128::from(self.span_id), 16)
    }

    pub fn parent_hex(&self) -> Option<String> {
        self.parent_id.map(|p| hex(u128::from(p), 16))
    }

    pub fn request_id_text(&self) -> String {
        String::from_utf8_lossy(self.request_id.as_bytes()).into_owned()
    }
}

/// Appends the low `digits` hex digits of `v`, lowercase, most significant first.
fn push_hex(out: &mut String, v: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
}

fn hex(v: u128, digits: u32) -> String {
    let mut s = String::with_capacity(digits as usize);
    push_hex(&mut s, v, digits);
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

/// `s` as a non-zero id of exactly `len` hex digits.
fn parse_hex(s: &str, len: usize) -> Option<u128> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|&v| v != 0)
}

/// A header value that differs on every request, marked so HPACK sends it as a literal that is
/// never indexed: entering it in the connection's table would only evict entries that repeat
/// (and cost a search of the entries of the same name on every request).
fn unique(text: String) -> Option<HeaderValue> {
    let mut v = HeaderValue::try_from(text).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// `00-<32 hex trace>-<16 hex parent>-<2 hex flags>`
fn parse_traceparent(v: &str) -> Option<(u128, u64, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || flags.len() != 2 {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((parse_hex(trace, 32)?, u64::try_from(parse_hex(parent, 16)?).ok()?, sampled))
}

/// B3's trace id (16 or 32 hex digits; a 64-bit one is left-padded to W3C's 128 bits), span
/// id and sampling decision.
fn parse_b3(headers: &HeaderMap) -> Option<(u128, u64, bool)> {
    let text = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (trace, span) = (text("x-b3-traceid")?, text("x-b3-spanid")?);
    let trace = parse_hex(trace, 32).or_else(|| parse_hex(trace, 16))?;
    let span = u64::try_from(parse_hex(span, 16)?).ok()?;
    let sampled = text("x-b3-sampled").is_none_or(|v| v == "1" || v == "true");
    Some((trace, span, sampled))
}

/// Reads the caller's context, creates this hop's span and rewrites the headers the upstream
/// sees so its parent is this hop. A trace the proxy starts is sampled with probability
/// `sample`; a caller's decision is kept.
pub fn continue_trace(headers: &mut HeaderMap, sample: f64) -> Span {
    let w3c = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let (trace_id, parent_id, sampled) = match w3c.or_else(|| parse_b3(headers)) {
        Some((t, p, s)) => (t, Some(p), s),
        None => (fastrand::u128(1..), None, sample >= 1.0 || fastrand::f64() < sample),
    };
    let span_id = fastrand::u64(1..);

    // Ids differ on every request: HTTP/2 sends them never indexed (see `unique`).
    let set = |headers: &mut HeaderMap, n: &'static str, v: String| {
        if let Some(v) = unique(v) {
            headers.insert(n, v);
        }
    };
    let mut traceparent = String::with_capacity(55);
    traceparent.push_str("00-");
    push_hex(&mut traceparent, trace_id, 32);
    traceparent.push('-');
    push_hex(&mut traceparent, u128::from(span_id), 16);
    traceparent.push_str(if sampled { "-01" } else { "-00" });
    set(headers, "traceparent", traceparent);
    // Keep B3 in step for callees that only read B3.
    if headers.contains_key("x-b3-traceid") {
        set(headers, "x-b3-traceid", hex(trace_id, 32));
        set(headers, "x-b3-spanid", hex(u128::from(span_id), 16));
        if let Some(p) = parent_id {
            set(headers, "x-b3-parentspanid", hex(u128::from(p), 16));
        }
        headers.insert("x-b3-sampled", HeaderValue::from_static(if sampled { "1" } else { "0" }));
    }
    let request_id = match headers.get_mut("x-request-id") {
        Some(kept) => {
            kept.set_sensitive(true);
            kept.clone()
        }
        None => {
            let created = unique(request_id()).unwrap_or_else(|| HeaderValue::from_static("-"));
            headers.insert("x-request-id", created.clone());
            created
        }
    };
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
        assert_eq!(span.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.parent_hex().as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(span.span_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(h["traceparent"], format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", span.span_hex()).as_str());
        assert_eq!(h["x-request-id"], span.request_id);
    }

    #[test]
    fn continues_b3_and_starts_new_traces() {
        let mut h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-sampled", "1")]);
        let span = continue_trace(&mut h, 1.0);
        assert_eq!(span.trace_hex(), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(h["x-b3-traceid"], "0000000000000000a3ce929d0e0e4736");
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
        assert_eq!(h["x-b3-spanid"], span.span_hex().as_str());
        // Upper-case hex is read too, and written back lower-case.
        let mut upper = headers(&[("traceparent", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00")]);
        let span = continue_trace(&mut upper, 1.0);
        assert_eq!((span.trace_hex().as_str(), span.sampled), ("4bf92f3577b34da6a3ce929d0e0e4736", false));

        let mut fresh = HeaderMap::new();
        let span = continue_trace(&mut fresh, 1.0);
        assert!(span.parent_id.is_none() && span.trace_id != 0 && span.sampled);
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
        assert!(parse_hex(&span.trace_hex(), 32).is_some() && parse_hex(&span.span_hex(), 16).is_some(), "{span:?}");
        let id = span.request_id_text();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{id}");
        assert!(id.split('-').all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())));
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
        assert!(h["x-request-id"].is_sensitive(), "sent never indexed like a new one");
    }
}
