//! The `ct-poller` binary: parse, set up logging, hand over to the library.

use std::process::ExitCode;

use ct_poller::config::{Command, Config};
use ct_poller::shutdown::Shutdown;
use ct_poller::{demo, dev_ctfe, telemetry};

// One thread: the poller mostly waits, and a single-threaded runtime costs less per
// poll and per task (bench/RESULTS.md); children and I/O are all asynchronous.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let command = match Config::from_args(std::env::args_os()) {
        Ok(command) => command,
        Err(ct_poller::config::Error::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("ct-poller: {}", ct_poller::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let format = match &command {
        Command::Run(c) | Command::Demo { config: c, .. } => c.log_format,
        Command::DevCtfe { .. } => ct_poller::config::LogFormat::Text,
    };
    telemetry::init(format);
    let shutdown = match Shutdown::on_signal() {
        Ok(shutdown) => shutdown,
        Err(e) => {
            eprintln!("ct-poller: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome: anyhow::Result<()> = match command {
        Command::Run(config) => ct_poller::run(config, shutdown).await.map_err(Into::into),
        Command::Demo { config, keep_running, metrics_addr_given } => {
            demo::run(config, keep_running, metrics_addr_given, shutdown).await.map_err(Into::into)
        }
        Command::DevCtfe { addr, tasks } => dev_ctfe::serve(addr, tasks.as_deref(), shutdown).await.map_err(Into::into),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ct-poller: {e:#}");
            ExitCode::FAILURE
        }
    }
}
