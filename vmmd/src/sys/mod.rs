//! The bottom layer: process and fd mechanisms that know nothing of the VM.

pub mod fd;
