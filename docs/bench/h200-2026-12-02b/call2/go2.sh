#!/usr/bin/env bash
# Device call 2: FP8 codes by the reciprocal route (division only near ties), one call site per
# scaling; the early start released only by threads that waited for a pack (8 ranks).
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
B="./arfuse-bench --repeats 20 --modes decode --no-large"
F="--world 2 --decode-tokens 1,16,64 --hidden 4096,8192"
run 60 fp8-token $B $F --fp8 e4m3fn:per-token --json $R/fp8-token.json
run 60 fp8-tensor $B $F --fp8 e4m3fn:per-tensor=0.01 --json $R/fp8-tensor.json
export ARFUSE_DEADLINE_MS=3000
ARFUSE_PROGRAMMATIC_MAX_WORLD=8 run 45 w8-pdl $B --world 8 --decode-tokens 1,16 --hidden 4096 --json $R/w8-pdl.json
ARFUSE_PROGRAMMATIC_MAX_WORLD=8 run 45 w6-pdl $B --world 6 --decode-tokens 1,16 --hidden 4096 --json $R/w6-pdl.json
unset ARFUSE_DEADLINE_MS
run 60 w2-hot $B --world 2 --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --input-sets 1 --json $R/w2-hot.json
echo "== fusion-gpu epilogues $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 150 ./arfuse-fusion-gpu epilogue --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
echo "== kernels-gpu with the early start at 8 $(date -u +%T)"
ARFUSE_PROGRAMMATIC_MAX_WORLD=8 ARFUSE_REQUIRE_BACKENDS=cuda timeout 170 ./arfuse-kernels-gpu cuda::kernels_match_the_cpu_backend cuda::thousand_back_to_back --test-threads=1 --nocapture > $R/kernels-gpu.txt 2>&1; echo "rc=$?" >> $R/kernels-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in fusion-gpu kernels-gpu; do echo "-- $f"; grep -h "^test \|test result\|panicked" $R/$f.txt | cut -c1-160 | head -8; tail -1 $R/$f.txt; done
for f in fp8-token fp8-tensor; do echo "-- $f $(tail -1 $R/$f.md)"; sed -n '/^FP8 out/,$p' $R/$f.md | grep "^| [0-9]" | cut -c1-120; grep -c "differ" $R/$f.md; done
for f in w8-pdl w6-pdl w2-hot; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2 "|" $4 "|" $7 "|" $12}' | head -12; grep -i "error\|timeout\|mismatch" $R/$f.md | head -2 | cut -c1-200
done
