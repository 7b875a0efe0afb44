//! Brownout: after a VM resumes, how long until the guest runs as fast as before.
//!
//! Two rates are compared with the same rate measured just before the update (the baseline):
//!
//! * the **heartbeat rate**: heartbeat bytes per second on the console, in windows of
//!   [`Brownout::window`] slid by [`Brownout::step`] from the resume on;
//! * the **memory-sweep rate**: the guest's work-loop iterations per second (the sum of the
//!   `COUNTERS` line's `iters` over the vCPUs: each iteration mutates the vCPU's arena and keeps
//!   FPU/SSE/AVX registers live), between consecutive `c` answers polled at a fixed interval.
//!
//! The brownout ends at the start of the first window (or polling interval) whose rate is within
//! [`Brownout::tolerance`] (10 %) of the baseline, both ways, *and* stays there for the next
//! window (interval) too: one lucky window amid slow ones does not end it. It is measured from
//! the resume, the first heartbeat after the blackout. `None` when the rate never came back before
//! the data ran out.

use std::time::{Duration, Instant};

use serde::Serialize;

/// How the brownout is judged.
#[derive(Debug, Clone, Copy)]
pub struct Brownout {
    /// Heartbeat-rate window.
    pub window: Duration,
    /// How far consecutive heartbeat windows are apart.
    pub step: Duration,
    /// Relative distance from the baseline that counts as back (0.1 = within 10 %).
    pub tolerance: f64,
}

impl Default for Brownout {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(100),
            step: Duration::from_millis(5),
            tolerance: 0.1,
        }
    }
}

/// One `COUNTERS` answer: when it arrived and the iterations summed over the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepSample {
    /// When the answer arrived (host monotonic clock).
    pub at: Instant,
    /// Sum of `iters` over the vCPUs.
    pub iters: u64,
}

/// One update's brownout figures, in milliseconds (rates per second).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrownoutSample {
    /// Heartbeats per second before the update.
    pub baseline_heartbeats_per_s: f64,
    /// Resume → heartbeat rate back within the tolerance (None: not within the data).
    pub heartbeat_ms: Option<f64>,
    /// Guest loop iterations per second before the update (None: not polled).
    pub baseline_sweep_per_s: Option<f64>,
    /// Resume → sweep rate back within the tolerance (None: not within the data, or not polled).
    pub sweep_ms: Option<f64>,
    /// Resume → first `COUNTERS` answer after it: the sweep brownout's resolution.
    pub sweep_first_sample_ms: Option<f64>,
    /// How much data after the resume there was to judge by.
    pub observed_ms: f64,
    /// `--brownout-verify`: the guest's full-RAM `v` before the update…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_before_ms: Option<f64>,
    /// … and right after the resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_after_ms: Option<f64>,
}

/// Heartbeats per second in `[from, to)`.
pub fn heartbeat_rate(heartbeats: &[Instant], from: Instant, to: Instant) -> f64 {
    let secs = to.saturating_duration_since(from).as_secs_f64();
    if secs <= 0.0 {
        return f64::NAN;
    }
    count(heartbeats, from, to) as f64 / secs
}

fn count(heartbeats: &[Instant], from: Instant, to: Instant) -> usize {
    heartbeats.partition_point(|&t| t < to) - heartbeats.partition_point(|&t| t < from)
}

/// The first heartbeat after the longest gap from the last heartbeat before `from` to the first
/// after `to`: when the guest ran again after something done in `[from, to]`.
pub fn resume_instant(heartbeats: &[Instant], from: Instant, to: Instant) -> Option<Instant> {
    let start = heartbeats.partition_point(|&t| t < from).saturating_sub(1);
    let end = (heartbeats.partition_point(|&t| t <= to) + 1).min(heartbeats.len());
    heartbeats
        .get(start..end)?
        .windows(2)
        .max_by_key(|w| w[1] - w[0])
        .map(|w| w[1])
}

/// Iterations per second between the first and the last sample.
pub fn sweep_rate(samples: &[SweepSample]) -> Option<f64> {
    let (a, b) = (samples.first()?, samples.last()?);
    let secs = b.at.saturating_duration_since(a.at).as_secs_f64();
    (secs > 0.0).then(|| b.iters.saturating_sub(a.iters) as f64 / secs)
}

impl Brownout {
    fn within(&self, rate: f64, baseline: f64) -> bool {
        baseline > 0.0 && ((rate / baseline) - 1.0).abs() <= self.tolerance
    }

    /// Resume → the heartbeat rate back within the tolerance of `baseline` (per second), judged
    /// on heartbeats up to `until`.
    pub fn heartbeats(
        &self,
        heartbeats: &[Instant],
        resume: Instant,
        until: Instant,
        baseline: f64,
    ) -> Option<Duration> {
        let mut t = resume;
        while t + 2 * self.window <= until {
            let first = heartbeat_rate(heartbeats, t, t + self.window);
            let second = heartbeat_rate(heartbeats, t + self.window, t + 2 * self.window);
            if self.within(first, baseline) && self.within(second, baseline) {
                return Some(t - resume);
            }
            t += self.step;
        }
        None
    }

    /// Resume → the sweep rate between consecutive `after` samples back within the tolerance of
    /// `baseline` (per second). Samples taken before `resume` are ignored.
    pub fn sweep(&self, after: &[SweepSample], resume: Instant, baseline: f64) -> Option<Duration> {
        let after: Vec<SweepSample> = after.iter().copied().filter(|s| s.at >= resume).collect();
        let rates: Vec<(Instant, f64)> = after
            .windows(2)
            .filter_map(|w| sweep_rate(w).map(|r| (w[0].at, r)))
            .collect();
        rates
            .windows(2)
            .find(|w| self.within(w[0].1, baseline) && self.within(w[1].1, baseline))
            .map(|w| w[0].0 - resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: f64) -> Instant {
        t0 + Duration::from_secs_f64(ms / 1e3)
    }

    /// 1 kHz heartbeats from 0 to 1000 ms, none for 50 ms, 500 Hz for 200 ms, 1 kHz to 2000 ms.
    fn timeline(t0: Instant) -> Vec<Instant> {
        let mut v = Vec::new();
        let mut ms = 0.0;
        while ms < 1000.0 {
            v.push(at(t0, ms));
            ms += 1.0;
        }
        ms = 1050.0;
        while ms < 1250.0 {
            v.push(at(t0, ms));
            ms += 2.0;
        }
        while ms < 2000.0 {
            v.push(at(t0, ms));
            ms += 1.0;
        }
        v
    }

    #[test]
    fn heartbeat_brownout_ends_when_the_rate_is_back() {
        let t0 = Instant::now();
        let hb = timeline(t0);
        let base = heartbeat_rate(&hb, at(t0, 0.0), at(t0, 1000.0));
        assert!((base - 1000.0).abs() < 1.0, "{base}");
        let resume = resume_instant(&hb, at(t0, 999.5), at(t0, 1040.0)).expect("resume");
        assert_eq!(resume, at(t0, 1050.0));
        let b = Brownout::default()
            .heartbeats(&hb, resume, at(t0, 2000.0), base)
            .expect("back");
        // Back once a 100 ms window holds at most 10 % of half-rate beats: ≈ 180–200 ms.
        let ms = b.as_secs_f64() * 1e3;
        assert!((170.0..=200.0).contains(&ms), "{ms}");
        // Too little data: not back.
        assert_eq!(
            Brownout::default().heartbeats(&hb, resume, at(t0, 1300.0), base),
            None
        );
    }

    #[test]
    fn no_brownout_is_zero() {
        let t0 = Instant::now();
        let hb: Vec<Instant> = (0..2000).map(|i| at(t0, f64::from(i))).collect();
        let base = heartbeat_rate(&hb, at(t0, 0.0), at(t0, 1000.0));
        let b = Brownout::default().heartbeats(&hb, at(t0, 1000.0), at(t0, 2000.0), base);
        assert_eq!(b, Some(Duration::ZERO));
    }

    #[test]
    fn sweep_brownout() {
        let t0 = Instant::now();
        // 1000 iterations per 100 ms before; after the resume at 1000 ms: 500, 700, 1000, 1000.
        let before: Vec<SweepSample> = (0u32..5)
            .map(|i| SweepSample {
                at: at(t0, 100.0 * f64::from(i)),
                iters: 1000 * u64::from(i),
            })
            .collect();
        let base = sweep_rate(&before).expect("rate");
        assert!((base - 10_000.0).abs() < 1e-6, "{base}");
        let mut iters = 10_000;
        let mut after = vec![SweepSample {
            at: at(t0, 1010.0),
            iters,
        }];
        for (i, d) in [500, 700, 1000, 1000, 1000].iter().enumerate() {
            iters += d;
            after.push(SweepSample {
                at: at(t0, 1010.0 + 100.0 * (i as f64 + 1.0)),
                iters,
            });
        }
        let b = Brownout::default()
            .sweep(&after, at(t0, 1000.0), base)
            .expect("back");
        assert_eq!(b, Duration::from_millis(210));
        assert_eq!(sweep_rate(&after[..1]), None);
    }
}
