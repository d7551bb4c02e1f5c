#!/usr/bin/env bash
# Device call 5: the whole fusion GPU suite on main's head (the epilogue in every call header,
# the separate quantisation kernel, the shared per-group/per-token code of the FP8 epilogue).
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
ARFUSE_REQUIRE_BACKENDS=cuda timeout 380 ./arfuse-fusion-gpu cuda:: --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
grep -h "^test \|test result\|panicked" $R/fusion-gpu.txt | cut -c1-220 | head -20; tail -1 $R/fusion-gpu.txt
