//! What this process last saw of a live update, typed (`Info.update_state`) and as text
//! (`Info.update_status`). Tools decide on the kind; the text is for people.

use std::fmt;

/// The update status of this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UpdateStatus {
    /// No update since this process started fresh.
    #[default]
    None,
    /// An update runs; the step it is at.
    InProgress(&'static str),
    /// cpr-exec failed before the exec and was undone; the guest runs on this binary.
    Failed(String),
    /// This process took the guest over from the given (older) version.
    Updated { from: String },
    /// The new binary failed after the exec and this binary was re-executed; why.
    RolledBack(String),
}

impl UpdateStatus {
    /// The detail alone: the step, the error, the reason or the version.
    pub fn detail(&self) -> &str {
        match self {
            UpdateStatus::None => "",
            UpdateStatus::InProgress(step) => step,
            UpdateStatus::Failed(e) | UpdateStatus::RolledBack(e) => e,
            UpdateStatus::Updated { from } => from,
        }
    }
}

impl fmt::Display for UpdateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateStatus::None => Ok(()),
            UpdateStatus::InProgress(step) => write!(f, "cpr-exec: {step}"),
            UpdateStatus::Failed(e) => write!(f, "cpr-exec failed: {e}"),
            UpdateStatus::Updated { from } => write!(f, "updated from vmmd {from}"),
            UpdateStatus::RolledBack(why) => write!(f, "rolled back to this binary: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_detail() {
        assert_eq!(UpdateStatus::None.to_string(), "");
        assert_eq!(
            UpdateStatus::InProgress("saving").to_string(),
            "cpr-exec: saving"
        );
        let f = UpdateStatus::Failed("no such file".into());
        assert_eq!(f.to_string(), "cpr-exec failed: no such file");
        assert_eq!(f.detail(), "no such file");
        let u = UpdateStatus::Updated {
            from: "0.1.0".into(),
        };
        assert_eq!(u.to_string(), "updated from vmmd 0.1.0");
        let r = UpdateStatus::RolledBack("crashed".into());
        assert_eq!(r.to_string(), "rolled back to this binary: crashed");
    }
}
