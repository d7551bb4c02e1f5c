#!/usr/bin/env bash
# Device call 1 (2026-12-03): the pushed 2-stage paths (no staging copy, no peer reads, nothing
# registered). Prefill and mid-band 2-stage timings of the previous main (d44a6c0, staged) and of
# this tree in the same run, then the GPU suites on this tree.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
P="--world 2 --repeats 5 --modes prefill --prefill-tokens 8192 --hidden 4096 --no-large"
M8="--world 8 --repeats 10 --modes prefill --prefill-tokens 128,512 --hidden 4096 --no-large"
run 60 prefill-base ./arfuse-bench-base $P --json $R/prefill-base.json
run 60 prefill-new ./arfuse-bench $P --json $R/prefill-new.json
run 60 mid8-base ./arfuse-bench-base $M8 --json $R/mid8-base.json
run 60 mid8-new ./arfuse-bench $M8 --json $R/mid8-new.json
echo "== kernels-gpu $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 220 ./arfuse-kernels-gpu cuda:: --test-threads=1 --nocapture > $R/kernels-gpu.txt 2>&1; echo "rc=$?" >> $R/kernels-gpu.txt
echo "== fusion-gpu $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 170 ./arfuse-fusion-gpu graph operator_every_path a_dead_rank --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in kernels-gpu fusion-gpu; do echo "-- $f"; grep -h "^test \|test result\|panicked" $R/$f.txt | cut -c1-160 | head -12; tail -1 $R/$f.txt; done
for f in prefill-base prefill-new mid8-base mid8-new; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | cut -c1-150 | head -6; grep -i "error\|timeout\|mismatch\|differ" $R/$f.md | head -2 | cut -c1-200
done
