//! Load for the L7 benchmark. `http-load` is open-loop at a fixed rate with latency measured from
//! each request's scheduled start, so a slow response delays later requests *and counts for
//! them* (coordinated omission corrected), or closed-loop for maximum throughput. `hold-many`
//! keeps many idle keep-alive connections open for memory measurements.

use std::{net::SocketAddr, time::Duration};

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
    pub body_bytes: usize,
    pub duration: Duration,
    /// Requests per second; `None` = closed loop.
    pub rate: Option<f64>,
    pub warmup: Duration,
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

/// One connection's share: request k (k = index, index + n, ...) is due at start + k / rate.
async fn worker(args: &LoadArgs, index: usize, start: Instant, until: Instant) -> (Vec<u32>, Errors) {
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    let (mut latencies, mut errors) = (Vec::new(), Errors::new());
    let mut sender = match connect(args.addr, args.h2).await {
        Ok(s) => s,
        Err(e) => {
            *errors.entry(format!("connect: {e}")).or_default() += 1;
            return (latencies, errors);
        }
    };
    let mut k = index as u64;
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
        // Coordinated omission: if this connection was still busy with the previous response at
        // `due`, the wait was the server's doing and counts from `due`. If it was idle, any
        // lateness is the timer's (tokio's granularity is 1 ms) and counts from the send.
        let from = if prev_done > due { due } else { sent };
        prev_done = done;
        match result {
            Ok(()) => latencies.push(done.duration_since(from).as_micros().min(u128::from(u32::MAX)) as u32),
            Err(e) => {
                // Kinds, not every message: "status 502", "connection closed before message completed", ...
                let kind: String = format!("{e:#}").chars().take(80).collect();
                *errors.entry(kind).or_default() += 1;
                // A broken connection is replaced; the schedule goes on.
                match connect(args.addr, args.h2).await {
                    Ok(s) => sender = s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        k += args.connections as u64;
    }
    (latencies, errors)
}

type Errors = std::collections::BTreeMap<String, u64>;

async fn phase(args: &LoadArgs, duration: Duration) -> (Vec<u32>, Errors, Duration) {
    let start = Instant::now();
    let until = start + duration;
    let tasks: Vec<_> = (0..args.connections).map(|i| worker(args, i, start, until)).collect();
    let results = futures_join_all(tasks).await;
    let elapsed = start.elapsed();
    let mut all = Vec::new();
    let mut errors = Errors::new();
    for (l, e) in results {
        all.extend(l);
        for (kind, count) in e {
            *errors.entry(kind).or_default() += count;
        }
    }
    (all, errors, elapsed)
}

/// Polls every future on this (current-thread) runtime concurrently.
async fn futures_join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}

pub fn http_load(args: LoadArgs) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        if !args.warmup.is_zero() {
            phase(&args, args.warmup).await;
        }
        let (mut lat, errors, elapsed) = phase(&args, args.duration).await;
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
            body_bytes: 0,
            duration: Duration::ZERO,
            rate: None,
            warmup: Duration::ZERO,
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
