//! A child-process guard for tests, and a TCP readiness check.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A spawned process that is killed and reaped when dropped, so a failing test leaves no servers
/// behind. stdout and stderr are drained by background threads from the start: a chatty child can
/// never block on a full pipe, and its output is available for error messages.
pub struct Proc {
    child: Child,
    what: String,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    reaped: bool,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout/stderr captured; panics if it cannot start.
    pub fn spawn(mut cmd: Command) -> Proc {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("spawning {what} failed: {e}; is the program installed/built?")
            });
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Proc {
            child,
            what,
            stdout,
            stderr,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {} failed: {e}", self.what));
        self.reaped |= status.is_some();
        status
    }

    /// SIGKILLs the process and reaps it. Harmless if it has already exited.
    pub fn kill(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// Waits for the process to exit and returns everything it printed. Panics with its output if
    /// it is still running after `timeout` (it is killed first).
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                self.kill();
                let (stdout, stderr) = self.take_output();
                panic!(
                    "{} still running after {timeout:?}; killed it.\nstdout: {}\nstderr: {}",
                    self.what,
                    String::from_utf8_lossy(&stdout),
                    String::from_utf8_lossy(&stderr)
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        let (stdout, stderr) = self.take_output();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// Collects the drained output. The pipes close when the process exits, unless it left a
    /// grandchild holding them, so give up after a short while rather than hang.
    fn take_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let collect = |handle: Option<JoinHandle<Vec<u8>>>| {
            let handle = handle?;
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                handle.join().ok()
            } else {
                None
            }
        };
        let stdout = collect(self.stdout.take()).unwrap_or_default();
        let stderr = collect(self.stderr.take()).unwrap_or_default();
        (stdout, stderr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error just ends the capture; the output is diagnostics only.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Tries to connect to each of `addrs` in turn, in the calling thread's netns, until one accepts
/// or `timeout` passes. Returns whether one accepted. Call it through `Pod::run`/`Node::run`, or
/// use `wait_listening` on them.
pub fn wait_for_tcp(addrs: &[SocketAddr], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        for addr in addrs {
            if TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
