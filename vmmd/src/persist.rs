//! One seam through which every device, the vCPUs and the KVM VM save and restore their state, in the
//! spirit of Firecracker's `Persist` and Cloud Hypervisor's `Snapshottable`.
//!
//! - `save` reads the live object into plain data (`State`), which goes into the state file as one
//!   part of [`crate::state::VmState`]. The state file's format version covers every `State`: a change
//!   to one of them is a new format version, with a migration from the previous one
//!   (`crate::state::versions`).
//! - `restore` builds the object (or loads it into the kernel object it wraps) from a `State` plus
//!   what the new process already has: its KVM VM, fds it inherited, guest memory. These are the
//!   `ConstructorArgs`.
//!
//! The CPR hand-over carries only fds and process facts; everything the guest can observe is in a
//! `State`.
//!
//! Queue state of the virtio devices (ring addresses, next-avail, next-used, event-idx, features,
//! status, the MSI-X table) is designed to be a `State` like any other; the queues' owners convert
//! `virtio_queue::QueueState` to and from a serde mirror in their `save`/`restore`.

/// Save to a serde state; restore from it plus constructor arguments.
pub trait Persist: Sized {
    /// The saved form: plain data, serialized into the versioned state file.
    type State: serde::Serialize + serde::de::DeserializeOwned;
    /// What restoring needs besides the state (the KVM VM, inherited fds, guest memory, ...).
    type ConstructorArgs;
    /// Why saving or restoring failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads the object's state. The guest is paused (or the object is not in use).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// Builds the object from a saved state, before the guest runs.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
