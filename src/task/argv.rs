//! The one argv builder, the run-file plan, the GCE rule and run ids: everything derived
//! from a task and its [`KindSpec`] row without I/O.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};

use super::kinds::{Arg, FileFrom, Gce, KindSpec, Setting};
use super::{Pending, Task};
use crate::ctfe::wire::{Field, Value};

/// The poller's master_common settings, forwarded to every script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptSettings {
    pub email_client_secret_file: String,
    pub email_token_cache_file: String,
    pub service_account_file: String,
    pub local: bool,
}

/// `--flag=value` (or bare `--flag`) for each row flag, in table order.
pub fn argv(pending: &Pending, run_id: &str, settings: &ScriptSettings) -> Vec<String> {
    let spec = pending.spec();
    spec.flags
        .iter()
        .map(|(flag, arg)| match render(arg, pending, run_id, settings) {
            Some(value) => format!("--{flag}={value}"),
            None => format!("--{flag}"),
        })
        .collect()
}

fn render(arg: &Arg, pending: &Pending, run_id: &str, settings: &ScriptSettings) -> Option<String> {
    let task = &pending.task;
    let common = task.common();
    Some(match *arg {
        Arg::Bare => return None,
        Arg::Field(field) => text(task, field),
        Arg::Const(value) => value.to_owned(),
        Arg::Emails { with_cc } => {
            let mut emails = vec![common.Username.as_str()];
            if with_cc {
                if let Some(Value::List(cc)) = task.get(Field::CCList) {
                    emails.extend(cc.iter().map(String::as_str));
                }
            }
            emails.join(",")
        }
        Arg::TaskId => pending.key.id.to_string(),
        Arg::RunId => run_id.to_owned(),
        Arg::RunsOnGce => runs_on_gce(pending.spec(), task).to_string(),
        Arg::ChromiumBuild => {
            format!("{}-{}", trunc14(&text(task, Field::ChromiumRev)), trunc14(&text(task, Field::SkiaRev)))
        }
        Arg::Setting(Setting::EmailClientSecretFile) => settings.email_client_secret_file.clone(),
        Arg::Setting(Setting::EmailTokenCacheFile) => settings.email_token_cache_file.clone(),
        Arg::Setting(Setting::ServiceAccountFile) => settings.service_account_file.clone(),
        Arg::Setting(Setting::Local) => settings.local.to_string(),
    })
}

/// A field as text; a field the kind lacks renders empty (a table error a test catches).
fn text(task: &Task, field: Field) -> String {
    match task.get(field) {
        Some(Value::Str(s)) => s.to_owned(),
        Some(Value::Int(i)) => i.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::List(items)) => items.join(","),
        None => String::new(),
    }
}

/// `ctutil.ChromiumBuildDir`'s truncation: the first 14 characters, or all if shorter.
fn trunc14(hash: &str) -> &str {
    hash.char_indices().nth(14).map_or(hash, |(i, _)| &hash[..i])
}

/// The kind's `RunsOnGCEWorkers()`.
pub fn runs_on_gce(spec: &KindSpec, task: &Task) -> bool {
    match spec.gce {
        Gce::Never => false,
        Gce::Always => true,
        Gce::When { flag, unless: (field, value) } => {
            task.get(flag) == Some(Value::Bool(true)) && task.get(field) != Some(Value::Str(value))
        }
    }
}

/// Where one run file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Fetch this patch id (empty: no fetch, an empty patch) and append `"\n"`.
    Patch(String),
    Inline(Vec<u8>),
}

/// The files a run needs, `(suffix, source)` in table order.
pub fn planned_files(pending: &Pending) -> Vec<(&'static str, Source)> {
    let task = &pending.task;
    pending
        .spec()
        .files
        .iter()
        .filter_map(|&(suffix, from)| {
            let source = match from {
                FileFrom::Patch(field) => Source::Patch(text(task, field)),
                FileFrom::Text(field) => Source::Inline(text(task, field).into_bytes()),
                FileFrom::TextIfSet(field) => {
                    let content = text(task, field);
                    if content.is_empty() {
                        return None;
                    }
                    Source::Inline(content.into_bytes())
                }
            };
            Some((suffix, source))
        })
        .collect()
}

/// 14-digit UTC timestamp, Go layout `20060102150405` (`ctutil.GetCurrentTs`).
pub fn go_timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y%m%d%H%M%S").to_string()
}

/// The username part before `@`, reduced to `[A-Za-z0-9._-]` so that it is safe in a
/// file name, a GCS path and a Swarming tag.
pub fn sanitize_user(username: &str) -> String {
    let user = username.split('@').next().unwrap_or_default();
    user.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

/// Hands out run ids `<user>-<YYYYMMDDhhmmss>[-N]` that never repeat: unique among the
/// runs still active and among every id issued in the current second (the original slept
/// one second after each poll instead, B13). Memory is bounded by those two sets.
#[derive(Debug, Clone, Default)]
pub struct RunIds(Arc<Mutex<RunIdState>>);

#[derive(Debug, Default)]
struct RunIdState {
    second: String,
    issued_this_second: HashSet<String>,
    active: HashSet<String>,
}

/// An allocated run id; dropping it releases the id for reuse in a later second.
#[derive(Debug)]
pub struct RunId {
    id: String,
    /// The allocation time, the `TsStarted` of a failure report (B1).
    pub started: DateTime<Utc>,
    owner: RunIds,
}

impl RunId {
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The 14-digit timestamp of [`RunId::started`].
    pub fn timestamp(&self) -> String {
        go_timestamp(self.started)
    }
}

impl Drop for RunId {
    fn drop(&mut self) {
        self.owner.0.lock().unwrap_or_else(PoisonError::into_inner).active.remove(&self.id);
    }
}

impl RunIds {
    pub fn allocate(&self, username: &str, now: DateTime<Utc>) -> RunId {
        let ts = go_timestamp(now);
        let base = format!("{}-{ts}", sanitize_user(username));
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if state.second != ts {
            state.second = ts;
            state.issued_this_second.clear();
        }
        let taken = |s: &RunIdState, id: &str| s.active.contains(id) || s.issued_this_second.contains(id);
        let mut id = base.clone();
        let mut n = 1;
        while taken(&state, &id) {
            n += 1;
            id = format!("{base}-{n}");
        }
        state.issued_this_second.insert(id.clone());
        state.active.insert(id.clone());
        RunId { id, started: now, owner: self.clone() }
    }

    /// Number of run ids currently held (for leak checks).
    pub fn active(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn truncates_hashes_like_go() {
        assert_eq!(trunc14("c14d891d44f0afff64e56ed7c9702df1d807b1ee"), "c14d891d44f0af");
        assert_eq!(trunc14("abc"), "abc");
        assert_eq!(trunc14(""), "");
    }

    #[test]
    fn run_ids_are_unique_without_sleeping() {
        let ids = RunIds::default();
        let t = Utc.with_ymd_and_hms(2019, 1, 15, 19, 54, 38).unwrap();
        let a = ids.allocate("superman@krypton.com", t);
        let b = ids.allocate("superman@krypton.com", t);
        assert_eq!(a.as_str(), "superman-20190115195438");
        assert_eq!(b.as_str(), "superman-20190115195438-2");
        drop(a);
        // Released, but issued this second: still not reused.
        assert_eq!(ids.allocate("superman@x", t).as_str(), "superman-20190115195438-3");
        assert_eq!(ids.allocate("a b;c@d", t).as_str(), "a_b_c-20190115195438");
        assert_eq!(ids.allocate("../../x@y", t).as_str(), ".._.._x-20190115195438");
    }

    proptest! {
        #[test]
        fn run_ids_are_safe_and_distinct(users in proptest::collection::vec(".{0,12}", 1..20)) {
            let ids = RunIds::default();
            let t = Utc::now();
            let mut seen = HashSet::new();
            let held: Vec<RunId> = users.iter().map(|u| ids.allocate(u, t)).collect();
            for id in &held {
                prop_assert!(id.as_str().chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
                prop_assert!(!id.as_str().contains('/'));
                prop_assert!(seen.insert(id.as_str().to_owned()), "duplicate {}", id.as_str());
            }
            drop(held);
            prop_assert_eq!(ids.active(), 0);
        }
    }
}
