#!/usr/bin/env bash
# Device call 2 (2026-12-02): why world 8 hangs with programmatic launches.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
T="./arfuse-bench --modes decode --no-large --decode-tokens 1 --hidden 4096 --repeats 3 --warmup 1 --iters 20 --no-plots"
run() { local name=$1; shift; echo "== $name $(date -u +%T)"; timeout 45 "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; nvidia-smi --query-compute-apps=pid --format=csv,noheader >> $R/$name.md; sleep 2; }
export ARFUSE_DEADLINE_MS=3000
run w8-pdl $T --world 8
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_RELEASE run w8-norelease $T --world 8
CUDA_MODULE_LOADING=EAGER run w8-eager $T --world 8
run w6-pdl $T --world 6
run w4-pdl $T --world 4
ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_PDL run w8-nopdl $T --world 8
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
for f in w8-pdl w8-norelease w8-eager w6-pdl w4-pdl w8-nopdl; do echo "-- $f"; grep -v "^$" $R/$f.md | grep -v "^| shape\|^|---" | cut -c1-300 | tail -8; done
