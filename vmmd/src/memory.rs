//! Guest RAM: always shared and fd-backed (an anonymous memfd or a file, e.g. on /dev/shm or hugetlbfs),
//! laid out with the usual hole below 4 GiB, and mapped through vm-memory.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Name of the memfd that backs guest RAM (visible in /proc/PID/maps as `/memfd:vmmd-guest-ram`).
pub const RAM_MEMFD_NAME: &str = "vmmd-guest-ram";
/// Start of the MMIO hole below 4 GiB (LAPIC, IOAPIC and friends live above it).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// First address above the hole.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// Smallest guest this VMM runs.
pub const MIN_RAM: u64 = 16 << 20;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The `--memory` argument does not parse.
    #[error("invalid --memory {arg:?}: {detail}; use size=SIZE[,path=FILE], e.g. size=1G,path=/dev/shm/vm1.ram")]
    BadSpec {
        /// The argument.
        arg: String,
        /// What is wrong.
        detail: String,
    },
    /// The size is unusable.
    #[error(
        "guest RAM size {0} bytes is invalid: it must be a multiple of 2 MiB and at least 16 MiB"
    )]
    BadSize(u64),
    /// memfd_create failed.
    #[error("cannot create the guest RAM memfd")]
    Memfd(#[source] nix::Error),
    /// Opening the backing file failed.
    #[error("cannot open guest RAM file {path}: check the path and permissions")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Sizing the backing fd failed.
    #[error("cannot size guest RAM backing {what} to {size} bytes (is there enough space on its file system?)")]
    Resize {
        /// memfd or the file path.
        what: String,
        /// Wanted size.
        size: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap failed.
    #[error("cannot map guest RAM region at {gpa:#x} ({size} bytes)")]
    Map {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The inherited RAM fd does not have the configured size.
    #[error("existing guest RAM {what} is {found} bytes but --memory says {expected}: give this vmmd the --memory size the guest was saved with (the RAM was left untouched)")]
    InheritedSize {
        /// The RAM file, or the inherited memfd.
        what: String,
        /// Size of the inherited fd.
        found: u64,
        /// Configured size.
        expected: u64,
    },
    /// Regions overlap or are otherwise inconsistent.
    #[error("cannot assemble guest RAM regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// `--memory size=SIZE[,path=FILE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySpec {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Backing file; `None` for an anonymous memfd.
    pub path: Option<PathBuf>,
}

impl FromStr for MemorySpec {
    type Err = MemoryError;
    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        let bad = |detail: String| MemoryError::BadSpec {
            arg: arg.to_string(),
            detail,
        };
        let mut size = None;
        let mut path = None;
        for part in arg.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("size", v)) => {
                    size = Some(cpr_common::parse_size(v).map_err(|e| bad(e.to_string()))?)
                }
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                _ => return Err(bad(format!("unknown option {part:?}"))),
            }
        }
        let size = size.ok_or_else(|| bad("size= is missing".into()))?;
        if size < MIN_RAM || !size.is_multiple_of(2 << 20) {
            return Err(MemoryError::BadSize(size));
        }
        Ok(MemorySpec { size, path })
    }
}

impl std::fmt::Display for MemorySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "size={}", self.size)?;
        if let Some(p) = &self.path {
            write!(f, ",path={}", p.display())?;
        }
        Ok(())
    }
}

/// One contiguous piece of guest RAM: where it is for the guest and where it is in the backing fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RamRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the backing fd.
    pub fd_offset: u64,
}

/// The guest-physical layout of `size` bytes of RAM: one region, or two around the hole below 4 GiB.
pub fn layout(size: u64) -> Vec<RamRegion> {
    if size <= MMIO_HOLE_START {
        return vec![RamRegion {
            gpa: 0,
            size,
            fd_offset: 0,
        }];
    }
    vec![
        RamRegion {
            gpa: 0,
            size: MMIO_HOLE_START,
            fd_offset: 0,
        },
        RamRegion {
            gpa: HIGH_RAM_START,
            size: size - MMIO_HOLE_START,
            fd_offset: MMIO_HOLE_START,
        },
    ]
}

/// Guest RAM: the backing fd and its shared mappings.
pub struct GuestRam {
    file: File,
    path: Option<PathBuf>,
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap,
    preexisting: bool,
    created: bool,
}

impl GuestRam {
    /// Creates the backing fd and maps it. With `keep_existing` (an incoming VM), an existing RAM file
    /// of another size is refused rather than resized: it may be some guest's RAM.
    pub fn create(spec: &MemorySpec, keep_existing: bool) -> Result<GuestRam, MemoryError> {
        let existed = spec.path.as_ref().is_some_and(|p| p.exists());
        let (file, what) = match &spec.path {
            None => (create_memfd()?, "memfd".to_string()),
            Some(path) => (open_backing_file(path)?, path.display().to_string()),
        };
        let current = backing_len(&file, &what, spec.size)?;
        if keep_existing && spec.path.is_some() && current != 0 && current != spec.size {
            return Err(MemoryError::InheritedSize {
                what,
                found: current,
                expected: spec.size,
            });
        }
        if current != spec.size {
            if spec.path.is_some() && current != 0 {
                tracing::warn!(
                    path = %what,
                    found = current,
                    size = spec.size,
                    "guest RAM file has another size; resizing it (its contents are not this guest's)"
                );
            }
            file.set_len(spec.size)
                .map_err(|source| MemoryError::Resize {
                    what,
                    size: spec.size,
                    source,
                })?;
        }
        let mut ram = Self::map(file, spec.path.clone(), spec.size)?;
        ram.preexisting = spec.path.is_some() && current == spec.size;
        ram.created = spec.path.is_some() && !existed;
        Ok(ram)
    }

    /// Removes a RAM file this process created itself (it holds no guest's RAM), e.g. when a
    /// cpr-reboot load finds the guest's RAM file missing: the path is left as it was found.
    pub fn remove_if_created(&mut self) {
        if let (true, Some(path)) = (self.created, &self.path) {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed the RAM file this vmmd created")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the RAM file this vmmd created")
                }
            }
            self.created = false;
        }
    }

    /// Whether the RAM file already existed with exactly this size (so it may hold a guest's RAM, as
    /// after a cpr-reboot). Always false for a memfd.
    pub fn preexisting(&self) -> bool {
        self.preexisting
    }

    /// Drops this process's page-table entries for guest RAM without touching its contents (they stay
    /// in the shared memfd or file; the next access, by the guest or us, maps them again). Done before
    /// a cpr-exec pause, so that `execve` does not tear down millions of PTEs while the guest waits.
    /// It goes in `chunk`-sized steps with a short rest between them: each step makes KVM zap the
    /// guest's mappings of that range under its MMU lock, and one step over all of RAM would stall a
    /// running guest for as long as the whole zap takes (~100 ms per GiB here).
    pub fn drop_host_mappings(
        &self,
        chunk: usize,
        rest: std::time::Duration,
    ) -> std::io::Result<()> {
        // MADV_DONTNEED on a shared mapping only unmaps pages (KVM's MMU notifier zaps the guest's
        // view too); no data is lost.
        advise_in_chunks(&self.host_ranges(), libc::MADV_DONTNEED, chunk, rest)
    }

    /// Maps all of guest RAM into this process's page tables ahead of the guest's accesses
    /// (`MADV_POPULATE_WRITE`, Linux 5.14+) on a background thread, in `chunk`-sized steps with
    /// `rest` between them. After a cpr-exec or a cpr-reboot load the RAM is a fresh mapping of pages
    /// that already exist: every first guest access to a page would otherwise fault in the host,
    /// then in KVM, which is most of the brownout after the resume.
    ///
    /// Only pages the backing file already holds are mapped: a hole (guest RAM never written) stays
    /// a hole instead of being allocated.
    pub fn populate_in_background(
        &self,
        chunk: usize,
        rest: std::time::Duration,
    ) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
        let ranges = resident_runs(&self.host_ranges())?;
        std::thread::Builder::new()
            .name("vmmd-populate".into())
            .spawn(move || {
                let t = std::time::Instant::now();
                let r = advise_in_chunks(&ranges, libc::MADV_POPULATE_WRITE, chunk, rest);
                match &r {
                    Ok(()) => tracing::debug!(
                        took_ms = t.elapsed().as_millis() as u64,
                        "guest RAM populated"
                    ),
                    Err(e) => {
                        tracing::info!(error = %e, "guest RAM not populated ahead of the guest")
                    }
                }
                r
            })
    }

    /// (address, length) of every host mapping of guest RAM.
    fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.host_slices()
            .into_iter()
            .map(|(_, host, len)| (host as usize, len))
            .collect()
    }

    /// Flushes a file-backed guest RAM to its file (before a host reboot).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }

    /// Maps guest RAM inherited across `execve` (the fd of the previous process's [`GuestRam`]).
    pub fn inherited(fd: std::os::fd::OwnedFd, spec: &MemorySpec) -> Result<GuestRam, MemoryError> {
        let file = File::from(fd);
        let what = spec
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| RAM_MEMFD_NAME.to_string());
        let size = backing_len(&file, &what, spec.size)?;
        if size != spec.size {
            return Err(MemoryError::InheritedSize {
                what,
                found: size,
                expected: spec.size,
            });
        }
        let mut ram = Self::map(file, spec.path.clone(), size)?;
        ram.preexisting = true;
        Ok(ram)
    }

    /// Maps an existing backing fd of `size` bytes.
    pub fn map(file: File, path: Option<PathBuf>, size: u64) -> Result<GuestRam, MemoryError> {
        let regions = layout(size);
        let mut mapped = Vec::with_capacity(regions.len());
        for r in &regions {
            let map_err = |source| MemoryError::Map {
                gpa: r.gpa,
                size: r.size,
                source,
            };
            let fd = file.try_clone().map_err(|source| MemoryError::OpenFile {
                path: path.clone().unwrap_or_else(|| RAM_MEMFD_NAME.into()),
                source,
            })?;
            let mmap = MmapRegion::<()>::build(
                Some(FileOffset::new(fd, r.fd_offset)),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(map_err)?;
            let region =
                GuestRegionMmap::new(mmap, GuestAddress(r.gpa)).ok_or(MemoryError::Map {
                    gpa: r.gpa,
                    size: r.size,
                    source: vm_memory::mmap::MmapRegionError::InvalidPointer,
                })?;
            mapped.push(region);
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(MemoryError::Regions)?;
        Ok(GuestRam {
            file,
            path,
            regions,
            memory,
            preexisting: false,
            created: false,
        })
    }

    /// The vm-memory view used for loading and device access.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The guest-physical layout.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The backing file, when RAM is file-backed.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The backing fd (for the CPR fd table).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Host address and length of each region, in the order of [`GuestRam::regions`].
    pub fn host_slices(&self) -> Vec<(u64, *mut u8, usize)> {
        self.memory
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr(), r.len() as usize))
            .collect()
    }
}

/// The current length of a RAM backing fd (`what` names it in the error).
fn backing_len(file: &File, what: &str, size: u64) -> Result<u64, MemoryError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|source| MemoryError::Resize {
            what: what.to_string(),
            size,
            source,
        })
}

fn create_memfd() -> Result<File, MemoryError> {
    let fd = memfd_create(RAM_MEMFD_NAME, MFdFlags::MFD_CLOEXEC).map_err(MemoryError::Memfd)?;
    Ok(File::from(fd))
}

fn open_backing_file(path: &Path) -> Result<File, MemoryError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_path_buf(),
            source,
        })
}

/// madvise(`advice`) over `ranges` (host mappings of guest RAM), `chunk` bytes at a time with
/// `rest` between steps. An error stops it (e.g. EINVAL from a kernel without the advice, ENOMEM
/// once the mapping is gone at exit).
/// The runs of pages of `ranges` whose backing pages exist (`mincore`: for a shared file mapping it
/// reports the file's page cache, mapped here or not).
fn resident_runs(ranges: &[(usize, usize)]) -> std::io::Result<Vec<(usize, usize)>> {
    const PAGE: usize = 4096;
    let mut runs = Vec::new();
    for &(host, len) in ranges {
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: `host..host+len` is a live mapping of guest RAM and `vec` has one byte per page.
        if unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut start: Option<usize> = None;
        for (i, b) in vec.iter().chain(std::iter::once(&0)).enumerate() {
            match (b & 1 == 1, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    runs.push((host + s * PAGE, ((i - s) * PAGE).min(len - s * PAGE)));
                    start = None;
                }
                _ => {}
            }
        }
    }
    Ok(runs)
}

fn advise_in_chunks(
    ranges: &[(usize, usize)],
    advice: libc::c_int,
    chunk: usize,
    rest: std::time::Duration,
) -> std::io::Result<()> {
    let chunk = chunk.max(1 << 21);
    for &(host, len) in ranges {
        let mut off = 0;
        while off < len {
            let n = chunk.min(len - off);
            // SAFETY: madvise neither reads nor writes the range from here, and both advices used
            // (DONTNEED on a shared mapping, POPULATE_WRITE) keep its contents; on an address that
            // is no longer mapped it fails with ENOMEM.
            let rc = unsafe { libc::madvise((host + off) as *mut libc::c_void, n, advice) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            off += n;
            if off < len && !rest.is_zero() {
                std::thread::sleep(rest);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn parses_specs() {
        let s: MemorySpec = "size=1G,path=/dev/shm/vm1.ram".parse().expect("parse");
        assert_eq!(s.size, 1 << 30);
        assert_eq!(s.path.as_deref(), Some(Path::new("/dev/shm/vm1.ram")));
        assert_eq!(s.to_string().parse::<MemorySpec>().expect("round trip"), s);
        assert!("path=/x".parse::<MemorySpec>().is_err());
        assert!("size=1M".parse::<MemorySpec>().is_err());
        assert!("size=65M".parse::<MemorySpec>().is_err());
        assert!("size=64M,huge=1".parse::<MemorySpec>().is_err());
    }

    #[test]
    fn hole_below_4g() {
        assert_eq!(layout(256 << 20).len(), 1);
        assert_eq!(layout(3 << 30).len(), 1);
        let l = layout(5 << 30);
        assert_eq!(l[1].gpa, 4 << 30);
        assert_eq!(l[1].size, 2 << 30);
        assert_eq!(l[1].fd_offset, 3 << 30);
    }

    #[test]
    fn dropping_host_mappings_keeps_contents() {
        let ram = GuestRam::create(&"size=16M".parse().expect("spec"), false).expect("create");
        ram.memory()
            .write_obj(0xfeed_u64, GuestAddress(0x20_0000))
            .expect("write");
        ram.drop_host_mappings(4 << 20, std::time::Duration::ZERO)
            .expect("madvise");
        let v: u64 = ram
            .memory()
            .read_obj(GuestAddress(0x20_0000))
            .expect("read");
        assert_eq!(v, 0xfeed);
    }

    #[test]
    fn memfd_is_shared() {
        let ram = GuestRam::create(&"size=16M".parse().expect("spec"), false).expect("create");
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress(0x1000))
            .expect("write");
        // A second mapping of the same fd sees the write: RAM is shared, not private.
        let again =
            GuestRam::map(ram.file.try_clone().expect("dup"), None, ram.size()).expect("map");
        let v: u32 = again.memory().read_obj(GuestAddress(0x1000)).expect("read");
        assert_eq!(v, 0x1234_5678);
    }

    #[test]
    fn population_maps_written_pages_and_leaves_holes() {
        let ram = GuestRam::create(&"size=16M".parse().expect("spec"), false).expect("create");
        for gpa in [0x3000u64, 0x4000, 0x5000, 0x20_0000] {
            ram.memory()
                .write_obj(1u8, GuestAddress(gpa))
                .expect("write");
        }
        let blocks = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().expect("stat").blocks()
        };
        let before = blocks(&ram.file);
        // A fresh mapping of the same pages, as a cpr-exec successor has.
        let again =
            GuestRam::map(ram.file.try_clone().expect("dup"), None, ram.size()).expect("map");
        let host = again.host_ranges()[0].0;
        let runs = resident_runs(&again.host_ranges()).expect("mincore");
        assert_eq!(
            runs,
            vec![(host + 0x3000, 0x3000), (host + 0x20_0000, 0x1000)]
        );
        again
            .populate_in_background(4 << 20, std::time::Duration::ZERO)
            .expect("thread")
            .join()
            .expect("join")
            .expect("madvise");
        assert_eq!(blocks(&ram.file), before, "holes were allocated");
    }
}
