//! The CRDs in manifests/crds/ are exactly what the Rust types generate.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/crds");
    for (file, crd) in weft_api::crd::all() {
        let path = dir.join(file);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask codegen`", path.display()));
        assert!(
            on_disk == weft_api::crd::render(&crd),
            "{} is out of date with userspace/api/src/crd.rs; run `cargo xtask codegen` and commit the result",
            path.display()
        );
    }
}
