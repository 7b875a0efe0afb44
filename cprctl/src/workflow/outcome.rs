//! How a workflow ended, and the exit status that follows from it.

use serde::{Serialize, Serializer};

/// Exit status when the command ran but failed (gRPC error, failed migration, a workflow that
/// failed with the guest as before).
pub const EXIT_FAILED: u8 = 1;
/// Exit status when vmmd (or its console) could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status of a failed workflow after which the guest is not back in its runstate from
/// before (or vmmd does not answer): an operator must look.
pub const EXIT_GUEST_NOT_RESTORED: u8 = 4;

/// Where the guest is after a workflow that did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// As before the workflow (refused, failed and undone, rolled back).
    AsBefore,
    /// Not as before, or unknown: an operator must look.
    NotRestored,
    /// vmmd could not be reached at all: the workflow changed nothing.
    Unreached,
}

/// How a workflow ended. Reports print its word; the exit status follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `update`: the new binary runs the guest.
    Updated,
    /// `reboot-prep`: the guest is saved and vmmd stopped.
    Prepared,
    /// `reboot-resume`: the guest runs again.
    Resumed,
    /// `--all`: nothing to do for this VM.
    Skipped,
    /// `--all` without `--keep-going`: not started because another VM failed (nothing changed).
    NotStarted,
    /// A check failed before anything changed.
    Refused(Guest),
    /// The workflow failed (update: before the exec, and vmmd resumed the guest).
    Failed(Guest),
    /// A step failed after a change and the workflow (or vmmd) went back to before.
    RolledBack(Guest),
    /// `update`: it ran, but the result is not what was asked for.
    Unverified(Guest),
    /// What happened cannot be told (vmmd did not answer).
    Unknown(Guest),
}

impl Outcome {
    /// The word reports print, e.g. `rolled-back`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Updated => "updated",
            Self::Prepared => "prepared",
            Self::Resumed => "resumed",
            Self::Skipped => "skipped",
            Self::NotStarted => "not-started",
            Self::Refused(_) => "refused",
            Self::Failed(_) => "failed",
            Self::RolledBack(_) => "rolled-back",
            Self::Unverified(_) => "unverified",
            Self::Unknown(_) => "unknown",
        }
    }

    /// Whether the workflow did what was asked (or had nothing to do).
    pub fn is_success(self) -> bool {
        self.guest().is_none()
    }

    /// Where the guest is, for an outcome that is not a success.
    pub fn guest(self) -> Option<Guest> {
        match self {
            Self::Updated | Self::Prepared | Self::Resumed | Self::Skipped => None,
            Self::NotStarted => Some(Guest::AsBefore),
            Self::Refused(g)
            | Self::Failed(g)
            | Self::RolledBack(g)
            | Self::Unverified(g)
            | Self::Unknown(g) => Some(g),
        }
    }

    /// The process exit status: 0 success, 1 failed with the guest as before, 3 vmmd
    /// unreachable, 4 the guest is not as before.
    pub fn exit_code(self) -> u8 {
        match self.guest() {
            None => 0,
            Some(Guest::AsBefore) => EXIT_FAILED,
            Some(Guest::Unreached) => EXIT_UNREACHABLE,
            Some(Guest::NotRestored) => EXIT_GUEST_NOT_RESTORED,
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_exit_codes() {
        use Guest::*;
        let cases = [
            (Outcome::Updated, 0, "updated"),
            (Outcome::Prepared, 0, "prepared"),
            (Outcome::Resumed, 0, "resumed"),
            (Outcome::Skipped, 0, "skipped"),
            (Outcome::NotStarted, 1, "not-started"),
            (Outcome::Refused(AsBefore), 1, "refused"),
            (Outcome::Refused(Unreached), 3, "refused"),
            (Outcome::Failed(AsBefore), 1, "failed"),
            (Outcome::Failed(NotRestored), 4, "failed"),
            (Outcome::RolledBack(AsBefore), 1, "rolled-back"),
            (Outcome::Unverified(NotRestored), 4, "unverified"),
            (Outcome::Unknown(Unreached), 3, "unknown"),
            (Outcome::Unknown(NotRestored), 4, "unknown"),
        ];
        for (outcome, code, word) in cases {
            assert_eq!(outcome.exit_code(), code, "{outcome:?}");
            assert_eq!(outcome.name(), word);
            assert_eq!(outcome.is_success(), code == 0, "{outcome:?}");
            assert_eq!(
                serde_json::to_value(outcome).expect("json"),
                serde_json::Value::String(word.to_owned())
            );
        }
    }
}
