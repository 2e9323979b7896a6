//! The sample configs shipped in manifests/ load without errors and compile without rejections.

use std::path::Path;

use weft_policy::NodeSettings;

#[test]
fn standalone_samples_load_and_compile_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/samples/standalone");
    // As run with `--proxy-addr`: the route, TrafficPolicy and JwtPolicy need the node proxy.
    let node = NodeSettings { proxy: Some("10.244.1.1:15001".parse().expect("an address")), ..NodeSettings::default() };
    let loaded = weft_api::load_dir(&dir, node).expect("sample dir readable");
    assert!(loaded.errors.is_empty(), "sample errors: {:?}", loaded.errors);
    assert!(loaded.objects >= 5, "objects loaded: {}", loaded.objects);
    let compiled = weft_policy::compile(&loaded.snapshot);
    assert!(compiled.rejected.is_empty(), "rejections: {:?}", compiled.rejected);
    let reviews = compiled.services.values().find(|s| s.service.name == "reviews").expect("reviews compiled");
    let weights: Vec<u32> = reviews.backends.iter().map(|b| b.weight_end).collect();
    assert_eq!(weights, vec![80, 100], "80/20 split by cumulative weight");
    assert!(!compiled.policy.is_empty(), "the ALLOW policy produced entries");
}
