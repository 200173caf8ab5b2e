//! Timing and summaries: every figure is a median (and p99) of repeated
//! runs taken after a warm-up pass, with the baseline measured in the same
//! run, interleaved with the case it is compared to.

use std::time::{Duration, Instant};

/// What a row measures, and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds per 4 KiB page (lower is better).
    NsPerPage,
    /// Gigabytes (10^9 bytes) per second (higher is better).
    GBps,
    /// Millions of pages per second (higher is better).
    MPagesPerSec,
    /// Bytes of metadata per managed page (lower is better).
    BytesPerPage,
    /// A count per fault (lower is better).
    PerFault,
}

impl Unit {
    pub fn name(self) -> &'static str {
        match self {
            Unit::NsPerPage => "ns/page",
            Unit::GBps => "GB/s",
            Unit::MPagesPerSec => "Mpages/s",
            Unit::BytesPerPage => "B/page",
            Unit::PerFault => "per fault",
        }
    }
}

/// Median and 99th percentile of a set of samples (in the row's unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(mut samples: Vec<f64>) -> Summary {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |q: f64| {
            if n == 0 {
                f64::NAN
            } else {
                samples[((n - 1) as f64 * q).round() as usize]
            }
        };
        Summary {
            p50: at(0.5),
            p99: at(0.99),
            n,
        }
    }

    pub fn single(v: f64) -> Summary {
        Summary {
            p50: v,
            p99: v,
            n: 1,
        }
    }
}

/// Runs `f` once and returns how long it took.
pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

/// Converts a duration over `bytes` into the unit.
pub fn rate(unit: Unit, d: Duration, bytes: usize) -> f64 {
    let s = d.as_secs_f64().max(1e-12);
    let pages = (bytes / uhmm::PAGE_SIZE) as f64;
    match unit {
        Unit::NsPerPage => s * 1e9 / pages,
        Unit::GBps => bytes as f64 / s / 1e9,
        Unit::MPagesPerSec => pages / s / 1e6,
        Unit::BytesPerPage | Unit::PerFault => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let s = Summary::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((s.p50, s.p99, s.n), (51.0, 99.0, 100));
        assert_eq!(Summary::of(vec![3.0]).p99, 3.0);
    }
}
