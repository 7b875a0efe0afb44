//! Generated gRPC types for the vmmd control API (`vmmd.v1`).

#![allow(clippy::all, missing_docs)]

/// `vmmd.v1`: messages, the `Vmm` client and server.
pub mod v1 {
    tonic::include_proto!("vmmd.v1");
}

/// Encoded `FileDescriptorSet` of `vmmd.proto`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vmmd_descriptor");

/// The service name health checks use.
pub const SERVICE_NAME: &str = "vmmd.v1.Vmm";
