//! Checkpoint/restore: the saved form of a VM and how it is captured and loaded.

pub mod bridge;
pub mod exec;
pub mod state;
pub mod status;
