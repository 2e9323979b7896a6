//! `weftctl analyze --cluster` against a fake API server over HTTP, reached through a
//! KUBECONFIG as it would reach a real one: objects of the cluster are judged like files, a CRD
//! the cluster lacks is empty, and an unreachable cluster is exit status 2.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

/// Answers every request on its own connection from `answer(path)`, until the test ends.
fn serve(answer: fn(&str) -> (u16, Value)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Skip the headers; list requests have no body.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = line.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap_or("/").to_owned();
            let (status, body) = answer(&path);
            let body = body.to_string();
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

fn kubeconfig(port: u16) -> PathBuf {
    let path = std::env::temp_dir().join(format!("weftctl-kubeconfig-{}-{port}", std::process::id()));
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://127.0.0.1:{port}\"}}}}]\n\
         users: [{{name: nobody, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: nobody}}}}]\n\
         current-context: fake\n"
    );
    std::fs::write(&path, config).expect("write kubeconfig");
    path
}

fn list(items: Value) -> (u16, Value) {
    (200, json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}))
}

fn cluster(path: &str) -> (u16, Value) {
    match path {
        "/api/v1/services" => list(json!([
            {"metadata": {"name": "web", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}},
            {"metadata": {"name": "bad", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0", "ports": [{"port": 80}]}},
        ])),
        "/api/v1/namespaces" => list(json!([{"metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}}}])),
        p if p.starts_with("/apis/weft.dev/") => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "the server could not find the requested resource"}),
        ),
        _ => list(json!([])),
    }
}

fn analyze(kubeconfig: &PathBuf) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(["analyze", "--cluster", "-o", "json"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run weftctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_live_cluster_is_judged_like_files() {
    let config = kubeconfig(serve(cluster));
    let (status, stdout, stderr) = analyze(&config);
    let _ = std::fs::remove_file(&config);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout} {stderr}"));
    let findings = report["findings"].as_array().expect("findings");
    let invalid = findings.iter().find(|f| f["code"] == "invalid").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(
        (invalid["object"].as_str(), invalid["field"].as_str()),
        (Some("Service shop/bad"), Some("spec.clusterIP"))
    );
    let no_endpoints = findings.iter().any(|f| f["code"] == "no-endpoints" && f["object"] == "Service shop/web");
    assert!(no_endpoints, "the valid Service is analyzed too: {report:#}");
    assert_eq!(report["objects"], 1, "the valid Service (namespaces are context; weft's CRDs are not installed): {report}");
    assert_eq!(status, Some(1), "errors fail");
}

#[test]
fn an_unreachable_cluster_is_exit_status_2() {
    // A port nothing listens on (bound, then closed).
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let config = kubeconfig(port);
    let (status, _, stderr) = analyze(&config);
    let _ = std::fs::remove_file(&config);
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("listing") && stderr.contains("KUBECONFIG"), "{stderr}");
}
