//! Runs one master script: writes its run files, spawns it (no shell, ever) in its own
//! process group with stdin closed and stdout+stderr on one pipe, captures the output
//! within bounds, enforces the time limit and cancellation by signalling the whole group,
//! and removes the run files whatever happens.
//!
//! Invariant: when [`run`] returns, no process of the task's group is left (the leader
//! was reaped; stragglers got SIGTERM, then SIGKILL after the grace).

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::output::{capture, Captured, RecentLines};
use crate::telemetry::WorkerLog;

/// SIGTERM to SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// Workers are killed by the kernel's OOM killer before the poller is.
const OOM_SCORE_ADJ: &[u8] = b"500";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("run file {path} is not a plain file name inside the work dir")]
    UnsafePath { path: String },
    #[error("cannot write run file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start master script {script}")]
    Spawn {
        script: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the output pipe")]
    Pipe(#[source] std::io::Error),
}

/// The files of one run; dropping it removes them (success, error, panic, cancel).
#[derive(Debug, Default)]
pub struct RunFiles {
    paths: Vec<PathBuf>,
}

impl RunFiles {
    /// Writes `<work_dir>/<run_id><suffix>` with mode 0600, refusing to follow symlinks
    /// (the work dir may be a shared /tmp). On error, what was written is removed.
    pub fn write(work_dir: &Path, run_id: &str, files: &[(&str, Vec<u8>)]) -> Result<RunFiles, Error> {
        let mut written = RunFiles::default();
        for (suffix, content) in files {
            let name = format!("{run_id}{suffix}");
            let plain = !name.is_empty() && !name.contains('/') && name != "." && name != ".." && !name.contains('\0');
            if !plain {
                return Err(Error::UnsafePath { path: name });
            }
            let path = work_dir.join(&name);
            let write = || -> std::io::Result<()> {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                // No fsync: the script reads the file through the same page cache.
                file.write_all(content)
            };
            // Remember it before writing so that a half-written file is removed too.
            written.paths.push(path.clone());
            write().map_err(|source| Error::Write { path: path.clone(), source })?;
        }
        Ok(written)
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove run file");
                }
            }
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Succeeded,
    /// Non-zero exit or killed by a signal the poller did not send.
    Failed(ExitStatus),
    TimedOut,
    Cancelled,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Succeeded => f.write_str("exited 0"),
            Exit::Failed(status) => match (status.code(), status.signal()) {
                (Some(code), _) => write!(f, "exited with status {code}"),
                (None, Some(sig)) => write!(f, "killed by signal {sig}"),
                _ => write!(f, "ended with {status}"),
            },
            Exit::TimedOut => f.write_str("timed out"),
            Exit::Cancelled => f.write_str("was stopped by shutdown"),
        }
    }
}

/// One master-script invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Bare name (looked up on PATH) or a path.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub time_limit: Option<Duration>,
    pub output_limit: usize,
    /// The task's fields for its worker lines in the log: `(task_id, kind, run_id)`.
    pub log_fields: (String, &'static str, String),
}

#[derive(Debug)]
pub struct Finished {
    pub exit: Exit,
    pub output: Captured,
}

/// Resolves a script name against `--scripts-dir` (or leaves it to PATH lookup).
pub fn program(scripts_dir: Option<&Path>, script: &str) -> PathBuf {
    scripts_dir.map_or_else(|| PathBuf::from(script), |dir| dir.join(script))
}

/// Runs the invocation to its end. `cancel` (drain deadline, second signal) stops it
/// like a timeout does. Cancel-safe only in the sense that dropping the future kills the
/// leader (`kill_on_drop`); callers await it to completion.
pub async fn run(inv: &Invocation, cancel: &CancellationToken, recent: RecentLines) -> Result<Finished, Error> {
    let (tx, rx) = tokio::net::unix::pipe::pipe().map_err(Error::Pipe)?;
    let write_end = tx.into_blocking_fd().map_err(Error::Pipe)?;
    let stderr = write_end.try_clone().map_err(Error::Pipe)?;
    let mut child = {
        // The Command holds the pipe's write ends: it must be dropped right after spawn so
        // that EOF arrives when the workers exit.
        let mut command = Command::new(&inv.program);
        // argv[0] is the bare script name, as Go's exec gave it, even from --scripts-dir
        // (the master scripts are Go binaries; a #! script sees its path as $0 anyway).
        if let Some(name) = inv.program.file_name() {
            command.arg0(name);
        }
        command
            .args(&inv.args)
            .envs(inv.env.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close)
        // on a static path; it allocates nothing.
        unsafe {
            command.pre_exec(raise_oom_score);
        }
        command.spawn().map_err(|source| Error::Spawn { script: inv.program.display().to_string(), source })?
    };
    let pgid = Pid::from_raw(child.id().expect("a just-spawned child has a pid") as i32);
    let stop_reading = CancellationToken::new();
    let (task_id, kind, run_id) = &inv.log_fields;
    let log = WorkerLog::new(task_id, kind, run_id);
    let mut reader = tokio::spawn(capture(rx, inv.output_limit, recent, log, stop_reading.clone()).in_current_span());

    let deadline = inv.time_limit.map(|limit| Instant::now() + limit);
    let until_deadline = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let exit = tokio::select! {
        status = child.wait() => Some(status),
        _ = until_deadline => None,
        _ = cancel.cancelled() => None,
    };
    let exit = match exit {
        Some(Ok(status)) if status.success() => Exit::Succeeded,
        Some(Ok(status)) => Exit::Failed(status),
        Some(Err(e)) => {
            tracing::error!(error = %e, "waiting for the master script failed");
            stop_leader(&mut child, pgid).await;
            Exit::Cancelled
        }
        None => {
            let timed_out = !cancel.is_cancelled();
            stop_leader(&mut child, pgid).await;
            if timed_out {
                Exit::TimedOut
            } else {
                Exit::Cancelled
            }
        }
    };
    stop_group(pgid).await;
    // Everything holding the pipe is gone unless a worker left the group (setsid): then
    // stop reading rather than wait for it.
    let captured = match timeout(Duration::from_secs(5), &mut reader).await {
        Ok(captured) => captured,
        Err(_) => {
            tracing::warn!("a process outside the task's process group still holds its output pipe");
            stop_reading.cancel();
            reader.await
        }
    };
    let output = captured.unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()));
    Ok(Finished { exit, output })
}

/// SIGTERM to the group, SIGKILL after [`KILL_GRACE`], then reap the leader.
async fn stop_leader(child: &mut tokio::process::Child, pgid: Pid) {
    signal_group(pgid, Signal::SIGTERM);
    if timeout(KILL_GRACE, child.wait()).await.is_err() {
        signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// After the leader has exited: stragglers (forked workers) get SIGTERM, then SIGKILL.
async fn stop_group(pgid: Pid) {
    if killpg(pgid, None).is_err() {
        return;
    }
    tracing::warn!(pgid = pgid.as_raw(), "master script left processes behind; stopping them");
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + KILL_GRACE;
    while Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
        if killpg(pgid, None).is_err() {
            return;
        }
    }
    signal_group(pgid, Signal::SIGKILL);
}

fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(e) = killpg(pgid, signal) {
        if e != nix::errno::Errno::ESRCH {
            tracing::warn!(pgid = pgid.as_raw(), error = %e, "cannot signal the task's process group");
        }
    }
}

/// Runs in the child between fork and exec: raises its OOM score. Failure is ignored
/// (e.g. no /proc); it only makes the worker, not the poller, the OOM killer's choice.
fn raise_oom_score() -> std::io::Result<()> {
    // SAFETY: plain syscalls on a NUL-terminated static path and a static buffer.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, OOM_SCORE_ADJ.as_ptr().cast(), OOM_SCORE_ADJ.len());
            libc::close(fd);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn run_files_are_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let files = RunFiles::write(dir.path(), "u-1", &[(".a", b"x".to_vec()), (".b", vec![])]).unwrap();
        let mode = std::fs::metadata(dir.path().join("u-1.a")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(files);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(RunFiles::write(dir.path(), "../x", &[(".a", vec![])]), Err(Error::UnsafePath { .. })));
    }

    #[test]
    fn run_files_do_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("u-1.a")).unwrap();
        assert!(matches!(RunFiles::write(dir.path(), "u-1", &[(".a", b"evil".to_vec())]), Err(Error::Write { .. })));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
