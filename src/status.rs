//! What the daemon is doing, for the probes, the status page and `/api/status`: running
//! tasks, the last finished ones, the last poll, start-up and drain state.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use tokio::time::Instant;

use crate::output::RecentLines;
use crate::task::TaskKey;

/// Finished tasks kept for the status page.
pub const FINISHED_KEPT: usize = 50;

/// What identifies a run, running or finished.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub task_id: String,
    pub kind: &'static str,
    pub id: i64,
    pub user: String,
    pub run_id: String,
    pub started: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunningTask {
    #[serde(flatten)]
    pub info: TaskInfo,
    #[serde(skip)]
    pub started_at: Instant,
    #[serde(skip)]
    pub recent: RecentLines,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinishedTask {
    #[serde(flatten)]
    pub info: TaskInfo,
    pub finished: String,
    pub outcome: &'static str,
    pub duration_seconds: f64,
    /// Why it failed, empty on success.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PollRecord {
    pub result: &'static str,
    pub at: String,
    /// The error, for `result == "error"`.
    pub error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    running: BTreeMap<String, RunningTask>,
    finished: VecDeque<FinishedTask>,
    last_poll: Option<PollRecord>,
    /// Start-up terminate succeeded.
    terminated: bool,
    draining: bool,
    /// Last loop iteration (or start-up attempt): liveness.
    last_tick: Instant,
    /// Last poll that reached CTFE: `healthy` and readiness.
    last_reached: Option<Instant>,
    last_poll_ok: bool,
}

/// Shared state; every method takes the lock briefly and never awaits under it.
#[derive(Debug)]
pub struct Status {
    inner: Mutex<Inner>,
    poll_interval: Duration,
    /// Liveness tolerance: 3 intervals plus one request timeout (a poll blocked on a
    /// hanging CTFE is still a live loop).
    live_within: Duration,
    started: DateTime<Utc>,
}

/// `/readyz`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(&'static str),
}

impl Status {
    pub fn new(poll_interval: Duration, request_timeout: Duration) -> Status {
        Status {
            inner: Mutex::new(Inner {
                running: BTreeMap::new(),
                finished: VecDeque::new(),
                last_poll: None,
                terminated: false,
                draining: false,
                last_tick: Instant::now(),
                last_reached: None,
                last_poll_ok: false,
            }),
            poll_interval,
            live_within: poll_interval * 3 + request_timeout,
            started: Utc::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn heartbeat(&self) {
        self.lock().last_tick = Instant::now();
    }

    pub fn set_terminated(&self) {
        self.lock().terminated = true;
    }

    pub fn set_draining(&self) {
        self.lock().draining = true;
    }

    /// Records a poll. `reached`: CTFE answered (anything but a transport error, a
    /// timeout or a non-200), or `None` when the poll did not ask CTFE (at capacity).
    pub fn record_poll(&self, result: &'static str, reached: Option<bool>, error: Option<String>) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.last_tick = now;
        match reached {
            Some(true) => {
                inner.last_reached = Some(now);
                inner.last_poll_ok = true;
            }
            Some(false) => inner.last_poll_ok = false,
            // At capacity the loop is alive and CTFE was fine last time: keep it healthy.
            None if inner.last_poll_ok => inner.last_reached = Some(now),
            None => {}
        }
        inner.last_poll = Some(PollRecord { result, at: rfc3339(Utc::now()), error });
    }

    /// `healthy`: the last poll reached CTFE within 3 intervals.
    pub fn is_healthy(&self) -> bool {
        let inner = self.lock();
        inner.last_poll_ok && inner.last_reached.is_some_and(|t| t.elapsed() <= self.poll_interval * 3)
    }

    /// Liveness: the loop (or start-up) iterated recently, or the daemon is draining
    /// (the loop has stopped on purpose; a restart would kill the tasks being drained).
    /// Independent of CTFE.
    pub fn is_live(&self) -> bool {
        let inner = self.lock();
        inner.draining || inner.last_tick.elapsed() <= self.live_within
    }

    pub fn readiness(&self) -> Readiness {
        let inner = self.lock();
        if inner.draining {
            Readiness::NotReady("draining")
        } else if !inner.terminated {
            Readiness::NotReady("starting: terminate_running_tasks has not succeeded yet")
        } else if !inner.last_poll_ok {
            Readiness::NotReady("the last poll did not reach CTFE")
        } else {
            Readiness::Ready
        }
    }

    pub fn add_running(&self, task: RunningTask) {
        self.lock().running.insert(task.info.task_id.clone(), task);
    }

    pub fn finish(&self, key: &TaskKey, outcome: &'static str, reason: String) -> Option<FinishedTask> {
        let mut inner = self.lock();
        let running = inner.running.remove(&key.to_string())?;
        let finished = FinishedTask {
            duration_seconds: running.started_at.elapsed().as_secs_f64(),
            info: running.info,
            finished: rfc3339(Utc::now()),
            outcome,
            reason,
        };
        if inner.finished.len() == FINISHED_KEPT {
            inner.finished.pop_back();
        }
        inner.finished.push_front(finished.clone());
        Some(finished)
    }

    /// Age of the oldest running task.
    pub fn oldest_running(&self) -> Duration {
        self.lock().running.values().map(|t| t.started_at.elapsed()).max().unwrap_or_default()
    }

    pub fn running_count(&self) -> usize {
        self.lock().running.len()
    }

    /// A consistent copy for rendering.
    pub fn snapshot(&self) -> Snapshot {
        let ready = self.readiness();
        let healthy = self.is_healthy();
        let inner = self.lock();
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            started: rfc3339(self.started),
            now: rfc3339(Utc::now()),
            healthy,
            ready: ready == Readiness::Ready,
            not_ready_reason: match ready {
                Readiness::Ready => None,
                Readiness::NotReady(reason) => Some(reason),
            },
            draining: inner.draining,
            last_poll: inner.last_poll.clone(),
            running: inner
                .running
                .values()
                .map(|t| RunningView {
                    task: t.clone(),
                    elapsed_seconds: t.started_at.elapsed().as_secs(),
                    last_output: t.recent.snapshot(),
                })
                .collect(),
            finished: inner.finished.iter().cloned().collect(),
        }
    }
}

/// `/api/status` (schema documented in README).
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub version: &'static str,
    pub started: String,
    pub now: String,
    pub healthy: bool,
    pub ready: bool,
    pub not_ready_reason: Option<&'static str>,
    pub draining: bool,
    pub last_poll: Option<PollRecord>,
    pub running: Vec<RunningView>,
    pub finished: Vec<FinishedTask>,
}

#[derive(Debug, Serialize)]
pub struct RunningView {
    #[serde(flatten)]
    pub task: RunningTask,
    pub elapsed_seconds: u64,
    pub last_output: Vec<String>,
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}
