#!/usr/bin/env bash
# Device call 3 (2026-12-02): main with issue 15 items 2/5 and issue 17 merged. The fusion GPU
# suite (cudarc tensors, epilogues), the cudarc test without the early start, the bench (plain and
# FP8 out), the FP8 demo dump, and the 8-rank early-start question last (it may hang).
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
B="./arfuse-bench --repeats 20 --modes decode --no-large"
W2="--world 2 --decode-tokens 1,16,64,80,128 --hidden 4096,8192"
run 90 w2 $B $W2 --json $R/w2.json
run 90 w2-hot $B $W2 --input-sets 1 --json $R/w2-hot.json
run 60 w4 $B --world 4 --decode-tokens 1,16 --hidden 4096 --json $R/w4.json
run 60 w8 $B --world 8 --decode-tokens 1,16 --hidden 4096 --json $R/w8.json
run 60 prefill ./arfuse-bench --world 2 --repeats 5 --modes prefill --prefill-tokens 8192 --hidden 4096 --no-large --json $R/prefill.json
run 90 fp8-token $B --world 2 --decode-tokens 1,16,64,128 --hidden 4096,8192 --fp8 e4m3fn:per-token --json $R/fp8-token.json
run 90 fp8-tensor $B --world 2 --decode-tokens 1,16,64,128 --hidden 4096,8192 --fp8 e4m3fn:per-tensor=0.01 --json $R/fp8-tensor.json
run 60 fp8-demo ./arfuse-demo --backend cuda --fp8 e4m3fn:per-group --dump $R/dump
run 60 fp8-verify ./arfuse-demo --verify-dump $R/dump
rm -rf $R/dump
echo "== cudarc test without the early start $(date -u +%T)"
ARFUSE_PROGRAMMATIC_MAX_WORLD=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 60 ./arfuse-fusion-gpu cuda::cudarc_tensors --test-threads=1 --nocapture > $R/cudarc-nopdl.txt 2>&1; echo "rc=$?" >> $R/cudarc-nopdl.txt
echo "== fusion-gpu $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 240 ./arfuse-fusion-gpu cuda:: --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
export ARFUSE_DEADLINE_MS=3000
ARFUSE_PROGRAMMATIC_MAX_WORLD=8 run 30 w8-pdl-16 ./arfuse-bench --repeats 5 --modes decode --no-large --world 8 --decode-tokens 16 --hidden 4096 --no-plots
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- cudarc test without the early start: $(tail -1 $R/cudarc-nopdl.txt)"; grep -h "^test \|test result\|panicked" -A1 $R/cudarc-nopdl.txt | head -8
echo "-- fusion-gpu"; grep -h "^test \|test result\|panicked" $R/fusion-gpu.txt | cut -c1-160 | head -24; tail -1 $R/fusion-gpu.txt
for f in fp8-token fp8-tensor; do echo "-- $f $(tail -1 $R/$f.md)"; grep "^|" $R/$f.md | grep -v "^|---" | cut -c1-200 | tail -14; done
for f in w2 w2-hot w4 w8 prefill w8-pdl-16; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2 "|" $4 "|" $7 "|" $12}' | head -12; grep -i "error\|timeout\|mismatch" $R/$f.md | head -3 | cut -c1-300
done
for f in fp8-demo fp8-verify; do echo "-- $f"; tail -4 $R/$f.md | cut -c1-200; done
