#!/usr/bin/env bash
# Runs arfuse-bench, then the peers on the same shapes, and prints the merged table
# (written by `cargo xtask bundle`). Arguments go to arfuse-bench.
#
#   ./run-bench.sh --world 2 --repeats 20
#
# Results land in $OUT (or ./results): arfuse.json, peers.json, arfuse.md, merged.md, and the SVG
# plots arfuse-decode.svg / arfuse-prefill.svg (redrawn with the peers' lines when they ran).
set -eu
cd "$(dirname "$0")"
out=${OUT:-results}
mkdir -p "$out"
. ./nvrtc.sh
./arfuse-bench --json "$out/arfuse.json" "$@" | tee "$out/arfuse.md"
if python3 -c 'import torch' 2>/dev/null; then
  python3 peers/peers.py --arfuse "$out/arfuse.json" --json "$out/peers.json" | tee "$out/merged.md"
  ./arfuse-bench --plot "$out/arfuse.json" --peers "$out/peers.json"
else
  echo "peers skipped: no PyTorch on this machine"
fi
