//! The test guest boots on real KVM with 1 and 2 vCPUs, beats and verifies its memory.

use std::time::{Duration, Instant};

use cpr_tests::{RunState, VmmdOptions, VmmdProcess};

fn boots_with(vcpus: u32) {
    let (vmm, mut console, ready) = VmmdProcess::boot(VmmdOptions::new(vcpus, "64M"));
    assert_eq!(ready.cpus, vcpus, "READY reports the wrong vCPU count");
    assert_eq!(ready.ram_mib, 64, "READY reports the wrong RAM size");
    assert_eq!(vmm.api().run_state(), RunState::Running);

    let since = Instant::now();
    assert!(
        console.wait_for_heartbeats(since, 100, Duration::from_secs(30)),
        "fewer than 100 heartbeats in 30 s; console: {}",
        console.output_tail(300)
    );

    let counters = console.counters();
    assert_eq!(counters.cpus, vcpus, "COUNTERS: {counters:?}");
    assert_eq!(
        counters.iters.len(),
        vcpus as usize,
        "COUNTERS: {counters:?}"
    );
    assert_eq!(counters.seed, ready.seed);
    assert_eq!(counters.fails, 0);
    // Every vCPU runs guest code: its iteration counter moves.
    let later = console.counters();
    for (cpu, (b, a)) in later.iters.iter().zip(&counters.iters).enumerate() {
        assert!(
            b > a,
            "cpu{cpu} made no progress: {counters:?} -> {later:?}"
        );
    }

    console.verify().expect_ok();
    assert_eq!(console.failures(), Vec::<String>::new());
}

#[test]
fn boots_with_one_vcpu() {
    boots_with(1);
}

#[test]
fn boots_with_two_vcpus() {
    boots_with(2);
}

#[test]
fn guest_poweroff_makes_vmmd_exit() {
    let (mut vmm, mut console, _) = VmmdProcess::boot(VmmdOptions::new(1, "64M"));
    console.command(b'q');
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("vmmd still running 30 s after the guest powered off"));
    assert!(
        status.success(),
        "vmmd exited with {status}; log:\n{}",
        vmm.log()
    );
}
