//! The last hour, drawn: both status pages keep a one-hour ring of per-10-second figures
//! and draw each chart as inline SVG, server-rendered (no script, nothing from elsewhere),
//! readable at phone width and without colour (each series also has its own dash and a
//! legend line with its latest value in words).
//!
//! A binary calls [`sample_every_step`] once with a closure that reads its figures; the
//! closure runs at start and every [`STEP_SECS`] and [`History::record`]s a point per
//! chart. Counters become rates with [`Rates`].

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use crate::recent::html_escape;

/// Seconds between two points.
pub const STEP_SECS: u64 = 10;
/// Points kept: one hour.
pub const SLOTS: usize = 360;
/// The window drawn, in seconds.
pub const WINDOW_SECS: i64 = (STEP_SECS as i64) * (SLOTS as i64);

/// Stroke colours, one per series in order (distinct for common colour blindness, and
/// each paired with a dash pattern so that none relies on colour).
pub const COLOURS: [&str; 8] = [
    "#0b5fa5", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#0f766e", "#be123c", "#374151",
];
const DASHES: [&str; 8] = ["", "6 3", "2 3", "9 3 2 3", "1 2", "12 4", "4 2 1 2", "3 6"];

/// One chart: its series and their points, oldest first.
#[derive(Debug, Clone)]
pub struct Chart {
    pub id: String,
    pub title: String,
    pub unit: String,
    pub series: Vec<String>,
    /// (unix seconds, one value per series; `None` where a series had no value).
    pub points: VecDeque<(i64, Vec<Option<f64>>)>,
}

impl Chart {
    fn push(&mut self, at: i64, values: &[(String, f64)]) {
        for (name, _) in values {
            if !self.series.contains(name) {
                self.series.push(name.clone());
                for (_, vs) in &mut self.points {
                    vs.push(None);
                }
            }
        }
        let row = self
            .series
            .iter()
            .map(|s| values.iter().find(|(n, _)| n == s).map(|(_, v)| *v))
            .collect();
        self.points.push_back((at, row));
        while self.points.len() > SLOTS {
            self.points.pop_front();
        }
    }

    /// The chart as a `<figure>`: an inline SVG line chart of the last hour up to `now`
    /// (unix seconds), and a legend with each series' latest value.
    pub fn html(&self, now: i64) -> String {
        const W: f64 = 600.0;
        const H: f64 = 160.0;
        const LEFT: f64 = 48.0;
        const TOP: f64 = 8.0;
        const BOTTOM: f64 = 20.0;
        let plot_w = W - LEFT - 8.0;
        let plot_h = H - TOP - BOTTOM;
        let from = now - WINDOW_SECS;
        let max = self
            .points
            .iter()
            .flat_map(|(_, vs)| vs.iter().flatten())
            .fold(0.0_f64, |m, v| if v.is_finite() { m.max(*v) } else { m });
        // All zero (an idle hour): an axis up to 1, not a microscopic one.
        let top = nice_ceiling(max);
        let x = |t: i64| LEFT + plot_w * ((t - from) as f64 / WINDOW_SECS as f64).clamp(0.0, 1.0);
        let y = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-labelledby="chart-{id}-title" class="chart" xmlns="http://www.w3.org/2000/svg">"##,
            id = self.id
        );
        // Frame, gridlines and labels: 0, half and the top; an hour ago, half an hour, now.
        for (frac, label) in [
            (0.0, "0".to_owned()),
            (0.5, short(top / 2.0)),
            (1.0, short(top)),
        ] {
            let gy = TOP + plot_h * (1.0 - frac);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{x2}" y1="{gy}" y2="{gy}" stroke="#d4d4d4" stroke-width="1"/><text x="{tx}" y="{ty}" font-size="11" text-anchor="end" fill="#333">{label}</text>"##,
                x2 = LEFT + plot_w,
                tx = LEFT - 4.0,
                ty = gy + 4.0,
            );
        }
        for (frac, label, anchor) in [
            (0.0, "−60 min", "start"),
            (0.5, "−30 min", "middle"),
            (1.0, "now", "end"),
        ] {
            let _ = write!(
                svg,
                r##"<text x="{tx}" y="{ty}" font-size="11" text-anchor="{anchor}" fill="#333">{label}</text>"##,
                tx = LEFT + plot_w * frac,
                ty = H - 4.0,
            );
        }
        for (i, name) in self.series.iter().enumerate() {
            let mut d = String::new();
            let mut pen_down = false;
            let mut drawn = 0;
            let mut last = None;
            for (t, vs) in &self.points {
                match vs.get(i).copied().flatten().filter(|v| v.is_finite()) {
                    Some(v) => {
                        let _ = write!(
                            d,
                            "{}{:.1} {:.1} ",
                            if pen_down { "L" } else { "M" },
                            x(*t),
                            y(v)
                        );
                        pen_down = true;
                        drawn += 1;
                        last = Some((x(*t), y(v)));
                    }
                    None => pen_down = false,
                }
            }
            if drawn == 1 {
                // A lone point: a short tick, so that it shows.
                d.push_str("h 3");
            }
            // The latest point marked: a process younger than the hour has its figures at
            // the right edge, a few pixels wide without it.
            let name = html_escape(name);
            let _ = write!(
                svg,
                r##"<g data-series="{name}"><path d="{d}" fill="none" stroke="{c}" stroke-width="2" stroke-dasharray="{dash}" stroke-linejoin="round" vector-effect="non-scaling-stroke"/>"##,
                d = d.trim_end(),
                c = COLOURS[i % COLOURS.len()],
                dash = DASHES[i % DASHES.len()],
            );
            if let Some((lx, ly)) = last {
                let _ = write!(
                    svg,
                    r##"<circle cx="{lx:.1}" cy="{ly:.1}" r="4" fill="{c}"/>"##,
                    c = COLOURS[i % COLOURS.len()],
                );
            }
            svg.push_str("</g>");
        }
        svg.push_str("</svg>");
        let mut legend = String::new();
        for (i, name) in self.series.iter().enumerate() {
            let last = self
                .points
                .iter()
                .rev()
                .find_map(|(_, vs)| vs.get(i).copied().flatten());
            let _ = write!(
                legend,
                r##"<li><svg width="28" height="8" aria-hidden="true"><line x1="0" x2="28" y1="4" y2="4" stroke="{c}" stroke-width="3" stroke-dasharray="{dash}"/></svg> {name}: {value}</li>"##,
                c = COLOURS[i % COLOURS.len()],
                dash = DASHES[i % DASHES.len()],
                name = html_escape(name),
                value = last.map_or_else(
                    || "no value yet".to_owned(),
                    |v| format!("{} {}", short(v), html_escape(&self.unit))
                ),
            );
        }
        format!(
            r##"<figure class="chart" id="chart-{id}" data-series-count="{n}">
<figcaption id="chart-{id}-title">{title} <small>({unit}, last hour, one point per {STEP_SECS} s)</small></figcaption>
{svg}
<ul class="legend">{legend}</ul>
</figure>
"##,
            id = self.id,
            n = self.series.len(),
            title = html_escape(&self.title),
            unit = html_escape(&self.unit),
        )
    }
}

/// A round ceiling for the vertical axis: 1, 2 or 5 times a power of ten.
fn nice_ceiling(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= max)
        .unwrap_or(10.0 * p)
}

/// A figure in few characters: 0.25, 3.5, 120, 4.2k, 1.3M.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The charts of one process, in the order they were first recorded.
#[derive(Default)]
pub struct History {
    charts: Mutex<Vec<Chart>>,
}

impl History {
    /// Adds a point at `at` (unix seconds) to the chart `id`, made on first use with
    /// `title` and `unit`. A series seen for the first time is added (its past empty).
    pub fn record(&self, id: &str, title: &str, unit: &str, at: i64, values: &[(String, f64)]) {
        let mut charts = self
            .charts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = charts.iter_mut().find(|c| c.id == id) {
            c.push(at, values);
        } else {
            let mut c = Chart {
                id: id.to_owned(),
                title: title.to_owned(),
                unit: unit.to_owned(),
                series: Vec::new(),
                points: VecDeque::with_capacity(SLOTS),
            };
            c.push(at, values);
            charts.push(c);
        }
    }

    /// Every chart, drawn up to now; a note when nothing was recorded yet.
    pub fn html(&self) -> String {
        let charts = self
            .charts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if charts.is_empty() {
            return "<p>No figures yet: the first point is taken as the process starts.</p>\n"
                .into();
        }
        let now = chrono::Utc::now().timestamp();
        charts.iter().map(|c| c.html(now)).collect()
    }

    /// A copy of the charts (for tests).
    pub fn charts(&self) -> Vec<Chart> {
        self.charts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Turns running totals into per-second rates between two samples.
#[derive(Default)]
pub struct Rates {
    last: Mutex<HashMap<String, (i64, u64)>>,
}

impl Rates {
    /// The rate of `key`'s `total` since its previous sample; `None` on the first one.
    pub fn rate(&self, key: &str, at: i64, total: u64) -> Option<f64> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = last.insert(key.to_owned(), (at, total));
        let (t0, v0) = previous?;
        let secs = (at - t0).max(1) as f64;
        Some(total.saturating_sub(v0) as f64 / secs)
    }
}

/// Runs `sample` now and every [`STEP_SECS`] with the unix time, in a task of its own,
/// for the life of the process. Call it inside the Tokio runtime.
pub fn sample_every_step<F, Fut>(mut sample: F)
where
    F: FnMut(i64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(STEP_SECS));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            every.tick().await;
            sample(chrono::Utc::now().timestamp()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(n, x)| ((*n).to_owned(), *x)).collect()
    }

    #[test]
    fn a_chart_keeps_an_hour_and_draws_a_path_per_series() {
        let h = History::default();
        let start = 1_000_000;
        for i in 0..(SLOTS as i64 + 20) {
            let mut values = v(&[("201", 10.0 + i as f64)]);
            if i >= 100 {
                values.extend(v(&[("503", 1.0)]));
            }
            h.record(
                "requests",
                "Requests per second",
                "req/s",
                start + i * 10,
                &values,
            );
        }
        let c = &h.charts()[0];
        assert_eq!(c.points.len(), SLOTS, "the ring keeps one hour");
        assert_eq!(c.series, ["201", "503"]);
        let html = c.html(start + (SLOTS as i64 + 19) * 10);
        assert_eq!(html.matches("<path d=\"M").count(), 2, "{html}");
        assert!(html.contains("data-series-count=\"2\""));
        assert!(html.contains("503: 1.0 req/s"), "{html}");
        assert!(!html.contains("NaN"), "{html}");
    }

    #[test]
    fn a_gap_lifts_the_pen_and_a_lone_point_still_shows() {
        let h = History::default();
        h.record("x", "X", "u", 100, &v(&[("a", 1.0)]));
        h.record("x", "X", "u", 110, &v(&[("b", 2.0)]));
        h.record("x", "X", "u", 120, &v(&[("a", 3.0)]));
        let html = h.charts()[0].html(130);
        // Series a: two separate strokes (a gap at 110); series b: one point, a tick.
        let a = html.split("data-series=\"a\"").nth(1).unwrap();
        let a_path = &a[..a.find("</g>").unwrap()];
        assert_eq!(a_path.matches('M').count(), 2, "{a_path}");
        assert!(html.contains("h 3\""), "{html}");
    }

    #[test]
    fn names_are_escaped_and_the_axis_is_round() {
        let h = History::default();
        h.record("x", "<b>", "u", 100, &v(&[("<script>", 73.0)]));
        let html = h.html();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert_eq!(nice_ceiling(73.0), 100.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
        assert_eq!(nice_ceiling(1.0), 1.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }

    #[test]
    fn rates_come_from_totals_between_samples() {
        let r = Rates::default();
        assert_eq!(r.rate("a", 100, 50), None);
        assert_eq!(r.rate("a", 110, 150), Some(10.0));
        // A restarted counter reads as 0, never as a negative rate.
        assert_eq!(r.rate("a", 120, 5), Some(0.0));
    }
}
