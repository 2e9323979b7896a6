//! Command line and environment: everything the agent is told at start.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "weft-agent", version, about = "weft's node agent: kernel datapath, config, telemetry")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load every kernel program through the verifier and exit (used by `cargo xtask build-ebpf`).
    Verify,
    /// Detach everything and remove this instance's pins.
    Cleanup {
        #[arg(long, env = "WEFT_PIN_ROOT", default_value = "/sys/fs/bpf/weft/default")]
        pin_root: PathBuf,
    },
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Standalone mode: directory of Kubernetes-shaped YAML (Services, EndpointSlices,
    /// Workloads, AuthorizationPolicies), watched for changes.
    #[arg(long, env = "WEFT_CONFIG_DIR", conflicts_with = "kube")]
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch the API server (in-cluster service account, or KUBECONFIG) for
    /// this node's pods, Services, EndpointSlices, Nodes, Gateway API routes and weft's CRDs.
    #[arg(long, env = "WEFT_KUBE")]
    pub kube: bool,
    /// Kubernetes mode: the host's cgroup v2 mount, where pods' cgroups are found.
    #[arg(long, env = "WEFT_CGROUP_ROOT", default_value = weft_kube::DEFAULT_CGROUP_ROOT)]
    pub cgroup_root: PathBuf,
    /// This instance's bpffs pin directory; a restarted agent with the same one adopts its state.
    #[arg(long, env = "WEFT_PIN_ROOT", default_value = "/sys/fs/bpf/weft/default")]
    pub pin_root: PathBuf,
    /// Admin server: /metrics, /ready, /config_dump.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,
    /// Name of this node; workloads whose `node` differs are remote. In Kubernetes mode the
    /// pods watched are those with this spec.nodeName (set it from the downward API).
    #[arg(long, env = "WEFT_NODE_NAME", default_value = "standalone")]
    pub node_name: String,
    /// Where connect4 hands connections that need L7; the agent's proxy listens there.
    /// It must be an address of this node that meshed pods can reach.
    #[arg(long, env = "WEFT_PROXY_ADDR")]
    pub proxy_addr: Option<SocketAddrV4>,
    /// connect4 hands connections to --proxy-addr, but this agent does not serve it (another
    /// process does, e.g. a test listener).
    #[arg(long, env = "WEFT_EXTERNAL_PROXY")]
    pub external_proxy: bool,
    /// How long the proxy waits for a client's first bytes to detect its protocol (when the
    /// Service port has no appProtocol) before passing the connection through as opaque TCP.
    #[arg(long, env = "WEFT_DETECT_TIMEOUT_MS", default_value_t = 100)]
    pub detect_timeout_ms: u64,
    /// Same-node sk_msg redirect between meshed sockets.
    #[arg(long, env = "WEFT_SKMSG", value_enum, default_value_t = SkMsg::Off)]
    pub skmsg: SkMsg,
    /// L4 access log (one JSON line per closed connection): a file path, or `-` for stdout.
    #[arg(long, env = "WEFT_ACCESS_LOG")]
    pub access_log: Option<PathBuf>,
    /// Fraction of proxied requests written to the access log (0.0 to 1.0).
    #[arg(long, env = "WEFT_ACCESS_LOG_SAMPLE", default_value_t = 1.0, value_parser = sample)]
    pub access_log_sample: f64,
    /// Export one span per proxied request to this OTLP/HTTP collector (e.g.
    /// http://otel-collector:4318; `/v1/traces` is added). Unset: spans are not exported.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<weft_proxy::OtlpEndpoint>,
    /// Fraction of new traces the proxy samples (requests that arrive without a trace context;
    /// a caller's sampling decision is always kept). Istio's default is 1%.
    #[arg(long, env = "WEFT_TRACE_SAMPLE", default_value_t = 0.01, value_parser = sample)]
    pub trace_sample: f64,
    /// Threads serving proxied traffic (config, datapath and admin work runs on one more
    /// thread of its own). 1: a single-threaded proxy.
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
    /// Where the tunnel from other nodes' proxies is accepted (mutual TLS, HTTP/2 CONNECT).
    /// Defaults to port 15008 of --proxy-addr's address; other nodes reach it at the
    /// InternalIP of this node's Node object. Needs --proxy-addr.
    #[arg(long, env = "WEFT_TUNNEL_ADDR")]
    pub tunnel_addr: Option<SocketAddrV4>,
    /// Do not run the tunnel: connections to meshed workloads on other nodes go in plaintext
    /// (STRICT ones are then refused by their node).
    #[arg(long, env = "WEFT_NO_TUNNEL")]
    pub no_tunnel: bool,
    /// Tunnel connections this node dials per (source workload, destination node, destination
    /// workload identity); new streams take them in turn. One (the default) carries every
    /// stream on one TLS socket; a few spread them, for shorter latency tails under load at the
    /// cost of a handshake and a TLS connection's memory each (`cargo xtask bench mtls
    /// --tunnel-connections`).
    #[arg(long, env = "WEFT_TUNNEL_CONNECTIONS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub tunnel_connections: u8,
    /// Standalone mode's certificate authority: `root.pem` and `root.key` in this directory,
    /// created on first start. Every node of a mesh needs the same root (copy the directory,
    /// or point the agents at one).
    #[arg(long, env = "WEFT_CA_DIR", default_value = "/var/lib/weft/ca")]
    pub ca_dir: PathBuf,
    /// More trusted roots (PEM), beside the CA's own: during a root rotation, the other root.
    /// With --issuer-addr, the roots of the mesh (weft-controller publishes them in the
    /// ConfigMap weft-system/weft-trust-bundle).
    #[arg(long, env = "WEFT_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// Kubernetes mode: obtain workload certificates from weft-controller's issuer at this
    /// `host:port` (e.g. weft-controller.weft-system.svc:15012) instead of a CA of this node's own.
    /// Needs --trust-bundle, to check the issuer.
    #[arg(long, env = "WEFT_ISSUER_ADDR", requires = "trust_bundle")]
    pub issuer_addr: Option<String>,
    /// The SPIFFE id the issuer must present.
    #[arg(long, env = "WEFT_ISSUER_ID", default_value = "spiffe://cluster.local/ns/weft-system/sa/weft-controller")]
    pub issuer_id: weft_identity::SpiffeId,
    /// The agent's service-account token for the issuer (a projected token with audience
    /// weft.dev/issuance), read for every request.
    #[arg(long, env = "WEFT_ISSUER_TOKEN", default_value = "/var/run/secrets/weft/token")]
    pub issuer_token: PathBuf,
    /// Lifetime of workload certificates (renewed at half of it), e.g. 24h, 10m, 30s. With
    /// --issuer-addr the issuer decides.
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h", value_parser = weft_policy::duration_text::parse)]
    pub cert_ttl: std::time::Duration,
    /// CA certificates (PEM) trusted for JwtPolicy `jwksUri`s over https, instead of the system
    /// bundle ($SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt and the like): for an
    /// issuer whose certificate a private CA signed.
    #[arg(long, env = "WEFT_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Standalone mode: how often the config directory is checked for changes.
    #[arg(long, env = "WEFT_POLL_MS", default_value_t = 500)]
    pub poll_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SkMsg {
    /// Redirect where the kernel supports it.
    On,
    /// Plain TCP between same-node pods.
    Off,
}

fn sample(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a fraction between 0.0 and 1.0")),
    }
}
