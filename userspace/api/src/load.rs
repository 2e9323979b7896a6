//! The standalone config source: a directory of Kubernetes-shaped YAML.
//!
//! One bad object never hides the others: each problem becomes a [`ConfigError`] naming file,
//! document, object and field, and the rest still loads. Only an unreadable directory fails
//! the whole load.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use gateway_api::apis::standard::grpcroutes::GrpcRoute;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use weft_policy::{NodeSettings, Snapshot};

use crate::convert::{DEFAULT_NAMESPACE, FieldError};
use crate::crd;
use crate::snapshot::{Convert, Object, ObjectError, SnapshotBuilder};

/// The result of reading a config directory.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub snapshot: Snapshot,
    /// Per-object problems; those objects are left out of the snapshot.
    pub errors: Vec<ConfigError>,
    /// Config files read.
    pub files: usize,
    /// Objects loaded into the snapshot.
    pub objects: usize,
}

/// A problem with one document or object of a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 0-based index of the YAML document in the file.
    pub document: usize,
    /// "Kind ns/name", when the document got that far.
    pub object: Option<String>,
    /// Path of the offending field, e.g. "spec.ports[0].port".
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: doc {}: ", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config directory {}: {source}", .dir.display())]
    ReadDir { dir: PathBuf, source: std::io::Error },
}

const SUPPORTED: &str = "weft reads Service, EndpointSlice, Node, Workload, AuthorizationPolicy, JwtPolicy, TrafficPolicy, PeerAuthentication, HTTPRoute, GRPCRoute";

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir` (sorted by name, dotfiles
/// skipped, so editors' temp files and ConfigMap mounts' `..data` are ignored).
pub fn load_dir(dir: &Path, node: NodeSettings) -> Result<Loaded, LoadError> {
    Ok(load_files(&config_files(dir)?, node))
}

/// Reads `paths`: each a directory (its config files, as [`load_dir`] picks them) or a file.
pub fn load_paths(paths: &[PathBuf], node: NodeSettings) -> Result<Loaded, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        match path.is_dir() {
            true => files.extend(config_files(path)?),
            false => files.push(path.clone()),
        }
    }
    Ok(load_files(&files, node))
}

/// The config files directly in `dir`, sorted by name.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let read_dir = |source| LoadError::ReadDir { dir: dir.to_owned(), source };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if is_config_file(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn is_config_file(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let config = [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext));
    // is_file follows symlinks, as ConfigMap mounts need.
    config && !name.starts_with('.') && path.is_file()
}

fn load_files(paths: &[PathBuf], node: NodeSettings) -> Loaded {
    let mut loader = Loader { snapshot: SnapshotBuilder::new(node), errors: Vec::new(), seen: BTreeMap::new() };
    for path in paths {
        loader.file(path);
    }
    let objects = loader.snapshot.objects();
    Loaded { snapshot: loader.snapshot.finish(), errors: loader.errors, files: paths.len(), objects }
}

/// Where a document is, for error messages.
#[derive(Clone, Copy)]
struct Location<'a> {
    file: &'a Path,
    document: usize,
    /// Index in a `kind: List`'s items.
    item: Option<usize>,
}

impl Location<'_> {
    fn error(&self, object: Option<String>, field: Option<String>, message: impl Into<String>) -> ConfigError {
        let field = match (self.item, field) {
            (Some(i), Some(field)) => Some(format!("items[{i}].{field}")),
            (Some(i), None) => Some(format!("items[{i}]")),
            (None, field) => field,
        };
        ConfigError { file: self.file.to_owned(), document: self.document, object, field, message: message.into() }
    }
}

struct Loader {
    snapshot: SnapshotBuilder,
    errors: Vec<ConfigError>,
    /// (kind, namespace, name) -> where it was first defined.
    seen: BTreeMap<(String, String, String), (PathBuf, usize)>,
}

impl Loader {
    fn file(&mut self, file: &Path) {
        let text = match fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                let at = Location { file, document: 0, item: None };
                self.errors.push(at.error(None, None, format!("cannot read the file: {e}")));
                return;
            }
        };
        for (document, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = Location { file, document, item: None };
            match Value::deserialize(de) {
                Ok(value) => self.document(at, value),
                Err(e) => {
                    // The parser cannot resynchronise after a syntax error; the rest of the
                    // file is unreliable, so stop here.
                    self.errors.push(at.error(None, None, format!("invalid YAML: {e}")));
                    break;
                }
            }
        }
    }

    fn document(&mut self, at: Location<'_>, value: Value) {
        match value {
            // An empty document, e.g. after a trailing "---".
            Value::Null => {}
            Value::Mapping(ref map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                let Some(items) = map.get("items").and_then(Value::as_sequence) else {
                    let error = at.error(Some("List".into()), Some("items".into()), "missing; a List needs items");
                    self.errors.push(error);
                    return;
                };
                for (i, item) in items.iter().enumerate() {
                    self.object(Location { item: Some(i), ..at }, item.clone());
                }
            }
            value => self.object(at, value),
        }
    }

    fn object(&mut self, at: Location<'_>, value: Value) {
        let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        if !value.is_mapping() || api_version.is_empty() || kind.is_empty() {
            let error =
                at.error(None, None, format!("not a Kubernetes object: apiVersion and kind are required; {SUPPORTED}"));
            self.errors.push(error);
            return;
        }
        let metadata = |key: &str| {
            value.get("metadata").and_then(|m| m.get(key)).and_then(Value::as_str).filter(|s| !s.is_empty())
        };
        let namespace = metadata("namespace").unwrap_or(DEFAULT_NAMESPACE).to_owned();
        let name = metadata("name").map(str::to_owned);
        let object = format!("{kind} {namespace}/{}", name.as_deref().unwrap_or("<unnamed>"));

        let converted = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => convert_value::<core::Service>(value),
            ("discovery.k8s.io/v1", "EndpointSlice") => convert_value::<discovery::EndpointSlice>(value),
            ("v1", "Node") => convert_value::<core::Node>(value),
            ("weft.dev/v1alpha1", "PeerAuthentication") => convert_value::<crd::PeerAuthentication>(value),
            ("weft.dev/v1alpha1", "Workload") => convert_value::<crd::Workload>(value),
            ("weft.dev/v1alpha1", "AuthorizationPolicy") => convert_value::<crd::AuthorizationPolicy>(value),
            ("weft.dev/v1alpha1", "JwtPolicy") => convert_value::<crd::JwtPolicy>(value),
            ("weft.dev/v1alpha1", "TrafficPolicy") => convert_value::<crd::TrafficPolicy>(value),
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => convert_value::<HttpRoute>(value),
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => convert_value::<GrpcRoute>(value),
            _ => {
                let message = format!("unsupported kind {kind} (apiVersion {api_version}); {SUPPORTED}");
                self.errors.push(at.error(Some(object), None, message));
                return;
            }
        };
        let converted = match converted {
            Ok(converted) => converted,
            Err(e) => {
                let e = ObjectError::new(object, e);
                self.errors.push(at.error(Some(e.object), e.field, e.message));
                return;
            }
        };
        // Conversion checked that the name is there.
        let key = (kind, namespace, name.unwrap_or_default());
        if let Some((file, document)) = self.seen.get(&key) {
            let message = format!(
                "defined again; the first definition (in {} doc {document}) is used, remove one",
                file.display()
            );
            self.errors.push(at.error(Some(object), Some("metadata.name".into()), message));
            return;
        }
        self.seen.insert(key, (at.file.to_owned(), at.document));
        self.snapshot.add(converted);
    }
}

/// Reads a document as `T` and converts it.
fn convert_value<T: Convert + DeserializeOwned>(value: Value) -> Result<Object, FieldError> {
    typed::<T>(value).and_then(|object| object.convert())
}

/// Deserializes with the path of the failing field, e.g. "spec.ports[0].port".
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        FieldError::new(missing_field_path(path, &message), message)
    })
}

/// serde reports a missing field at the object that lacks it ("spec"); the field to fix is
/// the missing one ("spec.targetRefs").
fn missing_field_path(path: String, message: &str) -> String {
    let missing = message.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')).map(|(name, _)| name);
    match missing {
        Some(name) if path.is_empty() || path == "." => name.to_owned(),
        Some(name) => format!("{path}.{name}"),
        None => path,
    }
}
