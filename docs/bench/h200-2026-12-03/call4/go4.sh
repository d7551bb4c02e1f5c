#!/usr/bin/env bash
# Device call 4 (2026-12-03): the graph and back-to-back tests with no host copy while a peer's
# kernel spins (the ranks meet after uploading), each run three/two times; a rank keeps its first
# failure in its error word now.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
for i in 1 2 3; do
  echo "== fusion-gpu graphs $i $(date -u +%T)"
  RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 60 ./arfuse-fusion-gpu cuda::graphs_of_every_path_replay_with_nothing_registered --exact --test-threads=1 --nocapture > $R/fusion-graphs-$i.txt 2>&1; echo "rc=$?" >> $R/fusion-graphs-$i.txt
done
for i in 1 2; do
  echo "== kernels-gpu thousand $i $(date -u +%T)"
  RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 40 ./arfuse-kernels-gpu cuda::thousand_back_to_back --test-threads=1 --nocapture > $R/kernels-thousand-$i.txt 2>&1; echo "rc=$?" >> $R/kernels-thousand-$i.txt
done
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in fusion-graphs-1 fusion-graphs-2 fusion-graphs-3 kernels-thousand-1 kernels-thousand-2; do echo "-- $f"; grep -h "panicked\|test result\|error word" $R/$f.txt | cut -c1-500 | head -6; tail -1 $R/$f.txt; done
