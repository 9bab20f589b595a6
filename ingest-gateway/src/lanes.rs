//! Which lane a company's records take: the main lane, or the overflow lane when the
//! company's rate outruns its share (or an operator put it there).
//!
//! Detection is a token bucket per company, the way PostHog's capture finds hot keys:
//! `OVERFLOW_RATE` records a second refill it, up to `OVERFLOW_BURST`. A request whose
//! records the bucket cannot cover sends the company to the overflow lane, and it stays
//! there until it has gone `OVERFLOW_STICKY_SECS` without exceeding its rate (hysteresis:
//! a company at twice its rate is then wholly in the overflow lane, instead of
//! alternating request by request, and the lane's membership is something an operator
//! can read). `OVERFLOW_COMPANIES` puts companies there for good. The company still gets
//! its 201s: a lane decides where a record waits to be stored, never whether it is
//! taken. Both lanes are subjects of one stream, so the merge's order (stream sequence)
//! holds across a switch.
//!
//! The buckets are per gateway: with N gateways behind a balancer a company's share is
//! about N × `OVERFLOW_RATE`. The map holds one entry per company that posted in the last
//! minute; companies come from authenticated keys, so it is bounded by the key count.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use callcap::subjects::Lane;
use uuid::Uuid;

/// Entries idle this long are dropped (a full bucket and no stickiness left by then).
const IDLE_ENTRY: Duration = Duration::from_secs(60);

struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// In the overflow lane until then.
    overflow_until: Option<Instant>,
    /// Records routed to the overflow lane since the company entered it.
    overflowed: u64,
    seen: Instant,
}

/// The lane chooser every request consults.
pub struct Lanes {
    /// Records a second of a company's share; 0 turns detection off.
    rate: f64,
    burst: f64,
    sticky: Duration,
    forced: HashSet<Uuid>,
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

/// A company in the overflow lane, for the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Overflowing {
    pub company_id: Uuid,
    /// Put there by `OVERFLOW_COMPANIES` rather than by its rate.
    pub forced: bool,
    /// Seconds until it returns to the main lane unless it exceeds its rate again.
    #[schema(nullable)]
    pub leaves_in_secs: Option<f64>,
    /// Records this gateway sent to the overflow lane since the company entered it.
    pub records: u64,
}

impl Lanes {
    /// `rate` records a second per company (0: no detection), `burst` records above it at
    /// once, `sticky` how long a company stays after it last exceeded its rate.
    pub fn new(rate: f64, burst: u32, sticky: Duration, forced: HashSet<Uuid>) -> Self {
        Lanes {
            rate,
            burst: f64::from(burst.max(1)),
            sticky,
            forced,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The lane for `records` of `company` arriving at `now`.
    pub fn route(&self, company: Uuid, records: usize, now: Instant) -> Lane {
        let lane = self.decide(company, records, now);
        metrics::counter!("gateway_lane_records_total", "lane" => lane.as_str())
            .increment(records as u64);
        lane
    }

    fn decide(&self, company: Uuid, records: usize, now: Instant) -> Lane {
        if self.forced.contains(&company) {
            return Lane::Overflow;
        }
        if self.rate <= 0.0 {
            return Lane::Main;
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() > 1024 && !buckets.contains_key(&company) {
            buckets.retain(|_, b| now.saturating_duration_since(b.seen) < IDLE_ENTRY);
        }
        let b = buckets.entry(company).or_insert(Bucket {
            tokens: self.burst,
            refilled: now,
            overflow_until: None,
            overflowed: 0,
            seen: now,
        });
        let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.refilled = now;
        b.seen = now;
        let wanted = records as f64;
        if b.tokens >= wanted {
            b.tokens -= wanted;
        } else {
            // Over its share: what the bucket holds is spent, and the company moves (or
            // stays) for another `sticky`.
            b.tokens = 0.0;
            if b.overflow_until.is_none_or(|t| t <= now) {
                b.overflowed = 0;
                tracing::warn!(
                    company_id = %company,
                    rate = self.rate,
                    burst = self.burst,
                    "company over its share (OVERFLOW_RATE): its records take the overflow lane"
                );
            }
            b.overflow_until = Some(now + self.sticky);
        }
        match b.overflow_until {
            Some(t) if t > now => {
                b.overflowed += records as u64;
                Lane::Overflow
            }
            _ => Lane::Main,
        }
    }

    /// The companies in the overflow lane now (forced ones first), at most `limit`, and how
    /// many there are in all.
    pub fn overflowing(&self, now: Instant, limit: usize) -> (Vec<Overflowing>, usize) {
        let mut out: Vec<Overflowing> = self
            .forced
            .iter()
            .map(|c| Overflowing {
                company_id: *c,
                forced: true,
                leaves_in_secs: None,
                records: 0,
            })
            .collect();
        out.sort_by_key(|o| o.company_id);
        let buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut hot: Vec<Overflowing> = buckets
            .iter()
            .filter(|(c, _)| !self.forced.contains(c))
            .filter_map(|(c, b)| {
                let until = b.overflow_until.filter(|t| *t > now)?;
                Some(Overflowing {
                    company_id: *c,
                    forced: false,
                    leaves_in_secs: Some(until.duration_since(now).as_secs_f64()),
                    records: b.overflowed,
                })
            })
            .collect();
        hot.sort_by_key(|o| std::cmp::Reverse(o.records));
        out.extend(hot);
        let total = out.len();
        out.truncate(limit);
        (out, total)
    }

    /// Sets `gateway_overflow_companies` (a count, no company label: bounded series).
    pub fn report(&self, now: Instant) {
        let (_, total) = self.overflowing(now, 0);
        metrics::gauge!("gateway_overflow_companies").set(total as f64);
    }
}

/// Registers the `# HELP` text of the lane metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_lane_records_total",
        "Records published, by lane (main, overflow)"
    );
    metrics::describe_gauge!(
        "gateway_overflow_companies",
        "Companies whose records take the overflow lane now (over OVERFLOW_RATE, or in OVERFLOW_COMPANIES)"
    );
    for lane in Lane::ALL {
        metrics::counter!("gateway_lane_records_total", "lane" => lane.as_str()).absolute(0);
    }
    metrics::gauge!("gateway_overflow_companies").set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_company_within_its_share_stays_in_the_main_lane() {
        let lanes = Lanes::new(100.0, 50, Duration::from_secs(5), HashSet::new());
        let c = Uuid::from_u128(1);
        let t0 = Instant::now();
        // 10 records every 100 ms = exactly the rate, for 10 s.
        for i in 0..100 {
            assert_eq!(
                lanes.decide(c, 10, at(t0, i * 100)),
                Lane::Main,
                "request {i}"
            );
        }
        assert_eq!(lanes.overflowing(at(t0, 10_000), 10).1, 0);
    }

    #[test]
    fn a_company_over_its_share_moves_stays_while_hot_and_returns_after_the_sticky_time() {
        let lanes = Lanes::new(100.0, 50, Duration::from_secs(5), HashSet::new());
        let hot = Uuid::from_u128(1);
        let quiet = Uuid::from_u128(2);
        let t0 = Instant::now();
        // The burst is covered: 50 records at once.
        assert_eq!(lanes.decide(hot, 50, t0), Lane::Main);
        // Twice its rate from then on: over its share at once, and in the overflow lane
        // for every request while it stays hot (no alternating).
        let mut ms = 0;
        for _ in 0..50 {
            ms += 100;
            assert_eq!(lanes.decide(hot, 20, at(t0, ms)), Lane::Overflow);
            // Another company is not affected.
            assert_eq!(lanes.decide(quiet, 1, at(t0, ms)), Lane::Main);
        }
        let (now_in, total) = lanes.overflowing(at(t0, ms), 10);
        assert_eq!(total, 1);
        assert_eq!(now_in[0].company_id, hot);
        assert!(!now_in[0].forced);
        assert_eq!(now_in[0].records, 50 * 20);
        // Within its rate again: still in the lane until 5 s after it last exceeded it.
        ms += 1000;
        assert_eq!(lanes.decide(hot, 10, at(t0, ms)), Lane::Overflow);
        ms += 4100;
        assert_eq!(lanes.decide(hot, 10, at(t0, ms)), Lane::Main);
        assert_eq!(lanes.overflowing(at(t0, ms), 10).1, 0);
    }

    #[test]
    fn forced_companies_always_take_the_overflow_lane_and_are_listed_first() {
        let forced = Uuid::from_u128(7);
        let lanes = Lanes::new(0.0, 1, Duration::from_secs(5), HashSet::from([forced]));
        let t0 = Instant::now();
        assert_eq!(lanes.decide(forced, 1, t0), Lane::Overflow);
        // Detection off (rate 0): everybody else stays in the main lane.
        assert_eq!(lanes.decide(Uuid::from_u128(8), 1_000_000, t0), Lane::Main);
        let (list, total) = lanes.overflowing(t0, 10);
        assert_eq!(total, 1);
        assert!(list[0].forced);
        assert_eq!(list[0].company_id, forced);
    }

    #[test]
    fn the_list_is_bounded_and_idle_companies_are_forgotten() {
        let lanes = Lanes::new(1.0, 1, Duration::from_secs(1), HashSet::new());
        let t0 = Instant::now();
        for i in 0..2000u128 {
            lanes.decide(Uuid::from_u128(i), 5, t0);
        }
        let (list, total) = lanes.overflowing(t0, 20);
        assert_eq!((list.len(), total), (20, 2000));
        // A minute later a new company's first request sweeps the idle entries.
        lanes.decide(Uuid::from_u128(99_999), 1, at(t0, 61_000));
        assert_eq!(lanes.buckets.lock().unwrap().len(), 1);
    }
}
