//! The CTFE calls the poller makes (ctfe-wire.md §2): terminate running tasks, get the
//! oldest pending task, and the failure update. Each call has a timeout, is counted and
//! timed in metrics, and returns a typed error carrying an excerpt of what CTFE answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use crate::config::join;
use crate::ctfe::wire::{to_go_json, FailureUpdate};
use crate::metrics::Metrics;
use crate::retry::{is_transient_status, Retryable};
use crate::task::{decode_envelope, DecodeError, Pending};

/// Longest envelope accepted (a Lua task carries its scripts inline).
const MAX_BODY: usize = 16 << 20;
/// How much of a bad body goes into an error message.
const EXCERPT: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    GetOldestPendingTask,
    TerminateRunningTasks,
    UpdateTask,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::GetOldestPendingTask => "get_oldest_pending_task",
            Endpoint::TerminateRunningTasks => "terminate_running_tasks",
            Endpoint::UpdateTask => "update_task",
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request to CTFE {url} failed")]
    Transport {
        endpoint: Endpoint,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("CTFE {url} answered {status}: {body:?}")]
    Status { endpoint: Endpoint, url: String, status: StatusCode, body: String, retry_after: Option<Duration> },
    #[error("CTFE {url} sent an unusable body: {excerpt:?}")]
    Decode {
        url: String,
        excerpt: String,
        #[source]
        source: DecodeError,
    },
    #[error("CTFE {url} sent a body longer than {MAX_BODY} bytes")]
    TooLarge { endpoint: Endpoint, url: String },
}

impl Error {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Error::Transport { endpoint, .. } | Error::Status { endpoint, .. } | Error::TooLarge { endpoint, .. } => {
                *endpoint
            }
            Error::Decode { .. } => Endpoint::GetOldestPendingTask,
        }
    }

    /// Closed label for `ct_poller_poll_errors_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Transport { source, .. } if source.is_timeout() => "timeout",
            Error::Transport { .. } => "transport",
            Error::Status { .. } => "status",
            Error::Decode { source, .. } => source.label(),
            Error::TooLarge { .. } => "body",
        }
    }

    /// Closed label for `ct_poller_ctfe_requests_total{result}`.
    fn request_result(&self) -> &'static str {
        match self.label() {
            "timeout" | "transport" | "status" => self.label(),
            _ => "malformed",
        }
    }
}

impl Retryable for Error {
    fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => is_transient_status(*status),
            Error::Decode { .. } | Error::TooLarge { .. } => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The CTFE client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    root: Url,
    /// Joined once: the poll URL is used every few seconds for months.
    poll_url: Url,
    metrics: Arc<Metrics>,
}

impl Client {
    /// `root` ends in `/` (config guarantees it); `timeout` bounds every request.
    pub fn new(root: Url, timeout: Duration, metrics: Arc<Metrics>) -> Client {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("ct-poller/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(2)
            .build()
            .expect("the TLS backend initialises");
        let poll_url = join(&root, "_/get_oldest_pending_task");
        Client { http, root, poll_url, metrics }
    }

    /// `POST _/terminate_running_tasks` (empty body, `Content-Type: application/json`).
    pub async fn terminate_running_tasks(&self) -> Result<(), Error> {
        let url = join(&self.root, "_/terminate_running_tasks");
        let request = self.http.post(url.clone()).header(CONTENT_TYPE, "application/json").body("");
        self.send(Endpoint::TerminateRunningTasks, url, request).await.map(drop)
    }

    /// `GET _/get_oldest_pending_task`: `Ok(None)` when the queue is empty.
    pub async fn get_oldest_pending_task(&self) -> Result<Option<Pending>, Error> {
        let url = self.poll_url.clone();
        let request = self.http.get(url.clone());
        let started = Instant::now();
        let body = self.send_inner(Endpoint::GetOldestPendingTask, url.clone(), request).await;
        let result = body.and_then(|body| {
            decode_envelope(&body).map_err(|source| Error::Decode {
                url: url.to_string(),
                excerpt: excerpt(&body),
                source,
            })
        });
        self.observe(Endpoint::GetOldestPendingTask, started, &result);
        result
    }

    /// POSTs the kind's failure update once (ctfe-wire.md §6); callers retry.
    pub async fn report_failure(&self, pending: &Pending, ts_started: &str, ts_completed: &str) -> Result<(), Error> {
        let spec = pending.spec();
        let body = FailureUpdate {
            id: pending.key.id,
            ts_started: ts_started.to_owned(),
            ts_completed: ts_completed.to_owned(),
            extras: spec.update_extras,
        };
        let url = join(&self.root, spec.update_path);
        let request = self.http.post(url.clone()).header(CONTENT_TYPE, "application/json").body(to_go_json(&body));
        self.send(Endpoint::UpdateTask, url, request).await.map(drop)
    }

    async fn send(&self, endpoint: Endpoint, url: Url, request: reqwest::RequestBuilder) -> Result<Vec<u8>, Error> {
        let started = Instant::now();
        let result = self.send_inner(endpoint, url, request).await;
        self.observe(endpoint, started, &result);
        result
    }

    fn observe<T>(&self, endpoint: Endpoint, started: Instant, result: &Result<T, Error>) {
        let label = endpoint.label();
        self.metrics.ctfe_request_duration.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        let outcome = result.as_ref().map_or_else(Error::request_result, |_| "ok");
        self.metrics.ctfe_requests.with_label_values(&[label, outcome]).inc();
    }

    async fn send_inner(
        &self,
        endpoint: Endpoint,
        url: Url,
        request: reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, Error> {
        let transport = |source| Error::Transport { endpoint, url: url.to_string(), source };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = parse_retry_after(response.headers());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(Error::TooLarge { endpoint, url: url.to_string() });
            }
            body.extend_from_slice(&chunk);
        }
        // The original accepts exactly 200 (ctfe-wire.md §2.2).
        if status != StatusCode::OK {
            return Err(Error::Status { endpoint, url: url.to_string(), status, body: excerpt(&body), retry_after });
        }
        Ok(body)
    }
}

fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// The first bytes of a body, lossily decoded, for logs and errors.
pub fn excerpt(body: &[u8]) -> String {
    let cut = body.len().min(EXCERPT);
    let mut text = String::from_utf8_lossy(&body[..cut]).into_owned();
    if body.len() > cut {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(parse_retry_after(&h), None); // in the past
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"abc"), "abc");
        assert_eq!(excerpt(&[b'x'; 500]).chars().count(), EXCERPT + 1);
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }
}
