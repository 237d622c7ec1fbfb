//! Test harness: a development CTFE on an ephemeral port, a temporary work dir, patch
//! store and scripts dir, recorder scripts, and waiting on conditions (never fixed sleeps).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ct_poller::config::{AutoscalerKind, Config, PatchStoreUrl};
use ct_poller::dev_ctfe::{DevCtfe, Fault, LoggedRequest};
use ct_poller::shutdown::Shutdown;
use ct_poller::Daemon;
use serde_json::Value;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub const KINDS: [&str; 9] = [
    "capture_skps",
    "chromium_analysis",
    "chromium_build",
    "chromium_perf",
    "lua_script",
    "metrics_analysis",
    "pixel_diff",
    "recreate_page_sets",
    "recreate_webpage_archives",
];

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).unwrap()
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`wait_until`] for conditions that need to await (HTTP scrapes).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Harness {
    pub ctfe: DevCtfe,
    pub ctfe_addr: SocketAddr,
    pub ctfe_stop: CancellationToken,
    pub dir: TempDir,
    pub config: Config,
}

impl Harness {
    pub async fn new() -> Harness {
        let ctfe = DevCtfe::new();
        let ctfe_stop = CancellationToken::new();
        let ctfe_addr = ctfe.spawn(SocketAddr::from(([127, 0, 0, 1], 0)), ctfe_stop.clone()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        for sub in ["work", "scripts", "store", "records"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let mut config = Config::defaults();
        config.ctfe_url = format!("http://{ctfe_addr}/").parse().unwrap();
        config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.poll_interval = Duration::from_secs(3600);
        config.ctfe_timeout = Duration::from_secs(5);
        config.work_dir = dir.path().join("work");
        config.scripts_dir = Some(dir.path().join("scripts"));
        config.patch_store = PatchStoreUrl::File(dir.path().join("store"));
        config.autoscaler.kind = AutoscalerKind::None;
        config.drain_timeout = Duration::from_secs(30);
        config.child_env = vec![("RECORD_DIR".into(), dir.path().join("records").display().to_string())];
        // No .gitcookies refresher: tests never touch the real ~/.gitcookies or git config.
        config.google.home = None;
        Harness { ctfe, ctfe_addr, ctfe_stop, dir, config }
    }

    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn records_dir(&self) -> PathBuf {
        self.dir.path().join("records")
    }

    /// Writes a master script that records its argv (NUL-separated), environment and the
    /// run files it sees, runs `body` (shell), then exits with `exit_code`.
    pub fn script(&self, name: &str, body: &str, exit_code: i32) {
        let text = format!(
            r#"#!/bin/sh
out="$RECORD_DIR/{name}.$$"
mkdir -p "$out/files"
printf '%s\0' "$0" "$@" > "$out/argv"
env > "$out/env"
for a in "$@"; do case "$a" in --run_id=*) run="${{a#--run_id=}}";; --task_id=*) task="${{a#--task_id=}}";; esac; done
# As real master scripts do: tell CTFE the task started (so it stops offering it).
mark_started() {{
  python3 -c 'import json,os,sys,urllib.request as u; u.urlopen(u.Request(os.environ["CTFE_INTERNAL_URL"]+sys.argv[1], data=json.dumps({{"Id": int(sys.argv[2]), "TsStarted": "20200101000000"}}).encode(), headers={{"Content-Type": "application/json"}})).read()' "$1" "$task"
}}
for f in "$TMPDIR/$run".*; do [ -e "$f" ] && cp "$f" "$out/files/"; done
ls -l "$TMPDIR" > "$out/ls"
touch "$out/done"
{body}
exit {exit_code}
"#
        );
        let path = self.dir.path().join("scripts").join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Puts `content` into the file patch store under `id`.
    pub fn patch(&self, id: &str, content: &[u8]) {
        let path = self.dir.path().join("store").join(id);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    pub async fn start(&self) -> (Daemon, Shutdown) {
        let shutdown = Shutdown::new();
        let daemon = ct_poller::start(self.config.clone(), shutdown.clone()).await.unwrap();
        (daemon, shutdown)
    }

    /// The runs recorded so far: one directory per script invocation.
    pub fn records(&self) -> Vec<Record> {
        let mut records: Vec<Record> = std::fs::read_dir(self.records_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("done").exists())
            .map(|dir| Record { dir })
            .collect();
        records.sort_by(|a, b| a.dir.cmp(&b.dir));
        records
    }

    pub fn log(&self) -> Vec<LoggedRequest> {
        self.ctfe.log()
    }

    pub fn updates(&self) -> Vec<LoggedRequest> {
        self.log().into_iter().filter(|r| r.path.starts_with("/_/update_")).collect()
    }

    pub fn fault(&self, path: &str, status: Option<u16>, body: &str, times: u32, delay_ms: u64) {
        self.ctfe.add_fault(Fault { path: path.into(), status, body: body.into(), times, delay_ms });
    }

    pub fn work_dir_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.work_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

pub struct Record {
    pub dir: PathBuf,
}

impl Record {
    pub fn argv(&self) -> Vec<String> {
        let raw = std::fs::read(self.dir.join("argv")).unwrap();
        raw.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8(s.to_vec()).unwrap()).collect()
    }

    pub fn run_id(&self) -> String {
        self.argv().iter().find_map(|a| a.strip_prefix("--run_id=").map(str::to_owned)).expect("--run_id passed")
    }

    pub fn env(&self) -> String {
        std::fs::read_to_string(self.dir.join("env")).unwrap()
    }

    /// File name -> content of the run files the script saw.
    pub fn files(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(self.dir.join("files"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect()
    }

    pub fn listing(&self) -> String {
        std::fs::read_to_string(self.dir.join("ls")).unwrap()
    }
}

/// Scrapes `/metrics` and returns the value of the series named exactly `series`
/// (e.g. `ct_poller_polls_total{result="empty"}`).
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An envelope holding one task of `member` with `fields` merged over a minimal task.
pub fn envelope(member: &str, id: i64, fields: Value) -> Vec<u8> {
    let kind = ct_poller::task::Kind::from_name(member).unwrap();
    let key = ct_poller::task::DatastoreKey {
        namespace: "cluster-telemetry".into(),
        kind: kind.spec().datastore_kind.into(),
        id,
    };
    let mut task = serde_json::json!({"DatastoreKey": key.encode(), "Username": "tester@example.com", "TsAdded": 20190115000000i64 + id});
    if let (Value::Object(t), Value::Object(f)) = (&mut task, fields) {
        t.extend(f);
    }
    serde_json::to_vec(&serde_json::json!({ member: task })).unwrap()
}

/// A child process (the binary under test) that is killed if the test fails before it is
/// stopped, so that no daemon outlives its test.
pub struct Spawned(Option<std::process::Child>);

impl Spawned {
    pub fn new(child: std::process::Child) -> Spawned {
        Spawned(Some(child))
    }

    /// SIGTERM, then everything it wrote to piped stdout/stderr and its exit status.
    pub async fn terminate(mut self) -> std::process::Output {
        let child = self.0.take().expect("not yet terminated");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
