//! Tasks: the nine kinds as one typed enum, their keys, and decoding CTFE's envelope.
//!
//! What differs between kinds lives in [`kinds::KINDS`] (data). The only per-kind code is
//! the `tasks!` list below, which ties each [`Kind`] to its wire struct.

pub mod argv;
pub mod key;
pub mod kinds;

use std::fmt;

use serde_json::Value as Json;

use crate::ctfe::wire::{self, CommonCols, Field, Value};
pub use key::DatastoreKey;
pub use kinds::KindSpec;

macro_rules! tasks {
    ($($kind:ident),* $(,)?) => {
        /// A task kind. Declaration order is the envelope's member order, which is also
        /// the decode precedence (ctfe-wire.md §3.2).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind { $($kind,)* }

        impl Kind {
            pub const ALL: [Kind; 9] = [$(Kind::$kind,)*];
        }

        /// One pending task as CTFE sent it.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Task { $($kind(wire::$kind),)* }

        impl Task {
            pub fn kind(&self) -> Kind {
                match self { $(Task::$kind(_) => Kind::$kind,)* }
            }

            pub fn common(&self) -> &CommonCols {
                match self { $(Task::$kind(t) => &t.common,)* }
            }

            pub fn common_mut(&mut self) -> &mut CommonCols {
                match self { $(Task::$kind(t) => &mut t.common,)* }
            }

            /// The value of a kind-specific field; `None` if this kind lacks it.
            pub fn get(&self, field: Field) -> Option<Value<'_>> {
                match self { $(Task::$kind(t) => t.get(field),)* }
            }

            /// Sets a kind-specific text field; `false` if this kind lacks it.
            pub fn set_text(&mut self, field: Field, text: &str) -> bool {
                match self { $(Task::$kind(t) => t.set_text(field, text),)* }
            }

            /// Decodes one task object of `kind` with Go's leniency (nulls are zero values).
            pub fn from_json(kind: Kind, mut object: Json) -> Result<Task, serde_json::Error> {
                if let Json::Object(map) = &mut object {
                    map.retain(|_, v| !v.is_null());
                }
                Ok(match kind { $(Kind::$kind => Task::$kind(serde_json::from_value(object)?),)* })
            }

            /// The task object's bytes as CTFE's Go encoder writes them (struct order).
            pub fn to_go_json(&self) -> Vec<u8> {
                match self { $(Task::$kind(t) => wire::to_go_json(t),)* }
            }

            /// The task object as a JSON value (members sorted; for inspection).
            pub fn to_json(&self) -> Json {
                let value = match self { $(Task::$kind(t) => serde_json::to_value(t),)* };
                value.expect("task structs always serialise")
            }
        }
    };
}

tasks!(
    CaptureSkps,
    ChromiumAnalysis,
    ChromiumBuild,
    ChromiumPerf,
    LuaScript,
    MetricsAnalysis,
    PixelDiff,
    RecreatePageSets,
    RecreateWebpageArchives,
);

impl Kind {
    pub fn spec(self) -> &'static KindSpec {
        &kinds::KINDS[self as usize]
    }

    /// The Go task name: envelope member, `<TaskName>` of the key, `kind` metric label.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `<TaskName>.<id>`: the picked-up set's key, and the `task_id` log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub kind: Kind,
    pub id: i64,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.kind.name(), self.id)
    }
}

/// A decoded task together with the ID from its `DatastoreKey`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub key: TaskKey,
    pub task: Task,
}

impl Pending {
    pub fn spec(&self) -> &'static KindSpec {
        self.key.kind.spec()
    }
}

/// Why an envelope could not be turned into a task. Each names what CTFE sent.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("envelope is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("envelope is not a JSON object")]
    NotObject,
    #[error("envelope has none of the nine task members")]
    NoKnownKind,
    #[error("envelope holds a task of unknown kind {0:?}")]
    UnknownKind(String),
    #[error("{kind} task does not match the wire contract")]
    Task {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
    #[error("{kind} task has no DatastoreKey")]
    MissingKey { kind: Kind },
    #[error("{kind} task has an unusable DatastoreKey")]
    BadKey {
        kind: Kind,
        #[source]
        source: key::Error,
    },
}

impl DecodeError {
    /// Closed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::Json(_) | DecodeError::NotObject => "malformed",
            DecodeError::NoKnownKind | DecodeError::UnknownKind(_) => "unknown_kind",
            DecodeError::Task { .. } => "bad_task",
            DecodeError::MissingKey { .. } | DecodeError::BadKey { .. } => "bad_key",
        }
    }

    /// The kind, when the envelope named a known one (a bad task of a known kind).
    pub fn kind(&self) -> Option<Kind> {
        match self {
            DecodeError::Task { kind, .. } | DecodeError::MissingKey { kind } | DecodeError::BadKey { kind, .. } => {
                Some(*kind)
            }
            _ => None,
        }
    }
}

/// Decodes `get_oldest_pending_task`'s body: `Ok(None)` for the empty envelope, the first
/// non-null member in precedence order otherwise (ctfe-wire.md §3.2).
pub fn decode_envelope(body: &[u8]) -> Result<Option<Pending>, DecodeError> {
    let envelope: Json = serde_json::from_slice(body).map_err(DecodeError::Json)?;
    let Json::Object(mut members) = envelope else {
        return Err(DecodeError::NotObject);
    };
    let mut saw_known = false;
    for kind in Kind::ALL {
        match members.remove(kind.name()) {
            None => {}
            Some(Json::Null) => saw_known = true,
            Some(object) => return decode_task(kind, object).map(Some),
        }
    }
    if let Some((name, _)) = members.iter().find(|(_, v)| !v.is_null()) {
        return Err(DecodeError::UnknownKind(name.clone()));
    }
    if !saw_known {
        return Err(DecodeError::NoKnownKind);
    }
    Ok(None)
}

/// Decodes one task object and its key.
pub fn decode_task(kind: Kind, object: Json) -> Result<Pending, DecodeError> {
    let task = Task::from_json(kind, object).map_err(|source| DecodeError::Task { kind, source })?;
    let encoded = task.common().DatastoreKey.as_deref().ok_or(DecodeError::MissingKey { kind })?;
    let key = DatastoreKey::decode(encoded).map_err(|source| DecodeError::BadKey { kind, source })?;
    Ok(Pending { key: TaskKey { kind, id: key.id }, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A random value of the same JSON type as `zero` (the field's Go zero value).
    fn value_like(zero: &Json) -> BoxedStrategy<Json> {
        match zero {
            Json::String(_) => any::<String>().prop_map(Json::from).boxed(),
            Json::Number(_) => any::<i64>().prop_map(Json::from).boxed(),
            Json::Bool(_) => any::<bool>().prop_map(Json::from).boxed(),
            // CCList: null or a non-empty list (Datastore keeps no empty lists).
            Json::Null => proptest::option::of(proptest::collection::vec(any::<String>(), 1..4))
                .prop_map(|cc| cc.map_or(Json::Null, Json::from))
                .boxed(),
            other => Just(other.clone()).boxed(),
        }
    }

    /// A random task object of `kind` with a valid key, as CTFE would send it.
    fn task_object(kind: Kind) -> impl Strategy<Value = (Kind, Json, i64)> {
        let zero = Task::from_json(kind, Json::Object(Default::default())).unwrap().to_json();
        let fields: Vec<(String, BoxedStrategy<Json>)> = zero
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| *name != "DatastoreKey")
            .map(|(name, v)| (name.clone(), value_like(v)))
            .collect();
        let names: Vec<String> = fields.iter().map(|(n, _)| n.clone()).collect();
        let values: Vec<BoxedStrategy<Json>> = fields.into_iter().map(|(_, s)| s).collect();
        (values, 1i64..i64::MAX).prop_map(move |(values, id)| {
            let mut object: serde_json::Map<String, Json> = names.iter().cloned().zip(values).collect();
            let key =
                DatastoreKey { namespace: "cluster-telemetry".into(), kind: kind.spec().datastore_kind.into(), id };
            object.insert("DatastoreKey".into(), Json::from(key.encode()));
            (kind, Json::Object(object), id)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Generated tasks of every kind survive CTFE's Go encoding and our decoding.
        #[test]
        fn decode_round_trips_generated_tasks(
            (task_kind, object, id) in proptest::sample::select(Kind::ALL.to_vec()).prop_flat_map(task_object),
        ) {
            let envelope = serde_json::json!({ task_kind.name(): object.clone() });
            let body = crate::ctfe::wire::to_go_json(&envelope);
            let pending = decode_envelope(&body).unwrap().unwrap();
            prop_assert_eq!(pending.key, TaskKey { kind: task_kind, id });
            prop_assert_eq!(pending.task.to_json(), object);
            // And our own Go-style encoding of the decoded task decodes to the same task.
            let again = Task::from_json(task_kind, serde_json::from_slice(&pending.task.to_go_json()).unwrap()).unwrap();
            prop_assert_eq!(again, pending.task);
        }

        /// Arbitrary input never panics the decoder.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_envelope(&body);
        }

        /// Arbitrary JSON members under a known kind never panic it either.
        #[test]
        fn arbitrary_task_objects_never_panic(member in proptest::sample::select(Kind::ALL.to_vec()), json in "[\\[\\]{}:,\"a-zA-Z0-9 .-]{0,80}") {
            let body = format!("{{\"{}\":{json}}}", member.name());
            let _ = decode_envelope(body.as_bytes());
        }
    }

    const PERF: &str = r#"{"CaptureSkps":null,"ChromiumAnalysis":null,"ChromiumBuild":null,"ChromiumPerf":{"DatastoreKey":"ChMiEWNsdXN0ZXItdGVsZW1ldHJ5EhUKEUNocm9taXVtUGVyZlRhc2tzECo","Username":"a@b","CCList":null,"RepeatRuns":null,"Extra":1},"LuaScript":null,"MetricsAnalysis":null,"PixelDiff":null,"RecreatePageSets":null,"RecreateWebpageArchives":null}"#;

    #[test]
    fn decodes_with_go_leniency() {
        let pending = decode_envelope(PERF.as_bytes()).unwrap().unwrap();
        assert_eq!(pending.key.to_string(), "ChromiumPerf.42");
        let Task::ChromiumPerf(perf) = &pending.task else { panic!("wrong kind") };
        assert_eq!(perf.CCList, None);
        assert_eq!(perf.RepeatRuns, 0);
        assert_eq!(perf.common.Username, "a@b");
    }

    #[test]
    fn empty_envelope_is_no_task() {
        let empty = include_bytes!("../../tests/fixtures/empty.pending.json");
        assert!(decode_envelope(empty).unwrap().is_none());
    }

    #[test]
    fn errors_are_named() {
        let label = |body: &str| decode_envelope(body.as_bytes()).unwrap_err().label();
        assert_eq!(label("nope"), "malformed");
        assert_eq!(label("[1]"), "malformed");
        assert_eq!(label("{}"), "unknown_kind");
        assert_eq!(label(r#"{"ChromiumPerf":null,"FooBar":{"Id":1}}"#), "unknown_kind");
        assert_eq!(label(r#"{"ChromiumPerf":{"Username":"x"}}"#), "bad_key");
        assert_eq!(label(r#"{"ChromiumPerf":{"DatastoreKey":"!!"}}"#), "bad_key");
        assert_eq!(label(r#"{"ChromiumPerf":{"RepeatRuns":1.5}}"#), "bad_task");
        assert_eq!(label(r#"{"ChromiumPerf":{"TsAdded":"x"}}"#), "bad_task");
    }

    #[test]
    fn first_member_in_precedence_order_wins() {
        let key = DatastoreKey { namespace: String::new(), kind: "K".into(), id: 7 }.encode();
        let body = format!(r#"{{"PixelDiff":{{"DatastoreKey":"{key}"}},"CaptureSkps":{{"DatastoreKey":"{key}"}}}}"#);
        assert_eq!(decode_envelope(body.as_bytes()).unwrap().unwrap().key.kind, Kind::CaptureSkps);
    }
}
