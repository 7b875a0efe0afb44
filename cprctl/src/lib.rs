//! cprctl: the command-line client and orchestrator for vmmd.
//!
//! The library half exists so the end-to-end tests and later workflows (`update`) reuse the
//! same client, output and console code as the binary.

pub mod client;
pub mod commands;
pub mod console;
pub mod demo;
pub mod exporter;
pub mod output;
pub mod reboot;
pub mod update;
pub mod workflow;
