//! Google OAuth2 access tokens for storage (and the autoscaler): from a service-account
//! key file (JWT bearer flow, signed with ring), the gcloud application-default user
//! credentials (`--local`), or the GCE/GKE metadata server. Tokens are cached and
//! refreshed a minute before expiry; concurrent callers share one refresh. Nothing here
//! reads the environment: [`GoogleEnv`] carries it, so tests point every endpoint at
//! local servers.
//!
//! Hand-written rather than `gcp_auth`: that crate brings a second HTTP stack (hyper-rustls
//! beside reqwest) and its metadata and token endpoints cannot be pointed at test servers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use reqwest::Url;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::GoogleEnv;
use crate::retry::Retryable;

pub const SCOPE_CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
pub const SCOPE_USERINFO_EMAIL: &str = "https://www.googleapis.com/auth/userinfo.email";
pub const SCOPE_GERRIT: &str = "https://www.googleapis.com/auth/gerritcodereview";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read credentials file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("token request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("token endpoint {url} answered {status}: {body:?}")]
    Status { url: String, status: reqwest::StatusCode, body: String },
}

impl Retryable for Error {
    fn is_transient(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Status { status, .. } => crate::retry::is_transient_status(*status),
            _ => false,
        }
    }
}

/// Where tokens come from.
enum Source {
    ServiceAccount { email: String, key: Box<RsaKeyPair>, token_uri: String },
    User { client_id: String, client_secret: String, refresh_token: String, token_uri: String },
    Metadata { root: Url },
}

/// A cached OAuth2 access token and when to stop using it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    /// When [`TokenSource::token`] stops handing it out and fetches a new one: a minute
    /// before expiry (half the lifetime for tokens shorter than two minutes).
    pub refresh_at: Instant,
    /// The validity the token endpoint granted, from when it answered.
    pub expires_in: Duration,
    /// Wall-clock expiry (the `.gitcookies` expiry column).
    pub expiry: chrono::DateTime<chrono::Utc>,
}

pub struct TokenSource {
    source: Source,
    scopes: String,
    http: reqwest::Client,
    cache: Mutex<Option<Token>>,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    token_uri: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    refresh_token: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default = "default_expiry")]
    expires_in: u64,
}

fn default_expiry() -> u64 {
    3600
}

const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";

/// How long before expiry a token is replaced.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

impl TokenSource {
    /// Picks the source as Google's libraries do: the key file (`--service-account-file`,
    /// else `GOOGLE_APPLICATION_CREDENTIALS`) if it exists; with `local`, the gcloud
    /// application-default file; else the metadata server (`GCE_METADATA_HOST` overrides).
    /// Errors only when a key file exists but is unusable.
    pub fn discover(
        service_account_file: &Path,
        local: bool,
        env: &GoogleEnv,
        scopes: &[&str],
    ) -> Result<TokenSource, Error> {
        let gcloud = env.home.as_ref().map(|home| home.join(".config/gcloud/application_default_credentials.json"));
        let candidates =
            [Some(service_account_file.to_path_buf()), env.credentials_file.clone(), gcloud.filter(|_| local)];
        if let Some(path) = candidates.into_iter().flatten().find(|p| p.is_file()) {
            return TokenSource::from_file(&path, scopes);
        }
        let host = &env.metadata_host;
        let root = Url::parse(&format!("http://{host}/"))
            .map_err(|e| Error::Invalid { path: "GCE_METADATA_HOST".into(), reason: e.to_string() })?;
        Ok(TokenSource::new(Source::Metadata { root }, scopes))
    }

    /// A service-account key or an `authorized_user` file.
    pub fn from_file(path: &Path, scopes: &[&str]) -> Result<TokenSource, Error> {
        let invalid = |reason: String| Error::Invalid { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let token_uri = if file.token_uri.is_empty() { DEFAULT_TOKEN_URI.to_owned() } else { file.token_uri };
        let source = match file.kind.as_str() {
            "service_account" => {
                let der =
                    pem_to_der(&file.private_key).ok_or_else(|| invalid("private_key is not a PEM key".into()))?;
                let key = RsaKeyPair::from_pkcs8(&der).map_err(|e| invalid(format!("private_key: {e}")))?;
                Source::ServiceAccount { email: file.client_email, key: Box::new(key), token_uri }
            }
            "authorized_user" => Source::User {
                client_id: file.client_id,
                client_secret: file.client_secret,
                refresh_token: file.refresh_token,
                token_uri,
            },
            other => return Err(invalid(format!("unsupported credentials type {other:?}"))),
        };
        Ok(TokenSource::new(source, scopes))
    }

    /// The metadata server at `root` (tests point it at a local server).
    pub fn metadata(root: Url, scopes: &[&str]) -> TokenSource {
        TokenSource::new(Source::Metadata { root }, scopes)
    }

    fn new(source: Source, scopes: &[&str]) -> TokenSource {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("the TLS backend initialises");
        TokenSource { source, scopes: scopes.join(" "), http, cache: Mutex::new(None) }
    }

    /// A valid access token; cancel-safe (a dropped call leaves the cache intact). Callers
    /// arriving while a refresh is in flight wait for it (the cache lock is held across
    /// the fetch), so concurrent callers share one refresh.
    pub async fn token(&self) -> Result<Token, Error> {
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(token.clone());
        }
        let fresh = self.fetch().await?;
        // Google grants an hour; a day caps nonsense so the arithmetic below cannot overflow.
        let expires_in = Duration::from_secs(fresh.expires_in.min(86_400));
        let margin = REFRESH_MARGIN.min(expires_in / 2);
        let token = Token {
            value: fresh.access_token,
            refresh_at: Instant::now() + expires_in - margin,
            expires_in,
            expiry: chrono::Utc::now() + chrono::TimeDelta::seconds(expires_in.as_secs() as i64),
        };
        *cache = Some(token.clone());
        Ok(token)
    }

    async fn fetch(&self) -> Result<TokenResponse, Error> {
        let (url, request) = match &self.source {
            Source::Metadata { root } => {
                let mut url = root.join("computeMetadata/v1/instance/service-accounts/default/token").expect("valid");
                url.query_pairs_mut().append_pair("scopes", &self.scopes.replace(' ', ","));
                (url.to_string(), self.http.get(url).header("Metadata-Flavor", "Google"))
            }
            Source::ServiceAccount { email, key, token_uri } => {
                let assertion = jwt(email, key, token_uri, &self.scopes, chrono::Utc::now().timestamp());
                let form = [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)];
                (token_uri.clone(), self.http.post(token_uri).form(&form))
            }
            Source::User { client_id, client_secret, refresh_token, token_uri } => {
                let form = [
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", client_secret.as_str()),
                    ("refresh_token", refresh_token.as_str()),
                ];
                (token_uri.clone(), self.http.post(token_uri).form(&form))
            }
        };
        let transport = |source| Error::Transport { url: url.clone(), source };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(Error::Status { url, status, body: crate::ctfe::client::excerpt(&body) });
        }
        serde_json::from_slice(&body).map_err(|e| Error::Invalid { path: url.into(), reason: e.to_string() })
    }
}

/// An RS256-signed JWT assertion for the OAuth2 JWT bearer flow (RFC 7523).
fn jwt(email: &str, key: &RsaKeyPair, audience: &str, scopes: &str, now: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = serde_json::json!({"iss": email, "scope": scopes, "aud": audience, "iat": now, "exp": now + 3600});
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), signing_input.as_bytes(), &mut signature)
        .expect("RSA signing with a valid key cannot fail");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// The DER bytes of a `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM block.
fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    STANDARD.decode(body.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_a_key_block_is_rejected() {
        assert!(pem_to_der("garbage").is_none() || pem_to_der("garbage") == Some(vec![]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        std::fs::write(&path, r#"{"type":"service_account","private_key":"nope"}"#).unwrap();
        assert!(matches!(TokenSource::from_file(&path, &[]), Err(Error::Invalid { .. })));
        std::fs::write(&path, r#"{"type":"external_account"}"#).unwrap();
        assert!(matches!(TokenSource::from_file(&path, &[]), Err(Error::Invalid { .. })));
    }

    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::sync::Mutex as StdMutex;

    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    /// A token endpoint and a metadata server on 127.0.0.1 that count and record calls.
    #[derive(Default)]
    struct Endpoint {
        calls: AtomicUsize,
        forms: StdMutex<Vec<Vec<(String, String)>>>,
        scopes: StdMutex<Vec<String>>,
        expires_in: u64,
        delay: Duration,
    }

    async fn serve(expires_in: u64, delay: Duration) -> (Url, Arc<Endpoint>) {
        let endpoint = Arc::new(Endpoint { expires_in, delay, ..Endpoint::default() });
        async fn answer(e: &Endpoint, prefix: &str) -> Json<serde_json::Value> {
            let n = e.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(e.delay).await;
            Json(serde_json::json!({
                "access_token": format!("{prefix}-{n}"),
                "expires_in": e.expires_in,
                "token_type": "Bearer",
            }))
        }
        let router = Router::new()
            .route(
                "/token",
                post(|State(e): State<Arc<Endpoint>>, body: String| async move {
                    let url = Url::parse(&format!("http://form/?{body}")).unwrap();
                    let form = url.query_pairs().into_owned().collect();
                    e.forms.lock().unwrap().push(form);
                    answer(&e, "sa").await
                }),
            )
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/token",
                get(
                    |State(e): State<Arc<Endpoint>>,
                     headers: HeaderMap,
                     Query(q): Query<std::collections::HashMap<String, String>>| async move {
                        assert_eq!(headers["metadata-flavor"], "Google");
                        e.scopes.lock().unwrap().push(q["scopes"].clone());
                        answer(&e, "meta").await
                    },
                ),
            )
            .with_state(Arc::clone(&endpoint));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (format!("http://{addr}/").parse().unwrap(), endpoint)
    }

    /// A fresh 2048-bit test key (PKCS#8 PEM) and its public half as DER RSAPublicKey,
    /// from the openssl command, so the verifier does not share code with the signer.
    fn test_key(dir: &Path) -> (String, Vec<u8>) {
        let pem = dir.join("test-key.pem");
        let der = dir.join("test-key.pub.der");
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .status()
                .expect("the auth tests need the openssl command (apt-get install openssl)");
            assert!(status.success(), "openssl {args:?}");
        };
        let (pem_s, der_s) = (pem.to_str().unwrap(), der.to_str().unwrap());
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pem_s]);
        run(&["rsa", "-in", pem_s, "-RSAPublicKey_out", "-outform", "DER", "-out", der_s, "-passin", "pass:"]);
        (std::fs::read_to_string(pem).unwrap(), std::fs::read(der).unwrap())
    }

    fn decode_part(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn the_jwt_assertion_is_signed_with_the_key_file_and_carries_the_claims() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, public) = test_key(dir.path());
        let (root, endpoint) = serve(3600, Duration::ZERO).await;
        let token_uri = format!("{root}token");
        let key_file = dir.path().join("key.json");
        let key = serde_json::json!({
            "type": "service_account",
            "client_email": "poller@test-project.iam.gserviceaccount.com",
            "private_key": pem,
            "token_uri": token_uri,
        });
        std::fs::write(&key_file, key.to_string()).unwrap();
        let tokens = TokenSource::from_file(&key_file, &[SCOPE_CLOUD_PLATFORM, SCOPE_USERINFO_EMAIL]).unwrap();
        let before = chrono::Utc::now().timestamp();
        assert_eq!(tokens.token().await.unwrap().value, "sa-1");
        let after = chrono::Utc::now().timestamp();

        let form = endpoint.forms.lock().unwrap()[0].clone();
        let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("grant_type"), "urn:ietf:params:oauth:grant-type:jwt-bearer");
        let assertion = get("assertion");
        let parts: Vec<&str> = assertion.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(decode_part(parts[0]), serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let claims = decode_part(parts[1]);
        assert_eq!(claims["iss"], "poller@test-project.iam.gserviceaccount.com");
        assert_eq!(claims["scope"], format!("{SCOPE_CLOUD_PLATFORM} {SCOPE_USERINFO_EMAIL}"));
        assert_eq!(claims["aud"], token_uri.as_str());
        let iat = claims["iat"].as_i64().unwrap();
        assert!((before..=after).contains(&iat), "iat {iat} not in [{before}, {after}]");
        assert_eq!(claims["exp"].as_i64().unwrap(), iat + 3600);

        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public);
        let signed = format!("{}.{}", parts[0], parts[1]);
        verifier.verify(signed.as_bytes(), &signature).expect("RS256 with the file's key");
        let forged = format!("{}.{}", parts[0], URL_SAFE_NO_PAD.encode(br#"{"iss":"someone@else"}"#));
        assert!(verifier.verify(forged.as_bytes(), &signature).is_err());
    }

    #[tokio::test]
    async fn tokens_are_cached_and_concurrent_callers_share_one_refresh() {
        let (root, endpoint) = serve(3600, Duration::from_millis(200)).await;
        let tokens = Arc::new(TokenSource::metadata(root, &[SCOPE_USERINFO_EMAIL, SCOPE_GERRIT]));
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                tokio::spawn(async move { tokens.token().await.unwrap().value })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), "meta-1");
        }
        assert_eq!(tokens.token().await.unwrap().value, "meta-1");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1, "one refresh for eleven callers");
        assert_eq!(endpoint.scopes.lock().unwrap()[0], format!("{SCOPE_USERINFO_EMAIL},{SCOPE_GERRIT}"));
    }

    #[tokio::test]
    async fn tokens_are_refreshed_before_they_expire() {
        let (root, endpoint) = serve(2, Duration::ZERO).await;
        let tokens = TokenSource::metadata(root, &[SCOPE_CLOUD_PLATFORM]);
        let first = tokens.token().await.unwrap();
        let fetched = Instant::now();
        assert_eq!(first.value, "meta-1");
        assert_eq!(first.expires_in, Duration::from_secs(2));
        let expiry_gap = first.expiry - chrono::Utc::now();
        assert!(expiry_gap <= chrono::TimeDelta::seconds(2) && expiry_gap > chrono::TimeDelta::zero());
        let deadline = fetched + Duration::from_secs(10);
        let second = loop {
            let t = tokens.token().await.unwrap();
            if t.value != first.value {
                break t;
            }
            assert!(Instant::now() < deadline, "never refreshed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let refreshed_after = fetched.elapsed();
        assert_eq!(second.value, "meta-2");
        assert!(refreshed_after >= Duration::from_millis(900), "too early: {refreshed_after:?}");
        assert!(refreshed_after < Duration::from_secs(2), "not before expiry: {refreshed_after:?}");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
    }
}
