//! vCPUs: one thread each ([`VcpuSet`]), a pause/kick protocol ([`control`]), the loop that runs
//! the guest ([`run`]), and complete KVM state get/set through [`crate::persist::Persist`]
//! ([`state`]).

pub mod control;
pub mod run;
pub mod state;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VcpuFd;

use crate::devices::{Devices, GuestRequest};
use crate::sys::relocate::RelocateError;

pub use control::VcpuControl;
pub use run::{install_kick_handler, kick_signal};
pub use state::{cpuid_for, saveable_msrs, Vcpu, VcpuArgs, VcpuState};

use control::KickTarget;
use run::run_vcpu;

/// A vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on a vCPU failed.
    #[error("vCPU {id}: {op} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused an MSR the guest cannot run without.
    #[error(
        "vCPU {id}: KVM refused to restore MSR {index:#x}, which the guest's clock depends on"
    )]
    CriticalMsr {
        /// vCPU index.
        id: u8,
        /// MSR index.
        index: u32,
    },
    /// A FAM wrapper could not be built.
    #[error("vCPU {id}: {what} has too many entries ({count})")]
    TooMany {
        /// vCPU index.
        id: u8,
        /// Which list.
        what: &'static str,
        /// How many.
        count: usize,
    },
    /// The thread could not be created.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// vCPUs did not stop in time.
    #[error("{missing} vCPU(s) did not pause within {timeout:?}; the VM keeps running")]
    PauseTimeout {
        /// How many did not stop.
        missing: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU loops could not be moved into continuation children.
    #[error("cannot hand the vCPUs to a bridge process; they stay on this process")]
    Detach {
        /// What went wrong.
        #[source]
        source: RelocateError,
    },
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, op, source }
}

/// What a vCPU thread reports to the VM.
#[derive(Debug, Clone)]
pub enum VcpuEvent {
    /// The guest asked for a power state change.
    Guest(GuestRequest),
    /// The vCPU hit an error it cannot go on from.
    Failed {
        /// vCPU index.
        id: u8,
        /// What happened.
        reason: String,
    },
}

/// A running set of vCPU threads.
pub struct VcpuSet {
    /// The vCPU fds, for state save/restore while paused.
    pub fds: Vec<Arc<Mutex<VcpuFd>>>,
    /// The pause/resume control.
    pub control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    /// The vCPU fds' numbers (readable without taking the locks a running vCPU holds).
    raw_fds: Vec<libc::c_int>,
}

impl VcpuSet {
    /// Starts one parked thread per vCPU.
    pub fn start(
        fds: Vec<VcpuFd>,
        devices: Arc<Devices>,
        events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    ) -> Result<VcpuSet, VcpuError> {
        let control = VcpuControl::new_paused();
        let raw_fds = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let fds: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let mut threads = Vec::new();
        for (i, fd) in fds.iter().enumerate() {
            let id = i as u8;
            let (fd, control, devices, events) =
                (fd.clone(), control.clone(), devices.clone(), events.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(id, fd, control, devices, events))
                .map_err(|source| VcpuError::Spawn { id, source })?;
            threads.push(handle);
        }
        let set = VcpuSet {
            fds,
            control,
            threads,
            raw_fds,
        };
        {
            let mut list = set
                .control
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            list.extend(
                set.threads
                    .iter()
                    .map(|t| KickTarget::Thread(t.as_pthread_t())),
            );
        }
        Ok(set)
    }

    /// The vCPU fds' numbers.
    pub fn raw_fds(&self) -> &[libc::c_int] {
        &self.raw_fds
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    /// Stops the threads and waits for them.
    pub fn shutdown(&mut self) {
        self.control.exit();
        self.control.kick_all();
        self.control
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
