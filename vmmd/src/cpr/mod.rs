//! Live update (cpr-exec): the update's whole story, step by step, each step next to its
//! compensation.
//!
//! | where | what |
//! | --- | --- |
//! | [`exec`] | the entry point [`crate::vm::Vm::cpr_exec`]: preflight, then one of the two paths, and the [`exec::Compensations`] stack |
//! | [`exec::classic`] | keep the address space → pause → invalidate VFIO VADDR → stop the console → save → hand over and exec |
//! | [`exec::bridged`] | console to the bridge → pause, vCPUs to the bridge, resume → control continuation → hand over and exec; the bridge's take-over |
//! | [`handover`] | the one hand-over builder and the exec that carries it |
//! | [`bridge`] | the take-over protocol between the new process and the bridge |
//! | [`incoming`] | in the new process: take the guest over, finish the load, or roll back |
//! | [`exec::process`] | the process mechanisms: binary checks, fds across `execve`, the exec, the rollback exec, the crash handler, the address-space keeper |
//! | [`continuation`] | `CLONE_VM` continuations that outlive `execve` |
//!
//! The load itself (state file → VM) is the same for every mode: `crate::migration`.

pub mod bridge;
pub mod error;
pub mod exec;
pub mod handover;
pub mod incoming;

pub use error::CprError;
