//! Test harness for weft's root-only integration tests.
//!
//! A [`Testbed`] builds "nodes" and "pods" out of network namespaces joined by veths, puts each pod in
//! its own cgroup v2, and runs processes inside them. Everything it creates is named after the
//! testbed's unique id, so tests run in parallel, and it is torn down when the testbed is dropped.
//!
//! Layout (node index `i`, pod number `k` on that node, link number `x`):
//!
//! ```text
//!   pod netns <id>-<node>-<pod>            node netns <id>-<node>                  node netns
//!   eth0 10.244.i.(10+k)/24 ---veth--- v<k>-<pod> -> br0 10.244.i.1/24   ul<x> 172.30.x.i/24 ---veth--- ul<x> ...
//!   default via 10.244.i.1                                               route 10.244.j.0/24 via 172.30.x.j
//! ```
//!
//! Helpers panic with what failed and what to check instead of returning errors, because their
//! callers are tests. Nothing is ever attached to the machine's own (root) network namespace.
#![forbid(unsafe_code)]

pub mod agent;
pub mod kube_api;
mod proc;
pub mod probe;
pub mod steal;
mod sys;
mod testbed;

pub use proc::{Proc, wait_for_tcp};
pub use sys::clean_up_on_signal;
pub use testbed::{Node, Pod, Testbed};
