//! weft's kernel programs live in the `weft` binary target (see `main.rs`); this library only
//! exists so host builds can depend on the crate.
#![no_std]
