//! weft's pure core: a [`Snapshot`] of the desired state goes in, the kernel map entries (and a
//! list of rejected objects) come out of [`compile`]. No I/O, so every rule here is unit-tested
//! without a cluster or a kernel.
#![forbid(unsafe_code)]

pub mod compile;
pub mod model;

pub use compile::*;
pub use model::*;
