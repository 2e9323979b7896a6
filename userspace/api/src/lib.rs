//! weft's edge to the outside: Kubernetes-shaped objects (core Services, EndpointSlices, Pods and
//! Nodes, Gateway API routes, weft's own CRDs) read, validated and converted into
//! [`weft_policy`]'s model.
#![forbid(unsafe_code)]

pub mod convert;
pub mod crd;
pub mod load;
pub mod snapshot;

pub use load::{ConfigError, LoadError, Loaded, load_dir, load_paths};
pub use snapshot::{Convert, Object, ObjectError, SnapshotBuilder};
