//! weft-probe: the traffic tool tests run inside pods and nodes.
//!
//! Every subcommand except `serve` prints exactly one JSON object line on stdout when done; errors go
//! to stderr with exit status 1. Every client loop is bounded by a count, a duration or
//! `--timeout-ms`, so a broken datapath makes a test fail instead of hang.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use nix::errno::Errno;
use nix::sys::socket::{self, setsockopt, sockopt};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "weft-probe",
    about = "TCP probes for weft's namespace tests; prints one JSON line"
)]
struct Cli {
    /// Bound on each connect and read/write, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Treat EAGAIN from a blocking read as "no data yet" and read again (until the timeout).
    /// Sockets in a BPF sockhash return it spuriously on Linux 6.18 when the socket's own
    /// shutdown wakes a blocked reader (tcp_bpf_recvmsg); only the sk_msg tests set this.
    #[arg(long, global = true)]
    retry_eagain: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP server, one thread per connection; runs until killed. Prints {"listening":"ip:port"}.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
        #[arg(long, value_enum, default_value_t = Mode::Echo)]
        mode: Mode,
        /// The line `reply` mode sends after accepting (a newline is added).
        #[arg(long, default_value = "weft-probe")]
        reply: String,
    },
    /// N sequential connections; counts successes, errors by errno, replies, peers and bytes.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Bytes of pattern to send on each connection before half-closing and reading to EOF.
        #[arg(long, default_value_t = 0)]
        send: u64,
        /// Read one line (the server's reply text) first on each connection.
        #[arg(long)]
        read_reply: bool,
        /// Sit idle this long (after the reply line, if read) before sending.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// One connection: send the pattern, read the echo back and compare byte for byte.
    Transfer {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 16384)]
        chunk: usize,
    },
    /// One long-lived connection doing an echo round trip every interval.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        interval_ms: u64,
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// Request/response latency over one connection to an echo server.
    Pingpong {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 200)]
        warmup: u32,
    },
    /// HTTP server (HTTP/1.1 and h2c) that names itself in `x-served-by`; runs until killed.
    HttpServe {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
        /// Every Nth request answers 503 (0: never).
        #[arg(long, default_value_t = 0)]
        fail_every: u64,
        /// Answer without reading the request body.
        #[arg(long)]
        early_response: bool,
        /// Benchmark upstream: read the request to its end and answer 200 with a fixed 1 KiB
        /// body, nothing echoed, so the load side's CPU goes to load.
        #[arg(long)]
        lean: bool,
    },
    /// OTLP/HTTP trace collector: appends one JSON line per received span to `--out`; runs
    /// until killed.
    OtlpSink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// One HTTP/1.1 connection, `rounds` times: pause (cycling through 0..=`max_pause_ms`), then
    /// two pipelined GETs in one write; counts complete 200 responses read back.
    HttpPipeline {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        #[arg(long, default_value_t = 400)]
        max_pause_ms: u64,
    },
    /// One HTTP/1.1 upgrade (`Connection: upgrade`, `Upgrade: <protocol>`) on a raw
    /// connection: prints the response's status and headers; after a 101, sends each
    /// `--message` on the switched connection and reads back as many bytes (an echo).
    /// With `--h2`: an HTTP/2 extended CONNECT (RFC 8441) instead, answered 200.
    HttpUpgrade {
        #[arg(long)]
        h2: bool,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "websocket")]
        protocol: String,
        /// `name: value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[arg(long = "message")]
        messages: Vec<String>,
        /// Sit idle this long before each message after the first (HTTP/1.1 only). A switched
        /// connection closed meanwhile ends the exchange: `ended` says how.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// N sequential HTTP requests; counts status codes and `x-served-by`.
    HttpGet {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// `name: value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// h2c with prior knowledge.
        #[arg(long)]
        h2: bool,
        /// A request body.
        #[arg(long, default_value = "")]
        body: String,
        /// Send the body without its length: chunked over HTTP/1.1, no content-length over
        /// h2c (as gRPC clients do).
        #[arg(long)]
        chunked: bool,
        /// Send the head at once and the body (of known length) this much later.
        #[arg(long, default_value_t = 0)]
        body_delay_ms: u64,
    },
    /// HTTP load: fixed rate (latency from each request's scheduled start) or closed loop.
    HttpLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Requests in flight on each connection (HTTP/2 streams; needs --h2).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// POST bodies of this size (0: GET).
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
        /// Requests per second (open loop).
        #[arg(long, conflicts_with = "closed")]
        rate: Option<f64>,
        /// Back-to-back on every connection.
        #[arg(long)]
        closed: bool,
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
        /// Writes every measured request as `start_us latency_us` (start from the run's start,
        /// in order) to this file: when the slow ones happened, for diagnosing a tail.
        #[arg(long)]
        timeline: Option<std::path::PathBuf>,
    },
    /// Opens N keep-alive connections (one GET each), prints {"opened":n,"failed":f}, holds them.
    HoldMany {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Connect and close as fast as possible for a while.
    ConnectRate {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 200_000)]
        max: u64,
    },
}

#[path = "weft-probe/http.rs"]
mod http;
#[path = "weft-probe/load.rs"]
mod load;
#[path = "weft-probe/otlp.rs"]
mod otlp;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Echo bytes back until EOF.
    Echo,
    /// Send the reply line, then echo until EOF.
    Reply,
    /// Read until EOF, then send the byte count as a decimal line.
    Sink,
}

/// Set from `--retry-eagain` / `--timeout-ms` before any probe runs.
static RETRY_EAGAIN: AtomicBool = AtomicBool::new(false);
static READ_TIMEOUT: OnceLock<Duration> = OnceLock::new();

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is a usage error.
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    RETRY_EAGAIN.store(cli.retry_eagain, Ordering::Relaxed);
    let _ = READ_TIMEOUT.set(Duration::from_millis(cli.timeout_ms));
    match run(cli) {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Value> {
    let timeout = Duration::from_millis(cli.timeout_ms.max(1));
    match cli.cmd {
        Cmd::Serve {
            port,
            bind,
            mode,
            reply,
        } => serve(SocketAddr::new(bind, port), mode, &reply),
        Cmd::Connect { addr, count, send, read_reply, pause_ms } => {
            Ok(connect(addr, count, send, read_reply, Duration::from_millis(pause_ms), timeout))
        }
        Cmd::Transfer { addr, bytes, chunk } => transfer(addr, bytes, chunk, timeout),
        Cmd::Hold {
            addr,
            duration_ms,
            interval_ms,
            payload,
        } => hold(
            addr,
            Duration::from_millis(duration_ms),
            Duration::from_millis(interval_ms),
            payload,
            timeout,
        ),
        Cmd::Pingpong {
            addr,
            count,
            size,
            warmup,
        } => pingpong(addr, count, size, warmup, timeout),
        Cmd::HttpServe { port, name, fail_every, early_response, lean } => {
            http::serve(SocketAddr::from(([0, 0, 0, 0], port)), name, fail_every, early_response, lean)
        }
        Cmd::OtlpSink { listen, out } => otlp::sink(listen, out),
        Cmd::HttpPipeline { addr, rounds, max_pause_ms } => http_pipeline(addr, rounds, max_pause_ms, timeout),
        Cmd::HttpUpgrade { h2: true, addr, path, protocol, headers, messages, pause_ms } => {
            anyhow::ensure!(pause_ms == 0, "--pause-ms is for HTTP/1.1 upgrades; leave it out with --h2");
            http::extended_connect(addr, &path, &protocol, &headers, &messages, timeout)
        }
        Cmd::HttpUpgrade { h2: false, addr, path, protocol, headers, messages, pause_ms } => {
            http_upgrade(addr, &path, &protocol, &headers, &messages, Duration::from_millis(pause_ms), timeout)
        }
        Cmd::HttpGet { addr, count, path, method, headers, h2, body, chunked, body_delay_ms } => {
            let body_delay = Duration::from_millis(body_delay_ms);
            http::get(http::GetArgs { addr, count, path, method, headers, h2, body, chunked, body_delay, timeout })
        }
        Cmd::HttpLoad { addr, path, h2, connections, streams, body_bytes, duration_ms, rate, closed, warmup_ms, timeline } => {
            anyhow::ensure!(rate.is_some() || closed, "give --rate R (open loop) or --closed");
            anyhow::ensure!(h2 || streams <= 1, "--streams {streams} needs --h2: HTTP/1.1 has one request in flight per connection");
            load::http_load(load::LoadArgs {
                addr,
                path,
                h2,
                connections: connections.max(1),
                streams: streams.max(1),
                body_bytes,
                duration: Duration::from_millis(duration_ms),
                rate: rate.filter(|_| !closed),
                warmup: Duration::from_millis(warmup_ms),
                timeline,
            })
        }
        Cmd::HoldMany { addr, count, duration_ms } => load::hold_many(addr, count, Duration::from_millis(duration_ms)),
        Cmd::ConnectRate {
            addr,
            duration_ms,
            max,
        } => Ok(connect_rate(
            addr,
            Duration::from_millis(duration_ms),
            max,
            timeout,
        )),
    }
}

// === serve ===

fn serve(addr: SocketAddr, mode: Mode, reply: &str) -> anyhow::Result<Value> {
    let listener =
        listen(addr).with_context(|| format!("listen on {addr} failed; is the port taken?"))?;
    let local = listener
        .local_addr()
        .context("getsockname on the listener")?;
    println!("{}", json!({ "listening": local.to_string() }));
    io::stdout().flush().context("flush stdout")?;
    let reply = format!("{reply}\n");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let reply = reply.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_conn(stream, mode, &reply) {
                        eprintln!("weft-probe serve: connection: {e}");
                    }
                });
            }
            // Transient accept errors (ECONNABORTED, EMFILE under load) must not stop the server;
            // the pause keeps a persistent one from spinning a core.
            Err(e) => {
                eprintln!("weft-probe serve: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    unreachable!("TcpListener::incoming never ends")
}

/// Like `TcpListener::bind`, but with the largest accept backlog the kernel allows (somaxconn)
/// instead of std's 128: a connect loop on another core fills 128 quickly, and every SYN dropped
/// on overflow costs that client a 1 s retransmission timeout.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // As std does: a restarted server must not fail on connections of its predecessor in TIME_WAIT.
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(TcpListener::from(fd))
}

fn serve_conn(stream: TcpStream, mode: Mode, reply: &str) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    match mode {
        Mode::Echo => {
            io::copy(&mut reader, &mut writer)?;
        }
        Mode::Reply => {
            writer.write_all(reply.as_bytes())?;
            io::copy(&mut reader, &mut writer)?;
        }
        Mode::Sink => {
            let n = io::copy(&mut reader, &mut io::sink())?;
            writer.write_all(format!("{n}\n").as_bytes())?;
        }
    }
    // Half-close so a client reading to EOF finishes.
    writer.shutdown(Shutdown::Write)
}

// === clients ===

/// Byte `i` of every payload: deterministic and not periodic at power-of-two sizes, so shifted or
/// duplicated data does not compare equal by accident.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Names an error the way tests assert on it: the errno name ("EPERM", "ECONNREFUSED", ...).
/// Timeouts read as ETIMEDOUT whether they come from connect_timeout (no errno) or from
/// SO_RCVTIMEO/SO_SNDTIMEO (EAGAIN).
fn errno_name(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => return "ETIMEDOUT".into(),
        io::ErrorKind::UnexpectedEof => return "EOF".into(),
        _ => {}
    }
    match e.raw_os_error() {
        Some(code) => match Errno::from_raw(code) {
            Errno::UnknownErrno => format!("E{code}"),
            errno => format!("{errno:?}"),
        },
        None => "other".into(),
    }
}

fn dial(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Writes `total` pattern bytes in `chunk`s, half-closes, and reads until EOF on another thread
/// (reading only afterwards would deadlock once the echo fills both socket buffers). Returns the
/// bytes received and whether they are exactly the pattern that was sent.
fn exchange(
    stream: &TcpStream,
    mut reader: impl Read + Send,
    total: u64,
    chunk: usize,
) -> io::Result<(u64, bool)> {
    thread::scope(|s| {
        let receiver = s.spawn(move || -> io::Result<(u64, bool)> {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut received, mut matched) = (0u64, true);
            let deadline = Instant::now() + READ_TIMEOUT.get().copied().unwrap_or_default();
            loop {
                let n = match reader.read(&mut buf) {
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            && RETRY_EAGAIN.load(Ordering::Relaxed)
                            && Instant::now() < deadline =>
                    {
                        continue;
                    }
                    r => r?,
                };
                if n == 0 {
                    return Ok((received, matched));
                }
                matched &= buf[..n]
                    .iter()
                    .zip(received..)
                    .all(|(b, i)| *b == pattern(i));
                received += n as u64;
            }
        });
        let sent = write_pattern(stream, total, chunk.max(1))
            .and_then(|()| stream.shutdown(Shutdown::Write));
        if sent.is_err() {
            // Unblock the receiver instead of letting it wait for the read timeout.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let received = receiver
            .join()
            .map_err(|_| io::Error::other("receiver thread panicked"))?;
        sent?;
        let (received, matched) = received?;
        Ok((received, matched && received == total))
    })
}

fn write_pattern(mut stream: &TcpStream, total: u64, chunk: usize) -> io::Result<()> {
    let mut buf = Vec::with_capacity(chunk);
    let mut offset = 0;
    while offset < total {
        let len = (total - offset).min(chunk as u64);
        buf.clear();
        buf.extend((offset..offset + len).map(pattern));
        stream.write_all(&buf)?;
        offset += len;
    }
    Ok(())
}

#[derive(Default)]
struct ConnectStats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    replies: BTreeMap<String, u64>,
    peers: BTreeMap<String, u64>,
    bytes_sent: u64,
    bytes_received: u64,
}

fn connect(addr: SocketAddr, count: u32, send: u64, read_reply: bool, pause: Duration, timeout: Duration) -> Value {
    let mut stats = ConnectStats::default();
    for _ in 0..count {
        match connect_once(addr, send, read_reply, pause, timeout, &mut stats) {
            Ok(()) => stats.ok += 1,
            Err(e) => *stats.errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    json!({
        "ok": stats.ok,
        "errors": stats.errors,
        "replies": stats.replies,
        "peers": stats.peers,
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
    })
}

fn connect_once(
    addr: SocketAddr,
    send: u64,
    read_reply: bool,
    pause: Duration,
    timeout: Duration,
    stats: &mut ConnectStats,
) -> io::Result<()> {
    let stream = dial(addr, timeout)?;
    // getpeername: with a cgroup connect hook rewriting the destination, this shows what the
    // application believes it is connected to.
    *stats
        .peers
        .entry(stream.peer_addr()?.to_string())
        .or_default() += 1;
    let mut reader = BufReader::new(stream.try_clone()?);
    if read_reply {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        stats.bytes_received += line.len() as u64;
        *stats.replies.entry(line.trim_end().to_owned()).or_default() += 1;
    }
    thread::sleep(pause);
    if send > 0 {
        let (received, _) = exchange(&stream, reader, send, 16 * 1024)?;
        stats.bytes_sent += send;
        stats.bytes_received += received;
    }
    Ok(())
}

fn transfer(
    addr: SocketAddr,
    bytes: u64,
    chunk: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let stream = dial(addr, timeout)
        .with_context(|| format!("connect to {addr} failed; is an echo server listening?"))?;
    let peer = stream.peer_addr().context("getpeername")?;
    let reader = stream.try_clone()?;
    let (received, matched) =
        exchange(&stream, reader, bytes, chunk).with_context(|| format!("transfer with {addr}"))?;
    Ok(json!({ "sent": bytes, "received": received, "matched": matched, "peer": peer.to_string() }))
}

fn round_trip(mut stream: &TcpStream, payload: &[u8], buf: &mut [u8]) -> io::Result<()> {
    stream.write_all(payload)?;
    stream.read_exact(buf)?;
    if buf != payload {
        return Err(io::Error::other("echoed bytes differ from the payload"));
    }
    Ok(())
}

fn hold(
    addr: SocketAddr,
    duration: Duration,
    interval: Duration,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let stream = dial(addr, timeout)
        .with_context(|| format!("connect to {addr} failed; is an echo server listening?"))?;
    stream.set_nodelay(true)?;
    let payload: Vec<u8> = (0..size as u64).map(pattern).collect();
    let mut buf = vec![0u8; size];
    let (mut rounds, mut failures, mut first_error) = (0u64, 0u64, None::<String>);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed() < duration {
        match round_trip(&stream, &payload, &mut buf) {
            Ok(()) => rounds += 1,
            Err(e) => {
                failures += 1;
                first_error.get_or_insert_with(|| errno_name(&e));
            }
        }
        next += interval;
        let until_next = next.saturating_duration_since(Instant::now());
        thread::sleep(until_next.min(duration.saturating_sub(start.elapsed())));
    }
    Ok(json!({ "rounds": rounds, "failures": failures, "first_error": first_error }))
}

fn pingpong(
    addr: SocketAddr,
    count: u32,
    size: usize,
    warmup: u32,
    timeout: Duration,
) -> anyhow::Result<Value> {
    if count == 0 || size == 0 {
        bail!("--count and --size must be at least 1");
    }
    let stream = dial(addr, timeout)
        .with_context(|| format!("connect to {addr} failed; is an echo server listening?"))?;
    stream.set_nodelay(true)?;
    let payload: Vec<u8> = (0..size as u64).map(pattern).collect();
    let mut buf = vec![0u8; size];
    for _ in 0..warmup {
        round_trip(&stream, &payload, &mut buf).context("warmup round trip")?;
    }
    let mut rtts = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        round_trip(&stream, &payload, &mut buf).context("round trip")?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    // Nearest-rank percentile.
    let pct = |q: f64| rtts[((rtts.len() as f64 * q).ceil() as usize).clamp(1, rtts.len()) - 1];
    let mean = rtts.iter().sum::<u64>() as f64 / rtts.len() as f64;
    Ok(
        json!({ "count": count, "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "mean_us": mean }),
    )
}

/// Reads one HTTP/1.1 response (head, then a Content-Length body); returns its status.
fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<u16> {
    let mut line = String::new();
    r.read_line(&mut line).context("status line")?;
    let status = line.split(' ').nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        r.read_line(&mut line).context("header line")?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((k, v)) = trimmed.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().context("content-length")?;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).context("body")?;
    Ok(status)
}

fn http_pipeline(addr: SocketAddr, rounds: u32, max_pause_ms: u64, timeout: Duration) -> anyhow::Result<Value> {
    let stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let (mut ok, mut codes) = (0u64, BTreeMap::<String, u64>::new());
    let request = format!("GET /a HTTP/1.1\r\nHost: {addr}\r\n\r\nGET /b HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    for round in 0..rounds {
        let pause = if rounds > 1 { max_pause_ms * u64::from(round) / u64::from(rounds - 1) } else { 0 };
        thread::sleep(Duration::from_millis(pause));
        writer.write_all(request.as_bytes()).with_context(|| format!("write in round {round}"))?;
        for _ in 0..2 {
            let status = read_response(&mut reader).with_context(|| format!("response in round {round} (after a {pause} ms pause)"))?;
            *codes.entry(status.to_string()).or_default() += 1;
            ok += u64::from(status == 200);
        }
    }
    Ok(json!({ "ok": ok, "codes": codes }))
}

fn http_upgrade(
    addr: SocketAddr,
    path: &str,
    protocol: &str,
    headers: &[String],
    messages: &[String],
    pause: Duration,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n");
    if protocol.eq_ignore_ascii_case("websocket") {
        // RFC 6455's sample key, as a WebSocket client sends one.
        request += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    }
    for h in headers {
        request += &format!("{h}\r\n");
    }
    request += "\r\n";
    writer.write_all(request.as_bytes()).context("write the upgrade request")?;
    let mut line = String::new();
    reader.read_line(&mut line).context("status line")?;
    let status: u16 = line.split(' ').nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("bad status line {line:?}"))?;
    let mut head = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).context("header line")?;
        let Some((k, v)) = line.trim_end().split_once(':') else { break };
        head.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let (mut echoed, mut ended) = (Vec::new(), None);
    if status == 101 {
        for (i, m) in messages.iter().enumerate() {
            if i > 0 {
                thread::sleep(pause);
            }
            let mut back = vec![0; m.len()];
            match writer.write_all(m.as_bytes()).and_then(|()| reader.read_exact(&mut back)) {
                Ok(()) => echoed.push(String::from_utf8_lossy(&back).into_owned()),
                Err(e) => {
                    ended = Some(format!("{} at message {i}", errno_name(&e)));
                    break;
                }
            }
        }
        if ended.is_none() {
            // A clean close: this side ends, then the other side's end is awaited.
            writer.shutdown(std::net::Shutdown::Write).context("end the switched connection")?;
            reader.read_to_end(&mut Vec::new()).context("await the other side's end")?;
        }
    }
    Ok(json!({ "status": status, "headers": head, "echoed": echoed, "ended": ended }))
}

fn connect_rate(addr: SocketAddr, duration: Duration, max: u64, timeout: Duration) -> Value {
    // RST on close (SO_LINGER 0) instead of FIN: otherwise every connection leaves a TIME_WAIT
    // entry and a fast loop runs out of ephemeral ports within seconds.
    let abort_on_close = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let (mut connections, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while connections + errors < max && start.elapsed() < duration {
        let remaining = duration
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, timeout.min(remaining)) {
            Ok(stream) => {
                connections += 1;
                if setsockopt(&stream, sockopt::Linger, &abort_on_close).is_err() {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed();
    json!({
        "connections": connections,
        "elapsed_ms": elapsed.as_millis() as u64,
        "per_sec": connections as f64 / elapsed.as_secs_f64().max(1e-9),
        "errors": errors,
    })
}
