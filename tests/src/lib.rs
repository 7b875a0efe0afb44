//! Test equipment for vmmd: start vmmd on the test guest, drive it over gRPC, watch its console.
//!
//! Used by the end-to-end tests in `tests/tests/` and by the `cpr-bench` benchmark. Everything
//! here runs on real KVM and needs `cargo build` (vmmd, cprctl, cpr-testguest) first.

pub mod api;
pub mod bins;
pub mod brownout;
pub mod console;
pub mod cpr;
pub mod dir;
pub mod fleet;
pub mod guest;
pub mod qemu;
pub mod reboot;
pub mod smaps;
pub mod svg;
pub mod vmmd;

pub use api::Api;
pub use console::Console;
pub use dir::TestDir;
pub use guest::{Counters, Ready, Verify};
pub use vmmd::{VmmdOptions, VmmdProcess};
pub use vmmd_proto::v1::{MigrationInfo, MigrationMode, MigrationStatus, RunState, UpdateState};
