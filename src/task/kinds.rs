//! The nine kinds as data: one row per kind says everything the poller does differently
//! for it. A tenth kind is a new row (plus its wire struct), never a new function.
//!
//! Flags are listed in the order the original passes them (ctfe-wire.md §7.3); golden
//! tests compare every kind's argv with `tests/fixtures/<kind>.argv.json`.

use super::Kind;
use crate::ctfe::wire::Field;

/// How one master-script flag gets its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// The task field, rendered as Go's `strconv` would.
    Field(Field),
    /// A literal value (e.g. `--target_platform=Linux`).
    Const(&'static str),
    /// No value: `--logtostderr`.
    Bare,
    /// `Username`, followed by `CCList` joined with `,` when `with_cc`.
    Emails {
        with_cc: bool,
    },
    /// The decoded `DatastoreKey` ID.
    TaskId,
    RunId,
    /// The kind's [`Gce`] rule evaluated, `true`/`false`.
    RunsOnGce,
    /// `ChromiumRev[:14]-SkiaRev[:14]` (`ctutil.ChromiumBuildDir`).
    ChromiumBuild,
    /// One of the poller's own master_common settings, forwarded verbatim.
    Setting(Setting),
}

/// Poller settings forwarded to every master script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    EmailClientSecretFile,
    EmailTokenCacheFile,
    ServiceAccountFile,
    Local,
}

/// Where a run file's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFrom {
    /// A patch id in the patch store; the file gets its bytes plus `"\n"` (git rejects
    /// patches without a final newline; seed 118).
    Patch(Field),
    /// The field's text verbatim, always written.
    Text(Field),
    /// The field's text verbatim, written only when non-empty.
    TextIfSet(Field),
}

/// Whether a kind's workers are the autoscaled GCE fleet (`RunsOnGCEWorkers()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gce {
    Never,
    Always,
    /// `flag && field != value`, e.g. ChromiumAnalysis: `RunOnGCE && Platform != "Android"`.
    When {
        flag: Field,
        unless: (Field, &'static str),
    },
}

/// Everything kind-specific, as data.
#[derive(Debug)]
pub struct KindSpec {
    pub kind: Kind,
    /// Go task name: envelope member, picked-up key prefix, `kind` label.
    pub name: &'static str,
    /// Datastore kind inside `DatastoreKey` (dev CTFE encodes keys with it).
    pub datastore_kind: &'static str,
    pub script: &'static str,
    /// Update endpoint, relative to the CTFE root.
    pub update_path: &'static str,
    /// Go type of the update body, as CTFE names it in its error messages.
    pub update_type: &'static str,
    /// Extra members of the kind's UpdateVars, after `SwarmingLogs`.
    pub update_extras: &'static [Field],
    pub gce: Gce,
    pub flags: &'static [(&'static str, Arg)],
    /// `(suffix, source)`, written in this order before the script starts.
    pub files: &'static [(&'static str, FileFrom)],
}

use Arg::{Bare, ChromiumBuild, Const, Emails, RunId, RunsOnGce, TaskId};
use Field as F;

const E1: (&str, Arg) = ("email_client_secret_file", Arg::Setting(Setting::EmailClientSecretFile));
const E2: (&str, Arg) = ("email_token_cache_file", Arg::Setting(Setting::EmailTokenCacheFile));
const SA: (&str, Arg) = ("service_account_file", Arg::Setting(Setting::ServiceAccountFile));
const LOCAL: (&str, Arg) = ("local", Arg::Setting(Setting::Local));
const LOG: (&str, Arg) = ("logtostderr", Bare);

const fn field(name: &'static str, f: Field) -> (&'static str, Arg) {
    (name, Arg::Field(f))
}

const ANALYSIS_PATCHES: &[(&str, FileFrom)] = &[
    (".chromium.patch", FileFrom::Patch(F::ChromiumPatchGSPath)),
    (".skia.patch", FileFrom::Patch(F::SkiaPatchGSPath)),
    (".v8.patch", FileFrom::Patch(F::V8PatchGSPath)),
    (".catapult.patch", FileFrom::Patch(F::CatapultPatchGSPath)),
    (".custom_webpages.csv", FileFrom::Patch(F::CustomWebpagesGSPath)),
];

/// Indexed by `Kind as usize`; a unit test checks the order.
pub static KINDS: [KindSpec; 9] = [
    KindSpec {
        kind: Kind::CaptureSkps,
        name: "CaptureSkps",
        datastore_kind: "CaptureSkpsTasks",
        script: "capture_skps_on_workers",
        update_path: "_/update_capture_skps_task",
        update_type: "capture_skps.UpdateVars",
        update_extras: &[],
        gce: Gce::Never,
        flags: &[
            ("emails", Emails { with_cc: false }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("pageset_type", F::PageSets),
            ("chromium_build", ChromiumBuild),
            ("target_platform", Const("Linux")),
            ("run_on_gce", RunsOnGce),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            LOCAL,
        ],
        files: &[],
    },
    KindSpec {
        kind: Kind::ChromiumAnalysis,
        name: "ChromiumAnalysis",
        datastore_kind: "ChromiumAnalysisTasks",
        script: "run_chromium_analysis_on_workers",
        update_path: "_/update_chromium_analysis_task",
        update_type: "chromium_analysis.UpdateVars",
        update_extras: &[F::RawOutput],
        gce: Gce::When { flag: F::RunOnGCE, unless: (F::Platform, "Android") },
        flags: &[
            ("emails", Emails { with_cc: true }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("pageset_type", F::PageSets),
            field("benchmark_name", F::Benchmark),
            field("benchmark_extra_args", F::BenchmarkArgs),
            field("browser_extra_args", F::BrowserArgs),
            field("run_in_parallel", F::RunInParallel),
            field("target_platform", F::Platform),
            ("run_on_gce", RunsOnGce),
            field("match_stdout_txt", F::MatchStdoutTxt),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            field("task_priority", F::TaskPriority),
            field("group_name", F::GroupName),
            LOCAL,
        ],
        files: ANALYSIS_PATCHES,
    },
    KindSpec {
        kind: Kind::ChromiumBuild,
        name: "ChromiumBuild",
        datastore_kind: "ChromiumBuildTasks",
        script: "build_chromium",
        update_path: "_/update_chromium_build_task",
        update_type: "chromium_builds.UpdateVars",
        update_extras: &[],
        // Builds run on GCE *builders*, not the autoscaled workers; no --run_on_gce.
        gce: Gce::Never,
        flags: &[
            ("emails", Emails { with_cc: false }),
            ("task_id", TaskId),
            ("run_id", RunId),
            ("target_platform", Const("Linux")),
            field("chromium_hash", F::ChromiumRev),
            field("skia_hash", F::SkiaRev),
            LOG,
            E1,
            E2,
            SA,
            LOCAL,
        ],
        files: &[],
    },
    KindSpec {
        kind: Kind::ChromiumPerf,
        name: "ChromiumPerf",
        datastore_kind: "ChromiumPerfTasks",
        script: "run_chromium_perf_on_workers",
        update_path: "_/update_chromium_perf_task",
        update_type: "chromium_perf.UpdateVars",
        update_extras: &[F::Results, F::NoPatchRawOutput, F::WithPatchRawOutput],
        // "perf tasks should always run on bare-metal machines".
        gce: Gce::Never,
        flags: &[
            ("emails", Emails { with_cc: true }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("pageset_type", F::PageSets),
            field("benchmark_name", F::Benchmark),
            field("benchmark_extra_args", F::BenchmarkArgs),
            field("browser_extra_args_nopatch", F::BrowserArgsNoPatch),
            field("browser_extra_args_withpatch", F::BrowserArgsWithPatch),
            field("repeat_benchmark", F::RepeatRuns),
            field("run_in_parallel", F::RunInParallel),
            field("target_platform", F::Platform),
            ("run_on_gce", RunsOnGce),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            field("task_priority", F::TaskPriority),
            field("group_name", F::GroupName),
            LOCAL,
        ],
        files: ANALYSIS_PATCHES,
    },
    KindSpec {
        kind: Kind::LuaScript,
        name: "LuaScript",
        datastore_kind: "LuaScriptTasks",
        script: "run_lua_on_workers",
        update_path: "_/update_lua_script_task",
        update_type: "lua_scripts.UpdateVars",
        update_extras: &[F::ScriptOutput, F::AggregatedOutput],
        gce: Gce::Always,
        flags: &[
            ("emails", Emails { with_cc: false }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("pageset_type", F::PageSets),
            ("chromium_build", ChromiumBuild),
            ("run_on_gce", RunsOnGce),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            LOCAL,
        ],
        files: &[(".lua", FileFrom::Text(F::LuaScript)), (".aggregator", FileFrom::TextIfSet(F::LuaAggregatorScript))],
    },
    KindSpec {
        kind: Kind::MetricsAnalysis,
        name: "MetricsAnalysis",
        datastore_kind: "MetricsAnalysisTasks",
        script: "metrics_analysis_on_workers",
        update_path: "_/update_metrics_analysis_task",
        update_type: "metrics_analysis.UpdateVars",
        update_extras: &[F::RawOutput],
        // Runs on GCE workers, yet the original passes no --run_on_gce.
        gce: Gce::Always,
        flags: &[
            ("emails", Emails { with_cc: true }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("metric_name", F::MetricName),
            field("analysis_output_link", F::AnalysisOutputLink),
            field("benchmark_extra_args", F::BenchmarkArgs),
            field("value_column_name", F::ValueColumnName),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            field("task_priority", F::TaskPriority),
            LOCAL,
        ],
        files: &[
            (".chromium.patch", FileFrom::Patch(F::ChromiumPatchGSPath)),
            (".catapult.patch", FileFrom::Patch(F::CatapultPatchGSPath)),
            (".traces.csv", FileFrom::Patch(F::CustomTracesGSPath)),
        ],
    },
    KindSpec {
        kind: Kind::PixelDiff,
        name: "PixelDiff",
        datastore_kind: "PixelDiffTasks",
        script: "pixel_diff_on_workers",
        update_path: "_/update_pixel_diff_task",
        update_type: "pixel_diff.UpdateVars",
        update_extras: &[F::Results],
        gce: Gce::Always,
        flags: &[
            ("emails", Emails { with_cc: false }),
            field("description", F::Description),
            ("task_id", TaskId),
            field("pageset_type", F::PageSets),
            field("benchmark_extra_args", F::BenchmarkArgs),
            field("browser_extra_args_nopatch", F::BrowserArgsNoPatch),
            field("browser_extra_args_withpatch", F::BrowserArgsWithPatch),
            ("run_on_gce", RunsOnGce),
            ("run_id", RunId),
            LOG,
            E1,
            E2,
            SA,
            LOCAL,
        ],
        files: &[
            (".chromium.patch", FileFrom::Patch(F::ChromiumPatchGSPath)),
            (".skia.patch", FileFrom::Patch(F::SkiaPatchGSPath)),
            (".custom_webpages.csv", FileFrom::Patch(F::CustomWebpagesGSPath)),
        ],
    },
    KindSpec {
        kind: Kind::RecreatePageSets,
        name: "RecreatePageSets",
        datastore_kind: "RecreatePageSetsTasks",
        script: "create_pagesets_on_workers",
        update_path: "_/update_recreate_page_sets_task",
        update_type: "admin_tasks.RecreatePageSetsUpdateVars",
        update_extras: &[],
        gce: Gce::Always,
        flags: ADMIN_FLAGS,
        files: &[],
    },
    KindSpec {
        kind: Kind::RecreateWebpageArchives,
        name: "RecreateWebpageArchives",
        datastore_kind: "RecreateWebpageArchivesTasks",
        script: "capture_archives_on_workers",
        update_path: "_/update_recreate_webpage_archives_task",
        update_type: "admin_tasks.RecreateWebpageArchivesUpdateVars",
        update_extras: &[],
        gce: Gce::Always,
        flags: ADMIN_FLAGS,
        files: &[],
    },
];

const ADMIN_FLAGS: &[(&str, Arg)] = &[
    ("emails", Emails { with_cc: false }),
    ("task_id", TaskId),
    ("run_on_gce", RunsOnGce),
    ("run_id", RunId),
    field("pageset_type", F::PageSets),
    LOG,
    E1,
    E2,
    SA,
    LOCAL,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_kind() {
        for (i, spec) in KINDS.iter().enumerate() {
            assert_eq!(spec.kind as usize, i, "{}", spec.name);
            assert_eq!(format!("{:?}", spec.kind), spec.name);
        }
    }
}
