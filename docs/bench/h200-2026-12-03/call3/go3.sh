#!/usr/bin/env bash
# Device call 3 (2026-12-03): does every call advance the device epoch once? (the graph test's
# mismatches in calls 1 and 2 look like a lost epoch), then the failing tests again.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
echo "== kernels-gpu epoch $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 60 ./arfuse-kernels-gpu cuda::every_call_with_the_device_epoch_advances_it_once --test-threads=1 --nocapture > $R/kernels-epoch.txt 2>&1; echo "rc=$?" >> $R/kernels-epoch.txt
echo "== kernels-gpu thousand $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 60 ./arfuse-kernels-gpu cuda::thousand_back_to_back --test-threads=1 --nocapture > $R/kernels-thousand.txt 2>&1; echo "rc=$?" >> $R/kernels-thousand.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in kernels-epoch kernels-thousand; do echo "-- $f"; grep -h "panicked\|^test \|test result\|assert\|left\|right\|rank\|world" $R/$f.txt | cut -c1-400 | head -14; tail -1 $R/$f.txt; done
