//! mTLS between two proxies over real sockets on 127.0.0.1, with the configs, verifiers and
//! rotating slots of weft-identity on both ends.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};
use weft_identity::{
    Ca, CertSlot, CertStore, Error, Expected, IssueFuture, Issuer, LocalIssuer, SpiffeId, TrustBundle,
    WorkloadCert, client_config, peer_identity, server_config, spawn_rotation,
};

const TD: &str = "cluster.local";
/// Upper bound for anything that should take milliseconds; generous for a loaded CI machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// How webpki reports a chain from a root the bundle lacks (every weft root has its own name).
const UNTRUSTED_ROOT: &str = "invalid peer certificate: UnknownIssuer";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).expect("valid id")
}

fn ca() -> Arc<Ca> {
    Arc::new(Ca::generate(TD).expect("generate CA"))
}

fn slot(ca: &Ca, id: &SpiffeId) -> Arc<CertSlot> {
    Arc::new(CertSlot::new(ca.issue(id, Duration::from_secs(3600)).expect("issue")).expect("slot"))
}

fn server_cfg(slot: &Arc<CertSlot>, bundle: &TrustBundle) -> Arc<ServerConfig> {
    server_config(slot.clone(), bundle).expect("server config")
}

fn client_cfg(slot: &Arc<CertSlot>, bundle: &TrustBundle, expected: Expected) -> Arc<ClientConfig> {
    client_config(slot.clone(), bundle, expected).expect("client config")
}

// === test server ===

/// Accepts TLS connections, reports each handshake's outcome (the peer's id, or the error) and
/// echoes bytes on the connections that succeed.
struct TestServer {
    addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<io::Result<Option<SpiffeId>>>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(config: Arc<ServerConfig>) -> TestServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let acceptor = TlsAcceptor::from(config);
        let (tx, accepted) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(mut tls) => {
                            let _ = tx.send(Ok(peer_identity(tls.get_ref().1)));
                            let mut buf = [0; 1024];
                            while let Ok(n @ 1..) = tls.read(&mut buf).await {
                                if tls.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            }
        });
        TestServer {
            addr,
            accepted,
            task,
        }
    }

    /// The outcome of the next handshake on the server side.
    async fn next(&mut self) -> io::Result<Option<SpiffeId>> {
        tokio::time::timeout(DEADLINE, self.accepted.recv())
            .await
            .expect("server handshake within the deadline")
            .expect("server task alive")
    }

    async fn dial(&self, config: Arc<ClientConfig>) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .expect("connect to the test server");
        // The name is not checked (mesh peers are named by SPIFFE id); an IP sends no SNI.
        let name = ServerName::IpAddress(self.addr.ip().into());
        tokio::time::timeout(DEADLINE, TlsConnector::from(config).connect(name, tcp))
            .await
            .expect("client handshake within the deadline")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `msg` and reads the echo.
async fn ping(tls: &mut TlsStream<TcpStream>, msg: &[u8]) -> io::Result<Vec<u8>> {
    tokio::time::timeout(DEADLINE, async {
        tls.write_all(msg).await?;
        let mut buf = vec![0; msg.len()];
        tls.read_exact(&mut buf).await?;
        Ok(buf)
    })
    .await
    .expect("echo within the deadline")
}

/// The server refused the client's certificate with `reason`, and the client cannot use the
/// connection. (In TLS 1.3 the client's handshake ends before the server has checked the client
/// certificate, so the client may only see the refusal when it reads.)
async fn assert_server_refuses(
    server: &mut TestServer,
    client: io::Result<TlsStream<TcpStream>>,
    reason: &str,
) {
    let err = server
        .next()
        .await
        .expect_err("the server must refuse the client");
    assert!(
        err.to_string().contains(reason),
        "server error {err:?} does not mention {reason:?}"
    );
    if let Ok(mut tls) = client {
        let echoed = ping(&mut tls, b"hello").await;
        assert!(
            echoed.is_err(),
            "a refused client must not get data through, got {echoed:?}"
        );
    }
}

/// The client refused the server's certificate with `reason`.
async fn assert_client_refuses(
    server: &mut TestServer,
    client: io::Result<TlsStream<TcpStream>>,
    reason: &str,
) {
    let err = client.expect_err("the client must refuse the server");
    assert!(
        err.to_string().contains(reason),
        "client error {err:?} does not mention {reason:?}"
    );
    assert!(
        server.next().await.is_err(),
        "the server's handshake must fail too"
    );
}

// === handshakes ===

#[tokio::test]
async fn mutual_tls_both_sides_learn_the_peer_identity() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let (a, b) = (id("shop", "frontend"), id("shop", "checkout"));
    let mut server = TestServer::start(server_cfg(&slot(&ca, &b), &bundle)).await;

    let mut tls = server
        .dial(client_cfg(
            &slot(&ca, &a),
            &bundle,
            Expected::Ids(vec![b.clone()]),
        ))
        .await
        .expect("handshake");
    assert_eq!(
        server.next().await.expect("server handshake"),
        Some(a),
        "server sees the client's id"
    );
    let conn = tls.get_ref().1;
    assert_eq!(peer_identity(conn), Some(b), "client sees the server's id");
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(ping(&mut tls, b"hello").await.expect("echo"), b"hello");
}

/// Resumption is off (see `config.rs`): every connection re-verifies the peer's chain against
/// the current bundle and clock, even from the same client config.
#[tokio::test]
async fn every_connection_is_a_full_handshake() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let mut server = TestServer::start(server_cfg(&slot(&ca, &id("a", "server")), &bundle)).await;
    let config = client_cfg(&slot(&ca, &id("a", "client")), &bundle, Expected::Any);
    for _ in 0..2 {
        let mut tls = server.dial(config.clone()).await.expect("handshake");
        server.next().await.expect("server handshake");
        // Reading processes any session ticket the server might have sent.
        assert_eq!(ping(&mut tls, b"x").await.expect("echo"), b"x");
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
}

#[tokio::test]
async fn any_expectation_accepts_every_workload_of_the_trust_domain() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let mut server = TestServer::start(server_cfg(&slot(&ca, &id("x", "y")), &bundle)).await;
    let tls = server
        .dial(client_cfg(
            &slot(&ca, &id("a", "b")),
            &bundle,
            Expected::Any,
        ))
        .await
        .expect("handshake");
    assert_eq!(peer_identity(tls.get_ref().1), Some(id("x", "y")));
    assert!(server.next().await.is_ok());
}

#[tokio::test]
async fn refuses_client_from_untrusted_ca() {
    let (ours, theirs) = (ca(), ca());
    let bundle = TrustBundle::from_ca(&ours);
    let mut server = TestServer::start(server_cfg(&slot(&ours, &id("a", "server")), &bundle)).await;
    // Same trust domain, same id shape, but signed by a root the server does not trust.
    let client_bundle = TrustBundle::from_ca(&ours);
    let tls = server
        .dial(client_cfg(
            &slot(&theirs, &id("a", "client")),
            &client_bundle,
            Expected::Any,
        ))
        .await;
    assert_server_refuses(&mut server, tls, UNTRUSTED_ROOT).await;
}

#[tokio::test]
async fn refuses_server_from_untrusted_ca() {
    let (ours, theirs) = (ca(), ca());
    let mut server = TestServer::start(server_cfg(
        &slot(&theirs, &id("a", "server")),
        &TrustBundle::from_ca(&ours),
    ))
    .await;
    let tls = server
        .dial(client_cfg(
            &slot(&ours, &id("a", "client")),
            &TrustBundle::from_ca(&ours),
            Expected::Any,
        ))
        .await;
    assert_client_refuses(&mut server, tls, UNTRUSTED_ROOT).await;
}

#[tokio::test]
async fn refuses_expired_and_not_yet_valid_client_certs() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let mut server = TestServer::start(server_cfg(&slot(&ca, &id("a", "server")), &bundle)).await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    for (not_before, not_after, reason) in [
        (now - 2 * hour, now - hour, "certificate expired"),
        (now + hour, now + 2 * hour, "certificate not valid yet"),
    ] {
        let cert = ca
            .issue_with_validity(&id("a", "client"), not_before, not_after)
            .expect("issue");
        let slot = Arc::new(CertSlot::new(cert).expect("slot"));
        let tls = server.dial(client_cfg(&slot, &bundle, Expected::Any)).await;
        assert_server_refuses(&mut server, tls, reason).await;
    }
}

#[tokio::test]
async fn refuses_expired_server_cert() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let now = SystemTime::now();
    let expired = ca
        .issue_with_validity(
            &id("a", "server"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .expect("issue");
    let mut server = TestServer::start(server_cfg(
        &Arc::new(CertSlot::new(expired).expect("slot")),
        &bundle,
    ))
    .await;
    let tls = server
        .dial(client_cfg(
            &slot(&ca, &id("a", "client")),
            &bundle,
            Expected::Any,
        ))
        .await;
    assert_client_refuses(&mut server, tls, "certificate expired").await;
}

/// A client that has no certificate to offer.
#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn refuses_client_without_cert() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let mut server = TestServer::start(server_cfg(&slot(&ca, &id("a", "server")), &bundle)).await;
    let tls = server
        .dial(client_config(Arc::new(NoCert), &bundle, Expected::Any).expect("client config"))
        .await;
    assert_server_refuses(&mut server, tls, "peer sent no certificates").await;
}

#[tokio::test]
async fn refuses_server_not_in_expected_ids() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let mut server =
        TestServer::start(server_cfg(&slot(&ca, &id("shop", "impostor")), &bundle)).await;
    let expected = Expected::Ids(vec![id("shop", "checkout"), id("shop", "payments")]);
    let tls = server
        .dial(client_cfg(
            &slot(&ca, &id("shop", "frontend")),
            &bundle,
            expected,
        ))
        .await;
    assert_client_refuses(
        &mut server,
        tls,
        "server presented spiffe://cluster.local/ns/shop/sa/impostor; this connection expects one of spiffe://cluster.local/ns/shop/sa/checkout, spiffe://cluster.local/ns/shop/sa/payments",
    )
    .await;

    // An empty list accepts nobody.
    let tls = server
        .dial(client_cfg(
            &slot(&ca, &id("shop", "frontend")),
            &bundle,
            Expected::Ids(Vec::new()),
        ))
        .await;
    assert_client_refuses(&mut server, tls, "expects no identity").await;
}

// === hand-made certificates from one root ===

/// A root made with rcgen directly, so tests can sign leaves `Ca::issue` refuses to make; also
/// loaded as a `Ca` for two trust domains.
struct RawRoot {
    cert_pem: String,
    key_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

impl RawRoot {
    fn new() -> RawRoot {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "test root");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).expect("self-sign");
        RawRoot {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn ca(&self, trust_domain: &str) -> Ca {
        Ca::from_pem(trust_domain, &self.cert_pem, &self.key_pem).expect("load root")
    }

    /// A client/server leaf with exactly `sans`, wrapped as a slot (its `id` is only a label).
    fn leaf(&self, sans: Vec<SanType>) -> Arc<CertSlot> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let now = SystemTime::now();
        Arc::new(
            CertSlot::new(WorkloadCert {
                id: id("label", "only"),
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                issued_at: now,
                not_before: now,
                not_after: now + Duration::from_secs(3600),
            })
            .expect("slot"),
        )
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.to_owned().try_into().expect("IA5 string"))
}

#[tokio::test]
async fn refuses_wrong_trust_domain_on_either_side() {
    let root = RawRoot::new();
    let (ours, foreign) = (root.ca(TD), root.ca("other.local"));
    let bundle = TrustBundle::from_ca(&ours);
    let stranger = SpiffeId::new("other.local", "a", "b").expect("valid id");
    let reason = "peer spiffe://other.local/ns/a/sa/b is in trust domain \"other.local\"; this proxy trusts only \"cluster.local\"";

    // Chain fine (same root), trust domain wrong: client side.
    let mut server = TestServer::start(server_cfg(&slot(&ours, &id("a", "server")), &bundle)).await;
    let tls = server
        .dial(client_cfg(
            &slot(&foreign, &stranger),
            &bundle,
            Expected::Any,
        ))
        .await;
    assert_server_refuses(&mut server, tls, reason).await;

    // Server side; Expected::Any still means "in the bundle's trust domain".
    let mut server = TestServer::start(server_cfg(&slot(&foreign, &stranger), &bundle)).await;
    let tls = server
        .dial(client_cfg(
            &slot(&ours, &id("a", "client")),
            &bundle,
            Expected::Any,
        ))
        .await;
    assert_client_refuses(&mut server, tls, reason).await;
}

#[tokio::test]
async fn refuses_leaves_without_exactly_one_spiffe_uri() {
    let root = RawRoot::new();
    let ca = root.ca(TD);
    let bundle = TrustBundle::from_ca(&ca);
    let mut server = TestServer::start(server_cfg(&slot(&ca, &id("a", "server")), &bundle)).await;
    let cases = [
        (
            vec![SanType::DnsName(
                "checkout.shop.svc".try_into().expect("dns name"),
            )],
            "no URI SAN",
        ),
        (
            vec![
                uri("spiffe://cluster.local/ns/a/sa/b"),
                uri("spiffe://cluster.local/ns/a/sa/c"),
            ],
            "2 URI SANs",
        ),
        (
            vec![uri("https://cluster.local/ns/a/sa/b")],
            "not a workload SPIFFE id",
        ),
        (
            vec![uri("spiffe://cluster.local/ns/a")],
            "not a workload SPIFFE id",
        ),
    ];
    for (sans, reason) in &cases {
        let tls = server
            .dial(client_cfg(&root.leaf(sans.clone()), &bundle, Expected::Any))
            .await;
        assert_server_refuses(&mut server, tls, reason).await;
    }
    // The same leaves as server certificates.
    for (sans, reason) in cases {
        let mut server = TestServer::start(server_cfg(&root.leaf(sans), &bundle)).await;
        let tls = server
            .dial(client_cfg(
                &slot(&ca, &id("a", "client")),
                &bundle,
                Expected::Any,
            ))
            .await;
        assert_client_refuses(&mut server, tls, reason).await;
    }
}

// === root rotation ===

#[tokio::test]
async fn two_root_bundle_accepts_both_roots() {
    let (old, new) = (ca(), ca());
    let both = TrustBundle::from_pem(TD, &format!("{}{}", old.root_pem(), new.root_pem()))
        .expect("two-root bundle");
    assert_eq!(both.roots().len(), 2);
    let mut also_both = TrustBundle::from_ca(&old);
    also_both.add_ca(&new);
    also_both
        .add_pem(&old.root_pem())
        .expect("re-adding a root");
    assert_eq!(
        also_both.roots(),
        both.roots(),
        "add_ca/add_pem build the same bundle, without duplicates"
    );
    assert_eq!(
        TrustBundle::from_pem(TD, &both.to_pem())
            .expect("PEM round trip")
            .roots(),
        both.roots()
    );

    // Server already on the new root, client still on the old one, and the other way round.
    for (server_ca, client_ca) in [(&new, &old), (&old, &new)] {
        let mut server =
            TestServer::start(server_cfg(&slot(server_ca, &id("a", "server")), &both)).await;
        let mut tls = server
            .dial(client_cfg(
                &slot(client_ca, &id("a", "client")),
                &both,
                Expected::Any,
            ))
            .await
            .expect("handshake across roots");
        assert_eq!(
            server.next().await.expect("server handshake"),
            Some(id("a", "client"))
        );
        assert_eq!(ping(&mut tls, b"x").await.expect("echo"), b"x");
    }

    // Without the second root the new certificates are refused: the bundle is what admits them.
    let old_only = TrustBundle::from_ca(&old);
    let mut server =
        TestServer::start(server_cfg(&slot(&old, &id("a", "server")), &old_only)).await;
    let tls = server
        .dial(client_cfg(
            &slot(&new, &id("a", "client")),
            &both,
            Expected::Any,
        ))
        .await;
    assert_server_refuses(&mut server, tls, UNTRUSTED_ROOT).await;
}

#[test]
fn bundle_rejects_non_certificates() {
    assert!(matches!(
        TrustBundle::from_pem(TD, ""),
        Err(Error::NotACertificate { .. })
    ));
    assert!(matches!(
        TrustBundle::from_pem(
            TD,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        ),
        Err(Error::BadBundleRoot { index: 0, .. })
    ));
    assert!(matches!(
        TrustBundle::from_pem("Bad", &ca().root_pem()),
        Err(Error::Id(_))
    ));
}

// === certificate rotation ===

fn presented(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone()
        .into_owned()
}

#[tokio::test]
async fn new_cert_for_new_handshakes_established_connections_untouched() {
    let ca = ca();
    let bundle = TrustBundle::from_ca(&ca);
    let server_id = id("a", "server");
    let first = ca
        .issue(&server_id, Duration::from_secs(3600))
        .expect("issue");
    let second = ca
        .issue(&server_id, Duration::from_secs(7200))
        .expect("issue");
    let server_slot = Arc::new(CertSlot::new(first.clone()).expect("slot"));
    let mut server = TestServer::start(server_cfg(&server_slot, &bundle)).await;
    let client_config = client_cfg(
        &slot(&ca, &id("a", "client")),
        &bundle,
        Expected::Ids(vec![server_id.clone()]),
    );

    let mut before = server
        .dial(client_config.clone())
        .await
        .expect("first handshake");
    server
        .next()
        .await
        .expect("server side of the first handshake");
    assert_eq!(presented(&before), first.chain[0]);
    assert_eq!(ping(&mut before, b"one").await.expect("echo"), b"one");

    server_slot.set(second.clone()).expect("swap certificate");
    assert_eq!(server_slot.current(), (server_id.clone(), second.not_after));

    let mut after = server
        .dial(client_config)
        .await
        .expect("handshake after the swap");
    server
        .next()
        .await
        .expect("server side of the second handshake");
    assert_eq!(
        presented(&after),
        second.chain[0],
        "a new handshake gets the new certificate"
    );
    assert_eq!(ping(&mut after, b"two").await.expect("echo"), b"two");

    // The connection made before the swap still carries data both ways.
    assert_eq!(
        ping(&mut before, b"still here")
            .await
            .expect("old connection after the swap"),
        b"still here"
    );
    assert_eq!(presented(&before), first.chain[0]);
}

#[test]
fn slot_refuses_another_identity() {
    let ca = ca();
    let slot = slot(&ca, &id("a", "one"));
    let err = slot
        .set(
            ca.issue(&id("a", "two"), Duration::from_secs(60))
                .expect("issue"),
        )
        .expect_err("other identity");
    assert!(matches!(err, Error::SlotMismatch { .. }), "{err}");
    assert_eq!(slot.current().0, id("a", "one"));
}

/// The certificate the slot hands to the next handshake.
fn leaf_of(slot: &CertSlot) -> CertificateDer<'static> {
    ResolvesClientCert::resolve(slot, &[], &[])
        .expect("a slot always has a certificate")
        .cert[0]
        .clone()
}

/// Polls `cond` every 20 ms until it holds or `DEADLINE` passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_renews_at_half_life_and_stops_on_drop() {
    let ca = ca();
    // 2 s certificates: renewed about 1 s after each issue.
    let issuer: Arc<dyn Issuer> = Arc::new(LocalIssuer {
        ca,
        ttl: Duration::from_secs(2),
    });
    let id = id("a", "rotating");
    let slot = Arc::new(CertSlot::new(issuer.issue(&id).await.expect("issue")).expect("slot"));
    let initial = leaf_of(&slot);
    let rotation = spawn_rotation(slot.clone(), issuer).expect("on a runtime");

    eventually("first renewal", || leaf_of(&slot) != initial).await;
    let renewed = leaf_of(&slot);
    eventually("second renewal (the task keeps going)", || {
        leaf_of(&slot) != renewed
    })
    .await;
    assert_eq!(slot.current().0, id);
    assert!(
        slot.current().1 > SystemTime::now(),
        "the slot holds a valid certificate"
    );

    drop(rotation);
    let last = leaf_of(&slot);
    // Three times the renewal interval; a task still running would have renewed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaf_of(&slot), last, "dropping the Rotation stops renewals");
}

/// Fails its first `failures` calls, then issues from the CA.
struct Flaky {
    inner: LocalIssuer,
    failures: usize,
    calls: AtomicUsize,
}

impl Issuer for Flaky {
    fn issue<'a>(&'a self, id: &'a SpiffeId) -> IssueFuture<'a> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.failures {
            // Any error will do; this one is what a foreign id gets.
            return Box::pin(std::future::ready(Err(Error::ForeignTrustDomain {
                id: id.to_string(),
                ca: "unavailable".into(),
            })));
        }
        self.inner.issue(id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_retries_and_keeps_the_old_cert_meanwhile() {
    let ca = ca();
    let id = id("a", "flaky");
    // Already due: renewal starts at once and fails twice (retries after 1 s, then 2 s).
    let now = SystemTime::now();
    let due = ca
        .issue_with_validity(
            &id,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(3600),
        )
        .expect("issue");
    let slot = Arc::new(
        CertSlot::new(WorkloadCert {
            issued_at: now - Duration::from_secs(3600),
            ..due
        })
        .expect("slot"),
    );
    let initial = leaf_of(&slot);
    let flaky = Arc::new(Flaky {
        inner: LocalIssuer {
            ca,
            ttl: Duration::from_secs(3600),
        },
        failures: 2,
        calls: AtomicUsize::new(0),
    });
    let _rotation = spawn_rotation(slot.clone(), flaky.clone()).expect("on a runtime");

    eventually("two failed attempts", || {
        flaky.calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        leaf_of(&slot),
        initial,
        "failed renewals leave the current certificate in place"
    );
    eventually("renewal after the retries", || leaf_of(&slot) != initial).await;
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_store_one_rotating_slot_per_identity() {
    let ca = ca();
    let store = CertStore::new(Arc::new(LocalIssuer {
        ca: ca.clone(),
        ttl: Duration::from_secs(2),
    }));
    let (a, b) = (id("a", "one"), id("b", "two"));
    let slot_a = store.get(&a).await.expect("issue a");
    assert!(
        Arc::ptr_eq(&slot_a, &store.get(&a).await.expect("get a again")),
        "one slot per identity"
    );
    assert!(Arc::ptr_eq(&slot_a, &store.issued(&a).expect("issued")));
    store.get(&b).await.expect("issue b");
    assert_eq!(store.ids(), vec![a.clone(), b.clone()]);

    // The store's slots rotate on their own.
    let initial = leaf_of(&slot_a);
    eventually("store slot renewed", || leaf_of(&slot_a) != initial).await;

    assert!(store.remove(&a));
    assert!(!store.remove(&a));
    assert_eq!(store.ids(), vec![b]);
    let last = leaf_of(&slot_a);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaf_of(&slot_a), last, "remove stops the rotation");

    let foreign = SpiffeId::new("other.local", "a", "b").expect("valid id");
    assert!(matches!(
        store.get(&foreign).await,
        Err(Error::ForeignTrustDomain { .. })
    ));
    assert_eq!(store.ids().len(), 1, "a failed issue leaves no slot behind");
    assert!(store.issued(&foreign).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_store_issues_once_for_concurrent_first_calls() {
    let counting = Arc::new(Flaky {
        inner: LocalIssuer::new(ca()),
        failures: 0,
        calls: AtomicUsize::new(0),
    });
    let store = Arc::new(CertStore::new(counting.clone()));
    let a = id("a", "busy");
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move { store.get(&a).await })
        })
        .collect();
    let mut slots = Vec::new();
    for call in calls {
        slots.push(call.await.expect("task").expect("issued"));
    }
    assert!(slots.iter().all(|s| Arc::ptr_eq(s, &slots[0])));
    assert_eq!(counting.calls.load(Ordering::SeqCst), 1, "one issuance");
}

#[test]
fn cert_store_needs_a_runtime() {
    let store = CertStore::new(Arc::new(LocalIssuer::new(ca())));
    let id = id("a", "b");
    let mut get = std::pin::pin!(store.get(&id));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(matches!(
        get.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Err(Error::NoRuntime))
    ));
    assert!(store.ids().is_empty());
}
