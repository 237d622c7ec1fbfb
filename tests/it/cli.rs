//! The binary as an operator runs it: exit codes, configuration errors, signals, and the
//! `dev-ctfe` subcommand.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_ct-poller");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn bad_values_exit_2_naming_the_option_before_any_request() {
    let h = Harness::new().await;
    let ctfe = format!("http://{}/", h.ctfe_addr);
    let cases: &[(&[&str], &str)] = &[
        (&["--poll-interval", "soon"], "--poll-interval"),
        (&["--output-limit", "lots"], "--output-limit"),
        (&["--autoscaler", "k8s"], "--autoscaler"),
        (&["--log-format", "xml"], "--log-format"),
        (&["--max-concurrent-tasks=-1"], "--max-concurrent-tasks"),
        (&["--no-such-flag"], "--no-such-flag"),
    ];
    for (args, option) in cases {
        let out = Command::new(BIN).args(["--ctfe-url", &ctfe, "--autoscaler", "none"]).args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(option), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN).args(["--ctfe-url", &ctfe]).env("CT_POLLER_POLL_INTERVAL", "often").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--poll-interval"));
    let config = h.dir.path().join("bad.toml");
    std::fs::write(&config, "poll_interval = \"30s\"\nctfe_urll = \"http://x/\"\n").unwrap();
    let out = Command::new(BIN).args(["--ctfe-url", &ctfe, "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ctfe_urll"));
    assert!(h.log().is_empty(), "no request before validation: {:?}", h.log());
}

#[tokio::test]
async fn the_binary_polls_serves_probes_and_drains_on_sigterm() {
    let h = Harness::new().await;
    let port = free_port();
    let child = Command::new(BIN)
        .args(["--ctfe_internal_url", &format!("http://{}", h.ctfe_addr)])
        .args(["-poll_interval=100ms", &format!("--prom_port=127.0.0.1:{port}"), "--local", "--logtostderr"])
        .arg(format!("--work-dir={}", h.work_dir().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned::new)
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(Duration::from_secs(20), "ready", || async {
        reqwest::get(format!("http://{addr}/readyz")).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(metric(addr, "healthy").await, Some(1.0));
    assert!(metric(addr, "process_resident_memory_bytes").await.is_some_and(|v| v > 0.0));
    let (code, page) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("ct-poller"));
    assert_eq!(child.terminate().await.status.code(), Some(0));
}

#[tokio::test]
async fn dev_ctfe_subcommand_serves_a_task_directory() {
    let port = free_port();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let child = Command::new(BIN)
        .args(["dev-ctfe", "--addr", &format!("127.0.0.1:{port}"), "--tasks"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned::new)
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/_/get_oldest_pending_task");
    let mut body = None;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&url).await {
            body = Some(r.bytes().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The smallest TsAdded across the nine fixtures wins (ctfe-wire.md §2.2).
    let oldest = KINDS
        .iter()
        .min_by_key(|k| {
            let v: serde_json::Value = fixture_json(&format!("{k}.pending.json"));
            v.as_object().unwrap().values().find(|t| !t.is_null()).unwrap()["TsAdded"].as_i64().unwrap()
        })
        .unwrap();
    assert_eq!(body.expect("dev-ctfe answered"), fixture(&format!("{oldest}.pending.json")));
    let r =
        reqwest::Client::new().get(format!("http://127.0.0.1:{port}/_/terminate_running_tasks")).send().await.unwrap();
    assert_eq!(r.status(), 405, "only POST is routed");
    let r = reqwest::get(format!("http://127.0.0.1:{port}/_/nothing_here")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(child.terminate().await.status.code(), Some(0));
}

#[tokio::test]
async fn the_demo_runs_every_kind_and_exits_0() {
    let out = tokio::task::spawn_blocking(|| Command::new(BIN).arg("demo").stdin(Stdio::null()).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("queue drained: 9 tasks, 1 failed"), "{stdout}");
    assert!(stdout.contains("failed    ChromiumBuild.42"), "the failure is shown: {stdout}");
    assert!(stdout.contains("status page at http://127.0.0.1:"));
}
