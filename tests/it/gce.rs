//! The GCE autoscaler and the Google credentials against a fake Google on 127.0.0.1
//! (metadata server, Compute Engine instances and zone operations, Swarming bot deletion)
//! that records every request: the autoscaler alone (one shared start, retries, 404 bots,
//! callers that give up, bounded concurrency, random register/unregister interleavings)
//! and inside the real daemon (two overlapping GCE tasks, polling on while the autoscaler
//! fails, `.gitcookies`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Router;
use ct_poller::auth::{TokenSource, SCOPE_CLOUD_PLATFORM, SCOPE_GERRIT};
use ct_poller::autoscaler::gce::{Fleet, GceAutoscaler, Snapshot, Timing};
use ct_poller::autoscaler::{Autoscaler, Error};
use ct_poller::config::{AutoscalerConfig, AutoscalerKind, Config, SwarmingApi};
use ct_poller::gitcookies::GitCookies;
use ct_poller::metrics::Metrics;
use ct_poller::retry::Backoff;
use ct_poller::task::{Kind, TaskKey};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::common::*;

const T: Duration = Duration::from_secs(20);
const PROJECT: &str = "ct-test-bots";
const ZONE: &str = "test-zone1-b";

// ---------------------------------------------------------------------------------
// The fake Google.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Start,
    Stop,
    DeleteBot,
}

#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The call itself answers this status.
    Status(u16),
    /// The call succeeds; its zone operation ends with an error.
    Operation,
}

struct Fault {
    call: Call,
    instance: String,
    failure: Failure,
    times: u32,
}

#[derive(Debug, Clone)]
struct Logged {
    path: String,
    call: Option<(Call, String)>,
    authorization: String,
}

struct FakeOp {
    instance: String,
    to: &'static str,
    done_at: Instant,
    error: bool,
    applied: bool,
}

struct Fake {
    log: Vec<Logged>,
    instances: BTreeMap<String, &'static str>,
    /// Bots Swarming knows; a RUNNING instance's bot registers itself.
    bots: BTreeSet<String>,
    /// Instances whose bot never registers (their deletion answers 404).
    silent: BTreeSet<String>,
    operations: HashMap<String, FakeOp>,
    next_op: u64,
    op_delay: Duration,
    latency: Duration,
    faults: Vec<Fault>,
    in_flight: usize,
    max_in_flight: usize,
    token_calls: usize,
    token_expires_in: u64,
    /// Broken invariants seen from the outside (a bot deleted while its instance runs).
    violations: Vec<String>,
}

impl Fake {
    fn apply(&mut self, now: Instant) {
        for op in self.operations.values_mut() {
            if op.applied || op.done_at > now {
                continue;
            }
            op.applied = true;
            if !op.error {
                self.instances.insert(op.instance.clone(), op.to);
                if op.to == "RUNNING" && !self.silent.contains(&op.instance) {
                    self.bots.insert(op.instance.clone());
                }
            }
        }
    }

    fn op_json(&self, name: &str) -> Value {
        let op = &self.operations[name];
        let mut v = json!({
            "kind": "compute#operation",
            "name": name,
            "operationType": if op.to == "RUNNING" { "start" } else { "stop" },
            "status": if op.applied { "DONE" } else { "RUNNING" },
        });
        if op.applied && op.error {
            v["error"] = json!({"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "injected"}]});
        }
        v
    }

    fn take_fault(&mut self, call: Call, instance: &str) -> Option<Failure> {
        let fault = self.faults.iter_mut().find(|f| f.call == call && f.instance == instance && f.times > 0)?;
        fault.times -= 1;
        Some(fault.failure)
    }

    fn answer(&mut self, method: &Method, path: &str, headers: &HeaderMap, body: &[u8]) -> (StatusCode, String) {
        let now = Instant::now();
        self.apply(now);
        if path == "/computeMetadata/v1/instance/service-accounts/default/token" {
            if headers.get("metadata-flavor").is_none_or(|v| v != "Google") {
                return (StatusCode::FORBIDDEN, "no Metadata-Flavor".into());
            }
            self.token_calls += 1;
            let token = json!({"access_token": format!("meta-{}", self.token_calls), "expires_in": self.token_expires_in, "token_type": "Bearer"});
            return (StatusCode::OK, token.to_string());
        }
        let authorization = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let not_found = (StatusCode::NOT_FOUND, r#"{"error":{"code":404}}"#.to_owned());
        let (call, answer) = match (method.as_str(), segments.as_slice()) {
            ("POST", ["compute", "v1", "projects", PROJECT, "zones", ZONE, "instances", name, verb]) => {
                let (call, to) = match *verb {
                    "start" => (Call::Start, "RUNNING"),
                    "stop" => (Call::Stop, "TERMINATED"),
                    _ => return not_found,
                };
                let name = name.to_string();
                let answer = match (self.instances.get(&name).copied(), self.take_fault(call, &name)) {
                    (None, _) => not_found.clone(),
                    (Some(_), Some(Failure::Status(code))) => {
                        (StatusCode::from_u16(code).unwrap(), r#"{"error":{"message":"injected"}}"#.into())
                    }
                    (Some(status), failure) => {
                        self.next_op += 1;
                        let op_name = format!("operation-{}", self.next_op);
                        let error = matches!(failure, Some(Failure::Operation));
                        let delay = if status == to && !error { Duration::ZERO } else { self.op_delay };
                        let op = FakeOp { instance: name.clone(), to, done_at: now + delay, error, applied: false };
                        self.operations.insert(op_name.clone(), op);
                        self.apply(now);
                        (StatusCode::OK, self.op_json(&op_name).to_string())
                    }
                };
                (Some((call, name)), answer)
            }
            ("GET", ["compute", "v1", "projects", PROJECT, "zones", ZONE, "instances", name]) => {
                let answer = match self.instances.get(*name) {
                    Some(status) => (StatusCode::OK, json!({"name": name, "status": status}).to_string()),
                    None => not_found.clone(),
                };
                (None, answer)
            }
            ("GET", ["compute", "v1", "projects", PROJECT, "zones", ZONE, "operations", op]) => {
                let answer = if self.operations.contains_key(*op) {
                    (StatusCode::OK, self.op_json(op).to_string())
                } else {
                    not_found.clone()
                };
                (None, answer)
            }
            ("POST", ["prpc", "swarming.v2.Bots", "DeleteBot"]) => {
                let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let bot = request["bot_id"].as_str().unwrap_or_default().to_owned();
                let answer = self.delete_bot(&bot, ")]}'\n");
                (Some((Call::DeleteBot, bot)), answer)
            }
            ("POST", ["_ah", "api", "swarming", "v1", "bot", bot, "delete"]) => {
                let bot = bot.to_string();
                let answer = self.delete_bot(&bot, "");
                (Some((Call::DeleteBot, bot)), answer)
            }
            _ => (None, not_found.clone()),
        };
        self.log.push(Logged { path: path.to_owned(), call, authorization });
        answer
    }

    fn delete_bot(&mut self, bot: &str, prefix: &str) -> (StatusCode, String) {
        if let Some(Failure::Status(code)) = self.take_fault(Call::DeleteBot, bot) {
            return (StatusCode::from_u16(code).unwrap(), "injected".into());
        }
        if self.instances.get(bot).is_some_and(|s| *s != "TERMINATED") {
            self.violations.push(format!("bot {bot} deleted while its instance is {}", self.instances[bot]));
        }
        if self.bots.remove(bot) {
            (StatusCode::OK, format!("{prefix}{{\"deleted\":true}}"))
        } else {
            (StatusCode::NOT_FOUND, "bot not found".into())
        }
    }
}

/// The fake's handle: its address and what it saw.
#[derive(Clone)]
struct Google {
    addr: SocketAddr,
    fake: Arc<Mutex<Fake>>,
}

async fn handle(
    State(fake): State<Arc<Mutex<Fake>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let latency = {
        let mut f = fake.lock().unwrap();
        f.in_flight += 1;
        f.max_in_flight = f.max_in_flight.max(f.in_flight);
        f.latency
    };
    tokio::time::sleep(latency).await;
    let mut f = fake.lock().unwrap();
    f.in_flight -= 1;
    f.answer(&method, uri.path(), &headers, &body)
}

impl Google {
    /// `instances` instances `ct-gce-001`…, all RUNNING with their bots registered (as a
    /// previous poller could have left them); operations take `op_delay`.
    async fn start(instances: u32, op_delay: Duration) -> Google {
        let names = ct_poller::autoscaler::gce::instance_names("ct-gce-", instances);
        let fake = Arc::new(Mutex::new(Fake {
            log: Vec::new(),
            instances: names.iter().map(|n| (n.clone(), "RUNNING")).collect(),
            bots: names.iter().cloned().collect(),
            silent: BTreeSet::new(),
            operations: HashMap::new(),
            next_op: 0,
            op_delay,
            latency: Duration::from_millis(1),
            faults: Vec::new(),
            in_flight: 0,
            max_in_flight: 0,
            token_calls: 0,
            token_expires_in: 3600,
            violations: Vec::new(),
        }));
        let router = Router::new().fallback(handle).with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        Google { addr, fake }
    }

    fn lock(&self) -> MutexGuard<'_, Fake> {
        self.fake.lock().unwrap()
    }

    fn root(&self) -> reqwest::Url {
        format!("http://{}/", self.addr).parse().unwrap()
    }

    fn fault(&self, call: Call, instance: &str, failure: Failure, times: u32) {
        self.lock().faults.push(Fault { call, instance: instance.into(), failure, times });
    }

    /// The calls of one kind, in arrival order, by instance or bot name.
    fn calls(&self, call: Call) -> Vec<String> {
        self.lock()
            .log
            .iter()
            .filter_map(|l| l.call.as_ref().filter(|(c, _)| *c == call).map(|(_, n)| n.clone()))
            .collect()
    }

    /// The sequence of calls (start, stop, delete) in arrival order.
    fn sequence(&self) -> Vec<Call> {
        self.lock().log.iter().filter_map(|l| l.call.as_ref().map(|(c, _)| *c)).collect()
    }

    fn all(&self, status: &str) -> bool {
        self.lock().instances.values().all(|s| *s == status)
    }

    fn bots(&self) -> BTreeSet<String> {
        self.lock().bots.clone()
    }

    fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    fn authorizations(&self) -> BTreeSet<String> {
        self.lock().log.iter().map(|l| l.authorization.clone()).collect()
    }

    /// An `[autoscaler]` pointing at this fake, with short timings.
    fn config(&self, instances: u32) -> AutoscalerConfig {
        let mut c = Config::defaults().autoscaler;
        c.kind = AutoscalerKind::Gce;
        c.project = PROJECT.into();
        c.zone = ZONE.into();
        c.instance_prefix = "ct-gce-".into();
        c.instance_count = instances;
        c.compute_url = format!("http://{}/compute/v1/", self.addr).parse().unwrap();
        c.swarming_url = self.root();
        c.swarming_api = SwarmingApi::V2;
        c.concurrency = 8;
        c.timing = fast();
        c
    }

    fn tokens(&self) -> Arc<TokenSource> {
        Arc::new(TokenSource::metadata(self.root(), &[SCOPE_CLOUD_PLATFORM]))
    }
}

fn fast() -> Timing {
    Timing {
        poll_interval: Duration::from_millis(10),
        operation_timeout: Duration::from_secs(10),
        call: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            max_attempts: Some(3),
            retry_permanent: false,
        },
        fleet: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            max_attempts: None,
            retry_permanent: true,
        },
        failed_start_grace: Duration::from_millis(200),
    }
}

fn autoscaler(google: &Google, config: &AutoscalerConfig) -> (GceAutoscaler, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let a = GceAutoscaler::new(config, google.tokens(), Arc::clone(&metrics), CancellationToken::new());
    (a, metrics)
}

fn key(id: i64) -> TaskKey {
    TaskKey { kind: Kind::PixelDiff, id }
}

fn errors(metrics: &Metrics, op: &str) -> u64 {
    metrics.autoscaler_errors.with_label_values(&[op]).get()
}

async fn settled(a: &GceAutoscaler, fleet: Fleet) {
    let want = Snapshot { registered: 0, waiting: 0, fleet };
    wait_until(T, &format!("the autoscaler to settle {fleet:?}"), || a.snapshot() == want).await;
}

// ---------------------------------------------------------------------------------
// The autoscaler alone.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_stops_the_fleet_then_deletes_its_bots_and_404_is_fine() {
    let google = Google::start(3, Duration::from_millis(50)).await;
    // ct-gce-003's bot is unknown to Swarming: 404, already gone.
    google.lock().bots.remove("ct-gce-003");
    let (a, metrics) = autoscaler(&google, &google.config(3));
    assert_eq!(metrics.gce_bots_up.get(), 0);
    settled(&a, Fleet::Down).await;
    assert!(google.all("TERMINATED"));
    assert!(google.bots().is_empty());
    assert_eq!(google.calls(Call::Stop).len(), 3);
    assert_eq!(google.calls(Call::DeleteBot).len(), 3);
    assert_eq!(google.calls(Call::Start).len(), 0);
    let seq = google.sequence();
    assert_eq!(&seq[..3], [Call::Stop; 3], "bots are deleted only after the stops: {seq:?}");
    assert!(google.violations().is_empty(), "{:?}", google.violations());
    assert_eq!(errors(&metrics, "delete_bot"), 0, "a 404 is not an error");
    assert_eq!(google.authorizations(), BTreeSet::from(["Bearer meta-1".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_bot_endpoint_is_used_on_request() {
    let google = Google::start(2, Duration::ZERO).await;
    google.lock().bots.remove("ct-gce-001");
    let mut config = google.config(2);
    config.swarming_api = SwarmingApi::V1;
    let (a, metrics) = autoscaler(&google, &config);
    settled(&a, Fleet::Down).await;
    let mut deleted = google.calls(Call::DeleteBot);
    deleted.sort();
    assert_eq!(deleted, ["ct-gce-001", "ct-gce-002"]);
    let paths: Vec<String> = google
        .lock()
        .log
        .iter()
        .filter(|l| matches!(l.call, Some((Call::DeleteBot, _))))
        .map(|l| l.path.clone())
        .collect();
    assert!(paths.iter().all(|p| p.starts_with("/_ah/api/swarming/v1/bot/") && p.ends_with("/delete")), "{paths:?}");
    assert!(google.bots().is_empty());
    assert_eq!(errors(&metrics, "delete_bot"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_registrations_share_one_start_and_the_last_one_stops() {
    let google = Google::start(3, Duration::from_millis(150)).await;
    let (a, metrics) = autoscaler(&google, &google.config(3));
    let a = Arc::new(a);
    // Registrations arriving during the start-up stop, then during the start, all wait
    // for the same start.
    let tasks: Vec<_> = (1..=4)
        .map(|id| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.register(&key(id)).await })
        })
        .collect();
    wait_until(T, "the start", || !google.calls(Call::Start).is_empty()).await;
    let late = {
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.register(&key(5)).await })
    };
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    late.await.unwrap().unwrap();
    assert_eq!(a.snapshot(), Snapshot { registered: 5, waiting: 0, fleet: Fleet::Up });
    assert_eq!(metrics.gce_bots_up.get(), 1);
    assert!(google.all("RUNNING"));
    let mut started = google.calls(Call::Start);
    started.sort();
    assert_eq!(started, ["ct-gce-001", "ct-gce-002", "ct-gce-003"], "one start per instance");
    // A registration once the fleet is up returns at once; the same key counts twice.
    a.register(&key(5)).await.unwrap();
    assert_eq!(a.snapshot().registered, 6);
    for id in [1, 2, 3, 4, 5] {
        a.unregister(&key(id)).await.unwrap();
    }
    assert_eq!(google.calls(Call::Stop).len(), 3, "only the start-up stop so far");
    assert_eq!(metrics.gce_bots_up.get(), 1);
    a.unregister(&key(5)).await.unwrap();
    // The last unregister returns once the fleet is down.
    assert_eq!(a.snapshot(), Snapshot { registered: 0, waiting: 0, fleet: Fleet::Down });
    assert_eq!(metrics.gce_bots_up.get(), 0);
    assert!(google.all("TERMINATED"));
    assert_eq!(google.calls(Call::Stop).len(), 6);
    assert_eq!(google.calls(Call::DeleteBot).len(), 6);
    let seq = google.sequence();
    let last_start = seq.iter().rposition(|c| *c == Call::Start).unwrap();
    let tail = &seq[last_start + 1..];
    assert_eq!(tail[..3], [Call::Stop; 3], "stops, then deletions: {seq:?}");
    assert_eq!(tail[3..], [Call::DeleteBot; 3]);
    assert!(google.violations().is_empty(), "{:?}", google.violations());
    assert!(matches!(a.unregister(&key(9)).await, Err(Error::NotRegistered)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_start_failures_are_retried() {
    let google = Google::start(3, Duration::from_millis(20)).await;
    google.fault(Call::Start, "ct-gce-002", Failure::Status(503), 2);
    google.fault(Call::Start, "ct-gce-003", Failure::Operation, 1);
    let (a, metrics) = autoscaler(&google, &google.config(3));
    a.register(&key(1)).await.unwrap();
    assert!(google.all("RUNNING"));
    let started = google.calls(Call::Start);
    let count = |name: &str| started.iter().filter(|n| *n == name).count();
    assert_eq!((count("ct-gce-001"), count("ct-gce-002"), count("ct-gce-003")), (1, 3, 2));
    assert_eq!(errors(&metrics, "start"), 3);
    assert_eq!(metrics.gce_bots_up.get(), 1);
    a.unregister(&key(1)).await.unwrap();
    assert!(google.all("TERMINATED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_takes_no_count_and_the_fleet_is_stopped_after_the_grace() {
    let google = Google::start(3, Duration::from_millis(20)).await;
    google.fault(Call::Start, "ct-gce-002", Failure::Status(503), 3);
    let (a, metrics) = autoscaler(&google, &google.config(3));
    let a = Arc::new(a);
    let both: Vec<_> = (1..=2)
        .map(|id| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.register(&key(id)).await })
        })
        .collect();
    for r in both {
        let err = r.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Start(_)), "{err:?}");
        assert!(ct_poller::error_chain(&err).contains("ct-gce-002"), "{}", ct_poller::error_chain(&err));
    }
    assert_eq!(google.calls(Call::Start).iter().filter(|n| *n == "ct-gce-002").count(), 3, "one start, shared by both");
    assert_eq!(a.snapshot().registered, 0);
    assert_eq!(metrics.gce_bots_up.get(), 0);
    assert_eq!(errors(&metrics, "start"), 3);
    // Nobody retries within the grace: the half-started fleet is stopped.
    settled(&a, Fleet::Down).await;
    assert!(google.all("TERMINATED"));
    // The poller's next attempt starts it again, and this time it works.
    a.register(&key(1)).await.unwrap();
    assert!(google.all("RUNNING"));
    a.unregister(&key(1)).await.unwrap();
    assert!(google.violations().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_during_a_stop_waits_for_it_then_starts_again() {
    let google = Google::start(2, Duration::from_millis(200)).await;
    let (a, _metrics) = autoscaler(&google, &google.config(2));
    let a = Arc::new(a);
    a.register(&key(1)).await.unwrap();
    let stop = {
        let a = Arc::clone(&a);
        tokio::spawn(async move { a.unregister(&key(1)).await })
    };
    wait_until(T, "the stop", || a.snapshot().fleet == Fleet::Stopping).await;
    a.register(&key(2)).await.unwrap();
    stop.await.unwrap().unwrap();
    assert!(google.all("RUNNING"));
    let seq = google.sequence();
    // start-up stop + deletions, start, stop + deletions, start.
    let expected: Vec<Call> = [
        [Call::Stop; 2],
        [Call::DeleteBot; 2],
        [Call::Start; 2],
        [Call::Stop; 2],
        [Call::DeleteBot; 2],
        [Call::Start; 2],
    ]
    .concat();
    assert_eq!(seq, expected);
    a.unregister(&key(2)).await.unwrap();
    assert!(google.violations().is_empty());
}

/// Single-threaded, so the driver cannot run between the last unregister and the next
/// registration: the fleet stays up and the unregister still returns.
#[tokio::test]
async fn a_registration_right_after_the_last_unregister_keeps_the_fleet() {
    let google = Google::start(2, Duration::from_millis(10)).await;
    let (a, metrics) = autoscaler(&google, &google.config(2));
    a.register(&key(1)).await.unwrap();
    let first = key(1);
    let unregister = a.unregister(&first);
    tokio::pin!(unregister);
    tokio::select! {
        biased;
        _ = &mut unregister => panic!("the last unregister waits for the stop"),
        _ = std::future::ready(()) => {}
    }
    a.register(&key(2)).await.unwrap();
    tokio::time::timeout(T, unregister).await.expect("the unregister returned").unwrap();
    assert_eq!(a.snapshot(), Snapshot { registered: 1, waiting: 0, fleet: Fleet::Up });
    assert_eq!(google.calls(Call::Stop).len(), 2, "only the start-up stop");
    assert_eq!(metrics.gce_bots_up.get(), 1);
    a.unregister(&key(2)).await.unwrap();
    assert!(google.all("TERMINATED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_gives_up_takes_no_count() {
    let google = Google::start(2, Duration::from_millis(300)).await;
    let (a, metrics) = autoscaler(&google, &google.config(2));
    settled(&a, Fleet::Down).await;
    let gave_up = tokio::time::timeout(Duration::from_millis(50), a.register(&key(1))).await;
    assert!(gave_up.is_err(), "the start takes longer");
    // The start it began finishes, nobody wants the fleet, it is stopped again.
    wait_until(T, "the start to finish", || google.calls(Call::Start).len() == 2 && google.all("RUNNING")).await;
    settled(&a, Fleet::Down).await;
    assert!(google.all("TERMINATED"));
    assert_eq!(metrics.gce_bots_up.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_stop_failures_are_retried_in_the_background() {
    let google = Google::start(2, Duration::from_millis(10)).await;
    // Two whole rounds of three failed attempts, then it works.
    google.fault(Call::Stop, "ct-gce-001", Failure::Status(500), 6);
    google.fault(Call::DeleteBot, "ct-gce-002", Failure::Status(503), 1);
    let (a, metrics) = autoscaler(&google, &google.config(2));
    settled(&a, Fleet::Down).await;
    assert!(google.all("TERMINATED"));
    assert!(google.bots().is_empty());
    assert_eq!(errors(&metrics, "stop"), 6);
    assert_eq!(errors(&metrics, "delete_bot"), 1);
    assert!(google.violations().is_empty(), "{:?}", google.violations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_instances_with_at_most_fifty_calls_in_flight() {
    let google = Google::start(500, Duration::from_millis(100)).await;
    let mut config = google.config(500);
    config.concurrency = 50;
    config.timing.poll_interval = Duration::from_millis(20);
    let began = Instant::now();
    let (a, metrics) = autoscaler(&google, &config);
    settled(&a, Fleet::Down).await;
    let shutdown = began.elapsed();
    let began = Instant::now();
    a.register(&key(1)).await.unwrap();
    let start = began.elapsed();
    assert!(google.all("RUNNING"));
    assert_eq!(google.calls(Call::Start).len(), 500);
    let began = Instant::now();
    a.unregister(&key(1)).await.unwrap();
    let stop = began.elapsed();
    assert!(google.all("TERMINATED"));
    let max = google.lock().max_in_flight;
    assert!(max <= 50, "{max} calls in flight");
    assert!(max > 1, "calls ran concurrently");
    assert_eq!(errors(&metrics, "start") + errors(&metrics, "stop") + errors(&metrics, "delete_bot"), 0);
    eprintln!(
        "500 instances, concurrency 50, operations of 100 ms, 1 ms per request: start-up stop + bot deletion {shutdown:?}, start {start:?}, stop + bot deletion {stop:?}, at most {max} calls in flight"
    );
}

/// One task of the property test: when it registers, whether it gives up early, how long
/// it holds the fleet.
#[derive(Debug, Clone)]
struct Plan {
    delay_ms: u64,
    hold_ms: u64,
    give_up_after_ms: Option<u64>,
}

fn plans() -> impl Strategy<Value = Vec<Plan>> {
    prop::collection::vec(
        (0u64..60, 0u64..40, prop::option::weighted(0.3, 1u64..40))
            .prop_map(|(delay_ms, hold_ms, give_up_after_ms)| Plan { delay_ms, hold_ms, give_up_after_ms }),
        1..7,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random interleavings of register (some given up half-way, some failing because a
    /// start fails) and unregister leave the count at zero, the fleet stopped, the bots
    /// deleted, and never a bot deleted while its instance ran.
    #[test]
    fn random_interleavings_leave_the_count_at_zero_and_the_bots_down(
        tasks in plans(),
        start_failures in prop::collection::vec(0u32..5, 2),
        op_delay_ms in 0u64..15,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let google = Google::start(2, Duration::from_millis(op_delay_ms)).await;
            for (i, times) in start_failures.iter().enumerate() {
                google.fault(Call::Start, &format!("ct-gce-{:03}", i + 1), Failure::Status(503), *times);
            }
            let mut config = google.config(2);
            config.timing.poll_interval = Duration::from_millis(2);
            config.timing.failed_start_grace = Duration::from_millis(30);
            let (a, metrics) = autoscaler(&google, &config);
            let a = Arc::new(a);
            let runs: Vec<_> = tasks.into_iter().enumerate().map(|(i, plan)| {
                let a = Arc::clone(&a);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(plan.delay_ms)).await;
                    let key = key(i as i64);
                    for _ in 0..3 {
                        let attempt = async {
                            match plan.give_up_after_ms {
                                Some(ms) => tokio::time::timeout(Duration::from_millis(ms), a.register(&key)).await.ok(),
                                None => Some(a.register(&key).await),
                            }
                        };
                        match attempt.await {
                            Some(Ok(())) => {
                                tokio::time::sleep(Duration::from_millis(plan.hold_ms)).await;
                                a.unregister(&key).await.unwrap();
                                return;
                            }
                            Some(Err(Error::Start(_))) => continue,
                            Some(Err(e)) => panic!("unexpected {e:?}"),
                            None => return,
                        }
                    }
                })
            }).collect();
            for run in runs {
                run.await.unwrap();
            }
            settled(&a, Fleet::Down).await;
            assert!(google.all("TERMINATED"));
            assert!(google.bots().is_empty(), "bots left: {:?}", google.bots());
            assert_eq!(metrics.gce_bots_up.get(), 0);
            assert!(google.violations().is_empty(), "{:?}", google.violations());
        });
    }
}

// ---------------------------------------------------------------------------------
// Inside the daemon.

/// Points the harness's daemon at the fake: the autoscaler, and the metadata server for
/// every token (no key file).
fn use_google(h: &mut Harness, google: &Google, instances: u32) {
    h.config.autoscaler = google.config(instances);
    h.config.google.metadata_host = google.addr.to_string();
    h.config.google.credentials_file = None;
    h.config.script.service_account_file = h.dir.path().join("no-key.json").display().to_string();
}

/// A master script that marks its task started, then waits for `release.<task id>`.
fn blocking_script(h: &Harness, name: &str, update_path: &str) {
    let body = format!("mark_started {update_path}\nuntil [ -e \"$RECORD_DIR/release.$task\" ]; do sleep 0.05; done");
    h.script(name, &body, 0);
}

fn release(h: &Harness, id: i64) {
    std::fs::write(h.records_dir().join(format!("release.{id}")), "").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_overlapping_gce_tasks_start_the_fleet_once_and_stop_it_once() {
    let google = Google::start(3, Duration::from_millis(100)).await;
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(50);
    use_google(&mut h, &google, 3);
    blocking_script(&h, "create_pagesets_on_workers", "_/update_recreate_page_sets_task");
    blocking_script(&h, "pixel_diff_on_workers", "_/update_pixel_diff_task");
    h.ctfe.enqueue(&envelope("RecreatePageSets", 11, json!({"PageSets": "10k"}))).unwrap();
    h.ctfe.enqueue(&envelope("PixelDiff", 12, json!({"PageSets": "10k"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    assert_eq!(metric(daemon.addr, "ct_gce_bots_up").await, Some(0.0));
    wait_until(T, "both tasks running", || h.records().len() == 2).await;
    assert_eq!(metric(daemon.addr, "ct_gce_bots_up").await, Some(1.0));
    assert!(google.all("RUNNING"));
    assert_eq!(google.calls(Call::Start).len(), 3, "one start for two tasks");
    let seq = google.sequence();
    assert_eq!(seq[..6], [[Call::Stop; 3], [Call::DeleteBot; 3]].concat(), "start-up stop first: {seq:?}");

    release(&h, 11);
    eventually(T, "the first task to end", || async {
        metric(daemon.addr, r#"ct_poller_tasks_finished_total{kind="RecreatePageSets",outcome="succeeded"}"#).await
            == Some(1.0)
    })
    .await;
    assert_eq!(metric(daemon.addr, "ct_gce_bots_up").await, Some(1.0), "one task still runs");
    assert_eq!(google.calls(Call::Stop).len(), 3, "no stop while a task runs");

    release(&h, 12);
    eventually(T, "the fleet down after the last task", || async {
        metric(daemon.addr, r#"ct_poller_tasks_finished_total{kind="PixelDiff",outcome="succeeded"}"#).await
            == Some(1.0)
    })
    .await;
    // The task's unregister returned once the fleet was down.
    assert_eq!(metric(daemon.addr, "ct_gce_bots_up").await, Some(0.0));
    assert!(google.all("TERMINATED"));
    assert_eq!(google.calls(Call::Start).len(), 3);
    assert_eq!(google.calls(Call::Stop).len(), 6, "one stop after both ended");
    assert_eq!(google.calls(Call::DeleteBot).len(), 6);
    assert!(google.bots().is_empty());
    assert!(google.violations().is_empty(), "{:?}", google.violations());
    assert!(google.authorizations().iter().all(|a| a.starts_with("Bearer meta-")));
    for op in ["start", "stop", "delete_bot", "register", "unregister"] {
        let series = format!(r#"ct_poller_autoscaler_errors_total{{op="{op}"}}"#);
        assert_eq!(metric(daemon.addr, &series).await, Some(0.0), "{op}");
    }
    assert!(h.updates().iter().all(|u| !u.body.contains("\"Failure\":true")), "no failure reported");
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_polling_while_the_autoscaler_fails() {
    let google = Google::start(3, Duration::from_millis(10)).await;
    google.fault(Call::Start, "ct-gce-002", Failure::Status(503), u32::MAX);
    let mut h = Harness::new().await;
    h.config.poll_interval = Duration::from_millis(100);
    h.config.register_timeout = Duration::from_secs(4);
    use_google(&mut h, &google, 3);
    h.script("create_pagesets_on_workers", "", 0);
    h.script("build_chromium", "mark_started _/update_chromium_build_task", 0);
    h.ctfe.enqueue(&envelope("RecreatePageSets", 21, json!({"PageSets": "10k"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    eventually(T, "failed registrations", || async {
        metric(daemon.addr, r#"ct_poller_autoscaler_errors_total{op="register"}"#).await.is_some_and(|v| v >= 1.0)
            && metric(daemon.addr, r#"ct_poller_autoscaler_errors_total{op="start"}"#).await.is_some_and(|v| v >= 3.0)
    })
    .await;
    // A non-GCE task (older, so CTFE offers it first) runs meanwhile.
    h.ctfe.enqueue(&envelope("ChromiumBuild", 5, json!({"ChromiumRev": "abc", "SkiaRev": "def"}))).unwrap();
    eventually(T, "the non-GCE task", || async {
        metric(daemon.addr, r#"ct_poller_tasks_finished_total{kind="ChromiumBuild",outcome="succeeded"}"#).await
            == Some(1.0)
    })
    .await;
    let duplicates = metric(daemon.addr, r#"ct_poller_polls_total{result="duplicate"}"#).await.unwrap();
    eventually(T, "more polls", || async {
        metric(daemon.addr, r#"ct_poller_polls_total{result="duplicate"}"#).await.is_some_and(|v| v > duplicates)
    })
    .await;
    assert_eq!(get(daemon.addr, "/readyz").await.0, 200);
    assert_eq!(metric(daemon.addr, "healthy").await, Some(1.0));
    // --register-timeout: the GCE task is reported failed, its script never ran.
    eventually(T, "the GCE task reported failed", || async {
        metric(daemon.addr, r#"ct_poller_tasks_finished_total{kind="RecreatePageSets",outcome="failed"}"#).await
            == Some(1.0)
    })
    .await;
    assert!(h
        .updates()
        .iter()
        .any(|u| u.path == "/_/update_recreate_page_sets_task" && u.body.contains("\"Failure\":true")));
    assert_eq!(h.records().len(), 1, "only the non-GCE script ran");
    assert_eq!(metric(daemon.addr, "ct_gce_bots_up").await, Some(0.0));
    shutdown.drain.cancel();
    daemon.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitcookies_are_written_refreshed_and_private() {
    let google = Google::start(1, Duration::ZERO).await;
    google.lock().token_expires_in = 2;
    let mut h = Harness::new().await;
    use_google(&mut h, &google, 1);
    h.config.autoscaler.kind = AutoscalerKind::None;
    let home = h.dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    h.config.google.home = Some(home.clone());
    h.config.service_account = "ct-poller@test-bots.iam.gserviceaccount.com".into();
    h.script("build_chromium", "mark_started _/update_chromium_build_task", 0);
    h.ctfe.enqueue(&envelope("ChromiumBuild", 7, json!({"ChromiumRev": "abc", "SkiaRev": "def"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    let path = home.join(".gitcookies");
    let mut seen = BTreeSet::new();
    wait_until(T, "two tokens in .gitcookies", || {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "never readable by others");
            let line = text.lines().find(|l| l.starts_with(".googlesource.com\t")).expect("the googlesource line");
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields[..4], [".googlesource.com", "TRUE", "/", "TRUE"]);
            assert_eq!(fields[5], "o");
            let expiry: i64 = fields[4].parse().unwrap();
            let now = chrono::Utc::now().timestamp();
            assert!(expiry >= now - 3 && expiry <= now + 3, "expiry {expiry}, now {now}");
            seen.insert(fields[6].to_owned());
        }
        seen.len() >= 2
    })
    .await;
    assert!(seen.iter().all(|t| t.starts_with("meta-")));
    let gitconfig = std::fs::read_to_string(home.join(".gitconfig")).unwrap();
    assert!(gitconfig.contains(&format!("cookiefile = {}", path.display())), "{gitconfig}");
    assert!(gitconfig.contains("email = ct-poller@test-bots.iam.gserviceaccount.com"));
    assert!(gitconfig.contains("name = ct-poller\n"));
    wait_until(T, "the task", || h.records().len() == 1).await;
    assert!(h.records()[0].env().contains(&format!("GIT_COOKIES_PATH={}", path.display())));
    assert!(metric(daemon.addr, r#"ct_poller_gitcookies_refreshes_total{result="ok"}"#)
        .await
        .is_some_and(|v| v >= 2.0));
    assert_eq!(metric(daemon.addr, r#"ct_poller_gitcookies_refreshes_total{result="error"}"#).await, Some(0.0));
    shutdown.drain.cancel();
    daemon.wait().await;
    let leftovers: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only .gitcookies and .gitconfig: {leftovers:?}");
}

#[tokio::test]
async fn local_mode_writes_no_gitcookies() {
    let google = Google::start(1, Duration::ZERO).await;
    let mut h = Harness::new().await;
    use_google(&mut h, &google, 1);
    h.config.autoscaler.kind = AutoscalerKind::None;
    h.config.script.local = true;
    let home = h.dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    h.config.google.home = Some(home.clone());
    h.script("build_chromium", "mark_started _/update_chromium_build_task", 0);
    h.ctfe.enqueue(&envelope("ChromiumBuild", 8, json!({"ChromiumRev": "abc", "SkiaRev": "def"}))).unwrap();
    let (daemon, shutdown) = h.start().await;
    wait_until(T, "the task", || h.records().len() == 1).await;
    assert!(!h.records()[0].env().contains("GIT_COOKIES_PATH"));
    shutdown.drain.cancel();
    daemon.wait().await;
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
    assert_eq!(google.lock().token_calls, 0, "no Google call at all");
}

#[tokio::test]
async fn an_existing_gitcookies_is_left_alone() {
    let google = Google::start(1, Duration::ZERO).await;
    let home = tempfile::tempdir().unwrap();
    let mine = ".googlesource.com\tTRUE\t/\tTRUE\t2147483647\to\tgit-someone=secret\n";
    let path = home.path().join(".gitcookies");
    std::fs::write(&path, mine).unwrap();
    let cookies = GitCookies::new(home.path(), "");
    let tokens = Arc::new(TokenSource::metadata(google.root(), &[SCOPE_GERRIT]));
    // `run` returns (rather than refreshing for ever) when the file is not ours.
    tokio::time::timeout(T, cookies.run(tokens, Arc::new(Metrics::new()), CancellationToken::new())).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), mine);
    assert_eq!(google.lock().token_calls, 0);
    let gitconfig = std::fs::read_to_string(home.path().join(".gitconfig")).unwrap();
    assert!(gitconfig.contains("cookiefile"), "git still points at it: {gitconfig}");
    assert!(!Path::new(&format!("{}.tmp", path.display())).exists());
}
