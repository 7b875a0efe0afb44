//! vmmd: a KVM virtual machine monitor that owns one VM, is driven over gRPC, and can save and restore
//! its guest whole. The binary is `main.rs`; the modules are public so that tests, benchmarks and the
//! fuzz target use the same code.

pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpr;
pub mod devices;
pub mod memory;
pub mod notify;
pub mod persist;
pub mod sys;
pub mod vcpu;
pub mod vfio;
pub mod vm;
