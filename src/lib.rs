//! ct-poller: the Cluster Telemetry poller. It asks CTFE for pending tasks and runs each
//! kind's master script with exactly the original's command line and files.
//!
//! Module map (the architecture):
//! - [`config`]: defaults < TOML < env < flags, validated once.
//! - [`ctfe`]: the CTFE client and the Go wire types.
//! - [`task`]: the nine kinds as data (one table), envelope decoding, argv and run ids.
//! - [`poller`]: the poll loop, the picked-up set, each task's life.
//! - [`executor`], [`output`]: process groups, bounded capture, timeouts.
//! - [`storage`], [`auth`]: patches from gs:// or file://, Google tokens.
//! - [`autoscaler`]: the GCE fleet's reference count.
//! - [`metrics`], [`status`], [`server`]: what operators see.
//! - [`shutdown`], [`telemetry`]: signals and logs.
//! - [`dev_ctfe`], [`demo`]: a faithful in-process CTFE, and the demo built on it.

pub mod auth;
pub mod autoscaler;
pub mod config;
pub mod ctfe;
pub mod demo;
pub mod dev_ctfe;
pub mod executor;
pub mod metrics;
pub mod output;
pub mod poller;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod storage;
pub mod task;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::autoscaler::{Autoscaler, NoAutoscaler};
use crate::config::{AutoscalerKind, Config};
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::shutdown::Shutdown;
use crate::status::Status;
use crate::storage::PatchStore;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the patch store")]
    Storage(#[source] auth::Error),
    #[error(
        "the gce autoscaler is not available yet (TODO(#4)); use --autoscaler none or --local"
    )]
    GceUnavailable,
}

/// A started daemon: its HTTP address and handles for tests and the demo.
pub struct Daemon {
    pub addr: SocketAddr,
    pub poller: Arc<Poller>,
    done: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Waits until the daemon has drained and stopped.
    pub async fn wait(self) {
        if let Err(e) = self.done.await {
            tracing::error!(error = %e, "the daemon's main task failed");
        }
    }
}

/// Binds the HTTP server and starts the poller; returns once both run.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Daemon, Error> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(Status::new(config.poll_interval, config.ctfe_timeout));
    let (listener, addr) =
        server::bind(config.metrics_addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.metrics_addr,
                source,
            })?;
    let store = PatchStore::from_config(&config).map_err(Error::Storage)?;
    let autoscaler: Arc<dyn Autoscaler> = match config.autoscaler.kind {
        AutoscalerKind::None => Arc::new(NoAutoscaler),
        AutoscalerKind::Gce => return Err(Error::GceUnavailable),
    };
    let ctfe = ctfe::Client::new(
        config.ctfe_url.clone(),
        config.ctfe_timeout,
        Arc::clone(&metrics),
    );
    let state = Arc::new(server::AppState {
        metrics: Arc::clone(&metrics),
        status: Arc::clone(&status),
        webapp_url: config.webapp_url.clone(),
    });
    let server_stop = CancellationToken::new();
    let server = server::spawn(listener, state, server_stop.clone());
    tracing::info!(addr = %addr, ctfe = %config.ctfe_url, "ct-poller {} listening", env!("CARGO_PKG_VERSION"));
    let poller = Arc::new(Poller::new(
        config, ctfe, store, autoscaler, metrics, status,
    ));
    let done = tokio::spawn({
        let poller = Arc::clone(&poller);
        async move {
            poller.run(shutdown).await;
            server_stop.cancel();
            let _ = server.await;
        }
    });
    Ok(Daemon { addr, poller, done })
}

/// Runs the daemon until it has been told to stop and has drained.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), Error> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

/// An error and its sources, `outer: inner: root`, for one log line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
