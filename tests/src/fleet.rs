//! Several vmmd processes on one "host": their API sockets in one directory (as `/run/vmmd`), each
//! with its own console, booted in parallel; and a vmmd whose update is blocked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmmd_proto::v1::{InfoResponse, RunState};

use crate::cpr::wait_settled;
use crate::vmmd::{CONSOLE_TIMEOUT, READY_TIMEOUT};
use crate::{Console, TestDir, Verify, VmmdOptions, VmmdProcess};

/// How long a vmmd may take to settle after an update.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One VM of the fleet and what its guest said at boot.
pub struct FleetVm {
    /// Its name: the API socket is `<socket dir>/<name>.sock`.
    pub name: String,
    /// The vmmd process.
    pub vmm: VmmdProcess,
    /// Its console, connected since boot.
    pub console: Console,
    /// The guest's VERIFY hash at boot.
    pub hash: String,
}

impl FleetVm {
    /// Info once vmmd has settled.
    pub fn info(&self) -> InfoResponse {
        wait_settled(&self.vmm.api_socket, SETTLE_TIMEOUT)
    }

    /// The guest runs and its memory is what it was at boot; returns Info.
    pub fn assert_runs_intact(&mut self, context: &str) -> InfoResponse {
        let info = self.info();
        assert_eq!(
            info.run_state,
            RunState::Running as i32,
            "{context}: {} is not running: {info:?}",
            self.name
        );
        assert_eq!(
            info.pid,
            self.vmm.pid(),
            "{context}: {}: another process",
            self.name
        );
        assert_eq!(
            self.console.verify(),
            Verify::Ok(self.hash.clone()),
            "{context}: {}: guest memory is not what it was at boot",
            self.name
        );
        info
    }
}

/// What one VM of a fleet is started with.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Its name.
    pub name: String,
    /// More vmmd arguments.
    pub extra_args: Vec<String>,
}

impl VmSpec {
    /// A plain VM called `name`.
    pub fn plain(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            extra_args: Vec::new(),
        }
    }

    /// A VM called `name` with a passthrough device (vmmd's VFIO model) on a host kernel without
    /// VFIO_UPDATE_VADDR: vmmd reports a cpr-exec blocker, so its update is refused.
    pub fn update_blocked(name: &str, dir: &Path) -> Self {
        let dev = dir.join(format!("{name}-sys")).join("0000:00:03.0");
        std::fs::create_dir_all(&dev).expect("mkdir fake sysfs device");
        std::os::unix::fs::symlink("../../groups/20", dev.join("iommu_group"))
            .expect("symlink iommu_group");
        Self {
            name: name.to_owned(),
            extra_args: vec![
                "--device".into(),
                format!("vfio={},container=c0", dev.display()),
                "--vfio-model".into(),
                dir.join(format!("{name}-vfio-model.json"))
                    .display()
                    .to_string(),
                "--vfio-model-without-vaddr".into(),
            ],
        }
    }
}

/// Boots one VM per spec with its API socket in `socket_dir` and its console and log in `dir`;
/// in the specs' order. The processes start on this thread (vmmd dies with the thread that
/// started it: PR_SET_PDEATHSIG); the guests fill their RAM and come up in parallel.
pub fn boot_fleet(dir: &Arc<TestDir>, socket_dir: &Path, specs: &[VmSpec]) -> Vec<FleetVm> {
    std::fs::create_dir_all(socket_dir).expect("mkdir socket dir");
    let vmms: Vec<VmmdProcess> = specs
        .iter()
        .map(|spec| {
            let socket: PathBuf = socket_dir.join(format!("{}.sock", spec.name));
            let mut opts = VmmdOptions::new(1, "64M")
                .in_dir(dir)
                .api_socket(socket)
                .console(dir.join(&format!("{}.console", spec.name)));
            opts.extra_args = spec.extra_args.clone();
            VmmdProcess::spawn(opts)
        })
        .collect();
    let waits: Vec<_> = vmms
        .iter()
        .map(|vmm| {
            let path = vmm.console_socket.clone();
            std::thread::spawn(move || {
                let mut console = Console::connect(&path, CONSOLE_TIMEOUT);
                console.wait_for_line("READY", READY_TIMEOUT);
                let hash = console.verify().expect_ok();
                (console, hash)
            })
        })
        .collect();
    vmms.into_iter()
        .zip(waits)
        .zip(specs)
        .map(|((vmm, wait), spec)| {
            let (console, hash) = wait.join().expect("a guest did not come up");
            FleetVm {
                name: spec.name.clone(),
                vmm,
                console,
                hash,
            }
        })
        .collect()
}
