//! One measured child process: wall time, peak memory (max RSS, from
//! wait4's rusage) and its output. Shared by the benchmarks.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One measured process: wall time, peak RSS in KiB, stdout.
pub struct Measured {
    pub wall: Duration,
    pub max_rss_kib: i64,
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

// The child is reaped by wait4 (for its rusage), not Child::wait.
#[allow(clippy::zombie_processes)]
pub fn measure(cmd: &mut Command) -> Measured {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn auto-consul");
    let mut err_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by the kernel for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert_eq!(waited, pid, "wait4 failed");
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let stderr = err_reader.join().unwrap_or_default();
    Measured {
        wall,
        max_rss_kib: usage.ru_maxrss,
        ok,
        stdout,
        stderr,
    }
}
