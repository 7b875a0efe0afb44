//! vCPUs: one thread each, a pause/kick protocol, and complete KVM state get/set.
//!
//! Pausing: the controller raises a flag, then sends `SIGRTMIN` to every vCPU thread. The signal handler
//! sets `kvm_run.immediate_exit` through a thread-local pointer, so a vCPU that was just about to enter
//! the guest returns at once instead of missing the kick. Each thread then parks on a condvar and is
//! counted as paused; vCPU ioctls to save or restore state are only made while all threads are parked.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use tracing::{debug, error, warn};

use crate::devices::{Devices, GuestRequest};

/// MSRs whose refusal on restore makes the restore fail: without them the guest's clocks break.
const CRITICAL_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
];

/// IA32_ARCH_CAPABILITIES: KVM here refuses to set it, so it is hidden from the guest like QEMU's
/// `-cpu host,-arch-capabilities` does.
const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// A vCPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on a vCPU failed.
    #[error("vCPU {id}: {op} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused an MSR the guest cannot run without.
    #[error(
        "vCPU {id}: KVM refused to restore MSR {index:#x}, which the guest's clock depends on"
    )]
    CriticalMsr {
        /// vCPU index.
        id: u8,
        /// MSR index.
        index: u32,
    },
    /// A FAM wrapper could not be built.
    #[error("vCPU {id}: {what} has too many entries ({count})")]
    TooMany {
        /// vCPU index.
        id: u8,
        /// Which list.
        what: &'static str,
        /// How many.
        count: usize,
    },
    /// The thread could not be created.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// vCPUs did not stop in time.
    #[error("{missing} vCPU(s) did not pause within {timeout:?}; the VM keeps running")]
    PauseTimeout {
        /// How many did not stop.
        missing: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU loops could not be moved into continuation children.
    #[error("cannot hand the vCPUs to a bridge process: {reason}; they stay on this process")]
    Detach {
        /// What went wrong.
        reason: String,
    },
}

fn kvm_err(id: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, op, source }
}

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

/// Reads the complete state of a paused vCPU. Order matters: KVM_GET_MP_STATE can change LAPIC state,
/// and the events are read last (as Firecracker and Cloud Hypervisor do).
pub fn save_state(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
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
    let msrs = read_msrs(vcpu, id, msr_indices)?;
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

/// Loads a saved state into a vCPU that has not run yet. Returns the MSRs KVM refused (not critical).
pub fn restore_state(vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, VcpuError> {
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
    let refused = write_msrs(vcpu, id, &s.msrs)?;
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
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

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping (set by the vCPU thread before it
        // first runs, cleared before the VcpuFd is dropped); a volatile byte store is signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(VcpuError::Signal)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
    /// Parked vCPU threads hand their loop to a continuation child (see `cpr::bridge`).
    Detach,
    /// Parked continuations end, and their threads take the loop back.
    Reattach,
}

/// What a parked vCPU loop is told to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    Run,
    Exit,
    Detach,
}

struct ControlState {
    request: Request,
    parked: usize,
    /// vCPU loops running in continuation children.
    detached: usize,
    /// A thread could not start its continuation.
    detach_failed: Option<String>,
}

/// Who runs a vCPU's loop, for kicks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KickTarget {
    /// A thread of this process.
    Thread(libc::pthread_t),
    /// A continuation child (its own thread group).
    Task(libc::pid_t),
}

/// Pause/resume control shared by the VM and its vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    pause_flag: AtomicBool,
    threads: Mutex<Vec<KickTarget>>,
    /// The only fds (besides stdio) a continuation keeps in its copy of the fd table.
    detach_keep: Mutex<Vec<libc::c_int>>,
    /// Guest requests and failures seen by continuations, which cannot reach the event channel;
    /// the successor re-raises them.
    bridged_events: Mutex<Vec<VcpuEvent>>,
    /// When the first vCPU went back into the guest after the last resume (0: not yet).
    first_run_ns: std::sync::atomic::AtomicU64,
}

impl VcpuControl {
    /// A control whose vCPUs start paused.
    pub fn new_paused() -> Arc<VcpuControl> {
        Arc::new(VcpuControl {
            state: Mutex::new(ControlState {
                request: Request::Pause,
                parked: 0,
                detached: 0,
                detach_failed: None,
            }),
            changed: Condvar::new(),
            pause_flag: AtomicBool::new(true),
            threads: Mutex::new(Vec::new()),
            detach_keep: Mutex::new(Vec::new()),
            bridged_events: Mutex::new(Vec::new()),
            first_run_ns: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self, r: Request) {
        let mut st = self.lock();
        if st.request != Request::Exit {
            st.request = r;
        }
        self.pause_flag
            .store(st.request != Request::Run, Ordering::Release);
        self.changed.notify_all();
    }

    fn kick_all(&self) {
        let me = pthread_self();
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            match t {
                KickTarget::Thread(t) if t != me => {
                    // SAFETY: `t` is the pthread of a vCPU thread that is alive until `join` in
                    // `VcpuSet::shutdown`, which clears the list first.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
                KickTarget::Thread(_) => {}
                KickTarget::Task(pid) => {
                    // SAFETY: tgkill to a continuation child of this process; it is in the list
                    // only while it runs a vCPU loop (a stale pid gets ESRCH at worst).
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, kick_signal()) };
                }
            }
        }
    }

    fn set_kick_target(&self, id: u8, target: KickTarget) {
        let mut list = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = list.get_mut(usize::from(id)) {
            *slot = target;
        }
    }

    /// Moves the loops of `count` parked vCPUs into continuation children (which keep only `keep`
    /// and stdio in their fd tables) and returns their pids; the vCPUs stay paused. On failure
    /// every loop is back on its thread.
    pub fn detach(
        &self,
        count: usize,
        keep: Vec<libc::c_int>,
        timeout: Duration,
    ) -> Result<Vec<libc::pid_t>, VcpuError> {
        *self.detach_keep.lock().unwrap_or_else(|e| e.into_inner()) = keep;
        self.request(Request::Detach);
        let (done, failed) = {
            let (mut st, _) = self.wait_until(timeout, |st| {
                st.detached >= count || st.detach_failed.is_some()
            });
            (st.detached, st.detach_failed.take())
        };
        if done < count || failed.is_some() {
            // Whatever got detached comes back: stop at the next park, then reattach.
            self.request(Request::Pause);
            let _ = self.wait_until(timeout, |st| st.parked >= count);
            self.reattach(count, timeout)?;
            return Err(VcpuError::Detach {
                reason: failed.unwrap_or_else(|| format!("only {done} of {count} in time")),
            });
        }
        self.request(Request::Pause);
        Ok(self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|t| match t {
                KickTarget::Task(pid) => Some(*pid),
                KickTarget::Thread(_) => None,
            })
            .collect())
    }

    /// Ends the continuations of paused vCPUs: their threads take the loops back, paused.
    pub fn reattach(&self, count: usize, timeout: Duration) -> Result<(), VcpuError> {
        self.request(Request::Reattach);
        let (st, done) = self.wait_until(timeout, |st| st.detached == 0 && st.parked >= count);
        let missing = st.detached;
        drop(st);
        if !done {
            return Err(VcpuError::PauseTimeout { missing, timeout });
        }
        self.request(Request::Pause);
        Ok(())
    }

    /// Waits at most `timeout` for `done` to hold; returns the state and whether it held.
    fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&ControlState) -> bool,
    ) -> (MutexGuard<'_, ControlState>, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !done(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (st, false);
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        (st, true)
    }

    /// In the bridge after a take-over: the (parked) continuation loops exit.
    pub fn end_bridged(&self) {
        self.exit();
    }

    /// Takes the guest requests and failures that continuations recorded.
    pub fn take_bridged_events(&self) -> Vec<VcpuEvent> {
        std::mem::take(
            &mut *self
                .bridged_events
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Stops every vCPU and waits until all are parked.
    pub fn pause(&self, count: usize, timeout: Duration) -> Result<(), VcpuError> {
        self.request(Request::Pause);
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.parked < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing = count - st.parked;
                drop(st);
                self.request(Request::Run);
                return Err(VcpuError::PauseTimeout { missing, timeout });
            }
            st = self
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if st.parked < count {
                drop(st);
                // A kick can race with a thread entering KVM_RUN; kick again until all are parked.
                self.kick_all();
                st = self.lock();
            }
        }
        Ok(())
    }

    /// Called by a vCPU thread that must stop the whole VM itself (guest suspend or poweroff).
    pub fn pause_from_vcpu(&self) {
        self.request(Request::Pause);
        self.kick_all();
    }

    /// Lets every vCPU run.
    pub fn resume(&self) {
        self.first_run_ns.store(0, Ordering::Release);
        self.request(Request::Run);
    }

    /// CLOCK_MONOTONIC (ns) at which the first vCPU left its park to enter the guest after the
    /// last [`VcpuControl::resume`], waiting at most `timeout` for it.
    pub fn first_run_ns(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let ns = self.first_run_ns.load(Ordering::Acquire);
            if ns != 0 {
                return Some(ns);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    fn exit(&self) {
        let mut st = self.lock();
        st.request = Request::Exit;
        self.pause_flag.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU loop while a pause is requested, after `before_park`, and says what
    /// to do next. A loop on its thread (`on_thread`) may be told to detach; a loop in a
    /// continuation is told to exit when its thread takes it back.
    fn park_if_requested(&self, on_thread: bool, before_park: impl FnOnce()) -> Park {
        if !self.pause_flag.load(Ordering::Acquire) {
            // A thread that first gets here after the resume never parked: it enters now.
            if self.first_run_ns.load(Ordering::Relaxed) == 0 {
                self.note_first_run();
            }
            return Park::Run;
        }
        before_park();
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        let next = loop {
            match st.request {
                Request::Run => break Park::Run,
                Request::Exit => break Park::Exit,
                Request::Detach if on_thread => break Park::Detach,
                Request::Reattach if !on_thread => break Park::Exit,
                _ => st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        };
        st.parked -= 1;
        self.changed.notify_all();
        drop(st);
        if next == Park::Run {
            self.note_first_run();
        }
        next
    }

    fn note_first_run(&self) {
        let _ = self.first_run_ns.compare_exchange(
            0,
            cpr_common::cpr::monotonic_ns(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn detached_one(&self, delta: isize, failure: Option<String>) {
        let mut st = self.lock();
        st.detached = st.detached.saturating_add_signed(delta);
        if failure.is_some() {
            st.detach_failed = failure;
        }
        self.changed.notify_all();
    }
}

fn pthread_self() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// What a vCPU thread reports to the VM.
#[derive(Debug, Clone)]
pub enum VcpuEvent {
    /// The guest asked for a power state change.
    Guest(GuestRequest),
    /// The vCPU hit an error it cannot go on from.
    Failed {
        /// vCPU index.
        id: u8,
        /// What happened.
        reason: String,
    },
}

impl From<VcpuEvent> for cpr_common::cpr::BridgedEvent {
    fn from(e: VcpuEvent) -> Self {
        use cpr_common::cpr::BridgedEvent as B;
        match e {
            VcpuEvent::Guest(GuestRequest::PowerOff) => B::PowerOff,
            VcpuEvent::Guest(GuestRequest::Suspend) => B::Suspend,
            VcpuEvent::Guest(GuestRequest::Reset(why)) => B::Reset(why),
            VcpuEvent::Failed { id, reason } => B::Failed { vcpu: id, reason },
        }
    }
}

impl From<cpr_common::cpr::BridgedEvent> for VcpuEvent {
    fn from(e: cpr_common::cpr::BridgedEvent) -> Self {
        use cpr_common::cpr::BridgedEvent as B;
        match e {
            B::PowerOff => VcpuEvent::Guest(GuestRequest::PowerOff),
            B::Suspend => VcpuEvent::Guest(GuestRequest::Suspend),
            B::Reset(why) => VcpuEvent::Guest(GuestRequest::Reset(why)),
            B::Failed { vcpu, reason } => VcpuEvent::Failed { id: vcpu, reason },
        }
    }
}

/// A running set of vCPU threads.
pub struct VcpuSet {
    /// The vCPU fds, for state save/restore while paused.
    pub fds: Vec<Arc<Mutex<VcpuFd>>>,
    /// The pause/resume control.
    pub control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    /// The vCPU fds' numbers (readable without taking the locks a running vCPU holds).
    raw_fds: Vec<libc::c_int>,
}

impl VcpuSet {
    /// Starts one parked thread per vCPU.
    pub fn start(
        fds: Vec<VcpuFd>,
        devices: Arc<Devices>,
        events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
    ) -> Result<VcpuSet, VcpuError> {
        let control = VcpuControl::new_paused();
        let raw_fds = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let fds: Vec<_> = fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let mut threads = Vec::new();
        for (i, fd) in fds.iter().enumerate() {
            let id = i as u8;
            let (fd, control, devices, events) =
                (fd.clone(), control.clone(), devices.clone(), events.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run_vcpu(id, fd, control, devices, events))
                .map_err(|source| VcpuError::Spawn { id, source })?;
            threads.push(handle);
        }
        let set = VcpuSet {
            fds,
            control,
            threads,
            raw_fds,
        };
        {
            let mut list = set
                .control
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            list.extend(
                set.threads
                    .iter()
                    .map(|t| KickTarget::Thread(t.as_pthread_t())),
            );
        }
        Ok(set)
    }

    /// The vCPU fds' numbers.
    pub fn raw_fds(&self) -> &[libc::c_int] {
        &self.raw_fds
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.fds.len()
    }

    /// Stops the threads and waits for them.
    pub fn shutdown(&mut self) {
        self.control.exit();
        self.control.kick_all();
        self.control
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a vCPU loop works with; cloned into a continuation when the loop is detached.
#[derive(Clone)]
struct VcpuLoop {
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    devices: Arc<Devices>,
    events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
}

fn run_vcpu(
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    devices: Arc<Devices>,
    events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
) {
    let ctx = VcpuLoop {
        id,
        fd,
        control,
        devices,
        events,
    };
    {
        let mut vcpu = ctx.fd.lock().unwrap_or_else(|e| e.into_inner());
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|r| r.set(run));
    }
    while ctx.run(true) == Park::Detach {
        ctx.continue_in_child();
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

impl VcpuLoop {
    /// Runs the loop in a continuation child until it is reattached (or, after an exec, for good):
    /// this thread only waits. The child keeps this thread's TLS, so the kick handler finds the
    /// same `kvm_run`.
    fn continue_in_child(&self) {
        let keep = self
            .control
            .detach_keep
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let started = crate::sys::continuation::Continuation::start(
            self.clone(),
            |child| {
                child.run(false);
                // Dropping the handles could wake the event channel's receiver, whose runtime
                // may be gone after the exec: leave them to the address space's end.
                std::mem::forget(child);
            },
            &keep,
        );
        match started {
            Ok(c) => {
                self.control
                    .set_kick_target(self.id, KickTarget::Task(c.pid()));
                self.control.detached_one(1, None);
                c.wait();
                self.control
                    .set_kick_target(self.id, KickTarget::Thread(pthread_self()));
                self.control.detached_one(-1, None);
            }
            Err((e, _)) => self
                .control
                .detached_one(0, Some(format!("vCPU {}: {e}", self.id))),
        }
    }

    fn report(&self, event: VcpuEvent, on_thread: bool) {
        if on_thread {
            let _ = self.events.send(event);
        } else {
            self.control
                .bridged_events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(event);
        }
    }

    /// The vCPU loop, until it is told to exit or (on its thread) to detach.
    fn run(&self, on_thread: bool) -> Park {
        let (id, fd, control, devices) = (self.id, &self.fd, &self.control, &self.devices);
        let fail = |reason: String| {
            if on_thread {
                error!(vcpu = id, %reason, "vCPU stopped");
            }
            control.pause_from_vcpu();
            self.report(VcpuEvent::Failed { id, reason }, on_thread);
        };
        // Whether the last exit was port or MMIO I/O, which KVM finishes (RIP past the instruction,
        // an IN's value in its register) only on the next KVM_RUN.
        let mut io_pending = false;
        let complete_io = |pending: &mut bool| {
            if std::mem::take(pending) {
                complete_pending_io(&mut fd.lock().unwrap_or_else(|e| e.into_inner()));
            }
        };
        loop {
            match control.park_if_requested(on_thread, || complete_io(&mut io_pending)) {
                Park::Run => {}
                other => return other,
            }
            let mut vcpu = fd.lock().unwrap_or_else(|e| e.into_inner());
            let exit = vcpu.run();
            io_pending = matches!(
                exit,
                Ok(VcpuExit::IoOut(..)
                    | VcpuExit::IoIn(..)
                    | VcpuExit::MmioRead(..)
                    | VcpuExit::MmioWrite(..))
            );
            let request = match exit {
                Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
                Ok(VcpuExit::IoIn(port, data)) => {
                    devices.pio_read(port, data);
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) if devices.mmio_write(addr, data) => None,
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !devices.mmio_read(addr, data) {
                        debug!(
                            vcpu = id,
                            addr = format!("{addr:#x}"),
                            "read from unassigned MMIO"
                        );
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, _)) => {
                    debug!(
                        vcpu = id,
                        addr = format!("{addr:#x}"),
                        "write to unassigned MMIO"
                    );
                    None
                }
                Ok(e @ (VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen)) => {
                    tracing::trace!(vcpu = id, exit = ?e, "vCPU exit");
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(GuestRequest::Reset(format!(
                    "triple fault ({})",
                    describe_cpu(&vcpu)
                ))),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    Some(GuestRequest::Reset(format!("KVM system event {kind}")))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    drop(vcpu);
                    fail(format!(
                        "KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"
                    ));
                    continue;
                }
                Ok(VcpuExit::InternalError) => {
                    let suberror = internal_error_suberror(vcpu.get_kvm_run());
                    let at = describe_cpu(&vcpu);
                    drop(vcpu);
                    fail(format!(
                        "KVM internal error (suberror {suberror}) at {at}: the guest ran an instruction KVM cannot emulate here"
                    ));
                    continue;
                }
                Ok(other) => {
                    debug!(vcpu = id, exit = ?other, "unhandled vCPU exit ignored");
                    None
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => {
                    drop(vcpu);
                    fail(format!("KVM_RUN failed: {e}"));
                    continue;
                }
            };
            if let Some(request) = request {
                drop(vcpu);
                // Stop every vCPU before this one can run past the guest's request.
                control.pause_from_vcpu();
                self.report(VcpuEvent::Guest(request), on_thread);
            }
        }
    }
}

/// Finishes an I/O exit before the vCPU parks, so that saved state never points at a half-done
/// instruction (a restored guest would repeat an OUT or lose an IN's value): KVM_RUN with
/// `immediate_exit` completes it and returns EINTR without running guest code (KVM API, "kvm_run").
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        other => {
            debug!(result = ?other.map(|_| ()), "completing an I/O exit returned something else")
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

fn internal_error_suberror(run: &kvm_run) -> u32 {
    // SAFETY: called only after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
    // `internal` member of the exit union.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// Where a vCPU is, for error messages about a guest that crashed.
fn describe_cpu(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "registers unavailable".into(),
    }
}
