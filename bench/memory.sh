#!/bin/bash
# npm run bench:memory — the server's resident memory at rest and its peak (VmHWM) after nbdcopy
# of a 1 GiB image to null:, fio 4 KiB random reads at QD32, 1 MiB sequential reads at QD8, then
# 4 KiB random writes at QD32 (each change of request size lets the last size's free buffers go),
# one server started as the nbdstack command starts (its shebang's Node.js options), one 1 GiB
# random image. Knobs: MAX_MEMORY (the server's --max-memory; default: the server's default),
# RUNTIME (3 s per fio run). Needs nbdcopy and fio.
set -euo pipefail
source "$(dirname "$0")/knobs.sh" "$@"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLI="$ROOT/dist/cli.js"
STARTS_AS=$(head -1 "$CLI" | sed -n 's|^#!/usr/bin/env -S ||p')
DIR=$(mktemp -d /tmp/nbdstack-memory-XXXXXX)
trap 'kill $P 2>/dev/null; wait $P 2>/dev/null; rm -rf "$DIR"' EXIT
head -c $((1024 * 1024 * 1024)) /dev/urandom > "$DIR/img"
PORT=10831
# Through its shebang line, as the nbdstack command runs (env execs node: $! is the server's pid).
"$CLI" serve "$DIR/img" --name '' -l 127.0.0.1:$PORT --log-level warn ${MAX_MEMORY:+--max-memory $MAX_MEMORY} >/dev/null & P=$!
for _ in $(seq 100); do nbdinfo --size nbd://127.0.0.1:$PORT >/dev/null 2>&1 && break; sleep 0.1; done
mem() { awk '/VmHWM|VmRSS|RssAnon|RssFile/{printf "%s %d MiB  ", $1, $2/1024}' /proc/$P/status; echo; }
fio_run() { fio --name=m --ioengine=nbd --uri=nbd://127.0.0.1:$PORT --rw="$1" --bs="$2" --iodepth="$3" --time_based --runtime="${RUNTIME:-3}" --size=1g --output-format=terse >/dev/null; }
echo "nbdstack ($STARTS_AS), --max-memory ${MAX_MEMORY:-default}"
echo -n "at rest:           "; mem
s=$(date +%s%N); nbdcopy nbd://127.0.0.1:$PORT null:; e=$(date +%s%N)
echo -n "after nbdcopy:     "; mem; echo "  nbdcopy: $(( 1024 * 1000000000 / (e - s) )) MiB/s"
fio_run randread 4k 32; echo -n "after 4K QD32:     "; mem
fio_run read 1M 8; echo -n "after 1M QD8:      "; mem
fio_run randwrite 4k 32; echo -n "after 4K writes:   "; mem
