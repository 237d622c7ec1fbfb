//! Configuration: built-in defaults < TOML file < `CT_POLLER_*` environment < flags.
//!
//! Every option is parsed in one place ([`Layers::resolve`]) so that a bad value gives the
//! same message, naming the option, whichever layer it came from. Nothing here does I/O
//! beyond reading the config file and checking that directories exist.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reqwest::Url;
use serde::Deserialize;

use crate::autoscaler::gce::Timing;
use crate::task::argv::ScriptSettings;
use crate::task::Kind;

/// A configuration error; `main` prints it and exits 2 before any request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("invalid value {value:?} for {option}: {reason}")]
    Invalid { option: String, value: String, reason: String },
}

#[derive(Debug, Parser)]
#[command(name = "ct-poller", version, about = "Cluster Telemetry poller: runs CTFE's pending tasks")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon (the default).
    Run,
    /// Run the daemon against an in-process development CTFE with sample tasks.
    Demo {
        /// Stay up (status page open) after the queue is drained.
        #[arg(long)]
        keep_running: bool,
    },
    /// Run the development CTFE alone.
    DevCtfe {
        #[arg(long, default_value = "127.0.0.1:9000")]
        addr: SocketAddr,
        /// Directory of envelope files (like fixtures/*.pending.json), enqueued in name order.
        #[arg(long)]
        tasks: Option<PathBuf>,
    },
}

/// Daemon options. Values stay strings here so that one parser per option serves flags,
/// environment and the TOML file alike.
#[derive(Debug, Args, Default)]
struct Options {
    /// TOML configuration file (see config/ct-poller.toml).
    #[arg(long, global = true, env = "CT_POLLER_CONFIG")]
    config: Option<PathBuf>,
    /// CTFE internal root; endpoint paths are appended [default: http://ctfe:9000/]
    #[arg(long, global = true, env = "CT_POLLER_CTFE_URL", alias = "ctfe_internal_url")]
    ctfe_url: Option<String>,
    /// Time between polls; the first poll is immediate [default: 30s]
    #[arg(long, global = true, env = "CT_POLLER_POLL_INTERVAL", alias = "poll_interval")]
    poll_interval: Option<String>,
    /// Timeout of every CTFE request [default: 30s]
    #[arg(long, global = true, env = "CT_POLLER_CTFE_TIMEOUT")]
    ctfe_timeout: Option<String>,
    /// Address of /metrics, /healthz, /readyz and the status page [default: 0.0.0.0:20000]
    #[arg(long, global = true, env = "CT_POLLER_METRICS_ADDR", alias = "prom_port")]
    metrics_addr: Option<String>,
    /// Where run files are written; children get TMPDIR set to it [default: $TMPDIR or /tmp]
    #[arg(long, global = true, env = "CT_POLLER_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Directory holding the master scripts [default: look up on PATH]
    #[arg(long, global = true, env = "CT_POLLER_SCRIPTS_DIR")]
    scripts_dir: Option<PathBuf>,
    /// gs://BUCKET or file:///DIR [default: gs://cluster-telemetry, -test with --local]
    #[arg(long, global = true, env = "CT_POLLER_PATCH_STORE")]
    patch_store: Option<String>,
    /// GCS JSON API root; STORAGE_EMULATOR_HOST overrides it [default: https://storage.googleapis.com]
    #[arg(long, global = true, env = "CT_POLLER_STORAGE_URL")]
    storage_url: Option<String>,
    /// Local mode: --local=true to scripts, local credentials, autoscaler none
    #[arg(long, global = true, env = "CT_POLLER_LOCAL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    local: Option<String>,
    /// Forwarded to scripts as --service_account_file [default: /var/secrets/google/key.json]
    #[arg(long, global = true, env = "CT_POLLER_SERVICE_ACCOUNT_FILE", alias = "service_account_file")]
    service_account_file: Option<String>,
    /// Forwarded as --email_client_secret_file [default: /etc/ct-email-secrets/client_secret.json]
    #[arg(long, global = true, env = "CT_POLLER_EMAIL_CLIENT_SECRET_FILE", alias = "email_client_secret_file")]
    email_client_secret_file: Option<String>,
    /// Forwarded as --email_token_cache_file [default: /etc/ct-email-secrets/client_token.json]
    #[arg(long, global = true, env = "CT_POLLER_EMAIL_TOKEN_CACHE_FILE", alias = "email_token_cache_file")]
    email_token_cache_file: Option<String>,
    /// Public CTFE root, for links on the status page [default: https://ct.skia.org/]
    #[arg(long, global = true, env = "CT_POLLER_WEBAPP_URL", alias = "ctfe_url")]
    webapp_url: Option<String>,
    /// E-mail written into the git config by the .gitcookies refresher
    #[arg(long, global = true, env = "CT_POLLER_SERVICE_ACCOUNT", alias = "service_account")]
    service_account: Option<String>,
    /// gce or none [default: gce, none with --local]
    #[arg(long, global = true, env = "CT_POLLER_AUTOSCALER")]
    autoscaler: Option<String>,
    /// How long a GCE task may wait for the autoscaler [default: 30m]
    #[arg(long, global = true, env = "CT_POLLER_REGISTER_TIMEOUT")]
    register_timeout: Option<String>,
    /// Tasks running at once, 0 for no limit [default: 0]
    #[arg(long, global = true, env = "CT_POLLER_MAX_CONCURRENT_TASKS")]
    max_concurrent_tasks: Option<String>,
    /// Default per-task time limit, 0 for none [default: 0]
    #[arg(long, global = true, env = "CT_POLLER_TASK_TIMEOUT")]
    task_timeout: Option<String>,
    /// On SIGTERM/SIGINT, how long to wait for running tasks [default: 1h]
    #[arg(long, global = true, env = "CT_POLLER_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// Worker output kept in memory per task, head and tail [default: 4MiB]
    #[arg(long, global = true, env = "CT_POLLER_OUTPUT_LIMIT")]
    output_limit: Option<String>,
    /// Log each task's argv and files instead of running it; report nothing
    #[arg(long, global = true, env = "CT_POLLER_DRY_RUN", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    dry_run: Option<String>,
    /// text or json [default: text]
    #[arg(long, global = true, env = "CT_POLLER_LOG_FORMAT")]
    log_format: Option<String>,
    /// GCE project of the CT bots [default: ct-swarming-bots]
    #[arg(long, global = true, env = "CT_POLLER_GCE_PROJECT")]
    gce_project: Option<String>,
    /// Zone of the CT bots [default: us-central1-b]
    #[arg(long, global = true, env = "CT_POLLER_GCE_ZONE")]
    gce_zone: Option<String>,
    /// Instance name prefix [default: ct-gce-]
    #[arg(long, global = true, env = "CT_POLLER_GCE_INSTANCE_PREFIX")]
    gce_instance_prefix: Option<String>,
    /// Instances 1..=N [default: 500]
    #[arg(long, global = true, env = "CT_POLLER_GCE_INSTANCE_COUNT")]
    gce_instance_count: Option<String>,
    /// Compute Engine API root [default: https://compute.googleapis.com/compute/v1/]
    #[arg(long, global = true, env = "CT_POLLER_COMPUTE_URL")]
    compute_url: Option<String>,
    /// Swarming server root [default: https://chrome-swarming.appspot.com/]
    #[arg(long, global = true, env = "CT_POLLER_SWARMING_URL")]
    swarming_url: Option<String>,
    /// v2 (prpc DeleteBot) or v1 (the original's endpoint) [default: v2]
    #[arg(long, global = true, env = "CT_POLLER_SWARMING_API")]
    swarming_api: Option<String>,
    /// Instance and bot calls in flight at once [default: 50]
    #[arg(long, global = true, env = "CT_POLLER_AUTOSCALER_CONCURRENCY")]
    autoscaler_concurrency: Option<String>,
    // The original's glog flags: accepted so old manifests keep working; logs go to stderr.
    #[arg(long, global = true, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    logtostderr: Option<String>,
    #[arg(long, global = true, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    alsologtostderr: Option<String>,
    #[arg(long = "v", global = true, hide = true)]
    verbosity: Option<String>,
    #[arg(long, global = true, hide = true)]
    vmodule: Option<String>,
    #[arg(long, global = true, hide = true)]
    log_dir: Option<String>,
    #[arg(long, global = true, hide = true)]
    stderrthreshold: Option<String>,
    #[arg(long, global = true, hide = true)]
    log_backtrace_at: Option<String>,
}

/// The TOML file. Unknown keys are an error: a typo must not silently keep a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    ctfe_url: Option<String>,
    poll_interval: Option<String>,
    ctfe_timeout: Option<String>,
    metrics_addr: Option<String>,
    work_dir: Option<PathBuf>,
    scripts_dir: Option<PathBuf>,
    patch_store: Option<String>,
    storage_url: Option<String>,
    local: Option<bool>,
    service_account_file: Option<String>,
    email_client_secret_file: Option<String>,
    email_token_cache_file: Option<String>,
    webapp_url: Option<String>,
    service_account: Option<String>,
    register_timeout: Option<String>,
    max_concurrent_tasks: Option<u64>,
    task_timeout: Option<String>,
    drain_timeout: Option<String>,
    output_limit: Option<toml::Value>,
    dry_run: Option<bool>,
    log_format: Option<String>,
    #[serde(default)]
    autoscaler: FileAutoscaler,
    #[serde(default)]
    timeouts: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAutoscaler {
    kind: Option<String>,
    project: Option<String>,
    zone: Option<String>,
    instance_prefix: Option<String>,
    instance_count: Option<u64>,
    compute_url: Option<String>,
    swarming_url: Option<String>,
    swarming_api: Option<String>,
    concurrency: Option<u64>,
}

/// What the binary was asked to do.
#[derive(Debug)]
pub enum Command {
    Run(Config),
    Demo { config: Config, keep_running: bool, metrics_addr_given: bool },
    DevCtfe { addr: SocketAddr, tasks: Option<PathBuf> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchStoreUrl {
    Gcs { bucket: String },
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoscalerKind {
    Gce,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwarmingApi {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct AutoscalerConfig {
    pub kind: AutoscalerKind,
    pub project: String,
    pub zone: String,
    pub instance_prefix: String,
    pub instance_count: u32,
    pub compute_url: Url,
    pub swarming_url: Url,
    pub swarming_api: SwarmingApi,
    pub concurrency: usize,
    /// Operation polling, timeouts and retries (not options: tests shorten them).
    pub timing: Timing,
}

/// What the process environment says about Google credentials, read once here so that
/// nothing else consults the environment and tests can point it at local servers.
#[derive(Debug, Clone, Default)]
pub struct GoogleEnv {
    /// `GOOGLE_APPLICATION_CREDENTIALS`: the key file used when `--service-account-file`
    /// does not exist.
    pub credentials_file: Option<PathBuf>,
    /// `GCE_METADATA_HOST` (host or host:port), else `metadata.google.internal`.
    pub metadata_host: String,
    /// `HOME`: the gcloud application-default credentials (`--local`), and the
    /// `.gitcookies` and global git config of the refresher. `None` disables the refresher.
    pub home: Option<PathBuf>,
}

impl GoogleEnv {
    /// Reads `GOOGLE_APPLICATION_CREDENTIALS`, `GCE_METADATA_HOST` and `HOME`.
    pub fn from_env() -> GoogleEnv {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        GoogleEnv {
            credentials_file: var("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from),
            metadata_host: var("GCE_METADATA_HOST")
                .and_then(|v| v.into_string().ok())
                .unwrap_or_else(|| "metadata.google.internal".to_owned()),
            home: var("HOME").map(PathBuf::from),
        }
    }
}

/// The validated configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub ctfe_url: Url,
    pub poll_interval: Duration,
    pub ctfe_timeout: Duration,
    pub metrics_addr: SocketAddr,
    pub work_dir: PathBuf,
    pub scripts_dir: Option<PathBuf>,
    pub patch_store: PatchStoreUrl,
    pub storage_url: Url,
    /// `STORAGE_EMULATOR_HOST`: overrides `storage_url` and disables auth.
    pub storage_emulator_host: Option<String>,
    /// Where Google credentials come from (besides `--service-account-file`).
    pub google: GoogleEnv,
    pub script: ScriptSettings,
    pub webapp_url: Url,
    pub service_account: String,
    pub autoscaler: AutoscalerConfig,
    pub register_timeout: Duration,
    /// 0: no limit.
    pub max_concurrent_tasks: usize,
    pub task_timeout: Option<Duration>,
    pub timeouts: HashMap<Kind, Duration>,
    pub drain_timeout: Duration,
    pub output_limit: usize,
    pub dry_run: bool,
    pub log_format: LogFormat,
    /// Extra environment for master scripts (the demo points its sample scripts at the
    /// development CTFE this way).
    pub child_env: Vec<(String, String)>,
}

impl Config {
    /// Parses the command line (and the environment and config file it points to).
    pub fn from_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, Error> {
        let cli = Cli::try_parse_from(go_style_args(args))?;
        let options = cli.options;
        let file = match &options.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let layers = Layers { cli: &options, file: &file };
        let config = layers.resolve()?;
        Ok(match cli.command {
            None | Some(Cmd::Run) => Command::Run(config),
            Some(Cmd::Demo { keep_running }) => {
                let metrics_addr_given = options.metrics_addr.is_some() || file.metrics_addr.is_some();
                Command::Demo { config, keep_running, metrics_addr_given }
            }
            Some(Cmd::DevCtfe { addr, tasks }) => Command::DevCtfe { addr, tasks },
        })
    }

    /// Defaults only (tests and the demo start from here).
    pub fn defaults() -> Config {
        Layers { cli: &Options::default(), file: &FileConfig::default() }
            .resolve()
            .expect("built-in defaults are valid")
    }

    /// The time limit of one task of `kind`, if any.
    pub fn timeout_for(&self, kind: Kind) -> Option<Duration> {
        self.timeouts.get(&kind).copied().or(self.task_timeout).filter(|d| !d.is_zero())
    }
}

/// Go's flag package took `-name` like `--name`; clap only knows `--name`.
fn go_style_args<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            // `-h` and `-V` stay clap's short help and version flags.
            let is_go_single_dash = arg.to_str().is_some_and(|s| {
                s.len() >= 2
                    && s.starts_with('-')
                    && !s.starts_with("--")
                    && s.as_bytes()[1].is_ascii_alphabetic()
                    && s != "-h"
                    && s != "-V"
            });
            if i > 0 && is_go_single_dash {
                let mut long = OsString::from("-");
                long.push(&arg);
                long
            } else {
                arg
            }
        })
        .collect()
}

fn load_file(path: &PathBuf) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })?;
    toml::from_str(&text).map_err(|e| Error::Toml { path: path.clone(), message: e.to_string() })
}

struct Layers<'a> {
    cli: &'a Options,
    file: &'a FileConfig,
}

fn invalid(option: &str, value: impl Into<String>, reason: impl ToString) -> Error {
    Error::Invalid { option: option.to_owned(), value: value.into(), reason: reason.to_string() }
}

/// `--flag` (and its TOML key) as named in error messages.
fn flag(name: &str) -> String {
    format!("--{} (TOML {})", name.replace('_', "-"), name)
}

impl Layers<'_> {
    fn resolve(&self) -> Result<Config, Error> {
        let (c, f) = (self.cli, self.file);
        let local = pick_bool("local", c.local.as_deref(), f.local)?.unwrap_or(false);
        let dry_run = pick_bool("dry_run", c.dry_run.as_deref(), f.dry_run)?.unwrap_or(false);
        let text = |cli: &Option<String>, file: &Option<String>, default: &str| {
            cli.clone().or_else(|| file.clone()).unwrap_or_else(|| default.to_owned())
        };
        let a = &f.autoscaler;

        let autoscaler_kind = match text(&c.autoscaler, &a.kind, if local { "none" } else { "gce" }).as_str() {
            "gce" => AutoscalerKind::Gce,
            "none" => AutoscalerKind::None,
            other => return Err(invalid(&flag("autoscaler"), other, "expected gce or none")),
        };
        let swarming_api = match text(&c.swarming_api, &a.swarming_api, "v2").as_str() {
            "v1" => SwarmingApi::V1,
            "v2" => SwarmingApi::V2,
            other => return Err(invalid(&flag("swarming_api"), other, "expected v1 or v2")),
        };
        let count = |cli: &Option<String>, file: Option<u64>, name: &str, default: u64| -> Result<u64, Error> {
            match cli {
                Some(s) => s.trim().parse::<u64>().map_err(|e| invalid(&flag(name), s.as_str(), e)),
                None => Ok(file.unwrap_or(default)),
            }
        };
        let instance_count = count(&c.gce_instance_count, a.instance_count, "gce_instance_count", 500)?;
        let instance_count = u32::try_from(instance_count)
            .map_err(|e| invalid(&flag("gce_instance_count"), instance_count.to_string(), e))?;
        let concurrency = count(&c.autoscaler_concurrency, a.concurrency, "autoscaler_concurrency", 50)?;
        if concurrency == 0 {
            return Err(invalid(&flag("autoscaler_concurrency"), "0", "must be at least 1"));
        }

        let mut timeouts = HashMap::new();
        for (name, value) in &f.timeouts {
            let kind = Kind::from_name(name)
                .ok_or_else(|| invalid("[timeouts] key", name.as_str(), "not a task name such as ChromiumPerf"))?;
            timeouts.insert(kind, parse_duration(&format!("[timeouts] {name}"), value)?);
        }

        let work_dir = c.work_dir.clone().or_else(|| f.work_dir.clone()).unwrap_or_else(default_work_dir);
        if !work_dir.is_dir() {
            return Err(invalid(&flag("work_dir"), work_dir.display().to_string(), "not an existing directory"));
        }
        let scripts_dir = c.scripts_dir.clone().or_else(|| f.scripts_dir.clone());
        if let Some(dir) = &scripts_dir {
            if !dir.is_dir() {
                return Err(invalid(&flag("scripts_dir"), dir.display().to_string(), "not an existing directory"));
            }
        }

        let output_limit = match (&c.output_limit, &f.output_limit) {
            (Some(s), _) => parse_size(&flag("output_limit"), s)?,
            (None, Some(toml::Value::Integer(n))) => {
                usize::try_from(*n).map_err(|e| invalid(&flag("output_limit"), n.to_string(), e))?
            }
            (None, Some(toml::Value::String(s))) => parse_size(&flag("output_limit"), s)?,
            (None, Some(other)) => return Err(invalid(&flag("output_limit"), other.to_string(), "expected a size")),
            (None, None) => 4 << 20,
        };
        if output_limit < 1024 {
            return Err(invalid(&flag("output_limit"), output_limit.to_string(), "must be at least 1KiB"));
        }

        let poll_interval = parse_duration(&flag("poll_interval"), &text(&c.poll_interval, &f.poll_interval, "30s"))?;
        let ctfe_timeout = parse_duration(&flag("ctfe_timeout"), &text(&c.ctfe_timeout, &f.ctfe_timeout, "30s"))?;
        for (name, d) in [("poll_interval", poll_interval), ("ctfe_timeout", ctfe_timeout)] {
            if d.is_zero() {
                return Err(invalid(&flag(name), "0", "must be positive"));
            }
        }
        let max_concurrent = match &c.max_concurrent_tasks {
            Some(s) => s.trim().parse::<usize>().map_err(|e| invalid(&flag("max_concurrent_tasks"), s.as_str(), e))?,
            None => f.max_concurrent_tasks.unwrap_or(0) as usize,
        };

        Ok(Config {
            ctfe_url: parse_root(&flag("ctfe_url"), &text(&c.ctfe_url, &f.ctfe_url, "http://ctfe:9000/"))?,
            poll_interval,
            ctfe_timeout,
            metrics_addr: parse_addr(&flag("metrics_addr"), &text(&c.metrics_addr, &f.metrics_addr, "0.0.0.0:20000"))?,
            work_dir,
            scripts_dir,
            patch_store: parse_store(
                &flag("patch_store"),
                &text(
                    &c.patch_store,
                    &f.patch_store,
                    if local { "gs://cluster-telemetry-test" } else { "gs://cluster-telemetry" },
                ),
            )?,
            storage_url: parse_root(
                &flag("storage_url"),
                &text(&c.storage_url, &f.storage_url, "https://storage.googleapis.com"),
            )?,
            storage_emulator_host: std::env::var("STORAGE_EMULATOR_HOST").ok().filter(|h| !h.is_empty()),
            google: GoogleEnv::from_env(),
            script: ScriptSettings {
                email_client_secret_file: text(
                    &c.email_client_secret_file,
                    &f.email_client_secret_file,
                    "/etc/ct-email-secrets/client_secret.json",
                ),
                email_token_cache_file: text(
                    &c.email_token_cache_file,
                    &f.email_token_cache_file,
                    "/etc/ct-email-secrets/client_token.json",
                ),
                service_account_file: text(
                    &c.service_account_file,
                    &f.service_account_file,
                    "/var/secrets/google/key.json",
                ),
                local,
            },
            webapp_url: parse_root(&flag("webapp_url"), &text(&c.webapp_url, &f.webapp_url, "https://ct.skia.org/"))?,
            service_account: text(&c.service_account, &f.service_account, ""),
            autoscaler: AutoscalerConfig {
                kind: autoscaler_kind,
                project: text(&c.gce_project, &a.project, "ct-swarming-bots"),
                zone: text(&c.gce_zone, &a.zone, "us-central1-b"),
                instance_prefix: text(&c.gce_instance_prefix, &a.instance_prefix, "ct-gce-"),
                instance_count,
                compute_url: parse_root(
                    &flag("compute_url"),
                    &text(&c.compute_url, &a.compute_url, "https://compute.googleapis.com/compute/v1/"),
                )?,
                swarming_url: parse_root(
                    &flag("swarming_url"),
                    &text(&c.swarming_url, &a.swarming_url, "https://chrome-swarming.appspot.com/"),
                )?,
                swarming_api,
                concurrency: concurrency as usize,
                timing: Timing::default(),
            },
            register_timeout: parse_duration(
                &flag("register_timeout"),
                &text(&c.register_timeout, &f.register_timeout, "30m"),
            )?,
            max_concurrent_tasks: max_concurrent,
            task_timeout: Some(parse_duration(&flag("task_timeout"), &text(&c.task_timeout, &f.task_timeout, "0"))?)
                .filter(|d| !d.is_zero()),
            timeouts,
            drain_timeout: parse_duration(&flag("drain_timeout"), &text(&c.drain_timeout, &f.drain_timeout, "1h"))?,
            output_limit,
            dry_run,
            log_format: match text(&c.log_format, &f.log_format, "text").as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(invalid(&flag("log_format"), other, "expected text or json")),
            },
            child_env: Vec::new(),
        })
    }
}

fn pick_bool(name: &str, cli: Option<&str>, file: Option<bool>) -> Result<Option<bool>, Error> {
    match cli {
        Some(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "t" => Ok(Some(true)),
            "false" | "0" | "no" | "f" => Ok(Some(false)),
            _ => Err(invalid(&flag(name), s, "expected true or false")),
        },
        None => Ok(file),
    }
}

fn default_work_dir() -> PathBuf {
    // Go's os.TempDir(): the master scripts look for their files there.
    std::env::var_os("TMPDIR").filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
}

/// A humantime duration (`30s`, `24h`, `1h 30m`); a bare `0` means zero.
pub fn parse_duration(option: &str, value: &str) -> Result<Duration, Error> {
    let v = value.trim();
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(v).map_err(|e| invalid(option, value, format!("{e} (use e.g. 30s, 10m, 24h)")))
}

/// Bytes with an optional binary unit: `4MiB`, `512KiB`, `1GiB`, `4096`.
pub fn parse_size(option: &str, value: &str) -> Result<usize, Error> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(invalid(option, value, "unknown unit (use B, KiB, MiB or GiB)")),
    };
    let n: u64 = digits.parse().map_err(|_| invalid(option, value, "expected a size such as 4MiB"))?;
    n.checked_mul(multiplier).and_then(|b| usize::try_from(b).ok()).ok_or_else(|| invalid(option, value, "too large"))
}

/// `host:port`, `:port` (all interfaces, as Go's `--prom_port=:20000`), or `port`.
fn parse_addr(option: &str, value: &str) -> Result<SocketAddr, Error> {
    let v = value.trim();
    let full = if let Some(port) = v.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if v.chars().all(|c| c.is_ascii_digit()) {
        format!("0.0.0.0:{v}")
    } else {
        v.replace("localhost:", "127.0.0.1:")
    };
    full.parse().map_err(|_| invalid(option, value, "expected HOST:PORT or :PORT"))
}

/// An http(s) root URL, normalised to end in `/` so that joining keeps its path.
fn parse_root(option: &str, value: &str) -> Result<Url, Error> {
    let mut url = Url::parse(value.trim()).map_err(|e| invalid(option, value, e))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(option, value, "expected an http:// or https:// URL"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Joins a root from [`parse_root`] with a relative endpoint path.
pub fn join(root: &Url, path: &str) -> Url {
    root.join(path.trim_start_matches('/')).expect("a relative path joins onto an http root")
}

fn parse_store(option: &str, value: &str) -> Result<PatchStoreUrl, Error> {
    let v = value.trim();
    if let Some(bucket) = v.strip_prefix("gs://") {
        let bucket = bucket.trim_end_matches('/');
        let valid = !bucket.is_empty()
            && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
        if !valid {
            return Err(invalid(option, value, "expected gs://BUCKET"));
        }
        return Ok(PatchStoreUrl::Gcs { bucket: bucket.to_owned() });
    }
    if let Some(dir) = v.strip_prefix("file://") {
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() || !dir.is_dir() {
            return Err(invalid(option, value, "expected file:///DIR naming an existing directory"));
        }
        return Ok(PatchStoreUrl::File(dir));
    }
    Err(invalid(option, value, "expected gs://BUCKET or file:///DIR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, Error> {
        Config::from_args(std::iter::once("ct-poller").chain(args.iter().copied()).map(OsString::from))
    }

    fn run(args: &[&str]) -> Config {
        match parse(args).unwrap() {
            Command::Run(c) => c,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_interface() {
        let c = Config::defaults();
        assert_eq!(c.ctfe_url.as_str(), "http://ctfe:9000/");
        assert_eq!(c.poll_interval, Duration::from_secs(30));
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:20000");
        assert_eq!(c.patch_store, PatchStoreUrl::Gcs { bucket: "cluster-telemetry".into() });
        assert_eq!(c.autoscaler.kind, AutoscalerKind::Gce);
        assert_eq!(c.output_limit, 4 << 20);
        assert_eq!(c.drain_timeout, Duration::from_secs(3600));
        assert_eq!(c.register_timeout, Duration::from_secs(1800));
        assert_eq!(c.task_timeout, None);
        assert_eq!(c.script.service_account_file, "/var/secrets/google/key.json");
    }

    #[test]
    fn go_spellings_are_aliases() {
        let c = run(&[
            "-poll_interval=5s",
            "--prom_port=:2999",
            "--ctfe_internal_url=http://x:1/root",
            "--ctfe_url=https://pub/",
            "-local",
            "--logtostderr",
            "--v=2",
            "--service_account_file=/k.json",
        ]);
        assert_eq!(c.poll_interval, Duration::from_secs(5));
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:2999");
        assert_eq!(c.ctfe_url.as_str(), "http://x:1/root/");
        assert_eq!(c.webapp_url.as_str(), "https://pub/");
        assert!(c.script.local);
        assert_eq!(c.autoscaler.kind, AutoscalerKind::None);
        assert_eq!(c.patch_store, PatchStoreUrl::Gcs { bucket: "cluster-telemetry-test".into() });
        assert_eq!(c.script.service_account_file, "/k.json");
        assert!(!run(&["--local=false"]).script.local);
        assert!(!run(&["-v", "3", "-logtostderr"]).script.local);
    }

    #[test]
    fn toml_is_below_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "poll_interval = \"7s\"\noutput_limit = \"1MiB\"\n[autoscaler]\nkind = \"none\"\ninstance_count = 3\n[timeouts]\nChromiumPerf = \"48h\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = run(&["--config", p]);
        assert_eq!(c.poll_interval, Duration::from_secs(7));
        assert_eq!(c.output_limit, 1 << 20);
        assert_eq!(c.autoscaler.kind, AutoscalerKind::None);
        assert_eq!(c.autoscaler.instance_count, 3);
        assert_eq!(c.timeout_for(Kind::ChromiumPerf), Some(Duration::from_secs(48 * 3600)));
        assert_eq!(c.timeout_for(Kind::LuaScript), None);
        assert_eq!(run(&["--config", p, "--poll-interval", "9s"]).poll_interval, Duration::from_secs(9));
    }

    #[test]
    fn bad_values_name_the_option() {
        let msg = |args: &[&str]| parse(args).unwrap_err().to_string();
        assert!(msg(&["--poll-interval", "soon"]).contains("--poll-interval"));
        assert!(msg(&["--output-limit", "4XB"]).contains("--output-limit"));
        assert!(msg(&["--autoscaler", "aws"]).contains("--autoscaler"));
        assert!(msg(&["--ctfe-url", "ftp://x"]).contains("--ctfe-url"));
        assert!(msg(&["--patch-store", "s3://x"]).contains("--patch-store"));
        assert!(msg(&["--metrics-addr", "nowhere"]).contains("--metrics-addr"));
        assert!(msg(&["--work-dir", "/does/not/exist"]).contains("--work-dir"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "poll_intervall = \"7s\"\n").unwrap();
        assert!(msg(&["--config", path.to_str().unwrap()]).contains("poll_intervall"));
        std::fs::write(&path, "[timeouts]\nChromiumPerv = \"1h\"\n").unwrap();
        assert!(msg(&["--config", path.to_str().unwrap()]).contains("ChromiumPerv"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("x", "4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("x", "512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("x", "1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("x", "100").unwrap(), 100);
        assert!(parse_size("x", "MiB").is_err());
        assert_eq!(parse_duration("x", "0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("x", "1h 30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn roots_join_with_or_without_slash() {
        for root in ["http://h:1/compute/v1", "http://h:1/compute/v1/"] {
            let url = parse_root("x", root).unwrap();
            assert_eq!(join(&url, "projects/p").as_str(), "http://h:1/compute/v1/projects/p");
            assert_eq!(join(&url, "/projects/p").as_str(), "http://h:1/compute/v1/projects/p");
        }
    }

    #[test]
    fn subcommands() {
        assert!(matches!(parse(&["demo", "--keep-running"]).unwrap(), Command::Demo { keep_running: true, .. }));
        match parse(&["dev-ctfe", "--addr", "127.0.0.1:0"]).unwrap() {
            Command::DevCtfe { addr, tasks } => {
                assert_eq!(addr.port(), 0);
                assert!(tasks.is_none());
            }
            other => panic!("{other:?}"),
        }
    }
}
