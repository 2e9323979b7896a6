//! Builds the kernel object (crate `weft-ebpf`) with aya-build and leaves it in OUT_DIR, where
//! `src/lib.rs` embeds it. This is the only path by which the agent gets its programs; compiler
//! errors from the kernel crate show up as `warning:` lines of this build script.
fn main() -> aya_build::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = format!("{manifest}/../../ebpf/programs");
    aya_build::build_ebpf(
        [aya_build::Package { name: "weft-ebpf", root_dir: &root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
