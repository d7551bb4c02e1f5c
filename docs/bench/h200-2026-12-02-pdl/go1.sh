#!/usr/bin/env bash
# Device call 1 (2026-12-02): programmatic dependent launch of the fused kernel, rcp/mean change.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
B="./arfuse-bench --repeats 20 --modes decode --no-large"
run() { local name=$1; shift; echo "== $name $(date -u +%T)"; timeout 150 "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
W2="--world 2 --decode-tokens 1,16,64,80,128 --hidden 4096,8192"
run pdl-w2 $B $W2 --json $R/pdl-w2.json
run pdl-w2-hot $B $W2 --input-sets 1 --json $R/pdl-w2-hot.json
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_PDL run nopdl-w2 $B $W2 --json $R/nopdl-w2.json
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_PDL run nopdl-w2-hot $B $W2 --input-sets 1 --json $R/nopdl-w2-hot.json
for P in 4 8; do
  run pdl-w$P $B --world $P --decode-tokens 1,16 --hidden 4096 --json $R/pdl-w$P.json
  ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_PDL run nopdl-w$P $B --world $P --decode-tokens 1,16 --hidden 4096 --json $R/nopdl-w$P.json
done
echo "== tests $(date -u +%T)"
TESTS="arfuse-fusion-gpu arfuse-kernels-gpu" ARFUSE_REQUIRE_BACKENDS=cuda timeout 330 ./run-tests.sh --test-threads=1 > $R/tests.txt 2>&1; echo "rc=$?" >> $R/tests.txt
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz . 
echo; grep -h "test result\|FAILED\|panicked" $R/tests.txt | head -20; tail -1 $R/tests.txt
for f in pdl-w2 nopdl-w2 pdl-w2-hot nopdl-w2-hot pdl-w4 nopdl-w4 pdl-w8 nopdl-w8; do
  echo "-- $f $(tail -1 $R/$f.md)"; grep "^| [0-9]" $R/$f.md | awk -F'|' '{print $2 "|" $4 "|" $7 "|" $12}'
done
