//! Per-client request rate limit: `rpc.requests_per_sec_per_ip` ([`RateLimiter`]).
//!
//! Each client IP address has a token bucket that holds at most one second's worth of
//! requests and refills at the configured rate; a call takes one token (a batch of N calls
//! takes N) and is refused with `-32020` when none is left. The table of buckets is bounded
//! ([`MAX_TRACKED_IPS`]): when it is full, buckets that have refilled completely are dropped
//! (a new one would be the same), and if that frees nothing the least recently seen half
//! goes. So a flood from many addresses costs a bounded amount of memory; an address evicted
//! that way merely starts again with a full bucket.
//!
//! The logic is synchronous and takes the time as an argument ([`RateTable`]), so tests
//! drive it with their own clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most client addresses whose buckets are kept at once.
pub const MAX_TRACKED_IPS: usize = 16_384;

/// The client address of a request, put in its extensions by the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// One client's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The buckets of every client, without a lock or a clock of its own.
#[derive(Debug)]
pub struct RateTable {
    per_sec: f64,
    burst: f64,
    capacity: usize,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateTable {
    /// `per_sec` requests per second per address (at least 1), at most `capacity` addresses
    /// tracked (at least 2).
    pub fn new(per_sec: u32, capacity: usize) -> RateTable {
        let per_sec = f64::from(per_sec.max(1));
        RateTable {
            per_sec,
            // One second's worth: a client may send that many at once, then at the rate.
            burst: per_sec,
            capacity: capacity.max(2),
            buckets: HashMap::new(),
        }
    }

    /// Takes `n` tokens from `ip`'s bucket at time `now`; false (and nothing taken) if it
    /// holds fewer.
    pub fn take(&mut self, ip: IpAddr, n: u32, now: Instant) -> bool {
        if !self.buckets.contains_key(&ip) && self.buckets.len() >= self.capacity {
            self.evict(now);
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        let bucket = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        bucket.tokens = refilled(bucket, now, per_sec, burst);
        bucket.last = now;
        let cost = f64::from(n);
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            true
        } else {
            false
        }
    }

    /// How long until `ip` has a token again (zero if it has one now).
    pub fn wait_time(&self, ip: IpAddr, now: Instant) -> Duration {
        let Some(bucket) = self.buckets.get(&ip) else {
            return Duration::ZERO;
        };
        let missing = 1.0 - refilled(bucket, now, self.per_sec, self.burst);
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.per_sec)
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Makes room for one more address.
    fn evict(&mut self, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets
            .retain(|_, b| refilled(b, now, per_sec, burst) < burst);
        if self.buckets.len() < self.capacity {
            return;
        }
        // Every address is still being limited: keep the most recently seen half.
        let mut seen: Vec<Instant> = self.buckets.values().map(|b| b.last).collect();
        let middle = seen.len() / 2;
        let (_, cutoff, _) = seen.select_nth_unstable(middle);
        let cutoff = *cutoff;
        self.buckets.retain(|_, b| b.last > cutoff);
    }
}

/// The tokens `bucket` holds at `now`.
fn refilled(bucket: &Bucket, now: Instant, per_sec: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
    (bucket.tokens + elapsed * per_sec).min(burst)
}

/// `rpc.requests_per_sec_per_ip`, shared by every connection of the server.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    table: Mutex<RateTable>,
}

impl RateLimiter {
    /// A limit of `per_sec` requests per second per client address; `None` for 0
    /// (unlimited).
    pub fn new(per_sec: u32) -> Option<RateLimiter> {
        (per_sec > 0).then(|| RateLimiter {
            per_sec,
            table: Mutex::new(RateTable::new(per_sec, MAX_TRACKED_IPS)),
        })
    }

    /// The configured rate.
    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }

    /// Takes one request's token for `ip`; `Err(wait)` (how long until the next one) when
    /// it has none.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.take(ip, 1, now) {
            Ok(())
        } else {
            Err(table.wait_time(ip, now))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn a_client_gets_a_burst_of_one_second_then_the_rate() {
        let mut table = RateTable::new(5, 100);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(table.take(ip(1), 1, t0), "request {i} of the burst");
        }
        assert!(!table.take(ip(1), 1, t0), "the sixth in the same instant");
        assert_eq!(table.wait_time(ip(1), t0), Duration::from_millis(200));
        // Another address has its own bucket.
        assert!(table.take(ip(2), 1, t0));
        // 200 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(200);
        assert!(table.take(ip(1), 1, t1));
        assert!(!table.take(ip(1), 1, t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(table.take(ip(1), 1, t2));
        }
        assert!(!table.take(ip(1), 1, t2));
    }

    #[test]
    fn a_refused_take_costs_nothing() {
        let mut table = RateTable::new(3, 100);
        let t0 = Instant::now();
        assert!(!table.take(ip(1), 4, t0), "more than the burst at once");
        assert!(table.take(ip(1), 3, t0), "the whole burst is still there");
    }

    #[test]
    fn the_table_never_holds_more_than_its_capacity() {
        let mut table = RateTable::new(1, 64);
        let t0 = Instant::now();
        // 10,000 addresses, each emptying its bucket, one per microsecond.
        for n in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(n));
            assert!(table.take(ip(n), 1, now));
            assert!(table.len() <= 64, "{} buckets after {n}", table.len());
        }
        // The most recent addresses are still limited: their state was kept.
        let now = t0 + Duration::from_micros(10_000);
        assert!(!table.take(ip(9_999), 1, now));
    }

    #[test]
    fn full_buckets_are_dropped_first() {
        let mut table = RateTable::new(10, 4);
        let t0 = Instant::now();
        for n in 0..4 {
            assert!(table.take(ip(n), 10, t0));
        }
        // Two seconds later every bucket is full again: all of them may go.
        let t1 = t0 + Duration::from_secs(2);
        assert!(table.take(ip(100), 1, t1));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimiter::new(0).is_none());
        let limiter = RateLimiter::new(2).unwrap();
        assert_eq!(limiter.per_sec(), 2);
        assert!(limiter.check(ip(7)).is_ok());
        assert!(limiter.check(ip(7)).is_ok());
        let wait = limiter.check(ip(7)).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }
}
