#!/usr/bin/env bash
# Device call 4 (2026-12-02): the cudarc test with its barriers (twice), the FP8 demo dump on a
# hidden size per-group takes, and what the GPU demo does when every rank refuses (hidden 2880).
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
for i in 1 2; do
  ARFUSE_REQUIRE_BACKENDS=cuda timeout 60 ./arfuse-fusion-gpu cuda::cudarc_tensors --test-threads=1 --nocapture > $R/cudarc-$i.txt 2>&1; echo "rc=$?" >> $R/cudarc-$i.txt
done
timeout 90 ./arfuse-demo --backend cuda --fp8 e4m3fn:per-group --hidden 4096,8192 --dump $R/dump > $R/fp8-demo.md 2>&1; echo "rc=$?" >> $R/fp8-demo.md
timeout 60 ./arfuse-demo --verify-dump $R/dump > $R/fp8-verify.md 2>&1; echo "rc=$?" >> $R/fp8-verify.md
ls $R/dump | head -3 > $R/dump-files.txt; ls $R/dump | wc -l >> $R/dump-files.txt; rm -rf $R/dump
timeout 45 ./arfuse-demo --backend cuda --fp8 e4m3fn:per-group --timeout-s 5 > $R/fp8-demo-2880.md 2>&1; echo "rc=$?" >> $R/fp8-demo-2880.md
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for i in 1 2; do echo "-- cudarc $i: $(tail -1 $R/cudarc-$i.txt)"; grep -h "test result\|panicked" -A1 $R/cudarc-$i.txt | head -4; done
echo "-- fp8 demo"; grep -v "^ *[0-9]*: \|^ *at " $R/fp8-demo.md | tail -22 | cut -c1-160
echo "-- verify"; tail -4 $R/fp8-verify.md | cut -c1-300; cat $R/dump-files.txt
echo "-- 2880"; grep -v "^ *[0-9]*: \|^ *at " $R/fp8-demo-2880.md | head -8 | cut -c1-300; tail -1 $R/fp8-demo-2880.md
