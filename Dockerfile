# syntax=docker/dockerfile:1
#
# ct-poller: the Cluster Telemetry poller daemon.
#
#   docker build -t ct-poller:dev .
#   docker run --rm -p 20000:20000 ct-poller:dev --help
#
# This image holds the poller only. The CT master scripts (run_chromium_perf_on_workers,
# capture_skps_on_workers, ...) are not part of this repository. The image that runs in
# production, `ct-master`, adds them in one of two ways (docs/deployment.md has both):
#
#   1. A derived image (what the Go poller's ct-master image did):
#        FROM ct-poller:<tag>
#        USER root
#        RUN apt-get update && apt-get install -y --no-install-recommends <script deps> ...
#        COPY master-scripts/ /usr/local/bin/
#        USER 2000:2000
#      With --scripts-dir unset the poller looks the scripts up on PATH, which holds
#      /usr/local/bin; or set `scripts_dir = "/usr/local/bin"` explicitly.
#   2. A shared volume: an init container of the master-scripts image copies them into an
#      emptyDir mounted in this container, and `--scripts-dir` (TOML `scripts_dir`) points
#      at that directory (deploy/kubernetes/overlays/scripts-volume shows it).
#
# Build args: RUST_VERSION pins the build toolchain (the project is tested with 1.95;
# Cargo.toml's rust-version is the floor). Build and runtime stages use the same Debian
# release, so the binary's glibc matches.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

############################################################################
# Build stage: full Rust toolchain, never shipped.
############################################################################
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build

WORKDIR /src

# Dependency caching: build every dependency against a dummy main.rs first, so this
# layer is reused as long as Cargo.toml and Cargo.lock do not change. --locked makes the
# build fail instead of silently updating Cargo.lock.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked \
    && rm -rf src target/release/ct-poller target/release/deps/ct_poller-* \
       target/release/.fingerprint/ct-poller-*

# The real build. The whole context is copied (minus .dockerignore) because the binary
# embeds files from outside src/ (the demo's examples/master-scripts/). The dummy's
# artifacts for this crate were removed above and the sources are touched, so cargo
# never mistakes the dummy binary for a fresh build of the real one.
COPY . .
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked \
    && install -D -m 0755 target/release/ct-poller /out/ct-poller

############################################################################
# Runtime stage: slim Debian, no compiler, no cargo.
############################################################################
FROM debian:${DEBIAN_RELEASE}-slim

# ca-certificates: the poller itself uses rustls with built-in (webpki) roots, but git
#   and the master scripts need the system CA bundle.
# git: the master scripts check out and patch Chromium/Skia sources.
# tini: PID 1. The poller reaps its own children (the master scripts, each in its own
#   process group), but a master script that dies leaves its children re-parented to
#   PID 1; tini reaps those orphaned grandchildren so no zombie accumulates in a pod that
#   runs for months, and it forwards SIGTERM to the poller, which then drains.
# Versions are not pinned: the runtime follows the Debian release's security updates,
# and pinned versions of a stable release stop resolving after each point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git tini \
    && rm -rf /var/lib/apt/lists/*

# User skia, uid/gid 2000, as in the Go poller's ct-master image. /b/storage is the
# master scripts' storage directory (owned by skia, as before). In Kubernetes the root
# filesystem is read-only and /tmp, /home/skia and /b/storage are emptyDir volumes.
RUN groupadd --gid 2000 skia \
    && useradd --uid 2000 --gid 2000 --create-home --home-dir /home/skia \
       --shell /bin/bash skia \
    && install -d -o skia -g skia -m 0755 /b/storage \
    && install -d -m 0755 /etc/ct-poller

COPY --from=build /out/ct-poller /usr/local/bin/ct-poller

LABEL org.opencontainers.image.title="ct-poller" \
      org.opencontainers.image.description="Cluster Telemetry poller: polls CTFE for pending tasks and runs their master scripts" \
      org.opencontainers.image.licenses="BSD-3-Clause"

# Numeric, so that Kubernetes' runAsNonRoot can verify it without resolving a name.
USER 2000:2000
WORKDIR /home/skia
ENV HOME=/home/skia

# /metrics, /healthz, /readyz, / (status page), /api/status (--metrics-addr).
EXPOSE 20000

# No Docker HEALTHCHECK: Kubernetes ignores it and probes /healthz (liveness) and
# /readyz (readiness) itself (deploy/kubernetes/base/deployment.yaml), and an HTTP check
# from inside the container would need curl or wget in the image just for that.
HEALTHCHECK NONE

# tini as PID 1 in front of the poller (see above); arguments given to the container
# (Kubernetes `args`, `docker run IMAGE ARGS`) are passed to ct-poller, e.g.
# `--config=/etc/ct-poller/ct-poller.toml`. No CMD: setting ENTRYPOINT clears the
# base image's CMD, so no arguments means `ct-poller` = the daemon with its defaults.
# The issue's `ENTRYPOINT ["/usr/local/bin/ct-poller"]` is kept as the program tini runs.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/ct-poller"]
