#!/usr/bin/env bash
# Device call 4: issue 17's separate quantisation kernel (GPU test, bench +quant rows) and
# torch.compile's add+RMSNorm+FP8 (peers.py) on the merged main.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
B="./arfuse-bench --repeats 20 --modes decode --no-large"
F="--world 2 --decode-tokens 1,16,64 --hidden 4096,8192"
run 70 fp8-token $B $F --fp8 e4m3fn:per-token --json $R/fp8-token.json
run 70 fp8-tensor $B $F --fp8 e4m3fn:per-tensor=0.01 --json $R/fp8-tensor.json
echo "== fusion-gpu quantize $(date -u +%T)"
ARFUSE_REQUIRE_BACKENDS=cuda timeout 120 ./arfuse-fusion-gpu cuda::the_separate_quantisation_kernel_is_exact --test-threads=1 --nocapture > $R/fusion-gpu.txt 2>&1; echo "rc=$?" >> $R/fusion-gpu.txt
for f in fp8-token fp8-tensor; do
  echo "== peers $f $(date -u +%T)"
  (cd peers 2>/dev/null || cd .; timeout 150 python3 $(ls -d ./peers/peers.py peers.py 2>/dev/null | head -1) --arfuse $R/$f.json --json $R/peers-$f.json) > $R/peers-$f.md 2>&1; echo "rc=$?" >> $R/peers-$f.md
done
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
echo "-- fusion-gpu"; grep -h "^test \|test result\|panicked" $R/fusion-gpu.txt | cut -c1-200 | head -6; tail -1 $R/fusion-gpu.txt
for f in fp8-token fp8-tensor; do echo "-- $f $(tail -1 $R/$f.md)"; sed -n '/^FP8 out/,$p' $R/$f.md | grep "^|" | cut -c1-200 | head -9; grep -c "differ" $R/$f.md; done
for f in fp8-token fp8-tensor; do echo "-- peers $f $(tail -1 $R/peers-$f.md)"; grep -i "fp8\|compile\|error" $R/peers-$f.md | cut -c1-200 | head -14; done
