//! The tunnel between nodes over real sockets on 127.0.0.1: two "nodes" (a dialling
//! [`Tunnels`] and an accepting [`tunnel::serve`]) and an echo server standing in for the
//! destination workload.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use http::StatusCode;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{
    body::{Bytes, Incoming},
    client::conn as client,
    server::conn as server,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use weft_identity::{Ca, CertStore, LocalIssuer, SpiffeId, TrustBundle};
use weft_proxy::tunnel::{self, Admission, Identities, Inbound, RequestGate, TunnelError, TunnelMetrics, Tunnels};

const TD: &str = "cluster.local";
const DEADLINE: Duration = Duration::from_secs(10);

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("valid id")
}

fn identities(ca: &Arc<Ca>) -> Arc<Identities> {
    Arc::new(Identities {
        certs: CertStore::new(Arc::new(LocalIssuer::new(ca.clone()))),
        bundle: TrustBundle::from_ca(ca),
    })
}

/// The accepting node's workloads, and who may reach them.
struct Node {
    workloads: HashMap<SocketAddrV4, SpiffeId>,
    denied: Vec<SpiffeId>,
    /// Streams to these targets are served as HTTP and judged per request by [`PathGate`].
    http: Vec<SocketAddrV4>,
}

/// Refuses paths under /private, with a reason.
struct PathGate;

impl RequestGate for PathGate {
    fn check(&self, req: &http::Request<Incoming>) -> Result<Option<http::Uri>, (StatusCode, String)> {
        match req.uri().path().starts_with("/private") {
            true => Err((StatusCode::FORBIDDEN, format!("{} is private", req.uri().path()))),
            false => Ok(None),
        }
    }
}

impl Inbound for Node {
    fn local_identity(&self, target: SocketAddrV4) -> Option<SpiffeId> {
        self.workloads.get(&target).cloned()
    }
    fn hosts(&self, id: &SpiffeId) -> bool {
        self.workloads.values().any(|w| w == id)
    }
    fn admit(&self, peer: &SpiffeId, target: SocketAddrV4) -> Result<Admission, String> {
        if self.denied.contains(peer) {
            return Err(format!("{peer} is denied"));
        }
        Ok(if self.http.contains(&target) { Admission::Http(Arc::new(PathGate)) } else { Admission::Open })
    }
}

/// An echo server; its address.
async fn echo() -> SocketAddrV4 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind echo");
    let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!("bound v4") };
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Scene {
    target: SocketAddrV4,
    node: SocketAddr,
    accepting: Arc<TunnelMetrics>,
    accepting_registry: Registry,
}

/// Starts the accepting node with shop/reviews at the echo server's address, and `others`.
async fn accepting_node(ca: &Arc<Ca>, denied: Vec<SpiffeId>, others: &[(SocketAddrV4, SpiffeId)]) -> Scene {
    accepting_node_with_http(ca, denied, others, vec![]).await
}

async fn accepting_node_with_http(
    ca: &Arc<Ca>,
    denied: Vec<SpiffeId>,
    others: &[(SocketAddrV4, SpiffeId)],
    http: Vec<SocketAddrV4>,
) -> Scene {
    let target = echo().await;
    let mut workloads = HashMap::from([(target, id("shop", "reviews"))]);
    workloads.extend(others.iter().cloned());
    let node = Node { workloads, denied, http };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind tunnel");
    let addr = listener.local_addr().expect("addr");
    let mut registry = Registry::default();
    let metrics = Arc::new(TunnelMetrics::register(&mut registry));
    tokio::spawn(tunnel::serve(listener, identities(ca), Arc::new(node), metrics.clone()));
    Scene { target, node: addr, accepting: metrics, accepting_registry: registry }
}

fn dialler(ca: &Arc<Ca>) -> (Tunnels, Registry) {
    dialler_with(ca, 1)
}

fn dialler_with(ca: &Arc<Ca>, connections: usize) -> (Tunnels, Registry) {
    let mut registry = Registry::default();
    let metrics = Arc::new(TunnelMetrics::register(&mut registry));
    (Tunnels::with_connections(identities(ca), metrics, connections), registry)
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("encode");
    out
}

async fn round_trip(stream: &mut tunnel::TunnelStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.expect("write");
    let mut back = vec![0; payload.len()];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut back)).await.expect("echo in time").expect("read");
    back
}

/// A stream carries more than its flow-control window both ways at once, byte for byte, and
/// passes each end's close on: the caller's half-close reaches the workload, whose close after
/// echoing everything ends the caller's reads.
#[tokio::test]
async fn carries_bulk_both_ways_and_passes_half_close_on() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    let (tunnels, _registry) = dialler(&ca);
    let stream = tunnels.open(&id("default", "web"), scene.node, &id("shop", "reviews"), scene.target).await.expect("open");
    // 12 MiB: three times the 4 MiB stream window, so it only gets through if both ends
    // give capacity back as they pass bytes on.
    let big: Vec<u8> = (0..12 << 20).map(|i: u32| (i % 253) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        for chunk in big.chunks(8 << 10) {
            wr.write_all(chunk).await.expect("write");
        }
        wr.shutdown().await.expect("half-close");
    };
    let reader = async {
        let mut back = Vec::with_capacity(big.len());
        rd.read_to_end(&mut back).await.expect("read to the end");
        back
    };
    let ((), back) = tokio::time::timeout(DEADLINE, async { tokio::join!(writer, reader) }).await.expect("in time");
    assert_eq!(back.len(), big.len(), "every byte came back and then the end");
    assert!(back == big, "the bytes came back in order and unchanged");
}

/// A relay between the dialler and the accepting node that counts the TLS records the
/// dialler sends (each record's 5-byte header: type, version, length); the address to dial.
async fn counting_relay(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind relay");
    let addr = listener.local_addr().expect("addr");
    let records = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = records.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.expect("accept");
        let server = tokio::net::TcpStream::connect(to).await.expect("connect to the node");
        let ((mut client_rd, mut client_wr), (mut server_rd, mut server_wr)) = (client.into_split(), server.into_split());
        tokio::spawn(async move { tokio::io::copy(&mut server_rd, &mut client_wr).await });
        // Bytes of the record being passed on that are still to come, header included.
        let (mut header, mut left) = (Vec::new(), 0usize);
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if left > 0 {
                    left -= 1;
                    continue;
                }
                header.push(b);
                if header.len() == 5 {
                    left = usize::from(u16::from_be_bytes([header[3], header[4]]));
                    header.clear();
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            if server_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    (addr, records)
}

/// A new tunnel sends h2's preface in the same TLS record as its SETTINGS and first CONNECT:
/// up to the first byte's echo the dialler sends ClientHello, ChangeCipherSpec, its Finished
/// flight, [preface + SETTINGS + WINDOW_UPDATE + CONNECT], the SETTINGS ACK and the DATA; the
/// preface on its own would make a seventh record (and write).
#[tokio::test]
async fn a_new_tunnel_sends_its_preface_with_its_first_frames() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    let (relay, records) = counting_relay(scene.node).await;
    let (tunnels, _registry) = dialler(&ca);
    let mut stream = tunnels.open(&id("default", "web"), relay, &id("shop", "reviews"), scene.target).await.expect("open");
    assert_eq!(round_trip(&mut stream, b"x").await, b"x");
    let sent = records.load(std::sync::atomic::Ordering::SeqCst);
    assert!(sent <= 6, "the dialler sent {sent} TLS records up to its first echo; 6 expected (the preface went alone?)");
}

#[tokio::test]
async fn carries_connections_over_one_pooled_mtls_connection_with_the_source_identity() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    let (tunnels, dialler_registry) = dialler(&ca);
    let (web, reviews) = (id("default", "web"), id("shop", "reviews"));

    let mut first = tunnels.open(&web, scene.node, &reviews, scene.target).await.expect("open");
    let mut second = tunnels.open(&web, scene.node, &reviews, scene.target).await.expect("open again");
    // 256 KiB each way: more than the default 64 KiB h2 window, in both streams at once.
    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let (a, b) = tokio::join!(round_trip(&mut first, &big), round_trip(&mut second, b"second"));
    assert_eq!(a, big);
    assert_eq!(b, b"second");

    let accepting = text(&scene.accepting_registry);
    assert!(
        accepting.contains(&format!(
            "weft_tunnel_inbound_streams_total{{source_principal=\"{web}\",destination_principal=\"{reviews}\",result=\"ok\"}} 2"
        )),
        "the accepting node saw both streams from the verified source:\n{accepting}"
    );
    let dialling = text(&dialler_registry);
    assert!(
        dialling.contains("weft_tunnel_handshakes_total{direction=\"outbound\",result=\"ok\"} 1"),
        "two streams share one tunnel connection:\n{dialling}"
    );
    assert!(dialling.contains("weft_tunnel_outbound_streams_total{result=\"ok\"} 2"), "{dialling}");
    drop(scene.accepting);
}

#[tokio::test]
async fn with_two_connections_per_identity_pair_each_pair_takes_both_in_turn() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    let (tunnels, dialler_registry) = dialler_with(&ca, 2);
    let (web, cart, reviews) = (id("default", "web"), id("default", "cart"), id("shop", "reviews"));

    // Interleaved: each source's own turns, not one count over both, decide its connection.
    let mut streams = Vec::new();
    for src in [&web, &cart, &web, &cart, &web] {
        streams.push(tunnels.open(src, scene.node, &reviews, scene.target).await.expect("open"));
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let payload = format!("stream {i}");
        assert_eq!(round_trip(stream, payload.as_bytes()).await, payload.as_bytes());
    }
    let dialling = text(&dialler_registry);
    assert!(
        dialling.contains("weft_tunnel_handshakes_total{direction=\"outbound\",result=\"ok\"} 4"),
        "two connections for each of the two sources, the fifth stream on web's first:\n{dialling}"
    );
    let accepting = text(&scene.accepting_registry);
    for (src, n) in [(&web, 3), (&cart, 2)] {
        let line = format!(
            "weft_tunnel_inbound_streams_total{{source_principal=\"{src}\",destination_principal=\"{reviews}\",result=\"ok\"}} {n}"
        );
        assert!(accepting.contains(&line), "{line}:\n{accepting}");
    }
}

#[tokio::test]
async fn a_stream_to_another_workload_than_the_one_named_is_refused() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let ratings = echo().await;
    let scene = accepting_node(&ca, vec![], &[(ratings, id("shop", "ratings"))]).await;
    let (tunnels, _) = dialler(&ca);
    let (web, reviews) = (id("default", "web"), id("shop", "reviews"));
    // A tunnel that presented shop/reviews must not carry streams to shop/ratings.
    let err = tunnels.open(&web, scene.node, &reviews, ratings).await.expect_err("misdirected");
    assert!(matches!(&err, TunnelError::Refused { status, .. } if status.as_u16() == 421), "{err}");
    // Nor to an address that is no workload of that node.
    let nowhere = echo().await;
    let err = tunnels.open(&web, scene.node, &reviews, nowhere).await.expect_err("unknown target");
    assert!(matches!(&err, TunnelError::Refused { status, .. } if status.as_u16() == 404), "{err}");
    // Named rightly, it opens.
    let mut ok = tunnels.open(&web, scene.node, &id("shop", "ratings"), ratings).await.expect("open");
    assert_eq!(round_trip(&mut ok, b"ratings").await, b"ratings");
}

#[tokio::test]
async fn a_denied_source_is_refused_with_the_reason() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![id("default", "intruder")], &[]).await;
    let (tunnels, _) = dialler(&ca);
    let err = tunnels
        .open(&id("default", "intruder"), scene.node, &id("shop", "reviews"), scene.target)
        .await
        .expect_err("denied");
    match &err {
        TunnelError::Refused { status, reason, .. } => {
            assert_eq!(status.as_u16(), 403);
            assert!(reason.contains("intruder is denied"), "{reason}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let accepting = text(&scene.accepting_registry);
    assert!(accepting.contains("result=\"denied\"} 1"), "{accepting}");
    // Others still get through.
    let mut ok = tunnels.open(&id("default", "web"), scene.node, &id("shop", "reviews"), scene.target).await.expect("open");
    assert_eq!(round_trip(&mut ok, b"hi").await, b"hi");
}

#[tokio::test]
async fn a_source_from_an_untrusted_ca_is_refused() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let rogue = Arc::new(Ca::generate(TD).expect("rogue ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    // The rogue node trusts the real root (so it accepts the server) but its own certificate
    // comes from a root the accepting node does not trust.
    let rogue_ids = Arc::new(Identities {
        certs: CertStore::new(Arc::new(LocalIssuer::new(rogue.clone()))),
        bundle: TrustBundle::from_ca(&ca),
    });
    let tunnels = Tunnels::new(rogue_ids, Arc::new(TunnelMetrics::default()));
    let err = tunnels.open(&id("default", "web"), scene.node, &id("shop", "reviews"), scene.target).await.expect_err("refused");
    assert!(matches!(err, TunnelError::Tls { .. } | TunnelError::Http { .. }), "{err}");
    let accepting = text(&scene.accepting_registry);
    assert!(accepting.contains("weft_tunnel_handshakes_total{direction=\"inbound\",result=\"failed\"} 1"), "{accepting}");
    assert!(!accepting.contains("result=\"ok\""), "nothing got through:\n{accepting}");
}

#[tokio::test]
async fn a_node_that_does_not_host_the_named_identity_cannot_answer() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let scene = accepting_node(&ca, vec![], &[]).await;
    let (tunnels, _) = dialler(&ca);
    // shop/ratings runs elsewhere: this node has no certificate to present for it.
    let err = tunnels.open(&id("default", "web"), scene.node, &id("shop", "ratings"), scene.target).await.expect_err("no such identity here");
    assert!(matches!(err, TunnelError::Tls { .. }), "{err}");
}

/// An HTTP workload answering "<version> <path>"; h2c when `h2`, else HTTP/1.1.
async fn http_workload(h2: bool) -> SocketAddrV4 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind workload");
    let SocketAddr::V4(addr) = listener.local_addr().expect("addr") else { unreachable!("bound v4") };
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let service = service_fn(|req: http::Request<Incoming>| async move {
                let body = format!("{:?} {}", req.version(), req.uri().path());
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                let _ = match h2 {
                    true => server::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await,
                    false => server::http1::Builder::new().serve_connection(io, service).await,
                };
            });
        }
    });
    addr
}

/// A workload whose policies read requests: the accepting end serves its streams as HTTP,
/// answers what the gate refuses itself (status and reason) and forwards the rest, over
/// HTTP/1.1 and h2c alike, several requests per stream.
#[tokio::test]
async fn streams_to_a_workload_with_request_policies_are_judged_per_request() {
    let ca = Arc::new(Ca::generate(TD).expect("ca"));
    let (h1, h2) = (http_workload(false).await, http_workload(true).await);
    let reviews = id("shop", "reviews");
    let others = [(h1, reviews.clone()), (h2, reviews.clone())];
    let scene = accepting_node_with_http(&ca, vec![], &others, vec![h1, h2]).await;
    let (tunnels, _registry) = dialler(&ca);
    let web = id("default", "web");

    async fn get(send: &mut client::http1::SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String, String) {
        let req = http::Request::get(path).header("host", "reviews").body(Empty::new()).expect("request");
        answer(send.send_request(req).await.expect("response")).await
    }
    async fn answer(resp: http::Response<Incoming>) -> (StatusCode, String, String) {
        let status = resp.status();
        let reason = resp.headers().get(tunnel::REASON_HEADER).map(|v| v.to_str().expect("ascii").to_owned());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).trim().to_owned(), reason.unwrap_or_default())
    }

    let stream = tunnels.open(&web, scene.node, &reviews, h1).await.expect("open to the HTTP/1.1 workload");
    let (mut send, conn) = client::http1::handshake(TokioIo::new(stream)).await.expect("http1 over the stream");
    tokio::spawn(conn);
    let (status, body, _) = get(&mut send, "/public/a").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "HTTP/1.1 /public/a"), "allowed and forwarded");
    let (status, body, reason) = get(&mut send, "/private/b").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "refused at the destination: {body}");
    assert_eq!(reason, "/private/b is private", "with the gate's reason");
    let (status, body, _) = get(&mut send, "/public/c").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "HTTP/1.1 /public/c"), "the stream serves on after a refusal");

    let stream = tunnels.open(&web, scene.node, &reviews, h2).await.expect("open to the h2c workload");
    let (send, conn) = client::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2c over the stream");
    tokio::spawn(conn);
    let request = |path: &str| {
        let uri = format!("http://reviews{path}");
        http::Request::get(uri).body(Empty::<Bytes>::new()).expect("request")
    };
    let (allowed, refused) =
        tokio::join!(send.clone().send_request(request("/public/h2")), send.clone().send_request(request("/private/h2")));
    let (status, body, _) = answer(allowed.expect("response")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "HTTP/2.0 /public/h2"), "h2c forwarded as h2c");
    let (status, _, reason) = answer(refused.expect("response")).await;
    assert_eq!((status, reason.as_str()), (StatusCode::FORBIDDEN, "/private/h2 is private"));
}
