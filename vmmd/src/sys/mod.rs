//! The bottom layer: process primitives that know nothing else of vmmd.
//!
//! - [`continuation`]: `CLONE_VM` children that continue a thread's work and outlive `execve`.
//! - [`relocate`]: the one protocol by which a thread's loop moves into such a child, comes back
//!   (rollback) or ends there (the new process took over). The console worker and the vCPU loops
//!   both use it.
//! - [`fd`]: close-on-exec, open fds and the monotonic clock.
//!
//! Nothing here imports another vmmd module.

pub mod continuation;
pub mod fd;
pub mod relocate;
