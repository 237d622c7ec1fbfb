//! The patch store: patch ids (GCS object names such as `patches/<sha1>.patch`) resolved
//! against `gs://BUCKET` (GCS JSON API media download) or `file:///DIR`.
//!
//! Patch ids come from CTFE, so they are untrusted: a `file://` id never escapes its
//! directory, a `gs://` id is percent-encoded, and no patch over [`MAX_PATCH`] is read.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{StatusCode, Url};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, TokenSource};
use crate::config::{join, Config, PatchStoreUrl};
use crate::metrics::Metrics;
use crate::retry::{is_transient_status, Backoff, Retryable};

/// Patches are diffs and page lists; anything bigger is an error, not a download.
pub const MAX_PATCH: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("patch id {id:?} is not a safe relative object name")]
    InvalidId { id: String },
    #[error("patch {id:?} does not exist")]
    NotFound { id: String },
    #[error("patch {id:?} is larger than {MAX_PATCH} bytes")]
    TooLarge { id: String },
    #[error("cannot read patch {id:?}")]
    Io {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("request for patch {id:?} failed")]
    Transport {
        id: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("storage answered {status} for patch {id:?}")]
    Status { id: String, status: StatusCode },
    #[error("no credentials for storage")]
    Auth(#[source] auth::Error),
}

impl Error {
    pub fn label(&self) -> &'static str {
        match self {
            Error::InvalidId { .. } => "invalid_id",
            Error::NotFound { .. } => "not_found",
            Error::TooLarge { .. } => "too_large",
            _ => "error",
        }
    }
}

impl Retryable for Error {
    fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => is_transient_status(*status),
            Error::Auth(e) => e.is_transient(),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub enum PatchStore {
    File(PathBuf),
    Gcs(Arc<Gcs>),
}

pub struct Gcs {
    http: reqwest::Client,
    api_root: Url,
    bucket: String,
    /// `None` against an emulator.
    auth: Option<TokenSource>,
}

impl PatchStore {
    /// Builds the store; `STORAGE_EMULATOR_HOST` (in config) overrides the API root
    /// and disables auth. Credentials are only looked for when a gs:// store needs them.
    pub fn from_config(config: &Config) -> Result<PatchStore, auth::Error> {
        match &config.patch_store {
            PatchStoreUrl::File(dir) => Ok(PatchStore::File(dir.clone())),
            PatchStoreUrl::Gcs { bucket } => {
                let (api_root, auth) = match config.storage_emulator_host.as_deref() {
                    Some(host) => {
                        let root = if host.contains("://") { host.to_owned() } else { format!("http://{host}") };
                        let root = Url::parse(&root).map_err(|e| auth::Error::Invalid {
                            path: "STORAGE_EMULATOR_HOST".into(),
                            reason: e.to_string(),
                        })?;
                        (root, None)
                    }
                    None => {
                        let source = TokenSource::discover(
                            Path::new(&config.script.service_account_file),
                            config.script.local,
                            &config.google,
                            &[auth::SCOPE_CLOUD_PLATFORM],
                        )?;
                        (config.storage_url.clone(), Some(source))
                    }
                };
                let http = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(30))
                    .read_timeout(Duration::from_secs(120))
                    .build()
                    .expect("the TLS backend initialises");
                Ok(PatchStore::Gcs(Arc::new(Gcs { http, api_root, bucket: bucket.clone(), auth })))
            }
        }
    }

    /// Fetches a patch, retrying transient failures a few times; counts the result.
    pub async fn fetch(&self, id: &str, metrics: &Metrics, cancel: &CancellationToken) -> Result<Vec<u8>, Error> {
        let backoff = Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(10),
            max_attempts: Some(4),
            retry_permanent: false,
        };
        let result = backoff.retry("patch fetch", cancel, |_| self.fetch_once(id)).await;
        let label = result.as_ref().map_or_else(Error::label, |_| "ok");
        metrics.patch_fetches.with_label_values(&[label]).inc();
        result
    }

    async fn fetch_once(&self, id: &str) -> Result<Vec<u8>, Error> {
        match self {
            PatchStore::File(dir) => read_file(dir, id).await,
            PatchStore::Gcs(gcs) => gcs.fetch(id).await,
        }
    }
}

async fn read_file(dir: &Path, id: &str) -> Result<Vec<u8>, Error> {
    let relative = Path::new(id);
    let safe = !id.is_empty() && relative.components().all(|c| matches!(c, Component::Normal(_)));
    if !safe {
        return Err(Error::InvalidId { id: id.to_owned() });
    }
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { id: id.to_owned() },
        _ => Error::Io { id: id.to_owned(), source },
    };
    let file = tokio::fs::File::open(dir.join(relative)).await.map_err(io)?;
    let mut content = Vec::new();
    file.take(MAX_PATCH + 1).read_to_end(&mut content).await.map_err(io)?;
    if content.len() as u64 > MAX_PATCH {
        return Err(Error::TooLarge { id: id.to_owned() });
    }
    Ok(content)
}

impl Gcs {
    async fn fetch(&self, id: &str) -> Result<Vec<u8>, Error> {
        if id.is_empty() || id.len() > 1024 {
            return Err(Error::InvalidId { id: id.to_owned() });
        }
        let mut url = join(&self.api_root, &format!("storage/v1/b/{}/o/{}", self.bucket, percent_encode(id)));
        url.set_query(Some("alt=media"));
        let mut request = self.http.get(url);
        if let Some(auth) = &self.auth {
            request = request.bearer_auth(auth.token().await.map_err(Error::Auth)?.value);
        }
        let transport = |source| Error::Transport { id: id.to_owned(), source };
        let mut response = request.send().await.map_err(transport)?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(Error::NotFound { id: id.to_owned() }),
            status => return Err(Error::Status { id: id.to_owned(), status }),
        }
        if response.content_length().is_some_and(|len| len > MAX_PATCH) {
            return Err(Error::TooLarge { id: id.to_owned() });
        }
        let mut content = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (content.len() + chunk.len()) as u64 > MAX_PATCH {
                return Err(Error::TooLarge { id: id.to_owned() });
            }
            content.extend_from_slice(&chunk);
        }
        Ok(content)
    }
}

/// Percent-encodes everything outside RFC 3986's unreserved set (so `/` becomes `%2F`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_object_names() {
        assert_eq!(percent_encode("patches/abc.patch"), "patches%2Fabc.patch");
        assert_eq!(percent_encode("a b?#&é"), "a%20b%3F%23%26%C3%A9");
    }

    #[tokio::test]
    async fn file_store_stays_inside_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("patches")).unwrap();
        std::fs::write(dir.path().join("patches/a.patch"), "diff").unwrap();
        assert_eq!(read_file(dir.path(), "patches/a.patch").await.unwrap(), b"diff");
        for bad in ["", "../x", "/etc/passwd", "patches/../../x", "./a"] {
            assert!(matches!(read_file(dir.path(), bad).await, Err(Error::InvalidId { .. })), "{bad}");
        }
        assert!(matches!(read_file(dir.path(), "patches/none").await, Err(Error::NotFound { .. })));
    }

    #[tokio::test]
    async fn file_store_refuses_huge_patches() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("big")).unwrap();
        f.set_len(MAX_PATCH + 1).unwrap();
        assert!(matches!(read_file(dir.path(), "big").await, Err(Error::TooLarge { .. })));
    }
}
