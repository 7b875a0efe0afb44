//! vmmd: a KVM virtual machine monitor that owns one VM, is driven over gRPC, and can save, restore
//! and live-update its guest. The binary is `main.rs`; the modules are public so that tests,
//! benchmarks and the fuzz target use the same code.
//!
//! Layers, bottom up; a module imports only from its own layer or below:
//!
//! 1. `sys`, `persist`: process and fd mechanisms; the device-state trait.
//! 2. `memory`, `vcpu`, `devices`, `vfio`, `boot`: guest RAM, vCPUs, devices and their saved
//!    states.
//! 3. `state`: the VM state composed of those (state file and hand-over formats, versions).
//! 4. `vm`: the VM, its construction and runstates.
//! 5. `migration` (save, load, cpr-reboot), `cpr` (live update).
//! 6. `api` (gRPC), `config` (flags and TOML), `notify` (systemd), `main`.

pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpr;
pub mod devices;
pub mod memory;
pub mod migration;
pub mod notify;
pub mod persist;
pub mod state;
pub mod sys;
pub mod vcpu;
pub mod vfio;
pub mod vm;

#[cfg(test)]
mod layering;
