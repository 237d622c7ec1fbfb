//! The HTTP server on `--metrics-addr`: `/metrics`, `/healthz` (`/livez`), `/readyz`, the
//! status page `/` and `/api/status`. Read-only; never talks to CTFE.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reqwest::Url;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::status::{Readiness, Status};

pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
    pub webapp_url: Url,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/status", get(api_status))
        .route("/", get(status_page))
        .with_state(state)
}

/// Serves until `stop` is cancelled.
pub fn spawn(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let serve = axum::serve(listener, router(state)).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Derived gauges are computed at scrape time, so a stalled loop shows up too.
    state.metrics.healthy.set(i64::from(state.status.is_healthy()));
    state.metrics.oldest_running_task.set(state.status.oldest_running().as_secs_f64());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    if state.status.is_live() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "poll loop has not ticked within 3 intervals\n").into_response()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.status.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_owned()).into_response(),
        Readiness::NotReady(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn api_status(State(state): State<Arc<AppState>>) -> Response {
    Json(state.status.snapshot()).into_response()
}

async fn status_page(State(state): State<Arc<AppState>>) -> Html<String> {
    Html(render_page(&state))
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Server-rendered, no scripts, no external assets; refreshes itself every 5 s.
fn render_page(state: &AppState) -> String {
    let snap = state.status.snapshot();
    let mut h = String::with_capacity(8192);
    let state_text = if snap.draining {
        "draining"
    } else if snap.ready {
        "ready"
    } else {
        snap.not_ready_reason.unwrap_or("not ready")
    };
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>ct-poller</title><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}}th{{background:#f3f3f3}}
.ok{{color:#11772d}}.bad{{color:#b3261e}}pre{{margin:0;max-width:60em;white-space:pre-wrap;font-size:12px}}
</style></head><body><h1>ct-poller {version}</h1>
<p>State: <b class="{cls}">{state}</b> &middot; healthy: {healthy} &middot; started {started} &middot; now {now}</p>"#,
        version = esc(snap.version),
        cls = if snap.ready { "ok" } else { "bad" },
        state = esc(state_text),
        healthy = if snap.healthy { 1 } else { 0 },
        started = esc(&snap.started),
        now = esc(&snap.now),
    );
    match &snap.last_poll {
        Some(p) => {
            let _ = write!(h, "<p>Last poll: <b>{}</b> at {}", esc(p.result), esc(&p.at));
            if let Some(e) = &p.error {
                let _ = write!(h, " &mdash; <span class=\"bad\">{}</span>", esc(e));
            }
            h.push_str("</p>");
        }
        None => h.push_str("<p>Last poll: none yet</p>"),
    }
    let _ = write!(h, "<h2>Running tasks ({})</h2>", snap.running.len());
    if snap.running.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>Task</th><th>Kind</th><th>ID</th><th>User</th><th>Run ID</th><th>Started</th><th>Elapsed</th><th>Last output</th></tr>");
        for r in &snap.running {
            let _ = write!(
                h,
                "<tr id=\"task-{tid}\"><td>{tid}</td><td>{kind}</td><td>{id}</td><td>{user}</td><td>{run}</td><td>{started}</td><td>{elapsed}</td><td><pre>{out}</pre></td></tr>",
                tid = esc(&r.task.info.task_id),
                kind = esc(r.task.info.kind),
                id = r.task.info.id,
                user = esc(&r.task.info.user),
                run = esc(&r.task.info.run_id),
                started = esc(&r.task.info.started),
                elapsed = duration(r.elapsed_seconds as f64),
                out = esc(&r.last_output.join("\n")),
            );
        }
        h.push_str("</table>");
    }
    let _ = write!(h, "<h2>Recently finished ({})</h2>", snap.finished.len());
    if snap.finished.is_empty() {
        h.push_str("<p>None.</p>");
    } else {
        h.push_str("<table><tr><th>Task</th><th>User</th><th>Run ID</th><th>Finished</th><th>Duration</th><th>Outcome</th><th>Reason</th></tr>");
        for f in &snap.finished {
            let _ = write!(
                h,
                "<tr><td>{tid}</td><td>{user}</td><td>{run}</td><td>{fin}</td><td>{dur}</td><td class=\"{cls}\">{outcome}</td><td>{reason}</td></tr>",
                tid = esc(&f.info.task_id),
                user = esc(&f.info.user),
                run = esc(&f.info.run_id),
                fin = esc(&f.finished),
                dur = duration(f.duration_seconds),
                cls = if f.outcome == "succeeded" { "ok" } else { "bad" },
                outcome = esc(f.outcome),
                reason = esc(&f.reason),
            );
        }
        h.push_str("</table>");
    }
    let _ = write!(
        h,
        "<p><a href=\"{}\">CT frontend</a> &middot; <a href=\"/metrics\">metrics</a> &middot; <a href=\"/api/status\">JSON</a></p></body></html>",
        esc(state.webapp_url.as_str())
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html() {
        assert_eq!(esc("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
        assert_eq!(duration(5.0), "5.0s");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(7300.0), "2h01m");
    }
}
