//! Booting a kernel image.

pub mod acpi;
pub mod pvh;
