//! The poll loop and the life of each picked-up task.
//!
//! Invariants: at most one future per `<TaskName>.<id>` ([`PickedUp::claim`] checks and
//! inserts under one lock; the [`Claim`] guard removes the key on every path, panics
//! included); every successful autoscaler `register` is matched by an `unregister`; every
//! task that does not succeed is reported to CTFE (except in `--dry-run`); the loop never
//! exits because CTFE, storage or a task misbehaves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

use crate::autoscaler::Autoscaler;
use crate::config::Config;
use crate::ctfe::{self, Client};
use crate::error_chain;
use crate::executor::{self, Exit, Invocation, RunFiles};
use crate::metrics::Metrics;
use crate::output::{Captured, RecentLines};
use crate::retry::{Backoff, Retryable};
use crate::shutdown::Shutdown;
use crate::status::{rfc3339, RunningTask, Status, TaskInfo};
use crate::storage::PatchStore;
use crate::task::argv::{self, go_timestamp, RunId, RunIds, Source};
use crate::task::{Pending, TaskKey};

/// The set of tasks this poller has picked up and not finished, and when recently
/// finished ones were released.
#[derive(Debug, Clone, Default)]
pub struct PickedUp(Arc<Mutex<PickedUpInner>>);

#[derive(Debug, Default)]
struct PickedUpInner {
    claimed: HashSet<TaskKey>,
    /// Release times, kept only as long as a poll sent before them may still answer.
    released: HashMap<TaskKey, std::time::Instant>,
}

/// Ownership of one picked-up task; dropping it releases the key.
#[derive(Debug)]
pub struct Claim {
    set: PickedUp,
    key: TaskKey,
}

impl PickedUp {
    fn lock(&self) -> std::sync::MutexGuard<'_, PickedUpInner> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Check and insert under one lock, for an answer to a poll sent at `polled_at`.
    /// `None`: this poller already runs the task, or finished it after that poll was
    /// sent (CTFE answered before the script marked it started: a stale offer).
    /// Polls are sequential, so releases older than `polled_at` are forgotten here.
    pub fn claim(&self, key: TaskKey, polled_at: std::time::Instant) -> Option<Claim> {
        let mut inner = self.lock();
        inner.released.retain(|_, at| *at > polled_at);
        let fresh = !inner.released.contains_key(&key) && inner.claimed.insert(key);
        fresh.then(|| Claim { set: self.clone(), key })
    }

    pub fn len(&self) -> usize {
        self.lock().claimed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Claim {
    pub fn key(&self) -> TaskKey {
        self.key
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut inner = self.set.lock();
        inner.claimed.remove(&self.key);
        inner.released.insert(self.key, std::time::Instant::now());
    }
}

/// A poll's result, the `result` label of `ct_poller_polls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    Task,
    Empty,
    Duplicate,
    Error,
    AtCapacity,
}

impl PollResult {
    pub fn label(self) -> &'static str {
        match self {
            PollResult::Task => "task",
            PollResult::Empty => "empty",
            PollResult::Duplicate => "duplicate",
            PollResult::Error => "error",
            PollResult::AtCapacity => "at_capacity",
        }
    }
}

/// How a task ended, the `outcome` label of `ct_poller_tasks_finished_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed(String),
    TimedOut,
    Cancelled,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
        }
    }

    fn reason(&self) -> String {
        match self {
            Outcome::Succeeded => String::new(),
            Outcome::Failed(reason) => reason.clone(),
            Outcome::TimedOut => "timed out".into(),
            Outcome::Cancelled => "stopped by shutdown".into(),
        }
    }
}

/// Everything the loop and the task futures share.
pub struct Poller {
    pub config: Arc<Config>,
    pub ctfe: Client,
    pub store: PatchStore,
    pub autoscaler: Arc<dyn Autoscaler>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub picked_up: PickedUp,
    pub run_ids: RunIds,
    pub tracker: TaskTracker,
    /// `--dry-run`: tasks already shown, so that each is logged once.
    dry_run_seen: Mutex<HashSet<TaskKey>>,
}

impl Poller {
    pub fn new(
        config: Arc<Config>,
        ctfe: Client,
        store: PatchStore,
        autoscaler: Arc<dyn Autoscaler>,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
    ) -> Poller {
        Poller {
            config,
            ctfe,
            store,
            autoscaler,
            metrics,
            status,
            picked_up: PickedUp::default(),
            run_ids: RunIds::default(),
            tracker: TaskTracker::new(),
            dry_run_seen: Mutex::default(),
        }
    }

    /// Start-up terminate, the poll loop, then the drain. Returns when every task ended.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        if self.terminate_running_tasks(&shutdown.drain).await {
            self.poll_until_drain(&shutdown).await;
        }
        self.drain(&shutdown).await;
    }

    /// Retries until CTFE accepts, or shutdown. Never polls before (a late terminate
    /// would fail tasks this poller started).
    async fn terminate_running_tasks(&self, cancel: &CancellationToken) -> bool {
        let backoff = Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            max_attempts: None,
            retry_permanent: true,
        };
        let result = backoff
            .retry("terminate_running_tasks", cancel, |_| {
                self.status.heartbeat();
                self.ctfe.terminate_running_tasks()
            })
            .await;
        match result {
            Ok(()) => {
                info!("CTFE terminated the tasks left running by a previous poller");
                self.status.set_terminated();
                true
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "shutdown before terminate_running_tasks succeeded");
                false
            }
        }
    }

    async fn poll_until_drain(self: &Arc<Self>, shutdown: &Shutdown) {
        let mut tick = interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.drain.cancelled() => break,
                _ = tick.tick() => {
                    // A poll in flight when the signal comes is abandoned: no request to
                    // CTFE after the signal, and no pick-up it could not run.
                    tokio::select! {
                        biased;
                        _ = shutdown.drain.cancelled() => break,
                        _ = self.poll_once(shutdown) => {}
                    }
                }
            }
        }
    }

    /// One poll. Logs and counts its own errors; never fails.
    pub async fn poll_once(self: &Arc<Self>, shutdown: &Shutdown) -> PollResult {
        let limit = self.config.max_concurrent_tasks;
        let (result, reached, error) = if limit > 0 && self.picked_up.len() >= limit {
            (PollResult::AtCapacity, None, None)
        } else {
            let polled_at = std::time::Instant::now();
            match self.ctfe.get_oldest_pending_task().await {
                Ok(None) => (PollResult::Empty, Some(true), None),
                Ok(Some(pending)) => (self.pick_up(pending, polled_at, shutdown), Some(true), None),
                Err(e) => {
                    let reached = matches!(e, ctfe::Error::Decode { .. });
                    let message = error_chain(&e);
                    error!(error = %message, reason = e.label(), "poll failed");
                    self.metrics.poll_errors.with_label_values(&[e.label()]).inc();
                    (PollResult::Error, Some(reached), Some(message))
                }
            }
        };
        self.metrics.polls.with_label_values(&[result.label()]).inc();
        if reached == Some(true) {
            self.metrics.last_successful_poll.set(Utc::now().timestamp_millis() as f64 / 1000.0);
        }
        self.status.record_poll(result.label(), reached, error);
        self.metrics.healthy.set(i64::from(self.status.is_healthy()));
        result
    }

    fn pick_up(self: &Arc<Self>, pending: Pending, polled_at: std::time::Instant, shutdown: &Shutdown) -> PollResult {
        let key = pending.key;
        if self.config.dry_run && !self.dry_run_seen.lock().unwrap_or_else(PoisonError::into_inner).insert(key) {
            return PollResult::Duplicate;
        }
        let Some(claim) = self.picked_up.claim(key, polled_at) else {
            return PollResult::Duplicate;
        };
        let run_id = self.run_ids.allocate(&pending.task.common().Username, Utc::now());
        let span = info_span!("task", task_id = %key, kind = key.kind.name(), run_id = run_id.as_str());
        info!(parent: &span, "picked up task {key}");
        self.metrics.tasks_started.with_label_values(&[key.kind.name()]).inc();
        self.metrics.tasks_running.with_label_values(&[key.kind.name()]).inc();
        let recent = RecentLines::default();
        self.status.add_running(RunningTask {
            info: TaskInfo {
                task_id: key.to_string(),
                kind: key.kind.name(),
                id: key.id,
                user: pending.task.common().Username.clone(),
                run_id: run_id.as_str().to_owned(),
                started: rfc3339(run_id.started),
            },
            started_at: Instant::now(),
            recent: recent.clone(),
        });
        let this = Arc::clone(self);
        let stop = shutdown.stop.clone();
        self.tracker.spawn(this.supervise(Arc::new(pending), claim, run_id, recent, stop).instrument(span));
        PollResult::Task
    }

    /// The whole life of a picked-up task. Holds the claim until the very end; the body
    /// runs in its own tokio task so that a panic there is a failure, not a leak.
    async fn supervise(
        self: Arc<Self>,
        pending: Arc<Pending>,
        claim: Claim,
        run_id: RunId,
        recent: RecentLines,
        stop: CancellationToken,
    ) {
        let key = claim.key();
        let gce = !self.config.dry_run && argv::runs_on_gce(pending.spec(), &pending.task);
        let registered = if gce { self.register(&key, &stop).await } else { Ok(()) };
        let outcome = match registered {
            Err(reason) => Outcome::Failed(reason),
            Ok(()) => {
                let body = tokio::spawn(
                    Arc::clone(&self)
                        .execute(Arc::clone(&pending), run_id.as_str().to_owned(), recent, stop.clone())
                        .in_current_span(),
                );
                let outcome = body.await.unwrap_or_else(|join| {
                    error!(error = %join, "task body panicked");
                    Outcome::Failed("the poller's task body panicked".into())
                });
                if gce {
                    if let Err(e) = self.autoscaler.unregister(&key).await {
                        self.metrics.autoscaler_errors.with_label_values(&["unregister"]).inc();
                        error!(error = %error_chain(&e), "autoscaler unregister failed");
                    }
                }
                outcome
            }
        };
        match &outcome {
            Outcome::Succeeded => info!("task {key} completed"),
            other => error!(outcome = other.label(), reason = %other.reason(), "task {key} failed"),
        }
        if outcome != Outcome::Succeeded && !self.config.dry_run {
            self.report_failure(&pending, &run_id, &stop).await;
        }
        let kind = key.kind.name();
        self.metrics.tasks_finished.with_label_values(&[kind, outcome.label()]).inc();
        self.metrics.tasks_running.with_label_values(&[kind]).dec();
        if let Some(done) = self.status.finish(&key, outcome.label(), outcome.reason()) {
            self.metrics.task_duration.with_label_values(&[kind]).observe(done.duration_seconds);
        }
        drop(claim);
    }

    /// Registers with the autoscaler, retrying until `--register-timeout` from pick-up
    /// (an attempt still in flight then is dropped: `register` must be cancel-safe).
    async fn register(&self, key: &TaskKey, stop: &CancellationToken) -> Result<(), String> {
        let timeout = self.config.register_timeout;
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_attempts: None,
            retry_permanent: true,
        };
        let attempts = backoff.retry("autoscaler registration", stop, |_| async {
            let result = self.autoscaler.register(key).await;
            if result.is_err() {
                self.metrics.autoscaler_errors.with_label_values(&["register"]).inc();
            }
            result
        });
        match tokio::time::timeout(timeout, attempts).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("autoscaler registration failed: {}", error_chain(&e))),
            Err(_) => {
                Err(format!("autoscaler registration did not succeed within {}", humantime::format_duration(timeout)))
            }
        }
    }

    /// Fetches the files, runs the script, returns how it went. Run files are removed
    /// when this returns, whatever the path.
    async fn execute(
        self: Arc<Self>,
        pending: Arc<Pending>,
        run_id: String,
        recent: RecentLines,
        stop: CancellationToken,
    ) -> Outcome {
        let spec = pending.spec();
        let mut files = Vec::new();
        for (suffix, source) in argv::planned_files(&pending) {
            let content = match source {
                Source::Inline(bytes) => bytes,
                // An empty path is an empty patch: no fetch (B2).
                Source::Patch(id) if id.is_empty() => b"\n".to_vec(),
                Source::Patch(id) => match self.store.fetch(&id, &self.metrics, &stop).await {
                    Ok(mut bytes) => {
                        bytes.push(b'\n');
                        bytes
                    }
                    Err(e) => return Outcome::Failed(format!("fetching {suffix}: {}", error_chain(&e))),
                },
            };
            files.push((suffix, content));
        }
        let args = argv::argv(&pending, &run_id, &self.config.script);
        let program = executor::program(self.config.scripts_dir.as_deref(), spec.script);
        if self.config.dry_run {
            let listed: Vec<String> = files
                .iter()
                .map(|(suffix, c)| format!("{}/{run_id}{suffix} ({} bytes)", self.config.work_dir.display(), c.len()))
                .collect();
            info!(program = %program.display(), argv = ?args, files = ?listed, "dry run: would run");
            return Outcome::Succeeded;
        }
        let _files = match RunFiles::write(&self.config.work_dir, &run_id, &files) {
            Ok(written) => written,
            Err(e) => return Outcome::Failed(error_chain(&e)),
        };
        let mut env = vec![
            ("TMPDIR".to_owned(), self.config.work_dir.display().to_string()),
            ("CTFE_INTERNAL_URL".to_owned(), self.config.ctfe_url.to_string()),
        ];
        env.extend(self.config.child_env.iter().cloned());
        let invocation = Invocation {
            program,
            args,
            env,
            time_limit: self.config.timeout_for(pending.key.kind),
            output_limit: self.config.output_limit,
            log_fields: (pending.key.to_string(), spec.name, run_id.clone()),
        };
        info!("========== Start of stdout and stderr for {} {run_id} ==========", spec.script);
        let finished = match executor::run(&invocation, &stop, recent).await {
            Ok(finished) => finished,
            Err(e) => return Outcome::Failed(error_chain(&e)),
        };
        info!("========== End of stdout and stderr for {} {run_id} ==========", spec.script);
        if finished.output.dropped > 0 {
            self.metrics.output_dropped_bytes.with_label_values(&[spec.name]).inc_by(finished.output.dropped);
        }
        print_output(spec.script, &run_id, &finished.output);
        match finished.exit {
            Exit::Succeeded => Outcome::Succeeded,
            Exit::Failed(_) => Outcome::Failed(format!("{} {}", spec.script, finished.exit)),
            Exit::TimedOut => Outcome::TimedOut,
            Exit::Cancelled => Outcome::Cancelled,
        }
    }

    /// POSTs the failure update, retrying transient errors (about 10 tries over 10
    /// minutes). Once `stop` has fired (drain over) one more attempt is made, no retries.
    async fn report_failure(&self, pending: &Pending, run_id: &RunId, stop: &CancellationToken) {
        let backoff = Backoff {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(120),
            max_attempts: Some(10),
            retry_permanent: false,
        };
        let ts_started = run_id.timestamp();
        let result = backoff
            .retry("failure report", stop, |_| {
                let ts_completed = go_timestamp(Utc::now());
                let ts_started = ts_started.clone();
                async move { self.ctfe.report_failure(pending, &ts_started, &ts_completed).await }
            })
            .await;
        match result {
            Ok(()) => {
                self.metrics.failure_reports.with_label_values(&["ok"]).inc();
                info!("reported the failure to CTFE");
            }
            Err(e) => {
                self.metrics.failure_reports.with_label_values(&["error"]).inc();
                error!(error = %error_chain(&e), "could not report the failure to CTFE");
            }
        }
    }

    /// Stop polling, wait up to `--drain-timeout` (or a second signal), then stop the
    /// remaining tasks' process groups and wait for their reports.
    async fn drain(&self, shutdown: &Shutdown) {
        self.status.set_draining();
        self.tracker.close();
        let running = self.picked_up.len();
        if running > 0 {
            info!(running, drain_timeout = ?self.config.drain_timeout, "draining: waiting for running tasks");
        }
        tokio::select! {
            _ = self.tracker.wait() => {}
            _ = tokio::time::sleep(self.config.drain_timeout) => {
                warn!(running = self.picked_up.len(), "drain timeout: stopping the remaining tasks");
            }
            _ = shutdown.stop.cancelled() => {
                warn!(running = self.picked_up.len(), "second signal: stopping the remaining tasks");
            }
        }
        shutdown.stop.cancel();
        self.tracker.wait().await;
        info!("drained");
    }
}

/// The original's end-of-task block on stdout (seed 69-99), bounded by `--output-limit`
/// and written straight from the capture buffers.
fn print_output(script: &str, run_id: &str, output: &Captured) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "========== Start of stdout and stderr for {script} {run_id} ==========");
    let _ = output.write_to(&mut out);
    let _ = writeln!(out, "========== End of stdout and stderr for {script} {run_id} ==========\n");
    let _ = out.flush();
}

/// Registration is retried until `--register-timeout`, whatever failed.
impl Retryable for crate::autoscaler::Error {
    fn is_transient(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Kind;

    #[test]
    fn claims_are_exclusive_and_released_on_drop() {
        let set = PickedUp::default();
        let key = TaskKey { kind: Kind::ChromiumPerf, id: 42 };
        let before = std::time::Instant::now();
        let claim = set.claim(key, before).unwrap();
        assert!(set.claim(key, before).is_none());
        assert_eq!(set.len(), 1);
        drop(claim);
        assert!(set.is_empty());
        assert!(set.claim(key, before).is_none(), "an answer to a poll sent before the release is stale");
        assert!(set.claim(key, std::time::Instant::now()).is_some(), "a later poll may offer it again");
    }

    #[test]
    fn claims_are_released_by_a_panic() {
        let set = PickedUp::default();
        let key = TaskKey { kind: Kind::LuaScript, id: 1 };
        let s = set.clone();
        let r = std::panic::catch_unwind(move || {
            let _claim = s.claim(key, std::time::Instant::now()).unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert!(set.is_empty());
    }
}
