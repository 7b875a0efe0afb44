//! Small hand-written SVG charts for `cpr-bench --plots` (no fonts, no dependencies: text is left
//! to whatever renders the SVG).
//!
//! * [`range_chart`]: one line per series through the medians of categories (e.g. guest RAM
//!   sizes), with min–max bars;
//! * [`line_chart`]: points joined by lines (e.g. heartbeat gap against time).

use std::fmt::Write;

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 270.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 55.0;

/// Colours for the series, in order.
pub const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// One series of a [`range_chart`]: per category, `(min, median, max)` or nothing.
#[derive(Debug, Clone)]
pub struct RangeSeries {
    /// Legend text.
    pub name: String,
    /// One entry per category.
    pub points: Vec<Option<(f64, f64, f64)>>,
}

/// One series of a [`line_chart`].
#[derive(Debug, Clone)]
pub struct LineSeries {
    /// Legend text.
    pub name: String,
    /// `(x, y)` in order of x.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A step of 1, 2 or 5 × 10^k giving about `n` ticks over `[0, max]`.
fn nice_step(span: f64, n: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// Ticks from `lo` to at least `hi`: `(values, step)`.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
    let step = nice_step(hi - lo, 6.0);
    let start = (lo / step).floor() * step;
    let mut v = Vec::new();
    let mut t = start;
    while t < hi + step * 0.999 {
        v.push(t);
        t += step;
        if v.len() > 50 {
            break;
        }
    }
    (v, step)
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else {
        let digits = (-step.log10().floor()) as usize;
        format!("{v:.digits$}")
    }
}

struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT - BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)
    }
}

fn header(out: &mut String, title: &str, x_label: &str, y_label: &str) {
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 12.0,
        esc(x_label)
    );
    let cy = (TOP + HEIGHT - BOTTOM) / 2.0;
    let _ = writeln!(
        out,
        r#"<text x="16" y="{cy}" text-anchor="middle" transform="rotate(-90 16 {cy})">{}</text>"#,
        esc(y_label)
    );
}

fn y_axis(out: &mut String, f: &Frame, ticks: &[f64], step: f64) {
    for &t in ticks {
        let y = f.py(t);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>",
            WIDTH - RIGHT
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(t, step)
        );
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        WIDTH - LEFT - RIGHT,
        HEIGHT - TOP - BOTTOM
    );
}

fn legend(out: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + 20.0 * i as f64;
        let x = WIDTH - RIGHT + 12.0;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r#"<line x1="{x}" x2="{}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"/>"#,
            x + 18.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            y + 4.0,
            esc(name)
        );
    }
}

fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let max = values.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    (0.0, if max > 0.0 { max * 1.05 } else { 1.0 })
}

/// Medians joined by lines with min–max bars, one column per category.
pub fn range_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    categories: &[String],
    series: &[RangeSeries],
) -> String {
    let mut out = String::new();
    header(&mut out, title, x_label, y_label);
    let (lo, hi) = y_range(
        series
            .iter()
            .flat_map(|s| s.points.iter().flatten().map(|p| p.2)),
    );
    let (yt, step) = ticks(lo, hi);
    let f = Frame {
        x0: -0.5,
        x1: categories.len().max(1) as f64 - 0.5,
        y0: lo,
        y1: yt.last().copied().unwrap_or(hi).max(hi),
    };
    y_axis(&mut out, &f, &yt, step);
    for (i, c) in categories.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            f.px(i as f64),
            HEIGHT - BOTTOM + 18.0,
            esc(c)
        );
    }
    let n = series.len().max(1) as f64;
    for (k, s) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        // Side by side within a category so that the bars do not hide each other.
        let dx = (k as f64 - (n - 1.0) / 2.0) * 0.08;
        let mut path = String::new();
        for (i, p) in s.points.iter().enumerate() {
            let Some((min, med, max)) = *p else { continue };
            let x = f.px(i as f64 + dx);
            let _ = writeln!(
                out,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="1.5"/>"#,
                f.py(min),
                f.py(max)
            );
            for v in [min, max] {
                let _ = writeln!(
                    out,
                    r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="1.5"/>"#,
                    x - 5.0,
                    x + 5.0,
                    f.py(v),
                    f.py(v)
                );
            }
            let _ = writeln!(
                out,
                r#"<circle cx="{x:.1}" cy="{:.1}" r="4" fill="{c}"><title>{}: min {min} median {med} max {max}</title></circle>"#,
                f.py(med),
                esc(&s.name)
            );
            let _ = write!(
                path,
                "{}{x:.1},{:.1}",
                if path.is_empty() { "M" } else { " L" },
                f.py(med)
            );
        }
        if !path.is_empty() {
            let _ = writeln!(
                out,
                r#"<path d="{path}" fill="none" stroke="{c}" stroke-width="2"/>"#
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// Points joined by lines, x and y linear.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[LineSeries]) -> String {
    let mut out = String::new();
    header(&mut out, title, x_label, y_label);
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = (
        xs().filter(|v| v.is_finite()).fold(f64::INFINITY, f64::min),
        xs().filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max),
    );
    let (x0, x1) = if x0 < x1 { (x0, x1) } else { (0.0, 1.0) };
    let (lo, hi) = y_range(series.iter().flat_map(|s| s.points.iter().map(|p| p.1)));
    let (yt, ystep) = ticks(lo, hi);
    let (xt, xstep) = ticks(x0, x1);
    let f = Frame {
        x0: xt.first().copied().unwrap_or(x0).min(x0),
        x1: xt.last().copied().unwrap_or(x1).max(x1),
        y0: lo,
        y1: yt.last().copied().unwrap_or(hi).max(hi),
    };
    y_axis(&mut out, &f, &yt, ystep);
    for &t in &xt {
        let x = f.px(t);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{}\" stroke=\"#eee\"/>",
            HEIGHT - BOTTOM
        );
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            HEIGHT - BOTTOM + 18.0,
            fmt_tick(t, xstep)
        );
    }
    for (k, s) in series.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let mut path = String::new();
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let _ = write!(
                path,
                "{}{:.1},{:.1}",
                if path.is_empty() { "M" } else { " L" },
                f.px(x),
                f.py(y)
            );
        }
        if !path.is_empty() {
            let _ = writeln!(
                out,
                r#"<path d="{path}" fill="none" stroke="{c}" stroke-width="1.2"/>"#
            );
        }
    }
    let names: Vec<&str> = series.iter().map(|s| s.name.as_str()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(nice_step(0.6, 6.0), 0.1);
        let (t, s) = ticks(0.0, 9.3);
        assert_eq!(s, 2.0);
        assert_eq!(t.first(), Some(&0.0));
        assert!(*t.last().unwrap() >= 9.3);
        assert_eq!(fmt_tick(0.30000000000000004, 0.1), "0.3");
    }

    #[test]
    fn charts_are_svg_with_every_series() {
        let r = range_chart(
            "Blackout <cpr-exec>",
            "guest RAM",
            "ms",
            &["256M".into(), "1G".into()],
            &[
                RangeSeries {
                    name: "vmmd".into(),
                    points: vec![Some((4.0, 5.0, 9.0)), Some((4.5, 5.5, 8.0))],
                },
                RangeSeries {
                    name: "QEMU".into(),
                    points: vec![None, Some((3.0, 4.0, 5.0))],
                },
            ],
        );
        assert!(r.starts_with("<svg") && r.ends_with("</svg>\n"));
        assert!(r.contains("&lt;cpr-exec&gt;"));
        assert_eq!(r.matches("<circle").count(), 3);
        assert_eq!(r.matches("<path").count(), 2);
        let l = line_chart(
            "gaps",
            "ms",
            "gap (ms)",
            &[LineSeries {
                name: "vmmd".into(),
                points: vec![(-10.0, 1.0), (0.0, 6.0), (1.0, 1.0), (f64::NAN, 1.0)],
            }],
        );
        assert!(l.contains("<path d=\"M"));
        assert_eq!(l.matches(" L").count(), 2);
    }
}
