//! The VFIO type1 container ioctls vmmd's DMA mappings depend on, behind one narrow trait.
//!
//! [`ContainerIoctls`] is the whole kernel interface of the update path: extension checks, group
//! attach, `VFIO_SET_IOMMU`, `VFIO_IOMMU_MAP_DMA` and `VFIO_IOMMU_UNMAP_DMA`, the last two also with
//! their `VADDR` flags. [`KernelContainer`] issues them on a real container fd; the model in
//! [`super::model`] enforces the rules the kernel documents for them, so that every failure path
//! can be driven on a machine without an IOMMU. vfio-ioctls wraps none of the `VADDR` flags and
//! cannot adopt a container fd inherited across `execve`, so the ioctls are written here.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_VADDR, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_VADDR,
};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: every VFIO ioctl is encoded without a size.
pub(crate) const fn vfio_io(nr: u64) -> libc::c_ulong {
    ((b';' as u64) << 8 | (100 + nr)) as libc::c_ulong
}

pub(crate) const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
pub(crate) const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
pub(crate) const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
pub(crate) const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
pub(crate) const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
pub(crate) const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
pub(crate) const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
pub(crate) const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
pub(crate) const VFIO_DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
pub(crate) const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
pub(crate) const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

/// Which container ioctl a call was: names a step in errors and a target for injected faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ContainerOp {
    /// `VFIO_CHECK_EXTENSION`.
    CheckExtension,
    /// `VFIO_GROUP_SET_CONTAINER` (issued on the group fd, naming the container).
    AttachGroup,
    /// `VFIO_SET_IOMMU` with type1v2.
    SetIommu,
    /// `VFIO_IOMMU_MAP_DMA` with READ|WRITE.
    MapDma,
    /// `VFIO_IOMMU_UNMAP_DMA` without flags.
    UnmapDma,
    /// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_VADDR` (and `_ALL`, or one range).
    InvalidateVaddr,
    /// `VFIO_IOMMU_MAP_DMA` with `VFIO_DMA_MAP_FLAG_VADDR`.
    UpdateVaddr,
}

impl ContainerOp {
    /// Every op, for parsing and for tests that inject a failure at each.
    pub const ALL: [ContainerOp; 7] = [
        ContainerOp::CheckExtension,
        ContainerOp::AttachGroup,
        ContainerOp::SetIommu,
        ContainerOp::MapDma,
        ContainerOp::UnmapDma,
        ContainerOp::InvalidateVaddr,
        ContainerOp::UpdateVaddr,
    ];

    /// The kebab-case name used in fault specs and reports.
    pub fn name(self) -> &'static str {
        match self {
            ContainerOp::CheckExtension => "check-extension",
            ContainerOp::AttachGroup => "attach-group",
            ContainerOp::SetIommu => "set-iommu",
            ContainerOp::MapDma => "map-dma",
            ContainerOp::UnmapDma => "unmap-dma",
            ContainerOp::InvalidateVaddr => "invalidate-vaddr",
            ContainerOp::UpdateVaddr => "update-vaddr",
        }
    }

    /// The kernel's name for the ioctl and its flags, for operators' messages.
    pub fn ioctl(self) -> &'static str {
        match self {
            ContainerOp::CheckExtension => "VFIO_CHECK_EXTENSION",
            ContainerOp::AttachGroup => "VFIO_GROUP_SET_CONTAINER",
            ContainerOp::SetIommu => "VFIO_SET_IOMMU",
            ContainerOp::MapDma => "VFIO_IOMMU_MAP_DMA",
            ContainerOp::UnmapDma => "VFIO_IOMMU_UNMAP_DMA",
            ContainerOp::InvalidateVaddr => "VFIO_IOMMU_UNMAP_DMA(VADDR)",
            ContainerOp::UpdateVaddr => "VFIO_IOMMU_MAP_DMA(VADDR)",
        }
    }
}

impl std::str::FromStr for ContainerOp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ContainerOp::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ContainerOp::ALL.iter().map(|o| o.name()).collect();
                format!(
                    "unknown VFIO container op {s:?}; one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The type1 container ioctls on vmmd's update path. Every method is one ioctl.
pub trait ContainerIoctls: Send + Sync {
    /// `VFIO_CHECK_EXTENSION`: whether the container's IOMMU driver supports `extension`.
    fn check_extension(&self, extension: u32) -> Result<bool, Errno>;
    /// `VFIO_GROUP_SET_CONTAINER`: attaches group `group` (fd `group_fd` for the kernel).
    fn attach_group(&self, group: u32, group_fd: Option<BorrowedFd<'_>>) -> Result<(), Errno>;
    /// `VFIO_SET_IOMMU` with `VFIO_TYPE1v2_IOMMU`, after the first group is attached.
    fn set_iommu(&self) -> Result<(), Errno>;
    /// `VFIO_IOMMU_MAP_DMA` (READ|WRITE): pins `[vaddr, vaddr+size)` and maps it at `iova`.
    fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno>;
    /// `VFIO_IOMMU_UNMAP_DMA`: unmaps `[iova, iova+size)`; returns the bytes unmapped.
    fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, Errno>;
    /// `VFIO_IOMMU_UNMAP_DMA` with `VADDR | ALL`: every mapping's host address becomes invalid;
    /// the IOMMU keeps translating, so the device's DMA goes on.
    fn invalidate_all_vaddr(&self) -> Result<(), Errno>;
    /// `VFIO_IOMMU_UNMAP_DMA` with `VADDR` for one mapping.
    fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), Errno>;
    /// `VFIO_IOMMU_MAP_DMA` with only `VADDR`: gives an invalidated mapping (same iova and size)
    /// its new host address.
    fn update_vaddr(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno>;
    /// The container fd, for the CPR fd table; `None` for a model container.
    fn raw_fd(&self) -> Option<RawFd>;
}

/// A real type1 container: `/dev/vfio/vfio`, opened here or inherited across `execve`.
#[derive(Debug)]
pub struct KernelContainer {
    fd: OwnedFd,
}

/// Issues an ioctl whose argument is a plain integer.
fn ioctl_val(fd: RawFd, request: libc::c_ulong, arg: libc::c_ulong) -> Result<libc::c_int, Errno> {
    // SAFETY: the request takes an integer argument (no memory is passed to the kernel); a bad fd
    // or request only makes the call fail.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    Errno::result(rc)
}

/// Issues an ioctl whose argument is a pointer to `arg`, which the kernel may read and write.
pub(crate) fn ioctl_ptr<T>(
    fd: RawFd,
    request: libc::c_ulong,
    arg: &mut T,
) -> Result<libc::c_int, Errno> {
    // SAFETY: `arg` is a valid, exclusively borrowed `T` for the duration of the call, and every
    // caller passes the struct the request is defined with (its `argsz` filled in).
    let rc = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    Errno::result(rc)
}

impl KernelContainer {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 support.
    pub fn open() -> std::io::Result<KernelContainer> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new("/dev/vfio/vfio"))?;
        let container = KernelContainer { fd: file.into() };
        let version = ioctl_val(container.fd.as_raw_fd(), VFIO_GET_API_VERSION, 0)?;
        if version as u32 != VFIO_API_VERSION {
            return Err(std::io::Error::other(format!(
                "/dev/vfio/vfio speaks VFIO API {version}, vmmd needs {VFIO_API_VERSION}"
            )));
        }
        if !container.check_extension(VFIO_TYPE1v2_IOMMU)? {
            return Err(std::io::Error::other(
                "the kernel's VFIO has no type1v2 IOMMU driver (load vfio_iommu_type1)",
            ));
        }
        Ok(container)
    }

    /// Adopts a container fd inherited across `execve`; its groups and mappings are kept.
    pub fn inherited(fd: OwnedFd) -> KernelContainer {
        KernelContainer { fd }
    }

    fn map(&self, iova: u64, size: u64, vaddr: u64, flags: u32) -> Result<(), Errno> {
        let mut arg = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags,
            vaddr,
            iova,
            size,
        };
        ioctl_ptr(self.fd.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &mut arg).map(drop)
    }

    fn unmap(&self, iova: u64, size: u64, flags: u32) -> Result<u64, Errno> {
        let mut arg = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags,
            iova,
            size,
            ..Default::default()
        };
        ioctl_ptr(self.fd.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut arg)?;
        Ok(arg.size)
    }
}

impl ContainerIoctls for KernelContainer {
    fn check_extension(&self, extension: u32) -> Result<bool, Errno> {
        ioctl_val(
            self.fd.as_raw_fd(),
            VFIO_CHECK_EXTENSION,
            extension as libc::c_ulong,
        )
        .map(|r| r > 0)
    }

    fn attach_group(&self, _group: u32, group_fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
        let group_fd = group_fd.ok_or(Errno::EBADF)?;
        let mut container_fd: libc::c_int = self.fd.as_raw_fd();
        ioctl_ptr(
            group_fd.as_raw_fd(),
            VFIO_GROUP_SET_CONTAINER,
            &mut container_fd,
        )
        .map(drop)
    }

    fn set_iommu(&self) -> Result<(), Errno> {
        ioctl_val(
            self.fd.as_raw_fd(),
            VFIO_SET_IOMMU,
            VFIO_TYPE1v2_IOMMU as libc::c_ulong,
        )
        .map(drop)
    }

    fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno> {
        self.map(
            iova,
            size,
            vaddr,
            VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        )
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, Errno> {
        self.unmap(iova, size, 0)
    }

    fn invalidate_all_vaddr(&self) -> Result<(), Errno> {
        self.unmap(0, 0, VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL)
            .map(drop)
    }

    fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), Errno> {
        self.unmap(iova, size, VFIO_DMA_UNMAP_FLAG_VADDR).map(drop)
    }

    fn update_vaddr(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno> {
        self.map(iova, size, vaddr, VFIO_DMA_MAP_FLAG_VADDR)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // include/uapi/linux/vfio.h: VFIO_TYPE ';', VFIO_BASE 100, all _IO.
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn ops_round_trip_through_their_names() {
        for op in ContainerOp::ALL {
            assert_eq!(op.name().parse::<ContainerOp>(), Ok(op));
        }
        assert!("map"
            .parse::<ContainerOp>()
            .unwrap_err()
            .contains("update-vaddr"));
    }
}
