#!/usr/bin/env bash
# Device call (2026-12-02, after merging issue 15 items 2/5): the fusion GPU suite with the cudarc
# tensor test, and the graph-captured decode example on the GPU.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
ARFUSE_REQUIRE_BACKENDS=cuda timeout 200 ./arfuse-fusion-gpu cuda:: --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
timeout 120 ./03-graph-decode cuda > $R/03-graph-decode.txt 2>&1; echo "rc=$?" >> $R/03-graph-decode.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
grep -h "^test \|test result\|panicked\|FAILED" $R/fusion-gpu.txt | head -30; tail -1 $R/fusion-gpu.txt
tail -15 $R/03-graph-decode.txt
