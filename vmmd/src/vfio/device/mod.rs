//! A host PCI device given to the guest through its VFIO device fd.
//!
//! Config space is read and written through the VFIO config region, except what the VMM owns:
//! the BARs (placed by vmmd in the 32-bit MMIO window, sizing emulated), the expansion ROM (none),
//! the interrupt line (the GSI of INTx pin A) and the capability list, which is hidden because
//! MSI/MSI-X are not emulated yet: the guest uses INTx. BAR accesses trap to vmmd and go to the
//! device's region with `pread`/`pwrite`. INTx is an eventfd the device signals, wired to a KVM
//! irqfd with a resample eventfd that unmasks the line when the guest's EOI reaches the IOAPIC.
//!
//! Across cpr-exec the device fd and both eventfds are inherited: no reset, no new `SET_IRQS`;
//! the new process only registers the same eventfds as irqfds of its new VM.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use std::sync::Arc;

use nix::errno::Errno;
use tracing::{debug, info, warn};
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_irq_info, vfio_region_info, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

use super::ioctls::{
    ioctl_ptr, VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_IRQ_INFO, VFIO_DEVICE_GET_REGION_INFO,
    VFIO_DEVICE_RESET, VFIO_DEVICE_SET_IRQS,
};
use super::msi::{self, MsiCap, MsiRouter};

/// Why a passthrough device cannot be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device ioctl failed.
    #[error("VFIO device {device}: {op} failed with {errno}")]
    Ioctl {
        /// The device.
        device: String,
        /// The ioctl.
        op: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// Not a PCI device.
    #[error("VFIO device {0} is not a PCI device: only vfio-pci devices are supported")]
    NotPci(String),
    /// The BARs do not fit the MMIO window.
    #[error(
        "VFIO device {device}: BAR {bar} ({size} bytes) does not fit in the guest's MMIO window"
    )]
    NoRoom {
        /// The device.
        device: String,
        /// The BAR.
        bar: usize,
        /// Its size.
        size: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for VFIO device {device}")]
    EventFd {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the irqfd.
    #[error("VFIO device {device}: KVM_IRQFD for GSI {gsi} failed")]
    Irqfd {
        /// The device.
        device: String,
        /// The GSI.
        gsi: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

#[derive(Debug, Clone, Copy)]
struct Region {
    offset: u64,
    size: u64,
}

/// A memory BAR as the guest sees it.
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    /// BAR number (0–5).
    pub index: usize,
    /// Guest-physical address.
    pub gpa: u64,
    /// Size (a power of two).
    pub size: u64,
    region_offset: u64,
    /// Low 4 bits of the BAR register (memory, 32/64-bit, prefetchable).
    flags: u32,
    is64: bool,
}

struct Intx {
    trigger: EventFd,
    resample: EventFd,
}

/// A passthrough device's guest-visible state that vmmd owns: its MSI shadow. Everything else
/// (config space, BARs' contents, DMA) lives in the device and survives with its fds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassthroughState {
    /// The guest's MSI programming, when the device shows an MSI capability.
    pub msi: Option<MsiCap>,
}

impl Persist for PassthroughDevice {
    type State = PassthroughState;
    /// The device as opened from its (inherited) fds, not wired to the VM yet.
    type ConstructorArgs = PassthroughDevice;
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<PassthroughState, Self::Error> {
        Ok(PassthroughState { msi: self.msi_cap })
    }

    fn restore(
        mut dev: PassthroughDevice,
        state: &PassthroughState,
    ) -> Result<PassthroughDevice, Self::Error> {
        if let Some(msi) = state.msi {
            dev.restore_msi(msi);
        }
        Ok(dev)
    }
}

/// One passthrough PCI device.
pub struct PassthroughDevice {
    name: String,
    fd: OwnedFd,
    config: Region,
    regions: Vec<(usize, Region)>,
    bars: Vec<Bar>,
    sizing: [bool; 6],
    intx: Option<Intx>,
    gsi: u32,
    /// The VM's routing and irqfds, once wired.
    router: Option<Arc<MsiRouter>>,
    /// The device's MSI capability as the guest sees it, if it has one.
    msi_cap: Option<MsiCap>,
    /// The MSI eventfd (VFIO signals it, KVM injects the message routed to `msi_gsi`).
    msi: Option<EventFd>,
    msi_gsi: u32,
}

impl std::fmt::Debug for PassthroughDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassthroughDevice")
            .field("name", &self.name)
            .field("bars", &self.bars)
            .finish()
    }
}

/// `VFIO_DEVICE_SET_IRQS` with one eventfd.
#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

const PCI_COMMAND: u16 = 0x04;
const PCI_STATUS_CAP_LIST: u32 = 1 << 20;
const PCI_BAR0: u16 = 0x10;
const PCI_ROM: u16 = 0x30;
const PCI_CAP_PTR: u16 = 0x34;
const PCI_INTERRUPT_LINE: u16 = 0x3c;

fn eventfd_names(index: usize) -> (String, String) {
    let d = super::fd_names::device(index);
    (format!("{d}-intx"), format!("{d}-intx-resample"))
}

impl PassthroughDevice {
    /// Sets up device `index` from its VFIO fd. `fresh`: a new open, so reset it and configure INTx;
    /// otherwise (inherited) keep it as it is and take the INTx and MSI eventfds through `take`.
    /// `show_msi`: show the guest the device's MSI capability, if it has one.
    pub fn open(
        index: usize,
        name: String,
        fd: OwnedFd,
        fresh: bool,
        gsi: u32,
        show_msi: bool,
        take: &dyn Fn(&str) -> Option<OwnedFd>,
    ) -> Result<PassthroughDevice, DeviceError> {
        let device_name = name.clone();
        let err = move |op: &'static str| {
            let device = device_name.clone();
            move |errno| DeviceError::Ioctl { device, op, errno }
        };
        let mut info = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        ioctl_ptr(fd.as_raw_fd(), VFIO_DEVICE_GET_INFO, &mut info)
            .map_err(err("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(DeviceError::NotPci(name));
        }
        let region = |index: u32| -> Result<Region, DeviceError> {
            let mut r = vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            ioctl_ptr(fd.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut r)
                .map_err(err("VFIO_DEVICE_GET_REGION_INFO"))?;
            Ok(Region {
                offset: r.offset,
                size: r.size,
            })
        };
        let config = region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut regions = Vec::new();
        for i in 0..6usize {
            let r = region(i as u32)?;
            if r.size > 0 {
                regions.push((i, r));
            }
        }
        if fresh && info.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
            // SAFETY: VFIO_DEVICE_RESET takes no argument.
            let rc = unsafe { libc::ioctl(fd.as_raw_fd(), VFIO_DEVICE_RESET) };
            if let Err(e) = Errno::result(rc) {
                warn!(device = %name, error = %e, "VFIO_DEVICE_RESET failed; going on with the device as it is");
            }
        }
        let mut dev = PassthroughDevice {
            name,
            fd,
            config,
            regions,
            bars: Vec::new(),
            sizing: [false; 6],
            intx: None,
            gsi,
            router: None,
            msi_cap: None,
            msi: None,
            msi_gsi: msi::IOAPIC_PINS + index as u32,
        };
        dev.bars = dev.probe_bars();
        dev.msi_cap = dev.find_msi_cap().filter(|_| show_msi);
        if !fresh {
            dev.msi = take(&format!("{}-msi", super::fd_names::device(index))).map(|fd| {
                // SAFETY: the hand-over names this fd as the MSI eventfd the previous process
                // created; ownership moves into the EventFd.
                unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
            });
        }
        let pin = dev.read_config_dword(PCI_INTERRUPT_LINE) >> 8 & 0xff;
        let mut irq = vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            index: VFIO_PCI_INTX_IRQ_INDEX,
            ..Default::default()
        };
        ioctl_ptr(dev.fd.as_raw_fd(), VFIO_DEVICE_GET_IRQ_INFO, &mut irq)
            .map_err(err("VFIO_DEVICE_GET_IRQ_INFO"))?;
        if pin != 0 && irq.count > 0 {
            dev.intx = Some(if fresh {
                dev.new_intx()?
            } else {
                dev.inherited_intx(index, take)?
            });
        }
        info!(device = %dev.name, bars = dev.bars.len(), intx = dev.intx.is_some(), msi = dev.msi_cap.is_some(), gsi, fresh, "VFIO PCI device");
        Ok(dev)
    }

    fn new_intx(&self) -> Result<Intx, DeviceError> {
        let efd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                DeviceError::EventFd {
                    device: self.name.clone(),
                    source,
                }
            })
        };
        let intx = Intx {
            trigger: efd()?,
            resample: efd()?,
        };
        self.set_irq(VFIO_IRQ_SET_ACTION_TRIGGER, intx.trigger.as_raw_fd())?;
        self.set_irq(VFIO_IRQ_SET_ACTION_UNMASK, intx.resample.as_raw_fd())?;
        Ok(intx)
    }

    fn inherited_intx(
        &self,
        index: usize,
        take: &dyn Fn(&str) -> Option<OwnedFd>,
    ) -> Result<Intx, DeviceError> {
        let (t, r) = eventfd_names(index);
        let get = |n: &str| {
            take(n).map(|fd| {
                // SAFETY: the hand-over names this fd as an eventfd the previous process created;
                // ownership moves into the EventFd.
                unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
            })
        };
        match (get(&t), get(&r)) {
            (Some(trigger), Some(resample)) => Ok(Intx { trigger, resample }),
            _ => Err(DeviceError::EventFd {
                device: self.name.clone(),
                source: std::io::Error::other("the cpr-exec hand-over lacks the INTx eventfds"),
            }),
        }
    }

    fn set_irq(&self, action: u32, fd: RawFd) -> Result<(), DeviceError> {
        self.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, action, Some(fd))
    }

    /// `VFIO_DEVICE_SET_IRQS` on `index`: one eventfd, or (`None`) none, which disables the
    /// index for a trigger action.
    fn set_irqs(&self, index: u32, action: u32, fd: Option<RawFd>) -> Result<(), DeviceError> {
        let data = if fd.is_some() {
            VFIO_IRQ_SET_DATA_EVENTFD
        } else {
            VFIO_IRQ_SET_DATA_NONE
        };
        let mut set = IrqSetOne {
            argsz: std::mem::size_of::<IrqSetOne>() as u32,
            flags: action | data,
            index,
            start: 0,
            count: u32::from(fd.is_some()),
            fd: fd.unwrap_or(-1),
        };
        ioctl_ptr(self.fd.as_raw_fd(), VFIO_DEVICE_SET_IRQS, &mut set)
            .map(drop)
            .map_err(|errno| DeviceError::Ioctl {
                device: self.name.clone(),
                op: "VFIO_DEVICE_SET_IRQS",
                errno,
            })
    }

    /// Connects the device's interrupts to the VM `router` serves: the MSI route and irqfd when
    /// MSI is enabled (after a cpr-exec, see [`Self::restore_msi`]), INTx (irqfd with resample)
    /// otherwise. Called once per VM.
    pub fn wire(&mut self, router: Arc<MsiRouter>) -> Result<(), DeviceError> {
        match (self.msi_cap.filter(MsiCap::enabled), &self.msi) {
            (Some(cap), Some(msi)) => {
                router
                    .route(self.msi_gsi, Some(cap.message))
                    .map_err(self.irqfd_err(self.msi_gsi))?;
                router
                    .vm()
                    .register_irqfd(msi, self.msi_gsi)
                    .map_err(self.irqfd_err(self.msi_gsi))?;
            }
            _ => {
                if let Some(intx) = &self.intx {
                    router
                        .vm()
                        .register_irqfd_with_resample(&intx.trigger, &intx.resample, self.gsi)
                        .map_err(self.irqfd_err(self.gsi))?;
                }
            }
        }
        self.router = Some(router);
        Ok(())
    }

    fn irqfd_err(&self, gsi: u32) -> impl FnOnce(kvm_ioctls::Error) -> DeviceError {
        let device = self.name.clone();
        move |source| DeviceError::Irqfd {
            device,
            gsi,
            source,
        }
    }

    /// Takes over the guest's MSI programming from the previous process (before [`Self::wire`]).
    fn restore_msi(&mut self, saved: MsiCap) {
        match &mut self.msi_cap {
            Some(cap) if cap.offset == saved.offset && cap.len() == saved.len() => *cap = saved,
            _ => {
                warn!(device = %self.name, "the hand-over's MSI state does not fit this device; ignored")
            }
        }
    }

    fn find_msi_cap(&self) -> Option<MsiCap> {
        if self.read_config_dword(PCI_COMMAND) & PCI_STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut at = (self.read_config_dword(PCI_CAP_PTR) & 0xfc) as u16;
        // A bounded walk: a broken list cannot loop forever.
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            let header = self.read_config_dword(at);
            if header & 0xff == 0x05 {
                return Some(MsiCap::new(at, (header >> 16) as u16));
            }
            at = (header >> 8 & 0xfc) as u16;
        }
        None
    }

    /// Applies the guest's new MSI programming: enable, re-route, or disable (back to INTx).
    fn msi_changed(&mut self, before: MsiCap) {
        let (Some(cap), Some(router)) = (self.msi_cap, self.router.clone()) else {
            return;
        };
        let result = match (before.enabled(), cap.enabled()) {
            (false, true) => self.enable_msi(&router, cap),
            (true, true) if before.message != cap.message => router
                .route(self.msi_gsi, Some(cap.message))
                .map_err(self.irqfd_err(self.msi_gsi)),
            (true, false) => self.disable_msi(&router),
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(device = %self.name, error = %e, "cannot apply the guest's MSI setting");
        }
    }

    fn enable_msi(&mut self, router: &MsiRouter, cap: MsiCap) -> Result<(), DeviceError> {
        // INTx off first: vfio-pci enables one interrupt type at a time.
        if let Some(intx) = &self.intx {
            self.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, None)?;
            router
                .vm()
                .unregister_irqfd(&intx.trigger, self.gsi)
                .map_err(self.irqfd_err(self.gsi))?;
        }
        let msi = match self.msi.take() {
            Some(m) => m,
            None => EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|source| {
                DeviceError::EventFd {
                    device: self.name.clone(),
                    source,
                }
            })?,
        };
        let msi = self.msi.insert(msi);
        let fd = msi.as_raw_fd();
        router
            .route(self.msi_gsi, Some(cap.message))
            .map_err(self.irqfd_err(self.msi_gsi))?;
        router
            .vm()
            .register_irqfd(self.msi.as_ref().expect("inserted above"), self.msi_gsi)
            .map_err(self.irqfd_err(self.msi_gsi))?;
        self.set_irqs(
            VFIO_PCI_MSI_IRQ_INDEX,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            Some(fd),
        )?;
        info!(device = %self.name, gsi = self.msi_gsi, address = format!("{:#x}", cap.message.address),
            data = format!("{:#x}", cap.message.data), "MSI enabled");
        Ok(())
    }

    fn disable_msi(&mut self, router: &MsiRouter) -> Result<(), DeviceError> {
        self.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, None)?;
        if let Some(msi) = &self.msi {
            router
                .vm()
                .unregister_irqfd(msi, self.msi_gsi)
                .map_err(self.irqfd_err(self.msi_gsi))?;
        }
        router
            .route(self.msi_gsi, None)
            .map_err(self.irqfd_err(self.msi_gsi))?;
        if let Some(intx) = &self.intx {
            self.set_irq(VFIO_IRQ_SET_ACTION_TRIGGER, intx.trigger.as_raw_fd())?;
            self.set_irq(VFIO_IRQ_SET_ACTION_UNMASK, intx.resample.as_raw_fd())?;
            router
                .vm()
                .register_irqfd_with_resample(&intx.trigger, &intx.resample, self.gsi)
                .map_err(self.irqfd_err(self.gsi))?;
        }
        info!(device = %self.name, "MSI disabled; back to INTx");
        Ok(())
    }

    /// The fds a cpr-exec successor needs, as device `index`.
    pub fn handover_fds(&self, index: usize) -> Vec<(String, RawFd)> {
        let mut fds = vec![(super::fd_names::device(index), self.fd.as_raw_fd())];
        if let Some(intx) = &self.intx {
            let (t, r) = eventfd_names(index);
            fds.push((t, intx.trigger.as_raw_fd()));
            fds.push((r, intx.resample.as_raw_fd()));
        }
        if let Some(msi) = &self.msi {
            fds.push((
                format!("{}-msi", super::fd_names::device(index)),
                msi.as_raw_fd(),
            ));
        }
        fds
    }

    /// The memory BARs the guest sees.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// The GSI of INTx pin A.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    fn probe_bars(&self) -> Vec<Bar> {
        let mut bars = Vec::new();
        let mut skip_next = false;
        for &(index, region) in &self.regions {
            if std::mem::take(&mut skip_next) && index > 0 {
                continue;
            }
            let reg = self.read_config_dword(PCI_BAR0 + 4 * index as u16);
            if reg & 1 != 0 {
                warn!(device = %self.name, bar = index, "I/O-port BARs are not passed through; the guest will not see this one");
                continue;
            }
            let is64 = reg >> 1 & 3 == 2;
            skip_next = is64;
            bars.push(Bar {
                index,
                gpa: 0,
                size: region.size.next_power_of_two().max(4096),
                region_offset: region.offset,
                flags: reg & 0xf,
                is64,
            });
        }
        bars
    }

    fn pread(&self, offset: u64, buf: &mut [u8]) -> bool {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::pread(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        n == buf.len() as isize
    }

    fn pwrite(&self, offset: u64, buf: &[u8]) -> bool {
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        n == buf.len() as isize
    }

    fn read_config_dword(&self, offset: u16) -> u32 {
        let mut b = [0xffu8; 4];
        if !self.pread(self.config.offset + u64::from(offset), &mut b) {
            debug!(device = %self.name, offset, "config read failed");
            return u32::MAX;
        }
        u32::from_le_bytes(b)
    }

    /// The config dword at `offset` as the guest sees it.
    fn guest_config_dword(&self, offset: u16) -> u32 {
        match offset {
            PCI_COMMAND => {
                let v = self.read_config_dword(offset) & !PCI_STATUS_CAP_LIST;
                if self.msi_cap.is_some() {
                    v | PCI_STATUS_CAP_LIST
                } else {
                    v
                }
            }
            0x10..=0x24 => {
                let slot = usize::from((offset - PCI_BAR0) / 4);
                let bar = self
                    .bars
                    .iter()
                    .find(|b| b.index == slot || (b.is64 && b.index + 1 == slot));
                match bar {
                    None => 0,
                    Some(b) => {
                        let upper = b.index != slot;
                        let value = if self.sizing[slot] {
                            !(b.size - 1)
                        } else {
                            b.gpa
                        };
                        if upper {
                            (value >> 32) as u32
                        } else {
                            (value as u32 & !0xf) | b.flags
                        }
                    }
                }
            }
            PCI_CAP_PTR => self.msi_cap.map_or(0, |c| u32::from(c.offset)),
            PCI_ROM => 0,
            PCI_INTERRUPT_LINE => {
                let v = self.read_config_dword(offset);
                let line = if self.intx.is_some() {
                    self.gsi & 0xff
                } else {
                    0xff
                };
                (v & !0xff) | line
            }
            o if u64::from(o) >= self.config.size.min(256) => u32::MAX,
            // Beyond the standard header only the MSI capability is shown.
            o if o >= 0x40 => self.msi_cap.map_or(0, |cap| {
                let bytes = cap.bytes();
                let mut v = [0u8; 4];
                for (i, b) in v.iter_mut().enumerate() {
                    let at = (o + i as u16).checked_sub(cap.offset);
                    *b = at
                        .and_then(|a| bytes.get(usize::from(a)).copied())
                        .unwrap_or(0);
                }
                u32::from_le_bytes(v)
            }),
            o => self.read_config_dword(o),
        }
    }

    /// A guest config-space read of `data.len()` bytes at `offset`.
    pub fn config_read(&self, offset: u16, data: &mut [u8]) {
        let dword = self.guest_config_dword(offset & !3).to_le_bytes();
        let start = usize::from(offset & 3);
        for (i, b) in data.iter_mut().enumerate() {
            *b = dword.get(start + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest config-space write.
    pub fn config_write(&mut self, offset: u16, data: &[u8]) {
        let aligned = offset & !3;
        match aligned {
            0x10..=0x24 => {
                let slot = usize::from((aligned - PCI_BAR0) / 4);
                let mut v = [0u8; 4];
                let start = usize::from(offset & 3);
                for (i, b) in data.iter().enumerate() {
                    if let Some(x) = v.get_mut(start + i) {
                        *x = *b;
                    }
                }
                let written = u32::from_le_bytes(v);
                // All ones in the address bits starts sizing; anything else ends it. The BAR
                // stays where vmmd put it (the guest only rediscovers it).
                self.sizing[slot] = written | 0xf == u32::MAX;
                if !self.sizing[slot] {
                    let current = self.guest_config_dword(aligned) & !0xf;
                    if written & !0xf != current {
                        debug!(device = %self.name, bar = slot, written = format!("{written:#x}"), "BAR move ignored");
                    }
                }
            }
            // The VMM owns the ROM BAR, the capability pointer and the interrupt line/pin.
            PCI_ROM | PCI_CAP_PTR | PCI_INTERRUPT_LINE => {}
            _ if offset >= 0x40 => {
                if let Some(cap) = &mut self.msi_cap {
                    let rel = offset.checked_sub(cap.offset).filter(|r| *r < cap.len());
                    if let Some(rel) = rel {
                        let before = *cap;
                        cap.write(rel, data);
                        self.msi_changed(before);
                    }
                }
            }
            _ => {
                if !self.pwrite(self.config.offset + u64::from(offset), data) {
                    debug!(device = %self.name, offset, "config write failed");
                }
            }
        }
    }

    fn bar_at(&self, gpa: u64, len: usize) -> Option<(&Bar, u64)> {
        self.bars
            .iter()
            .find(|b| b.gpa != 0 && gpa >= b.gpa && gpa + len as u64 <= b.gpa + b.size)
            .map(|b| (b, gpa - b.gpa))
    }

    /// A guest MMIO read; false when `gpa` is not in one of this device's BARs.
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) -> bool {
        let Some((bar, off)) = self.bar_at(gpa, data.len()) else {
            return false;
        };
        if !self.pread(bar.region_offset + off, data) {
            data.fill(0xff);
        }
        true
    }

    /// A guest MMIO write; false when `gpa` is not in one of this device's BARs.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some((bar, off)) = self.bar_at(gpa, data.len()) else {
            return false;
        };
        if !self.pwrite(bar.region_offset + off, data) {
            debug!(device = %self.name, gpa, "BAR write failed");
        }
        true
    }
}

/// Places every device's memory BARs in `[base, end)`, each aligned to its size.
pub fn assign_bars<'a>(
    devices: impl Iterator<Item = &'a mut PassthroughDevice>,
    base: u64,
    end: u64,
) -> Result<(), DeviceError> {
    let mut next = base;
    for dev in devices {
        for bar in &mut dev.bars {
            let at = next.next_multiple_of(bar.size);
            if at + bar.size > end {
                return Err(DeviceError::NoRoom {
                    device: dev.name.clone(),
                    bar: bar.index,
                    size: bar.size,
                });
            }
            bar.gpa = at;
            next = at + bar.size;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
