//! Standalone-mode root on disk: `Ca::load_or_create` in a fresh directory per test under
//! cargo's per-target temp dir, removed on drop.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, SystemTime},
};

use weft_identity::{Ca, Error, SpiffeId, TrustBundle};

struct TempDir(PathBuf);

impl TempDir {
    /// A path that does not exist yet (load_or_create must create it).
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "identity-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("valid id")
}

#[test]
fn creates_then_loads_the_same_root() {
    let dir = TempDir::new("create");
    let ca = Ca::load_or_create(&dir.0, "cluster.local").expect("create");
    assert_eq!(mode(&dir.0), 0o700, "a created CA directory is private");
    assert_eq!(
        mode(&dir.file("root.key")),
        0o600,
        "the root key is readable by its owner only"
    );
    let on_disk = fs::read_to_string(dir.file("root.pem")).expect("root.pem written");
    assert_eq!(on_disk, ca.root_pem());
    assert!(
        fs::read_to_string(dir.file("root.key"))
            .expect("root.key written")
            .contains("-----BEGIN PRIVATE KEY-----")
    );

    let again = Ca::load_or_create(&dir.0, "cluster.local").expect("load");
    assert_eq!(
        again.root_pem(),
        ca.root_pem(),
        "second start must reuse the root"
    );
    assert_eq!(
        fs::read_to_string(dir.file("root.pem")).expect("still there"),
        on_disk,
        "loading must not rewrite the root"
    );

    // What the reloaded CA signs verifies against a bundle made from the first one.
    let bundle = TrustBundle::from_pem("cluster.local", &ca.root_pem()).expect("bundle");
    let cert = again
        .issue(&id("a", "b"), Duration::from_secs(60))
        .expect("issue");
    let parsed = rustls::server::ParsedCertificate::try_from(&cert.chain[0]).expect("parse leaf");
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &bundle.root_store(),
        &[],
        rustls::pki_types::UnixTime::now(),
        weft_identity::provider()
            .signature_verification_algorithms
            .all,
    )
    .expect("a certificate from the reloaded CA chains to the stored root");
}

#[test]
fn existing_directory_keeps_its_mode() {
    let dir = TempDir::new("existing");
    fs::create_dir_all(&dir.0).expect("mkdir");
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o750)).expect("chmod");
    Ca::load_or_create(&dir.0, "cluster.local").expect("create");
    assert_eq!(mode(&dir.0), 0o750);
    assert_eq!(mode(&dir.file("root.key")), 0o600);
}

#[test]
fn key_of_another_root_is_refused_naming_the_file() {
    let (a, b) = (TempDir::new("mismatch-a"), TempDir::new("mismatch-b"));
    Ca::load_or_create(&a.0, "cluster.local").expect("create a");
    Ca::load_or_create(&b.0, "cluster.local").expect("create b");
    fs::copy(b.file("root.key"), a.file("root.key")).expect("swap key");
    let err =
        Ca::load_or_create(&a.0, "cluster.local").expect_err("mismatched key must be refused");
    assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&a.file("root.key").display().to_string())
            && message.contains(&a.file("root.pem").display().to_string()),
        "{message}"
    );
}

#[test]
fn one_file_alone_is_refused() {
    for (keep, missing) in [("root.pem", "root.key"), ("root.key", "root.pem")] {
        let dir = TempDir::new("half");
        Ca::load_or_create(&dir.0, "cluster.local").expect("create");
        fs::remove_file(dir.file(missing)).expect("remove one");
        let err =
            Ca::load_or_create(&dir.0, "cluster.local").expect_err("half a pair must be refused");
        assert!(
            matches!(&err, Error::HalfPair { present, missing: m } if *present == dir.file(keep) && *m == dir.file(missing)),
            "{err}"
        );
        assert!(
            !dir.file(missing).exists(),
            "must not silently create a second root next to {keep}"
        );
    }
}

#[test]
fn malformed_or_unreadable_files_are_named() {
    let dir = TempDir::new("malformed");
    Ca::load_or_create(&dir.0, "cluster.local").expect("create");
    let key = fs::read_to_string(dir.file("root.key")).expect("read key");

    fs::write(dir.file("root.key"), "not a key").expect("write");
    let err = Ca::load_or_create(&dir.0, "cluster.local").expect_err("garbage key");
    assert!(matches!(err, Error::NotAKey { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&dir.file("root.key").display().to_string()),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!(
            "expected the key that signed {}",
            dir.file("root.pem").display()
        )),
        "{err}"
    );

    fs::write(dir.file("root.key"), &key).expect("restore key");
    fs::write(
        dir.file("root.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let err = Ca::load_or_create(&dir.0, "cluster.local").expect_err("garbage cert");
    assert!(matches!(err, Error::NotACertificate { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&dir.file("root.pem").display().to_string()),
        "{err}"
    );

    // A directory where the certificate should be: unreadable as a file (works as root too,
    // unlike a chmod 000 file).
    fs::remove_file(dir.file("root.pem")).expect("rm");
    fs::create_dir(dir.file("root.pem")).expect("mkdir in its place");
    let err = Ca::load_or_create(&dir.0, "cluster.local").expect_err("unreadable cert");
    assert!(
        matches!(&err, Error::Read { path, .. } if *path == dir.file("root.pem")),
        "{err}"
    );
}

#[test]
fn expired_root_is_refused() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let days_ago = |days: u64| {
        let t = SystemTime::now() - Duration::from_secs(days * 24 * 3600);
        let secs = t
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).expect("fits"))
            .expect("in range")
    };
    params.not_before = days_ago(20);
    params.not_after = days_ago(10);
    let cert = params.self_signed(&key).expect("self-sign");
    let err =
        Ca::from_pem("cluster.local", &cert.pem(), &key.serialize_pem()).expect_err("expired root");
    assert!(
        matches!(err, Error::RootExpired { not_after, .. } if not_after < SystemTime::now()),
        "{err}"
    );
}
