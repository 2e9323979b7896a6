//! The access log: one JSON line per closed L4 connection (kernel ring buffer) and per proxied
//! request, to its own sink (a file or stdout), apart from the agent's own logs. Lines are
//! written whole under a lock and flushed by the event drain (at most every 100 ms).

use std::{
    io::Write,
    path::Path,
    sync::Mutex,
};

pub struct AccessLog {
    out: Mutex<Option<Box<dyn Write + Send>>>,
}

impl AccessLog {
    /// `None`: disabled (records are not even formatted). `-`: stdout.
    pub fn open(path: Option<&Path>) -> AccessLog {
        let out: Option<Box<dyn Write + Send>> = match path {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::LineWriter::new(std::io::stdout()))),
            Some(p) => match std::fs::OpenOptions::new().create(true).append(true).open(p) {
                Ok(f) => Some(Box::new(std::io::BufWriter::new(f))),
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "cannot open the access log; it stays off");
                    None
                }
            },
        };
        AccessLog { out: Mutex::new(out) }
    }

    pub fn enabled(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn Write + Send>>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes lines while holding the sink once.
    pub fn write_all(&self, lines: impl IntoIterator<Item = String>) {
        if let Some(out) = self.lock().as_mut() {
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
    }

    pub fn flush(&self) {
        if let Some(out) = self.lock().as_mut() {
            let _ = out.flush();
        }
    }
}

impl weft_proxy::AccessLog for AccessLog {
    fn record(&self, line: String) {
        self.write_all([line]);
    }
}
