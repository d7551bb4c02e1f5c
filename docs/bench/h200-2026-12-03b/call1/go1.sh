#!/usr/bin/env bash
# Device call 1 (2026-12-03 PM): is the back-to-back PeerTimeout a false dependency between rank
# streams sharing a hardware queue (CUDA_DEVICE_MAX_CONNECTIONS), the early start (NO_PDL), or
# neither? Then decode at P=2 (hot and rotating inputs) and P=4/P=8 on the current tree.
set -u
cd "$(dirname "$0")"
. ./nvrtc.sh
R=/tmp/res; mkdir -p $R
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $R/start.txt
t1000() { local name=$1; shift; echo "== $name $(date -u +%T)"; env "$@" RUST_BACKTRACE=0 ARFUSE_REQUIRE_BACKENDS=cuda timeout 45 ./arfuse-kernels-gpu cuda::thousand_back_to_back --test-threads=1 --nocapture > $R/$name.txt 2>&1; echo "rc=$?" >> $R/$name.txt; }
for i in 1 2 3 4; do t1000 default-$i X=1; done
for i in 1 2 3 4; do t1000 conn32-$i CUDA_DEVICE_MAX_CONNECTIONS=32; done
for i in 1 2 3; do t1000 conn1-$i CUDA_DEVICE_MAX_CONNECTIONS=1; done
for i in 1 2 3; do t1000 nopdl-$i ARFUSE_KERNEL_DEFINES=-DARFUSE_EXP_NO_PDL; done
run() { local t=$1 name=$2; shift 2; echo "== $name $(date -u +%T)"; timeout $t "$@" > $R/$name.md 2>&1; echo "rc=$?" >> $R/$name.md; }
run 90 hot2 ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --no-large --input-sets 1 --json $R/hot2.json
run 90 rot2 ./arfuse-bench --world 2 --repeats 20 --modes decode --decode-tokens 1,16,64,80,128 --hidden 4096,8192 --no-large --json $R/rot2.json
run 60 hot4 ./arfuse-bench --world 4 --repeats 20 --modes decode --decode-tokens 1,16 --hidden 4096 --no-large --input-sets 1 --json $R/hot4.json
run 60 hot8 ./arfuse-bench --world 8 --repeats 20 --modes decode --decode-tokens 1,16 --hidden 4096 --no-large --input-sets 1 --json $R/hot8.json
date -u +%FT%TZ > $R/end.txt
cd $R && tar czf $OUT/res.tgz .
