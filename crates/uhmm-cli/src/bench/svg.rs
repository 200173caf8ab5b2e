//! Plain SVG charts, written by hand (two chart kinds do not justify a
//! plotting dependency): a curve of values against sizes on a log2 axis, and
//! a latency histogram.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const BOTTOM: f64 = 48.0;
const TOP: f64 = 32.0;
const RIGHT: f64 = 16.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// One curve: a name and (x, y) points with x > 0.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn header(out: &mut String, title: &str) {
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<text x="{x}" y="18" text-anchor="middle" font-size="13">{title}</text>
"#,
        x = W / 2.0,
        title = escape(title)
    );
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn size_label(bytes: f64) -> String {
    let b = bytes as u64;
    if b >= 1 << 30 {
        format!("{}G", b >> 30)
    } else if b >= 1 << 20 {
        format!("{}M", b >> 20)
    } else {
        format!("{}K", b >> 10)
    }
}

/// A chart of `series` against sizes in bytes (log2 x axis).
pub fn curve(title: &str, y_label: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in pts {
        x0 = x0.min(x.log2());
        x1 = x1.max(x.log2());
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let px = |x: f64| LEFT + (x.log2() - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y1 * (H - BOTTOM - TOP);
    let mut out = String::new();
    header(&mut out, title);
    axes(&mut out, y_label, "size", y1);
    let mut e = x0.ceil() as i32;
    while f64::from(e) <= x1 {
        let x = px(2f64.powi(e));
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            H - BOTTOM + 14.0,
            size_label(2f64.powi(e))
        );
        e += 1;
    }
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for &(x, y) in &s.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                px(x),
                py(y)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
            LEFT + 10.0,
            TOP + 14.0 + 14.0 * i as f64,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A histogram of latencies (ns), in `buckets` log-spaced bins.
pub fn histogram(title: &str, samples_ns: &[f64], buckets: usize) -> String {
    let mut out = String::new();
    header(&mut out, title);
    let (lo, hi) = samples_ns
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = (lo.max(1.0).log10(), hi.max(lo.max(1.0) * 1.01).log10());
    let mut counts = vec![0usize; buckets.max(1)];
    for &v in samples_ns {
        let f = (v.max(1.0).log10() - lo) / (hi - lo);
        let i = ((f * counts.len() as f64) as usize).min(counts.len() - 1);
        counts[i] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    axes(&mut out, "samples", "latency (ns, log scale)", max);
    let bw = (W - LEFT - RIGHT) / counts.len() as f64;
    for (i, &c) in counts.iter().enumerate() {
        let h = c as f64 / max * (H - BOTTOM - TOP);
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"/>"#,
            LEFT + i as f64 * bw + 1.0,
            H - BOTTOM - h,
            (bw - 2.0).max(1.0),
            COLORS[0]
        );
    }
    for k in 0..=4 {
        let v = 10f64.powf(lo + (hi - lo) * f64::from(k) / 4.0);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{v:.0}</text>"#,
            LEFT + (W - LEFT - RIGHT) * f64::from(k) / 4.0,
            H - BOTTOM + 14.0
        );
    }
    out.push_str("</svg>\n");
    out
}

fn axes(out: &mut String, y_label: &str, x_label: &str, y_max: f64) {
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="black"/>
<line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<text x="14" y="{m}" transform="rotate(-90 14 {m})" text-anchor="middle">{y}</text>
<text x="{c}" y="{xl}" text-anchor="middle">{x}</text>"#,
        b = H - BOTTOM,
        r = W - RIGHT,
        m = (H - BOTTOM + TOP) / 2.0,
        c = (W + LEFT) / 2.0,
        xl = H - 8.0,
        y = escape(y_label),
        x = escape(x_label)
    );
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let y = H - BOTTOM - (H - BOTTOM - TOP) * f64::from(k) / 4.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 4.0,
            y + 4.0,
            if v >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let s = Series {
            name: "a<b".into(),
            points: vec![(4096.0, 1.0), (1048576.0, 3.0)],
        };
        let c = curve("t", "GB/s", &[s]);
        assert!(c.starts_with("<svg") && c.trim_end().ends_with("</svg>"));
        assert!(c.contains("a&lt;b") && c.contains("<polyline") && c.contains(">1M<"));
        let h = histogram("h", &[100.0, 200.0, 200.0, 5000.0], 8);
        assert_eq!(h.matches("<rect").count(), 1 + 8);
    }
}
