//! Command-line flags.

use std::path::PathBuf;

use clap::Parser;

use crate::devices::console::SerialBackendSpec;
use crate::memory::MemorySpec;
use crate::vm::{FaultInjection, Incoming, VmConfig};

/// vmmd: a KVM virtual machine monitor that owns one VM and can be live-updated.
#[derive(Debug, Parser)]
#[command(name = "vmmd", version = crate::vm::VERSION)]
pub struct Cli {
    /// Unix socket the gRPC API is served on (created mode 0600).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "check_state_version"
    )]
    pub api_socket: Option<PathBuf>,
    /// PVH ELF kernel to boot (not loaded with --incoming).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: u8,
    /// Guest RAM: size=SIZE[,path=FILE] (an anonymous memfd without path).
    #[arg(long, default_value = "size=256M")]
    pub memory: MemorySpec,
    /// COM1 backend: socket=PATH, file=PATH, pty or null.
    #[arg(long, default_value = "null")]
    pub serial: SerialBackendSpec,
    /// Wait for an incoming migration (`defer`) or load one at start (`file:PATH`).
    #[arg(long, value_name = "defer|file:PATH")]
    pub incoming: Option<Incoming>,
    /// Log filter (tracing env-filter syntax), e.g. info or vmmd=debug.
    #[arg(long, default_value = "info", env = "VMMD_LOG")]
    pub log_level: String,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Refuse to start with a configuration that would block a cpr-exec live update.
    #[arg(long)]
    pub only_cpr_capable: bool,
    /// Seconds a vmmd started by cpr-exec with `--incoming defer` waits for migrate-incoming before it
    /// rolls back to the previous binary (so a dead orchestrator never leaves the guest paused).
    #[arg(long, default_value_t = 10)]
    pub cpr_incoming_timeout: u64,
    /// Test hook: make the incoming load fail or crash (exercises cpr-exec rollback).
    #[arg(long, value_enum, hide = true)]
    pub fault_inject: Option<FaultInjection>,
    /// Exit 0 if this vmmd can read state files of format version V, 1 otherwise.
    #[arg(long, value_name = "V")]
    pub check_state_version: Option<u32>,
}

impl Cli {
    /// The VM configuration these flags describe.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            memory: self.memory.clone(),
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            serial: self.serial.clone(),
            api_socket: self.api_socket.clone().unwrap_or_default(),
            incoming: self.incoming.clone(),
            fault: self.fault_inject,
        }
    }
}
