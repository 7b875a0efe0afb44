//! The VM state a state file's meta section holds, composed of every part's [`Persist`] state:
//! `{vm, vcpus, devices}`, and the hand-over formats (`handover`).
//!
//! Versioning: the container (magic, format version, checksums) is `cpr_common::state`. Any change to
//! these structures is a new `STATE_FORMAT_VERSION`, with the previous layout kept in [`versions`]
//! and migrated on read. An older vmmd refuses a newer file before touching the guest.
//!
//! [`Persist`]: crate::persist::Persist

pub mod handover;
pub mod kvm;
pub mod versions;

use crate::console::ConsoleState;
use crate::devices::pm::PmState;
use crate::devices::serial::UartState;
use crate::memory::RamRegion;
use crate::vcpu::VcpuState;
use crate::vfio::device::PassthroughState;
pub use kvm::{KvmVm, KvmVmError, KvmVmState};

/// The runstate the guest had when it was saved, and gets back when loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedRunState {
    /// Running.
    Running,
    /// Paused by the operator.
    Paused,
    /// Suspended to RAM by the guest.
    Suspended,
}

/// Everything but guest RAM (format version 2).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// vmmd version that wrote the file (informational).
    pub vmmd_version: String,
    /// Guest RAM layout; must match the loading VM's.
    pub memory: Vec<RamRegion>,
    /// Runstate to go back to.
    pub run_state: SavedRunState,
    /// VM-wide KVM state.
    pub vm: KvmVmState,
    /// Per-vCPU state, indexed by vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// Every device's state.
    pub devices: DevicesState,
}

/// The devices' saved states.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: UartState,
    /// The PM device.
    pub pm: PmState,
    /// The passthrough devices, in slot order.
    pub vfio: Vec<PassthroughState>,
    /// The console backend's undelivered bytes.
    pub console: ConsoleState,
}

impl cpr_common::state::VersionedMeta for VmState {
    fn decode_version(version: u32, bytes: &[u8]) -> Result<(Self, &[u8]), postcard::Error> {
        versions::decode(version, bytes)
    }
}

/// Parses a whole state file held in memory: header, checksums and the meta section. Used by the fuzz
/// target; vmmd itself streams files through `StateReader`.
pub fn parse_state_file(
    bytes: &[u8],
) -> Result<(cpr_common::state::StateHeader, VmState), cpr_common::state::StateFileError> {
    cpr_common::state::parse_state_bytes(bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use cpr_common::state::{encode_meta, StateWriter, HEADER_LEN};

    pub(crate) fn sample_state() -> VmState {
        let vcpu = VcpuState {
            id: 0,
            cpuid: vec![Default::default(); 3],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 5],
            vcpu_events: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        VmState {
            vmmd_version: "test".into(),
            memory: crate::memory::layout(64 << 20),
            run_state: SavedRunState::Running,
            vcpus: vec![vcpu],
            vm: KvmVmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: DevicesState {
                serial: UartState {
                    in_buffer: b"v".to_vec(),
                    ..Default::default()
                },
                pm: PmState::default(),
                vfio: Vec::new(),
                console: ConsoleState {
                    output: b"READY".to_vec(),
                    input: Vec::new(),
                },
            },
        }
    }

    fn sample_file() -> Vec<u8> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vmmd-state-test-{}-{n}", std::process::id()));
        let meta = encode_meta(&sample_state()).expect("encode");
        let mut w = StateWriter::create(&path, &meta, 4096).expect("create");
        w.write_ram(&[0x5a; 4096]).expect("ram");
        w.finish().expect("finish");
        let bytes = std::fs::read(&path).expect("read");
        let _ = std::fs::remove_file(&path);
        bytes
    }

    #[test]
    fn state_round_trips() {
        let bytes = sample_file();
        let (header, state) = parse_state_file(&bytes).expect("parse");
        assert_eq!(header.ram_len, 4096);
        assert_eq!(state.vcpus.len(), 1);
        assert_eq!(state.vcpus[0].tsc_khz, Some(2_000_000));
        assert_eq!(state.devices.serial.in_buffer, b"v");
        assert_eq!(state.run_state, SavedRunState::Running);
    }

    /// The stable-toolchain companion of the `state_file` fuzz target: thousands of deterministic
    /// mutations of a real state file must each be refused cleanly (no panic), and every bit flip in
    /// the header or meta section must be detected.
    #[test]
    fn state_file_mutations() {
        let good = sample_file();
        let meta_end = good.len() - 4096;
        for bit in 0..meta_end * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse_state_file(&bad).is_err(),
                "bit flip {bit} was not detected"
            );
        }
        for len in 0..good.len() {
            assert!(
                parse_state_file(&good[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut bad = good.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() as usize) % bad.len();
                match next() % 4 {
                    0 => bad[at] = next() as u8,
                    1 => bad.truncate(at.max(1)),
                    2 => bad.insert(at, next() as u8),
                    _ => {
                        // Lengths and version fields, the ones a parser must not trust.
                        let field = [8usize, 20, 24, 32][(next() % 4) as usize];
                        let v = next().to_le_bytes();
                        if let Some(slot) = bad.get_mut(field..field + 4) {
                            slot.copy_from_slice(&v[..4]);
                        }
                    }
                }
            }
            let _ = parse_state_file(&bad);
        }
        assert!(HEADER_LEN < meta_end);
    }
}
