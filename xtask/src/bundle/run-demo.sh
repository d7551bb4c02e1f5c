#!/usr/bin/env bash
# Runs arfuse-demo on this machine's GPUs and checks its dumps (written by `cargo xtask bundle`).
# Arguments go to arfuse-demo (default backend `auto`: cuda if a CUDA device works, else hip,
# else cpu; it says which on stderr).
#
#   ./run-demo.sh --backend cuda --world 4
#
# Results land in $OUT (or ./results): demo.txt (the table) and demo-dump/ (every rank's inputs
# and outputs), then `arfuse-demo --verify-dump` checks every file against the reference.
set -eu
cd "$(dirname "$0")"
out=${OUT:-results}
mkdir -p "$out"
. ./nvrtc.sh
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "date: $(date -u +%FT%TZ)"
rm -rf "$out/demo-dump"
./arfuse-demo --dump "$out/demo-dump" "$@" | tee "$out/demo.txt"
./arfuse-demo --verify-dump "$out/demo-dump" | tee -a "$out/demo.txt"
