//! The new process's side of cpr-exec: take the guest over from the bridge, finish the load
//! (timings, generation, retiring the old VM), or roll back to the previous binary.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::bridge::{self, BridgeError};
use super::exec::process;
use super::CprError;
use crate::console::ConsoleState;
use crate::migration::POPULATE_CHUNK;
use crate::state::handover::{fd_names, CprHandover, LegacyDeviceState, UndoneStep};
use crate::sys::fd::monotonic_ns;
use crate::vcpu::VcpuEvent;
use crate::vm::{InheritedContext, MigrationReport, PhaseClock, UpdateOutcome, UpdateStatus, Vm};
use cpr_common::MigrationMode;

/// How long the new process waits for the bridge to stop the guest and write the state.
const BRIDGE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

impl Vm {
    /// The new process's side: asks the previous process's bridge for the guest (once). Returns
    /// where the bridge wrote the state (None without a bridge) and whether this call took the
    /// guest over.
    pub(crate) fn take_over_from_bridge(&mut self) -> Result<Option<(PathBuf, bool)>, CprError> {
        let Some(ctx) = self.inherited.as_mut() else {
            return Ok(None);
        };
        if ctx.bridge.is_none() {
            return Ok(None);
        }
        let state = ctx
            .handover
            .fd(fd_names::BRIDGE_STATE)
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{fd}")))
            .ok_or(CprError::Bridge(BridgeError::NotSaved(
                "the hand-over names no state memfd".into(),
            )))?;
        if ctx.bridge_reply.is_some() {
            return Ok(Some((state, false)));
        }
        if self.config.populate_after_load {
            // The guest still runs in the bridge: map guest RAM into this process now, so that
            // its first accesses after the take-over only fault in KVM.
            let t = Instant::now();
            let done = self
                .ram
                .populate_in_background(POPULATE_CHUNK, Duration::ZERO)
                .map(|h| h.join());
            match done {
                Ok(Ok(Ok(()))) => info!(
                    took_ms = t.elapsed().as_millis() as u64,
                    "guest RAM populated before the take-over"
                ),
                _ => warn!("guest RAM not populated before the take-over"),
            }
        }
        let Some(ctl) = self.inherited.as_ref().and_then(|c| c.bridge.as_ref()) else {
            return Ok(None);
        };
        let reply = bridge::take_over(ctl, BRIDGE_REPLY_TIMEOUT)?;
        // The console starts after the resume (`finish_cpr_incoming`): guest output is buffered
        // until then.
        if let Some(ctx) = self.inherited.as_mut() {
            ctx.bridge_reply = Some(reply);
        }
        Ok(Some((state, true)))
    }

    /// What the previous release's hand-over (or bridge reply) carried of the devices, for a
    /// version-1 state file.
    pub(crate) fn legacy_device_state(&self) -> Option<LegacyDeviceState> {
        let ctx = self.inherited.as_ref()?;
        let from_reply = ctx.bridge_reply.as_ref().and_then(|r| r.legacy.clone());
        let mut legacy = ctx.handover.legacy.clone().unwrap_or_default();
        if let Some(r) = from_reply {
            legacy.console_pending_out = r.console_pending_out;
            legacy.console_pending_in = r.console_pending_in;
        }
        Some(legacy)
    }

    /// Re-executes the previous binary (a failed or abandoned update) with the same state and fds.
    /// Returns only on failure. This process's console has not started (it starts after the load),
    /// so the state's console bytes are still the ones to deliver.
    /// `undone`: the compensations this process ran itself, for the rolled-back one to report.
    pub fn roll_back(&mut self, reason: &str, undone: Vec<UndoneStep>) -> CprError {
        match &self.inherited {
            Some(i) if i.handover.rollback_reason.is_none() => {
                if let Some(console) = self.console.take() {
                    drop(console.quiesce());
                }
                let handover = CprHandover {
                    rollback_undone: undone,
                    ..i.handover.clone()
                };
                process::roll_back(&handover, reason).into()
            }
            _ => CprError::NoRollbackTarget,
        }
    }

    /// After a cpr-exec load: merge the old process's timings, report the pause, and close the way
    /// back (the previous binary fd, the crash handler).
    pub(crate) fn finish_cpr_incoming(
        &mut self,
        ctx: InheritedContext,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
        running: bool,
        console: ConsoleState,
    ) {
        process::disarm_crash_rollback();
        if let Some(c) = self.console.as_mut() {
            // What the previous process had not delivered goes out first, then what the guest
            // wrote since the resume.
            if let Err(e) = c.start_deferred(&console) {
                warn!(error = %e, "cannot start the console after the take-over; guest output stays buffered");
            }
        }
        let h = &ctx.handover;
        // The pause ends when a vCPU goes back into the guest (this thread may be preempted by
        // it right after the resume).
        let resumed_ns = match running {
            true => self
                .vcpus
                .control
                .first_run_ns(Duration::from_millis(50))
                .unwrap_or_else(monotonic_ns),
            false => monotonic_ns(),
        };
        let micros = |list: &[(String, u64)]| -> Vec<(String, Duration)> {
            list.iter()
                .map(|(n, us)| (n.clone(), Duration::from_micros(*us)))
                .collect()
        };
        let mut phases = micros(&h.phases);
        let ns = |a: u64, b: u64| Duration::from_nanos(b.saturating_sub(a));
        let exec = ns(h.exec_at_ns, ctx.started_ns);
        match &ctx.bridge_reply {
            // Two pauses: the hand-off to the bridge (all of `h.phases`) and the take-over.
            Some(reply) => {
                let handoff: Duration = phases.iter().map(|(_, d)| *d).sum();
                phases.extend(micros(&reply.phases));
                phases.append(&mut clock.phases);
                report.downtime = handoff + ns(reply.paused_at_ns, resumed_ns);
                // While the bridge ran the guest (not part of the pause).
                phases.push(("overlapped-exec".into(), exec));
                phases.push((
                    "overlapped-startup".into(),
                    ns(ctx.started_ns, reply.paused_at_ns),
                ));
            }
            None => {
                let load_total: Duration = clock.phases.iter().map(|(_, d)| *d).sum();
                let startup = ns(ctx.started_ns, resumed_ns)
                    .saturating_sub(clock.start.elapsed().max(load_total));
                phases.push(("exec".into(), exec));
                phases.push(("startup".into(), startup));
                phases.append(&mut clock.phases);
                report.downtime = ns(h.paused_at_ns, resumed_ns);
            }
        }
        clock.phases = phases;
        report.mode = MigrationMode::CprExec;
        // A rollback restores the generation the guest had before the failed update.
        self.generation = match h.rollback_reason {
            Some(_) => h.generation.saturating_sub(1),
            None => h.generation,
        };
        self.update_status = match &h.rollback_reason {
            Some(why) => UpdateStatus::RolledBack(why.clone()),
            None => UpdateStatus::Updated {
                from: h.from_version.clone(),
            },
        };
        self.update_undone = h.rollback_undone.clone();
        // The hand-over's counters are the previous process's: this update is counted here, once
        // the guest runs again.
        let outcome = match h.rollback_reason {
            Some(_) => UpdateOutcome::RolledBack,
            None => UpdateOutcome::Updated,
        };
        self.metrics.record(outcome, Some(report.downtime));
        info!(
            generation = self.generation,
            pause_us = report.downtime.as_micros() as u64,
            status = %self.update_status,
            "cpr-exec: guest resumed"
        );
        // Guest events the bridge saw, acted on now that the guest runs here.
        for e in ctx.bridge_reply.iter().flat_map(|r| r.guest_events.iter()) {
            let _ = self.vcpu_events.send(VcpuEvent::from(e.clone()));
        }
        if ctx.bridge_reply.is_some() {
            // Under systemd: this process is the unit's main process again (the bridge's control
            // continuation was, since the exec), before the bridge ends.
            crate::notify::notify(&format!("MAINPID={}", std::process::id()));
        }
        // Closing the previous VM's fds destroys it (~15 ms of kernel time): off the guest's path.
        // Everything else held for a rollback is closed now.
        let (old_vm, rest): (Vec<_>, Vec<_>) = ctx.held.into_iter().partition(|(name, _)| {
            name.starts_with(fd_names::RETIRED_KVM_PREFIX)
                || name.starts_with(fd_names::BRIDGE_TASK_PREFIX)
        });
        drop(rest);
        let bridge_ctl = ctx.bridge;
        let keeper_pid = h.address_space_keeper;
        let retire = std::thread::Builder::new()
            .name("vmmd-retire-vm".into())
            .spawn(move || {
                let t = Instant::now();
                // Closing the control socket ends the bridge; its last process's exit destroys the
                // old VM and address space.
                drop(bridge_ctl);
                let (tasks, old_vm): (Vec<_>, Vec<_>) = old_vm
                    .into_iter()
                    .partition(|(name, _)| name.starts_with(fd_names::BRIDGE_TASK_PREFIX));
                for (_, pidfd) in &tasks {
                    bridge::reap_pidfd(pidfd);
                }
                // The old VM's fds, then the keeper's pipe: its exit tears down the old address space.
                drop(old_vm);
                if let Some(pid) = keeper_pid {
                    process::reap(pid);
                }
                tracing::debug!(
                    took_us = t.elapsed().as_micros() as u64,
                    "previous VM retired"
                );
            });
        if let Err(e) = retire {
            warn!(error = %e, "cannot retire the previous VM in the background");
        }
    }
}
