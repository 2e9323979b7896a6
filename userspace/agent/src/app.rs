//! Wiring: datapath, state task, syncer, event reader, admin server.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use tokio::sync::watch;
use weft_datapath::{Datapath, SkMsgMode};
use weft_policy::NodeSettings;

use crate::{
    config::{Cli, Command, RunArgs, SkMsg},
    state::{self, Published},
    telemetry::Metrics,
};

/// Everything the admin server and telemetry read.
pub struct Shared {
    pub datapath: Arc<Mutex<Datapath>>,
    /// Set once the first config is applied to the datapath: in Kubernetes mode the first
    /// config comes only after every kind has been listed, so both have happened.
    pub ready: AtomicBool,
    /// Kubernetes mode: the resources not listed yet.
    pub waiting_for: Option<watch::Receiver<Vec<&'static str>>>,
    pub state: watch::Receiver<Arc<Published>>,
    pub metrics: Metrics,
    /// The proxy's remote JWKS (jwksUri) fetchers, for `/config_dump`.
    pub jwks: Arc<weft_proxy::jwks::Fetchers>,
    /// The tunnel's workload certificates, for `/config_dump`; unset without a tunnel.
    pub identities: std::sync::OnceLock<Arc<weft_proxy::tunnel::Identities>>,
    pub args: RunArgs,
}

pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Verify) => verify(),
        Some(Command::Cleanup { pin_root }) => {
            Datapath::remove_pins(&pin_root)?;
            println!("removed {}", pin_root.display());
            Ok(())
        }
        None => {
            raise_fd_limit();
            // Two runtimes: the proxy's threads serve traffic and nothing else; config
            // watching, the datapath syncer, kernel events and the admin server run on a
            // thread of their own, so their periodic work never stalls a request.
            let mut builder = match cli.run.worker_threads {
                // One thread: the current-thread scheduler, without the work-stealing machinery.
                0 | 1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    b.worker_threads(n);
                    b
                }
            };
            let data = builder.thread_name("weft-proxy").enable_all().build().context("starting the proxy runtime")?;
            let control = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the control runtime")?;
            let (done, finished) = tokio::sync::oneshot::channel();
            let proxy_runtime = data.handle().clone();
            let thread = std::thread::Builder::new()
                .name("weft-control".into())
                .spawn(move || {
                    let _ = done.send(control.block_on(run(cli.run, proxy_runtime)));
                })
                .context("starting the control thread")?;
            // The proxy's runtime runs on this thread until the control plane stops.
            let result = data.block_on(finished).unwrap_or_else(|_| Err(anyhow::anyhow!("the control thread panicked")));
            let _ = thread.join();
            result
        }
    }
}

/// A node proxy holds two descriptors per proxied connection: lift the soft limit to the hard.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
            }
        }
        _ => {}
    }
}

/// Loads every program into a scratch pin directory and reports the verifier's verdict.
fn verify() -> anyhow::Result<()> {
    let pin_root = std::env::temp_dir().join(format!("weft-verify-{}", std::process::id()));
    let scratch = std::path::Path::new("/sys/fs/bpf").join(pin_root.file_name().unwrap_or_default());
    let result = Datapath::load(weft_datapath::Config { pin_root: scratch.clone(), skmsg: SkMsgMode::Auto })
        .map(|dp| dp.skmsg_active());
    Datapath::remove_pins(&scratch)?;
    let skmsg = result.context("verifier rejected weft's programs")?;
    println!("verifier accepted connect4, getpeername4, sock_ops, ingress{}", if skmsg { ", sk_msg" } else { "" });
    Ok(())
}

/// The control plane; the proxy, if any, is started on `proxy_runtime`.
pub async fn run(args: RunArgs, proxy_runtime: tokio::runtime::Handle) -> anyhow::Result<()> {
    if args.config_dir.is_none() && !args.kube {
        anyhow::bail!("give a config source: --config-dir DIR (standalone) or --kube");
    }
    let datapath = Datapath::load(weft_datapath::Config {
        pin_root: args.pin_root.clone(),
        skmsg: match args.skmsg {
            SkMsg::On => SkMsgMode::Auto,
            SkMsg::Off => SkMsgMode::Off,
        },
    })?;
    let node = NodeSettings {
        node_name: args.node_name.clone(),
        proxy: args.proxy_addr,
        skmsg: args.skmsg == SkMsg::On,
    };

    let source = match (&args.config_dir, args.kube) {
        (Some(dir), false) => state::Source::Dir { dir: dir.clone(), poll_ms: args.poll_ms },
        (None, true) => {
            let client = weft_kube::Client::try_default().await.context(
                "connecting to the Kubernetes API server (in a pod: its service account; elsewhere: KUBECONFIG)",
            )?;
            let config =
                weft_kube::Config { cgroup_root: args.cgroup_root.clone(), ..weft_kube::Config::new(node.clone()) };
            let cgroup_root = args.cgroup_root.display();
            tracing::info!(node = %node.node_name, %cgroup_root, "watching the Kubernetes API server");
            state::Source::Kube(weft_kube::Source::start(client, config))
        }
        _ => anyhow::bail!("give one config source: --config-dir DIR (standalone) or --kube"),
    };
    let waiting_for = match &source {
        state::Source::Kube(kube) => Some(kube.readiness()),
        state::Source::Dir { .. } => None,
    };

    let (publish, state_rx) = watch::channel(Arc::new(Published::default()));
    let mut datapath = datapath;
    let events = datapath.take_events();
    let datapath = Arc::new(Mutex::new(datapath));
    let metrics = Metrics::new(datapath.clone(), state_rx.clone());
    let jwks_config = weft_proxy::jwks::Config { ca_file: args.jwks_ca_file.clone() };
    let jwks = Arc::new(weft_proxy::jwks::Fetchers::new(&jwks_config, metrics.proxy.jwks_fetches.clone())?);
    let shared = Arc::new(Shared {
        datapath,
        ready: AtomicBool::new(false),
        waiting_for,
        state: state_rx,
        metrics,
        jwks,
        identities: std::sync::OnceLock::new(),
        args: args.clone(),
    });

    let access_log = Arc::new(crate::access_log::AccessLog::open(args.access_log.as_deref()));
    if let Some(listen) = args.proxy_addr.filter(|_| !args.external_proxy) {
        start_proxy(listen, &args, &shared, access_log.clone(), &proxy_runtime).await?;
    }
    let admin = crate::admin::serve(shared.clone(), args.admin_addr).await?;
    tracing::info!(addr = %admin, "admin server listening");
    if let Some(ring) = events {
        tokio::spawn(crate::events::run(ring, access_log, shared.clone()));
    }
    // On this thread, away from the proxy's: a trim holds each arena's lock while it works.
    let started = shared.clone();
    tokio::spawn(crate::memory::run(shared.metrics.memory.clone(), move || started.ready.load(Ordering::Acquire)));
    let syncer = tokio::spawn(state::sync_datapath(shared.clone()));
    let watcher = tokio::spawn(state::run(source, node, publish, shared.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("waiting for ctrl-c")?; }
        _ = term.recv() => {}
        r = syncer => { r.context("datapath syncer stopped")?; }
        r = watcher => { r.context("config watcher stopped")?; }
    }
    // Pins stay: programs keep serving existing and new connections while we are away.
    shared.ready.store(false, Ordering::SeqCst);
    tracing::info!("stopping; kernel state stays pinned");
    Ok(())
}

/// The kernel's original-destination records, read from the pinned map.
struct PinnedIdentity(weft_datapath::OrigDstReader);

impl weft_proxy::Identify for PinnedIdentity {
    fn identify(&self, client: std::net::SocketAddrV4, local: std::net::SocketAddrV4) -> Option<weft_proxy::Identity> {
        self.0.lookup(client, local).map(|r| weft_proxy::Identity {
            dst: r.dst,
            src_workload: r.src_workload,
            svc_id: r.svc_id,
        })
    }
}

async fn start_proxy(
    listen: std::net::SocketAddrV4,
    args: &RunArgs,
    shared: &Arc<Shared>,
    access_log: Arc<crate::access_log::AccessLog>,
    proxy_runtime: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let identity = PinnedIdentity(weft_datapath::OrigDstReader::open(&args.pin_root)?);
    let config = weft_proxy::Config {
        listen,
        detect_timeout: std::time::Duration::from_millis(args.detect_timeout_ms),
        access_log_sample: args.access_log_sample,
        otlp: args.otlp_endpoint.clone(),
        trace_sample: args.trace_sample,
        node_name: args.node_name.clone(),
    };
    // Bound on the proxy's runtime, whose reactor then drives its sockets.
    let proxy = proxy_runtime.spawn(weft_proxy::Proxy::bind(config)).await.context("binding the proxy")??;
    // The proxy sees each compiled config once; it builds its route table from it.
    let (feed, routes) = watch::channel(shared.state.borrow().compiled.clone());
    let mut state = shared.state.clone();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let compiled = state.borrow_and_update().compiled.clone();
            feed.send_if_modified(|current| {
                let changed = match (&*current, &compiled) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (None, None) => false,
                    _ => true,
                };
                if changed {
                    *current = compiled;
                }
                changed
            });
        }
    });
    tracing::info!(addr = %listen, "proxy listening");
    let log: Option<Arc<dyn weft_proxy::AccessLog>> = access_log.enabled().then_some(access_log as _);
    let tunnel = match args.no_tunnel {
        true => None,
        false => Some(start_tunnel(listen, args, shared, proxy_runtime).await?),
    };
    let jwks = shared.jwks.clone();
    proxy_runtime.spawn(proxy.run(routes, Arc::new(identity), shared.metrics.proxy.clone(), log, tunnel, jwks));
    Ok(())
}

/// The tunnel's listener and identities. Workload certificates come from weft-controller's
/// issuer with --issuer-addr, whose roots --trust-bundle holds; otherwise the standalone CA
/// (created on first start) issues them and its root, plus any --trust-bundle roots, is trusted.
async fn start_tunnel(
    proxy: std::net::SocketAddrV4,
    args: &RunArgs,
    shared: &Arc<Shared>,
    proxy_runtime: &tokio::runtime::Handle,
) -> anyhow::Result<weft_proxy::TunnelSetup> {
    use weft_identity::{Ca, CertStore, Issuer, LocalIssuer, TrustBundle};
    let td = weft_policy::authz::TRUST_DOMAIN;
    let read_bundle = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading --trust-bundle {}", path.display()))
    };
    let (issuer, bundle, source): (Arc<dyn Issuer>, TrustBundle, String) = match (&args.issuer_addr, &args.trust_bundle) {
        (Some(addr), Some(path)) => {
            let bundle = TrustBundle::from_pem(td, &read_bundle(path)?).with_context(|| format!("--trust-bundle {}", path.display()))?;
            let issuer = weft_kube::issuance::RemoteIssuer::new(addr.clone(), args.issuer_id.clone(), &bundle, args.issuer_token.clone())
                .context("the issuer's TLS config")?;
            (Arc::new(issuer), bundle, format!("issuer {addr}"))
        }
        (Some(_), None) => anyhow::bail!("--issuer-addr needs --trust-bundle, the roots that check the issuer"),
        (None, _) => {
            let ca = Arc::new(Ca::load_or_create(&args.ca_dir, td).with_context(|| {
                format!("the tunnel's CA in {} (--ca-dir; --no-tunnel runs without one)", args.ca_dir.display())
            })?);
            let mut bundle = TrustBundle::from_ca(&ca);
            if let Some(path) = &args.trust_bundle {
                bundle.add_pem(&read_bundle(path)?).with_context(|| format!("--trust-bundle {}", path.display()))?;
            }
            (Arc::new(LocalIssuer { ca, ttl: args.cert_ttl }), bundle, format!("CA {}", args.ca_dir.display()))
        }
    };
    let identities = Arc::new(weft_proxy::tunnel::Identities { certs: CertStore::new(issuer), bundle });
    let _ = shared.identities.set(identities.clone());
    let addr = args.tunnel_addr.unwrap_or_else(|| std::net::SocketAddrV4::new(*proxy.ip(), weft_proxy::tunnel::TUNNEL_PORT));
    // Bound on the proxy's runtime, like the proxy's own listener.
    let listener = proxy_runtime
        .spawn(tokio::net::TcpListener::bind(addr))
        .await
        .context("binding the tunnel listener")?
        .with_context(|| format!("the tunnel cannot listen on {addr}; is the port free? (--tunnel-addr)"))?;
    tracing::info!(%addr, certificates = %source, ttl = ?args.cert_ttl, "tunnel listening");
    let connections = usize::from(args.tunnel_connections);
    Ok(weft_proxy::TunnelSetup { listener, identities, metrics: shared.metrics.tunnel.clone(), connections })
}
