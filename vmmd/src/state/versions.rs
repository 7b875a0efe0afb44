//! Every state-file layout this build still reads, and the migrations that bring each to today's
//! [`VmState`]. A new format version adds its predecessor's layout here (frozen: never edited
//! again) with a `From` into the next one, so a file of any readable version arrives as the current
//! structure before anything of the guest is touched.
//!
//! | version | layout | migration |
//! | --- | --- | --- |
//! | 1 | flat: vCPUs, KVM VM, UART, PM; console bytes and MSI in the hand-over | [`VmStateV1`] → 2: `devices` from the flat fields; the hand-over's parts by [`apply_legacy`] |
//! | 2 | `{vm, vcpus, devices}` | current |

use cpr_common::state::STATE_FORMAT_VERSION;

use super::handover::{LegacyDeviceState, VfioMsiState};
use super::{DevicesState, KvmVmState, SavedRunState, VmState};
use crate::console::ConsoleState;
use crate::devices::pm::PmState;
use crate::devices::serial::UartState;
use crate::memory::RamRegion;
use crate::vcpu::VcpuState;
use crate::vfio::device::PassthroughState;
use crate::vfio::msi::{MsiCap, MsiMessage};

/// Decodes a meta section of `version` and migrates it to today's layout.
pub fn decode(version: u32, bytes: &[u8]) -> Result<(VmState, &[u8]), postcard::Error> {
    match version {
        STATE_FORMAT_VERSION => postcard::take_from_bytes(bytes),
        1 => postcard::take_from_bytes::<VmStateV1>(bytes).map(|(v, rest)| (v.into(), rest)),
        // The container refuses versions outside the readable range before the meta is decoded.
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// Format version 1 (vmmd 0.1.0 up to the device-state redesign). Frozen.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VmStateV1 {
    /// vmmd version that wrote the file.
    pub vmmd_version: String,
    /// Guest RAM layout.
    pub memory: Vec<RamRegion>,
    /// Runstate to go back to.
    pub run_state: SavedRunState,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide KVM state.
    pub vm: KvmVmState,
    /// COM1.
    pub serial: UartState,
    /// PM device.
    pub pm: PmState,
}

impl From<VmStateV1> for VmState {
    fn from(v: VmStateV1) -> VmState {
        VmState {
            vmmd_version: v.vmmd_version,
            memory: v.memory,
            run_state: v.run_state,
            vm: v.vm,
            vcpus: v.vcpus,
            devices: DevicesState {
                serial: v.serial,
                pm: v.pm,
                // Version 1 kept these in the hand-over: see `apply_legacy`.
                vfio: Vec::new(),
                console: ConsoleState::default(),
            },
        }
    }
}

/// Completes a state read from a version-1 file with what its version-2 hand-over (or version-1
/// bridge reply) carried: the console's undelivered bytes and the passthrough devices' MSI
/// programming.
pub fn apply_legacy(state: &mut VmState, legacy: &LegacyDeviceState, vfio_devices: usize) {
    state.devices.console = ConsoleState {
        output: legacy.console_pending_out.clone(),
        input: legacy.console_pending_in.clone(),
    };
    state.devices.vfio = (0..vfio_devices)
        .map(|i| PassthroughState {
            msi: legacy
                .vfio_msi
                .iter()
                .find(|m| m.device as usize == i)
                .map(msi_from_legacy),
        })
        .collect();
}

fn msi_from_legacy(s: &VfioMsiState) -> MsiCap {
    MsiCap {
        offset: s.offset,
        is64: s.control & (1 << 7) != 0,
        maskable: s.control & (1 << 8) != 0,
        control: s.control,
        message: MsiMessage {
            address: s.address,
            data: s.data,
        },
        mask: s.mask,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::sample_state;
    use cpr_common::state::{encode_meta, state_bytes_without_ram, StateFileError};

    fn as_v1(s: VmState) -> VmStateV1 {
        VmStateV1 {
            vmmd_version: "0.1.0".into(),
            memory: s.memory,
            run_state: s.run_state,
            vcpus: s.vcpus,
            vm: s.vm,
            serial: s.devices.serial,
            pm: s.devices.pm,
        }
    }

    #[test]
    fn a_version_1_file_is_read_through_its_migration() {
        let current = sample_state();
        let v1 = as_v1(sample_state());
        let bytes = state_bytes_without_ram(1, &encode_meta(&v1).expect("encode"));
        let (header, read) = crate::state::parse_state_file(&bytes).expect("v1 readable");
        assert_eq!(header.version, 1);
        assert_eq!(read.vcpus.len(), current.vcpus.len());
        assert_eq!(read.vcpus[0].tsc_khz, current.vcpus[0].tsc_khz);
        assert_eq!(read.devices.serial, current.devices.serial);
        assert_eq!(read.devices.pm, current.devices.pm);
        assert_eq!(read.run_state, current.run_state);
        assert!(read.devices.vfio.is_empty());
        assert_eq!(read.devices.console, ConsoleState::default());
    }

    #[test]
    fn the_legacy_hand_over_completes_a_version_1_state() {
        let mut state: VmState = as_v1(sample_state()).into();
        let legacy = LegacyDeviceState {
            console_pending_out: b"out".to_vec(),
            console_pending_in: b"in".to_vec(),
            vfio_msi: vec![VfioMsiState {
                device: 1,
                offset: 0x40,
                control: 0x81,
                address: 0xfee0_0000,
                data: 0x22,
                mask: 0,
            }],
        };
        apply_legacy(&mut state, &legacy, 2);
        assert_eq!(state.devices.console.output, b"out");
        assert_eq!(state.devices.console.input, b"in");
        assert_eq!(state.devices.vfio.len(), 2);
        assert_eq!(state.devices.vfio[0].msi, None);
        let msi = state.devices.vfio[1].msi.expect("device 1's MSI");
        assert!(msi.enabled() && msi.is64 && !msi.maskable);
        assert_eq!((msi.message.address, msi.message.data), (0xfee0_0000, 0x22));
    }

    #[test]
    fn a_newer_version_is_refused_before_its_meta_is_decoded() {
        let meta = encode_meta(&sample_state()).expect("encode");
        let newer = state_bytes_without_ram(STATE_FORMAT_VERSION + 1, &meta);
        assert!(matches!(
            crate::state::parse_state_file(&newer),
            Err(StateFileError::NewerVersion { .. })
        ));
    }
}
