//! The autoscaler: keeps the GCE worker fleet up while GCE tasks run. The poller calls
//! `register` before a GCE task runs and `unregister` after it ends, from the task's
//! own future (never from the poll loop: a fleet start takes minutes, B8).

pub mod gce;
mod noop;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use gce::GceAutoscaler;
pub use noop::NoAutoscaler;

use crate::retry::Retryable;
use crate::task::TaskKey;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What is done to one instance or bot; its label is the `op` of
/// `ct_poller_autoscaler_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Stop,
    DeleteBot,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::DeleteBot => "delete_bot",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::DeleteBot => "bot deletion",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} of {target}: request to {url} failed")]
    Transport {
        op: Op,
        target: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{op} of {target}: {url} answered {status}: {body:?}")]
    Status { op: Op, target: String, url: String, status: reqwest::StatusCode, body: String },
    #[error("{op} of {target}: unexpected answer from {url}: {reason}")]
    Malformed { op: Op, target: String, url: String, reason: String },
    #[error("{op} of {target}: zone operation {operation} failed: {reason}")]
    Operation { op: Op, target: String, operation: String, reason: String },
    #[error("{op} of {target}: not {wanted} after {waited:?} (last status {status:?})")]
    Timeout { op: Op, target: String, wanted: &'static str, status: String, waited: Duration },
    #[error("Swarming did not delete bot {bot}")]
    NotDeleted { bot: String },
    #[error("{op} of {target}: the call panicked")]
    Panicked { op: Op, target: String },
    #[error("{failed} of {total} {op} calls failed; the first")]
    Partial {
        op: Op,
        failed: usize,
        total: usize,
        #[source]
        first: Box<Error>,
    },
    /// The fleet start this registration waited for failed (shared by all its waiters).
    #[error("the GCE fleet did not start")]
    Start(#[source] Arc<Error>),
    /// The fleet stop this unregistration triggered failed (it is retried in the background).
    #[error("the GCE fleet did not stop")]
    Stop(#[source] Arc<Error>),
    #[error("no credentials for the autoscaler")]
    Auth(#[source] crate::auth::Error),
    #[error("the autoscaler has shut down")]
    Closed,
    #[error("unregister without a matching register")]
    NotRegistered,
}

impl Error {
    /// Whether repeating the same instance or bot call may succeed: network errors, 408,
    /// 429, 5xx, failed or slow zone operations. (The poller retries whole registrations
    /// whatever failed, until `--register-timeout`.)
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } | Error::Operation { .. } | Error::Timeout { .. } | Error::NotDeleted { .. } => {
                true
            }
            Error::Status { status, .. } => crate::retry::is_transient_status(*status),
            Error::Auth(e) => Retryable::is_transient(e),
            Error::Partial { first, .. } => first.is_transient(),
            Error::Start(e) | Error::Stop(e) => e.is_transient(),
            Error::Malformed { .. } | Error::Panicked { .. } | Error::Closed | Error::NotRegistered => false,
        }
    }
}

/// Reference-counted fleet control. Implementations are shared by all task futures.
pub trait Autoscaler: Send + Sync {
    /// Counts a GCE task; the first one brings the fleet up (may take minutes).
    /// Cancel-safe: a dropped call takes no count.
    fn register<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>>;
    /// Releases a count taken by a successful `register`; the last one stops the fleet.
    fn unregister<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>>;
}
