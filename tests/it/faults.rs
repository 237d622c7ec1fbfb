//! The poll loop against a misbehaving CTFE and bad tasks: each error is logged, counted,
//! and followed by normal work.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn terminate_comes_before_the_first_poll() {
    let h = Harness::new().await;
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the first poll", || h.log().len() >= 2).await;
    let log = h.log();
    assert_eq!((log[0].method.as_str(), log[0].path.as_str()), ("POST", "/_/terminate_running_tasks"));
    assert_eq!(log[0].body, "");
    assert_eq!((log[1].method.as_str(), log[1].path.as_str()), ("GET", "/_/get_oldest_pending_task"));
    assert_eq!(get(daemon.addr, "/readyz").await.0, 200);
    assert_eq!(metric(daemon.addr, r#"ct_poller_polls_total{result="empty"}"#).await, Some(1.0));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn ctfe_down_at_start_then_up() {
    let h = Harness::new().await;
    h.fault("/_/terminate_running_tasks", Some(503), "Failed to terminate running tasks\n", 2, 0);
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "a poll after three terminate attempts", || {
        h.log().iter().any(|r| r.path == "/_/get_oldest_pending_task")
    })
    .await;
    let paths: Vec<String> = h.log().into_iter().map(|r| r.path).collect();
    assert_eq!(&paths[..3], ["/_/terminate_running_tasks"; 3]);
    assert_eq!(paths[3], "/_/get_oldest_pending_task", "never polls before terminate succeeded");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn ctfe_unreachable_at_start_is_retried_not_fatal() {
    let mut h = Harness::new().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    h.config.ctfe_url = format!("http://127.0.0.1:{port}/").parse().unwrap();
    let (daemon, shutdown) = h.start().await;
    assert_eq!(get(daemon.addr, "/readyz").await.0, 503);
    assert_eq!(get(daemon.addr, "/healthz").await.0, 200, "CTFE down must not fail liveness");
    eventually(T, "a failed terminate", || async {
        metric(daemon.addr, r#"ct_poller_ctfe_requests_total{endpoint="terminate_running_tasks",result="transport"}"#)
            .await
            .is_some_and(|v| v >= 1.0)
    })
    .await;
    // CTFE comes up on that port: the daemon recovers without a restart.
    let ctfe = ct_poller::dev_ctfe::DevCtfe::new();
    let stop = tokio_util::sync::CancellationToken::new();
    ctfe.spawn(format!("127.0.0.1:{port}").parse().unwrap(), stop.clone()).await.unwrap();
    wait_until(T, "the first poll", || ctfe.log().iter().any(|r| r.path == "/_/get_oldest_pending_task")).await;
    shutdown.drain.cancel();
    daemon.wait().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_and_followed_by_a_normal_task() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(100);
    h.script("build_chromium", "", 0);
    let path = "/_/get_oldest_pending_task";
    h.fault(path, Some(500), "Failed to get oldest pending task\n", 1, 0);
    h.fault(path, Some(200), "this is not JSON", 1, 0);
    h.fault(path, Some(200), r#"{"FooBar":{"Id":1}}"#, 1, 0);
    h.fault(path, Some(200), r#"{"ChromiumBuild":{"Username":"nokey@x"}}"#, 1, 0);
    h.ctfe.enqueue(&envelope("ChromiumBuild", 7, json!({"ChromiumRev": "abc", "SkiaRev": "def"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the task after the errors", || h.records().len() == 1).await;
    for reason in ["status", "malformed", "unknown_kind", "bad_key"] {
        let series = format!(r#"ct_poller_poll_errors_total{{reason="{reason}"}}"#);
        assert_eq!(metric(daemon.addr, &series).await, Some(1.0), "{series}");
    }
    assert_eq!(metric(daemon.addr, r#"ct_poller_polls_total{result="error"}"#).await, Some(4.0));
    assert!(h.records()[0].argv().contains(&"--task_id=7".to_string()));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_ctfe_times_out_and_the_loop_goes_on() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(100);
    h.config.ctfe_timeout = Duration::from_millis(300);
    h.fault("/_/get_oldest_pending_task", None, "", 1, 3_000);
    let (daemon, shutdown) = h.start().await;
    eventually(T, "a poll after the timeout", || async {
        metric(daemon.addr, r#"ct_poller_polls_total{result="empty"}"#).await.is_some_and(|v| v >= 1.0)
    })
    .await;
    assert_eq!(metric(daemon.addr, r#"ct_poller_poll_errors_total{reason="timeout"}"#).await, Some(1.0));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_pending_task_runs_once_over_many_polls() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(50);
    h.script("create_pagesets_on_workers", "sleep 2", 0);
    h.ctfe.enqueue(&envelope("RecreatePageSets", 3, json!({"PageSets": "10k"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    eventually(T, "many duplicate polls", || async {
        metric(daemon.addr, r#"ct_poller_polls_total{result="duplicate"}"#).await.is_some_and(|v| v >= 5.0)
    })
    .await;
    assert_eq!(h.records().len(), 1);
    assert_eq!(metric(daemon.addr, r#"ct_poller_tasks_started_total{kind="RecreatePageSets"}"#).await, Some(1.0));
    shutdown.drain.cancel();
    daemon.wait().await;
    assert_eq!(h.records().len(), 1, "drain waited for the task and picked up nothing more");
}

#[tokio::test]
async fn a_missing_patch_is_a_reported_failure() {
    let h = Harness::new().await;
    h.script("pixel_diff_on_workers", "", 0);
    h.ctfe
        .enqueue(&envelope(
            "PixelDiff",
            5,
            json!({"ChromiumPatchGSPath": "patches/missing.patch", "SkiaPatchGSPath": ""}),
        ))
        .unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the failure report", || h.updates().len() == 1).await;
    assert!(h.records().is_empty(), "the script never ran");
    assert_eq!(h.updates()[0].path, "/_/update_pixel_diff_task");
    assert!(h.work_dir_entries().is_empty());
    let finished = daemon.poller.status.snapshot().finished;
    assert!(finished[0].reason.contains("patches/missing.patch"), "{}", finished[0].reason);
    assert_eq!(metric(daemon.addr, r#"ct_poller_patch_fetches_total{result="not_found"}"#).await, Some(1.0));
    assert_eq!(metric(daemon.addr, r#"ct_poller_failure_reports_total{result="ok"}"#).await, Some(1.0));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn a_missing_script_is_a_reported_failure() {
    let h = Harness::new().await;
    h.ctfe.enqueue(&envelope("CaptureSkps", 9, json!({}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the failure report", || h.updates().len() == 1).await;
    assert_eq!(h.updates()[0].path, "/_/update_capture_skps_task");
    let finished = daemon.poller.status.snapshot().finished;
    assert_eq!(finished[0].outcome, "failed");
    assert!(finished[0].reason.contains("capture_skps_on_workers"), "{}", finished[0].reason);
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_usernames_stay_inside_the_work_dir_and_reach_the_script_literally() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(50);
    h.script("run_lua_on_workers", "mark_started _/update_lua_script_task", 0);
    h.ctfe.enqueue(&envelope("LuaScript", 1, json!({"Username": "../../x@y", "LuaScript": "print(1)"}))).unwrap();
    h.ctfe
        .enqueue(&envelope("LuaScript", 2, json!({"Username": "a b;c$(touch pwned)@d", "LuaScript": "print(2)"})))
        .unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "both tasks", || h.records().len() >= 2).await;
    shutdown.drain.cancel();
    daemon.wait().await;
    let mut emails: Vec<String> = Vec::new();
    for record in h.records().iter().take(2) {
        let run_id = record.run_id();
        assert!(run_id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)), "{run_id}");
        assert_eq!(record.files().len(), 1, "the .lua file was inside the work dir");
        emails.extend(record.argv().into_iter().filter(|a| a.starts_with("--emails=")));
    }
    emails.sort();
    emails.dedup();
    assert_eq!(emails, ["--emails=../../x@y", "--emails=a b;c$(touch pwned)@d"]);
    let parent = h.dir.path();
    let stray: Vec<_> = std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(stray.len(), 4, "nothing written beside the work dir: {stray:?}");
    assert!(!std::path::Path::new("pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_follows_ctfe_reachability() {
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(100);
    let (daemon, shutdown) = h.start().await;
    eventually(T, "healthy 1", || async { metric(daemon.addr, "healthy").await == Some(1.0) }).await;
    assert_eq!(get(daemon.addr, "/readyz").await.0, 200);
    h.ctfe.add_fault(ct_poller::dev_ctfe::Fault {
        path: "/_/get_oldest_pending_task".into(),
        status: Some(503),
        body: "down\n".into(),
        times: 1_000_000,
        delay_ms: 0,
    });
    eventually(T, "healthy 0", || async { metric(daemon.addr, "healthy").await == Some(0.0) }).await;
    let (code, reason) = get(daemon.addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(reason.contains("did not reach CTFE"), "{reason}");
    assert_eq!(get(daemon.addr, "/healthz").await.0, 200, "liveness does not depend on CTFE");
    shutdown.drain.cancel();
    daemon.wait().await;
}

type Objects = Vec<(&'static str, &'static str)>;
type Seen = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// A stand-in for the GCS JSON API (as STORAGE_EMULATOR_HOST would point to), recording
/// the request paths it sees.
async fn fake_gcs(objects: Objects) -> (std::net::SocketAddr, Seen) {
    use axum::extract::State;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let state = (objects, seen.clone());
    let app = axum::Router::new().fallback(
        |State((objects, seen)): State<(Objects, Seen)>, uri: axum::http::Uri| async move {
            let path_and_query = uri.path_and_query().unwrap().to_string();
            seen.lock().unwrap().push(path_and_query.clone());
            match objects.iter().find(|(name, _)| {
                path_and_query == format!("/storage/v1/b/cluster-telemetry/o/{}?alt=media", name.replace('/', "%2F"))
            }) {
                Some((_, content)) => (axum::http::StatusCode::OK, content.to_string()),
                None => (axum::http::StatusCode::NOT_FOUND, "No such object".to_string()),
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app.with_state(state)).await.unwrap() });
    (addr, seen)
}

#[tokio::test]
async fn gs_patches_come_from_the_storage_emulator() {
    let (gcs, seen) = fake_gcs(vec![("patches/abc.patch", "diff --git a b\n")]).await;
    let mut h = Harness::new().await;
    h.config.patch_store = ct_poller::config::PatchStoreUrl::Gcs { bucket: "cluster-telemetry".into() };
    h.config.storage_emulator_host = Some(gcs.to_string());
    h.script("pixel_diff_on_workers", "", 0);
    h.ctfe
        .enqueue(&envelope(
            "PixelDiff",
            5,
            json!({"ChromiumPatchGSPath": "patches/abc.patch", "SkiaPatchGSPath": "", "CustomWebpagesGSPath": "patches/gone.csv"}),
        ))
        .unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the failure report", || h.updates().len() == 1).await;
    let requested = seen.lock().unwrap().clone();
    assert!(requested.contains(&"/storage/v1/b/cluster-telemetry/o/patches%2Fabc.patch?alt=media".to_string()));
    assert!(requested.iter().all(|p| !p.ends_with("/o/?alt=media")), "an empty path is not fetched: {requested:?}");
    let reason = daemon.poller.status.snapshot().finished[0].reason.clone();
    assert!(reason.contains("patches/gone.csv") && reason.contains("does not exist"), "{reason}");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn gs_patches_are_written_with_a_final_newline() {
    let (gcs, _) =
        fake_gcs(vec![("patches/abc.patch", "diff --git a b"), ("patches/pages.csv", "http://a,http://b")]).await;
    let mut h = Harness::new().await;
    h.config.patch_store = ct_poller::config::PatchStoreUrl::Gcs { bucket: "cluster-telemetry".into() };
    h.config.storage_emulator_host = Some(format!("http://{gcs}"));
    h.script("pixel_diff_on_workers", "", 0);
    h.ctfe
        .enqueue(&envelope(
            "PixelDiff",
            6,
            json!({"ChromiumPatchGSPath": "patches/abc.patch", "SkiaPatchGSPath": "", "CustomWebpagesGSPath": "patches/pages.csv"}),
        ))
        .unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the script", || h.records().len() == 1).await;
    let files = h.records()[0].files();
    let run_id = h.records()[0].run_id();
    assert_eq!(files[&format!("{run_id}.chromium.patch")], b"diff --git a b\n");
    assert_eq!(files[&format!("{run_id}.skia.patch")], b"\n");
    assert_eq!(files[&format!("{run_id}.custom_webpages.csv")], b"http://a,http://b\n");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test]
async fn dry_run_logs_and_reports_nothing() {
    let mut h = Harness::new().await;
    h.config.dry_run = true;
    h.config.poll_interval = Duration::from_millis(50);
    h.script("run_chromium_perf_on_workers", "", 1);
    h.ctfe.enqueue(&fixture("chromium_perf.pending.json")).unwrap();
    for (id, content) in fixture_json("chromium_perf.files.json")["gcs_objects"].as_object().unwrap() {
        h.patch(id, content.as_str().unwrap().as_bytes());
    }
    let (daemon, shutdown) = h.start().await;
    eventually(T, "several polls", || async {
        metric(daemon.addr, r#"ct_poller_polls_total{result="duplicate"}"#).await.is_some_and(|v| v >= 3.0)
    })
    .await;
    assert!(h.records().is_empty(), "no script ran");
    assert!(h.updates().is_empty(), "nothing reported");
    assert!(h.work_dir_entries().is_empty(), "no file written");
    assert_eq!(
        metric(daemon.addr, r#"ct_poller_tasks_started_total{kind="ChromiumPerf"}"#).await,
        Some(1.0),
        "shown once"
    );
    shutdown.drain.cancel();
    daemon.wait().await;
}
