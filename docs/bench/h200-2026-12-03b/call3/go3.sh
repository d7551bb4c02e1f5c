#!/usr/bin/env bash
# Device call 3 (2026-12-03 PM): the whole fusion GPU suite on the final kernels, then prefill and
# rotating-input decode at P=2.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
echo "== fusion-gpu $(date -u +%T)"
RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 300 ./arfuse-fusion-gpu cuda:: --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
run 60 prefill ./arfuse-bench --world 2 --repeats 5 --modes prefill --prefill-tokens 8192 --hidden 4096 --no-large --json $R/prefill.json
run 90 rot2 ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --no-large --json $R/rot2.json
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- fusion-gpu $(tail -1 $R/fusion-gpu.txt)"; grep -h "^test \|test result\|panicked" $R/fusion-gpu.txt | cut -c1-160 | head -14
for f in prefill rot2; do echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | cut -c1-110 | head -12; grep -i "error\|timeout\|mismatch\|differ" $R/$f.md | head -2 | cut -c1-200; done
