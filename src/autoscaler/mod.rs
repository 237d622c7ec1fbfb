//! The autoscaler: keeps the GCE worker fleet up while GCE tasks run. The poller calls
//! `register` before a GCE task runs and `unregister` after it ends, from the task's
//! own future (never from the poll loop: a fleet start takes minutes, B8).

mod noop;

use std::future::Future;
use std::pin::Pin;

pub use noop::NoAutoscaler;

use crate::task::TaskKey;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} of GCE instance {instance} failed: {reason}")]
    Instance {
        op: &'static str,
        instance: String,
        reason: String,
    },
    #[error("deleting Swarming bot {bot} failed: {reason}")]
    Bot { bot: String, reason: String },
    #[error("{failed} of {total} autoscaler calls failed; first: {first}")]
    Partial {
        failed: usize,
        total: usize,
        first: String,
    },
    #[error("no credentials for the autoscaler")]
    Auth(#[source] crate::auth::Error),
}

/// Reference-counted fleet control. Implementations are shared by all task futures.
pub trait Autoscaler: Send + Sync {
    /// Counts a GCE task; the first one brings the fleet up (may take minutes).
    fn register<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>>;
    /// Releases a count taken by a successful `register`; the last one stops the fleet.
    fn unregister<'a>(&'a self, task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>>;
}
