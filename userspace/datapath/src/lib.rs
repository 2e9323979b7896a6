//! weft's datapath: loads the kernel programs, pins maps and links under bpffs, attaches the
//! programs to meshed workloads' cgroups, and keeps the maps equal to the compiled config.
//!
//! Pin layout under the instance's pin root (default `/sys/fs/bpf/weft/default`):
//! - `maps/<name>`: every map, so state survives the agent;
//! - `links/<cgroup id>/<program>`: one link per program and meshed cgroup, so programs stay
//!   attached while the agent is down; a restarted agent adopts what it finds.

mod attach;
mod error;
mod loader;
mod read;
mod sync;

pub use error::Error;
pub use attach::Netns;
pub use loader::{Config, Datapath, SkMsgMode};
pub use read::{FlowRecord, OrigDstReader, OrigDstRecord};
pub use sync::SyncReport;

/// The kernel object, built by `build.rs`.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));
