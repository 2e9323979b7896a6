//! Load for the L7 benchmark. `http-load` is open-loop at a fixed rate with latency measured from
//! each request's scheduled start, so a slow response delays later requests *and counts for
//! them* (coordinated omission corrected), or closed-loop for maximum throughput. `hold-many`
//! keeps many idle keep-alive connections open for memory measurements.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::{net::TcpStream, time::Instant};

pub struct LoadArgs {
    pub addr: SocketAddr,
    pub path: String,
    pub h2: bool,
    pub connections: usize,
    /// Requests in flight per connection (HTTP/2 only; 1 for HTTP/1.1).
    pub streams: usize,
    pub body_bytes: usize,
    pub duration: Duration,
    /// Requests per second; `None` = closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
    /// Where to write every measured request's start and latency.
    pub timeline: Option<std::path::PathBuf>,
}

/// One measured request: when its latency counts from (µs after the phase's start) and the
/// latency (µs).
#[derive(Clone, Copy)]
struct Sample {
    start_us: u32,
    latency_us: u32,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(addr: SocketAddr, h2: bool) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let io = TokioIo::new(stream);
    Ok(if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(sender)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(sender)
    })
}

impl Sender {
    /// Another handle on the same connection: HTTP/2 only, as HTTP/1.1 has one request at a time.
    fn share(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// One request, body read to the end. Errors are counted, not fatal.
    async fn call(&mut self, args: &LoadArgs, body: &Bytes) -> anyhow::Result<()> {
        let method = if args.body_bytes > 0 { "POST" } else { "GET" };
        let mut req = Request::builder().method(method).uri(format!("http://{}{}", args.addr, args.path));
        // HTTP/1.1 needs Host; h2 carries the authority in the URI, and a duplicate Host is an
        // error to strict servers (nginx).
        if !args.h2 {
            req = req.header("host", args.addr.to_string());
        }
        let req = req.body(Full::new(body.clone()))?;
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        // The body of a failure usually says why (proxies put the reset reason there).
        anyhow::ensure!(status.is_success(), "status {}: {}", status.as_u16(), String::from_utf8_lossy(&body).trim());
        Ok(())
    }
}

/// One connection: opens it, then drives `streams` request loops over it (HTTP/2 multiplexes
/// them; HTTP/1.1 has one). Loop j of connection i sends requests k = i * streams + j,
/// stepping by every loop in the run; request k is due at start + k / rate.
async fn connection(args: Arc<LoadArgs>, index: usize, start: Instant, until: Instant) -> (Vec<Sample>, Errors) {
    let sender = match connect(args.addr, args.h2).await {
        Ok(s) => s,
        Err(e) => return (Vec::new(), Errors::from([(format!("connect: {e}"), 1)])),
    };
    let mut streams = tokio::task::JoinSet::new();
    for j in 1..args.streams {
        let Some(sender) = sender.share() else { break };
        let args = Arc::clone(&args);
        streams.spawn(async move { drive(&args, sender, index * args.streams + j, start, until).await });
    }
    let (mut latencies, mut errors) = drive(&args, sender, index * args.streams, start, until).await;
    while let Some(joined) = streams.join_next().await {
        merge(&mut latencies, &mut errors, joined.unwrap_or_else(|_| (Vec::new(), Errors::from([("stream panicked".to_string(), 1)]))));
    }
    (latencies, errors)
}

/// One request loop.
async fn drive(args: &LoadArgs, mut sender: Sender, first: usize, start: Instant, until: Instant) -> (Vec<Sample>, Errors) {
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    let (mut latencies, mut errors) = (Vec::new(), Errors::new());
    let mut k = first as u64;
    let step = (args.connections * args.streams) as u64;
    let mut prev_done = start;
    loop {
        let due = match args.rate {
            Some(rate) => start + Duration::from_secs_f64(k as f64 / rate),
            None => Instant::now(),
        };
        if due >= until {
            break;
        }
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        let result = sender.call(args, &body).await;
        let done = Instant::now();
        // Coordinated omission: if this loop was still busy with the previous response at
        // `due`, the wait was the server's doing and counts from `due`. If it was idle, any
        // lateness is the timer's (tokio's granularity is 1 ms) and counts from the send.
        let from = if prev_done > due { due } else { sent };
        prev_done = done;
        match result {
            Ok(()) => latencies.push(Sample { start_us: micros(from.duration_since(start)), latency_us: micros(done.duration_since(from)) }),
            Err(e) => {
                // Kinds, not every message: "status 502", "connection closed before message completed", ...
                let kind: String = format!("{e:#}").chars().take(80).collect();
                *errors.entry(kind).or_default() += 1;
                // A broken connection is replaced (for this loop); the schedule goes on.
                match connect(args.addr, args.h2).await {
                    Ok(s) => sender = s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        k += step;
    }
    (latencies, errors)
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

fn merge(latencies: &mut Vec<Sample>, errors: &mut Errors, (l, e): (Vec<Sample>, Errors)) {
    latencies.extend(l);
    for (kind, count) in e {
        *errors.entry(kind).or_default() += count;
    }
}

type Errors = std::collections::BTreeMap<String, u64>;

async fn phase(args: &Arc<LoadArgs>, duration: Duration) -> (Vec<Sample>, Errors, Duration) {
    let start = Instant::now();
    let until = start + duration;
    // A task per connection and per stream: a response wakes only its own loop.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        tasks.spawn(connection(Arc::clone(args), i, start, until));
    }
    let (mut all, mut errors) = (Vec::new(), Errors::new());
    while let Some(joined) = tasks.join_next().await {
        merge(&mut all, &mut errors, joined.unwrap_or_else(|_| (Vec::new(), Errors::from([("connection panicked".to_string(), 1)]))));
    }
    (all, errors, start.elapsed())
}

pub fn http_load(args: LoadArgs) -> anyhow::Result<Value> {
    let args = Arc::new(args);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        if !args.warmup.is_zero() {
            phase(&args, args.warmup).await;
        }
        let (mut samples, errors, elapsed) = phase(&args, args.duration).await;
        if let Some(path) = &args.timeline {
            samples.sort_unstable_by_key(|s| s.start_us);
            let text: String = samples.iter().map(|s| format!("{} {}\n", s.start_us, s.latency_us)).collect();
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let mut lat: Vec<u32> = samples.iter().map(|s| s.latency_us).collect();
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            f64::from(lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)])
        };
        Ok(json!({
            "mode": if args.rate.is_some() { "fixed" } else { "closed" },
            "requests": lat.len(),
            "errors": errors.values().sum::<u64>(),
            "error_kinds": errors,
            "elapsed_s": elapsed.as_secs_f64(),
            "rps": lat.len() as f64 / elapsed.as_secs_f64(),
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": lat.last().copied().unwrap_or(0),
        }))
    })
}

/// Opens `count` keep-alive connections with one GET each, prints `{"opened":n,"failed":f}`,
/// then holds them for `hold`.
pub fn hold_many(addr: SocketAddr, count: usize, hold: Duration) -> anyhow::Result<Value> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let args = LoadArgs {
            addr,
            path: "/".into(),
            h2: false,
            connections: 1,
            streams: 1,
            body_bytes: 0,
            duration: Duration::ZERO,
            rate: None,
            warmup: Duration::ZERO,
            timeline: None,
        };
        let body = Bytes::new();
        let (mut held, mut failed) = (Vec::with_capacity(count), 0u64);
        for _ in 0..count {
            let Ok(mut sender) = connect(addr, false).await else {
                failed += 1;
                continue;
            };
            match sender.call(&args, &body).await {
                Ok(()) => held.push(sender),
                Err(_) => failed += 1,
            }
        }
        let opened = json!({ "opened": held.len(), "failed": failed });
        println!("{opened}");
        tokio::time::sleep(hold).await;
        drop(held);
        Ok(json!({ "released": true }))
    })
}

/// Many connections need many descriptors: lift the soft limit to the hard one.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
