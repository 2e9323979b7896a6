//! `weftctl analyze` on a corpus of configs, each seeded with one mistake its first line names
//! (`# expect: <code> <Kind ns/name>`): the finding is reported with the right severity and exit
//! status; the shipped samples have none.

use std::{path::Path, process::Command};

use serde_json::Value;

fn analyze(path: &Path) -> (Option<i32>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(["analyze", "-o", "json", "-f"])
        .arg(path)
        .output()
        .expect("run weftctl");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", path.display(), String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), report)
}

#[test]
fn each_seeded_mistake_is_found() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut cases = std::fs::read_dir(&corpus).expect("corpus").map(|e| e.expect("entry").path()).collect::<Vec<_>>();
    cases.sort();
    assert!(cases.len() >= 10, "the corpus is there: {cases:?}");
    for case in cases {
        let text = std::fs::read_to_string(&case).expect("read case");
        let expect = text.lines().next().and_then(|l| l.strip_prefix("# expect: ")).expect("an expect line");
        let (code, object) = expect.split_once(' ').expect("code and object");
        let (status, report) = analyze(&case);
        let findings = report["findings"].as_array().expect("findings");
        let found = findings.iter().find(|f| f["code"] == code && f["object"] == object);
        let Some(found) = found else { panic!("{}: no {code} for {object} in {report:#}", case.display()) };
        let error = found["severity"] == "error";
        assert_eq!(
            status,
            Some(if error { 1 } else { 0 }),
            "{}: exit status for a {} ({report})",
            case.display(),
            found["severity"]
        );
        // Each case holds one mistake: nothing else is reported.
        assert_eq!(findings.len(), 1, "{}: only the seeded mistake: {report:#}", case.display());
    }
}

#[test]
fn the_samples_are_clean() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../manifests/samples/standalone");
    let (status, report) = analyze(&samples);
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    assert_eq!(report["errors"], 0);
    assert!(report["objects"].as_u64().is_some_and(|n| n >= 5), "{report}");
    assert_eq!(status, Some(0));
}

#[test]
fn a_missing_file_is_reported_as_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(["analyze", "-f", "/nonexistent/weftctl-test-dir/"])
        .output()
        .expect("run weftctl");
    // A path that is neither a directory nor a readable file is reported as a finding of its
    // own (the loader names the file), so the status is that of an error.
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read the file"));
}
