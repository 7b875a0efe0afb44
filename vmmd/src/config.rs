//! Command-line flags and the VM configuration file (TOML).
//!
//! ```toml
//! # /etc/vmmd/vm1.toml
//! api_socket = "/run/vmmd/vm1.sock"
//! kernel = "/var/lib/vmmd/images/guest.elf"
//! cmdline = "console=ttyS0"
//! vcpus = 2
//! serial = "socket=/run/vmmd/vm1.console"
//!
//! [memory]
//! size = "1G"
//! path = "/dev/shm/vmmd/vm1.ram"   # omit for an anonymous memfd
//! ```
//!
//! A flag given on the command line wins over the file.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::console::SerialBackendSpec;
use crate::memory::MemorySpec;
use crate::vfio::{VfioConfig, VfioDeviceSpec};
use crate::vm::{FaultInjection, Incoming, VmConfig};

/// vmmd: a KVM virtual machine monitor that owns one VM and can be live-updated.
#[derive(Debug, Parser)]
#[command(name = "vmmd", version = crate::vm::VERSION)]
pub struct Cli {
    /// Unix socket the gRPC API is served on (created mode 0600).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// VM configuration file (TOML); command-line flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PVH ELF kernel to boot (not loaded with --incoming).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line (default empty).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: Option<u8>,
    /// Guest RAM: size=SIZE[,path=FILE] (an anonymous memfd without path; default size=256M).
    #[arg(long)]
    pub memory: Option<MemorySpec>,
    /// COM1 backend: socket=PATH, file=PATH, pty or null (default null).
    #[arg(long)]
    pub serial: Option<SerialBackendSpec>,
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
    /// Passthrough device: vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,container=NAME][,msi=off] (repeatable;
    /// devices with the same container name share a VFIO container, all by default).
    #[arg(long = "device", value_name = "vfio=PATH[,container=NAME][,msi=off]")]
    pub devices: Vec<VfioDeviceSpec>,
    /// Test hook: serve VFIO from a model of the kernel's type1 IOMMU whose state lives in PATH.
    #[arg(long, value_name = "PATH", hide = true)]
    pub vfio_model: Option<PathBuf>,
    /// Test hook: make a VFIO model call fail, OP[:CONTAINER|*[:NTH[:ERRNO]]] (repeatable).
    #[arg(long, value_name = "FAULT", hide = true, value_parser = crate::vfio::model::fault_spec)]
    pub vfio_model_fault: Vec<String>,
    /// Test hook: the VFIO model lacks VFIO_UPDATE_VADDR and VFIO_UNMAP_ALL.
    #[arg(long, hide = true)]
    pub vfio_model_without_vaddr: bool,
    /// Map guest RAM into this process ahead of the guest's first accesses after a load without RAM:
    /// with the cpr-exec bridge, before the take-over (while the guest still runs in the bridge);
    /// otherwise (classic cpr-exec, cpr-reboot) in the background after the load. Off by default:
    /// see the README's "Figures" for what it does to the brownout here.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL",
          env = "VMMD_POPULATE_AFTER_LOAD")]
    pub populate_after_load: bool,
    /// cpr-exec: keep the guest running in a bridge (children of this process that share its
    /// memory and outlive the exec) while the new binary starts, so that the pause is only the
    /// hand-off and the take-over. Off: the guest stays paused from the save to the new process's
    /// load. Never used with VFIO devices.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL",
          env = "VMMD_CPR_EXEC_BRIDGE")]
    pub cpr_exec_bridge: bool,
    /// cpr-exec with the bridge: how long the bridge waits for the new process to take the guest
    /// over before it kills it and runs this binary again (which takes the guest over). Make it
    /// longer than the new process's start-up plus, with `--incoming defer`, its
    /// `--cpr-incoming-timeout`.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub cpr_takeover_timeout: u64,
    /// Exit 0 if this vmmd can read state files of format version V, 1 otherwise.
    #[arg(long, value_name = "V")]
    pub check_state_version: Option<u32>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read VM configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for a VM configuration.
    #[error("VM configuration {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: toml::de::Error,
    },
    /// A value in the file is invalid.
    #[error("VM configuration {path}: {field}: {detail}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        field: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// No API socket in flags or file.
    #[error("no API socket: give --api-socket PATH or api_socket in the configuration file")]
    NoApiSocket,
}

/// `[memory]` in the configuration file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    /// e.g. "1G".
    pub size: Option<String>,
    /// Backing file.
    pub path: Option<PathBuf>,
}

/// The configuration file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// API socket.
    pub api_socket: Option<PathBuf>,
    /// Kernel.
    pub kernel: Option<PathBuf>,
    /// Command line.
    pub cmdline: Option<String>,
    /// vCPUs.
    pub vcpus: Option<u8>,
    /// Guest RAM.
    #[serde(default)]
    pub memory: MemoryFile,
    /// Serial backend, as for --serial.
    pub serial: Option<String>,
    /// Passthrough devices, as for --device.
    #[serde(default)]
    pub devices: Vec<String>,
}

impl ConfigFile {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl Cli {
    /// The VM configuration the flags and the configuration file describe (flags win).
    pub fn vm_config(&self) -> Result<VmConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let path = self.config.clone().unwrap_or_default();
        let value = |field: &'static str, detail: String| ConfigError::Value {
            path: path.clone(),
            field,
            detail,
        };
        let memory = match (&self.memory, &file.memory.size) {
            (Some(m), _) => m.clone(),
            (None, Some(size)) => {
                let mut spec = format!("size={size}");
                if let Some(p) = &file.memory.path {
                    spec.push_str(&format!(",path={}", p.display()));
                }
                spec.parse::<MemorySpec>()
                    .map_err(|e| value("memory", e.to_string()))?
            }
            (None, None) => MemorySpec {
                size: 256 << 20,
                path: file.memory.path.clone(),
            },
        };
        let serial = match (&self.serial, &file.serial) {
            (Some(s), _) => s.clone(),
            (None, Some(s)) => s
                .parse()
                .map_err(|e: crate::console::ConsoleError| value("serial", e.to_string()))?,
            (None, None) => SerialBackendSpec::Null,
        };
        let devices = if self.devices.is_empty() {
            file.devices
                .iter()
                .map(|d| d.parse::<VfioDeviceSpec>().map_err(|e| value("devices", e)))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            self.devices.clone()
        };
        let vcpus = self.vcpus.or(file.vcpus).unwrap_or(1);
        if !(1..=64).contains(&vcpus) {
            return Err(value("vcpus", format!("{vcpus} is not in 1..=64")));
        }
        Ok(VmConfig {
            vcpus,
            memory,
            kernel: self.kernel.clone().or(file.kernel),
            cmdline: self.cmdline.clone().or(file.cmdline).unwrap_or_default(),
            serial,
            api_socket: self
                .api_socket
                .clone()
                .or(file.api_socket)
                .ok_or(ConfigError::NoApiSocket)?,
            incoming: self.incoming.clone(),
            fault: self.fault_inject,
            vfio: VfioConfig {
                devices,
                model: self.vfio_model.clone(),
                model_faults: self.vfio_model_fault.clone(),
                model_without_vaddr: self.vfio_model_without_vaddr,
            },
            populate_after_load: self.populate_after_load,
            cpr_exec_bridge: self.cpr_exec_bridge,
            cpr_takeover_timeout: std::time::Duration::from_secs(self.cpr_takeover_timeout),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("vmmd").chain(args.iter().copied()))
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("vmmd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("vm1.toml");
        std::fs::write(
            &file,
            "api_socket = \"/run/vmmd/vm1.sock\"\nkernel = \"/k\"\nvcpus = 2\nserial = \"socket=/run/c\"\n[memory]\nsize = \"1G\"\npath = \"/dev/shm/vm1.ram\"\n",
        )
        .expect("write");
        let f = file.to_str().expect("utf8");
        let c = cli(&["--config", f]).vm_config().expect("config");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(
            c.memory.path.as_deref(),
            Some(Path::new("/dev/shm/vm1.ram"))
        );
        assert_eq!(c.serial.to_string(), "socket=/run/c");
        let c = cli(&["--config", f, "--vcpus", "1", "--memory", "size=64M"])
            .vm_config()
            .expect("config");
        assert_eq!((c.vcpus, c.memory.size, c.memory.path), (1, 64 << 20, None));
        std::fs::write(&file, "vcpu = 2\n").expect("write");
        let err = cli(&["--config", f]).vm_config().expect_err("unknown key");
        assert!(err.to_string().contains("vcpu"), "{err}");
        assert!(matches!(
            cli(&[]).vm_config(),
            Err(ConfigError::NoApiSocket)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
