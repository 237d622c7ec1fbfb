//! Operations: graceful drain, timeouts, process groups, bounded output, the concurrency
//! limit, the status page and the metrics exposition. Real processes, real HTTP.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// The pid a script wrote to `$RECORD_DIR/<name>`, once it exists.
async fn recorded_pid(h: &Harness, name: &str) -> i32 {
    let path = h.records_dir().join(name);
    wait_until(T, name, || std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n'))).await;
    std::fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

/// Gone, or a zombie waiting for init: either way it runs no more.
fn process_is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn gets(h: &Harness) -> usize {
    h.log().iter().filter(|r| r.path == "/_/get_oldest_pending_task").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_polling_at_once_and_waits_for_running_tasks() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(50);
    h.script("create_pagesets_on_workers", "mark_started _/update_recreate_page_sets_task\nsleep 1", 0);
    h.ctfe.enqueue(&envelope("RecreatePageSets", 1, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the task to start", || h.records().len() == 1).await;
    let addr = daemon.addr;
    let status = daemon.poller.status.clone();
    shutdown.drain.cancel();
    let at_signal = gets(&h);
    let (code, reason) = get(addr, "/readyz").await;
    assert_eq!((code, reason.trim()), (503, "draining"));
    assert_eq!(get(addr, "/healthz").await.0, 200, "draining is alive");
    daemon.wait().await;
    assert!(gets(&h) <= at_signal + 1, "no poll after the signal (one may have been in flight)");
    let finished = status.snapshot().finished;
    assert_eq!(finished[0].outcome, "succeeded", "the running task was allowed to finish");
    assert!(h.updates().iter().all(|u| !u.body.contains("\"Failure\":true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_stops_the_task_group_and_reports_it() {
    let mut h = Harness::new().await;
    h.config.drain_timeout = Duration::from_millis(300);
    h.script("capture_archives_on_workers", "sleep 60 &\necho $! > \"$RECORD_DIR/grandchild\"\nwait", 0);
    h.ctfe.enqueue(&envelope("RecreateWebpageArchives", 4, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let grandchild = recorded_pid(&h, "grandchild").await;
    let status = daemon.poller.status.clone();
    shutdown.drain.cancel();
    daemon.wait().await;
    let finished = status.snapshot().finished;
    assert_eq!(finished[0].outcome, "cancelled");
    assert_eq!(h.updates().len(), 1, "the stopped task was reported failed");
    assert!(h.updates()[0].body.contains("\"Failure\":true"));
    assert!(process_is_gone(grandchild), "the worker's whole group was stopped");
    assert!(h.work_dir_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_skips_the_wait() {
    let h = Harness::new().await;
    h.script("capture_skps_on_workers", "exec sleep 60", 0);
    h.ctfe.enqueue(&envelope("CaptureSkps", 2, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the task to start", || h.records().len() == 1).await;
    let status = daemon.poller.status.clone();
    shutdown.drain.cancel();
    shutdown.stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), daemon.wait()).await.expect("exits without waiting an hour");
    assert_eq!(status.snapshot().finished[0].outcome, "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_startup_exits_without_polling() {
    let h = Harness::new().await;
    h.fault("/_/terminate_running_tasks", Some(503), "Failed to terminate running tasks\n", 1_000, 0);
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "a terminate attempt", || !h.log().is_empty()).await;
    shutdown.drain.cancel();
    tokio::time::timeout(Duration::from_secs(5), daemon.wait()).await.expect("prompt exit");
    assert_eq!(gets(&h), 0, "never polled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_report_being_retried_survives_sigterm() {
    let h = Harness::new().await;
    h.fault("/_/update_capture_skps_task", Some(503), "busy\n", 1, 0);
    h.script("capture_skps_on_workers", "", 1);
    h.ctfe.enqueue(&envelope("CaptureSkps", 3, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the first report attempt", || h.updates().len() == 1).await;
    shutdown.drain.cancel();
    daemon.wait().await;
    assert_eq!(h.updates().len(), 2, "retried within the drain window");
    let stored = h.ctfe.task(ct_poller::task::Kind::CaptureSkps, 3).unwrap();
    assert!(stored.common().Failure, "the retry landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_timeout_stops_the_whole_group() {
    let mut h = Harness::new().await;
    h.config.timeouts.insert(ct_poller::task::Kind::PixelDiff, Duration::from_millis(500));
    h.script("pixel_diff_on_workers", "sleep 60 &\necho $! > \"$RECORD_DIR/grandchild\"\nsleep 60", 0);
    h.ctfe.enqueue(&envelope("PixelDiff", 6, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let grandchild = recorded_pid(&h, "grandchild").await;
    let status = daemon.poller.status.clone();
    wait_until(T, "the timeout", || status.snapshot().finished.len() == 1).await;
    assert_eq!(status.snapshot().finished[0].outcome, "timed_out");
    assert!(process_is_gone(grandchild));
    assert_eq!(h.updates().len(), 1);
    assert_eq!(
        metric(daemon.addr, r#"ct_poller_tasks_finished_total{kind="PixelDiff",outcome="timed_out"}"#).await,
        Some(1.0)
    );
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_ignoring_sigterm_is_killed_after_the_grace() {
    let mut h = Harness::new().await;
    h.config.task_timeout = Some(Duration::from_millis(200));
    h.script("build_chromium", "trap '' TERM\necho $$ > \"$RECORD_DIR/leader\"\nwhile :; do sleep 1; done", 0);
    h.ctfe.enqueue(&envelope("ChromiumBuild", 8, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let leader = recorded_pid(&h, "leader").await;
    let status = daemon.poller.status.clone();
    wait_until(Duration::from_secs(40), "SIGKILL after the grace", || status.snapshot().finished.len() == 1).await;
    assert_eq!(status.snapshot().finished[0].outcome, "timed_out");
    assert!(status.snapshot().finished[0].duration_seconds >= 10.0, "SIGKILL only after the 10 s grace");
    assert!(process_is_gone(leader));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grandchild_outliving_its_script_is_stopped() {
    let h = Harness::new().await;
    h.script("run_lua_on_workers", "sleep 60 &\necho $! > \"$RECORD_DIR/grandchild\"", 0);
    h.ctfe.enqueue(&envelope("LuaScript", 10, json!({"LuaScript": "x"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let grandchild = recorded_pid(&h, "grandchild").await;
    let status = daemon.poller.status.clone();
    wait_until(T, "the task to end", || status.snapshot().finished.len() == 1).await;
    assert_eq!(status.snapshot().finished[0].outcome, "succeeded");
    assert!(process_is_gone(grandchild), "no process of the task's group is left behind");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_killed_by_a_signal_is_a_failure() {
    let h = Harness::new().await;
    h.script("metrics_analysis_on_workers", "kill -KILL $$", 0);
    h.ctfe.enqueue(&envelope("MetricsAnalysis", 11, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let status = daemon.poller.status.clone();
    wait_until(T, "the task to end", || status.snapshot().finished.len() == 1).await;
    let done = &status.snapshot().finished[0];
    assert_eq!(done.outcome, "failed");
    assert!(done.reason.contains("killed by signal 9"), "{}", done.reason);
    wait_until(T, "the report", || h.updates().len() == 1).await;
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_without_a_newline_stays_bounded() {
    let mut h = Harness::new().await;
    h.config.output_limit = 1 << 20;
    h.script("run_chromium_perf_on_workers", "head -c 100000000 /dev/zero | tr '\\0' x", 0);
    h.ctfe.enqueue(&envelope("ChromiumPerf", 12, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let status = daemon.poller.status.clone();
    wait_until(Duration::from_secs(120), "the flood to end", || status.snapshot().finished.len() == 1).await;
    assert_eq!(status.snapshot().finished[0].outcome, "succeeded");
    let dropped = metric(daemon.addr, r#"ct_poller_output_dropped_bytes_total{kind="ChromiumPerf"}"#).await;
    assert_eq!(dropped, Some((100_000_000 - (1 << 20)) as f64), "everything beyond the limit was dropped from memory");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_concurrency_limit_the_poller_does_not_ask_for_work() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(50);
    h.config.max_concurrent_tasks = 1;
    h.script("capture_skps_on_workers", "mark_started _/update_capture_skps_task\nsleep 1", 0);
    h.script("build_chromium", "mark_started _/update_chromium_build_task", 0);
    h.ctfe.enqueue(&envelope("CaptureSkps", 1, json!({"TsAdded": 1}))).unwrap();
    h.ctfe.enqueue(&envelope("ChromiumBuild", 2, json!({"TsAdded": 2}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let status = daemon.poller.status.clone();
    let mut most = 0;
    wait_until(T, "both tasks", || {
        most = most.max(status.running_count());
        status.snapshot().finished.len() == 2
    })
    .await;
    assert_eq!(most, 1, "never more than one task at once");
    assert!(metric(daemon.addr, r#"ct_poller_polls_total{result="at_capacity"}"#).await.unwrap() >= 1.0);
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_and_api_show_the_running_task() {
    let h = Harness::new().await;
    h.script("run_chromium_analysis_on_workers", "echo analysing page 1\nsleep 60", 0);
    h.ctfe.enqueue(&envelope("ChromiumAnalysis", 77, json!({"Username": "lois<script>@planet"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let addr = daemon.addr;
    eventually(T, "the task's output on the page", || async { get(addr, "/").await.1.contains("analysing page 1") })
        .await;
    let (code, page) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("ChromiumAnalysis.77"));
    assert!(page.contains("lois&lt;script&gt;@planet") && !page.contains("lois<script>"), "user text is escaped");
    let api: serde_json::Value = reqwest::get(format!("http://{addr}/api/status")).await.unwrap().json().await.unwrap();
    assert_eq!(api["running"][0]["task_id"], "ChromiumAnalysis.77");
    assert_eq!(api["running"][0]["kind"], "ChromiumAnalysis");
    assert_eq!(api["running"][0]["last_output"][0], "analysing page 1");
    assert_eq!(api["last_poll"]["result"], "task");
    assert_eq!(api["draining"], false);
    if let Some(chromium) =
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().find(|p| Path::new(p).exists())
    {
        check_in_chromium(chromium, &format!("http://{addr}/"), &h.dir.path().join("status.png"));
    } else {
        assert!(std::env::var_os("CT_POLLER_REQUIRE_CHROMIUM").is_none(), "chromium is required here but missing");
        eprintln!("chromium not installed: skipping the headless-browser half of this test");
    }
    shutdown.drain.cancel();
    shutdown.stop.cancel();
    daemon.wait().await;
}

/// Loads the page in headless Chromium: the DOM it built holds the task, the screenshot
/// is a real PNG.
fn check_in_chromium(chromium: &str, url: &str, png: &Path) {
    let profile = tempfile::tempdir().unwrap();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
    ];
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let dom = std::process::Command::new(chromium)
        .args(common)
        .arg(&profile_arg)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("id=\"task-ChromiumAnalysis.77\""), "the task row is in Chromium's DOM: {dom}");
    let shot = std::process::Command::new(chromium)
        .args(common)
        .arg(&profile_arg)
        .arg(format!("--screenshot={}", png.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(shot.status.success(), "{}", String::from_utf8_lossy(&shot.stderr));
    let bytes = std::fs::read(png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000, "a real screenshot");
    if let Ok(dir) = std::env::var("CT_POLLER_SCREENSHOT_DIR") {
        std::fs::copy(png, Path::new(&dir).join("status-page.png")).unwrap();
    }
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_start_at_zero() {
    let h = Harness::new().await;
    let (daemon, shutdown) = h.start().await;
    eventually(T, "the first poll", || async { metric(daemon.addr, "healthy").await == Some(1.0) }).await;
    let text = reqwest::get(format!("http://{}/metrics", daemon.addr)).await.unwrap().text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let names: std::collections::HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for name in [
        "healthy",
        "ct_gce_bots_up",
        "ct_poller_polls_total",
        "ct_poller_tasks_started_total",
        "ct_poller_tasks_finished_total",
        "ct_poller_tasks_running",
        "ct_poller_task_duration_seconds",
        "ct_poller_ctfe_requests_total",
        "ct_poller_ctfe_request_duration_seconds",
        "ct_poller_failure_reports_total",
        "ct_poller_last_successful_poll_timestamp_seconds",
        "ct_poller_output_dropped_bytes_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(names.contains(name), "{name} is exported");
    }
    let finished = scrape.samples.iter().filter(|s| s.metric == "ct_poller_tasks_finished_total").count();
    assert_eq!(finished, 9 * 4, "every kind x outcome series exists from the start");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn json_logs_carry_the_task_fields() {
    let h = Harness::new().await;
    h.script("capture_skps_on_workers", "echo hello from the worker", 0);
    h.ctfe.enqueue(&envelope("CaptureSkps", 21, json!({}))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ct-poller"))
        .args(["--log-format", "json", "--autoscaler", "none", "--poll-interval", "1h"])
        .arg(format!("--ctfe-url=http://{}/", h.ctfe_addr))
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .arg(format!("--work-dir={}", h.work_dir().display()))
        .arg(format!("--scripts-dir={}", h.dir.path().join("scripts").display()))
        .arg(format!("--patch-store=file://{}", h.dir.path().join("store").display()))
        .env("RECORD_DIR", h.records_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Spawned::new)
        .unwrap();
    wait_until(T, "the task", || h.records().len() == 1).await;
    eventually(T, "the task to end", || async {
        metric(
            format!("127.0.0.1:{port}").parse().unwrap(),
            r#"ct_poller_tasks_finished_total{kind="CaptureSkps",outcome="succeeded"}"#,
        )
        .await
            == Some(1.0)
    })
    .await;
    let out = child.terminate().await;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let worker =
        lines.iter().find(|l| l["stream"] == "worker" && l["message"] == "hello from the worker").expect("worker line");
    assert_eq!(worker["task_id"], "CaptureSkps.21");
    assert_eq!(worker["kind"], "CaptureSkps");
    assert!(worker["run_id"].as_str().unwrap().starts_with("tester-"));
    assert_eq!(worker["level"], "INFO");
    assert!(worker["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn workers_are_the_oom_killers_first_choice() {
    let h = Harness::new().await;
    h.script("build_chromium", "cat /proc/self/oom_score_adj > \"$RECORD_DIR/oom\"", 0);
    h.ctfe.enqueue(&envelope("ChromiumBuild", 30, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let path = h.records_dir().join("oom");
    wait_until(T, "the script", || std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n'))).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "500");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_escaping_the_group_does_not_hang_the_task() {
    let h = Harness::new().await;
    // The worker leaves the task's session (and group) before the script exits.
    let body = "setsid sleep 30 &\npid=$!\nuntil [ \"$(cut -d' ' -f6 /proc/$pid/stat)\" = \"$pid\" ]; do :; done\necho $pid > \"$RECORD_DIR/escaped\"";
    h.script("capture_skps_on_workers", body, 0);
    h.ctfe.enqueue(&envelope("CaptureSkps", 40, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let escaped = recorded_pid(&h, "escaped").await;
    let status = daemon.poller.status.clone();
    wait_until(T, "the task to end although the pipe is still held", || status.snapshot().finished.len() == 1).await;
    assert_eq!(status.snapshot().finished[0].outcome, "succeeded");
    assert!(!process_is_gone(escaped), "it escaped the group, so it was not stopped");
    assert!(
        status.snapshot().finished[0].duration_seconds >= 5.0,
        "the capture waited 5 s for EOF, then stopped reading"
    );
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(escaped), nix::sys::signal::Signal::SIGKILL);
    shutdown.drain.cancel();
    daemon.wait().await;
}
