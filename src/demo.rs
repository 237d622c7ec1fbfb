//! `ct-poller demo`: the daemon against an in-process development CTFE holding one sample
//! task of each kind, patches from a temporary directory, and the sample master scripts
//! of `examples/master-scripts/` (embedded in the binary). No network, no credentials;
//! everything it writes lives in one temporary directory removed at exit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{AutoscalerKind, Config, PatchStoreUrl};
use crate::dev_ctfe::DevCtfe;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare the demo's files")]
    Files(#[source] std::io::Error),
    #[error(transparent)]
    DevCtfe(#[from] crate::dev_ctfe::Error),
    #[error(transparent)]
    Daemon(#[from] crate::Error),
    #[error("the demo's sample master scripts need python3 on PATH")]
    NoPython,
}

macro_rules! embedded {
    ($dir:literal: $($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/", $dir, "/", $name)) as &[u8]),)*]
    };
}

const SCRIPTS: &[(&str, &[u8])] = embedded!("master-scripts":
    "ct_demo_common.py", "build_chromium", "capture_archives_on_workers", "capture_skps_on_workers",
    "create_pagesets_on_workers", "metrics_analysis_on_workers", "pixel_diff_on_workers",
    "run_chromium_analysis_on_workers", "run_chromium_perf_on_workers", "run_lua_on_workers",
);

const TASKS: &[(&str, &[u8])] = embedded!("tasks":
    "capture_skps.pending.json", "chromium_analysis.pending.json", "chromium_build.pending.json",
    "chromium_perf.pending.json", "lua_script.pending.json", "metrics_analysis.pending.json",
    "pixel_diff.pending.json", "recreate_page_sets.pending.json", "recreate_webpage_archives.pending.json",
);

const PATCHES: &[(&str, &[u8])] = embedded!("patches/patches":
    "5f3dcc61c029ed38ebbcf6c3187fc28c3185fbfe.patch", "7d61a991f1b40541a4a20b6a17270ea08cd13ba9.patch",
    "a5cc1385b46c550209e572547d0003370efc5e41.patch", "b108ccc1583a4bb02455076195f18dac6772ee4b.patch",
    "bc00ec27d5ba9949545265afdc19333cd9cefe2d.patch", "d958d8697c0271622a8b50e56ec12fa0ddf28a53.patch",
    "da39a3ee5e6b4b0d3255bfef95601890afd80709.patch",
);

fn write_all(dir: &Path, files: &[(&str, &[u8])], mode: u32) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Runs the demo; returns once the queue is drained (or on a signal), unless
/// `keep_running`, which waits for a signal.
pub async fn run(
    mut config: Config,
    keep_running: bool,
    metrics_addr_given: bool,
    shutdown: Shutdown,
) -> Result<(), Error> {
    if !python3_available() {
        return Err(Error::NoPython);
    }
    let root = tempfile::Builder::new().prefix("ct-poller-demo-").tempdir().map_err(Error::Files)?;
    let (scripts, patches, work) = (root.path().join("scripts"), root.path().join("store"), root.path().join("work"));
    write_all(&scripts, SCRIPTS, 0o755).map_err(Error::Files)?;
    write_all(&patches.join("patches"), PATCHES, 0o644).map_err(Error::Files)?;
    std::fs::create_dir_all(&work).map_err(Error::Files)?;

    let ctfe = DevCtfe::new();
    for (name, envelope) in TASKS {
        ctfe.enqueue(envelope).unwrap_or_else(|e| panic!("embedded task {name} is invalid: {e}"));
    }
    let ctfe_stop = CancellationToken::new();
    let ctfe_addr = ctfe.spawn(SocketAddr::from(([127, 0, 0, 1], 0)), ctfe_stop.clone()).await?;

    config.ctfe_url = format!("http://{ctfe_addr}/").parse().expect("a valid URL");
    config.poll_interval = Duration::from_secs(1);
    config.work_dir = work;
    config.scripts_dir = Some(scripts);
    config.patch_store = PatchStoreUrl::File(patches);
    config.autoscaler.kind = AutoscalerKind::None;
    config.script.local = true;
    if !metrics_addr_given {
        config.metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    }

    let daemon_shutdown = Shutdown::new();
    let daemon = crate::start(config, daemon_shutdown.clone()).await?;
    println!("ct-poller demo: development CTFE at http://{ctfe_addr}/ with {} sample tasks", TASKS.len());
    println!("ct-poller demo: status page at http://{}/", daemon.addr);

    let poller = std::sync::Arc::clone(&daemon.poller);
    let mut reported = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.drain.cancelled() => break,
            _ = tick.tick() => {}
        }
        let snapshot = poller.status.snapshot();
        for task in &snapshot.running {
            if reported.insert(task.task.info.task_id.clone(), "running") != Some("running") {
                println!(
                    "  started   {:<28} run {} ({} by {})",
                    task.task.info.task_id, task.task.info.run_id, task.task.info.kind, task.task.info.user
                );
            }
        }
        for done in &snapshot.finished {
            if reported.insert(done.info.task_id.clone(), done.outcome) != Some(done.outcome) {
                let why = if done.reason.is_empty() { String::new() } else { format!(": {}", done.reason) };
                println!("  {:<9} {:<28} after {:.1}s{why}", done.outcome, done.info.task_id, done.duration_seconds);
            }
        }
        let drained =
            ctfe.pending_count() == 0 && poller.picked_up.is_empty() && snapshot.finished.len() >= TASKS.len();
        if drained && !keep_running {
            let failed = snapshot.finished.iter().filter(|t| t.outcome != "succeeded").count();
            let reports = ctfe.log().iter().filter(|r| r.path.starts_with("/_/update_")).count();
            println!(
                "ct-poller demo: queue drained: {} tasks, {} failed (reported to CTFE), {} update requests seen by CTFE",
                snapshot.finished.len(),
                failed,
                reports
            );
            break;
        }
    }
    daemon_shutdown.drain.cancel();
    let stop = daemon_shutdown.stop.clone();
    tokio::select! {
        _ = daemon.wait() => {}
        _ = shutdown.stop.cancelled() => { stop.cancel(); }
    }
    ctfe_stop.cancel();
    drop(root);
    Ok(())
}

fn python3_available() -> bool {
    std::process::Command::new("python3")
        .arg("-c")
        .arg("")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
