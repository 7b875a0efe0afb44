//! Live-update counters of this guest: outcomes and guest pauses. They live with the VM and go to
//! the next process in the CPR hand-over, so after N updates the new process reports N (a
//! fresh vmmd, or one loaded from a state file, starts from zero). `Info.update_metrics` shows them;
//! `cprctl exporter` turns them into Prometheus metrics.
//!
//! Where each outcome is counted: `updated` and `rolled_back` by the process that resumes the guest
//! after the exec (`crate::cpr::incoming`), `failed` and `refused` by the process that tried
//! (`crate::cpr::exec`). The pause histogram has the pauses of the updates that reached the exec.

use std::time::Duration;

use crate::state::handover::UpdateCounters;

/// Upper bounds (µs) of the pause histogram's buckets: 50 µs to 100 ms.
pub const PAUSE_BOUNDS_US: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];

/// How a live update ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The guest runs on the new binary.
    Updated,
    /// Failed before the exec and undone.
    Failed,
    /// Refused before the guest was paused.
    Refused,
    /// The new binary failed after the exec; the previous one runs the guest again.
    RolledBack,
}

/// The counters, with this build's buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmMetrics(UpdateCounters);

impl Default for VmMetrics {
    fn default() -> Self {
        VmMetrics(UpdateCounters {
            pause_bounds_us: PAUSE_BOUNDS_US.to_vec(),
            pause_buckets: vec![0; PAUSE_BOUNDS_US.len() + 1],
            ..UpdateCounters::default()
        })
    }
}

impl VmMetrics {
    /// The counters a previous process handed over. Pauses counted with other bucket bounds go to
    /// the first of this build's buckets that holds their bucket's upper bound (the overflow bucket
    /// stays the overflow bucket); sum and count are kept as they are.
    pub fn inherited(from: &UpdateCounters) -> VmMetrics {
        let mut m = VmMetrics::default();
        m.0.updated = from.updated;
        m.0.failed = from.failed;
        m.0.refused = from.refused;
        m.0.rolled_back = from.rolled_back;
        m.0.pause_sum_us = from.pause_sum_us;
        m.0.pause_count = from.pause_count;
        for (i, n) in from.pause_buckets.iter().enumerate() {
            let at = match from.pause_bounds_us.get(i) {
                Some(bound) => bucket_of(*bound),
                None => PAUSE_BOUNDS_US.len(),
            };
            m.0.pause_buckets[at] = m.0.pause_buckets[at].saturating_add(*n);
        }
        m
    }

    /// Counts an update's outcome, and its guest pause when it has one.
    pub fn record(&mut self, outcome: UpdateOutcome, pause: Option<Duration>) {
        let c = &mut self.0;
        let counter = match outcome {
            UpdateOutcome::Updated => &mut c.updated,
            UpdateOutcome::Failed => &mut c.failed,
            UpdateOutcome::Refused => &mut c.refused,
            UpdateOutcome::RolledBack => &mut c.rolled_back,
        };
        *counter = counter.saturating_add(1);
        if let Some(pause) = pause {
            let us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
            let at = bucket_of(us);
            c.pause_buckets[at] = c.pause_buckets[at].saturating_add(1);
            c.pause_sum_us = c.pause_sum_us.saturating_add(us);
            c.pause_count = c.pause_count.saturating_add(1);
        }
    }

    /// The counters as they go into the hand-over and `Info`.
    pub fn counters(&self) -> &UpdateCounters {
        &self.0
    }
}

/// The bucket of this build that holds `us` (the last one: above every bound).
fn bucket_of(us: u64) -> usize {
    PAUSE_BOUNDS_US
        .iter()
        .position(|b| us <= *b)
        .unwrap_or(PAUSE_BOUNDS_US.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_and_pauses_are_counted() {
        let mut m = VmMetrics::default();
        m.record(UpdateOutcome::Updated, Some(Duration::from_micros(300)));
        m.record(UpdateOutcome::Updated, Some(Duration::from_micros(50)));
        m.record(UpdateOutcome::RolledBack, Some(Duration::from_secs(1)));
        m.record(UpdateOutcome::Failed, None);
        m.record(UpdateOutcome::Refused, None);
        let c = m.counters();
        assert_eq!(
            (c.updated, c.failed, c.refused, c.rolled_back),
            (2, 1, 1, 1)
        );
        assert_eq!(c.pause_count, 3);
        assert_eq!(c.pause_sum_us, 1_000_350);
        // 50 µs is in the first bucket (le=50), 300 µs in le=500, 1 s above the last bound.
        assert_eq!(c.pause_buckets[0], 1);
        assert_eq!(c.pause_buckets[3], 1);
        assert_eq!(c.pause_buckets[PAUSE_BOUNDS_US.len()], 1);
        assert_eq!(c.pause_buckets.iter().sum::<u64>(), 3);
    }

    #[test]
    fn inherited_counters_go_on_and_other_bounds_are_rebucketed() {
        let mut first = VmMetrics::default();
        first.record(UpdateOutcome::Updated, Some(Duration::from_micros(700)));
        let mut next = VmMetrics::inherited(first.counters());
        assert_eq!(next, first);
        next.record(UpdateOutcome::Updated, Some(Duration::from_micros(700)));
        assert_eq!(next.counters().updated, 2);
        assert_eq!(next.counters().pause_buckets[4], 2);

        let other = UpdateCounters {
            updated: 3,
            pause_bounds_us: vec![200, 3_000],
            pause_buckets: vec![1, 1, 1],
            pause_sum_us: 10_000,
            pause_count: 3,
            ..UpdateCounters::default()
        };
        let m = VmMetrics::inherited(&other);
        let c = m.counters();
        assert_eq!(c.updated, 3);
        assert_eq!(c.pause_bounds_us, PAUSE_BOUNDS_US);
        assert_eq!(c.pause_buckets[2], 1, "le=200 goes to le=250");
        assert_eq!(c.pause_buckets[6], 1, "le=3000 goes to le=5000");
        assert_eq!(c.pause_buckets[PAUSE_BOUNDS_US.len()], 1);
        assert_eq!((c.pause_sum_us, c.pause_count), (10_000, 3));
    }

    #[test]
    fn nothing_handed_over_is_zero() {
        let m = VmMetrics::inherited(&UpdateCounters::default());
        assert_eq!(m, VmMetrics::default());
    }
}
