//! VFIO for real: `tests/vfio-tcg/vfio-e2e.sh --edu 2` boots Debian's kernel under QEMU TCG with an
//! emulated Intel IOMMU and two `edu` PCI devices bound to vfio-pci, and runs vmmd there (on the
//! nested KVM that TCG's SVM emulation provides) with both devices passed through, each in its own
//! type1 container. The guest DMAs through edu and takes its interrupts (MSI, then INTx with
//! `msi=off`) before and after a live update; a repeated VADDR invalidation, which the real kernel refuses, is rolled back first.
//! Its output goes straight to the test log (lines `VFIO-E2E ...`).
//!
//! Needs `qemu-system-x86_64` (Debian bookworm-backports `qemu-system-x86`, QEMU 10) and apt
//! access to download the kernel and busybox packages (cached under /var/cache/cpr-tests). Where
//! they are missing the test says SKIPPED and why; `CPR_REQUIRE_VFIO_TCG=1` makes that a failure.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn vfio_devices_keep_dma_and_interrupts_across_a_live_update_under_tcg() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let required = std::env::var("CPR_REQUIRE_VFIO_TCG").is_ok_and(|v| v == "1");
    let skip = |why: &str| {
        assert!(
            !required,
            "the VFIO TCG test cannot run ({why}) and CPR_REQUIRE_VFIO_TCG=1 requires it"
        );
        eprintln!("\n*** SKIPPED vfio_devices_keep_dma_and_interrupts_across_a_live_update_under_tcg: {why} ***\n");
    };
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return skip("qemu-system-x86_64 is not installed (apt-get install -t bookworm-backports qemu-system-x86)");
    }
    let bin_dir = cpr_tests::bins::vmmd()
        .parent()
        .expect("vmmd has a directory")
        .to_path_buf();
    let _ = (cpr_tests::bins::cprctl(), cpr_tests::bins::testguest());
    let out = Command::new("timeout")
        .args(["--kill-after=20", "900"])
        .arg(repo.join("tests/vfio-tcg/vfio-e2e.sh"))
        .args(["--edu", "2"])
        .env("CPR_BIN_DIR", &bin_dir)
        .output()
        .expect("cannot run tests/vfio-tcg/vfio-e2e.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    if stderr.contains("build-initramfs: error") && stderr.contains("apt") {
        return skip("the kernel or busybox package could not be fetched with apt (see above)");
    }
    assert!(
        out.status.success(),
        "the VFIO end-to-end run failed ({}); its output is above",
        out.status
    );
    for line in [
        "VFIO-E2E dma before the updates: DMA OK",
        "VFIO-E2E dma after the refused update: DMA OK",
        "VFIO-E2E dma after the update: DMA OK",
        "VFIO-E2E intx: dma after the update: DMA OK",
        "VFIO-E2E PASS",
    ] {
        assert!(
            stdout.contains(line),
            "missing {line:?} in the run's output"
        );
    }
}
