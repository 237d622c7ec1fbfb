//! One [`Metrics`] struct owning its own registry (no global default registry, so tests
//! running in parallel never mix). Names are fixed by interface.md; labels come from
//! closed sets, never ids or users. Every labelled series exists from the start at 0.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::task::Kind;

pub const POLL_RESULTS: [&str; 5] = ["task", "empty", "duplicate", "error", "at_capacity"];
pub const OUTCOMES: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];
pub const CTFE_ENDPOINTS: [&str; 3] = ["get_oldest_pending_task", "terminate_running_tasks", "update_task"];
pub const CTFE_RESULTS: [&str; 5] = ["ok", "timeout", "transport", "status", "malformed"];
pub const POLL_ERRORS: [&str; 8] =
    ["timeout", "transport", "status", "malformed", "unknown_kind", "bad_task", "bad_key", "body"];
pub const FETCH_RESULTS: [&str; 5] = ["ok", "not_found", "too_large", "invalid_id", "error"];
pub const AUTOSCALER_OPS: [&str; 5] = ["register", "unregister", "start", "stop", "delete_bot"];

pub struct Metrics {
    registry: Registry,
    pub healthy: IntGauge,
    pub gce_bots_up: IntGauge,
    pub polls: IntCounterVec,
    pub poll_errors: IntCounterVec,
    pub tasks_started: IntCounterVec,
    pub tasks_finished: IntCounterVec,
    pub tasks_running: IntGaugeVec,
    pub task_duration: HistogramVec,
    pub oldest_running_task: Gauge,
    pub ctfe_requests: IntCounterVec,
    pub ctfe_request_duration: HistogramVec,
    pub failure_reports: IntCounterVec,
    pub last_successful_poll: Gauge,
    pub output_dropped_bytes: IntCounterVec,
    pub patch_fetches: IntCounterVec,
    pub autoscaler_errors: IntCounterVec,
    pub gitcookies_refreshes: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            healthy: IntGauge::new("healthy", "1 when the last poll reached CTFE within 3 poll intervals").unwrap(),
            gce_bots_up: IntGauge::new("ct_gce_bots_up", "1 while the GCE autoscaler holds the CT bots up").unwrap(),
            polls: counter("ct_poller_polls_total", "Poll loop iterations by result", &["result"]),
            poll_errors: counter("ct_poller_poll_errors_total", "Failed polls by reason", &["reason"]),
            tasks_started: counter("ct_poller_tasks_started_total", "Tasks picked up", &["kind"]),
            tasks_finished: counter("ct_poller_tasks_finished_total", "Tasks ended, by outcome", &["kind", "outcome"]),
            tasks_running: IntGaugeVec::new(Opts::new("ct_poller_tasks_running", "Tasks running now"), &["kind"])
                .unwrap(),
            // Tasks run from seconds (a failed fetch) to days (a 10k-page perf run).
            task_duration: HistogramVec::new(
                HistogramOpts::new("ct_poller_task_duration_seconds", "Time from pick-up to end of a task").buckets(
                    vec![
                        1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
                        172800.0, 345600.0,
                    ],
                ),
                &["kind"],
            )
            .unwrap(),
            oldest_running_task: Gauge::new(
                "ct_poller_oldest_running_task_seconds",
                "Age of the longest-running task, 0 when none runs",
            )
            .unwrap(),
            ctfe_requests: counter("ct_poller_ctfe_requests_total", "CTFE requests", &["endpoint", "result"]),
            // CTFE answers in milliseconds; a datastore hiccup takes seconds; the timeout 30 s.
            ctfe_request_duration: HistogramVec::new(
                HistogramOpts::new("ct_poller_ctfe_request_duration_seconds", "CTFE request latency")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                &["endpoint"],
            )
            .unwrap(),
            failure_reports: counter("ct_poller_failure_reports_total", "Failure updates sent to CTFE", &["result"]),
            last_successful_poll: Gauge::new(
                "ct_poller_last_successful_poll_timestamp_seconds",
                "Unix time of the last poll that reached CTFE",
            )
            .unwrap(),
            output_dropped_bytes: counter(
                "ct_poller_output_dropped_bytes_total",
                "Worker output kept out of memory by --output-limit (still logged)",
                &["kind"],
            ),
            patch_fetches: counter("ct_poller_patch_fetches_total", "Patch fetches by result", &["result"]),
            autoscaler_errors: counter("ct_poller_autoscaler_errors_total", "Autoscaler call failures", &["op"]),
            gitcookies_refreshes: counter(
                "ct_poller_gitcookies_refreshes_total",
                ".gitcookies writes and git configurations, by result",
                &["result"],
            ),
            registry,
        };
        m.register_all();
        m.touch_all();
        m
    }

    fn register_all(&self) {
        let r = &self.registry;
        r.register(Box::new(self.healthy.clone())).unwrap();
        r.register(Box::new(self.gce_bots_up.clone())).unwrap();
        r.register(Box::new(self.polls.clone())).unwrap();
        r.register(Box::new(self.poll_errors.clone())).unwrap();
        r.register(Box::new(self.tasks_started.clone())).unwrap();
        r.register(Box::new(self.tasks_finished.clone())).unwrap();
        r.register(Box::new(self.tasks_running.clone())).unwrap();
        r.register(Box::new(self.task_duration.clone())).unwrap();
        r.register(Box::new(self.oldest_running_task.clone())).unwrap();
        r.register(Box::new(self.ctfe_requests.clone())).unwrap();
        r.register(Box::new(self.ctfe_request_duration.clone())).unwrap();
        r.register(Box::new(self.failure_reports.clone())).unwrap();
        r.register(Box::new(self.last_successful_poll.clone())).unwrap();
        r.register(Box::new(self.output_dropped_bytes.clone())).unwrap();
        r.register(Box::new(self.patch_fetches.clone())).unwrap();
        r.register(Box::new(self.autoscaler_errors.clone())).unwrap();
        r.register(Box::new(self.gitcookies_refreshes.clone())).unwrap();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).unwrap();
    }

    /// Creates every labelled series at 0 so that rates and alerts work from the start.
    fn touch_all(&self) {
        for result in POLL_RESULTS {
            self.polls.with_label_values(&[result]);
        }
        for reason in POLL_ERRORS {
            self.poll_errors.with_label_values(&[reason]);
        }
        for kind in Kind::ALL.map(Kind::name) {
            self.tasks_started.with_label_values(&[kind]);
            self.tasks_running.with_label_values(&[kind]);
            self.task_duration.with_label_values(&[kind]);
            self.output_dropped_bytes.with_label_values(&[kind]);
            for outcome in OUTCOMES {
                self.tasks_finished.with_label_values(&[kind, outcome]);
            }
        }
        for endpoint in CTFE_ENDPOINTS {
            self.ctfe_request_duration.with_label_values(&[endpoint]);
            for result in CTFE_RESULTS {
                self.ctfe_requests.with_label_values(&[endpoint, result]);
            }
        }
        for result in ["ok", "error"] {
            self.failure_reports.with_label_values(&[result]);
        }
        for result in FETCH_RESULTS {
            self.patch_fetches.with_label_values(&[result]);
        }
        for op in AUTOSCALER_OPS {
            self.autoscaler_errors.with_label_values(&[op]);
        }
        for result in ["ok", "error"] {
            self.gitcookies_refreshes.with_label_values(&[result]);
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).unwrap()
}
