//! The development CTFE: an in-memory, faithful implementation of CTFE's internal
//! endpoints (ctfe-wire.md §2): the same selection, the same bytes, the same update and
//! terminate semantics. `ct-poller dev-ctfe` serves it alone; the demo and the tests run
//! it in-process. Extra routes under `/_/dev/` let tests enqueue tasks, inspect the
//! requests it received and the task states, and inject faults.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json_;
use tokio_util::sync::CancellationToken;

use crate::ctfe::wire::UpdateVars;
use crate::shutdown::Shutdown;
use crate::task::argv::go_timestamp;
use crate::task::{decode_envelope, DatastoreKey, Kind, Task};

/// `pending_tasks.GetOldestPendingTask`'s prototype order (not the envelope order).
const SELECTION_ORDER: [Kind; 9] = [
    Kind::RecreatePageSets,
    Kind::RecreateWebpageArchives,
    Kind::CaptureSkps,
    Kind::ChromiumAnalysis,
    Kind::ChromiumBuild,
    Kind::ChromiumPerf,
    Kind::LuaScript,
    Kind::MetricsAnalysis,
    Kind::PixelDiff,
];

const NAMESPACE: &str = "cluster-telemetry";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read task file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("task file {path} is not a usable envelope: {reason}")]
    BadEnvelope { path: String, reason: String },
}

/// One request the development CTFE received on a CTFE route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub body: String,
}

/// An injected fault: the next `times` requests to `path` get `status` and `body`
/// (after `delay_ms`); with no `status`, they are only delayed (a hanging CTFE).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Fault {
    pub path: String,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub body: String,
    #[serde(default = "one")]
    pub times: u32,
    #[serde(default)]
    pub delay_ms: u64,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Default)]
struct Queue {
    tasks: BTreeMap<(Kind, i64), Task>,
    log: Vec<LoggedRequest>,
    faults: VecDeque<Fault>,
}

/// A handle on a running development CTFE.
#[derive(Clone, Default)]
pub struct DevCtfe {
    queue: Arc<Mutex<Queue>>,
}

impl DevCtfe {
    pub fn new() -> DevCtfe {
        DevCtfe::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enqueues the task of an envelope; keeps its key's ID, or assigns the next free ID
    /// of its kind when it has no `DatastoreKey`. Returns `<TaskName>.<id>`.
    pub fn enqueue(&self, envelope: &[u8]) -> Result<String, String> {
        let parsed: Json_ = serde_json::from_slice(envelope).map_err(|e| e.to_string())?;
        let (kind, object) = Kind::ALL
            .into_iter()
            .find_map(|k| parsed.get(k.name()).filter(|v| !v.is_null()).map(|v| (k, v.clone())))
            .ok_or("the envelope holds no task")?;
        let mut object = object;
        let mut queue = self.lock();
        if object.get("DatastoreKey").is_none_or(Json_::is_null) {
            let id = queue.tasks.range((kind, i64::MIN)..=(kind, i64::MAX)).map(|(k, _)| k.1).max().unwrap_or(0) + 1;
            let key = DatastoreKey { namespace: NAMESPACE.into(), kind: kind.spec().datastore_kind.into(), id };
            object["DatastoreKey"] = Json_::String(key.encode());
        }
        let wrapped = serde_json::json!({ kind.name(): object });
        let pending = decode_envelope(&serde_json::to_vec(&wrapped).expect("json"))
            .map_err(|e| crate::error_chain(&e))?
            .ok_or("the envelope holds no task")?;
        queue.tasks.insert((kind, pending.key.id), pending.task);
        Ok(pending.key.to_string())
    }

    /// Every request received on a CTFE route, in order.
    pub fn log(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    pub fn add_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// A task as stored now (to check what updates did).
    pub fn task(&self, kind: Kind, id: i64) -> Option<Task> {
        self.lock().tasks.get(&(kind, id)).cloned()
    }

    /// Tasks with `TsStarted == 0`: what `get_oldest_pending_task` can still hand out.
    pub fn pending_count(&self) -> usize {
        self.lock().tasks.values().filter(|t| t.common().TsStarted == 0).count()
    }

    /// The exact body of `get_oldest_pending_task` now.
    pub fn oldest_pending_body(&self) -> Vec<u8> {
        let queue = self.lock();
        let mut best: Option<&Task> = None;
        for kind in SELECTION_ORDER {
            let newest = queue
                .tasks
                .range((kind, i64::MIN)..=(kind, i64::MAX))
                .rev()
                .map(|(_, t)| t)
                .find(|t| t.common().TsStarted == 0);
            if let Some(candidate) = newest {
                if best.is_none_or(|b| b.common().TsAdded > candidate.common().TsAdded) {
                    best = Some(candidate);
                }
            }
        }
        envelope_bytes(best)
    }

    /// `POST _/terminate_running_tasks`: every started, unfinished task fails.
    fn terminate_running(&self) {
        let now: i64 = go_timestamp(chrono::Utc::now()).parse().expect("14 digits");
        for task in self.lock().tasks.values_mut() {
            let c = task.common_mut();
            if !c.TaskDone && c.TsStarted != 0 {
                c.TsCompleted = now;
                c.Failure = true;
                c.TaskDone = true;
            }
        }
    }

    /// `task_common.UpdateTaskHandler` + `updateDatastoreTask` (ctfe-wire.md §2.4).
    fn update(&self, kind: Kind, body: &[u8]) -> Result<(), String> {
        let go_type = format!("*{}", kind.spec().update_type);
        let mut raw: Json_ = serde_json::from_slice(body).map_err(|_| format!("Failed to parse {go_type} update"))?;
        if let Json_::Object(map) = &mut raw {
            map.retain(|_, v| !v.is_null());
        }
        let vars: UpdateVars =
            serde_json::from_value(raw.clone()).map_err(|_| format!("Failed to parse {go_type} update"))?;
        let mut queue = self.lock();
        let stored = queue.tasks.get(&(kind, vars.Id)).ok_or_else(|| format!("Failed to find {go_type} task"))?;
        // Go edits a copy and only Puts it when every step succeeded.
        let mut task = stored.clone();
        let failed = || format!("Failed to update {go_type} task");
        let c = task.common_mut();
        if !vars.TsStarted.is_empty() {
            c.TsStarted = vars.TsStarted.parse().map_err(|_| failed())?;
        }
        if !vars.TsCompleted.is_empty() {
            c.TsCompleted = vars.TsCompleted.parse().map_err(|_| failed())?;
        }
        if vars.Failure {
            c.Failure = true;
        }
        if vars.TaskDone {
            if c.TsCompleted == 0 {
                return Err(failed());
            }
            c.TaskDone = true;
        }
        if vars.ClearRepeatAfterDays {
            c.RepeatAfterDays = 0;
        } else if vars.RepeatAfterDays != 0 {
            c.RepeatAfterDays = vars.RepeatAfterDays;
        }
        if !vars.SwarmingLogs.is_empty() {
            c.SwarmingLogs = vars.SwarmingLogs;
        }
        for &field in kind.spec().update_extras {
            match raw.get(field.name()) {
                Some(Json_::String(text)) if !text.is_empty() => {
                    task.set_text(field, text);
                }
                Some(Json_::String(_)) | None => {}
                Some(_) => return Err(format!("Failed to parse {go_type} update")),
            }
        }
        queue.tasks.insert((kind, vars.Id), task);
        Ok(())
    }

    /// The axum router: CTFE's eleven internal routes plus `/_/dev/*`.
    pub fn router(&self) -> Router {
        let mut router = Router::new()
            .route("/_/get_oldest_pending_task", get(get_oldest))
            .route("/_/terminate_running_tasks", post(terminate));
        for kind in Kind::ALL {
            router = router.route(
                &format!("/{}", kind.spec().update_path),
                post(move |State(ctfe): State<DevCtfe>, body: Bytes| async move {
                    match ctfe.update(kind, &body) {
                        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "").into_response(),
                        Err(message) => text_error(message),
                    }
                }),
            );
        }
        router = router.layer(middleware::from_fn_with_state(self.clone(), record_and_fault));
        router
            .route("/_/dev/enqueue", post(dev_enqueue))
            .route("/_/dev/log", get(|State(ctfe): State<DevCtfe>| async move { Json(ctfe.log()) }))
            .route("/_/dev/fault", post(dev_fault))
            .route("/_/dev/tasks", get(dev_tasks))
            .with_state(self.clone())
    }

    /// Serves on `addr` until `stop` is cancelled; returns the bound address.
    pub async fn spawn(&self, addr: SocketAddr, stop: CancellationToken) -> Result<SocketAddr, Error> {
        let (listener, local) = crate::server::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let router = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "development CTFE failed");
            }
        });
        Ok(local)
    }

    /// Enqueues every file of `dir` in file-name order.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, Error> {
        let read = |source| Error::Read { path: dir.display().to_string(), source };
        let mut paths: Vec<_> =
            std::fs::read_dir(dir).map_err(read)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        let mut count = 0;
        for path in paths.iter().filter(|p| p.is_file()) {
            let bytes =
                std::fs::read(path).map_err(|source| Error::Read { path: path.display().to_string(), source })?;
            match self.enqueue(&bytes) {
                Ok(_) => count += 1,
                // The empty envelope (fixtures/empty.pending.json) holds no task: skip it.
                Err(reason) if reason == "the envelope holds no task" => {}
                Err(reason) => return Err(Error::BadEnvelope { path: path.display().to_string(), reason }),
            }
        }
        Ok(count)
    }
}

/// The envelope: all nine members in Go order, `null` but for `task`, then `"\n"`.
fn envelope_bytes(task: Option<&Task>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    out.push(b'{');
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("\"{}\":", kind.name()).as_bytes());
        match task.filter(|t| t.kind() == kind) {
            Some(t) => out.extend_from_slice(&t.to_go_json()),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"}\n");
    out
}

fn text_error(message: String) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{message}\n"))
        .into_response()
}

async fn get_oldest(State(ctfe): State<DevCtfe>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], ctfe.oldest_pending_body()).into_response()
}

async fn terminate(State(ctfe): State<DevCtfe>) -> Response {
    ctfe.terminate_running();
    ([(header::CONTENT_TYPE, "application/json")], "").into_response()
}

/// Logs every request to a CTFE route, then applies the first matching fault, if any.
async fn record_and_fault(State(ctfe): State<DevCtfe>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 64 << 20).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body over 64 MiB\n").into_response();
    };
    let path = parts.uri.path().to_owned();
    let fault = {
        let mut queue = ctfe.lock();
        queue.log.push(LoggedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
        let index = queue
            .faults
            .iter()
            .position(|f| f.path == path || f.path.trim_start_matches('/') == path.trim_start_matches('/'));
        index.map(|i| {
            let fault = queue.faults[i].clone();
            if fault.times <= 1 {
                queue.faults.remove(i);
            } else {
                queue.faults[i].times -= 1;
            }
            fault
        })
    };
    if let Some(fault) = fault {
        tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
        if let Some(status) = fault.status {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type =
                if fault.body.trim_start().starts_with('{') { "application/json" } else { "text/plain; charset=utf-8" };
            return (status, [(header::CONTENT_TYPE, content_type)], fault.body).into_response();
        }
    }
    let request = Request::from_parts(parts, axum::body::Body::from(bytes));
    next.run(request).await
}

async fn dev_enqueue(State(ctfe): State<DevCtfe>, body: Bytes) -> Response {
    match ctfe.enqueue(&body) {
        Ok(task_id) => Json(serde_json::json!({ "task_id": task_id })).into_response(),
        Err(reason) => (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    }
}

async fn dev_fault(State(ctfe): State<DevCtfe>, Json(fault): Json<Fault>) -> StatusCode {
    ctfe.add_fault(fault);
    StatusCode::NO_CONTENT
}

async fn dev_tasks(State(ctfe): State<DevCtfe>) -> Response {
    let queue = ctfe.lock();
    let tasks: Vec<Json_> = queue
        .tasks
        .iter()
        .map(|((kind, id), task)| {
            let mut object = task.to_json();
            object["_kind"] = Json_::String(kind.name().into());
            object["_id"] = Json_::from(*id);
            object
        })
        .collect();
    Json(tasks).into_response()
}

/// `ct-poller dev-ctfe`: serve until SIGTERM/SIGINT.
pub async fn serve(addr: SocketAddr, tasks: Option<&Path>, shutdown: Shutdown) -> Result<(), Error> {
    let ctfe = DevCtfe::new();
    if let Some(dir) = tasks {
        let n = ctfe.load_dir(dir)?;
        tracing::info!(tasks = n, dir = %dir.display(), "enqueued tasks");
    }
    let local = ctfe.spawn(addr, shutdown.drain.clone()).await?;
    tracing::info!("development CTFE listening on http://{local}/");
    println!("dev CTFE listening on http://{local}/");
    shutdown.drain.cancelled().await;
    Ok(())
}
