//! What happened over the last minute, second by second: the figures the status pages
//! show (rates over the last minute and latency percentiles) without a Prometheus.
//!
//! A ring of 60 one-second slots of `N` counters; a slot is reset when its second comes
//! round again. Cheap enough for every request: one short lock.

use std::sync::{LazyLock, Mutex};
use std::time::Instant;

/// Seconds the window covers.
pub const WINDOW_SECS: u64 = 60;

static START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_sec() -> u64 {
    START.elapsed().as_secs()
}

/// `N` counters per second over the last minute.
pub struct Window<const N: usize> {
    slots: Mutex<Vec<(u64, [u64; N])>>,
}

impl<const N: usize> Default for Window<N> {
    fn default() -> Self {
        Window {
            slots: Mutex::new(vec![(u64::MAX, [0; N]); WINDOW_SECS as usize]),
        }
    }
}

impl<const N: usize> Window<N> {
    /// Adds `n` to counter `i` in the current second (an `i` out of range is ignored).
    pub fn add(&self, i: usize, n: u64) {
        if i >= N {
            return;
        }
        let sec = now_sec();
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut slots[(sec % WINDOW_SECS) as usize];
        if slot.0 != sec {
            *slot = (sec, [0; N]);
        }
        slot.1[i] += n;
    }

    /// Each counter summed over the last minute, and the seconds that covers (less than
    /// a minute right after start).
    pub fn totals(&self) -> ([u64; N], u64) {
        let sec = now_sec();
        let oldest = sec.saturating_sub(WINDOW_SECS - 1);
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sum = [0; N];
        for (at, counts) in slots.iter() {
            if *at != u64::MAX && *at >= oldest && *at <= sec {
                for (s, c) in sum.iter_mut().zip(counts) {
                    *s += c;
                }
            }
        }
        (sum, (sec - oldest + 1).min(sec + 1))
    }

    /// Each counter's rate per second over the last minute.
    pub fn rates(&self) -> [f64; N] {
        let (sum, secs) = self.totals();
        sum.map(|n| n as f64 / secs.max(1) as f64)
    }
}

/// Upper bounds, in milliseconds, of the latency buckets of [`Latencies`].
pub const LATENCY_BOUNDS_MS: [f64; 20] = [
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    75.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    f64::INFINITY,
];

/// Latencies over the last minute, bucketed; and every latency since start, bucketed the
/// same way (for the per-10-second points of [`crate::history`]).
#[derive(Default)]
pub struct Latencies(Window<20>, [std::sync::atomic::AtomicU64; 20]);

/// The `p` quantile (0..1) of bucket `counts` as the upper bound of its bucket, in ms;
/// `None` with no data.
pub fn quantile_of(counts: &[u64; 20], p: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (p * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (count, bound) in counts.iter().zip(LATENCY_BOUNDS_MS) {
        seen += count;
        if seen >= rank {
            return Some(bound);
        }
    }
    Some(f64::INFINITY)
}

impl Latencies {
    /// Records one latency.
    pub fn record(&self, seconds: f64) {
        let ms = seconds * 1000.0;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(19);
        self.0.add(i, 1);
        self.1[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `p` quantile (0..1) as the upper bound of its bucket, in ms; `None` with no data.
    pub fn quantile_ms(&self, p: f64) -> Option<f64> {
        quantile_of(&self.0.totals().0, p)
    }

    /// Every latency recorded since start, by bucket.
    pub fn since_start(&self) -> [u64; 20] {
        std::array::from_fn(|i| self.1[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    /// How many were recorded over the last minute.
    pub fn count(&self) -> u64 {
        self.0.totals().0.iter().sum()
    }
}

/// Escapes text for HTML (status pages show dead-letter reasons, which quote input).
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A status page: server-rendered, no script, refreshes itself every 5 s, readable at
/// phone width and without colour (every state is also a word).
pub fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="5">
<title>{title}</title>
<style>
body {{ font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 1rem; max-width: 46rem; color: #111; background: #fff; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin-top: 1.6rem; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35rem .5rem; border-bottom: 1px solid #bbb; vertical-align: top; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
th {{ white-space: nowrap; }}
@media (max-width: 30rem) {{ th {{ white-space: normal; overflow-wrap: anywhere; }} td.n {{ white-space: normal; }} }}
.ok {{ font-weight: bold; }} .bad {{ font-weight: bold; text-decoration: underline; }}
td {{ overflow-wrap: anywhere; }}
small {{ color: #444; }}
figure.chart {{ margin: 1rem 0 1.4rem; }} figure.chart svg.chart {{ display: block; max-width: 100%; height: auto; }}
figcaption {{ font-weight: 600; margin-bottom: .3rem; }}
ul.legend {{ list-style: none; padding: 0; margin: .3rem 0 0; display: flex; flex-wrap: wrap; gap: .2rem 1rem; font-size: .9rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
<p><small>Tables: figures over the last minute. Charts: the last hour, a point every 10 seconds since this process started. This page refreshes every 5 seconds.</small></p>
</body>
</html>
"#,
        title = html_escape(title),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_and_quantiles_pick_the_bucket() {
        let w: Window<2> = Window::default();
        w.add(0, 3);
        w.add(1, 1);
        w.add(5, 100);
        assert_eq!(w.totals().0, [3, 1]);
        let l = Latencies::default();
        for _ in 0..98 {
            l.record(0.0008);
        }
        l.record(0.040);
        l.record(0.040);
        assert_eq!(l.quantile_ms(0.5), Some(1.0));
        assert_eq!(l.quantile_ms(0.99), Some(50.0));
        assert_eq!(l.count(), 100);
        assert_eq!(Latencies::default().quantile_ms(0.5), None);
        assert_eq!(
            html_escape("<a href='x'>&"),
            "&lt;a href=&#39;x&#39;&gt;&amp;"
        );
    }
}
