//! weft's kernel programs. One file per hook; every map is in `maps.rs`.
//!
//! Fail-open vs fail-closed is decided once per hook, in its entry point, with a comment.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values shared between CPUs (the BPF target has no `fetch_add` in core).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", expect(internal_features, reason = "atomic_xadd: no fetch_add on BPF"))]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod atomic {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};

    /// `*dst += value` as one BPF atomic add.
    ///
    /// # Safety
    /// `dst` must point into a live map value, 8-byte aligned.
    #[inline(always)]
    pub unsafe fn add(dst: *mut u64, value: u64) {
        // SAFETY: upheld by the caller.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, value) };
    }
}
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}

// GPL-compatible so every helper is available to us.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
