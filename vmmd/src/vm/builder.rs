//! Building a VM, fresh or inherited from a cpr-exec predecessor: the KVM VM (made early, on a
//! thread, when [`EarlyVm`] was started), guest RAM and its memory slots, irqchip and PIT, the
//! console and devices, VFIO, and the parked vCPUs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cpr_common::MigrationMode;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use tracing::info;
use vmm_sys_util::eventfd::EventFd;

use super::{
    lock, EventBus, InheritedContext, MigrationReport, RunState, UpdateStatus, Vm, VmConfig,
    VmError, VmMetrics, CONSOLE_BUFFER,
};
use crate::boot::pvh;
use crate::console::{Console, ConsoleHandover};
use crate::devices::pci::PciBus;
use crate::devices::pm::PmDevice;
use crate::devices::serial::{SerialDevice, COM1_GSI};
use crate::devices::Devices;
use crate::memory::GuestRam;
use crate::state::handover::CprHandover;
use crate::vcpu::{self, VcpuEvent, VcpuSet};
use crate::vfio::dma::DmaMapping;
use crate::vfio::msi::MsiRouter;
use crate::vfio::{Placement, Vfio, VfioError};

const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Where passthrough devices go: BARs in the hole below 4 GiB up to the IOAPIC, INTx from GSI 10.
const VFIO_PLACEMENT: Placement = Placement {
    mmio_base: 0xe000_0000,
    mmio_end: 0xfec0_0000,
    first_gsi: 10,
};

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
            .unwrap_or_else(|_| Err(VmError::Internal("the VM-creating thread panicked")))
    }
}

fn new_kvm_vm() -> Result<(Kvm, VmFd), VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    Ok((kvm, vm_fd))
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Builds a [`Vm`] with its vCPUs parked.
pub struct VmBuilder {
    config: VmConfig,
    events: EventBus,
    vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    inherited: Option<Inherited>,
    early: Option<EarlyVm>,
}

impl VmBuilder {
    /// A fresh VM of `config`; events go to `events`, vCPU reports to `vcpu_events`.
    pub fn new(
        config: VmConfig,
        events: EventBus,
        vcpu_events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    ) -> VmBuilder {
        VmBuilder {
            config,
            events,
            vcpu_events,
            inherited: None,
            early: None,
        }
    }

    /// Takes the guest's RAM, console and devices over from a cpr-exec predecessor.
    pub fn inherited(mut self, inherited: Option<Inherited>) -> VmBuilder {
        self.inherited = inherited;
        self
    }

    /// Uses the KVM VM an [`EarlyVm`] made.
    pub fn early_vm(mut self, early: Option<EarlyVm>) -> VmBuilder {
        self.early = early;
        self
    }

    /// Builds it: KVM VM, RAM slots, irqchip, PIT, devices, vCPUs (parked).
    pub fn build(self) -> Result<Vm, VmError> {
        let VmBuilder {
            config,
            events,
            vcpu_events,
            inherited,
            early,
        } = self;
        let t0 = Instant::now();
        let lap =
            |what: &str| tracing::debug!(at_us = t0.elapsed().as_micros() as u64, what, "create");
        let (kvm, vm_fd) = match early {
            Some(e) => e.join()?,
            None => new_kvm_vm()?,
        };
        lap("vm set up");
        let mut vfio_fds = Vec::new();
        let (ram, console, inherited) = match inherited {
            Some(i) => {
                vfio_fds = i.vfio_fds;
                let ram = GuestRam::inherited(i.ram, &config.memory)?;
                // The console starts once the state, with its undelivered bytes, is loaded (with
                // the bridge, the previous process serves these fds until the take-over).
                let console = Console::resume_deferred(i.console, CONSOLE_BUFFER)?;
                let ctx = InheritedContext {
                    handover: i.handover,
                    held: Vec::new(),
                    started_ns: i.started_ns,
                    bridge: i.bridge.map(std::os::unix::net::UnixStream::from),
                    bridge_reply: None,
                };
                (ram, console, Some(ctx))
            }
            None => (
                GuestRam::create(&config.memory, config.incoming.is_some())?,
                Console::open(&config.serial, CONSOLE_BUFFER)?,
                None,
            ),
        };
        lap("ram mapped");
        add_memory_slots(&vm_fd, &ram)?;
        create_irqchip_and_pit(&vm_fd)?;
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
        let msi_router = match pci_devices.is_empty() {
            true => None,
            false => Some(Arc::new(MsiRouter::new(dup_vm_fd(&kvm, &vm_fd)?))),
        };
        // Inherited devices are wired after the load, once their MSI programming is restored.
        if let (Some(router), None) = (&msi_router, &inherited) {
            for dev in &mut pci_devices {
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
        let metrics = inherited.as_ref().map_or_else(VmMetrics::default, |i| {
            VmMetrics::inherited(&i.handover.update_metrics)
        });
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
            update_undone: Vec::new(),
            metrics,
            workflow_step: String::new(),
            saved_from: None,
            shut_down_after_save: false,
            events,
            last_migration: Arc::new(Mutex::new(MigrationReport::default())),
            vfio,
            msi_router,
            vcpu_events,
            kvm,
        })
    }
}

/// Memory slots before the irqchip: registering them after it costs milliseconds each.
fn add_memory_slots(vm_fd: &VmFd, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, (gpa, host, len)) in ram.host_slices().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: host as u64,
            flags: 0,
        };
        set_memory_region(vm_fd, region).map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn create_irqchip_and_pit(vm_fd: &VmFd) -> Result<(), VmError> {
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// A second `VmFd` on the same VM (for the PCI bus's interrupt routing, used from vCPU threads).
fn dup_vm_fd(kvm: &Kvm, vm: &VmFd) -> Result<VmFd, VmError> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new fd for the same open VM file.
    let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(kvm_err("dup VM fd")(kvm_ioctls::Error::last()));
    }
    // SAFETY: `fd` is a fresh fd for a KVM VM that nothing else owns.
    unsafe { kvm.create_vmfd_from_rawfd(fd) }.map_err(kvm_err("dup VM fd"))
}

/// Guest RAM as DMA mappings: iova = guest physical address, at this process's host address.
pub(crate) fn dma_regions(ram: &GuestRam) -> Vec<DmaMapping> {
    ram.host_slices()
        .into_iter()
        .map(|(gpa, host, len)| DmaMapping {
            iova: gpa,
            size: len as u64,
            vaddr: host as u64,
        })
        .collect()
}

/// Opens (or, after cpr-exec, adopts) the VFIO devices and containers.
fn open_vfio(
    cfg: &crate::vfio::VfioConfig,
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
