//! Locating the workspace's built binaries.

use std::path::PathBuf;

/// The directory holding `vmmd`, `cprctl` and `cpr-testguest` for the running profile.
///
/// `CPR_BIN_DIR` overrides it. Otherwise it is derived from the running executable: a test is
/// `<target>/<profile>/deps/<name>-<hash>`, a binary such as `cpr-bench` is `<target>/<profile>/<name>`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CPR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot find the running executable's path");
    let mut dir = exe
        .parent()
        .expect("the running executable has no parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The path of the built binary `name`; panics with what to run when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build` (same profile as the tests, e.g. `cargo build --release` \
         for `cargo test --release`) before running these tests, or set CPR_BIN_DIR",
        path.display()
    );
    path
}

/// The `vmmd` daemon.
pub fn vmmd() -> PathBuf {
    binary("vmmd")
}

/// The `cprctl` CLI.
pub fn cprctl() -> PathBuf {
    binary("cprctl")
}

/// The test guest kernel.
pub fn testguest() -> PathBuf {
    binary("cpr-testguest")
}
