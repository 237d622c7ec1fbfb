//! `--autoscaler gce`: the CT GCE fleet (`ct-gce-001` … by default) kept up while GCE
//! tasks run: the original's `ct_autoscaler` (ctfe-wire.md §9) with B3/B4/B5/B8 fixed.
//!
//! Owns the count of registered GCE tasks (a count, not a set: one task registered twice
//! counts twice) and the fleet's state. One driver task makes every Compute Engine and
//! Swarming call; `register` and `unregister` only change counts under a lock and wait for
//! the driver, so a caller that gives up (`--register-timeout`, shutdown) never leaves a
//! start or stop half done, and the poll loop never waits for the fleet.
//!
//! Invariants:
//! - the fleet is wanted up exactly while a task is registered or waiting to be; the
//!   driver brings it there, one transition at a time (starts and stops never overlap);
//! - at construction the fleet is stopped and its bots deleted, in the background;
//! - bots are deleted only after their instances have stopped, never while the fleet is up;
//! - `ct_gce_bots_up` is 1 only from a completed start to the next stop;
//! - a failed start takes no count: its waiters all get its error and the poller retries;
//!   if nobody does within `failed_start_grace`, the fleet is stopped;
//! - failures are logged, counted in `ct_poller_autoscaler_errors_total{op}` and retried
//!   (each call a few times, a failed stop for ever, with backoff); nothing here panics or
//!   ends the process. No ssh key is needed (B5); a bot Swarming does not know (404) is
//!   already deleted (B4).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Autoscaler, BoxFuture, Error, Op};
use crate::auth::TokenSource;
use crate::config::{join, AutoscalerConfig, SwarmingApi};
use crate::error_chain;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::task::TaskKey;

/// Timing of the fleet calls: the original's values where it had them. Not options;
/// tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Between two polls of a zone operation, or of an instance's status (original: 5 s).
    pub poll_interval: Duration,
    /// How long a zone operation may take to be DONE, and then the instance to reach its
    /// status (original: 10 min each).
    pub operation_timeout: Duration,
    /// Attempts (`max_attempts`) and backoff of one instance or bot call.
    pub call: Backoff,
    /// Backoff between whole-fleet retries of a failed stop (the start-up stop included).
    pub fleet: Backoff,
    /// After a failed start with no task waiting: how long the fleet is left as it is for
    /// the poller's next attempt (its backoff tops out at 60 s) before it is stopped.
    pub failed_start_grace: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            poll_interval: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(600),
            call: Backoff {
                initial: Duration::from_secs(2),
                max: Duration::from_secs(30),
                max_attempts: Some(3),
                retry_permanent: false,
            },
            fleet: Backoff {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(300),
                max_attempts: None,
                retry_permanent: true,
            },
            failed_start_grace: Duration::from_secs(120),
        }
    }
}

/// Where the fleet is. `Starting` and `Stopping` last while the driver's calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    /// After a failed start or stop: some instances may run.
    Unknown,
    Starting,
    /// Every instance RUNNING.
    Up,
    Stopping,
    /// Every instance TERMINATED and its bot deleted.
    Down,
}

/// The autoscaler's state, for the status page and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Tasks registered (the reference count).
    pub registered: usize,
    /// Registrations waiting for the fleet to come up.
    pub waiting: usize,
    pub fleet: Fleet,
}

/// The GCE autoscaler; cheap to share behind an `Arc<dyn Autoscaler>`. Dropping it ends
/// its driver.
pub struct GceAutoscaler {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

impl GceAutoscaler {
    /// Starts the driver, whose first job is the start-up stop of the fleet and deletion
    /// of its bots; returns at once (that work blocks neither readiness nor polling).
    /// `cancel` ends the driver, as dropping the autoscaler does.
    pub fn new(
        config: &AutoscalerConfig,
        tokens: Arc<TokenSource>,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> GceAutoscaler {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("the TLS backend initialises");
        metrics.gce_bots_up.set(0);
        let api = Arc::new(Api {
            http,
            tokens,
            zone_url: zone_url(&config.compute_url, &config.project, &config.zone),
            swarming_url: config.swarming_url.clone(),
            swarming_api: config.swarming_api,
            names: instance_names(&config.instance_prefix, config.instance_count),
            permits: Semaphore::new(config.concurrency.max(1)),
            metrics,
            timing: config.timing.clone(),
        });
        let (changed, _) = watch::channel(0);
        let inner = Arc::new(Inner { api, state: Mutex::new(State::new()), changed, wake: Notify::new() });
        let stop = cancel.child_token();
        tokio::spawn(Arc::clone(&inner).drive(stop.clone()));
        GceAutoscaler { inner, stop }
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.inner.lock();
        Snapshot { registered: s.registered, waiting: s.waiting, fleet: s.fleet }
    }
}

impl Drop for GceAutoscaler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Autoscaler for GceAutoscaler {
    fn register<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let result = self.inner.register().await;
            if result.is_ok() {
                debug!(task_id = %task, registered = self.snapshot().registered, "registered with the GCE autoscaler");
            }
            result
        })
    }

    fn unregister<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            debug!(task_id = %task, "unregistering from the GCE autoscaler");
            self.inner.unregister().await
        })
    }
}

/// Instance `n` is `prefix` + `n` zero-padded to 3 digits, n = 1..=count (the bot id too).
pub fn instance_names(prefix: &str, count: u32) -> Vec<String> {
    (1..=count).map(|n| format!("{prefix}{n:03}")).collect()
}

/// `{compute}/projects/P/zones/Z/`, to which `instances/...` and `operations/...` join.
fn zone_url(compute: &Url, project: &str, zone: &str) -> Url {
    join(compute, &format!("projects/{project}/zones/{zone}/"))
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Idle,
    Start,
    Stop,
    /// Nothing before this instant (a grace or a backoff), unless the state changes.
    WaitUntil(Instant),
}

struct State {
    registered: usize,
    waiting: usize,
    fleet: Fleet,
    /// No stop before this: after a failed start the grace, after a failed stop a backoff.
    stop_not_before: Option<Instant>,
    failed_stops: u32,
    /// Failed starts so far; a waiter gets the error of the first one that ends after it
    /// enrolled.
    failed_starts: u64,
    last_start_error: Option<Arc<Error>>,
    /// Stops ended so far (either way), and the last one's error.
    ended_stops: u64,
    last_stop_error: Option<Arc<Error>>,
    closed: bool,
}

impl State {
    /// The state at construction: the start-up stop under way.
    fn new() -> State {
        State {
            registered: 0,
            waiting: 0,
            fleet: Fleet::Stopping,
            stop_not_before: None,
            failed_stops: 0,
            failed_starts: 0,
            last_start_error: None,
            ended_stops: 0,
            last_stop_error: None,
            closed: false,
        }
    }

    /// The transition logic, pure: the fleet should be up exactly while a task is
    /// registered or waiting; a stop may be held back by a grace or a backoff.
    fn plan(&self, now: Instant) -> Plan {
        let wanted = self.registered + self.waiting > 0;
        match (wanted, self.fleet) {
            (true, Fleet::Up) | (false, Fleet::Down) => Plan::Idle,
            (true, _) => Plan::Start,
            (false, _) => match self.stop_not_before {
                Some(at) if now < at => Plan::WaitUntil(at),
                _ => Plan::Stop,
            },
        }
    }
}

struct Inner {
    api: Arc<Api>,
    state: Mutex<State>,
    /// Bumped after every state change; waiters watch it.
    changed: watch::Sender<u64>,
    /// Wakes the driver.
    wake: Notify,
}

/// A registration waiting for the fleet; dropping it (the caller gave up) withdraws it.
struct Waiting<'a> {
    inner: &'a Inner,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.lock().waiting -= 1;
            self.inner.changed();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells waiters and the driver that the state changed.
    fn changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        self.wake.notify_one();
    }

    async fn register(&self) -> Result<(), Error> {
        let mut changes = self.changed.subscribe();
        let enrolled = {
            let mut s = self.lock();
            if s.closed {
                return Err(Error::Closed);
            }
            if s.fleet == Fleet::Up {
                s.registered += 1;
                drop(s);
                // An unregister waiting for its stop learns that this task kept the fleet.
                self.changed();
                return Ok(());
            }
            s.waiting += 1;
            s.failed_starts
        };
        let mut waiting = Waiting { inner: self, armed: true };
        self.changed();
        loop {
            if changes.changed().await.is_err() {
                return Err(Error::Closed);
            }
            let mut s = self.lock();
            let outcome = if s.fleet == Fleet::Up {
                s.registered += 1;
                Ok(())
            } else if s.failed_starts > enrolled {
                let e = s.last_start_error.clone().expect("set with failed_starts");
                Err(Error::Start(e))
            } else if s.closed {
                Err(Error::Closed)
            } else {
                continue;
            };
            s.waiting -= 1;
            waiting.armed = false;
            return outcome;
        }
    }

    /// Returns when the count is released, and when it was the last one, once the stop it
    /// triggered has ended (so a draining daemon waits for the fleet to go down).
    async fn unregister(&self) -> Result<(), Error> {
        let mut changes = self.changed.subscribe();
        let ended = {
            let mut s = self.lock();
            if s.registered == 0 {
                return Err(Error::NotRegistered);
            }
            s.registered -= 1;
            if s.registered + s.waiting > 0 {
                return Ok(());
            }
            s.ended_stops
        };
        self.changed();
        loop {
            if changes.changed().await.is_err() {
                return Err(Error::Closed);
            }
            let s = self.lock();
            if s.ended_stops > ended {
                return match &s.last_stop_error {
                    None => Ok(()),
                    Some(e) => Err(Error::Stop(Arc::clone(e))),
                };
            }
            if s.fleet == Fleet::Up && s.registered + s.waiting > 0 {
                return Ok(()); // a new task took the fleet over before the stop began
            }
            if s.closed {
                return Err(Error::Closed);
            }
        }
    }

    /// The driver: the only caller of Compute Engine and Swarming. Ends on `cancel`.
    /// Its first job is the start-up stop (the state begins `Stopping`), whatever
    /// registrations arrive meanwhile: they wait for it, as for any stop.
    async fn drive(self: Arc<Self>, cancel: CancellationToken) {
        info!(instances = self.api.names.len(), "start-up: stopping the GCE fleet, then deleting its bots");
        let started = Instant::now();
        tokio::select! {
            _ = cancel.cancelled() => {}
            result = self.api.stop_fleet() => self.end_stop(result, started),
        }
        while !cancel.is_cancelled() {
            let plan = self.begin(Instant::now());
            match plan {
                Plan::Idle => {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.wake.notified() => {}
                    }
                }
                Plan::WaitUntil(at) => {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                Plan::Start => {
                    let started = Instant::now();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        result = self.api.start_fleet() => self.end_start(result, started),
                    }
                }
                Plan::Stop => {
                    let started = Instant::now();
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        result = self.api.stop_fleet() => self.end_stop(result, started),
                    }
                }
            }
        }
        self.lock().closed = true;
        self.changed();
    }

    /// Decides the next step and marks a transition as begun, under one lock (so that
    /// a registration sees either the fleet up, or a transition to wait for).
    fn begin(&self, now: Instant) -> Plan {
        let mut s = self.lock();
        let plan = s.plan(now);
        let n = self.api.names.len();
        match plan {
            Plan::Start => {
                s.fleet = Fleet::Starting;
                info!(instances = n, waiting = s.waiting, "starting the GCE fleet");
            }
            Plan::Stop => {
                s.fleet = Fleet::Stopping;
                self.api.metrics.gce_bots_up.set(0);
                info!(instances = n, "stopping the GCE fleet, then deleting its bots");
            }
            Plan::Idle | Plan::WaitUntil(_) => return plan,
        }
        drop(s);
        self.changed();
        plan
    }

    fn end_start(&self, result: Result<(), Error>, started: Instant) {
        let mut s = self.lock();
        match result {
            Ok(()) => {
                s.fleet = Fleet::Up;
                s.stop_not_before = None;
                s.failed_stops = 0;
                self.api.metrics.gce_bots_up.set(1);
                info!(instances = self.api.names.len(), elapsed = ?started.elapsed(), "GCE fleet up: every instance RUNNING");
            }
            Err(e) => {
                error!(error = %error_chain(&e), elapsed = ?started.elapsed(), "starting the GCE fleet failed");
                s.fleet = Fleet::Unknown;
                s.stop_not_before = Some(Instant::now() + self.api.timing.failed_start_grace);
                s.failed_starts += 1;
                s.last_start_error = Some(Arc::new(e));
            }
        }
        drop(s);
        self.changed();
    }

    fn end_stop(&self, result: Result<(), Error>, started: Instant) {
        let mut s = self.lock();
        s.ended_stops += 1;
        match result {
            Ok(()) => {
                s.fleet = Fleet::Down;
                s.stop_not_before = None;
                s.failed_stops = 0;
                s.last_stop_error = None;
                info!(elapsed = ?started.elapsed(), "GCE fleet down: every instance TERMINATED, bots deleted");
            }
            Err(e) => {
                s.failed_stops += 1;
                let retry_in = self.api.timing.fleet.delay(s.failed_stops);
                error!(error = %error_chain(&e), elapsed = ?started.elapsed(), ?retry_in, "stopping the GCE fleet failed");
                s.fleet = Fleet::Unknown;
                s.stop_not_before = Some(Instant::now() + retry_in);
                s.last_stop_error = Some(Arc::new(e));
            }
        }
        drop(s);
        self.changed();
    }
}

/// Compute Engine and Swarming calls for the fleet, `concurrency` at a time.
struct Api {
    http: reqwest::Client,
    tokens: Arc<TokenSource>,
    zone_url: Url,
    swarming_url: Url,
    swarming_api: SwarmingApi,
    names: Vec<String>,
    /// HTTP calls in flight at once (`--autoscaler-concurrency`).
    permits: Semaphore,
    metrics: Arc<Metrics>,
    timing: Timing,
}

/// Go: compute.Operation (the members used).
#[derive(Debug, Deserialize)]
struct Operation {
    #[serde(default)]
    name: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    error: Option<OperationError>,
}

#[derive(Debug, Deserialize)]
struct OperationError {
    #[serde(default)]
    errors: Vec<OperationErrorItem>,
}

#[derive(Debug, Deserialize)]
struct OperationErrorItem {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl Operation {
    /// The operation's errors, `code: message; ...`, if it failed.
    fn failure(&self) -> Option<String> {
        let error = self.error.as_ref()?;
        let text: Vec<String> = error.errors.iter().map(|e| format!("{}: {}", e.code, e.message)).collect();
        Some(if text.is_empty() { "an error without details".to_owned() } else { text.join("; ") })
    }
}

/// Go: compute.Instance (the member used).
#[derive(Debug, Deserialize)]
struct Instance {
    #[serde(default)]
    status: String,
}

/// Swarming's answer to a bot deletion (v1 and v2 alike).
#[derive(Debug, Deserialize)]
struct Deleted {
    #[serde(default)]
    deleted: bool,
}

/// pRPC prefixes JSON answers with `)]}'` against XSSI.
fn strip_xssi(body: &[u8]) -> &[u8] {
    body.strip_prefix(b")]}'".as_slice()).unwrap_or(body)
}

impl Api {
    async fn start_fleet(self: &Arc<Self>) -> Result<(), Error> {
        self.each(Op::Start, self.names.clone()).await.1
    }

    /// Stops every instance, then deletes the bots of those that stopped.
    async fn stop_fleet(self: &Arc<Self>) -> Result<(), Error> {
        let (stopped, stops) = self.each(Op::Stop, self.names.clone()).await;
        let (_, deletions) = self.each(Op::DeleteBot, stopped).await;
        stops.and(deletions)
    }

    /// Runs `op` on every name (each with its retries), all at once but never more than
    /// `concurrency` HTTP calls in flight. Returns the names that succeeded, and the
    /// first failure with the number of them.
    async fn each(self: &Arc<Self>, op: Op, names: Vec<String>) -> (Vec<String>, Result<(), Error>) {
        let total = names.len();
        let mut calls = JoinSet::new();
        for name in names {
            let api = Arc::clone(self);
            calls.spawn(async move {
                let result = api.with_retries(op, &name).await;
                (name, result)
            });
        }
        let mut done = Vec::with_capacity(total);
        let mut failed = 0;
        let mut first = None;
        while let Some(joined) = calls.join_next().await {
            let (name, result) = joined.unwrap_or_else(|_| {
                let target = "an instance".to_owned();
                (target.clone(), Err(Error::Panicked { op, target }))
            });
            match result {
                Ok(()) => done.push(name),
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
        }
        let result = match first {
            None => Ok(()),
            Some(first) => Err(Error::Partial { op, failed, total, first: Box::new(first) }),
        };
        (done, result)
    }

    /// One instance or bot call, attempted up to `timing.call.max_attempts` times while
    /// it fails transiently. Every failed attempt is logged and counted.
    async fn with_retries(&self, op: Op, name: &str) -> Result<(), Error> {
        let backoff = &self.timing.call;
        let mut attempt = 1;
        loop {
            let result = match op {
                Op::Start | Op::Stop => self.change_instance(op, name).await,
                Op::DeleteBot => self.delete_bot(name).await,
            };
            let err = match result {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            self.metrics.autoscaler_errors.with_label_values(&[op.label()]).inc();
            let last = !err.is_transient() || backoff.max_attempts.is_some_and(|m| attempt >= m);
            if last {
                warn!(instance = name, op = op.label(), attempt, error = %error_chain(&err), "autoscaler call failed; giving up on it");
                return Err(err);
            }
            let delay = backoff.delay(attempt);
            warn!(instance = name, op = op.label(), attempt, error = %error_chain(&err), retry_in = ?delay, "autoscaler call failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Starts or stops one instance: the call, then its zone operation until DONE, then
    /// the instance until RUNNING or TERMINATED (a start of a running instance, or a stop
    /// of a stopped one, is a quick no-op for Compute Engine).
    async fn change_instance(&self, op: Op, name: &str) -> Result<(), Error> {
        let (verb, wanted) = match op {
            Op::Start => ("start", "RUNNING"),
            _ => ("stop", "TERMINATED"),
        };
        let timeout = self.timing.operation_timeout;
        let url = join(&self.zone_url, &format!("instances/{name}/{verb}"));
        let mut operation: Operation = self.compute(op, name, Method::POST, url.clone()).await?;
        if operation.name.is_empty() {
            return Err(Error::Malformed {
                op,
                target: name.to_owned(),
                url: url.to_string(),
                reason: "an operation without a name".into(),
            });
        }
        let deadline = Instant::now() + timeout;
        while operation.status != "DONE" {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op,
                    target: name.to_owned(),
                    wanted: "DONE",
                    status: operation.status,
                    waited: timeout,
                });
            }
            tokio::time::sleep(self.timing.poll_interval).await;
            let url = join(&self.zone_url, &format!("operations/{}", operation.name));
            operation = self.compute(op, name, Method::GET, url).await?;
        }
        if let Some(reason) = operation.failure() {
            return Err(Error::Operation { op, target: name.to_owned(), operation: operation.name, reason });
        }
        let url = join(&self.zone_url, &format!("instances/{name}"));
        let deadline = Instant::now() + timeout;
        loop {
            let instance: Instance = self.compute(op, name, Method::GET, url.clone()).await?;
            if instance.status == wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op,
                    target: name.to_owned(),
                    wanted,
                    status: instance.status,
                    waited: timeout,
                });
            }
            tokio::time::sleep(self.timing.poll_interval).await;
        }
    }

    /// Deletes bot `bot` from Swarming; a 404 means it is already gone (B4).
    async fn delete_bot(&self, bot: &str) -> Result<(), Error> {
        let op = Op::DeleteBot;
        let (url, body) = match self.swarming_api {
            SwarmingApi::V2 => (
                join(&self.swarming_url, "prpc/swarming.v2.Bots/DeleteBot"),
                Some(serde_json::json!({ "bot_id": bot })),
            ),
            SwarmingApi::V1 => (join(&self.swarming_url, &format!("_ah/api/swarming/v1/bot/{bot}/delete")), None),
        };
        let (status, answer) = self.send(op, bot, Method::POST, url.clone(), body).await?;
        if status == StatusCode::NOT_FOUND {
            debug!(bot, "Swarming does not know the bot: already deleted");
            return Ok(());
        }
        check_status(op, bot, &url, status, &answer)?;
        let deleted: Deleted = serde_json::from_slice(strip_xssi(&answer)).map_err(|e| Error::Malformed {
            op,
            target: bot.to_owned(),
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        if deleted.deleted {
            Ok(())
        } else {
            Err(Error::NotDeleted { bot: bot.to_owned() })
        }
    }

    /// A Compute Engine call with a JSON answer.
    async fn compute<T: DeserializeOwned>(&self, op: Op, target: &str, method: Method, url: Url) -> Result<T, Error> {
        let (status, body) = self.send(op, target, method, url.clone(), None).await?;
        check_status(op, target, &url, status, &body)?;
        serde_json::from_slice(&body).map_err(|e| Error::Malformed {
            op,
            target: target.to_owned(),
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// One authorised HTTP call, holding one of the `concurrency` permits.
    async fn send(
        &self,
        op: Op,
        target: &str,
        method: Method,
        url: Url,
        json: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), Error> {
        let token = self.tokens.token().await.map_err(Error::Auth)?;
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let transport = |source| Error::Transport { op, target: target.to_owned(), url: url.to_string(), source };
        let mut request = self
            .http
            .request(method, url.clone())
            .bearer_auth(&token.value)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(json) = json {
            request = request.json(&json);
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        Ok((status, body.to_vec()))
    }
}

fn check_status(op: Op, target: &str, url: &Url, status: StatusCode, body: &[u8]) -> Result<(), Error> {
    if status.is_success() {
        return Ok(());
    }
    Err(Error::Status {
        op,
        target: target.to_owned(),
        url: url.to_string(),
        status,
        body: crate::ctfe::client::excerpt(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(registered: usize, waiting: usize, fleet: Fleet) -> State {
        State { registered, waiting, fleet, ..State::new() }
    }

    #[test]
    fn names_are_zero_padded_from_one() {
        assert_eq!(instance_names("ct-gce-", 3), ["ct-gce-001", "ct-gce-002", "ct-gce-003"]);
        let all = instance_names("ct-gce-", 500);
        assert_eq!(all.len(), 500);
        assert_eq!(all[499], "ct-gce-500");
        assert_eq!(instance_names("x", 1000)[999], "x1000");
        assert!(instance_names("x", 0).is_empty());
    }

    #[test]
    fn zone_urls_keep_the_root_path() {
        let root: Url = "http://127.0.0.1:1/compute/v1/".parse().unwrap();
        let zone = zone_url(&root, "ct-swarming-bots", "us-central1-b");
        assert_eq!(
            join(&zone, "instances/ct-gce-001/start").as_str(),
            "http://127.0.0.1:1/compute/v1/projects/ct-swarming-bots/zones/us-central1-b/instances/ct-gce-001/start"
        );
        assert_eq!(
            join(&zone, "operations/op-1").as_str(),
            "http://127.0.0.1:1/compute/v1/projects/ct-swarming-bots/zones/us-central1-b/operations/op-1"
        );
    }

    #[test]
    fn the_fleet_follows_the_count() {
        let now = Instant::now();
        // After a failed start or stop, with nobody registered: stop.
        assert_eq!(state(0, 0, Fleet::Unknown).plan(now), Plan::Stop);
        assert_eq!(state(0, 0, Fleet::Down).plan(now), Plan::Idle);
        // A registration waits: start, whatever the fleet was.
        for fleet in [Fleet::Unknown, Fleet::Down] {
            assert_eq!(state(0, 1, fleet).plan(now), Plan::Start);
        }
        assert_eq!(state(2, 0, Fleet::Up).plan(now), Plan::Idle);
        assert_eq!(state(1, 1, Fleet::Up).plan(now), Plan::Idle);
        // The last one left: stop.
        assert_eq!(state(0, 0, Fleet::Up).plan(now), Plan::Stop);
    }

    #[test]
    fn a_stop_waits_for_its_grace_but_a_registration_does_not() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut s = state(0, 0, Fleet::Unknown);
        s.stop_not_before = Some(later);
        assert_eq!(s.plan(now), Plan::WaitUntil(later));
        assert_eq!(s.plan(later), Plan::Stop);
        s.waiting = 1;
        assert_eq!(s.plan(now), Plan::Start);
    }

    #[test]
    fn operations_and_bot_answers_decode() {
        let op: Operation = serde_json::from_str(
            r#"{"kind":"compute#operation","name":"operation-1","status":"DONE","error":{"errors":[{"code":"ZONE_RESOURCE_POOL_EXHAUSTED","message":"no capacity"}]}}"#,
        )
        .unwrap();
        assert_eq!(op.failure().unwrap(), "ZONE_RESOURCE_POOL_EXHAUSTED: no capacity");
        let op: Operation = serde_json::from_str(r#"{"name":"operation-2","status":"RUNNING"}"#).unwrap();
        assert!(op.failure().is_none());
        let d: Deleted = serde_json::from_slice(strip_xssi(b")]}'\n{\"deleted\":true}")).unwrap();
        assert!(d.deleted);
        let d: Deleted = serde_json::from_slice(strip_xssi(b"{}")).unwrap();
        assert!(!d.deleted, "protojson omits false");
    }

    #[test]
    fn only_call_errors_worth_repeating_are_transient() {
        let status = |code: u16| Error::Status {
            op: Op::Start,
            target: "i".into(),
            url: "u".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
        };
        assert!(status(503).is_transient());
        assert!(status(429).is_transient());
        assert!(!status(403).is_transient());
        assert!(!status(404).is_transient());
        let partial = Error::Partial { op: Op::Start, failed: 1, total: 3, first: Box::new(status(500)) };
        assert!(partial.is_transient());
        assert!(!Error::NotRegistered.is_transient());
    }
}
