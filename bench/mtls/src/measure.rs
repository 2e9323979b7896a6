//! The dialling node: one round of every measurement, each for plaintext TCP, the tunnel and
//! bare rustls, printed as one JSON line (progress on stderr). Within a measurement the
//! variants take turns in slices, so a busy spell of a shared machine falls on all of them
//! alike. Every loop is bounded by a count and a time, and every read by [`IO_TIMEOUT`]; a
//! failure fails the round with what broke.

use std::{
    cell::Cell,
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use weft_identity::{Ca, Expected, SpiffeId, client_config};
use weft_proxy::tunnel::{self, Identities, TunnelMetrics, Tunnels};
use weft_testbed::steal::{self, Steal};

use crate::{READY_FILE, TRUST_DOMAIN, identities, source_id, target_id};

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Acknowledged units of a stream; small against its length, large against the windows.
const BATCH: u64 = 16 << 20;
/// Sent and acknowledged before the clock starts: TCP and HTTP/2 windows open up.
const STREAM_WARMUP: u64 = 8 << 20;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The `serve --dir` (its CA and ready.json).
    #[arg(long)]
    dir: PathBuf,
    /// Shorter runs: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Variants in reverse order (alternate rounds, so drift within a round favours none).
    #[arg(long)]
    reverse: bool,
    /// Fixed request rate over all connections (open loop).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Long-lived connections sharing the rate (tunnel: CONNECT streams on the pooled connections).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Tunnel connections per identity pair the streams take in turn, as the agent's
    /// `--tunnel-connections` (its default, one, is what the targets are judged on).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    tunnel_connections: u16,
    /// Request and response size in bytes (the target echoes).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Bytes streamed one way on one connection, at most (MiB).
    #[arg(long, default_value_t = 512)]
    stream_mib: u64,
    /// Size of each write while streaming (KiB); the default is the most the proxy's splice
    /// (`h2stream::splice`) sends into a tunnel stream at once: one socket read, which a bulk
    /// transfer fills.
    #[arg(long, default_value_t = 64)]
    write_kib: usize,
    /// Concurrent dialers in the second handshake run (the first is sequential).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Only these measurements, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measurement>,
    /// These variants in this order, comma-separated (default: plain,tunnel,tls).
    #[arg(long, value_enum, value_delimiter = ',')]
    variants: Vec<Variant>,
    /// Keeps the requests of every latency slice that counts in this directory, one file per
    /// slice and variant (`<slice>-<variant>.txt`: a request's scheduled start from the
    /// slice's, and its latency, in µs), to see when a tail happened.
    #[arg(long)]
    timeline: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Measurement {
    Latency,
    Throughput,
    Handshakes,
}

/// Durations and bounds of one round, each shared by `slices` interleaved slices per variant.
struct Params {
    slices: u32,
    latency: Duration,
    warmup: Duration,
    stream_bytes: u64,
    stream_time: Duration,
    write_bytes: usize,
    handshake_time: Duration,
    handshake_max: u64,
}

impl Params {
    fn new(args: &RunArgs) -> Params {
        let stream_bytes = args.stream_mib << 20;
        let write_bytes = args.write_kib.max(1) << 10;
        if args.quick {
            Params {
                slices: 2,
                latency: Duration::from_secs(2),
                warmup: Duration::from_millis(300),
                stream_bytes: stream_bytes.min(128 << 20),
                stream_time: Duration::from_secs(3),
                write_bytes,
                handshake_time: Duration::from_secs(1),
                handshake_max: 5_000,
            }
        } else {
            Params {
                slices: 5,
                latency: Duration::from_secs(5),
                warmup: Duration::from_millis(500),
                stream_bytes,
                stream_time: Duration::from_secs(10),
                write_bytes,
                handshake_time: Duration::from_secs(2),
                handshake_max: 20_000,
            }
        }
    }

    /// `variants` in the order slice `i` runs them: rotated, so each variant takes each place.
    fn order<T: Copy>(&self, variants: &[T], i: u32) -> Vec<T> {
        let mut order = variants.to_vec();
        let n = order.len().max(1);
        order.rotate_left(i as usize % n);
        order
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    Plain,
    Tunnel,
    Tls,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Tunnel => "tunnel",
            Variant::Tls => "tls",
        }
    }
}

#[derive(Clone, Copy)]
enum Target {
    Echo,
    Sink,
}

/// Where `serve` listens, from its ready.json.
struct Addrs {
    server_pid: u32,
    tunnel: SocketAddr,
    echo: SocketAddrV4,
    sink: SocketAddrV4,
    tls_echo: SocketAddr,
    tls_sink: SocketAddr,
}

impl Addrs {
    fn read(dir: &Path) -> anyhow::Result<Addrs> {
        let path = dir.join(READY_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}; is `serve --dir {}` running?", path.display(), dir.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: {text}", path.display()))?;
        let addr = |k: &str| -> anyhow::Result<SocketAddr> {
            v[k].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("{}: no address {k:?} in {text}", path.display()))
        };
        let v4 = |k: &str| -> anyhow::Result<SocketAddrV4> {
            match addr(k)? {
                SocketAddr::V4(a) => Ok(a),
                other => bail!("{}: {k} is {other}, expected IPv4", path.display()),
            }
        };
        Ok(Addrs {
            server_pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).with_context(|| format!("{}: no pid", path.display()))?,
            tunnel: addr("tunnel")?,
            echo: v4("echo")?,
            sink: v4("sink")?,
            tls_echo: addr("tls_echo")?,
            tls_sink: addr("tls_sink")?,
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

/// Opens connections of every variant to either target.
struct Dialer {
    addrs: Addrs,
    identities: Arc<Identities>,
    metrics: Arc<TunnelMetrics>,
    src: SpiffeId,
    dst: SpiffeId,
    /// The bare client: built once, as an ordinary rustls client would.
    tls: TlsConnector,
    tunnel_connections: u16,
    sni: ServerName<'static>,
}

impl Dialer {
    /// An empty tunnel pool: its first `open` makes a new TLS connection.
    fn tunnels(&self) -> Tunnels {
        Tunnels::with_connections(self.identities.clone(), self.metrics.clone(), usize::from(self.tunnel_connections))
    }

    /// A new connection to `target`; tunnel streams come from `tunnels` (pooled per identity pair).
    async fn open(&self, v: Variant, target: Target, tunnels: &Tunnels) -> anyhow::Result<Conn> {
        let (plain, tls) = match target {
            Target::Echo => (self.addrs.echo, self.addrs.tls_echo),
            Target::Sink => (self.addrs.sink, self.addrs.tls_sink),
        };
        let conn = async {
            Ok::<Conn, anyhow::Error>(match v {
                Variant::Plain => Box::new(tcp(SocketAddr::V4(plain)).await?),
                Variant::Tls => Box::new(self.tls.connect(self.sni.clone(), tcp(tls).await?).await.with_context(|| format!("TLS with {tls}"))?),
                Variant::Tunnel => Box::new(tunnels.open(&self.src, self.addrs.tunnel, &self.dst, plain).await?),
            })
        };
        tokio::time::timeout(IO_TIMEOUT, conn).await.with_context(|| format!("opening a {} connection timed out", v.name()))?
    }
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let p = Params::new(args);
    let mut variants = Vec::new();
    for v in if args.variants.is_empty() { vec![Variant::Plain, Variant::Tunnel, Variant::Tls] } else { args.variants.clone() } {
        if !variants.contains(&v) {
            variants.push(v);
        }
    }
    if args.reverse {
        variants.reverse();
    }
    let wanted = |m: Measurement| args.only.is_empty() || args.only.contains(&m);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let out = rt.block_on(async {
        let ca = Arc::new(Ca::load_or_create(&args.dir, TRUST_DOMAIN).with_context(|| format!("the bench CA in {}", args.dir.display()))?);
        let identities = identities(&ca);
        let (src, dst) = (source_id(), target_id());
        let slot = identities.certs.get(&src).await.context("issuing the source's certificate")?;
        let config = client_config(slot, &identities.bundle, Expected::Ids(vec![dst.clone()])).context("the bare TLS client config")?;
        let d = Arc::new(Dialer {
            addrs: Addrs::read(&args.dir)?,
            identities,
            metrics: Arc::new(TunnelMetrics::default()),
            tls: TlsConnector::from(config),
            tunnel_connections: args.tunnel_connections,
            sni: tunnel::server_name(&dst)?,
            src,
            dst,
        });
        let latency_out = if wanted(Measurement::Latency) { latency(&d, &variants, args, &p).await.context("latency")? } else { Map::new() };
        let stream_out = if wanted(Measurement::Throughput) { throughput(&d, &variants, &p).await.context("throughput")? } else { Map::new() };
        let mut handshake_out = Map::new();
        if wanted(Measurement::Handshakes) {
            for concurrency in [1, args.concurrency.max(1)] {
                let by_variant = handshakes(&d, &variants, concurrency, &p).await.with_context(|| format!("handshakes x{concurrency}"))?;
                handshake_out.insert(concurrency.to_string(), by_variant.into());
            }
        }
        Ok::<Value, anyhow::Error>(json!({
            "params": {
                "rate": args.rate, "connections": args.connections, "tunnel_connections": args.tunnel_connections, "size": args.size, "slices": p.slices,
                "latency_s": p.latency.as_secs_f64(), "warmup_s": p.warmup.as_secs_f64(),
                "stream_mib": p.stream_bytes >> 20, "stream_max_s": p.stream_time.as_secs_f64(), "write_kib": p.write_bytes >> 10,
                "handshake_s": p.handshake_time.as_secs_f64(), "handshake_max": p.handshake_max,
            },
            "latency": latency_out,
            "throughput": stream_out,
            "handshakes": handshake_out,
        }))
    })?;
    println!("{out}");
    Ok(())
}

/// What a variant accumulates over its slices.
#[derive(Default)]
struct Tally {
    slices: u32,
    count: u64,
    secs: f64,
    /// None if any slice's is unknown.
    client_cpu_s: Option<f64>,
    server_cpu_s: Option<f64>,
}

impl Tally {
    fn add(&mut self, count: u64, secs: f64, (client, server): (Option<f64>, Option<f64>)) {
        let first = self.slices == 0;
        let sum = |total: Option<f64>, more: Option<f64>| if first { more } else { Some(total? + more?) };
        self.client_cpu_s = sum(self.client_cpu_s, client);
        self.server_cpu_s = sum(self.server_cpu_s, server);
        self.slices += 1;
        self.count += count;
        self.secs += secs;
    }
}

// === latency at a fixed rate ===

/// Every variant's connections are opened and warmed up first, then the schedule runs in
/// interleaved slices, so a busy spell of the machine falls on all variants alike. A slice
/// during which the hypervisor took more than `steal::QUIET` of the machine's CPU time is run
/// again after a pause (as `bench l7` does); the least disturbed attempt counts.
async fn latency(d: &Dialer, variants: &[Variant], args: &RunArgs, p: &Params) -> anyhow::Result<Map<String, Value>> {
    let rate = f64::from(args.rate.max(1));
    if let Some(dir) = &args.timeline {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let slice = p.latency / p.slices;
    let mut open = Vec::new();
    for &v in variants {
        let tunnels = d.tunnels();
        let mut conns = Vec::with_capacity(args.connections);
        for _ in 0..args.connections.max(1) {
            conns.push(d.open(v, Target::Echo, &tunnels).await.with_context(|| v.name())?);
        }
        let (conns, _) = fixed_rate(conns, rate, args.size, p.warmup).await.with_context(|| v.name())?;
        open.push((v, tunnels, conns, Vec::new(), Tally::default(), Quiet::default()));
    }
    for i in 0..p.slices {
        for at in p.order(&(0..open.len()).collect::<Vec<_>>(), i) {
            let (v, _, conns, lat, tally, quiet) = &mut open[at];
            let kept = quiet_slice(d, *v, conns, rate, args.size, slice, &mut quiet.retries).await?;
            tally.add(kept.requests.len() as u64, kept.secs, kept.cpu);
            quiet.stolen_s += kept.stolen * kept.secs;
            if let Some(dir) = &args.timeline {
                let path = dir.join(format!("{i}-{}.txt", v.name()));
                let mut requests: Vec<_> = kept.requests.iter().map(|r| (r.due_us, r.ns / 1000)).collect();
                requests.sort_unstable();
                let text: String = requests.iter().map(|(due, us)| format!("{due} {us}\n")).collect();
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            }
            lat.extend(kept.requests.iter().map(|r| r.ns));
        }
    }
    // What the hypervisor took during the slices that count: on a shared host, the main cause
    // of p99 spikes.
    let (stolen_s, secs, retries) = open.iter().fold((0.0, 0.0, 0), |(s, t, r), (.., tally, q)| (s + q.stolen_s, t + tally.secs, r + q.retries));
    let mut out = Map::from_iter([
        ("steal_share".to_owned(), json!(if secs > 0.0 { stolen_s / secs } else { 0.0 })),
        ("retries".to_owned(), json!(retries)),
    ]);
    for (v, _, _, mut lat, tally, quiet) in open {
        lat.sort_unstable();
        let pct = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).map_or(f64::NAN, |ns| *ns as f64 / 1000.0);
        let sample = json!({
            "requests": tally.count,
            "rps": tally.count as f64 / tally.secs,
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": lat.last().map_or(f64::NAN, |ns| *ns as f64 / 1000.0),
            "client_cpu_s": tally.client_cpu_s,
            "server_cpu_s": tally.server_cpu_s,
            "steal_share": if tally.secs > 0.0 { quiet.stolen_s / tally.secs } else { 0.0 },
            "retries": quiet.retries,
        });
        eprintln!("  latency {}: {sample}", v.name());
        out.insert(v.name().into(), sample);
    }
    Ok(out)
}

/// One slice of `v`'s schedule, run again after a pause while the hypervisor spoils it; the
/// least disturbed attempt.
async fn quiet_slice(d: &Dialer, v: Variant, conns: &mut Vec<Conn>, rate: f64, size: usize, slice: Duration, retries: &mut u32) -> anyhow::Result<Attempt> {
    let mut best = attempt(d, v, conns, rate, size, slice).await?;
    for pause in steal::PAUSES {
        if best.stolen <= steal::QUIET {
            break;
        }
        eprintln!("  latency {}: the hypervisor took {:.1}% of CPU time; measuring again in {pause:?}", v.name(), best.stolen * 100.0);
        *retries += 1;
        tokio::time::sleep(pause).await;
        let again = attempt(d, v, conns, rate, size, slice).await?;
        if again.stolen < best.stolen {
            best = again;
        }
    }
    Ok(best)
}

async fn attempt(d: &Dialer, v: Variant, conns: &mut Vec<Conn>, rate: f64, size: usize, slice: Duration) -> anyhow::Result<Attempt> {
    let (cpu, stolen) = (Cpu::mark(d.addrs.server_pid), Steal::mark());
    let started = Instant::now();
    let (back, requests) = fixed_rate(std::mem::take(conns), rate, size, slice).await.with_context(|| v.name())?;
    *conns = back;
    Ok(Attempt { secs: started.elapsed().as_secs_f64(), stolen: stolen.share(), cpu: cpu.since(), requests })
}

/// One run of a slice.
struct Attempt {
    secs: f64,
    /// The share of the machine's CPU time the hypervisor took meanwhile.
    stolen: f64,
    /// Client and server CPU seconds.
    cpu: (Option<f64>, Option<f64>),
    requests: Vec<Request>,
}

/// One request of a fixed-rate run.
struct Request {
    /// When it was due, from the run's start (µs).
    due_us: u64,
    /// Its latency (ns).
    ns: u64,
}

/// Steal over a variant's latency slices that count, and the slices run again.
#[derive(Default)]
struct Quiet {
    /// Seconds stolen (share x slice time), summed.
    stolen_s: f64,
    retries: u32,
}

/// Runs the schedule for `duration` on `conns`; returns them and their requests.
async fn fixed_rate(conns: Vec<Conn>, rate: f64, size: usize, duration: Duration) -> anyhow::Result<(Vec<Conn>, Vec<Request>)> {
    let start = Instant::now();
    let until = start + duration;
    let n = conns.len();
    let mut set = JoinSet::new();
    for (index, conn) in conns.into_iter().enumerate() {
        set.spawn(paced(conn, index, n, rate, size, start, until));
    }
    let (mut conns, mut all) = (Vec::with_capacity(n), Vec::new());
    while let Some(joined) = set.join_next().await {
        let (conn, lat) = joined.context("a load task panicked")??;
        conns.push(conn);
        all.extend(lat);
    }
    Ok((conns, all))
}

/// One connection's share: request k (k = index, index + n, ...) is due at start + k / rate.
async fn paced(mut conn: Conn, index: usize, n: usize, rate: f64, size: usize, start: Instant, until: Instant) -> anyhow::Result<(Conn, Vec<Request>)> {
    let (request, mut response) = (vec![b'x'; size], vec![0; size]);
    let mut lat = Vec::with_capacity(((until - start).as_secs_f64() * rate / n as f64) as usize + 16);
    let mut k = index as u64;
    let mut prev_done = start;
    loop {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        if due >= until {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        let exchange = async {
            conn.write_all(&request).await?;
            conn.flush().await?;
            conn.read_exact(&mut response).await
        };
        tokio::time::timeout(IO_TIMEOUT, exchange)
            .await
            .context("no echo within 10 s")?
            .context("request/response on a long-lived connection")?;
        let done = Instant::now();
        // Coordinated omission, as weft-probe's http-load: if this connection was still busy
        // with the previous response at `due`, the wait was the path's doing and counts from
        // `due`; if it was idle, lateness is the timer's (tokio's granularity is 1 ms) and
        // counts from the send.
        let from = if prev_done > due { due } else { sent };
        prev_done = done;
        let ns = u64::try_from(done.duration_since(from).as_nanos()).unwrap_or(u64::MAX);
        lat.push(Request { due_us: u64::try_from(due.duration_since(start).as_micros()).unwrap_or(u64::MAX), ns });
        k += n as u64;
    }
    Ok((conn, lat))
}

// === throughput on one stream ===

/// One stream per variant, opened and warmed up first (TCP and HTTP/2 windows open up), then
/// streamed in interleaved slices; MiB/s is the bytes acknowledged over the time spent.
async fn throughput(d: &Dialer, variants: &[Variant], p: &Params) -> anyhow::Result<Map<String, Value>> {
    let chunk = vec![0x5a; p.write_bytes];
    let (slice_bytes, slice_time) = (p.stream_bytes.div_ceil(u64::from(p.slices)), p.stream_time / p.slices);
    let mut open = Vec::new();
    for &v in variants {
        let tunnels = d.tunnels();
        let conn = d.open(v, Target::Sink, &tunnels).await.with_context(|| v.name())?;
        let (mut rd, mut wr) = tokio::io::split(conn);
        send_batch(&mut wr, &chunk, STREAM_WARMUP).await.with_context(|| v.name())?;
        read_ack(&mut rd, STREAM_WARMUP).await.with_context(|| v.name())?;
        open.push((v, tunnels, rd, wr, Tally::default()));
    }
    for i in 0..p.slices {
        for at in p.order(&(0..open.len()).collect::<Vec<_>>(), i) {
            let (v, _, rd, wr, tally) = &mut open[at];
            let cpu = Cpu::mark(d.addrs.server_pid);
            let started = Instant::now();
            let bytes = stream(rd, wr, &chunk, slice_bytes, slice_time).await.with_context(|| v.name())?;
            tally.add(bytes, started.elapsed().as_secs_f64(), cpu.since());
        }
    }
    let mut out = Map::new();
    for (v, _, _, _, tally) in open {
        let sample = json!({
            "bytes": tally.count,
            "secs": tally.secs,
            "mib_s": tally.count as f64 / tally.secs / f64::from(1u32 << 20),
            "client_cpu_s": tally.client_cpu_s,
            "server_cpu_s": tally.server_cpu_s,
        });
        eprintln!("  throughput {}: {sample}", v.name());
        out.insert(v.name().into(), sample);
    }
    Ok(out)
}

/// Streams up to `limit` bytes (or for up to `time`) in acknowledged batches, pipelined;
/// returns the bytes acknowledged once the last acknowledgement is in.
async fn stream(rd: &mut (impl AsyncRead + Unpin), wr: &mut (impl AsyncWrite + Unpin), chunk: &[u8], limit: u64, time: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    let sent = Cell::new(0u64);
    let writer = async {
        while sent.get() < limit && start.elapsed() < time {
            let batch = BATCH.min(limit - sent.get());
            send_batch(wr, chunk, batch).await?;
            sent.set(sent.get() + batch);
        }
        // The end marker: the sink acknowledges it at once, after every batch before it.
        wr.write_all(&0u64.to_be_bytes()).await?;
        wr.flush().await?;
        Ok::<_, anyhow::Error>(())
    };
    let reader = async {
        let mut acked = 0u64;
        loop {
            let mut ack = [0; 8];
            tokio::time::timeout(IO_TIMEOUT, rd.read_exact(&mut ack)).await.context("no acknowledgement within 10 s")??;
            match u64::from_be_bytes(ack) {
                0 => return Ok::<_, anyhow::Error>(acked),
                n => acked += n,
            }
        }
    };
    let bound = time + Duration::from_secs(30);
    let ((), acked) = tokio::time::timeout(bound, async { tokio::try_join!(writer, reader) })
        .await
        .with_context(|| format!("the stream did not finish within {bound:?}"))??;
    if acked != sent.get() {
        bail!("the sink acknowledged {acked} bytes of {} sent", sent.get());
    }
    Ok(acked)
}

async fn send_batch(wr: &mut (impl AsyncWrite + Unpin), chunk: &[u8], len: u64) -> anyhow::Result<()> {
    wr.write_all(&len.to_be_bytes()).await?;
    let mut left = len;
    while left > 0 {
        let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        tokio::time::timeout(IO_TIMEOUT, wr.write_all(&chunk[..n])).await.context("the stream stalled for 10 s")??;
        left -= n as u64;
    }
    // A TLS writer may hold the batch's last record until flushed; its acknowledgement would
    // then never come.
    tokio::time::timeout(IO_TIMEOUT, wr.flush()).await.context("the stream stalled for 10 s")??;
    Ok(())
}

async fn read_ack(rd: &mut (impl AsyncRead + Unpin), want: u64) -> anyhow::Result<()> {
    let mut ack = [0; 8];
    tokio::time::timeout(IO_TIMEOUT, rd.read_exact(&mut ack)).await.context("no acknowledgement within 10 s")??;
    let got = u64::from_be_bytes(ack);
    anyhow::ensure!(got == want, "the sink acknowledged {got} bytes, expected {want}");
    Ok(())
}

// === new connections ===

/// New connections per second, `concurrency` dialers at once, in interleaved slices: each is a
/// new TCP connection (plain), a new TLS connection (bare) or a new tunnel connection from an
/// empty pool with its first CONNECT stream (tunnel), plus a one-byte round trip through it to
/// the echo target.
async fn handshakes(d: &Arc<Dialer>, variants: &[Variant], concurrency: usize, p: &Params) -> anyhow::Result<Map<String, Value>> {
    let (slice_time, slice_max) = (p.handshake_time / p.slices, p.handshake_max.div_ceil(u64::from(p.slices)));
    let mut tallies: Vec<(Variant, Tally)> = variants.iter().map(|v| (*v, Tally::default())).collect();
    for i in 0..p.slices {
        for at in p.order(&(0..tallies.len()).collect::<Vec<_>>(), i) {
            let (v, tally) = &mut tallies[at];
            let cpu = Cpu::mark(d.addrs.server_pid);
            let started = Instant::now();
            let count = dial_for(d, *v, concurrency, slice_time, slice_max).await.with_context(|| v.name())?;
            tally.add(count, started.elapsed().as_secs_f64(), cpu.since());
        }
    }
    let mut out = Map::new();
    for (v, tally) in tallies {
        let sample = json!({
            "count": tally.count,
            "secs": tally.secs,
            "per_sec": tally.count as f64 / tally.secs,
            "client_cpu_s": tally.client_cpu_s,
            "server_cpu_s": tally.server_cpu_s,
        });
        eprintln!("  handshakes x{concurrency} {}: {sample}", v.name());
        out.insert(v.name().into(), sample);
    }
    Ok(out)
}

/// New connections by `concurrency` dialers for up to `time` or `max` connections in all.
async fn dial_for(d: &Arc<Dialer>, v: Variant, concurrency: usize, time: Duration, max: u64) -> anyhow::Result<u64> {
    let until = Instant::now() + time;
    let per_dialer = max.div_ceil(concurrency as u64);
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let d = d.clone();
        set.spawn(async move {
            let mut done = 0u64;
            while done < per_dialer && Instant::now() < until {
                let tunnels = d.tunnels();
                let mut conn = d.open(v, Target::Echo, &tunnels).await?;
                let mut byte = [0x5a];
                let round_trip = async {
                    conn.write_all(&byte).await?;
                    conn.flush().await?;
                    conn.read_exact(&mut byte).await
                };
                tokio::time::timeout(IO_TIMEOUT, round_trip).await.context("no echo within 10 s")??;
                done += 1;
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut total = 0;
    while let Some(joined) = set.join_next().await {
        total += joined.context("a dialer panicked")??;
    }
    Ok(total)
}

// === CPU time ===

/// CPU time of this process and the accepting one, from the scheduler's per-thread nanosecond
/// counters (`/proc/<pid>/task/*/schedstat`), which a 10 ms tick would blur for short runs.
struct Cpu {
    server_pid: u32,
    client: Option<u64>,
    server: Option<u64>,
}

impl Cpu {
    fn mark(server_pid: u32) -> Cpu {
        Cpu { server_pid, client: cpu_ns(std::process::id()), server: cpu_ns(server_pid) }
    }

    /// Seconds used since the mark (client, server); none where the kernel does not say.
    fn since(&self) -> (Option<f64>, Option<f64>) {
        let delta = |before: Option<u64>, now: Option<u64>| Some(now?.saturating_sub(before?) as f64 / 1e9);
        (delta(self.client, cpu_ns(std::process::id())), delta(self.server, cpu_ns(self.server_pid)))
    }
}

fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}
