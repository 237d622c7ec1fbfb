//! The `.gitcookies` refresher (the original's `gitauth`, not with `--local`): lets the
//! master scripts reach Gerrit (`*.googlesource.com`) as the poller's Google identity.
//!
//! Owns `~/.gitcookies` when it did not exist at start-up (or carries our marker line, i.e.
//! a previous run of ours wrote it): writes it with the current access token and rewrites
//! it before the token expires. Points git at it (`git config --global http.cookiefile`,
//! and `user.email`/`user.name` when `--service-account` is set) and the master scripts
//! (`GIT_COOKIES_PATH`, set by `lib::start`).
//!
//! Invariants: the file is never readable by others (written 0600 into a temporary file in
//! the same directory, then renamed over it, so readers see the old or the new file, never
//! a partial one); a file someone else put there is left alone; git runs without a shell,
//! with `HOME` set to the given home; failures are logged, counted
//! (`ct_poller_gitcookies_refreshes_total{result="error"}`) and retried, never fatal.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::auth::{self, Token, TokenSource};
use crate::error_chain;
use crate::metrics::Metrics;
use crate::retry::Retryable;

/// The first line of a file we wrote; curl and git skip `#` lines.
const MARKER: &str = "# Written by ct-poller, which rewrites it before the token expires.";
/// After a failed refresh (the original's RETRY_INTERVAL).
const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Never refresh more often than this, whatever the token's lifetime.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot get an access token for .gitcookies")]
    Token(#[source] auth::Error),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run `git {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`git {args}` failed ({status}): {output}")]
    Git { args: String, status: ExitStatus, output: String },
}

impl Error {
    /// Worth retrying as is: a token endpoint that is briefly down.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Token(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// The cookie file of one home directory and the git identity to configure.
#[derive(Debug, Clone)]
pub struct GitCookies {
    home: PathBuf,
    path: PathBuf,
    /// `--service-account`: git's `user.email`, and before the `@` its `user.name`.
    email: String,
}

impl GitCookies {
    pub fn new(home: &Path, email: &str) -> GitCookies {
        GitCookies { home: home.to_path_buf(), path: home.join(".gitcookies"), email: email.to_owned() }
    }

    /// `<home>/.gitcookies`, the value of `GIT_COOKIES_PATH`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Configures git, then keeps the file fresh until `cancel` (unless someone else's
    /// file is there). Logs and counts its own failures; never returns early on them.
    pub async fn run(self, tokens: Arc<TokenSource>, metrics: Arc<Metrics>, cancel: CancellationToken) {
        let count = |result: &str| metrics.gitcookies_refreshes.with_label_values(&[result]).inc();
        if let Err(e) = self.configure_git().await {
            error!(error = %error_chain(&e), "configuring git for .gitcookies failed");
            count("error");
        }
        match self.is_ours() {
            Ok(true) => {}
            Ok(false) => {
                info!(path = %self.path.display(), "a .gitcookies not written by ct-poller exists: left alone");
                return;
            }
            Err(e) => {
                error!(error = %error_chain(&e), "cannot tell whose .gitcookies this is: left alone");
                count("error");
                return;
            }
        }
        loop {
            let next = match self.refresh(&tokens).await {
                Ok(token) => {
                    count("ok");
                    info!(path = %self.path.display(), expiry = %token.expiry, ".gitcookies written");
                    token.refresh_at.max(Instant::now() + MIN_INTERVAL)
                }
                Err(e) => {
                    error!(error = %error_chain(&e), retry_in = ?RETRY_INTERVAL, "refreshing .gitcookies failed");
                    count("error");
                    Instant::now() + RETRY_INTERVAL
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Absent, or written by us (a previous run): ours to write.
    pub fn is_ours(&self) -> Result<bool, Error> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text.lines().next() == Some(MARKER)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(source) => Err(Error::Read { path: self.path.clone(), source }),
        }
    }

    /// Writes the file with a token from `tokens` (cached or fresh); returns that token.
    pub async fn refresh(&self, tokens: &TokenSource) -> Result<Token, Error> {
        let token = tokens.token().await.map_err(Error::Token)?;
        self.write(&token)?;
        Ok(token)
    }

    /// Atomically replaces the file: a 0600 temporary file in the same directory, renamed.
    pub fn write(&self, token: &Token) -> Result<(), Error> {
        let failed = |source| Error::Write { path: self.path.clone(), source };
        let mut file = tempfile::Builder::new().prefix(".gitcookies.").tempfile_in(&self.home).map_err(failed)?;
        file.as_file().set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
        file.write_all(render(token).as_bytes()).map_err(failed)?;
        file.as_file().sync_all().map_err(failed)?;
        file.persist(&self.path).map_err(|e| failed(e.error))?;
        Ok(())
    }

    /// `git config --global http.cookiefile <path>`, then `user.email` and `user.name`
    /// when an e-mail was given (as the original's gitauth.New).
    pub async fn configure_git(&self) -> Result<(), Error> {
        let path = self.path.display().to_string();
        self.git(&["config", "--global", "http.cookiefile", &path]).await?;
        if !self.email.is_empty() {
            let name = self.email.split('@').next().unwrap_or_default();
            self.git(&["config", "--global", "user.email", &self.email]).await?;
            self.git(&["config", "--global", "user.name", name]).await?;
        }
        Ok(())
    }

    async fn git(&self, args: &[&str]) -> Result<(), Error> {
        let joined = args.join(" ");
        // `--global` means $HOME/.gitconfig here: nothing else may redirect it.
        let output = tokio::process::Command::new("git")
            .args(args)
            .env("HOME", &self.home)
            .env_remove("GIT_CONFIG_GLOBAL")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| Error::Spawn { args: joined.clone(), source })?;
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        Err(Error::Git { args: joined, status: output.status, output: text.trim().to_owned() })
    }
}

/// The file's text: our marker, then the Go gitauth's two Netscape cookie lines (domain,
/// include subdomains, path, secure, expiry in Unix seconds, name `o`, the token).
pub fn render(token: &Token) -> String {
    let expiry = token.expiry.timestamp();
    let value = &token.value;
    format!(
        "{MARKER}\n\
         source.developers.google.com\tFALSE\t/\tTRUE\t{expiry}\to\t{value}\n\
         .googlesource.com\tTRUE\t/\tTRUE\t{expiry}\to\t{value}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn token(value: &str, expiry: i64) -> Token {
        Token {
            value: value.into(),
            refresh_at: Instant::now(),
            expires_in: Duration::from_secs(3600),
            expiry: chrono::DateTime::from_timestamp(expiry, 0).unwrap(),
        }
    }

    #[test]
    fn the_format_is_the_go_gitauth_one() {
        let text = render(&token("ya29.abc", 1_547_582_078));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], MARKER);
        assert_eq!(lines[1], "source.developers.google.com\tFALSE\t/\tTRUE\t1547582078\to\tya29.abc");
        assert_eq!(lines[2], ".googlesource.com\tTRUE\t/\tTRUE\t1547582078\to\tya29.abc");
        assert_eq!(lines.len(), 3);
        assert!(text.ends_with('\n'));
        for line in &lines[1..] {
            assert_eq!(line.split('\t').count(), 7, "Netscape cookie lines: {line}");
        }
    }

    #[test]
    fn writes_are_private_and_atomic() {
        let home = tempfile::tempdir().unwrap();
        let cookies = GitCookies::new(home.path(), "");
        cookies.write(&token("one", 1)).unwrap();
        // A file someone widened is replaced by a private one, not rewritten in place.
        std::fs::set_permissions(cookies.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        cookies.write(&token("two", 2)).unwrap();
        let meta = std::fs::metadata(cookies.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(cookies.path()).unwrap().contains("\to\ttwo\n"));
        let names: Vec<_> = std::fs::read_dir(home.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [".gitcookies"], "no temporary file left behind");
    }

    #[test]
    fn someone_elses_file_is_not_ours() {
        let home = tempfile::tempdir().unwrap();
        let cookies = GitCookies::new(home.path(), "");
        assert!(cookies.is_ours().unwrap(), "absent: ours to write");
        cookies.write(&token("one", 1)).unwrap();
        assert!(cookies.is_ours().unwrap(), "written by a previous run");
        std::fs::write(cookies.path(), ".googlesource.com\tTRUE\t/\tTRUE\t1\to\tmine\n").unwrap();
        assert!(!cookies.is_ours().unwrap());
    }

    #[tokio::test]
    async fn git_is_configured_in_the_given_home() {
        let home = tempfile::tempdir().unwrap();
        let cookies = GitCookies::new(home.path(), "skia-ct-master@example.iam.gserviceaccount.com");
        cookies.configure_git().await.unwrap();
        let config = std::fs::read_to_string(home.path().join(".gitconfig")).unwrap();
        let path = cookies.path().display().to_string();
        assert!(config.contains(&format!("cookiefile = {path}")), "{config}");
        assert!(config.contains("email = skia-ct-master@example.iam.gserviceaccount.com"));
        assert!(config.contains("name = skia-ct-master"));
    }
}
