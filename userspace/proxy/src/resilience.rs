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
use weft_policy::{LoadBalancer, OutlierDetection, RetryOn, RetryPolicy};

/// What the proxy tracks about one upstream endpoint.
#[derive(Default)]
pub struct EndpointState {
    /// Requests in flight.
    pub active: AtomicU32,
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

/// Per target service (VIP:port): round-robin cursor and retry budget.
#[derive(Default)]
pub struct TargetState {
    cursor: AtomicU64,
    budget: Mutex<BudgetWindow>,
}

#[derive(Default)]
struct BudgetWindow {
    start: Option<Instant>,
    requests: u64,
    retries: u64,
}

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

/// Why no endpoint could be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickError {
    NoEndpoint,
    /// Every candidate is at its request limit: the circuit breaker overflows (503).
    Overflow,
}

/// Chooses an endpoint of `endpoints` (weighted), skipping ejected ones and those at
/// `max_requests`.
pub fn pick_endpoint(
    upstreams: &Upstreams,
    target: &TargetState,
    endpoints: &[(SocketAddrV4, u32)],
    lb: LoadBalancer,
    max_requests: u32,
) -> Result<(SocketAddrV4, Arc<EndpointState>), PickError> {
    let now = Instant::now();
    let mut candidates: Vec<(SocketAddrV4, u32, Arc<EndpointState>)> = endpoints
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(a, w)| (*a, *w, upstreams.endpoint(*a)))
        .collect();
    if candidates.is_empty() {
        return Err(PickError::NoEndpoint);
    }
    let healthy: Vec<_> = candidates.iter().filter(|c| !c.2.ejected(now)).cloned().collect();
    // If everything is ejected, ignore ejections rather than fail every request (panic mode).
    if !healthy.is_empty() {
        candidates = healthy;
    }
    let open: Vec<_> = candidates.iter().filter(|c| c.2.active.load(Ordering::Relaxed) < max_requests).cloned().collect();
    if open.is_empty() {
        return Err(PickError::Overflow);
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
                (Some(a), Some(b)) => {
                    let load = |c: &(SocketAddrV4, u32, Arc<EndpointState>)| {
                        f64::from(c.2.active.load(Ordering::Relaxed)) / f64::from(c.1)
                    };
                    Some(if load(&b) < load(&a) { b } else { a })
                }
                (a, b) => a.or(b),
            }
        }
    };
    chosen.map(|(a, _, s)| (a, s)).ok_or(PickError::NoEndpoint)
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
    /// Counts a request toward the budget window.
    pub fn request_started(&self) {
        let mut w = self.window();
        w.requests += 1;
    }

    /// Whether one more retry fits the budget: at most `percent` of this window's requests, but
    /// always `min_per_second`. Takes the retry if so.
    pub fn try_retry(&self, policy: &RetryPolicy) -> bool {
        let mut w = self.window();
        let allowed = (w.requests as f64 * policy.budget_percent / 100.0).max(f64::from(policy.budget_min_per_second));
        if (w.retries as f64) < allowed {
            w.retries += 1;
            true
        } else {
            false
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, BudgetWindow> {
        let mut w = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.start.is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1)) {
            *w = BudgetWindow { start: Some(now), requests: 0, retries: 0 };
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
}
