//! VFIO passthrough that survives a live update.
//!
//! `--device vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,container=NAME]` hands a host PCI device to the
//! guest. Devices whose `container=` names match (all of them by default) share one type1
//! container; every container maps all guest RAM at iova = guest physical address ([`dma`]).
//! The device itself (config space, BARs, INTx) is in [`device`].
//!
//! Across cpr-exec the container, group and device fds and the interrupt eventfds are inherited;
//! the device is not reset, and the DMA mappings stay in the IOMMU while their host addresses are
//! swapped ([`dma::DmaSpace`]). A cpr-reboot cannot keep DMA going (the IOMMU is reset with the
//! host), so it is only allowed with the guest suspended.
//!
//! A hidden `--vfio-model PATH` runs the same code against [`model::ModelKernel`] (no device side)
//! for machines without an IOMMU.

pub mod device;
pub mod dma;
pub mod ioctls;
pub mod model;
pub mod msi;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tracing::info;
use vfio_bindings::bindings::vfio::{
    vfio_group_status, VFIO_GROUP_FLAGS_VIABLE, VFIO_UNMAP_ALL, VFIO_UPDATE_VADDR,
};

use dma::{DmaCallError, DmaMapping, DmaSpace, DmaStepError};
use ioctls::{ContainerIoctls, KernelContainer};
use model::ModelKernel;

/// One `--device vfio=` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDeviceSpec {
    /// The device's sysfs directory, e.g. `/sys/bus/pci/devices/0000:00:03.0`.
    pub sysfs: PathBuf,
    /// Devices naming the same container share it; `None` is the default container.
    pub container: Option<String>,
    /// Whether the guest is shown the device's MSI capability (`msi=off` leaves it INTx only).
    pub msi: bool,
}

impl std::str::FromStr for VfioDeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("vfio=").ok_or_else(|| {
            format!(
                "unknown device {s:?}: use vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,container=NAME][,msi=off]"
            )
        })?;
        let mut parts = rest.split(',');
        let sysfs = PathBuf::from(parts.next().unwrap_or_default());
        if sysfs.as_os_str().is_empty() {
            return Err(format!("device {s:?} names no sysfs path"));
        }
        let mut container = None;
        let mut msi = true;
        for p in parts {
            match p.split_once('=') {
                Some(("container", name)) if !name.is_empty() => container = Some(name.to_string()),
                Some(("msi", "on")) => msi = true,
                Some(("msi", "off")) => msi = false,
                _ => {
                    return Err(format!(
                        "unknown option {p:?} in device {s:?}: container=NAME or msi=on|off"
                    ))
                }
            }
        }
        Ok(VfioDeviceSpec {
            sysfs,
            container,
            msi,
        })
    }
}

/// The VFIO part of the VM configuration.
#[derive(Debug, Clone, Default)]
pub struct VfioConfig {
    /// The devices, in `--device` order.
    pub devices: Vec<VfioDeviceSpec>,
    /// Test hook: use the model kernel with its state in this file instead of `/dev/vfio`.
    pub model: Option<PathBuf>,
    /// Test hook: failures the model injects (see [`model::Fault`]), armed at start.
    pub model_faults: Vec<String>,
    /// Test hook: the model kernel lacks `VFIO_UPDATE_VADDR` and `VFIO_UNMAP_ALL`.
    pub model_without_vaddr: bool,
}

/// Why VFIO set-up or an update step failed.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// The device's IOMMU group cannot be found.
    #[error("VFIO device {path}: cannot read its iommu_group link: is the path a device in sysfs, and is the IOMMU enabled (intel_iommu=on)?")]
    Group {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Opening a VFIO file failed.
    #[error(
        "cannot open {path}: bind the device to vfio-pci (driver_override) and check permissions"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The group has devices not bound to vfio.
    #[error("VFIO group {group} is not viable: bind every device in /sys/kernel/iommu_groups/{group}/devices to vfio-pci")]
    NotViable {
        /// The group.
        group: u32,
    },
    /// A container or group ioctl failed.
    #[error("VFIO {what} failed with {errno}")]
    Ioctl {
        /// What was done.
        what: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// Mapping guest RAM for DMA failed.
    #[error("cannot map guest RAM for DMA")]
    Map(#[source] DmaStepError),
    /// The model's state.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The device side.
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    /// An fd the previous process should have handed over is missing.
    #[error("the cpr-exec hand-over lacks {0}: the previous vmmd had other --device options; start this one with the same ones")]
    MissingFd(String),
}

fn ioctl_err(what: impl Into<String>) -> impl FnOnce(Errno) -> VfioError {
    let what = what.into();
    move |errno| VfioError::Ioctl { what, errno }
}

/// Hand-over names of the VFIO fds.
pub mod fd_names {
    /// Container `k`.
    pub fn container(k: usize) -> String {
        format!("vfio-container-{k}")
    }
    /// Group `id`.
    pub fn group(id: u32) -> String {
        format!("vfio-group-{id}")
    }
    /// Device `i` (in `--device` order).
    pub fn device(i: usize) -> String {
        format!("vfio-device-{i}")
    }
}

struct GroupEntry {
    id: u32,
    fd: Option<OwnedFd>,
}

struct DeviceEntry {
    spec: VfioDeviceSpec,
    group: u32,
    container: usize,
    mdev: bool,
    pci: Option<device::PassthroughDevice>,
}

/// All VFIO state of the VM.
pub struct Vfio {
    dma: DmaSpace,
    groups: Vec<GroupEntry>,
    devices: Vec<DeviceEntry>,
    model: Option<(ModelKernel, Vec<u32>)>,
}

impl std::fmt::Debug for Vfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vfio")
            .field("dma", &self.dma)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// The IOMMU group of a device, from its sysfs `iommu_group` link.
fn iommu_group(sysfs: &Path) -> Result<u32, VfioError> {
    let err = |source| VfioError::Group {
        path: sysfs.to_path_buf(),
        source,
    };
    let link = std::fs::read_link(sysfs.join("iommu_group")).map_err(err)?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            err(std::io::Error::other(format!(
                "iommu_group points at {}",
                link.display()
            )))
        })
}

/// Containers in first-use order and the container index of each device.
fn assign_containers(specs: &[VfioDeviceSpec]) -> (usize, Vec<usize>) {
    let mut names: Vec<Option<&str>> = Vec::new();
    let index = specs
        .iter()
        .map(|s| {
            let name = s.container.as_deref();
            names.iter().position(|n| *n == name).unwrap_or_else(|| {
                names.push(name);
                names.len() - 1
            })
        })
        .collect();
    (names.len(), index)
}

fn open_rw(path: &Path) -> Result<OwnedFd, VfioError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| VfioError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn check_viable(group: u32, fd: &OwnedFd) -> Result<(), VfioError> {
    let mut status = vfio_group_status {
        argsz: std::mem::size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    ioctls::ioctl_ptr(fd.as_raw_fd(), ioctls::VFIO_GROUP_GET_STATUS, &mut status)
        .map_err(ioctl_err(format!("VFIO_GROUP_GET_STATUS on group {group}")))?;
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(VfioError::NotViable { group });
    }
    Ok(())
}

fn device_fd(group: &GroupEntry, name: &str) -> Result<OwnedFd, VfioError> {
    let fd = group.fd.as_ref().ok_or(VfioError::Ioctl {
        what: "VFIO_GROUP_GET_DEVICE_FD".into(),
        errno: Errno::EBADF,
    })?;
    let cname = CString::new(name).map_err(|_| ioctl_err("device name")(Errno::EINVAL))?;
    // SAFETY: the argument is a NUL-terminated string that outlives the call; the kernel only reads it.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            ioctls::VFIO_GROUP_GET_DEVICE_FD,
            cname.as_ptr(),
        )
    };
    let raw = Errno::result(rc).map_err(ioctl_err(format!(
        "VFIO_GROUP_GET_DEVICE_FD({name}) on group {}",
        group.id
    )))?;
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Where the VM's passthrough devices get their resources.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// First guest-physical address for BARs (32-bit window).
    pub mmio_base: u64,
    /// End of the BAR window.
    pub mmio_end: u64,
    /// GSI of device 0's INTx; device `i` gets `first_gsi + i`.
    pub first_gsi: u32,
}

impl Vfio {
    /// Opens the configured devices, attaches their groups to containers and maps `ram` for DMA.
    /// `None` without devices.
    pub fn open(
        cfg: &VfioConfig,
        ram: &[DmaMapping],
        place: Placement,
    ) -> Result<Option<Vfio>, VfioError> {
        Vfio::build(cfg, ram, place, None)
    }

    /// Adopts the VFIO state a cpr-exec predecessor handed over: `take` returns inherited fds by
    /// name, `model_ids` the model's container ids. The device is not reset, nothing is re-attached,
    /// and the DMA mappings await [`Vfio::revalidate`].
    pub fn inherited(
        cfg: &VfioConfig,
        ram: &[DmaMapping],
        place: Placement,
        take: &dyn Fn(&str) -> Option<OwnedFd>,
        model_ids: &[u32],
    ) -> Result<Option<Vfio>, VfioError> {
        Vfio::build(cfg, ram, place, Some((take, model_ids)))
    }

    #[allow(clippy::type_complexity)]
    fn build(
        cfg: &VfioConfig,
        ram: &[DmaMapping],
        place: Placement,
        inherit: Option<(&dyn Fn(&str) -> Option<OwnedFd>, &[u32])>,
    ) -> Result<Option<Vfio>, VfioError> {
        if cfg.devices.is_empty() {
            return Ok(None);
        }
        let take = |name: String| -> Result<OwnedFd, VfioError> {
            let (take, _) = inherit.expect("only called when inheriting");
            take(&name).ok_or(VfioError::MissingFd(name))
        };
        let (count, index) = assign_containers(&cfg.devices);
        let mut devices = Vec::new();
        for (spec, container) in cfg.devices.iter().zip(index) {
            let group = iommu_group(&spec.sysfs)?;
            let mdev = spec.sysfs.join("mdev_type").exists();
            devices.push(DeviceEntry {
                spec: spec.clone(),
                group,
                container,
                mdev,
                pci: None,
            });
        }
        // Groups in first-use order, each in the container of its first device.
        let mut groups: Vec<(u32, usize)> = Vec::new();
        for d in &devices {
            if !groups.iter().any(|(g, _)| *g == d.group) {
                groups.push((d.group, d.container));
            }
        }
        let model = match &cfg.model {
            Some(path) => {
                let m = ModelKernel::open(path)?;
                if inherit.is_none() {
                    m.set_vaddr_support(!cfg.model_without_vaddr);
                }
                if inherit.is_none() {
                    for f in &cfg.model_faults {
                        m.inject(f).map_err(model::ModelError::BadFault)?;
                    }
                }
                Some(m)
            }
            None => None,
        };
        let mut containers: Vec<Box<dyn ContainerIoctls>> = Vec::with_capacity(count);
        let mut model_ids = Vec::new();
        let mut group_entries = Vec::new();
        for k in 0..count {
            let c: Box<dyn ContainerIoctls> = match (&model, inherit) {
                (Some(m), None) => {
                    let c = m.open_container();
                    model_ids.push(c.id());
                    Box::new(c)
                }
                (Some(m), Some((_, ids))) => {
                    let id = *ids
                        .get(k)
                        .ok_or_else(|| VfioError::MissingFd(format!("model container {k}")))?;
                    model_ids.push(id);
                    Box::new(
                        m.adopt_container(id)
                            .ok_or_else(|| VfioError::MissingFd(format!("model container {id}")))?,
                    )
                }
                (None, None) => {
                    Box::new(KernelContainer::open().map_err(|source| VfioError::Open {
                        path: "/dev/vfio/vfio".into(),
                        source,
                    })?)
                }
                (None, Some(_)) => {
                    Box::new(KernelContainer::inherited(take(fd_names::container(k))?))
                }
            };
            for (first, &(id, _)) in groups.iter().filter(|(_, c)| *c == k).enumerate() {
                let fd = match (&model, inherit) {
                    (Some(_), _) => None,
                    (None, None) => Some(open_rw(&Path::new("/dev/vfio").join(id.to_string()))?),
                    (None, Some(_)) => Some(take(fd_names::group(id))?),
                };
                if inherit.is_none() {
                    if let Some(fd) = &fd {
                        check_viable(id, fd)?;
                    }
                    c.attach_group(id, fd.as_ref().map(|f| f.as_fd()))
                        .map_err(ioctl_err(format!(
                            "VFIO_GROUP_SET_CONTAINER (group {id}, container {k})"
                        )))?;
                    if first == 0 {
                        c.set_iommu()
                            .map_err(ioctl_err(format!("VFIO_SET_IOMMU (container {k})")))?;
                    }
                }
                group_entries.push(GroupEntry { id, fd });
            }
            containers.push(c);
        }
        let dma = match inherit {
            None => {
                let mut dma = DmaSpace::new(containers);
                dma.map_all(ram).map_err(VfioError::Map)?;
                dma
            }
            Some(_) => DmaSpace::inherited(containers, ram),
        };
        if model.is_none() {
            for (i, d) in devices.iter_mut().enumerate() {
                let name = d
                    .spec
                    .sysfs
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string();
                let group = group_entries
                    .iter()
                    .find(|g| g.id == d.group)
                    .expect("every group was opened");
                let (fd, fresh) = match inherit {
                    None => (device_fd(group, &name)?, true),
                    Some(_) => (take(fd_names::device(i))?, false),
                };
                let take_named = |n: &str| inherit.and_then(|(t, _)| t(n));
                d.pci = Some(device::PassthroughDevice::open(
                    i,
                    name,
                    fd,
                    fresh,
                    place.first_gsi + i as u32,
                    d.spec.msi,
                    &take_named,
                )?);
            }
            device::assign_bars(
                devices.iter_mut().filter_map(|d| d.pci.as_mut()),
                place.mmio_base,
                place.mmio_end,
            )?;
        }
        info!(
            devices = devices.len(),
            containers = count,
            groups = group_entries.len(),
            model = model.is_some(),
            inherited = inherit.is_some(),
            "VFIO ready"
        );
        Ok(Some(Vfio {
            dma,
            groups: group_entries,
            devices,
            model: model.map(|m| (m, model_ids)),
        }))
    }

    /// Why a cpr-exec cannot keep these devices' DMA going; empty when it can.
    pub fn cpr_exec_blockers(&self) -> Vec<String> {
        let mut blockers = Vec::new();
        for (k, c) in self.dma.containers().enumerate() {
            for (ext, name) in [
                (VFIO_UPDATE_VADDR, "VFIO_UPDATE_VADDR"),
                (VFIO_UNMAP_ALL, "VFIO_UNMAP_ALL"),
            ] {
                match c.check_extension(ext) {
                    Ok(true) => {}
                    Ok(false) => blockers.push(format!(
                        "VFIO container {k}: the kernel lacks {name} (Linux 5.12+ vfio_iommu_type1), so DMA \
                         mappings cannot survive an exec; use a newer host kernel or stop the guest to update"
                    )),
                    Err(e) => blockers.push(format!(
                        "VFIO container {k}: VFIO_CHECK_EXTENSION({name}) failed with {e}"
                    )),
                }
            }
        }
        for d in self.devices.iter().filter(|d| d.mdev) {
            blockers.push(format!(
                "VFIO device {} is a mediated device (mdev): its vendor driver pins pages through the \
                 host addresses that cpr-exec invalidates; remove it before a live update",
                d.spec.sysfs.display()
            ));
        }
        blockers
    }

    /// The container and group fds a cpr-exec successor needs, by hand-over name (the devices'
    /// fds come from [`device::PassthroughDevice::handover_fds`], wherever the devices live).
    pub fn handover_fds(&self) -> Vec<(String, RawFd)> {
        let mut fds: Vec<(String, RawFd)> = self
            .dma
            .containers()
            .enumerate()
            .filter_map(|(k, c)| c.raw_fd().map(|fd| (fd_names::container(k), fd)))
            .collect();
        for g in &self.groups {
            if let Some(fd) = &g.fd {
                fds.push((fd_names::group(g.id), fd.as_raw_fd()));
            }
        }
        fds
    }

    /// The model's container ids, for the hand-over (empty on the real kernel).
    pub fn model_container_ids(&self) -> Vec<u32> {
        self.model
            .as_ref()
            .map(|(_, ids)| ids.clone())
            .unwrap_or_default()
    }

    /// Before the exec: invalidates every container's host addresses (restoring the first ones
    /// when a later container fails).
    pub fn invalidate(&mut self, repeat_last: bool) -> Result<(), DmaStepError> {
        self.dma.invalidate(repeat_last)
    }

    /// After a failed save or exec: the host addresses this process invalidated come back.
    pub fn cancel_invalidation(&mut self) -> Result<(), DmaCallError> {
        self.dma.cancel_invalidation()
    }

    /// In the new process: every mapping gets the address of the same guest RAM here. With
    /// `after_failed_successor`, a mapping a crashed successor had already re-validated is
    /// invalidated and re-validated again.
    pub fn revalidate(
        &mut self,
        ram: &[DmaMapping],
        after_failed_successor: bool,
    ) -> Result<(), DmaStepError> {
        let vaddr_of = |iova: u64| ram.iter().find(|r| r.iova == iova).map(|r| r.vaddr);
        match self.dma.revalidate(vaddr_of) {
            Err(e) if after_failed_successor && e.failed.errno == Errno::EINVAL => {
                // Some were valid: make them all invalid (ignoring those that already are), retry.
                for (k, c) in self.dma.containers().enumerate() {
                    for m in self.dma.mappings(k) {
                        let _ = c.invalidate_vaddr(m.iova, m.size);
                    }
                }
                self.dma.revalidate(vaddr_of)
            }
            r => r,
        }
    }

    /// Whether the host addresses are invalid (between invalidate and revalidate).
    pub fn is_invalid(&self) -> bool {
        self.dma.is_invalid()
    }

    /// Takes the passthrough PCI devices out (they move to the device bus).
    pub fn take_pci_devices(&mut self) -> Vec<device::PassthroughDevice> {
        self.devices
            .iter_mut()
            .filter_map(|d| d.pci.take())
            .collect()
    }

    /// Number of containers.
    pub fn container_count(&self) -> usize {
        self.dma.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        let s: VfioDeviceSpec = "vfio=/sys/bus/pci/devices/0000:00:03.0,container=a"
            .parse()
            .unwrap();
        assert_eq!(s.sysfs, Path::new("/sys/bus/pci/devices/0000:00:03.0"));
        assert_eq!(s.container.as_deref(), Some("a"));
        assert!("vfio=".parse::<VfioDeviceSpec>().is_err());
        assert!("virtio=/x"
            .parse::<VfioDeviceSpec>()
            .unwrap_err()
            .contains("vfio="));
        assert!("vfio=/x,foo=1"
            .parse::<VfioDeviceSpec>()
            .unwrap_err()
            .contains("container"));
    }

    #[test]
    fn containers_are_shared_by_name() {
        let spec = |c: Option<&str>| VfioDeviceSpec {
            sysfs: "/x".into(),
            container: c.map(String::from),
            msi: true,
        };
        let (n, idx) =
            assign_containers(&[spec(None), spec(Some("b")), spec(None), spec(Some("c"))]);
        assert_eq!((n, idx), (3, vec![0, 1, 0, 2]));
    }

    /// A fake sysfs device directory: `iommu_group` → `../groups/N`, plus `mdev_type` for an mdev.
    fn fake_device(dir: &Path, name: &str, group: u32, mdev: bool) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(format!("../groups/{group}"), d.join("iommu_group")).unwrap();
        if mdev {
            std::fs::write(d.join("mdev_type"), "").unwrap();
        }
        d
    }

    fn ram() -> Vec<DmaMapping> {
        // Real memory: the model resolves addresses through /proc/self/maps.
        let len = 1 << 20;
        // SAFETY: anonymous shared mapping; leaked for the test's life.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        vec![DmaMapping {
            iova: 0,
            size: len as u64,
            vaddr: p as u64,
        }]
    }

    const PLACE: Placement = Placement {
        mmio_base: 0xe000_0000,
        mmio_end: 0xfe00_0000,
        first_gsi: 10,
    };

    #[test]
    fn model_devices_get_containers_and_blockers() {
        let dir = std::env::temp_dir().join(format!("vfio-cfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = fake_device(&dir, "0000:00:03.0", 7, false);
        let b = fake_device(&dir, "0000:00:04.0", 8, false);
        let m = fake_device(&dir, "mdev-uuid", 9, true);
        let cfg = |devices: Vec<VfioDeviceSpec>, without: bool, state: &str| VfioConfig {
            devices,
            model: Some(dir.join(state)),
            model_faults: Vec::new(),
            model_without_vaddr: without,
        };
        let dev = |p: &Path, c: Option<&str>| VfioDeviceSpec {
            sysfs: p.to_path_buf(),
            container: c.map(String::from),
            msi: true,
        };

        let v = Vfio::open(
            &cfg(vec![dev(&a, None), dev(&b, Some("x"))], false, "s1"),
            &ram(),
            PLACE,
        )
        .unwrap()
        .unwrap();
        assert_eq!(v.container_count(), 2);
        assert!(
            v.cpr_exec_blockers().is_empty(),
            "{:?}",
            v.cpr_exec_blockers()
        );
        let state = ModelKernel::read_state(&dir.join("s1")).unwrap();
        assert_eq!(state.containers[&0].groups, vec![7]);
        assert_eq!(state.containers[&1].groups, vec![8]);
        assert!(state.containers.values().all(|c| c.dmas.len() == 1));

        let v = Vfio::open(&cfg(vec![dev(&a, None)], true, "s2"), &ram(), PLACE)
            .unwrap()
            .unwrap();
        let b = v.cpr_exec_blockers();
        assert!(
            b.iter().any(|s| s.contains("VFIO_UPDATE_VADDR"))
                && b.iter().any(|s| s.contains("VFIO_UNMAP_ALL")),
            "{b:?}"
        );

        let v = Vfio::open(&cfg(vec![dev(&m, None)], false, "s3"), &ram(), PLACE)
            .unwrap()
            .unwrap();
        assert!(v
            .cpr_exec_blockers()
            .iter()
            .any(|s| s.contains("mediated device")));

        let missing = VfioDeviceSpec {
            sysfs: dir.join("nope"),
            container: None,
            msi: true,
        };
        let e = Vfio::open(&cfg(vec![missing], false, "s4"), &ram(), PLACE).unwrap_err();
        assert!(e.to_string().contains("iommu_group"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
