//! The CPR hand-over: what an exec'ing vmmd passes to the next one (or back to itself on rollback),
//! and the bridge's answer to a take-over. Only fds and process facts: everything the guest can
//! observe is in the state file ([`crate::state::VmState`]).
//!
//! Versions: 3 is written. 2 (the previous release) is read too: its console bytes and MSI
//! programming, which 3 carries in the state file, come back as [`LegacyDeviceState`] for the
//! version-1 state file that came with it (`crate::state::versions`).
//!
//! The old process writes a [`CprHandover`] into a memfd that survives `execve`, clears close-on-exec
//! on every fd it lists, and names the memfd in the [`HANDOVER_ENV`] environment variable. The new
//! process reads it first thing, before it opens anything of its own.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
#[cfg(test)]
use std::os::fd::AsRawFd;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::devices::GuestRequest;
use crate::sys::fd::fd_is_open;
use crate::vcpu::VcpuEvent;

/// Environment variable holding the hand-over memfd's number.
pub const HANDOVER_ENV: &str = "VMMD_CPR_HANDOVER";
/// Version of the hand-over layout.
pub const HANDOVER_VERSION: u32 = 3;
/// The oldest hand-over layout this build reads.
pub const HANDOVER_MIN_VERSION: u32 = 2;
const HANDOVER_MAGIC: [u8; 8] = *b"VMMDCPRH";

/// Names of the fds in the table.
pub mod fd_names {
    /// Guest RAM (memfd or file).
    pub const RAM: &str = "guest-ram";
    /// The gRPC API's listening socket.
    pub const API_LISTENER: &str = "api-listener";
    /// The binary that wrote the hand-over, kept open to roll back to.
    pub const PREVIOUS_BINARY: &str = "previous-binary";
    /// Prefix of the previous process's KVM fds (`/dev/kvm`, VM, vCPUs). They cannot be used from
    /// the new process, but closing them destroys the old VM, which takes ~15 ms here (irqchip
    /// teardown): passing them on lets the new process close them after the guest runs again,
    /// instead of `execve` doing it while the guest is paused.
    pub const RETIRED_KVM_PREFIX: &str = "retired-kvm";
    /// The pipe that keeps the previous process's address space alive (see vmmd's
    /// `AddressSpaceKeeper`); retired with the old VM. Starts with [`RETIRED_KVM_PREFIX`].
    pub const ADDRESS_SPACE_KEEPER: &str = "retired-kvm-address-space";
    /// The new process's end of the cpr-exec bridge's control socket: the previous process's
    /// vCPU and console loops still run the guest, and hand it over on request (vmmd's
    /// `cpr::bridge`). Closing it lets the bridge end.
    pub const BRIDGE_CONTROL: &str = "cpr-bridge";
    /// The memfd the bridge writes the state file into at the take-over (nothing on disk can fail
    /// after the exec).
    pub const BRIDGE_STATE: &str = "cpr-bridge-state";
    /// Prefix of pidfds of the bridge's processes, which the new process reaps.
    pub const BRIDGE_TASK_PREFIX: &str = "cpr-bridge-task";
}

/// What the next process needs besides the state file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CprHandover {
    /// Preserved fds by name.
    pub fds: Vec<(String, i32)>,
    /// The state file (vCPU/VM/device state, no RAM).
    pub state_path: PathBuf,
    /// CLOCK_MONOTONIC (ns) when the old process paused the vCPUs; system-wide, so comparable.
    pub paused_at_ns: u64,
    /// CLOCK_MONOTONIC (ns) right before `execve`.
    pub exec_at_ns: u64,
    /// Phases the old process timed, in order (name, microseconds).
    pub phases: Vec<(String, u64)>,
    /// The command line to re-exec the previous binary with when the new one cannot go on.
    pub rollback_argv: Vec<String>,
    /// The pty slave path, when the console is a pty.
    pub console_pty_path: Option<PathBuf>,
    /// Version of the process that wrote this.
    pub from_version: String,
    /// How many times this guest has been live-updated (including this one).
    pub generation: u64,
    /// Why a rollback happened, when this hand-over goes back to the previous binary.
    pub rollback_reason: Option<String>,
    /// Pid of the child keeping the previous address space alive, to reap once it is released.
    pub address_space_keeper: Option<i32>,
    /// The VFIO model's container ids, in container order (test hook; empty on a real kernel).
    pub vfio_model_containers: Vec<u32>,
    /// The live-update counters so far (`crate::vm::metrics`); zero from a version-2 hand-over.
    pub update_metrics: UpdateCounters,
    /// With `rollback_reason`: what the failed process undid itself, for the rolled-back one to
    /// report.
    pub rollback_undone: Vec<UndoneStep>,
    /// What a version-2 hand-over carried of the devices (read only, never written).
    #[serde(skip)]
    pub legacy: Option<LegacyDeviceState>,
}

/// Live-update outcomes and guest pauses, as counted so far by this guest's vmmd processes.
/// Plain data: `crate::vm::metrics::VmMetrics` counts into it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdateCounters {
    /// Updates that ended with the guest on the new binary.
    pub updated: u64,
    /// Updates that failed before the exec and were undone (the guest stayed on the old binary).
    pub failed: u64,
    /// Updates refused before the guest was paused (preflight, blockers).
    pub refused: u64,
    /// Updates whose new binary failed after the exec, so the previous one was re-executed.
    pub rolled_back: u64,
    /// Upper bounds (µs) of the pause histogram's buckets, ascending.
    pub pause_bounds_us: Vec<u64>,
    /// Pauses per bucket (not cumulative): one per bound, then one for the pauses above the last.
    pub pause_buckets: Vec<u64>,
    /// Sum of the pauses (µs).
    pub pause_sum_us: u64,
    /// Number of pauses.
    pub pause_count: u64,
}

/// A compensation vmmd ran itself during a failed update (`Info.update_undone`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UndoneStep {
    /// Its name, e.g. `vfio-dma`.
    pub step: String,
    /// What failed and what the compensation did.
    pub detail: String,
}

impl UndoneStep {
    /// The VFIO DMA step `step` failed with `source`, and its compensation ran.
    pub fn vfio_dma(step: &str, source: &crate::vfio::dma::DmaStepError) -> UndoneStep {
        UndoneStep {
            step: "vfio-dma".into(),
            detail: format!(
                "VFIO DMA {step}: {}: vmmd says {}",
                source.failed,
                source.undo_text()
            ),
        }
    }
}

/// What a version-2 hand-over carried that version 3 keeps in the state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyDeviceState {
    /// Guest console output the old process had not delivered yet.
    pub console_pending_out: Vec<u8>,
    /// Console input the old process had read but the UART had not taken yet.
    pub console_pending_in: Vec<u8>,
    /// The guest's MSI programming of each passthrough device.
    pub vfio_msi: Vec<VfioMsiState>,
}

/// The version-2 layout, as the previous release wrote it (frozen; tests write it too).
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct CprHandoverV2 {
    fds: Vec<(String, i32)>,
    state_path: PathBuf,
    paused_at_ns: u64,
    exec_at_ns: u64,
    phases: Vec<(String, u64)>,
    rollback_argv: Vec<String>,
    console_pending_out: Vec<u8>,
    console_pending_in: Vec<u8>,
    console_pty_path: Option<PathBuf>,
    from_version: String,
    generation: u64,
    rollback_reason: Option<String>,
    address_space_keeper: Option<i32>,
    vfio_model_containers: Vec<u32>,
    vfio_msi: Vec<VfioMsiState>,
}

impl From<CprHandoverV2> for CprHandover {
    fn from(v: CprHandoverV2) -> CprHandover {
        CprHandover {
            fds: v.fds,
            state_path: v.state_path,
            paused_at_ns: v.paused_at_ns,
            exec_at_ns: v.exec_at_ns,
            phases: v.phases,
            rollback_argv: v.rollback_argv,
            console_pty_path: v.console_pty_path,
            from_version: v.from_version,
            generation: v.generation,
            rollback_reason: v.rollback_reason,
            address_space_keeper: v.address_space_keeper,
            vfio_model_containers: v.vfio_model_containers,
            // The previous release counted nothing.
            update_metrics: UpdateCounters::default(),
            rollback_undone: Vec::new(),
            legacy: Some(LegacyDeviceState {
                console_pending_out: v.console_pending_out,
                console_pending_in: v.console_pending_in,
                vfio_msi: v.vfio_msi,
            }),
        }
    }
}

/// A passthrough device's MSI capability as the guest programmed it (vmmd's shadow of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VfioMsiState {
    /// The device (index in `--device` order).
    pub device: u32,
    /// Config-space offset of the capability.
    pub offset: u16,
    /// Message control as the guest sees it (enable, 64-bit, maskable).
    pub control: u16,
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Mask bits.
    pub mask: u32,
}

/// A hand-over that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The memfd could not be created, written or read.
    #[error("CPR hand-over memfd: {op} failed")]
    Io {
        /// What was done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The environment variable is not an fd number.
    #[error("{HANDOVER_ENV}={0:?} is not an fd number")]
    BadEnv(String),
    /// Wrong magic, version or checksum.
    #[error("CPR hand-over is invalid: {0}")]
    Invalid(String),
    /// Encoding or decoding failed.
    #[error("CPR hand-over does not (de)serialize")]
    Codec(#[source] postcard::Error),
}

impl CprHandover {
    /// The fd named `name`.
    pub fn fd(&self, name: &str) -> Option<RawFd> {
        self.fds.iter().find(|(n, _)| n == name).map(|(_, fd)| *fd)
    }

    /// Encodes with magic, version and CRC32C.
    pub fn encode(&self) -> Result<Vec<u8>, HandoverError> {
        frame(HANDOVER_MAGIC, HANDOVER_VERSION, self)
    }

    /// Decodes and checks; a version-2 hand-over is migrated (its device parts in `legacy`).
    pub fn decode(bytes: &[u8]) -> Result<CprHandover, HandoverError> {
        match frame_version(HANDOVER_MAGIC, bytes)? {
            HANDOVER_VERSION => unframe(HANDOVER_MAGIC, HANDOVER_VERSION, bytes),
            2 => unframe::<CprHandoverV2>(HANDOVER_MAGIC, 2, bytes).map(CprHandover::from),
            found => Err(HandoverError::Invalid(format!(
                "version {found}, this vmmd reads {HANDOVER_MIN_VERSION}..={HANDOVER_VERSION}"
            ))),
        }
    }

    /// Writes the hand-over into a new memfd (close-on-exec: the exec path clears the flag itself, so a
    /// memfd prepared for an exec that never happens does not leak into later ones); returns it.
    pub fn to_memfd(&self) -> Result<OwnedFd, HandoverError> {
        let io = |op| move |source| HandoverError::Io { op, source };
        let name = c"vmmd-cpr-handover";
        // SAFETY: memfd_create with a valid C string; the returned fd is owned below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&self.encode()?).map_err(io("write"))?;
        file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        Ok(OwnedFd::from(file))
    }

    /// Reads the hand-over named by [`HANDOVER_ENV`], if any, and closes its memfd.
    pub fn from_env() -> Result<Option<CprHandover>, HandoverError> {
        let Ok(value) = std::env::var(HANDOVER_ENV) else {
            return Ok(None);
        };
        let fd: RawFd = value
            .parse()
            .map_err(|_| HandoverError::BadEnv(value.clone()))?;
        if fd < 3 || !fd_is_open(fd) {
            return Err(HandoverError::BadEnv(value));
        }
        // SAFETY: the previous process left `fd` open for us and nothing in this process owns it.
        let mut file = unsafe { File::from_raw_fd(fd) };
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(|source| HandoverError::Io { op: "read", source })?;
        drop(file);
        Ok(Some(CprHandover::decode(&bytes)?))
    }
}

/// Length of the header [`frame`] puts before the body: magic, version, CRC32C, length.
pub const FRAME_HEADER: usize = 20;

/// `magic`, `version`, the body's CRC32C and length, then `value` in postcard.
pub fn frame<T: serde::Serialize>(
    magic: [u8; 8],
    version: u32,
    value: &T,
) -> Result<Vec<u8>, HandoverError> {
    let body = postcard::to_allocvec(value).map_err(HandoverError::Codec)?;
    let mut out = Vec::with_capacity(body.len() + FRAME_HEADER);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The version a [`frame`] header announces, after checking its magic.
pub fn frame_version(magic: [u8; 8], header: &[u8]) -> Result<u32, HandoverError> {
    if header.len() < FRAME_HEADER || header[..8] != magic {
        return Err(HandoverError::Invalid("bad magic".into()));
    }
    Ok(u32::from_le_bytes([
        header[8], header[9], header[10], header[11],
    ]))
}

/// The body length a [`frame`] header announces, after checking magic and version.
pub fn frame_body_len(magic: [u8; 8], version: u32, header: &[u8]) -> Result<usize, HandoverError> {
    let bad = |s: &str| HandoverError::Invalid(s.to_string());
    if header.len() < FRAME_HEADER || header[..8] != magic {
        return Err(bad("bad magic"));
    }
    let word =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let found = word(8);
    if found != version {
        return Err(HandoverError::Invalid(format!(
            "version {found}, this vmmd speaks {version}"
        )));
    }
    Ok(word(16) as usize)
}

/// Checks and decodes what [`frame`] wrote.
pub fn unframe<T: serde::de::DeserializeOwned>(
    magic: [u8; 8],
    version: u32,
    bytes: &[u8],
) -> Result<T, HandoverError> {
    let len = frame_body_len(magic, version, bytes)?;
    let crc = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let body = bytes
        .get(FRAME_HEADER..FRAME_HEADER + len)
        .ok_or_else(|| HandoverError::Invalid("truncated".into()))?;
    if crc32c::crc32c(body) != crc {
        return Err(HandoverError::Invalid("checksum mismatch".into()));
    }
    postcard::from_bytes(body).map_err(HandoverError::Codec)
}

/// Magic of a [`BridgeReply`] frame.
pub const BRIDGE_REPLY_MAGIC: [u8; 8] = *b"VMMDBRGR";
/// Version of the [`BridgeReply`] layout (1, the previous release's, is read too).
pub const BRIDGE_REPLY_VERSION: u32 = 2;

/// What the cpr-exec bridge answers when the new process asks for the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BridgeReply {
    /// Ok: the state file is written and the bridge's vCPUs are stopped for good. Err: why the
    /// state could not be saved; the guest runs on in the bridge.
    pub saved: Result<(), String>,
    /// CLOCK_MONOTONIC (ns) when the bridge was asked to stop the vCPUs.
    pub paused_at_ns: u64,
    /// Phases the bridge timed (name, microseconds).
    pub phases: Vec<(String, u64)>,
    /// Guest requests (power off, suspend, reset) and vCPU failures seen while bridged, for the
    /// new process to act on.
    pub guest_events: Vec<BridgedEvent>,
    /// What a version-1 reply carried of the console (read only, never written).
    #[serde(skip)]
    pub legacy: Option<LegacyDeviceState>,
}

/// The version-1 reply, as the previous release's bridge writes it (frozen; tests write it too).
#[derive(serde::Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct BridgeReplyV1 {
    saved: Result<(), String>,
    paused_at_ns: u64,
    phases: Vec<(String, u64)>,
    console_pending_out: Vec<u8>,
    console_pending_in: Vec<u8>,
    guest_events: Vec<BridgedEvent>,
}

impl BridgeReply {
    /// Decodes a framed reply of any version this build reads.
    pub fn decode(bytes: &[u8]) -> Result<BridgeReply, HandoverError> {
        match frame_version(BRIDGE_REPLY_MAGIC, bytes)? {
            BRIDGE_REPLY_VERSION => unframe(BRIDGE_REPLY_MAGIC, BRIDGE_REPLY_VERSION, bytes),
            1 => unframe::<BridgeReplyV1>(BRIDGE_REPLY_MAGIC, 1, bytes).map(|v| BridgeReply {
                saved: v.saved,
                paused_at_ns: v.paused_at_ns,
                phases: v.phases,
                guest_events: v.guest_events,
                legacy: Some(LegacyDeviceState {
                    console_pending_out: v.console_pending_out,
                    console_pending_in: v.console_pending_in,
                    vfio_msi: Vec::new(),
                }),
            }),
            found => Err(HandoverError::Invalid(format!(
                "bridge reply version {found}, this vmmd reads 1..={BRIDGE_REPLY_VERSION}"
            ))),
        }
    }

    /// Encodes it framed.
    pub fn encode(&self) -> Result<Vec<u8>, HandoverError> {
        frame(BRIDGE_REPLY_MAGIC, BRIDGE_REPLY_VERSION, self)
    }
}

/// A vCPU event that happened while the bridge ran the guest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BridgedEvent {
    /// ACPI S5.
    PowerOff,
    /// ACPI S3.
    Suspend,
    /// Reset or an unrecoverable guest fault.
    Reset(String),
    /// A vCPU failed.
    Failed {
        /// vCPU index.
        vcpu: u8,
        /// What happened.
        reason: String,
    },
}

impl From<VcpuEvent> for BridgedEvent {
    fn from(e: VcpuEvent) -> Self {
        use BridgedEvent as B;
        match e {
            VcpuEvent::Guest(GuestRequest::PowerOff) => B::PowerOff,
            VcpuEvent::Guest(GuestRequest::Suspend) => B::Suspend,
            VcpuEvent::Guest(GuestRequest::Reset(why)) => B::Reset(why),
            VcpuEvent::Failed { id, reason } => B::Failed { vcpu: id, reason },
        }
    }
}

impl From<BridgedEvent> for VcpuEvent {
    fn from(e: BridgedEvent) -> Self {
        use BridgedEvent as B;
        match e {
            B::PowerOff => VcpuEvent::Guest(GuestRequest::PowerOff),
            B::Suspend => VcpuEvent::Guest(GuestRequest::Suspend),
            B::Reset(why) => VcpuEvent::Guest(GuestRequest::Reset(why)),
            B::Failed { vcpu, reason } => VcpuEvent::Failed { id: vcpu, reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CprHandover {
        CprHandover {
            fds: vec![
                (fd_names::RAM.into(), 7),
                (fd_names::API_LISTENER.into(), 9),
            ],
            state_path: "/tmp/x.state".into(),
            paused_at_ns: 1,
            exec_at_ns: 2,
            phases: vec![("pause".into(), 10)],
            rollback_argv: vec![
                "vmmd".into(),
                "--incoming".into(),
                "file:/tmp/x.state".into(),
            ],
            console_pty_path: None,
            from_version: "0.1.0".into(),
            generation: 3,
            rollback_reason: None,
            address_space_keeper: None,
            vfio_model_containers: vec![3, 4],
            update_metrics: UpdateCounters {
                updated: 2,
                failed: 1,
                refused: 0,
                rolled_back: 1,
                pause_bounds_us: vec![100, 1000],
                pause_buckets: vec![0, 3, 0],
                pause_sum_us: 1200,
                pause_count: 3,
            },
            rollback_undone: vec![UndoneStep {
                step: "vfio-dma".into(),
                detail: "VFIO DMA update-vaddr: …: vmmd says the mappings were restored".into(),
            }],
            legacy: None,
        }
    }

    #[test]
    fn update_counters_are_carried() {
        let h = sample();
        let read = CprHandover::decode(&h.encode().expect("encode")).expect("decode");
        assert_eq!(read.update_metrics, h.update_metrics);
        assert_eq!(read.update_metrics.updated, 2);
        assert_eq!(read.update_metrics.pause_buckets, vec![0, 3, 0]);
    }

    #[test]
    fn round_trip_and_damage() {
        let h = sample();
        let bytes = h.encode().expect("encode");
        assert_eq!(CprHandover::decode(&bytes).expect("decode"), h);
        assert_eq!(h.fd(fd_names::API_LISTENER), Some(9));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(CprHandover::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(CprHandover::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_version_2_hand_over_is_read_with_its_device_parts() {
        let h = sample();
        let msi = VfioMsiState {
            device: 0,
            offset: 0x40,
            control: 0x81,
            address: 0xfee0_0000,
            data: 0x22,
            mask: 0,
        };
        let v2 = CprHandoverV2 {
            fds: h.fds.clone(),
            state_path: h.state_path.clone(),
            paused_at_ns: 1,
            exec_at_ns: 2,
            phases: h.phases.clone(),
            rollback_argv: h.rollback_argv.clone(),
            console_pending_out: b"...".to_vec(),
            console_pending_in: b"v".to_vec(),
            console_pty_path: None,
            from_version: "0.1.0".into(),
            generation: 3,
            rollback_reason: None,
            address_space_keeper: None,
            vfio_model_containers: vec![3, 4],
            vfio_msi: vec![msi],
        };
        let bytes = frame(HANDOVER_MAGIC, 2, &v2).expect("frame");
        let read = CprHandover::decode(&bytes).expect("decode v2");
        let legacy = read.legacy.clone().expect("legacy parts");
        assert_eq!(legacy.console_pending_out, b"...");
        assert_eq!(legacy.console_pending_in, b"v");
        assert_eq!(legacy.vfio_msi, vec![msi]);
        // The previous release counted nothing: the counters start from zero.
        assert_eq!(read.update_metrics, UpdateCounters::default());
        assert!(read.rollback_undone.is_empty());
        assert_eq!(
            CprHandover {
                legacy: None,
                update_metrics: h.update_metrics.clone(),
                rollback_undone: h.rollback_undone.clone(),
                ..read
            },
            h
        );
        let newer = frame(HANDOVER_MAGIC, HANDOVER_VERSION + 1, &h).expect("frame");
        let err = CprHandover::decode(&newer).expect_err("newer refused");
        assert!(err.to_string().contains("version 4"), "{err}");
    }

    #[test]
    fn bridge_replies_of_both_versions_decode() {
        let reply = BridgeReply {
            saved: Ok(()),
            paused_at_ns: 5,
            phases: vec![("bridge-pause".into(), 40)],
            guest_events: vec![BridgedEvent::Suspend],
            legacy: None,
        };
        let bytes = reply.encode().expect("encode");
        assert_eq!(BridgeReply::decode(&bytes).expect("decode"), reply);
        let v1 = BridgeReplyV1 {
            saved: Ok(()),
            paused_at_ns: 5,
            phases: reply.phases.clone(),
            console_pending_out: b"out".to_vec(),
            console_pending_in: b"in".to_vec(),
            guest_events: vec![BridgedEvent::Suspend],
        };
        let old = BridgeReply::decode(&frame(BRIDGE_REPLY_MAGIC, 1, &v1).expect("frame"))
            .expect("decode v1");
        let legacy = old.legacy.clone().expect("legacy console");
        assert_eq!(legacy.console_pending_out, b"out");
        assert_eq!(legacy.console_pending_in, b"in");
        assert_eq!(
            BridgeReply {
                legacy: None,
                ..old
            },
            reply
        );
    }

    #[test]
    fn memfd_is_close_on_exec() {
        let fd = sample().to_memfd().expect("memfd");
        // SAFETY: F_GETFD only queries.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }
}
