//! Booting a kernel image.

pub mod pvh;
