//! What reboot-prep leaves next to the state file (the marker), written durably, and the state
//! file's format version as its header says.

use std::io::{Read, Write};
use std::path::Path;

use cpr_common::state::{StateFileError, StateHeader, HEADER_LEN};
use serde::{Deserialize, Serialize};
use vmmd_proto::v1::RunState;

use super::{suffixed, RebootError};
use crate::output::run_state_name;

/// Format of the marker file.
pub(super) const MARKER_FORMAT: u32 = 1;

/// What reboot-prep leaves next to the state file so the next boot knows what to resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// Marker format, 1.
    pub format: u32,
    /// The VM's name.
    pub name: String,
    /// vmmd's API socket.
    pub socket: String,
    /// The state file.
    pub state: String,
    /// When the marker was written (unix microseconds).
    pub created_unix_micros: u64,
    /// When the save completed: the guest is stopped from here (unix microseconds).
    pub guest_stopped_unix_micros: u64,
    /// The vmmd that saved the guest.
    pub vmmd_version: String,
    /// Its binary.
    pub vmmd_executable: String,
    /// Its pid.
    pub vmmd_pid: u32,
    /// The state-file format version it wrote.
    pub state_format_version: u32,
    /// The host kernel before the reboot.
    pub host_kernel: String,
    /// The guest's runstate before reboot-prep.
    pub run_state_before: String,
    /// The runstate saved in the state file.
    pub run_state_saved: String,
    /// Whether reboot-prep suspended the guest (reboot-resume wakes it).
    pub suspended_by_prep: bool,
    /// The VM's configuration as vmmd reported it.
    pub config: MarkerConfig,
}

/// The VM configuration in a [`Marker`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MarkerConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub memory_bytes: u64,
    /// The RAM file.
    pub memory_path: String,
    /// Guest kernel.
    pub kernel: String,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial backend.
    pub serial: String,
    /// API socket.
    pub api_socket: String,
}

impl Marker {
    /// The runstate the guest must have once resumed: paused when it was paused before the
    /// prep, running otherwise.
    pub fn expected_run_state(&self) -> RunState {
        if self.run_state_before == run_state_name(RunState::Paused as i32) {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Reads and parses a marker.
    pub fn read(path: &Path) -> Result<Self, RebootError> {
        let text = std::fs::read_to_string(path).map_err(|source| RebootError::MarkerMissing {
            path: path.to_path_buf(),
            source,
        })?;
        let marker: Marker =
            serde_json::from_str(&text).map_err(|e| RebootError::MarkerInvalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        if marker.format != MARKER_FORMAT {
            return Err(RebootError::MarkerInvalid {
                path: path.to_path_buf(),
                detail: format!(
                    "format {}, this cprctl reads {MARKER_FORMAT}",
                    marker.format
                ),
            });
        }
        Ok(marker)
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, then fsyncs the directory.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), RebootError> {
    let io = |op, source| RebootError::MarkerIo {
        op,
        path: path.to_path_buf(),
        source,
    };
    let tmp = suffixed(path, ".tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", e))?;
    f.write_all(bytes).map_err(|e| io("cannot write", e))?;
    f.sync_all().map_err(|e| io("cannot fsync", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("cannot rename into place", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The format version in a state file's header, decoded by the common state-file decoder.
///
/// A version this cprctl does not read itself is still returned: whether the waiting vmmd's binary
/// reads it is that binary's answer (`--check-state-version`).
pub fn read_state_version(path: &Path) -> Result<u32, RebootError> {
    let mut f = std::fs::File::open(path).map_err(|e| RebootError::StateFile {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    Read::by_ref(&mut f)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| RebootError::StateFile {
            path: path.to_path_buf(),
            detail: format!("cannot read its header: {e}"),
        })?;
    match StateHeader::decode(&head, path) {
        Ok(header) => Ok(header.version),
        Err(
            StateFileError::NewerVersion { found, .. } | StateFileError::OlderVersion { found, .. },
        ) => Ok(found),
        Err(source) => Err(RebootError::StateHeader { source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_bad_ones_are_named() {
        let dir = std::env::temp_dir().join(format!("cprctl-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let m = Marker {
            format: MARKER_FORMAT,
            name: "vm1".into(),
            socket: "/run/vmmd/vm1.sock".into(),
            state: "/s".into(),
            created_unix_micros: 2,
            guest_stopped_unix_micros: 1,
            vmmd_version: "0.1.0".into(),
            vmmd_executable: "/usr/local/bin/vmmd".into(),
            vmmd_pid: 7,
            state_format_version: 1,
            host_kernel: "6.1".into(),
            run_state_before: "running".into(),
            run_state_saved: "suspended".into(),
            suspended_by_prep: true,
            config: MarkerConfig::default(),
        };
        let p = dir.join("m.json");
        write_durably(&p, &serde_json::to_vec(&m).expect("json")).expect("write");
        assert_eq!(Marker::read(&p).expect("read"), m);
        std::fs::write(&p, b"{").expect("write");
        let err = Marker::read(&p).expect_err("bad json");
        assert!(err.to_string().contains("m.json"), "{err}");
        let err = Marker::read(&dir.join("none.json")).expect_err("missing");
        assert!(err.to_string().contains("reboot-prep"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_version_comes_from_the_header() {
        let dir = std::env::temp_dir().join(format!("cprctl-sv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("s");
        // A newer version than this cprctl reads: reported for the waiting vmmd to judge.
        let mut b = cpr_common::state::STATE_MAGIC.to_vec();
        b.extend_from_slice(&99u32.to_le_bytes());
        std::fs::write(&p, &b).expect("write");
        assert_eq!(read_state_version(&p).expect("version"), 99);
        std::fs::write(&p, b"NOTSTATE0000").expect("write");
        let err = read_state_version(&p).expect_err("bad magic");
        assert!(err.to_string().contains("not a vmmd state file"), "{err}");
        assert!(err.to_string().contains("reboot-prep"), "{err}");
        let err = read_state_version(&dir.join("none")).expect_err("missing");
        assert!(matches!(err, RebootError::StateFile { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
