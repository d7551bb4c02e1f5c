#!/usr/bin/env bash
# Device call 3: the committed state: FP8 codes by division (branch-free encode, warp max), the
# early start at every world size (released only by threads that waited for a pack).
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
run 45 w8 $B --world 8 --decode-tokens 1,16 --hidden 4096 --json $R/w8.json
run 45 w4 $B --world 4 --decode-tokens 1,16 --hidden 4096 --json $R/w4.json
unset ARFUSE_DEADLINE_MS
run 60 w2 $B --world 2 --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --json $R/w2.json
echo "== kernels-gpu (early start at every world size) $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 330 ./arfuse-kernels-gpu cuda::kernels_match_the_cpu_backend cuda::thousand_back_to_back cuda::graph_replay --test-threads=1 --nocapture > $R/kernels-gpu.txt 2>&1; echo "rc=$?" >> $R/kernels-gpu.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- kernels-gpu"; grep -h "^test \|test result\|panicked\|FAILED\|^ *[2-8]  " $R/kernels-gpu.txt | cut -c1-160 | head -20; tail -1 $R/kernels-gpu.txt
for f in fp8-token fp8-tensor; do echo "-- $f $(tail -1 $R/$f.md)"; sed -n '/^FP8 out/,$p' $R/$f.md | grep "^| [0-9]" | cut -c1-120; grep -c "differ" $R/$f.md; done
for f in w8 w4 w2; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2 "|" $4 "|" $7 "|" $12}' | head -12; grep -i "error\|timeout\|mismatch" $R/$f.md | head -2 | cut -c1-200
done
