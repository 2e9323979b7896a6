//! weft's pure core: a [`Snapshot`] of the desired state goes in, the kernel map entries (and a
//! list of rejected objects) come out of [`compile`]. No I/O, so every rule here is unit-tested
//! without a cluster or a kernel. [`authz`] decides requests against the compiled policies.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod authz;
pub mod compile;
pub mod model;

pub use authz::AuthzTable;
pub use compile::*;
pub use model::*;
