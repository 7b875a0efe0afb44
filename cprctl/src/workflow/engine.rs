//! The step engine every workflow runs on.
//!
//! A workflow is a list of [`Step`]s run in order by [`Engine::run`]. A step that succeeds may
//! push compensations ([`Undo`]) on a stack; when a later step fails, the engine pops the stack
//! and runs the compensations in reverse order. A step that fails pushes nothing: it must leave
//! nothing of its own behind (undo its partial work before returning the error). Every step and
//! every compensation that ran is recorded and reported as progress.

use std::future::Future;
use std::time::Instant;

use crate::workflow::progress::{Progress, StepLog, StepRecord, StepStatus};

/// One step of a workflow.
pub trait Step: Copy + PartialEq + std::fmt::Debug + Send + Sync {
    /// Its name as reports and progress print it, e.g. `set-mode`.
    fn name(self) -> &'static str;
    /// What it does, for progress lines.
    fn what(self) -> &'static str;
}

/// A compensation a step pushed.
pub trait Undo: Send {
    /// The name it is recorded under (usually that of the step that pushed it).
    fn name(&self) -> &'static str;
}

/// How a step ended well.
#[derive(Debug)]
pub enum StepOk<U> {
    /// It did its work; `undo` is pushed on the compensation stack, in order.
    Done {
        /// What happened, for the report.
        detail: Option<String>,
        /// What undoes it, should a later step fail.
        undo: Vec<U>,
    },
    /// It had nothing to do (nothing to undo); why.
    Skipped(String),
}

impl<U> StepOk<U> {
    /// Done, nothing to undo.
    pub fn done(detail: Option<String>) -> Self {
        Self::Done {
            detail,
            undo: Vec::new(),
        }
    }

    /// Done with `detail`, nothing to undo.
    pub fn detail(detail: impl Into<String>) -> Self {
        Self::done(Some(detail.into()))
    }

    /// The same, with `undo` pushed after the compensations already there.
    pub fn undo(mut self, u: U) -> Self {
        if let Self::Done { undo, .. } = &mut self {
            undo.push(u);
        }
        self
    }
}

/// The step that failed and why.
#[derive(Debug)]
pub struct Failed<S, E> {
    /// The step.
    pub step: S,
    /// Its error.
    pub error: E,
}

/// A compensation as it runs: it may announce itself before it acts.
pub struct Compensating<'a, 'p> {
    log: &'a mut StepLog<'p>,
    name: &'static str,
    started: Instant,
}

impl Compensating<'_, '_> {
    /// Reports that the compensation starts acting (`compensating`) and starts its clock.
    pub fn announce(&mut self, detail: Option<String>) {
        self.log
            .emit(self.name, StepStatus::Compensating, 0, detail);
        self.started = Instant::now();
    }
}

/// What a workflow tells the engine: how to run its steps and their compensations.
pub trait Workflow: Send {
    /// Its steps.
    type Step: Step;
    /// Its compensations.
    type Undo: Undo;
    /// Why a step failed.
    type Error: std::error::Error + Send + Sync;

    /// Runs `step`.
    fn run_step(
        &mut self,
        step: Self::Step,
    ) -> impl Future<Output = Result<StepOk<Self::Undo>, Self::Error>> + Send;

    /// Runs the compensation `undo` after `error`. `None`: there was nothing to undo (not
    /// recorded); otherwise what it did.
    fn compensate(
        &mut self,
        undo: Self::Undo,
        error: &Self::Error,
        c: &mut Compensating<'_, '_>,
    ) -> impl Future<Output = Option<String>> + Send;

    /// Called as `step` starts (after its `started` event).
    fn step_started(&mut self, _step: Self::Step) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called after `step` is recorded as done or skipped.
    fn step_done(&mut self, _step: Self::Step) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called when `step` failed, before the compensations run.
    fn step_failed(
        &mut self,
        _step: Self::Step,
        _error: &Self::Error,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Runs a workflow's steps and compensations, and keeps their records.
pub struct Engine<'p, S> {
    steps: Vec<S>,
    log: StepLog<'p>,
}

impl<'p, S: Step> Engine<'p, S> {
    /// An engine for `steps`, in the order they run, reporting to `progress`.
    pub fn new(steps: Vec<S>, progress: &'p mut dyn Progress) -> Self {
        let names = steps.iter().map(|s| (s.name(), s.what())).collect();
        Self {
            steps,
            log: StepLog::new(names, progress),
        }
    }

    /// The steps.
    pub fn steps(&self) -> &[S] {
        &self.steps
    }

    /// Runs every step of `wf` in order; on a failure, the compensations of the steps done, in
    /// reverse, then the failure.
    pub async fn run<W: Workflow<Step = S>>(
        &mut self,
        wf: &mut W,
    ) -> Result<(), Failed<S, W::Error>> {
        let mut stack: Vec<W::Undo> = Vec::new();
        for step in self.steps.clone() {
            self.log.emit(step.name(), StepStatus::Started, 0, None);
            wf.step_started(step).await;
            let t = Instant::now();
            match wf.run_step(step).await {
                Ok(StepOk::Done { detail, undo }) => {
                    self.log.finish(step.name(), StepStatus::Done, t, detail);
                    stack.extend(undo);
                }
                Ok(StepOk::Skipped(why)) => {
                    self.log
                        .finish(step.name(), StepStatus::Skipped, t, Some(why));
                }
                Err(error) => {
                    tracing::debug!(step = step.name(), %error, "workflow step failed");
                    self.log
                        .finish(step.name(), StepStatus::Failed, t, Some(error.to_string()));
                    wf.step_failed(step, &error).await;
                    while let Some(undo) = stack.pop() {
                        let name = undo.name();
                        let mut c = Compensating {
                            log: &mut self.log,
                            name,
                            started: Instant::now(),
                        };
                        let done = wf.compensate(undo, &error, &mut c).await;
                        let started = c.started;
                        if let Some(detail) = done {
                            self.log
                                .finish(name, StepStatus::Compensated, started, Some(detail));
                        }
                    }
                    return Err(Failed { step, error });
                }
            }
            wf.step_done(step).await;
        }
        Ok(())
    }

    /// The records so far.
    pub fn records(&self) -> &[StepRecord] {
        self.log.records()
    }

    /// The records, leaving the engine's empty.
    pub fn take_records(&mut self) -> Vec<StepRecord> {
        self.log.take_records()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::progress::ProgressEvent;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        A,
        B,
        C,
        D,
    }

    impl Step for T {
        fn name(self) -> &'static str {
            match self {
                T::A => "a",
                T::B => "b",
                T::C => "c",
                T::D => "d",
            }
        }
        fn what(self) -> &'static str {
            "testing"
        }
    }

    #[derive(Debug)]
    struct U(&'static str, bool);

    impl Undo for U {
        fn name(&self) -> &'static str {
            self.0
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0} broke")]
    struct E(&'static str);

    /// Steps push an undo named after them; `fail` fails, `skip` is skipped; `b` pushes two.
    #[derive(Default)]
    struct Fake {
        fail: Option<T>,
        skip: Option<T>,
        ran: Vec<&'static str>,
        undone: Vec<&'static str>,
        hooks: Vec<String>,
    }

    impl Workflow for Fake {
        type Step = T;
        type Undo = U;
        type Error = E;

        async fn run_step(&mut self, step: T) -> Result<StepOk<U>, E> {
            self.ran.push(step.name());
            if self.fail == Some(step) {
                return Err(E(step.name()));
            }
            if self.skip == Some(step) {
                return Ok(StepOk::Skipped(format!("skipped: {}", step.name())));
            }
            let ok = StepOk::detail(step.name()).undo(U(step.name(), true));
            Ok(if step == T::B {
                ok.undo(U("b2", false))
            } else {
                ok
            })
        }

        async fn compensate(
            &mut self,
            undo: U,
            error: &E,
            c: &mut Compensating<'_, '_>,
        ) -> Option<String> {
            self.undone.push(undo.0);
            if !undo.1 {
                return None;
            }
            c.announce(None);
            Some(format!("undid {} after {error}", undo.0))
        }

        async fn step_started(&mut self, step: T) {
            self.hooks.push(format!("start {}", step.name()));
        }

        async fn step_done(&mut self, step: T) {
            self.hooks.push(format!("done {}", step.name()));
        }

        async fn step_failed(&mut self, step: T, _: &E) {
            self.hooks.push(format!(
                "failed {} (undone: {})",
                step.name(),
                self.undone.len()
            ));
        }
    }

    #[derive(Default)]
    struct Events(Vec<String>);

    impl Progress for Events {
        fn event(&mut self, e: &ProgressEvent) {
            self.0.push(format!("{} {}", e.step, e.status.name()));
        }
    }

    fn run(wf: &mut Fake, events: &mut Events) -> (Result<(), Failed<T, E>>, Vec<StepRecord>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut engine = Engine::new(vec![T::A, T::B, T::C, T::D], events);
        let r = rt.block_on(engine.run(wf));
        (r, engine.take_records())
    }

    fn table(records: &[StepRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| format!("{} {}", r.step, r.status.name()))
            .collect()
    }

    #[test]
    fn compensations_run_in_reverse_order_of_the_steps_that_succeeded() {
        let mut wf = Fake {
            fail: Some(T::C),
            ..Fake::default()
        };
        let mut events = Events::default();
        let (r, records) = run(&mut wf, &mut events);
        let failed = r.expect_err("c fails");
        assert_eq!(failed.step, T::C);
        assert_eq!(failed.error.to_string(), "c broke");
        // d never ran; c's own compensation was never pushed.
        assert_eq!(wf.ran, ["a", "b", "c"]);
        assert_eq!(wf.undone, ["b2", "b", "a"]);
        // b2 had nothing to undo: not recorded.
        assert_eq!(
            table(&records),
            [
                "a done",
                "b done",
                "c failed",
                "b compensated",
                "a compensated"
            ]
        );
        assert_eq!(records[3].detail.as_deref(), Some("undid b after c broke"));
        assert_eq!(
            wf.hooks,
            [
                "start a",
                "done a",
                "start b",
                "done b",
                "start c",
                "failed c (undone: 0)"
            ]
        );
        assert_eq!(
            events.0,
            [
                "a started",
                "a done",
                "b started",
                "b done",
                "c started",
                "c failed",
                "b compensating",
                "b compensated",
                "a compensating",
                "a compensated"
            ]
        );
    }

    #[test]
    fn a_failing_first_step_compensates_nothing() {
        let mut wf = Fake {
            fail: Some(T::A),
            ..Fake::default()
        };
        let (r, records) = run(&mut wf, &mut Events::default());
        assert_eq!(r.expect_err("a fails").step, T::A);
        assert!(wf.undone.is_empty());
        assert_eq!(table(&records), ["a failed"]);
    }

    #[test]
    fn a_skipped_step_pushes_nothing_and_success_undoes_nothing() {
        let mut wf = Fake {
            skip: Some(T::A),
            fail: Some(T::D),
            ..Fake::default()
        };
        let (r, records) = run(&mut wf, &mut Events::default());
        assert!(r.is_err());
        assert_eq!(wf.undone, ["c", "b2", "b"]);
        assert_eq!(records[0].status, StepStatus::Skipped);
        assert_eq!(records[0].detail.as_deref(), Some("skipped: a"));

        let mut wf = Fake::default();
        let (r, records) = run(&mut wf, &mut Events::default());
        assert!(r.is_ok());
        assert!(wf.undone.is_empty());
        assert_eq!(table(&records), ["a done", "b done", "c done", "d done"]);
    }
}
