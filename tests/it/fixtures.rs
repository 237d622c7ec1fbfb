//! Every fixture kind, end to end: the exact argv, the exact run files (and their removal),
//! no update on success, and the failure update's exact bytes on exit 1.

use std::time::Duration;

use ct_poller::task::Kind;

use crate::common::*;

async fn run_fixture(kind: &str, exit_code: i32) {
    let h = Harness::new().await;
    let files = fixture_json(&format!("{kind}.files.json"));
    for (id, content) in files["gcs_objects"].as_object().unwrap() {
        h.patch(id, content.as_str().unwrap().as_bytes());
    }
    let expected: Vec<String> = serde_json::from_value(fixture_json(&format!("{kind}.argv.json"))).unwrap();
    h.script(&expected[0], "", exit_code);
    h.ctfe.enqueue(&fixture(&format!("{kind}.pending.json"))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let status = daemon.poller.status.clone();
    wait_until(Duration::from_secs(20), "the task to finish", || status.snapshot().finished.len() == 1).await;

    let records = h.records();
    assert_eq!(records.len(), 1, "the script ran once");
    let record = &records[0];
    let run_id = record.run_id();
    let ts = run_id.strip_prefix("superman-").expect("run id is <user>-<timestamp>");
    assert!(ts.len() == 14 && ts.chars().all(|c| c.is_ascii_digit()), "run id {run_id}");

    let work = h.work_dir().display().to_string();
    let substitute = |s: &str| s.replace("{RUN_ID}", &run_id).replace("{WORK_DIR}", &work);
    let argv = record.argv();
    // A shell script's $0 is the path the kernel ran it by (argv[0] is the bare name).
    assert!(argv[0].ends_with(&format!("/{}", expected[0])), "program {}", argv[0]);
    let expected_args: Vec<String> = expected[1..].iter().map(|a| substitute(a)).collect();
    assert_eq!(argv[1..], expected_args[..], "argv of {kind}");
    assert!(record.env().lines().any(|l| l == format!("TMPDIR={work}")), "children get TMPDIR = work dir");

    let mut expected_files = std::collections::BTreeMap::new();
    for f in files["files"].as_array().unwrap() {
        let path = substitute(f["path"].as_str().unwrap());
        let name = path.strip_prefix(&format!("{work}/")).unwrap().to_owned();
        expected_files.insert(name, f["content"].as_str().unwrap().as_bytes().to_vec());
    }
    assert_eq!(record.files(), expected_files, "run files of {kind}");
    for line in record.listing().lines().filter(|l| l.contains(&run_id)) {
        assert!(line.starts_with("-rw-------"), "run files are 0600: {line}");
    }
    assert!(h.work_dir_entries().is_empty(), "run files removed: {:?}", h.work_dir_entries());

    let updates = h.updates();
    if exit_code == 0 {
        assert!(updates.is_empty(), "no update on success: {updates:?}");
        assert_eq!(status.snapshot().finished[0].outcome, "succeeded");
    } else {
        let spec = fixture_json(&format!("{kind}.failed-update.json"));
        assert_eq!(updates.len(), 1, "exactly one failure update");
        assert_eq!(updates[0].method, "POST");
        assert_eq!(updates[0].path, spec["path"].as_str().unwrap());
        let body: serde_json::Value = serde_json::from_str(&updates[0].body).unwrap();
        let completed = body["TsCompleted"].as_str().unwrap();
        assert!(completed.len() == 14 && completed >= ts, "TsCompleted {completed}");
        // The original's bytes, except TsStarted (B1: the pick-up time, not "").
        let expected_body = spec["body_template"]
            .as_str()
            .unwrap()
            .replace("{TS_COMPLETED}", completed)
            .replace(r#""TsStarted":"""#, &format!(r#""TsStarted":"{ts}""#));
        assert_eq!(updates[0].body, expected_body);
        // CTFE now sees the task as started and failed: it is no longer offered (B1).
        let stored = h.ctfe.task(Kind::from_name(fixture_task_name(kind)).unwrap(), 42).unwrap();
        assert!(stored.common().Failure && stored.common().TaskDone);
        assert_eq!(stored.common().TsStarted.to_string(), ts);
        assert_eq!(h.ctfe.pending_count(), 0);
    }
    shutdown.drain.cancel();
    daemon.wait().await;
}

fn fixture_task_name(kind: &str) -> &'static str {
    let names = ct_poller::task::Kind::ALL.map(|k| k.name());
    let camel: String = kind.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
    names.into_iter().find(|n| *n == camel).unwrap()
}

macro_rules! fixture_tests {
    ($($kind:ident),*) => {
        mod succeeds {
            $(#[tokio::test]
            async fn $kind() {
                super::run_fixture(stringify!($kind), 0).await;
            })*
        }
        mod fails {
            $(#[tokio::test]
            async fn $kind() {
                super::run_fixture(stringify!($kind), 1).await;
            })*
        }
    };
}

fixture_tests!(
    capture_skps,
    chromium_analysis,
    chromium_build,
    chromium_perf,
    lua_script,
    metrics_analysis,
    pixel_diff,
    recreate_page_sets,
    recreate_webpage_archives
);

/// The development CTFE serves every fixture byte for byte, and the empty queue exactly.
#[tokio::test]
async fn dev_ctfe_serves_the_exact_fixture_bytes() {
    let h = Harness::new().await;
    let url = format!("http://{}/_/get_oldest_pending_task", h.ctfe_addr);
    assert_eq!(reqwest::get(&url).await.unwrap().bytes().await.unwrap(), fixture("empty.pending.json"));
    for kind in KINDS {
        let ctfe = ct_poller::dev_ctfe::DevCtfe::new();
        ctfe.enqueue(&fixture(&format!("{kind}.pending.json"))).unwrap();
        assert_eq!(
            String::from_utf8(ctfe.oldest_pending_body()).unwrap(),
            String::from_utf8(fixture(&format!("{kind}.pending.json"))).unwrap(),
            "{kind}"
        );
    }
}

/// Decoding accepts every fixture and yields the right kind and ID.
#[test]
fn every_fixture_decodes() {
    for kind in KINDS {
        let pending = ct_poller::task::decode_envelope(&fixture(&format!("{kind}.pending.json"))).unwrap().unwrap();
        assert_eq!(pending.key.id, 42);
        assert_eq!(pending.key.kind.name(), fixture_task_name(kind));
        assert_eq!(pending.key.to_string(), format!("{}.42", fixture_task_name(kind)));
    }
}
