#!/usr/bin/env bash
# Device call 2 (2026-12-03): the graph test that failed at world 4 in call 1, now with the
# mismatch record (the header a kernel read and the one it expected, described by `check`), and
# the kernels' conformance suite with time to finish.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
echo "== fusion-gpu graphs $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 100 ./arfuse-fusion-gpu cuda::graphs_of_every_path_replay_with_nothing_registered --exact --test-threads=1 --nocapture > $R/fusion-graphs.txt 2>&1; echo "rc=$?" >> $R/fusion-graphs.txt
echo "== kernels-gpu conformance $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 290 ./arfuse-kernels-gpu cuda::kernels_match_the_cpu_backend cuda::thousand_back_to_back --test-threads=1 --nocapture > $R/kernels-gpu.txt 2>&1; echo "rc=$?" >> $R/kernels-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- fusion-graphs"; grep -h "panicked\|rank . panicked\|^test \|test result" $R/fusion-graphs.txt | cut -c1-600 | head -14; tail -1 $R/fusion-graphs.txt
echo "-- kernels-gpu"; grep -h "^test \|test result\|panicked\|FAILED\|^ *[2-8]  \|total\|differ" $R/kernels-gpu.txt | cut -c1-200 | head -24; tail -1 $R/kernels-gpu.txt
