//! Protocol detection: the Service port's appProtocol decides where it is given; otherwise the
//! first bytes the client sends. A client that sends nothing (a server-first protocol such as a
//! database greeting) is treated as opaque TCP after a short wait, never a multi-second one.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), gRPC included.
    Http2,
    Opaque,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "tcp",
        }
    }

    /// What a Service port declares, as Istio reads it: its `appProtocol`, else its name as
    /// `<protocol>[-<suffix>]` (`http`, `http-web`, `grpc-api`, `tcp-db`). An `appProtocol`
    /// weft does not know leaves the port undeclared (detected), the name unread.
    pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Option<Protocol> {
        let said = app_protocol.or(port_name)?;
        Protocol::from_app_protocol(said).or_else(|| {
            let said = said.to_ascii_lowercase();
            // gRPC-Web's name has a hyphen of its own.
            if said.starts_with("grpc-web") {
                return Some(Protocol::Http1);
            }
            Protocol::from_app_protocol(said.split('-').next()?)
        })
    }

    /// What an explicit `appProtocol` says, if weft knows the value.
    pub fn from_app_protocol(app: &str) -> Option<Protocol> {
        match app.to_ascii_lowercase().as_str() {
            "http" | "kubernetes.io/http" | "http1" | "grpc-web" => Some(Protocol::Http1),
            "kubernetes.io/h2c" | "h2c" | "http2" | "grpc" => Some(Protocol::Http2),
            // The application's own TLS cannot be read: its bytes pass through.
            "tcp" | "kubernetes.io/tcp" | "https" | "tls" | "mysql" | "postgresql" | "redis" | "mongo" => {
                Some(Protocol::Opaque)
            }
            _ => None,
        }
    }

    /// What the proxy speaks to a service port's endpoints: what the request itself needs,
    /// whatever the port says (gRPC: HTTP/2, for its trailers; a protocol switch: HTTP/1.1,
    /// whose connection it takes over), else what the port declares (as in Istio, an `http`
    /// port gets HTTP/1.1 whatever the client spoke, and an `h2c` or `grpc` port HTTP/2),
    /// else the client's own protocol.
    pub fn upstream(declared: Option<Protocol>, downstream: Protocol, needed: Option<Protocol>) -> Protocol {
        match (needed, declared) {
            (Some(needed), _) => needed,
            (None, Some(declared @ (Protocol::Http1 | Protocol::Http2))) => declared,
            _ => downstream,
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// Classifies a connection's first bytes; `None` means "need more bytes".
pub fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return None;
    }
    if first.len() >= H2_PREFACE.len() && first.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(first) {
        return None;
    }
    for m in METHODS {
        if first.starts_with(m) {
            return Some(Protocol::Http1);
        }
        if m.starts_with(first) {
            return None;
        }
    }
    Some(Protocol::Opaque)
}

/// Peeks (without consuming) until the bytes decide or `wait` passes.
pub async fn sniff(stream: &TcpStream, wait: Duration) -> Protocol {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Silent client (server-first protocol) or an error: pass the bytes through untouched.
            Ok(Err(_)) | Err(_) => return Protocol::Opaque,
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        match classify(&buf[..n]) {
            Some(p) => return p,
            None if n == buf.len() => return Protocol::Opaque,
            // A first segment shorter than a method or the preface: wait for more. peek returns
            // at once while bytes are queued, so back off briefly instead of spinning.
            None => {
                if Instant::now() >= deadline {
                    return Protocol::Opaque;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        let cases: [(&[u8], Option<Protocol>); 9] = [
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"POST /x HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Protocol::Http2)),
            (b"PRI * HT", None),
            (b"GE", None),
            (b"DEL", None),
            (b"\x16\x03\x01\x02\x00", Some(Protocol::Opaque)), // TLS ClientHello
            (b"*1\r\n$4\r\nPING\r\n", Some(Protocol::Opaque)), // redis
            (b"GETX", Some(Protocol::Opaque)),
        ];
        for (bytes, want) in cases {
            assert_eq!(classify(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn app_protocol_wins() {
        assert_eq!(Protocol::from_app_protocol("kubernetes.io/h2c"), Some(Protocol::Http2));
        assert_eq!(Protocol::from_app_protocol("HTTP"), Some(Protocol::Http1));
        assert_eq!(Protocol::from_app_protocol("mysql"), Some(Protocol::Opaque));
        assert_eq!(Protocol::from_app_protocol("something-else"), None);
    }

    #[test]
    fn the_port_name_declares_when_app_protocol_does_not() {
        use Protocol::*;
        let cases = [
            (None, Some("http"), Some(Http1)),
            (None, Some("http-web"), Some(Http1)),
            (None, Some("HTTP2-api"), Some(Http2)),
            (None, Some("grpc-reviews"), Some(Http2)),
            (None, Some("grpc-web"), Some(Http1)),
            (None, Some("grpc-web-ui"), Some(Http1)),
            (None, Some("tcp-db"), Some(Opaque)),
            (None, Some("mysql"), Some(Opaque)),
            (None, Some("web"), None),
            (None, Some("httpd"), None),
            (None, None, None),
            // appProtocol wins, and one weft does not know leaves the port to detection.
            (Some("kubernetes.io/h2c"), Some("http"), Some(Http2)),
            (Some("tcp"), Some("http"), Some(Opaque)),
            (Some("http-custom"), None, Some(Http1)),
            (Some("example.com/custom"), Some("http"), None),
        ];
        for (app, name, want) in cases {
            assert_eq!(Protocol::declared(app, name), want, "appProtocol {app:?}, name {name:?}");
        }
    }

    #[test]
    fn the_declared_protocol_goes_upstream() {
        use Protocol::*;
        // (declared, downstream, what the request needs: gRPC HTTP/2, a switch HTTP/1.1) -> upstream
        let cases = [
            (Some(Http1), Http2, None, Http1),
            (Some(Http2), Http1, None, Http2),
            (None, Http2, None, Http2),
            (None, Http1, None, Http1),
            (Some(Http1), Http2, Some(Http2), Http2),
            (None, Http1, Some(Http2), Http2),
            (Some(Opaque), Http1, None, Http1),
            (Some(Http2), Http1, Some(Http1), Http1),
        ];
        for (declared, downstream, needed, want) in cases {
            assert_eq!(Protocol::upstream(declared, downstream, needed), want, "{declared:?} {downstream:?} needed {needed:?}");
        }
    }
}
