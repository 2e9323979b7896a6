//! Remote JWKS: the keys of JwtPolicy rules that name a `jwksUri`, fetched in the background.
//!
//! One fetcher task per distinct URI, shared by every rule naming it; [`Fetchers::sync`] starts
//! and stops them as configs come and go (a URI no rule names any more stops being fetched).
//! Requests never wait on a fetch: they read the last good key set ([`Remote::keys`]).
//!
//! - A fetch is one HTTP/1.1 GET on a fresh connection, bounded by [`FETCH_TIMEOUT`] and
//!   [`MAX_BODY`]; redirects are not followed. It repeats every `refreshInterval` (the shortest
//!   among the rules naming the URI), ±10 % so nodes do not fetch in step.
//! - A failed fetch is retried after [`RETRY_FIRST`], doubling up to [`RETRY_MAX`] (and never
//!   later than the refresh interval). The last good key set keeps serving meanwhile; until the
//!   first success, tokens of the rules using the URI are refused (401) with the last error.
//! - A token naming a `kid` the set lacks, or arriving before the first success, asks for an
//!   early fetch ([`Remote::refetch_soon`]), at most once per [`EARLY_REFETCH_SPACING`]: an
//!   issuer that rotated its keys is picked up without waiting for the interval, and tokens
//!   cannot make the proxy hammer the issuer.
//! - https is verified against `--jwks-ca-file` when given (only those CAs), otherwise against
//!   the system bundle (`$SSL_CERT_FILE`, else the first of [`SYSTEM_BUNDLES`]), TLS 1.3 only.
//!   Plain http is allowed, as Istio allows it, for in-cluster issuers; a warning is logged
//!   when the host is not a loopback address, since anyone on the path could substitute keys.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, PoisonError, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    version::TLS13,
};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::Notify, task::AbortHandle};
use tokio_rustls::TlsConnector;

use crate::jwt::JwkSet;
pub use crate::metrics::JwksFetchLabels;

/// A whole fetch: connect, TLS, request and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS is a few KiB; anything past this is not one.
pub const MAX_BODY: usize = 1024 * 1024;
/// The first retry after a failed fetch; each further failure doubles it.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Requests ask for early fetches (unknown `kid`, no keys yet) at most this often per URI.
pub const EARLY_REFETCH_SPACING: Duration = Duration::from_secs(10);
/// Where distributions keep their CA bundle (Debian/Ubuntu/Alpine, Fedora/RHEL, others).
pub const SYSTEM_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

#[derive(Clone, Debug, Default)]
pub struct Config {
    /// PEM CA certificates trusted for https `jwksUri`s, instead of the system bundle.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("JWKS CA file {path}: {reason}; give a PEM file of CA certificates (--jwks-ca-file)")]
    CaFile { path: PathBuf, reason: String },
}

/// Why one fetch failed. `Display` says what to check; [`FetchError::label`] is the metric label.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("\"{0}\" is not an http(s) URL with a host")]
    BadUri(String),
    #[error("cannot connect to {authority}: {source}; is it reachable from this node (DNS, routes, egress policy)?")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    NoTrust(String),
    #[error(
        "TLS with {host} failed: {source}; is its certificate issued by a CA in {trust} (--jwks-ca-file), \
         for that name, and does it speak TLS 1.3?"
    )]
    Tls {
        host: String,
        trust: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("answered {status}{hint}")]
    Status { status: StatusCode, hint: &'static str },
    #[error("the answer is larger than {MAX_BODY} bytes, which no JWKS is")]
    TooLarge,
    #[error("reading the answer failed: {0}")]
    Body(String),
    #[error("the answer is not a JSON Web Key Set: {0}")]
    NotJwks(String),
}

impl FetchError {
    fn label(&self) -> &'static str {
        match self {
            FetchError::BadUri(_) => "bad_uri",
            FetchError::Connect { .. } => "connect",
            FetchError::NoTrust(_) => "no_trust",
            FetchError::Tls { .. } => "tls",
            FetchError::Http(_) | FetchError::Body(_) => "http",
            FetchError::Timeout(_) => "timeout",
            FetchError::Status { .. } => "status",
            FetchError::TooLarge => "too_large",
            FetchError::NotJwks(_) => "not_jwks",
        }
    }
}

// === impl Fetchers ===

/// Every remote JWKS the proxy fetches, by URI.
pub struct Fetchers {
    trust: Arc<Trust>,
    fetches: Family<JwksFetchLabels, Counter>,
    remotes: Mutex<BTreeMap<String, Entry>>,
}

struct Entry {
    remote: Arc<Remote>,
    task: AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fetchers {
    /// Reads `config.ca_file` now (a bad file stops the start); the system bundle is read at the
    /// first https fetch. Fetch results are counted in `fetches`.
    pub fn new(config: &Config, fetches: Family<JwksFetchLabels, Counter>) -> Result<Fetchers, Error> {
        let trust = Trust { ca_file: config.ca_file.clone(), loaded: OnceLock::new() };
        if let Some(path) = &config.ca_file {
            let loaded = tls_config(path).map_err(|reason| Error::CaFile { path: path.clone(), reason })?;
            let _ = trust.loaded.set(Ok(loaded));
        }
        Ok(Fetchers { trust: Arc::new(trust), fetches, remotes: Mutex::default() })
    }

    /// Fetches exactly the URIs of `wanted` (each with its refresh interval) from now on: starts
    /// fetchers for new ones on the current runtime, stops those not wanted any more, and keeps
    /// the rest with their keys. Their handles, by URI.
    pub fn sync(&self, wanted: &BTreeMap<String, Duration>) -> HashMap<String, Arc<Remote>> {
        let mut remotes = self.remotes.lock().unwrap_or_else(PoisonError::into_inner);
        remotes.retain(|uri, _| wanted.contains_key(uri));
        wanted
            .iter()
            .map(|(uri, refresh)| {
                let entry = remotes.entry(uri.clone()).or_insert_with(|| {
                    let remote = Arc::new(Remote::new(uri.clone(), *refresh));
                    let task = tokio::spawn(fetch_loop(remote.clone(), self.trust.clone(), self.fetches.clone()));
                    Entry { remote, task: task.abort_handle() }
                });
                *entry.remote.refresh.lock().unwrap_or_else(PoisonError::into_inner) = *refresh;
                (uri.clone(), entry.remote.clone())
            })
            .collect()
    }

    /// What `/config_dump` shows: per URI, the key ids served, when they were fetched, and the
    /// last error.
    pub fn dump(&self) -> Value {
        let remotes = self.remotes.lock().unwrap_or_else(PoisonError::into_inner);
        let list: Vec<Value> = remotes.values().map(|e| e.remote.dump()).collect();
        let trust = match &self.trust.ca_file {
            Some(path) => path.display().to_string(),
            None => "system bundle".to_owned(),
        };
        json!({ "trust": trust, "uris": list })
    }
}

// === impl Remote ===

/// One URI's keys, shared by the rules naming it and updated by its fetcher.
pub struct Remote {
    uri: String,
    refresh: Mutex<Duration>,
    state: RwLock<State>,
    wake: Notify,
    /// When a request last asked for an early fetch.
    nudged: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<JwkSet>>,
    /// When `keys` were fetched.
    fetched_at: Option<SystemTime>,
    /// The last fetch's error, if it failed.
    error: Option<String>,
}

impl Remote {
    fn new(uri: String, refresh: Duration) -> Remote {
        Remote {
            uri,
            refresh: Mutex::new(refresh),
            state: RwLock::default(),
            wake: Notify::new(),
            nudged: Mutex::new(None),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The last good key set, or why there is none yet.
    pub fn keys(&self) -> Result<Arc<JwkSet>, String> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        match (&state.keys, &state.error) {
            (Some(keys), _) => Ok(keys.clone()),
            (None, Some(error)) => Err(format!("JWKS from {} not fetched yet: {error}", self.uri)),
            (None, None) => Err(format!("JWKS from {} not fetched yet: the first fetch is under way", self.uri)),
        }
    }

    /// Asks the fetcher for a fetch now, unless one was asked for in the last
    /// [`EARLY_REFETCH_SPACING`].
    pub fn refetch_soon(&self) {
        let mut nudged = self.nudged.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if nudged.is_none_or(|at| now.duration_since(at) >= EARLY_REFETCH_SPACING) {
            *nudged = Some(now);
            self.wake.notify_one();
        }
    }

    fn dump(&self) -> Value {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let refresh = *self.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let kids: Option<Vec<Option<&str>>> = state.keys.as_ref().map(|k| k.kids().collect());
        let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        json!({
            "uri": self.uri,
            "refresh_interval_s": refresh.as_secs_f64(),
            "kids": kids,
            "fetched_at_ms": state.fetched_at.map(millis),
            "last_error": state.error,
        })
    }
}

// === fetching ===

async fn fetch_loop(remote: Arc<Remote>, trust: Arc<Trust>, fetches: Family<JwksFetchLabels, Counter>) {
    let uri = remote.uri.as_str();
    let count = |result: &'static str| fetches.get_or_create(&JwksFetchLabels { uri: uri.to_owned(), result }).inc();
    let target = match Target::parse(uri) {
        Ok(target) => target,
        Err(e) => {
            count(e.label());
            tracing::warn!(uri, error = %e, "JWKS cannot be fetched; tokens of the rules naming it are refused");
            remote.state.write().unwrap_or_else(PoisonError::into_inner).error = Some(e.to_string());
            return;
        }
    };
    if !target.tls && !target.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        tracing::warn!(uri, "JWKS over plain http: anyone on the path can substitute keys; prefer https");
    }
    let mut failures = 0;
    loop {
        let result = match tokio::time::timeout(FETCH_TIMEOUT, fetch(&target, &trust)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(FETCH_TIMEOUT)),
        };
        let refresh = *remote.refresh.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = match result {
            Ok(keys) => {
                count("ok");
                failures = 0;
                let kids: Vec<Option<&str>> = keys.kids().collect();
                let mut state = remote.state.write().unwrap_or_else(PoisonError::into_inner);
                let changed = state.keys.as_ref().is_none_or(|old| old.kids().ne(keys.kids()));
                if changed {
                    tracing::info!(uri, ?kids, skipped = ?keys.skipped(), "JWKS fetched");
                }
                state.keys = Some(Arc::new(keys));
                state.fetched_at = Some(SystemTime::now());
                state.error = None;
                refresh
            }
            Err(e) => {
                count(e.label());
                failures += 1;
                let mut state = remote.state.write().unwrap_or_else(PoisonError::into_inner);
                if state.keys.is_some() {
                    tracing::warn!(uri, error = %e, "JWKS refresh failed; the last fetched keys keep serving");
                } else {
                    tracing::warn!(uri, error = %e, "JWKS fetch failed; tokens of the rules naming it are refused until one succeeds");
                }
                state.error = Some(e.to_string());
                backoff(failures).min(refresh)
            }
        };
        let wait = wait.mul_f64(0.9 + 0.2 * fastrand::f64());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = remote.wake.notified() => {}
        }
    }
}

/// The wait after `failures` failed fetches in a row (at least one).
fn backoff(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RETRY_MAX)
}

/// A parsed `jwksUri`.
struct Target {
    tls: bool,
    /// Without brackets for IPv6.
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    fn parse(text: &str) -> Result<Target, FetchError> {
        let bad = || FetchError::BadUri(text.to_owned());
        let uri: Uri = text.parse().map_err(|_| bad())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            tls,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }
}

async fn fetch(target: &Target, trust: &Trust) -> Result<JwkSet, FetchError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| FetchError::Connect { authority: target.authority.clone(), source })?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return exchange(TokioIo::new(tcp), target).await;
    }
    let (config, trusted) = trust.get().map_err(FetchError::NoTrust)?;
    let name = ServerName::try_from(target.host.clone()).map_err(|_| FetchError::BadUri(target.authority.clone()))?;
    let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|source| FetchError::Tls {
        host: target.host.clone(),
        trust: trusted,
        source,
    })?;
    exchange(TokioIo::new(tls), target).await
}

/// One GET over a fresh connection; the key set in the answer.
async fn exchange<S>(io: S, target: &Target) -> Result<JwkSet, FetchError>
where
    S: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await.map_err(FetchError::Http)?;
    // The connection is driven beside the request and dropped with it.
    let _conn = AbortOnDrop(tokio::spawn(conn).abort_handle());
    let request = Request::get(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, concat!("weft-proxy/", env!("CARGO_PKG_VERSION")))
        .body(Empty::new())
        .map_err(|_| FetchError::BadUri(target.authority.clone()))?;
    let response = send.send_request(request).await.map_err(FetchError::Http)?;
    let status = response.status();
    if !status.is_success() {
        let hint = if status.is_redirection() { "; redirects are not followed, give the final URL" } else { "" };
        return Err(FetchError::Status { status, hint });
    }
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| if e.is::<LengthLimitError>() { FetchError::TooLarge } else { FetchError::Body(e.to_string()) })?;
    let body = body.to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| FetchError::NotJwks("not UTF-8 text".into()))?;
    JwkSet::parse(text).map_err(FetchError::NotJwks)
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === trust ===

/// The CAs https fetches verify servers with.
struct Trust {
    ca_file: Option<PathBuf>,
    /// The client config and where its CAs came from; set at start for `ca_file`, at the first
    /// https fetch for the system bundle.
    loaded: OnceLock<Result<(Arc<ClientConfig>, String), String>>,
}

impl Trust {
    fn get(&self) -> Result<(Arc<ClientConfig>, String), String> {
        self.loaded.get_or_init(system_bundle).clone()
    }
}

fn system_bundle() -> Result<(Arc<ClientConfig>, String), String> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let path = match from_env {
        Some(path) => path,
        None => SYSTEM_BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()).ok_or_else(|| {
            format!(
                "no system CA bundle (looked at $SSL_CERT_FILE, {}); give the issuer's CA with --jwks-ca-file",
                SYSTEM_BUNDLES.join(", ")
            )
        })?,
    };
    tls_config(&path).map_err(|e| format!("system CA bundle {}: {e}", path.display()))
}

/// A TLS 1.3 client config trusting the CA certificates of the PEM file at `path`.
fn tls_config(path: &Path) -> Result<(Arc<ClientConfig>, String), String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it ({e})"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates ({e})"))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no usable CA certificate in it".into());
    }
    let mut config = ClientConfig::builder_with_provider(weft_identity::provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn targets() {
        let t = Target::parse("https://issuer.example/.well-known/jwks.json?x=1").expect("parses");
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("issuer.example", 443, "/.well-known/jwks.json?x=1"));
        let t = Target::parse("http://[::1]:8080").expect("parses");
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str(), t.authority.as_str()),
            (false, "::1", 8080, "/", "[::1]:8080")
        );
        for bad in ["ftp://x/jwks", "/jwks.json", "https://"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
