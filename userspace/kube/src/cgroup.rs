//! Where the kubelet puts a pod's cgroup on cgroup v2, under either cgroup driver:
//!
//! | driver   | Guaranteed                  | Burstable / BestEffort                                            |
//! |----------|-----------------------------|-------------------------------------------------------------------|
//! | cgroupfs | `kubepods/pod<uid>`         | `kubepods/burstable/pod<uid>`                                     |
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//!
//! (`<uid_>` is the UID with `-` written as `_`, since `-` separates systemd slice levels.)
//! Containers get cgroups below the pod's, so attaching to the pod's covers all of them.

use std::path::{Path, PathBuf};

/// The pod's QoS class, as the kubelet reports it in `status.qosClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort];

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The kubelet's level below `kubepods`; Guaranteed pods sit directly in it.
    fn level(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

impl Driver {
    /// The pod's cgroup, relative to the cgroup v2 root.
    pub fn pod_path(self, uid: &str, qos: QosClass) -> PathBuf {
        match (self, qos.level()) {
            (Self::Cgroupfs, None) => PathBuf::from(format!("kubepods/pod{uid}")),
            (Self::Cgroupfs, Some(level)) => PathBuf::from(format!("kubepods/{level}/pod{uid}")),
            (Self::Systemd, level) => {
                let uid = uid.replace('-', "_");
                match level {
                    None => PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice")),
                    Some(level) => {
                        PathBuf::from(format!("kubepods.slice/kubepods-{level}.slice/kubepods-{level}-pod{uid}.slice"))
                    }
                }
            }
        }
    }

    /// The directory that tells the driver apart.
    fn top(self) -> &'static str {
        match self {
            Self::Cgroupfs => "kubepods",
            Self::Systemd => "kubepods.slice",
        }
    }
}

/// Finds pods' cgroups under a cgroup v2 mount (the host's, in a DaemonSet pod).
#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
}

impl Cgroups {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pod's cgroup: the existing one, under either driver (with `qos` unknown, under any
    /// class). A pod whose cgroup is not there yet gets where it will be, if the driver and
    /// class are known, so the datapath syncer attaches once it appears; otherwise `None`.
    pub fn pod(&self, uid: &str, qos: Option<QosClass>) -> Option<PathBuf> {
        let classes = qos.map_or(QosClass::ALL.to_vec(), |q| vec![q]);
        for class in classes {
            for driver in [Driver::Systemd, Driver::Cgroupfs] {
                let path = self.root.join(driver.pod_path(uid, class));
                if path.is_dir() {
                    return Some(path);
                }
            }
        }
        let driver = [Driver::Systemd, Driver::Cgroupfs].into_iter().find(|d| self.root.join(d.top()).is_dir())?;
        Some(self.root.join(driver.pod_path(uid, qos?)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const UID: &str = "6f1c2a4e-0b7d-4c1e-9a51-3d2f0e8b7c11";

    /// A fake cgroup v2 mount, removed on drop.
    struct Root(PathBuf);

    impl Root {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("weft-kube-cgroup-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn mkdir(&self, relative: &str) -> PathBuf {
            let path = self.0.join(relative);
            std::fs::create_dir_all(&path).unwrap();
            path
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_the_pod_under_each_driver_and_class() {
        let u = "6f1c2a4e_0b7d_4c1e_9a51_3d2f0e8b7c11";
        let cases = [
            (QosClass::Guaranteed, format!("kubepods/pod{UID}")),
            (QosClass::Burstable, format!("kubepods/burstable/pod{UID}")),
            (QosClass::BestEffort, format!("kubepods/besteffort/pod{UID}")),
            (QosClass::Guaranteed, format!("kubepods.slice/kubepods-pod{u}.slice")),
            (QosClass::Burstable, format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")),
            (
                QosClass::BestEffort,
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            ),
        ];
        for (qos, relative) in cases {
            let root = Root::new();
            let want = root.mkdir(&relative);
            // A container below the pod's cgroup must not be mistaken for it.
            root.mkdir(&format!("{relative}/cri-containerd-abc.scope"));
            let cgroups = Cgroups::new(&root.0);
            assert_eq!(cgroups.pod(UID, Some(qos)), Some(want.clone()), "{relative}, class known");
            assert_eq!(cgroups.pod(UID, None), Some(want), "{relative}, class unknown");
        }
    }

    #[test]
    fn a_missing_cgroup_is_expected_where_the_driver_puts_it() {
        let root = Root::new();
        let cgroups = Cgroups::new(&root.0);
        assert_eq!(cgroups.pod(UID, Some(QosClass::Burstable)), None, "no kubepods at all: no guess");

        root.mkdir("kubepods.slice/kubepods-burstable.slice");
        let want = root.0.join(Driver::Systemd.pod_path(UID, QosClass::Burstable));
        assert_eq!(cgroups.pod(UID, Some(QosClass::Burstable)), Some(want), "systemd driver");
        assert_eq!(cgroups.pod(UID, None), None, "class unknown: no guess");

        let root = Root::new();
        let cgroups = Cgroups::new(&root.0);
        root.mkdir("kubepods");
        let want = root.0.join(format!("kubepods/pod{UID}"));
        assert_eq!(cgroups.pod(UID, Some(QosClass::Guaranteed)), Some(want), "cgroupfs driver");
    }

    #[test]
    fn another_pods_cgroup_is_not_this_ones() {
        let root = Root::new();
        root.mkdir("kubepods/burstable/pod11111111-2222-3333-4444-555555555555");
        let want = root.0.join(format!("kubepods/burstable/pod{UID}"));
        assert_eq!(Cgroups::new(&root.0).pod(UID, Some(QosClass::Burstable)), Some(want));
        assert_eq!(Cgroups::new(&root.0).pod(UID, None), None);
    }
}
