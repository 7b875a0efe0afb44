//! A model of the kernel's VFIO type1 IOMMU driver, for machines without an IOMMU.
//!
//! [`ModelKernel`] implements [`ContainerIoctls`] with the rules of `include/uapi/linux/vfio.h` and
//! `drivers/vfio/vfio_iommu_type1.c` (Linux 6.1+) that vmmd's update path depends on:
//!
//! * `VFIO_UPDATE_VADDR` and `VFIO_UNMAP_ALL` are reported only once an IOMMU is set, and only if
//!   the modelled kernel has them;
//! * a map must be page aligned, must not overlap (`EEXIST`), and must pin memory that is mapped
//!   in the caller (`EFAULT`); an unmap may not split a mapping (`EINVAL`);
//! * unmap with `VADDR`: `ALL` needs iova = size = 0; a range that is already invalid fails with
//!   `EINVAL` and undoes what that call invalidated;
//! * map with `VADDR`: flags must be exactly `VADDR` (no READ/WRITE), the iova must name a mapping
//!   (`ENOENT`) of the same size whose address is invalid (`EINVAL`); the locked-memory charge
//!   moves to the caller's mm;
//! * no group may attach while a host address is invalid (`EBUSY`).
//!
//! The IOMMU keeps translating an invalidated mapping, so the device's view
//! ([`ModelKernel::device_view`]) never changes during an update. What the model adds: it records
//! which file and offset each mapping pins and flags a re-map whose new address points elsewhere
//! ([`ModelState::violations`]), which the kernel cannot see but would be silent corruption.
//!
//! Its state can live in a file, like kernel memory outliving the process that made the calls:
//! vmmd's hidden `--vfio-model PATH` uses it across a real `execve`. A caller's mm is told apart by
//! the 16 random bytes the kernel gives each new program (`AT_RANDOM`). Any call can be made to
//! fail ([`Fault`]).

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use vfio_bindings::bindings::vfio::{VFIO_TYPE1v2_IOMMU, VFIO_UNMAP_ALL, VFIO_UPDATE_VADDR};

use super::ioctls::{ContainerIoctls, ContainerOp};

const PAGE: u64 = 4096;
const TYPE1V2: u32 = VFIO_TYPE1v2_IOMMU;

/// The file and offset a mapping pins (device and inode from `/proc/self/maps`; inode 0 for
/// anonymous memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backing {
    /// `major:minor` of the file's device, as `/proc/self/maps` prints it.
    pub dev: (u32, u32),
    /// The file's inode.
    pub inode: u64,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
}

/// One DMA mapping in a modelled container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDma {
    /// IO virtual address.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host address, or `None` while invalidated with `VFIO_DMA_UNMAP_FLAG_VADDR`.
    pub vaddr: Option<u64>,
    /// The mm charged for the pinned pages.
    pub mm: u64,
    /// What the IOMMU translates `iova` to: fixed when the mapping was made.
    pub backing: Backing,
}

/// One modelled container.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelContainer {
    /// Groups attached, in order.
    pub groups: Vec<u32>,
    /// Whether `VFIO_SET_IOMMU` succeeded.
    pub iommu_set: bool,
    /// Mappings, ordered by iova.
    pub dmas: Vec<ModelDma>,
}

impl ModelContainer {
    fn invalid_count(&self) -> usize {
        self.dmas.iter().filter(|d| d.vaddr.is_none()).count()
    }
}

/// The whole modelled kernel state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelState {
    /// Whether the modelled kernel has `VFIO_UPDATE_VADDR` (Linux 5.12+).
    pub update_vaddr: bool,
    /// Whether it has `VFIO_UNMAP_ALL` (Linux 5.12+).
    pub unmap_all: bool,
    /// Containers by id (the order in which they were opened).
    pub containers: BTreeMap<u32, ModelContainer>,
    /// Locked memory charged per mm, in bytes.
    pub locked: BTreeMap<u64, u64>,
    /// Re-maps whose new address pointed at other memory than the mapping pins.
    pub violations: Vec<String>,
    /// Every call, in order: `container op result`.
    pub log: Vec<String>,
    /// Armed failures (kept with the state, so a fault can fire in the process after an exec).
    #[serde(default)]
    pub faults: Vec<ArmedFault>,
}

/// A fault in the model's state: its spec (as [`Fault`] parses it) and the matching calls seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedFault {
    /// `OP[:CONTAINER|*[:NTH[:ERRNO]]]`.
    pub spec: String,
    /// Matching calls so far.
    pub seen: u32,
}

impl Default for ModelState {
    fn default() -> Self {
        ModelState {
            update_vaddr: true,
            unmap_all: true,
            containers: BTreeMap::new(),
            locked: BTreeMap::new(),
            violations: Vec::new(),
            log: Vec::new(),
            faults: Vec::new(),
        }
    }
}

/// A failure to inject: the `nth` (0-based) call of `op` on `container` (any container when
/// `None`) fails with `errno` before it changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The ioctl to fail.
    pub op: ContainerOp,
    /// The container, or any.
    pub container: Option<u32>,
    /// Which matching call fails (0 = the first).
    pub nth: u32,
    /// The error it returns.
    pub errno: Errno,
}

/// Checks a fault spec (for command-line parsing); returns it unchanged.
pub fn fault_spec(s: &str) -> Result<String, String> {
    s.parse::<Fault>().map(|_| s.to_string())
}

impl std::str::FromStr for Fault {
    type Err = String;
    /// `OP[:CONTAINER|*[:NTH[:ERRNO]]]`, e.g. `invalidate-vaddr:1`, `update-vaddr:*:2:EFAULT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let op = parts.next().unwrap_or_default().parse()?;
        let container = match parts.next() {
            None | Some("*") => None,
            Some(c) => Some(
                c.parse()
                    .map_err(|_| format!("bad container {c:?} in fault {s:?}"))?,
            ),
        };
        let nth = match parts.next() {
            None => 0,
            Some(n) => n
                .parse()
                .map_err(|_| format!("bad call number {n:?} in fault {s:?}"))?,
        };
        let errno = match parts.next() {
            None => Errno::EIO,
            Some(e) => {
                errno_from_name(e).ok_or_else(|| format!("unknown errno {e:?} in fault {s:?}"))?
            }
        };
        if parts.next().is_some() {
            return Err(format!(
                "fault {s:?} has too many fields: OP[:CONTAINER[:NTH[:ERRNO]]]"
            ));
        }
        Ok(Fault {
            op,
            container,
            nth,
            errno,
        })
    }
}

fn errno_from_name(name: &str) -> Option<Errno> {
    [
        Errno::EIO,
        Errno::EINVAL,
        Errno::EFAULT,
        Errno::ENOMEM,
        Errno::EBUSY,
        Errno::ENOENT,
        Errno::EPERM,
        Errno::EEXIST,
    ]
    .into_iter()
    .find(|e| format!("{e:?}") == name)
}

/// Errors of the model's own bookkeeping (its state file, its faults).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A fault spec that does not parse.
    #[error("bad VFIO model fault: {0}")]
    BadFault(String),
    /// The state file could not be read.
    #[error("cannot read the VFIO model state {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a model state.
    #[error("the VFIO model state {path} is corrupt: {detail}; remove it to start a fresh model")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// Finds what the caller's `[vaddr, vaddr+size)` maps, or `None` if any of it is unmapped or it
/// spans more than one mapping.
pub type Resolver = dyn Fn(u64, u64) -> Option<Backing> + Send + Sync;

struct Inner {
    state: ModelState,
    mm: u64,
}

/// The modelled kernel; cheap to clone (shared state).
#[derive(Clone)]
pub struct ModelKernel {
    inner: Arc<Mutex<Inner>>,
    persist: Option<PathBuf>,
    resolver: Arc<Resolver>,
}

impl std::fmt::Debug for ModelKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelKernel")
            .field("persist", &self.persist)
            .finish()
    }
}

/// This program's mm, as the model tells callers apart: the kernel's 16 random bytes for it.
pub fn current_mm() -> u64 {
    // SAFETY: getauxval only reads the auxiliary vector; AT_RANDOM's value is the address of 16
    // bytes the kernel placed on the initial stack, valid for the life of the program.
    let ptr = unsafe { libc::getauxval(libc::AT_RANDOM) } as *const u8;
    if ptr.is_null() {
        return std::process::id() as u64;
    }
    let mut bytes = [0u8; 8];
    // SAFETY: `ptr` points at 16 readable bytes (see above); 8 are copied.
    unsafe { std::ptr::copy_nonoverlapping(ptr, bytes.as_mut_ptr(), 8) };
    u64::from_le_bytes(bytes)
}

/// Resolves an address range through `/proc/self/maps`.
pub fn resolve_in_self(vaddr: u64, size: u64) -> Option<Backing> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (range, _perms, offset, dev, inode) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        if vaddr < start || vaddr >= end {
            continue;
        }
        if vaddr.checked_add(size)? > end {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        return Some(Backing {
            dev: (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            ),
            inode: inode.parse().ok()?,
            offset: u64::from_str_radix(offset, 16).ok()? + (vaddr - start),
        });
    }
    None
}

impl ModelKernel {
    /// A fresh in-memory model whose caller is this process.
    pub fn new() -> ModelKernel {
        ModelKernel::with_state(ModelState::default(), None, Arc::new(resolve_in_self))
    }

    /// A model with the given state, persistence and resolver (tests use their own resolver).
    pub fn with_state(
        state: ModelState,
        persist: Option<PathBuf>,
        resolver: Arc<Resolver>,
    ) -> ModelKernel {
        ModelKernel {
            inner: Arc::new(Mutex::new(Inner {
                state,
                mm: current_mm(),
            })),
            persist,
            resolver,
        }
    }

    /// Opens the model whose state lives in `path` (a fresh one when the file does not exist).
    pub fn open(path: &Path) -> Result<ModelKernel, ModelError> {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ModelError::Corrupt {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModelState::default(),
            Err(source) => {
                return Err(ModelError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(ModelKernel::with_state(
            state,
            Some(path.to_path_buf()),
            Arc::new(resolve_in_self),
        ))
    }

    /// Reads the model state at `path` (for tests and tools inspecting it from outside).
    pub fn read_state(path: &Path) -> Result<ModelState, ModelError> {
        Ok(ModelKernel::open(path)?.state())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets whether the modelled kernel has `VFIO_UPDATE_VADDR` and `VFIO_UNMAP_ALL`.
    pub fn set_vaddr_support(&self, supported: bool) {
        let mut inner = self.lock();
        inner.state.update_vaddr = supported;
        inner.state.unmap_all = supported;
        self.persist(&inner.state);
    }

    /// Arms a failure.
    pub fn inject(&self, fault: &str) -> Result<(), String> {
        fault.parse::<Fault>()?;
        let mut inner = self.lock();
        inner.state.faults.push(ArmedFault {
            spec: fault.to_string(),
            seen: 0,
        });
        self.persist(&inner.state);
        Ok(())
    }

    /// Where a test drops faults for the model whose state is in `state_path`: one spec per line,
    /// armed at the next call (by whichever process makes it) and then removed.
    pub fn faults_file(state_path: &Path) -> PathBuf {
        state_path.with_extension("faults")
    }

    fn take_dropped_faults(&self, state: &mut ModelState) {
        let Some(path) = &self.persist else { return };
        let file = ModelKernel::faults_file(path);
        let Ok(text) = std::fs::read_to_string(&file) else {
            return;
        };
        let _ = std::fs::remove_file(&file);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            match line.parse::<Fault>() {
                Ok(_) => state.faults.push(ArmedFault {
                    spec: line.to_string(),
                    seen: 0,
                }),
                Err(e) => {
                    tracing::error!(fault = line, error = %e, "VFIO model: ignoring a bad fault")
                }
            }
        }
    }

    /// Pretends the caller is now the program with mm `mm` (tests simulating an `execve`).
    pub fn set_mm(&self, mm: u64) {
        self.lock().mm = mm;
    }

    /// A copy of the state.
    pub fn state(&self) -> ModelState {
        self.lock().state.clone()
    }

    /// Opens a new container and returns its handle (the model's `open("/dev/vfio/vfio")`).
    pub fn open_container(&self) -> ModelContainerHandle {
        let mut inner = self.lock();
        let id = inner
            .state
            .containers
            .keys()
            .next_back()
            .map_or(0, |k| k + 1);
        inner.state.containers.insert(id, ModelContainer::default());
        self.persist(&inner.state);
        ModelContainerHandle {
            kernel: self.clone(),
            id,
        }
    }

    /// Adopts container `id` (a container "fd" inherited across `execve`).
    pub fn adopt_container(&self, id: u32) -> Option<ModelContainerHandle> {
        self.lock()
            .state
            .containers
            .contains_key(&id)
            .then(|| ModelContainerHandle {
                kernel: self.clone(),
                id,
            })
    }

    /// What the device would reach at `iova` through container `id`: `None` if unmapped.
    pub fn device_view(&self, id: u32, iova: u64) -> Option<Backing> {
        let inner = self.lock();
        let dma = inner
            .state
            .containers
            .get(&id)?
            .dmas
            .iter()
            .find(|d| iova >= d.iova && iova - d.iova < d.size)?;
        Some(Backing {
            offset: dma.backing.offset + (iova - dma.iova),
            ..dma.backing
        })
    }

    fn persist(&self, state: &ModelState) {
        let Some(path) = &self.persist else { return };
        let tmp = path.with_extension("tmp");
        let written = serde_json::to_vec_pretty(state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot write the VFIO model state");
        }
    }

    /// Runs one call: an injected fault first, then `body` on the container's state; logs and
    /// persists the outcome.
    fn call<T>(
        &self,
        id: u32,
        op: ContainerOp,
        body: impl FnOnce(&mut ModelState, u64, &Resolver) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        let mut inner = self.lock();
        let mm = inner.mm;
        self.take_dropped_faults(&mut inner.state);
        let injected = inner.state.faults.iter_mut().find_map(|armed| {
            let fault: Fault = armed.spec.parse().ok()?;
            if fault.op != op || fault.container.is_some_and(|c| c != id) {
                return None;
            }
            armed.seen += 1;
            (armed.seen - 1 == fault.nth).then_some(fault.errno)
        });
        let result = match injected {
            Some(errno) => Err(errno),
            None if !inner.state.containers.contains_key(&id) => Err(Errno::EBADF),
            None => body(&mut inner.state, mm, &*self.resolver),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) if injected.is_some() => format!("{e:?} (injected)"),
            Err(e) => format!("{e:?}"),
        };
        inner
            .state
            .log
            .push(format!("container {id} {} {outcome}", op.name()));
        self.persist(&inner.state);
        result
    }
}

impl Default for ModelKernel {
    fn default() -> Self {
        ModelKernel::new()
    }
}

/// A container of the model, as an fd would name a kernel one.
#[derive(Debug, Clone)]
pub struct ModelContainerHandle {
    kernel: ModelKernel,
    id: u32,
}

impl ModelContainerHandle {
    /// The container's id (its index in the order containers were opened).
    pub fn id(&self) -> u32 {
        self.id
    }
}

fn container(state: &mut ModelState, id: u32) -> &mut ModelContainer {
    state
        .containers
        .get_mut(&id)
        .expect("checked by ModelKernel::call")
}

fn charge(state: &mut ModelState, mm: u64, bytes: u64, add: bool) {
    let entry = state.locked.entry(mm).or_default();
    *entry = if add {
        *entry + bytes
    } else {
        entry.saturating_sub(bytes)
    };
    if *entry == 0 {
        state.locked.remove(&mm);
    }
}

impl ContainerIoctls for ModelContainerHandle {
    fn check_extension(&self, extension: u32) -> Result<bool, Errno> {
        self.kernel
            .call(self.id, ContainerOp::CheckExtension, |s, _, _| {
                let iommu_set = container(s, self.id).iommu_set;
                Ok(match extension {
                    TYPE1V2 => true,
                    // Answered by the IOMMU driver, so a bare container says no.
                    VFIO_UPDATE_VADDR => iommu_set && s.update_vaddr,
                    VFIO_UNMAP_ALL => iommu_set && s.unmap_all,
                    _ => false,
                })
            })
    }

    fn attach_group(&self, group: u32, _group_fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
        self.kernel
            .call(self.id, ContainerOp::AttachGroup, |s, _, _| {
                if s.containers.values().any(|c| c.groups.contains(&group)) {
                    return Err(Errno::EBUSY);
                }
                let c = container(s, self.id);
                // vfio_iommu_type1_attach_group: "if (iommu->vaddr_invalid_count) goto out_unlock" (EBUSY).
                if c.invalid_count() > 0 {
                    return Err(Errno::EBUSY);
                }
                c.groups.push(group);
                Ok(())
            })
    }

    fn set_iommu(&self) -> Result<(), Errno> {
        self.kernel.call(self.id, ContainerOp::SetIommu, |s, _, _| {
            let c = container(s, self.id);
            if c.groups.is_empty() {
                return Err(Errno::EINVAL);
            }
            if c.iommu_set {
                return Err(Errno::EBUSY);
            }
            c.iommu_set = true;
            Ok(())
        })
    }

    fn map_dma(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno> {
        self.kernel
            .call(self.id, ContainerOp::MapDma, |s, mm, resolve| {
                let c = container(s, self.id);
                if !c.iommu_set {
                    return Err(Errno::EINVAL);
                }
                if size == 0
                    || !(iova | size | vaddr).is_multiple_of(PAGE)
                    || iova.checked_add(size).is_none()
                {
                    return Err(Errno::EINVAL);
                }
                if c.dmas
                    .iter()
                    .any(|d| iova < d.iova + d.size && d.iova < iova + size)
                {
                    return Err(Errno::EEXIST);
                }
                let backing = resolve(vaddr, size).ok_or(Errno::EFAULT)?;
                let at = c.dmas.partition_point(|d| d.iova < iova);
                c.dmas.insert(
                    at,
                    ModelDma {
                        iova,
                        size,
                        vaddr: Some(vaddr),
                        mm,
                        backing,
                    },
                );
                charge(s, mm, size, true);
                Ok(())
            })
    }

    fn unmap_dma(&self, iova: u64, size: u64) -> Result<u64, Errno> {
        self.kernel.call(self.id, ContainerOp::UnmapDma, |s, _, _| {
            let c = container(s, self.id);
            if size == 0 || !(iova | size).is_multiple_of(PAGE) {
                return Err(Errno::EINVAL);
            }
            let end = iova.checked_add(size).ok_or(Errno::EINVAL)?;
            // type1v2 cannot split a mapping: a range cutting one fails.
            if c.dmas.iter().any(|d| {
                let overlaps = d.iova < end && iova < d.iova + d.size;
                overlaps && (d.iova < iova || d.iova + d.size > end)
            }) {
                return Err(Errno::EINVAL);
            }
            let (gone, kept): (Vec<_>, Vec<_>) = c
                .dmas
                .drain(..)
                .partition(|d| d.iova >= iova && d.iova + d.size <= end);
            c.dmas = kept;
            let mut unmapped = 0;
            for d in gone {
                unmapped += d.size;
                charge(s, d.mm, d.size, false);
            }
            Ok(unmapped)
        })
    }

    fn invalidate_all_vaddr(&self) -> Result<(), Errno> {
        self.kernel
            .call(self.id, ContainerOp::InvalidateVaddr, |s, _, _| {
                if !s.unmap_all || !s.update_vaddr {
                    return Err(Errno::EINVAL);
                }
                invalidate_range(container(s, self.id), 0, u64::MAX)
            })
    }

    fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), Errno> {
        self.kernel
            .call(self.id, ContainerOp::InvalidateVaddr, |s, _, _| {
                if !s.update_vaddr || size == 0 || !(iova | size).is_multiple_of(PAGE) {
                    return Err(Errno::EINVAL);
                }
                invalidate_range(
                    container(s, self.id),
                    iova,
                    iova.checked_add(size).ok_or(Errno::EINVAL)?,
                )
            })
    }

    fn update_vaddr(&self, iova: u64, size: u64, vaddr: u64) -> Result<(), Errno> {
        self.kernel.call(self.id, ContainerOp::UpdateVaddr, |s, mm, resolve| {
            if !s.update_vaddr || !vaddr.is_multiple_of(PAGE) {
                return Err(Errno::EINVAL);
            }
            let c = container(s, self.id);
            let dma = c.dmas.iter_mut().find(|d| d.iova == iova).ok_or(Errno::ENOENT)?;
            if dma.vaddr.is_some() || dma.size != size {
                return Err(Errno::EINVAL);
            }
            let now = resolve(vaddr, size);
            let violation = (now != Some(dma.backing)).then(|| {
                format!(
                    "container {} iova {iova:#x}: new vaddr {vaddr:#x} maps {now:?}, the mapping pins {:?}",
                    self.id, dma.backing
                )
            });
            let old_mm = std::mem::replace(&mut dma.mm, mm);
            dma.vaddr = Some(vaddr);
            // vfio_change_dma_owner: the locked-memory charge follows the new mm.
            if old_mm != mm {
                charge(s, old_mm, size, false);
                charge(s, mm, size, true);
            }
            s.violations.extend(violation);
            Ok(())
        })
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Unmap-vaddr over `[start, end)`: every mapping inside becomes invalid; one that already is makes
/// the call fail and undo what it did (vfio_dma_do_unmap's `unwind`).
fn invalidate_range(c: &mut ModelContainer, start: u64, end: u64) -> Result<(), Errno> {
    let mut done = Vec::new();
    for (i, d) in c.dmas.iter_mut().enumerate() {
        if d.iova < start || d.iova + d.size > end {
            continue;
        }
        match d.vaddr.take() {
            Some(v) => done.push((i, v)),
            None => {
                for (j, v) in done {
                    c.dmas[j].vaddr = Some(v);
                }
                return Err(Errno::EINVAL);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
