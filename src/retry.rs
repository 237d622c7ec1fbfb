//! Exponential backoff with jitter, shared by every retried call (CTFE, storage, auth,
//! autoscaler). Retrying keys off [`Retryable`], never off error strings.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What backoff needs to know about an error.
pub trait Retryable: std::error::Error {
    /// Network errors, timeouts, 408, 429 and 5xx.
    fn is_transient(&self) -> bool;
    /// A server's `Retry-After`, honoured instead of the computed delay.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// HTTP statuses worth retrying: request timeout, too many requests, server errors.
pub fn is_transient_status(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || matches!(status.as_u16(), 408 | 429)
}

#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Total attempts; `None`: until it succeeds or is cancelled.
    pub max_attempts: Option<u32>,
    /// Retry permanent errors too (start-up terminate must succeed whatever CTFE says).
    pub retry_permanent: bool,
}

impl Backoff {
    /// Delay after failed attempt `attempt` (1-based): `initial * 2^(attempt-1)`, capped,
    /// then "equal jitter": half fixed, half random, so retries never bunch up.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }

    /// Runs `op` until it succeeds, fails permanently, runs out of attempts, or `cancel`
    /// fires (then the last error is returned). At least one attempt is always made.
    pub async fn retry<T, E, F, Fut>(&self, what: &str, cancel: &CancellationToken, mut op: F) -> Result<T, E>
    where
        E: Retryable,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 1;
        loop {
            let err = match op(attempt).await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            let out_of_attempts = self.max_attempts.is_some_and(|max| attempt >= max);
            if out_of_attempts || !(self.retry_permanent || err.is_transient()) || cancel.is_cancelled() {
                return Err(err);
            }
            let delay = err.retry_after().map_or_else(|| self.delay(attempt), |d| d.min(self.max));
            tracing::warn!(error = %crate::error_chain(&err), attempt, retry_in = ?delay, "{what} failed; retrying");
            let deadline = Instant::now() + delay;
            tokio::select! {
                _ = cancel.cancelled() => return Err(err),
                _ = tokio::time::sleep_until(deadline) => {}
            }
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("boom {0}")]
    struct Boom(bool);
    impl Retryable for Boom {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn delays_grow_and_stay_within_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            max_attempts: None,
            retry_permanent: false,
        };
        for attempt in 1..40 {
            let nominal = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(Duration::from_secs(60));
            let d = b.delay(attempt);
            assert!(d >= nominal / 2 && d <= nominal, "attempt {attempt}: {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_permanent_errors_and_after_max_attempts() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
            max_attempts: Some(3),
            retry_permanent: false,
        };
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let r: Result<(), Boom> = b
            .retry("t", &cancel, |_| {
                calls += 1;
                async { Err(Boom(true)) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let r: Result<(), Boom> = b
            .retry("t", &cancel, |_| {
                calls += 1;
                async { Err(Boom(false)) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = b
            .retry("t", &cancel, |n| {
                calls += 1;
                async move {
                    if n < 2 {
                        Err(Boom(true))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_an_endless_retry() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(1),
            max_attempts: None,
            retry_permanent: true,
        };
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.cancel();
        });
        let r: Result<(), Boom> = b.retry("t", &cancel, |_| async { Err(Boom(false)) }).await;
        assert!(r.is_err());
    }
}
