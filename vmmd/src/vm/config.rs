//! What a VM is built from: its configuration, how it starts, and the test hooks.

use std::fmt;
use std::path::PathBuf;

use cpr_common::{MigrationUri, UriError};

use crate::console::SerialBackendSpec;
use crate::memory::MemorySpec;
use crate::vfio::VfioConfig;

/// How vmmd was asked to start the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Build the VM and wait for migrate-incoming.
    Defer,
    /// Load this URI at start.
    Uri(MigrationUri),
}

impl std::str::FromStr for Incoming {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "defer" {
            Ok(Incoming::Defer)
        } else {
            s.parse().map(Incoming::Uri)
        }
    }
}

impl fmt::Display for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Incoming::Defer => f.write_str("defer"),
            Incoming::Uri(u) => u.fmt(f),
        }
    }
}

/// What the VM is built from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory: MemorySpec,
    /// PVH kernel; not loaded when the VM is incoming.
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// COM1 backend.
    pub serial: SerialBackendSpec,
    /// API socket path (reported by info).
    pub api_socket: PathBuf,
    /// Incoming migration, if any.
    pub incoming: Option<Incoming>,
    /// Test hook: make the next incoming load fail or crash.
    pub fault: Option<FaultInjection>,
    /// VFIO passthrough devices.
    pub vfio: VfioConfig,
    /// Populate guest RAM's host mappings in the background after a load without RAM.
    pub populate_after_load: bool,
    /// cpr-exec keeps the guest running in a bridge while the new binary starts (`cpr::bridge`).
    pub cpr_exec_bridge: bool,
    /// How long the bridge waits for the new process's take-over before it rolls back.
    pub cpr_takeover_timeout: std::time::Duration,
}

/// Failures a test can inject into an incoming load, to exercise cpr-exec rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultInjection {
    /// Abort the process while loading the state.
    CrashDuringLoad,
    /// Return an error while loading the state.
    FailLoad,
    /// Issue the last VFIO container's VADDR invalidation twice (the kernel refuses the second).
    VfioInvalidateTwice,
}
