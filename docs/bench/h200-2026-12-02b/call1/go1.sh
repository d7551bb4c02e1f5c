#!/usr/bin/env bash
# Device call 1 (2026-12-02 session 2): the FP8 epilogue's cost by stages (branch-free encode,
# codes from registers), 64x8192's by stages, and the 8-rank early-start hang with more
# hardware queues (CUDA_DEVICE_MAX_CONNECTIONS); then the fusion GPU suite's epilogue tests.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
B="./arfuse-bench --repeats 20 --modes decode --no-large --no-plots"
F="--world 2 --decode-tokens 1,16,64 --hidden 4096,8192"
run 60 fp8-token $B $F --fp8 e4m3fn:per-token --json $R/fp8-token.json
run 60 fp8-tensor $B $F --fp8 e4m3fn:per-tensor=0.01 --json $R/fp8-tensor.json
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_FP8_NO_CODES run 60 fp8-token-nocodes $B $F --fp8 e4m3fn:per-token
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_FP8_NO_DIV run 60 fp8-tensor-nodiv $B $F --fp8 e4m3fn:per-tensor=0.01
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_FP8_REREAD run 60 fp8-token-reread $B $F --fp8 e4m3fn:per-token
S="--world 2 --decode-tokens 64 --hidden 8192 --input-sets 1"
run 40 s64 $B $S
for v in NO_HEADER LOCAL_ONLY NO_NORM NO_PDL NO_RELEASE; do ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_$v run 40 s64-$v $B $S; done
export ARFUSE_DEADLINE_MS=3000
CUDA_DEVICE_MAX_CONNECTIONS=32 ARFUSE_PROGRAMMATIC_MAX_WORLD=8 run 40 w8-pdl-conn32 $B --world 8 --decode-tokens 1,16 --hidden 4096
CUDA_DEVICE_MAX_CONNECTIONS=32 run 40 w8-conn32 $B --world 8 --decode-tokens 1,16 --hidden 4096
unset ARFUSE_DEADLINE_MS
echo "== fusion-gpu epilogues $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 150 ./arfuse-fusion-gpu epilogue --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- fusion-gpu"; grep -h "^test \|test result\|panicked" $R/fusion-gpu.txt | cut -c1-160 | head -12; tail -1 $R/fusion-gpu.txt
for f in fp8-token fp8-tensor fp8-token-nocodes fp8-tensor-nodiv fp8-token-reread; do echo "-- $f $(tail -1 $R/$f.md)"; sed -n '/^FP8 out/,$p' $R/$f.md | grep "^| [0-9]" | cut -c1-120; grep -c "differ" $R/$f.md; done
for f in s64 s64-NO_HEADER s64-LOCAL_ONLY s64-NO_NORM s64-NO_PDL s64-NO_RELEASE w8-pdl-conn32 w8-conn32; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2 "|" $4 "|" $7 "|" $12}' | head -4; grep -i "error\|timeout\|mismatch" $R/$f.md | head -2 | cut -c1-200
done
