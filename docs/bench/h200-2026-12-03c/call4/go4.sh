#!/usr/bin/env bash
# Device call 4 (2026-12-03 evening): the GPU suites on the committed tree (f0f8149): the kernels
# conformance (worlds 2/3/4/6/8 x bf16/f16), back-to-back, lagging rank, mismatch, device epoch,
# graph replay, stalled peer; then the whole fusion GPU suite.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
echo "== kernels-gpu $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 300 ./arfuse-kernels-gpu cuda:: --test-threads=1 > $R/kernels-gpu.txt 2>&1; echo "rc=$?" >> $R/kernels-gpu.txt
echo "== fusion-gpu $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 230 ./arfuse-fusion-gpu cuda:: --test-threads=1 > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in kernels-gpu fusion-gpu; do echo "-- $f $(tail -1 $R/$f.txt)"; grep -h "^test \|test result\|panicked" $R/$f.txt | cut -c1-150 | head -24; done
