//! Signals to cancellation: the first SIGTERM/SIGINT cancels `drain` (stop polling, wait
//! for tasks), a second one cancels `stop` (stop the tasks now). Everything that waits
//! selects on these tokens; nothing polls a flag.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop picking up work; running tasks continue until the drain timeout.
    pub drain: CancellationToken,
    /// Stop running tasks (SIGTERM, then SIGKILL to their process groups).
    pub stop: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Cancels `drain` on the first SIGTERM or SIGINT, `stop` on the second.
    /// Must be called inside the tokio runtime.
    pub fn on_signal() -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::new();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let tokens = shutdown.clone();
        tokio::spawn(async move {
            for token in [&tokens.drain, &tokens.stop] {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::warn!(
                    signal = name,
                    "{}",
                    if token == &tokens.drain { "draining" } else { "stopping tasks now" }
                );
                token.cancel();
            }
        });
        Ok(shutdown)
    }
}
