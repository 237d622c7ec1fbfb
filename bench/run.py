#!/usr/bin/env python3
"""Benchmarks of ct-poller (issue 5): idle, flood, dispatch, soak, start/stop.

    python3 bench/run.py [--binary PATH] [--smoke] [--only NAME[,NAME...]] [--json FILE]

Every figure of the poller is read from /proc/PID/status (VmRSS, VmHWM) and
/proc/PID/stat (utime+stime) of the poller process; this harness, the development CTFE
(`ct-poller dev-ctfe`, its own process) and the master scripts are separate processes.
References (the same script with its output to /dev/null, a bare posix_spawn of the same
script) are measured in the same run, interleaved with the poller's runs, and reported as
ratios because the machines are shared and noisy.

`--smoke` is the CI version (about 10 seconds, tiny sizes): it still checks every
correctness invariant (each task run exactly once, each failure reported exactly once, no
file left, no zombie, clean exits) and exits 1 when one fails. Speed targets never change
the exit code: they are read from the table.

Python 3 standard library only. Network traffic goes to 127.0.0.1 only. Every process
this script starts (and every process they start: they carry a per-run token in their
environment) is stopped and every temporary directory removed, also on failure or ^C.
"""

import argparse
import http.client as httpclient
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(REPO, "tests", "fixtures")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
GiB = 1 << 30
TOKEN_VAR = "CT_POLLER_BENCH_TOKEN"

# (envelope member, fixture stem, master script, update path): src/task/kinds.rs.
KINDS = [
    ("CaptureSkps", "capture_skps", "capture_skps_on_workers", "_/update_capture_skps_task"),
    ("ChromiumAnalysis", "chromium_analysis", "run_chromium_analysis_on_workers",
     "_/update_chromium_analysis_task"),
    ("ChromiumBuild", "chromium_build", "build_chromium", "_/update_chromium_build_task"),
    ("ChromiumPerf", "chromium_perf", "run_chromium_perf_on_workers",
     "_/update_chromium_perf_task"),
    ("LuaScript", "lua_script", "run_lua_on_workers", "_/update_lua_script_task"),
    ("MetricsAnalysis", "metrics_analysis", "metrics_analysis_on_workers",
     "_/update_metrics_analysis_task"),
    ("PixelDiff", "pixel_diff", "pixel_diff_on_workers", "_/update_pixel_diff_task"),
    ("RecreatePageSets", "recreate_page_sets", "create_pagesets_on_workers",
     "_/update_recreate_page_sets_task"),
    ("RecreateWebpageArchives", "recreate_webpage_archives", "capture_archives_on_workers",
     "_/update_recreate_webpage_archives_task"),
]
KIND_BY_NAME = {k[0]: k for k in KINDS}
BENCHMARKS = ["startstop", "idle", "dispatch", "flood", "soak"]

FULL = dict(
    idle_seconds=60.0,
    idle_floor=True,
    startstop_reps=10,
    dispatch_tasks=1000,
    dispatch_poll_calibration=3.0,
    flood_sizes=[100 * MiB, GiB],
    flood_modes=["stdout", "stderr", "nonl"],
    soak_tasks=10000,
    soak_first=1000,
)
SMOKE = dict(
    idle_seconds=1.5,
    idle_floor=False,
    startstop_reps=2,
    dispatch_tasks=50,
    dispatch_poll_calibration=0.3,
    flood_sizes=[MiB, 6 * MiB],  # 6 MiB > the 4 MiB output limit: bytes get dropped
    flood_modes=["stdout", "nonl"],
    soak_tasks=200,
    soak_first=20,
)


class Invariant(Exception):
    """A correctness invariant failed (not a speed target)."""


# --------------------------------------------------------------------------- helpers


def now_ns():
    return time.time_ns()  # CLOCK_REALTIME, what bash's $EPOCHREALTIME reads too


def mono():
    return time.monotonic()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, method, path, body=None, timeout=10.0, conn=None):
    own = conn is None
    if own:
        conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def parse_metrics(text):
    """Prometheus text -> {name: [(labels dict, value)]}."""
    out = {}
    line_re = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
    label_re = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            continue
        labels = dict(label_re.findall(m.group(2) or ""))
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def metric_sum(metrics, name, **match):
    return sum(v for labels, v in metrics.get(name, [])
               if all(labels.get(k) == want for k, want in match.items()))


def proc_stat(pid):
    """(state, ppid, cpu seconds utime+stime) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2:].split()
    return rest[0], int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status(pid):
    """VmRSS, VmHWM (bytes) and Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


def sched_ns(pid):
    """CPU time of the live threads in ns (/proc/PID/task/*/schedstat): finer than the
    10 ms ticks of /proc/PID/stat, used where a window is too short for ticks."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
    return total


def children_of(pid):
    """[(child pid, state)] of every process whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state, ppid, _ = proc_stat(int(entry))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if ppid == pid:
            out.append((int(entry), state))
    return out


def processes_with_token(token):
    """Pids of live processes carrying our run token in their environment."""
    needle = f"{TOKEN_VAR}={token}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read() + b"\0"
            state = proc_stat(int(entry))[0]
        except (OSError, ValueError):
            continue
        if needle in env and state != "Z":
            found.append(int(entry))
    return found


class Tail:
    """Reads what was appended to a file since the last call."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def median(values):
    return statistics.median(values) if values else float("nan")


def fmt_bytes(n):
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def fmt_ms(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def fmt_us(seconds):
    return f"{seconds * 1e6:.0f} µs"


# ---------------------------------------------------------------------- the scripts

MARK_STARTED = r"""
# Tell CTFE the task started (a task stays pending until then): POST through bash's
# /dev/tcp, no process started. $1 = update path, $2 = task id.
mark_started() {
  local hostport=${CTFE_INTERNAL_URL#http://}; hostport=${hostport%%/*}
  local ts body status
  printf -v ts '%(%Y%m%d%H%M%S)T' -1
  body="{\"Id\":$2,\"TsStarted\":\"$ts\"}"
  exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || return 1
  printf 'POST /%s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$1" "$hostport" "${#body}" "$body" >&3
  read -r _ status _ <&3
  exec 3<&-
  [ "$status" = 200 ]
}
for a; do
  case $a in
    --task_id=*) id=${a#--task_id=} ;;
    --run_id=*) run=${a#--run_id=} ;;
  esac
done
"""

# Dispatch: the exec time is the script's first action; the log line is written after the
# task is marked started, so seeing it means CTFE will not offer the task again.
DISPATCH_BODY = r"""
mark_started "$UPDATE_PATH" "$id" || echo "mark_started failed for $id" >&2
printf '%s %s %s\n' "$id" "$t" "$run" >> "$BENCH_LOG"
"""

FLOOD_BODY = r"""
[ -n "$BENCH_NO_MARK" ] || mark_started "$UPDATE_PATH" "$id" || exit 3
line=$(printf '%099d' 0)
t0=$EPOCHREALTIME
case $BENCH_FLOOD in
  stdout) yes "$line" | head -c "$BENCH_BYTES" ;;
  stderr) yes "$line" | head -c "$BENCH_BYTES" >&2 ;;
  nonl) head -c "$BENCH_BYTES" /dev/zero | tr '\0' x ;;
esac
t1=$EPOCHREALTIME
printf '%s %s %s\n' "$id" "$t0" "$t1" >> "$BENCH_LOG"
"""

SOAK_BODY = r"""
mark_started "$UPDATE_PATH" "$id" || echo "mark_started failed for $id" >&2
echo "task $KIND_NAME.$id run $run"
printf '%s %s %s\n' "$KIND_NAME" "$id" "$run" >> "$BENCH_LOG"
(( id % 10 )) || exit 1
exit 0
"""


def write_scripts(directory, body, first_line=""):
    """One master script per kind (the kind's update path baked in)."""
    bash = shutil.which("bash") or "/bin/bash"
    os.makedirs(directory, exist_ok=True)
    for name, _stem, script, update in KINDS:
        text = (f"#!{bash}\n{first_line}\nUPDATE_PATH={update}\nKIND_NAME={name}\n"
                + MARK_STARTED + body)
        path = os.path.join(directory, script)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)


def fixture_envelope(stem):
    with open(os.path.join(FIXTURES, f"{stem}.pending.json")) as f:
        return json.load(f)


def write_patch_store(directory):
    """The fixtures' GCS objects, so that every kind's patch fetches succeed."""
    for _name, stem, _script, _update in KINDS:
        path = os.path.join(FIXTURES, f"{stem}.files.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            objects = json.load(f).get("gcs_objects") or {}
        for object_name, content in objects.items():
            target = os.path.join(directory, object_name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(content)


# ------------------------------------------------------------------------- processes


class Session:
    """Owns the temp dir and every process started; cleans up whatever happens."""

    def __init__(self, binary, keep=False):
        self.binary = binary
        self.keep = keep
        self.token = f"{os.getpid()}-{random.getrandbits(48):x}"
        self.root = tempfile.mkdtemp(prefix="ct-poller-bench-")
        self.procs = []
        self.poller_env = {}

    def base_env(self, extra=None):
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LC_ALL": "C",
            TOKEN_VAR: self.token,
        }
        env.update(extra or {})
        return env

    def spawn(self, argv, env, stdout, stderr):
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        """SIGTERM; a second SIGTERM (the poller stops its tasks) then SIGKILL."""
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.send_signal(sig)
                    proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.wait()

    def leftovers(self):
        return processes_with_token(self.token)

    def cleanup(self):
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc, grace=3.0)
            except Exception as e:  # keep cleaning
                print(f"bench: stopping pid {proc.pid}: {e}", file=sys.stderr)
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            print(f"bench: kept {self.root}", file=sys.stderr)

    def dir(self, *parts):
        path = os.path.join(self.root, *parts)
        os.makedirs(path, exist_ok=True)
        return path


class DevCtfe:
    def __init__(self, session, name):
        self.session = session
        self.dir = session.dir(name)
        self.port = free_port()
        with open(os.path.join(self.dir, "dev-ctfe.log"), "wb") as err:
            self.proc = session.spawn(
                [session.binary, "dev-ctfe", "--addr", f"127.0.0.1:{self.port}"],
                session.base_env(), subprocess.DEVNULL, err)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = mono() + 10
        while True:
            try:
                request(self.port, "GET", "/_/dev/tasks", timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or mono() > deadline:
                    raise RuntimeError("the development CTFE did not start")
                time.sleep(0.005)
        self.conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def call(self, method, path, body=None):
        for attempt in range(2):
            try:
                return request(self.port, method, path, body, conn=self.conn)
            except (httpclient.HTTPException, OSError):
                self.conn.close()
                self.conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise

    def enqueue(self, envelope):
        status, body = self.call("POST", "/_/dev/enqueue", json.dumps(envelope))
        if status != 200:
            raise RuntimeError(f"enqueue: {status} {body[:200]!r}")
        return json.loads(body)["task_id"]

    def mark_started(self, kind_name, task_id):
        update = KIND_BY_NAME[kind_name][3]
        body = json.dumps({"Id": task_id, "TsStarted": time.strftime("%Y%m%d%H%M%S")})
        status, text = self.call("POST", "/" + update, body)
        if status != 200:
            raise RuntimeError(f"update: {status} {text[:200]!r}")

    def log(self):
        status, body = self.call("GET", "/_/dev/log")
        if status != 200:
            raise RuntimeError(f"/_/dev/log: {status}")
        return json.loads(body)

    def stop(self):
        self.conn.close()
        self.session.stop(self.proc)


def envelope(kind_name, ts_added=None):
    """The kind's fixture without its DatastoreKey (the dev CTFE assigns the next ID)."""
    stem = KIND_BY_NAME[kind_name][1]
    env = fixture_envelope(stem)
    task = env[kind_name]
    task["DatastoreKey"] = None
    if ts_added is not None:
        task["TsAdded"] = ts_added
    return env


class Poller:
    def __init__(self, session, ctfe, name, poll_interval="100ms", scripts=None,
                 env=None, stdout=None, stderr=None, extra=()):
        self.session = session
        self.dir = session.dir(name)
        self.work = session.dir(name, "work")
        self.scripts = scripts or session.dir(name, "scripts")
        self.store = session.dir(name, "store")
        self.port = free_port()
        self.stdout_path = os.path.join(self.dir, "poller.stdout")
        self.stderr_path = os.path.join(self.dir, "poller.stderr")
        argv = [
            session.binary,
            "--ctfe-url", ctfe.url,
            "--autoscaler", "none",
            "--poll-interval", poll_interval,
            "--metrics-addr", f"127.0.0.1:{self.port}",
            "--work-dir", self.work,
            "--scripts-dir", self.scripts,
            "--patch-store", "file://" + self.store,
            "--max-concurrent-tasks", "16",
            "--output-limit", "4MiB",
            "--drain-timeout", "5s",
            *extra,
        ]
        out = open(self.stdout_path, "wb") if stdout is None else stdout
        err = open(self.stderr_path, "wb") if stderr is None else stderr
        self.started = mono()
        try:
            self.proc = session.spawn(
                argv, session.base_env({**session.poller_env, **(env or {})}), out, err)
        finally:
            for f in (out, err):
                if f is not stdout and f is not stderr:
                    f.close()
        self.pid = self.proc.pid

    def readyz(self, timeout=0.2):
        try:
            status, _ = request(self.port, "GET", "/readyz", timeout=timeout)
            return status
        except OSError:
            return None

    def wait_ready(self, timeout=20.0, step=0.0005):
        deadline = mono() + timeout
        while self.readyz() != 200:
            if self.proc.poll() is not None:
                raise Invariant(f"the poller exited with {self.proc.returncode} before /readyz")
            if mono() > deadline:
                raise Invariant("the poller did not become ready")
            time.sleep(step)
        return mono()

    def metrics(self):
        status, body = request(self.port, "GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics: {status}")
        return parse_metrics(body.decode())

    def cpu(self):
        return proc_stat(self.pid)[2]

    def status(self):
        return proc_status(self.pid)

    def zombies(self):
        return [pid for pid, state in children_of(self.pid) if state == "Z"]

    def stop(self):
        return self.session.stop(self.proc)


# ----------------------------------------------------------------------- the results


class Results:
    def __init__(self):
        self.rows = []  # (benchmark, figure, value, target, ok, reference)
        self.failures = []  # correctness invariants that failed
        self.raw = {}

    def row(self, bench, figure, value, target="", ok=None, reference=""):
        self.rows.append((bench, figure, value, target, ok, reference))

    def check(self, bench, what, ok, detail=""):
        """A correctness invariant: a table row, and a non-zero exit when it fails."""
        self.row(bench, what, detail or ("yes" if ok else "NO"), "invariant", ok)
        if not ok:
            self.failures.append(f"{bench}: {what}: {detail}")

    def table(self):
        head = ("benchmark", "figure", "value", "target", "result", "reference / ratio")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for bench, figure, value, target, ok, ref in self.rows:
            verdict = "" if ok is None else ("pass" if ok else "**FAIL**")
            cells = (bench, figure, value, target, verdict, ref)
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- 5. start / stop


def bench_startstop(s, cfg, res):
    ctfe = DevCtfe(s, "startstop-ctfe")
    ready, stop, codes = [], [], []
    try:
        for rep in range(cfg["startstop_reps"]):
            t0 = mono()
            p = Poller(s, ctfe, f"startstop-{rep}", stdout=subprocess.DEVNULL)
            t1 = p.wait_ready(step=0.0002)
            ready.append(t1 - t0)
            time.sleep(0.3)  # idle: a few polls
            t2 = mono()
            p.proc.send_signal(signal.SIGTERM)
            code = p.proc.wait(30)
            stop.append(mono() - t2)
            codes.append(code)
            s.stop(p.proc)
    finally:
        ctfe.stop()
    res.raw["startstop"] = dict(ready_s=ready, stop_s=stop, exit_codes=codes)
    r, t = median(ready), median(stop)
    n = len(ready)
    res.row("start/stop", f"exec → /readyz 200, median of {n}", fmt_ms(r), "< 50 ms", r < 0.05,
            f"min {fmt_ms(min(ready))}, max {fmt_ms(max(ready))}")
    res.row("start/stop", f"SIGTERM → exit when idle, median of {n}", fmt_ms(t), "< 100 ms",
            t < 0.1, f"min {fmt_ms(min(stop))}, max {fmt_ms(max(stop))}")
    res.check("start/stop", "exit status 0 after SIGTERM", all(c == 0 for c in codes),
              f"exit codes {sorted(set(codes))}")


# ---------------------------------------------------------------------------- 1. idle


def build_floor(s):
    """bench/idle_floor.rs compiled with rustc -O, or None (no rustc, or it failed)."""
    rustc = shutil.which("rustc")
    if not rustc:
        return None
    out = os.path.join(s.dir("floor"), "idle_floor")
    done = subprocess.run([rustc, "-O", "--edition", "2021", os.path.join(HERE, "idle_floor.rs"),
                           "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        log(f"idle: cannot build the floor reference: {done.stderr.decode()[-300:]}")
        return None
    return out


def bench_idle(s, cfg, res):
    floor_bin = build_floor(s) if cfg.get("idle_floor", True) else None
    ctfe = DevCtfe(s, "idle-ctfe")
    p = Poller(s, ctfe, "idle", poll_interval="100ms")
    floor = None
    try:
        if floor_bin:
            floor = s.spawn([floor_bin, f"127.0.0.1:{ctfe.port}", "100"], s.base_env(),
                            subprocess.DEVNULL, subprocess.DEVNULL)
        p.wait_ready()
        time.sleep(min(0.5, cfg["idle_seconds"] / 5))
        m0 = p.metrics()
        c0, n0, t0 = p.cpu(), sched_ns(p.pid), mono()
        f0 = (proc_stat(floor.pid)[2], sched_ns(floor.pid)) if floor else None
        time.sleep(cfg["idle_seconds"])
        c1, n1, t1 = p.cpu(), sched_ns(p.pid), mono()
        f1 = (proc_stat(floor.pid)[2], sched_ns(floor.pid)) if floor else None
        floor_rss = proc_status(floor.pid)["VmRSS"] if floor else 0
        st = p.status()
        m1 = p.metrics()
        polls = metric_sum(m1, "ct_poller_polls_total") - metric_sum(m0, "ct_poller_polls_total")
        empty = (metric_sum(m1, "ct_poller_polls_total", result="empty")
                 - metric_sum(m0, "ct_poller_polls_total", result="empty"))
    finally:
        code = p.stop()
        if floor:
            s.stop(floor)
        ctfe.stop()
    cpu, precise = c1 - c0, (n1 - n0) / 1e9
    per_k = cpu / polls * 1000 if polls else float("nan")
    per_k_precise = precise / polls * 1000 if polls else float("nan")
    floor_ref = ""
    if f0 and f1:
        # The floor polls on the same 100 ms ticks: its polls in the window by the clock.
        floor_polls = (t1 - t0) / 0.1
        floor_k = (f1[1] - f0[1]) / 1e9 / floor_polls * 1000
        floor_ref = (f"; floor (bench/idle_floor.rs: one thread, blocking std, same GET): "
                     f"{floor_k:.4f} s → **{per_k_precise / floor_k:.1f}x**")
        res.raw["idle_floor"] = dict(cpu_s=f1[0] - f0[0], cpu_sched_s=(f1[1] - f0[1]) / 1e9,
                                     polls=floor_polls, rss=floor_rss)
    res.raw["idle"] = dict(seconds=t1 - t0, polls=polls, empty=empty, cpu_s=cpu,
                           cpu_sched_s=precise, status=st)
    res.row("idle", f"RSS after {t1 - t0:.0f} s polling every 100 ms", fmt_bytes(st["VmRSS"]),
            "< 8 MiB", st["VmRSS"] < 8 * MiB,
            f"file-backed {fmt_bytes(st.get('RssFile', 0))} (binary text, libc), anonymous "
            f"{fmt_bytes(st.get('RssAnon', 0))}; peak {fmt_bytes(st['VmHWM'])}; "
            f"{st['Threads']} threads"
            + (f"; floor program {fmt_bytes(floor_rss)}" if floor_rss else ""))
    res.row("idle", f"CPU per 1,000 polls ({polls:.0f} polls, {cpu:.2f} s CPU)",
            f"{per_k:.3f} s", "< 0.1 s", per_k < 0.1,
            f"schedstat: {per_k_precise:.4f} s ({fmt_us(precise / polls if polls else 0)}/poll)"
            + floor_ref)
    res.check("idle", "every poll reached CTFE and found it empty", polls > 0 and empty == polls,
              f"{empty:.0f} empty of {polls:.0f}")
    res.check("idle", "exit status 0 after SIGTERM", code == 0, f"exit {code}")


# ------------------------------------------------------------------------ 3. dispatch


def bench_dispatch(s, cfg, res):
    n = cfg["dispatch_tasks"]
    ctfe = DevCtfe(s, "dispatch-ctfe")
    scripts = s.dir("dispatch", "scripts")
    write_scripts(scripts, DISPATCH_BODY, first_line="t=$EPOCHREALTIME")
    log_path = os.path.join(s.dir("dispatch"), "runs.log")
    bare_log = os.path.join(s.dir("dispatch"), "bare.log")
    script = os.path.join(scripts, KIND_BY_NAME["CaptureSkps"][2])

    # The bare reference runs the same script with the same kind of argv and environment,
    # against a task that is already started (so the poller never picks it up).
    ref_id = int(ctfe.enqueue(envelope("CaptureSkps")).split(".")[1])
    ctfe.mark_started("CaptureSkps", ref_id)
    bare_argv = [script, "--emails=superman@krypton.com", "--description=bench",
                 f"--task_id={ref_id}", "--pageset_type=10k", "--chromium_build=a-b",
                 "--target_platform=Linux", "--run_on_gce=false", "--run_id=bench-0",
                 "--logtostderr", "--email_client_secret_file=/x", "--email_token_cache_file=/y",
                 "--service_account_file=/z", "--local=false"]
    env = {"BENCH_LOG": log_path}
    p = Poller(s, ctfe, "dispatch", poll_interval="1ms", scripts=scripts, env=env,
               stderr=subprocess.DEVNULL)
    bare_env = s.base_env({"BENCH_LOG": bare_log, "CTFE_INTERNAL_URL": ctfe.url,
                           "TMPDIR": p.work})
    runs, ends = Tail(log_path), Tail(p.stdout_path)
    bare_runs = Tail(bare_log)
    lat, bare_lat, task_cpu_ns, task_wall, bare_cpu_ns = [], [], [], [], []
    seen = {}
    try:
        p.wait_ready()
        # Calibrate: what an empty poll costs at this interval.
        time.sleep(0.2)
        m0, c0, w0 = p.metrics(), sched_ns(p.pid), mono()
        time.sleep(cfg["dispatch_poll_calibration"])
        c1, w1, m1 = sched_ns(p.pid), mono(), p.metrics()
        cal_polls = metric_sum(m1, "ct_poller_polls_total") - metric_sum(m0, "ct_poller_polls_total")
        per_poll_ns = (c1 - c0) / cal_polls if cal_polls else 0.0
        poll_rate = cal_polls / (w1 - w0)

        def wait_line(tail, what, timeout=30.0):
            deadline = mono() + timeout
            while True:
                lines = tail.lines()
                if lines:
                    return lines
                if mono() > deadline:
                    raise Invariant(f"dispatch: timed out waiting for {what}")
                time.sleep(0.0005)

        first_exec = {}  # task id -> (exec time ns, run id) of its first run
        ended = set()  # run ids whose end block the poller printed

        def wait_for(cond, tail, parse, what):
            while not cond():
                for line in wait_line(tail, what):
                    parse(line)

        def parse_run(line):
            tid, ts, run = line.split()
            seen[tid] = seen.get(tid, 0) + 1
            first_exec.setdefault(tid, (int(ts.replace(".", "")) * 1000, run))

        def parse_end(line):
            if line.startswith("========== End of stdout"):
                ended.add(line.split()[-2])

        warmup = 5
        m_start = None
        for i in range(warmup + n):
            if i == warmup:
                m_start = p.metrics()
            # --- through the poller
            cpu_a, wall_a = sched_ns(p.pid), mono()
            t_before = now_ns()
            task_id = ctfe.enqueue(envelope("CaptureSkps"))
            t_visible = now_ns()
            tid = task_id.split(".")[1]
            wait_for(lambda: tid in first_exec, runs, parse_run, f"task {task_id} to run")
            ts_exec, run_id = first_exec[tid]
            # The poller printed the task's end block: it has finished with it.
            wait_for(lambda: run_id in ended, ends, parse_end, f"task {task_id} to end")
            cpu_b, wall_b = sched_ns(p.pid), mono()
            if i >= warmup:
                lat.append((ts_exec - t_visible) / 1e9)
                task_cpu_ns.append(cpu_b - cpu_a)
                task_wall.append(wall_b - wall_a)
                res.raw.setdefault("dispatch_enqueue_rtt", []).append((t_visible - t_before) / 1e9)
            time.sleep(random.uniform(0, 0.002))
            # --- bare posix_spawn of the same script, same run
            cpu_a = time.process_time_ns()
            t0 = now_ns()
            pid = os.posix_spawn(script, bare_argv, bare_env)
            os.waitpid(pid, 0)
            cpu_b = time.process_time_ns()
            line = wait_line(bare_runs, "the bare run")[-1]
            if i >= warmup:
                bare_lat.append((int(line.split()[1].replace(".", "")) * 1000 - t0) / 1e9)
                bare_cpu_ns.append(cpu_b - cpu_a)
            time.sleep(random.uniform(0, 0.002))
        m_end = p.metrics()
        time.sleep(0.05)
        zombies = p.zombies()
    finally:
        code = p.stop()
        ctfe.stop()
    polls = (metric_sum(m_end, "ct_poller_polls_total")
             - metric_sum(m_start, "ct_poller_polls_total"))
    finished = (metric_sum(m_end, "ct_poller_tasks_finished_total", outcome="succeeded")
                - metric_sum(m_start, "ct_poller_tasks_finished_total", outcome="succeeded"))
    unsuccessful = (metric_sum(m_end, "ct_poller_tasks_finished_total")
                    - metric_sum(m_start, "ct_poller_tasks_finished_total") - finished)
    gross = statistics.mean(task_cpu_ns) / 1e9
    # What the polls made while each task was in flight cost, at the calibrated rate.
    polling = per_poll_ns * poll_rate * statistics.mean(task_wall) / 1e9
    net = gross - polling
    bare_cpu = statistics.mean(bare_cpu_ns) / 1e9
    ml, mb = median(lat), median(bare_lat)
    res.raw["dispatch"] = dict(latency_s=lat, bare_latency_s=bare_lat, task_cpu_ns=task_cpu_ns,
                               bare_cpu_ns=bare_cpu_ns, per_poll_ns=per_poll_ns,
                               poll_rate=poll_rate, polls=polls, task_wall_s=task_wall)
    res.row("dispatch", f"median visible → exec, {n} tasks, 1 ms polls", fmt_ms(ml),
            "≤ 1.5x bare", ml <= 1.5 * mb,
            f"bare posix_spawn → exec {fmt_ms(mb)}: **{ml / mb:.2f}x**; "
            f"p90 {fmt_ms(sorted(lat)[int(len(lat) * 0.9)])}")
    res.row("dispatch", "poller CPU per task (net of its 1 ms polling)", fmt_us(net),
            "≤ 1.5x bare", net <= 1.5 * bare_cpu,
            f"bare spawn+wait CPU (harness) {fmt_us(bare_cpu)}: **{net / bare_cpu:.1f}x**; "
            f"gross {fmt_us(gross)}, one empty poll {fmt_us(per_poll_ns / 1e9)}, "
            f"{poll_rate:.0f} polls/s")
    ran_once = len(seen) == n + warmup and all(c == 1 for c in seen.values())
    res.check("dispatch", "every task ran exactly once", ran_once,
              f"{len(seen)} tasks (5 warm-up), max runs {max(seen.values()) if seen else 0}")
    res.check("dispatch", "every task finished and succeeded", finished >= n and not unsuccessful,
              f"{finished:.0f} succeeded (of {n}), {unsuccessful:.0f} did not")
    res.check("dispatch", "no zombie, clean exit", not zombies and code == 0,
              f"zombies {zombies}, exit {code}")


# --------------------------------------------------------------------------- 2. flood


def bench_flood(s, cfg, res):
    ctfe = DevCtfe(s, "flood-ctfe")
    scripts = s.dir("flood", "scripts")
    write_scripts(scripts, FLOOD_BODY)
    script = os.path.join(scripts, KIND_BY_NAME["CaptureSkps"][2])
    out = []
    try:
        for size in cfg["flood_sizes"]:
            for mode in cfg["flood_modes"]:
                name = f"flood-{mode}-{size >> 20}"
                log_path = os.path.join(s.dir(name), "times.log")
                env = {"BENCH_LOG": log_path, "BENCH_FLOOD": mode, "BENCH_BYTES": str(size)}
                p = Poller(s, ctfe, name, poll_interval="100ms", scripts=scripts, env=env,
                           stderr=subprocess.DEVNULL)
                try:
                    p.wait_ready()
                    base = p.status()
                    c0 = p.cpu()
                    task_id = ctfe.enqueue(envelope("CaptureSkps"))
                    times, ends = Tail(log_path), Tail(p.stdout_path)
                    deadline = mono() + 1800
                    lines, ended = [], False
                    while not (lines and ended):
                        lines += times.lines()
                        ended = ended or any(l.startswith("========== End of stdout")
                                             for l in ends.lines())
                        if mono() > deadline or p.proc.poll() is not None:
                            raise Invariant(f"flood {mode} {fmt_bytes(size)} did not finish")
                        time.sleep(0.02)
                    c1 = p.cpu()
                    st = p.status()
                    m = p.metrics()
                    ok = metric_sum(m, "ct_poller_tasks_finished_total", outcome="succeeded")
                finally:
                    code = p.stop()
                _id, t0, t1 = lines[-1].split()
                with_poller = float(t1) - float(t0)
                # The same script, same run, its output to /dev/null, then to a pipe that
                # `cat` drains (the floor of any reader).
                ref = {}
                for label, shell in (("devnull", '"$@" >/dev/null 2>&1'),
                                     ("pipe", '"$@" 2>&1 | cat >/dev/null')):
                    ref_log = os.path.join(s.dir(name), f"ref-{label}.log")
                    ref_env = s.base_env({"BENCH_LOG": ref_log, "BENCH_FLOOD": mode,
                                          "BENCH_BYTES": str(size), "BENCH_NO_MARK": "1"})
                    subprocess.run(["bash", "-c", shell, "flood-ref", script, "--task_id=0"],
                                   env=ref_env, check=True, stdin=subprocess.DEVNULL)
                    with open(ref_log) as f:
                        _i, r0, r1 = f.read().split()
                    ref[label] = float(r1) - float(r0)
                out.append(dict(mode=mode, size=size, with_poller=with_poller, ref=ref,
                                cpu=c1 - c0, hwm=st["VmHWM"], rss=st["VmRSS"],
                                base_rss=base["VmRSS"], ok=ok, code=code, task=task_id))
                log(f"flood {mode} {fmt_bytes(size)}: {with_poller:.2f} s with the poller, "
                    f"{ref['devnull']:.2f} s to /dev/null, peak RSS {fmt_bytes(st['VmHWM'])}")
    finally:
        ctfe.stop()
    res.raw["flood"] = out
    labels = {"stdout": "stdout, 100-byte lines", "stderr": "stderr, 100-byte lines",
              "nonl": "stdout, no newline"}
    for mode in cfg["flood_modes"]:
        rows = [r for r in out if r["mode"] == mode]
        side = ", ".join(f"{fmt_bytes(r['size'])}: {fmt_bytes(r['hwm'])}" for r in rows)
        biggest = rows[-1]
        res.row("flood", f"peak RSS (VmHWM), {labels[mode]}", fmt_bytes(biggest["hwm"]),
                "< 32 MiB, flat", all(r["hwm"] < 32 * MiB for r in rows), side)
        for r in rows:
            ratio = r["with_poller"] / r["ref"]["devnull"]
            mbps = r["size"] / MiB / r["with_poller"]
            res.row("flood", f"script run time, {labels[mode]}, {fmt_bytes(r['size'])}",
                    f"{r['with_poller']:.2f} s ({mbps:.0f} MiB/s)", "≤ 1.2x /dev/null",
                    ratio <= 1.2,
                    f"/dev/null {r['ref']['devnull']:.2f} s: **{ratio:.1f}x**; pipe to cat "
                    f"{r['ref']['pipe']:.2f} s; poller CPU {r['cpu']:.1f} s")
    res.check("flood", "every flood task succeeded, clean exit",
              all(r["ok"] == 1 and r["code"] == 0 for r in out),
              f"{sum(1 for r in out if r['ok'] == 1)}/{len(out)}")


# ---------------------------------------------------------------------------- 4. soak


def bench_soak(s, cfg, res):
    n, first = cfg["soak_tasks"], cfg["soak_first"]
    ctfe = DevCtfe(s, "soak-ctfe")
    scripts = s.dir("soak", "scripts")
    write_scripts(scripts, SOAK_BODY)
    log_path = os.path.join(s.dir("soak"), "runs.log")
    expected = {}  # "Kind.id" -> should fail
    t_enq = mono()
    for i in range(n):
        name = KINDS[i % len(KINDS)][0]
        task_id = ctfe.enqueue(envelope(name, ts_added=20190101000000 + i))
        expected[task_id] = int(task_id.split(".")[1]) % 10 == 0
    t_enq = mono() - t_enq
    n_fail = sum(expected.values())
    log(f"soak: enqueued {n} tasks in {t_enq:.1f} s ({n_fail} will fail)")
    p = Poller(s, ctfe, "soak", poll_interval="1ms", scripts=scripts,
               env={"BENCH_LOG": log_path}, stdout=subprocess.DEVNULL)
    write_patch_store(p.store)
    runs = Tail(log_path)
    counts, rss_trace, zombies_seen = {}, [], 0
    try:
        t0 = mono()
        p.wait_ready()
        c0 = p.cpu()
        deadline = t0 + max(120.0, n * 0.1)
        done = 0
        next_mark = first
        while done < n:
            for line in runs.lines():
                kind, tid, _run = line.split()
                key = f"{kind}.{tid}"
                counts[key] = counts.get(key, 0) + 1
                done += 1
            if done >= next_mark:
                st = p.status()
                rss_trace.append((done, st["VmRSS"], mono() - t0))
                next_mark += first
            if mono() > deadline or p.proc.poll() is not None:
                raise Invariant(f"soak: only {done} of {n} tasks ran before the deadline")
            time.sleep(0.05)
        # Every task ran; wait until the poller has finished and reported all of them.
        while True:
            m = p.metrics()
            finished = metric_sum(m, "ct_poller_tasks_finished_total")
            reports = metric_sum(m, "ct_poller_failure_reports_total")
            if finished >= n and reports >= n_fail:
                break
            if mono() > deadline:
                raise Invariant(f"soak: {finished:.0f} finished, {reports:.0f} reports")
            time.sleep(0.05)
        t1 = mono()
        c1 = p.cpu()
        time.sleep(1.0)
        counts_late = runs.lines()
        st_end = p.status()
        zombies = p.zombies()
        kids = children_of(p.pid)
        left = sorted(os.listdir(p.work))
        requests = ctfe.log()
        m = p.metrics()
    finally:
        code = p.stop()
        ctfe.stop()
    for line in counts_late:
        kind, tid, _run = line.split()
        counts[f"{kind}.{tid}"] = counts.get(f"{kind}.{tid}", 0) + 1
    # Failure reports per task: POSTs with "Failure":true in the dev CTFE's log.
    path_kind = {"/" + k[3]: k[0] for k in KINDS}
    reports = {}
    for r in requests:
        if r["method"] != "POST" or r["path"] not in path_kind:
            continue
        try:
            body = json.loads(r["body"])
        except ValueError:
            continue
        if body.get("Failure") is True:
            key = f"{path_kind[r['path']]}.{body['Id']}"
            reports[key] = reports.get(key, 0) + 1
    rss_first = rss_trace[0][1] if rss_trace else 0
    rate = n / (t1 - t0)
    res.raw["soak"] = dict(tasks=n, failing=n_fail, seconds=t1 - t0, cpu_s=c1 - c0,
                           rss_trace=rss_trace, rss_end=st_end["VmRSS"],
                           hwm=st_end["VmHWM"], polls={l.get("result"): v for l, v in
                                                     m.get("ct_poller_polls_total", [])})
    kinds_seen = {k.split(".")[0] for k in counts}
    res.row("soak", f"throughput, {n} tasks of {len(kinds_seen)} kinds, 16 at once, 1 ms polls",
            f"{rate:.0f} tasks/s", "report", None,
            f"{t1 - t0:.1f} s; poller CPU {(c1 - c0) / n * 1e3:.2f} ms/task")
    drift = st_end["VmRSS"] - rss_first
    res.row("soak", f"RSS at the end − RSS after the first {first}",
            f"{drift / MiB:+.2f} MiB", "within ±1 MiB", abs(drift) <= MiB,
            f"{fmt_bytes(rss_first)} → {fmt_bytes(st_end['VmRSS'])}; peak "
            f"{fmt_bytes(st_end['VmHWM'])}; every {first}: "
            + " ".join(f"{v / MiB:.1f}" for _d, v, _t in rss_trace))
    missing = [k for k in expected if counts.get(k, 0) == 0]
    twice = [k for k, c in counts.items() if c > 1]
    unknown = [k for k in counts if k not in expected]
    res.check("soak", "every task run exactly once", not missing and not twice and not unknown,
              f"{len(counts)} run, {len(missing)} never, {len(twice)} more than once")
    bad_reports = [k for k, fail in expected.items() if reports.get(k, 0) != (1 if fail else 0)]
    res.check("soak", f"every failure reported exactly once ({n_fail} failing)",
              not bad_reports, f"{sum(reports.values())} reports, {len(bad_reports)} tasks wrong")
    res.check("soak", "no file left in the work dir", not left, f"{len(left)} files {left[:3]}")
    res.check("soak", "no zombie, no child left", not zombies and not kids,
              f"{len(zombies)} zombies, {len(kids)} children")
    outcome = {}
    for labels, v in m.get("ct_poller_tasks_finished_total", []):
        outcome[labels.get("outcome")] = outcome.get(labels.get("outcome"), 0) + v
    ok_reports = metric_sum(m, "ct_poller_failure_reports_total", result="ok")
    res.check("soak", "metrics: succeeded/failed/reported agree",
              outcome.get("succeeded", 0) == n - n_fail and outcome.get("failed", 0) == n_fail
              and ok_reports == n_fail,
              f"succeeded {outcome.get('succeeded', 0):.0f}, failed {outcome.get('failed', 0):.0f},"
              f" reports ok {ok_reports:.0f}")
    res.check("soak", "clean exit", code == 0, f"exit {code}")


# ------------------------------------------------------------------------------ main


def default_binary():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
    return os.path.join(target, "release", "ct-poller")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default=None,
                    help="ct-poller to measure (default: $CARGO_TARGET_DIR or target, release)")
    ap.add_argument("--smoke", action="store_true", help="the ~10 s CI version")
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHMARKS))
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for debugging")
    ap.add_argument("--poller-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment of the poller (experiments, e.g. MALLOC_ARENA_MAX=1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a size (e.g. idle_seconds=10, soak_tasks=2000); see FULL")
    args = ap.parse_args()
    binary = os.path.abspath(args.binary or default_binary())
    if not os.access(binary, os.X_OK):
        print(f"bench: no executable {binary} (build it, or pass --binary)", file=sys.stderr)
        return 2
    only = [b.strip() for b in args.only.split(",") if b.strip()] or BENCHMARKS
    unknown = [b for b in only if b not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    if not os.path.isdir(FIXTURES):
        print(f"bench: {FIXTURES} is missing (the envelopes come from it)", file=sys.stderr)
        return 2
    cfg = dict(SMOKE if args.smoke else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            print(f"bench: unknown size {key!r}; choose from {sorted(cfg)}", file=sys.stderr)
            return 2
        cfg[key] = json.loads(value)
    res = Results()
    session = Session(binary, keep=args.keep)
    session.poller_env = dict(item.partition("=")[::2] for item in args.poller_env)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = mono()
    funcs = dict(startstop=bench_startstop, idle=bench_idle, dispatch=bench_dispatch,
                 flood=bench_flood, soak=bench_soak)
    interrupted = False
    try:
        for name in BENCHMARKS:
            if name not in only:
                continue
            log(f"{name}…")
            t = mono()
            try:
                funcs[name](session, cfg, res)
            except Invariant as e:
                res.check(name, "ran to the end", False, str(e))
            log(f"{name} took {mono() - t:.1f} s")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        session.cleanup()
    left = session.leftovers()
    if left:
        res.check("all", "no process left behind", False, f"pids {left}")
    elapsed = mono() - started
    print(f"\nct-poller benchmarks ({'smoke' if args.smoke else 'full'}), {binary}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {elapsed:.1f} s\n")
    print(res.table())
    print("\nPoller stdout (each task's output block) and stderr (logs: every worker line is "
          "also formatted as a log line) go to /dev/null or a file; CPU and memory are the "
          "poller process's own (/proc/PID/stat, /proc/PID/status).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(raw=res.raw, rows=res.rows, failures=res.failures, binary=binary,
                           smoke=args.smoke, seconds=elapsed), f, indent=1, default=str)
    if interrupted:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    if res.failures:
        print("\ncorrectness invariants failed:\n  " + "\n  ".join(res.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
