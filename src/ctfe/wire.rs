//! Serde mirrors of the Go structs CTFE sends and receives (ctfe-wire.md §3, §5, §6).
//!
//! Field names *are* the Go names (the wire contract, pinned by the fixtures), so the
//! structs use them verbatim. Every field is `#[serde(default)]` and the decoder strips
//! JSON `null`s first: Go leaves the zero value for a missing or `null` member, and
//! ignores unknown members. Type mismatches still fail the whole decode, as in Go.
#![allow(non_snake_case)]

use serde::{Deserialize, Serialize};

/// Every task field a [`crate::task::kinds::KindSpec`] row may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    AggregatedOutput,
    AnalysisOutputLink,
    AnalysisTaskId,
    Benchmark,
    BenchmarkArgs,
    BenchmarkPatchGSPath,
    BlinkPatchGSPath,
    BrowserArgs,
    BrowserArgsNoPatch,
    BrowserArgsWithPatch,
    CatapultPatchGSPath,
    CCList,
    ChromiumPatchGSPath,
    ChromiumRev,
    ChromiumRevTs,
    CustomTracesGSPath,
    CustomWebpagesGSPath,
    Description,
    GroupName,
    IsTestPageSet,
    LuaAggregatorScript,
    LuaScript,
    MatchStdoutTxt,
    MetricName,
    NoPatchRawOutput,
    PageSets,
    Platform,
    RawOutput,
    RepeatRuns,
    Results,
    RunInParallel,
    RunOnGCE,
    ScriptOutput,
    SkiaPatchGSPath,
    SkiaRev,
    TaskPriority,
    V8PatchGSPath,
    ValueColumnName,
    WithPatchRawOutput,
}

impl Field {
    /// The Go field name (the variant names are the Go names).
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

/// A borrowed field value, rendered into argv the way Go's `strconv` does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    List(&'a [String]),
}

/// Conversion of a struct field into a [`Value`], and in-place update of text fields
/// (the development CTFE stores an update's `RawOutput` & co. through it).
pub trait FieldValue {
    fn value(&self) -> Value<'_>;
    fn set_text(&mut self, _text: &str) -> bool {
        false
    }
}

impl FieldValue for String {
    fn value(&self) -> Value<'_> {
        Value::Str(self)
    }
    fn set_text(&mut self, text: &str) -> bool {
        text.clone_into(self);
        true
    }
}
impl FieldValue for i64 {
    fn value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}
impl FieldValue for bool {
    fn value(&self) -> Value<'_> {
        Value::Bool(*self)
    }
}
impl FieldValue for Option<Vec<String>> {
    fn value(&self) -> Value<'_> {
        Value::List(self.as_deref().unwrap_or_default())
    }
}

/// Go: `task_common.CommonCols`, embedded first in every task.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CommonCols {
    /// The encoded `*datastore.Key`; `None` is Go's nil pointer (a task we cannot run).
    pub DatastoreKey: Option<String>,
    pub TsAdded: i64,
    pub TsStarted: i64,
    pub TsCompleted: i64,
    pub Username: String,
    pub Failure: bool,
    pub RepeatAfterDays: i64,
    pub SwarmingLogs: String,
    pub TaskDone: bool,
}

/// Declares one task struct (CommonCols flattened first, then the kind's fields in Go
/// struct order, which is JSON order) and its field accessors.
macro_rules! wire_task {
    ($(#[$meta:meta])* $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            #[serde(flatten)]
            pub common: CommonCols,
            $(pub $field: $ty,)*
        }

        impl $name {
            /// The value of `field`, or `None` when this kind has no such field.
            pub fn get(&self, field: Field) -> Option<Value<'_>> {
                match field {
                    $(Field::$field => Some(self.$field.value()),)*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }

            /// Sets a text field; `false` when this kind has no such text field.
            pub fn set_text(&mut self, field: Field, text: &str) -> bool {
                match field {
                    $(Field::$field => self.$field.set_text(text),)*
                    #[allow(unreachable_patterns)]
                    _ => false,
                }
            }
        }
    };
}

wire_task! {
    /// Go: `capture_skps.DatastoreTask`.
    CaptureSkps {
        PageSets: String,
        IsTestPageSet: bool,
        ChromiumRev: String,
        SkiaRev: String,
        Description: String,
    }
}

wire_task! {
    /// Go: `chromium_analysis.DatastoreTask`.
    ChromiumAnalysis {
        Benchmark: String,
        PageSets: String,
        IsTestPageSet: bool,
        BenchmarkArgs: String,
        BrowserArgs: String,
        Description: String,
        CustomWebpagesGSPath: String,
        ChromiumPatchGSPath: String,
        SkiaPatchGSPath: String,
        CatapultPatchGSPath: String,
        BenchmarkPatchGSPath: String,
        V8PatchGSPath: String,
        RunInParallel: bool,
        Platform: String,
        RunOnGCE: bool,
        RawOutput: String,
        MatchStdoutTxt: String,
        CCList: Option<Vec<String>>,
        TaskPriority: i64,
        GroupName: String,
    }
}

wire_task! {
    /// Go: `chromium_builds.DatastoreTask`.
    ChromiumBuild {
        ChromiumRev: String,
        ChromiumRevTs: i64,
        SkiaRev: String,
    }
}

wire_task! {
    /// Go: `chromium_perf.DatastoreTask`.
    ChromiumPerf {
        Benchmark: String,
        Platform: String,
        PageSets: String,
        IsTestPageSet: bool,
        RepeatRuns: i64,
        RunInParallel: bool,
        BenchmarkArgs: String,
        BrowserArgsNoPatch: String,
        BrowserArgsWithPatch: String,
        Description: String,
        CustomWebpagesGSPath: String,
        ChromiumPatchGSPath: String,
        BlinkPatchGSPath: String,
        SkiaPatchGSPath: String,
        CatapultPatchGSPath: String,
        BenchmarkPatchGSPath: String,
        V8PatchGSPath: String,
        Results: String,
        NoPatchRawOutput: String,
        WithPatchRawOutput: String,
        CCList: Option<Vec<String>>,
        TaskPriority: i64,
        GroupName: String,
    }
}

wire_task! {
    /// Go: `lua_scripts.DatastoreTask`.
    LuaScript {
        PageSets: String,
        IsTestPageSet: bool,
        ChromiumRev: String,
        SkiaRev: String,
        LuaScript: String,
        LuaAggregatorScript: String,
        Description: String,
        ScriptOutput: String,
        AggregatedOutput: String,
    }
}

wire_task! {
    /// Go: `metrics_analysis.DatastoreTask`.
    MetricsAnalysis {
        MetricName: String,
        AnalysisTaskId: String,
        AnalysisOutputLink: String,
        BenchmarkArgs: String,
        Description: String,
        CustomTracesGSPath: String,
        ChromiumPatchGSPath: String,
        CatapultPatchGSPath: String,
        RawOutput: String,
        ValueColumnName: String,
        CCList: Option<Vec<String>>,
        TaskPriority: i64,
    }
}

wire_task! {
    /// Go: `pixel_diff.DatastoreTask`.
    PixelDiff {
        PageSets: String,
        IsTestPageSet: bool,
        BenchmarkArgs: String,
        BrowserArgsNoPatch: String,
        BrowserArgsWithPatch: String,
        Description: String,
        CustomWebpagesGSPath: String,
        ChromiumPatchGSPath: String,
        SkiaPatchGSPath: String,
        Results: String,
    }
}

wire_task! {
    /// Go: `admin_tasks.RecreatePageSetsDatastoreTask`.
    RecreatePageSets {
        PageSets: String,
        IsTestPageSet: bool,
    }
}

wire_task! {
    /// Go: `admin_tasks.RecreateWebpageArchivesDatastoreTask`.
    RecreateWebpageArchives {
        PageSets: String,
        IsTestPageSet: bool,
        ChromiumRev: String,
        SkiaRev: String,
    }
}

/// Go: `task_common.UpdateTaskCommonVars` plus a kind's extra members, as the poller sends
/// it on failure (ctfe-wire.md §6). Serialised by hand to keep Go's member order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureUpdate {
    pub id: i64,
    /// 14-digit UTC timestamp; the original sent `""` (B1).
    pub ts_started: String,
    pub ts_completed: String,
    /// Extra members of the kind's UpdateVars, all sent as `""`.
    pub extras: &'static [Field],
}

impl Serialize for FailureUpdate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(8 + self.extras.len()))?;
        map.serialize_entry("Id", &self.id)?;
        map.serialize_entry("TsStarted", &self.ts_started)?;
        map.serialize_entry("TsCompleted", &self.ts_completed)?;
        map.serialize_entry("Failure", &true)?;
        map.serialize_entry("TaskDone", &true)?;
        map.serialize_entry("RepeatAfterDays", &0)?;
        map.serialize_entry("ClearRepeatAfterDays", &false)?;
        map.serialize_entry("SwarmingLogs", "")?;
        for extra in self.extras {
            map.serialize_entry(&extra.name(), "")?;
        }
        map.end()
    }
}

/// Go: `task_common.UpdateTaskCommonVars` as CTFE decodes any update (the development
/// CTFE's side of §2.4); the kind's extra text members are read from the raw object.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct UpdateVars {
    pub Id: i64,
    pub TsStarted: String,
    pub TsCompleted: String,
    pub Failure: bool,
    pub TaskDone: bool,
    pub RepeatAfterDays: i64,
    pub ClearRepeatAfterDays: bool,
    pub SwarmingLogs: String,
}

/// Writes JSON the way Go's `encoding/json` does: `<`, `>`, `&`, U+2028 and U+2029
/// escaped, other control characters as lower-case `\u00XX` (CTFE's exact bytes, §3.1).
pub fn to_go_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    value.serialize(&mut ser).expect("serialising to memory cannot fail");
    out
}

struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escape = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            writer.write_all(&fragment.as_bytes()[start..i])?;
            writer.write_all(escape.as_bytes())?;
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        use serde_json::ser::CharEscape;
        let s: String = match char_escape {
            CharEscape::Quote => "\\\"".into(),
            CharEscape::ReverseSolidus => "\\\\".into(),
            CharEscape::LineFeed => "\\n".into(),
            CharEscape::CarriageReturn => "\\r".into(),
            CharEscape::Tab => "\\t".into(),
            CharEscape::Solidus => "/".into(),
            CharEscape::Backspace => "\\u0008".into(),
            CharEscape::FormFeed => "\\u000c".into(),
            CharEscape::AsciiControl(b) => format!("\\u{b:04x}"),
        };
        writer.write_all(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_json_escapes_like_encoding_json() {
        let s = "a<b>&c\u{2028}\u{8}\u{c}\u{1}\"\\\n\té";
        let out = String::from_utf8(to_go_json(&s)).unwrap();
        assert_eq!(out, r#""a\u003cb\u003e\u0026c\u2028\u0008\u000c\u0001\"\\\n\té""#);
    }

    #[test]
    fn failure_update_has_go_member_order() {
        let body = FailureUpdate {
            id: 42,
            ts_started: "20190115195400".into(),
            ts_completed: "20190115195438".into(),
            extras: &[Field::RawOutput],
        };
        assert_eq!(
            String::from_utf8(to_go_json(&body)).unwrap(),
            r#"{"Id":42,"TsStarted":"20190115195400","TsCompleted":"20190115195438","Failure":true,"TaskDone":true,"RepeatAfterDays":0,"ClearRepeatAfterDays":false,"SwarmingLogs":"","RawOutput":""}"#
        );
    }
}
