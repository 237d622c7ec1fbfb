#!/usr/bin/env bash
# The benchmark smoke run for CI (about 10 seconds): bench/run.py --smoke against an
# already built ct-poller, so that the bench script cannot rot. It never builds: CI's
# tests have built target/debug/ct-poller; the newest of the debug and release binaries
# under $CARGO_TARGET_DIR (or target/) is used, or $CT_POLLER_BIN when set.
# Exit status: 0, or 1 when a correctness invariant failed (speed targets never fail it),
# 2 when no binary is found.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${CT_POLLER_BIN:-}"
if [ -z "$bin" ]; then
  target="${CARGO_TARGET_DIR:-target}"
  for candidate in "$target/debug/ct-poller" "$target/release/ct-poller"; do
    if [ -x "$candidate" ] && { [ -z "$bin" ] || [ "$candidate" -nt "$bin" ]; }; then
      bin="$candidate"
    fi
  done
fi
if [ -z "$bin" ]; then
  echo "bench/smoke.sh: no built ct-poller under ${CARGO_TARGET_DIR:-target}/{debug,release}" \
    "(build it first, or set CT_POLLER_BIN)" >&2
  exit 2
fi
command -v python3 >/dev/null || { echo "bench/smoke.sh: python3 is required" >&2; exit 2; }
exec python3 bench/run.py --smoke --binary "$bin" "$@"
