//! The VM's runstates and the one table of transitions between them. [`step`] decides; the VM
//! carries out the side effects (pausing vCPUs, resuming them) and records the new state.

use std::fmt;

use crate::state::SavedRunState;

/// The VM's runstate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by the operator.
    Paused,
    /// The guest suspended itself (S3).
    Suspended,
    /// Built, waiting for an incoming migration.
    InMigrate,
    /// Saved; the guest lives on elsewhere.
    PostMigrate,
    /// Powered off or failed; vmmd is exiting.
    Shutdown,
}

impl RunState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Suspended => "suspended",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
        }
    }

    /// What a save records of this runstate, when the guest can be saved in it.
    pub fn saved(self) -> Option<SavedRunState> {
        match self {
            RunState::Running => Some(SavedRunState::Running),
            RunState::Paused => Some(SavedRunState::Paused),
            RunState::Suspended => Some(SavedRunState::Suspended),
            _ => None,
        }
    }
}

impl From<SavedRunState> for RunState {
    fn from(s: SavedRunState) -> RunState {
        match s {
            SavedRunState::Running => RunState::Running,
            SavedRunState::Paused => RunState::Paused,
            SavedRunState::Suspended => RunState::Suspended,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEvent {
    /// The kernel was loaded and the boot vCPU starts.
    Boot,
    /// The operator pauses.
    Pause,
    /// The operator resumes; `saved_suspended`: the last completed save was of a suspended guest.
    Resume {
        /// Whether the guest had suspended itself before the save being cancelled.
        saved_suspended: bool,
    },
    /// The operator wakes a suspended guest.
    Wakeup,
    /// The guest suspends itself (S3).
    GuestSuspend,
    /// A save (or live update) starts.
    Migrate,
    /// A save completed; the guest lives on in the state file.
    Saved,
    /// An incoming load starts.
    MigrateIncoming,
    /// The incoming load completed with the guest in this runstate.
    Loaded(SavedRunState),
    /// Quit, power-off, reset or a failed vCPU.
    Shutdown,
}

/// The table's answer for an allowed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Allowed, and the runstate stays (nothing to do, or a longer operation may start).
    Stay,
    /// Allowed, and the VM goes to this runstate.
    To(RunState),
}

/// The table's answer for an event the runstate does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// What was asked.
    pub op: &'static str,
    /// The runstate that refuses it.
    pub state: RunState,
    /// What to do instead (empty, or starting with ": ").
    pub hint: &'static str,
}

/// The transition table.
pub fn step(from: RunState, event: RunEvent) -> Result<Step, Refused> {
    use RunState::*;
    let refuse = |op, hint| {
        Err(Refused {
            op,
            state: from,
            hint,
        })
    };
    match (from, event) {
        (InMigrate, RunEvent::Boot) => Ok(Step::To(Running)),
        (_, RunEvent::Boot) => refuse("boot", ""),

        (Running, RunEvent::Pause) => Ok(Step::To(Paused)),
        (Paused, RunEvent::Pause) => Ok(Step::Stay),
        (_, RunEvent::Pause) => refuse("pause", ""),

        // After a save, resume cancels it: a guest that had suspended itself stays suspended (it
        // needs system-wakeup, as it would have on the destination).
        (
            PostMigrate,
            RunEvent::Resume {
                saved_suspended: true,
            },
        ) => Ok(Step::To(Suspended)),
        (Paused | PostMigrate, RunEvent::Resume { .. }) => Ok(Step::To(Running)),
        (Running, RunEvent::Resume { .. }) => Ok(Step::Stay),
        (Suspended, RunEvent::Resume { .. }) => {
            refuse("resume", ": the guest suspended itself, use system-wakeup")
        }
        (_, RunEvent::Resume { .. }) => refuse("resume", ""),

        (Suspended, RunEvent::Wakeup) => Ok(Step::To(Running)),
        (_, RunEvent::Wakeup) => refuse("wake up", ": only a suspended guest can be woken"),

        (Running | Paused, RunEvent::GuestSuspend) => Ok(Step::To(Suspended)),
        (_, RunEvent::GuestSuspend) => Ok(Step::Stay),

        (Running | Paused | Suspended, RunEvent::Migrate) => Ok(Step::Stay),
        (_, RunEvent::Migrate) => refuse("migrate", ""),
        (Running | Paused | Suspended, RunEvent::Saved) => Ok(Step::To(PostMigrate)),
        (_, RunEvent::Saved) => refuse("complete a save", ""),

        (InMigrate, RunEvent::MigrateIncoming) => Ok(Step::Stay),
        (_, RunEvent::MigrateIncoming) => refuse(
            "migrate-incoming",
            ": start a new vmmd with --incoming defer to load a state file",
        ),
        (InMigrate, RunEvent::Loaded(saved)) => Ok(Step::To(saved.into())),
        (_, RunEvent::Loaded(_)) => refuse("complete a load", ""),

        (Shutdown, RunEvent::Shutdown) => Ok(Step::Stay),
        (_, RunEvent::Shutdown) => Ok(Step::To(Shutdown)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;

    const ALL: [RunState; 6] = [Running, Paused, Suspended, InMigrate, PostMigrate, Shutdown];

    fn to(from: RunState, e: RunEvent) -> Option<RunState> {
        match step(from, e) {
            Ok(Step::To(s)) => Some(s),
            Ok(Step::Stay) => Some(from),
            Err(_) => None,
        }
    }

    #[test]
    fn the_operator_pauses_and_resumes_a_running_guest() {
        assert_eq!(to(Running, RunEvent::Pause), Some(Paused));
        assert_eq!(step(Paused, RunEvent::Pause), Ok(Step::Stay));
        let resume = RunEvent::Resume {
            saved_suspended: false,
        };
        assert_eq!(to(Paused, resume), Some(Running));
        assert_eq!(step(Running, resume), Ok(Step::Stay));
        for s in [Suspended, InMigrate, PostMigrate, Shutdown] {
            assert!(step(s, RunEvent::Pause).is_err(), "pause from {s}");
        }
    }

    #[test]
    fn a_suspended_guest_needs_wakeup_not_resume() {
        let resume = RunEvent::Resume {
            saved_suspended: false,
        };
        let refused = step(Suspended, resume).expect_err("resume of a suspended guest");
        assert!(refused.hint.contains("system-wakeup"));
        assert_eq!(to(Suspended, RunEvent::Wakeup), Some(Running));
        for s in ALL.into_iter().filter(|s| *s != Suspended) {
            assert!(step(s, RunEvent::Wakeup).is_err(), "wakeup from {s}");
        }
        assert_eq!(to(Running, RunEvent::GuestSuspend), Some(Suspended));
        assert_eq!(to(Paused, RunEvent::GuestSuspend), Some(Suspended));
        assert_eq!(step(InMigrate, RunEvent::GuestSuspend), Ok(Step::Stay));
    }

    #[test]
    fn resume_after_a_save_cancels_it_in_the_saved_runstate() {
        for (from, _) in [Running, Paused, Suspended].map(|s| (s, ())) {
            assert_eq!(step(from, RunEvent::Migrate), Ok(Step::Stay));
            assert_eq!(to(from, RunEvent::Saved), Some(PostMigrate));
        }
        let back = |saved_suspended| to(PostMigrate, RunEvent::Resume { saved_suspended });
        assert_eq!(back(false), Some(Running));
        assert_eq!(back(true), Some(Suspended));
        for s in [InMigrate, PostMigrate, Shutdown] {
            assert!(step(s, RunEvent::Migrate).is_err(), "migrate from {s}");
        }
    }

    #[test]
    fn only_an_incoming_vm_loads_and_boots() {
        for s in ALL {
            let ok = s == InMigrate;
            assert_eq!(step(s, RunEvent::MigrateIncoming).is_ok(), ok, "{s}");
            assert_eq!(step(s, RunEvent::Boot).is_ok(), ok, "{s}");
        }
        let refused = step(Running, RunEvent::MigrateIncoming).expect_err("running");
        assert!(refused.hint.contains("--incoming defer"));
        for saved in [
            SavedRunState::Running,
            SavedRunState::Paused,
            SavedRunState::Suspended,
        ] {
            assert_eq!(to(InMigrate, RunEvent::Loaded(saved)), Some(saved.into()));
        }
    }

    #[test]
    fn shutdown_is_reached_from_everywhere_and_final() {
        for s in ALL {
            assert_eq!(to(s, RunEvent::Shutdown), Some(Shutdown));
        }
        assert_eq!(step(Shutdown, RunEvent::Shutdown), Ok(Step::Stay));
        for e in [
            RunEvent::Boot,
            RunEvent::Pause,
            RunEvent::Wakeup,
            RunEvent::Migrate,
            RunEvent::MigrateIncoming,
        ] {
            assert!(step(Shutdown, e).is_err(), "{e:?} after shutdown");
        }
    }

    #[test]
    fn saved_runstates_round_trip() {
        for s in ALL {
            if let Some(saved) = s.saved() {
                assert_eq!(RunState::from(saved), s);
            }
        }
        assert_eq!(PostMigrate.saved(), None);
    }
}
