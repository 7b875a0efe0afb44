//! The state-file format: a fixed header (magic, format version, lengths, CRC32C checksums), the
//! serialized VM state ("meta"), then optionally the raw guest RAM.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VMMDSTAT"
//!      8     4  format version (LE)
//!     12     4  header length (64)
//!     16     4  flags (bit 0: RAM follows the meta)
//!     20     4  CRC32C of the meta bytes
//!     24     8  meta length
//!     32     8  RAM length
//!     40     4  CRC32C of the RAM bytes
//!     44    16  reserved, zero
//!     60     4  CRC32C of bytes 0..60
//! ```
//!
//! Everything is checked before a caller gets the meta: a truncated, corrupt or newer-version file is
//! refused with a [`StateFileError`] that says what to do, before any guest state is touched. The RAM
//! checksum is checked while the RAM is streamed ([`StateReader::read_ram`] then [`StateReader::finish`]).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// First bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"VMMDSTAT";
/// The format version this build writes.
///
/// - 1: a flat VM state (vCPUs, KVM VM, UART, PM); the console's undelivered bytes and the VFIO
///   devices' MSI programming travelled in the CPR hand-over.
/// - 2: the VM state composed of its devices' saved states (`{vm, vcpus, devices}`), console bytes
///   and MSI programming included.
pub const STATE_FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const STATE_FORMAT_MIN_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Largest meta section accepted (vCPU, VM and device state are a few hundred KiB at most).
pub const MAX_META_LEN: u64 = 64 << 20;

const FLAG_HAS_RAM: u32 = 1;

/// Whether this build can read state files of `version`.
pub fn can_read_version(version: u32) -> bool {
    (STATE_FORMAT_MIN_VERSION..=STATE_FORMAT_VERSION).contains(&version)
}

/// A meta section readable from every format version this build accepts: the decoder of an older
/// version migrates it to today's layout, so callers only ever see the current structure.
pub trait VersionedMeta: Sized {
    /// Decodes the meta of a file written with format `version` (already checked to be in
    /// `STATE_FORMAT_MIN_VERSION..=STATE_FORMAT_VERSION`). Returns the value and the bytes left over.
    fn decode_version(version: u32, bytes: &[u8]) -> Result<(Self, &[u8]), postcard::Error>;
}

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Opening, reading or writing the file failed.
    #[error("state file {path}: {op} failed")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the magic.
    #[error("{path} is not a vmmd state file (bad magic): check the path")]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Written by a newer vmmd.
    #[error("state file {path} has format version {found}, newer than this vmmd reads (up to {supported}): load it with a newer vmmd")]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Highest version this build reads.
        supported: u32,
    },
    /// Written by a vmmd too old for this one.
    #[error("state file {path} has format version {found}, older than this vmmd reads (from {oldest}): load it with an older vmmd")]
    OlderVersion {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Lowest version this build reads.
        oldest: u32,
    },
    /// Shorter than its header says.
    #[error("state file {path} is truncated: {actual} bytes, its header says {expected}; the save did not complete, use another file")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Length the header promises.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
    /// Longer than its header says.
    #[error("state file {path} has {extra} unexpected bytes after its end: the file is damaged, use another one")]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// Bytes beyond the end.
        extra: u64,
    },
    /// A checksum does not match.
    #[error("state file {path} is corrupt: the {part} checksum does not match (expected {expected:#010x}, got {actual:#010x}); use another file")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// header, meta or RAM.
        part: &'static str,
        /// Checksum stored in the file.
        expected: u32,
        /// Checksum computed.
        actual: u32,
    },
    /// The header is self-consistent but describes something impossible.
    #[error("state file {path} has an invalid header: {detail}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The RAM section size differs from what the caller expects.
    #[error("state file {path} holds {found} bytes of guest RAM but this VM has {expected}: start vmmd with the same --memory size as the saved VM")]
    RamSizeMismatch {
        /// The file.
        path: PathBuf,
        /// RAM bytes in the file.
        found: u64,
        /// RAM bytes the VM has.
        expected: u64,
    },
    /// The meta section does not decode.
    #[error("state file {path} has a meta section that does not decode: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// The meta section does not encode.
    #[error("cannot encode VM state: {0}")]
    Encode(#[source] postcard::Error),
}

/// The decoded fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateHeader {
    /// Format version.
    pub version: u32,
    /// Whether RAM follows the meta.
    pub has_ram: bool,
    /// Meta length in bytes.
    pub meta_len: u64,
    /// CRC32C of the meta.
    pub meta_crc: u32,
    /// RAM length in bytes.
    pub ram_len: u64,
    /// CRC32C of the RAM.
    pub ram_crc: u32,
}

impl StateHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&STATE_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        let flags = if self.has_ram { FLAG_HAS_RAM } else { 0 };
        b[16..20].copy_from_slice(&flags.to_le_bytes());
        b[20..24].copy_from_slice(&self.meta_crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.meta_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.ram_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.ram_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header; `path` only names the file in errors.
    pub fn decode(b: &[u8], path: &Path) -> Result<StateHeader, StateFileError> {
        let path_buf = || path.to_path_buf();
        if b.len() < 12 || b[0..8] != STATE_MAGIC {
            if b.len() < STATE_MAGIC.len() && STATE_MAGIC.starts_with(b) {
                return Err(StateFileError::Truncated {
                    path: path_buf(),
                    expected: HEADER_LEN as u64,
                    actual: b.len() as u64,
                });
            }
            return Err(StateFileError::BadMagic { path: path_buf() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let version = u32_at(8);
        // The version is checked before the checksum so that a newer file gets the helpful message even
        // if a newer format changed the header's layout.
        if version > STATE_FORMAT_VERSION {
            return Err(StateFileError::NewerVersion {
                path: path_buf(),
                found: version,
                supported: STATE_FORMAT_VERSION,
            });
        }
        if version < STATE_FORMAT_MIN_VERSION {
            return Err(StateFileError::OlderVersion {
                path: path_buf(),
                found: version,
                oldest: STATE_FORMAT_MIN_VERSION,
            });
        }
        if b.len() < HEADER_LEN {
            return Err(StateFileError::Truncated {
                path: path_buf(),
                expected: HEADER_LEN as u64,
                actual: b.len() as u64,
            });
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let stored = u32_at(60);
        let actual = crc32c::crc32c(&b[..60]);
        if stored != actual {
            return Err(StateFileError::Corrupt {
                path: path_buf(),
                part: "header",
                expected: stored,
                actual,
            });
        }
        let bad = |detail: String| StateFileError::BadHeader {
            path: path_buf(),
            detail,
        };
        if u32_at(12) as usize != HEADER_LEN {
            return Err(bad(format!(
                "header length {} (expected {HEADER_LEN})",
                u32_at(12)
            )));
        }
        let flags = u32_at(16);
        if flags & !FLAG_HAS_RAM != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let header = StateHeader {
            version,
            has_ram: flags & FLAG_HAS_RAM != 0,
            meta_crc: u32_at(20),
            meta_len: u64_at(24),
            ram_len: u64_at(32),
            ram_crc: u32_at(40),
        };
        if header.meta_len > MAX_META_LEN {
            return Err(bad(format!(
                "meta length {} exceeds {MAX_META_LEN}",
                header.meta_len
            )));
        }
        if !header.has_ram && header.ram_len != 0 {
            return Err(bad("RAM length without the RAM flag".into()));
        }
        Ok(header)
    }

    /// Total file length this header describes.
    pub fn file_len(&self) -> Option<u64> {
        (HEADER_LEN as u64)
            .checked_add(self.meta_len)?
            .checked_add(self.ram_len)
    }
}

/// Serializes a state structure into meta bytes.
pub fn encode_meta<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StateFileError> {
    postcard::to_allocvec(value).map_err(StateFileError::Encode)
}

/// Parses a complete in-memory state file (header + meta, RAM section skipped but length-checked) and
/// decodes the meta. This is what the fuzz target drives.
pub fn parse_state_bytes<T: VersionedMeta>(
    bytes: &[u8],
) -> Result<(StateHeader, T), StateFileError> {
    let path = Path::new("<memory>");
    let header = StateHeader::decode(&bytes[..bytes.len().min(HEADER_LEN)], path)?;
    check_len(&header, bytes.len() as u64, path)?;
    let meta = &bytes[HEADER_LEN..HEADER_LEN + header.meta_len as usize];
    let meta = check_meta(&header, meta, path)?;
    Ok((header, meta))
}

fn check_len(header: &StateHeader, actual: u64, path: &Path) -> Result<(), StateFileError> {
    let expected = header.file_len().ok_or_else(|| StateFileError::BadHeader {
        path: path.to_path_buf(),
        detail: "lengths overflow".into(),
    })?;
    if actual < expected {
        return Err(StateFileError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(StateFileError::TrailingData {
            path: path.to_path_buf(),
            extra: actual - expected,
        });
    }
    Ok(())
}

fn check_meta<T: VersionedMeta>(
    header: &StateHeader,
    meta: &[u8],
    path: &Path,
) -> Result<T, StateFileError> {
    let actual = crc32c::crc32c(meta);
    if actual != header.meta_crc {
        return Err(StateFileError::Corrupt {
            path: path.to_path_buf(),
            part: "meta",
            expected: header.meta_crc,
            actual,
        });
    }
    let (value, rest) =
        T::decode_version(header.version, meta).map_err(|source| StateFileError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    if !rest.is_empty() {
        return Err(StateFileError::BadHeader {
            path: path.to_path_buf(),
            detail: format!("{} bytes left over after the meta section", rest.len()),
        });
    }
    Ok(value)
}

/// A whole state file without RAM, header and meta, as format `version` writes it (this build writes
/// [`STATE_FORMAT_VERSION`]; tests build files of older versions with it).
pub fn state_bytes_without_ram(version: u32, meta: &[u8]) -> Vec<u8> {
    let header = StateHeader {
        version,
        has_ram: false,
        meta_len: meta.len() as u64,
        meta_crc: crc32c::crc32c(meta),
        ram_len: 0,
        ram_crc: 0,
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + meta.len());
    bytes.extend_from_slice(&header.encode());
    bytes.extend_from_slice(meta);
    bytes
}

/// Writes a state file without RAM (cpr-exec, cpr-reboot) in one `write` call: header and meta are
/// small, and every extra system call on the state file sits inside the guest's pause. `sync` adds an
/// fsync (needed when the file must survive a host reboot).
pub fn write_state_without_ram(
    path: &Path,
    meta: &[u8],
    sync: bool,
) -> Result<u64, StateFileError> {
    let io_err = |op, source| StateFileError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let bytes = state_bytes_without_ram(STATE_FORMAT_VERSION, meta);
    // Overwrite in place: truncating an existing file first costs more (on ext4 here) than the write.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err("create", e))?;
    file.write_all(&bytes).map_err(|e| io_err("write", e))?;
    let old_len = file.metadata().map_err(|e| io_err("stat", e))?.len();
    if old_len != bytes.len() as u64 {
        file.set_len(bytes.len() as u64)
            .map_err(|e| io_err("truncate", e))?;
    }
    if sync {
        file.sync_all().map_err(|e| io_err("fsync", e))?;
    }
    Ok(bytes.len() as u64)
}

/// Writes a state file: header placeholder, meta, RAM chunks, then the final header and an fsync.
pub struct StateWriter {
    file: File,
    path: PathBuf,
    header: StateHeader,
    ram_crc: u32,
    ram_written: u64,
}

impl StateWriter {
    /// Creates (or truncates) `path` and writes the meta. `ram_len` is the RAM that will follow (0 for none).
    pub fn create(path: &Path, meta: &[u8], ram_len: u64) -> Result<StateWriter, StateFileError> {
        let io_err = |op, source| StateFileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let mut file = File::create(path).map_err(|e| io_err("create", e))?;
        let header = StateHeader {
            version: STATE_FORMAT_VERSION,
            has_ram: ram_len > 0,
            meta_len: meta.len() as u64,
            meta_crc: crc32c::crc32c(meta),
            ram_len,
            ram_crc: 0,
        };
        // A zeroed header until finish(): a crash mid-save leaves a file that is refused (bad magic).
        file.write_all(&[0u8; HEADER_LEN])
            .and_then(|_| file.write_all(meta))
            .map_err(|e| io_err("write", e))?;
        Ok(StateWriter {
            file,
            path: path.to_path_buf(),
            header,
            ram_crc: 0,
            ram_written: 0,
        })
    }

    /// Appends RAM bytes.
    pub fn write_ram(&mut self, chunk: &[u8]) -> Result<(), StateFileError> {
        self.file
            .write_all(chunk)
            .map_err(|source| StateFileError::Io {
                path: self.path.clone(),
                op: "write",
                source,
            })?;
        self.ram_crc = crc32c::crc32c_append(self.ram_crc, chunk);
        self.ram_written += chunk.len() as u64;
        Ok(())
    }

    /// Writes the final header and syncs the file to disk. Returns the file's length.
    pub fn finish(mut self) -> Result<u64, StateFileError> {
        if self.ram_written != self.header.ram_len {
            return Err(StateFileError::BadHeader {
                path: self.path,
                detail: format!(
                    "wrote {} RAM bytes, announced {}",
                    self.ram_written, self.header.ram_len
                ),
            });
        }
        self.header.ram_crc = self.ram_crc;
        let bytes = self.header.encode();
        let path = self.path.clone();
        let io_err = |op, source| StateFileError::Io {
            path: path.clone(),
            op,
            source,
        };
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(&bytes))
            .map_err(|e| io_err("write header", e))?;
        self.file.sync_all().map_err(|e| io_err("fsync", e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                // Best effort: makes the new directory entry durable too.
                let _ = d.sync_all();
            }
        }
        Ok(self.header.file_len().unwrap_or(0))
    }
}

/// Reads a state file: everything but the RAM is checked by [`StateReader::open`].
pub struct StateReader {
    file: File,
    path: PathBuf,
    header: StateHeader,
    ram_crc: u32,
    ram_read: u64,
}

impl StateReader {
    /// Opens `path`, checks header, length and meta checksum, and decodes the meta.
    pub fn open<T: VersionedMeta>(path: &Path) -> Result<(StateReader, T), StateFileError> {
        let io_err = |op, source| StateFileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let mut file = File::open(path).map_err(|e| io_err("open", e))?;
        let actual_len = file.metadata().map_err(|e| io_err("stat", e))?.len();
        let mut head = vec![0u8; HEADER_LEN.min(actual_len as usize)];
        file.read_exact(&mut head).map_err(|e| io_err("read", e))?;
        let header = StateHeader::decode(&head, path)?;
        check_len(&header, actual_len, path)?;
        let mut meta = vec![0u8; header.meta_len as usize];
        file.read_exact(&mut meta).map_err(|e| io_err("read", e))?;
        let value = check_meta(&header, &meta, path)?;
        Ok((
            StateReader {
                file,
                path: path.to_path_buf(),
                header,
                ram_crc: 0,
                ram_read: 0,
            },
            value,
        ))
    }

    /// The checked header.
    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// Checks that the file holds exactly `expected` RAM bytes.
    pub fn expect_ram_len(&self, expected: u64) -> Result<(), StateFileError> {
        if self.header.ram_len != expected {
            return Err(StateFileError::RamSizeMismatch {
                path: self.path.clone(),
                found: self.header.ram_len,
                expected,
            });
        }
        Ok(())
    }

    /// Fills `buf` with the next RAM bytes.
    pub fn read_ram(&mut self, buf: &mut [u8]) -> Result<(), StateFileError> {
        self.file
            .read_exact(buf)
            .map_err(|source| StateFileError::Io {
                path: self.path.clone(),
                op: "read",
                source,
            })?;
        self.ram_crc = crc32c::crc32c_append(self.ram_crc, buf);
        self.ram_read += buf.len() as u64;
        Ok(())
    }

    /// Checks that all RAM was read and that its checksum matches.
    pub fn finish(self) -> Result<(), StateFileError> {
        if self.ram_read != self.header.ram_len {
            return Err(StateFileError::Truncated {
                path: self.path,
                expected: self.header.ram_len,
                actual: self.ram_read,
            });
        }
        if self.ram_crc != self.header.ram_crc {
            return Err(StateFileError::Corrupt {
                path: self.path,
                part: "RAM",
                expected: self.header.ram_crc,
                actual: self.ram_crc,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Meta {
        name: String,
        regs: Vec<u64>,
    }

    impl VersionedMeta for Meta {
        fn decode_version(_: u32, bytes: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
            postcard::take_from_bytes(bytes)
        }
    }

    fn sample() -> Meta {
        Meta {
            name: "vm".into(),
            regs: (0..100).collect(),
        }
    }

    fn write(dir: &Path, ram: &[u8]) -> PathBuf {
        let path = dir.join("vm.state");
        let meta = encode_meta(&sample()).expect("encode");
        let mut w = StateWriter::create(&path, &meta, ram.len() as u64).expect("create");
        for c in ram.chunks(7) {
            w.write_ram(c).expect("write");
        }
        w.finish().expect("finish");
        path
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpr-common-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn round_trip_with_ram() {
        let dir = tempdir("rt");
        let ram: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let path = write(&dir, &ram);
        let (mut r, meta) = StateReader::open::<Meta>(&path).expect("open");
        assert_eq!(meta, sample());
        r.expect_ram_len(1000).expect("len");
        assert!(r.expect_ram_len(999).is_err());
        let mut back = vec![0u8; 1000];
        r.read_ram(&mut back[..500]).expect("read");
        r.read_ram(&mut back[500..]).expect("read");
        r.finish().expect("crc");
        assert_eq!(back, ram);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_damaged_files() {
        let dir = tempdir("bad");
        let ram = vec![0xabu8; 4096];
        let path = write(&dir, &ram);
        let good = std::fs::read(&path).expect("read");

        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).expect("write");
            let err = StateReader::open::<Meta>(&path)
                .err()
                .or_else(|| {
                    let (mut r, _) = StateReader::open::<Meta>(&path).ok()?;
                    let mut buf = vec![0u8; 4096];
                    r.read_ram(&mut buf).ok()?;
                    r.finish().err()
                })
                .unwrap_or_else(|| panic!("{want}: damaged file was accepted"));
            assert!(err.to_string().contains(want), "{want}: got {err}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..30], "truncated");
        check(&good[..4], "truncated");
        let mut longer = good.clone();
        longer.push(0);
        check(&longer, "unexpected bytes");
        let mut bad_meta = good.clone();
        bad_meta[HEADER_LEN + 3] ^= 0x40;
        check(&bad_meta, "meta checksum");
        let mut bad_ram = good.clone();
        let n = bad_ram.len();
        bad_ram[n - 100] ^= 1;
        check(&bad_ram, "RAM checksum");
        let mut bad_header = good.clone();
        bad_header[30] ^= 1;
        check(&bad_header, "header checksum");
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&999u32.to_le_bytes());
        check(&newer, "newer");
        let mut older = good.clone();
        older[8..12].copy_from_slice(&0u32.to_le_bytes());
        check(&older, "older");
        check(b"#!/bin/sh\necho hello\n", "not a vmmd state file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_without_ram_in_one_write() {
        let dir = tempdir("noram");
        let path = dir.join("vm.state");
        let meta = encode_meta(&sample()).expect("encode");
        let len = write_state_without_ram(&path, &meta, false).expect("write");
        assert_eq!(len, std::fs::metadata(&path).expect("stat").len());
        let (r, m) = StateReader::open::<Meta>(&path).expect("open");
        assert_eq!(m, sample());
        assert!(!r.header().has_ram);
        r.finish().expect("no RAM to check");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_bytes_matches_reader() {
        let dir = tempdir("bytes");
        let path = write(&dir, &[1, 2, 3]);
        let bytes = std::fs::read(&path).expect("read");
        let (h, m) = parse_state_bytes::<Meta>(&bytes).expect("parse");
        assert_eq!(m, sample());
        assert_eq!(h.ram_len, 3);
        assert!(parse_state_bytes::<Meta>(&bytes[..bytes.len() - 2]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
