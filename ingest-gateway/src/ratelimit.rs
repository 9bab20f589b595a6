//! Per-key token-bucket rate limiting.
//!
//! Off unless configured (the API document promises no hard limit). A small hand-written
//! bucket rather than a crate: the gateway needs the remaining count and the exact wait for
//! its `RateLimit-*` and `Retry-After` headers, which is a dozen lines here.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// Token buckets keyed by API key id.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// The outcome of taking one token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Allowed, with this many whole tokens left.
    Allow { remaining: u64 },
    /// Refused; a token is back after this long.
    Deny { retry_after: Duration },
}

impl RateLimiter {
    /// `per_sec` tokens refill each second, up to `burst`.
    pub fn new(per_sec: f64, burst: u32) -> Self {
        RateLimiter {
            per_sec,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The configured burst, for the `RateLimit-Limit` header.
    pub fn limit(&self) -> u64 {
        self.burst as u64
    }

    /// Takes one token from `key`'s bucket at time `now`.
    pub fn check(&self, key: &str, now: Instant) -> Decision {
        let mut buckets = self
            .buckets
            .lock()
            .expect("rate limiter lock is never held across a panic");
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Decision::Allow {
                remaining: bucket.tokens as u64,
            }
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_sec;
            Decision::Deny {
                retry_after: Duration::from_secs_f64(wait),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        for left in [2, 1, 0] {
            assert_eq!(rl.check("k", t0), Decision::Allow { remaining: left });
        }
        let Decision::Deny { retry_after } = rl.check("k", t0) else {
            panic!("fourth request inside the burst must be refused");
        };
        assert!((retry_after.as_secs_f64() - 0.5).abs() < 1e-6);
        // Other keys have their own bucket.
        assert!(matches!(rl.check("other", t0), Decision::Allow { .. }));
        // Half a second later one token is back.
        assert!(matches!(
            rl.check("k", t0 + Duration::from_millis(500)),
            Decision::Allow { .. }
        ));
    }
}
