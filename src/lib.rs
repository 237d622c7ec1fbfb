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
//! - [`gitcookies`]: `~/.gitcookies` for the master scripts' Gerrit access.
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
pub mod gitcookies;
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
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::TokenSource;
use crate::autoscaler::{Autoscaler, GceAutoscaler, NoAutoscaler};
use crate::config::{AutoscalerKind, Config};
use crate::gitcookies::GitCookies;
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
    #[error("cannot set up the GCE autoscaler's credentials")]
    Autoscaler(#[source] auth::Error),
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

/// Binds the HTTP server and starts the poller; returns once both run. The GCE
/// autoscaler's start-up stop and the `.gitcookies` refresher run in the background.
pub async fn start(mut config: Config, shutdown: Shutdown) -> Result<Daemon, Error> {
    let metrics = Arc::new(Metrics::new());
    let (listener, addr) =
        server::bind(config.metrics_addr).await.map_err(|source| Error::Bind { addr: config.metrics_addr, source })?;
    let store = PatchStore::from_config(&config).map_err(Error::Storage)?;
    let background = CancellationToken::new();
    let autoscaler = build_autoscaler(&config, &metrics, &background)?;
    start_gitcookies(&mut config, &metrics, &background);
    let config = Arc::new(config);
    let status = Arc::new(Status::new(config.poll_interval, config.ctfe_timeout));
    let ctfe = ctfe::Client::new(config.ctfe_url.clone(), config.ctfe_timeout, Arc::clone(&metrics));
    let state = Arc::new(server::AppState {
        metrics: Arc::clone(&metrics),
        status: Arc::clone(&status),
        webapp_url: config.webapp_url.clone(),
    });
    let server_stop = CancellationToken::new();
    let server = server::spawn(listener, state, server_stop.clone());
    tracing::info!(addr = %addr, ctfe = %config.ctfe_url, "ct-poller {} listening", env!("CARGO_PKG_VERSION"));
    let poller = Arc::new(Poller::new(config, ctfe, store, autoscaler, metrics, status));
    let done = tokio::spawn({
        let poller = Arc::clone(&poller);
        async move {
            poller.run(shutdown).await;
            background.cancel();
            server_stop.cancel();
            let _ = server.await;
        }
    });
    Ok(Daemon { addr, poller, done })
}

/// `--autoscaler`: none, or the GCE fleet (its start-up stop begins in the background).
/// A dry run leaves the fleet alone: it registers nothing.
fn build_autoscaler(
    config: &Config,
    metrics: &Arc<Metrics>,
    background: &CancellationToken,
) -> Result<Arc<dyn Autoscaler>, Error> {
    match config.autoscaler.kind {
        AutoscalerKind::None => Ok(Arc::new(NoAutoscaler)),
        AutoscalerKind::Gce if config.dry_run => {
            tracing::info!("dry run: the GCE fleet is left alone");
            Ok(Arc::new(NoAutoscaler))
        }
        AutoscalerKind::Gce => {
            let tokens = TokenSource::discover(
                Path::new(&config.script.service_account_file),
                config.script.local,
                &config.google,
                &[auth::SCOPE_CLOUD_PLATFORM, auth::SCOPE_USERINFO_EMAIL],
            )
            .map_err(Error::Autoscaler)?;
            Ok(Arc::new(GceAutoscaler::new(
                &config.autoscaler,
                Arc::new(tokens),
                Arc::clone(metrics),
                background.child_token(),
            )))
        }
    }
}

/// The `.gitcookies` refresher, as the original (not with `--local`; nor in a dry run,
/// which changes nothing outside). Sets `GIT_COOKIES_PATH` for the master scripts.
/// Never fails the start: problems are logged and counted.
fn start_gitcookies(config: &mut Config, metrics: &Arc<Metrics>, background: &CancellationToken) {
    if config.script.local || config.dry_run {
        return;
    }
    let Some(home) = config.google.home.clone() else {
        tracing::warn!("no home directory (HOME is unset): no .gitcookies for the master scripts");
        return;
    };
    let cookies = GitCookies::new(&home, &config.service_account);
    config.child_env.push(("GIT_COOKIES_PATH".to_owned(), cookies.path().display().to_string()));
    let tokens = TokenSource::discover(
        Path::new(&config.script.service_account_file),
        config.script.local,
        &config.google,
        &[auth::SCOPE_USERINFO_EMAIL, auth::SCOPE_GERRIT],
    );
    match tokens {
        Ok(tokens) => {
            tokio::spawn(cookies.run(Arc::new(tokens), Arc::clone(metrics), background.child_token()));
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "no credentials for .gitcookies");
            metrics.gitcookies_refreshes.with_label_values(&["error"]).inc();
        }
    }
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
