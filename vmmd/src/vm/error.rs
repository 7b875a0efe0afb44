//! Why a VM operation failed.

use super::RunState;
use crate::boot::pvh::BootError;
use crate::console::ConsoleError;
use crate::devices::serial::SerialError;
use crate::memory::MemoryError;
use crate::state::KvmVmError;
use crate::vcpu::VcpuError;
use crate::vfio::VfioError;

/// Why a VM operation failed. The VM is left as it was unless the message says otherwise. Saving,
/// loading and updating have their own errors (`migration::MigrationError`, `cpr::CprError`), which
/// wrap this one.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be used.
    #[error("cannot open /dev/kvm: is KVM available and are you allowed to use it?")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM: {op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// VM-wide state could not be saved or restored.
    #[error(transparent)]
    KvmState(#[from] KvmVmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU state or control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The console backend.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// COM1 state.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// The operation is not allowed in this runstate.
    #[error("cannot {op} while the VM is {state}{hint}")]
    WrongState {
        /// What was asked.
        op: &'static str,
        /// The current runstate.
        state: RunState,
        /// What to do instead.
        hint: &'static str,
    },
    /// The VM state does not encode.
    #[error("cannot encode the VM state")]
    Encode(#[source] cpr_common::state::StateFileError),
    /// An invariant of vmmd itself does not hold (a bug: report it).
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// No kernel to boot.
    #[error("no --kernel given: a VM that is not incoming needs a kernel to boot")]
    NoKernel,
    /// VFIO passthrough set-up.
    #[error(transparent)]
    Vfio(#[from] VfioError),
}
