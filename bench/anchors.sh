#!/usr/bin/env bash
# npm run bench:anchors — nbdstack as one more row of the shared anchor harness, against nbdkit
# (file plugin) and qemu-nbd, in one run, on the
# same 1 GiB random image, with the shared anchor harness (../shared/bench/run-anchors.sh):
# fio's nbd engine (1 MiB seq read/write QD8, 4 KiB rand read/write QD32, 70/30 mix QD16,
# 4 KiB QD1 latency) and nbdcopy, servers interleaved, medians of REPS runs. Then prints the ratio
# nbdstack/peer for every workload.
#
# Knobs (environment): SERVERS (default "nbdkit-file qemu-nbd nbdstack"), WORKLOADS, REPS (3),
# RUNTIME (10 s), NBDCOPY_VARIANTS, NBDSTACK_ARGS (extra `serve` flags, e.g. "--io async"),
# ANCHORS (path of run-anchors.sh), OUTDIR.
set -euo pipefail
source "$(dirname "$0")/knobs.sh" "$@"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$ROOT/../shared/bench/run-anchors.sh}
[[ -f $ANCHORS ]] || { echo "bench:anchors needs the anchor harness at $ANCHORS (set ANCHORS=)" >&2; exit 1; }
[[ -f $ROOT/dist/cli.js ]] || (cd "$ROOT" && npm run build)
export OUTDIR=${OUTDIR:-${TMPDIR:-/tmp}/nbd-anchors/results/nbdstack-$(date +%Y%m%d-%H%M%S)}
export SERVERS=${SERVERS:-"nbdkit-file qemu-nbd nbdstack"}
export EXTRA_NAME=nbdstack EXTRA_PORT=${EXTRA_PORT:-10815}
# Through its shebang line, as the nbdstack command runs (env execs node: the pid stays the server's).
export EXTRA_SERVER="$ROOT/dist/cli.js serve --listen 127.0.0.1:$EXTRA_PORT --log-level warn ${NBDSTACK_ARGS:-} %IMG%"
bash "$ANCHORS"
node "$ROOT/bench/ratios.mjs" "$OUTDIR/summary.tsv" nbdstack
