#!/usr/bin/env bash
# Device call 5 (2026-12-03): the local row kernels at four packs a thread (no block needs a whole
# multiprocessor while peers spin). Prefill and decode timings, the back-to-back test once, the
# fusion graph and every-path tests (a first run of this script was lost with the machine, and
# with it the device time for the whole fusion suite).
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
run 60 prefill ./arfuse-bench --world 2 --repeats 5 --modes prefill --prefill-tokens 8192 --hidden 4096 --no-large --json $R/prefill.json
run 60 decode ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64 --hidden 4096,8192 --no-large --json $R/decode.json
for i in 1; do
  echo "== kernels-gpu thousand $i $(date -u +%T)"
  RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 40 ./arfuse-kernels-gpu cuda::thousand_back_to_back cuda::every_call_with --test-threads=1 --nocapture > $R/kernels-$i.txt 2>&1; echo "rc=$?" >> $R/kernels-$i.txt
done
echo "== fusion-gpu $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 70 ./arfuse-fusion-gpu graphs_of_every_path_replay_with_nothing_registered operator_every_path --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in kernels-1 fusion-gpu; do echo "-- $f"; grep -h "panicked\|^test \|test result\|error word" $R/$f.txt | cut -c1-200 | head -16; tail -1 $R/$f.txt; done
for f in prefill decode; do echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | cut -c1-150 | head -10; grep -i "error\|timeout\|mismatch\|differ" $R/$f.md | head -2 | cut -c1-200; done
