//! weft's edge to the outside: Kubernetes-shaped YAML (core Services and EndpointSlices, weft's
//! own CRDs) read, validated and converted into [`weft_policy`]'s model.
#![forbid(unsafe_code)]

pub mod convert;
pub mod crd;
pub mod load;

pub use load::{ConfigError, LoadError, Loaded, load_dir, load_paths};
