#!/usr/bin/env bash
# A/B of two server command lines on one image: both serve the same file (taking turns, so the page
# cache holds it once), fio's nbd engine runs the same job against each in alternation ROUNDS times,
# and the medians of throughput and of server CPU per request (user + system time from /proc, own
# and reaped children's, over the run ÷ requests) are printed. CPU per request is the steadier
# figure on a 2-CPU machine whose client shares the CPUs.
#
#   bash bench/ab.sh 'node /old/dist/cli.js serve %IMG% --name "" --listen 127.0.0.1:%PORT%' \
#                    'node dist/cli.js serve %IMG% --name "" --listen 127.0.0.1:%PORT%'
#
# %IMG% is the image (a 1 GiB random file made once, or $IMG), %PORT% a free port. The export must
# be the default (""). Knobs: RW (randwrite), BS (4k), QD (32), ROUNDS (6), SECS (3).
set -euo pipefail
A=$1 B=$2
RW=${RW:-randwrite} BS=${BS:-4k} QD=${QD:-32} ROUNDS=${ROUNDS:-6} SECS=${SECS:-3}
dir=$(mktemp -d /tmp/nbdstack-ab-XXXXXX)
IMG=${IMG:-$dir/ab.img}
[[ -f $IMG ]] || dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
start() { # $1 command template, $2 port
  local cmd=${1//%IMG%/$IMG}
  cmd=${cmd//%PORT%/$2}
  bash -c "exec $cmd" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do nbdinfo --size "nbd://127.0.0.1:$2/" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not start: $cmd" >&2
  exit 1
}
start "$A" 10950
start "$B" 10951
cpu() { awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] + f[14] + f[15] }' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
  for side in 0 1; do
    pid=${pids[$side]} port=$((10950 + side))
    sync
    c0=$(cpu "$pid")
    out=$(fio --name=ab --ioengine=nbd --uri="nbd://127.0.0.1:$port/" --rw="$RW" --bs="$BS" --iodepth="$QD" \
      --runtime="$SECS" --time_based --output-format=json 2>/dev/null | sed -n '/^{/,$p')
    c1=$(cpu "$pid")
    echo "$out" | python3 -c "
import json, sys
j = json.load(sys.stdin)['jobs'][0]
ios = j['read']['total_ios'] + j['write']['total_ios']
mib = (j['read']['bw_bytes'] + j['write']['bw_bytes']) / 2**20
print('AB'[$side], j['read']['iops'] + j['write']['iops'], mib, ($c1 - $c0) / $tick * 1e6 / max(ios, 1))"
  done
done | python3 -c "
import sys, statistics as st
rows = {}
for line in sys.stdin:
    side, iops, mib, cpu = line.split()
    rows.setdefault(side, []).append((float(iops), float(mib), float(cpu)))
print('$RW $BS QD$QD, $ROUNDS rounds of $SECS s, medians')
for side in 'AB':
    v = rows[side]
    print(f'{side}: IOPS {st.median(x[0] for x in v):.0f}  MiB/s {st.median(x[1] for x in v):.0f}  server CPU {st.median(x[2] for x in v):.1f} µs/request  (each run: {\", \".join(f\"{x[2]:.1f}\" for x in v)})')
"
