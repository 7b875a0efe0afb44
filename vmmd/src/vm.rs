//! The VM: owns KVM, guest RAM, devices and vCPUs, and runs the runstate machine, save and load.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use cpr_common::state::{
    encode_meta, write_state_without_ram, StateFileError, StateReader, StateWriter,
};
use cpr_common::{MigrationMode, MigrationUri, UriError};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use tokio::sync::broadcast;
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use cpr_common::cpr::{fd_names, monotonic_ns, BridgeReply, BridgedEvent, CprHandover};

use crate::boot::pvh::{self, BootError};
use crate::console::{
    Console, ConsoleArgs, ConsoleError, ConsoleHandover, ConsoleState, SerialBackendSpec,
    StoppedConsole,
};
use crate::cpr::bridge::{self, BridgeError};
use crate::cpr::exec::{self as cpr_exec, CprExecError, PreservedFds};
use crate::cpr::state::{KvmVmError, KvmVmState, SavedRunState, VmState};
use crate::cpr::status::UpdateStatus;
use crate::devices::pci::PciBus;
use crate::devices::pm::PmDevice;
use crate::devices::serial::{SerialDevice, SerialError, COM1_GSI};
use crate::devices::{Devices, GuestRequest};
use crate::memory::{GuestRam, MemoryError, MemorySpec};
use crate::persist::Persist;
use crate::sys::continuation::Continuation;
use crate::vcpu::{self, Vcpu, VcpuArgs, VcpuError, VcpuEvent, VcpuSet};
use crate::vfio::dma::{DmaMapping, DmaStepError};
use crate::vfio::msi::{MsiCap, MsiRouter};
use crate::vfio::{Placement, Vfio, VfioConfig, VfioError};

/// vmmd's version as reported over the API: the crate version, or `VMMD_BUILD_VERSION` when the
/// binary was built with it set (how a test builds "a different vmmd" to update to).
pub const VERSION: &str = match option_env!("VMMD_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const RAM_CHUNK: usize = 8 << 20;
const PROGRESS_EVERY: u64 = 64 << 20;
const CONSOLE_BUFFER: usize = 1 << 20;
/// Guest RAM populated per step after a load (see `GuestRam::populate_in_background`).
const POPULATE_CHUNK: usize = 32 << 20;
/// Guest RAM unmapped per step before a cpr-exec (see `GuestRam::drop_host_mappings`).
const UNMAP_CHUNK: usize = 16 << 20;
/// Whether the one-shot `--fault-inject vfio-invalidate-twice` has fired in this process.
static INVALIDATED_TWICE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How vmmd was asked to start the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Build the VM and wait for migrate-incoming.
    Defer,
    /// Load this URI at start.
    Uri(MigrationUri),
}

impl std::str::FromStr for Incoming {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "defer" {
            Ok(Incoming::Defer)
        } else {
            s.parse().map(Incoming::Uri)
        }
    }
}

impl fmt::Display for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Incoming::Defer => f.write_str("defer"),
            Incoming::Uri(u) => u.fmt(f),
        }
    }
}

/// What the VM is built from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory: MemorySpec,
    /// PVH kernel; not loaded when the VM is incoming.
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// COM1 backend.
    pub serial: SerialBackendSpec,
    /// API socket path (reported by info).
    pub api_socket: PathBuf,
    /// Incoming migration, if any.
    pub incoming: Option<Incoming>,
    /// Test hook: make the next incoming load fail or crash.
    pub fault: Option<FaultInjection>,
    /// VFIO passthrough devices.
    pub vfio: VfioConfig,
    /// Populate guest RAM's host mappings in the background after a load without RAM.
    pub populate_after_load: bool,
    /// cpr-exec keeps the guest running in a bridge while the new binary starts (`cpr::bridge`).
    pub cpr_exec_bridge: bool,
}

/// Failures a test can inject into an incoming load, to exercise cpr-exec rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultInjection {
    /// Abort the process while loading the state.
    CrashDuringLoad,
    /// Return an error while loading the state.
    FailLoad,
    /// Issue the last VFIO container's VADDR invalidation twice (the kernel refuses the second).
    VfioInvalidateTwice,
}

/// What a vmmd started by cpr-exec inherits from the previous process.
pub struct Inherited {
    /// Guest RAM.
    pub ram: OwnedFd,
    /// The stopped console.
    pub console: ConsoleHandover,
    /// The hand-over itself.
    pub handover: CprHandover,
    /// Duplicates of the inherited VFIO fds, by hand-over name.
    pub vfio_fds: Vec<(String, OwnedFd)>,
    /// The bridge's control socket, when the previous process's bridge still runs the guest.
    pub bridge: Option<OwnedFd>,
    /// CLOCK_MONOTONIC when this process started.
    pub started_ns: u64,
}

/// The VM's runstate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by the operator.
    Paused,
    /// The guest suspended itself (S3).
    Suspended,
    /// Built, waiting for an incoming migration.
    InMigrate,
    /// Saved; the guest lives on elsewhere.
    PostMigrate,
    /// Powered off or failed; vmmd is exiting.
    Shutdown,
}

impl RunState {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Suspended => "suspended",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a VM operation failed. The VM is left as it was unless the message says otherwise.
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
    /// A bad migration URI.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The state file cannot be written or read.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The state file is for a different VM shape.
    #[error("state file {path} does not fit this VM: {detail}")]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// What differs and what to do.
        detail: String,
    },
    /// The mode is not implemented by this vmmd.
    #[error("migration mode {0} is not supported by this vmmd yet: use normal")]
    UnsupportedMode(MigrationMode),
    /// No kernel to boot.
    #[error("no --kernel given: a VM that is not incoming needs a kernel to boot")]
    NoKernel,
    /// A cpr-exec step failed.
    #[error(transparent)]
    CprExec(#[from] CprExecError),
    /// The mode is blocked by the configuration.
    #[error("{mode} is blocked: {blocker}")]
    Blocked {
        /// The mode.
        mode: MigrationMode,
        /// What blocks it and what to configure.
        blocker: String,
    },
    /// Injected by a test.
    #[error("injected fault: {0}")]
    Injected(&'static str),
    /// Taking the guest over from the cpr-exec bridge failed.
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    /// The cpr-exec bridge could not be set up; nothing was handed over.
    #[error("cannot set up the cpr-exec bridge: {0}; the guest runs on this binary (or update with --cpr-exec-bridge false)")]
    BridgeSetup(String),
    /// VFIO passthrough set-up.
    #[error(transparent)]
    Vfio(#[from] VfioError),
    /// A VFIO DMA step of a live update failed (and was undone as far as the message says).
    #[error("VFIO DMA {step}: {source}")]
    VfioDma {
        /// Which step.
        step: &'static str,
        /// The failed call and its compensation.
        #[source]
        source: DmaStepError,
    },
}

/// Something observers of the VM want to know.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// The runstate changed.
    RunState {
        /// Before.
        old: RunState,
        /// After.
        new: RunState,
        /// Why.
        reason: String,
    },
    /// Migration progress.
    Migration(MigrationProgress),
}

/// One step of a migration, as reported in events.
#[derive(Debug, Clone)]
pub struct MigrationProgress {
    /// Status.
    pub status: MigrationStatus,
    /// Current phase.
    pub phase: String,
    /// Bytes done in this phase.
    pub bytes_done: u64,
    /// Bytes in this phase.
    pub bytes_total: u64,
    /// Free text (the error on failure).
    pub message: String,
    /// Incoming or outgoing.
    pub incoming: bool,
}

/// Status of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationStatus {
    /// None yet.
    #[default]
    None,
    /// In progress.
    Active,
    /// Done.
    Completed,
    /// Failed; see the error.
    Failed,
}

/// The last migration, for query-migrate.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Status.
    pub status: MigrationStatus,
    /// Mode used.
    pub mode: MigrationMode,
    /// Where to/from.
    pub uri: String,
    /// The error when it failed.
    pub error: Option<String>,
    /// Phase name and duration, in order.
    pub phases: Vec<(String, Duration)>,
    /// Start to end.
    pub total: Duration,
    /// Guest RAM bytes moved.
    pub ram_bytes: u64,
    /// Meta bytes moved.
    pub state_bytes: u64,
    /// How long the vCPUs were stopped by the migration.
    pub downtime: Duration,
    /// Incoming or outgoing.
    pub incoming: bool,
}

/// Broadcasts [`VmEvent`]s to API subscribers.
#[derive(Clone)]
pub struct EventBus(broadcast::Sender<(SystemTime, VmEvent)>);

impl EventBus {
    /// A bus that keeps the last 1024 events for slow subscribers.
    pub fn new() -> EventBus {
        EventBus(broadcast::channel(1024).0)
    }
    /// Sends an event (dropped when nobody listens).
    pub fn send(&self, e: VmEvent) {
        let _ = self.0.send((SystemTime::now(), e));
    }
    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<(SystemTime, VmEvent)> {
        self.0.subscribe()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Records phase timings of one migration.
struct PhaseClock {
    start: Instant,
    last: Instant,
    phases: Vec<(String, Duration)>,
}

impl PhaseClock {
    fn new() -> PhaseClock {
        let now = Instant::now();
        PhaseClock {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }
    fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.phases.push((name.to_string(), now - self.last));
        self.last = now;
    }
}

/// The VM and everything it owns.
///
/// Field order is drop order: vCPU threads stop first, then devices and the console, then the KVM VM,
/// and guest RAM is unmapped last.
pub struct Vm {
    vcpus: VcpuSet,
    devices: Arc<Devices>,
    console: Option<Console>,
    vm_fd: VmFd,
    /// VFIO containers and DMA mappings (the devices themselves are on the PCI bus); closed before
    /// guest RAM is unmapped, so the pinned pages are released first.
    vfio: Option<Vfio>,
    ram: GuestRam,
    config: VmConfig,
    msr_indices: Vec<u32>,
    run_state: RunState,
    mode: MigrationMode,
    exec_args: Vec<String>,
    api_listener_fd: Option<RawFd>,
    inherited: Option<InheritedContext>,
    generation: u64,
    update_status: UpdateStatus,
    workflow_step: String,
    /// The runstate a completed save started from (what `resume` from postmigrate returns to).
    saved_from: Option<SavedRunState>,
    /// Shut down straight from `postmigrate`: the state was handed to a successor.
    shut_down_after_save: bool,
    events: EventBus,
    last_migration: Arc<Mutex<MigrationReport>>,
    /// Where vCPU events go (guest requests the bridge saw are re-raised here).
    vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    _kvm: Kvm,
}

/// What cpr-exec sets up before pausing the guest, so that none of it happens inside the pause.
struct ExecPrepared {
    /// The running binary, for a rollback.
    previous: OwnedFd,
    /// Keeps this address space alive across the exec (when it could be started).
    keeper: Option<cpr_exec::AddressSpaceKeeper>,
}

/// What stays of the hand-over while the new process loads the state.
struct InheritedContext {
    handover: CprHandover,
    /// The inherited fds (by hand-over name) under the numbers the hand-over names, kept for a
    /// rollback.
    held: Vec<(String, OwnedFd)>,
    started_ns: u64,
    /// The previous process's bridge, which runs the guest until it is taken over.
    bridge: Option<std::os::unix::net::UnixStream>,
    /// The bridge's answer, once taken over.
    bridge_reply: Option<BridgeReply>,
}

/// How long the new process waits for the bridge to stop the guest and write the state.
const BRIDGE_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long moving the console or vCPU loops into (or out of) the bridge may take.
const BRIDGE_MOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The VM, for the bridge's control continuation, which runs after this process's `execve` on the
/// same memory.
struct VmPtr(*const Vm);
// SAFETY: the control continuation only reads the VM through shared references while the thread
// that owns it is blocked (until the continuation exits) or gone (after the exec).
unsafe impl Send for VmPtr {}

/// What the bridge's control continuation works with.
struct BridgeTask {
    vm: VmPtr,
    ctl: RawFd,
    /// The state memfd, as a path in the bridge's fd table.
    state: PathBuf,
    /// The operator's state file: where the state goes when the new process died first.
    path: PathBuf,
    saved: SavedRunState,
}

/// `/dev/kvm` opened and an empty VM created (TSS and identity map placed): what does not depend on
/// the configuration. [`EarlyVm::start`] does it on a thread while `main` parses its arguments and
/// the hand-over, which takes it out of a cpr-exec successor's start-up.
pub struct EarlyVm(std::thread::JoinHandle<Result<(Kvm, VmFd), VmError>>);

impl EarlyVm {
    /// Starts creating the VM on a thread.
    pub fn start() -> std::io::Result<EarlyVm> {
        std::thread::Builder::new()
            .name("vmmd-early-vm".into())
            .spawn(new_kvm_vm)
            .map(EarlyVm)
    }

    fn join(self) -> Result<(Kvm, VmFd), VmError> {
        self.0
            .join()
            .unwrap_or_else(|_| Err(VmError::Injected("the VM-creating thread panicked")))
    }
}

fn new_kvm_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    let kvm_err = |op| move |source| VmError::Kvm { op, source };
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    Ok((kvm, vm_fd))
}

impl Vm {
    /// Builds the VM with its vCPUs parked: KVM VM (the one `early` made, when given), RAM slots,
    /// irqchip, PIT, vCPUs, devices.
    pub fn create(
        config: VmConfig,
        events: EventBus,
        vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
        inherited: Option<Inherited>,
        early: Option<EarlyVm>,
    ) -> Result<Vm, VmError> {
        let t0 = Instant::now();
        let lap =
            |what: &str| tracing::debug!(at_us = t0.elapsed().as_micros() as u64, what, "create");
        let kvm_err = |op| move |source| VmError::Kvm { op, source };
        let (kvm, vm_fd) = match early {
            Some(e) => e.join()?,
            None => new_kvm_vm()?,
        };
        let mut vfio_fds = Vec::new();
        lap("vm set up");
        let (ram, console, inherited) = match inherited {
            Some(i) => (
                GuestRam::inherited(i.ram, &config.memory)?,
                match i.bridge {
                    // The bridge serves the console until the take-over.
                    Some(_) => Console::resume_deferred(i.console, CONSOLE_BUFFER)?,
                    None => Console::resume(StoppedConsole::restore(
                        ConsoleArgs {
                            handover: i.console,
                            buffer_bytes: CONSOLE_BUFFER,
                        },
                        &ConsoleState {
                            output: i.handover.console_pending_out.clone(),
                            input: i.handover.console_pending_in.clone(),
                        },
                    )?)?,
                },
                {
                    vfio_fds = i.vfio_fds;
                    Some(InheritedContext {
                        handover: i.handover,
                        held: Vec::new(),
                        started_ns: i.started_ns,
                        bridge: i.bridge.map(std::os::unix::net::UnixStream::from),
                        bridge_reply: None,
                    })
                },
            ),
            None => (
                GuestRam::create(&config.memory, config.incoming.is_some())?,
                Console::open(&config.serial, CONSOLE_BUFFER)?,
                None,
            ),
        };
        lap("ram mapped");
        // Memory slots before the irqchip: registering them after it costs milliseconds each.
        for (slot, (gpa, host, len)) in ram.host_slices().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: gpa,
                memory_size: len as u64,
                userspace_addr: host as u64,
                flags: 0,
            };
            set_memory_region(&vm_fd, region).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        lap("irqchip+pit");

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| VmError::Kvm {
                op: "eventfd",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let mut vfio = open_vfio(&config.vfio, &ram, inherited.as_ref(), vfio_fds)?;
        let mut pci_devices = vfio
            .as_mut()
            .map(Vfio::take_pci_devices)
            .unwrap_or_default();
        if !pci_devices.is_empty() {
            let router = Arc::new(MsiRouter::new(dup_vm_fd(&kvm, &vm_fd)?));
            let saved_msi = inherited
                .as_ref()
                .map_or(&[][..], |i| &i.handover.vfio_msi[..]);
            for (i, dev) in pci_devices.iter_mut().enumerate() {
                if let Some(s) = saved_msi.iter().find(|s| s.device as usize == i) {
                    dev.restore_msi(MsiCap::from_handover(s));
                }
                dev.wire(router.clone()).map_err(VfioError::from)?;
            }
        }
        lap("vfio");
        let devices = Arc::new(Devices {
            serial: Mutex::new(SerialDevice::new(serial_irq, console.writer())),
            pm: Mutex::new(PmDevice::new()),
            pci: Mutex::new(PciBus::new(pci_devices)),
        });
        let input_devices = devices.clone();
        console.set_input_sink(Box::new(move |bytes| {
            input_devices.serial().enqueue_input(bytes)
        }));

        let mut fds = Vec::with_capacity(config.vcpus as usize);
        for id in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            // An incoming VM gets CPUID and LAPIC from the saved state: skip setting them twice.
            if config.incoming.is_none() {
                let cpuid = vcpu::cpuid_for(&kvm, id, config.vcpus)?;
                fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
                pvh::setup_lint(&fd)?;
            }
            fds.push(fd);
        }
        lap("vcpus");
        // Which MSRs KVM can read depends on CPUID: an incoming VM probes after loading its state.
        let msr_indices = match config.incoming {
            None => vcpu::saveable_msrs(&kvm, &fds[0])?,
            Some(_) => Vec::new(),
        };
        lap("msrs");
        let vcpus = VcpuSet::start(fds, devices.clone(), vcpu_events.clone())?;
        info!(
            vcpus = config.vcpus,
            memory = %config.memory,
            serial = %config.serial,
            msrs = msr_indices.len(),
            "VM created"
        );
        let generation = inherited.as_ref().map_or(0, |i| i.handover.generation);
        Ok(Vm {
            config,
            vm_fd,
            ram,
            devices,
            console: Some(console),
            vcpus,
            msr_indices,
            run_state: RunState::InMigrate,
            mode: MigrationMode::Normal,
            exec_args: Vec::new(),
            api_listener_fd: None,
            inherited,
            generation,
            update_status: UpdateStatus::None,
            workflow_step: String::new(),
            saved_from: None,
            shut_down_after_save: false,
            events,
            last_migration: Arc::new(Mutex::new(MigrationReport::default())),
            vfio,
            vcpu_events,
            _kvm: kvm,
        })
    }

    /// Loads the kernel and starts the guest.
    pub fn boot(&mut self) -> Result<(), VmError> {
        let kernel = self.config.kernel.clone().ok_or(VmError::NoKernel)?;
        let entry = pvh::load_kernel(self.ram.memory(), &kernel)?;
        pvh::write_boot_info(
            self.ram.memory(),
            self.ram.regions(),
            &self.config.cmdline,
            self.config.vcpus,
        )?;
        pvh::setup_boot_vcpu(&lock(&self.vcpus.fds[0]), entry)?;
        info!(kernel = %kernel.display(), entry = format!("{entry:#x}"), "booting");
        self.vcpus.control.resume();
        self.set_run_state(RunState::Running, "boot");
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The current runstate.
    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// The pty path of a `pty` console.
    pub fn serial_pty(&self) -> Option<PathBuf> {
        self.console
            .as_ref()
            .and_then(|c| c.pty_path())
            .map(|p| p.to_path_buf())
    }

    /// Shared handle to the last migration's report (readable while a migration runs).
    pub fn last_migration(&self) -> Arc<Mutex<MigrationReport>> {
        self.last_migration.clone()
    }

    /// The migration mode the next migrate uses.
    pub fn mode(&self) -> MigrationMode {
        self.mode
    }

    fn set_run_state(&mut self, new: RunState, reason: &str) {
        let old = self.run_state;
        if old == new {
            return;
        }
        self.run_state = new;
        info!(%old, %new, reason, "runstate");
        crate::notify::status(&format!("{new} ({reason})"));
        self.events.send(VmEvent::RunState {
            old,
            new,
            reason: reason.to_string(),
        });
    }

    fn pause_vcpus(&self) -> Result<(), VmError> {
        Ok(self
            .vcpus
            .control
            .pause(self.vcpus.count(), PAUSE_TIMEOUT)?)
    }

    /// Stops the vCPUs.
    pub fn pause(&mut self) -> Result<RunState, VmError> {
        match self.run_state {
            RunState::Running => {
                self.pause_vcpus()?;
                self.set_run_state(RunState::Paused, "api pause");
            }
            RunState::Paused => {}
            state => {
                return Err(VmError::WrongState {
                    op: "pause",
                    state,
                    hint: "",
                })
            }
        }
        Ok(self.run_state)
    }

    /// Restarts the vCPUs.
    pub fn resume(&mut self) -> Result<RunState, VmError> {
        match self.run_state {
            // After a save, resume cancels it: a guest that had suspended itself stays suspended
            // (it needs system-wakeup, as it would have on the destination).
            RunState::PostMigrate if self.saved_from == Some(SavedRunState::Suspended) => {
                self.set_run_state(
                    RunState::Suspended,
                    "api resume after migration (guest suspended)",
                );
            }
            RunState::Paused | RunState::PostMigrate => {
                self.vcpus.control.resume();
                self.set_run_state(RunState::Running, "api resume");
            }
            RunState::Running => {}
            RunState::Suspended => {
                return Err(VmError::WrongState {
                    op: "resume",
                    state: RunState::Suspended,
                    hint: ": the guest suspended itself, use system-wakeup",
                })
            }
            state => {
                return Err(VmError::WrongState {
                    op: "resume",
                    state,
                    hint: "",
                })
            }
        }
        Ok(self.run_state)
    }

    /// Wakes a guest that suspended itself.
    pub fn wakeup(&mut self) -> Result<RunState, VmError> {
        if self.run_state != RunState::Suspended {
            return Err(VmError::WrongState {
                op: "wake up",
                state: self.run_state,
                hint: ": only a suspended guest can be woken",
            });
        }
        self.devices.pm().wake();
        self.vcpus.control.resume();
        self.set_run_state(RunState::Running, "system wakeup");
        Ok(self.run_state)
    }

    /// Stops the VM for good (quit or guest poweroff).
    pub fn shut_down(&mut self, reason: &str) {
        if self.run_state != RunState::Shutdown {
            self.shut_down_after_save = self.run_state == RunState::PostMigrate;
            if let Err(e) = self.pause_vcpus() {
                warn!(error = %e, "vCPUs did not stop cleanly at shutdown");
            }
            self.set_run_state(RunState::Shutdown, reason);
        }
    }

    /// Handles what a vCPU thread reported. Returns true when vmmd should exit.
    pub fn handle_vcpu_event(&mut self, event: VcpuEvent) -> bool {
        match event {
            VcpuEvent::Guest(GuestRequest::Suspend) => {
                // The suspending vCPU already asked all vCPUs to stop; wait until they have.
                if let Err(e) = self.pause_vcpus() {
                    warn!(error = %e, "vCPUs did not stop for guest suspend");
                }
                if matches!(self.run_state, RunState::Running | RunState::Paused) {
                    self.set_run_state(RunState::Suspended, "guest suspend (S3)");
                }
                false
            }
            VcpuEvent::Guest(GuestRequest::PowerOff) => {
                self.shut_down("guest poweroff");
                true
            }
            VcpuEvent::Guest(GuestRequest::Reset(why)) => {
                self.shut_down(&format!("guest reset: {why}"));
                true
            }
            VcpuEvent::Failed { id, reason } => {
                self.shut_down(&format!("vCPU {id} failed: {reason}"));
                true
            }
        }
    }

    /// Sets the migration mode.
    pub fn set_mode(
        &mut self,
        mode: MigrationMode,
        exec_args: Vec<String>,
    ) -> Result<(MigrationMode, Vec<String>), VmError> {
        if !exec_args.is_empty() {
            if cpr_exec::incoming_arg(&exec_args).is_none() {
                return Err(CprExecError::NotIncoming.into());
            }
            self.exec_args = exec_args;
        }
        self.mode = mode;
        Ok((self.mode, self.exec_args.clone()))
    }

    /// The exec arguments for cpr-exec.
    pub fn exec_args(&self) -> &[String] {
        &self.exec_args
    }

    /// Tells the VM which fd the API listens on, so cpr-exec can hand it over.
    pub fn set_api_listener_fd(&mut self, fd: RawFd) {
        self.api_listener_fd = Some(fd);
    }

    /// Why cpr-exec cannot run now (empty when it can).
    pub fn cpr_exec_blockers(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        if self.api_listener_fd.is_none() {
            blockers.push("the API socket is not known to the CPR engine".to_string());
        }
        if let Some(v) = &self.vfio {
            blockers.extend(v.cpr_exec_blockers());
        }
        blockers
    }

    /// Why cpr-reboot cannot run now (empty when it can).
    pub fn cpr_reboot_blockers(&self) -> Vec<String> {
        let mut blockers = self.cpr_reboot_blockers_cleared_by_suspend();
        if self.config.memory.path.is_none() {
            blockers.push(
                "guest RAM is an anonymous memfd, which does not outlive the vmmd process: start vmmd \
                 with --memory size=...,path=FILE on /dev/shm, hugetlbfs or a DAX device"
                    .to_string(),
            );
        }
        blockers
    }

    /// The cpr-reboot blockers that suspending the guest (S3) clears.
    pub fn cpr_reboot_blockers_cleared_by_suspend(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        if self.vfio.is_some() && self.run_state != RunState::Suspended {
            blockers.push(
                "VFIO devices keep DMA-ing into guest RAM and their IOMMU mappings do not survive \
                 a host reboot: suspend the guest first (cprctl reboot-prep --suspend, or \
                 system_suspend), then retry"
                    .to_string(),
            );
        }
        blockers
    }

    /// Whether the VM was shut down right after a completed save (a successor loads its state).
    pub fn shut_down_after_save(&self) -> bool {
        self.shut_down_after_save || self.run_state == RunState::PostMigrate
    }

    /// Whether VFIO devices are configured.
    pub fn has_vfio(&self) -> bool {
        self.vfio.is_some()
    }

    /// Stops the console and removes its socket (before the process exits and a successor binds it).
    pub fn close_console(&mut self) {
        drop(self.console.take());
    }

    /// Live updates this guest has been through.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records the step an orchestrator reports.
    pub fn set_workflow_step(&mut self, step: String) {
        info!(%step, "workflow step");
        self.workflow_step = step;
    }

    /// The last step an orchestrator reported.
    pub fn workflow_step(&self) -> &str {
        &self.workflow_step
    }

    /// The last update step this process saw.
    pub fn update_status(&self) -> &UpdateStatus {
        &self.update_status
    }

    /// Keeps the inherited fds (under the numbers the hand-over names) until the guest runs again, so
    /// a rollback can pass them on.
    pub fn hold_for_rollback(&mut self, fds: Vec<(String, OwnedFd)>) {
        if let Some(ctx) = &mut self.inherited {
            ctx.held = fds;
        }
    }

    /// Whether this process was started by cpr-exec and has not loaded the state yet.
    pub fn awaiting_handover_load(&self) -> bool {
        self.inherited.is_some() && self.run_state == RunState::InMigrate
    }

    /// Re-executes the previous binary (a failed or abandoned update). Returns only on failure.
    pub fn roll_back(&mut self, reason: &str) -> VmError {
        match &self.inherited {
            Some(i) if i.handover.rollback_reason.is_none() => {
                // Whatever this process delivered of the console buffer must not be sent twice.
                let mut handover = i.handover.clone();
                if let Some(console) = self.console.take() {
                    let state = match console.quiesce().save() {
                        Ok(state) => state,
                        Err(e) => return e.into(),
                    };
                    handover.console_pending_out = state.output;
                    handover.console_pending_in = state.input;
                }
                cpr_exec::roll_back(&handover, reason).into()
            }
            _ => VmError::Injected("no previous binary to roll back to"),
        }
    }

    fn report_progress(
        &self,
        status: MigrationStatus,
        phase: &str,
        done: u64,
        total: u64,
        incoming: bool,
    ) {
        self.events.send(VmEvent::Migration(MigrationProgress {
            status,
            phase: phase.to_string(),
            bytes_done: done,
            bytes_total: total,
            message: String::new(),
            incoming,
        }));
    }

    fn finish_report(
        &self,
        mut report: MigrationReport,
        clock: PhaseClock,
        result: &Result<(), VmError>,
    ) -> MigrationReport {
        report.phases = clock.phases;
        report.total = clock.start.elapsed();
        match result {
            Ok(()) => report.status = MigrationStatus::Completed,
            Err(e) => {
                report.status = MigrationStatus::Failed;
                report.error = Some(e.to_string());
            }
        }
        self.events.send(VmEvent::Migration(MigrationProgress {
            status: report.status,
            phase: "end".into(),
            bytes_done: report.ram_bytes,
            bytes_total: report.ram_bytes,
            message: report.error.clone().unwrap_or_default(),
            incoming: report.incoming,
        }));
        *lock(&self.last_migration) = report.clone();
        report
    }

    fn start_report(&self, uri: &str, incoming: bool) -> MigrationReport {
        let report = MigrationReport {
            status: MigrationStatus::Active,
            mode: self.mode,
            uri: uri.to_string(),
            incoming,
            ..Default::default()
        };
        *lock(&self.last_migration) = report.clone();
        report
    }

    /// Saves the VM to `uri` (normal mode: RAM included). Ends in `postmigrate`; on failure the VM is
    /// back in the runstate it had.
    pub fn migrate(&mut self, uri: &str) -> Result<MigrationReport, VmError> {
        let target: MigrationUri = uri.parse()?;
        let saved_state = match self.run_state {
            RunState::Running => SavedRunState::Running,
            RunState::Paused => SavedRunState::Paused,
            RunState::Suspended => SavedRunState::Suspended,
            state => {
                return Err(VmError::WrongState {
                    op: "migrate",
                    state,
                    hint: "",
                })
            }
        };
        let MigrationUri::File(path) = target;
        match self.mode {
            MigrationMode::Normal => self.save_and_stop(uri, &path, saved_state),
            MigrationMode::CprExec => self.cpr_exec(uri, &path, saved_state),
            MigrationMode::CprReboot => self.cpr_reboot(uri, &path, saved_state),
        }
    }

    /// Normal and cpr-reboot saves: pause, save in the current mode, stop in `postmigrate`. On
    /// failure the guest runs on in the runstate it had.
    fn save_and_stop(
        &mut self,
        uri: &str,
        path: &std::path::Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, VmError> {
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        self.report_progress(MigrationStatus::Active, "pause", 0, 0, false);
        let was_running = saved == SavedRunState::Running;
        let result = (|| {
            if was_running {
                self.pause_vcpus()?;
            }
            clock.lap("pause");
            let paused_at = Instant::now();
            let r = match self.mode {
                MigrationMode::CprReboot => {
                    self.save_for_reboot(path, saved, &mut clock, &mut report)
                }
                _ => self.save_to(path, saved, &mut clock, &mut report),
            };
            report.downtime = paused_at.elapsed() + clock.phases[0].1;
            r
        })();
        match &result {
            Ok(()) => {
                self.saved_from = Some(saved);
                let reason = match self.mode {
                    MigrationMode::CprReboot => "cpr-reboot state saved",
                    _ => "migration completed",
                };
                self.set_run_state(RunState::PostMigrate, reason);
            }
            Err(e) => {
                warn!(error = %e, mode = %self.mode, "save failed; the guest carries on here");
                if was_running {
                    self.vcpus.control.resume();
                }
            }
        }
        let report = self.finish_report(report, clock, &result);
        result.map(|()| report)
    }

    /// cpr-exec: pause, save state without RAM, hand RAM and device fds to the new binary and exec it
    /// in place. Returns only when the update failed before `execve` succeeded; the guest then runs on.
    fn cpr_exec(
        &mut self,
        uri: &str,
        path: &std::path::Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, VmError> {
        self.update_status = UpdateStatus::InProgress("preflight");
        // The running binary is opened for a rollback now, not inside the pause.
        let previous = match self
            .cpr_exec_preflight(path)
            .and_then(|()| cpr_exec::open_self().map_err(VmError::from))
        {
            Ok(fd) => fd,
            Err(e) => {
                self.update_status =
                    UpdateStatus::Failed(format!("refused before pausing the guest: {e}"));
                return Err(e);
            }
        };
        // VFIO DMA must be invalidated with the guest stopped for the whole exec: no bridge then.
        if self.config.cpr_exec_bridge && self.vfio.is_none() {
            return self.cpr_exec_bridged(uri, path, saved, previous);
        }
        // While the guest still runs: a child sharing our address space keeps it alive across the
        // exec, so `execve` does not tear down our mappings (guest RAM, the old VM's shadow page
        // tables) inside the pause. Without it, unmap guest RAM from our page tables instead.
        let keeper = match cpr_exec::AddressSpaceKeeper::spawn() {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "cannot keep the address space across the exec; unmapping guest RAM first");
                if let Err(e) = self
                    .ram
                    .drop_host_mappings(UNMAP_CHUNK, Duration::from_micros(500))
                {
                    warn!(error = %e, "cannot drop guest RAM mappings before the exec; the pause may be longer");
                }
                None
            }
        };
        let prepared = ExecPrepared { previous, keeper };
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        let was_running = saved == SavedRunState::Running;
        let err = (|| -> VmError {
            if was_running {
                if let Err(e) = self.pause_vcpus() {
                    return e;
                }
            }
            let paused_at = monotonic_ns();
            clock.lap("pause");
            if let Some(v) = &mut self.vfio {
                self.update_status =
                    UpdateStatus::InProgress("invalidating VFIO DMA host addresses");
                // One-shot, so that the next update from this process can succeed.
                let twice = self.config.fault == Some(FaultInjection::VfioInvalidateTwice)
                    && !INVALIDATED_TWICE.swap(true, std::sync::atomic::Ordering::Relaxed);
                if let Err(source) = v.invalidate(twice) {
                    return VmError::VfioDma {
                        step: "invalidate-vaddr",
                        source,
                    };
                }
                clock.lap("vfio-invalidate");
            }
            self.update_status = UpdateStatus::InProgress("saving");
            let Err(e) =
                self.exec_paused(path, saved, paused_at, &mut clock, &mut report, &prepared);
            // Compensation: the host addresses this process invalidated are valid again.
            if let Some(v) = self.vfio.as_mut().filter(|v| v.is_invalid()) {
                if let Err(undo) = v.cancel_invalidation() {
                    warn!(error = %undo, "cannot restore the VFIO DMA host addresses after a failed exec");
                    return VmError::VfioDma {
                        step: "restore-vaddr after a failed exec",
                        source: DmaStepError {
                            failed: undo,
                            undo: None,
                        },
                    };
                }
            }
            e
        })();
        if let Some(k) = prepared.keeper {
            k.release();
        }
        warn!(error = %err, "cpr-exec failed; the guest carries on with this binary");
        crate::notify::ready(&format!("running; live update failed: {err}"));
        self.update_status = UpdateStatus::Failed(err.to_string());
        if was_running {
            self.vcpus.control.resume();
        }
        let result = Err(err);
        self.finish_report(report, clock, &result);
        result.map(|()| MigrationReport::default())
    }

    /// cpr-exec with the bridge (module `cpr::bridge`): the console and vCPU loops move into
    /// continuation children that run the guest across the `execve`; a control continuation
    /// answers the new process's take-over. The guest pauses here only while the vCPU loops move.
    /// Returns only when the update failed before `execve` succeeded; everything is back on this
    /// process then and the guest runs on.
    fn cpr_exec_bridged(
        &mut self,
        uri: &str,
        path: &std::path::Path,
        saved: SavedRunState,
        previous: OwnedFd,
    ) -> Result<MigrationReport, VmError> {
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        let was_running = saved == SavedRunState::Running;
        let result = self.bridge_and_exec(path, saved, &previous, &mut clock);
        let Err(err) = result;
        warn!(error = %err, "cpr-exec failed; the guest carries on with this binary");
        crate::notify::ready(&format!("running; live update failed: {err}"));
        self.update_status = UpdateStatus::Failed(err.to_string());
        if was_running {
            self.vcpus.control.resume();
        }
        report.downtime = Duration::ZERO;
        let result = Err(err);
        self.finish_report(report, clock, &result);
        result.map(|()| MigrationReport::default())
    }

    fn bridge_and_exec(
        &mut self,
        path: &std::path::Path,
        saved: SavedRunState,
        previous: &OwnedFd,
        clock: &mut PhaseClock,
    ) -> Result<std::convert::Infallible, VmError> {
        // A state file from an earlier update must not be taken for this one's: the bridge
        // writes it at the take-over.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|source| StateFileError::Io {
                path: path.to_path_buf(),
                op: "truncate",
                source,
            })?;
        let count = self.vcpus.count();
        let was_running = saved == SavedRunState::Running;
        self.update_status = UpdateStatus::InProgress("moving the console to the bridge");
        let console = self
            .console
            .as_ref()
            .ok_or(VmError::Injected("console missing"))?;
        let keep = self.bridge_fds();
        console.detach_to_bridge(keep.clone(), BRIDGE_MOVE_TIMEOUT)?;
        let console_pid = console.bridge_pid();
        let undo_console = |vm: &Vm| {
            if let Some(c) = &vm.console {
                c.reattach_from_bridge(BRIDGE_MOVE_TIMEOUT);
            }
        };
        clock.lap("console-bridge");

        self.update_status = UpdateStatus::InProgress("moving the vCPUs to the bridge");
        if was_running {
            if let Err(e) = self.pause_vcpus() {
                undo_console(self);
                return Err(e);
            }
        }
        let paused_at = monotonic_ns();
        let vcpu_pids = match self
            .vcpus
            .control
            .detach(count, keep.clone(), BRIDGE_MOVE_TIMEOUT)
        {
            Ok(p) => p,
            Err(e) => {
                undo_console(self);
                return Err(e.into());
            }
        };
        // The hand-off pause ends when a vCPU is back in the guest, now in the bridge.
        let handoff_end = if was_running {
            self.vcpus.control.resume();
            self.vcpus
                .control
                .first_run_ns(Duration::from_millis(50))
                .unwrap_or_else(monotonic_ns)
        } else {
            monotonic_ns()
        };
        let handoff_us = handoff_end.saturating_sub(paused_at) / 1000;
        clock.lap("handoff");

        let undo_vcpus = |vm: &Vm| {
            if let Err(e) = vm
                .vcpus
                .control
                .pause(count, PAUSE_TIMEOUT)
                .and_then(|()| vm.vcpus.control.reattach(count, BRIDGE_MOVE_TIMEOUT))
            {
                warn!(error = %e, "cannot take the vCPUs back from the bridge");
            }
            undo_console(vm);
        };
        let (mine, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                undo_vcpus(self);
                return Err(VmError::BridgeSetup(format!(
                    "cannot create the control socket: {e}"
                )));
            }
        };
        let state = match state_memfd() {
            Ok(fd) => fd,
            Err(e) => {
                undo_vcpus(self);
                return Err(VmError::BridgeSetup(format!(
                    "cannot create the state memfd: {e}"
                )));
            }
        };
        let mut keep = keep;
        keep.extend([theirs.as_raw_fd(), state.as_raw_fd()]);
        let task = BridgeTask {
            vm: VmPtr(self as *const Vm),
            ctl: theirs.as_raw_fd(),
            state: PathBuf::from(format!("/proc/self/fd/{}", state.as_raw_fd())),
            path: path.to_path_buf(),
            saved,
        };
        self.update_status = UpdateStatus::InProgress("exec");
        let control = match Continuation::start(task, bridge_control_main, &keep) {
            Ok(c) => c,
            Err((e, _)) => {
                undo_vcpus(self);
                return Err(VmError::BridgeSetup(e.to_string()));
            }
        };
        // From here to the exec this thread shares its TLS with the control continuation, which
        // only waits on the socket until the new process (or the abort below) writes to it.
        let err = self.exec_to_bridge(
            path,
            paused_at,
            handoff_us,
            previous,
            [mine.as_raw_fd(), state.as_raw_fd()],
            {
                let mut pids = vcpu_pids;
                pids.extend(console_pid);
                pids.push(control.pid());
                pids
            },
        );
        // The exec failed: the control continuation ends, then the loops come back.
        if let Err(e) = bridge::abort(&mine) {
            warn!(error = %e, "cannot tell the bridge that the exec failed");
        }
        control.wait();
        drop(theirs);
        undo_vcpus(self);
        Err(err)
    }

    #[allow(clippy::too_many_arguments)]
    fn exec_to_bridge(
        &self,
        path: &std::path::Path,
        paused_at_ns: u64,
        handoff_us: u64,
        previous: &OwnedFd,
        [ctl, state]: [RawFd; 2],
        bridge_pids: Vec<libc::pid_t>,
    ) -> VmError {
        let mut pidfds = Vec::new();
        for pid in bridge_pids {
            match bridge::pidfd_open(pid) {
                Ok(fd) => pidfds.push(fd),
                Err(e) => {
                    return VmError::BridgeSetup(format!("pidfd_open of bridge process {pid}: {e}"))
                }
            }
        }
        let mut fds = vec![
            (fd_names::RAM.to_string(), self.ram.raw_fd()),
            (fd_names::PREVIOUS_BINARY.to_string(), previous.as_raw_fd()),
            (fd_names::BRIDGE_CONTROL.to_string(), ctl),
            (fd_names::BRIDGE_STATE.to_string(), state),
        ];
        if let Some(fd) = self.api_listener_fd {
            fds.push((fd_names::API_LISTENER.to_string(), fd));
        }
        for (i, fd) in pidfds.iter().enumerate() {
            fds.push((
                format!("{}-{i}", fd_names::BRIDGE_TASK_PREFIX),
                fd.as_raw_fd(),
            ));
        }
        if let Some(c) = &self.console {
            fds.extend(c.raw_fds());
        }
        let argv: Vec<String> = std::env::args().collect();
        let handover = CprHandover {
            fds,
            state_path: path.to_path_buf(),
            paused_at_ns,
            exec_at_ns: monotonic_ns(),
            // Only the hand-off paused the guest; the rest ran beside it.
            phases: vec![("handoff".into(), handoff_us)],
            rollback_argv: cpr_exec::with_incoming_file(&argv, path),
            console_pending_out: Vec::new(),
            console_pending_in: Vec::new(),
            console_pty_path: self
                .console
                .as_ref()
                .and_then(|c| c.pty_path().map(Into::into)),
            from_version: VERSION.to_string(),
            generation: self.generation + 1,
            rollback_reason: None,
            address_space_keeper: None,
            vfio_model_containers: Vec::new(),
            vfio_msi: Vec::new(),
        };
        self.exec_with_handover(&handover, "cpr-exec: exec (guest running in the bridge)")
    }

    /// Writes `handover` to a memfd, lets its fds survive the exec, and execs the new binary.
    /// Returns only on failure, with the fds back to close-on-exec.
    fn exec_with_handover(&self, handover: &CprHandover, what: &str) -> VmError {
        let memfd = match handover.to_memfd() {
            Ok(m) => m,
            Err(e) => return CprExecError::from(e).into(),
        };
        let mut fds = handover.fds.clone();
        fds.push(("cpr-handover".into(), memfd.as_raw_fd()));
        let mut preserved = PreservedFds::new(fds);
        if let Err(e) = preserved.clear_cloexec() {
            return e.into();
        }
        info!(binary = %self.exec_args[0], generation = handover.generation, "{what}");
        crate::notify::reloading(&format!("live update: exec {}", self.exec_args[0]));
        let err = cpr_exec::exec(&self.exec_args, None, memfd.as_raw_fd());
        preserved.restore_cloexec();
        err.into()
    }

    /// The fds the bridge's processes use: KVM, guest RAM, the console's and the UART's. Everything
    /// else (API connections above all) is closed in them, so that the exec closes it.
    fn bridge_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self._kvm.as_raw_fd(),
            self.vm_fd.as_raw_fd(),
            self.ram.raw_fd(),
            self.devices.serial().irq_fd(),
        ];
        fds.extend_from_slice(self.vcpus.raw_fds());
        if let Some(c) = &self.console {
            fds.extend(c.loop_fds());
        }
        fds
    }

    /// In the bridge's control continuation: stop the guest, write the state file, and answer with
    /// the console's undelivered bytes and the guest events the bridge saw.
    fn bridge_take_over(&self, path: &std::path::Path, saved: SavedRunState) -> BridgeReply {
        let paused_at_ns = monotonic_ns();
        let mut reply = BridgeReply {
            saved: Ok(()),
            paused_at_ns,
            phases: Vec::new(),
            console_pending_out: Vec::new(),
            console_pending_in: Vec::new(),
            guest_events: Vec::new(),
        };
        let count = self.vcpus.count();
        if let Err(e) = self.vcpus.control.pause(count, PAUSE_TIMEOUT) {
            reply.saved = Err(e.to_string());
            return reply;
        }
        let lap = |phases: &mut Vec<(String, u64)>, name: &str, since: u64| {
            let now = monotonic_ns();
            phases.push((name.into(), now.saturating_sub(since) / 1000));
            now
        };
        let t = lap(&mut reply.phases, "bridge-pause", paused_at_ns);
        let written = self
            .encode_state(saved, &mut MigrationReport::default())
            .and_then(|meta| Ok(write_state_without_ram(path, &meta, false)?));
        if let Err(e) = written {
            // The guest runs on in the bridge; the new process rolls back.
            if saved == SavedRunState::Running {
                self.vcpus.control.resume();
            }
            reply.saved = Err(e.to_string());
            return reply;
        }
        lap(&mut reply.phases, "save-state", t);
        if let Some(c) = &self.console {
            let state = c.finish_bridge(BRIDGE_MOVE_TIMEOUT);
            reply.console_pending_out = state.output;
            reply.console_pending_in = state.input;
        }
        reply.guest_events = self
            .vcpus
            .control
            .take_bridged_events()
            .into_iter()
            .map(BridgedEvent::from)
            .collect();
        reply
    }

    /// The new process's side: asks the previous process's bridge for the guest (once). Returns
    /// where the bridge wrote the state (None without a bridge) and whether this call took the
    /// guest over.
    fn take_over_from_bridge(&mut self) -> Result<Option<(PathBuf, bool)>, VmError> {
        let Some(ctx) = self.inherited.as_mut() else {
            return Ok(None);
        };
        if ctx.bridge.is_none() {
            return Ok(None);
        }
        let state = ctx
            .handover
            .fd(fd_names::BRIDGE_STATE)
            .map(|fd| PathBuf::from(format!("/proc/self/fd/{fd}")))
            .ok_or(VmError::Bridge(BridgeError::NotSaved(
                "the hand-over names no state memfd".into(),
            )))?;
        if ctx.bridge_reply.is_some() {
            return Ok(Some((state, false)));
        }
        if self.config.populate_after_load {
            // The guest still runs in the bridge: map guest RAM into this process now, so that
            // its first accesses after the take-over only fault in KVM.
            let t = Instant::now();
            let done = self
                .ram
                .populate_in_background(POPULATE_CHUNK, Duration::ZERO)
                .map(|h| h.join());
            match done {
                Ok(Ok(Ok(()))) => info!(
                    took_ms = t.elapsed().as_millis() as u64,
                    "guest RAM populated before the take-over"
                ),
                _ => warn!("guest RAM not populated before the take-over"),
            }
        }
        let Some(ctl) = self.inherited.as_ref().and_then(|c| c.bridge.as_ref()) else {
            return Ok(None);
        };
        let reply = bridge::take_over(ctl, BRIDGE_REPLY_TIMEOUT)?;
        // The console starts after the resume (`finish_cpr_incoming`): guest output is buffered
        // until then.
        if let Some(ctx) = self.inherited.as_mut() {
            ctx.bridge_reply = Some(reply);
        }
        Ok(Some((state, true)))
    }

    /// cpr-reboot: pause, flush guest RAM to its file, save state without RAM (fsync) and stop in
    /// `postmigrate`; a vmmd started after the host reboot maps the same RAM file and loads the state.
    /// On failure the guest runs on.
    fn cpr_reboot(
        &mut self,
        uri: &str,
        path: &std::path::Path,
        saved: SavedRunState,
    ) -> Result<MigrationReport, VmError> {
        if let Some(blocker) = self.cpr_reboot_blockers().into_iter().next() {
            return Err(VmError::Blocked {
                mode: MigrationMode::CprReboot,
                blocker,
            });
        }
        // As for cpr-exec: unmap the guest RAM the guest touched while it still runs, so that
        // tearing down this process's page tables does not lengthen the stop.
        if let Err(e) = self
            .ram
            .drop_host_mappings(UNMAP_CHUNK, Duration::from_micros(500))
        {
            warn!(error = %e, "cannot drop guest RAM mappings before the save");
        }
        self.save_and_stop(uri, path, saved)
    }

    /// The cpr-reboot save, vCPUs paused: guest RAM flushed to its file, then the state without RAM
    /// (fsync'd: it must survive the reboot).
    fn save_for_reboot(
        &self,
        path: &std::path::Path,
        saved: SavedRunState,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), VmError> {
        let meta = self.encode_state(saved, report)?;
        clock.lap("save-state");
        self.ram.sync().map_err(|source| {
            VmError::StateFile(StateFileError::Io {
                path: self.ram.path().map(|p| p.to_path_buf()).unwrap_or_default(),
                op: "fsync guest RAM",
                source,
            })
        })?;
        clock.lap("sync-ram");
        write_state_without_ram(path, &meta, true)?;
        clock.lap("sync");
        Ok(())
    }

    /// Everything that can be checked before the guest is paused: the new binary and its arguments,
    /// blockers, and that the state file can be created.
    fn cpr_exec_preflight(&self, path: &std::path::Path) -> Result<(), VmError> {
        cpr_exec::preflight(&self.exec_args)?;
        if let Some(blocker) = self.cpr_exec_blockers().into_iter().next() {
            return Err(VmError::Blocked {
                mode: MigrationMode::CprExec,
                blocker,
            });
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| StateFileError::Io {
                path: path.to_path_buf(),
                op: "create",
                source,
            })?;
        Ok(())
    }

    fn exec_paused(
        &mut self,
        path: &std::path::Path,
        saved: SavedRunState,
        paused_at_ns: u64,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
        prepared: &ExecPrepared,
    ) -> Result<std::convert::Infallible, VmError> {
        let meta = self.encode_state(saved, report)?;
        // The file only has to outlive the exec on this host: no fsync inside the pause.
        write_state_without_ram(path, &meta, false)?;
        clock.lap("save-state");
        let Some(console) = self.console.take() else {
            return Err(VmError::Injected("console missing"));
        };
        let console = console.quiesce();
        let err = self.exec_with(path, paused_at_ns, clock, &console, prepared);
        // Compensation: the console serves again with everything it had.
        self.console = Some(Console::resume(console)?);
        Err(err)
    }

    fn exec_with(
        &self,
        path: &std::path::Path,
        paused_at_ns: u64,
        clock: &PhaseClock,
        console: &StoppedConsole,
        prepared: &ExecPrepared,
    ) -> VmError {
        let console_state = match console.save() {
            Ok(state) => state,
            Err(e) => return e.into(),
        };
        let (previous, keeper) = (&prepared.previous, prepared.keeper.as_ref());
        let mut fds = vec![
            (fd_names::RAM.to_string(), self.ram.raw_fd()),
            (fd_names::PREVIOUS_BINARY.to_string(), previous.as_raw_fd()),
        ];
        if let Some(fd) = self.api_listener_fd {
            fds.push((fd_names::API_LISTENER.to_string(), fd));
        }
        // The old VM is destroyed by whoever closes its fds last: let that be the new process, after
        // the guest runs again (see `fd_names::RETIRED_KVM_PREFIX`).
        let prefix = fd_names::RETIRED_KVM_PREFIX;
        fds.push((format!("{prefix}-dev"), self._kvm.as_raw_fd()));
        fds.push((format!("{prefix}-vm"), self.vm_fd.as_raw_fd()));
        for (i, vcpu) in self.vcpus.fds.iter().enumerate() {
            fds.push((format!("{prefix}-vcpu{i}"), lock(vcpu).as_raw_fd()));
        }
        if let Some(k) = keeper {
            fds.push((fd_names::ADDRESS_SPACE_KEEPER.to_string(), k.release_fd()));
        }
        fds.extend(
            console
                .handover()
                .named_fds()
                .into_iter()
                .map(|(n, fd)| (n.to_string(), fd)),
        );
        if let Some(v) = &self.vfio {
            fds.extend(v.handover_fds());
            for (i, dev) in self.devices.pci().devices().iter().enumerate() {
                fds.extend(dev.handover_fds(i));
            }
        }
        let argv: Vec<String> = std::env::args().collect();
        let handover = CprHandover {
            fds,
            state_path: path.to_path_buf(),
            paused_at_ns,
            exec_at_ns: 0,
            phases: clock
                .phases
                .iter()
                .map(|(n, d)| (n.clone(), d.as_micros() as u64))
                .collect(),
            rollback_argv: cpr_exec::with_incoming_file(&argv, path),
            console_pending_out: console_state.output,
            console_pending_in: console_state.input,
            console_pty_path: console.handover().pty_path.clone(),
            from_version: VERSION.to_string(),
            generation: self.generation + 1,
            rollback_reason: None,
            address_space_keeper: keeper.map(|k| k.pid()),
            vfio_model_containers: self
                .vfio
                .as_ref()
                .map(Vfio::model_container_ids)
                .unwrap_or_default(),
            vfio_msi: self
                .devices
                .pci()
                .devices()
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.msi_state().map(|m| m.to_handover(i as u32)))
                .collect(),
        };
        let handover = CprHandover {
            exec_at_ns: monotonic_ns(),
            ..handover
        };
        self.exec_with_handover(&handover, "cpr-exec: exec")
    }

    fn capture(&self, run_state: SavedRunState) -> Result<VmState, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.count());
        for (id, fd) in self.vcpus.fds.iter().enumerate() {
            vcpus.push(Vcpu::new(&lock(fd), id as u8, &self.msr_indices).save()?);
        }
        Ok(VmState {
            vmmd_version: VERSION.to_string(),
            memory: self.ram.regions().to_vec(),
            run_state,
            vcpus,
            vm: KvmVmState::capture(&self.vm_fd)?,
            serial: self.devices.serial().state(),
            pm: self.devices.pm().state(),
        })
    }

    /// Captures and encodes the vCPU/VM/device state of the paused VM.
    fn encode_state(
        &self,
        run_state: SavedRunState,
        report: &mut MigrationReport,
    ) -> Result<Vec<u8>, VmError> {
        let meta = encode_meta(&self.capture(run_state)?)?;
        report.state_bytes = meta.len() as u64;
        Ok(meta)
    }

    fn save_to(
        &self,
        path: &std::path::Path,
        run_state: SavedRunState,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), VmError> {
        let meta = self.encode_state(run_state, report)?;
        clock.lap("save-state");
        let total = self.ram.size();
        let mut writer = StateWriter::create(path, &meta, total)?;
        let mut done = 0u64;
        for (_, host, len) in self.ram.host_slices() {
            for off in (0..len).step_by(RAM_CHUNK) {
                let n = RAM_CHUNK.min(len - off);
                // SAFETY: `host..host+len` is a live mapping owned by `self.ram`, and every vCPU is
                // parked, so nothing writes guest RAM while this slice exists.
                let chunk = unsafe { guest_bytes(host.add(off), n) };
                writer.write_ram(chunk)?;
                done += n as u64;
                if done.is_multiple_of(PROGRESS_EVERY) {
                    self.report_progress(MigrationStatus::Active, "save-ram", done, total, false);
                }
            }
        }
        report.ram_bytes = done;
        clock.lap("save-ram");
        writer.finish()?;
        clock.lap("sync");
        Ok(())
    }

    /// Loads the VM from `uri`. Only from `inmigrate`; every check on the file is done before any
    /// vCPU or device state is set, and on failure the VM stays `inmigrate` for another try.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<MigrationReport, VmError> {
        let source: MigrationUri = uri.parse()?;
        if self.run_state != RunState::InMigrate {
            return Err(VmError::WrongState {
                op: "migrate-incoming",
                state: self.run_state,
                hint: ": start a new vmmd with --incoming defer to load a state file",
            });
        }
        let MigrationUri::File(path) = source;
        let mut report = self.start_report(uri, true);
        let mut clock = PhaseClock::new();
        let result = self.load_from(&path, &mut clock, &mut report);
        let report = self.finish_report(report, clock, &result);
        result.map(|()| report)
    }

    fn load_from(
        &mut self,
        path: &std::path::Path,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), VmError> {
        let bridged = self.take_over_from_bridge()?;
        let path = match &bridged {
            Some((state, took_over)) => {
                if *took_over {
                    // The pause starts at the take-over; what came before ran beside the guest.
                    *clock = PhaseClock::new();
                }
                state.as_path()
            }
            None => path,
        };
        let (mut reader, state): (StateReader, VmState) = StateReader::open(path)?;
        report.state_bytes = reader.header().meta_len;
        let incompatible = |detail: String| VmError::Incompatible {
            path: path.to_path_buf(),
            detail,
        };
        if state.vcpus.len() != self.vcpus.count() {
            return Err(incompatible(format!(
                "it was saved with {} vCPUs and this vmmd has {}: start vmmd with --vcpus {}",
                state.vcpus.len(),
                self.vcpus.count(),
                state.vcpus.len()
            )));
        }
        if state.memory != self.ram.regions() {
            let saved: u64 = state.memory.iter().map(|r| r.size).sum();
            return Err(incompatible(format!(
                "it was saved with {saved} bytes of RAM and this vmmd has {}: start vmmd with --memory size={saved}",
                self.ram.size()
            )));
        }
        if state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.id as usize != i)
        {
            return Err(incompatible("vCPU ids are out of order".into()));
        }
        let has_ram = reader.header().has_ram;
        if has_ram {
            reader.expect_ram_len(self.ram.size())?;
        } else if self.inherited.is_none() && !self.ram.preexisting() {
            let err = incompatible(match self.ram.path() {
                Some(p) => format!(
                    "it holds no guest RAM (cpr-reboot), and the RAM file {} did not exist when this \
                     vmmd started: point --memory path= at the guest's RAM file",
                    p.display()
                ),
                None => "it holds no guest RAM (written in cpr-exec or cpr-reboot mode), and this vmmd \
                         neither inherited the guest's RAM nor maps a RAM file: load it with \
                         --memory size=...,path= pointing at the guest's RAM file"
                    .into(),
            });
            self.ram.remove_if_created();
            return Err(err);
        }
        clock.lap("load-state");

        let total = if has_ram { self.ram.size() } else { 0 };
        let mut done = 0u64;
        for (_, host, len) in self.ram.host_slices().into_iter().filter(|_| has_ram) {
            for off in (0..len).step_by(RAM_CHUNK) {
                let n = RAM_CHUNK.min(len - off);
                // SAFETY: the mapping is live and owned by `self.ram`; the vCPUs of an incoming VM
                // have never run and are parked, so nothing else touches guest RAM.
                let chunk = unsafe { guest_bytes_mut(host.add(off), n) };
                reader.read_ram(chunk)?;
                done += n as u64;
                if done.is_multiple_of(PROGRESS_EVERY) {
                    self.report_progress(MigrationStatus::Active, "load-ram", done, total, true);
                }
            }
        }
        reader.finish()?;
        report.ram_bytes = done;
        if has_ram {
            clock.lap("load-ram");
        }
        match self.config.fault {
            Some(FaultInjection::CrashDuringLoad) => {
                warn!("fault injection: aborting while loading the state");
                std::process::abort();
            }
            Some(FaultInjection::FailLoad) => return Err(VmError::Injected("fail-load")),
            Some(FaultInjection::VfioInvalidateTwice) | None => {}
        }

        state.vm.restore(&self.vm_fd)?;
        for (fd, s) in self.vcpus.fds.iter().zip(&state.vcpus) {
            let fd = lock(fd);
            // Which MSRs later saves read is probed below, once the CPUIDs are set.
            let args = VcpuArgs {
                fd: &fd,
                msr_indices: &[],
            };
            Vcpu::restore(args, s)?;
        }
        self.msr_indices = vcpu::saveable_msrs(&self._kvm, &lock(&self.vcpus.fds[0]))?;
        self.devices.serial().restore(&state.serial)?;
        *self.devices.pm() = PmDevice::from_state(state.pm);
        clock.lap("restore");
        if let Some(v) = self.vfio.as_mut().filter(|v| v.is_invalid()) {
            let after_failed = self
                .inherited
                .as_ref()
                .is_some_and(|i| i.handover.rollback_reason.is_some());
            v.revalidate(&dma_regions(&self.ram), after_failed)
                .map_err(|source| VmError::VfioDma {
                    step: "update-vaddr",
                    source,
                })?;
            clock.lap("vfio-remap");
        }

        let next = match state.run_state {
            SavedRunState::Running => {
                self.vcpus.control.resume();
                RunState::Running
            }
            SavedRunState::Paused => RunState::Paused,
            SavedRunState::Suspended => RunState::Suspended,
        };
        clock.lap("resume");
        if !has_ram && self.config.populate_after_load && bridged.is_none() {
            // The RAM is a fresh mapping of existing pages: map them before the guest faults on them.
            if let Err(e) = self
                .ram
                .populate_in_background(POPULATE_CHUNK, Duration::ZERO)
            {
                warn!(error = %e, "cannot start populating guest RAM in the background");
            }
        }
        // What this process saw of the guest's pause; a cpr-exec load knows the whole of it.
        report.downtime = clock.start.elapsed();
        if let Some(ctx) = self.inherited.take() {
            self.finish_cpr_incoming(ctx, clock, report, next == RunState::Running);
        }
        self.set_run_state(next, "incoming migration completed");
        Ok(())
    }

    /// After a cpr-exec load: merge the old process's timings, report the pause, and close the way
    /// back (the previous binary fd, the crash handler).
    fn finish_cpr_incoming(
        &mut self,
        ctx: InheritedContext,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
        running: bool,
    ) {
        cpr_exec::disarm_crash_rollback();
        if let (Some(reply), Some(c)) = (&ctx.bridge_reply, self.console.as_mut()) {
            // What the bridge had not delivered goes out first, then what the guest wrote since.
            let state = ConsoleState {
                output: reply.console_pending_out.clone(),
                input: reply.console_pending_in.clone(),
            };
            if let Err(e) = c.start_deferred(&state) {
                warn!(error = %e, "cannot start the console after the take-over; guest output stays buffered");
            }
        }
        let h = &ctx.handover;
        // The pause ends when a vCPU goes back into the guest (this thread may be preempted by
        // it right after the resume).
        let resumed_ns = match running {
            true => self
                .vcpus
                .control
                .first_run_ns(Duration::from_millis(50))
                .unwrap_or_else(monotonic_ns),
            false => monotonic_ns(),
        };
        let micros = |list: &[(String, u64)]| -> Vec<(String, Duration)> {
            list.iter()
                .map(|(n, us)| (n.clone(), Duration::from_micros(*us)))
                .collect()
        };
        let mut phases = micros(&h.phases);
        let ns = |a: u64, b: u64| Duration::from_nanos(b.saturating_sub(a));
        let exec = ns(h.exec_at_ns, ctx.started_ns);
        match &ctx.bridge_reply {
            // Two pauses: the hand-off to the bridge (all of `h.phases`) and the take-over.
            Some(reply) => {
                let handoff: Duration = phases.iter().map(|(_, d)| *d).sum();
                phases.extend(micros(&reply.phases));
                phases.append(&mut clock.phases);
                report.downtime = handoff + ns(reply.paused_at_ns, resumed_ns);
                // While the bridge ran the guest (not part of the pause).
                phases.push(("overlapped-exec".into(), exec));
                phases.push((
                    "overlapped-startup".into(),
                    ns(ctx.started_ns, reply.paused_at_ns),
                ));
            }
            None => {
                let load_total: Duration = clock.phases.iter().map(|(_, d)| *d).sum();
                let startup = ns(ctx.started_ns, resumed_ns)
                    .saturating_sub(clock.start.elapsed().max(load_total));
                phases.push(("exec".into(), exec));
                phases.push(("startup".into(), startup));
                phases.append(&mut clock.phases);
                report.downtime = ns(h.paused_at_ns, resumed_ns);
            }
        }
        clock.phases = phases;
        report.mode = MigrationMode::CprExec;
        // A rollback restores the generation the guest had before the failed update.
        self.generation = match h.rollback_reason {
            Some(_) => h.generation.saturating_sub(1),
            None => h.generation,
        };
        self.update_status = match &h.rollback_reason {
            Some(why) => UpdateStatus::RolledBack(why.clone()),
            None => UpdateStatus::Updated {
                from: h.from_version.clone(),
            },
        };
        info!(
            generation = self.generation,
            pause_us = report.downtime.as_micros() as u64,
            status = %self.update_status,
            "cpr-exec: guest resumed"
        );
        // Guest events the bridge saw, acted on now that the guest runs here.
        for e in ctx.bridge_reply.iter().flat_map(|r| r.guest_events.iter()) {
            let _ = self.vcpu_events.send(VcpuEvent::from(e.clone()));
        }
        // Closing the previous VM's fds destroys it (~15 ms of kernel time): off the guest's path.
        // Everything else held for a rollback is closed now.
        let (old_vm, rest): (Vec<_>, Vec<_>) = ctx.held.into_iter().partition(|(name, _)| {
            name.starts_with(fd_names::RETIRED_KVM_PREFIX)
                || name.starts_with(fd_names::BRIDGE_TASK_PREFIX)
        });
        drop(rest);
        let bridge_ctl = ctx.bridge;
        let keeper_pid = h.address_space_keeper;
        let retire = std::thread::Builder::new()
            .name("vmmd-retire-vm".into())
            .spawn(move || {
                let t = Instant::now();
                // Closing the control socket ends the bridge; its last process's exit destroys the
                // old VM and address space.
                drop(bridge_ctl);
                let (tasks, old_vm): (Vec<_>, Vec<_>) = old_vm
                    .into_iter()
                    .partition(|(name, _)| name.starts_with(fd_names::BRIDGE_TASK_PREFIX));
                for (_, pidfd) in &tasks {
                    bridge::reap_pidfd(pidfd);
                }
                // The old VM's fds, then the keeper's pipe: its exit tears down the old address space.
                drop(old_vm);
                if let Some(pid) = keeper_pid {
                    cpr_exec::reap(pid);
                }
                tracing::debug!(
                    took_us = t.elapsed().as_micros() as u64,
                    "previous VM retired"
                );
            });
        if let Err(e) = retire {
            warn!(error = %e, "cannot retire the previous VM in the background");
        }
    }
}

/// A memfd for the bridge's state file (close-on-exec: the exec path clears the flag).
fn state_memfd() -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"vmmd-bridge-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nobody else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// The bridge's control continuation (see `cpr::bridge`): serves the new process's take-over,
/// then ends the vCPU loops. On an abort (the exec failed) it only returns: the old process takes
/// the loops back itself.
fn bridge_control_main(task: BridgeTask) {
    // SAFETY: the socket fd is this continuation's copy of the bridge end, open until it exits.
    let ctl = std::mem::ManuallyDrop::new(unsafe {
        <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(task.ctl)
    });
    // SAFETY: see `VmPtr`: the VM outlives this continuation and its owner does not touch it.
    let vm = unsafe { &*task.vm.0 };
    let ended = bridge::serve(
        &ctl,
        || vm.bridge_take_over(&task.state, task.saved),
        || {
            // Nobody will take the guest: leave it stopped, in the state file, as a crash inside
            // the classic pause would (`vmmd --incoming file:PATH` on the same RAM resumes it).
            let reply = vm.bridge_take_over(&task.path, task.saved);
            let msg = match reply.saved {
                Ok(()) => format!(
                    "vmmd cpr-exec bridge: the new process exited before taking the guest over; the guest is stopped and its state is in {}\n",
                    task.path.display()
                ),
                Err(e) => format!(
                    "vmmd cpr-exec bridge: the new process exited before taking the guest over, and the state could not be saved to {}: {e}\n",
                    task.path.display()
                ),
            };
            // SAFETY: write(2) of a live buffer to stderr (no locks: other threads of the old
            // process may have died holding Rust's stderr lock).
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
        },
    );
    if ended != bridge::Ended::Aborted {
        vm.vcpus.control.end_bridged();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A second `VmFd` on the same VM (for the PCI bus's interrupt routing, used from vCPU threads).
fn dup_vm_fd(kvm: &Kvm, vm: &VmFd) -> Result<VmFd, VmError> {
    let kvm_err = |source| VmError::Kvm {
        op: "dup VM fd",
        source,
    };
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new fd for the same open VM file.
    let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(kvm_err(kvm_ioctls::Error::last()));
    }
    // SAFETY: `fd` is a fresh fd for a KVM VM that nothing else owns.
    unsafe { kvm.create_vmfd_from_rawfd(fd) }.map_err(kvm_err)
}

/// Guest RAM as DMA mappings: iova = guest physical address, at this process's host address.
fn dma_regions(ram: &GuestRam) -> Vec<DmaMapping> {
    ram.host_slices()
        .into_iter()
        .map(|(gpa, host, len)| DmaMapping {
            iova: gpa,
            size: len as u64,
            vaddr: host as u64,
        })
        .collect()
}

/// Where passthrough devices go: BARs in the hole below 4 GiB up to the IOAPIC, INTx from GSI 10.
const VFIO_PLACEMENT: Placement = Placement {
    mmio_base: 0xe000_0000,
    mmio_end: 0xfec0_0000,
    first_gsi: 10,
};

/// Opens (or, after cpr-exec, adopts) the VFIO devices and containers.
fn open_vfio(
    cfg: &VfioConfig,
    ram: &GuestRam,
    inherited: Option<&InheritedContext>,
    fds: Vec<(String, OwnedFd)>,
) -> Result<Option<Vfio>, VfioError> {
    let regions = dma_regions(ram);
    match inherited {
        None => Vfio::open(cfg, &regions, VFIO_PLACEMENT),
        Some(ctx) => {
            let fds = Mutex::new(fds);
            let take = |name: &str| {
                let mut fds = lock(&fds);
                let i = fds.iter().position(|(n, _)| n == name)?;
                Some(fds.swap_remove(i).1)
            };
            Vfio::inherited(
                cfg,
                &regions,
                VFIO_PLACEMENT,
                &take,
                &ctx.handover.vfio_model_containers,
            )
        }
    }
}

fn set_memory_region(
    vm: &VmFd,
    region: kvm_userspace_memory_region,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the region describes a live shared mapping owned by the VM's `GuestRam`, which lives as
    // long as the `VmFd` (both are fields of `Vm`; the mapping is dropped after the VM fd).
    unsafe { vm.set_user_memory_region(region) }
}

/// # Safety
/// `ptr..ptr+len` must be a live mapping nobody writes while the slice exists.
unsafe fn guest_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// # Safety
/// `ptr..ptr+len` must be a live mapping nobody else reads or writes while the slice exists.
unsafe fn guest_bytes_mut<'a>(ptr: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts_mut(ptr, len) }
}
