//! What the VM tells its observers (runstate changes, migration progress) and the report of the
//! last migration.

use std::time::{Duration, Instant, SystemTime};

use cpr_common::MigrationMode;
use tokio::sync::broadcast;

use super::{lock, RunState, Vm};

/// Something observers of the VM want to know.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// The runstate changed.
    RunState {
        /// Before.
        old: RunState,
        /// After.
        new: RunState,
        /// Why.
        reason: String,
    },
    /// Migration progress.
    Migration(MigrationProgress),
}

/// One step of a migration, as reported in events.
#[derive(Debug, Clone)]
pub struct MigrationProgress {
    /// Status.
    pub status: MigrationStatus,
    /// Current phase.
    pub phase: String,
    /// Bytes done in this phase.
    pub bytes_done: u64,
    /// Bytes in this phase.
    pub bytes_total: u64,
    /// Free text (the error on failure).
    pub message: String,
    /// Incoming or outgoing.
    pub incoming: bool,
}

/// Status of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationStatus {
    /// None yet.
    #[default]
    None,
    /// In progress.
    Active,
    /// Done.
    Completed,
    /// Failed; see the error.
    Failed,
}

/// The last migration, for query-migrate.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Status.
    pub status: MigrationStatus,
    /// Mode used.
    pub mode: MigrationMode,
    /// Where to/from.
    pub uri: String,
    /// The error when it failed.
    pub error: Option<String>,
    /// Phase name and duration, in order.
    pub phases: Vec<(String, Duration)>,
    /// Start to end.
    pub total: Duration,
    /// Guest RAM bytes moved.
    pub ram_bytes: u64,
    /// Meta bytes moved.
    pub state_bytes: u64,
    /// How long the vCPUs were stopped by the migration.
    pub downtime: Duration,
    /// Incoming or outgoing.
    pub incoming: bool,
}

/// Broadcasts [`VmEvent`]s to API subscribers.
#[derive(Clone)]
pub struct EventBus(broadcast::Sender<(SystemTime, VmEvent)>);

impl EventBus {
    /// A bus that keeps the last 1024 events for slow subscribers.
    pub fn new() -> EventBus {
        EventBus(broadcast::channel(1024).0)
    }
    /// Sends an event (dropped when nobody listens).
    pub fn send(&self, e: VmEvent) {
        let _ = self.0.send((SystemTime::now(), e));
    }
    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<(SystemTime, VmEvent)> {
        self.0.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Records phase timings of one migration.
pub(crate) struct PhaseClock {
    /// When the migration started.
    pub(crate) start: Instant,
    last: Instant,
    /// Phase name and duration, in order.
    pub(crate) phases: Vec<(String, Duration)>,
}

impl PhaseClock {
    /// Starts timing now.
    pub(crate) fn new() -> PhaseClock {
        let now = Instant::now();
        PhaseClock {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }
    /// Ends the phase `name` now.
    pub(crate) fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.phases.push((name.to_string(), now - self.last));
        self.last = now;
    }
}

impl Vm {
    /// Sends a migration progress event.
    pub(crate) fn report_progress(
        &self,
        status: MigrationStatus,
        phase: &str,
        done: u64,
        total: u64,
        incoming: bool,
    ) {
        self.events.send(VmEvent::Migration(MigrationProgress {
            status,
            phase: phase.to_string(),
            bytes_done: done,
            bytes_total: total,
            message: String::new(),
            incoming,
        }));
    }

    /// A report for a migration that starts now (also what query-migrate answers meanwhile).
    pub(crate) fn start_report(&self, uri: &str, incoming: bool) -> MigrationReport {
        let report = MigrationReport {
            status: MigrationStatus::Active,
            mode: self.mode,
            uri: uri.to_string(),
            incoming,
            ..Default::default()
        };
        *lock(&self.last_migration) = report.clone();
        report
    }

    /// Completes `report` with the phases and the outcome, publishes it and returns it.
    pub(crate) fn finish_report<E: std::fmt::Display>(
        &self,
        mut report: MigrationReport,
        clock: PhaseClock,
        result: &Result<(), E>,
    ) -> MigrationReport {
        report.phases = clock.phases;
        report.total = clock.start.elapsed();
        match result {
            Ok(()) => report.status = MigrationStatus::Completed,
            Err(e) => {
                report.status = MigrationStatus::Failed;
                report.error = Some(e.to_string());
            }
        }
        self.events.send(VmEvent::Migration(MigrationProgress {
            status: report.status,
            phase: "end".into(),
            bytes_done: report.ram_bytes,
            bytes_total: report.ram_bytes,
            message: report.error.clone().unwrap_or_default(),
            incoming: report.incoming,
        }));
        *lock(&self.last_migration) = report.clone();
        report
    }
}
