//! The guest's S3 suspend puts the VM in `suspended`; SystemWakeup resumes it.

use std::time::{Duration, Instant};

use cpr_tests::{RunState, VmmdOptions, VmmdProcess};

#[test]
fn guest_suspend_and_system_wakeup() {
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(2, "64M"));
    let before = console.counters();

    // Waking a running VM is refused.
    let err = vmm
        .api()
        .wakeup()
        .expect_err("SystemWakeup of a running VM");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    console.command(b's');
    vmm.api()
        .wait_for_run_state(RunState::Suspended, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        console.heartbeats_since(quiet_from),
        0,
        "heartbeats while suspended; console: {}",
        console.output_tail(200)
    );
    assert_eq!(vmm.api().run_state(), RunState::Suspended);
    // Resume is not how a suspended guest wakes up; vmmd says what to use.
    let err = vmm.api().resume().expect_err("Resume of a suspended guest");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("wakeup"), "{err:?}");
    assert_eq!(vmm.api().run_state(), RunState::Suspended);

    assert_eq!(vmm.api().wakeup().expect("SystemWakeup"), RunState::Running);
    console.wait_for_line("WAKE", Duration::from_secs(30));
    assert!(
        console.wait_for_heartbeats(Instant::now(), 50, Duration::from_secs(30)),
        "no heartbeats after wakeup; console: {}",
        console.output_tail(200)
    );
    let after = console.counters();
    after.assert_continues(&before);
    assert_eq!(
        after.suspends,
        before.suspends + 1,
        "{before:?} -> {after:?}"
    );
    console.verify().expect_ok();
    assert_eq!(console.failures(), Vec::<String>::new());
}
