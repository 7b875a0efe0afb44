//! Migration modes.

use std::fmt;
use std::str::FromStr;

/// How a migration treats guest RAM and the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum MigrationMode {
    /// Copy guest RAM and all state into the destination.
    #[default]
    Normal,
    /// Save state without RAM and exec a new vmmd in place, keeping the RAM fds.
    CprExec,
    /// Save state without RAM to a file that survives a host reboot.
    CprReboot,
}

impl MigrationMode {
    /// The name used on the command line and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Normal => "normal",
            MigrationMode::CprExec => "cpr-exec",
            MigrationMode::CprReboot => "cpr-reboot",
        }
    }
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown migration mode name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration mode {0:?}: use normal, cpr-exec or cpr-reboot")]
pub struct UnknownMode(pub String);

impl FromStr for MigrationMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(MigrationMode::Normal),
            "cpr-exec" => Ok(MigrationMode::CprExec),
            "cpr-reboot" => Ok(MigrationMode::CprReboot),
            other => Err(UnknownMode(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in [
            MigrationMode::Normal,
            MigrationMode::CprExec,
            MigrationMode::CprReboot,
        ] {
            assert_eq!(m.as_str().parse::<MigrationMode>(), Ok(m));
        }
        assert!("exec"
            .parse::<MigrationMode>()
            .unwrap_err()
            .to_string()
            .contains("cpr-exec"));
    }
}
