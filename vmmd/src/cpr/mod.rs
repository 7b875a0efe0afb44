//! Checkpoint/restore: the saved form of a VM and how it is captured and loaded.

pub mod exec;
pub mod state;
