//! Everything KVM knows about a vCPU, saved and restored through [`Persist`], and the CPUID and
//! MSR lists it is built from.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use tracing::{debug, warn};

use super::{kvm_err, VcpuError};
use crate::persist::Persist;

/// MSRs whose refusal on restore makes the restore fail: without them the guest's clocks break.
const CRITICAL_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
];

/// IA32_ARCH_CAPABILITIES: KVM here refuses to set it, so it is hidden from the guest like QEMU's
/// `-cpu host,-arch-capabilities` does.
const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// Everything KVM knows about one vCPU, in the order it must be restored.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC ID).
    pub id: u8,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers, TSC and kvmclock included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The CPUID for vCPU `id` of `count`: KVM's supported list with this vCPU's APIC ID filled in.
pub fn cpuid_for(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, VcpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // Initial APIC ID, logical processor count, and the hypervisor bit.
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count.max(1)) << 16);
                e.ecx |= 1 << 31;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            7 if e.index == 0 => e.edx &= !(1 << 29), // ARCH_CAPABILITIES
            0xb | 0x1f => e.edx = u32::from(id),      // x2APIC ID
            _ => {}
        }
    }
    Ok(cpuid)
}

/// The MSRs worth saving: KVM's index list, minus those KVM cannot read back on this host.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kvm_err(0, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_ARCH_CAPABILITIES)
        .collect();
    // Drop MSRs that KVM_GET_MSRS stops at, one at a time.
    let mut probe = Vec::new();
    while !indices.is_empty() {
        let got = read_msrs(vcpu, 0, &indices)?;
        probe.extend(got.iter().map(|e| e.index));
        if got.len() == indices.len() {
            break;
        }
        debug!(
            msr = format!("{:#x}", indices[got.len()]),
            "MSR not readable, not saved"
        );
        indices.drain(..=got.len());
    }
    Ok(probe)
}

fn read_msrs(vcpu: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::TooMany {
            id,
            what: "MSR list",
            count: entries.len(),
        })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kvm_err(id, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            break;
        }
    }
    Ok(out)
}

/// One vCPU as [`Persist`] sees it: its fd (paused, or not run yet), its index and the MSRs a
/// save reads.
pub struct Vcpu<'a> {
    fd: &'a VcpuFd,
    id: u8,
    msr_indices: &'a [u32],
    refused_msrs: Vec<u32>,
}

/// What restoring a vCPU needs besides its state.
pub struct VcpuArgs<'a> {
    /// The vCPU, created but not run yet.
    pub fd: &'a VcpuFd,
    /// The MSRs later saves of the restored vCPU read (see [`saveable_msrs`]).
    pub msr_indices: &'a [u32],
}

impl<'a> Vcpu<'a> {
    /// vCPU `id` behind `fd`, whose saves read the MSRs `msr_indices`.
    pub fn new(fd: &'a VcpuFd, id: u8, msr_indices: &'a [u32]) -> Vcpu<'a> {
        Vcpu {
            fd,
            id,
            msr_indices,
            refused_msrs: Vec::new(),
        }
    }

    /// The MSRs KVM refused at the restore (none critical; each was logged).
    pub fn refused_msrs(&self) -> &[u32] {
        &self.refused_msrs
    }
}

impl<'a> Persist for Vcpu<'a> {
    type State = VcpuState;
    type ConstructorArgs = VcpuArgs<'a>;
    type Error = VcpuError;

    /// Reads the complete state of a paused vCPU. Order matters: KVM_GET_MP_STATE can change LAPIC
    /// state, and the events are read last (as Firecracker and Cloud Hypervisor do).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        let (vcpu, id) = (self.fd, self.id);
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err(id, "KVM_GET_CPUID2"))?;
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
        let msrs = read_msrs(vcpu, id, self.msr_indices)?;
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Loads a saved state into a vCPU that has not run yet; the MSRs KVM refused (not critical)
    /// are in [`Vcpu::refused_msrs`].
    fn restore(args: VcpuArgs<'a>, s: &VcpuState) -> Result<Vcpu<'a>, VcpuError> {
        let vcpu = args.fd;
        let id = s.id;
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuError::TooMany {
            id,
            what: "CPUID",
            count: s.cpuid.len(),
        })?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
        if let Some(khz) = s.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz)
                    .map_err(kvm_err(id, "KVM_SET_TSC_KHZ"))?;
            }
        }
        vcpu.set_mp_state(s.mp_state)
            .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&s.regs)
            .map_err(kvm_err(id, "KVM_SET_REGS"))?;
        vcpu.set_sregs(&s.sregs)
            .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
        set_xsave(vcpu, &s.xsave).map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&s.xcrs)
            .map_err(kvm_err(id, "KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&s.debugregs)
            .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&s.lapic)
            .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
        let refused_msrs = write_msrs(vcpu, id, &s.msrs)?;
        vcpu.set_vcpu_events(&s.vcpu_events)
            .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(Vcpu {
            fd: vcpu,
            id,
            msr_indices: args.msr_indices,
            refused_msrs,
        })
    }
}

/// KVM_SET_MSRS stops at the first MSR it refuses: skip it, remember it, and go on.
fn write_msrs(vcpu: &VcpuFd, id: u8, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, VcpuError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuError::TooMany {
            id,
            what: "MSR list",
            count: chunk.len(),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            let index = chunk[n].index;
            if CRITICAL_MSRS.contains(&index) {
                return Err(VcpuError::CriticalMsr { id, index });
            }
            warn!(
                vcpu = id,
                msr = format!("{index:#x}"),
                "KVM refused to restore MSR; skipped"
            );
            refused.push(index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(refused)
}

fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` is a complete `kvm_xsave` (4 KiB region) as KVM_GET_XSAVE returned it; KVM reads
    // at most that many bytes for KVM_SET_XSAVE.
    unsafe { vcpu.set_xsave(xsave) }
}
