//! Rebuilds when the version override changes (see `vm::VERSION`).
fn main() {
    println!("cargo:rerun-if-env-changed=VMMD_BUILD_VERSION");
}
