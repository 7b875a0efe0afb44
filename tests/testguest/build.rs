//! Links the test guest as a freestanding, static, non-PIE ELF at 1 MiB (see `link.ld`).
//!
//! The guest is built for the host target (`x86_64-unknown-linux-gnu`) because that is the only
//! standard library this toolchain has; `#![no_std]` + `#![no_main]` and these arguments turn it
//! into a bare-metal image: no C runtime, no libc, our own entry point and memory layout.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        &format!("-Wl,-T,{dir}/link.ld"),
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
        "-Wl,-z,norelro",
        "-Wl,--no-eh-frame-hdr",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
