//! Resilience between the proxy and its upstreams: endpoint choice (least-request power of two
//! choices, round robin, random), circuit breaking, outlier ejection, and retries within a
//! budget. State is kept per endpoint and per target service across route-table swaps.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Method, StatusCode};
use tokio::sync::Notify;
use weft_policy::{LoadBalancer, OutlierDetection, RetryOn, RetryPolicy};

/// What the proxy tracks about one upstream endpoint.
#[derive(Default)]
pub struct EndpointState {
    /// Requests in flight (each holds a [`Slot`]).
    active: AtomicU32,
    /// Requests waiting for a slot.
    pending: AtomicU32,
    /// Wakes one waiting request when a slot frees.
    freed: Notify,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejection: Mutex<Ejection>,
}

#[derive(Default)]
struct Ejection {
    /// Ejections that count toward the next one's length: each lasts `base_ejection` times
    /// this (after adding itself), and one is forgiven per `interval` the endpoint stays in.
    count: u32,
    /// Until when the endpoint is out; `None` while it is in.
    until: Option<Instant>,
    /// When the last ejection ended (or will end).
    last_end: Option<Instant>,
}

impl EndpointState {
    /// Requests in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// A slot, if fewer than `limit` requests are in flight.
    pub fn try_acquire(self: &Arc<Self>, limit: u32) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// A slot once one of the `limit` frees, waiting as one of at most `max_pending` requests
    /// (first come, first served) until `deadline`.
    pub async fn acquire(self: &Arc<Self>, limit: u32, max_pending: u32, deadline: Option<tokio::time::Instant>) -> Result<Slot, NoSlot> {
        if let Some(slot) = self.try_acquire(limit) {
            return Ok(slot);
        }
        if self.pending.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max_pending).then_some(n + 1)).is_err() {
            return Err(NoSlot::Overflow);
        }
        let waited = async {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                // Registered before looking, so a slot freed in between still wakes this one.
                freed.as_mut().enable();
                if let Some(slot) = self.try_acquire(limit) {
                    return slot;
                }
                freed.await;
            }
        };
        let slot = match deadline {
            Some(at) => tokio::time::timeout_at(at, waited).await.map_err(|_| NoSlot::TimedOut),
            None => Ok(waited.await),
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        slot
    }

    fn ejected(&self, now: Instant) -> bool {
        let mut ejection = self.ejection.lock().unwrap_or_else(|p| p.into_inner());
        match ejection.until {
            Some(t) if t > now => true,
            Some(_) => {
                // The ejection ran out: the endpoint is back, on probation (counters reset).
                ejection.until = None;
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    /// Ejects the endpoint from `now`, for `base` times its ejections (those not forgiven: one
    /// per `interval` since the last ejection ended, as Envoy's multiplier decays); returns how
    /// long.
    fn eject(&self, now: Instant, base: Duration, interval: Duration) -> Duration {
        let mut ejection = self.ejection.lock().unwrap_or_else(|p| p.into_inner());
        let forgiven = match ejection.last_end {
            Some(end) if !interval.is_zero() => {
                let healthy = now.saturating_duration_since(end).as_nanos() / interval.as_nanos();
                u32::try_from(healthy).unwrap_or(u32::MAX)
            }
            _ => 0,
        };
        ejection.count = ejection.count.saturating_sub(forgiven).saturating_add(1);
        let length = base.saturating_mul(ejection.count);
        ejection.until = Some(now + length);
        ejection.last_end = ejection.until;
        length
    }
}

/// One request in flight to an endpoint; dropping it frees the slot for a waiting request.
pub struct Slot(Arc<EndpointState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Why a request got no slot at an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// As many requests were already waiting as may: the circuit breaker overflows (503).
    Overflow,
    /// The request's deadline passed while it waited (504).
    TimedOut,
}

/// Per target service (VIP:port): round-robin cursor and retry budget.
#[derive(Default)]
pub struct TargetState {
    cursor: AtomicU64,
    budget: Mutex<BudgetWindow>,
}

/// Requests and retries to a service in the current one-second window and the one before. A
/// retry is charged to the window its request was counted in, so a request counted just before
/// the window turns still pays for its own retry; the budget is judged over both windows.
#[derive(Default)]
struct BudgetWindow {
    start: Option<Instant>,
    requests: u64,
    retries: u64,
    previous_start: Option<Instant>,
    previous_requests: u64,
    previous_retries: u64,
}

/// The budget window a request was counted in.
#[derive(Clone, Copy, Debug)]
pub struct BudgetTicket(Option<Instant>);

/// Shared across connections and tables.
#[derive(Default)]
pub struct Upstreams {
    endpoints: Mutex<HashMap<SocketAddrV4, Arc<EndpointState>>>,
    targets: Mutex<HashMap<SocketAddrV4, Arc<TargetState>>>,
}

impl Upstreams {
    pub fn endpoint(&self, addr: SocketAddrV4) -> Arc<EndpointState> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner()).entry(addr).or_default().clone()
    }

    pub fn target(&self, addr: SocketAddrV4) -> Arc<TargetState> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner()).entry(addr).or_default().clone()
    }
}

/// No endpoint has weight: nothing to send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEndpoint;

/// Chooses an endpoint of `endpoints` (weighted), skipping ejected ones and those at
/// `max_requests`; when every one is at its limit, the least loaded, for the request to wait
/// on (see [`EndpointState::acquire`]).
pub fn pick_endpoint(
    upstreams: &Upstreams,
    target: &TargetState,
    endpoints: &[(SocketAddrV4, u32)],
    lb: LoadBalancer,
    max_requests: u32,
) -> Result<(SocketAddrV4, Arc<EndpointState>), NoEndpoint> {
    let now = Instant::now();
    let mut candidates: Vec<(SocketAddrV4, u32, Arc<EndpointState>)> = endpoints
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(a, w)| (*a, *w, upstreams.endpoint(*a)))
        .collect();
    if candidates.is_empty() {
        return Err(NoEndpoint);
    }
    let healthy: Vec<_> = candidates.iter().filter(|c| !c.2.ejected(now)).cloned().collect();
    // If everything is ejected, ignore ejections rather than fail every request (panic mode).
    if !healthy.is_empty() {
        candidates = healthy;
    }
    let load = |c: &(SocketAddrV4, u32, Arc<EndpointState>)| f64::from(c.2.active()) / f64::from(c.1);
    let open: Vec<_> = candidates.iter().filter(|c| c.2.active() < max_requests).cloned().collect();
    if open.is_empty() {
        let least = candidates.into_iter().min_by(|a, b| load(a).total_cmp(&load(b)));
        return least.map(|(a, _, s)| (a, s)).ok_or(NoEndpoint);
    }
    let weighted = |c: &[(SocketAddrV4, u32, Arc<EndpointState>)]| {
        crate::route::pick(c, |e| e.1).cloned()
    };
    let chosen = match lb {
        LoadBalancer::Random => weighted(&open),
        LoadBalancer::RoundRobin => {
            // Weighted round robin: walk the weight line.
            let total: u64 = open.iter().map(|c| u64::from(c.1)).sum();
            let mut point = target.cursor.fetch_add(1, Ordering::Relaxed) % total.max(1);
            open.iter().find(|c| {
                let w = u64::from(c.1);
                if point < w {
                    true
                } else {
                    point -= w;
                    false
                }
            }).cloned()
        }
        LoadBalancer::LeastRequest => {
            // Power of two choices: two weighted picks, the one with fewer requests in flight
            // (relative to its weight) wins.
            match (weighted(&open), weighted(&open)) {
                (Some(a), Some(b)) => Some(if load(&b) < load(&a) { b } else { a }),
                (a, b) => a.or(b),
            }
        }
    };
    chosen.map(|(a, _, s)| (a, s)).ok_or(NoEndpoint)
}

/// What one try produced, as retry and outlier logic see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryResult {
    Status(StatusCode, Option<u32>),
    ConnectFailure,
    Reset,
    Timeout,
}

impl TryResult {
    pub fn retriable(self, on: &RetryOn) -> bool {
        match self {
            TryResult::ConnectFailure => on.connect_failure,
            TryResult::Reset => on.reset,
            // A per-try timeout is answered 504, a gateway error.
            TryResult::Timeout => on.gateway_errors || on.server_errors,
            TryResult::Status(code, grpc) => {
                let c = code.as_u16();
                (on.server_errors && code.is_server_error())
                    || (on.gateway_errors && matches!(c, 502..=504))
                    || on.statuses.contains(&c)
                    || grpc.is_some_and(|g| on.grpc.contains(&g))
            }
        }
    }

    fn is_5xx(self) -> bool {
        match self {
            TryResult::Status(code, _) => code.is_server_error(),
            _ => true,
        }
    }

    fn is_gateway_error(self) -> bool {
        match self {
            TryResult::Status(code, _) => matches!(code.as_u16(), 502..=504),
            _ => true,
        }
    }
}

/// Records a try's result for outlier detection; returns true if the endpoint got ejected.
pub fn record_outcome(
    upstreams: &Upstreams,
    state: &EndpointState,
    result: TryResult,
    outlier: Option<&OutlierDetection>,
    siblings: &[(SocketAddrV4, u32)],
) -> bool {
    let five = if result.is_5xx() { state.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1 } else {
        state.consecutive_5xx.store(0, Ordering::Relaxed);
        0
    };
    let gw = if result.is_gateway_error() { state.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1 } else {
        state.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    let Some(od) = outlier else { return false };
    let tripped = (od.consecutive_5xx > 0 && five >= od.consecutive_5xx)
        || (od.consecutive_gateway_errors > 0 && gw >= od.consecutive_gateway_errors);
    if !tripped {
        return false;
    }
    // Never eject more than max_ejection_percent of the endpoints (at least one may go).
    let now = Instant::now();
    let ejected_now = siblings.iter().filter(|(a, _)| upstreams.endpoint(*a).ejected(now)).count();
    let allowed = (siblings.len() * od.max_ejection_percent as usize / 100).max(1);
    if ejected_now >= allowed {
        return false;
    }
    state.eject(now, od.base_ejection, od.interval);
    state.consecutive_5xx.store(0, Ordering::Relaxed);
    state.consecutive_gateway.store(0, Ordering::Relaxed);
    true
}

impl TargetState {
    /// Counts a request toward the budget.
    pub fn request_started(&self) -> BudgetTicket {
        self.request_started_at(Instant::now())
    }

    fn request_started_at(&self, now: Instant) -> BudgetTicket {
        let mut w = self.window(now);
        w.requests += 1;
        BudgetTicket(w.start)
    }

    /// Whether one more retry of the request holding `ticket` fits the budget: retries at most
    /// `percent` of the requests of the last one to two seconds, but always `min_per_second` in
    /// the current second. Takes the retry if so.
    pub fn try_retry(&self, policy: &RetryPolicy, ticket: BudgetTicket) -> bool {
        self.try_retry_at(policy, ticket, Instant::now())
    }

    fn try_retry_at(&self, policy: &RetryPolicy, ticket: BudgetTicket, now: Instant) -> bool {
        let mut w = self.window(now);
        let requests = (w.requests + w.previous_requests) as f64;
        let retries = (w.retries + w.previous_retries) as f64;
        let allowed = retries < requests * policy.budget_percent / 100.0 || w.retries < u64::from(policy.budget_min_per_second);
        if allowed {
            if ticket.0.is_some() && ticket.0 == w.previous_start {
                w.previous_retries += 1;
            } else {
                w.retries += 1;
            }
        }
        allowed
    }

    fn window(&self, now: Instant) -> std::sync::MutexGuard<'_, BudgetWindow> {
        let mut w = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = w.start.map(|s| now.saturating_duration_since(s));
        if elapsed.is_none_or(|e| e >= Duration::from_secs(1)) {
            // The window just ended becomes the previous one; an older one counts no more.
            let recent = elapsed.is_some_and(|e| e < Duration::from_secs(2));
            let previous = if recent { (w.start, w.requests, w.retries) } else { (None, 0, 0) };
            *w = BudgetWindow {
                start: Some(now),
                requests: 0,
                retries: 0,
                previous_start: previous.0,
                previous_requests: previous.1,
                previous_retries: previous.2,
            };
        }
        w
    }
}

/// Exponential backoff with full jitter: a random wait in [0, min(max, base * 2^retry)].
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let ceiling = policy.backoff_base.saturating_mul(1u32 << retry.min(16)).min(policy.backoff_max);
    ceiling.mul_f64(fastrand::f64())
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request counted in one window and retried in the next pays for its own retry: at 100%
    /// every request gets its retry, however the windows turn, and no more.
    #[test]
    fn budget_spans_the_window_boundary() {
        let policy = RetryPolicy { budget_percent: 100.0, budget_min_per_second: 0, ..RetryPolicy::default() };
        let target = TargetState::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first window opens at 0; one request per 10 ms from 6 ms for 3 s, each retried
        // 5 ms after it started, so every window turns between a request and its retry.
        drop(target.window(at(0)));
        let mut last = None;
        for i in 0..300 {
            let ticket = target.request_started_at(at(6 + i * 10));
            assert!(target.try_retry_at(&policy, ticket, at(11 + i * 10)), "request {i} got its retry");
            last = Some(ticket);
        }
        let last = last.expect("requests were made");
        assert!(!target.try_retry_at(&policy, last, at(3000)), "a second retry is over 100%");
        // The floor: `min_per_second` retries in the current second even with no requests.
        let floor = RetryPolicy { budget_percent: 0.0, budget_min_per_second: 2, ..RetryPolicy::default() };
        let idle = TargetState::default();
        let none = BudgetTicket(None);
        assert!(idle.try_retry_at(&floor, none, at(0)) && idle.try_retry_at(&floor, none, at(1)));
        assert!(!idle.try_retry_at(&floor, none, at(2)));
        assert!(idle.try_retry_at(&floor, none, at(1000)), "a new second, a new floor");
    }

    #[test]
    fn ejections_grow_and_are_forgiven_one_per_interval_in() {
        let state = EndpointState::default();
        let (base, interval) = (Duration::from_secs(30), Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(state.eject(t0, base, interval), base);
        assert!(state.ejected(t0 + Duration::from_secs(29)));
        assert!(!state.ejected(t0 + Duration::from_secs(30)), "back after one base ejection");
        // Ejected again at once: twice as long.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(state.eject(t1, base, interval), base * 2);
        // Back at t1 + 60 s; 25 s in forgives two ejections: the next is one base long again.
        let t2 = t1 + Duration::from_secs(85);
        assert!(!state.ejected(t2));
        assert_eq!(state.eject(t2, base, interval), base);
        // A zero interval forgives nothing.
        let t3 = t2 + Duration::from_secs(3600);
        assert_eq!(state.eject(t3, base, Duration::ZERO), base * 2);
    }

    /// One slot, one waiting place: the second request waits and gets the slot the first
    /// frees, a third overflows, and a wait past its deadline gives up.
    #[tokio::test]
    async fn requests_past_the_limit_wait_up_to_the_pending_bound() {
        let state = Arc::new(EndpointState::default());
        let first = state.acquire(1, 1, None).await.expect("a free slot");
        let waiting = tokio::spawn({
            let state = state.clone();
            async move { state.acquire(1, 1, None).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(state.pending.load(Ordering::Relaxed), 1, "the second waits");
        assert_eq!(state.acquire(1, 1, None).await.err(), Some(NoSlot::Overflow), "the third overflows");
        drop(first);
        assert_eq!(waiting.await.expect("joined"), Ok(()), "the waiting request gets the freed slot");
        assert_eq!((state.active(), state.pending.load(Ordering::Relaxed)), (0, 0));

        let _held = state.try_acquire(1).expect("free again");
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        assert_eq!(state.acquire(1, 1, Some(deadline)).await.err(), Some(NoSlot::TimedOut));
        assert_eq!(state.pending.load(Ordering::Relaxed), 0, "a request that gave up waits no more");
    }
}
