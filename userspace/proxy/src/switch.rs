//! Protocol switches: an HTTP/1.1 request's `Connection: upgrade` (WebSocket and the like), and
//! HTTP/2's extended CONNECT (RFC 8441), which is read as the same request, so routes,
//! policies and metrics see one kind of switch. Upstream, a switch always goes as HTTP/1.1.
//! Once the upstream answers 101, the client's side (the rest of its HTTP/1.1 connection, or
//! its HTTP/2 stream, answered 200) is joined to the upstream's switched connection, and the
//! request is recorded when that session ends, by either side or by the idle timeout.

use std::{io, time::Duration};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::record::Exchange;

/// A protocol switch agreed to: the upstream's side of it, the request that asked for it, and
/// how long the session may pass no byte before the proxy ends it.
pub struct Switch {
    pub upstream: OnUpgrade,
    pub exchange: Exchange,
    pub idle: Option<Duration>,
}

/// The names listed in a request's `Connection` headers.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// The protocol an HTTP/1.1 request asks to switch to: its `Upgrade` header, if `Connection`
/// names `upgrade` too. (HTTP/2 forbids both headers; its clients ask by extended CONNECT.)
pub fn asked(headers: &HeaderMap) -> Option<&HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade")).then_some(protocol)
}

/// An HTTP/2 client's extended CONNECT (`:method CONNECT`, `:protocol websocket`), rewritten
/// as the HTTP/1.1 switch it stands for: `GET` with `Connection: upgrade` and `Upgrade`, and for
/// WebSocket a fresh `Sec-WebSocket-Key`, which HTTP/2 leaves out and HTTP/1.1 servers require.
/// Returns the client's side of the stream, ready once the answer has been sent.
pub fn from_extended_connect<B>(req: &mut Request<B>) -> Option<OnUpgrade> {
    if req.method() != Method::CONNECT {
        return None;
    }
    let protocol = HeaderValue::from_bytes(req.extensions().get::<hyper::ext::Protocol>()?.as_ref()).ok()?;
    req.extensions_mut().remove::<hyper::ext::Protocol>();
    let client = hyper::upgrade::on(&mut *req);
    *req.method_mut() = Method::GET;
    let websocket = protocol.as_bytes().eq_ignore_ascii_case(b"websocket");
    let headers = req.headers_mut();
    if websocket && !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
        let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_ne_bytes());
        if let Ok(key) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, key);
        }
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
    Some(client)
}

/// The upstream's 101 as an HTTP/2 client's extended CONNECT is answered: 200, without the
/// HTTP/1.1 switch's own headers.
pub fn answer_extended_connect<B>(response: &mut Response<B>) {
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    for name in [header::CONNECTION, header::UPGRADE, header::SEC_WEBSOCKET_ACCEPT] {
        headers.remove(name);
    }
}

/// Joins an HTTP/2 client's stream, once its 200 is sent, to the upstream's switched connection.
pub async fn join_stream(client: OnUpgrade, switch: Switch) {
    match client.await {
        Ok(client) => join(TokioIo::new(client), switch).await,
        Err(e) => {
            tracing::debug!(error = %e, "the client's stream was lost before the switch");
            switch.exchange.switch_ended(0, 0, false);
        }
    }
}

/// Joins a client whose connection switched protocols to the upstream that agreed to it,
/// bytes passing both ways untouched until either side closes; then records the request.
pub async fn join<C: AsyncRead + AsyncWrite + Unpin>(client: C, Switch { upstream, exchange, idle }: Switch) {
    let (ended, read, written) = match upstream.await {
        Ok(upstream) => crate::idle::copy_bidirectional(client, &mut TokioIo::new(upstream), idle).await,
        Err(e) => {
            tracing::debug!(error = %e, "the upstream's switched connection was lost");
            (Err(io::Error::other(e)), 0, 0)
        }
    };
    if let Err(e) = &ended {
        tracing::debug!(error = %e, "switched connection ended with an error");
    }
    exchange.switch_ended(read, written, ended.is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_is_asked_by_upgrade_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert_eq!(asked(&h), None, "Upgrade alone is not a request to switch");
        h.insert("connection", HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(asked(&h).map(HeaderValue::as_bytes), Some(&b"websocket"[..]));
        h.remove("upgrade");
        assert_eq!(asked(&h), None);
    }

    #[test]
    fn an_extended_connect_reads_as_the_http1_switch_it_stands_for() {
        let mut req = Request::builder().method(Method::CONNECT).uri("http://chat.example/room").body(()).expect("a request");
        req.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        req.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
        assert!(from_extended_connect(&mut req).is_some());
        assert_eq!(req.method(), Method::GET);
        assert_eq!(asked(req.headers()).map(HeaderValue::as_bytes), Some(&b"websocket"[..]));
        let key = req.headers()[header::SEC_WEBSOCKET_KEY].to_str().expect("text");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(key).map(|k| k.len()).ok(), Some(16), "{key}");
        assert_eq!(req.headers()["sec-websocket-version"], "13");

        // Plain CONNECT (no :protocol) and other methods are left alone.
        let mut plain = Request::builder().method(Method::CONNECT).uri("http://db.example:5432").body(()).expect("a request");
        assert!(from_extended_connect(&mut plain).is_none());
        assert_eq!((plain.method(), asked(plain.headers())), (&Method::CONNECT, None));
        let mut get = Request::builder().uri("/").body(()).expect("a request");
        get.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
        assert!(from_extended_connect(&mut get).is_none());

        let mut answer = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            .header("x-served-by", "v1")
            .body(())
            .expect("a response");
        answer_extended_connect(&mut answer);
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers().len(), 1, "only the upstream's own headers are left: {:?}", answer.headers());
    }
}
