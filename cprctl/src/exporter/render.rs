//! The Prometheus text format (0.0.4) of one scrape of every vmmd, via `prometheus-client`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use vmmd_proto::v1::{InfoResponse, RunState};

use crate::output::run_state_name;

/// The runstates `vmmd_runstate` has a series for, in the order they are written.
const RUN_STATES: [RunState; 6] = [
    RunState::Running,
    RunState::Paused,
    RunState::Suspended,
    RunState::Inmigrate,
    RunState::Postmigrate,
    RunState::Shutdown,
];

/// What one vmmd answered (or not) at this scrape.
#[derive(Debug, Clone)]
pub struct VmScrape {
    /// The `vm` label: the socket's name without `.sock`.
    pub vm: String,
    /// Its Info, or None when it could not be reached in time.
    pub info: Option<InfoResponse>,
}

/// The `/metrics` body for these scrapes.
pub fn render(scrapes: Vec<VmScrape>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scraped(scrapes)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// The scrapes, written on encode.
#[derive(Debug)]
struct Scraped(Vec<VmScrape>);

type Labels = Vec<(&'static str, String)>;

impl Scraped {
    /// The vmmds that answered, with their `vm` label.
    fn up(&self) -> impl Iterator<Item = (Labels, &InfoResponse)> {
        self.0
            .iter()
            .filter_map(|s| s.info.as_ref().map(|i| (vm_label(&s.vm), i)))
    }

    /// One family: `series` gives each of its series' labels and value.
    fn family<M: EncodeMetric>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        kind: MetricType,
        series: impl IntoIterator<Item = (Labels, M)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in series {
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn vm_label(vm: &str) -> Labels {
    vec![("vm", vm.to_owned())]
}

fn with(mut labels: Labels, key: &'static str, value: impl Into<String>) -> Labels {
    labels.push((key, value.into()));
    labels
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge, Histogram};
        let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        let up = self.0.iter().map(|s| {
            let v = i64::from(s.info.is_some());
            (vm_label(&s.vm), ConstGauge::new(v))
        });
        Self::family(
            &mut e,
            "vmmd_up",
            "Whether vmmd answered Info at this scrape",
            Gauge,
            up,
        )?;
        let info = self.up().map(|(l, i)| {
            let l = with(with(l, "version", &i.version), "pid", i.pid.to_string());
            (l, gauge(1))
        });
        Self::family(
            &mut e,
            "vmmd_info",
            "vmmd's version and pid (always 1)",
            Gauge,
            info,
        )?;
        let generation = self.up().map(|(l, i)| (l, gauge(i.update_generation)));
        let help = "Live updates the guest has been through";
        Self::family(&mut e, "vmmd_generation", help, Gauge, generation)?;
        let uptime = self
            .up()
            .map(|(l, i)| (l, ConstGauge::new(i.uptime_ms as f64 / 1000.0)));
        let help = "Seconds since this vmmd process started (an update restarts it)";
        Self::family(&mut e, "vmmd_uptime_seconds", help, Gauge, uptime)?;
        let runstate = self.up().flat_map(|(l, i)| {
            RUN_STATES.iter().map(move |s| {
                let now = i64::from(*s as i32 == i.run_state);
                (
                    with(l.clone(), "state", run_state_name(*s as i32)),
                    ConstGauge::new(now),
                )
            })
        });
        let help = "The VM's runstate (1 for the current one)";
        Self::family(&mut e, "vmmd_runstate", help, Gauge, runstate)?;
        let counts = |i: &InfoResponse| i.update_metrics.clone().unwrap_or_default();
        let updates = self.up().flat_map(|(l, i)| {
            let m = counts(i);
            [
                ("updated", m.updated),
                ("failed", m.failed),
                ("refused", m.refused),
                ("rolled_back", m.rolled_back),
            ]
            .map(|(result, n)| (with(l.clone(), "result", result), ConstCounter::new(n)))
        });
        let help = "Live updates by result (updated, failed before the exec, refused, rolled_back)";
        Self::family(&mut e, "vmmd_updates", help, Counter, updates)?;
        let rollbacks = self
            .up()
            .map(|(l, i)| (l, ConstCounter::new(counts(i).rolled_back)));
        let help = "Live updates rolled back to the previous binary after the exec";
        Self::family(&mut e, "vmmd_rollbacks", help, Counter, rollbacks)?;
        let help = "How long live updates paused the guest (updates that reached the exec)";
        let mut pauses = e.encode_descriptor("vmmd_update_pause_seconds", help, None, Histogram)?;
        for (labels, i) in self.up() {
            let m = counts(i);
            // Per-bucket counts, one per bound; the encoder adds them up and writes +Inf.
            let buckets: Vec<(f64, u64)> = m
                .pause_bucket_bounds_seconds
                .iter()
                .copied()
                .zip(m.pause_bucket_counts.iter().copied())
                .collect();
            pauses
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    m.pause_sum_seconds,
                    m.pause_count,
                    &buckets,
                    None,
                )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmd_proto::v1::UpdateMetrics;

    fn fake_info() -> InfoResponse {
        InfoResponse {
            run_state: RunState::Running as i32,
            version: "0.1.0".into(),
            pid: 4242,
            uptime_ms: 1500,
            update_generation: 3,
            update_metrics: Some(UpdateMetrics {
                updated: 3,
                failed: 1,
                refused: 0,
                rolled_back: 1,
                pause_bucket_bounds_seconds: vec![0.0005, 0.001, 0.01],
                pause_bucket_counts: vec![1, 2, 0, 1],
                pause_sum_seconds: 0.25,
                pause_count: 4,
            }),
            ..InfoResponse::default()
        }
    }

    #[test]
    fn golden_lines_for_a_fake_info_and_a_dead_socket() {
        let text = render(vec![
            VmScrape {
                vm: "vm1".into(),
                info: Some(fake_info()),
            },
            VmScrape {
                vm: "gone".into(),
                info: None,
            },
        ])
        .expect("render");
        let golden = [
            "# TYPE vmmd_up gauge",
            "vmmd_up{vm=\"vm1\"} 1",
            "vmmd_up{vm=\"gone\"} 0",
            "vmmd_info{vm=\"vm1\",version=\"0.1.0\",pid=\"4242\"} 1",
            "vmmd_generation{vm=\"vm1\"} 3",
            "vmmd_uptime_seconds{vm=\"vm1\"} 1.5",
            "vmmd_runstate{vm=\"vm1\",state=\"running\"} 1",
            "vmmd_runstate{vm=\"vm1\",state=\"paused\"} 0",
            "vmmd_runstate{vm=\"vm1\",state=\"shutdown\"} 0",
            "# TYPE vmmd_updates_total counter",
            "vmmd_updates_total{vm=\"vm1\",result=\"updated\"} 3",
            "vmmd_updates_total{vm=\"vm1\",result=\"failed\"} 1",
            "vmmd_updates_total{vm=\"vm1\",result=\"refused\"} 0",
            "vmmd_updates_total{vm=\"vm1\",result=\"rolled_back\"} 1",
            "vmmd_rollbacks_total{vm=\"vm1\"} 1",
            "# TYPE vmmd_update_pause_seconds histogram",
            "vmmd_update_pause_seconds_bucket{vm=\"vm1\",le=\"0.0005\"} 1",
            "vmmd_update_pause_seconds_bucket{vm=\"vm1\",le=\"0.001\"} 3",
            "vmmd_update_pause_seconds_bucket{vm=\"vm1\",le=\"0.01\"} 3",
            "vmmd_update_pause_seconds_bucket{vm=\"vm1\",le=\"+Inf\"} 4",
            "vmmd_update_pause_seconds_sum{vm=\"vm1\"} 0.25",
            "vmmd_update_pause_seconds_count{vm=\"vm1\"} 4",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for line in golden {
            assert!(lines.contains(&line), "missing {line:?} in:\n{text}");
        }
        // A dead vmmd has only vmmd_up.
        let gone: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("vm=\"gone\""))
            .collect();
        assert_eq!(gone, ["vmmd_up{vm=\"gone\"} 0"], "{text}");
    }

    #[test]
    fn label_values_are_escaped_and_no_vmmd_is_an_empty_scrape() {
        let text = render(vec![VmScrape {
            vm: "a\"b".into(),
            info: None,
        }])
        .expect("render");
        assert!(text.contains("vmmd_up{vm=\"a\\\"b\"} 0"), "{text}");
        let empty = render(Vec::new()).expect("render");
        assert!(empty.contains("# TYPE vmmd_up gauge"), "{empty}");
        assert!(!empty.lines().any(|l| l.starts_with("vmmd_up{")), "{empty}");
    }
}
