//! What `vmmd` and `cprctl` must agree on: migration modes and URIs, byte sizes, and the state-file format.

pub mod mode;
pub mod size;
pub mod state;
pub mod uri;

pub use mode::MigrationMode;
pub use size::{parse_size, SizeError};
pub use uri::{MigrationUri, UriError};
