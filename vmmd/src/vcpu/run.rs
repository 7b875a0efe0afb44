//! The vCPU loop: `KVM_RUN`, exit handling, and the kick that gets a vCPU out of the guest.

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error};

use crate::devices::{Devices, GuestRequest};

use super::control::{pthread_self, KickTarget, Park, VcpuControl};
use super::{VcpuError, VcpuEvent};

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

/// What a vCPU loop works with; cloned into a continuation when the loop is detached.
#[derive(Clone)]
struct VcpuLoop {
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    control: Arc<VcpuControl>,
    devices: Arc<Devices>,
    events: tokio::sync::mpsc::UnboundedSender<VcpuEvent>,
}

/// The body of vCPU thread `id`: its loop, moved into a continuation whenever it is told to detach.
pub(super) fn run_vcpu(
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
        let on_move = |pid: Option<libc::pid_t>| {
            let target = pid.map_or_else(|| KickTarget::Thread(pthread_self()), KickTarget::Task);
            self.control.set_kick_target(self.id, target);
        };
        // A loop that could not move stays parked here; the controller learns why.
        let _ = self
            .control
            .relocation
            .run_moved(self.clone(), run_in_child, on_move);
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

/// The loop in a continuation child, until its thread takes it back or it is told to exit.
fn run_in_child(child: VcpuLoop) {
    child.run(false);
    // Dropping the handles could wake the event channel's receiver, whose runtime may be gone
    // after the exec: leave them to the address space's end.
    std::mem::forget(child);
}
