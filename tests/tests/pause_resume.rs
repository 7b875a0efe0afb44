//! Pause stops the guest (no heartbeats) and resume restarts it.

use std::time::{Duration, Instant};

use cpr_tests::{RunState, VmmdOptions, VmmdProcess};

/// Bytes the guest emitted just before the pause may still be on their way.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(200);
/// How long the guest must stay silent while paused.
const SILENCE: Duration = Duration::from_millis(500);

#[test]
fn pause_stops_heartbeats_and_resume_restarts_them() {
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(2, "64M"));
    let before = console.counters();

    assert_eq!(vmm.api().pause().expect("Pause"), RunState::Paused);
    assert_eq!(vmm.api().run_state(), RunState::Paused);
    std::thread::sleep(IN_FLIGHT_GRACE);
    let quiet_from = Instant::now();
    std::thread::sleep(SILENCE);
    let quiet_to = Instant::now();
    assert_eq!(
        console.heartbeats_since(quiet_from),
        0,
        "heartbeats arrived while paused; console: {}",
        console.output_tail(200)
    );
    assert!(console.max_heartbeat_gap(quiet_from, quiet_to) >= SILENCE);
    // Pause is idempotent: a second one keeps the VM paused.
    assert_eq!(vmm.api().pause().expect("second Pause"), RunState::Paused);
    assert_eq!(
        console.heartbeats_since(quiet_from),
        0,
        "heartbeats after a second Pause"
    );

    assert_eq!(vmm.api().resume().expect("Resume"), RunState::Running);
    assert_eq!(vmm.api().run_state(), RunState::Running);
    let resumed = Instant::now();
    assert!(
        console.wait_for_heartbeats(resumed, 50, Duration::from_secs(30)),
        "no heartbeats after resume; console: {}",
        console.output_tail(200)
    );
    let after = console.counters();
    after.assert_continues(&before);
    console.verify().expect_ok();
    assert_eq!(console.failures(), Vec::<String>::new());
}

#[test]
fn pause_of_a_vm_waiting_for_migration_is_refused() {
    let vmm = VmmdProcess::spawn(VmmdOptions::new(1, "64M").incoming("defer"));
    let err = vmm
        .api()
        .pause()
        .expect_err("Pause while inmigrate must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("inmigrate"), "{err:?}");
    let err = vmm
        .api()
        .resume()
        .expect_err("Resume while inmigrate must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(vmm.api().run_state(), RunState::Inmigrate);
}

/// The guest's own clock (its largest TSC gap between two loop iterations, per vCPU) sees a pause
/// as the stall it is, and `g` makes it forget.
#[test]
fn the_guest_measures_a_pause_as_its_largest_gap() {
    const PAUSE: Duration = Duration::from_secs(1);
    let pause_us = PAUSE.as_micros() as u64;
    let (vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(2, "64M"));
    console.reset_gaps();
    let quiet = console.counters();
    assert_eq!(quiet.maxgap_us.len(), 2, "{quiet:?}");
    assert!(
        quiet.maxgap_us.iter().all(|&g| g < pause_us),
        "gaps while running: {quiet:?}"
    );

    assert_eq!(vmm.api().pause().expect("Pause"), RunState::Paused);
    std::thread::sleep(PAUSE);
    assert_eq!(vmm.api().resume().expect("Resume"), RunState::Running);
    // Each vCPU notes the gap at the end of its first iteration after the resume: on a busy host
    // that may take a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let paused = loop {
        let c = console.counters();
        if c.maxgap_us.iter().all(|&g| g >= pause_us * 9 / 10) || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for (cpu, &gap) in paused.maxgap_us.iter().enumerate() {
        assert!(
            gap >= pause_us * 9 / 10,
            "vCPU {cpu} saw at most {gap} us standing still across a {PAUSE:?} pause: {paused:?}"
        );
    }
    paused.assert_continues(&quiet);

    console.reset_gaps();
    let after = console.counters();
    assert!(
        after.maxgap_us.iter().all(|&g| g < pause_us),
        "the gaps were not reset: {after:?}"
    );
    console.verify().expect_ok();
}
