//! The VM: owns KVM, guest RAM, devices and vCPUs, and runs the runstate machine, save and load.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cpr_common::state::{encode_meta, StateFileError, StateReader, StateWriter};
use cpr_common::{MigrationMode, MigrationUri, UriError};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use tokio::sync::broadcast;
use tracing::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::pvh::{self, BootError};
use crate::cpr::state::{KvmVmError, KvmVmState, SavedRunState, VmState};
use crate::devices::console::{Console, ConsoleError, SerialBackendSpec};
use crate::devices::pm::PmDevice;
use crate::devices::serial::{SerialDevice, SerialError, COM1_GSI};
use crate::devices::{Devices, GuestRequest};
use crate::memory::{GuestRam, MemoryError, MemorySpec};
use crate::vcpu::{self, VcpuError, VcpuEvent, VcpuSet};

/// vmmd's version as reported over the API.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const RAM_CHUNK: usize = 8 << 20;
const PROGRESS_EVERY: u64 = 64 << 20;
const CONSOLE_BUFFER: usize = 1 << 20;

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
    console: Console,
    vm_fd: VmFd,
    ram: GuestRam,
    config: VmConfig,
    msr_indices: Vec<u32>,
    run_state: RunState,
    mode: MigrationMode,
    events: EventBus,
    last_migration: Arc<Mutex<MigrationReport>>,
    _kvm: Kvm,
}

impl Vm {
    /// Builds the VM with its vCPUs parked: KVM VM, RAM slots, irqchip, PIT, vCPUs, devices.
    pub fn create(
        config: VmConfig,
        events: EventBus,
        vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let kvm_err = |op| move |source| VmError::Kvm { op, source };
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(TSS_ADDR)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let ram = GuestRam::create(&config.memory)?;
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

        let console = Console::open(&config.serial, CONSOLE_BUFFER)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Kvm {
            op: "eventfd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let devices = Arc::new(Devices {
            serial: Mutex::new(SerialDevice::new(serial_irq, console.writer())),
            pm: Mutex::new(PmDevice::new()),
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
            let cpuid = vcpu::cpuid_for(&kvm, id, config.vcpus)?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            pvh::setup_lint(&fd)?;
            fds.push(fd);
        }
        let msr_indices = vcpu::saveable_msrs(&kvm, &fds[0])?;
        let vcpus = VcpuSet::start(fds, devices.clone(), vcpu_events)?;
        info!(
            vcpus = config.vcpus,
            memory = %config.memory,
            serial = %config.serial,
            msrs = msr_indices.len(),
            "VM created"
        );
        Ok(Vm {
            config,
            vm_fd,
            ram,
            devices,
            console,
            vcpus,
            msr_indices,
            run_state: RunState::InMigrate,
            mode: MigrationMode::Normal,
            events,
            last_migration: Arc::new(Mutex::new(MigrationReport::default())),
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
        self.console.pty_path().map(|p| p.to_path_buf())
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
    pub fn set_mode(&mut self, mode: MigrationMode) -> Result<MigrationMode, VmError> {
        if mode != MigrationMode::Normal {
            return Err(VmError::UnsupportedMode(mode));
        }
        self.mode = mode;
        Ok(mode)
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
        if self.mode != MigrationMode::Normal {
            return Err(VmError::UnsupportedMode(self.mode));
        }
        let MigrationUri::File(path) = target;
        let mut report = self.start_report(uri, false);
        let mut clock = PhaseClock::new();
        self.report_progress(MigrationStatus::Active, "pause", 0, 0, false);
        let was_running = saved_state == SavedRunState::Running;
        let result = (|| {
            if was_running {
                self.pause_vcpus()?;
            }
            clock.lap("pause");
            let paused_at = Instant::now();
            let r = self.save_to(&path, saved_state, &mut clock, &mut report);
            report.downtime = paused_at.elapsed() + clock.phases[0].1;
            r
        })();
        match &result {
            Ok(()) => self.set_run_state(RunState::PostMigrate, "migration completed"),
            Err(e) => {
                warn!(error = %e, "migration failed; the guest carries on here");
                if was_running {
                    self.vcpus.control.resume();
                }
            }
        }
        let report = self.finish_report(report, clock, &result);
        result.map(|()| report)
    }

    fn capture(&self, run_state: SavedRunState) -> Result<VmState, VmError> {
        let mut vcpus = Vec::with_capacity(self.vcpus.count());
        for (id, fd) in self.vcpus.fds.iter().enumerate() {
            vcpus.push(vcpu::save_state(&lock(fd), id as u8, &self.msr_indices)?);
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

    fn save_to(
        &self,
        path: &std::path::Path,
        run_state: SavedRunState,
        clock: &mut PhaseClock,
        report: &mut MigrationReport,
    ) -> Result<(), VmError> {
        let state = self.capture(run_state)?;
        let meta = encode_meta(&state)?;
        report.state_bytes = meta.len() as u64;
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
                if done % PROGRESS_EVERY == 0 {
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
        reader.expect_ram_len(self.ram.size())?;
        clock.lap("load-state");

        let total = self.ram.size();
        let mut done = 0u64;
        for (_, host, len) in self.ram.host_slices() {
            for off in (0..len).step_by(RAM_CHUNK) {
                let n = RAM_CHUNK.min(len - off);
                // SAFETY: the mapping is live and owned by `self.ram`; the vCPUs of an incoming VM
                // have never run and are parked, so nothing else touches guest RAM.
                let chunk = unsafe { guest_bytes_mut(host.add(off), n) };
                reader.read_ram(chunk)?;
                done += n as u64;
                if done % PROGRESS_EVERY == 0 {
                    self.report_progress(MigrationStatus::Active, "load-ram", done, total, true);
                }
            }
        }
        reader.finish()?;
        report.ram_bytes = done;
        clock.lap("load-ram");

        state.vm.restore(&self.vm_fd)?;
        for (fd, s) in self.vcpus.fds.iter().zip(&state.vcpus) {
            vcpu::restore_state(&lock(fd), s)?;
        }
        self.devices.serial().restore(&state.serial)?;
        *self.devices.pm() = PmDevice::from_state(state.pm);
        clock.lap("restore");

        let next = match state.run_state {
            SavedRunState::Running => {
                self.vcpus.control.resume();
                RunState::Running
            }
            SavedRunState::Paused => RunState::Paused,
            SavedRunState::Suspended => RunState::Suspended,
        };
        clock.lap("resume");
        self.set_run_state(next, "incoming migration completed");
        Ok(())
    }

    /// Seconds-resolution wall time, for logs.
    pub fn now_unix_micros() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
