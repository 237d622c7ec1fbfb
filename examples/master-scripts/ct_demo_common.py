"""Shared body of the demo's sample master scripts.

A real CT master script marks its task started through CTFE's update endpoint, runs the
work on Swarming bots, then marks it completed. These samples do the same against the
development CTFE (its URL comes from CTFE_INTERNAL_URL, which ct-poller sets for every
child), reading the run files from $TMPDIR, and simulate a few seconds of work.
"""
import datetime
import glob
import json
import os
import sys
import time
import urllib.request


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S")


def _flags(argv):
    flags = {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            flags[name] = value
    return flags


def _update(path, body):
    url = os.environ.get("CTFE_INTERNAL_URL", "http://ctfe:9000/").rstrip("/") + "/" + path
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main(update_path, seconds=3, fail=None):
    flags = _flags(sys.argv[1:])
    task_id, run_id = int(flags.get("task_id", "0")), flags.get("run_id", "")
    name = os.path.basename(sys.argv[0])
    print(f"{name}: task {task_id}, run {run_id}", flush=True)
    for path in sorted(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), glob.escape(run_id) + ".*"))):
        print(f"  run file {os.path.basename(path)}: {os.path.getsize(path)} bytes", flush=True)
    if fail:
        # Fail before marking the task started, as a flag or set-up error would: the
        # poller then reports the failure to CTFE.
        print(f"{name}: {fail}", file=sys.stderr, flush=True)
        sys.exit(1)
    _update(update_path, {"Id": task_id, "TsStarted": _now()})
    steps = max(1, int(seconds * 2))
    for step in range(1, steps + 1):
        time.sleep(0.5)
        print(f"  {name}: {step * 100 // steps}% of pages done", flush=True)
    _update(update_path, {"Id": task_id, "TsCompleted": _now(), "TaskDone": True, "Failure": False})
    print(f"{name}: done", flush=True)
