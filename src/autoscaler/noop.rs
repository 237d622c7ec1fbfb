//! `--autoscaler none`: nothing to scale (local mode, or workers managed elsewhere).

use super::{Autoscaler, BoxFuture, Error};
use crate::task::TaskKey;

#[derive(Debug, Default)]
pub struct NoAutoscaler;

impl Autoscaler for NoAutoscaler {
    fn register<'a>(&'a self, _task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    fn unregister<'a>(&'a self, _task: &'a TaskKey) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }
}
