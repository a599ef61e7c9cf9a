#!/usr/bin/env bash
# Port B throughput: two nodes share one image; fio's nbd engine runs the same job against the
# owner (direct) and against the other node (every request proxied through its port B), REPS
# times, and prints each figure and the ratio port B ÷ direct.
# Knobs: RW (randwrite), BS (4k), QD (32), RUNTIME (6 s), REPS (2), SIZE_MIB (256).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(mktemp -d /tmp/nbdstack-port-b-XXXXXX)
trap 'kill -INT $A $B 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
truncate -s "${SIZE_MIB:-256}M" "$DIR/disk.img"
start() { # id listen control
  node "$ROOT/dist/cli.js" serve "$DIR/disk.img" --name disk --listen "127.0.0.1:$2" --node-id "$1" --control "127.0.0.1:$3" --log-level warn >"$DIR/$1.out" 2>"$DIR/$1.err" &
}
start a 20909 29911; A=$!; sleep 1
start b 20910 29912; B=$!; sleep 1.5
run() { # port -> IOPS (or MiB/s for 1M blocks)
  fio --name=j --ioengine=nbd --uri="nbd://127.0.0.1:$1/disk" --rw="${RW:-randwrite}" --bs="${BS:-4k}" --iodepth="${QD:-32}" \
    --size=128m --time_based --runtime="${RUNTIME:-6}" --output-format=json >"$DIR/fio.json" 2>/dev/null
  python3 -c "import json; t=open('$DIR/fio.json').read(); j=json.loads(t[t.index('{'):])['jobs'][0]; print(round(j['read']['iops']+j['write']['iops']))"
}
echo "port B vs direct: ${RW:-randwrite} ${BS:-4k} QD${QD:-32}, ${RUNTIME:-6} s per run (IOPS)"
for i in $(seq 1 "${REPS:-2}"); do
  d=$(run 20909); p=$(run 20910)
  python3 -c "print(f'run $i: direct $d  port B $p  ratio {$p/$d:.2f}')"
done
